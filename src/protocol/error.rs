//! Error codes on the wire, and the codec's own errors.
//!
//! Two kinds of failure are kept apart:
//!
//! - [`ErrorCode`]: a domain answer the server sends back inside a response
//!   (unknown topic, storage full, ...). It is part of the wire format.
//! - [`FrameError`]: bytes that are not a valid request or response. The
//!   codec returns it; a server maps it to an [`ErrorCode`] with
//!   [`FrameError::code`] and answers. It closes the connection unless only
//!   the request was wrong and the framing is intact
//!   ([`FrameError::closes_connection`]).

use minicbor::decode;
use minicbor::encode::{self, Write};
use minicbor::{Decode, Decoder, Encode, Encoder};

/// A typed failure, sent as an unsigned integer (a `u16`). The numbers are
/// part of the wire format: never renumber or reuse one; add new codes at the
/// end. A server only sends codes that the negotiated protocol version
/// defines, so a client never meets a number it does not know.
///
/// "Retriable" ([`ErrorCode::is_retriable`]) means the same request may
/// succeed later without any change by the client or an operator; a client
/// retries those with backoff, and fails fast on the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Success. Used in per-partition results, where each entry carries a
    /// code; never in an [`ErrorResponse`](super::ErrorResponse).
    None = 0,
    /// The topic does not exist (never created, or deleted). Not retriable:
    /// create it first.
    UnknownTopic = 1,
    /// The topic exists but has no partition with that number. Not retriable:
    /// refresh metadata; the partition count is fixed at creation.
    UnknownPartition = 2,
    /// `create_topic` for a name that already exists. Not retriable.
    TopicExists = 3,
    /// The request asks for something invalid: a bad topic name, zero
    /// partitions, an unparsable fsync policy, an operation before `hello`,
    /// a second `hello`, an operation the connection's version does not
    /// define, a body that does not fit its operation's schema, ... The
    /// connection stays usable (after `hello`). Not retriable: fix the
    /// request.
    InvalidRequest = 4,
    /// The frame's length prefix is above the server's `max_frame_bytes`.
    /// The server answers and closes the connection. Not retriable as is.
    FrameTooLarge = 5,
    /// The frame is not one valid CBOR item shaped as a request's envelope,
    /// `[correlation_id, [operation, ...]]` (bad or cut CBOR, trailing
    /// bytes). The server answers (with correlation id 0 when it could not
    /// read one) and closes the connection: such a peer's framing cannot
    /// be trusted. Not retriable: this is a client bug.
    MalformedFrame = 6,
    /// `hello` offered no protocol version the server speaks; the message
    /// names the server's range. Not retriable.
    UnsupportedVersion = 7,
    /// The partition's ring is full of data that may not be dropped yet
    /// (overflow policy `reject` and data not yet forwarded upstream).
    /// Retriable: space frees up as the mirror forwards.
    StorageFull = 8,
    /// A write or fsync failed on the server. The partition refuses writes
    /// until it is recovered, so a retry does not help before an operator or
    /// a restart does. Not retriable. The outcome of the failed write is
    /// unknown to the client, but it was never acknowledged. Also the
    /// answer to `create_topic` when a directory left on disk for the name
    /// (of no listed topic) is in the way: the message names it.
    StorageFailed = 9,
    /// Recovery found the partition damaged beyond its torn-tail policy and
    /// set it aside. Not retriable: needs an operator.
    PartitionQuarantined = 10,
    /// A fetch asked for an offset below the partition's earliest or above
    /// its latest offset. Not retriable: reset the position (see
    /// `earliest_offset` / `high_watermark` in the result).
    OffsetOutOfRange = 11,
    /// A produced batch fails its checks (CRC, magic, record count, body).
    /// Not retriable: the bytes are wrong.
    InvalidBatch = 12,
    /// A produced batch is above the server's `max_batch_bytes`. Not
    /// retriable as is: split it.
    BatchTooLarge = 13,
    /// The connection's identity may not do this. Not retriable.
    NotAuthorized = 14,
    /// `create_topic` would exceed the server's topic limit. Not retriable.
    TooManyTopics = 15,
    /// `create_topic` would exceed the server's partition limit. Not
    /// retriable.
    TooManyPartitions = 16,
    /// The server is at its connection limit; it answers `hello` with this
    /// and closes. Retriable: connect again after a backoff.
    TooManyConnections = 17,
    /// The producer's epoch is older than the current one for its id:
    /// another instance took over. Not retriable: this producer must stop.
    FencedProducer = 18,
    /// The batch's sequence number leaves a gap after the last one written.
    /// Not retriable as is: earlier batches were lost; the producer must
    /// re-initialise.
    OutOfOrderSequence = 19,
    /// The batch's sequence number was already written. Not retriable; the
    /// data is in the log already (the result carries the offsets when the
    /// server still knows them).
    DuplicateSequence = 20,
    /// The server is shutting down and takes no new work. Retriable:
    /// reconnect after a backoff.
    ShuttingDown = 21,
    /// A server bug. Not retriable; the message says what happened.
    Internal = 22,
    /// The partition's ring is full of records the mirror has not
    /// forwarded upstream yet, and its rule's `mirror_overflow` is `block`.
    /// Retriable: room frees up as the mirror catches up.
    UpstreamBacklogFull = 23,
    // ------------------------------------------- compaction (issue 19)
    /// A record the topic cannot take: on a compacted topic, a record
    /// without a key (the topic keeps the latest record per key). Not
    /// retriable: the message names the record. Since protocol version 2;
    /// a version 1 client gets `invalid_batch`.
    InvalidRecord = 24,
    /// A compacted topic's ring holds nothing but latest values (and
    /// tombstones not yet expired): writing on would lose one. Not
    /// retriable as is: delete keys (tombstones), or grow the ring
    /// (`skiff topics alter --segments`). Also the answer to a shrink of
    /// such a ring below the segments its data fills. Since protocol
    /// version 2; a version 1 client gets `invalid_request`.
    RingFullOfLiveData = 25,
    // 26..=29 are left to other features; the group codes take 30..=39.
    /// `describe`, `delete` or a reset for a group that has no members
    /// and no committed offsets. Not retriable.
    UnknownGroup = 30,
    /// The member id is not in the group: removed after its session
    /// timeout or a missed rebalance, or replaced by its static instance.
    /// Not retriable as is: join again as a new member.
    UnknownMemberId = 31,
    /// The request names a generation that is over: the member was fenced
    /// by a rebalance it missed. Not retriable as is: join again.
    IllegalGeneration = 32,
    /// The group is rebalancing. Not retriable as is: join again.
    RebalanceInProgress = 33,
    /// A commit for a partition not assigned to the member. Not retriable.
    NotOwner = 34,
    /// `delete` or a reset of a group that has members. Not retriable
    /// until they stop.
    GroupNotEmpty = 35,
    /// A join or commit that would make one more group than
    /// `groups.max_groups`. Not retriable: a slot frees only when a group
    /// is deleted or its offsets expire (`groups.offsets_retention_ms`),
    /// far past any client's retries. Since protocol version 4; an older
    /// client gets `invalid_request`.
    TooManyGroups = 36,
    /// A join of one more member than `groups.max_members_per_group` (in
    /// its group) or `groups.max_members` (over all groups), or a share
    /// fetch or acknowledgement of a new member while
    /// `share.max_active_members` others are active. Retriable: a slot
    /// frees as soon as a member leaves, or within its session timeout
    /// (a share member: `lock_ms`) once it stops (a restarted consumer's
    /// old member, say). Since protocol version 4; an older client gets
    /// `invalid_request`.
    TooManyMembers = 37,
    // ----------------------------------------- transactions: 40..=44
    /// The request does not fit the transaction's state: a produce while
    /// it commits, an end or offsets for an id never initialised. Not
    /// retriable as is; the message says what the state is.
    InvalidTxnState = 40,
    /// A transaction cannot begin: `transactions.max_open` others are
    /// open (Kafka's CONCURRENT_TRANSACTIONS). Nothing of the request was
    /// written. Retriable: a slot frees as soon as another transaction
    /// ends. Since protocol version 4; an older client gets
    /// `invalid_request`.
    ConcurrentTransactions = 41,
    /// `init_txn` of a new id while `transactions.max_transactional_ids`
    /// are kept. Not retriable: a slot frees only when an id expires
    /// (`transactions.id_expiration_ms`, a day by default), far past any
    /// client's retry window; reuse an id or raise the limit. Since
    /// protocol version 4; an older client gets `invalid_request`.
    TooManyTransactionalIds = 42,
    /// A transaction cannot begin, or an open one cannot add a partition:
    /// the coordinator keeps as many aborted transactions' ranges as its
    /// log holds. Not retriable: a range goes only when retention removes
    /// its partition's records up to the abort. Since protocol version 4;
    /// an older client gets `invalid_request`.
    TooManyAbortedTransactions = 43,
    // ------------------------------------------- share groups: 45..=49
    /// An acknowledgement for a record the member does not hold: its
    /// lock expired (the record may be with another worker now), or it
    /// was never acquired. Not retriable: the record is redelivered.
    ShareLockLost = 45,
    /// A share fetch that would start one more share partition (group,
    /// topic, partition) than `share.max_share_partitions`. Not retriable:
    /// a share partition goes only when its share group or its topic is
    /// deleted; delete a share group no longer used or raise the limit.
    /// Since protocol version 4; an older client gets `invalid_request`.
    TooManySharePartitions = 46,
}

