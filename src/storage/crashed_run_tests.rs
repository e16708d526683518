//! Batches a crashed run left past the log's end (docs/format.md, "Batches
//! from a crashed run"), pinned down with two crashes on the fault disk
//! whose outcomes are chosen, not drawn: the first keeps a later batch of
//! an unsynced write and loses the ones before it; the second keeps a new
//! batch that ends exactly where that later batch starts and loses the
//! zeros written behind it. Without the sweep at recovery the old batch was
//! read back as data after the second crash: a duplicate of a batch
//! acknowledged in between (dense offsets), or the same after a gap.

use super::io::fault::FaultPlan;
use super::tests::{pid, read_all, small_cfg, Rig, Submit};
use super::*;
use crate::batch::{BatchBuilder, BatchView, ProducerStamp};
use smol::block_on;
use std::collections::HashMap;

/// Every batch is this long: a whole number of the disk's 512-byte
/// sectors, so a batch can start exactly where another ends on a sector
/// boundary, as the crashes below need.
const LEN: usize = 512;

/// A batch of `records` records from producer 7 with sequence `seq`,
/// padded to [`LEN`] bytes. Its values say (`seq`, record index), so a
/// record read twice is seen.
fn batch_of(records: u32, seq: i32) -> Vec<u8> {
    for pad in 0..LEN {
        let mut b = BatchBuilder::new();
        for i in 0..records {
            let mut v = format!("s{seq}:r{i}:").into_bytes();
            v.resize(v.len() + pad / records as usize, b'.');
            if i == 0 {
                v.resize(v.len() + pad % records as usize, b'.');
            }
            b.push(0, None, &v, &[]);
        }
        let out = b.finish(ProducerStamp {
            producer_id: 7,
            producer_epoch: 0,
            base_sequence: seq,
        });
        if out.len() == LEN {
            return out;
        }
        assert!(out.len() < LEN, "cannot pad {records} records to {LEN}");
    }
    unreachable!("no padding gives {LEN} bytes")
}

/// Appends a batch of `records` records per sequence in `seqs` as one
/// round (one write, one fdatasync, which the plan fails): they are queued
/// while the storage thread stands still, so it takes them together
/// however the threads are scheduled. None is acked.
fn one_failed_round(s: &Storage, id: &PartitionId, records: u32, seqs: &[i32]) {
    let resume = s.pause();
    let tickets = block_on(async {
        let mut tickets = Vec::new();
        for &seq in seqs {
            let b = CheckedBatch::check(batch_of(records, seq)).unwrap();
            tickets.push(s.submit(id, b, Wake::Later).await.unwrap());
        }
        tickets
    });
    drop(resume);
    for t in tickets {
        assert!(block_on(t).is_err(), "the fdatasync failed: never acked");
    }
}

/// Each record's value and how often the log holds it.
fn record_counts(s: &Storage, id: &PartitionId) -> HashMap<Vec<u8>, usize> {
    let mut seen = HashMap::new();
    for b in read_all(s, id, 0) {
        for r in BatchView::new(&b).unwrap().records().unwrap() {
            *seen
                .entry(r.value.expect("no tombstones here").to_vec())
                .or_insert(0) += 1;
        }
    }
    seen
}

fn reopen_after_crash(rig: &Rig, s: Storage) -> Storage {
    let _ = s.shutdown();
    drop(s);
    let disk = rig.disk().unwrap();
    disk.restart();
    disk.set_plan(FaultPlan::default());
    rig.open()
}

/// Makes every fdatasync fail from now on: what is written stays unsynced
/// (never acknowledged) until the crash decides its fate.
fn fail_syncs(rig: &Rig) {
    rig.disk().unwrap().set_plan(FaultPlan {
        sync_error_per_million: 1_000_000,
        errno: libc::EIO,
        ..FaultPlan::default()
    });
}

