//! The compaction property (issue 19): random puts and deletes per key,
//! compactions, and crashes at random points of a compaction (a write or
//! an fdatasync of it failing, then power lost), on the fault disk, with a
//! ring that wraps many times. After every step the latest value of every
//! key, read from the earliest offset, equals a reference map's, and no
//! key's values ever go back to an older one.

use super::*;
use crate::batch::{BatchBuilder, BatchIter, ProducerStamp};
use crate::storage::io::fault::FaultPlan;
use crate::storage::tests::Rig;
use proptest::prelude::*;
use smol::block_on;
use std::collections::BTreeMap;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn options(rig: &Rig) -> BrokerOptions {
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
        defaults: crate::storage::tests::small_cfg(),
        default_partitions: 1,
        clock: Arc::new(SystemClock),
        cleaner: cleaner::CleanerLimits {
            // A small map: 40 keys take several passes.
            key_map_bytes: 16 * cleaner::KEY_MAP_ENTRY_BYTES,
            max_bytes_per_sec: 0,
        },
        internal_topics: Vec::new(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// `n` records in one batch: (key, value length; 0 = tombstone).
    Put(Vec<(u8, u16)>),
    Compact,
    /// A compaction whose `nth` write (or fdatasync, `sync`) fails, and
    /// then the power: recovery must find it done or not done.
    CrashInCompaction {
        nth: u64,
        sync: bool,
    },
    /// Power lost between operations.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => prop::collection::vec((0u8..40, prop_oneof![1 => Just(0u16), 6 => 20u16..600]), 1..12)
            .prop_map(Op::Put),
        2 => Just(Op::Compact),
        2 => (1u64..40, any::<bool>()).prop_map(|(nth, sync)| Op::CrashInCompaction { nth, sync }),
        1 => Just(Op::Crash),
    ]
}

/// Key name and a value that says its write order (`seq`).
fn value_of(seq: u64, len: u16) -> Vec<u8> {
    let mut v = format!("{seq:010}").into_bytes();
    v.resize(usize::from(len).max(10), b'.');
    v
}

fn seq_of(v: &[u8]) -> u64 {
    std::str::from_utf8(&v[..10]).unwrap().parse().unwrap()
}

struct World {
    rig: Rig,
    broker: Option<Arc<Broker>>,
    /// Acknowledged: key -> latest value (None: deleted).
    model: BTreeMap<u8, Option<Vec<u8>>>,
    seq: u64,
}

impl World {
    fn b(&self) -> &Broker {
        self.broker.as_ref().expect("open")
    }

    fn reopen(&mut self) {
        let disk = self.rig.disk().expect("fault rig").clone();
        if let Some(b) = self.broker.take() {
            b.begin_stop();
            drop(b);
        }
        disk.set_plan(FaultPlan::default());
        disk.restart();
        let storage = self.rig.open();
        self.broker = Some(Broker::open(storage, options(&self.rig)).expect("broker opens"));
    }

    fn crash(&mut self) {
        self.rig.disk().expect("fault rig").crash();
        self.reopen();
    }

    fn put(&mut self, records: &[(u8, u16)]) {
        let mut bb = BatchBuilder::new();
        let mut written = Vec::new();
        for &(k, len) in records {
            let key = [b'k', k];
            self.seq += 1;
            let value = (len > 0).then(|| value_of(self.seq, len));
            bb.push_record(1_000, Some(&key), value.as_deref(), &[]);
            written.push((k, value));
        }
        let batch = bb.finish(ProducerStamp::NONE);
        for attempt in 0.. {
            let r = block_on(async { self.b().produce("c", 0, batch.clone().into()).await?.await });
            match r {
                Ok(_) => break,
                // A full ring: the cleaner's turn (the test is the cleaner).
                Err(e) if e.is_full_compacted_ring() && attempt < 3 => {
                    block_on(self.b().compact_partition("c", 0)).expect("compaction");
                }
                Err(e) => panic!("produce: {e}"),
            }
        }
        for (k, v) in written {
            self.model.insert(k, v);
        }
    }

