//! Share groups' (queues') metrics, kept apart so other features' metrics
//! merge beside them. Label cardinality: (group, topic) pairs are bounded
//! by `share.max_share_partitions`, dead-letter topics by
//! `server.max_topics`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShareLabels {
    group: Arc<str>,
    topic: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DlqLabels {
    topic: Arc<str>,
}

/// The share coordinator's cumulative counters
/// (`broker::share::ShareStats`), for [`ShareMetrics::observe`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ShareCounters {
    pub redeliveries: u64,
    pub dead_lettered: u64,
    pub lost: u64,
    pub log_writes: u64,
    pub partitions_skipped: u64,
}

/// What was exported last: the counters, the (group, topic) series and
/// the dead-letter topics' series.
#[derive(Debug, Default)]
struct Seen {
    counters: ShareCounters,
    groups: BTreeSet<(String, String)>,
    dlqs: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct ShareMetrics {
    in_flight: Family<ShareLabels, Gauge>,
    acquired: Family<ShareLabels, Gauge>,
    redeliveries: Counter,
    dead_lettered: Counter,
    lost: Counter,
    log_writes: Counter,
    partitions_skipped: Counter,
    dlq_records: Family<DlqLabels, Gauge>,
    seen: Mutex<Seen>,
}

impl ShareMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "share_records_in_flight",
            "Records of a share group's windows not yet done (available or locked)",
            self.in_flight.clone(),
        );
        r.register(
            "share_records_acquired",
            "Records locked to a share group's workers",
            self.acquired.clone(),
        );
        r.register(
            "share_redeliveries",
            "Share-group deliveries after a record's first",
            self.redeliveries.clone(),
        );
        r.register(
            "share_dead_lettered_records",
            "Records written to a dead-letter topic (rejected, or past max_deliveries)",
            self.dead_lettered.clone(),
        );
        r.register(
            "share_records_lost",
            "Records that left the log (retention) before a share group was done with them",
            self.lost.clone(),
        );
        r.register(
            "share_log_writes",
            "Writes (each one fsync) of the share-group state log __skiff_share",
            self.log_writes.clone(),
        );
        r.register(
            "share_fetch_partitions_skipped",
            "Partitions a share fetch skipped because it could not take from them (damaged, \
             quarantined, unreadable); one that keeps failing is logged once a minute",
            self.partitions_skipped.clone(),
        );
        r.register(
            "dlq_records",
            "Records held in a dead-letter topic (its depth)",
            self.dlq_records.clone(),
        );
    }

    /// Sets every series from the coordinator's figures: load per (group,
    /// topic, in flight, acquired), depth per dead-letter topic, and the
    /// counters. Series no longer reported are dropped.
    pub fn observe(
        &self,
        load: &[(String, String, u64, u64)],
        dlq_depth: &[(String, u64)],
        now: ShareCounters,
    ) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let Seen {
            counters,
            groups,
            dlqs,
        } = &mut *seen;
        self.redeliveries
            .inc_by(now.redeliveries.saturating_sub(counters.redeliveries));
        self.dead_lettered
            .inc_by(now.dead_lettered.saturating_sub(counters.dead_lettered));
        self.lost.inc_by(now.lost.saturating_sub(counters.lost));
        self.log_writes
            .inc_by(now.log_writes.saturating_sub(counters.log_writes));
        self.partitions_skipped.inc_by(
            now.partitions_skipped
                .saturating_sub(counters.partitions_skipped),
        );
        *counters = now;
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut now_groups = BTreeSet::new();
        for (g, t, in_flight, acquired) in load {
            let l = ShareLabels {
                group: Arc::from(g.as_str()),
                topic: Arc::from(t.as_str()),
            };
            self.in_flight.get_or_create(&l).set(gauge(*in_flight));
            self.acquired.get_or_create(&l).set(gauge(*acquired));
            now_groups.insert((g.clone(), t.clone()));
        }
        for (g, t) in groups.difference(&now_groups) {
            let l = ShareLabels {
                group: Arc::from(g.as_str()),
                topic: Arc::from(t.as_str()),
            };
            self.in_flight.remove(&l);
            self.acquired.remove(&l);
        }
        *groups = now_groups;
        let mut now_dlqs = BTreeSet::new();
        for (t, depth) in dlq_depth {
            let l = DlqLabels {
                topic: Arc::from(t.as_str()),
            };
            self.dlq_records.get_or_create(&l).set(gauge(*depth));
            now_dlqs.insert(t.clone());
        }
        for t in dlqs.difference(&now_dlqs) {
            self.dlq_records.remove(&DlqLabels {
                topic: Arc::from(t.as_str()),
            });
        }
        *dlqs = now_dlqs;
    }
}
