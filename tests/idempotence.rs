//! Idempotent producers through the real binary: retries after a cut
//! connection and after kill -9 between write and ack are written once;
//! fencing by name; the documented sequence errors; the producer table's
//! eviction; and the CLI flags.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::client::{blocking, ConsumerRecord, ProducerConfig};
use skiff::protocol::{
    decode_request, decode_response, CreateTopicRequest, ErrorCode, ProducePartition,
    ProducePartitionResult, RequestBody, FRAME_HEADER_BYTES,
};

fn create(b: &Broker, topic: &str, partitions: u32) {
    blocking::Client::connect(&b.tcp)
        .expect("connect")
        .create_topic(CreateTopicRequest {
            name: topic.to_owned(),
            partitions: Some(partitions),
            ..CreateTopicRequest::default()
        })
        .expect("create");
}

/// The log holds each value exactly once, at the offset its delivery was
/// acknowledged with.
#[track_caller]
fn assert_exactly_once(records: &[ConsumerRecord], acked: &BTreeMap<(u32, u64), String>) {
    let mut seen = BTreeSet::new();
    for r in records {
        let v = String::from_utf8(r.value.clone()).expect("utf-8");
        assert!(seen.insert(v.clone()), "{v} is in the log twice");
    }
    let got: BTreeMap<(u32, u64), String> = records
        .iter()
        .map(|r| {
            (
                (r.partition, r.offset),
                String::from_utf8(r.value.clone()).expect("utf-8"),
            )
        })
        .collect();
    assert_eq!(got.len(), acked.len(), "records in the log vs acknowledged");
    assert_eq!(&got, acked, "the log differs from the acknowledgements");
}

// ------------------------------------------------------------- the proxy

/// What the proxy does to produce requests.
#[derive(Clone, Copy)]
enum Mode {
    /// Forwards every `every`-th produce request (counted over all
    /// connections), then closes both sides before any response to it can
    /// reach the client; at most `max_cuts` times.
    Cut { every: usize, max_cuts: usize },
    /// Forwards the `at`-th produce request and withholds its response;
    /// reports once the response arrived from the broker (the batch is
    /// written and acknowledged), then passes nothing more on that
    /// connection.
    Hold { at: usize },
}

/// A TCP proxy in front of the broker that cuts connections between a
/// request and its response.
struct Proxy {
    addr: String,
    /// One message when a held response arrived from the broker.
    held: mpsc::Receiver<()>,
    cuts: Arc<AtomicUsize>,
}

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; FRAME_HEADER_BYTES];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    let mut frame = len.to_vec();
    frame.resize(FRAME_HEADER_BYTES + n, 0);
    s.read_exact(&mut frame[FRAME_HEADER_BYTES..]).ok()?;
    Some(frame)
}

impl Proxy {
    fn start(upstream: &str, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let (tx, held) = mpsc::channel();
        let produces = Arc::new(AtomicUsize::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_owned();
        let cuts2 = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    // The broker is down (restarting): the client retries.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let (produces, cuts, tx) = (produces.clone(), cuts2.clone(), tx.clone());
                std::thread::spawn(move || pipe(client, server, mode, &produces, &cuts, tx));
            }
        });
        Proxy { addr, held, cuts }
    }
}

