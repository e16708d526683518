//! Share groups (queues) and dead-letter topics through the real binary:
//! `skiff consume --share-group --exec` workers, `skiff dlq list|replay`,
//! lock expiry after a kill -9, and a broker restart with records in
//! flight (docs/queues.md).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_fails, assert_ok, emulated, sigterm_taken, skiff_command, stdout, wait_until, Broker,
    RawConn,
};
use skiff::client::{Client, Outcome, ShareConfig, ShareConsumer};
use skiff::protocol::{ErrorCode, RequestBody, ShareFetchRequest};

// Workers exec a script per record: under an emulator on a loaded machine,
// 120 of them took more than 30 s.
const WAIT: Duration = Duration::from_secs(90);

fn create(b: &Broker, topic: &str, partitions: u32) {
    assert_ok(&b.cli(&[
        "topics",
        "create",
        topic,
        "--partitions",
        &partitions.to_string(),
    ]));
}

fn produce(b: &Broker, topic: &str, values: &[String]) {
    let lines = values.join("\n") + "\n";
    assert_ok(&b.cli_stdin(&["produce", topic, "--key", "k1"], Some(lines.as_bytes())));
}

/// A `skiff consume --share-group --exec` worker running `script`.
fn worker(b: &Broker, topic: &str, group: &str, script: &str, extra: &[&str]) -> Child {
    skiff_command()
        .args(["consume", topic, "--share-group", group, "--exec", script])
        .args(["--from", "earliest"])
        .args(extra)
        .args(["--broker", &b.tcp])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning skiff consume --share-group")
}

