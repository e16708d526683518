//! The read path: fetches (from the tail buffer or a segment file, through
//! the sparse index or where the last fetch stopped), read-ahead for
//! sequential readers, and offset-for-timestamp.

use super::engine::{Ctx, Engine, B, B64, INDEX_INTERVAL_BYTES};
use super::io::{AlignedBuf, FileHandle, IoBackend};
use super::part::Part;
use super::readbuf::{ReadBuf, LEND_BYTES_MIN};
use super::recovery::{resync, DamagedRange, DataEnd, RecoveryPolicy, RecoveryReport};
use super::segment::SEG_HEADER_BYTES;
use super::{Observer, PartitionId, QuarantineReason, StatsInner, StorageError};
use crate::batch::{self, BatchError, HEADER_BYTES};
use bytes::Bytes;
use std::io;
use std::ops::{Range, RangeInclusive};

/// The batch a fetch stopped before: a consumer's next fetch starts at the
/// end of the last batch it got, and starting at the next batch's position
/// (not at the sparse index entry before it, up to [`INDEX_INTERVAL_BYTES`]
/// earlier) reads no bytes twice and finds the window read ahead for it.
#[derive(Debug, Clone)]
pub(super) struct Resume {
    /// The offsets a fetch may ask for to start at `pos`, `from..=to`: no
    /// batch lies between them and it (a gap in the log may come before
    /// it).
    from: u64,
    to: u64,
    slot: usize,
    /// The slot's segment epoch then: a reused slot holds other batches.
    epoch: u64,
    pos: u64,
}

impl Part {
    /// Where a fetch for `offset` starts reading in `slot`: where the last
    /// fetch stopped if that suits this offset, else the index's entry.
    fn fetch_start(&self, slot: usize, offset: u64) -> u64 {
        match &self.resume {
            Some(r)
                if (r.from..=r.to).contains(&offset)
                    && r.slot == slot
                    && r.epoch == self.ring.segs[slot].epoch =>
            {
                r.pos
            }
            _ => self.ring.segs[slot].seek(offset),
        }
    }

    /// A fetch stopped before the batch at `pos` of `slot`, where a fetch
    /// for any of `offsets` starts.
    fn stopped_at(&mut self, slot: usize, offsets: RangeInclusive<u64>, pos: u64) {
        self.resume = Some(Resume {
            from: *offsets.start(),
            to: *offsets.end(),
            slot,
            epoch: self.ring.segs[slot].epoch,
            pos,
        });
    }

    /// A batch that failed its checks twice at `pos` of `slot`: damage on
    /// the device. Quarantines the partition; the error says where.
    fn corrupt_batch(
        &mut self,
        slot: usize,
        pos: u64,
        error: BatchError,
        stats: &StatsInner,
    ) -> StorageError {
        let why = QuarantineReason::CorruptBatch {
            slot: slot as u32,
            position: pos,
            error,
        };
        self.quarantine(why.clone(), stats);
        self.quarantined(why)
    }

    /// The lowest offset the batch at `pos` of `slot` can start at: the
    /// segment's base, or the last index entry at or before `pos`.
    fn offset_floor(&self, slot: usize, pos: u64) -> u64 {
        let seg = &self.ring.segs[slot];
        seg.index
            .iter()
            .take_while(|e| u64::from(e.pos) <= pos)
            .last()
            .map_or(seg.base_offset, |e| e.offset.max(seg.base_offset))
    }

