//! How much of its throughput a well-behaved producer keeps while other
//! clients misbehave (the abuses of tests/overload.rs, from
//! tests/common/abuse.rs), against the real binary: a benchmark, not a
//! timed test. `scripts/bench-overload` runs it.
//!
//! For each abuse: the producer alone, then under the abuse, then alone
//! again (A B A, so a drift in the machine shows up in the two A's). The
//! producer sends 10-record batches of 100-byte values to its own topic
//! (`fsync = always`) and awaits each ack. One line per abuse: records/s
//! alone (the mean of the two A's), under the abuse, and the ratio; the
//! target is at least 80%. The broker's peak RSS against the budget
//! `skiff config check` prints is on the same line.
//!
//! Each line also gives the fdatasync groups per good batch and their mean
//! duration, alone and under the abuse (from the metrics endpoint): a
//! producer awaiting each ack waits for at least one group per batch.
//!
//! `SKIFF_OVERLOAD_SECONDS` (default 3) sets the length of each phase;
//! `SKIFF_OVERLOAD_ONLY=WORD` runs only the abuses whose name has WORD.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::abuse::*;
use common::*;
use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::protocol::ProducePartition;

const TARGET_RATIO: f64 = 0.8;

/// The broker's fdatasync groups so far: how many, and their total seconds.
fn sync_groups(metrics: &str) -> (f64, f64) {
    let text = http_get(metrics, "/metrics");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics"))
    };
    (
        value("skiff_storage_fsync_duration_seconds_count"),
        value("skiff_storage_fsync_duration_seconds_sum"),
    )
}

/// A producer phase: records/s, fdatasync groups per batch of 10 and
/// their mean duration in ms.
struct Phase {
    rate: f64,
    groups_per_batch: f64,
    group_ms: f64,
}

fn phase(addr: &str, metrics: &str, secs: f64) -> Phase {
    let (n0, s0) = sync_groups(metrics);
    let rate = producer_rate(addr, "good", secs);
    let (n1, s1) = sync_groups(metrics);
    let batches = rate * secs / 10.0;
    Phase {
        rate,
        groups_per_batch: (n1 - n0) / batches,
        group_ms: if n1 > n0 {
            (s1 - s0) / (n1 - n0) * 1e3
        } else {
            0.0
        },
    }
}

/// Records/s one producer gets for `secs`, acks awaited one batch at a time.
fn producer_rate(addr: &str, topic: &str, secs: f64) -> f64 {
    let c = skiff::client::blocking::Client::connect(addr).expect("connect");
    let mut bb = BatchBuilder::new();
    for i in 0..10u8 {
        bb.push(1, None, &[i; 100], &[]);
    }
    let batch = bb.finish(ProducerStamp::NONE);
    let started = Instant::now();
    let mut records = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        let r = c
            .produce_raw(vec![ProducePartition {
                topic: topic.into(),
                partition: 0,
                batch: batch.clone().into(),
            }])
            .expect("produce");
        assert!(r[0].error.is_none(), "{:?}", r[0].error);
        records += 10;
    }
    records as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let secs: f64 = std::env::var("SKIFF_OVERLOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    raise_fd_limit(12_000);
    let mut b =
        Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n[server]\nmax_connections = 10100\n");
    let metrics = b.metrics_addr();
    let budget = budget_kib(&b.config_path);
    assert_ok(&b.cli(&["topics", "create", "good"]));
    assert_ok(&b.cli(&["topics", "create", "abuse"]));
    // Data for the non-reading consumer to ask for.
    fill_for_fetches(&b.tcp, "abuse");
    // Warm-up.
    producer_rate(&b.tcp, "good", secs.min(1.0));

    type Abuse = Box<dyn FnOnce(&str) -> Box<dyn FnOnce()>>;
    let abuses: Vec<(&str, Abuse)> = vec![
        (
            "10,000 idle connections",
            Box::new(|addr: &str| {
                let idle = idle_connections(addr, 10_000);
                Box::new(move || drop(idle)) as Box<dyn FnOnce()>
            }),
        ),
        (
            "a consumer that never reads",
            Box::new(|addr: &str| {
                let (hog, _) = non_reading_consumer(addr, "abuse", 20_000);
                Box::new(move || drop(hog)) as Box<dyn FnOnce()>
            }),
        ),
        (
            "20 clients sending a byte every 100 ms",
            Box::new(|addr: &str| {
                let r = tricklers(addr, "abuse", 20);
                Box::new(move || r.stop()) as Box<dyn FnOnce()>
            }),
        ),
        (
            "a flood of tiny produce requests",
            Box::new(|addr: &str| {
                let r = tiny_produce_flood(addr, "abuse");
                Box::new(move || r.stop()) as Box<dyn FnOnce()>
            }),
        ),
    ];
    let only = std::env::var("SKIFF_OVERLOAD_ONLY").unwrap_or_default();
    let mut worst = f64::INFINITY;
    for (name, start) in abuses
        .into_iter()
        .filter(|(n, _)| n.contains(only.as_str()))
    {
        let a1 = phase(&b.tcp, &metrics, secs);
        let stop = start(&b.tcp);
        let u = phase(&b.tcp, &metrics, secs);
        let rss = b.rss_kib();
        stop();
        let a2 = phase(&b.tcp, &metrics, secs);
        let (alone1, alone2, under) = (a1.rate, a2.rate, u.rate);
        let alone = (alone1 + alone2) / 2.0;
        let ratio = under / alone;
        worst = worst.min(ratio);
        println!(
            "overload {name}: alone {alone:.0} rec/s ({alone1:.0}, {alone2:.0}), under it \
             {under:.0} rec/s = {:.0}% ({}); broker RSS {rss} KiB, budget {budget} KiB; \
             fdatasync groups per good batch {:.2} alone, {:.2} under it, of {:.2} ms \
             alone, {:.2} ms under it",
            ratio * 100.0,
            if ratio >= TARGET_RATIO {
                "ok"
            } else {
                "BELOW 80%"
            },
            (a1.groups_per_batch + a2.groups_per_batch) / 2.0,
            u.groups_per_batch,
            (a1.group_ms + a2.group_ms) / 2.0,
            u.group_ms,
        );
        assert!(b.is_alive(), "the broker died:\n{}", b.log());
    }
    println!(
        "overload: worst ratio {:.0}% (target {:.0}%)",
        worst * 100.0,
        TARGET_RATIO * 100.0
    );
    b.stop();
}