fn pipe(
    mut client: TcpStream,
    mut server: TcpStream,
    mode: Mode,
    produces: &AtomicUsize,
    cuts: &AtomicUsize,
    held: mpsc::Sender<()>,
) {
    // The correlation id whose response must not reach the client.
    let withhold = Arc::new(AtomicUsize::new(usize::MAX));
    let blocked = Arc::new(AtomicBool::new(false));
    let back = {
        let (mut from, mut to) = (
            server.try_clone().expect("clone"),
            client.try_clone().expect("clone"),
        );
        let (withhold, blocked) = (withhold.clone(), blocked.clone());
        std::thread::spawn(move || {
            while let Some(frame) = read_frame(&mut from) {
                let cid = decode_response(&frame[FRAME_HEADER_BYTES..])
                    .map(|r| r.correlation_id as usize)
                    .ok();
                if cid.is_some() && cid == Some(withhold.load(Ordering::SeqCst)) {
                    blocked.store(true, Ordering::SeqCst);
                    let _ = held.send(());
                }
                if blocked.load(Ordering::SeqCst) || to.write_all(&frame).is_err() {
                    continue;
                }
            }
            let _ = to.shutdown(Shutdown::Both);
        })
    };
    while let Some(frame) = read_frame(&mut client) {
        let request = decode_request(&frame[FRAME_HEADER_BYTES..]).expect("a valid request");
        let n = match request.body {
            RequestBody::Produce(_) => produces.fetch_add(1, Ordering::SeqCst) + 1,
            _ => 0,
        };
        match mode {
            Mode::Cut { every, max_cuts }
                if n > 0 && n % every == 0 && cuts.load(Ordering::SeqCst) < max_cuts =>
            {
                cuts.fetch_add(1, Ordering::SeqCst);
                blocked.store(true, Ordering::SeqCst);
                let _ = server.write_all(&frame);
                // Long enough for the broker to write and answer it.
                std::thread::sleep(Duration::from_millis(300));
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                break;
            }
            Mode::Hold { at } if n == at => {
                withhold.store(request.correlation_id as usize, Ordering::SeqCst);
                let _ = server.write_all(&frame);
                // Nothing more on this connection; the broker's death
                // (or the test's end) closes it.
                let _ = back.join();
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            _ => {
                if server.write_all(&frame).is_err() {
                    break;
                }
            }
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = back.join();
}

// --------------------------------------------------------------- tests

/// Sends `values` keyed over `keys` keys through `addr`; returns where each
/// was acknowledged.
fn produce(
    addr: &str,
    topic: &str,
    values: &[String],
    config: ProducerConfig,
) -> BTreeMap<(u32, u64), String> {
    let producer = blocking::Producer::connect(addr, config).expect("producer");
    let deliveries: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let key = format!("k{}", i % 7);
            let d = producer
                .send_wait(topic, Some(key.as_bytes()), v.as_bytes(), &[])
                .expect("send");
            if i % 40 == 39 {
                // Many produce requests, for the proxy to cut.
                producer.flush();
            }
            (v.clone(), d)
        })
        .collect();
    producer.flush();
    deliveries
        .into_iter()
        .map(|(v, d)| {
            let m = blocking::wait(d).unwrap_or_else(|e| panic!("{v} not acknowledged: {e}"));
            ((m.partition, m.offset), v)
        })
        .collect()
}

fn small_batches() -> ProducerConfig {
    ProducerConfig {
        // Many small batches, several in flight per partition.
        batch_bytes: 512,
        linger: Duration::from_millis(2),
        retry_backoff: Duration::from_millis(20),
        ..ProducerConfig::default()
    }
}

#[test]
fn cut_connections_retry_and_every_record_is_written_once() {
    let b = Broker::start("");
    create(&b, "idem-cut", 3);
    let proxy = Proxy::start(
        &b.tcp,
        Mode::Cut {
            every: 7,
            max_cuts: 6,
        },
    );
    let values: Vec<String> = (0..3000)
        .map(|i| format!("v{i:05}-{}", "x".repeat(40)))
        .collect();
    let acked =
        std::panic::catch_unwind(|| produce(&proxy.addr, "idem-cut", &values, small_batches()))
            .unwrap_or_else(|e| {
                eprintln!("broker log:\n{}", b.log());
                std::panic::resume_unwind(e)
            });
    assert!(
        proxy.cuts.load(Ordering::SeqCst) >= 3,
        "the proxy cut only {} connection(s)",
        proxy.cuts.load(Ordering::SeqCst)
    );
    assert_exactly_once(&consume_all(&b.tcp, "idem-cut"), &acked);
    b.stop_checked();
}

#[test]
fn kill9_between_write_and_ack_then_the_retry_is_a_duplicate() {
    let mut b = Broker::start("");
    create(&b, "idem-kill", 2);
    let proxy = Proxy::start(&b.tcp, Mode::Hold { at: 4 });
    let addr = proxy.addr.clone();
    let values: Vec<String> = (0..1500).map(|i| format!("v{i:05}")).collect();
    let sender = {
        let values = values.clone();
        std::thread::spawn(move || produce(&addr, "idem-kill", &values, small_batches()))
    };
    proxy
        .held
        .recv_timeout(Duration::from_secs(30))
        .expect("the 4th produce was acknowledged by the broker");
    b.kill9();
    std::thread::sleep(Duration::from_millis(300));
    b.restart();
    let acked = sender.join().expect("producer thread");
    assert_eq!(acked.len(), values.len());
    assert_exactly_once(&consume_all(&b.tcp, "idem-kill"), &acked);
}

trait StopChecked {
    fn stop_checked(self);
}

impl StopChecked for Broker {
    fn stop_checked(mut self) {
        assert_eq!(self.stop(), Some(0), "clean stop:\n{}", self.log());
    }
}

/// The broker log's last "producer state rebuilt" line.
fn last_rebuild(b: &Broker) -> String {
    b.log()
        .lines()
        .rfind(|l| l.contains("producer state rebuilt"))
        .unwrap_or_default()
        .to_owned()
}

fn raw_batch(values: &[&str], id: u64, epoch: u16, seq: i32) -> ProducePartition<'static> {
    let mut b = BatchBuilder::new();
    for v in values {
        b.push(1_700_000_000_000, None, v.as_bytes(), &[]);
    }
    ProducePartition {
        topic: "idem-raw".into(),
        partition: 0,
        batch: b
            .finish(ProducerStamp {
                producer_id: id,
                producer_epoch: epoch,
                base_sequence: seq,
            })
            .into(),
    }
}

