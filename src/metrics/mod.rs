//! Counters, gauges and histograms, and the HTTP endpoint that serves them.
//!
//! Every family lives in one [`Metrics`] (an `Arc` shared by the sessions,
//! the storage side, the group coordinator and the mirror). Recording is an
//! atomic add; the hot per-topic counters are reached through a
//! [`TopicMetrics`] handle the broker keeps per topic, so a produce does not
//! build a label set (and allocate) per batch.
//!
//! Label cardinality is bounded by the config: topics by
//! `server.max_topics`, partitions by `server.max_partitions`, request kinds
//! by the protocol's request types. [`Metrics::remove_topic`] drops a
//! deleted topic's series.
//!
//! Names (all prefixed `skiff_`; counters get `_total` from the encoder):
//!
//! | family | type | labels |
//! |---|---|---|
//! | `produce_records`, `produce_bytes` | counter | topic |
//! | `fetch_records`, `fetch_bytes` | counter | topic |
//! | `request_duration_seconds` | histogram | kind |
//! | `storage_write_duration_seconds`, `storage_fsync_duration_seconds` | histogram | |
//! | `storage_fanin_wait_seconds` (a flush waiting for a fan-in's producers) | histogram | |
//! | `storage_device_bytes`, `storage_payload_bytes` | counter | |
//! | `storage_read_bytes` (fetch windows from the device) | counter | source: demand, ahead, ahead_unused |
//! | `group_lag_records` | gauge | group, topic, partition |
//! | `group_commits`, `group_offset_log_writes` | counter | |
//! | `dedup_hits` (retried batches not written again), `msg_id_duplicates` | counter | |
//! | `producer_table_entries`, `producer_evictions`, `producer_expirations` | gauge, counter | |
//! | `fenced_batches`, `out_of_order_batches` | counter | |
//! | `mirror_backlog_records`, `mirror_bytes_at_risk` | gauge | topic |
//! | `mirror_dropped_records` | counter | topic |
//! | `mirror_forwarded_records`, `mirror_forwarded_bytes` | counter | topic |
//! | `mirror_link_up` (1 up, 0 down) | gauge | |
//! | `mirror_aggregate_events` | counter | topic, event: late, malformed, window, window_closed_early |
//! | `mirror_transactions` | counter | outcome: commit, abort |
//! | `mirror_upstream_bytes` (what `max_bytes_per_s` caps), `mirror_throttled_seconds` | counter | |
//! | `mirror_rate_bytes_per_s` | gauge | rule |
//! | `connections` (open), `connections_accepted` | gauge, counter | listener |
//! | `connections_refused` (at accept, before any request is served) | counter | reason: max_connections, max_connections_per_ip, connection_rate_per_ip, max_connections_per_identity, no_peer_credentials |
//! | `connections_handshaking` (TLS handshakes in flight, each holding a `server.max_connections` slot) | gauge | |
//! | `tls_handshake_failures` | counter | |
//! | `connections_timed_out` (no TLS handshake or hello in time, or a frame stalled half-sent) | counter | |
//! | `malformed_frames` (not a request: too large, not CBOR, no request envelope; each closes its connection) | counter | |
//! | `inflight_shared_bytes` (produce bytes held past their connections' share), `inflight_shared_admits` | gauge, counter | |
//! | `recovery_truncated_bytes` | counter | |
//! | `recovery_quarantined_partitions` | gauge | |
//! | `storage_quarantined_partitions` (now: at start-up or since, until deleted) | gauge | |
//! | `recovery_deleted_leftovers`, `recovery_undeletable_leftovers` (partitions of deleted topics start-up deleted, or could not) | gauge | |
//! | `recovery_skipped_dirs` (partition directories whose metadata names another partition) | gauge | |
//! | `recovery_stale_batches_erased` | counter | |
//! | `recovery_damaged_offsets` | counter | |
//! | `build_info` | info | version |
//! | `txn_open`, `txn_aborted_ranges`, `txn_lso_lag_records` | gauge | (topic, partition for the lag) |
//! | `txn_commits`, `txn_aborts`, `txn_timeouts`, `txn_id_expirations` | counter | |
//! | `cleaner_runs`, `cleaner_passes`, `cleaner_read_bytes`, `cleaner_written_bytes`, `cleaner_removed_records`, `cleaner_freed_segments` | counter | |
//! | `cleaner_lag_bytes`, `cleaner_progress_bytes` | gauge | |
//! | `share_records_in_flight`, `share_records_acquired` | gauge | group, topic |
//! | `share_redeliveries`, `share_dead_lettered_records`, `share_records_lost`, `share_log_writes`, `share_fetch_partitions_skipped` | counter | |
//! | `dlq_records` (records held in a dead-letter topic) | gauge | topic |
//!
//! Write amplification is `storage_device_bytes_total /
//! storage_payload_bytes_total`: bytes the device was asked to write per
//! byte producers sent.

mod http;
mod share;
mod txn;

