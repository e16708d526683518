//! The log engine: partitions stored as rings of preallocated segment files,
//! written by one storage thread per data directory through an [`IoBackend`]
//! (io_uring, pwrite, or the fault-injecting disk in tests), with group
//! commit, per-topic durability, crash recovery and retention.
//!
//! Nothing here knows about the network. Callers hold a [`Storage`] handle
//! (cheap to clone) and talk to the storage thread through a bounded
//! channel; appends complete through an [`AppendTicket`] future.
//!
//! Map of the module:
//! - `io/`: the I/O seam and its backends, the aligned buffer type.
//! - [`segment`]: the segment header (first block of every segment file).
//! - [`meta`]: small metadata files (postcard + CRC, atomic replace).
//! - [`clock`]: where the engine reads the time (a manual clock in tests).
//! - `engine`: the storage thread's loop and command dispatch, and the
//!   engine's limits.
//! - `part`: a partition in memory: its ring of segments with their sparse
//!   index, its tail buffer, appends, rolls and time retention.
//! - `commit`: group commit: the write rounds and the fdatasync group.
//! - `read`: fetches, read-ahead, offsets by timestamp.
//! - `recovery`: start-up, the recovery policy and its report, the
//!   checkpoint.
//!
//! The on-disk format is documented in `docs/format.md` and next to the
//! code that reads it.
//!
//! # Memory budget (fixed by config at start-up; nothing grows with load)
//!
//! ```text
//! tail buffers   max_partitions x (tail_buffer_bytes + 4 KiB)    taken as partitions are created
//! read buffer    max(max_batch_bytes, 256 KiB) + 4 KiB           one, reads and scans take turns
//! zero buffer    256 KiB                                         pre-writing and scrubbing
//! recovery       4 MiB + 4 KiB                                   only while Storage::open runs
//! sparse index   per segment (segment_bytes / 32 KiB + 2) x 24 B  reserved at creation
//! ```
//!
//! With the defaults (64 partitions, 1 MiB tails, 4 x 16 MiB rings) that is
//! at most 64 x 1 MiB of tails (only touched pages count towards RSS), 1 MiB
//! of read buffer, and 50 KiB of index per partition.

pub mod io;
pub mod meta;
pub mod segment;

pub mod clock;
mod commit;
mod compact;
mod doorbell;
mod engine;
mod fanin;
mod part;
mod read;
mod readbuf;
mod recovery;
mod resize;
mod syncpool;

pub use crate::bufpool::BatchBuf;
pub use clock::{Clock, ManualClock};
pub use compact::{compact_buffer_bytes, compact_write_bytes_max, SegmentInfo};
pub use io::{IoBackend, BLOCK_BYTES};
pub use recovery::{
    DamagedRange, DataEnd, Quarantine, QuarantineReason, RecoveryPolicy, RecoveryReport, Truncation,
};

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

/// Smallest segment: the header block plus room for a useful number of
/// batches.
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;
/// Largest segment: positions inside a segment are kept as `u32`.
pub const SEGMENT_BYTES_MAX: u64 = 1024 * 1024 * 1024;
pub const SEGMENTS_MIN: u32 = 2;
pub const SEGMENTS_MAX: u32 = 4096;
/// Topic names: Kafka's rule (also keeps them safe as directory names).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

const _: () = assert!(SEGMENT_BYTES_MIN % BLOCK_BYTES as u64 == 0);
const _: () = assert!(SEGMENT_BYTES_MAX % BLOCK_BYTES as u64 == 0);
const _: () = assert!(SEGMENT_BYTES_MAX <= u32::MAX as u64);

/// Which I/O backend the storage thread uses. Config key
/// `storage.backend = "auto" | "io_uring" | "pwrite"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring where the kernel allows it, else pwrite.
    Auto,
    IoUring,
    Pwrite,
}

impl FromStr for BackendChoice {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "io_uring" => Ok(BackendChoice::IoUring),
            "pwrite" => Ok(BackendChoice::Pwrite),
            _ => Err(StorageError::InvalidConfig(
                "storage.backend must be \"auto\", \"io_uring\" or \"pwrite\"",
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::IoUring => "io_uring",
            BackendChoice::Pwrite => "pwrite",
        })
    }
}

/// Durability policy per topic. FromStr/Display: "always",
/// `"interval:<ms>"`, "never".
///
/// - `Always`: acked after the batch is written and fdatasynced (group
///   commit: every append that arrives during a commit joins the next one).
/// - `IntervalMs(ms)`: appends are gathered for up to `ms` (at most 2 ms,
///   or until 64 KiB wait), written together and acked after the write; an
///   fdatasync follows within `ms` of each write. Far fewer and larger
///   writes (less wear on SD cards); a power cut may lose what was acked
///   since the last fdatasync.
/// - `Never`: acked after the write reaches the device queue; fdatasync
///   only when a segment is closed and at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Durability {
    Always,
    IntervalMs(u32),
    Never,
}

impl FromStr for Durability {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const MSG: &str = "fsync must be \"always\", \"interval:<ms>\" (ms >= 1) or \"never\"";
        match s {
            "always" => Ok(Durability::Always),
            "never" => Ok(Durability::Never),
            _ => {
                let ms = s
                    .strip_prefix("interval:")
                    .and_then(|ms| ms.parse::<u32>().ok())
                    .filter(|&ms| ms >= 1)
                    .ok_or(StorageError::InvalidConfig(MSG))?;
                Ok(Durability::IntervalMs(ms))
            }
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::Always => f.write_str("always"),
            Durability::IntervalMs(ms) => write!(f, "interval:{ms}"),
            Durability::Never => f.write_str("never"),
        }
    }
}

/// What an append does when the ring is full and the oldest segment still
/// holds retained data. FromStr/Display: "overwrite" (the default), "reject".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OverflowPolicy {
    /// Size retention: reuse the oldest segment, dropping its data.
    Overwrite,
    /// Refuse the append with [`StorageError::Full`].
    Reject,
}

impl FromStr for OverflowPolicy {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "overwrite" => Ok(OverflowPolicy::Overwrite),
            "reject" => Ok(OverflowPolicy::Reject),
            _ => Err(StorageError::InvalidConfig(
                "overflow must be \"overwrite\" or \"reject\"",
            )),
        }
    }
}

impl fmt::Display for OverflowPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverflowPolicy::Overwrite => "overwrite",
            OverflowPolicy::Reject => "reject",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionConfig {
    /// Bytes per segment file, header block included. Multiple of
    /// [`BLOCK_BYTES`], at least [`SEGMENT_BYTES_MIN`].
    pub segment_bytes: u64,
    /// Segments in the ring (at least 2). The partition's disk budget is
    /// `segments * segment_bytes`, reserved at creation.
    pub segments: u32,
    /// Time retention: a closed segment whose newest record is older is
    /// freed. None = size retention only.
    pub retention_ms: Option<u64>,
    pub durability: Durability,
    pub overflow: OverflowPolicy,
}