fn wait_exit(mut c: Child) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = c.try_wait().expect("wait") {
            assert!(s.success(), "worker exited with {s}");
            return;
        }
        assert!(Instant::now() < deadline, "the worker did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines a worker script appended to `file`.
fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn dlq_list(b: &Broker, topic: &str) -> Vec<serde_json::Value> {
    let o = b.cli(&["dlq", "list", topic, "--format", "json"]);
    assert_ok(&o);
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn header(r: &serde_json::Value, name: &str) -> String {
    r["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["value"].as_str())
        .unwrap_or_else(|| panic!("no header {name} in {r}"))
        .to_owned()
}

/// A share consumer's config that starts a new group at the earliest
/// offset: `max_records` per fetch, waiting up to `wait_ms`.
fn from_earliest(max_records: u32, wait_ms: u64) -> ShareConfig {
    ShareConfig {
        max_records,
        max_wait: Duration::from_millis(wait_ms),
        from_earliest: true,
        ..ShareConfig::default()
    }
}

#[test]
fn failing_records_reach_the_dlq_after_max_deliveries_while_the_rest_flow() {
    let b = Broker::start(
        "[share]\nmax_deliveries = 3\nlock_ms = 5000\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    create(&b, "orders", 2);
    let values: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
    produce(&b, "orders", &values);
    let log = b.dir.path().join("handled");
    // v3 and v7 ask to be retried every time (75); v11 is rejected (2).
    let script = format!(
        r#"v=$(cat); echo "$SKIFF_TOPIC $SKIFF_PARTITION $SKIFF_OFFSET $SKIFF_KEY $SKIFF_DELIVERY_COUNT $v" >> {}; case $v in v3|v7) exit 75;; v11) exit 2;; esac"#,
        log.display()
    );
    wait_exit(worker(
        &b,
        "orders",
        "billing",
        &script,
        &["--timeout-ms", "1500"],
    ));

    let mut deliveries: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for l in lines(&log) {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!((f[0], f[3]), ("orders", "k1"), "{l}");
        deliveries
            .entry(f[5].to_owned())
            .or_default()
            .push(f[4].parse().expect("a delivery count"));
    }
    for v in &values {
        let want: &[u32] = match v.as_str() {
            "v3" | "v7" => &[1, 2, 3],
            _ => &[1],
        };
        assert_eq!(deliveries.get(v).map(Vec::as_slice), Some(want), "{v}");
    }

    let dead = dlq_list(&b, "orders");
    let by_value: BTreeMap<String, &serde_json::Value> = dead
        .iter()
        .map(|r| (r["value"].as_str().expect("text").to_owned(), r))
        .collect();
    assert_eq!(
        by_value.keys().cloned().collect::<Vec<_>>(),
        ["v11", "v3", "v7"],
        "{dead:?}"
    );
    for (v, count, error) in [
        (
            "v3",
            "3",
            "max_deliveries (3) reached: the command exited with status 75",
        ),
        ("v11", "1", "the command exited with status 2"),
    ] {
        let r = by_value[v];
        assert_eq!(header(r, "skiff.dlq.topic"), "orders");
        assert_eq!(header(r, "skiff.dlq.delivery_count"), count, "{v}");
        assert_eq!(header(r, "skiff.dlq.error"), error, "{v}");
        assert_eq!(r["key"], "k1");
        // Where it came from, as decimal text.
        let p: u32 = header(r, "skiff.dlq.partition").parse().expect("decimal");
        let o: u64 = header(r, "skiff.dlq.offset").parse().expect("decimal");
        let line = lines(&log)
            .into_iter()
            .find(|l| l.ends_with(&format!(" {v}")))
            .expect("handled");
        assert!(line.starts_with(&format!("orders {p} {o} ")), "{line}");
        assert_eq!(r["dlq"]["offset"], o);
    }
    // The text listing names the same records.
    let o = b.cli(&["dlq", "list", "orders"]);
    assert_ok(&o);
    assert_eq!(stdout(&o).lines().count(), 4, "{}", stdout(&o));

    // v3 and v7 came back twice each; three records dead; none in flight.
    wait_until(WAIT, "the share metrics", || {
        let m = http_get(&b.metrics_addr(), "/metrics");
        [
            "skiff_dlq_records{topic=\"orders.dlq\"} 3",
            "skiff_share_redeliveries_total 4",
            "skiff_share_dead_lettered_records_total 3",
            "skiff_share_records_in_flight{group=\"billing\",topic=\"orders\"} 0",
        ]
        .iter()
        .all(|want| m.lines().any(|l| l == *want))
    });
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
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

#[test]
fn two_workers_sharing_one_partition_get_distinct_records() {
    let b = Broker::start("");
    create(&b, "jobs", 1);
    let values: Vec<String> = (0..120).map(|i| format!("job{i}")).collect();
    produce(&b, "jobs", &values);
    let logs = [b.dir.path().join("w1"), b.dir.path().join("w2")];
    let workers: Vec<Child> = logs
        .iter()
        .map(|log| {
            let script = format!(
                "cat >> {}; echo >> {}; sleep 0.02",
                log.display(),
                log.display()
            );
            worker(&b, "jobs", "pool", &script, &["--timeout-ms", "1500"])
        })
        .collect();
    for w in workers {
        wait_exit(w);
    }
    let got: Vec<Vec<String>> = logs.iter().map(|l| lines(l)).collect();
    let sets: Vec<BTreeSet<&String>> = got.iter().map(|g| g.iter().collect()).collect();
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "both workers got records: {} and {}",
        got[0].len(),
        got[1].len()
    );
    assert_eq!(
        got[0].len() + got[1].len(),
        values.len(),
        "each record once"
    );
    assert!(sets[0].is_disjoint(&sets[1]));
    let all: BTreeSet<&String> = sets[0].union(&sets[1]).copied().collect();
    assert_eq!(all, values.iter().collect());
}

#[test]
fn a_killed_workers_locked_record_returns_after_lock_ms() {
    let b = Broker::start("[share]\nlock_ms = 1500\n");
    create(&b, "tasks", 1);
    produce(&b, "tasks", &["first".to_owned(), "second".to_owned()]);
    let started = b.dir.path().join("started");
    // Takes the first record and hangs on it.
    let script = format!(
        "echo $SKIFF_OFFSET > {}; exec sleep 60 >/dev/null 2>&1",
        started.display()
    );
    let spawned = Instant::now();
    let mut stuck = worker(&b, "tasks", "t", &script, &[]);
    wait_until(WAIT, "the first worker has a record", || {
        !lines(&started).is_empty()
    });
    stuck.kill().expect("kill -9");
    let _ = stuck.wait();

    let log = b.dir.path().join("done");
    let script = format!(
        r#"v=$(cat); echo "$SKIFF_OFFSET $SKIFF_DELIVERY_COUNT $v" >> {}"#,
        log.display()
    );
    let w = worker(&b, "tasks", "t", &script, &[]);
    wait_until(WAIT, "both records are handled", || lines(&log).len() >= 2);
    let returned = spawned.elapsed();
    let mut w = w;
    let _ = w.kill();
    let _ = w.wait();
    let got = lines(&log);
    assert!(got.contains(&"0 2 first".to_owned()), "{got:?}");
    assert!(got.contains(&"1 1 second".to_owned()), "{got:?}");
    assert_eq!(got.len(), 2, "{got:?}");
    // Not before its lock expired: 1.5 s after it was taken, which was
    // after the first worker started.
    assert!(returned >= Duration::from_millis(1500), "{returned:?}");
}

/// SIGTERM stops a worker's command (what the shell started too) and
/// gives its record back at once: the next worker has it well before
/// lock_ms, and nothing of the stopped command runs on.
#[test]
fn a_worker_stopped_by_sigterm_stops_its_command_and_releases_the_record() {
    let b = Broker::start("[share]\nlock_ms = 60000\n");
    create(&b, "tasks", 1);
    produce(&b, "tasks", &["only".to_owned()]);
    let pid_file = b.dir.path().join("sleep.pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pid_file.display());
    let stuck = worker(&b, "tasks", "t", &script, &[]);
    wait_until(WAIT, "the command has started", || {
        !lines(&pid_file).is_empty()
    });
    let sleep_pid: i32 = lines(&pid_file)[0].parse().expect("a pid");
    let stopped = Instant::now();
    // SAFETY: a signal to the worker this test spawned.
    unsafe { libc::kill(stuck.id() as i32, libc::SIGTERM) };
    wait_exit(stuck);
    // SAFETY: signal 0 sends nothing; it asks whether the process exists.
    let gone = || unsafe { libc::kill(sleep_pid, 0) } != 0;
    wait_until(WAIT, "the command's own child is gone", gone);

    let log = b.dir.path().join("done");
    let script = format!(
        r#"v=$(cat); echo "$SKIFF_DELIVERY_COUNT $v" >> {}"#,
        log.display()
    );
    let mut w = worker(&b, "tasks", "t", &script, &[]);
    wait_until(WAIT, "the record is handled again", || {
        !lines(&log).is_empty()
    });
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(lines(&log), ["2 only"]);
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "{:?}",
        stopped.elapsed()
    );
}

/// A worker that closes leaves its share group: another worker gets its
/// records at once (lock_ms is an hour here, and the wait below far
/// shorter), each delivered once more, as after a release; describe lists
/// it no more, and the group may be deleted.
#[test]
fn a_closed_workers_records_go_to_another_at_once_and_the_group_can_be_deleted() {
    let b = Broker::start("[share]\nlock_ms = 3600000\n");
    create(&b, "jobs", 2);
    let values: Vec<String> = (0..6).map(|i| format!("j{i}")).collect();
    produce(&b, "jobs", &values);
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let first = ShareConsumer::new(client.clone(), "g", "jobs", from_earliest(6, 200));
        let held = take(&first, values.len()).await;
        assert!(held.iter().all(|r| r.delivery_count == 1), "{held:?}");
        let d = client.describe_share_group("g").await.expect("describe");
        assert_eq!(d.members.len(), 1, "{d:?}");
        assert_eq!(first.close().await.expect("close"), Some(6));

        let d = client.describe_share_group("g").await.expect("describe");
        assert!(d.members.is_empty(), "{d:?}");
        let available: u64 = d.partitions.iter().map(|p| p.available).sum();
        assert_eq!(available, 6, "{d:?}");
        let second = ShareConsumer::new(client.clone(), "g", "jobs", from_earliest(6, 200));
        let mut again = take(&second, values.len()).await;
        assert!(again.iter().all(|r| r.delivery_count == 2), "{again:?}");
        let key = |r: &skiff::protocol::ShareRecord| (r.partition, r.offset);
        let mut held = held;
        held.sort_by_key(key);
        again.sort_by_key(key);
        assert_eq!(
            held.iter().map(key).collect::<Vec<_>>(),
            again.iter().map(key).collect::<Vec<_>>()
        );
        accept(&second, &again).await;
        assert_eq!(second.close().await.expect("close"), Some(0));
    });
    assert_ok(&b.cli(&["share-groups", "delete", "g"]));
}

/// `skiff consume --share-group` leaves as it exits: the group can be
/// deleted at once, not an hour (lock_ms) after its last acknowledgement.
#[test]
fn a_share_worker_that_exits_leaves_and_the_group_can_be_deleted_at_once() {
    let b = Broker::start("[share]\nlock_ms = 3600000\n");
    create(&b, "tasks", 1);
    produce(&b, "tasks", &["one".to_owned(), "two".to_owned()]);
    wait_exit(worker(
        &b,
        "tasks",
        "t",
        "cat >/dev/null",
        &["--count", "1"],
    ));
    let d = share_groups_json(&b, &["describe", "t"]);
    assert_eq!(d["members"], serde_json::json!([]), "{d}");
    assert_ok(&b.cli(&["share-groups", "delete", "t"]));
}

#[test]
fn dlq_replay_publishes_each_dead_record_back_once() {
    let b = Broker::start("");
    create(&b, "mail", 1);
    produce(
        &b,
        "mail",
        &["ok1".into(), "bad1".into(), "ok2".into(), "bad2".into()],
    );
    let script = r#"case $(cat) in bad*) exit 1;; esac"#;
    wait_exit(worker(
        &b,
        "mail",
        "senders",
        script,
        &["--timeout-ms", "1000"],
    ));
    assert_eq!(dlq_list(&b, "mail").len(), 2);

    let replay = |extra: &[&str]| {
        let mut args = vec!["dlq", "replay", "mail"];
        args.extend(extra);
        let o = b.cli(&args);
        assert_ok(&o);
        common::stderr(&o)
    };
    assert!(replay(&["--count", "1"]).contains("replayed 1 record(s) from mail.dlq"));
    assert!(replay(&[]).contains("replayed 1 record(s)"));
    assert!(replay(&[]).contains("replayed 0 record(s)"));
    // Each run left its share group on the way out.
    let d = share_groups_json(&b, &["describe", "skiff-dlq-replay"]);
    assert_eq!(d["members"], serde_json::json!([]), "{d}");

    let records = common::consume_all(&b.tcp, "mail");
    let values: Vec<&[u8]> = records.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(
        values,
        [&b"ok1"[..], b"bad1", b"ok2", b"bad2", b"bad1", b"bad2"]
    );
    for r in &records[4..] {
        assert_eq!(r.key.as_deref(), Some(&b"k1"[..]));
        assert!(
            r.headers.iter().all(|(n, _)| !n.starts_with("skiff.dlq.")),
            "{:?}",
            r.headers
        );
    }
}

#[test]
fn broker_restart_with_records_in_flight_loses_none_and_accepts_none_twice() {
    let mut b = Broker::start("");
    create(&b, "work", 2);
    let values: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
    produce(&b, "work", &values);

    let config = from_earliest(40, 500);
    let (before, in_flight) = smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "work", config.clone());
        let mut taken = Vec::new();
        while taken.len() < 30 {
            taken.extend(w.poll_max(30 - taken.len() as u32).await.expect("poll"));
        }
        // Accept 10; 20 stay locked when the broker dies.
        let acks: Vec<_> = taken[..10]
            .iter()
            .map(|r| (r.partition, r.offset, Outcome::Accept))
            .collect();
        let codes = w.ack(&acks).await.expect("ack");
        assert!(codes.iter().all(|c| *c == ErrorCode::None), "{codes:?}");
        (taken[..10].to_vec(), taken[10..].to_vec())
    });
    b.kill9();
    b.restart();

    let mut accepted: BTreeMap<(u32, u64), u32> = before
        .iter()
        .map(|r| ((r.partition, r.offset), r.delivery_count))
        .collect();
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        // The old member's locks did not survive: its late accept is refused.
        let old = ShareConsumer::new(client.clone(), "g", "work", config.clone());
        let late = [(in_flight[0].partition, in_flight[0].offset, Outcome::Accept)];
        assert_eq!(
            old.ack(&late).await.expect("ack"),
            [ErrorCode::ShareLockLost]
        );
        let w = ShareConsumer::new(client, "g", "work", config);
        let deadline = Instant::now() + WAIT;
        while accepted.len() < values.len() {
            assert!(Instant::now() < deadline, "{} accepted", accepted.len());
            let got = w.poll().await.expect("poll");
            accept(&w, &got).await;
            for r in got {
                let again = accepted.insert((r.partition, r.offset), r.delivery_count);
                assert!(
                    again.is_none(),
                    "{}/{} accepted twice",
                    r.partition,
                    r.offset
                );
            }
        }
        // Nothing more to come.
        assert!(w.poll().await.expect("poll").is_empty());
    });
    // The records in flight at the kill came back with their count kept.
    for r in &in_flight {
        assert_eq!(accepted[&(r.partition, r.offset)], 2, "{r:?}");
    }
    assert_eq!(
        accepted.values().filter(|&&c| c == 1).count(),
        values.len() - in_flight.len()
    );
}

