//! The coordinator over a broker on the fault disk.

use super::*;
use crate::batch::ProducerStamp;
use crate::broker::{FetchLimits, FetchPartition};
use crate::storage::io::fault::FaultPlan;
use crate::storage::tests::Rig;
use smol::block_on;

fn open(rig: &Rig) -> Arc<Coordinator> {
    open_with_clock(rig, Arc::new(crate::broker::SystemClock))
}

fn open_with_clock(rig: &Rig, clock: Arc<dyn crate::broker::Clock>) -> Arc<Coordinator> {
    let broker = crate::broker::tests::open_with_clock(rig.open(), rig, clock);
    let groups = group::Coordinator::open(
        broker.clone(),
        group::GroupsConfig {
            offsets_retention_ms: 60_000,
            session_timeout_ms_min: 100,
            session_timeout_ms_max: 60_000,
            max_groups: 8,
            max_members: 8,
            max_members_per_group: 8,
            max_metadata: group::OFFSET_METADATA_BYTES_MAX,
        },
    )
    .expect("groups open");
    let config = TxnConfig {
        max_timeout_ms: 60_000,
        max_ids: 8,
        max_open: 8,
        id_expiration_ms: EXPIRATION_MS,
    };
    let c = Coordinator::open(broker, groups, config).expect("txns open");
    block_on(c.clone().recover());
    c
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
    let ack = block_on(c.broker().produce("d", 0, batch(pid, epoch, b"aborted"))).expect("queued");
    drop(gate);
    block_on(ack).expect("written");
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

/// An expired id's named producer leaves the producer registry, in
/// memory and on disk, and an instance that outlived it stays fenced; a
/// live id's stays. A new init of the expired id gets a new producer id.
#[test]
fn an_expired_id_leaves_the_producer_registry() {
    let rig = Rig::fault(32);
    let clock = Arc::new(crate::broker::ManualClock::new(1_000_000));
    let c = open_with_clock(&rig, clock.clone());
    let spec = TopicSpec {
        partitions: Some(1),
        ..TopicSpec::default()
    };
    block_on(c.broker().create_topic("d", &spec)).expect("create");
    let (old, epoch) = block_on(c.init("old", 60_000)).expect("init");
    clock.advance_ms(EXPIRATION_MS);
    let live = block_on(c.init("live", 60_000)).expect("init");
    block_on(c.timer_pass());
    assert_eq!(c.stats.expirations.load(Ordering::Relaxed), 1);
    let named =
        |c: &Coordinator, id: &str| block_on(c.broker().named_producer(&format!("txn:{id}")));
    assert_eq!(named(&c, "old"), None, "forgotten");
    assert_eq!(named(&c, "live"), Some(live), "kept");

    let stale = batch(old, epoch, b"stale");
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
