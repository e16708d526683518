//! A filesystem that loses what was not synced, for running the real
//! binary through simulated power cuts (issue 22's "filesystem that drops
//! unsynced data", the part LazyFS plays in Jepsen's tests).
//!
//! A FUSE passthrough, served by this test process, over a directory of
//! the host's filesystem. File data written through it stays in this
//! process's memory until the file is fsynced (fsync or fdatasync: both
//! write it through and sync it). [`LazyFs::crash`] is the power cut: every
//! unsynced write is dropped, and file handles opened before it fail with
//! EIO, so I/O still in flight from a killed process lands nowhere. The
//! namespace (create, mkdir, rename, unlink) and fallocate go through at
//! once, as a journaling filesystem's metadata does; a rename moves the
//! file's unsynced data with it, so "write, rename, no fsync" loses the
//! data, as it can on ext4. A truncate writes the file's unsynced data
//! through first (it is not a point this model cuts at).
//!
//! Every open gets FOPEN_DIRECT_IO, so the kernel caches no file data:
//! after a crash, reads through the mount see only what survived.
//! fallocate can be refused (EOPNOTSUPP, as many FUSE filesystems do), to
//! run the broker's preallocate-by-writing-zeros fallback.
//!
//! [`LazyFs::mount_slow`] also makes it a slow device, an SD card's model
//! for issue 23's workload S: one queue, where a write takes its length
//! over the device's bandwidth and a flush (fsync, fdatasync, a
//! directory's fsync) a latency
//! drawn from a range, each after the ones before it. A flush asked for
//! while another waits in the queue, not yet started, is served by that
//! one, as the kernel's block layer serves every flush asked for while
//! one is in flight with the next single flush: the writes its caller
//! waited for are done, so the waiting flush covers them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};

/// Attributes and entries are never cached: sizes change under the kernel
/// (a crash shrinks files back).
const TTL: Duration = Duration::ZERO;

/// The unsynced writes of one file, in the order they came.
#[derive(Default)]
struct Pending {
    writes: Vec<(u64, Vec<u8>)>,
    /// The file's size as its writer sees it.
    size: u64,
}

struct Open {
    ino: u64,
    file: File,
    /// The crash count when it was opened: older handles are dead.
    era: u64,
}

#[derive(Default)]
struct Inner {
    /// FUSE inode → the path below the base directory's.
    paths: HashMap<u64, PathBuf>,
    open: HashMap<u64, Open>,
    next_fh: u64,
    pending: HashMap<u64, Pending>,
    era: u64,
    stats: Stats,
    queue: Option<Queue>,
}

/// What the filesystem saw, for the test's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub crashes: u64,
    pub syncs: u64,
    /// Bytes written and later dropped by a crash.
    pub bytes_dropped: u64,
    /// Requests on handles opened before a crash (answered EIO).
    pub stale_requests: u64,
}

struct Fs {
    base: PathBuf,
    allow_fallocate: bool,
    inner: Arc<Mutex<Inner>>,
    device: Option<SlowDevice>,
}

/// A slow device's speeds (see the module's doc).
#[derive(Debug, Clone, Copy)]
pub struct SlowDevice {
    pub write_bytes_per_s: u64,
    /// A flush takes from the first to the second, uniformly.
    pub flush_ms: (u64, u64),
}

/// What the slow device did, cumulative since the mount.
#[derive(Debug, Default, Clone)]
pub struct DeviceStats {
    pub writes: u64,
    pub bytes_written: u64,
    /// Each flush's own time on the device, in µs, in the order they ran.
    pub flush_us: Vec<u64>,
    /// Flushes asked for, those served by one already waiting included.
    pub flush_requests: u64,
    /// Time the device was busy (writing or flushing), in µs.
    pub busy_us: u64,
}

/// The device's one queue: when it is free again, and a small PRNG for
/// the flush times (xorshift; the model needs no better).
struct Queue {
    free_at: std::time::Instant,
    /// The last flush queued: when it starts and ends.
    last_flush: Option<(std::time::Instant, std::time::Instant)>,
    rng: u64,
    stats: DeviceStats,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

impl Fs {
    fn ino_of(&self, path: &Path, md: &std::fs::Metadata) -> u64 {
        if path == self.base {
            1
        } else {
            md.ino()
        }
    }