    /// Damage a read found at `pos` of `slot`, in data already on the
    /// device (a closed segment, or the active one before its tail), and
    /// found again on a second read: under `SkipDamage` it is skipped as
    /// recovery skips damage (docs/semantics.md, "Damaged data"), up to the
    /// next intact batch, and reported; returns where the read goes on.
    /// `None`: the partition is quarantined instead.
    fn skip_damage(
        &mut self,
        ctx: &mut Ctx,
        slot: usize,
        pos: u64,
        min_offset: u64,
        error: BatchError,
    ) -> io::Result<Option<u64>> {
        if ctx.cfg.recovery_policy != RecoveryPolicy::SkipDamage {
            return Ok(None);
        }
        let active = slot == self.ring.active();
        let seg = &self.ring.segs[slot];
        // The active segment's bytes from the tail on are in memory: a
        // read of them is not the device's damage.
        let limit_pos = if active {
            self.tail.file_off
        } else {
            seg.end_pos
        };
        if pos >= limit_pos {
            return Ok(None);
        }
        let found = resync(
            &mut *ctx.io,
            &mut ctx.rbuf,
            self.files[slot],
            self.cfg.segment_bytes,
            pos,
            limit_pos,
            min_offset,
            seg.next_offset,
        )?;
        let (to_pos, to_offset) = match found {
            Some(at) => at,
            // Nothing intact after it: a closed segment's data ends here.
            None if !active => (seg.end_pos, seg.next_offset),
            None => return Ok(None),
        };
        self.ring.skips.push((slot, pos, to_pos));
        let range = DamagedRange {
            slot: slot as u32,
            position: pos,
            bytes: to_pos - pos,
            from_offset: min_offset,
            to_offset,
            found: DataEnd::Torn(error),
            found_ms: ctx.cfg.clock.wall_ms(),
        };
        log::error!(
            "partition {}: a read found damaged data at segment slot {slot} position {pos} \
             ({}): skipped {} bytes, offsets {min_offset}..{to_offset} lost; the log goes on \
             after them",
            self.id,
            range.found,
            range.bytes
        );
        if let Some(obs) = &ctx.cfg.observer {
            obs.0.damage_skipped(to_offset - min_offset);
        }
        note_damage(&ctx.shared.reports, &self.id, range);
        Ok(Some(to_pos))
    }

    /// Bytes of the active or a closed segment at `pos`: from the tail when
    /// they are in memory, else through `win` from the file.
    fn bytes_at<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        win: &mut Window,
        slot: usize,
        pos: u64,
        need: usize,
    ) -> io::Result<(&'a [u8], bool)> {
        if slot == self.ring.active() && pos >= self.tail.file_off {
            let from = (pos - self.tail.file_off) as usize;
            return Ok((
                &self.tail.buf[from.min(self.tail.len)..self.tail.len],
                false,
            ));
        }
        let limit = self.ring.segs[slot].end_pos.div_ceil(B64) * B64;
        let file = self.files[slot];
        if !win.covers(file, pos, need) {
            let Ctx {
                io,
                rbuf,
                ahead,
                shared,
                ..
            } = ctx;
            if let Some((start, len)) = ahead.take(&mut **io, rbuf, file, pos, need, &shared.stats)
            {
                win.file = Some(file);
                win.start = start;
                win.len = len;
            }
        }
        let before = (win.file, win.start, win.len);
        let bytes = window(&mut *ctx.io, &mut ctx.rbuf, win, file, pos, need, limit)?;
        if let Some(obs) = &ctx.cfg.observer {
            if (win.file, win.start, win.len) != before {
                obs.0.window_read(win.len as u64, false);
            }
        }
        Ok((bytes, true))
    }
}

/// Adds damage found after start-up to the partition's report, where
/// `topics describe` and the broker read what recovery skipped.
fn note_damage(reports: &std::sync::Mutex<Vec<RecoveryReport>>, id: &PartitionId, d: DamagedRange) {
    let mut reports = reports.lock().unwrap_or_else(|e| e.into_inner());
    match reports.iter_mut().rev().find(|r| &r.id == id) {
        Some(r) => r.damaged.push(d),
        None => reports.push(RecoveryReport {
            id: id.clone(),
            policy: RecoveryPolicy::SkipDamage,
            batches: 0,
            truncation: None,
            quarantine: None,
            bytes_truncated: 0,
            stale_erased: 0,
            checkpoint_unreadable: false,
            unreadable_restart_slot: None,
            damaged: vec![d],
            quarantined: false,
            earliest: 0,
            high_watermark: 0,
        }),
    }
}

