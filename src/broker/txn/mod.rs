//! Transactions: the coordinator. A client of the broker's API, like the
//! group coordinator: it writes its state to the internal topic
//! [`TXN_TOPIC`] and the markers to the data partitions by producing, and
//! reads its log back at start-up with fetches. docs/transactions.md has
//! the design and the crash argument; in short:
//!
//! - a transactional id is a named producer (`init`): a new epoch per
//!   init fences the older instances;
//! - the first batch of a producer on a partition adds the partition to
//!   its open transaction, durably, before the batch is queued ([`Coordinator::gate`]);
//! - commit writes the decision (PrepareCommit) durably before any marker;
//!   recovery completes a prepared commit and aborts everything else open.
//!
//! Each transactional id's state sits behind an async mutex that a batch
//! of the transaction holds until it is queued in storage, and commit and
//! abort hold while they write: so every batch of a transaction is queued
//! before its markers, and storage keeps that order per partition.

pub mod index;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::group::{self, Tp};
use super::producers::{InitError, PRODUCER_NAME_BYTES_MAX};
use super::quiet_log::QuietLog;
use super::{Broker, BrokerError, TopicSpec};
use crate::batch::BatchBuilder;
use crate::bufpool::BatchBuf;
use crate::storage::TOPIC_NAME_BYTES_MAX;

pub use index::{Aborted, Index};

/// The internal topic holding the coordinator's log.
pub const TXN_TOPIC: &str = "__skiff_txn";
/// Transactional ids are producer names with this prefix, so that a
/// plain named producer and a transactional id never share an epoch.
const NAME_PREFIX: &str = super::producers::TXN_NAME_PREFIX;
pub const TXN_ID_BYTES_MAX: usize = PRODUCER_NAME_BYTES_MAX - NAME_PREFIX.len();
/// The log's ring: 4 x 1 MiB; a record is some 100 bytes per partition of
/// a transaction, so a quarter ring holds thousands of live transactions.
const LOG_SEGMENT_BYTES: u64 = 1024 * 1024;
const LOG_SEGMENTS: u32 = 4;
/// The live state is written again after this many bytes of log, so the
/// newest copy of every key stays in the newest half of the ring.
const LOG_REWRITE_BYTES: u64 = LOG_SEGMENT_BYTES * LOG_SEGMENTS as u64 / 4;
/// The most one aborted range's record takes in the log: its key names
/// the topic (up to [`TOPIC_NAME_BYTES_MAX`]), partition and marker, its
/// value the producer id and first offset, in the record's framing.
/// `an_aborted_range_record_fits_its_bound` holds it.
const ABORTED_RECORD_BYTES_MAX: u64 = TOPIC_NAME_BYTES_MAX as u64 + 64;
/// Aborted ranges the coordinator keeps over all partitions, counting one
/// for each partition of an open transaction (its abort makes one, and is
/// never refused). A rewrite's copy of the live state must outlive the
/// [`LOG_REWRITE_BYTES`] written after it and the next copy, within the
/// ring less the segment being reused: 2 x copy + LOG_REWRITE_BYTES <=
/// 3 MiB, so a copy is at most 1 MiB. The ranges take a quarter of it:
/// the ids and open transactions' partitions need the rest (some 160 KiB
/// under the default limits, more under larger ones), and the memory
/// budget's default has no room for more.
pub const ABORTED_RANGES_MAX: usize = (LOG_REWRITE_BYTES / 4 / ABORTED_RECORD_BYTES_MAX) as usize;
const _: () = assert!(
    2 * LOG_REWRITE_BYTES + LOG_REWRITE_BYTES <= (LOG_SEGMENTS as u64 - 1) * LOG_SEGMENT_BYTES
);
const LOG_BATCH_BYTES: usize = 60 * 1024;
/// How often timeouts are checked.
const TICK: Duration = Duration::from_millis(100);
/// How long a listing waits for ids busy ending a transaction: a write
/// and an fsync, unless the device hangs.
const DESCRIBE_WAIT: Duration = Duration::from_secs(1);
/// The marker record's key: `[version, type]`.
const MARKER_ABORT: u8 = 0;
const MARKER_COMMIT: u8 = 1;

/// `[transactions]` in the config.
#[derive(Debug, Clone)]
pub struct TxnConfig {
    /// The longest `transaction_timeout_ms` a producer may ask for.
    pub max_timeout_ms: u64,
    /// Transactional ids the coordinator keeps (each costs some memory
    /// and a record in its log).
    pub max_ids: usize,
    /// Transactions open at once over all ids: each holds partitions and
    /// offsets until it ends.
    pub max_open: usize,
    /// An id with no transaction open and no change for this long is
    /// forgotten, freeing its slot of `max_ids`.
    pub id_expiration_ms: u64,
    /// Aborted ranges kept, partitions of open transactions included:
    /// [`ABORTED_RANGES_MAX`], what the log holds.
    pub max_aborted_ranges: usize,
}

impl TxnConfig {
    pub fn from_config(cfg: &crate::config::Config) -> TxnConfig {
        TxnConfig {
            max_timeout_ms: cfg.transactions.max_timeout_ms,
            max_ids: cfg.transactions.max_transactional_ids as usize,
            max_open: cfg.transactions.max_open as usize,
            id_expiration_ms: cfg.transactions.id_expiration_ms,
            max_aborted_ranges: ABORTED_RANGES_MAX,
        }
    }
}

/// Why a transaction request failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum TxnError {
    /// An older instance of the transactional id: a newer one called
    /// init, or the transaction timed out and was aborted.
    Fenced {
        epoch: u16,
        current: u16,
    },
    /// An older instance of the transactional id under a producer id the
    /// id has left: its epochs ran out and it moved to a new producer id,
    /// or it expired and a new init gave it one.
    FencedId {
        id: String,
        producer_id: u64,
    },
    /// The request does not fit the transaction's state (a produce while
    /// it commits, an end for an id never initialised).
    InvalidState(String),
    /// Bad arguments (id too long, timeout over the maximum, ...).
    Invalid(String),
    /// `max_open` transactions are open: retry once one ends.
    TooManyOpen {
        id: String,
        max: usize,
    },
    /// `max_ids` ids are kept: one frees when it expires.
    TooManyIds {
        max: usize,
    },
    /// The transaction ended (its markers are written, readers see the
    /// outcome) but the log's record of it is not written yet: the id
    /// takes nothing more until it is. `error` is the log's.
    Unrecorded {
        id: String,
        committed: bool,
        error: BrokerError,
    },
    /// `max` aborted ranges are kept (partitions of open transactions
    /// counted): no new transaction, nor a new partition for one open
    /// (`partition`), until retention removes aborted records.
    TooManyAborted {
        id: String,
        partition: Option<Tp>,
        max: usize,
    },
    Broker(BrokerError),
    Group(group::GroupError),
}

