//! Warnings about something that keeps failing the same way (a share
//! partition, a transaction's log write retried by a timer): one line a
//! key per [`QUIET_LOG_WINDOW`], the lines in between counted and said
//! with the next.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) const QUIET_LOG_WINDOW: Duration = Duration::from_secs(60);

pub(crate) struct QuietLog<K> {
    /// The start of the line counting a key's lines not logged, e.g.
    /// "share group g: share fetches skipped t/0".
    what: fn(&K) -> String,
    /// When each key was last logged, and the lines since not logged.
    /// Holds only those logged within the window.
    seen: Mutex<BTreeMap<K, (Instant, u64)>>,
}

impl<K: Ord + Clone> QuietLog<K> {
    pub(crate) fn new(what: fn(&K) -> String) -> QuietLog<K> {
        QuietLog {
            what,
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether a line about `key` is to be logged now: then the text to
    /// end it with, which counts the lines not logged before it.
    pub(crate) fn due(&self, key: &K) -> Option<String> {
        let now = Instant::now();
        let mut quiet = 0;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|k, &mut (at, n)| {
            if now.duration_since(at) < QUIET_LOG_WINDOW {
                return true;
            }
            if k == key {
                quiet = n;
            } else if n > 0 {
                log::warn!("{} {n} more time(s), not logged", (self.what)(k));
            }
            false
        });
        if let Some((_, n)) = seen.get_mut(key) {
            *n += 1;
            return None;
        }
        seen.insert(key.clone(), (now, 0));
        Some(if quiet > 0 {
            format!(
                " ({quiet} more not logged in the last {} s)",
                QUIET_LOG_WINDOW.as_secs()
            )
        } else {
            String::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_logged_once_a_window_and_others_apart() {
        let q: QuietLog<String> = QuietLog::new(|k| format!("{k} failed"));
        let (a, b) = ("a".to_owned(), "b".to_owned());
        assert_eq!(q.due(&a).as_deref(), Some(""));
        for _ in 0..10 {
            assert_eq!(q.due(&a), None, "within the window");
        }
        assert_eq!(
            q.due(&b).as_deref(),
            Some(""),
            "another key is not held back"
        );
    }
}
