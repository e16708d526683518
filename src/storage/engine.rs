//! The storage thread: owns the I/O backend and every partition's state.
//!
//! One thread per data directory. It takes commands from a bounded channel,
//! drains whatever is queued (the group), copies each appended batch into
//! its partition's aligned tail buffer, and then issues one
//! [`IoBackend::write_batch`] with every dirty tail and the fdatasyncs the
//! partitions' durability policies call for. Acks complete after that
//! call returns. Everything here is single-threaded; the handle sees the
//! offsets through atomics in [`PartShared`].
//!
//! This file is the thread's loop and its command dispatch, with the limits
//! the engine works to. The rest of the engine lives beside it:
//! [`part`](super::part) (a partition's ring and tail buffer),
//! [`commit`](super::commit) (group commit), [`read`](super::read) (fetches
//! and read-ahead) and [`recovery`](super::recovery) (start-up and the
//! checkpoint).

use super::commit::{CommitState, Pending, SyncGroup};
use super::doorbell::Doorbell;
use super::io::{AlignedBuf, FileHandle, IoBackend, WriteOp, BLOCK_BYTES, READ_AHEAD_SLOTS};
use super::part::{
    part_dir, seg_path, IndexEntry, Part, PartState, PartitionMeta, Prechecked, Ring, Seg, Tail,
    PARTITION_META,
};
use super::read::Ahead;
use super::readbuf::ReadBuf;
use super::recovery::{
    checkpoint_path, checkpoint_path_in, checkpoint_written, write_checkpoint, Checkpoint,
};
use super::syncpool::{self, SyncPool};
use super::{
    meta, Durability, PartShared, PartitionConfig, PartitionId, Reply, Shared, StatsInner,
    StorageConfig, StorageError, STATE_OK,
};
use std::io;
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const B: usize = BLOCK_BYTES;
pub(super) const B64: u64 = BLOCK_BYTES as u64;

/// One sparse index entry per this many bytes of segment: bounds both the
/// index memory (a 16 MiB segment holds at most 513 entries, 12 KiB) and
/// the bytes a read scans past to reach its offset.
pub const INDEX_INTERVAL_BYTES: u64 = 32 * 1024;
/// How often a partition's checkpoint is refreshed while data flows. A
/// refresh rewrites the file in place and fdatasyncs it, off the storage
/// thread.
pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;
/// `interval:<ms>` gathers appends for at most this long (or `ms`, if
/// shorter) before writing and acking them: a few large writes instead of
/// one partial-sector rewrite per record, at a bounded ack latency even
/// when `ms` is long.
pub const INTERVAL_GATHER_MS_MAX: u64 = 2;
/// ... and writes at once when this much is waiting (a full write already).
pub const INTERVAL_WRITE_EARLY_BYTES: usize = 64 * 1024;
/// No hold after a group of more appends than this: many small appends
/// keep the storage thread busy, and their fdatasync should run meanwhile.
pub const SYNC_HOLD_RETURNS_MAX: usize = 64;
/// How often time retention is checked.
pub const RETENTION_CHECK_INTERVAL_MS: u64 = 1000;
/// The zero buffer for pre-writing segments and scrubbing torn tails.
pub const ZERO_CHUNK_BYTES: usize = 256 * 1024;
/// The read buffer holds at least this much (plus a block of slack for
/// alignment): reads and recovery scan in windows of this size.
pub const READ_WINDOW_BYTES_MIN: usize = 256 * 1024;

/// Read size while recovering (a temporary buffer, freed afterwards).
pub const RECOVERY_READ_BYTES: usize = 4 * 1024 * 1024 + B;

/// Sizes of the engine's own structures, for the memory budget
/// (`storage::ring_memory_bytes` and its neighbours derive from these).
pub(crate) const INDEX_ENTRY_BYTES: u64 = std::mem::size_of::<IndexEntry>() as u64;
pub(crate) const SEGMENT_SLOT_BYTES: u64 =
    (std::mem::size_of::<Seg>() + std::mem::size_of::<FileHandle>()) as u64;
pub(crate) const PART_BYTES: u64 = std::mem::size_of::<Part>() as u64;
pub(crate) const CMD_BYTES: u64 = std::mem::size_of::<Cmd>() as u64;

/// Sparse index entries a segment has room for, reserved when its slot is
/// made: one per [`INDEX_INTERVAL_BYTES`], and two for the ends.
pub(crate) fn index_capacity(segment_bytes: u64) -> u64 {
    segment_bytes / INDEX_INTERVAL_BYTES + 2
}

const _: () = assert!(INDEX_INTERVAL_BYTES % B64 == 0);
const _: () = assert!(RECOVERY_READ_BYTES % B == 0);
const _: () = assert!(ZERO_CHUNK_BYTES % B == 0);
const _: () = assert!(READ_WINDOW_BYTES_MIN % B == 0);

/// Fetches waiting for the storage thread, in a queue of their own: a
/// fetch of durable data is answered before the appends queued ahead of
/// it are handled and written, and while an fdatasync runs
/// (`Engine::wait_serving_reads`), not after a whole write round.
pub const READ_QUEUE_DEPTH: usize = 16;
/// A fetch within this long makes a flush wait with reads served
/// (`Engine::readers_recent`): a tailing consumer reads at every group
/// commit; a broker nobody reads from keeps its plain fdatasync(2), which
/// costs no thread hand-off.
const READERS_RECENT: Duration = Duration::from_secs(1);

/// The largest spent batch buffer that goes back with its ack to be
/// freed by the thread that allocated it (`commit::Pending::spent`): a
/// fan-in's one-record batches, a thousand a group. Larger ones are few
/// a group, and are freed here at once, so that the network thread's
/// heap does not hold a window of them until the flush.
const SPENT_BACK_BYTES_MAX: usize = 4096;

pub(crate) enum Cmd {
    Create {
        id: PartitionId,
        cfg: PartitionConfig,
        /// Reserve the compaction spare too (`Storage::set_spare`).
        spare: bool,
        reply: Reply<()>,
    },
    Delete {
        id: PartitionId,
        reply: Reply<()>,
    },
    Append {
        id: PartitionId,
        batch: super::BatchBuf,
        checked: Prechecked,
        reply: super::AppendReply,
    },
    Read {
        id: PartitionId,
        offset: u64,
        max_bytes: usize,
        first_max: usize,
        reply: Reply<bytes::Bytes>,
    },
    OffsetForTs {
        id: PartitionId,
        ts_ms: i64,
        reply: Reply<Option<u64>>,
    },
    /// Answered as soon as the thread reaches it: proof of liveness for
    /// the service watchdog.
    Ping {
        reply: Reply<()>,
    },
    Shutdown {
        reply: std::sync::mpsc::Sender<Result<(), StorageError>>,
    },
    // Compaction (issue 19); see `compact`.
    Segments {
        id: PartitionId,
        reply: Reply<Vec<super::SegmentInfo>>,
    },
    CompactBegin {
        id: PartitionId,
        first_epoch: u64,
        count: usize,
        reply: Reply<()>,
    },
    CompactWrite {
        id: PartitionId,
        bytes: Vec<u8>,
        reply: Reply<()>,
    },
    CompactCommit {
        id: PartitionId,
        reply: Reply<()>,
    },
    CompactAbort {
        id: PartitionId,
        reply: Reply<()>,
    },
    /// See `Storage::set_spare`.
    Spare {
        id: PartitionId,
        keep: bool,
        reply: Reply<()>,
    },
    /// Live topic changes (issue 19): see `Storage::alter_partition`.
    Alter {
        id: PartitionId,
        cfg: PartitionConfig,
        reply: Reply<Option<u64>>,
    },
    /// Tests: the thread says it stopped, then takes nothing more off its
    /// queue until `resume` is dropped (see `Storage::pause`).
    #[cfg(test)]
    Pause {
        paused: std::sync::mpsc::Sender<()>,
        resume: std::sync::mpsc::Receiver<()>,
    },
    /// Tests: the config a partition runs and its ring's slots.
    #[cfg(test)]
    Running {
        id: PartitionId,
        reply: Reply<(super::PartitionConfig, usize, PathBuf)>,
    },
}

