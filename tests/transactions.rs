//! Transactions through the real binary: `skiff txn` and `skiff consume
//! --isolation`, commit and abort across three topics, a killed `skiff
//! txn` aborted after its timeout, kill -9 of the broker during commits
//! with the all-or-nothing invariant checked each time, a `skiff txn`
//! whose record fails mid-way, and consume-transform-produce (`skiff txn
//! --consume`) killed at random points, exactly once.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const TOPICS: [&str; 3] = ["orders", "analytics", "alarms"];

fn create_topics(b: &Broker) {
    for t in TOPICS {
        // Small rings: recovery after a kill reads the active segments
        // past their data, and the crash test restarts 20 times.
        assert_ok(&b.cli(&[
            "topics",
            "create",
            t,
            "--partitions",
            "2",
            "--segment-bytes",
            "1048576",
            "--segments",
            "4",
        ]));
    }
}

/// Every value in `topic` under `isolation`, to the end of what is readable.
fn read_all(b: &Broker, topic: &str, isolation: &str) -> Vec<String> {
    let o = b.cli(&["consume", topic, "--isolation", isolation]);
    assert_ok(&o);
    stdout(&o).lines().map(str::to_owned).collect()
}

/// `skiff txn list --format json`: one object per transactional id.
fn txn_list(b: &Broker) -> Vec<serde_json::Value> {
    let o = b.cli(&["txn", "list", "--format", "json"]);
    assert_ok(&o);
    match serde_json::from_str(&stdout(&o)).unwrap() {
        serde_json::Value::Array(v) => v,
        other => panic!("not an array: {other}"),
    }
}

