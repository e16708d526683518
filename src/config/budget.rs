//! The memory budget: the worst case a config lets skiff use, as a sum with
//! one line per user, so an operator sees where every byte goes before the
//! board runs out of it. Everything sized here is allocated (or bounded) at
//! start-up from the config; nothing grows beyond it under load.
//!
//! Lines marked "estimate" use per-item sizes named below; they are
//! deliberately generous and should be tightened as the owning module's
//! structures settle (a test in that module can assert
//! `size_of::<Entry>() <= PRODUCER_ENTRY_BYTES`, say).

use std::fmt;

use super::Config;

/// One append job in the storage thread's bounded channel, batch bytes not
/// included (those are counted as in-flight batches): partition id, the
/// batch's Vec header, the completion sender.
pub const APPEND_JOB_BYTES: u64 = 128;
/// Per connection besides its frame buffers: the smol task and its future,
/// the socket, session state (pending correlation ids, credit counters).
pub const CONNECTION_STATE_BYTES: u64 = 16 * 1024;
/// One producer table entry: its key (topic, partition, producer id), epoch,
/// next sequence, last-seen time, the sequence/offset window of the last 5
/// written batches and up to 5 in flight (Kafka's in-flight limit): about
/// 300 bytes, doubled because the hash table has power-of-two buckets at
/// most 7/8 full. `broker::producers` tests that it holds.
pub const PRODUCER_ENTRY_BYTES: u64 = 640;
/// The sparse offset index keeps one entry per this many segment bytes.
pub const INDEX_INTERVAL_BYTES: u64 = 64 * 1024;
/// One sparse index entry: relative offset and file position.
pub const INDEX_ENTRY_BYTES: u64 = 16;
/// Per-topic metric series: produce/fetch records and bytes.
pub const METRICS_PER_TOPIC_BYTES: u64 = 1024;
/// Per-partition metric series: group lag, mirror backlog.
pub const METRICS_PER_PARTITION_BYTES: u64 = 256;
/// Unlabelled metric families, histogram buckets included.
pub const METRICS_FIXED_BYTES: u64 = 64 * 1024;
/// The process before any config-sized pool: the resident part of the
/// binary, allocator arenas, the touched part of thread stacks, the smol
/// executor. Measured: a release binary loading the config and serving
/// the metrics endpoint idles at 3.0 MiB RSS (x86_64, 2026-11-23); 4 MiB
/// leaves room for the broker's own threads. Re-measure with `serve`.
pub const RUNTIME_BASE_BYTES: u64 = 4 * 1024 * 1024;

/// One user of memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLine {
    pub user: &'static str,
    pub bytes: u64,
    /// How `bytes` follows from the config, e.g. `256 x 1 MiB`.
    pub formula: String,
}

/// The worst-case memory of a config: the sum of its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    pub lines: Vec<BudgetLine>,
}