impl std::fmt::Display for TxnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fenced { epoch, current } => write!(
                f,
                "transactional producer epoch {epoch} is fenced by epoch {current}: \
                 another instance took over, the transaction timed out and was aborted, \
                 or the id expired unused (transactions.id_expiration_ms); init it again"
            ),
            Self::FencedId { id, producer_id } => write!(
                f,
                "producer id {producer_id} is fenced: transactional id {id} has a new producer \
                 id (its epochs ran out, or it expired unused and was initialised again); \
                 init it again"
            ),
            Self::InvalidState(m) | Self::Invalid(m) => f.write_str(m),
            Self::TooManyOpen { id, max } => write!(
                f,
                "transaction {id} cannot begin: {max} are open (transactions.max_open); \
                 retry once one ends"
            ),
            Self::TooManyIds { max } => write!(
                f,
                "too many transactional ids: transactions.max_transactional_ids is {max}; \
                 reuse an id, or wait for one unused for transactions.id_expiration_ms"
            ),
            Self::Unrecorded {
                id,
                committed,
                error,
            } => write!(
                f,
                "transaction {id} is {}: its markers are written and read_committed readers \
                 see that, but the transaction log could not record it ({error}); the id \
                 takes no init, end or new transaction until the broker writes the record, \
                 which it retries (at the latest at a restart, if the log refuses writes \
                 until then)",
                if *committed { "committed" } else { "aborted" },
            ),
            Self::TooManyAborted { id, partition, max } => {
                match partition {
                    None => write!(f, "transaction {id} cannot begin: ")?,
                    Some((t, p)) => write!(f, "transaction {id} cannot add {t}/{p}: ")?,
                }
                write!(
                    f,
                    "the coordinator keeps the ranges of aborted transactions (one per \
                     partition) that read_committed readers skip, and {max} is all its log \
                     holds; a range is dropped once retention removes its partition's records \
                     up to the abort (skiff_txn_aborted_ranges); abort fewer transactions, or \
                     shorten the retention of the topics they write"
                )
            }
            Self::Broker(e) => e.fmt(f),
            Self::Group(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TxnError {}

impl From<BrokerError> for TxnError {
    fn from(e: BrokerError) -> Self {
        Self::Broker(e)
    }
}

impl From<group::GroupError> for TxnError {
    fn from(e: group::GroupError) -> Self {
        Self::Group(e)
    }
}

impl From<InitError> for TxnError {
    fn from(e: InitError) -> Self {
        match e {
            InitError::Meta(m) => {
                Self::Broker(BrokerError::from(crate::storage::StorageError::Meta(m)))
            }
            other => Self::Invalid(other.to_string()),
        }
    }
}

/// Where a transaction is; see docs/transactions.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Ongoing => "ongoing",
            Self::PrepareCommit => "prepare_commit",
            Self::PrepareAbort => "prepare_abort",
            Self::CompleteCommit => "complete_commit",
            Self::CompleteAbort => "complete_abort",
        }
    }
}

/// One transactional id's state: in memory, and the value of its record
/// in the log (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TxnRecord {
    producer_id: u64,
    producer_epoch: u16,
    timeout_ms: u64,
    phase: Phase,
    /// Topic, partition, and the first offset the transaction may hold
    /// there (the log end when the partition was added).
    partitions: Vec<(String, u32, u64)>,
    /// Group, topic, partition, offset: committed with the transaction.
    offsets: Vec<(String, String, u32, u64)>,
}

/// A key of the log (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum LogKey {
    Txn(String),
    /// Topic, partition, marker offset.
    Aborted(String, u32, u64),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct AbortedRecord {
    producer_id: u64,
    first: u64,
}

