//! Idempotent producers: ids and epochs (the registry), and per partition
//! and producer the sequence window that recognises a retried batch.
//!
//! # The registry (`<data_dir>/producers.meta`)
//!
//! Holds the next free producer id (reserved in blocks of
//! [`ID_BLOCK`], so an anonymous init writes the file once per block, not
//! once per init) and, for named producers, name → (id, epoch). A named init
//! bumps the epoch and persists it before answering, so after any crash a
//! fenced instance stays fenced. A named id carries [`NAMED_ID_BIT`], so a
//! name can be forgotten ([`Producers::forget`]: an expired transactional
//! id) and its instances stay fenced with nothing kept of it.
//!
//! A plain name (not a transactional id's, whose coordinator forgets it)
//! unused for `producers.name_expiry_ms` is forgotten the same way, so a
//! fleet whose device names come and go does not grow the file for good.
//! "Used" is an init of it, or a batch of its id as the sequence table saw
//! it: the produce path does nothing more. The registry keeps each plain
//! name's last use; a sweep ([`Producers::expire_names`], also run by
//! named inits) folds the table's activity into it only when a name's is
//! half the expiry old, at most once per [`SWEEP_INTERVAL_MS_MAX`].
//!
//! # The sequence table
//!
//! One table for the whole broker, keyed by (topic, partition, producer id),
//! allocated once with `producers.max_producers` entries and never grown:
//! when it is full the least recently active entries are evicted
//! (counted), a sixty-fourth of it at a time, at most 16.
//! (A `HashMap` allocated with its full capacity rather than a heapless
//! map: heapless capacities are compile-time constants, this one comes
//! from config. The per-entry windows are heapless.) Finding the least
//! recently active entry is a scan, done only when the table is full.
//! Each entry keeps the producer's epoch, the last [`WINDOW_BATCHES`]
//! written batches (sequence range and offsets) and the batches submitted
//! but not yet acknowledged. A batch is checked at submit time, in the
//! connection reader, so in frame order (see [`Producers::check`]).
//!
//! # In-flight batches and failures
//!
//! The next expected sequence counts batches that are submitted but not yet
//! acknowledged, so a client may pipeline up to [`WINDOW_BATCHES`] batches
//! per partition. When one fails in storage, it and every later in-flight
//! batch of the same producer and partition are dropped from the expected
//! sequence at once: the client's retry of the failed batch is then the next
//! expected one, and a later batch that arrives before that retry gets
//! `out_of_order_sequence` (the client retries it after its predecessor).
//! Every storage failure but `Full` is sticky (the later in-flight batches
//! fail too); a later batch that still succeeds after an earlier one failed
//! with `Full` (the ring freed room in between) is recorded as written, and
//! the earlier one's retry lands after it: each record once, that pair out
//! of order. docs/semantics.md says so.
//!
//! # Durability
//!
//! The table is rebuilt at start-up from a snapshot per partition
//! (`<data_dir>/producer-state/<topic>-<partition>.snap`, postcard + CRC,
//! atomically replaced) plus a scan of the batch headers after the offset the
//! snapshot covers. See [`PartitionSnapshot`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::batch::{BatchHeader, NO_PRODUCER_ID};
use crate::storage::meta::{self, MetaError};
use crate::storage::StorageError;

use super::clock::Clock;

/// Batches remembered per producer and partition, and the deepest pipeline
/// the broker keeps ordered: Kafka's `max.in.flight.requests.per.connection`
/// limit for idempotence.
pub const WINDOW_BATCHES: usize = 5;
/// Producer ids are reserved this many at a time in the registry file.
pub const ID_BLOCK: u64 = 1000;
/// Set in a named producer's id (over a number from the same sequence as
/// anonymous ids): an id with it that the registry does not list is a
/// forgotten name's, refused, not taken for an anonymous producer's. Names
/// registered before carry none and are never forgotten.
pub const NAMED_ID_BIT: u64 = 1 << 62;
const REGISTRY_FILE: &str = "producers.meta";
/// The names the transaction coordinator registers, and forgets itself.
pub(crate) const TXN_NAME_PREFIX: &str = "txn:";
/// The longest wait between name sweeps that are due: a plain name is
/// forgotten at most this long after its expiry.
pub const SWEEP_INTERVAL_MS_MAX: i64 = 3_600_000;
const SNAPSHOT_DIR: &str = "producer-state";
/// Longest producer name (bytes); like a Kafka transactional.id, a label.
pub const PRODUCER_NAME_BYTES_MAX: usize = 249;

/// The sequence space wraps to 0 after `i32::MAX`, as Kafka's does.
const SEQ_SPACE: i64 = i32::MAX as i64 + 1;

/// Whether sequence `a` is ahead of `b` on the wrapping circle.
fn ahead_of(a: i32, b: i32) -> bool {
    let d = (i64::from(a) - i64::from(b)).rem_euclid(SEQ_SPACE);
    d != 0 && d < SEQ_SPACE / 2
}

fn next_seq(last: i32) -> i32 {
    if last == i32::MAX {
        0
    } else {
        last + 1
    }
}

/// Why a batch of an idempotent producer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceError {
    /// A newer epoch of this producer id exists: another instance took over.
    Fenced { epoch: u16, current: u16 },
    /// The batch leaves a gap after the next expected sequence.
    OutOfOrder { expected: i32, got: i32 },
    /// The batch is older than the remembered window: written long ago.
    Duplicate { expected: i32, got: i32 },
    /// The id was never handed out by this broker, or the epoch is ahead of
    /// the registry's.
    UnknownProducer { producer_id: u64, epoch: u16 },
    /// The id was a named producer's whose name was forgotten (expired
    /// unused) or moved to a new id (its epochs ran out): fenced
    /// like an older epoch.
    Forgotten { producer_id: u64 },
    /// More than [`WINDOW_BATCHES`] batches in flight for one partition.
    TooManyInFlight,
}

impl std::fmt::Display for SequenceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fenced { epoch, current } => write!(
                f,
                "producer epoch {epoch} is fenced by epoch {current}: another instance took over"
            ),
            Self::OutOfOrder { expected, got } => {
                write!(f, "sequence {got} out of order: expected {expected}")
            }
            Self::Duplicate { expected, got } => write!(
                f,
                "sequence {got} was written before the remembered window (next expected {expected})"
            ),
            Self::UnknownProducer { producer_id, epoch } => write!(
                f,
                "producer id {producer_id} epoch {epoch} was not issued by this broker"
            ),
            Self::Forgotten { producer_id } => write!(
                f,
                "producer id {producer_id} is fenced: its name was forgotten (unused past \
                 producers.name_expiry_ms, or a transactional id past \
                 transactions.id_expiration_ms) or moved to a new producer id (its epochs \
                 ran out); init the name again"
            ),
            Self::TooManyInFlight => write!(
                f,
                "more than {WINDOW_BATCHES} batches in flight for one producer and partition"
            ),
        }
    }
}

/// Why an init-producer request failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum InitError {
    /// Empty or longer than [`PRODUCER_NAME_BYTES_MAX`].
    InvalidName,
    /// The name was initialised 65536 times and its id is an older
    /// broker's, without [`NAMED_ID_BIT`]: its epoch cannot grow, and a new
    /// id for the name would leave the old one to pass for an anonymous
    /// producer's, unfenced.
    EpochExhausted,
    /// The registry file could not be written: nothing was handed out.
    Meta(MetaError),
}

impl InitError {
    /// The registry could not be written because the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Meta(MetaError::Io(io) | MetaError::Unsynced(io))
            if io.raw_os_error() == Some(libc::ENOSPC))
    }
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidName => {
                write!(f, "producer names are 1 to {PRODUCER_NAME_BYTES_MAX} bytes")
            }
            Self::EpochExhausted => f.write_str(
                "the producer name's epoch is exhausted (65536 inits) and its id, registered \
                 by an older broker, cannot be replaced with a new one; use another name",
            ),
            Self::Meta(e) => write!(f, "producer registry: {e}"),
        }
    }
}

impl std::error::Error for InitError {}

/// One written batch: its sequence range and where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenBatch {
    pub base_seq: i32,
    pub last_seq: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

/// A written batch's `(base_offset, last_offset)`, or why it failed.
pub type BatchOutcome = Result<(u64, u64), Arc<StorageError>>;

/// The outcome of an in-flight batch, shared with retries of it that
/// arrive before it is acknowledged.
#[derive(Debug, Default)]
pub struct Slot {
    result: Mutex<Option<BatchOutcome>>,
    done: event_listener::Event,
    /// Set before anyone listens: an `Event` allocates its list at the
    /// first notify, and nearly every slot is set with nobody waiting (an
    /// allocation per idempotent batch at a fan-in).
    watched: std::sync::atomic::AtomicBool,
}

impl Slot {
    fn set(&self, r: BatchOutcome) {
        *self.result.lock().expect("slot lock") = Some(r);
        // SeqCst pairs with `wait`'s store: either it sees the result, or
        // this sees `watched` and wakes its listener.
        if self.watched.load(Ordering::SeqCst) {
            self.done.notify(usize::MAX);
        }
    }

