//! The cluster view: bootstrap, metadata and partition leaders, one
//! connection per broker, coordinators, and the admin and read calls the
//! mirror needs (CreateTopics, ListOffsets, Fetch).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, FetchRequest, FindCoordinatorRequest, ListOffsetsRequest,
    MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::connection::{Connection, ConnectionConfig};
use super::error::{ConfigError, ErrorCode, KafkaError, ProtocolError};
use super::records::{decode_batches, Batch};
use super::sasl::SaslConfig;
use super::tls::{Tls, TlsConfig};

/// How to reach and talk to the cluster.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port` of brokers to bootstrap from; any one is enough.
    pub bootstrap: Vec<String>,
    /// Sent in every request header; brokers log and quota by it.
    pub client_id: String,
    pub tls: Option<TlsConfig>,
    pub sasl: Option<SaslConfig>,
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// From writing a request to its answer. Past it the outcome is unknown
    /// and the connection is closed.
    pub request_timeout: Duration,
    /// Answers longer than this are refused before they are read.
    pub max_response_bytes: usize,
    /// Pause before the first retry after a stale leader or a busy
    /// coordinator; it doubles with each attempt, up to a second.
    pub retry_backoff: Duration,
    /// Attempts for a call that meets stale metadata or a moving
    /// coordinator, before its error is returned.
    pub attempts_max: u32,
}

impl KafkaConfig {
    /// Defaults, with the bootstrap servers from a comma-separated list.
    pub fn new(bootstrap: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            bootstrap: parse_bootstrap(bootstrap)?,
            client_id: "skiff".to_owned(),
            tls: None,
            sasl: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_response_bytes: 64 << 20,
            retry_backoff: Duration::from_millis(100),
            attempts_max: 10,
        })
    }
}

/// The longest pause between retries: a coordinator finishing the previous
/// transaction (CONCURRENT_TRANSACTIONS) can take seconds on a busy cluster,
/// and `attempts_max` retries at this cap cover that.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Splits `a:9092, b:9092` into addresses, checking each is `host:port`.
pub fn parse_bootstrap(list: &str) -> Result<Vec<String>, ConfigError> {
    let servers: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if servers.is_empty() {
        return Err(ConfigError::Bootstrap(list.to_owned()));
    }
    for server in &servers {
        let valid = server.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(ConfigError::Bootstrap(server.clone()));
        }
    }
    Ok(servers)
}

/// Which offset ListOffsets looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    /// The end of the log: the high watermark, or under read_committed the
    /// last stable offset (before the first open transaction).
    Latest,
    /// The first offset whose timestamp is at or after this (ms).
    Timestamp(i64),
}

/// Fetch and ListOffsets visibility (KIP-98).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    #[default]
    ReadUncommitted,
    /// Only up to the last stable offset. Aborted records are still in the
    /// answer on some brokers: [`super::CommittedReader`] drops them.
    ReadCommitted,
}

impl Isolation {
    fn level(self) -> i8 {
        match self {
            Self::ReadUncommitted => 0,
            Self::ReadCommitted => 1,
        }
    }
}

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    pub name: String,
    pub partitions: i32,
    /// -1: the broker's default.
    pub replication_factor: i16,
    /// Topic configs, e.g. `("cleanup.policy", "compact")`.
    pub configs: Vec<(String, String)>,
}

/// One partition's share of a fetch. The offsets are -1 when the broker
/// left the partition out of its answer (nothing to send in time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPartition {
    pub high_watermark: i64,
    pub last_stable_offset: i64,
    pub log_start_offset: i64,
    /// Whole batches at or after the requested offset (the first may start
    /// before it).
    pub batches: Vec<Batch>,
    /// How long the broker asks the client to wait before the next
    /// request. A fetch over its quota is answered at once with no data
    /// and this set (KIP-219), so an empty answer does not mean the end.
    pub throttle: Duration,
}

#[derive(Debug, Clone, Copy)]
struct PartitionMeta {
    leader: i32,
    error: i16,
}

#[derive(Debug, Default)]
struct Metadata {
    brokers: HashMap<i32, String>,
    topics: HashMap<String, Result<Vec<PartitionMeta>, i16>>,
    controller: Option<i32>,
}

struct Inner {
    config: KafkaConfig,
    connection: ConnectionConfig,
    /// Address → its connection. Held while connecting, so two tasks do
    /// not both connect to the same broker.
    connections: smol::lock::Mutex<HashMap<String, Arc<Connection>>>,
    metadata: Mutex<Metadata>,
}

