//! The CLI contract end to end: topics admin, produce, consume (text and
//! JSON), the --from/--partition/--count/--timeout-ms flags, both transports,
//! and exit codes. Everything runs the real `skiff` binary.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use serde_json::Value;
use skiff::client::{blocking, ProducerConfig};
use skiff::protocol::CreateTopicRequest;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn lines(o: &std::process::Output) -> Vec<String> {
    stdout(o).lines().map(str::to_owned).collect()
}

#[test]
fn topics_create_list_describe_delete() {
    let b = Broker::start("");
    let o = b.cli(&[
        "topics",
        "create",
        "orders",
        "--partitions",
        "3",
        "--segment-bytes",
        "1048576",
        "--segments",
        "3",
        "--retention-ms",
        "60000",
        "--fsync",
        "interval:50",
        "--overflow",
        "reject",
    ]);
    assert_ok(&o);
    let created = lines(&o);
    assert_eq!(
        created,
        [
            "topic: orders",
            "partitions: 3",
            "segment_bytes: 1048576",
            "segments: 3",
            "retention_ms: 60000",
            "fsync: interval:50",
            "overflow: reject",
            "disk_reserved: 9 MiB (3 partition(s) x 3 segments x 1 MiB)",
        ]
    );
    assert_ok(&b.cli(&["topics", "create", "audit"]));

    let o = b.cli(&["topics", "list"]);
    assert_ok(&o);
    assert_eq!(lines(&o), ["audit", "orders"]);

    assert_ok(&b.cli(&["produce", "orders", "--partition", "1", "a", "b"]));
    let o = b.cli(&["topics", "describe", "orders"]);
    assert_ok(&o);
    let mut expected = created.clone();
    expected.extend([
        "partition 0: earliest 0 latest 0".to_owned(),
        "partition 1: earliest 0 latest 2".to_owned(),
        "partition 2: earliest 0 latest 0".to_owned(),
    ]);
    assert_eq!(lines(&o), expected);

    // Creating it again is an error naming the topic.
    let o = b.cli(&["topics", "create", "orders"]);
    assert_fails(&o, 1, &["orders"]);

    let o = b.cli(&["topics", "delete", "orders"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "");
    let o = b.cli(&["topics", "list"]);
    assert_ok(&o);
    assert_eq!(lines(&o), ["audit"]);
    assert_fails(&b.cli(&["topics", "describe", "orders"]), 1, &["orders"]);
    assert_fails(&b.cli(&["topics", "delete", "orders"]), 1, &["orders"]);

    // A misspelt policy is a bad command line (clap's error, status 2),
    // refused before connecting in the broker's own wording: the reason
    // right after clap's naming of the value, without the "invalid
    // storage config:" a config file's message starts with.
    let bad = [
        (
            "create",
            "--fsync",
            "sometimes",
            "fsync must be \"always\", \"interval:<ms>\"",
        ),
        (
            "create",
            "--overflow",
            "never",
            "overflow must be \"overwrite\" or \"reject\"",
        ),
        (
            "create",
            "--cleanup",
            "compact,dlete",
            "cleanup must be \"delete\", \"compact\"",
        ),
        (
            "alter",
            "--cleanup",
            "sometimes",
            "cleanup must be \"delete\", \"compact\"",
        ),
    ];
    for (command, flag, value, says) in bad {
        let o = b.cli(&["topics", command, "x", flag, value]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        let placeholder = flag.trim_start_matches('-').to_uppercase();
        assert!(
            err.contains(&format!(
                "invalid value '{value}' for '{flag} <{placeholder}>': {says}"
            )),
            "{err}"
        );
        assert!(!err.contains("config:"), "{err}");
    }
}

#[test]
fn produce_values_and_stdin_consume_text_over_tcp_and_unix() {
    let b = Broker::start("");
    let unix = b.unix.to_str().expect("utf-8 path").to_owned();
    assert_ok(&run_cli(&["topics", "create", "t"], &unix, None));
    assert_ok(&b.cli(&["produce", "t", "one", "two words", ""]));
    // Stdin: one record per line, without its \n or \r\n (README.md); a
    // \r anywhere else is the value's, a last line without a newline
    // still counts, empty lines are empty records.
    let o = run_cli(
        &["produce", "t"],
        &unix,
        Some(b"three\r\nfour\n\nfive\xffbytes\ncarriage\rreturn\r\r\nsix\r"),
    );
    assert_ok(&o);
    let expected: Vec<&[u8]> = vec![
        b"one",
        b"two words",
        b"",
        b"three",
        b"four",
        b"",
        b"five\xffbytes",
        b"carriage\rreturn\r",
        b"six\r",
    ];
    let mut want = Vec::new();
    for v in &expected {
        want.extend_from_slice(v);
        want.push(b'\n');
    }
    for broker in [b.tcp.as_str(), unix.as_str()] {
        let o = run_cli(&["consume", "t", "--timeout-ms", "300"], broker, None);
        assert_ok(&o);
        assert_eq!(o.stdout, want, "via {broker}");
        // JSON: offsets in order, the non-UTF-8 line in base64.
        let o = run_cli(
            &["consume", "t", "--format", "json", "--count", "9"],
            broker,
            None,
        );
        assert_ok(&o);
        let recs = json_lines(&o);
        assert_eq!(recs.len(), 9);
        for (i, (r, v)) in recs.iter().zip(&expected).enumerate() {
            assert_eq!(r["offset"], i as u64);
            match std::str::from_utf8(v) {
                Ok(s) => {
                    assert_eq!(r["value"], s);
                    assert_eq!(r["value_encoding"], "utf8");
                }
                Err(_) => {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(v);
                    assert_eq!(r["value"], b64.as_str());
                    assert_eq!(r["value_encoding"], "base64");
                }
            }
        }
    }
}

#[test]
fn consume_json_has_every_field_and_base64_for_binary() {
    let b = Broker::start("");
    let client = blocking::Client::connect(&b.tcp).expect("connect");
    client
        .create_topic(CreateTopicRequest {
            name: "bin".to_owned(),
            partitions: Some(2),
            ..CreateTopicRequest::default()
        })
        .expect("create");
    let producer = blocking::Producer::new(&client, ProducerConfig::default()).expect("producer");
    let before = now_ms();
    let d1 = producer.send_to(
        "bin",
        1,
        Some(&[0xff, 0x00, 0xfe]),
        &[0x80, 0x81, b'x', 0x00],
        &[("trace", b"abc"), ("raw", &[0xc3, 0x28])],
    );
    let d2 = producer.send_to("bin", 1, Some(b"k\xc3\xa9"), "héllo".as_bytes(), &[]);
    let d3 = producer.send_to("bin", 0, None, b"plain", &[]);
    producer.flush();
    let m1 = blocking::wait(d1).expect("ack");
    let m2 = blocking::wait(d2).expect("ack");
    let m3 = blocking::wait(d3).expect("ack");
    let after = now_ms();
    assert_eq!((m1.partition, m1.offset), (1, 0));
    assert_eq!((m2.partition, m2.offset), (1, 1));
    assert_eq!((m3.partition, m3.offset), (0, 0));

    let o = b.cli(&[
        "consume",
        "bin",
        "--format",
        "json",
        "--partition",
        "1",
        "--count",
        "2",
    ]);
    assert_ok(&o);
    let recs = json_lines(&o);
    assert_eq!(recs.len(), 2);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let r = &recs[0];
    let obj = r.as_object().expect("an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "headers",
            "key",
            "key_encoding",
            "offset",
            "partition",
            "timestamp",
            "topic",
            "value",
            "value_encoding"
        ]
    );
    assert_eq!(r["topic"], "bin");
    assert_eq!(r["partition"], 1);
    assert_eq!(r["offset"], 0);
    let ts = r["timestamp"].as_i64().expect("timestamp is an integer");
    assert!(before <= ts && ts <= after, "{before} <= {ts} <= {after}");
    assert_eq!(r["key"], b64(&[0xff, 0x00, 0xfe]).as_str());
    assert_eq!(r["key_encoding"], "base64");
    assert_eq!(r["value"], b64(&[0x80, 0x81, b'x', 0x00]).as_str());
    assert_eq!(r["value_encoding"], "base64");
    assert_eq!(
        r["headers"],
        serde_json::json!([
            {"name": "trace", "value": "abc", "value_encoding": "utf8"},
            {"name": "raw", "value": b64(&[0xc3, 0x28]), "value_encoding": "base64"},
        ])
    );
    let r = &recs[1];
    assert_eq!(r["offset"], 1);
    assert_eq!(r["key"], "ké");
    assert_eq!(r["key_encoding"], "utf8");
    assert_eq!(r["value"], "héllo");
    assert_eq!(r["value_encoding"], "utf8");
    assert_eq!(r["headers"], serde_json::json!([]));

    let o = b.cli(&[
        "consume",
        "bin",
        "--format",
        "json",
        "--partition",
        "0",
        "--timeout-ms",
        "300",
    ]);
    assert_ok(&o);
    let recs = json_lines(&o);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["key"], Value::Null);
    assert_eq!(recs[0]["key_encoding"], Value::Null);
    assert_eq!(recs[0]["value"], "plain");
    assert_eq!(recs[0]["partition"], 0);
}

