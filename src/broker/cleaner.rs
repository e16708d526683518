//! Cleanup policies: what a topic keeps besides what its ring holds.
//!
//! - `delete` (the default): the ring reuses its oldest segment, and
//!   `retention_ms` drops segments by age.
//! - `compact`: the latest record per key survives; a record without a
//!   value (a tombstone) deletes its key, and is itself removed once it is
//!   older than `tombstone_retention_ms`. Records without a key are refused.
//! - `compact,delete`: both; time retention may drop latest values too.
//!
//! The settings live in `<data_dir>/cleanup.meta` (a file of their own, as
//! `msgid.meta`: `topics.meta` is postcard, which cannot take new fields),
//! holding only topics whose policy is not `delete`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::storage::PartitionId;

use serde::{Deserialize, Serialize};

use super::txn::index::{in_aborted_range, Aborted};
use super::BrokerError;

pub(super) const CLEANUP_META_FILE: &str = "cleanup.meta";

/// Kafka's `delete.retention.ms` default: a day for consumers that were
/// away to see a delete before it goes.
pub const TOMBSTONE_RETENTION_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CleanupPolicy {
    #[default]
    Delete,
    Compact,
    CompactDelete,
}

impl CleanupPolicy {
    pub fn compacts(self) -> bool {
        matches!(self, CleanupPolicy::Compact | CleanupPolicy::CompactDelete)
    }
}

impl FromStr for CleanupPolicy {
    type Err = BrokerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "delete" => Ok(CleanupPolicy::Delete),
            "compact" => Ok(CleanupPolicy::Compact),
            "compact,delete" | "delete,compact" => Ok(CleanupPolicy::CompactDelete),
            _ => Err(BrokerError::InvalidConfig(
                "cleanup must be \"delete\", \"compact\" or \"compact,delete\"",
            )),
        }
    }
}

impl fmt::Display for CleanupPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        })
    }
}

/// A topic's cleanup settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupConfig {
    pub policy: CleanupPolicy,
    /// How long a tombstone stays after it became a key's latest record
    /// (by its timestamp), so consumers that were away still see the delete.
    pub tombstone_retention_ms: u64,
}

impl Default for CleanupConfig {
    fn default() -> Self {
        CleanupConfig {
            policy: CleanupPolicy::Delete,
            tombstone_retention_ms: TOMBSTONE_RETENTION_MS_DEFAULT,
        }
    }
}

/// Every compacted topic's settings, by name.
pub(super) type CleanupTable = BTreeMap<String, CleanupConfig>;

/// Whether a checked batch's records may go to a topic with `cleanup`.
/// Every topic: the body must read as a consumer reads it (exactly
/// `record_count` records of the right types, offset deltas strictly
/// increasing, nothing after them), or no consumer could read past the
/// batch once stored. A compacted topic: every record needs a key. One
/// pass, no allocation: this runs on every produce.
pub(super) fn check_records(
    topic: &str,
    cleanup: CleanupPolicy,
    header: &crate::batch::BatchHeader,
    batch: &[u8],
) -> Result<(), BrokerError> {
    let view = crate::batch::BatchView {
        header: *header,
        bytes: batch,
    };
    // A malformed body is the batch's error (invalid_batch) even after a
    // keyless record.
    match view.check_records(cleanup.compacts())? {
        Some(index) => Err(BrokerError::InvalidRecord {
            topic: topic.to_owned(),
            index,
            why: "it has no key, and a compacted topic keeps the latest record per key",
        }),
        None => Ok(()),
    }
}

/// Fits a topic's storage settings to its cleanup policy. A compacted
/// ring never overwrites its oldest segment (that could hold a key's latest
/// value): the cleaner frees segments, and a ring full of live data refuses
/// writes. `compact` alone keeps latest values forever, so it takes no
/// time retention.
pub(super) fn apply_policy(
    config: &mut crate::storage::PartitionConfig,
    policy: CleanupPolicy,
    overflow_asked: Option<crate::storage::OverflowPolicy>,
) -> Result<(), BrokerError> {
    if !policy.compacts() {
        return Ok(());
    }
    if overflow_asked == Some(crate::storage::OverflowPolicy::Overwrite) {
        return Err(BrokerError::InvalidConfig(
            "a compacted topic cannot take overflow = overwrite: it would drop latest values",
        ));
    }
    if policy == CleanupPolicy::Compact && config.retention_ms.is_some() {
        return Err(BrokerError::InvalidConfig(
            "retention_ms with cleanup = \"compact\" would drop latest values: use \"compact,delete\"",
        ));
    }
    config.overflow = crate::storage::OverflowPolicy::Reject;
    Ok(())
}

