//! Group commit: which partitions are written and fdatasynced together,
//! when their acks go out, and the fdatasync group in flight.
//!
//! A round writes every partition whose durability policy says "now" with
//! one [`IoBackend::write_batch`](super::IoBackend::write_batch); the
//! partitions whose acks wait for an fdatasync then join the next sync
//! group, which runs inline (fdatasync(2) on the storage thread) or, with
//! `pipelined_fsync`, in the background while the next round is written.

use super::engine::{
    interval_gather, Ctx, Engine, INTERVAL_WRITE_EARLY_BYTES, SYNC_HOLD_RETURNS_MAX,
};
use super::fanin::FanIn;
use super::io::{FileHandle, WriteOp};
use super::part::{Part, PartState};
use super::recovery::Checkpoint;
use super::{AppendAck, Durability, PartitionId, StatsInner, StorageError};
use std::io;
use std::time::{Duration, Instant};

/// Whether every append came from one producer id (non-idempotent ones
/// all count as one).
fn one_producer(appends: &[Pending]) -> bool {
    appends.windows(2).all(|w| w[0].producer == w[1].producer)
}

/// A producer awaiting its acks one or two at a time: the kind a heavy
/// partition's flush delays most (`Engine::defer_heavy`).
const DEFER_LIGHT_MAX: usize = 2;
/// A heavy partition has at least this many appends waiting, and this
/// many times the lightest one's.
const DEFER_HEAVY_MIN: usize = 16;
const DEFER_HEAVY_RATIO: usize = 8;
/// Inline, a flush this slow (an SD card's are 2 to 20 ms; this VM's
/// disk's about 0.25) makes the appends queued behind a round worth
/// writing before the flush (`Engine::writes_ahead`).
const WRITE_AHEAD_MIN_FLUSH: Duration = Duration::from_millis(1);
/// ... for as long as writing has taken under this many flushes since the
/// last one: the flush is then at most a fifth of the device's time.
const WRITE_AHEAD_FLUSHES: u32 = 4;
/// Inline, on such a device, a group over this many files starts their
/// fdatasyncs together (`Engine::sync_inline`). The block layer serves
/// every flush asked for while one is in flight with one flush after it,
/// so k files cost about two flushes instead of k. Two gain nothing: the
/// second waits for the first's flush either way.
const TOGETHER_MIN_FILES: usize = 3;

pub(super) struct Pending {
    pub(super) reply: super::AppendReply,
    pub(super) ack: AppendAck,
    /// The batch's producer id (`NO_PRODUCER_ID` when not idempotent):
    /// one producer's many appends are a pipeline, many producers' a
    /// fan-in (`Engine::defer_heavy`).
    pub(super) producer: u64,
    /// The batch's buffer when no pool takes it back (a small batch's),
    /// copied from already: it goes back with the ack, so that the
    /// network thread that allocated it frees it. Freed here, a thousand
    /// at a time after each group commit, such buffers contended for that
    /// thread's malloc arena (glibc's lock wake-ups were 6% of its time
    /// at 1,000 devices, docs/performance.md).
    pub(super) spent: Option<Vec<u8>>,
}

impl Pending {
    /// Acks the append: durable (or written, under a policy that does not
    /// wait for the flush).
    pub(super) fn acked(self) {
        self.reply.send_with(Ok(self.ack), self.spent);
    }

    pub(super) fn failed(self, e: StorageError) {
        self.reply.send_with(Err(e), self.spent);
    }
}

