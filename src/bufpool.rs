//! Recycled buffers for produce batches.
//!
//! A produce batch is copied out of its request frame into a buffer of its
//! own (the frame buffer is reused for the next request), handed to the
//! storage thread, and copied again into the partition's tail buffer. At
//! 1 KiB records a batch is about 256 KiB, and glibc's allocator gave the
//! freed memory back to the kernel (its heap trim) batch after batch: each
//! new batch was faulted in again, a page fault per 4 KiB received. It
//! stopped only once something larger had been freed (in our runs, when
//! the first client disconnected), so a producer that stays connected, the
//! usual case on a gateway, paid it for good: 222,000 faults and twice the
//! broker CPU over 1M x 1 KiB.
//!
//! So the server owns a [`BatchPool`] and copies each batch it decodes
//! into a [`BatchBuf`] taken from it. A `BatchBuf` goes back to its pool
//! when it is dropped: the storage thread drops it once it has copied the
//! batch into the tail, and the next batch decoded takes it again, pages
//! already mapped, whatever the allocator's heuristics. Storage and the
//! broker only ever see a `BatchBuf`; neither knows where it came from.
//! The pool is bounded in buffers and in the size of each (set from the
//! config at start, counted in `skiff config check`'s memory budget); what
//! does not fit is freed as before.
//!
//! A large batch is not copied at all: the connection lends the request
//! frame's whole read buffer ([`BatchPool::lend`]), the batch a range of
//! it, and reads on into a buffer taken from the pool
//! ([`BatchPool::take_filled`]). The copy out of the frame was 9% of the
//! broker's samples at 1 KiB records (docs/performance.md).

use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Below this a buffer comes from the allocator's own free lists, which
/// are cheap: not worth a lock.
pub const BUFFER_BYTES_MIN: usize = 32 * 1024;

/// Fresh buffers are rounded up to this, so a batch a little larger than
/// the one before still fits a recycled buffer.
const ROUND_BYTES: usize = 64 * 1024;

/// Buffers a pool keeps unless configured otherwise: enough for the
/// batches that arrive during one write and flush of a busy partition.
pub const BUFFERS_DEFAULT: usize = 8;

/// What a pool bounded so may hold at most, in bytes: for the memory
/// budget.
pub fn bytes_max(buffers: usize, buffer_bytes_max: usize) -> u64 {
    let rounded = buffer_bytes_max.next_multiple_of(ROUND_BYTES);
    (buffers as u64).saturating_mul(rounded as u64)
}

/// A batch's bytes, in a buffer that goes back to the pool it came from
/// (if any) when dropped. Derefs to the bytes.
#[derive(Default)]
pub struct BatchBuf {
    bytes: Vec<u8>,
    /// The batch's place in `bytes`: all of them, but in a frame's buffer
    /// lent whole ([`BatchPool::lend`]). 32 bits each, as a frame's are
    /// (and each storage job stays within the embedded default's budget).
    start: u32,
    end: u32,
    home: Option<Arc<Shelf>>,
}

impl BatchBuf {
    /// The bytes, taken out of the pool's reach (they will not go back).
    pub fn into_vec(mut self) -> Vec<u8> {
        self.home = None;
        let range = self.range();
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.truncate(range.end);
        bytes.drain(..range.start);
        bytes
    }

    /// The buffer when no pool takes it back (a small batch's), for its
    /// owner to free; None when it has gone home (here).
    pub fn into_unpooled(mut self) -> Option<Vec<u8>> {
        if self.home.is_some() {
            return None;
        }
        Some(std::mem::take(&mut self.bytes))
    }

    fn range(&self) -> Range<usize> {
        self.start as usize..self.end as usize
    }

    fn whole(bytes: Vec<u8>, home: Option<Arc<Shelf>>) -> BatchBuf {
        let end = u32::try_from(bytes.len()).expect("a batch under 4 GiB");
        BatchBuf {
            bytes,
            start: 0,
            end,
            home,
        }
    }
}

