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
//! Now the storage thread gives a batch's buffer back here once it has
//! copied it, and the next batch decoded takes it again, pages already
//! mapped, whatever the allocator's heuristics. The pool is bounded in buffers and in the size of each (set from
//! the config at start, counted in `skiff config check`'s memory budget);
//! what does not fit is freed as before.
//!
//! It is global because the one place that fills these buffers, the CBOR
//! decoding of a produce request, has no handle through which a pool could
//! be passed. Which buffer a batch lands in changes nothing but speed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Below this a buffer comes from the allocator's own free lists, which
/// are cheap: not worth a lock.
pub const BUFFER_BYTES_MIN: usize = 32 * 1024;

/// Fresh buffers are rounded up to this, so a batch a little larger than
/// the one before still fits a recycled buffer.
const ROUND_BYTES: usize = 64 * 1024;

/// Buffers kept unless [`configure`] says otherwise: enough for the
/// batches that arrive during one write and flush of a busy partition.
pub const BUFFERS_DEFAULT: usize = 8;

/// Largest buffer kept unless [`configure`] says otherwise (the default
/// `storage.max_batch_bytes`).
pub const BUFFER_BYTES_MAX_DEFAULT: usize = 1024 * 1024;

/// The pool the protocol and storage share; see the module docs.
static GLOBAL: Pool = Pool::new(BUFFERS_DEFAULT, BUFFER_BYTES_MAX_DEFAULT);

/// Bounds the shared pool: at most `buffers` buffers of at most
/// `buffer_bytes_max` each are kept. Buffers already kept beyond the new
/// bounds are freed.
pub fn configure(buffers: usize, buffer_bytes_max: usize) {
    GLOBAL.configure(buffers, buffer_bytes_max);
}

/// An empty buffer with room for at least `len` bytes, from the shared
/// pool when it has one large enough.
pub fn take(len: usize) -> Vec<u8> {
    GLOBAL.take(len)
}

/// Gives a buffer back to the shared pool for a later [`take`].
pub fn give(buf: Vec<u8>) {
    GLOBAL.give(buf);
}

/// What a pool bounded so may hold at most, in bytes: for the memory
/// budget.
pub fn bytes_max(buffers: usize, buffer_bytes_max: usize) -> u64 {
    let rounded = buffer_bytes_max.next_multiple_of(ROUND_BYTES);
    (buffers as u64).saturating_mul(rounded as u64)
}

struct Pool {
    buffers_max: AtomicUsize,
    buffer_bytes_max: AtomicUsize,
    list: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    const fn new(buffers: usize, buffer_bytes_max: usize) -> Pool {
        Pool {
            buffers_max: AtomicUsize::new(buffers),
            buffer_bytes_max: AtomicUsize::new(buffer_bytes_max),
            list: Mutex::new(Vec::new()),
        }
    }

    fn configure(&self, buffers: usize, buffer_bytes_max: usize) {
        self.buffers_max.store(buffers, Ordering::Relaxed);
        self.buffer_bytes_max
            .store(buffer_bytes_max, Ordering::Relaxed);
        let mut list = self.lock();
        list.retain(|b| b.capacity() <= buffer_bytes_max);
        list.truncate(buffers);
    }

    /// An empty buffer with room for at least `len` bytes: a recycled one
    /// when the pool has one large enough.
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
        let max = self.buffer_bytes_max.load(Ordering::Relaxed);
        let rounded = len.next_multiple_of(ROUND_BYTES);
        // Never rounded past what `give` keeps: it could not come back.
        Vec::with_capacity(if rounded > max { len } else { rounded })
    }

    /// Keeps a buffer for a later [`Pool::take`]; frees it when the pool is
    /// full, or the buffer is too small to be worth keeping or above the
    /// size bound.
    fn give(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < BUFFER_BYTES_MIN || cap > self.buffer_bytes_max.load(Ordering::Relaxed) {
            return;
        }
        buf.clear();
        let max = self.buffers_max.load(Ordering::Relaxed);
        let mut list = self.lock();
        if list.len() < max {
            if list.capacity() < max {
                // Once, so pushes never allocate on the storage thread.
                let more = max - list.len();
                list.reserve_exact(more);
            }
            list.push(buf);
        }
    }

    /// Buffers kept now, and their bytes.
    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let list = self.lock();
        (list.len(), list.iter().map(Vec::capacity).sum())
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

    fn holds(p: &Pool, ptr: *const u8) -> bool {
        p.lock().iter().any(|b| b.as_ptr() == ptr)
    }

    #[test]
    fn a_given_buffer_is_taken_again_with_its_pages() {
        let p = Pool::new(4, 1024 * 1024);
        let mut b = p.take(200 * 1024 + 7);
        assert!(b.capacity() >= 200 * 1024 + 7);
        assert_eq!(b.capacity() % ROUND_BYTES, 0, "rounded up");
        b.extend_from_slice(&[1; 1000]);
        let ptr = b.as_ptr();
        p.give(b);
        assert!(holds(&p, ptr));
        let again = p.take(200 * 1024 + 9);
        assert_eq!(again.as_ptr(), ptr, "the same allocation back");
        assert!(again.is_empty(), "handed out empty");
        assert_eq!(p.kept(), (0, 0));
    }

    #[test]
    fn small_oversized_and_surplus_buffers_are_freed_not_kept() {
        let p = Pool::new(2, 500 * 1024);
        p.give(Vec::with_capacity(BUFFER_BYTES_MIN - 1));
        p.give(Vec::with_capacity(500 * 1024 + 1));
        assert_eq!(p.kept(), (0, 0));
        for _ in 0..3 {
            p.give(Vec::with_capacity(64 * 1024));
        }
        assert_eq!(p.kept(), (2, 128 * 1024), "bounded in buffers");
        // A fresh buffer is never rounded past the size bound.
        assert_eq!(p.take(480 * 1024).capacity(), 480 * 1024);
        // Small asks never touch the pool.
        assert_eq!(p.take(100).capacity(), 100);
        assert_eq!(p.kept().0, 2);
        // Tightened bounds drop what no longer fits.
        p.configure(1, 32 * 1024);
        assert_eq!(p.kept(), (0, 0));
    }

    #[test]
    fn the_smallest_fitting_buffer_is_taken() {
        let p = Pool::new(4, 1024 * 1024);
        let a = Vec::<u8>::with_capacity(704 * 1024);
        let b = Vec::<u8>::with_capacity(640 * 1024);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        p.give(a);
        p.give(b);
        let (tb, ta) = (p.take(600 * 1024), p.take(700 * 1024));
        assert_eq!((tb.as_ptr(), ta.as_ptr()), (pb, pa));
        // None fits: a fresh one.
        p.give(Vec::with_capacity(64 * 1024));
        assert_eq!(p.take(100 * 1024).capacity(), 128 * 1024);
        assert_eq!(p.kept().0, 1);
    }

    #[test]
    fn the_budget_counts_rounded_buffers() {
        assert_eq!(bytes_max(8, 1024 * 1024), 8 * 1024 * 1024);
        assert_eq!(bytes_max(2, 100 * 1024), 2 * 128 * 1024);
    }
}
