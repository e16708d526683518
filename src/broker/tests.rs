//! Broker tests over storage's rigs (the fault disk and real files).

use super::*;
use crate::batch::{BatchBuilder, ProducerStamp};
use crate::storage::io::fault::FaultPlan;
use crate::storage::tests::{small_cfg, Rig};
use smol::block_on;
use std::time::Duration;

fn options(rig: &Rig, clock: Arc<dyn Clock>) -> BrokerOptions {
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
        clock,
        cleaner: super::cleaner::CleanerLimits::default(),
        internal_topics: Vec::new(),
    }
}

/// A broker on `rig` (4 topics, 8 partitions); other coordinators' tests
/// use it too.
pub(crate) fn open(storage: Storage, rig: &Rig) -> Arc<Broker> {
    open_with_clock(storage, rig, Arc::new(SystemClock))
}

/// As [`open`], on `clock`.
pub(crate) fn open_with_clock(storage: Storage, rig: &Rig, clock: Arc<dyn Clock>) -> Arc<Broker> {
    Broker::open(storage, options(rig, clock)).expect("broker opens")
}

/// A batch of one record of `value_bytes` whose msg-id is `id`.
fn with_msg_id(id: &str, value_bytes: usize, ts: i64) -> Vec<u8> {
    let mut bb = BatchBuilder::new();
    let value = vec![b'v'; value_bytes];
    bb.push(ts, None, &value, &[("msg-id", id.as_bytes())]);
    bb.finish(ProducerStamp::NONE)
}

/// Produces `batch` to `topic`/0 and awaits it (a minute at most: an
/// ack that never comes fails the test rather than hanging it).
fn produce_to(b: &Broker, topic: &str, batch: Vec<u8>) -> Result<Produced, BrokerError> {
    let produce = async { b.produce(topic, 0, batch.into()).await?.await };
    let stuck = async {
        smol::Timer::after(Duration::from_secs(60)).await;
        panic!("no answer to a produce in a minute");
    };
    block_on(futures_lite::future::or(produce, stuck))
}

/// Produces a batch with one record of `value_bytes` whose msg-id is `id`
/// to "w"/0; whether it was written (else dropped as a duplicate).
fn produce(b: &Broker, id: &str, value_bytes: usize) -> bool {
    let batch = with_msg_id(id, value_bytes, crate::batch::now_ms());
    produce_to(b, "w", batch)
        .expect("written")
        .duplicate_records
        == 0
}

fn create(b: &Broker, name: &str, spec: TopicSpec) {
    block_on(b.create_topic(name, &spec)).expect("create");
}

/// The refill cannot read a partition (a batch damaged on disk, so it
/// is quarantined): the broker still starts. The same log undamaged
/// refills the window.
#[test]
fn a_window_refill_that_cannot_read_the_log_does_not_stop_start_up() {
    let rig = Rig::fault(5);
    let b = open(rig.open(), &rig);
    let spec = TopicSpec {
        partitions: Some(1),
        msg_id_window_ms: Some(600_000),
        ..TopicSpec::default()
    };
    create(&b, "w", spec);
    assert!(produce(&b, "e1", 1));
    // Past the tail's last block: e1 is read back from the device.
    assert!(produce(&b, "filler", 8 * 1024));
    b.close().expect("close");
    drop(b);

    let b = open(rig.open(), &rig);
    assert!(!produce(&b, "e1", 1), "refilled from a readable log");
    b.close().expect("close");
    drop(b);

    // Damage that recovery has passed already (it came after): the
    // refill's read finds it and the partition is quarantined.
    let storage = rig.open();
    let seg = rig.dir.path().join("topics/w/0/seg-00000.log");
    assert!(rig
        .disk()
        .expect("fault rig")
        .flip_stored_bit(&seg, 4096 + 66, 3));
    let b = open(storage, &rig);
    // The read did find it: the partition now refuses writes.
    let mut bb = BatchBuilder::new();
    bb.push(1, None, b"v", &[]);
    let refused = produce_to(&b, "w", bb.finish(ProducerStamp::NONE));
    assert!(
        matches!(refused, Err(BrokerError::Quarantined { .. })),
        "quarantined by the refill's read: {refused:?}"
    );
    b.close().expect("close");
}

/// A count window holds the last records, not the last offsets: over
/// a log with gaps (here 100 offsets between records) the refill still
/// finds the last three ids.
#[test]
fn a_window_refill_counts_records_across_gaps() {
    let rig = Rig::fault(6);
    let b = open(rig.open(), &rig);
    let spec = TopicSpec {
        partitions: Some(1),
        msg_id_window_records: Some(3),
        ..TopicSpec::default()
    };
    create(&b, "w", spec);
    let id = PartitionId::new("w", 0);
    let mut at = 0;
    for n in 1..=5 {
        let batch = with_msg_id(&format!("e{n}"), 1, crate::batch::now_ms());
        let checked = crate::storage::CheckedBatch::check_placed(batch, at + 100).expect("checked");
        let ack = block_on(async {
            b.storage()
                .submit(&id, checked, crate::storage::Wake::Now)
                .await?
                .await
        })
        .expect("placed");
        at = ack.last_offset + 1;
    }
    b.close().expect("close");
    drop(b);
    let b = open(rig.open(), &rig);
    for n in 3..=5 {
        assert!(
            !produce(&b, &format!("e{n}"), 1),
            "e{n} is among the last three"
        );
    }
    assert!(produce(&b, "e2", 1), "e2 is not");
    b.close().expect("close");
}

