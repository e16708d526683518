//! The io_uring backend: O_DIRECT files, registered file slots, and one
//! submission per group commit.
//!
//! # How a `write_batch` goes to the kernel
//!
//! ```text
//!   WRITE f1@0  WRITE f2@0  WRITE f1@8K ...  NOP(IO_DRAIN)  FSYNC f1  FSYNC f2
//!   '----------- run in parallel ---------'  '- barrier -'  '-- in parallel --'
//! ```
//!
//! An fdatasync must not start before the writes it covers have completed.
//! The NOP carries `IOSQE_IO_DRAIN`, so it starts only when every earlier
//! request has completed, and nothing after it starts before it completes:
//! one barrier, after which all the fdatasyncs run in parallel. (A DRAIN on
//! the first fsync instead would serialise that fsync against the others;
//! linking write->fsync chains cannot express "fsync after *all* writes to
//! this file".) The whole round is one `io_uring_enter` when the SQ has room.
//!
//! A short write, `-EAGAIN` or `-EINTR` leaves a remainder: it is submitted in
//! a next round, and any file of `sync` that still had a remainder is
//! fdatasynced again in that round, because the first fsync did not cover it.
//! An fdatasync error is never retried (after a failed fsync the page state is
//! unknown; the engine treats it as sticky).
//!
//! # Pipelined group commit: `sync_start` / `sync_wait`
//!
//! `sync_start` pushes one `FSYNC(DATASYNC)` per file, tagged as the sync
//! group's, hands them to the kernel with `io_uring_enter` (no waiting) and
//! returns; the engine then writes the next group while the device flushes.
//! Every reaping loop of this backend (`write_batch`, reads, single syncs,
//! `sync_wait`) sorts completions by tag: a group fsync's completion is
//! counted off (and its error kept, first one wins) whenever it shows up, and
//! never taken for a completion of the call that happens to be waiting.
//!
//! While a group is outstanding `write_batch` uses no drain barrier: an
//! `IO_DRAIN` waits for *every* earlier request, the group's fsyncs
//! included, so it would hold the batch's fdatasyncs behind the previous
//! group's flush. Instead the batch's fsyncs go in a round of their own,
//! submitted only after all of its writes were reaped, which orders them
//! just as well. The group's fsyncs need no ordering of their own: the
//! engine starts them only after the writes they cover have completed.
//!
//! # Safety of the borrowed buffers
//!
//! The kernel reads from (writes) and writes into (reads) memory the caller
//! borrowed. Every method blocks until every request it submitted into such
//! memory has completed before it returns, so the borrows outlive the I/O.
//! Only the sync group's fsyncs stay in flight across calls, and they point
//! into no memory; and the read-ahead (`read_start`), whose buffer the
//! backend owns until its completion is reaped, on a ring of its own. If the ring itself fails in a way that leaves submitted
//! requests with buffers unaccounted for, the process aborts rather than
//! return and let the buffers be freed under the kernel.
//!
//! All `unsafe` of the io_uring path is in this file.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use io_uring::{opcode, squeue, types, IoUring};

use super::{AlignedBuf, FileHandle, IoBackend, WriteOp, BLOCK_BYTES, READ_AHEAD_SLOTS};

/// Registered (fixed) file slots. Fixed files save the kernel an fd lookup
/// and reference count per request on the hot path. 1024 covers 64
/// partitions x 8 segments twice over; files past it still work through
/// plain fds. The kernel keeps about 8 bytes per slot.
pub const FIXED_FILES_MAX: u32 = 1024;

/// Largest single write or read request. The kernel caps one request at
/// about 2 GiB anyway (`MAX_RW_COUNT`); requests are u32 lengths.
const REQUEST_BYTES_MAX: usize = 1 << 30;

/// `user_data` layout: the top two bits say whose completion it is, the
/// rest is an index (or a write offset) within that. Writes of a batch use
/// kind 0 and their index, a batch's fsyncs `FSYNC_TAG | index`, the fsyncs
/// of a sync group `GROUP_TAG`, the drain barrier NOP `NOP_TAG`.
const KIND_MASK: u64 = 0b11 << 62;
const GROUP_TAG: u64 = 0b01 << 62;
const FSYNC_TAG: u64 = 0b10 << 62;
const NOP_TAG: u64 = u64::MAX;
/// Largest index or offset a kind-0 tag can carry.
const TAG_PAYLOAD_MAX: u64 = !KIND_MASK;

/// A file opened by this backend.
#[derive(Debug)]
struct OpenFile {
    fd: OwnedFd,
    /// Direct-I/O write unit ([`super::dio_write_unit`]).
    unit: usize,
    /// Whether `fd` sits in the registered slot with the handle's index.
    fixed: bool,
}

/// A write of a batch that is not fully done yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Index into the caller's `writes`.
    op: usize,
    /// Bytes of it already written.
    done_bytes: usize,
}

/// [`IoBackend`] over one io_uring instance. Owned by the storage thread;
/// every call blocks until the kernel completed all it submitted, except
/// the fdatasyncs of a group started by `sync_start`.
pub struct UringBackend {
    ring: IoUring,
    /// Indexed by `FileHandle.0`; `None` marks a closed, reusable handle.
    files: Vec<Option<OpenFile>>,
    /// Number of sparse registered file slots (0 when the kernel refused
    /// registration: then every request uses a plain fd).
    fixed_slots: u32,
    /// Set when the ring failed with submissions unaccounted for in the SQ
    /// (never submitted): every later call returns this errno instead of
    /// entering the ring again.
    broken_errno: Option<i32>,
    /// Entries pushed and not yet reaped (queued in the SQ or in the
    /// kernel), the sync group's included. Between calls only the group's
    /// can be outstanding, and the SQ is empty.
    outstanding: usize,
    /// Fsyncs of the sync group started by `sync_start` whose completion has
    /// not been reaped yet.
    group_left: usize,
    /// The first error among the sync group's reaped fsyncs, returned (once)
    /// by `sync_wait`.
    group_errno: Option<i32>,
    /// Scratch lists reused across batches so the hot path does not allocate
    /// once they reached the batch size.
    pending: Vec<Pending>,
    retry: Vec<Pending>,
    sync_todo: Vec<(FileHandle, bool)>,
    ahead: ReadAhead,
    /// A file was opened without O_DIRECT (its file system refused it).
    buffered: bool,
}