/// As a log line says it, in the config's words: `4 x 16777216 bytes,
/// retention_ms none, fsync always, overflow overwrite`.
impl fmt::Display for PartitionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} x {} bytes, retention_ms ",
            self.segments, self.segment_bytes
        )?;
        match self.retention_ms {
            Some(ms) => write!(f, "{ms}")?,
            None => f.write_str("none")?,
        }
        write!(f, ", fsync {}, overflow {}", self.durability, self.overflow)
    }
}

impl PartitionConfig {
    pub fn validate(&self) -> Result<(), StorageError> {
        if self.segment_bytes % BLOCK_BYTES as u64 != 0 {
            return Err(StorageError::InvalidConfig(
                "segment_bytes must be a multiple of 4096",
            ));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(StorageError::InvalidConfig(
                "segment_bytes must be between 64 KiB and 1 GiB",
            ));
        }
        if !(SEGMENTS_MIN..=SEGMENTS_MAX).contains(&self.segments) {
            return Err(StorageError::InvalidConfig(
                "segments must be between 2 and 4096",
            ));
        }
        if self.retention_ms == Some(0) {
            return Err(StorageError::InvalidConfig("retention_ms must be positive"));
        }
        if self.durability == Durability::IntervalMs(0) {
            return Err(StorageError::InvalidConfig(
                "interval durability needs ms >= 1",
            ));
        }
        Ok(())
    }

    /// The disk budget of the partition.
    pub fn ring_bytes(&self) -> u64 {
        self.segment_bytes * u64::from(self.segments)
    }
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            segment_bytes: 16 * 1024 * 1024,
            segments: 4,
            retention_ms: None,
            durability: Durability::Always,
            overflow: OverflowPolicy::Overwrite,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId {
    pub topic: Arc<str>,
    pub partition: u32,
}

impl PartitionId {
    pub fn new(topic: impl Into<Arc<str>>, partition: u32) -> PartitionId {
        PartitionId {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Checks a topic name: 1..=249 bytes of `[A-Za-z0-9._-]`, not "." or "..".
pub fn validate_topic_name(name: &str) -> Result<(), StorageError> {
    let ok = !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidConfig(
            "topic names are 1 to 249 characters of [A-Za-z0-9._-], not \".\" or \"..\"",
        ))
    }
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub backend: BackendChoice,
    /// Bound of the channel to the storage thread: senders wait when full.
    pub append_queue_depth: usize,
    /// Aligned in-memory tail per partition: a multiple of [`BLOCK_BYTES`],
    /// at least `max_batch_bytes`. (Each tail gets one more block for the
    /// partial block carried over when it is recycled.)
    pub tail_buffer_bytes: usize,
    /// Pools (tail buffers) are bounded by this; creating more partitions
    /// fails with [`StorageError::TooManyPartitions`].
    pub max_partitions: usize,
    /// Larger appends fail with [`StorageError::BatchTooLarge`].
    pub max_batch_bytes: usize,
    /// Write zeros over every segment of a new partition, so the hot path
    /// overwrites initialised blocks (on ext4, writes into
    /// fallocated-but-unwritten extents cost a journal commit at
    /// fdatasync). The first segment at creation, the rest in the
    /// background while idle. See docs/performance.md for the measurements.
    pub prewrite_segments: bool,
    /// After a sync group's acks, the next fdatasync waits up to this long
    /// (and otherwise half a recent fdatasync, or a little more than the
    /// partition's producers usually take to answer) for the appends that
    /// answer them, so a producer's window shares one flush instead of
    /// being split over two. Counted per partition: with `pipelined_fsync`
    /// for every ack, unpipelined for one answer per partition (the rest of
    /// a window queues up during the blocking flush by itself), or one per
    /// producer the group acked there where the first answer comes within
    /// a quarter of a flush (a fan-in on a slow device). Zero: never
    /// wait. Not after groups of more than 64 appends, whose fdatasync
    /// should overlap the thread's work, nor for a partition whose
    /// producers answer slower than this. Also a fan-in's wait
    /// (`fanin_wait`) ends once its producers' answers pause this long,
    /// and zero turns that wait off too.
    pub sync_hold_max: std::time::Duration,
    /// A fan-in's next fdatasync waits up to this long for more of its
    /// producers' records (`fanin`): many producers with a record or two
    /// each, who take several flushes to answer. Zero: never wait.
    pub fanin_wait: std::time::Duration,
    /// The producers a fan-in's round is followed for, at most (one per
    /// connection: `server.max_connections`); memory is sized to it.
    pub fanin_producers_max: usize,
    /// false (the default): a group's fdatasyncs run on the storage thread,
    /// as fdatasync(2); appends arriving meanwhile wait in the queue and
    /// form the next group. true: the thread starts them (an io_uring
    /// FSYNC, which the kernel runs on an io-wq worker; the pwrite
    /// backend's helper thread) and writes the next group while they run.
    /// Pipelining pays only where a device overlaps writes with a cache
    /// flush; each flush then costs a thread hand-off (docs/performance.md).
    pub pipelined_fsync: bool,
    /// Told about every write round, for latency histograms outside
    /// storage (the metrics endpoint); storage itself keeps only counters.
    pub observer: Option<Observer>,
    /// Where the engine reads the time: the system's; tests advance a
    /// manual one instead of sleeping through time windows.
    pub clock: Clock,
    /// What recovery does with damage inside durable data.
    pub recovery_policy: RecoveryPolicy,
    /// Tests: while set, a checkpoint refresh's thread fails to start, as
    /// on a board out of memory or threads.
    #[cfg(test)]
    pub checkpoint_spawn_fails: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Tests: while set, a create's syncs (off the storage thread) wait.
    #[cfg(test)]
    pub create_sync_held: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Hears about each write round of the storage thread. Called on the
/// storage thread: implementations must be cheap and never block.
pub trait IoObserver: Send + Sync {
    /// `elapsed` covers the writes and, when `synced`, the fdatasyncs of
    /// one group commit; `payload_bytes` are the batch bytes appended
    /// since the previous round.
    fn write_round(
        &self,
        elapsed: std::time::Duration,
        device_bytes: u64,
        payload_bytes: u64,
        synced: bool,
    );

    /// A pipelined group's fdatasyncs completed, `elapsed` after they were
    /// started (the writes were reported by `write_round` already).
    fn sync_group(&self, elapsed: std::time::Duration);

    /// A fetch's window came from the device: `ahead` when it was read in
    /// the background and used, else read on demand.
    fn window_read(&self, _device_bytes: u64, _ahead: bool) {}

    /// A window read ahead was dropped unused (its reader moved elsewhere,
    /// stopped, or its file was closed or reused).
    fn read_ahead_unused(&self, _device_bytes: u64) {}

    /// A read found damaged data and skipped it: `offsets` lost (at most;
    /// a gap the log already had there counts too).
    fn damage_skipped(&self, _offsets: u64) {}

    /// A flush waited `elapsed` for a fan-in's producers to send again
    /// (`storage.fanin_wait_ms`): latency its records paid for the
    /// flushes saved.
    fn fanin_wait(&self, _elapsed: std::time::Duration) {}
}

#[derive(Clone)]
pub struct Observer(pub Arc<dyn IoObserver>);

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./skiff-data"),
            backend: BackendChoice::Auto,
            append_queue_depth: 1024,
            tail_buffer_bytes: 1024 * 1024,
            max_partitions: 64,
            max_batch_bytes: 1024 * 1024,
            prewrite_segments: true,
            sync_hold_max: std::time::Duration::from_millis(1),
            fanin_wait: std::time::Duration::from_millis(FANIN_WAIT_MS_DEFAULT),
            fanin_producers_max: 4096,
            pipelined_fsync: false,
            observer: None,
            clock: Clock::System,
            recovery_policy: RecoveryPolicy::default(),
            #[cfg(test)]
            checkpoint_spawn_fails: Default::default(),
            #[cfg(test)]
            create_sync_held: Default::default(),
        }
    }
}