/// The state `skiff txn list` shows for `id` (empty if not listed).
fn txn_state(b: &Broker, id: &str) -> String {
    txn_list(b)
        .iter()
        .find(|t| t["id"] == id)
        .map(|t| t["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn txn_input(tag: &str) -> Vec<u8> {
    let mut s = String::new();
    for t in TOPICS {
        for i in 0..3 {
            s.push_str(&format!("{t}\t{tag}-{t}-{i}\n"));
        }
    }
    s.into_bytes()
}

#[test]
fn committed_and_aborted_transactions_across_three_topics_under_both_isolations() {
    let b = Broker::start("");
    create_topics(&b);
    assert_ok(&b.cli_stdin(&["txn", "--id", "w1"], Some(&txn_input("c1"))));
    assert_ok(&b.cli_stdin(&["txn", "--id", "w1", "--abort"], Some(&txn_input("a1"))));
    assert_ok(&b.cli_stdin(&["txn", "--id", "w2"], Some(&txn_input("c2"))));
    assert_ok(&b.cli(&["produce", "orders", "plain"]));
    for t in TOPICS {
        let committed = read_all(&b, t, "read_committed");
        let all = read_all(&b, t, "read_uncommitted");
        for i in 0..3 {
            for tag in ["c1", "c2"] {
                let v = format!("{tag}-{t}-{i}");
                assert!(
                    committed.contains(&v),
                    "{t}: {v} missing from {committed:?}"
                );
                assert!(all.contains(&v), "{t}: {v} missing from {all:?}");
            }
            let aborted = format!("a1-{t}-{i}");
            assert!(
                !committed.contains(&aborted),
                "{t}: aborted {aborted} read committed"
            );
            assert!(
                all.contains(&aborted),
                "{t}: {aborted} missing read_uncommitted"
            );
        }
        let plain = usize::from(t == "orders");
        assert_eq!(committed.len(), 6 + plain, "{t}: {committed:?}");
        assert_eq!(all.len(), 9 + plain, "{t}: {all:?}");
    }
    // The default is read_committed.
    let o = b.cli(&["consume", "orders"]);
    assert_ok(&o);
    assert!(!stdout(&o).contains("a1-"), "{}", stdout(&o));
    // Bad input: a clear error, and nothing of the transaction is seen.
    let o = b.cli_stdin(
        &["txn", "--id", "w3"],
        Some(b"orders\tbad-1\nno tab here\n"),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("line 2"), "{}", stderr(&o));
    assert!(!read_all(&b, "orders", "read_committed").contains(&"bad-1".to_owned()));
    // An unknown topic fails the transaction as a whole.
    let o = b.cli_stdin(
        &["txn", "--id", "w3"],
        Some(b"orders\tgood-1\nno-such-topic\tx\n"),
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(!read_all(&b, "orders", "read_committed").contains(&"good-1".to_owned()));
}

/// A transaction timeout past the broker's limit is refused when the id is
/// initialised, before any transaction began: the message says nothing
/// was written rather than that a transaction was aborted, with stdin
/// lines or with --consume.
#[test]
fn a_timeout_past_the_limit_is_refused_before_a_transaction_begins() {
    let b = Broker::start("");
    create_topics(&b);
    for args in [
        &[
            "txn",
            "--id",
            "long",
            "--transaction-timeout-ms",
            "999999999",
        ][..],
        &[
            "txn",
            "--id",
            "long",
            "--transaction-timeout-ms",
            "999999999",
            "--consume",
            "orders",
            "--group",
            "g",
            "--to",
            "alarms",
            "--timeout-ms",
            "100",
        ],
    ] {
        let o = b.cli_stdin(args, Some(b"orders\tv\n"));
        assert_fails(
            &o,
            1,
            &[
                "txn long: ",
                "transaction_timeout_ms must be 1..=900000",
                "refused before a transaction began: nothing was written",
            ],
        );
        assert!(!stderr(&o).contains("abort"), "{}", stderr(&o));
    }
    assert!(read_all(&b, "orders", "read_uncommitted").is_empty());
    assert!(read_all(&b, "alarms", "read_uncommitted").is_empty());
}

#[test]
fn a_killed_txn_is_aborted_after_its_timeout_and_readers_move_on() {
    let b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let metric = |name: &str| -> Vec<String> {
        http_get(&b.metrics_addr(), "/metrics")
            .lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_owned)
            .collect()
    };
    create_topics(&b);
    // Long enough for the checks while it is open (each a CLI run: seconds
    // apiece under an emulator), short enough to wait out.
    let timeout_ms: u64 = if emulated() { 30_000 } else { 5_000 };
    let mut cmd = skiff_command();
    cmd.args([
        "txn",
        "--id",
        "dies",
        "--transaction-timeout-ms",
        &timeout_ms.to_string(),
        "--broker",
        &b.tcp,
    ]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for t in TOPICS {
        writeln!(stdin, "{t}\topen-{t}").unwrap();
    }
    stdin.flush().unwrap();
    // Sent as read: the records are in the log before end of input.
    wait_until(
        Duration::from_secs(20),
        "the open transaction's records",
        || {
            TOPICS
                .iter()
                .all(|t| read_all(&b, t, "read_uncommitted").contains(&format!("open-{t}")))
        },
    );
    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    assert_ok(&b.cli(&["produce", "orders", "--partition", "0", "after-1"]));
    assert_ok(&b.cli(&["produce", "orders", "--partition", "1", "after-2"]));
    // The open transaction holds read_committed readers back...
    let early = read_all(&b, "orders", "read_committed");
    if killed.elapsed() < Duration::from_millis(timeout_ms * 4 / 5) {
        assert!(!early.contains(&"open-orders".to_owned()), "{early:?}");
    }
    // The metrics show it open, holding orders' readers back.
    wait_until(Duration::from_secs(60), "txn metrics while open", || {
        metric("skiff_txn_open ").iter().any(|l| l.ends_with(" 1"))
            && metric("skiff_txn_lso_lag_records{")
                .iter()
                .any(|l| l.contains("topic=\"orders\"") && !l.ends_with(" 0"))
    });
    // ...until the broker aborts it; then they read on, past it.
    wait_until(Duration::from_secs(120), "readers moving on", || {
        let r = read_all(&b, "orders", "read_committed");
        r.contains(&"after-1".to_owned()) && r.contains(&"after-2".to_owned())
    });
    assert!(killed.elapsed() >= Duration::from_millis(timeout_ms * 2 / 3));
    for t in TOPICS {
        let r = read_all(&b, t, "read_committed");
        assert!(!r.contains(&format!("open-{t}")), "{t}: {r:?}");
    }
    wait_until(
        Duration::from_secs(10),
        "txn metrics after the timeout",
        || {
            metric("skiff_txn_timeouts_total")
                .iter()
                .any(|l| l.ends_with(" 1"))
                && metric("skiff_txn_open ").iter().any(|l| l.ends_with(" 0"))
                && metric("skiff_txn_lso_lag_records{").is_empty()
        },
    );
    let o = b.cli(&["txn", "list", "--format", "json"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("complete_abort"), "{}", stdout(&o));
}

#[test]
fn kill_9_during_commit_is_all_or_nothing() {
    let rounds = if emulated() { 5 } else { 20 };
    let mut b = Broker::start("");
    create_topics(&b);
    let mut rng = Rng(0x5eed_1234);
    let mut committed_rounds = 0;
    for round in 0..rounds {
        let tag = format!("r{round}");
        let mut child = skiff_command()
            .args(["txn", "--id", "crash", "--broker", &b.tcp])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&txn_input(&tag)).unwrap();
        drop(stdin);
        // Somewhere in the transaction: its produce, its commit, or after.
        std::thread::sleep(rng.between_ms(0, 400));
        b.kill9();
        // An exit before the broker died is an answered commit; one still
        // running would retry against a broker that is gone: kill it too.
        let committed_before = match child.try_wait().unwrap() {
            Some(status) => status.success(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        };
        b.restart();
        // Recovery ends whatever the crash left open; until then the
        // transaction's partitions are held back for read_committed.
        wait_until(
            Duration::from_secs(30),
            "recovery to end the transaction",
            || {
                let o = b.cli(&["txn", "list", "--format", "json"]);
                o.status.success()
                    && !stdout(&o).contains("ongoing")
                    && !stdout(&o).contains("prepare_")
            },
        );
        let seen: Vec<usize> = TOPICS
            .iter()
            .map(|t| {
                read_all(&b, t, "read_committed")
                    .iter()
                    .filter(|v| v.starts_with(&format!("{tag}-")))
                    .count()
            })
            .collect();
        assert!(
            seen == [3, 3, 3] || seen == [0, 0, 0],
            "round {round}: committed in some partitions only: {seen:?}"
        );
        if committed_before {
            assert_eq!(seen, [3, 3, 3], "round {round}: `skiff txn` exited 0");
        }
        committed_rounds += usize::from(seen[0] == 3);
    }
    eprintln!("{committed_rounds} of {rounds} rounds committed");
}

/// `skiff txn --id ID`, its stdin a pipe left to the caller, its stderr
/// kept.
fn spawn_txn(b: &Broker, id: &str) -> (std::process::Child, std::process::ChildStdin) {
    let mut child = skiff_command()
        .args(["txn", "--id", id, "--broker", &b.tcp])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

/// A `skiff txn` whose record fails mid-way aborts its transaction at
/// once (not after the broker's timeout) and exits non-zero.
#[test]
fn a_txn_whose_record_fails_mid_way_aborts_at_once() {
    let b = Broker::start("");
    create_topics(&b);
    // A value larger than a batch (128 KiB by default) on line 2, and
    // stdin left open after it: the command ends on its own.
    let (mut child, mut stdin) = spawn_txn(&b, "too-big");
    writeln!(stdin, "orders\tbefore-big").unwrap();
    writeln!(stdin, "orders\t{}", "x".repeat(256 * 1024)).unwrap();
    writeln!(stdin, "orders\tafter-big").unwrap();
    stdin.flush().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        // The default transaction timeout is 60 s: well before it.
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "skiff txn still running with stdin open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    drop(stdin);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("line 2"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the transaction is aborted"),
        "{}",
        stderr(&o)
    );
    assert_eq!(txn_state(&b, "too-big"), "complete_abort");
    // An unknown topic mid-way: aborted too, nothing of it committed.
    let o = b.cli_stdin(
        &["txn", "--id", "unknown"],
        Some(b"orders\tu-1\nno-such-topic\tu-2\norders\tu-3\n"),
    );
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(
        stderr(&o),
        "skiff: txn unknown: line 2: server error unknown_topic: unknown topic 'no-such-topic'; \
         the transaction is aborted, no commit\n"
    );
    assert_eq!(txn_state(&b, "unknown"), "complete_abort");
    // Also as the first line, and as the last.
    for (id, input) in [
        ("unknown-first", &b"no-such-topic\tu-0\norders\tu-1\n"[..]),
        ("unknown-last", b"orders\tu-1\nno-such-topic\tu-2\n"),
    ] {
        let o = b.cli_stdin(&["txn", "--id", id], Some(input));
        let line = if id == "unknown-first" { 1 } else { 2 };
        assert!(
            stderr(&o).contains(&format!("line {line}: server error unknown_topic")),
            "{id}: {}",
            stderr(&o)
        );
    }
    let committed = read_all(&b, "orders", "read_committed");
    for v in ["before-big", "after-big", "u-1", "u-3"] {
        assert!(!committed.contains(&v.to_owned()), "{v} in {committed:?}");
    }
    // Nothing was left open: a plain record is readable at once.
    assert_ok(&b.cli(&["produce", "orders", "--partition", "0", "after"]));
    assert!(read_all(&b, "orders", "read_committed").contains(&"after".to_owned()));
}

/// A record the broker refuses after `skiff txn` has read on (a keyless
/// record on a compacted topic passes the client's checks) is named by
/// its own line, not as "a record before line N": the client knows which
/// line each record was.
#[test]
fn a_refusal_found_later_names_the_refused_line() {
    let b = Broker::start("");
    create_topics(&b);
    assert_ok(&b.cli(&["topics", "create", "state", "--cleanup", "compact"]));
    let (mut child, mut stdin) = spawn_txn(&b, "late");
    writeln!(stdin, "orders\tfirst").unwrap();
    writeln!(stdin, "state\tno-key").unwrap();
    // More lines, until the refusal is found at one of them: stdin stays
    // open, so it cannot be found at the commit instead.
    let started = Instant::now();
    let mut fed = 2;
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "skiff txn still running after {fed} lines"
        );
        // The pipe is closed once the command ended.
        if writeln!(stdin, "orders\tlater-{fed}").is_ok() {
            fed += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("skiff: txn late: line 2: server error invalid_record")
            && err.contains("(found on reading line ")
            && err.contains("the transaction is aborted, no commit"),
        "{err}"
    );
}

/// `skiff produce` of `values` to `topic`, one line each `pause` apart,
/// from a thread: input that keeps arriving while a test acts.
struct Trickle {
    producer: std::process::Child,
    writer: std::thread::JoinHandle<()>,
}

impl Trickle {
    fn start(b: &Broker, topic: &str, values: &[String], pause: Duration) -> Trickle {
        let mut producer = skiff_command()
            .args(["produce", topic, "--broker", &b.tcp])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = producer.stdin.take().unwrap();
        let lines = values.to_vec();
        let writer = std::thread::spawn(move || {
            for v in lines {
                writeln!(stdin, "{v}").unwrap();
                stdin.flush().unwrap();
                std::thread::sleep(pause);
            }
        });
        Trickle { producer, writer }
    }

    /// Waits until every value is written and acknowledged.
    fn finish(mut self) {
        self.writer.join().unwrap();
        assert!(
            self.producer.wait().unwrap().success(),
            "skiff produce failed"
        );
    }
}

/// `skiff txn --consume`: a group member copies `ctp-in` to `ctp-out`,
/// each poll in one transaction with the group's offsets, and is killed
/// with SIGKILL at random points while input keeps arriving. At the end
/// every input record is in the output exactly once (read_committed) and
/// the group's committed offsets are at the input's end.
#[test]
fn consume_transform_produce_is_exactly_once_across_kill_9s() {
    let (rounds, per_round, kill_max_ms) = if emulated() {
        (4, 40, 4_000)
    } else {
        (8, 60, 800)
    };
    let b = Broker::start("");
    for t in ["ctp-in", "ctp-out"] {
        assert_ok(&b.cli(&[
            "topics",
            "create",
            t,
            "--partitions",
            "2",
            "--segment-bytes",
            "1048576",
            "--segments",
            "4",
        ]));
    }
    let pipe = |extra: &[&str]| {
        let mut cmd = skiff_command();
        cmd.args([
            "txn",
            "--id",
            "ctp",
            "--consume",
            "ctp-in",
            "--group",
            "ctp",
            "--to",
            "ctp-out",
            "--from",
            "earliest",
            "--broker",
            &b.tcp,
        ])
        .args(extra);
        cmd
    };
    // A `skiff txn --consume --timeout-ms` run has no end while its member
    // is not in the group (idle time counts only once it is), and the runs
    // to the end are awaited with no bound: a broker that never lets one
    // in ends the test saying which step hung, with the processes' state,
    // instead of holding it until the runner's timeout.
    let watchdog = watchdog::Watchdog::start(
        "consume-transform-produce",
        Duration::from_secs(if emulated() { 600 } else { 300 }),
    );
    let mut rng = Rng(0xc7e_5eed);
    let mut produced = Vec::new();
    for round in 0..rounds {
        watchdog.step(format!(
            "round {round}: `skiff txn --consume` killed at a random point"
        ));
        let mut child = pipe(&[])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Input trickles in while it runs, so it copies in many small
        // transactions and the kill lands in any of their steps.
        let values: Vec<String> = (0..per_round).map(|i| format!("in-{round}-{i}")).collect();
        let input = Trickle::start(&b, "ctp-in", &values, Duration::from_millis(5));
        produced.extend(values);
        std::thread::sleep(rng.between_ms(0, kill_max_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        input.finish();
    }
    // Runs to the end of the input: until the group has nothing left.
    let idle_ms = if emulated() { "5000" } else { "1000" };
    // The group's offsets on the input, as `groups describe` shows them.
    let describe = || {
        let o = b.cli(&["groups", "describe", "ctp", "--format", "json"]);
        assert_ok(&o);
        stdout(&o)
    };
    let lag_zero = |described: &str| {
        let d: serde_json::Value = serde_json::from_str(described).unwrap();
        let offsets = d["offsets"].as_array().cloned().unwrap_or_default();
        let input: Vec<_> = offsets.iter().filter(|o| o["topic"] == "ctp-in").collect();
        input.len() == 2
            && input.iter().all(|o| {
                // Each round's producer starts on a random partition, and
                // under emulation it may put a round in one batch: a
                // partition the input never reached has nothing to commit.
                let untouched = o["log_end"].as_u64() == Some(0) && o["committed"].is_null();
                untouched || (o["committed"].as_u64().is_some() && o["committed"] == o["log_end"])
            })
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    for run in 1.. {
        watchdog.step(format!(
            "run {run} of `skiff txn --consume --timeout-ms {idle_ms}` to the input's end"
        ));
        let o = pipe(&["--timeout-ms", idle_ms]).output().unwrap();
        assert_ok(&o);
        let described = describe();
        if lag_zero(&described) {
            break;
        }
        let log = b.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        assert!(
            Instant::now() < deadline,
            "the group is not at the input's end after 300 s; the last run said:\n{}\n\
             the group:\n{described}\nthe broker's last lines (newest first):\n{}",
            stderr(&o),
            tail.join("\n")
        );
    }
    watchdog.step("reading ctp-out");
    let mut out = read_all(&b, "ctp-out", "read_committed");
    drop(watchdog);
    out.sort();
    produced.sort();
    assert_eq!(out, produced, "not exactly once");
    // What the killed runs left uncommitted (aborted copies).
    let all = read_all(&b, "ctp-out", "read_uncommitted").len();
    eprintln!("{} records, {} aborted copies", out.len(), all - out.len());
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A stdin line whose topic no topic can have is refused with its line
/// number, as a line without a TAB is, not asked of the broker (which
/// would answer unknown_topic); nothing of the transaction is committed.
#[test]
fn a_txn_line_naming_an_invalid_topic_is_refused_with_its_number() {
    let b = Broker::start("");
    create_topics(&b);
    for bad in ["..", "a b", ""] {
        let input = format!("orders\tgood\n{bad}\tv\norders\tafter\n");
        let o = b.cli_stdin(&["txn", "--id", "bad-name"], Some(input.as_bytes()));
        assert_eq!(
            (o.status.code(), stderr(&o).as_str()),
            (
                Some(2),
                format!(
                    "skiff: txn bad-name: line 2: invalid topic name '{bad}': use 1 to 249 of \
                     A-Z a-z 0-9 . _ -; the transaction is aborted, no commit\n"
                )
                .as_str()
            ),
        );
    }
    assert!(read_all(&b, "orders", "read_committed").is_empty());
}

/// `skiff txn` reads its lines as `skiff produce` does (docs/operations.md):
/// without the `\n` or `\r\n` that ends them, so CRLF input writes the
/// same values; a `\r` elsewhere, or ending a last line without a
/// newline, is the value's.
#[test]
fn txn_drops_a_lines_crlf_as_produce_does() {
    let b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "crlf", "--partitions", "1"]));
    assert_ok(&b.cli_stdin(
        &["txn", "--id", "crlf"],
        Some(b"crlf\ta\r\ncrlf\tb\rc\r\ncrlf\t\r\ncrlf\td\ncrlf\te\r"),
    ));
    let o = b.cli(&["consume", "crlf"]);
    assert_ok(&o);
    assert_eq!(o.stdout, b"a\nb\rc\n\nd\ne\r\n");
}

/// `transactions.max_open` bounds the transactions open at once over all
/// ids (what the memory budget counts partitions by): another id's
/// transaction is refused with the retriable `concurrent_transactions`,
/// so its producer backs off and retries, and it commits once the open
/// one ends.
#[test]
fn a_transaction_past_max_open_waits_until_the_open_one_ends() {
    let b = Broker::start("[transactions]\nmax_open = 1\n");
    create_topics(&b);
    let (mut first, mut stdin) = spawn_txn(&b, "first");
    writeln!(stdin, "orders\tfirst").unwrap();
    stdin.flush().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the open transaction's record",
        || read_all(&b, "orders", "read_uncommitted").contains(&"first".to_owned()),
    );
    let (mut second, mut second_in) = spawn_txn(&b, "second");
    writeln!(second_in, "orders\tsecond").unwrap();
    drop(second_in);
    // A refusal it may not retry would end it now.
    std::thread::sleep(Duration::from_secs(2));
    assert!(second.try_wait().unwrap().is_none(), "second gave up");
    assert!(!read_all(&b, "orders", "read_uncommitted").contains(&"second".to_owned()));
    drop(stdin);
    assert!(first.wait().unwrap().success(), "the first commits");
    let out = second.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut read = read_all(&b, "orders", "read_committed");
    read.sort();
    assert_eq!(read, ["first", "second"], "the first's end freed its slot");
}

/// The transactional ids `skiff txn list` shows.
fn listed_ids(b: &Broker) -> Vec<String> {
    txn_list(b)
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_owned))
        .collect()
}