pub use http::{serve_http, serve_http_with, HttpLimits, CONTENT_TYPE_OPENMETRICS};
pub use share::{ShareCounters, ShareMetrics};
pub use txn::TxnCounters;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Request latency buckets: 50 µs doubling 16 times, to 1.6 s. A local
/// produce with fsync on SD sits in the milliseconds; anything past a
/// second is a stall worth seeing as its own bucket.
const REQUEST_BUCKET_START_SECONDS: f64 = 50e-6;
const REQUEST_BUCKETS: u16 = 16;
/// Storage write/fsync buckets: 20 µs (NVMe) doubling 16 times, to 0.65 s
/// (an SD card busy with garbage collection).
const STORAGE_BUCKET_START_SECONDS: f64 = 20e-6;
const STORAGE_BUCKETS: u16 = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicEventLabels {
    topic: Arc<str>,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabels {
    group: Arc<str>,
    topic: Arc<str>,
    partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Why a connection was refused at accept, before any request of it was
/// served: the limit's config key, or what the peer lacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `server.max_connections`.
    MaxConnections,
    /// `quotas.max_connections_per_ip`.
    MaxConnectionsPerIp,
    /// `quotas.connection_rate_per_ip`.
    ConnectionRatePerIp,
    /// `quotas.max_connections_per_identity`.
    MaxConnectionsPerIdentity,
    /// A Unix socket peer whose credentials (SO_PEERCRED) could not be read.
    NoPeerCredentials,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::MaxConnections,
        RefusalReason::MaxConnectionsPerIp,
        RefusalReason::ConnectionRatePerIp,
        RefusalReason::MaxConnectionsPerIdentity,
        RefusalReason::NoPeerCredentials,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::MaxConnections => "max_connections",
            RefusalReason::MaxConnectionsPerIp => "max_connections_per_ip",
            RefusalReason::ConnectionRatePerIp => "connection_rate_per_ip",
            RefusalReason::MaxConnectionsPerIdentity => "max_connections_per_identity",
            RefusalReason::NoPeerCredentials => "no_peer_credentials",
        }
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Tcp,
    Tls,
    Unix,
}

impl Listener {
    fn as_str(self) -> &'static str {
        match self {
            Listener::Tcp => "tcp",
            Listener::Tls => "tls",
            Listener::Unix => "unix",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        REQUEST_BUCKET_START_SECONDS,
        2.0,
        REQUEST_BUCKETS,
    ))
}

fn storage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        STORAGE_BUCKET_START_SECONDS,
        2.0,
        STORAGE_BUCKETS,
    ))
}

/// Cumulative producer-table counters, as the broker keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerCounters {
    pub entries: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub duplicate_batches: u64,
    pub msg_id_duplicates: u64,
    pub fenced: u64,
    pub out_of_order: u64,
}

/// Copies what other parts count into the metrics, at each read rather
/// than on a timer, which would wake an idle broker. Split by reader: a
/// liveness probe may poll `/health` many times a second, and pays only
/// for what it shows.
pub trait Refresh: Send + Sync {
    /// Before a `/metrics` scrape: group lag, share-group load, the
    /// coordinators' and the producer table's counters.
    fn scrape(&self, metrics: &Metrics);
    /// Before `/health`: its notes ([`Metrics::set_health_notes`]), and
    /// nothing else.
    fn health(&self, metrics: &Metrics);
}

