//! [`GroupConsumer`]: a member of a consumer group. It joins, reads the
//! partitions the group gives it from their committed offsets, heartbeats
//! in the background while the application works, and commits.
//!
//! What is committed is what was *consumed*: every record `poll` handed
//! out ([`GroupConfig::mark_on_poll`], the default), or only the records
//! the application marked with [`GroupConsumer::mark_consumed`] after it
//! processed them (at least once). Commits happen every
//! `auto_commit_interval`, on [`GroupConsumer::commit`], before a
//! partition is given up in a rebalance, and on [`GroupConsumer::close`].
//!
//! A rebalance is carried out inside `poll`: the heartbeat task only
//! notices it (or the member being fenced), so the application never sees
//! its partitions change under a record it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smol::Timer;

use super::accumulator::{backoff, backoff_jittered};
use super::client::{Client, ClientConfig};
use super::consumer::{Consumer, ConsumerConfig, ConsumerRecord, StartFrom};
use super::error::ClientError;
use crate::protocol::{ErrorCode, GroupPartition, JoinGroupRequest, OffsetCommitPartition};

/// A topic and a partition.
pub type TopicPartition = (String, u32);

/// How a [`GroupConsumer`] takes part in its group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group: String,
    pub topics: Vec<String>,
    /// Static membership: a restart with the same id within the session
    /// timeout gets the same partitions back without a rebalance (and a
    /// clean close does not leave, so the place is kept).
    pub instance_id: Option<String>,
    /// `range`, `roundrobin` or `cooperative-sticky`.
    pub assignor: String,
    /// Without a heartbeat for this long the broker removes the member.
    pub session_timeout: Duration,
    /// How often the background task heartbeats.
    pub heartbeat_interval: Duration,
    /// A member that does not call `poll` for this long leaves the group
    /// (its partitions go to others); it is also how long a rebalance
    /// waits for it.
    pub max_poll_interval: Duration,
    /// Commit what was consumed this often (inside `poll`); None: only on
    /// `commit`, on giving a partition up, and on `close`.
    pub auto_commit_interval: Option<Duration>,
    /// Whether `poll` marks every record it hands out as consumed.
    pub mark_on_poll: bool,
    /// Whether the member commits offsets itself: on `commit`, on the
    /// auto-commit interval, before giving a partition up and on `close`.
    /// False for an application that commits them elsewhere (inside
    /// transactions, with `add_txn_offsets`): any commit of the member's
    /// own, even of where it started, would write over those.
    pub commits_offsets: bool,
    /// Where a partition with no committed offset starts.
    pub start_from: StartFrom,
    /// For `groups describe`.
    pub client_name: Option<String>,
    /// The fetch side (and how the client connects).
    pub consumer: ConsumerConfig,
}