/// A partition's place in the group commit: appends copied into its tail,
/// waiting to be written, for an fdatasync, or for the one in flight.
#[derive(Default)]
pub(super) struct CommitState {
    /// Written but not yet fdatasynced.
    pub(super) unsynced: bool,
    /// Appends copied into the tail, not yet written.
    pub(super) pending: Vec<Pending>,
    /// Written, waiting for their fdatasync to start (the next one after
    /// the group in flight).
    pub(super) awaiting_sync: Vec<Pending>,
    /// Written under a policy that fdatasyncs: the next sync group must
    /// cover this partition.
    pub(super) sync_wanted: bool,
    /// Covered by the fdatasync in flight; acked when it completes.
    pub(super) syncing: Vec<Pending>,
    /// What becomes durable (and the high watermark) when it completes.
    pub(super) syncing_to: Checkpoint,
    pub(super) first_pending_at: Option<Instant>,
    /// When the oldest write not yet fdatasynced was made (`interval`
    /// syncs within its ms of it).
    pub(super) unsynced_since: Option<Instant>,
    /// Appends answering the last sync group's acks to this partition that
    /// the next sync still waits for (see `SyncGroup::returning`). 32 bits,
    /// as `returning_from`, to keep the partition's state the size the
    /// memory budget counts: holds follow groups of at most
    /// `SYNC_HOLD_RETURNS_MAX` appends.
    pub(super) returning: u32,
    /// Unpipelined: the producers the last group acked here that have not
    /// answered yet, a bit each (`producer_bit`) however many appends it
    /// had. Fixed size, as every partition's state is counted in the
    /// memory budget: two producers sharing a bit count as one, which only
    /// shortens the wait.
    pub(super) returning_from: u32,
    /// The next sync waits for every one of `returning_from`, not only for
    /// the first answer (see `Engine::start_hold`).
    pub(super) gathering: bool,
    /// When those acks went out, until the first answer came.
    pub(super) acked_at: Option<Instant>,
    /// How long this partition's producers take to answer their acks,
    /// smoothed: the next sync waits about that long for them.
    pub(super) answer_time: Option<Duration>,
    /// Its file was flushed by the last sync group (see `defer_heavy`).
    pub(super) flushed_last: bool,
}

/// A producer id's bit in `CommitState::returning_from`. The broker hands
/// out ids in sequence, and Fibonacci hashing keeps any 16 consecutive ids
/// on distinct bits (28 of 32 consecutive ones).
fn producer_bit(producer: u64) -> u32 {
    1 << (super::fanin::hash(producer) >> 27)
}

impl CommitState {
    /// An append from `producer` arrived: it may answer the last group's
    /// acks.
    pub(super) fn answered(&mut self, producer: u64, now: Instant) -> bool {
        if let Some(at) = self.acked_at.take() {
            let took = now - at;
            self.answer_time = Some(match self.answer_time {
                Some(t) => (t * 7 + took) / 8,
                None => took,
            });
        }
        if self.returning == 0 {
            return false;
        }
        if self.gathering {
            // Producers that are not idempotent cannot be told apart: any
            // append answers for them, as one from an unknown producer
            // always did.
            let owed = [producer, crate::batch::NO_PRODUCER_ID]
                .map(producer_bit)
                .into_iter()
                .find(|&b| self.returning_from & b != 0);
            let Some(b) = owed else {
                return false;
            };
            self.returning_from &= !b;
        }
        self.returning -= 1;
        true
    }
}

/// The storage thread's fdatasync group: which partitions it covers while
/// in flight, and when the next one may start.
pub(super) struct SyncGroup {
    /// Partitions whose fdatasync group is in flight (`sync_start` done,
    /// `sync_wait` not yet): the next group is written meanwhile.
    pub(super) inflight: Vec<PartitionId>,
    inflight_files: usize,
    inflight_started: Instant,
    /// Group formation: appends acked by the last sync group that have not
    /// come back yet, the sum of its partitions' `CommitState::returning`.
    /// A closed-loop producer answers its acks with new appends within
    /// microseconds; starting the next fdatasync before they arrive would
    /// split its window over two flushes. Counted per partition, so that
    /// one partition's producer answering faster (a flood of small
    /// requests) cannot stand in for another's.
    pub(super) returning: usize,
    /// The partitions whose `returning` is not zero.
    returning_parts: Vec<PartitionId>,
    /// How long the next sync may wait for them
    /// (`StorageConfig::sync_hold_max`).
    pub(super) hold_until: Option<Instant>,
    /// Recent fdatasync group duration, smoothed.
    sync_ewma: Duration,
    /// Recent single fdatasync(2), smoothed: whether the device's flushes
    /// are slow enough to start a group's together. Taken from the ones
    /// made one at a time only, which a group started together does not
    /// change.
    flush_ewma: Duration,
    /// Time spent writing since the last flush started.
    writing: Duration,
    /// A fan-in's round, which the next flush may wait for.
    pub(super) fanin: FanIn,
}

