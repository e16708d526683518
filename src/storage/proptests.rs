//! Property tests: random appends, crashes at random points, recovery, and
//! the invariants that matter:
//!
//! - every batch acknowledged before a crash reads back byte-identical,
//! - offsets stay dense and monotonic (each batch starts where the previous
//!   one ended; the first at `earliest`, the last ends at the high watermark),
//! - nothing corrupt is ever returned (every batch read verifies).
//!
//! `fault_disk_*` crash the fault-injecting disk mid-flight (unsynced writes
//! kept, dropped or torn, seeded); `real_files_*` run the same model over
//! real files with a backend constructor, tearing tails and flipping bits in
//! the files between runs.

use super::io::fault::FaultPlan;
use super::segment::{SegmentHeader, SEG_HEADER_BYTES};
use super::tests::{make_batch, pid, read_all, small_cfg, Rig};
use super::*;
use crate::batch::{self, BatchView};
use proptest::prelude::*;
use smol::block_on;
use std::path::{Path, PathBuf};

/// The model: every batch the log must hold, as stored, with its offset.
type Model = Vec<(u64, Vec<u8>)>;

/// Checks the log against the model and returns what the log holds. With
/// `allow_extra`, batches past the model may be there (appends whose fate a
/// crash or a failed write left unknown); they join the model. With
/// `lossy_from`, a crash may have taken acknowledged batches at or past
/// that offset (`interval` acks before the fdatasync): the log must then
/// still hold the model up to it, and a prefix of the rest.
fn check(
    s: &Storage,
    id: &PartitionId,
    model: &Model,
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
    for (m, b) in kept.iter().zip(&out) {
        assert_eq!(b, *m, "acknowledged batch {} differs", m.0);
    }
    if !allow_extra {
        assert!(out.len() <= kept.len(), "batches appeared from nowhere");
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
                    tickets.push((b.clone(), block_on(s.submit(&id, b)).unwrap()));
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
                        block_on(s.submit(&id, make_batch(1, 100, 1_000_000 + u64::from(i), 0)))
                            .unwrap()
                    })
                    .collect();
                if drop_unsynced {
                    disk.crash_dropping_unsynced();
                } else {
                    disk.crash();
                }
                drop(tickets);
                let _ = s.shutdown();
                disk.set_plan(FaultPlan::default());
                disk.restart();
                s = rig.open();
                let rep = &s.recovery_report()[0];
                assert!(!rep.quarantined, "crash made a false quarantine: {rep:?}");
                let lossy_from = (durability != Durability::Always).then_some(durable);
                model = check(&s, &id, &model, true, lossy_from);
                unknown = false;
            }
            Op::Reopen => {
                let _ = s.shutdown();
                disk.set_plan(FaultPlan::default());
                s = rig.open();
                let rep = &s.recovery_report()[0];
                assert!(!rep.quarantined, "{rep:?}");
                model = check(&s, &id, &model, unknown, None);
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
    check(&s, &id, &model, unknown, None);
    s.shutdown().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

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
        if v.header.base_offset != next {
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
    let mut tag = 0;
    for (appends, dmg) in rounds {
        for (records, value_bytes) in appends {
            tag += 1;
            let b = make_batch(records, value_bytes, tag, tag as i64);
            let ack = block_on(s.append(&id, b.clone())).unwrap();
            let mut stored = b;
            batch::verify_and_assign_offset(&mut stored, ack.base_offset).unwrap();
            model.push((ack.base_offset, stored));
        }
        model = check(&s, &id, &model, false, None);
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
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    f.write_all_at(&torn, end).unwrap();
                    f.sync_all().unwrap();
                    std::fs::remove_file(dir.join("checkpoint.meta")).unwrap();
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
                let rep = &s.recovery_report()[0];
                assert!(rep.quarantined, "flip at {at} unnoticed: {rep:?}");
                assert!(matches!(
                    block_on(s.append(&id, make_batch(1, 1, 1, 1))),
                    Err(StorageError::Quarantined(_))
                ));
                // Read-only: whatever is served is an intact prefix.
                let o = s.offsets(&id).unwrap();
                let got = read_all(&s, &id, o.earliest);
                let kept: Vec<Vec<u8>> = model
                    .iter()
                    .filter(|(off, _)| *off >= o.earliest)
                    .map(|(_, b)| b.clone())
                    .collect();
                assert_eq!(got[..], kept[..got.len()]);
                s.shutdown().unwrap();
                return;
            }
        }
        model = check(&s, &id, &model, false, None);
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
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

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
