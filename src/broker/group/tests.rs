//! The coordinator over a real broker (pwrite files): membership,
//! generations, hand-over, commits and their durability.

use super::*;
use crate::broker::{BrokerLimits, BrokerOptions, SystemClock};
use crate::storage::tests::{small_cfg, Rig};
use smol::block_on;

fn open(rig: &Rig) -> Arc<Coordinator> {
    open_with(rig, 8)
}

/// A coordinator that keeps `max_members` members of all groups together.
fn open_with(rig: &Rig, max_members: usize) -> Arc<Coordinator> {
    open_retaining(rig, max_members, 60_000)
}

/// A coordinator whose empty groups' offsets expire after `retention_ms`.
fn open_retaining(rig: &Rig, max_members: usize, retention_ms: u64) -> Arc<Coordinator> {
    let c = open_without_log(rig, max_members, retention_ms);
    smol::spawn(c.clone().run_log()).detach();
    c
}

/// A coordinator whose offsets-log writes are made by the test, one at a
/// time ([`serve_one`]).
fn open_without_log(rig: &Rig, max_members: usize, retention_ms: u64) -> Arc<Coordinator> {
    let broker = Broker::open(
        rig.open(),
        BrokerOptions {
            data_dir: rig.dir.path().to_path_buf(),
            limits: BrokerLimits {
                max_topics: 4,
                max_partitions: 8,
                disk_budget_bytes: u64::MAX,
                max_producers: 16,
                producer_idle_expiry_ms: 60_000,
                producer_name_expiry_ms: 604_800_000,
            },
            defaults: small_cfg(),
            default_partitions: 1,
            clock: Arc::new(SystemClock),
            cleaner: crate::broker::cleaner::CleanerLimits::default(),
            internal_topics: Vec::new(),
        },
    )
    .expect("broker opens");
    if broker.topic("t").is_err() {
        let spec = TopicSpec {
            partitions: Some(4),
            ..TopicSpec::default()
        };
        block_on(broker.create_topic("t", &spec)).expect("create");
    }
    Coordinator::open(
        broker,
        GroupsConfig {
            offsets_retention_ms: retention_ms,
            session_timeout_ms_min: 100,
            session_timeout_ms_max: 60_000,
            max_groups: 8,
            max_members,
            max_members_per_group: 8,
            max_metadata: OFFSET_METADATA_BYTES_MAX,
        },
    )
    .expect("coordinator opens")
}

/// Writes and applies the first queued write and answers it, as
/// [`Coordinator::run_log`] does.
fn serve_one(c: &Coordinator) {
    block_on(async {
        let p = c.queued.recv().await.unwrap();
        c.write_round(std::slice::from_ref(&p)).await.unwrap();
        apply(&mut c.lock(), &p.group, &p.entries);
        p.done.try_send(Ok(())).unwrap();
    });
}

fn spec(member_id: Option<&str>, owned: &BTreeSet<Tp>) -> JoinSpec {
    JoinSpec {
        group: "g".into(),
        member_id: member_id.map(str::to_owned),
        instance_id: None,
        client: "test".into(),
        topics: ["t".to_string()].into_iter().collect(),
        assignor: Assignor::CooperativeSticky,
        session_timeout: Duration::from_secs(10),
        rebalance_timeout: Duration::from_secs(10),
        owned: owned.clone(),
    }
}

fn tp(p: u32) -> Tp {
    ("t".to_string(), p)
}