impl MemoryBudget {
    pub fn of(cfg: &Config) -> MemoryBudget {
        let s = &cfg.server;
        let st = &cfg.storage;
        let t = &cfg.topic_defaults;
        let connections = u64::from(s.max_connections);
        let partitions = u64::from(s.max_partitions);
        let queue = u64::from(st.append_queue_depth);

        let inflight_by_connections =
            connections.saturating_mul(s.max_inflight_bytes_per_connection);
        let inflight_by_queue = queue.saturating_mul(st.max_batch_bytes);
        let index_per_partition = u64::from(t.segments)
            .saturating_mul(t.segment_bytes)
            .div_ceil(INDEX_INTERVAL_BYTES)
            .saturating_mul(INDEX_ENTRY_BYTES);

        let line = |user, bytes, formula: String| BudgetLine {
            user,
            bytes,
            formula,
        };
        let lines = vec![
            line(
                "partition tail buffers",
                partitions.saturating_mul(st.tail_buffer_bytes),
                format!(
                    "server.max_partitions {} x storage.tail_buffer_bytes {}",
                    partitions,
                    human(st.tail_buffer_bytes)
                ),
            ),
            line(
                "connection read buffers",
                connections.saturating_mul(s.max_frame_bytes),
                format!(
                    "server.max_connections {} x server.max_frame_bytes {} (a whole frame is buffered before decode)",
                    connections,
                    human(s.max_frame_bytes)
                ),
            ),
            line(
                "connection write buffers",
                connections.saturating_mul(s.max_frame_bytes),
                format!(
                    "server.max_connections {} x server.max_frame_bytes {} (one response frame being sent)",
                    connections,
                    human(s.max_frame_bytes)
                ),
            ),
            line(
                "in-flight produce batches",
                inflight_by_connections.min(inflight_by_queue),
                format!(
                    "min(connections {} x max_inflight_bytes_per_connection {}, append_queue_depth {} x max_batch_bytes {})",
                    connections,
                    human(s.max_inflight_bytes_per_connection),
                    queue,
                    human(st.max_batch_bytes)
                ),
            ),
            {
                let (buffers, largest) = cfg.batch_pool_bounds();
                line(
                    "recycled batch buffers",
                    crate::bufpool::bytes_max(buffers, largest),
                    format!(
                        "min({}, storage.append_queue_depth {queue}) x storage.max_batch_bytes {} (rounded up to 64 KiB), kept for the next batches",
                        crate::bufpool::BUFFERS_DEFAULT,
                        human(st.max_batch_bytes)
                    ),
                )
            },
            line(
                "storage I/O buffers",
                crate::storage::thread_buffer_bytes(
                    usize::try_from(st.max_batch_bytes).unwrap_or(usize::MAX / 4),
                ) as u64,
                format!(
                    "read window and {} read-ahead spares {} x (storage.max_batch_bytes {}, at least 256 KiB, + 4 KiB), zeros 256 KiB",
                    crate::storage::io::READ_AHEAD_SLOTS,
                    1 + crate::storage::io::READ_AHEAD_SLOTS,
                    human(st.max_batch_bytes)
                ),
            ),
            line(
                "append queue slots",
                queue.saturating_mul(APPEND_JOB_BYTES),
                format!("storage.append_queue_depth {queue} x {APPEND_JOB_BYTES} B per job"),
            ),
            line(
                "connection state (estimate)",
                connections.saturating_mul(CONNECTION_STATE_BYTES),
                format!(
                    "server.max_connections {} x {} per session",
                    connections,
                    human(CONNECTION_STATE_BYTES)
                ),
            ),
            line(
                "producer table (estimate)",
                u64::from(cfg.producers.max_producers).saturating_mul(PRODUCER_ENTRY_BYTES),
                format!(
                    "producers.max_producers {} x {PRODUCER_ENTRY_BYTES} B per entry",
                    cfg.producers.max_producers
                ),
            ),
            line(
                "sparse offset indexes (estimate)",
                partitions.saturating_mul(index_per_partition),
                format!(
                    "server.max_partitions {} x {} (topic_defaults ring {} x {}, one {INDEX_ENTRY_BYTES} B entry per {})",
                    partitions,
                    human(index_per_partition),
                    t.segments,
                    human(t.segment_bytes),
                    human(INDEX_INTERVAL_BYTES)
                ),
            ),
            line(
                "metrics registry (estimate)",
                u64::from(s.max_topics)
                    .saturating_mul(METRICS_PER_TOPIC_BYTES)
                    .saturating_add(partitions.saturating_mul(METRICS_PER_PARTITION_BYTES))
                    .saturating_add(METRICS_FIXED_BYTES),
                format!(
                    "server.max_topics {} x {METRICS_PER_TOPIC_BYTES} B + partitions x {METRICS_PER_PARTITION_BYTES} B + {}",
                    s.max_topics,
                    human(METRICS_FIXED_BYTES)
                ),
            ),
            line(
                "runtime base (estimate)",
                RUNTIME_BASE_BYTES,
                "binary, allocator, thread stacks, executor".to_string(),
            ),
        ];
        MemoryBudget { lines }
    }

    pub fn total_bytes(&self) -> u64 {
        self.lines
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.bytes))
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# memory budget (worst case; every pool is sized at start-up)"
        )?;
        for l in &self.lines {
            writeln!(f, "# {:>10}  {:<34} {}", human(l.bytes), l.user, l.formula)?;
        }
        writeln!(f, "# {:>10}  total", human(self.total_bytes()))
    }
}

/// Bytes in the largest binary unit that keeps the number readable.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while unit + 1 < UNITS.len() && whole >= 1024 {
        whole /= 1024;
        unit += 1;
    }
    let divisor = 1u64 << (10 * unit);
    if bytes % divisor == 0 {
        format!("{} {}", bytes / divisor, UNITS[unit])
    } else {
        // Precision only matters to the reader, never to a computation.
        #[allow(clippy::cast_precision_loss)]
        let value = bytes as f64 / divisor as f64;
        format!("{value:.1} {}", UNITS[unit])
    }
}