#[test]
fn from_partition_count_and_timeout_flags() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "f", "--partitions", "2"]));
    assert_ok(&b.cli(&["produce", "f", "--partition", "0", "a0", "a1", "a2"]));
    assert_ok(&b.cli(&["produce", "f", "--partition", "1", "b0", "b1"]));
    // A time strictly after every record so far.
    let t = {
        let last = now_ms();
        wait_until(Duration::from_secs(5), "the clock to tick", || {
            now_ms() > last
        });
        now_ms()
    };
    assert_ok(&b.cli(&["produce", "f", "--partition", "0", "a3", "a4"]));

    let consume = |args: &[&str]| {
        let mut all = vec!["consume", "f", "--timeout-ms", "300"];
        all.extend_from_slice(args);
        let o = b.cli(&all);
        assert_ok(&o);
        lines(&o)
    };
    assert_eq!(
        consume(&["--partition", "0"]),
        ["a0", "a1", "a2", "a3", "a4"]
    );
    assert_eq!(
        consume(&["--partition", "0", "--from", "earliest"]),
        ["a0", "a1", "a2", "a3", "a4"]
    );
    assert_eq!(consume(&["--partition", "1"]), ["b0", "b1"]);
    assert_eq!(consume(&["--partition", "0", "--from", "3"]), ["a3", "a4"]);
    assert_eq!(consume(&["--partition", "1", "--from", "1"]), ["b1"]);
    assert_eq!(
        consume(&["--partition", "0", "--from", &format!("@{t}")]),
        ["a3", "a4"]
    );
    // Every record of partition 1 is older than t: nothing.
    assert!(consume(&["--partition", "1", "--from", &format!("@{t}")]).is_empty());
    assert!(consume(&["--from", "latest"]).is_empty());
    // All partitions: every record once.
    let mut all = consume(&[]);
    all.sort();
    assert_eq!(all, ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]);
    assert_eq!(consume(&["--partition", "0", "--count", "2"]), ["a0", "a1"]);

    // --count without --timeout-ms exits as soon as it has its records.
    let o = b.cli(&[
        "consume",
        "f",
        "--partition",
        "0",
        "--from",
        "4",
        "--count",
        "1",
    ]);
    assert_ok(&o);
    assert_eq!(lines(&o), ["a4"]);

    // --timeout-ms on an idle partition: exits 0 promptly with nothing.
    let started = Instant::now();
    let o = b.cli(&["consume", "f", "--from", "latest", "--timeout-ms", "200"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    // --from latest sees only records produced after it started: keep
    // producing until the consumer picks one up.
    let mut child = skiff_command()
        .args([
            "consume",
            "f",
            "--partition",
            "1",
            "--from",
            "latest",
            "--count",
            "1",
            "--broker",
        ])
        .arg(&b.tcp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning consume");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "consume --from latest never got a record"
        );
        assert_ok(&b.cli(&["produce", "f", "--partition", "1", &format!("new{n}")]));
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().expect("consume output");
    assert_ok(&o);
    let got = lines(&o);
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("new"), "{got:?}");
}

