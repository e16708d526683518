//! The raw sequential O_DIRECT write and read bandwidth of a disk, and its
//! block counters: the yardsticks `skiff bench` and the storage benches
//! print beside their results (see BENCHMARKING.md).
//!
//! The measurement: one preallocated file, 1 MiB writes, 4 in flight
//! (io_uring; plain `pwrite` one at a time where io_uring is unavailable),
//! an fdatasync at the end included in the time; then the file read back
//! with 1 MiB O_DIRECT reads, one at a time, as a replaying reader reads
//! (its read-ahead keeps one window in flight); the file removed
//! afterwards.

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::aligned::AlignedBuf;
use super::BLOCK_BYTES;

/// Size of one write.
pub const WRITE_BYTES: usize = 1 << 20;
/// Writes kept in flight.
pub const WRITE_DEPTH: usize = 4;
/// Amount BENCHMARKING.md asks for.
pub const DEFAULT_TOTAL_BYTES: u64 = 1 << 30;

/// The `stat` file counts sectors of 512 bytes whatever the device's block
/// size (Documentation/block/stat.rst).
const STAT_SECTOR_BYTES: u64 = 512;
/// 0-based field indexes in `/sys/class/block/<dev>/stat`.
const STAT_READ_SECTORS_FIELD: usize = 2;
const STAT_WRITE_SECTORS_FIELD: usize = 6;
const STAT_FLUSHES_FIELD: usize = 15;

const _: () = assert!(WRITE_BYTES % BLOCK_BYTES == 0);

/// How the file is prepared before the timed writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// fallocate only: the extents exist but are "unwritten", so each first
    /// write also converts them (metadata, journaled at fdatasync).
    Fallocate,
    /// fallocate, then one untimed pass of zeros and an fdatasync: the
    /// timed pass is a plain overwrite.
    PreWritten,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RawBandwidth {
    /// "io_uring" or "pwrite".
    pub backend: &'static str,
    pub total_bytes: u64,
    /// Writes plus the final fdatasync.
    pub elapsed: Duration,
    pub bytes_per_sec: f64,
    /// Flushes the device completed during the timed part (None where the
    /// counter is unavailable: no block device, old kernel).
    pub device_flushes: Option<u64>,
    /// Bytes the device wrote during the timed part.
    pub device_write_bytes: Option<u64>,
    /// Reading the written file back, sequentially, one 1 MiB O_DIRECT
    /// read at a time: what a replay from the disk can get at most.
    pub read_elapsed: Duration,
    pub read_bytes_per_sec: f64,
    /// Bytes the device read during the timed read (O_DIRECT bypasses the
    /// page cache, so at least the file's size).
    pub device_read_bytes: Option<u64>,
}

/// Measures with the default preparation ([`Prepare::Fallocate`]: a
/// preallocated file, as BENCHMARKING.md describes).
pub fn measure(dir: &Path, total_bytes: u64) -> io::Result<RawBandwidth> {
    measure_prepared(dir, total_bytes, Prepare::Fallocate)
}

/// Measures writing `total_bytes` (rounded down to whole writes, at least
/// one) into a fresh file under `dir`, prepared as `prepare` says.
pub fn measure_prepared(
    dir: &Path,
    total_bytes: u64,
    prepare: Prepare,
) -> io::Result<RawBandwidth> {
    let total_bytes = (total_bytes / WRITE_BYTES as u64).max(1) * WRITE_BYTES as u64;
    let file = ScratchFile::new(dir)?;
    let mut data = AlignedBuf::new(WRITE_BYTES).map_err(io::Error::other)?;
    fill_pattern(&mut data);
    let mut writer = Writer::open(&file.path)?;
    writer.allocate(total_bytes)?;
    if prepare == Prepare::PreWritten {
        let zeros = AlignedBuf::new(WRITE_BYTES).map_err(io::Error::other)?;
        writer.write_all(&zeros, total_bytes)?;
        writer.sync()?;
    }

    let flushes_before = device_flushes(dir);
    let bytes_before = device_write_bytes(dir);
    let started = Instant::now();
    writer.write_all(&data, total_bytes)?;
    writer.sync()?;
    let elapsed = started.elapsed();
    let flushes_after = device_flushes(dir);
    let bytes_after = device_write_bytes(dir);
    let backend = writer.name();
    drop(writer);

    let read_before = device_read_bytes(dir);
    let read_started = Instant::now();
    read_all(&file.path, &mut data, total_bytes)?;
    let read_elapsed = read_started.elapsed();
    let read_after = device_read_bytes(dir);

    Ok(RawBandwidth {
        backend,
        total_bytes,
        elapsed,
        bytes_per_sec: total_bytes as f64 / elapsed.as_secs_f64().max(1e-9),
        device_flushes: delta(flushes_before, flushes_after),
        device_write_bytes: delta(bytes_before, bytes_after),
        read_elapsed,
        read_bytes_per_sec: total_bytes as f64 / read_elapsed.as_secs_f64().max(1e-9),
        device_read_bytes: delta(read_before, read_after),
    })
}