impl SyncGroup {
    pub(super) fn new(now: Instant, fanin_producers: usize) -> SyncGroup {
        SyncGroup {
            inflight: Vec::new(),
            inflight_files: 0,
            inflight_started: now,
            returning: 0,
            returning_parts: Vec::new(),
            hold_until: None,
            sync_ewma: Duration::ZERO,
            flush_ewma: Duration::ZERO,
            writing: Duration::ZERO,
            fanin: FanIn::new(now, fanin_producers),
        }
    }
}

impl Part {
    /// After a successful write (and fdatasync when `synced`): advance
    /// the high watermark and complete the acks.
    fn committed(&mut self, synced: bool, now: Instant) {
        self.tail.dirty_from = None;
        if synced {
            self.commit.unsynced = false;
            self.commit.unsynced_since = None;
            self.durable = self.end_checkpoint();
        } else {
            self.commit.unsynced = true;
            self.commit.unsynced_since.get_or_insert(now);
        }
        let advanced = self.hw != self.next_offset;
        self.hw = self.next_offset;
        // Publish before acking: a producer that got its ack must see the
        // high watermark at or past its batch.
        if advanced {
            self.publish();
        }
        // Synced, everything written so far is durable: the appends still
        // waiting for a group's fdatasync too, and they came first.
        let earlier = if synced {
            std::mem::take(&mut self.commit.awaiting_sync)
        } else {
            Vec::new()
        };
        for p in earlier.into_iter().chain(self.commit.pending.drain(..)) {
            p.acked();
        }
        self.commit.first_pending_at = None;
    }

    /// Acks the appends just written under a policy that does not wait
    /// for their fdatasync (`interval`, `never`): readable and acked now.
    fn ack_written(&mut self) {
        if self.hw != self.next_offset {
            self.hw = self.next_offset;
            self.publish();
        }
        for p in self.commit.pending.drain(..) {
            p.acked();
        }
    }

    /// What `commit_now(ctx, false)` wrote is durable, synced by another
    /// thread (a create's, `Engine::create_sync`).
    pub(super) fn synced_elsewhere(&mut self, now: Instant) {
        self.committed(true, now);
    }

    /// Writes (and with `sync`, fdatasyncs) this partition alone, now.
    pub(super) fn commit_now(&mut self, ctx: &mut Ctx, sync: bool) -> Result<(), StorageError> {
        if let Some(e) = self.refuse_writes() {
            return Err(e);
        }
        // Nothing unwritten or unsynced: durable already (no group is in
        // flight for it when a sync is asked for: callers finish it first).
        let clean = self.tail.dirty_from.is_none() && !self.commit.unsynced;
        let durable_after = sync;
        let sync = sync && !clean;
        let file = self.files[self.ring.active()];
        let res = {
            let op = self.dirty_write();
            let ops: &[WriteOp<'_>] = match &op {
                Some(op) => std::slice::from_ref(op),
                None => &[],
            };
            if ops.is_empty() && !sync {
                None
            } else {
                let files = [file];
                let syncs: &[FileHandle] = if sync { &files } else { &[] };
                Some(ctx.write_batch(ops, syncs))
            }
        };
        match res {
            None | Some(Ok(())) => {
                self.committed(durable_after, ctx.cfg.clock.now());
                Ok(())
            }
            Some(Err(e)) => {
                self.fail(&e, &ctx.shared.stats);
                Err(self.refuse_writes().expect("failed"))
            }
        }
    }
}

