//! `skiff bench`: the standard workloads (docs/performance.md, "How we
//! measure") against a running broker. A progress line goes to stderr each second; the result is
//! one JSON line on stdout.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{
    Client, ClientConfig, ClientError, Consumer, ConsumerConfig, OffsetReset, Producer,
    ProducerConfig, StartFrom,
};
use crate::protocol::{CreateTopicRequest, ErrorCode};

use super::args::{
    BenchConsumeArgs, BenchDiskArgs, BenchHandshakeArgs, BenchLoopbackArgs, BenchProduceArgs,
    BenchSyncArgs,
};
use super::bench_device::{Device, DeviceLoad};
use super::{fail, EXIT_RUNTIME, EXIT_USAGE};

/// Latencies are recorded in microseconds, up to a minute, 3 significant
/// digits.
pub(super) const LATENCY_US_MAX: u64 = 60_000_000;

pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// The percentiles every latency in a bench line reports.
fn percentiles(hist: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50": hist.value_at_quantile(0.50),
        "p99": hist.value_at_quantile(0.99),
        "p999": hist.value_at_quantile(0.999),
        "max": hist.max(),
    })
}

/// Records send-to-ack latencies into a histogram, one `record_n` per run
/// of records that share their send-clock reading and their batch's ack
/// time (a subtraction and a histogram update per record were a twentieth
/// of the bench's own CPU). Producers share histograms (see
/// [`LATENCY_SHARDS`]).
struct LatencyRuns<'a> {
    hist: &'a Mutex<Histogram<u64>>,
    run: Option<(Instant, Instant)>,
    count: u64,
}

/// The histograms a run's producers record into, producer `i` into
/// `i % LATENCY_SHARDS`. One each took 128 KiB apiece, zeroed as each
/// producer's task started: at 10,000 producers, 1.3 GB written in the
/// run's first second, and every record due meanwhile was late (the
/// whole p99 of the 10,000-connection open loop).
const LATENCY_SHARDS: usize = 16;

