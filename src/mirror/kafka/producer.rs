//! The idempotent and transactional producer (KIP-98).
//!
//! `init` gets a producer id and epoch (InitProducerId; with a
//! transactional id, from the transaction coordinator, which also fences
//! every older producer with that id and aborts its open transaction).
//! Each batch carries the id, the epoch and a per-partition sequence
//! number, so the partition leader writes it at most once.
//!
//! A transaction is `begin`, `send`s (the first send to a partition adds
//! it to the transaction with AddPartitionsToTxn, unless `add_partitions`
//! added it with others before), then `commit` or `abort` (EndTxn). Errors are handled so that nothing is ever written
//! twice or out of order:
//!
//! - An answer that says the request was refused without effect (stale
//!   leader or coordinator, CONCURRENT_TRANSACTIONS) is retried here.
//! - DUPLICATE_SEQUENCE_NUMBER on a produce means the batch is already in
//!   the log: it counts as written (Tansu answers a resent batch so).
//! - A lost answer ([`KafkaError::OutcomeUnknown`]), fencing, and sequence
//!   errors leave the producer needing `init` again: re-initialising aborts
//!   whatever the open transaction wrote, and the caller starts over from
//!   what it knows was committed. Nothing is resent blindly.
//! - Any other failed send leaves the transaction needing `abort`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, EndTxnRequest, InitProducerIdRequest, ProduceRequest, ProducerId,
    TopicName, TransactionalId,
};
use kafka_protocol::protocol::StrBytes;

use super::client::{duration_ms, KafkaClient};
use super::connection::{Connection, InFlight};
use super::error::{ErrorCode, KafkaError, ProtocolError, StateError};
use super::records::{BatchBuilder, Compression, ProducerStamp};

/// How a producer writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerConfig {
    /// `Some`: transactional (and fenced by a newer producer with the same
    /// id); `None`: idempotent only.
    pub transactional_id: Option<String>,
    pub compression: Compression,
    /// How long the coordinator lets a transaction stay open before it
    /// aborts it (brokers cap it with `transaction.max.timeout.ms`).
    pub transaction_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            transactional_id: None,
            compression: Compression::None,
            transaction_timeout: Duration::from_secs(60),
        }
    }
}

/// The identity the cluster gave this producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    pub producer_id: i64,
    pub epoch: i16,
}

/// Where a written batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceAck {
    /// The offset of the batch's first record; `None` when the broker
    /// reported the batch as a duplicate of one already written.
    pub base_offset: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// `init` is needed (first use, or after fencing / unknown outcome).
    Uninitialised,
    Ready,
    InTransaction {
        partitions: HashSet<(String, i32)>,
    },
}

/// What a failed send leaves behind, seen by the producer's next call.
#[derive(Debug, Default)]
struct Poison {
    /// `init` is required (fenced, unknown outcome, sequence broken).
    needs_init: bool,
    /// The open transaction can only be aborted.
    abort_required: bool,
}

/// State shared with sends in flight.
#[derive(Debug, Default)]
struct Shared {
    poison: Mutex<Poison>,
    in_flight: AtomicUsize,
}

impl Shared {
    fn poison(&self) -> std::sync::MutexGuard<'_, Poison> {
        self.poison.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what `e` means for the producer's later calls.
    fn note_failure(&self, e: &KafkaError) {
        let mut poison = self.poison();
        if needs_init(e) {
            poison.needs_init = true;
        } else {
            poison.abort_required = true;
        }
    }
}

/// Errors after which only a new producer epoch makes progress safe.
fn needs_init(e: &KafkaError) -> bool {
    match e {
        KafkaError::OutcomeUnknown { .. } | KafkaError::Fenced { .. } => true,
        KafkaError::Broker { code, .. } => matches!(
            *code,
            ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER
                | ErrorCode::UNKNOWN_PRODUCER_ID
                | ErrorCode::INVALID_TXN_STATE
        ),
        _ => false,
    }
}