/// Tests hold the background pre-write back to let the ring overtake it.
#[cfg(test)]
pub(crate) static PREWRITE_PAUSED: AtomicBool = AtomicBool::new(false);

/// Tests hold a create's pre-write of its first segment back, to see what
/// is served while it runs.
#[cfg(test)]
pub(crate) static CREATE_PREWRITE_PAUSED: AtomicBool = AtomicBool::new(false);

/// A partition being created whose first segment is being pre-written, a
/// chunk ([`ZERO_CHUNK_BYTES`]) per turn of the storage thread, other
/// partitions served between chunks: written in one go, 16 MiB took 0.8
/// to 1.7 s on a 20 MB/s card, and every producer's ack waited for it
/// (docs/performance.md, "Creating a topic on a slow card"). Answered once
/// the rest of the create is done ([`Engine::create_finish`]).
pub(super) struct Creating {
    id: PartitionId,
    cfg: PartitionConfig,
    dir: PathBuf,
    files: Vec<FileHandle>,
    /// The compaction spare reserved with the ring, if asked for: synced
    /// with it, then closed (a compaction opens it by name).
    spare: Option<FileHandle>,
    /// How far slot 0 is zeroed.
    zeroed_to: u64,
    reply: Reply<()>,
}

/// The part of the engine partitions borrow while the map is borrowed.
pub(super) struct Ctx {
    pub(super) cfg: StorageConfig,
    pub(super) io: Box<dyn IoBackend>,
    /// The read buffer: reads and recovery scans happen one at a time (a
    /// fetch's answer may hold the buffer it was read into; see `ReadBuf`).
    pub(super) rbuf: ReadBuf,
    pub(super) ahead: Ahead,
    /// Zeros, for pre-writing segments and scrubbing torn tails.
    pub(super) zeros: AlignedBuf,
    pub(super) shared: Arc<Shared>,
    /// Payload bytes already reported to the observer.
    observed_payload_bytes: u64,
}

impl Ctx {
    /// Closes a file, dropping bytes read ahead from it first.
    pub(super) fn close(&mut self, file: FileHandle) {
        self.ahead.forget(&mut *self.io, &mut self.rbuf, file);
        self.io.close(file);
    }

    /// The one path to `write_batch`, so the counters are always right.
    pub(super) fn write_batch(
        &mut self,
        ops: &[WriteOp<'_>],
        sync: &[FileHandle],
    ) -> io::Result<()> {
        let st = &self.shared.stats;
        let t = self.cfg.clock.now();
        let res = self.io.write_batch(ops, sync);
        let bytes: u64 = ops.iter().map(|o| o.data.len() as u64).sum();
        StatsInner::add(&st.device_bytes_written, bytes);
        StatsInner::add(&st.writes, ops.len() as u64);
        if !sync.is_empty() {
            StatsInner::add(&st.fsyncs, sync.len() as u64);
            let elapsed = self.cfg.clock.now() - t;
            StatsInner::add(&st.fsync_latency_us_sum, elapsed.as_micros() as u64);
            StatsInner::add(&st.fsync_latency_count, 1);
        }
        if let Some(obs) = &self.cfg.observer {
            let payload = st.payload_bytes.load(Ordering::Relaxed);
            let delta = payload.saturating_sub(self.observed_payload_bytes);
            self.observed_payload_bytes = payload;
            obs.0
                .write_round(self.cfg.clock.now() - t, bytes, delta, !sync.is_empty());
        }
        res
    }

    /// Records that the backend had to open a file without O_DIRECT (for
    /// `/health`); its log line was written when it happened.
    pub(super) fn note_buffered_io(&self) {
        if self.io.buffered_io() {
            self.shared.stats.buffered_io.store(1, Ordering::Relaxed);
        }
    }

    /// Reserves a segment file's `len` bytes: fallocate, or where the
    /// file system has none (FUSE and some network file systems answer
    /// EOPNOTSUPP), by writing zeros over the file, which reserves its
    /// blocks as well; said once in the log, counted in
    /// `zero_fill_allocations`. Returns whether it wrote the zeros.
    pub(super) fn allocate(&mut self, file: FileHandle, len: u64) -> io::Result<bool> {
        match self.io.allocate(file, len) {
            Ok(()) => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let before = self
                    .shared
                    .stats
                    .zero_fill_allocations
                    .fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    log::warn!(
                        "the file system under {} has no fallocate ({e}): segment files are \
                         preallocated by writing zeros (slower to create, same guarantees)",
                        self.cfg.data_dir.display()
                    );
                }
                self.write_zeros(file, 0, len)?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes zeros over `[from, to)` (block-aligned) of a file.
    pub(super) fn write_zeros(&mut self, file: FileHandle, from: u64, to: u64) -> io::Result<()> {
        let mut at = from;
        while at < to {
            let n = ((to - at) as usize).min(self.zeros.len());
            let op = WriteOp {
                file,
                offset: at,
                data: &self.zeros[..n],
            };
            let res = self.io.write_batch(&[op], &[]);
            StatsInner::add(&self.shared.stats.device_bytes_written, n as u64);
            StatsInner::add(&self.shared.stats.writes, 1);
            res?;
            at += n as u64;
        }
        Ok(())
    }
}

pub(super) fn interval_gather(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms).min(INTERVAL_GATHER_MS_MAX))
}

pub(super) struct Engine {
    pub(super) ctx: Ctx,
    pub(super) parts: foldhash::HashMap<PartitionId, Part>,
    /// Tail buffers of deleted partitions, reused before allocating.
    free_tails: Vec<AlignedBuf>,
    tails_made: usize,
    next_retention_check: Instant,
    pub(super) group: SyncGroup,
    pub(super) bell: Arc<Doorbell>,
    /// The checkpoints being rewritten, off this thread.
    checkpointing: Option<CheckpointRefresh>,
    /// Fetches (`Cmd::Read`), queued apart from the other commands.
    reads: async_channel::Receiver<Cmd>,
    /// When a fetch was last served.
    last_read: Option<Instant>,
    /// Creates whose first segment is being pre-written, oldest first.
    creating: Vec<Creating>,
    /// Creates whose files are written, being synced off this thread.
    create_syncs: Vec<CreateSync>,
    /// The threads those syncs run on.
    sync_pool: SyncPool,
    /// The threads checkpoint refreshes run on.
    checkpoint_pool: SyncPool,
}

