//! Storage engine benchmark (harness = false): durable append throughput
//! beside the raw O_DIRECT write bandwidth of the same disk, and write
//! amplification of small interval-synced appends.
//!
//! `cargo bench --bench storage` (SKIFF_BENCH_QUICK=1 for a short smoke run;
//! SKIFF_BENCH_DIR to measure another disk; SKIFF_BENCH_ONLY=1024x256 or
//! 100x16@1000,... for only those append rows and nothing after them, with
//! `recovery` in the list for the recovery and replay figures too;
//! SKIFF_BENCH_BACKEND=pwrite to leave io_uring out; SKIFF_BENCH_AB=1 for
//! the interleaved A/B of io_uring and pwrite, each with and without
//! `pipelined_fsync`, and of pipelined io_uring without the sync hold). Each figure is the median of three runs,
//! min and max kept (see "How we measure" in docs/performance.md).

use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::bufpool::BatchPool;
use skiff::storage::io::pwrite::PwriteBackend;
use skiff::storage::io::raw_bandwidth::{self, Prepare};
use skiff::storage::io::{AlignedBuf, IoBackend, WriteOp};
use skiff::storage::{
    CheckedBatch, Durability, OverflowPolicy, PartitionConfig, PartitionId, Storage, StorageConfig,
    Wake,
};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

/// The backend the engine runs on in this bench.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// skiff's default where the kernel allows it.
    Uring,
    /// With `pipelined_fsync`.
    UringPipelined,
    /// With `pipelined_fsync` and `sync_hold_max` zero: the A/B for group
    /// formation.
    UringNoHold,
    Pwrite,
    PwritePipelined,
}

/// Set once in `main` (`SKIFF_BENCH_BACKEND`), switched by the A/B.
static KIND: std::sync::Mutex<Kind> = std::sync::Mutex::new(Kind::Pwrite);

fn set_kind(kind: Kind) {
    *KIND.lock().unwrap() = kind;
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Uring => "io_uring",
        Kind::UringPipelined => "io_uring-pipelined",
        Kind::UringNoHold => "io_uring-pipelined-no-hold",
        Kind::Pwrite => "pwrite",
        Kind::PwritePipelined => "pwrite-pipelined",
    }
}

#[cfg(target_os = "linux")]
fn uring() -> std::io::Result<Box<dyn IoBackend>> {
    use skiff::storage::io::{uring::UringBackend, URING_ENTRIES};
    Ok(Box::new(UringBackend::new(URING_ENTRIES)?))
}

#[cfg(not(target_os = "linux"))]
fn uring() -> std::io::Result<Box<dyn IoBackend>> {
    Err(std::io::ErrorKind::Unsupported.into())
}

fn backend() -> Box<dyn IoBackend> {
    match *KIND.lock().unwrap() {
        Kind::Uring | Kind::UringPipelined | Kind::UringNoHold => {
            uring().expect("io_uring was available at start")
        }
        Kind::Pwrite | Kind::PwritePipelined => Box::new(PwriteBackend::new()),
    }
}

/// `SKIFF_BENCH_BACKEND=pwrite|io_uring`; by default io_uring where the
/// kernel allows it, as skiff itself picks.
fn pick_kind() -> Kind {
    match std::env::var("SKIFF_BENCH_BACKEND").as_deref() {
        Ok("pwrite") => Kind::Pwrite,
        Ok("io_uring") => {
            uring().expect("SKIFF_BENCH_BACKEND=io_uring but io_uring is unavailable");
            Kind::Uring
        }
        _ => match uring() {
            Ok(_) => Kind::Uring,
            Err(e) => {
                println!("io_uring unavailable ({e}): benchmarking pwrite");
                Kind::Pwrite
            }
        },
    }
}
const RUNS: usize = 3;
/// Workload P (docs/performance.md): at most 1,000 records un-acknowledged in flight.
const IN_FLIGHT_RECORDS_MAX: usize = 1000;

struct Params {
    raw_total_bytes: u64,
    /// The raw measurement taken before each throughput run.
    raw_paired_bytes: u64,
    run_time: Duration,
    ring_segments: u32,
    segment_bytes: u64,
    wa_rate_per_s: u64,
    wa_time: Duration,
}