#[test]
fn exit_codes_and_error_messages() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "exists"]));

    assert_fails(
        &b.cli(&["consume", "missing-topic", "--timeout-ms", "300"]),
        1,
        &["missing-topic"],
    );
    assert_fails(
        &b.cli(&["produce", "missing-topic", "v"]),
        1,
        &["missing-topic"],
    );
    assert_fails(
        &b.cli(&["topics", "describe", "missing-topic"]),
        1,
        &["missing-topic"],
    );

    for bad in ["yesterday", "-1", "@", "@soon", "12x"] {
        let o = b.cli(&["consume", "exists", &format!("--from={bad}")]);
        assert_fails(&o, 2, &["--from", bad]);
    }

    let o = b.cli(&["consume", "exists", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--no-such-flag"), "{}", stderr(&o));
    let o = run_bin(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // No broker there: a closed port and a missing socket path.
    let closed = ClosedPort::new();
    let addr = closed.addr.clone();
    let o = run_cli(&["topics", "list"], &addr, None);
    assert_fails(&o, 1, &["cannot connect", &addr]);
    let gone = b.dir.path().join("nobody.sock");
    let gone = gone.to_str().expect("utf-8 path");
    // (produce waits for a broker that is starting: not here.)
    let o = run_cli(
        &["produce", "exists", "--retry-timeout-ms", "0", "v"],
        gone,
        None,
    );
    assert_fails(&o, 1, &[gone]);
    let o = run_cli(&["consume", "exists", "--timeout-ms", "100"], gone, None);
    assert_fails(&o, 1, &[gone]);

    // A malformed --broker is a usage error that says so, for every
    // command, before anything is tried.
    for bad in [
        "nonsense",
        "127.0.0.1",
        "host:port",
        ":9471",
        "127.0.0.1:99999",
    ] {
        for args in [
            &["topics", "list"][..],
            &["produce", "exists", "v"],
            &["consume", "exists"],
            &["bench", "produce", "--messages", "10"],
            &["bench", "consume"],
        ] {
            let o = run_cli(args, bad, None);
            assert_fails(&o, 2, &["--broker", bad, "is not an address"]);
        }
    }
}

/// storage.disk_budget_bytes caps what all topics' rings reserve: a topic past
/// it is refused, naming the numbers, and deleting one makes room.
#[test]
fn topics_past_the_disk_limit_are_refused() {
    // 4 MiB for topics, besides what is kept for the broker's own.
    let budget = 4194304 + INTERNAL_TOPICS_DISK_BYTES;
    let b = Broker::start(&format!(
        "\n[storage]\ndisk_budget_bytes = {budget}\n[topic_defaults]\nsegment_bytes = 1048576\nsegments = 2\n",
    ));
    let o = b.cli(&["topics", "create", "a", "--partitions", "2"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("disk_reserved: 4 MiB (2 partition(s) x 2 segments x 1 MiB)"),
        "{}",
        stdout(&o)
    );
    let o = b.cli(&["topics", "create", "b"]);
    let budget = budget.to_string();
    assert_fails(&o, 1, &["storage_full", "disk limit", "2097152", &budget]);
    assert_eq!(lines(&b.cli(&["topics", "list"])), ["a"]);
    assert_ok(&b.cli(&["topics", "delete", "a"]));
    assert_ok(&b.cli(&["topics", "create", "b"]));
}

/// An unknown topic reads the same whichever command met it.
#[test]
fn an_unknown_topic_is_worded_one_way() {
    let b = Broker::start("");
    for args in [
        &["consume", "nope", "--timeout-ms", "300"][..],
        &["consume", "nope", "--partition", "0", "--timeout-ms", "300"],
        &["produce", "nope", "v"],
        &["produce", "nope", "--partition", "0", "v"],
        &["topics", "describe", "nope"],
        &["topics", "delete", "nope"],
    ] {
        assert_fails(&b.cli(args), 1, &["unknown topic 'nope'"]);
    }
    assert_ok(&b.cli(&["topics", "create", "two", "--partitions", "2"]));
    for args in [
        &["consume", "two", "--partition", "5", "--timeout-ms", "300"][..],
        &["produce", "two", "--partition", "5", "v"],
    ] {
        assert_fails(&b.cli(args), 1, &["topic 'two' has no partition 5"]);
    }
}

/// Without --count or --timeout-ms, a consume whose stdout is not a
/// terminal prints the log as it is and ends (kcat's -e); --follow keeps
/// waiting, as a terminal does.
#[test]
fn consume_into_a_pipe_stops_at_the_end_of_the_log() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "end", "--partitions", "3"]));
    assert_ok(&b.cli(&["produce", "end", "--partition", "2", "a", "b"]));
    assert_ok(&b.cli(&["produce", "end", "--partition", "0", "c"]));
    let started = Instant::now();
    let o = b.cli(&["consume", "end"]);
    assert_ok(&o);
    let mut got = lines(&o);
    got.sort();
    assert_eq!(got, ["a", "b", "c"]);
    let o = b.cli(&["consume", "end", "--partition", "2", "--format", "json"]);
    assert_ok(&o);
    assert_eq!(json_lines(&o).len(), 2);
    // An empty partition, and the end as the start: nothing, at once.
    let o = b.cli(&["consume", "end", "--partition", "1"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "");
    let o = b.cli(&["consume", "end", "--from", "latest"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    // --follow waits past the end for what comes next.
    let mut child = skiff_command()
        .args(["consume", "end", "--partition", "1", "--follow", "--broker"])
        .arg(&b.tcp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning consume --follow");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "consume --follow ended at the end of the log"
    );
    assert_ok(&b.cli(&["produce", "end", "--partition", "1", "later"]));
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().expect("consume output");
    assert_eq!(stdout(&o), "later\n", "stderr: {}", stderr(&o));
}

/// `skiff produce` started before its broker waits for it, within
/// --retry-timeout-ms, saying so on stderr at most once a second; past the
/// deadline it gives up with exit 1.
#[test]
fn produce_waits_for_a_broker_that_is_starting() {
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "late"]));
    b.stop();
    let unix = b.unix.to_str().expect("utf-8 path").to_owned();
    let started = Instant::now();
    let producer = skiff_command()
        .args(["produce", "late", "--retry-timeout-ms", "60000", "--broker"])
        .arg(&unix)
        .args(["one", "two"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning produce");
    std::thread::sleep(Duration::from_millis(2500));
    b.restart();
    let o = producer.wait_with_output().expect("produce output");
    let waited = started.elapsed();
    assert_ok(&o);
    let err = stderr(&o);
    let retries = err.lines().filter(|l| l.contains("retrying")).count();
    assert!(retries >= 2, "a notice per second of waiting: {err}");
    assert!(
        retries as f64 <= waited.as_secs_f64() + 1.0,
        "{retries} notices in {waited:?}: {err}"
    );
    assert!(err.contains(&unix), "names the address: {err}");
    assert!(
        err.lines().last().unwrap_or("").contains("connected"),
        "{err}"
    );
    let o = b.cli(&["consume", "late"]);
    assert_eq!(lines(&o), ["one", "two"]);

    // --quiet: no notices, and the deadline ends it.
    let gone = b.dir.path().join("nobody.sock");
    let gone = gone.to_str().expect("utf-8 path");
    let started = Instant::now();
    let o = run_cli(
        &[
            "produce",
            "late",
            "--retry-timeout-ms",
            "1500",
            "--quiet",
            "v",
        ],
        gone,
        None,
    );
    assert_fails(&o, 1, &["cannot connect", gone, "--retry-timeout-ms 1500"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(20),
        "{took:?}"
    );
}

/// A broker that takes the connection and never answers (hung, or a
/// stranger on its port: the kernel completes the handshake for a listener
/// that never accepts) is given up on at --retry-timeout-ms, not after the
/// client's 10 s connect timeout.
#[test]
fn produce_gives_up_on_a_silent_broker_at_its_retry_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a listener");
    let addr = silent.local_addr().expect("its address").to_string();
    let started = Instant::now();
    let o = run_cli(
        &["produce", "t", "--retry-timeout-ms", "1000", "--quiet", "v"],
        &addr,
        None,
    );
    let took = started.elapsed();
    assert_fails(
        &o,
        1,
        &[
            "cannot connect",
            &addr,
            "timed out",
            "--retry-timeout-ms 1000",
        ],
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    drop(silent);
}

/// A client command that does not end is killed at the harness's limit,
/// and the test fails saying so, with what the command printed, instead
/// of hanging until nextest ends it with nothing said.
#[test]
fn a_client_command_that_does_not_end_fails_the_test_with_its_output() {
    let closed = ClosedPort::new();
    let hung = std::panic::catch_unwind(|| {
        run_cli_within(
            &["produce", "t", "--retry-timeout-ms", "3600000", "v"],
            &closed.addr,
            None,
            Duration::from_secs(2),
        )
    })
    .expect_err("a command retrying for an hour outlasts the limit");
    let said = hung.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        said.contains("skiff produce t --retry-timeout-ms 3600000 v did not finish within 2s")
            && said.contains(&format!("cannot connect to {}", closed.addr)),
        "{said}"
    );
}

/// A record dropped by a topic's message-id window is counted on stderr,
/// unless --quiet.
#[test]
fn produce_counts_the_duplicates_it_dropped() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "ev", "--msg-id-window-ms", "600000"]));
    let o = b.cli_stdin(
        &["produce", "ev", "--msg-id-header", "msg-id"],
        Some(b"e1\ta\ne2\tb\ne1\ta\n"),
    );
    assert_ok(&o);
    assert_eq!(
        stderr(&o).trim_end(),
        "skiff: 1 record dropped as duplicate (a message id the topic had seen)"
    );
    let o = b.cli_stdin(
        &["produce", "ev", "--msg-id-header", "msg-id"],
        Some(b"e1\ta\ne2\tb\ne3\tc\n"),
    );
    assert_ok(&o);
    assert!(
        stderr(&o).contains("2 records dropped as duplicates"),
        "{}",
        stderr(&o)
    );
    let o = b.cli_stdin(
        &["produce", "ev", "--msg-id-header", "msg-id", "--quiet"],
        Some(b"e3\tc\n"),
    );
    assert_ok(&o);
    assert_eq!(stderr(&o), "");
    let o = b.cli_stdin(
        &["produce", "ev", "--msg-id-header", "msg-id"],
        Some(b"e4\td\n"),
    );
    assert_ok(&o);
    assert_eq!(stderr(&o), "", "nothing to report");
    assert_eq!(lines(&b.cli(&["consume", "ev"])), ["a", "b", "c", "d"]);
}

