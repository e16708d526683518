//! Growing and shrinking a partition's ring live (`skiff topics alter
//! --segments`).
//!
//! # The ring's files
//!
//! A ring place ("slot") and the segment file holding it were the same
//! number until a resize: `ring.meta` ([`RingLayout`]) lists the file of
//! each slot, in ring order, and a segment header's `slot` field names its
//! file. So a resize never renames or rewrites a segment that holds data.
//!
//! - **Grow** by `k`: `k` new files (numbers not in use) are allocated and
//!   fdatasynced, then `ring.meta` inserts them right after the active
//!   segment. The live segments stay in one run of the ring, and the new
//!   slots are the next ones a roll takes.
//! - **Shrink** by `k`: the `k` free slots right after the active segment
//!   leave `ring.meta`, then their files are removed. The live segments
//!   must fit: a ring that overwrites drops its oldest segments first (size
//!   retention, as its next wrap would; never past a reader's retain floor),
//!   a ring that refuses to overwrite (compacted topics, `overflow =
//!   reject`) refuses the shrink with [`StorageError::RingTooSmall`].
//!
//! # Why one rename is the commit
//!
//! `ring.meta` is replaced atomically (`meta::write_atomic`). Before that,
//! recovery reads the old layout and removes files it does not name (a
//! grow's new, empty files); after it, the new layout, and it removes the
//! files a shrink took out and brings `partition.meta`'s `segments` in
//! line. Segments keep their files, headers and bytes either way. Recovery
//! walks the ring backwards from the active segment, so what matters is
//! the slot before the oldest: a grow puts empty slots there or leaves it
//! alone, and a shrink leaves it alone unless it takes every free slot
//! (then the ring is full, and the walk stops at its length).

use super::engine::Engine;
use super::io::FileHandle;
use super::meta;
use super::part::{seg_path, RingLayout, Seg, RING_META};
use super::{OverflowPolicy, PartitionId, StorageError};

impl Engine {
    /// Grows or shrinks the ring of `id` to `segments` slots; see the
    /// module's docs. A shrink that dropped the oldest segments returns
    /// the earliest offset it kept. On error the ring is as it was (a
    /// shrink of an overwriting ring may have dropped its oldest segments).
    pub(super) fn resize(
        &mut self,
        id: &PartitionId,
        segments: u32,
    ) -> Result<Option<u64>, StorageError> {
        // A compaction names slots by place, which a resize moves.
        self.compact_abort(id);
        let p = self
            .parts
            .get(id)
            .ok_or_else(|| self.ctx.shared.not_loaded(id))?;
        if let Some(e) = p.refuse_writes() {
            return Err(e);
        }
        let n = p.ring.n();
        let m = segments as usize;
        match m.cmp(&n) {
            std::cmp::Ordering::Equal => Ok(None),
            std::cmp::Ordering::Greater => self.grow(id, m - n).map(|()| None),
            std::cmp::Ordering::Less => self.shrink(id, n - m),
        }
    }

    fn grow(&mut self, id: &PartitionId, k: usize) -> Result<(), StorageError> {
        let p = self.parts.get(id).expect("checked by resize");
        let segment_bytes = p.cfg.segment_bytes;
        let dir = p.dir.clone();
        let mut new_nos = Vec::with_capacity(k);
        let mut no = 0u32;
        while new_nos.len() < k {
            if !p.file_nos.contains(&no) {
                new_nos.push(no);
            }
            no += 1;
        }
        let mut created: Vec<FileHandle> = Vec::with_capacity(k);
        let made = (|| -> Result<(), StorageError> {
            for &no in &new_nos {
                let path = seg_path(&dir, no as usize);
                // A grow that never committed may have left it.
                let _ = self.ctx.io.remove(&path);
                let f = self.ctx.io.open(&path, true)?;
                created.push(f);
                self.ctx.allocate(f, segment_bytes).map_err(|e| {
                    if e.raw_os_error() == Some(libc::ENOSPC) {
                        StorageError::InsufficientSpace {
                            partition: id.clone(),
                            bytes: segment_bytes * k as u64,
                        }
                    } else {
                        e.into()
                    }
                })?;
                self.ctx.io.sync(f)?;
            }
            self.ctx.io.sync_dir(&dir)?;
            Ok(())
        })();
        let p = self.parts.get(id).expect("checked by resize");
        let at = p.ring.active() + 1;
        let mut layout = p.file_nos.clone();
        layout.splice(at..at, new_nos.iter().copied());
        // A ring.meta renamed in place but not synced is the commit all
        // the same: the next start runs its layout. Taken as a failure, the
        // grow removed the files it names and left the ring at its old size
        // until a restart found a ring of missing files.
        let committed = made.and_then(|()| {
            let path = dir.join(RING_META);
            let files = layout.clone();
            let written = meta::write_atomic(&path, &RingLayout { files });
            Ok(meta::unsynced_is_written(&path, written)?)
        });
        if let Err(e) = committed {
            for (&f, &no) in created.iter().zip(&new_nos) {
                self.ctx.close(f);
                let _ = self.ctx.io.remove(&seg_path(&dir, no as usize));
            }
            return Err(e);
        }
        let prewrite = self.ctx.cfg.prewrite_segments;
        let p = self.parts.get_mut(id).expect("checked by resize");
        p.file_nos = layout;
        p.files.splice(at..at, created);
        p.ring
            .segs
            .splice(at..at, (0..k).map(|_| Seg::new(segment_bytes)));
        if p.ring.oldest >= at {
            p.ring.oldest += k;
        }
        p.ring.move_skips(|s| Some(if s >= at { s + k } else { s }));
        p.cfg.segments = p.ring.n() as u32;
        p.resume = None;
        p.prewrite_next = match p.prewrite_next {
            Some((s, pos)) if s >= at => Some((s + k, pos)),
            Some(next) => Some(next),
            None if prewrite => Some((at, 0)),
            None => None,
        };
        log::info!(
            "partition {id}: ring grown to {} segments (files {new_nos:?} added)",
            p.ring.n()
        );
        Ok(())
    }