#[test]
fn a_partition_moves_only_after_its_owner_gives_it_up() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    let none = BTreeSet::new();
    let a = block_on(c.join(spec(None, &none))).unwrap();
    assert_eq!(a.generation, 1);
    let sa = c.sync("g", &a.member_id, 1).unwrap();
    assert_eq!(sa.assignment.len(), 4);
    assert!(!sa.rejoin);
    // b joins: a learns of it by heartbeat and rejoins holding all four.
    let cb = c.clone();
    let b = smol::spawn(async move { cb.join(spec(None, &BTreeSet::new())).await });
    let rebalancing = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        matches!(
            c.heartbeat("g", &a.member_id, 1),
            Err(GroupError::RebalanceInProgress(_))
        )
    });
    assert!(rebalancing);
    let a2 = block_on(c.join(spec(Some(&a.member_id), &sa.assignment))).unwrap();
    let b = block_on(b).unwrap();
    assert_eq!((a2.generation, b.generation), (2, 2));
    let sa2 = c.sync("g", &a.member_id, 2).unwrap();
    let sb2 = c.sync("g", &b.member_id, 2).unwrap();
    assert_eq!(sa2.assignment.len(), 2, "a keeps two");
    assert!(sb2.assignment.is_empty(), "b waits until a gives two up");
    assert!(sa2.rejoin && sb2.rejoin);
    // a may still commit what it gives up, in this generation only.
    let given_up: Vec<Tp> = sa.assignment.difference(&sa2.assignment).cloned().collect();
    block_on(c.commit(
        "g",
        Some((&a.member_id, 2)),
        vec![(given_up[0].clone(), 5, None)],
    ))
    .unwrap();
    let stale = block_on(c.commit("g", Some((&a.member_id, 1)), vec![(tp(0), 1, None)]));
    assert!(matches!(
        stale,
        Err(GroupError::IllegalGeneration {
            got: 1,
            current: 2,
            ..
        })
    ));
    let not_b = block_on(c.commit(
        "g",
        Some((&b.member_id, 2)),
        vec![(given_up[0].clone(), 1, None)],
    ));
    assert!(matches!(not_b, Err(GroupError::NotOwner { .. })));
    // Both rejoin; a without the two it gave up.
    let cb = c.clone();
    let bid = b.member_id.clone();
    let b3 = smol::spawn(async move { cb.join(spec(Some(&bid), &BTreeSet::new())).await });
    let a3 = block_on(c.join(spec(Some(&a.member_id), &sa2.assignment))).unwrap();
    assert_eq!(block_on(b3).unwrap().generation, 3);
    let sa3 = c.sync("g", &a.member_id, 3).unwrap();
    let sb3 = c.sync("g", &b.member_id, 3).unwrap();
    assert_eq!(a3.generation, 3);
    assert_eq!(
        sa3.assignment, sa2.assignment,
        "a kept its two: nothing else moved"
    );
    assert_eq!(sb3.assignment, given_up.into_iter().collect());
    assert!(!sa3.rejoin && !sb3.rejoin);
    let d = c.describe("g").unwrap();
    assert_eq!((d.state, d.generation, d.members.len()), ("Stable", 3, 2));
}

#[test]
fn a_silent_member_is_removed_after_its_session_timeout() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    let mut s = spec(None, &BTreeSet::new());
    s.session_timeout = Duration::from_millis(200);
    let a = block_on(c.join(s)).unwrap();
    block_on(c.tick(Instant::now(), now_ms()));
    assert_eq!(c.describe("g").unwrap().members.len(), 1);
    block_on(c.tick(Instant::now() + Duration::from_millis(300), now_ms()));
    // Gone with its last member, as it has no committed offsets.
    assert!(matches!(c.describe("g"), Err(GroupError::UnknownGroup(_))));
    assert!(matches!(
        c.heartbeat("g", &a.member_id, 1),
        Err(GroupError::UnknownMember { .. })
    ));
}

/// The timers tick while a group has members; without, they sleep until
/// the first offsets expire, as long as an idle broker's timers sleep at
/// most, so an idle broker is not woken.
#[test]
fn the_timers_tick_for_members_and_otherwise_sleep_until_offsets_expire() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    let idle = crate::broker::IDLE_TIMERS;
    assert_eq!(block_on(c.tick(Instant::now(), now_ms())), idle, "no group");
    let a = block_on(c.join(spec(None, &BTreeSet::new()))).unwrap();
    assert_eq!(block_on(c.tick(Instant::now(), now_ms())), TICK, "a member");
    c.leave("g", &a.member_id).unwrap();
    block_on(c.commit("g", None, vec![(tp(0), 1, None)])).unwrap();
    // Its offsets expire 60 s after their commit was stamped, which on a
    // slow disk may be a second or more before the commit returns.
    let committed = c.committed("g", None)[0].1.commit_ms;
    assert_eq!(block_on(c.tick(Instant::now(), committed)), idle);
    let due = block_on(c.tick(Instant::now(), committed + 57_000));
    assert!(
        due > Duration::from_secs(2) && due <= Duration::from_secs(3),
        "woken when they expire, not before: {due:?}"
    );
}

