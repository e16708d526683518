//! Where the storage engine reads the time: monotonic instants for group
//! commit, checkpoints and retention checks, and wall-clock milliseconds
//! for segment headers and time retention (which compares record
//! timestamps). The system clock in service; in tests a [`ManualClock`]
//! that moves only when told, so a test of a one-second window advances
//! the clock a second instead of sleeping one.

use super::doorbell::Doorbell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long [`ManualClock::advance`] waits for a storage thread to act on
/// the new time before it gives up on it (a thread stuck in a device call).
const ADVANCE_WAIT_MAX: Duration = Duration::from_secs(10);

/// The engine's clock (`StorageConfig::clock`).
#[derive(Clone, Default)]
pub enum Clock {
    /// `Instant::now` and `SystemTime::now`.
    #[default]
    System,
    /// Moves only by [`ManualClock::advance`].
    Manual(Arc<ManualClock>),
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Clock::System => f.write_str("Clock::System"),
            Clock::Manual(m) => write!(f, "Clock::Manual({:?})", m.elapsed()),
        }
    }
}

impl Clock {
    /// A manual clock whose wall time starts at `wall_ms` (ms since the
    /// Unix epoch), and the handle that advances it.
    pub fn manual(wall_ms: i64) -> (Clock, Arc<ManualClock>) {
        let m = Arc::new(ManualClock {
            start: Instant::now(),
            wall_start_ms: wall_ms,
            state: Mutex::new(ManualState::default()),
            acted: Condvar::new(),
        });
        (Clock::Manual(m.clone()), m)
    }

    pub fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Manual(m) => m.start + m.elapsed(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn wall_ms(&self) -> i64 {
        match self {
            Clock::System => crate::batch::now_ms(),
            Clock::Manual(m) => m.wall_start_ms + m.elapsed().as_millis() as i64,
        }
    }

    /// Registers a storage thread, woken through `bell` when the clock
    /// moves; `None` for the system clock, which moves by itself.
    pub(crate) fn watch(&self, bell: &Arc<Doorbell>) -> Option<Arc<Watcher>> {
        let Clock::Manual(m) = self else {
            return None;
        };
        let w = Arc::new(Watcher {
            bell: bell.clone(),
            acted_on: AtomicU64::new(0),
        });
        let mut st = m.lock();
        st.watchers.retain(|w| w.strong_count() > 0);
        st.watchers.push(Arc::downgrade(&w));
        Some(w)
    }

    /// How often the clock has moved: a storage thread notes it before it
    /// reads the time for a round of work.
    pub(crate) fn generation(&self) -> u64 {
        match self {
            Clock::System => 0,
            Clock::Manual(m) => m.lock().generation,
        }
    }

    /// Whether the clock moved since `generation`: a sleeping thread must
    /// look at its deadlines again.
    pub(crate) fn moved_since(&self, generation: u64) -> bool {
        self.generation() != generation
    }

    /// The thread did its round of work with the time of `generation`.
    pub(crate) fn acted(&self, watcher: Option<&Watcher>, generation: u64) {
        let (Clock::Manual(m), Some(w)) = (self, watcher) else {
            return;
        };
        let _st = m.lock();
        w.acted_on.store(generation, Ordering::Release);
        m.acted.notify_all();
    }

    /// The real instant to sleep until for a deadline on this clock: the
    /// deadline itself on the system clock. A manual clock's future
    /// deadline comes only when the clock is advanced (which wakes the
    /// thread): no deadline, then; a past one at once.
    pub(crate) fn sleep_until(&self, deadline: Option<Instant>) -> Option<Instant> {
        match self {
            Clock::System => deadline,
            Clock::Manual(_) => deadline
                .filter(|&d| d <= self.now())
                .map(|_| Instant::now()),
        }
    }
}

/// A clock for tests: it stands still until [`advance`](Self::advance)d.
pub struct ManualClock {
    start: Instant,
    wall_start_ms: i64,
    state: Mutex<ManualState>,
    /// Signalled when a storage thread has acted on a new time.
    acted: Condvar,
}

#[derive(Default)]
struct ManualState {
    elapsed: Duration,
    generation: u64,
    watchers: Vec<Weak<Watcher>>,
}

/// A storage thread as a manual clock sees it.
pub(crate) struct Watcher {
    bell: Arc<Doorbell>,
    /// The last generation the thread did a round of work at.
    acted_on: AtomicU64,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManualClock(+{:?})", self.elapsed())
    }
}

impl ManualClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn elapsed(&self) -> Duration {
        self.lock().elapsed
    }

    /// Moves the clock on by `by`, and returns once every storage thread
    /// that uses it has done a round of work (group commit, checkpoints,
    /// retention) at the new time, or has stopped.
    pub fn advance(&self, by: Duration) {
        let watchers: Vec<Arc<Watcher>> = {
            let mut st = self.lock();
            st.elapsed += by;
            st.generation += 1;
            st.watchers.iter().filter_map(Weak::upgrade).collect()
        };
        let generation = self.lock().generation;
        for w in &watchers {
            w.bell.ring();
        }
        let deadline = Instant::now() + ADVANCE_WAIT_MAX;
        let mut st = self.lock();
        for w in watchers {
            // A thread that stopped holds no reference to its watcher.
            while w.acted_on.load(Ordering::Acquire) < generation && Arc::strong_count(&w) > 1 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    log::warn!("manual clock: a storage thread did not act on the new time");
                    return;
                }
                // Woken when a thread acts; re-checked at least every 10 ms
                // for one that stopped meanwhile.
                let wait = left.min(Duration::from_millis(10));
                st = self
                    .acted
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let (clock, time) = Clock::manual(1_000);
        let (t0, generation) = (clock.now(), clock.generation());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!((clock.now(), clock.wall_ms()), (t0, 1_000));
        assert!(!clock.moved_since(generation));
        // No storage thread watches it: returns at once.
        time.advance(Duration::from_millis(1500));
        assert_eq!(clock.now() - t0, Duration::from_millis(1500));
        assert_eq!(clock.wall_ms(), 2_500);
        assert!(clock.moved_since(generation));
        // Its deadlines: a past one now, a future one when advanced.
        assert!(clock.sleep_until(Some(t0)).is_some());
        assert_eq!(
            clock.sleep_until(Some(clock.now() + Duration::from_secs(1))),
            None
        );
        assert_eq!(Clock::System.sleep_until(Some(t0)), Some(t0));
        assert!(!Clock::System.moved_since(Clock::System.generation()));
    }
}
