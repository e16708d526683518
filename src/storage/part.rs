//! A partition in memory: its ring of segments (geometry, the sparse
//! index) and the tail buffer that holds the active segment's last bytes.
//!
//! The ring has `segments` slots; the live segments are the ring range
//! `[oldest, oldest + live)`, the last of which is the active one. The
//! active segment's last bytes live in the tail buffer, which mirrors the
//! file range `[tail.file_off, tail.file_off + tail.len)`, with
//! `tail.file_off` block-aligned and zeros after `tail.len`. A commit writes
//! the blocks from the first dirty one to the end of the tail (so the
//! partial last block is rewritten as it grows).

use super::commit::CommitState;
use super::engine::{index_capacity, Ctx, B, INDEX_INTERVAL_BYTES};
use super::io::{AlignedBuf, FileHandle, WriteOp};
use super::read::Resume;
use super::recovery::Checkpoint;
use super::segment::{SegmentHeader, SEG_HEADER_BYTES};
use super::{
    AppendAck, OverflowPolicy, PartShared, PartitionConfig, PartitionId, Quarantine,
    QuarantineReason, StatsInner, StorageError, STATE_FAILED, STATE_OK, STATE_QUARANTINED,
};
use crate::batch::{self, BatchError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A batch checked on the submitting task (header, length, CRC), carrying
/// the CRC state of everything but the base offset: the storage thread
/// only feeds it the assigned offset (8 bytes) instead of hashing the
/// whole batch again. The same checks and result as
/// `batch::verify_and_assign_offset`, split in two; the CRC work runs on
/// the producers' threads, in parallel, not on the one storage thread.
pub(crate) struct Prechecked {
    pub(super) header: batch::BatchHeader,
    partial_crc: u32,
    /// The batch's base offset is at least this (the log's end if higher):
    /// 0 for a producer's batch, which goes right after the last.
    pub(super) base_at_least: u64,
}

impl Prechecked {
    /// A producer's batch: its offsets must be dense
    /// ([`BatchError::NotDense`]).
    pub(crate) fn check(b: &[u8]) -> Result<Prechecked, BatchError> {
        let checked = Prechecked::check_placed(b, 0)?;
        let h = checked.header;
        if !h.is_dense() {
            return Err(BatchError::NotDense {
                record_count: h.record_count,
                last_offset_delta: h.last_offset_delta,
            });
        }
        Ok(checked)
    }

    /// A batch of the log's own writers: it may have gaps inside, and its
    /// base offset is at least `base_at_least` (leaving a gap after the
    /// log's end when that is higher).
    pub(crate) fn check_placed(b: &[u8], base_at_least: u64) -> Result<Prechecked, BatchError> {
        let header = batch::parse_header(b)?;
        let len = header.total_len as usize;
        if b.len() != len {
            return Err(if b.len() < len {
                BatchError::Truncated {
                    have: b.len(),
                    need: len,
                }
            } else {
                BatchError::Malformed("trailing bytes after batch")
            });
        }
        batch::check_offsets(base_at_least, header.last_offset_delta)?;
        let partial_crc = batch::digest_without_offset(b);
        let computed = batch::finish_crc(partial_crc, header.base_offset);
        if computed != header.crc {
            return Err(BatchError::CrcMismatch {
                stored: header.crc,
                computed,
            });
        }
        Ok(Prechecked {
            header,
            partial_crc,
            base_at_least,
        })
    }

    pub(crate) fn header(&self) -> &batch::BatchHeader {
        &self.header
    }

    /// Writes `base_offset` and the matching CRC into the (checked) batch.
    pub(super) fn assign_offset(self, b: &mut [u8], base_offset: u64) -> batch::BatchHeader {
        let offset = base_offset.to_le_bytes();
        let crc = batch::finish_crc(self.partial_crc, base_offset);
        b[batch::OFFSET_BASE_OFFSET..batch::OFFSET_RECORD_COUNT].copy_from_slice(&offset);
        b[batch::OFFSET_CRC..batch::OFFSET_BASE_OFFSET].copy_from_slice(&crc.to_le_bytes());
        debug_assert!(batch::verify(b).is_ok());
        batch::BatchHeader {
            base_offset,
            crc,
            ..self.header
        }
    }
}

/// `partition.meta`: what the partition is. Written once, at creation,
/// last (its presence marks a complete partition directory).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct PartitionMeta {
    pub(super) topic: String,
    pub(super) partition: u32,
    pub(super) cfg: PartitionConfig,
}