    fn attr(&self, inner: &Inner, path: &Path) -> Result<FileAttr, Errno> {
        let md = std::fs::symlink_metadata(path).map_err(errno)?;
        let ino = self.ino_of(path, &md);
        let kind = if md.is_dir() {
            FileType::Directory
        } else if md.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        let size = inner
            .pending
            .get(&ino)
            .map_or(md.len(), |p| p.size.max(md.len()));
        let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: md.blocks(),
            atime: t(md.atime(), md.atime_nsec()),
            mtime: t(md.mtime(), md.mtime_nsec()),
            ctime: t(md.ctime(), md.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (md.mode() & 0o7777) as u16,
            nlink: md.nlink() as u32,
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    fn path(&self, inner: &Inner, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino.0 == 1 {
            return Ok(self.base.clone());
        }
        inner.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, inner: &Inner, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(inner, parent)?.join(name))
    }

    /// Looks `path` up: its attributes, remembering its inode's path.
    fn entry(&self, inner: &mut Inner, path: PathBuf) -> Result<FileAttr, Errno> {
        let attr = self.attr(inner, &path)?;
        if attr.ino.0 != 1 {
            inner.paths.insert(attr.ino.0, path);
        }
        Ok(attr)
    }

    /// The open handle `fh`, unless a crash killed it.
    fn handle(inner: &mut Inner, fh: FileHandle) -> Result<&Open, Errno> {
        let era = inner.era;
        match inner.open.get(&fh.0) {
            Some(o) if o.era == era => Ok(o),
            Some(_) => {
                inner.stats.stale_requests += 1;
                Err(Errno::EIO)
            }
            None => Err(Errno::EBADF),
        }
    }

    /// Writes a file's unsynced data through (not synced).
    fn write_through(inner: &mut Inner, ino: u64, file: &File) -> Result<(), Errno> {
        if let Some(p) = inner.pending.remove(&ino) {
            for (off, data) in &p.writes {
                file.write_all_at(data, *off).map_err(errno)?;
            }
        }
        Ok(())
    }

    /// unlink or rmdir; a file's last link takes its unsynced data along.
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut inner = lock(&self.inner);
        let p = self.child(&inner, parent, name)?;
        let md = std::fs::symlink_metadata(&p).map_err(errno)?;
        if dir {
            std::fs::remove_dir(&p).map_err(errno)?;
        } else {
            std::fs::remove_file(&p).map_err(errno)?;
        }
        if dir || md.nlink() <= 1 {
            inner.pending.remove(&md.ino());
            inner.paths.remove(&md.ino());
        }
        Ok(())
    }

    /// Queues `op` on the slow device, if there is one: when it will be
    /// done. The caller sleeps until then without the lock.
    fn occupy(&self, inner: &mut Inner, op: DeviceOp) -> Option<std::time::Instant> {
        let d = self.device?;
        let q = inner.queue.as_mut()?;
        let flush = matches!(op, DeviceOp::Flush);
        let took = match op {
            DeviceOp::Write(bytes) => {
                q.stats.writes += 1;
                q.stats.bytes_written += bytes;
                Duration::from_nanos(
                    bytes.saturating_mul(1_000_000_000) / d.write_bytes_per_s.max(1),
                )
            }
            DeviceOp::Flush => {
                q.stats.flush_requests += 1;
                let now = std::time::Instant::now();
                if let Some((_, end)) = q.last_flush.filter(|&(start, _)| start > now) {
                    // Not started yet: it covers this caller's writes too.
                    return Some(end);
                }
                q.rng ^= q.rng << 13;
                q.rng ^= q.rng >> 7;
                q.rng ^= q.rng << 17;
                let (lo, hi) = d.flush_ms;
                let us = lo * 1000 + q.rng % ((hi.max(lo) - lo) * 1000 + 1);
                q.stats.flush_us.push(us);
                Duration::from_micros(us)
            }
        };
        q.stats.busy_us += took.as_micros() as u64;
        let start = q.free_at.max(std::time::Instant::now());
        q.free_at = start + took;
        if flush {
            q.last_flush = Some((start, q.free_at));
        }
        Some(q.free_at)
    }

