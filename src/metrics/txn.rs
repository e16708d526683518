//! Transaction metrics: open transactions, commits, aborts (timeouts
//! among them), and per partition how far the last stable offset trails
//! the high watermark (how far read_committed readers are held back).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PartitionLabels {
    topic: Arc<str>,
    partition: u32,
}

/// The coordinator's cumulative counters, for [`super::Metrics::observe_txns`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TxnCounters {
    pub open: u64,
    pub commits: u64,
    pub aborts: u64,
    pub timeouts: u64,
    pub id_expirations: u64,
    pub aborted_ranges: u64,
}

#[derive(Default)]
pub(super) struct TxnMetrics {
    open: Gauge,
    commits: Counter,
    aborts: Counter,
    timeouts: Counter,
    id_expirations: Counter,
    aborted_ranges: Gauge,
    lso_lag: Family<PartitionLabels, Gauge>,
    seen: std::sync::Mutex<TxnCounters>,
    /// Partitions with an lso_lag series now.
    shown: std::sync::Mutex<Vec<(Arc<str>, u32)>>,
}

impl TxnMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "txn_open",
            "Transactions open now (ongoing or ending)",
            self.open.clone(),
        );
        r.register(
            "txn_commits",
            "Transactions committed",
            self.commits.clone(),
        );
        r.register(
            "txn_aborts",
            "Transactions aborted (by the producer, a new instance, a timeout or recovery)",
            self.aborts.clone(),
        );
        r.register(
            "txn_timeouts",
            "Transactions aborted because they were open past their timeout",
            self.timeouts.clone(),
        );
        r.register(
            "txn_id_expirations",
            "Transactional ids forgotten after transactions.id_expiration_ms unused",
            self.id_expirations.clone(),
        );
        r.register(
            "txn_aborted_ranges",
            "Aborted transactions' ranges kept for read_committed readers, one per partition; \
             new transactions are refused near the most the coordinator keeps",
            self.aborted_ranges.clone(),
        );
        r.register(
            "txn_lso_lag_records",
            "High watermark minus last stable offset, per partition with a transaction open",
            self.lso_lag.clone(),
        );
    }
}

impl super::Metrics {
    /// Folds the coordinator's counters in and replaces the LSO lag series
    /// with `lags` (topic, partition, high watermark minus LSO).
    pub fn observe_txns(&self, now: TxnCounters, lags: &[(String, u32, u64)]) {
        let t = &self.txn;
        if let Ok(mut seen) = t.seen.lock() {
            t.open.set(i64::try_from(now.open).unwrap_or(i64::MAX));
            t.aborted_ranges
                .set(i64::try_from(now.aborted_ranges).unwrap_or(i64::MAX));
            t.commits.inc_by(now.commits.saturating_sub(seen.commits));
            t.aborts.inc_by(now.aborts.saturating_sub(seen.aborts));
            t.timeouts
                .inc_by(now.timeouts.saturating_sub(seen.timeouts));
            t.id_expirations
                .inc_by(now.id_expirations.saturating_sub(seen.id_expirations));
            *seen = now;
        }
        let Ok(mut shown) = t.shown.lock() else {
            return;
        };
        let now_shown: Vec<(Arc<str>, u32)> = lags
            .iter()
            .map(|(topic, p, _)| (Arc::from(topic.as_str()), *p))
            .collect();
        for (topic, partition) in shown.iter().filter(|s| !now_shown.contains(s)) {
            t.lso_lag.remove(&PartitionLabels {
                topic: topic.clone(),
                partition: *partition,
            });
        }
        for ((topic, partition), (_, _, lag)) in now_shown.iter().zip(lags) {
            t.lso_lag
                .get_or_create(&PartitionLabels {
                    topic: topic.clone(),
                    partition: *partition,
                })
                .set(i64::try_from(*lag).unwrap_or(i64::MAX));
        }
        *shown = now_shown;
    }
}
