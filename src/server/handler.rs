//! Request handling: protocol types in, broker calls, protocol types out.

use std::time::Duration;

use crate::broker::producers::{InitError, SequenceError};
use crate::broker::{
    BrokerError, CleanupPolicy, Durability, FetchLimits, FetchPartition, OverflowPolicy, Produce,
    Produced, TopicMeta, TopicSpec,
};
use crate::protocol::{
    CreateTopicRequest, CreateTopicResponse, DeleteTopicResponse, DescribeTopicResponse, ErrorCode,
    ErrorResponse, FetchPartitionResult, FetchRequest, FetchResponse, ListOffsetsPartitionResult,
    ListOffsetsRequest, ListOffsetsResponse, ListTopicsResponse, MetadataRequest, MetadataResponse,
    OffsetSpec, PartitionMetadata, ProducePartitionResult, RecordBytes, ResponseBody, TopicConfig,
    TopicMetadata, FETCH_RESPONSE_ENVELOPE_BYTES_MAX,
};

use crate::broker::group::is_internal_topic;
use crate::bufpool::BatchBuf;

use super::acl::Operation;
use super::Ctx;

/// Room a fetch response keeps for everything but the record bytes, at
/// least: the partitions' entries are counted exactly on top of their
/// records (`fit_fetch`), and this keeps a fetch of many partitions from
/// reading records it would only drop.
const FETCH_ENVELOPE_BYTES: usize = 64 * 1024;

/// The bytes a fetch answer's entries take besides their records, at
/// most, before any error message is known.
fn fetch_envelope_bytes(partitions: &[crate::protocol::FetchPartition]) -> usize {
    FETCH_RESPONSE_ENVELOPE_BYTES_MAX
        + partitions
            .iter()
            .map(|p| FetchPartitionResult::envelope_bytes_max(&p.topic, None))
            .sum::<usize>()
}

/// Keeps a fetch answer within `max_frame_bytes`: records were read up to
/// a budget that left room for the entries without their messages, and
/// the first batch may pass it, so an error's message can take the answer
/// past the frame. The records of the last entries go first; such a
/// partition answers with no records and is fetched again from the same
/// offset (a consumer puts it in front next time). The first entry with
/// records keeps them: without them the same fetch would never move on.
/// Then the errors' messages go (the codes stay): a fetch whose entries
/// fit what a frame holds beside its largest batch always fits that way,
/// which is how the client sizes its fetches. `Err` with the answer's
/// size when it still does not fit.
fn fit_fetch(partitions: &mut [FetchPartitionResult], max_frame_bytes: usize) -> Result<(), usize> {
    let envelope = FETCH_RESPONSE_ENVELOPE_BYTES_MAX
        + partitions
            .iter()
            .map(|p| FetchPartitionResult::envelope_bytes_max(&p.topic, p.message.as_deref()))
            .sum::<usize>();
    let mut total = envelope + partitions.iter().map(|p| p.records.len()).sum::<usize>();
    let front = partitions.iter().position(|p| !p.records.is_empty());
    for (i, p) in partitions.iter_mut().enumerate().rev() {
        if total <= max_frame_bytes || Some(i) == front {
            break;
        }
        if !p.records.is_empty() {
            total -= p.records.len();
            p.records = RecordBytes::default();
            // Where to go next was past these records.
            p.next_offset = None;
        }
    }
    for p in partitions.iter_mut().rev() {
        if total <= max_frame_bytes {
            break;
        }
        if let Some(m) = p.message.take() {
            total -= FetchPartitionResult::envelope_bytes_max(&p.topic, Some(&m))
                - FetchPartitionResult::envelope_bytes_max(&p.topic, None);
        }
    }
    if total <= max_frame_bytes {
        Ok(())
    } else {
        Err(total)
    }
}

pub(crate) fn error_body(code: ErrorCode, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error(ErrorResponse {
        code,
        message: message.into(),
    })
}

