//! `skiff bench group`: a consumer group keeping up with an open-loop
//! producer. Reports end-to-end latency (produce call to delivery by a
//! member, p50/p99), the time from a member's clean leave to its
//! partitions being read again, and the commit rate with the offsets-log
//! writes (fsyncs) it cost. One JSON line on stdout.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::client::{
    Client, ClientError, GroupConfig, GroupConsumer, Producer, ProducerConfig, StartFrom,
};
use crate::protocol::{CreateTopicRequest, ErrorCode, OffsetCommitPartition};

use super::args::BenchGroupArgs;
use super::{fail, EXIT_RUNTIME};

const LATENCY_US_MAX: u64 = 60_000_000;

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What the members share with the bench.
struct Shared {
    latency: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
    /// (when member 0 began to leave, its partitions), once it did.
    leave: Mutex<Option<(Instant, BTreeSet<u32>)>>,
    /// When each of the leaver's partitions was first read by another.
    reread: Mutex<BTreeMap<u32, Instant>>,
    stop: AtomicBool,
    /// Set by the bench: member 0 leaves now.
    leave_now: AtomicBool,
}

fn member(addr: String, a: BenchGroupArgs, group: String, index: usize, shared: Arc<Shared>) {
    let result: Result<(), ClientError> = smol::block_on(async {
        let mut cfg = GroupConfig::new(&group, &[&a.topic]);
        cfg.session_timeout = Duration::from_secs(10);
        cfg.heartbeat_interval = Duration::from_millis(a.heartbeat_ms);
        cfg.auto_commit_interval = Some(Duration::from_secs(1));
        cfg.start_from = StartFrom::Latest;
        cfg.consumer.max_wait = Duration::from_millis(100);
        cfg.consumer.client = a.broker.client_config();
        let mut m = GroupConsumer::connect(&addr, cfg).await?;
        let mut local = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3).expect("bounds");
        while !shared.stop.load(Ordering::Relaxed) {
            if index == 0 && shared.leave_now.load(Ordering::Relaxed) {
                let mine: BTreeSet<u32> = m.assignment().into_iter().map(|(_, p)| p).collect();
                *shared.leave.lock().unwrap() = Some((Instant::now(), mine));
                return m.close().await;
            }
            let records = m.poll().await?;
            let now = wall_ns();
            let leave = shared.leave.lock().unwrap().clone();
            for r in &records {
                if r.value.len() >= 8 {
                    let sent = u64::from_be_bytes(r.value[..8].try_into().expect("8 bytes"));
                    let us = now.saturating_sub(sent) / 1000;
                    let _ = local.record(us.clamp(1, LATENCY_US_MAX));
                }
                if let Some((_, parts)) = &leave {
                    if parts.contains(&r.partition) {
                        shared
                            .reread
                            .lock()
                            .unwrap()
                            .entry(r.partition)
                            .or_insert_with(Instant::now);
                    }
                }
            }
            shared
                .delivered
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        shared
            .latency
            .lock()
            .unwrap()
            .add(&local)
            .expect("same bounds");
        m.close().await
    });
    if let Err(e) = result {
        eprintln!("bench group: member {index}: {e}");
    }
}

