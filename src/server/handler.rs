//! Request handling: protocol types in, broker calls, protocol types out.

use std::time::{Duration, Instant};

use minicbor::bytes::ByteVec;

use crate::broker::producers::{InitError, SequenceError, Slot};
use crate::broker::{BrokerError, PendingWrite, Submitted, TopicMeta, TopicSpec};
use crate::protocol::{
    CreateTopicRequest, CreateTopicResponse, DeleteTopicResponse, DescribeTopicResponse, ErrorCode,
    ErrorResponse, FetchPartitionResult, FetchRequest, FetchResponse, ListOffsetsPartitionResult,
    ListOffsetsRequest, ListOffsetsResponse, ListTopicsResponse, MetadataRequest, MetadataResponse,
    OffsetSpec, PartitionMetadata, ProducePartitionResult, ResponseBody, TopicConfig,
    TopicMetadata,
};
use crate::storage::{AppendAck, AppendTicket, Durability, OverflowPolicy, StorageError, Wake};
use std::sync::Arc;

use super::Ctx;

/// Room left in a fetch response for everything but the record bytes.
const FETCH_ENVELOPE_BYTES: usize = 64 * 1024;

pub(crate) fn error_body(code: ErrorCode, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error(ErrorResponse {
        code,
        message: message.into(),
    })
}

pub(crate) fn storage_error_code(e: &StorageError) -> ErrorCode {
    match e {
        StorageError::UnknownPartition(_) => ErrorCode::UnknownPartition,
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::InvalidBatch(_) => ErrorCode::InvalidBatch,
        StorageError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        StorageError::Full(_) => ErrorCode::StorageFull,
        StorageError::Failed { .. } => ErrorCode::StorageFailed,
        StorageError::Quarantined(_) => ErrorCode::PartitionQuarantined,
        StorageError::InvalidConfig(_) => ErrorCode::InvalidRequest,
        StorageError::PartitionExists(_) => ErrorCode::TopicExists,
        StorageError::ShuttingDown => ErrorCode::ShuttingDown,
        StorageError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => ErrorCode::StorageFull,
        _ => ErrorCode::StorageFailed,
    }
}

pub(crate) fn broker_error_code(e: &BrokerError) -> ErrorCode {
    match e {
        BrokerError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        BrokerError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
        BrokerError::TopicExists(_) => ErrorCode::TopicExists,
        BrokerError::InvalidTopicName(_) | BrokerError::InvalidConfig(_) => {
            ErrorCode::InvalidRequest
        }
        BrokerError::TooManyTopics { .. } => ErrorCode::TooManyTopics,
        BrokerError::TooManyPartitions { .. } => ErrorCode::TooManyPartitions,
        BrokerError::Sequence(e) => match e {
            SequenceError::Fenced { .. } => ErrorCode::FencedProducer,
            SequenceError::OutOfOrder { .. } => ErrorCode::OutOfOrderSequence,
            SequenceError::Duplicate { .. } => ErrorCode::DuplicateSequence,
            SequenceError::UnknownProducer { .. } | SequenceError::TooManyInFlight => {
                ErrorCode::InvalidRequest
            }
        },
        BrokerError::Storage(e) => storage_error_code(e),
    }
}

fn broker_error_body(e: &BrokerError) -> ResponseBody {
    error_body(broker_error_code(e), e.to_string())
}

fn topic_config(ctx: &Ctx, name: &str, meta: &TopicMeta) -> TopicConfig {
    let window = ctx.broker.msg_id_config(name);
    TopicConfig {
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
            },
            Err(e) => PartitionMetadata {
                partition: p,
                error: broker_error_code(&e),
                earliest_offset: 0,
                latest_offset: 0,
            },
        })
        .collect()
}

pub(crate) fn metadata(ctx: &Ctx, req: MetadataRequest) -> ResponseBody {
    let names: Vec<String> = match req.topics {
        Some(names) => names,
        None => ctx.broker.topics().into_keys().collect(),
    };
    let topics = names
        .into_iter()
        .map(|name| match ctx.broker.topic(&name) {
            Ok(meta) => TopicMetadata {
                partitions: partition_metadata(ctx, &name, &meta),
                name,
                error: ErrorCode::None,
            },
            Err(e) => TopicMetadata {
                name,
                error: broker_error_code(&e),
                partitions: Vec::new(),
            },
        })
        .collect();
    ResponseBody::Metadata(MetadataResponse { topics })
}

pub(crate) async fn create_topic(ctx: &Ctx, req: CreateTopicRequest) -> ResponseBody {
    let durability = match req.fsync.as_deref().map(str::parse::<Durability>) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => {
            return error_body(
                ErrorCode::InvalidRequest,
                "fsync must be always, interval:<ms> or never",
            )
        }
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
    let spec = TopicSpec {
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
        Ok(meta) => ResponseBody::CreateTopic(CreateTopicResponse {
            config: topic_config(ctx, &req.name, &meta),
        }),
        Err(e) => broker_error_body(&e),
    }
}

