//! The I/O seam: the one narrow trait the log engine does its disk I/O
//! through. Three implementations:
//!
//! - `uring`: io_uring with O_DIRECT (the default where the kernel has it),
//! - `pwrite`: positional syscalls on the same O_DIRECT files (fallback),
//! - `fault`: an in-memory disk with seeded faults, for tests.
//!
//! The storage thread owns its backend and calls it synchronously: a call
//! returns when the kernel has completed the work, with two exceptions.
//! [`IoBackend::sync_start`] only starts a group's fdatasyncs and returns, so
//! the thread can write the next group while the disk flushes this one;
//! [`IoBackend::sync_wait`] completes the group before its acks go out.
//! Reads have the same shape: [`IoBackend::read_start`] may leave a read
//! in flight per slot (read-ahead), [`IoBackend::read_finish`] completes it.
//! Group commit comes from handing [`IoBackend::write_batch`] every dirty
//! tail at once, so one submission carries many partitions' writes.

use std::io;
use std::path::Path;

pub mod aligned;
#[cfg(test)]
pub mod conformance;
pub mod eventfd;
pub mod fault;
pub mod pwrite;
pub mod raw_bandwidth;
#[cfg(target_os = "linux")]
pub mod uring;

pub use aligned::AlignedBuf;
pub use eventfd::EventFd;

/// Alignment of every buffer address, and the largest write unit: write
/// offsets and lengths are multiples of a file's [`IoBackend::write_unit`],
/// which divides this.
pub const BLOCK_BYTES: usize = 4096;

/// The smallest write unit O_DIRECT allows anywhere (a 512-byte sector).
pub const SECTOR_BYTES: usize = 512;

/// The direct-I/O write unit of an open file: the file system's
/// `stx_dio_offset_align` (statx `STATX_DIOALIGN`, Linux 6.1+), so a small
/// append rewrites one 512-byte logical sector instead of a 4 KiB block.
/// [`BLOCK_BYTES`] when the kernel does not say, the file is buffered (no
/// direct I/O) or the answer is outside `SECTOR_BYTES..=BLOCK_BYTES`.
pub(crate) fn dio_write_unit(fd: std::os::unix::io::RawFd) -> usize {
    // SAFETY: statx writes into the zeroed struct we own; the empty path
    // with AT_EMPTY_PATH names `fd` itself.
    let (rc, stx) = unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let rc = libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        );
        (rc, stx)
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return BLOCK_BYTES;
    }
    let unit = stx.stx_dio_offset_align as usize;
    let mem = stx.stx_dio_mem_align as usize;
    if unit.is_power_of_two() && (SECTOR_BYTES..=BLOCK_BYTES).contains(&unit) && mem <= BLOCK_BYTES
    {
        unit
    } else {
        BLOCK_BYTES
    }
}

/// Whether a write of `data` at `offset` meets O_DIRECT's rules for a file
/// whose write unit is `unit`.
pub(crate) fn write_aligned(unit: usize, offset: u64, data: &[u8]) -> bool {
    offset % unit as u64 == 0 && data.len() % unit == 0 && data.as_ptr() as usize % unit == 0
}

/// A file opened through a backend. Only meaningful to the backend that
/// returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileHandle(pub u32);

/// One positional write. `offset`, `data.len()` and `data.as_ptr()` are
/// multiples of the file's [`IoBackend::write_unit`].
#[derive(Debug)]
pub struct WriteOp<'a> {
    pub file: FileHandle,
    pub offset: u64,
    pub data: &'a [u8],
}

