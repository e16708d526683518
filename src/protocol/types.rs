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
//! definite-length CBOR byte strings ([`RecordBytes`], [`BatchBytes`]) holding
//! the [`batch`](crate::batch) format, so the server stores what it
//! decodes without re-encoding.
//!
//! # Borrowing
//!
//! A request decodes with the lifetime of its frame: a produce batch is
//! borrowed from the frame ([`BatchBytes`]), not copied, so the server
//! decides where it goes (one copy, into a buffer of its own pool). Every
//! other field is owned; [`RequestBody::into_owned`] detaches a request
//! from its frame.

use std::borrow::Cow;

use minicbor::{Decode, Encode};

use super::error::ErrorCode;
use super::txn::*;

/// One request frame: a correlation id the response echoes, and the body.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Request<'b> {
    /// Chosen by the client, unique among its requests in flight; the
    /// response carries it back. Responses may come out of order.
    #[n(0)]
    pub correlation_id: u32,
    #[b(1)]
    pub body: RequestBody<'b>,
}

impl Request<'_> {
    /// The request detached from the frame it was decoded from.
    pub fn into_owned(self) -> Request<'static> {
        Request {
            correlation_id: self.correlation_id,
            body: self.body.into_owned(),
        }
    }
}

/// Every answer crosses a connection's queues as a `Response`: a body that
/// would take it past this goes boxed in [`ResponseBody`], as the admin
/// answers do (80 B on 64-bit targets; 200 B before they were boxed).
const _: () = assert!(std::mem::size_of::<Response>() <= 96);

