//! Topics and partitions on top of the storage engine.
//!
//! A topic is a name, a partition count and one [`PartitionConfig`] shared by
//! its partitions. The topic table lives in `<data_dir>/topics.meta`, written
//! atomically, and is the source of truth for which topics exist:
//!
//! - create: the table entry is written first, then the partitions; a crash
//!   in between is completed at the next start (missing partitions created).
//! - delete: the entry is removed first, then the partitions; partitions with
//!   no entry are deleted at the next start.
//!
//! So a crash never leaves a half-made topic visible to clients.
//!
//! Idempotent producers (ids, epochs, sequence windows) live in
//! [`producers`]; the broker checks every idempotent batch there before it
//! reaches storage and rebuilds the table at start-up.

pub mod msgid;
pub mod producers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::batch::BatchHeader;
use crate::storage::{
    meta, AppendAck, AppendTicket, Offsets, PartitionConfig, PartitionId, Storage, StorageError,
    Wake,
};

pub use crate::storage::TOPIC_NAME_BYTES_MAX;
const TOPICS_META_FILE: &str = "topics.meta";
/// Per-topic message-id windows. A file of its own: topics.meta is postcard,
/// which is not self-describing, so a field added to `TopicMeta` would make
/// old files unreadable.
const MSGID_META_FILE: &str = "msgid.meta";

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
    /// Capacity of the producer sequence table (entries are per producer
    /// and partition).
    pub max_producers: usize,
    /// A producer entry idle this long is forgotten.
    pub producer_idle_expiry_ms: u64,
}

/// What a queued batch leaves to do once it is acknowledged or failed.
#[derive(Debug, Default)]
pub struct PendingWrite {
    tracked: Option<producers::Ticket>,
    /// Message ids remembered for this batch: forgotten if it fails.
    remembered: Option<(String, Vec<u64>)>,
    /// Records dropped by the message-id window before writing.
    pub dropped: u32,
}

/// Bytes read per step when the producer table is rebuilt from the log.
const RECOVERY_READ_BYTES: usize = 1024 * 1024;

enum Windowed {
    /// Write this batch; the ids remembered for it and the records dropped.
    Keep {
        batch: Vec<u8>,
        remembered: (Vec<u64>, u32),
    },
    /// Every record was a duplicate: write nothing.
    AllDuplicates,
}

/// Where an idempotent or plain batch stands after [`Broker::submit_produce`].
#[derive(Debug)]
pub enum Submitted {
    /// In storage's queue; `pending` goes back to
    /// [`Broker::complete_produce`] with the outcome.
    Queued {
        ticket: AppendTicket,
        pending: PendingWrite,
    },
    /// A retry of a batch already written: nothing was written again.
    Duplicate {
        base_offset: u64,
        last_offset: u64,
        records: u32,
    },
    /// A retry of a batch still in flight: its outcome is the answer.
    InFlight {
        slot: Arc<producers::Slot>,
        records: u32,
    },
}

/// What a client asks for when creating a topic; unset fields take the
/// broker's defaults.
#[derive(Debug, Clone, Default)]
pub struct TopicSpec {
    pub partitions: Option<u32>,
    pub segment_bytes: Option<u64>,
    pub segments: Option<u32>,
    pub retention_ms: Option<u64>,
    pub durability: Option<crate::storage::Durability>,
    pub overflow: Option<crate::storage::OverflowPolicy>,
    /// Message-id dedup window by time; 0 or None = off.
    pub msg_id_window_ms: Option<u64>,
    /// Message-id dedup window by count; 0 or None = off.
    pub msg_id_window_records: Option<u32>,
}