    /// The log from its earliest offset agrees with the model.
    fn check(&self) {
        let b = self.b();
        let o = b.offsets("c", 0).expect("offsets");
        let id = PartitionId::new("c", 0);
        let mut latest: BTreeMap<u8, Option<Vec<u8>>> = BTreeMap::new();
        let mut at = o.earliest;
        let mut last_offset = None;
        while at < o.high_watermark {
            let bytes = block_on(b.storage.read(&id, at, 64 * 1024)).expect("read");
            assert!(!bytes.is_empty());
            for view in BatchIter::new(&bytes) {
                let view = view.expect("a valid batch");
                let h = view.header;
                for r in view.records().expect("records") {
                    let offset = h.base_offset + u64::from(r.offset_delta);
                    assert!(last_offset < Some(offset), "offsets increase");
                    last_offset = Some(offset);
                    let k = r.key.expect("a key")[1];
                    let v = r.value.map(|v| v.to_vec());
                    if let (Some(Some(old)), Some(new)) = (latest.get(&k), &v) {
                        assert!(
                            seq_of(old) < seq_of(new),
                            "key {k}: an older value after a newer one"
                        );
                    }
                    latest.insert(k, v);
                }
                at = h.next_offset();
            }
        }
        for (k, want) in &self.model {
            let got = latest.get(k).cloned().flatten();
            assert_eq!(&got, want, "key {k}");
        }
        for (k, v) in &latest {
            if v.is_some() {
                assert!(self.model.contains_key(k), "key {k} was never written");
            }
        }
    }
}

fn run(ops: Vec<Op>) -> World {
    let rig = Rig::fault(11);
    let mut w = World {
        rig,
        broker: None,
        model: BTreeMap::new(),
        seq: 0,
    };
    w.reopen();
    let spec = TopicSpec {
        partitions: Some(1),
        segment_bytes: Some(64 * 1024),
        segments: Some(4),
        cleanup: Some(CleanupPolicy::Compact),
        // Tombstones go at the first compaction that may drop them.
        tombstone_retention_ms: Some(0),
        ..TopicSpec::default()
    };
    block_on(w.b().create_topic("c", &spec)).expect("create");
    for op in ops {
        match op {
            Op::Put(records) => w.put(&records),
            Op::Compact => {
                block_on(w.b().compact_partition("c", 0)).expect("compaction");
            }
            Op::CrashInCompaction { nth, sync } => {
                let disk = w.rig.disk().expect("fault rig").clone();
                let plan = if sync {
                    FaultPlan {
                        fail_sync_nth: Some(disk.syncs() + nth.min(3)),
                        errno: libc::EIO,
                        ..FaultPlan::default()
                    }
                } else {
                    FaultPlan {
                        fail_write_nth: Some(disk.writes() + nth),
                        errno: libc::EIO,
                        ..FaultPlan::default()
                    }
                };
                disk.set_plan(plan);
                let _ = block_on(w.b().compact_partition("c", 0));
                w.crash();
            }
            Op::Crash => w.crash(),
        }
        w.check();
    }
    w
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(12)))]

    #[test]
    fn compaction_keeps_every_latest_value_through_crashes(
        ops in prop::collection::vec(op(), 20..120)
    ) {
        run(ops);
    }
}

/// A long fixed run: the ring wraps many times (hundreds of KiB through a
/// 256 KiB ring), compactions every few batches, a crash now and then.
#[test]
fn a_long_run_wraps_the_ring_many_times() {
    let mut ops = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..800u64 {
        let records = (0..8)
            .map(|_| {
                (
                    (next() % 40) as u8,
                    if next() % 8 == 0 {
                        0
                    } else {
                        200 + (next() % 300) as u16
                    },
                )
            })
            .collect();
        ops.push(Op::Put(records));
        if i % 10 == 9 {
            ops.push(Op::Compact);
        }
        if i % 97 == 50 {
            ops.push(Op::CrashInCompaction {
                nth: 1 + next() % 20,
                sync: i % 2 == 0,
            });
        }
    }
    let w = run(ops);
    // About 2.2 MB of records went through a 256 KiB ring.
    let o = w.b().offsets("c", 0).expect("offsets");
    assert!(o.high_watermark >= 6_000, "{o:?}");
    assert!(w.b().storage.stats().compactions >= 20);
}

