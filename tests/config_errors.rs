//! Configuration errors stop `skiff serve` with exit status 2 and a message
//! naming the key and the file; the connection and batch limits hold on a
//! running broker.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::client::blocking;
use skiff::protocol::{BatchBytes, CreateTopicRequest, ErrorCode, ProducePartition};

/// A `skiff serve` that wrongly accepts a bad config would run forever: give
/// it this long, then kill it and fail.
const SERVE_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `skiff ARGS` in `cwd` and waits for it to exit, bounded.
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    let mut child = skiff_command()
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running skiff");
    let deadline = Instant::now() + SERVE_EXIT_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("output");
            panic!(
                "skiff {args:?} did not exit:\nstdout: {}\nstderr: {}",
                stdout(&o),
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// Writes `text` to `name` in `dir` with a data_dir and listeners that
/// cannot collide with anything, so a wrongly accepted config stays local.
fn config_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing the config");
    path.to_str().expect("utf-8 path").to_owned()
}

#[test]
fn serve_refuses_bad_configs_with_exit_2_naming_key_and_file() {
    let dir = temp_dir();
    let cases: &[(&str, &str)] = &[
        ("[server]\nmax_conections = 3\n", "server.max_conections"),
        (
            "[topic_defaults]\nsegments = 1\n",
            "topic_defaults.segments",
        ),
        (
            "[topic_defaults]\nfsync = \"sometimes\"\n",
            "topic_defaults.fsync",
        ),
        (
            "[server]\nmax_connections = \"x\"\n",
            "server.max_connections",
        ),
        ("colour = \"blue\"\n", "colour"),
        // Passed, then aborted the broker at its first topic create.
        (
            "[storage]\ntail_buffer_bytes = 4096000000000\n",
            "storage.tail_buffer_bytes",
        ),
        (
            "[mirror]\nupstream = \"a:1\"\n[[mirror.rules]]\nname = \"t\"\nsource = \"s\"\n\
             target = \"u\"\naggregate = { window_ms = 0, fields = [\"c\"] }\n",
            "mirror.rules.aggregate.window_ms",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let file = config_file(dir.path(), &format!("bad{i}.toml"), text);
        let o = run_in(dir.path(), &["serve", "--config", &file]);
        assert_fails(&o, 2, &[key, &file]);
        let o = run_in(dir.path(), &["config", "check", &file]);
        assert_fails(&o, 2, &[key, &file]);
    }
    // Nothing was started: no data directory, no socket.
    assert!(!dir.path().join("skiff-data").exists());
    assert!(!dir.path().join("skiff.sock").exists());

    let missing = dir.path().join("nope.toml");
    let missing = missing.to_str().expect("utf-8 path");
    let o = run_in(dir.path(), &["serve", "--config", missing]);
    assert_fails(&o, 2, &[missing]);
    let o = run_in(dir.path(), &["config", "check", missing]);
    assert_fails(&o, 2, &[missing]);

    let o = run_in(dir.path(), &["serve", "--profile", "nope"]);
    assert_fails(&o, 2, &["nope"]);
    let o = run_in(dir.path(), &["serve", "--listen", "not-an-address"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!dir.path().join("skiff-data").exists());
}

#[test]
fn config_check_accepts_a_good_file() {
    let dir = temp_dir();
    let file = config_file(
        dir.path(),
        "good.toml",
        "data_dir = \"/var/lib/skiff\"\n[server]\nmax_connections = 8\n[topic_defaults]\nfsync = \"interval:100\"\n",
    );
    let o = run_in(dir.path(), &["config", "check", &file]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("max_connections = 8"), "{out}");
    assert!(out.contains("interval:100"), "{out}");
    // With no file: the embedded default, valid by construction.
    assert_ok(&run_in(dir.path(), &["config", "check"]));
    // A profile from the file is layered in.
    let file = config_file(dir.path(), "prof.toml", "profile = \"pi4-sd\"\n");
    assert_ok(&run_in(dir.path(), &["config", "check", &file]));
}

/// A disk budget that holds one topic of the topic_defaults but not the
/// broker's own topics besides it (made at their first use, their room
/// kept from the start) is a config error, found before anything starts:
/// a group commit would otherwise be refused after the topics filled it.
/// One byte more than both is accepted, and `config check` lists them.
#[test]
fn a_disk_budget_without_room_for_the_broker_s_own_topics_is_refused() {
    let dir = temp_dir();
    let defaults = "[topic_defaults]\nsegment_bytes = 1048576\nsegments = 4\n";
    let default_topic = 4 * 1024 * 1024;
    let fits = default_topic + INTERNAL_TOPICS_DISK_BYTES;
    let text = |budget: u64| format!("[storage]\ndisk_budget_bytes = {budget}\n{defaults}");
    let file = config_file(dir.path(), "short.toml", &text(fits - 1));
    for cmd in [
        &["config", "check", &file][..],
        &["serve", "--config", &file],
    ] {
        let o = run_in(dir.path(), cmd);
        assert_fails(
            &o,
            2,
            &[
                "storage.disk_budget_bytes",
                "__skiff_offsets 5242880",
                &file,
            ],
        );
    }
    assert!(!dir.path().join("skiff-data").exists());
    let file = config_file(dir.path(), "fits.toml", &text(fits));
    let o = run_in(dir.path(), &["config", "check", &file]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(
        out.contains("5 MiB  __skiff_offsets") && out.contains("4 MiB  left for topics"),
        "{out}"
    );
}

/// Topic and partition limits that hold the broker's own topics but no
/// topic of the topic_defaults besides them (their slots are kept from
/// the start, as their disk is) are a config error, found before anything
/// starts: a group commit would otherwise be refused after the topics
/// filled the limits. One more of each is accepted.
#[test]
fn topic_limits_without_room_for_the_broker_s_own_topics_are_refused() {
    let dir = temp_dir();
    let own = "__skiff_offsets, __skiff_txn, __skiff_share";
    let text = |topics: u32, partitions: u32| {
        format!(
            "[server]\nmax_topics = {topics}\nmax_partitions = {partitions}\n\
             [topic_defaults]\npartitions = 4\n"
        )
    };
    for (name, text, wants) in [
        (
            "topics.toml",
            text(3, 16),
            ["server.max_topics", "3 leaves no room for a topic", own],
        ),
        (
            "partitions.toml",
            text(4, 6),
            [
                "server.max_partitions",
                "6 is less than one topic of the topic_defaults (4 partitions) and the 3 kept",
                own,
            ],
        ),
    ] {
        let file = config_file(dir.path(), name, &text);
        for cmd in [
            &["config", "check", &file][..],
            &["serve", "--config", &file],
        ] {
            let o = run_in(dir.path(), cmd);
            assert_fails(&o, 2, &[&wants[..], &[&file]].concat());
        }
    }
    assert!(!dir.path().join("skiff-data").exists());
    let file = config_file(dir.path(), "fits.toml", &text(4, 7));
    assert_ok(&run_in(dir.path(), &["config", "check", &file]));
}

/// Connects and says hello; `None` when the broker refused the connection
/// with too_many_connections.
fn try_hello(addr: &str) -> Option<RawConn> {
    let mut c = RawConn::connect(addr);
    c.send_request(1, hello_body(1, 1));
    let r = c.read_response()?;
    match r.body {
        skiff::protocol::ResponseBody::Hello(_) => Some(c),
        skiff::protocol::ResponseBody::Error(e) if e.code == ErrorCode::TooManyConnections => None,
        other => panic!("unexpected answer to hello: {other:?}"),
    }
}

#[test]
fn the_connection_limit_refuses_the_third_connection() {
    let mut b = Broker::start("[server]\nmax_connections = 2\n");
    // The readiness probes may still count for a moment: retry until two
    // connections are in.
    let mut held = Vec::new();
    wait_until(Duration::from_secs(10), "two admitted connections", || {
        if let Some(c) = try_hello(&b.tcp) {
            held.push(c);
        }
        held.len() == 2
    });
    let mut third = RawConn::connect(&b.tcp);
    let r = third.expect_error(ErrorCode::TooManyConnections);
    assert_eq!(r.correlation_id, 0);
    third.expect_closed();
    // The admitted ones still work.
    for c in &mut held {
        c.send_request(
            2,
            skiff::protocol::RequestBody::ListTopics(Default::default()),
        );
        let r = c.read_response().expect("an answer");
        assert!(
            matches!(r.body, skiff::protocol::ResponseBody::ListTopics(_)),
            "{r:?}"
        );
    }
    // A freed slot is usable again.
    held.pop();
    let mut again = None;
    wait_until(Duration::from_secs(10), "a freed connection slot", || {
        again = try_hello(&b.tcp);
        again.is_some()
    });
    assert!(b.is_alive());
    drop(again);
    drop(held);
}

/// A refused client that sent its hello before reading is closed in order:
/// the refusal, then the end of the stream, and its hello read and dropped
/// rather than left unread. Closed with it unread, the socket was reset:
/// over TCP the client's next write failed (EPIPE), and a frame not yet
/// acknowledged would be lost; over the Unix socket the read after the
/// refusal failed with ECONNRESET instead of ending.
#[test]
fn a_refused_client_with_its_hello_sent_sees_an_orderly_close() {
    use std::io::{Read, Write};
    let b = Broker::start("[server]\nmax_connections = 1\n");
    let mut held = None;
    wait_until(Duration::from_secs(10), "one admitted connection", || {
        held = try_hello(&b.tcp);
        held.is_some()
    });
    let hello = request_frame(1, hello_body(1, 1));

    let mut tcp = RawConn::connect(&b.tcp);
    tcp.send(&hello);
    tcp.expect_error(ErrorCode::TooManyConnections);
    assert_eq!(tcp.stream.read(&mut [0u8; 64]).expect("the end"), 0);
    // A reset, had one been sent, has arrived by now: the write would fail.
    std::thread::sleep(Duration::from_millis(200));
    tcp.stream
        .write_all(&hello)
        .expect("a write after the refusal");

    let mut unix = std::os::unix::net::UnixStream::connect(b.unix_addr()).expect("connecting");
    unix.set_read_timeout(Some(RAW_READ_TIMEOUT))
        .expect("read timeout");
    unix.write_all(&hello).expect("writing a hello");
    // As above: a reset's error, had the socket been closed with the hello
    // unread, is there by now, ahead of the end of the stream.
    std::thread::sleep(Duration::from_millis(200));
    let mut said = Vec::new();
    unix.read_to_end(&mut said)
        .expect("the refusal, then the end");
    let n = skiff::protocol::frame_len(&said, u32::MAX)
        .expect("a frame")
        .expect("a whole frame");
    assert_eq!(n, said.len(), "one frame, then the end");
    match skiff::protocol::decode_response(&said[4..n])
        .expect("a response")
        .body
    {
        skiff::protocol::ResponseBody::Error(e) => {
            assert_eq!(e.code, ErrorCode::TooManyConnections)
        }
        other => panic!("not a refusal: {other:?}"),
    }
    drop(held);
}

/// docs/operations.md: `connections_refused_total` counts refusals at
/// accept per reason, every reason exported from the start. Over TCP the
/// address's limit is checked first; the Unix socket has no address, so
/// its refusals are the server's limit.
#[test]
fn refused_connections_are_counted_per_reason() {
    let b = Broker::start(
        "[server]\nmax_connections = 2\n[quotas]\nmax_connections_per_ip = 1\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let refused = |reason: &str| {
        let text = http_get(&b.metrics_addr(), "/metrics");
        sample(
            &text,
            "skiff_connections_refused_total",
            &format!("reason=\"{reason}\""),
        )
        .unwrap_or_else(|| panic!("no {reason} series in:\n{text}"))
    };
    for reason in [
        "max_connections",
        "max_connections_per_ip",
        "connection_rate_per_ip",
        "max_connections_per_identity",
        "no_peer_credentials",
    ] {
        refused(reason);
    }
    // The readiness probe's slots may still count for a moment.
    let mut tcp = None;
    wait_until(Duration::from_secs(10), "a TCP connection admitted", || {
        tcp = blocking::Client::connect(&b.tcp).ok();
        tcp.is_some()
    });
    let mut unix = None;
    wait_until(
        Duration::from_secs(10),
        "a Unix connection admitted",
        || {
            unix = blocking::Client::connect(&b.unix_addr()).ok();
            unix.is_some()
        },
    );
    let (per_ip, server) = (
        refused("max_connections_per_ip"),
        refused("max_connections"),
    );
    // Counted before the answer is sent. (A client writing its hello may
    // see the close, EPIPE, rather than the answer.)
    RawConn::connect(&b.tcp).expect_error(ErrorCode::TooManyConnections);
    assert_eq!(refused("max_connections_per_ip"), per_ip + 1.0);
    assert_eq!(refused("max_connections"), server);
    assert!(blocking::Client::connect(&b.unix_addr()).is_err());
    assert_eq!(refused("max_connections"), server + 1.0);
    assert_eq!(refused("max_connections_per_ip"), per_ip + 1.0);
    assert_eq!(refused("no_peer_credentials"), 0.0);
    drop((tcp, unix));
}

fn batch_of(value_bytes: usize) -> BatchBytes<'static> {
    let mut bb = BatchBuilder::new();
    bb.push(1_700_000_000_000, None, &vec![b'x'; value_bytes], &[]);
    bb.finish(ProducerStamp::NONE).into()
}

#[test]
fn a_batch_above_max_batch_bytes_is_refused_for_its_partition_only() {
    let mut b = Broker::start("[storage]\nmax_batch_bytes = 1024\n");
    let client = blocking::Client::connect(&b.tcp).expect("connect");
    assert_eq!(client.server_info().expect("info").max_batch_bytes, 1024);
    client
        .create_topic(CreateTopicRequest {
            name: "limits".to_owned(),
            partitions: Some(2),
            ..CreateTopicRequest::default()
        })
        .expect("create");
    let results = client
        .produce_raw(vec![
            ProducePartition {
                topic: "limits".to_owned(),
                partition: 0,
                batch: batch_of(2000),
            },
            ProducePartition {
                topic: "limits".to_owned(),
                partition: 1,
                batch: batch_of(100),
            },
        ])
        .expect("produce answered");
    assert_eq!(results[0].error, ErrorCode::BatchTooLarge, "{results:?}");
    assert_eq!(results[1].offsets(), Ok((0, 0)), "{results:?}");
    // The connection keeps working.
    assert_eq!(client.list_topics().expect("list"), ["limits"]);
    let results = client
        .produce_raw(vec![ProducePartition {
            topic: "limits".to_owned(),
            partition: 0,
            batch: batch_of(500),
        }])
        .expect("produce answered");
    assert_eq!(results[0].offsets(), Ok((0, 0)), "{results:?}");
    let d = client.describe_topic("limits").expect("describe");
    let latest: Vec<u64> = d.partitions.iter().map(|p| p.latest_offset).collect();
    assert_eq!(latest, [1, 1]);
    b.assert_serves();
}

/// Runs `skiff serve` on this data directory and Unix socket only, which
/// must fail; returns its stderr.
fn serve_fails(dir: &Path, data_dir: &Path, socket: &Path) -> String {
    let file = config_file(
        dir,
        "s.toml",
        &format!("data_dir = {data_dir:?}\n[server]\nlisten = \"\"\nunix_socket = {socket:?}\n"),
    );
    let o = run_in(dir, &["serve", "--config", &file]);
    assert!(!o.status.success(), "{}", stderr(&o));
    stderr(&o)
}

/// `server.unix_socket` naming an existing file that is not a socket (QA
/// report, finding 5): the broker used to delete it and bind there. Now it
/// refuses to start, naming the path, and the file is kept; a stale socket
/// a killed broker left is still replaced.
#[test]
fn a_unix_socket_path_that_is_a_regular_file_is_refused_and_kept() {
    let dir = temp_dir();
    let keep = dir.path().join("keep.toml");
    std::fs::write(&keep, "x = 1\n").unwrap();
    let err = serve_fails(dir.path(), &dir.path().join("data"), &keep);
    assert!(
        err.contains(keep.to_str().unwrap()) && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "x = 1\n");

    // A stale socket file (its listener gone) is replaced.
    let dir = temp_dir();
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("skiff.sock")).unwrap());
    assert!(dir.path().join("skiff.sock").exists());
    let b = Broker::start_in(dir, "");
    let o = run_cli(&["topics", "list"], &b.unix_addr(), None);
    assert_ok(&o);
}

/// Start-up errors from the data directory name the path (QA report,
/// findings 9 and 10): a corrupt `topics.meta` said only `corrupt
/// metadata file: CRC mismatch`, and a data_dir that is a file only
/// `storage I/O: File exists (os error 17)`.
#[test]
fn start_up_errors_name_the_file_or_directory() {
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "t"]));
    assert_eq!(b.stop(), Some(0));
    let meta = b.data_dir().join("topics.meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&meta, bytes).unwrap();
    let config = b.config_path.to_str().unwrap().to_owned();
    let o = run_in(b.dir.path(), &["serve", "--config", &config]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}: corrupt metadata file", meta.display())),
        "{err}"
    );

    let dir = temp_dir();
    let data = dir.path().join("data");
    std::fs::write(&data, "not a directory").unwrap();
    let err = serve_fails(dir.path(), &data, &dir.path().join("s.sock"));
    assert!(
        err.contains(&format!("data_dir {}: File exists", data.display())),
        "{err}"
    );
}