/// A block-aligned range of one file held in the read buffer.
#[derive(Debug, Default)]
pub(super) struct Window {
    pub(super) file: Option<FileHandle>,
    pub(super) start: u64,
    pub(super) len: usize,
    /// Bytes worth reading at once (0: the whole buffer). A fetch of
    /// 16 KiB should not read a megabyte from the device.
    pub(super) hint: usize,
}

impl Window {
    /// Whether it holds `[pos, pos + need)` of `file`.
    pub(super) fn covers(&self, file: FileHandle, pos: u64, need: usize) -> bool {
        self.file == Some(file)
            && pos >= self.start
            && pos + need as u64 <= self.start + self.len as u64
    }

    fn with_hint(hint: usize) -> Window {
        Window {
            hint,
            ..Window::default()
        }
    }
}

/// Returns the file's bytes from `pos`, at least `need` of them unless the
/// file or `limit` (block-aligned) ends first, reading a new window into
/// `rbuf` when the current one does not cover them.
pub(super) fn window<'a>(
    io: &mut dyn IoBackend,
    rbuf: &'a mut AlignedBuf,
    win: &mut Window,
    file: FileHandle,
    pos: u64,
    need: usize,
    limit: u64,
) -> io::Result<&'a [u8]> {
    if !win.covers(file, pos, need) {
        let (start, len) = window_range(rbuf.len(), win.hint, pos, need, limit);
        let n = io.read_at(file, start, &mut rbuf[..len])?;
        win.file = Some(file);
        win.start = start;
        win.len = n.min(len);
    }
    let from = ((pos - win.start) as usize).min(win.len);
    Ok(&rbuf[from..win.len])
}

/// The block-aligned range `(start, len)` a window read for `need` bytes
/// at `pos` covers: from the block holding `pos`, the hint's worth (the
/// whole buffer of `buf_len` for hint 0), cut at `limit`.
fn window_range(buf_len: usize, hint: usize, pos: u64, need: usize, limit: u64) -> (u64, usize) {
    let start = pos / B64 * B64;
    let want = if hint == 0 {
        buf_len
    } else {
        // From the block start: the bytes wanted plus the offset into it.
        (need.max(hint) + (pos - start) as usize).div_ceil(B) * B
    };
    let len = (buf_len.min(want) as u64).min(limit.saturating_sub(start)) as usize;
    (start, len)
}

/// Read-ahead for sequential readers. A fetch that stops short of the
/// data on disk names the window its successor will want (from its first
/// window's headers, before it checks its batches, or else when it
/// returns), and that window is read in the background
/// ([`IoBackend::read_start`]) into a spare buffer, which the next
/// [`Part::bytes_at`] that it covers makes the read buffer. The
/// device then works while the answer is made, travels and is answered,
/// instead of after the next fetch arrives. Up to [`READ_AHEAD_SLOTS`](super::io::READ_AHEAD_SLOTS)
/// readers (partitions a consumer takes turns over, or several consumers)
/// each have a read ahead at a time.
#[derive(Debug, Default)]
pub(super) struct Ahead {
    slots: Vec<AheadSlot>,
    /// The read the last fetch suggests; started after its answer.
    next: Option<AheadKey>,
    /// The backend has no background reads (pwrite), as it said at
    /// start: nothing is planned.
    unsupported: bool,
    /// Counts fetches that planned a read, to age the slots.
    tick: u64,
    /// The last plan counted in `tick` (a fetch plans before and after
    /// its answer).
    ticked: Option<AheadKey>,
    observer: Option<Observer>,
}

#[derive(Debug, Default)]
struct AheadSlot {
    /// What the read in flight covers (into a spare of the `ReadBuf`).
    inflight: Option<AheadKey>,
    /// `Ahead::tick` when it was started.
    started: u64,
}

