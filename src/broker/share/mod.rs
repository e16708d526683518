//! Share groups: queues on top of topics (docs/queues.md). A client of the
//! broker's API, like the group coordinator: records are read with
//! fetches, the state is written by producing to the internal topic
//! [`SHARE_TOPIC`], and dead records by producing to dead-letter topics.
//!
//! # State
//!
//! A share partition (group, topic, partition) has a window of offsets
//! `[start, next)`: below `start` all is done, from `next` on nothing was
//! ever delivered. Every record in the window has a delivery count and a
//! state: available, acquired (locked to a member until a deadline), dying
//! (on its way to the dead-letter topic) or done. The window is at most
//! `max_in_flight_records` offsets wide.
//!
//! # Durability
//!
//! The whole state of a share partition is one record of the share log,
//! keyed by (group, topic, partition); the last one per key wins. Locks
//! are not written: after a restart every acquired or dying record is
//! available again, its delivery count kept. One writer task takes every
//! change queued while the previous write was in flight and writes them
//! as one batch, one fsync; a change is answered only once durable. The
//! log is a compacted topic: its ring never overwrites a key's latest
//! state, and the cleaner drops older ones. A deleted share group or topic
//! leaves a tombstone per share partition, so its state does not come
//! back at the next start (nor for a topic created again by that name).
//! A topic an older broker made as a plain ring is altered to compacted at
//! the first write.
//!
//! # Dead letters: write, then acknowledge
//!
//! A dead record is produced to its dead-letter topic and that write is
//! awaited before the record is marked done; the mark is written before
//! the worker is answered. A crash in between leaves the record in the
//! window, and it is sent again: at least once into the dead-letter topic,
//! never lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use serde::{Deserialize, Serialize};

use super::quiet_log::QuietLog;
use super::{Broker, BrokerError, CleanupPolicy, FetchLimits, FetchPartition, TopicSpec};
use crate::batch::{BatchBuilder, ProducerStamp};
use crate::bufpool::BatchBuf;

/// The internal topic holding share-partition states.
pub const SHARE_TOPIC: &str = "__skiff_share";
const SHARE_SEGMENTS: u32 = 4;
/// Bytes of one share-partition state at most: the key and a few fields,
/// then up to 6 bytes per in-flight record (offset delta, count, done).
const STATE_BYTES_BASE: u64 = 600;
const STATE_BYTES_PER_RECORD: u64 = 8;
/// A batch of the share log is cut at about this size, or at half
/// `storage.max_batch_bytes` if that is smaller.
const SHARE_BATCH_BYTES: usize = 60 * 1024;
/// Group and member ids.
pub const SHARE_ID_BYTES_MAX: usize = 255;
/// Records one share fetch may ask for.
pub const SHARE_FETCH_RECORDS_MAX: u32 = 10_000;
/// A worker's reason, kept for the dead-letter record.
pub const SHARE_ERROR_BYTES_MAX: usize = 1024;
/// How often locks are checked for expiry.
const TICK: Duration = Duration::from_millis(50);
/// A waiting share fetch looks again at least this often. It is woken
/// sooner by appends to its partitions, by a window that moved (accept,
/// reject, dead letter, expiry), by records available again (release,
/// expiry) and by the end of another fetch's read; this catches what
/// nothing announces (a release's delay running out).
const POLL: Duration = Duration::from_millis(20);
/// A partition whose dead-letter write failed is tried again after this:
/// the expiry pass runs every [`TICK`] while a record is locked, and is
/// woken for it when none is.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);
/// Bytes read from a partition per step.
const READ_BYTES: usize = 256 * 1024;
/// The format version of a share-log record, its key's first byte.
const SHARE_RECORD_VERSION: u8 = 1;

/// The dead-letter headers.
pub const DLQ_TOPIC_HEADER: &str = "skiff.dlq.topic";
pub const DLQ_PARTITION_HEADER: &str = "skiff.dlq.partition";
pub const DLQ_OFFSET_HEADER: &str = "skiff.dlq.offset";
pub const DLQ_DELIVERY_COUNT_HEADER: &str = "skiff.dlq.delivery_count";
pub const DLQ_ERROR_HEADER: &str = "skiff.dlq.error";
/// Every header the dead-letter topic adds starts with this.
pub const DLQ_HEADER_PREFIX: &str = "skiff.dlq.";

/// `[share]` as the coordinator uses it.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub max_deliveries: u32,
    pub lock_ms: u64,
    pub max_in_flight_records: u32,
    pub dead_letter_suffix: String,
    pub max_share_partitions: usize,
    pub max_active_members: usize,
    pub overrides: Vec<crate::config::ShareOverride>,
}

impl Default for ShareConfig {
    /// The embedded default config's `[share]`, as the broker runs with
    /// no config file: `default.toml` is the one place a default lives.
    fn default() -> Self {
        ShareConfig::from_config(&crate::config::Config::default())
    }
}

/// What applies to one group on one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSettings {
    pub max_deliveries: u32,
    pub lock_ms: u64,
    pub dead_letter_topic: String,
}

impl ShareConfig {
    pub fn from_config(cfg: &crate::config::Config) -> ShareConfig {
        let s = &cfg.share;
        ShareConfig {
            max_deliveries: s.max_deliveries,
            lock_ms: s.lock_ms,
            max_in_flight_records: s.max_in_flight_records,
            dead_letter_suffix: s.dead_letter_suffix.clone(),
            max_share_partitions: s.max_share_partitions as usize,
            max_active_members: s.max_active_members as usize,
            overrides: s.overrides.clone(),
        }
    }

    /// The settings for `group` on `topic`: the defaults, then the topic's
    /// override, the group's, and the pair's, each over the one before.
    pub fn settings(&self, group: &str, topic: &str) -> ShareSettings {
        let mut s = ShareSettings {
            max_deliveries: self.max_deliveries,
            lock_ms: self.lock_ms,
            dead_letter_topic: format!("{topic}{}", self.dead_letter_suffix),
        };
        let rank = |o: &crate::config::ShareOverride| -> Option<u8> {
            let t = o.topic.as_deref().map(|t| t == topic);
            let g = o.group.as_deref().map(|g| g == group);
            match (t, g) {
                (Some(true), None) => Some(0),
                (None, Some(true)) => Some(1),
                (Some(true), Some(true)) => Some(2),
                _ => None,
            }
        };
        let mut matching: Vec<_> = self
            .overrides
            .iter()
            .filter_map(|o| rank(o).map(|r| (r, o)))
            .collect();
        matching.sort_by_key(|(r, _)| *r);
        for (_, o) in matching {
            if let Some(m) = o.max_deliveries {
                s.max_deliveries = m;
            }
            if let Some(l) = o.lock_ms {
                s.lock_ms = l;
            }
            if let Some(d) = &o.dead_letter_topic {
                s.dead_letter_topic = d.clone();
            }
        }
        s
    }

    /// The share log's segment size: one segment holds the most share
    /// partitions with full windows, all a compaction's merge keeps.
    fn share_segment_bytes(&self, max_batch_bytes: usize) -> u64 {
        let live = self.max_share_partitions as u64
            * (STATE_BYTES_BASE + STATE_BYTES_PER_RECORD * u64::from(self.max_in_flight_records));
        live.max(1024 * 1024)
            .max(2 * max_batch_bytes as u64)
            .next_multiple_of(4096)
    }

    /// The share log as it is made, storage taking batches of up to
    /// `max_batch_bytes`; its disk is reserved from the start
    /// ([`super::internal_topics_disk`]).
    pub(crate) fn share_topic_spec(&self, max_batch_bytes: usize) -> TopicSpec {
        let segment_bytes = self.share_segment_bytes(max_batch_bytes);
        // Compacted: a ring that never overwrites a latest state.
        TopicSpec::internal(segment_bytes, SHARE_SEGMENTS, true)
    }
}