/// One transactional id's state (behind its async mutex).
pub struct TxnState {
    id: String,
    rec: TxnRecord,
    /// When the open transaction began (ms, the broker's clock).
    started_ms: u64,
    /// A slot in `groups.max_groups` for each group of `rec.offsets`,
    /// until the transaction ends: its commit cannot be refused then.
    held: Vec<group::Reservation>,
    /// When its record was last written (ms): the id expires
    /// `id_expiration_ms` after, unless a transaction is open. Kept as
    /// the record's timestamp in the log, so it survives a restart.
    active_ms: u64,
    /// Forgotten: whoever waited for the lock looks the id up again.
    expired: bool,
    /// Open (ongoing or aborting) at the last stop: aborted, its producer
    /// fenced, by recovery or by the first request for it, whichever
    /// locks it first. Its offsets added since its last record are gone.
    left_open: bool,
    /// The records of an ended transaction whose log write failed: its
    /// markers are written, so only these are retried (by the timers),
    /// and written before any later record of the id, which would
    /// otherwise stand in for them. Or a commit's decision whose write
    /// failed, written before its markers.
    unwritten: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

type Entry = Arc<smol::lock::Mutex<TxnState>>;

/// An id in `by_id`: its state, and its newest record the log holds
/// durably with that record's timestamp, which a rewrite writes again
/// while the state is locked (it cannot be read then). Kept as
/// [`carried`] makes it, so it costs the memory budget nearly nothing.
struct Slot {
    entry: Entry,
    durable: Option<(i64, TxnRecord)>,
}

/// One caller's records for the log, and where to say they are durable
/// (true) or that the write failed (false).
struct QueuedWrite {
    records: Vec<(Vec<u8>, Vec<u8>)>,
    done: async_channel::Sender<bool>,
}

/// A batch's hold on its transaction: keep it until the batch is queued.
pub type Gate = smol::lock::MutexGuardArc<TxnState>;

/// What `skiff txn list` shows of one transactional id.
#[derive(Debug, Clone)]
pub struct TxnDescription {
    pub id: String,
    pub producer_id: u64,
    pub producer_epoch: u16,
    pub phase: &'static str,
    pub partitions: Vec<Tp>,
    pub timeout_ms: u64,
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct TxnStats {
    pub commits: AtomicU64,
    pub aborts: AtomicU64,
    pub timeouts: AtomicU64,
    /// Ids forgotten after `id_expiration_ms` unused.
    pub expirations: AtomicU64,
}

pub struct Coordinator {
    broker: Arc<Broker>,
    groups: Arc<group::Coordinator>,
    config: TxnConfig,
    by_id: Mutex<HashMap<String, Slot>>,
    by_producer: Mutex<HashMap<u64, Entry>>,
    /// Serialises the log's writes; holds the bytes since the last rewrite.
    log: smol::lock::Mutex<u64>,
    /// Records waiting for the next write of the log: whoever takes `log`
    /// writes every one queued so far (group commit, one fsync for the
    /// changes of many transactions).
    log_queue: Mutex<Vec<QueuedWrite>>,
    /// Transactions open (ongoing or ending), against `max_open`.
    open: AtomicUsize,
    /// Notified when a transaction begins: its timeout needs the timers.
    timers: event_listener::Event,
    /// Ids whose timer work keeps failing, logged once a minute.
    timer_failures: QuietLog<String>,
    /// Tombstones for aborted ranges of topics found deleted at the load,
    /// written at recovery.
    gone_ranges: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    pub stats: TxnStats,
}

fn now_ms(broker: &Broker) -> u64 {
    u64::try_from(broker.clock.now_ms()).unwrap_or(0)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encodes to a Vec")
}

impl Coordinator {
    /// The coordinator, its state read back from the log: the index holds
    /// every prepared or open transaction's partitions back (their stable
    /// offset) until [`Coordinator::recover`] (to be spawned) ends them.
    pub fn open(
        broker: Arc<Broker>,
        groups: Arc<group::Coordinator>,
        config: TxnConfig,
    ) -> Result<Arc<Coordinator>, BrokerError> {
        let c = Coordinator {
            broker,
            groups,
            config,
            by_id: Mutex::new(HashMap::new()),
            by_producer: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            // The last run's copy of the live state may be up to a quarter
            // ring back: the first write of this run writes it again.
            log: smol::lock::Mutex::new(LOG_REWRITE_BYTES),
            log_queue: Mutex::new(Vec::new()),
            timers: event_listener::Event::new(),
            timer_failures: QuietLog::new(|id| format!("transaction {id}: timer work failed")),
            gone_ranges: Mutex::new(Vec::new()),
            stats: TxnStats::default(),
        };
        smol::block_on(c.load())?;
        Ok(Arc::new(c))
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    fn index(&self) -> &Index {
        &self.broker.txn_index
    }

    async fn load(&self) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        let mut txns: BTreeMap<String, (TxnRecord, i64)> = BTreeMap::new();
        let mut aborted: BTreeMap<(String, u32, u64), AbortedRecord> = BTreeMap::new();
        super::replay_log(&self.broker, TXN_TOPIC, |offset, ts, k, v| {
            if k.is_empty() {
                return;
            }
            match postcard::from_bytes::<LogKey>(k) {
                // An expired id's tombstone.
                Ok(LogKey::Txn(id)) if v.is_empty() => {
                    txns.remove(&id);
                }
                Ok(LogKey::Txn(id)) => {
                    if let Ok(rec) = postcard::from_bytes::<TxnRecord>(v) {
                        txns.insert(id, (rec, ts));
                    }
                }
                // A deleted topic's range.
                Ok(LogKey::Aborted(t, p, marker)) if v.is_empty() => {
                    aborted.remove(&(t, p, marker));
                }
                Ok(LogKey::Aborted(t, p, marker)) => {
                    if let Ok(a) = postcard::from_bytes::<AbortedRecord>(v) {
                        aborted.insert((t, p, marker), a);
                    }
                }
                Err(_) => log::warn!("transaction log: a record at {offset} does not decode"),
            }
        })
        .await?;
        let mut gone = Vec::new();
        for ((t, p, marker), a) in aborted {
            let o = match self.broker.offsets(&t, p) {
                Ok(o) => o,
                // Deleted, and its ranges' tombstones never written: they
                // are written at recovery, or a topic made again by the
                // name would load the ranges at a later start.
                Err(BrokerError::UnknownTopic(_) | BrokerError::UnknownPartition { .. }) => {
                    gone.push((encode(&LogKey::Aborted(t, p, marker)), Vec::new()));
                    continue;
                }
                Err(_) => continue,
            };
            if marker >= o.earliest {
                self.index().add_aborted(
                    &t,
                    p,
                    Aborted {
                        producer_id: a.producer_id,
                        first: a.first,
                        marker,
                    },
                );
            }
        }
        let mut pending = 0;
        let now = now_ms(&self.broker);
        for (id, (rec, ts)) in txns {
            if matches!(
                rec.phase,
                Phase::Ongoing | Phase::PrepareCommit | Phase::PrepareAbort
            ) {
                pending += 1;
                for (t, p, first) in &rec.partitions {
                    self.index().open(t, *p, rec.producer_id, *first);
                }
            }
            let mut rec = rec;
            if !is_open(rec.phase) && rec.producer_id != crate::batch::NO_PRODUCER_ID {
                match self
                    .broker
                    .named_producer(&format!("{NAME_PREFIX}{id}"))
                    .await
                {
                    // Forgotten by an expiry whose tombstone was not written.
                    None => rec.producer_id = crate::batch::NO_PRODUCER_ID,
                    // Moved to a new id (its epochs ran out) by an init or
                    // a fencing whose record was not written.
                    Some((pid, epoch)) if pid != rec.producer_id => {
                        rec.producer_id = pid;
                        rec.producer_epoch = epoch;
                    }
                    // Bumped by an init, or an expiry's fencing, whose
                    // record was not written: the registry answered no
                    // one that epoch, but it refuses the older instance,
                    // which this id must refuse too.
                    Some((_, epoch)) => rec.producer_epoch = rec.producer_epoch.max(epoch),
                }
            }
            let mut held = Vec::new();
            if is_open(rec.phase) {
                for (g, ..) in &rec.offsets {
                    if !held.iter().any(|h: &group::Reservation| h.group() == g) {
                        held.push(self.groups.hold(g));
                    }
                }
            } else {
                // Older logs kept them: an idle id holds no partitions.
                rec.partitions = Vec::new();
            }
            let pid = rec.producer_id;
            let left_open = matches!(rec.phase, Phase::Ongoing | Phase::PrepareAbort);
            let durable = Some((ts, carried(&rec)));
            let entry = Arc::new(smol::lock::Mutex::new(TxnState {
                id: id.clone(),
                rec,
                started_ms: now,
                held,
                // A clock set back since is taken as now: never expires early.
                active_ms: u64::try_from(ts).unwrap_or(now).min(now),
                expired: false,
                left_open,
                unwritten: None,
            }));
            let slot = Slot {
                entry: entry.clone(),
                durable,
            };
            self.by_id.lock().expect("txn lock").insert(id, slot);
            self.by_producer
                .lock()
                .expect("txn lock")
                .insert(pid, entry);
        }
        self.open.store(pending, Ordering::Relaxed);
        *self.gone_ranges.lock().expect("txn lock") = gone;
        log::info!(
            "transactions loaded: {} id(s), {pending} to complete, in {:?}",
            self.by_id.lock().expect("txn lock").len(),
            started.elapsed()
        );
        Ok(())
    }

    /// Ends what the last run left open: a prepared commit is completed,
    /// anything else open is aborted (its producer fenced first). Run once,
    /// before [`Coordinator::run_timers`] matters; a failure is retried by
    /// the timer (the transaction stays open and its partitions held).
    pub async fn recover(self: Arc<Self>) {
        let gone = std::mem::take(&mut *self.gone_ranges.lock().expect("txn lock"));
        if !gone.is_empty() {
            if let Err(e) = self.write_log(gone).await {
                log::warn!("transaction log: deleted topics' aborted ranges not dropped: {e}");
            }
        }
        let entries = self.entries();
        for e in entries {
            let mut st = e.lock_arc().await;
            let r = match st.rec.phase {
                Phase::PrepareCommit => self.complete_commit(&mut st).await,
                _ => self.abort_left_open(&mut st).await,
            };
            if let Err(e) = r {
                log::warn!("transaction {}: recovery failed: {e}", st.id);
            }
        }
    }

    /// Aborts the id's transaction if the last run left it open, fencing
    /// its producer: a request from an instance that lived through the
    /// restart must not commit it (nor add to it) without what it added
    /// that was kept only in memory.
    async fn abort_left_open(&self, st: &mut TxnState) -> Result<(), TxnError> {
        if !st.left_open {
            return Ok(());
        }
        log::warn!("transaction {}: open at the last stop; aborting it", st.id);
        self.fence_and_abort(st).await
    }

    /// Registers `id` (a new epoch fences older instances), aborting any
    /// transaction it left open. Answers once that is durable.
    pub async fn init(&self, id: &str, timeout_ms: u64) -> Result<(u64, u16), TxnError> {
        if id.is_empty() || id.len() > TXN_ID_BYTES_MAX {
            return Err(TxnError::Invalid(format!(
                "transactional ids are 1 to {TXN_ID_BYTES_MAX} bytes"
            )));
        }
        if timeout_ms == 0 || timeout_ms > self.config.max_timeout_ms {
            return Err(TxnError::Invalid(format!(
                "transaction_timeout_ms must be 1..={} (transactions.max_timeout_ms)",
                self.config.max_timeout_ms
            )));
        }
        let (entry, mut st) = loop {
            let entry = self.init_entry(id, timeout_ms)?;
            let st = entry.lock_arc().await;
            if !st.expired {
                break (entry, st);
            }
        };
        let r = self.init_locked(&entry, &mut st, id, timeout_ms).await;
        if r.is_err() {
            self.forget_unwritten(&entry, &mut st).await;
        }
        r
    }

