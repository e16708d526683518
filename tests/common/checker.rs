//! A checker in the style of Jepsen's Kafka workload: producers send unique,
//! sequence-numbered records and log what happened to each; after the run
//! the log is read back and compared with that history.
//!
//! The rules (docs/reliability.md states them for users):
//! - every acknowledged record is in the log exactly once, at the partition
//!   and offset of its acknowledgement;
//! - a record whose acknowledgement was never seen (the broker died first,
//!   or the delivery timed out) may be there, but at most once;
//! - each producer's records appear in each partition in the order it sent
//!   them;
//! - nothing is in the log that no producer sent;
//! - offsets in a partition are never reused, and (for a topic without
//!   gaps, such as one with no compaction or transactions) never skipped;
//! - what a consumer was served while the run went on is what the log holds
//!   at that offset afterwards: nothing served is later lost or changed.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use skiff::client::ConsumerRecord;

/// The value of record `seq` of `producer`, padded to `size` bytes (at
/// least the tag's length). The tag makes every value unique and parseable.
pub fn value(producer: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut v = format!("p{producer}:s{seq}:").into_bytes();
    while v.len() < size {
        v.push(b'.');
    }
    v
}

/// `(producer, seq)` of a value made by [`value`].
pub fn parse(v: &[u8]) -> Option<(u32, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let rest = s.strip_prefix('p')?;
    let (p, rest) = rest.split_once(":s")?;
    let (seq, pad) = rest.split_once(':')?;
    if !pad.bytes().all(|b| b == b'.') {
        return None;
    }
    Some((p.parse().ok()?, seq.parse().ok()?))
}

/// What happened to one sent record, as its producer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent; no answer seen (yet).
    Pending,
    Acked {
        partition: u32,
        offset: u64,
    },
    /// The producer gave up on it (timeout, broker gone): it may or may not
    /// have been written.
    Indeterminate,
}

/// The history of a run, shared by the producer threads.
#[derive(Default)]
pub struct History {
    ops: Mutex<HashMap<(u32, u64), Outcome>>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    pub fn sent(&self, producer: u32, seq: u64) {
        let prev = self
            .ops
            .lock()
            .unwrap()
            .insert((producer, seq), Outcome::Pending);
        assert!(prev.is_none(), "p{producer}:s{seq} sent twice by the test");
    }

    pub fn acked(&self, producer: u32, seq: u64, partition: u32, offset: u64) {
        self.ops
            .lock()
            .unwrap()
            .insert((producer, seq), Outcome::Acked { partition, offset });
    }

    pub fn gave_up(&self, producer: u32, seq: u64) {
        self.ops
            .lock()
            .unwrap()
            .insert((producer, seq), Outcome::Indeterminate);
    }

    pub fn acked_count(&self) -> usize {
        self.ops
            .lock()
            .unwrap()
            .values()
            .filter(|o| matches!(o, Outcome::Acked { .. }))
            .count()
    }

    pub fn snapshot(&self) -> HashMap<(u32, u64), Outcome> {
        self.ops.lock().unwrap().clone()
    }

    /// The outcomes, leaving the history empty: no copy of a soak's
    /// millions of entries.
    pub fn take(&self) -> HashMap<(u32, u64), Outcome> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

/// A record as read: where it was and what it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub partition: u32,
    pub offset: u64,
    pub value: Vec<u8>,
}

impl From<&ConsumerRecord> for Seen {
    fn from(r: &ConsumerRecord) -> Seen {
        Seen {
            partition: r.partition,
            offset: r.offset,
            value: r.value.clone(),
        }
    }
}

/// What consumers were served during a run, kept small enough for a long
/// soak: a hash of the value per (partition, offset). Two different values
/// served at one offset are a fault by themselves.
#[derive(Debug, Default)]
pub struct Served {
    at: HashMap<(u32, u64), u64>,
    pub records: usize,
    conflicts: Vec<String>,
}

impl Served {
    pub fn record(&mut self, partition: u32, offset: u64, value: &[u8]) {
        self.records += 1;
        let h = value_hash(value);
        if let Some(prev) = self.at.insert((partition, offset), h) {
            if prev != h {
                self.conflicts
                    .push(format!("{partition}@{offset}: two different values served"));
            }
        }
    }

    /// Another consumer's view, merged into this one.
    pub fn merge(&mut self, other: Served) {
        self.records += other.records;
        self.conflicts.extend(other.conflicts);
        for ((p, o), h) in other.at {
            if self.at.insert((p, o), h).is_some_and(|prev| prev != h) {
                self.conflicts.push(format!(
                    "{p}@{o}: two consumers were served different values"
                ));
            }
        }
    }
}