/// An id unused past `transactions.id_expiration_ms` is forgotten and its
/// slot of `max_transactional_ids` freed; its idle time counts from its
/// last record, and its tombstone keeps it forgotten across a restart.
#[test]
fn an_unused_transactional_id_expires_frees_its_slot_and_stays_expired_after_restart() {
    const KEEP: &str = "[transactions]\nmax_transactional_ids = 1\nmax_open = 1\n";
    let mut b = Broker::start(KEEP);
    create_topics(&b);
    assert_ok(&b.cli_stdin(&["txn", "--id", "a"], Some(b"orders\tfrom-a\n")));
    let o = b.cli_stdin(&["txn", "--id", "b"], Some(b"orders\tfrom-b\n"));
    assert_fails(&o, 1, &["txn b: ", "transactions.max_transactional_ids"]);
    assert_eq!(b.stop(), Some(0));
    b.set_extra(&format!("{KEEP}id_expiration_ms = 1000\n"));
    b.restart();
    wait_until(Duration::from_secs(60), "a expiring", || {
        !listed_ids(&b).contains(&"a".to_owned())
    });
    assert_ok(&b.cli_stdin(&["txn", "--id", "b"], Some(b"orders\tfrom-b\n")));
    // Back to a day: b is kept, a stays forgotten.
    assert_eq!(b.stop(), Some(0));
    b.set_extra(KEEP);
    b.restart();
    assert_eq!(listed_ids(&b), ["b"]);
    assert_ok(&b.cli_stdin(&["txn", "--id", "b"], Some(b"orders\tb-again\n")));
    let mut read = read_all(&b, "orders", "read_committed");
    read.sort();
    assert_eq!(read, ["b-again", "from-a", "from-b"]);
}