fn params() -> Params {
    if std::env::var_os("SKIFF_BENCH_QUICK").is_some() {
        Params {
            raw_total_bytes: 64 * MIB,
            raw_paired_bytes: 32 * MIB,
            run_time: Duration::from_millis(300),
            ring_segments: 4,
            segment_bytes: 16 * MIB,
            wa_rate_per_s: 10_000,
            wa_time: Duration::from_millis(500),
        }
    } else {
        Params {
            raw_total_bytes: 1024 * MIB,
            raw_paired_bytes: 256 * MIB,
            run_time: Duration::from_millis(1500),
            ring_segments: 4,
            segment_bytes: 64 * MIB,
            wa_rate_per_s: 10_000,
            wa_time: Duration::from_secs(3),
        }
    }
}

fn dev_flushes(dir: &Path) -> u64 {
    raw_bandwidth::device_flushes(dir).unwrap_or(0)
}

fn dev_write_bytes(dir: &Path) -> u64 {
    raw_bandwidth::device_write_bytes(dir).unwrap_or(0)
}

/// Raw sequential O_DIRECT write bandwidth as docs/performance.md asks for it
/// (`storage::io::raw_bandwidth`: 1 MiB writes, 4 in flight, a fresh
/// preallocated file, the closing fdatasync timed) and, beside it, the
/// same over blocks written once already: the device's overwrite speed,
/// which is what the engine's pre-written segments see.
#[derive(Clone, Copy)]
struct Raw {
    fresh: f64,
    overwrite: f64,
}

fn raw(dir: &Path, total: u64) -> Raw {
    let bw = |prep| {
        raw_bandwidth::measure_prepared(dir, total, prep)
            .expect("raw bandwidth")
            .bytes_per_sec
    };
    Raw {
        fresh: bw(Prepare::Fallocate),
        overwrite: bw(Prepare::PreWritten),
    }
}

/// What the file system itself writes per fdatasync that follows a small
/// O_DIRECT write, at the write-amplification run's cadence: one write
/// unit, fdatasync, every `period`. On no-journal ext4 (this dev VM) a
/// write that moves the file's mtime to a new clock tick makes the next
/// fdatasync write the inode's block too; skiff cannot avoid it.
fn fs_bytes_per_fdatasync(dir: &Path, period: Duration) -> f64 {
    const ROUNDS: u64 = 500;
    let path = dir.join("fs-probe.tmp");
    let mut io = PwriteBackend::new();
    let f = io.open(&path, true).expect("open probe file");
    let unit = io.write_unit(f);
    io.allocate(f, 1 << 20).expect("fallocate probe file");
    let buf = AlignedBuf::new(1 << 20).expect("buffer");
    let fill = WriteOp {
        file: f,
        offset: 0,
        data: &buf[..],
    };
    io.write_batch(&[fill], &[f]).expect("probe pre-write");
    let d = std::fs::File::open(dir).expect("bench dir");
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open.
    unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&d)) };
    let dev0 = dev_write_bytes(dir);
    let t = Instant::now();
    for i in 0..ROUNDS {
        let op = WriteOp {
            file: f,
            offset: i * unit as u64 % (1 << 20),
            data: &buf[..unit],
        };
        io.write_batch(&[op], &[f]).expect("probe write");
        if let Some(wait) = (t + period * (i as u32 + 1)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let extra = (dev_write_bytes(dir) - dev0).saturating_sub(ROUNDS * unit as u64);
    io.close(f);
    let _ = std::fs::remove_file(&path);
    extra as f64 / ROUNDS as f64
}

fn make_batches(records: usize, value_bytes: usize) -> Vec<Vec<u8>> {
    let mut b = BatchBuilder::new();
    (0..16)
        .map(|k| {
            for i in 0..records {
                let v: Vec<u8> = (0..value_bytes).map(|j| (k + i + j) as u8).collect();
                b.push(1_700_000_000_000 + i as i64, None, &v, &[]);
            }
            b.finish(ProducerStamp::NONE)
        })
        .collect()
}

struct Run {
    records_per_s: f64,
    value_bytes_per_s: f64,
    log_bytes_per_s: f64,
    fsyncs: u64,
    flushes: u64,
    device_bytes: u64,
    payload: u64,
    wa_engine: f64,
    /// Mean duration of one write+fdatasync submission.
    commit_us: f64,
    /// Raw bandwidth measured right before the run (zero where not paired).
    raw_before: Raw,
}

fn open(dir: &Path, prewrite: bool) -> Storage {
    let _ = std::fs::remove_dir_all(dir);
    let kind = *KIND.lock().unwrap();
    Storage::open_with_backend(
        StorageConfig {
            data_dir: dir.to_path_buf(),
            prewrite_segments: prewrite,
            sync_hold_max: if kind == Kind::UringNoHold {
                Duration::ZERO
            } else {
                StorageConfig::default().sync_hold_max
            },
            pipelined_fsync: matches!(
                kind,
                Kind::UringPipelined | Kind::UringNoHold | Kind::PwritePipelined
            ),
            ..StorageConfig::default()
        },
        backend(),
    )
    .expect("open storage")
}

/// Creates the partition and, when segments are pre-written, waits for the
/// background pass to finish, so it does not compete with the timed part.
fn create(s: &Storage, dir: &Path, id: &PartitionId, cfg: PartitionConfig, prewrite: bool) {
    let before = s.stats().device_bytes_written;
    let ring = cfg.ring_bytes();
    smol::block_on(s.create_partition(id.clone(), cfg)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while prewrite && s.stats().device_bytes_written - before < ring && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The file system's own writeback from setup (freeing the last run's
    // ring, allocating this one) must not land in the measured window.
    let d = std::fs::File::open(dir).expect("data dir");
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open.
    let rc = unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&d)) };
    assert_eq!(rc, 0, "syncfs: {}", std::io::Error::last_os_error());
}