impl From<Vec<u8>> for BatchBuf {
    /// A buffer of no pool: freed when dropped.
    fn from(bytes: Vec<u8>) -> BatchBuf {
        BatchBuf::whole(bytes, None)
    }
}

impl std::ops::Deref for BatchBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.range()]
    }
}

impl std::ops::DerefMut for BatchBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let range = self.range();
        &mut self.bytes[range]
    }
}

impl std::fmt::Debug for BatchBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuf")
            .field("len", &self.range().len())
            .field("pooled", &self.home.is_some())
            .finish()
    }
}

impl Drop for BatchBuf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home.give(std::mem::take(&mut self.bytes));
        }
    }
}

/// A bounded set of batch buffers. Cheap to clone (a handle); buffers
/// handed out hold a handle too, so they find their way back after the
/// pool's owner is gone (and are then freed with the last handle).
#[derive(Clone)]
pub struct BatchPool {
    shelf: Arc<Shelf>,
}

impl std::fmt::Debug for BatchPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchPool")
            .field("buffers_max", &self.shelf.buffers_max)
            .field("buffer_bytes_max", &self.shelf.buffer_bytes_max)
            .finish()
    }
}

impl BatchPool {
    /// Keeps at most `buffers` buffers of at most `buffer_bytes_max` each.
    pub fn new(buffers: usize, buffer_bytes_max: usize) -> BatchPool {
        BatchPool::bounded(buffers, buffer_bytes_max, usize::MAX)
    }

    /// The same, and at most `bytes_max` bytes in all: a pool whose
    /// largest buffers (a frame's, lent) are larger than the ones its
    /// memory is budgeted for.
    pub fn bounded(buffers: usize, buffer_bytes_max: usize, bytes_max: usize) -> BatchPool {
        BatchPool {
            shelf: Arc::new(Shelf {
                buffers_max: buffers,
                buffer_bytes_max,
                bytes_max,
                // Allocated once, so giving a buffer back never allocates
                // on the storage thread.
                list: Mutex::new(Vec::with_capacity(buffers)),
            }),
        }
    }

    /// A copy of `bytes`, in a recycled buffer when the pool has one large
    /// enough.
    pub fn copy(&self, bytes: &[u8]) -> BatchBuf {
        let mut buf = self.shelf.take(bytes.len());
        buf.clear();
        buf.extend_from_slice(bytes);
        let home = (bytes.len() >= BUFFER_BYTES_MIN).then(|| self.shelf.clone());
        BatchBuf::whole(buf, home)
    }

    /// `frame[batch]` as a batch, with no copy: the whole buffer goes to
    /// this pool when the batch is dropped.
    pub fn lend(&self, frame: Vec<u8>, batch: Range<usize>) -> BatchBuf {
        assert!(batch.start <= batch.end && batch.end <= frame.len());
        let (start, end) = (batch.start.try_into(), batch.end.try_into());
        BatchBuf {
            bytes: frame,
            start: start.expect("a frame under 4 GiB"),
            end: end.expect("a frame under 4 GiB"),
            home: Some(self.shelf.clone()),
        }
    }

    /// A buffer of at least `len` bytes, recycled when the pool has one
    /// large enough. Its bytes are whatever it last held: only the part
    /// never used before is zeroed, so a read buffer taken in place of one
    /// lent costs no pass over its memory.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut buf = self.shelf.take(len);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    /// An empty buffer with room for at least `len` bytes, recycled when
    /// the pool has one large enough, for a caller that fills it and
    /// gives it back with [`give`](Self::give).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.shelf.take(len);
        buf.clear();
        buf
    }

    /// Keeps `buf` for a later [`take`](Self::take), or frees it (as a
    /// [`BatchBuf`] going home does).
    pub fn give(&self, buf: Vec<u8>) {
        self.shelf.give(buf)
    }

    /// Buffers kept now, and their bytes.
    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let list = self.shelf.lock();
        (list.len(), list.iter().map(Vec::capacity).sum())
    }
}