    fn shrink(&mut self, id: &PartitionId, k: usize) -> Result<Option<u64>, StorageError> {
        let p = self.parts.get_mut(id).expect("checked by resize");
        let n = p.ring.n();
        let m = n - k;
        let mut dropped = None;
        if p.ring.live > m {
            let excess = p.ring.live - m;
            if p.cfg.overflow == OverflowPolicy::Reject {
                return Err(StorageError::RingTooSmall {
                    partition: id.clone(),
                    live_segments: p.ring.live as u32,
                    asked: m as u32,
                });
            }
            // Size retention, as the ring's next wraps would do; never
            // past what a reader (the mirror) still needs.
            if p.held_through(excess) {
                return Err(StorageError::BacklogFull(id.clone()));
            }
            log::warn!(
                "partition {id}: shrinking the ring to {m} segments drops its {excess} oldest \
                 (offsets {}..{})",
                p.ring.earliest(),
                p.ring.segs[p.ring.slot(excess)].base_offset
            );
            for _ in 0..excess {
                p.drop_oldest();
            }
            p.publish();
            dropped = Some(p.ring.earliest());
        }
        // The free slots right after the active one go.
        let active = p.ring.active();
        let gone: Vec<usize> = (1..=k).map(|j| (active + j) % n).collect();
        let layout: Vec<u32> = (0..n)
            .filter(|s| !gone.contains(s))
            .map(|s| p.file_nos[s])
            .collect();
        // As a grow's: one renamed in place but not synced commits too.
        // Taken as a failure, the ring kept the slots the next start
        // removes, and the appends it rolled into them were lost there.
        let path = p.dir.join(RING_META);
        let files = layout.clone();
        let written = meta::write_atomic(&path, &RingLayout { files });
        meta::unsynced_is_written(&path, written)?;
        // Committed: from here on only the files' removal is left, and
        // recovery does that too.
        let oldest_before = p.ring.oldest;
        let removed_before_oldest = gone.iter().filter(|&&s| s < oldest_before).count();
        let mut removed = Vec::with_capacity(k);
        for s in (0..n).rev() {
            if gone.contains(&s) {
                removed.push((p.files.remove(s), p.file_nos[s]));
                p.ring.segs.remove(s);
            }
        }
        p.ring.move_skips(|s| {
            (!gone.contains(&s)).then(|| s - gone.iter().filter(|&&g| g < s).count())
        });
        p.file_nos = layout;
        p.ring.oldest = oldest_before - removed_before_oldest;
        p.cfg.segments = m as u32;
        p.resume = None;
        if p.prewrite_next.is_some() {
            p.prewrite_next = Some((0, 0));
        }
        debug_assert_eq!(p.ring.n(), m);
        debug_assert_eq!(p.ring.active(), (p.ring.oldest + p.ring.live - 1) % m);
        let dir = p.dir.clone();
        for (f, no) in removed {
            self.ctx.close(f);
            if let Err(e) = self.ctx.io.remove(&seg_path(&dir, no as usize)) {
                log::warn!("partition {id}: segment file {no} not removed ({e}); start-up will");
            }
        }
        if let Err(e) = self.ctx.io.sync_dir(&dir) {
            log::warn!("partition {id}: directory sync after a shrink failed ({e})");
        }
        log::info!("partition {id}: ring shrunk to {m} segments");
        Ok(dropped)
    }
}
