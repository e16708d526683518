//! The slow device of tests/lazy_fs (issue 23's workload S): its model
//! checked here, and `serve`, which `scripts/bench-slow-device` runs to put
//! a broker's data directory on it.

mod common;
// Each test binary uses a part of it.
#[allow(dead_code)]
mod lazy_fs;

use lazy_fs::{LazyFs, SlowDevice};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// The device the tests below measure: 8 MiB/s, flushes of 5 ms. None
/// where FUSE is not available (the mount says why).
fn mount_8_mib_per_s(dir: &std::path::Path) -> Option<LazyFs> {
    let device = SlowDevice {
        write_bytes_per_s: 8 * 1024 * 1024,
        flush_ms: (5, 5),
    };
    LazyFs::mount_slow(&dir.join("base"), &dir.join("mnt"), device)
}

#[test]
fn the_slow_device_takes_its_time_and_counts_what_it_did() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(fs) = mount_8_mib_per_s(dir.path()) else {
        return;
    };
    let path = fs.mountpoint.join("f");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open on the slow device");
    let block = vec![7u8; 64 * 1024];
    let started = Instant::now();
    for _ in 0..16 {
        f.write_all(&block).expect("write");
    }
    f.sync_data().expect("fdatasync");
    f.sync_data().expect("fdatasync");
    let took = started.elapsed();
    let s = fs.device_stats();
    assert_eq!(s.bytes_written, 16 * 64 * 1024);
    assert_eq!(s.flush_us, vec![5000, 5000]);
    // 1 MiB at 8 MiB/s and two flushes: at least 135 ms, however fast the
    // host (a lower bound cannot flake on a busy machine).
    assert!(
        took >= Duration::from_millis(135),
        "1 MiB and two flushes took {took:?}"
    );
    assert!(s.busy_us >= 134_000, "busy {} µs", s.busy_us);
    drop(f);
    assert_eq!(std::fs::read(&path).expect("read back").len(), 1024 * 1024);

    // A directory's fsync is a journal commit on a real file system: the
    // model charges it a flush too.
    let started = Instant::now();
    std::fs::File::open(&fs.mountpoint)
        .expect("open the directory")
        .sync_all()
        .expect("fsync the directory");
    assert!(started.elapsed() >= Duration::from_millis(5));
    assert_eq!(fs.device_stats().flush_us, vec![5000, 5000, 5000]);
}

/// Flushes asked for while one waits in the device's queue, not yet
/// started, are served by it (the block layer's merging of flushes): three
/// files fdatasynced together behind a long write cost one flush.
#[test]
fn flushes_asked_for_together_share_the_one_waiting_in_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(fs) = mount_8_mib_per_s(dir.path()) else {
        return;
    };
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(fs.mountpoint.join(name))
            .expect("open on the slow device")
    };
    let mut small: Vec<std::fs::File> = (0..3).map(|i| open(&format!("s{i}"))).collect();
    for f in &mut small {
        f.write_all(&[1u8; 512]).expect("write");
    }
    let before = fs.device_stats().flush_us.len();
    // 4 MiB at 8 MiB/s: the queue is busy for 500 ms, and the first of the
    // three flushes waits behind it while the others are asked for. (With
    // 2 MiB, 250 ms, the three threads once came too late on a loaded
    // machine.)
    let mut big = open("big");
    let written = fs.device_stats().bytes_written;
    // The three threads are ready before the write starts and are let go
    // together once the device has begun it: on a loaded machine, threads
    // spawned one by one came too late for the one flush.
    let go = std::sync::Arc::new(std::sync::Barrier::new(4));
    let syncs: Vec<_> = small
        .into_iter()
        .map(|f| {
            let go = go.clone();
            std::thread::spawn(move || {
                go.wait();
                f.sync_data().expect("fdatasync")
            })
        })
        .collect();
    let writer = std::thread::spawn(move || big.write_all(&vec![2u8; 4 << 20]).expect("write"));
    while fs.device_stats().bytes_written == written {
        std::thread::sleep(Duration::from_millis(1));
    }
    go.wait();
    for t in syncs {
        t.join().expect("fdatasync thread");
    }
    writer.join().expect("writer");
    let flushes = fs.device_stats().flush_us.len() - before;
    assert_eq!(flushes, 1, "three fdatasyncs asked for together");
}