impl ErrorCode {
    /// Every code, in wire order. Used by tests and by the docs table.
    pub const ALL: [ErrorCode; 40] = [
        Self::None,
        Self::UnknownTopic,
        Self::UnknownPartition,
        Self::TopicExists,
        Self::InvalidRequest,
        Self::FrameTooLarge,
        Self::MalformedFrame,
        Self::UnsupportedVersion,
        Self::StorageFull,
        Self::StorageFailed,
        Self::PartitionQuarantined,
        Self::OffsetOutOfRange,
        Self::InvalidBatch,
        Self::BatchTooLarge,
        Self::NotAuthorized,
        Self::TooManyTopics,
        Self::TooManyPartitions,
        Self::TooManyConnections,
        Self::FencedProducer,
        Self::OutOfOrderSequence,
        Self::DuplicateSequence,
        Self::ShuttingDown,
        Self::Internal,
        Self::UpstreamBacklogFull,
        Self::InvalidRecord,
        Self::RingFullOfLiveData,
        Self::UnknownGroup,
        Self::UnknownMemberId,
        Self::IllegalGeneration,
        Self::RebalanceInProgress,
        Self::NotOwner,
        Self::GroupNotEmpty,
        Self::TooManyGroups,
        Self::TooManyMembers,
        Self::InvalidTxnState,
        Self::ConcurrentTransactions,
        Self::TooManyTransactionalIds,
        Self::TooManyAbortedTransactions,
        Self::ShareLockLost,
        Self::TooManySharePartitions,
    ];