fn ring(p: &Params, durability: Durability) -> PartitionConfig {
    PartitionConfig {
        segment_bytes: p.segment_bytes,
        segments: p.ring_segments,
        retention_ms: None,
        durability,
        overflow: OverflowPolicy::Overwrite,
    }
}

/// Closed loop: keeps up to 1,000 records in flight until the time is up
/// or the ring would wrap (so fallocate-only runs stay on fresh extents).
fn throughput_run(
    p: &Params,
    dir: &Path,
    prewrite: bool,
    records: usize,
    value: usize,
    in_flight_records: usize,
) -> Run {
    let s = open(dir, prewrite);
    let id = PartitionId::new("bench", 0);
    create(&s, dir, &id, ring(p, Durability::Always), prewrite);
    let batches = make_batches(records, value);
    let in_flight = (in_flight_records / records).max(1);
    let budget = p.segment_bytes * u64::from(p.ring_segments - 1);
    let before = s.stats();
    let flushes0 = dev_flushes(dir);
    let t = Instant::now();
    let (n, bytes) = smol::block_on(async {
        let mut q = VecDeque::new();
        let (mut n, mut bytes, mut i) = (0u64, 0u64, 0usize);
        // A producer has its next batches built while it waits for room
        // (the copies are made while the storage thread works, not between
        // an ack and the submit that answers it), and hands over together
        // all it has room for, as a client sends them in one request.
        let mut built = VecDeque::with_capacity(in_flight);
        // In buffers that go back to their pool once the engine has copied
        // them, as the server copies produce batches out of their frames.
        let pool = BatchPool::new(8, s.max_batch_bytes());
        let mut build = |built: &mut VecDeque<CheckedBatch>| {
            while built.len() < in_flight {
                let b = &batches[i % batches.len()];
                built.push_back(CheckedBatch::check(pool.copy(b)).expect("check"));
                i += 1;
            }
        };
        build(&mut built);
        while t.elapsed() < p.run_time && bytes < budget {
            // Handed over together, with one wake-up: one group.
            for b in built.drain(..in_flight - q.len()) {
                bytes += b.bytes().len() as u64;
                q.push_back(s.submit(&id, b, Wake::Later).await.expect("submit"));
            }
            s.wake();
            build(&mut built);
            q.pop_front().unwrap().await.expect("append");
            n += 1;
            // And every other ack already in, so their room is refilled in
            // one go.
            while let Some(front) = q.front_mut() {
                match futures_lite::future::poll_once(front).await {
                    Some(r) => {
                        r.expect("append");
                        q.pop_front();
                        n += 1;
                    }
                    None => break,
                }
            }
        }
        while let Some(t) = q.pop_front() {
            t.await.expect("append");
            n += 1;
        }
        (n, bytes)
    });
    let el = t.elapsed().as_secs_f64();
    let after = s.stats();
    let flushes = dev_flushes(dir) - flushes0;
    s.shutdown().unwrap();
    let recs = n * records as u64;
    Run {
        records_per_s: recs as f64 / el,
        value_bytes_per_s: (recs * value as u64) as f64 / el,
        log_bytes_per_s: bytes as f64 / el,
        fsyncs: after.fsyncs - before.fsyncs,
        flushes,
        device_bytes: after.device_bytes_written - before.device_bytes_written,
        payload: recs * value as u64,
        wa_engine: 0.0,
        commit_us: commit_us(&before, &after),
        raw_before: Raw {
            fresh: 0.0,
            overwrite: 0.0,
        },
    }
}

