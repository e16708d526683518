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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::storage::{
    meta, AppendAck, AppendTicket, Offsets, PartitionConfig, PartitionId, Storage, StorageError,
};

/// Longest topic name, as Kafka's (so mirrored names fit upstream).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
const TOPICS_META_FILE: &str = "topics.meta";

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

pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::InvalidTopicName(name.to_owned()))
    }
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
        let topics: BTreeMap<String, TopicMeta> = meta::read(&meta_path)
            .map_err(|e| BrokerError::Storage(StorageError::Meta(e)))?
            .unwrap_or_default();
        let broker = Broker {
            storage,
            topics: RwLock::new(topics),
            admin: smol::lock::Mutex::new(()),
            meta_path,
            limits,
            defaults,
            default_partitions,
        };
        smol::block_on(broker.reconcile())?;
        Ok(Arc::new(broker))
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
        for view in crate::batch::BatchIter::new(&bytes) {
            let view = view.map_err(|e| BrokerError::Storage(StorageError::InvalidBatch(e)))?;
            let h = view.header;
            let records = view
                .records()
                .map_err(|e| BrokerError::Storage(StorageError::InvalidBatch(e)))?;
            for r in records {
                let offset = h.base_offset + u64::from(r.offset_delta);
                if offset >= at && h.first_timestamp + r.timestamp_delta >= ts_ms {
                    return Ok(Some(offset));
                }
            }
        }
        Ok(Some(at))
    }
}
