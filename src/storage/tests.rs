//! Storage engine tests. Every behavioural test runs over each backend
//! through [`Rig`]: the fault-injecting in-memory disk, and pwrite and
//! io_uring (where the kernel allows it) over real files.

use super::io::fault::{FaultBackend, FaultDisk, FaultPlan};
use super::io::pwrite::PwriteBackend;
use super::*;
use crate::batch::{self, BatchBuilder, BatchIter, ProducerStamp};
use smol::block_on;

/// A data directory plus a way to make backends over it, so a test can
/// stop and reopen the storage (and, on the fault disk, crash it).
pub(crate) struct Rig {
    pub dir: tempfile::TempDir,
    pub kind: RigKind,
}

pub(crate) enum RigKind {
    Fault(FaultDisk),
    Files(fn() -> Box<dyn IoBackend>),
}

fn pwrite_backend() -> Box<dyn IoBackend> {
    Box::new(PwriteBackend::new())
}

/// io_uring over real files; only handed out where [`uring_available`]
/// said the kernel allows it.
#[cfg(target_os = "linux")]
pub(crate) fn uring_backend() -> Box<dyn IoBackend> {
    let b = super::io::uring::UringBackend::new(super::io::URING_ENTRIES);
    Box::new(b.expect("io_uring was available a moment ago"))
}

/// Whether io_uring can be set up here (not under qemu-user, seccomp or
/// `kernel.io_uring_disabled`); its suites are skipped, with a note, if not.
#[cfg(target_os = "linux")]
pub(crate) fn uring_available() -> bool {
    match super::io::uring::UringBackend::new(2) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("io_uring unavailable here ({e}); its rig is skipped");
            false
        }
    }
}

impl Rig {
    pub fn fault(seed: u64) -> Rig {
        Rig {
            dir: test_dir(),
            kind: RigKind::Fault(FaultDisk::new(seed, FaultPlan::default())),
        }
    }
    pub fn files(make: fn() -> Box<dyn IoBackend>) -> Rig {
        Rig {
            dir: test_dir(),
            kind: RigKind::Files(make),
        }
    }
    pub fn disk(&self) -> Option<&FaultDisk> {
        match &self.kind {
            RigKind::Fault(d) => Some(d),
            RigKind::Files(_) => None,
        }
    }
    pub fn cfg(&self) -> StorageConfig {
        StorageConfig {
            data_dir: self.dir.path().to_path_buf(),
            backend: BackendChoice::Pwrite,
            append_queue_depth: 64,
            tail_buffer_bytes: 64 * 1024,
            max_partitions: 8,
            max_batch_bytes: 32 * 1024,
            prewrite_segments: false,
            observer: None,
            ..StorageConfig::default()
        }
    }
    pub fn open_with(&self, cfg: StorageConfig) -> Result<Storage, StorageError> {
        let backend: Box<dyn IoBackend> = match &self.kind {
            RigKind::Fault(d) => Box::new(FaultBackend::new(d.clone())),
            RigKind::Files(make) => make(),
        };
        Storage::open_with_backend(cfg, backend)
    }
    pub fn open(&self) -> Storage {
        self.open_with(self.cfg()).expect("open storage")
    }
}

/// Every backend the behavioural tests run on.
pub(crate) fn rigs() -> Vec<(&'static str, Rig)> {
    let mut rigs = vec![
        ("fault", Rig::fault(7)),
        ("pwrite", Rig::files(pwrite_backend)),
    ];
    #[cfg(target_os = "linux")]
    if uring_available() {
        rigs.push(("io_uring", Rig::files(uring_backend)));
    }
    rigs
}

pub(crate) fn pid(t: &str, p: u32) -> PartitionId {
    PartitionId::new(t, p)
}

pub(crate) fn small_cfg() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 64 * 1024,
        segments: 3,
        retention_ms: None,
        durability: Durability::Always,
        overflow: OverflowPolicy::Overwrite,
    }
}

/// A producer batch of `records` records of `value_bytes` each; the
/// values encode `tag` so batches differ.
pub(crate) fn make_batch(records: u32, value_bytes: usize, tag: u64, ts: i64) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for i in 0..records {
        let mut v = vec![0u8; value_bytes];
        for (j, x) in v.iter_mut().enumerate() {
            *x = (tag as usize + i as usize * 31 + j) as u8;
        }
        b.push(ts + i64::from(i), Some(&tag.to_le_bytes()), &v, &[]);
    }
    b.finish(ProducerStamp::NONE)
}

/// The batch as the log stores it: offsets assigned.
pub(crate) fn stored(mut b: Vec<u8>, base: u64) -> Vec<u8> {
    batch::verify_and_assign_offset(&mut b, base).expect("valid batch");
    b
}

/// Reads everything in `[from, hw)` batch by batch.
pub(crate) fn read_all(s: &Storage, id: &PartitionId, from: u64) -> Vec<Vec<u8>> {
    let hw = s.offsets(id).unwrap().high_watermark;
    let mut out = Vec::new();
    let mut at = from;
    while at < hw {
        let bytes = block_on(s.read(id, at, 16 * 1024)).expect("read");
        assert!(!bytes.is_empty(), "empty read below hw at {at}");
        for v in BatchIter::new(&bytes) {
            let v = v.expect("read returned a valid batch");
            assert!(v.header.base_offset <= at.max(v.header.base_offset));
            at = v.header.next_offset();
            out.push(v.bytes.to_vec());
        }
    }
    out
}

#[test]
fn config_strings_round_trip() {
    for s in ["always", "never", "interval:5"] {
        assert_eq!(s.parse::<Durability>().unwrap().to_string(), s);
    }
    for bad in ["interval:", "interval:0", "sometimes", "interval:-1"] {
        assert!(bad.parse::<Durability>().is_err(), "{bad}");
    }
    assert_eq!(
        "reject".parse::<OverflowPolicy>().unwrap(),
        OverflowPolicy::Reject
    );
    assert_eq!(
        "io_uring".parse::<BackendChoice>().unwrap().to_string(),
        "io_uring"
    );
    assert!(PartitionConfig::default().validate().is_ok());
    let mut c = small_cfg();
    c.segment_bytes = 64 * 1024 + 1;
    assert!(c.validate().is_err());
    c.segment_bytes = 32 * 1024;
    assert!(c.validate().is_err());
    let mut c = small_cfg();
    c.segments = 1;
    assert!(c.validate().is_err());
    assert!(StorageConfig::default().validate().is_ok());
    let s = StorageConfig {
        tail_buffer_bytes: 512 * 1024,
        ..StorageConfig::default()
    };
    assert!(s.validate().is_err(), "tail must hold a max batch");
    assert_eq!(pid("a.b", 3).to_string(), "a.b/3");
    assert!(validate_topic_name("../x").is_err());
    assert!(validate_topic_name("").is_err());
    assert!(validate_topic_name("sensors.temp-1_a").is_ok());
}