// ------------------------------------------------------------ the cleaner

/// Memory per key-map entry: a 128-bit key hash, the key's latest offset,
/// its timestamp and tombstone flag, and the hash table's overhead (a
/// control byte and room for its load factor) rounded up.
pub const KEY_MAP_ENTRY_BYTES: u64 = 48;

/// How long a compaction waits, at most, for the producer batches in
/// flight in the segments it could merge (see `compact_partition`): 40 x
/// 5 ms, several fsyncs of a slow card.
const SNAPSHOT_WAIT_ROUNDS: u32 = 40;
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// The cleaner's limits, from `[compaction]`.
#[derive(Debug, Clone, Copy)]
pub struct CleanerLimits {
    /// The key map's memory: `key_map_bytes / KEY_MAP_ENTRY_BYTES` keys
    /// per pass; more keys take several passes.
    pub key_map_bytes: u64,
    /// The cleaner's reads and writes together, per second.
    pub max_bytes_per_sec: u64,
}

impl Default for CleanerLimits {
    fn default() -> Self {
        CleanerLimits {
            key_map_bytes: 256 * 1024,
            max_bytes_per_sec: 8 * 1024 * 1024,
        }
    }
}

/// The cleaner's counters, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct CleanerStats {
    pub runs: AtomicU64,
    pub passes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub records_removed: AtomicU64,
    pub segments_freed: AtomicU64,
    /// Bytes of closed segments of compacted partitions the cleaner has
    /// not merged yet (all but each ring's oldest), at its last look.
    pub lag_bytes: AtomicU64,
    /// Bytes of log the run in progress has processed so far.
    pub progress_bytes: AtomicU64,
}

/// Compacted partitions whose ring is full, and whether the cleaner can
/// still make room in them. A write to a full ring is refused either way;
/// what the producer is told differs. Only a cleaner's pass over the ring
/// as it stands can say that nothing in it may be dropped
/// (`RingFullOfLiveData`, not retried). Until then the ring is full only
/// because writes came faster than compaction (`CompactionBehind`, which
/// clients retry): a producer of a few keys must not be told its
/// partition is full of live data because it wrote faster than the
/// cleaner's pace.
pub(super) struct FullRings {
    storage: crate::storage::Storage,
    /// (topic, partition) → the high watermark at which a pass over the
    /// full ring found nothing to merge. A full ring takes no writes, so
    /// while it stays full the watermark stays; once it moves (the ring
    /// grew, or was compacted) the verdict no longer applies.
    verdicts: std::sync::Mutex<foldhash::HashMap<(String, u32), u64>>,
    /// Wakes the cleaner when a ring without a verdict refuses a write.
    refused: event_listener::Event,
}