pub(crate) fn broker_error_code(e: &BrokerError) -> ErrorCode {
    if e.is_disk_full() {
        return ErrorCode::StorageFull;
    }
    match e {
        BrokerError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        BrokerError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
        BrokerError::TopicExists(_) => ErrorCode::TopicExists,
        BrokerError::InvalidTopicName(_) | BrokerError::InvalidConfig(_) => {
            ErrorCode::InvalidRequest
        }
        BrokerError::TooManyTopics { .. } => ErrorCode::TooManyTopics,
        BrokerError::TooManyPartitions { .. } => ErrorCode::TooManyPartitions,
        BrokerError::DiskLimit { .. } => ErrorCode::StorageFull,
        BrokerError::Sequence(e) => match e {
            SequenceError::Fenced { .. } | SequenceError::Forgotten { .. } => {
                ErrorCode::FencedProducer
            }
            SequenceError::OutOfOrder { .. } => ErrorCode::OutOfOrderSequence,
            SequenceError::Duplicate { .. } => ErrorCode::DuplicateSequence,
            SequenceError::UnknownProducer { .. } | SequenceError::TooManyInFlight => {
                ErrorCode::InvalidRequest
            }
        },
        BrokerError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        BrokerError::InvalidBatch(_) => ErrorCode::InvalidBatch,
        BrokerError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        // Both pass with time: a retry is answered.
        BrokerError::PartitionFull { .. } | BrokerError::CompactionBehind { .. } => {
            ErrorCode::StorageFull
        }
        // A partition's refusal keeps its code (a shrink its data does
        // not fit); I/O is `storage_failed`.
        BrokerError::TopicNotAltered { error, .. } => {
            broker_error_code(&BrokerError::from(error.clone()))
        }
        BrokerError::PartitionFailed { .. }
        | BrokerError::LeftoverPartition { .. }
        | BrokerError::TopicDeleteIncomplete { .. } => ErrorCode::StorageFailed,
        BrokerError::UpstreamBacklogFull { .. } => ErrorCode::UpstreamBacklogFull,
        BrokerError::Quarantined { .. } => ErrorCode::PartitionQuarantined,
        BrokerError::ShuttingDown => ErrorCode::ShuttingDown,
        BrokerError::InvalidRecord { .. } => ErrorCode::InvalidRecord,
        BrokerError::RingFullOfLiveData { .. } | BrokerError::RingTooSmall { .. } => {
            ErrorCode::RingFullOfLiveData
        }
        _ => ErrorCode::StorageFailed,
    }
}

/// The authorization hook: every request passes here with the operation
/// and the resource (topic, or group name) it touches, before it reaches
/// the broker. A denial is logged (rate-limited) and answered
/// `not_authorized`.
pub(crate) fn authorize(ctx: &Ctx, identity: &str, op: Operation, resource: &str) -> bool {
    if ctx.acl().allows(identity, op, resource) {
        return true;
    }
    ctx.denials.denied(identity, op, resource);
    false
}

/// Whether `identity` may see `topic` in a listing; not logged (a listing
/// leaves out what the identity may not see, it does not ask for it).
fn may_see(ctx: &Ctx, identity: &str, topic: &str) -> bool {
    !is_internal_topic(topic) && ctx.acl().allows(identity, Operation::Describe, topic)
}

pub(crate) fn not_authorized_message(identity: &str, op: Operation, resource: &str) -> String {
    format!("identity '{identity}' may not {op} '{resource}'")
}

pub(crate) fn not_authorized_body(identity: &str, op: Operation, resource: &str) -> ResponseBody {
    error_body(
        ErrorCode::NotAuthorized,
        not_authorized_message(identity, op, resource),
    )
}

/// A producer id (or transaction) asked by an identity that may produce
/// to no topic at all: worded as the broker logs it, `'*'`, and why.
pub(crate) fn produce_nowhere_body(identity: &str) -> ResponseBody {
    error_body(
        ErrorCode::NotAuthorized,
        format!(
            "{}: no [acl] rule lets it produce to any topic",
            not_authorized_message(identity, Operation::Produce, "*")
        ),
    )
}

fn internal_topic_message(topic: &str) -> String {
    format!(
        "'{topic}' is an internal topic of the broker: clients may not create, delete or write it"
    )
}

fn internal_topic_body(topic: &str) -> ResponseBody {
    error_body(ErrorCode::InvalidRequest, internal_topic_message(topic))
}

fn broker_error_body(e: &BrokerError) -> ResponseBody {
    error_body(broker_error_code(e), e.to_string())
}

fn topic_config(ctx: &Ctx, name: &str, meta: &TopicMeta) -> TopicConfig {
    let window = ctx.broker.msg_id_config(name);
    let cleanup = ctx.broker.cleanup_config(name);
    TopicConfig {
        cleanup: Some(cleanup.policy.to_string()),
        tombstone_retention_ms: cleanup
            .policy
            .compacts()
            .then_some(cleanup.tombstone_retention_ms),
        msg_id_window_ms: (window.window_ms > 0).then_some(window.window_ms),
        msg_id_window_records: (window.window_records > 0).then_some(window.window_records),
        name: name.to_owned(),
        partitions: meta.partitions,
        segment_bytes: meta.config.segment_bytes,
        segments: meta.config.segments,
        retention_ms: meta.config.retention_ms,
        fsync: meta.config.durability.to_string(),
        overflow: meta.config.overflow.to_string(),
    }
}

