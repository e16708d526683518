//! Compaction's storage half: the oldest `k` segments of a partition are
//! rewritten, by a caller that decides which records stay (the broker's
//! cleaner), into one scratch file, which one rename swaps in for the
//! `k`-th of them. The other `k - 1` slots are then free.
//!
//! # Why one rename is the commit
//!
//! The scratch file `compact.tmp` gets the header of the segment it
//! replaces (same slot, same epoch) with the base offset of the first
//! segment it covers, and the kept batches at their original offsets (gaps
//! where records went). It is fdatasynced before the rename. After a crash:
//!
//! - before the rename, the ring is as it was, and start-up keeps the
//!   scratch file as the spare: the state before the compaction;
//! - after it, the `k`-th slot holds the compacted segment. Walking the
//!   ring backwards from the active segment, recovery stops at the first
//!   slot whose base offset is not below its successor's: the `k - 1`
//!   replaced segments are all covered by the new one (their base offsets
//!   are at or above its base), so they drop out of the ring. The state
//!   after the compaction.
//!
//! Never a mixture: no other file is written in place. The new segment must
//! end exactly where the replaced `k`-th one ended (the next segment's base
//! offset), which the caller ensures by keeping that segment's last batch's
//! extent (`check_end`).
//!
//! Writes go through the storage thread in chunks (`compact_write`), so a
//! produce waits behind at most one chunk; the caller paces the chunks.

use super::engine::{Engine, B, B64};
use super::io::{AlignedBuf, FileHandle, WriteOp};
use super::part::{seg_path, Seg};
use super::segment::{SegmentHeader, SEG_HEADER_BYTES};
use super::{PartitionId, StatsInner, StorageError};
use crate::batch;

/// The scratch file's name in the partition's directory.
pub(super) const SCRATCH_FILE: &str = "compact.tmp";

/// The segment file the last compaction replaced, kept as the next one's
/// scratch file: its blocks are room the next compaction needs, and on a
/// full disk there is no other.
pub(super) const SPARE_FILE: &str = "compact.spare";

/// The largest chunk a `compact_write` takes, and so the longest a produce
/// waits behind one (a 64 KiB write).
pub const COMPACT_WRITE_BYTES_MAX: usize = 64 * 1024;

/// The most a `compact_write` takes: a chunk, or one batch of the largest
/// size storage takes.
pub fn compact_write_bytes_max(max_batch_bytes: usize) -> usize {
    COMPACT_WRITE_BYTES_MAX.max(max_batch_bytes)
}

/// The scratch buffer: a chunk and the partial block kept between chunks.
pub fn compact_buffer_bytes(max_batch_bytes: usize) -> usize {
    compact_write_bytes_max(max_batch_bytes) + 2 * B
}

/// A segment of a partition's ring, as compaction sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub slot: u32,
    pub epoch: u64,
    /// Offsets `[base_offset, next_offset)`.
    pub base_offset: u64,
    pub next_offset: u64,
    /// Bytes of batches, header block included.
    pub bytes: u64,
    /// The newest record's timestamp (ms), `i64::MIN` when empty.
    pub max_timestamp: i64,
    /// The active segment (written to; never compacted).
    pub active: bool,
}

/// A compaction in progress: the scratch file and what it replaces.
pub(super) struct Scratch {
    file: FileHandle,
    /// The first replaced slot (the ring's oldest) and its epoch, and the
    /// number of segments replaced.
    first_slot: usize,
    first_epoch: u64,
    count: usize,
    /// The slot and epoch the new segment takes: the last replaced one's.
    last_slot: usize,
    last_epoch: u64,
    /// Where the new segment must end (the replaced ones' end).
    end_offset: u64,
    /// File bytes `[file_off, file_off + len)`, block-aligned start.
    buf: AlignedBuf,
    file_off: u64,
    len: usize,
    /// The new segment's geometry and sparse index, as written so far.
    seg: Seg,
}

impl Engine {
    pub(super) fn segments(&self, id: &PartitionId) -> Result<Vec<SegmentInfo>, StorageError> {
        let p = self
            .parts
            .get(id)
            .ok_or_else(|| self.ctx.shared.not_loaded(id))?;
        Ok((0..p.ring.live)
            .map(|k| {
                let slot = p.ring.slot(k);
                let s = &p.ring.segs[slot];
                SegmentInfo {
                    slot: slot as u32,
                    epoch: s.epoch,
                    base_offset: s.base_offset,
                    next_offset: s.next_offset,
                    bytes: s.end_pos,
                    max_timestamp: s.max_ts,
                    active: k + 1 == p.ring.live,
                }
            })
            .collect())
    }