impl FullRings {
    pub(super) fn new(storage: crate::storage::Storage) -> FullRings {
        FullRings {
            storage,
            verdicts: Default::default(),
            refused: event_listener::Event::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<(String, u32), u64>> {
        self.verdicts.lock().expect("full rings lock")
    }

    /// The error for a write the full ring of a compacted partition
    /// refused; wakes the cleaner unless it has found the ring full of
    /// live data as it is now.
    pub(super) fn refused(&self, topic: String, partition: u32) -> BrokerError {
        let verdict = self.lock().get(&(topic.clone(), partition)).copied();
        let hw = self
            .storage
            .offsets(&PartitionId::new(topic.as_str(), partition))
            .map(|o| o.high_watermark)
            .ok();
        if verdict.is_some() && verdict == hw {
            return BrokerError::RingFullOfLiveData { topic, partition };
        }
        self.refused.notify(usize::MAX);
        BrokerError::CompactionBehind { topic, partition }
    }

    /// After a pass of the cleaner over a partition's ring: whether it
    /// found the ring full and nothing to merge, at `hw`.
    fn judged(&self, topic: &str, partition: u32, full_of_live_data: Option<u64>) {
        let mut verdicts = self.lock();
        match full_of_live_data {
            Some(hw) => {
                verdicts.insert((topic.to_owned(), partition), hw);
            }
            None => {
                verdicts.remove(&(topic.to_owned(), partition));
            }
        }
    }
}

/// Whether a compaction shows that nothing in the ring may go (if it is
/// full): only a pass over every closed segment that found nothing to
/// merge. One that merged freed no slot when it merged one segment
/// (dropping its dead records), but the next merges that with the ones
/// after it.
pub(super) fn full_of_live_data(r: &CompactionReport) -> bool {
    r.segments_merged == 0 && !r.held_back
}

/// What one compaction of a partition did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Segments merged (0: nothing to do) and slots freed.
    pub segments_merged: u32,
    pub segments_freed: u32,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_removed: u64,
    /// Closed segments were left out: their batches are past what the
    /// producers' snapshot covers yet (some still in flight).
    pub held_back: bool,
}

#[derive(Debug, Clone, Copy)]
struct Latest {
    offset: u64,
    timestamp: i64,
    tombstone: bool,
}

/// Key hash → latest record, with a capacity fixed at start-up: the table
/// is allocated once and cleared between passes, never grown.
pub(super) struct KeyMap {
    map: std::collections::HashMap<u128, Latest>,
    cap: usize,
}

fn key_hash(key: &[u8]) -> u128 {
    use std::hash::{Hash, Hasher};
    // Two SipHashes with different prefixes: 128 bits, so two live keys
    // meeting in one entry (which would drop one's latest value) is out of
    // reach (about n^2 / 2^129).
    let mut a = std::hash::DefaultHasher::new();
    (0u8, key).hash(&mut a);
    let mut b = std::hash::DefaultHasher::new();
    (1u8, key).hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

impl KeyMap {
    pub(super) fn new(limits: &CleanerLimits) -> KeyMap {
        let cap = (limits.key_map_bytes / KEY_MAP_ENTRY_BYTES).max(1) as usize;
        KeyMap {
            map: std::collections::HashMap::with_capacity(cap),
            cap,
        }
    }
}

/// Paces the cleaner's I/O to `bytes_per_sec`.
struct Pacer {
    start: std::time::Instant,
    bytes: u64,
    rate: u64,
}

impl Pacer {
    async fn spend(&mut self, n: u64) {
        self.bytes += n;
        if self.rate == 0 {
            return;
        }
        let due = std::time::Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            smol::Timer::after(due - elapsed).await;
        }
    }
}

/// One decoded record of a batch, with what compaction needs.
struct Rec<'a> {
    offset: u64,
    key: Option<&'a [u8]>,
    timestamp: i64,
    /// A transaction marker: keyed by marker type, not by the user's keys.
    control: bool,
    /// Part of an aborted transaction: no reader under read_committed
    /// sees it, so it never decides a key's latest value.
    aborted: bool,
}

/// Whether a record stays, under a pass's key map: the latest of its key
/// (a tombstone only until its retention ends); records of keys outside
/// this pass's class, and records without a key, stay. Aborted records go;
/// markers stay as long as a tombstone would (readers skip them, and the
/// aborted ranges live in the transaction log, not in them).
fn keep(r: &Rec<'_>, map: &KeyMap, class: (u64, u64), tombstones_before: i64) -> bool {
    if r.control {
        return r.timestamp >= tombstones_before;
    }
    if r.aborted {
        return false;
    }
    let Some(key) = r.key else { return true };
    let h = key_hash(key);
    if (h as u64) % class.1 != class.0 {
        return true;
    }
    match map.map.get(&h) {
        Some(l) if l.offset > r.offset => false,
        Some(l) if l.offset == r.offset => !(l.tombstone && l.timestamp < tombstones_before),
        _ => true,
    }
}