impl Engine {
    /// One group commit, pipelined: every partition whose policy says "now"
    /// gets its dirty tail written (one `write_batch`), even while the
    /// previous group's fdatasync is in flight; when none is, this group's
    /// fdatasyncs start, to complete while the next group is written.
    /// `Never` partitions are acked right after their write. `more_queued`
    /// says whether appends wait in the queue behind this round.
    pub(super) fn commit_round(&mut self, force: bool, more_queued: &dyn Fn() -> bool) {
        let now = self.ctx.cfg.clock.now();
        let idle = self.group.inflight.is_empty();
        // Gathering a fan-in's round: its records are written with the
        // flush, in one write, not one by one as they come.
        let gathering = !force
            && self
                .group
                .fanin
                .holding(now, self.ctx.cfg.sync_hold_max, self.ctx.cfg.fanin_wait);
        // (partition, write it now, its acks wait for the next sync group)
        let mut due: Vec<(PartitionId, bool)> = Vec::new();
        for p in self.parts.values_mut() {
            if p.state != PartState::Ok {
                continue;
            }
            let dirty = p.tail.dirty_from.is_some();
            let work =
                dirty || p.commit.unsynced || !p.commit.pending.is_empty() || p.commit.sync_wanted;
            if !work || (gathering && p.cfg.durability == Durability::Always) {
                continue;
            }
            let (is_due, acks_wait_for_sync) = match p.cfg.durability {
                Durability::Always => (true, true),
                Durability::IntervalMs(ms) => {
                    let gathered = p.commit.first_pending_at.is_some_and(|t| {
                        now >= t + interval_gather(ms)
                            || p.tail.len - p.tail.dirty_from.unwrap_or(p.tail.len)
                                >= INTERVAL_WRITE_EARLY_BYTES
                    });
                    let sync_late = p
                        .commit
                        .unsynced_since
                        .is_some_and(|t| now >= t + Duration::from_millis(u64::from(ms)));
                    if force || sync_late {
                        p.commit.sync_wanted = true;
                    }
                    (force || gathered || sync_late, force)
                }
                Durability::Never => {
                    p.commit.sync_wanted |= force;
                    (force || dirty || !p.commit.pending.is_empty(), force)
                }
            };
            // A partition the next sync group covers has everything
            // appended written first, so the group's checkpoint (where the
            // log ends) is all on disk.
            let is_due = is_due || (idle && p.commit.sync_wanted);
            if is_due {
                due.push((p.id.clone(), acks_wait_for_sync));
            }
        }
        if !due.is_empty() {
            let res = {
                let Engine {
                    ctx, parts, group, ..
                } = &mut *self;
                let ops: Vec<WriteOp<'_>> = due
                    .iter()
                    .filter_map(|(id, _)| parts[id].dirty_write())
                    .collect();
                if ops.is_empty() {
                    Ok(())
                } else {
                    let t0 = ctx.cfg.clock.now();
                    let res = ctx.write_batch(&ops, &[]);
                    group.writing += ctx.cfg.clock.now() - t0;
                    res
                }
            };
            for (id, acks_wait_for_sync) in &due {
                let p = self.parts.get_mut(id).expect("collected above");
                match &res {
                    // After an error nothing about the other writes of the
                    // submission may be assumed: every partition in it fails.
                    Err(e) => p.fail(e, &self.ctx.shared.stats),
                    Ok(()) => {
                        if p.tail.dirty_from.take().is_some() {
                            p.commit.unsynced = true;
                        }
                        if p.commit.unsynced {
                            p.commit.unsynced_since.get_or_insert(now);
                        }
                        p.commit.first_pending_at = None;
                        if *acks_wait_for_sync {
                            p.commit.awaiting_sync.append(&mut p.commit.pending);
                            p.commit.sync_wanted = true;
                        } else {
                            p.ack_written();
                        }
                    }
                }
            }
        }
        if idle && (force || !self.holding(now)) {
            if !force && self.writes_ahead() && more_queued() {
                return;
            }
            // The hold is over whether or not a flush starts: a producer
            // that never answers (its last record sent) would otherwise
            // leave a past deadline that wakes the thread again and again.
            self.group.hold_until = None;
            if self.group.fanin.active() {
                let waited = self.group.fanin.end(now);
                self.bell.hush(false);
                if let Some(obs) = &self.ctx.cfg.observer {
                    obs.0.fanin_wait(waited);
                }
            }
            self.start_syncs(force);
        }
    }