/// Open loop: single-record appends of `value` bytes at a fixed rate under
/// interval:2, measuring bytes written per payload byte.
fn wa_run(p: &Params, dir: &Path, value: usize, interval_ms: u32) -> Run {
    let s = open(dir, true);
    let id = PartitionId::new("wa", 0);
    create(
        &s,
        dir,
        &id,
        ring(p, Durability::IntervalMs(interval_ms)),
        true,
    );
    let batches = make_batches(1, value);
    let total = p.wa_rate_per_s * p.wa_time.as_millis() as u64 / 1000;
    let interval = Duration::from_nanos(1_000_000_000 / p.wa_rate_per_s);
    let before = s.stats();
    let dev0 = dev_write_bytes(dir);
    let flushes0 = dev_flushes(dir);
    let t = Instant::now();
    let log_bytes = smol::block_on(async {
        let mut tickets = VecDeque::new();
        let mut bytes = 0u64;
        for k in 0..total {
            let due = t + interval * k as u32;
            if due > Instant::now() + Duration::from_millis(1) {
                smol::Timer::at(due).await;
            }
            let b = batches[k as usize % batches.len()].clone();
            bytes += b.len() as u64;
            let b = CheckedBatch::check(b).expect("check");
            tickets.push_back(s.submit(&id, b, Wake::Now).await.expect("submit"));
            while tickets.len() > 2000 {
                tickets.pop_front().unwrap().await.expect("append");
            }
        }
        for t in tickets {
            t.await.expect("append");
        }
        bytes
    });
    let el = t.elapsed().as_secs_f64();
    let after = s.stats();
    let dev = dev_write_bytes(dir) - dev0;
    let flushes = dev_flushes(dir) - flushes0;
    s.shutdown().unwrap();
    let payload = total * value as u64;
    Run {
        records_per_s: total as f64 / el,
        value_bytes_per_s: payload as f64 / el,
        log_bytes_per_s: log_bytes as f64 / el,
        fsyncs: after.fsyncs - before.fsyncs,
        flushes,
        device_bytes: dev,
        payload,
        wa_engine: (after.device_bytes_written - before.device_bytes_written) as f64
            / payload as f64,
        commit_us: commit_us(&before, &after),
        raw_before: Raw {
            fresh: 0.0,
            overwrite: 0.0,
        },
    }
}

fn commit_us(before: &skiff::storage::StorageStats, after: &skiff::storage::StorageStats) -> f64 {
    (after.fsync_latency_us_sum - before.fsync_latency_us_sum) as f64
        / (after.fsync_latency_count - before.fsync_latency_count).max(1) as f64
}

