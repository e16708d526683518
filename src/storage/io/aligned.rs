//! A heap buffer whose address and length are multiples of [`BLOCK_BYTES`],
//! as O_DIRECT requires. This is the only `unsafe` outside the backends.

use super::BLOCK_BYTES;
use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

/// A zero-initialised, block-aligned byte buffer of fixed capacity.
///
/// Invariant: `ptr` points to `len` initialised bytes allocated with
/// `Layout::from_size_align(len, BLOCK_BYTES)`; `len` is a non-zero
/// multiple of `BLOCK_BYTES`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes rounded up to a whole number of blocks (at
    /// least one). Zeroed, so a partial block is always padded with zeros.
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(1).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let layout = Layout::from_size_align(len, BLOCK_BYTES).expect("block-aligned layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: per the type invariant, `len` initialised bytes live at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, BLOCK_BYTES).expect("block-aligned layout");
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.len(), 2 * BLOCK_BYTES);
        assert_eq!(b.as_slice().as_ptr() as usize % BLOCK_BYTES, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[8191] = 7;
        assert_eq!(b.as_slice()[8191], 7);
    }
}
