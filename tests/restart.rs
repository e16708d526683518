//! Acknowledged records survive a restart: after SIGTERM (clean stop, exit
//! status 0), after kill -9, and when the broker is killed under a running
//! producer.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use skiff::client::{blocking, ClientError, ConsumerRecord, ProducerConfig};
use skiff::protocol::CreateTopicRequest;

const PARTITIONS: u32 = 3;
const RECORDS: usize = 6_000;

fn create(b: &Broker, topic: &str) {
    create_with(b, topic, None);
}

fn create_with(b: &Broker, topic: &str, fsync: Option<&str>) {
    blocking::Client::connect(&b.tcp)
        .expect("connect")
        .create_topic(CreateTopicRequest {
            name: topic.to_owned(),
            partitions: Some(PARTITIONS),
            fsync: fsync.map(str::to_owned),
            ..CreateTopicRequest::default()
        })
        .expect("create");
}

/// Produces `n` records "v{i}" and returns where each was acknowledged:
/// (partition, offset) -> i.
fn produce_acked(b: &Broker, topic: &str, n: usize) -> BTreeMap<(u32, u64), usize> {
    let producer =
        blocking::Producer::connect(&b.tcp, ProducerConfig::default()).expect("producer");
    let deliveries: Vec<_> = (0..n)
        .map(|i| {
            let key = format!("k{}", i % 7);
            let d = producer
                .send_wait(topic, Some(key.as_bytes()), format!("v{i}").as_bytes(), &[])
                .expect("send");
            (i, d)
        })
        .collect();
    producer.flush();
    deliveries
        .into_iter()
        .map(|(i, d)| {
            let m = blocking::wait(d).expect("acknowledged");
            ((m.partition, m.offset), i)
        })
        .collect()
}

fn value_index(r: &ConsumerRecord) -> usize {
    let s = std::str::from_utf8(&r.value).expect("utf-8");
    s.strip_prefix('v')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected value {s}"))
}

/// The log holds exactly the acknowledged records, at their acknowledged
/// offsets, in send order per partition.
#[track_caller]
fn assert_exactly(records: &[ConsumerRecord], acked: &BTreeMap<(u32, u64), usize>) {
    let got: BTreeMap<(u32, u64), usize> = records
        .iter()
        .map(|r| ((r.partition, r.offset), value_index(r)))
        .collect();
    assert_eq!(got.len(), records.len(), "an offset read twice");
    if &got != acked {
        let missing: Vec<_> = acked
            .iter()
            .filter(|(k, _)| !got.contains_key(k))
            .take(5)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|(k, _)| !acked.contains_key(k))
            .take(5)
            .collect();
        panic!(
            "log differs from the acknowledged records: {} vs {}; missing e.g. {missing:?}, extra e.g. {extra:?}",
            got.len(),
            acked.len()
        );
    }
}

fn restart_keeps_acked_records(kill: bool) {
    let mut b = Broker::start("");
    create(&b, "durable");
    let acked = produce_acked(&b, "durable", RECORDS);
    assert_eq!(acked.len(), RECORDS);
    if kill {
        b.kill9();
    } else {
        assert_eq!(b.stop(), Some(0), "SIGTERM exit status:\n{}", b.log());
        assert!(b.log().contains("stopped cleanly"), "{}", b.log());
    }
    b.restart();
    let records = consume_all(&b.tcp, "durable");
    assert_exactly(&records, &acked);

    // The log carries on where it stopped: the next offsets follow on.
    let latest: BTreeMap<u32, u64> = acked.keys().fold(BTreeMap::new(), |mut m, &(p, o)| {
        let e = m.entry(p).or_insert(0);
        *e = (*e).max(o + 1);
        m
    });
    let more = produce_acked(&b, "durable", 50);
    for &(p, o) in more.keys() {
        assert!(
            o >= latest.get(&p).copied().unwrap_or(0),
            "partition {p}: offset {o} reused after restart"
        );
    }
    let mut all = acked.clone();
    all.extend(more.iter().map(|(k, i)| (*k, *i)));
    // "v0".."v49" again, as new records at new offsets.
    assert_exactly(&consume_all(&b.tcp, "durable"), &all);
}