    async fn init_locked(
        &self,
        entry: &Entry,
        st: &mut TxnState,
        id: &str,
        timeout_ms: u64,
    ) -> Result<(u64, u16), TxnError> {
        self.write_unwritten(st).await?;
        match st.rec.phase {
            Phase::PrepareCommit => self.complete_commit(st).await?,
            Phase::Ongoing | Phase::PrepareAbort => {
                log::info!("transaction {id}: a new instance fences the open transaction");
                self.abort(st).await?;
            }
            _ => {}
        }
        let (pid, epoch) = self
            .broker
            .init_producer(Some(&format!("{NAME_PREFIX}{id}")))
            .await?;
        // A new id when the old one's epochs ran out: the registry fences
        // the old one, and this id's gate no longer takes its batches.
        let old = std::mem::replace(&mut st.rec.producer_id, pid);
        if old != pid {
            self.by_producer.lock().expect("txn lock").remove(&old);
        }
        st.rec.producer_epoch = epoch;
        st.rec.timeout_ms = timeout_ms;
        // The new instance has begun nothing (as Kafka's init makes the id
        // Empty): its end is refused, not taken for the retry of the end
        // an older instance made.
        st.rec.phase = Phase::Empty;
        st.rec.partitions.clear();
        st.rec.offsets.clear();
        // Known after a restart too: its batches are never taken for a
        // plain producer's.
        self.write_log(vec![self.stamped(st)]).await?;
        self.by_producer
            .lock()
            .expect("txn lock")
            .insert(pid, entry.clone());
        Ok((pid, epoch))
    }

    /// Forgets an id whose first init failed: none of its records is
    /// durable, so it keeps no slot of `max_ids` (for a day, until it
    /// expired) and no rewrite writes it. Its name leaves the producer
    /// registry too, if the init put it there; if it cannot, the id is
    /// kept, to expire with its name as any id. A waiter for its lock
    /// makes it again.
    async fn forget_unwritten(&self, entry: &Entry, st: &mut TxnState) {
        let unwritten = self
            .by_id
            .lock()
            .expect("txn lock")
            .get(&st.id)
            .is_some_and(|slot| slot.durable.is_none() && Arc::ptr_eq(&slot.entry, entry));
        if !unwritten || is_open(st.rec.phase) {
            return;
        }
        if st.rec.producer_id != crate::batch::NO_PRODUCER_ID {
            let name = format!("{NAME_PREFIX}{}", st.id);
            if !matches!(self.broker.forget_producer(&name).await, Ok(true)) {
                return;
            }
        }
        self.by_id.lock().expect("txn lock").remove(&st.id);
        st.expired = true;
    }

    /// `id`'s entry, made if it is new and there is room for it.
    fn init_entry(&self, id: &str, timeout_ms: u64) -> Result<Entry, TxnError> {
        let mut ids = self.by_id.lock().expect("txn lock");
        if !ids.contains_key(id) && ids.len() >= self.config.max_ids {
            return Err(TxnError::TooManyIds {
                max: self.config.max_ids,
            });
        }
        let now = now_ms(&self.broker);
        Ok(ids
            .entry(id.to_owned())
            .or_insert_with(|| Slot {
                durable: None,
                entry: Arc::new(smol::lock::Mutex::new(TxnState {
                    id: id.to_owned(),
                    rec: TxnRecord {
                        producer_id: crate::batch::NO_PRODUCER_ID,
                        producer_epoch: 0,
                        timeout_ms,
                        phase: Phase::Empty,
                        partitions: Vec::new(),
                        offsets: Vec::new(),
                    },
                    started_ms: 0,
                    held: Vec::new(),
                    active_ms: now,
                    expired: false,
                    left_open: false,
                    unwritten: None,
                })),
            })
            .entry
            .clone())
    }

    /// The id's record for the log, its activity time set to now.
    fn stamped(&self, st: &mut TxnState) -> (Vec<u8>, Vec<u8>) {
        st.active_ms = now_ms(&self.broker);
        txn_entry(st)
    }

    /// Every id's entry, to lock one at a time.
    fn entries(&self) -> Vec<Entry> {
        self.by_id
            .lock()
            .expect("txn lock")
            .values()
            .map(|s| s.entry.clone())
            .collect()
    }

    /// Whether `producer_id` is a transactional producer's.
    pub fn is_transactional(&self, producer_id: u64) -> bool {
        self.by_producer
            .lock()
            .expect("txn lock")
            .contains_key(&producer_id)
    }