fn partition_metadata(ctx: &Ctx, topic: &str, meta: &TopicMeta) -> Vec<PartitionMetadata> {
    (0..meta.partitions)
        .map(|p| match ctx.broker.offsets(topic, p) {
            Ok(o) => PartitionMetadata {
                partition: p,
                error: ErrorCode::None,
                earliest_offset: o.earliest,
                latest_offset: o.high_watermark,
                message: None,
            },
            Err(e) => PartitionMetadata {
                partition: p,
                error: broker_error_code(&e),
                earliest_offset: 0,
                latest_offset: 0,
                // The code alone would leave an operator to find the
                // reason (a quarantine's, say) in the log.
                message: Some(e.to_string()),
            },
        })
        .collect()
}

pub(crate) fn metadata(ctx: &Ctx, identity: &str, req: MetadataRequest) -> ResponseBody {
    let names: Vec<String> = match req.topics {
        Some(names) => names,
        None => ctx
            .broker
            .topics()
            .into_keys()
            .filter(|t| may_see(ctx, identity, t))
            .collect(),
    };
    let topics = names
        .into_iter()
        .map(|name| match ctx.broker.topic(&name) {
            _ if !authorize(ctx, identity, Operation::Describe, &name) => TopicMetadata {
                message: Some(not_authorized_message(identity, Operation::Describe, &name)),
                name,
                error: ErrorCode::NotAuthorized,
                partitions: Vec::new(),
            },
            Ok(meta) => TopicMetadata {
                partitions: partition_metadata(ctx, &name, &meta),
                name,
                error: ErrorCode::None,
                message: None,
            },
            Err(e) => TopicMetadata {
                name,
                error: broker_error_code(&e),
                partitions: Vec::new(),
                message: Some(e.to_string()),
            },
        })
        .collect();
    ResponseBody::Metadata(MetadataResponse { topics })
}

/// A request's `fsync`, shared by create and alter: the answer to send
/// back when it does not parse.
fn parse_fsync(fsync: Option<&str>) -> Result<Option<Durability>, Box<ResponseBody>> {
    fsync
        .map(str::parse::<Durability>)
        .transpose()
        .map_err(|_| {
            Box::new(error_body(
                ErrorCode::InvalidRequest,
                "fsync must be always, interval:<ms> or never",
            ))
        })
}

/// A request's `cleanup`, shared by create and alter.
fn parse_cleanup(cleanup: Option<&str>) -> Result<Option<CleanupPolicy>, Box<ResponseBody>> {
    cleanup
        .map(str::parse::<CleanupPolicy>)
        .transpose()
        .map_err(|e| Box::new(broker_error_body(&e)))
}

pub(crate) async fn create_topic(
    ctx: &Ctx,
    identity: &str,
    req: CreateTopicRequest,
) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Create, &req.name) {
        return not_authorized_body(identity, Operation::Create, &req.name);
    }
    if is_internal_topic(&req.name) {
        return internal_topic_body(&req.name);
    }
    let durability = match parse_fsync(req.fsync.as_deref()) {
        Ok(d) => d,
        Err(body) => return *body,
    };
    let overflow = match req.overflow.as_deref().map(str::parse::<OverflowPolicy>) {
        None => None,
        Some(Ok(o)) => Some(o),
        Some(Err(_)) => {
            return error_body(
                ErrorCode::InvalidRequest,
                "overflow must be overwrite or reject",
            )
        }
    };
    let cleanup = match parse_cleanup(req.cleanup.as_deref()) {
        Ok(c) => c,
        Err(body) => return *body,
    };
    let spec = TopicSpec {
        cleanup,
        tombstone_retention_ms: req.tombstone_retention_ms,
        partitions: req.partitions,
        segment_bytes: req.segment_bytes,
        segments: req.segments,
        retention_ms: req.retention_ms,
        durability,
        overflow,
        msg_id_window_ms: req.msg_id_window_ms,
        msg_id_window_records: req.msg_id_window_records,
    };
    match ctx.broker.create_topic(&req.name, &spec).await {
        Ok(meta) => ResponseBody::CreateTopic(Box::new(CreateTopicResponse {
            config: topic_config(ctx, &req.name, &meta),
        })),
        Err(e) => broker_error_body(&e),
    }
}

pub(crate) fn describe_topic(ctx: &Ctx, identity: &str, name: &str) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Describe, name) {
        return not_authorized_body(identity, Operation::Describe, name);
    }
    match ctx.broker.topic(name) {
        Ok(meta) => ResponseBody::DescribeTopic(Box::new(DescribeTopicResponse {
            config: topic_config(ctx, name, &meta),
            partitions: partition_metadata(ctx, name, &meta),
        })),
        Err(e) => broker_error_body(&e),
    }
}