impl StorageConfig {
    pub fn validate(&self) -> Result<(), StorageError> {
        if self.append_queue_depth == 0 {
            return Err(StorageError::InvalidConfig(
                "append_queue_depth must be positive",
            ));
        }
        if self.max_partitions == 0 {
            return Err(StorageError::InvalidConfig(
                "max_partitions must be positive",
            ));
        }
        if self.max_batch_bytes < crate::batch::HEADER_BYTES
            || self.max_batch_bytes > crate::batch::BATCH_BYTES_MAX
        {
            return Err(StorageError::InvalidConfig(
                "max_batch_bytes must be between 64 bytes and 64 MiB",
            ));
        }
        if self.tail_buffer_bytes % BLOCK_BYTES != 0
            || self.tail_buffer_bytes < self.max_batch_bytes
        {
            return Err(StorageError::InvalidConfig(
                "tail_buffer_bytes must be a multiple of 4096 and at least max_batch_bytes",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    pub base_offset: u64,
    pub last_offset: u64,
}

/// `high_watermark`: the next offset to be written, and the end of what
/// reads return (only acknowledged data is visible). `durable`: everything
/// below it has been fdatasynced and survives a power cut; it trails the
/// high watermark only under the `interval` and `never` policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    pub earliest: u64,
    pub high_watermark: u64,
    pub durable: u64,
}

/// The storage thread's I/O buffers, allocated at start-up: the read
/// window, a read-ahead spare of the same size per slot (fetch answers
/// may hold spares too, see `readbuf`), and the chunk of zeros segments
/// are pre-written with.
pub fn thread_buffer_bytes(max_batch_bytes: usize) -> usize {
    (1 + io::READ_AHEAD_SLOTS) * engine::read_buffer_bytes(max_batch_bytes)
        + engine::ZERO_CHUNK_BYTES
}

/// `storage.fanin_wait_ms` when not set.
pub const FANIN_WAIT_MS_DEFAULT: u64 = 5;

/// The storage thread's record of a fan-in's round (`fanin`), for
/// `producers` of them.
pub fn fanin_bytes(producers: usize) -> usize {
    fanin::fanin_bytes(producers)
}

/// A partition's tail buffer as allocated from `tail_buffer_bytes`: one
/// block more, for the partial block a recycled tail keeps at its front.
pub fn tail_buffer_alloc_bytes(tail_buffer_bytes: u64) -> u64 {
    tail_buffer_bytes.saturating_add(BLOCK_BYTES as u64)
}

/// Memory a partition's ring holds from its creation to its deletion: the
/// partition's own state and, per segment, its slot in the segment table
/// and the capacity of its sparse index.
pub fn ring_memory_bytes(segment_bytes: u64, segments: u32) -> u64 {
    let per_segment = engine::SEGMENT_SLOT_BYTES
        + engine::index_capacity(segment_bytes) * engine::INDEX_ENTRY_BYTES;
    engine::PART_BYTES + u64::from(segments) * per_segment
}

/// The most [`ring_memory_bytes`] that at most `partitions` rings of
/// `disk_bytes` in all can hold. Index entries follow the bytes, but every
/// segment adds a slot and two entries, so the worst case cuts the disk
/// into as many segments as the limits allow: `SEGMENT_BYTES_MIN` each, at
/// most `SEGMENTS_MAX` per partition.
pub fn rings_memory_bytes_max(disk_bytes: u64, partitions: u32) -> u64 {
    let segments = (disk_bytes / SEGMENT_BYTES_MIN)
        .min(u64::from(partitions).saturating_mul(u64::from(SEGMENTS_MAX)));
    let slot = engine::SEGMENT_SLOT_BYTES + 2 * engine::INDEX_ENTRY_BYTES;
    (disk_bytes / engine::INDEX_INTERVAL_BYTES)
        .saturating_mul(engine::INDEX_ENTRY_BYTES)
        .saturating_add(segments.saturating_mul(slot))
        .saturating_add(u64::from(partitions).saturating_mul(engine::PART_BYTES))
}

/// Heap behind one queued append besides its batch: the partition id's
/// topic name (at most [`TOPIC_NAME_BYTES_MAX`]) and the reply channel the
/// submitter waits on (an `async_channel` of one slot, about 300 bytes).
const APPEND_JOB_HEAP_BYTES: u64 = TOPIC_NAME_BYTES_MAX as u64 + 320;

/// The storage thread's command queue at `depth` jobs, batch bytes not
/// included: one command per slot and what each points to.
pub fn append_queue_bytes(depth: u32) -> u64 {
    u64::from(depth) * (engine::CMD_BYTES + APPEND_JOB_HEAP_BYTES)
}

/// Fetches that may wait for the storage thread at once.
pub const READ_QUEUE_DEPTH: usize = engine::READ_QUEUE_DEPTH;

/// The storage thread's fetch queue (`READ_QUEUE_DEPTH`): a
/// command per slot, each with a partition id and a reply channel as an
/// append's.
pub fn read_queue_bytes() -> u64 {
    engine::READ_QUEUE_DEPTH as u64 * (engine::CMD_BYTES + APPEND_JOB_HEAP_BYTES)
}

/// The read buffer recovery scans with at start-up, freed before the
/// broker starts serving.
pub fn recovery_buffer_bytes(max_batch_bytes: usize) -> u64 {
    engine::RECOVERY_READ_BYTES.max(engine::read_buffer_bytes(max_batch_bytes)) as u64
}

/// A snapshot of the storage counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageStats {
    pub appends: u64,
    /// Batch bytes accepted by appends.
    pub payload_bytes: u64,
    /// Bytes handed to the device in writes (whole blocks, rewrites included).
    pub device_bytes_written: u64,
    pub writes: u64,
    pub fsyncs: u64,
    /// Duration of write+fdatasync submissions, summed, and their count.
    pub fsync_latency_us_sum: u64,
    pub fsync_latency_count: u64,
    pub recovery_truncated_bytes: u64,
    /// Sticky write/fsync failures and read-side corruption found.
    pub failures: u64,
    /// Partitions quarantined (read-only) or left unloaded by recovery,
    /// and not deleted since: a leftover start-up deletes is not counted.
    pub quarantined: u64,
    /// Window reads started in the background for a sequential reader,
    /// and how many of them a later read used.
    pub reads_ahead: u64,
    pub reads_ahead_used: u64,
    /// Fetch answers that borrowed the read buffer instead of a copy.
    pub reads_lent: u64,
    /// Compacted segment runs swapped into rings.
    pub compactions: u64,
    /// Segment files preallocated by writing zeros: the file system has no
    /// fallocate (FUSE, some network file systems).
    pub zero_fill_allocations: u64,
    /// 1 once a segment file had to be opened without O_DIRECT: buffered
    /// writes with fdatasync.
    pub buffered_io: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatsInner {
    pub appends: AtomicU64,
    pub payload_bytes: AtomicU64,
    pub device_bytes_written: AtomicU64,
    pub writes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_latency_us_sum: AtomicU64,
    pub fsync_latency_count: AtomicU64,
    pub recovery_truncated_bytes: AtomicU64,
    pub failures: AtomicU64,
    pub quarantined: AtomicU64,
    pub reads_ahead: AtomicU64,
    pub reads_ahead_used: AtomicU64,
    pub reads_lent: AtomicU64,
    pub compactions: AtomicU64,
    pub zero_fill_allocations: AtomicU64,
    pub buffered_io: AtomicU64,
}

impl StatsInner {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn sub(c: &AtomicU64, n: u64) {
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }
    fn snapshot(&self) -> StorageStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StorageStats {
            appends: g(&self.appends),
            payload_bytes: g(&self.payload_bytes),
            device_bytes_written: g(&self.device_bytes_written),
            writes: g(&self.writes),
            fsyncs: g(&self.fsyncs),
            fsync_latency_us_sum: g(&self.fsync_latency_us_sum),
            fsync_latency_count: g(&self.fsync_latency_count),
            recovery_truncated_bytes: g(&self.recovery_truncated_bytes),
            failures: g(&self.failures),
            quarantined: g(&self.quarantined),
            reads_ahead: g(&self.reads_ahead),
            reads_ahead_used: g(&self.reads_ahead_used),
            reads_lent: g(&self.reads_lent),
            compactions: g(&self.compactions),
            zero_fill_allocations: g(&self.zero_fill_allocations),
            buffered_io: g(&self.buffered_io),
        }
    }
}

pub(crate) const STATE_OK: u8 = 0;
pub(crate) const STATE_FAILED: u8 = 1;
pub(crate) const STATE_QUARANTINED: u8 = 2;

/// What the handle can see of a partition without asking the thread.
#[derive(Debug)]
pub(crate) struct PartShared {
    pub cfg: PartitionConfig,
    pub earliest: AtomicU64,
    pub hw: AtomicU64,
    /// The durable checkpoint's next offset.
    pub durable: AtomicU64,
    pub state: AtomicU8,
    pub event: Arc<event_listener::Event>,
    /// The first offset a reader (the mirror) still needs, or
    /// [`NO_RETAIN_FLOOR`]: the ring never drops a segment holding an offset
    /// at or past it, and a full ring refuses appends with
    /// [`StorageError::BacklogFull`] instead.
    pub retain_floor: AtomicU64,
}

/// [`PartShared::retain_floor`] when no reader holds the ring back.
pub const NO_RETAIN_FLOOR: u64 = u64::MAX;

#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub parts: RwLock<foldhash::HashMap<PartitionId, Arc<PartShared>>>,
    pub stats: StatsInner,
    pub reports: Mutex<Vec<RecoveryReport>>,
    /// Partitions recovery found but could not load: neither their
    /// `partition.meta` nor any segment header reads. Each stays
    /// quarantined, so a request about it says why instead of that it
    /// does not exist, until a delete removes its directory.
    pub unloaded: Mutex<Vec<Quarantine>>,
    /// Directories recovery skipped: their `partition.meta` names another
    /// partition (copied or renamed by hand). Never loaded nor deleted.
    pub skipped: Mutex<Vec<PathBuf>>,
    /// Notified when a ring starts a segment, or refuses to (a cleaner
    /// then looks for room to make).
    pub rolled: event_listener::Event,
}

impl Shared {
    fn part(&self, id: &PartitionId) -> Result<Arc<PartShared>, StorageError> {
        let parts = self.parts.read().unwrap_or_else(|e| e.into_inner());
        parts.get(id).cloned().ok_or_else(|| self.not_loaded(id))
    }

