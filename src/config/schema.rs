//! The config schema (one struct per TOML table) and its validation beyond
//! types. Field docs are the short form of docs/configuration.md.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Alignment of segment and tail sizes: the O_DIRECT block. Equal to
/// `storage::BLOCK_BYTES` (kept local so config does not depend on storage).
pub const BLOCK_BYTES: u64 = 4096;
/// Smallest segment: below this the per-segment header and index overheads
/// dominate and a ring turns over too fast to be useful.
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;
/// A ring needs one segment being written and one being the oldest.
pub const SEGMENTS_MIN: u32 = 2;
/// Upper bound on segments per partition: each is an open-able file and a
/// slot in the partition's in-memory segment table.
pub const SEGMENTS_MAX: u32 = 4096;
/// Room in a frame around the largest batch: the CBOR envelope, topic name,
/// partition, producer fields. A frame must carry one whole batch.
pub const FRAME_OVERHEAD_BYTES_MIN: u64 = 4096;
/// Frames are length-prefixed with a u32; keep far below it so a corrupt
/// length cannot ask for gigabytes.
pub const MAX_FRAME_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
/// The smallest useful batch: one batch header and a few small records.
pub const MAX_BATCH_BYTES_MIN: u64 = 1024;
/// File descriptors: systemd's LimitNOFILE=65536 leaves room for segment
/// files beside this many connections.
pub const MAX_CONNECTIONS_LIMIT: u32 = 16384;
pub const MAX_TOPICS_LIMIT: u32 = 65536;
pub const MAX_PARTITIONS_LIMIT: u32 = 65536;
/// The storage thread's bounded channel; beyond this, latency, not
/// throughput, grows.
pub const APPEND_QUEUE_DEPTH_MAX: u32 = 65536;
pub const MAX_PRODUCERS_LIMIT: u32 = 1 << 20;

/// The whole config. Field order is TOML order: plain keys before tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where topics, checkpoints and producer state live.
    pub data_dir: PathBuf,
    /// The device profile layered under the config file, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub server: ServerConfig,
    pub storage: StorageSection,
    pub topic_defaults: TopicDefaults,
    pub producers: ProducersConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP listen address `IP:PORT`; "" disables TCP.
    pub listen: String,
    /// Unix socket path; "" disables it.
    pub unix_socket: String,
    pub max_connections: u32,
    pub max_frame_bytes: u64,
    pub max_inflight_bytes_per_connection: u64,
    pub max_topics: u32,
    /// Total across all topics; storage pools are sized from it.
    pub max_partitions: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(with = "as_text")]
    pub backend: StorageBackend,
    pub append_queue_depth: u32,
    /// Aligned in-memory tail per partition.
    pub tail_buffer_bytes: u64,
    pub max_batch_bytes: u64,
    /// Zero each new segment once, in the background, so its first writes
    /// do not convert unwritten extents (a journal commit per fdatasync).
    pub prewrite_segments: bool,
    /// Write the next group while a group's fdatasync runs, instead of
    /// fdatasyncing on the storage thread.
    pub pipelined_fsync: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDefaults {
    pub partitions: u32,
    pub segment_bytes: u64,
    pub segments: u32,
    /// 0 = size retention only.
    pub retention_ms: u64,
    #[serde(with = "as_text")]
    pub fsync: FsyncPolicy,
    #[serde(with = "as_text")]
    pub overflow: OverflowPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducersConfig {
    /// Capacity of the fixed producer table.
    pub max_producers: u32,
    pub idle_expiry_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// HTTP listen address for /metrics, /health, /ready; "" = off.
    pub listen: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// env_logger filter (`info`, `warn,skiff::storage=debug`); RUST_LOG wins.
    pub level: String,
}

/// `storage.backend`, `topic_defaults.fsync` and `topic_defaults.overflow`
/// are the storage engine's own types, written in TOML as their text
/// (`"auto"`, `"interval:5"`, `"reject"`): one parser for config files,
/// the wire and the CLI.
pub use crate::storage::{
    BackendChoice as StorageBackend, Durability as FsyncPolicy, OverflowPolicy,
};

/// Serde for types whose config form is their `Display`/`FromStr` text.
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| serde::de::Error::custom(format!("'{text}': {e}")))
    }
}

const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A validation failure: the dotted key and why.
pub type Invalid = (&'static str, String);

fn check(ok: bool, key: &'static str, reason: impl FnOnce() -> String) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err((key, reason()))
    }
}

fn check_addr(key: &'static str, value: &str) -> Result<Option<SocketAddr>, Invalid> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse::<SocketAddr>().map(Some).map_err(|_| {
        (
            key,
            format!("'{value}' is not an IP:PORT socket address (names are not resolved)"),
        )
    })
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<(), Invalid> {
    check(value >= min && value <= max, key, || {
        format!("{value} is out of range {min}..={max}")
    })
}

fn check_aligned(key: &'static str, value: u64) -> Result<(), Invalid> {
    check(value % BLOCK_BYTES == 0, key, || {
        format!("{value} is not a multiple of {BLOCK_BYTES} (the O_DIRECT block)")
    })
}

