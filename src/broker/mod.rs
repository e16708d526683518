//! Topics and partitions on top of the storage engine, and the one door
//! to it: every caller (the server's sessions today; the mirror, the group
//! coordinator and the compaction cleaner, in process) produces, fetches
//! and administers through [`Broker`], never through storage.
//!
//! - produce (`produce`): [`Broker::produce_group`] / [`Broker::produce`]
//!   submit batches in call order and return a [`Produce`] future that
//!   settles the producer table and the message-id window itself.
//! - fetch (`fetch`): [`Broker::fetch`] reads several partitions with the
//!   long-poll (min bytes, max wait, the broker's stop).
//! - errors (`error`): storage's are mapped once, into [`BrokerError`].
//! - time (`clock`): the broker is opened with a [`Clock`].
//!
//! A topic is a name, a partition count and one [`PartitionConfig`] shared by
//! its partitions. The topic table lives in `<data_dir>/topics.meta`, written
//! atomically, and is the source of truth for which topics exist:
//!
//! - create: the topic's settings (`msgid.meta`, `cleanup.meta`) are
//!   written first, then the table entry, then the partitions; a crash
//!   after the entry is completed at the next start (missing partitions
//!   created). A failure undoes what was made: the caller's error means
//!   no topic.
//! - delete: the entry is removed first, then the partitions; partitions with
//!   no entry are deleted at the next start, loaded or not (one whose
//!   metadata is unreadable is still a leftover of the delete). One storage
//!   cannot remove stays unloaded, in the way of a create of the name (which
//!   deletes it first); start-up logs and counts one it cannot delete, and
//!   goes on.
//! - alter: the partitions first, then the table entry (the commit: a start
//!   puts partitions back to it), then `cleanup.meta`. A failure puts back
//!   what was changed: the caller's error means the old settings.
//!
//! So a crash never leaves a half-made topic visible to clients.
//!
//! Idempotent producers (ids, epochs, sequence windows) live in
//! [`producers`]; the broker checks every idempotent batch there before it
//! reaches storage and rebuilds the table at start-up.

pub mod cleaner;
mod clock;
mod error;
mod fetch;
pub mod group;
pub mod msgid;
mod produce;
pub mod producers;
mod quiet_log;
pub mod share;
pub mod txn;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use event_listener::Event;
use serde::{Deserialize, Serialize};

use crate::storage::meta::unsynced_is_written;
use crate::storage::{meta, PartitionId, Storage, StorageError};

pub use crate::bufpool::BatchBuf;
pub use crate::storage::{
    Durability, IoObserver, Offsets, OverflowPolicy, PartitionConfig, TOPIC_NAME_BYTES_MAX,
};
pub use cleaner::{CleanupConfig, CleanupPolicy};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{AlterStep, BrokerError};
pub use fetch::{FetchLimits, FetchPartition, Fetched};
pub use produce::{Produce, ProduceGroup, Produced};

const TOPICS_META_FILE: &str = "topics.meta";
/// Per-topic message-id windows. A file of its own: topics.meta is postcard,
/// which is not self-describing, so a field added to `TopicMeta` would make
/// old files unreadable.
const MSGID_META_FILE: &str = "msgid.meta";

/// How long the coordinators' timers and the cleaner sleep with nothing
/// due. What makes something due wakes them at once (a lock taken, a
/// member joining, a transaction begun, a ring rolling); this bounds how
/// late a change that does not is seen. Ticking while idle instead woke
/// the broker some 50 times a second (docs/performance.md, "An idle
/// broker").
pub(crate) const IDLE_TIMERS: std::time::Duration = std::time::Duration::from_secs(10);

/// Sleeps for `d`, or until `wake` is notified.
pub(crate) async fn sleep_unless(wake: event_listener::EventListener, d: std::time::Duration) {
    futures_lite::future::or(wake, async {
        smol::Timer::after(d).await;
    })
    .await;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub partitions: u32,
    pub config: PartitionConfig,
}

#[derive(Debug, Clone, Copy)]
pub struct BrokerLimits {
    pub max_topics: usize,
    /// Across all topics.
    pub max_partitions: usize,
    /// Disk all partitions' rings may reserve together (`storage.disk_budget_bytes`).
    pub disk_budget_bytes: u64,
    /// Capacity of the producer sequence table (entries are per producer
    /// and partition).
    pub max_producers: usize,
    /// A producer entry idle this long is forgotten.
    pub producer_idle_expiry_ms: u64,
    /// A plain producer name unused this long is forgotten.
    pub producer_name_expiry_ms: u64,
}

/// Bytes read per step when the producer table is rebuilt from the log.
const RECOVERY_READ_BYTES: usize = 1024 * 1024;
/// Batch headers scanned for one partition's producer state at start-up
/// past which it is snapshotted at once (a snapshot is a small write and
/// an fsync; a scan of this many headers costs a few ms).
const SNAPSHOT_AFTER_SCANNING: u64 = 1024;

/// What a client asks for when creating a topic; unset fields take the
/// broker's defaults.
#[derive(Debug, Clone, Default)]
pub struct TopicSpec {
    pub partitions: Option<u32>,
    pub segment_bytes: Option<u64>,
    pub segments: Option<u32>,
    pub retention_ms: Option<u64>,
    pub durability: Option<Durability>,
    pub overflow: Option<OverflowPolicy>,
    /// Message-id dedup window by time; 0 or None = off.
    pub msg_id_window_ms: Option<u64>,
    /// Message-id dedup window by count; 0 or None = off.
    pub msg_id_window_records: Option<u32>,
    pub cleanup: Option<CleanupPolicy>,
    pub tombstone_retention_ms: Option<u64>,
}

/// Partitions of each of the broker's own topics: what each keeps of
/// `server.max_partitions` before it is made.
pub(crate) const INTERNAL_TOPIC_PARTITIONS: u32 = 1;

impl TopicSpec {
    /// One of the broker's own logs: one partition, no time retention,
    /// every write fsynced; compacted (the overflow compaction's), or a
    /// plain ring that overwrites.
    pub(crate) fn internal(segment_bytes: u64, segments: u32, compacted: bool) -> TopicSpec {
        TopicSpec {
            partitions: Some(INTERNAL_TOPIC_PARTITIONS),
            segment_bytes: Some(segment_bytes),
            segments: Some(segments),
            retention_ms: Some(0),
            durability: Some(Durability::Always),
            overflow: (!compacted).then_some(OverflowPolicy::Overwrite),
            msg_id_window_ms: None,
            msg_id_window_records: None,
            cleanup: compacted.then_some(CleanupPolicy::Compact),
            tombstone_retention_ms: None,
        }
    }
}

/// Storage owns the rule (names become directory names); the broker gives
/// the client-facing error.
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    crate::storage::validate_topic_name(name)
        .map_err(|_| BrokerError::InvalidTopicName(name.to_owned()))
}

/// Topics with a message-id window, by name.
type Windows = Mutex<BTreeMap<String, msgid::Window>>;

/// The guard of `Broker::admin`, under which every write of the
/// broker's own files (`topics.meta`, `msgid.meta`, `cleanup.meta`) and
/// of their copies in memory is made: a file's writes go in the order
/// they were made, each from memory no other writer is changing.
type Admin<'a> = smol::lock::MutexGuard<'a, ()>;