/// One response frame.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(context_bound = "FrameSource")]
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
pub enum RequestBody<'b> {
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
    Produce(#[b(0)] ProduceRequest<'b>),
    #[n(8)]
    Fetch(#[n(0)] FetchRequest),
    #[n(9)]
    ListOffsets(#[n(0)] ListOffsetsRequest),
    #[n(10)]
    InitProducer(#[n(0)] InitProducerRequest),
    // Consumer groups: 20..=39 (version 2).
    #[n(20)]
    JoinGroup(#[n(0)] JoinGroupRequest),
    #[n(21)]
    SyncGroup(#[n(0)] SyncGroupRequest),
    #[n(22)]
    Heartbeat(#[n(0)] HeartbeatRequest),
    #[n(23)]
    LeaveGroup(#[n(0)] LeaveGroupRequest),
    #[n(24)]
    OffsetCommit(#[n(0)] OffsetCommitRequest),
    #[n(25)]
    OffsetFetch(#[n(0)] OffsetFetchRequest),
    #[n(26)]
    ListGroups(#[n(0)] ListGroupsRequest),
    #[n(27)]
    DescribeGroup(#[n(0)] DescribeGroupRequest),
    #[n(28)]
    DeleteGroup(#[n(0)] DeleteGroupRequest),
    // Compaction (issue 19) keeps its operations at 50..=59.
    #[n(50)]
    CompactTopic(#[n(0)] CompactTopicRequest),
    #[n(51)]
    DescribePartitions(#[n(0)] DescribePartitionsRequest),
    #[n(52)]
    AlterTopic(#[n(0)] AlterTopicRequest),
    // 11..=39: other operations (20..=39 consumer groups). 40..=49: the
    // mirror (protocol version 2).
    #[n(40)]
    MirrorStatus(#[n(0)] MirrorStatusRequest),
    #[n(41)]
    MirrorPause(#[n(0)] MirrorRuleRequest),
    // Share groups (queues): 70..=79 (version 3), types in `share`.
    #[n(70)]
    ShareFetch(#[n(0)] super::share::ShareFetchRequest),
    #[n(71)]
    ShareAck(#[n(0)] super::share::ShareAckRequest),
    #[n(72)]
    ListShareGroups(#[n(0)] super::share::ListShareGroupsRequest),
    #[n(73)]
    DescribeShareGroup(#[n(0)] super::share::DescribeShareGroupRequest),
    #[n(74)]
    DeleteShareGroup(#[n(0)] super::share::DeleteShareGroupRequest),
    // Version 4.
    #[n(75)]
    ShareLeave(#[n(0)] super::share::ShareLeaveRequest),
    // Transactions: 60..=69 (version 3).
    #[n(60)]
    InitTxn(#[n(0)] InitTxnRequest),
    #[n(61)]
    AddTxnOffsets(#[n(0)] AddTxnOffsetsRequest),
    #[n(62)]
    EndTxn(#[n(0)] EndTxnRequest),
    #[n(63)]
    ListTxns(#[n(0)] ListTxnsRequest),
}

/// The answer to a request: the operation's response, or an error for the
/// request as a whole. Per-partition failures travel inside the operation's
/// response instead, so one bad partition does not fail the others.
///
/// The largest responses, all of rare admin requests, are boxed: every
/// answer on its way to a connection's writer is one of these, and the
/// writer's queues keep their room for the connection's life
/// (docs/performance.md, "what a connection costs").
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(flat, context_bound = "FrameSource")]
pub enum ResponseBody {
    #[n(0)]
    Error(#[n(0)] ErrorResponse),
    #[n(1)]
    Hello(#[n(0)] HelloResponse),
    #[n(2)]
    Metadata(#[n(0)] MetadataResponse),
    #[n(3)]
    CreateTopic(#[n(0)] Box<CreateTopicResponse>),
    #[n(4)]
    DescribeTopic(#[n(0)] Box<DescribeTopicResponse>),
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
    // Consumer groups: 20..=39 (version 2).
    #[n(20)]
    JoinGroup(#[n(0)] JoinGroupResponse),
    #[n(21)]
    SyncGroup(#[n(0)] SyncGroupResponse),
    #[n(22)]
    Heartbeat(#[n(0)] HeartbeatResponse),
    #[n(23)]
    LeaveGroup(#[n(0)] LeaveGroupResponse),
    #[n(24)]
    OffsetCommit(#[n(0)] OffsetCommitResponse),
    #[n(25)]
    OffsetFetch(#[n(0)] OffsetFetchResponse),
    #[n(26)]
    ListGroups(#[n(0)] ListGroupsResponse),
    #[n(27)]
    DescribeGroup(#[n(0)] Box<DescribeGroupResponse>),
    #[n(28)]
    DeleteGroup(#[n(0)] DeleteGroupResponse),
    // Compaction (issue 19) keeps its operations at 50..=59.
    #[n(50)]
    CompactTopic(#[n(0)] CompactTopicResponse),
    #[n(51)]
    DescribePartitions(#[n(0)] DescribePartitionsResponse),
    #[n(52)]
    AlterTopic(#[n(0)] Box<CreateTopicResponse>),
    #[n(40)]
    MirrorStatus(#[n(0)] Box<MirrorStatusResponse>),
    #[n(41)]
    MirrorPause(#[n(0)] MirrorRuleRequest),
    // Share groups (queues): 70..=79 (version 3).
    #[n(70)]
    ShareFetch(#[n(0)] super::share::ShareFetchResponse),
    #[n(71)]
    ShareAck(#[n(0)] super::share::ShareAckResponse),
    #[n(72)]
    ListShareGroups(#[n(0)] super::share::ListShareGroupsResponse),
    #[n(73)]
    DescribeShareGroup(#[n(0)] super::share::DescribeShareGroupResponse),
    #[n(74)]
    DeleteShareGroup(#[n(0)] super::share::DeleteShareGroupResponse),
    // Version 4.
    #[n(75)]
    ShareLeave(#[n(0)] super::share::ShareLeaveResponse),
    // Transactions: 60..=69 (version 3).
    #[n(60)]
    InitTxn(#[n(0)] InitTxnResponse),
    #[n(61)]
    AddTxnOffsets(#[n(0)] AddTxnOffsetsResponse),
    #[n(62)]
    EndTxn(#[n(0)] EndTxnResponse),
    #[n(63)]
    ListTxns(#[n(0)] ListTxnsResponse),
}

impl RequestBody<'_> {
    /// The request detached from the frame it was decoded from (a
    /// produce's batches are copied).
    pub fn into_owned(self) -> RequestBody<'static> {
        match self {
            Self::Hello(r) => RequestBody::Hello(r),
            Self::Metadata(r) => RequestBody::Metadata(r),
            Self::CreateTopic(r) => RequestBody::CreateTopic(r),
            Self::DescribeTopic(r) => RequestBody::DescribeTopic(r),
            Self::ListTopics(r) => RequestBody::ListTopics(r),
            Self::DeleteTopic(r) => RequestBody::DeleteTopic(r),
            Self::Produce(r) => RequestBody::Produce(ProduceRequest {
                partitions: r
                    .partitions
                    .into_iter()
                    .map(|p| ProducePartition {
                        topic: p.topic,
                        partition: p.partition,
                        batch: p.batch.into_owned(),
                    })
                    .collect(),
            }),
            Self::Fetch(r) => RequestBody::Fetch(r),
            Self::ListOffsets(r) => RequestBody::ListOffsets(r),
            Self::InitProducer(r) => RequestBody::InitProducer(r),
            Self::JoinGroup(r) => RequestBody::JoinGroup(r),
            Self::SyncGroup(r) => RequestBody::SyncGroup(r),
            Self::Heartbeat(r) => RequestBody::Heartbeat(r),
            Self::LeaveGroup(r) => RequestBody::LeaveGroup(r),
            Self::OffsetCommit(r) => RequestBody::OffsetCommit(r),
            Self::OffsetFetch(r) => RequestBody::OffsetFetch(r),
            Self::ListGroups(r) => RequestBody::ListGroups(r),
            Self::DescribeGroup(r) => RequestBody::DescribeGroup(r),
            Self::DeleteGroup(r) => RequestBody::DeleteGroup(r),
            Self::CompactTopic(r) => RequestBody::CompactTopic(r),
            Self::DescribePartitions(r) => RequestBody::DescribePartitions(r),
            Self::AlterTopic(r) => RequestBody::AlterTopic(r),
            Self::MirrorStatus(r) => RequestBody::MirrorStatus(r),
            Self::MirrorPause(r) => RequestBody::MirrorPause(r),
            Self::ShareFetch(r) => RequestBody::ShareFetch(r),
            Self::ShareAck(r) => RequestBody::ShareAck(r),
            Self::ListShareGroups(r) => RequestBody::ListShareGroups(r),
            Self::DescribeShareGroup(r) => RequestBody::DescribeShareGroup(r),
            Self::DeleteShareGroup(r) => RequestBody::DeleteShareGroup(r),
            Self::ShareLeave(r) => RequestBody::ShareLeave(r),
            Self::InitTxn(r) => RequestBody::InitTxn(r),
            Self::AddTxnOffsets(r) => RequestBody::AddTxnOffsets(r),
            Self::EndTxn(r) => RequestBody::EndTxn(r),
            Self::ListTxns(r) => RequestBody::ListTxns(r),
        }
    }

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
            Self::JoinGroup(_) => "join_group",
            Self::SyncGroup(_) => "sync_group",
            Self::Heartbeat(_) => "heartbeat",
            Self::LeaveGroup(_) => "leave_group",
            Self::OffsetCommit(_) => "offset_commit",
            Self::OffsetFetch(_) => "offset_fetch",
            Self::ListGroups(_) => "list_groups",
            Self::DescribeGroup(_) => "describe_group",
            Self::DeleteGroup(_) => "delete_group",
            Self::CompactTopic(_) => "compact_topic",
            Self::DescribePartitions(_) => "describe_partitions",
            Self::AlterTopic(_) => "alter_topic",
            Self::MirrorStatus(_) => "mirror_status",
            Self::MirrorPause(_) => "mirror_pause",
            Self::ShareFetch(_) => "share_fetch",
            Self::ShareAck(_) => "share_ack",
            Self::ListShareGroups(_) => "list_share_groups",
            Self::DescribeShareGroup(_) => "describe_share_group",
            Self::DeleteShareGroup(_) => "delete_share_group",
            Self::ShareLeave(_) => "share_leave",
            Self::InitTxn(_) => "init_txn",
            Self::AddTxnOffsets(_) => "add_txn_offsets",
            Self::EndTxn(_) => "end_txn",
            Self::ListTxns(_) => "list_txns",
        }
    }

    /// The protocol version that defines the operation: a connection that
    /// negotiated an older one is refused it (docs/protocol.md, "Version
    /// negotiation").
    pub fn since_version(&self) -> u16 {
        match self {
            Self::Hello(_)
            | Self::Metadata(_)
            | Self::CreateTopic(_)
            | Self::DescribeTopic(_)
            | Self::ListTopics(_)
            | Self::DeleteTopic(_)
            | Self::Produce(_)
            | Self::Fetch(_)
            | Self::ListOffsets(_)
            | Self::InitProducer(_) => 1,
            Self::JoinGroup(_)
            | Self::SyncGroup(_)
            | Self::Heartbeat(_)
            | Self::LeaveGroup(_)
            | Self::OffsetCommit(_)
            | Self::OffsetFetch(_)
            | Self::ListGroups(_)
            | Self::DescribeGroup(_)
            | Self::DeleteGroup(_)
            | Self::CompactTopic(_)
            | Self::DescribePartitions(_)
            | Self::AlterTopic(_)
            | Self::MirrorStatus(_)
            | Self::MirrorPause(_) => 2,
            Self::ShareFetch(_)
            | Self::ShareAck(_)
            | Self::ListShareGroups(_)
            | Self::DescribeShareGroup(_)
            | Self::DeleteShareGroup(_)
            | Self::InitTxn(_)
            | Self::AddTxnOffsets(_)
            | Self::EndTxn(_)
            | Self::ListTxns(_) => 3,
            Self::ShareLeave(_) => 4,
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
            Self::JoinGroup(_) => "join_group",
            Self::SyncGroup(_) => "sync_group",
            Self::Heartbeat(_) => "heartbeat",
            Self::LeaveGroup(_) => "leave_group",
            Self::OffsetCommit(_) => "offset_commit",
            Self::OffsetFetch(_) => "offset_fetch",
            Self::ListGroups(_) => "list_groups",
            Self::DescribeGroup(_) => "describe_group",
            Self::DeleteGroup(_) => "delete_group",
            Self::CompactTopic(_) => "compact_topic",
            Self::DescribePartitions(_) => "describe_partitions",
            Self::AlterTopic(_) => "alter_topic",
            Self::MirrorStatus(_) => "mirror_status",
            Self::MirrorPause(_) => "mirror_pause",
            Self::ShareFetch(_) => "share_fetch",
            Self::ShareAck(_) => "share_ack",
            Self::ListShareGroups(_) => "list_share_groups",
            Self::DescribeShareGroup(_) => "describe_share_group",
            Self::DeleteShareGroup(_) => "delete_share_group",
            Self::ShareLeave(_) => "share_leave",
            Self::InitTxn(_) => "init_txn",
            Self::AddTxnOffsets(_) => "add_txn_offsets",
            Self::EndTxn(_) => "end_txn",
            Self::ListTxns(_) => "list_txns",
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
    /// The server's version (its crate's), e.g. "0.1.0".
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
    /// The broker's reason when `error` is not `none`, as in a fetch
    /// result; absent otherwise and from brokers before it.
    #[n(3)]
    pub message: Option<String>,
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
    /// The broker's reason when `error` is not `none` (why the partition
    /// is quarantined, which write failed), as in a fetch result; absent
    /// otherwise and from brokers before it.
    #[n(4)]
    pub message: Option<String>,
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
    // Compaction (issue 19) keeps its fields at 50..=59.
    /// `"delete"` (the default), `"compact"` or `"compact,delete"`.
    #[n(50)]
    pub cleanup: Option<String>,
    /// How long a tombstone stays on a compacted topic (default: a day).
    #[n(51)]
    pub tombstone_retention_ms: Option<u64>,
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
    // Compaction (issue 19) keeps its fields at 50..=59.
    /// The cleanup policy; absent from older servers (then `"delete"`).
    #[n(50)]
    pub cleanup: Option<String>,
    /// On a compacted topic, how long tombstones stay.
    #[n(51)]
    pub tombstone_retention_ms: Option<u64>,
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
    /// `storage.disk_budget_bytes`, and what the topics' rings reserve of
    /// it (all topics, also those the identity may not see, and the
    /// broker's own ones not made yet); absent from older servers.
    #[n(1)]
    pub disk_budget_bytes: Option<u64>,
    #[n(2)]
    pub disk_reserved_bytes: Option<u64>,
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
pub struct ProduceRequest<'b> {
    #[b(0)]
    pub partitions: Vec<ProducePartition<'b>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProducePartition<'b> {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    /// One record batch ([`crate::batch`] format) with base offset 0; the
    /// server assigns the offsets.
    #[b(2)]
    pub batch: BatchBytes<'b>,
}

/// A produce batch's bytes, a CBOR byte string on the wire: borrowed from
/// the frame when decoded, owned when a client builds a request. Derefs
/// to the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchBytes<'b>(Cow<'b, [u8]>);

impl BatchBytes<'_> {
    pub fn into_owned(self) -> BatchBytes<'static> {
        BatchBytes(Cow::Owned(self.0.into_owned()))
    }
}

impl From<Vec<u8>> for BatchBytes<'static> {
    fn from(bytes: Vec<u8>) -> Self {
        BatchBytes(Cow::Owned(bytes))
    }
}

impl<'b> From<&'b [u8]> for BatchBytes<'b> {
    fn from(bytes: &'b [u8]) -> Self {
        BatchBytes(Cow::Borrowed(bytes))
    }
}

impl std::ops::Deref for BatchBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl<C> Encode<C> for BatchBytes<'_> {
    fn encode<W: minicbor::encode::Write>(
        &self,
        e: &mut minicbor::Encoder<W>,
        _: &mut C,
    ) -> Result<(), minicbor::encode::Error<W::Error>> {
        e.bytes(&self.0)?;
        Ok(())
    }
}

impl<'b, C> Decode<'b, C> for BatchBytes<'b> {
    /// Borrowed: a definite-length byte string (what every skiff client
    /// sends) is the frame's own bytes; an indefinite one, in chunks, is
    /// malformed here as for `ByteVec`.
    fn decode(d: &mut minicbor::Decoder<'b>, _: &mut C) -> Result<Self, minicbor::decode::Error> {
        Ok(BatchBytes(Cow::Borrowed(d.bytes()?)))
    }
}

/// Where a decoder's byte strings come from: fetched records are kept as a
/// view of the frame they arrived in ([`SharedFrame`]). Encoding takes any
/// context that is one (`()` is).
pub trait FrameSource {
    /// `within` is a sub-slice of the input being decoded.
    fn bytes_of(&self, within: &[u8]) -> bytes::Bytes;
}

impl FrameSource for () {
    fn bytes_of(&self, within: &[u8]) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(within)
    }
}

/// A decoding context holding the frame being decoded: the fetched
/// records become views of it, not copies (at 100 B a record, copying them
/// out was 11% of a replaying client's CPU).
pub struct SharedFrame<'f>(pub &'f bytes::Bytes);

impl FrameSource for SharedFrame<'_> {
    fn bytes_of(&self, within: &[u8]) -> bytes::Bytes {
        // `slice_ref` panics on a slice from elsewhere; a decoder only
        // hands out slices of its input, but check rather than trust it.
        let frame = self.0.as_ptr_range();
        let part = within.as_ptr_range();
        if frame.start <= part.start && part.end <= frame.end {
            self.0.slice_ref(within)
        } else {
            bytes::Bytes::copy_from_slice(within)
        }
    }
}

/// A fetch result's records: a CBOR byte string on the wire, a view of the
/// response frame when decoded by the client (see [`FrameSource`]), owned
/// when the server builds one. Derefs to the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordBytes(bytes::Bytes);

impl RecordBytes {
    /// The bytes as a shared handle, without a copy.
    pub fn into_bytes(self) -> bytes::Bytes {
        self.0
    }
}

impl From<Vec<u8>> for RecordBytes {
    fn from(bytes: Vec<u8>) -> Self {
        RecordBytes(bytes.into())
    }
}

impl From<bytes::Bytes> for RecordBytes {
    fn from(bytes: bytes::Bytes) -> Self {
        RecordBytes(bytes)
    }
}

impl std::ops::Deref for RecordBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl<C> Encode<C> for RecordBytes {
    fn encode<W: minicbor::encode::Write>(
        &self,
        e: &mut minicbor::Encoder<W>,
        _: &mut C,
    ) -> Result<(), minicbor::encode::Error<W::Error>> {
        e.bytes(&self.0)?;
        Ok(())
    }
}

impl<'b, C: FrameSource> Decode<'b, C> for RecordBytes {
    /// A definite-length byte string; an indefinite one, in chunks, is
    /// malformed here as for `ByteVec`.
    fn decode(d: &mut minicbor::Decoder<'b>, ctx: &mut C) -> Result<Self, minicbor::decode::Error> {
        Ok(RecordBytes(ctx.bytes_of(d.bytes()?)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProduceResponse {
    /// One result per request entry, in the same order.
    #[n(0)]
    pub partitions: Vec<ProducePartitionResult>,
    /// How long the server held this answer back, and read nothing more
    /// from the connection, because the identity is over its produce quota
    /// (`quotas.produce_bytes_per_s`). Absent when not throttled.
    #[n(1)]
    pub throttle_ms: Option<u32>,
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
    /// Absent: read_uncommitted (what a client before transactions got).
    #[n(3)]
    pub isolation: Option<Isolation>,
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
#[cbor(context_bound = "FrameSource")]
pub struct FetchResponse {
    /// One result per request entry, in the same order.
    #[n(0)]
    pub partitions: Vec<FetchPartitionResult>,
    /// How long the server held this answer back because the identity is
    /// over its consume quota (`quotas.consume_bytes_per_s`). Absent when
    /// not throttled.
    #[n(1)]
    pub throttle_ms: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(context_bound = "FrameSource")]
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
    pub records: RecordBytes,
    /// The partition's last stable offset: no transaction is open below
    /// it. Absent from servers before version 3.
    #[n(6)]
    pub last_stable_offset: Option<u64>,
    /// Where to fetch next: past batches a read_committed fetch left out
    /// (aborted transactions, markers) after the last one sent, or past a
    /// gap with no batch after it below the high watermark (any fetch).
    #[n(7)]
    pub next_offset: Option<u64>,
    /// What went wrong, for humans, when `error` is not `none`: the
    /// broker's reason (why a partition is quarantined, which write
    /// failed). Absent otherwise, and from brokers before it was added,
    /// whose decoders skip it.
    #[n(8)]
    pub message: Option<String>,
}

/// An upper bound on the bytes a fetch response adds around its results:
/// the frame prefix, `[correlation_id, [8, [results...]]]`'s heads and
/// numbers. With [`FetchPartitionResult::envelope_bytes_max`] the server
/// keeps a response under the peer's `max_frame_bytes`.
pub const FETCH_RESPONSE_ENVELOPE_BYTES_MAX: usize = 4 + 1 + 5 + 1 + 1 + 1 + 9;

impl FetchPartitionResult {
    /// An upper bound on the encoded size of one result for `topic` with
    /// `message`, not counting the record bytes themselves. CBOR heads are
    /// at most 9 bytes.
    pub fn envelope_bytes_max(topic: &str, message: Option<&str>) -> usize {
        // array head, topic head + text, partition, error, two offsets,
        // records' byte-string head, the two optional offsets, and the
        // message's head + text
        1 + 9 + topic.len() + 5 + 3 + 9 + 9 + 9 + 9 + 9 + message.map_or(0, |m| 9 + m.len())
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
    /// The broker's reason when `error` is not `none`, as in a fetch
    /// result; absent otherwise and from brokers before it.
    #[n(4)]
    pub message: Option<String>,
}

// ---------------------------------------------------------------- producers

/// Gets a producer id and epoch for idempotent produce. A producer that
/// gives the same name again gets the same id with the next epoch, which
/// fences its older instance.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct InitProducerRequest {
    #[n(0)]
    pub producer_name: Option<String>,
    /// Without a name: the anonymous producer's current id and epoch, to
    /// be answered with the same id and the next epoch (after a batch it
    /// gave up on). Brokers before it ignore it and hand out a fresh id.
    #[n(1)]
    pub renew: Option<ProducerIdEpoch>,
}

/// A producer id and epoch (see [`InitProducerRequest::renew`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ProducerIdEpoch {
    #[n(0)]
    pub producer_id: u64,
    #[n(1)]
    pub producer_epoch: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct InitProducerResponse {
    #[n(0)]
    pub producer_id: u64,
    #[n(1)]
    pub producer_epoch: u16,
}

// ---------------------------------------------------------------- groups
//
// Consumer groups (protocol version 2; operations 20..=39). See
// docs/protocol.md, "Consumer groups", for the member's life cycle.

/// A topic and partition, as groups name them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Encode, Decode)]
pub struct GroupPartition {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
}

/// Joins a group, or joins it again in a rebalance. Answered once the
/// rebalance has made the next generation (a long poll, bounded by the
/// members' rebalance timeouts).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct JoinGroupRequest {
    #[n(0)]
    pub group: String,
    /// Absent for a new member; the answer carries its id.
    #[n(1)]
    pub member_id: Option<String>,
    /// Static membership: the same instance id back within the session
    /// timeout takes its old place and partitions without a rebalance.
    #[n(2)]
    pub instance_id: Option<String>,
    #[n(3)]
    pub topics: Vec<String>,
    /// `range`, `roundrobin` or `cooperative-sticky`; every member of a
    /// group must name the same.
    #[n(4)]
    pub assignor: String,
    /// Without a heartbeat (or join) for this long the member is removed.
    #[n(5)]
    pub session_timeout_ms: u32,
    /// How long a rebalance waits for this member to join again (the
    /// client's max poll interval).
    #[n(6)]
    pub rebalance_timeout_ms: u32,
    /// The partitions the member holds now.
    #[n(7)]
    pub owned: Vec<GroupPartition>,
    /// For `groups describe`, e.g. "skiff-cli/0.1.0 pid 4242".
    #[n(8)]
    pub client: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct JoinGroupResponse {
    #[n(0)]
    pub member_id: String,
    #[n(1)]
    pub generation: u32,
    #[n(2)]
    pub assignor: String,
    #[n(3)]
    pub members: u32,
}

/// The member's share of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SyncGroupRequest {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub member_id: String,
    #[n(2)]
    pub generation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SyncGroupResponse {
    /// Sorted. Partitions the member held and is not given here are to be
    /// given up: commit them, stop reading them, then join again.
    #[n(0)]
    pub assignment: Vec<GroupPartition>,
    /// The next rebalance has begun: apply this, then join again.
    #[n(1)]
    pub rejoin: bool,
}

/// Keeps the session alive. Errors: `rebalance_in_progress` (join again),
/// `illegal_generation`, `unknown_member_id`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct HeartbeatRequest {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub member_id: String,
    #[n(2)]
    pub generation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct HeartbeatResponse {}

/// Leaves at once; the others rebalance.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct LeaveGroupRequest {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub member_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct LeaveGroupResponse {}

/// Commits offsets (the next offset to read), answered once durable.
/// With `member_id` and `generation`: a member committing partitions it
/// owns. Without: only for a group with no members (an operator's reset).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct OffsetCommitRequest {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub member_id: Option<String>,
    #[n(2)]
    pub generation: Option<u32>,
    #[n(3)]
    pub offsets: Vec<OffsetCommitPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct OffsetCommitPartition {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    #[n(2)]
    pub offset: u64,
    /// At most 4096 bytes, kept with the offset.
    #[n(3)]
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct OffsetCommitResponse {}

/// Committed offsets of a group.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct OffsetFetchRequest {
    #[n(0)]
    pub group: String,
    /// Absent: every partition the group has committed.
    #[n(1)]
    pub partitions: Option<Vec<GroupPartition>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct OffsetFetchResponse {
    /// Only partitions with a committed offset.
    #[n(0)]
    pub offsets: Vec<CommittedOffset>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CommittedOffset {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    #[n(2)]
    pub offset: u64,
    #[n(3)]
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct ListGroupsRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListGroupsResponse {
    /// Sorted by name.
    #[n(0)]
    pub groups: Vec<GroupListing>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupListing {
    #[n(0)]
    pub group: String,
    /// `Empty`, `PreparingRebalance` or `Stable`.
    #[n(1)]
    pub state: String,
    #[n(2)]
    pub members: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribeGroupRequest {
    #[n(0)]
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribeGroupResponse {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub state: String,
    #[n(2)]
    pub generation: u32,
    /// The assignor; absent for a group that never had members.
    #[n(3)]
    pub assignor: Option<String>,
    #[n(4)]
    pub members: Vec<GroupMember>,
    #[n(5)]
    pub offsets: Vec<GroupOffset>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupMember {
    #[n(0)]
    pub member_id: String,
    #[n(1)]
    pub instance_id: Option<String>,
    #[n(2)]
    pub client: String,
    #[n(3)]
    pub assignment: Vec<GroupPartition>,
}

/// A committed or assigned partition, with its lag.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupOffset {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    /// Absent: assigned but nothing committed yet.
    #[n(2)]
    pub committed: Option<u64>,
    /// Absent when the partition cannot be read (a deleted topic).
    #[n(3)]
    pub log_end: Option<u64>,
    /// `log_end - committed`; absent when either is.
    #[n(4)]
    pub lag: Option<u64>,
    #[n(5)]
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeleteGroupRequest {
    #[n(0)]
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct DeleteGroupResponse {}
// ------------------------------------------------ compaction (issue 19)

/// Compacts every partition of a compacted topic now. With `wait`, the
/// answer comes when it is done and says what it did; without, at once
/// (the cleaner runs it in the background).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CompactTopicRequest {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub wait: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CompactTopicResponse {
    /// Empty when not waited for.
    #[n(0)]
    pub partitions: Vec<CompactedPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CompactedPartition {
    #[n(0)]
    pub partition: u32,
    #[n(1)]
    pub error: ErrorCode,
    /// Oldest segments merged into one (0: nothing to do), and the slots
    /// that freed.
    #[n(2)]
    pub segments_merged: u32,
    #[n(3)]
    pub segments_freed: u32,
    /// Batch bytes of the merged segments before and after.
    #[n(4)]
    pub bytes_before: u64,
    #[n(5)]
    pub bytes_after: u64,
    #[n(6)]
    pub records_removed: u64,
    /// The broker's reason when `error` is not `none`, as in a fetch
    /// result; absent otherwise and from brokers before it.
    #[n(7)]
    pub message: Option<String>,
}

/// Each partition's ring in detail: what `topics describe` shows.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribePartitionsRequest {
    #[n(0)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribePartitionsResponse {
    #[n(0)]
    pub partitions: Vec<PartitionDetail>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct PartitionDetail {
    #[n(0)]
    pub partition: u32,
    #[n(1)]
    pub error: ErrorCode,
    /// The earliest offset kept and the next offset to be written.
    #[n(2)]
    pub log_start: u64,
    #[n(3)]
    pub log_end: u64,
    /// Bytes of batches in the live segments (headers included).
    #[n(4)]
    pub bytes: u64,
    /// Live segments of the ring, of `segments`.
    #[n(5)]
    pub segments_used: u32,
    #[n(6)]
    pub segments: u32,
    /// The oldest segment's newest record timestamp (ms; absent when the
    /// log is empty), which time retention compares with.
    #[n(7)]
    pub oldest_segment_max_timestamp: Option<i64>,
    /// What the next time-retention step frees: the oldest closed segment's
    /// offsets and bytes, and when (ms since the epoch); absent without
    /// time retention or closed segments.
    #[n(8)]
    pub next_retention_at_ms: Option<i64>,
    #[n(9)]
    pub next_retention_offsets: Option<u64>,
    #[n(10)]
    pub next_retention_bytes: Option<u64>,
    /// The oldest record's timestamp (ms; absent when the log is empty).
    #[n(11)]
    pub oldest_timestamp: Option<i64>,
    /// Damaged data recovery skipped at start-up, still inside the log
    /// (docs/semantics.md, "Damaged data"); absent when none.
    #[n(12)]
    pub damaged: Option<Vec<DamagedRange>>,
    /// The broker's reason when `error` is not `none` (why the partition
    /// is quarantined), as in a fetch result; absent otherwise and from
    /// brokers before it.
    #[n(13)]
    pub message: Option<String>,
}

impl PartitionDetail {
    /// A partition that could not be described, with the broker's reason.
    pub fn failed(partition: u32, error: ErrorCode, segments: u32, message: String) -> Self {
        PartitionDetail {
            partition,
            error,
            log_start: 0,
            log_end: 0,
            bytes: 0,
            segments_used: 0,
            segments,
            oldest_segment_max_timestamp: None,
            next_retention_at_ms: None,
            next_retention_offsets: None,
            next_retention_bytes: None,
            oldest_timestamp: None,
            damaged: None,
            message: Some(message),
        }
    }
}

/// Offsets lost to damaged data that recovery skipped.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DamagedRange {
    /// The offsets lost: `from_offset..to_offset`.
    #[n(0)]
    pub from_offset: u64,
    #[n(1)]
    pub to_offset: u64,
    /// The damaged bytes skipped, and where: the segment slot and the
    /// position in its file.
    #[n(2)]
    pub bytes: u64,
    #[n(3)]
    pub slot: u32,
    #[n(4)]
    pub position: u64,
    /// When recovery found it (ms since the Unix epoch).
    #[n(5)]
    pub found_ms: i64,
    /// What was there instead of a batch.
    #[n(6)]
    pub found: String,
}

/// Changes a topic live; absent fields stay as they are. Answered with the
/// whole configuration after the change (as `create_topic`'s answer).
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
#[cbor(map)]
pub struct AlterTopicRequest {
    #[n(0)]
    pub name: String,
    /// 0: no time retention.
    #[n(4)]
    pub retention_ms: Option<u64>,
    #[n(5)]
    pub fsync: Option<String>,
    #[n(50)]
    pub cleanup: Option<String>,
    #[n(51)]
    pub tombstone_retention_ms: Option<u64>,
    /// The ring's new segment count (as create's `segments`): grows or
    /// shrinks every partition's ring live.
    #[n(3)]
    pub segments: Option<u32>,
}

// ------------------------------------------------------------------- mirror
// Variants 40..=49 of RequestBody and ResponseBody, since protocol version 2.

/// The mirror's link state and per-rule counters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct MirrorStatusRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MirrorStatusResponse {
    /// False: no `[mirror]` upstream is configured.
    #[n(0)]
    pub enabled: bool,
    /// True: the producer is initialised and the checkpoints were read.
    #[n(1)]
    pub link_up: bool,
    /// Why the link is down, or the last failure it recovered from.
    #[n(2)]
    pub last_error: Option<String>,
    /// The transactional id (the `skiff.gateway` header).
    #[n(3)]
    pub gateway: String,
    #[n(4)]
    pub upstream: String,
    #[n(5)]
    pub transactions_committed: u64,
    #[n(6)]
    pub transactions_aborted: u64,
    #[n(7)]
    pub rules: Vec<MirrorRuleStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MirrorRuleStatus {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub paused: bool,
    #[n(2)]
    pub partitions: u64,
    #[n(3)]
    pub backlog_records: u64,
    #[n(4)]
    pub bytes_at_risk: u64,
    #[n(5)]
    pub forwarded_records: u64,
    #[n(6)]
    pub forwarded_bytes: u64,
    #[n(7)]
    pub dropped_records: u64,
    /// Upstream bytes committed per second over the last 10 s; absent
    /// from older servers.
    #[n(8)]
    pub rate_bytes_per_s: Option<u64>,
    /// Seconds to drain the backlog; absent when it is not draining.
    #[n(9)]
    pub eta_s: Option<u64>,
    /// Aggregate rules (0 for others); numbered apart from the fields above
    /// so both can grow. 0 when a server from before aggregates leaves them
    /// out.
    #[n(16)]
    #[cbor(default)]
    pub open_windows: u64,
    #[n(17)]
    #[cbor(default)]
    pub windows_emitted: u64,
    #[n(18)]
    #[cbor(default)]
    pub windows_closed_early: u64,
    #[n(19)]
    #[cbor(default)]
    pub late_records: u64,
    #[n(20)]
    #[cbor(default)]
    pub malformed_records: u64,
}

/// Pauses (`paused: true`) or resumes a rule; the answer echoes it. An
/// unknown rule is `invalid_request`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MirrorRuleRequest {
    #[n(0)]
    pub rule: String,
    #[n(1)]
    pub paused: bool,
}