/// Fetches after which a read ahead that none used is taken for abandoned
/// (its reader stopped or moved) and its slot given to another reader.
/// More readers than slots taking turns leave read-ahead to as many of
/// them as there are slots, rather than wasting every read.
pub(super) const AHEAD_PASSES_MAX: u64 = 16;

/// A block-aligned range of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AheadKey {
    file: FileHandle,
    start: u64,
    len: usize,
}

impl Ahead {
    pub(super) fn new(slots: usize, supported: bool, observer: Option<Observer>) -> Ahead {
        Ahead {
            unsupported: !supported,
            slots: (0..slots).map(|_| AheadSlot::default()).collect(),
            observer,
            ..Ahead::default()
        }
    }

    /// After a fetch of `p` that stopped at `pos` of `slot`, with data
    /// left: plans the window the next fetch (of the same size, `hint`)
    /// will want, when it comes from the file and not from the tail.
    pub(super) fn plan(&mut self, p: &Part, slot: usize, pos: u64, hint: usize, buf_len: usize) {
        if self.unsupported {
            return;
        }
        let seg = &p.ring.segs[slot];
        // Blocks below the tail buffer are final until the slot is reused
        // (`forget`); the tail's partial block is rewritten as it grows.
        let limit = if slot == p.ring.active() {
            p.tail.file_off
        } else {
            seg.end_pos.div_ceil(B64) * B64
        };
        if pos >= seg.end_pos || pos >= limit {
            return;
        }
        let (start, len) = window_range(buf_len, hint, pos, HEADER_BYTES, limit);
        self.next = (len > 0).then_some(AheadKey {
            file: p.files[slot],
            start,
            len,
        });
    }

    /// Starts the read the last fetch planned, unless it is in flight
    /// already, in a free slot, or in one whose read has gone unused for
    /// [`AHEAD_PASSES_MAX`] fetches (dropping that read), into a spare of
    /// `bufs`. No slot or no spare free: not started.
    pub(super) fn start(&mut self, io: &mut dyn IoBackend, bufs: &mut ReadBuf, stats: &StatsInner) {
        let Some(key) = self.next.take() else {
            return;
        };
        if self.ticked != Some(key) {
            self.ticked = Some(key);
            self.tick += 1;
        }
        if self.unsupported || self.slots.iter().any(|s| s.inflight == Some(key)) {
            return;
        }
        let tick = self.tick;
        let free = self.slots.iter().position(|s| s.inflight.is_none());
        let stale = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| tick - s.started > AHEAD_PASSES_MAX)
                .min_by_key(|(_, s)| s.started)
                .map(|(i, _)| i)
        };
        let Some(i) = free.or_else(stale) else {
            return;
        };
        self.settle(io, bufs, i);
        let Some(buf) = bufs.take_spare() else {
            return;
        };
        match io.read_start(i, key.file, key.start, buf, key.len) {
            Ok(()) => {
                self.slots[i].inflight = Some(key);
                self.slots[i].started = tick;
                StatsInner::add(&stats.reads_ahead, 1);
            }
            // Refused this once (a ring that broke refuses every time,
            // cheaply): read on demand.
            Err(buf) => bufs.put_spare(buf),
        }
    }

    /// Completes slot `i`'s read in flight, if any, dropping its bytes and
    /// giving its buffer back to `bufs` (unless the backend gave it up).
    fn settle(&mut self, io: &mut dyn IoBackend, bufs: &mut ReadBuf, i: usize) {
        let slot = &mut self.slots[i];
        if slot.inflight.take().is_some() {
            if let Some((buf, res)) = io.read_finish(i) {
                if let (Some(obs), Ok(n)) = (&self.observer, res) {
                    obs.0.read_ahead_unused(n as u64);
                }
                bufs.put_spare(buf);
            }
        }
    }

    /// Before `file` is closed or written from its start again (a ring
    /// wrap): its bytes read ahead would be stale, and its handle may name
    /// another file next.
    pub(super) fn forget(&mut self, io: &mut dyn IoBackend, bufs: &mut ReadBuf, file: FileHandle) {
        for i in 0..self.slots.len() {
            if self.slots[i].inflight.is_some_and(|k| k.file == file) {
                self.settle(io, bufs, i);
            }
        }
        if self.next.is_some_and(|k| k.file == file) {
            self.next = None;
        }
    }

    /// When a read in flight covers `[pos, pos + need)` of `file`: waits
    /// for it, makes its buffer `rbuf`'s current one and returns the window it
    /// holds. `None` (nothing swapped) otherwise, or if it failed: the
    /// caller reads for itself, and sees any error for itself.
    pub(super) fn take(
        &mut self,
        io: &mut dyn IoBackend,
        rbuf: &mut ReadBuf,
        file: FileHandle,
        pos: u64,
        need: usize,
        stats: &StatsInner,
    ) -> Option<(u64, usize)> {
        let end = pos + need as u64;
        let i = self.slots.iter().position(|s| {
            s.inflight
                .is_some_and(|k| k.file == file && pos >= k.start && end <= k.start + k.len as u64)
        })?;
        let key = self.slots[i].inflight.take().expect("found above");
        let (buf, res) = io.read_finish(i)?;
        match res {
            Ok(n) if end <= key.start + n.min(key.len) as u64 => {
                StatsInner::add(&stats.reads_ahead_used, 1);
                if let Some(obs) = &self.observer {
                    obs.0.window_read(n as u64, true);
                }
                rbuf.install(buf);
                Some((key.start, n.min(key.len)))
            }
            res => {
                if let (Some(obs), Ok(n)) = (&self.observer, res) {
                    obs.0.read_ahead_unused(n as u64);
                }
                rbuf.put_spare(buf);
                None
            }
        }
    }
}

