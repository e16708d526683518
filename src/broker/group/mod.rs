//! Consumer groups: the coordinator (membership, generations, rebalances,
//! assignment) and committed offsets. A client of the broker's API: it
//! stores offsets by producing to an internal topic and reads them back
//! with fetches, like any other client, never through storage.
//!
//! # Membership
//!
//! A member joins with its subscription and the partitions it holds. Any
//! change of membership or subscription starts a rebalance: the group
//! waits (up to the members' rebalance timeout, the client's max poll
//! interval) for every member to join again, then a new generation is
//! made, the assignor runs, and each member fetches its share with sync.
//! Members learn of a rebalance from heartbeat (`rebalance_in_progress`)
//! or from sync (`rejoin`). A member unheard of for its session timeout is
//! removed, and a rebalance follows.
//!
//! # No partition has two owners
//!
//! The assignor says where each partition should be; the coordinator
//! hands a partition to its new owner only once no other member holds it,
//! i.e. once the old owner has joined again without it (it commits what
//! it handed out, then lets it go: Kafka's cooperative protocol, KIP-429,
//! here for every assignor). A generation that withholds partitions this
//! way starts the next rebalance at once, which hands them over.
//!
//! # Committed offsets
//!
//! Commits are records in the internal topic [`OFFSETS_TOPIC`] (one
//! partition, fsync always), keyed by group, topic and partition so that
//! compaction can keep the last of each. One writer task takes every
//! commit queued while the previous write was in flight and writes them
//! as one batch: one fsync for all of them. A commit is answered only once
//! its write is durable, and only then becomes visible. The log is read
//! back at start-up (last record per key wins; an empty value deletes);
//! their expiry counts from then at the earliest, as membership is not
//! kept.
//!
//! The topic is compacted (`cleanup = "compact"`): its ring never
//! overwrites a key's latest commit, and the cleaner drops the older ones
//! (and, after their retention, the tombstones a deleted group's offsets
//! leave). A write that meets a ring full of not yet compacted commits
//! runs a compaction and is tried again. A topic an older broker created
//! as a plain, overwriting ring (kept safe by rewriting every live offset
//! each quarter ring) is altered to compacted at the first write.

pub mod assignor;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use serde::{Deserialize, Serialize};

use super::quiet_log::QuietLog;
use super::{Broker, BrokerError, CleanupPolicy, TopicSpec};
use crate::batch::{BatchBuilder, ProducerStamp};
use crate::bufpool::BatchBuf;

pub use assignor::{Assignor, Tp};

/// The internal topic holding committed offsets. Names starting with
/// [`INTERNAL_TOPIC_PREFIX`] are the broker's own: hidden from listings
/// and closed to clients' produce, create and delete.
pub const OFFSETS_TOPIC: &str = "__skiff_offsets";
pub const INTERNAL_TOPIC_PREFIX: &str = "__skiff_";
/// The offsets topic's ring: 4 x 1 MiB, compacted; a merge's live data
/// must fit one segment (docs/semantics.md), about 15,000 live offsets
/// (records of some 70 bytes). Its disk (and the merge's scratch segment)
/// is kept in `storage.disk_budget_bytes` from the first start
/// ([`super::internal_topics_disk`]), so no topic can take it.
const OFFSETS_SEGMENT_BYTES: u64 = 1024 * 1024;
const OFFSETS_SEGMENTS: u32 = 4;
/// A batch of the offsets log is cut at about this size, or at half
/// `storage.max_batch_bytes` if that is smaller.
const OFFSETS_BATCH_BYTES: usize = 60 * 1024;
/// Commit metadata is for the application's bookkeeping, not data: the
/// most `groups.max_offset_metadata_bytes` may allow (Kafka's default).
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;
/// Group, member and instance ids.
pub const GROUP_ID_BYTES_MAX: usize = 255;
/// A member's client name as the coordinator keeps it: what the client
/// calls itself and its identity.
pub const CLIENT_BYTES_MAX: usize = 512;
/// How often session timeouts and rebalance deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

/// Whether a topic is one of the broker's own.
pub fn is_internal_topic(name: &str) -> bool {
    name.starts_with(INTERNAL_TOPIC_PREFIX)
}

/// The coordinator's limits and timeouts (`[groups]` in the config).
#[derive(Debug, Clone)]
pub struct GroupsConfig {
    /// Offsets of a group empty this long are deleted.
    pub offsets_retention_ms: u64,
    pub session_timeout_ms_min: u32,
    pub session_timeout_ms_max: u32,
    pub max_groups: usize,
    /// Members of all groups together.
    pub max_members: usize,
    pub max_members_per_group: usize,
    /// The longest metadata a commit may carry.
    pub max_metadata: usize,
}

impl GroupsConfig {
    pub fn from_config(cfg: &crate::config::Config) -> GroupsConfig {
        let g = &cfg.groups;
        GroupsConfig {
            offsets_retention_ms: g.offsets_retention_ms,
            session_timeout_ms_min: g.session_timeout_ms_min,
            session_timeout_ms_max: g.session_timeout_ms_max,
            max_groups: g.max_groups as usize,
            max_members: g.max_members as usize,
            max_members_per_group: g.max_members_per_group as usize,
            max_metadata: g.max_offset_metadata_bytes as usize,
        }
    }
}