/// Every metric skiff exports. Cheap to record into from any thread.
pub struct Metrics {
    registry: Registry,
    /// Lines `/health` adds after "ok": how this broker runs differently
    /// from the default (a storage fallback), said where an operator looks.
    health_notes: std::sync::Mutex<Vec<&'static str>>,
    /// Runs before each read (`encode`, `health_text`); see [`Refresh`].
    refresh: std::sync::OnceLock<Box<dyn Refresh>>,
    /// Each topic's four counters, resolved once: a produce answered per
    /// record (a device with one in flight) otherwise paid four family
    /// lookups and an `Arc<str>` for its topic label. Hashed with
    /// foldhash, as the broker's other per-record maps: SipHash was 1% of
    /// the broker's instructions in fan-in.
    topics: std::sync::RwLock<foldhash::HashMap<Arc<str>, TopicMetrics>>,
    /// Each request kind's histogram, resolved once (a handful of kinds,
    /// found by a scan faster than the family's hashed lookup).
    request_kinds: std::sync::RwLock<Vec<(&'static str, Histogram)>>,
    produce_records: Family<TopicLabels, Counter>,
    produce_bytes: Family<TopicLabels, Counter>,
    fetch_records: Family<TopicLabels, Counter>,
    fetch_bytes: Family<TopicLabels, Counter>,
    request_duration: HistogramFamily<KindLabels>,
    storage_write_duration: Histogram,
    storage_fsync_duration: Histogram,
    storage_fanin_wait: Histogram,
    storage_device_bytes: Counter,
    storage_payload_bytes: Counter,
    storage_read_bytes: Family<ReadLabels, Counter>,
    group_lag: Family<LagLabels, Gauge>,
    group_commits: Counter,
    group_offset_log_writes: Counter,
    /// The coordinator's last (commits, log writes) folded in above.
    groups_seen: std::sync::Mutex<(u64, u64)>,
    dedup_hits: Counter,
    producer_table_entries: Gauge,
    producer_evictions: Counter,
    producer_expirations: Counter,
    msg_id_duplicates: Counter,
    fenced_batches: Counter,
    out_of_order_batches: Counter,
    /// The last producer snapshot folded into the counters above.
    producers_seen: std::sync::Mutex<ProducerCounters>,
    mirror_backlog_records: Family<TopicLabels, Gauge>,
    mirror_bytes_at_risk: Family<TopicLabels, Gauge>,
    mirror_dropped_records: Family<TopicLabels, Counter>,
    mirror_forwarded_records: Family<TopicLabels, Counter>,
    mirror_forwarded_bytes: Family<TopicLabels, Counter>,
    mirror_link_up: Gauge,
    mirror_transactions: Family<OutcomeLabels, Counter>,
    mirror_upstream_bytes: Counter,
    mirror_throttled_seconds: Counter<f64, AtomicU64>,
    mirror_rate: Family<RuleLabels, Gauge>,
    mirror_aggregate_events: Family<TopicEventLabels, Counter>,
    connections: Family<ListenerLabels, Gauge>,
    connections_accepted: Family<ListenerLabels, Counter>,
    connections_refused: Family<RefusalLabels, Counter>,
    connections_handshaking: Gauge,
    tls_handshake_failures: Counter,
    connections_timed_out: Counter,
    malformed_frames: Counter,
    inflight_shared_bytes: Gauge,
    inflight_shared_admits: Counter,
    recovery_truncated_bytes: Counter,
    recovery_quarantined_partitions: Gauge,
    storage_quarantined_partitions: Gauge,
    recovery_deleted_leftovers: Gauge,
    recovery_undeletable_leftovers: Gauge,
    recovery_skipped_dirs: Gauge,
    recovery_stale_batches_erased: Counter,
    recovery_damaged_offsets: Counter,
    cleaner: CleanerMetrics,
    /// Share groups (queues) and dead-letter topics.
    pub share: ShareMetrics,
    txn: txn::TxnMetrics,
}

/// The compaction cleaner's counters as the broker keeps them
/// (`broker::cleaner::CleanerStats`), for [`Metrics::observe_cleaner`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CleanerCounters {
    pub runs: u64,
    pub passes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub records_removed: u64,
    pub segments_freed: u64,
    pub lag_bytes: u64,
    pub progress_bytes: u64,
}

#[derive(Default)]
struct CleanerMetrics {
    runs: Counter,
    passes: Counter,
    read_bytes: Counter,
    written_bytes: Counter,
    removed_records: Counter,
    freed_segments: Counter,
    lag_bytes: Gauge,
    progress_bytes: Gauge,
    seen: std::sync::Mutex<CleanerCounters>,
}

