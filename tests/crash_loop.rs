//! The crash loop: the real binary under load from several idempotent
//! producers and live consumers, killed with SIGKILL at random moments and
//! restarted, then checked record by record (common::checker).
//!
//! CI runs a short count. `scripts/soak --cycles 1000` runs the long mode
//! (a release build, `SKIFF_SOAK_CYCLES`), and a failing run is replayed
//! with its seed (`SKIFF_SOAK_SEED`, printed on the summary line).

mod common;
// Each test binary uses a part of it.
#[allow(dead_code)]
mod lazy_fs;
mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::checker::{self, History, Offsets, Outcome, Seen, Served};
use common::watchdog::Watchdog;
use common::*;
use lazy_fs::{LazyFs, SlowDevice};
use skiff::client::{blocking, ConsumerConfig, ProducerConfig, StartFrom};
use skiff::protocol::{CreateTopicRequest, OffsetCommitPartition};

const PRODUCERS: u32 = 3;
const CONSUMERS: usize = 2;
const PARTITIONS: u32 = 4;
const KEYS: u32 = 16;
const VALUE_BYTES: usize = 100;
/// Each producer's pace: records in a burst, then a pause. Bounds the log
/// a long soak writes (the ring must not wrap, or the check can only say
/// "expired" for what it dropped).
const BURST_RECORDS: u64 = 50;
const BURST_PAUSE: Duration = Duration::from_millis(10);

/// A thread named `name` (/proc shows it in the watchdog's report).
fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .expect("a thread")
}

/// How long one step of a loop may take before the watchdog reports
/// where it hangs: each step's own waits are bounded well inside it.
fn step_limit() -> Duration {
    Duration::from_secs(if emulated() { 600 } else { 300 })
}

/// How long a thread keeps trying to reach the broker the loop restarts:
/// far past any restart, and inside [`step_limit`], so a broker that never
/// comes back fails the thread saying so before the watchdog reports a hang.
fn reach_limit() -> Duration {
    Duration::from_secs(if emulated() { 480 } else { 120 })
}