/// `ring.meta`: which segment file (`seg-<n>.log`, header `slot` field
/// `n`) holds each place of the ring, in ring order. Absent: file `k` at
/// place `k`, as created. Written by a resize (`skiff topics alter
/// --segments`), whose commit it is: files are created before it and
/// removed after it, and `partition.meta`'s `segments` follows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct RingLayout {
    pub(super) files: Vec<u32>,
}

pub(super) const RING_META: &str = "ring.meta";

#[derive(Debug, Clone, Copy)]
pub(super) struct IndexEntry {
    pub(super) offset: u64,
    pub(super) pos: u32,
    /// Largest batch max_timestamp before `pos` in this segment.
    max_ts_before: i64,
}

#[derive(Debug)]
pub(super) struct Seg {
    /// 0: the slot is not live.
    pub(super) epoch: u64,
    pub(super) base_offset: u64,
    pub(super) next_offset: u64,
    /// End of the batches (file position), header block included.
    pub(super) end_pos: u64,
    pub(super) max_ts: i64,
    /// Capacity fixed at creation (segment_bytes / INDEX_INTERVAL_BYTES + 2).
    pub(super) index: Vec<IndexEntry>,
}

impl Seg {
    pub(super) fn new(segment_bytes: u64) -> Seg {
        Seg {
            epoch: 0,
            base_offset: 0,
            next_offset: 0,
            end_pos: SEG_HEADER_BYTES as u64,
            max_ts: i64::MIN,
            index: Vec::with_capacity(index_capacity(segment_bytes) as usize),
        }
    }

    /// Records a batch at `pos` in the index when it is far enough from the
    /// previous entry.
    pub(super) fn note_batch(&mut self, h: &batch::BatchHeader, pos: u64) {
        let far = self
            .index
            .last()
            .is_none_or(|e| pos - u64::from(e.pos) >= INDEX_INTERVAL_BYTES);
        if far && self.index.len() < self.index.capacity() {
            self.index.push(IndexEntry {
                offset: h.base_offset,
                pos: pos as u32,
                max_ts_before: self.max_ts,
            });
        }
        self.max_ts = self.max_ts.max(h.max_timestamp);
        self.next_offset = h.next_offset();
        self.end_pos = pos + u64::from(h.total_len);
    }

    /// The position to start scanning from to find `offset`.
    pub(super) fn seek(&self, offset: u64) -> u64 {
        let i = self.index.partition_point(|e| e.offset <= offset);
        if i == 0 {
            SEG_HEADER_BYTES as u64
        } else {
            u64::from(self.index[i - 1].pos)
        }
    }