/// An instance that outlived its expired id is fenced (its records are
/// never written outside a transaction), and a new init of the id works
/// with a new producer id.
#[test]
fn a_producer_of_an_expired_id_is_fenced_and_a_new_init_works() {
    use skiff::client::{Client, ClientError, ProducerConfig, TxnProducer};
    use skiff::protocol::ErrorCode;
    let b = Broker::start(
        "[transactions]\nid_expiration_ms = 1000\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    create_topics(&b);
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.unwrap();
        let timeout = Duration::from_secs(60);
        let config = || ProducerConfig::default();
        let mut old = TxnProducer::new(client.clone(), "x", timeout, config())
            .await
            .unwrap();
        old.send("orders", None, b"one", &[]);
        old.commit().await.unwrap();
        wait_until(Duration::from_secs(60), "x expiring", || {
            !listed_ids(&b).contains(&"x".to_owned())
        });
        let metrics = http_get(&b.metrics_addr(), "/metrics");
        assert!(
            metrics.contains("skiff_txn_id_expirations_total 1"),
            "{metrics}"
        );
        old.send("orders", None, b"stale", &[]);
        let e = old.commit().await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Server {
                    code: ErrorCode::FencedProducer,
                    ..
                }
            ),
            "{e:?}"
        );
        let mut new = TxnProducer::new(client, "x", timeout, config())
            .await
            .unwrap();
        // The expired id's producer left the registry: a new one.
        assert_ne!(new.producer_id().0, old.producer_id().0);
        new.send("orders", None, b"two", &[]);
        new.commit().await.unwrap();
    });
    let mut read = read_all(&b, "orders", "read_committed");
    read.sort();
    assert_eq!(read, ["one", "two"]);
    assert!(!read_all(&b, "orders", "read_uncommitted").contains(&"stale".to_owned()));
}