pub(crate) fn describe_topic(ctx: &Ctx, name: &str) -> ResponseBody {
    match ctx.broker.topic(name) {
        Ok(meta) => ResponseBody::DescribeTopic(DescribeTopicResponse {
            config: topic_config(ctx, name, &meta),
            partitions: partition_metadata(ctx, name, &meta),
        }),
        Err(e) => broker_error_body(&e),
    }
}

pub(crate) fn list_topics(ctx: &Ctx) -> ResponseBody {
    ResponseBody::ListTopics(ListTopicsResponse {
        topics: ctx.broker.topics().into_keys().collect(),
    })
}

pub(crate) async fn delete_topic(ctx: &Ctx, name: &str) -> ResponseBody {
    match ctx.broker.delete_topic(name).await {
        Ok(()) => {
            ctx.metrics.remove_topic(name);
            ResponseBody::DeleteTopic(DeleteTopicResponse {})
        }
        Err(e) => broker_error_body(&e),
    }
}

/// One partition's part of a produce, between submit and ack.
pub(crate) enum PendingProduce {
    Waiting {
        topic: String,
        partition: u32,
        ticket: AppendTicket,
        write: PendingWrite,
    },
    /// A retry of an idempotent batch still in flight: answered with that
    /// batch's outcome, as a duplicate.
    SameAs {
        topic: String,
        partition: u32,
        slot: Arc<Slot>,
        records: u32,
    },
    Done(ProducePartitionResult),
}

fn produce_result(
    topic: String,
    partition: u32,
    result: Result<AppendAck, (ErrorCode, String)>,
    duplicate_records: u32,
) -> ProducePartitionResult {
    match result {
        Ok(ack) => ProducePartitionResult {
            topic,
            partition,
            error: ErrorCode::None,
            base_offset: ack.base_offset,
            last_offset: ack.last_offset,
            duplicate_records,
            message: None,
        },
        Err((code, message)) => ProducePartitionResult {
            topic,
            partition,
            error: code,
            base_offset: 0,
            last_offset: 0,
            duplicate_records: 0,
            message: Some(message),
        },
    }
}

/// Submits every batch of a produce in request order. Called from the
/// connection's reader so that pipelined produces reach the log in the order
/// the client sent them (and idempotent sequences are checked in that
/// order); the acks are awaited elsewhere.
pub(crate) async fn produce_submit(
    ctx: &Ctx,
    req: crate::protocol::ProduceRequest,
) -> Vec<PendingProduce> {
    let mut pending = Vec::with_capacity(req.partitions.len());
    for p in req.partitions {
        let batch: Vec<u8> = p.batch.into();
        if batch.len() > ctx.settings.max_batch_bytes {
            let msg = format!(
                "batch of {} bytes is above the limit of {}",
                batch.len(),
                ctx.settings.max_batch_bytes
            );
            pending.push(PendingProduce::Done(produce_result(
                p.topic,
                p.partition,
                Err((ErrorCode::BatchTooLarge, msg)),
                0,
            )));
            continue;
        }
        match ctx
            .broker
            .submit_produce(&p.topic, p.partition, batch, Wake::Later)
            .await
        {
            Ok(Submitted::Queued {
                ticket,
                pending: write,
            }) => pending.push(PendingProduce::Waiting {
                topic: p.topic,
                partition: p.partition,
                ticket,
                write,
            }),
            Ok(Submitted::Duplicate {
                base_offset,
                last_offset,
                records,
            }) => pending.push(PendingProduce::Done(produce_result(
                p.topic,
                p.partition,
                Ok(AppendAck {
                    base_offset,
                    last_offset,
                }),
                records,
            ))),
            Ok(Submitted::InFlight { slot, records }) => pending.push(PendingProduce::SameAs {
                topic: p.topic,
                partition: p.partition,
                slot,
                records,
            }),
            Err(e) => pending.push(PendingProduce::Done(produce_result(
                p.topic,
                p.partition,
                Err((broker_error_code(&e), e.to_string())),
                0,
            ))),
        }
    }
    // Once, after the last: the storage thread finds the request's batches
    // together and writes them as one group.
    ctx.broker.storage().wake();
    pending
}

pub(crate) async fn produce_complete(ctx: &Ctx, pending: Vec<PendingProduce>) -> ResponseBody {
    let mut partitions = Vec::with_capacity(pending.len());
    for p in pending {
        partitions.push(match p {
            PendingProduce::Done(r) => r,
            PendingProduce::Waiting {
                topic,
                partition,
                ticket,
                write,
            } => {
                let dropped = write.dropped;
                let r = ctx
                    .broker
                    .complete_produce(ticket, write)
                    .await
                    .map_err(|e| (storage_error_code(&e), e.to_string()));
                produce_result(topic, partition, r, dropped)
            }
            PendingProduce::SameAs {
                topic,
                partition,
                slot,
                records,
            } => {
                let r = slot
                    .wait()
                    .await
                    .map(|(base_offset, last_offset)| AppendAck {
                        base_offset,
                        last_offset,
                    })
                    .map_err(|e| (storage_error_code(&e), e.to_string()));
                produce_result(topic, partition, r, records)
            }
        });
    }
    ResponseBody::Produce(crate::protocol::ProduceResponse { partitions })
}