/// Why a group request failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum GroupError {
    /// No group of that name: no members and no committed offsets.
    UnknownGroup(String),
    /// The member id is not in the group: it was removed (session
    /// timeout, missed rebalance) or replaced by its static instance.
    UnknownMember { group: String, member: String },
    /// The request names a generation that is not the group's current.
    IllegalGeneration {
        group: String,
        got: u32,
        current: u32,
    },
    /// The group is rebalancing: join again.
    RebalanceInProgress(String),
    /// A commit for a partition not assigned to the member.
    NotOwner {
        group: String,
        member: String,
        topic: String,
        partition: u32,
    },
    /// The operation needs a group without members.
    NotEmpty { group: String, members: usize },
    /// A bad argument: names, timeouts, assignor.
    Invalid(String),
    /// `groups.max_groups` groups are kept: a new one is refused.
    TooManyGroups { max: usize },
    /// A join of one more member past `groups.max_members_per_group` in
    /// `group`, or past `groups.max_members` over all groups (`group`
    /// `None`).
    TooManyMembers { group: Option<String>, max: usize },
    /// The broker refused the topic or partition, or the offsets log
    /// could not be written.
    Broker(Arc<BrokerError>),
}

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownGroup(g) => write!(f, "unknown group '{g}'"),
            Self::UnknownMember { group, member } => {
                write!(f, "member '{member}' is not in group '{group}'")
            }
            Self::IllegalGeneration {
                group,
                got,
                current,
            } => write!(
                f,
                "generation {got} of group '{group}' is over: the current one is {current}"
            ),
            Self::RebalanceInProgress(g) => write!(f, "group '{g}' is rebalancing: join again"),
            Self::NotOwner {
                group,
                member,
                topic,
                partition,
            } => write!(
                f,
                "member '{member}' of group '{group}' is not assigned {topic}/{partition}"
            ),
            Self::NotEmpty { group, members } => {
                write!(
                    f,
                    "group '{group}' has {members} member(s): stop them first"
                )
            }
            Self::Invalid(m) => f.write_str(m),
            Self::TooManyGroups { max } => {
                write!(f, "too many groups: groups.max_groups is {max}")
            }
            Self::TooManyMembers { group: None, max } => write!(
                f,
                "too many group members: groups.max_members is {max} (members of all groups together)"
            ),
            Self::TooManyMembers {
                group: Some(g),
                max,
            } => write!(
                f,
                "group '{g}' is full: groups.max_members_per_group is {max}"
            ),
            Self::Broker(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for GroupError {}

impl From<BrokerError> for GroupError {
    fn from(e: BrokerError) -> Self {
        GroupError::Broker(Arc::new(e))
    }
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub offset: u64,
    pub metadata: Option<String>,
    /// When it was committed (ms since the epoch).
    pub commit_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No members (offsets may remain).
    Empty,
    /// Waiting for the members to join again, until the deadline.
    Joining {
        deadline: Instant,
    },
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::Joining { .. } => "PreparingRebalance",
            State::Stable => "Stable",
        }
    }
}

#[derive(Debug)]
struct Member {
    instance_id: Option<String>,
    client: String,
    topics: BTreeSet<String>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_seen: Instant,
    /// Joined the rebalance in progress.
    joined: bool,
    /// What it holds, as far as the coordinator knows: what it reported
    /// at its last join, within what it was given.
    owned: BTreeSet<Tp>,
    /// Its share of the current generation.
    assigned: BTreeSet<Tp>,
}

impl Member {
    /// What it may commit: its share, and what it still holds and is to
    /// give up (it commits those before it rejoins without them).
    fn may_commit(&self, tp: &Tp) -> bool {
        self.assigned.contains(tp) || self.owned.contains(tp)
    }
}

#[derive(Debug)]
struct Group {
    state: State,
    generation: u32,
    assignor: Option<Assignor>,
    members: BTreeMap<String, Member>,
    offsets: BTreeMap<Tp, Committed>,
    /// Since when the group has had no members (ms since the epoch); its
    /// offsets expire `offsets_retention_ms` after this or their last
    /// commit, whichever is later.
    empty_since_ms: i64,
}

impl Group {
    fn new(now_ms: i64) -> Group {
        Group {
            state: State::Empty,
            generation: 0,
            assignor: None,
            members: BTreeMap::new(),
            offsets: BTreeMap::new(),
            empty_since_ms: now_ms,
        }
    }
}

/// What a join answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub member_id: String,
    pub generation: u32,
    pub assignor: Assignor,
    pub members: u32,
}

/// What a member asks to join with.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub group: String,
    /// None for a new member: the coordinator makes its id.
    pub member_id: Option<String>,
    /// Static membership: a member of this instance id that comes back
    /// within its session timeout takes its place and its partitions,
    /// with no rebalance.
    pub instance_id: Option<String>,
    pub client: String,
    pub topics: BTreeSet<String>,
    pub assignor: Assignor,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub owned: BTreeSet<Tp>,
}

/// What a sync answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub assignment: BTreeSet<Tp>,
    /// The next rebalance has started already: apply this, then join.
    pub rejoin: bool,
}

/// One group as `describe` shows it.
#[derive(Debug, Clone)]
pub struct GroupDescription {
    pub group: String,
    pub state: &'static str,
    pub generation: u32,
    pub assignor: Option<Assignor>,
    pub members: Vec<MemberDescription>,
    pub offsets: Vec<OffsetDescription>,
}

#[derive(Debug, Clone)]
pub struct MemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client: String,
    pub assignment: Vec<Tp>,
}

#[derive(Debug, Clone)]
pub struct OffsetDescription {
    pub topic: String,
    pub partition: u32,
    pub committed: Option<u64>,
    pub metadata: Option<String>,
    /// None when the partition cannot be read (deleted topic, say).
    pub log_end: Option<u64>,
    pub lag: Option<u64>,
}

/// One group in a listing.
#[derive(Debug, Clone)]
pub struct GroupListing {
    pub group: String,
    pub state: &'static str,
    pub members: u32,
}

/// A write for the offsets log, and who waits for it.
struct Pending {
    group: String,
    /// (partition, Some(commit)) to set, (partition, None) to delete.
    entries: Vec<(Tp, Option<Committed>)>,
    done: async_channel::Sender<Result<(), GroupError>>,
    /// The group's slot, released once the write is applied or failed.
    _hold: Option<Reservation>,
}

/// Group names held in `groups.max_groups` before they are kept: a commit
/// on its way to the log, an open transaction's offsets. Each counts as a
/// group until its last [`Reservation`] is dropped.
type Reserved = Arc<Mutex<BTreeMap<String, usize>>>;

/// A group's slot in `groups.max_groups`, taken when the room is checked
/// and held until what was checked is applied or given up: offsets that
/// passed the check always find their slot, and no more groups are kept
/// than the limit, however many commits for new groups run at once.
pub struct Reservation {
    reserved: Reserved,
    group: String,
}

impl Reservation {
    fn new(reserved: &Reserved, map: &mut BTreeMap<String, usize>, group: &str) -> Reservation {
        *map.entry(group.to_owned()).or_default() += 1;
        Reservation {
            reserved: reserved.clone(),
            group: group.to_owned(),
        }
    }

    pub fn group(&self) -> &str {
        &self.group
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut map = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.group);
            }
        }
    }
}

/// Counters of the offsets log, for the metrics and the benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct GroupStats {
    /// Commit requests made durable.
    pub commits: u64,
    /// Writes of the offsets log (each one fsync, by its policy).
    pub log_writes: u64,
}