/// Median, min, max of a metric over runs.
fn mmm<T>(runs: &[T], f: impl Fn(&T) -> f64) -> (f64, f64, f64) {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn mb(x: f64) -> f64 {
    x / 1e6
}

fn main() {
    let p = params();
    let base = std::env::var_os("SKIFF_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("storage-bench"));
    std::fs::create_dir_all(&base).unwrap();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kind = pick_kind();
    set_kind(kind);
    println!(
        "storage bench: dir {} kernel {} backend {}, {} runs (median [min..max])",
        base.display(),
        kernel.trim(),
        kind_name(kind),
        RUNS
    );

    let raws: Vec<Raw> = (0..RUNS).map(|_| raw(&base, p.raw_total_bytes)).collect();
    let (fresh, fmin, fmax) = mmm(&raws, |r| r.fresh);
    let (over, omin, omax) = mmm(&raws, |r| r.overwrite);
    println!(
        "raw O_DIRECT sequential write ({} MiB of 1 MiB writes, {} in flight, fdatasync at end): \
         fresh preallocated file {:.0} MB/s [{:.0}..{:.0}]; over written blocks {:.0} MB/s [{:.0}..{:.0}]",
        p.raw_total_bytes / MIB,
        raw_bandwidth::WRITE_DEPTH,
        mb(fresh),
        mb(fmin),
        mb(fmax),
        mb(over),
        mb(omin),
        mb(omax)
    );
    let raw_med = Raw {
        fresh,
        overwrite: over,
    };

    println!("\nappend throughput, durability always, <= 1000 records in flight:");
    if std::env::var_os("SKIFF_BENCH_AB").is_some() {
        pipelining_ab(&p, &base.join("data"), raw_med, kind);
        return;
    }
    println!(
        "{:>6} {:>6} {:>8} {:>9} {:>13} {:>22} {:>9} {:>10} {:>8} {:>8} {:>9} {:>8}",
        "record",
        "batch",
        "inflight",
        "prewrite",
        "records/s",
        "log MB/s",
        "% of raw",
        "% of over",
        "fsyncs",
        "flushes",
        "commit us",
        "dev/pay"
    );
    println!(
        "(% of raw, of over: each run against {} MiB raw measurements, fresh file and over written blocks, \
         taken just before it, median of the runs; this VM's speed drifts too much over the minutes \
         between a row and the first raw figures)",
        p.raw_paired_bytes / MIB
    );
    let dir = base.join("data");
    let mut configs = Vec::new();
    for value in [100usize, 1024] {
        for records in [1usize, 16, 256] {
            configs.push((value, records, true, IN_FLIGHT_RECORDS_MAX));
        }
    }
    configs.push((100, 1, false, IN_FLIGHT_RECORDS_MAX));
    configs.push((1024, 256, false, IN_FLIGHT_RECORDS_MAX));
    // Beyond the standard workload: skiff's own producer keeps up to 5
    // batches per partition in flight (IDEMPOTENT_IN_FLIGHT_MAX), which for
    // 256-record batches is 1,280 records; and a deeper pipeline still.
    configs.push((1024, 256, true, 5 * 256));
    configs.push((1024, 256, true, 4 * 1024));
    // SKIFF_BENCH_ONLY=1024x256,100x16@1280: just those rows.
    let only = std::env::var("SKIFF_BENCH_ONLY").ok();
    let wanted = |value: usize, records: usize, in_flight: usize| {
        only.as_deref().is_none_or(|o| {
            o.split(',').any(|w| {
                w == format!("{value}x{records}") || w == format!("{value}x{records}@{in_flight}")
            })
        })
    };
    configs.retain(|&(v, r, _, f)| wanted(v, r, f));
    for (value, records, prewrite, in_flight) in configs {
        let runs: Vec<Run> = (0..RUNS)
            .map(|_| {
                let raw = raw(&base, p.raw_paired_bytes);
                let run = throughput_run(&p, &dir, prewrite, records, value, in_flight);
                Run {
                    raw_before: raw,
                    ..run
                }
            })
            .collect();
        let (rps, rmin, rmax) = mmm(&runs, |r| r.records_per_s);
        let (lbs, lmin, lmax) = mmm(&runs, |r| r.log_bytes_per_s);
        let (fs, _, _) = mmm(&runs, |r| r.fsyncs as f64);
        let (fl, _, _) = mmm(&runs, |r| r.flushes as f64);
        let (wa, _, _) = mmm(&runs, |r| r.device_bytes as f64 / r.payload as f64);
        println!(
            "{:>6} {:>6} {:>8} {:>9} {:>13.0} {:>7.1} [{:.1}..{:.1}] {:>8.1}% {:>9.1}% {:>8.0} {:>8.0} {:>9.0} {:>8.2}   ({:.0}..{:.0} rec/s, value {:.1} MB/s)",
            value,
            records,
            in_flight,
            prewrite,
            rps,
            mb(lbs),
            mb(lmin),
            mb(lmax),
            100.0 * mmm(&runs, |r| r.log_bytes_per_s / r.raw_before.fresh).0,
            100.0 * mmm(&runs, |r| r.log_bytes_per_s / r.raw_before.overwrite).0,
            fs,
            fl,
            mmm(&runs, |r| r.commit_us).0,
            wa,
            rmin,
            rmax,
            mb(mmm(&runs, |r| r.value_bytes_per_s).0)
        );
    }

    if let Some(only) = &only {
        if only.split(',').any(|w| w == "recovery") {
            recovery(&p, &dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
        return;
    }
    for interval_ms in [2u32, 10] {
        println!(
            "\nwrite amplification: 100 B single-record appends at {}/s, durability interval:{interval_ms}",
            p.wa_rate_per_s
        );
        let runs: Vec<Run> = (0..RUNS)
            .map(|_| wa_run(&p, &dir, 100, interval_ms))
            .collect();
        let (we, wmin, wmax) = mmm(&runs, |r| r.wa_engine);
        let (wd, dmin, dmax) = mmm(&runs, |r| r.device_bytes as f64 / r.payload as f64);
        let (wl, _, _) = mmm(&runs, |r| {
            r.wa_engine * r.value_bytes_per_s / r.log_bytes_per_s
        });
        println!(
            "  engine bytes written / value bytes: {we:.2} [{wmin:.2}..{wmax:.2}]; per log (batch) byte: {wl:.2}"
        );
        println!(
            "  device bytes written (/sys stat, whole disk: includes the journal and other processes) / value bytes: {wd:.2} [{dmin:.2}..{dmax:.2}]"
        );
        let mean_commit = Duration::from_secs_f64(
            p.wa_time.as_secs_f64() / mmm(&runs, |r| r.fsyncs as f64).0.max(1.0),
        );
        let fs = fs_bytes_per_fdatasync(&dir, mean_commit);
        let (net, _, _) = mmm(&runs, |r| {
            let log_bytes = r.payload as f64 * r.log_bytes_per_s / r.value_bytes_per_s;
            (r.device_bytes as f64 - r.fsyncs as f64 * fs) / log_bytes
        });
        println!(
            "  file system's own writes per fdatasync after a write (probe at one per {:.1} ms): {fs:.0} B; device bytes net of them / log (batch) byte: {net:.2}",
            mean_commit.as_secs_f64() * 1e3
        );
        println!(
            "  achieved {:.0} records/s, mean commit {:.0} us, fsyncs {:.0}, device flushes {:.0}",
            mmm(&runs, |r| r.records_per_s).0,
            mmm(&runs, |r| r.commit_us).0,
            mmm(&runs, |r| r.fsyncs as f64).0,
            mmm(&runs, |r| r.flushes as f64).0
        );
    }
    recovery(&p, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Start-up time with a full ring (every segment scanned, CRCs checked,
/// index rebuilt), after dropping the page cache is not possible here: the
/// segments are O_DIRECT, so reads go to the device anyway.
fn recovery(p: &Params, dir: &Path) {
    let s = open(dir, false);
    let id = PartitionId::new("rec", 0);
    smol::block_on(s.create_partition(id.clone(), ring(p, Durability::Never))).unwrap();
    let batches = make_batches(256, 1024);
    let budget = p.segment_bytes * u64::from(p.ring_segments) * 95 / 100;
    smol::block_on(async {
        let mut q = VecDeque::new();
        let mut bytes = 0u64;
        let mut i = 0;
        while bytes < budget {
            let b = batches[i % batches.len()].clone();
            i += 1;
            bytes += b.len() as u64;
            let b = CheckedBatch::check(b).expect("check");
            q.push_back(s.submit(&id, b, Wake::Now).await.expect("submit"));
            if q.len() > 8 {
                q.pop_front().unwrap().await.expect("append");
            }
        }
        for t in q {
            t.await.expect("append");
        }
    });
    s.shutdown().unwrap();
    drop(s);
    let mut times = Vec::new();
    let mut replay: Vec<(f64, f64)> = Vec::new();
    let mut scanned = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        let s = Storage::open_with_backend(
            StorageConfig {
                data_dir: dir.to_path_buf(),
                ..StorageConfig::default()
            },
            backend(),
        )
        .expect("reopen");
        times.push(t.elapsed().as_secs_f64());
        let o = s.offsets(&id).unwrap();
        scanned = o.high_watermark - o.earliest;
        // Replay: one consumer reads everything from the earliest offset.
        let t = Instant::now();
        let mut at = o.earliest;
        let mut bytes = 0u64;
        while at < o.high_watermark {
            let got = smol::block_on(s.read(&id, at, 1 << 20)).expect("read");
            bytes += got.len() as u64;
            for b in skiff::batch::BatchIter::new(&got) {
                at = b.expect("valid batch").header.next_offset();
            }
        }
        replay.push((
            bytes as f64 / t.elapsed().as_secs_f64(),
            scanned as f64 / t.elapsed().as_secs_f64(),
        ));
        s.shutdown().unwrap();
    }
    replay.sort_by(|a, b| a.0.total_cmp(&b.0));
    times.sort_by(|a, b| a.total_cmp(b));
    let ring_bytes = p.segment_bytes * u64::from(p.ring_segments);
    println!(
        "\nrecovery (open) of a {} MiB ring, {} records of 1 KiB: {:.0} ms [{:.0}..{:.0}] = {:.2} s per GiB",
        ring_bytes / MIB,
        scanned,
        times[RUNS / 2] * 1e3,
        times[0] * 1e3,
        times[RUNS - 1] * 1e3,
        times[RUNS / 2] / (ring_bytes as f64 / (1024.0 * MIB as f64))
    );
    println!(
        "replay (1 MiB fetches from earliest, from the device): {:.0} MB/s [{:.0}..{:.0}], {:.0} records/s",
        mb(replay[RUNS / 2].0),
        mb(replay[0].0),
        mb(replay[RUNS - 1].0),
        replay[RUNS / 2].1
    );
}

/// io_uring (when picked) and pwrite, each with the storage thread's own
/// fdatasync (the default) and pipelined (`pipelined_fsync`), and io_uring
/// pipelined without the sync hold; runs interleaved (A B C A B C ..) so
/// drift in the machine's load hits all alike.
fn pipelining_ab(p: &Params, dir: &Path, raw: Raw, kind: Kind) {
    println!("\nio_uring vs pwrite, inline vs pipelined fdatasync, sync hold or not (always, <= 1000 in flight, prewrite):");
    let kinds: Vec<Kind> = [
        Kind::Uring,
        Kind::UringPipelined,
        Kind::UringNoHold,
        Kind::Pwrite,
        Kind::PwritePipelined,
    ]
    .into_iter()
    .filter(|&k| {
        !matches!(k, Kind::Uring | Kind::UringPipelined | Kind::UringNoHold) || kind == Kind::Uring
    })
    .collect();
    for (value, records) in [(1024usize, 256usize), (1024, 16), (100, 16), (100, 1)] {
        let mut runs: Vec<Vec<Run>> = kinds.iter().map(|_| Vec::new()).collect();
        for _ in 0..RUNS {
            for (k, out) in kinds.iter().zip(runs.iter_mut()) {
                set_kind(*k);
                out.push(throughput_run(
                    p,
                    dir,
                    true,
                    records,
                    value,
                    IN_FLIGHT_RECORDS_MAX,
                ));
            }
        }
        set_kind(kind);
        for (k, runs) in kinds.iter().zip(&runs) {
            let (l, lmin, lmax) = mmm(runs, |r| r.log_bytes_per_s);
            println!(
                "  {value:>5} B x {records:>3} {:>18}: {:>9.0} records/s, {:>6.1} MB/s [{:.1}..{:.1}] = {:>5.1}% of raw ({:>5.1}% of over), commit {:>5.0} us, fsyncs {:>5.0}, flushes {:>5.0}",
                kind_name(*k),
                mmm(runs, |r| r.records_per_s).0,
                mb(l),
                mb(lmin),
                mb(lmax),
                100.0 * l / raw.fresh,
                100.0 * l / raw.overwrite,
                mmm(runs, |r| r.commit_us).0,
                mmm(runs, |r| r.fsyncs as f64).0,
                mmm(runs, |r| r.flushes as f64).0
            );
        }
    }
}