impl<'a> LatencyRuns<'a> {
    fn new(hist: &'a Mutex<Histogram<u64>>) -> LatencyRuns<'a> {
        LatencyRuns {
            hist,
            run: None,
            count: 0,
        }
    }

    fn record(&mut self, sent: Instant, acked: Instant) {
        if self.run == Some((sent, acked)) {
            self.count += 1;
            return;
        }
        self.flush();
        self.run = Some((sent, acked));
        self.count = 1;
    }

    fn flush(&mut self) {
        if let Some((sent, acked)) = self.run.take() {
            let us = acked.duration_since(sent).as_micros() as u64;
            let _ = self
                .hist
                .lock()
                .expect("latency histogram")
                .record_n(us.min(LATENCY_US_MAX), self.count);
        }
    }

    fn finish(mut self) {
        self.flush();
    }
}

fn progress(done: &AtomicU64, total: u64, start: Instant, stop: &AtomicU64) {
    let mut last = 0;
    while stop.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(200));
        let secs = start.elapsed().as_secs();
        if secs != last {
            last = secs;
            let n = done.load(Ordering::Relaxed);
            eprintln!(
                "progress: {n}/{total} records, {:.0} records/s",
                n as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Descriptors `bench produce` needs beside one per producer.
const FDS_BESIDE_PRODUCERS: u64 = 64;

/// Deletes the bench topic at the end of a run unless `--keep`: its rings
/// reserve half a GiB of disk.
/// A process's CPU time so far (user + sys of all its threads), from
/// /proc/PID/stat; None where that cannot be read.
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is the
    // 3rd field of the line, utime the 14th and stime the 15th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let ticks: u64 = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// How long a process's threads have been runnable but waiting for a CPU
/// (the second field of each /proc/PID/task/TID/schedstat, in ns); None
/// where that cannot be read. On two cores shared by broker and client,
/// the open loop's slow records come in clusters: this says whether the
/// process was waiting for a core.
fn process_runq_wait(pid: u32) -> Option<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(stat) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else {
            continue; // the thread exited meanwhile
        };
        ns += stat.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

/// What a counter read before and after a run grew by, where both reads
/// worked.
fn grown(before: Option<Duration>, after: Option<Duration>) -> Option<Duration> {
    before.zip(after).map(|(b, a)| a.saturating_sub(b))
}

/// Adds the broker's CPU time over a run to its result line.
fn add_broker_cpu(line: &mut serde_json::Value, cpu: Option<Duration>, records: u64) {
    if let Some(cpu) = cpu {
        line["broker_cpu_s"] = cpu.as_secs_f64().into();
        line["broker_cpu_s_per_m_records"] =
            (cpu.as_secs_f64() * 1e6 / records.max(1) as f64).into();
    }
}

async fn drop_topic(client: &Client, topic: &str, keep: bool) -> Result<(), ClientError> {
    if keep {
        return Ok(());
    }
    client.delete_topic(topic).await
}

/// Deletes and recreates the bench topic so every run starts empty.
async fn fresh_topic(
    client: &Client,
    topic: &str,
    fsync: &str,
    segments: u32,
) -> Result<(), ClientError> {
    fresh_partitioned_topic(
        client,
        topic,
        1,
        fsync,
        "delete",
        64 * 1024 * 1024,
        segments,
    )
    .await
}

async fn fresh_partitioned_topic(
    client: &Client,
    topic: &str,
    partitions: u32,
    fsync: &str,
    cleanup: &str,
    segment_bytes: u64,
    segments: u32,
) -> Result<(), ClientError> {
    match client.delete_topic(topic).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {}
        Err(e) => return Err(e),
    }
    client
        .create_topic(CreateTopicRequest {
            name: topic.to_owned(),
            partitions: Some(partitions),
            segment_bytes: Some(segment_bytes),
            segments: Some(segments),
            fsync: Some(fsync.to_owned()),
            cleanup: (cleanup != "delete").then(|| cleanup.to_owned()),
            ..CreateTopicRequest::default()
        })
        .await?;
    Ok(())
}

async fn bench_producer(
    addr: &str,
    client: &ClientConfig,
    idempotent: bool,
    in_flight: usize,
) -> Result<Producer, ClientError> {
    Producer::connect(
        addr,
        ProducerConfig {
            client: client.clone(),
            // No linger: with a bounded number of records in flight, a
            // batch fills while the previous one is being made durable.
            linger: Duration::ZERO,
            batch_bytes: 256 * 1024,
            max_in_flight_records: Some(in_flight),
            idempotent,
            ..ProducerConfig::default()
        },
    )
    .await
}

/// The open loop's timetable: record `i` is due at `start + i / rate`.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    per_second: u64,
}

impl Schedule {
    fn due(&self, i: u64) -> Instant {
        let ns = u128::from(i) * 1_000_000_000 / u128::from(self.per_second);
        self.start + Duration::from_nanos(ns as u64)
    }
}

/// The open loop sleeps at least this long: the records due meanwhile go
/// together when it wakes, each one's latency still counted from when it
/// was due, so the wait is in the histogram. A timer per record (one
/// every 10 µs at 100,000/s) took 93% of a core in timer wake-ups, and
/// the tail then measured the bench, not the broker.
const OPEN_LOOP_TICK: Duration = Duration::from_micros(100);

/// What one producer sends: `messages` records of `size` bytes, keyed
/// `k<i mod keys>` when `keys` is set.
#[derive(Clone, Copy)]
pub(super) struct Load {
    pub messages: u64,
    pub size: usize,
    pub keys: Option<u64>,
    /// Every record to this partition; else the partitioner's choice.
    pub partition: Option<u32>,
}

/// Workload P's loop on one producer: `messages` records, at most
/// `unacked` given to the producer and not acknowledged (the producer
/// itself keeps at most `--in-flight` of them on the wire); the
/// send-to-ack latencies, into `hist`.
///
/// With a `schedule` it is the open loop: no record is sent before it is
/// due, and its latency counts from when it was due, so a stall that holds
/// sends back (a full window, a late timer, a slow broker) is in the
/// histogram rather than hidden by sending later (coordinated omission).
async fn produce_with(
    producer: &Producer,
    topic: &str,
    load: Load,
    unacked: usize,
    schedule: Option<Schedule>,
    done: &AtomicU64,
    hist: &Mutex<Histogram<u64>>,
) -> Result<(), ClientError> {
    let Load {
        messages,
        size,
        keys,
        partition,
    } = load;
    let value = vec![b'x'; size];
    let mut key = Vec::with_capacity(24);
    let mut hist = LatencyRuns::new(hist);
    let mut pending = VecDeque::with_capacity(unacked);
    // Latency is ack time (from the batch's answer: one clock read per
    // batch) minus send time, read once per burst of sends rather than per
    // record (two clock reads per record were a tenth of this loop's CPU).
    // The send clock is read after every wait for an ack and every
    // CLOCK_EVERY sends; it is never later than the send it stamps, so the
    // latencies recorded are upper bounds.
    const CLOCK_EVERY: u32 = 64;
    let mut sent_at = Instant::now();
    let mut since_clock = 0u32;
    // The open loop's last clock reading: records due by then go at once.
    let mut now = Instant::now();
    for i in 0..messages {
        if pending.len() >= unacked {
            let (sent, mut d): (Instant, crate::client::Delivery) =
                pending.pop_front().expect("non-empty");
            let meta = match futures_lite::future::poll_once(&mut d).await {
                Some(r) => r?,
                None => {
                    let meta = d.await?;
                    sent_at = Instant::now();
                    since_clock = 0;
                    meta
                }
            };
            hist.record(sent, meta.acked_at);
            done.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(schedule) = schedule {
            sent_at = schedule.due(i);
            if sent_at > now {
                now = Instant::now();
                if sent_at > now {
                    now = smol::Timer::at(sent_at.max(now + OPEN_LOOP_TICK)).await;
                }
            }
        } else {
            since_clock += 1;
            if since_clock >= CLOCK_EVERY {
                sent_at = Instant::now();
                since_clock = 0;
            }
        }
        let k = keys.map(|n| {
            use std::io::Write;
            key.clear();
            let _ = write!(key, "k{}", i % n);
            &key[..]
        });
        let d = match partition {
            Some(p) => producer.send_wait_to(topic, p, k, &value, &[]).await?,
            None => producer.send_wait(topic, k, &value, &[]).await?,
        };
        pending.push_back((sent_at, d));
    }
    producer.flush().await;
    while let Some((sent, d)) = pending.pop_front() {
        let meta = d.await?;
        hist.record(sent, meta.acked_at);
        done.fetch_add(1, Ordering::Relaxed);
    }
    hist.finish();
    Ok(())
}

/// A bench producer: the client library's, or a device (`--devices`).
enum BenchClient {
    Library(Producer),
    Device(Device),
}

pub fn produce(a: BenchProduceArgs) -> ExitCode {
    if let Err(code) = super::commands::check_broker(&a.broker.broker) {
        return code;
    }
    if let Err(e) = a.fsync.parse::<crate::storage::Durability>() {
        let why = match e {
            crate::storage::StorageError::InvalidConfig(why) => why.to_string(),
            e => e.to_string(),
        };
        return fail(EXIT_USAGE, format!("--fsync {}: {why}", a.fsync));
    }
    if a.producers == 0 || a.size == 0 || a.in_flight == 0 {
        return fail(
            EXIT_USAGE,
            "--producers, --size and --in-flight must be at least 1",
        );
    }
    if a.cleanup != "delete" && a.keys.is_none_or(|k| k == 0) {
        return fail(EXIT_USAGE, "--cleanup compact needs --keys (at least 1)");
    }
    if let Some(rounds) = a.compare_compaction {
        if a.rate.is_some() || rounds == 0 {
            return fail(
                EXIT_USAGE,
                "--compare-compaction needs at least 1 round, and no --rate",
            );
        }
        return compare_compaction(&a, rounds);
    }
    if let Some(rounds) = a.compare_idempotence {
        if a.rate.is_some() {
            return fail(
                EXIT_USAGE,
                "--rate and --compare-idempotence cannot be used together",
            );
        }
        return compare_idempotence(&a, rounds);
    }
    if let Some(tls_addr) = &a.compare_tls {
        if a.rate.is_some() || a.rounds == 0 {
            return fail(
                EXIT_USAGE,
                "--compare-tls needs --rounds of at least 1, and no --rate",
            );
        }
        return compare_tls(&a, tls_addr);
    }
    if a.devices
        && (a.in_flight != 1
            || a.queued() != 0
            || a.broker.tls().is_some()
            || a.compare_idempotence.is_some()
            || a.compare_tls.is_some()
            || a.compare_compaction.is_some())
    {
        return fail(
            EXIT_USAGE,
            "--devices sends one record at a time: it needs --in-flight 1 --queued 0, plain TCP or the Unix socket, and no --compare-*",
        );
    }
    if a.rate.is_some_and(|r| r < u64::from(a.producers)) {
        return fail(
            EXIT_USAGE,
            "--rate must be at least 1 record/s per producer",
        );
    }
    // A descriptor per producer, and a few for the admin client and the
    // process itself: a thousand producers pass the usual soft limit.
    let want = u64::from(a.producers) + FDS_BESIDE_PRODUCERS;
    match crate::fdlimit::raise(want) {
        Ok(l) if l.soft >= want => {}
        Ok(l) => {
            return fail(
                EXIT_USAGE,
                format!(
                    "--producers {} needs {want} open files; the hard limit is {} (raise it: ulimit -Hn, or LimitNOFILE=)",
                    a.producers, l.hard
                ),
            )
        }
        Err(e) => return fail(EXIT_RUNTIME, format!("cannot raise the open-file limit: {e}")),
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let client_config = a.broker.client_config();
    let result = smol::block_on(async {
        let client = Client::connect_with(&a.broker.broker, client_config.clone()).await?;
        if !a.existing_topic {
            fresh_partitioned_topic(
                &client,
                &a.topic,
                a.partitions,
                &a.fsync,
                &a.cleanup,
                64 * 1024 * 1024,
                a.segments,
            )
            .await?;
        }
        // Every producer connects before the clock starts: ten thousand
        // connections take seconds to open, which an open loop would
        // otherwise count as every record's lateness.
        let connecting: Vec<_> = (0..a.producers)
            .map(|_| {
                let (addr, config) = (a.broker.broker.clone(), client_config.clone());
                let (idempotent, in_flight) = (a.idempotent, a.in_flight as usize);
                let devices = a.devices;
                smol::spawn(async move {
                    if devices {
                        Device::connect(&addr, idempotent)
                            .await
                            .map(BenchClient::Device)
                    } else {
                        bench_producer(&addr, &config, idempotent, in_flight)
                            .await
                            .map(BenchClient::Library)
                    }
                })
            })
            .collect();
        let mut producers = Vec::with_capacity(connecting.len());
        for c in connecting {
            producers.push(c.await?);
        }
        // ... and knows the topic: each producer's first record otherwise
        // waited for a metadata round trip, ten thousand of them at once.
        for p in &producers {
            if let BenchClient::Library(p) = p {
                p.partitions_for(&a.topic).await?;
            }
        }
        let cpu_before = a.broker_pid.and_then(process_cpu);
        let own_before = process_cpu(std::process::id());
        let waits_before = (
            a.broker_pid.and_then(process_runq_wait),
            process_runq_wait(std::process::id()),
        );
        let start = Instant::now();
        let schedule = a.rate.map(|rate| Schedule {
            start,
            per_second: rate / u64::from(a.producers),
        });
        let progress_thread = {
            let (done, stop, total) = (done.clone(), stop.clone(), a.messages);
            std::thread::spawn(move || progress(&done, total, start, &stop))
        };
        let topic: Arc<str> = a.topic.as_str().into();
        let hists: Arc<Vec<Mutex<Histogram<u64>>>> = Arc::new(
            (0..LATENCY_SHARDS.min(a.producers as usize))
                .map(|_| Mutex::new(histogram()))
                .collect(),
        );
        let per = a.messages / u64::from(a.producers);
        let unacked = a.in_flight as usize + a.queued() as usize;
        let mut tasks = Vec::with_capacity(producers.len());
        let mut devices = Vec::new();
        for (i, producer) in producers.into_iter().enumerate() {
            // The first producer takes the remainder.
            let n = per
                + if i == 0 {
                    a.messages % u64::from(a.producers)
                } else {
                    0
                };
            let load = Load {
                messages: n,
                size: a.size,
                keys: a.keys,
                partition: (a.partitions > 1).then(|| i as u32 % a.partitions),
            };
            // Producers start a share of a period apart, as devices
            // that are not synchronised would: all at once, each
            // second's records arrived together and queued behind
            // one another.
            let schedule = schedule.zip(a.rate).map(|(s, rate)| Schedule {
                start: s.start
                    + Duration::from_nanos((i as u128 * 1_000_000_000 / u128::from(rate)) as u64),
                ..s
            });
            let p = match producer {
                BenchClient::Library(p) => p,
                BenchClient::Device(d) => {
                    let due = schedule
                        .map(|s| Box::new(move |i| s.due(i)) as Box<dyn Fn(u64) -> Instant + Send>);
                    devices.push((d, DeviceLoad { load, due }));
                    continue;
                }
            };
            let (topic, done, hists) = (topic.clone(), done.clone(), hists.clone());
            tasks.push(smol::spawn(async move {
                let hist = &hists[i % hists.len()];
                produce_with(&p, &topic, load, unacked, schedule, &done, hist).await
            }));
        }
        if !devices.is_empty() {
            let (topic, done, hists) = (topic.clone(), done.clone(), hists.clone());
            tasks.push(smol::unblock(move || {
                super::bench_device::drive(devices, &topic, &done, &hists[0])
            }));
        }
        let mut first_err = None;
        for t in tasks {
            if let Err(e) = t.await {
                first_err.get_or_insert(e);
            }
        }
        let mut hist = histogram();
        for h in hists.iter() {
            hist.add(&*h.lock().expect("latency histogram"))
                .expect("same histogram bounds");
        }
        let elapsed = start.elapsed();
        let cpu_after = a.broker_pid.and_then(process_cpu);
        let own_after = process_cpu(std::process::id());
        let waits = (
            grown(waits_before.0, a.broker_pid.and_then(process_runq_wait)),
            grown(waits_before.1, process_runq_wait(std::process::id())),
        );
        stop.store(1, Ordering::Relaxed);
        let _ = progress_thread.join();
        let dropped = drop_topic(&client, &a.topic, a.keep || a.existing_topic).await;
        if let Some(e) = first_err {
            return Err(e);
        }
        dropped?;
        let cpu = grown(cpu_before, cpu_after);
        let own = grown(own_before, own_after);
        Ok((elapsed, hist, cpu, own, waits))
    });
    let (elapsed, hist, cpu, own, (broker_wait, own_wait)) = match result {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench produce: {e}")),
    };
    let secs = elapsed.as_secs_f64();
    let mut line = serde_json::json!({
        "workload": if a.rate.is_some() { "produce_open_loop" } else { "produce" },
        "messages": a.messages,
        "size_bytes": a.size,
        "producers": a.producers,
        "partitions": a.partitions,
        "in_flight": a.in_flight,
        "queued": a.queued(),
        "idempotent": a.idempotent,
        "client": if a.devices { "devices" } else { "library" },
        "fsync": a.fsync,
        "keys": a.keys,
        "cleanup": a.cleanup,
        "elapsed_s": secs,
        "msgs_per_s": a.messages as f64 / secs,
        "mb_per_s": (a.messages as f64 * a.size as f64) / secs / 1e6,
        "ack_latency_us": percentiles(&hist),
    });
    if let Some(rate) = a.rate {
        // The latencies above count from each record's due time.
        line["rate"] = rate.into();
    }
    add_broker_cpu(&mut line, cpu, a.messages);
    if let Some(own) = own {
        // The client's share: with many producers on one machine it can be
        // the bottleneck rather than the broker.
        line["client_cpu_s"] = own.as_secs_f64().into();
        line["client_cpu_s_per_m_records"] =
            (own.as_secs_f64() * 1e6 / a.messages.max(1) as f64).into();
    }
    if let Some(w) = broker_wait {
        line["broker_runq_wait_s"] = w.as_secs_f64().into();
    }
    if let Some(w) = own_wait {
        line["client_runq_wait_s"] = w.as_secs_f64().into();
    }
    outln!("{line}");
    ExitCode::SUCCESS
}

/// The messages in 2 x `rounds` slices alternating between two producers,
/// ABBA (so neither always goes first); each producer's records per
/// second over its own time.
async fn abba(
    a: &BenchProduceArgs,
    rounds: u32,
    producers: [&Producer; 2],
    done: &AtomicU64,
) -> Result<[f64; 2], ClientError> {
    let slice = a.messages / (2 * u64::from(rounds));
    // [records, seconds] per producer.
    let mut totals = [[0f64; 2]; 2];
    for r in 0..2 * rounds {
        let mode = if matches!(r % 4, 0 | 3) { 0 } else { 1 };
        let t = Instant::now();
        let load = Load {
            messages: slice,
            size: a.size,
            keys: a.keys,
            partition: None,
        };
        produce_with(
            producers[mode],
            &a.topic,
            load,
            a.in_flight as usize + a.queued() as usize,
            None,
            done,
            &Mutex::new(histogram()),
        )
        .await?;
        totals[mode][0] += slice as f64;
        totals[mode][1] += t.elapsed().as_secs_f64();
    }
    Ok(totals.map(|[records, secs]| records / secs.max(1e-9)))
}

/// `--compare-compaction ROUNDS`: what a running compaction costs a
/// producer, as ratios measured in one run. 2 x ROUNDS slices, ABBA; before
/// each, a second topic (4 MiB x 16 segments) gets `--fill-bytes` of
/// records under 100 keys, unmeasured. In "on" slices that topic is
/// compacted (the cleaner starts when its ring is half used; `topics
/// compact` starts it now, at the broker's `compaction.max_bytes_per_sec`)
/// and the measured producer writes a fresh plain topic while the cleaner
/// works; in "off" slices the same fill goes to a plain topic, so the fill
/// costs both modes the same and only the cleaner differs. After each
/// "on" slice the bench waits for the cleaner and reports how long it was
/// still busy: above zero, it ran through the whole slice.
fn compare_compaction(a: &BenchProduceArgs, rounds: u32) -> ExitCode {
    const FILL_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
    let done = AtomicU64::new(0);
    let config = a.broker.client_config();
    let fill_topic = format!("{}-fill", a.topic);
    let slice = a.messages / (2 * u64::from(rounds));
    let fill = Load {
        messages: (a.fill_bytes / (a.size as u64 + 16)).max(1),
        size: a.size,
        keys: Some(100),
        partition: None,
    };
    let fill_segments = (a.fill_bytes.div_ceil(FILL_SEGMENT_BYTES) + 4).clamp(4, 4096) as u32;
    let unacked = a.in_flight as usize + a.queued() as usize;
    let result = smol::block_on(async {
        let client = Client::connect_with(&a.broker.broker, config.clone()).await?;
        let producer = bench_producer(
            &a.broker.broker,
            &config,
            a.idempotent,
            a.in_flight as usize,
        )
        .await?;
        // Per mode (0 = compaction running, 1 = none): records, seconds,
        // latencies; and the cleaner's time left after "on" slices.
        let mut totals = [(0u64, 0f64), (0u64, 0f64)];
        let mut hists = [histogram(), histogram()];
        let mut busy_after = Vec::new();
        for r in 0..2 * rounds {
            let mode = if matches!(r % 4, 0 | 3) { 0 } else { 1 };
            let cleanup = if mode == 0 { "compact" } else { "delete" };
            fresh_partitioned_topic(
                &client,
                &fill_topic,
                1,
                &a.fsync,
                cleanup,
                FILL_SEGMENT_BYTES,
                fill_segments,
            )
            .await?;
            let unseen = Mutex::new(histogram());
            produce_with(&producer, &fill_topic, fill, unacked, None, &done, &unseen).await?;
            if mode == 0 {
                client.compact_topic(&fill_topic, false).await?;
            }
            fresh_topic(&client, &a.topic, &a.fsync, a.segments).await?;
            let load = Load {
                messages: slice,
                size: a.size,
                keys: a.keys,
                partition: None,
            };
            let t = Instant::now();
            let h = Mutex::new(histogram());
            produce_with(&producer, &a.topic, load, unacked, None, &done, &h).await?;
            totals[mode].0 += slice;
            totals[mode].1 += t.elapsed().as_secs_f64();
            hists[mode]
                .add(&*h.lock().expect("latency histogram"))
                .expect("same histogram bounds");
            if mode == 0 {
                let t = Instant::now();
                client.compact_topic(&fill_topic, true).await?;
                busy_after.push(t.elapsed().as_secs_f64());
            }
            client.delete_topic(&fill_topic).await?;
        }
        drop_topic(&client, &a.topic, a.keep).await?;
        Ok::<_, ClientError>((totals, hists, busy_after))
    });
    let (totals, hists, busy_after) = match result {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench produce: {e}")),
    };
    let rate = |m: usize| totals[m].0 as f64 / totals[m].1.max(1e-9);
    let p99 = |m: usize| hists[m].value_at_quantile(0.99);
    let line = serde_json::json!({
        "workload": "produce_during_compaction_ab",
        "messages": a.messages,
        "size_bytes": a.size,
        "keys": a.keys,
        "in_flight": a.in_flight,
        "queued": a.queued(),
        "fsync": a.fsync,
        "rounds": rounds,
        "fill_bytes": a.fill_bytes,
        "compacting_msgs_per_s": rate(0),
        "plain_msgs_per_s": rate(1),
        "compacting_over_plain": rate(0) / rate(1),
        "compacting_p99_us": p99(0),
        "plain_p99_us": p99(1),
        "p99_compacting_over_plain": p99(0) as f64 / (p99(1) as f64).max(1.0),
        "cleaner_busy_after_slice_s": busy_after,
    });
    outln!("{line}");
    ExitCode::SUCCESS
}

/// `--compare-idempotence ROUNDS`: the cost of idempotence as a ratio
/// measured in one run. 2 x ROUNDS slices of the messages alternate between
/// an idempotent and a plain producer, in ABBA order so that neither mode
/// always goes first; each mode's rate is its records over its own time.
fn compare_idempotence(a: &BenchProduceArgs, rounds: u32) -> ExitCode {
    if rounds == 0 || a.messages < 2 * u64::from(rounds) {
        return fail(
            EXIT_USAGE,
            "--compare-idempotence needs at least 1 round and 2 messages per round",
        );
    }
    let done = AtomicU64::new(0);
    let config = a.broker.client_config();
    let result = smol::block_on(async {
        let client = Client::connect_with(&a.broker.broker, config.clone()).await?;
        fresh_topic(&client, &a.topic, &a.fsync, a.segments).await?;
        let in_flight = a.in_flight as usize;
        let on = bench_producer(&a.broker.broker, &config, true, in_flight).await?;
        let off = bench_producer(&a.broker.broker, &config, false, in_flight).await?;
        // Rates: 0 = idempotent, 1 = plain.
        let rates = abba(a, rounds, [&on, &off], &done).await?;
        drop_topic(&client, &a.topic, a.keep).await?;
        Ok::<_, ClientError>(rates)
    });
    let rate = match result {
        Ok(r) => move |m: usize| r[m],
        Err(e) => return fail(EXIT_RUNTIME, format!("bench produce: {e}")),
    };
    let line = serde_json::json!({
        "workload": "produce_idempotence_ab",
        "messages": a.messages,
        "size_bytes": a.size,
        "in_flight": a.in_flight,
        "queued": a.queued(),
        "fsync": a.fsync,
        "rounds": rounds,
        "idempotent_msgs_per_s": rate(0),
        "plain_msgs_per_s": rate(1),
        "idempotent_over_plain": rate(0) / rate(1),
    });
    outln!("{line}");
    ExitCode::SUCCESS
}

/// `--compare-tls TLS_ADDRESS`: what TLS costs, as a ratio measured in one
/// run. 2 x --rounds slices alternate between a plaintext producer on
/// --broker and a TLS producer on TLS_ADDRESS, ABBA, as
/// `--compare-idempotence` does; both are idempotent, on one topic.
fn compare_tls(a: &BenchProduceArgs, tls_addr: &str) -> ExitCode {
    if let Err(code) = super::commands::check_broker(tls_addr) {
        return code;
    }
    let rounds = a.rounds;
    if a.messages < 2 * u64::from(rounds) {
        return fail(EXIT_USAGE, "--compare-tls needs 2 messages per round");
    }
    let tls = a.broker.client_config();
    if tls.tls.is_none() {
        return fail(
            EXIT_USAGE,
            "--compare-tls needs the --tls-* options of the TLS listener (at least --tls-ca)",
        );
    }
    let plain = ClientConfig::default();
    let done = AtomicU64::new(0);
    let result = smol::block_on(async {
        let client = Client::connect_with(&a.broker.broker, plain.clone()).await?;
        fresh_topic(&client, &a.topic, &a.fsync, a.segments).await?;
        let in_flight = a.in_flight as usize;
        let over_plain = bench_producer(&a.broker.broker, &plain, a.idempotent, in_flight).await?;
        let over_tls = bench_producer(tls_addr, &tls, a.idempotent, in_flight).await?;
        // Rates: 0 = TLS, 1 = plaintext.
        let rates = abba(a, rounds, [&over_tls, &over_plain], &done).await?;
        drop_topic(&client, &a.topic, a.keep).await?;
        Ok::<_, ClientError>(rates)
    });
    let rate = match result {
        Ok(r) => move |m: usize| r[m],
        Err(e) => return fail(EXIT_RUNTIME, format!("bench produce: {e}")),
    };
    let line = serde_json::json!({
        "workload": "produce_tls_ab",
        "messages": a.messages,
        "size_bytes": a.size,
        "in_flight": a.in_flight,
        "queued": a.queued(),
        "idempotent": a.idempotent,
        "fsync": a.fsync,
        "rounds": rounds,
        "tls_msgs_per_s": rate(0),
        "plain_msgs_per_s": rate(1),
        "tls_over_plain": rate(0) / rate(1),
    });
    outln!("{line}");
    ExitCode::SUCCESS
}

/// `skiff bench handshake`: TLS handshakes per second against a TLS
/// listener, full (no session to resume) and resumed (one client config,
/// whose session cache the first handshake fills), each a TCP connect, a
/// handshake and skiff's hello, one at a time. Then, with --hold, that many connections
/// with hello done, held open so the broker's memory per connection can
/// be read (scripts/bench-tls does).
pub fn handshake(a: BenchHandshakeArgs) -> ExitCode {
    use crate::client::tls::TlsClient;
    let Some(options) = a.broker.tls() else {
        return fail(EXIT_USAGE, "bench handshake needs the --tls-* options");
    };
    let addr = a.broker.broker.clone();
    let tls = match TlsClient::new(&options) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_USAGE, format!("bench handshake: {e}")),
    };
    let name = match tls.server_name_for(&addr) {
        Ok(n) => n,
        Err(e) => return fail(EXIT_USAGE, format!("bench handshake: {e}")),
    };
    let mut no_resume = (*tls.config).clone();
    no_resume.resumption = rustls::client::Resumption::disabled();
    let full = std::sync::Arc::new(no_resume);
    let resumed = tls.config.clone();
    let run = |config: std::sync::Arc<rustls::ClientConfig>| {
        let (addr, name) = (addr.clone(), name.clone());
        smol::block_on(async move {
            let connector = futures_rustls::TlsConnector::from(config);
            // Each: connect, handshake, and skiff's hello, whose answer
            // also brings the session tickets a client resumes with.
            let one = || async {
                let s = crate::sockets::connect_tcp(&addr).await?;
                s.set_nodelay(true)?;
                let mut t = connector.connect(name.clone(), s).await?;
                hello_over(&mut t).await?;
                Ok::<_, std::io::Error>(
                    t.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                )
            };
            // One to warm up (and fill the session cache).
            one().await?;
            let mut resumed = 0u32;
            let start = Instant::now();
            for _ in 0..a.count {
                resumed += u32::from(one().await?);
            }
            Ok::<_, std::io::Error>((start.elapsed(), resumed))
        })
    };
    let (full_t, _) = match run(full) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench handshake: {e}")),
    };
    let (resumed_t, resumed_n) = match run(resumed) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench handshake: {e}")),
    };
    let mut line = serde_json::json!({
        "workload": "tls_handshake",
        "count": a.count,
        "full_per_s": f64::from(a.count) / full_t.as_secs_f64().max(1e-9),
        "resumed_per_s": f64::from(a.count) / resumed_t.as_secs_f64().max(1e-9),
        "resumed": resumed_n,
    });
    if a.hold > 0 {
        let config = a.broker.client_config();
        let held = smol::block_on(async {
            let mut clients = Vec::with_capacity(a.hold as usize);
            for _ in 0..a.hold {
                let c = Client::connect_with(&addr, config.clone()).await?;
                clients.push(c);
            }
            eprintln!("holding {} connections for {} ms", a.hold, a.hold_ms);
            smol::Timer::after(Duration::from_millis(a.hold_ms)).await;
            Ok::<_, ClientError>(clients.len())
        });
        match held {
            Ok(n) => line["held"] = n.into(),
            Err(e) => return fail(EXIT_RUNTIME, format!("bench handshake --hold: {e}")),
        }
    }
    outln!("{line}");
    ExitCode::SUCCESS
}