/// A create whose files and first segment are written, its partition made
/// but not yet registered, while [`SyncPool`] syncs what it wrote: its
/// segment files, then its directory, `partition.meta` and the entries
/// above. Each of those is 20 to 100 ms on an SD card's timings, and on
/// the storage thread they held every other partition's acks
/// (docs/performance.md, "Creating a topic on a slow card"). Answered once
/// all of it is durable; a failure removes the directory, as before.
struct CreateSync {
    c: Creating,
    part: Part,
    /// The checkpoint the syncs write.
    checkpoint: Checkpoint,
    job: syncpool::Pending<Result<(), StorageError>>,
}

/// A refresh of checkpoints on the checkpoint pool's threads
/// (`Engine::housekeeping`). On the storage thread, each refresh stalled
/// every append for its fdatasyncs: on an SD card's timings, 20
/// partitions' refresh once a second held the slowest 1% of acks at 6 to 7
/// times the device's p99 flush instead of 3 to 4 (docs/performance.md,
/// "checkpoints off the storage thread").
struct CheckpointRefresh {
    writes: Vec<CheckpointWrite>,
}

/// A partition's checkpoint being written.
type CheckpointWrite = (
    PartitionId,
    Checkpoint,
    syncpool::Pending<Result<(), super::meta::MetaError>>,
);

impl CheckpointRefresh {
    fn is_done(&self) -> bool {
        self.writes.iter().all(|(_, _, w)| w.is_done())
    }
}

/// The read buffer (and each read-ahead spare): a whole max-size batch, at
/// least [`READ_WINDOW_BYTES_MIN`], and a block for an unaligned start.
pub(crate) fn read_buffer_bytes(max_batch_bytes: usize) -> usize {
    (max_batch_bytes.div_ceil(B) * B).max(READ_WINDOW_BYTES_MIN) + B
}

