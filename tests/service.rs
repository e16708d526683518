//! Running as a service: systemd notify (READY, STATUS, WATCHDOG,
//! STOPPING) and the metrics endpoint, through the real binary.

mod common;
// Each test binary uses a part of it.
#[allow(dead_code)]
mod lazy_fs;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

fn datagrams_until(
    sock: &UnixDatagram,
    deadline: Duration,
    mut done: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end && !done(&seen) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    seen
}

#[test]
fn notify_ready_watchdog_and_stopping() {
    let dir = temp_dir();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("binding the notify socket");
    let sock_str = sock_path.to_str().expect("utf-8 path").to_owned();
    // 400 ms: the broker pings every 200 ms while its loops are alive.
    let mut b = Broker::start_with_env(
        dir,
        "",
        &[("NOTIFY_SOCKET", &sock_str), ("WATCHDOG_USEC", "400000")],
    );
    let seen = datagrams_until(&sock, Duration::from_secs(10), |s| {
        s.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3
    });
    let ready = seen
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {seen:?}\n{}", b.log()));
    assert!(
        seen[ready].contains("STATUS=serving"),
        "READY comes with a status line: {seen:?}"
    );
    let pings = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "watchdog pings while healthy: {seen:?}");
    assert!(
        seen.iter().position(|m| m.contains("WATCHDOG=1")).unwrap() > ready,
        "pings start after READY: {seen:?}"
    );
    let pid = b.pid();
    let waiter = std::thread::spawn(move || {
        datagrams_until(&sock, Duration::from_secs(10), |s| {
            s.iter().any(|m| m.contains("STOPPING=1"))
        })
    });
    assert_eq!(b.stop(), Some(0), "skiff {pid} stops cleanly");
    let after = waiter.join().expect("reader thread");
    assert!(
        after.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "STOPPING=1 on SIGTERM: {after:?}"
    );
}

/// Config that turns the metrics endpoint on, on a port the broker picks.
const METRICS_ON_FREE_PORT: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A replay after a restart reads the log from the device, and the
/// metrics say so; where the kernel has io_uring most of it was read
/// ahead, and little or nothing was read ahead in vain.
#[test]
fn metrics_show_a_replays_reads_from_the_device() {
    let mut b = Broker::start(&format!("profile = \"dev\"\n{METRICS_ON_FREE_PORT}"));
    assert_ok(&b.cli(&[
        "bench",
        "produce",
        "--keep",
        "--messages",
        "20000",
        "--size",
        "1024",
        "--fsync",
        "never",
    ]));
    // After a restart only the log's last partial block is in memory.
    assert_eq!(b.stop(), Some(0));
    b.restart();
    let uring = b.log().contains("backend io_uring");
    let out = b.cli(&["bench", "consume"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("\"messages\":20000"),
        "{}",
        stdout(&out)
    );
    let (_, text) = http_get(&b.metrics_addr(), "/metrics");
    let read = |source: &str| {
        sample(
            &text,
            "skiff_storage_read_bytes_total",
            &format!("source=\"{source}\""),
        )
        .unwrap_or(0.0)
    };
    let (demand, ahead, unused) = (read("demand"), read("ahead"), read("ahead_unused"));
    let log_bytes = 20_000.0 * 1024.0;
    assert!(
        demand + ahead >= log_bytes,
        "the whole log from the device: {demand} + {ahead} < {log_bytes}\n{text}"
    );
    if uring {
        assert!(ahead > demand, "mostly read ahead: {ahead} vs {demand}");
        assert!(
            unused <= 2.0 * 1024.0 * 1024.0,
            "{unused} read ahead in vain"
        );
    } else {
        assert_eq!(ahead, 0.0, "pwrite reads on demand only");
    }
}

/// `/health` names a storage fallback met after start-up (docs/operations.md):
/// on a file system without fallocate, the segments of a topic created
/// while serving are preallocated by writing zeros, and the next `/health`
/// says so, without a `/metrics` scrape before it.
#[test]
fn health_names_a_storage_fallback_met_while_serving() {
    let places = temp_dir();
    let Some(fs) = lazy_fs::LazyFs::try_mount(
        &places.path().join("base"),
        &places.path().join("mnt"),
        false,
    ) else {
        return;
    };
    let mut b = Broker::start_on(fs.mountpoint.join("data"), METRICS_ON_FREE_PORT);
    let addr = b.metrics_addr();
    assert_eq!(http_get(&addr, "/health"), (200, "ok\n".to_owned()));
    assert_ok(&b.cli(&["topics", "create", "z", "--segment-bytes", "1048576"]));
    let (status, body) = http_get(&addr, "/health");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        "ok\nstorage: segments preallocated by writing zeros (the file system has no fallocate)\n"
    );
    assert_eq!(b.stop(), Some(0));
}