/// Sends skiff's hello and reads its answer.
async fn hello_over<S>(s: &mut S) -> std::io::Result<()>
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    let hello = crate::protocol::RequestBody::Hello(crate::protocol::HelloRequest {
        version_min: crate::protocol::PROTOCOL_VERSION_MIN,
        version_max: crate::protocol::PROTOCOL_VERSION_MAX,
        client_name: None,
    });
    let (mut frame, mut answer) = (Vec::new(), Vec::new());
    super::bench_device::exchange(s, 1, &hello, &mut frame, &mut answer)
        .await
        .map(drop)
        .map_err(std::io::Error::other)
}

pub fn consume(a: BenchConsumeArgs) -> ExitCode {
    if let Err(code) = super::commands::check_broker(&a.broker.broker) {
        return code;
    }
    let Ok(min) = Duration::try_from_secs_f64(a.min_seconds) else {
        return fail(
            EXIT_USAGE,
            format!(
                "bench consume: --min-seconds {} is not a number of seconds",
                a.min_seconds
            ),
        );
    };
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let result = smol::block_on(async {
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(100),
            offset_reset: OffsetReset::Fail,
            client: a.broker.client_config(),
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::connect(&a.broker.broker, config).await?;
        let client = consumer.client().clone();
        let d = client.describe_topic(&a.topic).await?;
        let end: u64 = d
            .partitions
            .iter()
            .map(|p| p.latest_offset - p.earliest_offset)
            .sum();
        let target = a.messages.unwrap_or(end).min(end);
        consumer.assign(&a.topic, None, StartFrom::Earliest).await?;
        let cpu_before = a.broker_pid.and_then(process_cpu);
        let start = Instant::now();
        let progress_thread = {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || progress(&done, target, start, &stop))
        };
        let (mut records, mut bytes, mut passes) = (0u64, 0u64, 0u64);
        loop {
            let pass_end = records + target;
            while records < pass_end {
                for r in consumer.poll_batch().await?.iter() {
                    records += 1;
                    bytes += (r.value.len() + r.key.map_or(0, <[u8]>::len)) as u64;
                }
                done.store(records, Ordering::Relaxed);
            }
            passes += 1;
            if target == 0 || start.elapsed() >= min {
                break;
            }
            consumer.assign(&a.topic, None, StartFrom::Earliest).await?;
        }
        let elapsed = start.elapsed();
        let cpu = grown(cpu_before, a.broker_pid.and_then(process_cpu));
        stop.store(1, Ordering::Relaxed);
        let _ = progress_thread.join();
        Ok::<_, ClientError>((records, bytes, passes, elapsed, cpu))
    });
    let (records, bytes, passes, elapsed, cpu) = match result {
        Ok(r) => r,
        Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {
            return fail(
                EXIT_RUNTIME,
                format!(
                    "bench consume: {e} (run `skiff bench produce --keep` first: without --keep it deletes its topic)"
                ),
            )
        }
        Err(e) => return fail(EXIT_RUNTIME, format!("bench consume: {e}")),
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut line = serde_json::json!({
        "workload": "consume",
        "messages": records,
        "passes": passes,
        "payload_bytes": bytes,
        "elapsed_s": secs,
        "msgs_per_s": records as f64 / secs,
        "mb_per_s": bytes as f64 / secs / 1e6,
    });
    add_broker_cpu(&mut line, cpu, records);
    outln!("{line}");
    ExitCode::SUCCESS
}

