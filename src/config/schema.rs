//! The config schema (one struct per TOML table) and its validation beyond
//! types. Field docs are the short form of docs/configuration.md.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Alignment of segment and tail sizes: the O_DIRECT block.
pub const BLOCK_BYTES: u64 = crate::storage::BLOCK_BYTES as u64;
/// Segment and ring limits are storage's own: a config that passes here is
/// one storage accepts.
pub use crate::storage::{SEGMENTS_MAX, SEGMENTS_MIN, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};
/// Room in a frame around the largest batch: the CBOR envelope, topic name,
/// partition, producer fields. A frame must carry one whole batch.
pub const FRAME_OVERHEAD_BYTES_MIN: u64 = 4096;
/// Frames are length-prefixed with a u32; keep far below it so a corrupt
/// length cannot ask for gigabytes.
pub const MAX_FRAME_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
/// The smallest useful batch: one batch header and a few small records.
pub const MAX_BATCH_BYTES_MIN: u64 = 1024;
/// File descriptors: systemd's LimitNOFILE=65536 leaves room for segment
/// files beside this many connections.
pub const MAX_CONNECTIONS_LIMIT: u32 = 16384;
/// Far past any window worth covering with one flush, and within a 32-bit
/// board's address space.
pub const MAX_INFLIGHT_BYTES_SHARED_LIMIT: u64 = 1 << 30;
/// A partition's tail buffer, allocated whole at its creation: room for
/// the largest frame's batch; far past what groups writes usefully.
pub const TAIL_BUFFER_BYTES_LIMIT: u64 = MAX_FRAME_BYTES_LIMIT;
/// The cleaner's key map, allocated whole at start; a connection's
/// in-flight allowance. Within a 32-bit board's address space.
pub const KEY_MAP_BYTES_LIMIT: u64 = 1 << 30;
pub const MAX_INFLIGHT_BYTES_PER_CONNECTION_LIMIT: u64 = 1 << 30;
pub const MAX_TOPICS_LIMIT: u32 = 65536;
pub const MAX_PARTITIONS_LIMIT: u32 = 65536;
/// The storage thread's bounded channel; beyond this, latency, not
/// throughput, grows.
pub const APPEND_QUEUE_DEPTH_MAX: u32 = 65536;
pub const MAX_PRODUCERS_LIMIT: u32 = 1 << 20;
/// Groups and members live in memory, a few hundred bytes each.
pub const GROUPS_MAX_LIMIT: u32 = 65536;
pub const TRANSACTIONAL_IDS_MAX_LIMIT: u32 = 65536;
/// A year: an id kept longer is one never to be used again.
pub const TXN_ID_EXPIRATION_MS_MAX: u64 = 365 * 86_400_000;
pub const GROUP_MEMBERS_MAX_LIMIT: u32 = 4096;
pub const GROUP_MEMBERS_TOTAL_MAX_LIMIT: u32 = 65536;

/// The whole config. Field order is TOML order: plain keys before tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where topics, checkpoints and producer state live.
    pub data_dir: PathBuf,
    /// The device profile layered under the config file, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub server: ServerConfig,
    pub storage: StorageSection,
    pub topic_defaults: TopicDefaults,
    pub producers: ProducersConfig,
    pub groups: GroupsSection,
    pub transactions: TransactionsSection,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub acl: AclConfig,
    pub quotas: QuotasConfig,
    pub compaction: CompactionConfig,
    pub mirror: MirrorConfig,
    pub share: ShareSection,
}

/// `[compaction]`: the cleaner of compacted topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionConfig {
    /// The key map's memory: keys beyond what it holds take more passes.
    pub key_map_bytes: u64,
    /// The cleaner's reads and writes together, per second (0: no cap).
    pub max_bytes_per_sec: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP listen address `IP:PORT`; "" disables TCP.
    pub listen: String,
    /// Unix socket path; "" disables it.
    pub unix_socket: String,
    pub max_connections: u32,
    /// A new connection must send its hello within this, and a frame once
    /// begun must not go this long without a byte; else it is closed.
    pub frame_timeout_ms: u64,
    pub max_frame_bytes: u64,
    pub max_inflight_bytes_per_connection: u64,
    /// Produce bytes connections may hold past their own share, all
    /// together: one bulk producer's window needs fewer flushes.
    pub max_inflight_bytes_shared: u64,
    pub max_topics: u32,
    /// Total across all topics; storage pools are sized from it.
    pub max_partitions: u32,
    /// Names for Unix socket peers by uid; an unnamed peer is `uid:N`.
    pub unix_identities: Vec<UnixIdentity>,
    pub tls: TlsSection,
}

/// `[[server.unix_identities]]`: the identity a Unix socket peer with this
/// uid gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixIdentity {
    pub uid: u32,
    pub identity: String,
}

/// `[server.tls]`: the TLS listener. Off while `listen` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// TLS listen address `IP:PORT`; "" disables TLS.
    pub listen: String,
    /// The server's certificate chain, PEM, leaf first.
    pub cert: String,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// CA certificates, PEM: set, every client must present a certificate
    /// that chains to one of them (mutual TLS).
    pub client_ca: String,
    /// A certificate revocation list, PEM or DER, checked with `client_ca`.
    pub crl: String,
    /// Where a client certificate's identity comes from.
    #[serde(with = "as_text")]
    pub identity_from: IdentityFrom,
    /// How long a client may take to finish its handshake.
    pub handshake_timeout_ms: u64,
}