/// The batch rebuilt with only the records `keep` says, its offsets and
/// extent unchanged (`None`: none stays). `force_last` keeps the last
/// record if nothing else stays (the batch ends a compacted segment,
/// which must end where it ended). Returns also the records removed.
fn rebuild(
    view: &crate::batch::BatchView<'_>,
    aborted: &[Aborted],
    keep_rec: impl Fn(&Rec<'_>) -> bool,
    force_last: bool,
) -> Result<(Option<Vec<u8>>, u64), BrokerError> {
    let h = view.header;
    let records = view.records()?;
    let control = h.is_control();
    let in_aborted = in_aborted_range(aborted, &h);
    let recs: Vec<Rec<'_>> = records
        .iter()
        .map(|r| Rec {
            offset: h.base_offset + u64::from(r.offset_delta),
            key: r.key.map(|k| &**k),
            timestamp: h.first_timestamp + r.timestamp_delta,
            control,
            aborted: in_aborted,
        })
        .collect();
    let mut kept: Vec<bool> = recs.iter().map(&keep_rec).collect();
    if force_last && !kept.iter().any(|&k| k) {
        if let Some(last) = kept.last_mut() {
            *last = true;
        }
    }
    let n = kept.iter().filter(|&&k| k).count();
    let removed = (recs.len() - n) as u64;
    if n == recs.len() {
        return Ok((Some(view.bytes.to_vec()), 0));
    }
    if n == 0 {
        return Ok((None, removed));
    }
    let mut b = crate::batch::BatchBuilder::new();
    let mut next_delta = 0u32;
    for (r, _) in records.iter().zip(&kept).filter(|(_, &k)| k) {
        b.skip_offsets(r.offset_delta - next_delta);
        let headers: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|hd| (hd.name, hd.value.as_ref()))
            .collect();
        b.push_record(
            h.first_timestamp + r.timestamp_delta,
            r.key.map(|k| k.as_ref()),
            r.value.map(|v| v.as_ref()),
            &headers,
        );
        next_delta = r.offset_delta + 1;
    }
    // The extent stays: the producer's last sequence and the next batch's
    // place follow from it.
    b.skip_offsets(h.last_offset_delta + 1 - next_delta);
    let stamp = crate::batch::ProducerStamp {
        producer_id: h.producer_id,
        producer_epoch: h.producer_epoch,
        base_sequence: h.base_sequence,
    };
    Ok((Some(b.finish_with(stamp, h.base_offset)), removed))
}