/// `skiff bench disk`: the raw bandwidth docs/performance.md puts beside
/// every produce figure, measured where the data lives.
pub fn disk(a: BenchDiskArgs) -> ExitCode {
    use crate::storage::io::raw_bandwidth::{self, Prepare, WRITE_BYTES, WRITE_DEPTH};
    if a.bytes < WRITE_BYTES as u64 {
        return fail(EXIT_USAGE, "--bytes must be at least 1048576 (one write)");
    }
    let dir = a.dir.display();
    // Checked before the progress line, so an error is the only line.
    match std::fs::metadata(&a.dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return fail(EXIT_RUNTIME, format!("bench disk {dir}: not a directory")),
        Err(e) => return fail(EXIT_RUNTIME, format!("bench disk {dir}: {e}")),
    }
    let mut preps = vec![("fresh", Prepare::Fallocate)];
    if a.overwrite {
        preps.push(("overwrite", Prepare::PreWritten));
    }
    let mut line = serde_json::json!({
        "workload": "disk",
        "dir": dir.to_string(),
        "write_bytes": WRITE_BYTES,
        "in_flight": WRITE_DEPTH,
    });
    // First: the passes below leave the device writing back gigabytes
    // for a while, which slows every flush after them.
    if let Some(window) = a.window {
        eprintln!("progress: durable windows of {window} bytes under {dir}");
        let r = match raw_bandwidth::measure_windows(&a.dir, a.bytes, window as usize) {
            Ok(r) => r,
            Err(e) => return fail(EXIT_RUNTIME, format!("bench disk {dir}: {e}")),
        };
        line["window_bytes"] = r.window_bytes.into();
        line["window_mb_per_s"] = (r.bytes_per_sec / 1e6).into();
        line["window_elapsed_s"] = r.elapsed.as_secs_f64().into();
        line["window_device_flushes"] = r.device_flushes.into();
    }
    for (name, prep) in preps {
        eprintln!(
            "progress: writing {} MiB under {dir} ({name})",
            a.bytes >> 20
        );
        let r = match raw_bandwidth::measure_prepared(&a.dir, a.bytes, prep) {
            Ok(r) => r,
            Err(e) => return fail(EXIT_RUNTIME, format!("bench disk {dir}: {e}")),
        };
        line["backend"] = r.backend.into();
        line["bytes"] = r.total_bytes.into();
        line[format!("{name}_mb_per_s")] = (r.bytes_per_sec / 1e6).into();
        line[format!("{name}_elapsed_s")] = r.elapsed.as_secs_f64().into();
        line[format!("{name}_device_flushes")] = r.device_flushes.into();
        line[format!("{name}_read_mb_per_s")] = (r.read_bytes_per_sec / 1e6).into();
    }
    outln!("{line}");
    ExitCode::SUCCESS
}