impl CleanerMetrics {
    fn register(&self, r: &mut Registry) {
        r.register("cleaner_runs", "Compactions started", self.runs.clone());
        r.register(
            "cleaner_passes",
            "Compaction passes (one per key-hash class when keys exceed the key map)",
            self.passes.clone(),
        );
        r.register(
            "cleaner_read_bytes",
            "Bytes the cleaner read",
            self.read_bytes.clone(),
        );
        r.register(
            "cleaner_written_bytes",
            "Bytes the cleaner wrote into merged segments",
            self.written_bytes.clone(),
        );
        r.register(
            "cleaner_removed_records",
            "Records compaction removed (older values, expired tombstones)",
            self.removed_records.clone(),
        );
        r.register(
            "cleaner_freed_segments",
            "Ring slots compaction freed",
            self.freed_segments.clone(),
        );
        r.register(
            "cleaner_lag_bytes",
            "Bytes of closed segments of compacted partitions not yet merged",
            self.lag_bytes.clone(),
        );
        r.register(
            "cleaner_progress_bytes",
            "Bytes the compaction in progress (or the last one) has processed",
            self.progress_bytes.clone(),
        );
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The hot per-topic counters, resolved once per topic by the broker.
#[derive(Clone, Debug)]
pub struct TopicMetrics {
    produce_records: Counter,
    produce_bytes: Counter,
    fetch_records: Counter,
    fetch_bytes: Counter,
}

impl TopicMetrics {
    pub fn produced(&self, records: u64, bytes: u64) {
        self.produce_records.inc_by(records);
        self.produce_bytes.inc_by(bytes);
    }

    pub fn fetched(&self, records: u64, bytes: u64) {
        self.fetch_records.inc_by(records);
        self.fetch_bytes.inc_by(bytes);
    }
}

/// Counts a connection as open (or in its TLS handshake) until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut m = Metrics {
            topics: Default::default(),
            request_kinds: Default::default(),
            produce_records: Family::default(),
            produce_bytes: Family::default(),
            fetch_records: Family::default(),
            fetch_bytes: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            storage_write_duration: storage_histogram(),
            storage_fsync_duration: storage_histogram(),
            storage_fanin_wait: storage_histogram(),
            storage_device_bytes: Counter::default(),
            storage_payload_bytes: Counter::default(),
            storage_read_bytes: Family::default(),
            group_lag: Family::default(),
            group_commits: Counter::default(),
            group_offset_log_writes: Counter::default(),
            groups_seen: std::sync::Mutex::new((0, 0)),
            dedup_hits: Counter::default(),
            producer_table_entries: Gauge::default(),
            producer_evictions: Counter::default(),
            producer_expirations: Counter::default(),
            msg_id_duplicates: Counter::default(),
            fenced_batches: Counter::default(),
            out_of_order_batches: Counter::default(),
            producers_seen: std::sync::Mutex::new(ProducerCounters::default()),
            mirror_backlog_records: Family::default(),
            mirror_bytes_at_risk: Family::default(),
            mirror_dropped_records: Family::default(),
            mirror_forwarded_records: Family::default(),
            mirror_forwarded_bytes: Family::default(),
            mirror_link_up: Gauge::default(),
            mirror_transactions: Family::default(),
            mirror_upstream_bytes: Counter::default(),
            mirror_throttled_seconds: Counter::default(),
            mirror_rate: Family::default(),
            mirror_aggregate_events: Family::default(),
            connections: Family::default(),
            connections_accepted: Family::default(),
            connections_refused: Family::default(),
            connections_handshaking: Gauge::default(),
            tls_handshake_failures: Counter::default(),
            connections_timed_out: Counter::default(),
            malformed_frames: Counter::default(),
            inflight_shared_bytes: Gauge::default(),
            inflight_shared_admits: Counter::default(),
            recovery_truncated_bytes: Counter::default(),
            recovery_quarantined_partitions: Gauge::default(),
            storage_quarantined_partitions: Gauge::default(),
            recovery_deleted_leftovers: Gauge::default(),
            recovery_undeletable_leftovers: Gauge::default(),
            recovery_skipped_dirs: Gauge::default(),
            cleaner: CleanerMetrics::default(),
            share: ShareMetrics::default(),
            txn: txn::TxnMetrics::default(),
            recovery_stale_batches_erased: Counter::default(),
            recovery_damaged_offsets: Counter::default(),
            registry: Registry::with_prefix("skiff"),
            health_notes: std::sync::Mutex::default(),
            refresh: std::sync::OnceLock::new(),
        };
        m.cleaner.register(&mut m.registry);
        m.txn.register(&mut m.registry);
        m.registry.register(
            "build",
            "skiff version",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        m.registry.register(
            "produce_records",
            "Records appended, per topic",
            m.produce_records.clone(),
        );
        m.registry.register(
            "produce_bytes",
            "Record batch bytes appended, per topic",
            m.produce_bytes.clone(),
        );
        m.registry.register(
            "fetch_records",
            "Records returned to consumers, per topic",
            m.fetch_records.clone(),
        );
        m.registry.register(
            "fetch_bytes",
            "Record batch bytes returned to consumers, per topic",
            m.fetch_bytes.clone(),
        );
        m.registry.register(
            "request_duration_seconds",
            "Time from a request's decode to its response, per request kind",
            m.request_duration.clone(),
        );
        m.registry.register(
            "storage_write_duration_seconds",
            "Duration of one storage write round (all dirty tails)",
            m.storage_write_duration.clone(),
        );
        m.registry.register(
            "storage_fsync_duration_seconds",
            "Duration of one fdatasync",
            m.storage_fsync_duration.clone(),
        );
        m.registry.register(
            "storage_fanin_wait_seconds",
            "Time a flush waited for a fan-in's producers to send again (storage.fanin_wait_ms)",
            m.storage_fanin_wait.clone(),
        );
        m.registry.register(
            "storage_device_bytes",
            "Bytes written to the device, block padding and tail rewrites included",
            m.storage_device_bytes.clone(),
        );
        m.registry.register(
            "storage_payload_bytes",
            "Record batch bytes the device writes carried (device/payload = write amplification)",
            m.storage_payload_bytes.clone(),
        );
        m.registry.register(
            "storage_read_bytes",
            "Bytes of fetch windows read from the device: on demand, read ahead and used, or read ahead and dropped unused",
            m.storage_read_bytes.clone(),
        );
        m.registry.register(
            "group_lag_records",
            "Records between a group's committed offset and the high watermark",
            m.group_lag.clone(),
        );
        m.registry.register(
            "group_commits",
            "Offset commits made durable",
            m.group_commits.clone(),
        );
        m.registry.register(
            "group_offset_log_writes",
            "Writes (each one fsync) of the committed-offsets log; commits share them",
            m.group_offset_log_writes.clone(),
        );
        m.registry.register(
            "dedup_hits",
            "Produce batches recognised as retries and not written again",
            m.dedup_hits.clone(),
        );
        m.registry.register(
            "producer_table_entries",
            "Entries in the idempotent producers' fixed-capacity sequence table",
            m.producer_table_entries.clone(),
        );
        m.registry.register(
            "producer_evictions",
            "Producer entries evicted (least recently active) because the table was full",
            m.producer_evictions.clone(),
        );
        m.registry.register(
            "producer_expirations",
            "Producer entries dropped after producers.idle_expiry_ms without a batch",
            m.producer_expirations.clone(),
        );
        m.registry.register(
            "msg_id_duplicates",
            "Records dropped by a topic's message-id dedup window",
            m.msg_id_duplicates.clone(),
        );
        m.registry.register(
            "fenced_batches",
            "Produce batches refused because a newer epoch of their producer exists",
            m.fenced_batches.clone(),
        );
        m.registry.register(
            "out_of_order_batches",
            "Produce batches refused for a sequence gap",
            m.out_of_order_batches.clone(),
        );
        m.registry.register(
            "mirror_backlog_records",
            "Records stored locally and not yet acknowledged upstream",
            m.mirror_backlog_records.clone(),
        );
        m.registry.register(
            "mirror_bytes_at_risk",
            "Unforwarded bytes the ring will overwrite next if the uplink stays down",
            m.mirror_bytes_at_risk.clone(),
        );
        m.registry.register(
            "mirror_dropped_records",
            "Unforwarded records dropped by the overflow policy",
            m.mirror_dropped_records.clone(),
        );
        m.registry.register(
            "mirror_forwarded_records",
            "Records committed upstream by the mirror, per source topic",
            m.mirror_forwarded_records.clone(),
        );
        m.registry.register(
            "mirror_forwarded_bytes",
            "Local bytes of the records committed upstream, per source topic",
            m.mirror_forwarded_bytes.clone(),
        );
        m.registry.register(
            "mirror_link_up",
            "1 while the mirror's producer is initialised upstream, 0 while it connects or backs off",
            m.mirror_link_up.clone(),
        );
        m.registry.register(
            "mirror_transactions",
            "Upstream transactions committed, and ended by a failure (aborted by the next InitProducerId)",
            m.mirror_transactions.clone(),
        );
        m.registry.register(
            "mirror_upstream_bytes",
            "Record batch bytes the mirror sent upstream, before compression, checkpoints included: what mirror.max_bytes_per_s caps",
            m.mirror_upstream_bytes.clone(),
        );
        m.registry.register(
            "mirror_throttled_seconds",
            "Time the mirror waited for mirror.max_bytes_per_s",
            m.mirror_throttled_seconds.clone(),
        );
        m.registry.register(
            "mirror_rate_bytes_per_s",
            "Upstream bytes committed per second over the last 10 s, per mirror rule",
            m.mirror_rate.clone(),
        );
        m.registry.register(
            "mirror_aggregate_events",
            "Aggregate rules, committed upstream: late and malformed records, windows emitted, windows closed early",
            m.mirror_aggregate_events.clone(),
        );
        m.registry.register(
            "connections",
            "Open client connections, per listener (TLS ones from the end of their handshake)",
            m.connections.clone(),
        );
        m.registry.register(
            "connections_handshaking",
            "TLS handshakes in flight; each holds a server.max_connections slot from its accept on, as an open connection does",
            m.connections_handshaking.clone(),
        );
        m.registry.register(
            "connections_accepted",
            "Client connections accepted, per listener",
            m.connections_accepted.clone(),
        );
        // Every reason from the start, at 0: a series that appears only at
        // the first refusal hides it from rate() and from alerts on it.
        for reason in RefusalReason::ALL {
            drop(m.connections_refused.get_or_create(&RefusalLabels {
                reason: reason.as_str(),
            }));
        }
        m.registry.register(
            "connections_refused",
            "Client connections refused at accept, before any request was served, per reason: the limit's config key (max_connections, max_connections_per_ip, connection_rate_per_ip, max_connections_per_identity) or no_peer_credentials",
            m.connections_refused.clone(),
        );
        m.registry.register(
            "connections_timed_out",
            "Client connections closed for server.tls.handshake_timeout_ms or server.frame_timeout_ms: no TLS handshake or hello in time, or a frame stalled half-sent",
            m.connections_timed_out.clone(),
        );
        m.registry.register(
            "malformed_frames",
            "Frames that were not a request (too large, not CBOR, no request envelope); each closed its connection",
            m.malformed_frames.clone(),
        );
        m.registry.register(
            "inflight_shared_bytes",
            "Bytes of produce requests held past their connections' max_inflight_bytes_per_connection, from server.max_inflight_bytes_shared",
            m.inflight_shared_bytes.clone(),
        );
        m.registry.register(
            "inflight_shared_admits",
            "Produce requests admitted with bytes from server.max_inflight_bytes_shared",
            m.inflight_shared_admits.clone(),
        );
        m.registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (bad certificate, protocol mismatch)",
            m.tls_handshake_failures.clone(),
        );
        m.registry.register(
            "recovery_truncated_bytes",
            "Bytes of torn or corrupt tail truncated by recovery at start-up",
            m.recovery_truncated_bytes.clone(),
        );
        m.registry.register(
            "recovery_quarantined_partitions",
            "Partitions read-only because of corruption before their durable tail",
            m.recovery_quarantined_partitions.clone(),
        );
        m.registry.register(
            "storage_quarantined_partitions",
            "Partitions quarantined now (read-only, or not loaded), at start-up or since, until \
             their topic is deleted",
            m.storage_quarantined_partitions.clone(),
        );
        m.registry.register(
            "recovery_deleted_leftovers",
            "Partitions of deleted topics (a delete cut short or that failed) deleted at start-up",
            m.recovery_deleted_leftovers.clone(),
        );
        m.registry.register(
            "recovery_undeletable_leftovers",
            "Partitions of deleted topics start-up could not delete: kept unloaded, their \
             topic's name refused to a create (the log names each directory)",
            m.recovery_undeletable_leftovers.clone(),
        );
        m.registry.register(
            "recovery_skipped_dirs",
            "Partition directories start-up skipped, neither loaded nor deleted: their \
             partition.meta names another partition (the log names each)",
            m.recovery_skipped_dirs.clone(),
        );
        m.registry.register(
            "recovery_stale_batches_erased",
            "Batches a crashed run left past the log's end, erased by recovery at start-up",
            m.recovery_stale_batches_erased.clone(),
        );
        m.registry.register(
            "recovery_damaged_offsets",
            "Offsets lost in damaged data that was skipped, by recovery at start-up or by a \
             read that found it later (the records there, and any gap the log already had)",
            m.recovery_damaged_offsets.clone(),
        );
        m.share.register(&mut m.registry);
        Arc::new(m)
    }

    /// The counters of one topic; keep it beside the topic.
    pub fn topic(&self, topic: &str) -> TopicMetrics {
        let labels = TopicLabels {
            topic: Arc::from(topic),
        };
        TopicMetrics {
            produce_records: self.produce_records.get_or_create_owned(&labels),
            produce_bytes: self.produce_bytes.get_or_create_owned(&labels),
            fetch_records: self.fetch_records.get_or_create_owned(&labels),
            fetch_bytes: self.fetch_bytes.get_or_create_owned(&labels),
        }
    }

    /// Counts records produced to `topic`; its counters are resolved once
    /// (see `topics`), so this is cheap on the per-request path.
    pub fn record_produce(&self, topic: &str, records: u64, bytes: u64) {
        self.with_topic(topic, |t| t.produced(records, bytes));
    }

    /// Counts records fetched from `topic`, as [`Metrics::record_produce`].
    pub fn record_fetch(&self, topic: &str, records: u64, bytes: u64) {
        self.with_topic(topic, |t| t.fetched(records, bytes));
    }

    fn with_topic(&self, topic: &str, f: impl FnOnce(&TopicMetrics)) {
        if let Some(t) = self.topics.read().expect("topics").get(topic) {
            return f(t);
        }
        // Under the write lock, so that a `remove_topic` meanwhile cannot
        // leave detached counters cached.
        let mut topics = self.topics.write().expect("topics");
        f(topics
            .entry(Arc::from(topic))
            .or_insert_with(|| self.topic(topic)));
    }

    /// `kind` is the request type's name (`"produce"`, `"fetch"`, ...).
    pub fn observe_request(&self, kind: &'static str, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let kinds = self.request_kinds.read().expect("request kinds");
        if let Some((_, h)) = kinds.iter().find(|(k, _)| *k == kind) {
            return h.observe(secs);
        }
        drop(kinds);
        let h = self
            .request_duration
            .get_or_create(&KindLabels { kind })
            .clone();
        h.observe(secs);
        self.request_kinds
            .write()
            .expect("request kinds")
            .push((kind, h));
    }

    /// One storage write round: its duration, the bytes the device wrote
    /// (aligned blocks, rewritten partial tails included) and the batch
    /// bytes among them.
    pub fn observe_storage_write(&self, elapsed: Duration, device_bytes: u64, payload_bytes: u64) {
        self.storage_write_duration.observe(elapsed.as_secs_f64());
        self.storage_device_bytes.inc_by(device_bytes);
        self.storage_payload_bytes.inc_by(payload_bytes);
    }

    pub fn observe_fsync(&self, elapsed: Duration) {
        self.storage_fsync_duration.observe(elapsed.as_secs_f64());
    }

    pub fn set_group_lag(&self, group: &str, topic: &str, partition: u32, lag: i64) {
        self.group_lag
            .get_or_create(&LagLabels {
                group: Arc::from(group),
                topic: Arc::from(topic),
                partition,
            })
            .set(lag);
    }

    /// The lag series as last set, without a refresh.
    #[cfg(test)]
    pub(crate) fn group_lag(&self, group: &str, topic: &str, partition: u32) -> Option<i64> {
        let labels = LagLabels {
            group: Arc::from(group),
            topic: Arc::from(topic),
            partition,
        };
        self.group_lag.get(&labels).map(|g| g.get())
    }

    /// A group was deleted or lost a partition: drop its lag series.
    pub fn remove_group_lag(&self, group: &str, topic: &str, partition: u32) {
        self.group_lag.remove(&LagLabels {
            group: Arc::from(group),
            topic: Arc::from(topic),
            partition,
        });
    }

    pub fn dedup_hit(&self) {
        self.dedup_hits.inc();
    }

    /// Folds a snapshot of the broker's cumulative producer counters into
    /// the exported ones (counters move by the difference since the last
    /// snapshot, so calling it from a periodic task is enough).
    pub fn observe_producers(&self, now: ProducerCounters) {
        let Ok(mut seen) = self.producers_seen.lock() else {
            return;
        };
        let d = |new: u64, old: u64| new.saturating_sub(old);
        self.dedup_hits
            .inc_by(d(now.duplicate_batches, seen.duplicate_batches));
        self.producer_evictions
            .inc_by(d(now.evictions, seen.evictions));
        self.producer_expirations
            .inc_by(d(now.expirations, seen.expirations));
        self.msg_id_duplicates
            .inc_by(d(now.msg_id_duplicates, seen.msg_id_duplicates));
        self.fenced_batches.inc_by(d(now.fenced, seen.fenced));
        self.out_of_order_batches
            .inc_by(d(now.out_of_order, seen.out_of_order));
        self.producer_table_entries
            .set(i64::try_from(now.entries).unwrap_or(i64::MAX));
        *seen = now;
    }

    /// Folds the coordinator's cumulative counters into the exported ones.
    pub fn observe_groups(&self, commits: u64, log_writes: u64) {
        let Ok(mut seen) = self.groups_seen.lock() else {
            return;
        };
        self.group_commits.inc_by(commits.saturating_sub(seen.0));
        self.group_offset_log_writes
            .inc_by(log_writes.saturating_sub(seen.1));
        *seen = (commits, log_writes);
    }

    /// Folds the cleaner's counters in (called periodically).
    pub fn observe_cleaner(&self, now: CleanerCounters) {
        let c = &self.cleaner;
        let Ok(mut seen) = c.seen.lock() else {
            return;
        };
        let d = |new: u64, old: u64| new.saturating_sub(old);
        c.runs.inc_by(d(now.runs, seen.runs));
        c.passes.inc_by(d(now.passes, seen.passes));
        c.read_bytes.inc_by(d(now.bytes_read, seen.bytes_read));
        c.written_bytes
            .inc_by(d(now.bytes_written, seen.bytes_written));
        c.removed_records
            .inc_by(d(now.records_removed, seen.records_removed));
        c.freed_segments
            .inc_by(d(now.segments_freed, seen.segments_freed));
        c.lag_bytes
            .set(i64::try_from(now.lag_bytes).unwrap_or(i64::MAX));
        c.progress_bytes
            .set(i64::try_from(now.progress_bytes).unwrap_or(i64::MAX));
        *seen = now;
    }

    pub fn set_mirror_backlog(&self, topic: &str, records: i64, bytes_at_risk: i64) {
        let labels = TopicLabels {
            topic: Arc::from(topic),
        };
        self.mirror_backlog_records
            .get_or_create(&labels)
            .set(records);
        self.mirror_bytes_at_risk
            .get_or_create(&labels)
            .set(bytes_at_risk);
    }

    pub fn mirror_forwarded(&self, topic: &str, records: u64, bytes: u64) {
        let labels = TopicLabels {
            topic: Arc::from(topic),
        };
        self.mirror_forwarded_records
            .get_or_create(&labels)
            .inc_by(records);
        self.mirror_forwarded_bytes
            .get_or_create(&labels)
            .inc_by(bytes);
    }

    /// Counts of an aggregate rule's source topic (`event` names them).
    pub fn mirror_aggregate(&self, topic: &str, events: [(&'static str, u64); 4]) {
        for (event, n) in events.into_iter().filter(|(_, n)| *n > 0) {
            self.mirror_aggregate_events
                .get_or_create(&TopicEventLabels {
                    topic: Arc::from(topic),
                    event,
                })
                .inc_by(n);
        }
    }

    pub fn set_mirror_link(&self, up: bool) {
        self.mirror_link_up.set(i64::from(up));
    }

    pub fn mirror_transaction(&self, committed: bool) {
        self.mirror_transactions
            .get_or_create(&OutcomeLabels {
                outcome: if committed { "commit" } else { "abort" },
            })
            .inc();
    }

    pub fn mirror_sent(&self, bytes: u64) {
        self.mirror_upstream_bytes.inc_by(bytes);
    }

    pub fn mirror_throttled(&self, waited: Duration) {
        self.mirror_throttled_seconds.inc_by(waited.as_secs_f64());
    }

    pub fn set_mirror_rate(&self, rule: &str, bytes_per_s: u64) {
        self.mirror_rate
            .get_or_create(&RuleLabels {
                rule: Arc::from(rule),
            })
            .set(i64::try_from(bytes_per_s).unwrap_or(i64::MAX));
    }

    pub fn mirror_dropped(&self, topic: &str, records: u64) {
        self.mirror_dropped_records
            .get_or_create(&TopicLabels {
                topic: Arc::from(topic),
            })
            .inc_by(records);
    }

    /// Counts an accepted connection; it counts as open until the guard
    /// drops.
    pub fn connection_opened(&self, listener: Listener) -> ConnectionGuard {
        let labels = ListenerLabels {
            listener: listener.as_str(),
        };
        self.connections_accepted.get_or_create(&labels).inc();
        let open = self.connections.get_or_create_owned(&labels);
        open.inc();
        ConnectionGuard { open }
    }

    /// Counts a TLS handshake as in flight until the guard drops.
    pub fn handshake_started(&self) -> ConnectionGuard {
        let open = self.connections_handshaking.clone();
        open.inc();
        ConnectionGuard { open }
    }

    /// The shared in-flight pool's gauge and counter, which the server
    /// keeps up to date.
    pub fn inflight_shared(&self) -> (Gauge, Counter) {
        (
            self.inflight_shared_bytes.clone(),
            self.inflight_shared_admits.clone(),
        )
    }

    pub fn connection_refused(&self, reason: RefusalReason) {
        self.connections_refused
            .get_or_create(&RefusalLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn connection_timed_out(&self) {
        self.connections_timed_out.inc();
    }

    pub fn malformed_frame(&self) {
        self.malformed_frames.inc();
    }

    pub fn tls_failure(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Replaces the lines `/health` adds after "ok".
    pub fn set_health_notes(&self, notes: Vec<&'static str>) {
        *self.health_notes.lock().unwrap_or_else(|e| e.into_inner()) = notes;
    }

    /// Sets what runs before each read of the metrics (once; a second call
    /// is ignored).
    pub fn set_refresh(&self, r: impl Refresh + 'static) {
        let _ = self.refresh.set(Box::new(r));
    }

    /// `/health`'s body: "ok", then a line per note.
    pub fn health_text(&self) -> String {
        if let Some(r) = self.refresh.get() {
            r.health(self);
        }
        let notes = self.health_notes.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::from("ok\n");
        for n in notes.iter() {
            text.push_str(n);
            text.push('\n');
        }
        text
    }

    /// Batches a crashed run left past the end, erased by recovery.
    pub fn record_recovery_erased(&self, batches: u64) {
        self.recovery_stale_batches_erased.inc_by(batches);
    }

    /// Offsets lost in damaged ranges recovery skipped.
    pub fn record_recovery_damaged(&self, offsets: u64) {
        self.recovery_damaged_offsets.inc_by(offsets);
    }

    /// Start-up recovery's outcome, summed over partitions.
    pub fn record_recovery(&self, r: &crate::broker::RecoverySummary) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.recovery_truncated_bytes.inc_by(r.truncated_bytes);
        self.recovery_quarantined_partitions
            .set(gauge(r.quarantined_partitions));
        self.recovery_deleted_leftovers
            .set(gauge(r.deleted_leftovers));
        self.recovery_undeletable_leftovers
            .set(gauge(r.undeletable_leftovers));
        self.recovery_skipped_dirs.set(gauge(r.skipped_dirs));
    }

    /// Storage's partitions quarantined now (`StorageStats::quarantined`).
    pub fn observe_storage(&self, quarantined: u64) {
        self.storage_quarantined_partitions
            .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
    }

    /// A topic was deleted: drop its series (existing [`TopicMetrics`]
    /// handles keep counting into detached counters).
    pub fn remove_topic(&self, topic: &str) {
        let mut topics = self.topics.write().expect("topics");
        topics.remove(topic);
        let labels = TopicLabels {
            topic: Arc::from(topic),
        };
        self.produce_records.remove(&labels);
        self.produce_bytes.remove(&labels);
        self.fetch_records.remove(&labels);
        self.fetch_bytes.remove(&labels);
        self.mirror_backlog_records.remove(&labels);
        self.mirror_bytes_at_risk.remove(&labels);
        self.mirror_dropped_records.remove(&labels);
        self.mirror_forwarded_records.remove(&labels);
        self.mirror_forwarded_bytes.remove(&labels);
    }

    /// The OpenMetrics text exposition (what `/metrics` serves).
    pub fn encode(&self) -> String {
        if let Some(r) = self.refresh.get() {
            r.scrape(self);
        }
        let mut out = String::new();
        // Writing into a String cannot fail; the encoder's fmt::Error can
        // only come from the writer.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests;

impl crate::storage::IoObserver for Metrics {
    fn write_round(&self, elapsed: Duration, device_bytes: u64, payload_bytes: u64, synced: bool) {
        self.observe_storage_write(elapsed, device_bytes, payload_bytes);
        if synced {
            // One group commit: the writes and their fdatasyncs in one
            // submission, so this is the durable-write latency acks wait on.
            self.observe_fsync(elapsed);
        }
    }

    fn sync_group(&self, elapsed: Duration) {
        self.observe_fsync(elapsed);
    }

    fn window_read(&self, device_bytes: u64, ahead: bool) {
        let source = if ahead { "ahead" } else { "demand" };
        self.storage_read_bytes
            .get_or_create(&ReadLabels { source })
            .inc_by(device_bytes);
    }

    fn damage_skipped(&self, offsets: u64) {
        self.recovery_damaged_offsets.inc_by(offsets);
    }

    fn fanin_wait(&self, elapsed: Duration) {
        self.storage_fanin_wait.observe(elapsed.as_secs_f64());
    }

    fn read_ahead_unused(&self, device_bytes: u64) {
        self.storage_read_bytes
            .get_or_create(&ReadLabels {
                source: "ahead_unused",
            })
            .inc_by(device_bytes);
    }
}

#[cfg(test)]
mod producer_counter_tests {
    use super::*;

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    }

    #[test]
    fn producer_snapshots_move_counters_by_their_difference() {
        let m = Metrics::new();
        let mut c = ProducerCounters {
            entries: 3,
            evictions: 2,
            duplicate_batches: 5,
            ..ProducerCounters::default()
        };
        m.observe_producers(c);
        m.observe_producers(c); // the same snapshot again adds nothing
        c.evictions = 7;
        c.entries = 1;
        m.observe_producers(c);
        let text = m.encode();
        assert_eq!(value(&text, "skiff_producer_evictions_total"), 7.0);
        assert_eq!(value(&text, "skiff_dedup_hits_total"), 5.0);
        assert_eq!(value(&text, "skiff_producer_table_entries"), 1.0);
    }
}