#[test]
fn bad_share_requests_get_clear_errors() {
    let b = Broker::start("");
    create(&b, "t", 1);
    let o = b.cli(&["consume", "t", "--exec", "true"]);
    assert_fails(&o, 2, &["--exec needs --share-group"]);
    let o = b.cli(&["consume", "t", "--share-group", "g"]);
    assert_fails(&o, 2, &["--share-group needs --exec"]);
    let o = b.cli(&[
        "consume",
        "t",
        "--share-group",
        "g",
        "--exec",
        "true",
        "--from",
        "5",
    ]);
    assert_fails(&o, 2, &["earliest or latest"]);
    let o = b.cli(&["consume", "nope", "--share-group", "g", "--exec", "true"]);
    assert_fails(&o, 1, &["nope"]);
    let o = b.cli(&[
        "consume",
        "__skiff_share",
        "--share-group",
        "g",
        "--exec",
        "true",
    ]);
    assert_fails(&o, 1, &["broker's own topics"]);
    // No record dead-lettered yet: nothing to list or replay, not an
    // error; an unknown topic still is one.
    assert!(dlq_list(&b, "t").is_empty());
    let o = b.cli(&["dlq", "replay", "t"]);
    assert_ok(&o);
    assert!(common::stderr(&o).contains("no dead letters"), "{o:?}");
    let o = b.cli(&["dlq", "list", "nope"]);
    assert_fails(&o, 1, &["nope"]);
}

/// `share.max_active_members` and `share.max_share_partitions` have their
/// own codes from protocol version 4: `too_many_members` (retriable, as a
/// member that leaves or lapses frees its slot) and
/// `too_many_share_partitions` (not: one goes only with its group or
/// topic); a version 3 client still gets `invalid_request`, with the same
/// message naming the limit.
#[test]
fn share_fetches_past_the_share_limits_are_typed_for_version_4_and_invalid_request_before() {
    // The first member must stay active for the whole test on a busy
    // machine: lock_ms is how long a fetch keeps it so.
    let b = Broker::start(
        "[share]\nmax_active_members = 1\nmax_share_partitions = 1\nlock_ms = 3600000\n",
    );
    create(&b, "t", 1);
    create(&b, "u", 1);
    produce(&b, "t", &["r".to_owned()]);
    let fetch = |member: &str, topic: &str| ShareFetchRequest {
        group: "g".into(),
        topic: topic.into(),
        member_id: member.into(),
        max_records: 1,
        max_wait_ms: 0,
        from: Some("earliest".into()),
    };
    // A second member, and the first member's second share partition.
    let refusals = [
        (
            fetch("b", "t"),
            "too many active share members: share.max_active_members is 1",
        ),
        (
            fetch("a", "u"),
            "too many share partitions: share.max_share_partitions is 1",
        ),
    ];
    smol::block_on(async {
        let c = Client::connect(&b.tcp).await.unwrap();
        assert_eq!(c.server_info().await.unwrap().version, 4);
        let first = c
            .share_fetch(fetch("a", "t"))
            .await
            .expect("the first member");
        assert_eq!(first.records.len(), 1);
        for ((request, message), code) in refusals
            .iter()
            .zip([ErrorCode::TooManyMembers, ErrorCode::TooManySharePartitions])
        {
            let e = c.share_fetch(request.clone()).await.unwrap_err();
            assert_eq!(e.code(), Some(code), "{e}");
            assert_eq!(e.is_retriable(), code == ErrorCode::TooManyMembers);
            assert!(e.to_string().contains(message), "{e}");
        }
    });
    let mut old = RawConn::connect_as_version(&b.tcp, 3);
    for (i, (request, message)) in refusals.into_iter().enumerate() {
        let body = RequestBody::ShareFetch(request);
        let got = old.request_error(2 + i as u32, body, ErrorCode::InvalidRequest);
        assert!(got.starts_with(message), "{got}");
    }
}

/// A member of share group `g` on `t` that took one record: with
/// `share.max_active_members = 1` it holds the only slot until it leaves.
fn first_member(b: &Broker) -> ShareConsumer {
    smol::block_on(async {
        let w = ShareConsumer::new(
            Client::connect(&b.tcp).await.unwrap(),
            "g",
            "t",
            from_earliest(1, 0),
        );
        assert_eq!(
            w.poll().await.unwrap().len(),
            1,
            "the first member's record"
        );
        w
    })
}