#[test]
fn commits_are_durable_batched_and_expire_when_the_group_stays_empty() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    {
        let c = open(&rig);
        // Many concurrent commits share few writes.
        let commits: Vec<_> = (0..50u64)
            .map(|i| {
                let c = c.clone();
                smol::spawn(async move {
                    c.commit("g", None, vec![(tp((i % 4) as u32), i, Some("m".into()))])
                        .await
                })
            })
            .collect();
        for t in commits {
            block_on(t).unwrap();
        }
        let stats = c.stats();
        assert_eq!(stats.commits, 50);
        assert!(stats.log_writes < 50, "{stats:?}");
        block_on(c.commit("other", None, vec![(tp(1), 7, None)])).unwrap();
        block_on(c.delete("other")).unwrap();
        c.broker.close().unwrap();
    }
    let c = open(&rig);
    let got = c.committed("g", None);
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|(_, c)| c.metadata.as_deref() == Some("m")));
    assert!(
        c.committed("other", None).is_empty(),
        "deleted stays deleted"
    );
    assert!(matches!(
        c.describe("other"),
        Err(GroupError::UnknownGroup(_))
    ));
    block_on(c.tick(Instant::now(), now_ms() + 61_000));
    // Expired: deleted now, and after a restart.
    assert!(c.committed("g", None).is_empty());
    c.broker.close().unwrap();
    drop(c);
    let c = open(&rig);
    assert!(c.committed("g", None).is_empty());
}

/// Membership lives in memory: a group whose members were there until
/// the broker stopped emptied at the restart, whatever the age of its
/// last commit (an idle member does not commit again), so its offsets
/// are kept `offsets_retention_ms` from the restart, not from that commit.
#[test]
fn a_restart_does_not_expire_the_offsets_of_a_group_that_had_members() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let retention = 300;
    {
        let c = open_retaining(&rig, 8, retention);
        let a = block_on(c.join(spec(None, &BTreeSet::new()))).unwrap();
        c.sync("g", &a.member_id, 1).unwrap();
        block_on(c.commit("g", Some((&a.member_id, 1)), vec![(tp(0), 5, None)])).unwrap();
        // The member stays, idle, past the retention of its last commit.
        std::thread::sleep(Duration::from_millis(retention + 100));
        c.heartbeat("g", &a.member_id, 1).unwrap();
        block_on(c.tick(Instant::now(), now_ms()));
        assert_eq!(c.committed("g", None).len(), 1, "kept while it has members");
        c.broker.close().unwrap();
    }
    // Taken before the restart: the first tick after it comes no sooner.
    let restarted_ms = now_ms();
    let c = open_retaining(&rig, 8, retention);
    block_on(c.tick(Instant::now(), restarted_ms));
    let got = c.committed("g", None);
    assert_eq!(got.len(), 1, "expired at the restart: {got:?}");
    assert_eq!(got[0].1.offset, 5);
}

/// A topic made again by the name is a new log: the offsets of the
/// deleted one go, and stay gone after a restart.
#[test]
fn a_deleted_topic_s_offsets_are_forgotten_durably() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    {
        let c = open(&rig);
        block_on(c.commit("g", None, vec![(tp(0), 3, None), (tp(1), 4, None)])).unwrap();
        block_on(c.broker.delete_topic("t")).unwrap();
        block_on(c.forget_topic("t")).unwrap();
        assert!(c.committed("g", None).is_empty());
        assert!(matches!(c.describe("g"), Err(GroupError::UnknownGroup(_))));
        c.broker.close().unwrap();
    }
    // Made again by `open`.
    let c = open(&rig);
    assert!(c.committed("g", None).is_empty());
}

