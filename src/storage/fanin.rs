//! A fan-in's round: many producers, each awaiting one ack, gathered into
//! one flush.
//!
//! With the flush quicker than the network threads' round through every
//! producer (this VM's disk: 0.25 ms against 25 ms for 1,000 producers),
//! flushing whatever has arrived splits every round over dozens of
//! flushes of a dozen records each. Those flushes make no producer wait
//! less while the CPU is the bottleneck: by Little's law a closed loop's
//! latency is its producers over its rate. They cost CPU (an fdatasync and
//! a write each, a third of the storage thread's time there) and, on an
//! SD card, wear. So after a group whose acks went to many producers with
//! a record or two each, the next flush (and the writes before it) waits
//! for more: until every one of those producers has sent again, until
//! none has for `gap` (`StorageConfig::sync_hold_max`) once the first has,
//! or for `StorageConfig::fanin_wait` (`storage.fanin_wait_ms`) at most.
//!
//! Only where the producers take several flushes to answer: where most
//! answer sooner (16 producers with 0.25 ms flushes), groups alternating
//! keep the device flushing one while the CPU works on the other, and
//! waiting for all of them would idle the device each round (0.95 of the
//! rate in A/B), for an fdatasync saved every few records. (With 0.1 ms
//! flushes, 16 producers count as slow: docs/performance.md, "Fan-in".)
//! Each fan-in group's producers are
//! followed whether or not the flush after it waits, and how many answered
//! within `FANIN_QUICK_FLUSHES` flushes decides for the next group.
//!
//! Groups too small to be a fan-in on their own are gathered, for a
//! wait's length at most, until their producers are enough and have had
//! `FANIN_QUICK_FLUSHES` flushes' time, with none of them back meanwhile
//! (a closed loop's are); then they are a fan-in group, followed and
//! judged as one. Behind a fast device's flushes, devices on a timetable
//! come two or three a group: judged group by group, they were never a
//! fan-in.
//!
//! The bound is what a fleet of devices that send now and then (an open
//! loop, which no waiting speeds up) pays in latency for the flushes it
//! saves. A producer that batches pays in rate, so its batch ends a wait
//! (`FANIN_DEVICE_RECORDS`).

use std::time::{Duration, Instant};

/// A group's acks to at least this many producers, ...
const FANIN_MIN_PRODUCERS: usize = 8;
/// ... with at most this many appends each, make a fan-in: deep windows
/// (a producer pipelining its records) are not waited for, their next
/// appends are queued already.
const FANIN_APPENDS_PER_PRODUCER: usize = 2;
/// Producers of whom half answer within this many flushes' time are not
/// waited for.
const FANIN_QUICK_FLUSHES: u32 = 4;
/// A batch of more records than this comes from a producer that batches
/// or keeps a window in flight: its rate waits on every flush, so its
/// append ends a fan-in's wait (a producer of 1,000 records in flight
/// beside 200 devices made 0.53 of its rate with the wait, in A/B, and
/// the devices no more).
pub(crate) const FANIN_DEVICE_RECORDS: u32 = 8;

/// Bytes the fan-in state holds for `producers`: a 32-bit hash and an
/// answered bit each. (The embedded default's memory budget had 448 bytes
/// to spare under its 64 MiB.)
pub(crate) const fn fanin_bytes(producers: usize) -> usize {
    producers * 4 + producers.div_ceil(64) * 8
}