    /// Whether the next sync group waits for appends answering the last
    /// group's acks: at most half a recent fdatasync (waiting longer would
    /// cost more than the extra flush it saves) and the configured bound.
    pub(super) fn holding(&self, now: Instant) -> bool {
        self.group.returning > 0 && self.group.hold_until.is_some_and(|t| now < t)
            || self
                .group
                .fanin
                .holding(now, self.ctx.cfg.sync_hold_max, self.ctx.cfg.fanin_wait)
    }

    /// Inline, on a slow device, whether the appends queued behind this
    /// round are written before the flush rather than after it. There,
    /// one producer's window of 1,000 records of 1 KiB takes 50 ms to
    /// write at 20 MB/s against an 11 ms flush, and with the flush started
    /// as soon as a round's writes are done, the window was split over two
    /// groups and every flush covered half of it (0.55 of the device's
    /// bandwidth). Nothing is waited for: only what already queued up
    /// while writing joins, so a quick device, where the two alternating
    /// groups keep the device and the network threads both busy, is not
    /// touched, and the writing is bounded to a few flushes' time.
    fn writes_ahead(&self) -> bool {
        let flush = self.group.sync_ewma;
        !self.ctx.cfg.pipelined_fsync
            && flush >= WRITE_AHEAD_MIN_FLUSH
            && self.group.writing < flush * WRITE_AHEAD_FLUSHES
    }

    /// Starts the fdatasync group of every partition that wants one. Only
    /// with no group in flight, right after `commit_round` wrote them.
    fn start_syncs(&mut self, force: bool) {
        debug_assert!(self.group.inflight.is_empty());
        self.group.writing = Duration::ZERO;
        let skip_heavy = if force || self.ctx.cfg.pipelined_fsync {
            None
        } else {
            self.defer_heavy()
        };
        let mut files = Vec::new();
        for p in self.parts.values_mut() {
            let flushed_last = std::mem::take(&mut p.commit.flushed_last);
            if !p.commit.sync_wanted || p.state != PartState::Ok {
                p.commit.sync_wanted = false;
                continue;
            }
            if flushed_last
                && p.commit.unsynced
                && skip_heavy.is_some_and(|n| p.commit.awaiting_sync.len() >= n)
                && one_producer(&p.commit.awaiting_sync)
            {
                // Stays wanted: the next group flushes it.
                continue;
            }
            p.commit.sync_wanted = false;
            debug_assert!(p.tail.dirty_from.is_none(), "written before its sync");
            if !p.commit.unsynced {
                // Nothing written since the last fdatasync: durable already.
                if p.hw != p.next_offset {
                    p.hw = p.next_offset;
                    p.publish();
                }
                for a in p.commit.awaiting_sync.drain(..) {
                    a.acked();
                }
                continue;
            }
            p.commit.syncing.append(&mut p.commit.awaiting_sync);
            p.commit.syncing_to = p.end_checkpoint();
            p.commit.unsynced = false;
            p.commit.unsynced_since = None;
            p.commit.flushed_last = true;
            files.push(p.files[p.ring.active()]);
            self.group.inflight.push(p.id.clone());
        }
        if files.is_empty() {
            return;
        }
        self.group.inflight_files = files.len();
        self.group.inflight_started = self.ctx.cfg.clock.now();
        if self.ctx.cfg.pipelined_fsync {
            if let Err(e) = self.ctx.io.sync_start(&files) {
                self.fail_inflight(&e);
            }
        } else {
            self.sync_inline(files);
        }
    }

