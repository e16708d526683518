//! Storage engine tests. Every behavioural test runs over each backend
//! through [`Rig`]: the fault-injecting in-memory disk, and pwrite and
//! io_uring (where the kernel allows it) over real files.

use super::engine::CHECKPOINT_INTERVAL_MS;
use super::io::fault::{FaultBackend, FaultDisk, FaultPlan};
use super::io::pwrite::PwriteBackend;
use super::segment::{HeaderError, SegmentHeader, SEG_HEADER_BYTES};
use super::*;
use crate::batch::{self, BatchBuilder, BatchIter, BatchView, ProducerStamp};
use smol::block_on;

/// The calls tests make most: check a batch and submit it, waking the
/// thread; or that and await its ack.
pub(crate) trait Submit {
    async fn submit_now(
        &self,
        id: &PartitionId,
        batch: Vec<u8>,
    ) -> Result<AppendTicket, StorageError>;
    async fn append(&self, id: &PartitionId, batch: Vec<u8>) -> Result<AppendAck, StorageError>;
}

impl Submit for Storage {
    async fn submit_now(
        &self,
        id: &PartitionId,
        batch: Vec<u8>,
    ) -> Result<AppendTicket, StorageError> {
        self.submit(id, CheckedBatch::check(batch)?, Wake::Now)
            .await
    }

    async fn append(&self, id: &PartitionId, batch: Vec<u8>) -> Result<AppendAck, StorageError> {
        self.submit_now(id, batch).await?.await
    }
}

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
/// Whether offsets `at..hw` are a damaged range recovery skipped at the
/// log's end: no batch holds them, and a read there waits for the next
/// batch as one at the end does.
pub(crate) fn trailing_gap(s: &Storage, id: &PartitionId, at: u64, hw: u64) -> bool {
    s.recovery_report()
        .iter()
        .filter(|r| &r.id == id)
        .flat_map(|r| &r.damaged)
        .any(|d| d.from_offset <= at && d.to_offset == hw)
}

pub(crate) fn read_all(s: &Storage, id: &PartitionId, from: u64) -> Vec<Vec<u8>> {
    let hw = s.offsets(id).unwrap().high_watermark;
    let mut out = Vec::new();
    let mut at = from;
    while at < hw {
        let bytes = block_on(s.read(id, at, 16 * 1024)).expect("read");
        if bytes.is_empty() && trailing_gap(s, id, at, hw) {
            break;
        }
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

/// Fetches `id` from offset 0 to its high watermark, `max_bytes` at a
/// time: its batches, and how many fetches. Each answer goes to `answer`
/// once read, to hold or to drop.
fn fetch_to_end(
    s: &Storage,
    id: &PartitionId,
    max_bytes: usize,
    mut answer: impl FnMut(bytes::Bytes),
) -> (Vec<Vec<u8>>, u64) {
    let hw = s.offsets(id).unwrap().high_watermark;
    let (mut at, mut got, mut fetches) = (0, Vec::new(), 0u64);
    while at < hw {
        let bytes = block_on(s.read(id, at, max_bytes)).unwrap();
        fetches += 1;
        for v in BatchIter::new(&bytes) {
            let v = v.unwrap();
            at = v.header.next_offset();
            got.push(v.bytes.to_vec());
        }
        answer(bytes);
    }
    (got, fetches)
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

/// A create whose `partition.meta` is renamed in place but whose
/// directory sync fails is failed like any other, and its directory
/// removed: neither the storage nor a restart has the partition, and
/// the create can be made again.
#[test]
fn a_create_whose_partition_meta_is_not_synced_leaves_nothing() {
    for (name, rig) in rigs() {
        let id = pid("new", 0);
        let dir = rig.dir.path().join("topics/new/0");
        meta::FAIL_DIR_SYNC
            .lock()
            .unwrap()
            .push(dir.join(part::PARTITION_META));
        let s = rig.open();
        let e = block_on(s.create_partition(id.clone(), small_cfg())).expect_err(name);
        assert!(
            matches!(e, StorageError::Meta(meta::MetaError::Unsynced(_))),
            "{name}: {e:?}"
        );
        assert!(!dir.exists(), "{name}: its directory stays");
        assert!(s.partitions().is_empty(), "{name}");
        s.shutdown().unwrap();
        drop(s);
        let s = rig.open();
        assert!(s.partitions().is_empty(), "{name}: after a restart");
        block_on(s.create_partition(id.clone(), small_cfg())).expect(name);
        s.shutdown().unwrap();
    }
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
                Err(StorageError::PartitionExists { .. })
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

/// An idempotent producer's batch refused for want of room holds back the
/// producer's later batches until it comes again, even when room was made
/// in between: written first, they would put its records out of order and
/// make its retry look like a duplicate.
#[test]
fn a_refused_producer_batch_holds_back_the_producer_s_later_batches() {
    for (name, rig) in rigs() {
        let id = pid("held", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        s.set_retain_floor(&id, Some(0)).unwrap();
        let batch = |producer: u64, seq: i32, tag: u64| {
            let mut b = BatchBuilder::new();
            for i in 0..3 {
                b.push(i, Some(&tag.to_le_bytes()), &[tag as u8; 1000], &[]);
            }
            b.finish(ProducerStamp {
                producer_id: producer,
                producer_epoch: 0,
                base_sequence: seq,
            })
        };
        let mut seq = 0;
        let refused = loop {
            match block_on(s.append(&id, batch(7, seq, seq as u64))) {
                Ok(_) => seq += 3,
                Err(e @ StorageError::BacklogFull(_)) => break e,
                Err(e) => panic!("{name}: {e}"),
            }
            assert!(seq < 3000, "{name}: the ring never filled");
        };
        // Upstream catches up: there is room again.
        s.set_retain_floor(&id, None).unwrap();
        let later = block_on(s.append(&id, batch(7, seq + 3, 9_999)));
        assert!(
            matches!(later, Err(StorageError::BacklogFull(_))),
            "{name}: {refused}, then the next batch: {later:?}"
        );
        // Another producer is not held back.
        block_on(s.append(&id, batch(8, 0, 8))).expect("another producer");
        // The refused batch, then the later one, in order.
        let a = block_on(s.append(&id, batch(7, seq, seq as u64))).expect("the retry");
        let b = block_on(s.append(&id, batch(7, seq + 3, 9_999))).expect("then the next");
        assert!(a.base_offset < b.base_offset, "{name}");
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

/// A batch of the log's own writers (compaction, transaction markers), as
/// [`CheckedBatch::check_placed`] takes it: a record at each of `deltas`
/// (strictly increasing), covering offsets `0..=last_delta` from its base.
/// Each value names its tag and delta.
pub(crate) fn gapped_batch(deltas: &[u32], last_delta: u32, tag: u64, ts: i64) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    let mut next = 0;
    for (i, &d) in deltas.iter().enumerate() {
        b.skip_offsets(d - next);
        let value = format!("{tag}:{d}:{}", "x".repeat((tag % 7) as usize * 300));
        b.push(
            ts + i as i64,
            Some(&tag.to_le_bytes()),
            value.as_bytes(),
            &[],
        );
        next = d + 1;
    }
    b.skip_offsets(last_delta + 1 - next);
    b.finish(ProducerStamp::NONE)
}

/// Appends a batch whose base offset is at least `at_least`.
pub(crate) fn append_placed(
    s: &Storage,
    id: &PartitionId,
    batch: Vec<u8>,
    at_least: u64,
) -> Result<AppendAck, StorageError> {
    block_on(async {
        let checked = CheckedBatch::check_placed(batch, at_least)?;
        s.submit(id, checked, Wake::Now).await?.await
    })
}

/// Every record in `[from, hw)` by offset, read one fetch per offset asked,
/// and checks what a fetch at each offset returns: the batch covering it,
/// or in a gap between batches the first batch after it.
fn check_every_offset(
    s: &Storage,
    id: &PartitionId,
    extents: &[(u64, u64)],
    records: &std::collections::BTreeMap<u64, Vec<u8>>,
    what: &str,
) {
    let o = s.offsets(id).unwrap();
    assert_eq!(
        o.high_watermark,
        extents.last().map_or(0, |e| e.1 + 1),
        "{what}"
    );
    for at in o.earliest..o.high_watermark {
        let bytes = block_on(s.read(id, at, 1)).unwrap();
        let v = BatchIter::new(&bytes).next().expect("a batch").unwrap();
        let h = v.header;
        let want = extents
            .iter()
            .find(|e| e.1 >= at)
            .expect("an extent at or after every offset below the hw");
        assert_eq!(
            (h.base_offset, h.last_offset()),
            *want,
            "{what}: fetch at {at}"
        );
        let got: Vec<(u64, Vec<u8>)> = v
            .records()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    h.base_offset + u64::from(r.offset_delta),
                    r.value.expect("a value").to_vec(),
                )
            })
            .collect();
        let expect: Vec<(u64, Vec<u8>)> = records
            .range(h.base_offset..=h.last_offset())
            .map(|(o, v)| (*o, v.clone()))
            .collect();
        assert_eq!(got, expect, "{what}: records of the batch at {at}");
    }
    // Read in larger fetches, as a consumer does: every record once.
    let mut at = o.earliest;
    let mut seen = Vec::new();
    while at < o.high_watermark {
        let bytes = block_on(s.read(id, at, 3000)).unwrap();
        for v in BatchIter::new(&bytes) {
            let v = v.unwrap();
            for r in v.records().unwrap() {
                seen.push(v.header.base_offset + u64::from(r.offset_delta));
            }
            at = v.header.next_offset();
        }
    }
    let all: Vec<u64> = records.range(o.earliest..).map(|(o, _)| *o).collect();
    assert_eq!(seen, all, "{what}: a consumer's reads");
}

/// The log may hold gaps: inside a batch (records removed, the extent
/// kept) and between batches (a batch placed above the log's end). Reads
/// at every offset, offsets for timestamps and recovery (also without a
/// checkpoint, scanning the gaps) all see them; appends go on after the
/// last extent, never below it.
#[test]
fn gaps_inside_and_between_batches_read_and_recover() {
    for (name, rig) in rigs() {
        let id = pid("gaps", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let mut extents: Vec<(u64, u64)> = Vec::new();
        let mut records = std::collections::BTreeMap::new();
        let mut next = 0u64;
        // (record deltas, last delta, gap before it); None: a producer's
        // dense batch of 3 records. About 110 KiB: the log spans two
        // segments, and the tail buffer holds only its end.
        for i in 0..60u64 {
            let shape: Option<(Vec<u32>, u32, u64)> = match i % 5 {
                0 => None,
                1 => Some((vec![0, 2, 5], 5, 0)),
                2 => Some((vec![3], 9, 7)),
                3 => Some((vec![0, 1], 4, 100 + i)),
                _ => Some((vec![1, 2, 3], 3, 0)),
            };
            let ts = 1_000 + i as i64 * 10;
            let (b, ack) = match shape {
                None => {
                    let b = make_batch(3, 700, i, ts);
                    (b.clone(), block_on(s.append(&id, b)).unwrap())
                }
                Some((deltas, last, gap)) => {
                    let b = gapped_batch(&deltas, last, i, ts);
                    let ack = append_placed(&s, &id, b.clone(), next + gap).unwrap();
                    assert_eq!(ack.base_offset, next + gap, "{name}: placed at its least");
                    (b, ack)
                }
            };
            let v = stored(b, ack.base_offset);
            for r in BatchView::new(&v).unwrap().records().unwrap() {
                let o = ack.base_offset + u64::from(r.offset_delta);
                records.insert(o, r.value.expect("a value").to_vec());
            }
            assert!(ack.base_offset >= next, "{name}: offsets never reused");
            extents.push((ack.base_offset, ack.last_offset));
            next = ack.last_offset + 1;
        }
        assert!(s.stats().payload_bytes > 64 * 1024, "{name}: a roll");
        check_every_offset(&s, &id, &extents, &records, name);
        // A batch asked to go below the end follows the last one.
        let b = gapped_batch(&[0], 0, 999, 5_000);
        let ack = append_placed(&s, &id, b, 3).unwrap();
        assert_eq!(ack.base_offset, next, "{name}");
        records.insert(next, format!("999:0:{}", "x".repeat(5 * 300)).into_bytes());
        extents.push((next, next));
        // Timestamps: batch i's records are at 1_000 + 10 i and after.
        let q = |ts| block_on(s.offset_for_timestamp(&id, ts)).unwrap();
        assert_eq!(q(1_000 + 10 * 22), Some(extents[22].0), "{name}");
        assert_eq!(q(1_000 + 10 * 22 + 5), Some(extents[23].0), "{name}");
        s.shutdown().unwrap();

        let s = rig.open();
        let rep = &s.recovery_report()[0];
        assert!(
            !rep.quarantined && rep.bytes_truncated == 0,
            "{name}: {rep:?}"
        );
        check_every_offset(&s, &id, &extents, &records, name);
        s.shutdown().unwrap();
        // Without the checkpoint, recovery scans the whole log.
        std::fs::remove_file(rig.dir.path().join("topics/gaps/0/checkpoint.meta")).unwrap();
        let s = rig.open();
        let rep = &s.recovery_report()[0];
        assert!(
            !rep.quarantined && rep.bytes_truncated == 0,
            "{name}: {rep:?}"
        );
        check_every_offset(&s, &id, &extents, &records, name);
        let hw = s.offsets(&id).unwrap().high_watermark;
        let ack = block_on(s.append(&id, make_batch(1, 10, 7, 0))).unwrap();
        assert_eq!(
            ack.base_offset, hw,
            "{name}: the log goes on after the last extent"
        );
        s.shutdown().unwrap();
    }
}

/// A batch placed with a gap that does not fit in the active segment
/// starts the next one: that segment's header names the log's end before
/// the gap, so the gap lies inside it, and a scan from its header (no
/// checkpoint) finds the batch above it.
#[test]
fn a_gap_at_a_segment_boundary_survives_recovery() {
    let rig = Rig::fault(13);
    let id = pid("edge", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    // 20 KiB batches: three fill the first segment's 60 KiB.
    for i in 0..3 {
        block_on(s.append(&id, make_batch(2, 10_000, i, 0))).unwrap();
    }
    let end = s.offsets(&id).unwrap().high_watermark;
    // About 1.6 KiB: more than is left of the first segment.
    let ack = append_placed(&s, &id, gapped_batch(&[2], 2, 5, 0), end + 50).unwrap();
    assert_eq!(ack.base_offset, end + 50);
    let seg1 = rig.dir.path().join("topics/edge/0/seg-00001.log");
    let header = &rig.disk().unwrap().contents(&seg1).unwrap()[..SEG_HEADER_BYTES];
    let h = SegmentHeader::decode(header, 1, small_cfg().segment_bytes).unwrap();
    assert_eq!(h.base_offset, end, "the segment starts at the log's end");
    let s = power_cut_without_checkpoint(&rig, s, &id);
    let rep = &s.recovery_report()[0];
    assert!(!rep.quarantined && rep.bytes_truncated == 0, "{rep:?}");
    assert_eq!(s.offsets(&id).unwrap().high_watermark, end + 53);
    for at in [end, end + 49, end + 52] {
        let bytes = block_on(s.read(&id, at, 1)).unwrap();
        let v = BatchIter::new(&bytes).next().unwrap().unwrap();
        assert_eq!(v.header.base_offset, end + 50, "fetch at {at}");
    }
    s.shutdown().unwrap();
}

/// Only the log's own writers leave gaps: a producer's batch with gaps is
/// refused, typed, and so is one whose offsets would pass 2^63 - 1.
#[test]
fn gapped_producer_batches_and_offset_overflow_are_refused() {
    let rig = Rig::fault(12);
    let id = pid("dense", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let e = block_on(s.append(&id, gapped_batch(&[0, 2], 2, 1, 0))).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::InvalidBatch(batch::BatchError::NotDense {
                record_count: 2,
                last_offset_delta: 2
            })
        ),
        "{e}"
    );
    let e = append_placed(&s, &id, gapped_batch(&[0], 1, 1, 0), batch::OFFSET_MAX).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::InvalidBatch(batch::BatchError::OffsetOverflow { .. })
        ),
        "{e}"
    );
    assert_eq!(s.offsets(&id).unwrap().high_watermark, 0, "nothing written");
    // The last offset there is; then nothing more fits.
    let ack = append_placed(&s, &id, gapped_batch(&[0], 0, 2, 0), batch::OFFSET_MAX).unwrap();
    assert_eq!(ack.last_offset, batch::OFFSET_MAX);
    let e = block_on(s.append(&id, make_batch(1, 10, 3, 0))).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::InvalidBatch(batch::BatchError::OffsetOverflow { .. })
        ),
        "{e}"
    );
    s.shutdown().unwrap();
    let s = rig.open();
    assert_eq!(
        s.offsets(&id).unwrap().high_watermark,
        batch::OFFSET_MAX + 1
    );
    s.shutdown().unwrap();
}

