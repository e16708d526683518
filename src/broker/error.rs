//! What the broker's callers see when something fails: [`BrokerError`].
//!
//! Storage's errors are mapped here, once, into the variants a caller can
//! act on (the server turns each into a wire code); only failures a
//! client cannot act on (I/O, metadata files) stay wrapped, as
//! [`BrokerError::Storage`], with the storage error as their source.

use std::sync::Arc;

use crate::batch::BatchError;
use crate::storage::{PartitionId, StorageError, TOPIC_NAME_BYTES_MAX};

use super::producers::SequenceError;

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
    /// `server.max_topics` is reached; `kept` are the broker's own topics
    /// not made yet whose slots it keeps.
    TooManyTopics {
        max: usize,
        kept: Vec<&'static str>,
    },
    /// `server.max_partitions` is reached; `kept` as for
    /// [`BrokerError::TooManyTopics`] (a partition each).
    TooManyPartitions {
        max: usize,
        kept: Vec<&'static str>,
    },
    /// The topic's rings would take the reserved disk past `max`
    /// (`storage.disk_budget_bytes`).
    DiskLimit {
        topic_bytes: u64,
        reserved_bytes: u64,
        max: u64,
    },
    /// A topic setting out of range; the text says which.
    InvalidConfig(&'static str),
    /// An idempotent producer's batch was refused (fenced, out of order...).
    Sequence(SequenceError),
    /// A read below the earliest offset retention kept or above the high
    /// watermark: the consumer must reset its position.
    OffsetOutOfRange {
        requested: u64,
        earliest: u64,
        high_watermark: u64,
    },
    /// The producer's batch failed its checks (CRC, framing, fields).
    InvalidBatch(BatchError),
    /// Larger than `max_batch_bytes` (or than a segment holds).
    BatchTooLarge {
        bytes: usize,
        max: usize,
    },
    /// Overflow policy `reject` and the ring is full of retained data;
    /// room frees up as data is forwarded or expires.
    PartitionFull {
        topic: String,
        partition: u32,
    },
    /// The ring is full of records the mirror has not forwarded yet and
    /// the rule's `mirror_overflow` is `block`; room frees up as it
    /// forwards.
    UpstreamBacklogFull {
        topic: String,
        partition: u32,
    },
    /// A write or fsync failed earlier: the partition refuses writes until
    /// the broker restarts and recovers it.
    PartitionFailed {
        topic: String,
        partition: u32,
        cause: std::io::ErrorKind,
        errno: Option<i32>,
    },
    /// Corruption was found in acknowledged data: the partition is
    /// read-only up to the damage, which `reason` locates.
    Quarantined {
        topic: String,
        partition: u32,
        reason: crate::storage::QuarantineReason,
    },
    /// The disk ran out of space writing metadata.
    NoSpace(Arc<StorageError>),
    /// A record the topic refuses: on a compacted topic, one without a
    /// key (`index` is its place in the batch, from 0).
    InvalidRecord {
        topic: String,
        index: u32,
        why: &'static str,
    },
    /// A compacted topic's ring is full of latest values: rolling on would
    /// drop one (see `cleaner`).
    RingFullOfLiveData {
        topic: String,
        partition: u32,
    },
    /// A compacted topic's ring is full, and the cleaner has not yet
    /// compacted what is in it: a retry passes once it has freed segments
    /// (see `cleaner::FullRings`).
    CompactionBehind {
        topic: String,
        partition: u32,
    },
    /// A shrink (`skiff topics alter --segments`) of a ring that never
    /// overwrites its data (a compacted topic, `overflow = reject`) to
    /// fewer segments than its data fills now.
    RingTooSmall {
        topic: String,
        partition: u32,
        live_segments: u32,
        asked: u32,
    },
    /// The broker is stopping and takes no new work.
    ShuttingDown,
    /// A partition directory of a topic the table does not list is in
    /// the way of its creation: storage never creates over one that may
    /// hold data (left by a delete that could not finish, or put there by
    /// hand). Needs an operator, not another create.
    LeftoverPartition {
        topic: String,
        partition: u32,
        dir: std::path::PathBuf,
    },
    /// A topic delete took the topic out of the table and unloaded its
    /// partitions, but could not remove the directories of these (the
    /// partition, and storage's error naming the directory). They are
    /// deleted again when the name is created and at the next start.
    /// Or it could not rewrite these settings files without the topic
    /// (`msgid.meta`, `cleanup.meta`): the entries left are dropped at the
    /// next start, or replaced if the name is created again before.
    /// `storage_full` when a full disk is all that failed
    /// ([`BrokerError::is_disk_full`]).
    TopicDeleteIncomplete {
        topic: String,
        left: Vec<(u32, Arc<StorageError>)>,
        settings: Vec<(&'static str, Arc<StorageError>)>,
    },
    /// A topic create could not write `file` (a settings file, or the
    /// topic table): nothing of the topic was made, or what was is
    /// removed again.
    TopicNotCreated {
        topic: String,
        file: &'static str,
        error: Arc<StorageError>,
    },
    /// A topic create could not make partition `partition` (`error`: I/O,
    /// a full disk): what was made of the topic is removed again, except
    /// `left`, partitions that could not be removed (the broker removes
    /// them at the next create of the topic, or its next start), and the
    /// table entry if it could not be rewritten (`table_error`: the next
    /// start completes the create). With `compaction_room`, the partition
    /// was made but the room a compacted partition's first compaction
    /// writes into (the producers' snapshot's) could not be reserved.
    PartitionNotCreated {
        topic: String,
        partition: u32,
        compaction_room: bool,
        error: Arc<StorageError>,
        left: Vec<(u32, Arc<StorageError>)>,
        table_error: Option<Arc<StorageError>>,
    },
    /// A topic alter could not change `failed` (a partition, or a file:
    /// `topics.meta`, `cleanup.meta`): what it had changed is put back,
    /// so the topic runs, and a restart loads, its old settings. Except
    /// `unrestored`: partitions that could not be put back, running the
    /// new settings until the next start brings them in line with the
    /// table; and `dropped`: partitions whose oldest records a shrink
    /// dropped before the failure (with their earliest offset now), gone
    /// for good. The code is `storage_full` on a full disk, else that of
    /// `error` (`storage_failed` for I/O).
    TopicNotAltered {
        topic: String,
        failed: AlterStep,
        error: Arc<StorageError>,
        unrestored: Vec<(u32, Arc<StorageError>)>,
        dropped: Vec<(u32, u64)>,
    },
    /// A topic alter took effect (the table and every partition) except
    /// its cleanup settings: `cleanup.meta` could not be written
    /// (`error`), nor `topics.meta` put back (`table_error`). The topic
    /// runs, and a restart loads, the new settings with its old cleanup
    /// settings `cleanup`.
    TopicAlterIncomplete {
        topic: String,
        cleanup: super::CleanupConfig,
        error: Arc<StorageError>,
        table_error: Arc<StorageError>,
    },
    /// The storage engine failed in a way no client can act on (I/O at
    /// start-up, a metadata file, a full partition table); the source says
    /// what.
    Storage(Arc<StorageError>),
}

/// What a topic alter could not change ([`BrokerError::TopicNotAltered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlterStep {
    Partition(u32),
    /// A file in the broker's data_dir.
    File(&'static str),
}

impl std::fmt::Display for AlterStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Partition(p) => write!(f, "partition {p} could not be changed"),
            Self::File(file) => write!(f, "{file} (in the broker's data_dir) could not be written"),
        }
    }
}