    /// The error about a partition that is not loaded: quarantined when
    /// recovery left it unloaded, else unknown.
    pub(super) fn not_loaded(&self, id: &PartitionId) -> StorageError {
        let unloaded = self.unloaded.lock().unwrap_or_else(|e| e.into_inner());
        match unloaded.iter().find(|q| q.partition == *id) {
            Some(q) => StorageError::Quarantined(Box::new(q.clone())),
            None => StorageError::UnknownPartition(id.clone()),
        }
    }
}

/// Why a storage operation failed. Each variant names the likely cause.
#[non_exhaustive]
#[derive(Debug)]
pub enum StorageError {
    /// No such partition: never created, or deleted.
    UnknownPartition(PartitionId),
    /// `create_partition` for an id that exists: loaded, or a directory
    /// at `dir` that may hold data (not loaded, or not this id's), which
    /// storage never creates over.
    PartitionExists {
        id: PartitionId,
        dir: PathBuf,
    },
    /// A read or seek outside `[earliest, high_watermark]`: the data was
    /// dropped by retention, or the consumer is ahead of the log.
    OffsetOutOfRange {
        requested: u64,
        earliest: u64,
        high_watermark: u64,
    },
    /// The producer's batch failed its checks (CRC, framing, fields).
    InvalidBatch(crate::batch::BatchError),
    /// Larger than `max_batch_bytes` (or than a segment can hold).
    BatchTooLarge {
        bytes: usize,
        max: usize,
    },
    /// `OverflowPolicy::Reject` and the ring is full of retained data.
    Full(PartitionId),
    /// The ring is full and its oldest segment holds offsets at or past
    /// the partition's retain floor (data not yet forwarded upstream).
    BacklogFull(PartitionId),
    /// A write or fsync failed earlier (disk error, full thin-provisioned
    /// device): the partition refuses writes until reopened and recovered.
    Failed {
        partition: PartitionId,
        cause: std::io::ErrorKind,
        errno: Option<i32>,
    },
    /// Corruption found in acknowledged data (bit rot, a tampered file):
    /// the partition is read-only up to the damage. Says where and what
    /// (boxed: the error travels with every append's result).
    Quarantined(Box<Quarantine>),
    /// A config value out of range; the text says which.
    InvalidConfig(&'static str),
    /// More partitions than `max_partitions` (pools are sized from it).
    TooManyPartitions {
        max: usize,
    },
    /// The disk cannot hold the partition's ring (ENOSPC at creation);
    /// nothing was left behind.
    InsufficientSpace {
        partition: PartitionId,
        bytes: u64,
    },
    /// A segment file of another on-disk format version (an older or newer
    /// skiff wrote it): the partition is not opened, and nothing in its
    /// directory is changed. There is no converter; see docs/format.md.
    UnsupportedVersion {
        partition: PartitionId,
        slot: u32,
        found: u16,
        supported: u16,
    },
    /// A delete unloaded the partition (nothing reads or writes it any
    /// more) but could not remove its directory `dir`: it stays on disk,
    /// listed by [`Storage::unloaded`], and a create of the id is refused
    /// until a later delete of it succeeds.
    DeleteIncomplete {
        id: PartitionId,
        dir: PathBuf,
        error: std::io::Error,
    },
    /// Setup, open or metadata I/O failed.
    Io(std::io::Error),
    Meta(meta::MetaError),
    /// The storage thread has stopped (shutdown, or it is stopping).
    ShuttingDown,
    /// A shrink of a ring that never overwrites (a compacted topic, or
    /// `overflow = reject`) to fewer segments than hold its data now.
    RingTooSmall {
        partition: PartitionId,
        live_segments: u32,
        asked: u32,
    },
    /// A compaction's segments are no longer the ring's oldest (time
    /// retention dropped one, or another compaction ran): nothing was
    /// changed; plan again.
    CompactionMoved(PartitionId),
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::UnknownPartition(id) => write!(f, "unknown partition {id}"),
            StorageError::PartitionExists { id, dir } => {
                write!(f, "partition {id} exists ({})", dir.display())
            }
            StorageError::OffsetOutOfRange {
                requested,
                earliest,
                high_watermark,
            } => write!(
                f,
                "offset {requested} out of range [{earliest}, {high_watermark}]"
            ),
            StorageError::InvalidBatch(e) => write!(f, "invalid batch: {e}"),
            StorageError::BatchTooLarge { bytes, max } => {
                write!(f, "batch of {bytes} bytes exceeds the limit of {max}")
            }
            StorageError::Full(id) => write!(f, "partition {id} is full (overflow = reject)"),
            StorageError::BacklogFull(id) => write!(
                f,
                "partition {id} is full of records not yet forwarded upstream (mirror_overflow = block)"
            ),
            StorageError::Failed {
                partition,
                cause,
                errno,
            } => write!(
                f,
                "partition {partition} failed a write or fsync ({cause:?}, errno {errno:?}); \
                 it refuses writes until restarted"
            ),
            StorageError::Quarantined(q) => write!(f, "{q}"),
            StorageError::InvalidConfig(what) => write!(f, "invalid storage config: {what}"),
            StorageError::TooManyPartitions { max } => {
                write!(f, "too many partitions (max_partitions = {max})")
            }
            StorageError::InsufficientSpace { partition, bytes } => write!(
                f,
                "not enough disk space for partition {partition} ({bytes} bytes)"
            ),
            StorageError::UnsupportedVersion {
                partition,
                slot,
                found,
                supported,
            } => write!(
                f,
                "partition {partition}: segment {slot} is in on-disk format version {found}, \
                 this build reads version {supported} only (written by another skiff; \
                 move the partition's directory aside to start)"
            ),
            StorageError::DeleteIncomplete { id, dir, error } => write!(
                f,
                "partition {id} is unloaded, but its directory {} could not be removed: {error}",
                dir.display()
            ),
            StorageError::Io(e) => write!(f, "storage I/O: {e}"),
            StorageError::Meta(e) => write!(f, "{e}"),
            StorageError::ShuttingDown => f.write_str("storage is shutting down"),
            StorageError::RingTooSmall {
                partition,
                live_segments,
                asked,
            } => write!(
                f,
                "partition {partition} holds data in {live_segments} segments and never \
                 overwrites it: it cannot shrink to {asked} (compact the topic or delete keys \
                 first)"
            ),
            StorageError::CompactionMoved(id) => write!(
                f,
                "partition {id}: the segments being compacted are no longer the ring's oldest"
            ),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::InvalidBatch(e) => Some(e),
            StorageError::Io(e) | StorageError::DeleteIncomplete { error: e, .. } => Some(e),
            StorageError::Meta(e) => Some(e),
            _ => None,
        }
    }
}

