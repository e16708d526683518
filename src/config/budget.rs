//! The memory budget: the worst case a config lets skiff use, as a sum with
//! one line per user, so an operator sees where every byte goes before the
//! board runs out of it. Everything sized here is allocated (or bounded) at
//! start-up from the config, or when a topic is created within the config's
//! limits; nothing grows beyond it under load.
//!
//! Storage's lines come from storage's own functions
//! ([`crate::storage::ring_memory_bytes`] and its neighbours), which compute
//! them from the engine's structures and constants, so they follow the
//! engine when it changes. Lines marked "estimate" use per-item sizes named
//! below; they are deliberately generous, and `tests/memory_budget.rs` holds
//! the sum above the RSS of a broker filled to its limits
//! (`tests/coordinator_memory.rs` the coordinators' lines above their heap).

use std::fmt;

use super::Config;

/// Per connection besides its frame buffers: the smol task and its future,
/// the socket, session state (pending correlation ids, credit counters).
pub const CONNECTION_STATE_BYTES: u64 = 16 * 1024;
/// One producer table entry: its key (topic, partition, producer id), epoch,
/// next sequence, last-seen time, the sequence/offset window of the last 5
/// written batches and up to 5 in flight (Kafka's in-flight limit): about
/// 300 bytes, doubled because the hash table has power-of-two buckets at
/// most 7/8 full. `broker::producers` tests that it holds.
pub const PRODUCER_ENTRY_BYTES: u64 = 640;
/// Per-topic metric series: produce/fetch records and bytes.
pub const METRICS_PER_TOPIC_BYTES: u64 = 1024;
/// Per-partition metric series: group lag, mirror backlog.
pub const METRICS_PER_PARTITION_BYTES: u64 = 256;
/// Unlabelled metric families, histogram buckets included.
pub const METRICS_FIXED_BYTES: u64 = 64 * 1024;
/// The process before any config-sized pool: the resident part of the
/// binary, allocator arenas, the touched part of thread stacks, the smol
/// executor. Measured: a stripped release build idles at 5.0 MiB RSS under
/// glibc and 3.0 MiB under musl (x86_64, docs/performance.md); 6 MiB leaves
/// room for the broker's own threads. Debug builds map more of their larger
/// binary; `tests/memory_budget.rs` measures that instead.
pub const RUNTIME_BASE_BYTES: u64 = 6 * 1024 * 1024;
/// Per network thread: the touched part of its stack, and the allocator
/// arena glibc gives each thread, which keeps some of what connections on
/// that thread freed. Measured: a broker filled to its limits took 1.9 MiB
/// more with 4 threads than with 1 (`tests/memory_budget.rs`).
pub const NETWORK_THREAD_BYTES: u64 = 1024 * 1024;
/// One id in a topic's message-id window: its hash and time in the order
/// queue (16 B) and its hash-table entry (16 B, in power-of-two buckets at
/// most 7/8 full).
pub const MSG_ID_BYTES_PER_ID: u64 = 40;

/// What rustls buffers for one TLS connection once its handshake is done,
/// at most: a received record (16 KiB of payload, 2 KiB of expansion, a
/// header), 64 KiB of records waiting to be sent (rustls's buffer limit)
/// and one more record past it, 64 KiB of decrypted bytes not read yet,
/// and 8 KiB of keys and state. Before the handshake is done a connection
/// holds less than this: its handshake messages are joined in at most
/// 64 KiB + 4 KiB ([`TLS_HANDSHAKE_BYTES_MAX`]) and the session's own
/// buffers are not allocated until the client is authenticated.
pub const TLS_CONNECTION_BYTES: u64 = 18 * 1024 + 64 * 1024 + 18 * 1024 + 64 * 1024 + 8 * 1024;
/// What an unauthenticated TLS connection may make skiff allocate: rustls
/// joins handshake messages (a client's certificate chain) of up to
/// 64 KiB, read 4 KiB at a time.
pub const TLS_HANDSHAKE_BYTES_MAX: u64 = 64 * 1024 + 4 * 1024;
const _: () = assert!(TLS_HANDSHAKE_BYTES_MAX <= TLS_CONNECTION_BYTES);
/// One entry of the TLS session cache (`server::tls::SESSION_CACHE_ENTRIES`):
/// a session id or ticket and the secrets to resume it.
pub const TLS_SESSION_BYTES: u64 = 1024;