    fn open_file(&self, inner: &mut Inner, ino: u64, file: File) -> FileHandle {
        inner.next_fh += 1;
        let fh = inner.next_fh;
        let era = inner.era;
        inner.open.insert(fh, Open { ino, file, era });
        FileHandle(fh)
    }
}

enum DeviceOp {
    Write(u64),
    Flush,
}

fn wait_for(done: Option<std::time::Instant>) {
    if let Some(t) = done {
        let now = std::time::Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    }
}

fn answer(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn answer_entry(reply: ReplyEntry, r: Result<FileAttr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn answer_attr(reply: ReplyAttr, r: Result<FileAttr, Errno>) {
    match r {
        Ok(a) => reply.attr(&TTL, &a),
        Err(e) => reply.error(e),
    }
}

fn open_options(flags: i32) -> OpenOptions {
    let mut o = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => o.read(true),
        _ => o.read(true).write(true),
    };
    // O_DIRECT and friends are the kernel's business with the mount; the
    // data below is reached the ordinary way.
    o.custom_flags(flags & (libc::O_TRUNC | libc::O_EXCL) & !libc::O_CREAT);
    o
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut inner = lock(&self.inner);
        let r = self
            .child(&inner, parent, name)
            .and_then(|p| self.entry(&mut inner, p));
        answer_entry(reply, r);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let inner = lock(&self.inner);
        answer_attr(
            reply,
            self.path(&inner, ino).and_then(|p| self.attr(&inner, &p)),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut inner = lock(&self.inner);
        let r = (|| {
            let path = self.path(&inner, ino)?;
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(errno)?;
            }
            if let Some(size) = size {
                let f = OpenOptions::new().write(true).open(&path).map_err(errno)?;
                Self::write_through(&mut inner, ino.0, &f)?;
                f.set_len(size).map_err(errno)?;
            }
            self.attr(&inner, &path)
        })();
        answer_attr(reply, r);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        use std::os::unix::fs::DirBuilderExt;
        let mut inner = lock(&self.inner);
        let r = self.child(&inner, parent, name).and_then(|p| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .map_err(errno)?;
            self.entry(&mut inner, p)
        });
        answer_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(reply, self.remove(parent, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(reply, self.remove(parent, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut inner = lock(&self.inner);
        let r = (|| {
            if flags.bits() != 0 {
                return Err(Errno::EINVAL);
            }
            let from = self.child(&inner, parent, name)?;
            let to = self.child(&inner, newparent, newname)?;
            // A file replaced by the rename goes, unsynced data and all.
            if let Ok(md) = std::fs::symlink_metadata(&to) {
                if !md.is_dir() && md.nlink() <= 1 {
                    inner.pending.remove(&md.ino());
                    inner.paths.remove(&md.ino());
                }
            }
            std::fs::rename(&from, &to).map_err(errno)?;
            for p in inner.paths.values_mut() {
                if let Ok(rest) = p.strip_prefix(&from) {
                    *p = if rest.as_os_str().is_empty() {
                        to.clone()
                    } else {
                        to.join(rest)
                    };
                }
            }
            Ok(())
        })();
        answer(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut inner = lock(&self.inner);
        let r = self.path(&inner, ino).and_then(|p| {
            let f = open_options(flags.0).open(&p).map_err(errno)?;
            if flags.0 & libc::O_TRUNC != 0 {
                inner.pending.remove(&ino.0);
            }
            Ok(self.open_file(&mut inner, ino.0, f))
        });
        match r {
            Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut inner = lock(&self.inner);
        let r = self.child(&inner, parent, name).and_then(|p| {
            let mut o = open_options(flags);
            o.create(true).mode(mode);
            let f = o.open(&p).map_err(errno)?;
            let attr = self.entry(&mut inner, p)?;
            inner.pending.remove(&attr.ino.0);
            let fh = self.open_file(&mut inner, attr.ino.0, f);
            Ok((attr, fh))
        });
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut inner = lock(&self.inner);
        let r = (|| {
            let o = Self::handle(&mut inner, fh)?;
            let ino = o.ino;
            let file = o.file.try_clone().map_err(errno)?;
            let on_disk = file.metadata().map_err(errno)?.len();
            let pending = inner.pending.get(&ino);
            let len = pending.map_or(on_disk, |p| p.size.max(on_disk));
            let n = (len.saturating_sub(offset)).min(u64::from(size)) as usize;
            let mut buf = vec![0u8; n];
            let mut got = 0;
            while got < n {
                match file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            // Then the unsynced writes over it, in order.
            if let Some(p) = pending {
                let end = offset + n as u64;
                for (w_off, data) in &p.writes {
                    let w_end = w_off + data.len() as u64;
                    if w_end <= offset || *w_off >= end {
                        continue;
                    }
                    let from = (*w_off).max(offset);
                    let to = w_end.min(end);
                    buf[(from - offset) as usize..(to - offset) as usize]
                        .copy_from_slice(&data[(from - w_off) as usize..(to - w_off) as usize]);
                }
            }
            Ok(buf)
        })();
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut inner = lock(&self.inner);
        let r = (|| {
            let o = Self::handle(&mut inner, fh)?;
            let ino = o.ino;
            let on_disk = o.file.metadata().map_err(errno)?.len();
            let p = inner.pending.entry(ino).or_default();
            p.size = p.size.max(on_disk).max(offset + data.len() as u64);
            p.writes.push((offset, data.to_vec()));
            Ok(())
        })();
        let done = r
            .is_ok()
            .then(|| self.occupy(&mut inner, DeviceOp::Write(data.len() as u64)))
            .flatten();
        drop(inner);
        wait_for(done);
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut inner = lock(&self.inner);
        let r = (|| {
            let o = Self::handle(&mut inner, fh)?;
            let ino = o.ino;
            let file = o.file.try_clone().map_err(errno)?;
            Self::write_through(&mut inner, ino, &file)?;
            inner.stats.syncs += 1;
            if datasync {
                file.sync_data().map_err(errno)
            } else {
                file.sync_all().map_err(errno)
            }
        })();
        let done = r
            .is_ok()
            .then(|| self.occupy(&mut inner, DeviceOp::Flush))
            .flatten();
        drop(inner);
        wait_for(done);
        answer(reply, r);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.allow_fallocate {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let mut inner = lock(&self.inner);
        let r = Self::handle(&mut inner, fh).and_then(|o| {
            // SAFETY: fallocate(2) on a descriptor this handle owns.
            let rc = unsafe {
                libc::fallocate(
                    o.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        });
        answer(reply, r);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.inner).open.remove(&fh.0);
        reply.ok();
    }

    /// Directory entries are kept as they are made (only file data is
    /// lazy), so there is nothing to make durable; the slow device still
    /// charges a flush, as a journaling file system's commit costs one.
    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut inner = lock(&self.inner);
        let done = self.occupy(&mut inner, DeviceOp::Flush);
        drop(inner);
        wait_for(done);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inner = lock(&self.inner);
        let r = self.path(&inner, ino).and_then(|dir| {
            let mut names: Vec<(u64, FileType, std::ffi::OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for e in std::fs::read_dir(&dir).map_err(errno)? {
                let e = e.map_err(errno)?;
                let ft = e.file_type().map_err(errno)?;
                let kind = if ft.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                names.push((e.ino(), kind, e.file_name()));
            }
            Ok(names)
        });
        match r {
            Ok(names) => {
                for (i, (ino, kind, name)) in names.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let c = std::ffi::CString::new(self.base.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: statvfs(3) fills the zeroed struct for a NUL-terminated path.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            reply.error(errno(std::io::Error::last_os_error()));
            return;
        }
        // The counts are u32 on 32-bit ARM.
        #[allow(clippy::unnecessary_cast)]
        reply.statfs(
            s.f_blocks as u64,
            s.f_bfree as u64,
            s.f_bavail as u64,
            s.f_files as u64,
            s.f_ffree as u64,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }
}

/// The mounted filesystem; unmounted on drop.
pub struct LazyFs {
    session: Option<BackgroundSession>,
    inner: Arc<Mutex<Inner>>,
    pub mountpoint: PathBuf,
}

impl LazyFs {
    /// Whether this run can mount it: root, /dev/fuse, and not under an
    /// emulator (scripts/cross-test), where the filesystem would be served
    /// by an emulated process.
    fn available() -> bool {
        // SAFETY: geteuid(2) cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let emulated = std::env::var("SKIFF_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty());
        root && !emulated && Path::new("/dev/fuse").exists()
    }

    /// Mounts `base` (a directory on a real filesystem) at `mountpoint`;
    /// `None` (said on stderr) where this run cannot mount: not root, no
    /// /dev/fuse, under an emulator, or a container that refuses mount(2).
    pub fn try_mount(base: &Path, mountpoint: &Path, allow_fallocate: bool) -> Option<LazyFs> {
        if !Self::available() {
            eprintln!("skipped: tests/lazy_fs needs root, /dev/fuse and a native run");
            return None;
        }
        match Self::mount(base, mountpoint, allow_fallocate, None) {
            Ok(fs) => Some(fs),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
                ) =>
            {
                eprintln!("skipped: mounting tests/lazy_fs was refused: {e}");
                None
            }
            Err(e) => panic!("mounting tests/lazy_fs: {e}"),
        }
    }

    /// As [`LazyFs::try_mount`], and a slow device (see the module's doc).
    pub fn mount_slow(base: &Path, mountpoint: &Path, device: SlowDevice) -> Option<LazyFs> {
        if !Self::available() {
            eprintln!("skipped: tests/lazy_fs needs root, /dev/fuse and a native run");
            return None;
        }
        Some(Self::mount(base, mountpoint, true, Some(device)).expect("mounting tests/lazy_fs"))
    }

    fn mount(
        base: &Path,
        mountpoint: &Path,
        allow_fallocate: bool,
        device: Option<SlowDevice>,
    ) -> std::io::Result<LazyFs> {
        std::fs::create_dir_all(base).expect("creating the base directory");
        std::fs::create_dir_all(mountpoint).expect("creating the mount point");
        let inner = Arc::new(Mutex::new(Inner {
            queue: device.map(|_| Queue {
                free_at: std::time::Instant::now(),
                last_flush: None,
                rng: 0x9e37_79b9_7f4a_7c15,
                stats: DeviceStats::default(),
            }),
            ..Inner::default()
        }));
        let fs = Fs {
            base: base.to_path_buf(),
            allow_fallocate,
            inner: inner.clone(),
            device,
        };
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("skiff-lazyfs".into()),
            MountOption::DefaultPermissions,
        ];
        cfg.acl = fuser::SessionACL::All;
        if device.is_some() {
            // The device's queue orders writes and flushes; threads keep
            // lookups and attributes from waiting behind them, and let as
            // many fdatasyncs wait at once as a kernel's block device
            // would (a group commit's over many partitions, each file's on
            // a thread of its own): with four, a group's twenty waited in
            // fours, a flush or two each.
            cfg.n_threads = Some(64);
        }
        let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
        Ok(LazyFs {
            session: Some(session),
            inner,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// The power cut: unsynced writes are gone, open handles dead.
    pub fn crash(&self) {
        let mut inner = lock(&self.inner);
        let dropped: u64 = inner
            .pending
            .values()
            .flat_map(|p| p.writes.iter().map(|(_, d)| d.len() as u64))
            .sum();
        inner.pending.clear();
        inner.era += 1;
        inner.stats.crashes += 1;
        inner.stats.bytes_dropped += dropped;
    }

    pub fn stats(&self) -> Stats {
        lock(&self.inner).stats
    }

    /// The slow device's counters (empty without one).
    pub fn device_stats(&self) -> DeviceStats {
        lock(&self.inner)
            .queue
            .as_ref()
            .map(|q| q.stats.clone())
            .unwrap_or_default()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // A killed broker's io_uring is torn down after the process is
        // reaped, and holds its files until then: busy for a moment.
        let c = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // SAFETY: umount2(2) on a NUL-terminated path.
        while unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            if std::time::Instant::now() > deadline {
                eprintln!(
                    "lazy fs: {} still busy after 10 s: detached",
                    self.mountpoint.display()
                );
                // SAFETY: as above.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Unmounted: the session's thread sees the device close and ends.
        let _ = session.join();
    }
}