/// The window's time bound, on a clock the test moves: an id is dropped
/// up to `msg_id_window_ms` after it was seen and written again after.
#[test]
fn a_msg_id_window_forgets_ids_after_its_time_on_the_brokers_clock() {
    let rig = Rig::fault(6);
    let clock = Arc::new(ManualClock::new(1_000_000));
    let b = Broker::open(rig.open(), options(&rig, clock.clone())).expect("broker opens");
    let spec = TopicSpec {
        msg_id_window_ms: Some(1_000),
        ..TopicSpec::default()
    };
    create(&b, "w", spec);
    let ts = clock.now_ms();
    let written = |id: &str| {
        let r = produce_to(&b, "w", with_msg_id(id, 1, ts)).expect("produce");
        r.duplicate_records == 0
    };
    assert!(written("e1"));
    clock.advance_ms(1_000);
    assert!(!written("e1"), "seen 1000 ms ago: in the window");
    assert!(written("e2"));
    clock.advance_ms(1);
    assert!(written("e1"), "seen 1001 ms ago: forgotten");
    assert!(!written("e2"), "seen 1 ms ago");
    b.close().expect("close");
}

fn idempotent(id: u64, seq: i32, values: &[&str]) -> Vec<u8> {
    let mut bb = BatchBuilder::new();
    for v in values {
        bb.push(1, None, v.as_bytes(), &[]);
    }
    bb.finish(ProducerStamp {
        producer_id: id,
        producer_epoch: 0,
        base_sequence: seq,
    })
}

/// A new idempotent producer's first batch ("a", "b") to `t`/0, its
/// `Produce` dropped before the ack (a caller's timeout); the producer id.
fn produce_and_drop_first_batch(b: &Broker) -> u64 {
    let id = block_on(b.init_producer(None)).expect("init").0;
    block_on(async {
        let first = b
            .produce("t", 0, idempotent(id, 0, &["a", "b"]).into())
            .await;
        drop(first.expect("submitted"));
    });
    id
}

/// A produce dropped before its ack (a caller's timeout) still settles
/// its slot in the producer table: a retry of the batch is answered as a
/// duplicate with the first write's offsets, and the next batch follows.
#[test]
fn a_dropped_produce_still_settles_the_producer_table() {
    for (name, rig) in crate::storage::tests::rigs() {
        let b = open(rig.open(), &rig);
        create(&b, "t", TopicSpec::default());
        let id = produce_and_drop_first_batch(&b);
        // The retry may find the first in flight or written: either way
        // it is answered with the first write's offsets, not written.
        let retry = produce_to(&b, "t", idempotent(id, 0, &["a", "b"])).expect("retry");
        assert_eq!(
            (
                retry.base_offset,
                retry.last_offset,
                retry.duplicate_records
            ),
            (0, 1, 2),
            "{name}"
        );
        let next = produce_to(&b, "t", idempotent(id, 2, &["c"])).expect("next");
        assert_eq!((next.base_offset, next.duplicate_records), (2, 0), "{name}");
        assert_eq!(b.offsets("t", 0).expect("offsets").high_watermark, 3);
        b.close().expect("close");
    }
}

/// A dropped produce whose ack the device holds back (a flush not done)
/// leaves the offload thread free: a registry write or snapshot handed
/// over after it runs at once, not once the flush is done; the produce
/// still settles when its ack comes.
#[test]
fn a_dropped_produces_held_ack_does_not_hold_up_the_offload_thread() {
    let rig = Rig::fault(21);
    let (s, gate) = crate::storage::tests::held_storage(&rig);
    let b = open(s, &rig);
    // Dropped before the broker: a failed assertion unwinds, not hangs.
    let open_gate = crate::storage::tests::OpenGateOnDrop(gate.clone());
    create(&b, "t", TopicSpec::default());
    let id = produce_and_drop_first_batch(&b);
    let (tx, rx) = std::sync::mpsc::channel();
    drop(crate::offload::run(move || tx.send(()).unwrap()));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the job ran while the dropped produce's flush was held");
    gate.release();
    let retry = produce_to(&b, "t", idempotent(id, 0, &["a", "b"])).expect("retry");
    assert_eq!((retry.base_offset, retry.duplicate_records), (0, 2));
    // Any flush the close starts is let through.
    drop(open_gate);
    b.close().expect("close");
}

/// Batches produced in one group are written in one group commit.
#[test]
fn a_produce_groups_batches_are_one_group_commit() {
    for (name, rig) in crate::storage::tests::rigs() {
        let b = open(rig.open(), &rig);
        create(
            &b,
            "g",
            TopicSpec {
                partitions: Some(2),
                ..TopicSpec::default()
            },
        );
        // Let the storage thread go to sleep.
        std::thread::sleep(Duration::from_millis(50));
        let before = b.storage().stats().fsyncs;
        let acks = block_on(async {
            let mut group = b.produce_group();
            let mut pending = Vec::new();
            for i in 0..4u32 {
                let batch = idempotent_free(&format!("v{i}"));
                let p = group
                    .produce("g", i % 2, batch.into())
                    .await
                    .expect("submit");
                pending.push(p);
            }
            drop(group);
            let mut acks = Vec::new();
            for p in pending {
                acks.push(p.await.expect("ack").base_offset);
            }
            acks
        });
        assert_eq!(acks, vec![0, 0, 1, 1], "{name}");
        let fsyncs = b.storage().stats().fsyncs - before;
        assert_eq!(fsyncs, 2, "{name}: one group, one fdatasync per partition");
        b.close().expect("close");
    }
}

fn idempotent_free(value: &str) -> Vec<u8> {
    let mut bb = BatchBuilder::new();
    bb.push(1, None, value.as_bytes(), &[]);
    bb.finish(ProducerStamp::NONE)
}

