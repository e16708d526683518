//! Quotas and connection limits, per identity and per source address.
//!
//! Byte rates are token buckets shared by all of an identity's
//! connections, holding at most one second of its rate. A request that
//! takes more than the bucket holds leaves it in debt, and the answer is
//! held back until the debt is paid (the throttle time, returned in the
//! answer as `throttle_ms`), while its connection reads nothing more:
//! Kafka's way, so a greedy producer slows down and no byte is dropped.
//!
//! State lives only while it matters: an identity's or an address's entry
//! is kept while it has connections or owes time, so the maps stay within
//! a few times `server.max_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{QuotaOverride, QuotasConfig};
use crate::metrics::RefusalReason;

use super::acl::glob_match;

/// The longest one answer is held back: below the client's request timeout
/// (30 s by default), so a throttled request is never mistaken for a lost
/// one. A larger debt is paid over the next answers.
pub const THROTTLE_MS_MAX: u64 = 5_000;
/// How much of its rate a bucket holds: a client may burst this long at
/// full speed before it is throttled.
const BURST: Duration = Duration::from_secs(1);
/// Past this many entries, idle ones (no connection, nothing owed) are
/// swept out when a new one is added.
const SWEEP_ENTRIES_MIN: usize = 64;

/// A token bucket of bytes (or connections) per second. `tokens` may go
/// negative: that is the debt a throttle pays.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(now: Instant, rate: u64) -> Bucket {
        Bucket {
            tokens: rate as f64 * BURST.as_secs_f64(),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: u64) {
        let cap = rate as f64 * BURST.as_secs_f64();
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate as f64).min(cap);
        self.at = now;
    }

    /// Takes `n` and returns how long until the bucket is out of debt.
    fn take(&mut self, now: Instant, rate: u64, n: u64) -> Duration {
        self.refill(now, rate);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate as f64)
        }
    }

    /// Whether it is full again (an idle entry that can be forgotten).
    fn full(&self, now: Instant, rate: u64) -> bool {
        let mut b = self.clone();
        b.refill(now, rate);
        b.tokens >= rate as f64 * BURST.as_secs_f64()
    }
}

/// One identity's usage.
#[derive(Debug)]
struct IdentityUse {
    connections: u32,
    produce: Option<Bucket>,
    consume: Option<Bucket>,
}

/// One source address's usage.
#[derive(Debug)]
struct AddrUse {
    connections: u32,
    /// New connections: a bucket of `connection_rate_per_ip`.
    accepts: Option<Bucket>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    IdentityConnections { identity: String, max: u32 },
    AddrConnections { addr: IpAddr, max: u32 },
    AddrRate { addr: IpAddr, per_s: u32 },
}

impl Refusal {
    /// The `connections_refused` label for this refusal.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Self::IdentityConnections { .. } => RefusalReason::MaxConnectionsPerIdentity,
            Self::AddrConnections { .. } => RefusalReason::MaxConnectionsPerIp,
            Self::AddrRate { .. } => RefusalReason::ConnectionRatePerIp,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::IdentityConnections { identity, max } => write!(
                f,
                "identity '{identity}' has {max} connection(s) open (quotas.max_connections_per_identity)"
            ),
            Self::AddrConnections { addr, max } => write!(
                f,
                "{addr} has {max} connection(s) open (quotas.max_connections_per_ip)"
            ),
            Self::AddrRate { addr, per_s } => write!(
                f,
                "{addr} opens connections faster than {per_s}/s (quotas.connection_rate_per_ip)"
            ),
        }
    }
}

/// Which byte rate a request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Produce,
    Consume,
}