#[test]
fn metrics_count_what_was_produced_and_fetched() {
    let b = Broker::start(METRICS_ON_FREE_PORT);
    let addr = b.metrics_addr();
    assert_eq!(http_get(&addr, "/health").0, 200);
    assert_eq!(http_get(&addr, "/ready").0, 200);

    assert_ok(&b.cli(&["topics", "create", "m1", "--partitions", "2"]));
    assert_ok(&b.cli(&["topics", "create", "m0"]));
    // Scrape in the middle of a produce run: the producer stops halfway
    // (everything sent so far acked) until the test has scraped.
    let (half_tx, half_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let live = {
        let tcp = b.tcp.clone();
        std::thread::spawn(move || {
            let p = skiff::client::blocking::Producer::connect(
                &tcp,
                skiff::client::ProducerConfig::default(),
            )
            .expect("producer");
            for wave in 0..20u32 {
                if wave == 10 {
                    half_tx.send(()).expect("test waiting");
                    go_rx.recv().expect("test says go");
                }
                let pending: Vec<_> = (0..1_000u32)
                    .map(|i| {
                        let v = format!("live-{wave:02}-{i:04}");
                        p.send("m0", None, v.as_bytes(), &[])
                    })
                    .collect();
                for d in pending {
                    skiff::client::blocking::wait(d).expect("acked");
                }
            }
        })
    };
    half_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("producer reached half way");
    let (_, text) = http_get(&addr, "/metrics");
    assert_eq!(
        sample(&text, "skiff_produce_records_total", "topic=\"m0\""),
        Some(10_000.0),
        "mid-run: exactly the records acked so far"
    );
    go_tx.send(()).expect("producer waiting");
    live.join().expect("producer thread");
    let (_, text) = http_get(&addr, "/metrics");
    assert_eq!(
        sample(&text, "skiff_produce_records_total", "topic=\"m0\""),
        Some(20_000.0),
        "every acked record counted once the run ends"
    );

    let lines: String = (0..500).map(|i| format!("value-{i:05}\n")).collect();
    assert_ok(&b.cli_stdin(&["produce", "m1"], Some(lines.as_bytes())));
    let out = b.cli(&["consume", "m1", "--count", "500", "--timeout-ms", "5000"]);
    assert_ok(&out);
    assert_eq!(stdout(&out).lines().count(), 500);

    let (status, text) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    let produced = sample(&text, "skiff_produce_records_total", "topic=\"m1\"")
        .unwrap_or_else(|| panic!("no produce counter in:\n{text}"));
    assert_eq!(produced, 500.0);
    let fetched =
        sample(&text, "skiff_fetch_records_total", "topic=\"m1\"").expect("fetch counter");
    assert_eq!(fetched, 500.0);
    let produce_bytes = sample(&text, "skiff_produce_bytes_total", "topic=\"m1\"").expect("bytes");
    assert!(
        produce_bytes > 500.0 * 11.0,
        "batch bytes include every value: {produce_bytes}"
    );
    let payload = sample(&text, "skiff_storage_payload_bytes_total", "").expect("payload bytes");
    let m0_bytes = sample(&text, "skiff_produce_bytes_total", "topic=\"m0\"").expect("m0 bytes");
    assert_eq!(
        payload,
        produce_bytes + m0_bytes,
        "storage saw exactly the produced batches"
    );
    let device = sample(&text, "skiff_storage_device_bytes_total", "").expect("device bytes");
    assert!(
        device >= payload,
        "blocks written cover the payload: {device} < {payload}"
    );
    let fsyncs = sample(&text, "skiff_storage_fsync_duration_seconds_count", "").expect("fsyncs");
    // Each of the 20 waves of m0 waited for its acks before the next one
    // was sent, so each needed a commit of its own (pipelined or not).
    assert!(
        fsyncs >= 20.0,
        "fsync=always: one durable commit per wave at least, got {fsyncs}"
    );
    assert!(
        sample(
            &text,
            "skiff_request_duration_seconds_count",
            "kind=\"produce\""
        )
        .unwrap_or(0.0)
            >= 1.0,
        "produce latency observed:\n{text}"
    );
    assert!(
        sample(
            &text,
            "skiff_connections_accepted_total",
            "listener=\"tcp\""
        )
        .unwrap_or(0.0)
            >= 3.0,
        "three CLI connections counted"
    );
}

/// The batches of one produce request reach the storage thread together
/// and share one sync group (one fdatasync), across partitions too: the
/// thread is woken once, after the last of them is queued.
#[test]
fn a_produce_requests_batches_share_one_flush() {
    use skiff::batch::{BatchBuilder, ProducerStamp};
    use skiff::protocol::ProducePartition;
    // Without the background zeroing of new segments, which keeps the
    // storage thread awake (draining its queue between chunks) for a while
    // after a topic is created.
    let b = Broker::start(&format!(
        "profile = \"dev\"\n[storage]\nprewrite_segments = false\n{METRICS_ON_FREE_PORT}"
    ));
    let addr = b.metrics_addr();
    assert_ok(&b.cli(&["topics", "create", "g", "--partitions", "2"]));
    let c = skiff::client::blocking::Client::connect(&b.tcp).expect("client");
    let batch = |tag: u32| {
        let mut bb = BatchBuilder::new();
        for i in 0..100u32 {
            bb.push(
                1,
                None,
                format!("{tag}-{i}-{}", "x".repeat(900)).as_bytes(),
                &[],
            );
        }
        bb.finish(ProducerStamp::NONE)
    };
    let groups = || {
        let (_, text) = http_get(&addr, "/metrics");
        sample(&text, "skiff_storage_fsync_duration_seconds_count", "").expect("fsync count")
    };
    for round in 0..2u32 {
        // The storage thread goes to sleep, as between a producer's windows,
        // and the last round's checkpoint (due a second after the one
        // before) is written first: its wake-up must not split this round.
        std::thread::sleep(Duration::from_millis(1200));
        let before = groups();
        let entries = (0..4u32)
            .map(|i| ProducePartition {
                topic: "g".into(),
                partition: i % 2,
                batch: batch(round * 4 + i).into(),
            })
            .collect();
        let results = c.produce_raw(entries).expect("produce");
        assert!(results.iter().all(|r| r.offsets().is_ok()), "{results:?}");
        assert_eq!(
            groups() - before,
            1.0,
            "round {round}: one group for the request"
        );
    }
}

/// Large produce batches (1 KiB records, 256 KiB batches) on one
/// connection reuse buffers the storage thread gave back (`skiff::bufpool`).
/// Before, glibc faulted each batch's memory in afresh: a page fault per
/// 4 KiB received, and half the broker's CPU at this record size.
#[test]
fn large_batches_do_not_fault_in_fresh_pages() {
    use skiff::batch::{BatchBuilder, ProducerStamp};
    use skiff::protocol::ProducePartition;
    let b = Broker::start("profile = \"dev\"\n");
    assert_ok(&b.cli(&["topics", "create", "big", "--partitions", "1"]));
    let c = skiff::client::blocking::Client::connect(&b.tcp).expect("client");
    let value = vec![b'v'; 1024];
    let batch = {
        let mut bb = BatchBuilder::new();
        for _ in 0..250 {
            bb.push(1, None, &value, &[]);
        }
        bb.finish(ProducerStamp::NONE)
    };
    let round = || {
        let entries = (0..4)
            .map(|_| ProducePartition {
                topic: "big".into(),
                partition: 0,
                batch: batch.clone().into(),
            })
            .collect();
        let results = c.produce_raw(entries).expect("produce");
        assert!(results.iter().all(|r| r.offsets().is_ok()), "{results:?}");
    };
    // Warm: the tail buffer, the read buffer and the pool fill once.
    for _ in 0..4 {
        round();
    }
    let before = b.minor_faults();
    let rounds = 16;
    for _ in 0..rounds {
        round();
    }
    let faults = b.minor_faults() - before;
    // Under the emulator the faults are qemu's too (its translation caches,
    // a thread's first run); the native run of the suite checks the broker's.
    if emulated() {
        return;
    }
    let received = rounds * 4 * batch.len() as u64;
    // One fault per 4 KiB is what fresh buffers cost; allow one per 32 KiB
    // for everything else the broker touches meanwhile.
    assert!(
        faults < received / (32 * 1024),
        "{faults} page faults for {received} bytes received"
    );
}

/// `--ready-file` names the ports the broker really bound when the config
/// asked for port 0 (this harness always does), and goes at a clean stop;
/// an unwritable path stops `serve` at start with one clear line.
#[test]
fn the_ready_file_names_the_bound_ports_and_goes_at_a_clean_stop() {
    let mut b = Broker::start(METRICS_ON_FREE_PORT);
    let ready = Ready::read(&b.dir.path().join("ready.json")).expect("a ready file");
    assert_eq!(ready.pid, b.pid());
    let tcp = ready.tcp.expect("tcp");
    assert!(!tcp.ends_with(":0"), "a real port: {tcp}");
    assert_eq!(tcp, b.tcp);
    assert_eq!(ready.unix.as_deref(), Some(b.unix_addr().as_str()));
    assert_eq!(http_get(&ready.metrics.expect("metrics"), "/ready").0, 200);
    assert_ok(&b.cli(&["topics", "list"]));
    assert_eq!(b.stop(), Some(0));
    assert!(!exists(&b.dir.path().join("ready.json")), "removed at stop");

    let o = skiff_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(b.dir.path().join("data"))
        .arg("--ready-file")
        .arg(b.dir.path().join("no-such-dir/ready.json"))
        .output()
        .expect("running skiff serve");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot write the ready file"),
        "{}",
        stderr(&o)
    );
}