/// Each `skiff produce` starts its unkeyed records at a random partition,
/// so runs of a few records spread over the topic.
#[test]
fn unkeyed_records_from_separate_runs_spread_over_the_partitions() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "spread", "--partitions", "4"]));
    for i in 0..12 {
        assert_ok(&b.cli(&["produce", "spread", &format!("r{i}")]));
    }
    let o = b.cli(&["topics", "describe", "spread"]);
    let used = lines(&o)
        .iter()
        .filter(|l| l.starts_with("partition ") && !l.ends_with("latest 0"))
        .count();
    // Twelve runs on one partition: 4^-11 by chance.
    assert!(used >= 2, "{}", stdout(&o));
}

/// `skiff bench produce --existing-topic` produces into the topic as the
/// caller made it (scripts/bench-slow-device counts a device's flushes
/// around the run alone): neither made again first nor deleted after, and
/// a missing one is a clear error, not made.
#[test]
fn bench_produce_into_an_existing_topic_leaves_it_as_it_was() {
    let b = Broker::start("");
    assert_ok(&b.cli(&[
        "topics",
        "create",
        "kept",
        "--segments",
        "3",
        "--segment-bytes",
        "1048576",
    ]));
    for _ in 0..2 {
        let out = b.cli(&[
            "bench",
            "produce",
            "--topic",
            "kept",
            "--existing-topic",
            "--messages",
            "500",
        ]);
        assert_ok(&out);
        assert_eq!(json_lines(&out)[0]["messages"], 500);
    }
    let out = b.cli(&["topics", "describe", "kept"]);
    assert_ok(&out);
    let text = stdout(&out);
    for line in ["segments: 3", "partition 0: earliest 0 latest 1000"] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    let out = b.cli(&[
        "bench",
        "produce",
        "--topic",
        "missing",
        "--existing-topic",
        "--messages",
        "10",
    ]);
    assert_fails(&out, 1, &["unknown topic 'missing'"]);
    let out = b.cli(&["topics", "list"]);
    assert!(!stdout(&out).contains("missing"), "{}", stdout(&out));
    let out = b.cli(&[
        "bench",
        "produce",
        "--existing-topic",
        "--compare-idempotence",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");
    assert!(stderr(&out).contains("--existing-topic"), "{out:?}");
}

/// `skiff bench produce|consume` print one JSON line each with the figures
/// docs/performance.md's method asks for; `--compare-idempotence` prints both modes'
/// rates from one run; `--rate` runs the open loop.
#[test]
fn bench_commands_print_one_json_line() {
    let b = Broker::start("");
    let out = b.cli(&[
        "bench",
        "produce",
        "--messages",
        "3000",
        "--size",
        "50",
        "--keep",
    ]);
    assert_ok(&out);
    let p = json_lines(&out);
    assert_eq!(p.len(), 1, "{}", stdout(&out));
    let p = &p[0];
    assert_eq!(p["workload"], "produce");
    assert_eq!(p["messages"], 3000);
    assert_eq!(p["fsync"], "always");
    assert!(p["msgs_per_s"].as_f64().unwrap() > 0.0);
    let lat = &p["ack_latency_us"];
    let (p50, p99, max) = (
        lat["p50"].as_u64().unwrap(),
        lat["p99"].as_u64().unwrap(),
        lat["max"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{lat}");

    assert!(p.get("broker_cpu_s").is_none(), "only with --broker-pid");
    assert!(
        p.get("broker_runq_wait_s").is_none(),
        "only with --broker-pid"
    );
    assert!(p["client_runq_wait_s"].as_f64().unwrap() >= 0.0, "{p}");

    let pid = b.pid().to_string();
    let out = b.cli(&["bench", "consume", "--broker-pid", &pid]);
    assert_ok(&out);
    let c = &json_lines(&out)[0];
    assert_eq!(c["workload"], "consume");
    assert_eq!(c["messages"], 3000, "replays what the produce run wrote");
    assert_eq!(c["payload_bytes"], 3000 * 50);
    let (cpu, per_m) = (
        c["broker_cpu_s"].as_f64().unwrap(),
        c["broker_cpu_s_per_m_records"].as_f64().unwrap(),
    );
    assert!(
        cpu >= 0.0 && (per_m - cpu * 1e6 / 3000.0).abs() < 1e-6,
        "{c}"
    );
    assert_eq!(c["passes"], 1);
    // --min-seconds reads the topic again from its start, whole passes
    // only, until the time is up.
    let out = b.cli(&["bench", "consume", "--min-seconds", "1"]);
    assert_ok(&out);
    let c = &json_lines(&out)[0];
    let passes = c["passes"].as_u64().unwrap();
    assert!(passes >= 2, "3,000 records take far less than 1 s: {c}");
    assert_eq!(c["messages"], 3000 * passes, "{c}");
    assert!(c["elapsed_s"].as_f64().unwrap() >= 1.0, "{c}");
    for bad in ["-1", "NaN", "1e300"] {
        let out = b.cli(&["bench", "consume", "--min-seconds", bad]);
        assert_fails(&out, 2, &["--min-seconds"]);
    }
    let out = b.cli(&[
        "bench",
        "produce",
        "--messages",
        "1000",
        "--keep",
        "--broker-pid",
        &pid,
    ]);
    assert_ok(&out);
    let p = &json_lines(&out)[0];
    assert!(p["broker_cpu_s"].as_f64().unwrap() >= 0.0, "{p}");
    assert!(p["broker_runq_wait_s"].as_f64().unwrap() >= 0.0, "{p}");

    let out = b.cli(&[
        "bench",
        "produce",
        "--messages",
        "4000",
        "--compare-idempotence",
        "2",
        "--keep",
    ]);
    assert_ok(&out);
    let ab = &json_lines(&out)[0];
    assert_eq!(ab["workload"], "produce_idempotence_ab");
    let (on, off) = (
        ab["idempotent_msgs_per_s"].as_f64().unwrap(),
        ab["plain_msgs_per_s"].as_f64().unwrap(),
    );
    assert!(on > 0.0 && off > 0.0, "{ab}");
    assert!((ab["idempotent_over_plain"].as_f64().unwrap() - on / off).abs() < 1e-9);
    // Everything was written: 2 rounds x 2 modes x 1000 records.
    let out = b.cli(&["bench", "consume"]);
    assert_eq!(json_lines(&out)[0]["messages"], 4000);

    let out = b.cli(&["bench", "produce", "--compare-idempotence", "0"]);
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");

    // The open loop sends each record when it is due, so the last of 1,000
    // at 4,000/s cannot go before 0.25 s.
    let out = b.cli(&[
        "bench",
        "produce",
        "--messages",
        "1000",
        "--rate",
        "4000",
        "--keep",
    ]);
    assert_ok(&out);
    let o = &json_lines(&out)[0];
    assert_eq!(o["workload"], "produce_open_loop");
    assert_eq!(o["rate"], 4000);
    assert!(o["elapsed_s"].as_f64().unwrap() >= 0.24975, "{o}");
    assert!(o["ack_latency_us"]["p50"].as_u64().unwrap() > 0, "{o}");
    let out = b.cli(&["bench", "consume"]);
    assert_eq!(json_lines(&out)[0]["messages"], 1000);

    // Without --keep the bench deletes its topic, and the disk it reserved.
    assert_ok(&b.cli(&["bench", "produce", "--messages", "1000"]));
    let o = b.cli(&["topics", "list"]);
    assert_eq!(stdout(&o), "", "the bench topic was left behind");
    let o = b.cli(&["bench", "consume"]);
    assert_fails(&o, 1, &["skiff-bench", "--keep"]);
    for bad in [
        &["--rate", "0"][..],
        &["--rate", "100", "--compare-idempotence", "2"],
        &["--fsync", "sometimes"],
        &["--topic", "a b"],
    ] {
        let out = b.cli(&[&["bench", "produce"][..], bad].concat());
        assert_eq!(out.status.code(), Some(2), "usage error {bad:?}: {out:?}");
    }
    for bench in ["consume", "group", "share", "txn"] {
        let out = b.cli(&["bench", bench, "--topic", ""]);
        assert_eq!(out.status.code(), Some(2), "usage error {bench}: {out:?}");
        assert!(stderr(&out).contains("invalid topic name"), "{out:?}");
    }
}

/// `skiff bench loopback` sends what it was asked over one loopback TCP
/// connection and prints one JSON line; less than one write is a usage
/// error.
#[test]
fn bench_loopback_prints_the_loopback_bandwidth() {
    let out = skiff_command()
        .args([
            "bench", "loopback", "--bytes", "8388608", "--window", "1024000",
        ])
        .output()
        .expect("running skiff");
    assert_ok(&out);
    let l = &json_lines(&out)[0];
    assert_eq!(l["workload"], "loopback");
    assert_eq!(l["bytes"], 8 << 20);
    assert!(l["mb_per_s"].as_f64().unwrap() > 0.0, "{l}");
    // At a producer's depth: windows each answered before the next.
    assert_eq!(l["window_bytes"], 1_024_000);
    assert!(l["window_mb_per_s"].as_f64().unwrap() > 0.0, "{l}");
    let out = skiff_command()
        .args(["bench", "loopback", "--bytes", "4096"])
        .output()
        .expect("running skiff");
    assert_fails(&out, 2, &["--bytes"]);
}

/// `skiff bench disk` measures the raw write and read bandwidth where it
/// is pointed and prints one JSON line; a missing directory or a file is a
/// runtime error naming it, a size below one write a usage error.
#[test]
fn bench_disk_prints_the_raw_bandwidth_of_a_directory() {
    let dir = temp_dir();
    let path = dir.path().to_str().expect("utf-8 path");
    let out = skiff_command()
        .args([
            "bench",
            "disk",
            "--dir",
            path,
            "--bytes",
            "8388608",
            "--overwrite",
            "--window",
            "1000000",
        ])
        .output()
        .expect("running skiff");
    assert_ok(&out);
    let d = &json_lines(&out)[0];
    // Durable windows at a producer's depth, rounded up to whole blocks.
    assert_eq!(d["window_bytes"], 1_003_520);
    assert!(d["window_mb_per_s"].as_f64().unwrap() > 0.0, "{d}");
    assert_eq!(d["workload"], "disk");
    assert_eq!(d["dir"], path);
    assert_eq!(d["bytes"], 8 << 20);
    for key in [
        "fresh_mb_per_s",
        "overwrite_mb_per_s",
        "fresh_read_mb_per_s",
        "overwrite_read_mb_per_s",
    ] {
        assert!(d[key].as_f64().unwrap() > 0.0, "{key}: {d}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the scratch file is removed"
    );

    let gone = dir.path().join("gone");
    let gone = gone.to_str().expect("utf-8 path");
    let out = skiff_command()
        .args(["bench", "disk", "--dir", gone, "--bytes", "1048576"])
        .output()
        .expect("running skiff");
    assert_fails(&out, 1, &[gone]);
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let file = file.to_str().expect("utf-8 path");
    let out = skiff_command()
        .args(["bench", "disk", "--dir", file, "--bytes", "1048576"])
        .output()
        .expect("running skiff");
    assert_fails(&out, 1, &[file, "not a directory"]);
    let out = skiff_command()
        .args(["bench", "disk", "--bytes", "4096"])
        .output()
        .expect("running skiff");
    assert_fails(&out, 2, &["--bytes"]);
}

/// `skiff bench sync` times durable one-block writes where it is pointed
/// and prints their percentiles as one JSON line; a missing directory is a
/// runtime error naming it, a count of 0 a usage error.
#[test]
fn bench_sync_prints_the_durable_write_latency_of_a_directory() {
    let dir = temp_dir();
    let path = dir.path().to_str().expect("utf-8 path");
    let out = skiff_command()
        .args(["bench", "sync", "--dir", path, "--count", "50"])
        .output()
        .expect("running skiff");
    assert_ok(&out);
    let s = &json_lines(&out)[0];
    assert_eq!(s["workload"], "sync");
    assert_eq!(s["count"], 50);
    assert_eq!(s["write_bytes"], 4096);
    let lat = &s["sync_us"];
    let (p50, p99, max) = (
        lat["p50"].as_u64().unwrap(),
        lat["p99"].as_u64().unwrap(),
        lat["max"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{lat}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the scratch file is removed"
    );
    let gone = dir.path().join("gone");
    let gone = gone.to_str().expect("utf-8 path");
    let out = skiff_command()
        .args(["bench", "sync", "--dir", gone])
        .output()
        .expect("running skiff");
    assert_fails(&out, 1, &[gone]);
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let file = file.to_str().expect("utf-8 path");
    let out = skiff_command()
        .args(["bench", "sync", "--dir", file])
        .output()
        .expect("running skiff");
    assert_fails(&out, 1, &[file, "not a directory"]);
    let out = skiff_command()
        .args(["bench", "sync", "--dir", path, "--count", "0"])
        .output()
        .expect("running skiff");
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");
}

/// `skiff bench sync --rate` spaces the writes out (20 at 200 a second
/// cannot take under 95 ms) and reports the CPU and the sleeps each cost,
/// the floor under a lightly loaded broker's CPU per record.
#[test]
fn bench_sync_at_a_rate_reports_the_cpu_of_each_write() {
    let dir = temp_dir();
    let path = dir.path().to_str().expect("utf-8 path");
    let started = std::time::Instant::now();
    let out = skiff_command()
        .args([
            "bench", "sync", "--dir", path, "--count", "20", "--rate", "200",
        ])
        .output()
        .expect("running skiff");
    let elapsed = started.elapsed();
    assert_ok(&out);
    assert!(
        elapsed >= std::time::Duration::from_millis(95),
        "{elapsed:?}"
    );
    let s = &json_lines(&out)[0];
    assert_eq!(s["rate"], 200);
    let cpu = s["cpu_us_per_write"].as_f64().expect("cpu_us_per_write");
    assert!(cpu > 0.0, "{s}");
    // At least the 19 sleeps between the 20 writes.
    let switches = s["voluntary_switches_per_write"]
        .as_f64()
        .expect("switches");
    assert!(switches >= 19.0 / 20.0, "{s}");
    let out = skiff_command()
        .args(["bench", "sync", "--dir", path, "--count", "10"])
        .output()
        .expect("running skiff");
    assert_ok(&out);
    assert!(json_lines(&out)[0]["rate"].is_null());
    let out = skiff_command()
        .args(["bench", "sync", "--dir", path, "--rate", "0"])
        .output()
        .expect("running skiff");
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");
}

/// With --partitions, producer i writes to partition i mod N: every
/// partition gets its producer's share, and the line names the count.
#[test]
fn bench_produce_spreads_producers_over_partitions() {
    let b = Broker::start("");
    let out = b.cli(&[
        "bench",
        "produce",
        "--messages",
        "3000",
        "--producers",
        "3",
        "--partitions",
        "3",
        "--keep",
    ]);
    assert_ok(&out);
    let p = &json_lines(&out)[0];
    assert_eq!(p["partitions"], 3);
    assert_eq!(p["producers"], 3);
    let out = b.cli(&["topics", "describe", "skiff-bench", "--format", "json"]);
    assert_ok(&out);
    let d: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let parts = d["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 3, "{d}");
    for part in parts {
        assert_eq!(part["log_end"], 1000, "one producer's share each: {d}");
    }
    let out = b.cli(&["bench", "produce", "--partitions", "0"]);
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");
}

/// `--devices`: each producer speaks the protocol itself, one idempotent
/// record per request, over TCP and the Unix socket; every record lands
/// once, in its producer's partition.
#[test]
fn bench_produce_as_devices_writes_every_record_once() {
    // Two kept bench topics of 1 GiB each: more than the default 2 GiB
    // budget leaves besides the room kept for the broker's own topics.
    let b = Broker::start("[storage]\ndisk_budget_bytes = 4294967296\n");
    let unix = b.unix.to_str().expect("utf-8 path").to_owned();
    fn devices<'a>(rest: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["bench", "produce", "--devices", "--in-flight", "1"];
        args.extend(["--queued", "0", "--producers", "4"]);
        args.extend_from_slice(rest);
        args
    }
    for (topic, addr) in [("dev-tcp", b.tcp.as_str()), ("dev-unix", unix.as_str())] {
        let args = [
            "--messages",
            "402",
            "--partitions",
            "2",
            "--topic",
            topic,
            "--keep",
        ];
        let out = run_cli(&devices(&args), addr, None);
        assert_ok(&out);
        let p = &json_lines(&out)[0];
        assert_eq!(p["client"], "devices", "{p}");
        assert_eq!(p["messages"], 402, "{p}");
        let out = b.cli(&["topics", "describe", topic, "--format", "json"]);
        assert_ok(&out);
        let d: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        let ends: Vec<u64> = d["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .map(|p| p["log_end"].as_u64().expect("log_end"))
            .collect();
        // Producer 0 takes the remainder: 102 and 100 to partition 0, 100
        // and 100 to partition 1.
        assert_eq!(ends, [202, 200], "{topic}: {d}");
    }
    // An open loop: each device's records sent when due, not at once.
    let out = b.cli(&devices(&[
        "--messages",
        "200",
        "--rate",
        "400",
        "--topic",
        "dev-open",
        "--segments",
        "2",
        "--keep",
    ]));
    assert_ok(&out);
    let p = &json_lines(&out)[0];
    assert_eq!(p["workload"], "produce_open_loop", "{p}");
    assert!(
        p["elapsed_s"].as_f64().expect("elapsed") >= 0.45,
        "paced: {p}"
    );
    let out = b.cli(&["topics", "describe", "dev-open", "--format", "json"]);
    assert_ok(&out);
    let d: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(d["partitions"][0]["log_end"], 200, "{d}");
    let out = b.cli(&["bench", "produce", "--devices", "--messages", "10"]);
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");
    assert!(stderr(&out).contains("--in-flight 1 --queued 0"), "{out:?}");
}

#[test]
fn list_commands_into_a_closed_pipe_end_quietly() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "closed-pipe"]));
    for args in [
        &["topics", "list"][..],
        &["topics", "describe", "closed-pipe"],
        &["groups", "list"],
        &["txn", "list"],
        &["share-groups", "list"],
    ] {
        // The reader is gone before the command starts, so its first write
        // meets EPIPE every time (`skiff ... | head -0`, deterministically).
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let o = skiff_command()
            .args(args)
            .arg("--broker")
            .arg(&b.tcp)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("running skiff");
        let err = stderr(&o);
        assert!(
            o.status.success() && !err.contains("panicked"),
            "skiff {args:?} into a closed pipe: {:?}, stderr: {err}",
            o.status
        );
    }
}

/// A produce refused until --retry-timeout-ms ran out says why: a retry
/// line while it waits, and the last refusal with the timeout, not a bare
/// "timed out". (A full `overflow = reject` ring frees by retention or a
/// consumer's delete, so it is retried like any refusal that may pass.)
#[test]
fn a_produce_refused_until_it_times_out_names_the_refusal() {
    let b = Broker::start("");
    assert_ok(&b.cli(&[
        "topics",
        "create",
        "rj",
        "--segment-bytes",
        "65536",
        "--segments",
        "2",
        "--overflow",
        "reject",
    ]));
    let fifty: String = (0..50).map(|_| "x".repeat(1000) + "\n").collect();
    let mut refused = None;
    for _ in 0..6 {
        let started = Instant::now();
        let o = b.cli_stdin(
            &["produce", "rj", "--retry-timeout-ms", "2500"],
            Some(fifty.as_bytes()),
        );
        if !o.status.success() {
            refused = Some((o, started.elapsed()));
            break;
        }
    }
    let (o, took) = refused.expect("the ring fills up");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(took >= Duration::from_secs(2), "retried: {took:?}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("skiff: produce to rj: timed out after 2.5 s; last error: ")
            && last.contains("storage_full")
            && last.contains("overflow = reject"),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("skiff: produce to rj/0 failed (")
                && l.contains("storage_full")
                && l.contains("retrying for")),
        "{err}"
    );
}

/// TLS options that cannot be used are a usage error, said as such: no
/// connection was tried, so no "cannot connect to HOST".
#[test]
fn unusable_tls_options_are_not_called_a_connection_failure() {
    let port = ClosedPort::new();
    for cmd in [&["topics", "list"][..], &["produce", "t", "x"]] {
        let mut args = cmd.to_vec();
        args.extend(["--tls-cert", "/nonexistent/dev.pem"]);
        let o = run_cli(&args, &port.addr, None);
        assert_eq!(
            stderr(&o),
            "skiff: TLS: --tls-cert and --tls-key go together\n",
            "{cmd:?}"
        );
        assert_eq!(o.status.code(), Some(2), "{cmd:?}");
    }
}

/// A topic whose segments are smaller than the server's max_batch_bytes
/// takes only batches that fit a segment: the producer learns its limit
/// and batches by it, so a bulk write goes through, and a record too large
/// for it is refused by the client, naming the topic's limit.
#[test]
fn produce_batches_by_the_limit_of_a_topic_with_small_segments() {
    let b = Broker::start("");
    assert_ok(&b.cli(&[
        "topics",
        "create",
        "small",
        "--partitions",
        "1",
        "--segment-bytes",
        "65536",
        "--segments",
        "8",
    ]));
    let many: String = (0..200)
        .map(|i| format!("{i:04}{}\n", "x".repeat(996)))
        .collect();
    let o = b.cli_stdin(
        &["produce", "small", "--retry-timeout-ms", "10000"],
        Some(many.as_bytes()),
    );
    assert_ok(&o);
    let o = b.cli(&["consume", "small", "--from", "earliest"]);
    assert_ok(&o);
    let got = lines(&o);
    assert_eq!(got.len(), 200);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, l)| l.starts_with(&format!("{i:04}"))));
    let big = "y".repeat(62_000);
    let o = b.cli(&["produce", "small", &big]);
    assert_fails(&o, 1, &["does not fit a batch of 61440 bytes"]);
}