/// A producer id's 32-bit hash (Fibonacci hashing: ids handed out in
/// sequence spread over its top bits, which `producer_bit` in `commit`
/// takes). Two producers sharing one count as one, which only ends a wait
/// an answer early.
pub(super) fn hash(producer: u64) -> u32 {
    (producer.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
}

pub(super) struct FanIn {
    /// The producers a round is followed for, at most: the first ones
    /// acked. Fixed at start-up, as the memory budget counts it.
    cap: usize,
    /// The idempotent producers the last group acked (`hash`), sorted;
    /// while a group's acks are collected, that group's, unsorted (after
    /// those of the small groups gathered before it, `gathering_since`).
    ids: Vec<u32>,
    /// Which of `ids` have sent again, a bit each.
    back: Vec<u64>,
    /// How many of `ids` have not.
    left: usize,
    /// Whether the last group's producers answered slowly, taken when the
    /// next group's acks began to be collected (into `ids`).
    collecting: Option<bool>,
    /// Appends the group being acked covered.
    appends: usize,
    /// `ids` are a fan-in group's producers, followed.
    tracking: bool,
    /// The next flush waits for them.
    active: bool,
    /// A batching producer's append came: the wait is over.
    cut: bool,
    /// When the acks went out, and when the last answer came.
    since: Instant,
    last: Instant,
    /// Answers that came within `FANIN_QUICK_FLUSHES` of the acks, and
    /// until when.
    quick: usize,
    quick_until: Instant,
    /// The last wait ended with none of its producers back: devices on a
    /// timetable, which send again seconds later.
    none_came: bool,
    /// Groups too small to be a fan-in have been gathered into `ids`
    /// since then (a fast device's flushes between devices on a
    /// timetable): how many entries at its front they are, sorted, and
    /// their appends; and whether the producers followed before the
    /// gathering began answered slowly.
    gathering_since: Option<Instant>,
    gathered_len: usize,
    gathered_appends: usize,
    gathered_slow: bool,
}

impl FanIn {
    pub(super) fn new(now: Instant, cap: usize) -> FanIn {
        FanIn {
            cap,
            ids: Vec::with_capacity(cap),
            back: vec![0; cap.div_ceil(64)],
            left: 0,
            collecting: None,
            appends: 0,
            tracking: false,
            active: false,
            cut: false,
            since: now,
            last: now,
            quick: 0,
            quick_until: now,
            none_came: false,
            gathering_since: None,
            gathered_len: 0,
            gathered_appends: 0,
            gathered_slow: false,
        }
    }

    /// Whether the producers being followed answered slowly. Unknown until
    /// a fan-in group has been followed: not waited for.
    fn slow(&self) -> bool {
        self.tracking && self.quick * 2 < self.ids.len()
    }

    /// An append of the group being acked, from `producer`. The group's
    /// acks and `start` follow in one go, with no answer between.
    pub(super) fn collect(&mut self, producer: u64) {
        if self.collecting.is_none() {
            self.collecting = Some(self.slow());
            if self.gathering_since.is_none() {
                self.ids.clear();
            }
            self.tracking = false;
            self.active = false;
        }
        self.appends += 1;
        // A pipelining producer's appends come in a row: one entry.
        let h = hash(producer);
        if producer != crate::batch::NO_PRODUCER_ID
            && self.ids.len() < self.cap
            && self.ids.last() != Some(&h)
        {
            self.ids.push(h);
        }
    }

    /// The group's acks went out: whether the next flush waits for their
    /// producers (see the module's comment). `flush` is how long a flush
    /// takes; `wait` is false where no hold applies (a pipelined
    /// fdatasync, holds turned off); `max` is the longest wait.
    pub(super) fn start(
        &mut self,
        now: Instant,
        flush: Duration,
        wait: bool,
        max: Duration,
    ) -> bool {
        let slow = match self.collecting.take() {
            Some(slow) => slow,
            None => {
                // A group that acked nothing (an `interval` sync).
                let slow = self.slow();
                self.ids.clear();
                self.gathering_since = None;
                slow
            }
        };
        self.active = false;
        self.cut = false;
        self.tracking = false;
        let mut appends = std::mem::take(&mut self.appends);
        if let Some(t) = self.gathering_since {
            // What was gathered is let go once older than a wait, or once
            // one of its producers came back in this group (a closed
            // loop, whose groups are judged as they come).
            let (before, group) = self.ids.split_at(self.gathered_len);
            let came_back = group.iter().any(|h| before.binary_search(h).is_ok());
            if now >= t + max || came_back {
                self.ids.drain(..self.gathered_len);
                self.gathering_since = None;
            } else {
                appends += self.gathered_appends;
            }
        }
        let gathered = self.gathering_since.is_some();
        self.ids.sort_unstable();
        self.ids.dedup();
        // A gathering is judged once its producers have had the time a
        // followed group's have to answer quickly.
        let judged = self
            .gathering_since
            .is_none_or(|t| now >= t + flush * FANIN_QUICK_FLUSHES);
        let few_each = appends <= self.ids.len() * FANIN_APPENDS_PER_PRODUCER;
        let fan_in = self.ids.len() >= FANIN_MIN_PRODUCERS && few_each && judged;
        if !wait || !fan_in {
            // Too few producers yet, a record or two each: gathered with
            // the next groups, for a wait's length at most. Judged by one
            // group alone, devices on a timetable behind flushes of 0.2 ms
            // (two or three a group) were never waited for, unless a slow
            // flush happened to gather eight; runs of 10,000 devices
            // settled either way (docs/performance.md, "Fan-in").
            if wait && few_each {
                if self.gathering_since.is_none() {
                    self.gathering_since = Some(now);
                    self.gathered_slow = slow;
                }
                self.gathered_len = self.ids.len();
                self.gathered_appends = appends;
            } else {
                self.ids.clear();
                self.gathering_since = None;
            }
            self.none_came = false;
            return false;
        }
        // Gathered from small groups, a fan-in is waited for as the group
        // that began the gathering would have been, and followed as any
        // other.
        let slow = if gathered { self.gathered_slow } else { slow };
        self.gathering_since = None;
        self.back.fill(0);
        self.left = self.ids.len();
        self.since = now;
        self.last = now;
        self.quick = 0;
        self.quick_until = now + flush * FANIN_QUICK_FLUSHES;
        self.tracking = true;
        self.active = slow;
        self.none_came &= slow;
        slow
    }

    /// An append of `records` from `producer` arrived.
    pub(super) fn answered(&mut self, producer: u64, records: u32, now: Instant) {
        if records > FANIN_DEVICE_RECORDS {
            self.cut |= self.active;
        }
        if !self.tracking || self.left == 0 {
            return;
        }
        let Ok(i) = self.ids.binary_search(&hash(producer)) else {
            return;
        };
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.back[word] & bit == 0 {
            self.back[word] |= bit;
            self.left -= 1;
            self.last = now;
            if now <= self.quick_until {
                self.quick += 1;
            }
        }
    }

    /// Whether the next flush still waits for the round, for at most
    /// `max`, and `gap` between answers.
    pub(super) fn holding(&self, now: Instant, gap: Duration, max: Duration) -> bool {
        self.active && !self.cut && self.left > 0 && now < self.deadline(gap, max)
    }

    /// When the wait ends if no answer comes meanwhile.
    pub(super) fn deadline(&self, gap: Duration, max: Duration) -> Instant {
        if self.cut {
            return self.since;
        }
        let cap = self.since + max;
        // Under a backlog, the first answer takes the network threads'
        // whole round; the ones after it come close together.
        if self.left == self.ids.len() {
            return cap;
        }
        (self.last + gap).min(cap)
    }

    pub(super) fn active(&self) -> bool {
        self.active
    }

    /// When the storage thread next looks at the appends hushed since
    /// `now`. Once the round has begun to come in, every quarter `gap`,
    /// so the flush starts soon after its last producer is back. Before
    /// that a first answer only starts the gap: every `gap`. And where
    /// the last wait saw none of its producers back, a `gap` before its
    /// end and at it: looks before would find only devices not waited
    /// for (at 10,000 devices sending once a second they were three
    /// quarters of the thread's wake-ups, docs/performance.md, "Fan-in"),
    /// and the one a gap early writes most of the round, so the flush
    /// need not wait for that at the end.
    pub(super) fn next_look(&self, now: Instant, gap: Duration, max: Duration) -> Instant {
        let end = self.deadline(gap, max);
        let step = if self.left < self.ids.len() {
            gap / 4
        } else if self.none_came {
            return match end.checked_sub(gap) {
                Some(early) if early > now => early,
                _ => end,
            };
        } else {
            gap
        };
        (now + step).min(end)
    }

    /// The flush starts: the wait is over. Returns how long it lasted.
    pub(super) fn end(&mut self, now: Instant) -> Duration {
        self.none_came = self.tracking && !self.cut && self.left == self.ids.len();
        self.active = false;
        self.cut = false;
        now.saturating_duration_since(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 4096;
    const GAP: Duration = Duration::from_millis(1);
    const FANIN_HOLD_MAX: Duration = Duration::from_millis(10);
    const FLUSH: Duration = Duration::from_micros(250 * FANIN_QUICK_FLUSHES as u64);
    const FLUSH_EACH: Duration = Duration::from_micros(250);

    fn round(f: &mut FanIn, producers: impl IntoIterator<Item = u64>, now: Instant) -> bool {
        for p in producers {
            f.collect(p);
        }
        f.start(now, FLUSH_EACH, true, FANIN_HOLD_MAX)
    }

    /// A fan-in of `ids` whose answers all came later than `FLUSH` (the
    /// quick flushes' time): the
    /// next group of `next` is waited for.
    fn slow_round(
        f: &mut FanIn,
        ids: std::ops::Range<u64>,
        next: std::ops::Range<u64>,
        t: Instant,
    ) -> Instant {
        round(f, ids.clone(), t);
        let late = t + FLUSH * 2;
        for p in ids {
            f.answered(p, 1, late);
        }
        assert!(round(f, next, late), "slow answers: waited for");
        late
    }

    #[test]
    fn a_round_is_waited_for_until_every_producer_answers() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        assert!(!round(&mut f, 1..=10, t0), "nothing known yet");
        let mut now = slow_round(&mut f, 11..21, 1..11, t0);
        for p in (1..=10).rev() {
            assert!(f.holding(now, GAP, FANIN_HOLD_MAX));
            // Answers half a gap apart keep it going past the first gap.
            now += GAP / 2;
            f.answered(p, 1, now);
            // A repeat and a stranger do not count.
            f.answered(p, 1, now);
            f.answered(99, 1, now);
        }
        assert!(!f.holding(now, GAP, FANIN_HOLD_MAX), "all ten answered");
    }

    #[test]
    fn producers_answering_within_a_flush_are_not_waited_for() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        let t1 = slow_round(&mut f, 1..11, 11..21, t0);
        // Six of ten within a flush: quick.
        for p in 11..17 {
            f.answered(p, 1, t1 + FLUSH / 2);
        }
        let t2 = t1 + FLUSH;
        assert!(!round(&mut f, 1..11, t2));
        // Four of ten within a flush, the rest later: slow again.
        for p in 1..5 {
            f.answered(p, 1, t2 + FLUSH / 2);
        }
        for p in 5..11 {
            f.answered(p, 1, t2 + FLUSH * 2);
        }
        assert!(round(&mut f, 11..21, t2 + FLUSH * 2));
    }

    #[test]
    fn the_first_answer_is_waited_for_up_to_the_bound_the_next_for_a_gap() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        let t1 = slow_round(&mut f, 11..21, 1..11, t0);
        assert!(f.holding(t1 + FANIN_HOLD_MAX / 2, GAP, FANIN_HOLD_MAX));
        assert!(!f.holding(t1 + FANIN_HOLD_MAX, GAP, FANIN_HOLD_MAX));
        let first = t1 + FANIN_HOLD_MAX / 2;
        f.answered(3, 1, first);
        assert!(f.holding(first + GAP / 2, GAP, FANIN_HOLD_MAX));
        assert!(!f.holding(first + GAP, GAP, FANIN_HOLD_MAX));
        assert_eq!(f.end(first + GAP), first + GAP - t1, "how long it waited");
        assert!(!f.holding(first, GAP, FANIN_HOLD_MAX));

        // Answers that keep coming are not waited for past the bound.
        let n = 4000u64;
        let t2 = slow_round(&mut f, 5000..5000 + n, 0..n, first);
        let mut now = t2;
        for p in 0..n - 1 {
            now += GAP / 2;
            f.answered(p, 1, now);
            if now >= t2 + FANIN_HOLD_MAX {
                break;
            }
        }
        assert!(!f.holding(now, GAP, FANIN_HOLD_MAX));
    }

    #[test]
    fn a_batching_producers_append_ends_the_wait() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        let t1 = slow_round(&mut f, 11..21, 1..11, t0);
        // A device's small batch, from a producer not waited for: the
        // wait goes on.
        f.answered(500, FANIN_DEVICE_RECORDS, t1);
        assert!(f.holding(t1, GAP, FANIN_HOLD_MAX));
        // A window of a batching producer: it waits on this flush.
        f.answered(501, FANIN_DEVICE_RECORDS + 1, t1);
        assert!(!f.holding(t1, GAP, FANIN_HOLD_MAX));
        assert!(
            f.deadline(GAP, FANIN_HOLD_MAX) <= t1,
            "wakes the thread now"
        );
        assert!(f.active(), "the flush ends the wait");
        f.end(t1);
        // Not carried into the next round.
        let t2 = slow_round(&mut f, 11..21, 1..11, t1);
        assert!(f.holding(t2, GAP, FANIN_HOLD_MAX));
        // Nor does one that comes between waits start one cut.
        f.end(t2);
        f.answered(501, 1000, t2);
        let t3 = slow_round(&mut f, 11..21, 1..11, t2);
        assert!(f.holding(t3, GAP, FANIN_HOLD_MAX));
    }

    #[test]
    fn a_wait_after_one_whose_producers_never_came_looks_only_near_its_end() {
        let look = |f: &FanIn, now: Instant| f.next_look(now, GAP, FANIN_HOLD_MAX);
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        let t1 = slow_round(&mut f, 11..21, 1..11, t0);
        // None back yet: a first answer only starts the gap.
        assert_eq!(look(&f, t1), t1 + GAP);
        // The round comes in: looked at often, to flush once it is in.
        f.answered(3, 1, t1 + GAP);
        assert_eq!(look(&f, t1 + GAP), t1 + GAP + GAP / 4);
        f.end(t1 + GAP * 2);

        // A wait none of whose producers came (devices on a timetable).
        let t2 = slow_round(&mut f, 21..31, 31..41, t1 + GAP * 2);
        assert_eq!(look(&f, t2), t2 + GAP);
        let t3 = t2 + FANIN_HOLD_MAX;
        assert!(!f.holding(t3, GAP, FANIN_HOLD_MAX), "ends on its bound");
        f.end(t3);
        // The next wait looks a gap before its end and at it, until its
        // round comes in.
        assert!(round(&mut f, 41..51, t3), "still slow: waited for");
        let early = t3 + FANIN_HOLD_MAX - GAP;
        assert_eq!(look(&f, t3), early);
        assert_eq!(look(&f, early), t3 + FANIN_HOLD_MAX);
        f.answered(45, 1, t3 + GAP);
        assert_eq!(look(&f, t3 + GAP), t3 + GAP + GAP / 4);

        // A wait that ends with some back: the next looks every gap again.
        f.end(t3 + GAP * 2);
        let t4 = slow_round(&mut f, 51..61, 61..71, t3 + GAP * 2);
        assert_eq!(look(&f, t4), t4 + GAP);
    }

    #[test]
    fn small_groups_of_devices_on_a_timetable_are_gathered_into_a_fan_in() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        // Three devices a flush, each new. Nine after three flushes, but a
        // fan-in only once they have had four flushes' time to come back.
        let at = |k: u32| t0 + FLUSH_EACH * k;
        let flush = |f: &mut FanIn, k: u32| {
            let first = 1 + 3 * u64::from(k);
            round(f, first..first + 3, at(k))
        };
        for k in 0..4 {
            assert!(!flush(&mut f, k), "flush {k}");
            assert!(!f.tracking, "flush {k}: not yet a fan-in");
        }
        assert!(!flush(&mut f, 4), "nothing known of them yet");
        assert!(f.tracking, "followed");
        // None came back within four flushes: the next gathering is
        // waited for.
        for k in 5..9 {
            assert!(!flush(&mut f, k), "flush {k}");
        }
        assert!(flush(&mut f, 9), "slow: waited for");
        assert!(f.holding(at(9), GAP, FANIN_HOLD_MAX));
        // Its producers are the fifteen gathered.
        for p in 16..31 {
            f.answered(p, 1, at(9) + GAP / 2);
        }
        assert!(!f.holding(at(9) + GAP / 2, GAP, FANIN_HOLD_MAX), "all back");
    }

    #[test]
    fn small_groups_of_a_closed_loop_are_not_waited_for() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        // Twelve producers, four a flush, each back three flushes later:
        // a record or two each, but they come back.
        let at = |k: u32| t0 + FLUSH_EACH * k;
        for k in 0..20 {
            let first = 1 + 4 * u64::from(k % 3);
            let ids = first..first + 4;
            for p in ids.clone() {
                f.answered(p, 1, at(k));
            }
            assert!(!round(&mut f, ids, at(k)), "flush {k}");
        }
        assert!(!f.tracking, "they come back: never gathered into one");
    }

    #[test]
    fn small_groups_are_gathered_for_a_wait_at_most() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        assert!(!round(&mut f, 1..4, t0));
        assert!(!round(&mut f, 4..7, t0 + FANIN_HOLD_MAX / 2));
        // Past the bound: what was gathered is let go, and this group
        // starts anew.
        assert!(!round(&mut f, 7..10, t0 + FANIN_HOLD_MAX));
        assert!(!f.tracking);
        let at = |k: u32| t0 + FANIN_HOLD_MAX + FLUSH_EACH * k;
        assert!(!round(&mut f, 10..13, at(1)));
        assert!(!round(&mut f, 13..16, at(2)));
        assert!(!round(&mut f, 16..19, at(3)));
        assert!(!f.tracking, "nine, not yet judged");
        assert!(!round(&mut f, 19..22, at(5)));
        assert!(f.tracking, "gathered since the bound: a fan-in");

        // A group large enough alone, after a gathering past the bound,
        // is a fan-in on its own.
        let t1 = at(5) + FANIN_HOLD_MAX;
        assert!(!round(&mut f, 100..103, t1));
        assert!(!round(&mut f, 200..210, t1 + FANIN_HOLD_MAX));
        assert!(f.tracking, "ten producers: followed");
        assert_eq!(f.ids.len(), 10, "without the three gathered before");
    }

    #[test]
    fn few_producers_and_deep_windows_are_not_a_fan_in() {
        let t0 = Instant::now();
        let mut f = FanIn::new(t0, CAP);
        let slow = |f: &mut FanIn| {
            slow_round(f, 100..120, 200..220, t0);
        };
        slow(&mut f);
        assert!(!round(&mut f, 1..FANIN_MIN_PRODUCERS as u64, t0));
        // Eight producers with three appends each: pipelines.
        slow(&mut f);
        let ids = (1..=8u64).cycle().take(24).collect::<Vec<_>>();
        assert!(!round(&mut f, ids, t0));
        // Not idempotent: cannot be told apart.
        slow(&mut f);
        let none = std::iter::repeat_n(crate::batch::NO_PRODUCER_ID, 20);
        assert!(!round(&mut f, none, t0));
        // Not waited for where holds do not apply.
        slow(&mut f);
        for p in 1..=10 {
            f.collect(p);
        }
        assert!(!f.start(t0, FLUSH_EACH, false, FANIN_HOLD_MAX));
        // More producers than it keeps: the first ones are waited for.
        let many = CAP as u64 + 10;
        slow_round(&mut f, 10_000..10_000 + many, 0..many, t0);
        for p in 0..many {
            f.answered(p, 1, t0);
        }
        assert!(!f.holding(t0, GAP, FANIN_HOLD_MAX));
    }
}
