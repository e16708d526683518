use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// A running endpoint; the server task is cancelled on drop.
struct Endpoint {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    _task: smol::Task<()>,
}

fn start(limits: HttpLimits) -> Endpoint {
    let listener = smol::block_on(smol::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let task = smol::spawn(serve_http_with(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&ready),
        limits,
    ));
    Endpoint {
        addr,
        metrics,
        ready,
        _task: task,
    }
}

/// Sends raw bytes, returns (status, headers+body text).
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    (status, out)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: skiff\r\nUser-Agent: test\r\n\r\n").as_bytes(),
    )
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn scrape_shows_recorded_values() {
    let ep = start(HttpLimits::default());
    let m = &ep.metrics;
    let temp = m.topic("sensors.temp");
    temp.produced(3, 300);
    temp.produced(2, 200);
    m.record_fetch("sensors.temp", 4, 400);
    m.record_produce("logs", 1, 10);
    m.observe_request("produce", Duration::from_micros(700));
    m.observe_request("produce", Duration::from_millis(30));
    m.observe_storage_write(Duration::from_micros(500), 8192, 5000);
    m.observe_fsync(Duration::from_millis(4));
    m.set_group_lag("dashboard", "sensors.temp", 2, 17);
    m.dedup_hit();
    m.set_mirror_backlog("sensors.temp", 120, 65536);
    m.mirror_dropped("sensors.temp", 5);
    let open = m.connection_opened(Listener::Tcp);
    let closed = m.connection_opened(Listener::Tcp);
    drop(closed);
    let _unix = m.connection_opened(Listener::Unix);
    m.tls_failure();
    m.record_recovery(&crate::broker::RecoverySummary {
        truncated_bytes: 4096,
        quarantined_partitions: 1,
        deleted_leftovers: 2,
        undeletable_leftovers: 3,
        skipped_dirs: 4,
    });
    m.record_recovery_erased(3);
    m.observe_storage(2);
    m.record_recovery_damaged(7);
    {
        use crate::storage::IoObserver;
        m.window_read(1 << 20, false);
        m.window_read(1 << 20, true);
        m.window_read(4096, true);
        m.read_ahead_unused(65536);
        m.fanin_wait(Duration::from_millis(3));
        m.fanin_wait(Duration::from_millis(5));
    }

    let (status, response) = get(ep.addr, "/metrics");
    assert_eq!(status, 200, "{response}");
    assert!(response.contains(CONTENT_TYPE_OPENMETRICS));
    let text = body(&response);
    assert!(text.ends_with("# EOF\n"), "{text}");
    let expect = [
        ("skiff_produce_records_total{topic=\"sensors.temp\"}", 5.0),
        ("skiff_produce_bytes_total{topic=\"sensors.temp\"}", 500.0),
        ("skiff_produce_records_total{topic=\"logs\"}", 1.0),
        ("skiff_fetch_records_total{topic=\"sensors.temp\"}", 4.0),
        ("skiff_fetch_bytes_total{topic=\"sensors.temp\"}", 400.0),
        (
            "skiff_request_duration_seconds_count{kind=\"produce\"}",
            2.0,
        ),
        // 700 µs lands in the le=0.0008 bucket (50 µs x 2^4), 30 ms does not.
        (
            "skiff_request_duration_seconds_bucket{le=\"0.0008\",kind=\"produce\"}",
            1.0,
        ),
        ("skiff_storage_write_duration_seconds_count", 1.0),
        ("skiff_storage_fsync_duration_seconds_count", 1.0),
        ("skiff_storage_fanin_wait_seconds_count", 2.0),
        ("skiff_storage_device_bytes_total", 8192.0),
        ("skiff_storage_payload_bytes_total", 5000.0),
        (
            "skiff_storage_read_bytes_total{source=\"demand\"}",
            1048576.0,
        ),
        (
            "skiff_storage_read_bytes_total{source=\"ahead\"}",
            1052672.0,
        ),
        (
            "skiff_storage_read_bytes_total{source=\"ahead_unused\"}",
            65536.0,
        ),
        (
            "skiff_group_lag_records{group=\"dashboard\",topic=\"sensors.temp\",partition=\"2\"}",
            17.0,
        ),
        ("skiff_dedup_hits_total", 1.0),
        (
            "skiff_mirror_backlog_records{topic=\"sensors.temp\"}",
            120.0,
        ),
        (
            "skiff_mirror_bytes_at_risk{topic=\"sensors.temp\"}",
            65536.0,
        ),
        (
            "skiff_mirror_dropped_records_total{topic=\"sensors.temp\"}",
            5.0,
        ),
        ("skiff_connections{listener=\"tcp\"}", 1.0),
        ("skiff_connections{listener=\"unix\"}", 1.0),
        ("skiff_connections_accepted_total{listener=\"tcp\"}", 2.0),
        ("skiff_tls_handshake_failures_total", 1.0),
        ("skiff_recovery_truncated_bytes_total", 4096.0),
        ("skiff_recovery_quarantined_partitions", 1.0),
        ("skiff_storage_quarantined_partitions", 2.0),
        ("skiff_recovery_deleted_leftovers", 2.0),
        ("skiff_recovery_undeletable_leftovers", 3.0),
        ("skiff_recovery_skipped_dirs", 4.0),
        ("skiff_recovery_stale_batches_erased_total", 3.0),
        ("skiff_recovery_damaged_offsets_total", 7.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(text, series), Some(value), "{series} in:\n{text}");
    }
    let sum = sample(text, "skiff_request_duration_seconds_sum{kind=\"produce\"}").expect("sum");
    assert!((sum - 0.0307).abs() < 1e-9, "{sum}");
    let waited = sample(text, "skiff_storage_fanin_wait_seconds_sum").expect("fan-in sum");
    assert!((waited - 0.008).abs() < 1e-9, "{waited}");
    assert!(
        text.contains(&format!(
            "skiff_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    drop(open);

    // Deleting a topic drops its series; the connection gauge followed the guards.
    m.remove_topic("logs");
    let (_, response) = get(ep.addr, "/metrics");
    let text = body(&response);
    assert_eq!(
        sample(text, "skiff_produce_records_total{topic=\"logs\"}"),
        None
    );
    assert_eq!(
        sample(text, "skiff_connections{listener=\"tcp\"}"),
        Some(0.0)
    );
}

#[test]
fn health_always_and_ready_flips() {
    let ep = start(HttpLimits::default());
    let (status, r) = get(ep.addr, "/health");
    assert_eq!((status, body(&r)), (200, "ok\n"));
    let (status, _) = get(ep.addr, "/ready");
    assert_eq!(status, 503);
    ep.ready.store(true, Ordering::Release);
    let (status, r) = get(ep.addr, "/ready");
    assert_eq!((status, body(&r)), (200, "ready\n"));
    let (status, _) = get(ep.addr, "/health");
    assert_eq!(status, 200);
}

#[test]
fn bad_requests_get_typed_answers() {
    let ep = start(HttpLimits {
        header_bytes_max: 512,
        ..HttpLimits::default()
    });
    assert_eq!(get(ep.addr, "/nope").0, 404);
    assert_eq!(get(ep.addr, "/metrics?name[]=x").0, 200);
    assert_eq!(exchange(ep.addr, b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(exchange(ep.addr, b"\x00\x01garbage\r\n\r\n").0, 400);
    let big = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(1000)
    );
    assert_eq!(exchange(ep.addr, big.as_bytes()).0, 431);
    let (status, r) = exchange(ep.addr, b"HEAD /health HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(r.contains("Content-Length: 3"), "{r}");
    assert_eq!(body(&r), "", "HEAD has no body");
    // The server survived all of that.
    assert_eq!(get(ep.addr, "/health").0, 200);
}

#[test]
fn a_silent_client_is_cut_off_and_does_not_block_others() {
    let ep = start(HttpLimits {
        request_timeout: Duration::from_millis(300),
        connections_max: 2,
        ..HttpLimits::default()
    });
    let start = Instant::now();
    let mut silent = TcpStream::connect(ep.addr).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // While it sits there, another client is served.
    assert_eq!(get(ep.addr, "/health").0, 200);
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).expect("closed, not timed out");
    assert_eq!(n, 0, "closed without an answer");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
}

#[test]
fn health_adds_a_line_per_note() {
    let m = Metrics::new();
    assert_eq!(m.health_text(), "ok\n");
    m.set_health_notes(vec!["storage: one", "storage: two"]);
    assert_eq!(m.health_text(), "ok\nstorage: one\nstorage: two\n");
    m.set_health_notes(Vec::new());
    assert_eq!(m.health_text(), "ok\n");
}
