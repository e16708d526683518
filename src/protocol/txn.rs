//! Transactions (protocol version 3; operations 60..=69). See
//! docs/transactions.md for the design and docs/protocol.md,
//! "Transactions", for the life cycle on the wire.

use minicbor::{Decode, Encode};

use super::GroupPartition;

/// Registers a transactional id: the answer's producer id and epoch stamp
/// its batches. A new epoch fences every older instance of the id, and
/// its open transaction is aborted before the answer.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct InitTxnRequest {
    #[n(0)]
    pub transactional_id: String,
    /// An open transaction older than this is aborted by the broker.
    #[n(1)]
    pub transaction_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct InitTxnResponse {
    #[n(0)]
    pub producer_id: u64,
    #[n(1)]
    pub producer_epoch: u16,
}

/// A group's offsets, committed with the open transaction if it commits
/// (Kafka's `sendOffsetsToTransaction`).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct AddTxnOffsetsRequest {
    #[n(0)]
    pub transactional_id: String,
    #[n(1)]
    pub producer_id: u64,
    #[n(2)]
    pub producer_epoch: u16,
    #[n(3)]
    pub group: String,
    #[n(4)]
    pub offsets: Vec<TxnOffset>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TxnOffset {
    #[n(0)]
    pub topic: String,
    #[n(1)]
    pub partition: u32,
    /// The next offset the group will read.
    #[n(2)]
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct AddTxnOffsetsResponse {}

/// Commits or aborts the open transaction. Every batch of it must be
/// acknowledged first. Answered once the outcome is durable; a retry of
/// an end that completed gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct EndTxnRequest {
    #[n(0)]
    pub transactional_id: String,
    #[n(1)]
    pub producer_id: u64,
    #[n(2)]
    pub producer_epoch: u16,
    #[n(3)]
    pub commit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct EndTxnResponse {}

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct ListTxnsRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ListTxnsResponse {
    #[n(0)]
    pub transactions: Vec<TxnListing>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TxnListing {
    #[n(0)]
    pub transactional_id: String,
    #[n(1)]
    pub producer_id: u64,
    #[n(2)]
    pub producer_epoch: u16,
    /// empty, ongoing, prepare_commit, prepare_abort, complete_commit,
    /// complete_abort.
    #[n(3)]
    pub state: String,
    /// The open (or last) transaction's partitions.
    #[n(4)]
    pub partitions: Vec<GroupPartition>,
    #[n(5)]
    pub transaction_timeout_ms: u64,
}

/// What a fetch reads (`FetchRequest::isolation`; absent: read_uncommitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
#[cbor(index_only)]
pub enum Isolation {
    /// Every batch as written, open and aborted transactions included.
    #[n(0)]
    ReadUncommitted,
    /// Only below the last stable offset, without aborted transactions'
    /// records.
    #[n(1)]
    ReadCommitted,
}