pub(crate) fn list_topics(ctx: &Ctx, identity: &str) -> ResponseBody {
    let (budget, reserved) = ctx.broker.disk_usage();
    ResponseBody::ListTopics(ListTopicsResponse {
        disk_budget_bytes: Some(budget),
        disk_reserved_bytes: Some(reserved),
        topics: ctx
            .broker
            .topics()
            .into_keys()
            .filter(|t| may_see(ctx, identity, t))
            .collect(),
    })
}

pub(crate) async fn delete_topic(ctx: &Ctx, identity: &str, name: &str) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Delete, name) {
        return not_authorized_body(identity, Operation::Delete, name);
    }
    if is_internal_topic(name) {
        return internal_topic_body(name);
    }
    let deleted = ctx.broker.delete_topic(name).await;
    // An incomplete delete took the topic out of the table all the same.
    if matches!(
        deleted,
        Ok(()) | Err(BrokerError::TopicDeleteIncomplete { .. })
    ) {
        ctx.metrics.remove_topic(name);
        // Durable before the answer, so a topic created again by this
        // name starts with no share state. A crash before it is
        // caught at start-up (the share coordinator drops the state of
        // topics that are gone).
        if let Err(e) = ctx.share.forget_topic(name).await {
            log::warn!("topic {name} deleted, but not its share state yet: {e}");
        }
        // Likewise the groups' offsets, so a group reads a topic made
        // again by this name from its start, not from the old offsets.
        if let Err(e) = ctx.groups.forget_topic(name).await {
            log::warn!("topic {name} deleted, but not the groups' offsets of it: {e}");
        }
        // So are its aborted transactions' ranges, which would hide the
        // records of a topic made again by the name.
        if let Err(e) = ctx.txns.forget_topic(name).await {
            log::warn!("topic {name} deleted, but not its aborted transactions yet: {e}");
        }
    }
    match deleted {
        Ok(()) => ResponseBody::DeleteTopic(DeleteTopicResponse {}),
        Err(e) => broker_error_body(&e),
    }
}

/// One partition's part of a produce, between submit and ack.
pub(crate) enum PendingProduce {
    Waiting {
        topic: String,
        partition: u32,
        ack: Produce,
        /// The batch's bytes, counted in the topic's metrics once written.
        bytes: u64,
    },
    Done(ProducePartitionResult),
}

fn produce_result(
    topic: String,
    partition: u32,
    result: Result<Produced, BrokerError>,
) -> ProducePartitionResult {
    match result {
        Ok(p) => ProducePartitionResult {
            topic,
            partition,
            error: ErrorCode::None,
            base_offset: p.base_offset,
            last_offset: p.last_offset,
            duplicate_records: p.duplicate_records,
            message: None,
        },
        Err(e) => ProducePartitionResult {
            topic,
            partition,
            error: broker_error_code(&e),
            base_offset: 0,
            last_offset: 0,
            duplicate_records: 0,
            message: Some(e.to_string()),
        },
    }
}

/// A produce batch as the reader hands it over.
pub(crate) enum BatchIn<'f> {
    /// In the request frame: copied into a buffer of the server's pool
    /// when submitted.
    Frame(crate::protocol::BatchBytes<'f>),
    /// In a buffer of its own already (the frame's, lent whole).
    Own(BatchBuf),
}

impl std::ops::Deref for BatchIn<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BatchIn::Frame(b) => &b[..],
            BatchIn::Own(b) => &b[..],
        }
    }
}

/// One partition's part of a produce request.
pub(crate) struct ProduceIn<'f> {
    pub topic: String,
    pub partition: u32,
    pub batch: BatchIn<'f>,
}