/// The end of a limit's message: the slots it keeps for the broker's own
/// topics not made yet, which is why it may be reached sooner than the
/// topics listed suggest.
fn write_kept(
    f: &mut std::fmt::Formatter<'_>,
    kept: &[&'static str],
    what: &str,
) -> std::fmt::Result {
    if kept.is_empty() {
        return write!(f, ")");
    }
    write!(
        f,
        ", of which {} {what} are kept for the broker's own topics, made at their first use: {})",
        kept.len(),
        kept.join(", ")
    )
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
            Self::TooManyTopics { max, kept } => {
                write!(f, "topic limit reached (server.max_topics {max}")?;
                write_kept(f, kept, "topics")
            }
            Self::TooManyPartitions { max, kept } => {
                write!(f, "partition limit reached (server.max_partitions {max}")?;
                write_kept(f, kept, "partitions")
            }
            Self::DiskLimit {
                topic_bytes,
                reserved_bytes,
                max,
            } => write!(
                f,
                "disk limit reached: the topic's rings need {topic_bytes} bytes, and {reserved_bytes} \
                 of storage.disk_budget_bytes ({max}) are reserved already"
            ),
            Self::InvalidConfig(what) => write!(f, "invalid topic config: {what}"),
            Self::LeftoverPartition {
                topic,
                partition,
                dir,
            } => write!(
                f,
                "cannot create partition {partition} of topic '{topic}': its directory {} (in the \
                 broker's data_dir) is still on disk, though no topic '{topic}' is listed; it is \
                 left from an earlier topic of that name (a delete that could not finish) or was \
                 put there by hand, and the broker never creates over data (its log says why it \
                 kept it): move it out of the data_dir with the broker stopped, or use another \
                 name",
                dir.display()
            ),
            Self::TopicDeleteIncomplete {
                topic,
                left,
                settings,
            } => {
                write!(
                    f,
                    "topic '{topic}' is deleted (no longer listed, nothing reads or writes its \
                     partitions), but"
                )?;
                if !left.is_empty() {
                    write!(
                        f,
                        " {} of its partition directories could not be removed:",
                        left.len()
                    )?;
                    for (partition, e) in left {
                        write!(f, " partition {partition}: {e};")?;
                    }
                    write!(
                        f,
                        " the broker deletes them again when '{topic}' is created and at its \
                         next start, and refuses to create '{topic}' while they stay"
                    )?;
                }
                if !settings.is_empty() {
                    if !left.is_empty() {
                        write!(f, "; and")?;
                    }
                    write!(f, " its settings could not be removed from")?;
                    for (file, e) in settings {
                        write!(f, " {file} ({e});")?;
                    }
                    write!(
                        f,
                        " they are dropped at the next start, or replaced if '{topic}' is \
                         created again before"
                    )?;
                    if settings.iter().any(|(_, e)| disk_full(e)) {
                        write!(
                            f,
                            "; the disk is full: free space on it (the entries left are \
                             harmless meanwhile)"
                        )?;
                    }
                }
                Ok(())
            }
            Self::TopicNotCreated { topic, file, error } => {
                write!(
                    f,
                    "topic '{topic}' was not created: {file} (in the broker's data_dir) could not \
                     be written ({error}), and nothing of the topic was kept"
                )?;
                create_again_when_full(f, error)
            }
            Self::PartitionNotCreated {
                topic,
                partition,
                compaction_room,
                error,
                left,
                table_error,
            } => {
                if *compaction_room {
                    write!(
                        f,
                        "topic '{topic}' was not created: its partition {partition}'s room for \
                         compaction could not be reserved ({error}), and "
                    )?;
                } else {
                    write!(
                        f,
                        "topic '{topic}' was not created: its partition {partition} could not \
                         be created ({error}), and "
                    )?;
                }
                if left.is_empty() && table_error.is_none() {
                    write!(f, "nothing of the topic was kept")?;
                } else {
                    write!(f, "not all of what was made could be removed")?;
                    for (p, e) in left {
                        write!(f, "; partition {p} stays ({e})")?;
                    }
                    if !left.is_empty() {
                        write!(
                            f,
                            ", which the broker removes when '{topic}' is created again and \
                             at its next start"
                        )?;
                    }
                    if let Some(e) = table_error {
                        let file = super::TOPICS_META_FILE;
                        write!(
                            f,
                            "; {file} still lists the topic ({e}): the next start creates it, \
                             to be deleted then"
                        )?;
                    }
                }
                create_again_when_full(f, error)
            }
            Self::TopicNotAltered {
                topic,
                failed,
                error,
                unrestored,
                dropped,
            } => {
                write!(
                    f,
                    "topic '{topic}' was not altered: {failed} ({error}); it keeps its old \
                     settings, now and after a restart"
                )?;
                for (p, earliest) in dropped {
                    write!(
                        f,
                        "; but the shrink had dropped partition {p}'s oldest records (it now \
                         starts at offset {earliest}), and those are gone"
                    )?;
                }
                for (p, e) in unrestored {
                    write!(
                        f,
                        "; but partition {p} could not be put back ({e}): it runs the new \
                         settings until the broker restarts, which puts back the old ones"
                    )?;
                }
                if disk_full(error) {
                    write!(f, "; the disk is full: free space on it, then alter the topic again")?;
                }
                Ok(())
            }
            Self::TopicAlterIncomplete {
                topic,
                cleanup,
                error,
                table_error,
            } => {
                write!(
                    f,
                    "topic '{topic}' is altered except its cleanup settings: cleanup.meta (in the \
                     broker's data_dir) could not be written ({error}), nor topics.meta put back \
                     ({table_error}); the topic runs, and a restart loads, the new settings with \
                     its old cleanup policy {} (tombstone_retention_ms {}): alter it again once \
                     the files can be written",
                    cleanup.policy, cleanup.tombstone_retention_ms
                )?;
                if disk_full(error) {
                    write!(f, "; the disk is full: free space on it")?;
                }
                Ok(())
            }
            Self::Sequence(e) => write!(f, "{e}"),
            Self::OffsetOutOfRange {
                requested,
                earliest,
                high_watermark,
            } => write!(
                f,
                "offset {requested} out of range [{earliest}, {high_watermark}]"
            ),
            Self::InvalidBatch(e) => write!(f, "invalid batch: {e}"),
            Self::BatchTooLarge { bytes, max } => {
                write!(f, "batch of {bytes} bytes exceeds the limit of {max}")
            }
            Self::UpstreamBacklogFull { topic, partition } => write!(
                f,
                "partition {topic}/{partition} is full of records not yet forwarded upstream \
                 (mirror_overflow = block); producing resumes as the mirror catches up"
            ),
            Self::PartitionFull { topic, partition } => {
                write!(
                    f,
                    "partition {topic}/{partition} is full (overflow = reject)"
                )
            }
            Self::PartitionFailed {
                topic,
                partition,
                cause,
                errno,
            } => write!(
                f,
                "partition {topic}/{partition} failed a write or fsync ({cause:?}, errno \
                 {errno:?}); it refuses writes until restarted"
            ),
            Self::Quarantined {
                topic,
                partition,
                reason,
            } => write!(
                f,
                "partition {topic}/{partition} is quarantined (read-only): {reason}"
            ),
            Self::ShuttingDown => f.write_str("the broker is shutting down"),
            Self::InvalidRecord { topic, index, why } => {
                write!(f, "record {index} of the batch for '{topic}': {why}")
            }
            Self::RingFullOfLiveData { topic, partition } => write!(
                f,
                "partition {topic}/{partition} of a compacted topic is full of live data (latest \
                 values and unexpired tombstones): nothing can be dropped without losing a key's \
                 latest value; delete keys or grow the ring (skiff topics alter --segments)"
            ),
            Self::CompactionBehind { topic, partition } => write!(
                f,
                "partition {topic}/{partition} of a compacted topic is full until the cleaner \
                 frees the segments it is compacting (writes came faster than \
                 compaction.max_bytes_per_sec); retry"
            ),
            Self::RingTooSmall {
                topic,
                partition,
                live_segments,
                asked,
            } => write!(
                f,
                "partition {topic}/{partition} keeps its data in {live_segments} segments and \
                 never overwrites it: its ring cannot shrink to {asked} segments (compact the \
                 topic or delete keys first, or ask for at least {live_segments})"
            ),
            Self::NoSpace(e) | Self::Storage(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BrokerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::InvalidBatch(e) => Some(e),
            Self::NoSpace(e) | Self::Storage(e) => Some(&**e),
            Self::TopicNotCreated { error, .. }
            | Self::PartitionNotCreated { error, .. }
            | Self::TopicNotAltered { error, .. }
            | Self::TopicAlterIncomplete { error, .. } => Some(&**error),
            _ => None,
        }
    }
}