/// Starts the storage thread and waits for recovery to finish.
pub(crate) fn start(
    cfg: StorageConfig,
    io: Box<dyn IoBackend>,
    shared: Arc<Shared>,
) -> Result<(CmdTx, std::thread::JoinHandle<()>), StorageError> {
    let (tx, rx) = async_channel::bounded(cfg.append_queue_depth);
    let (reads_tx, reads) = async_channel::bounded(READ_QUEUE_DEPTH);
    let bell = Arc::new(Doorbell::new()?);
    let tx = CmdTx {
        tx,
        reads: reads_tx,
        bell: bell.clone(),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("skiff-storage".into())
        .spawn(move || {
            let read_bytes = read_buffer_bytes(cfg.max_batch_bytes);
            let bufs = AlignedBuf::new(read_bytes).and_then(|r| {
                let spares = (0..READ_AHEAD_SLOTS)
                    .map(|_| AlignedBuf::new(read_bytes))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((r, spares, AlignedBuf::new(ZERO_CHUNK_BYTES)?))
            });
            let Ok((rbuf, spares, zeros)) = bufs else {
                let _ = ready_tx.send(Err(StorageError::InvalidConfig(
                    "max_batch_bytes is not allocatable",
                )));
                return;
            };
            let now = cfg.clock.now();
            let group = SyncGroup::new(now, cfg.fanin_producers_max);
            #[cfg_attr(not(test), allow(unused_mut))]
            let mut checkpoint_pool = SyncPool::new(&bell, syncpool::CHECKPOINTS);
            #[cfg(test)]
            {
                checkpoint_pool.spawn_fails = cfg.checkpoint_spawn_fails.clone();
            }
            let mut engine = Engine {
                ctx: Ctx {
                    rbuf: ReadBuf::new(rbuf, spares),
                    ahead: Ahead::new(READ_AHEAD_SLOTS, io.reads_ahead(), cfg.observer.clone()),
                    zeros,
                    cfg,
                    io,
                    shared,
                    observed_payload_bytes: 0,
                },
                parts: Default::default(),
                free_tails: Vec::new(),
                tails_made: 0,
                next_retention_check: now,
                group,
                sync_pool: SyncPool::new(&bell, syncpool::CREATE),
                checkpoint_pool,
                bell,
                checkpointing: None,
                reads,
                last_read: None,
                creating: Vec::new(),
                create_syncs: Vec::new(),
            };
            match engine.recover_all() {
                Ok(()) => {
                    let _ = ready_tx.send(Ok(()));
                    engine.run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((tx, handle)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(StorageError::ShuttingDown)
        }
    }
}

/// What [`CmdTx::try_send_quiet`] did with its command.
pub(crate) enum TrySend {
    Queued,
    /// The storage thread is gone.
    Closed,
    /// No room: the command, to send when there is.
    Full(Cmd),
}

/// The storage thread's command queue: a bounded channel (backpressure)
/// whose senders ring the thread's doorbell.
#[derive(Clone)]
pub(crate) struct CmdTx {
    pub(super) tx: async_channel::Sender<Cmd>,
    /// Fetches only (see `READ_QUEUE_DEPTH`).
    pub(super) reads: async_channel::Sender<Cmd>,
    pub(super) bell: Arc<Doorbell>,
}

impl CmdTx {
    pub(crate) async fn send(&self, cmd: Cmd) -> Result<(), StorageError> {
        let queue = match cmd {
            Cmd::Read { .. } => &self.reads,
            _ => &self.tx,
        };
        let sent = queue.send(cmd).await;
        self.bell.ring();
        sent.map_err(|_| StorageError::ShuttingDown)
    }

    /// Queues `cmd` without ringing if there is room. A full queue rings,
    /// so the thread drains it, and hands `cmd` back to wait for room
    /// with (`send_when_room`).
    pub(crate) fn try_send_quiet(&self, cmd: Cmd) -> TrySend {
        match self.tx.try_send(cmd) {
            Ok(()) => TrySend::Queued,
            Err(async_channel::TrySendError::Full(cmd)) => {
                self.bell.ring();
                TrySend::Full(cmd)
            }
            Err(async_channel::TrySendError::Closed(_)) => {
                self.bell.ring();
                TrySend::Closed
            }
        }
    }

    /// Waits for room in the queue for `cmd`, which found it full.
    pub(crate) async fn send_when_room(&self, cmd: Cmd) -> Result<(), StorageError> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| StorageError::ShuttingDown)
    }

    /// Wakes the thread for appends queued quietly (`try_send_quiet`).
    pub(crate) fn ring_append(&self) {
        self.bell.ring_append();
    }

    pub(crate) fn ring_hushed(&self) {
        self.bell.ring_hushed();
    }

    pub(crate) fn send_blocking(&self, cmd: Cmd) -> Result<(), StorageError> {
        let sent = self.tx.send_blocking(cmd);
        self.bell.ring();
        sent.map_err(|_| StorageError::ShuttingDown)
    }

    /// The thread flushes, checkpoints and exits once it sees this.
    pub(crate) fn close(&self) {
        self.tx.close();
        self.reads.close();
        self.bell.ring();
    }
}

impl Engine {
    pub(super) fn run(mut self, rx: async_channel::Receiver<Cmd>) {
        let drain_max = self.ctx.cfg.append_queue_depth;
        let clock = self.ctx.cfg.clock.clone();
        let watcher = clock.watch(&self.bell);
        loop {
            // Before the round reads the time: a clock that moves after
            // this wakes the thread for another round.
            let generation = clock.generation();
            let mut shutdown = None;
            let mut closed = rx.is_closed() && rx.is_empty();
            self.serve_reads();
            // The group: everything that queued up while we were busy.
            for _ in 0..drain_max {
                match rx.try_recv() {
                    Ok(Cmd::Shutdown { reply }) => {
                        shutdown = Some(reply);
                        break;
                    }
                    Ok(c) => self.handle(c),
                    Err(async_channel::TryRecvError::Empty) => break,
                    Err(async_channel::TryRecvError::Closed) => {
                        closed = true;
                        break;
                    }
                }
            }
            self.poll_inflight();
            // Written now even while a sync group is in flight; synced by
            // the next group.
            self.commit_round(false, &|| !rx.is_empty());
            self.housekeeping(false);
            // A manual clock's advance returns once this round has run at
            // its new time.
            clock.acted(watcher.as_deref(), generation);
            if shutdown.is_some() || closed {
                rx.close();
                self.reads.close();
                // Commands still queued get ShuttingDown when their reply
                // senders drop with the channel.
                let res = self.shutdown_all();
                if let Some(reply) = shutdown {
                    let _ = reply.send(res);
                }
                return;
            }
            // A chunk each turn, however busy: the create is answered only
            // once its first segment is written.
            if !self.creating.is_empty() && self.create_step() {
                continue;
            }
            if !rx.is_empty() || !self.reads.is_empty() {
                continue;
            }
            if self.group.inflight.is_empty() && self.prewrite_pending() {
                self.prewrite_step();
                continue;
            }
            // Sleep until a command, the sync group's completion, or the
            // next deadline. Another call may have reaped the group's
            // completion meanwhile: then it is done, not to be waited for.
            let group_fd = if self.group.inflight.is_empty() {
                None
            } else if self.poll_inflight() {
                continue;
            } else {
                match self.ctx.io.sync_fd() {
                    Some(fd) => Some(fd),
                    // Not pollable: complete it here.
                    None => {
                        self.finish_inflight();
                        continue;
                    }
                }
            };
            let deadline = clock.sleep_until(self.next_deadline());
            // Work offloaded that ends between here and the sleep rings
            // before the thread is asleep: its flag is looked at after.
            let (reads, refresh, syncs) = (&self.reads, &self.checkpointing, &self.create_syncs);
            self.bell.sleep(group_fd, deadline, || {
                !rx.is_empty()
                    || !reads.is_empty()
                    || rx.is_closed()
                    || clock.moved_since(generation)
                    || refresh.as_ref().is_some_and(CheckpointRefresh::is_done)
                    || syncs.iter().any(|c| c.job.is_done())
            });
        }
    }

    /// Answers every fetch queued; whether there were any.
    pub(super) fn serve_reads(&mut self) -> bool {
        let mut any = false;
        while let Ok(cmd) = self.reads.try_recv() {
            any = true;
            self.handle(cmd);
        }
        if any {
            self.last_read = Some(self.ctx.cfg.clock.now());
        }
        any
    }

    /// Whether a consumer fetched lately: flushes then wait with fetches
    /// served (`wait_serving_reads`).
    pub(super) fn readers_recent(&self) -> bool {
        self.last_read
            .is_some_and(|t| self.ctx.cfg.clock.now() < t + READERS_RECENT)
    }

    /// Completes the fdatasync group the backend has started, answering
    /// fetches that arrive meanwhile. What they may see is unchanged: the
    /// high watermark moves only once the flush is done, and no append is
    /// taken off the queue, so the tail stays as written.
    pub(super) fn wait_serving_reads(&mut self) -> io::Result<()> {
        loop {
            if let Some(res) = self.ctx.io.sync_poll() {
                return res;
            }
            if self.serve_reads() {
                continue;
            }
            let Some(fd) = self.ctx.io.sync_fd() else {
                return self.ctx.io.sync_wait();
            };
            let reads = &self.reads;
            self.bell.sleep(Some(fd), None, || !reads.is_empty());
        }
    }

    fn prewrite_pending(&self) -> bool {
        self.parts
            .values()
            .any(|p| p.prewrite_next.is_some() && p.state == PartState::Ok)
    }

    /// Zeroes one chunk of a not-yet-started segment (see `prewrite_next`).
    fn prewrite_step(&mut self) {
        #[cfg(test)]
        if PREWRITE_PAUSED.load(Ordering::Relaxed) {
            return;
        }
        let Engine { ctx, parts, .. } = self;
        let Some(p) = parts
            .values_mut()
            .find(|p| p.prewrite_next.is_some() && p.state == PartState::Ok)
        else {
            return;
        };
        let Some((mut slot, mut pos)) = p.prewrite_next else {
            return;
        };
        // Never write over a segment that has been started: the ring may
        // have reached it before the background pass did.
        while slot < p.ring.n() && p.ring.segs[slot].epoch != 0 {
            slot += 1;
            pos = 0;
        }
        if slot >= p.ring.n() {
            p.prewrite_next = None;
            return;
        }
        let file = p.files[slot];
        let end = (pos + ZERO_CHUNK_BYTES as u64).min(p.cfg.segment_bytes);
        let res = ctx.write_zeros(file, pos, end).and_then(|()| {
            if end == p.cfg.segment_bytes {
                ctx.io.sync(file)
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) if end == p.cfg.segment_bytes => p.prewrite_next = Some((slot + 1, 0)),
            Ok(()) => p.prewrite_next = Some((slot, end)),
            Err(e) => {
                // Nothing acknowledged depends on it: the segment stays
                // allocated, its first writes are only slower.
                log::warn!(
                    "partition {}: pre-writing segment {slot} failed ({e}); stopped",
                    p.id
                );
                p.prewrite_next = None;
            }
        }
        if p.prewrite_next.is_some_and(|(s, _)| s >= p.ring.n()) {
            p.prewrite_next = None;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut consider = |t: Instant| d = Some(d.map_or(t, |d| d.min(t)));
        let mut periodic = false;
        let mut sync_wanted = false;
        for p in self.parts.values() {
            if p.state != PartState::Ok {
                continue;
            }
            sync_wanted |= p.commit.sync_wanted;
            if let Durability::IntervalMs(ms) = p.cfg.durability {
                if let Some(at) = p.commit.first_pending_at {
                    consider(at + interval_gather(ms));
                }
                if let Some(at) = p.commit.unsynced_since {
                    consider(at + Duration::from_millis(u64::from(ms)));
                }
            }
            // A refresh in flight rings the doorbell when it is done.
            if p.durable != p.checkpointed && self.checkpointing.is_none() {
                consider(p.last_checkpoint + Duration::from_millis(CHECKPOINT_INTERVAL_MS));
            }
            periodic |= p.cfg.retention_ms.is_some();
        }
        if periodic {
            consider(self.next_retention_check);
        }
        let now = self.ctx.cfg.clock.now();
        // A fan-in's wait may outlast this hold: its end is then past, and
        // no reason to wake.
        if let Some(t) = self
            .group
            .hold_until
            .filter(|&t| self.group.returning > 0 && t > now)
        {
            consider(t);
        }
        if self.group.fanin.active() {
            // Hushed, appends do not wake the thread: it looks at them
            // now and then, to flush soon after the round is in.
            let (gap, max) = (self.ctx.cfg.sync_hold_max, self.ctx.cfg.fanin_wait);
            consider(self.group.fanin.next_look(now, gap, max));
        }
        // A flush the last group deferred (`defer_heavy`) starts the next
        // group as soon as no hold keeps it.
        if sync_wanted && self.group.inflight.is_empty() && !self.holding(now) {
            consider(now);
        }
        d
    }

    pub(super) fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Create {
                id,
                cfg,
                spare,
                reply,
            } => {
                self.finish_inflight();
                self.create(id, cfg, spare, reply);
            }
            Cmd::Delete { id, reply } => {
                self.finish_inflight();
                let r = self.delete(&id);
                let _ = reply.try_send(r);
            }
            Cmd::Append {
                id,
                batch,
                checked,
                reply,
            } => {
                let now = self.ctx.cfg.clock.now();
                let producer = batch_producer(&batch);
                self.group
                    .fanin
                    .answered(producer, batch_records(&batch), now);
                self.append(id, batch, checked, reply, producer, now)
            }
            Cmd::Read {
                id,
                offset,
                max_bytes,
                first_max,
                reply,
            } => {
                let r = self.read(&id, offset, max_bytes, first_max);
                let _ = reply.try_send(r);
                // After the answer: the device reads on while it travels.
                let Ctx {
                    ahead,
                    io,
                    rbuf,
                    shared,
                    ..
                } = &mut self.ctx;
                ahead.start(&mut **io, rbuf, &shared.stats);
            }
            Cmd::OffsetForTs { id, ts_ms, reply } => {
                let r = self.offset_for_ts(&id, ts_ms);
                let _ = reply.try_send(r);
            }
            Cmd::Ping { reply } => {
                let _ = reply.try_send(Ok(()));
            }
            Cmd::Shutdown { reply } => {
                let _ = reply.send(Err(StorageError::ShuttingDown));
            }
            Cmd::Segments { id, reply } => {
                let _ = reply.try_send(self.segments(&id));
            }
            Cmd::CompactBegin {
                id,
                first_epoch,
                count,
                reply,
            } => {
                let _ = reply.try_send(self.compact_begin(&id, first_epoch, count));
            }
            Cmd::CompactWrite { id, bytes, reply } => {
                let r = self.compact_write(&id, &bytes);
                if r.is_err() {
                    self.compact_abort(&id);
                }
                let _ = reply.try_send(r);
            }
            Cmd::CompactCommit { id, reply } => {
                let _ = reply.try_send(self.compact_commit(&id));
            }
            Cmd::CompactAbort { id, reply } => {
                self.compact_abort(&id);
                let _ = reply.try_send(Ok(()));
            }
            Cmd::Spare { id, keep, reply } => {
                self.finish_inflight();
                let _ = reply.try_send(self.set_spare(&id, keep));
            }
            Cmd::Alter { id, cfg, reply } => {
                self.finish_inflight();
                let _ = reply.try_send(self.alter(&id, cfg));
            }
            #[cfg(test)]
            Cmd::Pause { paused, resume } => {
                let _ = paused.send(());
                let _ = resume.recv();
            }
            #[cfg(test)]
            Cmd::Running { id, reply } => {
                let r = match self.parts.get(&id) {
                    Some(p) => Ok((p.cfg.clone(), p.ring.n(), p.dir.clone())),
                    None => Err(self.ctx.shared.not_loaded(&id)),
                };
                let _ = reply.try_send(r);
            }
        }
    }

    fn take_tail(&mut self) -> Result<AlignedBuf, StorageError> {
        if let Some(t) = self.free_tails.pop() {
            return Ok(t);
        }
        let max = self.ctx.cfg.max_partitions;
        if self.tails_made >= max {
            return Err(StorageError::TooManyPartitions { max });
        }
        self.tails_made += 1;
        // One extra block: after recycling, the partial last block stays at
        // the front, and a max-size batch must still fit behind it.
        AlignedBuf::new(self.ctx.cfg.tail_buffer_bytes + B)
            .map_err(|_| StorageError::InvalidConfig("tail_buffer_bytes is not allocatable"))
    }

    fn give_tail(&mut self, mut t: AlignedBuf) {
        t.fill(0);
        self.free_tails.push(t);
    }

    pub(super) fn new_part(
        &mut self,
        id: PartitionId,
        cfg: PartitionConfig,
        dir: PathBuf,
        files: Vec<FileHandle>,
    ) -> Result<Part, StorageError> {
        let tail = self.take_tail()?;
        // One file system holds the ring, so its first file speaks for all.
        let unit = files.first().map_or(B, |&f| self.ctx.io.write_unit(f));
        debug_assert!(unit.is_power_of_two() && B % unit == 0);
        let shared = Arc::new(PartShared {
            cfg: cfg.clone(),
            earliest: 0.into(),
            hw: 0.into(),
            durable: 0.into(),
            state: STATE_OK.into(),
            event: Arc::new(event_listener::Event::new()),
            retain_floor: super::NO_RETAIN_FLOOR.into(),
        });
        Ok(Part {
            id,
            ring: Ring::new(&cfg),
            file_nos: (0..cfg.segments).collect(),
            cfg,
            dir,
            files,
            next_offset: 0,
            hw: 0,
            tail: Tail {
                buf: tail,
                file_off: 0,
                len: 0,
                unit,
                dirty_from: None,
            },
            commit: CommitState::default(),
            durable: Checkpoint::default(),
            checkpointed: Checkpoint::default(),
            last_checkpoint: self.ctx.cfg.clock.now(),
            checkpoint_quiet: None,
            state: PartState::Ok,
            shared,
            prewrite_next: None,
            resume: None,
            compaction: None,
            refused: Vec::new(),
        })
    }

    pub(super) fn register(&mut self, part: Part) {
        part.publish();
        self.ctx
            .shared
            .parts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(part.id.clone(), part.shared.clone());
        self.parts.insert(part.id.clone(), part);
    }

    /// Creates partition `id`: its directory and segment files now; a
    /// first segment to pre-write is then taken a chunk per turn
    /// ([`Engine::create_step`]), and the create is answered once it is
    /// done.
    pub(super) fn create(
        &mut self,
        id: PartitionId,
        cfg: PartitionConfig,
        spare: bool,
        reply: Reply<()>,
    ) {
        let dir = part_dir(&self.ctx.cfg.data_dir, &id);
        if let Err(e) = self.create_check(&id, &cfg, &dir) {
            let _ = reply.try_send(Err(e));
            return;
        }
        let mut files = Vec::with_capacity(cfg.segments as usize);
        let mut spare_file = None;
        let made = std::fs::create_dir_all(&dir)
            .map_err(StorageError::from)
            .and_then(|()| self.create_files(&id, &cfg, &dir, &mut files))
            .and_then(|zeroed| {
                if spare {
                    self.create_spare(&id, &cfg, &dir, &mut spare_file)?;
                }
                Ok(zeroed)
            });
        let c = Creating {
            id,
            cfg,
            dir,
            files,
            spare: spare_file,
            zeroed_to: 0,
            reply,
        };
        match made {
            Err(e) => self.create_failed(c, e),
            Ok(zeroed) if zeroed || !self.ctx.cfg.prewrite_segments => self.create_finish(c),
            Ok(_) => self.creating.push(c),
        }
    }

    /// Why `id` cannot be created in `dir`, if it cannot; clears a
    /// directory an earlier create left incomplete.
    fn create_check(
        &mut self,
        id: &PartitionId,
        cfg: &PartitionConfig,
        dir: &Path,
    ) -> Result<(), StorageError> {
        super::validate_topic_name(&id.topic)?;
        cfg.validate()?;
        let under_way = self
            .creating
            .iter()
            .chain(self.create_syncs.iter().map(|s| &s.c));
        if self.parts.contains_key(id) || under_way.clone().any(|c| &c.id == id) {
            return Err(StorageError::PartitionExists {
                id: id.clone(),
                dir: dir.to_path_buf(),
            });
        }
        if self.parts.len() + under_way.count() >= self.ctx.cfg.max_partitions {
            return Err(StorageError::TooManyPartitions {
                max: self.ctx.cfg.max_partitions,
            });
        }
        let unloaded = self
            .ctx
            .shared
            .unloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|q| &q.partition == id);
        if unloaded || dir.join(PARTITION_META).exists() {
            // Not loaded (its metadata was unreadable at start-up, names
            // another partition, or a delete could not remove it: see the
            // log), but its data may still matter: never overwrite it.
            return Err(StorageError::PartitionExists {
                id: id.clone(),
                dir: dir.to_path_buf(),
            });
        }
        if dir.exists() {
            // A directory without partition.meta: a creation that never
            // completed, unless its segments hold batches (the file was
            // lost): never overwrite those.
            if self.may_hold_data(dir) {
                log::error!(
                    "partition directory {} has no partition.meta but holds data; left \
                     untouched",
                    dir.display()
                );
                return Err(StorageError::PartitionExists {
                    id: id.clone(),
                    dir: dir.to_path_buf(),
                });
            }
            log::warn!("removing incomplete partition directory {}", dir.display());
            if let Err(e) = self.remove_dir(dir, cfg.segments as usize) {
                // Made over, it would fail later with a bare I/O error.
                log::error!(
                    "could not remove incomplete partition directory {}: {e}; partition {id} \
                     is not created over it",
                    dir.display()
                );
                return Err(StorageError::PartitionExists {
                    id: id.clone(),
                    dir: dir.to_path_buf(),
                });
            }
        }
        Ok(())
    }

    /// Pre-writes the next chunk of the oldest create's first segment, and
    /// finishes that create once the segment is written. False (nothing
    /// done) only while a test holds it back.
    fn create_step(&mut self) -> bool {
        #[cfg(test)]
        if CREATE_PREWRITE_PAUSED.load(Ordering::Relaxed) {
            return false;
        }
        let Some(c) = self.creating.first() else {
            return false;
        };
        let (file, from, size) = (c.files[0], c.zeroed_to, c.cfg.segment_bytes);
        let end = (from + ZERO_CHUNK_BYTES as u64).min(size);
        // Synced with the rest of the create, off this thread.
        match self.ctx.write_zeros(file, from, end) {
            Ok(()) if end < size => self.creating[0].zeroed_to = end,
            Ok(()) => {
                let c = self.creating.remove(0);
                self.create_finish(c);
            }
            Err(e) => {
                let c = self.creating.remove(0);
                self.create_failed(c, e.into());
            }
        }
        true
    }

    /// The rest of a create once its files are made and its first segment
    /// written: the ring started and its first header written here; the
    /// syncs and the metadata off this thread ([`Engine::create_sync`]).
    fn create_finish(&mut self, c: Creating) {
        match self.create_rest(&c) {
            Ok(part) => self.create_sync(c, part),
            Err(e) => self.create_failed(c, e),
        }
    }

    fn create_rest(&mut self, c: &Creating) -> Result<Part, StorageError> {
        let mut part =
            self.new_part(c.id.clone(), c.cfg.clone(), c.dir.clone(), c.files.clone())?;
        if self.ctx.cfg.prewrite_segments {
            part.prewrite_next = Some((1, 0));
        }
        part.start_segment(0, 0, self.ctx.cfg.clock.wall_ms());
        match part.commit_now(&mut self.ctx, false) {
            Ok(()) => Ok(part),
            Err(e) => {
                self.give_tail(part.tail.buf);
                Err(e)
            }
        }
    }

    /// Starts the syncs that make a create durable, in order: every
    /// segment file (its allocation, pre-written zeros and first header),
    /// the partition directory, `partition.meta` (the create's commit
    /// point: recovery loads nothing without it) and the entries above.
    /// [`Engine::reap_create_syncs`] answers the create once they are done.
    fn create_sync(&mut self, c: Creating, part: Part) {
        let no_space = no_space_at_create(&c.id, &c.cfg);
        let mut syncs = Vec::with_capacity(c.files.len() + 1);
        for &f in c.files.iter().chain(&c.spare) {
            // A backend that cannot sync from another thread syncs here.
            let res = match self.ctx.io.detached_sync(f) {
                Ok(Some(sync)) => {
                    syncs.push(sync);
                    Ok(())
                }
                Ok(None) => self.ctx.io.sync(f).map_err(&no_space),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = res {
                self.give_tail(part.tail.buf);
                return self.create_failed(c, e);
            }
        }
        let meta = PartitionMeta {
            topic: c.id.topic.to_string(),
            partition: c.id.partition,
            cfg: c.cfg.clone(),
        };
        let dir = c.dir.clone();
        let checkpoint = part.end_checkpoint();
        let (sync_dir, id) = (self.ctx.io.detached_sync_dir(), c.id.clone());
        let dir_no_space = no_space_at_create(&c.id, &c.cfg);
        // Says which directory; ENOSPC as the files' does.
        let dir_synced = move |d: &Path| {
            sync_dir(d).map_err(|e| match dir_no_space(e) {
                StorageError::Io(e) => StorageError::Io(io::Error::new(
                    e.kind(),
                    format!(
                        "partition {id}: fsync of {} at its create: {e}",
                        d.display()
                    ),
                )),
                e => e,
            })
        };
        #[cfg(test)]
        let held = self.ctx.cfg.create_sync_held.clone();
        let work = move || -> Result<(), StorageError> {
            #[cfg(test)]
            {
                // Bounded: a build that waits for it on the storage thread
                // fails its test instead of hanging.
                let t0 = Instant::now();
                while held.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            for sync in syncs {
                sync().map_err(&no_space)?;
            }
            dir_synced(&dir)?;
            // The first checkpoint now, while the create has room: the
            // refreshes rewrite it in place and need none. Left to the
            // first refresh, a disk that filled before it never had one
            // (recovery then scans the whole log at each start).
            meta::overwrite(&checkpoint_path_in(&dir), &checkpoint)?;
            // A partition.meta renamed in place but not synced
            // (`MetaError::Unsynced`) fails the create like any other
            // error: `create_failed` removes the directory, meta file
            // first, so neither memory nor disk keeps the partition.
            meta::write_atomic(&dir.join(PARTITION_META), &meta)?;
            // The new directory entries themselves.
            if let Some(topic_dir) = dir.parent() {
                dir_synced(topic_dir)?;
                if let Some(topics) = topic_dir.parent() {
                    dir_synced(topics)?;
                }
            }
            Ok(())
        };
        let job = self.sync_pool.run(work);
        self.create_syncs.push(CreateSync {
            c,
            part,
            checkpoint,
            job,
        });
    }

    /// Answers each create whose syncs are done (with `wait`, every one:
    /// a shutdown's, which fails them all, leaving nothing).
    fn reap_create_syncs(&mut self, shutting_down: bool) {
        if shutting_down {
            self.sync_pool.close();
        }
        let mut i = 0;
        while i < self.create_syncs.len() {
            if !shutting_down && !self.create_syncs[i].job.is_done() {
                i += 1;
                continue;
            }
            let CreateSync {
                c,
                mut part,
                checkpoint,
                job,
            } = self.create_syncs.remove(i);
            let res = job
                .take()
                .unwrap_or_else(|| Err(io::Error::other("a create's syncs panicked").into()));
            match res {
                Ok(()) if !shutting_down => {
                    if let Some(f) = c.spare {
                        self.ctx.close(f);
                    }
                    part.synced_elsewhere(self.ctx.cfg.clock.now());
                    part.checkpointed = checkpoint;
                    log::info!("created partition {}: {}", c.id, c.cfg);
                    self.register(part);
                    let _ = c.reply.try_send(Ok(()));
                }
                res => {
                    self.give_tail(part.tail.buf);
                    self.create_failed(c, res.err().unwrap_or(StorageError::ShuttingDown));
                }
            }
        }
    }

    /// A create that failed with `e`: what it made is removed, and it is
    /// answered with `e`.
    fn create_failed(&mut self, c: Creating, e: StorageError) {
        for &f in c.files.iter().chain(&c.spare) {
            self.ctx.close(f);
        }
        self.remove_dir_or_warn(&c.dir, c.cfg.segments as usize);
        let _ = c.reply.try_send(Err(e));
    }

    fn create_files(
        &mut self,
        id: &PartitionId,
        cfg: &PartitionConfig,
        dir: &Path,
        files: &mut Vec<FileHandle>,
    ) -> Result<bool, StorageError> {
        let no_space = no_space_at_create(id, cfg);
        // Whether slot 0's zeros are written already (the fallback without
        // fallocate writes them). If not, the create pre-writes it before
        // it is answered, since it takes the first writes, a chunk at a
        // time (`Engine::create_step`); the others in the background,
        // while the storage thread is idle.
        let mut first_zeroed = false;
        for slot in 0..cfg.segments as usize {
            let f = self.ctx.io.open(&seg_path(dir, slot), true)?;
            files.push(f);
            let zeroed = self.ctx.allocate(f, cfg.segment_bytes).map_err(&no_space)?;
            first_zeroed |= slot == 0 && zeroed;
        }
        self.ctx.note_buffered_io();
        Ok(first_zeroed)
    }

    /// Removes a partition directory and its segment files (through the
    /// backend, which may not be the real file system), as far as it can:
    /// the error says why the directory is still there.
    pub(super) fn remove_dir(&mut self, dir: &Path, segments: usize) -> io::Result<()> {
        let _ = std::fs::remove_file(dir.join(PARTITION_META));
        // A test backend's files are not in the directory.
        let _ = self.ctx.io.remove(&dir.join(super::compact::SPARE_FILE));
        if segments > 0 {
            for slot in 0..segments {
                let _ = self.ctx.io.remove(&seg_path(dir, slot));
            }
        } else {
            // Count unknown (no partition.meta): files are created in slot
            // order, so stop at the first one missing.
            let mut slot = 0;
            while self.ctx.io.remove(&seg_path(dir, slot)).is_ok() {
                slot += 1;
            }
        }
        let removed = match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if let Some(parent) = dir.parent() {
            // Leaves the topic directory when other partitions remain.
            let _ = std::fs::remove_dir(parent);
            let _ = self.ctx.io.sync_dir(parent.parent().unwrap_or(parent));
        }
        removed
    }

    /// [`Engine::remove_dir`] where a directory left behind harms nothing
    /// (it holds no data): logged only.
    pub(super) fn remove_dir_or_warn(&mut self, dir: &Path, segments: usize) {
        if let Err(e) = self.remove_dir(dir, segments) {
            log::warn!("could not remove {}: {e}", dir.display());
        }
    }

    /// A delete that unloaded `id` but could not remove its directory:
    /// kept as unloaded, so a create refuses to make the id over it and a
    /// later delete (a create of the name, the next start) tries again.
    fn delete_incomplete(
        &mut self,
        id: &PartitionId,
        dir: PathBuf,
        error: io::Error,
    ) -> StorageError {
        self.ctx
            .shared
            .unloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(super::Quarantine {
                partition: id.clone(),
                reason: super::QuarantineReason::DeleteIncomplete {
                    cause: error.to_string(),
                },
            });
        StorageError::DeleteIncomplete {
            id: id.clone(),
            dir,
            error,
        }
    }

    /// Deletes a partition recovery (or a delete that could not finish)
    /// left unloaded: its directory goes, as a loaded partition's does.
    fn delete_unloaded(&mut self, id: &PartitionId) -> Result<(), StorageError> {
        let mut unloaded = self
            .ctx
            .shared
            .unloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(i) = unloaded.iter().position(|q| q.partition == *id) else {
            return Err(StorageError::UnknownPartition(id.clone()));
        };
        let gone = unloaded.remove(i);
        drop(unloaded);
        // Recovery counted it as quarantined; a delete left incomplete
        // never was (and, failing again, is kept as one).
        if !matches!(
            gone.reason,
            super::QuarantineReason::DeleteIncomplete { .. }
        ) {
            StatsInner::sub(&self.ctx.shared.stats.quarantined, 1);
        }
        let dir = part_dir(&self.ctx.cfg.data_dir, id);
        match self.remove_dir(&dir, 0) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.delete_incomplete(id, dir, e)),
        }
    }

    /// Unloads the partition, then removes its directory. When that
    /// fails, the partition stays unloaded all the same (nothing is
    /// written to it any more) and the error names the directory.
    fn delete(&mut self, id: &PartitionId) -> Result<(), StorageError> {
        self.reap_checkpoints(true);
        self.compact_abort(id);
        let Some(mut part) = self.parts.remove(id) else {
            return self.delete_unloaded(id);
        };
        if matches!(part.state, PartState::Quarantined(_)) {
            StatsInner::sub(&self.ctx.shared.stats.quarantined, 1);
        }
        self.ctx
            .shared
            .parts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        for p in part.commit.pending.drain(..) {
            let _ = p
                .reply
                .send(Err(StorageError::UnknownPartition(id.clone())));
        }
        for &f in &part.files {
            self.ctx.close(f);
        }
        part.shared.event.notify(usize::MAX);
        self.give_tail(part.tail.buf);
        let dir = part.dir.clone();
        // partition.meta goes first: a crash mid-delete leaves a directory
        // without it, which start-up recovers quarantined if batches remain
        // (the broker then finishes the delete: its topic is gone). It is
        // already missing from a partition recovered without it. Kept, the
        // rest is too: the partition loads whole at the next start.
        let meta_gone = match std::fs::remove_file(dir.join(PARTITION_META)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => self.ctx.io.sync_dir(&dir),
        };
        if let Err(e) = meta_gone {
            return Err(self.delete_incomplete(id, dir, e));
        }
        for &no in &part.file_nos {
            let _ = self.ctx.io.remove(&seg_path(&dir, no as usize));
        }
        let _ = std::fs::remove_file(dir.join(super::part::RING_META));
        if let Err(e) = self.remove_dir(&dir, part.ring.segs.len()) {
            return Err(self.delete_incomplete(id, dir, e));
        }
        log::info!("deleted partition {id}");
        Ok(())
    }

    /// Appends `batch` from `producer`, which answered its last ack by
    /// sending it (at `now`). One look-up of the partition as a rule: a
    /// fan-in makes one append per record.
    pub(super) fn append(
        &mut self,
        id: PartitionId,
        mut batch: super::BatchBuf,
        checked: Prechecked,
        reply: super::AppendReply,
        producer: u64,
        now: Instant,
    ) {
        let Some(mut p) = self.parts.get_mut(&id) else {
            let _ = reply.send(Err(self.ctx.shared.not_loaded(&id)));
            return;
        };
        if p.commit.answered(producer, now) {
            self.group.returning -= 1;
        }
        // A roll makes the old segment durable synchronously: the group in
        // flight completes first.
        if p.ring.segs[p.ring.active()].end_pos + batch.len() as u64 > p.cfg.segment_bytes
            && !self.group.inflight.is_empty()
        {
            self.finish_inflight();
            let Some(again) = self.parts.get_mut(&id) else {
                let _ = reply.send(Err(self.ctx.shared.not_loaded(&id)));
                return;
            };
            p = again;
        }
        let r = p.append(&mut self.ctx, &mut batch, checked);
        // Copied into the tail (or refused): the buffer goes back to its
        // pool for the next batch to be decoded into, or with the reply
        // to the thread that allocated it (see `Pending::spent`).
        let spent = batch
            .into_unpooled()
            .filter(|b| b.capacity() <= SPENT_BACK_BYTES_MAX);
        match r {
            Ok(ack) => {
                p.commit.pending.push(Pending {
                    reply,
                    ack,
                    producer,
                    spent,
                });
                let now = self.ctx.cfg.clock.now();
                p.commit.first_pending_at.get_or_insert(now);
            }
            Err(e) => {
                reply.send_with(Err(e), spent);
            }
        }
    }

    fn housekeeping(&mut self, force: bool) {
        let now = self.ctx.cfg.clock.now();
        if now >= self.next_retention_check {
            self.next_retention_check = now + Duration::from_millis(RETENTION_CHECK_INTERVAL_MS);
            let now_ms = self.ctx.cfg.clock.wall_ms();
            for p in self.parts.values_mut() {
                if p.apply_time_retention(now_ms) {
                    p.publish();
                }
            }
        }
        self.reap_checkpoints(false);
        self.reap_create_syncs(false);
        // A quarantined or failed partition keeps its checkpoint as it is:
        // it is the evidence of what was durable, and rewriting it smaller
        // would let the next start truncate acknowledged data.
        let moved = |p: &Part| p.state == PartState::Ok && p.durable != p.checkpointed;
        let interval = Duration::from_millis(CHECKPOINT_INTERVAL_MS);
        let due = force
            || self
                .parts
                .values()
                .any(|p| moved(p) && now >= p.last_checkpoint + interval);
        if due && self.checkpointing.is_none() {
            // Every checkpoint that moved goes with the one that is due, so
            // that their flushes are shared (in flight together on the
            // pool's threads, `syncpool::CHECKPOINTS`) and stay in step
            // from then on. Each claims what is durable now.
            let mut files = Vec::new();
            for p in self.parts.values_mut().filter(|p| moved(p)) {
                p.last_checkpoint = now;
                files.push((p.id.clone(), p.durable, checkpoint_path(p)));
            }
            let mut writes = Vec::with_capacity(files.len());
            for (id, ck, path) in files {
                match self
                    .checkpoint_pool
                    .try_run(move || super::meta::overwrite(&path, &ck))
                {
                    Ok(w) => writes.push((id, ck, w)),
                    // No thread (EAGAIN, on a board out of memory or
                    // threads): logged as a failed write, and tried again
                    // at the next refresh.
                    Err(e) => {
                        let p = self.parts.get_mut(&id).expect("listed above");
                        checkpoint_written(p, ck, Err(super::meta::MetaError::Io(e)));
                    }
                }
            }
            if !writes.is_empty() {
                self.checkpointing = Some(CheckpointRefresh { writes });
            }
        }
    }

    /// Takes in a checkpoint refresh that is done, or with `wait`, waits
    /// for the one in flight: before a partition's directory goes (a
    /// partition made again under its name must not get the old one's
    /// checkpoint) and before a clean shutdown's checkpoints are written.
    fn reap_checkpoints(&mut self, wait: bool) {
        let Some(r) = self.checkpointing.take_if(|r| wait || r.is_done()) else {
            return;
        };
        for (id, ck, w) in r.writes {
            w.wait();
            let res = w.take().unwrap_or_else(|| {
                Err(super::meta::MetaError::Io(io::Error::other(
                    "a checkpoint write panicked",
                )))
            });
            if let Some(p) = self.parts.get_mut(&id) {
                checkpoint_written(p, ck, res);
            }
        }
    }

    fn shutdown_all(&mut self) -> Result<(), StorageError> {
        // Unfinished creates leave nothing; a broker whose table lists the
        // topic makes the partition again at its next start.
        for c in std::mem::take(&mut self.creating) {
            self.create_failed(c, StorageError::ShuttingDown);
        }
        self.reap_create_syncs(true);
        self.reap_checkpoints(true);
        self.checkpoint_pool.close();
        self.commit_round(true, &|| false);
        self.finish_inflight();
        let ids: Vec<PartitionId> = self.parts.keys().cloned().collect();
        for id in ids {
            let p = self.parts.get_mut(&id).expect("listed");
            if p.state == PartState::Ok && p.commit_now(&mut self.ctx, true).is_ok() {
                let ck = Checkpoint {
                    clean: true,
                    ..p.durable
                };
                write_checkpoint(p, ck, self.ctx.cfg.clock.now());
            }
            for &f in &p.files {
                self.ctx.close(f);
            }
        }
        self.parts.clear();
        Ok(())
    }
}

/// A full disk at creation is the one ENOSPC a ring can meet: the error
/// says how much the partition needed.
fn no_space_at_create(
    id: &PartitionId,
    cfg: &PartitionConfig,
) -> impl Fn(io::Error) -> StorageError {
    let (partition, bytes) = (id.clone(), cfg.ring_bytes());
    move |e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            StorageError::InsufficientSpace {
                partition: partition.clone(),
                bytes,
            }
        } else {
            e.into()
        }
    }
}

/// The record count in a batch's header (0 for a buffer too short to
/// hold one).
fn batch_records(batch: &[u8]) -> u32 {
    batch
        .get(crate::batch::OFFSET_RECORD_COUNT..crate::batch::OFFSET_RECORD_COUNT + 4)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

/// The producer id in a batch's header (`NO_PRODUCER_ID` when not
/// idempotent; 0 for a buffer too short to hold one).
fn batch_producer(batch: &[u8]) -> u64 {
    batch
        .get(crate::batch::OFFSET_PRODUCER_ID..crate::batch::OFFSET_PRODUCER_ID + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}