/// A fetch's answer as its batches are found: while they lie together in
/// the read buffer, only their range (the answer borrows the buffer at the
/// end, [`ReadBuf::lend`]); else a copy.
enum Gather {
    Empty,
    Window(Range<usize>),
    Copied(Vec<u8>),
}

impl Gather {
    fn len(&self) -> usize {
        match self {
            Gather::Empty => 0,
            Gather::Window(r) => r.len(),
            Gather::Copied(v) => v.len(),
        }
    }

    /// Adds a batch's `bytes`, found at `at` of the read buffer when they
    /// are in it. `reserve`: what a copy starts with room for. False (not
    /// added) when the batches so far are in the buffer and these do not
    /// follow them there: the caller keeps those first.
    fn push(&mut self, bytes: &[u8], at: Option<usize>, reserve: usize) -> bool {
        match (&mut *self, at) {
            (Gather::Empty, Some(at)) => *self = Gather::Window(at..at + bytes.len()),
            (Gather::Window(r), Some(at)) if r.end == at => r.end += bytes.len(),
            (Gather::Window(_), _) => return false,
            (Gather::Empty, None) => {
                let mut v = Vec::with_capacity(reserve.max(bytes.len()));
                v.extend_from_slice(bytes);
                *self = Gather::Copied(v);
            }
            (Gather::Copied(v), _) => v.extend_from_slice(bytes),
        }
        true
    }

    /// Copies the batches out of `rbuf` before it is read into again.
    fn keep(&mut self, rbuf: &[u8], reserve: usize) {
        if let Gather::Window(r) = self {
            let mut v = Vec::with_capacity(reserve.max(r.len()));
            v.extend_from_slice(&rbuf[r.clone()]);
            *self = Gather::Copied(v);
        }
    }

