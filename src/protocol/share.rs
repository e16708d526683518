//! Share groups (queues, docs/queues.md): operations 70..=79, protocol
//! version 3. Kept apart from `types` so that other features' operations
//! merge beside them without touching these.
//!
//! A share fetch hands out records one by one, each locked to the member
//! that asked; the member acknowledges each record (accept, release,
//! reject). Records travel decoded, not as stored batches: a share fetch
//! picks single records out of batches (the ones available to this
//! member), so there are no whole batches to pass through.

use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};

use super::error::ErrorCode;

/// Acquires up to `max_records` records of `topic` (any partition) for
/// `member_id` of share group `group`. The server answers as soon as it
/// has one, or after `max_wait_ms` with none.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareFetchRequest {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub topic: String,
    /// Chosen by the client, unique per worker; acknowledgements must come
    /// from the member that holds a record's lock.
    #[n(2)]
    pub member_id: String,
    #[n(3)]
    pub max_records: u32,
    #[n(4)]
    pub max_wait_ms: u32,
    /// Where a share partition the group has never read starts:
    /// "earliest" or "latest" (absent: latest, as Kafka's).
    #[n(5)]
    pub from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareFetchResponse {
    #[n(0)]
    pub records: Vec<ShareRecord>,
    /// How long each record stays locked to the member from now.
    #[n(1)]
    pub lock_ms: u64,
}

/// One acquired record.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareRecord {
    #[n(0)]
    pub partition: u32,
    #[n(1)]
    pub offset: u64,
    #[n(2)]
    pub timestamp_ms: i64,
    #[n(3)]
    pub key: Option<ByteVec>,
    /// Absent for a tombstone.
    #[n(4)]
    pub value: Option<ByteVec>,
    #[n(5)]
    pub headers: Vec<ShareHeader>,
    /// 1 on the first delivery.
    #[n(6)]
    pub delivery_count: u32,
}

/// An upper bound on the bytes a share_fetch response adds around its
/// records: the frame prefix, `[correlation_id, [70, [[records...],
/// lock_ms]]]`'s heads and numbers. With [`ShareRecord::bytes_max`] the
/// server keeps the answer under the peer's `max_frame_bytes`.
pub const SHARE_FETCH_RESPONSE_ENVELOPE_BYTES_MAX: usize = 4 + 1 + 5 + 1 + 2 + 1 + 9 + 9;

/// The bytes of a CBOR head for a length or number `n` (shortest form).
fn head_bytes(n: usize) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

impl ShareRecord {
    /// An upper bound on the encoded size of a record with this key,
    /// value and headers: their bytes and heads as encoded (the same
    /// encoding as in a stored batch, whose size bounds them), the numbers
    /// at their largest.
    pub fn bytes_max<'a>(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> usize {
        let bytes = |b: Option<&[u8]>| b.map_or(1, |b| head_bytes(b.len()) + b.len());
        let (mut count, mut headers_bytes) = (0, 0);
        for (name, value) in headers {
            count += 1;
            headers_bytes +=
                1 + head_bytes(name.len()) + name.len() + head_bytes(value.len()) + value.len();
        }
        // array head, partition, offset, timestamp, key, value, headers'
        // array head and pairs, delivery count
        1 + 5 + 9 + 9 + bytes(key) + bytes(value) + head_bytes(count) + headers_bytes + 5
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareHeader {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub value: ByteVec,
}

/// Acknowledges records the member holds.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareAckRequest {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub topic: String,
    #[n(2)]
    pub member_id: String,
    #[n(3)]
    pub acks: Vec<ShareAck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareAck {
    #[n(0)]
    pub partition: u32,
    #[n(1)]
    pub offset: u64,
    #[n(2)]
    pub kind: ShareAckKind,
    /// For a release: not handed out again before this many ms.
    #[n(3)]
    pub delay_ms: Option<u32>,
    /// Why it failed, for the dead-letter record's `skiff.dlq.error`.
    #[n(4)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
#[cbor(index_only)]
pub enum ShareAckKind {
    /// Done.
    #[n(0)]
    Accept,
    /// Available again (after `delay_ms`); to the dead-letter topic once
    /// delivered `max_deliveries` times.
    #[n(1)]
    Release,
    /// To the dead-letter topic.
    #[n(2)]
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareAckResponse {
    /// One per ack, in order: `none`, or why it did not count
    /// (`share_lock_lost`: the member's lock lapsed).
    #[n(0)]
    pub results: Vec<ErrorCode>,
}

/// Every share group the caller may see (`group` permission), by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct ListShareGroupsRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListShareGroupsResponse {
    #[n(0)]
    pub groups: Vec<ShareGroupListing>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareGroupListing {
    #[n(0)]
    pub group: String,
    /// Topics the group has read.
    #[n(1)]
    pub topics: Vec<String>,
    /// Share partitions (topic, partition) the group has state for.
    #[n(2)]
    pub partitions: u32,
    /// Records delivered and not yet done.
    #[n(3)]
    pub in_flight: u64,
    /// Members active now.
    #[n(4)]
    pub members: u32,
}

/// A share group's windows and members; `unknown_group` when it has
/// neither.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribeShareGroupRequest {
    #[n(0)]
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DescribeShareGroupResponse {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub partitions: Vec<SharePartitionState>,
    #[n(2)]
    pub members: Vec<ShareMember>,
}

/// One share partition's window `[start, next)`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SharePartitionState {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    /// Every offset below it is done.
    #[n(2)]
    pub start: u64,
    /// The first offset never delivered.
    #[n(3)]
    pub next: u64,
    /// Absent when the partition cannot be read.
    #[n(4)]
    pub log_end: Option<u64>,
    /// Records locked to a member.
    #[n(5)]
    pub acquired: u64,
    /// Records awaiting redelivery (released, or their lock expired).
    #[n(6)]
    pub available: u64,
    /// Records done behind one that is not.
    #[n(7)]
    pub done: u64,
    /// Every record in the window not done, by offset.
    #[n(8)]
    pub records: Vec<ShareRecordState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareRecordState {
    #[n(0)]
    pub offset: u64,
    /// `acquired`, `available` or `dead_lettering`.
    #[n(1)]
    pub state: String,
    #[n(2)]
    pub delivery_count: u32,
    /// The member holding the record's lock.
    #[n(3)]
    pub member_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareMember {
    #[n(0)]
    pub member_id: String,
    /// Records locked to it.
    #[n(1)]
    pub acquired: u64,
    /// How long it stays active without another fetch or acknowledgement.
    #[n(2)]
    pub active_ms: u64,
}

/// Deletes a share group's state; refused (`group_not_empty`) while it
/// has active members.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeleteShareGroupRequest {
    #[n(0)]
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct DeleteShareGroupResponse {}

/// The member leaves the share group (version 4): every record it holds
/// is available again at once, its delivery count as it was (as a
/// release), and it is no longer an active member. Leaving a group the
/// member is not in answers 0 released.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareLeaveRequest {
    #[n(0)]
    pub group: String,
    #[n(1)]
    pub member_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ShareLeaveResponse {
    /// Records that were locked to the member.
    #[n(0)]
    pub released: u64,
}