/// An idempotent, optionally transactional producer.
pub struct Producer {
    client: KafkaClient,
    config: ProducerConfig,
    identity: Option<ProducerIdentity>,
    phase: Phase,
    /// The next sequence number per partition, from 0 after each `init`.
    sequences: HashMap<(String, i32), i32>,
    coordinator: Option<Arc<Connection>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.config)
            .field("identity", &self.identity)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer on `client`; call [`Producer::init`] before anything else.
    pub fn new(client: KafkaClient, config: ProducerConfig) -> Self {
        Self {
            client,
            config,
            identity: None,
            phase: Phase::Uninitialised,
            sequences: HashMap::new(),
            coordinator: None,
            shared: Arc::new(Shared::default()),
        }
    }

    pub fn identity(&self) -> Option<ProducerIdentity> {
        self.identity
    }

    pub fn in_transaction(&self) -> bool {
        matches!(self.phase, Phase::InTransaction { .. })
    }

    /// Gets a producer id and epoch. With a transactional id this fences
    /// older producers with that id and aborts their open transaction. It
    /// is also the way on after an unknown outcome or fencing: a fenced
    /// producer that initialises again fences the one that fenced it.
    pub async fn init(&mut self) -> Result<ProducerIdentity, KafkaError> {
        self.phase = Phase::Uninitialised;
        self.identity = None;
        self.sequences.clear();
        // Sends of the old epoch may still be answered: they must not
        // poison the new one.
        self.shared = Arc::new(Shared::default());

        let mut request = InitProducerIdRequest::default();
        request.transactional_id = self
            .config
            .transactional_id
            .as_ref()
            .map(|id| TransactionalId(StrBytes::from_string(id.clone())));
        request.transaction_timeout_ms = duration_ms(self.config.transaction_timeout);
        // -1/-1 asks for a new epoch of whatever the id had (KIP-360 lets a
        // client pass its old id and epoch instead; Tansu accepts only
        // -1/-1, and a new epoch fences just the same).
        request.producer_id = ProducerId(-1);
        request.producer_epoch = -1;

        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let conn = match &self.config.transactional_id {
                Some(id) => {
                    let conn = self.client.transaction_coordinator(id).await?;
                    self.coordinator = Some(conn.clone());
                    conn
                }
                None => self.client.any_connection().await?,
            };
            let response = conn.request(&request).await?;
            match KafkaError::check("InitProducerId", response.error_code, None) {
                Ok(()) => break response,
                Err(e)
                    if retry_at_coordinator(&e) && attempt < self.client.config().attempts_max =>
                {
                    log::debug!("kafka: InitProducerId: {e}; retrying");
                    self.client.backoff(attempt).await;
                }
                Err(e) => return Err(e),
            }
        };
        let identity = ProducerIdentity {
            producer_id: response.producer_id.0,
            epoch: response.producer_epoch,
        };
        self.identity = Some(identity);
        self.phase = Phase::Ready;
        Ok(identity)
    }

    /// Opens a transaction (locally: the coordinator hears of it with the
    /// first partition added).
    pub fn begin(&mut self) -> Result<(), KafkaError> {
        self.check_usable()?;
        if self.config.transactional_id.is_none() {
            return Err(StateError::NotTransactional.into());
        }
        match self.phase {
            Phase::Ready => {
                self.phase = Phase::InTransaction {
                    partitions: HashSet::new(),
                };
                Ok(())
            }
            Phase::InTransaction { .. } => Err(StateError::TransactionOpen.into()),
            Phase::Uninitialised => Err(StateError::NeedsInit.into()),
        }
    }

    /// Writes `batch` to `topic`/`partition` and waits for the leader's
    /// answer.
    pub async fn produce(
        &mut self,
        topic: &str,
        partition: i32,
        batch: &BatchBuilder,
    ) -> Result<ProduceAck, KafkaError> {
        self.send(topic, partition, batch).await?.wait().await
    }

    /// Writes `batch` and returns once it is on the wire; the answer comes
    /// with [`PendingProduce::wait`]. Sends to a partition are written in
    /// the order of the calls, so several may be in flight.
    pub async fn send(
        &mut self,
        topic: &str,
        partition: i32,
        batch: &BatchBuilder,
    ) -> Result<PendingProduce, KafkaError> {
        self.check_usable()?;
        if batch.is_empty() {
            return Err(StateError::EmptyBatch.into());
        }
        let identity = self.identity.ok_or(StateError::NeedsInit)?;
        let transactional_id = self.config.transactional_id.clone();
        if transactional_id.is_some() {
            let Phase::InTransaction { partitions } = &self.phase else {
                return Err(StateError::NoTransaction.into());
            };
            if !partitions.contains(&(topic.to_owned(), partition)) {
                self.add_partitions(&[(topic, partition)]).await?;
            }
        }

        let key = (topic.to_owned(), partition);
        let sequence = self.sequences.get(&key).copied().unwrap_or(0);
        let count = i32::try_from(batch.len()).map_err(|_| StateError::EmptyBatch)?;
        let stamp = ProducerStamp {
            producer_id: identity.producer_id,
            producer_epoch: identity.epoch,
            base_sequence: sequence,
            transactional: transactional_id.is_some(),
        };
        let records = batch.finish(self.config.compression, stamp)?;
        // Sequences wrap to 0 after i32::MAX, as Kafka's do.
        let next = if i32::MAX - sequence < count {
            count - (i32::MAX - sequence) - 1
        } else {
            sequence + count
        };
        self.sequences.insert(key, next);

        let request = produce_request(
            transactional_id.as_deref(),
            topic,
            partition,
            records,
            self.client.config().request_timeout,
        );
        let shared = self.shared.clone();
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let pending = PendingProduce {
            client: self.client.clone(),
            topic: topic.to_owned(),
            partition,
            request,
            in_flight: None,
            shared,
            done: false,
        };
        pending.start().await
    }

    /// Commits the open transaction. Every send of it must have been
    /// awaited.
    pub async fn commit(&mut self) -> Result<(), KafkaError> {
        self.check_usable()?;
        if self.shared.poison().abort_required {
            return Err(StateError::AbortRequired.into());
        }
        if self.shared.in_flight.load(Ordering::SeqCst) != 0 {
            return Err(StateError::SendsInFlight.into());
        }
        self.end(true).await
    }

    /// Aborts the open transaction: its records become invisible to
    /// read_committed readers.
    pub async fn abort(&mut self) -> Result<(), KafkaError> {
        self.check_usable()?;
        self.end(false).await
    }

    async fn end(&mut self, commit: bool) -> Result<(), KafkaError> {
        let Phase::InTransaction { partitions } = &self.phase else {
            return Err(StateError::NoTransaction.into());
        };
        let identity = self.identity.ok_or(StateError::NeedsInit)?;
        if partitions.is_empty() {
            // The coordinator never heard of this transaction.
            self.phase = Phase::Ready;
            return Ok(());
        }
        let transactional_id = self
            .config
            .transactional_id
            .clone()
            .ok_or(StateError::NotTransactional)?;
        let mut request = EndTxnRequest::default();
        request.transactional_id = TransactionalId(StrBytes::from_string(transactional_id.clone()));
        request.producer_id = ProducerId(identity.producer_id);
        request.producer_epoch = identity.epoch;
        request.committed = commit;
        let result = self
            .at_coordinator(&transactional_id, "EndTxn", |conn| {
                let request = &request;
                async move {
                    let response = conn.request(request).await?;
                    KafkaError::check("EndTxn", response.error_code, None)
                }
            })
            .await;
        match result {
            Ok(()) => {
                self.phase = Phase::Ready;
                *self.shared.poison() = Poison::default();
                Ok(())
            }
            Err(e) => {
                // Tansu answers a fenced producer's EndTxn by closing the
                // connection: OutcomeUnknown, which needs init like fencing.
                if needs_init(&e) {
                    self.shared.poison().needs_init = true;
                }
                Err(e)
            }
        }
    }

    /// Adds the partitions of `parts` that the open transaction does not
    /// hold yet, in one AddPartitionsToTxn (at v3 or lower, see `wire`):
    /// one round trip per transaction instead of one per partition before
    /// its first send.
    pub async fn add_partitions(&mut self, parts: &[(&str, i32)]) -> Result<(), KafkaError> {
        self.check_usable()?;
        let identity = self.identity.ok_or(StateError::NeedsInit)?;
        let Phase::InTransaction { partitions } = &self.phase else {
            return Err(StateError::NoTransaction.into());
        };
        let mut topics: Vec<(&str, Vec<i32>)> = Vec::new();
        for &(topic, partition) in parts {
            if partitions.contains(&(topic.to_owned(), partition)) {
                continue;
            }
            match topics.iter_mut().find(|(t, _)| *t == topic) {
                Some((_, ps)) if ps.contains(&partition) => {}
                Some((_, ps)) => ps.push(partition),
                None => topics.push((topic, vec![partition])),
            }
        }
        if topics.is_empty() {
            return Ok(());
        }
        let transactional_id = self
            .config
            .transactional_id
            .clone()
            .ok_or(StateError::NotTransactional)?;
        let mut request = AddPartitionsToTxnRequest::default();
        request.v3_and_below_transactional_id =
            TransactionalId(StrBytes::from_string(transactional_id.clone()));
        request.v3_and_below_producer_id = ProducerId(identity.producer_id);
        request.v3_and_below_producer_epoch = identity.epoch;
        request.v3_and_below_topics = topics
            .iter()
            .map(|(topic, ps)| {
                let mut t = AddPartitionsToTxnTopic::default();
                t.name = TopicName(StrBytes::from_string((*topic).to_owned()));
                t.partitions = ps.clone();
                t
            })
            .collect();
        let result = self
            .at_coordinator(&transactional_id, "AddPartitionsToTxn", |conn| {
                let (request, topics) = (&request, &topics);
                async move {
                    let response = conn.request(request).await?;
                    KafkaError::check("AddPartitionsToTxn", response.error_code, None)?;
                    for (topic, ps) in topics {
                        for &partition in ps {
                            let p = response
                                .results_by_topic_v3_and_below
                                .iter()
                                .filter(|t| t.name.0.as_str() == *topic)
                                .flat_map(|t| &t.results_by_partition)
                                .find(|p| p.partition_index == partition)
                                .ok_or(ProtocolError::MissingEntry {
                                    api: "AddPartitionsToTxn",
                                })?;
                            KafkaError::check("AddPartitionsToTxn", p.partition_error_code, None)?;
                        }
                    }
                    Ok(())
                }
            })
            .await;
        match result {
            Ok(()) => {
                if let Phase::InTransaction { partitions } = &mut self.phase {
                    for (topic, ps) in &topics {
                        partitions.extend(ps.iter().map(|&p| ((*topic).to_owned(), p)));
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.shared.note_failure(&e);
                Err(e)
            }
        }
    }

    /// Runs `call` at the transaction coordinator, finding it again and
    /// retrying while the answer says it moved or is busy finishing the
    /// previous transaction. Such answers mean the request had no effect.
    async fn at_coordinator<F, Fut>(
        &mut self,
        transactional_id: &str,
        api: &'static str,
        call: F,
    ) -> Result<(), KafkaError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: std::future::Future<Output = Result<(), KafkaError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let conn = match &self.coordinator {
                Some(conn) if !conn.is_closed() => conn.clone(),
                _ => {
                    let conn = self
                        .client
                        .transaction_coordinator(transactional_id)
                        .await?;
                    self.coordinator = Some(conn.clone());
                    conn
                }
            };
            match call(conn).await {
                Err(e)
                    if retry_at_coordinator(&e) && attempt < self.client.config().attempts_max =>
                {
                    log::debug!("kafka: {api}: {e}; retrying");
                    if matches!(&e, KafkaError::Broker { code, .. } if code.is_stale_coordinator())
                    {
                        self.coordinator = None;
                    }
                    self.client.backoff(attempt).await;
                }
                other => return other,
            }
        }
    }

    fn check_usable(&self) -> Result<(), KafkaError> {
        if self.shared.poison().needs_init || self.phase == Phase::Uninitialised {
            return Err(StateError::NeedsInit.into());
        }
        Ok(())
    }
}