/// The reads `read_start` leaves in flight, one per slot. They have a
/// small ring of their own, made on first use, so they never enter the
/// main ring's accounting and never wait behind, or hold up, a commit's
/// drain barrier. A completion's `user_data` is its slot.
struct ReadAhead {
    ring: Option<IoUring>,
    /// Per slot, the buffer the kernel reads into, from `read_start` until
    /// its completion is reaped.
    bufs: Vec<Option<AlignedBuf>>,
    /// Per slot, a completion reaped while waiting for another slot's.
    results: Vec<Option<i32>>,
    /// The ring could not be made, or failed: reads wait for the device.
    off: bool,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead {
            ring: None,
            bufs: (0..READ_AHEAD_SLOTS).map(|_| None).collect(),
            results: vec![None; READ_AHEAD_SLOTS],
            off: false,
        }
    }
}

impl UringBackend {
    /// Creates a ring with `entries` submission slots (rounded up to a power
    /// of two by the kernel). Fails with the kernel's error where io_uring is
    /// unavailable: ENOSYS (old kernel, qemu-user), EPERM (seccomp, or
    /// `kernel.io_uring_disabled`), ENOMEM (locked-memory limit).
    pub fn new(entries: u32) -> io::Result<UringBackend> {
        let ring = IoUring::new(entries.max(2))?;
        // Sparse registration needs Linux 5.19; older kernels just use fds.
        let fixed_slots = match ring.submitter().register_files_sparse(FIXED_FILES_MAX) {
            Ok(()) => FIXED_FILES_MAX,
            Err(err) => {
                log::info!("io_uring: no registered files ({err}); using plain fds");
                0
            }
        };
        Ok(UringBackend {
            ring,
            files: Vec::new(),
            fixed_slots,
            broken_errno: None,
            outstanding: 0,
            group_left: 0,
            group_errno: None,
            pending: Vec::new(),
            retry: Vec::new(),
            sync_todo: Vec::new(),
            ahead: ReadAhead::default(),
            buffered: false,
        })
    }

    /// Number of submission queue slots the kernel gave the ring.
    pub fn sq_entries(&mut self) -> usize {
        self.ring.submission().capacity()
    }