/// Durable windows at a producer's depth: what one whose every ack waits
/// for an fdatasync, with `window` bytes in flight, can get from this disk
/// at most. Each window is written over blocks written once already (as
/// skiff's pre-written segments are), in one O_DIRECT write, and flushed
/// before the next begins.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRun {
    /// The window, rounded up to whole blocks.
    pub window_bytes: usize,
    pub windows: u64,
    pub elapsed: Duration,
    pub bytes_per_sec: f64,
    pub device_flushes: Option<u64>,
}

/// The region the windows go round, at most: a ring of segments written
/// long before, as skiff's are. Writing a whole gigabyte first and then
/// over it at once measured the device still writing back the first pass
/// (fdatasyncs of 2 ms instead of 0.1 here).
const WINDOW_REGION_BYTES: u64 = 64 << 20;

/// Writes and flushes `window`-byte windows one at a time, round a
/// pre-written region, until about `total_bytes` (at least one window)
/// under `dir`; one untimed pass round the region first.
pub fn measure_windows(dir: &Path, total_bytes: u64, window: usize) -> io::Result<WindowRun> {
    let window_bytes = window.max(1).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
    let windows = (total_bytes / window_bytes as u64).max(1);
    let slots = (WINDOW_REGION_BYTES / window_bytes as u64).clamp(1, windows);
    let scratch = ScratchFile::new(dir)?;
    let f = pre_written(&scratch.path, slots * window_bytes as u64)?;
    let mut data = AlignedBuf::new(window_bytes).map_err(io::Error::other)?;
    fill_pattern(&mut data);
    let write = |w: u64| -> io::Result<()> {
        f.write_all_at(&data, (w % slots) * window_bytes as u64)?;
        f.sync_data()
    };
    for w in 0..slots {
        write(w)?;
    }
    let flushes_before = device_flushes(dir);
    let started = Instant::now();
    for w in 0..windows {
        write(w)?;
    }
    let elapsed = started.elapsed();
    let flushes_after = device_flushes(dir);
    Ok(WindowRun {
        window_bytes,
        windows,
        elapsed,
        bytes_per_sec: (windows * window_bytes as u64) as f64 / elapsed.as_secs_f64().max(1e-9),
        device_flushes: delta(flushes_before, flushes_after),
    })
}

/// How far a device counter moved, where it could be read both times.
fn delta(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    before.zip(after).map(|(b, a)| a.saturating_sub(b))
}

/// Not zeros: keeps devices that compress or dedupe zero blocks honest.
fn fill_pattern(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
    }
}

/// `path` allocated to `bytes`, written once and flushed (untimed), then
/// opened for positional O_DIRECT writes: one write in flight is what the
/// callers measure, and io_uring would only add its own wait.
fn pre_written(path: &Path, bytes: u64) -> io::Result<fs::File> {
    let mut writer = Writer::open(path)?;
    writer.allocate(bytes)?;
    let zeros = AlignedBuf::new(WRITE_BYTES).map_err(io::Error::other)?;
    writer.write_all(&zeros, bytes)?;
    writer.sync()?;
    drop(writer);
    #[cfg(target_os = "linux")]
    let f: fs::File = super::uring::open_direct(path, false)?.into();
    #[cfg(not(target_os = "linux"))]
    let f = fs::OpenOptions::new().write(true).open(path)?;
    Ok(f)
}

