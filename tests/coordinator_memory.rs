//! The memory budget's coordinator lines against the real coordinators:
//! the consumer-group and transaction coordinators, over a real broker in
//! this process, filled to their config's bounds with every name and
//! metadata at its longest, take no more heap than `skiff config check`'s
//! `consumer groups` and `transactions` lines say, and not wildly less.
//! Heap, not RSS: the lines are a few hundred KiB here, below what RSS
//! resolves. A counting allocator measures it; this file holds one test so
//! that nothing else allocates in the process meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff::broker::group::{self, Assignor, GroupError, JoinSpec, Tp};
use skiff::broker::{txn, Broker, TopicSpec};
use skiff::config::{Config, MemoryBudget};
use smol::block_on;

/// Live heap bytes as glibc's malloc takes them: the request, an 8-byte
/// header, rounded up to 16, at least 32.
static LIVE: AtomicI64 = AtomicI64::new(0);

fn chunk(layout: Layout) -> i64 {
    ((layout.size() + 8).next_multiple_of(16).max(32)) as i64
}

struct Counting;

// SAFETY: every call is passed on to the system allocator as it is; the
// counter is only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(chunk(layout), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(chunk(layout), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const GROUPS: u32 = 8;
/// Members of all groups together: the first groups have
/// `MEMBERS_PER_GROUP`, the rest one each.
const MEMBERS: u32 = 16;
const MEMBERS_PER_GROUP: u32 = 3;
/// The warm-up's id, idle ids, and `MAX_OPEN` with a transaction open.
const TXN_IDS: u32 = 8;
const MAX_OPEN: u32 = 3;
const MAX_TOPICS: u32 = 8;
/// The user topic's partitions: all `server.max_partitions` leaves beside
/// the broker's own three.
const PARTITIONS: u32 = 8;

fn config(dir: &std::path::Path) -> String {
    format!(
        "data_dir = \"{}\"\n\
         [server]\n\
         max_topics = {MAX_TOPICS}\n\
         max_partitions = {partitions}\n\
         [storage]\n\
         prewrite_segments = false\n\
         disk_budget_bytes = 268435456\n\
         [topic_defaults]\n\
         segment_bytes = 1048576\n\
         segments = 2\n\
         fsync = \"never\"\n\
         [groups]\n\
         max_groups = {GROUPS}\n\
         max_members = {MEMBERS}\n\
         max_members_per_group = {MEMBERS_PER_GROUP}\n\
         max_offset_metadata_bytes = {metadata}\n\
         [transactions]\n\
         max_transactional_ids = {TXN_IDS}\n\
         max_open = {MAX_OPEN}\n",
        dir.display(),
        partitions = PARTITIONS + common::INTERNAL_TOPICS,
        metadata = group::OFFSET_METADATA_BYTES_MAX,
    )
}

/// A name of `len` bytes, distinct per `tag`.
fn name(tag: &str, i: u32, len: usize) -> String {
    let head = format!("{tag}{i}-");
    format!("{head}{}", "x".repeat(len - head.len()))
}

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

fn line(budget: &MemoryBudget, user: &str) -> u64 {
    budget
        .lines
        .iter()
        .find(|l| l.user == user)
        .unwrap_or_else(|| panic!("no '{user}' line:\n{budget}"))
        .bytes
}

fn kib(bytes: i64) -> f64 {
    bytes as f64 / 1024.0
}

/// A member that joins, syncs and heartbeats, rejoining with what it was
/// given whenever the group rebalances, until `stop`.
async fn member(c: Arc<group::Coordinator>, spec: JoinSpec, stop: Arc<AtomicBool>) {
    let mut spec = spec;
    loop {
        let j = c.join(spec.clone()).await.expect("join");
        spec.member_id = Some(j.member_id.clone());
        let s = match c.sync(&spec.group, &j.member_id, j.generation) {
            Ok(s) => s,
            Err(GroupError::IllegalGeneration { .. } | GroupError::RebalanceInProgress(_)) => {
                continue
            }
            Err(e) => panic!("sync: {e}"),
        };
        spec.owned = s.assignment;
        if s.rejoin {
            continue;
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match c.heartbeat(&spec.group, &j.member_id, j.generation) {
                Ok(()) => smol::Timer::after(Duration::from_millis(5)).await,
                Err(GroupError::RebalanceInProgress(_) | GroupError::IllegalGeneration { .. }) => {
                    break
                }
                Err(e) => panic!("heartbeat: {e}"),
            };
        }
    }
}