fn send(c: &blocking::Client, p: ProducePartition<'_>) -> ProducePartitionResult {
    c.produce_raw(vec![p]).expect("produce").remove(0)
}

#[track_caller]
fn assert_written(r: &ProducePartitionResult, base: u64, last: u64, duplicates: u32) {
    assert_eq!(r.error, ErrorCode::None, "{r:?}");
    assert_eq!((r.base_offset, r.last_offset), (base, last), "{r:?}");
    assert_eq!(r.duplicate_records, duplicates, "{r:?}");
}

#[test]
fn sequences_duplicates_gaps_and_stale_epochs_get_the_documented_answers() {
    let mut b = Broker::start("");
    create(&b, "idem-raw", 1);
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    let p = c.init_producer(None).expect("init");
    assert_eq!(p.producer_epoch, 0);
    let id = p.producer_id;

    assert_written(&send(&c, raw_batch(&["a", "b", "c"], id, 0, 0)), 0, 2, 0);
    // The same batch again: the original offsets, nothing written.
    assert_written(&send(&c, raw_batch(&["a", "b", "c"], id, 0, 0)), 0, 2, 3);
    // A gap: sequence 5 when 3 is next.
    let r = send(&c, raw_batch(&["f"], id, 0, 5));
    assert_eq!(r.error, ErrorCode::OutOfOrderSequence, "{r:?}");
    assert_written(&send(&c, raw_batch(&["d"], id, 0, 3)), 3, 3, 0);
    for (i, v) in ["e", "f", "g", "h", "i"].iter().enumerate() {
        let seq = 4 + i as i32;
        let off = 4 + i as u64;
        assert_written(&send(&c, raw_batch(&[v], id, 0, seq)), off, off, 0);
    }
    // The first batch left the window of 5: written before, not resent.
    let r = send(&c, raw_batch(&["a", "b", "c"], id, 0, 0));
    assert_eq!(r.error, ErrorCode::DuplicateSequence, "{r:?}");
    // An id this broker never handed out.
    let r = send(&c, raw_batch(&["z"], id + 1_000_000, 0, 0));
    assert_eq!(r.error, ErrorCode::InvalidRequest, "{r:?}");

    // Named: the second init bumps the epoch and fences the first.
    let first = c.init_producer(Some("gateway-1")).expect("init");
    let second = c.init_producer(Some("gateway-1")).expect("init");
    assert_eq!(second.producer_id, first.producer_id);
    assert_eq!(second.producer_epoch, first.producer_epoch + 1);
    let named = second.producer_id;
    assert_written(&send(&c, raw_batch(&["n0"], named, 1, 0)), 9, 9, 0);
    let r = send(&c, raw_batch(&["stale"], named, 0, 1));
    assert_eq!(r.error, ErrorCode::FencedProducer, "{r:?}");

    // The window survives a clean restart (snapshot) and kill -9 (scan).
    b.stop();
    b.restart();
    assert!(
        last_rebuild(&b).contains("2 entries, 0 batch header(s) scanned"),
        "a clean stop's snapshot leaves nothing to scan: {}",
        last_rebuild(&b)
    );
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    assert_written(&send(&c, raw_batch(&["i"], id, 0, 8)), 8, 8, 1);
    assert_written(&send(&c, raw_batch(&["j"], id, 0, 9)), 10, 10, 0);
    let r = send(&c, raw_batch(&["stale"], named, 0, 1));
    assert_eq!(
        r.error,
        ErrorCode::FencedProducer,
        "fenced after a restart: {r:?}"
    );
    b.kill9();
    b.restart();
    assert!(
        last_rebuild(&b).contains(", 1 batch header(s) scanned"),
        "only the batch after the snapshot is scanned: {}",
        last_rebuild(&b)
    );
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    assert_written(&send(&c, raw_batch(&["j"], id, 0, 9)), 10, 10, 1);
    let r = send(&c, raw_batch(&["l"], id, 0, 11));
    assert_eq!(r.error, ErrorCode::OutOfOrderSequence, "{r:?}");
    // New ids after a restart never repeat an id handed out before it.
    let fresh = c.init_producer(None).expect("init").producer_id;
    assert!(fresh > id && fresh != named, "{fresh} vs {id}, {named}");
    b.stop_checked();
}

