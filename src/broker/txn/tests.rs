//! The coordinator over a broker on the fault disk.

use super::*;
use crate::batch::ProducerStamp;
use crate::broker::{FetchLimits, FetchPartition};
use crate::storage::io::fault::FaultPlan;
use crate::storage::tests::Rig;
use smol::block_on;

fn open(rig: &Rig) -> Arc<Coordinator> {
    open_with(rig, ABORTED_RANGES_MAX)
}

fn open_with(rig: &Rig, max_aborted_ranges: usize) -> Arc<Coordinator> {
    open_with_clock_and_cap(
        rig,
        Arc::new(crate::broker::SystemClock),
        max_aborted_ranges,
    )
}

fn open_with_clock(rig: &Rig, clock: Arc<dyn crate::broker::Clock>) -> Arc<Coordinator> {
    open_with_clock_and_cap(rig, clock, ABORTED_RANGES_MAX)
}

fn open_with_clock_and_cap(
    rig: &Rig,
    clock: Arc<dyn crate::broker::Clock>,
    max_aborted_ranges: usize,
) -> Arc<Coordinator> {
    let broker = crate::broker::tests::open_with_clock(rig.open(), rig, clock);
    let groups = group::Coordinator::open(broker.clone(), groups_config()).expect("groups open");
    let c = Coordinator::open(broker, groups, txn_config(max_aborted_ranges)).expect("txns open");
    block_on(c.clone().recover());
    c
}

/// As [`open`], its recovery not run yet: a request may come first.
fn open_unrecovered(rig: &Rig) -> Arc<Coordinator> {
    let broker = crate::broker::tests::open_with_clock(
        rig.open(),
        rig,
        Arc::new(crate::broker::SystemClock),
    );
    let groups = group::Coordinator::open(broker.clone(), groups_config()).expect("groups open");
    Coordinator::open(broker, groups, txn_config(ABORTED_RANGES_MAX)).expect("txns open")
}

fn groups_config() -> group::GroupsConfig {
    group::GroupsConfig {
        offsets_retention_ms: 60_000,
        session_timeout_ms_min: 100,
        session_timeout_ms_max: 60_000,
        max_groups: 8,
        max_members: 8,
        max_members_per_group: 8,
        max_metadata: group::OFFSET_METADATA_BYTES_MAX,
    }
}

fn txn_config(max_aborted_ranges: usize) -> TxnConfig {
    TxnConfig {
        max_timeout_ms: 60_000,
        max_ids: 8,
        max_open: 8,
        id_expiration_ms: EXPIRATION_MS,
        max_aborted_ranges,
    }
}

const EXPIRATION_MS: u64 = 86_400_000;

/// A read_committed fetch of "d"/0 from 0: its last stable offset, and
/// whether it returned any batch.
fn read_committed(c: &Coordinator) -> (u64, u64, bool) {
    let parts = [FetchPartition {
        topic: "d",
        partition: 0,
        offset: 0,
        max_bytes: 1 << 20,
    }];
    let limits = FetchLimits {
        min_bytes: 1,
        max_wait: Duration::ZERO,
        max_bytes: 1 << 20,
    };
    let mut r = block_on(c.broker().fetch_isolated(&parts, limits, true));
    let f = r.pop().expect("one partition").expect("fetched");
    (
        f.last_stable_offset,
        f.offsets.high_watermark,
        !f.records.is_empty(),
    )
}

/// A producer's first batch (sequence 0) of one record.
fn batch(producer_id: u64, producer_epoch: u16, value: &[u8]) -> BatchBuf {
    let mut b = crate::batch::BatchBuilder::new();
    b.push(1, None, value, &[]);
    BatchBuf::from(b.finish(ProducerStamp {
        producer_id,
        producer_epoch,
        base_sequence: 0,
    }))
}

/// Produces one record of a transaction (producer id, epoch, sequence)
/// to `topic`/0 while its gate is held, and waits for it to be written.
fn produce_gated(
    c: &Coordinator,
    topic: &str,
    gate: Option<Gate>,
    (pid, epoch, seq): (u64, u16, i32),
) {
    let mut b = crate::batch::BatchBuilder::new();
    b.push(1, None, b"aborted", &[]);
    let batch = b.finish(ProducerStamp {
        producer_id: pid,
        producer_epoch: epoch,
        base_sequence: seq,
    });
    let ack = block_on(c.broker().produce(topic, 0, batch.into())).expect("queued");
    drop(gate);
    block_on(ack).expect("written");
}

fn phase(c: &Coordinator, id: &str) -> &'static str {
    block_on(c.describe())
        .into_iter()
        .find(|d| d.id == id)
        .expect("id known")
        .phase
}