    /// Inline, every file of a group is one more flush for all of its
    /// partitions' producers to wait through. A partition whose acks
    /// wait in bulk from one producer (a client pipelining many small
    /// requests) beside one whose producer awaits each ack (one or two
    /// waiting) costs that producer a flush per group it did not need: so
    /// the heavy one is flushed every other group, which halves its
    /// flushes and leaves it most of every other group's records. Many
    /// producers' appends (a fan-in) are never deferred for one. Returns
    /// how many waiting appends make a partition heavy in this group, if
    /// any may wait.
    fn defer_heavy(&self) -> Option<usize> {
        let lightest = self
            .parts
            .values()
            .filter(|p| p.commit.sync_wanted && p.commit.unsynced && p.state == PartState::Ok)
            .map(|p| p.commit.awaiting_sync.len())
            .filter(|&n| n > 0)
            .min()?;
        (lightest <= DEFER_LIGHT_MAX).then_some(DEFER_HEAVY_MIN.max(lightest * DEFER_HEAVY_RATIO))
    }

    /// The unpipelined group: one fdatasync(2) after another, each
    /// partition acked as soon as its own completes (or failed alone when
    /// it fails). Each costs the device a cache flush, so a partition's
    /// place in the order is a flush of latency: the ones with the fewest
    /// appends waiting go first (a producer awaiting one ack answers it
    /// while the next file flushes, where a deep window hardly notices),
    /// and those with none (an `interval` sync) last.
    ///
    /// On a slow device a group over many files starts them all at once
    /// instead (`TOGETHER_MIN_FILES`): a light load spread over many
    /// partitions made one flush per partition per group, which on an SD
    /// card capped it at about one record per flush (docs/performance.md,
    /// "many partitions on one card"). Each file still gets its own
    /// fdatasync, so nothing is assumed about the file system. An error
    /// fails every partition of the group, as in a pipelined group: which
    /// file failed is not known, and a second fdatasync of a file whose
    /// writeback failed may report success.
    fn sync_inline(&mut self, files: Vec<FileHandle>) {
        if files.len() >= TOGETHER_MIN_FILES && self.group.flush_ewma >= WRITE_AHEAD_MIN_FLUSH {
            self.sync_together(files);
            return;
        }
        self.forget_returning();
        let group = std::mem::take(&mut self.group.inflight);
        let mut order: Vec<(usize, &PartitionId, FileHandle)> = group
            .iter()
            .zip(files)
            .map(|(id, f)| {
                let waiting = self.parts.get(id).map_or(0, |p| p.commit.syncing.len());
                (if waiting == 0 { usize::MAX } else { waiting }, id, f)
            })
            .collect();
        order.sort_by_key(|&(waiting, ..)| waiting);
        let mut acked = 0;
        // Times are taken before the acks they precede (a test's manual
        // clock moves once its acks are in): when the first acks went out,
        // which a producer's answer is timed from, and when the last file's
        // flush ended.
        let mut acks_at = None;
        let mut synced_at = None;
        let serve_reads = self.readers_recent();
        for (_, id, file) in order {
            let started = self.ctx.cfg.clock.now();
            // A consumer's fetches are answered during the flush rather
            // than after the group (fetches of durable data waited up to
            // seconds behind a throttled disk's rounds).
            let res = if serve_reads {
                self.ctx
                    .io
                    .sync_start(&[file])
                    .and_then(|()| self.wait_serving_reads())
            } else {
                self.ctx.io.sync(file)
            };
            let now = self.ctx.cfg.clock.now();
            let took = now - started;
            self.group.flush_ewma = if self.group.flush_ewma.is_zero() {
                took
            } else {
                (self.group.flush_ewma * 7 + took) / 8
            };
            synced_at = Some(now);
            // Counted before the acks: whoever got one sees its flush.
            StatsInner::add(&self.ctx.shared.stats.fsyncs, 1);
            match res {
                Ok(()) => {
                    acks_at.get_or_insert(now);
                    acked += self.part_synced(id);
                }
                Err(e) => {
                    if let Some(p) = self.parts.get_mut(id) {
                        p.fail(&e, &self.ctx.shared.stats);
                    }
                }
            }
        }
        let now = synced_at.unwrap_or_else(|| self.ctx.cfg.clock.now());
        self.group_done(0, now);
        self.start_hold(group, acked, acks_at.unwrap_or(now));
    }