/// Writes one of the broker's own files on the offload thread: its
/// fsyncs and rename (2 to 4 flushes, 20 to 100 ms each on an SD card)
/// held the network thread, and every connection it serves, on each
/// admin operation. Memory takes the new content after this returns, so
/// it never holds what the file does not.
async fn write_meta<T>(_admin: &Admin<'_>, path: &Path, value: T) -> Result<(), meta::MetaError>
where
    T: Serialize + Send + 'static,
{
    let to = path.to_path_buf();
    let written = crate::offload::run(move || {
        #[cfg(test)]
        hold_meta_write(&to);
        meta::write_atomic(&to, &value)
    })
    .await;
    unsynced_is_written(path, written)
}

/// A test's hold on the next write of one of the broker's files under
/// its data directory: [`write_meta`] says it `reached` it, then waits
/// for `release`.
#[cfg(test)]
struct MetaWriteHold {
    dir: PathBuf,
    reached: async_channel::Sender<PathBuf>,
    release: std::sync::mpsc::Receiver<()>,
}

#[cfg(test)]
static META_WRITE_HOLDS: Mutex<Vec<MetaWriteHold>> = Mutex::new(Vec::new());

/// Holds the next write of a broker file under `dir`; the receiver says
/// which file once the write is held, the sender releases it.
#[cfg(test)]
fn hold_next_meta_write(
    dir: &Path,
) -> (
    async_channel::Receiver<PathBuf>,
    std::sync::mpsc::Sender<()>,
) {
    let (reached, reached_rx) = async_channel::bounded(1);
    let (release_tx, release) = std::sync::mpsc::channel();
    META_WRITE_HOLDS
        .lock()
        .expect("holds lock")
        .push(MetaWriteHold {
            dir: dir.to_path_buf(),
            reached,
            release,
        });
    (reached_rx, release_tx)
}

/// Where a test's hold takes effect: in [`write_meta`], and in a
/// compaction's producer snapshot.
#[cfg(test)]
fn hold_meta_write(path: &Path) {
    let hold = {
        let mut holds = META_WRITE_HOLDS.lock().expect("holds lock");
        let at = holds.iter().position(|h| path.starts_with(&h.dir));
        at.map(|i| holds.remove(i))
    };
    if let Some(h) = hold {
        let _ = h.reached.send_blocking(path.to_path_buf());
        // Not a measure: only a release that cannot come (its thread
        // blocked by this very write) waits this long.
        h.release
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the held write was released: the executor that releases it is not blocked");
    }
}

/// What the broker is opened with, besides its storage.
pub struct BrokerOptions {
    pub data_dir: PathBuf,
    pub limits: BrokerLimits,
    /// The settings of a topic created without them.
    pub defaults: PartitionConfig,
    pub default_partitions: u32,
    /// What message-id windows and producer expiry read the time from.
    pub clock: Arc<dyn Clock>,
    pub cleaner: cleaner::CleanerLimits,
    /// The broker's own topics, each made at its first use, and the disk
    /// each will reserve then: counted in the budget and the topic and
    /// partition limits from the start, so a user topic cannot take their
    /// room (see [`internal_topics_disk`]).
    pub internal_topics: Vec<(&'static str, u64)>,
}

impl BrokerOptions {
    /// The options `skiff serve` runs with, on the wall clock.
    pub fn from_config(cfg: &crate::config::Config) -> BrokerOptions {
        BrokerOptions {
            data_dir: cfg.data_dir.clone(),
            limits: BrokerLimits {
                max_topics: cfg.server.max_topics as usize,
                max_partitions: cfg.server.max_partitions as usize,
                disk_budget_bytes: cfg.storage.disk_budget_bytes,
                max_producers: cfg.producers.max_producers as usize,
                producer_idle_expiry_ms: cfg.producers.idle_expiry_ms,
                producer_name_expiry_ms: cfg.producers.name_expiry_ms,
            },
            defaults: partition_defaults(cfg),
            default_partitions: cfg.topic_defaults.partitions,
            clock: Arc::new(SystemClock),
            cleaner: cleaner::CleanerLimits {
                key_map_bytes: cfg.compaction.key_map_bytes,
                max_bytes_per_sec: cfg.compaction.max_bytes_per_sec,
            },
            internal_topics: internal_topics_disk(cfg),
        }
    }
}

/// The broker's own topics that are made at their first use (the first
/// group commit, transaction, share fetch), with the disk each reserves
/// then under `cfg`: rings, and a compacted one's scratch segment. The
/// budget counts them from the start, so the space is there when they
/// are made (docs/configuration.md, `disk_budget_bytes`). Dead-letter
/// topics are not here: they are the user's, one per source topic.
pub fn internal_topics_disk(cfg: &crate::config::Config) -> Vec<(&'static str, u64)> {
    // Storage's, as `storage_config` gives it: the specs size their
    // segments from it.
    let max_batch = cfg.storage.max_batch_bytes as usize;
    let defaults = partition_defaults(cfg);
    [
        (group::OFFSETS_TOPIC, group::offsets_topic_spec(max_batch)),
        (txn::TXN_TOPIC, txn::log_topic_spec(max_batch)),
        (
            share::SHARE_TOPIC,
            share::ShareConfig::from_config(cfg).share_topic_spec(max_batch),
        ),
    ]
    .into_iter()
    .map(|(name, spec)| {
        let meta = TopicMeta {
            partitions: spec.partitions.unwrap_or(cfg.topic_defaults.partitions),
            config: config_of(&spec, &defaults),
        };
        (
            name,
            Broker::topic_bytes(&meta, spec.cleanup.unwrap_or_default()),
        )
    })
    .collect()
}

/// The partition settings `spec` asks for, `defaults` where it says
/// nothing (cleanup policies adjust them further: `cleaner::apply_policy`).
fn config_of(spec: &TopicSpec, defaults: &PartitionConfig) -> PartitionConfig {
    let mut config = defaults.clone();
    if let Some(v) = spec.segment_bytes {
        config.segment_bytes = v;
    }
    if let Some(v) = spec.segments {
        config.segments = v;
    }
    if let Some(v) = spec.retention_ms {
        config.retention_ms = (v > 0).then_some(v);
    }
    if let Some(v) = spec.durability {
        config.durability = v;
    }
    if let Some(v) = spec.overflow {
        config.overflow = v;
    }
    config
}

/// A new topic's partition settings where its create request says nothing.
pub fn partition_defaults(cfg: &crate::config::Config) -> PartitionConfig {
    let d = &cfg.topic_defaults;
    PartitionConfig {
        segment_bytes: d.segment_bytes,
        segments: d.segments,
        retention_ms: (d.retention_ms > 0).then_some(d.retention_ms),
        durability: d.fsync,
        overflow: d.overflow,
    }
}

/// The storage engine's settings from a config.
pub fn storage_config(cfg: &crate::config::Config) -> crate::storage::StorageConfig {
    crate::storage::StorageConfig {
        data_dir: cfg.data_dir.clone(),
        backend: cfg.storage.backend,
        append_queue_depth: cfg.append_queue_jobs() as usize,
        tail_buffer_bytes: cfg.storage.tail_buffer_bytes as usize,
        max_partitions: cfg.server.max_partitions as usize,
        max_batch_bytes: cfg.storage.max_batch_bytes as usize,
        prewrite_segments: cfg.storage.prewrite_segments,
        pipelined_fsync: cfg.storage.pipelined_fsync,
        fanin_wait: std::time::Duration::from_millis(cfg.storage.fanin_wait_ms),
        fanin_producers_max: cfg.server.max_connections as usize,
        ..crate::storage::StorageConfig::default()
    }
}

/// A one-way latch that wakes everyone waiting on it: the broker's
/// "stopping", which ends long-polls, and the server's own.
#[derive(Default)]
pub struct Shutdown {
    triggered: AtomicBool,
    event: Event,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::SeqCst)
    }

    pub async fn wait(&self) {
        loop {
            let listener = self.event.listen();
            if self.is_triggered() {
                return;
            }
            listener.await;
        }
    }
}

/// Topics, partitions and everything a produce or fetch goes through on
/// its way to storage; the one door to it (see `produce` and `fetch`).
pub struct Broker {
    storage: Storage,
    topics: RwLock<BTreeMap<String, TopicMeta>>,
    /// Each topic's name as one shared `Arc` (see `partition_id`). Only
    /// names: one that outlives its topic (a produce racing the delete)
    /// costs its bytes and nothing else.
    names: RwLock<foldhash::HashSet<Arc<str>>>,
    /// Serialises create, alter and delete so limits and the table stay
    /// consistent, and every write of the broker's own files ([`Admin`]).
    admin: smol::lock::Mutex<()>,
    meta_path: PathBuf,
    limits: BrokerLimits,
    defaults: PartitionConfig,
    default_partitions: u32,
    /// Shared with the produces in flight, which settle it themselves.
    producers: Arc<producers::Producers>,
    /// Held from an idempotent or windowed batch's checks to its submit, so
    /// the order of checks is the order in the log.
    submit_order: smol::lock::Mutex<()>,
    msgid_path: PathBuf,
    /// Compacted topics' settings (see `cleaner`).
    cleanup: RwLock<cleaner::CleanupTable>,
    cleanup_path: PathBuf,
    /// Notified when a topic is made compacted: wakes the cleaner.
    cleanup_changed: Event,
    /// Compacted rings that refused a write: the cleaner's verdicts.
    full_rings: Arc<cleaner::FullRings>,
    cleaner_limits: cleaner::CleanerLimits,
    /// The one key map: held by the compaction that runs (one at a time).
    key_map: smol::lock::Mutex<cleaner::KeyMap>,
    cleaner_stats: cleaner::CleanerStats,
    /// Shared with the produces in flight: a failed one forgets its ids.
    windows: Arc<Windows>,
    msg_id_duplicates: std::sync::atomic::AtomicU64,
    /// One snapshot writer at a time (the periodic task and the stop).
    snapshot_lock: Mutex<()>,
    clock: Arc<dyn Clock>,
    /// Ends long-polls; see [`Broker::begin_stop`].
    stopping: Arc<Shutdown>,
    /// Open transactions and aborted ranges per partition (kept by
    /// `txn::Coordinator`, read by read_committed fetches).
    pub(crate) txn_index: txn::Index,
    /// Topics whose new partitions start with a retain floor of 0 (the
    /// mirror's `block` rules), so a ring cannot wrap before the mirror has
    /// seen the topic.
    hold_new: RwLock<Option<HoldNew>>,
    /// See [`BrokerOptions::internal_topics`].
    internal_topics: Vec<(&'static str, u64)>,
    /// What start-up did with partitions of topics the table does not list.
    leftovers: Leftovers,
}

/// Partitions of topics the table does not list (a delete a stop cut
/// short, or one that could not remove them) that start-up found.
#[derive(Debug, Default)]
struct Leftovers {
    deleted: Vec<PartitionId>,
    /// Could not be deleted: kept unloaded, refusing a create of the name.
    kept: Vec<PartitionId>,
}

/// What start-up recovery found and did, summed ([`Broker::recovery_summary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoverySummary {
    /// Bytes of torn tail dropped.
    pub truncated_bytes: u64,
    /// Partitions quarantined (read-only, or left unloaded) and kept.
    pub quarantined_partitions: u64,
    /// Partitions of deleted topics that start-up deleted.
    pub deleted_leftovers: u64,
    /// Partitions of deleted topics that start-up could not delete.
    pub undeletable_leftovers: u64,
    /// Directories skipped because their metadata names another partition.
    pub skipped_dirs: u64,
}

/// `entries` (read from the settings file `path`) without those of topics
/// the table does not list: left by a delete that could not rewrite the
/// file, or a create a failure or crash cut short. Kept, they would be
/// the settings of a topic created by the name later without them. The
/// file is rewritten without them; if it cannot be, they go at the next
/// start.
fn drop_unlisted<V: Serialize>(
    path: &std::path::Path,
    mut entries: BTreeMap<String, V>,
    topics: &BTreeMap<String, TopicMeta>,
) -> BTreeMap<String, V> {
    let before = entries.len();
    entries.retain(|topic, _| {
        let listed = topics.contains_key(topic);
        if !listed {
            log::info!(
                "{}: dropping the settings of topic {topic}, which is not listed (a delete or \
                 create that could not finish)",
                path.display()
            );
        }
        listed
    });
    if entries.len() != before {
        if let Err(e) = meta::write_atomic(path, &entries) {
            log::warn!(
                "{}: cannot rewrite it without the topics not listed (ignored meanwhile): {e}",
                path.display()
            );
        }
    }
    entries
}