/// An abort whose last log record cannot be written still lets
/// read_committed readers past the aborted records, and holds back the
/// id's next records until it is written; after a restart the id is
/// aborted and its records stay hidden.
#[test]
fn an_abort_whose_log_write_fails_does_not_hold_readers_back() {
    let rig = Rig::fault(31);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig);
    let spec = TopicSpec {
        partitions: Some(1),
        ..TopicSpec::default()
    };
    block_on(c.broker().create_topic("d", &spec)).expect("create");
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    let gate = block_on(c.gate(pid, epoch, "d", 0)).expect("gate");
    assert!(gate.is_some(), "a transactional producer's batch");
    produce_gated(&c, "d", gate, (pid, epoch, 0));
    assert_eq!(read_committed(&c).0, 0, "held back while open");

    disk.set_plan(FaultPlan {
        fail_writes_to: Some(TXN_TOPIC),
        ..FaultPlan::default()
    });
    let e = block_on(c.end("a", pid, epoch, false)).expect_err("the record is not written");
    // Typed as the log's failure (no retry helps before a restart), and
    // saying the transaction is aborted all the same.
    assert_eq!(
        crate::server::txn::txn_error_code(&e),
        crate::protocol::ErrorCode::StorageFailed
    );
    assert!(
        e.to_string().starts_with("transaction a is aborted: "),
        "{e}"
    );
    let (lso, hwm, any) = read_committed(&c);
    assert_eq!(lso, hwm, "the abort's marker is written: readers move on");
    assert!(!any, "the aborted record is left out");
    // The log refuses writes until restart: so does the id, rather than
    // write a record the abort's would be missing behind.
    let e = block_on(c.init("a", 60_000)).expect_err("the record is still not written");
    assert!(
        e.to_string().starts_with("transaction a is aborted: "),
        "{e}"
    );
    assert!(block_on(c.end("a", pid, epoch, false)).is_err());
    // The timers retry the record every pass, and say so once a minute.
    let logged: usize = (0..5).map(|_| block_on(c.timer_pass()).1).sum();
    assert_eq!(logged, 1, "one warning for five failed retries");

    disk.set_plan(FaultPlan::default());
    c.broker().close().expect("close");
    drop(c);
    let c = open(&rig);
    assert_eq!(phase(&c, "a"), "complete_abort");
    let (lso, hwm, any) = read_committed(&c);
    assert_eq!(lso, hwm);
    assert!(!any, "still aborted after the restart");
    block_on(c.init("a", 60_000)).expect("init after the restart");
    c.broker().close().expect("close");
}

/// A coordinator on a manual clock (from 1,000,000 ms), with topic "d" of
/// one partition.
fn open_with_d(rig: &Rig) -> (Arc<crate::broker::ManualClock>, Arc<Coordinator>) {
    let clock = Arc::new(crate::broker::ManualClock::new(1_000_000));
    let c = open_with_clock(rig, clock.clone());
    create_d(&c);
    (clock, c)
}

/// A batch of producer id `pid` to "d" is refused as a forgotten name's.
fn assert_forgotten(c: &Coordinator, pid: u64, epoch: u16) {
    let stale = batch(pid, epoch, b"stale");
    let r = block_on(async { c.broker().produce("d", 0, stale).await?.await });
    assert!(
        matches!(
            r,
            Err(BrokerError::Sequence(
                crate::broker::producers::SequenceError::Forgotten { .. }
            ))
        ),
        "{r:?}"
    );
}

/// An expired id's named producer leaves the producer registry, in
/// memory and on disk, and an instance that outlived it stays fenced; a
/// live id's stays. A new init of the expired id gets a new producer id.
#[test]
fn an_expired_id_leaves_the_producer_registry() {
    let rig = Rig::fault(32);
    let (clock, c) = open_with_d(&rig);
    let (old, epoch) = block_on(c.init("old", 60_000)).expect("init");
    clock.advance_ms(EXPIRATION_MS);
    let live = block_on(c.init("live", 60_000)).expect("init");
    block_on(c.timer_pass());
    assert_eq!(c.stats.expirations.load(Ordering::Relaxed), 1);
    assert_eq!(named(&c, "old"), None, "forgotten");
    assert_eq!(named(&c, "live"), Some(live), "kept");
    assert_forgotten(&c, old, epoch);

    c.broker().close().expect("close");
    drop(c);
    let c = open_with_clock(&rig, clock);
    assert_eq!(named(&c, "old"), None, "still forgotten after a restart");
    assert_eq!(named(&c, "live"), Some(live));
    let (again, _) = block_on(c.init("old", 60_000)).expect("init again");
    assert_ne!(again, old, "a new producer id");
    c.broker().close().expect("close");
}

/// Offsets for a group id out of bounds are refused as the group
/// coordinator refuses that id, with its message.
#[test]
fn add_offsets_checks_the_group_id_as_the_group_coordinator_does() {
    let rig = Rig::fault(33);
    let c = open(&rig);
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    let long = "g".repeat(group::GROUP_ID_BYTES_MAX + 1);
    for g in ["", long.as_str()] {
        let e = block_on(c.add_offsets("a", pid, epoch, g, Vec::new())).expect_err("refused");
        let expected = group::check_id("the group id", g).expect_err("refused");
        match &e {
            TxnError::Group(e) => assert_eq!(e.to_string(), expected.to_string()),
            e => panic!("not the group coordinator's error: {e:?}"),
        }
        assert_eq!(
            crate::server::txn::txn_error_code(&e),
            crate::protocol::ErrorCode::InvalidRequest
        );
    }
    c.broker().close().expect("close");
}

/// Reads `topic`/0 read_committed from its start to its end: the records
/// it shows.
fn committed_records(c: &Coordinator, topic: &str) -> usize {
    committed_records_from(c, topic, 0).0
}