    /// Called for every batch of a transactional producer before it is
    /// queued: opens a transaction if none is open and adds the partition
    /// to it (durably). `None` for other producers' batches. Hold the
    /// returned gate until the batch is queued.
    pub async fn gate(
        &self,
        producer_id: u64,
        epoch: u16,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Gate>, TxnError> {
        let Some(entry) = self
            .by_producer
            .lock()
            .expect("txn lock")
            .get(&producer_id)
            .cloned()
        else {
            return Ok(None);
        };
        let mut st = entry.lock_arc().await;
        if st.expired {
            // Its epoch was bumped as it expired.
            return Err(TxnError::Fenced {
                epoch,
                current: st.rec.producer_epoch,
            });
        }
        self.abort_left_open(&mut st).await?;
        check_epoch(&self.broker, &st, producer_id, epoch)?;
        self.write_unwritten(&mut st).await?;
        let begun = self.begin_unless_ongoing(&mut st, ": no more records until it is done")?;
        if let Err(e) = self.add_partition(&mut st, topic, partition).await {
            // A refused batch leaves no empty transaction behind: one would
            // time out and fence its producer, or be written by a rewrite.
            self.unbegin(&mut st, begun);
            return Err(e);
        }
        self.timers.notify(usize::MAX);
        Ok(Some(st))
    }

    /// Adds the partition to the open transaction, durably, unless it is in
    /// it already; a refusal changes nothing.
    async fn add_partition(
        &self,
        st: &mut TxnState,
        topic: &str,
        partition: u32,
    ) -> Result<(), TxnError> {
        if st
            .rec
            .partitions
            .iter()
            .any(|(t, p, _)| t == topic && *p == partition)
        {
            return Ok(());
        }
        let producer_id = st.rec.producer_id;
        let first = self.broker.offsets(topic, partition)?.high_watermark;
        // Its abort's range is taken now, so that abort is never refused.
        let max = self.config.max_aborted_ranges;
        if !self
            .index()
            .open_within(topic, partition, producer_id, first, max)
        {
            return Err(TxnError::TooManyAborted {
                id: st.id.clone(),
                partition: Some((topic.to_owned(), partition)),
                max,
            });
        }
        st.rec.partitions.push((topic.to_owned(), partition, first));
        let active_ms = st.active_ms;
        if let Err(e) = self.write_log(vec![self.stamped(st)]).await {
            st.rec.partitions.pop();
            st.active_ms = active_ms;
            self.index().close(topic, partition, producer_id);
            return Err(e);
        }
        Ok(())
    }

    /// Adds a group's offsets to the open transaction (opening one):
    /// committed only if it commits.
    pub async fn add_offsets(
        &self,
        id: &str,
        producer_id: u64,
        epoch: u16,
        group: &str,
        offsets: Vec<(Tp, u64)>,
    ) -> Result<(), TxnError> {
        group::check_id("the group id", group)?;
        for ((t, p), _) in &offsets {
            self.broker.partition_id(t, *p)?;
        }
        // Taken before the transaction begins, so a refusal begins none.
        let hold = self.groups.reserve(group)?;
        let mut st = self.lock_id(id).await?;
        check_epoch(&self.broker, &st, producer_id, epoch)?;
        let begun = self.begin_unless_ongoing(&mut st, "")?;
        // Held in memory until the transaction ends: as many as there
        // are partitions, so the memory budget can count them.
        let max = self.broker.max_partitions();
        let new = offsets
            .iter()
            .map(|(tp, _)| tp)
            .filter(|(t, p)| {
                !st.rec
                    .offsets
                    .iter()
                    .any(|(g, t2, p2, _)| g == group && t2 == t && p2 == p)
            })
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if st.rec.offsets.len() + new > max {
            let e = TxnError::Invalid(format!(
                "a transaction carries at most {max} group offsets (server.max_partitions), not {}",
                st.rec.offsets.len() + new
            ));
            self.unbegin(&mut st, begun);
            return Err(e);
        }
        if begun.is_some() {
            // Durable before the answer, as a first batch's partition: a
            // restart must find the transaction open, abort it and fence
            // its producer, whose commit would otherwise find the id idle
            // (empty, or a commit's retry) and answer OK without these
            // offsets. Those added later need not be: a restart aborts
            // whatever it finds open, and PrepareCommit carries them all.
            let active_ms = st.active_ms;
            if let Err(e) = self.write_log(vec![self.stamped(&mut st)]).await {
                st.active_ms = active_ms;
                self.unbegin(&mut st, begun);
                return Err(e);
            }
        }
        self.timers.notify(usize::MAX);
        if !st.held.iter().any(|h| h.group() == group) {
            st.held.push(hold);
        }
        for ((t, p), offset) in offsets {
            st.rec
                .offsets
                .retain(|(g, t2, p2, _)| !(g == group && *t2 == t && *p2 == p));
            st.rec.offsets.push((group.to_owned(), t, p, offset));
        }
        Ok(())
    }

    /// Commits or aborts the open transaction; answers once that is
    /// durable. Every batch of it must have been acknowledged first. A
    /// retry of an end that completed answers the same; an end with no
    /// transaction open is refused, as Kafka's coordinator does (its
    /// client sends none then).
    pub async fn end(
        &self,
        id: &str,
        producer_id: u64,
        epoch: u16,
        commit: bool,
    ) -> Result<(), TxnError> {
        let mut st = self.lock_id(id).await?;
        check_epoch(&self.broker, &st, producer_id, epoch)?;
        match (st.rec.phase, commit) {
            (Phase::Ongoing, true) => {
                st.rec.phase = Phase::PrepareCommit;
                let decision = self.stamped(&mut st);
                if let Err(e) = self.write_log(vec![decision.clone()]).await {
                    // In doubt: a failed write or fsync may have reached
                    // the log all the same, and a restart would commit.
                    // So nothing may abort it now (an end, its timeout):
                    // the decision is written again (the retry of this
                    // end, the timers), and only then its markers.
                    st.unwritten = Some(vec![decision]);
                    return Err(e);
                }
                self.complete_commit(&mut st).await
            }
            (Phase::PrepareCommit, true) => self.complete_commit(&mut st).await,
            (Phase::Ongoing | Phase::PrepareAbort, false) => self.abort(&mut st).await,
            // The retry of the end this instance made (init leaves the
            // id Empty): its answer was lost.
            (Phase::CompleteCommit, true) | (Phase::CompleteAbort, false) => Ok(()),
            (p, _) => Err(TxnError::InvalidState(format!(
                "transaction {id} cannot {} now: it is {}{}",
                if commit { "commit" } else { "abort" },
                p.name(),
                if is_open(p) {
                    ""
                } else {
                    ", none is open: no record nor offsets were sent in one since the \
                     producer's init or its last end"
                }
            ))),
        }
    }

    /// `id`'s state, locked.
    async fn lock_id(&self, id: &str) -> Result<Gate, TxnError> {
        let unknown = || {
            TxnError::InvalidState(format!(
                "unknown transactional id '{id}': never initialised, or expired after \
                 transactions.id_expiration_ms without a transaction; call init first"
            ))
        };
        let entry = self
            .by_id
            .lock()
            .expect("txn lock")
            .get(id)
            .map(|s| s.entry.clone())
            .ok_or_else(unknown)?;
        let mut st = entry.lock_arc().await;
        if st.expired {
            return Err(unknown());
        }
        // A retried end answers once its transaction's end is durable.
        self.write_unwritten(&mut st).await?;
        self.abort_left_open(&mut st).await?;
        Ok(st)
    }

    /// Every transactional id, for `skiff txn list`. An id busy now (its
    /// transaction ending, the timer looking at it) is waited for, up to
    /// [`DESCRIBE_WAIT`] for all of them: left out then, or it would read
    /// as gone. One forgotten meanwhile (expired) is left out.
    pub async fn describe(&self) -> Vec<TxnDescription> {
        let entries = self.entries();
        let deadline = Instant::now() + DESCRIBE_WAIT;
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            let locked = futures_lite::future::or(async { Some(e.lock().await) }, async {
                smol::Timer::at(deadline).await;
                None
            });
            let Some(st) = locked.await else {
                continue;
            };
            if st.expired {
                continue;
            }
            out.push(TxnDescription {
                id: st.id.clone(),
                producer_id: st.rec.producer_id,
                producer_epoch: st.rec.producer_epoch,
                phase: st.rec.phase.name(),
                partitions: st
                    .rec
                    .partitions
                    .iter()
                    .map(|(t, p, _)| (t.clone(), *p))
                    .collect(),
                timeout_ms: st.rec.timeout_ms,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Forgets the aborted ranges of a deleted topic, durably (a tombstone
    /// for each): a topic made again by that name starts at offset 0, where
    /// the same producer ids (a transactional id keeps its own) write
    /// again, and an old range would hide their committed records.
    pub async fn forget_topic(&self, topic: &str) -> Result<(), TxnError> {
        let gone: Vec<(String, u32, Aborted)> = self
            .index()
            .all_aborted()
            .into_iter()
            .filter(|(t, ..)| t == topic)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        for (t, p, _) in &gone {
            self.index().forget_below(t, *p, u64::MAX);
        }
        let tombstones = gone
            .into_iter()
            .map(|(t, p, a)| (encode(&LogKey::Aborted(t, p, a.marker)), Vec::new()))
            .collect();
        self.write_log(tombstones).await
    }

    /// Aborted ranges kept for read_committed readers, over all partitions.
    pub fn aborted_ranges(&self) -> usize {
        self.index().aborted_count()
    }

    /// Transactions open now (ongoing or ending).
    pub fn open_count(&self) -> usize {
        self.by_id
            .lock()
            .expect("txn lock")
            .values()
            .filter(|s| {
                s.entry.try_lock().is_none_or(|st| {
                    matches!(
                        st.rec.phase,
                        Phase::Ongoing | Phase::PrepareCommit | Phase::PrepareAbort
                    )
                })
            })
            .count()
    }

    /// Aborts transactions past their timeout (fencing their producer),
    /// retries recoveries that failed, and forgets aborted ranges that
    /// left their partition's ring.
    ///
    /// Every [`TICK`] while a transaction is open or ending (or was busy);
    /// with none, asleep until one begins (`timers`), but for the ranges
    /// forgotten every [`crate::broker::IDLE_TIMERS`].
    pub async fn run_timers(self: Arc<Self>) {
        let mut forgotten = std::time::Instant::now();
        loop {
            // Listening before the pass: a transaction begun during it
            // wakes the next.
            let wake = self.timers.listen();
            let (open, _) = self.timer_pass().await;
            if forgotten.elapsed() >= crate::broker::IDLE_TIMERS {
                forgotten = std::time::Instant::now();
                for (t, p) in self.index().aborted_partitions() {
                    match self.broker.offsets(&t, p) {
                        Ok(o) => self.index().forget_below(&t, p, o.earliest),
                        Err(_) => self.index().forget_topic(&t),
                    }
                }
            }
            if open {
                drop(wake);
                smol::Timer::after(TICK).await;
            } else {
                crate::broker::sleep_unless(wake, crate::broker::IDLE_TIMERS).await;
            }
        }
    }

    /// One pass of the timers over every id: whether one is open or
    /// ending (or was busy), and the warnings it logged. An id that keeps
    /// failing (its log unwritable) is logged once a minute, not every
    /// [`TICK`].
    async fn timer_pass(&self) -> (bool, usize) {
        let mut open = false;
        let mut logged = 0;
        let now = now_ms(&self.broker);
        let entries = self.entries();
        for e in entries {
            let Some(mut st) = e.try_lock_arc() else {
                // In a request's hands: it may be one that begins.
                open = true;
                continue;
            };
            open |= matches!(
                st.rec.phase,
                Phase::Ongoing | Phase::PrepareCommit | Phase::PrepareAbort
            );
            let r = match st.rec.phase {
                _ if st.unwritten.is_some() => {
                    open = true;
                    self.write_unwritten(&mut st).await
                }
                Phase::Empty | Phase::CompleteCommit | Phase::CompleteAbort
                    if now >= st.active_ms.saturating_add(self.config.id_expiration_ms) =>
                {
                    self.expire(&mut st).await
                }
                Phase::Ongoing if now >= st.started_ms.saturating_add(st.rec.timeout_ms) => {
                    log::warn!(
                        "transaction {}: open longer than its timeout ({} ms); aborting it",
                        st.id,
                        st.rec.timeout_ms
                    );
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    self.fence_and_abort(&mut st).await
                }
                Phase::PrepareCommit => self.complete_commit(&mut st).await,
                Phase::PrepareAbort => self.abort(&mut st).await,
                _ => Ok(()),
            };
            if let Err(err) = r {
                if let Some(more) = self.timer_failures.due(&st.id) {
                    log::warn!("transaction {}: {err}{more}", st.id);
                    logged += 1;
                }
            }
        }
        (open, logged)
    }

    /// Forgets an idle id, freeing its slot. Its named producer leaves the
    /// registry first, which fences its id for good, so an instance that
    /// outlived it is fenced rather than taken for a plain producer whose
    /// batches are outside any transaction; an init of the id starts it
    /// again with a new producer id. (A name registered before names could
    /// be forgotten is kept, and fenced by a bumped epoch.)
    async fn expire(&self, st: &mut TxnState) -> Result<(), TxnError> {
        debug_assert!(!is_open(st.rec.phase));
        let pid = st.rec.producer_id;
        let name = format!("{NAME_PREFIX}{}", st.id);
        if self.broker.forget_producer(&name).await? {
            // Its batches meet the registry's refusal, not this id's gate,
            // and its requests this id's, should the tombstone fail.
            self.by_producer.lock().expect("txn lock").remove(&pid);
            st.rec.producer_id = crate::batch::NO_PRODUCER_ID;
        } else if pid != crate::batch::NO_PRODUCER_ID {
            let (_, epoch) = self.broker.init_producer(Some(&name)).await?;
            st.rec.producer_epoch = epoch;
        }
        // The tombstone: a restart does not load it again.
        self.write_log(vec![(encode(&LogKey::Txn(st.id.clone())), Vec::new())])
            .await?;
        st.expired = true;
        self.by_id.lock().expect("txn lock").remove(&st.id);
        self.by_producer.lock().expect("txn lock").remove(&pid);
        self.stats.expirations.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "transactional id {}: expired, unused for {} ms (transactions.id_expiration_ms)",
            st.id,
            self.config.id_expiration_ms
        );
        Ok(())
    }

    /// Bumps the producer's epoch (so a live instance is fenced, not
    /// allowed to start a new transaction with the rest of its records),
    /// then aborts.
    async fn fence_and_abort(&self, st: &mut TxnState) -> Result<(), TxnError> {
        let (pid, epoch) = self
            .broker
            .init_producer(Some(&format!("{NAME_PREFIX}{}", st.id)))
            .await?;
        let old = st.rec.producer_epoch;
        if pid == st.rec.producer_id {
            st.rec.producer_epoch = epoch;
        }
        // Else its epochs ran out and the name has a new id: the
        // transaction is aborted under the old one (its markers, the
        // index), then the new one taken from the registry.
        self.abort_with(st, old).await
    }

    /// The registry's id for the id's name, if its epochs ran out and it
    /// moved to a new one since `st` took its id (the old one is fenced):
    /// taken once nothing open is left under the old id.
    async fn follow_new_id(&self, st: &mut TxnState) {
        debug_assert!(!is_open(st.rec.phase));
        let old = st.rec.producer_id;
        if old == crate::batch::NO_PRODUCER_ID {
            return;
        }
        let name = format!("{NAME_PREFIX}{}", st.id);
        let Some((pid, epoch)) = self.broker.named_producer(&name).await else {
            return;
        };
        if pid == old {
            return;
        }
        let mut by_producer = self.by_producer.lock().expect("txn lock");
        if let Some(entry) = by_producer.remove(&old) {
            by_producer.insert(pid, entry);
        }
        st.rec.producer_id = pid;
        st.rec.producer_epoch = epoch;
    }

    async fn abort(&self, st: &mut TxnState) -> Result<(), TxnError> {
        let epoch = st.rec.producer_epoch;
        self.abort_with(st, epoch).await
    }

    /// Abort needs no durable decision first: recovery aborts whatever it
    /// finds open, so a crash anywhere here ends the same way.
    async fn abort_with(&self, st: &mut TxnState, marker_epoch: u16) -> Result<(), TxnError> {
        st.rec.phase = Phase::PrepareAbort;
        let pid = st.rec.producer_id;
        let markers = self
            .write_markers(&st.rec.partitions, pid, marker_epoch, MARKER_ABORT)
            .await?;
        let mut entries = Vec::with_capacity(markers.len() + 1);
        for ((t, p, first), marker) in st.rec.partitions.iter().zip(&markers) {
            // Deleted with its records: nothing of it to skip.
            let Some(marker) = marker else {
                continue;
            };
            self.index().add_aborted(
                t,
                *p,
                Aborted {
                    producer_id: pid,
                    first: *first,
                    marker: *marker,
                },
            );
            entries.push((
                encode(&LogKey::Aborted(t.clone(), *p, *marker)),
                encode(&AbortedRecord {
                    producer_id: pid,
                    first: *first,
                }),
            ));
        }
        // Readers move on once markers and ranges are in, whether the log
        // says so yet or not: if it never does, recovery aborts again,
        // from the same first offsets to a later marker.
        for (t, p, _) in std::mem::take(&mut st.rec.partitions) {
            self.index().close(&t, p, pid);
        }
        self.close(st, Phase::CompleteAbort);
        self.follow_new_id(st).await;
        entries.push(self.stamped(st));
        self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        self.write_ended(st, entries).await
    }

    /// Writes the records of a transaction that ended (markers written,
    /// index closed); if that fails, they are kept to be retried.
    async fn write_ended(
        &self,
        st: &mut TxnState,
        records: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), TxnError> {
        st.unwritten = Some(records);
        self.write_unwritten(st).await
    }

    /// Writes the id's records kept from a failed write, if any: an
    /// ended transaction's, or a commit's decision (still prepared).
    async fn write_unwritten(&self, st: &mut TxnState) -> Result<(), TxnError> {
        if let Some(records) = &st.unwritten {
            self.write_log(records.clone()).await.map_err(|e| match e {
                TxnError::Broker(error) if !is_open(st.rec.phase) => TxnError::Unrecorded {
                    id: st.id.clone(),
                    committed: st.rec.phase == Phase::CompleteCommit,
                    error,
                },
                e => e,
            })?;
            st.unwritten = None;
        }
        Ok(())
    }

    /// After the PrepareCommit record is durable: markers, offsets, and
    /// the record that says it is done. Every step may be done twice.
    async fn complete_commit(&self, st: &mut TxnState) -> Result<(), TxnError> {
        let pid = st.rec.producer_id;
        self.write_markers(
            &st.rec.partitions,
            pid,
            st.rec.producer_epoch,
            MARKER_COMMIT,
        )
        .await?;
        for (t, p, _) in &st.rec.partitions {
            self.index().close(t, *p, pid);
        }
        let mut by_group: BTreeMap<&str, Vec<(Tp, u64)>> = BTreeMap::new();
        for (g, t, p, o) in &st.rec.offsets {
            by_group
                .entry(g.as_str())
                .or_default()
                .push(((t.clone(), *p), *o));
        }
        for (g, offsets) in by_group {
            self.groups.commit_in_transaction(g, offsets).await?;
        }
        st.rec.partitions = Vec::new();
        self.close(st, Phase::CompleteCommit);
        let rec = self.stamped(st);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.write_ended(st, vec![rec]).await
    }

    /// A transaction's first record or offsets begin it, if fewer than
    /// `transactions.max_open` are open; one that is ending takes none
    /// until it is done (`why` ends the message).
    /// What it began, if anything, for [`Coordinator::unbegin`].
    fn begin_unless_ongoing(
        &self,
        st: &mut TxnState,
        why: &str,
    ) -> Result<Option<Begun>, TxnError> {
        match st.rec.phase {
            Phase::Ongoing => Ok(None),
            Phase::Empty | Phase::CompleteCommit | Phase::CompleteAbort => {
                // An eighth kept for the partitions the open ones add.
                let ranges = self.config.max_aborted_ranges;
                if self.index().ranges_taken() >= ranges - ranges / 8 {
                    return Err(TxnError::TooManyAborted {
                        id: st.id.clone(),
                        partition: None,
                        max: ranges,
                    });
                }
                let max = self.config.max_open;
                self.open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .map_err(|_| TxnError::TooManyOpen {
                        id: st.id.clone(),
                        max,
                    })?;
                let before = Begun {
                    phase: st.rec.phase,
                    started_ms: st.started_ms,
                };
                begin(st, now_ms(&self.broker));
                Ok(Some(before))
            }
            p => Err(TxnError::InvalidState(format!(
                "transaction {} is ending ({}){why}",
                st.id,
                p.name()
            ))),
        }
    }

    /// Takes back a transaction the refused request began (nothing of it
    /// was written), freeing its slot of `max_open`.
    fn unbegin(&self, st: &mut TxnState, begun: Option<Begun>) {
        let Some(before) = begun else {
            return;
        };
        debug_assert!(st.rec.partitions.is_empty() && st.held.is_empty());
        self.open.fetch_sub(1, Ordering::AcqRel);
        st.rec.phase = before.phase;
        st.rec.offsets = Vec::new();
        st.started_ms = before.started_ms;
    }

    /// Ends an open transaction in `phase` (idle ids keep neither its
    /// partitions nor its offsets), freeing its slot of `max_open`.
    fn close(&self, st: &mut TxnState, phase: Phase) {
        debug_assert!(!is_open(phase));
        if is_open(st.rec.phase) {
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
        st.rec.phase = phase;
        st.rec.offsets = Vec::new();
        st.held = Vec::new();
        st.left_open = false;
    }

    /// One marker per partition, written together; their offsets, `None`
    /// for a partition whose topic was deleted (its records went with it,
    /// and a marker that cannot be written must not keep the transaction
    /// from ending in the others).
    async fn write_markers(
        &self,
        partitions: &[(String, u32, u64)],
        pid: u64,
        epoch: u16,
        kind: u8,
    ) -> Result<Vec<Option<u64>>, TxnError> {
        let ts = now_ms(&self.broker) as i64;
        let key = marker_key(kind);
        let value = marker_value(pid, epoch);
        let mut acks = Vec::with_capacity(partitions.len());
        {
            let mut group = self.broker.produce_group();
            for (t, p, _) in partitions {
                if let Err(BrokerError::UnknownTopic(_) | BrokerError::UnknownPartition { .. }) =
                    self.broker.partition_id(t, *p)
                {
                    acks.push(None);
                    continue;
                }
                let mut b = BatchBuilder::new();
                b.push(ts, Some(&key), &value, &[]);
                acks.push(Some(
                    group
                        .produce_marker(t, *p, BatchBuf::from(b.finish_control()))
                        .await?,
                ));
            }
        }
        let mut out = Vec::with_capacity(acks.len());
        for a in acks {
            out.push(match a {
                Some(a) => Some(a.await?.base_offset),
                None => None,
            });
        }
        Ok(out)
    }

    /// Writes records to the log and waits for them to be durable. The
    /// records of every caller that queued while the last write was in
    /// flight go out together: the first to take the log's lock writes
    /// them all, and the others find theirs written when they get it.
    async fn write_log(&self, records: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), TxnError> {
        let (done, written) = async_channel::bounded(1);
        self.log_queue
            .lock()
            .expect("txn log queue")
            .push(QueuedWrite {
                records: records.clone(),
                done,
            });
        let mut since = self.log.lock().await;
        // A writer answers its round before it lets the lock go.
        match written.try_recv() {
            Ok(true) => return Ok(()),
            // That round failed: ours alone, for this caller's own error.
            Ok(false) => return self.write_round(&mut since, records).await,
            Err(_) => {}
        }
        let round = std::mem::take(&mut *self.log_queue.lock().expect("txn log queue"));
        let all = round
            .iter()
            .flat_map(|q| q.records.iter().cloned())
            .collect();
        let result = self.write_round(&mut since, all).await;
        for q in round {
            let _ = q.done.try_send(result.is_ok());
        }
        result
    }

    /// One write of the log, durable when it returns. Every quarter ring
    /// the whole live state goes first.
    async fn write_round(
        &self,
        since: &mut u64,
        records: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), TxnError> {
        self.ensure_topic().await?;
        let ts = now_ms(&self.broker) as i64;
        // Each record with its timestamp: an id's is its last activity.
        let mut all: Vec<(i64, Vec<u8>, Vec<u8>)> = Vec::new();
        let rewrite = *since >= LOG_REWRITE_BYTES;
        if rewrite {
            let ids = self.by_id.lock().expect("txn lock");
            for (id, slot) in ids.iter() {
                if let Some(st) = slot.entry.try_lock() {
                    let (k, v) = txn_entry(&st);
                    all.push((st.active_ms as i64, k, v));
                } else if let Some((ts, rec)) = &slot.durable {
                    // Its holder may write nothing (a batch of a partition
                    // already in its transaction, an offsets request), and
                    // its record must not be left behind to fall out of
                    // the ring: the one a restart would load goes again. A
                    // newer one in this round or later still wins.
                    let mut rec = rec.clone();
                    if matches!(rec.phase, Phase::Ongoing | Phase::PrepareAbort) {
                        // Those durable, and any being added: a restart
                        // aborts them all.
                        rec.partitions = self.index().open_partitions(rec.producer_id);
                    }
                    all.push((*ts, encode(&LogKey::Txn(id.clone())), encode(&rec)));
                }
            }
            drop(ids);
            for (t, p, a) in self.index().all_aborted() {
                all.push((
                    ts,
                    encode(&LogKey::Aborted(t, p, a.marker)),
                    encode(&AbortedRecord {
                        producer_id: a.producer_id,
                        first: a.first,
                    }),
                ));
            }
        }
        all.extend(records.into_iter().map(|(k, v)| (ts, k, v)));
        let cut = LOG_BATCH_BYTES.min(self.broker.max_batch_bytes() / 2);
        let mut batches = Vec::new();
        let mut b = BatchBuilder::new();
        for (ts, k, v) in &all {
            b.push(*ts, Some(k), v, &[]);
            if b.estimated_bytes() >= cut {
                batches.push(b.finish(crate::batch::ProducerStamp::NONE));
            }
        }
        if !b.is_empty() {
            batches.push(b.finish(crate::batch::ProducerStamp::NONE));
        }
        let bytes: u64 = batches.iter().map(|b| b.len() as u64).sum();
        let mut acks = Vec::with_capacity(batches.len());
        {
            let mut group = self.broker.produce_group();
            for batch in batches {
                acks.push(group.produce(TXN_TOPIC, 0, BatchBuf::from(batch)).await?);
            }
        }
        for a in acks {
            a.await?;
        }
        *since = if rewrite { 0 } else { *since + bytes };
        self.note_durable(&all);
        Ok(())
    }

    /// Keeps each id's newest record now durable, for the rewrites.
    fn note_durable(&self, written: &[(i64, Vec<u8>, Vec<u8>)]) {
        let mut ids = self.by_id.lock().expect("txn lock");
        for (ts, k, v) in written {
            // Only ids' keys: aborted ranges are the index's to rewrite.
            let Ok(LogKey::Txn(id)) = postcard::from_bytes::<LogKey>(k) else {
                continue;
            };
            let Some(slot) = ids.get_mut(&id) else {
                continue;
            };
            // A tombstone: the id is going, nothing of it to carry.
            slot.durable = postcard::from_bytes::<TxnRecord>(v)
                .ok()
                .map(|rec| (*ts, carried(&rec)));
        }
    }

    async fn ensure_topic(&self) -> Result<(), TxnError> {
        if self.broker.topic(TXN_TOPIC).is_ok() {
            return Ok(());
        }
        let spec = log_topic_spec(self.broker.max_batch_bytes());
        match self.broker.create_topic(TXN_TOPIC, &spec).await {
            Ok(_) | Err(BrokerError::TopicExists(_)) => Ok(()),
            Err(e) => {
                log::warn!("cannot create the transaction log {TXN_TOPIC}: {e}");
                Err(e.into())
            }
        }
    }
}

/// The coordinator's log as it is made, storage taking batches of up to
/// `max_batch_bytes`; its disk is reserved from the start
/// ([`super::internal_topics_disk`]).
pub(crate) fn log_topic_spec(max_batch_bytes: usize) -> TopicSpec {
    let segment_bytes = LOG_SEGMENT_BYTES.max((2 * max_batch_bytes as u64).next_multiple_of(4096));
    // A plain ring: the live state is written again before it wraps.
    TopicSpec::internal(segment_bytes, LOG_SEGMENTS, false)
}

/// What a transaction's begin changed: `phase` was idle.
struct Begun {
    phase: Phase,
    started_ms: u64,
}

fn begin(st: &mut TxnState, now_ms: u64) {
    st.rec.phase = Phase::Ongoing;
    st.rec.partitions.clear();
    st.rec.offsets.clear();
    st.started_ms = now_ms;
}

fn is_open(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Ongoing | Phase::PrepareCommit | Phase::PrepareAbort
    )
}

fn check_epoch(
    broker: &Broker,
    st: &TxnState,
    producer_id: u64,
    epoch: u16,
) -> Result<(), TxnError> {
    // A producer id the registry fenced for good (its name left it) is
    // fenced here as its batches are: this id's own old one, once the id
    // moved to a new one (epochs ran out, or it expired and was re-made).
    if producer_id != st.rec.producer_id && broker.producer_forgotten(producer_id) {
        return Err(TxnError::FencedId {
            id: st.id.clone(),
            producer_id,
        });
    }
    if producer_id != st.rec.producer_id {
        return Err(TxnError::InvalidState(format!(
            "producer id {producer_id} is not transactional id {}'s",
            st.id
        )));
    }
    if epoch != st.rec.producer_epoch {
        return Err(TxnError::Fenced {
            epoch,
            current: st.rec.producer_epoch,
        });
    }
    Ok(())
}

/// What a rewrite needs of an id's durable record to write it again: all
/// of a prepared commit's, which completes with its partitions and
/// offsets; of an open transaction, not its partitions, which the index
/// holds while it is open, nor its offsets, since a restart aborts it;
/// an idle id has neither.
fn carried(rec: &TxnRecord) -> TxnRecord {
    let prepared = rec.phase == Phase::PrepareCommit;
    TxnRecord {
        partitions: if prepared {
            rec.partitions.clone()
        } else {
            Vec::new()
        },
        offsets: if prepared {
            rec.offsets.clone()
        } else {
            Vec::new()
        },
        ..*rec
    }
}

fn txn_entry(st: &TxnState) -> (Vec<u8>, Vec<u8>) {
    (encode(&LogKey::Txn(st.id.clone())), encode(&st.rec))
}

/// A marker record's key: CBOR `[0, type]`.
fn marker_key(kind: u8) -> Vec<u8> {
    let mut out = Vec::new();
    minicbor::encode([0u8, kind], &mut out).expect("Vec<u8> writes are infallible");
    out
}

/// A marker record's value: CBOR `[producer_id, producer_epoch]`.
fn marker_value(pid: u64, epoch: u16) -> Vec<u8> {
    let mut out = Vec::new();
    minicbor::encode((pid, epoch), &mut out).expect("Vec<u8> writes are infallible");
    out
}

/// Whether a control record's key says commit (`Some(true)`), abort
/// (`Some(false)`), or is not a marker this version knows.
pub fn marker_is_commit(key: &[u8]) -> Option<bool> {
    let [v, kind]: [u8; 2] = minicbor::decode(key).ok()?;
    match (v, kind) {
        (0, MARKER_COMMIT) => Some(true),
        (0, MARKER_ABORT) => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
