//! The wire types: every request and response body.
//!
//! # The one rule: field and variant indices are forever
//!
//! Every field carries an explicit index (`#[n(k)]`) and every enum variant
//! one too. The index, not the name, is what goes on the wire. So:
//!
//! - never renumber a field or a variant, and never reuse the index of a
//!   removed one (leave a comment `// n(3) retired: was ...` instead);
//! - add new fields only as `Option` (old peers omit them; old decoders skip
//!   unknown ones), with the next free index;
//! - a new operation gets the next free variant index in both
//!   [`RequestBody`] and [`ResponseBody`], and a new protocol version.
//!
//! The golden tests in `protocol::tests` pin the bytes of every message, so a
//! renumbering fails a test. `docs/protocol.md` shows every message.
//!
//! # Encoding
//!
//! Structs are CBOR arrays (field `k` at position `k`; an absent `Option` is
//! `null`), except the sparse [`CreateTopicRequest`] and [`TopicConfig`],
//! which are maps keyed by index. Enums are "flat" arrays:
//! `[variant_index, field0, field1, ...]`. Batches and records travel as
//! definite-length CBOR byte strings ([`ByteVec`]) holding the
//! [`batch`](crate::batch) format, so the server stores what it decodes
//! without re-encoding.

use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};

use super::error::ErrorCode;

/// One request frame: a correlation id the response echoes, and the body.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Request {
    /// Chosen by the client, unique among its requests in flight; the
    /// response carries it back. Responses may come out of order.
    #[n(0)]
    pub correlation_id: u32,
    #[n(1)]
    pub body: RequestBody,
}

/// One response frame.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Response {
    /// The request's correlation id, or 0 when the server could not read one
    /// from a malformed frame.
    #[n(0)]
    pub correlation_id: u32,
    #[n(1)]
    pub body: ResponseBody,
}

