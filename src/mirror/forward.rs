//! The forwarder: reads the local partitions that `[[mirror.rules]]`
//! match through the broker's fetch API, like any consumer, and writes
//! them upstream in Kafka transactions.
//!
//! Exactly once, per source partition and in order, rests on three rules:
//!
//! 1. Each transaction carries, besides the records, one checkpoint record
//!    per source partition it advances (key `gateway/topic/partition`,
//!    value the last source offset it covers, decimal; an aggregate rule
//!    adds its window state, [`Checkpoint`]) to the compacted checkpoint
//!    topic. Records and cursor commit or abort together. A deleted
//!    topic's checkpoints get a tombstone: one created again under the
//!    name starts at offset 0.
//! 2. Every session starts with InitProducerId under the transactional id,
//!    which aborts whatever transaction an earlier session (or process)
//!    left open, and then reads the checkpoints back with read_committed,
//!    holding each producer's records until its marker ([`CommittedFilter`]
//!    semantics: Tansu does not filter aborted records). Forwarding resumes
//!    right after them. The in-memory cursor is only a hint for the status.
//! 3. Any failure ends the session. The next one re-initialises the
//!    producer (aborting the open transaction, whatever its outcome was)
//!    and reads the checkpoints again: nothing is ever resent blindly.
//!
//! Only records below the partition's durable offset are forwarded: a
//! record upstream that a local crash could still take back would leave
//! its offset to a different record later.
//!
//! [`CommittedFilter`]: super::kafka::CommittedFilter

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::batch::{BatchIter, ATTR_CONTROL};
use crate::broker::{Broker, BrokerError, FetchLimits, FetchPartition, Shutdown};
use crate::client::partitioner::partition_for_key;
use crate::config::{MirrorConfig, MirrorRule};
use crate::metrics::Metrics;

use super::aggregate::{Checkpoint, PartitionAgg, Spec};
use super::kafka::{
    BatchBuilder, ConnectError, ErrorCode, HeaderRef, KafkaClient, KafkaConfig, KafkaError,
    NewTopic, PartitionReader, Producer, ProducerConfig, RecordRef, SaslConfig, TlsConfig,
};
use super::pace::{self, Admit, Claim, Pace, Shares};
use super::status::{Link, MirrorStatus};

/// A batch is closed before a record that would take it past this many
/// encoded bytes: well under Kafka's default `message.max.bytes` (1 MB).
/// Only a single larger record makes a larger batch.
const UPSTREAM_BATCH_BYTES_MAX: usize = 256 * 1024;
/// While the link is down, the backlog figures are refreshed this often.
const DOWN_REFRESH: Duration = Duration::from_secs(1);
/// The shortest wait when nothing could be forwarded (all data beyond the
/// durable offset, or every rule paused).
const IDLE_WAIT_MIN: Duration = Duration::from_millis(10);

/// A transaction that reads a backlog goes on with further rounds for
/// this long: records become visible to read_committed consumers at its
/// commit, and brokers abort a transaction open past its timeout (60 s).
const TRANSACTION_OPEN_MAX: Duration = Duration::from_secs(1);

/// An idle link is probed (a metadata request) this often, so the status
/// says when it went down before there is data to send.
const IDLE_PROBE: Duration = Duration::from_secs(5);

/// The smallest round a slow link shrinks rounds to (see `round_cap`).
const ROUND_CAP_MIN: u64 = 16 * 1024;

/// At most one malformed-value line per aggregate rule this often.
const MALFORMED_LOG_EVERY: Duration = Duration::from_secs(60);

/// How a record's upstream partition is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioner {
    /// Kafka's default: murmur2 of the key; keyless records keep their
    /// source partition's number (modulo), so their order holds too.
    Murmur2,
    /// The source partition's number, modulo the target's partitions.
    Source,
}

/// The mirror's settings, from `[mirror]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaConfig,
    pub producer: ProducerConfig,
    /// The transactional id; also the `skiff.gateway` header and the first
    /// part of every checkpoint key.
    pub gateway: String,
    pub checkpoint_topic: String,
    pub rules: Vec<MirrorRule>,
    pub batch_bytes: usize,
    pub linger: Duration,
    pub partitioner: Partitioner,
    pub create_topics: bool,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Upstream bytes per second; 0 = no cap.
    pub max_bytes_per_s: u64,
    pub min_share_percent: u64,
}

impl Settings {
    /// From a validated config; reads nothing yet (TLS files are read by
    /// [`KafkaClient::new`]).
    pub fn from_config(cfg: &MirrorConfig) -> Result<Self, KafkaError> {
        let gateway = if cfg.transactional_id.is_empty() {
            hostname()
        } else {
            cfg.transactional_id.clone()
        };
        let mut kafka = KafkaConfig::new(&cfg.upstream)?;
        kafka.client_id = format!("skiff-{gateway}");
        kafka.connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        kafka.request_timeout = Duration::from_millis(cfg.request_timeout_ms);
        if cfg.tls.enabled {
            let path = |p: &str| (!p.is_empty()).then(|| std::path::PathBuf::from(p));
            kafka.tls = Some(TlsConfig {
                ca_file: path(&cfg.tls.ca),
                cert_file: path(&cfg.tls.cert),
                key_file: path(&cfg.tls.key),
                server_name: (!cfg.tls.server_name.is_empty()).then(|| cfg.tls.server_name.clone()),
            });
        }
        if !cfg.sasl.mechanism.is_empty() {
            kafka.sasl = Some(SaslConfig {
                // Validated with the config.
                mechanism: cfg
                    .sasl
                    .mechanism
                    .parse()
                    .unwrap_or(super::kafka::SaslMechanism::Plain),
                username: cfg.sasl.username.clone(),
                password: cfg.sasl.password.clone(),
            });
        }
        let producer = ProducerConfig {
            transactional_id: Some(gateway.clone()),
            compression: cfg.compression.parse().unwrap_or_default(),
            ..ProducerConfig::default()
        };
        Ok(Self {
            kafka,
            producer,
            gateway,
            checkpoint_topic: cfg.checkpoint_topic.clone(),
            rules: cfg.rules.clone(),
            batch_bytes: usize::try_from(cfg.batch_bytes).unwrap_or(usize::MAX),
            linger: Duration::from_millis(cfg.linger_ms),
            partitioner: if cfg.partitioner == "source" {
                Partitioner::Source
            } else {
                Partitioner::Murmur2
            },
            create_topics: cfg.create_topics,
            backoff_min: Duration::from_millis(cfg.backoff_min_ms),
            backoff_max: Duration::from_millis(cfg.backoff_max_ms),
            max_bytes_per_s: cfg.max_bytes_per_s,
            min_share_percent: cfg.min_share_percent,
        })
    }
}

/// The host name, for a transactional id left empty.
fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            let name = std::fs::read_to_string(p).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or_else(|| "skiff".to_owned())
}

