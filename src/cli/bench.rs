//! `skiff bench`: the standard workloads of BENCHMARKING.md against a
//! running broker. A progress line goes to stderr each second; the result is
//! one JSON line on stdout.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{
    Client, ClientError, Consumer, ConsumerConfig, OffsetReset, Producer, ProducerConfig, StartFrom,
};
use crate::protocol::{CreateTopicRequest, ErrorCode};

use super::args::{BenchConsumeArgs, BenchDiskArgs, BenchLoopbackArgs, BenchProduceArgs};
use super::{fail, EXIT_RUNTIME, EXIT_USAGE};

/// Latencies are recorded in microseconds, up to a minute, 3 significant
/// digits.
const LATENCY_US_MAX: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Records send-to-ack latencies into a histogram, one `record_n` per run
/// of records that share their send-clock reading and their batch's ack
/// time (a subtraction and a histogram update per record were a twentieth
/// of the bench's own CPU).
struct LatencyRuns {
    hist: Histogram<u64>,
    run: Option<(Instant, Instant)>,
    count: u64,
}

impl LatencyRuns {
    fn new() -> LatencyRuns {
        LatencyRuns {
            hist: histogram(),
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
            let _ = self.hist.record_n(us.min(LATENCY_US_MAX), self.count);
        }
    }