/// Every operation. Index 0 is reserved so that an operation has the same
/// index in requests and responses, where 0 is the error answer.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(flat)]
pub enum RequestBody {
    #[n(1)]
    Hello(#[n(0)] HelloRequest),
    #[n(2)]
    Metadata(#[n(0)] MetadataRequest),
    #[n(3)]
    CreateTopic(#[n(0)] CreateTopicRequest),
    #[n(4)]
    DescribeTopic(#[n(0)] DescribeTopicRequest),
    #[n(5)]
    ListTopics(#[n(0)] ListTopicsRequest),
    #[n(6)]
    DeleteTopic(#[n(0)] DeleteTopicRequest),
    #[n(7)]
    Produce(#[n(0)] ProduceRequest),
    #[n(8)]
    Fetch(#[n(0)] FetchRequest),
    #[n(9)]
    ListOffsets(#[n(0)] ListOffsetsRequest),
    #[n(10)]
    InitProducer(#[n(0)] InitProducerRequest),
}

/// The answer to a request: the operation's response, or an error for the
/// request as a whole. Per-partition failures travel inside the operation's
/// response instead, so one bad partition does not fail the others.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(flat)]
pub enum ResponseBody {
    #[n(0)]
    Error(#[n(0)] ErrorResponse),
    #[n(1)]
    Hello(#[n(0)] HelloResponse),
    #[n(2)]
    Metadata(#[n(0)] MetadataResponse),
    #[n(3)]
    CreateTopic(#[n(0)] CreateTopicResponse),
    #[n(4)]
    DescribeTopic(#[n(0)] DescribeTopicResponse),
    #[n(5)]
    ListTopics(#[n(0)] ListTopicsResponse),
    #[n(6)]
    DeleteTopic(#[n(0)] DeleteTopicResponse),
    #[n(7)]
    Produce(#[n(0)] ProduceResponse),
    #[n(8)]
    Fetch(#[n(0)] FetchResponse),
    #[n(9)]
    ListOffsets(#[n(0)] ListOffsetsResponse),
    #[n(10)]
    InitProducer(#[n(0)] InitProducerResponse),
}

impl RequestBody {
    /// The operation's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Metadata(_) => "metadata",
            Self::CreateTopic(_) => "create_topic",
            Self::DescribeTopic(_) => "describe_topic",
            Self::ListTopics(_) => "list_topics",
            Self::DeleteTopic(_) => "delete_topic",
            Self::Produce(_) => "produce",
            Self::Fetch(_) => "fetch",
            Self::ListOffsets(_) => "list_offsets",
            Self::InitProducer(_) => "init_producer",
        }
    }
}

impl ResponseBody {
    /// The operation's name, for logs and metrics; "error" for an error.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Error(_) => "error",
            Self::Hello(_) => "hello",
            Self::Metadata(_) => "metadata",
            Self::CreateTopic(_) => "create_topic",
            Self::DescribeTopic(_) => "describe_topic",
            Self::ListTopics(_) => "list_topics",
            Self::DeleteTopic(_) => "delete_topic",
            Self::Produce(_) => "produce",
            Self::Fetch(_) => "fetch",
            Self::ListOffsets(_) => "list_offsets",
            Self::InitProducer(_) => "init_producer",
        }
    }
}

/// A failure of the whole request.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ErrorResponse {
    /// Never [`ErrorCode::None`].
    #[n(0)]
    pub code: ErrorCode,
    /// For humans: what was wrong, with the values involved.
    #[n(1)]
    pub message: String,
}

// ---------------------------------------------------------------- hello

/// The first request on a connection. Any other request before it is
/// answered with `invalid_request`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct HelloRequest {
    /// The lowest protocol version the client speaks.
    #[n(0)]
    pub version_min: u16,
    /// The highest protocol version the client speaks.
    #[n(1)]
    pub version_max: u16,
    /// For the server's logs, e.g. "skiff-cli/0.1.0".
    #[n(2)]
    pub client_name: Option<String>,
}

/// The chosen version and the server's limits. The highest version both
/// sides speak is chosen.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct HelloResponse {
    #[n(0)]
    pub version: u16,
    /// The server's build, e.g. "skiff 0.1.0".
    #[n(1)]
    pub server_version: String,
    /// The largest frame body the server accepts, and the largest it sends.
    #[n(2)]
    pub max_frame_bytes: u32,
    /// The largest record batch the server accepts in a produce.
    #[n(3)]
    pub max_batch_bytes: u32,
}

// ---------------------------------------------------------------- topics

/// Partitions and offsets of some or all topics.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MetadataRequest {
    /// `None`: every topic. Unknown names come back with `unknown_topic`.
    #[n(0)]
    pub topics: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MetadataResponse {
    #[n(0)]
    pub topics: Vec<TopicMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TopicMetadata {
    #[n(0)]
    pub name: String,
    /// `none`, or `unknown_topic` for a name that does not exist (then
    /// `partitions` is empty).
    #[n(1)]
    pub error: ErrorCode,
    /// Sorted by partition number, 0 to count - 1.
    #[n(2)]
    pub partitions: Vec<PartitionMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct PartitionMetadata {
    #[n(0)]
    pub partition: u32,
    /// `none`, `partition_quarantined` or `storage_failed`.
    #[n(1)]
    pub error: ErrorCode,
    /// The first offset still in the log.
    #[n(2)]
    pub earliest_offset: u64,
    /// The offset the next record will get (the high watermark); equal to
    /// `earliest_offset` when the partition is empty.
    #[n(3)]
    pub latest_offset: u64,
}

/// Creates a topic. Every field but the name is optional; the server fills
/// its defaults and returns the complete configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
#[cbor(map)]
pub struct CreateTopicRequest {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub partitions: Option<u32>,
    /// The size of one segment file.
    #[n(2)]
    pub segment_bytes: Option<u64>,
    /// The number of segments in each partition's ring.
    #[n(3)]
    pub segments: Option<u32>,
    /// Time retention; 0 means none (only the ring's size bounds the data).
    #[n(4)]
    pub retention_ms: Option<u64>,
    /// `"always"`, `"interval:MS"` or `"never"`; see `storage::Durability`.
    #[n(5)]
    pub fsync: Option<String>,
    /// `"overwrite"` or `"reject"`; see `storage::OverflowPolicy`.
    #[n(6)]
    pub overflow: Option<String>,
    /// Message-id dedup window by time: a record whose `msg-id` header was
    /// seen on the topic this recently is dropped. 0 or absent: off.
    #[n(7)]
    pub msg_id_window_ms: Option<u64>,
    /// Message-id dedup window by count (the last N ids, at most 100000).
    /// 0 or absent: off.
    #[n(8)]
    pub msg_id_window_records: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CreateTopicResponse {
    /// The configuration as created, defaults filled in.
    #[n(0)]
    pub config: TopicConfig,
}

/// A topic's complete configuration.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct TopicConfig {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub partitions: u32,
    #[n(2)]
    pub segment_bytes: u64,
    #[n(3)]
    pub segments: u32,
    /// `None`: no time retention.
    #[n(4)]
    pub retention_ms: Option<u64>,
    #[n(5)]
    pub fsync: String,
    #[n(6)]
    pub overflow: String,
    /// The message-id window by time; absent when off.
    #[n(7)]
    pub msg_id_window_ms: Option<u64>,
    /// The message-id window by count; absent when off.
    #[n(8)]
    pub msg_id_window_records: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribeTopicRequest {
    #[n(0)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribeTopicResponse {
    #[n(0)]
    pub config: TopicConfig,
    #[n(1)]
    pub partitions: Vec<PartitionMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct ListTopicsRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListTopicsResponse {
    /// Sorted by name.
    #[n(0)]
    pub topics: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeleteTopicRequest {
    #[n(0)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct DeleteTopicResponse {}

// ---------------------------------------------------------------- produce

/// Appends batches. Each entry is acknowledged once it is durable by its
/// topic's fsync policy. Entries for the same partition are appended in the
/// order they are listed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProduceRequest {
    #[n(0)]
    pub partitions: Vec<ProducePartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProducePartition {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    /// One record batch ([`crate::batch`] format) with base offset 0; the
    /// server assigns the offsets. Decoded into a recycled buffer
    /// ([`crate::bufpool`]).
    #[cbor(n(2), decode_with = "decode_pooled_bytes")]
    pub batch: ByteVec,
}

/// A CBOR byte string, as `ByteVec` decodes it, into a buffer from
/// [`crate::bufpool`]: a produce batch is large enough that a fresh one per
/// batch cost the broker a page fault per 4 KiB received.
fn decode_pooled_bytes<Ctx>(
    d: &mut minicbor::Decoder<'_>,
    _: &mut Ctx,
) -> Result<ByteVec, minicbor::decode::Error> {
    let bytes = d.bytes()?;
    let mut buf = crate::bufpool::take(bytes.len());
    buf.extend_from_slice(bytes);
    Ok(ByteVec::from(buf))
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProduceResponse {
    /// One result per request entry, in the same order.
    #[n(0)]
    pub partitions: Vec<ProducePartitionResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProducePartitionResult {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    /// `none` when written; then the offsets below are valid.
    #[n(2)]
    pub error: ErrorCode,
    /// The offset of the batch's first record (0 on error).
    #[n(3)]
    pub base_offset: u64,
    /// The offset of the batch's last record (0 on error).
    #[n(4)]
    pub last_offset: u64,
    /// Records the server recognised as already written and skipped
    /// (idempotent producers); 0 otherwise.
    #[n(5)]
    pub duplicate_records: u32,
    /// Details for an error, for humans.
    #[n(6)]
    pub message: Option<String>,
}

impl ProducePartitionResult {
    /// `(base_offset, last_offset)`, or the error code.
    pub fn offsets(&self) -> Result<(u64, u64), ErrorCode> {
        if self.error.is_none() {
            Ok((self.base_offset, self.last_offset))
        } else {
            Err(self.error)
        }
    }
}

// ---------------------------------------------------------------- fetch

/// Reads batches. The server answers once `min_bytes` are available over all
/// partitions, or after `max_wait_ms`, whichever comes first (long poll).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FetchRequest {
    #[n(0)]
    pub partitions: Vec<FetchPartition>,
    /// How long the server may hold the request waiting for data.
    #[n(1)]
    pub max_wait_ms: u32,
    /// Answer as soon as this many record bytes are available; 0 answers at
    /// once.
    #[n(2)]
    pub min_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FetchPartition {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    /// The first offset wanted.
    #[n(2)]
    pub offset: u64,
    /// A soft cap on the records returned: whole batches are returned, and
    /// the first batch is returned even when it is larger, so a consumer
    /// always makes progress.
    #[n(3)]
    pub max_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FetchResponse {
    /// One result per request entry, in the same order.
    #[n(0)]
    pub partitions: Vec<FetchPartitionResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FetchPartitionResult {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    #[n(2)]
    pub error: ErrorCode,
    /// The offset the next record will get.
    #[n(3)]
    pub high_watermark: u64,
    /// The first offset still in the log.
    #[n(4)]
    pub earliest_offset: u64,
    /// Zero or more whole batches, concatenated, exactly as stored. The
    /// first batch is the one holding the requested offset, so it may start
    /// below it: the client skips records below the offset it asked for.
    #[n(5)]
    pub records: ByteVec,
}

/// An upper bound on the bytes a fetch response adds around its results:
/// the frame prefix, `[correlation_id, [8, [results...]]]`'s heads and
/// numbers. With [`FetchPartitionResult::envelope_bytes_max`] the server
/// keeps a response under the peer's `max_frame_bytes`.
pub const FETCH_RESPONSE_ENVELOPE_BYTES_MAX: usize = 4 + 1 + 5 + 1 + 1 + 1 + 9;

impl FetchPartitionResult {
    /// An upper bound on the encoded size of one result for `topic`, not
    /// counting the record bytes themselves. CBOR heads are at most 9 bytes.
    pub fn envelope_bytes_max(topic: &str) -> usize {
        // array head, topic head + text, partition, error, two offsets,
        // records' byte-string head
        1 + 9 + topic.len() + 5 + 3 + 9 + 9 + 9
    }
}

// ---------------------------------------------------------------- offsets

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListOffsetsRequest {
    #[n(0)]
    pub partitions: Vec<ListOffsetsPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListOffsetsPartition {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    #[n(2)]
    pub spec: OffsetSpec,
}

/// Which offset to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
#[cbor(flat)]
pub enum OffsetSpec {
    /// The first offset still in the log.
    #[n(0)]
    Earliest,
    /// The offset the next record will get.
    #[n(1)]
    Latest,
    /// The first offset whose record timestamp is at or after this time
    /// (ms since the Unix epoch).
    #[n(2)]
    Timestamp(#[n(0)] i64),
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListOffsetsResponse {
    /// One result per request entry, in the same order.
    #[n(0)]
    pub partitions: Vec<ListOffsetsPartitionResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListOffsetsPartitionResult {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    #[n(2)]
    pub error: ErrorCode,
    /// `None` for a timestamp after the last record.
    #[n(3)]
    pub offset: Option<u64>,
}

// ---------------------------------------------------------------- producers

/// Gets a producer id and epoch for idempotent produce. A producer that
/// gives the same name again gets the same id with the next epoch, which
/// fences its older instance.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct InitProducerRequest {
    #[n(0)]
    pub producer_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct InitProducerResponse {
    #[n(0)]
    pub producer_id: u64,
    #[n(1)]
    pub producer_epoch: u16,
}