/// An id whose transaction is open is never expired, however long past
/// `id_expiration_ms`; once it ends, the id expires like any other.
#[test]
fn an_id_with_an_open_transaction_does_not_expire() {
    let b = Broker::start("[transactions]\nid_expiration_ms = 1000\n");
    create_topics(&b);
    let (child, mut stdin) = spawn_txn(&b, "slow");
    writeln!(stdin, "orders\tslow-1").unwrap();
    stdin.flush().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the open transaction's record",
        || read_all(&b, "orders", "read_uncommitted").contains(&"slow-1".to_owned()),
    );
    // Open, the coordinator looks every 100 ms: many looks past the expiry.
    std::thread::sleep(Duration::from_secs(3));
    let o = b.cli(&["txn", "list", "--format", "json"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("\"slow\"") && stdout(&o).contains("ongoing"),
        "{}",
        stdout(&o)
    );
    writeln!(stdin, "orders\tslow-2").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two batches without keys: perhaps two partitions, read in any order.
    let mut committed = read_all(&b, "orders", "read_committed");
    committed.sort();
    assert_eq!(committed, ["slow-1", "slow-2"]);
    wait_until(Duration::from_secs(60), "slow expiring once ended", || {
        listed_ids(&b).is_empty()
    });
}

/// A transaction open at a restart (a clean stop, or kill -9) that holds a
/// group's offsets, alone, after a committed one, or with records, is
/// aborted and its producer fenced: the instance's commit after the
/// restart is refused (`fenced_producer`), never answered OK with the
/// offsets dropped. A new instance of the id commits them.
#[test]
fn a_commit_after_a_restart_of_offsets_added_before_it_is_fenced_not_ok() {
    use skiff::client::{Client, ProducerConfig, TxnProducer};
    use skiff::protocol::ErrorCode;
    let mut b = Broker::start("");
    create_topics(&b);
    let timeout = Duration::from_secs(60);
    let mut answered = Vec::new();
    for crash in [false, true] {
        let cases = [
            ("offsets", false, false),
            ("after-commit", false, true),
            ("records", true, false),
        ];
        let open: Vec<(String, (u64, u16))> = smol::block_on(async {
            let client = Client::connect(&b.tcp).await.unwrap();
            let mut open = Vec::new();
            for (case, records, committed_before) in cases {
                let id = format!("{case}-{}", if crash { "kill" } else { "stop" });
                let mut p =
                    TxnProducer::new(client.clone(), &id, timeout, ProducerConfig::default())
                        .await
                        .unwrap();
                if committed_before {
                    let before = format!("{id}-before");
                    p.send("orders", None, before.as_bytes(), &[]);
                    p.commit().await.unwrap();
                }
                if records {
                    p.send("orders", None, id.as_bytes(), &[]);
                    wait_until(
                        Duration::from_secs(20),
                        "the open transaction's record",
                        || read_all(&b, "orders", "read_uncommitted").contains(&id),
                    );
                }
                p.send_offsets(&id, &[("orders", 0, 7)]).await.unwrap();
                open.push((id, p.producer_id()));
            }
            open
        });
        if crash {
            b.kill9();
        } else {
            assert_eq!(b.stop(), Some(0));
        }
        b.restart();
        smol::block_on(async {
            let client = Client::connect(&b.tcp).await.unwrap();
            for (id, producer) in &open {
                let r = client.end_txn(id, *producer, true).await;
                let committed = client.fetch_offsets(id, None).await.unwrap();
                assert!(committed.is_empty(), "{id}: {committed:?}");
                match r {
                    Err(e) if e.code() == Some(ErrorCode::FencedProducer) => {}
                    r => answered.push(format!("{id}: {r:?}")),
                }
                // What the client does once fenced: a new instance, the
                // input read again from the committed offsets.
                let mut p =
                    TxnProducer::new(client.clone(), id, timeout, ProducerConfig::default())
                        .await
                        .unwrap();
                p.send_offsets(id, &[("orders", 0, 7)]).await.unwrap();
                p.commit().await.unwrap();
                let committed = client.fetch_offsets(id, None).await.unwrap();
                assert_eq!(
                    committed.iter().map(|c| c.offset).collect::<Vec<_>>(),
                    [7],
                    "{id}"
                );
            }
        });
    }
    assert!(
        answered.is_empty(),
        "commits after the restart not fenced: {answered:?}"
    );
    let committed = read_all(&b, "orders", "read_committed");
    assert!(!committed.iter().any(|r| r.starts_with("records-")));
}