#[test]
fn append_read_reopen() {
    for (name, rig) in rigs() {
        let id = pid("t", 0);
        let mut sent = Vec::new();
        {
            let s = rig.open();
            block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
            assert!(matches!(
                block_on(s.create_partition(id.clone(), small_cfg())),
                Err(StorageError::PartitionExists(_))
            ));
            let o = s.offsets(&id).unwrap();
            assert_eq!((o.earliest, o.high_watermark), (0, 0), "{name}");
            assert!(block_on(s.read(&id, 0, 1000)).unwrap().is_empty());
            let mut next = 0;
            for i in 0..20u64 {
                let n = 1 + (i % 4) as u32;
                let b = make_batch(n, 50 + i as usize * 7, i, 1_000 + i as i64 * 10);
                let ack = block_on(s.append(&id, b.clone())).unwrap();
                assert_eq!(ack.base_offset, next, "{name}");
                assert_eq!(ack.last_offset, next + u64::from(n) - 1);
                sent.push(stored(b, next));
                next += u64::from(n);
            }
            assert_eq!(s.offsets(&id).unwrap().high_watermark, next);
            assert_eq!(read_all(&s, &id, 0), sent, "{name}: read back");
            // A read from the middle of a batch starts with that batch.
            let mid = block_on(s.read(&id, 2, 1)).unwrap();
            assert_eq!(mid, sent[1], "{name}");
            assert!(matches!(
                block_on(s.read(&id, next + 1, 10)),
                Err(StorageError::OffsetOutOfRange { .. })
            ));
            assert_eq!(s.partitions(), vec![(id.clone(), small_cfg())]);
            s.shutdown().unwrap();
            s.shutdown().unwrap();
            assert!(matches!(
                block_on(s.append(&id, make_batch(1, 1, 1, 1))),
                Err(StorageError::ShuttingDown)
            ));
        }
        let s = rig.open();
        let rep = s.recovery_report();
        assert_eq!(rep.len(), 1);
        assert_eq!(rep[0].bytes_truncated, 0, "{name}: {rep:?}");
        assert!(!rep[0].quarantined);
        assert_eq!(read_all(&s, &id, 0), sent, "{name}: after reopen");
        let hw = s.offsets(&id).unwrap().high_watermark;
        let ack = block_on(s.append(&id, make_batch(2, 10, 99, 5_000))).unwrap();
        assert_eq!(ack.base_offset, hw);
        s.shutdown().unwrap();
    }
}