/// Submits every batch of a produce in request order, as one group (one
/// storage wake-up, after the last). Called from the connection's reader
/// so that pipelined produces reach the log in the order the client sent
/// them (and idempotent sequences are checked in that order); the acks
/// are awaited elsewhere. A batch still in the frame is copied out of it
/// once, into a buffer of the server's pool.
pub(crate) async fn produce_submit(
    ctx: &Ctx,
    identity: &str,
    partitions: impl ExactSizeIterator<Item = ProduceIn<'_>>,
) -> Vec<PendingProduce> {
    let mut pending = Vec::with_capacity(partitions.len());
    let mut group = ctx.broker.produce_group();
    for p in partitions {
        if !authorize(ctx, identity, Operation::Produce, &p.topic) {
            let message = not_authorized_message(identity, Operation::Produce, &p.topic);
            pending.push(PendingProduce::Done(ProducePartitionResult {
                topic: p.topic,
                partition: p.partition,
                error: ErrorCode::NotAuthorized,
                base_offset: 0,
                last_offset: 0,
                duplicate_records: 0,
                message: Some(message),
            }));
            continue;
        }
        if is_internal_topic(&p.topic) {
            let message = internal_topic_message(&p.topic);
            pending.push(PendingProduce::Done(ProducePartitionResult {
                topic: p.topic,
                partition: p.partition,
                error: ErrorCode::InvalidRequest,
                base_offset: 0,
                last_offset: 0,
                duplicate_records: 0,
                message: Some(message),
            }));
            continue;
        }
        if p.batch.len() > ctx.settings.max_batch_bytes {
            let e = BrokerError::BatchTooLarge {
                bytes: p.batch.len(),
                max: ctx.settings.max_batch_bytes,
            };
            pending.push(PendingProduce::Done(produce_result(
                p.topic,
                p.partition,
                Err(e),
            )));
            continue;
        }
        // A transactional producer's batch first joins its transaction
        // (durably, for a new partition), and holds it until queued. Boxed:
        // inline, its future made every connection's session task 1,160 B
        // larger (of 4,304), transactional or not (docs/performance.md,
        // "what a connection costs").
        let gate = match crate::batch::parse_header(&p.batch) {
            Ok(h) if h.is_idempotent() && ctx.txns.is_transactional(h.producer_id) => {
                match Box::pin(ctx.txns.gate(
                    h.producer_id,
                    h.producer_epoch,
                    &p.topic,
                    p.partition,
                ))
                .await
                {
                    Ok(gate) => gate,
                    Err(e) => {
                        pending.push(PendingProduce::Done(ProducePartitionResult {
                            topic: p.topic,
                            partition: p.partition,
                            error: super::txn::txn_error_code(&e),
                            base_offset: 0,
                            last_offset: 0,
                            duplicate_records: 0,
                            message: Some(e.to_string()),
                        }));
                        continue;
                    }
                }
            }
            _ => None,
        };
        let batch = match p.batch {
            BatchIn::Frame(b) => ctx.pool.copy(&b),
            BatchIn::Own(b) => b,
        };
        let bytes = batch.len() as u64;
        let submitted = group.produce(&p.topic, p.partition, batch).await;
        drop(gate);
        pending.push(match submitted {
            Ok(ack) => PendingProduce::Waiting {
                topic: p.topic,
                partition: p.partition,
                ack,
                bytes,
            },
            Err(e) => PendingProduce::Done(produce_result(p.topic, p.partition, Err(e))),
        });
    }
    pending
}

/// Awaits a produce's acks, in request order, and counts what was
/// written in the topics' metrics.
pub(crate) async fn produce_complete(
    pending: Vec<PendingProduce>,
    metrics: &crate::metrics::Metrics,
) -> ResponseBody {
    let mut partitions = Vec::with_capacity(pending.len());
    for p in pending {
        partitions.push(match p {
            PendingProduce::Done(r) => r,
            PendingProduce::Waiting {
                topic,
                partition,
                ack,
                bytes,
            } => {
                let r = produce_result(topic, partition, ack.await);
                if r.error.is_none() {
                    // Records written, not duplicates answered from the
                    // producer table.
                    let records = (r.last_offset - r.base_offset + 1)
                        .saturating_sub(u64::from(r.duplicate_records));
                    if records > 0 {
                        metrics.record_produce(&r.topic, records, bytes);
                    }
                }
                r
            }
        });
    }
    ResponseBody::Produce(crate::protocol::ProduceResponse {
        partitions,
        throttle_ms: None,
    })
}

/// Hands out a producer id and epoch (see `broker::producers`).
pub(crate) async fn init_producer(
    ctx: &Ctx,
    identity: &str,
    req: crate::protocol::InitProducerRequest,
) -> ResponseBody {
    // A producer id is not tied to a topic: any identity that may produce
    // somewhere may have one.
    if !ctx.acl().allows_somewhere(identity, Operation::Produce) {
        ctx.denials.denied(identity, Operation::Produce, "*");
        return produce_nowhere_body(identity);
    }
    let answer = match (req.producer_name.as_deref(), req.renew) {
        (None, Some(r)) => {
            ctx.broker
                .renew_producer(r.producer_id, r.producer_epoch)
                .await
        }
        (name, _) => ctx.broker.init_producer(name).await,
    };
    match answer {
        Ok((producer_id, producer_epoch)) => {
            ResponseBody::InitProducer(crate::protocol::InitProducerResponse {
                producer_id,
                producer_epoch,
            })
        }
        // An exhausted epoch is an older broker's name's only: a name's
        // own id moves on to a new one (`Producers::init`).
        Err(e @ (InitError::InvalidName | InitError::EpochExhausted)) => {
            error_body(ErrorCode::InvalidRequest, e.to_string())
        }
        // The registry must be durable before an id is handed out: on a
        // full disk that is a full disk, not a broken one.
        Err(e) if e.is_no_space() => {
            error_body(ErrorCode::StorageFull, format!("{e}; free disk space"))
        }
        Err(e) => error_body(ErrorCode::StorageFailed, e.to_string()),
    }
}