impl super::Broker {
    /// Reads `[from, to)` of a partition batch by batch, calling `each`
    /// with every batch; paced.
    async fn scan(
        &self,
        id: &PartitionId,
        from: u64,
        to: u64,
        pacer: &mut Pacer,
        mut each: impl FnMut(&crate::batch::BatchView<'_>) -> Result<(), BrokerError>,
    ) -> Result<(), BrokerError> {
        let mut at = from;
        let step = self.storage.max_batch_bytes().max(256 * 1024);
        while at < to {
            let bytes = self.storage.read(id, at, step).await?;
            if bytes.is_empty() {
                break;
            }
            let read = bytes.len() as u64;
            let before = at;
            for view in crate::batch::BatchIter::new(&bytes) {
                let view = view?;
                if view.header.base_offset >= to {
                    at = to;
                    break;
                }
                each(&view)?;
                at = view.header.next_offset();
            }
            self.cleaner_stats
                .bytes_read
                .fetch_add(read, Ordering::Relaxed);
            self.cleaner_stats
                .progress_bytes
                .fetch_add(read, Ordering::Relaxed);
            pacer.spend(read).await;
            if at <= before {
                break;
            }
        }
        Ok(())
    }

    /// Compacts one partition of a compacted topic: merges its oldest
    /// segments whose kept records fit in one segment (see
    /// `storage::compact`), in as many passes as the key map needs.
    pub async fn compact_partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<CompactionReport, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        let cleanup = self.cleanup_config(topic);
        if !cleanup.policy.compacts() {
            return Err(BrokerError::InvalidConfig(
                "the topic is not compacted (cleanup = \"delete\")",
            ));
        }
        // One compaction at a time: one key map, one I/O budget.
        let mut map = self.key_map.lock().await;
        let map = &mut *map;
        let mut pacer = Pacer {
            start: std::time::Instant::now(),
            bytes: 0,
            rate: self.cleaner_limits.max_bytes_per_sec,
        };
        self.cleaner_stats.runs.fetch_add(1, Ordering::Relaxed);
        self.cleaner_stats
            .progress_bytes
            .store(0, Ordering::Relaxed);
        // Idempotent producers' state is rebuilt at start-up from their
        // snapshot and the batches after it: a batch compaction removes
        // whole must lie below the snapshot, or a producer whose last
        // batches it was would be unknown after a restart (and its retry
        // written twice). So a snapshot first, and merges stop below what
        // it covers. Batches still in flight hold that back (their offsets
        // are known only once acknowledged): a pipelining producer's last
        // few, in the newest closed segment after a roll; they complete
        // within an fsync, so wait a little for them.
        let closed_ends: Vec<u64> = self
            .storage
            .segments(&id)
            .await?
            .iter()
            .filter(|s| !s.active)
            .map(|s| s.next_offset)
            .collect();
        let closed_end = closed_ends.iter().copied().max().unwrap_or(0);
        for _ in 0..SNAPSHOT_WAIT_ROUNDS {
            let hw = self.storage.offsets(&id)?.high_watermark;
            if self.producers.snapshot_would_cover(topic, partition, hw) >= closed_end {
                break;
            }
            smol::Timer::after(SNAPSHOT_WAIT).await;
        }
        let hw = self.storage.offsets(&id)?.high_watermark;
        // On the offload thread: its fsyncs and rename (2 to 4 flushes on
        // an SD card) held the network thread, and every connection on it,
        // at each compaction. A snapshot renamed in place but not synced
        // fails it as before: compaction may then drop batches only a
        // snapshot that a power loss can undo covers. None is written when
        // the one on disk lets as much merge (a held-back pass's return).
        let covered = {
            let (producers, topic) = (self.producers.clone(), topic.to_owned());
            crate::offload::run(move || {
                #[cfg(test)]
                super::hold_meta_write(&producers.snapshot_path(&topic, partition));
                producers.snapshot_for_compaction(&topic, partition, hw, &closed_ends)
            })
            .await
            .map_err(crate::storage::StorageError::Meta)?
        };
        let mut report = CompactionReport::default();
        let mut classes = 1u64;
        let mut class = 0u64;
        while class < classes {
            let tombstones_before = self
                .clock
                .now_ms()
                .saturating_sub(cleanup.tombstone_retention_ms.min(i64::MAX as u64) as i64);
            let o = self.storage.offsets(&id)?;
            // Transactions: only records below the last stable offset, and
            // not aborted, may decide a key's latest value. A record of an
            // open transaction that later aborts must not have removed the
            // committed value before it.
            let stable = self
                .txn_index
                .last_stable_offset(topic, partition, o.high_watermark);
            let aborted = self.txn_index.aborted(topic, partition);
            // 1. The key map of this class, over the stable log.
            map.map.clear();
            let mut overflow = false;
            let cap = map.cap;
            self.scan(&id, o.earliest, stable, &mut pacer, |view| {
                let h = view.header;
                if h.is_control() || in_aborted_range(&aborted, &h) {
                    return Ok(());
                }
                for r in view.records()? {
                    let Some(key) = r.key else { continue };
                    let kh = key_hash(key);
                    if (kh as u64) % classes != class {
                        continue;
                    }
                    if map.map.len() >= cap && !map.map.contains_key(&kh) {
                        overflow = true;
                        return Ok(());
                    }
                    map.map.insert(
                        kh,
                        Latest {
                            offset: h.base_offset + u64::from(r.offset_delta),
                            timestamp: h.first_timestamp + r.timestamp_delta,
                            tombstone: r.value.is_none(),
                        },
                    );
                }
                Ok(())
            })
            .await?;
            if overflow {
                // More keys than the map holds: split them by hash into
                // twice as many classes, one pass each.
                classes *= 2;
                class = 0;
                if classes > 1 << 16 {
                    return Err(BrokerError::InvalidConfig(
                        "compaction.key_map_bytes is too small for this topic's keys",
                    ));
                }
                log::info!("{id}: keys fill the compaction key map; {classes} passes");
                continue;
            }
            self.cleaner_stats.passes.fetch_add(1, Ordering::Relaxed);
            let keep_rec = |r: &Rec<'_>| keep(r, map, (class, classes), tombstones_before);
            let pass = self
                .compact_pass(&id, &aborted, &keep_rec, covered, &mut pacer)
                .await?;
            report.segments_merged = report.segments_merged.max(pass.segments_merged);
            report.segments_freed += pass.segments_freed;
            report.records_removed += pass.records_removed;
            report.held_back |= pass.held_back;
            if report.bytes_before == 0 {
                report.bytes_before = pass.bytes_before;
            }
            report.bytes_after = pass.bytes_after;
            class += 1;
        }
        self.cleaner_stats
            .segments_freed
            .fetch_add(u64::from(report.segments_freed), Ordering::Relaxed);
        self.cleaner_stats
            .records_removed
            .fetch_add(report.records_removed, Ordering::Relaxed);
        Ok(report)
    }

