//! A fault-injecting in-memory disk, for tests.
//!
//! [`FaultDisk`] is the disk (shared: it outlives the storage that uses it,
//! as a real disk outlives a crashed process); [`FaultBackend`] is an
//! [`IoBackend`] over it. Driven by a seed, the disk can:
//!
//! - fail a write or an fdatasync with EIO or ENOSPC (a failed write may
//!   leave a torn prefix of its data behind),
//! - flip a bit in data returned by a read (the stored bytes stay intact),
//! - refuse `allocate` beyond a capacity (ENOSPC),
//! - [`FaultDisk::crash`]: lose what was not fdatasynced. Each unsynced
//!   write is independently kept, dropped, or torn at a byte boundary, as a
//!   real device may persist any subset of its queue in any order.
//!
//! File existence is treated as durable once created (the log engine syncs
//! directories after creating files; metadata files live on the real file
//! system through `meta`).

use super::{AlignedBuf, FileHandle, IoBackend, WriteOp, BLOCK_BYTES, READ_AHEAD_SLOTS};
use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Probabilities are per million operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub write_error_per_million: u32,
    pub sync_error_per_million: u32,
    pub read_flip_per_million: u32,
    /// Fail the n-th write op (1-based, counted over the disk's life).
    pub fail_write_nth: Option<u64>,
    /// Fail the n-th fdatasync (1-based).
    pub fail_sync_nth: Option<u64>,
    /// Fail every write to a file whose path contains this (one topic's
    /// files, say `__skiff_txn`), the rest of the disk being healthy.
    pub fail_writes_to: Option<&'static str>,
    /// Fail every fsync of a directory whose path ends with this (say
    /// `topics/t/0`, a partition's, or `topics/t`, its topic's).
    pub fail_dir_syncs_of: Option<&'static str>,
    /// The errno injected failures carry: `libc::EIO` or `libc::ENOSPC`.
    pub errno: i32,
    /// Total bytes `allocate` may reserve over all files; None = unlimited.
    pub capacity_bytes: Option<u64>,
    /// `allocate` fails with EOPNOTSUPP, as on a file system without
    /// fallocate (FUSE, some network file systems).
    pub allocate_unsupported: bool,
    /// Every fdatasync blocks until the plan clears this (or the disk
    /// crashes): a hung device.
    pub hang_syncs: bool,
    /// The backend reports files opened without O_DIRECT, as on a file
    /// system that refuses it.
    pub direct_io_refused: bool,
    /// `sync_start` runs the group's fdatasyncs on a thread of their own,
    /// as io_uring and pwrite's helper do, and returns at once (with
    /// `hang_syncs`: a flush held while the storage thread goes on).
    pub background_syncs: bool,
}

#[derive(Debug, Default)]
struct MemFile {
    /// What reads see now.
    data: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// Writes since the last fdatasync, in order.
    unsynced: Vec<(u64, Vec<u8>)>,
    allocated: u64,
}

#[derive(Debug)]
struct DiskState {
    files: HashMap<PathBuf, MemFile>,
    rng: u64,
    plan: FaultPlan,
    crashed: bool,
    writes: u64,
    syncs: u64,
    faults_injected: u64,
    bytes_read: u64,
    /// Of `bytes_read`, those read ahead (`read_start`).
    bytes_read_ahead: u64,
    /// What the disk reports as its direct-I/O write unit, and enforces.
    write_unit: usize,
    /// fdatasyncs blocked by `hang_syncs` now.
    syncs_held: u64,
}

impl DiskState {
    /// splitmix64: tiny, seedable, good enough to pick faults.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn chance(&mut self, per_million: u32) -> bool {
        per_million > 0 && self.next() % 1_000_000 < u64::from(per_million)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn injected(&mut self) -> io::Error {
        self.faults_injected += 1;
        io::Error::from_raw_os_error(if self.plan.errno == 0 {
            libc::EIO
        } else {
            self.plan.errno
        })
    }
}