#[test]
fn the_coordinators_filled_to_their_bounds_stay_within_their_budget_lines() {
    let dir = common::temp_dir();
    let path = dir.path().join("skiff.toml");
    std::fs::write(&path, config(&dir.path().join("data"))).expect("write config");
    let cfg = Config::load(Some(&path)).expect("the test's config is valid");
    let budget = MemoryBudget::of(&cfg);

    let broker = Broker::open_config(&cfg, None).expect("broker opens");
    let topic = name("t", 0, skiff::storage::TOPIC_NAME_BYTES_MAX);
    let spec = TopicSpec {
        partitions: Some(PARTITIONS),
        ..TopicSpec::default()
    };
    block_on(broker.create_topic(&topic, &spec)).expect("create the topic");
    let groups = group::Coordinator::open(broker.clone(), group::GroupsConfig::from_config(&cfg))
        .expect("groups open");
    let txns = txn::Coordinator::open(
        broker.clone(),
        groups.clone(),
        txn::TxnConfig::from_config(&cfg),
    )
    .expect("transactions open");
    smol::spawn(groups.clone().run_log()).detach();
    // The coordinators' own topics, made at their first use, outside the
    // measure (the rings' line counts them): a commit of a group deleted
    // again, and one transactional id.
    block_on(groups.commit("warm", None, vec![((topic.clone(), 0), 1, None)]))
        .expect("warm-up commit");
    block_on(groups.delete("warm")).expect("warm-up group deleted");
    block_on(txns.init("warm", 60_000)).expect("warm-up init");

    // ---------------------------------------------------------- groups
    let before = live();
    let tps: Vec<Tp> = (0..PARTITIONS).map(|p| (topic.clone(), p)).collect();
    let metadata = "m".repeat(group::OFFSET_METADATA_BYTES_MAX);
    let group_names: Vec<String> = (0..GROUPS)
        .map(|g| name("g", g, group::GROUP_ID_BYTES_MAX))
        .collect();
    for g in &group_names {
        let offsets = tps
            .iter()
            .map(|tp| (tp.clone(), 42, Some(metadata.clone())))
            .collect();
        block_on(groups.commit(g, None, offsets)).expect("commit every partition");
    }
    let offsets_done = live();
    // Every member subscribes to max_topics names at their longest: the
    // topic and names of topics not made yet.
    let subscription: BTreeSet<String> = std::iter::once(topic.clone())
        .chain((1..MAX_TOPICS).map(|i| name("t", i, skiff::storage::TOPIC_NAME_BYTES_MAX)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    // MEMBERS over the groups: MEMBERS_PER_GROUP in the first ones, one
    // in each of the rest.
    let full = ((MEMBERS - GROUPS) / (MEMBERS_PER_GROUP - 1)) as usize;
    let members_of = |g: usize| if g < full { MEMBERS_PER_GROUP } else { 1 };
    assert_eq!((0..GROUPS as usize).map(members_of).sum::<u32>(), MEMBERS);
    let tasks: Vec<smol::Task<()>> = group_names
        .iter()
        .enumerate()
        .flat_map(|(i, g)| (0..members_of(i)).map(move |m| (g, m)))
        .map(|(g, m)| {
            let spec = JoinSpec {
                group: g.clone(),
                member_id: None,
                instance_id: Some(name("i", m, group::GROUP_ID_BYTES_MAX)),
                client: name("client", m, group::CLIENT_BYTES_MAX),
                topics: subscription.clone(),
                assignor: Assignor::CooperativeSticky,
                session_timeout: Duration::from_secs(60),
                rebalance_timeout: Duration::from_secs(60),
                owned: BTreeSet::new(),
            };
            smol::spawn(member(groups.clone(), spec, stop.clone()))
        })
        .collect();
    // Settled: every group stable with all its members and every
    // partition assigned (the members then hold what they were given).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let settled = group_names.iter().enumerate().all(|(i, g)| {
            let d = groups.describe(g).expect("describe");
            d.state == "Stable"
                && d.members.len() == members_of(i) as usize
                && d.members.iter().map(|m| m.assignment.len()).sum::<usize>()
                    == PARTITIONS as usize
        });
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "the groups did not settle");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The tasks end; the coordinator keeps their members (no timers run
    // here to end their sessions).
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        block_on(t);
    }
    let groups_done = live();
    // Not one more member, in any group (a join let in would wait for a
    // rebalance the stopped members never finish: fail, not hang).
    let refused = groups.join(JoinSpec {
        group: group_names[GROUPS as usize - 1].clone(),
        member_id: None,
        instance_id: None,
        client: "one-too-many".into(),
        topics: subscription.clone(),
        assignor: Assignor::CooperativeSticky,
        session_timeout: Duration::from_secs(60),
        rebalance_timeout: Duration::from_secs(60),
        owned: BTreeSet::new(),
    });
    let err = block_on(smol::future::or(
        async { refused.await.map(|j| j.member_id) },
        async {
            smol::Timer::after(Duration::from_secs(30)).await;
            Ok("still waiting".to_owned())
        },
    ))
    .expect_err("a member past groups.max_members");
    assert!(err.to_string().contains("groups.max_members"), "{err}");

    // ---------------------------------------------------- transactions
    let txn_group = &group_names[0];
    for i in 1..TXN_IDS {
        let id = name("x", i, txn::TXN_ID_BYTES_MAX);
        let (pid, epoch) = block_on(txns.init(&id, 60_000)).expect("init");
        if i > MAX_OPEN {
            // Idle ids, and not one more transaction open.
            let Err(err) = block_on(txns.gate(pid, epoch, &topic, 0)) else {
                panic!("a transaction past transactions.max_open began");
            };
            assert!(err.to_string().contains("transactions.max_open"), "{err}");
            continue;
        }
        // Offsets first, so the records the gates write hold them too: the
        // copy of the last durable record that the log's rewrite keeps must
        // not hold them again.
        let offsets = tps.iter().map(|tp| (tp.clone(), 7)).collect();
        block_on(txns.add_offsets(&id, pid, epoch, txn_group, offsets)).expect("add offsets");
        for p in 0..PARTITIONS {
            let gate = block_on(txns.gate(pid, epoch, &topic, p)).expect("gate");
            assert!(gate.is_some(), "a transactional producer's batch is gated");
        }
        if i == 1 {
            // A transaction carries at most server.max_partitions offsets:
            // another group's for every partition is refused.
            let more = tps.iter().map(|tp| (tp.clone(), 7)).collect();
            let err = block_on(txns.add_offsets(&id, pid, epoch, &group_names[1], more))
                .expect_err("more offsets than partitions");
            assert!(
                matches!(err, txn::TxnError::Invalid(ref m) if m.contains("server.max_partitions")),
                "{err}"
            );
            // Nor may it carry offsets for a group past groups.max_groups:
            // its commit would make the group, and could not be refused.
            let one = vec![(tps[0].clone(), 7)];
            let err = block_on(txns.add_offsets(&id, pid, epoch, "one-too-many", one))
                .expect_err("a group past max_groups");
            assert!(err.to_string().contains("groups.max_groups"), "{err}");
        }
    }
    let txns_done = live();

    let measured_groups = groups_done - before;
    let measured_txns = txns_done - groups_done;
    let groups_line = line(&budget, "consumer groups (estimate)");
    // One id is the warm-up's: the rest are measured.
    let txns_line = line(&budget, "transactions (estimate)") - skiff::config::TXN_ID_BYTES;
    eprintln!(
        "groups: {:.1} KiB ({:.1} KiB of offsets, {:.1} KiB of members) against {:.1} KiB; \
         transactions: {:.1} KiB against {:.1} KiB",
        kib(measured_groups),
        kib(offsets_done - before),
        kib(groups_done - offsets_done),
        kib(groups_line as i64),
        kib(measured_txns),
        kib(txns_line as i64),
    );
    for (what, measured, line) in [
        ("consumer groups", measured_groups, groups_line),
        ("transactions", measured_txns, txns_line),
    ] {
        let measured = u64::try_from(measured).unwrap_or(0);
        assert!(
            measured <= line,
            "the {what} took {:.1} KiB, more than the budget's {:.1} KiB:\n{budget}",
            kib(measured as i64),
            kib(line as i64)
        );
        assert!(
            line <= 3 * measured,
            "the {what} line ({:.1} KiB) is more than 3x what they took ({:.1} KiB)",
            kib(line as i64),
            kib(measured as i64)
        );
    }
    drop((txns, groups, broker));
}