/// A segment written in another on-disk format version (here version 1,
/// from before gaps) refuses to open, naming the version, and is left as
/// it was.
#[test]
fn a_segment_of_another_format_version_is_refused_by_name() {
    use super::segment::{SEG_OFFSET_CRC, SEG_OFFSET_VERSION};
    let rig = Rig::files(pwrite_backend);
    let id = pid("old", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    fill(&s, &id, 5, 0);
    s.shutdown().unwrap();
    let seg = rig.dir.path().join("topics/old/0/seg-00000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[SEG_OFFSET_VERSION..SEG_OFFSET_VERSION + 2].copy_from_slice(&1u16.to_le_bytes());
    let crc = batch::CRC32C.checksum(&bytes[..SEG_OFFSET_CRC]);
    bytes[SEG_OFFSET_CRC..SEG_OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let e = rig.open_with(rig.cfg()).unwrap_err();
    assert!(
        matches!(
            &e,
            StorageError::UnsupportedVersion {
                partition,
                slot: 0,
                found: 1,
                supported: 2,
            } if *partition == id
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version 1"), "{e}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "left as it was");
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
        // All 50 are queued while the thread stands still, so they reach
        // it together whatever the scheduler does.
        let resume = s.pause();
        let tickets = block_on(async {
            let mut tickets = Vec::new();
            for i in 0..50u64 {
                tickets.push(s.submit_now(&id, make_batch(1, 100, i, 0)).await.unwrap());
            }
            tickets
        });
        drop(resume);
        let acks: Vec<AppendAck> = tickets.into_iter().map(|t| block_on(t).unwrap()).collect();
        for (i, a) in acks.iter().enumerate() {
            assert_eq!(
                a.base_offset, i as u64,
                "{name}: submit order is offset order"
            );
        }
        let d = s.stats();
        assert_eq!(d.appends - before.appends, 50);
        assert_eq!(
            d.fsyncs - before.fsyncs,
            1,
            "{name}: 50 queued appends, one group"
        );
        s.shutdown().unwrap();
    }
}

/// Batches submitted with `Wake::Later` and then one wake-up reach a
/// storage thread that was asleep together: it writes them as one group
/// with one fdatasync.
#[test]
fn batches_submitted_quietly_and_woken_once_are_one_group() {
    for (name, rig) in rigs() {
        let id = pid("all", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        // Let the thread go to sleep, as between a group's acks and the
        // producer's answer to them.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let before = s.stats();
        let acks: Vec<AppendAck> = block_on(async {
            let tickets =
                submit_quietly(&s, &id, (0..5u64).map(|i| make_batch(2, 100, i, 0))).await;
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

/// Submits `batches` with `Wake::Later`, then wakes the thread once.
async fn submit_quietly(
    s: &Storage,
    id: &PartitionId,
    batches: impl IntoIterator<Item = Vec<u8>>,
) -> Vec<AppendTicket> {
    let mut tickets = Vec::new();
    for b in batches {
        let b = CheckedBatch::check(b).unwrap();
        tickets.push(s.submit(id, b, Wake::Later).await.unwrap());
    }
    s.wake();
    tickets
}

/// More batches than the command queue holds all go in, in order. (A
/// quiet submit also rings before it waits for room; without that the
/// thread still wakes on its own within a few seconds, so this test shows
/// order and completion, not the prompt wake-up.)
#[test]
fn quiet_submits_beyond_the_queue_depth_go_in_order() {
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
        let acks = block_on(async {
            let tickets =
                submit_quietly(&s, &id, (0..7u64).map(|i| make_batch(1, 100, i, 0))).await;
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

/// `interval:<ms>` gathers appends for up to 2 ms, acks them once they are
/// written, before their fdatasync, and the fdatasync follows within `ms`;
/// `never` acks after the write. A clean shutdown makes both durable. On a
/// manual clock: nothing happens before its time.
#[test]
fn interval_and_never_policies_ack_after_the_write_and_persist() {
    use std::time::Duration;
    let ms = Duration::from_millis;
    for (name, rig) in rigs() {
        let (clock, time) = Clock::manual(1_700_000_000_000);
        let s = rig.open_with(StorageConfig { clock, ..rig.cfg() }).unwrap();
        let with = |d| PartitionConfig {
            durability: d,
            ..small_cfg()
        };
        let (long, short, nv) = (pid("long", 0), pid("short", 0), pid("nv", 0));
        block_on(s.create_partition(long.clone(), with(Durability::IntervalMs(60_000)))).unwrap();
        block_on(s.create_partition(short.clone(), with(Durability::IntervalMs(20)))).unwrap();
        block_on(s.create_partition(nv.clone(), with(Durability::Never))).unwrap();
        // Submitted, gathered until 2 ms have passed, then written and acked.
        let append_gathered = |id: &PartitionId, tag| {
            let mut t = block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
            // Taken off the queue (at this time) before the clock moves.
            block_on(s.ping()).unwrap();
            time.advance(ms(1));
            assert!(block_on(futures_lite::future::poll_once(&mut t)).is_none());
            time.advance(ms(1));
            block_on(t).unwrap()
        };

        assert_eq!(append_gathered(&long, 1).base_offset, 0);
        let o = s.offsets(&long).unwrap();
        assert_eq!(
            (o.high_watermark, o.durable),
            (1, 0),
            "{name}: acked before its sync"
        );

        // Its fdatasync within 20 ms of the write.
        append_gathered(&short, 1);
        time.advance(ms(19));
        assert_eq!(s.offsets(&short).unwrap().durable, 0, "{name}: 19 ms");
        time.advance(ms(1));
        assert_eq!(s.offsets(&short).unwrap().durable, 1, "{name}: 20 ms");
        assert_eq!(s.offsets(&long).unwrap().durable, 0, "{name}: not yet");

        let a = block_on(s.append(&nv, make_batch(1, 100, 1, 0))).unwrap();
        assert_eq!(a.base_offset, 0);
        assert_eq!(s.offsets(&nv).unwrap().high_watermark, 1, "{name}");

        for id in [&long, &short] {
            append_gathered(id, 2);
        }
        block_on(s.append(&nv, make_batch(1, 100, 2, 0))).unwrap();
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

/// Waits (10 s at most) for `read` to give `want`: a checkpoint refresh
/// runs off the storage thread, after the round that started it.
fn eventually<T: PartialEq + std::fmt::Debug>(what: &str, want: T, read: impl Fn() -> T) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = read();
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {got:?}, want {want:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The next offset a partition's checkpoint at `path` claims, if one is
/// there whole: rewritten in place, a read during the write may find it
/// short, which is "not yet" (recovery reads it the same way).
fn checkpoint_next_offset(path: &std::path::Path) -> Option<u64> {
    meta::read::<super::recovery::Checkpoint>(path)
        .ok()
        .flatten()
        .map(|c| c.next_offset)
}

/// While data flows, the checkpoint (recovery's hint) is refreshed once
/// per CHECKPOINT_INTERVAL_MS, not per commit: it costs three fsyncs.
#[test]
fn the_checkpoint_follows_the_log_once_a_second() {
    let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let rig = Rig::fault(15);
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let s = rig.open_with(StorageConfig { clock, ..rig.cfg() }).unwrap();
    let id = pid("ck", 0);
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let path = rig.dir.path().join("topics/ck/0/checkpoint.meta");
    // Rewritten in place: a read during the write may find it short, which
    // is "not yet" here (recovery reads it the same way).
    let read = || checkpoint_next_offset(&path);
    fill(&s, &id, 5, 0);
    let hw = s.offsets(&id).unwrap().high_watermark;
    time.advance(interval - std::time::Duration::from_millis(1));
    assert_eq!(read(), Some(0), "not yet: the create's");
    time.advance(std::time::Duration::from_millis(1));
    eventually("due", Some(hw), read);
    fill(&s, &id, 5, 10);
    time.advance(interval / 2);
    assert_eq!(read(), Some(hw), "half an interval later");
    time.advance(interval / 2);
    eventually(
        "due again",
        Some(s.offsets(&id).unwrap().high_watermark),
        read,
    );
    s.shutdown().unwrap();
}

/// A checkpoint that cannot be written (on a full disk, every refresh
/// fails, once a second while the partition is written) is logged once a
/// minute, with a count of the failures not logged.
#[test]
fn a_checkpoint_that_keeps_failing_is_logged_once_a_minute() {
    use crate::broker::share::tests::{capture_warnings, warnings};
    capture_warnings();
    let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let rig = Rig::fault(16);
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let s = rig.open_with(StorageConfig { clock, ..rig.cfg() }).unwrap();
    let (bad, good) = (pid("ckbad", 0), pid("ckgood", 0));
    for id in [&bad, &good] {
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    }
    // A directory where the file goes: every write of it fails.
    let bad_path = rig.dir.path().join("topics/ckbad/0/checkpoint.meta");
    std::fs::remove_file(&bad_path).unwrap();
    std::fs::create_dir(bad_path).unwrap();
    // The good partition's checkpoint is written in the same refresh: it
    // shows that refresh done, so no two rounds share one.
    let path = rig.dir.path().join("topics/ckgood/0/checkpoint.meta");
    let read = || checkpoint_next_offset(&path);
    let failed = || warnings(&["partition ckbad/0: checkpoint write failed"]);
    let round = |tag: u64| {
        fill(&s, &bad, 1, tag);
        fill(&s, &good, 1, tag);
        time.advance(interval);
        let hw = s.offsets(&good).unwrap().high_watermark;
        eventually("the refresh", Some(hw), read);
    };
    for r in 0..5 {
        round(r * 10);
    }
    eventually("the first failure logged", 1, || failed().len());
    time.advance(std::time::Duration::from_secs(60));
    round(100);
    // The fifth round's failure is taken in before the next refresh
    // starts, and this one's before the shutdown ends.
    s.shutdown().unwrap();
    let lines = failed();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[1].contains("(4 more not logged since)"), "{lines:#?}");
}

/// A tmpfs mounted for a test on a directory of its own (root only):
/// a full disk for real. Unmounted when dropped.
pub(crate) struct Tmpfs {
    pub(crate) at: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub(crate) fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let at = dir.path().join("data");
        std::fs::create_dir(&at).ok()?;
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&at)
            .output()
            .ok()?;
        o.status.success().then_some(Tmpfs { at, _dir: dir })
    }

    /// Writes a file until the file system is full.
    pub(crate) fn fill_up(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.at.join("filler")).expect("filler");
        let chunk = vec![0xa5u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

/// A 4 MiB tmpfs and a real-files rig to open storage on it with
/// [`open_on`]; none where no tmpfs can be mounted (the test is skipped,
/// with a note).
fn on_small_tmpfs() -> Option<(Tmpfs, Rig)> {
    let Some(fs) = Tmpfs::mount(4 << 20) else {
        eprintln!("cannot mount a tmpfs here (needs root); skipped");
        return None;
    };
    Some((fs, Rig::files(pwrite_backend)))
}

/// Storage on `fs`, on a clock the test moves.
fn open_on(fs: &Tmpfs, rig: &Rig) -> (Storage, Arc<ManualClock>) {
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let cfg = StorageConfig {
        clock,
        data_dir: fs.at.clone(),
        ..rig.cfg()
    };
    (rig.open_with(cfg).unwrap(), time)
}

/// Lets the checkpoint refresh of `ck/0` on `fs` come due, and waits for
/// it to claim the log's end.
fn refreshed(fs: &Tmpfs, s: &Storage, time: &ManualClock) {
    let path = fs.at.join("topics/ck/0/checkpoint.meta");
    time.advance(std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS));
    let hw = s.offsets(&pid("ck", 0)).unwrap().high_watermark;
    eventually("refreshed on the full disk", Some(hw), || {
        checkpoint_next_offset(&path)
    });
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .status();
    }
}

/// A partition's checkpoint is written at its create, so that it has its
/// room from the start: the refreshes rewrite it in place and need none.
/// Written first by the first refresh, a second after the create, it was
/// never written if the disk filled before that, and every start then
/// scanned the whole log.
#[test]
fn a_checkpoint_is_refreshed_on_a_disk_full_since_the_create() {
    let Some((fs, rig)) = on_small_tmpfs() else {
        return;
    };
    let (s, time) = open_on(&fs, &rig);
    let id = pid("ck", 0);
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    fs.fill_up();
    for round in 0..2 {
        fill(&s, &id, 5, round * 10);
        refreshed(&fs, &s, &time);
    }
    s.shutdown().unwrap();
}

/// After a clean restart on a disk that filled meanwhile, the first
/// append's clearing of the clean flag cannot replace the checkpoint (the
/// new file needs a block): it is overwritten in place, and the refreshes
/// go on rewriting it. It was removed instead, giving its block to
/// whatever filled the disk, and no refresh could write it again while the
/// disk was full.
#[test]
fn a_clean_checkpoint_cleared_on_a_full_disk_is_kept_and_refreshed() {
    let Some((fs, rig)) = on_small_tmpfs() else {
        return;
    };
    let id = pid("ck", 0);
    let (s, _) = open_on(&fs, &rig);
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    fill(&s, &id, 3, 0);
    s.shutdown().unwrap();
    fs.fill_up();
    let (s, time) = open_on(&fs, &rig);
    fill(&s, &id, 3, 10);
    // Whatever fills the disk takes a block a removed checkpoint gave back.
    fs.fill_up();
    refreshed(&fs, &s, &time);
    s.shutdown().unwrap();
}

/// When one partition's checkpoint is due, every other one whose durable
/// point moved is rewritten with it, so that their fdatasyncs run together
/// and share the device's flushes.
#[test]
fn checkpoints_that_moved_are_rewritten_with_the_one_due() {
    let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let rig = Rig::fault(17);
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let s = rig.open_with(StorageConfig { clock, ..rig.cfg() }).unwrap();
    let read = |topic: &str| {
        let path = rig
            .dir
            .path()
            .join(format!("topics/{topic}/0/checkpoint.meta"));
        // Rewritten in place: a read during the write may find it short.
        checkpoint_next_offset(&path)
    };
    let (early, late) = (pid("early", 0), pid("late", 0));
    block_on(s.create_partition(early.clone(), small_cfg())).unwrap();
    time.advance(interval / 2);
    // Created half an interval later: its own checkpoint is due later.
    block_on(s.create_partition(late.clone(), small_cfg())).unwrap();
    fill(&s, &early, 3, 0);
    fill(&s, &late, 4, 10);
    time.advance(interval / 2 - std::time::Duration::from_millis(1));
    assert_eq!(
        (read("early"), read("late")),
        (Some(0), Some(0)),
        "none due yet: the creates'"
    );
    time.advance(std::time::Duration::from_millis(1));
    let hw = |id: &PartitionId| s.offsets(id).unwrap().high_watermark;
    eventually("due", Some(hw(&early)), || read("early"));
    eventually("moved: written with it", Some(hw(&late)), || read("late"));
    s.shutdown().unwrap();
}

/// A checkpoint of the batch that cannot be rewritten is logged and left
/// as it was; the others of the batch are written, and the failed one is
/// tried again at the next refresh.
#[test]
fn a_failed_checkpoint_in_a_batch_leaves_the_others_and_is_tried_again() {
    use super::recovery::Checkpoint;
    let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let rig = Rig::fault(18);
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let s = rig.open_with(StorageConfig { clock, ..rig.cfg() }).unwrap();
    let path = |topic: &str| {
        rig.dir
            .path()
            .join(format!("topics/{topic}/0/checkpoint.meta"))
    };
    let read = |topic: &str| {
        meta::read::<Checkpoint>(&path(topic))
            .ok()
            .flatten()
            .map(|c| c.next_offset)
    };
    let (good, bad) = (pid("good", 0), pid("bad", 0));
    for id in [&good, &bad] {
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    }
    // A directory where the file goes: its rewrite fails (EISDIR).
    std::fs::remove_file(path("bad")).unwrap();
    std::fs::create_dir(path("bad")).unwrap();
    fill(&s, &good, 3, 0);
    fill(&s, &bad, 4, 10);
    time.advance(interval);
    let hw = |id: &PartitionId| s.offsets(id).unwrap().high_watermark;
    eventually("written beside the failure", Some(hw(&good)), || {
        read("good")
    });
    assert_eq!(read("bad"), None, "failed");
    std::fs::remove_dir(path("bad")).unwrap();
    time.advance(interval);
    eventually("tried again", Some(hw(&bad)), || read("bad"));
    s.shutdown().unwrap();
}

/// A checkpoint refresh whose thread cannot be started (EAGAIN, on a
/// board out of memory or threads) is logged as each checkpoint's failed
/// write: appends go on being acked, and the refresh is tried again.
#[test]
fn a_checkpoint_refresh_whose_thread_cannot_start_is_tried_again() {
    let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let rig = Rig::fault(22);
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let fails = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let s = rig
        .open_with(StorageConfig {
            clock,
            checkpoint_spawn_fails: fails.clone(),
            ..rig.cfg()
        })
        .unwrap();
    let id = pid("nothread", 0);
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let path = rig.dir.path().join("topics/nothread/0/checkpoint.meta");
    // A checkpoint is rewritten in place: a read during the write may find
    // it short, which is "not yet" here (recovery reads it the same way).
    let read = || checkpoint_next_offset(&path);
    fill(&s, &id, 3, 0);
    let hw = s.offsets(&id).unwrap().high_watermark;
    // Returns once the engine has run at the new time: the refresh failed.
    time.advance(interval);
    assert_eq!(read(), Some(0), "no thread: not written");
    // Nothing appended since: only a retry writes it.
    fails.store(false, std::sync::atomic::Ordering::Relaxed);
    time.advance(interval);
    eventually("tried again", Some(hw), read);
    assert_eq!(fill(&s, &id, 3, 10).len(), 3, "appends go on");
    s.shutdown().unwrap();
}

/// Puts a FIFO where `path` goes: a checkpoint refresh's open of it waits
/// for a reader (`fifo_reader`), and its write then fails (a FIFO has no
/// offsets).
pub(crate) fn fifo_in_place_of(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Opens the FIFO at `path` for reading without waiting for a writer,
/// which lets a writer waiting in its open through.
pub(crate) fn fifo_reader(path: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .expect("open the FIFO")
}

/// A storage engine on a manual clock with one partition, `topic`-0, whose
/// `checkpoint.meta` is a FIFO (`fifo_in_place_of`): the next refresh hangs
/// in its open. Returns the rig, the engine, the clock's control, the
/// partition and the FIFO's path.
fn checkpoint_on_a_fifo(
    seed: u64,
    topic: &str,
) -> (
    Rig,
    Storage,
    Arc<ManualClock>,
    PartitionId,
    std::path::PathBuf,
) {
    let rig = Rig::fault(seed);
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let s = rig.open_with(StorageConfig { clock, ..rig.cfg() }).unwrap();
    let id = pid(topic, 0);
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let path = rig
        .dir
        .path()
        .join(format!("topics/{topic}/0/checkpoint.meta"));
    fifo_in_place_of(&path);
    (rig, s, time, id, path)
}

/// A checkpoint refresh runs off the storage thread: while a checkpoint's
/// write hangs (a FIFO where the file goes, whose open waits for a
/// reader), appends are still written, flushed and acked. On the storage
/// thread, the refresh held every append for its fdatasyncs.
#[test]
fn appends_are_acked_while_a_checkpoint_write_hangs() {
    let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let (_rig, s, time, id, path) = checkpoint_on_a_fifo(20, "hang");
    fill(&s, &id, 3, 0);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let reader = std::thread::scope(|scope| {
        let (s, id, time) = (&s, &id, &time);
        scope.spawn(move || {
            // Due: the refresh starts and hangs in its open.
            time.advance(interval);
            let acked = fill(s, id, 3, 10).len();
            let _ = done_tx.send(acked);
        });
        let acked = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        // A reader lets the checkpoint's open through either way (its
        // write then fails: a FIFO has no offsets), so that the test ends.
        let reader = fifo_reader(&path);
        assert_eq!(acked, Ok(3), "appends acked while the checkpoint hangs");
        reader
    });
    assert_eq!(s.offsets(&id).unwrap().high_watermark, 12);
    s.shutdown().unwrap();
    drop(reader);
}

/// A partition is deleted only once a checkpoint refresh in flight is
/// done: its write must not land in the directory of a partition made
/// again under the same name, claiming the old log's durable point there.
#[test]
fn a_delete_waits_for_the_checkpoint_refresh_in_flight() {
    use super::recovery::Checkpoint;
    let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let (rig, s, time, id, path) = checkpoint_on_a_fifo(21, "again");
    // The FIFO's other name: the delete may remove the first.
    let release = rig.dir.path().join("release.fifo");
    std::fs::hard_link(&path, &release).unwrap();
    fill(&s, &id, 3, 0);
    time.advance(interval);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let (s, id) = (&s, &id);
        scope.spawn(move || {
            let _ = done_tx.send(block_on(s.delete_partition(id)));
        });
        let early = done_rx.recv_timeout(std::time::Duration::from_millis(200));
        // Released before any assertion, so that a failing test ends.
        let _reader = fifo_reader(&release);
        assert!(
            early.is_err(),
            "the delete waits for the refresh: {early:?}"
        );
        let deleted = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        assert!(matches!(deleted, Ok(Ok(()))), "{deleted:?}");
    });
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let ck = meta::read::<Checkpoint>(&path).ok().flatten();
    assert!(ck.is_none_or(|c| c.next_offset == 0), "{ck:?}");
    assert_eq!(s.offsets(&id).unwrap().high_watermark, 0);
    s.shutdown().unwrap();
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
            .map(|i| block_on(s.submit_now(&id, make_batch(2, 300, 1000 + i, 0))).unwrap())
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

/// A fetch of durable data is answered while an fdatasync is held, and
/// sees nothing of the append that flush is for: inline (each file's
/// flush on the storage thread) and pipelined. Before, the fetch queued
/// behind the flush and the write rounds after it (seconds on a throttled
/// disk).
#[test]
fn a_fetch_of_durable_data_is_answered_while_an_fdatasync_is_held() {
    for pipelined in [false, true] {
        let rig = Rig::fault(11);
        let disk = rig.disk().unwrap().clone();
        disk.set_plan(FaultPlan {
            background_syncs: true,
            ..FaultPlan::default()
        });
        let id = pid("held", 0);
        // Still time: the read below stays recent (`readers_recent`).
        let (clock, _time) = Clock::manual(1_700_000_000_000);
        let s = rig
            .open_with(StorageConfig {
                pipelined_fsync: pipelined,
                clock,
                ..rig.cfg()
            })
            .expect("open storage");
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let durable = fill(&s, &id, 3, 0);
        // A consumer reading along, as a tailing one does.
        assert_eq!(read_all(&s, &id, 0), durable);
        disk.set_plan(FaultPlan {
            background_syncs: true,
            hang_syncs: true,
            ..FaultPlan::default()
        });
        let hw = s.offsets(&id).unwrap().high_watermark;
        let ticket = block_on(s.submit_now(&id, make_batch(1, 10, 99, 0))).unwrap();
        while disk.syncs_held() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let (s, id) = (&s, &id);
            scope.spawn(move || {
                let _ = tx.send(block_on(s.read(id, 0, 1 << 20)));
            });
            // Only a hang detector: a fetch that waits for the flush never
            // comes back while it is held.
            let got = rx.recv_timeout(std::time::Duration::from_secs(10));
            let held = disk.syncs_held();
            // Let the flush (and a fetch stuck behind it) go either way.
            disk.set_plan(FaultPlan {
                background_syncs: true,
                ..FaultPlan::default()
            });
            let got = got.unwrap_or_else(|_| {
                panic!("pipelined {pipelined}: the fetch waited for the held fdatasync")
            });
            assert_eq!(held, 1, "pipelined {pipelined}: answered while held");
            assert_eq!(got.expect("read").to_vec(), durable.concat());
        });
        let ack = block_on(ticket).expect("acked once flushed");
        assert_eq!(ack.base_offset, hw);
        assert_eq!(s.offsets(&id).unwrap().high_watermark, hw + 1);
        s.shutdown().unwrap();
    }
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
        let (clock, time) = Clock::manual(1_700_000_000_000);
        let quarantine = || StorageConfig {
            recovery_policy: RecoveryPolicy::TolerateTornTail,
            ..rig.cfg()
        };
        let s = rig
            .open_with(StorageConfig {
                clock,
                ..quarantine()
            })
            .unwrap();
        let rep = &s.recovery_report()[0];
        assert!(rep.quarantined, "{name}: {rep:?}");
        assert_eq!(rep.bytes_truncated, 0, "{name}: never truncate acked data");
        // The report and the refusal say where, and what was there.
        let third_end: u64 = acked[..3].iter().map(|b| b.len() as u64).sum();
        let third_next = batch::parse_header(&acked[2]).unwrap().next_offset();
        match &rep.quarantine {
            Some(QuarantineReason::DurableDataMissing {
                slot: 0,
                position,
                end_offset,
                found: DataEnd::Torn(batch::BatchError::CrcMismatch { .. }),
                ..
            }) => assert_eq!(
                (*position, *end_offset),
                (BLOCK_BYTES as u64 + third_end, third_next),
                "{name}"
            ),
            other => panic!("{name}: {other:?}"),
        }
        match block_on(s.append(&id, make_batch(1, 10, 1, 0))) {
            Err(StorageError::Quarantined(q)) => {
                assert_eq!(q.partition, id);
                assert_eq!(Some(&q.reason), rep.quarantine.as_ref(), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        // Read-only up to the damage.
        assert_eq!(read_all(&s, &id, 0), acked[..3], "{name}");
        // Still quarantined on the next start: the evidence (checkpoint)
        // must survive the checkpoint interval, or the damage would be
        // truncated as a torn tail.
        time.advance(std::time::Duration::from_millis(
            CHECKPOINT_INTERVAL_MS + 100,
        ));
        assert_eq!(read_all(&s, &id, 0), acked[..3], "{name}");
        s.shutdown().unwrap();
        let s = rig.open_with(quarantine()).unwrap();
        let rep = &s.recovery_report()[0];
        assert!(rep.quarantined, "{name}: second start: {rep:?}");
        assert_eq!(rep.bytes_truncated, 0);
        s.shutdown().unwrap();
    }
}

/// The default policy: a damaged batch inside durable data is skipped,
/// everything intact on both sides of it is served, the partition takes
/// writes, and the report says which offsets were lost. In the active
/// segment (before the clean checkpoint) and in a closed one, at its
/// start, middle and end.
#[test]
fn damaged_batch_is_skipped_and_the_rest_served() {
    for (name, rig) in rigs() {
        let id = pid("skip", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let acked = fill(&s, &id, 10, 0);
        s.shutdown().unwrap();
        drop(s);
        let start =
            |i: usize| BLOCK_BYTES as u64 + acked[..i].iter().map(|b| b.len() as u64).sum::<u64>();
        let seg0 = rig.dir.path().join("topics/skip/0/seg-00000.log");
        // Damage the first, the fifth and the last batch.
        for i in [0, 4, 9] {
            match rig.disk() {
                Some(d) => assert!(d.flip_stored_bit(&seg0, start(i) + 70, 2)),
                None => flip_file_bit(&seg0, start(i) + 70, 2),
            }
        }
        let offsets = |i: usize| {
            let h = batch::parse_header(&acked[i]).unwrap();
            (h.base_offset, h.next_offset())
        };
        for round in 0..2 {
            let s = rig.open();
            let rep = s.recovery_report()[0].clone();
            assert!(!rep.quarantined, "{name}: {rep:?}");
            assert_eq!(rep.bytes_truncated, 0, "{name}");
            let got: Vec<_> = rep
                .damaged
                .iter()
                .map(|d| (d.slot, d.position, d.bytes, d.from_offset, d.to_offset))
                .collect();
            let want: Vec<_> = [0, 4, 9]
                .iter()
                .map(|&i| {
                    let (from, to) = offsets(i);
                    (0, start(i), acked[i].len() as u64, from, to)
                })
                .collect();
            assert_eq!(got, want, "{name} round {round}");
            let mut intact: Vec<Vec<u8>> = acked.clone();
            intact.remove(9);
            intact.remove(4);
            intact.remove(0);
            let mut all = read_all(&s, &id, 0);
            all.truncate(intact.len());
            assert_eq!(all, intact, "{name} round {round}");
            // A fetch inside a lost range gets the first batch after it.
            let (from, _) = offsets(4);
            let first = block_on(s.read(&id, from, 1)).unwrap();
            assert_eq!(first, acked[5], "{name}");
            // Offsets are never given twice: a write goes after the last.
            let a = block_on(s.append(&id, make_batch(1, 10, 99 + round, 0))).unwrap();
            assert_eq!(a.base_offset, offsets(9).1 + round, "{name}");
            s.shutdown().unwrap();
        }
    }
}

/// Damage that appears after start-up (bit rot under a running broker) is
/// found by the read that meets it, and skipped as recovery skips it: the
/// batches on both sides are served, the partition takes writes, and the
/// report names the lost offsets. The next start finds the same damage.
#[test]
fn damage_found_by_a_read_after_start_up_is_skipped() {
    for (name, rig) in rigs() {
        let id = pid("rot", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        // Past the first segment: its batches are read from the device.
        let acked = fill(&s, &id, 90, 0);
        let segs = block_on(s.segments(&id)).unwrap();
        let closed_end = segs
            .iter()
            .find(|g| g.slot == 0 && !g.active)
            .unwrap()
            .next_offset;
        let offsets = |i: usize| {
            let h = batch::parse_header(&acked[i]).unwrap();
            (h.base_offset, h.next_offset())
        };
        assert!(
            offsets(6).1 <= closed_end,
            "{name}: batch 5 in the closed segment"
        );
        let start =
            |i: usize| BLOCK_BYTES as u64 + acked[..i].iter().map(|b| b.len() as u64).sum::<u64>();
        let seg0 = rig.dir.path().join("topics/rot/0/seg-00000.log");
        match rig.disk() {
            Some(d) => assert!(d.flip_stored_bit(&seg0, start(5) + 70, 2)),
            None => flip_file_bit(&seg0, start(5) + 70, 2),
        }
        let mut intact = acked.clone();
        intact.remove(5);
        assert_eq!(read_all(&s, &id, 0), intact, "{name}");
        let damaged: Vec<_> = s
            .recovery_report()
            .iter()
            .filter(|r| r.id == id)
            .flat_map(|r| r.damaged.clone())
            .map(|d| (d.slot, d.position, d.bytes, d.from_offset, d.to_offset))
            .collect();
        let (from, to) = offsets(5);
        assert_eq!(
            damaged,
            [(0, start(5), acked[5].len() as u64, from, to)],
            "{name}"
        );
        // A fetch inside the lost range gets the first batch after it.
        assert_eq!(block_on(s.read(&id, from, 1)).unwrap(), acked[6], "{name}");
        let a = block_on(s.append(&id, make_batch(1, 10, 999, 0))).unwrap();
        assert_eq!(a.base_offset, offsets(89).1, "{name}: writable");
        s.shutdown().unwrap();
        drop(s);
        let s = rig.open();
        let rep = s.recovery_report()[0].clone();
        assert!(!rep.quarantined, "{name}: {rep:?}");
        assert_eq!(rep.damaged.len(), 1, "{name}: {rep:?}");
        assert_eq!(read_all(&s, &id, 0)[..intact.len()], intact[..], "{name}");
        s.shutdown().unwrap();
    }
}

/// Damage met in the middle of a fetch whose first batches lie in a lent
/// window: the answer keeps the batches before it and goes on after it,
/// and answers held meanwhile keep their bytes while the damage is skipped
/// (resync reads through the read buffer).
#[test]
fn damage_skipped_mid_answer_leaves_held_answers_whole() {
    for (name, rig) in rigs() {
        let id = pid("rot-lend", 0);
        let s = rig.open();
        let sent = log_of_180(&s, &id, 0);
        let segs = block_on(s.segments(&id)).unwrap();
        let closed_end = segs.iter().find(|g| g.slot == 0 && !g.active).unwrap();
        let h20 = batch::parse_header(&sent[20]).unwrap();
        assert!(h20.next_offset() <= closed_end.next_offset, "{name}");
        let at20 = BLOCK_BYTES as u64 + sent[..20].iter().map(|b| b.len() as u64).sum::<u64>();
        let seg0 = rig.dir.path().join("topics/rot-lend/0/seg-00000.log");
        match rig.disk() {
            Some(d) => assert!(d.flip_stored_bit(&seg0, at20 + 70, 2)),
            None => flip_file_bit(&seg0, at20 + 70, 2),
        }
        let mut intact = sent.clone();
        intact.remove(20);
        let mut held = Vec::new();
        fetch_to_end(&s, &id, 128 * 1024, |b| held.push(b));
        // Read it all again, over the held answers' buffers if they were
        // free, then check what each answer held all along.
        assert_eq!(read_all(&s, &id, 0), intact, "{name}");
        let got: Vec<Vec<u8>> = held
            .iter()
            .flat_map(|b| BatchIter::new(b).map(|v| v.unwrap().bytes.to_vec()))
            .collect();
        assert_eq!(got, intact, "{name}");
        assert!(s.stats().reads_lent > 0, "{name}");
        s.shutdown().unwrap();
    }
}

/// The report says what recovery truncated or why it quarantined, and
/// where: a torn tail (dropped), damage in a closed segment, and a corrupt
/// segment header (both quarantine).
#[test]
fn recovery_reports_say_what_and_where() {
    let cfg = small_cfg();
    let seg = |rig: &Rig, slot: usize| {
        rig.dir
            .path()
            .join(format!("topics/rep/0/seg-{slot:05}.log"))
    };
    // A torn batch after the data, no checkpoint: truncated.
    let rig = Rig::files(pwrite_backend);
    let id = pid("rep", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
    let acked = fill(&s, &id, 4, 0);
    s.shutdown().unwrap();
    let end = BLOCK_BYTES as u64 + acked.iter().map(|b| b.len() as u64).sum::<u64>();
    let next = batch::parse_header(&acked[3]).unwrap().next_offset();
    let torn = stored(make_batch(2, 300, 9, 0), next);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(seg(&rig, 0))
            .unwrap();
        f.write_all_at(&torn[..torn.len() / 2], end).unwrap();
    }
    std::fs::remove_file(rig.dir.path().join("topics/rep/0/checkpoint.meta")).unwrap();
    let s = rig.open();
    let rep = &s.recovery_report()[0];
    assert_eq!(rep.policy, RecoveryPolicy::SkipDamage);
    assert_eq!(rep.quarantine, None, "{rep:?}");
    let t = rep.truncation.clone().expect("a truncation");
    assert_eq!(
        (t.slot, t.position, t.offset, t.bytes),
        (0, end, next, torn.len() as u64),
        "{rep:?}"
    );
    assert!(
        matches!(t.found, batch::BatchError::CrcMismatch { .. }),
        "{t:?}"
    );
    assert_eq!(rep.bytes_truncated, t.bytes);
    s.shutdown().unwrap();

    // Three segments of data; then damage to the closed first one, and to
    // the second one's header.
    let rig = Rig::fault(14);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
    for i in 0..7 {
        block_on(s.append(&id, make_batch(2, 10_000, i, 0))).unwrap();
    }
    s.shutdown().unwrap();
    let disk = rig.disk().unwrap();
    // Inside the second batch (20 KiB each) of segment 0.
    assert!(disk.flip_stored_bit(&seg(&rig, 0), BLOCK_BYTES as u64 + 25_000, 1));
    let quarantine = StorageConfig {
        recovery_policy: RecoveryPolicy::TolerateTornTail,
        ..rig.cfg()
    };
    let s = rig.open_with(quarantine).unwrap();
    let rep = &s.recovery_report()[0];
    match &rep.quarantine {
        Some(QuarantineReason::SegmentEndsEarly {
            slot: 0,
            position,
            end_offset: 2,
            next_base: 6,
            found: DataEnd::Torn(_),
        }) => assert!(*position > BLOCK_BYTES as u64, "{rep:?}"),
        other => panic!("{other:?}"),
    }
    assert!(rep.truncation.is_none() && rep.quarantined);
    s.shutdown().unwrap();
    assert!(disk.flip_stored_bit(&seg(&rig, 0), BLOCK_BYTES as u64 + 25_000, 1));
    assert!(disk.flip_stored_bit(&seg(&rig, 1), 20, 0));
    let s = rig.open();
    let rep = &s.recovery_report()[0];
    assert!(
        matches!(
            rep.quarantine,
            Some(QuarantineReason::CorruptSegmentHeader {
                slot: 1,
                error: HeaderError::CrcMismatch
            })
        ),
        "{rep:?}"
    );
    s.shutdown().unwrap();
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

/// A file system without fallocate (FUSE, some network file systems
/// answer EOPNOTSUPP): segments are preallocated by writing zeros, and the
/// partition takes, keeps and recovers data as anywhere else.
#[test]
fn without_fallocate_segments_are_preallocated_with_zeros() {
    let rig = Rig::fault(11);
    let disk = rig.disk().unwrap().clone();
    disk.set_plan(FaultPlan {
        allocate_unsupported: true,
        ..FaultPlan::default()
    });
    let id = pid("nofalloc", 0);
    let cfg = small_cfg();
    let s = rig.open();
    block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
    assert_eq!(s.stats().zero_fill_allocations, u64::from(cfg.segments));
    assert_eq!(s.stats().buffered_io, 0);
    for slot in 0..cfg.segments {
        let path = rig
            .dir
            .path()
            .join(format!("topics/nofalloc/0/seg-{slot:05}.log"));
        let bytes = disk.contents(&path).expect("segment file");
        assert_eq!(bytes.len() as u64, cfg.segment_bytes, "slot {slot}");
    }
    let acked = fill(&s, &id, 40, 0);
    disk.crash();
    let _ = s.shutdown();
    drop(s);
    disk.restart();
    let s = rig.open();
    assert!(!s.recovery_report()[0].quarantined);
    assert_eq!(read_all(&s, &id, 0), acked);
    s.shutdown().unwrap();
}

/// A backend that had to open files without O_DIRECT is noted in the
/// stats, for `/health`.
#[test]
fn buffered_io_is_noted() {
    let rig = Rig::fault(12);
    rig.disk().unwrap().set_plan(FaultPlan {
        direct_io_refused: true,
        ..FaultPlan::default()
    });
    let s = rig.open();
    block_on(s.create_partition(pid("buffered", 0), small_cfg())).unwrap();
    assert_eq!(s.stats().buffered_io, 1);
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
            Err(StorageError::Quarantined(q)) => assert!(
                matches!(q.reason, QuarantineReason::CorruptBatch { slot: 0, .. }),
                "{q}"
            ),
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
    let second = std::time::Duration::from_secs(1);
    for (name, rig) in rigs() {
        let (clock, time) = Clock::manual(1_700_000_000_000);
        let cfg = StorageConfig {
            clock: clock.clone(),
            ..rig.cfg()
        };
        let id = pid("ttl", 0);
        let s = rig.open_with(cfg.clone()).unwrap();
        let pcfg = PartitionConfig {
            retention_ms: Some(60_000),
            ..small_cfg()
        };
        block_on(s.create_partition(id.clone(), pcfg)).unwrap();
        // Records of now fill more than one segment; 30 s later, fresh ones.
        for i in 0..30u64 {
            block_on(s.append(&id, make_batch(1, 3000, i, clock.wall_ms()))).unwrap();
        }
        time.advance(30 * second);
        let fresh = clock.wall_ms();
        for i in 0..3u64 {
            block_on(s.append(&id, make_batch(1, 3000, 100 + i, fresh))).unwrap();
        }
        time.advance(29 * second);
        assert_eq!(
            s.offsets(&id).unwrap().earliest,
            0,
            "{name}: 59 s old: kept"
        );
        time.advance(2 * second);
        let o = s.offsets(&id).unwrap();
        assert!(o.earliest > 0, "{name}: old segments were not freed");
        assert_eq!(o.high_watermark, 33);
        // Only the segment holding fresh records (the active one) stays.
        assert_eq!(
            block_on(s.offset_for_timestamp(&id, fresh)).unwrap(),
            Some(30)
        );
        s.shutdown().unwrap();
        let s = rig.open_with(cfg).unwrap();
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

/// A lost `partition.meta` in a partition holding acknowledged batches is
/// not a creation cut short: recovery quarantines the partition (served
/// read-only, nothing deleted, offsets never given again), as for a lost
/// segment file. A directory whose creation stopped before any batch is
/// still removed.
#[test]
fn lost_partition_meta_quarantines_a_partition_with_data() {
    for (name, rig) in rigs() {
        let id = pid("lost", 1);
        let empty = pid("fresh", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        block_on(s.create_partition(empty.clone(), small_cfg())).unwrap();
        let acked = fill(&s, &id, 40, 0);
        let hw = s.offsets(&id).unwrap().high_watermark;
        s.shutdown().unwrap();
        let dir = rig.dir.path().join("topics/lost/1");
        std::fs::remove_file(dir.join("partition.meta")).unwrap();
        std::fs::remove_file(rig.dir.path().join("topics/fresh/0/partition.meta")).unwrap();
        for _ in 0..2 {
            let s = rig.open();
            assert!(
                !rig.dir.path().join("topics/fresh/0").exists(),
                "{name}: a creation cut short is removed"
            );
            let rep = s
                .recovery_report()
                .into_iter()
                .find(|r| r.id == id)
                .expect("a report");
            assert_eq!(
                rep.quarantine,
                Some(QuarantineReason::MissingMeta),
                "{name}"
            );
            assert_eq!(s.offsets(&id).unwrap().high_watermark, hw, "{name}");
            assert_eq!(read_all(&s, &id, 0), acked, "{name}: served read-only");
            let refused = block_on(s.append(&id, make_batch(1, 10, 99, 0)));
            assert!(
                matches!(refused, Err(StorageError::Quarantined(_))),
                "{name}: {refused:?}"
            );
            assert!(
                matches!(
                    block_on(s.create_partition(id.clone(), small_cfg())),
                    Err(StorageError::PartitionExists { .. })
                ),
                "{name}"
            );
            assert!(
                !dir.join("partition.meta").exists(),
                "{name}: nothing rewritten"
            );
            s.shutdown().unwrap();
        }
        // The operator's way out: delete it (then recreate the topic).
        let s = rig.open();
        block_on(s.delete_partition(&id)).unwrap();
        assert!(!dir.exists(), "{name}");
        s.shutdown().unwrap();
    }
}

/// What recovery set aside is counted quarantined while it is there: a
/// partition deleted since (as start-up deletes a deleted topic's
/// leftovers), loaded read-only or left unloaded, is not.
#[test]
fn a_set_aside_partition_is_counted_quarantined_until_deleted() {
    let rig = Rig::files(pwrite_backend);
    let loaded = pid("lost", 0);
    let s = rig.open();
    block_on(s.create_partition(loaded.clone(), small_cfg())).unwrap();
    fill(&s, &loaded, 5, 0);
    s.shutdown().unwrap();
    std::fs::remove_file(rig.dir.path().join("topics/lost/0/partition.meta")).unwrap();
    // Unreadable metadata and no segment to read a config from: unloaded.
    let unloaded = pid("gone", 0);
    let dir = rig.dir.path().join("topics/gone/0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("partition.meta"), b"not metadata").unwrap();
    let s = rig.open();
    assert_eq!(s.recovery_report().len(), 2);
    assert_eq!(s.stats().quarantined, 2);
    block_on(s.delete_partition(&unloaded)).unwrap();
    assert_eq!(s.stats().quarantined, 1, "the unloaded one is gone");
    block_on(s.delete_partition(&loaded)).unwrap();
    assert_eq!(s.stats().quarantined, 0, "the read-only one is gone");
    s.shutdown().unwrap();
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

/// `read_within` takes even the first batch only when it fits in
/// `first_max`, from the file as from the tail; then it reads as `read`.
#[test]
fn a_read_within_leaves_out_a_first_batch_larger_than_its_room() {
    for (name, rig) in rigs() {
        let id = pid("within", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let acked = fill(&s, &id, 200, 0);
        let earliest = s.offsets(&id).unwrap().earliest;
        // The first kept batch, early in the log (the file), and the last
        // one (the tail).
        for b in [
            acked
                .iter()
                .find(|b| batch::parse_header(b).unwrap().base_offset >= earliest),
            acked.last(),
        ] {
            let b = b.unwrap();
            let at = batch::parse_header(b).unwrap().base_offset;
            let within =
                |first_max| block_on(s.read_within(&id, at, 10 * b.len(), first_max)).unwrap();
            assert!(within(b.len() - 1).is_empty(), "{name}");
            assert_eq!(&within(b.len())[..b.len()], &b[..], "{name}");
        }
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
    sequential_fetches(0);
}

/// The same over a log with a gap between every two batches: a fetch asks
/// for the end of the last batch it got, below the next batch's offset,
/// and still starts where the last one stopped.
#[test]
fn sequential_fetches_over_gaps_are_read_ahead() {
    sequential_fetches(5);
}

/// A fetch's answer borrows the read buffer its batches were read into,
/// and keeps its bytes while later fetches read on: at most
/// `LENT_MAX` buffers go out at once, the answers past them are copies, and
/// a buffer comes back once its answer is dropped.
#[test]
fn held_answers_keep_their_bytes_while_reads_go_on() {
    use super::readbuf::LENT_MAX;
    for (name, rig) in rigs() {
        let id = pid("lend", 0);
        let s = rig.open();
        let sent = log_of_180(&s, &id, 0);
        s.shutdown().unwrap();
        let s = rig.open();
        let hw = s.offsets(&id).unwrap().high_watermark;
        let replay = |keep: &mut Vec<bytes::Bytes>| {
            let (got, fetches) = fetch_to_end(&s, &id, 128 * 1024, |b| keep.push(b));
            assert_eq!(got, sent, "{name}");
            fetches
        };
        let mut held = Vec::new();
        let lent0 = s.stats().reads_lent;
        let fetches = replay(&mut held);
        assert!(fetches > 2 * LENT_MAX as u64, "{name}: {fetches} fetches");
        assert_eq!(s.stats().reads_lent - lent0, LENT_MAX as u64, "{name}");
        // Reading it all again, and appending, leaves the held answers be.
        replay(&mut Vec::new());
        for tag in 180..200u64 {
            block_on(s.append(&id, make_batch(8, 1000, tag, tag as i64))).unwrap();
        }
        let again: Vec<Vec<u8>> = held
            .iter()
            .flat_map(|b| BatchIter::new(b).map(|v| v.unwrap().bytes.to_vec()))
            .collect();
        assert_eq!(again, sent, "{name}");
        assert_eq!(s.stats().reads_lent - lent0, LENT_MAX as u64, "{name}");
        // Answers dropped as they are used: each big one is a view.
        drop(held);
        let lent1 = s.stats().reads_lent;
        let mut one = Vec::new();
        let (mut at, mut fetches) = (0, 0u64);
        while at < hw {
            let bytes = block_on(s.read(&id, at, 128 * 1024)).unwrap();
            fetches += 1;
            at = BatchIter::new(&bytes)
                .last()
                .unwrap()
                .unwrap()
                .header
                .next_offset();
            one.clear();
            one.push(bytes);
        }
        let lent = s.stats().reads_lent - lent1;
        // Not lent: the last answer or two (short, or from the tail), and
        // one at the segment boundary.
        assert!(lent + 3 >= fetches, "{name}: {lent} of {fetches} lent");
        s.shutdown().unwrap();
    }
}

/// A fetch stops before a batch that would not fit, and that batch's body
/// usually runs past the window the answer lies in: looking at its header
/// leaves the window be, so the answer is still lent rather than copied.
/// Each answer is held while the next is read (as the broker sends it),
/// and lending leaves read-ahead its spares.
#[test]
fn a_fetch_stopping_before_a_batch_past_its_window_is_lent() {
    for (name, rig) in rigs() {
        let id = pid("lend-edge", 0);
        let s = rig.open();
        let cfg = PartitionConfig {
            segment_bytes: 4 << 20,
            segments: 2,
            ..small_cfg()
        };
        block_on(s.create_partition(id.clone(), cfg)).unwrap();
        // About 20 KB a batch: six fit in 128 KiB, and the seventh ends
        // past the window read for them.
        for tag in 0..100u64 {
            block_on(s.append(&id, make_batch(8, 2500, tag, tag as i64))).unwrap();
        }
        s.shutdown().unwrap();
        let s = rig.open();
        let before = s.stats();
        let mut sending = bytes::Bytes::new();
        let (got, fetches) = fetch_to_end(&s, &id, 128 * 1024, |b| {
            assert!(BatchIter::new(&sending).all(|v| v.is_ok()), "{name}");
            sending = b;
        });
        assert_eq!(got.len(), 100, "{name}");
        let st = s.stats();
        let lent = st.reads_lent - before.reads_lent;
        // All, but perhaps the last: its end may be in the tail buffer.
        assert!(lent + 1 >= fetches, "{name}: {lent} of {fetches} lent");
        if reads_ahead(name) {
            let used = st.reads_ahead_used - before.reads_ahead_used;
            assert!(
                used + 1 >= fetches,
                "{name}: {used} of {fetches} read ahead"
            );
        }
        s.shutdown().unwrap();
    }
}

/// Creates `id` (three segments of 1 MiB) with 180 batches of about 8 KB,
/// `gap` offsets between each two; returns them as stored.
fn log_of_180(s: &Storage, id: &PartitionId, gap: u64) -> Vec<Vec<u8>> {
    let cfg = PartitionConfig {
        segment_bytes: 1 << 20,
        segments: 3,
        ..small_cfg()
    };
    block_on(s.create_partition(id.clone(), cfg)).unwrap();
    let mut sent = Vec::new();
    let mut next = 0;
    for tag in 0..180u64 {
        let b = make_batch(8, 1000, tag, tag as i64);
        let ack = if gap == 0 {
            block_on(s.append(id, b.clone())).unwrap()
        } else {
            append_placed(s, id, b.clone(), next + gap).unwrap()
        };
        next = ack.last_offset + 1;
        sent.push(stored(b, ack.base_offset));
    }
    sent
}

/// A log of 180 batches, `gap` offsets between each two, read in order.
fn sequential_fetches(gap: u64) {
    for (name, rig) in rigs() {
        let id = pid("ahead", 0);
        let s = rig.open();
        let sent = log_of_180(&s, &id, gap);
        let log_bytes: usize = sent.iter().map(Vec::len).sum();
        s.shutdown().unwrap();
        let (s, counts) = open_counting_reads(&rig);
        let before = s.stats();
        let read0 = rig.disk().map(FaultDisk::bytes_read);
        let (got, fetches) = fetch_to_end(&s, &id, 64 * 1024, drop);
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
pub(crate) struct SyncGate {
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
    pub(crate) fn release(&self) {
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
pub(crate) struct OpenGateOnDrop(pub(crate) Arc<SyncGate>);

impl Drop for OpenGateOnDrop {
    fn drop(&mut self) {
        *self.0.released.lock().unwrap() = usize::MAX / 2;
        self.0.changed.notify_all();
        self.0.fd.get().unwrap().signal();
    }
}

/// A storage on `rig`'s fault disk whose group fdatasyncs (pipelined)
/// are held until the gate releases them: for tests of what waits on an
/// ack.
pub(crate) fn held_storage(rig: &Rig) -> (Storage, Arc<SyncGate>) {
    let gate = Arc::new(SyncGate::default());
    let cfg = StorageConfig {
        pipelined_fsync: true,
        ..rig.cfg()
    };
    let s = Storage::open_with_backend(cfg, Box::new(HeldSync::new(rig, &gate))).unwrap();
    (s, gate)
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
    let mut a = block_on(s.submit_now(id, make_batch(1, 100, 1, 0))).unwrap();
    gate.wait_for(&gate.started, 1);
    let writes = gate.writes.load(Ordering::SeqCst);
    // B arrives while A's fdatasync is held: it is written right away...
    let mut b = block_on(s.submit_now(id, make_batch(1, 100, 2, 0))).unwrap();
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
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let h = Held::open(8, "hold", |c| StorageConfig {
        sync_hold_max: std::time::Duration::from_secs(60),
        pipelined_fsync: true,
        clock,
        ..c
    });
    let (s, gate, id) = (&h.s, &h.gate, &h.id);
    let submit = |tag| block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
    let a = submit(1);
    gate.wait_for(&gate.started, 1);
    // B and C come while A's flush runs (held 2 s: the hold may then last
    // up to half of that).
    let (b, c) = (submit(2), submit(3));
    gate.wait_for(&gate.writes, 2);
    time.advance(std::time::Duration::from_secs(2));
    gate.release();
    assert_eq!(block_on(a).unwrap().base_offset, 0);
    // A's ack is out: its producer's next append is awaited before B and C
    // are flushed (the clock stands still: the hold cannot run out).
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(gate.started.load(Ordering::SeqCst), 1, "no flush before D");
    let d = submit(4);
    gate.wait_for(&gate.started, 2);
    gate.release();
    for (t, off) in [(b, 1), (c, 2), (d, 3)] {
        assert_eq!(block_on(t).unwrap().base_offset, off);
    }
    // Three acks, one answer: E's flush starts when the hold runs out (half
    // of a recent flush, under a second here), not before.
    let e = submit(5);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(gate.started.load(Ordering::SeqCst), 2, "E is held");
    time.advance(std::time::Duration::from_secs(1));
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

/// Pipelined, the hold counts answers per partition: two appends to one
/// partition do not stand in for the answer another partition still owes.
#[test]
fn another_partitions_answers_do_not_end_the_pipelined_hold() {
    use std::time::Duration;
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let h = Held::open(11, "flood", |c| StorageConfig {
        sync_hold_max: Duration::from_secs(60),
        pipelined_fsync: true,
        clock,
        ..c
    });
    let (s, gate, flood) = (&h.s, &h.gate, &h.id);
    let good = pid("good", 0);
    block_on(s.create_partition(good.clone(), small_cfg())).unwrap();
    let submit =
        |id: &PartitionId, tag| block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
    let resume = s.pause();
    let (f1, g1) = (submit(flood, 1), submit(&good, 2));
    drop(resume);
    gate.wait_for(&gate.started, 1);
    // The flush takes 2 s: the hold may last up to 1 s.
    time.advance(Duration::from_secs(2));
    gate.release();
    block_on(f1).unwrap();
    block_on(g1).unwrap();
    let (f2, f3) = (submit(flood, 3), submit(flood, 4));
    time.advance(Duration::ZERO);
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        1,
        "no flush before the good producer answers"
    );
    let g2 = submit(&good, 5);
    gate.wait_for(&gate.started, 2);
    gate.release();
    for (t, off) in [(f2, 1), (f3, 2), (g2, 1)] {
        assert_eq!(block_on(t).unwrap().base_offset, off);
    }
    gate.release(); // the shutdown's own sync, if it starts one
    s.shutdown().unwrap();
}

/// The inline engine on a manual clock with its fdatasync calls held, and
/// two partitions: the [`Held`]'s own ("flood") and "good". Returns the
/// rig, the good partition, the clock as the engine reads it and its
/// control.
fn flood_and_good(seed: u64) -> (Held, PartitionId, Clock, Arc<ManualClock>) {
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let seen = clock.clone();
    let h = Held::open(seed, "flood", |c| StorageConfig {
        sync_hold_max: std::time::Duration::from_secs(60),
        clock,
        ..c
    });
    let good = pid("good", 0);
    block_on(h.s.create_partition(good.clone(), small_cfg())).unwrap();
    h.gate.hold_sync_calls.store(true, Ordering::SeqCst);
    (h, good, seen, time)
}

/// The first flush, once started, takes `d` of the manual clock (the
/// engine's smoothed flush time, on which its holds are based): the clock
/// moves while the flush is held, then the flush is released. Returns the
/// thread moving the clock, which ends once the engine has acted on it.
fn first_flush_takes(
    gate: &SyncGate,
    seen: &Clock,
    time: &Arc<ManualClock>,
    d: std::time::Duration,
) -> std::thread::JoinHandle<()> {
    gate.wait_for(&gate.started, 1);
    let t0 = seen.now();
    let advance = {
        let time = time.clone();
        std::thread::spawn(move || time.advance(d))
    };
    while seen.now() < t0 + d {
        std::thread::yield_now();
    }
    gate.release();
    advance
}

/// A producer whose ack went out with a flood's on another partition
/// (the flood answers first, and would start the next flush at once)
/// still makes the next flush: unpipelined, it waits for every acked
/// partition's first answer, and the flood's answers do not count for the
/// other partition.
#[test]
fn the_next_inline_flush_waits_for_each_acked_partitions_answer() {
    use std::time::Duration;
    let (h, good, seen, time) = flood_and_good(10);
    let (s, gate, flood) = (&h.s, &h.gate, &h.id);
    let submit =
        |id: &PartitionId, tag| block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
    // One group with an append of each; its flush (one held fdatasync per
    // partition) takes 2 s, so the hold may last up to 1 s.
    let resume = s.pause();
    let (mut f1, f2, mut g1) = (submit(flood, 1), submit(flood, 2), submit(&good, 3));
    drop(resume);
    let advance = first_flush_takes(gate, &seen, &time, Duration::from_secs(2));
    gate.wait_for(&gate.started, 2);
    // The good partition (one append waiting against two) was flushed
    // first, and acked before the flood's file started to flush.
    let poll = |t| block_on(futures_lite::future::poll_once(t));
    let acked = poll(&mut g1).expect("acked before the flood's flush");
    assert_eq!(acked.unwrap().base_offset, 0);
    assert!(poll(&mut f1).is_none());
    gate.release();
    advance.join().unwrap();
    block_on(f1).unwrap();
    block_on(f2).unwrap();
    // The flood answers (twice: its two acks) and a round runs: no flush
    // before the good producer answers too.
    let (f3, f4) = (submit(flood, 4), submit(flood, 5));
    time.advance(Duration::ZERO);
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        2,
        "no flush before the good producer answers"
    );
    let g2 = submit(&good, 6);
    gate.wait_for(&gate.started, 3);
    gate.release();
    gate.wait_for(&gate.started, 4);
    gate.release();
    for (t, off) in [(f3, 2), (f4, 3), (g2, 1)] {
        assert_eq!(block_on(t).unwrap().base_offset, off);
    }
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        4,
        "one group, two files"
    );
    gate.hold_sync_calls.store(false, Ordering::SeqCst);
    s.shutdown().unwrap();
}

/// The producers, each with one record of 100 B in flight, of the fan-in
/// tests below.
fn fan_in_record(producer: u64, seq: i32) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    b.push(0, Some(b"k"), &[7u8; 100], &[]);
    b.finish(ProducerStamp {
        producer_id: producer,
        producer_epoch: 0,
        base_sequence: seq,
    })
}

/// The fan-in tests' start: `producers` producers with a record each,
/// twice, flushes held, `sync_hold_max` a minute. Flush 1 takes 2 s, and
/// the producers answer its acks together `answer_after` later; flush 2
/// takes no time. Returns once flush 2's acks are out, so the recent flush
/// is 1.75 s.
fn producers_twice(
    seed: u64,
    name: &str,
    producers: u64,
    answer_after: std::time::Duration,
    fanin_wait: std::time::Duration,
) -> (Held, Arc<ManualClock>) {
    use std::time::Duration;
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let seen = clock.clone();
    let h = Held::open(seed, name, |c| StorageConfig {
        sync_hold_max: Duration::from_secs(60),
        fanin_wait,
        clock,
        ..c
    });
    h.gate.hold_sync_calls.store(true, Ordering::SeqCst);
    let round = |seq| {
        let resume = h.s.pause();
        let t: Vec<_> = (1..=producers)
            .map(|p| block_on(h.s.submit_now(&h.id, fan_in_record(p, seq))).unwrap())
            .collect();
        drop(resume);
        t
    };
    let first = round(0);
    first_flush_takes(&h.gate, &seen, &time, Duration::from_secs(2))
        .join()
        .unwrap();
    for t in first {
        block_on(t).unwrap();
    }
    time.advance(answer_after);
    let second = round(1);
    h.gate.wait_for(&h.gate.started, 2);
    h.gate.release();
    for t in second {
        block_on(t).unwrap();
    }
    (h, time)
}

/// Three producers (too few for a fan-in's own wait).
fn three_producers_twice(
    seed: u64,
    name: &str,
    answer_after: std::time::Duration,
) -> (Held, Arc<ManualClock>) {
    let wait = StorageConfig::default().fanin_wait;
    producers_twice(seed, name, 3, answer_after, wait)
}

/// Eight producers answering 10 s after flush 1's acks, more than four
/// flushes: followed as slow.
fn eight_slow_producers(
    seed: u64,
    name: &str,
    fanin_wait: std::time::Duration,
) -> (Held, Arc<ManualClock>) {
    let late = std::time::Duration::from_secs(10);
    producers_twice(seed, name, 8, late, fanin_wait)
}

/// Inline, a fan-in (many producers with a record in flight each) whose
/// first answer came within a quarter of a flush is waited for whole:
/// after a group acked three producers' appends, the next flush waits
/// until all three have answered, so they share it instead of alternating
/// between two groups; a second append of a producer that answered
/// already does not stand in for the others.
#[test]
fn the_next_inline_flush_waits_for_every_acked_producer() {
    use std::time::Duration;
    let (h, time) = three_producers_twice(13, "fan-in", Duration::ZERO);
    let (s, gate, id) = (&h.s, &h.gate, &h.id);
    let submit = |p, seq| block_on(s.submit_now(id, fan_in_record(p, seq))).unwrap();
    let (a, a2, b) = (submit(1, 2), submit(1, 3), submit(2, 2));
    time.advance(Duration::ZERO);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        2,
        "no flush before the third producer answers"
    );
    let c = submit(3, 2);
    gate.wait_for(&gate.started, 3);
    gate.release();
    for (t, off) in [(a, 6), (a2, 7), (b, 8), (c, 9)] {
        assert_eq!(block_on(t).unwrap().base_offset, off);
    }
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        3,
        "the three answers share one flush"
    );
    gate.hold_sync_calls.store(false, Ordering::SeqCst);
    s.shutdown().unwrap();
}

/// Inline, where a fan-in's first answer takes more than a quarter of a
/// flush (a fast device beside busy network threads), two groups
/// alternating keep the device and the network threads both busy: only
/// the first answer is waited for.
#[test]
fn an_inline_fan_in_is_not_gathered_where_the_first_answer_takes_over_a_quarter_flush() {
    use std::time::Duration;
    // The first answer's 0.6 s is more than a quarter of 1.75 s.
    let (h, _time) = three_producers_twice(14, "no-gather", Duration::from_millis(600));
    let (s, gate, id) = (&h.s, &h.gate, &h.id);
    let a = block_on(s.submit_now(id, fan_in_record(1, 2))).unwrap();
    gate.wait_for(&gate.started, 3);
    gate.release();
    assert_eq!(block_on(a).unwrap().base_offset, 6);
    gate.hold_sync_calls.store(false, Ordering::SeqCst);
    s.shutdown().unwrap();
}

/// Inline, a fan-in whose producers take longer than four flushes to
/// answer (1,000 devices behind busy network threads, on a quick disk) is
/// gathered: after a group acked eight producers' records, the next flush
/// and its writes wait until all eight have sent again, or for
/// `fanin_wait` at most; with `fanin_wait` zero, the first answer starts
/// it.
#[test]
fn a_slow_answering_fan_in_is_gathered_into_one_flush() {
    use std::time::Duration;
    for wait in [Duration::from_secs(60), Duration::ZERO] {
        let (h, time) = eight_slow_producers(17, "gather", wait);
        let (s, gate, id) = (&h.s, &h.gate, &h.id);
        let submit = |p, seq| block_on(s.submit_now(id, fan_in_record(p, seq))).unwrap();
        // They answer one by one, again late.
        time.advance(Duration::from_secs(10));
        let writes = gate.writes.load(Ordering::SeqCst);
        let mut third: Vec<_> = (1..=7).map(|p| submit(p, 2)).collect();
        if wait.is_zero() {
            // Unhushed, the appends wake the thread, and the first one
            // ends the hold.
            gate.wait_for(&gate.started, 3);
            gate.hold_sync_calls.store(false, Ordering::SeqCst);
            gate.release();
            third.push(submit(8, 2));
            for t in third {
                block_on(t).unwrap();
            }
            s.shutdown().unwrap();
            continue;
        }
        // A round at the clock's time (in a thread: were a flush to start,
        // it would not return until the flush is released).
        let round = |time: &Arc<ManualClock>| {
            let time = time.clone();
            std::thread::spawn(move || time.advance(Duration::ZERO))
        };
        let looked = round(&time);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            gate.started.load(Ordering::SeqCst),
            2,
            "no flush before the eighth producer answers"
        );
        assert_eq!(gate.writes.load(Ordering::SeqCst), writes, "nor any write");
        looked.join().unwrap();
        // Hushed, the append does not wake the thread: its next look (a
        // quarter of `sync_hold_max` later on a system clock) does.
        third.push(submit(8, 2));
        let look = round(&time);
        gate.wait_for(&gate.started, 3);
        gate.release();
        look.join().unwrap();
        for (t, off) in third.into_iter().zip(16..) {
            assert_eq!(block_on(t).unwrap().base_offset, off);
        }
        assert_eq!(
            gate.started.load(Ordering::SeqCst),
            3,
            "one flush for eight"
        );
        // Three of the eight answer, the rest never do: the flush starts
        // when `fanin_wait` has passed since the acks.
        time.advance(Duration::from_secs(10));
        let fourth: Vec<_> = (1..=3).map(|p| submit(p, 3)).collect();
        let looked = round(&time);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(gate.started.load(Ordering::SeqCst), 3, "waiting for five");
        looked.join().unwrap();
        let over = std::thread::spawn(move || time.advance(wait));
        gate.wait_for(&gate.started, 4);
        gate.release();
        for (t, off) in fourth.into_iter().zip(24..) {
            assert_eq!(block_on(t).unwrap().base_offset, off);
        }
        // The round goes on to checkpoint (a minute has passed), through a
        // held flush of its own.
        gate.hold_sync_calls.store(false, Ordering::SeqCst);
        gate.release();
        over.join().unwrap();
        s.shutdown().unwrap();
    }
}

/// After `eight_slow_producers`: seven of the eight answer, late again,
/// and the thread's look at them starts no flush (it waits for the eighth).
/// Their tickets.
fn seven_of_eight_held(h: &Held, time: &Arc<ManualClock>) -> Vec<AppendTicket> {
    use std::time::Duration;
    time.advance(Duration::from_secs(10));
    let held: Vec<_> = (1..=7)
        .map(|p| block_on(h.s.submit_now(&h.id, fan_in_record(p, 2))).unwrap())
        .collect();
    let looked = {
        let time = time.clone();
        std::thread::spawn(move || time.advance(Duration::ZERO))
    };
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        h.gate.started.load(Ordering::SeqCst),
        2,
        "held for the eighth"
    );
    looked.join().unwrap();
    held
}

/// A batching producer's window (more records than a device sends at once)
/// ends a fan-in's wait as it arrives: its rate waits on every flush. It
/// rings through the hush, so no look of the thread's is needed either.
#[test]
fn a_batching_producers_window_ends_a_fan_in_wait() {
    use std::time::Duration;
    let (h, time) = eight_slow_producers(19, "window", Duration::from_secs(60));
    let (s, gate, id) = (&h.s, &h.gate, &h.id);
    let mut held = seven_of_eight_held(&h, &time);
    // A window of records from a ninth producer, the clock standing still.
    let records = fanin::FANIN_DEVICE_RECORDS + 1;
    let mut b = BatchBuilder::new();
    for _ in 0..records {
        b.push(0, Some(b"k"), &[9u8; 100], &[]);
    }
    let window = b.finish(ProducerStamp {
        producer_id: 100,
        producer_epoch: 0,
        base_sequence: 0,
    });
    held.push(block_on(s.submit_now(id, window)).unwrap());
    gate.wait_for(&gate.started, 3);
    gate.release();
    for (t, off) in held.into_iter().zip(16..) {
        assert_eq!(block_on(t).unwrap().base_offset, off);
    }
    gate.hold_sync_calls.store(false, Ordering::SeqCst);
    gate.release();
    h.s.shutdown().unwrap();
}

/// A power cut while a fan-in's round is waited for: every record acked
/// before it is there after recovery, and the ones held for the flush
/// (written nowhere yet) were never acked.
#[test]
fn a_power_cut_during_a_fan_in_wait_loses_nothing_acked() {
    use std::time::Duration;
    let (h, time) = eight_slow_producers(18, "cut", Duration::from_secs(60));
    let acked = read_all(&h.s, &h.id, 0);
    assert_eq!(acked.len(), 16);
    // Seven answer and are held for the eighth; the power goes.
    let held = seven_of_eight_held(&h, &time);
    let Held {
        _open: open,
        s,
        gate,
        id,
        _rig: rig,
    } = h;
    let disk = rig.disk().unwrap().clone();
    disk.crash();
    gate.hold_sync_calls.store(false, Ordering::SeqCst);
    drop(open);
    let _ = s.shutdown();
    for t in held {
        assert!(
            block_on(t).is_err(),
            "a held record acked on a crashed disk"
        );
    }
    drop(s);
    disk.restart();
    let s = rig.open();
    let rep = &s.recovery_report()[0];
    assert!(!rep.quarantined, "{rep:?}");
    assert_eq!(read_all(&s, &id, 0), acked);
    let a = block_on(s.append(&id, make_batch(1, 10, 7, 0))).unwrap();
    assert_eq!(a.base_offset, 16, "the log goes on densely");
    s.shutdown().unwrap();
}

/// Inline, on a slow device (flushes of over a millisecond), the appends
/// that queued up behind a round while it wrote are written before the
/// flush, so one producer's window shares one flush instead of being split
/// over two; on a quick device the flush starts right after the round.
#[test]
fn inline_on_a_slow_device_the_appends_queued_behind_a_round_share_its_flush() {
    use std::time::Duration;
    for (recent_flush, flushes) in [(Duration::from_secs(2), 1), (Duration::from_micros(100), 2)] {
        let (clock, time) = Clock::manual(1_700_000_000_000);
        let seen = clock.clone();
        // A queue of 4, so that a round takes 3 appends after the pause and
        // leaves one behind; no hold for the warm-up's answer.
        let h = Held::open(15, "ahead", |c| StorageConfig {
            append_queue_depth: 4,
            sync_hold_max: Duration::ZERO,
            clock,
            ..c
        });
        let (s, gate, id) = (&h.s, &h.gate, &h.id);
        let submit = |tag| block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
        gate.hold_sync_calls.store(true, Ordering::SeqCst);
        let warm = submit(0);
        first_flush_takes(gate, &seen, &time, recent_flush)
            .join()
            .unwrap();
        block_on(warm).unwrap();
        let resume = s.pause();
        let mut tickets: Vec<_> = (1..=4).map(submit).collect();
        drop(resume);
        for n in 0..flushes {
            gate.wait_for(&gate.started, 2 + n);
            gate.release();
        }
        std::thread::sleep(Duration::from_millis(50));
        let label = format!("recent flush {recent_flush:?}");
        for (off, t) in (1..).zip(tickets.iter_mut()) {
            let acked = block_on(futures_lite::future::poll_once(t))
                .unwrap_or_else(|| panic!("{label}: append {off} not acked"));
            assert_eq!(acked.unwrap().base_offset, off, "{label}");
        }
        assert_eq!(
            gate.started.load(Ordering::SeqCst),
            1 + flushes,
            "{label}: flushes for the four appends"
        );
        gate.hold_sync_calls.store(false, Ordering::SeqCst);
        s.shutdown().unwrap();
    }
}

/// Inline, on a slow device, a group over three or more partitions starts
/// their fdatasyncs together (one held group here, released once), so the
/// block layer can serve them with about two flushes; on a quick device,
/// and for two partitions, they run one after another (a held call each).
/// A failure in a group started together fails every partition in it:
/// which file failed is not known.
#[test]
fn inline_on_a_slow_device_a_group_over_many_partitions_starts_its_flushes_together() {
    use std::time::Duration;
    let slow = Duration::from_secs(2);
    // (recent flush, partitions, groups started, the second fdatasync fails)
    let cases = [
        (slow, 4, 1, false),
        (Duration::from_micros(100), 4, 4, false),
        (slow, 2, 2, false),
        (slow, 4, 1, true),
    ];
    for (recent_flush, partitions, starts, fail) in cases {
        let (clock, time) = Clock::manual(1_700_000_000_000);
        let seen = clock.clone();
        let h = Held::open(16, "together", |c| StorageConfig {
            sync_hold_max: Duration::ZERO,
            clock,
            ..c
        });
        let (s, gate) = (&h.s, &h.gate);
        let mut ids = vec![h.id.clone()];
        for i in 1..partitions {
            let id = pid("together-more", i);
            block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
            ids.push(id);
        }
        let submit =
            |id: &PartitionId, tag| block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
        gate.hold_sync_calls.store(true, Ordering::SeqCst);
        // The device's flush time, learnt from one partition's flush.
        let warm = submit(&ids[0], 0);
        first_flush_takes(gate, &seen, &time, recent_flush)
            .join()
            .unwrap();
        block_on(warm).unwrap();
        let resume = s.pause();
        let tickets: Vec<_> = ids.iter().map(|id| submit(id, 1)).collect();
        drop(resume);
        let label = format!("{partitions} partitions, recent flush {recent_flush:?}, fail {fail}");
        if fail {
            let disk = h._rig.disk().unwrap();
            disk.set_plan(FaultPlan {
                fail_sync_nth: Some(disk.syncs() + 2),
                errno: libc::EIO,
                ..FaultPlan::default()
            });
        }
        for n in 0..starts {
            gate.wait_for(&gate.started, 2 + n);
            // Nothing more starts while this one is held.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(gate.started.load(Ordering::SeqCst), 2 + n, "{label}");
            gate.release();
        }
        // Checked before the acks are awaited: one flush more would be
        // held, and its acks never come.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            gate.started.load(Ordering::SeqCst),
            1 + starts,
            "{label}: flushes started"
        );
        for t in tickets {
            assert_eq!(block_on(t).is_ok(), !fail, "{label}");
        }
        gate.hold_sync_calls.store(false, Ordering::SeqCst);
        let _ = s.shutdown();
    }
}

/// Inline, a partition with its acks waiting in bulk (a client pipelining
/// small requests) beside one whose producer awaits each ack is flushed
/// every other group: the light producer's next group is its own file
/// alone. The heavy one's flush waits at most one group, and starts
/// without the light one when that one does not come back; many
/// producers' appends (a fan-in) are never deferred.
#[test]
fn a_heavy_partition_is_flushed_every_other_group_beside_a_light_one() {
    use std::time::Duration;
    let (h, good, seen, time) = flood_and_good(12);
    let (s, gate, flood) = (&h.s, &h.gate, &h.id);
    let submit =
        |id: &PartitionId, tag| block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
    let floods = |from: u64| {
        (from..from + 16)
            .map(|t| submit(flood, t))
            .collect::<Vec<_>>()
    };
    let poll = |t| block_on(futures_lite::future::poll_once(t));
    // Group 1 (nothing flushed before): both files, the good one first.
    // Its flush takes 2 s, so the holds below may last up to 1 s.
    let resume = s.pause();
    let (f1, g1) = (floods(0), submit(&good, 100));
    drop(resume);
    let advance = first_flush_takes(gate, &seen, &time, Duration::from_secs(2));
    gate.wait_for(&gate.started, 2);
    gate.release();
    advance.join().unwrap();
    block_on(g1).unwrap();
    for t in f1 {
        block_on(t).unwrap();
    }
    // Group 2: both answer; the flood's file was flushed last, so only
    // the good one's is flushed now, and the flood's acks wait.
    let mut f2 = floods(20);
    let g2 = submit(&good, 101);
    gate.wait_for(&gate.started, 3);
    gate.release();
    assert_eq!(block_on(g2).unwrap().base_offset, 1);
    assert!(poll(&mut f2[0]).is_none(), "the flood's flush deferred");
    // The next group waits for the good producer's answer (the hold)
    // rather than flushing the flood's file alone: group 3 has both.
    time.advance(Duration::ZERO);
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        3,
        "held for the answer"
    );
    let g3 = submit(&good, 102);
    gate.wait_for(&gate.started, 4);
    gate.release();
    gate.wait_for(&gate.started, 5);
    gate.release();
    assert_eq!(block_on(g3).unwrap().base_offset, 2);
    for (i, t) in f2.into_iter().enumerate() {
        assert_eq!(block_on(t).unwrap().base_offset, 16 + i as u64);
    }
    // The flood answers, the good producer does not: when the hold runs
    // out, the flood's file is flushed alone (a light partition that is
    // not in the group defers nothing).
    let f4 = floods(40);
    time.advance(Duration::ZERO);
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        5,
        "held for the good one"
    );
    let advance = {
        let time = time.clone();
        std::thread::spawn(move || time.advance(Duration::from_secs(2)))
    };
    gate.wait_for(&gate.started, 6);
    gate.release();
    advance.join().unwrap();
    for (i, t) in f4.into_iter().enumerate() {
        assert_eq!(block_on(t).unwrap().base_offset, 32 + i as u64);
    }
    assert_eq!(gate.started.load(Ordering::SeqCst), 6, "six flushes so far");
    // A fan-in: 16 producers with a record each on the flood's partition,
    // flushed last, beside the good one. Not one client's pipeline: both
    // files are flushed.
    let stamped = |producer: u64| {
        let mut b = BatchBuilder::new();
        b.push(0, Some(b"k"), &[7u8; 100], &[]);
        b.finish(ProducerStamp {
            producer_id: producer,
            producer_epoch: 0,
            base_sequence: 0,
        })
    };
    let resume = s.pause();
    let fan_in: Vec<_> = (0..16u64)
        .map(|i| block_on(s.submit_now(flood, stamped(1000 + i))).unwrap())
        .collect();
    let g5 = submit(&good, 103);
    drop(resume);
    gate.wait_for(&gate.started, 7);
    gate.release();
    gate.wait_for(&gate.started, 8);
    gate.release();
    block_on(g5).unwrap();
    for (i, t) in fan_in.into_iter().enumerate() {
        assert_eq!(block_on(t).unwrap().base_offset, 48 + i as u64);
    }
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        8,
        "eight flushes in all"
    );
    gate.hold_sync_calls.store(false, Ordering::SeqCst);
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
    let submit = |tag| block_on(s.submit_now(id, make_batch(1, 100, tag, 0))).unwrap();
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

/// The rig's storage with segments pre-written, as the broker runs it.
fn open_prewriting(rig: &Rig) -> Storage {
    rig.open_with(StorageConfig {
        prewrite_segments: true,
        ..rig.cfg()
    })
    .unwrap()
}

/// A create pre-writes its first segment a chunk per turn of the storage
/// thread, so appends to other partitions are answered meanwhile: written
/// in one go, 16 MiB held every ack for 0.8 to 1.7 s on a 20 MB/s card.
#[test]
fn appends_elsewhere_are_answered_while_a_create_pre_writes() {
    use super::engine::CREATE_PREWRITE_PAUSED;
    use futures_lite::future::poll_once;
    for (name, rig) in rigs() {
        let s = open_prewriting(&rig);
        let (a, b) = (pid("a", 0), pid("b", 0));
        block_on(s.create_partition(a.clone(), small_cfg())).unwrap();
        CREATE_PREWRITE_PAUSED.store(true, Ordering::Relaxed);
        let mut create = Box::pin(s.create_partition(b.clone(), small_cfg()));
        assert!(block_on(poll_once(&mut create)).is_none(), "{name}");
        block_on(s.append(&a, make_batch(3, 10, 1, 0))).expect(name);
        assert!(
            block_on(poll_once(&mut create)).is_none(),
            "{name}: the create was answered before its first segment was written"
        );
        // The same id again, and a partition past the limit counting it,
        // are refused while it runs.
        let again = block_on(s.create_partition(b.clone(), small_cfg()));
        assert!(
            matches!(again, Err(StorageError::PartitionExists { .. })),
            "{name}: {again:?}"
        );
        CREATE_PREWRITE_PAUSED.store(false, Ordering::Relaxed);
        // Wakes the storage thread, which then finishes the create.
        block_on(s.append(&a, make_batch(3, 10, 2, 0))).expect(name);
        block_on(create).expect(name);
        block_on(s.append(&b, make_batch(2, 10, 3, 0))).expect(name);
        assert_eq!(read_all(&s, &b, 0).len(), 1, "{name}");
        assert_eq!(read_all(&s, &a, 0).len(), 2, "{name}");
        s.shutdown().unwrap();
        // Made whole: it is there after a restart.
        let s = rig.open();
        assert_eq!(read_all(&s, &b, 0).len(), 1, "{name}");
        s.shutdown().unwrap();
    }
}

/// A create's syncs (its segment files, directory, `partition.meta` and
/// the entries above) run off the storage thread: appends to other
/// partitions are answered while they are held, and the create only once
/// they are done. On the storage thread, each held every ack for 20 to
/// 100 ms on a throttled card (docs/performance.md, "Creating a topic on
/// a slow card").
#[test]
fn appends_elsewhere_are_answered_while_a_create_syncs() {
    use futures_lite::future::poll_once;
    for (name, rig) in rigs() {
        // Not pre-written: the create command itself starts the syncs, so
        // the append queued behind it comes after them.
        let cfg = rig.cfg();
        let held = cfg.create_sync_held.clone();
        let s = rig.open_with(cfg).unwrap();
        let (a, b) = (pid("a", 0), pid("b", 0));
        block_on(s.create_partition(a.clone(), small_cfg())).unwrap();
        held.store(true, Ordering::Release);
        let mut create = Box::pin(s.create_partition(b.clone(), small_cfg()));
        assert!(block_on(poll_once(&mut create)).is_none(), "{name}");
        block_on(s.append(&a, make_batch(3, 10, 1, 0))).expect(name);
        assert!(
            block_on(poll_once(&mut create)).is_none(),
            "{name}: the create was answered before its syncs were done"
        );
        let meta = rig.dir.path().join("topics/b/0").join(part::PARTITION_META);
        assert!(!meta.exists(), "{name}: partition.meta before the syncs");
        let again = block_on(s.create_partition(b.clone(), small_cfg()));
        assert!(
            matches!(again, Err(StorageError::PartitionExists { .. })),
            "{name}: {again:?}"
        );
        held.store(false, Ordering::Release);
        block_on(create).expect(name);
        block_on(s.append(&b, make_batch(2, 10, 2, 0))).expect(name);
        assert_eq!(read_all(&s, &a, 0).len(), 1, "{name}");
        s.shutdown().unwrap();
        let s = rig.open();
        assert_eq!(read_all(&s, &b, 0).len(), 1, "{name}: after a restart");
        s.shutdown().unwrap();
    }
}

/// A shutdown while a create's syncs are held leaves either nothing (the
/// create answered so, the id free after the restart) or the whole
/// partition (answered done), whichever the shutdown met.
#[test]
fn a_shutdown_during_a_create_s_syncs_leaves_nothing_or_all() {
    use futures_lite::future::poll_once;
    for (name, rig) in rigs() {
        let cfg = rig.cfg();
        let held = cfg.create_sync_held.clone();
        let s = rig.open_with(cfg.clone()).unwrap();
        let b = pid("b", 0);
        held.store(true, Ordering::Release);
        let mut create = Box::pin(s.create_partition(b.clone(), small_cfg()));
        assert!(block_on(poll_once(&mut create)).is_none(), "{name}");
        // The shutdown, queued behind the create, waits for its syncs.
        let release = std::thread::spawn({
            let held = held.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                held.store(false, Ordering::Release);
            }
        });
        s.shutdown().unwrap();
        let res = block_on(create);
        release.join().unwrap();
        let s = rig.open_with(cfg).unwrap();
        match res {
            Ok(()) => {
                block_on(s.append(&b, make_batch(2, 10, 1, 0))).expect(name);
            }
            Err(StorageError::ShuttingDown) => {
                assert!(s.offsets(&b).is_err(), "{name}");
                block_on(s.create_partition(b.clone(), small_cfg())).expect(name);
            }
            Err(e) => panic!("{name}: {e:?}"),
        }
        s.shutdown().unwrap();
    }
}

/// Threads of this process named as the create syncs' are (nextest runs
/// each test in a process of its own).
fn create_sync_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == super::syncpool::CREATE.name)
        .count()
}

/// The ids of this process's threads named `name`.
fn threads_named(name: &str) -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim_end() == name).then(|| t.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

/// Checkpoint refreshes run on the checkpoint pool's threads, started once
/// and kept while work comes: after a 64-partition create, refresh after
/// refresh of every partition's checkpoint runs on the same few threads.
/// A thread per refresh, which started one per checkpoint, started 65
/// threads a second for 64 partitions while data flowed.
#[test]
fn checkpoint_refreshes_start_no_thread_each() {
    use super::recovery::Checkpoint;
    use super::syncpool::{CHECKPOINTS, CREATE};
    const PARTITIONS: u32 = 64;
    let rig = Rig::fault(24);
    let (clock, time) = Clock::manual(1_700_000_000_000);
    let s = rig
        .open_with(StorageConfig {
            clock,
            max_partitions: PARTITIONS as usize,
            ..rig.cfg()
        })
        .unwrap();
    let ids: Vec<_> = (0..PARTITIONS).map(|p| pid("many", p)).collect();
    for id in &ids {
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    }
    let creating = threads_named(CREATE.name).len();
    assert!((1..=CREATE.threads).contains(&creating), "{creating}");
    let checkpointed = |s: &Storage| -> Vec<Option<u64>> {
        ids.iter()
            .map(|id| {
                let path = rig
                    .dir
                    .path()
                    .join(format!("topics/many/{}/checkpoint.meta", id.partition));
                // Rewritten in place: a read during the write may find it
                // short, which is "not yet" here.
                let ck = meta::read::<Checkpoint>(&path).ok().flatten();
                ck.map(|c| c.next_offset)
                    .filter(|&n| n == s.offsets(id).unwrap().high_watermark)
            })
            .collect()
    };
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..3 {
        for id in &ids {
            block_on(s.append(id, make_batch(1, 10, round, 0))).unwrap();
        }
        let want: Vec<_> = ids
            .iter()
            .map(|id| Some(s.offsets(id).unwrap().high_watermark))
            .collect();
        time.advance(std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS));
        eventually("every checkpoint refreshed", want, || checkpointed(&s));
        let now = threads_named(CHECKPOINTS.name);
        assert!(
            !now.is_empty(),
            "round {round}: the pool's threads are kept"
        );
        seen.extend(now);
        assert!(
            seen.len() <= CHECKPOINTS.threads,
            "round {round}: {} threads have written checkpoints",
            seen.len()
        );
    }
    // None started (one idle past `syncpool::IDLE_EXIT` may have ended).
    assert!(threads_named(CREATE.name).len() <= creating);
    s.shutdown().unwrap();
    assert!(
        threads_named(CHECKPOINTS.name).is_empty(),
        "after the shutdown"
    );
}

/// A create of many partitions syncs them on a bounded number of threads:
/// one thread per partition started 64 for a 64-partition create, each
/// with its stack, on a board of 512 MiB. The syncs are held, so every
/// partition's are waiting at once.
#[test]
fn a_create_of_many_partitions_syncs_on_few_threads() {
    use futures_lite::future::poll_once;
    const PARTITIONS: u32 = 24;
    for (name, rig) in rigs() {
        let cfg = StorageConfig {
            max_partitions: 64,
            ..rig.cfg()
        };
        let held = cfg.create_sync_held.clone();
        let s = rig.open_with(cfg).unwrap();
        let a = pid("a", 0);
        block_on(s.create_partition(a.clone(), small_cfg())).unwrap();
        held.store(true, Ordering::Release);
        let mut creates: Vec<_> = (0..PARTITIONS)
            .map(|p| Box::pin(s.create_partition(pid("many", p), small_cfg())))
            .collect();
        for c in &mut creates {
            assert!(block_on(poll_once(c)).is_none(), "{name}");
        }
        // Answered once the storage thread has handed every create's
        // syncs over.
        block_on(s.append(&a, make_batch(1, 10, 1, 0))).expect(name);
        let threads = create_sync_threads();
        assert!(
            (1..=super::syncpool::CREATE.threads).contains(&threads),
            "{name}: {threads} threads syncing {PARTITIONS} partitions"
        );
        held.store(false, Ordering::Release);
        for c in creates {
            block_on(c).expect(name);
        }
        s.shutdown().unwrap();
        assert_eq!(create_sync_threads(), 0, "{name}: after the shutdown");
        let s = rig
            .open_with(StorageConfig {
                max_partitions: 64,
                ..rig.cfg()
            })
            .unwrap();
        for p in 0..PARTITIONS {
            block_on(s.append(&pid("many", p), make_batch(1, 10, 2, 0))).expect(name);
        }
        s.shutdown().unwrap();
    }
}

/// A directory fsync that fails at a create (on the fault disk: the
/// partition's directory, before `partition.meta` is written, or the
/// topic's, after) refuses the create with an error naming the directory,
/// ENOSPC as a full disk, and leaves nothing: no directory, no partition,
/// now or after a restart; the id is created once the disk is healthy.
/// The syncs made off the storage thread went around the backend, so a
/// fault test could not fail them.
#[test]
fn a_create_whose_directory_fsync_fails_is_refused_and_leaves_nothing() {
    let cases = [
        ("topics/t/0", libc::EIO),
        ("topics/t", libc::EIO),
        ("topics/t/0", libc::ENOSPC),
    ];
    for (dir, errno) in cases {
        let rig = Rig::fault(11);
        let disk = rig.disk().unwrap().clone();
        let s = rig.open();
        let id = pid("t", 0);
        let part_dir = rig.dir.path().join("topics/t/0");
        disk.set_plan(FaultPlan {
            fail_dir_syncs_of: Some(dir),
            errno,
            ..FaultPlan::default()
        });
        let err = block_on(s.create_partition(id.clone(), small_cfg())).unwrap_err();
        match (&err, errno) {
            (StorageError::Io(e), libc::EIO) => {
                let text = e.to_string();
                let failed = rig.dir.path().join(dir);
                assert!(text.contains(&*failed.to_string_lossy()), "{dir}: {text}");
            }
            (StorageError::InsufficientSpace { partition, .. }, libc::ENOSPC) => {
                assert_eq!(partition, &id)
            }
            _ => panic!("{dir}, errno {errno}: {err:?}"),
        }
        assert!(disk.faults_injected() > 0, "{dir}");
        assert!(!part_dir.exists(), "{dir}: the partition directory stayed");
        assert!(s.offsets(&id).is_err(), "{dir}");
        s.shutdown().unwrap();
        disk.set_plan(FaultPlan::default());
        let s = rig.open();
        assert!(s.offsets(&id).is_err(), "{dir}: after a restart");
        assert!(s.unloaded().is_empty(), "{dir}: {:?}", s.unloaded());
        block_on(s.create_partition(id.clone(), small_cfg())).expect(dir);
        block_on(s.append(&id, make_batch(2, 10, 1, 0))).expect(dir);
        s.shutdown().unwrap();
    }
}

/// A create a shutdown cuts short is answered so and leaves nothing: the
/// id can be created after the restart.
#[test]
fn a_create_cut_short_by_a_shutdown_leaves_nothing_behind() {
    use super::engine::CREATE_PREWRITE_PAUSED;
    use futures_lite::future::poll_once;
    for (name, rig) in rigs() {
        let cfg = StorageConfig {
            prewrite_segments: true,
            max_partitions: 2,
            ..rig.cfg()
        };
        let s = rig.open_with(cfg.clone()).unwrap();
        block_on(s.create_partition(pid("a", 0), small_cfg())).unwrap();
        CREATE_PREWRITE_PAUSED.store(true, Ordering::Relaxed);
        let b = pid("b", 0);
        let mut create = Box::pin(s.create_partition(b.clone(), small_cfg()));
        assert!(block_on(poll_once(&mut create)).is_none(), "{name}");
        let third = block_on(s.create_partition(pid("c", 0), small_cfg()));
        assert!(
            matches!(third, Err(StorageError::TooManyPartitions { max: 2 })),
            "{name}: the create under way counts: {third:?}"
        );
        s.shutdown().unwrap();
        let res = block_on(create);
        assert!(
            matches!(res, Err(StorageError::ShuttingDown)),
            "{name}: {res:?}"
        );
        CREATE_PREWRITE_PAUSED.store(false, Ordering::Relaxed);
        assert!(
            !rig.dir.path().join("topics/b").exists() || rig.disk().is_some(),
            "{name}: its directory stayed"
        );
        let s = rig.open_with(cfg).unwrap();
        assert!(s.offsets(&b).is_err(), "{name}");
        block_on(s.create_partition(b.clone(), small_cfg())).expect(name);
        block_on(s.append(&b, make_batch(2, 10, 1, 0))).expect(name);
        s.shutdown().unwrap();
    }
}

/// A create whose first segment's pre-write fails is answered with the
/// error and leaves nothing: the other partitions go on, and the id can be
/// created once the disk writes again.
#[test]
fn a_create_whose_pre_write_fails_leaves_nothing_behind() {
    let rig = Rig::fault(41);
    let disk = rig.disk().expect("fault rig").clone();
    let s = open_prewriting(&rig);
    let (a, b) = (pid("a", 0), pid("b", 0));
    block_on(s.create_partition(a.clone(), small_cfg())).unwrap();
    disk.set_plan(FaultPlan {
        fail_writes_to: Some("topics/b/"),
        errno: libc::EIO,
        ..FaultPlan::default()
    });
    let e = block_on(s.create_partition(b.clone(), small_cfg())).unwrap_err();
    assert!(matches!(e, StorageError::Io(_)), "{e:?}");
    assert!(s.offsets(&b).is_err(), "half made");
    block_on(s.append(&a, make_batch(2, 10, 1, 0))).expect("a goes on");
    disk.set_plan(FaultPlan::default());
    block_on(s.create_partition(b.clone(), small_cfg())).expect("made once it can be");
    block_on(s.append(&b, make_batch(2, 10, 2, 0))).expect("b takes writes");
    s.shutdown().unwrap();
}