/// Batch headers the last start-up scanned for producer state.
fn last_scan(b: &Broker) -> u64 {
    let line = last_rebuild(b);
    line.split(" batch header(s) scanned")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no scan count in {line:?}"))
}

/// A broker killed before its first periodic snapshot (30 s of serving)
/// scanned the whole log at every start, longer each time. A long scan
/// is now snapshotted at once: the next start after a kill -9 scans only
/// what came after it, and deduplicates as before.
#[test]
fn a_long_producer_scan_at_start_is_snapshotted_so_the_next_kill_9_scans_little() {
    let mut b = Broker::start("");
    create(&b, "idem-raw", 1);
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    let id = c.init_producer(None).expect("init").producer_id;
    let batches = 1100;
    // Five batches per request (the most in flight for one producer):
    // each is a header the scan reads.
    for chunk in 0..batches / 5 {
        let parts = (0..5)
            .map(|i| raw_batch(&["v"], id, 0, chunk * 5 + i))
            .collect();
        for r in c.produce_raw(parts).expect("produce") {
            assert_eq!(r.error, ErrorCode::None, "{r:?}");
        }
    }
    // A log no snapshot covers, as a broker killed within 30 s of every
    // start leaves it (writing it took longer than that under an
    // emulator): the snapshot goes.
    b.stop();
    let snap = b.data_dir().join("producer-state").join("idem-raw-0.snap");
    std::fs::remove_file(&snap).expect("the clean stop's snapshot");
    b.restart();
    assert_eq!(last_scan(&b), batches as u64, "the whole log is scanned");
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    assert_written(&send(&c, raw_batch(&["w"], id, 0, batches)), 1100, 1100, 0);
    b.kill9();
    b.restart();
    // 1, or 0 if the periodic snapshot came first on a slow machine.
    assert!(
        last_scan(&b) <= 1,
        "the start before snapshotted its long scan: {}",
        last_rebuild(&b)
    );
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    // A retry of the last batch and of one the snapshot covers.
    assert_written(&send(&c, raw_batch(&["w"], id, 0, batches)), 1100, 1100, 1);
    assert_written(
        &send(&c, raw_batch(&["v"], id, 0, batches - 1)),
        1099,
        1099,
        1,
    );
    b.stop_checked();
}