    /// Starts replacing the ring's oldest `count` segments, the oldest of
    /// which has `first_epoch`; never the active one.
    pub(super) fn compact_begin(
        &mut self,
        id: &PartitionId,
        first_epoch: u64,
        count: usize,
    ) -> Result<(), StorageError> {
        self.compact_abort(id);
        let p = self
            .parts
            .get_mut(id)
            .ok_or_else(|| self.ctx.shared.not_loaded(id))?;
        if let Some(e) = p.refuse_writes() {
            return Err(e);
        }
        let first_slot = p.ring.oldest;
        if count == 0 || count >= p.ring.live || p.ring.segs[first_slot].epoch != first_epoch {
            return Err(StorageError::CompactionMoved(id.clone()));
        }
        let last_slot = p.ring.slot(count - 1);
        let path = p.dir.join(SCRATCH_FILE);
        let _ = self.ctx.io.remove(&path);
        // The spare's old bytes behind the new data are never scanned: the
        // commit ends the data with its end mark (zeros), whatever offsets
        // they hold (the spare may be an unfinished merge's scratch file).
        let file = if self.ctx.io.rename(&p.dir.join(SPARE_FILE), &path).is_ok() {
            self.ctx.io.open(&path, false)?
        } else {
            let file = self.ctx.io.open(&path, true)?;
            if let Err(e) = self.ctx.io.allocate(file, p.cfg.segment_bytes) {
                self.ctx.io.close(file);
                let _ = self.ctx.io.remove(&path);
                return Err(e.into());
            }
            file
        };
        let mut buf = match AlignedBuf::new(compact_buffer_bytes(self.ctx.cfg.max_batch_bytes)) {
            Ok(b) => b,
            Err(_) => {
                self.ctx.io.close(file);
                keep_as_spare(&mut self.ctx, &p.dir);
                return Err(StorageError::InvalidConfig(
                    "the compaction buffer is not allocatable",
                ));
            }
        };
        let last = &p.ring.segs[last_slot];
        let base = p.ring.segs[first_slot].base_offset;
        let h = SegmentHeader {
            epoch: last.epoch,
            base_offset: base,
            created_ms: self.ctx.cfg.clock.wall_ms(),
            slot: p.file_nos[last_slot],
            segment_bytes: p.cfg.segment_bytes,
        };
        h.encode(&mut buf[..SEG_HEADER_BYTES]);
        let mut seg = Seg::new(p.cfg.segment_bytes);
        seg.epoch = last.epoch;
        seg.base_offset = base;
        seg.next_offset = base;
        seg.end_pos = SEG_HEADER_BYTES as u64;
        p.compaction = Some(Box::new(Scratch {
            file,
            first_slot,
            first_epoch,
            count,
            last_slot,
            last_epoch: last.epoch,
            end_offset: last.next_offset,
            buf,
            file_off: 0,
            len: SEG_HEADER_BYTES,
            seg,
        }));
        Ok(())
    }

    /// Appends whole batches (as stored, offsets assigned) to the scratch
    /// segment; each must start at or after the previous one's end and end
    /// by the replaced segments' end.
    pub(super) fn compact_write(
        &mut self,
        id: &PartitionId,
        bytes: &[u8],
    ) -> Result<(), StorageError> {
        let p = self
            .parts
            .get_mut(id)
            .ok_or_else(|| self.ctx.shared.not_loaded(id))?;
        let segment_bytes = p.cfg.segment_bytes;
        let Some(s) = p.compaction.as_mut() else {
            return Err(StorageError::CompactionMoved(id.clone()));
        };
        let max = s.buf.len() - 2 * B;
        if bytes.len() > max {
            return Err(StorageError::BatchTooLarge {
                bytes: bytes.len(),
                max,
            });
        }
        let mut at = 0;
        while at < bytes.len() {
            let h = batch::verify(&bytes[at..])?;
            let n = h.total_len as usize;
            if h.base_offset < s.seg.next_offset || h.next_offset() > s.end_offset {
                return Err(StorageError::InvalidBatch(batch::BatchError::Malformed(
                    "a compacted batch is out of its segment's offsets",
                )));
            }
            let pos = s.file_off + s.len as u64;
            if pos + n as u64 > segment_bytes {
                return Err(StorageError::BatchTooLarge {
                    bytes: n,
                    max: (segment_bytes - pos) as usize,
                });
            }
            if s.len + n > s.buf.len() {
                flush_full_blocks(&mut self.ctx, s)?;
            }
            s.buf[s.len..s.len + n].copy_from_slice(&bytes[at..at + n]);
            s.len += n;
            s.seg.note_batch(&h, pos);
            at += n;
        }
        Ok(())
    }