/// `server.max_inflight_bytes_shared` through the real binary: a producer
/// with 1,000 records of 1 KiB in flight, past its connection's share of
/// 136 KiB, takes the rest of its window from the shared pool, gives it
/// all back, and so has its records covered by fewer of the device's
/// flushes than with no pool.
#[test]
fn a_bulk_producer_past_its_share_borrows_from_the_pool_and_flushes_less() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(fs) = mount_8_mib_per_s(dir.path()) else {
        return;
    };
    let mut flushes = Vec::new();
    for shared in [0u64, 4 << 20] {
        let config = format!(
            "\n[server]\nmax_inflight_bytes_per_connection = 139264\n\
             max_inflight_bytes_shared = {shared}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [storage]\nprewrite_segments = false\n"
        );
        let b = common::Broker::start_on(fs.mountpoint.join(format!("data-{shared}")), &config);
        let before = fs.device_stats().flush_us.len();
        let out = b.cli(&[
            "bench",
            "produce",
            "--messages",
            "4000",
            "--size",
            "1024",
            "--in-flight",
            "1000",
            "--queued",
            "0",
        ]);
        common::assert_ok(&out);
        assert!(
            common::stdout(&out).contains("\"messages\":4000"),
            "{}",
            common::stdout(&out)
        );
        flushes.push(fs.device_stats().flush_us.len() - before);
        let text = common::http_get(&b.metrics_addr(), "/metrics");
        let admits =
            common::sample(&text, "skiff_inflight_shared_admits_total", "").expect("admits");
        let held = common::sample(&text, "skiff_inflight_shared_bytes", "").expect("bytes held");
        assert_eq!(held, 0.0, "everything acked gives its bytes back");
        if shared == 0 {
            assert_eq!(admits, 0.0, "no pool, nothing taken from it");
            continue;
        }
        assert!(admits > 0.0, "the window past the share came from the pool");
        // A client that sends a window past its share and hangs up without
        // reading an answer: what it borrowed comes back all the same.
        common::assert_ok(&b.cli(&["topics", "create", "gone"]));
        let mut raw = common::RawConn::connect(&b.tcp);
        raw.hello();
        let value = vec![7u8; 1024];
        let frames: Vec<u8> = (0..1000u32)
            .flat_map(|cid| common::abuse::produce_frame(cid + 2, "gone", &value))
            .collect();
        raw.stream.write_all(&frames).expect("the window sent");
        drop(raw);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = common::http_get(&b.metrics_addr(), "/metrics");
            let now =
                common::sample(&text, "skiff_inflight_shared_admits_total", "").expect("admits");
            let held =
                common::sample(&text, "skiff_inflight_shared_bytes", "").expect("bytes held");
            if now > admits && held == 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hung-up client's borrowing: admits {admits} -> {now}, {held} bytes held"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        flushes[1] < flushes[0],
        "flushes without the pool and with it: {flushes:?}"
    );
    eprintln!(
        "device flushes for 4,000 records of 1 KiB, without the pool and with it: {flushes:?}"
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// Serves the slow device until the file `$SKIFF_SLOW_DEVICE_MOUNT.stop`
/// appears: base directory `$SKIFF_SLOW_DEVICE_BASE`, writes at
/// `$SKIFF_SLOW_DEVICE_BPS` bytes/s (20 MB/s), flushes of
/// `$SKIFF_SLOW_DEVICE_FLUSH_MIN_MS` to `_MAX_MS` (2 to 20). Every 100 ms
/// it writes its counters to `$SKIFF_SLOW_DEVICE_STATS` as one line:
/// `writes bytes flushes busy_us flush_us...`.
#[test]
#[ignore = "a server for scripts/bench-slow-device"]
fn serve() {
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set"));
    let base = std::path::PathBuf::from(var("SKIFF_SLOW_DEVICE_BASE"));
    let mount = std::path::PathBuf::from(var("SKIFF_SLOW_DEVICE_MOUNT"));
    let stats = std::path::PathBuf::from(var("SKIFF_SLOW_DEVICE_STATS"));
    let device = SlowDevice {
        write_bytes_per_s: env_u64("SKIFF_SLOW_DEVICE_BPS", 20_000_000),
        flush_ms: (
            env_u64("SKIFF_SLOW_DEVICE_FLUSH_MIN_MS", 2),
            env_u64("SKIFF_SLOW_DEVICE_FLUSH_MAX_MS", 20),
        ),
    };
    let fs = LazyFs::mount_slow(&base, &mount, device)
        .expect("the slow device needs root and /dev/fuse");
    eprintln!(
        "slow device: {} on {}, {device:?}",
        mount.display(),
        base.display()
    );
    let stop = mount.with_extension("stop");
    loop {
        let s = fs.device_stats();
        let mut line = format!(
            "{} {} {} {}",
            s.writes,
            s.bytes_written,
            s.flush_us.len(),
            s.busy_us
        );
        for us in &s.flush_us {
            line.push_str(&format!(" {us}"));
        }
        line.push('\n');
        let tmp = stats.with_extension("tmp");
        std::fs::write(&tmp, line).expect("writing the stats");
        std::fs::rename(&tmp, &stats).expect("publishing the stats");
        if stop.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A create writes each partition's first segment, which on a slow card
/// can outlast the CLI's wait. The CLI says so and where to look, and the
/// broker finishes the create all the same: a retry would only be told
/// the topic exists.
#[test]
fn a_create_that_outlasts_the_cli_s_wait_says_so_and_still_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 MiB at 2 MiB/s: the first segment's pre-write takes 2 s at least,
    // four times the CLI's wait below, however fast the host.
    let device = SlowDevice {
        write_bytes_per_s: 2 * 1024 * 1024,
        flush_ms: (5, 5),
    };
    let Some(fs) = LazyFs::mount_slow(&dir.path().join("base"), &dir.path().join("mnt"), device)
    else {
        return;
    };
    let b = common::Broker::start_on(fs.mountpoint.join("data"), "");
    let create = [
        "topics",
        "create",
        "slow",
        "--segment-bytes",
        "4194304",
        "--timeout-ms",
        "500",
    ];
    let out = b.cli(&create);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no answer to the create of slow within 0.5 s")
            && stderr.contains("`skiff topics describe slow`"),
        "{stderr}"
    );
    let deadline = Instant::now() + common::cli_limit();
    loop {
        let out = b.cli(&["topics", "describe", "slow"]);
        if out.status.success() {
            assert!(common::stdout(&out).contains("partition 0:"));
            break;
        }
        assert!(Instant::now() < deadline, "the create never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = b.cli(&create);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );
}