/// Which new topics are held back from dropping anything (see
/// [`Broker::hold_new_topics`]).
pub type HoldNew = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl Broker {
    /// Opens (and recovers) the storage `cfg` describes, `observer` told
    /// about its writes and reads, then the broker on it.
    pub fn open_config(
        cfg: &crate::config::Config,
        observer: Option<Arc<dyn IoObserver>>,
    ) -> Result<Arc<Broker>, BrokerError> {
        let mut storage_cfg = storage_config(cfg);
        storage_cfg.observer = observer.map(crate::storage::Observer);
        let storage = Storage::open(storage_cfg)?;
        Broker::open(storage, BrokerOptions::from_config(cfg))
    }

    /// Loads the topic table and finishes any create or delete a crash
    /// interrupted.
    pub fn open(storage: Storage, options: BrokerOptions) -> Result<Arc<Broker>, BrokerError> {
        let BrokerOptions {
            data_dir,
            limits,
            defaults,
            default_partitions,
            clock,
            cleaner: cleaner_limits,
            internal_topics,
        } = options;
        let meta_path = data_dir.join(TOPICS_META_FILE);
        let msgid_path = data_dir.join(MSGID_META_FILE);
        let cleanup_path = data_dir.join(cleaner::CLEANUP_META_FILE);
        let cleanup: cleaner::CleanupTable = meta::read_file(&cleanup_path)
            .map_err(StorageError::Meta)?
            .unwrap_or_default();
        let msgid: BTreeMap<String, msgid::MsgIdConfig> = meta::read_file(&msgid_path)
            .map_err(StorageError::Meta)?
            .unwrap_or_default();
        let topics: BTreeMap<String, TopicMeta> =
            match meta::read_file(&meta_path).map_err(StorageError::Meta)? {
                Some(t) => t,
                None => {
                    // The table is written before any partition is made, so
                    // partitions without it are not a topic being created or
                    // deleted: read as an empty table, they would all be
                    // deleted as leftovers of deleted topics.
                    // Unloaded ones count: they are data too.
                    let held = storage.partitions().len() + storage.unloaded().len();
                    if held > 0 {
                        return Err(StorageError::Meta(meta::MetaError::File {
                            path: meta_path,
                            error: Box::new(meta::MetaError::Io(std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                format!(
                                    "missing, while the data directory holds {held} partition(s); \
                                 not starting, so as to delete none: restore the file from a \
                                 backup, or move topics/ away to start empty"
                                ),
                            ))),
                        })
                        .into());
                    }
                    BTreeMap::new()
                }
            };
        let cleanup = drop_unlisted(&cleanup_path, cleanup, &topics);
        let msgid = drop_unlisted(&msgid_path, msgid, &topics);
        let reserved = Self::reserved_bytes(&topics, &cleanup, &internal_topics);
        if reserved > limits.disk_budget_bytes {
            // Topics from before the limit was lowered (or from before the
            // broker's own were counted) stay; new ones wait.
            let unmade = Self::unmade_internal(&topics, &internal_topics, "");
            let own = if unmade.is_empty() {
                String::new()
            } else {
                format!(
                    " (with what the broker's own topics not made yet will take: {}), and a group \
                     commit, transaction or share fetch that needs one is refused (storage_full)",
                    unmade.join(", ")
                )
            };
            log::warn!(
                "the topics reserve {reserved} bytes of disk, more than storage.disk_budget_bytes \
                 ({}): no topic can be created until some are deleted{own}",
                limits.disk_budget_bytes
            );
        }
        Self::warn_if_limits_taken(&topics, &internal_topics, &limits);
        let producers = producers::Producers::open(
            &data_dir,
            producers::ProducersConfig {
                max_producers: limits.max_producers,
                idle_expiry_ms: limits.producer_idle_expiry_ms,
                name_expiry_ms: limits.producer_name_expiry_ms,
            },
            clock.clone(),
        )
        .map_err(StorageError::Meta)?;
        let mut broker = Broker {
            full_rings: Arc::new(cleaner::FullRings::new(storage.clone())),
            storage,
            topics: RwLock::new(topics),
            names: RwLock::new(foldhash::HashSet::default()),
            admin: smol::lock::Mutex::new(()),
            meta_path,
            limits,
            defaults,
            default_partitions,
            producers: Arc::new(producers),
            submit_order: smol::lock::Mutex::new(()),
            msgid_path,
            cleanup: RwLock::new(cleanup),
            cleanup_path,
            cleanup_changed: Event::new(),
            key_map: smol::lock::Mutex::new(cleaner::KeyMap::new(&cleaner_limits)),
            cleaner_limits,
            cleaner_stats: cleaner::CleanerStats::default(),
            windows: Arc::new(Mutex::new(
                msgid
                    .into_iter()
                    .filter(|(_, c)| c.enabled())
                    .map(|(t, c)| (t, msgid::Window::new(c)))
                    .collect(),
            )),
            msg_id_duplicates: std::sync::atomic::AtomicU64::new(0),
            snapshot_lock: Mutex::new(()),
            clock,
            stopping: Arc::new(Shutdown::default()),
            txn_index: txn::Index::default(),
            hold_new: RwLock::new(None),
            internal_topics,
            leftovers: Leftovers::default(),
        };
        broker.leftovers = smol::block_on(async {
            let leftovers = broker.reconcile().await?;
            broker.recover_producers().await?;
            // After the producers' table is rebuilt: it may write their
            // snapshots.
            broker.reconcile_spares().await;
            broker.recover_msgid_windows().await?;
            Ok::<_, BrokerError>(leftovers)
        })?;
        Ok(Arc::new(broker))
    }

    /// Ends every long-poll, now and to come (fetches answer with what
    /// they have at once); the broker still takes produces, so sessions
    /// can finish what they read. Part of a graceful stop.
    pub fn begin_stop(&self) {
        self.stopping.trigger();
    }

    /// The latch [`Broker::begin_stop`] triggers, for whoever else should
    /// stop waiting with the broker (sessions, the mirror).
    pub fn stopping(&self) -> Arc<Shutdown> {
        self.stopping.clone()
    }

    /// The end of a graceful stop, once every caller is done: snapshots
    /// the producer table (so the next start scans nothing), then flushes,
    /// checkpoints and stops storage.
    pub fn close(&self) -> Result<(), BrokerError> {
        self.begin_stop();
        self.snapshot_producers(true);
        Ok(self.storage.shutdown()?)
    }

    /// Completes once the storage thread has taken a command off its
    /// queue: a hung device never answers, which is what the service
    /// watchdog needs to notice.
    pub async fn ping_storage(&self) -> Result<(), BrokerError> {
        Ok(self.storage.ping().await?)
    }

    /// The I/O backend storage runs on ("io_uring", "pwrite").
    pub fn backend_name(&self) -> &'static str {
        self.storage.backend_name()
    }

    /// The largest batch storage accepts.
    pub fn max_batch_bytes(&self) -> usize {
        self.storage.max_batch_bytes()
    }

    /// The most topics there may be (`server.max_topics`).
    pub fn max_topics(&self) -> usize {
        self.limits.max_topics
    }

    /// `server.max_partitions`.
    pub fn max_partitions(&self) -> usize {
        self.limits.max_partitions
    }

    /// Storage's counters (for the metrics endpoint).
    pub fn storage_stats(&self) -> crate::storage::StorageStats {
        self.storage.stats()
    }

    /// Partitions on disk.
    pub fn partition_count(&self) -> usize {
        self.storage.partitions().len()
    }

    /// What start-up recovery found and did. A quarantined partition
    /// start-up then deleted as a deleted topic's leftover counts as
    /// deleted, not quarantined.
    pub fn recovery_summary(&self) -> RecoverySummary {
        let reports = self.storage.recovery_report();
        let deleted = &self.leftovers.deleted;
        RecoverySummary {
            truncated_bytes: reports.iter().map(|r| r.bytes_truncated).sum(),
            quarantined_partitions: reports
                .iter()
                .filter(|r| r.quarantined && !deleted.contains(&r.id))
                .count() as u64,
            deleted_leftovers: deleted.len() as u64,
            undeletable_leftovers: self.leftovers.kept.len() as u64,
            skipped_dirs: self.storage.skipped_dirs().len() as u64,
        }
    }

    /// The storage fallbacks in use, one line each, for `/health` (each
    /// was also logged once when it began).
    pub fn storage_notes(&self) -> Vec<&'static str> {
        let s = self.storage.stats();
        let mut notes = Vec::new();
        if s.buffered_io > 0 {
            notes.push("storage: buffered I/O with fdatasync (the file system refuses O_DIRECT)");
        }
        if s.zero_fill_allocations > 0 {
            notes.push(
                "storage: segments preallocated by writing zeros (the file system has no \
                 fallocate)",
            );
        }
        notes
    }

    /// Batches a crashed run left past the logs' ends that start-up
    /// recovery erased (docs/format.md, "Batches from a crashed run").
    pub fn recovery_stale_erased(&self) -> u64 {
        self.storage
            .recovery_report()
            .iter()
            .map(|r| r.stale_erased)
            .sum()
    }

    /// The damaged ranges start-up recovery skipped, by partition
    /// (docs/semantics.md, "Damaged data").
    pub fn recovery_damage(&self) -> Vec<(PartitionId, crate::storage::DamagedRange)> {
        self.storage
            .recovery_report()
            .into_iter()
            .flat_map(|r| {
                let id = r.id;
                r.damaged.into_iter().map(move |d| (id.clone(), d))
            })
            .collect()
    }

    /// Rebuilds the producer table: each partition's snapshot, then the
    /// batch headers after it up to the high watermark. A partition whose
    /// scan was long gets a snapshot at once: the periodic one comes only
    /// after `PRODUCER_SNAPSHOT_INTERVAL_MS` of serving, and a broker
    /// killed sooner, again and again, would scan a longer log each time.
    async fn recover_producers(&self) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        let mut scanned = 0u64;
        let mut long_scans = Vec::new();
        for (topic, meta) in self.topics() {
            for p in 0..meta.partitions {
                let scanned_before = scanned;
                let id = PartitionId {
                    topic: topic.as_str().into(),
                    partition: p,
                };
                let o = match self.storage.offsets(&id) {
                    Ok(o) => o,
                    // A partition recovery could not load: nothing of it
                    // to rebuild from, and no write it would take.
                    Err(e @ StorageError::Quarantined(_)) => {
                        log::warn!("{id}: producer state not rebuilt: {e}");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let mut at = self
                    .producers
                    .load_snapshot(&topic, p, o.earliest, o.high_watermark);
                while at < o.high_watermark {
                    let bytes = match self.storage.read(&id, at, RECOVERY_READ_BYTES).await {
                        Ok(b) => b,
                        Err(e) => {
                            // A quarantined partition, say: its producers
                            // start unknown, which accepts their batches.
                            log::warn!("{id}: producer state not rebuilt past {at}: {e}");
                            break;
                        }
                    };
                    let before = at;
                    for view in crate::batch::BatchIter::new(&bytes) {
                        let Ok(view) = view else { break };
                        self.producers.recover_batch(&topic, p, &view.header);
                        scanned += 1;
                        at = at.max(view.header.next_offset());
                    }
                    if at == before {
                        break;
                    }
                }
                // Only a scan that reached the end: a snapshot says the
                // table is whole up to the offset it covers.
                if at >= o.high_watermark && scanned - scanned_before >= SNAPSHOT_AFTER_SCANNING {
                    long_scans.push((topic.clone(), p, o.high_watermark));
                }
            }
        }
        for (id, d) in self.recovery_damage() {
            self.producers
                .note_damage(&id.topic, id.partition, d.to_offset);
        }
        // Nothing is in flight yet, so each snapshot covers its whole log.
        for (topic, p, hw) in long_scans {
            if let Err(e) = self.producers.snapshot(&topic, p, hw) {
                log::warn!("{topic}/{p}: cannot write the producer snapshot: {e}");
            }
        }
        log::info!(
            "producer state rebuilt: {} entries, {scanned} batch header(s) scanned in {:?}",
            self.producers.stats().entries,
            started.elapsed()
        );
        Ok(())
    }

    /// Refills each topic's message-id window from the log: the ids of the
    /// records it would still hold, by their own timestamps. A resend right
    /// after a restart (a power cut is when sensors resend) is then still
    /// caught. Reads at most the window's capacity of records per
    /// partition, and only from the window's start in time.
    async fn recover_msgid_windows(&self) -> Result<(), BrokerError> {
        let configs = self.msgid_configs();
        if configs.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let now = self.clock.now_ms();
        let mut restored = 0usize;
        for (topic, config) in configs {
            let Some(meta) = self
                .topics
                .read()
                .expect("topics lock")
                .get(&topic)
                .cloned()
            else {
                continue;
            };
            // (record timestamp, id hash), every partition's, oldest first.
            let mut seen: Vec<(i64, u64)> = Vec::new();
            for p in 0..meta.partitions {
                let id = PartitionId {
                    topic: topic.as_str().into(),
                    partition: p,
                };
                if let Err(e) = self.collect_msg_ids(&id, config, now, &mut seen).await {
                    // A quarantined partition, say: its ids are not
                    // remembered, as before this rebuild existed.
                    log::warn!("{id}: message-id window not refilled from the log: {e}");
                }
            }
            seen.sort_by_key(|&(ts, _)| ts);
            let mut windows = self.windows.lock().expect("windows lock");
            if let Some(w) = windows.get_mut(&topic) {
                restored += w.restore(&seen, now);
            }
        }
        log::info!(
            "message-id windows refilled from the log: {restored} id(s) in {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// The msg-id headers of `id`'s records that `config`'s window would
    /// still hold at `now`: of its last `capacity` records, those inside
    /// the window's time. Where the log is dense those are the last
    /// `capacity` offsets; gaps (compaction, transaction markers) hold no
    /// records, so the reads step further back until enough are found.
    async fn collect_msg_ids(
        &self,
        id: &PartitionId,
        config: msgid::MsgIdConfig,
        now: i64,
        out: &mut Vec<(i64, u64)>,
    ) -> Result<(), BrokerError> {
        let o = self.storage.offsets(id)?;
        let mut lower = o.earliest;
        let mut oldest_ts = i64::MIN;
        if config.window_ms > 0 {
            oldest_ts = now.saturating_sub(config.window_ms as i64);
            match self.storage.offset_for_timestamp(id, oldest_ts).await? {
                Some(at) => lower = lower.max(at),
                None => return Ok(()),
            }
        }
        let capacity = config.capacity();
        // (timestamp, msg-id hash) of the records found, newest first.
        let mut found: Vec<(i64, Option<u64>)> = Vec::new();
        let (mut to, mut span) = (o.high_watermark, capacity as u64);
        while found.len() < capacity && to > lower {
            let from = lower.max(to.saturating_sub(span));
            let mut chunk = Vec::new();
            let mut at = from;
            while at < to {
                let bytes = self.storage.read(id, at, RECOVERY_READ_BYTES).await?;
                let (records, next) = decode_records(&bytes)?;
                for (offset, ts, r) in records {
                    // Records of `[from, to)` only: the rest belong to the
                    // steps before and after this one.
                    if offset < from || offset >= to || ts < oldest_ts {
                        continue;
                    }
                    let hd = r.headers.iter().find(|hd| hd.name == msgid::MSG_ID_HEADER);
                    chunk.push((ts, hd.map(|hd| msgid::id_hash(hd.value))));
                }
                if next <= at {
                    break;
                }
                at = next;
            }
            found.extend(chunk.into_iter().rev());
            to = from;
            span = span.saturating_mul(2);
        }
        found.truncate(capacity);
        // Oldest first, as the log holds them: records of one timestamp
        // keep their order through the caller's (stable) sort by time.
        out.extend(found.into_iter().rev().filter_map(|(ts, h)| Some((ts, h?))));
        Ok(())
    }

    /// Snapshots the producer state of every partition (`all`, at clean
    /// shutdown) or of those written by idempotent producers since the last
    /// snapshot (the periodic task), so start-up scans only the log after
    /// it.
    pub fn snapshot_producers(&self, all: bool) {
        let _one_writer = self.snapshot_lock.lock().expect("snapshot lock");
        let dirty = self.producers.take_dirty();
        let parts: Vec<(String, u32)> = if all {
            self.topics()
                .into_iter()
                .flat_map(|(t, m)| (0..m.partitions).map(move |p| (t.clone(), p)))
                .collect()
        } else {
            dirty
        };
        for (topic, p) in parts {
            let Ok(o) = self.offsets(&topic, p) else {
                continue;
            };
            if let Err(e) = self.producers.snapshot(&topic, p, o.high_watermark) {
                log::warn!("{topic}/{p}: cannot write the producer snapshot: {e}");
            }
        }
    }

    /// The topic's message-id window settings (off when not set).
    pub fn msg_id_config(&self, topic: &str) -> msgid::MsgIdConfig {
        self.windows
            .lock()
            .expect("windows lock")
            .get(topic)
            .map(msgid::Window::config)
            .unwrap_or_default()
    }

    /// Every topic's message-id window settings.
    fn msgid_configs(&self) -> BTreeMap<String, msgid::MsgIdConfig> {
        self.windows
            .lock()
            .expect("windows lock")
            .iter()
            .map(|(t, w)| (t.clone(), w.config()))
            .collect()
    }

    /// The topic's cleanup settings (`delete` when not compacted).
    pub fn cleanup_config(&self, topic: &str) -> CleanupConfig {
        self.cleanup
            .read()
            .expect("cleanup lock")
            .get(topic)
            .copied()
            .unwrap_or_default()
    }

    /// Sets (or, for `delete`, removes) a topic's cleanup entry and writes
    /// the table. Memory takes it once the file has it: on an error the
    /// broker holds what the file has, so the next change rewrites the
    /// file (a create of a deleted topic's name, say).
    async fn set_cleanup(
        &self,
        admin: &Admin<'_>,
        topic: &str,
        c: Option<CleanupConfig>,
    ) -> Result<(), StorageError> {
        let table = {
            let now = self.cleanup.read().expect("cleanup lock");
            let mut table = now.clone();
            match c.filter(|c| c.policy.compacts()) {
                Some(c) => table.insert(topic.to_owned(), c),
                None => table.remove(topic),
            };
            if table == *now {
                return Ok(());
            }
            table
        };
        write_meta(admin, &self.cleanup_path, table.clone())
            .await
            .map_err(StorageError::Meta)?;
        *self.cleanup.write().expect("cleanup lock") = table;
        self.cleanup_changed.notify(usize::MAX);
        Ok(())
    }

    /// Sets (or, with none or an off window, removes) a topic's message-id
    /// window and writes the file. Memory takes it once the file has it:
    /// on an error the broker holds what the file has, so the next change
    /// rewrites it.
    async fn set_window(
        &self,
        admin: &Admin<'_>,
        topic: &str,
        c: Option<msgid::MsgIdConfig>,
    ) -> Result<(), StorageError> {
        let c = c.filter(msgid::MsgIdConfig::enabled);
        let mut configs = self.msgid_configs();
        let changed = match c {
            // Only a create sets one: its topic is new.
            Some(c) => {
                configs.insert(topic.to_owned(), c);
                true
            }
            None => configs.remove(topic).is_some(),
        };
        if !changed {
            return Ok(());
        }
        write_meta(admin, &self.msgid_path, configs)
            .await
            .map_err(StorageError::Meta)?;
        let mut windows = self.windows.lock().expect("windows lock");
        match c {
            Some(c) => windows.insert(topic.to_owned(), msgid::Window::new(c)),
            None => windows.remove(topic),
        };
        Ok(())
    }

    /// Writes a topic's settings files ([`MSGID_META_FILE`],
    /// [`cleaner::CLEANUP_META_FILE`]) with these entries (none: without
    /// it); the error names the file it could not write.
    async fn set_settings(
        &self,
        admin: &Admin<'_>,
        topic: &str,
        window: Option<msgid::MsgIdConfig>,
        cleanup: Option<CleanupConfig>,
    ) -> Result<(), (&'static str, StorageError)> {
        self.set_window(admin, topic, window)
            .await
            .map_err(|e| (MSGID_META_FILE, e))?;
        self.set_cleanup(admin, topic, cleanup)
            .await
            .map_err(|e| (cleaner::CLEANUP_META_FILE, e))
    }

    pub fn producers(&self) -> &producers::Producers {
        &self.producers
    }

    /// Dedup and producer-table counters (for the metrics endpoint).
    pub fn producer_stats(&self) -> producers::ProducerStats {
        producers::ProducerStats {
            msg_id_duplicates: self
                .msg_id_duplicates
                .load(std::sync::atomic::Ordering::Relaxed),
            ..self.producers.stats()
        }
    }

    /// See [`producers::Producers::init`].
    pub async fn init_producer(
        &self,
        name: Option<&str>,
    ) -> Result<(u64, u16), producers::InitError> {
        self.producers.init(name).await
    }

    /// See [`producers::Producers::forget`].
    pub async fn forget_producer(&self, name: &str) -> Result<bool, producers::InitError> {
        self.producers.forget(name).await
    }

    /// See [`producers::Producers::expire_names`].
    pub async fn expire_producer_names(&self) -> Result<usize, producers::InitError> {
        self.producers.expire_names().await
    }

    /// See [`producers::Producers::named`].
    pub async fn named_producer(&self, name: &str) -> Option<(u64, u16)> {
        self.producers.named(name).await
    }

    /// See [`producers::Producers::is_forgotten`].
    pub fn producer_forgotten(&self, id: u64) -> bool {
        self.producers.is_forgotten(id)
    }

    /// The next epoch of an anonymous producer (see `Producers::renew`).
    pub async fn renew_producer(
        &self,
        id: u64,
        epoch: u16,
    ) -> Result<(u64, u16), producers::InitError> {
        self.producers.renew(id, epoch).await
    }

    async fn reconcile(&self) -> Result<Leftovers, BrokerError> {
        let on_disk = self.storage.partitions();
        // Before any delete: one that fails adds its partition here.
        let unloaded = self.storage.unloaded();
        let table = self.topics.read().expect("topic table lock").clone();
        // Directories recovery found without usable metadata: recovered
        // read-only or left alone, never altered or created over.
        let set_aside: Vec<PartitionId> = self
            .storage
            .recovery_report()
            .into_iter()
            .filter(|r| {
                matches!(
                    r.quarantine,
                    Some(
                        crate::storage::QuarantineReason::MissingMeta
                            | crate::storage::QuarantineReason::UnreadableMeta { .. }
                    )
                )
            })
            .map(|r| r.id)
            .collect();
        let mut leftovers = Leftovers::default();
        let mut grown: BTreeMap<String, u32> = BTreeMap::new();
        for (id, _) in &on_disk {
            let wanted = table
                .get(&*id.topic)
                .is_some_and(|t| id.partition < t.partitions);
            if !wanted {
                log::warn!(
                    "deleting partition {id}: its topic is no longer listed (a delete the last \
                     stop cut short, or one that could not remove it)"
                );
                self.delete_leftover(id, &mut leftovers).await;
            }
        }
        // Not loaded (nothing in them reads), but of a topic the table no
        // longer lists: a delete the stop cut short, as above. Left, one
        // would keep the name from being created again. Those of a listed
        // topic stay quarantined for an operator.
        for id in unloaded {
            if !table.contains_key(&*id.topic) {
                log::warn!(
                    "deleting partition {id} (not loaded: its metadata is unreadable): its \
                     topic is no longer listed"
                );
                self.delete_leftover(&id, &mut leftovers).await;
            }
        }
        for (topic, meta) in &table {
            for p in 0..meta.partitions {
                let id = PartitionId {
                    topic: topic.as_str().into(),
                    partition: p,
                };
                if set_aside.contains(&id) {
                    log::error!(
                        "partition {id}: its directory's metadata is missing or unreadable \
                         (see above); the partition is quarantined until an operator repairs \
                         or deletes it"
                    );
                    continue;
                }
                if let Some((_, cfg)) = on_disk.iter().find(|(d, _)| *d == id) {
                    // An alter a crash cut short: the partitions are
                    // altered before the table, its commit, so they go
                    // back to what the table says.
                    if *cfg != meta.config {
                        log::warn!(
                            "partition {id}: an interrupted topic alter; back to the topic \
                             table's config {}",
                            meta.config
                        );
                        match self.storage.alter_partition(&id, meta.config.clone()).await {
                            // A grow whose new slots took records a ring
                            // that never overwrites cannot give back.
                            Err(StorageError::RingTooSmall { .. })
                                if cfg.segments > meta.config.segments =>
                            {
                                let at = grown.entry(topic.clone()).or_insert(0);
                                *at = (*at).max(cfg.segments);
                            }
                            r => r?,
                        }
                    }
                }
                if !on_disk.iter().any(|(d, _)| *d == id) {
                    log::warn!("creating partition {id}: topic creation was interrupted");
                    let spare = self.cleanup_config(topic).policy.compacts();
                    self.storage
                        .create_partition_spared(id, meta.config.clone(), spare)
                        .await?;
                }
            }
        }
        for (topic, segments) in grown {
            self.keep_grown_ring(&topic, segments, &set_aside).await?;
        }
        Ok(leftovers)
    }

    /// Gives every compacted partition its compaction spare (one from
    /// before spares were reserved at create has none, nor one whose disk
    /// was full when an alter was cut short), and takes back those of
    /// partitions no longer compacted. Start-up goes on without a spare
    /// the disk has no room for: that partition's next compaction needs a
    /// segment of free room, as before.
    async fn reconcile_spares(&self) {
        let mut no_room = Vec::new();
        for (id, _) in self.storage.partitions() {
            let keep = self.cleanup_config(&id.topic).policy.compacts();
            // A spare that exists may still lack its room (made while the
            // disk was full): topped up too.
            let written = self
                .producers
                .snapshot_path(&id.topic, id.partition)
                .is_file();
            let reserved = match self.storage.set_spare(&id, keep).await {
                Ok(()) if keep && written => self.snapshot_room(&id.topic, id.partition),
                Ok(()) if keep => self.reserve_snapshot_room(&id.topic, id.partition),
                r => r,
            };
            match reserved {
                // Takes no writes: needs no room.
                Ok(()) | Err(StorageError::Quarantined(_)) => {}
                Err(e) if error::disk_full(&e) => no_room.push(id),
                Err(e) => log::warn!("partition {id}: the room its compactions need: {e}"),
            }
        }
        if let Some(first) = no_room.first() {
            log::warn!(
                "{} compacted partition(s) ({first}{}) lack the room a compaction writes into (a \
                 segment, the producers' snapshot) and the disk has none to reserve: each one's \
                 next compaction needs free room",
                no_room.len(),
                if no_room.len() > 1 { ", ..." } else { "" }
            );
        }
    }

    /// Completes the ring size of an alter a crash cut short whose grown
    /// ring cannot shrink back (it holds more than the old size and never
    /// overwrites): the table takes `segments`, and so does every
    /// partition of the topic (but those `set_aside`, left for an
    /// operator).
    async fn keep_grown_ring(
        &self,
        topic: &str,
        segments: u32,
        set_aside: &[PartitionId],
    ) -> Result<(), BrokerError> {
        let mut table = self.topics();
        let Some(meta) = table.get_mut(topic) else {
            return Ok(());
        };
        log::warn!(
            "topic {topic}: an interrupted alter grew its ring to {segments} segments and \
             records fill more than the {} it had; it keeps {segments}",
            meta.config.segments
        );
        meta.config.segments = segments;
        let meta = meta.clone();
        let admin = self.admin.lock().await;
        write_meta(&admin, &self.meta_path, table.clone())
            .await
            .map_err(StorageError::Meta)?;
        *self.topics.write().expect("topic table lock") = table;
        drop(admin);
        for p in 0..meta.partitions {
            let id = PartitionId::new(topic, p);
            if !set_aside.contains(&id) {
                self.storage
                    .alter_partition(&id, meta.config.clone())
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes a partition of a topic the table does not list. Its data
    /// is no one's, so one that cannot be deleted does not stop start-up:
    /// it stays unloaded, logged and counted, and refuses a create of its
    /// topic's name until it goes.
    async fn delete_leftover(&self, id: &PartitionId, leftovers: &mut Leftovers) {
        match self.storage.delete_partition(id).await {
            Ok(()) => leftovers.deleted.push(id.clone()),
            Err(e) => {
                log::error!(
                    "could not delete partition {id} of a deleted topic: {e}; it is kept \
                     unloaded, and creating topic {} is refused until it is gone",
                    id.topic
                );
                leftovers.kept.push(id.clone());
            }
        }
        self.producers.forget_partition(&id.topic, id.partition);
    }

    #[cfg(test)]
    fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn topics(&self) -> BTreeMap<String, TopicMeta> {
        self.topics.read().expect("topic table lock").clone()
    }

    pub fn topic(&self, name: &str) -> Result<TopicMeta, BrokerError> {
        self.topics
            .read()
            .expect("topic table lock")
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    /// Resolves a (topic, partition) pair to a storage id, with the errors a
    /// client should see for each way it can be wrong.
    pub fn partition_id(&self, topic: &str, partition: u32) -> Result<PartitionId, BrokerError> {
        let meta = self.topic(topic)?;
        if partition >= meta.partitions {
            return Err(BrokerError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            });
        }
        Ok(PartitionId {
            topic: self.topic_name(topic),
            partition,
        })
    }

    /// `topic` as the `Arc` every partition id of it shares: an id made
    /// for each record allocates nothing, and its last clone, dropped on
    /// the storage thread, frees nothing there (each such free took the
    /// network thread's malloc arena's lock).
    fn topic_name(&self, topic: &str) -> Arc<str> {
        if let Some(name) = self.names.read().expect("names lock").get(topic) {
            return name.clone();
        }
        let mut names = self.names.write().expect("names lock");
        if let Some(name) = names.get(topic) {
            return name.clone();
        }
        let name: Arc<str> = topic.into();
        names.insert(name.clone());
        name
    }

    /// The broker's own topics not made yet, but `except` (the one being
    /// made, which takes what was kept for it): each keeps a topic slot and
    /// [`INTERNAL_TOPIC_PARTITIONS`] of the limits, as it keeps its disk.
    fn unmade_internal(
        table: &BTreeMap<String, TopicMeta>,
        internal: &[(&'static str, u64)],
        except: &str,
    ) -> Vec<&'static str> {
        internal
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| *n != except && !table.contains_key(*n))
            .collect()
    }

    /// Topics from before the broker's own were counted in the limits (or
    /// from before they were lowered) stay; new ones, and the broker's
    /// own, wait until some are deleted. Said at start-up, where an
    /// operator looks, not first at a group commit.
    fn warn_if_limits_taken(
        topics: &BTreeMap<String, TopicMeta>,
        internal: &[(&'static str, u64)],
        limits: &BrokerLimits,
    ) {
        let unmade = Self::unmade_internal(topics, internal, "");
        if unmade.is_empty() {
            return;
        }
        let kept_partitions = unmade.len() * INTERNAL_TOPIC_PARTITIONS as usize;
        let partitions = Self::total_partitions(topics);
        let taken = [
            (
                "server.max_topics",
                "topics",
                topics.len(),
                unmade.len(),
                limits.max_topics,
            ),
            (
                "server.max_partitions",
                "partitions",
                partitions,
                kept_partitions,
                limits.max_partitions,
            ),
        ];
        for (key, what, have, kept, max) in taken {
            if have + kept > max {
                log::warn!(
                    "the topics hold {have} {what}, leaving less than the {kept} that \
                     {key} ({max}) keeps for the broker's own topics not made yet ({}): no \
                     topic can be created until some are deleted, and a group commit, \
                     transaction or share fetch that needs one of them is refused \
                     (too_many_{what})",
                    unmade.join(", ")
                );
            }
        }
    }

    /// The disk the topics' rings reserve together, with what the
    /// broker's own topics not made yet (`internal`) will take.
    fn reserved_bytes(
        table: &BTreeMap<String, TopicMeta>,
        cleanup: &cleaner::CleanupTable,
        internal: &[(&'static str, u64)],
    ) -> u64 {
        let topics: u64 = table
            .iter()
            .map(|(name, t)| {
                let policy = cleanup.get(name).map(|c| c.policy).unwrap_or_default();
                Self::topic_bytes(t, policy)
            })
            .sum();
        let unmade: u64 = internal
            .iter()
            .filter(|(name, _)| !table.contains_key(*name))
            .map(|(_, bytes)| bytes)
            .sum();
        topics.saturating_add(unmade)
    }

    /// A topic's rings, and on a compacted topic one more segment per
    /// partition: the scratch file a compaction writes before its rename.
    fn topic_bytes(t: &TopicMeta, policy: CleanupPolicy) -> u64 {
        let scratch = if policy.compacts() {
            t.config.segment_bytes
        } else {
            0
        };
        u64::from(t.partitions).saturating_mul(t.config.ring_bytes().saturating_add(scratch))
    }

    /// `storage.disk_budget_bytes`, and what the topics reserve of it.
    pub fn disk_usage(&self) -> (u64, u64) {
        let table = self.topics();
        let cleanup = self.cleanup.read().expect("cleanup lock").clone();
        (
            self.limits.disk_budget_bytes,
            Self::reserved_bytes(&table, &cleanup, &self.internal_topics),
        )
    }

    fn total_partitions(table: &BTreeMap<String, TopicMeta>) -> usize {
        table.values().map(|t| t.partitions as usize).sum()
    }

    pub async fn create_topic(
        &self,
        name: &str,
        spec: &TopicSpec,
    ) -> Result<TopicMeta, BrokerError> {
        validate_topic_name(name)?;
        let mut config = config_of(spec, &self.defaults);
        let cleanup = CleanupConfig {
            policy: spec.cleanup.unwrap_or_default(),
            tombstone_retention_ms: spec
                .tombstone_retention_ms
                .unwrap_or(cleaner::TOMBSTONE_RETENTION_MS_DEFAULT),
        };
        cleaner::apply_policy(&mut config, cleanup.policy, spec.overflow)?;
        config.validate().map_err(BrokerError::from)?;
        let window = msgid::MsgIdConfig {
            window_ms: spec.msg_id_window_ms.unwrap_or(0),
            window_records: spec.msg_id_window_records.unwrap_or(0),
        };
        if window.window_records > msgid::WINDOW_RECORDS_MAX {
            return Err(BrokerError::InvalidConfig(
                "msg_id_window_records must be at most 100000",
            ));
        }
        let partitions = spec.partitions.unwrap_or(self.default_partitions);
        if partitions == 0 {
            return Err(BrokerError::InvalidConfig("partitions must be at least 1"));
        }
        let meta = TopicMeta { partitions, config };

        let admin = self.admin.lock().await;
        let mut table = self.topics();
        if table.contains_key(name) {
            return Err(BrokerError::TopicExists(name.to_owned()));
        }
        // The broker's own topics not made yet keep their slots, as they
        // keep their disk below: one made takes exactly its own.
        let kept = Self::unmade_internal(&table, &self.internal_topics, name);
        if table.len() + kept.len() >= self.limits.max_topics {
            return Err(BrokerError::TooManyTopics {
                max: self.limits.max_topics,
                kept,
            });
        }
        let kept_partitions = kept.len() * INTERNAL_TOPIC_PARTITIONS as usize;
        if Self::total_partitions(&table) + kept_partitions + partitions as usize
            > self.limits.max_partitions
        {
            return Err(BrokerError::TooManyPartitions {
                max: self.limits.max_partitions,
                kept,
            });
        }
        let reserved_bytes = {
            let cleanup = self.cleanup.read().expect("cleanup lock");
            Self::reserved_bytes(&table, &cleanup, &self.internal_topics)
        };
        // One of the broker's own: what was kept for it is what it takes.
        let reserved_bytes = reserved_bytes.saturating_sub(
            self.internal_topics
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, bytes)| *bytes),
        );
        let topic_bytes = Self::topic_bytes(&meta, cleanup.policy);
        if reserved_bytes.saturating_add(topic_bytes) > self.limits.disk_budget_bytes {
            return Err(BrokerError::DiskLimit {
                topic_bytes,
                reserved_bytes,
                max: self.limits.disk_budget_bytes,
            });
        }
        self.delete_leftovers(name).await;
        // Settings first: a crash after them leaves entries of a topic
        // the table does not list, which the next start drops;
        // the table first would leave a listed topic without them (a
        // compacted topic that never compacts).
        if let Err((file, e)) = self
            .set_settings(&admin, name, Some(window), Some(cleanup))
            .await
        {
            // What could be written goes again (an earlier file did).
            self.unset_settings(&admin, name).await;
            return Err(BrokerError::TopicNotCreated {
                topic: name.to_owned(),
                file,
                error: Arc::new(e),
            });
        }
        table.insert(name.to_owned(), meta.clone());
        // A topic of this name deleted during a crash may have left
        // producer snapshots behind: they must not describe the new one.
        for p in 0..partitions {
            self.producers.forget_partition(name, p);
        }
        // Intent first (see the module docs), then the rings.
        if let Err(e) = write_meta(&admin, &self.meta_path, table.clone()).await {
            self.unset_settings(&admin, name).await;
            return Err(BrokerError::TopicNotCreated {
                topic: name.to_owned(),
                file: TOPICS_META_FILE,
                error: Arc::new(StorageError::Meta(e)),
            });
        }
        let hold = self
            .hold_new
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|h| h(name));
        for p in 0..partitions {
            let id = PartitionId {
                topic: name.into(),
                partition: p,
            };
            // A compacted topic's disk counts a segment per partition
            // for its compactions: reserved now, so that even the first
            // makes room on a full disk.
            let compacts = cleanup.policy.compacts();
            if let Err(e) = self
                .storage
                .create_partition_spared(id.clone(), meta.config.clone(), compacts)
                .await
            {
                // Roll back what was made so a failed create (a full disk, say)
                // leaves nothing behind; the error is the one the client sees.
                let (left, table_error) = self.rollback_create(&admin, name, p, &mut table).await;
                return Err(match BrokerError::creating_unlisted(name, e) {
                    // I/O: worded as a topic not created, as the
                    // settings' and table's failures are.
                    BrokerError::Storage(error) | BrokerError::NoSpace(error) => {
                        BrokerError::PartitionNotCreated {
                            topic: name.to_owned(),
                            partition: p,
                            compaction_room: false,
                            error,
                            left,
                            table_error,
                        }
                    }
                    e => e,
                });
            }
            if compacts {
                if let Err(e) = self.reserve_snapshot_room(name, p) {
                    let (left, table_error) =
                        self.rollback_create(&admin, name, p + 1, &mut table).await;
                    return Err(BrokerError::PartitionNotCreated {
                        topic: name.to_owned(),
                        partition: p,
                        compaction_room: true,
                        error: Arc::new(e),
                        left,
                        table_error,
                    });
                }
            }
            if hold {
                // Before the topic is visible to producers.
                if let Err(e) = self.storage.set_retain_floor(&id, Some(0)) {
                    self.rollback_create(&admin, name, p + 1, &mut table).await;
                    return Err(e.into());
                }
            }
        }
        *self.topics.write().expect("topic table lock") = table;
        log::info!(
            "created topic {name}: {partitions} partition(s) of {}, cleanup {}",
            meta.config,
            cleanup.policy
        );
        Ok(meta)
    }

    /// Removes the `made` partitions of a topic not created after all, and
    /// its entries; the partitions that could not be removed, and the
    /// table's write error if the table still lists it.
    async fn rollback_create(
        &self,
        admin: &Admin<'_>,
        name: &str,
        made: u32,
        table: &mut BTreeMap<String, TopicMeta>,
    ) -> (Vec<(u32, Arc<StorageError>)>, Option<Arc<StorageError>>) {
        let mut left = Vec::new();
        let mut table_error = None;
        for p in 0..made {
            let id = PartitionId {
                topic: name.into(),
                partition: p,
            };
            if let Err(e) = self.storage.delete_partition(&id).await {
                log::error!("rolling back topic {name}: cannot delete {id}: {e}");
                left.push((p, Arc::new(e)));
            }
            self.producers.forget_partition(name, p);
        }
        table.remove(name);
        if let Err(e) = write_meta(admin, &self.meta_path, table.clone()).await {
            log::error!("rolling back topic {name}: cannot rewrite the topic table: {e}");
            table_error = Some(Arc::new(StorageError::Meta(e)));
        }
        self.unset_settings(admin, name).await;
        (left, table_error)
    }

    /// Takes a topic not created after all out of the settings files. One
    /// that cannot be rewritten keeps its entry, which the next start
    /// drops (the table does not list the topic).
    async fn unset_settings(&self, admin: &Admin<'_>, name: &str) {
        if let Err((file, e)) = self.set_settings(admin, name, None, None).await {
            log::warn!("topic {name} not created, but its entry stays in {file}: {e}");
        }
    }

    /// Takes the topic out of the table, then deletes its partitions. A
    /// partition storage cannot remove does not stop the others nor the
    /// rest of the cleanup: storage keeps it unloaded, and it is deleted
    /// again when the name is created or at the next start (both refuse
    /// to make the name over it while it stays). Nor does a settings file
    /// that cannot be rewritten: the topic is gone all the same, and the
    /// error says so (`TopicDeleteIncomplete`).
    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let admin = self.admin.lock().await;
        let mut table = self.topics();
        let meta = table
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
        write_meta(&admin, &self.meta_path, table.clone())
            .await
            .map_err(StorageError::Meta)?;
        *self.topics.write().expect("topic table lock") = table;
        self.names.write().expect("names lock").remove(name);
        let mut left = Vec::new();
        for p in 0..meta.partitions {
            let id = PartitionId {
                topic: name.into(),
                partition: p,
            };
            match self.storage.delete_partition(&id).await {
                // Nothing of it on disk: nothing to delete.
                Ok(()) | Err(StorageError::UnknownPartition(_)) => {}
                Err(e) => {
                    log::error!("deleting topic {name}: {e}");
                    left.push((p, Arc::new(e)));
                }
            }
            self.producers.forget_partition(name, p);
        }
        let mut settings = Vec::new();
        if let Err(e) = self.set_window(&admin, name, None).await {
            settings.push((MSGID_META_FILE, Arc::new(e)));
        }
        if let Err(e) = self.set_cleanup(&admin, name, None).await {
            settings.push((cleaner::CLEANUP_META_FILE, Arc::new(e)));
        }
        for (file, e) in &settings {
            log::error!("deleting topic {name}: rewriting {file}: {e}");
        }
        if !left.is_empty() || !settings.is_empty() {
            return Err(BrokerError::TopicDeleteIncomplete {
                topic: name.to_owned(),
                left,
                settings,
            });
        }
        log::info!("deleted topic {name}");
        Ok(())
    }

    /// Deletes what storage holds of `topic`, which the table does not
    /// list, but could not remove before (a delete that could not
    /// finish): a create of the name tries again first.
    async fn delete_leftovers(&self, topic: &str) {
        for id in self.storage.unloaded() {
            if &*id.topic != topic {
                continue;
            }
            match self.storage.delete_partition(&id).await {
                Ok(()) => log::info!("deleted partition {id}, left by an earlier delete"),
                Err(e) => log::error!("creating topic {topic}: {e}"),
            }
        }
    }

    /// Holds a partition's ring back from dropping offsets at or past
    /// `floor` (`None`: release it): the mirror sets it to the first
    /// offset not yet upstream. A full ring then refuses produce with
    /// [`BrokerError::UpstreamBacklogFull`].
    pub fn set_retain_floor(
        &self,
        topic: &str,
        partition: u32,
        floor: Option<u64>,
    ) -> Result<(), BrokerError> {
        let id = self.partition_id(topic, partition)?;
        Ok(self.storage.set_retain_floor(&id, floor)?)
    }

    /// Partitions of topics created from now on for which `hold` says
    /// true start with a retain floor of 0: nothing leaves their rings
    /// until the floor is moved ([`Broker::set_retain_floor`]).
    pub fn hold_new_topics(&self, hold: HoldNew) {
        *self.hold_new.write().unwrap_or_else(|e| e.into_inner()) = Some(hold);
    }

    pub fn offsets(&self, topic: &str, partition: u32) -> Result<Offsets, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        Ok(self.storage.offsets(&id)?)
    }

    /// The first offset whose record timestamp is at or after `ts_ms`.
    /// Storage indexes whole batches (by their max timestamp); the record
    /// is found inside the batch it points at.
    pub async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        ts_ms: i64,
    ) -> Result<Option<u64>, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        let Some(at) = self.storage.offset_for_timestamp(&id, ts_ms).await? else {
            return Ok(None);
        };
        // One batch is enough: its max timestamp is at or after ts_ms.
        let bytes = self.storage.read(&id, at, 1).await?;
        let (records, _) = decode_records(&bytes)?;
        Ok(Some(
            records
                .iter()
                .find(|&&(offset, ts, _)| offset >= at && ts >= ts_ms)
                .map_or(at, |&(offset, _, _)| offset),
        ))
    }
}

/// Reads partition 0 of an internal log (offsets, transactions, share
/// state) from its earliest offset to its end, handing each record's
/// offset, timestamp, key and value to `visit` in order. A missing log reads as empty.
async fn replay_log(
    broker: &Broker,
    topic: &str,
    mut visit: impl FnMut(u64, i64, &[u8], &[u8]),
) -> Result<(), BrokerError> {
    if broker.topic(topic).is_err() {
        return Ok(());
    }
    let o = broker.offsets(topic, 0)?;
    let (mut at, end) = (o.earliest, o.high_watermark);
    while at < end {
        let part = FetchPartition {
            topic,
            partition: 0,
            offset: at,
            max_bytes: 1024 * 1024,
        };
        let limits = FetchLimits {
            min_bytes: 1,
            max_wait: std::time::Duration::ZERO,
            max_bytes: 1024 * 1024,
        };
        let fetched = broker.fetch(&[part], limits).await.remove(0)?;
        let (placed, next) = decode_records(&fetched.records)?;
        for (offset, ts, r) in placed {
            // A read starts at the batch holding `at`.
            if offset >= at {
                visit(
                    offset,
                    ts,
                    r.key.map_or(&[][..], |k| &k[..]),
                    r.value.map_or(&[][..], |v| &v[..]),
                );
            }
        }
        if next <= at {
            break;
        }
        at = next;
    }
    Ok(())
}

/// A record with its offset and timestamp.
type Placed<'a> = (u64, i64, crate::batch::Record<'a>);

/// Every record of the concatenated batches in `bytes` (as a read returns
/// them), in order; and the offset after the last batch (0 when there is
/// none). A batch that does not decode is an error.
fn decode_records(bytes: &[u8]) -> Result<(Vec<Placed<'_>>, u64), BrokerError> {
    let mut out = Vec::new();
    let mut next = 0;
    for view in crate::batch::BatchIter::new(bytes) {
        let view = view?;
        let h = view.header;
        for r in view.records()? {
            out.push((
                h.base_offset + u64::from(r.offset_delta),
                h.first_timestamp + r.timestamp_delta,
                r,
            ));
        }
        next = h.next_offset();
    }
    Ok((out, next))
}

/// A live change to a topic (`skiff topics alter`); unset fields stay.
#[derive(Debug, Clone, Default)]
pub struct TopicAlter {
    /// 0: no time retention.
    pub retention_ms: Option<u64>,
    pub durability: Option<Durability>,
    pub cleanup: Option<CleanupPolicy>,
    pub tombstone_retention_ms: Option<u64>,
    /// Segments per ring: grows or shrinks every partition's ring.
    pub segments: Option<u32>,
}

impl Broker {
    /// Changes a topic's retention, durability, cleanup policy and ring
    /// size live, all or nothing: every partition first (a shrink may be
    /// refused, a grow may not find the disk space), then the topic table,
    /// which is the commit (a start brings every partition in line with
    /// it, so a crash before it leaves the old settings), then the
    /// cleanup settings. A failure puts back what was changed and answers
    /// [`BrokerError::TopicNotAltered`]; only a cleanup file that cannot
    /// be written when the table cannot be put back either leaves the new
    /// settings but the old cleanup, as a restart loads them
    /// ([`BrokerError::TopicAlterIncomplete`]).
    pub async fn alter_topic(
        &self,
        name: &str,
        alter: &TopicAlter,
    ) -> Result<TopicMeta, BrokerError> {
        let admin = self.admin.lock().await;
        let mut table = self.topics();
        let before = table
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
        let old_cleanup = self.cleanup_config(name);
        let mut config = before.config.clone();
        if let Some(v) = alter.retention_ms {
            config.retention_ms = (v > 0).then_some(v);
        }
        if let Some(v) = alter.durability {
            config.durability = v;
        }
        if let Some(v) = alter.segments {
            config.segments = v;
        }
        let cleanup = CleanupConfig {
            policy: alter.cleanup.unwrap_or(old_cleanup.policy),
            tombstone_retention_ms: alter
                .tombstone_retention_ms
                .unwrap_or(old_cleanup.tombstone_retention_ms),
        };
        if old_cleanup.policy.compacts() && !cleanup.policy.compacts() {
            // Back to a plain ring: its overflow is the default again.
            config.overflow = self.defaults.overflow;
        }
        cleaner::apply_policy(&mut config, cleanup.policy, None)?;
        config.validate().map_err(BrokerError::from)?;
        let after = TopicMeta {
            partitions: before.partitions,
            config,
        };
        let reserved_bytes = {
            let c = self.cleanup.read().expect("cleanup lock");
            Self::reserved_bytes(&table, &c, &self.internal_topics)
        };
        let was = Self::topic_bytes(&before, old_cleanup.policy);
        let now = Self::topic_bytes(&after, cleanup.policy);
        if now > was
            && reserved_bytes.saturating_sub(was).saturating_add(now)
                > self.limits.disk_budget_bytes
        {
            return Err(BrokerError::DiskLimit {
                topic_bytes: now,
                reserved_bytes: reserved_bytes.saturating_sub(was),
                max: self.limits.disk_budget_bytes,
            });
        }
        // Compacted from now on: each partition's compaction spare (which
        // the disk budget counted above) first, as a create reserves it,
        // so that the first compaction makes room on a full disk too.
        if cleanup.policy.compacts() && !old_cleanup.policy.compacts() {
            for p in 0..after.partitions {
                let id = PartitionId::new(name, p);
                let reserved = match self.storage.set_spare(&id, true).await {
                    Ok(()) => self.reserve_snapshot_room(name, p),
                    Err(e) => Err(e),
                };
                if let Err(e) = reserved {
                    self.release_spares(name, p + 1).await;
                    log::warn!("topic {name} not altered: partition {p}'s compaction spare: {e}");
                    return Err(BrokerError::TopicNotAltered {
                        topic: name.to_owned(),
                        failed: AlterStep::Partition(p),
                        error: Arc::new(e),
                        unrestored: Vec::new(),
                        dropped: Vec::new(),
                    });
                }
            }
        }
        // What a shrink drops cannot be put back: the answer says so.
        let mut dropped = Vec::new();
        for p in 0..after.partitions {
            let id = PartitionId::new(name, p);
            let earliest = self.storage.offsets(&id).map(|o| o.earliest);
            match self
                .storage
                .alter_partition_dropping(&id, after.config.clone())
                .await
            {
                Ok(d) => dropped.extend(d.map(|at| (p, at))),
                Err(e) => {
                    // A failed alter applies no retention: only a shrink
                    // moves its earliest offset.
                    if let (Ok(was), Ok(o)) = (earliest, self.storage.offsets(&id)) {
                        if o.earliest > was {
                            dropped.push((p, o.earliest));
                        }
                    }
                    let failed = AlterStep::Partition(p);
                    return Err(self
                        .undo_alter(name, &before, p + 1, failed, e, dropped)
                        .await);
                }
            }
        }
        table.insert(name.to_owned(), after.clone());
        if let Err(e) = write_meta(&admin, &self.meta_path, table.clone()).await {
            let failed = AlterStep::File(TOPICS_META_FILE);
            let e = StorageError::Meta(e);
            return Err(self
                .undo_alter(name, &before, after.partitions, failed, e, dropped)
                .await);
        }
        if let Err(e) = self.set_cleanup(&admin, name, Some(cleanup)).await {
            table.insert(name.to_owned(), before.clone());
            if let Err(back) = write_meta(&admin, &self.meta_path, table.clone()).await {
                // The table keeps the new settings, and so does the
                // broker: what a restart loads is what it runs.
                table.insert(name.to_owned(), after.clone());
                *self.topics.write().expect("topic table lock") = table;
                log::error!(
                    "altered topic {name} to {}, except its cleanup settings: {}: {e}; {}: {back}",
                    after.config,
                    cleaner::CLEANUP_META_FILE,
                    TOPICS_META_FILE
                );
                return Err(BrokerError::TopicAlterIncomplete {
                    topic: name.to_owned(),
                    cleanup: old_cleanup,
                    error: Arc::new(e),
                    table_error: Arc::new(StorageError::Meta(back)),
                });
            }
            let failed = AlterStep::File(cleaner::CLEANUP_META_FILE);
            return Err(self
                .undo_alter(name, &before, after.partitions, failed, e, dropped)
                .await);
        }
        *self.topics.write().expect("topic table lock") = table;
        if old_cleanup.policy.compacts() && !cleanup.policy.compacts() {
            // No longer counted in the disk budget.
            self.release_spares(name, after.partitions).await;
        }
        log::info!(
            "altered topic {name}: {}, cleanup {}",
            after.config,
            cleanup.policy
        );
        Ok(after)
    }

    /// Writes a compacted partition's producers' snapshot while the disk
    /// has room: a compaction writes one before it frees segments, into
    /// the room the last write kept (`meta::write_atomic_reserved`), which
    /// the first has only if one was written before. That write keeps the
    /// room only while the disk has it, so the room is made sure of after:
    /// without it, the error (the write alone succeeded on a disk with a
    /// page free, and the first compaction on a full disk then failed).
    fn reserve_snapshot_room(&self, topic: &str, partition: u32) -> Result<(), StorageError> {
        let hw = self
            .storage
            .offsets(&PartitionId::new(topic, partition))?
            .high_watermark;
        self.producers
            .snapshot(topic, partition, hw)
            .map_err(|e| self.in_snapshot_file(topic, partition, e))?;
        self.snapshot_room(topic, partition)
    }

    /// The room a partition's next producers' snapshot is written into,
    /// topped up if it lacks some.
    fn snapshot_room(&self, topic: &str, partition: u32) -> Result<(), StorageError> {
        meta::reserve_room(&self.producers.snapshot_path(topic, partition))
            .map_err(|e| self.in_snapshot_file(topic, partition, meta::MetaError::Io(e)))
    }

    /// A snapshot's error, naming the file: what an operator looks at.
    fn in_snapshot_file(&self, topic: &str, partition: u32, e: meta::MetaError) -> StorageError {
        StorageError::Meta(meta::MetaError::File {
            path: self.producers.snapshot_path(topic, partition),
            error: Box::new(e),
        })
    }

    /// Gives back the compaction spares of partitions `0..n` of a topic
    /// not compacted (as far as it can: one left is taken back at the next
    /// start).
    async fn release_spares(&self, name: &str, n: u32) {
        for p in 0..n {
            let id = PartitionId::new(name, p);
            if let Err(e) = self.storage.set_spare(&id, false).await {
                log::warn!("partition {id}: its compaction spare stays until the next start: {e}");
            }
        }
    }

    /// Puts partitions `0..n` of a topic whose alter failed at `failed`
    /// back to their config `before`, and says so: the alter's error. A
    /// partition's own refusal (a shrink its data does not fit, say) that
    /// changed nothing is answered as itself.
    async fn undo_alter(
        &self,
        name: &str,
        before: &TopicMeta,
        n: u32,
        failed: AlterStep,
        error: StorageError,
        dropped: Vec<(u32, u64)>,
    ) -> BrokerError {
        let error = Arc::new(error);
        let mut unrestored = Vec::new();
        for p in 0..n {
            let id = PartitionId::new(name, p);
            if let Err(e) = self
                .storage
                .alter_partition(&id, before.config.clone())
                .await
            {
                log::error!(
                    "partition {id}: the alter failed ({failed}: {error}) and the partition \
                     could not be put back ({e}); it keeps the new settings until the next \
                     start restores the old ones"
                );
                unrestored.push((p, Arc::new(e)));
            }
        }
        if !self.cleanup_config(name).policy.compacts() {
            // Reserved by an alter to a compacted topic that did not take.
            self.release_spares(name, before.partitions).await;
        }
        if matches!(failed, AlterStep::Partition(_)) && unrestored.is_empty() && dropped.is_empty()
        {
            let own = BrokerError::from(error.clone());
            if !matches!(own, BrokerError::Storage(_) | BrokerError::NoSpace(_)) {
                return own;
            }
        }
        log::warn!("topic {name} not altered: {failed}: {error}");
        BrokerError::TopicNotAltered {
            topic: name.to_owned(),
            failed,
            error,
            unrestored,
            dropped,
        }
    }
}

#[cfg(test)]
mod compaction_tests;
#[cfg(test)]
mod tests;