/// Which part of a client certificate names its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityFrom {
    /// The subject's common name.
    Cn,
    /// The first DNS name in the subject alternative names.
    SanDns,
    /// The first URI in the subject alternative names.
    SanUri,
}

impl fmt::Display for IdentityFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cn => "cn",
            Self::SanDns => "san-dns",
            Self::SanUri => "san-uri",
        })
    }
}

impl std::str::FromStr for IdentityFrom {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "cn" => Ok(Self::Cn),
            "san-dns" => Ok(Self::SanDns),
            "san-uri" => Ok(Self::SanUri),
            _ => Err(ParseError("must be cn, san-dns or san-uri")),
        }
    }
}

/// Why a config value's text does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError(pub &'static str);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl From<ParseError> for crate::storage::StorageError {
    fn from(e: ParseError) -> Self {
        crate::storage::StorageError::InvalidConfig(e.0)
    }
}

/// `[acl]`: who may do what to which topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Off: every identity may do everything. On: only what a rule allows.
    pub enabled: bool,
    pub rules: Vec<AclRule>,
}

/// `[[acl.rules]]`: allows `operations` on `topics` to `identity`. Names
/// are exact, or globs where `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub identity: String,
    /// Topic names, or group names for the `group` operation.
    pub topics: Vec<String>,
    pub operations: Vec<String>,
}

/// The operations an ACL rule may name, in the order docs list them.
pub const ACL_OPERATIONS: [&str; 8] = [
    "produce", "consume", "create", "delete", "alter", "describe", "group", "mirror",
];

/// `[quotas]`: limits per identity and per source address. 0 = no limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasConfig {
    /// Produce bytes per second per identity (over all its connections).
    pub produce_bytes_per_s: u64,
    /// Fetched bytes per second per identity.
    pub consume_bytes_per_s: u64,
    pub max_connections_per_identity: u32,
    /// Per source IP address, TCP and TLS.
    pub max_connections_per_ip: u32,
    /// New TCP and TLS connections accepted per second per source IP.
    pub connection_rate_per_ip: u32,
    /// Per-identity quotas that differ from the ones above.
    pub overrides: Vec<QuotaOverride>,
}

/// `[[quotas.overrides]]`: byte rates for the identities `identity` (exact
/// or glob) matches; the first matching override wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverride {
    pub identity: String,
    pub produce_bytes_per_s: u64,
    pub consume_bytes_per_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(with = "as_text")]
    pub backend: StorageBackend,
    pub append_queue_depth: u32,
    /// Aligned in-memory tail per partition.
    pub tail_buffer_bytes: u64,
    pub max_batch_bytes: u64,
    /// Zero each new segment once, in the background, so its first writes
    /// do not convert unwritten extents (a journal commit per fdatasync).
    pub prewrite_segments: bool,
    /// Write the next group while a group's fdatasync runs, instead of
    /// fdatasyncing on the storage thread.
    pub pipelined_fsync: bool,
    /// How long an fdatasync may wait to gather a fan-in's records; 0: never.
    pub fanin_wait_ms: u64,
    /// Disk all topics' rings may reserve together; bounds the memory of
    /// their segment tables and sparse indexes too.
    pub disk_budget_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDefaults {
    pub partitions: u32,
    pub segment_bytes: u64,
    pub segments: u32,
    /// 0 = size retention only.
    pub retention_ms: u64,
    #[serde(with = "as_text")]
    pub fsync: FsyncPolicy,
    #[serde(with = "as_text")]
    pub overflow: OverflowPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducersConfig {
    /// Capacity of the fixed producer table.
    pub max_producers: u32,
    pub idle_expiry_ms: u64,
    /// A plain producer name (not a transactional id's) unused this long
    /// is forgotten.
    pub name_expiry_ms: u64,
}

/// Consumer groups: the coordinator's limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsSection {
    /// Committed offsets of a group without members expire this long after
    /// it emptied (or after their last commit, if later).
    pub offsets_retention_ms: u64,
    /// The session timeouts a member may ask for.
    pub session_timeout_ms_min: u32,
    pub session_timeout_ms_max: u32,
    pub max_groups: u32,
    /// Members over all groups together: what the budget counts them by.
    pub max_members: u32,
    /// One group's share of `max_members`.
    pub max_members_per_group: u32,
    /// The longest metadata a committed offset may carry: kept in memory
    /// with every offset of every group, so the budget counts it for each.
    pub max_offset_metadata_bytes: u32,
}

/// The most records a share partition keeps in flight: its snapshot in
/// `__skiff_share` (some 8 bytes a record) stays well inside one batch.
pub const SHARE_IN_FLIGHT_RECORDS_LIMIT: u32 = 4096;
/// Delivery counts travel as u16 in the share log.
pub const SHARE_MAX_DELIVERIES_LIMIT: u32 = 1000;
pub const SHARE_LOCK_MS_MAX: u64 = 3_600_000;
pub const SHARE_ACTIVE_MEMBERS_LIMIT: u32 = 65_536;

/// `[share]`: share groups (queues) and their dead-letter topics
/// (docs/queues.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSection {
    /// Deliveries after which a released or expired record goes to the
    /// dead-letter topic.
    pub max_deliveries: u32,
    /// How long an acquired record stays locked to its worker.
    pub lock_ms: u64,
    /// Per share partition: records between the first not yet done and
    /// the next never delivered. One stuck record holds back at most
    /// this many behind it.
    pub max_in_flight_records: u32,
    /// A topic's dead-letter topic is its name and this suffix.
    pub dead_letter_suffix: String,
    /// Share partitions (group, topic, partition) the broker keeps.
    pub max_share_partitions: u32,
    /// (group, member) pairs counted active at once, over all share
    /// groups: member ids come from clients, so the table needs a bound.
    pub max_active_members: u32,
    /// Settings for one topic, one group, or one group on one topic.
    pub overrides: Vec<ShareOverride>,
}