    fn finish(mut self) -> Histogram<u64> {
        self.flush();
        self.hist
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

/// Deletes and recreates the bench topic so every run starts empty.
async fn fresh_topic(client: &Client, topic: &str, fsync: &str) -> Result<(), ClientError> {
    match client.delete_topic(topic).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {}
        Err(e) => return Err(e),
    }
    client
        .create_topic(CreateTopicRequest {
            name: topic.to_owned(),
            partitions: Some(1),
            segment_bytes: Some(64 * 1024 * 1024),
            segments: Some(8),
            fsync: Some(fsync.to_owned()),
            ..CreateTopicRequest::default()
        })
        .await?;
    Ok(())
}

async fn bench_producer(
    addr: &str,
    idempotent: bool,
    in_flight: usize,
) -> Result<Producer, ClientError> {
    Producer::connect(
        addr,
        ProducerConfig {
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

/// How many records a bench producer keeps on the wire, and how many more
/// it holds built while they are answered.
#[derive(Clone, Copy)]
struct Window {
    in_flight: usize,
    queued: usize,
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

#[allow(clippy::too_many_arguments)]
async fn produce_one(
    addr: String,
    topic: Arc<str>,
    messages: u64,
    size: usize,
    window: Window,
    schedule: Option<Schedule>,
    idempotent: bool,
    done: Arc<AtomicU64>,
) -> Result<Histogram<u64>, ClientError> {
    let producer = bench_producer(&addr, idempotent, window.in_flight).await?;
    let unacked = window.in_flight + window.queued;
    produce_with(&producer, &topic, messages, size, unacked, schedule, &done).await
}

/// Workload P's loop on one producer: `messages` records, at most
/// `unacked` given to the producer and not acknowledged (the producer
/// itself keeps at most `--in-flight` of them on the wire); the
/// send-to-ack latency histogram.
///
/// With a `schedule` it is the open loop: no record is sent before it is
/// due, and its latency counts from when it was due, so a stall that holds
/// sends back (a full window, a late timer, a slow broker) is in the
/// histogram rather than hidden by sending later (coordinated omission).
async fn produce_with(
    producer: &Producer,
    topic: &str,
    messages: u64,
    size: usize,
    unacked: usize,
    schedule: Option<Schedule>,
    done: &AtomicU64,
) -> Result<Histogram<u64>, ClientError> {
    let value = vec![b'x'; size];
    let mut hist = LatencyRuns::new();
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
                    now = smol::Timer::at(sent_at).await;
                }
            }
        } else {
            since_clock += 1;
            if since_clock >= CLOCK_EVERY {
                sent_at = Instant::now();
                since_clock = 0;
            }
        }
        let d = producer.send_wait(topic, None, &value, &[]).await?;
        pending.push_back((sent_at, d));
    }
    producer.flush().await;
    while let Some((sent, d)) = pending.pop_front() {
        let meta = d.await?;
        hist.record(sent, meta.acked_at);
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(hist.finish())
}

pub fn produce(a: BenchProduceArgs) -> ExitCode {
    if a.producers == 0 || a.size == 0 || a.in_flight == 0 {
        return fail(
            EXIT_USAGE,
            "--producers, --size and --in-flight must be at least 1",
        );
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
    if a.rate.is_some_and(|r| r < u64::from(a.producers)) {
        return fail(
            EXIT_USAGE,
            "--rate must be at least 1 record/s per producer",
        );
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let result = smol::block_on(async {
        let client = Client::connect(&a.broker.broker).await?;
        fresh_topic(&client, &a.topic, &a.fsync).await?;
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
        let per = a.messages / u64::from(a.producers);
        let tasks: Vec<_> = (0..a.producers)
            .map(|i| {
                // The first producer takes the remainder.
                let n = per
                    + if i == 0 {
                        a.messages % u64::from(a.producers)
                    } else {
                        0
                    };
                smol::spawn(produce_one(
                    a.broker.broker.clone(),
                    topic.clone(),
                    n,
                    a.size,
                    Window {
                        in_flight: a.in_flight as usize,
                        queued: a.queued() as usize,
                    },
                    schedule,
                    a.idempotent,
                    done.clone(),
                ))
            })
            .collect();
        let mut hist = histogram();
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(h) => hist.add(&h).expect("same histogram bounds"),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let elapsed = start.elapsed();
        stop.store(1, Ordering::Relaxed);
        let _ = progress_thread.join();
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok((elapsed, hist))
    });
    let (elapsed, hist) = match result {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench produce: {e}")),
    };
    let secs = elapsed.as_secs_f64();
    let mut line = serde_json::json!({
        "workload": if a.rate.is_some() { "produce_open_loop" } else { "produce" },
        "messages": a.messages,
        "size_bytes": a.size,
        "producers": a.producers,
        "in_flight": a.in_flight,
        "queued": a.queued(),
        "idempotent": a.idempotent,
        "fsync": a.fsync,
        "elapsed_s": secs,
        "msgs_per_s": a.messages as f64 / secs,
        "mb_per_s": (a.messages as f64 * a.size as f64) / secs / 1e6,
        "ack_latency_us": {
            "p50": hist.value_at_quantile(0.50),
            "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999),
            "max": hist.max(),
        },
    });
    if let Some(rate) = a.rate {
        // The latencies above count from each record's due time.
        line["rate"] = rate.into();
    }
    println!("{line}");
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
    let result = smol::block_on(async {
        let client = Client::connect(&a.broker.broker).await?;
        fresh_topic(&client, &a.topic, &a.fsync).await?;
        let in_flight = a.in_flight as usize;
        let on = bench_producer(&a.broker.broker, true, in_flight).await?;
        let off = bench_producer(&a.broker.broker, false, in_flight).await?;
        let slice = a.messages / (2 * u64::from(rounds));
        // [records, seconds] per mode: 0 = idempotent, 1 = plain.
        let mut totals = [[0f64; 2]; 2];
        for r in 0..2 * rounds {
            let idempotent = matches!(r % 4, 0 | 3);
            let (producer, mode) = if idempotent { (&on, 0) } else { (&off, 1) };
            let t = Instant::now();
            produce_with(
                producer,
                &a.topic,
                slice,
                a.size,
                in_flight + a.queued() as usize,
                None,
                &done,
            )
            .await?;
            totals[mode][0] += slice as f64;
            totals[mode][1] += t.elapsed().as_secs_f64();
        }
        Ok::<_, ClientError>(totals)
    });
    let totals = match result {
        Ok(t) => t,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench produce: {e}")),
    };
    let rate = |m: usize| totals[m][0] / totals[m][1].max(1e-9);
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
    println!("{line}");
    ExitCode::SUCCESS
}

pub fn consume(a: BenchConsumeArgs) -> ExitCode {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let result = smol::block_on(async {
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(100),
            offset_reset: OffsetReset::Fail,
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
        let start = Instant::now();
        let progress_thread = {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || progress(&done, target, start, &stop))
        };
        let (mut records, mut bytes) = (0u64, 0u64);
        while records < target {
            for r in consumer.poll().await? {
                records += 1;
                bytes += r.value.len() as u64 + r.key.as_ref().map_or(0, |k| k.len() as u64);
            }
            done.store(records, Ordering::Relaxed);
        }
        let elapsed = start.elapsed();
        stop.store(1, Ordering::Relaxed);
        let _ = progress_thread.join();
        Ok::<_, ClientError>((records, bytes, elapsed))
    });
    let (records, bytes, elapsed) = match result {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench consume: {e}")),
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    let line = serde_json::json!({
        "workload": "consume",
        "messages": records,
        "payload_bytes": bytes,
        "elapsed_s": secs,
        "msgs_per_s": records as f64 / secs,
        "mb_per_s": bytes as f64 / secs / 1e6,
    });
    println!("{line}");
    ExitCode::SUCCESS
}

/// `skiff bench disk`: the raw bandwidth BENCHMARKING.md puts beside every
/// produce figure, measured where the data lives.
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
    }
    println!("{line}");
    ExitCode::SUCCESS
}

/// `skiff bench loopback`: what one TCP connection over 127.0.0.1 carries,
/// the limit BENCHMARKING.md puts beside replay figures. A thread writes
/// 1 MiB chunks, this one reads them into a 1 MiB buffer, as a consumer
/// reads fetch answers.
pub fn loopback(a: BenchLoopbackArgs) -> ExitCode {
    use std::io::{Read, Write};
    const CHUNK: usize = 1 << 20;
    let chunks = a.bytes / CHUNK as u64;
    if chunks == 0 {
        return fail(EXIT_USAGE, "--bytes must be at least 1048576 (one write)");
    }
    let measure = || -> std::io::Result<(u64, Duration)> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let mut s = std::net::TcpStream::connect(addr)?;
            let chunk = vec![0x5a; CHUNK];
            for _ in 0..chunks {
                s.write_all(&chunk)?;
            }
            Ok(())
        });
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0; CHUNK];
        let start = Instant::now();
        let mut got = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => break,
                n => got += n as u64,
            }
        }
        let elapsed = start.elapsed();
        writer.join().expect("loopback writer thread")?;
        if got != chunks * CHUNK as u64 {
            return Err(std::io::Error::other(format!(
                "received {got} of {} bytes",
                chunks * CHUNK as u64
            )));
        }
        Ok((got, elapsed))
    };
    let (bytes, elapsed) = match measure() {
        Ok(r) => r,
        Err(e) => return fail(EXIT_RUNTIME, format!("bench loopback: {e}")),
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    let line = serde_json::json!({
        "workload": "loopback",
        "bytes": bytes,
        "write_bytes": CHUNK,
        "elapsed_s": secs,
        "mb_per_s": bytes as f64 / secs / 1e6,
    });
    println!("{line}");
    ExitCode::SUCCESS
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
        let mut runs = LatencyRuns::new();
        let mut each = histogram();
        for (s, a) in pairs {
            runs.record(at(s), at(a));
            each.record(a - s).unwrap();
        }
        let runs = runs.finish();
        assert_eq!(runs.len(), each.len());
        for q in [0.0, 0.5, 0.9, 1.0] {
            assert_eq!(runs.value_at_quantile(q), each.value_at_quantile(q));
        }
    }
}