#[derive(Debug)]
#[non_exhaustive]
pub enum BrokerError {
    UnknownTopic(String),
    UnknownPartition {
        topic: String,
        partition: u32,
    },
    TopicExists(String),
    /// Empty, too long, or a character outside `[A-Za-z0-9._-]`.
    InvalidTopicName(String),
    TooManyTopics {
        max: usize,
    },
    TooManyPartitions {
        max: usize,
    },
    InvalidConfig(&'static str),
    /// An idempotent producer's batch was refused (fenced, out of order...).
    Sequence(producers::SequenceError),
    Storage(StorageError),
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownTopic(t) => write!(f, "unknown topic '{t}'"),
            Self::UnknownPartition { topic, partition } => {
                write!(f, "topic '{topic}' has no partition {partition}")
            }
            Self::TopicExists(t) => write!(f, "topic '{t}' already exists"),
            Self::InvalidTopicName(t) => write!(
                f,
                "invalid topic name '{t}': use 1 to {TOPIC_NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -"
            ),
            Self::TooManyTopics { max } => write!(f, "topic limit reached ({max})"),
            Self::TooManyPartitions { max } => write!(f, "partition limit reached ({max})"),
            Self::InvalidConfig(what) => write!(f, "invalid topic config: {what}"),
            Self::Sequence(e) => write!(f, "{e}"),
            Self::Storage(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BrokerError {}

impl From<StorageError> for BrokerError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::UnknownPartition(id) => Self::UnknownPartition {
                topic: id.topic,
                partition: id.partition,
            },
            e => Self::Storage(e),
        }
    }
}

/// Storage owns the rule (names become directory names); the broker gives
/// the client-facing error.
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    crate::storage::validate_topic_name(name)
        .map_err(|_| BrokerError::InvalidTopicName(name.to_owned()))
}

pub struct Broker {
    storage: Storage,
    topics: RwLock<BTreeMap<String, TopicMeta>>,
    /// Serialises create and delete so limits and the table stay consistent.
    admin: smol::lock::Mutex<()>,
    meta_path: PathBuf,
    limits: BrokerLimits,
    defaults: PartitionConfig,
    default_partitions: u32,
    producers: producers::Producers,
    /// Held from an idempotent or windowed batch's checks to its submit, so
    /// the order of checks is the order in the log.
    submit_order: smol::lock::Mutex<()>,
    msgid_path: PathBuf,
    /// Topics with a message-id window.
    windows: std::sync::Mutex<BTreeMap<String, msgid::Window>>,
    msg_id_duplicates: std::sync::atomic::AtomicU64,
    /// One snapshot writer at a time (the periodic task and the stop).
    snapshot_lock: std::sync::Mutex<()>,
}

impl Broker {
    /// Loads the topic table and finishes any create or delete a crash
    /// interrupted.
    pub fn open(
        storage: Storage,
        data_dir: PathBuf,
        limits: BrokerLimits,
        defaults: PartitionConfig,
        default_partitions: u32,
    ) -> Result<Arc<Broker>, BrokerError> {
        let meta_path = data_dir.join(TOPICS_META_FILE);
        let msgid_path = data_dir.join(MSGID_META_FILE);
        let msgid: BTreeMap<String, msgid::MsgIdConfig> = meta::read(&msgid_path)
            .map_err(|e| BrokerError::Storage(StorageError::Meta(e)))?
            .unwrap_or_default();
        let topics: BTreeMap<String, TopicMeta> = meta::read(&meta_path)
            .map_err(|e| BrokerError::Storage(StorageError::Meta(e)))?
            .unwrap_or_default();
        let producers = producers::Producers::open(
            &data_dir,
            producers::ProducersConfig {
                max_producers: limits.max_producers,
                idle_expiry_ms: limits.producer_idle_expiry_ms,
            },
        )
        .map_err(|e| BrokerError::Storage(StorageError::Meta(e)))?;
        let broker = Broker {
            storage,
            topics: RwLock::new(topics),
            admin: smol::lock::Mutex::new(()),
            meta_path,
            limits,
            defaults,
            default_partitions,
            producers,
            submit_order: smol::lock::Mutex::new(()),
            msgid_path,
            windows: std::sync::Mutex::new(
                msgid
                    .into_iter()
                    .filter(|(_, c)| c.enabled())
                    .map(|(t, c)| (t, msgid::Window::new(c)))
                    .collect(),
            ),
            msg_id_duplicates: std::sync::atomic::AtomicU64::new(0),
            snapshot_lock: std::sync::Mutex::new(()),
        };
        smol::block_on(async {
            broker.reconcile().await?;
            broker.recover_producers().await?;
            broker.recover_msgid_windows().await
        })?;
        Ok(Arc::new(broker))
    }