/// An I/O error on `path` of the data directory, saying which: a file
/// system refusing the directory (a file in its place, read-only) names
/// nothing by itself. The error's kind is kept.
pub(crate) fn in_path(path: &std::path::Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |e| {
        StorageError::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e)
    }
}

impl From<meta::MetaError> for StorageError {
    fn from(e: meta::MetaError) -> Self {
        StorageError::Meta(e)
    }
}

impl From<crate::batch::BatchError> for StorageError {
    fn from(e: crate::batch::BatchError) -> Self {
        StorageError::InvalidBatch(e)
    }
}

type Reply<T> = async_channel::Sender<Result<T, StorageError>>;

/// What an append's reply carries: its outcome, and the buffer its batch
/// came in when no pool takes it back (see `commit::Pending`).
type Acked = (Result<AppendAck, StorageError>, Option<Vec<u8>>);

/// An append's ack: a oneshot, one per append.
pub(super) struct AppendReply(oneshot::Sender<Acked>);

impl AppendReply {
    /// Sends the outcome; false when nobody waits for it any more.
    pub(super) fn send(self, r: Result<AppendAck, StorageError>) -> bool {
        self.send_with(r, None)
    }

    /// Sends the outcome and a spent buffer for the receiver to free.
    pub(super) fn send_with(
        self,
        r: Result<AppendAck, StorageError>,
        spent: Option<Vec<u8>>,
    ) -> bool {
        self.0.send((r, spent)).is_ok()
    }
}