/// Positional reads and writes, fdatasync and allocation over files.
pub trait IoBackend: Send + 'static {
    /// For the start-up log line and metrics: "io_uring", "pwrite", "fault".
    fn name(&self) -> &'static str;

    /// Opens (and with `create`, creates) a file for direct I/O.
    fn open(&mut self, path: &Path, create: bool) -> io::Result<FileHandle>;

    fn close(&mut self, file: FileHandle);

    /// Whether some file had to be opened without O_DIRECT (its file
    /// system refuses it: tmpfs, some FUSE file systems): buffered writes,
    /// made durable by fdatasync all the same.
    fn buffered_io(&self) -> bool {
        false
    }

    /// The alignment of write offsets and lengths for `file`: a power of
    /// two dividing [`BLOCK_BYTES`]. Smaller units mean less of a partial
    /// block rewritten per small append (write amplification).
    fn write_unit(&self, _file: FileHandle) -> usize {
        BLOCK_BYTES
    }

    /// Reserves `len` bytes so later writes below `len` never need new
    /// blocks (fallocate; a full disk fails here, at creation, not later).
    fn allocate(&mut self, file: FileHandle, len: u64) -> io::Result<()>;

    /// Reads at `offset` into `buf` (aligned like writes); returns the number
    /// of bytes read, short only at end of file.
    fn read_at(&mut self, file: FileHandle, offset: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// Starts reading `len` bytes at `offset` of `file` into `buf` and
    /// returns without waiting, so the device works while the caller does
    /// other things (read-ahead for sequential readers). The backend holds
    /// `buf` until [`IoBackend::read_finish`] of the same `slot` hands it
    /// back; each of the [`READ_AHEAD_SLOTS`] slots has at most one such
    /// read outstanding. `offset` and `len` are aligned like a
    /// [`IoBackend::read_at`], `len <= buf.len()`. A backend that cannot
    /// read in the background gives the buffer back (the default), as for
    /// a slot out of range or busy: the caller then reads when it needs the
    /// bytes.
    /// Whether this backend can read in the background at all
    /// ([`IoBackend::read_start`] may still refuse a read, for a busy slot
    /// or a broken ring). The engine plans no read-ahead without it.
    fn reads_ahead(&self) -> bool {
        false
    }

    fn read_start(
        &mut self,
        _slot: usize,
        _file: FileHandle,
        _offset: u64,
        buf: AlignedBuf,
        _len: usize,
    ) -> Result<(), AlignedBuf> {
        Err(buf)
    }

    /// Waits for the read started in `slot` by [`IoBackend::read_start`]
    /// and returns its buffer with the bytes read (short at end of file) or
    /// the error. `None` when none is outstanding there, or when the buffer
    /// had to be given up because the read's fate is unknown (it is then
    /// leaked, never freed under the kernel, and later `read_start`s give
    /// buffers back).
    fn read_finish(&mut self, _slot: usize) -> Option<(AlignedBuf, io::Result<usize>)> {
        None
    }

    /// Performs every write, then, if `sync` is non-empty, fdatasyncs each
    /// file in it, and returns once all of it is complete. The first error
    /// wins; after an error nothing about the other writes may be assumed.
    fn write_batch(&mut self, writes: &[WriteOp<'_>], sync: &[FileHandle]) -> io::Result<()>;

    /// fdatasync of one file.
    fn sync(&mut self, file: FileHandle) -> io::Result<()>;

    /// fsync of a directory, after creating, renaming or removing in it.
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()>;

    /// An fdatasync of `file` that another thread makes, covering the
    /// writes completed before it runs: for the work the storage thread
    /// hands off (a create's syncs, `Engine::create_sync`). `None`: the
    /// backend cannot, and the storage thread syncs it itself.
    fn detached_sync(&self, _file: FileHandle) -> io::Result<Option<DetachedSync>> {
        Ok(None)
    }

    /// [`IoBackend::sync_dir`] that another thread makes (a create's
    /// directories, `Engine::create_sync`).
    fn detached_sync_dir(&self) -> DetachedSyncDir {
        Box::new(sync_dir)
    }

    /// Starts an fdatasync of each file and may return before it is done,
    /// so the caller can write its next group meanwhile (pipelined group
    /// commit). It covers the writes completed before the call. At most one
    /// started group is outstanding: [`IoBackend::sync_wait`] completes it
    /// (and a second `sync_start` first waits for the first). The default
    /// syncs right away, so `sync_wait` has nothing left to do.
    fn sync_start(&mut self, files: &[FileHandle]) -> io::Result<()> {
        for &f in files {
            self.sync(f)?;
        }
        Ok(())
    }

    /// Waits for the group started by [`IoBackend::sync_start`]; the first
    /// error wins. Ok when nothing is outstanding.
    fn sync_wait(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Completes the group started by [`IoBackend::sync_start`] if it has
    /// finished, without waiting: `None` while it runs. The default, for
    /// backends whose `sync_start` syncs right away, is `sync_wait`.
    fn sync_poll(&mut self) -> Option<io::Result<()>> {
        Some(self.sync_wait())
    }

    /// A descriptor that polls readable once the started group may have
    /// finished, so the storage thread can sleep on it beside its command
    /// queue (then [`IoBackend::sync_poll`] says whether it did). `None`:
    /// the caller completes the group with `sync_wait` instead.
    fn sync_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Removes a (closed) file, for deleting a partition or undoing a
    /// half-created one. Backends over real files can keep the default.
    fn remove(&mut self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    /// Renames `from` over `to` atomically (rename(2)); open handles keep
    /// their file. The caller fsyncs the directory after.
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    /// Swaps the files `a` and `b` name, atomically ([`exchange`]); open
    /// handles keep their file. `ErrorKind::Unsupported` where the file
    /// system cannot. The caller fsyncs the directory after.
    fn exchange(&mut self, a: &Path, b: &Path) -> io::Result<()> {
        exchange(a, b)
    }
}

/// Swaps two files' names atomically (renameat2 `RENAME_EXCHANGE`): each
/// path names the other's file afterwards, and no moment has either path
/// missing. `ErrorKind::Unsupported` where the kernel or the file system
/// has no exchange (Linux before 3.15; vfat, some FUSE and network file
/// systems).
pub(crate) fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // The raw syscall: glibc wraps renameat2 only since 2.28, older than
    // some boards' userland.
    // SAFETY: both paths are NUL-terminated and outlive the call; the
    // kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, e))
        }
        _ => Err(e),
    }
}

/// fsync of a directory on the real file system: the backends' own
/// [`IoBackend::sync_dir`], and work handed off the storage thread.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)?
        .sync_all()
}