    /// Makes the scratch segment durable and swaps it in (see the module
    /// docs); the replaced slots are free afterwards.
    pub(super) fn compact_commit(&mut self, id: &PartitionId) -> Result<(), StorageError> {
        self.finish_inflight();
        let p = self
            .parts
            .get_mut(id)
            .ok_or_else(|| self.ctx.shared.not_loaded(id))?;
        let Some(mut s) = p.compaction.take() else {
            return Err(StorageError::CompactionMoved(id.clone()));
        };
        let scratch_path = p.dir.join(SCRATCH_FILE);
        let abort = |ctx: &mut super::engine::Ctx, file| {
            ctx.io.close(file);
            keep_as_spare(ctx, &p.dir);
        };
        if s.seg.next_offset != s.end_offset {
            abort(&mut self.ctx, s.file);
            return Err(StorageError::InvalidBatch(batch::BatchError::Malformed(
                "a compacted segment must end where the segments it replaces ended",
            )));
        }
        // The ring must still hold what was compacted (time retention may
        // have dropped the oldest meanwhile).
        let unchanged = p.ring.oldest == s.first_slot
            && p.ring.segs[s.first_slot].epoch == s.first_epoch
            && p.ring.live > s.count
            && p.ring.slot(s.count - 1) == s.last_slot
            && p.ring.segs[s.last_slot].epoch == s.last_epoch;
        if !unchanged || p.refuse_writes().is_some() {
            abort(&mut self.ctx, s.file);
            return Err(StorageError::CompactionMoved(id.clone()));
        }
        // The rest: the partial block, zeros to the next unit and one unit
        // more (the end mark recovery looks for), within the segment. The
        // whole mark, always: behind it are the scratch file's old bytes,
        // which may hold batches above this segment's end (a spare that
        // was an unfinished merge's scratch file), and a scan must never
        // reach them.
        let unit = p.tail.unit;
        if (s.len / unit + 2) * unit > s.buf.len() {
            if let Err(e) = flush_full_blocks(&mut self.ctx, &mut s) {
                abort(&mut self.ctx, s.file);
                return Err(e);
            }
        }
        let end = ((s.len / unit + 1) * unit + unit)
            .min(s.buf.len())
            .min((p.cfg.segment_bytes - s.file_off) as usize);
        s.buf[s.len..end].fill(0);
        let op = WriteOp {
            file: s.file,
            offset: s.file_off,
            data: &s.buf[..end],
        };
        let written = self.ctx.write_batch(&[op], &[s.file]);
        if let Err(e) = written {
            abort(&mut self.ctx, s.file);
            return Err(e.into());
        }
        let target = seg_path(&p.dir, p.file_nos[s.last_slot] as usize);
        // An exchange, not a rename: the replaced segment's file stays, as
        // the next compaction's scratch file (`SPARE_FILE`).
        let swapped = match self.ctx.io.exchange(&scratch_path, &target) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                self.ctx.io.rename(&scratch_path, &target).map(|()| false)
            }
            Err(e) => Err(e),
        };
        let kept_old = match swapped {
            Ok(kept) => kept,
            Err(e) => {
                abort(&mut self.ctx, s.file);
                return Err(e.into());
            }
        };
        // From here the compaction has happened, whatever else fails.
        let old = std::mem::replace(&mut p.files[s.last_slot], s.file);
        self.ctx.close(old);
        for k in 0..s.count - 1 {
            let slot = p.ring.slot(k);
            let f = p.files[slot];
            self.ctx
                .ahead
                .forget(&mut *self.ctx.io, &mut self.ctx.rbuf, f);
            p.ring.segs[slot].epoch = 0;
        }
        let freed = s.count - 1;
        p.ring.oldest = s.last_slot;
        p.ring.live -= freed;
        let before = p.ring.segs[s.last_slot].end_pos;
        std::mem::swap(&mut p.ring.segs[s.last_slot], &mut s.seg);
        for k in 0..s.count {
            let slot = (s.first_slot + k) % p.ring.n();
            p.ring.forget_skips(slot);
        }
        p.resume = None;
        let dir_synced = self.ctx.io.sync_dir(&p.dir);
        p.publish();
        StatsInner::add(&self.ctx.shared.stats.compactions, 1);
        log::info!(
            "partition {id}: compacted offsets {}..{} ({} segment(s), {} bytes into {}), {freed} \
             slot(s) freed",
            p.ring.segs[s.last_slot].base_offset,
            s.end_offset,
            s.count,
            before,
            p.ring.segs[s.last_slot].end_pos
        );
        if let Err(e) = dir_synced {
            p.fail(&e, &self.ctx.shared.stats);
            return Err(p.refuse_writes().expect("failed"));
        }
        // Only after the exchange is durable: a spare must never be a file
        // the ring may still name after a power cut. Not renamed (a crash
        // here), start-up makes it the spare.
        if kept_old {
            let _ = self.ctx.io.rename(&scratch_path, &p.dir.join(SPARE_FILE));
        }
        Ok(())
    }

    /// Drops a compaction in progress, if any; its scratch file is the
    /// spare again.
    pub(super) fn compact_abort(&mut self, id: &PartitionId) {
        let Some(p) = self.parts.get_mut(id) else {
            return;
        };
        if let Some(s) = p.compaction.take() {
            self.ctx.io.close(s.file);
            keep_as_spare(&mut self.ctx, &p.dir);
        }
    }

    /// Reserves the compaction spare of a partition being created, in
    /// `dir` with its ring; the handle is kept to sync it with the ring.
    pub(super) fn create_spare(
        &mut self,
        id: &PartitionId,
        cfg: &super::PartitionConfig,
        dir: &std::path::Path,
        spare: &mut Option<FileHandle>,
    ) -> Result<(), StorageError> {
        let f = self.ctx.io.open(&dir.join(SPARE_FILE), true)?;
        *spare = Some(f);
        self.ctx
            .allocate(f, cfg.segment_bytes)
            .map_err(|e| no_room_for_spare(id, cfg, e))?;
        Ok(())
    }

    /// See `Storage::set_spare`. Synced here (file and directory): only
    /// an alter and start-up reserve one after the create.
    pub(super) fn set_spare(&mut self, id: &PartitionId, keep: bool) -> Result<(), StorageError> {
        let p = self
            .parts
            .get(id)
            .ok_or_else(|| self.ctx.shared.not_loaded(id))?;
        let path = p.dir.join(SPARE_FILE);
        if !keep {
            return match self.ctx.io.remove(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
        }
        // The scratch file in use is the spare, or becomes it.
        if p.compaction.is_some() || p.refuse_writes().is_some() {
            return Ok(());
        }
        let cfg = p.cfg.clone();
        match self.ctx.io.open(&path, false) {
            Ok(f) => {
                // One a crash cut short in its allocation gets the rest;
                // a whole one costs nothing. Not written over where there
                // is no fallocate: a spare found is one reserved before.
                let topped = match self.ctx.io.allocate(f, cfg.segment_bytes) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                    r => r,
                };
                let synced = topped.and_then(|()| self.ctx.io.sync(f));
                self.ctx.io.close(f);
                synced.map_err(|e| no_room_for_spare(id, &cfg, e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = self.ctx.io.open(&path, true)?;
                let made = self
                    .ctx
                    .allocate(f, cfg.segment_bytes)
                    .and_then(|_| self.ctx.io.sync(f));
                self.ctx.io.close(f);
                let dir = path.parent().expect("a partition directory");
                if let Err(e) = made.and_then(|()| self.ctx.io.sync_dir(dir)) {
                    let _ = self.ctx.io.remove(&path);
                    return Err(no_room_for_spare(id, &cfg, e));
                }
                log::info!(
                    "partition {id}: reserved {} bytes for its compactions ({SPARE_FILE})",
                    cfg.segment_bytes
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Keeps the scratch file of a merge that did not happen as the spare:
/// whole and allocated, and never named by the ring (it was not swapped
/// in), so its blocks are the next merge's room; removed, the next merge
/// on a full disk would find none. Its content does not matter (see
/// `compact_begin`). One there already is kept instead.
pub(super) fn keep_as_spare(ctx: &mut super::engine::Ctx, dir: &std::path::Path) -> bool {
    let (scratch, spare) = (dir.join(SCRATCH_FILE), dir.join(SPARE_FILE));
    if let Ok(f) = ctx.io.open(&spare, false) {
        ctx.io.close(f);
        let _ = ctx.io.remove(&scratch);
        return false;
    }
    if ctx.io.rename(&scratch, &spare).is_ok() {
        return true;
    }
    let _ = ctx.io.remove(&scratch);
    false
}

/// ENOSPC reserving a spare: the disk cannot hold the partition's ring and
/// the segment its compactions write.
fn no_room_for_spare(
    id: &PartitionId,
    cfg: &super::PartitionConfig,
    e: std::io::Error,
) -> StorageError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        StorageError::InsufficientSpace {
            partition: id.clone(),
            bytes: cfg.ring_bytes().saturating_add(cfg.segment_bytes),
        }
    } else {
        e.into()
    }
}

/// Writes the scratch buffer's whole blocks and keeps the partial last one
/// at the front.
fn flush_full_blocks(ctx: &mut super::engine::Ctx, s: &mut Scratch) -> Result<(), StorageError> {
    let whole = s.len / B * B;
    if whole > 0 {
        let op = WriteOp {
            file: s.file,
            offset: s.file_off,
            data: &s.buf[..whole],
        };
        ctx.write_batch(&[op], &[])?;
        s.buf.copy_within(whole..s.len, 0);
        s.file_off += whole as u64;
        s.len -= whole;
    }
    debug_assert_eq!(s.file_off % B64, 0);
    Ok(())
}

impl Engine {
    /// Applies a partition's new retention, durability, overflow and
    /// segment count (not its segment size): what was appended under the
    /// old policy is made durable first, the ring is resized (`resize`),
    /// then `partition.meta` is replaced atomically; returns the earliest
    /// offset kept if a shrink dropped the oldest segments. On an error the
    /// partition keeps its old config, its ring resized back (records a
    /// shrink dropped stay dropped); only a resize back that fails too
    /// leaves the ring at the new size, which a restart loads as well.
    pub(super) fn alter(
        &mut self,
        id: &PartitionId,
        cfg: super::PartitionConfig,
    ) -> Result<Option<u64>, StorageError> {
        cfg.validate()?;
        let p = self
            .parts
            .get_mut(id)
            .ok_or_else(|| self.ctx.shared.not_loaded(id))?;
        if cfg.segment_bytes != p.cfg.segment_bytes {
            return Err(StorageError::InvalidConfig(
                "a partition's segment size is fixed",
            ));
        }
        if cfg == p.cfg {
            return Ok(None);
        }
        if p.refuse_writes().is_none() {
            p.commit_now(&mut self.ctx, true)?;
        }
        let (old_segments, old_overflow) = (p.cfg.segments, p.cfg.overflow);
        let mut dropped = None;
        if cfg.segments != old_segments {
            // Under the new overflow policy: a shrink may drop the oldest
            // segments only where the new config lets the ring overwrite.
            p.cfg.overflow = cfg.overflow;
            match self.resize(id, cfg.segments) {
                Ok(d) => dropped = d,
                Err(e) => {
                    if let Some(p) = self.parts.get_mut(id) {
                        p.cfg.overflow = old_overflow;
                    }
                    return Err(e);
                }
            }
        }
        let p = self.parts.get_mut(id).expect("checked above");
        let meta = super::part::PartitionMeta {
            topic: id.topic.to_string(),
            partition: id.partition,
            cfg: cfg.clone(),
        };
        // One renamed in place but not synced is written: the next start
        // loads its config. Taken as a failure, the partition ran its old
        // config (its ring resized back), a restart the new one (with the
        // size ring.meta says).
        let path = p.dir.join(super::part::PARTITION_META);
        let written = super::meta::write_atomic(&path, &meta);
        if let Err(e) = super::meta::unsynced_is_written(&path, written) {
            // The ring must not run a size its partition.meta does not
            // say (nor the new overflow): back to the old config.
            p.cfg.overflow = old_overflow;
            if p.cfg.segments != old_segments {
                if let Err(undo) = self.resize(id, old_segments) {
                    log::error!(
                        "partition {id}: partition.meta not written ({e}), and the ring could                          not be resized back to {old_segments} segments ({undo}); it keeps                          the new size, as a restart will"
                    );
                }
            }
            return Err(e.into());
        }
        log::info!("partition {id}: config now {cfg}");
        p.cfg = cfg;
        if p.cfg.retention_ms.is_some() {
            let now = self.ctx.cfg.clock.wall_ms();
            if p.apply_time_retention(now) {
                p.publish();
            }
        }
        Ok(dropped)
    }
}