/// `attempt` again every 20 ms until it succeeds; past [`reach_limit`]
/// the thread fails saying `what` did not happen, and the last error.
fn retry<T, E: std::fmt::Display>(what: &str, mut attempt: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + reach_limit();
    loop {
        match attempt() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: not within {:?}: {e}", reach_limit())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One producer thread: sends sequence-numbered records until told to
/// stop, logging each send and what became of it.
fn produce(
    tcp: String,
    producer: u32,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    spawn(format!("producer-{producer}"), move || {
        // The first kill may come before this thread is scheduled on a
        // busy machine: keep trying to connect as the client of a
        // restarting broker would.
        let p = retry(&format!("producer {producer} connects"), || {
            blocking::Producer::connect(
                &tcp,
                ProducerConfig {
                    // Long enough to ride out any restart of the loop.
                    delivery_timeout: Duration::from_secs(60),
                    retry_backoff: Duration::from_millis(10),
                    retry_backoff_max: Duration::from_millis(200),
                    ..ProducerConfig::default()
                },
            )
        });
        let (tx, rx) = mpsc::channel();
        let acker = {
            let history = history.clone();
            spawn(format!("acker-{producer}"), move || {
                for (seq, d) in rx {
                    match blocking::wait(d) {
                        Ok(m) => history.acked(producer, seq, m.partition, m.offset),
                        Err(_) => history.gave_up(producer, seq),
                    }
                }
            })
        };
        let mut seq = 0u64;
        while !stop.load(Ordering::SeqCst) {
            for _ in 0..BURST_RECORDS {
                let key = format!("k{}", (seq * 7 + u64::from(producer)) % u64::from(KEYS));
                history.sent(producer, seq);
                match p.send_wait(
                    "loop",
                    Some(key.as_bytes()),
                    &checker::value(producer, seq, VALUE_BYTES),
                    &[],
                ) {
                    Ok(d) => tx.send((seq, d)).expect("acker alive"),
                    Err(_) => history.gave_up(producer, seq),
                }
                seq += 1;
            }
            std::thread::sleep(BURST_PAUSE);
        }
        p.flush();
        drop(tx);
        acker.join().expect("acker thread");
    })
}

/// One consumer thread: reads every partition from the earliest offset
/// for as long as the run lasts, through every restart, and keeps what it
/// was served.
fn consume(tcp: String, n: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Served> {
    spawn(format!("consumer-{n}"), move || {
        let client = retry(&format!("consumer {n} connects"), || {
            blocking::Client::connect(&tcp)
        });
        // Retries every 20 ms, not backing off to the default's 1 s: a
        // broker restarted on a slow disk may be up for only 150 ms
        // before the next kill, and a consumer backed off past it reads
        // nothing that cycle (1,240 records a run of ~65,000 acked, on a
        // 20 MB/s, 50-IOPS throttle).
        let mut c = blocking::Consumer::new(
            &client,
            ConsumerConfig {
                max_wait: Duration::from_millis(100),
                retry_backoff: Duration::from_millis(20),
                retry_backoff_max: Duration::from_millis(20),
                ..ConsumerConfig::default()
            },
        );
        retry(&format!("consumer {n} assigns the topic"), || {
            c.assign("loop", None, StartFrom::Earliest)
        });
        let mut served = Served::default();
        while !stop.load(Ordering::SeqCst) {
            match c.poll() {
                Ok(records) => {
                    for r in &records {
                        served.record(r.partition, r.offset, &r.value);
                    }
                }
                // The broker is being restarted: the client reconnects.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        served
    })
}

/// A group's commits as the committer saw them, per partition: the
/// highest offset sent in a commit, and the highest acknowledged.
#[derive(Default)]
struct Commits {
    sent: Mutex<HashMap<u32, u64>>,
    acked: Mutex<HashMap<u32, u64>>,
}

const GROUP: &str = "loop-group";

/// Commits, for a group without members, each partition's next offset
/// after its highest acknowledged record, every few ms through every
/// restart: commits are never ahead of acknowledged (durable) data.
fn commit(
    tcp: String,
    history: Arc<History>,
    commits: Arc<Commits>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    spawn("committer".into(), move || {
        let client = retry("the committer connects", || {
            smol::block_on(skiff::client::Client::connect(&tcp))
        });
        smol::block_on(async {
            while !stop.load(Ordering::SeqCst) {
                let mut next: HashMap<u32, u64> = HashMap::new();
                for o in history.snapshot().values() {
                    if let Outcome::Acked { partition, offset } = o {
                        let n = next.entry(*partition).or_insert(0);
                        *n = (*n).max(offset + 1);
                    }
                }
                let offsets: Vec<OffsetCommitPartition> = next
                    .iter()
                    .map(|(&p, &o)| OffsetCommitPartition {
                        topic: "loop".into(),
                        partition: p,
                        offset: o,
                        metadata: None,
                    })
                    .collect();
                if !offsets.is_empty() {
                    raise(&commits.sent, &next);
                    // A failed commit (the broker being killed) may or may
                    // not have been written: only `sent` bounds it.
                    if client.commit_offsets(GROUP, None, offsets).await.is_ok() {
                        raise(&commits.acked, &next);
                    }
                }
                smol::Timer::after(Duration::from_millis(20)).await;
            }
        })
    })
}

fn raise(m: &Mutex<HashMap<u32, u64>>, to: &HashMap<u32, u64>) {
    let mut m = m.lock().unwrap();
    for (&p, &o) in to {
        let e = m.entry(p).or_insert(0);
        *e = (*e).max(o);
    }
}

/// After a restart: every committed offset is at least the last
/// acknowledged commit before the kill, at most what was sent, and not
/// past the partition's (recovered) high watermark.
fn check_commits(tcp: &str, before_kill: &HashMap<u32, u64>, commits: &Commits) {
    let (committed, hw) = smol::block_on(async {
        let c = skiff::client::Client::connect(tcp).await.expect("connect");
        let committed = c.fetch_offsets(GROUP, None).await.expect("offset fetch");
        let hw: HashMap<u32, u64> = c
            .describe_topic("loop")
            .await
            .expect("describe")
            .partitions
            .iter()
            .map(|p| (p.partition, p.latest_offset))
            .collect();
        (committed, hw)
    });
    let sent = commits.sent.lock().unwrap().clone();
    for (&p, &want) in before_kill {
        let got = committed
            .iter()
            .find(|c| c.partition == p)
            .map(|c| c.offset);
        assert!(
            got.is_some_and(|g| g >= want),
            "partition {p}: committed {got:?} after the restart, {want} acknowledged before"
        );
    }
    for c in &committed {
        assert!(c.offset <= sent[&c.partition], "a commit never sent: {c:?}");
        assert!(
            c.offset <= hw[&c.partition],
            "a commit past the durable data: {c:?}, high watermark {}",
            hw[&c.partition]
        );
    }
}

#[test]
fn kill9_loop_under_load_loses_and_duplicates_nothing() {
    crash_loop(Disk::Plain);
}

/// The same loop with the data directory on tests/lazy_fs: every kill is
/// also a power cut that drops what was not fsynced, on a filesystem
/// without fallocate (the zero-writing fallback). `scripts/soak --lazy-fs`
/// runs the long mode.
#[test]
fn kill9_and_power_cut_loop_on_a_filesystem_that_drops_unsynced_data() {
    crash_loop(Disk::LazyFs);
}

/// The same power cuts on the slow device (an SD card's flushes), where a
/// group commit over three or more of the loop's partitions starts their
/// fdatasyncs together: the cut lands while some are done and others
/// wait. The device shows they ran together (fewer flushes than
/// fdatasyncs). `scripts/soak --slow-device` runs the long mode.
#[test]
fn kill9_and_power_cut_loop_with_flushes_started_together_on_a_slow_device() {
    crash_loop(Disk::Slow);
}

/// Where a crash loop keeps its data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disk {
    /// The machine's file system: kills only.
    Plain,
    /// tests/lazy_fs, without fallocate: each kill a power cut too.
    LazyFs,
    /// tests/lazy_fs as a slow device (flushes of 2 to 8 ms): the same.
    Slow,
}

/// A loop's cycles and seed: `SKIFF_SOAK_CYCLES` (4 in CI) and
/// `SKIFF_SOAK_SEED` (replays a run; the clock's otherwise).
fn soak_cycles_and_seed(name: &str) -> (usize, u64) {
    let cycles: usize = env_or("SKIFF_SOAK_CYCLES", 4);
    let seed: u64 = env_or(
        "SKIFF_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64
            | 1,
    );
    eprintln!("{name}: seed {seed}, {cycles} cycles (SKIFF_SOAK_SEED replays it)");
    (cycles, seed)
}

/// A loop's topic: 512 MiB in 32 segments a partition, so that a soak's
/// log does not wrap; a short run's (CI's 4 cycles write a few MiB) has 4,
/// as every segment is made and then zeroed in the background, which on a
/// slow disk is most of what the run writes. Recovery after a crash reads
/// the rest of each active segment for stale batches: 16 MiB keeps that
/// quick under qemu.
fn create_loop_topic(tcp: &str, name: &str, partitions: u32, cycles: usize) {
    blocking::Client::connect(tcp)
        .expect("connect")
        .create_topic(CreateTopicRequest {
            name: name.into(),
            partitions: Some(partitions),
            segments: Some(if cycles <= 20 { 4 } else { 32 }),
            segment_bytes: Some(16 * 1024 * 1024),
            ..CreateTopicRequest::default()
        })
        .expect("create");
}

fn crash_loop(disk: Disk) {
    let (cycles, seed) = soak_cycles_and_seed("crash loop");
    let mut rng = Rng(seed);
    let watchdog = Watchdog::start("the crash loop", step_limit());
    // The loop's topic reserves 2 GiB, the embedded default's whole
    // storage.disk_budget_bytes: lift it, so assert_serves' probes fit too.
    // The mirror forwards the loop's topic to Tansu through every kill.
    let tansu = upstream::Tansu::start();
    // Declared before the broker: unmounted after it is gone.
    let places = temp_dir();
    let (base, mnt) = (places.path().join("base"), places.path().join("mnt"));
    let lazy = match disk {
        Disk::Plain => None,
        Disk::LazyFs => match LazyFs::try_mount(&base, &mnt, false) {
            Some(fs) => Some(fs),
            None => return,
        },
        Disk::Slow => {
            let device = SlowDevice {
                write_bytes_per_s: 50_000_000,
                flush_ms: (2, 8),
            };
            match LazyFs::mount_slow(&base, &mnt, device) {
                Some(fs) => Some(fs),
                None => return,
            }
        }
    };
    let config = format!(
        "\n[storage]\ndisk_budget_bytes = 4294967296\n\
         [mirror]\nupstream = \"{}\"\ntransactional_id = \"crash-loop\"\ncreate_topics = true\n\
         linger_ms = 10\nbatch_bytes = 65536\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n\
         [[mirror.rules]]\nname = \"loop\"\nsource = \"loop\"\ntarget = \"up-loop\"\n",
        tansu.addr()
    );
    let mut b = match &lazy {
        Some(fs) => Broker::start_on(fs.mountpoint.join("data"), &config),
        None => Broker::start(&config),
    };
    create_loop_topic(&b.tcp, "loop", PARTITIONS, cycles);

    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| produce(b.tcp.clone(), p, history.clone(), stop.clone()))
        .collect();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|n| consume(b.tcp.clone(), n, stop.clone()))
        .collect();
    let commits = Arc::new(Commits::default());
    let committer = commit(
        b.tcp.clone(),
        history.clone(),
        commits.clone(),
        stop.clone(),
    );

    let started = Instant::now();
    for cycle in 0..cycles {
        watchdog.step(format!("cycle {cycle}: under load"));
        std::thread::sleep(rng.between_ms(50, 600));
        let before_kill = commits.acked.lock().unwrap().clone();
        watchdog.step(format!("cycle {cycle}: kill -9"));
        b.kill9();
        if let Some(fs) = &lazy {
            fs.crash();
        }
        std::thread::sleep(rng.between_ms(0, 50));
        watchdog.step(format!("cycle {cycle}: restart"));
        b.restart();
        watchdog.step(format!("cycle {cycle}: checking commits"));
        check_commits(&b.tcp, &before_kill, &commits);
        if cycle % 100 == 99 {
            eprintln!(
                "crash loop: {} cycles, {} acked, {:?}",
                cycle + 1,
                history.acked_count(),
                started.elapsed()
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for (n, p) in producers.into_iter().enumerate() {
        watchdog.step(format!("joining producer-{n} (and its acker)"));
        p.join().expect("producer thread");
    }
    watchdog.step("joining the committer");
    committer.join().expect("committer thread");
    let acked_commits = commits.acked.lock().unwrap().clone();
    assert!(!acked_commits.is_empty(), "the committer made progress");
    watchdog.step("checking the last commits");
    check_commits(&b.tcp, &acked_commits, &commits);
    let mut served = Served::default();
    for (n, c) in consumers.into_iter().enumerate() {
        watchdog.step(format!("joining consumer-{n}"));
        served.merge(c.join().expect("consumer thread"));
    }

    watchdog.step("reading the log back");
    let (report, read) = check_log(&b.tcp, "loop", &history, &served);
    let fs = lazy.as_ref().map_or(String::new(), |fs| {
        let s = fs.stats();
        let d = fs.device_stats();
        let device = match disk {
            Disk::Slow => format!(
                ", device flushes {} for {} asked",
                d.flush_us.len(),
                d.flush_requests
            ),
            _ => String::new(),
        };
        format!(
            " lazy-fs: power cuts {}, fsyncs {}, unsynced bytes dropped {}, stale requests {}{device}",
            s.crashes, s.syncs, s.bytes_dropped, s.stale_requests
        )
    });
    let line = format!(
        "crash-loop: seed {seed} cycles {cycles} served {} {} in {:.0?}{fs}",
        served.records,
        report.summary(),
        started.elapsed()
    );
    // The local result first, in case the upstream check fails.
    eprintln!("{line}");
    report.assert_ok();
    assert!(report.acked > 0, "the producers made progress");
    // Free the local check's maps before the upstream one builds its own.
    drop(served);
    watchdog.step("reading upstream");
    let (upstream, older, held) = check_upstream(&tansu, read, &b, &watchdog);
    // The one line scripts/soak prints.
    println!(
        "{line}; upstream holds {upstream} once ({older} older than the local log, \
         {held} in transactions with no marker)"
    );
    watchdog.step("checking the broker serves");
    b.assert_serves();
    if disk == Disk::LazyFs {
        let log = b.log();
        assert!(
            log.contains("has no fallocate"),
            "segments made by the zero-writing fallback:\n{log}"
        );
    }
    if let (Disk::Slow, Some(fs)) = (disk, &lazy) {
        let d = fs.device_stats();
        let flushes = d.flush_us.len() as u64;
        assert!(
            flushes < d.flush_requests,
            "{flushes} device flushes for {} asked for: none were started together",
            d.flush_requests
        );
    }
}

/// Devices in the fan-in loop, each a connection with one record in flight.
const FANIN_DEVICES: u64 = 48;
/// The fleet's timetable: every device sends on the same tick, give or take
/// its own offset. Their answers to one flush's acks come a tick later, far
/// slower than the flushes, which is what makes the broker's next flush wait
/// for their round (`storage.fanin_wait_ms`, here a tick and a half).
const FANIN_TICK_MS: u64 = 25;

/// One device: sends a sequence-numbered record on each tick it is free
/// for, waits for its ack, logs what became of it.
async fn device(
    addr: String,
    producer: u32,
    start: Instant,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let config = ProducerConfig {
        // Long enough to ride out any restart of the loop.
        delivery_timeout: Duration::from_secs(60),
        retry_backoff: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(200),
        ..ProducerConfig::default()
    };
    let p = skiff::client::Producer::connect_retrying(&addr, config, |_, _| {})
        .await
        .expect("a device connects within 60 s");
    let tick = Duration::from_millis(FANIN_TICK_MS);
    let offset = Duration::from_micros(u64::from(producer) * 50);
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        history.sent(producer, seq);
        let value = checker::value(producer, seq, VALUE_BYTES);
        match p.send("fan", None, &value, &[]).await {
            Ok(m) => history.acked(producer, seq, m.partition, m.offset),
            Err(_) => history.gave_up(producer, seq),
        }
        seq += 1;
        // The next tick from now (one missed while the broker restarted is
        // skipped, as a device's reading would be).
        let ticks = start.elapsed().as_micros() / tick.as_micros() + 1;
        smol::Timer::at(start + tick * ticks as u32 + offset).await;
    }
    p.close().await;
}

/// The crash loop for a fan-in: devices on a timetable, each an idempotent
/// producer with one record in flight, so that the broker's flushes wait
/// for each tick's round and hold the records that came before its last
/// one. SIGKILL lands in those waits: what they held was never acked, and
/// every record acked before a kill is in the log after it, once.
/// `scripts/soak --fan-in --cycles N` runs the long mode.
#[test]
fn kill9_loop_through_fan_in_waits_loses_and_duplicates_nothing() {
    let (cycles, seed) = soak_cycles_and_seed("fan-in loop");
    let mut rng = Rng(seed);
    let watchdog = Watchdog::start("the fan-in loop", step_limit());
    let mut b = Broker::start(&format!(
        "\n[server]\nmax_connections = 256\n[producers]\nmax_producers = 256\n\
         [storage]\ndisk_budget_bytes = 4294967296\nfanin_wait_ms = {}\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        FANIN_TICK_MS * 3 / 2
    ));
    create_loop_topic(&b.tcp, "fan", 2, cycles);
    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));
    let fleet = {
        let (addr, history, stop) = (b.tcp.clone(), history.clone(), stop.clone());
        spawn("fleet".into(), move || {
            let ex = smol::LocalExecutor::new();
            let start = Instant::now();
            let devices: Vec<_> = (0..FANIN_DEVICES as u32)
                .map(|p| {
                    ex.spawn(device(
                        addr.clone(),
                        p,
                        start,
                        history.clone(),
                        stop.clone(),
                    ))
                })
                .collect();
            smol::block_on(ex.run(async {
                for d in devices {
                    d.await;
                }
            }));
        })
    };
    // Waits the broker's flushes made and its write rounds, summed over its
    // lives (each restart starts its metrics afresh).
    let mut flushes = Flushes::default();
    let started = Instant::now();
    for cycle in 0..cycles {
        watchdog.step(format!("cycle {cycle}: under load"));
        std::thread::sleep(rng.between_ms(200, 700));
        flushes.add(&b);
        watchdog.step(format!("cycle {cycle}: kill -9"));
        b.kill9();
        std::thread::sleep(rng.between_ms(0, 50));
        watchdog.step(format!("cycle {cycle}: restart"));
        b.restart();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    watchdog.step("joining the devices");
    fleet.join().expect("devices");
    flushes.add(&b);

    watchdog.step("reading the log back");
    let (report, _) = check_log(&b.tcp, "fan", &history, &Served::default());
    let round_ms = flushes.round_seconds * 1e3 / flushes.rounds.max(1) as f64;
    // The one line scripts/soak prints.
    println!(
        "fan-in-loop: seed {seed} cycles {cycles} devices {FANIN_DEVICES} flushes that waited \
         {} (write rounds {:.2} ms on average) {} in {:.0?}",
        flushes.waited,
        round_ms,
        report.summary(),
        started.elapsed()
    );
    report.assert_ok();
    assert!(report.acked > 0, "the devices made progress");
    // Without waits this loop tests nothing new. The devices answer a tick
    // after their acks, and the broker waits for producers that take more
    // than four flushes to answer: on a disk whose write rounds (writes
    // and fdatasyncs) take under an eighth of a tick, always. A slower disk
    // (a loaded CI machine's took 25 s for what takes 4) makes no waits by
    // design, and the loop is a kill loop only.
    if round_ms < FANIN_TICK_MS as f64 / 8.0 {
        assert!(
            flushes.waited > 0,
            "the broker's flushes waited for the fan-in's rounds ({round_ms:.2} ms write rounds)"
        );
    } else {
        eprintln!(
            "fan-in loop: write rounds of {round_ms:.2} ms on average are too slow for \
             {FANIN_TICK_MS} ms ticks to make waits: checked for loss and duplicates only"
        );
    }
    watchdog.step("checking the broker serves");
    b.assert_serves();
}

/// A broker's flushes over its lives, from its metrics.
#[derive(Default)]
struct Flushes {
    /// Flushes that waited for a fan-in's round.
    waited: u64,
    /// Write rounds, and their time summed.
    rounds: u64,
    round_seconds: f64,
}

impl Flushes {
    fn add(&mut self, b: &Broker) {
        let text = http_get(&b.metrics_addr(), "/metrics");
        let value =
            |name: &str| sample(&text, name, "").unwrap_or_else(|| panic!("no {name} in\n{text}"));
        self.waited += value("skiff_storage_fanin_wait_seconds_count") as u64;
        self.rounds += value("skiff_storage_write_duration_seconds_count") as u64;
        self.round_seconds += value("skiff_storage_write_duration_seconds_sum");
    }
}

/// Reads `topic` back from its earliest offsets and checks it against the
/// history (taken: a soak's is large) and what consumers were served.
/// Returns the report and the records read.
fn check_log(
    tcp: &str,
    topic: &str,
    history: &History,
    served: &Served,
) -> (checker::Report, Vec<Seen>) {
    let earliest: HashMap<u32, u64> = blocking::Client::connect(tcp)
        .expect("connect")
        .describe_topic(topic)
        .expect("describe")
        .partitions
        .iter()
        .map(|p| (p.partition, p.earliest_offset))
        .collect();
    let read: Vec<Seen> = consume_all(tcp, topic).iter().map(Seen::from).collect();
    let history = history.take();
    let pending = history.values().filter(|o| **o == Outcome::Pending).count();
    assert_eq!(pending, 0, "every delivery resolved before the check");
    let report = checker::check(&history, &earliest, &read, served, Offsets::Dense);
    (report, read)
}

/// Upstream holds exactly the local log: each record once, with its value,
/// in offset order per source partition. Takes `local` to free it: after a
/// 1,000-cycle soak it holds millions of records, and the check keeps only
/// a value hash and a count per record (the first soak's harness ran out
/// of memory here, after a clean local check).
/// Returns how many records upstream holds that the local log does, how
/// many older ones it holds that the local ring has dropped, and how many
/// transactional ones it holds with no commit or abort marker. Upstream is
/// read by the checker's own reader (`upstream::for_each_committed_raw`),
/// not skiff's, and past the broker's last stable offset.
/// Tells `watchdog` how far it got every `UPSTREAM_PROGRESS_RECORDS`:
/// reading millions of records back from Tansu on a busy machine takes
/// longer than a step may, and it is progress, not a hang.
fn check_upstream(
    tansu: &upstream::Tansu,
    local: Vec<Seen>,
    b: &Broker,
    watchdog: &Watchdog,
) -> (usize, usize, usize) {
    let client = skiff::mirror::kafka::KafkaClient::new(
        skiff::mirror::kafka::KafkaConfig::new(&tansu.addr()).expect("bootstrap"),
    )
    .expect("client");
    // Per source partition: the first local offset, then each record's
    // value hash and how often upstream held it.
    let mut want: HashMap<u32, (u64, Vec<(u64, u32)>)> = HashMap::new();
    for s in &local {
        let (first, slots) = want.entry(s.partition).or_insert((s.offset, Vec::new()));
        assert_eq!(*first + slots.len() as u64, s.offset, "local offsets dense");
        slots.push((checker::value_hash(&s.value), 0));
    }
    let total = local.len();
    drop(local);
    // The mirror may still be catching up after a long soak: read again
    // while it makes progress.
    let mut deadline = Instant::now() + Duration::from_secs(120);
    let mut had = 0;
    for pass in 1.. {
        for (_, slots) in want.values_mut() {
            slots.iter_mut().for_each(|s| s.1 = 0);
        }
        let mut last: HashMap<(i32, u32), u64> = HashMap::new();
        let (mut found, mut older) = (0usize, 0usize);
        let held = upstream::for_each_committed_raw(&client, "up-loop", |partition, r| {
            let h = |k: &str| -> u64 {
                let v = r
                    .headers
                    .iter()
                    .find(|h| h.key == k)
                    .and_then(|h| h.value.as_ref());
                String::from_utf8_lossy(v.expect("skiff header"))
                    .parse()
                    .expect("decimal header")
            };
            let at = (h("skiff.partition") as u32, h("skiff.offset"));
            let (first, slots) = want.get_mut(&at.0).expect("a local partition");
            if let Some(prev) = last.insert((partition, at.0), at.1) {
                assert!(prev < at.1, "{at:?} after {prev} upstream");
            }
            if at.1 < *first {
                // The ring dropped it locally: its value cannot be checked.
                older += 1;
                return;
            }
            let slot = slots.get_mut((at.1 - *first) as usize);
            let value = r.value.as_deref().unwrap_or_default();
            let slot = slot.unwrap_or_else(|| panic!("{at:?} upstream, past the local log"));
            assert_eq!(slot.0, checker::value_hash(value), "{at:?} upstream");
            slot.1 += 1;
            assert_eq!(slot.1, 1, "{at:?} duplicated upstream");
            found += 1;
            if found % UPSTREAM_PROGRESS_RECORDS == 0 {
                watchdog.step(format!(
                    "reading upstream: pass {pass}, {found} of {total} records found"
                ));
            }
        });
        if found == total {
            return (found, older, held.iter().sum());
        }
        if found > had {
            had = found;
            deadline = Instant::now() + Duration::from_secs(120);
        }
        if Instant::now() >= deadline {
            let ends = upstream_ends(&client, "up-loop");
            let status = b.cli(&["mirror", "status", "--format", "json"]);
            let log = b.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "records missing upstream: {found} of {total} there, none more for 120 s\n\
                 upstream partitions (last stable offset, high watermark): {ends:?}, \
                 records with no marker: {held:?}\n\
                 mirror status: {}{}\nthe broker's last lines (newest first):\n{}",
                stdout(&status),
                stderr(&status),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    unreachable!("the passes end by returning or panicking")
}

const UPSTREAM_PROGRESS_RECORDS: usize = 100_000;

/// Each upstream partition's last stable offset and high watermark: a
/// read_committed reader stops at the first.
fn upstream_ends(client: &skiff::mirror::kafka::KafkaClient, topic: &str) -> Vec<(i64, i64)> {
    use skiff::mirror::kafka::{Isolation, OffsetSpec};
    smol::block_on(async {
        let n = client.partition_count(topic).await.unwrap_or(0) as i32;
        let mut out = Vec::new();
        for p in 0..n {
            let end = |iso| client.list_offset(topic, p, OffsetSpec::Latest, iso);
            let lso = end(Isolation::ReadCommitted).await.unwrap_or(-1);
            let hw = end(Isolation::ReadUncommitted).await.unwrap_or(-1);
            out.push((lso, hw));
        }
        out
    })
}

fn seen(p: u32, o: u64, producer: u32, seq: u64) -> Seen {
    Seen {
        partition: p,
        offset: o,
        value: checker::value(producer, seq, 20),
    }
}

fn acked(p: u32, o: u64) -> Outcome {
    Outcome::Acked {
        partition: p,
        offset: o,
    }
}

/// The checker finds each kind of fault it claims to: a checker that
/// cannot fail proves nothing.
#[test]
fn the_checker_catches_every_kind_of_fault() {
    let none = HashMap::new();
    let mut h = HashMap::new();
    h.insert((0, 0), acked(0, 0));
    h.insert((0, 1), acked(0, 1));
    h.insert((0, 2), Outcome::Indeterminate);
    let check = |read: &[Seen], served: &[Seen], offsets| {
        let mut s = Served::default();
        for x in served {
            s.record(x.partition, x.offset, &x.value);
        }
        checker::check(&h, &none, read, &s, offsets)
    };
    let good = [seen(0, 0, 0, 0), seen(0, 1, 0, 1)];
    let r = check(&good, &good, Offsets::Dense);
    r.assert_ok();
    assert_eq!(r.unacked_present, 0);

    let with_unacked = [seen(0, 0, 0, 0), seen(0, 1, 0, 1), seen(0, 2, 0, 2)];
    let r = check(&with_unacked, &[], Offsets::Dense);
    r.assert_ok();
    assert_eq!(r.unacked_present, 1);

    assert_eq!(check(&[seen(0, 0, 0, 0)], &[], Offsets::Dense).lost.n, 1);
    // Below the earliest offset: dropped by retention, not lost.
    let moved_start = HashMap::from([(0, 1)]);
    let r = checker::check(
        &h,
        &moved_start,
        &[seen(0, 1, 0, 1)],
        &Served::default(),
        Offsets::Dense,
    );
    r.assert_ok();
    assert_eq!(r.expired, 1);

    let dup = [seen(0, 0, 0, 0), seen(0, 1, 0, 1), seen(0, 2, 0, 1)];
    assert_eq!(check(&dup, &[], Offsets::Dense).duplicated.n, 1);

    let swapped = [seen(0, 0, 0, 0), seen(0, 1, 0, 2), seen(0, 2, 0, 1)];
    let r = check(&swapped, &[], Offsets::Dense);
    assert_eq!(r.misplaced.n, 1);
    assert_eq!(r.reordered.n, 1);

    let junk = Seen {
        partition: 0,
        offset: 2,
        value: vec![0; 20],
    };
    let with_junk = [seen(0, 0, 0, 0), seen(0, 1, 0, 1), junk];
    assert_eq!(check(&with_junk, &[], Offsets::Dense).unexpected.n, 1);

    let skipped = [seen(0, 0, 0, 0), seen(0, 2, 0, 1)];
    assert_eq!(check(&skipped, &[], Offsets::Dense).offset_skipped.n, 1);
    assert_eq!(
        check(&skipped, &[], Offsets::MayHaveGaps).offset_skipped.n,
        0
    );

    let reused = [seen(0, 0, 0, 0), seen(0, 1, 0, 1), seen(0, 1, 0, 1)];
    assert_eq!(check(&reused, &[], Offsets::Dense).offset_reused.n, 1);

    let served = [seen(0, 1, 0, 2)];
    assert_eq!(
        check(&good, &served, Offsets::Dense).served_then_changed.n,
        1
    );
    let gone = [seen(0, 5, 0, 1)];
    assert_eq!(check(&good, &gone, Offsets::Dense).served_then_changed.n, 1);
    let twice = [seen(0, 1, 0, 1), seen(0, 1, 0, 2)];
    assert!(check(&good, &twice, Offsets::Dense).served_then_changed.n >= 1);
}

#[test]
fn checker_values_round_trip() {
    assert_eq!(checker::parse(&checker::value(3, 99, 100)), Some((3, 99)));
    assert_eq!(checker::value(3, 99, 100).len(), 100);
    assert_eq!(checker::parse(b"p1:s2:x"), None);
    assert_eq!(checker::parse(b"garbage"), None);
}

/// The model the lazy-fs crash loop relies on: after a power cut, a file
/// holds what was fsynced and nothing written after it, and a file that
/// was written and renamed without an fsync is empty.
#[test]
fn the_lazy_fs_drops_exactly_what_was_not_synced() {
    use std::io::Write;
    let places = temp_dir();
    let Some(fs) = LazyFs::try_mount(
        &places.path().join("base"),
        &places.path().join("mnt"),
        true,
    ) else {
        return;
    };
    let m = fs.mountpoint.clone();
    let mut f = std::fs::File::create(m.join("synced")).expect("create");
    f.write_all(b"kept").expect("write");
    f.sync_data().expect("fdatasync");
    f.write_all(b"+lost").expect("write");
    std::fs::write(m.join("unsynced"), b"lost").expect("write");
    std::fs::write(m.join("tmp"), b"lost").expect("write");
    std::fs::rename(m.join("tmp"), m.join("renamed")).expect("rename");
    // Before the cut, readers see every write.
    assert_eq!(std::fs::read(m.join("synced")).expect("read"), b"kept+lost");
    assert_eq!(std::fs::read(m.join("renamed")).expect("read"), b"lost");
    fs.crash();
    // The dead handle's writes land nowhere.
    assert!(
        f.write_all(b"late").is_err(),
        "a handle from before the cut"
    );
    drop(f);
    assert_eq!(std::fs::read(m.join("synced")).expect("read"), b"kept");
    assert_eq!(std::fs::read(m.join("unsynced")).expect("read"), b"");
    assert_eq!(std::fs::read(m.join("renamed")).expect("read"), b"");
    assert_eq!(fs.stats().crashes, 1);
}