/// A `skiff consume --share-group` worker started while
/// `share.max_active_members` are active waits for a slot, saying so on
/// stderr, and takes records once a member leaves; a refusal that is not
/// retriable (`too_many_share_partitions`) still ends a worker at once.
#[test]
fn a_worker_waits_for_a_share_member_slot_but_not_past_a_refusal_not_retriable() {
    // The first member stays active (lock_ms) until it leaves.
    let b = Broker::start(
        "[share]\nmax_active_members = 1\nmax_share_partitions = 1\nlock_ms = 3600000\n",
    );
    create(&b, "t", 1);
    create(&b, "u", 1);
    produce(&b, "t", &["r1".to_owned(), "r2".to_owned()]);
    let first = first_member(&b);
    let handled = b.dir.path().join("handled");
    let script = format!(r#"v=$(cat); echo "$v" >> {}"#, handled.display());
    let errors = |name: &str| {
        let path = b.dir.path().join(name);
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    };
    let (second_err, file) = errors("second.stderr");
    let mut second = skiff_command()
        .args(["consume", "t", "--share-group", "g", "--exec", &script])
        .args(["--from", "earliest", "--count", "2", "--broker", &b.tcp])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until(WAIT, "the second worker to wait for a slot", || {
        if let Some(s) = second.try_wait().unwrap() {
            panic!(
                "the second worker exited ({s}) rather than wait for a slot: {}",
                read(&second_err)
            );
        }
        read(&second_err).contains("waiting for a share-member slot")
    });
    assert!(lines(&handled).is_empty(), "no slot, no record");
    // Leaving frees the slot and releases r1 to the second worker.
    assert_eq!(smol::block_on(first.close()).unwrap(), Some(1));
    wait_exit(second);
    let mut got = lines(&handled);
    got.sort();
    assert_eq!(got, ["r1", "r2"]);
    let waits = read(&second_err)
        .matches("waiting for a share-member slot")
        .count();
    assert_eq!(waits, 1, "said once: {}", read(&second_err));

    // The share partitions are all taken (t/0): one of u is refused for
    // good, and a worker without --timeout-ms, which would wait for a
    // member slot for ever, ends at once.
    let (third_err, file) = errors("third.stderr");
    let third = skiff_command()
        .args(["consume", "u", "--share-group", "g", "--exec", "true"])
        .args(["--broker", &b.tcp])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let status = exit_status(third, || {
        format!("the third worker kept going: {}", read(&third_err))
    });
    let err = read(&third_err);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("too many share partitions"), "{err}");
    assert!(!err.contains("waiting for"), "{err}");
}

/// How `c` exits, within [`WAIT`]; past it `c` is killed and the test
/// fails saying `kept_going`.
fn exit_status(mut c: Child, kept_going: impl Fn() -> String) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{}", kept_going());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker spawned with its stderr in `err`, for a test to read.
fn worker_logged(b: &Broker, topic: &str, group: &str, script: &str, err: &Path) -> Child {
    skiff_command()
        .args(["consume", topic, "--share-group", group, "--exec", script])
        .args(["--from", "earliest", "--broker", &b.tcp])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .expect("spawning skiff consume --share-group")
}

/// SIGTERM to `w` once `err` says it waits for a slot; it exits cleanly
/// (as between records) within [`WAIT`], though no slot frees.
fn stop_while_waiting_for_a_slot(mut w: Child, err: &Path) -> String {
    let read = || std::fs::read_to_string(err).unwrap_or_default();
    wait_until(WAIT, "the worker to wait for a slot", || {
        if let Some(s) = w.try_wait().unwrap() {
            panic!("the worker exited ({s}) rather than wait: {}", read());
        }
        read().contains("waiting for a share-member slot")
    });
    // SAFETY: a signal to the worker this test spawned, not yet reaped.
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    let status = exit_status(w, || {
        format!("SIGTERM did not end the waiting worker: {}", read())
    });
    assert_eq!(
        status.code(),
        Some(0),
        "a clean exit on SIGTERM: {}",
        read()
    );
    let said = read();
    assert_eq!(
        said.matches("waiting for a share-member slot").count(),
        1,
        "said once: {said}"
    );
    said
}

/// A worker without --timeout-ms waits for a member slot with no end; a
/// SIGTERM ends the wait and the worker, without a SIGKILL.
#[test]
fn sigterm_ends_a_worker_waiting_for_a_member_slot_to_poll() {
    let b = Broker::start("[share]\nmax_active_members = 1\nlock_ms = 3600000\n");
    create(&b, "t", 1);
    produce(&b, "t", &["r1".to_owned(), "r2".to_owned()]);
    let first = first_member(&b);
    let handled = b.dir.path().join("handled");
    let script = format!(r#"cat >> {}"#, handled.display());
    let err = b.dir.path().join("worker.stderr");
    let w = worker_logged(&b, "t", "g", &script, &err);
    stop_while_waiting_for_a_slot(w, &err);
    assert!(lines(&handled).is_empty(), "no slot, no record");
    drop(first);
}

/// A worker whose slot lapsed while its command ran waits for one to
/// acknowledge the record; a SIGTERM ends that wait too, saying the record
/// comes back after lock_ms.
#[test]
fn sigterm_ends_a_worker_waiting_for_a_member_slot_to_acknowledge() {
    // The worker's group lapses after a second; the member that takes its
    // slot stays active for an hour.
    let b = Broker::start(
        "[share]\nmax_active_members = 1\nlock_ms = 3600000\n\
         [[share.overrides]]\ngroup = \"w\"\nlock_ms = 1000\n",
    );
    create(&b, "t", 1);
    produce(&b, "t", &["r1".to_owned()]);
    let (started, go) = (b.dir.path().join("started"), b.dir.path().join("go"));
    let script = format!(
        "echo $SKIFF_OFFSET > {}; while [ ! -e {} ]; do sleep 0.05; done",
        started.display(),
        go.display()
    );
    let err = b.dir.path().join("worker.stderr");
    let w = worker_logged(&b, "t", "w", &script, &err);
    wait_until(WAIT, "the worker to run its command", || {
        !lines(&started).is_empty()
    });
    // Waits out the worker's second, then holds the only slot.
    let other = smol::block_on(async {
        let other = ShareConsumer::new(
            Client::connect(&b.tcp).await.unwrap(),
            "g",
            "t",
            ShareConfig {
                retry_timeout: WAIT,
                ..from_earliest(1, 0)
            },
        );
        assert_eq!(other.poll().await.unwrap().len(), 1, "the other's record");
        other
    });
    std::fs::write(&go, "").unwrap();
    let said = stop_while_waiting_for_a_slot(w, &err);
    assert!(
        said.contains("t/0 offset 0: stopped while its acknowledgement waited"),
        "{said}"
    );
    drop(other);
}

/// `skiff dlq replay t` spawned, its stderr to the path returned, while
/// the member returned holds the only share-member slot (topic t's).
fn replay_with_the_slot_taken(b: &Broker) -> (ShareConsumer, Child, std::path::PathBuf) {
    create(b, "t", 1);
    create(b, "t.dlq", 1);
    produce(b, "t", &["r1".to_owned()]);
    let first = first_member(b);
    let err = b.dir.path().join("replay.stderr");
    let replay = skiff_command()
        .args(["dlq", "replay", "t", "--broker", &b.tcp])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    (first, replay, err)
}

/// As [`replay_with_the_slot_taken`], once the replay says it waits for a
/// slot.
fn replay_waiting_for_a_slot(b: &Broker) -> (ShareConsumer, Child, std::path::PathBuf) {
    let (first, mut replay, err) = replay_with_the_slot_taken(b);
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    wait_until(WAIT, "the replay to wait for a slot", || {
        if let Some(s) = replay.try_wait().unwrap() {
            panic!(
                "the replay exited ({s}) rather than wait for a slot: {}",
                read()
            );
        }
        read().contains("dlq replay t.dlq: waiting for a share-member slot")
    });
    (first, replay, err)
}

/// `skiff dlq replay` started while `share.max_active_members` are active
/// (any share group's) waits for a slot too, saying so on stderr.
#[test]
fn dlq_replay_waits_for_a_share_member_slot() {
    let b = Broker::start("[share]\nmax_active_members = 1\nlock_ms = 3600000\n");
    let (first, replay, err) = replay_waiting_for_a_slot(&b);
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    assert_eq!(smol::block_on(first.close()).unwrap(), Some(1));
    wait_exit(replay);
    assert!(
        read().contains("replayed 0 record(s) from t.dlq"),
        "{}",
        read()
    );
}

/// A SIGTERM ends `skiff dlq replay`'s wait for a member slot at once, and
/// it exits cleanly, as a worker does: it left the group and says what it
/// replayed. Before, it had no handler, and the signal killed it.
#[test]
fn sigterm_ends_a_dlq_replay_waiting_for_a_member_slot() {
    let b = Broker::start("[share]\nmax_active_members = 1\nlock_ms = 3600000\n");
    let (first, replay, err) = replay_with_the_slot_taken(&b);
    let said = stop_while_waiting_for_a_slot(replay, &err);
    assert!(said.contains("replayed 0 record(s) from t.dlq"), "{said}");
    drop(first);
}

/// A second SIGTERM while `skiff dlq replay` finishes after the first
/// (here leaving its group, on a broker that does not answer) ends it at
/// once with 130. Before, it was ignored: the replay waited out the
/// request's timeout and then exited 0.
#[test]
fn a_second_sigterm_ends_a_finishing_dlq_replay_at_once() {
    let b = Broker::start("[share]\nmax_active_members = 1\nlock_ms = 3600000\n");
    let (first, replay, err) = replay_waiting_for_a_slot(&b);
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    // Its leave, after the first signal, gets no answer.
    b.pause();
    let pid = replay.id() as i32;
    sigterm_taken(pid, &err, WAIT);
    // SAFETY: a signal to the replay this test spawned, not yet reaped
    // (its leave waits).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = exit_status(replay, || {
        format!("the second SIGTERM did not end the replay: {}", read())
    });
    b.resume();
    assert_eq!(status.code(), Some(130), "{}", read());
    drop(first);
}