impl GroupConfig {
    /// Defaults for a group and its topics: cooperative sticky, a 10 s
    /// session, commits every 5 s, new partitions from the latest offset.
    pub fn new(group: &str, topics: &[&str]) -> GroupConfig {
        GroupConfig {
            group: group.to_owned(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            instance_id: None,
            assignor: "cooperative-sticky".into(),
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            max_poll_interval: Duration::from_secs(60),
            auto_commit_interval: Some(Duration::from_secs(5)),
            mark_on_poll: true,
            commits_offsets: true,
            start_from: StartFrom::Latest,
            client_name: Some(concat!("skiff-client/", env!("CARGO_PKG_VERSION")).to_string()),
            consumer: ConsumerConfig::default(),
        }
    }
}

/// Told of partitions given and taken in a rebalance. `revoked` comes
/// after the consumer committed what it consumed of them.
pub trait RebalanceListener: Send {
    fn assigned(&mut self, _partitions: &[TopicPartition]) {}
    fn revoked(&mut self, _partitions: &[TopicPartition]) {}
}

/// The membership the heartbeat task and `poll` share.
#[derive(Debug, Default)]
struct Membership {
    member_id: Option<String>,
    generation: u32,
    /// Join again at the next `poll`.
    rejoin: bool,
    last_poll: Option<Instant>,
    /// A join is under way: what a heartbeat hears of the rebalance it is
    /// joining says nothing new.
    joining: bool,
    /// Bumped as each join starts and ends, so that the answer to a
    /// heartbeat sent before cannot ask for yet another join. Without
    /// this, on a slow machine every rebalance's stale heartbeats started
    /// the next one, for as long as the members kept heartbeating.
    joins: u64,
}

/// A member of a consumer group; see the module docs.
pub struct GroupConsumer {
    client: Client,
    consumer: Consumer,
    config: GroupConfig,
    shared: Arc<Mutex<Membership>>,
    heartbeat: Option<smol::Task<()>>,
    assignment: BTreeSet<TopicPartition>,
    /// The offset after the last consumed record, per partition.
    consumed: BTreeMap<TopicPartition, u64>,
    /// What was last committed, so an idle member does not commit again.
    committed: BTreeMap<TopicPartition, u64>,
    last_commit: Instant,
    listener: Option<Box<dyn RebalanceListener>>,
    joined_once: bool,
}

fn lock(m: &Mutex<Membership>) -> std::sync::MutexGuard<'_, Membership> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GroupConsumer {
    /// Connects; the group is joined at the first `poll`.
    pub async fn connect(addr: &str, config: GroupConfig) -> Result<Self, ClientError> {
        let client = Client::connect_with(addr, config.consumer.client.clone()).await?;
        Ok(Self::new(client, config))
    }

    pub fn new(client: Client, config: GroupConfig) -> Self {
        GroupConsumer {
            consumer: Consumer::new(client.clone(), config.consumer.clone()),
            client,
            config,
            shared: Arc::new(Mutex::new(Membership {
                rejoin: true,
                ..Membership::default()
            })),
            heartbeat: None,
            assignment: BTreeSet::new(),
            consumed: BTreeMap::new(),
            committed: BTreeMap::new(),
            last_commit: Instant::now(),
            listener: None,
            joined_once: false,
        }
    }

    pub fn set_listener(&mut self, listener: Box<dyn RebalanceListener>) {
        self.listener = Some(listener);
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_config(&self) -> &ClientConfig {
        self.client.config()
    }

    /// The partitions this member reads now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.assignment.iter().cloned().collect()
    }

    /// The member id and generation, once joined.
    pub fn membership(&self) -> Option<(String, u32)> {
        let m = lock(&self.shared);
        m.member_id.clone().map(|id| (id, m.generation))
    }

    /// Marks a record as consumed: the next commit covers it.
    pub fn mark_consumed(&mut self, topic: &str, partition: u32, offset: u64) {
        let key = (topic.to_owned(), partition);
        if self.assignment.contains(&key) {
            let next = self.consumed.entry(key).or_insert(0);
            *next = (*next).max(offset + 1);
        }
    }