/// Voluntary context switches of every thread of `pid`: how often the
/// process went to sleep, so how often something woke it.
fn wakeups(pid: u32) -> u64 {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc") {
        let status = std::fs::read_to_string(task.expect("task").path().join("status"));
        // A thread may end between the listing and the read.
        let Ok(status) = status else { continue };
        n += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    n
}

/// An idle broker sleeps, its groups, share groups and cleaner included:
/// timers that tick while nothing is due, and metrics copied on a timer,
/// woke it some 200 times a second (mosquitto, idle on the same machine:
/// 9). Counted in context switches, not time, so a busy machine does not
/// change the figure much.
#[test]
fn an_idle_broker_sleeps() {
    // Without pre-writing: the new topics' segments are otherwise zeroed in
    // the background, a write per 256 KiB, which on a slow disk (40 MB/s,
    // 200 IOPS) was still going in the window and woke it 74 times.
    let b = Broker::start(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\nprewrite_segments = false\n",
    );
    assert_ok(&b.cli(&["topics", "create", "t", "--cleanup", "compact"]));
    let keyed = b.cli_stdin(
        &["produce", "t", "--key", "k"],
        Some(b"1\n2\n3\n4\n5\n6\n".as_slice()),
    );
    assert_ok(&keyed);
    // A group that committed and left, and a share group whose records
    // were all accepted: both keep state, and nothing of theirs is due.
    assert_ok(&b.cli(&[
        "consume", "t", "--group", "g", "--from", "earliest", "--count", "6",
    ]));
    assert_ok(&b.cli(&[
        "consume",
        "t",
        "--share-group",
        "s",
        "--from",
        "earliest",
        "--exec",
        "cat >/dev/null",
        "--count",
        "6",
    ]));
    std::thread::sleep(Duration::from_millis(500));
    let window = Duration::from_secs(4);
    let before = wakeups(b.pid());
    std::thread::sleep(window);
    let woken = wakeups(b.pid()) - before;
    assert!(
        woken <= 60,
        "an idle broker woke {woken} times in {window:?}; at most 60 expected"
    );
    // What the metrics copy from the coordinators is read when scraped.
    let (status, body) = http_get(&b.metrics_addr(), "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l.starts_with("skiff_group_lag_records{") && l.ends_with(" 0")),
        "the group's lag in:\n{body}"
    );
}

/// Blocking jobs (the producer registry's writes, snapshots) run on one
/// thread that sleeps until a job comes. The `blocking` crate's pool ran
/// them before: its thread, made by the first produce's registry write,
/// stayed and woke every 500 ms for good (docs/performance.md, "An idle
/// broker").
#[test]
fn a_used_broker_keeps_no_pooled_thread_that_polls() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "t"]));
    // The first producer id of a run is written to the registry before
    // the answer, and a pool thread is made when a job is handed over:
    // both are done when the produce is.
    assert_ok(&b.cli(&["produce", "t", "v"]));
    let names = thread_names(b.pid());
    assert!(
        !names.iter().any(|n| n.starts_with("blocking-")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "skiff-offload"), "{names:?}");
}

/// A SIGHUP applies what it can and names in the log what only a restart
/// applies, rather than leave the operator to think it took.
#[test]
fn a_reload_names_the_changes_only_a_restart_applies() {
    let b = Broker::start("[share]\nlock_ms = 30000\n");
    let text = std::fs::read_to_string(&b.config_path).expect("the config");
    std::fs::write(
        &b.config_path,
        text.replace("lock_ms = 30000", "lock_ms = 5000"),
    )
    .expect("the config changed");
    b.sighup();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.log().contains("applied only by a restart") {
        assert!(Instant::now() < deadline, "{}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.log()
            .contains("SIGHUP: changed since start-up, applied only by a restart: share.lock_ms"),
        "{}",
        b.log()
    );
}