/// Reads `path` from its start, `buf.len()` bytes at a time with O_DIRECT,
/// until `total_bytes`.
fn read_all(path: &Path, buf: &mut [u8], total_bytes: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let f: fs::File = super::uring::open_direct(path, false)?.into();
    #[cfg(not(target_os = "linux"))]
    let f = fs::File::open(path)?;
    let mut offset = 0;
    while offset < total_bytes {
        let len = buf.len().min((total_bytes - offset) as usize);
        f.read_exact_at(&mut buf[..len], offset)?;
        offset += len as u64;
    }
    Ok(())
}

/// Bytes each [`sync_latencies`] step writes: one block, as a small
/// append's tail write.
pub const SYNC_WRITE_BYTES: usize = BLOCK_BYTES;
/// The pre-written region [`sync_latencies`] cycles through.
const SYNC_REGION_BYTES: u64 = 1 << 20;

/// What [`sync_latencies`] measured.
#[derive(Debug)]
pub struct SyncRun {
    /// Each step's write and fdatasync, timed together.
    pub times: Vec<Duration>,
    /// The measuring thread's CPU (user + system) over all the steps and,
    /// when paced, the sleeps between them; None where the platform does not
    /// count a thread's own.
    pub cpu: Option<Duration>,
    /// The times the thread went to sleep over the same span.
    pub voluntary_switches: Option<u64>,
}