/// Reads `topic`/0 read_committed from `at` as far as it may: the records
/// it shows, and where its reader continues.
fn committed_records_from(c: &Coordinator, topic: &str, mut at: u64) -> (usize, u64) {
    let limits = FetchLimits {
        min_bytes: 1,
        max_wait: Duration::ZERO,
        max_bytes: 1 << 20,
    };
    let mut shown = 0;
    loop {
        let parts = [FetchPartition {
            topic,
            partition: 0,
            offset: at,
            max_bytes: 1 << 20,
        }];
        let mut r = block_on(c.broker().fetch_isolated(&parts, limits, true));
        let f = r.pop().expect("one partition").expect("fetched");
        let (placed, _) = crate::broker::decode_records(&f.records).expect("decodes");
        shown += placed.len();
        match f.next_offset {
            Some(next) if next > at => at = next,
            _ => return (shown, at),
        }
    }
}

/// A topic with the longest name, so its records in the coordinator's log
/// are as large as they get, and rings of 1 MiB segments.
fn long_topic(c: &Coordinator, partitions: u32, segments: u32) -> String {
    let topic = "t".repeat(crate::storage::TOPIC_NAME_BYTES_MAX);
    let spec = TopicSpec {
        partitions: Some(partitions),
        segment_bytes: Some(1 << 20),
        segments: Some(segments),
        ..TopicSpec::default()
    };
    block_on(c.broker().create_topic(&topic, &spec)).expect("create");
    topic
}

/// Aborted transactions on a topic with the longest name, so each range's
/// record in the coordinator's log is as large as it gets: as many as the
/// coordinator takes (more than its log's ring holds, if it takes them
/// all), then a restart. Every aborted record stays hidden from
/// read_committed readers.
#[test]
fn aborted_ranges_outlive_a_restart_however_many_transactions_abort() {
    const TRANSACTIONS: u32 = 20_000;
    let rig = Rig::fault(32);
    let c = open(&rig);
    // Room for every transaction's record and marker: its ranges stay.
    let topic = long_topic(&c, 1, 8);
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    let mut aborted = 0;
    for seq in 0..TRANSACTIONS {
        let gate = match block_on(c.gate(pid, epoch, &topic, 0)) {
            Ok(gate) => gate,
            Err(TxnError::TooManyAborted {
                partition: None, ..
            }) => break,
            Err(e) => panic!("transaction {seq}: {e}"),
        };
        produce_gated(&c, &topic, gate, (pid, epoch, seq as i32));
        block_on(c.end("a", pid, epoch, false)).expect("abort");
        aborted += 1;
    }
    assert_eq!(c.broker().offsets(&topic, 0).expect("offsets").earliest, 0);
    assert_eq!(c.broker().txn_index.aborted(&topic, 0).len(), aborted);

    c.broker().close().expect("close");
    drop(c);
    let c = open(&rig);
    assert_eq!(
        c.broker().txn_index.aborted(&topic, 0).len(),
        aborted,
        "aborted ranges after the restart"
    );
    assert_eq!(committed_records(&c, &topic), 0, "after the restart");
    c.broker().close().expect("close");
}

/// The widest aborted range's record grows a batch of the log by at most
/// ABORTED_RECORD_BYTES_MAX, which the cap is computed from.
#[test]
fn an_aborted_range_record_fits_its_bound() {
    let topic = "t".repeat(crate::storage::TOPIC_NAME_BYTES_MAX);
    let key = encode(&LogKey::Aborted(topic, u32::MAX, u64::MAX));
    let value = encode(&AbortedRecord {
        producer_id: u64::MAX,
        first: u64::MAX,
    });
    let mut b = crate::batch::BatchBuilder::new();
    b.push(0, Some(&key), &value, &[]);
    b.skip_offsets(u32::MAX / 2);
    let before = b.estimated_bytes();
    b.push(i64::MAX / 2, Some(&key), &value, &[]);
    let grown = (b.estimated_bytes() - before) as u64;
    assert!(grown <= ABORTED_RECORD_BYTES_MAX, "{grown} B");
}

