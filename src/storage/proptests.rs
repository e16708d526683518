//! Property tests: random appends, crashes at random points, recovery, and
//! the invariants that matter:
//!
//! - every batch acknowledged before a crash reads back byte-identical,
//! - offsets stay dense and monotonic (these are producers' batches: each
//!   starts where the previous one ended; the first at `earliest`, the last
//!   ends at the high watermark),
//! - nothing corrupt is ever returned (every batch read verifies).
//!
//! `fault_disk_*` crash the fault-injecting disk mid-flight (unsynced writes
//! kept, dropped or torn, seeded); `real_files_*` run the same model over
//! real files with a backend constructor, tearing tails and flipping bits in
//! the files between runs. The `*_gaps_*` properties do the same for a log
//! with gaps in its offsets (inside batches and between them): every
//! record reads back at its own offset, an offset in a gap gets the batch
//! after it, and no offset is used twice.
//!
//! `PROPTEST_CASES=n cargo nextest run -E 'test(/proptests/)'` runs more
//! cases than the suite does.

use super::io::fault::FaultPlan;
use super::segment::{SegmentHeader, SEG_HEADER_BYTES};
use super::tests::{make_batch, pid, read_all, small_cfg, Rig, Submit};
use super::*;
use crate::batch::{self, BatchView};
use proptest::prelude::*;
use smol::block_on;
use std::path::{Path, PathBuf};

/// Cases per property: `default` in the suite; `PROPTEST_CASES=n` to run
/// more by hand.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// The model: every batch the log must hold, as stored, with its offset.
type Model = Vec<(u64, Vec<u8>)>;

/// Every batch ever submitted, as built (base offset 0), by its tag (the
/// records' key, `make_batch`).
type Sent = std::collections::HashMap<u64, Vec<u8>>;

/// Whether `b`, as the log holds it, is a batch that was submitted.
fn was_sent(sent: &Sent, b: &[u8]) -> bool {
    let v = BatchView::new(b).expect("valid");
    let key = v.records().expect("records")[0].key.expect("a tag");
    let tag = u64::from_le_bytes(key.as_ref().try_into().expect("8 bytes"));
    sent.get(&tag).is_some_and(|orig| {
        let mut stored = orig.clone();
        batch::verify_and_assign_offset(&mut stored, v.header.base_offset).is_ok() && stored == b
    })
}