/// A broker with the record `value` in topic t, and a worker of group g
/// whose command for it sleeps an hour, not reading its input (ignoring
/// SIGTERM if `deaf`): the broker, the worker, the command's pid (its
/// shell execs the sleep) and the worker's stderr file, once the command
/// runs.
fn worker_in_a_sleep(deaf: bool, value: &str) -> (Broker, Child, i32, std::path::PathBuf) {
    let b = Broker::start("[share]\nlock_ms = 3600000\n");
    create(&b, "t", 1);
    produce(&b, "t", &[value.to_owned()]);
    let started = b.dir.path().join("started");
    let trap = if deaf { "trap '' TERM; " } else { "" };
    let script = format!("{trap}echo $$ > {}; exec sleep 3600", started.display());
    let err = b.dir.path().join("worker.stderr");
    let w = worker_logged(&b, "t", "g", &script, &err);
    wait_until(WAIT, "the worker to run its command", || {
        !lines(&started).is_empty()
    });
    let command = lines(&started)[0].parse().expect("a pid");
    (b, w, command, err)
}

/// A second SIGTERM while a worker stops after the first (its command
/// ended, its release and leave on a broker that does not answer) ends it
/// at once with 130. Before, it was ignored: the worker waited out the
/// client's timeouts and then exited 0.
#[test]
fn a_second_sigterm_ends_a_stopping_worker_at_once() {
    let (b, w, command, err) = worker_in_a_sleep(false, "r1");
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    b.pause();
    let pid = w.id() as i32;
    sigterm_taken(pid, &err, WAIT);
    // SAFETY: signal 0 sends nothing; it asks whether the process exists.
    let gone = || unsafe { libc::kill(command, 0) } != 0;
    // Now the worker waits on the broker, releasing the record.
    wait_until(WAIT, "the first SIGTERM to end the command", gone);
    // SAFETY: a signal to the worker this test spawned, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = exit_status(w, || {
        format!("the second SIGTERM did not end the worker: {}", read())
    });
    b.resume();
    assert_eq!(status.code(), Some(130), "{}", read());
}

/// A second SIGTERM while a worker waits for its command to heed the first
/// (this one ignores SIGTERM) ends the worker at once with 130 and takes
/// the command with it: SIGKILL to its process group, which no terminal's
/// Ctrl-C reaches. Before, the command outlived the worker.
#[test]
fn a_second_sigterm_takes_a_command_ignoring_the_first_with_the_worker() {
    a_second_sigterm_takes_a_deaf_command_along("r1");
}

/// As above, for a command that does not read a record larger than the
/// pipe: the worker knows the command's group from its start, not only
/// once the record is written. Before, it was blocked writing, and the
/// second signal left the command behind.
#[test]
fn a_second_sigterm_takes_a_command_not_reading_its_record_along() {
    a_second_sigterm_takes_a_deaf_command_along(&"x".repeat(100 * 1024));
}

fn a_second_sigterm_takes_a_deaf_command_along(value: &str) {
    let (_b, w, command, err) = worker_in_a_sleep(true, value);
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    let pid = w.id() as i32;
    // The worker now gives the command 5 s to go before its SIGKILL.
    sigterm_taken(pid, &err, WAIT);
    // SAFETY: a signal to the worker this test spawned, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = exit_status(w, || {
        format!("the second SIGTERM did not end the worker: {}", read())
    });
    command_gone(command, || format!("({status}) {}", read()));
    assert_eq!(status.code(), Some(130), "{}", read());
}

/// A first SIGTERM stops a worker whose command does not read a record
/// larger than the pipe: the command gets SIGTERM and goes, the record is
/// released, the worker exits 0. Before, the worker was blocked writing
/// the record and did not stop.
#[test]
fn sigterm_stops_a_worker_whose_command_does_not_read_its_record() {
    let (_b, w, command, err) = worker_in_a_sleep(false, &"x".repeat(100 * 1024));
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    sigterm_taken(w.id() as i32, &err, WAIT);
    let status = exit_status(w, || format!("SIGTERM did not stop the worker: {}", read()));
    command_gone(command, || format!("({status}) {}", read()));
    assert_eq!(status.code(), Some(0), "{}", read());
}