#[test]
fn ring_wraps_and_overwrites_oldest() {
    for (name, rig) in rigs() {
        let id = pid("wrap", 1);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let mut sent = Vec::new();
        let mut next = 0u64;
        // ~3 KiB batches: 3 segments of 60 KiB usable hold ~60; write 150.
        for i in 0..150u64 {
            let b = make_batch(3, 1000, i, i as i64);
            let ack = block_on(s.append(&id, b.clone())).unwrap();
            assert_eq!(ack.base_offset, next);
            sent.push((next, stored(b, next)));
            next += 3;
        }
        let o = s.offsets(&id).unwrap();
        assert_eq!(o.high_watermark, next, "{name}");
        assert!(o.earliest > 0, "{name}: the ring must have wrapped");
        let expect: Vec<Vec<u8>> = sent
            .iter()
            .filter(|(off, _)| *off >= o.earliest)
            .map(|(_, b)| b.clone())
            .collect();
        assert_eq!(read_all(&s, &id, o.earliest), expect, "{name}");
        assert!(matches!(
            block_on(s.read(&id, o.earliest - 1, 10)),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        s.shutdown().unwrap();
        let s = rig.open();
        assert_eq!(s.offsets(&id).unwrap(), o, "{name}: offsets after reopen");
        assert_eq!(
            read_all(&s, &id, o.earliest),
            expect,
            "{name}: after reopen"
        );
        s.shutdown().unwrap();
    }
}

#[test]
fn reject_policy_says_full() {
    for (name, rig) in rigs() {
        let id = pid("rej", 0);
        let s = rig.open();
        let cfg = PartitionConfig {
            overflow: OverflowPolicy::Reject,
            ..small_cfg()
        };
        block_on(s.create_partition(id.clone(), cfg)).unwrap();
        let mut full_at = None;
        for i in 0..200u64 {
            match block_on(s.append(&id, make_batch(3, 1000, i, 0))) {
                Ok(_) => {}
                Err(StorageError::Full(_)) => {
                    full_at = Some(i);
                    break;
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
        let i = full_at.expect("ring must fill");
        assert!(i > 40, "{name}: filled after {i}");
        assert_eq!(
            s.offsets(&id).unwrap().earliest,
            0,
            "{name}: nothing dropped"
        );
        assert_eq!(read_all(&s, &id, 0).len() as u64, i);
        s.shutdown().unwrap();
    }
}

#[test]
fn offset_for_timestamp_finds_first_at_or_after() {
    for (name, rig) in rigs() {
        let id = pid("ts", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        for i in 0..100u64 {
            // Batch i has records at 10_000 + 100 i and + 1.
            block_on(s.append(&id, make_batch(2, 500, i, 10_000 + i as i64 * 100))).unwrap();
        }
        let earliest = s.offsets(&id).unwrap().earliest;
        let q = |ts| block_on(s.offset_for_timestamp(&id, ts)).unwrap();
        assert_eq!(q(0), Some(earliest), "{name}");
        assert_eq!(q(10_000 + 50 * 100 + 1), Some(100), "{name}");
        assert_eq!(q(10_000 + 50 * 100 + 2), Some(102), "{name}");
        assert_eq!(q(10_000 + 99 * 100 + 1), Some(198), "{name}");
        assert_eq!(q(10_000 + 99 * 100 + 2), None, "{name}");
        s.shutdown().unwrap();
    }
}

/// A batch whose CRC does not match: its last byte flipped.
fn corrupt_batch() -> Vec<u8> {
    let mut b = make_batch(1, 10, 1, 1);
    let last = b.len() - 1;
    b[last] ^= 1;
    b
}

#[test]
fn invalid_and_oversized_batches_are_refused() {
    for (name, rig) in rigs() {
        let id = pid("bad", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        assert!(matches!(
            block_on(s.append(&id, corrupt_batch())),
            Err(StorageError::InvalidBatch(_))
        ));
        assert!(matches!(
            block_on(s.append(&id, make_batch(1, 40 * 1024, 1, 1))),
            Err(StorageError::BatchTooLarge { .. })
        ));
        assert!(matches!(
            block_on(s.append(&pid("nope", 0), make_batch(1, 1, 1, 1))),
            Err(StorageError::UnknownPartition(_))
        ));
        assert_eq!(s.offsets(&id).unwrap().high_watermark, 0, "{name}");
        block_on(s.append(&id, make_batch(1, 10, 1, 1))).unwrap();
        s.shutdown().unwrap();
    }
}

#[test]
fn group_commit_shares_fsyncs() {
    for (name, rig) in rigs() {
        let id = pid("gc", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let before = s.stats();
        let acks = block_on(async {
            let mut tickets = Vec::new();
            for i in 0..50u64 {
                tickets.push(s.submit(&id, make_batch(1, 100, i, 0)).await.unwrap());
            }
            let mut acks = Vec::new();
            for t in tickets {
                acks.push(t.await.unwrap());
            }
            acks
        });
        for (i, a) in acks.iter().enumerate() {
            assert_eq!(
                a.base_offset, i as u64,
                "{name}: submit order is offset order"
            );
        }
        let d = s.stats();
        assert_eq!(d.appends - before.appends, 50);
        assert!(
            d.fsyncs - before.fsyncs < 50,
            "{name}: {} fsyncs for 50 queued appends",
            d.fsyncs - before.fsyncs
        );
        s.shutdown().unwrap();
    }
}

/// `submit_all` checks every batch before handing any over, and hands them
/// over with one wake-up, so a storage thread that was asleep writes them
/// as one group with one fdatasync.
#[test]
fn submit_all_is_all_or_nothing_and_one_group() {
    for (name, rig) in rigs() {
        let id = pid("all", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let good = || make_batch(1, 10, 1, 1);
        let refused = block_on(s.submit_all(&id, vec![good(), corrupt_batch(), good()]));
        assert!(
            matches!(refused, Err(StorageError::InvalidBatch(_))),
            "{name}"
        );
        let refused = block_on(s.submit_all(&id, vec![good(), make_batch(1, 40 * 1024, 1, 1)]));
        assert!(
            matches!(refused, Err(StorageError::BatchTooLarge { .. })),
            "{name}"
        );
        assert_eq!(
            s.offsets(&id).unwrap().high_watermark,
            0,
            "{name}: nothing handed over"
        );

        // Let the thread go to sleep, as between a group's acks and the
        // producer's answer to them.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let before = s.stats();
        let batches: Vec<Vec<u8>> = (0..5u64).map(|i| make_batch(2, 100, i, 0)).collect();
        let acks: Vec<AppendAck> = block_on(async {
            let tickets = s.submit_all(&id, batches).await.unwrap();
            let mut acks = Vec::new();
            for t in tickets {
                acks.push(t.await.unwrap());
            }
            acks
        });
        let bases: Vec<u64> = acks.iter().map(|a| a.base_offset).collect();
        assert_eq!(bases, vec![0, 2, 4, 6, 8], "{name}: in order");
        let d = s.stats();
        assert_eq!(d.fsyncs - before.fsyncs, 1, "{name}: one group");
        s.shutdown().unwrap();
    }
}

/// More batches than the command queue holds all go in, in order. (A
/// quiet submit also rings before it waits for room; without that the
/// thread still wakes on its own within a few seconds, so this test shows
/// order and completion, not the prompt wake-up.)
#[test]
fn submit_all_beyond_the_queue_depth_goes_in_order() {
    for (name, rig) in rigs() {
        let id = pid("deep", 0);
        let s = rig
            .open_with(StorageConfig {
                append_queue_depth: 2,
                ..rig.cfg()
            })
            .unwrap();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let batches: Vec<Vec<u8>> = (0..7u64).map(|i| make_batch(1, 100, i, 0)).collect();
        let acks = block_on(async {
            let tickets = s.submit_all(&id, batches).await.unwrap();
            let mut acks = Vec::new();
            for t in tickets {
                acks.push(t.await.unwrap().base_offset);
            }
            acks
        });
        assert_eq!(acks, (0..7).collect::<Vec<u64>>(), "{name}");
        s.shutdown().unwrap();
    }
}

/// `interval:<ms>` acks once the batch is written, before its fdatasync,
/// and the fdatasync follows within `ms`; `never` acks after the write.
/// A clean shutdown makes both durable.
#[test]
fn interval_and_never_policies_ack_after_the_write_and_persist() {
    for (name, rig) in rigs() {
        let s = rig.open();
        let with = |d| PartitionConfig {
            durability: d,
            ..small_cfg()
        };
        let (long, short, nv) = (pid("long", 0), pid("short", 0), pid("nv", 0));
        // A minute: its fdatasync cannot come due during the test.
        block_on(s.create_partition(long.clone(), with(Durability::IntervalMs(60_000)))).unwrap();
        block_on(s.create_partition(short.clone(), with(Durability::IntervalMs(20)))).unwrap();
        block_on(s.create_partition(nv.clone(), with(Durability::Never))).unwrap();

        let a = block_on(s.append(&long, make_batch(1, 100, 1, 0))).unwrap();
        assert_eq!(a.base_offset, 0);
        let o = s.offsets(&long).unwrap();
        assert_eq!(
            (o.high_watermark, o.durable),
            (1, 0),
            "{name}: acked before its sync"
        );

        block_on(s.append(&short, make_batch(1, 100, 1, 0))).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.offsets(&short).unwrap().durable < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: interval:20 never fdatasynced"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }

        let a = block_on(s.append(&nv, make_batch(1, 100, 1, 0))).unwrap();
        assert_eq!(a.base_offset, 0);
        assert_eq!(s.offsets(&nv).unwrap().high_watermark, 1, "{name}");

        for id in [&long, &short, &nv] {
            block_on(s.append(id, make_batch(1, 100, 2, 0))).unwrap();
        }
        s.shutdown().unwrap();
        let s = rig.open();
        for id in [&long, &short, &nv] {
            assert_eq!(read_all(&s, id, 0).len(), 2, "{name} {id}");
            let o = s.offsets(id).unwrap();
            assert_eq!(o.durable, o.high_watermark, "{name} {id}");
        }
        s.shutdown().unwrap();
    }
}

/// What `interval` trades away, and only that: a power cut may take
/// batches acked since the last fdatasync. Recovery neither quarantines
/// nor leaves a gap, and what was fdatasynced stays.
#[test]
fn interval_power_cut_loses_only_what_was_not_yet_synced() {
    let rig = Rig::fault(11);
    let disk = rig.disk().unwrap().clone();
    let id = pid("iv", 0);
    let s = rig.open();
    let cfg = PartitionConfig {
        durability: Durability::IntervalMs(60_000),
        ..small_cfg()
    };
    block_on(s.create_partition(id.clone(), cfg)).unwrap();
    let synced = fill(&s, &id, 3, 0);
    // A clean shutdown fdatasyncs.
    s.shutdown().unwrap();
    let s = rig.open();
    let end = s.offsets(&id).unwrap().high_watermark;
    assert_eq!(s.offsets(&id).unwrap().durable, end);
    fill(&s, &id, 4, 100);
    let o = s.offsets(&id).unwrap();
    assert!(o.high_watermark > end);
    assert_eq!(o.durable, end, "acked, not yet synced");
    disk.crash_dropping_unsynced();
    let _ = s.shutdown();
    drop(s);
    disk.restart();
    let s = rig.open();
    let rep = &s.recovery_report()[0];
    assert!(!rep.quarantined, "{rep:?}");
    assert_eq!(read_all(&s, &id, 0), synced);
    let a = block_on(s.append(&id, make_batch(1, 10, 7, 0))).unwrap();
    assert_eq!(a.base_offset, end, "the log goes on densely");
    s.shutdown().unwrap();
}

#[test]
fn delete_partition_removes_it() {
    for (name, rig) in rigs() {
        let id = pid("del", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        block_on(s.append(&id, make_batch(1, 10, 1, 1))).unwrap();
        block_on(s.delete_partition(&id)).unwrap();
        assert!(matches!(
            s.offsets(&id),
            Err(StorageError::UnknownPartition(_))
        ));
        assert!(!rig.dir.path().join("topics/del/0").exists(), "{name}");
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        assert_eq!(s.offsets(&id).unwrap().high_watermark, 0, "{name}");
        s.shutdown().unwrap();
        let s = rig.open();
        assert_eq!(s.partitions().len(), 1);
        s.shutdown().unwrap();
    }
}

#[test]
fn too_many_partitions() {
    let rig = Rig::fault(1);
    let s = rig
        .open_with(StorageConfig {
            max_partitions: 2,
            ..rig.cfg()
        })
        .unwrap();
    block_on(s.create_partition(pid("a", 0), small_cfg())).unwrap();
    block_on(s.create_partition(pid("a", 1), small_cfg())).unwrap();
    assert!(matches!(
        block_on(s.create_partition(pid("a", 2), small_cfg())),
        Err(StorageError::TooManyPartitions { max: 2 })
    ));
    s.shutdown().unwrap();
}

/// Appends `n` batches and returns them as stored, with their offsets.
fn fill(s: &Storage, id: &PartitionId, n: u64, tag0: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..n {
        let b = make_batch(
            1 + (i % 3) as u32,
            200 + (i as usize * 13) % 700,
            tag0 + i,
            0,
        );
        let ack = block_on(s.append(id, b.clone())).unwrap();
        out.push(stored(b, ack.base_offset));
    }
    out
}

#[test]
fn crash_keeps_every_acknowledged_batch() {
    for seed in 0..20 {
        let rig = Rig::fault(seed);
        let disk = rig.disk().unwrap().clone();
        let id = pid("crash", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let acked = fill(&s, &id, 10 + seed * 3, 0);
        // More appends in flight, never awaited: some may reach the disk.
        let tickets: Vec<_> = (0..5)
            .map(|i| block_on(s.submit(&id, make_batch(2, 300, 1000 + i, 0))).unwrap())
            .collect();
        disk.crash();
        drop(tickets);
        let _ = s.shutdown();
        drop(s);
        disk.restart();
        let s = rig.open();
        let rep = &s.recovery_report()[0];
        assert!(!rep.quarantined, "seed {seed}: {rep:?}");
        let got = read_all(&s, &id, 0);
        assert!(got.len() >= acked.len(), "seed {seed}: lost acked batches");
        assert_eq!(got[..acked.len()], acked[..], "seed {seed}");
        // The log goes on densely after recovery.
        let hw = s.offsets(&id).unwrap().high_watermark;
        let a = block_on(s.append(&id, make_batch(1, 10, 7, 0))).unwrap();
        assert_eq!(a.base_offset, hw);
        s.shutdown().unwrap();
    }
}

#[test]
fn failed_fsync_is_sticky_and_never_acked() {
    let rig = Rig::fault(3);
    let disk = rig.disk().unwrap().clone();
    let id = pid("sticky", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let acked = fill(&s, &id, 5, 0);
    disk.set_plan(FaultPlan {
        sync_error_per_million: 1_000_000,
        errno: libc::EIO,
        ..FaultPlan::default()
    });
    let e = block_on(s.append(&id, make_batch(1, 10, 1, 0))).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Failed {
                errno: Some(libc::EIO),
                ..
            }
        ),
        "{e}"
    );
    disk.set_plan(FaultPlan::default());
    let e = block_on(s.append(&id, make_batch(1, 10, 1, 0))).unwrap_err();
    assert!(matches!(e, StorageError::Failed { .. }), "sticky: {e}");
    assert_eq!(s.offsets(&id).unwrap().high_watermark, 9, "hw did not move");
    assert_eq!(s.stats().failures, 1);
    // The unsynced write may or may not survive a crash; acked data must.
    disk.crash();
    let _ = s.shutdown();
    drop(s);
    disk.restart();
    let s = rig.open();
    let got = read_all(&s, &id, 0);
    assert_eq!(got[..acked.len()], acked[..]);
    block_on(s.append(&id, make_batch(1, 10, 1, 0))).unwrap();
    s.shutdown().unwrap();
}

#[test]
fn failed_write_fails_the_append_with_enospc() {
    let rig = Rig::fault(4);
    let disk = rig.disk().unwrap().clone();
    let id = pid("wfail", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let acked = fill(&s, &id, 3, 0);
    disk.set_plan(FaultPlan {
        write_error_per_million: 1_000_000,
        errno: libc::ENOSPC,
        ..FaultPlan::default()
    });
    let e = block_on(s.append(&id, make_batch(1, 10, 1, 0))).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Failed {
                errno: Some(libc::ENOSPC),
                ..
            }
        ),
        "{e}"
    );
    disk.set_plan(FaultPlan::default());
    assert!(block_on(s.append(&id, make_batch(1, 10, 1, 0))).is_err());
    s.shutdown().unwrap();
    let s = rig.open();
    // The failed write's outcome is unknown (it may have landed whole):
    // it was never acknowledged, but may be there. Acked data must be.
    let got = read_all(&s, &id, 0);
    assert_eq!(got[..3], acked[..]);
    s.shutdown().unwrap();
}

#[test]
fn bit_flip_in_acknowledged_data_quarantines() {
    for (name, rig) in rigs() {
        let id = pid("rot", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let acked = fill(&s, &id, 10, 0);
        s.shutdown().unwrap();
        drop(s);
        // Flip a bit inside the fourth batch.
        let at: u64 =
            BLOCK_BYTES as u64 + acked[..3].iter().map(|b| b.len() as u64).sum::<u64>() + 70;
        let seg0 = rig.dir.path().join("topics/rot/0/seg-00000.log");
        match rig.disk() {
            Some(d) => assert!(d.flip_stored_bit(&seg0, at, 2)),
            None => flip_file_bit(&seg0, at, 2),
        }
        let s = rig.open();
        let rep = &s.recovery_report()[0];
        assert!(rep.quarantined, "{name}: {rep:?}");
        assert_eq!(rep.bytes_truncated, 0, "{name}: never truncate acked data");
        assert!(matches!(
            block_on(s.append(&id, make_batch(1, 10, 1, 0))),
            Err(StorageError::Quarantined(_))
        ));
        // Read-only up to the damage.
        assert_eq!(read_all(&s, &id, 0), acked[..3], "{name}");
        // Still quarantined on the next start: the evidence (checkpoint)
        // must survive, or the damage would be truncated as a torn tail.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(read_all(&s, &id, 0), acked[..3], "{name}");
        s.shutdown().unwrap();
        let s = rig.open();
        let rep = &s.recovery_report()[0];
        assert!(rep.quarantined, "{name}: second start: {rep:?}");
        assert_eq!(rep.bytes_truncated, 0);
        s.shutdown().unwrap();
    }
}

pub(crate) fn flip_file_bit(path: &std::path::Path, at: u64, bit: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn enospc_at_create_leaves_nothing() {
    let rig = Rig::fault(5);
    let disk = rig.disk().unwrap().clone();
    disk.set_plan(FaultPlan {
        capacity_bytes: Some(100 * 1024),
        ..FaultPlan::default()
    });
    let s = rig.open();
    let id = pid("big", 0);
    let e = block_on(s.create_partition(id.clone(), small_cfg())).unwrap_err();
    assert!(matches!(e, StorageError::InsufficientSpace { .. }), "{e}");
    assert!(disk.file_paths().is_empty(), "{:?}", disk.file_paths());
    assert!(!rig.dir.path().join("topics/big").exists());
    assert!(s.partitions().is_empty());
    s.shutdown().unwrap();
}

#[test]
fn bit_flips_on_read_never_return_corrupt_data() {
    let rig = Rig::fault(6);
    let disk = rig.disk().unwrap().clone();
    let id = pid("flip", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let acked = fill(&s, &id, 60, 0);
    disk.set_plan(FaultPlan {
        read_flip_per_million: 200_000,
        ..FaultPlan::default()
    });
    let mut ok = 0;
    for _ in 0..20 {
        match block_on(s.read(&id, 0, 64 * 1024)) {
            Ok(bytes) => {
                let got: Vec<Vec<u8>> = BatchIter::new(&bytes)
                    .map(|b| b.unwrap().bytes.to_vec())
                    .collect();
                assert_eq!(got[..], acked[..got.len()]);
                ok += 1;
            }
            Err(StorageError::Quarantined(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok > 0 || disk.faults_injected() > 0);
    s.shutdown().unwrap();
}

#[test]
fn one_storage_per_data_dir() {
    let rig = Rig::files(pwrite_backend);
    let s = rig.open();
    let e = rig.open_with(rig.cfg()).unwrap_err();
    assert!(
        matches!(&e, StorageError::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock),
        "{e}"
    );
    s.shutdown().unwrap();
    drop(s);
    rig.open().shutdown().unwrap();
}

#[test]
fn time_retention_frees_old_segments() {
    for (name, rig) in rigs() {
        let id = pid("ttl", 0);
        let s = rig.open();
        let cfg = PartitionConfig {
            retention_ms: Some(60_000),
            ..small_cfg()
        };
        block_on(s.create_partition(id.clone(), cfg)).unwrap();
        // Old records (timestamp 1 ms after the epoch) fill more than one
        // segment; then fresh ones.
        for i in 0..30u64 {
            block_on(s.append(&id, make_batch(1, 3000, i, 1))).unwrap();
        }
        let now = batch::now_ms();
        for i in 0..3u64 {
            block_on(s.append(&id, make_batch(1, 3000, 100 + i, now))).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while s.offsets(&id).unwrap().earliest == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let o = s.offsets(&id).unwrap();
        assert!(o.earliest > 0, "{name}: old segments were not freed");
        assert_eq!(o.high_watermark, 33);
        // Only the segment holding fresh records (the active one) stays.
        assert_eq!(
            block_on(s.offset_for_timestamp(&id, now)).unwrap(),
            Some(30)
        );
        s.shutdown().unwrap();
        let s = rig.open();
        assert_eq!(
            s.offsets(&id).unwrap(),
            o,
            "{name}: retention is re-applied at start"
        );
        s.shutdown().unwrap();
    }
}

#[test]
fn missing_checkpoint_and_incomplete_dirs_are_handled() {
    for (name, rig) in rigs() {
        let id = pid("ck", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let acked = fill(&s, &id, 40, 0);
        s.shutdown().unwrap();
        std::fs::remove_file(rig.dir.path().join("topics/ck/0/checkpoint.meta")).unwrap();
        // A creation cut short: a directory without partition.meta.
        std::fs::create_dir_all(rig.dir.path().join("topics/half/0")).unwrap();
        let s = rig.open();
        assert_eq!(read_all(&s, &id, 0), acked, "{name}");
        assert_eq!(s.partitions().len(), 1);
        assert!(!rig.dir.path().join("topics/half/0").exists(), "{name}");
        s.shutdown().unwrap();
    }
}

#[test]
fn reads_respect_max_bytes_and_span_tail_and_disk() {
    for (name, rig) in rigs() {
        let id = pid("rd", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        // 100 KiB of data: more than the 64 KiB tail, so early batches are
        // served from the file and late ones from memory.
        let acked = fill(&s, &id, 200, 0);
        let hw = s.offsets(&id).unwrap().high_watermark;
        let earliest = s.offsets(&id).unwrap().earliest;
        let mut at = earliest;
        let mut got = Vec::new();
        while at < hw {
            let bytes = block_on(s.read(&id, at, 2000)).unwrap();
            let views: Vec<_> = BatchIter::new(&bytes).map(|v| v.unwrap()).collect();
            assert!(!views.is_empty());
            assert!(
                bytes.len() <= 2000 || views.len() == 1,
                "{name}: {} bytes in {} batches",
                bytes.len(),
                views.len()
            );
            for v in views {
                at = v.header.next_offset();
                got.push(v.bytes.to_vec());
            }
        }
        let kept: Vec<Vec<u8>> = acked
            .into_iter()
            .filter(|b| batch::parse_header(b).unwrap().base_offset >= earliest)
            .collect();
        assert_eq!(got, kept, "{name}");
        s.shutdown().unwrap();
    }
}

/// A read stops before a batch that would not fit without reading that
/// batch's body: it would be a second window read from the device, and the
/// next read starts there anyway.
#[test]
fn a_read_does_not_read_the_batch_it_leaves_out() {
    let rig = Rig::fault(21);
    let id = pid("fit", 0);
    let s = rig.open();
    let cfg = PartitionConfig {
        segment_bytes: 1 << 20,
        segments: 2,
        ..small_cfg()
    };
    block_on(s.create_partition(id.clone(), cfg)).unwrap();
    // Batches of about 20 KiB; reopened, so all of them are on the device.
    for tag in 0..8 {
        block_on(s.append(&id, make_batch(20, 1000, tag, 1))).unwrap();
    }
    let len = make_batch(20, 1000, 0, 1).len();
    s.shutdown().unwrap();
    let s = rig.open();
    let disk = rig.disk().unwrap();
    let max_bytes = 2 * len + len / 2;
    let before = disk.bytes_read() - disk.bytes_read_ahead();
    let bytes = block_on(s.read(&id, 0, max_bytes)).unwrap();
    // Reads ahead for the next fetch are not this one's.
    let read = (disk.bytes_read() - disk.bytes_read_ahead() - before) as usize;
    assert_eq!(BatchIter::new(&bytes).count(), 2, "the third does not fit");
    // One window: from the first batch's block, max_bytes and a header,
    // in whole blocks.
    let window = (max_bytes + batch::HEADER_BYTES).div_ceil(4096) * 4096 + 4096;
    assert!(read <= window, "read {read} bytes for {max_bytes}");
    s.shutdown().unwrap();
}

/// Whether the rig's backend reads ahead (pwrite has no background reads).
fn reads_ahead(name: &str) -> bool {
    name != "pwrite"
}

/// Counts what the engine reports of its fetch reads.
#[derive(Default)]
struct ReadCounts {
    demand: std::sync::atomic::AtomicU64,
    ahead: std::sync::atomic::AtomicU64,
    unused: std::sync::atomic::AtomicU64,
}

impl IoObserver for ReadCounts {
    fn write_round(&self, _: std::time::Duration, _: u64, _: u64, _: bool) {}
    fn sync_group(&self, _: std::time::Duration) {}
    fn window_read(&self, device_bytes: u64, ahead: bool) {
        let c = if ahead { &self.ahead } else { &self.demand };
        c.fetch_add(device_bytes, std::sync::atomic::Ordering::Relaxed);
    }
    fn read_ahead_unused(&self, device_bytes: u64) {
        self.unused
            .fetch_add(device_bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The rig's storage with a [`ReadCounts`] observer.
fn open_counting_reads(rig: &Rig) -> (Storage, Arc<ReadCounts>) {
    let counts = Arc::new(ReadCounts::default());
    let s = rig
        .open_with(StorageConfig {
            observer: Some(Observer(counts.clone())),
            ..rig.cfg()
        })
        .unwrap();
    (s, counts)
}

/// A consumer reading a log in order gets every batch, and after its first
/// fetch (and the first of each segment) each fetch is served by the read
/// started for it; the device reads the log about once, and the observer
/// hears of every byte of it.
#[test]
fn sequential_fetches_are_read_ahead() {
    for (name, rig) in rigs() {
        let id = pid("ahead", 0);
        let s = rig.open();
        let cfg = PartitionConfig {
            segment_bytes: 1 << 20,
            segments: 3,
            ..small_cfg()
        };
        block_on(s.create_partition(id.clone(), cfg)).unwrap();
        let mut sent = Vec::new();
        for tag in 0..180u64 {
            let b = make_batch(8, 1000, tag, tag as i64);
            let ack = block_on(s.append(&id, b.clone())).unwrap();
            sent.push(stored(b, ack.base_offset));
        }
        let log_bytes: usize = sent.iter().map(Vec::len).sum();
        s.shutdown().unwrap();
        let (s, counts) = open_counting_reads(&rig);
        let before = s.stats();
        let read0 = rig.disk().map(FaultDisk::bytes_read);
        let hw = s.offsets(&id).unwrap().high_watermark;
        let (mut at, mut got, mut fetches) = (0, Vec::new(), 0u64);
        while at < hw {
            let bytes = block_on(s.read(&id, at, 64 * 1024)).unwrap();
            fetches += 1;
            for v in BatchIter::new(&bytes) {
                let v = v.unwrap();
                at = v.header.next_offset();
                got.push(v.bytes.to_vec());
            }
        }
        assert_eq!(got, sent, "{name}");
        let st = s.stats();
        let used = st.reads_ahead_used - before.reads_ahead_used;
        let started = st.reads_ahead - before.reads_ahead;
        if reads_ahead(name) {
            // Not ahead: the first fetch (and at most one at the segment
            // boundary).
            assert!(used + 2 >= fetches, "{name}: {used} of {fetches} fetches");
            assert!(
                started <= used + 1,
                "{name}: {started} started, {used} used"
            );
        } else {
            assert_eq!((started, used), (0, 0), "{name}");
        }
        let ahead = counts.ahead.load(std::sync::atomic::Ordering::Relaxed);
        let unused = counts.unused.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(ahead > 0, reads_ahead(name), "{name}");
        assert_eq!(unused, 0, "{name}");
        if let (Some(disk), Some(read0)) = (rig.disk(), read0) {
            // Consecutive windows overlap by the batch left out of each.
            let read = (disk.bytes_read() - read0) as usize;
            assert!(
                read < log_bytes * 5 / 4,
                "{name}: read {read} for {log_bytes}"
            );
            let demand = counts.demand.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                demand + ahead,
                read as u64,
                "{name}: every byte read reported"
            );
        }
        s.shutdown().unwrap();
    }
}

/// Each batch's base offset and key (`make_batch`'s tag), for messages.
fn summary(bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    BatchIter::new(bytes)
        .map(|v| {
            let v = v.unwrap();
            let recs = v.records().unwrap();
            let key = recs[0].key.map(|k| k.to_vec()).unwrap_or_default();
            (v.header.base_offset, key)
        })
        .collect()
}

/// Readers of more partitions than there are read-ahead slots, taking
/// turns: as many of them as there are slots are read ahead, every time,
/// and no read is wasted on the others; once those readers stop, their
/// slots go to the rest, and the reads they left are reported unused.
#[test]
fn readers_taking_turns_share_the_read_ahead_slots_without_waste() {
    use super::io::READ_AHEAD_SLOTS;
    let readers = READ_AHEAD_SLOTS + 2;
    for (name, rig) in rigs() {
        if !reads_ahead(name) {
            continue;
        }
        let s = rig.open();
        let cfg = PartitionConfig {
            segment_bytes: 2 << 20,
            segments: 3,
            ..small_cfg()
        };
        let ids: Vec<PartitionId> = (0..readers as u32).map(|p| pid("turn", p)).collect();
        for id in &ids {
            block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
            for tag in 0..150u64 {
                block_on(s.append(id, make_batch(8, 1000, tag, 0))).unwrap();
            }
        }
        s.shutdown().unwrap();
        let (s, counts) = open_counting_reads(&rig);
        let mut at = vec![0u64; readers];
        let mut fetch = |i: usize| {
            let bytes = block_on(s.read(&ids[i], at[i], 32 * 1024)).unwrap();
            at[i] = BatchIter::new(&bytes)
                .last()
                .unwrap()
                .unwrap()
                .header
                .next_offset();
        };
        let before = s.stats();
        let rounds = 10u64;
        for _ in 0..rounds {
            for i in 0..readers {
                fetch(i);
            }
        }
        let mid = s.stats();
        let used = mid.reads_ahead_used - before.reads_ahead_used;
        let started = mid.reads_ahead - before.reads_ahead;
        let slots = READ_AHEAD_SLOTS as u64;
        assert_eq!(
            used,
            (rounds - 1) * slots,
            "{name}: each slot's reader, after its first"
        );
        assert_eq!(started, rounds * slots, "{name}: {started} started");
        // The first readers stop; the last two take over their slots
        // once AHEAD_PASSES_MAX fetches passed those reads over.
        for _ in 0..15 {
            fetch(readers - 2);
            fetch(readers - 1);
        }
        let used = s.stats().reads_ahead_used - mid.reads_ahead_used;
        assert!(used >= 30 - 17 - 2, "{name}: {used} of 30");
        let unused = counts.unused.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            unused > 0 && unused <= slots * 64 * 1024,
            "{name}: {unused} bytes unused"
        );
        s.shutdown().unwrap();
    }
}

/// Appends of `n` same-size batches; the ack of the first.
fn append_same(s: &Storage, id: &PartitionId, n: u64, tag0: u64) -> Vec<(u64, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let b = make_batch(4, 1000, tag0 + i, 0);
            let ack = block_on(s.append(id, b.clone())).unwrap();
            (ack.base_offset, stored(b, ack.base_offset))
        })
        .collect()
}

/// Same-size batches (`append_same`): the batch index of the sparse index
/// entry after the segment's first, and the fetch size that stops just
/// before that batch when reading from the segment's start. A fetch for
/// that batch starts at the entry's position, inside the window read ahead
/// for the next fetch after such a read.
fn entry_after_first(batch_len: usize) -> (u64, usize) {
    let j = (super::engine::INDEX_INTERVAL_BYTES as usize).div_ceil(batch_len);
    (j as u64, j * batch_len + batch_len / 2)
}

/// A read ahead of a segment slot is dropped when the ring wraps onto that
/// slot: the bytes it holds are the last lap's, at the very positions the
/// new lap's batches now occupy (all batches here have one size).
#[test]
fn a_reused_segment_is_not_served_from_its_last_lap_read_ahead() {
    for (name, rig) in rigs() {
        let id = pid("lap", 0);
        let s = rig.open();
        let cfg = PartitionConfig {
            segment_bytes: 256 * 1024,
            segments: 3,
            ..small_cfg()
        };
        block_on(s.create_partition(id.clone(), cfg)).unwrap();
        // Slot 0 full and closed; read up to just before its batch j, whose
        // position is an index entry, so its bytes are read ahead.
        let first = append_same(&s, &id, 100, 0);
        let (j, max_bytes) = entry_after_first(first[0].1.len());
        let before = s.stats();
        let bytes = block_on(s.read(&id, 0, max_bytes)).unwrap();
        assert_eq!(BatchIter::new(&bytes).count() as u64, j, "{name}");
        assert_eq!(
            s.stats().reads_ahead - before.reads_ahead,
            u64::from(reads_ahead(name)),
            "{name}"
        );
        // Wrap onto slot 0, then write past the read-ahead's range and
        // the tail buffer, so those positions are read from the file.
        let mut tag = 100;
        let first_of_lap = loop {
            let (off, _) = append_same(&s, &id, 1, tag).remove(0);
            tag += 1;
            if s.offsets(&id).unwrap().earliest > 0 {
                break off;
            }
        };
        let lap = append_same(&s, &id, 40, tag);
        let at = first_of_lap + j * 4;
        let want: Vec<Vec<u8>> = lap
            .iter()
            .filter(|(off, _)| *off >= at)
            .take(2)
            .map(|(_, b)| b.clone())
            .collect();
        let bytes = block_on(s.read(&id, at, 12 * 1024)).unwrap();
        let got: Vec<Vec<u8>> = BatchIter::new(&bytes)
            .map(|v| v.unwrap().bytes.to_vec())
            .collect();
        assert!(got == want, "{name}: {:?}", summary(&bytes));
        assert_eq!(
            s.stats().reads_ahead_used,
            before.reads_ahead_used,
            "{name}"
        );
        s.shutdown().unwrap();
    }
}

/// A read ahead of a deleted partition's file is never served to the
/// partition created next, whose files get the same handles (and here the
/// same offsets at the same positions, with other bytes).
#[test]
fn a_deleted_partitions_read_ahead_is_not_served_to_its_successor() {
    for (name, rig) in rigs() {
        let id = pid("again", 0);
        let s = rig.open();
        let cfg = PartitionConfig {
            segment_bytes: 256 * 1024,
            segments: 3,
            ..small_cfg()
        };
        block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
        let old = append_same(&s, &id, 100, 0);
        let (j, max_bytes) = entry_after_first(old[0].1.len());
        block_on(s.read(&id, 0, max_bytes)).unwrap();
        block_on(s.delete_partition(&id)).unwrap();
        block_on(s.create_partition(id.clone(), cfg)).unwrap();
        let again = append_same(&s, &id, 100, 1_000);
        let bytes = block_on(s.read(&id, j * 4, 12 * 1024)).unwrap();
        let got: Vec<Vec<u8>> = BatchIter::new(&bytes)
            .map(|v| v.unwrap().bytes.to_vec())
            .collect();
        let j = j as usize;
        let want: Vec<Vec<u8>> = again[j..j + 2].iter().map(|(_, b)| b.clone()).collect();
        assert!(got == want, "{name}: {:?}", summary(&bytes));
        s.shutdown().unwrap();
    }
}

#[test]
fn auto_backend_opens_and_names_itself() {
    let dir = test_dir();
    let s = Storage::open(StorageConfig {
        data_dir: dir.path().to_path_buf(),
        ..StorageConfig::default()
    })
    .unwrap();
    assert!(["pwrite", "io_uring"].contains(&s.backend_name()));
    s.shutdown().unwrap();
}

#[test]
fn data_event_fires_when_hw_advances() {
    let rig = Rig::fault(11);
    let s = rig.open();
    let id = pid("ev", 0);
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let ev = s.data_event(&id).unwrap();
    let l = ev.listen();
    let s2 = s.clone();
    let id2 = id.clone();
    let h = std::thread::spawn(move || block_on(s2.append(&id2, make_batch(1, 10, 1, 1))).unwrap());
    block_on(l);
    // The event fires after the high watermark is stored.
    assert_eq!(s.offsets(&id).unwrap().high_watermark, 1);
    assert_eq!(h.join().unwrap().base_offset, 0);
    s.shutdown().unwrap();
}

/// Device bytes written by `n` single-record 100 B appends, one at a time
/// (each its own commit), on a fault disk with the given write unit.
fn small_append_device_bytes(unit: usize, n: u64) -> u64 {
    let rig = Rig::fault(11);
    rig.disk().unwrap().clone().with_write_unit(unit);
    let s = rig.open();
    let id = pid("unit", 0);
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    // The first commit writes the segment header's block: leave it out.
    block_on(s.append(&id, make_batch(1, 100, 0, 0))).unwrap();
    let before = s.stats().device_bytes_written;
    for i in 0..n {
        block_on(s.append(&id, make_batch(1, 100, 1 + i, 0))).unwrap();
    }
    let bytes = s.stats().device_bytes_written - before;
    s.shutdown().unwrap();
    bytes
}

#[test]
fn small_appends_rewrite_sectors_not_blocks_on_512_byte_disks() {
    const N: u64 = 40;
    let batch = make_batch(1, 100, 0, 0).len() as u64;
    let sectors = small_append_device_bytes(512, N);
    let blocks = small_append_device_bytes(4096, N);
    // Each append rewrites the partial sector it extends, plus what it adds:
    // never more than the batch rounded up, plus one sector.
    assert!(
        sectors <= N * (batch.div_ceil(512) * 512 + 512),
        "{sectors} device bytes for {N} appends of {batch} B"
    );
    assert_eq!(blocks % 4096, 0);
    assert!(
        blocks >= N * 4096,
        "4 KiB units rewrite a block per append: {blocks}"
    );
}

/// Cuts the fault disk's power under `s` and opens the data dir again
/// without `id`'s checkpoint, so recovery scans the log up to its tail.
fn power_cut_without_checkpoint(rig: &Rig, s: Storage, id: &PartitionId) -> Storage {
    let disk = rig.disk().expect("a fault rig");
    disk.crash();
    let _ = s.shutdown();
    drop(s);
    disk.restart();
    // Metadata lives on the real file system, out of the crash's reach.
    let ckpt = rig.dir.path().join(format!(
        "topics/{}/{}/checkpoint.meta",
        id.topic, id.partition
    ));
    std::fs::remove_file(&ckpt).expect("checkpoint written");
    rig.open()
}

/// After the ring wrapped, the bytes behind the tail's last sector are an
/// earlier lap's. Recovery must stop cleanly there, for every tail position
/// within a sector (a header read straddling the boundary included).
#[test]
fn recovery_after_a_wrap_with_sector_writes_reports_no_torn_tail() {
    for seed in 0..24u64 {
        let rig = Rig::fault(seed);
        rig.disk().unwrap().clone().with_write_unit(512);
        let id = pid("lap", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        // Three 64 KiB segments: about 1000 of these lap the ring twice.
        let mut last = Vec::new();
        for i in 0..(1000 + seed * 7) {
            let b = make_batch(1, 150 + ((i * 37 + seed * 11) % 500) as usize, i, 0);
            let ack = block_on(s.append(&id, b.clone())).unwrap();
            last = stored(b, ack.base_offset);
        }
        let s = power_cut_without_checkpoint(&rig, s, &id);
        let rep = &s.recovery_report()[0];
        assert!(!rep.quarantined, "seed {seed}: {rep:?}");
        assert_eq!(
            rep.bytes_truncated, 0,
            "seed {seed}: false torn tail {rep:?}"
        );
        let hw = s.offsets(&id).unwrap().high_watermark;
        let tail = read_all(&s, &id, hw - 1);
        assert_eq!(tail.last(), Some(&last), "seed {seed}");
        s.shutdown().unwrap();
    }
}

/// The same when the log ends exactly on a sector boundary over the middle
/// of an earlier lap's batch: nothing of the new lap marks the end there,
/// so the write puts a zeroed sector after it.
#[test]
fn recovery_after_a_wrap_ending_on_a_sector_boundary_reports_no_torn_tail() {
    // Value sizes whose batches are 3 and 2 sectors long.
    let sized = |len: usize| {
        (100..2000)
            .find(|&v| make_batch(1, v, 0, 0).len() == len)
            .expect("a value size for the batch length")
    };
    let (lap1, lap2) = (sized(1536), sized(1024));
    for k in 1..=6u64 {
        let rig = Rig::fault(k);
        rig.disk().unwrap().clone().with_write_unit(512);
        let id = pid("edge", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        // 40 of these fill each of the three segments' 60 KiB exactly;
        // then segment 0 comes round again and takes k 2-sector batches,
        // ending inside lap 1's batches (k = 3 and 6: on one's start).
        for i in 0..120u64 {
            block_on(s.append(&id, make_batch(1, lap1, i, 0))).unwrap();
        }
        let mut last = Vec::new();
        for i in 0..k {
            let b = make_batch(1, lap2, 1000 + i, 0);
            let ack = block_on(s.append(&id, b.clone())).unwrap();
            last = stored(b, ack.base_offset);
        }
        let s = power_cut_without_checkpoint(&rig, s, &id);
        let rep = &s.recovery_report()[0];
        assert_eq!(
            (rep.quarantined, rep.bytes_truncated, rep.high_watermark),
            (false, 0, 120 + k),
            "{k} batches into the lap: false torn tail {rep:?}"
        );
        assert_eq!(read_all(&s, &id, 120 + k - 1).last(), Some(&last));
        s.shutdown().unwrap();
    }
}

/// A backend whose group fdatasyncs are held until the test releases
/// them, over the in-memory fault disk: it shows what the engine does while
/// a flush is in flight.
struct HeldSync {
    inner: FaultBackend,
    gate: Arc<SyncGate>,
    held: Vec<super::io::FileHandle>,
}

impl HeldSync {
    fn new(rig: &Rig, gate: &Arc<SyncGate>) -> HeldSync {
        gate.fd.set(super::io::EventFd::new().unwrap()).unwrap();
        HeldSync {
            inner: FaultBackend::new(rig.disk().unwrap().clone()),
            gate: gate.clone(),
            held: Vec::new(),
        }
    }
}

#[derive(Default)]
struct SyncGate {
    /// Groups started, writes done, groups released by the test.
    started: std::sync::atomic::AtomicUsize,
    /// Also hold the synchronous `sync` calls (once the test's setup is
    /// done): the unpipelined engine flushes through them.
    hold_sync_calls: std::sync::atomic::AtomicBool,
    writes: std::sync::atomic::AtomicUsize,
    released: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
    fd: std::sync::OnceLock<super::io::EventFd>,
}

impl SyncGate {
    fn release(&self) {
        *self.released.lock().unwrap() += 1;
        self.changed.notify_all();
        self.fd.get().unwrap().signal();
    }
    fn wait_for(&self, what: &std::sync::atomic::AtomicUsize, n: usize) {
        let t0 = std::time::Instant::now();
        while what.load(Ordering::SeqCst) < n {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "timed out"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Releases every flush when a test ends, so a failed assertion unwinds
/// instead of leaving the storage thread waiting on the gate forever.
struct OpenGateOnDrop(Arc<SyncGate>);

impl Drop for OpenGateOnDrop {
    fn drop(&mut self) {
        *self.0.released.lock().unwrap() = usize::MAX / 2;
        self.0.changed.notify_all();
        self.0.fd.get().unwrap().signal();
    }
}

/// A storage over the held-flush backend, with one partition. Fields drop
/// in this order: the gate opens before the storage thread is joined.
struct Held {
    _open: OpenGateOnDrop,
    s: Storage,
    gate: Arc<SyncGate>,
    id: PartitionId,
    _rig: Rig,
}

impl Held {
    fn open(seed: u64, topic: &str, cfg: impl FnOnce(StorageConfig) -> StorageConfig) -> Held {
        let rig = Rig::fault(seed);
        let gate = Arc::new(SyncGate::default());
        let backend = HeldSync::new(&rig, &gate);
        let s = Storage::open_with_backend(cfg(rig.cfg()), Box::new(backend)).unwrap();
        let id = pid(topic, 0);
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        Held {
            _open: OpenGateOnDrop(gate.clone()),
            s,
            gate,
            id,
            _rig: rig,
        }
    }
}

impl HeldSync {
    fn complete(&mut self) -> std::io::Result<()> {
        self.gate.fd.get().unwrap().clear();
        let files = std::mem::take(&mut self.held);
        files.into_iter().try_for_each(|f| self.inner.sync(f))
    }
}

impl IoBackend for HeldSync {
    fn name(&self) -> &'static str {
        "held-sync"
    }
    fn open(
        &mut self,
        path: &std::path::Path,
        create: bool,
    ) -> std::io::Result<super::io::FileHandle> {
        self.inner.open(path, create)
    }
    fn close(&mut self, file: super::io::FileHandle) {
        self.inner.close(file)
    }
    fn allocate(&mut self, file: super::io::FileHandle, len: u64) -> std::io::Result<()> {
        self.inner.allocate(file, len)
    }
    fn read_at(
        &mut self,
        file: super::io::FileHandle,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<usize> {
        self.inner.read_at(file, offset, buf)
    }
    fn write_batch(
        &mut self,
        writes: &[super::io::WriteOp<'_>],
        sync: &[super::io::FileHandle],
    ) -> std::io::Result<()> {
        self.gate.writes.fetch_add(writes.len(), Ordering::SeqCst);
        self.inner.write_batch(writes, sync)
    }
    fn sync(&mut self, file: super::io::FileHandle) -> std::io::Result<()> {
        if self.gate.hold_sync_calls.load(Ordering::SeqCst) {
            self.sync_start(&[file])?;
            return self.sync_wait();
        }
        self.inner.sync(file)
    }
    fn sync_dir(&mut self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn sync_start(&mut self, files: &[super::io::FileHandle]) -> std::io::Result<()> {
        self.sync_wait()?;
        self.held = files.to_vec();
        self.gate.started.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn sync_wait(&mut self) -> std::io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let n = self.gate.started.load(Ordering::SeqCst);
        let mut released = self.gate.released.lock().unwrap();
        while *released < n {
            released = self.gate.changed.wait(released).unwrap();
        }
        drop(released);
        self.complete()
    }
    fn sync_poll(&mut self) -> Option<std::io::Result<()>> {
        if self.held.is_empty() {
            return Some(Ok(()));
        }
        let n = self.gate.started.load(Ordering::SeqCst);
        if *self.gate.released.lock().unwrap() < n {
            return None;
        }
        Some(self.complete())
    }
    fn sync_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.gate.fd.get().unwrap().as_raw_fd())
    }
}

#[test]
fn appends_during_an_fdatasync_are_written_at_once_and_acked_after_their_own() {
    let h = Held::open(7, "held", |c| StorageConfig {
        pipelined_fsync: true,
        ..c
    });
    let (s, gate, id) = (&h.s, &h.gate, &h.id);
    let mut a = block_on(s.submit(id, make_batch(1, 100, 1, 0))).unwrap();
    gate.wait_for(&gate.started, 1);
    let writes = gate.writes.load(Ordering::SeqCst);
    // B arrives while A's fdatasync is held: it is written right away...
    let mut b = block_on(s.submit(id, make_batch(1, 100, 2, 0))).unwrap();
    gate.wait_for(&gate.writes, writes + 1);
    // ...and nothing is acked before its own fdatasync completed.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(block_on(futures_lite::future::poll_once(&mut a)).is_none());
    assert!(block_on(futures_lite::future::poll_once(&mut b)).is_none());
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        1,
        "one group at a time"
    );
    gate.release();
    assert_eq!(block_on(a).unwrap().base_offset, 0);
    // B's own group starts once A's is done, and acks B when it completes.
    gate.wait_for(&gate.started, 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(block_on(futures_lite::future::poll_once(&mut b)).is_none());
    assert_eq!(
        s.offsets(id).unwrap().high_watermark,
        1,
        "B not yet durable"
    );
    gate.release();
    assert_eq!(block_on(b).unwrap().base_offset, 1);
    assert_eq!(s.offsets(id).unwrap().high_watermark, 2);
    gate.release(); // the shutdown's own sync, if it starts one
    s.shutdown().unwrap();
}

/// Group formation: after a group's acks, the next fdatasync waits for the
/// appends that answer them (a closed-loop producer's next window), so the
/// window shares one flush; with nobody answering it starts anyway.
#[test]
fn next_sync_waits_for_the_appends_answering_the_last_acks() {
    let h = Held::open(8, "hold", |c| StorageConfig {
        sync_hold_max: std::time::Duration::from_secs(60),
        pipelined_fsync: true,
        ..c
    });
    let (s, gate, id) = (&h.s, &h.gate, &h.id);
    let submit = |tag| block_on(s.submit(id, make_batch(1, 100, tag, 0))).unwrap();
    let a = submit(1);
    gate.wait_for(&gate.started, 1);
    // B and C come while A's flush runs (held 2 s: the hold may then last
    // up to half of that).
    let (b, c) = (submit(2), submit(3));
    gate.wait_for(&gate.writes, 2);
    std::thread::sleep(std::time::Duration::from_secs(2));
    gate.release();
    assert_eq!(block_on(a).unwrap().base_offset, 0);
    // A's ack is out: its producer's next append is awaited before B and C
    // are flushed.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(gate.started.load(Ordering::SeqCst), 1, "no flush before D");
    let d = submit(4);
    gate.wait_for(&gate.started, 2);
    gate.release();
    for (t, off) in [(b, 1), (c, 2), (d, 3)] {
        assert_eq!(block_on(t).unwrap().base_offset, off);
    }
    // Three acks, one answer: E's flush starts when the hold runs out.
    let e = submit(5);
    gate.wait_for(&gate.started, 3);
    gate.release();
    assert_eq!(block_on(e).unwrap().base_offset, 4);
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        3,
        "one flush per group"
    );
    gate.release(); // the shutdown's own sync, if it starts one
    s.shutdown().unwrap();
}

/// The default, unpipelined group commit: the storage thread runs the
/// fdatasync itself; appends that arrive meanwhile wait in its queue,
/// unwritten, and all go into the next group (one write, one flush).
#[test]
fn appends_during_an_inline_fdatasync_form_the_next_group() {
    let h = Held::open(9, "inline", |c| c);
    let (s, gate, id) = (&h.s, &h.gate, &h.id);
    gate.hold_sync_calls.store(true, Ordering::SeqCst);
    let submit = |tag| block_on(s.submit(id, make_batch(1, 100, tag, 0))).unwrap();
    let a = submit(1);
    gate.wait_for(&gate.started, 1);
    let writes = gate.writes.load(Ordering::SeqCst);
    let (b, c) = (submit(2), submit(3));
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        gate.writes.load(Ordering::SeqCst),
        writes,
        "nothing written during the flush"
    );
    gate.release();
    assert_eq!(block_on(a).unwrap().base_offset, 0);
    gate.wait_for(&gate.started, 2);
    assert_eq!(
        gate.writes.load(Ordering::SeqCst),
        writes + 1,
        "B and C in one write"
    );
    gate.release();
    assert_eq!(block_on(b).unwrap().base_offset, 1);
    assert_eq!(block_on(c).unwrap().base_offset, 2);
    assert_eq!(gate.started.load(Ordering::SeqCst), 2, "and one flush");
    gate.hold_sync_calls.store(false, Ordering::SeqCst);
    s.shutdown().unwrap();
}