/// Answers that mean "not done, ask again": the coordinator moved, is
/// loading, or is still completing the previous transaction; or the
/// request never left.
fn retry_at_coordinator(e: &KafkaError) -> bool {
    match e {
        KafkaError::Broker { code, .. } => {
            code.is_stale_coordinator()
                || *code == ErrorCode::COORDINATOR_LOAD_IN_PROGRESS
                || *code == ErrorCode::CONCURRENT_TRANSACTIONS
        }
        KafkaError::NotSent { .. } => true,
        _ => false,
    }
}

fn produce_request(
    transactional_id: Option<&str>,
    topic: &str,
    partition: i32,
    records: Bytes,
    timeout: Duration,
) -> ProduceRequest {
    let mut p = PartitionProduceData::default();
    p.index = partition;
    p.records = Some(records);
    let mut t = TopicProduceData::default();
    t.name = TopicName(StrBytes::from_string(topic.to_owned()));
    t.partition_data = vec![p];
    let mut request = ProduceRequest::default();
    request.transactional_id =
        transactional_id.map(|id| TransactionalId(StrBytes::from_string(id.to_owned())));
    // All in-sync replicas: idempotence requires it.
    request.acks = -1;
    request.timeout_ms = duration_ms(timeout);
    request.topic_data = vec![t];
    request
}