/// `skiff bench sync`: the device's durable-write latency, which an ack
/// with fsync always waits for at least; bench-broker prints its p99
/// beside the produce p99s of the same run.
pub fn sync(a: BenchSyncArgs) -> ExitCode {
    use crate::storage::io::raw_bandwidth::{sync_latencies, SYNC_WRITE_BYTES};
    let dir = a.dir.display();
    match std::fs::metadata(&a.dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return fail(EXIT_RUNTIME, format!("bench sync {dir}: not a directory")),
        Err(e) => return fail(EXIT_RUNTIME, format!("bench sync {dir}: {e}")),
    }
    let run = match sync_latencies(&a.dir, a.count as usize, a.rate) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench sync {dir}: {e}")),
    };
    let mut hist = histogram();
    for t in &run.times {
        hist.saturating_record((t.as_micros() as u64).max(1));
    }
    let per_write = |total: f64| total / a.count as f64;
    outln!(
        "{}",
        serde_json::json!({
            "workload": "sync",
            "dir": dir.to_string(),
            "count": a.count,
            "rate": a.rate,
            "write_bytes": SYNC_WRITE_BYTES,
            "sync_us": percentiles(&hist),
            "cpu_us_per_write": run.cpu.map(|c| per_write(c.as_secs_f64() * 1e6)),
            "voluntary_switches_per_write": run.voluntary_switches.map(|n| per_write(n as f64)),
        })
    );
    ExitCode::SUCCESS
}

