//! Consumer-group requests: protocol types in, coordinator calls, protocol
//! types out. Each request is authorized as `group` on its group, and a
//! commit or offset fetch also as `consume` on each topic it names.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::broker::group::{Assignor, GroupError, JoinSpec, Tp};
use crate::protocol::{
    CommittedOffset, DeleteGroupResponse, DescribeGroupResponse, ErrorCode, GroupListing,
    GroupMember, GroupOffset, GroupPartition, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupResponse, ListGroupsResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, ResponseBody, SyncGroupResponse,
};

use super::acl::Operation;
use super::handler::{authorize, broker_error_code, error_body, not_authorized_message};
use super::Ctx;

/// The wire code of a coordinator error.
pub(crate) fn group_error_code(e: &GroupError) -> ErrorCode {
    match e {
        GroupError::UnknownGroup(_) => ErrorCode::UnknownGroup,
        GroupError::UnknownMember { .. } => ErrorCode::UnknownMemberId,
        GroupError::IllegalGeneration { .. } => ErrorCode::IllegalGeneration,
        GroupError::RebalanceInProgress(_) => ErrorCode::RebalanceInProgress,
        GroupError::NotOwner { .. } => ErrorCode::NotOwner,
        GroupError::NotEmpty { .. } => ErrorCode::GroupNotEmpty,
        GroupError::Invalid(_) => ErrorCode::InvalidRequest,
        GroupError::TooManyGroups { .. } => ErrorCode::TooManyGroups,
        GroupError::TooManyMembers { .. } => ErrorCode::TooManyMembers,
        GroupError::Broker(e) => broker_error_code(e),
    }
}

fn group_error_body(e: &GroupError) -> ResponseBody {
    error_body(group_error_code(e), e.to_string())
}

fn denied(identity: &str, op: Operation, resource: &str) -> ResponseBody {
    error_body(
        ErrorCode::NotAuthorized,
        not_authorized_message(identity, op, resource),
    )
}

fn tp(p: GroupPartition) -> Tp {
    (p.topic, p.partition)
}

fn wire(tps: impl IntoIterator<Item = Tp>) -> Vec<GroupPartition> {
    tps.into_iter()
        .map(|(topic, partition)| GroupPartition { topic, partition })
        .collect()
}

pub(crate) async fn join(ctx: &Ctx, identity: &str, r: JoinGroupRequest) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, &r.group) {
        return denied(identity, Operation::Group, &r.group);
    }
    if let Some(t) = r
        .topics
        .iter()
        .find(|t| !authorize(ctx, identity, Operation::Consume, t))
    {
        return denied(identity, Operation::Consume, t);
    }
    let Some(assignor) = Assignor::parse(&r.assignor) else {
        return error_body(
            ErrorCode::InvalidRequest,
            format!(
                "unknown assignor {:?}: range, roundrobin or cooperative-sticky",
                r.assignor
            ),
        );
    };
    let client = match r.client {
        Some(c) => format!("{c} ({identity})"),
        None => identity.to_owned(),
    };
    let spec = JoinSpec {
        group: r.group,
        member_id: r.member_id,
        instance_id: r.instance_id,
        client,
        topics: r.topics.into_iter().collect(),
        assignor,
        session_timeout: Duration::from_millis(u64::from(r.session_timeout_ms)),
        rebalance_timeout: Duration::from_millis(u64::from(r.rebalance_timeout_ms)),
        owned: r.owned.into_iter().map(tp).collect::<BTreeSet<_>>(),
    };
    match ctx.groups.join(spec).await {
        Ok(j) => ResponseBody::JoinGroup(JoinGroupResponse {
            member_id: j.member_id,
            generation: j.generation,
            assignor: j.assignor.name().to_owned(),
            members: j.members,
        }),
        Err(e) => group_error_body(&e),
    }
}

pub(crate) fn sync(
    ctx: &Ctx,
    identity: &str,
    group: &str,
    member: &str,
    generation: u32,
) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, group) {
        return denied(identity, Operation::Group, group);
    }
    match ctx.groups.sync(group, member, generation) {
        Ok(s) => ResponseBody::SyncGroup(SyncGroupResponse {
            assignment: wire(s.assignment),
            rejoin: s.rejoin,
        }),
        Err(e) => group_error_body(&e),
    }
}