    /// Waits for the batch's acknowledgement: its offsets, or why it failed.
    pub async fn wait(&self) -> BatchOutcome {
        self.watched.store(true, Ordering::SeqCst);
        loop {
            let listener = self.done.listen();
            if let Some(r) = self.result.lock().expect("slot lock").clone() {
                return r;
            }
            listener.await;
        }
    }
}

#[derive(Debug, Clone)]
struct InFlight {
    base_seq: i32,
    last_seq: i32,
    /// The partition's high watermark when it was submitted: the batch's
    /// offset is at least this (snapshots use it, see `snapshot`).
    hw_at_submit: u64,
    slot: Arc<Slot>,
}

#[derive(Debug, Clone)]
struct Entry {
    epoch: u16,
    /// The newest [`WINDOW_BATCHES`] by sequence, in completion order.
    written: heapless::Vec<WrittenBatch, WINDOW_BATCHES>,
    /// In submit order.
    in_flight: heapless::Vec<InFlight, WINDOW_BATCHES>,
    /// The sequence the next new batch must start at. Explicit, because
    /// batches complete out of order: `written` is in completion order.
    next_seq: i32,
    last_active_ms: i64,
    /// Recovery skipped damaged data after this producer's last batch it
    /// found: batches of it may have been lost there, so its next batch
    /// may start past `next_seq` (docs/semantics.md, "Damaged data").
    after_damage: bool,
}

impl Entry {
    fn new(epoch: u16, now: i64) -> Self {
        Self {
            epoch,
            written: heapless::Vec::new(),
            in_flight: heapless::Vec::new(),
            next_seq: 0,
            last_active_ms: now,
            after_damage: false,
        }
    }