/// The two crashes; `z_records` is the size of the batch written between
/// them (4: C comes back at exactly the next offset; 3: after a gap).
/// Returns the storage after the second crash.
fn two_crashes(z_records: u32) -> (Rig, Storage, PartitionId) {
    const K: u32 = 4;
    let rig = Rig::fault(1);
    rig.disk().unwrap().clone().with_write_unit(512);
    let id = pid("stale", 0);
    let seg = rig.dir.path().join("topics/stale/0/seg-00000.log");
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    // A: acknowledged, at 4096..4608, the sector after it zeroed.
    let a = block_on(s.append(&id, batch_of(K, 0))).unwrap();
    assert_eq!(a.base_offset, 0);
    let a_end = 4096 + LEN as u64;

    // Run 1: B, Y and C written in one round whose fdatasync fails; the
    // crash keeps only C (and the zeros behind it): B and Y never reached
    // the media. C sits at offsets 12..16, two batches past the log's end.
    fail_syncs(&rig);
    let c_at = a_end + 2 * LEN as u64;
    one_failed_round(&s, &id, K, &[4, 8, 12]);
    let path = seg.clone();
    rig.disk().unwrap().crash_keeping(|p, off, len| {
        if p != path {
            return 0..len;
        }
        (c_at.saturating_sub(off) as usize).min(len)..len
    });
    let on_disk = rig.disk().unwrap().contents(&seg).unwrap();
    let c = &on_disk[c_at as usize..c_at as usize + LEN];
    assert_eq!(
        BatchView::new(c).map(|v| v.header.base_sequence),
        Ok(12),
        "the crash kept C past the log's end"
    );
    let s = reopen_after_crash(&rig, s);
    assert_eq!(s.offsets(&id).unwrap().high_watermark, u64::from(K));
    let rep = &s.recovery_report()[0];
    assert_eq!(
        rep.stale_erased, 1,
        "C erased at the first recovery: {rep:?}"
    );

    // Run 2: the producer's retry of C is acknowledged at 4..8 (A's end,
    // 4608..5120, the sector after it zeroed); then Z, of `z_records`
    // records, is written at 5120..5632, ending where C starts; its
    // fdatasync fails, and the crash keeps Z but not the zeros after it.
    let c2 = block_on(s.append(&id, batch_of(K, 12))).unwrap();
    assert_eq!(c2.base_offset, u64::from(K), "the retry of C");
    fail_syncs(&rig);
    assert!(block_on(s.append(&id, batch_of(z_records, 100))).is_err());
    let path = seg.clone();
    rig.disk().unwrap().crash_keeping(|p, off, len| {
        if p != path {
            return 0..len;
        }
        0..(c_at.saturating_sub(off) as usize).min(len)
    });
    let s = reopen_after_crash(&rig, s);
    (rig, s, id)
}

/// After the second crash: A, C's retry and Z (written, then kept by the
/// crash: never acked, its records there once), ending at `hw`; not C
/// again behind Z.
fn check_after_second_crash(z_records: u32, hw: u64) {
    let (_rig, s, id) = two_crashes(z_records);
    let rep = &s.recovery_report()[0];
    assert!(!rep.quarantined, "{rep:?}");
    assert_eq!(
        rep.truncation, None,
        "C's erased header ends the log cleanly"
    );
    let twice: Vec<String> = record_counts(&s, &id)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(v, n)| format!("{} x{n}", String::from_utf8_lossy(&v[..8])))
        .collect();
    assert!(twice.is_empty(), "records read back twice: {twice:?}");
    assert_eq!(s.offsets(&id).unwrap().high_watermark, hw);
    s.shutdown().unwrap();
}

#[test]
fn a_crashed_runs_batch_at_the_next_offset_does_not_come_back() {
    check_after_second_crash(4, 12);
}

#[test]
fn a_crashed_runs_batch_after_a_gap_does_not_come_back() {
    check_after_second_crash(3, 11);
}

/// A clean restart reads no more than recovery needs: a clean shutdown's
/// checkpoint at the end says no batch was written after it, and the first
/// append of the next run unmarks it before writing. After a crash the
/// restart reads past the end to erase what may be there.
#[test]
fn only_a_restart_after_a_crash_reads_past_the_end() {
    use super::meta;
    use super::recovery::Checkpoint;
    let rig = Rig::fault(3);
    let disk = rig.disk().unwrap().clone();
    let id = pid("clean", 0);
    let ck_path = rig.dir.path().join("topics/clean/0/checkpoint.meta");
    let clean = || {
        meta::read::<Checkpoint>(&ck_path)
            .unwrap()
            .is_some_and(|c| c.clean)
    };
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    block_on(s.append(&id, batch_of(4, 0))).unwrap();
    s.shutdown().unwrap();
    drop(s);
    assert!(clean(), "a clean shutdown marks its checkpoint");

    let before = disk.bytes_read();
    let s = rig.open();
    let after_clean_stop = disk.bytes_read() - before;
    // The next append's fdatasync fails, then the power goes.
    fail_syncs(&rig);
    assert!(block_on(s.append(&id, batch_of(4, 4))).is_err());
    assert!(!clean(), "unmarked before the first append");
    disk.crash();
    let before = disk.bytes_read();
    let s = reopen_after_crash(&rig, s);
    let after_crash = disk.bytes_read() - before;
    assert!(
        after_clean_stop < after_crash,
        "read {after_clean_stop} bytes after a clean stop, {after_crash} after a crash"
    );
    assert!(s.offsets(&id).unwrap().high_watermark >= 4);
    s.shutdown().unwrap();
}

