//! What the mirror tells `skiff mirror status`, the metrics and the log:
//! the link state, the last error, and per rule its counters. Shared
//! between the forwarder (which writes it) and the server's sessions
//! (which read it and set a rule's pause flag).

use std::sync::Mutex;

use serde::Serialize;

/// The link to the upstream cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// The producer is initialised and the checkpoints were read back.
    Up,
    /// Connecting, or waiting to retry after an error.
    Down,
}

/// One rule's view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RuleStatus {
    pub name: String,
    /// Set by `skiff mirror pause`; the rule's partitions are not read.
    pub paused: bool,
    /// Source partitions the rule matches now.
    pub partitions: u64,
    /// Records written locally and not yet committed upstream.
    pub backlog_records: u64,
    /// Bytes of those records (estimated from the partition's recent
    /// bytes per record until they are read).
    pub bytes_at_risk: u64,
    /// Records committed upstream since start.
    pub forwarded_records: u64,
    /// Their bytes as stored locally.
    pub forwarded_bytes: u64,
    /// Records that left the local log before they were forwarded.
    pub dropped_records: u64,
    /// Upstream bytes committed per second over the last 10 s.
    pub rate_bytes_per_s: u64,
    /// Seconds until the backlog is upstream at its net drain rate over
    /// the last 10 s; `None` when it is not draining.
    pub eta_s: Option<u64>,
    /// Aggregate rules: windows open now (0 for other rules).
    pub open_windows: u64,
    /// Aggregate rules, committed upstream since start: windows, and of
    /// them closed early (past `max_open_windows`); late and malformed
    /// source records.
    pub windows_emitted: u64,
    pub windows_closed_early: u64,
    pub late_records: u64,
    pub malformed_records: u64,
}

/// The whole status, as `mirror status --format json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// Whether a mirror is configured at all.
    pub enabled: bool,
    pub link: Link,
    /// Why the link is down (or the last error it recovered from).
    pub last_error: Option<String>,
    /// The transactional id, which is also the `skiff.gateway` header.
    pub gateway: String,
    pub upstream: String,
    pub transactions_committed: u64,
    pub transactions_aborted: u64,
    pub rules: Vec<RuleStatus>,
}

/// The shared state behind [`StatusReport`].
#[derive(Debug)]
pub struct MirrorStatus {
    inner: Mutex<StatusReport>,
}

impl MirrorStatus {
    pub fn new(enabled: bool, gateway: &str, upstream: &str, rules: &[String]) -> Self {
        Self {
            inner: Mutex::new(StatusReport {
                enabled,
                link: Link::Down,
                last_error: None,
                gateway: gateway.to_owned(),
                upstream: upstream.to_owned(),
                transactions_committed: 0,
                transactions_aborted: 0,
                rules: rules
                    .iter()
                    .map(|name| RuleStatus {
                        name: name.clone(),
                        ..RuleStatus::default()
                    })
                    .collect(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusReport> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy for reporting.
    pub fn report(&self) -> StatusReport {
        self.lock().clone()
    }

    /// Changes the link state; true when it changed (the caller logs then).
    pub(crate) fn set_link(&self, link: Link, error: Option<String>) -> bool {
        let mut s = self.lock();
        let changed = s.link != link || (error.is_some() && s.last_error != error);
        s.link = link;
        if error.is_some() {
            s.last_error = error;
        }
        changed
    }

    /// Pauses or resumes a rule; false when no rule has that name.
    pub fn set_paused(&self, rule: &str, paused: bool) -> bool {
        let mut s = self.lock();
        match s.rules.iter_mut().find(|r| r.name == rule) {
            Some(r) => {
                r.paused = paused;
                true
            }
            None => false,
        }
    }

    pub(crate) fn paused(&self, rule: usize) -> bool {
        self.lock().rules.get(rule).is_some_and(|r| r.paused)
    }

    pub(crate) fn update_rule(&self, rule: usize, f: impl FnOnce(&mut RuleStatus)) {
        if let Some(r) = self.lock().rules.get_mut(rule) {
            f(r);
        }
    }

    pub(crate) fn transaction_ended(&self, committed: bool) {
        let mut s = self.lock();
        if committed {
            s.transactions_committed += 1;
        } else {
            s.transactions_aborted += 1;
        }
    }
}