    /// One pass: plans how many of the oldest segments merge into one,
    /// then writes the merge.
    async fn compact_pass(
        &self,
        id: &PartitionId,
        aborted: &[Aborted],
        keep_rec: &(impl Fn(&Rec<'_>) -> bool + Sync),
        covered: u64,
        pacer: &mut Pacer,
    ) -> Result<CompactionReport, BrokerError> {
        let segs = self.storage.segments(id).await?;
        let closed: Vec<_> = segs
            .iter()
            .filter(|s| !s.active && s.next_offset <= covered)
            .copied()
            .collect();
        let held_back = segs.iter().any(|s| !s.active && s.next_offset > covered);
        let nothing = CompactionReport {
            held_back,
            ..CompactionReport::default()
        };
        let Some(first) = closed.first().copied() else {
            return Ok(nothing);
        };
        let segment_bytes = self.storage_segment_bytes(id)?;
        let room = segment_bytes - crate::storage::BLOCK_BYTES as u64;
        // 2. Plan: the kept bytes of each closed segment, oldest first,
        // while they fit one segment together.
        let mut count = 0usize;
        let mut kept_total = 0u64;
        let mut in_total = 0u64;
        let mut removed_total = 0u64;
        for s in &closed {
            let mut kept = 0u64;
            let mut removed = 0u64;
            let end = s.next_offset;
            self.scan(id, s.base_offset, end, pacer, |view| {
                let last = view.header.next_offset() == end;
                let (b, r) = rebuild(view, aborted, keep_rec, last)?;
                kept += b.map_or(0, |b| b.len() as u64);
                removed += r;
                Ok(())
            })
            .await?;
            if kept_total + kept > room {
                break;
            }
            kept_total += kept;
            in_total += s.bytes - crate::storage::BLOCK_BYTES as u64;
            removed_total += removed;
            count += 1;
        }
        if count == 0 || (count == 1 && removed_total == 0) {
            return Ok(nothing);
        }
        // 3. Write the merge in chunks, then swap it in.
        let last_end = closed[count - 1].next_offset;
        self.storage.compact_begin(id, first.epoch, count).await?;
        let chunk_max = crate::storage::compact_write_bytes_max(self.storage.max_batch_bytes());
        let mut chunk: Vec<u8> = Vec::with_capacity(chunk_max);
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let written = async {
            let mut at = first.base_offset;
            while at < last_end {
                pending.clear();
                let mut next = at;
                // Build up to a chunk's worth, then hand it over.
                let bytes = self.storage.read(id, at, chunk_max).await?;
                if bytes.is_empty() {
                    break;
                }
                pacer.spend(bytes.len() as u64).await;
                for view in crate::batch::BatchIter::new(&bytes) {
                    let view = view?;
                    if view.header.base_offset >= last_end {
                        next = last_end;
                        break;
                    }
                    let last = view.header.next_offset() == last_end;
                    if let (Some(b), _) = rebuild(&view, aborted, keep_rec, last)? {
                        pending.push(b);
                    }
                    next = view.header.next_offset();
                }
                for b in pending.drain(..) {
                    if chunk.len() + b.len() > chunk_max {
                        self.write_chunk(id, &mut chunk, pacer).await?;
                    }
                    chunk.extend_from_slice(&b);
                }
                if next <= at {
                    break;
                }
                at = next;
            }
            self.write_chunk(id, &mut chunk, pacer).await?;
            self.storage.compact_commit(id).await?;
            Ok::<(), BrokerError>(())
        }
        .await;
        if let Err(e) = written {
            let _ = self.storage.compact_abort(id).await;
            return Err(e);
        }
        Ok(CompactionReport {
            segments_merged: count as u32,
            segments_freed: count as u32 - 1,
            bytes_before: in_total,
            bytes_after: kept_total,
            records_removed: removed_total,
            held_back,
        })
    }

    async fn write_chunk(
        &self,
        id: &PartitionId,
        chunk: &mut Vec<u8>,
        pacer: &mut Pacer,
    ) -> Result<(), BrokerError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let n = chunk.len() as u64;
        self.storage
            .compact_write(id, std::mem::take(chunk))
            .await?;
        self.cleaner_stats
            .bytes_written
            .fetch_add(n, Ordering::Relaxed);
        pacer.spend(n).await;
        Ok(())
    }

    fn storage_segment_bytes(&self, id: &PartitionId) -> Result<u64, BrokerError> {
        Ok(self.topic(&id.topic)?.config.segment_bytes)
    }

    /// The compacted partitions whose rings are at least half used: the
    /// cleaner makes room before the ring is full, as a full ring refuses
    /// writes. Updates the lag gauge.
    pub async fn partitions_to_clean(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let mut lag = 0u64;
        let compacted: Vec<String> = self
            .cleanup
            .read()
            .expect("cleanup lock")
            .keys()
            .cloned()
            .collect();
        for topic in compacted {
            let Ok(meta) = self.topic(&topic) else {
                continue;
            };
            for p in 0..meta.partitions {
                let id = PartitionId::new(topic.clone(), p);
                let Ok(segs) = self.storage.segments(&id).await else {
                    continue;
                };
                let closed: Vec<_> = segs.iter().filter(|s| !s.active).collect();
                lag += closed
                    .iter()
                    .skip(1)
                    .map(|s| s.bytes.saturating_sub(crate::storage::BLOCK_BYTES as u64))
                    .sum::<u64>();
                let free = meta.config.segments as usize - segs.len();
                if free * 2 <= meta.config.segments as usize && !closed.is_empty() {
                    out.push((topic.clone(), p));
                }
            }
        }
        self.cleaner_stats.lag_bytes.store(lag, Ordering::Relaxed);
        out
    }

    /// The cleaner's loop: when a ring rolls or a topic is made compacted,
    /// and every `interval` while it has work, compacts the partitions
    /// that need room. Ends when the broker stops.
    pub async fn run_cleaner(self: Arc<Self>, interval: std::time::Duration) {
        let stopping = self.stopping();
        // Partitions where the last run found nothing to do, and their end
        // then: not read again until more is written.
        let mut idle: BTreeMap<(String, u32), u64> = BTreeMap::new();
        // A partition whose compaction keeps failing (a damaged disk) is
        // retried every `interval`: a line a minute says so, not one a try.
        let failures = super::quiet_log::QuietLog::new(|(t, p): &(String, u32)| {
            format!("{t}/{p}: compaction failed")
        });
        loop {
            let rolled = self.storage.roll_listener();
            let made_compacted = self.cleanup_changed.listen();
            let refused = self.full_rings.refused.listen();
            // A pass that compacted, failed or was held back is followed
            // by another in `interval`; otherwise only a roll, a newly
            // compacted topic or a full ring's refusal can make work.
            let mut busy = false;
            for (topic, p) in self.partitions_to_clean().await {
                if stopping.is_triggered() {
                    return;
                }
                let end = self.offsets(&topic, p).map_or(0, |o| o.high_watermark);
                if idle.get(&(topic.clone(), p)) == Some(&end) {
                    continue;
                }
                let r = self.clean_one(&topic, p).await;
                match r {
                    // Held back by batches in flight: they settle within
                    // a flush, and the pass is owed once they have.
                    Ok(r) if r.segments_merged > 0 || r.held_back => {
                        busy = true;
                        idle.remove(&(topic.clone(), p));
                        log::debug!("{topic}/{p}: {r:?}");
                    }
                    Ok(_) => {
                        idle.insert((topic.clone(), p), end);
                    }
                    Err(BrokerError::ShuttingDown) => return,
                    Err(e) => {
                        busy = true;
                        if let Some(tail) = failures.due(&(topic.clone(), p)) {
                            log::warn!("{topic}/{p}: compaction failed: {e}{tail}");
                        }
                    }
                }
            }
            let next = if busy { interval } else { super::IDLE_TIMERS };
            let tick = super::sleep_unless(made_compacted, next);
            let stop = async {
                stopping.wait().await;
            };
            let rolled = async {
                rolled.await;
            };
            let refused = async {
                refused.await;
            };
            let woken = smol::future::or(rolled, refused);
            smol::future::or(tick, smol::future::or(woken, stop)).await;
            if stopping.is_triggered() {
                return;
            }
        }
    }

    /// A compaction by the cleaner, and its verdict on the ring: whether
    /// what fills it is all live ([`FullRings`]).
    pub(super) async fn clean_one(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<CompactionReport, BrokerError> {
        let r = self.compact_partition(topic, partition).await;
        let left_full = match &r {
            Ok(r) if full_of_live_data(r) => self.ring_full_at(topic, partition).await,
            _ => None,
        };
        self.full_rings.judged(topic, partition, left_full);
        r
    }

    /// The partition's high watermark if its ring has no free segment.
    async fn ring_full_at(&self, topic: &str, partition: u32) -> Option<u64> {
        let meta = self.topic(topic).ok()?;
        let id = PartitionId::new(topic, partition);
        let hw = self.storage.offsets(&id).ok()?.high_watermark;
        let segs = self.storage.segments(&id).await.ok()?;
        (segs.len() >= meta.config.segments as usize).then_some(hw)
    }

    pub fn cleaner_stats(&self) -> &CleanerStats {
        &self.cleaner_stats
    }
}

/// A partition's ring as `topics describe` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionDetails {
    pub log_start: u64,
    pub log_end: u64,
    pub bytes: u64,
    pub segments_used: u32,
    pub oldest_segment_max_timestamp: Option<i64>,
    pub oldest_timestamp: Option<i64>,
    pub next_retention: Option<NextRetention>,
}

/// What the next time-retention step frees, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextRetention {
    pub at_ms: i64,
    /// Offsets and bytes of the oldest segment it drops.
    pub offsets: u64,
    pub bytes: u64,
}