impl From<StorageError> for BrokerError {
    fn from(e: StorageError) -> Self {
        Self::from(Arc::new(e))
    }
}

impl From<BatchError> for BrokerError {
    fn from(e: BatchError) -> Self {
        Self::InvalidBatch(e)
    }
}

/// The advice ending a create's refusal on a full disk.
fn create_again_when_full(
    f: &mut std::fmt::Formatter<'_>,
    error: &StorageError,
) -> std::fmt::Result {
    if disk_full(error) {
        write!(
            f,
            "; the disk is full: free space on it, then create the topic again"
        )?;
    }
    Ok(())
}

/// Whether `e` is the disk running out of space (a write's ENOSPC, or a
/// ring that could not be reserved).
pub(crate) fn disk_full(e: &StorageError) -> bool {
    let enospc = |io: &std::io::Error| io.raw_os_error() == Some(libc::ENOSPC);
    match e {
        StorageError::Io(io) => enospc(io),
        StorageError::InsufficientSpace { .. } => true,
        StorageError::Meta(m) => meta_full(m),
        _ => false,
    }
}

/// [`disk_full`] for a metadata file's error, also one that names its file.
fn meta_full(e: &crate::storage::meta::MetaError) -> bool {
    use crate::storage::meta::MetaError;
    match e {
        MetaError::Io(io) | MetaError::Unsynced(io) => io.raw_os_error() == Some(libc::ENOSPC),
        MetaError::File { error, .. } => meta_full(error),
        _ => false,
    }
}