/// FNV-1a: a stable 64-bit digest of a value.
pub fn value_hash(v: &[u8]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether offsets may be skipped (compaction, transaction markers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offsets {
    Dense,
    MayHaveGaps,
}

/// What the check found. Each list holds up to [`EXAMPLES_MAX`] examples;
/// the counts are exact.
#[derive(Debug, Default)]
pub struct Report {
    pub sent: usize,
    pub acked: usize,
    pub read: usize,
    /// Records read back whose ack was never seen.
    pub unacked_present: usize,
    /// Acked records below their partition's earliest offset at the end:
    /// dropped by retention (the ring wrapped), not lost.
    pub expired: usize,
    pub lost: Count<(u32, u64)>,
    pub duplicated: Count<(u32, u64)>,
    /// Acked at one place, found at another.
    pub misplaced: Count<String>,
    pub reordered: Count<String>,
    pub unexpected: Count<String>,
    pub offset_reused: Count<(u32, u64)>,
    pub offset_skipped: Count<String>,
    /// Served to a consumer during the run, then absent or different.
    pub served_then_changed: Count<String>,
}

pub const EXAMPLES_MAX: usize = 5;

#[derive(Debug)]
pub struct Count<T> {
    pub n: usize,
    pub examples: Vec<T>,
}

impl<T> Default for Count<T> {
    fn default() -> Self {
        Count {
            n: 0,
            examples: Vec::new(),
        }
    }
}

impl<T> Count<T> {
    fn add(&mut self, t: T) {
        self.n += 1;
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(t);
        }
    }
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.lost.n == 0
            && self.duplicated.n == 0
            && self.misplaced.n == 0
            && self.reordered.n == 0
            && self.unexpected.n == 0
            && self.offset_reused.n == 0
            && self.offset_skipped.n == 0
            && self.served_then_changed.n == 0
    }

    /// One line for logs and `scripts/soak`.
    pub fn summary(&self) -> String {
        format!(
            "sent {} acked {} read {} unacked-present {} expired {} lost {} duplicated {} misplaced {} \
             reordered {} unexpected {} offset-reused {} offset-skipped {} served-then-changed {}",
            self.sent,
            self.acked,
            self.read,
            self.unacked_present,
            self.expired,
            self.lost.n,
            self.duplicated.n,
            self.misplaced.n,
            self.reordered.n,
            self.unexpected.n,
            self.offset_reused.n,
            self.offset_skipped.n,
            self.served_then_changed.n
        )
    }

    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "{}\n{self:#?}", self.summary());
    }
}

/// Compares the history with the log read back after the run (`read`:
/// every record of the topic from `earliest`, each partition's earliest
/// offset then, which retention may have moved) and with what consumers
/// were served during it (`served`).
pub fn check(
    history: &HashMap<(u32, u64), Outcome>,
    earliest: &HashMap<u32, u64>,
    read: &[Seen],
    served: &Served,
    offsets: Offsets,
) -> Report {
    let mut r = Report {
        sent: history.len(),
        acked: history
            .values()
            .filter(|o| matches!(o, Outcome::Acked { .. }))
            .count(),
        read: read.len(),
        ..Report::default()
    };
    // Where each record was found, and what each (partition, offset) holds.
    let mut found: HashMap<(u32, u64), Vec<(u32, u64)>> = HashMap::new();
    let mut at: BTreeMap<(u32, u64), &[u8]> = BTreeMap::new();
    for s in read {
        if at.insert((s.partition, s.offset), &s.value).is_some() {
            r.offset_reused.add((s.partition, s.offset));
        }
        match parse(&s.value).filter(|id| history.contains_key(id)) {
            Some(id) => found.entry(id).or_default().push((s.partition, s.offset)),
            None => r.unexpected.add(format!(
                "{}@{}: {:?}",
                s.partition,
                s.offset,
                String::from_utf8_lossy(&s.value[..s.value.len().min(40)])
            )),
        }
    }
    for (id, places) in &found {
        if places.len() > 1 {
            r.duplicated.add(*id);
        }
        match history[id] {
            Outcome::Acked { partition, offset } => {
                if !places.contains(&(partition, offset)) {
                    r.misplaced.add(format!(
                        "p{}:s{} acked at {partition}@{offset}, found at {places:?}",
                        id.0, id.1
                    ));
                }
            }
            Outcome::Pending | Outcome::Indeterminate => r.unacked_present += 1,
        }
    }
    for (id, o) in history {
        if let Outcome::Acked { partition, offset } = o {
            if found.contains_key(id) {
                continue;
            }
            if *offset < earliest.get(partition).copied().unwrap_or(0) {
                r.expired += 1;
            } else {
                r.lost.add(*id);
            }
        }
    }
    // Per partition: offsets in order, each producer's sequence increasing.
    let mut last_offset: HashMap<u32, u64> = HashMap::new();
    let mut last_seq: HashMap<(u32, u32), u64> = HashMap::new();
    for (&(p, o), v) in &at {
        if let Some(prev) = last_offset.insert(p, o) {
            if offsets == Offsets::Dense && o != prev + 1 {
                r.offset_skipped
                    .add(format!("partition {p}: {prev} then {o}"));
            }
        }
        if let Some((producer, seq)) = parse(v) {
            if let Some(prev) = last_seq.insert((p, producer), seq) {
                if seq <= prev {
                    r.reordered.add(format!(
                        "partition {p}, producer {producer}: s{seq} at {o} after s{prev}"
                    ));
                }
            }
        }
    }
    for c in &served.conflicts {
        r.served_then_changed.add(c.clone());
    }
    for (&(p, o), &h) in &served.at {
        if o < earliest.get(&p).copied().unwrap_or(0) {
            continue;
        }
        match at.get(&(p, o)) {
            Some(v) if value_hash(v) == h => {}
            Some(v) => r.served_then_changed.add(format!(
                "{p}@{o}: now {:?}, not what was served",
                String::from_utf8_lossy(&v[..v.len().min(40)])
            )),
            None => r
                .served_then_changed
                .add(format!("{p}@{o}: served, now gone")),
        }
    }
    r
}