    /// Rebuilds the producer table: each partition's snapshot, then the
    /// batch headers after it up to the high watermark.
    async fn recover_producers(&self) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        let mut scanned = 0u64;
        for (topic, meta) in self.topics() {
            for p in 0..meta.partitions {
                let id = PartitionId {
                    topic: topic.clone(),
                    partition: p,
                };
                let o = self.storage.offsets(&id)?;
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
        let now = crate::batch::now_ms();
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
                    topic: topic.clone(),
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
    /// still hold at `now`.
    async fn collect_msg_ids(
        &self,
        id: &PartitionId,
        config: msgid::MsgIdConfig,
        now: i64,
        out: &mut Vec<(i64, u64)>,
    ) -> Result<(), BrokerError> {
        let o = self.storage.offsets(id)?;
        let mut from = o
            .earliest
            .max(o.high_watermark.saturating_sub(config.capacity() as u64));
        let mut oldest_ts = i64::MIN;
        if config.window_ms > 0 {
            oldest_ts = now.saturating_sub(config.window_ms as i64);
            match self.storage.offset_for_timestamp(id, oldest_ts).await? {
                Some(at) => from = from.max(at),
                None => return Ok(()),
            }
        }
        let mut at = from;
        while at < o.high_watermark {
            let bytes = self.storage.read(id, at, RECOVERY_READ_BYTES).await?;
            let (records, next) = decode_records(&bytes)?;
            for (offset, ts, r) in records {
                if offset < from || ts < oldest_ts {
                    continue;
                }
                if let Some(hd) = r.headers.iter().find(|hd| hd.name == msgid::MSG_ID_HEADER) {
                    out.push((ts, msgid::id_hash(hd.value)));
                }
            }
            if next <= at {
                break;
            }
            at = next;
        }
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

    fn write_msgid_meta(&self) -> Result<(), BrokerError> {
        meta::write_atomic(&self.msgid_path, &self.msgid_configs())
            .map_err(|e| BrokerError::Storage(StorageError::Meta(e)))
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

    async fn reconcile(&self) -> Result<(), BrokerError> {
        let on_disk = self.storage.partitions();
        let table = self.topics.read().expect("topic table lock").clone();
        for (id, _) in &on_disk {
            let wanted = table
                .get(&id.topic)
                .is_some_and(|t| id.partition < t.partitions);
            if !wanted {
                log::warn!("deleting partition {id}: its topic was being deleted at the last stop");
                self.storage.delete_partition(id).await?;
                self.producers.forget_partition(&id.topic, id.partition);
            }
        }
        for (topic, meta) in &table {
            for p in 0..meta.partitions {
                let id = PartitionId {
                    topic: topic.clone(),
                    partition: p,
                };
                if !on_disk.iter().any(|(d, _)| *d == id) {
                    log::warn!("creating partition {id}: topic creation was interrupted");
                    self.storage
                        .create_partition(id, meta.config.clone())
                        .await?;
                }
            }
        }
        Ok(())
    }

    pub fn storage(&self) -> &Storage {
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
            topic: topic.to_owned(),
            partition,
        })
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
        let mut config = self.defaults.clone();
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
        config.validate()?;
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

        let _admin = self.admin.lock().await;
        let mut table = self.topics();
        if table.contains_key(name) {
            return Err(BrokerError::TopicExists(name.to_owned()));
        }
        if table.len() >= self.limits.max_topics {
            return Err(BrokerError::TooManyTopics {
                max: self.limits.max_topics,
            });
        }
        if Self::total_partitions(&table) + partitions as usize > self.limits.max_partitions {
            return Err(BrokerError::TooManyPartitions {
                max: self.limits.max_partitions,
            });
        }
        table.insert(name.to_owned(), meta.clone());
        // A topic of this name deleted during a crash may have left
        // producer snapshots behind: they must not describe the new one.
        for p in 0..partitions {
            self.producers.forget_partition(name, p);
        }
        // Intent first (see the module docs), then the rings.
        meta::write_atomic(&self.meta_path, &table)
            .map_err(|e| BrokerError::Storage(StorageError::Meta(e)))?;
        for p in 0..partitions {
            let id = PartitionId {
                topic: name.to_owned(),
                partition: p,
            };
            if let Err(e) = self.storage.create_partition(id, meta.config.clone()).await {
                // Roll back what was made so a failed create (a full disk, say)
                // leaves nothing behind; the error is the one the client sees.
                self.rollback_create(name, p, &mut table).await;
                return Err(e.into());
            }
        }
        *self.topics.write().expect("topic table lock") = table;
        let stale = self
            .windows
            .lock()
            .expect("windows lock")
            .remove(name)
            .is_some();
        if window.enabled() {
            self.windows
                .lock()
                .expect("windows lock")
                .insert(name.to_owned(), msgid::Window::new(window));
        }
        if window.enabled() || stale {
            self.write_msgid_meta()?;
        }
        log::info!(
            "created topic {name}: {partitions} partition(s), {:?}",
            meta.config
        );
        Ok(meta)
    }

    async fn rollback_create(
        &self,
        name: &str,
        made: u32,
        table: &mut BTreeMap<String, TopicMeta>,
    ) {
        for p in 0..made {
            let id = PartitionId {
                topic: name.to_owned(),
                partition: p,
            };
            if let Err(e) = self.storage.delete_partition(&id).await {
                log::error!("rolling back topic {name}: cannot delete {id}: {e}");
            }
        }
        table.remove(name);
        if let Err(e) = meta::write_atomic(&self.meta_path, &*table) {
            log::error!("rolling back topic {name}: cannot rewrite the topic table: {e}");
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let mut table = self.topics();
        let meta = table
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
        meta::write_atomic(&self.meta_path, &table)
            .map_err(|e| BrokerError::Storage(StorageError::Meta(e)))?;
        *self.topics.write().expect("topic table lock") = table;
        for p in 0..meta.partitions {
            let id = PartitionId {
                topic: name.to_owned(),
                partition: p,
            };
            self.storage.delete_partition(&id).await?;
            self.producers.forget_partition(name, p);
        }
        let had_window = self
            .windows
            .lock()
            .expect("windows lock")
            .remove(name)
            .is_some();
        if had_window {
            self.write_msgid_meta()?;
        }
        log::info!("deleted topic {name}");
        Ok(())
    }

    /// Hands a producer batch to storage. The call order of `submit` is the
    /// order in the log; the ticket resolves when the batch is durable.
    pub async fn submit(
        &self,
        topic: &str,
        partition: u32,
        batch: Vec<u8>,
    ) -> Result<AppendTicket, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        Ok(self.storage.submit(&id, batch).await?)
    }

    /// Submits a producer batch, checking an idempotent producer's
    /// sequence first (see [`producers`]): a retry of a written batch is
    /// answered from the table and not written again. On a topic with a
    /// message-id window, records whose id is in the window are dropped
    /// (see [`msgid`]).
    /// With [`Wake::Later`] the storage thread is not woken for it: the
    /// caller calls [`Storage::wake`] once it has submitted a request's
    /// batches, so they are written as one group.
    pub async fn submit_produce(
        &self,
        topic: &str,
        partition: u32,
        batch: Vec<u8>,
        wake: Wake,
    ) -> Result<Submitted, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        let invalid = |e| BrokerError::Storage(StorageError::InvalidBatch(e));
        let header: BatchHeader = crate::batch::parse_header(&batch).map_err(invalid)?;
        let windowed = self
            .windows
            .lock()
            .expect("windows lock")
            .contains_key(topic);
        if !header.is_idempotent() && !windowed {
            let ticket = self.storage.submit_with(&id, batch, wake).await?;
            return Ok(Submitted::Queued {
                ticket,
                pending: PendingWrite::default(),
            });
        }
        // A whole check (CRC included) before the batch takes a sequence:
        // storage can then fail it only for reasons that are sticky or
        // shared by the batches after it (see producers' module docs). The
        // check is handed to storage, which does not repeat it.
        let checked = crate::storage::CheckedBatch::check(batch)?;
        let _order = self.submit_order.lock().await;
        let hw = self.storage.offsets(&id)?.high_watermark;
        let tracked = match self.producers.check(topic, partition, &header, hw) {
            producers::Check::Untracked => None,
            producers::Check::Accept(tracked) => Some(tracked),
            producers::Check::Duplicate {
                base_offset,
                last_offset,
                records,
            } => {
                return Ok(Submitted::Duplicate {
                    base_offset,
                    last_offset,
                    records,
                })
            }
            producers::Check::InFlight { slot, records } => {
                return Ok(Submitted::InFlight { slot, records })
            }
            producers::Check::Reject(e) => return Err(BrokerError::Sequence(e)),
        };
        let mut pending = PendingWrite {
            tracked,
            ..PendingWrite::default()
        };
        let submitted = if windowed {
            match self.apply_window(topic, &header, checked.into_bytes())? {
                Windowed::Keep { batch, remembered } => {
                    pending.remembered = Some((topic.to_owned(), remembered.0));
                    pending.dropped = remembered.1;
                    // Maybe re-encoded: checked again.
                    self.storage.submit_with(&id, batch, wake).await
                }
                Windowed::AllDuplicates => {
                    // Nothing to write. The answer names the last offset
                    // written (none: 0); see docs/semantics.md.
                    let at = hw.saturating_sub(1);
                    if let Some(t) = pending.tracked.take() {
                        self.producers.complete(t, Ok((at, at)));
                    }
                    return Ok(Submitted::Duplicate {
                        base_offset: at,
                        last_offset: at,
                        records: header.record_count,
                    });
                }
            }
        } else {
            self.storage.submit_checked_with(&id, checked, wake).await
        };
        match submitted {
            Ok(ticket) => Ok(Submitted::Queued { ticket, pending }),
            Err(e) => {
                // Nobody waits on this slot (the order lock is held),
                // so a description of the error is enough for it.
                let copy = Arc::new(StorageError::Io(std::io::Error::other(e.to_string())));
                self.fail_pending(pending, copy);
                Err(e.into())
            }
        }
    }

    /// Drops the records whose message id is in the topic's window and
    /// remembers the others' ids. A batch that loses records is re-encoded
    /// (the one place the broker re-encodes a batch): for an idempotent
    /// producer its base sequence is moved up so that its last sequence,
    /// which the next batch follows, is unchanged.
    fn apply_window(
        &self,
        topic: &str,
        header: &BatchHeader,
        batch: Vec<u8>,
    ) -> Result<Windowed, BrokerError> {
        let invalid = |e| BrokerError::Storage(StorageError::InvalidBatch(e));
        let view = crate::batch::BatchView::new(&batch).map_err(invalid)?;
        let records = view.records().map_err(invalid)?;
        let now = crate::batch::now_ms();
        let mut remembered = Vec::new();
        let mut keep = Vec::with_capacity(records.len());
        {
            let mut windows = self.windows.lock().expect("windows lock");
            let Some(w) = windows.get_mut(topic) else {
                return Ok(Windowed::Keep {
                    batch,
                    remembered: (Vec::new(), 0),
                });
            };
            for r in &records {
                let id = r
                    .headers
                    .iter()
                    .find(|h| h.name == msgid::MSG_ID_HEADER)
                    .map(|h| msgid::id_hash(h.value));
                match id {
                    Some(h) if w.check_and_insert(h, now) => keep.push(false),
                    Some(h) => {
                        remembered.push(h);
                        keep.push(true);
                    }
                    None => keep.push(true),
                }
            }
        }
        let kept = keep.iter().filter(|&&k| k).count() as u32;
        let dropped = header.record_count - kept;
        self.msg_id_duplicates
            .fetch_add(u64::from(dropped), std::sync::atomic::Ordering::Relaxed);
        if dropped == 0 {
            return Ok(Windowed::Keep {
                batch,
                remembered: (remembered, 0),
            });
        }
        if kept == 0 {
            return Ok(Windowed::AllDuplicates);
        }
        let mut b = crate::batch::BatchBuilder::new();
        for (r, _) in records.iter().zip(&keep).filter(|(_, &k)| k) {
            let headers: Vec<(&str, &[u8])> = r
                .headers
                .iter()
                .map(|h| (h.name, h.value.as_ref()))
                .collect();
            b.push(
                header.first_timestamp + r.timestamp_delta,
                r.key.map(|k| k.as_ref()),
                r.value,
                &headers,
            );
        }
        let stamp = if header.is_idempotent() {
            let last = i64::from(header.last_sequence());
            crate::batch::ProducerStamp {
                producer_id: header.producer_id,
                producer_epoch: header.producer_epoch,
                base_sequence: (last - i64::from(kept) + 1).rem_euclid(i64::from(i32::MAX) + 1)
                    as i32,
            }
        } else {
            crate::batch::ProducerStamp::NONE
        };
        Ok(Windowed::Keep {
            batch: b.finish(stamp),
            remembered: (remembered, dropped),
        })
    }

    fn fail_pending(&self, pending: PendingWrite, e: Arc<StorageError>) {
        if let Some(t) = pending.tracked {
            self.producers.complete(t, Err(e));
        }
        if let Some((topic, ids)) = pending.remembered {
            if let Some(w) = self.windows.lock().expect("windows lock").get_mut(&topic) {
                w.forget(&ids);
            }
        }
    }

    /// Awaits a queued batch's acknowledgement and records it for its
    /// producer (or, on failure, forgets its message ids).
    pub async fn complete_produce(
        &self,
        ticket: AppendTicket,
        pending: PendingWrite,
    ) -> Result<AppendAck, Arc<StorageError>> {
        let r = ticket.await.map_err(Arc::new);
        match &r {
            Ok(a) => {
                if let Some(t) = pending.tracked {
                    self.producers
                        .complete(t, Ok((a.base_offset, a.last_offset)));
                }
            }
            Err(e) => self.fail_pending(pending, e.clone()),
        }
        r
    }

    pub async fn append(
        &self,
        topic: &str,
        partition: u32,
        batch: Vec<u8>,
    ) -> Result<AppendAck, BrokerError> {
        Ok(self.submit(topic, partition, batch).await?.await?)
    }

    pub fn offsets(&self, topic: &str, partition: u32) -> Result<Offsets, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        Ok(self.storage.offsets(&id)?)
    }

