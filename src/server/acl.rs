//! Who may do what: identities, operations, and the `[acl]` rules that
//! decide between them.
//!
//! Every request passes [`Acl::decide`] (through `handler::authorize`)
//! with an operation and the resource it touches: a topic, or a group
//! name for [`Operation::Group`]. Off (`acl.enabled = false`), everything
//! is allowed; on, nothing is but what a rule allows (default deny).
//! Rules only allow: the first rule that allows a request decides it, so
//! their order matters only for which one `skiff acl check` names.
//!
//! As in Kafka, `describe` (metadata, offsets) is implied by any other
//! operation a rule allows on the same topic: a device that may produce to
//! a topic may also find its partitions.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{AclConfig, AclRule};

/// The identity of a connection that proved none: plaintext TCP, or TLS
/// without `client_ca`.
pub const ANONYMOUS: &str = "anonymous";

/// What a request does to its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Produce,
    Consume,
    Create,
    Delete,
    Alter,
    Describe,
    /// Join, commit to or describe a consumer group; the resource is the
    /// group's name.
    Group,
    Mirror,
}

impl Operation {
    pub const ALL: [Operation; 8] = [
        Self::Produce,
        Self::Consume,
        Self::Create,
        Self::Delete,
        Self::Alter,
        Self::Describe,
        Self::Group,
        Self::Mirror,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Produce => "produce",
            Self::Consume => "consume",
            Self::Create => "create",
            Self::Delete => "delete",
            Self::Alter => "alter",
            Self::Describe => "describe",
            Self::Group => "group",
            Self::Mirror => "mirror",
        }
    }

    pub fn parse(name: &str) -> Option<Operation> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

const _: () = assert!(Operation::ALL.len() <= 8, "operations fit a u8 mask");

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of
/// characters (none included) and everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // The classic backtracking walk: on a mismatch, retry from the last
    // star with one more byte swallowed. Linear in practice, quadratic at
    // worst, on names of at most a few hundred bytes.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// A rule with its operations as a mask.
#[derive(Debug, Clone)]
struct Rule {
    text: AclRule,
    operations: u8,
}

impl Rule {
    fn allows(&self, identity: &str, op: Operation, resource: &str) -> bool {
        let ops = if op == Operation::Describe {
            // Any operation on a topic implies describing it.
            self.operations & !Operation::Group.bit()
        } else {
            self.operations & op.bit()
        };
        ops != 0
            && glob_match(&self.text.identity, identity)
            && self.text.topics.iter().any(|t| glob_match(t, resource))
    }
}

/// The `[acl]` section, ready to decide.
#[derive(Debug, Clone)]
pub struct Acl {
    enabled: bool,
    rules: Vec<Rule>,
}

/// What decided a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `acl.enabled = false`.
    Disabled,
    /// The rule (0-based index into `acl.rules`) that allows it.
    Rule(usize, AclRule),
    /// No rule allows it.
    DefaultDeny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
}

impl fmt::Display for Decision {
    /// `allow: rule 2 (identity "dev-*", topics ["sensors.*"], operations
    /// ["produce"])`, `deny: no rule allows it (default deny)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allowed { "allow" } else { "deny" })?;
        match &self.reason {
            Reason::Disabled => f.write_str(": acl.enabled is false (every request is allowed)"),
            Reason::Rule(i, r) => write!(
                f,
                ": rule {} (identity {:?}, topics {:?}, operations {:?})",
                i + 1,
                r.identity,
                r.topics,
                r.operations
            ),
            Reason::DefaultDeny => f.write_str(": no rule allows it (default deny)"),
        }
    }
}

