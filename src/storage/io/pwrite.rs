//! The fallback backend: positional syscalls (pwrite/pread/fdatasync) on
//! O_DIRECT files, one call at a time from the storage thread.
//!
//! Where O_DIRECT is refused (tmpfs and some FUSE file systems answer
//! EINVAL), files are opened buffered instead, with one warning: fdatasync
//! still makes them durable, only the page cache is in the way.

use super::{EventFd, FileHandle, IoBackend, WriteOp, BLOCK_BYTES};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{mpsc, Arc};

/// A finished sync group's result, and its file list back for reuse.
type SyncDone = (io::Result<()>, Vec<Arc<File>>);

/// The thread that runs fdatasyncs started by `sync_start`, so the storage
/// thread can write the next group while the device flushes this one.
#[derive(Debug)]
struct SyncWorker {
    tx: Option<mpsc::Sender<Vec<Arc<File>>>>,
    /// The finished group's result, and its list back for reuse.
    rx: mpsc::Receiver<SyncDone>,
    /// Signalled after each result is sent: what `sync_fd` polls.
    done_fd: Arc<EventFd>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SyncWorker {
    fn start() -> io::Result<SyncWorker> {
        let (tx, work) = mpsc::channel::<Vec<Arc<File>>>();
        let (done, rx) = mpsc::channel();
        let done_fd = Arc::new(EventFd::new()?);
        let signal = done_fd.clone();
        let handle = std::thread::Builder::new()
            .name("skiff-fsync".into())
            .spawn(move || {
                while let Ok(mut files) = work.recv() {
                    let res = files.iter().try_for_each(|f| f.sync_data());
                    files.clear();
                    // Signal first: whoever takes the result then clears
                    // the signal for good (one sent later could outlive
                    // the clear and wake the next group's poll early).
                    signal.signal();
                    if done.send((res, files)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(SyncWorker {
            tx: Some(tx),
            rx,
            done_fd,
            handle: Some(handle),
        })
    }
}

impl Drop for SyncWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Files opened through this backend, indexed by `FileHandle.0`. Closed
/// slots are reused so the table does not grow with churn.
#[derive(Debug, Default)]
pub struct PwriteBackend {
    files: Vec<Option<Arc<File>>>,
    /// Each file's write unit, indexed like `files`.
    units: Vec<usize>,
    /// Set once O_DIRECT was refused, so the warning is logged once.
    buffered_fallback: bool,
    /// Started on the first `sync_start`.
    worker: Option<SyncWorker>,
    /// A started sync group has not been waited for.
    outstanding: bool,
    /// The list handed to the worker, reused between groups.
    spare: Vec<Arc<File>>,
}

impl PwriteBackend {
    pub fn new() -> PwriteBackend {
        PwriteBackend::default()
    }

    /// Ends the outstanding sync group with the worker's answer (`None`:
    /// the worker is gone), keeping its file list for reuse.
    fn take_group_result(&mut self, got: Option<SyncDone>) -> io::Result<()> {
        self.outstanding = false;
        if let Some(w) = &self.worker {
            w.done_fd.clear();
        }
        match got {
            Some((res, list)) => {
                self.spare = list;
                res
            }
            None => Err(io::Error::other("fsync worker thread is gone")),
        }
    }

    fn file(&self, h: FileHandle) -> io::Result<&Arc<File>> {
        self.files
            .get(h.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown file handle"))
    }

    fn insert(&mut self, f: File, unit: usize) -> FileHandle {
        let f = Arc::new(f);
        if let Some(i) = self.files.iter().position(Option::is_none) {
            self.files[i] = Some(f);
            self.units[i] = unit;
            FileHandle(i as u32)
        } else {
            self.files.push(Some(f));
            self.units.push(unit);
            FileHandle((self.files.len() - 1) as u32)
        }
    }
}

fn open_options(create: bool, direct: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(create);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o
}

fn unaligned() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "unaligned direct I/O")
}

/// Reads keep whole blocks, whatever the file's write unit.
fn check_aligned(offset: u64, data: &[u8]) -> io::Result<()> {
    if super::write_aligned(BLOCK_BYTES, offset, data) {
        Ok(())
    } else {
        Err(unaligned())
    }
}

impl IoBackend for PwriteBackend {
    fn buffered_io(&self) -> bool {
        self.buffered_fallback
    }

    fn name(&self) -> &'static str {
        "pwrite"
    }

    fn open(&mut self, path: &Path, create: bool) -> io::Result<FileHandle> {
        let f = if self.buffered_fallback {
            open_options(create, false).open(path)?
        } else {
            match open_options(create, true).open(path) {
                Ok(f) => f,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::warn!(
                        "O_DIRECT refused for {} (file system without direct I/O, e.g. tmpfs): \
                         using buffered I/O with fdatasync",
                        path.display()
                    );
                    self.buffered_fallback = true;
                    open_options(create, false).open(path)?
                }
                Err(e) => return Err(e),
            }
        };
        let unit = if self.buffered_fallback {
            BLOCK_BYTES
        } else {
            super::dio_write_unit(f.as_raw_fd())
        };
        Ok(self.insert(f, unit))
    }

    fn write_unit(&self, file: FileHandle) -> usize {
        self.units
            .get(file.0 as usize)
            .copied()
            .unwrap_or(BLOCK_BYTES)
    }

    fn close(&mut self, file: FileHandle) {
        if let Some(slot) = self.files.get_mut(file.0 as usize) {
            *slot = None;
        }
    }

    fn allocate(&mut self, file: FileHandle, len: u64) -> io::Result<()> {
        let fd = self.file(file)?.as_raw_fd();
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        // SAFETY: fd is an open descriptor owned by self.files; plain syscall.
        let rc = unsafe { libc::posix_fallocate(fd, 0, len) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    fn read_at(&mut self, file: FileHandle, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        check_aligned(offset, buf)?;
        let f = self.file(file)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_batch(&mut self, writes: &[WriteOp<'_>], sync: &[FileHandle]) -> io::Result<()> {
        for w in writes {
            if !super::write_aligned(self.write_unit(w.file), w.offset, w.data) {
                return Err(unaligned());
            }
            self.file(w.file)?.write_all_at(w.data, w.offset)?;
        }
        for &s in sync {
            self.file(s)?.sync_data()?;
        }
        Ok(())
    }

    fn sync(&mut self, file: FileHandle) -> io::Result<()> {
        self.file(file)?.sync_data()
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        super::sync_dir(dir)
    }

    fn detached_sync(&self, file: FileHandle) -> io::Result<Option<super::DetachedSync>> {
        let f = self.file(file)?.clone();
        Ok(Some(Box::new(move || f.sync_data())))
    }

    fn sync_start(&mut self, files: &[FileHandle]) -> io::Result<()> {
        self.sync_wait()?;
        if self.worker.is_none() {
            self.worker = Some(SyncWorker::start()?);
        }
        let mut list = std::mem::take(&mut self.spare);
        for &f in files {
            list.push(self.file(f)?.clone());
        }
        let worker = self.worker.as_ref().expect("started above");
        let sent = worker.tx.as_ref().map(|tx| tx.send(list));
        match sent {
            Some(Ok(())) => {
                self.outstanding = true;
                Ok(())
            }
            _ => Err(io::Error::other("fsync worker thread is gone")),
        }
    }

    fn sync_wait(&mut self) -> io::Result<()> {
        if !self.outstanding {
            return Ok(());
        }
        let worker = self.worker.as_ref().expect("outstanding implies a worker");
        let got = worker.rx.recv().ok();
        self.take_group_result(got)
    }

    fn sync_poll(&mut self) -> Option<io::Result<()>> {
        if !self.outstanding {
            return Some(Ok(()));
        }
        let worker = self.worker.as_ref().expect("outstanding implies a worker");
        let got = match worker.rx.try_recv() {
            Err(mpsc::TryRecvError::Empty) => return None,
            got => got.ok(),
        };
        Some(self.take_group_result(got))
    }

    fn sync_fd(&self) -> Option<RawFd> {
        match (&self.worker, self.outstanding) {
            (Some(w), true) => Some(w.done_fd.as_raw_fd()),
            _ => None,
        }
    }
}