/// Reads every asked-for partition; if together they hold fewer than
/// `min_bytes` (at least one byte), waits for new data or `max_wait_ms`
/// (see `Broker::fetch`). The answer fits the frame limit.
pub(crate) async fn fetch(ctx: &Ctx, identity: &str, req: FetchRequest) -> ResponseBody {
    let max_frame_bytes = ctx.settings.max_frame_bytes;
    let envelope = fetch_envelope_bytes(&req.partitions);
    if envelope > max_frame_bytes {
        return too_many_to_fetch(req.partitions.len(), envelope, max_frame_bytes);
    }
    let allowed: Vec<bool> = req
        .partitions
        .iter()
        .map(|p| authorize(ctx, identity, Operation::Consume, &p.topic))
        .collect();
    let parts: Vec<FetchPartition<'_>> = req
        .partitions
        .iter()
        .zip(&allowed)
        .filter(|(_, ok)| **ok)
        .map(|(p, _)| FetchPartition {
            topic: &p.topic,
            partition: p.partition,
            offset: p.offset,
            max_bytes: p.max_bytes as usize,
        })
        .collect();
    let limits = FetchLimits {
        min_bytes: req.min_bytes as usize,
        max_wait: Duration::from_millis(u64::from(req.max_wait_ms).min(ctx.settings.max_wait_ms)),
        max_bytes: max_frame_bytes.saturating_sub(envelope.max(FETCH_ENVELOPE_BYTES)),
    };
    let read_committed = req.isolation == Some(crate::protocol::Isolation::ReadCommitted);
    let mut results = ctx
        .broker
        .fetch_isolated(&parts, limits, read_committed)
        .await
        .into_iter();
    let mut partitions: Vec<FetchPartitionResult> = req
        .partitions
        .iter()
        .zip(allowed)
        .map(|(p, ok)| match ok.then(|| results.next()).flatten() {
            None => FetchPartitionResult {
                topic: p.topic.clone(),
                partition: p.partition,
                error: ErrorCode::NotAuthorized,
                high_watermark: 0,
                earliest_offset: 0,
                records: RecordBytes::default(),
                last_stable_offset: None,
                next_offset: None,
                message: None,
            },
            Some(Ok(f)) => FetchPartitionResult {
                topic: p.topic.clone(),
                partition: p.partition,
                error: ErrorCode::None,
                high_watermark: f.offsets.high_watermark,
                earliest_offset: f.offsets.earliest,
                records: RecordBytes::from(f.records),
                last_stable_offset: Some(f.last_stable_offset),
                next_offset: f.next_offset,
                message: None,
            },
            Some(Err(e)) => {
                let (high_watermark, earliest_offset) = ctx
                    .broker
                    .offsets(&p.topic, p.partition)
                    .map(|o| (o.high_watermark, o.earliest))
                    .unwrap_or((0, 0));
                FetchPartitionResult {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    error: broker_error_code(&e),
                    high_watermark,
                    earliest_offset,
                    records: RecordBytes::default(),
                    last_stable_offset: None,
                    next_offset: None,
                    // The code alone would leave an operator to find
                    // the reason (a quarantine's, say) in the log.
                    message: Some(e.to_string()),
                }
            }
        })
        .collect();
    if let Err(bytes) = fit_fetch(&mut partitions, max_frame_bytes) {
        return too_many_to_fetch(partitions.len(), bytes, max_frame_bytes);
    }
    ResponseBody::Fetch(FetchResponse {
        partitions,
        throttle_ms: None,
    })
}

fn too_many_to_fetch(partitions: usize, bytes: usize, max_frame_bytes: usize) -> ResponseBody {
    error_body(
        ErrorCode::InvalidRequest,
        format!(
            "the answer to a fetch of {partitions} partitions would take {bytes} bytes or more, \
             above max_frame_bytes ({max_frame_bytes}): fetch fewer partitions at once"
        ),
    )
}