/// Every identity's and address's usage, against the limits in force
/// (replaced on reload; usage carries over).
#[derive(Debug)]
pub struct Quotas {
    limits: Mutex<Arc<QuotasConfig>>,
    identities: Mutex<HashMap<Arc<str>, IdentityUse>>,
    addrs: Mutex<HashMap<IpAddr, AddrUse>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Quotas {
    pub fn new(limits: QuotasConfig) -> Arc<Quotas> {
        Arc::new(Quotas {
            limits: Mutex::new(Arc::new(limits)),
            identities: Mutex::new(HashMap::new()),
            addrs: Mutex::new(HashMap::new()),
        })
    }

    pub fn set_limits(&self, limits: QuotasConfig) {
        *lock(&self.limits) = Arc::new(limits);
    }

    fn limits(&self) -> Arc<QuotasConfig> {
        lock(&self.limits).clone()
    }

    /// The byte rate `identity` gets in `dir` (0: unlimited).
    fn rate(limits: &QuotasConfig, identity: &str, dir: Direction) -> u64 {
        let pick = |o: &QuotaOverride| match dir {
            Direction::Produce => o.produce_bytes_per_s,
            Direction::Consume => o.consume_bytes_per_s,
        };
        match limits
            .overrides
            .iter()
            .find(|o| glob_match(&o.identity, identity))
        {
            Some(o) => pick(o),
            None => match dir {
                Direction::Produce => limits.produce_bytes_per_s,
                Direction::Consume => limits.consume_bytes_per_s,
            },
        }
    }

    /// A new connection from `addr`, before anything is read from it: the
    /// per-address count and accept rate. The guard gives the slot back.
    pub fn admit_addr(self: &Arc<Self>, addr: IpAddr) -> Result<AddrGuard, Refusal> {
        let limits = self.limits();
        let now = Instant::now();
        let mut addrs = lock(&self.addrs);
        if addrs.len() >= SWEEP_ENTRIES_MIN && !addrs.contains_key(&addr) {
            let rate = u64::from(limits.connection_rate_per_ip);
            addrs.retain(|_, u| {
                u.connections > 0 || u.accepts.as_ref().is_some_and(|b| !b.full(now, rate))
            });
        }
        let u = addrs.entry(addr).or_insert(AddrUse {
            connections: 0,
            accepts: None,
        });
        if limits.max_connections_per_ip > 0 && u.connections >= limits.max_connections_per_ip {
            return Err(Refusal::AddrConnections {
                addr,
                max: limits.max_connections_per_ip,
            });
        }
        if limits.connection_rate_per_ip > 0 {
            let rate = u64::from(limits.connection_rate_per_ip);
            let b = u.accepts.get_or_insert_with(|| Bucket::new(now, rate));
            b.refill(now, rate);
            if b.tokens < 1.0 {
                return Err(Refusal::AddrRate {
                    addr,
                    per_s: limits.connection_rate_per_ip,
                });
            }
            b.tokens -= 1.0;
        }
        u.connections += 1;
        Ok(AddrGuard {
            quotas: self.clone(),
            addr,
        })
    }

    /// A connection whose identity is known. The guard charges its
    /// requests and gives the slot back.
    pub fn admit_identity(self: &Arc<Self>, identity: Arc<str>) -> Result<IdentityGuard, Refusal> {
        let limits = self.limits();
        let now = Instant::now();
        let mut ids = lock(&self.identities);
        if ids.len() >= SWEEP_ENTRIES_MIN && !ids.contains_key(&identity) {
            ids.retain(|id, u| {
                u.connections > 0
                    || [
                        (&u.produce, Direction::Produce),
                        (&u.consume, Direction::Consume),
                    ]
                    .iter()
                    .any(|(b, dir)| {
                        b.as_ref()
                            .is_some_and(|b| !b.full(now, Self::rate(&limits, id, *dir).max(1)))
                    })
            });
        }
        let u = ids.entry(identity.clone()).or_insert(IdentityUse {
            connections: 0,
            produce: None,
            consume: None,
        });
        let max = limits.max_connections_per_identity;
        if max > 0 && u.connections >= max {
            return Err(Refusal::IdentityConnections {
                identity: identity.to_string(),
                max,
            });
        }
        u.connections += 1;
        Ok(IdentityGuard {
            quotas: self.clone(),
            identity,
        })
    }

    fn charge(&self, identity: &Arc<str>, dir: Direction, bytes: u64) -> Duration {
        let limits = self.limits();
        let rate = Self::rate(&limits, identity, dir);
        if rate == 0 || bytes == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut ids = lock(&self.identities);
        let Some(u) = ids.get_mut(identity) else {
            return Duration::ZERO;
        };
        let slot = match dir {
            Direction::Produce => &mut u.produce,
            Direction::Consume => &mut u.consume,
        };
        slot.get_or_insert_with(|| Bucket::new(now, rate))
            .take(now, rate, bytes)
            .min(Duration::from_millis(THROTTLE_MS_MAX))
    }
}

/// A connection's slot under its source address's limits.
#[derive(Debug)]
pub struct AddrGuard {
    quotas: Arc<Quotas>,
    addr: IpAddr,
}

impl Drop for AddrGuard {
    fn drop(&mut self) {
        if let Some(u) = lock(&self.quotas.addrs).get_mut(&self.addr) {
            u.connections = u.connections.saturating_sub(1);
        }
    }
}

/// A connection's slot under its identity's limits; charges its requests.
#[derive(Debug)]
pub struct IdentityGuard {
    quotas: Arc<Quotas>,
    identity: Arc<str>,
}

impl IdentityGuard {
    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    /// Charges `bytes` to the identity's rate; returns how long the answer
    /// (and the connection's next read) must wait.
    pub fn charge(&self, dir: Direction, bytes: u64) -> Duration {
        self.quotas.charge(&self.identity, dir, bytes)
    }
}

impl Drop for IdentityGuard {
    fn drop(&mut self) {
        let mut ids = lock(&self.quotas.identities);
        if let Some(u) = ids.get_mut(&self.identity) {
            u.connections = u.connections.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> QuotasConfig {
        QuotasConfig {
            produce_bytes_per_s: 0,
            consume_bytes_per_s: 0,
            max_connections_per_identity: 0,
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            overrides: vec![],
        }
    }

    #[test]
    fn a_bucket_throttles_what_exceeds_its_burst_by_the_time_to_repay_it() {
        let t0 = Instant::now();
        let mut b = Bucket::new(t0, 1000);
        assert_eq!(b.take(t0, 1000, 1000), Duration::ZERO, "one second's burst");
        assert_eq!(b.take(t0, 1000, 500), Duration::from_millis(500));
        // Half a second later the debt is paid.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(t1, 1000, 0), Duration::ZERO);
        assert!(!b.full(t1, 1000));
        assert!(b.full(t1 + BURST, 1000));
    }

    #[test]
    fn identities_share_a_rate_and_others_are_untouched() {
        let q = Quotas::new(QuotasConfig {
            produce_bytes_per_s: 1000,
            overrides: vec![QuotaOverride {
                identity: "vip-*".into(),
                produce_bytes_per_s: 0,
                consume_bytes_per_s: 10,
            }],
            ..limits()
        });
        let a1 = q.admit_identity("greedy".into()).unwrap();
        let a2 = q.admit_identity("greedy".into()).unwrap();
        let b = q.admit_identity("other".into()).unwrap();
        let vip = q.admit_identity("vip-1".into()).unwrap();
        assert_eq!(a1.charge(Direction::Produce, 1000), Duration::ZERO);
        let d = a2.charge(Direction::Produce, 1000);
        assert!(
            d > Duration::from_millis(900),
            "{d:?}: the second connection pays"
        );
        assert_eq!(b.charge(Direction::Produce, 1000), Duration::ZERO);
        assert_eq!(a1.charge(Direction::Consume, 1 << 30), Duration::ZERO);
        assert_eq!(vip.charge(Direction::Produce, 1 << 30), Duration::ZERO);
        assert_eq!(
            vip.charge(Direction::Consume, 1 << 30),
            Duration::from_millis(THROTTLE_MS_MAX),
            "capped"
        );
    }

    #[test]
    fn connections_are_limited_per_identity_and_address_and_given_back() {
        let q = Quotas::new(QuotasConfig {
            max_connections_per_identity: 2,
            max_connections_per_ip: 1,
            ..limits()
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let g = q.admit_addr(ip).unwrap();
        assert_eq!(
            q.admit_addr(ip).unwrap_err(),
            Refusal::AddrConnections { addr: ip, max: 1 }
        );
        assert!(q.admit_addr("127.0.0.2".parse().unwrap()).is_ok());
        drop(g);
        let _g = q.admit_addr(ip).unwrap();
        let a = q.admit_identity("d".into()).unwrap();
        let _b = q.admit_identity("d".into()).unwrap();
        assert!(matches!(
            q.admit_identity("d".into()),
            Err(Refusal::IdentityConnections { max: 2, .. })
        ));
        drop(a);
        assert!(q.admit_identity("d".into()).is_ok());
    }

    #[test]
    fn the_accept_rate_is_limited_per_address() {
        let q = Quotas::new(QuotasConfig {
            connection_rate_per_ip: 3,
            ..limits()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let admitted = (0..10).filter(|_| q.admit_addr(ip).is_ok()).count();
        assert_eq!(admitted, 3, "a second's worth, then refused");
        assert!(q.admit_addr("10.0.0.2".parse().unwrap()).is_ok());
    }
}
