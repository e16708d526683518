//! [`AlignedBuf`]: the heap buffer O_DIRECT needs.
//!
//! O_DIRECT requires the buffer address, the length and the file offset to
//! be multiples of the logical block size. A `Vec<u8>` only guarantees an
//! alignment of 1, so the engine's tail buffers, read buffers and pools are
//! `AlignedBuf`s: mapped once at start-up (page-aligned anonymous memory,
//! zero and resident only once written), never reallocated (no growth under
//! load; the memory budget is fixed when the pools are built).
//!
//! This file is the one place where allocation needs `unsafe`.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::BLOCK_BYTES;

/// Why an [`AlignedBuf`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AlignedBufError {
    /// The requested length is zero or not a multiple of [`BLOCK_BYTES`]:
    /// a caller sized a pool from an unchecked config value.
    Unaligned { len_bytes: usize },
    /// The length overflows `isize` once rounded (an absurd config value).
    TooLarge { len_bytes: usize },
}

impl fmt::Display for AlignedBufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlignedBufError::Unaligned { len_bytes } => write!(
                f,
                "aligned buffer length {len_bytes} is zero or not a multiple of {BLOCK_BYTES}"
            ),
            AlignedBufError::TooLarge { len_bytes } => {
                write!(f, "aligned buffer length {len_bytes} is too large")
            }
        }
    }
}

impl std::error::Error for AlignedBufError {}

/// A zero-initialised heap buffer whose address and length are multiples of
/// [`BLOCK_BYTES`]. Fixed size: it never grows or reallocates.
pub struct AlignedBuf {
    /// Start of the mapping. Invariant: mapped by `new` with
    /// `layout.size()` bytes, not yet unmapped, aligned to `BLOCK_BYTES`.
    ptr: NonNull<u8>,
    /// `layout.size()` is the buffer length: non-zero, a multiple of
    /// `BLOCK_BYTES`; `layout.align() == BLOCK_BYTES`.
    layout: Layout,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Box<[u8]>`);
// nothing else holds the pointer, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is `Sync`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len_bytes` zeroed bytes aligned to [`BLOCK_BYTES`].
    /// `len_bytes` must be a non-zero multiple of [`BLOCK_BYTES`].
    ///
    /// Aborts (via [`alloc::handle_alloc_error`]) if the kernel refuses the
    /// mapping, like `Vec` does when out of memory: pools are allocated at
    /// start-up, so this happens at start or never.
    pub fn new(len_bytes: usize) -> Result<AlignedBuf, AlignedBufError> {
        if len_bytes == 0 || len_bytes % BLOCK_BYTES != 0 {
            return Err(AlignedBufError::Unaligned { len_bytes });
        }
        let layout = Layout::from_size_align(len_bytes, BLOCK_BYTES)
            .map_err(|_| AlignedBufError::TooLarge { len_bytes })?;
        // Straight from the kernel rather than the global allocator: fresh
        // anonymous pages are zero and become resident only when written,
        // whatever allocator the binary uses (one that clears `calloc`ed
        // memory by writing it would make every tail buffer resident at
        // start). Page-aligned, so BLOCK_BYTES-aligned.
        // SAFETY: a new private anonymous mapping; no existing memory is
        // touched. The result is checked against MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            alloc::handle_alloc_error(layout)
        }
        let ptr = NonNull::new(raw.cast::<u8>()).expect("mmap never returns null on success");
        debug_assert_eq!(ptr.as_ptr() as usize % BLOCK_BYTES, 0);
        Ok(AlignedBuf { ptr, layout })
    }

    /// Length in bytes (fixed at construction).
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: zero-length buffers cannot be built. Present because
    /// clippy asks for it next to `len`.
    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed at
        // allocation, then only written through `&mut [u8]`) bytes that live
        // as long as `self`; the returned borrow is tied to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` guarantees the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` and the length are those of the mapping made in
        // `new`, unmapped only here, once; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.layout.size()) };
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_and_length_are_block_aligned_and_zeroed() {
        for blocks in [1usize, 2, 3, 17] {
            let buf = AlignedBuf::new(blocks * BLOCK_BYTES).expect("valid length");
            assert_eq!(buf.len(), blocks * BLOCK_BYTES);
            assert_eq!(buf.as_ptr() as usize % BLOCK_BYTES, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn writes_are_kept() {
        let mut buf = AlignedBuf::new(2 * BLOCK_BYTES).expect("valid length");
        buf[BLOCK_BYTES..].fill(0xA5);
        assert!(buf[..BLOCK_BYTES].iter().all(|&b| b == 0));
        assert!(buf[BLOCK_BYTES..].iter().all(|&b| b == 0xA5));
    }

    #[test]
    fn rejects_zero_and_unaligned_lengths() {
        assert_eq!(
            AlignedBuf::new(0).unwrap_err(),
            AlignedBufError::Unaligned { len_bytes: 0 }
        );
        assert_eq!(
            AlignedBuf::new(BLOCK_BYTES + 1).unwrap_err(),
            AlignedBufError::Unaligned {
                len_bytes: BLOCK_BYTES + 1
            }
        );
        assert!(matches!(
            AlignedBuf::new(usize::MAX - BLOCK_BYTES + 1),
            Err(AlignedBufError::TooLarge { .. })
        ));
    }

    /// Pages of `buf` resident in memory, by mincore(2).
    fn resident_pages(buf: &AlignedBuf) -> usize {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut vec = vec![0u8; buf.len().div_ceil(page)];
        // SAFETY: the range is our own live mapping; `vec` has one byte per
        // page of it.
        let rc = unsafe { libc::mincore(buf.as_ptr() as *mut _, buf.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn memory_is_resident_only_once_written() {
        // Idle RSS depends on it: tail and read buffers are mapped at
        // start, whatever the global allocator does with zeroed blocks.
        let mut buf = AlignedBuf::new(256 * BLOCK_BYTES).expect("valid length");
        assert_eq!(resident_pages(&buf), 0);
        buf[..BLOCK_BYTES].fill(1);
        let after = resident_pages(&buf);
        assert!(
            (1..=2).contains(&after),
            "{after} pages resident after one write"
        );
    }

    #[test]
    fn is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AlignedBuf>();
    }
}