#[test]
fn a_corrupt_idempotent_batch_is_refused_without_taking_its_sequence() {
    let b = Broker::start("");
    create(&b, "idem-raw", 1);
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    let id = c.init_producer(None).expect("init").producer_id;
    let mut bad = raw_batch(&["a", "b"], id, 0, 0);
    let mut bytes = bad.batch.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    bad.batch = bytes.into();
    let r = send(&c, bad);
    assert_eq!(r.error, ErrorCode::InvalidBatch, "{r:?}");
    assert!(
        r.message.as_deref().unwrap_or("").contains("CRC mismatch"),
        "the answer names the CRC: {r:?}"
    );
    // Sequence 0 is still the next one: the intact batch is written.
    assert_written(&send(&c, raw_batch(&["a", "b"], id, 0, 0)), 0, 1, 0);
    assert_written(&send(&c, raw_batch(&["c"], id, 0, 2)), 2, 2, 0);
    b.stop_checked();
}

#[test]
fn two_producers_with_one_name_fence_the_older() {
    let b = Broker::start("");
    create(&b, "idem-fence", 1);
    let named = || ProducerConfig {
        producer_name: Some("sensor-gw".into()),
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    };
    let old = blocking::Producer::connect(&b.tcp, named()).expect("old");
    blocking::wait(old.send("idem-fence", None, b"from-old", &[])).expect("old writes");
    let new = blocking::Producer::connect(&b.tcp, named()).expect("new");
    assert_eq!(
        new.0.producer_id().map(|p| p.0),
        old.0.producer_id().map(|p| p.0),
        "same name, same id"
    );
    let err = blocking::wait(old.send("idem-fence", None, b"old-again", &[]))
        .expect_err("the older instance is fenced");
    assert_eq!(err.code(), Some(ErrorCode::FencedProducer), "{err}");
    blocking::wait(new.send("idem-fence", None, b"from-new", &[])).expect("new writes");
    let values: Vec<Vec<u8>> = consume_all(&b.tcp, "idem-fence")
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values, vec![b"from-old".to_vec(), b"from-new".to_vec()]);
    b.stop_checked();
}