    /// `sync_inline`'s group started together: the fdatasyncs run at once
    /// (an io_uring FSYNC each) and the thread waits for them all.
    fn sync_together(&mut self, files: Vec<FileHandle>) {
        let res = self.ctx.io.sync_start(&files).and_then(|()| {
            if self.readers_recent() {
                self.wait_serving_reads()
            } else {
                self.ctx.io.sync_wait()
            }
        });
        self.complete_inflight(res);
    }

    /// Waits for the fdatasync group in flight and acks what it covered.
    pub(super) fn finish_inflight(&mut self) {
        if self.group.inflight.is_empty() {
            return;
        }
        let res = self.ctx.io.sync_wait();
        self.complete_inflight(res);
    }

    /// Completes the group in flight if it is done, without waiting;
    /// whether it was.
    pub(super) fn poll_inflight(&mut self) -> bool {
        if self.group.inflight.is_empty() {
            return false;
        }
        match self.ctx.io.sync_poll() {
            Some(res) => {
                self.complete_inflight(res);
                true
            }
            None => false,
        }
    }

    fn complete_inflight(&mut self, res: io::Result<()>) {
        self.forget_returning();
        let now = self.ctx.cfg.clock.now();
        self.group_done(self.group.inflight_files, now);
        if let Err(e) = res {
            self.fail_inflight(&e);
            return;
        }
        let group = std::mem::take(&mut self.group.inflight);
        let acked = group.iter().map(|id| self.part_synced(id)).sum();
        self.start_hold(group, acked, now);
    }

    /// The group's flush ended at `now`: its statistics, with `files` more
    /// fdatasyncs.
    fn group_done(&mut self, files: usize, now: Instant) {
        let elapsed = now - self.group.inflight_started;
        self.group.sync_ewma = if self.group.sync_ewma.is_zero() {
            elapsed
        } else {
            (self.group.sync_ewma * 7 + elapsed) / 8
        };
        let st = &self.ctx.shared.stats;
        StatsInner::add(&st.fsyncs, files as u64);
        StatsInner::add(&st.fsync_latency_us_sum, elapsed.as_micros() as u64);
        StatsInner::add(&st.fsync_latency_count, 1);
        if let Some(obs) = &self.ctx.cfg.observer {
            obs.0.sync_group(elapsed);
        }
    }

    /// A partition's fdatasync of the group completed: what it covered is
    /// durable and readable, and its acks go out. Returns how many.
    fn part_synced(&mut self, id: &PartitionId) -> usize {
        let Some(p) = self.parts.get_mut(id) else {
            return 0;
        };
        if matches!(p.state, PartState::Failed { .. }) {
            return 0;
        }
        p.durable = p.commit.syncing_to;
        p.hw = p.hw.max(p.commit.syncing_to.next_offset);
        p.publish();
        let acked = p.commit.syncing.len();
        for a in &p.commit.syncing {
            self.group.fanin.collect(a.producer);
        }
        p.commit.returning = u32::try_from(acked).unwrap_or(u32::MAX);
        p.commit.returning_from = p
            .commit
            .syncing
            .iter()
            .fold(0, |bits, a| bits | producer_bit(a.producer));
        // Newest first: a caller waiting on the oldest append (callers
        // wait in order) wakes once, with the whole group done, and can
        // hand over as many new appends together.
        for a in p.commit.syncing.drain(..).rev() {
            a.acked();
        }
        acked
    }