/// A counter's value from the metrics endpoint's text, 0 if absent.
fn scrape(addr: &str, family: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with(family) && l[family.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn group(a: BenchGroupArgs) -> ExitCode {
    if let Err(code) = super::commands::check_broker(&a.broker.broker) {
        return code;
    }
    match run(a) {
        Ok(line) => {
            outln!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_RUNTIME, format!("bench group: {e}")),
    }
}

fn run(a: BenchGroupArgs) -> Result<serde_json::Value, ClientError> {
    let addr = a.broker.broker.clone();
    let group = format!("bench-{}", std::process::id());
    let client = smol::block_on(Client::connect_with(&addr, a.broker.client_config()))?;
    smol::block_on(async {
        match client.delete_topic(&a.topic).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {}
            Err(e) => return Err(e),
        }
        client
            .create_topic(CreateTopicRequest {
                name: a.topic.clone(),
                partitions: Some(a.partitions),
                // 8 x 2 x 16 MiB = 256 MiB: 12 s of 200k rec/s per ring.
                segment_bytes: Some(16 * 1024 * 1024),
                segments: Some(2),
                fsync: Some(a.fsync.clone()),
                ..CreateTopicRequest::default()
            })
            .await
            .map(|_| ())
    })?;
    let shared = Arc::new(Shared {
        latency: Mutex::new(Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("bounds")),
        delivered: AtomicU64::new(0),
        leave: Mutex::new(None),
        reread: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
        leave_now: AtomicBool::new(false),
    });
    let members: Vec<_> = (0..a.members)
        .map(|i| {
            let (addr, a, g, s) = (addr.clone(), a.clone(), group.clone(), shared.clone());
            std::thread::spawn(move || member(addr, a, g, i, s))
        })
        .collect();
    // Every member in, every partition assigned.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(d) = smol::block_on(client.describe_group(&group)) {
            let assigned: usize = d.members.iter().map(|m| m.assignment.len()).sum();
            if d.state == "Stable"
                && d.members.len() == a.members
                && assigned == a.partitions as usize
            {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(ClientError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let commits_before = a.metrics.as_deref().map(|m| {
        (
            scrape(m, "skiff_group_commits_total").unwrap_or(0.0),
            scrape(m, "skiff_group_offset_log_writes_total").unwrap_or(0.0),
        )
    });

    // The open loop: record i due at start + i / rate, stamped when due.
    let total = a.rate * a.seconds;
    let started = Instant::now();
    let produced = smol::block_on(async {
        let producer = Producer::connect(
            &addr,
            ProducerConfig {
                client: a.broker.client_config(),
                linger: Duration::from_millis(1),
                ..ProducerConfig::default()
            },
        )
        .await?;
        let mut value = vec![b'x'; a.size.max(8)];
        let mut pending = std::collections::VecDeque::new();
        let mut left = false;
        for i in 0..total {
            let due = started
                + Duration::from_nanos((u128::from(i) * 1_000_000_000 / u128::from(a.rate)) as u64);
            let now = Instant::now();
            if due > now {
                smol::Timer::at(due).await;
            }
            if !left && i >= total / 2 {
                shared.leave_now.store(true, Ordering::Relaxed);
                left = true;
            }
            let stamp = wall_ns() - due.elapsed().as_nanos() as u64;
            value[..8].copy_from_slice(&stamp.to_be_bytes());
            pending.push_back(producer.send_wait(&a.topic, None, &value, &[]).await?);
            while pending.len() > 50_000 {
                pending.pop_front().expect("non-empty").await?;
            }
        }
        producer.flush().await;
        for d in pending {
            d.await?;
        }
        Ok::<u64, ClientError>(total)
    })?;
    let produce_s = started.elapsed().as_secs_f64();
    // Keeping up: every record delivered within a few seconds of the last
    // produce (members that stayed also re-read what the leaver had not
    // committed, so deliveries may exceed the count).
    let caught_up = Instant::now();
    while shared.delivered.load(Ordering::Relaxed) < produced
        && caught_up.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let drain_s = caught_up.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    for m in members {
        let _ = m.join();
    }
    let reassign_ms = {
        let leave = shared.leave.lock().unwrap().clone();
        let reread = shared.reread.lock().unwrap();
        leave.and_then(|(at, parts)| {
            let times: Option<Vec<Instant>> =
                parts.iter().map(|p| reread.get(p).copied()).collect();
            times
                .and_then(|t| t.into_iter().max())
                .map(|t| t.duration_since(at).as_secs_f64() * 1e3)
        })
    };
    let hist = shared.latency.lock().unwrap().clone();

    // Commit rate: many concurrent committers on one connection, to a
    // group without members.
    let commit_group = format!("{group}-commits");
    let commit_started = Instant::now();
    let commits = Arc::new(AtomicU64::new(0));
    let until = commit_started + Duration::from_secs(a.commit_seconds);
    let tasks: Vec<smol::Task<Result<(), ClientError>>> = (0..a.committers)
        .map(|t| {
            let (client, g, topic, commits) = (
                client.clone(),
                commit_group.clone(),
                a.topic.clone(),
                commits.clone(),
            );
            let partition = t % a.partitions;
            smol::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < until {
                    let o = vec![OffsetCommitPartition {
                        topic: topic.clone(),
                        partition,
                        offset: i,
                        metadata: None,
                    }];
                    client.commit_offsets(&g, None, o).await?;
                    commits.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    smol::block_on(async {
        for t in tasks {
            t.await?;
        }
        Ok::<(), ClientError>(())
    })?;
    let commit_s = commit_started.elapsed().as_secs_f64();
    let writes = commits_before.and_then(|(c0, w0)| {
        // The metrics copy the coordinator's counters once a second.
        std::thread::sleep(Duration::from_millis(1500));
        let m = a.metrics.as_deref()?;
        let c1 = scrape(m, "skiff_group_commits_total")?;
        let w1 = scrape(m, "skiff_group_offset_log_writes_total")?;
        Some((c1 - c0, w1 - w0))
    });
    let _ = smol::block_on(client.delete_group(&commit_group));
    let _ = smol::block_on(client.delete_topic(&a.topic));
    let n = commits.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "workload": "group",
        "members": a.members,
        "partitions": a.partitions,
        "rate": a.rate,
        "produced": produced,
        "delivered": shared.delivered.load(Ordering::Relaxed),
        "produce_s": produce_s,
        "drain_after_produce_s": drain_s,
        "e2e_p50_ms": hist.value_at_quantile(0.5) as f64 / 1e3,
        "e2e_p99_ms": hist.value_at_quantile(0.99) as f64 / 1e3,
        "e2e_max_ms": hist.max() as f64 / 1e3,
        "leave_to_reread_ms": reassign_ms,
        "commits": n,
        "commits_per_s": n as f64 / commit_s,
        "offset_log_writes_per_commit": writes.map(|(c, w)| if c > 0.0 { w / c } else { 0.0 }),
    }))
}