/// A plain producer name unused past producers.name_expiry_ms is
/// forgotten (here by the sweep a named init runs): its old id is fenced
/// as an expired transactional id's is, and an init of the name gets a
/// new id. A name whose id keeps writing is kept.
#[test]
fn a_plain_name_unused_past_its_expiry_is_forgotten_and_its_old_id_fenced() {
    let b = Broker::start("[producers]\nname_expiry_ms = 3000\n");
    create(&b, "idem-raw", 1);
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    let init = |name| c.init_producer(Some(name)).expect("init");
    let (idle, busy) = (init("gw-idle"), init("gw-busy"));
    assert_written(
        &send(&c, raw_batch(&["i0"], idle.producer_id, 0, 0)),
        0,
        0,
        0,
    );
    // gw-idle stays quiet past the expiry; gw-busy writes all along.
    let start = std::time::Instant::now();
    let mut seq = 0;
    while seq == 0 || start.elapsed() < Duration::from_millis(3_500) {
        let r = send(&c, raw_batch(&["b"], busy.producer_id, 0, seq));
        assert_eq!(r.error, ErrorCode::None, "{r:?}");
        seq += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    init("gw-other");
    let r = send(&c, raw_batch(&["i1"], idle.producer_id, 0, 1));
    assert_eq!(r.error, ErrorCode::FencedProducer, "{r:?}");
    assert!(
        r.message
            .as_deref()
            .is_some_and(|m| m.contains("producers.name_expiry_ms")),
        "{r:?}"
    );
    let r = send(&c, raw_batch(&["b"], busy.producer_id, 0, seq));
    assert_eq!(r.error, ErrorCode::None, "{r:?}");
    assert_eq!(init("gw-busy").producer_id, busy.producer_id, "kept");
    assert_ne!(init("gw-idle").producer_id, idle.producer_id, "a new id");
    b.stop_checked();
}

#[test]
fn a_full_producer_table_evicts_the_least_recently_active() {
    let b = Broker::start("[producers]\nmax_producers = 2\n");
    create(&b, "idem-raw", 1);
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    let id = |c: &blocking::Client| c.init_producer(None).expect("init").producer_id;
    let (a, bb, cc) = (id(&c), id(&c), id(&c));
    // Activity times are in ms: keep steps apart so "least recent" is clear.
    let send = |p| {
        std::thread::sleep(Duration::from_millis(5));
        send(&c, p)
    };
    assert_written(&send(raw_batch(&["a0"], a, 0, 0)), 0, 0, 0);
    assert_written(&send(raw_batch(&["b0"], bb, 0, 0)), 1, 1, 0);
    // A third producer: `a` is the least recently active and goes.
    assert_written(&send(raw_batch(&["c0"], cc, 0, 0)), 2, 2, 0);
    // b is still known: its retry is a duplicate (and b is now the most
    // recently active).
    assert_written(&send(raw_batch(&["b0"], bb, 0, 0)), 1, 1, 1);
    // a was forgotten: its retry is taken as new and written again
    // (documented: eviction loses dedup for that producer). That evicts c.
    assert_written(&send(raw_batch(&["a0"], a, 0, 0)), 3, 3, 0);
    // b is still known (a gap is seen); c is not: its later sequence is
    // accepted as a new producer's (Kafka 2.5+ behaviour).
    let r = send(raw_batch(&["b9"], bb, 0, 9));
    assert_eq!(r.error, ErrorCode::OutOfOrderSequence, "{r:?}");
    assert_written(&send(raw_batch(&["c5"], cc, 0, 5)), 4, 4, 0);
    b.stop_checked();
}

#[test]
fn cli_produce_survives_a_broker_restart_and_writes_each_record_once() {
    let mut b = Broker::start("");
    create(&b, "idem-cli", 2);
    let mut child = skiff_command()
        .args([
            "produce",
            "idem-cli",
            "--idempotent-name",
            "cli-gw",
            "--broker",
        ])
        .arg(&b.tcp)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("skiff produce");
    let mut stdin = child.stdin.take().expect("stdin");
    for i in 0..500 {
        writeln!(stdin, "line-{i}").expect("write");
    }
    stdin.flush().expect("flush");
    // Kill only once the producer is connected and has written: a CLI that
    // starts (slowly, under qemu and load) after the kill fails to connect
    // and exits, which is its documented behaviour, not this test's subject.
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    wait_until(Duration::from_secs(60), "the CLI's first records", || {
        c.describe_topic("idem-cli")
            .expect("describe")
            .partitions
            .iter()
            .any(|p| p.latest_offset > 0)
    });
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    b.kill9();
    for i in 500..1000 {
        writeln!(stdin, "line-{i}").expect("write");
    }
    std::thread::sleep(Duration::from_millis(500));
    b.restart();
    for i in 1000..1500 {
        writeln!(stdin, "line-{i}").expect("write");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "skiff produce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = consume_all(&b.tcp, "idem-cli");
    let values: BTreeSet<String> = records
        .iter()
        .map(|r| String::from_utf8(r.value.clone()).expect("utf-8"))
        .collect();
    assert_eq!(values.len(), records.len(), "a record was written twice");
    assert_eq!(values.len(), 1500, "every line once");
    b.stop_checked();
}

#[test]
fn cli_msg_id_header_sends_the_id_as_a_header() {
    let b = Broker::start("");
    create(&b, "idem-msgid", 1);
    let out = b.cli(&[
        "produce",
        "idem-msgid",
        "--msg-id-header",
        "msg-id",
        "e-1\thello",
    ]);
    assert_ok(&out);
    let records = consume_all(&b.tcp, "idem-msgid");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, b"hello");
    assert_eq!(
        records[0].headers,
        vec![("msg-id".to_owned(), b"e-1".to_vec())]
    );
    let out = b.cli(&[
        "produce",
        "idem-msgid",
        "--msg-id-header",
        "msg-id",
        "no-tab",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("TAB"), "{}", stderr(&out));
    b.stop_checked();
}

fn with_msg_id(values: &[(&str, &str)]) -> ProducePartition<'static> {
    with_msg_id_to("idem-window", 0, values)
}

/// A batch of `(msg-id, value)` records for `topic`/`partition`.
fn with_msg_id_to(
    topic: &str,
    partition: u32,
    values: &[(&str, &str)],
) -> ProducePartition<'static> {
    let mut b = BatchBuilder::new();
    for (id, v) in values {
        b.push(
            skiff::batch::now_ms(),
            None,
            v.as_bytes(),
            &[("msg-id", id.as_bytes())],
        );
    }
    ProducePartition {
        topic: topic.into(),
        partition,
        batch: b.finish(ProducerStamp::NONE).into(),
    }
}