/// An idempotent producer whose batch compaction removed whole is still
/// known after a crash: the cleaner snapshots the producer table before it
/// merges, and merges only what the snapshot covers. So the producer's
/// retry of that batch is recognised (not written twice) and its next
/// sequence is taken.
#[test]
fn a_producers_dedup_state_survives_its_batches_compacted_away() {
    let mut w = run(Vec::new());
    let (producer_id, producer_epoch) = block_on(w.b().init_producer(None)).unwrap();
    let stamp = |base_sequence| ProducerStamp {
        producer_id,
        producer_epoch,
        base_sequence,
    };
    let mine = |seq: i32, tag: u8| {
        let mut bb = BatchBuilder::new();
        for k in 0..5u8 {
            bb.push(1_000, Some(&[b'k', k]), &[tag; 100], &[]);
        }
        bb.finish(stamp(seq))
    };
    let first = mine(0, 1);
    let ack = block_on(async { w.b().produce("c", 0, first.clone().into()).await?.await })
        .expect("produce");
    // Every key of that batch is written again, many times, by others.
    for _ in 0..150 {
        w.put(&[(0, 400), (1, 400), (2, 400), (3, 400), (4, 400), (9, 400)]);
    }
    block_on(w.b().compact_partition("c", 0)).expect("compaction");
    w.check();
    let id = PartitionId::new("c", 0);
    let o = w.b().offsets("c", 0).unwrap();
    let mut at = o.earliest;
    while at < o.high_watermark {
        let bytes = block_on(w.b().storage.read(&id, at, 64 * 1024)).expect("read");
        for view in BatchIter::new(&bytes) {
            let h = view.expect("batch").header;
            assert_ne!(h.producer_id, producer_id, "the batch was compacted away");
            at = h.next_offset();
        }
    }
    // Power lost: no clean stop's snapshot.
    w.crash();
    let hw = w.b().offsets("c", 0).unwrap().high_watermark;
    let retry = block_on(async { w.b().produce("c", 0, first.into()).await?.await });
    match retry {
        Ok(p) => assert_eq!(p.base_offset, ack.base_offset, "acknowledged as before"),
        Err(BrokerError::Sequence(producers::SequenceError::Duplicate { .. })) => {}
        Err(e) => panic!("the retry: {e}"),
    }
    assert_eq!(
        w.b().offsets("c", 0).unwrap().high_watermark,
        hw,
        "the retry was not written again"
    );
    block_on(async { w.b().produce("c", 0, mine(5, 2).into()).await?.await })
        .expect("the next sequence is taken");
}

/// A pass held back by a batch in flight comes back every 200 ms: with
/// nothing new to record, it writes no producer snapshot (each one is 2 to
/// 4 flushes of an SD card).
#[test]
fn a_held_back_pass_with_nothing_new_writes_no_snapshot() {
    let mut w = run(Vec::new());
    let (producer_id, producer_epoch) = block_on(w.b().init_producer(None)).unwrap();
    w.put(&[(0, 400)]);
    let hw = w.b().offsets("c", 0).unwrap().high_watermark;
    // A batch submitted at `hw` whose outcome has not come back: every
    // segment that closes after it is held back until it does.
    let mut bb = BatchBuilder::new();
    bb.push(1_000, Some(b"k"), &[1; 10], &[]);
    let batch = bb.finish(ProducerStamp {
        producer_id,
        producer_epoch,
        base_sequence: 0,
    });
    let header = BatchIter::new(&batch).next().unwrap().unwrap().header;
    let producers::Check::Accept(_ticket) = w.b().producers.check("c", 0, &header, hw) else {
        panic!("the batch is accepted");
    };
    // Two segments close.
    for _ in 0..60 {
        w.put(&[(0, 400), (1, 400), (2, 400), (3, 400), (4, 400), (9, 400)]);
    }
    let segments = block_on(w.b().storage.segments(&PartitionId::new("c", 0))).unwrap();
    assert!(segments.iter().filter(|s| !s.active).count() >= 2);
    let r = block_on(w.b().compact_partition("c", 0)).expect("compaction");
    assert!(r.held_back, "{r:?}");
    let written = w.b().producers.snapshots_written();
    for _ in 0..3 {
        let r = block_on(w.b().compact_partition("c", 0)).expect("compaction");
        assert!(r.held_back, "{r:?}");
    }
    assert_eq!(
        w.b().producers.snapshots_written(),
        written,
        "passes with nothing new wrote snapshots"
    );
}