/// Waits until the process `command` is gone (or a zombie its new parent
/// has yet to reap); SIGKILLs its group and panics with `said` if it
/// stays.
fn command_gone(command: i32, said: impl Fn() -> String) {
    let gone = || {
        std::fs::read_to_string(format!("/proc/{command}/stat")).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        })
    };
    let deadline = Instant::now() + WAIT;
    while !gone() {
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the command's group, to leave nothing
            // behind; it is still there, so the id is its own.
            unsafe { libc::kill(-command, libc::SIGKILL) };
            panic!("the command outlived the worker {}", said());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_stuck_record_holds_back_at_most_max_in_flight_records() {
    let b = Broker::start("[share]\nmax_in_flight_records = 5\n");
    create(&b, "q", 1);
    let values: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    produce(&b, "q", &values);
    let config = from_earliest(100, 200);
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let stuck = ShareConsumer::new(client.clone(), "g", "q", config.clone());
        let held = stuck.poll_max(1).await.expect("poll");
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].offset, 0);
        let other = ShareConsumer::new(client, "g", "q", config);
        let accept_all = |rs: &[skiff::protocol::ShareRecord]| -> Vec<(u32, u64, Outcome)> {
            rs.iter()
                .map(|r| (r.partition, r.offset, Outcome::Accept))
                .collect()
        };
        // Offsets 1..=4 flow past the stuck one; the window ends at 5.
        let got = other.poll().await.expect("poll");
        let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [1, 2, 3, 4]);
        other.ack(&accept_all(&got)).await.expect("ack");
        assert!(other.poll().await.expect("poll").is_empty());
        // Once the stuck record is done, the rest come.
        stuck.ack(&accept_all(&held)).await.expect("ack");
        let got = other.poll().await.expect("poll");
        let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [5, 6, 7, 8, 9]);
    });
}

/// Accepts `got`, every ack counting.
async fn accept(w: &ShareConsumer, got: &[skiff::protocol::ShareRecord]) {
    let acks: Vec<_> = got
        .iter()
        .map(|r| (r.partition, r.offset, Outcome::Accept))
        .collect();
    let codes = w.ack(&acks).await.expect("ack");
    assert!(codes.iter().all(|c| *c == ErrorCode::None), "{codes:?}");
}

/// Polls `w` until it has taken `n` records.
async fn take(w: &ShareConsumer, n: usize) -> Vec<skiff::protocol::ShareRecord> {
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} taken", got.len());
        got.extend(w.poll_max((n - got.len()) as u32).await.expect("poll"));
    }
    got
}

fn share_groups_json(b: &Broker, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["share-groups"];
    all.extend_from_slice(args);
    all.extend(["--format", "json"]);
    let o = b.cli(&all);
    assert_ok(&o);
    serde_json::from_str(&stdout(&o)).expect("one JSON document")
}

fn sum(d: &serde_json::Value, field: &str) -> u64 {
    d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p[field].as_u64().expect("a count"))
        .sum()
}

#[test]
fn share_groups_are_listed_described_and_deleted_once_idle_and_stay_deleted() {
    // The default lock_ms (30 s) keeps the worker's locks, and the worker
    // active, for the whole first part.
    let mut b = Broker::start("");
    create(&b, "jobs", 2);
    let values: Vec<String> = (0..10).map(|i| format!("j{i}")).collect();
    produce(&b, "jobs", &values);
    let config = from_earliest(4, 200);
    let (member, held) = smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let other = ShareConsumer::new(client.clone(), "keep", "jobs", config.clone());
        while other.poll_max(1).await.expect("poll").is_empty() {}
        let w = ShareConsumer::new(client, "g", "jobs", config);
        let taken = take(&w, 4).await;
        let release = Outcome::Release {
            delay: Duration::ZERO,
            reason: Some("busy".into()),
        };
        let acks = [
            (taken[0].partition, taken[0].offset, Outcome::Accept),
            (taken[1].partition, taken[1].offset, release),
        ];
        let codes = w.ack(&acks).await.expect("ack");
        assert!(codes.iter().all(|c| *c == ErrorCode::None), "{codes:?}");
        (w.member_id().to_owned(), taken[2..].to_vec())
    });

    let list = share_groups_json(&b, &["list"]);
    let g = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|g| g["group"] == "g")
        .unwrap_or_else(|| panic!("g listed: {list}"));
    assert_eq!(g["topics"], serde_json::json!(["jobs"]));
    assert_eq!(g["in_flight"], 3, "{g}");
    let d = share_groups_json(&b, &["describe", "g"]);
    assert_eq!(sum(&d, "acquired"), 2, "{d}");
    assert_eq!(sum(&d, "awaiting_redelivery"), 1, "{d}");
    let members = d["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{d}");
    assert_eq!(members[0]["member_id"], member.as_str());
    assert_eq!(members[0]["acquired"], 2);
    for p in d["partitions"].as_array().expect("partitions") {
        assert!(p["start"].as_u64() <= p["next"].as_u64(), "{p}");
        let counted: u64 = p["delivery_counts"]
            .as_object()
            .expect("delivery counts")
            .values()
            .map(|c| c.as_u64().expect("a count"))
            .sum();
        assert_eq!(
            counted,
            p["records"].as_array().expect("records").len() as u64
        );
    }
    let text = b.cli(&["share-groups", "describe", "g"]);
    assert_ok(&text);
    assert!(
        stdout(&text).contains("share group: g"),
        "{}",
        stdout(&text)
    );
    assert!(stdout(&text).contains("awaiting_redelivery"));

    // Refused while a member holds records or fetched within lock_ms.
    let o = b.cli(&["share-groups", "delete", "g"]);
    assert_fails(&o, 1, &["active member"]);
    assert_eq!(held.len(), 2);
    // Locks and activity do not outlive the broker: after a restart the
    // group has its state and no member.
    b.kill9();
    b.restart();
    let d = share_groups_json(&b, &["describe", "g"]);
    assert_eq!(d["members"], serde_json::json!([]), "{d}");
    assert_eq!(sum(&d, "acquired"), 0, "{d}");
    assert_eq!(sum(&d, "awaiting_redelivery"), 3, "{d}");
    assert_ok(&b.cli(&["share-groups", "delete", "g"]));
    assert_fails(
        &b.cli(&["share-groups", "describe", "g"]),
        1,
        &["no share group 'g'"],
    );
    assert_fails(
        &b.cli(&["share-groups", "delete", "g"]),
        1,
        &["no share group 'g'"],
    );

    b.kill9();
    b.restart();
    let list = share_groups_json(&b, &["list"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|g| g["group"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, ["keep"], "g stays deleted, keep stays");
    // g starts afresh: every record, each on its first delivery.
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let config = from_earliest(100, 200);
        let w = ShareConsumer::new(client, "g", "jobs", config);
        let got = take(&w, values.len()).await;
        assert!(got.iter().all(|r| r.delivery_count == 1), "{got:?}");
    });
}