/// One record in a share window: its entry in the window's map (offset,
/// state, lock holder, delivery count: under 100 B) in tree nodes that
/// may be under half full, and the worker's reason kept for its
/// dead-letter record (at most [`SHARE_KEPT_REASON_BYTES`]) with the
/// allocator's rounding. `broker::share` tests that it holds.
pub const SHARE_WINDOW_RECORD_BYTES: u64 = 272;
/// A released record's reason is kept, cut to this, until it is delivered
/// again or dead-lettered.
pub const SHARE_KEPT_REASON_BYTES: usize = 64;
/// One share partition besides its records: its key (group and topic ids,
/// up to 255 B each) and state, in the coordinator's map.
pub const SHARE_PARTITION_BYTES: u64 = 1024;
/// One active share member: its group and member ids (up to 255 B each)
/// and deadline, in the coordinator's map, with the allocator's rounding.
pub const SHARE_MEMBER_BYTES: u64 = 768;

/// One consumer group besides its members and offsets: its name (up to
/// 255 B) and state in the coordinator's map, with the allocator's
/// rounding. `tests/coordinator_memory.rs` measures the group lines.
pub const GROUP_BYTES: u64 = 1024;
/// One committed offset besides its metadata (up to
/// `groups.max_offset_metadata_bytes`, counted beside this): its entry in
/// the group's map (partition, offset, time) in tree nodes that may be
/// under half full, its own copy of the topic name (up to 249 B), the
/// allocator's rounding of both.
pub const GROUP_OFFSET_BYTES: u64 = 768;
/// One partition a member holds or is assigned (a group counts each
/// partition at most twice: the old owner's and the new one's): the tree
/// entry and its copy of the topic name.
pub const GROUP_HELD_PARTITION_BYTES: u64 = 384;
/// One member besides its subscription: its entry in the group's map, its
/// id, instance id (up to 255 B) and client name (up to 512 B).
pub const GROUP_MEMBER_BYTES: u64 = 2048;
/// One topic of a member's subscription: the tree entry and the name (up
/// to 249 B; it need not exist yet).
pub const GROUP_SUBSCRIBED_TOPIC_BYTES: u64 = 384;
/// One transactional id besides its partitions: its state behind an async
/// mutex in an `Arc`, in two hash maps (by id and by producer id), the id
/// (up to 245 B), and the fields of its last durable record that the
/// log's rewrite keeps (no partitions or offsets but a prepared commit's,
/// while it completes).
pub const TXN_ID_BYTES: u64 = 1024;
/// One partition of an open transaction: the record's entry and its copy
/// of the topic name, and the partition's open-transaction entry in the
/// read_committed index.
pub const TXN_PARTITION_BYTES: u64 = 768;
/// One group offset a transaction carries until it ends: group id (up to
/// 255 B), topic name and the entry.
pub const TXN_OFFSET_BYTES: u64 = 640;
/// One aborted transaction's range on a partition, kept for
/// read_committed readers: 24 B in its partition's list, grown exactly
/// (the list's own allocation is in the partition's index entry, in
/// [`TXN_PARTITION_BYTES`]). The coordinator keeps at most
/// [`crate::broker::txn::ABORTED_RANGES_MAX`], what its log holds.
pub const TXN_ABORTED_RANGE_BYTES: u64 = 24;

/// Copies of a transaction's worth of data the mirror holds at once: the
/// local fetch answer, the records re-encoded for Kafka, and the finished
/// (compressed) batches on their way out.
pub const MIRROR_BATCH_COPIES: u64 = 3;
/// The mirror's memory beyond its batches: one checkpoint fetch answer
/// (`kafka::reader`'s 1 MiB), connection buffers, per-partition cursors.
pub const MIRROR_FIXED_BYTES: u64 = 1024 * 1024 + 256 * 1024;

/// One open aggregate window besides its fields, with a key of up to 32
/// bytes: the window, its key in the partition's map and in the close
/// order, the maps' overhead (benches/aggregate.rs measures it).
pub const MIRROR_WINDOW_BYTES: u64 = 336;
/// One field's figures in a window.
pub const MIRROR_WINDOW_FIELD_BYTES: u64 = 40;

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
    /// Memory a topic can ask for at creation that no config key bounds:
    /// the largest message-id window, per topic that enables one.
    pub msg_id_window_bytes_max: u64,
}

/// Users that exist only once the broker serves: the start-up recovery
/// buffer is freed before any of them is allocated.
const SERVING_ONLY: [&str; 6] = [
    "TLS connection buffers",
    "connection read buffers",
    "connection write buffers",
    "in-flight requests and answers",
    "recycled batch buffers",
    "connection state (estimate)",
];