/// Why a share request failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ShareError {
    /// A bad argument: ids, counts, an internal topic.
    Invalid(String),
    /// An ack for a record the member does not hold (its lock lapsed).
    LockLost {
        topic: String,
        partition: u32,
        offset: u64,
    },
    /// No share group of that name (describe, delete).
    UnknownGroup(String),
    /// A delete of a share group that still has active members.
    NotEmpty { group: String, members: usize },
    /// A fetch or acknowledgement of a new member while
    /// `share.max_active_members` others are active.
    TooManyMembers { max: usize },
    /// A share partition to create while `share.max_share_partitions` are
    /// kept.
    TooManySharePartitions { max: usize },
    /// The broker refused a read or a write.
    Broker(Arc<BrokerError>),
}

impl std::fmt::Display for ShareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m) => f.write_str(m),
            Self::LockLost {
                topic,
                partition,
                offset,
            } => write!(
                f,
                "{topic}/{partition} offset {offset} is not locked to this member (its lock expired)"
            ),
            Self::UnknownGroup(g) => write!(f, "no share group '{g}'"),
            Self::NotEmpty { group, members } => write!(
                f,
                "share group '{group}' has {members} active member(s): stop its workers first (a member is active for lock_ms after its last fetch or acknowledgement)"
            ),
            Self::TooManyMembers { max } => write!(
                f,
                "too many active share members: share.max_active_members is {max} (a member stays active for lock_ms after its last fetch or acknowledgement)"
            ),
            Self::TooManySharePartitions { max } => write!(
                f,
                "too many share partitions: share.max_share_partitions is {max}"
            ),
            Self::Broker(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ShareError {}

impl From<BrokerError> for ShareError {
    fn from(e: BrokerError) -> Self {
        ShareError::Broker(Arc::new(e))
    }
}

/// How a record is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    Accept,
    /// Available again, not before the delay.
    Release {
        delay: Duration,
    },
    Reject,
}

/// One acknowledgement.
#[derive(Debug, Clone)]
pub struct Ack {
    pub partition: u32,
    pub offset: u64,
    pub kind: AckKind,
    pub error: Option<String>,
}

/// One acquired record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub delivery_count: u32,
}

/// A share fetch.
#[derive(Debug, Clone)]
pub struct FetchSpec {
    pub group: String,
    pub topic: String,
    pub member: String,
    pub max_records: u32,
    pub max_wait: Duration,
    /// A new share partition starts at the log start (else its end).
    pub from_earliest: bool,
    /// Bytes the records may take in the answer, each counted by
    /// `record_bytes`: acquisition stops before the record that would
    /// pass it (the server's frame), though the first is always taken.
    pub max_bytes: usize,
    pub record_bytes: fn(&Delivered) -> usize,
}

/// What one share partition gave a share fetch.
struct Taken {
    got: Vec<Delivered>,
    /// The state changed: to be written.
    changed: bool,
    /// What stopped it: `got` holds what was taken before.
    error: Option<ShareError>,
    /// The lock deadline of `got`, to undo them if the state is not written.
    deadline: Instant,
}

/// A record chosen for redelivery that is not delivered after all: as it
/// was before, its count too, unless its lock lapsed meanwhile and another
/// member holds it.
fn undeliver(sp: &mut SharePartition, offset: u64, member: &Arc<str>, deadline: Instant) {
    let ours = RecState::Acquired {
        member: member.clone(),
        deadline,
    };
    if let Some(r) = sp.records.get_mut(&offset) {
        if r.state == ours {
            r.state = RecState::Available { not_before: None };
        }
        if matches!(r.state, RecState::Available { .. }) {
            r.deliveries = r.deliveries.saturating_sub(1);
        }
    }
}

/// Records at the window's end that were never delivered (first taken
/// by a fetch whose state was not written) leave it: `next` is the first
/// offset never delivered again, and describe neither lists them nor says
/// they await redelivery, as the share log (which never held them) says
/// after a restart.
fn never_delivered(sp: &mut SharePartition) {
    while let Some(entry) = sp.records.last_entry() {
        let r = entry.get();
        if r.deliveries > 0 || !matches!(r.state, RecState::Available { .. }) {
            return;
        }
        sp.next = *entry.key();
        entry.remove();
    }
    sp.settle();
}

/// The room left in one share fetch's answer.
struct Room {
    bytes: usize,
    size: fn(&Delivered) -> usize,
    /// A record was taken: the next must fit beside it.
    taken: bool,
    /// A record did not fit: the fetch takes no more, so records go out
    /// in the order they were found.
    full: bool,
}

impl Room {
    fn new(spec: &FetchSpec) -> Room {
        Room {
            bytes: spec.max_bytes,
            size: spec.record_bytes,
            taken: false,
            full: false,
        }
    }