    /// The number on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a wire number, or `None` for a number this version does
    /// not define.
    pub fn from_u16(code: u16) -> Option<Self> {
        // Numbers are not contiguous (features take blocks of them).
        Self::ALL.into_iter().find(|c| c.as_u16() == code)
    }

    /// The snake_case name used in docs, logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::UnknownTopic => "unknown_topic",
            Self::UnknownPartition => "unknown_partition",
            Self::TopicExists => "topic_exists",
            Self::InvalidRequest => "invalid_request",
            Self::FrameTooLarge => "frame_too_large",
            Self::MalformedFrame => "malformed_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::StorageFull => "storage_full",
            Self::StorageFailed => "storage_failed",
            Self::PartitionQuarantined => "partition_quarantined",
            Self::OffsetOutOfRange => "offset_out_of_range",
            Self::InvalidBatch => "invalid_batch",
            Self::BatchTooLarge => "batch_too_large",
            Self::NotAuthorized => "not_authorized",
            Self::TooManyTopics => "too_many_topics",
            Self::TooManyPartitions => "too_many_partitions",
            Self::TooManyConnections => "too_many_connections",
            Self::FencedProducer => "fenced_producer",
            Self::OutOfOrderSequence => "out_of_order_sequence",
            Self::DuplicateSequence => "duplicate_sequence",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::UnknownGroup => "unknown_group",
            Self::UnknownMemberId => "unknown_member_id",
            Self::IllegalGeneration => "illegal_generation",
            Self::RebalanceInProgress => "rebalance_in_progress",
            Self::NotOwner => "not_owner",
            Self::GroupNotEmpty => "group_not_empty",
            Self::TooManyGroups => "too_many_groups",
            Self::TooManyMembers => "too_many_members",
            Self::InvalidRecord => "invalid_record",
            Self::RingFullOfLiveData => "ring_full_of_live_data",
            Self::UpstreamBacklogFull => "upstream_backlog_full",
            Self::ShareLockLost => "share_lock_lost",
            Self::TooManySharePartitions => "too_many_share_partitions",
            Self::InvalidTxnState => "invalid_txn_state",
            Self::ConcurrentTransactions => "concurrent_transactions",
            Self::TooManyTransactionalIds => "too_many_transactional_ids",
            Self::TooManyAbortedTransactions => "too_many_aborted_transactions",
        }
    }

    /// The protocol version that defines the code: a client of an older
    /// one is sent another in its place ([`for_version`](super::for_version)).
    pub fn since_version(self) -> u16 {
        match self {
            Self::UpstreamBacklogFull
            | Self::InvalidRecord
            | Self::RingFullOfLiveData
            | Self::UnknownGroup
            | Self::UnknownMemberId
            | Self::IllegalGeneration
            | Self::RebalanceInProgress
            | Self::NotOwner
            | Self::GroupNotEmpty => 2,
            Self::InvalidTxnState | Self::ShareLockLost => 3,
            Self::TooManyGroups
            | Self::TooManyMembers
            | Self::ConcurrentTransactions
            | Self::TooManyTransactionalIds
            | Self::TooManyAbortedTransactions
            | Self::TooManySharePartitions => 4,
            Self::None
            | Self::UnknownTopic
            | Self::UnknownPartition
            | Self::TopicExists
            | Self::InvalidRequest
            | Self::FrameTooLarge
            | Self::MalformedFrame
            | Self::UnsupportedVersion
            | Self::StorageFull
            | Self::StorageFailed
            | Self::PartitionQuarantined
            | Self::OffsetOutOfRange
            | Self::InvalidBatch
            | Self::BatchTooLarge
            | Self::NotAuthorized
            | Self::TooManyTopics
            | Self::TooManyPartitions
            | Self::TooManyConnections
            | Self::FencedProducer
            | Self::OutOfOrderSequence
            | Self::DuplicateSequence
            | Self::ShuttingDown
            | Self::Internal => 1,
        }
    }

    /// Whether the same request may succeed later unchanged. See each
    /// variant's docs for the reason.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            Self::StorageFull
                | Self::TooManyConnections
                | Self::ShuttingDown
                | Self::UpstreamBacklogFull
                | Self::ConcurrentTransactions
                | Self::TooManyMembers
        )
    }

    /// Whether this is the success code.
    pub fn is_none(self) -> bool {
        self == Self::None
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl<C> Encode<C> for ErrorCode {
    fn encode<W: Write>(
        &self,
        e: &mut Encoder<W>,
        _: &mut C,
    ) -> Result<(), encode::Error<W::Error>> {
        e.u16(self.as_u16())?.ok()
    }
}

impl<C> Decode<'_, C> for ErrorCode {
    fn decode(d: &mut Decoder<'_>, _: &mut C) -> Result<Self, decode::Error> {
        let at = d.position();
        let code = d.u16()?;
        Self::from_u16(code).ok_or_else(|| decode::Error::message("unknown error code").at(at))
    }
}

