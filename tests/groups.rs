//! Consumer groups through the real binary: `skiff consume --group`
//! processes sharing a topic, surviving restarts and kill -9, the
//! cooperative hand-over, fencing, lag, and the admin commands.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    assert_fails, assert_ok, json_lines, sigterm_taken, skiff_command, stderr, stdout, wait_until,
    Broker, RawConn, INTERNAL_TOPICS_DISK_BYTES,
};
use skiff::client::{Client, Producer, ProducerConfig};
use skiff::protocol::{
    ErrorCode, GroupPartition, JoinGroupRequest, OffsetCommitPartition, RequestBody,
};

/// Long enough that no member of a busy CI machine misses it: only the
/// test of a killed member waits for a session to end, with its own.
const SESSION_MS: &str = "10000";
/// The killed member's test: it waits this out once.
const SHORT_SESSION_MS: &str = "3000";
const WAIT: Duration = Duration::from_secs(30);

/// A `skiff consume --group` process and the JSON lines it printed.
struct Member {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The file its stderr goes to.
    stderr: std::path::PathBuf,
}

impl Member {
    fn start(b: &Broker, topic: &str, group: &str, extra: &[&str]) -> Member {
        Member::start_with_session(b, topic, group, SESSION_MS, extra)
    }

    fn start_with_session(
        b: &Broker,
        topic: &str,
        group: &str,
        session_ms: &str,
        extra: &[&str],
    ) -> Member {
        static MEMBERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MEMBERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = b.dir.path().join(format!("member-{n}.stderr"));
        let mut cmd = skiff_command();
        cmd.args(["consume", topic, "--group", group, "--format", "json"])
            .args(["--session-timeout-ms", session_ms, "--from", "earliest"])
            .args(extra)
            .args(["--broker", &b.tcp])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("a stderr file"));
        let mut child = cmd.spawn().expect("spawning skiff consume --group");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
                l.lock().unwrap().push(v);
            }
        });
        Member {
            child: Some(child),
            lines,
            stderr,
        }
    }

    /// (partition, offset) of every record printed.
    fn printed(&self) -> Vec<(u32, u64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["partition"].as_u64().unwrap() as u32,
                    v["offset"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn signal(&mut self, sig: i32) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
        let status = child.wait().expect("waiting for the member");
        // The reader thread may still be taking the last lines.
        std::thread::sleep(Duration::from_millis(100));
        status.code()
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let status = self.child.take()?.wait().expect("waiting for the member");
        std::thread::sleep(Duration::from_millis(100));
        status.code()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn create(b: &Broker, topic: &str, partitions: &str) {
    assert_ok(&b.cli(&["topics", "create", topic, "--partitions", partitions]));
}

/// Produces `n` keyed records (spread over the partitions by key).
fn produce(b: &Broker, topic: &str, from: u32, n: u32) {
    smol::block_on(async {
        let client = Client::connect(&b.tcp).await.unwrap();
        let producer = Producer::new(client, ProducerConfig::default())
            .await
            .unwrap();
        let mut ds = Vec::new();
        for i in from..from + n {
            let key = format!("k{i}");
            ds.push(
                producer
                    .send_wait(topic, Some(key.as_bytes()), key.as_bytes(), &[])
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await;
        for d in ds {
            d.await.unwrap();
        }
    });
}

fn describe(b: &Broker, group: &str) -> serde_json::Value {
    let o = b.cli(&["groups", "describe", group, "--format", "json"]);
    assert_ok(&o);
    serde_json::from_str(&stdout(&o)).expect("describe prints one JSON object")
}

/// Each member's assignment, when the group is stable with `members`.
fn stable(b: &Broker, group: &str, members: usize) -> Option<Vec<BTreeSet<u32>>> {
    // Unknown until its first member joins.
    let o = b.cli(&["groups", "describe", group, "--format", "json"]);
    let d: serde_json::Value = serde_json::from_str(&stdout(&o)).ok()?;
    let ms = d["members"].as_array()?;
    if d["state"] != "Stable" || ms.len() != members {
        return None;
    }
    let sets: Vec<BTreeSet<u32>> = ms
        .iter()
        .map(|m| {
            m["assignment"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["partition"].as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    Some(sets)
}

fn wait_stable(b: &Broker, group: &str, members: usize, partitions: usize) -> Vec<BTreeSet<u32>> {
    let mut got = None;
    wait_until(WAIT, "a stable group with every partition assigned", || {
        got = stable(b, group, members)
            .filter(|s| s.iter().map(BTreeSet::len).sum::<usize>() == partitions);
        got.is_some()
    });
    got.unwrap()
}

fn committed(b: &Broker, group: &str) -> BTreeMap<u32, u64> {
    describe(b, group)["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| Some((o["partition"].as_u64()? as u32, o["committed"].as_u64()?)))
        .collect()
}

#[test]
fn three_members_share_a_topic_exactly_once_and_a_restart_reads_only_what_is_new() {
    let b = Broker::start("");
    create(&b, "t6", "6");
    let mut members: Vec<Member> = (0..3).map(|_| Member::start(&b, "t6", "g", &[])).collect();
    let sets = wait_stable(&b, "g", 3, 6);
    assert!(sets.iter().all(|s| s.len() == 2), "{sets:?}");
    produce(&b, "t6", 0, 600);
    wait_until(WAIT, "600 records printed", || {
        members.iter().map(|m| m.printed().len()).sum::<usize>() >= 600
    });
    let mut all = BTreeSet::new();
    for m in &members {
        for r in m.printed() {
            assert!(all.insert(r), "{r:?} printed twice");
        }
    }
    assert_eq!(all.len(), 600);
    for m in &mut members {
        assert_eq!(m.signal(libc::SIGTERM), Some(0), "a clean exit on SIGTERM");
    }
    let d = describe(&b, "g");
    assert_eq!(
        d["members"].as_array().unwrap().len(),
        0,
        "every member left"
    );
    let offsets = d["offsets"].as_array().unwrap();
    assert_eq!(offsets.len(), 6);
    for o in offsets {
        assert_eq!(o["lag"], 0, "what was printed is committed: {o}");
    }
    // Restarted, the group reads only what was produced since.
    produce(&b, "t6", 600, 60);
    let mut again = Member::start(&b, "t6", "g", &["--timeout-ms", "3000"]);
    assert_eq!(again.wait_exit(), Some(0));
    let printed = again.printed();
    assert_eq!(printed.len(), 60, "{printed:?}");
    let d = describe(&b, "g");
    assert!(d["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["lag"] == 0));
}

#[test]
fn a_killed_member_s_partitions_move_after_the_session_timeout_repeating_only_since_its_last_commit(
) {
    let b = Broker::start("");
    create(&b, "t4", "4");
    let mut a = Member::start_with_session(&b, "t4", "g", SHORT_SESSION_MS, &[]);
    let survivor = Member::start_with_session(&b, "t4", "g", SHORT_SESSION_MS, &[]);
    let sets = wait_stable(&b, "g", 2, 4);
    assert!(sets.iter().all(|s| s.len() == 2));
    produce(&b, "t4", 0, 400);
    wait_until(WAIT, "400 records printed", || {
        a.printed().len() + survivor.printed().len() >= 400
    });
    // Commits are at most a second apart: this is at or below the last.
    std::thread::sleep(Duration::from_millis(1500));
    let before = committed(&b, "g");
    a.signal(libc::SIGKILL);
    let a_printed: BTreeSet<(u32, u64)> = a.printed().into_iter().collect();
    produce(&b, "t4", 400, 400);
    let killed = std::time::Instant::now();
    wait_until(WAIT, "one member holding all four partitions", || {
        stable(&b, "g", 1).is_some_and(|s| s[0].len() == 4)
    });
    assert!(
        killed.elapsed() >= Duration::from_millis(2000),
        "not before the session timeout"
    );
    wait_until(WAIT, "every record printed", || {
        let mut all: BTreeSet<(u32, u64)> = a_printed.clone();
        all.extend(survivor.printed());
        all.len() >= 800
    });
    let mut seen = BTreeSet::new();
    for r in survivor.printed() {
        if !seen.insert(r) {
            panic!("{r:?} printed twice by the survivor");
        }
        if a_printed.contains(&r) {
            // A repeat: only what the killed member printed after its
            // last commit.
            assert!(
                r.1 >= before[&r.0],
                "{r:?} repeated from before the commit {before:?}"
            );
        }
    }
}

#[test]
fn a_fourth_member_under_cooperative_sticky_moves_only_what_it_takes() {
    let b = Broker::start("");
    create(&b, "t6", "6");
    let _m: Vec<Member> = (0..3).map(|_| Member::start(&b, "t6", "g", &[])).collect();
    let before = describe_assignment(&b, "g", 3);
    let _fourth = Member::start(&b, "t6", "g", &[]);
    let after = describe_assignment(&b, "g", 4);
    let mut moved = 0;
    for (id, old) in &before {
        let new = &after[id];
        assert!(
            new.is_subset(old),
            "{id}: kept partitions only, {old:?} -> {new:?}"
        );
        moved += old.len() - new.len();
    }
    let newcomer: Vec<&BTreeSet<u32>> = after
        .iter()
        .filter(|(id, _)| !before.contains_key(*id))
        .map(|(_, s)| s)
        .collect();
    assert_eq!(newcomer.len(), 1);
    assert!(!newcomer[0].is_empty());
    assert_eq!(
        moved,
        newcomer[0].len(),
        "only what the newcomer took moved"
    );
}

/// member id -> partitions, once the group is stable with `n` members
/// and all 6 partitions assigned.
fn describe_assignment(b: &Broker, group: &str, n: usize) -> BTreeMap<String, BTreeSet<u32>> {
    wait_stable(b, group, n, 6);
    describe(b, group)["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["member_id"].as_str().unwrap().to_owned(),
                m["assignment"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["partition"].as_u64().unwrap() as u32)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn commits_survive_a_broker_restart_and_a_kill_9() {
    let mut b = Broker::start("");
    create(&b, "t2", "2");
    produce(&b, "t2", 0, 50);
    let mut m = Member::start(&b, "t2", "g", &["--count", "50"]);
    assert_eq!(m.wait_exit(), Some(0));
    let want = committed(&b, "g");
    assert_eq!(want.values().sum::<u64>(), 50, "{want:?}");
    b.stop();
    b.restart();
    assert_eq!(committed(&b, "g"), want);
    // An acknowledged reset is durable at once: kill -9 right after it.
    assert_ok(&b.cli(&["groups", "reset-offsets", "g", "--topic", "t2", "--to", "3"]));
    b.kill9();
    b.restart();
    assert_eq!(committed(&b, "g"), BTreeMap::from([(0, 3), (1, 3)]));
    let listed = stdout(&b.cli(&["topics", "list"]));
    assert!(
        !listed.contains("__skiff"),
        "the offsets topic is internal: {listed}"
    );
}

/// A join to group "g" with the range assignor and 10 s timeouts.
fn join_request(
    member_id: Option<String>,
    topics: Vec<String>,
    owned: Vec<GroupPartition>,
    client: Option<String>,
) -> JoinGroupRequest {
    JoinGroupRequest {
        group: "g".into(),
        member_id,
        instance_id: None,
        topics,
        assignor: "range".into(),
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 10_000,
        owned,
        client,
    }
}

/// A member lives in the coordinator's memory until its session ends, so
/// a join that would pin much of a frame there is refused, and the group
/// still takes a member at the limits.
#[test]
fn a_join_bringing_too_much_is_refused_with_the_limit_named() {
    let b = Broker::start("[server]\nmax_topics = 4\n");
    create(&b, "t2", "2");
    smol::block_on(async {
        let c = Client::connect(&b.tcp).await.unwrap();
        let join = |topics, client| join_request(None, topics, vec![], client);
        let refused = |topics, client| {
            let c = &c;
            let request = join(topics, client);
            async move {
                let e = c.join_group(request).await.unwrap_err();
                assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
                e.to_string()
            }
        };
        let five = (0..5).map(|i| format!("t{i}")).collect();
        let e = refused(five, None).await;
        assert!(e.contains("at most 4 topics (server.max_topics)"), "{e}");
        let e = refused(vec!["t2".into(), "x".repeat(60_000)], None).await;
        assert!(e.contains("is not a topic name") && e.len() < 300, "{e}");
        let e = refused(vec!["t2".into()], Some("c".repeat(60_000))).await;
        assert!(e.contains("client name is at most 512 bytes"), "{e}");
        let four = (1..5).map(|i| format!("t{i}")).collect();
        let ok = c
            .join_group(join(four, Some("c".repeat(400))))
            .await
            .expect("a member at the limits joins");
        assert_eq!(ok.members, 1);
    });
}

/// `groups.max_groups` and `groups.max_members_per_group` have their own
/// codes from protocol version 4 (`too_many_members` retriable, since a
/// member leaving frees its slot); a version 3 client still gets
/// `invalid_request`, with the same message naming the limit.
#[test]
fn joins_past_the_group_limits_are_typed_for_version_4_and_invalid_request_before() {
    let b = Broker::start("[groups]\nmax_groups = 1\nmax_members_per_group = 1\n");
    create(&b, "t", "1");
    let join = |group: &str| JoinGroupRequest {
        group: group.into(),
        // The first member must outlive the test on a busy machine.
        session_timeout_ms: 300_000,
        ..join_request(None, vec!["t".into()], vec![], None)
    };
    let refusals = [
        ("g", "group 'g' is full: groups.max_members_per_group is 1"),
        ("h", "too many groups: groups.max_groups is 1"),
    ];
    smol::block_on(async {
        let c = Client::connect(&b.tcp).await.unwrap();
        assert_eq!(c.server_info().await.unwrap().version, 4);
        c.join_group(join("g")).await.expect("the first member");
        for ((group, message), code) in refusals
            .iter()
            .zip([ErrorCode::TooManyMembers, ErrorCode::TooManyGroups])
        {
            let e = c.join_group(join(group)).await.unwrap_err();
            assert_eq!(e.code(), Some(code), "{e}");
            assert_eq!(e.is_retriable(), code == ErrorCode::TooManyMembers);
            assert!(e.to_string().contains(message), "{e}");
        }
    });
    let mut old = RawConn::connect_as_version(&b.tcp, 3);
    for (i, (group, message)) in refusals.iter().enumerate() {
        let body = RequestBody::JoinGroup(join(group));
        let got = old.request_error(2 + i as u32, body, ErrorCode::InvalidRequest);
        assert_eq!(got, *message);
    }
}

#[test]
fn a_stale_generation_an_unknown_member_and_a_partition_not_owned_are_refused() {
    let b = Broker::start("");
    create(&b, "t2", "2");
    smol::block_on(async {
        let c = Client::connect(&b.tcp).await.unwrap();
        let join = |member_id, owned| join_request(member_id, vec!["t2".into()], owned, None);
        let a = c.join_group(join(None, vec![])).await.unwrap();
        assert_eq!(a.generation, 1);
        let sa = c.sync_group("g", &a.member_id, 1).await.unwrap();
        assert_eq!(sa.assignment.len(), 2);
        // A second member: a learns of the rebalance and joins again
        // holding both partitions.
        let c2 = Client::connect(&b.tcp).await.unwrap();
        let second = smol::spawn(async move { c2.join_group(join(None, vec![])).await });
        let mut code = None;
        for _ in 0..100 {
            smol::Timer::after(Duration::from_millis(20)).await;
            if let Err(e) = c.heartbeat("g", &a.member_id, 1).await {
                code = e.code();
                break;
            }
        }
        assert_eq!(code, Some(ErrorCode::RebalanceInProgress));
        let a2 = c
            .join_group(join(Some(a.member_id.clone()), sa.assignment.clone()))
            .await
            .unwrap();
        let b2 = second.await.unwrap();
        assert_eq!((a2.generation, b2.generation), (2, 2));
        let commit = |p: u32| {
            vec![OffsetCommitPartition {
                topic: "t2".into(),
                partition: p,
                offset: 1,
                metadata: None,
            }]
        };
        let stale = c
            .commit_offsets("g", Some((&a.member_id, 1)), commit(0))
            .await;
        assert_eq!(
            stale.unwrap_err().code(),
            Some(ErrorCode::IllegalGeneration)
        );
        let unknown = c.commit_offsets("g", Some(("nobody", 2)), commit(0)).await;
        assert_eq!(
            unknown.unwrap_err().code(),
            Some(ErrorCode::UnknownMemberId)
        );
        // b holds nothing yet: a gives a partition up first.
        let not_owner = c
            .commit_offsets("g", Some((&b2.member_id, 2)), commit(0))
            .await;
        assert_eq!(not_owner.unwrap_err().code(), Some(ErrorCode::NotOwner));
        // a may commit both in generation 2 (one it is giving up).
        c.commit_offsets("g", Some((&a.member_id, 2)), commit(0))
            .await
            .unwrap();
        c.commit_offsets("g", Some((&a.member_id, 2)), commit(1))
            .await
            .unwrap();
        // Without a member, while the group has members: refused.
        let admin = c.commit_offsets("g", None, commit(0)).await;
        assert_eq!(admin.unwrap_err().code(), Some(ErrorCode::GroupNotEmpty));
    });
}

#[test]
fn lag_follows_the_producers_in_describe_and_in_the_metrics() {
    let b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    create(&b, "t1", "1");
    produce(&b, "t1", 0, 100);
    // A member reads 40 and commits them.
    let mut m = Member::start(&b, "t1", "g", &["--count", "40"]);
    assert_eq!(m.wait_exit(), Some(0));
    let lag = |b: &Broker| describe(b, "g")["offsets"][0]["lag"].as_u64();
    assert_eq!(lag(&b), Some(60));
    for round in 1..=3u32 {
        produce(&b, "t1", 100 * round, 50);
        assert_eq!(lag(&b), Some(60 + 50 * u64::from(round)));
    }
    // Read when scraped: right at once, not a timer's tick later.
    let body = http_get(&b.metrics_addr(), "/metrics");
    assert!(
        body.lines().any(|l| {
            l.starts_with("skiff_group_lag_records{")
                && l.contains("group=\"g\"")
                && l.ends_with(" 210")
        }),
        "the lag gauge at 210 in:\n{body}"
    );
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
fn reset_and_delete_are_refused_on_an_active_group_and_unknown_groups_fail_in_one_line() {
    let b = Broker::start("");
    create(&b, "t2", "2");
    for args in [
        &["groups", "describe", "nope"][..],
        &["groups", "delete", "nope"],
        &[
            "groups",
            "reset-offsets",
            "nope",
            "--topic",
            "t2",
            "--to",
            "earliest",
        ],
    ] {
        assert_fails(&b.cli(args), 1, &["unknown group", "nope"]);
    }
    let mut m = Member::start(&b, "t2", "g", &[]);
    wait_stable(&b, "g", 1, 2);
    assert_fails(&b.cli(&["groups", "delete", "g"]), 1, &["g", "member"]);
    assert_fails(
        &b.cli(&[
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "t2",
            "--to",
            "latest",
        ]),
        1,
        &["g", "member"],
    );
    assert!(stdout(&b.cli(&["groups", "list"])).contains("g\tStable\t1 member(s)"));
    assert_eq!(m.signal(libc::SIGINT), Some(0), "a clean exit on SIGINT");
    produce(&b, "t2", 0, 10);
    assert_ok(&b.cli(&[
        "groups",
        "reset-offsets",
        "g",
        "--topic",
        "t2",
        "--to",
        "latest",
    ]));
    assert_eq!(committed(&b, "g").values().sum::<u64>(), 10);
    assert_ok(&b.cli(&["groups", "delete", "g"]));
    assert_fails(&b.cli(&["groups", "describe", "g"]), 1, &["unknown group"]);
}

#[test]
fn group_requests_need_the_group_operation_on_the_group_and_consume_on_the_topic() {
    // Plaintext TCP: every client is "anonymous".
    let b = Broker::start(
        "[acl]\nenabled = true\n\
         [[acl.rules]]\nidentity = \"anonymous\"\ntopics = [\"*\"]\n\
         operations = [\"create\", \"describe\", \"produce\"]\n\
         [[acl.rules]]\nidentity = \"anonymous\"\ntopics = [\"open\"]\noperations = [\"consume\"]\n\
         [[acl.rules]]\nidentity = \"anonymous\"\ntopics = [\"dash-*\"]\noperations = [\"group\"]\n",
    );
    create(&b, "open", "1");
    create(&b, "closed", "1");
    let mut ok = Member::start(&b, "open", "dash-1", &["--timeout-ms", "500"]);
    assert_eq!(ok.wait_exit(), Some(0));
    let o = b.cli(&["consume", "open", "--group", "other", "--timeout-ms", "500"]);
    assert_fails(&o, 1, &["not_authorized", "group", "other"]);
    let o = b.cli(&[
        "consume",
        "closed",
        "--group",
        "dash-2",
        "--timeout-ms",
        "500",
    ]);
    assert_fails(&o, 1, &["not_authorized", "consume", "closed"]);
    assert_fails(
        &b.cli(&["groups", "describe", "other"]),
        1,
        &["not_authorized"],
    );
}

/// Records the partitions a rebalance takes from the member.
struct Revoked(Arc<Mutex<Vec<(String, u32)>>>);

impl skiff::client::RebalanceListener for Revoked {
    fn revoked(&mut self, partitions: &[(String, u32)]) {
        self.0.lock().unwrap().extend_from_slice(partitions);
    }
}

/// A library member of group g reading `topic` from the start, which
/// commits only when told and leaves after `max_poll_interval` without a
/// poll.
fn manual_member(topic: &str, max_poll_interval: Duration) -> skiff::client::GroupConfig {
    let mut cfg = skiff::client::GroupConfig::new("g", &[topic]);
    cfg.start_from = skiff::client::StartFrom::Earliest;
    cfg.auto_commit_interval = None;
    cfg.session_timeout = Duration::from_secs(10);
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.max_poll_interval = max_poll_interval;
    cfg.consumer.max_wait = Duration::from_millis(100);
    cfg
}

#[test]
fn the_library_member_commits_only_what_is_marked_and_leaves_when_it_stops_polling() {
    let b = Broker::start("");
    create(&b, "t2", "2");
    produce(&b, "t2", 0, 20);
    smol::block_on(async {
        // Longer than a `skiff groups describe` takes on a busy machine,
        // so the checks below do not themselves make the member leave.
        let mut cfg = manual_member("t2", Duration::from_millis(2000));
        cfg.mark_on_poll = false;
        let mut m = skiff::client::GroupConsumer::connect(&b.tcp, cfg)
            .await
            .unwrap();
        let revoked = Arc::new(Mutex::new(Vec::new()));
        m.set_listener(Box::new(Revoked(revoked.clone())));
        let deadline = std::time::Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "read {} of 20",
                got.len()
            );
            got.extend(m.poll().await.unwrap());
        }
        let last_poll = std::time::Instant::now();
        // Only the first record of each partition is marked as processed.
        let mut marked = BTreeMap::new();
        for r in &got {
            marked.entry(r.partition).or_insert(r.offset);
        }
        for (&p, &o) in &marked {
            m.mark_consumed("t2", p, o);
        }
        m.commit().await.unwrap();
        let want: BTreeMap<u32, u64> = marked.iter().map(|(&p, &o)| (p, o + 1)).collect();
        assert_eq!(
            committed(&b, "g"),
            want,
            "what was marked, not what was fetched"
        );
        // No poll for longer than max_poll_interval: the member leaves.
        wait_until(WAIT, "the idle member leaves the group", || {
            describe(&b, "g")["members"].as_array().unwrap().is_empty()
        });
        // Less the length of that last poll.
        assert!(
            last_poll.elapsed() >= Duration::from_millis(1800),
            "not before the max poll interval"
        );
        // The next poll joins again and resumes from the commit.
        let deadline = std::time::Instant::now() + WAIT;
        let mut again = Vec::new();
        while again.len() < 18 {
            assert!(
                std::time::Instant::now() < deadline,
                "read {} of 18 again",
                again.len()
            );
            again.extend(m.poll().await.unwrap());
        }
        assert!(again.iter().all(|r| r.offset >= want[&r.partition]));
        // Polling keeps it in the group, which settles with both partitions.
        let deadline = std::time::Instant::now() + WAIT;
        while stable(&b, "g", 1).map(|s| s[0].len()) != Some(2) {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                describe(&b, "g")
            );
            again.extend(m.poll().await.unwrap());
        }
        m.close().await.unwrap();
    });
}

/// A member that left the group for want of polls holds nothing: a
/// commit of what it consumed before is refused, not answered OK with
/// nothing committed (after which `skiff consume --group` exited 0 and
/// the next member printed the same records again).
#[test]
fn a_commit_after_the_member_left_for_want_of_polls_is_refused() {
    let b = Broker::start("");
    create(&b, "t1", "1");
    produce(&b, "t1", 0, 5);
    smol::block_on(async {
        let cfg = manual_member("t1", Duration::from_millis(500));
        let mut m = skiff::client::GroupConsumer::connect(&b.tcp, cfg)
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < 5 {
            assert!(std::time::Instant::now() < deadline, "read {}", got.len());
            got.extend(m.poll().await.unwrap());
        }
        wait_until(WAIT, "the idle member leaves the group", || {
            m.membership().is_none()
        });
        let e = m.commit().await.expect_err("nothing was committed");
        assert_eq!(e.code(), Some(ErrorCode::UnknownMemberId), "{e}");
        let e = m.close().await.expect_err("nothing was committed");
        assert_eq!(e.code(), Some(ErrorCode::UnknownMemberId), "{e}");
    });
}

/// Heartbeats that cross a member's own join must not start yet another
/// rebalance: with them, a slow machine once went through 60 generations
/// in 30 s, each moving nothing, and consumers stalled meanwhile.
#[test]
fn heartbeats_crossing_a_join_do_not_start_another_rebalance() {
    let b = Broker::start("");
    create(&b, "t6", "6");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let members: Vec<_> = (0..3)
        .map(|_| {
            let (addr, stop) = (b.tcp.clone(), stop.clone());
            std::thread::spawn(move || {
                smol::block_on(async {
                    let mut cfg = skiff::client::GroupConfig::new("g", &["t6"]);
                    cfg.session_timeout = Duration::from_secs(10);
                    // A heartbeat is nearly always in flight during a join.
                    cfg.heartbeat_interval = Duration::from_millis(2);
                    cfg.consumer.max_wait = Duration::from_millis(20);
                    let mut m = skiff::client::GroupConsumer::connect(&addr, cfg)
                        .await
                        .unwrap();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        m.poll().await.unwrap();
                    }
                    m.close().await.unwrap();
                })
            })
        })
        .collect();
    wait_stable(&b, "g", 3, 6);
    let settled = describe(&b, "g")["generation"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let d = describe(&b, "g");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for m in members {
        m.join().unwrap();
    }
    assert_eq!(d["state"], "Stable", "{d}");
    assert_eq!(
        d["generation"].as_u64().unwrap(),
        settled,
        "no rebalance once every partition was assigned: {d}"
    );
}

/// Offsets of the records one `consume --group` run printed, until a
/// second without a record.
fn consume_once(b: &Broker, topic: &str, group: &str) -> Vec<u64> {
    let mut args = vec!["consume", topic, "--group", group];
    args.extend("--from earliest --format json --timeout-ms 1000".split(' '));
    let o = b.cli(&args);
    assert_ok(&o);
    json_lines(&o)
        .iter()
        .map(|v| v["offset"].as_u64().unwrap())
        .collect()
}

/// A committed offset past the log's end (stored before reset-offsets
/// kept offsets inside the log) sends the member back to the earliest
/// record, and it commits from there: without that it printed the same
/// records on every run, and skipped the ones written later below the
/// old offset.
#[test]
fn a_member_whose_committed_offset_is_past_the_end_commits_from_where_it_was_reset() {
    let b = Broker::start("");
    create(&b, "t", "1");
    produce(&b, "t", 0, 3);
    smol::block_on(async {
        let c = Client::connect(&b.tcp).await.unwrap();
        let commit = vec![OffsetCommitPartition {
            topic: "t".into(),
            partition: 0,
            offset: 10,
            metadata: None,
        }];
        c.commit_offsets("g", None, commit).await.unwrap();
    });
    assert_eq!(consume_once(&b, "t", "g"), vec![0, 1, 2]);
    assert_eq!(committed(&b, "g")[&0], 3);
    assert_eq!(consume_once(&b, "t", "g"), Vec::<u64>::new(), "read once");
    produce(&b, "t", 3, 2);
    assert_eq!(consume_once(&b, "t", "g"), vec![3, 4], "nothing skipped");

    // The topic deleted and made again: the group's offset (5) goes with
    // it, and the member starts at --from.
    assert_ok(&b.cli(&["topics", "delete", "t"]));
    create(&b, "t", "1");
    produce(&b, "t", 0, 2);
    assert_eq!(consume_once(&b, "t", "g"), vec![0, 1]);
    assert_eq!(committed(&b, "g")[&0], 2);
    produce(&b, "t", 2, 4);
    assert_eq!(consume_once(&b, "t", "g"), vec![2, 3, 4, 5]);
}

/// A topic deleted and made again by the name is a new log: the group's
/// offsets of the old one are deleted with it, so a member reads the new
/// one from `--from`, not from an old offset that the new log has passed
/// by the time the member comes (which skipped the records below it).
#[test]
fn a_topic_deleted_and_made_again_is_not_read_from_the_old_topic_s_offsets() {
    let b = Broker::start("");
    create(&b, "t", "1");
    produce(&b, "t", 0, 5);
    assert_eq!(consume_once(&b, "t", "g"), vec![0, 1, 2, 3, 4]);
    assert_eq!(committed(&b, "g")[&0], 5);
    assert_ok(&b.cli(&["topics", "delete", "t"]));
    create(&b, "t", "1");
    produce(&b, "t", 0, 8);
    assert_eq!(consume_once(&b, "t", "g"), (0..8).collect::<Vec<u64>>());
}

#[test]
fn reset_offsets_keeps_an_explicit_offset_inside_the_log() {
    let b = Broker::start("");
    create(&b, "t", "2");
    smol::block_on(async {
        let c = Client::connect(&b.tcp).await.unwrap();
        let producer = Producer::new(c, ProducerConfig::default()).await.unwrap();
        for p in [0, 0, 0, 1] {
            producer.send_to("t", p, None, b"x", &[]).await.unwrap();
        }
    });
    assert_eq!(consume_once(&b, "t", "g").len(), 4);
    let o = b.cli(&["groups", "reset-offsets", "g", "--topic", "t", "--to", "2"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "g t/0: 2\ng t/1: 1\n");
    assert_eq!(
        stderr(&o),
        "skiff: t/1: offset 2 is past the log end 1: set to 1\n"
    );
    assert_eq!(committed(&b, "g"), BTreeMap::from([(0, 2), (1, 1)]));
    assert_eq!(consume_once(&b, "t", "g"), vec![2]);
}

const MIB: u64 = 1024 * 1024;
/// Topics of four 1 MiB segments a partition.
const RINGS_OF_4_MIB: &str = "[topic_defaults]\nsegment_bytes = 1048576\nsegments = 4\n";

/// `storage.disk_budget_bytes` and what is reserved of it, as `topics
/// list` gives them.
fn disk_use(b: &Broker) -> (u64, u64) {
    let o = b.cli(&["topics", "list", "--format", "json"]);
    assert_ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{k} in {j}"));
    (n("disk_budget_bytes"), n("disk_reserved_bytes"))
}

/// The offsets topic is made at the first commit, but its room (and that
/// of the broker's other topics) is kept in storage.disk_budget_bytes from
/// the first start: a topic that would take it is refused when it is
/// created, and a commit made with the budget full finds it. The budget
/// used to count only topics made: the topic was created, and the group
/// commit then refused with storage_full.
#[test]
fn the_disk_budget_keeps_the_offsets_topic_s_room_from_the_start() {
    let budget = 16 * MIB + INTERNAL_TOPICS_DISK_BYTES;
    let b = Broker::start(&format!(
        "[storage]\ndisk_budget_bytes = {budget}\n{RINGS_OF_4_MIB}"
    ));
    assert_eq!(disk_use(&b), (budget, INTERNAL_TOPICS_DISK_BYTES));
    create(&b, "a", "4");
    assert_eq!(disk_use(&b), (budget, budget));
    // 4 MiB more: it would fit, were the broker's own topics not counted.
    assert_fails(
        &b.cli(&["topics", "create", "b"]),
        1,
        &["storage_full", "disk limit", &budget.to_string()],
    );
    assert_ok(&b.cli(&["produce", "a", "--partition", "0", "x", "y", "z"]));
    let consume = [
        "consume", "a", "--group", "g", "--from", "earliest", "--count", "3",
    ];
    assert_ok(&b.cli(&consume));
    assert_eq!(committed(&b, "g").get(&0), Some(&3));
    // The room kept for the offsets topic is what it took.
    assert_eq!(disk_use(&b), (budget, budget));
}

/// A data directory whose topics leave the broker's own too little room
/// (made under a larger budget, or by a version that did not keep it):
/// start-up still serves, and says so naming them; a commit is refused
/// with storage_full naming the budget.
#[test]
fn topics_that_leave_no_room_for_the_offsets_topic_are_reported_at_start_up() {
    let mut first = Broker::start(RINGS_OF_4_MIB);
    create(&first, "a", "4");
    assert_ok(&first.cli(&["produce", "a", "--partition", "0", "x", "y", "z"]));
    assert_eq!(first.stop(), Some(0));
    // The topics' 16 MiB and a default topic's 4 MiB, as config check
    // asks; not the 14 MiB of the broker's own besides the topics.
    let b = Broker::start_on(
        first.data_dir(),
        &format!(
            "[storage]\ndisk_budget_bytes = {}\n{RINGS_OF_4_MIB}",
            20 * MIB
        ),
    );
    let log = b.log();
    assert!(
        log.contains("more than storage.disk_budget_bytes")
            && log.contains("__skiff_offsets, __skiff_txn, __skiff_share"),
        "{log}"
    );
    commit_refused_and_the_rest_serves(&b, &["storage_full", "storage.disk_budget_bytes"]);
}

/// A group commit on topic "a" (3 records in partition 0) is refused with
/// `wants` in its message, after the records are printed: a stop that
/// could not commit (75); reading the records without a group works.
fn commit_refused_and_the_rest_serves(b: &Broker, wants: &[&str]) {
    let o = b.cli(&[
        "consume", "a", "--group", "g", "--from", "earliest", "--count", "3",
    ]);
    let not_committed = ["offsets not committed", "re-reads from the last commit"];
    assert_fails(&o, 75, &[wants, &not_committed[..]].concat());
    assert_eq!(stdout(&o).lines().count(), 3);
    let o = b.cli(&["consume", "a", "--partition", "0", "--timeout-ms", "1000"]);
    assert_ok(&o);
    assert_eq!(stdout(&o).lines().count(), 3);
}

/// Topic names as `topics list` gives them.
fn listed(b: &Broker) -> Vec<String> {
    let o = b.cli(&["topics", "list"]);
    assert_ok(&o);
    stdout(&o).lines().map(str::to_owned).collect()
}

/// The broker's own topics are made at their first use, but each keeps a
/// topic slot and a partition of server.max_topics/max_partitions from
/// the first start, as it keeps its disk: a topic that would take them is
/// refused when it is created, saying why, and a commit made with the
/// limits full finds its slot. The limits used to count only topics made:
/// the topic was created, and the group commit then refused.
#[test]
fn the_topic_limits_keep_the_offsets_topic_s_slot_from_the_start() {
    // Room for two topics of 5 partitions between them, besides the 3
    // (one partition each) kept for the broker's own.
    let b = Broker::start("[server]\nmax_topics = 5\nmax_partitions = 8\n");
    create(&b, "a", "4");
    let kept = ["of which 3", "__skiff_offsets, __skiff_txn, __skiff_share"];
    // 6 partitions of 8: it would fit, were the broker's own not counted.
    let o = b.cli(&["topics", "create", "b", "--partitions", "2"]);
    assert_fails(
        &o,
        1,
        &[
            &["too_many_partitions", "server.max_partitions 8"][..],
            &kept,
        ]
        .concat(),
    );
    create(&b, "b", "1");
    let o = b.cli(&["topics", "create", "c"]);
    assert_fails(
        &o,
        1,
        &[&["too_many_topics", "server.max_topics 5"][..], &kept].concat(),
    );
    assert_eq!(listed(&b), ["a", "b"]);
    assert_ok(&b.cli(&["produce", "a", "--partition", "0", "x", "y", "z"]));
    let consume = [
        "consume", "a", "--group", "g", "--from", "earliest", "--count", "3",
    ];
    assert_ok(&b.cli(&consume));
    assert_eq!(committed(&b, "g").get(&0), Some(&3));
    // The offsets topic took its own slot, no other: the two still kept
    // are named, and no user topic got in.
    let o = b.cli(&["topics", "create", "c"]);
    assert_fails(
        &o,
        1,
        &[
            "too_many_topics",
            "of which 2",
            "__skiff_txn, __skiff_share",
        ],
    );
    assert!(!stderr(&o).contains("__skiff_offsets"), "{}", stderr(&o));
}

/// A data directory whose topics already take the slots the broker keeps
/// for its own (made under larger limits, or by a version that did not
/// keep them): start-up still serves, and says so naming them; a commit
/// is refused with too_many_topics naming the limit.
#[test]
fn topics_that_take_the_offsets_topic_s_slot_are_reported_at_start_up() {
    let mut first = Broker::start("");
    create(&first, "a", "1");
    create(&first, "b", "1");
    assert_ok(&first.cli(&["produce", "a", "--partition", "0", "x", "y", "z"]));
    assert_eq!(first.stop(), Some(0));
    // One topic and the broker's own 3, as config check asks; not the two
    // topics there are.
    let b = Broker::start_on(
        first.data_dir(),
        "[server]\nmax_topics = 4\nmax_partitions = 8\n",
    );
    let log = b.log();
    assert!(
        log.contains("the topics hold 2 topics")
            && log.contains("server.max_topics (4)")
            && log.contains("__skiff_offsets, __skiff_txn, __skiff_share"),
        "{log}"
    );
    assert!(!log.contains("server.max_partitions"), "{log}");
    commit_refused_and_the_rest_serves(&b, &["too_many_topics", "server.max_topics 4"]);
    assert_eq!(listed(&b), ["a", "b"]);
}

/// A second SIGTERM while `skiff consume --group` commits and leaves after
/// the first (on a broker that does not answer) ends it at once with 130.
/// Before, it was ignored: the member waited out the client's timeouts and
/// then exited 0.
#[test]
fn a_second_sigterm_ends_a_leaving_group_member_at_once() {
    let b = Broker::start("");
    create(&b, "t", "1");
    let mut m = Member::start(&b, "t", "g", &[]);
    wait_stable(&b, "g", 1, 1);
    // Its commit and leave, after the first signal, get no answer.
    b.pause();
    let pid = m.child.as_ref().expect("running").id() as i32;
    sigterm_taken(pid, &m.stderr, WAIT);
    let code = m.signal(libc::SIGTERM);
    b.resume();
    assert_eq!(code, Some(130));
}

/// Whether a thread of `pid` is blocked writing to a full pipe.
fn writing_to_a_pipe(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.contains("pipe_write"))
        })
    })
}

/// `consume t --group g` printing JSON lines into a pipe, its stderr into
/// `err`.
fn spawn_piped_member(b: &Broker, err: &std::path::Path) -> Child {
    skiff_command()
        .args(["consume", "t", "--group", "g", "--format", "json"])
        .args(["--session-timeout-ms", SESSION_MS, "--from", "earliest"])
        .args(["--broker", &b.tcp])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .unwrap()
}

/// How `child` exited, if within `limit`; else it is killed.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The offset `group` committed on partition 0; 0 for none (a group that
/// never committed is gone with its member's session).
fn committed_on_0_or_none(b: &Broker, group: &str) -> u64 {
    let o = b.cli(&["groups", "describe", group, "--format", "json"]);
    if stderr(&o).contains("unknown group") {
        0
    } else {
        committed(b, group).get(&0).copied().unwrap_or(0)
    }
}

/// `consume --group` stopped by SIGTERM while its broker does not answer
/// (SIGSTOPped) cannot commit what it printed since its last commit: it
/// says so, and that the next member prints those records again, and
/// exits 75. Before, it exited 1 with a bare "timed out", as for a failure.
#[test]
fn a_stop_that_cannot_commit_says_so_and_exits_75() {
    use std::io::Read as _;
    let mut b = Broker::start("");
    create(&b, "t", "1");
    // More than its stdout pipe holds, as JSON lines.
    produce(&b, "t", 0, 3000);
    let err = b.dir.path().join("member.stderr");
    let mut child = spawn_piped_member(&b, &err);
    let mut out = child.stdout.take().unwrap();
    let read = || std::fs::read_to_string(&err).unwrap_or_default();
    // A full pipe: it waits to print the rest of a poll, whose first
    // records are printed and not committed (it commits between polls).
    let pid = child.id() as i32;
    wait_until(WAIT, "the member to block writing to stdout", || {
        writing_to_a_pipe(pid)
    });
    b.pause();
    sigterm_taken(pid, &err, WAIT);
    // It prints the rest of the poll, then stops and commits.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s.lines().count() as u64
    });
    // The client's request timeout (30 s) is what it waits out.
    let Some(status) = exit_within(&mut child, 4 * WAIT) else {
        b.resume();
        panic!("the member did not stop: {}", read());
    };
    // The unanswered commit waits unread in the broker's socket: resumed,
    // the broker could still take it (under qemu it did). Killed while
    // stopped, it never does, and the restart shows the last commit made
    // before the pause.
    b.kill9();
    b.restart();
    let printed = reader.join().unwrap();
    let said = read();
    assert_eq!(status.code(), Some(75), "{said}");
    assert!(
        said.contains("skiff: consume t --group g: stopped; offsets maybe not committed: the broker did not answer the commit in time; the next member re-reads from the last commit it took"),
        "{said}"
    );
    // As said: the last commit is short of what was printed. (A group
    // that never committed is gone with its member's session.)
    let at = committed_on_0_or_none(&b, "g");
    assert!(at < printed, "committed {at} of {printed} printed");
}

/// `consume --group` whose reader goes away mid-poll commits only records
/// whose bytes it flushed to stdout. Before, each record was marked as soon
/// as it went into the buffered stdout, and the close after the failed
/// write committed the ones still in the buffer and the rest of the poll
/// before them: the next member skipped records nobody read.
#[test]
fn a_member_whose_stdout_closes_commits_only_what_reached_it() {
    use std::io::Read as _;
    let b = Broker::start("");
    create(&b, "t", "1");
    // One poll of JSON lines several times what a pipe holds (64 KiB), so
    // a write fails once the reader is gone.
    produce(&b, "t", 0, 3000);
    let err = b.dir.path().join("member.stderr");
    let mut child = spawn_piped_member(&b, &err);
    let mut out = child.stdout.take().unwrap();
    let mut got = vec![0u8; 16 * 1024];
    out.read_exact(&mut got).unwrap();
    // Complete lines only: a record cut short was not read either.
    let read = got.iter().filter(|&&c| c == b'\n').count() as u64;
    drop(out);
    let status = exit_within(&mut child, WAIT);
    let said = std::fs::read_to_string(&err).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the member did not stop: {said}"));
    assert_eq!(status.code(), Some(0), "{said}");
    let at = committed_on_0_or_none(&b, "g");
    assert!(at <= read, "committed {at} with {read} records read");
}