impl Acl {
    /// From a validated config: every operation name is known.
    pub fn from_config(cfg: &AclConfig) -> Acl {
        let rules = cfg
            .rules
            .iter()
            .map(|r| Rule {
                operations: r
                    .operations
                    .iter()
                    .filter_map(|o| Operation::parse(o))
                    .fold(0, |m, op| m | op.bit()),
                text: r.clone(),
            })
            .collect();
        Acl {
            enabled: cfg.enabled,
            rules,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn decide(&self, identity: &str, op: Operation, resource: &str) -> Decision {
        if !self.enabled {
            return Decision {
                allowed: true,
                reason: Reason::Disabled,
            };
        }
        match self
            .rules
            .iter()
            .position(|r| r.allows(identity, op, resource))
        {
            Some(i) => Decision {
                allowed: true,
                reason: Reason::Rule(i, self.rules[i].text.clone()),
            },
            None => Decision {
                allowed: false,
                reason: Reason::DefaultDeny,
            },
        }
    }

    pub fn allows(&self, identity: &str, op: Operation, resource: &str) -> bool {
        !self.enabled || self.rules.iter().any(|r| r.allows(identity, op, resource))
    }

    /// Whether any rule allows `identity` the operation on some resource
    /// (an idempotent producer's id is not tied to a topic).
    pub fn allows_somewhere(&self, identity: &str, op: Operation) -> bool {
        !self.enabled
            || self
                .rules
                .iter()
                .any(|r| r.operations & op.bit() != 0 && glob_match(&r.text.identity, identity))
    }
}

/// At most this many denial lines per window; the rest are counted and
/// summed up in one line when the next window opens.
const DENIAL_LINES_PER_WINDOW: u32 = 10;
const DENIAL_WINDOW: Duration = Duration::from_secs(10);

/// Logs denied requests without letting a device that retries in a loop
/// flood the journal.
#[derive(Debug)]
pub struct DenialLog {
    state: Mutex<DenialWindow>,
}

#[derive(Debug)]
struct DenialWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for DenialLog {
    fn default() -> Self {
        DenialLog {
            state: Mutex::new(DenialWindow {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }
}

impl DenialLog {
    /// Logs one denial, or counts it if the window's lines are spent.
    /// Returns whether a line was written.
    pub fn denied(&self, identity: &str, op: Operation, resource: &str) -> bool {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if w.started.elapsed() >= DENIAL_WINDOW {
            if w.suppressed > 0 {
                log::warn!(
                    "not authorized: {} more denial(s) not logged in the last {} s",
                    w.suppressed,
                    DENIAL_WINDOW.as_secs()
                );
            }
            *w = DenialWindow {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < DENIAL_LINES_PER_WINDOW {
            w.logged += 1;
            log::warn!("not authorized: identity '{identity}' may not {op} '{resource}'");
            true
        } else {
            w.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(identity: &str, topics: &[&str], ops: &[&str]) -> AclRule {
        AclRule {
            identity: identity.into(),
            topics: topics.iter().map(|s| s.to_string()).collect(),
            operations: ops.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn globs_match_runs_of_any_characters() {
        for (p, n) in [
            ("*", ""),
            ("*", "anything"),
            ("sensors.*", "sensors.temp"),
            ("sensors.*", "sensors."),
            ("dev-*", "dev-17"),
            ("*-17", "dev-17"),
            ("a*b*c", "aXXbYYc"),
            ("a*b*c", "abc"),
            ("exact", "exact"),
            ("**", "x"),
        ] {
            assert!(glob_match(p, n), "{p} ~ {n}");
        }
        for (p, n) in [
            ("sensors.*", "sensors"),
            ("sensors.*", "other.temp"),
            ("dev-*", "device"),
            ("exact", "exactly"),
            ("exact", "exac"),
            ("a*b*c", "acb"),
            ("", "x"),
        ] {
            assert!(!glob_match(p, n), "{p} !~ {n}");
        }
    }

    #[test]
    fn off_allows_everything_and_on_denies_by_default() {
        let mut cfg = AclConfig {
            enabled: false,
            rules: vec![],
        };
        let d = Acl::from_config(&cfg).decide("x", Operation::Delete, "t");
        assert!(d.allowed);
        assert_eq!(d.reason, Reason::Disabled);
        cfg.enabled = true;
        let d = Acl::from_config(&cfg).decide("x", Operation::Delete, "t");
        assert!(!d.allowed);
        assert_eq!(d.to_string(), "deny: no rule allows it (default deny)");
    }

    #[test]
    fn the_first_allowing_rule_decides_and_describe_is_implied() {
        let cfg = AclConfig {
            enabled: true,
            rules: vec![
                rule("dev-*", &["sensors.*"], &["produce"]),
                rule("dashboard", &["sensors.*"], &["consume"]),
                rule("dashboard", &["dash-*"], &["group"]),
                rule("admin", &["*"], &["create", "delete", "describe"]),
            ],
        };
        let acl = Acl::from_config(&cfg);
        let d = acl.decide("dev-17", Operation::Produce, "sensors.temp");
        assert!(d.allowed);
        assert_eq!(
            d.to_string(),
            "allow: rule 1 (identity \"dev-*\", topics [\"sensors.*\"], operations [\"produce\"])"
        );
        assert!(acl.allows("dev-17", Operation::Describe, "sensors.temp"));
        assert!(!acl.allows("dev-17", Operation::Consume, "sensors.temp"));
        assert!(!acl.allows("dev-17", Operation::Produce, "other"));
        assert!(!acl.allows("device", Operation::Produce, "sensors.temp"));
        assert!(acl.allows("dashboard", Operation::Consume, "sensors.x"));
        assert!(acl.allows("dashboard", Operation::Group, "dash-1"));
        assert!(!acl.allows("dashboard", Operation::Group, "other-group"));
        // A group rule's names are groups: it implies no topic describe.
        assert!(!acl.allows("dashboard", Operation::Describe, "dash-1"));
        let d = acl.decide("admin", Operation::Delete, "anything");
        assert_eq!(d.reason, Reason::Rule(3, cfg.rules[3].clone()));
        assert!(acl.allows_somewhere("dev-1", Operation::Produce));
        assert!(!acl.allows_somewhere("dashboard", Operation::Produce));
    }

    #[test]
    fn denials_are_logged_at_most_a_window_full() {
        let log = DenialLog::default();
        let written = (0..100)
            .filter(|_| log.denied("x", Operation::Produce, "t"))
            .count();
        assert_eq!(written, DENIAL_LINES_PER_WINDOW as usize);
    }
}