/// At the cap, a new transaction is refused, and so is a new partition
/// for one open; the open one still aborts, every range kept, and the
/// cap is not passed.
#[test]
fn a_full_table_of_aborted_ranges_refuses_transactions_never_aborts() {
    const MAX: usize = 16;
    let rig = Rig::fault(33);
    let c = open_with(&rig, MAX);
    let spec = TopicSpec {
        partitions: Some(5),
        segment_bytes: Some(1 << 20),
        segments: Some(4),
        ..TopicSpec::default()
    };
    block_on(c.broker().create_topic("d", &spec)).expect("create");
    let (open_pid, open_epoch) = block_on(c.init("open", 60_000)).expect("init");
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    // "open" holds 2 partitions: 14 (= 16 - 16 / 8) ranges taken refuse
    // a new transaction.
    for p in 0..2 {
        drop(block_on(c.gate(open_pid, open_epoch, "d", p)).expect("gate"));
    }
    let mut aborted = 0;
    let refused = loop {
        assert!(aborted <= MAX, "no refusal past the cap");
        match block_on(c.gate(pid, epoch, "d", 0)) {
            Ok(gate) => drop(gate),
            Err(e) => break e,
        }
        block_on(c.end("a", pid, epoch, false)).expect("abort");
        aborted += 1;
    };
    assert_eq!(aborted, MAX - MAX / 8 - 2);
    assert!(
        matches!(
            refused,
            TxnError::TooManyAborted {
                partition: None,
                max: MAX,
                ..
            }
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("retention"), "{refused}");
    assert_eq!(c.aborted_ranges(), aborted);
    // Nothing of the refused transaction began.
    assert_eq!(phase(&c, "a"), "complete_abort");
    // The open transaction grows into the room kept, up to the cap.
    drop(block_on(c.gate(open_pid, open_epoch, "d", 2)).expect("gate"));
    drop(block_on(c.gate(open_pid, open_epoch, "d", 3)).expect("gate"));
    assert_eq!(c.index().ranges_taken(), MAX);
    let Err(refused) = block_on(c.gate(open_pid, open_epoch, "d", 4)) else {
        panic!("a partition past the cap was added");
    };
    assert!(
        matches!(&refused, TxnError::TooManyAborted { partition: Some((t, 4)), .. } if t == "d"),
        "{refused}"
    );
    // Its abort is not refused: every partition's range is kept.
    block_on(c.end("open", open_pid, open_epoch, false)).expect("abort at the cap");
    assert_eq!(c.aborted_ranges(), MAX);
    assert_eq!(c.index().ranges_taken(), MAX);
    c.broker().close().expect("close");
}

/// Restarts closer together than the log's rewrites: an aborted range
/// from before them all is still in the log after they together wrote
/// more than its ring, so its record stays hidden.
#[test]
fn aborted_ranges_outlive_restarts_between_rewrites() {
    let rig = Rig::fault(34);
    let mut c = open(&rig);
    let topic = long_topic(&c, 5, 4);
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    let gate = block_on(c.gate(pid, epoch, &topic, 0)).expect("gate");
    produce_gated(&c, &topic, gate, (pid, epoch, 0));
    block_on(c.end("a", pid, epoch, false)).expect("abort");
    // Five runs of committed transactions over five partitions, each
    // writing most of a quarter ring: more than the ring in all.
    for _ in 0..5 {
        let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
        while *block_on(c.log.lock()) < LOG_REWRITE_BYTES * 7 / 8 {
            for p in 0..5 {
                drop(block_on(c.gate(pid, epoch, &topic, p)).expect("gate"));
            }
            block_on(c.end("a", pid, epoch, true)).expect("commit");
        }
        c.broker().close().expect("close");
        drop(c);
        c = open(&rig);
    }
    assert_eq!(c.broker().txn_index.aborted(&topic, 0).len(), 1);
    assert_eq!(committed_records(&c, &topic), 0);
    c.broker().close().expect("close");
}

/// Commits transactions of `id` over `topic`'s five partitions until the
/// log has been rewritten (every id's state written again) `rewrites`
/// times.
fn commit_through_rewrites(c: &Coordinator, id: &str, topic: &str, rewrites: usize) {
    let (pid, epoch) = block_on(c.init(id, 60_000)).expect("init");
    let mut since = *block_on(c.log.lock());
    let mut done = 0;
    while done < rewrites {
        for p in 0..5 {
            drop(block_on(c.gate(pid, epoch, topic, p)).expect("gate"));
        }
        block_on(c.end(id, pid, epoch, true)).expect("commit");
        let now = *block_on(c.log.lock());
        if now < since {
            done += 1;
        }
        since = now;
    }
}

fn named(c: &Coordinator, id: &str) -> Option<(u64, u16)> {
    block_on(c.broker().named_producer(&format!("{NAME_PREFIX}{id}")))
}

/// A first batch refused after its transaction began (its partition is
/// not there; the log write adding it fails) leaves the id as it was: no
/// empty transaction open in memory, none written by the log's next
/// rewrite for a restart to load, none whose timeout fences the producer.
#[test]
fn a_refused_first_batch_leaves_no_transaction_begun() {
    let rig = Rig::fault(35);
    let disk = rig.disk().expect("fault rig").clone();
    let clock = Arc::new(crate::broker::ManualClock::new(1_000_000));
    let c = open_with_clock(&rig, clock.clone());
    let topic = long_topic(&c, 5, 4);
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    let Err(e) = block_on(c.gate(pid, epoch, &topic, 9)) else {
        panic!("a batch to partition 9, which is not there, was let in");
    };
    assert!(matches!(e, TxnError::Broker(_)), "{e}");
    assert_eq!(phase(&c, "a"), "empty");
    assert_eq!(
        c.open.load(Ordering::Relaxed),
        0,
        "no slot of max_open taken"
    );
    commit_through_rewrites(&c, "b", &topic, 1);
    c.broker().close().expect("close");
    drop(c);
    let c = open_with_clock(&rig, clock.clone());
    assert_eq!(phase(&c, "a"), "empty", "after a restart");
    assert_eq!(
        named(&c, "a"),
        Some((pid, epoch)),
        "recovery fenced nothing"
    );

    disk.set_plan(FaultPlan {
        fail_writes_to: Some(TXN_TOPIC),
        ..FaultPlan::default()
    });
    let Err(e) = block_on(c.gate(pid, epoch, &topic, 0)) else {
        panic!("a partition was added while the log refuses writes");
    };
    assert!(matches!(e, TxnError::Broker(_)), "{e}");
    disk.set_plan(FaultPlan::default());
    assert_eq!(phase(&c, "a"), "empty");
    assert_eq!(
        c.open.load(Ordering::Relaxed),
        0,
        "no slot of max_open taken"
    );
    assert_eq!(c.index().ranges_taken(), 0, "nor a range");
    clock.advance_ms(60_001);
    block_on(c.timer_pass());
    assert_eq!(
        c.stats.timeouts.load(Ordering::Relaxed),
        0,
        "nothing timed out"
    );
    assert_eq!(
        named(&c, "a"),
        Some((pid, epoch)),
        "the producer is not fenced"
    );
    c.broker().close().expect("close");
}

/// An id held by a batch of its open transaction (to a partition already
/// in it: nothing to write) while the log is rewritten, again and again
/// until the ring has turned over: its record is carried by every
/// rewrite, so after a restart its transaction is found and aborted and
/// its record stays hidden from read_committed readers.
#[test]
fn an_id_locked_through_the_log_rewrites_keeps_its_record() {
    let rig = Rig::fault(36);
    let c = open(&rig);
    let topic = long_topic(&c, 5, 4);
    let (pid, epoch) = block_on(c.init("held", 60_000)).expect("init");
    drop(block_on(c.gate(pid, epoch, &topic, 0)).expect("gate"));
    let gate = block_on(c.gate(pid, epoch, &topic, 0)).expect("gate");
    let ack = block_on(c.broker().produce(&topic, 0, batch(pid, epoch, b"open"))).expect("queued");
    block_on(ack).expect("written");
    // Five quarter rings and more: the id's own records left the ring.
    commit_through_rewrites(&c, "b", &topic, 5);
    drop(gate);
    c.broker().close().expect("close");
    drop(c);
    let c = open(&rig);
    let held = block_on(c.describe()).into_iter().find(|d| d.id == "held");
    assert_eq!(
        held.map(|d| d.phase),
        Some("complete_abort"),
        "its open transaction is known after the restart, and aborted"
    );
    assert_eq!(
        committed_records(&c, &topic),
        0,
        "the aborted record is hidden"
    );
    c.broker().close().expect("close");
}

/// A transactional id whose producer epochs ran out gets a new producer
/// id at epoch 0 (as Kafka's KIP-360): at an init, and at a timeout's
/// fencing, which aborts the open transaction under the old id first. The
/// old id stays fenced, and the new one is the id's after a restart.
#[test]
fn an_id_whose_epochs_ran_out_moves_to_a_new_producer_id() {
    let rig = Rig::fault(37);
    let (clock, c) = open_with_d(&rig);
    let (a_old, _) = block_on(c.init("a", 60_000)).expect("init");
    let (b_old, _) = block_on(c.init("b", 60_000)).expect("init");
    c.broker().close().expect("close");
    drop(c);
    let dir = rig.dir.path();
    crate::broker::producers::set_epoch_on_disk(dir, "txn:a", u16::MAX);
    crate::broker::producers::set_epoch_on_disk(dir, "txn:b", u16::MAX - 1);
    let c = open_with_clock(&rig, clock.clone());
    let described = |c: &Coordinator, id: &str| {
        let d = block_on(c.describe())
            .into_iter()
            .find(|d| d.id == id)
            .expect("id known");
        (d.producer_id, d.producer_epoch, d.phase)
    };

    let (a_new, epoch) = block_on(c.init("a", 60_000)).expect("init at the last epoch");
    assert!(a_new != a_old && epoch == 0, "{a_new}/{epoch}");
    assert!(
        !c.is_transactional(a_old),
        "the id's gate takes no old batch"
    );
    assert_forgotten(&c, a_old, u16::MAX);

    let (b, epoch) = block_on(c.init("b", 60_000)).expect("init");
    assert_eq!((b, epoch), (b_old, u16::MAX));
    let gate = block_on(c.gate(b, epoch, "d", 0)).expect("gate");
    produce_gated(&c, "d", gate, (b, epoch, 0));
    clock.advance_ms(60_001);
    block_on(c.timer_pass());
    assert_eq!(c.stats.timeouts.load(Ordering::Relaxed), 1);
    let (lso, hwm, any) = read_committed(&c);
    assert_eq!(lso, hwm, "aborted under the old id: readers move on");
    assert!(!any, "its record is hidden");
    let (b_new, b_epoch) = named(&c, "b").expect("registered");
    assert!(b_new != b_old && b_epoch == 0, "{b_new}/{b_epoch}");
    assert_eq!(described(&c, "b"), (b_new, 0, "complete_abort"));
    assert!(c.is_transactional(b_new) && !c.is_transactional(b_old));

    c.broker().close().expect("close");
    drop(c);
    let c = open_with_clock(&rig, clock);
    assert_eq!(described(&c, "a"), (a_new, 0, "empty"));
    assert_eq!(described(&c, "b"), (b_new, 0, "complete_abort"));
    let (pid, epoch) = block_on(c.init("b", 60_000)).expect("init");
    assert_eq!((pid, epoch), (b_new, 1));
    let gate = block_on(c.gate(pid, epoch, "d", 0)).expect("gate");
    produce_gated(&c, "d", gate, (pid, epoch, 0));
    block_on(c.end("b", pid, epoch, true)).expect("commit");
    assert_eq!(committed_records(&c, "d"), 1, "the new id's record only");
    c.broker().close().expect("close");
}

/// The first init of an id that fails (its record cannot be written)
/// leaves nothing of the id: no slot of max_transactional_ids held, no
/// listing, no name in the producer registry. A later init makes it.
#[test]
fn a_failed_first_init_keeps_nothing_of_the_id() {
    let rig = Rig::fault(38);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig);
    block_on(c.init("a", 60_000)).expect("init");
    disk.set_plan(FaultPlan {
        fail_writes_to: Some(TXN_TOPIC),
        ..FaultPlan::default()
    });
    let Err(e) = block_on(c.init("new", 60_000)) else {
        panic!("an init whose record was not written answered");
    };
    assert!(matches!(e, TxnError::Broker(_)), "{e}");
    disk.set_plan(FaultPlan::default());
    let ids: Vec<String> = block_on(c.describe()).into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["a"], "the failed id is not kept");
    assert_eq!(named(&c, "new"), None, "nor its name in the registry");
    c.broker().close().expect("close");
    drop(c);
    let c = open(&rig);
    block_on(c.init("new", 60_000)).expect("init after the restart");
    c.broker().close().expect("close");
}