/// `skiff bench loopback`: what one TCP connection over 127.0.0.1 carries,
/// the limit docs/performance.md puts beside replay figures. A thread writes
/// 1 MiB chunks, this one reads them into a 1 MiB buffer, as a consumer
/// reads fetch answers. With `--window`, also what it carries when the
/// writer waits for a one-byte answer after each window, as a producer
/// with that much in flight waits for its acks.
pub fn loopback(a: BenchLoopbackArgs) -> ExitCode {
    const CHUNK: usize = 1 << 20;
    let chunks = a.bytes / CHUNK as u64;
    if chunks == 0 {
        return fail(EXIT_USAGE, "--bytes must be at least 1048576 (one write)");
    }
    let (bytes, elapsed) = match loopback_run(chunks * CHUNK as u64, CHUNK, None) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench loopback: {e}")),
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut line = serde_json::json!({
        "workload": "loopback",
        "bytes": bytes,
        "write_bytes": CHUNK,
        "elapsed_s": secs,
        "mb_per_s": bytes as f64 / secs / 1e6,
    });
    if let Some(window) = a.window {
        let window = window as usize;
        let windows = (a.bytes / window as u64).max(1);
        let (bytes, elapsed) =
            match loopback_run(windows * window as u64, CHUNK.min(window), Some(window)) {
                Ok(r) => r,
                Err(e) => return fail(EXIT_RUNTIME, format!("bench loopback: {e}")),
            };
        let secs = elapsed.as_secs_f64().max(1e-9);
        line["window_bytes"] = window.into();
        line["window_elapsed_s"] = secs.into();
        line["window_mb_per_s"] = (bytes as f64 / secs / 1e6).into();
    }
    outln!("{line}");
    ExitCode::SUCCESS
}

