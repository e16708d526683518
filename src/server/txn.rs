//! Transaction requests: protocol types in, coordinator calls, protocol
//! types out. init, end and list need `produce` on some topic (as
//! init_producer does); offsets in a transaction need `group` on the group
//! and `consume` on each topic, as a commit does.

use crate::broker::txn::TxnError;
use crate::protocol::{
    AddTxnOffsetsRequest, AddTxnOffsetsResponse, EndTxnRequest, EndTxnResponse, ErrorCode,
    GroupPartition, InitTxnRequest, InitTxnResponse, ListTxnsResponse, ResponseBody, TxnListing,
};

use super::acl::Operation;
use super::groups::group_error_code;
use super::handler::{
    authorize, broker_error_code, error_body, not_authorized_message, produce_nowhere_body,
};
use super::Ctx;

/// The wire code of a coordinator error.
pub(crate) fn txn_error_code(e: &TxnError) -> ErrorCode {
    match e {
        TxnError::Fenced { .. } | TxnError::FencedId { .. } => ErrorCode::FencedProducer,
        TxnError::InvalidState(_) => ErrorCode::InvalidTxnState,
        TxnError::TooManyOpen { .. } => ErrorCode::ConcurrentTransactions,
        TxnError::TooManyIds { .. } => ErrorCode::TooManyTransactionalIds,
        TxnError::Invalid(_) => ErrorCode::InvalidRequest,
        TxnError::TooManyAborted { .. } => ErrorCode::TooManyAbortedTransactions,
        // The log's error says whether a retry can help (storage_failed:
        // not before a restart); the message, that the transaction ended.
        TxnError::Unrecorded { error, .. } | TxnError::Broker(error) => broker_error_code(error),
        TxnError::Group(e) => group_error_code(e),
    }
}

fn txn_error_body(e: &TxnError) -> ResponseBody {
    error_body(txn_error_code(e), e.to_string())
}

fn may_produce(ctx: &Ctx, identity: &str) -> Option<ResponseBody> {
    if ctx.acl().allows_somewhere(identity, Operation::Produce) {
        return None;
    }
    ctx.denials.denied(identity, Operation::Produce, "*");
    Some(produce_nowhere_body(identity))
}

pub(crate) async fn init(ctx: &Ctx, identity: &str, r: InitTxnRequest) -> ResponseBody {
    if let Some(denied) = may_produce(ctx, identity) {
        return denied;
    }
    match ctx
        .txns
        .init(&r.transactional_id, r.transaction_timeout_ms)
        .await
    {
        Ok((producer_id, producer_epoch)) => ResponseBody::InitTxn(InitTxnResponse {
            producer_id,
            producer_epoch,
        }),
        Err(e) => txn_error_body(&e),
    }
}

pub(crate) async fn add_offsets(
    ctx: &Ctx,
    identity: &str,
    r: AddTxnOffsetsRequest,
) -> ResponseBody {
    if !authorize(ctx, identity, Operation::Group, &r.group) {
        return error_body(
            ErrorCode::NotAuthorized,
            not_authorized_message(identity, Operation::Group, &r.group),
        );
    }
    if let Some(o) = r
        .offsets
        .iter()
        .find(|o| !authorize(ctx, identity, Operation::Consume, &o.topic))
    {
        return error_body(
            ErrorCode::NotAuthorized,
            not_authorized_message(identity, Operation::Consume, &o.topic),
        );
    }
    let offsets = r
        .offsets
        .into_iter()
        .map(|o| ((o.topic, o.partition), o.offset))
        .collect();
    match ctx
        .txns
        .add_offsets(
            &r.transactional_id,
            r.producer_id,
            r.producer_epoch,
            &r.group,
            offsets,
        )
        .await
    {
        Ok(()) => ResponseBody::AddTxnOffsets(AddTxnOffsetsResponse {}),
        Err(e) => txn_error_body(&e),
    }
}

pub(crate) async fn end(ctx: &Ctx, identity: &str, r: EndTxnRequest) -> ResponseBody {
    if let Some(denied) = may_produce(ctx, identity) {
        return denied;
    }
    match ctx
        .txns
        .end(
            &r.transactional_id,
            r.producer_id,
            r.producer_epoch,
            r.commit,
        )
        .await
    {
        Ok(()) => ResponseBody::EndTxn(EndTxnResponse {}),
        Err(e) => txn_error_body(&e),
    }
}

pub(crate) async fn list(ctx: &Ctx, identity: &str) -> ResponseBody {
    if let Some(denied) = may_produce(ctx, identity) {
        return denied;
    }
    let transactions = ctx
        .txns
        .describe()
        .await
        .into_iter()
        .map(|d| TxnListing {
            transactional_id: d.id,
            producer_id: d.producer_id,
            producer_epoch: d.producer_epoch,
            state: d.phase.to_owned(),
            partitions: d
                .partitions
                .into_iter()
                .map(|(topic, partition)| GroupPartition { topic, partition })
                .collect(),
            transaction_timeout_ms: d.timeout_ms,
        })
        .collect();
    ResponseBody::ListTxns(ListTxnsResponse { transactions })
}