    /// Records from the assigned partitions; joins or rebalances first
    /// when needed, and commits when the auto-commit interval is up.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        lock(&self.shared).last_poll = Some(Instant::now());
        if self.heartbeat.is_none() {
            self.heartbeat = Some(smol::spawn(heartbeat_loop(
                self.client.clone(),
                self.config.clone(),
                self.shared.clone(),
            )));
        }
        if lock(&self.shared).rejoin {
            self.rebalance().await?;
        }
        if let Some(every) = self.config.auto_commit_interval {
            if self.last_commit.elapsed() >= every {
                self.commit_quietly().await;
            }
        }
        let records = self.consumer.poll().await?;
        // A position moved for an offset outside the log (a reset past
        // the end, a topic deleted and made again) is what is committed
        // next, also where it moved back: marks, which only go forward,
        // would otherwise never pass the old offset again.
        for (topic, partition, at) in self.consumer.take_resets() {
            let key = (topic.to_string(), partition);
            if self.assignment.contains(&key) {
                self.consumed.insert(key, at);
            }
        }
        if self.config.mark_on_poll {
            for r in &records {
                self.mark_consumed(&r.topic, r.partition, r.offset);
            }
        }
        Ok(records)
    }

    /// Commits what was consumed of the assigned partitions (and of those
    /// being given up); answers once durable.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let parts: Vec<TopicPartition> = self.assignment.iter().cloned().collect();
        self.commit_partitions(&parts).await
    }

    async fn commit_partitions(&mut self, parts: &[TopicPartition]) -> Result<(), ClientError> {
        self.last_commit = Instant::now();
        if !self.config.commits_offsets {
            return Ok(());
        }
        let membership = self.membership();
        let offsets: Vec<OffsetCommitPartition> = parts
            .iter()
            .filter_map(|tp| {
                let at = *self.consumed.get(tp)?;
                (self.committed.get(tp) != Some(&at)).then(|| OffsetCommitPartition {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    offset: at,
                    metadata: None,
                })
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        // Out of the group (it left for want of polls) with what it
        // consumed not committed: the next owner reads it again, which
        // the caller must hear of, not an OK.
        let Some((member, generation)) = membership else {
            return Err(ClientError::server(
                ErrorCode::UnknownMemberId,
                format!(
                    "group {}: not a member (it left the group); nothing committed",
                    self.config.group
                ),
            ));
        };
        let done: Vec<(TopicPartition, u64)> = offsets
            .iter()
            .map(|o| ((o.topic.clone(), o.partition), o.offset))
            .collect();
        let result = self
            .client
            .commit_offsets(&self.config.group, Some((&member, generation)), offsets)
            .await;
        if let Err(e) = &result {
            if fenced(e) {
                lock(&self.shared).rejoin = true;
            }
        }
        result?;
        self.committed.extend(done);
        Ok(())
    }

    /// An auto-commit: a failure is logged, and a fenced member rejoins.
    async fn commit_quietly(&mut self) {
        if let Err(e) = self.commit().await {
            log::warn!("group {}: commit failed: {e}", self.config.group);
        }
    }

    /// Joins until a generation leaves nothing to wait for; applies each
    /// assignment: gives up (after committing) what was taken, starts
    /// what was given from its committed offset.
    async fn rebalance(&mut self) -> Result<(), ClientError> {
        let shared = self.shared.clone();
        let enter = |joining| {
            let mut m = lock(&shared);
            m.joining = joining;
            m.joins += 1;
        };
        enter(true);
        let result = self.join_until_settled().await;
        enter(false);
        result
    }

    /// How long one `poll` may try to settle into a generation before it
    /// returns [`ClientError::GroupUnsettled`]: the patience for retriable
    /// errors plus one rebalance's wait for the other members. A join in
    /// flight is not cut short; only another round is not started.
    fn settle_timeout(&self) -> Duration {
        self.config
            .consumer
            .retry_timeout
            .saturating_add(self.config.max_poll_interval)
    }

    /// Before the join after `refusals` refusals in a row: none after the
    /// first, then the jittered retry backoff.
    async fn back_off_after_refusals(&self, refusals: u32) {
        if refusals > 1 {
            Timer::after(backoff_jittered(
                refusals - 1,
                self.config.consumer.retry_backoff,
                self.config.consumer.retry_backoff_max,
            ))
            .await;
        }
    }

    async fn join_until_settled(&mut self) -> Result<(), ClientError> {
        let started = Instant::now();
        let mut attempts = 0u32;
        // Syncs refused in a row: the first joins again at once (a new
        // rebalance began, and the join waits at the broker for it); the
        // next ones back off, so a broker that keeps refusing is not
        // asked as fast as it answers.
        let mut sync_failures = 0u32;
        // Joins refused as an unknown member in a row: the same, as the
        // next join has no member id; a broker that refuses that as well
        // is not asked as fast as it answers either.
        let mut unknown_refusals = 0u32;
        // Why the last round did not settle (None: a new rebalance began).
        let mut last: Option<ClientError> = None;
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            if rounds > 1 {
                let after = self.settle_timeout();
                if started.elapsed() >= after {
                    lock(&self.shared).rejoin = true;
                    return Err(ClientError::GroupUnsettled {
                        group: self.config.group.clone(),
                        after,
                        last: last.map(std::sync::Arc::new),
                    });
                }
            }
            let member_id = {
                let mut m = lock(&self.shared);
                m.rejoin = false;
                m.member_id.clone()
            };
            if member_id.is_none() && !self.assignment.is_empty() {
                // Out of the group (it stopped polling, say): what it held
                // may be someone else's now; it starts again from the
                // commits of what it is given.
                self.lose_all();
            }
            let request = JoinGroupRequest {
                group: self.config.group.clone(),
                member_id: member_id.clone(),
                instance_id: self.config.instance_id.clone(),
                topics: self.config.topics.clone(),
                assignor: self.config.assignor.clone(),
                session_timeout_ms: millis(self.config.session_timeout),
                rebalance_timeout_ms: millis(self.config.max_poll_interval),
                owned: self.assignment.iter().map(wire).collect(),
                client: self.config.client_name.clone(),
            };
            let joined = match self.client.join_group(request).await {
                Ok(j) => j,
                Err(e) if e.code() == Some(ErrorCode::UnknownMemberId) => {
                    // Removed: what it held is someone else's now; nothing
                    // of it may be committed.
                    log::warn!(
                        "group {}: member removed ({e}); joining anew",
                        self.config.group
                    );
                    self.lose_all();
                    lock(&self.shared).member_id = None;
                    unknown_refusals += 1;
                    self.back_off_after_refusals(unknown_refusals).await;
                    last = Some(e);
                    continue;
                }
                Err(e)
                    if e.is_retriable()
                        && started.elapsed() < self.config.consumer.retry_timeout =>
                {
                    attempts += 1;
                    log::debug!("group {}: join failed ({e}); retrying", self.config.group);
                    lock(&self.shared).rejoin = true;
                    Timer::after(backoff(
                        attempts,
                        self.config.consumer.retry_backoff,
                        self.config.consumer.retry_backoff_max,
                    ))
                    .await;
                    last = Some(e);
                    continue;
                }
                Err(e) => {
                    lock(&self.shared).rejoin = true;
                    return Err(e);
                }
            };
            unknown_refusals = 0;
            {
                let mut m = lock(&self.shared);
                m.member_id = Some(joined.member_id.clone());
                m.generation = joined.generation;
            }
            self.joined_once = true;
            let synced = match self
                .client
                .sync_group(&self.config.group, &joined.member_id, joined.generation)
                .await
            {
                Ok(s) => s,
                Err(e) if fenced(&e) || e.is_retriable() => {
                    log::debug!(
                        "group {}: sync failed ({e}); joining again",
                        self.config.group
                    );
                    if e.code() == Some(ErrorCode::UnknownMemberId) {
                        self.lose_all();
                        lock(&self.shared).member_id = None;
                    }
                    sync_failures += 1;
                    self.back_off_after_refusals(sync_failures).await;
                    last = Some(e);
                    continue;
                }
                Err(e) => {
                    lock(&self.shared).rejoin = true;
                    return Err(e);
                }
            };
            sync_failures = 0;
            let new: BTreeSet<TopicPartition> = synced
                .assignment
                .into_iter()
                .map(|p| (p.topic, p.partition))
                .collect();
            let revoked: Vec<TopicPartition> = self.assignment.difference(&new).cloned().collect();
            let added: Vec<TopicPartition> = new.difference(&self.assignment).cloned().collect();
            if !revoked.is_empty() {
                // What was handed out of them is committed before they go.
                if let Err(e) = self.commit_partitions(&revoked).await {
                    log::warn!(
                        "group {}: commit before giving up {} partition(s) failed: {e}",
                        self.config.group,
                        revoked.len()
                    );
                }
                if let Some(l) = self.listener.as_mut() {
                    l.revoked(&revoked);
                }
                for tp in &revoked {
                    self.consumer.unassign(&tp.0, tp.1);
                    self.consumed.remove(tp);
                    self.committed.remove(tp);
                    self.assignment.remove(tp);
                }
            }
            if !added.is_empty() {
                self.start(&added).await?;
                if let Some(l) = self.listener.as_mut() {
                    l.assigned(&added);
                }
            }
            log::info!(
                "group {}: generation {}, {} partition(s): {:?}",
                self.config.group,
                joined.generation,
                self.assignment.len(),
                self.assignment
            );
            if synced.rejoin {
                lock(&self.shared).rejoin = true;
            }
            if !lock(&self.shared).rejoin {
                return Ok(());
            }
            last = None;
        }
    }

    /// Starts reading newly given partitions at their committed offsets,
    /// or at `start_from` where none is committed.
    async fn start(&mut self, added: &[TopicPartition]) -> Result<(), ClientError> {
        let committed = self
            .client
            .fetch_offsets(&self.config.group, Some(added.iter().map(wire).collect()))
            .await?;
        for tp in added {
            let from = committed
                .iter()
                .find(|c| c.topic == tp.0 && c.partition == tp.1)
                .map(|c| c.offset);
            match from {
                Some(o) => {
                    self.consumer
                        .assign(&tp.0, Some(&[tp.1]), StartFrom::Offset(o))
                        .await?;
                    self.committed.insert(tp.clone(), o);
                    self.consumed.insert(tp.clone(), o);
                }
                None => {
                    self.consumer
                        .assign(&tp.0, Some(&[tp.1]), self.config.start_from)
                        .await?;
                    // Committing the start position makes a restart before
                    // the first record start here too, not at a later
                    // "latest".
                    if let Some(at) = self.consumer.position(&tp.0, tp.1) {
                        self.consumed.insert(tp.clone(), at);
                    }
                }
            }
            self.assignment.insert(tp.clone());
        }
        Ok(())
    }

    /// Drops every partition without committing (the member was removed).
    fn lose_all(&mut self) {
        let lost: Vec<TopicPartition> = self.assignment.iter().cloned().collect();
        if lost.is_empty() {
            return;
        }
        if let Some(l) = self.listener.as_mut() {
            l.revoked(&lost);
        }
        for tp in &lost {
            self.consumer.unassign(&tp.0, tp.1);
        }
        self.assignment.clear();
        self.consumed.clear();
        self.committed.clear();
    }

    /// Commits what was consumed and leaves the group (a static member
    /// keeps its place until its session times out). A commit the broker
    /// did not answer in time is not followed by a leave, which would wait
    /// as long again: the session timeout frees the partitions.
    pub async fn close(mut self) -> Result<(), ClientError> {
        if let Some(t) = self.heartbeat.take() {
            t.cancel().await;
        }
        let committed = self.commit().await;
        if let Some((member, _)) = self.membership() {
            let silent = matches!(committed, Err(ClientError::Timeout));
            if self.config.instance_id.is_none() && !silent {
                if let Err(e) = self.client.leave_group(&self.config.group, &member).await {
                    log::debug!("group {}: leave failed: {e}", self.config.group);
                }
            }
        }
        committed
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        // The task holds a client clone; dropping it cancels it.
        self.heartbeat.take();
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn wire(tp: &TopicPartition) -> GroupPartition {
    GroupPartition {
        topic: tp.0.clone(),
        partition: tp.1,
    }
}

/// Whether the member must join again: fenced by a rebalance it missed,
/// removed, or told a rebalance is on.
fn fenced(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::IllegalGeneration
                | ErrorCode::UnknownMemberId
                | ErrorCode::RebalanceInProgress
        )
    )
}