/// Whether a submit wakes the storage thread at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Now,
    /// Only if the queue is full; [`Storage::wake`] follows.
    Later,
}

/// A batch whose framing and CRC were verified (one pass, with the
/// hardware CRC where the CPU has it), ready for [`Storage::submit`].
/// Checked on the caller's thread, so the CRC work runs on the network
/// threads in parallel, and a caller that needs the header first (the
/// producer table) makes no second pass over the bytes.
pub struct CheckedBatch {
    batch: BatchBuf,
    checked: part::Prechecked,
}

impl CheckedBatch {
    /// A producer's batch: appended right after the log's end, and its
    /// offsets must be dense ([`BatchError::NotDense`](crate::batch::BatchError::NotDense)).
    pub fn check(batch: impl Into<BatchBuf>) -> Result<CheckedBatch, crate::batch::BatchError> {
        let batch = batch.into();
        let checked = part::Prechecked::check(&batch)?;
        Ok(CheckedBatch { batch, checked })
    }

    /// A batch of the log's own writers (compaction, transaction markers):
    /// it may hold gaps between its records, and its base offset is at
    /// least `base_offset_at_least`, so the log may gain a gap before it.
    /// Below the log's end it simply follows the last batch.
    pub fn check_placed(
        batch: impl Into<BatchBuf>,
        base_offset_at_least: u64,
    ) -> Result<CheckedBatch, crate::batch::BatchError> {
        let batch = batch.into();
        let checked = part::Prechecked::check_placed(&batch, base_offset_at_least)?;
        Ok(CheckedBatch { batch, checked })
    }

    /// The batch as checked (base offset still the producer's).
    pub fn bytes(&self) -> &[u8] {
        &self.batch
    }

    pub fn header(&self) -> &crate::batch::BatchHeader {
        self.checked.header()
    }
}

/// A pending append: resolves when the batch is durable under the
/// partition's policy (or failed).
pub struct AppendTicket {
    rx: oneshot::Receiver<Acked>,
}

/// [`Storage::submit`]'s future: its ticket at once when the queue had
/// room, else a wait for room. The wait is boxed: only a full queue needs
/// it, and inline it sat in every produce's future, and so in every
/// connection's session for its life (docs/performance.md, "what a
/// connection costs").
#[must_use = "the ticket is the batch's ack"]
pub struct Submitting<'a>(SubmitState<'a>);

type WaitForRoom<'a> =
    Pin<Box<dyn Future<Output = Result<AppendTicket, StorageError>> + Send + 'a>>;

enum SubmitState<'a> {
    Ready(Option<Result<AppendTicket, StorageError>>),
    Full(WaitForRoom<'a>),
}

impl Future for Submitting<'_> {
    type Output = Result<AppendTicket, StorageError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            SubmitState::Ready(r) => Poll::Ready(r.take().expect("polled after it was ready")),
            SubmitState::Full(wait) => wait.as_mut().poll(cx),
        }
    }
}

impl Future for AppendTicket {
    type Output = Result<AppendAck, StorageError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A reply dropped unsent: the storage thread stopped first. The
        // batch's buffer, if it came back, is freed here.
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_or(Err(StorageError::ShuttingDown), |(r, _spent)| r))
    }
}

impl fmt::Debug for AppendTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AppendTicket")
    }
}

struct Inner {
    tx: engine::CmdTx,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    backend_name: &'static str,
    max_batch_bytes: usize,
    /// Held until shutdown: one process per data directory.
    lock: Mutex<Option<std::fs::File>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The thread flushes and checkpoints when the channel closes.
        self.tx.close();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Cloneable, Send + Sync handle to the storage thread.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("backend", &self.inner.backend_name)
            .finish()
    }
}

async fn reply<T>(rx: async_channel::Receiver<Result<T, StorageError>>) -> Result<T, StorageError> {
    rx.recv().await.unwrap_or(Err(StorageError::ShuttingDown))
}

impl Storage {
    /// Creates data_dir if needed, picks the backend (one log line naming
    /// it and why), starts the storage thread, recovers every partition
    /// found on disk, and returns once recovery is complete.
    pub fn open(cfg: StorageConfig) -> Result<Storage, StorageError> {
        cfg.validate()?;
        let (backend, reason) = io::open_backend(cfg.backend)?;
        log::info!("storage backend: {} ({reason})", backend.name());
        Storage::open_with_backend(cfg, backend)
    }

