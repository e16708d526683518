//! Misbehaving clients, shared by tests/overload.rs (the broker stays
//! within its memory budget and serves others) and benches/overload.rs
//! (how much throughput a well-behaved producer keeps meanwhile).
#![allow(dead_code, reason = "each user takes what it needs")]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{request_frame, RawConn};
use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::protocol::{
    FetchPartition, FetchRequest, ProducePartition, ProduceRequest, RequestBody,
};

/// Raises this process's open-file limit (the broker inherits it) to at
/// least `n`, as root may.
pub fn raise_fd_limit(n: u64) {
    // rlim_t is u32 on 32-bit ARM; the limits asked for fit it.
    #[allow(clippy::unnecessary_cast)]
    let n = n as libc::rlim_t;
    // SAFETY: getrlimit/setrlimit on a local, initialised struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        if l.rlim_cur >= n {
            return;
        }
        l.rlim_cur = n.max(l.rlim_cur);
        l.rlim_max = l.rlim_max.max(n);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &l),
            0,
            "raising RLIMIT_NOFILE to {n} (needs root or a high hard limit)"
        );
    }
}

pub fn one_record_batch(value: &[u8]) -> Vec<u8> {
    let mut bb = BatchBuilder::new();
    bb.push(1, None, value, &[]);
    bb.finish(ProducerStamp::NONE)
}

/// A produce request frame of one one-record batch.
pub fn produce_frame(correlation_id: u32, topic: &str, value: &[u8]) -> Vec<u8> {
    request_frame(
        correlation_id,
        RequestBody::Produce(ProduceRequest {
            partitions: vec![ProducePartition {
                topic: topic.into(),
                partition: 0,
                batch: one_record_batch(value).into(),
            }],
        }),
    )
}

/// `n` idle connections to `addr`, every other one past its hello.
pub fn idle_connections(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|i| {
            let c = std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
            if i % 2 == 0 {
                let mut c = RawConn { stream: c };
                c.hello();
                c.stream
            } else {
                c
            }
        })
        .collect()
}

/// A fetch of up to 1 MiB of `topic`/0 from offset 0.
pub fn fetch_frame(correlation_id: u32, topic: &str) -> Vec<u8> {
    request_frame(
        correlation_id,
        RequestBody::Fetch(FetchRequest {
            partitions: vec![FetchPartition {
                topic: topic.into(),
                partition: 0,
                offset: 0,
                max_bytes: 1024 * 1024,
            }],
            max_wait_ms: 0,
            min_bytes: 0,
            isolation: None,
        }),
    )
}

/// A consumer that writes fetches of `topic` and never reads an answer:
/// writes until the broker stops reading them (or `max` of them). Returns
/// the connection (kept open by the caller) and how many it wrote.
pub fn non_reading_consumer(addr: &str, topic: &str, max: u32) -> (RawConn, u32) {
    let mut hog = RawConn::connect(addr);
    hog.hello();
    hog.stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .expect("write timeout");
    let mut sent = 0u32;
    while sent < max {
        if hog.stream.write_all(&fetch_frame(sent + 2, topic)).is_err() {
            break;
        }
        sent += 1;
    }
    (hog, sent)
}

/// Background abuse that runs until [`Running::stop`].
pub struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// `clients` connections each sending a produce frame to `topic` a byte
/// every 100 ms, starting over with a new frame when one is done.
pub fn tricklers(addr: &str, topic: &str, clients: usize) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns: Vec<RawConn> = (0..clients)
        .map(|_| {
            let mut c = RawConn::connect(addr);
            c.hello();
            c
        })
        .collect();
    let frame = produce_frame(2, topic, b"slow");
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        let mut at = 0;
        while !flag.load(Ordering::Relaxed) {
            for c in &mut conns {
                c.send(&frame[at..at + 1]);
            }
            at = (at + 1) % frame.len();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Running {
        stop,
        threads: vec![t],
    }
}

/// One connection pipelining tiny produce requests to `topic` as fast as
/// the broker takes them, its answers drained by a second thread.
pub fn tiny_produce_flood(addr: &str, topic: &str) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = RawConn::connect(addr);
    flood.hello();
    let mut stream = flood.stream.try_clone().expect("clone");
    let flag = stop.clone();
    let topic = topic.to_string();
    let writer = std::thread::spawn(move || {
        let mut cid = 2u32;
        while !flag.load(Ordering::Relaxed) {
            let mut buf = Vec::with_capacity(64 * 1024);
            for _ in 0..256 {
                buf.extend(produce_frame(cid, &topic, b"tiny"));
                cid = cid.wrapping_add(1);
            }
            if stream.write_all(&buf).is_err() {
                return;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
    });
    let reader = std::thread::spawn(move || while flood.read_frame().is_some() {});
    Running {
        stop,
        threads: vec![writer, reader],
    }
}

/// The worst-case budget `skiff config check` prints for `config`, in KiB.
pub fn budget_kib(config: &std::path::Path) -> u64 {
    let o = super::run_bin(&["config", "check", config.to_str().expect("utf-8 path")]);
    super::assert_ok(&o);
    let out = super::stdout(&o);
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(" total"))
        .unwrap_or_else(|| panic!("no total in config check:\n{out}"));
    let mut words = line.trim_start_matches('#').split_whitespace();
    let n: f64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("a number in {line:?}"));
    let unit = words.next().unwrap_or("B");
    let kib = match unit {
        "B" => n / 1024.0,
        "KiB" => n,
        "MiB" => n * 1024.0,
        "GiB" => n * 1024.0 * 1024.0,
        other => panic!("unit {other:?} in {line:?}"),
    };
    kib as u64
}

/// 8 MiB of 64 KiB records in `topic`/0, for fetches to ask for again
/// and again.
pub fn fill_for_fetches(addr: &str, topic: &str) {
    let c = skiff::client::blocking::Client::connect(addr).expect("connect");
    for _ in 0..128 {
        c.produce_raw(vec![ProducePartition {
            topic: topic.into(),
            partition: 0,
            batch: one_record_batch(&[7u8; 64 * 1024]).into(),
        }])
        .expect("produce");
    }
}
