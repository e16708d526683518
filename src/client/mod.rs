//! The Rust client library: used by the CLI, the end-to-end tests and the
//! benches.
//!
//! - [`Client`]: one pipelined connection (TCP, TLS or Unix socket) with the
//!   admin calls and raw produce/fetch; reconnects when the connection dies.
//! - [`Producer`]: batches records per partition (linger, size), pipelines
//!   produce requests, retries retriable failures until a delivery timeout.
//! - [`Consumer`]: long-polling fetch loop over assigned partitions.
//! - [`GroupConsumer`]: a consumer-group member: background heartbeat,
//!   committed offsets, rebalances that commit before giving a partition up.
//! - [`ShareConsumer`]: a share-group worker (queues): records locked to
//!   it one by one, each accepted, released or rejected.
//! - [`TxnProducer`]: a transactional producer (commit, abort, offsets in
//!   the transaction).
//! - [`partitioner`]: Kafka-compatible murmur2 key hashing.
//! - [`blocking`]: the same API for synchronous callers.
//!
//! Everything is async on smol; the connection's reader and writer and the
//! producer's sender run as tasks on smol's global executor, so
//! `smol::block_on` is enough to drive a call from synchronous code.

mod accumulator;
pub mod blocking;
#[allow(
    clippy::module_inception,
    reason = "client::client holds the Client type"
)]
mod client;
mod connection;
mod consumer;
mod error;
#[cfg(test)]
mod fake_peer;
mod group;
mod outcome;
pub mod partitioner;
mod producer;
mod share;
pub(crate) mod tls;
mod txn;

pub(crate) use client::unexpected;
pub use client::{Client, ClientConfig};
pub use connection::{Address, ServerInfo};
pub use consumer::{
    Consumer, ConsumerConfig, ConsumerRecord, InvalidStartFrom, OffsetReset, Polled, RecordView,
    StartFrom,
};
pub use error::ClientError;
pub use group::{GroupConfig, GroupConsumer, RebalanceListener, TopicPartition};
pub use partitioner::Partitioner;
pub use producer::{
    Delivery, Producer, ProducerConfig, RecordMetadata, RetryHook, IDEMPOTENT_IN_FLIGHT_MAX,
};
pub use share::{Outcome, ShareConfig, ShareConsumer, SlotWaitHook};
pub use tls::{TlsConfigError, TlsOptions};
pub use txn::{TxnProducer, TRANSACTION_TIMEOUT_DEFAULT};