/// `*` matches any run of characters (also none); everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut tail) = name.strip_prefix(head) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('*').collect();
    let (last, middle) = parts.split_last().expect("split yields one part at least");
    for part in middle {
        match tail.find(part) {
            Some(i) => tail = &tail[i + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

/// The upstream topic `rule` forwards `topic` to.
pub fn target_for(rule: &MirrorRule, topic: &str) -> String {
    rule.target.replace("{topic}", topic)
}

/// Why a session ended.
#[derive(Debug)]
enum Failure {
    Kafka {
        during: &'static str,
        error: KafkaError,
    },
    /// A target topic is missing and `create_topics` is off.
    MissingTopic(String),
    /// The local log could not be read.
    Local(BrokerError),
}

impl Failure {
    fn is_fenced(&self) -> bool {
        matches!(self, Self::Kafka { error, .. } if error.is_fenced())
    }

    /// Records sent got no answer in time (or their link was lost).
    fn is_send_timeout(&self) -> bool {
        matches!(self, Self::Kafka { error, during: "sending records" } if error.is_outcome_unknown())
    }

    /// The kind of failure: the log says when it changes, not when only
    /// its details do (a refused connect reads "reset" one time and
    /// "closed" the next).
    fn kind(&self) -> &'static str {
        match self {
            Self::Kafka { error, during } => match error {
                KafkaError::Connect {
                    cause: ConnectError::SaslHandshake { .. },
                    ..
                } => "auth",
                KafkaError::Connect { .. } => "connect",
                KafkaError::Fenced { .. } => "fenced",
                KafkaError::Auth { .. } => "auth",
                _ => during,
            },
            Self::MissingTopic(_) => "missing topic",
            Self::Local(_) => "local",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kafka { during, error } => match error {
                KafkaError::Connect {
                    cause: ConnectError::SaslHandshake { .. },
                    ..
                } => write!(f, "upstream SASL handshake failed: {error}"),
                KafkaError::Connect { .. } => write!(f, "cannot reach upstream: {error}"),
                KafkaError::Fenced { .. } => write!(
                    f,
                    "fenced: another producer (another gateway?) initialised the same \
                     transactional id while {during}: {error}; restart skiff to take it over"
                ),
                KafkaError::Auth { .. } => write!(f, "upstream refused authentication: {error}"),
                _ => write!(f, "{during}: {error}"),
            },
            Self::MissingTopic(topic) => write!(
                f,
                "upstream topic '{topic}' does not exist (create it, or set mirror.create_topics = true)"
            ),
            Self::Local(e) => write!(f, "reading the local log: {e}"),
        }
    }
}

fn kafka(during: &'static str) -> impl FnOnce(KafkaError) -> Failure {
    move |error| Failure::Kafka { during, error }
}

/// One source partition's forwarding state.
#[derive(Debug, Clone)]
struct Cursor {
    rule: usize,
    target: String,
    /// The first source offset not yet upstream (as far as this process
    /// knows: reset from the checkpoints at each session's start).
    next: u64,
    /// Local bytes per record seen last, for the bytes-at-risk estimate.
    bytes_per_record: u64,
    /// `next` comes from the checkpoints (or a commit since): records
    /// below the partition's earliest offset are then known to be lost.
    /// Before the first session, the cursor only guesses (the earliest
    /// offset) and nothing is counted.
    known: bool,
}

/// What one transaction advances in one source partition.
struct Advance {
    key: (String, u32),
    next: u64,
    records: u64,
    bytes: u64,
    /// Their bytes as encoded for upstream.
    upstream: u64,
}

/// One round of a transaction: what was read, encoded per upstream
/// partition.
#[derive(Default)]
struct Round {
    builders: BTreeMap<(String, i32), Vec<BatchBuilder>>,
    advances: Vec<(usize, Advance)>,
    /// Local bytes read.
    bytes: u64,
    /// Partitions to leave alone for the rest of the transaction (their
    /// cursor moved, or they are gone).
    gone: Vec<(String, u32)>,
}

/// Per source partition, the next offset, and an aggregate rule's state.
type Checkpoints = (
    HashMap<(String, u32), u64>,
    HashMap<(String, u32), Checkpoint>,
);

/// A checkpoint record's key: `gateway/topic/partition`.
fn checkpoint_key(gateway: &str, (topic, partition): &(String, u32)) -> String {
    format!("{gateway}/{topic}/{partition}")
}

/// The forwarding task's state.
pub struct Forwarder {
    settings: Settings,
    broker: Arc<Broker>,
    status: Arc<MirrorStatus>,
    metrics: Option<Arc<Metrics>>,
    stopping: Arc<Shutdown>,
    cursors: BTreeMap<(String, u32), Cursor>,
    /// From the checkpoint topic, at the session's start: the next offset.
    checkpoints: HashMap<(String, u32), u64>,
    /// Upstream partition counts, per session.
    target_partitions: HashMap<String, i32>,
    failures: u32,
    /// Whether the checkpoints were read back once in this process.
    checkpoints_read: bool,
    /// The kind of failure last logged while the link is down.
    logged: Option<&'static str>,
    /// The session that just failed had a transaction open, which the
    /// next session's InitProducerId aborts.
    lost_transaction: bool,
    /// Round sizes and the bandwidth cap; lives across sessions, so a
    /// reconnect does not refill the bucket.
    pace: Pace,
    /// How rounds divide among the rules (by priority, with credits).
    shares: Shares,
    /// Per rule: upstream bytes committed since start, and the window its
    /// rate and time to drain are measured over.
    committed_upstream: Vec<u64>,
    windows: Vec<pace::Window>,
    /// Per rule, its aggregate settings (`None`: records go as they are).
    specs: Vec<Option<Arc<Spec>>>,
    /// Aggregate rules' windows per source partition, rebuilt from the
    /// checkpoints (and the log) in each session.
    aggs: HashMap<(String, u32), PartitionAgg>,
    /// What aggregate checkpoints hold besides the offset: read back at a
    /// session's start, then the last committed.
    agg_checkpoints: HashMap<(String, u32), Checkpoint>,
    /// Per rule, when a malformed value was last logged.
    malformed_logged: Vec<Option<std::time::Instant>>,
    /// Source partitions whose topic was deleted: the next transaction
    /// clears their checkpoints upstream (a tombstone), so that a topic
    /// created again under the name, which starts at offset 0, is not
    /// taken for one already upstream up to the old checkpoint.
    resets: BTreeSet<(String, u32)>,
    /// Local bytes a round may read, at most `batch_bytes`: halved when
    /// sending timed out, so that a link too slow to carry a whole round
    /// within `request_timeout_ms` still makes progress instead of timing
    /// out the same round on every attempt; regrown by an eighth per
    /// committed transaction.
    round_cap: u64,
}

impl Forwarder {
    pub fn new(
        settings: Settings,
        broker: Arc<Broker>,
        status: Arc<MirrorStatus>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let stopping = broker.stopping();
        let specs: Vec<Option<Arc<Spec>>> = settings
            .rules
            .iter()
            .map(|r| r.aggregate.as_ref().map(|a| Arc::new(Spec::from_config(a))))
            .collect();
        let rules = settings.rules.len();
        let settings_batch_bytes = settings.batch_bytes as u64;
        let pace = Pace::new(
            settings.max_bytes_per_s,
            settings.batch_bytes as u64,
            std::time::Instant::now(),
        );
        Self {
            settings,
            broker,
            status,
            metrics,
            stopping,
            cursors: BTreeMap::new(),
            checkpoints: HashMap::new(),
            target_partitions: HashMap::new(),
            failures: 0,
            checkpoints_read: false,
            logged: None,
            lost_transaction: false,
            pace,
            shares: Shares::new(rules),
            committed_upstream: vec![0; rules],
            windows: (0..rules).map(|_| pace::Window::default()).collect(),
            specs,
            aggs: HashMap::new(),
            agg_checkpoints: HashMap::new(),
            malformed_logged: vec![None; rules],
            resets: BTreeSet::new(),
            round_cap: settings_batch_bytes,
        }
    }

    /// Runs until the broker stops: sessions, and between them capped
    /// exponential backoff with jitter.
    pub async fn run(mut self) {
        log::info!(
            "mirror: forwarding {} rule(s) to {} as '{}'",
            self.settings.rules.len(),
            self.settings.kafka.bootstrap.join(","),
            self.settings.gateway
        );
        // Floors for the topics there are, before the first connect (which
        // may take the whole connect timeout).
        self.refresh_sources();
        self.publish_backlog();
        while !self.stopping.is_triggered() {
            let result = self.session().await;
            let Err(failure) = result else { return };
            if failure.is_send_timeout() {
                self.round_cap = (self.round_cap / 2).max(ROUND_CAP_MIN);
            }
            if std::mem::take(&mut self.lost_transaction) {
                self.status.transaction_ended(false);
                if let Some(m) = &self.metrics {
                    m.mirror_transaction(false);
                }
            }
            if self.status.report().link == Link::Up {
                if let Some(m) = &self.metrics {
                    m.set_mirror_link(false);
                }
            }
            let reason = failure.to_string();
            self.status.set_link(Link::Down, Some(reason.clone()));
            if self.logged != Some(failure.kind()) {
                self.logged = Some(failure.kind());
                if failure.is_fenced() {
                    log::error!("mirror: link down: {reason}");
                } else {
                    log::warn!(
                        "mirror: link down: {reason}; retrying every {}..{} ms until it works",
                        self.settings.backoff_min.as_millis(),
                        self.settings.backoff_max.as_millis()
                    );
                }
            }
            if failure.is_fenced() {
                // Taking the id back would fence the other gateway in turn,
                // and two writers of one checkpoint key lose exactness.
                while !self.stopping.is_triggered() {
                    self.wait(DOWN_REFRESH).await;
                    self.refresh_sources();
                    self.publish_backlog();
                }
                return;
            }
            self.failures = self.failures.saturating_add(1);
            let pause = self.backoff();
            let until = std::time::Instant::now() + pause;
            loop {
                self.refresh_sources();
                self.publish_backlog();
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || self.stopping.is_triggered() {
                    break;
                }
                self.wait(left.min(DOWN_REFRESH)).await;
            }
        }
    }

    /// `backoff_min * 2^(failures-1)`, capped at `backoff_max`, times a
    /// random factor in [0.5, 1) so gateways that lost the link together
    /// do not come back together.
    fn backoff(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(20);
        let base = self
            .settings
            .backoff_min
            .saturating_mul(1 << exp)
            .min(self.settings.backoff_max);
        base.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    async fn wait(&self, d: Duration) {
        futures_lite::future::or(
            async {
                smol::Timer::after(d).await;
            },
            self.stopping.wait(),
        )
        .await;
    }

    /// Connect, initialise, read the checkpoints, then forward until an
    /// error (returned) or the stop (`Ok`).
    async fn session(&mut self) -> Result<(), Failure> {
        let client = KafkaClient::new(self.settings.kafka.clone())
            .map_err(kafka("configuring the Kafka client"))?;
        let mut producer = Producer::new(client.clone(), self.settings.producer.clone());
        producer
            .init()
            .await
            .map_err(kafka("initialising the transactional producer"))?;
        self.ensure_checkpoint_topic(&client).await?;
        (self.checkpoints, self.agg_checkpoints) = self.read_checkpoints(&client).await?;
        // Checkpoints of topics deleted since (also before a restart, with
        // the tombstone not committed): a topic created under the name
        // later starts at offset 0. Not keys no local topic could have
        // (`gw/x/t/0` of a gateway `gw/x` reads as topic `x/t` to `gw`).
        let topics = self.broker.topics();
        let stale_key = |(t, p): &(String, u32)| {
            crate::broker::validate_topic_name(t).is_ok()
                && topics.get(t).is_none_or(|m| *p >= m.partitions)
        };
        let stale: Vec<(String, u32)> = self
            .checkpoints
            .keys()
            .chain(self.agg_checkpoints.keys())
            .filter(|key| stale_key(key))
            .cloned()
            .collect();
        self.resets.extend(stale);
        for key in &self.resets {
            self.checkpoints.remove(key);
            self.agg_checkpoints.remove(key);
        }
        // Windows folded in a transaction that may not have committed.
        self.aggs.clear();
        self.target_partitions.clear();
        self.checkpoints_read = true;
        // No checkpoint: nothing of the partition is upstream; whatever
        // left the ring before offset 0 is reached counts as dropped.
        for (key, cursor) in self.cursors.iter_mut() {
            cursor.next = self.checkpoints.get(key).copied().unwrap_or(0);
            cursor.known = true;
        }
        let result = self.forward_until_stopped(&client, &mut producer).await;
        self.lost_transaction = result.is_err() && producer.in_transaction();
        result
    }

    /// The link is up once a round went through: connecting and reading
    /// the checkpoints is not enough, since a round can fail on every
    /// attempt (a missing upstream topic), and counting those as up would
    /// reset the backoff and log each attempt.
    fn link_confirmed(&mut self) {
        self.failures = 0;
        self.logged = None;
        if let Some(m) = &self.metrics {
            m.set_mirror_link(true);
        }
        if self.status.set_link(Link::Up, None) {
            log::info!(
                "mirror: link up to {} as '{}'; {} checkpoint(s) read back",
                self.settings.kafka.bootstrap.join(","),
                self.settings.gateway,
                self.checkpoints.len()
            );
        }
    }

    async fn forward_until_stopped(
        &mut self,
        client: &KafkaClient,
        producer: &mut Producer,
    ) -> Result<(), Failure> {
        let mut confirmed = false;
        let mut last_contact = std::time::Instant::now();
        loop {
            if self.stopping.is_triggered() {
                return Ok(());
            }
            self.refresh_sources();
            let sent = self.forward_once(client, producer).await?;
            if !confirmed {
                confirmed = true;
                self.link_confirmed();
            }
            self.publish_backlog();
            if sent {
                last_contact = std::time::Instant::now();
            } else {
                if last_contact.elapsed() >= IDLE_PROBE {
                    client
                        .refresh_metadata(&[self.settings.checkpoint_topic.as_str()])
                        .await
                        .map_err(kafka("probing the idle link"))?;
                    last_contact = std::time::Instant::now();
                }
                self.wait(self.settings.linger.max(IDLE_WAIT_MIN)).await;
            }
        }
    }

    async fn ensure_checkpoint_topic(&self, client: &KafkaClient) -> Result<(), Failure> {
        let topic = NewTopic {
            name: self.settings.checkpoint_topic.clone(),
            partitions: 1,
            replication_factor: -1,
            // Every (re)connect reads the topic from its start, and only
            // closed segments are compacted: small, hourly segments keep
            // that read to the live keys and at most 1 MiB of the newest
            // checkpoints, where defaults (1 GiB, 7 days) let it grow to
            // days of rounds.
            configs: vec![
                ("cleanup.policy".to_owned(), "compact".to_owned()),
                ("segment.bytes".to_owned(), "1048576".to_owned()),
                ("segment.ms".to_owned(), "3600000".to_owned()),
            ],
        };
        let created = client
            .create_topic(&topic)
            .await
            .map_err(kafka("creating the checkpoint topic"))?;
        if created {
            log::info!(
                "mirror: created the checkpoint topic '{}' (compacted)",
                topic.name
            );
        }
        Ok(())
    }

    /// This gateway's checkpoints, committed ones only: source partition →
    /// the offset after the last one upstream (and an aggregate rule's
    /// state).
    async fn read_checkpoints(&self, client: &KafkaClient) -> Result<Checkpoints, Failure> {
        let topic = &self.settings.checkpoint_topic;
        let partitions = client
            .partition_count(topic)
            .await
            .map_err(kafka("reading the checkpoint topic"))?;
        let prefix = format!("{}/", self.settings.gateway);
        let mut out = HashMap::new();
        let mut states = HashMap::new();
        for p in 0..partitions {
            let p = i32::try_from(p).unwrap_or(i32::MAX);
            let mut reader = PartitionReader::from_earliest(client.clone(), topic, p)
                .await
                .map_err(kafka("reading the checkpoint topic"))?;
            let records = reader
                .read_to_end()
                .await
                .map_err(kafka("reading the checkpoint topic"))?;
            for record in records {
                let Some(key) = &record.key else {
                    continue;
                };
                let Some(value) = &record.value else {
                    // A deleted topic's checkpoint.
                    if let Some(key) = parse_checkpoint_key(key, &prefix) {
                        out.remove(&key);
                        states.remove(&key);
                    }
                    continue;
                };
                let Some((topic, partition, last, state)) = parse_checkpoint(key, value, &prefix)
                else {
                    continue;
                };
                let key = (topic, partition);
                match state.and_then(Checkpoint::decode) {
                    Some(cp) => states.insert(key.clone(), cp),
                    None => states.remove(&key),
                };
                out.insert(key, last + 1);
            }
        }
        Ok((out, states))
    }

    /// Adds cursors for partitions that rules match now (topics created
    /// since, partitions added), drops those of deleted topics.
    fn refresh_sources(&mut self) {
        let topics = self.broker.topics();
        let gone: Vec<(String, u32)> = self
            .cursors
            .keys()
            .filter(|(t, p)| topics.get(t).is_none_or(|meta| *p >= meta.partitions))
            .cloned()
            .collect();
        for key in gone {
            self.forget(key);
        }
        for (name, meta) in &topics {
            let Some(rule) = self
                .settings
                .rules
                .iter()
                .position(|r| glob_match(&r.source, name))
            else {
                continue;
            };
            for partition in 0..meta.partitions {
                let key = (name.clone(), partition);
                if self.cursors.contains_key(&key) {
                    continue;
                }
                let next = match self.checkpoints.get(&key) {
                    Some(&next) => next,
                    None if self.checkpoints_read => 0,
                    None => self
                        .broker
                        .offsets(name, partition)
                        .map(|o| o.earliest)
                        .unwrap_or(0),
                };
                self.cursors.insert(
                    key,
                    Cursor {
                        rule,
                        target: target_for(&self.settings.rules[rule], name),
                        next,
                        bytes_per_record: 0,
                        known: self.checkpoints_read,
                    },
                );
            }
        }
    }

    /// A source partition that is gone (its topic deleted): its cursor,
    /// windows and checkpoint, which a tombstone clears upstream too.
    fn forget(&mut self, key: (String, u32)) {
        self.cursors.remove(&key);
        self.aggs.remove(&key);
        self.agg_checkpoints.remove(&key);
        // Before the checkpoints are read, whether there is one is unknown.
        if self.checkpoints.remove(&key).is_some() || !self.checkpoints_read {
            self.resets.insert(key);
        }
    }

    /// Backlog and bytes at risk per rule (status) and per topic (metrics);
    /// and for `block` rules, the retain floor: the ring keeps every
    /// offset from the cursor on.
    fn publish_backlog(&mut self) {
        // drop-oldest rings may have moved past a cursor: count it now,
        // not only when the link is back.
        let behind: Vec<((String, u32), u64, u64, u64)> = self
            .cursors
            .iter()
            .filter(|(_, c)| c.known)
            .filter_map(|(key, c)| {
                let o = self.broker.offsets(&key.0, key.1).ok()?;
                (c.next < o.earliest).then(|| (key.clone(), c.next, o.earliest, o.high_watermark))
            })
            .collect();
        for (key, next, earliest, hw) in behind {
            self.out_of_range(&key, next, earliest, hw);
        }
        let rules = self.settings.rules.len();
        let mut backlog = vec![(0u64, 0u64, 0u64); rules];
        let mut windows = vec![0u64; rules];
        let mut per_topic: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for ((topic, partition), cursor) in &self.cursors {
            let Ok(offsets) = self.broker.offsets(topic, *partition) else {
                continue;
            };
            let block = self.settings.rules[cursor.rule].mirror_overflow == "block";
            // Open windows are replayed from their first record.
            let key = (topic.clone(), *partition);
            let floor = self
                .agg_checkpoints
                .get(&key)
                .map_or(cursor.next, |cp| cp.resume.min(cursor.next));
            let _ = self
                .broker
                .set_retain_floor(topic, *partition, block.then_some(floor));
            windows[cursor.rule] += self.aggs.get(&key).map_or(0, |a| a.open_windows() as u64);
            let records = offsets
                .high_watermark
                .saturating_sub(cursor.next.max(offsets.earliest));
            let bytes = records.saturating_mul(cursor.bytes_per_record);
            let b = &mut backlog[cursor.rule];
            b.0 += records;
            b.1 += bytes;
            b.2 += 1;
            let t = per_topic.entry(topic).or_default();
            t.0 += records;
            t.1 += bytes;
        }
        let now = std::time::Instant::now();
        for (rule, (records, bytes, partitions)) in backlog.into_iter().enumerate() {
            let (rate, eta) =
                self.windows[rule].observe(now, self.committed_upstream[rule], records);
            self.status.update_rule(rule, |r| {
                r.backlog_records = records;
                r.bytes_at_risk = bytes;
                r.partitions = partitions;
                r.rate_bytes_per_s = rate;
                r.eta_s = eta;
                r.open_windows = windows[rule];
            });
            if let Some(m) = &self.metrics {
                m.set_mirror_rate(&self.settings.rules[rule].name, rate);
            }
        }
        if let Some(m) = &self.metrics {
            for (topic, (records, bytes)) in per_topic {
                m.set_mirror_backlog(
                    topic,
                    i64::try_from(records).unwrap_or(i64::MAX),
                    i64::try_from(bytes).unwrap_or(i64::MAX),
                );
            }
        }
    }

    /// Upstream partitions of `target`, creating it if allowed.
    async fn partitions_of(
        &mut self,
        client: &KafkaClient,
        target: &str,
        source_partitions: u32,
    ) -> Result<i32, Failure> {
        if let Some(&n) = self.target_partitions.get(target) {
            return Ok(n);
        }
        let n = match client.partition_count(target).await {
            Ok(n) => n,
            Err(e) if e.code() == Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION) => {
                if !self.settings.create_topics {
                    return Err(Failure::MissingTopic(target.to_owned()));
                }
                let created = client
                    .create_topic(&NewTopic {
                        name: target.to_owned(),
                        partitions: i32::try_from(source_partitions).unwrap_or(1),
                        replication_factor: -1,
                        configs: vec![],
                    })
                    .await
                    .map_err(kafka("creating a target topic"))?;
                if created {
                    log::info!("mirror: created upstream topic '{target}'");
                }
                client
                    .refresh_metadata(&[target])
                    .await
                    .map_err(kafka("reading metadata"))?;
                client
                    .partition_count(target)
                    .await
                    .map_err(kafka("reading metadata"))?
            }
            Err(e) => return Err(kafka("reading metadata")(e)),
        };
        let n = i32::try_from(n).unwrap_or(i32::MAX).max(1);
        self.target_partitions.insert(target.to_owned(), n);
        Ok(n)
    }

    /// Sends what there is in one transaction, read in rounds of
    /// `batch_bytes`: while a backlog lasts, the next round is read and
    /// encoded while the last one is on the wire, and the transaction goes
    /// on (for up to [`TRANSACTION_OPEN_MAX`]) so that AddPartitionsToTxn
    /// and EndTxn are paid once per many rounds. `Ok(false)`: nothing to
    /// send.
    async fn forward_once(
        &mut self,
        client: &KafkaClient,
        producer: &mut Producer,
    ) -> Result<bool, Failure> {
        // Where this transaction reads next; the cursors move at commit.
        let mut positions: BTreeMap<(String, u32), u64> = self
            .cursors
            .iter()
            .filter(|(_, c)| !self.status.paused(c.rule))
            .map(|(key, c)| (key.clone(), c.next))
            .collect();
        if positions.is_empty() && self.resets.is_empty() {
            return Ok(false);
        }
        let gateway = self.settings.gateway.clone();
        let checkpoint_topic = self.settings.checkpoint_topic.clone();
        let mut advances: BTreeMap<(String, u32), (usize, Advance)> = BTreeMap::new();
        // The last round's sends: awaited before the next round is sent,
        // so at most two rounds are in memory.
        let mut on_the_wire: Vec<super::kafka::PendingProduce> = Vec::new();
        let started = std::time::Instant::now();
        loop {
            positions.retain(|key, _| {
                self.cursors
                    .get(key)
                    .is_some_and(|c| !self.status.paused(c.rule))
            });
            if positions.is_empty() {
                break;
            }
            let first = advances.is_empty();
            let Some(budget) = self.pace.round_budget(first, std::time::Instant::now()) else {
                break; // throttled: commit, and wait before the next one
            };
            let budget = budget.min(self.round_cap);
            let active = self.plan_round(&positions, budget);
            let Round {
                builders,
                advances: read,
                bytes: read_bytes,
                gone,
            } = self.read_round(client, &active, budget, first).await?;
            for key in &gone {
                positions.remove(key);
                // Deleted: its tombstone, not this transaction's
                // checkpoint, says where it is.
                if self.resets.contains(key) {
                    advances.remove(key);
                }
            }
            if read.is_empty() {
                break;
            }
            let upstream_bytes = encoded(&builders);
            match self
                .pace
                .admit(read_bytes, upstream_bytes, first, std::time::Instant::now())
            {
                Admit::Now => {}
                // Nothing of this transaction is upstream yet: waiting
                // here cannot time out a request or the transaction.
                Admit::After(wait) => {
                    self.wait(wait).await;
                    if let Some(m) = &self.metrics {
                        m.mirror_throttled(wait);
                    }
                    if self.stopping.is_triggered() {
                        return Ok(false);
                    }
                }
                // Not sent and the cursors not moved: the next
                // transaction reads it again. Not a round that aggregate
                // rules folded into their windows: the checkpoints this
                // transaction commits would hold its records while the
                // cursors do not, and reading it again would fold them
                // twice. It goes now, and the bucket's debt is waited out
                // before the next transaction's first round.
                Admit::PutBack if !read.iter().any(|(rule, _)| self.specs[*rule].is_some()) => {
                    break
                }
                Admit::PutBack => {}
            }
            self.pace.spend(upstream_bytes, std::time::Instant::now());
            if let Some(m) = &self.metrics {
                m.mirror_sent(upstream_bytes);
            }
            for (rule, a) in &read {
                self.shares.spend(*rule, a.bytes);
            }
            let checkpoint_partitions = self
                .partitions_of(client, &checkpoint_topic, 1)
                .await?
                .unsigned_abs();
            let mut parts: Vec<(&str, i32)> =
                builders.keys().map(|(t, p)| (t.as_str(), *p)).collect();
            for (_, a) in &read {
                let key = checkpoint_key(&gateway, &a.key);
                let p = partition_for_key(key.as_bytes(), checkpoint_partitions) as i32;
                parts.push((checkpoint_topic.as_str(), p));
            }
            if !producer.in_transaction() {
                producer.begin().map_err(kafka("beginning a transaction"))?;
            }
            producer
                .add_partitions(&parts)
                .await
                .map_err(kafka("adding partitions to a transaction"))?;
            drop(parts);
            for p in on_the_wire.drain(..) {
                p.wait().await.map_err(kafka("sending records"))?;
            }
            // Each batch is dropped once sent: the request holds its
            // finished copy until the answer.
            for ((topic, partition), list) in builders {
                for builder in list {
                    on_the_wire.push(
                        producer
                            .send(&topic, partition, &builder)
                            .await
                            .map_err(kafka("sending records"))?,
                    );
                }
            }
            for (rule, a) in read {
                positions.insert(a.key.clone(), a.next);
                match advances.get_mut(&a.key) {
                    Some((_, sum)) => {
                        sum.next = sum.next.max(a.next);
                        sum.records += a.records;
                        sum.bytes += a.bytes;
                        sum.upstream += a.upstream;
                    }
                    None => {
                        advances.insert(a.key.clone(), (rule, a));
                    }
                }
            }
            let caught_up = read_bytes < budget / 2;
            if caught_up
                || started.elapsed() >= TRANSACTION_OPEN_MAX
                || self.stopping.is_triggered()
            {
                break;
            }
        }
        // Taken now: `refresh_sources` adds to it between transactions.
        let resets: Vec<(String, u32)> = self
            .resets
            .iter()
            .filter(|key| !advances.contains_key(*key))
            .cloned()
            .collect();
        if advances.is_empty() && resets.is_empty() {
            return Ok(false);
        }

        // The checkpoints ride in the same transaction as the records.
        let checkpoint_partitions = self
            .partitions_of(client, &checkpoint_topic, 1)
            .await?
            .unsigned_abs();
        let now = crate::batch::now_ms();
        let mut checkpoints: BTreeMap<i32, BatchBuilder> = BTreeMap::new();
        let mut states = Vec::new();
        for (_, a) in advances.values() {
            let key = checkpoint_key(&gateway, &a.key);
            let mut value = (a.next - 1).to_string();
            if let Some(agg) = self.aggs.get(&a.key) {
                let state = agg.checkpoint(a.next);
                value = format!("{value} {}", state.encode());
                states.push((a.key.clone(), state));
            }
            push_checkpoint(
                &mut checkpoints,
                checkpoint_partitions,
                &key,
                Some(value.as_bytes()),
                now,
            )?;
        }
        for source in &resets {
            let key = checkpoint_key(&gateway, source);
            push_checkpoint(&mut checkpoints, checkpoint_partitions, &key, None, now)?;
        }
        if !producer.in_transaction() {
            producer.begin().map_err(kafka("beginning a transaction"))?;
        }
        let checkpoint_bytes: u64 = checkpoints.values().map(|b| b.encoded_bytes() as u64).sum();
        // Small; charged without a wait, the next round pays for them.
        self.pace.spend(checkpoint_bytes, std::time::Instant::now());
        if let Some(m) = &self.metrics {
            m.mirror_sent(checkpoint_bytes);
        }
        for (partition, builder) in &checkpoints {
            on_the_wire.push(
                producer
                    .send(&checkpoint_topic, *partition, builder)
                    .await
                    .map_err(kafka("sending records"))?,
            );
        }
        for p in on_the_wire {
            p.wait().await.map_err(kafka("sending records"))?;
        }
        producer
            .commit()
            .await
            .map_err(kafka("committing a transaction"))?;
        self.status.transaction_ended(true);
        self.round_cap =
            (self.round_cap + self.round_cap / 8).min(self.settings.batch_bytes as u64);
        if let Some(m) = &self.metrics {
            m.mirror_transaction(true);
            for (_, a) in advances.values() {
                m.mirror_forwarded(&a.key.0, a.records, a.bytes);
            }
        }

        self.agg_checkpoints.extend(states);
        for key in &resets {
            self.resets.remove(key);
        }
        for (rule, a) in advances.into_values() {
            // A checkpoint of the topic created again replaces the
            // deleted one's.
            self.resets.remove(&a.key);
            if let Some(agg) = self.aggs.get_mut(&a.key) {
                let c = std::mem::take(&mut agg.counts);
                self.status.update_rule(rule, |r| {
                    r.windows_emitted += c.emitted;
                    r.windows_closed_early += c.closed_early;
                    r.late_records += c.late;
                    r.malformed_records += c.malformed;
                });
                if let Some(m) = &self.metrics {
                    m.mirror_aggregate(
                        &a.key.0,
                        [
                            ("late", c.late),
                            ("malformed", c.malformed),
                            ("window", c.emitted),
                            ("window_closed_early", c.closed_early),
                        ],
                    );
                }
            }
            if let Some(c) = self.cursors.get_mut(&a.key) {
                c.next = c.next.max(a.next);
            }
            self.checkpoints.insert(a.key.clone(), a.next);
            self.committed_upstream[rule] += a.upstream;
            self.status.update_rule(rule, |r| {
                r.forwarded_records += a.records;
                r.forwarded_bytes += a.bytes;
            });
        }
        Ok(true)
    }

    /// Each partition's allowance of a round of `budget` local bytes (see
    /// [`Shares::plan`]). Their order does not matter: a partition the
    /// fetch leaves out keeps its rule's credit for the next round.
    fn plan_round(
        &mut self,
        positions: &BTreeMap<(String, u32), u64>,
        budget: u64,
    ) -> Vec<(String, u32, u64, usize)> {
        let mut claims = Vec::with_capacity(positions.len());
        let mut parts = Vec::with_capacity(positions.len());
        for (key, &next) in positions {
            let Some(c) = self.cursors.get(key) else {
                continue;
            };
            let backlog = self
                .broker
                .offsets(&key.0, key.1)
                .map_or(0, |o| o.high_watermark.saturating_sub(next));
            let demand = match (backlog, c.bytes_per_record) {
                (0, _) => 0,
                (_, 0) => u64::MAX, // not read yet: unknown
                (n, per) => n.saturating_mul(per),
            };
            claims.push(Claim {
                rule: c.rule,
                priority: u32::try_from(self.settings.rules[c.rule].priority).unwrap_or(0),
                demand,
            });
            parts.push((key.0.clone(), key.1, next));
        }
        let allowances = self
            .shares
            .plan(budget, self.settings.min_share_percent, &claims);
        parts
            .into_iter()
            .zip(allowances)
            .filter(|(_, allowance)| *allowance > 0)
            .map(|((topic, partition, next), allowance)| {
                (
                    topic,
                    partition,
                    next,
                    usize::try_from(allowance).unwrap_or(usize::MAX),
                )
            })
            .collect()
    }

    /// Reads one round of about `budget` local bytes from `active` (topic,
    /// partition, offset, allowance) and encodes it as upstream batches.
    /// The first round of a transaction waits up to `linger` for half of
    /// the budget; later ones take what is there.
    async fn read_round(
        &mut self,
        client: &KafkaClient,
        active: &[(String, u32, u64, usize)],
        budget: u64,
        first: bool,
    ) -> Result<Round, Failure> {
        let budget = usize::try_from(budget).unwrap_or(usize::MAX);
        let parts: Vec<FetchPartition<'_>> = active
            .iter()
            .map(|(topic, partition, offset, allowance)| FetchPartition {
                topic,
                partition: *partition,
                offset: *offset,
                max_bytes: *allowance,
            })
            .collect();
        let limits = FetchLimits {
            // Half: a read stops at a whole batch short of max_bytes, so
            // waiting for all of it would wait out linger on every full
            // fetch of a backlog.
            min_bytes: budget / 2,
            max_wait: if first {
                self.settings.linger
            } else {
                Duration::ZERO
            },
            // The allowances bound the round. The fetch skips the partitions
            // after the total is within a batch of this: one batch of room
            // keeps the later ones in.
            max_bytes: budget.saturating_add(self.broker.max_batch_bytes()),
        };
        // Committed records only: an open transaction's records wait for
        // its end, an aborted one's never go upstream.
        let results = self.broker.fetch_isolated(&parts, limits, true).await;
        drop(parts);

        let gateway = self.settings.gateway.clone();
        let mut round = Round::default();
        for ((topic, partition, offset, _), result) in active.iter().zip(results) {
            let key = (topic.clone(), *partition);
            let offset = *offset;
            let fetched = match result {
                Ok(f) => f,
                Err(BrokerError::OffsetOutOfRange {
                    requested,
                    earliest,
                    high_watermark,
                }) => {
                    self.out_of_range(&key, requested, earliest, high_watermark);
                    round.gone.push(key);
                    continue;
                }
                Err(BrokerError::UnknownTopic(_) | BrokerError::UnknownPartition { .. }) => {
                    self.forget(key.clone());
                    round.gone.push(key);
                    continue;
                }
                Err(e) => return Err(Failure::Local(e)),
            };
            let Some(cursor) = self.cursors.get(&key) else {
                continue;
            };
            if self.status.paused(cursor.rule) {
                continue; // paused while the fetch waited
            }
            let (rule, target) = (cursor.rule, cursor.target.clone());
            if let Some(spec) = &self.specs[rule] {
                if !self.aggs.contains_key(&key) {
                    let agg = self.restore_agg(&key, offset, spec.clone()).await?;
                    self.aggs.insert(key.clone(), agg);
                }
            }
            let source_partitions = self.broker.topic(&key.0).map(|m| m.partitions).unwrap_or(1);
            let partitions = self
                .partitions_of(client, &target, source_partitions)
                .await?;
            let durable = fetched.offsets.durable;
            let mut next = offset;
            let mut records = 0u64;
            let mut bytes = 0u64;
            let mut held_back = false;
            let encoded_before = encoded(&round.builders);
            let topic_text = key.0.as_str();
            let partition_text = key.1.to_string();
            let source_headers = [
                HeaderRef {
                    key: "skiff.gateway",
                    value: Some(gateway.as_bytes()),
                },
                HeaderRef {
                    key: "skiff.topic",
                    value: Some(topic_text.as_bytes()),
                },
                HeaderRef {
                    key: "skiff.partition",
                    value: Some(partition_text.as_bytes()),
                },
            ];
            let mut agg = self.aggs.get_mut(&key);
            for batch in BatchIter::new(&fetched.records) {
                let batch = batch.map_err(|e| Failure::Local(e.into()))?;
                let h = batch.header;
                if h.next_offset() > durable {
                    held_back = true;
                    break; // not durable yet: a local crash could take it back
                }
                if h.next_offset() <= next {
                    continue;
                }
                if h.attributes & ATTR_CONTROL != 0 {
                    next = h.next_offset();
                    continue;
                }
                for r in batch.records().map_err(|e| Failure::Local(e.into()))? {
                    let source_offset = h.base_offset + u64::from(r.offset_delta);
                    if source_offset < next {
                        continue;
                    }
                    if let Some(agg) = agg.as_deref_mut() {
                        let ts = h.first_timestamp.saturating_add(r.timestamp_delta);
                        agg.fold(
                            source_offset,
                            ts,
                            r.key.map(|k| &**k),
                            r.value.map(|v| &**v),
                        );
                        records += 1;
                        continue;
                    }
                    let target_partition = upstream_partition(
                        self.settings.partitioner,
                        r.key.map(|k| &**k),
                        key.1,
                        partitions,
                    );
                    let offset_text = source_offset.to_string();
                    let mut headers: Vec<HeaderRef<'_>> = r
                        .headers
                        .iter()
                        .map(|h| HeaderRef {
                            key: h.name,
                            value: Some(&**h.value),
                        })
                        .collect();
                    headers.extend(source_headers);
                    headers.push(HeaderRef {
                        key: "skiff.offset",
                        value: Some(offset_text.as_bytes()),
                    });
                    push_upstream(
                        &mut round.builders,
                        &target,
                        target_partition,
                        &RecordRef {
                            key: r.key.map(|k| &**k),
                            value: r.value.map(|v| &**v),
                            timestamp_ms: h.first_timestamp.saturating_add(r.timestamp_delta),
                            headers: &headers,
                        },
                    )?;
                    records += 1;
                }
                bytes += u64::from(h.total_len);
                next = h.next_offset();
            }
            if let Some(agg) = agg {
                for w in agg.closed.drain(..) {
                    let target_partition = upstream_partition(
                        self.settings.partitioner,
                        w.key.as_deref(),
                        key.1,
                        partitions,
                    );
                    // The window's end: its records are all before it.
                    push_upstream(
                        &mut round.builders,
                        &target,
                        target_partition,
                        &RecordRef {
                            key: w.key.as_deref(),
                            value: Some(&w.json),
                            timestamp_ms: w.end,
                            headers: &source_headers,
                        },
                    )?;
                }
                if let Some((at, why)) = agg.last_malformed.take() {
                    let last = &mut self.malformed_logged[rule];
                    if last.is_none_or(|t| t.elapsed() >= MALFORMED_LOG_EVERY) {
                        *last = Some(std::time::Instant::now());
                        log::warn!(
                            "mirror: rule '{}': {}/{} offset {at}: skipped a malformed value ({why}); \
                             at most one such line per minute, `skiff mirror status` counts them all",
                            self.settings.rules[rule].name,
                            key.0,
                            key.1
                        );
                    }
                }
            }
            // Past what the read left out (markers, aborted transactions),
            // once that is durable too.
            if let Some(after) = fetched.next_offset {
                if !held_back && after > next && after <= durable {
                    next = after;
                }
            }
            round.bytes += bytes;
            if next > offset {
                if let (Some(per), Some(c)) =
                    (bytes.checked_div(records), self.cursors.get_mut(&key))
                {
                    c.bytes_per_record = per;
                }
                round.advances.push((
                    rule,
                    Advance {
                        key,
                        next,
                        records,
                        bytes,
                        upstream: encoded(&round.builders) - encoded_before,
                    },
                ));
            }
        }
        Ok(round)
    }

    /// An aggregate partition's windows as the last committed checkpoint
    /// left them: its watermark, horizon and pending late counts, and the
    /// open windows folded again from the local log, `[resume, next)`.
    async fn restore_agg(
        &mut self,
        key: &(String, u32),
        next: u64,
        spec: Arc<Spec>,
    ) -> Result<PartitionAgg, Failure> {
        let Some(cp) = self.agg_checkpoints.get(key) else {
            return Ok(PartitionAgg::new(spec));
        };
        let Some(mut agg) = PartitionAgg::restore(spec.clone(), cp) else {
            log::warn!(
                "mirror: {}/{}: window_ms changed from {} to {}: the windows open at offset {next} are not emitted; aggregating on from there",
                key.0,
                key.1,
                cp.window_ms,
                spec.window_ms
            );
            return Ok(PartitionAgg::restart_from(spec, cp));
        };
        let mut pos = cp.resume;
        let batch_bytes = self.settings.batch_bytes;
        while pos < next {
            let parts = [FetchPartition {
                topic: &key.0,
                partition: key.1,
                offset: pos,
                max_bytes: batch_bytes,
            }];
            let limits = FetchLimits {
                min_bytes: 0,
                max_wait: Duration::ZERO,
                max_bytes: batch_bytes,
            };
            let result = self.broker.fetch_isolated(&parts, limits, true).await;
            let fetched = match result.into_iter().next() {
                Some(Ok(f)) => f,
                Some(Err(BrokerError::OffsetOutOfRange { earliest, .. })) if earliest > pos => {
                    // Only `drop-oldest` rings get here: the floor holds
                    // `resume` for `block` ones.
                    let lost = earliest.min(next) - pos;
                    log::warn!(
                        "mirror: {}/{}: {lost} record(s) (offsets {pos}..{}) of open windows left the local log; those windows are emitted without them",
                        key.0,
                        key.1,
                        earliest.min(next)
                    );
                    if let Some(c) = self.cursors.get(key) {
                        self.status
                            .update_rule(c.rule, |r| r.dropped_records += lost);
                    }
                    if let Some(m) = &self.metrics {
                        m.mirror_dropped(&key.0, lost);
                    }
                    pos = earliest;
                    continue;
                }
                Some(Err(e)) => return Err(Failure::Local(e)),
                None => break,
            };
            let before = pos;
            for batch in BatchIter::new(&fetched.records) {
                let batch = batch.map_err(|e| Failure::Local(e.into()))?;
                let h = batch.header;
                if h.next_offset() <= pos || h.attributes & ATTR_CONTROL != 0 {
                    pos = pos.max(h.next_offset());
                    continue;
                }
                for r in batch.records().map_err(|e| Failure::Local(e.into()))? {
                    let offset = h.base_offset + u64::from(r.offset_delta);
                    if offset >= pos && offset < next {
                        let ts = h.first_timestamp.saturating_add(r.timestamp_delta);
                        agg.replay(offset, ts, r.key.map(|k| &**k), r.value.map(|v| &**v));
                    }
                }
                pos = h.next_offset();
            }
            if let Some(after) = fetched.next_offset {
                pos = pos.max(after);
            }
            if pos == before {
                break; // nothing more to read below `next`
            }
        }
        if agg.open_windows() > 0 {
            log::info!(
                "mirror: {}/{}: {} open window(s) rebuilt from offsets {}..{next}",
                key.0,
                key.1,
                agg.open_windows(),
                cp.resume
            );
        }
        Ok(agg)
    }

    /// The cursor points outside the local log: below it, records were
    /// dropped before they went upstream; above it, the local log is
    /// shorter than what upstream has (a data directory reset).
    fn out_of_range(&mut self, key: &(String, u32), requested: u64, earliest: u64, hw: u64) {
        let Some(cursor) = self.cursors.get_mut(key) else {
            return;
        };
        if requested < earliest {
            let dropped = earliest - requested;
            log::warn!(
                "mirror: {}/{}: {dropped} record(s) (offsets {requested}..{earliest}) left the local log before they were forwarded",
                key.0,
                key.1
            );
            cursor.next = earliest;
            self.status
                .update_rule(cursor.rule, |r| r.dropped_records += dropped);
            if let Some(m) = &self.metrics {
                m.mirror_dropped(&key.0, dropped);
            }
        } else {
            log::warn!(
                "mirror: {}/{}: upstream holds offsets up to {requested} but the local log ends at {hw}; forwarding from {hw}",
                key.0,
                key.1
            );
            cursor.next = hw;
        }
    }
}

/// Upstream bytes of a round's batches so far.
fn encoded(builders: &BTreeMap<(String, i32), Vec<BatchBuilder>>) -> u64 {
    builders
        .values()
        .flatten()
        .map(|b| b.encoded_bytes() as u64)
        .sum()
}

/// `gateway/topic/partition` → (topic, partition) for this gateway's keys.
fn parse_checkpoint_key(key: &[u8], prefix: &str) -> Option<(String, u32)> {
    let key = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let (topic, partition) = key.rsplit_once('/')?;
    Some((topic.to_owned(), partition.parse().ok()?))
}

/// `gateway/topic/partition` → `last offset` for this gateway's keys; an
/// aggregate rule's state follows the offset after a space.
fn parse_checkpoint<'v>(
    key: &[u8],
    value: &'v [u8],
    prefix: &str,
) -> Option<(String, u32, u64, Option<&'v str>)> {
    let (topic, partition) = parse_checkpoint_key(key, prefix)?;
    let value = std::str::from_utf8(value).ok()?;
    let (last, state) = match value.split_once(' ') {
        Some((last, state)) => (last, Some(state)),
        None => (value, None),
    };
    Some((topic, partition, last.parse().ok()?, state))
}

/// Murmur2 of the key, or the source partition's number (modulo).
fn upstream_partition(
    partitioner: Partitioner,
    key: Option<&[u8]>,
    source_partition: u32,
    partitions: i32,
) -> i32 {
    match (partitioner, key) {
        (Partitioner::Murmur2, Some(k)) => partition_for_key(k, partitions.unsigned_abs()) as i32,
        _ => (source_partition % partitions.unsigned_abs()) as i32,
    }
}

/// At least the bytes `record` takes in a batch: its fields, and each
/// varint at its longest (a varlong is 10 bytes, a varint 5).
fn record_bytes_max(record: &RecordRef<'_>) -> usize {
    let len = |b: Option<&[u8]>| 5 + b.map_or(0, <[u8]>::len);
    let headers: usize = record
        .headers
        .iter()
        .map(|h| len(Some(h.key.as_bytes())) + len(h.value))
        .sum();
    // Length, attributes, timestamp delta, offset delta, header count.
    5 + 1 + 10 + 5 + len(record.key) + len(record.value) + 5 + headers
}

/// Adds a checkpoint record (`None`: a tombstone) to the batch for its
/// partition of the checkpoint topic.
fn push_checkpoint(
    checkpoints: &mut BTreeMap<i32, BatchBuilder>,
    partitions: u32,
    key: &str,
    value: Option<&[u8]>,
    now: i64,
) -> Result<(), Failure> {
    let partition = partition_for_key(key.as_bytes(), partitions) as i32;
    checkpoints
        .entry(partition)
        .or_default()
        .push(&RecordRef {
            key: Some(key.as_bytes()),
            value,
            timestamp_ms: now,
            headers: &[],
        })
        .map_err(|e| kafka("encoding checkpoints")(KafkaError::Records(e)))
}

/// Adds `record` to the batches for one upstream partition, starting a new
/// batch when the last one is full.
fn push_upstream(
    builders: &mut BTreeMap<(String, i32), Vec<BatchBuilder>>,
    target: &str,
    partition: i32,
    record: &RecordRef<'_>,
) -> Result<(), Failure> {
    let list = builders.entry((target.to_owned(), partition)).or_default();
    // Before the record, not after: a batch just under the limit plus a
    // large record (local batches go up to `storage.max_batch_bytes`)
    // could pass upstream's `message.max.bytes`, refused every time.
    if list.last().is_none_or(|b| {
        !b.is_empty() && b.encoded_bytes() + record_bytes_max(record) > UPSTREAM_BATCH_BYTES_MAX
    }) {
        list.push(BatchBuilder::new());
    }
    let builder = list.last_mut().expect("pushed above");
    builder
        .push(record)
        .map_err(|e| kafka("encoding records")(KafkaError::Records(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("sensors.*", "sensors.temp"));
        assert!(glob_match("sensors.*", "sensors."));
        assert!(!glob_match("sensors.*", "sensor.temp"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "a-b-c"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "a-c-b"));
        assert!(glob_match("*.temp", "x.temp"));
        assert!(!glob_match("*.temp", "temp"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exact2"));
        assert!(!glob_match("a*aa", "aa"));
    }

    #[test]
    fn checkpoint_keys_parse_for_this_gateway_only() {
        assert_eq!(
            parse_checkpoint(b"gw-17/sensors.temp/3", b"41", "gw-17/"),
            Some(("sensors.temp".to_owned(), 3, 41, None))
        );
        assert_eq!(
            parse_checkpoint(
                b"gw-17/t/0",
                b"41 1000 7 1700000009000 1700000004000",
                "gw-17/"
            ),
            Some((
                "t".to_owned(),
                0,
                41,
                Some("1000 7 1700000009000 1700000004000")
            ))
        );
        assert_eq!(parse_checkpoint(b"gw-1/t/0", b"1", "gw-17/"), None);
        assert_eq!(parse_checkpoint(b"gw-17/t/x", b"1", "gw-17/"), None);
        assert_eq!(parse_checkpoint(b"gw-17/t/0", b"-1", "gw-17/"), None);
    }

    #[test]
    fn upstream_batches_stay_under_the_limit_unless_one_record_is_larger() {
        let mut builders = BTreeMap::new();
        let big = vec![7u8; 200 * 1024];
        let huge = vec![7u8; UPSTREAM_BATCH_BYTES_MAX + 1];
        let headers = [HeaderRef {
            key: "skiff.offset",
            value: Some(b"1"),
        }];
        for value in [&big, &big, &big, &huge, &big] {
            let record = RecordRef {
                key: Some(b"k"),
                value: Some(value),
                timestamp_ms: 1,
                headers: &headers,
            };
            push_upstream(&mut builders, "t", 0, &record).unwrap();
        }
        let list = &builders[&("t".to_owned(), 0)];
        assert_eq!(
            list.iter().map(BatchBuilder::len).collect::<Vec<_>>(),
            [1; 5]
        );
        for (i, b) in list.iter().enumerate() {
            assert!(
                i == 3 || b.encoded_bytes() <= UPSTREAM_BATCH_BYTES_MAX,
                "batch {i}: {} bytes",
                b.encoded_bytes()
            );
        }
    }

    #[test]
    fn targets_are_templates() {
        let rule = MirrorRule {
            name: "r".into(),
            source: "sensors.*".into(),
            target: "plant1.{topic}".into(),
            mirror_overflow: "block".into(),
            priority: 0,
            aggregate: None,
        };
        assert_eq!(target_for(&rule, "sensors.temp"), "plant1.sensors.temp");
    }
}