fn apply(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[offset as usize..end].copy_from_slice(data);
}

fn crashed_error() -> io::Error {
    io::Error::other("fault disk: crashed")
}

/// The shared in-memory disk. Clone to share.
#[derive(Debug, Clone)]
pub struct FaultDisk(Arc<Mutex<DiskState>>);

impl FaultDisk {
    pub fn new(seed: u64, plan: FaultPlan) -> FaultDisk {
        FaultDisk(Arc::new(Mutex::new(DiskState {
            files: HashMap::new(),
            rng: seed,
            plan,
            crashed: false,
            writes: 0,
            syncs: 0,
            faults_injected: 0,
            bytes_read: 0,
            bytes_read_ahead: 0,
            write_unit: BLOCK_BYTES,
            syncs_held: 0,
        })))
    }

    /// A disk with 512-byte (or other) logical sectors: writes must be
    /// aligned to `unit`, a power of two dividing [`BLOCK_BYTES`].
    pub fn with_write_unit(self, unit: usize) -> FaultDisk {
        assert!(unit.is_power_of_two() && BLOCK_BYTES % unit == 0);
        self.lock().write_unit = unit;
        self
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        // A panicking test thread must not hide the disk from the checks.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        self.lock().plan = plan;
    }

    /// Simulates power loss: every unsynced write is kept, dropped or torn
    /// (seeded), and every operation fails until [`FaultDisk::restart`].
    pub fn crash(&self) {
        let mut st = self.lock();
        let mut files = std::mem::take(&mut st.files);
        for f in files.values_mut() {
            let mut next = f.durable.clone();
            for (off, data) in std::mem::take(&mut f.unsynced) {
                match st.below(3) {
                    0 => {}
                    1 => apply(&mut next, off, &data),
                    _ => {
                        let cut = st.below(data.len() as u64) as usize;
                        apply(&mut next, off, &data[..cut]);
                    }
                }
            }
            f.data = next.clone();
            f.durable = next;
        }
        st.files = files;
        st.crashed = true;
    }

    /// Simulates power loss with one chosen outcome: for each unsynced
    /// write, in order, `keep` gets the file, the write's offset and its
    /// length, and says which of its bytes reached the media (an empty
    /// range: none). A real device may persist any subset of a write's
    /// sectors; tests that need a particular subset (a later sector kept,
    /// an earlier one lost) pick it here.
    pub fn crash_keeping(&self, mut keep: impl FnMut(&Path, u64, usize) -> Range<usize>) {
        let mut st = self.lock();
        for (path, f) in st.files.iter_mut() {
            let mut next = f.durable.clone();
            for (off, data) in std::mem::take(&mut f.unsynced) {
                let r = keep(path, off, data.len());
                let r = r.start.min(data.len())..r.end.min(data.len());
                if !r.is_empty() {
                    apply(&mut next, off + r.start as u64, &data[r]);
                }
            }
            f.data = next.clone();
            f.durable = next;
        }
        st.crashed = true;
    }

    /// Like a crash where nothing unsynced survives.
    pub fn crash_dropping_unsynced(&self) {
        let mut st = self.lock();
        for f in st.files.values_mut() {
            f.unsynced.clear();
            f.data = f.durable.clone();
        }
        st.crashed = true;
    }

    /// Powers the disk back on after a crash (and clears the fault plan's
    /// random faults, so recovery runs on a healthy disk unless re-planned).
    pub fn restart(&self) {
        let mut st = self.lock();
        st.crashed = false;
    }

    /// Flips one stored bit (durable and current), as bit rot would.
    pub fn flip_stored_bit(&self, path: &Path, offset: u64, bit: u8) -> bool {
        let mut st = self.lock();
        let Some(f) = st.files.get_mut(path) else {
            return false;
        };
        let o = offset as usize;
        if o >= f.data.len() {
            return false;
        }
        f.data[o] ^= 1 << (bit % 8);
        if o < f.durable.len() {
            f.durable[o] ^= 1 << (bit % 8);
        }
        true
    }