struct Shelf {
    buffers_max: usize,
    buffer_bytes_max: usize,
    bytes_max: usize,
    list: Mutex<Vec<Vec<u8>>>,
}

impl Shelf {
    /// A buffer with room for at least `len` bytes: a recycled one (still
    /// holding what it last held) when there is one large enough.
    fn take(&self, len: usize) -> Vec<u8> {
        if len < BUFFER_BYTES_MIN {
            return Vec::with_capacity(len);
        }
        {
            let mut list = self.lock();
            // The smallest that fits, so large buffers stay for large
            // batches.
            let best = list
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return list.swap_remove(i);
            }
        }
        let rounded = len.next_multiple_of(ROUND_BYTES);
        // Never rounded past what `give` keeps: it could not come back.
        Vec::with_capacity(if rounded > self.buffer_bytes_max {
            len
        } else {
            rounded
        })
    }

    /// Keeps a buffer for a later take; frees it when the shelf is full,
    /// or the buffer is too small to be worth keeping or above the size
    /// bound. It keeps its length: [`BatchPool::take_filled`] relies on
    /// those bytes having been written.
    fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < BUFFER_BYTES_MIN || cap > self.buffer_bytes_max {
            return;
        }
        let mut list = self.lock();
        let kept: usize = list.iter().map(Vec::capacity).sum();
        if list.len() < self.buffers_max && kept.saturating_add(cap) <= self.bytes_max {
            list.push(buf);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic while holding the lock leaves a list of buffers, never a
        // broken one.
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(p: &BatchPool, ptr: *const u8) -> bool {
        p.shelf.lock().iter().any(|b| b.as_ptr() == ptr)
    }

    #[test]
    fn a_dropped_buffer_is_taken_again_with_its_pages() {
        let p = BatchPool::new(4, 1024 * 1024);
        let b = p.copy(&vec![1; 200 * 1024 + 7]);
        assert_eq!(b.len(), 200 * 1024 + 7);
        assert_eq!(b.bytes.capacity() % ROUND_BYTES, 0, "rounded up");
        let ptr = b.as_ptr();
        drop(b);
        assert!(holds(&p, ptr));
        let again = p.copy(&[2; 200 * 1024 + 9]);
        assert_eq!(again.as_ptr(), ptr, "the same allocation back");
        assert!(again.iter().all(|&x| x == 2), "holding the new bytes only");
        assert_eq!(again.len(), 200 * 1024 + 9);
        assert_eq!(p.kept(), (0, 0));
        // Taken out of the pool: freed, not kept.
        drop(again.into_vec());
        assert_eq!(p.kept(), (0, 0));
    }

    #[test]
    fn a_lent_frame_is_its_batch_and_comes_home_whole() {
        let p = BatchPool::new(4, 1024 * 1024);
        let mut frame = vec![7u8; 100 * 1024];
        frame[10..20].fill(1);
        let ptr = frame.as_ptr();
        let mut b = p.lend(frame, 10..20);
        assert_eq!(&*b, &[1; 10]);
        b[0] = 2;
        assert_eq!(b[0], 2, "written in place");
        drop(b);
        assert!(holds(&p, ptr), "the whole frame buffer kept");
        // Taken to read into: the same pages, every byte still readable,
        // nothing zeroed.
        let again = p.take_filled(50 * 1024);
        assert_eq!((again.as_ptr(), again.len()), (ptr, 100 * 1024));
        assert_eq!(again[10], 2);
        // Longer than the buffer ever was: the rest is zeroed.
        let fresh = p.take_filled(200 * 1024);
        assert!(fresh.len() == 200 * 1024 && fresh.iter().all(|&x| x == 0));
        // Out of the pool: the batch's bytes only.
        let mut frame = again;
        frame[..4].copy_from_slice(b"abcd");
        assert_eq!(p.lend(frame, 1..3).into_vec(), b"bc");
    }

    #[test]
    fn only_a_buffer_no_pool_takes_back_is_handed_out_unpooled() {
        let p = BatchPool::new(4, 1024 * 1024);
        // Small: the caller gets it, to free where it was allocated.
        let small = p.copy(&[3; 200]);
        let ptr = small.as_ptr();
        let bytes = small.into_unpooled().expect("a small batch has no pool");
        assert_eq!((bytes.as_ptr(), bytes.len()), (ptr, 200));
        assert_eq!(p.kept(), (0, 0));
        // Pooled: it goes home, and the caller gets nothing.
        let large = p.copy(&[4; 64 * 1024]);
        let ptr = large.as_ptr();
        assert!(large.into_unpooled().is_none());
        assert!(holds(&p, ptr));
    }

    #[test]
    fn a_buffer_outliving_its_pools_owner_is_freed_with_the_last_handle() {
        let p = BatchPool::new(4, 1024 * 1024);
        let b = p.copy(&[1; 64 * 1024]);
        let shelf = Arc::downgrade(&p.shelf);
        drop(p);
        assert!(shelf.upgrade().is_some(), "the buffer holds its way home");
        drop(b);
        assert!(shelf.upgrade().is_none());
    }

    #[test]
    fn small_oversized_and_surplus_buffers_are_freed_not_kept() {
        let p = BatchPool::new(2, 500 * 1024);
        p.shelf.give(Vec::with_capacity(BUFFER_BYTES_MIN - 1));
        p.shelf.give(Vec::with_capacity(500 * 1024 + 1));
        assert_eq!(p.kept(), (0, 0));
        for _ in 0..3 {
            p.shelf.give(Vec::with_capacity(64 * 1024));
        }
        assert_eq!(p.kept(), (2, 128 * 1024), "bounded in buffers");
        // A fresh buffer is never rounded past the size bound.
        assert_eq!(p.shelf.take(480 * 1024).capacity(), 480 * 1024);
        // Small copies never touch the pool, and do not go back to it.
        let small = p.copy(&[0; 100]);
        assert!(small.home.is_none());
        drop(small);
        assert_eq!(p.kept().0, 2);
    }

    #[test]
    fn the_smallest_fitting_buffer_is_taken() {
        let p = BatchPool::new(4, 1024 * 1024);
        let a = Vec::<u8>::with_capacity(704 * 1024);
        let b = Vec::<u8>::with_capacity(640 * 1024);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        p.shelf.give(a);
        p.shelf.give(b);
        let (tb, ta) = (p.shelf.take(600 * 1024), p.shelf.take(700 * 1024));
        assert_eq!((tb.as_ptr(), ta.as_ptr()), (pb, pa));
        // None fits: a fresh one.
        p.shelf.give(Vec::with_capacity(64 * 1024));
        assert_eq!(p.shelf.take(100 * 1024).capacity(), 128 * 1024);
        assert_eq!(p.kept().0, 1);
    }

    #[test]
    fn the_budget_counts_rounded_buffers() {
        assert_eq!(bytes_max(8, 1024 * 1024), 8 * 1024 * 1024);
        assert_eq!(bytes_max(2, 100 * 1024), 2 * 128 * 1024);
    }

    #[test]
    fn a_pool_bounded_in_bytes_keeps_fewer_large_buffers() {
        let p = BatchPool::bounded(4, 200 * 1024, 256 * 1024);
        for _ in 0..3 {
            p.give(Vec::with_capacity(100 * 1024));
        }
        assert_eq!(p.kept(), (2, 200 * 1024), "a third would pass the bytes");
        p.give(Vec::with_capacity(50 * 1024));
        assert_eq!(p.kept(), (3, 250 * 1024), "a smaller one still fits");
    }
}