/// A transaction that sent nothing ends without asking the broker, which
/// refuses an end with none open (`invalid_txn_state`, as Kafka's
/// coordinator does, whose client sends no end then): its commit and
/// abort answer OK, and so does `skiff txn` on empty input.
#[test]
fn ending_a_transaction_that_sent_nothing_asks_the_broker_nothing() {
    use skiff::client::{Client, ProducerConfig, TxnProducer};
    use skiff::protocol::ErrorCode;
    let b = Broker::start("");
    create_topics(&b);
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.unwrap();
        let timeout = Duration::from_secs(60);
        let mut p = TxnProducer::new(client.clone(), "idle", timeout, ProducerConfig::default())
            .await
            .unwrap();
        p.commit().await.unwrap();
        p.abort().await.unwrap();
        let e = client
            .end_txn("idle", p.producer_id(), true)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidTxnState), "{e:?}");
        p.send("orders", None, b"one", &[]);
        p.commit().await.unwrap();
        // Nothing sent since the commit: neither end is sent.
        p.abort().await.unwrap();
        p.commit().await.unwrap();
    });
    assert_eq!(txn_state(&b, "idle"), "complete_commit");
    assert_eq!(read_all(&b, "orders", "read_committed"), ["one"]);
    for args in [
        &["txn", "--id", "empty"][..],
        &["txn", "--id", "empty", "--abort"],
    ] {
        let o = b.cli_stdin(args, Some(b""));
        assert_ok(&o);
    }
    assert_eq!(txn_state(&b, "empty"), "empty");
}