/// A client for one Kafka cluster. Cheap to clone; clones share
/// connections and metadata.
#[derive(Clone)]
pub struct KafkaClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaClient")
            .field("bootstrap", &self.inner.config.bootstrap)
            .finish_non_exhaustive()
    }
}

impl KafkaClient {
    /// Checks the configuration (reads TLS files); connects lazily.
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaError> {
        if config.bootstrap.is_empty() {
            return Err(ConfigError::Bootstrap(String::new()).into());
        }
        let tls = config.tls.as_ref().map(Tls::new).transpose()?;
        let connection = ConnectionConfig {
            client_id: config.client_id.clone(),
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            max_response_bytes: config.max_response_bytes,
            tls,
            sasl: config.sasl.clone(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                connection,
                connections: smol::lock::Mutex::new(HashMap::new()),
                metadata: Mutex::new(Metadata::default()),
            }),
        })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Waits before retry number `attempt` (1 for the first retry).
    pub(crate) async fn backoff(&self, attempt: u32) {
        let base = self.inner.config.retry_backoff;
        let delay = base
            .saturating_mul(1 << attempt.saturating_sub(1).min(10))
            .min(RETRY_BACKOFF_MAX.max(base));
        smol::Timer::after(delay).await;
    }

    fn metadata(&self) -> std::sync::MutexGuard<'_, Metadata> {
        self.inner
            .metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The open connection to `addr`, connecting if there is none.
    pub(crate) async fn connection(&self, addr: &str) -> Result<Arc<Connection>, KafkaError> {
        let mut connections = self.inner.connections.lock().await;
        if let Some(conn) = connections.get(addr) {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        let conn = Connection::connect(addr, &self.inner.connection).await?;
        connections.insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }

    /// Any broker: an open connection, else the known brokers and the
    /// bootstrap list in turn. The error is the last address's.
    pub(crate) async fn any_connection(&self) -> Result<Arc<Connection>, KafkaError> {
        {
            let connections = self.inner.connections.lock().await;
            if let Some(conn) = connections.values().find(|c| !c.is_closed()) {
                return Ok(conn.clone());
            }
        }
        let mut candidates: Vec<String> = self.metadata().brokers.values().cloned().collect();
        candidates.sort();
        for addr in &self.inner.config.bootstrap {
            if !candidates.contains(addr) {
                candidates.push(addr.clone());
            }
        }
        let mut last = None;
        for addr in &candidates {
            match self.connection(addr).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    log::debug!("kafka: {addr}: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("the bootstrap list is not empty"))
    }

    /// The connection to broker `node`, as metadata names it.
    async fn broker(&self, node: i32) -> Result<Arc<Connection>, KafkaError> {
        let addr = self.metadata().brokers.get(&node).cloned();
        match addr {
            Some(addr) => self.connection(&addr).await,
            None => {
                self.refresh_metadata(&[]).await?;
                let addr = self.metadata().brokers.get(&node).cloned();
                let addr = addr.ok_or(KafkaError::Broker {
                    api: "Metadata",
                    code: ErrorCode::LEADER_NOT_AVAILABLE,
                    message: Some(format!("broker {node} is not in the metadata")),
                })?;
                self.connection(&addr).await
            }
        }
    }

    /// Asks for metadata of `topics` (all topics if empty) and updates the
    /// cache: brokers, partition leaders, the controller.
    pub async fn refresh_metadata(&self, topics: &[&str]) -> Result<(), KafkaError> {
        let mut request = MetadataRequest::default();
        request.topics = (!topics.is_empty()).then(|| {
            topics
                .iter()
                .map(|t| {
                    let mut topic = MetadataRequestTopic::default();
                    topic.name = Some(topic_name(t));
                    topic
                })
                .collect()
        });
        // A pooled connection can be found closed only at send (its reader
        // saw the peer hang up a moment before): nothing went out, so ask
        // once more on a fresh one rather than fail a link that is up.
        let mut resent = false;
        loop {
            let conn = self.any_connection().await?;
            // Before v4 the field does not exist and brokers never create.
            request.allow_auto_topic_creation = conn.version::<MetadataRequest>()? < 4;
            match conn.request(&request).await {
                Ok(response) => {
                    self.apply_metadata(&response);
                    return Ok(());
                }
                Err(KafkaError::NotSent { .. }) if !resent => resent = true,
                Err(e) => return Err(e),
            }
        }
    }

    fn apply_metadata(&self, response: &MetadataResponse) {
        let mut meta = self.metadata();
        meta.brokers = response
            .brokers
            .iter()
            .map(|b| {
                (
                    b.node_id.0,
                    format!("{}:{}", host_for_addr(&b.host), b.port),
                )
            })
            .collect();
        meta.controller = (response.controller_id.0 >= 0).then_some(response.controller_id.0);
        for topic in &response.topics {
            let Some(name) = &topic.name else { continue };
            let entry = if topic.error_code != 0 {
                Err(topic.error_code)
            } else {
                let mut partitions: Vec<(i32, PartitionMeta)> = topic
                    .partitions
                    .iter()
                    .map(|p| {
                        (
                            p.partition_index,
                            PartitionMeta {
                                leader: p.leader_id.0,
                                error: p.error_code,
                            },
                        )
                    })
                    .collect();
                partitions.sort_by_key(|(i, _)| *i);
                Ok(partitions.into_iter().map(|(_, p)| p).collect())
            };
            meta.topics.insert(name.0.to_string(), entry);
        }
    }

    /// The partitions of `topic`, from the cache or a metadata request.
    pub async fn partition_count(&self, topic: &str) -> Result<usize, KafkaError> {
        if let Some(Ok(partitions)) = self.metadata().topics.get(topic) {
            return Ok(partitions.len());
        }
        self.refresh_metadata(&[topic]).await?;
        match self.metadata().topics.get(topic) {
            Some(Ok(partitions)) => Ok(partitions.len()),
            Some(Err(code)) => Err(KafkaError::from_code("Metadata", *code, Some(topic))),
            None => Err(ProtocolError::MissingEntry { api: "Metadata" }.into()),
        }
    }

    /// The connection to the leader of `topic`/`partition`. With `refresh`
    /// the metadata is asked again first (after a stale-leader error).
    pub(crate) async fn leader(
        &self,
        topic: &str,
        partition: i32,
        refresh: bool,
    ) -> Result<Arc<Connection>, KafkaError> {
        let cached = || -> Option<Result<i32, KafkaError>> {
            let meta = self.metadata();
            let entry = meta.topics.get(topic)?;
            Some(match entry {
                Err(code) => Err(KafkaError::from_code("Metadata", *code, Some(topic))),
                Ok(partitions) => match usize::try_from(partition)
                    .ok()
                    .and_then(|i| partitions.get(i))
                {
                    None => Err(KafkaError::Broker {
                        api: "Metadata",
                        code: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                        message: Some(format!("{topic} has {} partitions", partitions.len())),
                    }),
                    Some(p) if p.error != 0 && p.leader < 0 => {
                        Err(KafkaError::from_code("Metadata", p.error, Some(topic)))
                    }
                    Some(p) if p.leader < 0 => Err(KafkaError::Broker {
                        api: "Metadata",
                        code: ErrorCode::LEADER_NOT_AVAILABLE,
                        message: Some(format!("{topic}/{partition}")),
                    }),
                    Some(p) => Ok(p.leader),
                },
            })
        };
        let node = match (refresh, cached()) {
            (false, Some(Ok(node))) => node,
            _ => {
                self.refresh_metadata(&[topic]).await?;
                cached().unwrap_or(Err(ProtocolError::MissingEntry { api: "Metadata" }.into()))?
            }
        };
        self.broker(node).await
    }

    /// Runs `call` against the leader of a partition, refreshing metadata
    /// and retrying while the answer says the leader moved or the topic is
    /// not known yet. `call` must be safe to repeat after such an answer.
    pub(crate) async fn with_leader<T, F, Fut>(
        &self,
        topic: &str,
        partition: i32,
        call: F,
    ) -> Result<T, KafkaError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: std::future::Future<Output = Result<T, KafkaError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.leader(topic, partition, attempt > 1).await {
                Ok(conn) => call(conn).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if attempt < self.inner.config.attempts_max && retry_with_new_leader(&e) => {
                    log::debug!("kafka: {topic}/{partition}: {e}; retrying");
                    self.backoff(attempt).await;
                }
                other => return other,
            }
        }
    }

    /// Creates a topic. `Ok(false)`: it existed already.
    pub async fn create_topic(&self, topic: &NewTopic) -> Result<bool, KafkaError> {
        let mut creatable = CreatableTopic::default();
        creatable.name = topic_name(&topic.name);
        creatable.num_partitions = topic.partitions;
        creatable.replication_factor = topic.replication_factor;
        creatable.configs = topic
            .configs
            .iter()
            .map(|(name, value)| {
                let mut config = CreatableTopicConfig::default();
                config.name = StrBytes::from_string(name.clone());
                config.value = Some(StrBytes::from_string(value.clone()));
                config
            })
            .collect();
        let mut request = CreateTopicsRequest::default();
        request.topics = vec![creatable];
        request.timeout_ms = duration_ms(self.inner.config.request_timeout);

        let mut attempt = 0;
        loop {
            attempt += 1;
            // Older brokers take CreateTopics only at the controller; KRaft
            // brokers forward it, so any broker is fine when none is named.
            let controller = self.metadata().controller;
            let conn = match controller {
                Some(node) if attempt > 1 || !self.metadata().brokers.is_empty() => {
                    self.broker(node).await?
                }
                _ => self.any_connection().await?,
            };
            let response = conn.request(&request).await?;
            let result = response
                .topics
                .iter()
                .find(|t| t.name.0.as_str() == topic.name)
                .ok_or(ProtocolError::MissingEntry {
                    api: "CreateTopics",
                })?;
            match ErrorCode(result.error_code) {
                ErrorCode(0) => return Ok(true),
                ErrorCode::TOPIC_ALREADY_EXISTS => return Ok(false),
                code if code == ErrorCode(41) && attempt < self.inner.config.attempts_max => {
                    // NOT_CONTROLLER: learn the new controller and retry.
                    self.refresh_metadata(&[]).await?;
                }
                _ => {
                    return Err(KafkaError::from_code(
                        "CreateTopics",
                        result.error_code,
                        result.error_message.as_deref(),
                    ))
                }
            }
        }
    }

    /// The offset of `spec` in a partition.
    pub async fn list_offset(
        &self,
        topic: &str,
        partition: i32,
        spec: OffsetSpec,
        isolation: Isolation,
    ) -> Result<i64, KafkaError> {
        let timestamp = match spec {
            OffsetSpec::Earliest => -2,
            OffsetSpec::Latest => -1,
            OffsetSpec::Timestamp(ms) => ms,
        };
        let mut p = ListOffsetsPartition::default();
        p.partition_index = partition;
        p.current_leader_epoch = -1;
        p.timestamp = timestamp;
        let mut t = ListOffsetsTopic::default();
        t.name = topic_name(topic);
        t.partitions = vec![p];
        let mut request = ListOffsetsRequest::default();
        request.replica_id = BrokerId(-1);
        request.isolation_level = isolation.level();
        request.topics = vec![t];
        request.timeout_ms = duration_ms(self.inner.config.request_timeout);
        self.with_leader(topic, partition, |conn| {
            let request = &request;
            async move {
                let response = conn.request(request).await?;
                let p = response
                    .topics
                    .iter()
                    .filter(|t| t.name.0.as_str() == topic)
                    .flat_map(|t| &t.partitions)
                    .find(|p| p.partition_index == partition)
                    .ok_or(ProtocolError::MissingEntry { api: "ListOffsets" })?;
                KafkaError::check("ListOffsets", p.error_code, None)?;
                Ok(p.offset)
            }
        })
        .await
    }

    /// One fetch of one partition from `offset`: waits up to `max_wait` (at
    /// most half the request timeout) for data, returns whole batches (at most about `max_bytes`, but at least
    /// one batch if there is one).
    pub async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: i32,
        max_wait: Duration,
        isolation: Isolation,
    ) -> Result<FetchedPartition, KafkaError> {
        let mut p = FetchPartition::default();
        p.partition = partition;
        p.current_leader_epoch = -1;
        p.fetch_offset = offset;
        p.last_fetched_epoch = -1;
        p.log_start_offset = -1;
        p.partition_max_bytes = max_bytes;
        let mut t = FetchTopic::default();
        t.topic = topic_name(topic);
        t.partitions = vec![p];
        let mut request = FetchRequest::default();
        request.replica_id = BrokerId(-1);
        // The answer may take max_wait: it must come well within the
        // request timeout, or a quiet partition would look like a dead link.
        request.max_wait_ms = duration_ms(max_wait.min(self.inner.config.request_timeout / 2));
        request.min_bytes = 1;
        request.max_bytes = max_bytes;
        request.isolation_level = isolation.level();
        // A full fetch with no session (KIP-227): session 0, epoch -1.
        request.session_id = 0;
        request.session_epoch = -1;
        request.topics = vec![t];
        let max_record_bytes = self.inner.config.max_response_bytes;
        self.with_leader(topic, partition, |conn| {
            let request = &request;
            async move {
                let response = conn.request(request).await?;
                KafkaError::check("Fetch", response.error_code, None)?;
                let throttle =
                    Duration::from_millis(u64::try_from(response.throttle_time_ms).unwrap_or(0));
                let partition_data = response
                    .responses
                    .into_iter()
                    .filter(|t| t.topic.0.as_str() == topic)
                    .flat_map(|t| t.partitions)
                    .find(|p| p.partition_index == partition);
                // Tansu leaves the partition out when it has nothing to
                // send in time (always at max_wait 0): no data, not an error.
                let Some(p) = partition_data else {
                    return Ok(FetchedPartition {
                        high_watermark: -1,
                        last_stable_offset: -1,
                        log_start_offset: -1,
                        batches: Vec::new(),
                        throttle,
                    });
                };
                KafkaError::check("Fetch", p.error_code, None)?;
                let batches = match p.records {
                    Some(records) => decode_batches(records, max_record_bytes)?,
                    None => Vec::new(),
                };
                Ok(FetchedPartition {
                    high_watermark: p.high_watermark,
                    last_stable_offset: p.last_stable_offset,
                    log_start_offset: p.log_start_offset,
                    batches,
                    throttle,
                })
            }
        })
        .await
    }

    /// The transaction coordinator for `transactional_id` (KIP-98).
    pub(crate) async fn transaction_coordinator(
        &self,
        transactional_id: &str,
    ) -> Result<Arc<Connection>, KafkaError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let conn = self.any_connection().await?;
            let version = conn.version::<FindCoordinatorRequest>()?;
            let mut request = FindCoordinatorRequest::default();
            request.key_type = 1; // transaction
            if version >= 4 {
                request.coordinator_keys = vec![StrBytes::from_string(transactional_id.to_owned())];
            } else {
                request.key = StrBytes::from_string(transactional_id.to_owned());
            }
            let response = conn.request(&request).await?;
            let (code, message, host, port) = if version >= 4 {
                let c = response.coordinators.into_iter().next().ok_or(
                    ProtocolError::MissingEntry {
                        api: "FindCoordinator",
                    },
                )?;
                (c.error_code, c.error_message, c.host, c.port)
            } else {
                (
                    response.error_code,
                    response.error_message,
                    response.host,
                    response.port,
                )
            };
            match KafkaError::check("FindCoordinator", code, message.as_deref()) {
                Ok(()) => {
                    let addr = format!("{}:{port}", host_for_addr(&host));
                    return self.connection(&addr).await;
                }
                Err(e) if e.is_retriable() && attempt < self.inner.config.attempts_max => {
                    self.backoff(attempt).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Errors after which a partition call is asked again of a fresh leader:
/// the broker refused it without acting, or nothing was sent.
fn retry_with_new_leader(e: &KafkaError) -> bool {
    match e {
        KafkaError::Broker { code, .. } => code.is_stale_metadata(),
        KafkaError::NotSent { .. } => true,
        _ => false,
    }
}

/// An IPv6 host from metadata needs brackets in `host:port`.
fn host_for_addr(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_owned()))
}

pub(crate) fn duration_ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_lists_are_checked() {
        assert_eq!(
            parse_bootstrap(" a:9092, b.example:19092 ,").unwrap(),
            vec!["a:9092".to_owned(), "b.example:19092".to_owned()]
        );
        assert_eq!(
            parse_bootstrap("[::1]:9092").unwrap(),
            vec!["[::1]:9092".to_owned()]
        );
        for bad in [
            "",
            " , ",
            "host",
            "host:",
            ":9092",
            "host:0",
            "host:99999",
            "a:1,b",
        ] {
            assert!(
                matches!(parse_bootstrap(bad), Err(ConfigError::Bootstrap(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn ipv6_hosts_get_brackets() {
        assert_eq!(host_for_addr("::1"), "[::1]");
        assert_eq!(host_for_addr("kafka"), "kafka");
    }
}
