//! The wire protocol: frames of one CBOR item each, the message types, the
//! error codes. Sans-IO: this module never touches a socket; the server and
//! the client feed it bytes and send what it encodes. The specification for
//! humans is `docs/protocol.md`.
//!
//! - [`codec`]: the frame layout, `frame_len` (is a whole frame buffered?),
//!   `decode_*` and `encode_*`.
//! - [`types`]: every request and response, with the index rule.
//! - [`error`]: [`ErrorCode`] (on the wire) and [`FrameError`] (bad bytes).

pub mod codec;
pub mod error;
pub mod share;
pub mod txn;
pub mod types;

#[cfg(test)]
mod tests;

pub use codec::{
    body_len, decode_request, decode_response, decode_response_shared, encode_request,
    encode_request_body, encode_response, encode_response_spliced, error_response,
    frame_error_response, frame_len, peek_correlation_id, Splice, FRAME_HEADER_BYTES,
    SPLICE_MIN_BYTES,
};
pub use error::{ErrorCode, FrameError, MalformedKind};
pub use share::*;
pub use txn::*;
pub use types::*;

/// The protocol versions this build speaks. A version changes when an
/// operation is added or a field's meaning changes; adding an optional field
/// does not need one.
///
/// - 1: topics, produce, fetch, offsets, idempotent producers.
/// - 2: consumer groups (operations 20..=39), the mirror's (40..=49),
///   compaction and topic changes (50..=52); error codes 23..=25 and
///   30..=35 ([`ErrorCode::since_version`]).
/// - 3: transactions (operations 60..=69, fetch isolation) and share groups
///   (operations 70..=79, docs/queues.md).
/// - 4: the coordinators' refusals at their limits as their own codes
///   (`concurrent_transactions` and `too_many_members`, retriable;
///   `too_many_transactional_ids`, `too_many_groups`,
///   `too_many_aborted_transactions`, `too_many_share_partitions`; the
///   share coordinator's active members are `too_many_members` too), and a
///   share group member's leave
///   (`share_leave`, operation 75).
///
/// [`RequestBody::since_version`] says which, per operation.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
pub const PROTOCOL_VERSION_MAX: u16 = 4;
const _: () = assert!(PROTOCOL_VERSION_MIN <= PROTOCOL_VERSION_MAX);

/// The hard ceiling on a frame body, whatever the config says: a produce of
/// one batch of the largest size the batch format allows, plus room for the
/// request around it.
pub const FRAME_BYTES_MAX: u32 = 80 * 1024 * 1024;
/// Room for the CBOR around a batch in a produce frame (topic name, indices,
/// headers of the byte string); topic names are far shorter than this.
pub const FRAME_OVERHEAD_BYTES_MAX: u32 = 64 * 1024;
const _: () = assert!(
    crate::batch::BATCH_BYTES_MAX as u64 + FRAME_OVERHEAD_BYTES_MAX as u64
        <= FRAME_BYTES_MAX as u64
);

/// The limit on frames before `hello` is done. A hello request is tiny; a
/// peer that sends a large first frame is not a skiff client (an HTTP or TLS
/// client hitting the wrong port), and is cut off before it costs memory.
pub const HELLO_FRAME_BYTES_MAX: u32 = 4 * 1024;

/// `body` as a client of protocol `version` may be sent it: a code of a
/// later version ([`ErrorCode::since_version`]) becomes one the client knows
/// and treats alike. Before version 2 there is no `upstream_backlog_full`,
/// and such a client gets `storage_full` (also retriable, with the same
/// meaning to it), nor compaction's codes: a keyless record on a compacted
/// topic is `invalid_batch` (the batch's records are refused) and a ring
/// full of live data `invalid_request` (neither is retriable).
/// Before version 4 the coordinators' refusals at their limits are
/// `invalid_request`, as they were then; so is any other code of a later
/// version. Mapped wherever a code is: an error answer, a produce result's
/// per partition, a share ack's per ack.
pub fn for_version(mut body: ResponseBody, version: u16) -> ResponseBody {
    if version >= PROTOCOL_VERSION_MAX {
        return body;
    }
    let old = |code: &mut ErrorCode| {
        if code.since_version() > version {
            *code = match *code {
                ErrorCode::UpstreamBacklogFull => ErrorCode::StorageFull,
                ErrorCode::InvalidRecord => ErrorCode::InvalidBatch,
                _ => ErrorCode::InvalidRequest,
            }
        }
    };
    match &mut body {
        ResponseBody::Error(e) => old(&mut e.code),
        ResponseBody::Produce(p) => p.partitions.iter_mut().for_each(|r| old(&mut r.error)),
        ResponseBody::ShareAck(a) => a.results.iter_mut().for_each(old),
        _ => {}
    }
    body
}

/// The version a server speaking `[PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX]`
/// picks for a client offering `[client_min, client_max]`: the highest both
/// speak, or `None` when the ranges do not meet.
pub fn negotiate_version(client_min: u16, client_max: u16) -> Option<u16> {
    let high = client_max.min(PROTOCOL_VERSION_MAX);
    let low = client_min.max(PROTOCOL_VERSION_MIN);
    (low <= high).then_some(high)
}
