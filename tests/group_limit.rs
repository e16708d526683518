//! `groups.max_groups` is exact: commits for new groups that run at once,
//! and a transaction's offsets between their adding and its end, never
//! make the coordinator keep more groups than the limit; what is refused
//! is refused with its typed error. The real coordinators over a real
//! broker in this process.

mod common;

use std::sync::Arc;

use skiff::broker::group::{self, GroupError, Tp};
use skiff::broker::{txn, Broker, TopicSpec};
use skiff::config::Config;
use smol::block_on;

struct Rig {
    _dir: tempfile::TempDir,
    groups: Arc<group::Coordinator>,
    txns: Arc<txn::Coordinator>,
}

fn open(max_groups: u32) -> Rig {
    let dir = common::temp_dir();
    let path = dir.path().join("skiff.toml");
    let config = format!(
        "data_dir = \"{}\"\n\
         [storage]\n\
         prewrite_segments = false\n\
         [topic_defaults]\n\
         segment_bytes = 1048576\n\
         segments = 2\n\
         fsync = \"never\"\n\
         [groups]\n\
         max_groups = {max_groups}\n",
        dir.path().join("data").display(),
    );
    std::fs::write(&path, config).expect("write config");
    let cfg = Config::load(Some(&path)).expect("the test's config is valid");
    let broker = Broker::open_config(&cfg, None).expect("broker opens");
    let spec = TopicSpec {
        partitions: Some(1),
        ..TopicSpec::default()
    };
    block_on(broker.create_topic("t", &spec)).expect("create the topic");
    let groups = group::Coordinator::open(broker.clone(), group::GroupsConfig::from_config(&cfg))
        .expect("groups open");
    let txns = txn::Coordinator::open(broker, groups.clone(), txn::TxnConfig::from_config(&cfg))
        .expect("transactions open");
    smol::spawn(groups.clone().run_log()).detach();
    Rig {
        _dir: dir,
        groups,
        txns,
    }
}

fn tp() -> Tp {
    ("t".to_string(), 0)
}

fn commit(rig: &Rig, group: &str) -> Result<(), GroupError> {
    block_on(rig.groups.commit(group, None, vec![(tp(), 1, None)]))
}

fn is_too_many_groups(e: &GroupError, max: u32) -> bool {
    matches!(e, GroupError::TooManyGroups { max: m } if *m == max as usize)
}

fn group_count(rig: &Rig) -> usize {
    rig.groups.list().len()
}

/// Every commit is polled up to its wait for the offsets log before any
/// write is applied: each one's room check runs while none of the others'
/// groups is kept yet.
#[test]
fn concurrent_commits_to_new_groups_make_no_more_than_max_groups() {
    const MAX: u32 = 4;
    const COMMITS: usize = 16;
    let rig = open(MAX);
    let ex = smol::LocalExecutor::new();
    let tasks: Vec<_> = (0..COMMITS)
        .map(|i| {
            let groups = rig.groups.clone();
            ex.spawn(async move {
                groups
                    .commit(&format!("g{i}"), None, vec![(tp(), 1, None)])
                    .await
            })
        })
        .collect();
    let results = block_on(ex.run(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        out
    }));
    let refused: Vec<&GroupError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    for e in &refused {
        assert!(is_too_many_groups(e, MAX), "{e}");
    }
    assert_eq!(group_count(&rig), MAX as usize, "{:?}", rig.groups.list());
    assert_eq!(results.len() - refused.len(), MAX as usize);
    // The slots of the refused and of the applied commits are settled:
    // a kept group takes more commits, a new one none.
    let kept = rig.groups.list()[0].group.clone();
    commit(&rig, &kept).expect("a kept group commits");
    let err = commit(&rig, "another").expect_err("no room");
    assert!(is_too_many_groups(&err, MAX), "{err}");
}

/// A transaction's offsets for a new group hold its slot from their adding
/// until the transaction ends: a group made meanwhile cannot take it, so
/// the commit (which cannot be refused) finds it; an abort gives it back.
#[test]
fn a_transactions_offsets_hold_their_groups_slot_until_it_ends() {
    const MAX: u32 = 2;
    let rig = open(MAX);
    commit(&rig, "a").expect("the first group");
    let (pid, epoch) = block_on(rig.txns.init("tx", 60_000)).expect("init");
    block_on(rig.txns.add_offsets("tx", pid, epoch, "b", vec![(tp(), 3)])).expect("room for b");
    let err = commit(&rig, "c").expect_err("b's slot is the transaction's");
    assert!(is_too_many_groups(&err, MAX), "{err}");
    block_on(rig.txns.end("tx", pid, epoch, true)).expect("commit");
    let kept: Vec<String> = rig.groups.list().into_iter().map(|g| g.group).collect();
    assert_eq!(kept, ["a", "b"]);

    // An abort gives the slot back.
    block_on(rig.groups.delete("b")).expect("delete b");
    block_on(rig.txns.add_offsets("tx", pid, epoch, "c", vec![(tp(), 4)])).expect("room for c");
    let err = block_on(rig.txns.add_offsets("tx", pid, epoch, "d", vec![(tp(), 4)]))
        .expect_err("c holds the last slot");
    assert!(
        matches!(&err, txn::TxnError::Group(e) if is_too_many_groups(e, MAX)),
        "{err}"
    );
    let err = commit(&rig, "d").expect_err("c holds the last slot");
    assert!(is_too_many_groups(&err, MAX), "{err}");
    block_on(rig.txns.end("tx", pid, epoch, false)).expect("abort");
    assert_eq!(group_count(&rig), 1);
    commit(&rig, "d").expect("the abort gave c's slot back");
    assert_eq!(group_count(&rig), MAX as usize);
}