/// How long a `skiff txn --consume` may take to act on a signal before a
/// test calls it hung.
fn signal_wait() -> Duration {
    Duration::from_secs(if emulated() { 240 } else { 30 })
}

/// `skiff txn --id st --consume st-in --group st --to st-out`.
fn pipe_command(b: &Broker, extra: &[&str]) -> std::process::Command {
    let mut cmd = skiff_command();
    cmd.args(["txn", "--id", "st", "--consume", "st-in", "--group", "st"])
        .args(["--to", "st-out", "--from", "earliest", "--broker", &b.tcp])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// [`pipe_command`] started, and the file its stderr goes to.
fn start_pipe(b: &Broker) -> (std::process::Child, std::path::PathBuf) {
    let err = b.dir.path().join("pipe.stderr");
    let child = pipe_command(b, &[])
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    (child, err)
}

/// The exit status of `child`; kills it and panics with `what` if it has
/// not exited within [`signal_wait`].
fn exit_code(mut child: std::process::Child, what: impl Fn() -> String) -> Option<i32> {
    let deadline = Instant::now() + signal_wait();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}", what());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM stops `skiff txn --consume` at a clean point while input
/// arrives: exit 0, no transaction left open, and the next run copies the
/// rest, so OUT holds every input record once and G's offsets are at
/// IN's end. Before, it had no handler: the signal killed it.
#[test]
fn sigterm_stops_consume_transform_produce_between_transactions() {
    let b = Broker::start("");
    for t in ["st-in", "st-out"] {
        assert_ok(&b.cli(&["topics", "create", t, "--partitions", "2"]));
    }
    let (child, err) = start_pipe(&b);
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    let pid = child.id() as i32;
    // Input keeps arriving across the signal, so it may land mid-copy.
    let produced: Vec<String> = (0..300).map(|i| format!("in-{i}")).collect();
    let input = Trickle::start(&b, "st-in", &produced, Duration::from_millis(2));
    wait_until(signal_wait(), "the first records copied", || {
        !read_all(&b, "st-out", "read_committed").is_empty()
    });
    sigterm_taken(pid, &err, signal_wait());
    let code = exit_code(child, || format!("SIGTERM did not stop it: {}", read()));
    assert_eq!(code, Some(0), "{}", read());
    assert!(
        read().contains("record(s) copied from st-in to st-out (stopped)"),
        "{}",
        read()
    );
    input.finish();
    // No transaction left open for the broker's timeout to end.
    assert_ne!(txn_state(&b, "st"), "ongoing", "{:?}", txn_list(&b));
    let o = pipe_command(&b, &["--timeout-ms", "1000"])
        .output()
        .unwrap();
    assert_ok(&o);
    let mut out = read_all(&b, "st-out", "read_committed");
    out.sort();
    let mut want = produced;
    want.sort();
    assert_eq!(out, want, "not exactly once");
    let o = b.cli(&["groups", "describe", "st", "--format", "json"]);
    assert_ok(&o);
    let d: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    for p in d["offsets"].as_array().unwrap() {
        if p["topic"] == "st-in" {
            assert_eq!(p["committed"], p["log_end"], "{d}");
        }
    }
}

/// A second SIGTERM while `skiff txn --consume` waits on a broker that
/// does not answer (here, before its transactional id is initialised)
/// ends it at once with 130.
#[test]
fn a_second_sigterm_ends_a_waiting_consume_transform_produce_at_once() {
    let b = Broker::start("");
    for t in ["st-in", "st-out"] {
        assert_ok(&b.cli(&["topics", "create", t]));
    }
    b.pause();
    let (child, err) = start_pipe(&b);
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    let pid = child.id() as i32;
    // Its handlers are in place before it connects: a socket says so.
    wait_until(signal_wait(), "the run to connect", || {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
        })
    });
    sigterm_taken(pid, &err, signal_wait());
    // SAFETY: a signal to the run this test spawned, not yet reaped (it
    // waits on the broker).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = exit_code(child, || {
        format!("the second SIGTERM did not end it: {}", read())
    });
    b.resume();
    assert_eq!(code, Some(130), "{}", read());
}