/// What kind of CBOR problem made a frame malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MalformedKind {
    /// The CBOR item ends before its declared content does.
    Truncated,
    /// A value has another CBOR type than the field needs.
    TypeMismatch,
    /// An operation or enum variant index this version does not define.
    UnknownVariant,
    /// A required field is absent.
    MissingField,
    /// A number out of its field's range, an unknown error code, invalid
    /// UTF-8, an indefinite-length byte string, or another CBOR-level error.
    InvalidValue,
}

impl MalformedKind {
    fn of(e: &decode::Error) -> Self {
        if e.is_end_of_input() {
            Self::Truncated
        } else if e.is_type_mismatch() {
            Self::TypeMismatch
        } else if e.is_unknown_variant() {
            Self::UnknownVariant
        } else if e.is_missing_value() {
            Self::MissingField
        } else {
            Self::InvalidValue
        }
    }
}

/// Why bytes are not a valid frame. Each variant names what was seen, with
/// byte offsets into the frame body (after the length prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is above the limit. Likely a peer with a bigger
    /// limit, a bug, or not a skiff peer at all (an HTTP request reads as a
    /// length of about 1.2 GB).
    TooLarge { len: u64, max: u32 },
    /// The body is not one CBOR item of the expected shape.
    Malformed {
        /// Where the decoder stopped, when it knows.
        offset: Option<usize>,
        kind: MalformedKind,
    },
    /// A valid item ends before the frame does: the peer's framing or
    /// encoder is broken, so nothing after it can be trusted.
    TrailingBytes { item_end: usize, frame_len: usize },
    /// A whole request frame, envelope intact, for an operation number no
    /// protocol version this build speaks defines: a client that ignored
    /// the negotiated version. Only the request is refused.
    UnknownOperation { operation: u32 },
    /// A whole request frame, envelope intact, whose body does not fit its
    /// operation's schema (a field missing or of another type, a value out
    /// of range): a client bug. Only the request is refused.
    UnfitBody {
        operation: u32,
        /// Where the decoder stopped, when it knows.
        offset: Option<usize>,
        kind: MalformedKind,
    },
}