/// `[[share.overrides]]`: the most specific entry matching a share group
/// and topic wins (group and topic, then group, then topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliveries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// `[transactions]`: the transaction coordinator's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionsSection {
    /// The longest `transaction_timeout_ms` a producer may ask for.
    pub max_timeout_ms: u64,
    /// Transactional ids the coordinator keeps.
    pub max_transactional_ids: u32,
    /// Transactions open at once over all ids: what holds partitions and
    /// offsets, so the budget counts it, not the ids.
    pub max_open: u32,
    /// An id with no transaction open and unused this long is forgotten,
    /// freeing its slot of `max_transactional_ids`.
    pub id_expiration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// HTTP listen address for /metrics, /health, /ready; "" = off.
    pub listen: String,
}

/// `[mirror]`: the store-and-forward link to a central Kafka cluster.
/// Off while `upstream` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Bootstrap servers, `host:port`, comma separated; "" = mirror off.
    pub upstream: String,
    /// Stable per gateway; "" = the host name.
    pub transactional_id: String,
    /// Upstream, compacted; created if missing.
    pub checkpoint_topic: String,
    /// Upstream record batch compression: none | lz4 | zstd.
    pub compression: String,
    /// Source bytes (about) read and sent per round; a transaction is one
    /// round, or more while a backlog lasts (up to 1 s).
    pub batch_bytes: u64,
    /// How long to wait for more records before a transaction that is not
    /// full is sent.
    pub linger_ms: u64,
    /// How a record's upstream partition is chosen: murmur2 | source.
    pub partitioner: String,
    /// Create a missing target topic (with the source's partition count)
    /// instead of reporting it.
    pub create_topics: bool,
    pub connect_timeout_ms: u64,
    /// Past it, a request's outcome is unknown: the producer is
    /// re-initialised.
    pub request_timeout_ms: u64,
    /// The first pause after a failure; it doubles up to `backoff_max_ms`.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// A token bucket over the bytes sent upstream (record batches before
    /// compression, checkpoints included); 0 = no cap.
    pub max_bytes_per_s: u64,
    /// While rules of higher priority have a backlog, each rule with a
    /// backlog still gets this part of every round.
    pub min_share_percent: u64,
    pub rules: Vec<MirrorRule>,
    pub tls: MirrorTls,
    pub sasl: MirrorSasl,
}

/// `[[mirror.rules]]`: forward local topics matching `source` to `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorRule {
    /// Names the rule in `skiff mirror status|pause|resume`.
    pub name: String,
    /// A topic name, or a glob where `*` matches any run of characters.
    pub source: String,
    /// A fixed upstream topic, or a template where `{topic}` is the
    /// source topic's name.
    pub target: String,
    /// What a full ring of records not yet upstream does: `block` (produce
    /// gets `upstream_backlog_full`) or `drop-oldest` (counted drops).
    /// Optional in a rule, so the default lives here.
    #[serde(default = "default_mirror_overflow")]
    pub mirror_overflow: String,
    /// Higher goes first while there is a backlog (0..=100; optional in a
    /// rule, so the default, 0, lives here).
    #[serde(default)]
    pub priority: i64,
    /// Tumbling-window aggregates per key instead of the records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<MirrorAggregate>,
}

fn default_mirror_overflow() -> String {
    "block".to_owned()
}

/// A rule's `aggregate = { window_ms, lateness_ms, fields, max_open_windows }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorAggregate {
    pub window_ms: u64,
    /// How far behind the newest timestamp a window stays open.
    #[serde(default)]
    pub lateness_ms: u64,
    /// Numeric fields of JSON objects or CBOR maps; `value` for bare numbers.
    pub fields: Vec<String>,
    /// Per source partition; past it the oldest windows close early.
    #[serde(default = "default_max_open_windows")]
    pub max_open_windows: u64,
}

fn default_max_open_windows() -> u64 {
    10_000
}

/// Limits on a rule's `aggregate` (a week of window or lateness).
pub const AGGREGATE_MS_MAX: u64 = 7 * 24 * 3_600_000;
pub const AGGREGATE_FIELDS_MAX: usize = 64;
pub const AGGREGATE_OPEN_WINDOWS_MAX: u64 = 1_000_000;

impl MirrorAggregate {
    fn validate(&self, rule: &str) -> Result<(), Invalid> {
        let in_rule = |(k, r): Invalid| (k, format!("rule '{rule}': {r}"));
        check_range(
            "mirror.rules.aggregate.window_ms",
            self.window_ms,
            1,
            AGGREGATE_MS_MAX,
        )
        .map_err(in_rule)?;
        check_range(
            "mirror.rules.aggregate.lateness_ms",
            self.lateness_ms,
            0,
            AGGREGATE_MS_MAX,
        )
        .map_err(in_rule)?;
        check_range(
            "mirror.rules.aggregate.max_open_windows",
            self.max_open_windows,
            1,
            AGGREGATE_OPEN_WINDOWS_MAX,
        )
        .map_err(in_rule)?;
        let key = "mirror.rules.aggregate.fields";
        check(!self.fields.is_empty(), key, || {
            format!("rule '{rule}': name at least one field")
        })?;
        check(self.fields.len() <= AGGREGATE_FIELDS_MAX, key, || {
            format!("rule '{rule}': at most {AGGREGATE_FIELDS_MAX} fields")
        })?;
        let mut seen = std::collections::HashSet::new();
        for f in &self.fields {
            check(!f.is_empty(), key, || {
                format!("rule '{rule}': a field name is empty")
            })?;
            check(seen.insert(f), key, || {
                format!("rule '{rule}': field '{f}' is named twice")
            })?;
        }
        Ok(())
    }
}