/// A topic "d" of one partition.
fn create_d(c: &Coordinator) {
    let spec = TopicSpec {
        partitions: Some(1),
        ..TopicSpec::default()
    };
    block_on(c.broker().create_topic("d", &spec)).expect("create");
}

fn offsets_of_d(offset: u64) -> Vec<(Tp, u64)> {
    vec![(("d".to_owned(), 0), offset)]
}

/// Offsets alone begin a transaction as durably as a first batch does: on
/// an id fresh from init, or idle after a committed transaction (its
/// commit's retry is answered OK). After a stop or a crash the restart
/// finds it open, aborts it and fences its producer: its commit is
/// refused, never answered OK with the offsets dropped.
#[test]
fn offsets_alone_begin_a_transaction_that_a_restart_aborts_and_fences() {
    let mut answered = Vec::new();
    for (seed, crash) in [(37, false), (38, true)] {
        let rig = Rig::fault(seed);
        let disk = rig.disk().expect("fault rig").clone();
        let c = open(&rig);
        create_d(&c);
        let fresh = block_on(c.init("fresh", 60_000)).expect("init");
        let again = block_on(c.init("again", 60_000)).expect("init");
        let gate = block_on(c.gate(again.0, again.1, "d", 0)).expect("gate");
        produce_gated(&c, "d", gate, (again.0, again.1, 0));
        block_on(c.end("again", again.0, again.1, true)).expect("commit");
        block_on(c.end("again", again.0, again.1, true)).expect("the commit's retry");
        for (id, (pid, epoch)) in [("fresh", fresh), ("again", again)] {
            block_on(c.add_offsets(id, pid, epoch, "g", offsets_of_d(1))).expect("offsets");
            assert_eq!(phase(&c, id), "ongoing");
        }
        if crash {
            disk.crash();
            c.broker().begin_stop();
        } else {
            c.broker().close().expect("close");
        }
        drop(c);
        disk.restart();
        let c = open(&rig);
        for (id, (pid, epoch)) in [("fresh", fresh), ("again", again)] {
            match block_on(c.end(id, pid, epoch, true)) {
                Err(TxnError::Fenced { current, .. }) if current > epoch => {}
                r => answered.push(format!("{id}, crash: {crash}: {r:?}")),
            }
            assert!(c.groups.committed("g", None).is_empty());
        }
        c.broker().close().expect("close");
    }
    assert!(
        answered.is_empty(),
        "commits after the restart not fenced: {answered:?}"
    );
}

