//! skiff: a lean, single-binary message broker for ARM gateways.
//!
//! Map of the crate (dependencies point downwards only):
//!
//! - [`batch`]: the record batch format, the unit that is produced, stored,
//!   and fetched as the same bytes. Shared by every other room.
//! - [`bufpool`]: recycled buffers for produce batches: the server's pool,
//!   and the buffer type that goes back to it when storage drops it.
//! - [`storage`]: the log engine: segment rings, I/O backends (io_uring,
//!   pwrite, fault-injecting), recovery. Knows nothing about the network.
//! - [`broker`]: topics and partitions on top of storage; producer dedup.
//!   The one door to storage: produce, fetch and admin all go through it.
//! - [`protocol`]: CBOR frames and wire types; sans-IO.
//! - [`server`]: listeners and per-connection sessions (smol).
//! - [`client`]: the Rust client library used by the CLI, tests and benches.
//! - [`mirror`]: forwarding to a central Kafka cluster; its Kafka
//!   wire-protocol client (`mirror::kafka`).
//! - [`config`]: the TOML schema, embedded default, device profiles.
//! - [`metrics`]: counters, histograms, the Prometheus/health endpoint.
//! - [`cli`]: the commands behind `main.rs`.
//! - [`offload`]: the one thread for blocking jobs of the async side
//!   (registry and snapshot writes).
//!
//! `main.rs` only parses the command line and calls into this library.

pub mod batch;
pub mod broker;
pub mod bufpool;
pub mod cli;
pub mod client;
pub mod config;
pub mod fdlimit;
pub mod metrics;
pub mod mirror;
pub mod notify;
pub mod offload;
pub mod protocol;
pub mod server;
pub mod sockets;
pub mod storage;