/// `[mirror.tls]`: TLS to the upstream brokers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorTls {
    pub enabled: bool,
    /// CA certificates, PEM; "" = the system's store.
    pub ca: String,
    /// Client certificate chain and key, PEM, for mutual TLS.
    pub cert: String,
    pub key: String,
    /// The name to check the broker's certificate against; "" = its host.
    pub server_name: String,
}

/// `[mirror.sasl]`: SASL authentication to the upstream brokers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSasl {
    /// "" = none; PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512.
    pub mechanism: String,
    pub username: String,
    pub password: String,
}

/// Upstream limits on what the mirror may be configured with.
pub const MIRROR_BATCH_BYTES_MIN: u64 = 1024;
pub const MIRROR_BATCH_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A cap below this would send a few records a second.
pub const MIRROR_MAX_BYTES_PER_S_MIN: u64 = 1024;
pub const MIRROR_MAX_BYTES_PER_S_MAX: u64 = 1 << 40;
pub const MIRROR_PRIORITY_MAX: i64 = 100;
/// Above half, a lower priority would get as much as a higher one.
pub const MIRROR_MIN_SHARE_PERCENT_MAX: u64 = 50;
/// Kafka's longest topic name.
pub const KAFKA_TOPIC_NAME_BYTES_MAX: usize = 249;

/// Whether `name` is a topic name Kafka accepts: ASCII letters, digits,
/// `.`, `_` and `-`, at most 249 of them, not `.` or `..`.
pub fn is_kafka_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= KAFKA_TOPIC_NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl MirrorConfig {
    /// Whether the mirror runs.
    pub fn enabled(&self) -> bool {
        !self.upstream.is_empty()
    }

    fn validate(&self) -> Result<(), Invalid> {
        if !self.upstream.is_empty() {
            crate::mirror::kafka::parse_bootstrap(&self.upstream)
                .map_err(|e| ("mirror.upstream", e.to_string()))?;
        }
        check(
            self.rules.is_empty() || self.enabled(),
            "mirror.upstream",
            || "[[mirror.rules]] are set but mirror.upstream is empty".into(),
        )?;
        check(
            is_kafka_topic_name(&self.checkpoint_topic),
            "mirror.checkpoint_topic",
            || {
                format!(
                    "'{}' is not a Kafka topic name (letters, digits, '.', '_', '-'; at most {KAFKA_TOPIC_NAME_BYTES_MAX})",
                    self.checkpoint_topic
                )
            },
        )?;
        check(
            self.transactional_id.len() <= 1024 && !self.transactional_id.contains('/'),
            "mirror.transactional_id",
            || "must be at most 1024 bytes and contain no '/' (checkpoint keys use it)".into(),
        )?;
        check(
            self.compression
                .parse::<crate::mirror::kafka::Compression>()
                .is_ok(),
            "mirror.compression",
            || format!("'{}' must be none, lz4 or zstd", self.compression),
        )?;
        check(
            matches!(self.partitioner.as_str(), "murmur2" | "source"),
            "mirror.partitioner",
            || format!("'{}' must be murmur2 or source", self.partitioner),
        )?;
        check_range(
            "mirror.batch_bytes",
            self.batch_bytes,
            MIRROR_BATCH_BYTES_MIN,
            MIRROR_BATCH_BYTES_MAX,
        )?;
        check_range("mirror.linger_ms", self.linger_ms, 0, 60_000)?;
        check_range(
            "mirror.connect_timeout_ms",
            self.connect_timeout_ms,
            100,
            600_000,
        )?;
        check_range(
            "mirror.request_timeout_ms",
            self.request_timeout_ms,
            100,
            600_000,
        )?;
        check_range("mirror.backoff_min_ms", self.backoff_min_ms, 1, 3_600_000)?;
        check_range(
            "mirror.backoff_max_ms",
            self.backoff_max_ms,
            self.backoff_min_ms,
            3_600_000,
        )
        .map_err(|(k, r)| (k, format!("{r}: at least mirror.backoff_min_ms")))?;
        if self.max_bytes_per_s != 0 {
            check_range(
                "mirror.max_bytes_per_s",
                self.max_bytes_per_s,
                MIRROR_MAX_BYTES_PER_S_MIN,
                MIRROR_MAX_BYTES_PER_S_MAX,
            )
            .map_err(|(k, r)| (k, format!("{r} (or 0 for no cap)")))?;
        }
        check_range(
            "mirror.min_share_percent",
            self.min_share_percent,
            1,
            MIRROR_MIN_SHARE_PERCENT_MAX,
        )?;
        self.validate_rules().map_err(|(_, e)| e)?;
        let tls = &self.tls;
        check(
            tls.cert.is_empty() == tls.key.is_empty(),
            "mirror.tls.key",
            || "mirror.tls.cert and mirror.tls.key go together".into(),
        )?;
        let sasl = &self.sasl;
        if !sasl.mechanism.is_empty() {
            check(
                sasl.mechanism
                    .parse::<crate::mirror::kafka::SaslMechanism>()
                    .is_ok(),
                "mirror.sasl.mechanism",
                || {
                    format!(
                        "'{}' must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (or \"\" for none)",
                        sasl.mechanism
                    )
                },
            )?;
            check(!sasl.username.is_empty(), "mirror.sasl.username", || {
                "SASL needs a username".into()
            })?;
        }
        Ok(())
    }

    /// Checks each rule in turn; the first that fails comes with its index,
    /// for the error's line (every rule's keys are named alike).
    fn validate_rules(&self) -> Result<(), (usize, Invalid)> {
        let mut names = std::collections::HashSet::new();
        check_each(&self.rules, |rule| rule.validate(&mut names))
    }
}