#[test]
fn a_topic_deleted_and_made_again_starts_with_no_share_state() {
    let mut b = Broker::start("");
    create(&b, "t", 1);
    let values: Vec<String> = (0..5).map(|i| format!("old{i}")).collect();
    produce(&b, "t", &values);
    let config = from_earliest(100, 200);
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "t", config.clone());
        let got = take(&w, values.len()).await;
        let acks: Vec<_> = got
            .iter()
            .map(|r| (r.partition, r.offset, Outcome::Accept))
            .collect();
        w.ack(&acks).await.expect("ack");
    });
    assert_ok(&b.cli(&["topics", "delete", "t"]));
    create(&b, "t", 1);
    produce(&b, "t", &["new0".to_owned(), "new1".to_owned()]);
    b.kill9();
    b.restart();
    let o = b.cli(&["share-groups", "list", "--format", "json"]);
    assert_ok(&o);
    assert_eq!(
        stdout(&o).trim(),
        "[]",
        "the deleted topic's share state is gone"
    );
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "t", config);
        let got = take(&w, 2).await;
        let seen: Vec<(u64, u32)> = got.iter().map(|r| (r.offset, r.delivery_count)).collect();
        assert_eq!(seen, [(0, 1), (1, 1)]);
    });
}

/// What the workers of the kill loop saw, per record (partition, offset).
#[derive(Default)]
struct LoopState {
    deliveries: BTreeMap<(u32, u64), u32>,
    /// Accepts the broker answered `none`: durable, never delivered again.
    confirmed: BTreeSet<(u32, u64)>,
    /// Accepts whose answer was lost with the connection.
    unknown: BTreeSet<(u32, u64)>,
    faults: Vec<String>,
    last_delivery: Option<Instant>,
}

/// One worker of the kill loop: fetch, accept, note each answer;
/// reconnects after every kill until `stop`.
fn loop_worker(
    addr: String,
    state: std::sync::Arc<std::sync::Mutex<LoopState>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        smol::block_on(async {
            while !stop.load(Ordering::SeqCst) {
                let Ok(client) = Client::connect(&addr).await else {
                    smol::Timer::after(Duration::from_millis(50)).await;
                    continue;
                };
                let w = ShareConsumer::new(client, "g", "work", from_earliest(10, 200));
                while !stop.load(Ordering::SeqCst) {
                    // A worker's work: at most 400 records a second each,
                    // so the kills land while records remain.
                    smol::Timer::after(Duration::from_millis(25)).await;
                    let Ok(got) = w.poll().await else { break };
                    let keys: Vec<(u32, u64)> =
                        got.iter().map(|r| (r.partition, r.offset)).collect();
                    {
                        let mut s = state.lock().unwrap();
                        for k in &keys {
                            *s.deliveries.entry(*k).or_default() += 1;
                            if s.confirmed.contains(k) {
                                s.faults.push(format!(
                                    "{k:?} delivered after its accept was confirmed"
                                ));
                            }
                        }
                        if !keys.is_empty() {
                            s.last_delivery = Some(Instant::now());
                        }
                    }
                    let acks: Vec<_> = keys.iter().map(|&(p, o)| (p, o, Outcome::Accept)).collect();
                    let answer = w.ack(&acks).await;
                    let mut s = state.lock().unwrap();
                    match answer {
                        Ok(codes) => {
                            for (k, code) in keys.iter().zip(codes) {
                                match code {
                                    ErrorCode::None => {
                                        if !s.confirmed.insert(*k) {
                                            s.faults.push(format!("{k:?} accepted twice"));
                                        }
                                    }
                                    // Its lock went with a restart: it comes back.
                                    ErrorCode::ShareLockLost => {}
                                    other => {
                                        s.faults.push(format!("{k:?}: accept answered {other:?}"))
                                    }
                                }
                            }
                        }
                        Err(_) => {
                            s.unknown.extend(keys);
                            break;
                        }
                    }
                }
            }
        })
    })
}

/// Issue 22's kill loop for share groups: two workers fetch and accept
/// while the broker is killed with SIGKILL again and again. Every record is
/// delivered, none whose accept was confirmed comes back, and at the end
/// nothing is left to deliver. `SKIFF_SHARE_KILLS` sets the kill count (8,
/// 3 under an emulator).
#[test]
fn a_kill_9_loop_under_share_workers_loses_no_record_and_accepts_none_twice() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let kills: u32 = std::env::var("SKIFF_SHARE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if emulated() { 3 } else { 8 });
    // Every kill can add a delivery to a locked record: keep them all out
    // of the dead-letter topic.
    let mut b = Broker::start("[share]\nmax_deliveries = 1000\nlock_ms = 1000\n");
    create(&b, "work", 2);
    // More than two paced workers can take while the broker is up between
    // kills (at most 400 ms each time): the last kill still finds work.
    let values: Vec<String> = (0..600 * kills).map(|i| format!("w{i}")).collect();
    produce(&b, "work", &values);

    let state = Arc::new(Mutex::new(LoopState::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| loop_worker(b.tcp.clone(), state.clone(), stop.clone()))
        .collect();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(fastrand::u64(100..400)));
        let delivered = state.lock().unwrap().deliveries.len();
        assert!(delivered < values.len(), "the kill found work left");
        b.kill9();
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..50)));
        b.restart();
    }
    // Until every record was delivered and none came for two lock periods
    // (records locked to a lost connection come back after lock_ms).
    wait_until(Duration::from_secs(120), "every record settled", || {
        let s = state.lock().unwrap();
        s.deliveries.len() == values.len()
            && s.last_delivery
                .is_some_and(|t| t.elapsed() > Duration::from_millis(2500))
    });
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("worker");
    }
    let s = state.lock().unwrap();
    assert!(s.faults.is_empty(), "{:#?}", s.faults);
    // Nothing left: no record is available or locked any more.
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "work", from_earliest(100, 1500));
        let left = w.poll().await.expect("poll");
        assert!(left.is_empty(), "still delivered after the loop: {left:?}");
    });
    for k in s.deliveries.keys() {
        assert!(
            s.confirmed.contains(k) || s.unknown.contains(k),
            "{k:?} delivered and never accepted"
        );
    }
    // No record was dead-lettered: the dead-letter topic was never made.
    let o = b.cli(&["dlq", "list", "work", "--format", "json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stdout(&o).is_empty() && err.contains("no dead letters"),
        "{err} {}",
        stdout(&o)
    );
    eprintln!(
        "share kill loop: {kills} kills, {} records, {} deliveries, {} accepts confirmed, {} answers lost",
        values.len(),
        s.deliveries.values().sum::<u32>(),
        s.confirmed.len(),
        s.unknown.len()
    );
}