    /// Only the last group's answers are waited for.
    fn forget_returning(&mut self) {
        self.group.returning = 0;
        for id in std::mem::take(&mut self.group.returning_parts) {
            if let Some(p) = self.parts.get_mut(&id) {
                p.commit.returning = 0;
                p.commit.gathering = false;
            }
        }
    }

    /// After a group's acks (`acked` of them): how long the next sync
    /// waits for the appends that answer them, and for which partitions.
    fn start_hold(&mut self, group: Vec<PartitionId>, acked: usize, now: Instant) {
        // Inline, most answers arrive during the blocking flush and queue
        // up by themselves, and waiting for all of them after it would idle
        // the device while a producer with a deep window works (0.84x in
        // A/B): the hold waits only for each partition's first answer, a
        // producer that has not sent anything yet (one whose acks came
        // last, behind a flood's on another partition). A fan-in is the
        // exception (`gathering` below).
        let pipelined = self.ctx.cfg.pipelined_fsync;
        let max = self.ctx.cfg.sync_hold_max;
        // Half a flush, or as long as the producer usually takes to answer
        // (a round trip through the network threads can take longer than a
        // flush), at most `sync_hold_max`.
        let base = self.group.sync_ewma / 2;
        let mut hold = Duration::ZERO;
        for id in group {
            let Some(p) = self.parts.get_mut(&id) else {
                continue;
            };
            if p.commit.returning > 0 {
                p.commit.acked_at = Some(now);
            }
            let answer = p.commit.answer_time.unwrap_or(Duration::ZERO);
            // Unpipelined, many producers with a record each (a fan-in)
            // are all waited for (within the hold) where the first answer
            // comes within a quarter of a flush, a slow device: they then
            // share the next flush instead of alternating between two,
            // each waiting for two. Where flushes are quick, waiting for
            // the network threads to take every answer would idle the
            // device, and two groups alternating keep both busy: only the
            // first answer is waited for.
            let producers = p.commit.returning_from.count_ones();
            p.commit.gathering =
                !pipelined && producers > 1 && p.commit.answer_time.is_some() && answer * 2 <= base;
            if p.commit.gathering {
                p.commit.returning = producers;
            } else if !pipelined {
                p.commit.returning = p.commit.returning.min(1);
            }
            // A producer that does not answer within the bound (one that
            // sends now and then) is not waited for.
            if acked > SYNC_HOLD_RETURNS_MAX || p.commit.returning == 0 || answer > max {
                p.commit.returning = 0;
                p.commit.gathering = false;
                continue;
            }
            hold = hold.max(base.max(answer * 5 / 4).min(max));
            self.group.returning += p.commit.returning as usize;
            self.group.returning_parts.push(id);
        }
        self.group.hold_until = (self.group.returning > 0).then(|| now + hold);
        let flush = self.group.sync_ewma;
        let wait = !pipelined && !max.is_zero() && !self.ctx.cfg.fanin_wait.is_zero();
        if self
            .group
            .fanin
            .start(now, flush, wait, self.ctx.cfg.fanin_wait)
        {
            self.bell.hush(true);
        }
    }

    fn fail_inflight(&mut self, e: &io::Error) {
        for id in std::mem::take(&mut self.group.inflight) {
            if let Some(p) = self.parts.get_mut(&id) {
                p.fail(e, &self.ctx.shared.stats);
            }
        }
    }
}
