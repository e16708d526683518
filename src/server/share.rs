//! Share-group requests (queues, docs/queues.md): protocol types in,
//! share-coordinator calls, protocol types out. Each request is
//! authorized as `group` on its share group and `consume` on its topic;
//! list, describe and delete as `group` on the share group.

use std::time::Duration;

use minicbor::bytes::ByteVec;

use crate::broker::share::{Ack, AckKind, Delivered, FetchSpec, ShareError};
use crate::protocol::{
    DeleteShareGroupResponse, DescribeShareGroupResponse, ErrorCode, ListShareGroupsResponse,
    ResponseBody, ShareAckKind, ShareAckRequest, ShareAckResponse, ShareFetchRequest,
    ShareFetchResponse, ShareGroupListing, ShareHeader, ShareLeaveResponse, ShareMember,
    SharePartitionState, ShareRecord, ShareRecordState, SHARE_FETCH_RESPONSE_ENVELOPE_BYTES_MAX,
};

use super::acl::Operation;
use super::handler::{authorize, broker_error_code, error_body, not_authorized_message};
use super::Ctx;

/// The wire code of a share error.
pub(crate) fn share_error_code(e: &ShareError) -> ErrorCode {
    match e {
        ShareError::Invalid(_) => ErrorCode::InvalidRequest,
        ShareError::LockLost { .. } => ErrorCode::ShareLockLost,
        ShareError::UnknownGroup(_) => ErrorCode::UnknownGroup,
        ShareError::NotEmpty { .. } => ErrorCode::GroupNotEmpty,
        ShareError::TooManyMembers { .. } => ErrorCode::TooManyMembers,
        ShareError::TooManySharePartitions { .. } => ErrorCode::TooManySharePartitions,
        ShareError::Broker(e) => broker_error_code(e),
    }
}

fn share_error_body(e: &ShareError) -> ResponseBody {
    error_body(share_error_code(e), e.to_string())
}

/// `group` on the share group and `consume` on the topic, or the denial.
fn check(ctx: &Ctx, identity: &str, group: &str, topic: &str) -> Option<ResponseBody> {
    for (op, resource) in [(Operation::Group, group), (Operation::Consume, topic)] {
        if !authorize(ctx, identity, op, resource) {
            return Some(error_body(
                ErrorCode::NotAuthorized,
                not_authorized_message(identity, op, resource),
            ));
        }
    }
    None
}

pub(crate) async fn fetch(ctx: &Ctx, identity: &str, r: ShareFetchRequest) -> ResponseBody {
    if let Some(denied) = check(ctx, identity, &r.group, &r.topic) {
        return denied;
    }
    let from_earliest = match r.from.as_deref() {
        None | Some("latest") => false,
        Some("earliest") => true,
        Some(other) => {
            return error_body(
                ErrorCode::InvalidRequest,
                format!("from {other:?}: earliest or latest"),
            )
        }
    };
    let max_wait = Duration::from_millis(u64::from(
        r.max_wait_ms
            .min(u32::try_from(ctx.settings.max_wait_ms).unwrap_or(u32::MAX)),
    ));
    let spec = FetchSpec {
        group: r.group,
        topic: r.topic,
        member: r.member_id,
        max_records: r.max_records,
        max_wait,
        from_earliest,
        // Records past the frame would make the answer invalid_request,
        // each charged a delivery it never got.
        max_bytes: ctx
            .settings
            .max_frame_bytes
            .saturating_sub(SHARE_FETCH_RESPONSE_ENVELOPE_BYTES_MAX),
        record_bytes: share_record_bytes,
    };
    match ctx.share.fetch(spec).await {
        Ok((records, lock_ms)) => ResponseBody::ShareFetch(ShareFetchResponse {
            records: records
                .into_iter()
                .map(|d| ShareRecord {
                    partition: d.partition,
                    offset: d.offset,
                    timestamp_ms: d.timestamp_ms,
                    key: d.key.map(ByteVec::from),
                    value: d.value.map(ByteVec::from),
                    headers: d
                        .headers
                        .into_iter()
                        .map(|(name, value)| ShareHeader {
                            name,
                            value: value.into(),
                        })
                        .collect(),
                    delivery_count: d.delivery_count,
                })
                .collect(),
            lock_ms,
        }),
        Err(e) => share_error_body(&e),
    }
}