pub(crate) fn heartbeat(
    ctx: &Ctx,
    identity: &str,
    group: &str,
    member: &str,
    generation: u32,
) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, group) {
        return denied(identity, Operation::Group, group);
    }
    match ctx.groups.heartbeat(group, member, generation) {
        Ok(()) => ResponseBody::Heartbeat(HeartbeatResponse {}),
        Err(e) => group_error_body(&e),
    }
}

pub(crate) fn leave(ctx: &Ctx, identity: &str, group: &str, member: &str) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, group) {
        return denied(identity, Operation::Group, group);
    }
    match ctx.groups.leave(group, member) {
        Ok(()) => ResponseBody::LeaveGroup(LeaveGroupResponse {}),
        Err(e) => group_error_body(&e),
    }
}

pub(crate) async fn commit(ctx: &Ctx, identity: &str, r: OffsetCommitRequest) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, &r.group) {
        return denied(identity, Operation::Group, &r.group);
    }
    if let Some(p) = r
        .offsets
        .iter()
        .find(|p| !authorize(ctx, identity, Operation::Consume, &p.topic))
    {
        return denied(identity, Operation::Consume, &p.topic);
    }
    let member = match (&r.member_id, r.generation) {
        (Some(m), Some(g)) => Some((m.as_str(), g)),
        (None, None) => None,
        _ => {
            return error_body(
                ErrorCode::InvalidRequest,
                "a commit names both a member id and a generation, or neither",
            )
        }
    };
    let offsets = r
        .offsets
        .into_iter()
        .map(|p| ((p.topic, p.partition), p.offset, p.metadata))
        .collect();
    match ctx.groups.commit(&r.group, member, offsets).await {
        Ok(()) => ResponseBody::OffsetCommit(OffsetCommitResponse {}),
        Err(e) => group_error_body(&e),
    }
}

pub(crate) fn fetch_offsets(ctx: &Ctx, identity: &str, r: OffsetFetchRequest) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, &r.group) {
        return denied(identity, Operation::Group, &r.group);
    }
    let asked: Option<Vec<Tp>> = r.partitions.map(|ps| ps.into_iter().map(tp).collect());
    let offsets = ctx
        .groups
        .committed(&r.group, asked.as_deref())
        .into_iter()
        // Offsets of topics the identity may not read are left out.
        .filter(|((t, _), _)| ctx.acl().allows(identity, Operation::Consume, t))
        .map(|((topic, partition), c)| CommittedOffset {
            topic,
            partition,
            offset: c.offset,
            metadata: c.metadata,
        })
        .collect();
    ResponseBody::OffsetFetch(OffsetFetchResponse { offsets })
}

pub(crate) fn list(ctx: &Ctx, identity: &str) -> ResponseBody {
    let groups = ctx
        .groups
        .list()
        .into_iter()
        .filter(|g| ctx.acl().allows(identity, Operation::Group, &g.group))
        .map(|g| GroupListing {
            group: g.group,
            state: g.state.to_owned(),
            members: g.members,
        })
        .collect();
    ResponseBody::ListGroups(ListGroupsResponse { groups })
}

pub(crate) fn describe(ctx: &Ctx, identity: &str, group: &str) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, group) {
        return denied(identity, Operation::Group, group);
    }
    match ctx.groups.describe(group) {
        Ok(d) => ResponseBody::DescribeGroup(Box::new(DescribeGroupResponse {
            group: d.group,
            state: d.state.to_owned(),
            generation: d.generation,
            assignor: d.assignor.map(|a| a.name().to_owned()),
            members: d
                .members
                .into_iter()
                .map(|m| GroupMember {
                    member_id: m.member_id,
                    instance_id: m.instance_id,
                    client: m.client,
                    assignment: wire(m.assignment),
                })
                .collect(),
            offsets: d
                .offsets
                .into_iter()
                .map(|o| GroupOffset {
                    topic: o.topic,
                    partition: o.partition,
                    committed: o.committed,
                    log_end: o.log_end,
                    lag: o.lag,
                    metadata: o.metadata,
                })
                .collect(),
        })),
        Err(e) => group_error_body(&e),
    }
}

pub(crate) async fn delete(ctx: &Ctx, identity: &str, group: &str) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, group) {
        return denied(identity, Operation::Group, group);
    }
    match ctx.groups.delete(group).await {
        Ok(()) => ResponseBody::DeleteGroup(DeleteGroupResponse {}),
        Err(e) => group_error_body(&e),
    }
}