    /// Batches complete out of order (storage acks a sync group newest
    /// first), so a full window gives up its oldest batch by sequence, not
    /// the one completed first: the last [`WINDOW_BATCHES`] written stay
    /// findable for a retry. A batch older than all of a full window is
    /// not kept.
    fn remember(&mut self, b: WrittenBatch) {
        if self.written.iter().any(|w| w.base_seq == b.base_seq) {
            return;
        }
        if self.written.is_full() {
            let mut oldest = 0;
            for (i, w) in self.written.iter().enumerate() {
                if ahead_of(self.written[oldest].last_seq, w.last_seq) {
                    oldest = i;
                }
            }
            if ahead_of(self.written[oldest].last_seq, b.last_seq) {
                return;
            }
            self.written.remove(oldest);
        }
        self.written.push(b).expect("room was made");
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    topic: Arc<str>,
    partition: u32,
    producer_id: u64,
}

/// The most entries a full producer table evicts at once
/// (`Producers::make_room`).
const EVICT_AT_ONCE: usize = 16;

/// What to do with a batch, decided at submit.
#[derive(Debug)]
pub enum Check {
    /// Not an idempotent batch: write it, nothing to track.
    Untracked,
    /// Write it, then report the outcome with [`Producers::complete`].
    Accept(Ticket),
    /// Already written: answer these offsets and write nothing.
    Duplicate {
        base_offset: u64,
        last_offset: u64,
        records: u32,
    },
    /// The same batch is in flight: answer with its outcome.
    InFlight {
        slot: Arc<Slot>,
        records: u32,
    },
    Reject(SequenceError),
}

/// An accepted batch, to hand back with its outcome.
#[derive(Debug)]
pub struct Ticket {
    key: Key,
    epoch: u16,
    base_seq: i32,
    last_seq: i32,
    slot: Arc<Slot>,
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// Entries in the sequence table now.
    pub entries: u64,
    /// Entries dropped because the table was full (least recently active).
    pub evictions: u64,
    /// Entries dropped after `idle_expiry_ms` without a batch.
    pub expirations: u64,
    pub duplicate_batches: u64,
    pub duplicate_records: u64,
    pub fenced: u64,
    pub out_of_order: u64,
    /// Records dropped by message-id windows (filled in by the broker).
    pub msg_id_duplicates: u64,
}

#[derive(Debug, Default)]
struct Counters {
    evictions: AtomicU64,
    expirations: AtomicU64,
    duplicate_batches: AtomicU64,
    duplicate_records: AtomicU64,
    fenced: AtomicU64,
    out_of_order: AtomicU64,
    /// Snapshot file writes, failed ones included (each 2 to 4 flushes on
    /// an SD card).
    snapshots_written: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RegistryFile {
    /// Ids below this may have been handed out.
    reserved_until: u64,
    /// name → (id, current epoch).
    names: BTreeMap<String, (u64, u16)>,
    /// A plain name's id (see [`expirable`]) → when it was last known used
    /// (ms, the broker's clock). Last, so an older broker reads the file
    /// and ignores it; its own file lacks it ([`read_registry`]).
    used_ms: BTreeMap<u64, i64>,
}

/// The registry file before `used_ms`.
#[derive(Deserialize)]
struct RegistryFileV0 {
    reserved_until: u64,
    names: BTreeMap<String, (u64, u16)>,
}

/// Reads the registry, also as an older broker wrote it (postcard is not
/// self-describing: a missing last field fails to decode). Its plain
/// names are taken as used now.
fn read_registry(path: &Path, now: i64) -> Result<RegistryFile, MetaError> {
    let read = || match meta::read::<RegistryFile>(path) {
        Ok(f) => Ok(f.unwrap_or_default()),
        Err(e @ MetaError::Decode(_)) => match meta::read::<RegistryFileV0>(path) {
            Ok(Some(old)) => Ok(RegistryFile {
                reserved_until: old.reserved_until,
                names: old.names,
                used_ms: BTreeMap::new(),
            }),
            _ => Err(e),
        },
        Err(e) => Err(e),
    };
    let mut file = read().map_err(|error| MetaError::File {
        path: path.to_path_buf(),
        error: Box::new(error),
    })?;
    for (name, &(id, _)) in &file.names {
        if expirable(name, id) {
            file.used_ms.entry(id).or_insert(now);
        }
    }
    Ok(file)
}

/// Whether `name` (registered with `id`) expires unused: a plain name's.
/// A transactional id's is its coordinator's to forget, and an older
/// broker's id (without [`NAMED_ID_BIT`]) cannot be forgotten.
fn expirable(name: &str, id: u64) -> bool {
    id & NAMED_ID_BIT != 0 && !name.starts_with(TXN_NAME_PREFIX)
}

#[derive(Debug)]
struct Registry {
    file: RegistryFile,
    next_id: u64,
    /// When the last name sweep ran (ms).
    swept_ms: i64,
}

/// A partition's producer state as of an offset. The scan at start-up
/// resumes at `covers_to`: every idempotent batch below it is in `entries`
/// (or was evicted before the snapshot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    pub covers_to: u64,
    pub entries: Vec<SnapshotEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub producer_id: u64,
    pub epoch: u16,
    pub last_active_ms: i64,
    /// The sequence the next new batch must start at.
    pub next_seq: i32,
    pub written: Vec<WrittenBatch>,
}

/// Sizes from config.
#[derive(Debug, Clone, Copy)]
pub struct ProducersConfig {
    pub max_producers: usize,
    pub idle_expiry_ms: u64,
    /// A plain name unused this long is forgotten.
    pub name_expiry_ms: u64,
}

pub struct Producers {
    config: ProducersConfig,
    /// For idle expiry and eviction order.
    clock: Arc<dyn Clock>,
    registry_path: PathBuf,
    snapshot_dir: PathBuf,
    /// Serialises inits: allocate, persist, then answer.
    registry: smol::lock::Mutex<Registry>,
    /// For the produce path: ids below are known; named ids' epochs.
    reserved_until: AtomicU64,
    named_epochs: RwLock<foldhash::HashMap<u64, u16>>,
    table: Mutex<foldhash::HashMap<Key, Entry>>,
    /// Named ids whose entries left the table (evicted, expired) since the
    /// last name sweep, with their last activity: still a use of the name.
    /// At most one per name.
    left_table: Mutex<foldhash::HashMap<u64, i64>>,
    /// When a name sweep is next due (ms); `i64::MAX`: no plain names.
    sweep_due_ms: AtomicI64,
    /// Partitions written by idempotent producers since their last
    /// snapshot: the periodic task snapshots only these (SD card wear).
    dirty: Mutex<foldhash::HashSet<(Arc<str>, u32)>>,
    /// How far each partition's snapshot file covers, as last written or
    /// loaded. Held across a write: one writer of a file (and of its
    /// spare) at a time.
    on_disk: Mutex<foldhash::HashMap<(Arc<str>, u32), u64>>,
    counters: Counters,
}

impl std::fmt::Debug for Producers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producers")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Producers {
    /// Loads the registry. The table starts empty, and is filled from
    /// snapshots ([`Self::load_snapshot`]) and the log
    /// ([`Self::recover_batch`]).
    pub fn open(
        data_dir: &Path,
        config: ProducersConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, MetaError> {
        let registry_path = data_dir.join(REGISTRY_FILE);
        let now = clock.now_ms();
        let file = read_registry(&registry_path, now)?;
        let named = file.names.values().copied().collect();
        let max = config.max_producers.max(1);
        let sweep_due_ms = AtomicI64::new(Self::sweep_due(&config, &file, i64::MIN));
        Ok(Self {
            config: ProducersConfig {
                max_producers: max,
                ..config
            },
            clock,
            snapshot_dir: data_dir.join(SNAPSHOT_DIR),
            registry_path,
            reserved_until: AtomicU64::new(file.reserved_until),
            registry: smol::lock::Mutex::new(Registry {
                // Ids of the last reserved block may have been handed out
                // before a crash: start after it.
                next_id: file.reserved_until,
                file,
                swept_ms: i64::MIN,
            }),
            named_epochs: RwLock::new(named),
            // Allocated once at its full size: the table never grows.
            table: Mutex::new(foldhash::HashMap::with_capacity_and_hasher(
                max,
                Default::default(),
            )),
            left_table: Mutex::new(foldhash::HashMap::default()),
            sweep_due_ms,
            dirty: Mutex::new(foldhash::HashSet::default()),
            on_disk: Mutex::new(foldhash::HashMap::default()),
            counters: Counters::default(),
        })
    }

    /// Hands out a producer id and epoch. Anonymous: a fresh id, epoch 0.
    /// Named: the name's id with the next epoch, persisted before the
    /// answer, which fences every older instance. A name whose epoch is
    /// exhausted gets a new id at epoch 0 instead (as Kafka's KIP-360), and
    /// its old id is fenced for good as a forgotten name's. A named init
    /// also runs a name sweep that is due, in the same write.
    pub async fn init(&self, name: Option<&str>) -> Result<(u64, u16), InitError> {
        if name.is_some_and(|n| n.is_empty() || n.len() > PRODUCER_NAME_BYTES_MAX) {
            return Err(InitError::InvalidName);
        }
        let mut reg = self.registry.lock().await;
        let now = self.clock.now_ms();
        let swept = name.is_some() && self.fold_uses(&mut reg, now).is_some();
        let mut file = reg.file.clone();
        let gone = if swept {
            self.take_expired(&mut file, now)
        } else {
            Vec::new()
        };
        let mut next_id = reg.next_id;
        let mut retired = None;
        let answer = match name {
            Some(n) => match file.names.get(n).copied() {
                Some((id, epoch)) => match epoch.checked_add(1) {
                    Some(epoch) => {
                        file.names.insert(n.to_owned(), (id, epoch));
                        (id, epoch)
                    }
                    // Without the bit, the old id would pass for an
                    // anonymous producer's once the name left it.
                    None if id & NAMED_ID_BIT == 0 => {
                        if swept {
                            self.sweep_done(&reg, &[]);
                        }
                        return Err(InitError::EpochExhausted);
                    }
                    None => {
                        retired = Some(id);
                        let id = next_id | NAMED_ID_BIT;
                        next_id += 1;
                        file.names.insert(n.to_owned(), (id, 0));
                        (id, 0)
                    }
                },
                None => {
                    let id = next_id | NAMED_ID_BIT;
                    next_id += 1;
                    file.names.insert(n.to_owned(), (id, 0));
                    (id, 0)
                }
            },
            None => {
                let id = next_id;
                next_id += 1;
                (id, 0)
            }
        };
        if next_id > file.reserved_until {
            file.reserved_until = next_id - 1 + ID_BLOCK;
        }
        if let Some(n) = name {
            if let Some(old) = retired {
                file.used_ms.remove(&old);
            }
            if expirable(n, answer.0) {
                file.used_ms.insert(answer.0, now);
            }
        }
        let changed = name.is_some() || file.reserved_until != reg.file.reserved_until;
        if changed {
            if let Err(e) = self.persist(&file).await {
                if swept {
                    self.sweep_done(&reg, &[]);
                }
                return Err(e);
            }
        }
        self.reserved_until
            .store(file.reserved_until, Ordering::Release);
        if name.is_some() {
            let mut epochs = self.named_epochs.write().expect("named epochs lock");
            if let Some(old) = retired {
                epochs.remove(&old);
            }
            epochs.insert(answer.0, answer.1);
        }
        reg.file = file;
        reg.next_id = next_id;
        if name.is_some() {
            // Also when none was due: a first plain name makes one due.
            self.sweep_done(&reg, &gone);
        }
        Ok(answer)
    }

    /// Forgets the plain names unused for `name_expiry_ms` (their registry
    /// entries, persisted; their ids fenced for good, as [`Self::forget`]),
    /// if a sweep is due; otherwise a load and a comparison. Run by the
    /// producer snapshot timer. The names forgotten.
    pub async fn expire_names(&self) -> Result<usize, InitError> {
        if self.clock.now_ms() < self.sweep_due_ms.load(Ordering::Acquire) {
            return Ok(0);
        }
        let mut reg = self.registry.lock().await;
        let now = self.clock.now_ms();
        let Some(refreshed) = self.fold_uses(&mut reg, now) else {
            return Ok(0);
        };
        let mut file = reg.file.clone();
        let gone = self.take_expired(&mut file, now);
        // A stale name found in use is written too: after a restart its
        // use may be in no snapshot.
        if !gone.is_empty() || refreshed {
            if let Err(e) = self.persist(&file).await {
                self.sweep_done(&reg, &[]);
                return Err(e);
            }
        }
        reg.file = file;
        self.sweep_done(&reg, &gone);
        Ok(gone.len())
    }

    /// When a name sweep is next due: once the oldest plain name's last
    /// use is half the expiry old (so a name in use is written again well
    /// before it could expire), and not sooner than an eighth of the
    /// expiry (at most [`SWEEP_INTERVAL_MS_MAX`]) after the last sweep.
    fn sweep_due(config: &ProducersConfig, file: &RegistryFile, swept_ms: i64) -> i64 {
        let Some(&oldest) = file.used_ms.values().min() else {
            return i64::MAX;
        };
        let expiry = i64::try_from(config.name_expiry_ms).unwrap_or(i64::MAX);
        let interval = (expiry / 8).clamp(1, SWEEP_INTERVAL_MS_MAX);
        oldest
            .saturating_add(expiry / 2)
            .max(swept_ms.saturating_add(interval))
    }

    /// A due sweep's first half: folds the uses the table saw of the
    /// plain names into `reg.file` (in memory: the next write keeps them).
    /// None if no sweep is due; else whether a name half the expiry old
    /// was found used since.
    fn fold_uses(&self, reg: &mut Registry, now: i64) -> Option<bool> {
        if now < self.sweep_due_ms.load(Ordering::Acquire) {
            return None;
        }
        reg.swept_ms = now;
        let stale =
            now.saturating_sub(i64::try_from(self.config.name_expiry_ms / 2).unwrap_or(i64::MAX));
        let used = &mut reg.file.used_ms;
        let mut refreshed = false;
        let mut note = |id: u64, t: i64| {
            if let Some(u) = used.get_mut(&id) {
                refreshed |= *u <= stale && t > *u;
                *u = (*u).max(t);
            }
        };
        // The table first: an entry that leaves it after this scan is in
        // `left_table` by the time that is drained.
        for (k, e) in self.table.lock().expect("producer table lock").iter() {
            if k.producer_id & NAMED_ID_BIT != 0 {
                note(
                    k.producer_id,
                    if e.in_flight.is_empty() {
                        e.last_active_ms
                    } else {
                        now
                    },
                );
            }
        }
        let left: Vec<(u64, i64)> = self
            .left_table
            .lock()
            .expect("left table lock")
            .drain()
            .collect();
        for (id, t) in left {
            note(id, t);
        }
        Some(refreshed)
    }

    /// A due sweep's second half: takes the plain names unused for the
    /// expiry out of `file`.
    fn take_expired(&self, file: &mut RegistryFile, now: i64) -> Vec<(String, u64)> {
        let expiry = i64::try_from(self.config.name_expiry_ms).unwrap_or(i64::MAX);
        let mut gone = Vec::new();
        for (n, &(id, _)) in &file.names {
            let unused = file
                .used_ms
                .get(&id)
                .is_some_and(|&t| now.saturating_sub(t) > expiry);
            if unused && expirable(n, id) {
                gone.push((n.clone(), id));
            }
        }
        for (n, id) in &gone {
            file.names.remove(n);
            file.used_ms.remove(id);
        }
        gone
    }

    /// After a sweep (`gone` persisted as forgotten): fences their ids and
    /// sets when the next is due.
    fn sweep_done(&self, reg: &Registry, gone: &[(String, u64)]) {
        if !gone.is_empty() {
            let mut epochs = self.named_epochs.write().expect("named epochs lock");
            for (n, id) in gone {
                epochs.remove(id);
                log::debug!("producer name {n} (id {id}): forgotten, unused");
            }
            log::info!(
                "forgot {} producer name(s) unused for {} ms (producers.name_expiry_ms)",
                gone.len(),
                self.config.name_expiry_ms
            );
        }
        self.sweep_due_ms.store(
            Self::sweep_due(&self.config, &reg.file, reg.swept_ms),
            Ordering::Release,
        );
    }

    /// Keeps the last activity of a named id whose entry leaves the table,
    /// for the next name sweep.
    fn note_left(&self, id: u64, e: &Entry) {
        if id & NAMED_ID_BIT != 0 {
            let mut left = self.left_table.lock().expect("left table lock");
            let t = left.entry(id).or_insert(e.last_active_ms);
            *t = (*t).max(e.last_active_ms);
        }
    }

    /// Forgets `name` (its registry entry, persisted), fencing its id for
    /// good: whether it is gone, or was never there. A name registered
    /// before ids said they are named is kept (false): its id would pass
    /// for an anonymous producer's.
    pub async fn forget(&self, name: &str) -> Result<bool, InitError> {
        let mut reg = self.registry.lock().await;
        let Some(&(id, _)) = reg.file.names.get(name) else {
            return Ok(true);
        };
        if id & NAMED_ID_BIT == 0 {
            return Ok(false);
        }
        let mut file = reg.file.clone();
        file.names.remove(name);
        file.used_ms.remove(&id);
        self.persist(&file).await?;
        self.named_epochs
            .write()
            .expect("named epochs lock")
            .remove(&id);
        reg.file = file;
        Ok(true)
    }

    /// Writes the registry file (durably, off the executor). One whose
    /// directory sync alone failed is in place, so it counts as written.
    async fn persist(&self, file: &RegistryFile) -> Result<(), InitError> {
        let path = self.registry_path.clone();
        let to_write = file.clone();
        let written = crate::offload::run(move || meta::write_atomic(&path, &to_write)).await;
        super::unsynced_is_written(&self.registry_path, written).map_err(InitError::Meta)
    }

    /// The id and epoch the registry holds for `name`.
    pub async fn named(&self, name: &str) -> Option<(u64, u16)> {
        self.registry.lock().await.file.names.get(name).copied()
    }

    /// Whether `id` is a named id this broker handed out whose name left
    /// it (forgotten, or moved to a new id when its epochs ran out): fenced
    /// at any epoch, as its batches are ([`SequenceError::Forgotten`]).
    pub fn is_forgotten(&self, id: u64) -> bool {
        id & NAMED_ID_BIT != 0
            && id & !NAMED_ID_BIT < self.reserved_until.load(Ordering::Acquire)
            && !self
                .named_epochs
                .read()
                .expect("named epochs lock")
                .contains_key(&id)
    }

    /// The next epoch of the anonymous producer `id` at `epoch`, after a
    /// batch it gave up on (its requests of `epoch` still on their way are
    /// then fenced per partition, by the first batch of the new epoch).
    /// Nothing is written: an anonymous id's epoch lives in its batches.
    /// A named id, an id this broker never handed out, or an exhausted
    /// epoch gets a fresh id instead, as `init(None)` does.
    pub async fn renew(&self, id: u64, epoch: u16) -> Result<(u64, u16), InitError> {
        let known = id < self.reserved_until.load(Ordering::Acquire)
            && id & NAMED_ID_BIT == 0
            && !self
                .named_epochs
                .read()
                .expect("named epochs lock")
                .contains_key(&id);
        match epoch.checked_add(1) {
            Some(next) if known => Ok((id, next)),
            _ => self.init(None).await,
        }
    }

    /// Decides what to do with a batch about to be submitted to `topic`
    /// `partition` whose high watermark is `hw`. Call in submit order, and
    /// submit an accepted batch before checking the next one of the same
    /// partition. The broker passes its partition id's `Arc`, which the
    /// table's key shares: no allocation per record.
    pub fn check(
        &self,
        topic: impl Into<Arc<str>>,
        partition: u32,
        h: &BatchHeader,
        hw: u64,
    ) -> Check {
        if h.producer_id == NO_PRODUCER_ID {
            return Check::Untracked;
        }
        let r = self.check_inner(topic.into(), partition, h, hw);
        match &r {
            Check::Reject(SequenceError::Fenced { .. }) => bump(&self.counters.fenced, 1),
            Check::Reject(SequenceError::OutOfOrder { .. }) => bump(&self.counters.out_of_order, 1),
            Check::Duplicate { records, .. } => {
                bump(&self.counters.duplicate_batches, 1);
                bump(&self.counters.duplicate_records, u64::from(*records));
            }
            _ => {}
        }
        r
    }

    fn check_inner(&self, topic: Arc<str>, partition: u32, h: &BatchHeader, hw: u64) -> Check {
        let (id, epoch) = (h.producer_id, h.producer_epoch);
        if id & !NAMED_ID_BIT >= self.reserved_until.load(Ordering::Acquire) {
            return Check::Reject(SequenceError::UnknownProducer {
                producer_id: id,
                epoch,
            });
        }
        // A named id's epochs are the registry's. An anonymous id renews
        // its epoch without it (`renew`): the table orders its epochs per
        // partition.
        let registered = self
            .named_epochs
            .read()
            .expect("named epochs lock")
            .get(&id)
            .copied();
        if let Some(registered) = registered {
            if epoch < registered {
                return Check::Reject(SequenceError::Fenced {
                    epoch,
                    current: registered,
                });
            }
            if epoch > registered {
                return Check::Reject(SequenceError::UnknownProducer {
                    producer_id: id,
                    epoch,
                });
            }
        } else if id & NAMED_ID_BIT != 0 {
            return Check::Reject(SequenceError::Forgotten { producer_id: id });
        }
        let base_seq = h.base_sequence;
        let last_seq = h.last_sequence();
        let now = self.clock.now_ms();
        let key = Key {
            topic,
            partition,
            producer_id: id,
        };
        let topic = &key.topic;
        let mut table = self.table.lock().expect("producer table lock");
        let entry = match table.get_mut(&key) {
            Some(e) if self.expired(e, now) => {
                self.note_left(id, e);
                table.remove(&key);
                bump(&self.counters.expirations, 1);
                None
            }
            Some(_) => table.get_mut(&key),
            None => None,
        };
        let slot = Arc::new(Slot::default());
        let in_flight = InFlight {
            base_seq,
            last_seq,
            hw_at_submit: hw,
            slot: slot.clone(),
        };
        let ticket = |key: Key| Ticket {
            key,
            epoch,
            base_seq,
            last_seq,
            slot: slot.clone(),
        };
        let Some(entry) = entry else {
            if base_seq != 0 {
                // Evicted, expired, or its batches left the log: accepted,
                // as Kafka (2.5+) does for an unknown producer.
                log::debug!(
                    "{topic}/{partition}: unknown producer {id} starts at sequence {base_seq}"
                );
            }
            self.make_room(&mut table, now);
            let mut e = Entry::new(epoch, now);
            e.in_flight.push(in_flight).expect("empty");
            e.next_seq = next_seq(last_seq);
            table.insert(key.clone(), e);
            return Check::Accept(ticket(key));
        };
        if epoch < entry.epoch {
            return Check::Reject(SequenceError::Fenced {
                epoch,
                current: entry.epoch,
            });
        }
        if epoch > entry.epoch {
            // A new instance of a named producer starts over at 0.
            if base_seq != 0 {
                return Check::Reject(SequenceError::OutOfOrder {
                    expected: 0,
                    got: base_seq,
                });
            }
            *entry = Entry::new(epoch, now);
            entry.in_flight.push(in_flight).expect("empty");
            entry.next_seq = next_seq(last_seq);
            return Check::Accept(ticket(key));
        }
        entry.last_active_ms = now;
        let records = h.record_count;
        if let Some(w) = entry.written.iter().find(|w| w.last_seq == last_seq) {
            // Matched by the last sequence: a batch re-encoded by the
            // message-id window is logged with a later base sequence.
            return Check::Duplicate {
                base_offset: w.base_offset,
                last_offset: w.last_offset,
                records,
            };
        }
        if let Some(f) = entry.in_flight.iter().find(|f| f.last_seq == last_seq) {
            return Check::InFlight {
                slot: f.slot.clone(),
                records,
            };
        }
        let expected = entry.next_seq;
        if base_seq != expected {
            // Ahead of the expected sequence (a gap) or behind it (written
            // before the window), told apart on the wrapping circle.
            let ahead = (i64::from(base_seq) - i64::from(expected)).rem_euclid(SEQ_SPACE);
            if ahead < SEQ_SPACE / 2 && entry.after_damage && entry.in_flight.is_empty() {
                // Its batches in between were in a damaged range that
                // recovery skipped: the producer goes on from here.
                log::info!(
                    "{topic}/{partition}: producer {id} resumes at sequence {base_seq} \
                     after damaged data (expected {expected})"
                );
                entry.after_damage = false;
                entry.in_flight.push(in_flight).expect("empty");
                entry.next_seq = next_seq(last_seq);
                return Check::Accept(ticket(key));
            }
            return Check::Reject(if ahead < SEQ_SPACE / 2 {
                SequenceError::OutOfOrder {
                    expected,
                    got: base_seq,
                }
            } else {
                SequenceError::Duplicate {
                    expected,
                    got: base_seq,
                }
            });
        }
        if entry.in_flight.push(in_flight).is_err() {
            return Check::Reject(SequenceError::TooManyInFlight);
        }
        entry.after_damage = false;
        entry.next_seq = next_seq(last_seq);
        Check::Accept(ticket(key))
    }

    fn expired(&self, e: &Entry, now: i64) -> bool {
        e.in_flight.is_empty()
            && now.saturating_sub(e.last_active_ms) > self.config.idle_expiry_ms as i64
    }

    /// Makes room for one more entry: drops expired entries, else evicts
    /// the least recently active ones, up to [`EVICT_AT_ONCE`] (a
    /// sixty-fourth of the table, at least one), idle ones first. A linear
    /// scan, but only when the table is full, and then once per that many
    /// new entries: 10,000 devices cycling through a 1,024-entry table
    /// scanned it for every record, 16% of the broker's CPU.
    fn make_room(&self, table: &mut foldhash::HashMap<Key, Entry>, now: i64) {
        if table.len() < self.config.max_producers {
            return;
        }
        let before = table.len();
        table.retain(|k, e| {
            let keep = !self.expired(e, now);
            if !keep {
                self.note_left(k.producer_id, e);
            }
            keep
        });
        let expired = before - table.len();
        if expired > 0 {
            bump(&self.counters.expirations, expired as u64);
            return;
        }
        let want = (self.config.max_producers / 64).clamp(1, EVICT_AT_ONCE);
        // The `want` least recently active, newest of them on top.
        let oldest = |idle_only: bool| {
            let mut heap = std::collections::BinaryHeap::with_capacity(want + 1);
            for (k, e) in table.iter() {
                if idle_only && !e.in_flight.is_empty() {
                    continue;
                }
                if heap.len() < want {
                    heap.push((e.last_active_ms, k.clone()));
                } else if heap.peek().is_some_and(|(t, _)| e.last_active_ms < *t) {
                    heap.pop();
                    heap.push((e.last_active_ms, k.clone()));
                }
            }
            heap
        };
        let mut victims = oldest(true);
        if victims.is_empty() {
            victims = oldest(false);
        }
        for (_, k) in victims {
            log::debug!(
                "producer table full ({}): evicting producer {} on {}/{}",
                self.config.max_producers,
                k.producer_id,
                k.topic,
                k.partition
            );
            if let Some(e) = table.remove(&k) {
                self.note_left(k.producer_id, &e);
            }
            bump(&self.counters.evictions, 1);
        }
    }

    /// Records an accepted batch's outcome and wakes retries waiting on it.
    pub fn complete(&self, t: Ticket, result: BatchOutcome) {
        {
            let mut table = self.table.lock().expect("producer table lock");
            if let Some(e) = table.get_mut(&t.key) {
                if e.epoch == t.epoch {
                    let at = e
                        .in_flight
                        .iter()
                        .position(|f| Arc::ptr_eq(&f.slot, &t.slot));
                    match (&result, at) {
                        (Ok(_), Some(i)) => {
                            e.in_flight.remove(i);
                        }
                        // It and every later in-flight batch leave the
                        // expected sequence: the retry comes next.
                        (Err(_), Some(i)) => {
                            e.in_flight.truncate(i);
                            e.next_seq = t.base_seq;
                        }
                        (Ok(_), None) => {
                            if ahead_of(next_seq(t.last_seq), e.next_seq) {
                                e.next_seq = next_seq(t.last_seq);
                            }
                            log::warn!(
                                "{}/{}: producer {} sequence {} was written after an earlier \
                             batch of it failed; its retry will follow it",
                                t.key.topic,
                                t.key.partition,
                                t.key.producer_id,
                                t.base_seq
                            );
                        }
                        (Err(_), None) => {}
                    }
                    if let Ok((base_offset, last_offset)) = &result {
                        let (base_offset, last_offset) = (*base_offset, *last_offset);
                        e.remember(WrittenBatch {
                            base_seq: t.base_seq,
                            last_seq: t.last_seq,
                            base_offset,
                            last_offset,
                        });
                    }
                }
            } else if let Ok((base_offset, last_offset)) = &result {
                let (base_offset, last_offset) = (*base_offset, *last_offset);
                // Evicted while in flight: it is in the log, so it is the
                // producer's latest state.
                let now = self.clock.now_ms();
                self.make_room(&mut table, now);
                let mut e = Entry::new(t.epoch, now);
                e.next_seq = next_seq(t.last_seq);
                e.remember(WrittenBatch {
                    base_seq: t.base_seq,
                    last_seq: t.last_seq,
                    base_offset,
                    last_offset,
                });
                table.insert(t.key.clone(), e);
            }
        }
        if result.is_ok() {
            self.dirty
                .lock()
                .expect("dirty set lock")
                .insert((t.key.topic.clone(), t.key.partition));
        }
        t.slot.set(result);
    }

    /// Takes the partitions changed since the last call.
    pub fn take_dirty(&self) -> Vec<(String, u32)> {
        self.dirty
            .lock()
            .expect("dirty set lock")
            .drain()
            .map(|(t, p)| (t.to_string(), p))
            .collect()
    }

    /// Applies one batch found in the log at recovery (in log order).
    /// After the producer table is rebuilt: recovery skipped damaged data
    /// in `partition` up to offset `before`. A producer whose last batch
    /// found lies below it may have lost batches there, so its next
    /// sequence is no longer known exactly: its next batch may start
    /// ahead (a retry of an older one is still a duplicate).
    pub fn note_damage(&self, topic: &str, partition: u32, before: u64) {
        let mut table = self.table.lock().expect("producer table lock");
        for (k, e) in table.iter_mut() {
            if k.partition == partition
                && &*k.topic == topic
                && e.written.iter().all(|w| w.last_offset < before)
            {
                e.after_damage = true;
            }
        }
    }

    pub fn recover_batch(&self, topic: &str, partition: u32, h: &BatchHeader) {
        if h.producer_id == NO_PRODUCER_ID {
            return;
        }
        let key = Key {
            topic: topic.into(),
            partition,
            producer_id: h.producer_id,
        };
        // Active now, not at the batch's timestamp: that is the producer's
        // clock (a device sending what it buffered may stamp records days
        // old), and an entry expired at start-up would take the retry of a
        // batch written just before a crash for a new one, writing it twice.
        let now = self.clock.now_ms();
        let active = now;
        let written = WrittenBatch {
            base_seq: h.base_sequence,
            last_seq: h.last_sequence(),
            base_offset: h.base_offset,
            last_offset: h.last_offset(),
        };
        let mut table = self.table.lock().expect("producer table lock");
        match table.get_mut(&key) {
            Some(e) if h.producer_epoch < e.epoch => {}
            Some(e) => {
                if h.producer_epoch > e.epoch {
                    *e = Entry::new(h.producer_epoch, active);
                }
                e.last_active_ms = e.last_active_ms.max(active);
                e.remember(written);
                e.next_seq = next_seq(written.last_seq);
            }
            None => {
                self.make_room(&mut table, now);
                let mut e = Entry::new(h.producer_epoch, active);
                e.remember(written);
                e.next_seq = next_seq(written.last_seq);
                table.insert(key, e);
            }
        }
    }

    pub(super) fn snapshot_path(&self, topic: &str, partition: u32) -> PathBuf {
        self.snapshot_dir.join(format!("{topic}-{partition}.snap"))
    }

    /// Loads a partition's snapshot into the table and returns the offset
    /// the log scan resumes at: `covers_to` when the snapshot fits the log
    /// (`earliest..=hw`), else `earliest` (with a warning).
    pub fn load_snapshot(&self, topic: &str, partition: u32, earliest: u64, hw: u64) -> u64 {
        let path = self.snapshot_path(topic, partition);
        let snap: PartitionSnapshot = match meta::read(&path) {
            Ok(Some(s)) => s,
            Ok(None) => return earliest,
            Err(e) => {
                log::warn!(
                    "{topic}/{partition}: ignoring producer snapshot {}: {e}; scanning the log",
                    path.display()
                );
                return earliest;
            }
        };
        if snap.covers_to > hw {
            log::warn!(
                "{topic}/{partition}: producer snapshot covers to offset {} beyond the log's \
                 end {hw}; ignoring it and scanning the log",
                snap.covers_to
            );
            return earliest;
        }
        let now = self.clock.now_ms();
        let mut table = self.table.lock().expect("producer table lock");
        for s in snap.entries {
            let key = Key {
                topic: topic.into(),
                partition,
                producer_id: s.producer_id,
            };
            self.make_room(&mut table, now);
            let mut e = Entry::new(s.epoch, s.last_active_ms);
            e.next_seq = s.next_seq;
            for w in s.written.into_iter().rev().take(WINDOW_BATCHES).rev() {
                e.remember(w);
            }
            table.insert(key, e);
        }
        drop(table);
        self.on_disk_lock()
            .insert((topic.into(), partition), snap.covers_to);
        snap.covers_to.max(earliest)
    }

    fn on_disk_lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<(Arc<str>, u32), u64>> {
        self.on_disk.lock().expect("snapshot files lock")
    }

    /// Writes a partition's snapshot. `hw` is the high watermark read
    /// before this call: every batch below it was acknowledged, and an
    /// acknowledged batch is in the table unless it is still in flight, in
    /// which case its offset is at least its `hw_at_submit`. So the
    /// snapshot covers up to the smaller of the two, which it returns.
    pub fn snapshot(&self, topic: &str, partition: u32, hw: u64) -> Result<u64, MetaError> {
        let mut on_disk = self.on_disk_lock();
        self.write_snapshot(&mut on_disk, topic, partition, hw)
    }

    /// A snapshot for a compaction, which may merge only closed segments
    /// (ending at `closed_ends`) below what the snapshot on disk covers.
    /// Written only when it lets more of them merge than the one on disk
    /// does; else that one's cover is returned, nothing written. A pass
    /// held back by batches in flight comes back every 200 ms, and would
    /// otherwise write the same snapshot each time (2 to 4 flushes on an
    /// SD card).
    pub fn snapshot_for_compaction(
        &self,
        topic: &str,
        partition: u32,
        hw: u64,
        closed_ends: &[u64],
    ) -> Result<u64, MetaError> {
        let mut on_disk = self.on_disk_lock();
        if let Some(&have) = on_disk.get(&(Arc::<str>::from(topic), partition)) {
            let would = self.snapshot_would_cover(topic, partition, hw);
            if !closed_ends.iter().any(|&e| have < e && e <= would) {
                return Ok(have);
            }
        }
        self.write_snapshot(&mut on_disk, topic, partition, hw)
    }

    /// Snapshot file writes since start-up, failed ones included.
    pub fn snapshots_written(&self) -> u64 {
        self.counters.snapshots_written.load(Ordering::Relaxed)
    }

    fn write_snapshot(
        &self,
        on_disk: &mut foldhash::HashMap<(Arc<str>, u32), u64>,
        topic: &str,
        partition: u32,
        hw: u64,
    ) -> Result<u64, MetaError> {
        let snap = {
            let table = self.table.lock().expect("producer table lock");
            let covers_to = Self::covers_to(&table, topic, partition, hw);
            let mut entries = Vec::new();
            for (k, e) in table.iter() {
                if &*k.topic != topic || k.partition != partition {
                    continue;
                }
                entries.push(SnapshotEntry {
                    producer_id: k.producer_id,
                    epoch: e.epoch,
                    last_active_ms: e.last_active_ms,
                    // In-flight batches are not covered (see covers_to):
                    // the scan re-applies them if they were written.
                    next_seq: e.in_flight.first().map_or(e.next_seq, |f| f.base_seq),
                    written: e.written.iter().copied().collect(),
                });
            }
            PartitionSnapshot { covers_to, entries }
        };
        std::fs::create_dir_all(&self.snapshot_dir).map_err(MetaError::Io)?;
        let key = (Arc::<str>::from(topic), partition);
        // Written in room kept from the last write: a compaction on a full
        // disk writes one before it frees anything.
        let written = meta::write_atomic_reserved(&self.snapshot_path(topic, partition), &snap);
        bump(&self.counters.snapshots_written, 1);
        match written {
            Ok(()) => {
                on_disk.insert(key, snap.covers_to);
                Ok(snap.covers_to)
            }
            // The file may hold either content now.
            Err(e @ MetaError::Unsynced(_)) => {
                on_disk.remove(&key);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// How far a snapshot taken now with high watermark `hw` would cover
    /// (see [`Producers::snapshot`]), without writing one.
    pub fn snapshot_would_cover(&self, topic: &str, partition: u32, hw: u64) -> u64 {
        let table = self.table.lock().expect("producer table lock");
        Self::covers_to(&table, topic, partition, hw)
    }

    fn covers_to(
        table: &foldhash::HashMap<Key, Entry>,
        topic: &str,
        partition: u32,
        hw: u64,
    ) -> u64 {
        table
            .iter()
            .filter(|(k, _)| &*k.topic == topic && k.partition == partition)
            .flat_map(|(_, e)| e.in_flight.iter().map(|f| f.hw_at_submit))
            .fold(hw, u64::min)
    }

    /// Forgets a deleted partition: its entries and its snapshot file.
    pub fn forget_partition(&self, topic: &str, partition: u32) {
        self.table
            .lock()
            .expect("producer table lock")
            .retain(|k, e| {
                let keep = !(&*k.topic == topic && k.partition == partition);
                if !keep {
                    self.note_left(k.producer_id, e);
                }
                keep
            });
        let mut on_disk = self.on_disk_lock();
        on_disk.remove(&(Arc::<str>::from(topic), partition));
        let path = self.snapshot_path(topic, partition);
        for path in [meta::spare_path(&path), path] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot delete {}: {e}", path.display()),
            }
        }
    }

    pub fn stats(&self) -> ProducerStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        ProducerStats {
            entries: self.table.lock().expect("producer table lock").len() as u64,
            evictions: g(&c.evictions),
            expirations: g(&c.expirations),
            duplicate_batches: g(&c.duplicate_batches),
            duplicate_records: g(&c.duplicate_records),
            fenced: g(&c.fenced),
            out_of_order: g(&c.out_of_order),
            msg_id_duplicates: 0,
        }
    }
}

/// Sets `name`'s epoch in the registry under `data_dir`, as a name
/// initialised that many times has it (with its broker stopped).
#[cfg(test)]
pub(crate) fn set_epoch_on_disk(data_dir: &Path, name: &str, epoch: u16) {
    let path = data_dir.join(REGISTRY_FILE);
    let mut file: RegistryFile = meta::read_file(&path)
        .expect("registry reads")
        .expect("registry written");
    file.names.get_mut(name).expect("name registered").1 = epoch;
    meta::write_atomic(&path, &file).expect("registry writes");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{parse_header, BatchBuilder, ProducerStamp};

    fn table(max: usize) -> (tempfile::TempDir, Producers) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = reopen(dir.path(), max);
        (dir, p)
    }