    fn finish(self, rbuf: &ReadBuf, stats: &StatsInner) -> Bytes {
        match self {
            Gather::Empty => Bytes::new(),
            Gather::Window(r) if r.len() >= LEND_BYTES_MIN => match rbuf.lend(r.clone()) {
                Some(b) => {
                    StatsInner::add(&stats.reads_lent, 1);
                    b
                }
                None => Bytes::copy_from_slice(&rbuf[r]),
            },
            Gather::Window(r) => Bytes::copy_from_slice(&rbuf[r]),
            Gather::Copied(v) => v.into(),
        }
    }
}

/// Whether looking at the batch at `pos` of `file` leaves the read buffer
/// as it is: its header is in `win`, and so is its body unless `takes`
/// says the fetch stops before it (its body is not read then). A fetch's
/// last look is usually such a batch, past the window's end.
fn window_holds(
    win: &Window,
    rbuf: &[u8],
    file: FileHandle,
    pos: u64,
    takes: impl Fn(&batch::BatchHeader) -> bool,
) -> bool {
    if !win.covers(file, pos, HEADER_BYTES) {
        return false;
    }
    let from = (pos - win.start) as usize;
    batch::parse_header(&rbuf[from..win.len])
        .is_ok_and(|h| !takes(&h) || win.covers(file, pos, h.total_len as usize))
}