/// The coordinator of every group.
pub struct Coordinator {
    broker: Arc<Broker>,
    config: GroupsConfig,
    groups: Mutex<BTreeMap<String, Group>>,
    /// Locked after `groups` when both are.
    reserved: Reserved,
    /// Notified at every change of a group's state; waiting joins look.
    changed: Event,
    /// Notified when a member joins: its session needs the timers.
    timers: Event,
    queue: async_channel::Sender<Pending>,
    queued: async_channel::Receiver<Pending>,
    commits: AtomicU64,
    log_writes: AtomicU64,
    /// A full ring whose compaction cannot be done (no room on a full disk
    /// for its scratch segment) fails again at every commit: logged once a
    /// minute.
    compaction_failures: QuietLog<()>,
    /// A log that refuses writes (a full ring, a failed disk) fails every
    /// commit: logged once a minute, as the share log's.
    log_failures: QuietLog<()>,
    /// An offsets topic the broker refuses to make (its disk budget, its
    /// `max_topics`) fails every request that needs it: logged once a minute.
    create_failures: QuietLog<()>,
}

fn now_ms() -> i64 {
    crate::batch::now_ms()
}

/// A group or instance id's length; `what` names it in the message.
pub(crate) fn check_id(what: &str, id: &str) -> Result<(), GroupError> {
    if id.is_empty() || id.len() > GROUP_ID_BYTES_MAX {
        return Err(GroupError::Invalid(format!(
            "{what} must be 1 to {GROUP_ID_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct OffsetKey {
    group: String,
    topic: String,
    partition: u32,
}

#[derive(Serialize, Deserialize)]
struct OffsetValue {
    offset: u64,
    metadata: Option<String>,
    commit_ms: i64,
}

/// The format version of an offsets-log record, its key's first byte.
const OFFSET_RECORD_VERSION: u8 = 1;

fn encode_key(group: &str, tp: &Tp) -> Vec<u8> {
    let mut key = vec![OFFSET_RECORD_VERSION];
    let k = OffsetKey {
        group: group.to_owned(),
        topic: tp.0.clone(),
        partition: tp.1,
    };
    key.extend(postcard::to_allocvec(&k).expect("postcard encodes to a Vec"));
    key
}

fn encode_value(c: &Committed) -> Vec<u8> {
    let v = OffsetValue {
        offset: c.offset,
        metadata: c.metadata.clone(),
        commit_ms: c.commit_ms,
    };
    postcard::to_allocvec(&v).expect("postcard encodes to a Vec")
}

/// (group, partition, commit or deletion) of an offsets-log record; None
/// for a record of another version (a newer broker's), which is skipped.
fn decode_record(key: &[u8], value: &[u8]) -> Option<(String, Tp, Option<Committed>)> {
    let (&version, key) = key.split_first()?;
    if version != OFFSET_RECORD_VERSION {
        return None;
    }
    let k: OffsetKey = postcard::from_bytes(key).ok()?;
    let tp = (k.topic, k.partition);
    if value.is_empty() {
        return Some((k.group, tp, None));
    }
    let v: OffsetValue = postcard::from_bytes(value).ok()?;
    Some((
        k.group,
        tp,
        Some(Committed {
            offset: v.offset,
            metadata: v.metadata,
            commit_ms: v.commit_ms,
        }),
    ))
}

impl Coordinator {
    /// The coordinator of `broker`, its committed offsets read back from
    /// the offsets log. Its two tasks ([`Coordinator::run_log`],
    /// [`Coordinator::run_timers`]) must be spawned by the caller.
    pub fn open(
        broker: Arc<Broker>,
        config: GroupsConfig,
    ) -> Result<Arc<Coordinator>, BrokerError> {
        let (queue, queued) = async_channel::unbounded();
        let c = Coordinator {
            broker,
            config,
            groups: Mutex::new(BTreeMap::new()),
            reserved: Reserved::default(),
            changed: Event::new(),
            timers: Event::new(),
            queue,
            queued,
            commits: AtomicU64::new(0),
            log_writes: AtomicU64::new(0),
            compaction_failures: QuietLog::new(|_| {
                format!("offsets log {OFFSETS_TOPIC}: compactions failed")
            }),
            log_failures: QuietLog::new(|_| format!("offsets log {OFFSETS_TOPIC}: writes failed")),
            create_failures: QuietLog::new(|_| {
                format!("offsets topic {OFFSETS_TOPIC}: creations failed")
            }),
        };
        smol::block_on(c.load())?;
        Ok(Arc::new(c))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn load(&self) -> Result<(), BrokerError> {
        let started = Instant::now();
        let mut records = 0u64;
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        // Membership is not kept across a restart, nor when a group
        // emptied: any group may have had members until the broker
        // stopped, however old its last commit (an idle member does not
        // commit again), so each counts as emptied now.
        let started_ms = now_ms();
        super::replay_log(&self.broker, OFFSETS_TOPIC, |_, _, key, value| {
            records += 1;
            let Some((group, tp, commit)) = decode_record(key, value) else {
                return;
            };
            match commit {
                Some(c) => {
                    let g = groups
                        .entry(group)
                        .or_insert_with(|| Group::new(started_ms));
                    g.empty_since_ms = g.empty_since_ms.max(c.commit_ms);
                    g.offsets.insert(tp, c);
                }
                None => {
                    if let Some(g) = groups.get_mut(&group) {
                        g.offsets.remove(&tp);
                        if g.offsets.is_empty() {
                            groups.remove(&group);
                        }
                    }
                }
            }
        })
        .await?;
        log::info!(
            "committed offsets loaded: {} group(s) from {records} record(s) in {:?}",
            groups.len(),
            started.elapsed()
        );
        *self.lock() = groups;
        Ok(())
    }

    /// Whether `group` is kept (or reserved) already or there is room for
    /// it; reserved names count as groups.
    fn room_for(&self, groups: &BTreeMap<String, Group>, group: &str) -> Result<(), GroupError> {
        self.reserve_locked(groups, group).map(drop)
    }

    /// Takes `group`'s slot if it is kept already or there is room for
    /// it. Call with `groups` locked, so no check races another's insert.
    fn reserve_locked(
        &self,
        groups: &BTreeMap<String, Group>,
        group: &str,
    ) -> Result<Reservation, GroupError> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let known = groups.contains_key(group) || reserved.contains_key(group);
        let count = groups.len() + reserved.keys().filter(|g| !groups.contains_key(*g)).count();
        if !known && count >= self.config.max_groups {
            return Err(GroupError::TooManyGroups {
                max: self.config.max_groups,
            });
        }
        Ok(Reservation::new(&self.reserved, &mut reserved, group))
    }

    /// `group`'s slot, past the limit if need be: for offsets decided
    /// already (a prepared transaction read back at start-up).
    pub fn hold(&self, group: &str) -> Reservation {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        Reservation::new(&self.reserved, &mut reserved, group)
    }

    /// Deletions for the group's offsets of partitions that no longer
    /// exist, when a commit of `new` would take it past
    /// `server.max_partitions` offsets (none otherwise): a group's offsets
    /// stay within what the memory budget counts, however many topics
    /// come and go under it.
    fn stale<'a>(
        &self,
        groups: &BTreeMap<String, Group>,
        group: &str,
        new: impl Iterator<Item = &'a Tp>,
    ) -> Vec<(Tp, Option<Committed>)> {
        let Some(g) = groups.get(group) else {
            return Vec::new();
        };
        let added: BTreeSet<&Tp> = new.filter(|tp| !g.offsets.contains_key(*tp)).collect();
        if g.offsets.len() + added.len() <= self.broker.max_partitions() {
            return Vec::new();
        }
        g.offsets
            .keys()
            .filter(|(t, p)| self.broker.partition_id(t, *p).is_err())
            .map(|tp| (tp.clone(), None))
            .collect()
    }

    /// Refuses offsets for a group the coordinator could not keep, or
    /// holds its slot: a transaction takes one with its offsets and keeps
    /// it until it ends, since its commit, decided by then, cannot be
    /// refused.
    pub fn reserve(&self, group: &str) -> Result<Reservation, GroupError> {
        self.reserve_locked(&self.lock(), group)
    }

    /// Counters of the offsets log.
    pub fn stats(&self) -> GroupStats {
        GroupStats {
            commits: self.commits.load(Ordering::Relaxed),
            log_writes: self.log_writes.load(Ordering::Relaxed),
        }
    }

    // ------------------------------------------------------------ membership

    /// Joins (or rejoins) a group; answers once the rebalance this starts
    /// or joins has made a generation (or at once, for a static member
    /// taking its place back in a stable group).
    pub async fn join(&self, spec: JoinSpec) -> Result<Joined, GroupError> {
        check_id("the group id", &spec.group)?;
        if let Some(i) = &spec.instance_id {
            check_id("the group instance id", i)?;
        }
        if spec.topics.is_empty() {
            return Err(GroupError::Invalid(
                "a member subscribes to at least one topic".into(),
            ));
        }
        // A member stays in memory until its session ends, so what it may
        // bring is bounded: every member of every group at once must not
        // outgrow a board, and one join must not pin a frame's worth.
        let max_topics = self.broker.max_topics();
        if spec.topics.len() > max_topics {
            return Err(GroupError::Invalid(format!(
                "a member subscribes to at most {max_topics} topics (server.max_topics), not {}",
                spec.topics.len()
            )));
        }
        if let Some(t) = spec
            .topics
            .iter()
            .find(|t| crate::broker::validate_topic_name(t).is_err())
        {
            let shown: String = t.chars().take(64).collect();
            return Err(GroupError::Invalid(format!(
                "'{shown}' is not a topic name: 1 to {} of A-Z a-z 0-9 . _ -",
                crate::storage::TOPIC_NAME_BYTES_MAX
            )));
        }
        if spec.client.len() > CLIENT_BYTES_MAX {
            return Err(GroupError::Invalid(format!(
                "the client name is at most {CLIENT_BYTES_MAX} bytes, not {}",
                spec.client.len()
            )));
        }
        let ms = spec.session_timeout.as_millis() as u64;
        let (min, max) = (
            u64::from(self.config.session_timeout_ms_min),
            u64::from(self.config.session_timeout_ms_max),
        );
        if ms < min || ms > max {
            return Err(GroupError::Invalid(format!(
                "session timeout {ms} ms is outside groups.session_timeout_ms_min..=max ({min}..={max})"
            )));
        }
        let group_name = spec.group.clone();
        let member_id = {
            let mut groups = self.lock();
            let (id, immediate) = self.join_locked(&mut groups, spec)?;
            self.timers.notify(usize::MAX);
            if let Some(j) = immediate {
                return Ok(j);
            }
            id
        };
        self.changed.notify(usize::MAX);
        let stopping = self.broker.stopping();
        loop {
            let listener = self.changed.listen();
            {
                let mut groups = self.lock();
                let g = groups.get_mut(&group_name);
                let Some(g) = g else {
                    return Err(GroupError::UnknownMember {
                        group: group_name,
                        member: member_id,
                    });
                };
                let (generation, assignor, count) =
                    (g.generation, g.assignor, g.members.len() as u32);
                let Some(m) = g.members.get_mut(&member_id) else {
                    return Err(GroupError::UnknownMember {
                        group: group_name,
                        member: member_id,
                    });
                };
                if !m.joined {
                    return Ok(Joined {
                        member_id,
                        generation,
                        assignor: assignor.unwrap_or(Assignor::CooperativeSticky),
                        members: count,
                    });
                }
                // Waiting in join keeps the session alive.
                m.last_seen = Instant::now();
            }
            if stopping.is_triggered() {
                return Err(BrokerError::ShuttingDown.into());
            }
            futures_lite::future::or(
                async {
                    listener.await;
                },
                async {
                    smol::Timer::after(TICK).await;
                },
            )
            .await;
        }
    }

    /// The member's id, and the answer when there is nothing to wait for.
    fn join_locked(
        &self,
        groups: &mut BTreeMap<String, Group>,
        spec: JoinSpec,
    ) -> Result<(String, Option<Joined>), GroupError> {
        let now = Instant::now();
        self.room_for(groups, &spec.group)?;
        if spec.member_id.is_none() {
            // Checked before the group is made, so a refusal leaves none.
            let rejoins = spec.instance_id.as_ref().is_some_and(|i| {
                groups.get(&spec.group).is_some_and(|g| {
                    g.members
                        .values()
                        .any(|m| m.instance_id.as_ref() == Some(i))
                })
            });
            let members: usize = groups.values().map(|g| g.members.len()).sum();
            if !rejoins && members >= self.config.max_members {
                return Err(GroupError::TooManyMembers {
                    group: None,
                    max: self.config.max_members,
                });
            }
        }
        let g = groups
            .entry(spec.group.clone())
            .or_insert_with(|| Group::new(now_ms()));
        if let Some(a) = g.assignor.filter(|_| !g.members.is_empty()) {
            if a != spec.assignor {
                return Err(GroupError::Invalid(format!(
                    "group '{}' uses the {} assignor, not {}",
                    spec.group,
                    a.name(),
                    spec.assignor.name()
                )));
            }
        }
        let partitions = self.partition_counts();
        match &spec.member_id {
            Some(id) => {
                let Some(m) = g.members.get_mut(id) else {
                    return Err(GroupError::UnknownMember {
                        group: spec.group,
                        member: id.clone(),
                    });
                };
                // Believe what it says it holds, within what it was given.
                m.owned = spec
                    .owned
                    .iter()
                    .filter(|tp| m.may_commit(tp))
                    .cloned()
                    .collect();
                m.topics = spec.topics;
                m.session_timeout = spec.session_timeout;
                m.rebalance_timeout = spec.rebalance_timeout;
                m.last_seen = now;
                let id = id.clone();
                if !matches!(g.state, State::Joining { .. }) {
                    start_rebalance(g, now);
                }
                g.members.get_mut(&id).expect("member").joined = true;
                complete_if_ready(&spec.group, g, now, &partitions);
                Ok((id, None))
            }
            None => {
                let id = format!("{}-{:016x}", short(&spec.client), fastrand::u64(..));
                let old = spec.instance_id.as_ref().and_then(|i| {
                    g.members
                        .iter()
                        .find(|(_, m)| m.instance_id.as_ref() == Some(i))
                        .map(|(id, _)| id.clone())
                });
                if old.is_none() && g.members.len() >= self.config.max_members_per_group {
                    return Err(GroupError::TooManyMembers {
                        group: Some(spec.group.clone()),
                        max: self.config.max_members_per_group,
                    });
                }
                let mut m = Member {
                    instance_id: spec.instance_id.clone(),
                    client: spec.client,
                    topics: spec.topics,
                    session_timeout: spec.session_timeout,
                    rebalance_timeout: spec.rebalance_timeout,
                    last_seen: now,
                    joined: false,
                    owned: BTreeSet::new(),
                    assigned: BTreeSet::new(),
                };
                if let Some(old) = old.and_then(|o| g.members.remove(&o)) {
                    // The same instance again: it takes the old member's
                    // place and partitions; the old id is fenced.
                    log::info!(
                        "group {}: static member {} is back as {id}",
                        spec.group,
                        spec.instance_id.as_deref().unwrap_or("")
                    );
                    m.owned = old.owned;
                    m.assigned = old.assigned;
                    let same = m.topics == old.topics;
                    m.joined = old.joined;
                    g.members.insert(id.clone(), m);
                    if same && g.state == State::Stable {
                        return Ok((
                            id.clone(),
                            Some(Joined {
                                member_id: id,
                                generation: g.generation,
                                assignor: g.assignor.unwrap_or(spec.assignor),
                                members: g.members.len() as u32,
                            }),
                        ));
                    }
                } else {
                    g.members.insert(id.clone(), m);
                }
                if g.members.len() == 1 {
                    g.assignor = Some(spec.assignor);
                }
                if !matches!(g.state, State::Joining { .. }) {
                    start_rebalance(g, now);
                }
                g.members.get_mut(&id).expect("member").joined = true;
                complete_if_ready(&spec.group, g, now, &partitions);
                Ok((id, None))
            }
        }
    }

    /// The member's share of the generation it joined.
    pub fn sync(&self, group: &str, member: &str, generation: u32) -> Result<Synced, GroupError> {
        let mut groups = self.lock();
        let m = member_of(&mut groups, group, member, generation)?;
        m.1.last_seen = Instant::now();
        Ok(Synced {
            assignment: m.1.assigned.clone(),
            rejoin: m.0,
        })
    }

    /// Keeps the member's session alive; `rebalance_in_progress` tells it
    /// to join again.
    pub fn heartbeat(&self, group: &str, member: &str, generation: u32) -> Result<(), GroupError> {
        let mut groups = self.lock();
        let (rebalancing, m) = member_of(&mut groups, group, member, generation)?;
        m.last_seen = Instant::now();
        // One that has joined this rebalance already needs no telling: its
        // heartbeat merely crossed its join.
        if rebalancing && !m.joined {
            return Err(GroupError::RebalanceInProgress(group.to_owned()));
        }
        Ok(())
    }

    /// Removes a member at once (a clean stop); the others rebalance.
    pub fn leave(&self, group: &str, member: &str) -> Result<(), GroupError> {
        {
            let mut groups = self.lock();
            let g = groups
                .get_mut(group)
                .ok_or_else(|| GroupError::UnknownGroup(group.to_owned()))?;
            if g.members.remove(member).is_none() {
                return Err(GroupError::UnknownMember {
                    group: group.to_owned(),
                    member: member.to_owned(),
                });
            }
            log::info!("group {group}: member {member} left");
            let now = Instant::now();
            membership_changed(g, now);
            let partitions = self.partition_counts();
            complete_if_ready(group, g, now, &partitions);
        }
        self.changed.notify(usize::MAX);
        Ok(())
    }

    fn partition_counts(&self) -> BTreeMap<String, u32> {
        self.broker
            .topics()
            .into_iter()
            .map(|(t, m)| (t, m.partitions))
            .collect()
    }

    /// Session timeouts, rebalance deadlines and offset expiry, checked
    /// every [`TICK`] while a group has members, until the broker stops.
    /// Without members only offsets expire: it sleeps until the first is
    /// due, or a member joins (`timers`).
    pub async fn run_timers(self: Arc<Self>) {
        let stopping = self.broker.stopping();
        while !stopping.is_triggered() {
            // Listening before the pass: a join during it wakes the next.
            let wake = self.timers.listen();
            let next = self.tick(Instant::now(), now_ms()).await;
            futures_lite::future::or(crate::broker::sleep_unless(wake, next), stopping.wait())
                .await;
        }
    }

    /// One pass of the timers. Returns when the next is due: a [`TICK`]
    /// with members; without, when the first offsets expire, or
    /// [`crate::broker::IDLE_TIMERS`]. A group emptied or made later
    /// expires `offsets_retention_ms` after it, no sooner.
    async fn tick(&self, now: Instant, wall_ms: i64) -> Duration {
        let mut expired: Vec<(String, Vec<Tp>)> = Vec::new();
        let mut changed = false;
        let next;
        {
            let mut groups = self.lock();
            let partitions = self.partition_counts();
            for (name, g) in groups.iter_mut() {
                let gone: Vec<String> = g
                    .members
                    .iter()
                    .filter(|(_, m)| now.duration_since(m.last_seen) > m.session_timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &gone {
                    log::info!("group {name}: member {id} removed: no heartbeat within its session timeout");
                    g.members.remove(id);
                }
                if !gone.is_empty() {
                    membership_changed(g, now);
                    changed = true;
                }
                if complete_if_ready(name, g, now, &partitions) {
                    changed = true;
                }
                let retention = self.config.offsets_retention_ms as i64;
                if g.members.is_empty()
                    && !g.offsets.is_empty()
                    && wall_ms.saturating_sub(g.empty_since_ms) >= retention
                {
                    expired.push((name.clone(), g.offsets.keys().cloned().collect()));
                }
            }
            groups.retain(|_, g| !g.members.is_empty() || !g.offsets.is_empty());
            next = if groups.values().any(|g| !g.members.is_empty()) {
                TICK
            } else {
                let retention = self.config.offsets_retention_ms;
                let first = groups
                    .values()
                    .map(|g| {
                        g.empty_since_ms
                            .saturating_add(i64::try_from(retention).unwrap_or(i64::MAX))
                    })
                    .min()
                    .map_or(u64::MAX, |due| due.saturating_sub(wall_ms).max(0) as u64);
                Duration::from_millis(first.min(retention)).clamp(TICK, crate::broker::IDLE_TIMERS)
            };
        }
        if changed {
            self.changed.notify(usize::MAX);
        }
        for (group, tps) in expired {
            log::info!(
                "group {group}: {} committed offset(s) expired (empty for groups.offsets_retention_ms)",
                tps.len()
            );
            if let Err(e) = self
                .write(
                    group.clone(),
                    tps.into_iter().map(|tp| (tp, None)).collect(),
                    None,
                )
                .await
            {
                log::warn!("group {group}: expired offsets not deleted: {e}");
            }
        }
        next
    }

    // ------------------------------------------------------------ offsets

    /// Commits offsets: as a member of the generation (which must own
    /// each partition), or with `member` None for a group without members
    /// (an operator's reset, a consumer not in a group). Answers once the
    /// commit is durable.
    pub async fn commit(
        &self,
        group: &str,
        member: Option<(&str, u32)>,
        offsets: Vec<(Tp, u64, Option<String>)>,
    ) -> Result<(), GroupError> {
        check_id("the group id", group)?;
        for ((topic, partition), _, metadata) in &offsets {
            self.broker.partition_id(topic, *partition)?;
            if metadata
                .as_ref()
                .is_some_and(|m| m.len() > self.config.max_metadata)
            {
                return Err(GroupError::Invalid(format!(
                    "commit metadata is at most {} bytes (groups.max_offset_metadata_bytes)",
                    self.config.max_metadata
                )));
            }
        }
        let (stale, hold) = {
            let mut groups = self.lock();
            match member {
                Some((id, generation)) => {
                    let (_, m) = member_of(&mut groups, group, id, generation)?;
                    if let Some(((topic, partition), _, _)) =
                        offsets.iter().find(|(tp, _, _)| !m.may_commit(tp))
                    {
                        return Err(GroupError::NotOwner {
                            group: group.to_owned(),
                            member: id.to_owned(),
                            topic: topic.clone(),
                            partition: *partition,
                        });
                    }
                }
                None => {
                    if let Some(g) = groups.get(group).filter(|g| !g.members.is_empty()) {
                        return Err(GroupError::NotEmpty {
                            group: group.to_owned(),
                            members: g.members.len(),
                        });
                    }
                }
            }
            // Held until the write is applied: commits for new groups
            // running at once each take a slot, or are refused.
            let hold = self.reserve_locked(&groups, group)?;
            let stale = self.stale(&groups, group, offsets.iter().map(|(tp, _, _)| tp));
            (stale, hold)
        };
        let commit_ms = now_ms();
        let entries = offsets
            .into_iter()
            .map(|(tp, offset, metadata)| {
                (
                    tp,
                    Some(Committed {
                        offset,
                        metadata,
                        commit_ms,
                    }),
                )
            })
            .chain(stale)
            .collect();
        self.write(group.to_owned(), entries, Some(hold)).await?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Commits offsets a transaction carried (see `broker::txn`): the
    /// transaction's commit decided them, so no membership check applies
    /// here (Kafka's `sendOffsetsToTransaction` likewise writes them at
    /// the transaction's end). Its group's slot is the transaction's,
    /// held since the offsets were added. Answers once durable; may be
    /// repeated.
    pub async fn commit_in_transaction(
        &self,
        group: &str,
        offsets: Vec<(Tp, u64)>,
    ) -> Result<(), GroupError> {
        check_id("the group id", group)?;
        let stale = self.stale(&self.lock(), group, offsets.iter().map(|(tp, _)| tp));
        let commit_ms = now_ms();
        let entries = offsets
            .into_iter()
            .map(|(tp, offset)| {
                (
                    tp,
                    Some(Committed {
                        offset,
                        metadata: None,
                        commit_ms,
                    }),
                )
            })
            .chain(stale)
            .collect();
        let hold = self.hold(group);
        self.write(group.to_owned(), entries, Some(hold)).await?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The committed offsets of a group (all, or of `partitions`); a
    /// partition without one is left out. An unknown group has none.
    pub fn committed(&self, group: &str, partitions: Option<&[Tp]>) -> Vec<(Tp, Committed)> {
        let groups = self.lock();
        let Some(g) = groups.get(group) else {
            return Vec::new();
        };
        match partitions {
            None => g
                .offsets
                .iter()
                .map(|(tp, c)| (tp.clone(), c.clone()))
                .collect(),
            Some(ps) => ps
                .iter()
                .filter_map(|tp| g.offsets.get(tp).map(|c| (tp.clone(), c.clone())))
                .collect(),
        }
    }

    /// Deletes a group without members and its offsets (durably).
    pub async fn delete(&self, group: &str) -> Result<(), GroupError> {
        let tps: Vec<Tp> = {
            let groups = self.lock();
            let g = groups
                .get(group)
                .ok_or_else(|| GroupError::UnknownGroup(group.to_owned()))?;
            if !g.members.is_empty() {
                return Err(GroupError::NotEmpty {
                    group: group.to_owned(),
                    members: g.members.len(),
                });
            }
            g.offsets.keys().cloned().collect()
        };
        self.write(
            group.to_owned(),
            tps.into_iter().map(|tp| (tp, None)).collect(),
            None,
        )
        .await?;
        // Only what the delete wrote is gone: a commit acknowledged since
        // (a reset, a transaction's offsets) stays, as in the log.
        let mut groups = self.lock();
        if groups
            .get(group)
            .is_some_and(|g| g.members.is_empty() && g.offsets.is_empty())
        {
            groups.remove(group);
        }
        log::info!("group {group} deleted");
        Ok(())
    }

    /// Deletes every group's offsets of `topic` (durably), once the topic
    /// is deleted: one made again by the name is a new log, which the old
    /// offsets do not point into; a member reading it from one the new
    /// log had passed would skip the records below it.
    pub async fn forget_topic(&self, topic: &str) -> Result<(), GroupError> {
        let doomed: Vec<(String, Vec<Tp>)> = self
            .lock()
            .iter()
            .filter_map(|(name, g)| {
                let tps: Vec<Tp> = g
                    .offsets
                    .keys()
                    .filter(|(t, _)| t == topic)
                    .cloned()
                    .collect();
                (!tps.is_empty()).then(|| (name.clone(), tps))
            })
            .collect();
        for (group, tps) in doomed {
            self.write(group, tps.into_iter().map(|tp| (tp, None)).collect(), None)
                .await?;
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<GroupListing> {
        self.lock()
            .iter()
            .map(|(name, g)| GroupListing {
                group: name.clone(),
                state: g.state.name(),
                members: g.members.len() as u32,
            })
            .collect()
    }

    /// Members, assignment and offsets with lag. Partitions assigned but
    /// never committed are listed with no committed offset.
    pub fn describe(&self, group: &str) -> Result<GroupDescription, GroupError> {
        let groups = self.lock();
        let g = groups
            .get(group)
            .ok_or_else(|| GroupError::UnknownGroup(group.to_owned()))?;
        let members = g
            .members
            .iter()
            .map(|(id, m)| MemberDescription {
                member_id: id.clone(),
                instance_id: m.instance_id.clone(),
                client: m.client.clone(),
                assignment: m.assigned.iter().cloned().collect(),
            })
            .collect();
        let mut tps: BTreeSet<&Tp> = g.offsets.keys().collect();
        tps.extend(g.members.values().flat_map(|m| m.assigned.iter()));
        let offsets = tps
            .into_iter()
            .map(|tp| {
                let c = g.offsets.get(tp);
                let log_end = self
                    .broker
                    .offsets(&tp.0, tp.1)
                    .ok()
                    .map(|o| o.high_watermark);
                OffsetDescription {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    committed: c.map(|c| c.offset),
                    metadata: c.and_then(|c| c.metadata.clone()),
                    log_end,
                    lag: log_end.zip(c).map(|(end, c)| end.saturating_sub(c.offset)),
                }
            })
            .collect();
        Ok(GroupDescription {
            group: group.to_owned(),
            state: g.state.name(),
            generation: g.generation,
            assignor: g.assignor,
            members,
            offsets,
        })
    }

    /// Lag of every committed offset: (group, topic, partition, log end
    /// minus committed).
    pub fn lag(&self) -> Vec<(String, String, u32, u64)> {
        let groups = self.lock();
        let mut out = Vec::new();
        for (name, g) in groups.iter() {
            for (tp, c) in &g.offsets {
                if let Ok(o) = self.broker.offsets(&tp.0, tp.1) {
                    out.push((
                        name.clone(),
                        tp.0.clone(),
                        tp.1,
                        o.high_watermark.saturating_sub(c.offset),
                    ));
                }
            }
        }
        out
    }

    // ------------------------------------------------------------ the log

    /// Queues a write for the offsets log and waits until it is durable
    /// and applied.
    async fn write(
        &self,
        group: String,
        entries: Vec<(Tp, Option<Committed>)>,
        hold: Option<Reservation>,
    ) -> Result<(), GroupError> {
        if entries.is_empty() {
            return Ok(());
        }
        let (done, result) = async_channel::bounded(1);
        self.queue
            .send(Pending {
                group,
                entries,
                done,
                _hold: hold,
            })
            .await
            .map_err(|_| GroupError::from(BrokerError::ShuttingDown))?;
        result
            .recv()
            .await
            .unwrap_or_else(|_| Err(BrokerError::ShuttingDown.into()))
    }

    /// The offsets log's writer: takes every write queued while the last
    /// one was in flight and makes them durable together (one batch, one
    /// fsync), then applies them and answers. It runs as long as its
    /// executor: through a graceful stop's drain too, so a member's last
    /// commit on the way out is written, not left waiting.
    pub async fn run_log(self: Arc<Self>) {
        loop {
            let Ok(first) = self.queued.recv().await else {
                return;
            };
            let mut round = vec![first];
            while let Ok(p) = self.queued.try_recv() {
                round.push(p);
            }
            let mut result = self.write_round(&round).await;
            let ring_full = matches!(&result, Err(GroupError::Broker(e))
                if e.is_full_compacted_ring());
            if ring_full {
                // Commits came faster than the cleaner's pace: compact
                // now (a kept commit is never dropped), then once more.
                match self.broker.compact_partition(OFFSETS_TOPIC, 0).await {
                    Ok(_) => result = self.write_round(&round).await,
                    Err(e) => {
                        if let Some(more) = self.compaction_failures.due(&()) {
                            log::warn!("offsets log {OFFSETS_TOPIC}: compaction failed: {e}{more}");
                        }
                    }
                }
            }
            match &result {
                Ok(_) => {
                    let mut groups = self.lock();
                    for p in &round {
                        apply(&mut groups, &p.group, &p.entries);
                    }
                }
                Err(e) => {
                    if let Some(more) = self.log_failures.due(&()) {
                        log::warn!("offsets log {OFFSETS_TOPIC}: write failed: {e}{more}");
                    }
                }
            }
            for p in round {
                let _ = p.done.try_send(result.clone().map(|_| ()));
            }
        }
    }

    /// Writes one round durably; returns the bytes written.
    async fn write_round(&self, round: &[Pending]) -> Result<u64, GroupError> {
        self.ensure_offsets_topic().await?;
        // A deletion is a tombstone, which compaction removes in time.
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for p in round {
            for (tp, c) in &p.entries {
                records.push((encode_key(&p.group, tp), c.as_ref().map(encode_value)));
            }
        }
        let ts = now_ms();
        let mut batches = Vec::new();
        let cut = OFFSETS_BATCH_BYTES.min(self.broker.max_batch_bytes() / 2);
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
        let bytes: u64 = batches.iter().map(|b| b.len() as u64).sum();
        let mut acks = Vec::with_capacity(batches.len());
        {
            let mut group = self.broker.produce_group();
            for batch in batches {
                acks.push(
                    group
                        .produce(OFFSETS_TOPIC, 0, BatchBuf::from(batch))
                        .await?,
                );
            }
        }
        for ack in acks {
            ack.await?;
        }
        self.log_writes.fetch_add(1, Ordering::Relaxed);
        Ok(bytes)
    }

    async fn ensure_offsets_topic(&self) -> Result<(), GroupError> {
        if self.broker.topic(OFFSETS_TOPIC).is_ok() {
            if !self.broker.cleanup_config(OFFSETS_TOPIC).policy.compacts() {
                // An older broker's plain ring: its live offsets are all in
                // its newest half (that broker's rewrites), and from now on
                // compaction keeps them.
                log::info!("offsets topic {OFFSETS_TOPIC}: made a compacted topic");
                let alter = super::TopicAlter {
                    cleanup: Some(CleanupPolicy::Compact),
                    ..super::TopicAlter::default()
                };
                self.broker.alter_topic(OFFSETS_TOPIC, &alter).await?;
            }
            return Ok(());
        }
        let spec = offsets_topic_spec(self.broker.max_batch_bytes());
        match self.broker.create_topic(OFFSETS_TOPIC, &spec).await {
            Ok(_) | Err(BrokerError::TopicExists(_)) => Ok(()),
            Err(e) => {
                if let Some(more) = self.create_failures.due(&()) {
                    log::warn!("cannot create the offsets topic {OFFSETS_TOPIC}: {e}{more}");
                }
                Err(e.into())
            }
        }
    }
}

/// The offsets topic as it is made, storage taking batches of up to
/// `max_batch_bytes`; its disk is reserved from the start
/// ([`super::internal_topics_disk`]).
pub(crate) fn offsets_topic_spec(max_batch_bytes: usize) -> TopicSpec {
    // Room for the largest batch storage takes, and its header block.
    let segment_bytes =
        OFFSETS_SEGMENT_BYTES.max((2 * max_batch_bytes as u64).next_multiple_of(4096));
    // Compacted: a ring that never overwrites a latest commit.
    TopicSpec::internal(segment_bytes, OFFSETS_SEGMENTS, true)
}

/// Applies a durable write to the groups.
fn apply(groups: &mut BTreeMap<String, Group>, group: &str, entries: &[(Tp, Option<Committed>)]) {
    let g = groups
        .entry(group.to_owned())
        .or_insert_with(|| Group::new(now_ms()));
    for (tp, c) in entries {
        match c {
            Some(c) => {
                if g.members.is_empty() {
                    g.empty_since_ms = g.empty_since_ms.max(c.commit_ms);
                }
                g.offsets.insert(tp.clone(), c.clone());
            }
            None => {
                g.offsets.remove(tp);
            }
        }
    }
    if g.members.is_empty() && g.offsets.is_empty() {
        groups.remove(group);
    }
}

/// A member of the group's current generation: (whether the group is
/// rebalancing, the member).
fn member_of<'a>(
    groups: &'a mut BTreeMap<String, Group>,
    group: &str,
    member: &str,
    generation: u32,
) -> Result<(bool, &'a mut Member), GroupError> {
    let g = groups
        .get_mut(group)
        .ok_or_else(|| GroupError::UnknownMember {
            group: group.to_owned(),
            member: member.to_owned(),
        })?;
    let rebalancing = matches!(g.state, State::Joining { .. });
    let current = g.generation;
    let m = g
        .members
        .get_mut(member)
        .ok_or_else(|| GroupError::UnknownMember {
            group: group.to_owned(),
            member: member.to_owned(),
        })?;
    if generation != current {
        return Err(GroupError::IllegalGeneration {
            group: group.to_owned(),
            got: generation,
            current,
        });
    }
    Ok((rebalancing, m))
}

fn short(client: &str) -> String {
    let s: String = client
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .take(32)
        .collect();
    if s.is_empty() {
        "member".into()
    } else {
        s
    }
}

/// Members came or went: rebalance, or the group is empty now.
fn membership_changed(g: &mut Group, now: Instant) {
    if g.members.is_empty() {
        g.state = State::Empty;
        g.generation += 1;
        g.empty_since_ms = now_ms();
    } else if !matches!(g.state, State::Joining { .. }) {
        start_rebalance(g, now);
    }
}

fn start_rebalance(g: &mut Group, now: Instant) {
    let wait = g
        .members
        .values()
        .map(|m| m.rebalance_timeout)
        .max()
        .unwrap_or_default();
    g.state = State::Joining {
        deadline: now + wait,
    };
    for m in g.members.values_mut() {
        m.joined = false;
    }
}

/// Makes the next generation if every member has joined or the deadline
/// passed (removing who did not join); true if it did.
fn complete_if_ready(
    name: &str,
    g: &mut Group,
    now: Instant,
    partitions: &BTreeMap<String, u32>,
) -> bool {
    let State::Joining { deadline } = g.state else {
        return false;
    };
    let all = g.members.values().all(|m| m.joined);
    if !all && now < deadline {
        return false;
    }
    let late: Vec<String> = g
        .members
        .iter()
        .filter(|(_, m)| !m.joined)
        .map(|(id, _)| id.clone())
        .collect();
    for id in late {
        log::info!("group {name}: member {id} removed: it did not join the rebalance in time");
        g.members.remove(&id);
    }
    g.generation += 1;
    if g.members.is_empty() {
        g.state = State::Empty;
        g.empty_since_ms = now_ms();
        return true;
    }
    let assignor = g.assignor.unwrap_or(Assignor::CooperativeSticky);
    let specs: Vec<assignor::MemberSpec<'_>> = g
        .members
        .iter()
        .map(|(id, m)| assignor::MemberSpec {
            id,
            topics: &m.topics,
            owned: &m.owned,
        })
        .collect();
    let target = assignor::assign(assignor, &specs, partitions);
    let mut held: BTreeMap<Tp, String> = BTreeMap::new();
    for (id, m) in &g.members {
        for tp in &m.owned {
            held.insert(tp.clone(), id.clone());
        }
    }
    let mut withheld = 0usize;
    for (id, m) in g.members.iter_mut() {
        let want = target.get(id).cloned().unwrap_or_default();
        m.assigned = want
            .iter()
            .filter(|tp| held.get(*tp).is_none_or(|h| h == id))
            .cloned()
            .collect();
        withheld += want.len() - m.assigned.len();
        m.joined = false;
        m.last_seen = now;
    }
    g.state = State::Stable;
    log::info!(
        "group {name}: generation {} with {} member(s) ({}){}",
        g.generation,
        g.members.len(),
        assignor.name(),
        if withheld > 0 {
            format!(", {withheld} partition(s) wait for their owner to give them up")
        } else {
            String::new()
        }
    );
    if withheld > 0 {
        start_rebalance(g, now);
    }
    true
}

#[cfg(test)]
mod tests;