/// Checks the log against the model and returns what the log holds. With
/// `allow_extra`, batches past the model may be there (appends whose fate a
/// crash or a failed write left unknown); they join the model. With
/// `lossy_from`, a crash may have taken acknowledged batches at or past
/// that offset (`interval` acks before the fdatasync): the log must then
/// still hold the model up to it, and past it only batches that were
/// submitted (the appends after the lost ones, or batches a crashed run
/// wrote that come back: docs/format.md, "Batches from a crashed run").
fn check(
    s: &Storage,
    id: &PartitionId,
    model: &Model,
    sent: &Sent,
    allow_extra: bool,
    lossy_from: Option<u64>,
) -> Model {
    let o = s.offsets(id).unwrap();
    let got = read_all(s, id, o.earliest);
    let mut expect_at = o.earliest;
    let mut out = Vec::with_capacity(got.len());
    for b in &got {
        let v = BatchView::new(b).expect("read returned a corrupt batch");
        assert_eq!(v.header.base_offset, expect_at, "offsets not dense");
        expect_at = v.header.next_offset();
        out.push((v.header.base_offset, b.clone()));
    }
    assert_eq!(expect_at, o.high_watermark, "log does not end at the hw");
    let kept: Vec<&(u64, Vec<u8>)> = model.iter().filter(|(o2, _)| *o2 >= o.earliest).collect();
    let required = match lossy_from {
        Some(d) => kept.iter().filter(|(o2, _)| *o2 < d).count(),
        None => kept.len(),
    };
    assert!(
        out.len() >= required,
        "lost acknowledged batches: have {}, must have {required} of {} acked",
        out.len(),
        kept.len()
    );
    for (i, b) in out.iter().enumerate() {
        match kept.get(i) {
            Some(m) if lossy_from.is_none_or(|d| m.0 < d) => {
                assert_eq!(b, *m, "acknowledged batch {} differs", m.0)
            }
            Some(m) => assert!(
                b == *m || was_sent(sent, &b.1),
                "batch at {} was never submitted",
                b.0
            ),
            None => {
                assert!(allow_extra, "batches appeared from nowhere");
                assert!(was_sent(sent, &b.1), "batch at {} was never submitted", b.0);
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        records: u32,
        value_bytes: usize,
    },
    /// Submit `n` appends, then await them all (they group-commit).
    Burst {
        n: u8,
        value_bytes: usize,
    },
    /// Submit `n` appends, crash before awaiting, recover.
    CrashInFlight {
        n: u8,
        drop_unsynced: bool,
    },
    /// Clean shutdown and reopen.
    Reopen,
    /// From now until the next crash or reopen, writes and fsyncs fail
    /// with this probability (per million).
    Faulty {
        per_million: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..6, 1usize..2500).prop_map(|(records, value_bytes)| Op::Append { records, value_bytes }),
        3 => (1u8..20, 1usize..800).prop_map(|(n, value_bytes)| Op::Burst { n, value_bytes }),
        2 => (0u8..8, any::<bool>()).prop_map(|(n, drop_unsynced)| Op::CrashInFlight { n, drop_unsynced }),
        1 => Just(Op::Reopen),
        1 => (1u32..300_000).prop_map(|per_million| Op::Faulty { per_million }),
    ]
}

fn durability() -> impl Strategy<Value = Durability> {
    prop_oneof![Just(Durability::Always), Just(Durability::IntervalMs(1))]
}

/// Cuts the fault disk's power under `s` with `tickets` in flight (all
/// unsynced writes lost, or each kept, lost or torn), and opens the data
/// directory again on a healthy disk.
fn power_cut<T>(rig: &Rig, s: Storage, tickets: Vec<T>, drop_unsynced: bool) -> Storage {
    let disk = rig.disk().expect("a fault rig");
    if drop_unsynced {
        disk.crash_dropping_unsynced();
    } else {
        disk.crash();
    }
    drop(tickets);
    let _ = s.shutdown();
    drop(s);
    disk.set_plan(FaultPlan::default());
    disk.restart();
    rig.open()
}

/// Leaves `torn` (part of a batch) at `end` of the segment file `path` and
/// loses the partition's checkpoint: what a crash mid-write leaves.
fn leave_torn(dir: &Path, path: &Path, end: u64, torn: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(torn, end).unwrap();
    f.sync_all().unwrap();
    std::fs::remove_file(dir.join("checkpoint.meta")).unwrap();
}

fn run_fault_model(seed: u64, unit: usize, durability: Durability, ops: Vec<Op>) {
    let rig = Rig::fault(seed);
    let disk = rig.disk().unwrap().clone().with_write_unit(unit);
    let id = pid("prop", 0);
    let cfg = PartitionConfig {
        durability,
        ..small_cfg()
    };
    let mut s = rig.open();
    block_on(s.create_partition(id.clone(), cfg)).unwrap();
    let mut model: Model = Vec::new();
    let mut sent = Sent::new();
    let mut tag = 0u64;
    let mut unknown = false;
    for op in ops {
        match op {
            Op::Append {
                records,
                value_bytes,
            } => {
                tag += 1;
                let b = make_batch(records, value_bytes, tag, tag as i64);
                sent.insert(tag, b.clone());
                match block_on(s.append(&id, b.clone())) {
                    Ok(ack) => {
                        let mut stored = b;
                        batch::verify_and_assign_offset(&mut stored, ack.base_offset).unwrap();
                        model.push((ack.base_offset, stored));
                    }
                    Err(StorageError::Failed { .. }) => unknown = true,
                    Err(e) => panic!("append: {e}"),
                }
            }
            Op::Burst { n, value_bytes } => {
                let mut tickets = Vec::new();
                for _ in 0..n {
                    tag += 1;
                    let b = make_batch(1, value_bytes, tag, tag as i64);
                    sent.insert(tag, b.clone());
                    tickets.push((b.clone(), block_on(s.submit_now(&id, b)).unwrap()));
                }
                for (b, t) in tickets {
                    match block_on(t) {
                        Ok(ack) => {
                            let mut stored = b;
                            batch::verify_and_assign_offset(&mut stored, ack.base_offset).unwrap();
                            model.push((ack.base_offset, stored));
                        }
                        Err(StorageError::Failed { .. }) => unknown = true,
                        Err(e) => panic!("burst: {e}"),
                    }
                }
            }
            Op::CrashInFlight { n, drop_unsynced } => {
                let durable = s.offsets(&id).unwrap().durable;
                let tickets: Vec<_> = (0..n)
                    .map(|i| {
                        let tag = 1_000_000 + u64::from(i);
                        let b = make_batch(1, 100, tag, 0);
                        sent.insert(tag, b.clone());
                        block_on(s.submit_now(&id, b)).unwrap()
                    })
                    .collect();
                s = power_cut(&rig, s, tickets, drop_unsynced);
                let rep = &s.recovery_report()[0];
                assert!(!rep.quarantined, "crash made a false quarantine: {rep:?}");
                let lossy_from = (durability != Durability::Always).then_some(durable);
                model = check(&s, &id, &model, &sent, true, lossy_from);
                unknown = false;
            }
            Op::Reopen => {
                let _ = s.shutdown();
                disk.set_plan(FaultPlan::default());
                s = rig.open();
                let rep = &s.recovery_report()[0];
                assert!(!rep.quarantined, "{rep:?}");
                model = check(&s, &id, &model, &sent, unknown, None);
                unknown = false;
            }
            Op::Faulty { per_million } => disk.set_plan(FaultPlan {
                write_error_per_million: per_million,
                sync_error_per_million: per_million,
                errno: if per_million % 2 == 0 {
                    libc::EIO
                } else {
                    libc::ENOSPC
                },
                ..FaultPlan::default()
            }),
        }
    }
    disk.set_plan(FaultPlan::default());
    let _ = s.shutdown();
    let s = rig.open();
    check(&s, &id, &model, &sent, unknown, None);
    s.shutdown().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    #[test]
    fn fault_disk_crashes_keep_acknowledged_data(
        seed in any::<u64>(),
        unit in prop_oneof![Just(512usize), Just(4096)],
        durability in durability(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_fault_model(seed, unit, durability, ops);
    }
}

/// The active segment of a partition directory on real files and where its
/// data ends, found the way recovery does (independently of the engine).
fn data_end(dir: &Path, cfg: &PartitionConfig) -> (PathBuf, u64, u64) {
    let mut best: Option<(u64, PathBuf, SegmentHeader)> = None;
    for slot in 0..cfg.segments as usize {
        let path = dir.join(format!("seg-{slot:05}.log"));
        let bytes = std::fs::read(&path).unwrap();
        if let Ok(h) =
            SegmentHeader::decode(&bytes[..SEG_HEADER_BYTES], slot as u32, cfg.segment_bytes)
        {
            if best.as_ref().is_none_or(|b| h.epoch > b.0) {
                best = Some((h.epoch, path, h));
            }
        }
    }
    let (_, path, h) = best.expect("an active segment");
    let bytes = std::fs::read(&path).unwrap();
    let mut pos = SEG_HEADER_BYTES;
    let mut next = h.base_offset;
    while let Ok(v) = BatchView::new(&bytes[pos..]) {
        // At or above the next offset: there may be a gap before it.
        if v.header.base_offset < next {
            break;
        }
        next = v.header.next_offset();
        pos += v.bytes.len();
    }
    (path, pos as u64, next)
}

/// What to do to the files between two runs.
#[derive(Debug, Clone)]
pub(crate) enum Damage {
    None,
    /// Lose the checkpoint and leave a torn batch after the data, as a
    /// crash during a write would.
    TornTail {
        keep: usize,
    },
    /// Flip one bit inside the acknowledged data (then stop).
    BitFlip {
        at_permille: u16,
        bit: u8,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => Just(Damage::None),
        3 => (1usize..400).prop_map(|keep| Damage::TornTail { keep }),
        1 => (0u16..1000, 0u8..8).prop_map(|(at_permille, bit)| Damage::BitFlip { at_permille, bit }),
    ]
}

/// The real-file suite, generic over the backend (pwrite and io_uring).
pub(crate) fn run_real_file_model(
    make: fn() -> Box<dyn IoBackend>,
    rounds: Vec<(Vec<(u32, usize)>, Damage)>,
) {
    let rig = Rig::files(make);
    let id = pid("real", 0);
    let cfg = small_cfg();
    let dir = rig.dir.path().join("topics/real/0");
    let mut s = rig.open();
    block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
    let mut model: Model = Vec::new();
    let mut sent = Sent::new();
    let mut tag = 0;
    for (appends, dmg) in rounds {
        for (records, value_bytes) in appends {
            tag += 1;
            let b = make_batch(records, value_bytes, tag, tag as i64);
            sent.insert(tag, b.clone());
            let ack = block_on(s.append(&id, b.clone())).unwrap();
            let mut stored = b;
            batch::verify_and_assign_offset(&mut stored, ack.base_offset).unwrap();
            model.push((ack.base_offset, stored));
        }
        model = check(&s, &id, &model, &sent, false, None);
        s.shutdown().unwrap();
        match dmg {
            Damage::None => {
                s = rig.open();
                assert_eq!(s.recovery_report()[0].bytes_truncated, 0);
            }
            Damage::TornTail { keep } => {
                let (path, end, next) = data_end(&dir, &cfg);
                let room = (cfg.segment_bytes - end) as usize;
                let mut torn = next_batch(next);
                // The engine starts a batch that does not fit in the next
                // segment, so a torn one can only be where it fits.
                let fits = torn.len() <= room;
                torn.truncate(keep.min(torn.len() - 1));
                if torn.is_empty() || !fits {
                    s = rig.open();
                } else {
                    leave_torn(&dir, &path, end, &torn);
                    s = rig.open();
                    let rep = &s.recovery_report()[0];
                    assert!(!rep.quarantined, "{rep:?}");
                    assert!(rep.bytes_truncated > 0, "torn tail not reported: {rep:?}");
                }
            }
            Damage::BitFlip { at_permille, bit } => {
                let (path, end, _) = data_end(&dir, &cfg);
                let data = end - SEG_HEADER_BYTES as u64;
                if data == 0 {
                    s = rig.open();
                    continue;
                }
                let at = SEG_HEADER_BYTES as u64 + data * u64::from(at_permille) / 1000;
                super::tests::flip_file_bit(&path, at, bit);
                s = rig.open();
                let rep = s.recovery_report()[0].clone();
                assert!(
                    !rep.quarantined && rep.damaged.len() == 1,
                    "flip at {at} unnoticed: {rep:?}"
                );
                // The damaged batch's offsets are skipped, and only those:
                // everything else is served as it was, and writes go on.
                let d = &rep.damaged[0];
                let o = s.offsets(&id).unwrap();
                let got = read_all(&s, &id, o.earliest);
                let kept: Vec<Vec<u8>> = model
                    .iter()
                    .filter(|(off, b)| {
                        let next = batch::parse_header(b).unwrap().next_offset();
                        *off >= o.earliest && (next <= d.from_offset || *off >= d.to_offset)
                    })
                    .map(|(_, b)| b.clone())
                    .collect();
                assert_eq!(got, kept, "{rep:?}");
                assert_eq!(
                    kept.len() + 1,
                    model.iter().filter(|(off, _)| *off >= o.earliest).count(),
                    "{rep:?}"
                );
                let a = block_on(s.append(&id, make_batch(1, 1, 1, 1))).unwrap();
                assert_eq!(a.base_offset, o.high_watermark);
                s.shutdown().unwrap();
                return;
            }
        }
        model = check(&s, &id, &model, &sent, false, None);
    }
    s.shutdown().unwrap();
}

/// A plausible next batch at offset `next`, as stored.
fn next_batch(next: u64) -> Vec<u8> {
    let mut b = make_batch(2, 300, 424_242, 0);
    batch::verify_and_assign_offset(&mut b, next).unwrap();
    b
}

fn rounds() -> impl Strategy<Value = Vec<(Vec<(u32, usize)>, Damage)>> {
    prop::collection::vec(
        (
            prop::collection::vec((1u32..4, 1usize..3000), 0..25),
            damage(),
        ),
        1..5,
    )
}

fn pwrite_backend() -> Box<dyn IoBackend> {
    Box::new(super::io::pwrite::PwriteBackend::new())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    #[test]
    fn real_files_pwrite_survive_torn_tails_and_bit_flips(rounds in rounds()) {
        run_real_file_model(pwrite_backend, rounds);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn real_files_io_uring_survive_torn_tails_and_bit_flips(rounds in rounds()) {
        if super::tests::uring_available() {
            run_real_file_model(super::tests::uring_backend, rounds);
        }
    }
}

/// A batch of the gap model: its records' offsets and where it goes.
#[derive(Debug, Clone)]
struct Shape {
    /// Offsets left out before each record (the first counts from the
    /// batch's base): gaps inside the batch.
    gaps: Vec<u8>,
    /// Offsets the batch covers past its last record (a compacted batch
    /// keeps its extent).
    trailing: u8,
    /// Offsets left out between the log's end and the batch.
    above_end: u16,
    value_bytes: usize,
}

impl Shape {
    /// A producer's batch: no gap anywhere.
    fn is_dense(&self) -> bool {
        self.gaps.iter().all(|&g| g == 0) && self.trailing == 0 && self.above_end == 0
    }

    /// The batch, base offset 0, its records' key the tag.
    fn build(&self, tag: u64) -> Vec<u8> {
        let mut b = batch::BatchBuilder::new();
        for (i, &gap) in self.gaps.iter().enumerate() {
            b.skip_offsets(u32::from(gap));
            let v: Vec<u8> = (0..self.value_bytes)
                .map(|j| (tag as usize + i * 7 + j) as u8)
                .collect();
            b.push(tag as i64, Some(&tag.to_le_bytes()), &v, &[]);
        }
        b.skip_offsets(u32::from(self.trailing));
        b.finish(batch::ProducerStamp::NONE)
    }
}

fn shape() -> impl Strategy<Value = Shape> {
    let gap = || prop_oneof![3 => Just(0u8), 1 => 1u8..40];
    (
        prop::collection::vec(gap(), 1..6),
        prop_oneof![3 => Just(0u8), 1 => 1u8..20],
        prop_oneof![2 => Just(0u16), 1 => 1u16..3000],
        1usize..1200,
    )
        .prop_map(|(gaps, trailing, above_end, value_bytes)| Shape {
            gaps,
            trailing,
            above_end,
            value_bytes,
        })
}

/// What the log must hold, for the gap model: every acknowledged batch as
/// stored, and the batches whose fate a crash left open.
#[derive(Default)]
struct GapModel {
    /// By base offset.
    batches: std::collections::BTreeMap<u64, Vec<u8>>,
    /// No acknowledged batch, and nothing in the log, ends at or past it:
    /// every later batch starts here or above.
    end: u64,
    /// Submitted and never acknowledged, by tag: (the batch as built, the
    /// least base offset asked).
    open: std::collections::HashMap<u64, (Vec<u8>, u64)>,
    tag: u64,
}

impl GapModel {
    /// Submits a batch of `shape`: as a producer's when it is dense, else
    /// placed above the log's end.
    fn submit(&mut self, s: &Storage, id: &PartitionId, shape: &Shape) -> (u64, AppendTicket) {
        self.tag += 1;
        let b = shape.build(self.tag);
        let at_least = self.end + u64::from(shape.above_end);
        self.open.insert(self.tag, (b.clone(), at_least));
        let checked = if shape.is_dense() {
            CheckedBatch::check(b)
        } else {
            CheckedBatch::check_placed(b, at_least)
        };
        let ticket = block_on(s.submit(id, checked.unwrap(), Wake::Now)).unwrap();
        (self.tag, ticket)
    }

    /// An acknowledgement: the batch lands where it must and joins the log.
    fn acked(&mut self, tag: u64, ack: AppendAck) {
        let (mut b, at_least) = self.open.remove(&tag).expect("submitted");
        assert!(
            ack.base_offset >= self.end.max(at_least),
            "batch {tag} at {} reuses offsets below {} (asked >= {at_least})",
            ack.base_offset,
            self.end
        );
        let h = batch::verify_and_assign_offset(&mut b, ack.base_offset).unwrap();
        assert_eq!(h.last_offset(), ack.last_offset);
        self.end = h.next_offset();
        self.batches.insert(ack.base_offset, b);
    }

    fn append(&mut self, s: &Storage, id: &PartitionId, shape: &Shape) -> Result<(), StorageError> {
        let (tag, ticket) = self.submit(s, id, shape);
        let ack = block_on(ticket)?;
        self.acked(tag, ack);
        Ok(())
    }

    /// The log against the model: every acknowledged batch byte for byte
    /// (those still in the ring), in offset order with nothing below where
    /// it must start; any other batch one that was submitted, where it was
    /// asked to go (it joins the model: it is in the log now). Then every
    /// record is read back at its own offset, and an offset in a gap gets
    /// the batch after it.
    fn check(&mut self, s: &Storage, id: &PartitionId) {
        let o = s.offsets(id).unwrap();
        let mut log: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut at = o.earliest;
        while at < o.high_watermark {
            let bytes = block_on(s.read(id, at, 16 * 1024)).unwrap();
            assert!(!bytes.is_empty(), "empty read below the hw at {at}");
            for v in batch::BatchIter::new(&bytes) {
                let v = v.expect("read returned a corrupt batch");
                v.records().expect("records decode");
                assert!(v.header.base_offset >= at, "offsets go back at {at}");
                at = v.header.next_offset();
                log.push((v.header.base_offset, v.bytes.to_vec()));
            }
        }
        assert_eq!(at, o.high_watermark, "the log does not end at the hw");
        let in_log: std::collections::BTreeMap<u64, &Vec<u8>> =
            log.iter().map(|(b, v)| (*b, v)).collect();
        for (base, b) in self.batches.range(o.earliest..) {
            assert_eq!(
                in_log.get(base).copied(),
                Some(b),
                "acknowledged batch at {base} lost or changed"
            );
        }
        for (base, b) in &log {
            if self.batches.contains_key(base) {
                continue;
            }
            let tag = u64::from_le_bytes(
                BatchView::new(b).unwrap().records().unwrap()[0]
                    .key
                    .expect("a tag")
                    .as_ref()
                    .try_into()
                    .unwrap(),
            );
            let (mut sent, at_least) = self
                .open
                .remove(&tag)
                .unwrap_or_else(|| panic!("batch at {base} was never submitted"));
            assert!(*base >= at_least, "batch {tag} below where it was asked");
            batch::verify_and_assign_offset(&mut sent, *base).unwrap();
            assert_eq!(&sent, b, "batch {tag} at {base} differs from what was sent");
            self.batches.insert(*base, sent);
        }
        self.end = self.end.max(o.high_watermark);
        // Every offset of interest, one fetch each.
        let mut prev_end = o.earliest;
        for (base, b) in &log {
            let v = BatchView::new(b).unwrap();
            let first = |at: u64| {
                let bytes = block_on(s.read(id, at, 1)).unwrap();
                batch::BatchIter::new(&bytes)
                    .next()
                    .unwrap()
                    .unwrap()
                    .bytes
                    .to_vec()
            };
            for at in [
                prev_end,
                base.saturating_sub(1).max(prev_end),
                v.header.last_offset(),
            ] {
                assert_eq!(&first(at), b, "fetch at {at} (a gap or the batch's extent)");
            }
            for r in v.records().unwrap() {
                let at = base + u64::from(r.offset_delta);
                let got = first(at);
                let got_v = BatchView::new(&got).unwrap();
                let rec = got_v
                    .records()
                    .unwrap()
                    .into_iter()
                    .find(|x| got_v.header.base_offset + u64::from(x.offset_delta) == at)
                    .unwrap_or_else(|| panic!("no record at {at}"));
                assert_eq!(rec.value, r.value, "record at {at}");
            }
            prev_end = v.header.next_offset();
        }
    }
}

#[derive(Debug, Clone)]
enum GapOp {
    Append(Shape),
    /// Submit these, then await them all (they group-commit).
    Burst(Vec<Shape>),
    /// Submit these, cut the power before awaiting, recover.
    CrashInFlight {
        shapes: Vec<Shape>,
        drop_unsynced: bool,
    },
    Reopen,
}

fn gap_op() -> impl Strategy<Value = GapOp> {
    prop_oneof![
        6 => shape().prop_map(GapOp::Append),
        2 => prop::collection::vec(shape(), 1..8).prop_map(GapOp::Burst),
        2 => (prop::collection::vec(shape(), 0..6), any::<bool>())
            .prop_map(|(shapes, drop_unsynced)| GapOp::CrashInFlight { shapes, drop_unsynced }),
        1 => Just(GapOp::Reopen),
    ]
}

fn run_gap_fault_model(seed: u64, unit: usize, ops: Vec<GapOp>) {
    let rig = Rig::fault(seed);
    rig.disk().unwrap().clone().with_write_unit(unit);
    let id = pid("gaps", 0);
    let mut s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let mut model = GapModel::default();
    for op in ops {
        match op {
            GapOp::Append(shape) => model.append(&s, &id, &shape).unwrap(),
            GapOp::Burst(shapes) => {
                let tickets: Vec<_> = shapes.iter().map(|sh| model.submit(&s, &id, sh)).collect();
                for (tag, t) in tickets {
                    let ack = block_on(t).unwrap();
                    model.acked(tag, ack);
                }
            }
            GapOp::CrashInFlight {
                shapes,
                drop_unsynced,
            } => {
                let tickets: Vec<_> = shapes.iter().map(|sh| model.submit(&s, &id, sh)).collect();
                s = power_cut(&rig, s, tickets, drop_unsynced);
                let rep = &s.recovery_report()[0];
                assert!(!rep.quarantined, "crash made a false quarantine: {rep:?}");
                model.check(&s, &id);
            }
            GapOp::Reopen => {
                s.shutdown().unwrap();
                s = rig.open();
                let rep = &s.recovery_report()[0];
                assert!(
                    rep.quarantine.is_none() && rep.truncation.is_none(),
                    "{rep:?}"
                );
                model.check(&s, &id);
            }
        }
    }
    model.check(&s, &id);
    s.shutdown().unwrap();
    let s = rig.open();
    model.check(&s, &id);
    s.shutdown().unwrap();
}

/// The gap model over real files: rounds of appends, each ended by a
/// clean stop, or by a torn batch left after the data without the
/// checkpoint (what a crash mid-write leaves), and a restart.
fn run_gap_real_file_model(make: fn() -> Box<dyn IoBackend>, rounds: Vec<(Vec<Shape>, bool)>) {
    let rig = Rig::files(make);
    let id = pid("gapsreal", 0);
    let cfg = small_cfg();
    let dir = rig.dir.path().join("topics/gapsreal/0");
    let mut s = rig.open();
    block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
    let mut model = GapModel::default();
    for (shapes, torn) in rounds {
        for shape in &shapes {
            model.append(&s, &id, shape).unwrap();
        }
        model.check(&s, &id);
        s.shutdown().unwrap();
        let (path, end, next) = data_end(&dir, &cfg);
        // Torn where a batch placed above a gap would have gone.
        let mut b = next_batch(next + 17);
        let torn = torn && b.len() as u64 <= cfg.segment_bytes - end;
        if torn {
            b.truncate(b.len() / 2);
            leave_torn(&dir, &path, end, &b);
        }
        s = rig.open();
        let rep = &s.recovery_report()[0];
        assert!(!rep.quarantined, "{rep:?}");
        assert_eq!(rep.truncation.is_some(), torn, "{rep:?}");
        model.check(&s, &id);
    }
    s.shutdown().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), ..ProptestConfig::default() })]

    /// Random batches with random gaps (inside batches and between them),
    /// power cuts at random points: every acknowledged offset reads back
    /// exactly as written, nothing acknowledged is lost, no offset is
    /// used twice.
    #[test]
    fn fault_disk_gaps_survive_crashes(
        seed in any::<u64>(),
        unit in prop_oneof![Just(512usize), Just(4096)],
        ops in prop::collection::vec(gap_op(), 1..30),
    ) {
        run_gap_fault_model(seed, unit, ops);
    }
}

fn gap_rounds() -> impl Strategy<Value = Vec<(Vec<Shape>, bool)>> {
    prop::collection::vec((prop::collection::vec(shape(), 0..15), any::<bool>()), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(8), ..ProptestConfig::default() })]

    #[test]
    fn real_files_pwrite_gaps_survive_torn_tails(rounds in gap_rounds()) {
        run_gap_real_file_model(pwrite_backend, rounds);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn real_files_io_uring_gaps_survive_torn_tails(rounds in gap_rounds()) {
        if super::tests::uring_available() {
            run_gap_real_file_model(super::tests::uring_backend, rounds);
        }
    }
}