/// Hands out a producer id and epoch (see `broker::producers`).
pub(crate) async fn init_producer(
    ctx: &Ctx,
    req: crate::protocol::InitProducerRequest,
) -> ResponseBody {
    match ctx.broker.init_producer(req.producer_name.as_deref()).await {
        Ok((producer_id, producer_epoch)) => {
            ResponseBody::InitProducer(crate::protocol::InitProducerResponse {
                producer_id,
                producer_epoch,
            })
        }
        Err(e @ (InitError::InvalidName | InitError::EpochExhausted)) => {
            error_body(ErrorCode::InvalidRequest, e.to_string())
        }
        Err(e) => error_body(ErrorCode::StorageFailed, e.to_string()),
    }
}

/// Reads every asked-for partition; if together they hold fewer than
/// `min_bytes` (at least one byte), waits for new data or `max_wait_ms`.
pub(crate) async fn fetch(ctx: &Ctx, req: FetchRequest) -> ResponseBody {
    let max_wait = Duration::from_millis(u64::from(req.max_wait_ms).min(ctx.settings.max_wait_ms));
    let deadline = Instant::now() + max_wait;
    let min_bytes = (req.min_bytes as usize).max(1);
    let budget_bytes = ctx
        .settings
        .max_frame_bytes
        .saturating_sub(FETCH_ENVELOPE_BYTES)
        .max(1);
    loop {
        // Listen before reading, so an append in between still wakes us.
        let mut listeners = Vec::new();
        for p in &req.partitions {
            if let Ok(id) = ctx.broker.partition_id(&p.topic, p.partition) {
                if let Ok(ev) = ctx.broker.storage().data_event(&id) {
                    listeners.push(ev.listen());
                }
            }
        }
        let mut results = Vec::with_capacity(req.partitions.len());
        let mut total = 0usize;
        let mut any_error = false;
        for p in &req.partitions {
            let remaining = budget_bytes.saturating_sub(total);
            let max_bytes = (p.max_bytes as usize).min(remaining);
            let r = if max_bytes == 0 || (total > 0 && remaining < ctx.settings.max_batch_bytes) {
                // No room for another whole batch: the client asks again.
                ctx.broker
                    .offsets(&p.topic, p.partition)
                    .map(|o| (Vec::new(), o))
            } else {
                let id = ctx.broker.partition_id(&p.topic, p.partition);
                match id {
                    Ok(id) => match ctx.broker.storage().read(&id, p.offset, max_bytes).await {
                        Ok(bytes) => ctx
                            .broker
                            .offsets(&p.topic, p.partition)
                            .map(|o| (bytes, o)),
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e),
                }
            };
            results.push(match r {
                Ok((bytes, o)) => {
                    total += bytes.len();
                    FetchPartitionResult {
                        topic: p.topic.clone(),
                        partition: p.partition,
                        error: ErrorCode::None,
                        high_watermark: o.high_watermark,
                        earliest_offset: o.earliest,
                        records: ByteVec::from(bytes),
                    }
                }
                Err(e) => {
                    any_error = true;
                    let (hw, earliest) = ctx
                        .broker
                        .offsets(&p.topic, p.partition)
                        .map(|o| (o.high_watermark, o.earliest))
                        .unwrap_or((0, 0));
                    FetchPartitionResult {
                        topic: p.topic.clone(),
                        partition: p.partition,
                        error: broker_error_code(&e),
                        high_watermark: hw,
                        earliest_offset: earliest,
                        records: ByteVec::from(Vec::new()),
                    }
                }
            });
        }
        let now = Instant::now();
        if total >= min_bytes || any_error || now >= deadline || ctx.shutdown.is_triggered() {
            return ResponseBody::Fetch(FetchResponse {
                partitions: results,
            });
        }
        wait_any(ctx, listeners, deadline).await;
    }
}

async fn wait_any(ctx: &Ctx, listeners: Vec<event_listener::EventListener>, deadline: Instant) {
    let any_data = async {
        if listeners.is_empty() {
            futures_lite::future::pending::<()>().await;
        }
        // Completes when the first listener fires.
        let mut futs: Vec<_> = listeners.into_iter().map(Box::pin).collect();
        futures_lite::future::poll_fn(|cx| {
            for f in futs.iter_mut() {
                if std::future::Future::poll(f.as_mut(), cx).is_ready() {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        })
        .await
    };
    let timer = async {
        smol::Timer::at(deadline).await;
    };
    let shutdown = ctx.shutdown.wait();
    futures_lite::future::or(any_data, futures_lite::future::or(timer, shutdown)).await;
}

pub(crate) async fn list_offsets(ctx: &Ctx, req: ListOffsetsRequest) -> ResponseBody {
    let mut partitions = Vec::with_capacity(req.partitions.len());
    for p in req.partitions {
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
            },
            Err(e) => ListOffsetsPartitionResult {
                topic: p.topic,
                partition: p.partition,
                error: broker_error_code(&e),
                offset: None,
            },
        });
    }
    ResponseBody::ListOffsets(ListOffsetsResponse { partitions })
}
