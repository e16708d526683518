//! The per-topic message-id dedup window, for producers that have an event
//! id but no idempotent session (a sensor that resends after a timeout as a
//! new request). A record whose `msg-id` header was seen on the topic within
//! the window is dropped as a duplicate.
//!
//! The window is bounded by time (`msg_id_window_ms`), by count
//! (`msg_id_window_records`), or both; its capacity is fixed when the topic's
//! window is created: the count bound, or [`WINDOW_RECORDS_MAX`] when only
//! time bounds it (then the oldest ids leave early when it is full).
//! It keeps a 64-bit hash of each id, not the id: two ids colliding in 64
//! bits would drop a record (about 1 in 10^10 for 10^5 ids in the window).
//!
//! Ids are remembered when their batch is submitted, so a duplicate in a
//! batch pipelined right behind is caught, and forgotten again if that batch
//! fails in storage (the client's retry is then not a duplicate). The
//! window lives in memory; at start-up it is refilled from the log, with
//! each record's own timestamp standing for when its id was seen.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

/// The record header that carries the application's event id.
pub const MSG_ID_HEADER: &str = "msg-id";
/// Capacity of a window bounded by time only, and the largest count bound.
pub const WINDOW_RECORDS_MAX: u32 = 100_000;

/// A topic's window settings; both 0 = off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgIdConfig {
    pub window_ms: u64,
    pub window_records: u32,
}

impl MsgIdConfig {
    pub fn enabled(&self) -> bool {
        self.window_ms > 0 || self.window_records > 0
    }

    pub(crate) fn capacity(&self) -> usize {
        match self.window_records {
            0 => WINDOW_RECORDS_MAX as usize,
            n => n.min(WINDOW_RECORDS_MAX) as usize,
        }
    }
}

/// The hash of one id. Fixed keys, so it is the same in every process.
pub fn id_hash(id: &[u8]) -> u64 {
    #[allow(deprecated, reason = "SipHasher with fixed keys: stable across runs")]
    let mut h = std::hash::SipHasher::new_with_keys(0x736b_6966_665f_6d73, 0x675f_6964_5f77_696e);
    id.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub struct Window {
    config: MsgIdConfig,
    /// Oldest first: (hash, time seen in ms).
    order: VecDeque<(u64, i64)>,
    /// hash -> how many times it is in `order` (normally 1).
    seen: HashMap<u64, u32>,
}

impl Window {
    pub fn new(config: MsgIdConfig) -> Self {
        let cap = config.capacity();
        Self {
            config,
            // Allocated once at the full capacity: the window never grows.
            order: VecDeque::with_capacity(cap),
            seen: HashMap::with_capacity(cap),
        }
    }

    pub fn config(&self) -> MsgIdConfig {
        self.config
    }

    fn pop_oldest(&mut self) {
        if let Some((h, _)) = self.order.pop_front() {
            if let Some(n) = self.seen.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    self.seen.remove(&h);
                }
            }
        }
    }

    /// Drops ids older than the time bound.
    fn expire(&mut self, now_ms: i64) {
        if self.config.window_ms == 0 {
            return;
        }
        let oldest_kept = now_ms.saturating_sub(self.config.window_ms as i64);
        while self.order.front().is_some_and(|&(_, t)| t < oldest_kept) {
            self.pop_oldest();
        }
    }

    /// Whether `hash` is in the window; if not, remembers it.
    pub fn check_and_insert(&mut self, hash: u64, now_ms: i64) -> bool {
        self.expire(now_ms);
        if self.seen.contains_key(&hash) {
            return true;
        }
        if self.order.len() >= self.config.capacity() {
            self.pop_oldest();
        }
        self.order.push_back((hash, now_ms));
        *self.seen.entry(hash).or_insert(0) += 1;
        false
    }

    /// Refills the window with ids read back from the log, oldest first,
    /// each with its record's timestamp for the time it was seen; those
    /// already out of the window at `now` are left out. Returns how many
    /// it holds afterwards.
    pub fn restore(&mut self, oldest_first: &[(i64, u64)], now_ms: i64) -> usize {
        let keep = oldest_first.len().saturating_sub(self.config.capacity());
        for &(ts, hash) in &oldest_first[keep..] {
            self.check_and_insert(hash, ts);
        }
        self.expire(now_ms);
        self.order.len()
    }

    /// Forgets ids remembered for a batch that was not written.
    pub fn forget(&mut self, hashes: &[u64]) {
        for h in hashes {
            if let Some(i) = self.order.iter().rposition(|(x, _)| x == h) {
                self.order.remove(i);
                if let Some(n) = self.seen.get_mut(h) {
                    *n -= 1;
                    if *n == 0 {
                        self.seen.remove(h);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_bound_forgets_the_oldest() {
        let mut w = Window::new(MsgIdConfig {
            window_ms: 0,
            window_records: 2,
        });
        assert!(!w.check_and_insert(1, 0));
        assert!(!w.check_and_insert(2, 0));
        assert!(w.check_and_insert(1, 0));
        assert!(!w.check_and_insert(3, 0));
        assert!(!w.check_and_insert(1, 0), "1 left the window");
    }

    #[test]
    fn time_bound_forgets_after_the_window() {
        let mut w = Window::new(MsgIdConfig {
            window_ms: 100,
            window_records: 0,
        });
        assert!(!w.check_and_insert(7, 1000));
        assert!(w.check_and_insert(7, 1100));
        assert!(!w.check_and_insert(7, 1101));
        w.forget(&[7]);
        assert!(
            !w.check_and_insert(7, 1102),
            "forgotten after a failed write"
        );
    }

    #[test]
    fn restore_keeps_what_the_window_would_still_hold() {
        let mut w = Window::new(MsgIdConfig {
            window_ms: 100,
            window_records: 3,
        });
        // Oldest first; the first two are beyond the count, 4 beyond the
        // time at 1150.
        let log = [(900, 1), (950, 2), (1040, 4), (1060, 5), (1100, 6)];
        assert_eq!(w.restore(&log, 1150), 2);
        assert!(w.check_and_insert(5, 1150));
        assert!(w.check_and_insert(6, 1150));
        assert!(!w.check_and_insert(4, 1150));
        assert!(!w.check_and_insert(1, 1150));
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(id_hash(b"e-1"), id_hash(b"e-1"));
        assert_ne!(id_hash(b"e-1"), id_hash(b"e-2"));
    }
}