/// Heartbeats every `heartbeat_interval` while joined; flags a rejoin
/// when the broker says so, and leaves the group when the application has
/// not polled within `max_poll_interval`.
async fn heartbeat_loop(client: Client, config: GroupConfig, shared: Arc<Mutex<Membership>>) {
    loop {
        Timer::after(config.heartbeat_interval).await;
        let (member, generation, idle, joins) = {
            let m = lock(&shared);
            let idle = m
                .last_poll
                .is_some_and(|t| t.elapsed() > config.max_poll_interval);
            // A waiting join keeps the session alive at the broker.
            let member = m.member_id.clone().filter(|_| !m.joining);
            (member, m.generation, idle, m.joins)
        };
        let Some(member) = member else { continue };
        if idle {
            log::warn!(
                "group {}: no poll within the max poll interval ({:?}): leaving the group",
                config.group,
                config.max_poll_interval
            );
            let _ = client.leave_group(&config.group, &member).await;
            let mut m = lock(&shared);
            m.member_id = None;
            m.rejoin = true;
            continue;
        }
        match client.heartbeat(&config.group, &member, generation).await {
            Ok(()) => {}
            Err(e) if fenced(&e) => {
                let mut m = lock(&shared);
                if m.joins == joins && m.generation == generation {
                    m.rejoin = true;
                }
            }
            Err(e) => log::debug!("group {}: heartbeat failed: {e}", config.group),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fake_peer::{answer, hello, read_request};
    use crate::protocol::SyncGroupResponse;
    use crate::protocol::{ErrorResponse, JoinGroupResponse, RequestBody, ResponseBody};

    /// How a peer answers a round of join and sync that does not settle.
    #[derive(Clone, Copy, Debug)]
    enum Unsettled {
        /// Join refused: the member is not known.
        JoinUnknownMember,
        /// Join answered, sync refused: a rebalance is under way.
        SyncRebalancing,
        /// Join and sync answered, but the sync says to join again.
        SyncAsksRejoin,
    }

    fn refusal(code: ErrorCode) -> ResponseBody {
        ResponseBody::Error(ErrorResponse {
            code,
            message: format!("refused: {code}"),
        })
    }

    /// A peer that answers `rounds` join rounds as `how`, then refuses
    /// every join as an invalid request, so a member that never gives up
    /// ends with that refusal rather than hanging the test. It sends the
    /// name of each request it reads to the receiver.
    fn unsettling_peer(
        how: Unsettled,
        rounds: usize,
    ) -> (String, std::sync::mpsc::Receiver<&'static str>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, seen) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut joins = 0;
            while let Some(request) = read_request(&mut s, &mut buf) {
                let _ = tx.send(request.body.name());
                let body = match request.body {
                    RequestBody::Hello(_) => hello("unsettling peer"),
                    RequestBody::JoinGroup(_) => {
                        joins += 1;
                        match how {
                            _ if joins > rounds => refusal(ErrorCode::InvalidRequest),
                            Unsettled::JoinUnknownMember => refusal(ErrorCode::UnknownMemberId),
                            _ => ResponseBody::JoinGroup(JoinGroupResponse {
                                member_id: "m".into(),
                                generation: joins as u32,
                                assignor: "range".into(),
                                members: 1,
                            }),
                        }
                    }
                    RequestBody::SyncGroup(_) => match how {
                        Unsettled::SyncRebalancing => refusal(ErrorCode::RebalanceInProgress),
                        _ => ResponseBody::SyncGroup(SyncGroupResponse {
                            assignment: Vec::new(),
                            rejoin: true,
                        }),
                    },
                    other => panic!("unexpected {}", other.name()),
                };
                answer(&mut s, request.correlation_id, body);
            }
        });
        (addr, seen)
    }

    /// A member whose joins never settle (refused as unknown, its syncs
    /// refused for a rebalance, or told to join again each time) gives up
    /// once its settle timeout is spent, saying why, instead of joining
    /// again for ever. With a zero timeout it gives up after one round.
    #[test]
    fn a_join_that_never_settles_gives_up_at_its_settle_timeout() {
        for (how, last, names) in [
            (
                Unsettled::JoinUnknownMember,
                Some(ErrorCode::UnknownMemberId),
                &["hello", "join_group"][..],
            ),
            (
                Unsettled::SyncRebalancing,
                Some(ErrorCode::RebalanceInProgress),
                &["hello", "join_group", "sync_group"][..],
            ),
            (
                Unsettled::SyncAsksRejoin,
                None,
                &["hello", "join_group", "sync_group"][..],
            ),
        ] {
            let (addr, seen) = unsettling_peer(how, 1000);
            let mut config = GroupConfig::new("g", &["t"]);
            config.consumer.retry_timeout = Duration::ZERO;
            config.max_poll_interval = Duration::ZERO;
            config.heartbeat_interval = Duration::from_secs(3600);
            let got = smol::block_on(async {
                let mut member = GroupConsumer::connect(&addr, config).await.unwrap();
                member.poll().await
            });
            match got {
                Err(ClientError::GroupUnsettled {
                    group,
                    after,
                    last: got_last,
                }) => {
                    assert_eq!(group, "g");
                    assert_eq!(after, Duration::ZERO);
                    assert_eq!(got_last.and_then(|e| e.code()), last, "{how:?}");
                }
                other => panic!("{how:?}: {other:?}"),
            }
            let got: Vec<&str> = seen.try_iter().collect();
            assert_eq!(got, names, "{how:?}");
        }
    }

    /// How many joins a member answered `how` by the peer every round
    /// sends in a second, with a 100 ms base backoff doubling per refusal.
    fn joins_in_a_second(how: Unsettled) -> usize {
        let (addr, seen) = unsettling_peer(how, usize::MAX);
        let mut config = GroupConfig::new("g", &["t"]);
        config.consumer.retry_backoff = Duration::from_millis(100);
        config.consumer.retry_backoff_max = Duration::from_secs(1);
        // It keeps trying for the whole window.
        config.consumer.retry_timeout = Duration::from_secs(3600);
        config.max_poll_interval = Duration::from_secs(3600);
        config.heartbeat_interval = Duration::from_secs(3600);
        let gave_up = smol::block_on(async {
            let mut member = GroupConsumer::connect(&addr, config).await.unwrap();
            futures_lite::future::or(async { Some(member.poll().await) }, async {
                Timer::after(Duration::from_secs(1)).await;
                None
            })
            .await
        });
        assert!(gave_up.is_none(), "{how:?}: {gave_up:?}");
        seen.try_iter().filter(|&n| n == "join_group").count()
    }

    /// A member whose syncs are refused again and again backs off between
    /// its joins (after the first refusal, which may be a rebalance that
    /// just began): in a second, at most 6 joins (at 0, 0, 50, 150, 350 and
    /// 750 ms at the earliest: the jitter only lengthens a wait's lower
    /// half). Before, it joined again at once, as fast as the broker
    /// answered.
    #[test]
    fn a_member_whose_syncs_keep_failing_backs_off_between_joins() {
        let joins = joins_in_a_second(Unsettled::SyncRebalancing);
        assert!(joins <= 6, "{joins} joins in a second");
    }

    /// The same for joins refused as an unknown member: the first joins
    /// again at once (without its member id, which is what it was refused
    /// for), the next ones back off. Before, a broker that kept refusing
    /// was asked as fast as it answered.
    #[test]
    fn a_member_whose_joins_are_refused_as_unknown_backs_off_between_them() {
        let joins = joins_in_a_second(Unsettled::JoinUnknownMember);
        assert!(joins <= 6, "{joins} joins in a second");
    }
}