    fn file(&self, file: FileHandle) -> io::Result<&OpenFile> {
        self.files
            .get(file.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    fn check_usable(&self) -> io::Result<()> {
        match self.broken_errno {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    /// Submits every queued entry and reaps exactly `count` completions of
    /// the calling operation, handing each to `on_cqe` (its completions
    /// beyond `count` stay in the CQ for the next call). Completions of the
    /// sync group that arrive meanwhile are counted off, not handed over.
    /// Retries interrupted and resource-busy enters: returning early would
    /// free buffers the kernel still uses.
    fn submit_and_reap(
        &mut self,
        count: usize,
        mut on_cqe: impl FnMut(u64, i32),
    ) -> io::Result<()> {
        debug_assert!(count <= self.outstanding - self.group_left);
        let mut left = count;
        while left > 0 {
            // One enter submits everything and waits for `left`
            // completions (group fsyncs count too, so it may wake early).
            // When the kernel submits only part (an entry failed to
            // prepare), it returns without waiting and the loop submits the
            // rest.
            self.enter(left)?;
            left -= self.reap_available(left, &mut on_cqe);
        }
        Ok(())
    }

    /// One `io_uring_enter`: submits everything queued and waits for `want`
    /// completions. An interrupted or resource-busy enter returns Ok for the
    /// caller to reap what is there and come back.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        let Err(err) = self.ring.submitter().submit_and_wait(want) else {
            return Ok(());
        };
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        // EINTR: a signal; EAGAIN: no request memory right now; EBUSY: CQ
        // overflow, cleared by reaping.
        if matches!(errno, libc::EINTR | libc::EAGAIN | libc::EBUSY) {
            return Ok(());
        }
        // Requests into borrowed buffers the kernel holds: everything not
        // reaped, less the group's fsyncs (no buffers) and less what is
        // still queued. The SQ never holds group entries and others at once
        // (`sync_start` runs with nothing else unreaped and leaves the SQ
        // empty), so this is exact in both cases.
        let queued = self.ring.submission().len();
        let own_in_kernel = (self.outstanding - self.group_left).saturating_sub(queued);
        if own_in_kernel == 0 {
            // Stop using the ring so the queued entries are never submitted
            // after their buffers are gone.
            self.broken_errno = Some(errno);
            return Err(err);
        }
        log::error!(
            "io_uring_enter failed ({err}) with {own_in_kernel} requests in flight \
             into borrowed buffers; aborting"
        );
        std::process::abort();
    }

    /// Takes the completions in the CQ: the sync group's are counted off
    /// into `group_left` / `group_errno`; up to `own_max` others go to
    /// `on_cqe`. Stops before an own completion past `own_max` (it stays
    /// queued). Returns how many went to `on_cqe`.
    fn reap_available(&mut self, own_max: usize, on_cqe: &mut impl FnMut(u64, i32)) -> usize {
        // With every own request reaped, whatever else is in the CQ belongs
        // to the group, so the loop may drain it all.
        let own_unreaped = self.outstanding - self.group_left;
        let mut own = 0;
        let mut cq = self.ring.completion();
        while own < own_max || own == own_unreaped {
            let Some(cqe) = cq.next() else { break };
            self.outstanding -= 1;
            if cqe.user_data() & KIND_MASK == GROUP_TAG {
                self.group_left -= 1;
                let res = cqe.result();
                // Final even for EINTR/EAGAIN: after `sync_start` returned,
                // the handle may be closed or reused, so it cannot be
                // re-issued safely; the engine fails the partitions, which
                // never acks an unsynced write.
                if res < 0 {
                    self.group_errno.get_or_insert(-res);
                }
            } else {
                own += 1;
                on_cqe(cqe.user_data(), cqe.result());
            }
        }
        own
    }

    /// Reaps until no fsync of the sync group is left in flight. Only
    /// called with nothing else unreaped.
    fn reap_group(&mut self) -> io::Result<()> {
        while self.group_left > 0 {
            self.check_usable()?;
            debug_assert_eq!(self.outstanding, self.group_left);
            // The CQ is empty here (everything was drained), so waiting for
            // at most its capacity can always be satisfied.
            let want = self.group_left.min(self.ring.completion().capacity());
            self.enter(want)?;
            self.reap_available(0, &mut |_, _| {});
        }
        Ok(())
    }

    /// `sync_start`'s submission step: hands the queued group fsyncs to the
    /// kernel without waiting. If the kernel takes none (short of request
    /// memory, or a CQ overflow), waits for one of the group's completions
    /// so there is room next time.
    fn submit_group_queue(&mut self) -> io::Result<()> {
        let queued = self.ring.submission().len();
        self.enter(0)?;
        if self.ring.submission().len() == queued {
            let in_kernel = self.group_left - queued;
            self.enter(usize::from(in_kernel > 0))?;
        }
        self.reap_available(0, &mut |_, _| {});
        Ok(())
    }

    /// Pushes one entry. The caller sized the round to the SQ capacity.
    fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: every entry points into memory (the caller's write or read
        // buffer) that stays borrowed until `submit_and_reap` has seen its
        // completion, which happens before the method that built the entry
        // returns (see the module docs), and into no other memory.
        let pushed = unsafe { self.ring.submission().push(entry) };
        self.outstanding += usize::from(pushed.is_ok());
        debug_assert!(pushed.is_ok(), "round sized past the SQ capacity");
        if pushed.is_err() {
            // Unreachable by construction; abort rather than lose a request.
            log::error!("io_uring submission queue full while building a round");
            std::process::abort();
        }
    }

    /// The submission entry for `op` on `handle` (registered slot or fd).
    fn entry(&self, handle: FileHandle, op: Op) -> io::Result<squeue::Entry> {
        let file = self.file(handle)?;
        // The two branches differ only in the target type, which the crate
        // keeps as distinct types.
        macro_rules! build {
            ($t:expr) => {
                match op {
                    Op::Write { ptr, len, offset } => {
                        opcode::Write::new($t, ptr, len).offset(offset).build()
                    }
                    Op::Read { ptr, len, offset } => {
                        opcode::Read::new($t, ptr, len).offset(offset).build()
                    }
                    Op::Datasync => opcode::Fsync::new($t)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                }
            };
        }
        Ok(if file.fixed {
            build!(types::Fixed(handle.0))
        } else {
            build!(types::Fd(file.fd.as_raw_fd()))
        })
    }

    /// One synchronous request (read or fdatasync), retried on EINTR/EAGAIN.
    fn single(&mut self, handle: FileHandle, op: Op) -> io::Result<usize> {
        self.check_usable()?;
        let entry = self.entry(handle, op)?.user_data(0);
        loop {
            self.push(&entry);
            let mut res = 0;
            self.submit_and_reap(1, |_, r| res = r)?;
            match res {
                n if n >= 0 => return Ok(n as usize),
                n if -n == libc::EINTR || -n == libc::EAGAIN => continue,
                n => return Err(io::Error::from_raw_os_error(-n)),
            }
        }
    }

    fn check_write(&self, op: &WriteOp<'_>) -> io::Result<()> {
        let unit = self.file(op.file)?.unit;
        if super::write_aligned(unit, op.offset, op.data) {
            Ok(())
        } else {
            // Refused here even when the file fell back to buffered I/O, so
            // the engine sees the same contract on every filesystem.
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("sq_entries", &self.ring.params().sq_entries())
            .field("files", &self.files)
            .field("fixed_slots", &self.fixed_slots)
            .field("broken_errno", &self.broken_errno)
            .finish_non_exhaustive()
    }
}

/// What one submission entry does.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        ptr: *const u8,
        len: u32,
        offset: u64,
    },
    Read {
        ptr: *mut u8,
        len: u32,
        offset: u64,
    },
    Datasync,
}

/// Opens `path` read-write with O_DIRECT (and O_CLOEXEC, which std always
/// sets). Filesystems without direct I/O (tmpfs) reject O_DIRECT with EINVAL:
/// then the file is opened buffered, with a warning, since data written
/// there is not durable anyway.
pub(crate) fn open_direct(path: &Path, create: bool) -> io::Result<OwnedFd> {
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o644)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(file) => Ok(file.into()),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!(
                "{}: filesystem refuses O_DIRECT; using buffered I/O for this file",
                path.display()
            );
            Ok(open(0)?.into())
        }
        Err(err) => Err(err),
    }
}

