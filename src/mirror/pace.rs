//! Pacing the mirror: how a round's bytes are divided among the rules
//! ([`divide`]: priorities with a minimum share; [`Shares`]: the same over
//! many rounds of whole batches), the bandwidth cap
//! ([`Bucket`], a token bucket over the bytes sent upstream) and the
//! per-rule rate and time to drain that `skiff mirror status` shows
//! ([`Window`]).
//!
//! The cap never makes an upstream transaction wait: a transaction's first
//! round waits for its tokens before anything of it is sent, and a later
//! round the bucket cannot pay for right away is put back (its cursor does
//! not move) and read again as the next transaction's first round. So a
//! throttled mirror can neither time out a transaction nor lose or repeat
//! a record.

use std::time::{Duration, Instant};

/// The bucket holds this much of the rate: the longest burst after an idle
/// spell.
pub const BURST: Duration = Duration::from_secs(1);

/// The span `rate_bytes_per_s` and `eta_s` are measured over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Samples for [`Window`] are taken at most this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A throttled round plans this part of the bucket: reads return whole
/// local batches, so a round may come out larger than planned and should
/// still fit.
const ROUND_OF_BURST: f64 = 0.5;

/// Upstream bytes per local byte assumed before the first round: the four
/// `skiff.*` headers about double small records.
const RATIO_START: f64 = 2.0;

/// A later round is read only if the bucket holds this part of a full
/// round: a smaller one costs a read for little.
const LATER_ROUND_MIN_FRACTION: f64 = 0.25;

/// A later round is planned this much below what the bucket holds, as the
/// upstream size of the local bytes is only estimated.
const LATER_ROUND_MARGIN: f64 = 0.8;

/// A token bucket of upstream bytes: `rate` per second, at most `burst`
/// held. Tokens may go below zero (a batch larger than the bucket, the
/// checkpoints), and the next round then waits for the debt too.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Full at the start. `rate` > 0 bytes per second.
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate as f64;
        let burst = rate * BURST.as_secs_f64();
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Tokens now (negative while in debt).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// How long until `bytes` may go: until the bucket holds them, or is
    /// full if they are more than it holds.
    pub fn wait_for(&mut self, bytes: u64, now: Instant) -> Duration {
        let need = (bytes as f64).min(self.burst) - self.tokens(now);
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate)
        }
    }

    pub fn take(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }

    pub fn burst(&self) -> f64 {
        self.burst
    }
}

/// Round sizes under the cap (none: every round is `batch_bytes`).
#[derive(Debug)]
pub struct Pace {
    bucket: Option<Bucket>,
    batch_bytes: u64,
    /// Upstream bytes per local byte in the last round read (headers are
    /// added, compression comes later): turns tokens into local bytes.
    ratio: f64,
}

/// Whether a round read may go now.
#[derive(Debug, PartialEq)]
pub enum Admit {
    Now,
    /// A transaction's first round: wait this long, then send.
    After(Duration),
    /// A later round the bucket cannot pay for now: put it back and end
    /// the transaction.
    PutBack,
}

impl Pace {
    /// `max_bytes_per_s` 0: no cap.
    pub fn new(max_bytes_per_s: u64, batch_bytes: u64, now: Instant) -> Self {
        Self {
            bucket: (max_bytes_per_s > 0).then(|| Bucket::new(max_bytes_per_s, now)),
            batch_bytes,
            ratio: RATIO_START,
        }
    }

    fn full_round(&self, bucket: &Bucket) -> u64 {
        let upstream = bucket.burst() * ROUND_OF_BURST;
        self.batch_bytes.min((upstream / self.ratio) as u64).max(1)
    }

    /// Local bytes the next round may read; `None`: end the transaction
    /// (a later round the bucket could pay only a little of).
    pub fn round_budget(&mut self, first: bool, now: Instant) -> Option<u64> {
        let Some(bucket) = &self.bucket else {
            return Some(self.batch_bytes);
        };
        let full = self.full_round(bucket);
        if first {
            return Some(full);
        }
        let bucket = self.bucket.as_mut().expect("checked above");
        let affordable = bucket.tokens(now) * LATER_ROUND_MARGIN / self.ratio;
        (affordable >= full as f64 * LATER_ROUND_MIN_FRACTION)
            .then(|| full.min(affordable as u64).max(1))
    }

    /// A round read `local` bytes, `upstream` once encoded: may it go?
    pub fn admit(&mut self, local: u64, upstream: u64, first: bool, now: Instant) -> Admit {
        if local > 0 && upstream > 0 {
            self.ratio = (upstream as f64 / local as f64).clamp(0.01, 100.0);
        }
        let Some(bucket) = &mut self.bucket else {
            return Admit::Now;
        };
        match bucket.wait_for(upstream, now) {
            d if d.is_zero() => Admit::Now,
            d if first => Admit::After(d),
            _ => Admit::PutBack,
        }
    }