impl MirrorRule {
    /// `names`: those of the rules before it, which it must not repeat.
    fn validate<'a>(
        &'a self,
        names: &mut std::collections::HashSet<&'a str>,
    ) -> Result<(), Invalid> {
        check(!self.name.is_empty(), "mirror.rules", || {
            "a rule needs a name".into()
        })?;
        check(names.insert(self.name.as_str()), "mirror.rules", || {
            format!("two rules are named '{}'", self.name)
        })?;
        check(!self.source.is_empty(), "mirror.rules", || {
            format!("rule '{}' has an empty source", self.name)
        })?;
        check(
            matches!(self.mirror_overflow.as_str(), "block" | "drop-oldest"),
            "mirror.rules",
            || {
                format!(
                    "rule '{}': mirror_overflow '{}' must be block or drop-oldest",
                    self.name, self.mirror_overflow
                )
            },
        )?;
        check(
            (0..=MIRROR_PRIORITY_MAX).contains(&self.priority),
            "mirror.rules",
            || {
                format!(
                    "rule '{}': priority {} is out of range 0..={MIRROR_PRIORITY_MAX}",
                    self.name, self.priority
                )
            },
        )?;
        if let Some(agg) = &self.aggregate {
            agg.validate(&self.name)?;
        }
        let sample = self.target.replace("{topic}", "t");
        check(is_kafka_topic_name(&sample), "mirror.rules", || {
            format!(
                "rule '{}': target '{}' is not a Kafka topic name or a template with {{topic}}",
                self.name, self.target
            )
        })?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// env_logger filter (`info`, `warn,skiff::storage=debug`); RUST_LOG wins.
    pub level: String,
}

/// `storage.backend`, `topic_defaults.fsync` and `topic_defaults.overflow`
/// are the storage engine's own types, written in TOML as their text
/// (`"auto"`, `"interval:5"`, `"reject"`): one parser for config files,
/// the wire and the CLI.
pub use crate::storage::{
    BackendChoice as StorageBackend, Durability as FsyncPolicy, OverflowPolicy,
};

/// Serde for types whose config form is their `Display`/`FromStr` text.
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::storage::StorageError;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// A bad value's error is storage's own sentence about it (one text
    /// for config files, the wire and the command line).
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        StorageError: From<T::Err>,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e| match StorageError::from(e) {
            StorageError::InvalidConfig(why) => {
                serde::de::Error::custom(format!("'{text}': {why}"))
            }
            e => serde::de::Error::custom(format!("'{text}': {e}")),
        })
    }
}

impl ShareSection {
    fn validate(&self) -> Result<(), Invalid> {
        check_range(
            "share.max_deliveries",
            self.max_deliveries,
            1,
            SHARE_MAX_DELIVERIES_LIMIT,
        )?;
        check_range("share.lock_ms", self.lock_ms, 1, SHARE_LOCK_MS_MAX)?;
        check_range(
            "share.max_in_flight_records",
            self.max_in_flight_records,
            1,
            SHARE_IN_FLIGHT_RECORDS_LIMIT,
        )?;
        check(
            !self.dead_letter_suffix.is_empty(),
            "share.dead_letter_suffix",
            || "must not be empty (a topic would be its own dead-letter topic)".into(),
        )?;
        check_range(
            "share.max_share_partitions",
            self.max_share_partitions,
            1,
            SHARE_PARTITIONS_LIMIT,
        )?;
        check_range(
            "share.max_active_members",
            self.max_active_members,
            1,
            SHARE_ACTIVE_MEMBERS_LIMIT,
        )?;
        check_each(&self.overrides, ShareOverride::validate).map_err(|(_, e)| e)
    }
}

impl ShareOverride {
    fn validate(&self) -> Result<(), Invalid> {
        check(
            self.topic.is_some() || self.group.is_some(),
            "share.overrides",
            || "an override names a topic, a group, or both".into(),
        )?;
        if let Some(m) = self.max_deliveries {
            check_range(
                "share.overrides.max_deliveries",
                m,
                1,
                SHARE_MAX_DELIVERIES_LIMIT,
            )?;
        }
        if let Some(l) = self.lock_ms {
            check_range("share.overrides.lock_ms", l, 1, SHARE_LOCK_MS_MAX)?;
        }
        if let Some(t) = &self.dead_letter_topic {
            check(
                crate::storage::validate_topic_name(t).is_ok(),
                "share.overrides.dead_letter_topic",
                || format!("'{t}' is not a valid topic name"),
            )?;
        }
        Ok(())
    }
}