#[test]
fn sigterm_restart_keeps_every_acked_record() {
    restart_keeps_acked_records(false);
}

#[test]
fn kill9_restart_keeps_every_acked_record() {
    restart_keeps_acked_records(true);
}

/// `interval` acks after the write, not after the fdatasync (ten minutes
/// away here), and a kill -9 (unlike a power cut) loses none of it.
#[test]
fn interval_acks_without_waiting_for_the_fdatasync_and_survives_kill9() {
    let mut b = Broker::start("");
    create_with(&b, "lazy", Some("interval:600000"));
    let acked = produce_acked(&b, "lazy", 500);
    assert_eq!(acked.len(), 500);
    b.kill9();
    b.restart();
    assert_exactly(&consume_all(&b.tcp, "lazy"), &acked);
}

#[test]
fn kill9_under_a_running_producer_keeps_every_acked_record() {
    stop_under_a_running_producer(true);
}

#[test]
fn sigterm_under_a_running_producer_keeps_every_acked_record() {
    stop_under_a_running_producer(false);
}

fn stop_under_a_running_producer(kill: bool) {
    let mut b = Broker::start("");
    create(&b, "live");
    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let producer = {
        let (tcp, stop) = (b.tcp.clone(), stop.clone());
        std::thread::spawn(move || {
            let producer = blocking::Producer::connect(
                &tcp,
                ProducerConfig {
                    // Give up soon once the broker is gone, instead of
                    // retrying into the restarted one.
                    delivery_timeout: Duration::from_secs(2),
                    retry_backoff: Duration::from_millis(20),
                    retry_backoff_max: Duration::from_millis(200),
                    ..ProducerConfig::default()
                },
            )
            .expect("producer");
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("k{}", i % 5);
                match producer.send_wait(
                    "live",
                    Some(key.as_bytes()),
                    format!("v{i}").as_bytes(),
                    &[],
                ) {
                    Ok(d) => {
                        if tx.send((i, d)).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
                i += 1;
            }
            producer.flush();
            // Keep the producer alive until every delivery has resolved.
            drop(tx);
            producer
        })
    };
    let acker = {
        let acked_count = acked_count.clone();
        std::thread::spawn(move || {
            let mut acked = BTreeMap::new();
            let mut failed = 0usize;
            for (i, d) in rx {
                match blocking::wait(d) {
                    Ok(m) => {
                        acked.insert((m.partition, m.offset), i);
                        acked_count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => failed += 1,
                }
            }
            (acked, failed)
        })
    };
    wait_until(Duration::from_secs(30), "3000 acknowledged records", || {
        acked_count.load(Ordering::SeqCst) >= 3000
    });
    if kill {
        b.kill9();
    } else {
        assert_eq!(b.stop(), Some(0), "SIGTERM exit status:\n{}", b.log());
    }
    stop.store(true, Ordering::SeqCst);
    let producer = producer.join().expect("producer thread");
    let (acked, failed) = acker.join().expect("acker thread");
    drop(producer);
    eprintln!("{} acknowledged, {failed} failed", acked.len());
    assert!(acked.len() >= 3000);

    b.restart();
    let records = consume_all(&b.tcp, "live");
    // Every acknowledged record is there, at its offset; unacknowledged ones
    // may or may not be, but nothing twice and nothing out of order.
    let got: BTreeMap<(u32, u64), usize> = records
        .iter()
        .map(|r| ((r.partition, r.offset), value_index(r)))
        .collect();
    for (k, i) in &acked {
        assert_eq!(got.get(k), Some(i), "acknowledged v{i} at {k:?} lost");
    }
    let mut seen = std::collections::HashSet::new();
    let mut last: BTreeMap<u32, usize> = BTreeMap::new();
    for ((p, _), i) in &got {
        assert!(seen.insert(*i), "v{i} stored twice");
        if let Some(prev) = last.insert(*p, *i) {
            assert!(prev < *i, "partition {p}: v{i} after v{prev}");
        }
    }
    b.assert_serves();
}

/// A record given up on while the broker was down (its delivery timeout
/// ran out, never written) leaves no hole that fails the producer's later
/// records to the same partition once the broker is back. (It did: the
/// given-up batch kept its sequence, and every later batch of the
/// partition was refused for good, "sequence 2 out of order: expected 1",
/// then 3, 4, ... Now the producer takes a new epoch or id once every
/// batch it sent has settled, and starts the sequences again.)
#[test]
fn a_record_given_up_on_does_not_break_the_partition_for_later_ones() {
    for name in [None, Some("named")] {
        given_up_then_back(name);
    }
}

/// A producer that gives a record up after 1 s, with a record "first"
/// written to `topic` (key "k"), and its id and epoch.
fn quick_to_give_up(
    b: &Broker,
    topic: &str,
    name: Option<&str>,
) -> (blocking::Producer, (u64, u16)) {
    create(b, topic);
    let producer = blocking::Producer::connect(
        &b.tcp,
        ProducerConfig {
            delivery_timeout: Duration::from_secs(1),
            retry_backoff: Duration::from_millis(20),
            retry_backoff_max: Duration::from_millis(100),
            producer_name: name.map(str::to_owned),
            ..ProducerConfig::default()
        },
    )
    .expect("producer");
    let id = producer.0.producer_id().expect("idempotent");
    producer
        .send_wait(topic, Some(b"k"), b"first", &[])
        .and_then(blocking::wait)
        .expect("first");
    (producer, id)
}

fn given_up_then_back(name: Option<&str>) {
    let mut b = Broker::start("");
    let (producer, before) = quick_to_give_up(&b, "gap", name);
    b.stop();
    let lost = producer
        .send_wait("gap", Some(b"k"), b"lost", &[])
        .and_then(blocking::wait);
    assert!(lost.is_err(), "delivered with the broker down: {lost:?}");
    b.restart();
    // The same key: the same partition, whose sequence went on to "lost".
    let after = producer
        .send_wait("gap", Some(b"k"), b"after", &[])
        .and_then(blocking::wait);
    assert!(
        after.is_ok(),
        "{name:?} after the broker came back: {after:?}"
    );
    // The next epoch of the same id, whether named or not.
    let renewed = producer.0.producer_id().expect("idempotent");
    assert_eq!(renewed, (before.0, before.1 + 1), "{name:?}");
    let values: Vec<Vec<u8>> = consume_all(&b.tcp, "gap")
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values, [b"first".to_vec(), b"after".to_vec()]);
}

/// A record whose request is in flight when the broker stalls (SIGSTOP:
/// sockets open, nothing answered, as under a stuck SD card) fails at its
/// delivery timeout, as Kafka's delivery.timeout.ms covers requests in
/// flight. (Before, it waited out the request timeout, 30 s, first.) Once
/// the broker is back the producer's next record is written, after the
/// stalled one if that reached the log late.
#[test]
fn a_stalled_broker_fails_a_record_at_its_delivery_timeout() {
    for name in [None, Some("named")] {
        stalled_then_back(name);
    }
}

fn stalled_then_back(name: Option<&str>) {
    let b = Broker::start("");
    let (producer, before) = quick_to_give_up(&b, "stall", name);
    b.pause();
    let started = std::time::Instant::now();
    let stalled = producer
        .send_wait("stall", Some(b"k"), b"stalled", &[])
        .and_then(blocking::wait);
    let took = started.elapsed();
    b.resume();
    assert!(
        matches!(stalled, Err(ClientError::Timeout)),
        "{name:?}: {stalled:?}"
    );
    // 1 s, against the request timeout's 30: a wide margin for a busy host.
    assert!(
        took < Duration::from_secs(15),
        "{name:?}: failed after {took:?}"
    );
    let after = producer
        .send_wait("stall", Some(b"k"), b"after", &[])
        .and_then(blocking::wait);
    assert!(after.is_ok(), "{name:?}: {after:?}");
    let renewed = producer.0.producer_id().expect("idempotent");
    assert_eq!(renewed, (before.0, before.1 + 1), "{name:?}");
    let values: Vec<Vec<u8>> = consume_all(&b.tcp, "stall")
        .into_iter()
        .map(|r| r.value)
        .collect();
    let stalled_copies = values.iter().filter(|v| *v == b"stalled").count();
    assert!(
        values.first().map(Vec::as_slice) == Some(b"first".as_slice())
            && values.last().map(Vec::as_slice) == Some(b"after".as_slice())
            && stalled_copies <= 1
            && values.len() == 2 + stalled_copies,
        "{name:?}: {values:?}"
    );
}

/// Stalls again and again under a running producer whose delivery timeout
/// is shorter than each stall: records given up on, in flight and held,
/// and a renewal after each stall. Afterwards every acknowledged record is
/// in the log once, nothing is there twice, and each partition holds the
/// producer's records in the order it sent them (a request given up on and
/// written late lands before the next epoch's records, or is fenced).
#[test]
fn stalls_and_renewals_keep_each_partition_once_and_in_order() {
    for name in [None, Some("stall-loop")] {
        stall_loop(name);
    }
}

fn stall_loop(name: Option<&str>) {
    const ROUNDS: usize = 4;
    let b = Broker::start("");
    create(&b, "stalls");
    let producer = Arc::new(
        blocking::Producer::connect(
            &b.tcp,
            ProducerConfig {
                delivery_timeout: Duration::from_millis(400),
                retry_backoff: Duration::from_millis(10),
                retry_backoff_max: Duration::from_millis(50),
                linger: Duration::from_millis(1),
                producer_name: name.map(str::to_owned),
                ..ProducerConfig::default()
            },
        )
        .expect("producer"),
    );
    let before = producer.0.producer_id().expect("idempotent");
    let next = Arc::new(AtomicUsize::new(0));
    let mut acked = Vec::new();
    let mut failed = 0;
    for _ in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (producer, next, stop) = (producer.clone(), next.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut sent = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let key = format!("k{}", i % 3);
                    match producer.send_wait(
                        "stalls",
                        Some(key.as_bytes()),
                        i.to_string().as_bytes(),
                        &[],
                    ) {
                        Ok(d) => sent.push((i, d)),
                        Err(e) => panic!("send {i}: {e}"),
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                sent
            })
        };
        std::thread::sleep(Duration::from_millis(150));
        b.pause();
        std::thread::sleep(Duration::from_millis(700));
        b.resume();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        for (i, d) in sender.join().expect("sender") {
            match blocking::wait(d) {
                Ok(_) => acked.push(i),
                Err(_) => failed += 1,
            }
        }
    }
    let renewed = producer.0.producer_id().expect("idempotent");
    assert_eq!(renewed.0, before.0, "{name:?}: the same id");
    assert!(
        renewed.1 > before.1 && failed > 0,
        "{name:?}: every stall outlasts the delivery timeout: {failed} failed, epoch {} -> {}",
        before.1,
        renewed.1
    );
    let mut seen = std::collections::HashSet::new();
    let mut last_in_partition: BTreeMap<u32, usize> = BTreeMap::new();
    for r in consume_all(&b.tcp, "stalls") {
        let i: usize = std::str::from_utf8(&r.value)
            .expect("utf-8")
            .parse()
            .expect("a number");
        assert!(seen.insert(i), "{name:?}: record {i} written twice");
        if let Some(&last) = last_in_partition.get(&r.partition) {
            assert!(
                i > last,
                "{name:?}: partition {} holds {i} after {last}",
                r.partition
            );
        }
        last_in_partition.insert(r.partition, i);
    }
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|i| !seen.contains(i))
        .collect();
    assert!(
        lost.is_empty(),
        "{name:?}: acknowledged and not in the log: {lost:?}"
    );
}