/// The device's own durable-write latency, outside skiff: `count` steps,
/// each one block written with O_DIRECT over blocks written before (as a
/// segment's tail is) followed by an fdatasync, timed together. What an
/// ack waits for at least; docs/performance.md puts its p99 beside ack
/// p99s.
///
/// With `per_second`, the steps are spaced out to that many a second and
/// the thread sleeps between them, as a lightly loaded broker does between
/// records. Its CPU per step is then the floor under a broker's CPU per
/// record at that rate: on a VM, waking from idle costs several times the
/// write and flush themselves (docs/performance.md, "A light load").
pub fn sync_latencies(dir: &Path, count: usize, per_second: Option<u64>) -> io::Result<SyncRun> {
    let file = ScratchFile::new(dir)?;
    let f = pre_written(&file.path, SYNC_REGION_BYTES)?;
    let mut block = AlignedBuf::new(SYNC_WRITE_BYTES).map_err(io::Error::other)?;
    let blocks = SYNC_REGION_BYTES / SYNC_WRITE_BYTES as u64;
    let mut times = Vec::with_capacity(count);
    let before = thread_usage();
    let start = Instant::now();
    for i in 0..count {
        if let Some(rate) = per_second.filter(|&r| r > 0) {
            // Due times from the start, so a slow step does not shift the rest.
            let due =
                start + Duration::from_nanos((i as u128 * 1_000_000_000 / rate as u128) as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        block[0] = i as u8;
        let started = Instant::now();
        f.write_all_at(&block, (i as u64 % blocks) * SYNC_WRITE_BYTES as u64)?;
        f.sync_data()?;
        times.push(started.elapsed());
    }
    let after = thread_usage();
    let (cpu, voluntary_switches) = match (before, after) {
        (Some(b), Some(a)) => (Some(a.0.saturating_sub(b.0)), Some(a.1.saturating_sub(b.1))),
        _ => (None, None),
    };
    Ok(SyncRun {
        times,
        cpu,
        voluntary_switches,
    })
}

/// This thread's CPU time (user + system) and voluntary context switches.
#[cfg(target_os = "linux")]
fn thread_usage() -> Option<(Duration, u64)> {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given,
    // which points at one, and reads nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, u.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: zeroed is a valid rusage, and the call above succeeded.
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some((tv(u.ru_utime) + tv(u.ru_stime), u.ru_nvcsw as u64))
}

#[cfg(not(target_os = "linux"))]
fn thread_usage() -> Option<(Duration, u64)> {
    None
}

/// Completed flush requests of the block device holding `dir` (field 16 of
/// its `stat`, Linux 5.5+). None when `dir` is not on a block device
/// (tmpfs, overlay, btrfs subvolumes have anonymous devices) or the kernel
/// does not count flushes.
pub fn device_flushes(dir: &Path) -> Option<u64> {
    stat_field(dir, STAT_FLUSHES_FIELD)
}

/// Bytes written to the block device holding `dir` since boot (field 7,
/// sectors written, x 512). None as for [`device_flushes`].
pub fn device_write_bytes(dir: &Path) -> Option<u64> {
    stat_field(dir, STAT_WRITE_SECTORS_FIELD).map(|sectors| sectors * STAT_SECTOR_BYTES)
}

/// Bytes read from the block device holding `dir` since boot (field 3,
/// sectors read, x 512). None as for [`device_flushes`].
pub fn device_read_bytes(dir: &Path) -> Option<u64> {
    stat_field(dir, STAT_READ_SECTORS_FIELD).map(|sectors| sectors * STAT_SECTOR_BYTES)
}

/// `/sys/dev/block/MAJ:MIN/stat` of the device holding `dir`. For a
/// partition this is the partition's own counter, which the kernel keeps
/// for flushes too.
fn stat_field(dir: &Path, field: usize) -> Option<u64> {
    let dev = fs::metadata(dir).ok()?.dev();
    // glibc's encoding of dev_t (what `major()`/`minor()` compute).
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    let stat = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    stat.split_ascii_whitespace().nth(field)?.parse().ok()
}

/// The measurement file; removed when dropped, also after an error.
struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    fn new(dir: &Path) -> io::Result<ScratchFile> {
        let path = dir.join(format!(".skiff-raw-bandwidth-{}", std::process::id()));
        // A leftover of a killed run would be overwritten; start clean.
        match fs::remove_file(&path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        Ok(ScratchFile { path })
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_file(&self.path) {
            if err.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {err}", self.path.display());
            }
        }
    }
}

/// io_uring where the kernel has it, else positional writes.
enum Writer {
    #[cfg(target_os = "linux")]
    Uring {
        backend: Box<super::uring::UringBackend>,
        file: super::FileHandle,
    },
    Pwrite(fs::File),
}

impl Writer {
    fn open(path: &Path) -> io::Result<Writer> {
        #[cfg(target_os = "linux")]
        {
            use super::IoBackend;
            match super::uring::UringBackend::new(WRITE_DEPTH as u32) {
                Ok(mut backend) => {
                    let file = backend.open(path, true)?;
                    return Ok(Writer::Uring {
                        backend: Box::new(backend),
                        file,
                    });
                }
                Err(err) => log::info!("raw bandwidth: io_uring unavailable ({err}); using pwrite"),
            }
            Ok(Writer::Pwrite(
                super::uring::open_direct(path, true)?.into(),
            ))
        }
        #[cfg(not(target_os = "linux"))]
        {
            Ok(Writer::Pwrite(
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .open(path)?,
            ))
        }
    }

    fn name(&self) -> &'static str {
        match self {
            #[cfg(target_os = "linux")]
            Writer::Uring { .. } => "io_uring",
            Writer::Pwrite(_) => "pwrite",
        }
    }

    fn allocate(&mut self, len: u64) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Writer::Uring { backend, file } => {
                super::IoBackend::allocate(&mut **backend, *file, len)
            }
            #[cfg(target_os = "linux")]
            Writer::Pwrite(f) => {
                use std::os::fd::AsRawFd;
                super::uring::fallocate(f.as_raw_fd(), len)
            }
            #[cfg(not(target_os = "linux"))]
            Writer::Pwrite(f) => f.set_len(len),
        }
    }

    fn write_all(&mut self, data: &[u8], total_bytes: u64) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Writer::Uring { backend, file } => {
                backend.write_sequential(*file, data, 0, total_bytes, WRITE_DEPTH)
            }
            Writer::Pwrite(f) => {
                let mut offset = 0;
                while offset < total_bytes {
                    let len = data.len().min((total_bytes - offset) as usize);
                    f.write_all_at(&data[..len], offset)?;
                    offset += len as u64;
                }
                Ok(())
            }
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Writer::Uring { backend, file } => super::IoBackend::sync(&mut **backend, *file),
            Writer::Pwrite(f) => f.sync_data(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_the_root_disk_are_readable_and_move() {
        let dir = super::super::conformance::scratch_dir();
        let Some(before) = device_write_bytes(dir.path()) else {
            eprintln!(
                "no block device counters for {}; skipped",
                dir.path().display()
            );
            return;
        };
        let run = measure(dir.path(), 8 * WRITE_BYTES as u64).expect("measure");
        eprintln!("raw bandwidth smoke run: {run:?}");
        assert_eq!(run.total_bytes, 8 * WRITE_BYTES as u64);
        assert!(run.bytes_per_sec > 0.0);
        let after = device_write_bytes(dir.path()).expect("counter");
        // Other processes write too, so only a lower bound holds.
        assert!(
            after >= before + run.total_bytes,
            "device bytes {before} -> {after}"
        );
        assert!(run.device_write_bytes.expect("delta") >= run.total_bytes);
        assert!(run.read_bytes_per_sec > 0.0);
        // O_DIRECT: the read came from the device, not the page cache.
        assert!(run.device_read_bytes.expect("delta") >= run.total_bytes);
        if let Some(flushes) = run.device_flushes {
            assert!(
                flushes >= 1,
                "an fdatasync on a write-back cache must flush"
            );
        }
        assert!(
            fs::read_dir(dir.path()).expect("list").next().is_none(),
            "the measurement file must be removed"
        );
    }

    #[test]
    fn durable_windows_are_each_written_and_flushed() {
        let dir = super::super::conformance::scratch_dir();
        let run = measure_windows(dir.path(), 1 << 20, 100_000).expect("measure");
        assert_eq!(run.window_bytes, 102_400, "rounded up to whole blocks");
        assert_eq!(run.windows, 10);
        assert!(run.bytes_per_sec > 0.0);
        if let Some(flushes) = run.device_flushes {
            // Other processes flush too, so only a lower bound holds.
            assert!(flushes >= run.windows, "{flushes} device flushes");
        }
        assert!(
            fs::read_dir(dir.path()).expect("list").next().is_none(),
            "the measurement file must be removed"
        );
    }

    #[test]
    fn no_counters_for_paths_off_block_devices() {
        assert_eq!(device_flushes(Path::new("/proc")), None);
        assert_eq!(device_write_bytes(Path::new("/no/such/dir")), None);
    }

    /// `cargo test --release --lib raw_bandwidth -- --ignored --nocapture`
    /// (SKIFF_BENCH_DIR picks the disk; 1 GiB by default, SKIFF_BENCH_BYTES).
    #[test]
    #[ignore = "measures the disk: slow, run by hand in release mode"]
    fn measure_this_disk() {
        let scratch = super::super::conformance::scratch_dir();
        let dir = std::env::var_os("SKIFF_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| scratch.path().to_path_buf());
        let total: u64 = std::env::var("SKIFF_BENCH_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_TOTAL_BYTES);
        for prepare in [
            Prepare::Fallocate,
            Prepare::PreWritten,
            Prepare::Fallocate,
            Prepare::PreWritten,
        ] {
            let run = measure_prepared(&dir, total, prepare).expect("measure");
            eprintln!(
                "{prepare:?}: {} MiB via {} in {:.3} s = {:.1} MiB/s, device flushes {:?}, \
                 device bytes {:?}; read back at {:.1} MiB/s",
                run.total_bytes >> 20,
                run.backend,
                run.elapsed.as_secs_f64(),
                run.bytes_per_sec / f64::from(1 << 20),
                run.device_flushes,
                run.device_write_bytes,
                run.read_bytes_per_sec / f64::from(1 << 20),
            );
        }
    }
}
