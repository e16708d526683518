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
//! | `storage_device_bytes`, `storage_payload_bytes` | counter | |
//! | `storage_read_bytes` (fetch windows from the device) | counter | source: demand, ahead, ahead_unused |
//! | `group_lag_records` | gauge | group, topic, partition |
//! | `dedup_hits` (retried batches not written again), `msg_id_duplicates` | counter | |
//! | `producer_table_entries`, `producer_evictions`, `producer_expirations` | gauge, counter | |
//! | `fenced_batches`, `out_of_order_batches` | counter | |
//! | `mirror_backlog_records`, `mirror_bytes_at_risk` | gauge | topic |
//! | `mirror_dropped_records` | counter | topic |
//! | `connections` (open), `connections_accepted` | gauge, counter | listener |
//! | `tls_handshake_failures` | counter | |
//! | `recovery_truncated_bytes` | counter | |
//! | `recovery_quarantined_partitions` | gauge | |
//! | `build_info` | info | version |
//!
//! Write amplification is `storage_device_bytes_total /
//! storage_payload_bytes_total`: bytes the device was asked to write per
//! byte producers sent.

mod http;

pub use http::{serve_http, serve_http_with, HttpLimits, CONTENT_TYPE_OPENMETRICS};

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
struct ReadLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
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

/// Every metric skiff exports. Cheap to record into from any thread.
pub struct Metrics {
    registry: Registry,
    produce_records: Family<TopicLabels, Counter>,
    produce_bytes: Family<TopicLabels, Counter>,
    fetch_records: Family<TopicLabels, Counter>,
    fetch_bytes: Family<TopicLabels, Counter>,
    request_duration: HistogramFamily<KindLabels>,
    storage_write_duration: Histogram,
    storage_fsync_duration: Histogram,
    storage_device_bytes: Counter,
    storage_payload_bytes: Counter,
    storage_read_bytes: Family<ReadLabels, Counter>,
    group_lag: Family<LagLabels, Gauge>,
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
    connections: Family<ListenerLabels, Gauge>,
    connections_accepted: Family<ListenerLabels, Counter>,
    tls_handshake_failures: Counter,
    recovery_truncated_bytes: Counter,
    recovery_quarantined_partitions: Gauge,
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

/// Counts a connection as open until dropped.
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
            produce_records: Family::default(),
            produce_bytes: Family::default(),
            fetch_records: Family::default(),
            fetch_bytes: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            storage_write_duration: storage_histogram(),
            storage_fsync_duration: storage_histogram(),
            storage_device_bytes: Counter::default(),
            storage_payload_bytes: Counter::default(),
            storage_read_bytes: Family::default(),
            group_lag: Family::default(),
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
            connections: Family::default(),
            connections_accepted: Family::default(),
            tls_handshake_failures: Counter::default(),
            recovery_truncated_bytes: Counter::default(),
            recovery_quarantined_partitions: Gauge::default(),
            registry: Registry::with_prefix("skiff"),
        };
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
            "connections",
            "Open client connections, per listener",
            m.connections.clone(),
        );
        m.registry.register(
            "connections_accepted",
            "Client connections accepted, per listener",
            m.connections_accepted.clone(),
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

    /// Convenience for cold paths; the broker should hold a [`TopicMetrics`].
    pub fn record_produce(&self, topic: &str, records: u64, bytes: u64) {
        self.topic(topic).produced(records, bytes);
    }

    /// Convenience for cold paths; the broker should hold a [`TopicMetrics`].
    pub fn record_fetch(&self, topic: &str, records: u64, bytes: u64) {
        self.topic(topic).fetched(records, bytes);
    }

    /// `kind` is the request type's name (`"produce"`, `"fetch"`, ...).
    pub fn observe_request(&self, kind: &'static str, elapsed: Duration) {
        self.request_duration
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
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

    pub fn tls_failure(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Start-up recovery's outcome, summed over partitions.
    pub fn record_recovery(&self, truncated_bytes: u64, quarantined_partitions: i64) {
        self.recovery_truncated_bytes.inc_by(truncated_bytes);
        self.recovery_quarantined_partitions
            .set(quarantined_partitions);
    }

    /// A topic was deleted: drop its series (existing [`TopicMetrics`]
    /// handles keep counting into detached counters).
    pub fn remove_topic(&self, topic: &str) {
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
    }

    /// The OpenMetrics text exposition (what `/metrics` serves).
    pub fn encode(&self) -> String {
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