pub(crate) async fn list_offsets(
    ctx: &Ctx,
    identity: &str,
    req: ListOffsetsRequest,
) -> ResponseBody {
    let mut partitions = Vec::with_capacity(req.partitions.len());
    for p in req.partitions {
        if !authorize(ctx, identity, Operation::Describe, &p.topic) {
            partitions.push(ListOffsetsPartitionResult {
                topic: p.topic,
                partition: p.partition,
                error: ErrorCode::NotAuthorized,
                offset: None,
                message: None,
            });
            continue;
        }
        let r: Result<Option<u64>, BrokerError> = match p.spec {
            OffsetSpec::Earliest => ctx
                .broker
                .offsets(&p.topic, p.partition)
                .map(|o| Some(o.earliest)),
            OffsetSpec::Latest => ctx
                .broker
                .offsets(&p.topic, p.partition)
                .map(|o| Some(o.high_watermark)),
            OffsetSpec::Timestamp(ts) => {
                ctx.broker
                    .offset_for_timestamp(&p.topic, p.partition, ts)
                    .await
            }
        };
        partitions.push(match r {
            Ok(offset) => ListOffsetsPartitionResult {
                topic: p.topic,
                partition: p.partition,
                error: ErrorCode::None,
                offset,
                message: None,
            },
            Err(e) => ListOffsetsPartitionResult {
                topic: p.topic,
                partition: p.partition,
                error: broker_error_code(&e),
                offset: None,
                message: Some(e.to_string()),
            },
        });
    }
    ResponseBody::ListOffsets(ListOffsetsResponse { partitions })
}

// ------------------------------------------------ compaction (issue 19)

pub(crate) async fn compact_topic(
    ctx: &Ctx,
    identity: &str,
    req: crate::protocol::CompactTopicRequest,
) -> ResponseBody {
    use crate::protocol::{CompactTopicResponse, CompactedPartition};
    if !authorize(ctx, identity, Operation::Alter, &req.name) {
        return not_authorized_body(identity, Operation::Alter, &req.name);
    }
    let meta = match ctx.broker.topic(&req.name) {
        Ok(m) => m,
        Err(e) => return broker_error_body(&e),
    };
    if !ctx.broker.cleanup_config(&req.name).policy.compacts() {
        return error_body(
            ErrorCode::InvalidRequest,
            format!(
                "topic '{}' is not compacted (cleanup = \"delete\")",
                req.name
            ),
        );
    }
    if !req.wait {
        let broker = ctx.broker.clone();
        let name = req.name.clone();
        ctx.executor
            .spawn(async move {
                for p in 0..meta.partitions {
                    if let Err(e) = broker.compact_partition(&name, p).await {
                        log::warn!("{name}/{p}: compaction failed: {e}");
                    }
                }
            })
            .detach();
        return ResponseBody::CompactTopic(CompactTopicResponse { partitions: vec![] });
    }
    let mut partitions = Vec::new();
    for p in 0..meta.partitions {
        let r = ctx.broker.compact_partition(&req.name, p).await;
        partitions.push(match r {
            Ok(r) => CompactedPartition {
                partition: p,
                error: ErrorCode::None,
                segments_merged: r.segments_merged,
                segments_freed: r.segments_freed,
                bytes_before: r.bytes_before,
                bytes_after: r.bytes_after,
                records_removed: r.records_removed,
                message: None,
            },
            Err(e) => CompactedPartition {
                partition: p,
                error: broker_error_code(&e),
                segments_merged: 0,
                segments_freed: 0,
                bytes_before: 0,
                bytes_after: 0,
                records_removed: 0,
                message: Some(e.to_string()),
            },
        });
    }
    ResponseBody::CompactTopic(CompactTopicResponse { partitions })
}