/// A share fetch of `max_records` records larger than a frame holds is
/// answered with as many as fit, each locked and counted once: none is
/// charged a delivery it never got, so none reaches the dead-letter topic
/// for answers the worker could not read. Redeliveries (released records,
/// chosen before their sizes are known) likewise.
#[test]
fn a_share_fetch_of_more_than_a_frame_holds_delivers_what_fits_and_charges_no_more() {
    // The embedded default's frame: 132 KiB; 60 records of 3 KB take 180 KB.
    let b = Broker::start("[share]\nlock_ms = 300000\n");
    create(&b, "big", 1);
    let values: Vec<String> = (0..60)
        .map(|i| format!("{i:03}{}", "x".repeat(3000)))
        .collect();
    produce(&b, "big", &values);
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "big", from_earliest(100, 200));
        // Every record acquired, held: each answer a share_fetch answer.
        let mut held = Vec::new();
        let mut answers = Vec::new();
        while held.len() < values.len() {
            assert!(
                answers.len() < values.len(),
                "{} of 60 in {answers:?}",
                held.len()
            );
            let got = w.poll().await.expect("a share_fetch answer");
            answers.push(got.len());
            held.extend(got);
        }
        assert!(answers[0] > 1 && answers[0] < values.len(), "{answers:?}");
        let offsets: BTreeSet<u64> = held.iter().map(|r| r.offset).collect();
        assert_eq!(offsets.len(), values.len(), "each record once: {answers:?}");
        assert!(held.iter().all(|r| r.delivery_count == 1), "{answers:?}");
        // All released at once: redeliveries are again more than one answer holds.
        let release: Vec<_> = held
            .iter()
            .map(|r| {
                let again = Outcome::Release {
                    delay: Duration::ZERO,
                    reason: None,
                };
                (r.partition, r.offset, again)
            })
            .collect();
        let codes = w.ack(&release).await.expect("release");
        assert!(codes.iter().all(|c| *c == ErrorCode::None), "{codes:?}");
        let mut accepted: BTreeMap<u64, u32> = BTreeMap::new();
        let mut answers = 0;
        while accepted.len() < values.len() {
            answers += 1;
            assert!(answers <= values.len(), "{} of 60 accepted", accepted.len());
            let got = w.poll().await.expect("a share_fetch answer");
            accept(&w, &got).await;
            for r in got {
                let value = String::from_utf8(r.value.clone().expect("a value").to_vec());
                assert_eq!(
                    value.ok().as_deref(),
                    Some(values[r.offset as usize].as_str())
                );
                let twice = accepted.insert(r.offset, r.delivery_count);
                assert!(twice.is_none(), "offset {} accepted twice", r.offset);
            }
        }
        // The second delivery of each, whichever answer it came in.
        assert!(
            accepted.values().all(|&c| c == 2),
            "delivery counts: {accepted:?}"
        );
        assert!(w.poll().await.expect("poll").is_empty());
    });
    assert!(dlq_list(&b, "big").is_empty());
}

/// A partition every share fetch skips (here: one start-up could not
/// load) is counted once per fetch in
/// `skiff_share_fetch_partitions_skipped_total`, and logged once rather
/// than once per fetch.
#[test]
fn a_partition_share_fetches_keep_skipping_is_counted_and_logged_once() {
    let mut b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    create(&b, "poison", 2);
    for p in ["0", "1"] {
        let args = ["produce", "poison", "--partition", p];
        assert_ok(&b.cli_stdin(&args, Some(b"r\n")));
    }
    assert_eq!(b.stop(), Some(0));
    common::make_unloadable(&b.data_dir().join("topics/poison/1"));
    b.restart();
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "poison", from_earliest(10, 0));
        let got = w.poll().await.expect("the healthy partition's record");
        let at: Vec<_> = got.iter().map(|r| (r.partition, r.offset)).collect();
        assert_eq!(at, [(0, 0)]);
        for _ in 0..4 {
            let e = w
                .poll()
                .await
                .expect_err("nothing but the unloadable partition");
            assert!(e.to_string().contains("partition_quarantined"), "{e}");
        }
    });
    wait_until(WAIT, "the skips counted", || {
        let m = http_get(&b.metrics_addr(), "/metrics");
        m.lines()
            .any(|l| l == "skiff_share_fetch_partitions_skipped_total 5")
    });
    let log = b.log();
    assert_eq!(
        log.matches("a share fetch skips poison/1").count(),
        1,
        "{log}"
    );
}

/// A record due for the dead-letter topic whose partition cannot be read
/// is tried again at most once a second, not every expiry pass (every
/// 50 ms while a record is locked), and the failure is logged once.
#[test]
fn a_dead_letter_write_that_keeps_failing_is_retried_slowly_and_logged_once() {
    let mut b = Broker::start("[share]\nmax_deliveries = 1\nlock_ms = 300000\n");
    create(&b, "poison", 1);
    create(&b, "fine", 1);
    assert_ok(&b.cli_stdin(&["produce", "poison"], Some(b"r\n")));
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "poison", from_earliest(10, 0));
        assert_eq!(w.poll().await.expect("the record").len(), 1);
    });
    assert_eq!(b.stop(), Some(0));
    common::make_unloadable(&b.data_dir().join("topics/poison/0"));
    b.restart();
    let line = "a dead-letter write for poison/0 to poison.dlq failed";
    wait_until(WAIT, "the failure logged", || b.log().contains(line));
    // A locked record keeps the expiry pass running every 50 ms.
    assert_ok(&b.cli_stdin(&["produce", "fine"], Some(b"r\n")));
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "fine", from_earliest(10, 0));
        assert_eq!(w.poll().await.expect("the record").len(), 1);
        smol::Timer::after(Duration::from_secs(3)).await;
    });
    let log = b.log();
    assert_eq!(log.matches(line).count(), 1, "{log}");
    assert_eq!(log.matches("dead-letter write").count(), 1, "{log}");
}

/// A transaction's commit marker takes an offset in the partition but is
/// the broker's, not a record (docs/transactions.md): a share group must
/// step over it as a consumer does, not hand it to a worker.
#[test]
fn a_share_group_never_delivers_a_transaction_marker() {
    let b = Broker::start("");
    create(&b, "q", 1);
    for v in ["c1", "c2"] {
        let line = format!("q\t{v}\n");
        assert_ok(&b.cli_stdin(&["txn", "--id", "w1"], Some(line.as_bytes())));
    }
    produce(&b, "q", &["p1".to_owned()]);
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "q", from_earliest(100, 200));
        let got = take(&w, 3).await;
        let seen: Vec<(u64, String)> = got
            .iter()
            .map(|r| {
                let v = r.value.clone().map(|v| v.to_vec()).unwrap_or_default();
                (r.offset, String::from_utf8_lossy(&v).into_owned())
            })
            .collect();
        // Each commit's marker follows its record: offsets 1 and 3.
        assert_eq!(
            seen,
            [
                (0, "c1".to_owned()),
                (2, "c2".to_owned()),
                (4, "p1".to_owned())
            ]
        );
        accept(&w, &got).await;
        assert!(w.poll().await.expect("poll").is_empty(), "nothing more");
    });
}

/// A dead-lettered tombstone (a record without a value) is replayed as a
/// tombstone, as the dead-letter topic holds it, not as an empty value:
/// on a compacted topic one deletes its key, the other keeps it.
#[test]
fn dlq_replay_publishes_a_tombstone_back_as_a_tombstone() {
    let b = Broker::start("");
    create(&b, "kv", 1);
    assert_ok(&b.cli(&["produce", "kv", "--key", "k1", "--tombstone"]));
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let w = ShareConsumer::new(client, "g", "kv", from_earliest(10, 200));
        let got = take(&w, 1).await;
        assert!(got[0].value.is_none(), "a tombstone");
        let reason = "cannot delete".to_owned();
        let codes = w
            .ack(&[(0, got[0].offset, Outcome::Reject { reason })])
            .await
            .expect("reject");
        assert_eq!(codes, [ErrorCode::None]);
    });
    assert_eq!(dlq_list(&b, "kv").len(), 1);
    assert_ok(&b.cli(&["dlq", "replay", "kv"]));
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.expect("connect");
        let r = ShareConsumer::new(client, "h", "kv", from_earliest(10, 200));
        let got = take(&r, 2).await;
        let key = got[1].key.clone().map(|k| k.to_vec());
        assert_eq!(key.as_deref(), Some(&b"k1"[..]));
        assert!(got[1].value.is_none(), "replayed: {:?}", got[1].value);
    });
}
