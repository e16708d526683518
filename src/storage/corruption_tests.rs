//! Corruption between runs: a seeded mutator damages what a stopped
//! partition left on disk (bits flipped in batches and segment headers,
//! a zeroed tail, a truncated segment file, a stale block planted over a
//! live one, damaged `checkpoint.meta` and `partition.meta`), and the
//! storage is opened again. For every case:
//!
//! - the storage opens (damage is reported, never a start-up failure that
//!   would put a service into a restart loop);
//! - the fault is detected: in the recovery report (a truncated tail, a
//!   quarantine, an unreadable checkpoint) or by a read that refuses the
//!   damaged batch;
//! - nothing damaged is served: every batch read is one that was
//!   acknowledged, byte for byte, at its offset.
//!
//! `SKIFF_CORRUPTION_CASES=n` runs more cases than the suite's 70; the
//! summary line says how many faults of each kind were detected.

use super::engine::{B, B64};
use super::io::fault::FaultDisk;
use super::segment::{SegmentHeader, SEG_HEADER_BYTES};
use super::tests::{make_batch, pid, small_cfg, stored, Rig, Submit};
use super::*;
use crate::batch::{BatchIter, BatchView};
use smol::block_on;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// splitmix64, for the mutator's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// One bit of a live batch.
    BatchBit,
    /// The last bytes of the active segment's data, zeroed.
    ZeroedTail,
    /// The active segment file cut short inside its data.
    TruncatedSegment,
    /// A block of the ring copied over a block of live data (a misdirected
    /// or lost write on a worn SD card).
    StaleBlock,
    /// One bit of a live segment's header.
    HeaderBit,
    /// A byte of `checkpoint.meta`, or the file cut in half.
    Checkpoint,
    /// A byte of `partition.meta`.
    PartitionMeta,
}

const FAULTS: [Fault; 7] = [
    Fault::BatchBit,
    Fault::ZeroedTail,
    Fault::TruncatedSegment,
    Fault::StaleBlock,
    Fault::HeaderBit,
    Fault::Checkpoint,
    Fault::PartitionMeta,
];

/// A live segment of the stopped partition: its file, slot and where its
/// data ends.
struct Live {
    path: PathBuf,
    epoch: u64,
    data_end: usize,
}

fn live_segments(disk: &FaultDisk, dir: &Path, cfg: &PartitionConfig) -> Vec<Live> {
    let mut out = Vec::new();
    for slot in 0..cfg.segments as usize {
        let path = dir.join(format!("seg-{slot:05}.log"));
        let bytes = disk.contents(&path).expect("segment file");
        let Ok(h) =
            SegmentHeader::decode(&bytes[..SEG_HEADER_BYTES], slot as u32, cfg.segment_bytes)
        else {
            continue;
        };
        let mut pos = SEG_HEADER_BYTES;
        let mut next = h.base_offset;
        while let Ok(v) = BatchView::new(&bytes[pos..]) {
            if v.header.base_offset < next {
                break;
            }
            next = v.header.next_offset();
            pos += v.bytes.len();
        }
        out.push(Live {
            path,
            epoch: h.epoch,
            data_end: pos,
        });
    }
    out.sort_by_key(|l| l.epoch);
    out
}