    fn reopen(dir: &Path, max: usize) -> Producers {
        let config = ProducersConfig {
            max_producers: max,
            idle_expiry_ms: 60_000,
            name_expiry_ms: 604_800_000,
        };
        Producers::open(dir, config, Arc::new(crate::broker::SystemClock)).expect("open")
    }

    fn header(id: u64, epoch: u16, seq: i32, records: u32) -> BatchHeader {
        let mut b = BatchBuilder::new();
        for _ in 0..records {
            b.push(1, None, b"v", &[]);
        }
        let bytes = b.finish(ProducerStamp {
            producer_id: id,
            producer_epoch: epoch,
            base_sequence: seq,
        });
        parse_header(&bytes).expect("header")
    }

    fn accept(p: &Producers, h: &BatchHeader) -> Ticket {
        match p.check("t", 0, h, 0) {
            Check::Accept(t) => t,
            other => panic!("expected accept, got {other:?}"),
        }
    }

    #[test]
    fn window_matches_the_client_constant() {
        assert_eq!(WINDOW_BATCHES, crate::client::IDEMPOTENT_IN_FLIGHT_MAX);
    }

    #[test]
    fn an_anonymous_renewal_fences_the_old_epoch_where_the_new_one_wrote() {
        let (_d, p) = table(8);
        let id = smol::block_on(p.init(None)).expect("init").0;
        for partition in [0, 1] {
            match p.check("t", partition, &header(id, 0, 0, 2), 0) {
                Check::Accept(t) => p.complete(t, Ok((0, 1))),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(smol::block_on(p.renew(id, 0)).expect("renew"), (id, 1));
        // Partition 0 sees the new epoch first: a late batch of the old
        // one is fenced there.
        let t = accept(&p, &header(id, 1, 0, 1));
        p.complete(t, Ok((2, 2)));
        assert!(matches!(
            p.check("t", 0, &header(id, 0, 2, 1), 0),
            Check::Reject(SequenceError::Fenced {
                epoch: 0,
                current: 1
            })
        ));
        // Partition 1 sees the late batch first: written, before the new
        // epoch's first batch, which is written after it.
        match p.check("t", 1, &header(id, 0, 2, 1), 2) {
            Check::Accept(t) => p.complete(t, Ok((2, 2))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p.check("t", 1, &header(id, 1, 0, 1), 3),
            Check::Accept(_)
        ));
    }

    #[test]
    fn renewing_what_is_no_anonymous_producer_hands_out_a_fresh_id() {
        let (_d, p) = table(8);
        let named = smol::block_on(p.init(Some("gw"))).expect("init").0;
        let anonymous = smol::block_on(p.init(None)).expect("init").0;
        for (id, epoch) in [(named, 0), (anonymous + 5000, 0), (anonymous, u16::MAX)] {
            let (fresh, e) = smol::block_on(p.renew(id, epoch)).expect("renew");
            assert!(fresh > anonymous && e == 0, "{id}/{epoch}: {fresh}/{e}");
        }
    }

    #[test]
    fn sequences_wrap_after_i32_max() {
        let (_d, p) = table(8);
        let id = smol::block_on(p.init(None)).expect("init").0;
        let t = accept(&p, &header(id, 0, i32::MAX - 1, 2));
        p.complete(t, Ok((0, 1)));
        let t = accept(&p, &header(id, 0, 0, 1));
        p.complete(t, Ok((2, 2)));
        assert!(matches!(
            p.check("t", 0, &header(id, 0, i32::MAX - 1, 2), 0),
            Check::Duplicate { base_offset: 0, .. }
        ));
    }

    #[test]
    fn the_window_keeps_the_newest_batches_when_they_complete_newest_first() {
        let (_d, p) = table(8);
        let id = smol::block_on(p.init(None)).expect("init").0;
        // Sync groups of WINDOW_BATCHES batches, then of 2, each acked
        // newest first (as storage acks a group).
        let n = WINDOW_BATCHES as i32;
        for (from, to) in [(0, n), (n, n + 2)] {
            let tickets: Vec<(i32, Ticket)> = (from..to)
                .map(|i| (i, accept(&p, &header(id, 0, i * 10, 10))))
                .collect();
            for (i, t) in tickets.into_iter().rev() {
                let base = i as u64 * 10;
                p.complete(t, Ok((base, base + 9)));
            }
        }
        for i in 2..n + 2 {
            let base = i as u64 * 10;
            assert!(
                matches!(
                    p.check("t", 0, &header(id, 0, i * 10, 10), 0),
                    Check::Duplicate { base_offset, .. } if base_offset == base
                ),
                "batch {i}, one of the newest {n}, is found"
            );
        }
        assert!(matches!(
            p.check("t", 0, &header(id, 0, 10, 10), 0),
            Check::Reject(SequenceError::Duplicate { .. })
        ));
    }

    #[test]
    fn a_retry_waiting_on_its_batch_in_flight_gets_the_outcome() {
        let (_d, p) = table(8);
        let id = smol::block_on(p.init(None)).expect("init").0;
        let t = accept(&p, &header(id, 0, 0, 2));
        let Check::InFlight { slot, .. } = p.check("t", 0, &header(id, 0, 0, 2), 0) else {
            panic!("a retry of a batch in flight waits for it");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(smol::block_on(slot.wait())));
        // Listening by now, as a retry that arrived first would be.
        std::thread::sleep(std::time::Duration::from_millis(50));
        p.complete(t, Ok((0, 1)));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("woken by the outcome");
        assert!(matches!(got, Ok((0, 1))), "{got:?}");
    }

    #[test]
    fn a_failed_batch_rolls_back_the_expected_sequence() {
        let (_d, p) = table(8);
        let id = smol::block_on(p.init(None)).expect("init").0;
        let a = accept(&p, &header(id, 0, 0, 2));
        let b = accept(&p, &header(id, 0, 2, 2));
        // A retry of `b` while it is in flight waits for it.
        assert!(matches!(
            p.check("t", 0, &header(id, 0, 2, 2), 0),
            Check::InFlight { .. }
        ));
        p.complete(a, Err(Arc::new(StorageError::ShuttingDown)));
        // `a` and everything after it left the expected sequence.
        assert!(matches!(
            p.check("t", 0, &header(id, 0, 4, 1), 0),
            Check::Reject(SequenceError::OutOfOrder { expected: 0, .. })
        ));
        p.complete(b, Err(Arc::new(StorageError::ShuttingDown)));
        let a = accept(&p, &header(id, 0, 0, 2));
        p.complete(a, Ok((0, 1)));
        let b = accept(&p, &header(id, 0, 2, 2));
        p.complete(b, Ok((2, 3)));
    }

    #[test]
    fn snapshot_round_trips_and_a_bad_one_is_ignored() {
        let (d, p) = table(8);
        let id = smol::block_on(p.init(None)).expect("init").0;
        let t = accept(&p, &header(id, 0, 0, 3));
        p.complete(t, Ok((0, 2)));
        p.snapshot("t", 0, 3).expect("snapshot");
        let q = reopen(d.path(), 8);
        assert_eq!(q.load_snapshot("t", 0, 0, 3), 3);
        assert!(matches!(
            q.check("t", 0, &header(id, 0, 0, 3), 3),
            Check::Duplicate {
                base_offset: 0,
                last_offset: 2,
                ..
            }
        ));
        // Beyond the log's end: ignored, scan from the start.
        assert_eq!(q.load_snapshot("t", 0, 0, 2), 0);
        std::fs::write(q.snapshot_path("t", 0), b"garbage").expect("write");
        assert_eq!(q.load_snapshot("t", 0, 0, 3), 0);
    }

    /// A table on a manual clock (from 1,000 ms) with `n` producer ids
    /// handed out.
    fn table_with_ids(
        max_producers: usize,
        idle_expiry_ms: u64,
        n: usize,
    ) -> (
        tempfile::TempDir,
        Arc<crate::broker::ManualClock>,
        Producers,
        Vec<u64>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(crate::broker::ManualClock::new(1_000));
        let p = Producers::open(
            dir.path(),
            ProducersConfig {
                max_producers,
                idle_expiry_ms,
                name_expiry_ms: 604_800_000,
            },
            clock.clone(),
        )
        .expect("open");
        let ids = (0..n)
            .map(|_| smol::block_on(p.init(None)).expect("init").0)
            .collect();
        (dir, clock, p, ids)
    }

    /// A full table of 128 evicts its two least recently active entries
    /// at once (a sixty-fourth), so the next new producer fits without
    /// another scan; the ones still known keep their sequence checks.
    #[test]
    fn a_full_table_evicts_its_least_recent_sixty_fourth_at_once() {
        let (_dir, clock, p, ids) = table_with_ids(128, 3_600_000, 130);
        let mut offset = 0;
        let mut write = |id: u64, seq: i32| {
            let t = accept(&p, &header(id, 0, seq, 1));
            p.complete(t, Ok((offset, offset)));
            offset += 1;
            clock.advance_ms(1);
        };
        for &id in &ids[..128] {
            write(id, 0);
        }
        assert_eq!((p.stats().entries, p.stats().evictions), (128, 0));
        write(ids[128], 0);
        assert_eq!((p.stats().entries, p.stats().evictions), (127, 2));
        write(ids[129], 0);
        assert_eq!((p.stats().entries, p.stats().evictions), (128, 2));
        // ids[2] is still known: a gap in its sequence is refused. ids[0]
        // and ids[1] were the least recent: forgotten, so a later sequence
        // is taken as an unknown producer's.
        assert!(
            !matches!(
                p.check("t", 0, &header(ids[2], 0, 9, 1), 0),
                Check::Accept(_)
            ),
            "ids[2] is still known"
        );
        write(ids[0], 9);
        write(ids[1], 9);
    }

    #[test]
    fn idle_entries_expire_and_a_full_table_evicts_the_least_recent() {
        let (_dir, clock, p, ids) = table_with_ids(2, 50, 3);
        for (i, &id) in ids.iter().take(2).enumerate() {
            let t = accept(&p, &header(id, 0, 0, 1));
            p.complete(t, Ok((i as u64, i as u64)));
            clock.advance_ms(5);
        }
        let t = accept(&p, &header(ids[2], 0, 0, 1));
        p.complete(t, Ok((2, 2)));
        assert_eq!(p.stats().evictions, 1);
        assert_eq!(p.stats().entries, 2);
        // ids[0] was the least recently active: forgotten, so its next
        // sequence is accepted as an unknown producer's.
        let t = accept(&p, &header(ids[0], 0, 7, 1));
        p.complete(t, Ok((3, 3)));
        clock.advance_ms(50);
        // Not idle past the expiry yet.
        let t = accept(&p, &header(ids[0], 0, 8, 1));
        p.complete(t, Ok((4, 4)));
        assert_eq!(p.stats().expirations, 0);
        clock.advance_ms(51);
        // Idle past the expiry: dropped when next looked at.
        let t = accept(&p, &header(ids[0], 0, 42, 1));
        p.complete(t, Ok((5, 5)));
        assert!(p.stats().expirations >= 1, "{:?}", p.stats());
    }

    /// A name at its last epoch gets a new id at epoch 0, on disk before
    /// the answer; its old id is fenced whatever its epoch, also after a
    /// restart. A name of an older broker (an id without NAMED_ID_BIT)
    /// gets an error instead: its old id would pass for an anonymous one.
    #[test]
    fn a_name_whose_epochs_ran_out_gets_a_new_id_and_its_old_one_stays_fenced() {
        let (d, p) = table(8);
        let (old, _) = smol::block_on(p.init(Some("gw"))).expect("init");
        let legacy = smol::block_on(p.init(None)).expect("init").0;
        drop(p);
        set_epoch_on_disk(d.path(), "gw", u16::MAX - 1);
        let path = d.path().join(REGISTRY_FILE);
        let mut file: RegistryFile = meta::read_file(&path).expect("reads").expect("written");
        file.names.insert("legacy".into(), (legacy, u16::MAX));
        meta::write_atomic(&path, &file).expect("writes");

        let p = reopen(d.path(), 8);
        let init = |p: &Producers, name| smol::block_on(p.init(Some(name)));
        assert_eq!(init(&p, "gw").expect("init"), (old, u16::MAX));
        let (new, epoch) = init(&p, "gw").expect("init past the last epoch");
        assert!(
            new != old && new & NAMED_ID_BIT != 0 && epoch == 0,
            "{new}/{epoch}"
        );
        let fenced = |p: &Producers| {
            matches!(
                p.check("t", 0, &header(old, u16::MAX, 0, 1), 0),
                Check::Reject(SequenceError::Forgotten { producer_id }) if producer_id == old
            )
        };
        assert!(fenced(&p), "the old id's last instance is fenced");
        let t = accept(&p, &header(new, 0, 0, 1));
        p.complete(t, Ok((0, 0)));
        drop(p);

        let q = reopen(d.path(), 8);
        assert_eq!(smol::block_on(q.named("gw")), Some((new, 0)), "on disk");
        assert!(fenced(&q), "and after a restart");
        assert_eq!(init(&q, "gw").expect("init"), (new, 1));
        assert!(
            matches!(init(&q, "legacy"), Err(InitError::EpochExhausted)),
            "an older broker's name"
        );
        assert_eq!(smol::block_on(q.named("legacy")), Some((legacy, u16::MAX)));
    }

    /// A registry write whose directory sync fails is in place: the file
    /// registers the name. Init used to answer an error and keep the name
    /// out of memory, so the broker gave it another id than a restart.
    #[test]
    fn a_registry_written_but_not_synced_is_the_one_the_broker_runs() {
        let (d, p) = table(8);
        let file = d.path().join(REGISTRY_FILE);
        meta::FAIL_DIR_SYNC.lock().unwrap().push(file);
        let n = smol::block_on(p.init(Some("gw"))).expect("in effect");
        assert_eq!(smol::block_on(p.named("gw")), Some(n));
        drop(p);
        let q = reopen(d.path(), 8);
        assert_eq!(smol::block_on(q.named("gw")), Some(n));
    }

    const NAME_EXPIRY_MS: u64 = 10_000;

    /// Producers under `dir` on `clock`, plain names expiring after
    /// [`NAME_EXPIRY_MS`].
    fn with_name_expiry(
        dir: &Path,
        clock: &Arc<crate::broker::ManualClock>,
        max_producers: usize,
    ) -> Producers {
        let config = ProducersConfig {
            max_producers,
            idle_expiry_ms: 60_000,
            name_expiry_ms: NAME_EXPIRY_MS,
        };
        Producers::open(dir, config, clock.clone()).expect("open")
    }

    fn forgotten(p: &Producers, id: u64) -> bool {
        matches!(
            p.check("t", 0, &header(id, 0, 0, 1), 0),
            Check::Reject(SequenceError::Forgotten { producer_id }) if producer_id == id
        )
    }

    /// A plain name without an init or a batch for the expiry is
    /// forgotten, on disk; its id stays fenced, also after a restart, and
    /// an init of it gets a new id. A name whose id wrote a batch since is
    /// kept.
    #[test]
    fn a_plain_name_unused_past_its_expiry_is_forgotten_and_its_id_fenced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(crate::broker::ManualClock::new(1_000));
        let p = with_name_expiry(dir.path(), &clock, 8);
        let init = |p: &Producers, name| smol::block_on(p.init(Some(name))).expect("init");
        let (idle, _) = init(&p, "gw-idle");
        let (busy, _) = init(&p, "gw-busy");
        let t = accept(&p, &header(idle, 0, 0, 1));
        p.complete(t, Ok((0, 0)));
        clock.advance_ms(NAME_EXPIRY_MS - 4_000);
        let t = accept(&p, &header(busy, 0, 0, 1));
        p.complete(t, Ok((1, 1)));
        clock.advance_ms(4_000);
        assert_eq!(
            smol::block_on(p.expire_names()).expect("sweep"),
            0,
            "not past the expiry yet"
        );
        // The next sweep is due an eighth of the expiry later.
        clock.advance_ms(NAME_EXPIRY_MS / 8);
        assert_eq!(smol::block_on(p.expire_names()).expect("sweep"), 1);
        assert_eq!(smol::block_on(p.named("gw-idle")), None);
        assert_eq!(smol::block_on(p.named("gw-busy")), Some((busy, 0)));
        assert!(forgotten(&p, idle), "the idle name's id is fenced");
        let t = accept(&p, &header(busy, 0, 1, 1));
        p.complete(t, Ok((2, 2)));
        drop(p);

        let q = with_name_expiry(dir.path(), &clock, 8);
        assert_eq!(smol::block_on(q.named("gw-idle")), None, "on disk");
        assert!(forgotten(&q, idle), "and fenced after a restart");
        let (fresh, epoch) = init(&q, "gw-idle");
        assert!(fresh != idle && epoch == 0, "{fresh}/{epoch}");
        assert_eq!(init(&q, "gw-busy"), (busy, 1));
    }

    /// A use seen only by a table entry since evicted still counts, and a
    /// named init sweeps too.
    #[test]
    fn a_name_whose_entry_was_evicted_is_kept_and_an_init_sweeps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(crate::broker::ManualClock::new(1_000));
        let p = with_name_expiry(dir.path(), &clock, 1);
        let init = |name| smol::block_on(p.init(Some(name))).expect("init");
        let (idle, _) = init("gw-idle");
        let (busy, _) = init("gw-busy");
        let anonymous = smol::block_on(p.init(None)).expect("init").0;
        clock.advance_ms(NAME_EXPIRY_MS / 2);
        let t = accept(&p, &header(busy, 0, 0, 1));
        p.complete(t, Ok((0, 0)));
        clock.advance_ms(1);
        // Evicts busy's only entry.
        let t = accept(&p, &header(anonymous, 0, 0, 1));
        p.complete(t, Ok((1, 1)));
        assert_eq!(p.stats().evictions, 1);
        clock.advance_ms(NAME_EXPIRY_MS / 2 + 1);
        init("gw-new");
        assert_eq!(smol::block_on(p.named("gw-idle")), None);
        assert!(forgotten(&p, idle));
        assert_eq!(smol::block_on(p.named("gw-busy")), Some((busy, 0)));
        clock.advance_ms(NAME_EXPIRY_MS / 2);
        assert_eq!(smol::block_on(p.expire_names()).expect("sweep"), 1);
        assert_eq!(smol::block_on(p.named("gw-busy")), None, "unused since");
        assert!(smol::block_on(p.named("gw-new")).is_some());
    }