pub(crate) async fn describe_partitions(ctx: &Ctx, identity: &str, name: &str) -> ResponseBody {
    use crate::protocol::{DescribePartitionsResponse, PartitionDetail};
    if !authorize(ctx, identity, Operation::Describe, name) {
        return not_authorized_body(identity, Operation::Describe, name);
    }
    let meta = match ctx.broker.topic(name) {
        Ok(m) => m,
        Err(e) => return broker_error_body(&e),
    };
    let mut partitions = Vec::new();
    let damage = ctx.broker.recovery_damage();
    for p in 0..meta.partitions {
        partitions.push(match ctx.broker.partition_details(name, p).await {
            Ok(d) => PartitionDetail {
                damaged: {
                    let here: Vec<_> = damage
                        .iter()
                        .filter(|(id, r)| {
                            &*id.topic == name && id.partition == p && r.to_offset > d.log_start
                        })
                        .map(|(_, r)| crate::protocol::DamagedRange {
                            from_offset: r.from_offset,
                            to_offset: r.to_offset,
                            bytes: r.bytes,
                            slot: r.slot,
                            position: r.position,
                            found_ms: r.found_ms,
                            found: r.found.to_string(),
                        })
                        .collect();
                    (!here.is_empty()).then_some(here)
                },
                partition: p,
                error: ErrorCode::None,
                log_start: d.log_start,
                log_end: d.log_end,
                bytes: d.bytes,
                segments_used: d.segments_used,
                segments: meta.config.segments,
                oldest_segment_max_timestamp: d.oldest_segment_max_timestamp,
                next_retention_at_ms: d.next_retention.map(|r| r.at_ms),
                next_retention_offsets: d.next_retention.map(|r| r.offsets),
                next_retention_bytes: d.next_retention.map(|r| r.bytes),
                oldest_timestamp: d.oldest_timestamp,
                message: None,
            },
            Err(e) => PartitionDetail::failed(
                p,
                broker_error_code(&e),
                meta.config.segments,
                e.to_string(),
            ),
        });
    }
    ResponseBody::DescribePartitions(DescribePartitionsResponse { partitions })
}

pub(crate) async fn alter_topic(
    ctx: &Ctx,
    identity: &str,
    req: crate::protocol::AlterTopicRequest,
) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Alter, &req.name) {
        return not_authorized_body(identity, Operation::Alter, &req.name);
    }
    let durability = match parse_fsync(req.fsync.as_deref()) {
        Ok(d) => d,
        Err(body) => return *body,
    };
    let cleanup = match parse_cleanup(req.cleanup.as_deref()) {
        Ok(c) => c,
        Err(body) => return *body,
    };
    let alter = crate::broker::TopicAlter {
        retention_ms: req.retention_ms,
        durability,
        cleanup,
        tombstone_retention_ms: req.tombstone_retention_ms,
        segments: req.segments,
    };
    match ctx.broker.alter_topic(&req.name, &alter).await {
        Ok(meta) => ResponseBody::AlterTopic(Box::new(CreateTopicResponse {
            config: topic_config(ctx, &req.name, &meta),
        })),
        Err(e) => broker_error_body(&e),
    }
}

/// The mirror's status; needs the `mirror` operation on some rule.
pub(crate) fn mirror_status(ctx: &Ctx, identity: &str) -> ResponseBody {
    if !ctx.acl().allows_somewhere(identity, Operation::Mirror) {
        ctx.denials.denied(identity, Operation::Mirror, "*");
        return not_authorized_body(identity, Operation::Mirror, "any mirror rule");
    }
    let s = ctx.mirror.report();
    ResponseBody::MirrorStatus(Box::new(crate::protocol::MirrorStatusResponse {
        enabled: s.enabled,
        link_up: s.link == crate::mirror::Link::Up,
        last_error: s.last_error,
        gateway: s.gateway,
        upstream: s.upstream,
        transactions_committed: s.transactions_committed,
        transactions_aborted: s.transactions_aborted,
        rules: s
            .rules
            .into_iter()
            .map(|r| crate::protocol::MirrorRuleStatus {
                name: r.name,
                paused: r.paused,
                partitions: r.partitions,
                backlog_records: r.backlog_records,
                bytes_at_risk: r.bytes_at_risk,
                forwarded_records: r.forwarded_records,
                forwarded_bytes: r.forwarded_bytes,
                dropped_records: r.dropped_records,
                rate_bytes_per_s: Some(r.rate_bytes_per_s),
                eta_s: r.eta_s,
                open_windows: r.open_windows,
                windows_emitted: r.windows_emitted,
                windows_closed_early: r.windows_closed_early,
                late_records: r.late_records,
                malformed_records: r.malformed_records,
            })
            .collect(),
    }))
}

/// Pauses or resumes a rule (the `mirror` operation on the rule's name).
pub(crate) fn mirror_pause(
    ctx: &Ctx,
    identity: &str,
    req: crate::protocol::MirrorRuleRequest,
) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Mirror, &req.rule) {
        return not_authorized_body(identity, Operation::Mirror, &req.rule);
    }
    if !ctx.mirror.set_paused(&req.rule, req.paused) {
        let names: Vec<String> = ctx
            .mirror
            .report()
            .rules
            .into_iter()
            .map(|r| r.name)
            .collect();
        return error_body(
            ErrorCode::InvalidRequest,
            format!(
                "no mirror rule is named '{}' (rules: {})",
                req.rule,
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ),
        );
    }
    log::info!(
        "mirror: rule '{}' {} by {identity}",
        req.rule,
        if req.paused { "paused" } else { "resumed" }
    );
    ResponseBody::MirrorPause(req)
}