/// A batch on its way to a partition leader.
pub struct PendingProduce {
    client: KafkaClient,
    topic: String,
    partition: i32,
    request: ProduceRequest,
    in_flight: Option<InFlight<ProduceRequest>>,
    shared: Arc<Shared>,
    /// Answered (or failed) and counted out of `shared.in_flight`.
    done: bool,
}

impl Drop for PendingProduce {
    /// Dropped unanswered: whether the batch was written is unknown, and a
    /// later batch to the partition may be refused for its sequence.
    fn drop(&mut self) {
        if !self.done {
            self.shared.poison().needs_init = true;
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for PendingProduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingProduce")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl PendingProduce {
    /// Writes the request to the current leader.
    async fn start(mut self) -> Result<Self, KafkaError> {
        match self.write(false).await {
            Ok(()) => Ok(self),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn write(&mut self, refresh: bool) -> Result<(), KafkaError> {
        let conn = self
            .client
            .leader(&self.topic, self.partition, refresh)
            .await?;
        self.in_flight = Some(conn.send(&self.request).await?);
        Ok(())
    }

    /// The leader's answer. A stale-leader answer (nothing written) is
    /// resent to the new leader with the same sequence numbers.
    pub async fn wait(mut self) -> Result<ProduceAck, KafkaError> {
        let mut attempt = 1;
        loop {
            let Some(in_flight) = self.in_flight.take() else {
                return Err(self.fail(StateError::NeedsInit.into()));
            };
            let result = match in_flight.wait().await {
                Ok(response) => self.read(response),
                Err(e) => Err(e),
            };
            match result {
                Ok(ack) => {
                    self.done = true;
                    self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                    return Ok(ack);
                }
                Err(KafkaError::Broker { code, .. })
                    if code.is_stale_metadata() && attempt < self.client.config().attempts_max =>
                {
                    self.client.backoff(attempt).await;
                    attempt += 1;
                    if let Err(e) = self.write(true).await {
                        return Err(self.fail(e));
                    }
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    fn read(
        &self,
        response: kafka_protocol::messages::ProduceResponse,
    ) -> Result<ProduceAck, KafkaError> {
        let p = response
            .responses
            .iter()
            .filter(|t| t.name.0.as_str() == self.topic)
            .flat_map(|t| &t.partition_responses)
            .find(|p| p.index == self.partition)
            .ok_or(ProtocolError::MissingEntry { api: "Produce" })?;
        match ErrorCode(p.error_code) {
            ErrorCode(0) => Ok(ProduceAck {
                base_offset: Some(p.base_offset),
            }),
            ErrorCode::DUPLICATE_SEQUENCE_NUMBER => Ok(ProduceAck { base_offset: None }),
            _ => Err(KafkaError::from_code(
                "Produce",
                p.error_code,
                p.error_message.as_deref(),
            )),
        }
    }

    fn fail(&mut self, e: KafkaError) -> KafkaError {
        self.done = true;
        self.shared.note_failure(&e);
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        e
    }
}