    /// A registry an older broker wrote (no last uses) loads, its plain
    /// names taken as used at that start; the last uses are persisted, so
    /// the expiry counts across restarts.
    #[test]
    fn an_older_registry_loads_and_the_expiry_counts_across_restarts() {
        #[derive(Serialize)]
        struct Old {
            reserved_until: u64,
            names: BTreeMap<String, (u64, u16)>,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let old_id = 7 | NAMED_ID_BIT;
        let old = Old {
            reserved_until: ID_BLOCK,
            names: [("gw-old".to_owned(), (old_id, 3))].into(),
        };
        meta::write_atomic(&dir.path().join(REGISTRY_FILE), &old).expect("write");
        let clock = Arc::new(crate::broker::ManualClock::new(1_000));
        let p = with_name_expiry(dir.path(), &clock, 8);
        assert_eq!(smol::block_on(p.named("gw-old")), Some((old_id, 3)));
        let (id, _) = smol::block_on(p.init(Some("gw"))).expect("init");
        drop(p);
        clock.advance_ms(NAME_EXPIRY_MS + 1);
        let q = with_name_expiry(dir.path(), &clock, 8);
        assert_eq!(smol::block_on(q.expire_names()).expect("sweep"), 2);
        assert!(forgotten(&q, id) && forgotten(&q, old_id));
    }

    /// Transactional ids are their coordinator's to forget (one in an
    /// open transaction never is), and an older broker's name cannot be.
    #[test]
    fn transactional_ids_and_older_names_are_not_expired_here() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(crate::broker::ManualClock::new(1_000));
        let p = with_name_expiry(dir.path(), &clock, 8);
        let txn = smol::block_on(p.init(Some("txn:t"))).expect("init");
        let legacy = smol::block_on(p.init(None)).expect("init").0;
        drop(p);
        let path = dir.path().join(REGISTRY_FILE);
        let mut file: RegistryFile = meta::read_file(&path).expect("reads").expect("written");
        file.names.insert("legacy".into(), (legacy, 0));
        meta::write_atomic(&path, &file).expect("writes");
        let p = with_name_expiry(dir.path(), &clock, 8);
        smol::block_on(p.init(Some("gw"))).expect("init");
        clock.advance_ms(NAME_EXPIRY_MS * 2);
        assert_eq!(smol::block_on(p.expire_names()).expect("sweep"), 1);
        assert_eq!(smol::block_on(p.named("txn:t")), Some(txn));
        assert_eq!(smol::block_on(p.named("legacy")), Some((legacy, 0)));
    }

