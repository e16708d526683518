//! How the storage thread sleeps: in one poll(2) on an eventfd that
//! command senders ring and, while a sync group is in flight, on the I/O
//! backend's completion descriptor. Waiting on both at once is what lets
//! the thread write the appends that arrive during an fdatasync right away,
//! instead of after it (the device then starts them the moment the flush is
//! done, and the next fdatasync covers them).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::time::Instant;

use super::io::EventFd;

/// Longest single sleep while a sync group is in flight: a safety net that
/// re-checks the group should a completion wake-up ever be missed.
const SYNC_SLEEP_MAX: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct Doorbell {
    fd: EventFd,
    /// Set while the storage thread is in (or about to enter) poll: only
    /// then does a sender pay for the eventfd write.
    asleep: AtomicBool,
    /// Set while the thread gathers a fan-in's round (`FanIn`): appends
    /// then wait for its next look instead of waking it one by one.
    hushed: AtomicBool,
}

impl Doorbell {
    pub(crate) fn new() -> io::Result<Doorbell> {
        Ok(Doorbell {
            fd: EventFd::new()?,
            asleep: AtomicBool::new(false),
            hushed: AtomicBool::new(false),
        })
    }

    /// Called after queuing a command (or closing the queue): wakes the
    /// thread if it sleeps.
    pub(crate) fn ring(&self) {
        // Pairs with the fence in `sleep`: either the thread sees the
        // command before it sleeps, or this sees it asleep.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            self.fd.signal();
        }
    }

    /// `ring` for an append: not while hushed. The thread looks at its
    /// queue before every sleep, so an append queued while it unhushes is
    /// seen (the same fence pairing as `ring`).
    pub(crate) fn ring_append(&self) {
        self.ring_if_hushed(false);
    }

    /// For an append that ends a fan-in's wait (a batching producer's,
    /// `fanin::FANIN_DEVICE_RECORDS`): rings through the hush, where
    /// `ring_append` would not.
    pub(crate) fn ring_hushed(&self) {
        self.ring_if_hushed(true);
    }

    fn ring_if_hushed(&self, hushed: bool) {
        fence(Ordering::SeqCst);
        if self.hushed.load(Ordering::SeqCst) == hushed && self.asleep.load(Ordering::SeqCst) {
            self.fd.signal();
        }
    }

    /// Appends ring (`false`) or wait for the thread's next look (`true`).
    pub(crate) fn hush(&self, hushed: bool) {
        self.hushed.store(hushed, Ordering::SeqCst);
    }

    /// Sleeps until the bell rings, `other` polls readable, or `deadline`
    /// passes; returns at once when `work_waiting()` says a command is
    /// queued already. `other` is a sync group's completion descriptor.
    pub(crate) fn sleep(
        &self,
        other: Option<RawFd>,
        deadline: Option<Instant>,
        work_waiting: impl Fn() -> bool,
    ) {
        self.asleep.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let mut rung = false;
        if !work_waiting() {
            let now = Instant::now();
            let mut limit = deadline.map(|d| d.saturating_duration_since(now));
            if other.is_some() {
                limit = Some(limit.map_or(SYNC_SLEEP_MAX, |l| l.min(SYNC_SLEEP_MAX)));
            }
            // Capped: time_t is 32 bits on armv7 (and the alias deprecated on
            // musl); waking after an hour with nothing to do only loops.
            let ts = limit.map(|l| libc::timespec {
                tv_sec: l.as_secs().min(3600) as _,
                tv_nsec: l.subsec_nanos() as libc::c_long,
            });
            let mut fds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: other.unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let n = if other.is_some() { 2 } else { 1 };
            // SAFETY: `fds` and `ts` live across the call; a null timeout
            // means no deadline. EINTR just returns to the caller's loop.
            unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    n,
                    ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
                    std::ptr::null(),
                )
            };
            rung = fds[0].revents & libc::POLLIN != 0;
        }
        self.asleep.store(false, Ordering::SeqCst);
        // Reset only a bell that woke us: most wakes are the disk's, and a
        // read per wake would be a syscall per commit. A ring that raced
        // with `work_waiting` stays set and ends the next sleep at once,
        // which clears it.
        if rung {
            self.fd.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_ring_wakes_a_sleeper_and_a_missed_one_does_not_sleep_through() {
        let bell = Arc::new(Doorbell::new().expect("eventfd"));
        let b = bell.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            b.sleep(None, None, || false);
            start.elapsed()
        });
        // Ring until the sleeper is gone: a ring before it sleeps is lost
        // by design (it would have seen the queued work instead).
        while !t.is_finished() {
            bell.ring();
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().expect("sleeper");
        // Work already queued: no sleep at all, even without a deadline.
        bell.sleep(None, None, || true);
    }

    #[test]
    fn the_deadline_and_the_other_descriptor_end_a_sleep() {
        let bell = Doorbell::new().expect("eventfd");
        let start = Instant::now();
        bell.sleep(None, Some(start + Duration::from_millis(20)), || false);
        assert!(start.elapsed() >= Duration::from_millis(20));
        let other = EventFd::new().expect("eventfd");
        other.signal();
        bell.sleep(Some(other.as_raw_fd()), None, || false);
    }
}