impl BrokerError {
    /// A compacted topic's full ring refused the write, whether or not the
    /// cleaner has compacted it yet: the broker's own compacted logs
    /// compact it at once and write again.
    pub fn is_full_compacted_ring(&self) -> bool {
        matches!(
            self,
            Self::RingFullOfLiveData { .. } | Self::CompactionBehind { .. }
        )
    }

    /// Whether the failure is the disk running out of space: the answer
    /// is `storage_full`, and freeing space is what to do.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::NoSpace(_) => true,
            Self::TopicNotCreated { error, .. }
            | Self::PartitionNotCreated { error, .. }
            | Self::TopicNotAltered { error, .. }
            | Self::TopicAlterIncomplete { error, .. } => disk_full(error),
            // Only what a full disk explains: a directory that could not
            // be removed needs another fix.
            Self::TopicDeleteIncomplete { left, settings, .. } => {
                !settings.is_empty()
                    && settings.iter().all(|(_, e)| disk_full(e))
                    && left.iter().all(|(_, e)| disk_full(e))
            }
            _ => false,
        }
    }

    /// Storage's refusal to create a partition of `topic`, which the table
    /// does not list: a directory it holds is a leftover, not the topic.
    pub(super) fn creating_unlisted(topic: &str, e: StorageError) -> Self {
        match e {
            StorageError::PartitionExists { id, dir } => Self::LeftoverPartition {
                topic: topic.to_owned(),
                partition: id.partition,
                dir,
            },
            e => e.into(),
        }
    }
}