impl MemoryBudget {
    pub fn of(cfg: &Config) -> MemoryBudget {
        let s = &cfg.server;
        let st = &cfg.storage;
        let connections = u64::from(s.max_connections);
        let partitions = u64::from(s.max_partitions);
        let queue = u64::from(st.append_queue_depth);
        let max_batch = usize::try_from(st.max_batch_bytes).unwrap_or(usize::MAX / 8);

        let tail = crate::storage::tail_buffer_alloc_bytes(st.tail_buffer_bytes);

        let line = |user, bytes, formula: String| BudgetLine {
            user,
            bytes,
            formula,
        };
        let mut lines = vec![
            line(
                "partition tail buffers",
                partitions.saturating_mul(tail),
                format!(
                    "server.max_partitions {} x (storage.tail_buffer_bytes {} + a 4 KiB carry-over block)",
                    partitions,
                    human(st.tail_buffer_bytes)
                ),
            ),
            line(
                "partition rings",
                crate::storage::rings_memory_bytes_max(st.disk_budget_bytes, s.max_partitions),
                format!(
                    "segment tables and sparse indexes of storage.disk_budget_bytes {} cut into the smallest segments ({}), over server.max_partitions {}",
                    human(st.disk_budget_bytes),
                    human(crate::storage::SEGMENT_BYTES_MIN),
                    partitions
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
                "in-flight requests and answers",
                connections
                    .saturating_mul(s.max_inflight_bytes_per_connection)
                    .saturating_add(s.max_inflight_bytes_shared),
                format!(
                    "server.max_connections {} x server.max_inflight_bytes_per_connection {}{} (requests being handled, produce batches included, and the room held for their answers until written)",
                    connections,
                    human(s.max_inflight_bytes_per_connection),
                    match s.max_inflight_bytes_shared {
                        0 => String::new(),
                        shared => format!(" + server.max_inflight_bytes_shared {}", human(shared)),
                    },
                ),
            ),
            {
                let bounds = cfg.batch_pool_bounds();
                line(
                    "recycled batch buffers",
                    bounds.bytes_max as u64,
                    format!(
                        "min({}, storage.append_queue_depth {queue}) x storage.max_batch_bytes {} (rounded up to 64 KiB), kept for the next batches",
                        crate::bufpool::BUFFERS_DEFAULT,
                        human(st.max_batch_bytes)
                    ),
                )
            },
            line(
                "storage I/O buffers",
                crate::storage::thread_buffer_bytes(max_batch) as u64,
                format!(
                    "read window and {} read-ahead spares {} x (storage.max_batch_bytes {}, at least 256 KiB, + 4 KiB), zeros 256 KiB",
                    crate::storage::io::READ_AHEAD_SLOTS,
                    1 + crate::storage::io::READ_AHEAD_SLOTS,
                    human(st.max_batch_bytes)
                ),
            ),
            line(
                "append queue",
                crate::storage::append_queue_bytes(cfg.append_queue_jobs()),
                format!(
                    "{} x {} per job (batch bytes are in flight above)",
                    if cfg.append_queue_jobs() > st.append_queue_depth {
                        format!("server.max_connections {connections} (above storage.append_queue_depth {queue}: a job per connection)")
                    } else {
                        format!("storage.append_queue_depth {queue}")
                    },
                    human(crate::storage::append_queue_bytes(1))
                ),
            ),
            line(
                "fetch queue",
                crate::storage::read_queue_bytes(),
                format!(
                    "{} x {} per fetch waiting for the storage thread",
                    crate::storage::READ_QUEUE_DEPTH,
                    human(crate::storage::append_queue_bytes(1))
                ),
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
                "fan-in producers",
                crate::storage::fanin_bytes(s.max_connections as usize) as u64,
                format!(
                    "server.max_connections {} x 4 B and a bit (a producer each, for group commit)",
                    s.max_connections
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
                "network threads (estimate)",
                NETWORK_THREAD_BYTES * super::NETWORK_THREADS_MAX as u64,
                format!(
                    "up to {} executor threads x {} (stack, allocator arena)",
                    super::NETWORK_THREADS_MAX,
                    human(NETWORK_THREAD_BYTES)
                ),
            ),
            line(
                "compaction",
                cfg.compaction
                    .key_map_bytes
                    .saturating_add(crate::storage::compact_buffer_bytes(max_batch) as u64)
                    .saturating_add(2 * crate::storage::compact_write_bytes_max(max_batch) as u64),
                format!(
                    "compaction.key_map_bytes {} + the storage thread's scratch buffer + the cleaner's read and write chunks",
                    human(cfg.compaction.key_map_bytes)
                ),
            ),
            {
                let sh = &cfg.share;
                line(
                    "share windows (estimate)",
                    u64::from(sh.max_share_partitions).saturating_mul(
                        SHARE_PARTITION_BYTES.saturating_add(
                            u64::from(sh.max_in_flight_records)
                                .saturating_mul(SHARE_WINDOW_RECORD_BYTES),
                        ),
                    ),
                    format!(
                        "share.max_share_partitions {} x ({SHARE_PARTITION_BYTES} B + share.max_in_flight_records {} x {SHARE_WINDOW_RECORD_BYTES} B)",
                        sh.max_share_partitions, sh.max_in_flight_records
                    ),
                )
            },
            line(
                "share members",
                u64::from(cfg.share.max_active_members).saturating_mul(SHARE_MEMBER_BYTES),
                format!(
                    "share.max_active_members {} x {SHARE_MEMBER_BYTES} B",
                    cfg.share.max_active_members
                ),
            ),
            {
                let g = &cfg.groups;
                // The metadata's allocation: its bytes and malloc's header,
                // rounded.
                let metadata = match g.max_offset_metadata_bytes {
                    0 => 0,
                    n => (u64::from(n) + 8).next_multiple_of(16),
                };
                let per_group = GROUP_BYTES.saturating_add(partitions.saturating_mul(
                    GROUP_OFFSET_BYTES + metadata + 2 * GROUP_HELD_PARTITION_BYTES,
                ));
                let per_member = GROUP_MEMBER_BYTES.saturating_add(
                    u64::from(s.max_topics).saturating_mul(GROUP_SUBSCRIBED_TOPIC_BYTES),
                );
                line(
                    "consumer groups (estimate)",
                    u64::from(g.max_groups)
                        .saturating_mul(per_group)
                        .saturating_add(u64::from(g.max_members).saturating_mul(per_member)),
                    format!(
                        "groups.max_groups {} x ({} + server.max_partitions {partitions} x ({GROUP_OFFSET_BYTES} B + groups.max_offset_metadata_bytes {} an offset, 2 x {GROUP_HELD_PARTITION_BYTES} B held)) + groups.max_members {} x ({} + server.max_topics {} x {GROUP_SUBSCRIBED_TOPIC_BYTES} B subscribed)",
                        g.max_groups,
                        human(GROUP_BYTES),
                        g.max_offset_metadata_bytes,
                        g.max_members,
                        human(GROUP_MEMBER_BYTES),
                        s.max_topics,
                    ),
                )
            },
            {
                let t = &cfg.transactions;
                let ids = u64::from(t.max_transactional_ids);
                let open = u64::from(t.max_open);
                line(
                    "transactions (estimate)",
                    ids.saturating_mul(TXN_ID_BYTES).saturating_add(open.saturating_mul(
                        partitions.saturating_mul(TXN_PARTITION_BYTES + TXN_OFFSET_BYTES),
                    )),
                    format!(
                        "transactions.max_transactional_ids {ids} x {} + transactions.max_open {open} x server.max_partitions {partitions} x ({TXN_PARTITION_BYTES} B a partition + {TXN_OFFSET_BYTES} B an offset)",
                        human(TXN_ID_BYTES),
                    ),
                )
            },
            {
                let ranges = crate::broker::txn::ABORTED_RANGES_MAX as u64;
                line(
                    "aborted transactions (estimate)",
                    ranges.saturating_mul(TXN_ABORTED_RANGE_BYTES),
                    format!(
                        "{ranges} ranges (what the transaction log holds) x {TXN_ABORTED_RANGE_BYTES} B"
                    ),
                )
            },
            line(
                "runtime base (estimate)",
                RUNTIME_BASE_BYTES,
                "binary, allocator, thread stacks, executor".to_string(),
            ),
        ];
        if !s.tls.listen.is_empty() {
            // Only with TLS on; a plaintext broker's budget has no such line.
            let sessions = crate::server::tls::SESSION_CACHE_ENTRIES as u64;
            lines.push(line(
                "TLS connection buffers",
                connections
                    .saturating_mul(TLS_CONNECTION_BYTES)
                    .saturating_add(sessions * TLS_SESSION_BYTES),
                format!(
                    "server.max_connections {} x {} (rustls's record, send and receive buffers) + a session cache of {sessions} x {}",
                    connections,
                    human(TLS_CONNECTION_BYTES),
                    human(TLS_SESSION_BYTES)
                ),
            ));
        }
        if cfg.mirror.enabled() {
            let m = &cfg.mirror;
            lines.push(line(
                "mirror buffers",
                m.batch_bytes
                    .saturating_mul(MIRROR_BATCH_COPIES)
                    .saturating_add(MIRROR_FIXED_BYTES),
                format!(
                    "{MIRROR_BATCH_COPIES} x mirror.batch_bytes {} (the local fetch, the records re-encoded, the compressed batches) + {} (checkpoint reads, connections, cursors)",
                    human(m.batch_bytes),
                    human(MIRROR_FIXED_BYTES)
                ),
            ));
            let windows: Vec<(u64, u64)> = m
                .rules
                .iter()
                .filter_map(|r| r.aggregate.as_ref())
                .map(|a| {
                    let per =
                        MIRROR_WINDOW_BYTES + MIRROR_WINDOW_FIELD_BYTES * a.fields.len() as u64;
                    (a.max_open_windows, per)
                })
                .collect();
            if !windows.is_empty() {
                lines.push(line(
                    "mirror windows",
                    windows.iter().map(|(n, per)| n.saturating_mul(*per)).sum(),
                    format!(
                        "max_open_windows x (about {} + {} a field) per aggregate rule, for one source partition each (each partition a rule matches holds its own)",
                        human(MIRROR_WINDOW_BYTES),
                        human(MIRROR_WINDOW_FIELD_BYTES)
                    ),
                ));
            }
        }
        // Recovery's buffer lives before the listeners open and is freed
        // after: it only adds to the peak where it is larger than what
        // serving alone allocates.
        let recovery = crate::storage::recovery_buffer_bytes(max_batch);
        let serving: u64 = lines
            .iter()
            .filter(|l| SERVING_ONLY.contains(&l.user))
            .map(|l| l.bytes)
            .sum();
        lines.push(line(
            "start-up recovery buffer",
            recovery.saturating_sub(serving),
            format!(
                "{} while recovering, freed before serving: counted beyond the {} that serving alone allocates",
                human(recovery),
                human(serving)
            ),
        ));
        MemoryBudget {
            lines,
            msg_id_window_bytes_max: u64::from(crate::broker::msgid::WINDOW_RECORDS_MAX)
                * MSG_ID_BYTES_PER_ID,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.lines
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.bytes))
    }

    /// The budget in one phrase, for the start-up line.
    pub fn summary(&self) -> String {
        format!(
            "worst-case memory {} (the most every pool may take at the config's limits, not current use; `skiff config check` itemises it)",
            human(self.total_bytes())
        )
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
        writeln!(f, "# {:>10}  total", human(self.total_bytes()))?;
        writeln!(
            f,
            "# not in the total: a topic's message-id window, up to {} for each topic created with one",
            human(self.msg_id_window_bytes_max)
        )
    }
}

/// The disk budget before any topic is made: what it keeps for the
/// broker's own topics (each made at its first use, its disk counted from
/// the start so no user topic can take it), and what that leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBudget {
    /// `storage.disk_budget_bytes`.
    pub budget_bytes: u64,
    /// The broker's own topics and the disk each will reserve.
    pub internal: Vec<(&'static str, u64)>,
}

impl DiskBudget {
    pub fn of(cfg: &Config) -> DiskBudget {
        DiskBudget {
            budget_bytes: cfg.storage.disk_budget_bytes,
            internal: crate::broker::internal_topics_disk(cfg),
        }
    }

    pub fn internal_bytes(&self) -> u64 {
        self.internal
            .iter()
            .fold(0u64, |sum, (_, b)| sum.saturating_add(*b))
    }
}

impl fmt::Display for DiskBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# disk budget (storage.disk_budget_bytes {}; a topic's rings are reserved when it is made)",
            human(self.budget_bytes)
        )?;
        for (name, bytes) in &self.internal {
            let made = match *name {
                crate::broker::group::OFFSETS_TOPIC => "group offsets, made at the first commit",
                crate::broker::txn::TXN_TOPIC => "transactions, made at the first init_txn",
                crate::broker::share::SHARE_TOPIC => "share groups, made at the first share fetch",
                _ => "the broker's own",
            };
            writeln!(f, "# {:>10}  {name:<34} {made}", human(*bytes))?;
        }
        writeln!(
            f,
            "# {:>10}  left for topics",
            human(self.budget_bytes.saturating_sub(self.internal_bytes()))
        )
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