    /// The position to start scanning from to find the first batch with
    /// max_timestamp >= ts: everything before it is older.
    pub(super) fn seek_ts(&self, ts: i64) -> u64 {
        let i = self.index.partition_point(|e| e.max_ts_before < ts);
        if i == 0 {
            SEG_HEADER_BYTES as u64
        } else {
            u64::from(self.index[i - 1].pos)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PartState {
    Ok,
    Failed {
        cause: io::ErrorKind,
        errno: Option<i32>,
    },
    /// Read-only; the reason is the first damage found (boxed: a rare
    /// state should not grow every partition).
    Quarantined(Box<QuarantineReason>),
}

/// One partition: where its data is (the ring, the tail buffer), how far
/// it is written, acknowledged and durable, and its health.
pub(super) struct Part {
    pub(super) id: PartitionId,
    pub(super) cfg: PartitionConfig,
    pub(super) dir: PathBuf,
    /// One per ring slot, in slot order.
    pub(super) files: Vec<FileHandle>,
    /// The number of each slot's file (its name and its headers' `slot`
    /// field): the slot's own number until a resize ([`RingLayout`]).
    pub(super) file_nos: Vec<u32>,
    pub(super) ring: Ring,
    /// The offset the next appended batch gets.
    pub(super) next_offset: u64,
    /// Everything below is acknowledged and readable.
    pub(super) hw: u64,
    pub(super) tail: Tail,
    /// Its place in the group commit.
    pub(super) commit: CommitState,
    /// Where the log ends on the device, as far as fdatasyncs say.
    pub(super) durable: Checkpoint,
    /// What `checkpoint.meta` holds, and when it was written.
    pub(super) checkpointed: Checkpoint,
    pub(super) last_checkpoint: Instant,
    /// When a failed checkpoint write was last logged, and the failures
    /// since not logged: a full disk fails every refresh (once a second
    /// while the partition is written), which is one line a minute.
    pub(super) checkpoint_quiet: Option<(Instant, u64)>,
    pub(super) state: PartState,
    pub(super) shared: Arc<PartShared>,
    /// Background pre-writing of the ring after creation: the next slot and
    /// position to zero. Only slots never started (epoch 0) are touched.
    pub(super) prewrite_next: Option<(usize, u64)>,
    /// Where the last fetch stopped, for the next one from there.
    pub(super) resume: Option<Resume>,
    /// A compaction in progress (see `compact`).
    pub(super) compaction: Option<Box<super::compact::Scratch>>,
    /// Idempotent producers whose batch was refused for want of room
    /// (ring full, backlog not yet upstream), with that batch's epoch and
    /// base sequence: see [`Part::append`].
    pub(super) refused: Vec<RefusedProducer>,
}

/// A producer whose batch `base_seq` was refused as retriable.
#[derive(Debug, Clone, Copy)]
pub(super) struct RefusedProducer {
    producer_id: u64,
    epoch: u16,
    base_seq: i32,
    error: RoomError,
}

#[derive(Debug, Clone, Copy)]
enum RoomError {
    Full,
    BacklogFull,
}

/// Producers remembered per partition; past this the oldest is forgotten
/// (its later batches then fail the producer table's sequence check
/// instead, as out of order).
const MAX_REFUSED: usize = 64;

/// The ring's geometry: which slots hold live segments, in what order.
pub(super) struct Ring {
    /// One per slot; a slot whose epoch is 0 is not live.
    pub(super) segs: Vec<Seg>,
    /// Live ring range `[oldest, oldest + live)`; `live >= 1`.
    pub(super) oldest: usize,
    pub(super) live: usize,
    /// The epoch the next (re)started segment gets.
    pub(super) next_epoch: u64,
    /// Damaged byte ranges `(slot, from, to)` recovery found inside the
    /// data and skipped: a reader at `from` of `slot` goes on at `to`,
    /// where the next intact batch begins (docs/semantics.md, "Damaged
    /// data"). Almost always empty; here, not in each `Seg`, because the
    /// memory budget counts a `Seg` per possible segment.
    pub(super) skips: Vec<(usize, u64, u64)>,
}

impl Ring {
    pub(super) fn new(cfg: &PartitionConfig) -> Ring {
        Ring {
            segs: (0..cfg.segments)
                .map(|_| Seg::new(cfg.segment_bytes))
                .collect(),
            oldest: 0,
            live: 1,
            next_epoch: 1,
            skips: Vec::new(),
        }
    }

    /// Where a reader at `pos` of `slot` goes on when a damaged range
    /// begins there.
    pub(super) fn skip_at(&self, slot: usize, pos: u64) -> Option<u64> {
        self.skips
            .iter()
            .find(|s| s.0 == slot && s.1 == pos)
            .map(|s| s.2)
    }

    /// The damaged ranges of `slot` end with its data (its segment
    /// restarts, or compaction replaces it).
    pub(super) fn forget_skips(&mut self, slot: usize) {
        self.skips.retain(|s| s.0 != slot);
    }

    /// The ring was resized: each damaged range moves to the slot `to`
    /// gives its old one, or goes with its slot.
    pub(super) fn move_skips(&mut self, to: impl Fn(usize) -> Option<usize>) {
        self.skips = self
            .skips
            .iter()
            .filter_map(|&(slot, from, end)| Some((to(slot)?, from, end)))
            .collect();
    }

    pub(super) fn n(&self) -> usize {
        self.segs.len()
    }
    /// The slot of the `k`-th live segment, oldest first.
    pub(super) fn slot(&self, k: usize) -> usize {
        (self.oldest + k) % self.n()
    }
    pub(super) fn active(&self) -> usize {
        self.slot(self.live - 1)
    }
    pub(super) fn earliest(&self) -> u64 {
        self.segs[self.oldest].base_offset
    }
}

/// The active segment's last bytes, in an aligned buffer: the file range
/// `[file_off, file_off + len)`, zeros after `len` as far as a write
/// reaches (see [`Part::slack_end`]).
pub(super) struct Tail {
    /// A block longer than `tail_buffer_bytes`: after a recycle the
    /// partial last block stays at the front, and a max-size batch must
    /// still fit behind it.
    pub(super) buf: AlignedBuf,
    /// Always a multiple of [`B`], so the tail buffer's blocks stay aligned.
    pub(super) file_off: u64,
    pub(super) len: usize,
    /// The segment files' write unit: the dirty tail is written from and to
    /// multiples of it (512 B on most devices, so a small append rewrites
    /// one sector of the partial block, not all 4 KiB of it).
    pub(super) unit: usize,
    /// First tail byte not yet written to the file.
    pub(super) dirty_from: Option<usize>,
}

impl Part {
    pub(super) fn publish(&self) {
        self.shared
            .durable
            .store(self.durable.next_offset, Ordering::Release);
        self.shared.hw.store(self.hw, Ordering::Release);
        self.shared
            .earliest
            .store(self.ring.earliest(), Ordering::Release);
        self.shared.event.notify(usize::MAX);
    }

    fn set_state(&mut self, state: PartState) {
        let s = match state {
            PartState::Ok => STATE_OK,
            PartState::Failed { .. } => STATE_FAILED,
            PartState::Quarantined(_) => STATE_QUARANTINED,
        };
        self.state = state;
        self.shared.state.store(s, Ordering::Release);
    }

    pub(super) fn refuse_writes(&self) -> Option<StorageError> {
        match &self.state {
            PartState::Ok => None,
            &PartState::Failed { cause, errno } => Some(StorageError::Failed {
                partition: self.id.clone(),
                cause,
                errno,
            }),
            PartState::Quarantined(reason) => Some(self.quarantined((**reason).clone())),
        }
    }

    /// The error that says this partition is quarantined, and why.
    pub(super) fn quarantined(&self, reason: QuarantineReason) -> StorageError {
        StorageError::Quarantined(Box::new(Quarantine {
            partition: self.id.clone(),
            reason,
        }))
    }

    /// Sticky failure: fail every pending append, refuse writes from now on.
    pub(super) fn fail(&mut self, e: &io::Error, stats: &StatsInner) {
        log::error!(
            "partition {}: write or fdatasync failed ({e}); refusing writes until restart, \
             {} pending appends fail",
            self.id,
            self.commit.pending.len() + self.commit.awaiting_sync.len() + self.commit.syncing.len()
        );
        self.set_state(PartState::Failed {
            cause: e.kind(),
            errno: e.raw_os_error(),
        });
        StatsInner::add(&stats.failures, 1);
        let waiting = self
            .commit
            .syncing
            .drain(..)
            .chain(self.commit.awaiting_sync.drain(..))
            .chain(self.commit.pending.drain(..));
        for p in waiting {
            p.failed(StorageError::Failed {
                partition: self.id.clone(),
                cause: e.kind(),
                errno: e.raw_os_error(),
            });
        }
        self.commit.first_pending_at = None;
    }

    /// Makes the partition read-only for `why` (or keeps the first reason
    /// when it is already) and fails the appends not yet written.
    pub(super) fn quarantine(&mut self, why: QuarantineReason, stats: &StatsInner) {
        if !matches!(self.state, PartState::Quarantined(_)) {
            log::error!("partition {} quarantined (read-only): {why}", self.id);
        }
        self.quarantine_unlogged(why, stats);
    }

    /// As [`Part::quarantine`], not logged: for recovery, whose line for
    /// the partition says it with what was recovered (logged here too, it
    /// was one event in two lines).
    pub(super) fn quarantine_unlogged(&mut self, why: QuarantineReason, stats: &StatsInner) {
        if !matches!(self.state, PartState::Quarantined(_)) {
            StatsInner::add(&stats.quarantined, 1);
            self.set_state(PartState::Quarantined(Box::new(why)));
        }
        let PartState::Quarantined(reason) = &self.state else {
            return;
        };
        let q = Quarantine {
            partition: self.id.clone(),
            reason: (**reason).clone(),
        };
        for p in self.commit.pending.drain(..) {
            let _ = p
                .reply
                .send(Err(StorageError::Quarantined(Box::new(q.clone()))));
        }
    }

    /// Zeroes the tail from its end to [`Part::slack_end`]: the bytes a
    /// write carries past the last batch, which recovery requires to be
    /// zero (docs/format.md). The rest of the buffer past the end may hold
    /// stale bytes; no write reaches them.
    pub(super) fn zero_slack(&mut self) {
        let end = self.slack_end();
        self.tail.buf[self.tail.len..end].fill(0);
    }

    /// Where a write of the tail ends: the write-unit boundary after the
    /// last batch, and a whole unit further when the batch ends on one.
    /// The bytes up to there are zeros, so the log's end is marked on disk
    /// even where an earlier lap's bytes follow: recovery would read those
    /// as a torn batch and report a false loss. Only the segment's end stops
    /// short of that (`make_tail_room` keeps a unit free in the buffer).
    fn slack_end(&self) -> usize {
        let end = (self.tail.len / self.tail.unit + 1) * self.tail.unit;
        let segment_rest = self.cfg.segment_bytes - self.tail.file_off;
        end.min(self.tail.buf.len())
            .min(usize::try_from(segment_rest).unwrap_or(usize::MAX))
    }

    /// The write covering the dirty part of the tail, if any.
    pub(super) fn dirty_write(&self) -> Option<WriteOp<'_>> {
        let from = self.tail.dirty_from? / self.tail.unit * self.tail.unit;
        let to = self.slack_end();
        Some(WriteOp {
            file: self.files[self.ring.active()],
            offset: self.tail.file_off + from as u64,
            data: &self.tail.buf[from..to],
        })
    }

    /// Where the log ends now: what becomes durable once everything
    /// appended so far is written and fdatasynced.
    pub(super) fn end_checkpoint(&self) -> Checkpoint {
        let active = self.ring.active();
        Checkpoint {
            epoch: self.ring.segs[active].epoch,
            pos: self.ring.segs[active].end_pos,
            next_offset: self.next_offset,
            clean: false,
        }
    }

    /// Makes room for `len` more bytes in the tail: writes what is dirty
    /// (without fdatasync: the commit that follows covers it), then keeps
    /// only the partial last block.
    pub(super) fn make_tail_room(&mut self, ctx: &mut Ctx, len: usize) -> Result<(), StorageError> {
        // Strictly less: a unit of zeros must fit behind a batch that fills
        // the buffer to a unit boundary (`slack_end`).
        if self.tail.len + len < self.tail.buf.len() {
            return Ok(());
        }
        if let Some(op) = self.dirty_write() {
            if let Err(e) = ctx.write_batch(&[op], &[]) {
                self.fail(&e, &ctx.shared.stats);
                return Err(self.refuse_writes().expect("failed"));
            }
            self.tail.dirty_from = None;
            self.commit.unsynced = true;
        }
        let keep = self.tail.len % B;
        let start = self.tail.len - keep;
        let old_len = self.tail.len;
        // Bytes past the new end stay stale: `zero_slack` clears the part
        // of them a write can reach, after each append.
        self.tail.buf.copy_within(start..old_len, 0);
        self.tail.file_off += start as u64;
        self.tail.len = keep;
        // The tail is a block longer than the largest batch, and less than
        // a block was kept.
        debug_assert!(self.tail.len + len < self.tail.buf.len());
        Ok(())
    }

    /// Copies a checked batch into the tail (rolling to the next segment
    /// first when it does not fit), with its offsets assigned: acked once
    /// the group commit has written (and per policy fdatasynced) it.
    pub(super) fn append(
        &mut self,
        ctx: &mut Ctx,
        batch: &mut [u8],
        checked: Prechecked,
    ) -> Result<AppendAck, StorageError> {
        if let Some(e) = self.refuse_writes() {
            return Err(e);
        }
        // Once a producer's batch is refused for want of room, its later
        // batches (sent before it heard) are refused too until the refused
        // one comes again: written, they would land before its retry,
        // out of the producer's order, and make that retry look like a
        // duplicate.
        let h = checked.header;
        if h.is_idempotent() {
            if let Some(i) = self
                .refused
                .iter()
                .position(|r| r.producer_id == h.producer_id)
            {
                let r = self.refused[i];
                if r.epoch == h.producer_epoch && r.base_seq != h.base_sequence {
                    return Err(match r.error {
                        RoomError::Full => StorageError::Full(self.id.clone()),
                        RoomError::BacklogFull => StorageError::BacklogFull(self.id.clone()),
                    });
                }
                self.refused.remove(i);
            }
        }
        match self.append_checked(ctx, batch, checked) {
            Err(e @ (StorageError::Full(_) | StorageError::BacklogFull(_))) => {
                if h.is_idempotent() {
                    if self.refused.len() == MAX_REFUSED {
                        self.refused.remove(0);
                    }
                    self.refused.push(RefusedProducer {
                        producer_id: h.producer_id,
                        epoch: h.producer_epoch,
                        base_seq: h.base_sequence,
                        error: if matches!(e, StorageError::Full(_)) {
                            RoomError::Full
                        } else {
                            RoomError::BacklogFull
                        },
                    });
                }
                Err(e)
            }
            other => other,
        }
    }

    fn append_checked(
        &mut self,
        ctx: &mut Ctx,
        batch: &mut [u8],
        checked: Prechecked,
    ) -> Result<AppendAck, StorageError> {
        if self.checkpointed.clean {
            super::recovery::unmark_clean(self)?;
        }
        let max = ctx
            .cfg
            .max_batch_bytes
            .min((self.cfg.segment_bytes - SEG_HEADER_BYTES as u64) as usize);
        if batch.len() > max {
            return Err(StorageError::BatchTooLarge {
                bytes: batch.len(),
                max,
            });
        }
        // A producer's batch goes right after the last; the log's own
        // writers may place theirs higher, leaving a gap.
        let base = self.next_offset.max(checked.base_at_least);
        batch::check_offsets(base, checked.header.last_offset_delta)?;
        let h = checked.assign_offset(batch, base);
        let len = batch.len();
        if self.ring.segs[self.ring.active()].end_pos + len as u64 > self.cfg.segment_bytes {
            self.roll(ctx)?;
        }
        self.make_tail_room(ctx, len)?;
        let pos = self.tail.file_off + self.tail.len as u64;
        self.tail.buf[self.tail.len..self.tail.len + len].copy_from_slice(batch);
        self.tail.dirty_from.get_or_insert(self.tail.len);
        self.tail.len += len;
        self.zero_slack();
        let active = self.ring.active();
        self.ring.segs[active].note_batch(&h, pos);
        debug_assert_eq!(
            self.ring.segs[active].end_pos,
            self.tail.file_off + self.tail.len as u64
        );
        self.next_offset = h.next_offset();
        let stats = &ctx.shared.stats;
        StatsInner::add(&stats.appends, 1);
        StatsInner::add(&stats.payload_bytes, len as u64);
        Ok(AppendAck {
            base_offset: h.base_offset,
            last_offset: h.last_offset(),
        })
    }

    /// (Re)starts `slot` as the new active segment at `base`, at wall time
    /// `created_ms`: its header goes into the (clean) tail and is written
    /// with the first batches.
    pub(super) fn start_segment(&mut self, slot: usize, base: u64, created_ms: i64) {
        debug_assert!(self.tail.dirty_from.is_none());
        let h = SegmentHeader {
            epoch: self.ring.next_epoch,
            base_offset: base,
            created_ms,
            slot: self.file_nos[slot],
            segment_bytes: self.cfg.segment_bytes,
        };
        self.ring.next_epoch += 1;
        h.encode(&mut self.tail.buf[..SEG_HEADER_BYTES]);
        self.tail.file_off = 0;
        self.tail.len = SEG_HEADER_BYTES;
        self.zero_slack();
        self.tail.dirty_from = Some(0);
        let seg = &mut self.ring.segs[slot];
        seg.epoch = h.epoch;
        seg.base_offset = base;
        seg.next_offset = base;
        seg.end_pos = SEG_HEADER_BYTES as u64;
        seg.max_ts = i64::MIN;
        seg.index.clear();
        self.ring.forget_skips(slot);
    }

    fn expired(&self, slot: usize, now_ms: i64) -> bool {
        match self.cfg.retention_ms {
            Some(r) => {
                let seg = &self.ring.segs[slot];
                seg.next_offset == seg.base_offset
                    || seg.max_ts < now_ms.saturating_sub(r.min(i64::MAX as u64) as i64)
            }
            None => false,
        }
    }

    /// Whether the oldest segment holds an offset a reader still needs
    /// (see [`super::PartShared::retain_floor`]).
    fn oldest_held(&self) -> bool {
        let floor = self.shared.retain_floor.load(Ordering::Acquire);
        self.ring.segs[self.ring.oldest].next_offset > floor
    }

    /// Whether any of the `count` oldest segments holds an offset a
    /// reader still needs.
    pub(super) fn held_through(&self, count: usize) -> bool {
        let floor = self.shared.retain_floor.load(Ordering::Acquire);
        count > 0 && self.ring.segs[self.ring.slot(count - 1)].next_offset > floor
    }

    pub(super) fn drop_oldest(&mut self) {
        debug_assert!(self.ring.live > 1);
        self.ring.segs[self.ring.oldest].epoch = 0;
        self.ring.oldest = (self.ring.oldest + 1) % self.ring.n();
        self.ring.live -= 1;
    }

    /// Time retention: frees closed segments whose newest record is older
    /// than retention_ms. Returns whether earliest moved.
    pub(super) fn apply_time_retention(&mut self, now_ms: i64) -> bool {
        let mut moved = false;
        while self.ring.live > 1 && self.expired(self.ring.oldest, now_ms) && !self.oldest_held() {
            log::info!(
                "partition {}: time retention frees offsets {}..{}",
                self.id,
                self.ring.segs[self.ring.oldest].base_offset,
                self.ring.segs[self.ring.oldest].next_offset
            );
            self.drop_oldest();
            moved = true;
        }
        moved
    }

    /// Opens the next segment of the ring for a batch that does not fit in
    /// the active one.
    pub(super) fn roll(&mut self, ctx: &mut Ctx) -> Result<(), StorageError> {
        let next = (self.ring.active() + 1) % self.ring.n();
        let ring_full = self.ring.live == self.ring.n();
        ctx.shared.rolled.notify(usize::MAX);
        if ring_full
            && self.cfg.overflow == OverflowPolicy::Reject
            && !self.expired(self.ring.oldest, ctx.cfg.clock.wall_ms())
        {
            return Err(StorageError::Full(self.id.clone()));
        }
        if ring_full && self.oldest_held() {
            return Err(StorageError::BacklogFull(self.id.clone()));
        }
        // The new header names where this segment ends: make this segment
        // durable first, so recovery never finds a header that points past
        // data it cannot see.
        self.commit_now(ctx, true)?;
        if ring_full {
            self.drop_oldest();
        }
        // Its old bytes, read ahead, are about to be overwritten.
        ctx.ahead
            .forget(&mut *ctx.io, &mut ctx.rbuf, self.files[next]);
        self.start_segment(next, self.next_offset, ctx.cfg.clock.wall_ms());
        self.ring.live += 1;
        self.publish();
        Ok(())
    }
}

/// The path of segment file number `file_no` (a slot's number until the
/// ring is resized, see [`RingLayout`]).
pub(super) fn seg_path(dir: &Path, file_no: usize) -> PathBuf {
    dir.join(format!("seg-{file_no:05}.log"))
}

pub(super) fn part_dir(data_dir: &Path, id: &PartitionId) -> PathBuf {
    data_dir
        .join("topics")
        .join(&*id.topic)
        .join(id.partition.to_string())
}

pub(super) const PARTITION_META: &str = "partition.meta";

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch CRC (hardware CRC-32C through the `crc32c` crate) is the
    /// documented CRC-32C/iSCSI over the documented byte order, computed
    /// here with the table-driven `crc` crate, over many lengths (the
    /// accelerated paths work in 8-byte words; tails and alignment vary).
    #[test]
    fn batch_crc_is_crc32c_iscsi_in_the_documented_order() {
        for (records, value) in [(1, 0), (1, 1), (1, 7), (2, 100), (5, 1000), (3, 4099)] {
            for tag in 0..5u64 {
                let b = crate::storage::tests::make_batch(records, value + tag as usize, tag, 1);
                let mut d = batch::CRC32C.digest();
                d.update(&b[batch::OFFSET_RECORD_COUNT..]);
                d.update(&b[..batch::OFFSET_CRC]);
                d.update(&b[batch::OFFSET_BASE_OFFSET..batch::OFFSET_RECORD_COUNT]);
                assert_eq!(d.finalize(), batch::compute_crc(&b));
                assert!(batch::verify(&b).is_ok());
            }
        }
    }

    /// The split check gives exactly what batch::verify_and_assign_offset
    /// gives, for good batches and for every single-bit corruption.
    #[test]
    fn prechecked_matches_verify_and_assign_offset() {
        let good = crate::storage::tests::make_batch(3, 40, 9, 1_000);
        let mut cases = vec![good.clone()];
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 1 << (i % 8);
            cases.push(b);
        }
        cases.push(good[..good.len() - 1].to_vec());
        let mut long = good.clone();
        long.push(0);
        cases.push(long);
        for (n, case) in cases.into_iter().enumerate() {
            let mut a = case.clone();
            let mut b = case;
            let ra = batch::verify_and_assign_offset(&mut a, 777);
            let rb = Prechecked::check(&b).map(|c| c.assign_offset(&mut b, 777));
            assert_eq!(ra, rb, "case {n}");
            assert_eq!(a, b, "case {n}");
        }
    }
}