    /// As [`Storage::open`] with a given backend (tests, benches, and the
    /// fault-injecting disk). `cfg.backend` is ignored.
    pub fn open_with_backend(
        cfg: StorageConfig,
        backend: Box<dyn IoBackend>,
    ) -> Result<Storage, StorageError> {
        cfg.validate()?;
        let in_data_dir = |e: std::io::Error| {
            // The lock's own error names the directory already.
            if e.kind() == std::io::ErrorKind::WouldBlock {
                StorageError::Io(e)
            } else {
                StorageError::Io(std::io::Error::new(
                    e.kind(),
                    format!("data_dir {}: {e}", cfg.data_dir.display()),
                ))
            }
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(in_data_dir)?;
        let lock = io::lock_dir(&cfg.data_dir).map_err(in_data_dir)?;
        let shared = Arc::new(Shared::default());
        let backend_name = backend.name();
        let max_batch_bytes = cfg.max_batch_bytes;
        let (tx, thread) = engine::start(cfg, backend, shared.clone())?;
        Ok(Storage {
            inner: Arc::new(Inner {
                tx,
                shared,
                thread: Mutex::new(Some(thread)),
                backend_name,
                max_batch_bytes,
                lock: Mutex::new(Some(lock)),
            }),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        self.inner.backend_name
    }

    pub fn recovery_report(&self) -> Vec<RecoveryReport> {
        self.inner
            .shared
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Directories start-up recovery skipped because their
    /// `partition.meta` names another partition; they stay on disk as
    /// they are.
    pub fn skipped_dirs(&self) -> Vec<PathBuf> {
        self.inner
            .shared
            .skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Partitions whose directories are on disk but not loaded, sorted:
    /// recovery could not load them (neither their `partition.meta` nor a
    /// segment header reads), or a delete could not remove them
    /// ([`StorageError::DeleteIncomplete`]). They are not in
    /// [`Storage::partitions`].
    pub fn unloaded(&self) -> Vec<PartitionId> {
        let unloaded = self
            .inner
            .shared
            .unloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = unloaded.iter().map(|q| q.partition.clone()).collect();
        v.sort();
        v
    }

    pub fn partitions(&self) -> Vec<(PartitionId, PartitionConfig)> {
        let parts = self
            .inner
            .shared
            .parts
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = parts
            .iter()
            .map(|(id, p)| (id.clone(), p.cfg.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> engine::Cmd) -> Result<T, StorageError> {
        let (tx, rx) = async_channel::bounded(1);
        self.inner.tx.send(make(tx)).await?;
        reply(rx).await
    }

    /// Preallocates the ring (fallocate), writes the partition's metadata
    /// atomically. Err(PartitionExists) if it exists.
    pub async fn create_partition(
        &self,
        id: PartitionId,
        cfg: PartitionConfig,
    ) -> Result<(), StorageError> {
        self.create_partition_spared(id, cfg, false).await
    }

    /// As [`Storage::create_partition`]; with `spare`, a compacted
    /// partition's, it also reserves the segment its first compaction
    /// writes into (see [`Storage::set_spare`]), or is not created.
    pub async fn create_partition_spared(
        &self,
        id: PartitionId,
        cfg: PartitionConfig,
        spare: bool,
    ) -> Result<(), StorageError> {
        validate_topic_name(&id.topic)?;
        cfg.validate()?;
        self.call(|reply| engine::Cmd::Create {
            id,
            cfg,
            spare,
            reply,
        })
        .await
    }

    /// Reserves (`keep`) or gives back a partition's compaction spare: the
    /// preallocated segment file a compaction writes into, so that even a
    /// partition's first compaction needs no free room (on a full disk,
    /// only compaction makes room in a compacted ring). Reserving keeps a
    /// spare there already (topping up its allocation); a compaction in
    /// progress holds it, and leaves it back when it ends.
    pub async fn set_spare(&self, id: &PartitionId, keep: bool) -> Result<(), StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::Spare { id, keep, reply })
            .await
    }

    pub async fn delete_partition(&self, id: &PartitionId) -> Result<(), StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::Delete { id, reply }).await
    }

    /// Enqueues one producer batch (base offset as sent by the producer),
    /// checked already (see [`CheckedBatch`]). Awaiting this waits for room
    /// in the bounded channel; awaiting the ticket waits for the ack.
    /// Appends are applied in submit order. The batch is queued when this
    /// is called, if there is room; the future then only hands over the
    /// ticket.
    ///
    /// With [`Wake::Later`] the storage thread is left asleep until a
    /// later [`Storage::wake`] (or a full queue): a caller handing over
    /// several batches (a produce request's) wakes it once, after the
    /// last, so it finds them all and writes them in one group with one
    /// fdatasync rather than start on the first alone. An append does not
    /// wake a thread gathering a fan-in's round (`Doorbell::hush`) unless
    /// the queue is full.
    pub fn submit(&self, id: &PartitionId, checked: CheckedBatch, wake: Wake) -> Submitting<'_> {
        let batching = checked.header().record_count > fanin::FANIN_DEVICE_RECORDS;
        let CheckedBatch { batch, checked } = checked;
        if batch.len() > self.inner.max_batch_bytes {
            return Submitting(SubmitState::Ready(Some(Err(StorageError::BatchTooLarge {
                bytes: batch.len(),
                max: self.inner.max_batch_bytes,
            }))));
        }
        let (tx, rx) = oneshot::channel();
        let cmd = engine::Cmd::Append {
            id: id.clone(),
            batch,
            checked,
            reply: AppendReply(tx),
        };
        let queued = move |s: &Storage| {
            if wake == Wake::Now {
                s.inner.tx.ring_append();
            }
            if batching {
                // Its rate waits on the flush a fan-in may be holding.
                s.inner.tx.ring_hushed();
            }
            AppendTicket { rx }
        };
        Submitting(match self.inner.tx.try_send_quiet(cmd) {
            engine::TrySend::Queued => SubmitState::Ready(Some(Ok(queued(self)))),
            engine::TrySend::Closed => SubmitState::Ready(Some(Err(StorageError::ShuttingDown))),
            engine::TrySend::Full(cmd) => SubmitState::Full(Box::pin(async move {
                self.inner.tx.send_when_room(cmd).await?;
                Ok(queued(self))
            })),
        })
    }

    /// Wakes the storage thread for batches submitted with
    /// [`Wake::Later`]. Cheap when it is awake.
    pub fn wake(&self) {
        self.inner.tx.ring_append();
    }

    /// The largest batch [`Storage::submit`] takes.
    pub fn max_batch_bytes(&self) -> usize {
        self.inner.max_batch_bytes
    }

    /// Whole batches, as stored, starting with the batch covering `offset`
    /// (or, when `offset` falls in a gap between batches, the first batch
    /// after it), up to `max_bytes` (at least one whole batch if any), never
    /// beyond the high watermark. Empty when `offset == high_watermark`.
    pub async fn read(
        &self,
        id: &PartitionId,
        offset: u64,
        max_bytes: usize,
    ) -> Result<bytes::Bytes, StorageError> {
        self.read_within(id, offset, max_bytes, usize::MAX).await
    }

    /// As [`Storage::read`], but the first batch too only when it is at
    /// most `first_max` bytes: empty when it is larger. A fetch filling
    /// what room its answer has left takes another partition's batches
    /// only this way.
    pub async fn read_within(
        &self,
        id: &PartitionId,
        offset: u64,
        max_bytes: usize,
        first_max: usize,
    ) -> Result<bytes::Bytes, StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::Read {
            id,
            offset,
            max_bytes,
            first_max,
            reply,
        })
        .await
    }

    /// Holds the ring back from dropping offsets at or past `floor`
    /// (`None`: no hold). Read at each segment roll and time-retention pass.
    pub fn set_retain_floor(
        &self,
        id: &PartitionId,
        floor: Option<u64>,
    ) -> Result<(), StorageError> {
        let p = self.inner.shared.part(id)?;
        p.retain_floor
            .store(floor.unwrap_or(NO_RETAIN_FLOOR), Ordering::Release);
        Ok(())
    }

    pub fn offsets(&self, id: &PartitionId) -> Result<Offsets, StorageError> {
        let p = self.inner.shared.part(id)?;
        // hw first: earliest only grows, so this never shows earliest > hw.
        let high_watermark = p.hw.load(Ordering::Acquire);
        let earliest = p.earliest.load(Ordering::Acquire).min(high_watermark);
        let durable = p.durable.load(Ordering::Acquire).min(high_watermark);
        Ok(Offsets {
            earliest,
            high_watermark,
            durable,
        })
    }