/// A commit acknowledged while a delete of its (memberless) group was
/// being written is kept: the delete takes only what it deleted.
#[test]
fn a_delete_keeps_a_commit_acknowledged_after_its_write() {
    use futures_lite::future::poll_once;
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    {
        let c = open_without_log(&rig, 8, 60_000);
        let mut first = Box::pin(c.commit("g", None, vec![(tp(0), 1, None)]));
        assert!(block_on(poll_once(&mut first)).is_none(), "queued");
        serve_one(&c);
        block_on(first).unwrap();
        let mut delete = Box::pin(c.delete("g"));
        assert!(block_on(poll_once(&mut delete)).is_none(), "queued");
        // An operator's reset (or a transaction's offsets) right after.
        let mut reset = Box::pin(c.commit("g", None, vec![(tp(1), 7, None)]));
        assert!(block_on(poll_once(&mut reset)).is_none(), "queued");
        serve_one(&c);
        serve_one(&c);
        block_on(reset).unwrap();
        block_on(delete).unwrap();
        let got: Vec<(Tp, u64)> = c
            .committed("g", None)
            .into_iter()
            .map(|(tp, c)| (tp, c.offset))
            .collect();
        assert_eq!(got, vec![(tp(1), 7)], "the acknowledged reset");
        c.broker.close().unwrap();
    }
    let c = open(&rig);
    assert_eq!(c.committed("g", None).len(), 1, "and after a restart");
}

#[test]
fn a_static_member_back_within_its_session_gets_its_partitions_without_a_rebalance() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    let with_instance = |i: &str| JoinSpec {
        instance_id: Some(i.into()),
        ..spec(None, &BTreeSet::new())
    };
    let a = block_on(c.join(with_instance("pump-1"))).unwrap();
    let sa = c.sync("g", &a.member_id, 1).unwrap();
    // The process restarts: a new join with the same instance id.
    let again = block_on(c.join(with_instance("pump-1"))).unwrap();
    assert_ne!(again.member_id, a.member_id);
    assert_eq!(again.generation, 1, "no rebalance");
    assert_eq!(c.sync("g", &again.member_id, 1).unwrap(), sa);
    // The old id is fenced.
    assert!(matches!(
        c.heartbeat("g", &a.member_id, 1),
        Err(GroupError::UnknownMember { .. })
    ));
    let d = c.describe("g").unwrap();
    assert_eq!((d.state, d.members.len()), ("Stable", 1));
    assert_eq!(d.members[0].instance_id.as_deref(), Some("pump-1"));
}

#[test]
fn bad_joins_are_refused_with_the_reason() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    let mut s = spec(None, &BTreeSet::new());
    s.session_timeout = Duration::from_millis(10);
    let e = block_on(c.join(s)).unwrap_err().to_string();
    assert!(e.contains("session timeout 10 ms"), "{e}");
    let mut s = spec(None, &BTreeSet::new());
    s.topics.clear();
    assert!(matches!(block_on(c.join(s)), Err(GroupError::Invalid(_))));
    // What a member brings is bounded: no more topics than there may be,
    // each a topic name, and a client name of at most CLIENT_BYTES_MAX.
    let mut s = spec(None, &BTreeSet::new());
    s.topics = (0..5).map(|i| format!("t{i}")).collect(); // max_topics 4
    let e = block_on(c.join(s)).unwrap_err().to_string();
    assert!(e.contains("at most 4 topics"), "{e}");
    let mut s = spec(None, &BTreeSet::new());
    s.topics.insert("x".repeat(100_000));
    let e = block_on(c.join(s)).unwrap_err().to_string();
    assert!(e.contains("is not a topic name") && e.len() < 200, "{e}");
    let mut s = spec(None, &BTreeSet::new());
    s.topics.insert("a/b".into());
    let e = block_on(c.join(s)).unwrap_err().to_string();
    assert!(e.contains("'a/b' is not a topic name"), "{e}");
    let mut s = spec(None, &BTreeSet::new());
    s.client = "c".repeat(CLIENT_BYTES_MAX + 1);
    let e = block_on(c.join(s)).unwrap_err().to_string();
    assert!(e.contains("client name is at most 512 bytes"), "{e}");
    let mut s = spec(None, &BTreeSet::new());
    s.client = "c".repeat(CLIENT_BYTES_MAX);
    s.topics = (0..4).map(|i| format!("t{i}")).collect();
    s.group = "at-the-limits".into();
    block_on(c.join(s)).expect("a member at every limit joins");
    block_on(c.join(spec(None, &BTreeSet::new()))).unwrap();
    let mut s = spec(None, &BTreeSet::new());
    s.assignor = Assignor::Range;
    let e = block_on(c.join(s)).unwrap_err().to_string();
    assert!(e.contains("uses the cooperative-sticky assignor"), "{e}");
    let e = block_on(c.commit("g", None, vec![(tp(0), 1, None)])).unwrap_err();
    assert!(matches!(e, GroupError::NotEmpty { members: 1, .. }));
    let e = block_on(c.commit("g", None, vec![(("nope".into(), 0), 1, None)])).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