/// A request for an id the last run left open that comes before recovery
/// gets to it finds it aborted and its producer fenced, as after: a
/// commit then would drop the offsets added after the last record.
#[test]
fn a_commit_before_recovery_of_a_transaction_left_open_is_fenced() {
    let rig = Rig::fault(39);
    let c = open(&rig);
    create_d(&c);
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    let gate = block_on(c.gate(pid, epoch, "d", 0)).expect("gate");
    produce_gated(&c, "d", gate, (pid, epoch, 0));
    block_on(c.add_offsets("a", pid, epoch, "g", offsets_of_d(1))).expect("offsets");
    c.broker().close().expect("close");
    drop(c);
    let c = open_unrecovered(&rig);
    match block_on(c.end("a", pid, epoch, true)) {
        Err(TxnError::Fenced { current, .. }) => assert!(current > epoch),
        r => panic!("the commit before recovery: {r:?}"),
    }
    assert_eq!(phase(&c, "a"), "complete_abort");
    assert_eq!(committed_records(&c, "d"), 0, "the record is aborted");
    block_on(c.clone().recover());
    assert_eq!(phase(&c, "a"), "complete_abort");
    assert_eq!(
        named(&c, "a").map(|(_, e)| e),
        Some(epoch + 1),
        "fenced once, not again by recovery"
    );
    c.broker().close().expect("close");
}