/// Sends `total` bytes over one loopback connection in writes of `chunk`,
/// the receiver reading into a buffer of that size; with `window`, the
/// sender waits for a byte back after each `window` bytes. The receiver's
/// time from its first read's start to the last byte.
fn loopback_run(
    total: u64,
    chunk: usize,
    window: Option<usize>,
) -> std::io::Result<(u64, Duration)> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let data = vec![0x5a; chunk];
        let window = window.unwrap_or(usize::MAX) as u64;
        let (mut sent, mut since_ack) = (0u64, 0u64);
        while sent < total {
            let n = (total - sent).min(chunk as u64).min(window - since_ack) as usize;
            s.write_all(&data[..n])?;
            sent += n as u64;
            since_ack += n as u64;
            if since_ack == window {
                s.read_exact(&mut [0u8])?;
                since_ack = 0;
            }
        }
        Ok(())
    });
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut buf = vec![0; chunk];
    let window = window.map_or(u64::MAX, |w| w as u64);
    let start = Instant::now();
    let (mut got, mut since_ack) = (0u64, 0u64);
    while got < total {
        let want = buf.len().min((window - since_ack) as usize);
        match s.read(&mut buf[..want])? {
            0 => break,
            n => {
                got += n as u64;
                since_ack += n as u64;
            }
        }
        if since_ack == window {
            s.write_all(&[1])?;
            since_ack = 0;
        }
    }
    let elapsed = start.elapsed();
    writer.join().expect("loopback writer thread")?;
    if got != total {
        return Err(std::io::Error::other(format!(
            "received {got} of {total} bytes"
        )));
    }
    Ok((got, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_loop_schedule_spaces_records_evenly() {
        let start = Instant::now();
        let s = Schedule {
            start,
            per_second: 3,
        };
        assert_eq!(s.due(0), start);
        assert_eq!(s.due(1), start + Duration::from_nanos(333_333_333));
        assert_eq!(s.due(3), start + Duration::from_secs(1));
        // No overflow at a billion records at a billion a second.
        let fast = Schedule {
            start,
            per_second: 1_000_000_000,
        };
        assert_eq!(fast.due(1_000_000_000), start + Duration::from_secs(1));
    }

    #[test]
    fn latency_runs_record_what_per_record_recording_would() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let pairs = [(0, 900), (0, 900), (0, 900), (5, 900), (5, 2000), (0, 900)];
        let shared = Mutex::new(histogram());
        let mut runs = LatencyRuns::new(&shared);
        let mut each = histogram();
        for (s, a) in pairs {
            runs.record(at(s), at(a));
            each.record(a - s).unwrap();
        }
        runs.finish();
        let runs = shared.into_inner().unwrap();
        assert_eq!(runs.len(), each.len());
        for q in [0.0, 0.5, 0.9, 1.0] {
            assert_eq!(runs.value_at_quantile(q), each.value_at_quantile(q));
        }
    }
}