impl AclRule {
    fn validate(&self) -> Result<(), Invalid> {
        check_identity("acl.rules", &self.identity)?;
        check(!self.topics.is_empty(), "acl.rules", || {
            format!("the rule for '{}' names no topics", self.identity)
        })?;
        check(!self.operations.is_empty(), "acl.rules", || {
            format!("the rule for '{}' names no operations", self.identity)
        })?;
        for op in &self.operations {
            check(ACL_OPERATIONS.contains(&op.as_str()), "acl.rules", || {
                format!(
                    "'{op}' (rule for '{}') is not an operation: {}",
                    self.identity,
                    ACL_OPERATIONS.join(", ")
                )
            })?;
        }
        Ok(())
    }
}

/// Checks each element of a list of tables in turn; the first that fails
/// comes with its index, for the error's line (every element's keys are
/// named alike).
fn check_each<'a, T>(
    items: &'a [T],
    mut validate: impl FnMut(&'a T) -> Result<(), Invalid>,
) -> Result<(), (usize, Invalid)> {
    items
        .iter()
        .enumerate()
        .try_for_each(|(i, item)| validate(item).map_err(|e| (i, e)))
}

type ListCheck = fn(&Config) -> Result<(), (usize, Invalid)>;

/// The config's lists of tables (`[[...]]`) and their checks, element by
/// element.
const LISTS_OF_TABLES: [(&str, ListCheck); 5] = [
    ("server.unix_identities", |c| {
        check_each(&c.server.unix_identities, |u| {
            check_identity("server.unix_identities", &u.identity)
        })
    }),
    ("acl.rules", |c| check_each(&c.acl.rules, AclRule::validate)),
    ("quotas.overrides", |c| {
        check_each(&c.quotas.overrides, |o| {
            check_identity("quotas.overrides", &o.identity)
        })
    }),
    ("mirror.rules", |c| c.mirror.validate_rules()),
    ("share.overrides", |c| {
        check_each(&c.share.overrides, ShareOverride::validate)
    }),
];

/// Share partitions live in memory with their windows; the share log's
/// rewrite of them all must fit a quarter of its ring.
pub const SHARE_PARTITIONS_LIMIT: u32 = 1024;

const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A validation failure: the dotted key and why.
pub type Invalid = (&'static str, String);

fn check(ok: bool, key: &'static str, reason: impl FnOnce() -> String) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err((key, reason()))
    }
}

fn check_addr(key: &'static str, value: &str) -> Result<Option<SocketAddr>, Invalid> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse::<SocketAddr>().map(Some).map_err(|_| {
        (
            key,
            format!("'{value}' is not an IP:PORT socket address (names are not resolved)"),
        )
    })
}