/// What `d` takes in a share_fetch answer, at most.
fn share_record_bytes(d: &Delivered) -> usize {
    ShareRecord::bytes_max(
        d.key.as_deref(),
        d.value.as_deref(),
        d.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
    )
}

pub(crate) async fn ack(ctx: &Ctx, identity: &str, r: ShareAckRequest) -> ResponseBody {
    if let Some(denied) = check(ctx, identity, &r.group, &r.topic) {
        return denied;
    }
    let acks = r
        .acks
        .into_iter()
        .map(|a| Ack {
            partition: a.partition,
            offset: a.offset,
            kind: match a.kind {
                ShareAckKind::Accept => AckKind::Accept,
                ShareAckKind::Release => AckKind::Release {
                    delay: Duration::from_millis(u64::from(a.delay_ms.unwrap_or(0))),
                },
                ShareAckKind::Reject => AckKind::Reject,
            },
            error: a.error,
        })
        .collect();
    match ctx
        .share
        .acknowledge(&r.group, &r.topic, &r.member_id, acks)
        .await
    {
        Ok(results) => ResponseBody::ShareAck(ShareAckResponse {
            results: results
                .iter()
                .map(|r| match r {
                    Ok(()) => ErrorCode::None,
                    Err(e) => share_error_code(e),
                })
                .collect(),
        }),
        Err(e) => share_error_body(&e),
    }
}

fn denied(ctx: &Ctx, identity: &str, group: &str) -> Option<ResponseBody> {
    (!authorize(ctx, identity, Operation::Group, group)).then(|| {
        error_body(
            ErrorCode::NotAuthorized,
            not_authorized_message(identity, Operation::Group, group),
        )
    })
}

pub(crate) fn list(ctx: &Ctx, identity: &str) -> ResponseBody {
    let groups = ctx
        .share
        .list()
        .into_iter()
        .filter(|g| ctx.acl().allows(identity, Operation::Group, &g.group))
        .map(|g| ShareGroupListing {
            group: g.group,
            topics: g.topics,
            partitions: g.partitions,
            in_flight: g.in_flight,
            members: g.members,
        })
        .collect();
    ResponseBody::ListShareGroups(ListShareGroupsResponse { groups })
}

pub(crate) fn describe(ctx: &Ctx, identity: &str, group: &str) -> ResponseBody {
    if let Some(denied) = denied(ctx, identity, group) {
        return denied;
    }
    match ctx.share.describe(group) {
        Ok(d) => ResponseBody::DescribeShareGroup(DescribeShareGroupResponse {
            group: d.group,
            partitions: d
                .partitions
                .into_iter()
                .map(|p| SharePartitionState {
                    topic: p.topic,
                    partition: p.partition,
                    start: p.start,
                    next: p.next,
                    log_end: p.log_end,
                    acquired: p.acquired,
                    available: p.available,
                    done: p.done,
                    records: p
                        .records
                        .into_iter()
                        .map(|r| ShareRecordState {
                            offset: r.offset,
                            state: r.state.to_owned(),
                            delivery_count: r.delivery_count,
                            member_id: r.member,
                        })
                        .collect(),
                })
                .collect(),
            members: d
                .members
                .into_iter()
                .map(|m| ShareMember {
                    member_id: m.member_id,
                    acquired: m.acquired,
                    active_ms: m.active_ms,
                })
                .collect(),
        }),
        Err(e) => share_error_body(&e),
    }
}

pub(crate) async fn delete(ctx: &Ctx, identity: &str, group: &str) -> ResponseBody {
    if let Some(denied) = denied(ctx, identity, group) {
        return denied;
    }
    match ctx.share.delete(group).await {
        Ok(()) => ResponseBody::DeleteShareGroup(DeleteShareGroupResponse {}),
        Err(e) => share_error_body(&e),
    }
}

/// A member's leave: `group` on the share group suffices, as the member
/// may hold records of several topics.
pub(crate) fn leave(ctx: &Ctx, identity: &str, group: &str, member: &str) -> ResponseBody {
    if let Some(denied) = denied(ctx, identity, group) {
        return denied;
    }
    match ctx.share.leave(group, member) {
        Ok(released) => ResponseBody::ShareLeave(ShareLeaveResponse { released }),
        Err(e) => share_error_body(&e),
    }
}