    /// Reads whole batches from `offset`; with `max_wait`, waits (long poll)
    /// until there is data past `offset` or the wait ends.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<(Vec<u8>, Offsets), BrokerError> {
        let id = self.partition_id(topic, partition)?;
        let deadline = std::time::Instant::now() + max_wait;
        let event = self.storage.data_event(&id)?;
        loop {
            // Listen before looking, so an append between the look and the
            // wait still wakes us.
            let listener = event.listen();
            let offsets = self.storage.offsets(&id)?;
            if offset != offsets.high_watermark || std::time::Instant::now() >= deadline {
                let bytes = self.storage.read(&id, offset, max_bytes).await?;
                return Ok((bytes, self.storage.offsets(&id)?));
            }
            let timer = smol::Timer::at(deadline);
            futures_lite::future::or(
                async {
                    listener.await;
                },
                async {
                    timer.await;
                },
            )
            .await;
        }
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

/// A record with its offset and timestamp.
type Placed<'a> = (u64, i64, crate::batch::Record<'a>);

/// Every record of the concatenated batches in `bytes` (as a read returns
/// them), in order; and the offset after the last batch (0 when there is
/// none). A batch that does not decode is an error.
fn decode_records(bytes: &[u8]) -> Result<(Vec<Placed<'_>>, u64), BrokerError> {
    let invalid = |e| BrokerError::Storage(StorageError::InvalidBatch(e));
    let mut out = Vec::new();
    let mut next = 0;
    for view in crate::batch::BatchIter::new(bytes) {
        let view = view.map_err(invalid)?;
        let h = view.header;
        for r in view.records().map_err(invalid)? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, ProducerStamp};
    use crate::storage::tests::{small_cfg, Rig};
    use smol::block_on;

    fn open(storage: Storage, rig: &Rig) -> Arc<Broker> {
        let limits = BrokerLimits {
            max_topics: 4,
            max_partitions: 8,
            max_producers: 16,
            producer_idle_expiry_ms: 60_000,
        };
        Broker::open(
            storage,
            rig.dir.path().to_path_buf(),
            limits,
            small_cfg(),
            1,
        )
        .expect("broker opens")
    }

    /// Submits a batch with one record of `value_bytes` whose msg-id is
    /// `id`; whether it was written (else dropped as a duplicate).
    fn produce(b: &Broker, id: &str, value_bytes: usize) -> bool {
        let mut bb = BatchBuilder::new();
        let value = vec![b'v'; value_bytes];
        bb.push(
            crate::batch::now_ms(),
            None,
            &value,
            &[("msg-id", id.as_bytes())],
        );
        let batch = bb.finish(ProducerStamp::NONE);
        match block_on(b.submit_produce("w", 0, batch, Wake::Now)).expect("submit") {
            Submitted::Queued { ticket, pending } => {
                block_on(b.complete_produce(ticket, pending)).expect("written");
                true
            }
            Submitted::Duplicate { .. } => false,
            Submitted::InFlight { .. } => panic!("no retries here"),
        }
    }

    /// The refill cannot read a partition (a batch damaged on disk, so it
    /// is quarantined): the broker still starts. The same log undamaged
    /// refills the window.
    #[test]
    fn a_window_refill_that_cannot_read_the_log_does_not_stop_start_up() {
        let rig = Rig::fault(5);
        let b = open(rig.open(), &rig);
        let spec = TopicSpec {
            partitions: Some(1),
            msg_id_window_ms: Some(600_000),
            ..TopicSpec::default()
        };
        block_on(b.create_topic("w", &spec)).expect("create");
        assert!(produce(&b, "e1", 1));
        // Past the tail's last block: e1 is read back from the device.
        assert!(produce(&b, "filler", 8 * 1024));
        b.storage().shutdown().expect("shutdown");
        drop(b);

        let b = open(rig.open(), &rig);
        assert!(!produce(&b, "e1", 1), "refilled from a readable log");
        b.storage().shutdown().expect("shutdown");
        drop(b);

        // Damage that recovery has passed already (it came after): the
        // refill's read finds it and the partition is quarantined.
        let storage = rig.open();
        let seg = rig.dir.path().join("topics/w/0/seg-00000.log");
        assert!(rig
            .disk()
            .expect("fault rig")
            .flip_stored_bit(&seg, 4096 + 66, 3));
        let b = open(storage, &rig);
        // The read did find it: the partition now refuses writes.
        let mut bb = BatchBuilder::new();
        bb.push(1, None, b"v", &[]);
        let refused =
            match block_on(b.submit_produce("w", 0, bb.finish(ProducerStamp::NONE), Wake::Now)) {
                Ok(Submitted::Queued { ticket, pending }) => {
                    block_on(b.complete_produce(ticket, pending)).is_err()
                }
                Ok(_) => false,
                Err(_) => true,
            };
        assert!(refused, "quarantined by the refill's read");
        b.storage().shutdown().expect("shutdown");
    }
}
