//! The Mirror room: forwarding local topics to a central Kafka cluster.
//!
//! - [`kafka`]: the Kafka wire-protocol client (bootstrap and metadata,
//!   the idempotent and transactional producer, read_committed reads,
//!   TLS and SASL). It knows nothing of skiff's storage.
//!
//! - [`aggregate`]: tumbling windows per key for rules with `aggregate`,
//!   and the state their checkpoints carry.
//! - [`forward`]: the forwarder. It reads the local partitions the rules
//!   match through the broker's fetch API, like any consumer, and writes
//!   them upstream in transactions that also carry its checkpoints.
//! - [`pace`]: the bandwidth cap, how a round's bytes are divided among
//!   the rules by priority, and the per-rule rate and time to drain.
//! - [`status`]: the link state and per-rule counters that `skiff mirror
//!   status` shows; also where `pause` and `resume` land.

pub mod aggregate;
pub mod forward;
pub mod kafka;
pub mod pace;
pub mod status;

use std::sync::Arc;

use crate::broker::Broker;
use crate::config::MirrorConfig;
use crate::metrics::Metrics;

pub use forward::{Forwarder, Settings};
pub use status::{Link, MirrorStatus, RuleStatus, StatusReport};

/// A mirror ready to run: the forwarder and the status it shares.
pub struct Mirror {
    pub status: Arc<MirrorStatus>,
    forwarder: Option<Forwarder>,
}

impl Mirror {
    /// Checks what the config names beyond its text (TLS files); a
    /// disabled mirror has only a status that says so.
    pub fn new(
        cfg: &MirrorConfig,
        broker: Arc<Broker>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, kafka::KafkaError> {
        let names: Vec<String> = cfg.rules.iter().map(|r| r.name.clone()).collect();
        if !cfg.enabled() {
            return Ok(Self {
                status: Arc::new(MirrorStatus::new(false, "", "", &names)),
                forwarder: None,
            });
        }
        let settings = Settings::from_config(cfg)?;
        let first_rule: Vec<(String, bool)> = cfg
            .rules
            .iter()
            .map(|r| (r.source.clone(), r.mirror_overflow == "block"))
            .collect();
        // A new topic a block rule forwards is held from its creation, not
        // from when the forwarder first sees it.
        broker.hold_new_topics(Arc::new(move |topic: &str| {
            first_rule
                .iter()
                .find(|(source, _)| forward::glob_match(source, topic))
                .is_some_and(|(_, block)| *block)
        }));
        // Reads the TLS files now, so a bad path stops start-up.
        kafka::KafkaClient::new(settings.kafka.clone())?;
        let status = Arc::new(MirrorStatus::new(
            true,
            &settings.gateway,
            &cfg.upstream,
            &names,
        ));
        let forwarder = Forwarder::new(settings, broker, status.clone(), metrics);
        Ok(Self {
            status,
            forwarder: Some(forwarder),
        })
    }

    /// The forwarding task's body, when the mirror is on.
    pub fn take_forwarder(&mut self) -> Option<Forwarder> {
        self.forwarder.take()
    }
}