/// A crash between an init's epoch bump in the producer registry and its
/// record in the log (that write fails here) leaves the registry ahead of
/// the log: after the restart the id takes the registry's epoch, so the
/// instance the init fenced stays fenced, its end and offsets refused.
#[test]
fn an_init_whose_record_was_lost_in_a_crash_keeps_the_old_instance_fenced() {
    let rig = Rig::fault(40);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig);
    create_d(&c);
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    disk.set_plan(FaultPlan {
        fail_writes_to: Some(TXN_TOPIC),
        ..FaultPlan::default()
    });
    assert!(block_on(c.init("a", 60_000)).is_err(), "its record failed");
    assert_eq!(
        named(&c, "a"),
        Some((pid, epoch + 1)),
        "the registry's bump"
    );
    disk.crash_dropping_unsynced();
    c.broker().begin_stop();
    drop(c);
    disk.set_plan(FaultPlan::default());
    disk.restart();
    let c = open(&rig);
    let fenced = |r: &Result<(), TxnError>| matches!(r, Err(TxnError::Fenced { current, .. }) if *current > epoch);
    let offsets = block_on(c.add_offsets("a", pid, epoch, "g", offsets_of_d(1)));
    assert!(fenced(&offsets), "the old instance's offsets: {offsets:?}");
    let end = block_on(c.end("a", pid, epoch, false));
    assert!(fenced(&end), "the old instance's end: {end:?}");
    assert!(c.groups.committed("g", None).is_empty());
    let (pid2, epoch2) = block_on(c.init("a", 60_000)).expect("init after the restart");
    assert_eq!((pid2, epoch2), (pid, epoch + 2));
    c.broker().close().expect("close");
}

/// The instance of an id whose epochs ran out, still on the old producer
/// id, is fenced (`fenced_producer`): a newer instance took the id over,
/// as its batches are told. Not `invalid_txn_state`, as for a producer id
/// that was never the id's. So after a restart, and the new instance's
/// transaction goes on.
#[test]
fn the_old_instance_of_an_id_moved_to_a_new_producer_id_is_fenced() {
    use crate::protocol::ErrorCode;
    use crate::server::txn::txn_error_code;
    let rig = Rig::fault(41);
    let c = open(&rig);
    create_d(&c);
    let (old, _) = block_on(c.init("a", 60_000)).expect("init");
    let (other, other_epoch) = block_on(c.init("b", 60_000)).expect("init");
    c.broker().close().expect("close");
    drop(c);
    crate::broker::producers::set_epoch_on_disk(rig.dir.path(), "txn:a", u16::MAX);
    let mut c = open(&rig);
    let (new, epoch) = block_on(c.init("a", 60_000)).expect("init at the last epoch");
    assert!(new != old && epoch == 0, "{new}/{epoch}");
    for restart in [false, true] {
        if restart {
            c.broker().close().expect("close");
            drop(c);
            c = open(&rig);
        }
        let offsets = block_on(c.add_offsets("a", old, u16::MAX, "g", offsets_of_d(1)));
        let end = block_on(c.end("a", old, u16::MAX, false));
        for r in [offsets, end] {
            let e = r.expect_err("the old instance is refused");
            assert_eq!(txn_error_code(&e), ErrorCode::FencedProducer, "{e}");
        }
        // Another id's producer is not this one's: no fencing, a mistake.
        let e = block_on(c.end("a", other, other_epoch, false)).expect_err("not a's");
        assert_eq!(txn_error_code(&e), ErrorCode::InvalidTxnState, "{e}");
    }
    let gate = block_on(c.gate(new, epoch, "d", 0)).expect("gate");
    produce_gated(&c, "d", gate, (new, epoch, 0));
    block_on(c.end("a", new, epoch, true)).expect("commit");
    assert_eq!(committed_records(&c, "d"), 1);
    c.broker().close().expect("close");
}

/// An end with no transaction open is refused (`invalid_txn_state`), as
/// Kafka's coordinator refuses it: on an id fresh from init, or after an
/// end of the other kind. The retry of the end just made is answered OK,
/// but not for a new instance, whose init leaves the id empty.
#[test]
fn an_end_with_no_transaction_open_is_refused_but_its_retry_is_not() {
    use crate::protocol::ErrorCode;
    use crate::server::txn::txn_error_code;
    let rig = Rig::fault(42);
    let c = open(&rig);
    create_d(&c);
    let refused = |r: Result<(), TxnError>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(
            txn_error_code(&e),
            ErrorCode::InvalidTxnState,
            "{what}: {e}"
        );
        assert!(e.to_string().contains("none is open"), "{what}: {e}");
    };
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    refused(
        block_on(c.end("a", pid, epoch, true)),
        "a commit of nothing",
    );
    refused(
        block_on(c.end("a", pid, epoch, false)),
        "an abort of nothing",
    );
    assert_eq!(phase(&c, "a"), "empty");
    for (seq, commit) in [(0, true), (1, false)] {
        let gate = block_on(c.gate(pid, epoch, "d", 0)).expect("gate");
        produce_gated(&c, "d", gate, (pid, epoch, seq));
        block_on(c.end("a", pid, epoch, commit)).expect("end");
        block_on(c.end("a", pid, epoch, commit)).expect("its retry");
        refused(block_on(c.end("a", pid, epoch, !commit)), "the other end");
    }
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    assert_eq!(phase(&c, "a"), "empty");
    refused(
        block_on(c.end("a", pid, epoch, false)),
        "a new instance's abort",
    );
    c.broker().close().expect("close");
}