    /// Replaces a file's bytes, durably (a file planted or damaged between
    /// runs, as the fuzzer's recovery target does). False when the file
    /// does not exist.
    pub fn put_file(&self, path: &Path, bytes: &[u8]) -> bool {
        let mut st = self.lock();
        let Some(f) = st.files.get_mut(path) else {
            return false;
        };
        f.data = bytes.to_vec();
        f.durable = bytes.to_vec();
        f.unsynced.clear();
        true
    }

    /// Removes a file between runs (one an older version never made, or
    /// an operator deleted). False when it does not exist.
    pub fn remove_file(&self, path: &Path) -> bool {
        self.lock().files.remove(path).is_some()
    }

    /// The current bytes of a file (for checks in tests).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        self.lock().files.get(path).map(|f| f.data.clone())
    }

    /// Bytes handed out by reads so far: what a read path costs the device.
    pub fn bytes_read(&self) -> u64 {
        self.lock().bytes_read
    }

    /// Of [`FaultDisk::bytes_read`], those read ahead in the background.
    pub fn bytes_read_ahead(&self) -> u64 {
        self.lock().bytes_read_ahead
    }

    /// Write ops so far (what `FaultPlan::fail_write_nth` counts).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Fdatasyncs so far (what `FaultPlan::fail_sync_nth` counts).
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// fdatasyncs blocked by the plan's `hang_syncs` at this moment.
    pub fn syncs_held(&self) -> u64 {
        self.lock().syncs_held
    }

    pub fn faults_injected(&self) -> u64 {
        self.lock().faults_injected
    }

    /// Bytes `allocate` has reserved over all files (what
    /// `FaultPlan::capacity_bytes` caps).
    pub fn allocated_bytes(&self) -> u64 {
        self.lock().files.values().map(|f| f.allocated).sum()
    }

    pub fn file_paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.lock().files.keys().cloned().collect();
        v.sort();
        v
    }
}

/// An [`IoBackend`] over a [`FaultDisk`].
#[derive(Debug)]
pub struct FaultBackend {
    disk: FaultDisk,
    handles: Vec<Option<PathBuf>>,
    /// A started sync group: each file and how many of its unsynced writes
    /// existed at `sync_start` (only those become durable at `sync_wait`,
    /// as a real fdatasync covers only the writes before it began).
    started: Vec<(PathBuf, usize)>,
    /// A group `sync_start` handed to a thread (`background_syncs`), and
    /// the descriptor it signals when done.
    background: Option<std::thread::JoinHandle<io::Result<()>>>,
    done: Option<Arc<super::EventFd>>,
    /// Reads ahead, per slot: done at `read_start`, so their bytes are as
    /// stale as a kernel could make them by the time `read_finish` hands
    /// them over.
    ahead: Vec<Option<(AlignedBuf, io::Result<usize>)>>,
}

impl FaultBackend {
    pub fn new(disk: FaultDisk) -> FaultBackend {
        FaultBackend {
            disk,
            handles: Vec::new(),
            started: Vec::new(),
            background: None,
            done: None,
            ahead: (0..READ_AHEAD_SLOTS).map(|_| None).collect(),
        }
    }

    fn path(&self, h: FileHandle) -> io::Result<PathBuf> {
        self.handles
            .get(h.0 as usize)
            .and_then(Clone::clone)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown file handle"))
    }
}

fn check_aligned(unit: usize, offset: u64, len: usize) -> io::Result<()> {
    if offset % unit as u64 != 0 || len % unit != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unaligned direct I/O",
        ));
    }
    Ok(())
}