    #[test]
    fn ids_are_not_reused_across_reopen_and_names_persist() {
        let (d, p) = table(8);
        let a = smol::block_on(p.init(None)).expect("init").0;
        let n = smol::block_on(p.init(Some("gw"))).expect("init");
        drop(p);
        let q = reopen(d.path(), 8);
        let b = smol::block_on(q.init(None)).expect("init").0;
        assert!(n.0 & NAMED_ID_BIT != 0, "a named id says so");
        assert!(b > a && b > n.0 & !NAMED_ID_BIT);
        assert_eq!(smol::block_on(q.init(Some("gw"))).expect("init"), (n.0, 1));
        assert!(matches!(
            q.check("t", 0, &header(n.0, 0, 0, 1), 0),
            Check::Reject(SequenceError::Fenced {
                epoch: 0,
                current: 1
            })
        ));
    }
}

#[cfg(test)]
mod size {
    #[test]
    fn an_entry_fits_the_memory_budget_estimate() {
        // Key, entry, one control byte, at worst twice (bucket rounding).
        let bytes =
            (std::mem::size_of::<super::Key>() + std::mem::size_of::<super::Entry>() + 1) * 2;
        assert!(
            bytes as u64 <= crate::config::PRODUCER_ENTRY_BYTES,
            "{bytes} B per producer entry"
        );
    }
}