impl FrameError {
    pub(crate) fn malformed(e: &decode::Error) -> Self {
        Self::Malformed {
            offset: e.position(),
            kind: MalformedKind::of(e),
        }
    }

    /// The code a server answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::Malformed { .. } | Self::TrailingBytes { .. } => ErrorCode::MalformedFrame,
            Self::UnknownOperation { .. } | Self::UnfitBody { .. } => ErrorCode::InvalidRequest,
        }
    }

    /// Whether the connection must close: its framing cannot be trusted
    /// past this frame. A request refused for its operation or body leaves
    /// the frame boundaries intact.
    pub fn closes_connection(&self) -> bool {
        !matches!(self, Self::UnknownOperation { .. } | Self::UnfitBody { .. })
    }
}

impl MalformedKind {
    /// What did not fit, for the message of an `invalid_request`.
    fn describe(self) -> &'static str {
        match self {
            Self::Truncated => "the body ends early",
            Self::TypeMismatch => "a value of the wrong type",
            Self::UnknownVariant => "an unknown variant",
            Self::MissingField => "a required field missing",
            Self::InvalidValue => "a value out of range or invalid",
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes is above the limit of {max}")
            }
            Self::Malformed {
                offset: Some(at),
                kind,
            } => write!(f, "malformed frame at byte {at}: {kind:?}"),
            Self::Malformed { offset: None, kind } => write!(f, "malformed frame: {kind:?}"),
            Self::TrailingBytes {
                item_end,
                frame_len,
            } => write!(
                f,
                "trailing bytes: the item ends at byte {item_end} of a {frame_len}-byte frame"
            ),
            Self::UnknownOperation { operation } => write!(
                f,
                "operation {operation} is not defined by protocol versions {}..={}",
                super::PROTOCOL_VERSION_MIN,
                super::PROTOCOL_VERSION_MAX
            ),
            Self::UnfitBody {
                operation,
                offset,
                kind,
            } => {
                write!(
                    f,
                    "the body of operation {operation} does not fit its schema: {}",
                    kind.describe()
                )?;
                match offset {
                    Some(at) => write!(f, " at byte {at}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for FrameError {}