    /// Whether `d` fits, counting it if so; the first record always does
    /// (a frame holds one record of the largest batch).
    fn take(&mut self, d: &Delivered) -> bool {
        let n = (self.size)(d);
        if self.full || (self.taken && n > self.bytes) {
            self.full = true;
            return false;
        }
        self.bytes = self.bytes.saturating_sub(n);
        self.taken = true;
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RecState {
    Available {
        not_before: Option<Instant>,
    },
    Acquired {
        member: Arc<str>,
        deadline: Instant,
    },
    /// Being written to the dead-letter topic.
    Dying,
    Done,
}

#[derive(Debug, Clone)]
struct InFlight {
    state: RecState,
    deliveries: u32,
    /// The last worker's reason, for the dead-letter record.
    error: Option<String>,
    /// Rejected: it goes to the dead-letter topic, never back to a
    /// worker. Written before the dead-letter record, so a crash in
    /// between sends it there again after the restart.
    dead: bool,
}

#[derive(Debug, Default)]
struct SharePartition {
    start: u64,
    next: u64,
    records: BTreeMap<u64, InFlight>,
    /// A fetch is reading new records at `next` (only one at a time).
    reading: bool,
    /// A fetch found `reading` set and may be waiting: wake it when the
    /// read ends.
    read_waiters: bool,
    /// A dead-letter write failed: the expiry pass tries again after this.
    dead_letter_after: Option<Instant>,
}

impl SharePartition {
    /// Moves `start` over the done records at the front of the window.
    fn settle(&mut self) {
        while let Some((&o, r)) = self.records.first_key_value() {
            if r.state != RecState::Done {
                self.start = o;
                return;
            }
            self.records.remove(&o);
        }
        self.start = self.next;
    }

    fn in_flight(&self) -> usize {
        self.records
            .values()
            .filter(|r| r.state != RecState::Done)
            .count()
    }
}

/// (group, topic, partition).
pub type SpKey = (String, String, u32);

#[derive(Serialize, Deserialize)]
struct StateKey {
    group: String,
    topic: String,
    partition: u32,
}

/// The written state: offsets in the window are deltas from `start`.
/// Followed, when a record is rejected and not yet done, by the list of
/// their deltas (`Vec<u64>`): a broker that predates it reads the state
/// without it, as one that lost them to a crash.
#[derive(Serialize, Deserialize)]
struct StateValue {
    start: u64,
    next: u64,
    /// (offset - start, deliveries, done)
    records: Vec<(u64, u32, bool)>,
}

fn encode_key(k: &SpKey) -> Vec<u8> {
    let mut key = vec![SHARE_RECORD_VERSION];
    let sk = StateKey {
        group: k.0.clone(),
        topic: k.1.clone(),
        partition: k.2,
    };
    key.extend(postcard::to_allocvec(&sk).expect("postcard encodes to a Vec"));
    key
}

fn encode_value(sp: &SharePartition) -> Vec<u8> {
    let v = StateValue {
        start: sp.start,
        next: sp.next,
        records: sp
            .records
            .iter()
            .map(|(&o, r)| (o - sp.start, r.deliveries, r.state == RecState::Done))
            .collect(),
    };
    let mut out = postcard::to_allocvec(&v).expect("postcard encodes to a Vec");
    let dead: Vec<u64> = sp
        .records
        .iter()
        .filter(|(_, r)| r.dead && r.state != RecState::Done)
        .map(|(&o, _)| o - sp.start)
        .collect();
    if !dead.is_empty() {
        out.extend(postcard::to_allocvec(&dead).expect("postcard encodes to a Vec"));
    }
    out
}

/// The share partition a share-log record holds; None for another
/// version's record (a newer broker's), which is skipped.
fn decode_record(key: &[u8], value: &[u8]) -> Option<(SpKey, Option<SharePartition>)> {
    let (&version, key) = key.split_first()?;
    if version != SHARE_RECORD_VERSION {
        return None;
    }
    let k: StateKey = postcard::from_bytes(key).ok()?;
    let key = (k.group, k.topic, k.partition);
    if value.is_empty() {
        return Some((key, None));
    }
    let (v, rest): (StateValue, _) = postcard::take_from_bytes(value).ok()?;
    let dead: BTreeSet<u64> = if rest.is_empty() {
        BTreeSet::new()
    } else {
        postcard::from_bytes::<Vec<u64>>(rest)
            .ok()?
            .into_iter()
            .collect()
    };
    let records = v
        .records
        .into_iter()
        .map(|(d, deliveries, done)| {
            let state = if done {
                RecState::Done
            } else {
                RecState::Available { not_before: None }
            };
            (
                v.start + d,
                InFlight {
                    state,
                    deliveries,
                    error: None,
                    dead: !done && dead.contains(&d),
                },
            )
        })
        .collect();
    Some((
        key,
        Some(SharePartition {
            start: v.start,
            next: v.next,
            records,
            read_waiters: false,
            ..SharePartition::default()
        }),
    ))
}

/// Counters for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShareStats {
    /// Deliveries after the first.
    pub redeliveries: u64,
    pub dead_lettered: u64,
    /// Records gone from the log before they were done.
    pub lost: u64,
    pub log_writes: u64,
    /// Partitions a share fetch skipped: it could not take from them.
    pub partitions_skipped: u64,
}

/// Records in flight per group and topic.
#[derive(Debug, Clone)]
pub struct ShareGroupLoad {
    pub group: String,
    pub topic: String,
    /// Records in the windows not yet done.
    pub in_flight: u64,
    /// Of those, locked to a worker.
    pub acquired: u64,
}

struct Pending {
    keys: Vec<SpKey>,
    done: async_channel::Sender<Result<(), ShareError>>,
}

/// A record on its way to the dead-letter topic.
struct Dying {
    key: SpKey,
    offset: u64,
    deliveries: u32,
    error: String,
}

/// The coordinator of every share group.
pub struct ShareCoordinator {
    broker: Arc<Broker>,
    config: ShareConfig,
    parts: Mutex<BTreeMap<SpKey, SharePartition>>,
    /// Notified when records become available (release, expiry).
    changed: Event,
    /// Notified when a fetch locks records: wakes the expiry pass.
    timers: Event,
    queue: async_channel::Sender<Pending>,
    queued: async_channel::Receiver<Pending>,
    redeliveries: AtomicU64,
    dead_lettered: AtomicU64,
    lost: AtomicU64,
    log_writes: AtomicU64,
    partitions_skipped: AtomicU64,
    /// Partitions that keep failing the same way (share fetches skipping
    /// them, dead-letter writes), and the share log's writes and the
    /// compactions they ask for, are logged once a minute.
    skips: QuietLog<SpKey>,
    dead_letter_failures: QuietLog<SpKey>,
    log_failures: QuietLog<()>,
    compaction_failures: QuietLog<()>,
    /// Dead-letter topics written since start, for their depth metric.
    dead_letter_topics: Mutex<BTreeSet<String>>,
    /// (group, member) -> until when the member counts as active: its
    /// last fetch's wait and `lock_ms` past it, or `lock_ms` past its last
    /// acknowledgement. Pruned by the expiry pass.
    members: Mutex<BTreeMap<(String, String), Instant>>,
}

fn check_id(what: &str, id: &str) -> Result<(), ShareError> {
    if id.is_empty() || id.len() > SHARE_ID_BYTES_MAX {
        return Err(ShareError::Invalid(format!(
            "{what} must be 1 to {SHARE_ID_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

/// Clears a share partition's `reading` flag however the read ends.
struct Reading<'a> {
    c: &'a ShareCoordinator,
    key: &'a SpKey,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let waiters = self.c.lock().get_mut(self.key).is_some_and(|sp| {
            sp.reading = false;
            std::mem::take(&mut sp.read_waiters)
        });
        if waiters {
            self.c.changed.notify(usize::MAX);
        }
    }
}

impl ShareCoordinator {
    /// The coordinator of `broker`, its state read back from the share
    /// log. Its two tasks ([`ShareCoordinator::run_log`],
    /// [`ShareCoordinator::run_timers`]) must be spawned by the caller.
    pub fn open(
        broker: Arc<Broker>,
        config: ShareConfig,
    ) -> Result<Arc<ShareCoordinator>, BrokerError> {
        let (queue, queued) = async_channel::unbounded();
        let c = ShareCoordinator {
            broker,
            config,
            parts: Mutex::new(BTreeMap::new()),
            changed: Event::new(),
            timers: Event::new(),
            queue,
            queued,
            redeliveries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            log_writes: AtomicU64::new(0),
            partitions_skipped: AtomicU64::new(0),
            skips: QuietLog::new(|k| {
                format!("share group {}: share fetches skipped {}/{}", k.0, k.1, k.2)
            }),
            dead_letter_failures: QuietLog::new(|k| {
                format!(
                    "share group {}: dead-letter writes failed for {}/{}",
                    k.0, k.1, k.2
                )
            }),
            log_failures: QuietLog::new(|_| format!("share log {SHARE_TOPIC}: writes failed")),
            compaction_failures: QuietLog::new(|_| {
                format!("share log {SHARE_TOPIC}: compactions failed")
            }),
            dead_letter_topics: Mutex::new(BTreeSet::new()),
            members: Mutex::new(BTreeMap::new()),
        };
        smol::block_on(c.load())?;
        Ok(Arc::new(c))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SpKey, SharePartition>> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    pub fn config(&self) -> &ShareConfig {
        &self.config
    }

    /// Reads the share log back; a state whose topic or partition is gone
    /// (deleted before its tombstone was written) is dropped, and its
    /// tombstone queued for the writer.
    async fn load(&self) -> Result<(), BrokerError> {
        let started = Instant::now();
        let mut parts = BTreeMap::new();
        let mut records = 0u64;
        super::replay_log(&self.broker, SHARE_TOPIC, |_, _, key, value| {
            records += 1;
            match decode_record(key, value) {
                Some((key, Some(sp))) => {
                    parts.insert(key, sp);
                }
                Some((key, None)) => {
                    parts.remove(&key);
                }
                None => {}
            }
        })
        .await?;
        let gone: Vec<SpKey> = parts
            .keys()
            .filter(|k| {
                self.broker
                    .topic(&k.1)
                    .map_or(true, |t| k.2 >= t.partitions)
            })
            .cloned()
            .collect();
        for k in &gone {
            parts.remove(k);
        }
        log::info!(
            "share groups loaded: {} share partition(s) from {records} record(s) in {:?}",
            parts.len(),
            started.elapsed()
        );
        *self.lock() = parts;
        if !gone.is_empty() {
            log::info!(
                "share groups: {} share partition(s) of deleted topics dropped",
                gone.len()
            );
            // Written by the writer once it runs; no one waits for it.
            let (done, _) = async_channel::bounded(1);
            let _ = self.queue.try_send(Pending { keys: gone, done });
        }
        Ok(())
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
    ) -> Result<super::Fetched, BrokerError> {
        let part = FetchPartition {
            topic,
            partition,
            offset,
            max_bytes,
        };
        let limits = FetchLimits {
            min_bytes: 1,
            max_wait: Duration::ZERO,
            max_bytes,
        };
        self.broker.fetch(&[part], limits).await.remove(0)
    }

    pub fn stats(&self) -> ShareStats {
        ShareStats {
            redeliveries: self.redeliveries.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            log_writes: self.log_writes.load(Ordering::Relaxed),
            partitions_skipped: self.partitions_skipped.load(Ordering::Relaxed),
        }
    }

    /// Records in flight, per group and topic.
    pub fn load_by_group(&self) -> Vec<ShareGroupLoad> {
        let parts = self.lock();
        let mut out: BTreeMap<(String, String), ShareGroupLoad> = BTreeMap::new();
        for ((g, t, _), sp) in parts.iter() {
            let e = out
                .entry((g.clone(), t.clone()))
                .or_insert_with(|| ShareGroupLoad {
                    group: g.clone(),
                    topic: t.clone(),
                    in_flight: 0,
                    acquired: 0,
                });
            e.in_flight += sp.in_flight() as u64;
            e.acquired += sp
                .records
                .values()
                .filter(|r| matches!(r.state, RecState::Acquired { .. }))
                .count() as u64;
        }
        out.into_values().collect()
    }

    /// Every dead-letter topic in use: of the share groups' topics, and
    /// those written to since start.
    pub fn dead_letter_topics(&self) -> BTreeSet<String> {
        let mut out = self
            .dead_letter_topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (g, t, _) in self.lock().keys() {
            out.insert(self.config.settings(g, t).dead_letter_topic);
        }
        out
    }

    // ------------------------------------------------------------ acquire

    /// Acquires up to `max_records` records for the member; waits up to
    /// `max_wait` for one. The answer is sent once the acquisition (the
    /// delivery counts) is durable.
    pub async fn fetch(&self, spec: FetchSpec) -> Result<(Vec<Delivered>, u64), ShareError> {
        check_id("the share group id", &spec.group)?;
        check_id("the member id", &spec.member)?;
        if super::group::is_internal_topic(&spec.topic) {
            return Err(ShareError::Invalid(format!(
                "'{}' is one of the broker's own topics",
                spec.topic
            )));
        }
        if spec.max_records == 0 || spec.max_records > SHARE_FETCH_RECORDS_MAX {
            return Err(ShareError::Invalid(format!(
                "max_records must be 1 to {SHARE_FETCH_RECORDS_MAX}"
            )));
        }
        let settings = self.config.settings(&spec.group, &spec.topic);
        if super::validate_topic_name(&settings.dead_letter_topic).is_err() {
            return Err(ShareError::Invalid(format!(
                "the dead-letter topic of '{}' would be '{}', not a valid topic name: set one with [[share.overrides]] dead_letter_topic",
                spec.topic, settings.dead_letter_topic
            )));
        }
        let partitions = self.broker.topic(&spec.topic)?.partitions;
        self.seen(
            &spec.group,
            &spec.member,
            spec.max_wait + Duration::from_millis(settings.lock_ms),
        )?;
        let member: Arc<str> = spec.member.as_str().into();
        let deadline = Instant::now() + spec.max_wait;
        let stopping = self.broker.stopping();
        // Partitions are tried from a different one each time, so one
        // busy partition does not starve the others.
        let first = fastrand::u32(..partitions.max(1));
        // One partition that cannot be read (damaged, quarantined) must
        // not hide, or stall for good, the others' records: its error is
        // the answer only if they have none by the deadline. It is not
        // tried again while this fetch waits.
        let mut failed = None;
        let mut failing = BTreeSet::new();
        loop {
            // Listen before looking, so a change in between still wakes us.
            let listener = self.changed.listen();
            let appended: Vec<_> = (0..partitions)
                .filter_map(|p| self.broker.partition_id(&spec.topic, p).ok())
                .filter_map(|id| self.broker.storage.data_event(&id).ok())
                .map(|event| event.listen())
                .collect();
            let mut out = Vec::new();
            let mut dirty = Vec::new();
            // What each share partition gave, to undo if the write fails.
            let mut took = Vec::new();
            let mut room = Room::new(&spec);
            for i in 0..partitions {
                let p = (first + i) % partitions;
                let want = spec.max_records as usize - out.len();
                if want == 0 || room.full {
                    break;
                }
                if failing.contains(&p) {
                    continue;
                }
                let key = (spec.group.clone(), spec.topic.clone(), p);
                let taken = self
                    .acquire_partition(
                        &key,
                        &member,
                        want,
                        &mut room,
                        &settings,
                        spec.from_earliest,
                    )
                    .await;
                if !taken.got.is_empty() {
                    // Locked now: their deadlines need the expiry pass.
                    self.timers.notify(usize::MAX);
                }
                if !taken.got.is_empty() {
                    let offsets: Vec<u64> = taken.got.iter().map(|d| d.offset).collect();
                    took.push((key.clone(), taken.deadline, offsets));
                }
                out.extend(taken.got);
                if let Some(e) = taken.error {
                    self.skipped(&key, &e);
                    failing.insert(p);
                    failed.get_or_insert(e);
                }
                if taken.changed {
                    dirty.push(key);
                }
            }
            if !dirty.is_empty() {
                if let Err(e) = self.write(dirty).await {
                    // Not durable, so not delivered: the records are
                    // available again at once, their counts as before.
                    self.unacquire(&took, &member);
                    return Err(e);
                }
            }
            if !out.is_empty() {
                let again = out.iter().filter(|d| d.delivery_count > 1).count();
                self.redeliveries.fetch_add(again as u64, Ordering::Relaxed);
                return Ok((out, settings.lock_ms));
            }
            let all_failed = failing.len() == partitions as usize;
            if all_failed || Instant::now() >= deadline || stopping.is_triggered() {
                return match failed {
                    Some(e) => Err(e),
                    None => Ok((out, settings.lock_ms)),
                };
            }
            let wait = deadline.saturating_duration_since(Instant::now()).min(POLL);
            futures_lite::future::or(
                async {
                    listener.await;
                },
                futures_lite::future::or(any_of(appended), async {
                    smol::Timer::after(wait).await;
                }),
            )
            .await;
        }
    }

    /// Counts a share fetch's skip of `key`, and logs it unless it was
    /// logged within [`super::quiet_log::QUIET_LOG_WINDOW`]: a partition that keeps failing
    /// (damaged, quarantined) would log a line per fetch.
    fn skipped(&self, key: &SpKey, e: &ShareError) {
        self.partitions_skipped.fetch_add(1, Ordering::Relaxed);
        if let Some(more) = self.skips.due(key) {
            log::warn!(
                "share group {}: a share fetch skips {}/{}: {e}{more}",
                key.0,
                key.1,
                key.2
            );
        }
    }

    /// Undoes the acquisitions of a fetch whose state was not written:
    /// (share partition, lock deadline, offsets) as [`Taken`] gave them.
    fn unacquire(&self, took: &[(SpKey, Instant, Vec<u64>)], member: &Arc<str>) {
        {
            let mut parts = self.lock();
            for (key, deadline, offsets) in took {
                if let Some(sp) = parts.get_mut(key) {
                    for &o in offsets {
                        undeliver(sp, o, member, *deadline);
                    }
                    never_delivered(sp);
                }
            }
        }
        self.changed.notify(usize::MAX);
    }

    /// Acquires up to `want` records of one share partition that fit
    /// `room`: available ones first, then new ones from the log. Returns
    /// them, whether the state changed (to be written), and the error
    /// that stopped it, if one did (the records taken before it are
    /// delivered; none is left locked or counted for nothing).
    async fn acquire_partition(
        &self,
        key: &SpKey,
        member: &Arc<str>,
        want: usize,
        room: &mut Room,
        settings: &ShareSettings,
        from_earliest: bool,
    ) -> Taken {
        let (topic, partition) = (key.1.as_str(), key.2);
        let now = Instant::now();
        let lock_deadline = now + Duration::from_millis(settings.lock_ms);
        let bound = u64::from(self.config.max_in_flight_records);
        let mut changed = false;
        let failed = |got, changed, e: ShareError| Taken {
            got,
            changed,
            error: Some(e),
            deadline: lock_deadline,
        };
        let ok = |got, changed| Taken {
            got,
            changed,
            error: None,
            deadline: lock_deadline,
        };
        let (again, read_at, read_max) = {
            let mut parts = self.lock();
            // Under the lock: a topic deleted meanwhile (its state dropped
            // by `forget_topic`, which takes the lock after the delete) is
            // seen gone here, and no state starts at an old topic's offsets.
            let log = match self.broker.offsets(topic, partition) {
                Ok(log) => log,
                Err(e) => return failed(Vec::new(), false, e.into()),
            };
            if !parts.contains_key(key) {
                if parts.len() >= self.config.max_share_partitions {
                    let e = ShareError::TooManySharePartitions {
                        max: self.config.max_share_partitions,
                    };
                    return failed(Vec::new(), false, e);
                }
                let at = if from_earliest {
                    log.earliest
                } else {
                    log.high_watermark
                };
                log::info!(
                    "share group {}: {topic}/{partition} starts at offset {at}",
                    key.0
                );
                parts.insert(
                    key.clone(),
                    SharePartition {
                        start: at,
                        next: at,
                        ..SharePartition::default()
                    },
                );
                changed = true;
            }
            let sp = parts.get_mut(key).expect("inserted above");
            changed |= self.drop_lost(key, sp, log.earliest);
            let mut again = Vec::new();
            for (&o, r) in sp.records.iter_mut() {
                if again.len() >= want {
                    break;
                }
                if let RecState::Available { not_before } = r.state {
                    if not_before.is_none_or(|t| t <= now)
                        && r.deliveries < settings.max_deliveries
                        && !r.dead
                    {
                        r.state = RecState::Acquired {
                            member: member.clone(),
                            deadline: lock_deadline,
                        };
                        r.deliveries += 1;
                        again.push((o, r.deliveries));
                    }
                }
            }
            changed |= !again.is_empty();
            let room = (sp.start + bound).saturating_sub(sp.next);
            let new = (want - again.len()).min(room as usize);
            let read = (new > 0 && !sp.reading && sp.next < log.high_watermark).then(|| {
                sp.reading = true;
                sp.next
            });
            if new > 0 && sp.reading && read.is_none() {
                sp.read_waiters = true;
            }
            (again, read, new)
        };
        // Clears `reading` however this ends (an error below included).
        let _reading = read_at.map(|_| Reading { c: self, key });
        let mut out = Vec::new();
        if !again.is_empty() {
            let wanted: BTreeMap<u64, u32> = again.iter().copied().collect();
            let found = self.read_records(topic, partition, &wanted).await;
            let mut parts = self.lock();
            let mut sp = parts.get_mut(key);
            match found {
                Ok(found) => {
                    if let Some(sp) = sp.as_deref_mut() {
                        let mut gone = 0u64;
                        for (o, _) in &again {
                            if !found.iter().any(|d| d.offset == *o) {
                                // Gone from the log (retention,
                                // compaction): nothing to deliver.
                                if let Some(r) = sp.records.get_mut(o) {
                                    r.state = RecState::Done;
                                    gone += 1;
                                }
                            }
                        }
                        if gone > 0 {
                            self.lost.fetch_add(gone, Ordering::Relaxed);
                            sp.settle();
                        }
                    }
                    for d in found {
                        if room.take(&d) {
                            out.push(d);
                        } else if let Some(sp) = sp.as_deref_mut() {
                            // Chosen before its size was known.
                            undeliver(sp, d.offset, member, lock_deadline);
                        }
                    }
                }
                Err(e) => {
                    if let Some(sp) = sp {
                        for (o, _) in &again {
                            undeliver(sp, *o, member, lock_deadline);
                        }
                    }
                    // Written (the raised counts may have been, by a
                    // write for another fetch while this one read).
                    return failed(out, true, e.into());
                }
            }
        }
        if room.full {
            return ok(out, changed);
        }
        if let Some(at) = read_at {
            let fetched = self.read(topic, partition, at, READ_BYTES).await;
            let fetched = match fetched {
                Ok(f) => f,
                Err(BrokerError::OffsetOutOfRange { .. }) => return ok(out, changed),
                Err(e) => return failed(out, changed, e.into()),
            };
            let (placed, end) = match share_records(&fetched.records) {
                Ok(r) => r,
                Err(e) => return failed(out, changed, e.into()),
            };
            // Past a gap with nothing after it yet (damage lost at the log's
            // end), as a consumer's fetch moves on.
            let end = end.max(fetched.next_offset.unwrap_or(0));
            let mut parts = self.lock();
            if let Some(sp) = parts.get_mut(key).filter(|sp| sp.next == at) {
                let mut taken = 0usize;
                let mut next = at;
                let mut all = true;
                for (offset, ts, r) in placed {
                    if offset < at {
                        continue;
                    }
                    if taken >= read_max {
                        all = false;
                        break;
                    }
                    let d = owned(partition, offset, ts, &r, 1);
                    if !room.take(&d) {
                        all = false;
                        break;
                    }
                    sp.records.insert(
                        offset,
                        InFlight {
                            state: RecState::Acquired {
                                member: member.clone(),
                                deadline: lock_deadline,
                            },
                            deliveries: 1,
                            error: None,
                            dead: false,
                        },
                    );
                    out.push(d);
                    taken += 1;
                    next = offset + 1;
                }
                // All of what was read is taken: skip to its end (offsets
                // without a record: compaction, markers).
                if all && end > next {
                    next = end;
                }
                if next != sp.next {
                    sp.next = next;
                    changed = true;
                }
            }
        }
        ok(out, changed)
    }

    /// Records below the log start are gone (retention took them before
    /// they were done): drop them from the window and count them.
    fn drop_lost(&self, key: &SpKey, sp: &mut SharePartition, earliest: u64) -> bool {
        if sp.start >= earliest {
            return false;
        }
        let keep = sp.records.split_off(&earliest);
        let lost = sp
            .records
            .values()
            .filter(|r| r.state != RecState::Done)
            .count() as u64
            + earliest.saturating_sub(sp.next.max(sp.start));
        sp.records = keep;
        sp.next = sp.next.max(earliest);
        sp.settle();
        sp.start = sp.start.max(earliest);
        if lost > 0 {
            log::warn!(
                "share group {}: {lost} record(s) of {}/{} left the log before they were done",
                key.0,
                key.1,
                key.2
            );
            self.lost.fetch_add(lost, Ordering::Relaxed);
        }
        true
    }

    /// Reads the records at the offsets asked for (offset -> delivery
    /// count). An offset is left out only when the log says it is gone:
    /// below its start (retention), or inside what a read returned
    /// (compaction, damage recovery skipped). An offset the log does not
    /// reach is an error, never a loss: a partition quarantined at start-up
    /// ends before its damage, and an operator's repair brings the records
    /// back.
    async fn read_records(
        &self,
        topic: &str,
        partition: u32,
        wanted: &BTreeMap<u64, u32>,
    ) -> Result<Vec<Delivered>, BrokerError> {
        let mut out = Vec::new();
        let mut from = 0u64;
        while let Some((&o, _)) = wanted.range(from..).next() {
            let fetched = match self.read(topic, partition, o, READ_BYTES).await {
                Ok(f) => f,
                Err(BrokerError::OffsetOutOfRange { earliest, .. }) if o < earliest => {
                    from = earliest;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (placed, end) = share_records(&fetched.records)?;
            // Past a gap with nothing after it (damage skipped, compaction).
            let end = end.max(fetched.next_offset.unwrap_or(0));
            if end <= o {
                return Err(self.unreachable(topic, partition, o, fetched.offsets));
            }
            for (offset, ts, r) in placed {
                if let Some(&count) = wanted.get(&offset) {
                    if offset >= o {
                        out.push(owned(partition, offset, ts, &r, count));
                    }
                }
            }
            from = end;
        }
        Ok(out)
    }

    /// Why `offset`, in a share window, is past the end of its log: the
    /// partition's quarantine at start-up if it has one.
    fn unreachable(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        log: crate::storage::Offsets,
    ) -> BrokerError {
        let quarantine = self
            .broker
            .storage
            .recovery_report()
            .into_iter()
            .find(|r| *r.id.topic == *topic && r.id.partition == partition)
            .and_then(|r| r.quarantine);
        match quarantine {
            Some(reason) => BrokerError::Quarantined {
                topic: topic.to_owned(),
                partition,
                reason,
            },
            None => BrokerError::OffsetOutOfRange {
                requested: offset,
                earliest: log.earliest,
                high_watermark: log.high_watermark,
            },
        }
    }

    // ------------------------------------------------------------ acknowledge

    /// Applies a member's acknowledgements: one result per ack, in order.
    /// Answered once every change (and every dead letter) is durable.
    pub async fn acknowledge(
        &self,
        group: &str,
        topic: &str,
        member: &str,
        acks: Vec<Ack>,
    ) -> Result<Vec<Result<(), ShareError>>, ShareError> {
        check_id("the share group id", group)?;
        check_id("the member id", member)?;
        let settings = self.config.settings(group, topic);
        self.seen(group, member, Duration::from_millis(settings.lock_ms))?;
        let now = Instant::now();
        let mut results: Vec<Result<(), ShareError>> = Vec::with_capacity(acks.len());
        let mut dirty = BTreeSet::new();
        let mut dying = Vec::new();
        // Indices of the acks whose record is on its way to the
        // dead-letter topic.
        let mut dying_acks = Vec::new();
        let mut released = false;
        let mut rejected = false;
        // The records rejected as they were: put back if the reject is
        // not written before their dead-letter write.
        let mut undo_rejects: Vec<(SpKey, u64, InFlight)> = Vec::new();
        // The records accepted or released as they were: put back if the
        // state is not written, so the worker's retry finds its lock.
        let mut undo: Vec<(SpKey, u64, InFlight)> = Vec::new();
        {
            let mut parts = self.lock();
            for a in &acks {
                let key = (group.to_owned(), topic.to_owned(), a.partition);
                let lost = || ShareError::LockLost {
                    topic: topic.to_owned(),
                    partition: a.partition,
                    offset: a.offset,
                };
                let Some(sp) = parts.get_mut(&key) else {
                    results.push(Err(lost()));
                    continue;
                };
                let Some(r) = sp.records.get_mut(&a.offset) else {
                    results.push(Err(lost()));
                    continue;
                };
                match &r.state {
                    RecState::Acquired { member: m, .. } if &**m == member => {}
                    _ => {
                        results.push(Err(lost()));
                        continue;
                    }
                }
                // A reject's reason goes out with this call; a release's
                // waits in the window, so it is cut to what the memory
                // budget counts.
                let keep = match a.kind {
                    AckKind::Release { .. } => crate::config::SHARE_KEPT_REASON_BYTES,
                    _ => SHARE_ERROR_BYTES_MAX,
                };
                let reason = a.error.as_deref().map(|e| truncate(e, keep));
                match a.kind {
                    AckKind::Accept => {
                        undo.push((key.clone(), a.offset, r.clone()));
                        r.state = RecState::Done;
                    }
                    AckKind::Release { delay } if r.deliveries < settings.max_deliveries => {
                        undo.push((key.clone(), a.offset, r.clone()));
                        r.state = RecState::Available {
                            not_before: (!delay.is_zero()).then(|| now + delay),
                        };
                        r.error = reason;
                        released = true;
                    }
                    AckKind::Release { .. } => {
                        r.state = RecState::Dying;
                        dying_acks.push(results.len());
                        dying.push(Dying {
                            key: key.clone(),
                            offset: a.offset,
                            deliveries: r.deliveries,
                            error: format!(
                                "max_deliveries ({}) reached: {}",
                                settings.max_deliveries,
                                reason.as_deref().unwrap_or("released")
                            ),
                        });
                    }
                    AckKind::Reject => {
                        undo_rejects.push((key.clone(), a.offset, r.clone()));
                        // Below max_deliveries, the reject itself must be
                        // durable before the dead-letter write.
                        rejected |= r.deliveries < settings.max_deliveries;
                        r.state = RecState::Dying;
                        r.dead = true;
                        dying_acks.push(results.len());
                        dying.push(Dying {
                            key: key.clone(),
                            offset: a.offset,
                            deliveries: r.deliveries,
                            error: reason.unwrap_or_else(|| "rejected".into()),
                        });
                    }
                }
                dirty.insert(key);
                results.push(Ok(()));
            }
        }
        if released {
            self.changed.notify(usize::MAX);
        }
        if rejected {
            if let Err(e) = self.write(dirty.iter().cloned().collect()).await {
                undo.extend(undo_rejects);
                self.unack(undo);
                return Err(e);
            }
        }
        if !dying.is_empty() {
            let keys: Vec<SpKey> = dying.iter().map(|d| d.key.clone()).collect();
            let failed = self.dead_letter(dying).await;
            // The dead records of a partition that failed are available
            // again.
            for (i, key) in dying_acks.into_iter().zip(keys) {
                if let Some(e) = failed.get(&key) {
                    results[i] = Err(e.clone());
                }
            }
        }
        // The window moves once the state is written: until then the
        // accepted records are kept, to be put back.
        if let Err(e) = self.write(dirty.iter().cloned().collect()).await {
            self.unack(undo);
            return Err(e);
        }
        if self.settle(&dirty) {
            self.changed.notify(usize::MAX);
        }
        Ok(results)
    }

    /// Puts back records whose acknowledgement was not written, unless
    /// they changed since (a released record taken by another fetch).
    fn unack(&self, undo: Vec<(SpKey, u64, InFlight)>) {
        let mut parts = self.lock();
        for (key, offset, before) in undo {
            if let Some(r) = parts
                .get_mut(&key)
                .and_then(|sp| sp.records.get_mut(&offset))
            {
                if matches!(
                    r.state,
                    RecState::Done | RecState::Available { .. } | RecState::Dying
                ) {
                    *r = before;
                }
            }
        }
    }

    /// Moves the windows of `keys` over their done records; true when one
    /// moved, so a fetch waiting on a full window may take more.
    fn settle(&self, keys: &BTreeSet<SpKey>) -> bool {
        let mut parts = self.lock();
        let mut moved = false;
        for key in keys {
            if let Some(sp) = parts.get_mut(key) {
                let before = sp.start;
                sp.settle();
                moved |= sp.start != before;
            }
        }
        moved
    }

    /// Writes dead records to their dead-letter topics and marks them
    /// done once written. A share partition whose records failed (its log
    /// unreadable, its dead-letter topic not written) has them available
    /// again, its failure logged (once a minute at most) and returned; the
    /// others' go on.
    async fn dead_letter(&self, dying: Vec<Dying>) -> BTreeMap<SpKey, ShareError> {
        let failed = self.write_dead_letters(&dying).await;
        for (key, e) in &failed {
            self.dead_letter_failed(key, e);
        }
        {
            let mut parts = self.lock();
            let retry = Instant::now() + DEAD_LETTER_RETRY;
            for d in &dying {
                let Some(sp) = parts.get_mut(&d.key) else {
                    continue;
                };
                let failed = failed.contains_key(&d.key);
                sp.dead_letter_after = failed.then_some(retry);
                if let Some(r) = sp.records.get_mut(&d.offset) {
                    if r.state == RecState::Dying {
                        r.state = if failed {
                            // Back to the workers, as before the reject.
                            r.dead = false;
                            RecState::Available { not_before: None }
                        } else {
                            RecState::Done
                        };
                    }
                }
            }
        }
        if !failed.is_empty() {
            self.changed.notify(usize::MAX);
        }
        failed
    }

    /// Logs a failed dead-letter write of `key`'s records, unless one was
    /// logged within [`super::quiet_log::QUIET_LOG_WINDOW`]: it is tried again every
    /// [`DEAD_LETTER_RETRY`] while it fails.
    fn dead_letter_failed(&self, key: &SpKey, e: &ShareError) {
        if let Some(more) = self.dead_letter_failures.due(key) {
            let dlq = self.config.settings(&key.0, &key.1).dead_letter_topic;
            log::warn!(
                "share group {}: a dead-letter write for {}/{} to {dlq} failed, retried every {} s: {e}{more}",
                key.0,
                key.1,
                key.2,
                DEAD_LETTER_RETRY.as_secs()
            );
        }
    }

    /// The share partitions whose dead records were not written, and why.
    async fn write_dead_letters(&self, dying: &[Dying]) -> BTreeMap<SpKey, ShareError> {
        // By source partition, then by dead-letter topic.
        let mut by_source: BTreeMap<(&str, &str, u32), Vec<&Dying>> = BTreeMap::new();
        for d in dying {
            by_source
                .entry((&d.key.0, &d.key.1, d.key.2))
                .or_default()
                .push(d);
        }
        let mut failed: BTreeMap<SpKey, ShareError> = BTreeMap::new();
        // By dead-letter topic: its batch, and the share partitions in it
        // with their count of records.
        let mut batches: BTreeMap<String, (BatchBuilder, Vec<(SpKey, u64)>)> = BTreeMap::new();
        for ((group, topic, partition), ds) in by_source {
            let key: SpKey = (group.to_owned(), topic.to_owned(), partition);
            let wanted: BTreeMap<u64, u32> = ds.iter().map(|d| (d.offset, d.deliveries)).collect();
            let found = match self.read_records(topic, partition, &wanted).await {
                Ok(found) => found,
                Err(e) => {
                    failed.insert(key, e.into());
                    continue;
                }
            };
            let dlq = self.config.settings(group, topic).dead_letter_topic;
            let (b, sources) = batches.entry(dlq).or_default();
            let mut count = 0u64;
            for d in ds {
                let Some(rec) = found.iter().find(|r| r.offset == d.offset) else {
                    log::warn!(
                        "share group {group}: {topic}/{partition} offset {} left the log before it reached the dead-letter topic",
                        d.offset
                    );
                    self.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (p, o, n) = (
                    partition.to_string(),
                    d.offset.to_string(),
                    d.deliveries.to_string(),
                );
                let mut headers: Vec<(&str, &[u8])> = rec
                    .headers
                    .iter()
                    .filter(|(k, _)| !k.starts_with(DLQ_HEADER_PREFIX))
                    .map(|(k, v)| (k.as_str(), v.as_slice()))
                    .collect();
                headers.extend([
                    (DLQ_TOPIC_HEADER, topic.as_bytes()),
                    (DLQ_PARTITION_HEADER, p.as_bytes()),
                    (DLQ_OFFSET_HEADER, o.as_bytes()),
                    (DLQ_DELIVERY_COUNT_HEADER, n.as_bytes()),
                    (DLQ_ERROR_HEADER, d.error.as_bytes()),
                ]);
                b.push_record(
                    rec.timestamp_ms,
                    rec.key.as_deref(),
                    rec.value.as_deref(),
                    &headers,
                );
                count += 1;
                log::info!(
                    "share group {group}: {topic}/{partition} offset {} to the dead-letter topic after {} deliveries: {}",
                    d.offset,
                    d.deliveries,
                    d.error
                );
            }
            sources.push((key, count));
        }
        for (dlq, (b, sources)) in batches {
            if b.is_empty() {
                continue;
            }
            match self.produce_dead_letters(&dlq, b).await {
                Ok(()) => {
                    let count = sources.iter().map(|(_, n)| n).sum();
                    self.dead_lettered.fetch_add(count, Ordering::Relaxed);
                    self.dead_letter_topics
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(dlq);
                }
                Err(e) => failed.extend(sources.into_iter().map(|(key, _)| (key, e.clone()))),
            }
        }
        failed
    }

    async fn produce_dead_letters(&self, dlq: &str, mut b: BatchBuilder) -> Result<(), ShareError> {
        self.ensure_topic(dlq).await?;
        let batch = b.finish(ProducerStamp::NONE);
        let ack = self.broker.produce(dlq, 0, BatchBuf::from(batch)).await?;
        ack.await?;
        Ok(())
    }

    /// Creates a dead-letter topic with the broker's defaults, one
    /// partition, if it does not exist. A failure is the caller's to log.
    async fn ensure_topic(&self, name: &str) -> Result<(), ShareError> {
        if self.broker.topic(name).is_ok() {
            return Ok(());
        }
        let spec = TopicSpec {
            partitions: Some(1),
            ..TopicSpec::default()
        };
        match self.broker.create_topic(name, &spec).await {
            Ok(_) | Err(BrokerError::TopicExists(_)) => {
                log::info!("dead-letter topic {name} created");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    // ------------------------------------------------------------ timers

    /// Expires locks (the record is available again, or dead after
    /// `max_deliveries`) and sends records recovered at their last
    /// delivery to the dead-letter topic.
    ///
    /// Every [`TICK`] while a record is locked; with none, asleep until a
    /// fetch locks one (`timers`), so an idle broker is not woken.
    pub async fn run_timers(self: Arc<Self>) {
        loop {
            // Listening before the pass: a lock taken during it wakes the next.
            let wake = self.timers.listen();
            if self.expire().await {
                drop(wake);
                smol::Timer::after(TICK).await;
            } else {
                crate::broker::sleep_unless(wake, self.idle_wait(Instant::now())).await;
            }
        }
    }

    /// How long the timers sleep with no record locked: until a failed
    /// dead-letter write is due again ([`DEAD_LETTER_RETRY`]; nothing
    /// locked, it waited the idle timers' 10 s), else the idle timers'.
    fn idle_wait(&self, now: Instant) -> Duration {
        self.lock()
            .values()
            .filter_map(|sp| sp.dead_letter_after)
            .filter(|&t| t > now)
            .map(|t| t - now)
            .fold(crate::broker::IDLE_TIMERS, Duration::min)
    }

    /// One expiry pass. Returns whether a record is still locked.
    pub async fn expire(&self) -> bool {
        let now = Instant::now();
        self.members_lock().retain(|_, until| *until > now);
        let mut dying = Vec::new();
        let mut freed = false;
        let mut locked = false;
        {
            let mut parts = self.lock();
            for (key, sp) in parts.iter_mut() {
                let max = self.config.settings(&key.0, &key.1).max_deliveries;
                let dead_letter = sp.dead_letter_after.is_none_or(|t| t <= now);
                for (&o, r) in sp.records.iter_mut() {
                    let expired = match &r.state {
                        RecState::Acquired { deadline, .. } => {
                            locked |= *deadline > now;
                            *deadline <= now
                        }
                        RecState::Available { .. } => false,
                        RecState::Dying | RecState::Done => continue,
                    };
                    if dead_letter
                        && (r.deliveries >= max || r.dead)
                        && (expired || matches!(r.state, RecState::Available { .. }))
                    {
                        r.state = RecState::Dying;
                        // A reject cut short by a restart (its reason was
                        // not kept).
                        let error = if r.dead {
                            "rejected".to_owned()
                        } else {
                            format!(
                                "max_deliveries ({max}) reached: {}",
                                r.error.as_deref().unwrap_or("lock expired")
                            )
                        };
                        dying.push(Dying {
                            key: key.clone(),
                            offset: o,
                            deliveries: r.deliveries,
                            error,
                        });
                    } else if expired {
                        r.state = RecState::Available { not_before: None };
                        r.error = Some("lock expired".into());
                        freed = true;
                    }
                }
            }
        }
        if freed {
            self.changed.notify(usize::MAX);
        }
        if dying.is_empty() {
            return locked;
        }
        let mut keys: BTreeSet<SpKey> = dying.iter().map(|d| d.key.clone()).collect();
        let failed = self.dead_letter(dying).await;
        keys.retain(|k| !failed.contains_key(k));
        if keys.is_empty() {
            return locked;
        }
        if self.settle(&keys) {
            self.changed.notify(usize::MAX);
        }
        // A failure is logged by the writer, which sees them all.
        let _ = self.write(keys.into_iter().collect()).await;
        locked
    }

    // ------------------------------------------------------------ the log

    /// Queues the current state of `keys` for the share log and waits
    /// until it is durable.
    async fn write(&self, keys: Vec<SpKey>) -> Result<(), ShareError> {
        if keys.is_empty() {
            return Ok(());
        }
        let (done, result) = async_channel::bounded(1);
        self.queue
            .send(Pending { keys, done })
            .await
            .map_err(|_| ShareError::from(BrokerError::ShuttingDown))?;
        result
            .recv()
            .await
            .unwrap_or_else(|_| Err(BrokerError::ShuttingDown.into()))
    }

    /// The share log's writer: takes every write queued while the last one
    /// was in flight and makes them durable together (one batch, one
    /// fsync). Each key's state is taken when the round is written, so it
    /// holds every change made before; a key with no state left (a deleted
    /// group or topic) is written as a tombstone.
    pub async fn run_log(self: Arc<Self>) {
        loop {
            let Ok(first) = self.queued.recv().await else {
                return;
            };
            let mut round = vec![first];
            while let Ok(p) = self.queued.try_recv() {
                round.push(p);
            }
            let keys: BTreeSet<SpKey> = round.iter().flat_map(|p| p.keys.clone()).collect();
            let mut result = self.write_round(&keys).await;
            let ring_full = matches!(&result, Err(ShareError::Broker(e))
                if e.is_full_compacted_ring());
            if ring_full {
                // States changed faster than the cleaner's pace: compact
                // now (a key's latest state is never dropped), then again.
                // A compaction that cannot be done (a full disk has no
                // room for its scratch segment) fails again at each write
                // while the ring stays full: every fetch and acknowledgement.
                match self.broker.compact_partition(SHARE_TOPIC, 0).await {
                    Ok(_) => result = self.write_round(&keys).await,
                    Err(e) => {
                        if let Some(more) = self.compaction_failures.due(&()) {
                            log::warn!("share log {SHARE_TOPIC}: compaction failed: {e}{more}");
                        }
                    }
                }
            }
            match &result {
                Ok(()) => {
                    self.log_writes.fetch_add(1, Ordering::Relaxed);
                }
                // Every fetch or acknowledgement writes: a log that keeps
                // failing would log a line for each.
                Err(e) => {
                    if let Some(more) = self.log_failures.due(&()) {
                        log::warn!("share log {SHARE_TOPIC}: write failed: {e}{more}");
                    }
                }
            }
            for p in round {
                let _ = p.done.try_send(result.clone());
            }
        }
    }

    async fn write_round(&self, keys: &BTreeSet<SpKey>) -> Result<(), ShareError> {
        self.ensure_share_topic().await?;
        let records: Vec<(Vec<u8>, Option<Vec<u8>>)> = {
            let parts = self.lock();
            keys.iter()
                .map(|k| (encode_key(k), parts.get(k).map(encode_value)))
                .collect()
        };
        let ts = crate::batch::now_ms();
        let cut = SHARE_BATCH_BYTES.min(self.broker.max_batch_bytes() / 2);
        let mut batches = Vec::new();
        let mut b = BatchBuilder::new();
        for (k, v) in &records {
            b.push_record(ts, Some(k), v.as_deref(), &[]);
            if b.estimated_bytes() >= cut {
                batches.push(b.finish(ProducerStamp::NONE));
            }
        }
        if !b.is_empty() {
            batches.push(b.finish(ProducerStamp::NONE));
        }
        let mut acks = Vec::with_capacity(batches.len());
        {
            let mut group = self.broker.produce_group();
            for batch in batches {
                acks.push(group.produce(SHARE_TOPIC, 0, BatchBuf::from(batch)).await?);
            }
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    async fn ensure_share_topic(&self) -> Result<(), ShareError> {
        if self.broker.topic(SHARE_TOPIC).is_ok() {
            if !self.broker.cleanup_config(SHARE_TOPIC).policy.compacts() {
                // An older broker's plain ring: its rewrites kept every live
                // state in the newest half, and from now on compaction does.
                log::info!("share log {SHARE_TOPIC}: made a compacted topic");
                let alter = super::TopicAlter {
                    cleanup: Some(CleanupPolicy::Compact),
                    ..super::TopicAlter::default()
                };
                self.broker.alter_topic(SHARE_TOPIC, &alter).await?;
            }
            return Ok(());
        }
        let spec = self.config.share_topic_spec(self.broker.max_batch_bytes());
        match self.broker.create_topic(SHARE_TOPIC, &spec).await {
            // A failure is logged by the writer, with the rest.
            Ok(_) | Err(BrokerError::TopicExists(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Until the first of `listeners` fires; never if there are none.
async fn any_of(listeners: Vec<event_listener::EventListener>) {
    use std::future::Future;
    if listeners.is_empty() {
        return futures_lite::future::pending().await;
    }
    let mut listeners: Vec<_> = listeners.into_iter().map(Box::pin).collect();
    futures_lite::future::poll_fn(|cx| {
        for l in listeners.iter_mut() {
            if l.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await;
}

/// The records a share group delivers from `bytes`, and the offset after
/// its last batch. A transaction marker (a control batch) takes an offset
/// but is the broker's, not a record (docs/transactions.md): it is
/// stepped over, as consumers do, never handed to a worker.
fn share_records(bytes: &[u8]) -> Result<(Vec<super::Placed<'_>>, u64), BrokerError> {
    let mut out = Vec::new();
    let mut next = 0;
    for view in crate::batch::BatchIter::new(bytes) {
        let view = view?;
        if !view.header.is_control() {
            out.extend(super::decode_records(view.bytes)?.0);
        }
        next = view.header.next_offset();
    }
    Ok((out, next))
}

fn owned(
    partition: u32,
    offset: u64,
    ts: i64,
    r: &crate::batch::Record<'_>,
    delivery_count: u32,
) -> Delivered {
    Delivered {
        partition,
        offset,
        timestamp_ms: ts,
        key: r.key.map(|k| k.to_vec()),
        value: r.value.map(|v| v.to_vec()),
        headers: r
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
        delivery_count,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

mod admin;
mod leave;
pub use admin::{
    ShareGroupDescription, ShareGroupListing, ShareMemberDescription, SharePartitionDescription,
    ShareRecordDescription,
};
#[cfg(test)]
pub(crate) mod tests;