    /// First offset whose batch max_timestamp >= ts_ms; None if none.
    pub async fn offset_for_timestamp(
        &self,
        id: &PartitionId,
        ts_ms: i64,
    ) -> Result<Option<u64>, StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::OffsetForTs { id, ts_ms, reply })
            .await
    }

    /// Completes once the storage thread has taken a command off its queue:
    /// a hung thread (a stuck device, a deadlock) never answers, which is
    /// what the service watchdog needs to notice.
    pub async fn ping(&self) -> Result<(), StorageError> {
        self.call(|reply| engine::Cmd::Ping { reply }).await
    }

    /// The config a partition runs now (what [`Storage::partitions`]
    /// says is what it loaded with), checked against its ring's slots and
    /// its `partition.meta` and `ring.meta` on disk: all must agree.
    #[cfg(test)]
    pub(crate) async fn running_config(&self, id: &PartitionId) -> PartitionConfig {
        let id = id.clone();
        let (cfg, slots, dir) = self
            .call(|reply| engine::Cmd::Running {
                id: id.clone(),
                reply,
            })
            .await
            .expect("a loaded partition");
        assert_eq!(slots, cfg.segments as usize, "{id}: ring slots");
        let on_disk: part::PartitionMeta = meta::read_file(&dir.join(part::PARTITION_META))
            .expect("partition.meta")
            .expect("partition.meta");
        assert_eq!(on_disk.cfg, cfg, "{id}: partition.meta");
        let ring: Option<part::RingLayout> =
            meta::read_file(&dir.join(part::RING_META)).expect("ring.meta");
        if let Some(ring) = ring {
            assert_eq!(ring.files.len(), slots, "{id}: ring.meta");
        }
        cfg
    }

    /// Tests: stops the storage thread in the middle of taking commands off
    /// its queue, until the returned sender is dropped. Whatever is queued
    /// meanwhile is then taken in the same round as one group, however the
    /// threads happen to be scheduled.
    #[cfg(test)]
    pub(crate) fn pause(&self) -> std::sync::mpsc::Sender<()> {
        let (paused, stopped) = std::sync::mpsc::channel();
        let (resume, resumed) = std::sync::mpsc::channel();
        self.inner
            .tx
            .send_blocking(engine::Cmd::Pause {
                paused,
                resume: resumed,
            })
            .expect("the storage thread runs");
        stopped.recv().expect("the storage thread pauses");
        resume
    }

    /// Notified when any partition's ring starts a new segment or finds
    /// itself full: the moments a cleaner may have room to make.
    pub fn roll_listener(&self) -> event_listener::EventListener {
        self.inner.shared.rolled.listen()
    }

    /// Notified every time the partition's high watermark advances.
    pub fn data_event(&self, id: &PartitionId) -> Result<Arc<event_listener::Event>, StorageError> {
        Ok(self.inner.shared.part(id)?.event.clone())
    }

    /// Flushes every tail, fsyncs, writes checkpoints, stops the thread.
    /// Idempotent.
    pub fn shutdown(&self) -> Result<(), StorageError> {
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(handle) = handle else {
            return Ok(());
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self
            .inner
            .tx
            .send_blocking(engine::Cmd::Shutdown { reply: tx })
            .is_ok();
        let result = if sent {
            rx.recv().unwrap_or(Err(StorageError::ShuttingDown))
        } else {
            Ok(())
        };
        self.inner.tx.close();
        let _ = handle.join();
        // The thread is gone: another storage may open the directory now.
        self.inner
            .lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        result
    }

    pub fn stats(&self) -> StorageStats {
        self.inner.shared.stats.snapshot()
    }

    // ------------------------------------------------ compaction (issue 19)

    /// The ring's live segments, oldest first; the last is the active one.
    pub async fn segments(&self, id: &PartitionId) -> Result<Vec<SegmentInfo>, StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::Segments { id, reply }).await
    }

    /// Starts replacing the ring's oldest `count` segments (the oldest has
    /// `first_epoch`; the active one is never among them) with one segment
    /// written by [`Storage::compact_write`] (see `compact`'s docs).
    pub async fn compact_begin(
        &self,
        id: &PartitionId,
        first_epoch: u64,
        count: usize,
    ) -> Result<(), StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::CompactBegin {
            id,
            first_epoch,
            count,
            reply,
        })
        .await
    }

    /// Whole batches with their offsets, in order, at most
    /// [`compact_write_bytes_max`] bytes.
    pub async fn compact_write(
        &self,
        id: &PartitionId,
        bytes: Vec<u8>,
    ) -> Result<(), StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::CompactWrite { id, bytes, reply })
            .await
    }

    /// Makes the new segment durable and swaps it in: afterwards the
    /// replaced slots are free. Crash-safe: before or after, never between.
    pub async fn compact_commit(&self, id: &PartitionId) -> Result<(), StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::CompactCommit { id, reply })
            .await
    }

    /// Changes a partition's retention, durability, overflow and segment
    /// count live (not its segment size); survives a restart
    /// (`partition.meta` and, for the count, `ring.meta` are replaced
    /// atomically; see `resize`).
    pub async fn alter_partition(
        &self,
        id: &PartitionId,
        cfg: PartitionConfig,
    ) -> Result<(), StorageError> {
        self.alter_partition_dropping(id, cfg).await.map(|_| ())
    }

    /// As [`Storage::alter_partition`]; a shrink that dropped the oldest
    /// segments (of a ring that overwrites) returns the earliest offset it
    /// kept: those records are gone, whatever comes next.
    pub async fn alter_partition_dropping(
        &self,
        id: &PartitionId,
        cfg: PartitionConfig,
    ) -> Result<Option<u64>, StorageError> {
        cfg.validate()?;
        let id = id.clone();
        self.call(|reply| engine::Cmd::Alter { id, cfg, reply })
            .await
    }

    /// Gives up a compaction in progress (nothing in the ring changes).
    pub async fn compact_abort(&self, id: &PartitionId) -> Result<(), StorageError> {
        let id = id.clone();
        self.call(|reply| engine::Cmd::CompactAbort { id, reply })
            .await
    }
}

/// A temp dir for tests that need real files: under target/ (tmpfs has no
/// O_DIRECT, and /tmp is tmpfs on many machines).
#[cfg(test)]
pub(crate) fn test_dir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tmp");
    std::fs::create_dir_all(&base).expect("create target/test-tmp");
    tempfile::tempdir_in(base).expect("tempdir")
}

#[cfg(test)]
mod corruption_tests;
#[cfg(test)]
mod crashed_run_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod resize_tests;
#[cfg(test)]
pub(crate) mod tests;