/// A broker on `rig` with `topics`, each one partition compacted in a
/// ring of 4 segments of 64 KiB.
fn broker_with_compacted(rig: &Rig, topics: &[&str]) -> Arc<Broker> {
    let b = Broker::open(rig.open(), options(rig)).expect("broker opens");
    let spec = TopicSpec {
        partitions: Some(1),
        segment_bytes: Some(64 * 1024),
        segments: Some(4),
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicSpec::default()
    };
    for topic in topics {
        block_on(b.create_topic(topic, &spec)).expect("create");
    }
    b
}

/// A compacted ring that refused a write is answered as behind the
/// cleaner (retried) until a pass of the cleaner over the whole ring finds
/// nothing to merge; only then as full of live data. A producer of one
/// key is never told its ring is full of live data.
#[test]
fn a_full_ring_is_full_of_live_data_only_once_a_pass_finds_nothing_to_merge() {
    let rig = Rig::fault(12);
    let b = broker_with_compacted(&rig, &["one", "all"]);
    // Ten records of 600 B, keyed by `key(i)`.
    let put = |topic: &str, key: &dyn Fn(u64) -> Vec<u8>, seq: u64| {
        let mut bb = BatchBuilder::new();
        for i in 0..10 {
            let v = value_of(seq * 10 + i, 600);
            bb.push_record(1_000, Some(&key(seq * 10 + i)), Some(&v), &[]);
        }
        let batch = bb.finish(ProducerStamp::NONE);
        block_on(async { b.produce(topic, 0, batch.into()).await?.await })
    };
    let behind = |e: &BrokerError| matches!(e, BrokerError::CompactionBehind { .. });
    // Puts until the ring refuses one, before any pass of the cleaner:
    // that one's number, and it is refused as behind.
    let fill = |topic: &str, key: &dyn Fn(u64) -> Vec<u8>| -> u64 {
        for seq in 1.. {
            if let Err(e) = put(topic, key, seq) {
                assert!(behind(&e), "{e}");
                return seq;
            }
        }
        unreachable!()
    };

    // One key: the ring fills before any pass.
    let one = |_: u64| b"k".to_vec();
    let seq = fill("one", &one);
    let mut passes = 0;
    while let Err(e) = put("one", &one, seq) {
        assert!(behind(&e), "after {passes} pass(es): {e}");
        passes += 1;
        assert!(passes <= 4, "the cleaner made no room");
        block_on(b.clean_one("one", 0)).expect("compaction");
    }

    // Every key new: behind until a pass finds nothing to merge.
    let all = |i: u64| format!("key-{i}").into_bytes();
    let seq = fill("all", &all);
    for _ in 0..4 {
        if block_on(b.clean_one("all", 0))
            .expect("compaction")
            .segments_merged
            == 0
        {
            break;
        }
    }
    let e = put("all", &all, seq).expect_err("a ring of latest values");
    assert!(matches!(e, BrokerError::RingFullOfLiveData { .. }), "{e}");
}