impl Engine {
    pub(super) fn read(
        &mut self,
        id: &PartitionId,
        offset: u64,
        max_bytes: usize,
        first_max: usize,
    ) -> Result<Bytes, StorageError> {
        let Engine { ctx, parts, .. } = self;
        let p = parts.get_mut(id).ok_or_else(|| ctx.shared.not_loaded(id))?;
        let (earliest, hw) = (p.ring.earliest(), p.hw);
        if offset < earliest || offset > hw {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                earliest,
                high_watermark: hw,
            });
        }
        let mut out = Gather::Empty;
        let reserve_max = ctx.rbuf.len();
        if offset == hw {
            return Ok(Bytes::new());
        }
        let reserve = max_bytes.min(reserve_max);
        let first = (0..p.ring.live)
            .rev()
            .find(|&k| p.ring.segs[p.ring.slot(k)].base_offset <= offset)
            .unwrap_or(0);
        for k in first..p.ring.live {
            let slot = p.ring.slot(k);
            let mut pos = if k == first {
                p.fetch_start(slot, offset)
            } else {
                SEG_HEADER_BYTES as u64
            };
            let hint = max_bytes
                .saturating_add(HEADER_BYTES)
                .max(INDEX_INTERVAL_BYTES as usize);
            let mut win = Window::with_hint(hint);
            // Where this fetch stops is in the first window's headers: the
            // next fetch's read starts now, while this one's batches are
            // checked and sent (the device would idle meanwhile).
            if k == first
                && !ctx.ahead.unsupported
                && p.bytes_at(ctx, &mut win, slot, pos, HEADER_BYTES).is_ok()
            {
                if let Some(stop) =
                    stop_in_window(p, ctx, &win, slot, pos, hw, offset, (max_bytes, first_max))
                {
                    ctx.ahead.plan(p, slot, stop, hint, reserve_max);
                    ctx.ahead
                        .start(&mut *ctx.io, &mut ctx.rbuf, &ctx.shared.stats);
                }
            }
            let mut retried = false;
            // The offset after the last batch in `out`.
            let mut end = offset;
            // The offset after the last intact batch read here, if any.
            let mut after: Option<u64> = None;
            while pos < p.ring.segs[slot].end_pos {
                if let Some(to) = p.ring.skip_at(slot, pos) {
                    pos = to;
                    continue;
                }
                // A batch that would not fit is not read: the window ends
                // about max_bytes after the first, so its body would have
                // cost a whole second window read (here, half of the bytes
                // a replay read from the device).
                let out_len = out.len();
                let takes = |h: &batch::BatchHeader| fits(out_len, h, offset, max_bytes, first_max);
                if matches!(out, Gather::Window(_))
                    && !window_holds(&win, &ctx.rbuf, p.files[slot], pos, takes)
                {
                    out.keep(&ctx.rbuf, reserve);
                }
                let found = read_batch_at(p, ctx, &mut win, slot, pos, hw, takes);
                let (h, bytes, at) = match found {
                    Ok(Some((h, Some((bytes, at))))) => (h, bytes, at),
                    Ok(Some((h, None))) => {
                        // The next fetch asks for `end`; any offset up to
                        // this batch's last starts with this batch too.
                        p.stopped_at(slot, end..=h.last_offset(), pos);
                        ctx.ahead.plan(p, slot, pos, hint, reserve_max);
                        return Ok(out.finish(&ctx.rbuf, &ctx.shared.stats));
                    }
                    Ok(None) => return Ok(out.finish(&ctx.rbuf, &ctx.shared.stats)),
                    Err(ReadErr::Io(e)) => return Err(e.into()),
                    Err(ReadErr::Corrupt(_)) if !retried => {
                        retried = true;
                        win = Window::with_hint(win.hint);
                        continue;
                    }
                    Err(ReadErr::Corrupt(e)) => {
                        out.keep(&ctx.rbuf, reserve);
                        let floor = after.unwrap_or_else(|| p.offset_floor(slot, pos));
                        match p.skip_damage(ctx, slot, pos, floor, e.clone())? {
                            Some(to) => {
                                // resync read through the window's buffer.
                                win = Window::with_hint(win.hint);
                                retried = false;
                                pos = to;
                                continue;
                            }
                            None => return Err(p.corrupt_batch(slot, pos, e, &ctx.shared.stats)),
                        }
                    }
                };
                retried = false;
                after = Some(h.next_offset());
                let len = h.total_len as usize;
                if h.next_offset() > offset {
                    if !out.push(bytes, at, reserve) {
                        // A gap (damage skipped) or the tail's bytes after
                        // the buffer's: rare, so the batch is copied twice.
                        let batch = bytes.to_vec();
                        out.keep(&ctx.rbuf, reserve);
                        out.push(&batch, None, reserve);
                    }
                    end = h.next_offset();
                    if out.len() >= max_bytes {
                        p.stopped_at(slot, end..=end, pos + len as u64);
                        ctx.ahead.plan(p, slot, pos + len as u64, hint, reserve_max);
                        return Ok(out.finish(&ctx.rbuf, &ctx.shared.stats));
                    }
                }
                pos += len as u64;
            }
            if out.len() > 0 {
                if k + 1 < p.ring.live {
                    let next = p.ring.slot(k + 1);
                    ctx.ahead
                        .plan(p, next, SEG_HEADER_BYTES as u64, hint, reserve_max);
                }
                return Ok(out.finish(&ctx.rbuf, &ctx.shared.stats));
            }
        }
        Ok(out.finish(&ctx.rbuf, &ctx.shared.stats))
    }

    pub(super) fn offset_for_ts(
        &mut self,
        id: &PartitionId,
        ts: i64,
    ) -> Result<Option<u64>, StorageError> {
        let Engine { ctx, parts, .. } = self;
        let p = parts.get_mut(id).ok_or_else(|| ctx.shared.not_loaded(id))?;
        let hw = p.hw;
        for k in 0..p.ring.live {
            let slot = p.ring.slot(k);
            if p.ring.segs[slot].max_ts < ts {
                continue;
            }
            let mut pos = p.ring.segs[slot].seek_ts(ts);
            let mut win = Window::default();
            while pos < p.ring.segs[slot].end_pos {
                if let Some(to) = p.ring.skip_at(slot, pos) {
                    pos = to;
                    continue;
                }
                match read_batch_at(p, ctx, &mut win, slot, pos, hw, |_| true) {
                    Ok(Some((h, _))) => {
                        if h.max_timestamp >= ts {
                            return Ok(Some(h.base_offset.max(p.ring.earliest())));
                        }
                        pos += u64::from(h.total_len);
                    }
                    Ok(None) => return Ok(None),
                    Err(ReadErr::Io(e)) => return Err(e.into()),
                    Err(ReadErr::Corrupt(e)) => {
                        return Err(p.corrupt_batch(slot, pos, e, &ctx.shared.stats));
                    }
                }
            }
        }
        Ok(None)
    }
}