/// The offsets topic is compacted: many laps' worth of commits (4 x 1 MiB
/// ring, 12 MiB of commits) keep the latest commit of every partition,
/// compactions (the writer's own, no cleaner task runs here) make the
/// room, and a deleted group's offsets stay deleted, also after a restart.
#[test]
fn the_offsets_topic_is_compacted_and_keeps_every_latest_commit() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let big = "m".repeat(3000);
    let before = {
        let c = open(&rig);
        block_on(c.commit("gone", None, vec![(tp(3), 1, None)])).unwrap();
        for wave in 0..40u64 {
            let commits: Vec<_> = (0..100u64)
                .map(|i| {
                    let (c, meta) = (c.clone(), format!("{wave}-{i}-{big}"));
                    smol::spawn(async move {
                        let tp = tp((i % 4) as u32);
                        c.commit("g", None, vec![(tp, wave * 100 + i, Some(meta))])
                            .await
                    })
                })
                .collect();
            for t in commits {
                block_on(t).unwrap();
            }
            if wave == 5 {
                block_on(c.delete("gone")).unwrap();
            }
        }
        assert!(c.broker.cleanup_config(OFFSETS_TOPIC).policy.compacts());
        let runs = c.broker.cleaner_stats().runs.load(Ordering::Relaxed);
        assert!(runs > 0, "compacted on the way");
        let got = c.committed("g", None);
        c.broker.close().unwrap();
        got
    };
    assert_eq!(before.len(), 4);
    for (tp, commit) in &before {
        assert_eq!(commit.offset % 4, u64::from(tp.1), "{tp:?}");
        assert!(commit.offset >= 3900, "the last wave's: {}", commit.offset);
    }
    let c = open(&rig);
    assert_eq!(c.committed("g", None), before);
    assert!(c.committed("gone", None).is_empty());
}

#[test]
fn commit_metadata_past_the_configured_bound_is_refused_and_names_its_key() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    let at = |n: usize| vec![(tp(0), 1, Some("m".repeat(n)))];
    let max = OFFSET_METADATA_BYTES_MAX;
    block_on(c.commit("g", None, at(max))).expect("metadata at the bound");
    let err = block_on(c.commit("g", None, at(max + 1))).expect_err("one byte more");
    assert!(
        matches!(&err, GroupError::Invalid(m) if m.contains("groups.max_offset_metadata_bytes")),
        "{err}"
    );
    assert_eq!(
        c.committed("g", None)[0]
            .1
            .metadata
            .as_deref()
            .map(str::len),
        Some(max)
    );
}

/// A group on topics that come and go keeps at most `server.max_partitions`
/// offsets: a commit that would pass it deletes those of partitions gone.
#[test]
fn offsets_of_deleted_topics_make_way_for_new_ones() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    let commit_all = |topic: &str, n: u32| {
        let offsets = (0..n).map(|p| ((topic.to_owned(), p), 1, None)).collect();
        block_on(c.commit("g", None, offsets)).expect("commit");
    };
    commit_all("t", 4);
    // "t" (4) and the offsets topic (1) leave 3 of the 8 partitions.
    let three = TopicSpec {
        partitions: Some(3),
        ..TopicSpec::default()
    };
    for topic in ["u", "v", "w"] {
        block_on(c.broker.create_topic(topic, &three)).expect("create");
        commit_all(topic, 3);
        block_on(c.broker.delete_topic(topic)).expect("delete");
    }
    let kept = c.committed("g", None);
    assert!(kept.len() <= 8, "{} offsets kept: {kept:?}", kept.len());
    assert!(kept.iter().any(|((t, _), _)| t == "w"), "{kept:?}");
    assert_eq!(kept.iter().filter(|((t, _), _)| t == "t").count(), 4);
}