/// The verdict's rule: a pass that merged (even one segment, freeing no
/// slot) or left segments out says nothing about the ring.
#[test]
fn only_a_whole_pass_that_merged_nothing_says_the_ring_is_live() {
    use cleaner::CompactionReport as R;
    let merged_one = R {
        segments_merged: 1,
        segments_freed: 0,
        records_removed: 286,
        ..R::default()
    };
    let held_back = R {
        held_back: true,
        ..R::default()
    };
    assert!(!cleaner::full_of_live_data(&merged_one));
    assert!(!cleaner::full_of_live_data(&held_back));
    assert!(cleaner::full_of_live_data(&R::default()));
}

/// One key over and over: two closed segments of dead values, which the
/// cleaner takes up as soon as it runs; then every write of a merge fails.
fn dead_values_failing_to_merge(
    b: &Broker,
    topic: &str,
    disk: &crate::storage::io::fault::FaultDisk,
) {
    for seq in 0..2 * 64 * 1024 / 600 {
        let mut bb = BatchBuilder::new();
        bb.push_record(1_000, Some(b"k"), Some(&value_of(seq, 600)), &[]);
        let batch = bb.finish(ProducerStamp::NONE);
        block_on(async { b.produce(topic, 0, batch.into()).await?.await }).expect("put");
    }
    disk.set_plan(FaultPlan {
        fail_writes_to: Some("compact.tmp"),
        errno: libc::EIO,
        ..FaultPlan::default()
    });
}