/// A record that fails on its own names where it came from, its line of
/// stdin or its VALUE argument, as a line without a message id does.
#[test]
fn produce_names_the_line_of_a_record_too_large_for_a_batch() {
    let b = Broker::start("");
    // Small segments make a small batch limit: a record past it still fits
    // an argument (at most 128 KiB).
    assert_ok(&b.cli(&["topics", "create", "t", "--segment-bytes", "65536"]));
    let big = "y".repeat(62_000);
    let input = format!("a\nb\n{big}\nd\n");
    let o = b.cli_stdin(&["produce", "t"], Some(input.as_bytes()));
    assert_fails(
        &o,
        1,
        &[
            "produce to t: line 3: record of about",
            "does not fit a batch of 61440 bytes",
        ],
    );
    let o = b.cli(&["produce", "t", "a", &big]);
    assert_fails(&o, 1, &["produce to t: value 2: record of about"]);
    let o = b.cli_stdin(
        &["produce", "t", "--msg-id-header", "m"],
        Some(b"1\ta\nno tab\n"),
    );
    assert_fails(&o, 2, &["line 2 has no TAB"]);
}

/// A name no topic can have is a usage error, worded as the broker words
/// it for `topics create`, and found before connecting: here to a socket
/// nobody listens on. Every command that names a topic on its command line.
#[test]
fn an_invalid_topic_name_is_refused_before_connecting() {
    let dir = temp_dir();
    let gone = dir.path().join("nobody.sock");
    let gone = gone.to_str().expect("utf-8 path");
    for name in ["", "a b", ".."] {
        let said = format!("invalid topic name '{name}': use 1 to 249 of A-Z a-z 0-9 . _ -");
        for args in [
            &["produce", name, "v"][..],
            &["produce", name],
            &["consume", name, "--timeout-ms", "100"],
            &["consume", name, "--group", "g", "--timeout-ms", "100"],
            &["consume", name, "--share-group", "g", "--exec", "true"],
            &["topics", "create", name],
            &["topics", "describe", name],
            &["topics", "delete", name],
            &[
                "txn",
                "--id",
                "t",
                "--consume",
                name,
                "--group",
                "g",
                "--to",
                "out",
            ],
            &[
                "txn",
                "--id",
                "t",
                "--consume",
                "in",
                "--group",
                "g",
                "--to",
                name,
            ],
            &[
                "groups",
                "reset-offsets",
                "g",
                "--topic",
                name,
                "--to",
                "earliest",
            ],
            &["dlq", "list", name],
            &["dlq", "replay", name],
            &["dlq", "list", "t", "--dead-letter-topic", name],
            &["dlq", "replay", "t", "--dead-letter-topic", name],
        ] {
            let o = run_cli(args, gone, None);
            assert_fails(&o, 2, &[&said]);
        }
    }
}