    /// `bytes` go upstream now.
    pub fn spend(&mut self, bytes: u64, now: Instant) {
        if let Some(bucket) = &mut self.bucket {
            bucket.take(bytes, now);
        }
    }
}

/// One source partition's claim on a round.
#[derive(Debug, Clone, Copy)]
pub struct Claim {
    pub rule: usize,
    pub priority: u32,
    /// Local bytes it could read now (estimated; `u64::MAX` unknown, 0
    /// none).
    pub demand: u64,
}

/// Divides `budget` local bytes among `claims`, one allowance each:
///
/// 1. every rule with a backlog gets `share_percent` of the budget (or
///    its demand, if less); when the rules with a backlog are too many
///    for that, each gets an equal part;
/// 2. the rest goes by priority, highest first, evenly among the rules
///    of one priority, each up to its demand;
/// 3. a rule's part is split evenly among its partitions, each up to its
///    demand; what no demand takes is spread over every partition, so
///    records that arrive while a round waits (`linger_ms`) are read too.
pub fn divide(budget: u64, share_percent: u64, claims: &[Claim]) -> Vec<u64> {
    // Per rule: (rule, priority, demand, granted).
    let mut rules: Vec<(usize, u32, u64, u64)> = Vec::new();
    for c in claims {
        match rules.iter_mut().find(|r| r.0 == c.rule) {
            Some(r) => r.2 = r.2.saturating_add(c.demand),
            None => rules.push((c.rule, c.priority, c.demand, 0)),
        }
    }
    let waiting = rules.iter().filter(|r| r.2 > 0).count() as u64;
    if waiting > 0 {
        let floor = if share_percent * waiting > 100 {
            budget / waiting
        } else {
            budget * share_percent / 100
        };
        for r in &mut rules {
            r.3 = floor.min(r.2);
        }
    }
    let mut rest = budget - rules.iter().map(|r| r.3).sum::<u64>();
    // Priorities from the highest down (no sort: a few rules, less code).
    let mut above = None;
    while let Some(level) = rules
        .iter()
        .map(|r| r.1)
        .filter(|&p| above.is_none_or(|a| p < a))
        .max()
    {
        above = Some(level);
        let members: Vec<usize> = (0..rules.len()).filter(|&i| rules[i].1 == level).collect();
        let wants: Vec<u64> = members.iter().map(|&i| rules[i].2 - rules[i].3).collect();
        for (&i, got) in members.iter().zip(fill(rest, &wants)) {
            rules[i].3 += got;
            rest -= got;
        }
    }
    let mut out = vec![0u64; claims.len()];
    for &(rule, _, _, granted) in &rules {
        let mine: Vec<usize> = (0..claims.len())
            .filter(|&i| claims[i].rule == rule)
            .collect();
        let wants: Vec<u64> = mine.iter().map(|&i| claims[i].demand).collect();
        for (&i, got) in mine.iter().zip(fill(granted, &wants)) {
            out[i] = got;
        }
    }
    let spare = budget - out.iter().sum::<u64>();
    let n = out.len().max(1) as u64;
    for (i, o) in out.iter_mut().enumerate() {
        *o += spare / n + u64::from((i as u64) < spare % n);
    }
    out
}

/// [`divide`] over many rounds. A partition's read returns whole local
/// batches, so a small part (a minimum share) still reads a batch that may
/// be far larger. Each rule therefore keeps a credit: its part of every
/// round is added, the bytes it read are taken off, and a rule in debt sits
/// rounds out until the parts it missed have paid for what it read (a
/// deficit round robin). Over a catch-up, each rule reads its parts.
#[derive(Debug)]
pub struct Shares {
    /// Per rule, local bytes; at most one round's part (no hoarding).
    credit: Vec<i64>,
}

impl Shares {
    pub fn new(rules: usize) -> Self {
        Self {
            credit: vec![0; rules],
        }
    }

    /// [`divide`], then 0 for the partitions of rules in debt.
    pub fn plan(&mut self, budget: u64, share_percent: u64, claims: &[Claim]) -> Vec<u64> {
        let mut out = divide(budget, share_percent, claims);
        let mut part = vec![0i64; self.credit.len()];
        let mut waiting = vec![false; self.credit.len()];
        for (c, &a) in claims.iter().zip(&out) {
            part[c.rule] = part[c.rule].saturating_add(i64::try_from(a).unwrap_or(i64::MAX));
            waiting[c.rule] |= c.demand > 0;
        }
        // As many rounds' parts as it takes for some rule to read (rounds
        // where every rule would sit out are skipped, not waited for).
        let rounds = (0..part.len())
            .filter(|&r| waiting[r] && part[r] > 0)
            .map(|r| {
                let need = 1i64.saturating_sub(self.credit[r]).max(1);
                need.saturating_add(part[r] - 1) / part[r]
            })
            .min()
            .unwrap_or(1)
            .max(1);
        for (r, credit) in self.credit.iter_mut().enumerate() {
            *credit = if waiting[r] {
                credit
                    .saturating_add(rounds.saturating_mul(part[r]))
                    .min(part[r])
            } else {
                0 // no backlog: no debt
            };
        }
        for (c, a) in claims.iter().zip(&mut out) {
            if waiting[c.rule] && self.credit[c.rule] <= 0 {
                *a = 0;
            }
        }
        out
    }