/// The cleaner retries a partition whose compaction fails every
/// `interval`; on a disk that keeps failing it says so once a minute, not
/// once a try.
#[test]
fn a_compaction_that_keeps_failing_is_logged_once_a_minute() {
    super::share::tests::capture_warnings();
    let rig = Rig::fault(13);
    let disk = rig.disk().expect("fault rig").clone();
    let b = broker_with_compacted(&rig, &["k"]);
    dead_values_failing_to_merge(&b, "k", &disk);
    let cleaner = std::thread::spawn({
        let b = b.clone();
        move || block_on(b.run_cleaner(std::time::Duration::from_millis(5)))
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while disk.faults_injected() < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cleaner did not retry"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    b.begin_stop();
    cleaner.join().expect("the cleaner ends");
    let logged = super::share::tests::warnings(&["k/0", "compaction failed"]);
    assert_eq!(logged.len(), 1, "{logged:#?}");
    disk.set_plan(FaultPlan::default());
    b.close().expect("closed");
}

/// Fills the fault disk: no file can be made or grown from here on.
fn fill_disk(disk: &crate::storage::io::fault::FaultDisk) {
    disk.set_plan(FaultPlan {
        capacity_bytes: Some(disk.allocated_bytes()),
        ..FaultPlan::default()
    });
}

/// The path of partition 0's compaction spare on the fault disk, if any.
fn spare_of(
    disk: &crate::storage::io::fault::FaultDisk,
    topic: &str,
) -> Option<std::path::PathBuf> {
    disk.file_paths()
        .into_iter()
        .find(|p| p.ends_with(format!("{topic}/0/compact.spare")))
}

/// One key put over and over until the ring refuses a put (only a
/// compaction makes room); then one compaction, on the full disk, must
/// free slots and the refused put go in.
fn one_compaction_makes_room(b: &Broker, topic: &str) {
    let put = |seq: u64| {
        let mut bb = BatchBuilder::new();
        bb.push_record(1_000, Some(b"k"), Some(&value_of(seq, 600)), &[]);
        let batch = bb.finish(ProducerStamp::NONE);
        block_on(async { b.produce(topic, 0, batch.into()).await?.await })
    };
    let mut seq = 0;
    while put(seq).is_ok() {
        seq += 1;
        assert!(seq < 10_000, "the ring never filled");
    }
    let report = block_on(b.clean_one(topic, 0)).expect("a compaction on the full disk");
    assert!(report.segments_freed > 0, "{report:?}");
    put(seq).expect("the put the full ring refused");
}

/// A compacted topic's create reserves the segment its compactions write
/// into: on a disk full before any compaction ran, the first one still
/// merges and the ring takes writes again.
#[test]
fn a_compacted_topics_first_compaction_needs_no_free_room() {
    let rig = Rig::fault(14);
    let disk = rig.disk().expect("fault rig").clone();
    let b = broker_with_compacted(&rig, &["k"]);
    assert!(spare_of(&disk, "k").is_some(), "{:?}", disk.file_paths());
    fill_disk(&disk);
    one_compaction_makes_room(&b, "k");
    disk.set_plan(FaultPlan::default());
    b.close().expect("closed");
}

/// So does an alter that makes a topic compacted; one back to a plain
/// ring gives the segment back (the disk budget no longer counts it).
#[test]
fn an_alter_to_compacted_reserves_the_first_compactions_room() {
    let rig = Rig::fault(15);
    let disk = rig.disk().expect("fault rig").clone();
    let b = Broker::open(rig.open(), options(&rig)).expect("broker opens");
    let spec = TopicSpec {
        partitions: Some(1),
        segment_bytes: Some(64 * 1024),
        segments: Some(4),
        ..TopicSpec::default()
    };
    block_on(b.create_topic("k", &spec)).expect("create");
    assert!(spare_of(&disk, "k").is_none(), "a plain ring has no spare");
    let alter = |policy| TopicAlter {
        cleanup: Some(policy),
        ..TopicAlter::default()
    };
    block_on(b.alter_topic("k", &alter(CleanupPolicy::Compact))).expect("alter");
    assert!(spare_of(&disk, "k").is_some(), "{:?}", disk.file_paths());
    fill_disk(&disk);
    one_compaction_makes_room(&b, "k");
    disk.set_plan(FaultPlan::default());
    block_on(b.alter_topic("k", &alter(CleanupPolicy::Delete))).expect("alter back");
    assert!(spare_of(&disk, "k").is_none(), "{:?}", disk.file_paths());
    b.close().expect("closed");
}

/// A compacted partition without a spare (made before spares were
/// reserved at create) gets one at start-up; on a disk with no room for
/// it, start-up says so once and goes on.
#[test]
fn start_up_reserves_a_missing_spare_where_there_is_room() {
    super::share::tests::capture_warnings();
    let rig = Rig::fault(16);
    let disk = rig.disk().expect("fault rig").clone();
    let b = broker_with_compacted(&rig, &["nospare", "roomless"]);
    b.close().expect("closed");
    drop(b);
    for topic in ["nospare", "roomless"] {
        let spare = spare_of(&disk, topic).expect("reserved at create");
        assert!(disk.remove_file(&spare));
    }

    // Room for one spare: the first partition start-up comes to takes it.
    disk.set_plan(FaultPlan {
        capacity_bytes: Some(disk.allocated_bytes() + 64 * 1024),
        ..FaultPlan::default()
    });
    let b = Broker::open(rig.open(), options(&rig)).expect("opens on a full disk");
    let (with, without): (Vec<_>, Vec<_>) = ["nospare", "roomless"]
        .into_iter()
        .partition(|t| spare_of(&disk, t).is_some());
    assert_eq!(
        (with.len(), without.len()),
        (1, 1),
        "{:?}",
        disk.file_paths()
    );
    let logged =
        super::share::tests::warnings(&["lack the room a compaction writes into", without[0]]);
    assert_eq!(logged.len(), 1, "{logged:#?}");
    one_compaction_makes_room(&b, with[0]);
    b.close().expect("closed");
}

/// A merge that fails (a write error here) keeps its scratch file as the
/// spare: the next merge needs no new room, even once another writer has
/// filled the disk.
#[test]
fn a_failed_merge_leaves_its_room_to_the_next() {
    let rig = Rig::fault(17);
    let disk = rig.disk().expect("fault rig").clone();
    let b = broker_with_compacted(&rig, &["k"]);
    dead_values_failing_to_merge(&b, "k", &disk);
    block_on(b.clean_one("k", 0)).expect_err("its writes fail");
    assert!(spare_of(&disk, "k").is_some(), "{:?}", disk.file_paths());
    fill_disk(&disk);
    one_compaction_makes_room(&b, "k");
    disk.set_plan(FaultPlan::default());
    b.close().expect("closed");
}