/// A topic deleted while a transaction holds one of its partitions takes
/// that partition's records with it: the transaction still ends, commit
/// or abort, in the partitions left, and readers of those move on rather
/// than wait behind it for good.
#[test]
fn a_transaction_ends_after_a_topic_it_wrote_is_deleted() {
    let rig = Rig::fault(41);
    let c = open(&rig);
    create_d(&c);
    let spec = TopicSpec {
        partitions: Some(1),
        ..TopicSpec::default()
    };
    for (id, commit) in [("c", true), ("a", false)] {
        block_on(c.broker().create_topic("e", &spec)).expect("create");
        let (pid, epoch) = block_on(c.init(id, 60_000)).expect("init");
        for topic in ["d", "e"] {
            let gate = block_on(c.gate(pid, epoch, topic, 0)).expect("gate");
            produce_gated(&c, topic, gate, (pid, epoch, 0));
        }
        block_on(c.broker().delete_topic("e")).expect("delete");
        block_on(c.end(id, pid, epoch, commit)).expect("the end");
        let (lso, hwm, _) = read_committed(&c);
        assert_eq!(lso, hwm, "{id}: d's readers move on");
        assert_eq!(
            phase(&c, id),
            if commit {
                "complete_commit"
            } else {
                "complete_abort"
            }
        );
    }
    assert_eq!(
        committed_records(&c, "d"),
        1,
        "the commit's record, not the abort's"
    );
    c.broker().close().expect("close");
}

/// A commit whose decision record fails to be made durable (its fsync
/// fails) may have reached the log all the same: the transaction is in
/// doubt, so it must not be aborted (by the producer or its timeout)
/// while the log may still say commit. Here every write the log took
/// survives the crash that follows: readers must see the transaction
/// one way only, before and after.
#[test]
fn a_commit_whose_decision_may_be_durable_is_never_aborted() {
    let rig = Rig::fault(42);
    let disk = rig.disk().expect("fault rig").clone();
    let (clock, c) = open_with_d(&rig);
    let (pid, epoch) = block_on(c.init("a", 1_000)).expect("init");
    let gate = block_on(c.gate(pid, epoch, "d", 0)).expect("gate");
    produce_gated(&c, "d", gate, (pid, epoch, 0));

    disk.set_plan(FaultPlan {
        sync_error_per_million: 1_000_000,
        ..FaultPlan::default()
    });
    block_on(c.end("a", pid, epoch, true)).expect_err("the decision's fsync fails");
    disk.set_plan(FaultPlan::default());
    // Neither the producer's abort nor its timeout may end it now.
    let _ = block_on(c.end("a", pid, epoch, false));
    clock.advance_ms(2_000);
    block_on(c.timer_pass());
    let (seen_before, at) = committed_records_from(&c, "d", 0);

    // What the failed fsync had written reached the media after all.
    disk.crash_keeping(|_, _, len| 0..len);
    c.broker().begin_stop();
    drop(c);
    disk.restart();
    let c = open_with_clock(&rig, clock);
    // A reader that went on from where it was sees the commit.
    let (seen_after, _) = committed_records_from(&c, "d", at);
    assert_eq!(committed_records(&c, "d"), 1, "committed, as the log says");
    assert_eq!(
        (seen_before, seen_after),
        (0, 1),
        "held back while in doubt, then shown: not passed over as aborted"
    );
    c.broker().close().expect("close");
}

/// A transaction of id "a" (initialised again) of one record to "d"/0,
/// ended as `commit` says.
fn one_record_in_d(c: &Coordinator, commit: bool) {
    let (pid, epoch) = block_on(c.init("a", 60_000)).expect("init");
    let gate = block_on(c.gate(pid, epoch, "d", 0)).expect("gate");
    produce_gated(c, "d", gate, (pid, epoch, 0));
    block_on(c.end("a", pid, epoch, commit)).expect("the end");
}

/// Commits one record to a "d" made again, and reads it read_committed,
/// then after a clean restart.
fn commit_in_d_made_again(rig: &Rig, c: Arc<Coordinator>) {
    create_d(&c);
    one_record_in_d(&c, true);
    assert_eq!(committed_records(&c, "d"), 1, "the new topic's commit");
    c.broker().close().expect("close");
    drop(c);
    let c = open(rig);
    assert_eq!(committed_records(&c, "d"), 1, "after a restart");
    c.broker().close().expect("close");
}

/// A topic deleted and made again by the same name starts with no aborted
/// ranges: a transaction aborted in the old one hides nothing of the new
/// one, where the same producer id (its transactional id's) writes again
/// from offset 0. Also after a restart.
#[test]
fn a_topic_made_again_keeps_no_aborted_range_of_the_old_one() {
    let rig = Rig::fault(43);
    let c = open(&rig);
    create_d(&c);
    one_record_in_d(&c, false);
    // As the server's delete does.
    block_on(c.broker().delete_topic("d")).expect("delete");
    block_on(c.forget_topic("d")).expect("forget its ranges");
    commit_in_d_made_again(&rig, c);
}

/// A delete whose tombstones for the topic's aborted ranges never reach
/// the log (its write fails, then a crash) leaves the ranges there: the
/// next start finds their topic gone and drops them durably, so a topic
/// made again by the name later does not load them back at a restart.
#[test]
fn aborted_ranges_of_a_topic_gone_at_start_up_stay_gone() {
    let rig = Rig::fault(44);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig);
    create_d(&c);
    one_record_in_d(&c, false);
    block_on(c.broker().delete_topic("d")).expect("delete");
    disk.set_plan(FaultPlan {
        fail_writes_to: Some(TXN_TOPIC),
        ..FaultPlan::default()
    });
    block_on(c.forget_topic("d")).expect_err("the tombstones are not written");
    disk.set_plan(FaultPlan::default());
    disk.crash_dropping_unsynced();
    c.broker().begin_stop();
    drop(c);
    disk.restart();
    commit_in_d_made_again(&rig, open(&rig));
}