fn check_identity(key: &'static str, identity: &str) -> Result<(), Invalid> {
    check(!identity.is_empty(), key, || {
        "an identity must not be empty".into()
    })
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<(), Invalid> {
    check(value >= min && value <= max, key, || {
        format!("{value} is out of range {min}..={max}")
    })
}

fn check_aligned(key: &'static str, value: u64) -> Result<(), Invalid> {
    check(value % BLOCK_BYTES == 0, key, || {
        format!("{value} is not a multiple of {BLOCK_BYTES} (the O_DIRECT block)")
    })
}

impl Config {
    /// Checks beyond types: ranges, alignment, relations between keys.
    /// Returns the first failure with the dotted key it concerns.
    pub fn validate(&self) -> Result<(), Invalid> {
        let s = &self.server;
        let st = &self.storage;
        let t = &self.topic_defaults;

        check(!self.data_dir.as_os_str().is_empty(), "data_dir", || {
            "must not be empty".to_string()
        })?;

        let tcp = check_addr("server.listen", &s.listen)?;
        let tls = check_addr("server.tls.listen", &s.tls.listen)?;
        check(
            tcp.is_some() || tls.is_some() || !s.unix_socket.is_empty(),
            "server.listen",
            || {
                "server.listen, server.tls.listen and server.unix_socket are all empty: no way to reach skiff".into()
            },
        )?;
        if tls.is_some() {
            check(
                tls != tcp || tls.is_some_and(|a| a.port() == 0),
                "server.tls.listen",
                || format!("'{}' is also server.listen", s.tls.listen),
            )?;
            check(!s.tls.cert.is_empty(), "server.tls.cert", || {
                "must name the certificate chain (PEM) when server.tls.listen is set".into()
            })?;
            check(!s.tls.key.is_empty(), "server.tls.key", || {
                "must name the private key (PEM) when server.tls.listen is set".into()
            })?;
        }
        check(
            s.tls.crl.is_empty() || !s.tls.client_ca.is_empty(),
            "server.tls.crl",
            || "a CRL needs server.tls.client_ca (it revokes client certificates)".into(),
        )?;
        // Mirror rules and share overrides are checked with their sections.
        for (list, validate) in &LISTS_OF_TABLES {
            if !matches!(*list, "mirror.rules" | "share.overrides") {
                validate(self).map_err(|(_, e)| e)?;
            }
        }
        check_range(
            "server.max_connections",
            s.max_connections,
            1,
            MAX_CONNECTIONS_LIMIT,
        )?;
        check_range(
            "server.tls.handshake_timeout_ms",
            s.tls.handshake_timeout_ms,
            100,
            600_000,
        )?;
        check_range(
            "server.frame_timeout_ms",
            s.frame_timeout_ms,
            100,
            3_600_000,
        )?;
        check_range(
            "storage.max_batch_bytes",
            st.max_batch_bytes,
            MAX_BATCH_BYTES_MIN,
            MAX_FRAME_BYTES_LIMIT - FRAME_OVERHEAD_BYTES_MIN,
        )?;
        check_range(
            "server.max_frame_bytes",
            s.max_frame_bytes,
            st.max_batch_bytes + FRAME_OVERHEAD_BYTES_MIN,
            MAX_FRAME_BYTES_LIMIT,
        )
        .map_err(|(k, r)| {
            (
                k,
                format!(
                    "{r}: a frame must hold storage.max_batch_bytes + {FRAME_OVERHEAD_BYTES_MIN}"
                ),
            )
        })?;
        check_range(
            "server.max_inflight_bytes_per_connection",
            s.max_inflight_bytes_per_connection,
            0,
            MAX_INFLIGHT_BYTES_PER_CONNECTION_LIMIT,
        )?;
        check(
            s.max_inflight_bytes_per_connection >= s.max_frame_bytes,
            "server.max_inflight_bytes_per_connection",
            || {
                format!(
                    "{} is less than server.max_frame_bytes ({}): one frame must fit",
                    s.max_inflight_bytes_per_connection, s.max_frame_bytes
                )
            },
        )?;
        check_range(
            "server.max_inflight_bytes_shared",
            s.max_inflight_bytes_shared,
            0,
            MAX_INFLIGHT_BYTES_SHARED_LIMIT,
        )?;
        check_range("server.max_topics", s.max_topics, 1, MAX_TOPICS_LIMIT)?;
        // Two checks, not a range from max_topics: each bound has its own
        // reason, and a range of 65536..=65536 explained neither.
        check(
            s.max_partitions <= MAX_PARTITIONS_LIMIT,
            "server.max_partitions",
            || {
                format!(
                    "{} is more than {MAX_PARTITIONS_LIMIT}, the most partitions a broker holds",
                    s.max_partitions
                )
            },
        )?;
        check(
            s.max_partitions >= s.max_topics,
            "server.max_partitions",
            || {
                format!(
                    "{} is less than server.max_topics ({}): every topic has at least one partition",
                    s.max_partitions, s.max_topics
                )
            },
        )?;

        check_range(
            "storage.append_queue_depth",
            st.append_queue_depth,
            1,
            APPEND_QUEUE_DEPTH_MAX,
        )?;
        // A wait is added to fan-in acks: a second would be a stall.
        check_range("storage.fanin_wait_ms", st.fanin_wait_ms, 0, 1000)?;
        check_aligned("storage.tail_buffer_bytes", st.tail_buffer_bytes)?;
        check_range(
            "storage.tail_buffer_bytes",
            st.tail_buffer_bytes,
            0,
            TAIL_BUFFER_BYTES_LIMIT,
        )?;
        // Room for one key: a smaller map holds none.
        check_range(
            "compaction.key_map_bytes",
            self.compaction.key_map_bytes,
            crate::broker::cleaner::KEY_MAP_ENTRY_BYTES,
            KEY_MAP_BYTES_LIMIT,
        )?;
        check(
            st.tail_buffer_bytes >= st.max_batch_bytes,
            "storage.tail_buffer_bytes",
            || {
                format!(
                    "{} is less than storage.max_batch_bytes ({}): a tail must hold one whole batch",
                    st.tail_buffer_bytes, st.max_batch_bytes
                )
            },
        )?;
        check(
            st.tail_buffer_bytes >= BLOCK_BYTES,
            "storage.tail_buffer_bytes",
            || {
                format!(
                    "{} is less than one block ({BLOCK_BYTES})",
                    st.tail_buffer_bytes
                )
            },
        )?;

        check_range(
            "topic_defaults.partitions",
            t.partitions,
            1,
            s.max_partitions,
        )?;
        check_aligned("topic_defaults.segment_bytes", t.segment_bytes)?;
        check_range(
            "topic_defaults.segment_bytes",
            t.segment_bytes,
            SEGMENT_BYTES_MIN,
            SEGMENT_BYTES_MAX,
        )?;
        check(
            t.segment_bytes >= st.max_batch_bytes + BLOCK_BYTES,
            "topic_defaults.segment_bytes",
            || {
                format!(
                    "{} cannot hold one storage.max_batch_bytes batch ({}) plus a segment header block",
                    t.segment_bytes, st.max_batch_bytes
                )
            },
        )?;
        check_range(
            "topic_defaults.segments",
            t.segments,
            SEGMENTS_MIN,
            SEGMENTS_MAX,
        )?;

        check_range(
            "producers.max_producers",
            self.producers.max_producers,
            1,
            MAX_PRODUCERS_LIMIT,
        )?;
        check(
            self.producers.idle_expiry_ms > 0,
            "producers.idle_expiry_ms",
            || "must be > 0 (an expiry of 0 would forget every producer at once)".into(),
        )?;
        check_range(
            "producers.name_expiry_ms",
            self.producers.name_expiry_ms,
            1_000,
            TXN_ID_EXPIRATION_MS_MAX,
        )?;

        let g = &self.groups;
        check(
            g.offsets_retention_ms > 0,
            "groups.offsets_retention_ms",
            || "must be > 0 (0 would expire every group's offsets at once)".into(),
        )?;
        check_range(
            "groups.session_timeout_ms_min",
            g.session_timeout_ms_min,
            100,
            g.session_timeout_ms_max,
        )?;
        check_range(
            "groups.session_timeout_ms_max",
            g.session_timeout_ms_max,
            g.session_timeout_ms_min,
            3_600_000,
        )?;
        check_range("groups.max_groups", g.max_groups, 1, GROUPS_MAX_LIMIT)?;
        check_range(
            "groups.max_members",
            g.max_members,
            1,
            GROUP_MEMBERS_TOTAL_MAX_LIMIT,
        )?;
        check_range(
            "groups.max_members_per_group",
            g.max_members_per_group,
            1,
            GROUP_MEMBERS_MAX_LIMIT,
        )?;
        check_range(
            "groups.max_offset_metadata_bytes",
            g.max_offset_metadata_bytes,
            0,
            crate::broker::group::OFFSET_METADATA_BYTES_MAX as u32,
        )?;

        check_range(
            "transactions.max_timeout_ms",
            self.transactions.max_timeout_ms,
            1_000,
            86_400_000,
        )?;
        check_range(
            "transactions.max_transactional_ids",
            self.transactions.max_transactional_ids,
            1,
            TRANSACTIONAL_IDS_MAX_LIMIT,
        )?;
        check_range(
            "transactions.max_open",
            self.transactions.max_open,
            1,
            self.transactions.max_transactional_ids,
        )?;
        check_range(
            "transactions.id_expiration_ms",
            self.transactions.id_expiration_ms,
            1_000,
            TXN_ID_EXPIRATION_MS_MAX,
        )?;

        let metrics = check_addr("metrics.listen", &self.metrics.listen)?;
        check(
            // Port 0 twice is two free ports, not a clash.
            metrics.is_none() || metrics != tcp || metrics.is_some_and(|a| a.port() == 0),
            "metrics.listen",
            || format!("'{}' is also server.listen", self.metrics.listen),
        )?;

        for directive in self.log.level.split(',').map(str::trim) {
            let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
            check(
                LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()),
                "log.level",
                || {
                    format!(
                        "'{directive}' is not a level ({}) or module=level",
                        LOG_LEVELS.join(", ")
                    )
                },
            )?;
        }
        self.mirror.validate()?;
        self.share.validate()?;
        self.check_topic_slots()?;
        // After [share]: the share log's size follows from it.
        self.check_disk_budget()
    }

    /// The topic and partition limits hold one topic of the topic_defaults
    /// and the broker's own topics, whose slots are kept for them from
    /// the start, as their disk is.
    fn check_topic_slots(&self) -> Result<(), Invalid> {
        let own: Vec<&str> = crate::broker::internal_topics_disk(self)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let kept = own.len() as u32;
        let kept_partitions = kept * crate::broker::INTERNAL_TOPIC_PARTITIONS;
        let (s, t) = (&self.server, &self.topic_defaults);
        check(s.max_topics > kept, "server.max_topics", || {
            format!(
                    "{} leaves no room for a topic: {kept} are kept for the broker's own topics ({}); at least {}",
                    s.max_topics,
                    own.join(", "),
                    1 + kept
                )
        })?;
        check(
            s.max_partitions >= t.partitions.saturating_add(kept_partitions),
            "server.max_partitions",
            || {
                format!(
                    "{} is less than one topic of the topic_defaults ({} partitions) and the {kept_partitions} kept for the broker's own topics ({})",
                    s.max_partitions,
                    t.partitions,
                    own.join(", ")
                )
            },
        )
    }

    /// The disk budget holds one topic of the topic_defaults and the
    /// broker's own topics, whose disk is kept for them from the start.
    fn check_disk_budget(&self) -> Result<(), Invalid> {
        let t = &self.topic_defaults;
        let default_topic = u64::from(t.partitions)
            .saturating_mul(u64::from(t.segments))
            .saturating_mul(t.segment_bytes);
        let disk = super::DiskBudget::of(self);
        let (internal, internal_bytes) = (&disk.internal, disk.internal_bytes());
        check(
            self.storage.disk_budget_bytes >= default_topic.saturating_add(internal_bytes),
            "storage.disk_budget_bytes",
            || {
                let each: Vec<String> = internal.iter().map(|(n, b)| format!("{n} {b}")).collect();
                format!(
                    "{} is less than one topic of the topic_defaults ({default_topic}: partitions x segments x segment_bytes) and the broker's own topics, kept for group offsets, transactions and share groups ({internal_bytes}: {})",
                    self.storage.disk_budget_bytes,
                    each.join(", ")
                )
            },
        )
    }

    /// `topic_defaults.retention_ms` as a time retention; None = size only.
    pub fn default_retention(&self) -> Option<Duration> {
        match self.topic_defaults.retention_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The TCP listen address, None when TCP is disabled. Validated on load.
    pub fn tcp_listen(&self) -> Option<SocketAddr> {
        self.server.listen.parse().ok()
    }

    /// The TLS listen address, None when TLS is off. Validated on load.
    pub fn tls_listen(&self) -> Option<SocketAddr> {
        self.server.tls.listen.parse().ok()
    }

    /// The unix socket path, None when disabled.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        (!self.server.unix_socket.is_empty()).then(|| PathBuf::from(&self.server.unix_socket))
    }

    /// The list of tables a validation error about `key` is in, and the
    /// index of its element that failed: every element's keys are named
    /// alike (`acl.rules`), so this is what finds the error's line.
    pub(crate) fn failed_element(&self, key: &str) -> Option<(&'static str, usize)> {
        LISTS_OF_TABLES.iter().find_map(|&(list, validate)| {
            let rest = key.strip_prefix(list)?;
            if !(rest.is_empty() || rest.starts_with('.')) {
                return None;
            }
            validate(self).err().map(|(i, _)| (list, i))
        })
    }

    /// The metrics listen address, None when the endpoint is off.
    pub fn metrics_listen(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }
}