impl FaultBackend {
    /// One fdatasync of `path`: makes its first `limit` pending writes (all
    /// of them with `None`) durable, or fails as the plan says. Like Linux
    /// after a failed writeback, an error is reported once and what reached
    /// the media is unknown: the pending writes stay, so a crash decides
    /// their fate.
    fn flush(&mut self, path: &Path, limit: Option<usize>) -> io::Result<()> {
        flush(&self.disk, path, limit)
    }
}

fn flush(disk: &FaultDisk, path: &Path, limit: Option<usize>) -> io::Result<()> {
    let mut st = disk.lock();
    let held = st.plan.hang_syncs && !st.crashed;
    st.syncs_held += u64::from(held);
    while st.plan.hang_syncs && !st.crashed {
        drop(st);
        std::thread::sleep(std::time::Duration::from_millis(5));
        st = disk.lock();
    }
    st.syncs_held -= u64::from(held);
    if st.crashed {
        return Err(crashed_error());
    }
    st.syncs += 1;
    let nth = st.syncs;
    let p = st.plan;
    if p.fail_sync_nth == Some(nth) || st.chance(p.sync_error_per_million) {
        return Err(st.injected());
    }
    let f = st.files.get_mut(path).ok_or(io::ErrorKind::NotFound)?;
    let n = limit.unwrap_or(usize::MAX).min(f.unsynced.len());
    for (off, data) in f.unsynced.drain(..n) {
        apply(&mut f.durable, off, &data);
    }
    Ok(())
}

/// Directories live on the real file system (see the module docs): only
/// a crash and the plan's failures are modelled.
fn sync_dir(disk: &FaultDisk, dir: &Path) -> io::Result<()> {
    let mut st = disk.lock();
    if st.crashed {
        return Err(crashed_error());
    }
    let fail = st.plan.fail_dir_syncs_of;
    if fail.is_some_and(|f| dir.ends_with(f)) {
        return Err(st.injected());
    }
    Ok(())
}

impl IoBackend for FaultBackend {
    fn buffered_io(&self) -> bool {
        self.disk.lock().plan.direct_io_refused
    }