fn values_of(addr: &str, topic: &str) -> Vec<String> {
    consume_all(addr, topic)
        .into_iter()
        .map(|r| String::from_utf8(r.value).expect("utf-8"))
        .collect()
}

#[test]
fn msg_id_window_drops_duplicates_and_forgets_after_the_window() {
    let b = Broker::start("");
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    // The window's expiry is tested on a manual clock in the broker's
    // unit tests; here, that the binary keeps and ends a window at all.
    for (name, ms) in [("idem-window", 600_000), ("idem-short", 100)] {
        let config = c
            .create_topic(CreateTopicRequest {
                name: name.into(),
                partitions: Some(1),
                msg_id_window_ms: Some(ms),
                ..CreateTopicRequest::default()
            })
            .expect("create");
        assert_eq!(config.msg_id_window_ms, Some(ms));
    }
    let r = send(&c, with_msg_id(&[("e1", "a"), ("e2", "b"), ("e1", "c")]));
    assert_written(&r, 0, 1, 1);
    // All duplicates: nothing written, the last offset named.
    let r = send(&c, with_msg_id(&[("e2", "d")]));
    assert_written(&r, 1, 1, 1);
    assert_eq!(values_of(&b.tcp, "idem-window"), vec!["a", "b"]);
    // Past a short window (however slow the machine), an id is new again.
    let short = |v| with_msg_id_to("idem-short", 0, &[("e1", v)]);
    assert_written(&send(&c, short("a")), 0, 0, 0);
    std::thread::sleep(Duration::from_millis(150));
    assert_written(&send(&c, short("b")), 1, 1, 0);

    // A count-bounded window through the CLI (idempotent producer).
    assert_ok(&b.cli(&[
        "topics",
        "create",
        "idem-count",
        "--partitions",
        "1",
        "--msg-id-window-records",
        "2",
    ]));
    let produce = |lines: &str| {
        b.cli_stdin(
            &["produce", "idem-count", "--msg-id-header", "msg-id"],
            Some(lines.as_bytes()),
        )
    };
    assert_ok(&produce("e1\ta\ne2\tb\ne1\tdup\n"));
    assert_ok(&produce("e3\tc\ne1\td\n"));
    // e1 was pushed out by e2 and e3 before "d" came.
    assert_eq!(values_of(&b.tcp, "idem-count"), vec!["a", "b", "c", "d"]);
    b.stop_checked();
}