impl super::Broker {
    pub async fn partition_details(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<PartitionDetails, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        let meta = self.topic(topic)?;
        let segs = self.storage.segments(&id).await?;
        let o = self.storage.offsets(&id)?;
        let block = crate::storage::BLOCK_BYTES as u64;
        let oldest = segs.first().filter(|s| s.max_timestamp != i64::MIN);
        let oldest_timestamp = if o.earliest < o.high_watermark {
            let bytes = self.storage.read(&id, o.earliest, 1).await?;
            crate::batch::BatchIter::new(&bytes)
                .next()
                .and_then(Result::ok)
                .map(|v| v.header.first_timestamp)
        } else {
            None
        };
        let next_retention = meta.config.retention_ms.and_then(|r| {
            let s = segs.first().filter(|s| !s.active)?;
            Some(NextRetention {
                at_ms: s
                    .max_timestamp
                    .saturating_add(r.min(i64::MAX as u64) as i64),
                offsets: s.next_offset - s.base_offset,
                bytes: s.bytes - block,
            })
        });
        Ok(PartitionDetails {
            log_start: o.earliest,
            log_end: o.high_watermark,
            bytes: segs.iter().map(|s| s.bytes).sum(),
            segments_used: segs.len() as u32,
            oldest_segment_max_timestamp: oldest.map(|s| s.max_timestamp),
            oldest_timestamp,
            next_retention,
        })
    }
}