/// A second `skiff txn --consume` member takes a partition from the
/// first. The group's offsets are committed only inside transactions, so
/// the first must not commit on giving the partition up: for a partition
/// the group had no offset for when it got it, that commit was its start
/// position, which rewound the group and had the second member copy again
/// everything the first had copied.
#[test]
fn a_partition_moving_between_consume_transform_produce_members_is_copied_once() {
    let b = Broker::start("");
    for t in ["mv-in", "mv-out"] {
        assert_ok(&b.cli(&["topics", "create", t, "--partitions", "2"]));
    }
    let mut want = Vec::new();
    let produce = |want: &mut Vec<String>, round: &str| {
        for p in ["0", "1"] {
            let values: Vec<String> = (0..50).map(|i| format!("{round}-p{p}-{i}")).collect();
            let o = b.cli_stdin(
                &["produce", "mv-in", "--partition", p],
                Some(format!("{}\n", values.join("\n")).as_bytes()),
            );
            assert_ok(&o);
            want.extend(values);
        }
    };
    let member = |id: &str| {
        let err = b.dir.path().join(format!("{id}.stderr"));
        let child = skiff_command()
            .args(["txn", "--id", id, "--consume", "mv-in", "--group", "mv"])
            .args(["--to", "mv-out", "--from", "earliest", "--broker", &b.tcp])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        (child, err)
    };
    let copied = |n: usize| {
        wait_until(signal_wait(), &format!("{n} records copied"), || {
            read_all(&b, "mv-out", "read_committed").len() >= n
        })
    };
    produce(&mut want, "first");
    let (a, a_err) = member("a");
    copied(100);
    let (second, second_err) = member("b");
    // Each member holds one partition once the move is done.
    wait_until(signal_wait(), "the partition moved", || {
        let o = b.cli(&["groups", "describe", "mv", "--format", "json"]);
        let d: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap_or_default();
        let held = |m: &serde_json::Value| m["assignment"].as_array().map_or(0, Vec::len);
        d["members"]
            .as_array()
            .is_some_and(|ms| ms.len() == 2 && ms.iter().all(|m| held(m) == 1))
    });
    produce(&mut want, "second");
    copied(200);
    for (child, err) in [(a, a_err), (second, second_err)] {
        sigterm_taken(child.id() as i32, &err, signal_wait());
        let read = || std::fs::read_to_string(&err).unwrap_or_default();
        assert_eq!(exit_code(child, read), Some(0), "{}", read());
    }
    let mut out = read_all(&b, "mv-out", "read_committed");
    out.sort();
    want.sort();
    assert_eq!(out, want, "not exactly once");
}

/// A topic deleted and created again by its name after a transaction
/// aborted there: the same transactional id (same producer id) commits
/// into the new topic from offset 0, and read_committed readers see it,
/// also after a restart (the delete dropped the old topic's aborted
/// ranges durably).
#[test]
fn a_topic_created_again_shows_a_commit_where_the_old_one_had_an_abort() {
    let mut b = Broker::start("");
    let create = |b: &Broker| assert_ok(&b.cli(&["topics", "create", "t", "--partitions", "1"]));
    create(&b);
    assert_ok(&b.cli_stdin(&["txn", "--id", "w", "--abort"], Some(b"t\taborted\n")));
    assert_ok(&b.cli(&["topics", "delete", "t"]));
    create(&b);
    assert_ok(&b.cli_stdin(&["txn", "--id", "w"], Some(b"t\tcommitted\n")));
    assert_eq!(read_all(&b, "t", "read_committed"), ["committed"]);
    assert_eq!(b.stop(), Some(0));
    b.restart();
    assert_eq!(read_all(&b, "t", "read_committed"), ["committed"]);
}