    fn name(&self) -> &'static str {
        "fault"
    }

    fn open(&mut self, path: &Path, create: bool) -> io::Result<FileHandle> {
        let mut st = self.disk.lock();
        if st.crashed {
            return Err(crashed_error());
        }
        if !st.files.contains_key(path) {
            if !create {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            st.files.insert(path.to_path_buf(), MemFile::default());
        }
        drop(st);
        let slot = self.handles.iter().position(Option::is_none);
        let h = match slot {
            Some(i) => {
                self.handles[i] = Some(path.to_path_buf());
                i
            }
            None => {
                self.handles.push(Some(path.to_path_buf()));
                self.handles.len() - 1
            }
        };
        Ok(FileHandle(h as u32))
    }

    fn write_unit(&self, _file: FileHandle) -> usize {
        self.disk.lock().write_unit
    }

    fn close(&mut self, file: FileHandle) {
        if let Some(slot) = self.handles.get_mut(file.0 as usize) {
            *slot = None;
        }
    }

    fn allocate(&mut self, file: FileHandle, len: u64) -> io::Result<()> {
        let path = self.path(file)?;
        let mut st = self.disk.lock();
        if st.crashed {
            return Err(crashed_error());
        }
        if st.plan.allocate_unsupported {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let used: u64 = st.files.values().map(|f| f.allocated).sum();
        let cur = st.files.get(&path).map_or(0, |f| f.allocated);
        if let Some(cap) = st.plan.capacity_bytes {
            if len > cur && used + (len - cur) > cap {
                st.faults_injected += 1;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let f = st.files.entry(path).or_default();
        f.allocated = f.allocated.max(len);
        // Allocation extends the file with zeros, durably (like fallocate
        // followed by the directory and file syncs the engine does).
        if (f.data.len() as u64) < len {
            f.data.resize(len as usize, 0);
        }
        if (f.durable.len() as u64) < len {
            f.durable.resize(len as usize, 0);
        }
        Ok(())
    }

    fn read_at(&mut self, file: FileHandle, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        check_aligned(BLOCK_BYTES, offset, buf.len())?;
        let path = self.path(file)?;
        let mut st = self.disk.lock();
        if st.crashed {
            return Err(crashed_error());
        }
        let n = {
            let f = st.files.get(&path).ok_or(io::ErrorKind::NotFound)?;
            let start = (offset as usize).min(f.data.len());
            let n = (f.data.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&f.data[start..start + n]);
            n
        };
        st.bytes_read += n as u64;
        let flip = st.plan.read_flip_per_million;
        if n > 0 && st.chance(flip) {
            let at = st.below(n as u64) as usize;
            let bit = st.below(8) as u8;
            buf[at] ^= 1 << bit;
            st.faults_injected += 1;
        }
        Ok(n)
    }

    fn reads_ahead(&self) -> bool {
        true
    }

    fn read_start(
        &mut self,
        slot: usize,
        file: FileHandle,
        offset: u64,
        mut buf: AlignedBuf,
        len: usize,
    ) -> Result<(), AlignedBuf> {
        if self.ahead.get(slot).is_none_or(Option::is_some) || len > buf.len() {
            return Err(buf);
        }
        let res = self.read_at(file, offset, &mut buf[..len]);
        if let Ok(n) = res {
            self.disk.lock().bytes_read_ahead += n as u64;
        }
        self.ahead[slot] = Some((buf, res));
        Ok(())
    }

    fn read_finish(&mut self, slot: usize) -> Option<(AlignedBuf, io::Result<usize>)> {
        self.ahead.get_mut(slot)?.take()
    }

    fn write_batch(&mut self, writes: &[WriteOp<'_>], sync: &[FileHandle]) -> io::Result<()> {
        for w in writes {
            check_aligned(self.write_unit(w.file), w.offset, w.data.len())?;
            let path = self.path(w.file)?;
            let mut st = self.disk.lock();
            if st.crashed {
                return Err(crashed_error());
            }
            st.writes += 1;
            let nth = st.writes;
            let p = st.plan;
            let fail = p.fail_write_nth == Some(nth)
                || p.fail_writes_to
                    .is_some_and(|s| path.to_string_lossy().contains(s))
                || st.chance(p.write_error_per_million);
            let data: &[u8] = if fail {
                // A failed write may still have reached part of the media.
                let cut = st.below(w.data.len() as u64 + 1) as usize;
                &w.data[..cut]
            } else {
                w.data
            };
            let f = st.files.get_mut(&path).ok_or(io::ErrorKind::NotFound)?;
            apply(&mut f.data, w.offset, data);
            f.unsynced.push((w.offset, data.to_vec()));
            if fail {
                return Err(st.injected());
            }
        }
        for &s in sync {
            self.sync(s)?;
        }
        Ok(())
    }

    fn sync_start(&mut self, files: &[FileHandle]) -> io::Result<()> {
        self.sync_wait()?;
        for &f in files {
            let path = self.path(f)?;
            let st = self.disk.lock();
            if st.crashed {
                return Err(crashed_error());
            }
            let n = st.files.get(&path).map_or(0, |f| f.unsynced.len());
            drop(st);
            self.started.push((path, n));
        }
        if self.disk.lock().plan.background_syncs {
            let done = match &self.done {
                Some(d) => d.clone(),
                None => self.done.insert(Arc::new(super::EventFd::new()?)).clone(),
            };
            done.clear();
            let (disk, group) = (self.disk.clone(), std::mem::take(&mut self.started));
            self.background = Some(std::thread::spawn(move || {
                let res = group
                    .iter()
                    .try_for_each(|(path, n)| flush(&disk, path, Some(*n)));
                done.signal();
                res
            }));
        }
        Ok(())
    }

    fn sync_wait(&mut self) -> io::Result<()> {
        if let Some(t) = self.background.take() {
            t.join()
                .map_err(|_| io::Error::other("sync thread panicked"))??;
        }
        for (path, n) in std::mem::take(&mut self.started) {
            self.flush(&path, Some(n))?;
        }
        Ok(())
    }

    fn sync_poll(&mut self) -> Option<io::Result<()>> {
        if self.background.as_ref().is_some_and(|t| !t.is_finished()) {
            return None;
        }
        Some(self.sync_wait())
    }

    fn sync_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.background.as_ref()?;
        self.done.as_ref().map(|d| d.as_raw_fd())
    }

    fn sync(&mut self, file: FileHandle) -> io::Result<()> {
        let path = self.path(file)?;
        self.flush(&path, None)
    }

    fn detached_sync(&self, file: FileHandle) -> io::Result<Option<super::DetachedSync>> {
        let (disk, path) = (self.disk.clone(), self.path(file)?);
        Ok(Some(Box::new(move || flush(&disk, &path, None))))
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        sync_dir(&self.disk, dir)
    }

    fn detached_sync_dir(&self) -> super::DetachedSyncDir {
        let disk = self.disk.clone();
        Box::new(move |dir| sync_dir(&disk, dir))
    }

    /// Atomic and durable at once (a simplification: a real rename needs
    /// the directory fsync the engine does right after).
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.disk.lock();
        if st.crashed {
            return Err(crashed_error());
        }
        let f = st
            .files
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        st.files.insert(to.to_path_buf(), f);
        drop(st);
        for h in self.handles.iter_mut().flatten() {
            if h == from {
                *h = to.to_path_buf();
            }
        }
        Ok(())
    }

    /// Atomic and durable at once, as `rename`.
    fn exchange(&mut self, a: &Path, b: &Path) -> io::Result<()> {
        let mut st = self.disk.lock();
        if st.crashed {
            return Err(crashed_error());
        }
        if !(st.files.contains_key(a) && st.files.contains_key(b)) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let fa = st.files.remove(a).expect("present");
        let fb = st.files.insert(b.to_path_buf(), fa).expect("present");
        st.files.insert(a.to_path_buf(), fb);
        drop(st);
        for h in self.handles.iter_mut().flatten() {
            if h == a {
                *h = b.to_path_buf();
            } else if h == b {
                *h = a.to_path_buf();
            }
        }
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        let mut st = self.disk.lock();
        if st.crashed {
            return Err(crashed_error());
        }
        st.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::conformance;

    /// Background reads behave as on real files, and take their bytes at
    /// `read_start`: a write that lands before `read_finish` is not in
    /// them, the stalest a kernel could be (the engine must not use them).
    #[test]
    fn read_ahead_conforms_and_reads_at_start() {
        let dir = conformance::scratch_dir();
        let mut b = FaultBackend::new(FaultDisk::new(3, FaultPlan::default()));
        conformance::read_ahead_reads_what_read_at_reads(&mut b, dir.path());

        let f = b.open(&dir.path().join("stale.seg"), true).expect("open");
        let mut old = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        old.fill(1);
        b.write_batch(
            &[WriteOp {
                file: f,
                offset: 0,
                data: &old,
            }],
            &[],
        )
        .expect("write");
        let buf = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        b.read_start(0, f, 0, buf, BLOCK_BYTES).expect("started");
        let mut new = AlignedBuf::new(BLOCK_BYTES).expect("aligned");
        new.fill(2);
        b.write_batch(
            &[WriteOp {
                file: f,
                offset: 0,
                data: &new,
            }],
            &[],
        )
        .expect("write");
        let (buf, res) = b.read_finish(0).expect("outstanding");
        assert_eq!(res.expect("read"), BLOCK_BYTES);
        assert!(buf.iter().all(|&x| x == 1), "read at start");
    }
}