/// An fdatasync made away from the storage thread
/// ([`IoBackend::detached_sync`]).
pub type DetachedSync = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// A directory's fsync made away from the storage thread
/// ([`IoBackend::detached_sync_dir`]).
pub type DetachedSyncDir = Box<dyn Fn(&Path) -> io::Result<()> + Send>;

/// Background reads a backend keeps apart (`read_start` slots): one per
/// reader whose next window is read ahead.
pub const READ_AHEAD_SLOTS: usize = 4;

/// Submission queue entries for the io_uring backend: one group commit
/// puts a write per dirty partition and an fdatasync per file in flight.
pub const URING_ENTRIES: u32 = 256;

/// Sets up the io_uring backend; fails with the kernel's reason where it
/// cannot (ENOSYS on old kernels and qemu-user, EPERM under seccomp).
fn try_uring() -> io::Result<Box<dyn IoBackend>> {
    #[cfg(target_os = "linux")]
    {
        uring::UringBackend::new(URING_ENTRIES).map(|b| Box::new(b) as Box<dyn IoBackend>)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring exists only on Linux",
        ))
    }
}

/// Picks the backend for `choice`, returning it and the reason for the
/// one start-up log line. `Auto` tries io_uring and falls back to pwrite
/// (old kernel, seccomp, qemu-user), saying why.
pub fn open_backend(choice: super::BackendChoice) -> io::Result<(Box<dyn IoBackend>, String)> {
    use super::BackendChoice;
    match choice {
        BackendChoice::Pwrite => Ok((
            Box::new(pwrite::PwriteBackend::new()),
            "forced by storage.backend = \"pwrite\"".to_string(),
        )),
        BackendChoice::IoUring => Ok((
            try_uring()?,
            "forced by storage.backend = \"io_uring\"".to_string(),
        )),
        BackendChoice::Auto => match try_uring() {
            Ok(b) => Ok((b, "io_uring is available".to_string())),
            Err(e) => Ok((
                Box::new(pwrite::PwriteBackend::new()),
                format!("io_uring could not be set up: {e}"),
            )),
        },
    }
}

/// Takes an exclusive advisory lock on `<dir>/LOCK` (flock), held while the
/// returned file is open: two brokers on one data directory would corrupt
/// each other's segments.
pub fn lock_dir(dir: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    // SAFETY: plain syscall on a descriptor we own for the call's duration.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "data directory {} is in use by another process",
                    dir.display()
                ),
            ));
        }
        return Err(e);
    }
    Ok(f)
}