/// The first append after a clean start, whose unmarked checkpoint is
/// renamed in place but not synced, keeps that checkpoint: it says "not
/// clean" as a synced one would. It used to be removed as if not written,
/// taking with it what it said was durable.
#[test]
fn an_unmarked_checkpoint_not_synced_is_kept() {
    use super::meta;
    use super::recovery::Checkpoint;
    let rig = Rig::fault(3);
    let id = pid("clean", 0);
    let ck_path = rig.dir.path().join("topics/clean/0/checkpoint.meta");
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    block_on(s.append(&id, batch_of(4, 0))).unwrap();
    s.shutdown().unwrap();
    drop(s);
    let marked: Checkpoint = meta::read(&ck_path).unwrap().expect("written");
    assert!(marked.clean);
    let s = rig.open();
    meta::FAIL_DIR_SYNC.lock().unwrap().push(ck_path.clone());
    block_on(s.append(&id, batch_of(4, 4))).unwrap();
    let unmarked: Option<Checkpoint> = meta::read(&ck_path).unwrap();
    let want = Checkpoint {
        clean: false,
        ..marked
    };
    assert_eq!(unmarked, Some(want));
    s.shutdown().unwrap();
}

/// The same for a roll: the run fills slot 0, rolls, and writes slot 1's header with two batches, whose fdatasync fails; the
/// crash keeps only the second batch. Slot 1's header is lost, so slot 0
/// is the active segment, full: recovery reads slot 1 too and erases it.
#[test]
fn a_crashed_runs_batch_in_the_slot_it_rolled_into_is_erased() {
    let rig = Rig::fault(5);
    rig.disk().unwrap().clone().with_write_unit(512);
    let disk = rig.disk().unwrap().clone();
    let id = pid("roll", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    // 64 KiB segments: 120 batches of 512 bytes fill slot 0 to its end.
    let per_segment = (small_cfg().segment_bytes as usize - 4096) / LEN;
    for i in 0..per_segment {
        block_on(s.append(&id, batch_of(4, 4 * i as i32))).unwrap();
    }
    let next_seq = 4 * per_segment as i32;
    // Slot 0 is durable already (its last append was acked), so the roll
    // syncs nothing; the next fdatasync, slot 1's first write's, fails.
    disk.set_plan(FaultPlan {
        fail_sync_nth: Some(disk.syncs() + 1),
        errno: libc::EIO,
        ..FaultPlan::default()
    });
    one_failed_round(&s, &id, 4, &[next_seq, next_seq + 4]);
    let slot1 = rig.dir.path().join("topics/roll/0/seg-00001.log");
    let second = 4096 + LEN as u64;
    let path = slot1.clone();
    disk.crash_keeping(|p, off, len| {
        if p != path {
            return 0..len;
        }
        (second.saturating_sub(off) as usize).min(len)..len
    });
    let on_disk = disk.contents(&slot1).unwrap();
    assert_eq!(
        BatchView::new(&on_disk[second as usize..second as usize + LEN])
            .map(|v| v.header.base_sequence),
        Ok(next_seq + 4),
        "the crash kept the second batch in slot 1"
    );
    let s = reopen_after_crash(&rig, s);
    let rep = &s.recovery_report()[0];
    assert!(!rep.quarantined, "{rep:?}");
    assert_eq!(rep.stale_erased, 1, "{rep:?}");
    assert_eq!(
        s.offsets(&id).unwrap().high_watermark,
        4 * per_segment as u64
    );
    s.shutdown().unwrap();
}

/// Merges the ring's oldest segment into itself (every batch kept), as
/// the cleaner would with nothing to drop.
fn merge_oldest(s: &Storage, id: &PartitionId) -> Result<(), StorageError> {
    let oldest = block_on(s.segments(id))?[0];
    block_on(s.compact_begin(id, oldest.epoch, 1))?;
    let mut chunk = Vec::new();
    for b in super::tests::read_all(s, id, oldest.base_offset) {
        let h = crate::batch::parse_header(&b).expect("a stored batch");
        if h.next_offset() > oldest.next_offset {
            break;
        }
        if chunk.len() + b.len() > super::compact_write_bytes_max(s.max_batch_bytes()) {
            block_on(s.compact_write(id, std::mem::take(&mut chunk)))?;
        }
        chunk.extend_from_slice(&b);
    }
    block_on(s.compact_write(id, chunk))?;
    block_on(s.compact_commit(id))
}

/// A merge cut short by a crash (kill -9 or power) leaves its scratch
/// file, the partition's spare until the merge took it: start-up keeps it
/// as the spare, so the next merge on a disk that is full by then needs
/// no new room.
#[test]
fn a_merge_cut_short_by_a_crash_leaves_its_room_to_the_next() {
    let rig = Rig::fault(31);
    let disk = rig.disk().expect("fault rig").clone();
    let id = pid("k", 0);
    let cfg = PartitionConfig {
        segments: 4,
        overflow: OverflowPolicy::Reject,
        ..small_cfg()
    };
    let s = rig.open();
    block_on(s.create_partition_spared(id.clone(), cfg, true)).expect("create");
    // Two closed segments and then some.
    for seq in 0..2 * 64 * 1024 / LEN as i32 + 4 {
        block_on(s.append(&id, batch_of(1, seq))).expect("append");
    }
    let oldest = block_on(s.segments(&id)).expect("segments")[0];
    block_on(s.compact_begin(&id, oldest.epoch, 1)).expect("begin");
    disk.crash();
    drop(s);
    disk.restart();

    let s = rig.open();
    let names: Vec<_> = disk.file_paths();
    assert!(
        names.iter().any(|p| p.ends_with("k/0/compact.spare"))
            && !names.iter().any(|p| p.ends_with("k/0/compact.tmp")),
        "{names:#?}"
    );
    // Whatever room start-up freed, another writer has taken.
    disk.set_plan(FaultPlan {
        capacity_bytes: Some(disk.allocated_bytes()),
        ..FaultPlan::default()
    });
    merge_oldest(&s, &id).expect("a merge on the full disk");
    assert_eq!(s.stats().compactions, 1);
    disk.set_plan(FaultPlan::default());
}

/// A merge's data ends with its whole end mark, even where it ends on the
/// last byte of the compaction buffer: behind it in the scratch file are
/// whatever bytes it held, and a spare that was an unfinished merge's
/// scratch file holds batches above the new segment's end, which a scan
/// would take for data after a gap.
#[test]
fn a_merges_end_mark_hides_what_its_scratch_file_held() {
    let rig = Rig::fault(32);
    let id = pid("k", 0);
    let cfg = PartitionConfig {
        segment_bytes: 256 * 1024,
        segments: 4,
        overflow: OverflowPolicy::Reject,
        ..small_cfg()
    };
    let s = rig.open();
    block_on(s.create_partition_spared(id.clone(), cfg, true)).expect("create");
    let mut seq = 0;
    while block_on(s.segments(&id)).expect("segments").len() < 3 {
        block_on(s.append(&id, batch_of(1, seq))).expect("append");
        seq += 1;
    }
    let segs = block_on(s.segments(&id)).expect("segments");
    let (first, second) = (segs[0], segs[1]);
    let batches = |from: u64, to: u64| -> Vec<Vec<u8>> {
        super::tests::read_all(&s, &id, from)
            .into_iter()
            .filter(|b| {
                let h = crate::batch::parse_header(b).expect("a stored batch");
                h.base_offset >= from && h.next_offset() <= to
            })
            .collect()
    };
    let write = |bs: &[Vec<u8>]| {
        for chunk in bs.chunks(64) {
            block_on(s.compact_write(&id, chunk.concat())).expect("compact write");
        }
    };
    // A merge of the first two segments that kept only the second's
    // batches, given up: the spare holds them from byte 4096 on.
    block_on(s.compact_begin(&id, first.epoch, 2)).expect("begin");
    write(&batches(second.base_offset, second.next_offset));
    block_on(s.compact_abort(&id)).expect("abort");
    // A merge of the first segment keeping its last batches, as many as
    // end its data on the buffer's last byte: there the spare holds one of
    // the second segment's batches.
    let kept = (super::compact_buffer_bytes(s.max_batch_bytes()) - 4096) / LEN;
    let all = batches(first.base_offset, first.next_offset);
    assert!(all.len() >= kept && second.next_offset - second.base_offset > kept as u64);
    block_on(s.compact_begin(&id, first.epoch, 1)).expect("begin");
    write(&all[all.len() - kept..]);
    block_on(s.compact_commit(&id)).expect("commit");
    let offsets = |s: &Storage| -> Vec<u64> {
        super::tests::read_all(s, &id, 0)
            .iter()
            .map(|b| crate::batch::parse_header(b).expect("a batch").base_offset)
            .collect()
    };
    let want = offsets(&s);
    assert_eq!(want.first(), Some(&(first.next_offset - kept as u64)));
    s.shutdown().expect("shutdown");
    drop(s);

    let s = rig.open();
    let quarantined: Vec<_> = s
        .recovery_report()
        .into_iter()
        .filter_map(|r| r.quarantine)
        .collect();
    assert!(quarantined.is_empty(), "{quarantined:?}");
    assert_eq!(offsets(&s), want);
}