    /// `rule` read `bytes` local bytes (sent in this transaction).
    pub fn spend(&mut self, rule: usize, bytes: u64) {
        if let Some(c) = self.credit.get_mut(rule) {
            *c = c.saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

/// Gives out `amount` evenly among `wants`, none more than it wants: each
/// pass gives every one still wanting an even part, and what the smaller
/// wants leave is shared again (a remainder under one byte each is left).
fn fill(amount: u64, wants: &[u64]) -> Vec<u64> {
    let mut out = vec![0; wants.len()];
    let mut left = amount;
    loop {
        let open: Vec<usize> = (0..wants.len()).filter(|&i| out[i] < wants[i]).collect();
        let each = left / (open.len().max(1) as u64);
        if open.is_empty() || each == 0 {
            return out;
        }
        for i in open {
            let give = each.min(wants[i] - out[i]);
            out[i] += give;
            left -= give;
        }
    }
}

/// A rule's rate and time to drain, from samples of its upstream bytes
/// committed and its backlog over the last [`WINDOW`].
#[derive(Debug, Default)]
pub struct Window {
    /// (when, upstream bytes committed since start, backlog records), at
    /// least [`SAMPLE_EVERY`] apart, the oldest at most [`WINDOW`] old.
    samples: Vec<(Instant, u64, u64)>,
}

impl Window {
    /// Records a sample; returns the rate in bytes per second and the
    /// seconds to drain the backlog at its net drain rate (`None`: no
    /// backlog, or it did not shrink over the window).
    pub fn observe(&mut self, now: Instant, committed: u64, backlog: u64) -> (u64, Option<u64>) {
        let old = self
            .samples
            .iter()
            .take_while(|s| now.saturating_duration_since(s.0) > WINDOW)
            .count();
        self.samples.drain(..old);
        if self
            .samples
            .last()
            .is_none_or(|s| now.saturating_duration_since(s.0) >= SAMPLE_EVERY)
        {
            self.samples.push((now, committed, backlog));
        }
        let (at, committed_then, backlog_then) = self.samples[0];
        let dt = now.saturating_duration_since(at).as_secs_f64();
        if dt < SAMPLE_EVERY.as_secs_f64() {
            return (0, None);
        }
        let rate = committed.saturating_sub(committed_then) as f64 / dt;
        let drain = backlog_then.saturating_sub(backlog) as f64 / dt;
        let eta = (backlog > 0 && drain > 0.0).then(|| (backlog as f64 / drain).ceil() as u64);
        (rate as u64, eta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNKNOWN: u64 = u64::MAX;

    fn claim(rule: usize, priority: u32, demand: u64) -> Claim {
        Claim {
            rule,
            priority,
            demand,
        }
    }

    #[test]
    fn the_higher_priority_takes_all_but_the_minimum_share() {
        let claims = [claim(0, 0, UNKNOWN), claim(1, 9, UNKNOWN)];
        assert_eq!(divide(1000, 10, &claims), [100, 900]);
        // Two low rules each keep their share.
        let claims = [
            claim(0, 0, UNKNOWN),
            claim(1, 9, UNKNOWN),
            claim(2, 1, UNKNOWN),
        ];
        assert_eq!(divide(1000, 10, &claims), [100, 800, 100]);
        // Too many rules for 40% each: an equal part each.
        assert_eq!(divide(900, 40, &claims), [300, 300, 300]);
    }

    #[test]
    fn what_a_rule_does_not_need_goes_to_the_next() {
        // The high rule needs 300: the low one gets the rest.
        let claims = [claim(0, 0, UNKNOWN), claim(1, 9, 300)];
        assert_eq!(divide(1000, 10, &claims), [700, 300]);
        // Equal priorities split evenly, up to their demand.
        let claims = [claim(0, 5, 100), claim(1, 5, UNKNOWN), claim(2, 5, UNKNOWN)];
        assert_eq!(divide(1000, 10, &claims), [100, 450, 450]);
    }

    #[test]
    fn partitions_split_their_rule_and_idle_ones_get_the_spare() {
        // Rule 1 (two partitions, one idle) outranks rule 0.
        let claims = [claim(0, 0, UNKNOWN), claim(1, 9, UNKNOWN), claim(1, 9, 0)];
        assert_eq!(divide(1000, 10, &claims), [100, 900, 0]);
        // Nothing waits: everyone gets an even part of the budget.
        let claims = [claim(0, 0, 0), claim(1, 9, 0), claim(1, 9, 0)];
        assert_eq!(divide(1000, 10, &claims), [334, 333, 333]);
        // Demands below the budget: the spare is spread over all.
        let claims = [claim(0, 0, 100), claim(1, 9, 200)];
        assert_eq!(divide(1000, 10, &claims), [450, 550]);
    }

    #[test]
    fn a_rule_that_read_a_large_batch_sits_rounds_out() {
        let mut shares = Shares::new(2);
        let claims = [claim(0, 0, UNKNOWN), claim(1, 9, UNKNOWN)];
        assert_eq!(shares.plan(1000, 10, &claims), [100, 900]);
        // The low rule's read was one batch of 500 bytes: 4 rounds' debt.
        shares.spend(0, 500);
        shares.spend(1, 900);
        let mut low_rounds = 0;
        for _ in 0..9 {
            let plan = shares.plan(1000, 10, &claims);
            assert_eq!(plan[1], 900, "the high rule reads every round");
            if plan[0] > 0 {
                low_rounds += 1;
                shares.spend(0, 500);
            }
            shares.spend(1, 900);
        }
        // 10 rounds of 100 bytes pay for two batches of 500.
        assert_eq!(low_rounds, 1);
        // When every rule is in debt, the rounds that would read nothing
        // are skipped.
        shares.spend(1, 10_000);
        shares.spend(0, 10_000);
        let plan = shares.plan(1000, 10, &claims);
        assert!(plan[0] > 0 || plan[1] > 0, "{plan:?}");
        // A rule without a backlog drops its debt.
        let idle = [claim(0, 0, 0), claim(1, 9, UNKNOWN)];
        shares.plan(1000, 10, &idle);
        assert_eq!(shares.credit[0], 0);
    }

    #[test]
    fn a_bucket_bounds_what_goes_over_any_span() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, t0);
        // Full at the start: one second's worth goes at once.
        assert_eq!(b.wait_for(1000, t0), Duration::ZERO);
        b.take(1000, t0);
        assert_eq!(b.wait_for(500, t0), Duration::from_millis(500));
        // More than the bucket holds waits for a full bucket, then leaves
        // a debt that the next wait pays.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.wait_for(5000, t1), Duration::ZERO);
        b.take(5000, t1);
        assert_eq!(b.wait_for(500, t1), Duration::from_millis(4500));
        // Idle time fills it only up to one second's worth.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.tokens(t2), 1000.0);
    }

    #[test]
    fn a_throttled_transaction_waits_only_before_its_first_round() {
        let t0 = Instant::now();
        let mut p = Pace::new(10_000, 1 << 20, t0);
        // A full round is half a second of the rate, in local bytes at the
        // assumed 2 upstream bytes each.
        assert_eq!(p.round_budget(true, t0), Some(2_500));
        // Headers double the bytes upstream; a full bucket pays for them
        // (the debt is paid by what comes next).
        assert_eq!(p.admit(10_000, 20_000, true, t0), Admit::Now);
        p.spend(20_000, t0);
        // A later round would put back what it read...
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(p.round_budget(false, t1), None);
        assert_eq!(p.admit(100, 200, false, t1), Admit::PutBack);
        // ...and the next first round waits for the debt and its own bytes.
        assert_eq!(
            p.admit(5_000, 10_000, true, t1),
            Admit::After(Duration::from_millis(1500))
        );
        // The ratio follows what the rounds show.
        assert_eq!(
            p.admit(2_500, 2_500, true, t1),
            Admit::After(Duration::from_millis(750))
        );
        assert_eq!(p.round_budget(true, t1), Some(5_000));
        // No cap: batch_bytes, and never a wait.
        let mut free = Pace::new(0, 4096, t0);
        assert_eq!(free.round_budget(false, t0), Some(4096));
        assert_eq!(free.admit(4096, 1 << 30, false, t0), Admit::Now);
    }

    #[test]
    fn rate_and_eta_come_from_the_window() {
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.observe(t0, 0, 1000), (0, None));
        let t = |s: u64| t0 + Duration::from_secs(s);
        // 100 bytes/s, and the backlog shrinks 50 records/s.
        assert_eq!(w.observe(t(2), 200, 900), (100, Some(18)));
        // A growing backlog has no ETA.
        assert_eq!(w.observe(t(4), 400, 1200), (100, None));
        // Samples older than the window leave it.
        assert_eq!(w.observe(t(20), 400, 0), (0, None));
    }
}