/// `groups.max_members` bounds the members of all groups together, as the
/// memory budget counts them: a join past it is refused, makes no group,
/// and a member leaving makes room.
#[test]
fn a_join_past_max_members_over_all_groups_is_refused_until_one_leaves() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open_with(&rig, 3);
    let join = |group: &str| {
        let mut s = spec(None, &BTreeSet::new());
        s.group = group.into();
        block_on(c.join(s))
    };
    let first = join("g0").expect("join");
    join("g1").expect("join");
    join("g2").expect("join");
    let err = join("g3").expect_err("a fourth member of all groups");
    assert!(
        matches!(
            &err,
            GroupError::TooManyMembers {
                group: None,
                max: 3
            }
        ),
        "{err}"
    );
    assert_eq!(c.lock().len(), 3, "the refused join made no group");
    c.leave("g0", &first.member_id).expect("leave");
    join("g3").expect("a member left: room for one");
}

/// An offsets log that refuses writes fails every commit: the failure is
/// logged once a minute, not once for each commit.
#[test]
fn an_offsets_log_that_keeps_failing_is_logged_once_a_minute() {
    use crate::broker::share::tests::{capture_warnings, warnings};
    use crate::storage::io::fault::FaultPlan;
    capture_warnings();
    let rig = Rig::fault(23);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig);
    block_on(c.commit("g", None, vec![(tp(0), 0, None)])).expect("the log is made");
    disk.set_plan(FaultPlan {
        fail_writes_to: Some(OFFSETS_TOPIC),
        errno: libc::EROFS,
        ..FaultPlan::default()
    });
    for offset in 1..=4 {
        assert!(block_on(c.commit("g", None, vec![(tp(0), offset, None)])).is_err());
    }
    let lines = warnings(&["offsets log", "write failed"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    disk.set_plan(FaultPlan::default());
    c.broker.close().expect("closed");
}

/// An offsets topic the broker refuses to make (here its `max_topics`)
/// fails every commit: the refusal is logged once a minute, not once for
/// each commit.
#[test]
fn an_offsets_topic_that_cannot_be_made_is_logged_once_a_minute() {
    use crate::broker::share::tests::{capture_warnings, warnings};
    capture_warnings();
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig);
    // With "t", the rig's four topics: none left for the offsets topic.
    for name in ["a", "b", "c"] {
        block_on(c.broker.create_topic(name, &TopicSpec::default())).expect("create");
    }
    for offset in 0..4 {
        assert!(block_on(c.commit("g", None, vec![(tp(0), offset, None)])).is_err());
    }
    let lines = warnings(&["cannot create the offsets topic"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    c.broker.close().expect("closed");
}

/// An offsets log whose ring is full and whose compaction cannot be done
/// (every write of its scratch segment fails) fails at every commit,
/// each asking for a compaction: the failed compaction is logged once a
/// minute, not once for each.
#[test]
fn an_offsets_log_compaction_that_keeps_failing_is_logged_once_a_minute() {
    use crate::broker::share::tests::{capture_warnings, warnings};
    use crate::storage::io::fault::FaultPlan;
    capture_warnings();
    let rig = Rig::fault(22);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig);
    block_on(c.commit("g", None, vec![(tp(0), 0, None)])).expect("the log is made");
    // Not a full disk: a compaction's room is reserved with the ring.
    disk.set_plan(FaultPlan {
        fail_writes_to: Some("compact.tmp"),
        errno: libc::EIO,
        ..FaultPlan::default()
    });
    let failed = ["offsets log", "compaction failed"];
    let meta = "m".repeat(OFFSET_METADATA_BYTES_MAX);
    let mut offset = 0;
    let mut commit = || {
        offset += 1;
        let _ = block_on(c.commit("g", None, vec![(tp(0), offset, Some(meta.clone()))]));
    };
    // 4 MiB of ring at about 4 KiB a commit: full well within this many.
    let mut commits = 0;
    while warnings(&failed).is_empty() {
        commits += 1;
        assert!(commits < 5_000, "the offsets log's ring never filled");
        commit();
    }
    let compactions = || c.broker.cleaner_stats().runs.load(Ordering::Relaxed);
    let before = compactions();
    for _ in 0..3 {
        commit();
    }
    assert!(compactions() >= before + 3, "each commit asks for one");
    let lines = warnings(&failed);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    disk.set_plan(FaultPlan::default());
    c.broker.close().expect("closed");
}
