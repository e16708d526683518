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
    home: Option<Arc<Shelf>>,
}

impl BatchBuf {
    /// The bytes, taken out of the pool's reach (they will not go back).
    pub fn into_vec(mut self) -> Vec<u8> {
        self.home = None;
        std::mem::take(&mut self.bytes)
    }
}

impl From<Vec<u8>> for BatchBuf {
    /// A buffer of no pool: freed when dropped.
    fn from(bytes: Vec<u8>) -> BatchBuf {
        BatchBuf { bytes, home: None }
    }
}

impl std::ops::Deref for BatchBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::ops::DerefMut for BatchBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl std::fmt::Debug for BatchBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuf")
            .field("len", &self.bytes.len())
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
        BatchPool {
            shelf: Arc::new(Shelf {
                buffers_max: buffers,
                buffer_bytes_max,
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
        buf.extend_from_slice(bytes);
        BatchBuf {
            bytes: buf,
            home: (bytes.len() >= BUFFER_BYTES_MIN).then(|| self.shelf.clone()),
        }
    }

    /// An empty buffer with room for at least `len` bytes, recycled when
    /// the pool has one large enough, for a caller that fills it and
    /// gives it back with [`give`](Self::give).
    pub fn take(&self, len: usize) -> Vec<u8> {
        self.shelf.take(len)
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
    list: Mutex<Vec<Vec<u8>>>,
}

impl Shelf {
    /// An empty buffer with room for at least `len` bytes: a recycled one
    /// when there is one large enough.
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
    /// bound.
    fn give(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < BUFFER_BYTES_MIN || cap > self.buffer_bytes_max {
            return;
        }
        buf.clear();
        let mut list = self.lock();
        if list.len() < self.buffers_max {
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
}