/// Damages the stopped partition in `dir` as `fault` says; false when
/// there was nothing of that kind to damage (the case is skipped).
fn damage(
    rng: &mut Rng,
    disk: &FaultDisk,
    dir: &Path,
    cfg: &PartitionConfig,
    fault: Fault,
) -> bool {
    let live = live_segments(disk, dir, cfg);
    let with_data: Vec<&Live> = live
        .iter()
        .filter(|l| l.data_end > SEG_HEADER_BYTES)
        .collect();
    match fault {
        Fault::BatchBit => {
            let Some(l) = with_data.get(rng.below(with_data.len() as u64) as usize) else {
                return false;
            };
            let at = SEG_HEADER_BYTES as u64 + rng.below((l.data_end - SEG_HEADER_BYTES) as u64);
            disk.flip_stored_bit(&l.path, at, rng.below(8) as u8)
        }
        Fault::ZeroedTail | Fault::TruncatedSegment => {
            let Some(l) = live.last().filter(|l| l.data_end > SEG_HEADER_BYTES) else {
                return false;
            };
            let mut bytes = disk.contents(&l.path).expect("file");
            let cut = l.data_end
                - 1
                - rng.below(256.min((l.data_end - SEG_HEADER_BYTES) as u64)) as usize;
            if fault == Fault::ZeroedTail {
                bytes[cut..l.data_end].fill(0);
            } else {
                bytes.truncate(cut / 512 * 512);
            }
            disk.put_file(&l.path, &bytes)
        }
        Fault::StaleBlock => {
            let Some(l) = with_data.get(rng.below(with_data.len() as u64) as usize) else {
                return false;
            };
            let blocks = l.data_end.div_ceil(B) as u64;
            if blocks < 3 {
                return false;
            }
            // A live data block, overwritten by another block of the ring
            // (an earlier lap's, or this segment's own) that differs.
            let to = (1 + rng.below(blocks - 1)) as usize * B;
            let src = &live[rng.below(live.len() as u64) as usize];
            let src_bytes = disk.contents(&src.path).expect("file");
            let mut bytes = disk.contents(&l.path).expect("file");
            let from = (1 + rng.below((cfg.segment_bytes / B64) - 1)) as usize * B;
            if src_bytes[from..from + B] == bytes[to..to + B] {
                return false;
            }
            bytes[to..to + B].copy_from_slice(&src_bytes[from..from + B]);
            disk.put_file(&l.path, &bytes)
        }
        Fault::HeaderBit => {
            let Some(l) = live.get(rng.below(live.len() as u64) as usize) else {
                return false;
            };
            // Inside the header's 52 checked bytes.
            disk.flip_stored_bit(&l.path, rng.below(52), rng.below(8) as u8)
        }
        Fault::Checkpoint | Fault::PartitionMeta => {
            let name = if fault == Fault::Checkpoint {
                "checkpoint.meta"
            } else {
                "partition.meta"
            };
            let path = dir.join(name);
            let Ok(mut bytes) = std::fs::read(&path) else {
                return false;
            };
            if fault == Fault::Checkpoint && rng.below(2) == 0 {
                bytes.truncate(bytes.len() / 2);
            } else {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            std::fs::write(&path, bytes).expect("write meta");
            true
        }
    }
}

/// What one case found.
struct Case {
    detected: bool,
}

fn run_case(seed: u64, fault: Fault) -> Option<Case> {
    let mut rng = Rng(seed);
    let rig = Rig::fault(seed);
    if rng.below(2) == 0 {
        rig.disk().unwrap().clone().with_write_unit(512);
    }
    let disk = rig.disk().unwrap().clone();
    let id = pid("dmg", 0);
    let cfg = small_cfg();
    let dir = rig.dir.path().join("topics/dmg/0");
    let s = rig.open();
    block_on(s.create_partition(id.clone(), cfg.clone())).unwrap();
    // 20 to 400 batches: from part of one segment to several laps.
    let n = 20 + rng.below(380);
    let mut acked: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for i in 0..n {
        let b = make_batch(1 + (i % 4) as u32, 50 + rng.below(600) as usize, i, 0);
        let a = block_on(s.append(&id, b.clone())).unwrap();
        acked.insert(a.base_offset, stored(b, a.base_offset));
    }
    s.shutdown().unwrap();
    drop(s);
    if !damage(&mut rng, &disk, &dir, &cfg, fault) {
        return None;
    }

    let s = rig
        .open_with(rig.cfg())
        .unwrap_or_else(|e| panic!("seed {seed} {fault:?}: the storage does not open: {e}"));
    let rep = s
        .recovery_report()
        .into_iter()
        .find(|r| r.id == id)
        .expect("a report for the partition");
    let mut detected = rep.quarantined
        || rep.truncation.is_some()
        || rep.checkpoint_unreadable
        || rep.unreadable_restart_slot.is_some()
        || !rep.damaged.is_empty();
    // An unreadable partition.meta quarantines, with the config the
    // segments show: what it serves is checked below like any other.
    // Every batch served is one acknowledged, byte for byte, at its offset.
    let o = s.offsets(&id).expect("the partition is there");
    let mut at = o.earliest;
    let mut served = std::collections::BTreeSet::new();
    let mut quarantined = rep.quarantined;
    while at < o.high_watermark {
        match block_on(s.read(&id, at, 16 * 1024)) {
            Ok(bytes) => {
                if bytes.is_empty() && super::tests::trailing_gap(&s, &id, at, o.high_watermark) {
                    break;
                }
                assert!(
                    !bytes.is_empty(),
                    "seed {seed} {fault:?}: empty read at {at}"
                );
                for v in BatchIter::new(&bytes) {
                    let v = v.unwrap_or_else(|e| {
                        panic!("seed {seed} {fault:?}: a damaged batch was served: {e}")
                    });
                    let base = v.header.base_offset;
                    assert_eq!(
                        acked.get(&base).map(Vec::as_slice),
                        Some(v.bytes),
                        "seed {seed} {fault:?}: served at {base} is not what was acked there"
                    );
                    served.insert(base);
                    at = v.header.next_offset();
                }
            }
            Err(StorageError::Quarantined(_)) => {
                detected = true;
                quarantined = true;
                break;
            }
            Err(e) => panic!("seed {seed} {fault:?}: a read failed: {e}"),
        }
    }
    // A damaged range skipped costs its own offsets, nothing else: every
    // acknowledged batch still in the log and outside them is served.
    if !quarantined {
        let lost = |b: &[u8]| {
            let h = crate::batch::parse_header(b).unwrap();
            rep.damaged
                .iter()
                .any(|d| h.base_offset < d.to_offset && h.next_offset() > d.from_offset)
        };
        for (base, b) in acked.range(o.earliest..o.high_watermark) {
            assert!(
                served.contains(base) || lost(b),
                "seed {seed} {fault:?}: intact batch at {base} not served ({:?})",
                rep.damaged
            );
        }
    }
    // A partition that is not quarantined takes writes at its end.
    match block_on(s.append(&id, make_batch(1, 10, 9_999, 0))) {
        Ok(a) => {
            assert!(
                !rep.quarantined,
                "seed {seed} {fault:?}: a quarantined partition took a write"
            );
            assert_eq!(a.base_offset, s.offsets(&id).unwrap().high_watermark - 1);
        }
        Err(StorageError::Quarantined(_)) => detected = true,
        Err(e) => panic!("seed {seed} {fault:?}: an append failed: {e}"),
    }
    s.shutdown().unwrap();
    Some(Case { detected })
}

#[test]
fn every_fault_between_runs_is_detected_and_nothing_damaged_is_served() {
    let cases: u64 = std::env::var("SKIFF_CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(70);
    let mut found: BTreeMap<Fault, (u64, u64)> = BTreeMap::new();
    let mut missed = Vec::new();
    for seed in 0..cases {
        let fault = FAULTS[(seed % FAULTS.len() as u64) as usize];
        let Some(c) = run_case(seed, fault) else {
            continue;
        };
        let e = found.entry(fault).or_default();
        e.0 += 1;
        if c.detected {
            e.1 += 1;
        } else {
            missed.push((seed, fault));
        }
    }
    let total: u64 = found.values().map(|v| v.0).sum();
    let detected: u64 = found.values().map(|v| v.1).sum();
    println!(
        "corruption: {cases} cases, faults detected {detected} of {total}: {}",
        found
            .iter()
            .map(|(f, (n, d))| format!("{f:?} {d}/{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(missed.is_empty(), "faults not detected: {missed:?}");
}