enum ReadErr {
    Io(io::Error),
    Corrupt(BatchError),
}

/// Whether a fetch for `offset` that holds `out_len` bytes takes the batch
/// `h` too: up to `max_bytes`, but always one batch that counts unless it
/// is larger than `first_max`.
pub(super) fn fits(
    out_len: usize,
    h: &batch::BatchHeader,
    offset: u64,
    max_bytes: usize,
    first_max: usize,
) -> bool {
    let len = h.total_len as usize;
    h.next_offset() <= offset
        || if out_len == 0 {
            len <= first_max
        } else {
            out_len + len <= max_bytes
        }
}

/// Where a fetch for `offset` from `pos` of `slot` stops, read from the
/// batch headers already in `win` (no I/O, nothing checked): `None` when
/// the walk leaves the window or the segment, reaches `hw`, or meets a
/// header that does not parse. Read-ahead planning only; the fetch itself
/// still checks every batch it returns.
#[allow(clippy::too_many_arguments)]
fn stop_in_window(
    p: &Part,
    ctx: &Ctx,
    win: &Window,
    slot: usize,
    mut pos: u64,
    hw: u64,
    offset: u64,
    (max_bytes, first_max): (usize, usize),
) -> Option<u64> {
    if win.file != Some(p.files[slot]) {
        return None;
    }
    let mut out_len = 0;
    while pos < p.ring.segs[slot].end_pos {
        if let Some(to) = p.ring.skip_at(slot, pos) {
            pos = to;
            continue;
        }
        let from = pos.checked_sub(win.start)? as usize;
        let h = batch::parse_header(ctx.rbuf.get(from..win.len)?).ok()?;
        if h.base_offset >= hw {
            return None;
        }
        if !fits(out_len, &h, offset, max_bytes, first_max) {
            return Some(pos);
        }
        pos += u64::from(h.total_len);
        if h.next_offset() > offset {
            out_len += h.total_len as usize;
            if out_len >= max_bytes {
                return Some(pos);
            }
        }
    }
    None
}

/// A batch's header, and unless they were not wanted its bytes, with where
/// they start in the read buffer when they are in it.
type Found<'a> = (batch::BatchHeader, Option<(&'a [u8], Option<usize>)>);

/// The batch at `pos` if it is below `hw`, checked (CRC) when it came
/// from the device; its header alone (body `None`, not read) when `want`
/// says the body is not wanted.
fn read_batch_at<'a>(
    p: &'a Part,
    ctx: &'a mut Ctx,
    win: &mut Window,
    slot: usize,
    pos: u64,
    hw: u64,
    want: impl FnOnce(&batch::BatchHeader) -> bool,
) -> Result<Option<Found<'a>>, ReadErr> {
    let (bytes, _) = p
        .bytes_at(ctx, win, slot, pos, HEADER_BYTES)
        .map_err(ReadErr::Io)?;
    let h = batch::parse_header(bytes).map_err(ReadErr::Corrupt)?;
    if h.base_offset >= hw {
        return Ok(None);
    }
    if !want(&h) {
        return Ok(Some((h, None)));
    }
    let len = h.total_len as usize;
    let (bytes, from_disk) = p.bytes_at(ctx, win, slot, pos, len).map_err(ReadErr::Io)?;
    if bytes.len() < len {
        return Err(ReadErr::Corrupt(BatchError::Truncated {
            have: bytes.len(),
            need: len,
        }));
    }
    let bytes = &bytes[..len];
    if from_disk {
        batch::verify(bytes).map_err(ReadErr::Corrupt)?;
    }
    let at = from_disk.then(|| (pos - win.start) as usize);
    Ok(Some((h, Some((bytes, at)))))
}