impl Config {
    /// Checks beyond types: ranges, alignment, relations between keys.
    /// Returns the first failure with the dotted key it concerns.
    pub fn validate(&self) -> Result<(), Invalid> {
        let s = &self.server;
        let st = &self.storage;
        let t = &self.topic_defaults;

        check(!self.data_dir.as_os_str().is_empty(), "data_dir", || {
            "must not be empty".to_string()
        })?;

        let tcp = check_addr("server.listen", &s.listen)?;
        check(
            tcp.is_some() || !s.unix_socket.is_empty(),
            "server.listen",
            || "both server.listen and server.unix_socket are empty: no way to reach skiff".into(),
        )?;
        check_range(
            "server.max_connections",
            s.max_connections,
            1,
            MAX_CONNECTIONS_LIMIT,
        )?;
        check_range(
            "storage.max_batch_bytes",
            st.max_batch_bytes,
            MAX_BATCH_BYTES_MIN,
            MAX_FRAME_BYTES_LIMIT - FRAME_OVERHEAD_BYTES_MIN,
        )?;
        check_range(
            "server.max_frame_bytes",
            s.max_frame_bytes,
            st.max_batch_bytes + FRAME_OVERHEAD_BYTES_MIN,
            MAX_FRAME_BYTES_LIMIT,
        )
        .map_err(|(k, r)| {
            (
                k,
                format!(
                    "{r}: a frame must hold storage.max_batch_bytes + {FRAME_OVERHEAD_BYTES_MIN}"
                ),
            )
        })?;
        check(
            s.max_inflight_bytes_per_connection >= s.max_frame_bytes,
            "server.max_inflight_bytes_per_connection",
            || {
                format!(
                    "{} is less than server.max_frame_bytes ({}): one frame must fit",
                    s.max_inflight_bytes_per_connection, s.max_frame_bytes
                )
            },
        )?;
        check_range("server.max_topics", s.max_topics, 1, MAX_TOPICS_LIMIT)?;
        check_range(
            "server.max_partitions",
            s.max_partitions,
            s.max_topics,
            MAX_PARTITIONS_LIMIT,
        )
        .map_err(|(k, r)| (k, format!("{r}: every topic has at least one partition")))?;

        check_range(
            "storage.append_queue_depth",
            st.append_queue_depth,
            1,
            APPEND_QUEUE_DEPTH_MAX,
        )?;
        check_aligned("storage.tail_buffer_bytes", st.tail_buffer_bytes)?;
        check(
            st.tail_buffer_bytes >= BLOCK_BYTES,
            "storage.tail_buffer_bytes",
            || {
                format!(
                    "{} is less than one block ({BLOCK_BYTES})",
                    st.tail_buffer_bytes
                )
            },
        )?;

        check_range(
            "topic_defaults.partitions",
            t.partitions,
            1,
            s.max_partitions,
        )?;
        check_aligned("topic_defaults.segment_bytes", t.segment_bytes)?;
        check(
            t.segment_bytes >= SEGMENT_BYTES_MIN,
            "topic_defaults.segment_bytes",
            || {
                format!(
                    "{} is less than the minimum {SEGMENT_BYTES_MIN}",
                    t.segment_bytes
                )
            },
        )?;
        check(
            t.segment_bytes >= st.max_batch_bytes + BLOCK_BYTES,
            "topic_defaults.segment_bytes",
            || {
                format!(
                    "{} cannot hold one storage.max_batch_bytes batch ({}) plus a segment header block",
                    t.segment_bytes, st.max_batch_bytes
                )
            },
        )?;
        check_range(
            "topic_defaults.segments",
            t.segments,
            SEGMENTS_MIN,
            SEGMENTS_MAX,
        )?;

        check_range(
            "producers.max_producers",
            self.producers.max_producers,
            1,
            MAX_PRODUCERS_LIMIT,
        )?;
        check(
            self.producers.idle_expiry_ms > 0,
            "producers.idle_expiry_ms",
            || "must be > 0 (an expiry of 0 would forget every producer at once)".into(),
        )?;

        let metrics = check_addr("metrics.listen", &self.metrics.listen)?;
        check(
            metrics.is_none() || metrics != tcp,
            "metrics.listen",
            || format!("'{}' is also server.listen", self.metrics.listen),
        )?;

        for directive in self.log.level.split(',').map(str::trim) {
            let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
            check(
                LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()),
                "log.level",
                || {
                    format!(
                        "'{directive}' is not a level ({}) or module=level",
                        LOG_LEVELS.join(", ")
                    )
                },
            )?;
        }
        Ok(())
    }

    /// `topic_defaults.retention_ms` as a time retention; None = size only.
    pub fn default_retention(&self) -> Option<Duration> {
        match self.topic_defaults.retention_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The TCP listen address, None when TCP is disabled. Validated on load.
    pub fn tcp_listen(&self) -> Option<SocketAddr> {
        self.server.listen.parse().ok()
    }

    /// The unix socket path, None when disabled.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        (!self.server.unix_socket.is_empty()).then(|| PathBuf::from(&self.server.unix_socket))
    }

    /// The metrics listen address, None when the endpoint is off.
    pub fn metrics_listen(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }
}