/// Storage's errors reach the caller as the broker's own: an offset out
/// of range in a fetch, a corrupt batch in a produce, an unknown
/// partition in both.
#[test]
fn storage_errors_are_typed_broker_errors() {
    let rig = Rig::fault(7);
    let b = open(rig.open(), &rig);
    create(&b, "t", TopicSpec::default());
    let mut corrupt = idempotent_free("x");
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    assert!(matches!(
        produce_to(&b, "t", corrupt),
        Err(BrokerError::InvalidBatch(_))
    ));
    assert!(matches!(
        produce_to(&b, "nope", idempotent_free("x")),
        Err(BrokerError::UnknownTopic(_))
    ));
    let limits = FetchLimits {
        min_bytes: 0,
        max_wait: Duration::ZERO,
        max_bytes: 1 << 20,
    };
    let at = |topic, partition, offset| FetchPartition {
        topic,
        partition,
        offset,
        max_bytes: 1 << 20,
    };
    let r = block_on(b.fetch(&[at("t", 0, 5), at("t", 3, 0)], limits));
    assert!(
        matches!(
            r[0],
            Err(BrokerError::OffsetOutOfRange {
                requested: 5,
                high_watermark: 0,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(
        matches!(
            r[1],
            Err(BrokerError::UnknownPartition { partition: 3, .. })
        ),
        "{r:?}"
    );
    b.close().expect("close");
}

/// A fetch with nothing to read waits until data arrives on any of its
/// partitions, its wait ends, or the broker begins to stop.
#[test]
fn a_fetch_long_polls_until_data_its_wait_or_the_stop() {
    let rig = Rig::fault(8);
    let b = open(rig.open(), &rig);
    create(
        &b,
        "t",
        TopicSpec {
            partitions: Some(2),
            ..TopicSpec::default()
        },
    );
    let parts = [0, 1].map(|partition| FetchPartition {
        topic: "t",
        partition,
        offset: 0,
        max_bytes: 1 << 20,
    });
    let limits = |ms| FetchLimits {
        min_bytes: 1,
        max_wait: Duration::from_millis(ms),
        max_bytes: 1 << 20,
    };
    // The wait ends: empty answers.
    let r = block_on(b.fetch(&parts, limits(20)));
    assert!(r.iter().all(|f| f.as_ref().expect("ok").records.is_empty()));

    // Data on the second partition ends a long wait.
    let started = std::time::Instant::now();
    let r = block_on(async {
        let fetch = b.fetch(&parts, limits(60_000));
        let produce = async {
            smol::Timer::after(Duration::from_millis(20)).await;
            let p = b.produce("t", 1, idempotent_free("v").into()).await;
            p.expect("submit").await.expect("ack");
            futures_lite::future::pending::<()>().await;
            unreachable!()
        };
        futures_lite::future::or(fetch, produce).await
    });
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(r[0].as_ref().expect("ok").records.is_empty());
    assert!(!r[1].as_ref().expect("ok").records.is_empty());

    // The stop ends one.
    let parts = [FetchPartition {
        partition: 0,
        ..parts[0]
    }];
    let r = block_on(async {
        let fetch = b.fetch(&parts, limits(60_000));
        let stop = async {
            smol::Timer::after(Duration::from_millis(20)).await;
            b.begin_stop();
            futures_lite::future::pending::<()>().await;
            unreachable!()
        };
        futures_lite::future::or(fetch, stop).await
    });
    assert!(r[0].as_ref().expect("ok").records.is_empty());
    assert!(started.elapsed() < Duration::from_secs(30));
    b.close().expect("close");
}

/// Whether the file in the rig's data directory holds `name`'s bytes.
fn file_holds(rig: &Rig, file: &str, name: &str) -> bool {
    let bytes = std::fs::read(rig.dir.path().join(file)).unwrap_or_default();
    bytes.windows(name.len()).any(|w| w == name.as_bytes())
}

/// A create that cannot write one of its files (the settings, or the
/// topic table; here a directory is in the way of its temp file) used to
/// answer an error with the topic listed and its partitions made when the
/// settings came last. Now nothing of it is kept, in the broker or on
/// disk, the error names the file, and the create succeeds once the file
/// can be written.
#[test]
fn a_create_that_cannot_write_a_file_leaves_no_topic() {
    let rig = Rig::fault(31);
    let spec = TopicSpec {
        partitions: Some(2),
        msg_id_window_records: Some(10),
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicSpec::default()
    };
    for file in [
        MSGID_META_FILE,
        cleaner::CLEANUP_META_FILE,
        TOPICS_META_FILE,
    ] {
        let b = open(rig.open(), &rig);
        let in_the_way = rig.dir.path().join(format!("{file}.tmp"));
        std::fs::create_dir(&in_the_way).expect("mkdir");
        match block_on(b.create_topic("halfmade", &spec)) {
            Err(BrokerError::TopicNotCreated { topic, file: f, .. }) => {
                assert_eq!((topic.as_str(), f), ("halfmade", file));
            }
            other => panic!("{file}: {other:?}"),
        }
        let e = block_on(b.create_topic("halfmade", &spec)).expect_err("still in the way");
        assert!(e.to_string().contains(file), "{e}");
        assert!(b.topic("halfmade").is_err(), "{file}: listed");
        assert!(
            b.storage().partitions().is_empty(),
            "{file}: partitions kept"
        );
        assert_eq!(
            b.cleanup_config("halfmade"),
            CleanupConfig::default(),
            "{file}"
        );
        assert!(!b.msg_id_config("halfmade").enabled(), "{file}");
        for f in [
            MSGID_META_FILE,
            cleaner::CLEANUP_META_FILE,
            TOPICS_META_FILE,
        ] {
            assert!(
                !file_holds(&rig, f, "halfmade"),
                "{file}: {f} holds the topic"
            );
        }
        b.close().expect("close");
        drop(b);
        // Nor does the next start find it.
        let b = open(rig.open(), &rig);
        assert!(
            b.topic("halfmade").is_err(),
            "{file}: listed after a restart"
        );
        assert!(b.storage().partitions().is_empty(), "{file}");
        std::fs::remove_dir(&in_the_way).expect("rmdir");
        block_on(b.create_topic("halfmade", &spec)).expect("created once the file can be written");
        assert_eq!(b.cleanup_config("halfmade").policy, CleanupPolicy::Compact);
        assert!(b.msg_id_config("halfmade").enabled());
        block_on(b.delete_topic("halfmade")).expect("delete");
        b.close().expect("close");
    }
}

/// A delete whose settings file cannot be rewritten for a full disk (its
/// temp file is /dev/full, which answers every write with ENOSPC) used to
/// be reported as a storage failure; it is a full disk, answered
/// `storage_full`, saying to free space. The topic is deleted all the same.
#[test]
fn a_delete_that_cannot_rewrite_its_settings_on_a_full_disk_says_so() {
    let rig = Rig::fault(32);
    let b = open(rig.open(), &rig);
    for (file, spec) in [
        (
            MSGID_META_FILE,
            TopicSpec {
                msg_id_window_records: Some(10),
                ..TopicSpec::default()
            },
        ),
        (
            cleaner::CLEANUP_META_FILE,
            TopicSpec {
                cleanup: Some(CleanupPolicy::Compact),
                ..TopicSpec::default()
            },
        ),
    ] {
        create(&b, "doomed", spec);
        let full = rig.dir.path().join(format!("{file}.tmp"));
        std::os::unix::fs::symlink("/dev/full", &full).expect("symlink");
        let e = block_on(b.delete_topic("doomed")).expect_err("settings not rewritten");
        // The failed write took its temp file (here the /dev/full link) away.
        assert!(std::fs::symlink_metadata(&full).is_err(), "temp file left");
        assert!(
            matches!(&e, BrokerError::TopicDeleteIncomplete { settings, .. }
                if settings.len() == 1 && settings[0].0 == file),
            "{file}: {e:?}"
        );
        assert!(e.is_disk_full(), "{file}: {e:?}");
        let text = e.to_string();
        assert!(
            text.contains("topic 'doomed' is deleted")
                && text.contains("the disk is full: free space"),
            "{text}"
        );
        assert!(b.topic("doomed").is_err());
    }
    b.close().expect("close");
}

/// Settings of a topic that is not listed (a delete could not rewrite
/// them; a create cut short) used to be loaded and kept until the name
/// was created again. The next start drops them and rewrites the files
/// without them.
#[test]
fn settings_of_a_topic_not_listed_are_dropped_at_start() {
    let rig = Rig::fault(33);
    let b = open(rig.open(), &rig);
    let spec = TopicSpec {
        msg_id_window_records: Some(10),
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicSpec::default()
    };
    create(&b, "gone", spec.clone());
    create(&b, "kept", spec);
    let files = [MSGID_META_FILE, cleaner::CLEANUP_META_FILE];
    let in_the_way: Vec<_> = files
        .iter()
        .map(|f| rig.dir.path().join(format!("{f}.tmp")))
        .collect();
    for dir in &in_the_way {
        std::fs::create_dir(dir).expect("mkdir");
    }
    let e = block_on(b.delete_topic("gone")).expect_err("settings not rewritten");
    assert!(
        matches!(&e, BrokerError::TopicDeleteIncomplete { settings, .. } if settings.len() == 2),
        "{e:?}"
    );
    b.close().expect("close");
    drop(b);
    for dir in &in_the_way {
        std::fs::remove_dir(dir).expect("rmdir");
    }
    for f in files {
        assert!(
            file_holds(&rig, f, "gone"),
            "{f}: the delete did rewrite it"
        );
    }
    let b = open(rig.open(), &rig);
    for f in files {
        assert!(!file_holds(&rig, f, "gone"), "{f} still holds the topic");
        assert!(file_holds(&rig, f, "kept"), "{f} lost a listed topic");
    }
    assert!(!b.msg_id_config("gone").enabled());
    assert_eq!(b.cleanup_config("gone"), CleanupConfig::default());
    assert!(b.msg_id_config("kept").enabled());
    assert_eq!(b.cleanup_config("kept").policy, CleanupPolicy::Compact);
    b.close().expect("close");
}

/// The topic as the broker, its partitions, `topics.meta` and
/// `cleanup.meta` have it; all must agree.
fn altered_state(b: &Broker, rig: &Rig, name: &str) -> (TopicMeta, CleanupConfig) {
    let topic = b.topic(name).expect("listed");
    for p in 0..topic.partitions {
        let id = PartitionId::new(name, p);
        let cfg = block_on(b.storage().running_config(&id));
        assert_eq!(
            cfg, topic.config,
            "{id} runs another config than the table's"
        );
        let segments = block_on(b.partition_details(name, p)).expect("describe");
        assert!(segments.segments_used <= cfg.segments, "{id}");
    }
    let table: BTreeMap<String, TopicMeta> =
        meta::read_file(&rig.dir.path().join(TOPICS_META_FILE))
            .expect("topics.meta")
            .expect("topics.meta");
    assert_eq!(table.get(name), Some(&topic), "topics.meta");
    let cleanup = b.cleanup_config(name);
    let file: cleaner::CleanupTable =
        meta::read_file(&rig.dir.path().join(cleaner::CLEANUP_META_FILE))
            .expect("cleanup.meta")
            .unwrap_or_default();
    assert_eq!(
        file.get(name).copied().unwrap_or_default(),
        cleanup,
        "cleanup.meta"
    );
    (topic, cleanup)
}

/// Where an alter test makes its step fail.
enum AlterFault {
    /// A directory in the way of this temp file (under the data dir): a
    /// write that fails.
    InTheWay(&'static str),
    /// This temp file is /dev/full: a full disk.
    Full(&'static str),
    /// Room on the disk for partition 0's new segments only.
    NoRoomForPartition1,
}

fn grow_alter() -> TopicAlter {
    TopicAlter {
        retention_ms: Some(3_600_000),
        segments: Some(5),
        ..TopicAlter::default()
    }
}

fn shrink_alter() -> TopicAlter {
    TopicAlter {
        retention_ms: Some(3_600_000),
        segments: Some(2),
        ..TopicAlter::default()
    }
}

/// An alter that fails at a step (a partition, the topic table, the
/// cleanup settings) used to leave some of its changes made: the table
/// written while a partition kept its old config, partitions shrunk
/// under a table that still said the old size, the table's config
/// compacted while `cleanup.meta` said delete. Now it leaves the topic as
/// it was, in the broker, its partitions, on disk and after a restart,
/// answering which step failed (`storage_full` on a full disk); once the
/// step can be done the same alter takes effect entirely.
fn an_alter_failing_at(alter: &TopicAlter, fault: &AlterFault, step: AlterStep, seed: u64) {
    let rig = Rig::fault(seed);
    let disk = rig.disk().expect("fault disk").clone();
    let b = open(rig.open(), &rig);
    create(
        &b,
        "t",
        TopicSpec {
            partitions: Some(2),
            ..TopicSpec::default()
        },
    );
    let before = altered_state(&b, &rig, "t");
    let at = |f: &str| rig.dir.path().join(f);
    match fault {
        AlterFault::InTheWay(f) => std::fs::create_dir(at(f)).expect("mkdir"),
        AlterFault::Full(f) => std::os::unix::fs::symlink("/dev/full", at(f)).expect("symlink"),
        AlterFault::NoRoomForPartition1 => disk.set_plan(FaultPlan {
            capacity_bytes: Some(disk.allocated_bytes() + 2 * small_cfg().segment_bytes),
            ..FaultPlan::default()
        }),
    }
    let e = block_on(b.alter_topic("t", alter)).expect_err("the step fails");
    assert_eq!(altered_state(&b, &rig, "t"), before, "changed: {e}");
    assert!(
        matches!(&e, BrokerError::TopicNotAltered { topic, failed, unrestored, dropped, .. }
            if topic == "t" && *failed == step && unrestored.is_empty() && dropped.is_empty()),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("topic 't' was not altered"), "{text}");
    let full = !matches!(fault, AlterFault::InTheWay(_));
    assert_eq!(e.is_disk_full(), full, "{e:?}");
    assert_eq!(text.contains("the disk is full"), full, "{text}");
    b.close().expect("close");
    drop(b);
    let b = open(rig.open(), &rig);
    assert_eq!(altered_state(&b, &rig, "t"), before, "after a restart");
    // Once the step can be done, the same alter takes it all.
    match fault {
        AlterFault::InTheWay(f) => std::fs::remove_dir(at(f)).expect("rmdir"),
        // The failed write took its temp file (the /dev/full link) away.
        AlterFault::Full(f) => assert!(std::fs::symlink_metadata(at(f)).is_err(), "temp left"),
        AlterFault::NoRoomForPartition1 => disk.set_plan(FaultPlan::default()),
    }
    let after = block_on(b.alter_topic("t", alter)).expect("altered");
    let state = altered_state(&b, &rig, "t");
    assert_eq!(state.0, after);
    assert_ne!(state, before);
    b.close().expect("close");
    drop(b);
    let b = open(rig.open(), &rig);
    assert_eq!(altered_state(&b, &rig, "t"), state, "after a restart");
    b.close().expect("close");
}

/// Partition 1's `partition.meta` cannot be written: partition 0 and
/// the table used to take the alter.
#[test]
fn an_alter_a_partition_fails_leaves_the_topic_as_it_was() {
    let fault = AlterFault::InTheWay("topics/t/1/partition.meta.tmp");
    an_alter_failing_at(&grow_alter(), &fault, AlterStep::Partition(1), 33);
}

/// No disk space for partition 1's new segments: partition 0 and the
/// table used to take the grow.
#[test]
fn an_alter_whose_grow_finds_the_disk_full_leaves_the_topic_as_it_was() {
    let fault = AlterFault::NoRoomForPartition1;
    an_alter_failing_at(&grow_alter(), &fault, AlterStep::Partition(1), 34);
}

/// Partition 1's ring shrinks, then its `partition.meta` cannot be
/// written: it used to keep running the smaller ring.
#[test]
fn an_alter_whose_shrink_fails_at_a_partition_leaves_the_topic_as_it_was() {
    let fault = AlterFault::InTheWay("topics/t/1/partition.meta.tmp");
    an_alter_failing_at(&shrink_alter(), &fault, AlterStep::Partition(1), 35);
}

/// `topics.meta` cannot be written for a full disk after a shrink: the
/// partitions used to stay shrunk under the old table.
#[test]
fn an_alter_that_cannot_write_the_topic_table_leaves_the_topic_as_it_was() {
    let fault = AlterFault::Full("topics.meta.tmp");
    let step = AlterStep::File(TOPICS_META_FILE);
    an_alter_failing_at(&shrink_alter(), &fault, step, 36);
}

/// `cleanup.meta` cannot be written for a full disk when compaction is
/// turned on: the table used to say overflow `reject` (compacted) while
/// the cleanup settings said delete.
#[test]
fn an_alter_that_cannot_write_the_cleanup_settings_leaves_the_topic_as_it_was() {
    let compact = TopicAlter {
        cleanup: Some(CleanupPolicy::Compact),
        tombstone_retention_ms: Some(1000),
        ..TopicAlter::default()
    };
    let fault = AlterFault::Full("cleanup.meta.tmp");
    let step = AlterStep::File(cleaner::CLEANUP_META_FILE);
    an_alter_failing_at(&compact, &fault, step, 37);
}

/// The one alter that cannot be undone: `topics.meta` takes it, then
/// `cleanup.meta` cannot be written (a FIFO: its fsync fails), nor
/// `topics.meta` put back (its temp file is then /dev/full). The answer
/// says the topic runs, and a restart loads, the new settings with its
/// old cleanup settings, and the broker, its partitions and both files
/// agree on that; once the files can be written the same alter completes.
#[test]
fn an_alter_whose_table_cannot_be_put_back_says_it_is_incomplete() {
    use crate::storage::tests::{fifo_in_place_of, fifo_reader};
    let rig = Rig::fault(42);
    let b = open(rig.open(), &rig);
    create(&b, "t", TopicSpec::default());
    let (before, old_cleanup) = altered_state(&b, &rig, "t");
    let at = |f: &str| rig.dir.path().join(f);
    let fifo = at(&format!("{}.tmp", cleaner::CLEANUP_META_FILE));
    fifo_in_place_of(&fifo);
    let compact = TopicAlter {
        cleanup: Some(CleanupPolicy::Compact),
        tombstone_retention_ms: Some(1000),
        ..TopicAlter::default()
    };
    let altering = {
        let (b, compact) = (b.clone(), compact.clone());
        std::thread::spawn(move || block_on(b.alter_topic("t", &compact)))
    };
    // The cleanup write waits in its open of the FIFO for a reader; the
    // table was written before it, and its put-back comes after.
    let table = || -> BTreeMap<String, TopicMeta> {
        meta::read_file(&at(TOPICS_META_FILE))
            .expect("topics.meta")
            .expect("topics.meta")
    };
    while table().get("t") == Some(&before) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let full = at(&format!("{TOPICS_META_FILE}.tmp"));
    std::os::unix::fs::symlink("/dev/full", &full).expect("symlink");
    let reader = fifo_reader(&fifo);
    let e = altering.join().expect("the alter").expect_err("incomplete");
    drop(reader);
    for tmp in [&fifo, &full] {
        assert!(std::fs::symlink_metadata(tmp).is_err(), "{tmp:?} left");
    }
    assert!(
        matches!(&e, BrokerError::TopicAlterIncomplete { topic, cleanup, table_error, .. }
            if topic == "t" && *cleanup == old_cleanup && error::disk_full(table_error)),
        "{e:?}"
    );
    // What failed first, the FIFO's fsync, is no full disk.
    assert!(!e.is_disk_full(), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("topic 't' is altered except its cleanup settings")
            && text.contains(&format!("its old cleanup policy {}", old_cleanup.policy)),
        "{text}"
    );
    let (incomplete, cleanup) = altered_state(&b, &rig, "t");
    assert_ne!(
        incomplete, before,
        "the table and partitions keep the alter"
    );
    assert_eq!(cleanup, old_cleanup);
    b.close().expect("close");
    drop(b);
    let b = open(rig.open(), &rig);
    assert_eq!(
        altered_state(&b, &rig, "t"),
        (incomplete, old_cleanup),
        "after a restart"
    );
    block_on(b.alter_topic("t", &compact)).expect("altered");
    let (_, cleanup) = altered_state(&b, &rig, "t");
    assert_eq!(cleanup.policy, CleanupPolicy::Compact);
    b.close().expect("close");
}

/// A shrink of a ring that overwrites drops its oldest segments when its
/// data does not fit; if the alter then fails (here `topics.meta` on a
/// full disk), the ring grows back but those records cannot come back.
/// The answer says so, naming the partition and where it now starts, and
/// the ring is the old size again, also after a restart.
#[test]
fn an_alter_whose_shrink_dropped_records_and_then_failed_says_they_are_gone() {
    let rig = Rig::fault(38);
    let b = open(rig.open(), &rig);
    create(&b, "t", TopicSpec::default());
    // About 9 to a segment: the third is in use.
    for i in 0..24 {
        produce_to(&b, "t", with_msg_id(&i.to_string(), 7000, 1_000)).expect("produced");
    }
    let before = altered_state(&b, &rig, "t");
    let o = b.offsets("t", 0).expect("offsets");
    assert_eq!(o.earliest, 0);
    let full = rig.dir.path().join("topics.meta.tmp");
    std::os::unix::fs::symlink("/dev/full", &full).expect("symlink");
    let shrink = TopicAlter {
        segments: Some(2),
        ..TopicAlter::default()
    };
    let e = block_on(b.alter_topic("t", &shrink)).expect_err("full disk");
    assert!(std::fs::symlink_metadata(&full).is_err(), "temp file left");
    let earliest = b.offsets("t", 0).expect("offsets").earliest;
    assert!(earliest > 0, "the shrink dropped nothing");
    assert!(
        matches!(&e, BrokerError::TopicNotAltered { failed, dropped, unrestored, .. }
            if *failed == AlterStep::File(TOPICS_META_FILE)
                && *dropped == [(0, earliest)]
                && unrestored.is_empty()),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains(&format!(
            "partition 0's oldest records (it now starts at offset {earliest}), and those are gone"
        )),
        "{text}"
    );
    assert!(e.is_disk_full(), "{e:?}");
    assert_eq!(altered_state(&b, &rig, "t"), before);
    b.close().expect("close");
    drop(b);
    let b = open(rig.open(), &rig);
    assert_eq!(altered_state(&b, &rig, "t"), before, "after a restart");
    let o = b.offsets("t", 0).expect("offsets");
    assert_eq!(o.earliest, earliest, "after a restart");
    assert!(o.high_watermark > earliest);
    b.close().expect("close");
}

/// A crash after an alter grew the partitions but before the table took
/// it: the next start shrinks them back. A ring that never overwrites
/// (`overflow = reject`, compacted topics) whose new slots took records
/// meanwhile cannot shrink, which used to stop start-up
/// (`RingTooSmall`). Now the topic keeps the grown ring, in the table and
/// every partition, and every record.
#[test]
fn a_start_after_a_grow_cut_short_keeps_a_ring_that_cannot_shrink_back() {
    let rig = Rig::fault(39);
    let b = open(rig.open(), &rig);
    let spec = TopicSpec {
        partitions: Some(2),
        overflow: Some(OverflowPolicy::Reject),
        ..TopicSpec::default()
    };
    create(&b, "r", spec);
    let (before, _) = altered_state(&b, &rig, "r");
    // The alter's partition step, for partition 0 only: the crash comes
    // before partition 1 and the table.
    let mut grown = before.config.clone();
    grown.segments = 5;
    block_on(
        b.storage()
            .alter_partition(&PartitionId::new("r", 0), grown.clone()),
    )
    .expect("grown");
    // About 8 to a segment: 4 segments, more than the old ring's 3.
    for i in 0..30 {
        produce_to(&b, "r", with_msg_id(&i.to_string(), 7000, 1_000)).expect("produced");
    }
    b.close().expect("close");
    drop(b);
    let b = open(rig.open(), &rig);
    let (after, _) = altered_state(&b, &rig, "r");
    assert_eq!(after.config, grown);
    let o = b.offsets("r", 0).expect("offsets");
    assert_eq!((o.earliest, o.high_watermark), (0, 30));
    b.close().expect("close");
}

/// An admin operation's file writes (`topics.meta` here) ran on the
/// network thread, and with them their fsyncs: every connection it served
/// waited 2 to 4 flushes of an SD card per create, alter or delete. Now
/// a produce is answered while a create's write is held, and the topic
/// is listed once its table is written. Without the offload the held
/// write blocks the one thread that would release it, and fails after a
/// minute.
#[test]
fn a_produce_is_answered_while_a_create_writes_the_topic_table() {
    let rig = Rig::fault(40);
    let b = open(rig.open(), &rig);
    create(&b, "t", TopicSpec::default());
    let (reached, release) = hold_next_meta_write(rig.dir.path());
    let other = async {
        let file = reached.recv().await.expect("the write is held");
        assert_eq!(file, rig.dir.path().join(TOPICS_META_FILE));
        let batch = with_msg_id("a", 10, crate::batch::now_ms());
        let produced = b.produce("t", 0, batch.into()).await?.await?;
        assert!(
            b.topic("new").is_err(),
            "listed before its table is written"
        );
        release.send(()).expect("the write waits");
        Ok::<_, BrokerError>(produced)
    };
    let spec = TopicSpec::default();
    let create = b.create_topic("new", &spec);
    let (created, produced) = block_on(futures_lite::future::zip(create, other));
    created.expect("created");
    assert_eq!(produced.expect("produced").base_offset, 0);
    assert_eq!(b.topic("new").expect("listed").partitions, 1);
    b.close().expect("close");
}

/// A compaction first writes the compacted partition's producer
/// snapshot, with its fsyncs. It did so on the network thread, and every
/// connection there waited: here the held write would block the executor
/// that releases it, and the test fails. Now a produce elsewhere is
/// answered meanwhile.
#[test]
fn a_produce_is_answered_while_a_compaction_writes_its_producer_snapshot() {
    let rig = Rig::fault(42);
    let b = open(rig.open(), &rig);
    create(&b, "t", TopicSpec::default());
    let compacted = TopicSpec {
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicSpec::default()
    };
    create(&b, "c", compacted);
    let mut bb = BatchBuilder::new();
    bb.push_record(crate::batch::now_ms(), Some(b"k"), Some(b"v"), &[]);
    let keyed = bb.finish(ProducerStamp::NONE);
    block_on(async { b.produce("c", 0, keyed.into()).await?.await }).expect("produced");
    let (reached, release) = hold_next_meta_write(rig.dir.path());
    let other = async {
        let file = reached.recv().await.expect("the write is held");
        assert!(
            file.starts_with(rig.dir.path().join("producer-state")),
            "{file:?}"
        );
        let batch = with_msg_id("a", 10, crate::batch::now_ms());
        let produced = b.produce("t", 0, batch.into()).await?.await?;
        release.send(()).expect("the write waits");
        Ok::<_, BrokerError>(produced)
    };
    let (compacted, produced) = block_on(futures_lite::future::zip(
        b.compact_partition("c", 0),
        other,
    ));
    compacted.expect("compacted");
    assert_eq!(produced.expect("produced").base_offset, 0);
    b.close().expect("close");
}

/// A write of `topics.meta` whose directory sync fails comes after its
/// rename: the file has the new table. An alter, or a delete, used to
/// answer an error and keep the old settings, or the topic, in memory
/// (the alter putting its partitions back too), while the file, and so a
/// restart, had the new. Now it takes effect, and broker, partitions and
/// file agree, also after a restart.
#[test]
fn a_table_written_but_not_synced_is_the_one_the_broker_runs() {
    let rig = Rig::fault(41);
    let b = open(rig.open(), &rig);
    create(&b, "t", TopicSpec::default());
    create(&b, "gone", TopicSpec::default());
    let before = altered_state(&b, &rig, "t");
    let table = rig.dir.path().join(TOPICS_META_FILE);
    meta::FAIL_DIR_SYNC.lock().unwrap().push(table.clone());
    let after = block_on(b.alter_topic("t", &grow_alter())).expect("in effect");
    let state = altered_state(&b, &rig, "t");
    assert_eq!(state.0, after);
    assert_ne!(state, before);
    meta::FAIL_DIR_SYNC.lock().unwrap().push(table);
    block_on(b.delete_topic("gone")).expect("deleted");
    assert!(b.topic("gone").is_err());
    assert!(!file_holds(&rig, TOPICS_META_FILE, "gone"));
    b.close().expect("close");
    drop(b);
    let b = open(rig.open(), &rig);
    assert_eq!(altered_state(&b, &rig, "t"), state, "after a restart");
    assert!(b.topic("gone").is_err(), "after a restart");
    b.close().expect("close");
}

/// A topic create whose partition 1's directory cannot be synced (an
/// fsync error on the card, or ENOSPC, injected on the fault disk) is
/// refused with an error that says the topic was not created, names the
/// partition, the directory (or the full disk) and that nothing was kept,
/// and nothing of the topic stays: not listed, no partition directory,
/// none after a restart; the same create succeeds once the disk is
/// healthy. The error was storage's own, bare ("storage I/O: ...").
#[test]
fn a_topic_create_whose_directory_fsync_fails_leaves_nothing() {
    for errno in [libc::EIO, libc::ENOSPC] {
        let rig = Rig::fault(41);
        let disk = rig.disk().expect("fault disk").clone();
        let b = open(rig.open(), &rig);
        let spec = TopicSpec {
            partitions: Some(2),
            ..TopicSpec::default()
        };
        disk.set_plan(FaultPlan {
            fail_dir_syncs_of: Some("topics/t/1"),
            errno,
            ..FaultPlan::default()
        });
        let e = block_on(b.create_topic("t", &spec)).expect_err("refused");
        let text = e.to_string();
        assert!(
            text.starts_with("topic 't' was not created: its partition 1 could not be created (")
                && text.contains("), and nothing of the topic was kept"),
            "{text}"
        );
        if errno == libc::ENOSPC {
            assert!(e.is_disk_full(), "{e:?}");
            assert!(
                text.ends_with("; the disk is full: free space on it, then create the topic again"),
                "{text}"
            );
        } else {
            let dir = rig.dir.path().join("topics/t/1");
            assert!(text.contains(&*dir.to_string_lossy()), "{text}");
            assert!(!e.is_disk_full(), "{e:?}");
        }
        assert!(b.topic("t").is_err(), "listed after a failed create");
        assert!(!rig.dir.path().join("topics/t").exists(), "{text}");
        b.close().expect("close");
        drop(b);
        disk.set_plan(FaultPlan::default());
        let b = open(rig.open(), &rig);
        assert!(b.topic("t").is_err(), "listed after a restart");
        create(&b, "t", spec);
        assert_eq!(b.topic("t").expect("created").partitions, 2);
        b.close().expect("close");
    }
}

/// A compacted topic of `partitions`.
fn compacted(partitions: u32) -> TopicSpec {
    TopicSpec {
        partitions: Some(partitions),
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicSpec::default()
    }
}

/// The names in `dir`, sorted (none if it is missing).
fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A compacted topic's create writes each partition's producers' snapshot
/// and makes sure of the room the next one goes into, which a compaction
/// on a full disk writes. With a directory where partition 1's snapshot
/// goes, the write exchanged it into the spare's place (renameat2 takes a
/// directory as well as a file) and the create succeeded without that
/// room. Now the create is refused and keeps nothing, the directory stays
/// where it was; once it is gone the create succeeds, with the room.
#[test]
fn a_compacted_create_that_cannot_reserve_its_snapshot_room_is_refused() {
    let rig = Rig::fault(44);
    let b = open(rig.open(), &rig);
    let state = rig.dir.path().join("producer-state");
    let in_the_way = state.join("t-1.snap");
    std::fs::create_dir_all(&in_the_way).expect("mkdir");
    let spec = compacted(2);
    let refused = block_on(b.create_topic("t", &spec));
    assert!(refused.is_err(), "created: {refused:?}");
    assert!(b.topic("t").is_err(), "listed after a failed create");
    assert!(
        !b.storage()
            .partitions()
            .iter()
            .any(|(id, _)| &*id.topic == "t"),
        "a partition stays"
    );
    assert!(!rig.dir.path().join("topics/t").exists());
    assert_eq!(names_in(&state), ["t-1.snap"]);
    assert!(in_the_way.is_dir(), "moved");

    std::fs::remove_dir(&in_the_way).expect("rmdir");
    create(&b, "t", spec);
    for p in 0..2 {
        let spare = state.join(format!("t-{p}.snap.spare"));
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&spare).unwrap());
        assert!(blocks * 512 >= 4096, "{}: {blocks} blocks", spare.display());
    }
    b.close().expect("close");
}

/// The snapshot room's failure is said as the partition's is: the topic
/// was not created, which partition, why, and what was kept. It was
/// storage's bare error, and the rollback's report of what stayed was
/// dropped.
#[test]
fn a_create_refused_for_its_snapshot_room_says_the_topic_was_not_created() {
    let rig = Rig::fault(45);
    let b = open(rig.open(), &rig);
    std::fs::create_dir_all(rig.dir.path().join("producer-state/t-1.snap")).expect("mkdir");
    let spec = compacted(2);
    let e = block_on(b.create_topic("t", &spec)).expect_err("refused");
    let text = e.to_string();
    assert!(
        text.starts_with(
            "topic 't' was not created: its partition 1's room for compaction could not be \
             reserved ("
        ) && text.ends_with("), and nothing of the topic was kept"),
        "{text}"
    );
    assert!(text.contains("producer-state/t-1.snap: "), "{text}");
    assert!(!e.is_disk_full(), "{e:?}");
    b.close().expect("close");
}

/// Blocks a file at `path` holds.
fn blocks_of(path: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).expect("metadata"))
}

/// An alter to compacted reserves the snapshot's room as a create does:
/// with a directory where partition 0's snapshot goes (the topic had
/// none yet), it succeeded without it. Now it is refused, and the topic
/// stays as it was.
#[test]
fn an_alter_to_compacted_that_cannot_reserve_its_snapshot_room_is_refused() {
    let rig = Rig::fault(46);
    let b = open(rig.open(), &rig);
    create(&b, "t", TopicSpec::default());
    let in_the_way = rig.dir.path().join("producer-state/t-0.snap");
    std::fs::create_dir_all(&in_the_way).expect("mkdir");
    let compact = TopicAlter {
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicAlter::default()
    };
    let refused = block_on(b.alter_topic("t", &compact));
    assert!(refused.is_err(), "altered: {refused:?}");
    assert!(!b.cleanup_config("t").policy.compacts());
    assert!(in_the_way.is_dir(), "moved");
    std::fs::remove_dir(&in_the_way).expect("rmdir");
    block_on(b.alter_topic("t", &compact)).expect("altered");
    let spare = rig.dir.path().join("producer-state/t-0.snap.spare");
    assert!(blocks_of(&spare) * 512 >= 4096, "{}", blocks_of(&spare));
    b.close().expect("close");
}

/// A compacted partition whose snapshot's spare is there without its room
/// (made while the disk was full) gets the room at the next start: only a
/// spare that was missing was made before.
#[test]
fn start_up_gives_a_snapshot_spare_without_room_its_room() {
    let rig = Rig::fault(47);
    let b = open(rig.open(), &rig);
    create(&b, "c", compacted(1));
    b.close().expect("close");
    drop(b);
    let spare = rig.dir.path().join("producer-state/c-0.snap.spare");
    std::fs::remove_file(&spare).expect("rm");
    std::fs::File::create(&spare).expect("an empty spare");
    assert_eq!(blocks_of(&spare), 0);
    let b = open(rig.open(), &rig);
    assert!(blocks_of(&spare) * 512 >= 4096, "{}", blocks_of(&spare));
    b.close().expect("close");
}