/// fallocate(mode 0): reserves blocks and extends the size to at least
/// `len`, so a full disk fails here and later writes below `len` need no new
/// blocks.
pub(crate) fn fallocate(fd: RawFd, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; an invalid fd
        // is reported as EBADF.
        let rc = unsafe { libc::fallocate(fd, 0, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

impl IoBackend for UringBackend {
    fn buffered_io(&self) -> bool {
        self.buffered
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn open(&mut self, path: &Path, create: bool) -> io::Result<FileHandle> {
        self.check_usable()?;
        // Reject interior NULs the same way open(2) callers expect.
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = open_direct(path, create)?;
        // SAFETY: F_GETFL only reads the flags of an fd we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags >= 0 && flags & libc::O_DIRECT == 0 {
            self.buffered = true;
        }
        let index = match self.files.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.files.push(None);
                self.files.len() - 1
            }
        };
        let handle = FileHandle(
            u32::try_from(index).map_err(|_| io::Error::from_raw_os_error(libc::EMFILE))?,
        );
        let mut fixed = false;
        if handle.0 < self.fixed_slots {
            match self
                .ring
                .submitter()
                .register_files_update(handle.0, &[fd.as_raw_fd()])
            {
                Ok(_) => fixed = true,
                Err(err) => log::warn!("io_uring: cannot register file slot {}: {err}", handle.0),
            }
        }
        let unit = super::dio_write_unit(fd.as_raw_fd());
        self.files[index] = Some(OpenFile { fd, unit, fixed });
        Ok(handle)
    }

    fn write_unit(&self, file: FileHandle) -> usize {
        self.file(file).map_or(BLOCK_BYTES, |f| f.unit)
    }

    fn close(&mut self, file: FileHandle) {
        let Some(open) = self.files.get_mut(file.0 as usize).and_then(Option::take) else {
            return;
        };
        if open.fixed {
            // -1 empties the slot; the kernel drops its file reference.
            if let Err(err) = self.ring.submitter().register_files_update(file.0, &[-1]) {
                log::warn!("io_uring: cannot clear file slot {}: {err}", file.0);
            }
        }
        drop(open.fd);
    }

    fn allocate(&mut self, file: FileHandle, len: u64) -> io::Result<()> {
        fallocate(self.file(file)?.fd.as_raw_fd(), len)
    }

    fn read_at(&mut self, file: FileHandle, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done_bytes = 0;
        while done_bytes < buf.len() {
            let rest = &mut buf[done_bytes..];
            let len = rest.len().min(REQUEST_BYTES_MAX);
            let op = Op::Read {
                ptr: rest.as_mut_ptr(),
                len: len as u32,
                offset: offset + done_bytes as u64,
            };
            // `buf` stays mutably borrowed across `single`, which returns
            // only after the read completed.
            let n = self.single(file, op)?;
            done_bytes += n;
            // 0 is end of file. A short read is end of file too, unless it
            // stopped on a block boundary (then O_DIRECT can go on).
            if n == 0 || (n < len && n % BLOCK_BYTES != 0) {
                break;
            }
        }
        Ok(done_bytes)
    }

    fn reads_ahead(&self) -> bool {
        !self.ahead.off
    }

    fn read_start(
        &mut self,
        slot: usize,
        file: FileHandle,
        offset: u64,
        mut buf: AlignedBuf,
        len: usize,
    ) -> Result<(), AlignedBuf> {
        let usable = !self.ahead.off
            && self.ahead.bufs.get(slot).is_some_and(Option::is_none)
            && len <= buf.len().min(REQUEST_BYTES_MAX)
            && self.check_usable().is_ok();
        let fd = match self.file(file) {
            Ok(f) if usable => f.fd.as_raw_fd(),
            _ => return Err(buf),
        };
        let ring = match &mut self.ahead.ring {
            Some(ring) => ring,
            None => match IoUring::new(READ_AHEAD_SLOTS as u32) {
                Ok(ring) => self.ahead.ring.insert(ring),
                Err(err) => {
                    log::info!("io_uring: no read-ahead ring ({err}); reads wait for the device");
                    self.ahead.off = true;
                    return Err(buf);
                }
            },
        };
        let entry = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: the entry points into `buf`'s heap block, which this
        // backend keeps in `ahead.bufs[slot]` until the completion is reaped
        // (`read_finish`, also run by `drop`), and leaks if it never can be.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            // Unreachable: at most one entry per slot, and the ring has a
            // slot's worth of entries each.
            return Err(buf);
        }
        self.ahead.bufs[slot] = Some(buf);
        // A failed submit leaves the entry queued; `read_finish`'s wait
        // submits it again, so the read is never lost with its buffer.
        let _ = ring.submit();
        Ok(())
    }

    fn read_finish(&mut self, slot: usize) -> Option<(AlignedBuf, io::Result<usize>)> {
        self.ahead.bufs.get(slot)?.as_ref()?;
        let ReadAhead {
            ring,
            bufs,
            results,
            off,
            ..
        } = &mut self.ahead;
        let ring = ring.as_mut().expect("a read in flight has its ring");
        loop {
            // Completions of other slots are kept for their own finish.
            for cqe in ring.completion() {
                if let Some(r) = results.get_mut(cqe.user_data() as usize) {
                    *r = Some(cqe.result());
                }
            }
            if let Some(res) = results[slot].take() {
                let buf = bufs[slot].take().expect("checked above");
                let res = if res >= 0 {
                    Ok(res as usize)
                } else {
                    Err(io::Error::from_raw_os_error(-res))
                };
                return Some((buf, res));
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(err) => {
                    // Whether the kernel still writes into the buffers is
                    // unknown: they are leaked, never freed under it.
                    log::error!("io_uring: read-ahead ring failed ({err}); read-ahead is off");
                    for (b, r) in bufs.iter_mut().zip(results.iter_mut()) {
                        if r.is_none() {
                            std::mem::forget(b.take());
                        }
                    }
                    *off = true;
                    return None;
                }
            }
        }
    }

    fn write_batch(&mut self, writes: &[WriteOp<'_>], sync: &[FileHandle]) -> io::Result<()> {
        self.check_usable()?;
        for op in writes {
            self.check_write(op)?;
        }
        for &file in sync {
            self.file(file)?;
        }
        let capacity = self.sq_entries();
        let mut pending = std::mem::take(&mut self.pending);
        let mut retry = std::mem::take(&mut self.retry);
        let mut sync_todo = std::mem::take(&mut self.sync_todo);
        pending.clear();
        pending.extend(
            (0..writes.len())
                .filter(|&op| !writes[op].data.is_empty())
                .map(|op| Pending { op, done_bytes: 0 }),
        );
        sync_todo.clear();
        sync_todo.extend(sync.iter().map(|&file| (file, false)));
        sync_todo.sort_unstable_by_key(|&(file, _)| file.0);
        sync_todo.dedup();

        let result = self.run_rounds(writes, capacity, &mut pending, &mut retry, &mut sync_todo);

        self.pending = pending;
        self.retry = retry;
        self.sync_todo = sync_todo;
        result
    }

    /// fdatasync(2) on the calling thread. The kernel runs an io_uring
    /// FSYNC on an io-wq worker, and on a busy small machine the hand-off
    /// to it and back cost as much as the flush (docs/performance.md); the
    /// pipelined group path (`sync_start`) still uses the ring.
    fn sync(&mut self, file: FileHandle) -> io::Result<()> {
        self.check_usable()?;
        let fd = self.file(file)?.fd.as_raw_fd();
        loop {
            // SAFETY: fdatasync only reads the descriptor, which the file
            // table keeps open.
            if unsafe { libc::fdatasync(fd) } == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        super::sync_dir(dir)
    }

    fn detached_sync(&self, file: FileHandle) -> io::Result<Option<super::DetachedSync>> {
        self.check_usable()?;
        // A descriptor of its own: the file may be closed here meanwhile.
        let f = std::fs::File::from(self.file(file)?.fd.try_clone()?);
        Ok(Some(Box::new(move || f.sync_data())))
    }

    fn sync_start(&mut self, files: &[FileHandle]) -> io::Result<()> {
        self.sync_wait()?;
        self.check_usable()?;
        // All handles are checked first, so a bad one starts nothing.
        for &file in files {
            self.file(file)?;
        }
        let mut first_error = None;
        for &file in files {
            let entry = match self.entry(file, Op::Datasync) {
                Ok(entry) => entry.user_data(GROUP_TAG),
                Err(err) => {
                    first_error = Some(err);
                    break;
                }
            };
            // SQ full (a group larger than the ring): submit and make room.
            while self.ring.submission().is_full() {
                self.submit_group_queue()?;
            }
            self.push(&entry);
            self.group_left += 1;
        }
        // Everything goes to the kernel now: a queued fsync would start
        // only at the next enter, and could outlive its handle.
        while !self.ring.submission().is_empty() {
            self.submit_group_queue()?;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn sync_poll(&mut self) -> Option<io::Result<()>> {
        if self.group_left > 0 && self.check_usable().is_ok() {
            // Between calls only the group's completions can be in the CQ;
            // taking them needs no syscall.
            self.reap_available(0, &mut |_, _| {});
            if self.group_left > 0 {
                return None;
            }
        }
        Some(self.sync_wait())
    }

    /// The ring itself: it polls readable while its CQ holds a completion.
    fn sync_fd(&self) -> Option<RawFd> {
        Some(self.ring.as_raw_fd())
    }

    fn sync_wait(&mut self) -> io::Result<()> {
        if let Err(err) = self.reap_group() {
            // The ring broke: what became of the group is unknown, which is
            // a failure of it.
            self.group_left = 0;
            self.group_errno = None;
            return Err(err);
        }
        match self.group_errno.take() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

impl Drop for UringBackend {
    /// Reaps a read-ahead and a sync group still in flight, so no request
    /// of this backend outlives it (fsyncs borrow no memory, but the handles and the ring
    /// should go quietly).
    fn drop(&mut self) {
        // The read-ahead buffers must outlive their reads.
        for slot in 0..READ_AHEAD_SLOTS {
            let _ = self.read_finish(slot);
        }
        if let Err(err) = self.sync_wait() {
            log::warn!("io_uring: fdatasync group still outstanding at close failed: {err}");
        }
    }
}

impl UringBackend {
    /// The rounds of one `write_batch` (see the module docs). `pending`
    /// holds the unfinished writes, `sync_todo` the files still to
    /// fdatasync with whether this round's fdatasync of it succeeded.
    fn run_rounds(
        &mut self,
        writes: &[WriteOp<'_>],
        capacity: usize,
        pending: &mut Vec<Pending>,
        retry: &mut Vec<Pending>,
        sync_todo: &mut Vec<(FileHandle, bool)>,
    ) -> io::Result<()> {
        let mut first_error: Option<io::Error> = None;
        while !pending.is_empty() || !sync_todo.is_empty() {
            // The fsyncs ride along when the barrier and all of them fit
            // after the writes; otherwise this round only writes, and once
            // the writes are done the fsyncs go in queue-sized chunks. Not
            // while a sync group is outstanding: the barrier would wait for
            // the group's fsyncs too (see the module docs).
            let barrier = !pending.is_empty();
            let sync_count = if !barrier {
                sync_todo.len().min(capacity)
            } else if self.group_left == 0 && pending.len() + 1 + sync_todo.len() <= capacity {
                sync_todo.len()
            } else {
                0
            };
            let write_count = pending.len().min(capacity);
            let mut in_flight = 0;
            // Entries are only built from handles checked at the start of
            // `write_batch`; should one still fail, what was pushed is
            // submitted and reaped before the error is returned.
            for (i, p) in pending[..write_count].iter().enumerate() {
                let op = &writes[p.op];
                let rest = &op.data[p.done_bytes..];
                let write = Op::Write {
                    ptr: rest.as_ptr(),
                    len: rest.len().min(REQUEST_BYTES_MAX) as u32,
                    offset: op.offset + p.done_bytes as u64,
                };
                match self.entry(op.file, write) {
                    Ok(entry) => {
                        self.push(&entry.user_data(i as u64));
                        in_flight += 1;
                    }
                    Err(err) => {
                        first_error.get_or_insert(err);
                        break;
                    }
                }
            }
            for (_, done) in sync_todo.iter_mut() {
                *done = false;
            }
            if sync_count > 0 && first_error.is_none() {
                if barrier {
                    let nop = opcode::Nop::new()
                        .build()
                        .flags(squeue::Flags::IO_DRAIN)
                        .user_data(NOP_TAG);
                    self.push(&nop);
                    in_flight += 1;
                }
                for (i, &(file, _)) in sync_todo[..sync_count].iter().enumerate() {
                    match self.entry(file, Op::Datasync) {
                        Ok(entry) => {
                            self.push(&entry.user_data(FSYNC_TAG | i as u64));
                            in_flight += 1;
                        }
                        Err(err) => {
                            first_error.get_or_insert(err);
                            break;
                        }
                    }
                }
            }

            // Completions: advance writes, mark the fdatasyncs that are done.
            retry.clear();
            retry.extend_from_slice(&pending[write_count..]);
            let submitted = &pending[..write_count];
            self.submit_and_reap(in_flight, |tag, res| {
                if tag == NOP_TAG {
                    return;
                }
                let retryable = res == -libc::EINTR || res == -libc::EAGAIN;
                if tag & KIND_MASK == FSYNC_TAG {
                    let i = (tag & !KIND_MASK) as usize;
                    if res >= 0 {
                        sync_todo[i].1 = true;
                    } else if !retryable {
                        first_error.get_or_insert(io::Error::from_raw_os_error(-res));
                    }
                    return;
                }
                let p = submitted[tag as usize];
                let rest_len = writes[p.op].data.len() - p.done_bytes;
                if res > 0 && (res as usize) < rest_len {
                    retry.push(Pending {
                        op: p.op,
                        done_bytes: p.done_bytes + res as usize,
                    });
                } else if res == 0 {
                    first_error.get_or_insert(io::Error::from(io::ErrorKind::WriteZero));
                } else if retryable {
                    retry.push(p);
                } else if res < 0 {
                    first_error.get_or_insert(io::Error::from_raw_os_error(-res));
                }
            })?;
            if let Some(err) = first_error {
                return Err(err);
            }
            std::mem::swap(pending, retry);
            // A file stays to sync if its fdatasync did not run or succeed,
            // or if it still has a remainder the fdatasync did not cover.
            sync_todo
                .retain(|&(file, done)| !done || pending.iter().any(|p| writes[p.op].file == file));
        }
        Ok(())
    }
}

impl UringBackend {
    /// Writes `data` over and over at consecutive offsets from `start` until
    /// `total_bytes` are written, keeping `depth` writes in flight. For the
    /// raw bandwidth measurement (a steady queue depth, unlike a batch).
    /// `data.len()`, `start` and `total_bytes` must be multiples of
    /// [`BLOCK_BYTES`], and `data` aligned like any write.
    pub fn write_sequential(
        &mut self,
        file: FileHandle,
        data: &[u8],
        start: u64,
        total_bytes: u64,
        depth: usize,
    ) -> io::Result<()> {
        self.check_usable()?;
        self.check_write(&WriteOp {
            file,
            offset: start,
            data,
        })?;
        if data.is_empty() || total_bytes % BLOCK_BYTES as u64 != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // Offsets travel in kind-0 tags.
        let end = start
            .checked_add(total_bytes)
            .filter(|&end| end <= TAG_PAYLOAD_MAX)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let depth = depth.clamp(1, self.sq_entries());
        let mut next = start;
        // Requests waiting to be pushed again after a short or retryable
        // completion: (offset, length). At most `depth` of them.
        let mut redo: Vec<(u64, usize)> = Vec::with_capacity(depth);
        let mut in_flight = 0usize;
        let mut first_error = None;
        loop {
            while in_flight < depth && first_error.is_none() {
                let (offset, len) = if let Some(r) = redo.pop() {
                    r
                } else if next < end {
                    let len = data.len().min((end - next) as usize);
                    next += len as u64;
                    (next - len as u64, len)
                } else {
                    break;
                };
                // `user_data` carries the offset; the length is known from
                // the offset (a full `data` unless at the end).
                let write = Op::Write {
                    ptr: data.as_ptr(),
                    len: len as u32,
                    offset,
                };
                match self.entry(file, write) {
                    Ok(entry) => {
                        self.push(&entry.user_data(offset));
                        in_flight += 1;
                    }
                    // Not expected (checked above); the writes in flight
                    // are still reaped before returning.
                    Err(err) => {
                        first_error = Some(err);
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            // Submit what was pushed and wait for one completion, then
            // refill: a steady `depth` in flight.
            self.submit_and_reap(1, |offset, res| {
                let len = data.len().min((end - offset) as usize);
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    redo.push((offset, len));
                } else if res < 0 {
                    first_error.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if res == 0 {
                    first_error.get_or_insert(io::Error::from(io::ErrorKind::WriteZero));
                } else if (res as usize) < len {
                    // The remainder would need an offset into `data`;
                    // bandwidth runs treat a short write as a failure.
                    first_error.get_or_insert(io::Error::from(io::ErrorKind::WriteZero));
                }
            })?;
            in_flight -= 1;
            if first_error.is_some() && in_flight == 0 {
                break;
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::FromRawFd;

    use super::*;
    use crate::storage::io::aligned::AlignedBuf;
    use crate::storage::io::conformance;

    /// The backend, or None (with a note) where the kernel refuses io_uring.
    fn backend(entries: u32) -> Option<UringBackend> {
        match UringBackend::new(entries) {
            Ok(b) => {
                eprintln!(
                    "backend io_uring: {} SQ entries, {} registered file slots",
                    b.ring.params().sq_entries(),
                    b.fixed_slots
                );
                Some(b)
            }
            Err(err) => {
                eprintln!("io_uring unavailable here ({err}); skipped");
                None
            }
        }
    }

    #[test]
    fn conformance_with_a_roomy_ring() {
        let Some(mut b) = backend(256) else { return };
        assert_eq!(b.name(), "io_uring");
        let dir = conformance::scratch_dir();
        conformance::run_all(&mut b, dir.path());
    }

    /// 8 SQ entries: batches of 288 writes and 12 fsyncs must be split.
    #[test]
    fn conformance_with_a_tiny_ring() {
        let Some(mut b) = backend(8) else { return };
        assert_eq!(b.sq_entries(), 8);
        let dir = conformance::scratch_dir();
        conformance::run_all(&mut b, dir.path());
    }

    /// The path for kernels without sparse file registration, and for files
    /// past the registered slots.
    #[test]
    fn conformance_without_registered_files() {
        let Some(mut b) = backend(16) else { return };
        b.fixed_slots = 0;
        let dir = conformance::scratch_dir();
        conformance::run_all(&mut b, dir.path());
        assert!(b.files.iter().flatten().all(|f| !f.fixed));
    }

    #[test]
    fn files_use_o_direct_on_disk_filesystems() {
        let Some(mut b) = backend(8) else { return };
        let dir = conformance::scratch_dir();
        let f = b.open(&dir.path().join("direct.seg"), true).expect("open");
        let fd = b.file(f).expect("open file").fd.as_raw_fd();
        // SAFETY: F_GETFL only reads the flags of an fd we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert!(flags >= 0);
        let fs_is_tmpfs = std::process::Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE", "-T"])
            .arg(dir.path())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs")
            .unwrap_or(false);
        if !fs_is_tmpfs {
            assert_ne!(flags & libc::O_DIRECT, 0, "file must be opened O_DIRECT");
        }
        assert!(
            b.file(f).expect("open").fixed,
            "first handle uses a registered slot"
        );
    }

    /// Puts `fd` into the table as if `open` had returned it, so errors
    /// come from the kernel through completions, not from our checks.
    fn adopt(b: &mut UringBackend, fd: OwnedFd) -> FileHandle {
        b.files.push(Some(OpenFile {
            fd,
            unit: BLOCK_BYTES,
            fixed: false,
        }));
        FileHandle((b.files.len() - 1) as u32)
    }

    #[test]
    fn kernel_write_error_propagates_with_its_errno() {
        let Some(mut b) = backend(8) else { return };
        let dir = conformance::scratch_dir();
        let path = dir.path().join("ro.seg");
        std::fs::write(&path, [0u8; BLOCK_BYTES]).expect("create");
        let read_only = adopt(&mut b, File::open(&path).expect("open ro").into());
        let good = b.open(&dir.path().join("good.seg"), true).expect("open");
        let data = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        let writes = [
            WriteOp {
                file: good,
                offset: 0,
                data: &data,
            },
            WriteOp {
                file: read_only,
                offset: 0,
                data: &data,
            },
        ];
        let err = b
            .write_batch(&writes, &[good])
            .expect_err("write to read-only fd");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        // A write far past the largest file size ext4/xfs allow.
        let err = b
            .write_batch(
                &[WriteOp {
                    file: good,
                    offset: 1 << 62,
                    data: &data,
                }],
                &[],
            )
            .expect_err("write past max file size");
        assert!(
            matches!(err.raw_os_error(), Some(libc::EFBIG) | Some(libc::EINVAL)),
            "{err:?}"
        );
        // The ring is still usable afterwards.
        b.write_batch(
            &[WriteOp {
                file: good,
                offset: 0,
                data: &data,
            }],
            &[good],
        )
        .expect("write after errors");
    }

    #[test]
    fn fdatasync_error_propagates_with_its_errno() {
        let Some(mut b) = backend(8) else { return };
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read_end);
        // fdatasync on a pipe fails with EINVAL in the kernel.
        let pipe = adopt(&mut b, write_end);
        let dir = conformance::scratch_dir();
        let good = b.open(&dir.path().join("good.seg"), true).expect("open");
        let data = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        let err = b
            .write_batch(
                &[WriteOp {
                    file: good,
                    offset: 0,
                    data: &data,
                }],
                &[good, pipe],
            )
            .expect_err("fdatasync of a pipe");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = b.sync(pipe).expect_err("sync of a pipe");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        b.sync(good).expect("sync after errors");
    }

    #[test]
    fn handles_are_reused_and_slots_cleared() {
        let Some(mut b) = backend(8) else { return };
        let dir = conformance::scratch_dir();
        let first = b.open(&dir.path().join("1.seg"), true).expect("open");
        let second = b.open(&dir.path().join("2.seg"), true).expect("open");
        b.close(first);
        let third = b.open(&dir.path().join("3.seg"), true).expect("open");
        assert_eq!(third, first, "freed handle numbers are reused");
        let data = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        b.write_batch(
            &[
                WriteOp {
                    file: third,
                    offset: 0,
                    data: &data,
                },
                WriteOp {
                    file: second,
                    offset: 0,
                    data: &data,
                },
            ],
            &[third, second],
        )
        .expect("write through reused slot");
        assert_eq!(
            std::fs::metadata(dir.path().join("3.seg"))
                .expect("stat")
                .len(),
            4096
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("1.seg"))
                .expect("stat")
                .len(),
            0
        );
    }

    /// Waits (without reaping) until `count` completions sit in the CQ.
    /// Waits in the kernel until every completion the sync group still
    /// owes sits in the CQ, unreaped. `sync_start` may already have counted
    /// some off (a pipe's fdatasync fails inline), so the target is
    /// `group_left`, not the group's size: waiting for a fixed count raced.
    #[track_caller]
    fn await_group_cqes(b: &mut UringBackend) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let slice = io_uring::types::Timespec::new().nsec(100_000_000);
        let args = io_uring::types::SubmitArgs::new().timespec(&slice);
        while b.ring.completion().len() < b.group_left {
            assert!(
                std::time::Instant::now() < deadline,
                "completions never came: {} in the CQ, group_left {}",
                b.ring.completion().len(),
                b.group_left
            );
            match b.ring.submitter().submit_with_args(b.group_left, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => panic!("waiting for completions: {e}"),
            }
        }
    }

    /// The group's fsync completions are already in the CQ when a batch
    /// starts reaping: they must be counted off (their error kept for
    /// `sync_wait`), not taken for the batch's own completions.
    #[test]
    fn group_completions_met_by_a_batch_are_counted_off() {
        let Some(mut b) = backend(8) else { return };
        let dir = conformance::scratch_dir();
        let files: Vec<FileHandle> = (0..4)
            .map(|i| {
                b.open(&dir.path().join(format!("g{i}.seg")), true)
                    .expect("open")
            })
            .collect();
        let mut data = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        conformance::fill_pattern(&mut data, 5);
        let writes: Vec<WriteOp<'_>> = files
            .iter()
            .map(|&file| WriteOp {
                file,
                offset: 0,
                data: &data,
            })
            .collect();
        b.write_batch(&writes, &[]).expect("write");
        b.sync_start(&files).expect("sync_start");
        // At most the group's four fsyncs are owed: sync_start may already
        // have counted fast ones off (asserting exactly 4 raced).
        assert!(b.group_left <= 4, "group_left {}", b.group_left);
        await_group_cqes(&mut b);
        // Four writes and one fsync of the batch: with the group's four
        // completions in the way, a mix-up would index past the batch or
        // leave the batch's own completions behind.
        b.write_batch(&writes, &files[..1])
            .expect("write while group done");
        assert_eq!((b.group_left, b.outstanding), (0, 0));
        assert_eq!(b.group_errno, None);
        b.sync_wait().expect("sync_wait");

        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (_read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let pipe = adopt(&mut b, write_end);
        b.sync_start(&[pipe, files[0]]).expect("sync_start");
        await_group_cqes(&mut b);
        let mut back = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        assert_eq!(
            b.read_at(files[1], 0, &mut back).expect("read"),
            BLOCK_BYTES
        );
        assert_eq!(&back[..], &data[..]);
        assert_eq!((b.group_left, b.group_errno), (0, Some(libc::EINVAL)));
        b.write_batch(&writes, &files)
            .expect("the group's error is not the batch's");
        let err = b.sync_wait().expect_err("fdatasync of a pipe");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        b.sync_wait().expect("reported once");
    }

    /// A group far larger than a 2-entry ring (SQ 2, CQ 4): sync_start must
    /// submit in pieces and make room, sync_wait reap through CQ overflow,
    /// and batches in between still see only their own completions.
    #[test]
    fn group_larger_than_the_ring() {
        let Some(mut b) = backend(2) else { return };
        let dir = conformance::scratch_dir();
        let files: Vec<FileHandle> = (0..40)
            .map(|i| {
                b.open(&dir.path().join(format!("big{i}.seg")), true)
                    .expect("open")
            })
            .collect();
        let data = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        for round in 0..3u64 {
            b.sync_start(&files).expect("sync_start");
            for &file in &files[..5] {
                b.write_batch(
                    &[WriteOp {
                        file,
                        offset: round * BLOCK_BYTES as u64,
                        data: &data,
                    }],
                    &[file],
                )
                .expect("write while a big group is outstanding");
            }
            b.sync_wait().expect("sync_wait");
            assert_eq!((b.group_left, b.outstanding), (0, 0));
        }
    }

    /// Dropping the backend with a group in flight reaps it first.
    #[test]
    fn drop_with_a_group_outstanding_reaps_it() {
        let Some(mut b) = backend(4) else { return };
        let dir = conformance::scratch_dir();
        let files: Vec<FileHandle> = (0..6)
            .map(|i| {
                b.open(&dir.path().join(format!("d{i}.seg")), true)
                    .expect("open")
            })
            .collect();
        b.sync_start(&files).expect("sync_start");
        assert!(b.group_left > 0);
        // Fails by hanging or by the debug assertions of the reaping.
        drop(b);
    }

    /// Reads ahead left outstanding are reaped before their buffers go; one
    /// on an unknown handle, or a second in a busy slot, gives the buffer
    /// back.
    #[test]
    fn read_ahead_is_reaped_at_drop_and_refused_when_it_cannot_run() {
        let Some(mut b) = backend(4) else { return };
        let dir = conformance::scratch_dir();
        let f = b.open(&dir.path().join("ra.seg"), true).expect("open");
        let data = AlignedBuf::new(1 << 20).expect("aligned");
        b.write_batch(
            &[WriteOp {
                file: f,
                offset: 0,
                data: &data,
            }],
            &[],
        )
        .expect("write");
        let buf = AlignedBuf::new(1 << 20).expect("aligned");
        let buf = b
            .read_start(0, FileHandle(77), 0, buf, 1 << 20)
            .expect_err("unknown handle");
        b.read_start(0, f, 0, buf, 1 << 20).expect("started");
        let second = AlignedBuf::new(1 << 20).expect("aligned");
        let second = b
            .read_start(0, f, 0, second, BLOCK_BYTES)
            .expect_err("one at a time per slot");
        b.read_start(3, f, 0, second, 1 << 20)
            .expect("another slot");
        assert!(
            b.ahead.bufs[0].is_some() && b.ahead.bufs[3].is_some(),
            "held while in flight"
        );
        // Fails by hanging, or under a sanitizer by a write into freed memory.
        drop(b);
    }

    #[test]
    fn sequential_writes_keep_depth_and_land_in_order() {
        let Some(mut b) = backend(4) else { return };
        let dir = conformance::scratch_dir();
        let f = b.open(&dir.path().join("seq.seg"), true).expect("open");
        let mut data = AlignedBuf::new(2 * BLOCK_BYTES).expect("aligned");
        conformance::fill_pattern(&mut data, 11);
        b.write_sequential(f, &data, 0, 20 * BLOCK_BYTES as u64, 4)
            .expect("write");
        b.sync(f).expect("sync");
        let mut back = AlignedBuf::new(24 * BLOCK_BYTES).expect("aligned");
        assert_eq!(b.read_at(f, 0, &mut back).expect("read"), 20 * BLOCK_BYTES);
        for chunk in back[..20 * BLOCK_BYTES].chunks(data.len()) {
            assert_eq!(chunk, &data[..]);
        }
    }
}
