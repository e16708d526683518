//! The storage thread's read buffers: the one reads go into, and the
//! spares that read-ahead reads into and that a fetch's answer may borrow.
//!
//! A fetch's batches usually lie together in one read window. Copying them
//! into an answer of their own was the second largest cost of a replay on
//! the broker (15% of its samples at 1 KiB, beside the CRC check), and on
//! a board's memory bus a copy costs more still. So the answer can be a
//! [`Bytes`] view of the window's buffer, and the next read goes into a
//! spare while the answer travels. Answers and read-ahead share the
//! spares the budget already counts (`thread_buffer_bytes`): no buffer is
//! allocated for lending, and at most [`LENT_MAX`] are out at once. When
//! none can be lent, the answer is copied as before.

use super::io::AlignedBuf;
use bytes::Bytes;
use std::ops::{Deref, DerefMut, Range};
use std::sync::Arc;

/// Buffers answers may hold at once. A consumer's answer is written while
/// its next fetch is read, so two cover one sequential reader and the next
/// one's answer being made; the other spares stay for read-ahead.
pub(crate) const LENT_MAX: usize = 2;

/// Answers below this many bytes are copied: a view would hold a whole
/// buffer (the size of the largest batch) for a few bytes, and the copy
/// costs little.
pub(super) const LEND_BYTES_MIN: usize = 64 * 1024;

/// The buffer reads go into (`bufs[0]`), then the spares: free (held here
/// only) or lent to answers. Buffers a read ahead holds are the backend's
/// until it ends ([`ReadBuf::take_spare`], [`ReadBuf::put_spare`]).
///
/// Derefs to the current buffer; a mutable deref first swaps in a free
/// spare if an answer holds the current one, so its contents are only what
/// the caller reads into it after a lend. A free spare is always there
/// then: a lend needs one, and read-ahead leaves it. Any `&mut` use of the
/// buffer counts as such a deref (even one that reads nothing, as a window
/// that covers its bytes already), so a lend ends the window it was made
/// from: the read path lends only as a fetch returns.
pub(super) struct ReadBuf {
    bufs: Vec<Arc<AlignedBuf>>,
}