/// Shared, because one failed write is the answer of every retry waiting
/// on it (see `producers`).
impl From<Arc<StorageError>> for BrokerError {
    fn from(e: Arc<StorageError>) -> Self {
        let at = |id: &PartitionId| (id.topic.to_string(), id.partition);
        match &*e {
            StorageError::UnknownPartition(id) => {
                let (topic, partition) = at(id);
                Self::UnknownPartition { topic, partition }
            }
            &StorageError::OffsetOutOfRange {
                requested,
                earliest,
                high_watermark,
            } => Self::OffsetOutOfRange {
                requested,
                earliest,
                high_watermark,
            },
            StorageError::InvalidBatch(b) => Self::InvalidBatch(b.clone()),
            &StorageError::BatchTooLarge { bytes, max } => Self::BatchTooLarge { bytes, max },
            StorageError::Full(id) => {
                let (topic, partition) = at(id);
                Self::PartitionFull { topic, partition }
            }
            StorageError::BacklogFull(id) => {
                let (topic, partition) = at(id);
                Self::UpstreamBacklogFull { topic, partition }
            }
            &StorageError::Failed {
                ref partition,
                cause,
                errno,
            } => {
                let (topic, partition) = at(partition);
                Self::PartitionFailed {
                    topic,
                    partition,
                    cause,
                    errno,
                }
            }
            StorageError::Quarantined(q) => {
                let (topic, partition) = at(&q.partition);
                Self::Quarantined {
                    topic,
                    partition,
                    reason: q.reason.clone(),
                }
            }
            &StorageError::RingTooSmall {
                ref partition,
                live_segments,
                asked,
            } => {
                let (topic, partition) = at(partition);
                Self::RingTooSmall {
                    topic,
                    partition,
                    live_segments,
                    asked,
                }
            }
            &StorageError::InvalidConfig(what) => Self::InvalidConfig(what),
            &StorageError::TooManyPartitions { max } => Self::TooManyPartitions {
                max,
                kept: Vec::new(),
            },
            StorageError::ShuttingDown => Self::ShuttingDown,
            _ if disk_full(&e) => Self::NoSpace(e),
            _ => Self::Storage(e),
        }
    }
}