/// The window is refilled from the log at start-up: a resend after a
/// restart, kill -9 included, is still dropped, on any partition of the
/// topic; what the window had already let go of is not brought back.
#[test]
fn msg_id_window_survives_restarts() {
    let mut b = Broker::start("");
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    for (name, ms, records) in [
        ("win-time", Some(600_000), None),
        ("win-count", None, Some(2)),
    ] {
        c.create_topic(CreateTopicRequest {
            name: name.into(),
            partitions: Some(2),
            msg_id_window_ms: ms,
            msg_id_window_records: records,
            ..CreateTopicRequest::default()
        })
        .expect("create");
    }
    let dropped = |c: &blocking::Client, topic: &str, partition: u32, ids: &[&str]| {
        let records: Vec<(&str, &str)> = ids.iter().map(|&id| (id, id)).collect();
        let r = send(c, with_msg_id_to(topic, partition, &records));
        assert_eq!(r.error, ErrorCode::None, "{r:?}");
        r.duplicate_records
    };
    assert_eq!(dropped(&c, "win-time", 0, &["e1", "e2"]), 0);
    assert_eq!(dropped(&c, "win-time", 1, &["e3"]), 0);
    // The count window keeps the last two: b and c.
    assert_eq!(dropped(&c, "win-count", 0, &["a", "b"]), 0);
    assert_eq!(dropped(&c, "win-count", 1, &["c"]), 0);
    drop(c);

    b.kill9();
    b.restart();
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    // e1 came on partition 0, the window is the topic's.
    assert_eq!(dropped(&c, "win-time", 1, &["e1", "e4"]), 1);
    assert_eq!(dropped(&c, "win-count", 0, &["c"]), 1);
    drop(c);

    assert_eq!(b.stop(), Some(0));
    b.restart();
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    assert_eq!(dropped(&c, "win-time", 0, &["e3", "e4", "e2"]), 3);
    // Refilled with b and c again: a, which it had let go, is new.
    assert_eq!(dropped(&c, "win-count", 1, &["a"]), 0);
    assert_eq!(
        values_of(&b.tcp, "win-time").len(),
        4,
        "e1 e2 e3 e4, once each"
    );
    b.stop_checked();
}

/// A partition quarantined at start-up (a bit flipped in the active
/// segment's header, so data the checkpoint calls durable is gone) gives
/// up its ids; the broker starts, and the topic's other partitions
/// refill the window.
#[test]
fn msg_id_refill_skips_a_quarantined_partition() {
    let mut b = Broker::start("");
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    c.create_topic(CreateTopicRequest {
        name: "win-q".into(),
        partitions: Some(2),
        segment_bytes: Some(64 * 1024),
        msg_id_window_ms: Some(600_000),
        ..CreateTopicRequest::default()
    })
    .expect("create");
    let written = |c: &blocking::Client, partition: u32, id: &str, value: &str| {
        let r = send(c, with_msg_id_to("win-q", partition, &[(id, value)]));
        assert_eq!(r.error, ErrorCode::None, "{r:?}");
        r.duplicate_records == 0
    };
    assert!(written(&c, 0, "e1", "v"));
    // Partition 1's first segment fills up and closes.
    let big = "x".repeat(8 * 1024);
    for i in 0..12 {
        assert!(written(&c, 1, &format!("p1-{i}"), &big));
    }
    drop(c);
    assert_eq!(b.stop(), Some(0));
    let seg = b.dir.path().join("data/topics/win-q/1/seg-00001.log");
    let mut bytes = std::fs::read(&seg).expect("segment");
    // In the header's base offset: damage to a batch would be skipped.
    bytes[16] ^= 0x10;
    std::fs::write(&seg, bytes).expect("segment");
    b.restart();
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    assert!(!written(&c, 0, "e1", "v"), "partition 0's id is remembered");
    assert!(written(&c, 0, "p1-11", "v"), "partition 1's are not");
    assert!(b.log().contains("QUARANTINED"), "{}", b.log());
    b.stop_checked();
}