/// An answer's hold on a lent buffer.
struct Lent(Arc<AlignedBuf>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn held(b: &Arc<AlignedBuf>) -> bool {
    Arc::strong_count(b) > 1
}

impl ReadBuf {
    pub(super) fn new(buf: AlignedBuf, spares: Vec<AlignedBuf>) -> ReadBuf {
        let mut bufs = vec![Arc::new(buf)];
        bufs.extend(spares.into_iter().map(Arc::new));
        ReadBuf { bufs }
    }

    fn free_spares(&self) -> usize {
        self.bufs[1..].iter().filter(|b| !held(b)).count()
    }

    /// `range` of the current buffer as bytes that keep it from being read
    /// into until they are dropped; `None` when [`LENT_MAX`] are out, or
    /// no spare is free to read into next (the caller copies).
    pub(super) fn lend(&self, range: Range<usize>) -> Option<Bytes> {
        let lent = self.bufs.iter().filter(|b| held(b)).count();
        let room = held(&self.bufs[0]) || lent < LENT_MAX;
        if !room || self.free_spares() == 0 {
            return None;
        }
        Some(Bytes::from_owner(Lent(Arc::clone(&self.bufs[0]))).slice(range))
    }

    /// A free spare for a read ahead, leaving one for the current buffer
    /// to swap with if an answer holds it.
    pub(super) fn take_spare(&mut self) -> Option<AlignedBuf> {
        let keep = usize::from(held(&self.bufs[0]));
        if self.free_spares() <= keep {
            return None;
        }
        let i = (1..self.bufs.len()).find(|&i| !held(&self.bufs[i]))?;
        Arc::try_unwrap(self.bufs.swap_remove(i)).ok()
    }

    /// A read ahead's buffer back, its bytes unused.
    pub(super) fn put_spare(&mut self, buf: AlignedBuf) {
        self.bufs.push(Arc::new(buf));
    }

    /// A read ahead's buffer becomes the current one; the current one
    /// becomes a spare (free, or still lent).
    pub(super) fn install(&mut self, buf: AlignedBuf) {
        self.bufs.push(Arc::new(buf));
        let last = self.bufs.len() - 1;
        self.bufs.swap(0, last);
    }

    /// Buffers answers hold now (tests).
    #[cfg(test)]
    pub(super) fn lent(&self) -> usize {
        self.bufs.iter().filter(|b| held(b)).count()
    }
}

impl Deref for ReadBuf {
    type Target = AlignedBuf;

    fn deref(&self) -> &AlignedBuf {
        &self.bufs[0]
    }
}

impl DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        if held(&self.bufs[0]) {
            // Answers only drop their holds, so a spare found free stays
            // free until it is taken here.
            match (1..self.bufs.len()).find(|&i| !held(&self.bufs[i])) {
                Some(i) => self.bufs.swap(0, i),
                None => {
                    // Not reached: `lend` and `take_spare` leave a free
                    // spare. Were it, one buffer over the budget beats a
                    // read into bytes an answer still holds.
                    debug_assert!(false, "no free read buffer");
                    let len = self.bufs[0].len();
                    let buf = AlignedBuf::new(len).expect("the read buffer's length");
                    self.install(buf);
                }
            }
        }
        Arc::get_mut(&mut self.bufs[0]).expect("no answer holds this buffer")
    }
}

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBuf")
            .field("len", &self.bufs[0].len())
            .field("buffers", &self.bufs.len())
            .field("free_spares", &self.free_spares())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bufs(spares: usize) -> ReadBuf {
        let b = || AlignedBuf::new(4096).unwrap();
        ReadBuf::new(b(), (0..spares).map(|_| b()).collect())
    }

    #[test]
    fn a_lent_buffer_is_not_read_into_until_its_answer_is_dropped() {
        let mut rb = bufs(4);
        rb[..3].copy_from_slice(b"abc");
        let a = rb.lend(0..3).expect("a spare to come");
        // The next read goes into another buffer; the answer keeps its bytes.
        rb[..3].copy_from_slice(b"xyz");
        assert_eq!(&a[..], b"abc");
        let b = rb.lend(0..3).expect("a second spare");
        rb[..3].copy_from_slice(b"123");
        assert_eq!((&a[..], &b[..]), (&b"abc"[..], &b"xyz"[..]));
        assert_eq!(rb.lent(), LENT_MAX);
        // LENT_MAX out: the third answer is copied.
        assert!(rb.lend(0..3).is_none());
        drop(a);
        assert_eq!(rb.lent(), 1);
        let c = rb.lend(0..3).expect("a's buffer is free again");
        rb[..3].copy_from_slice(b"456");
        assert_eq!((&b[..], &c[..]), (&b"xyz"[..], &b"123"[..]));
        // Nothing beyond the buffers it was given.
        assert_eq!(rb.bufs.len(), 5);
    }

    #[test]
    fn read_ahead_and_answers_share_the_spares_and_one_stays_free() {
        let mut rb = bufs(2);
        let ahead = rb.take_spare().expect("two free");
        rb[..1].copy_from_slice(b"a");
        let a = rb.lend(0..1).expect("one spare free to read into next");
        // The current buffer is lent: its swap needs the last free spare.
        assert!(rb.take_spare().is_none());
        rb[..1].copy_from_slice(b"b");
        // None free now: no lend, and no spare for read-ahead.
        assert!(rb.lend(0..1).is_none());
        assert!(rb.take_spare().is_none());
        // The read ahead lands: its buffer is current, the old one spare.
        let mut ahead = ahead;
        ahead[..1].copy_from_slice(b"r");
        rb.install(ahead);
        assert_eq!((rb.bufs.len(), &rb[..1]), (3, &b"r"[..]));
        let b = rb.lend(0..1).expect("b's buffer is free");
        drop(a);
        let ahead = rb.take_spare().expect("a's buffer, with one left free");
        assert!(rb.take_spare().is_none());
        rb.put_spare(ahead);
        rb[..1].copy_from_slice(b"c");
        assert_eq!((&b[..], &rb[..1]), (&b"r"[..], &b"c"[..]));
        assert_eq!(rb.bufs.len(), 3);
    }

    #[test]
    fn an_answer_outlives_the_buffer_set() {
        let mut rb = bufs(1);
        rb[4000..4005].copy_from_slice(b"later");
        let a = rb.lend(4000..4005).unwrap();
        drop(rb);
        let t = std::thread::spawn(move || a.to_vec());
        assert_eq!(t.join().unwrap(), b"later");
    }
}
