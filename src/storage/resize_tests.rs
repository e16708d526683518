//! Rings grown and shrunk live (`resize`), on every backend, through
//! restarts and crashes.

use super::tests::{make_batch, pid, rigs, small_cfg, stored, Rig, Submit};
use super::*;
use futures_lite::future::block_on;

/// Every batch appended, as stored, by base offset.
struct Log {
    batches: Vec<(u64, Vec<u8>)>,
    tag: u64,
}

impl Log {
    fn new() -> Log {
        Log {
            batches: Vec::new(),
            tag: 0,
        }
    }

    /// Appends `n` batches of about 7 KiB (9 to a 64 KiB segment).
    fn append(&mut self, s: &Storage, id: &PartitionId, n: usize) {
        for _ in 0..n {
            self.tag += 1;
            let b = make_batch(2, 3500, self.tag, 1_000);
            let ack = block_on(s.append(id, b.clone())).expect("append");
            self.batches
                .push((ack.base_offset, stored(b, ack.base_offset)));
        }
    }

    /// The storage holds exactly the batches from its earliest offset on,
    /// and returns that offset.
    fn check(&self, s: &Storage, id: &PartitionId, what: &str) -> u64 {
        let o = s.offsets(id).unwrap();
        let got = super::tests::read_all(s, id, o.earliest);
        let want: Vec<Vec<u8>> = self
            .batches
            .iter()
            .filter(|(base, _)| *base >= o.earliest)
            .map(|(_, b)| b.clone())
            .collect();
        assert_eq!(got.len(), want.len(), "{what}: batch count");
        assert!(got == want, "{what}: contents");
        assert_eq!(
            o.high_watermark,
            self.batches.last().map_or(0, |b| {
                crate::batch::parse_header(&b.1).unwrap().next_offset()
            })
        );
        o.earliest
    }
}

fn alter(s: &Storage, id: &PartitionId, segments: u32) -> Result<(), StorageError> {
    let cfg = PartitionConfig {
        segments,
        ..s.partitions()[0].1.clone()
    };
    block_on(s.alter_partition(id, cfg))
}

fn cfg_of(s: &Storage, id: &PartitionId, n: u32, overflow: OverflowPolicy) -> PartitionConfig {
    let _ = (s, id);
    PartitionConfig {
        segments: n,
        overflow,
        ..small_cfg()
    }
}

/// A wrapped ring (its oldest segment in a higher slot than its active
/// one) grows: nothing moves, the new slots are used before anything is
/// overwritten, and a restart finds the same log. Then it shrinks below
/// its data: the oldest segments go, the rest stays, also after restarts.
#[test]
fn grow_a_wrapped_ring_then_shrink_it() {
    for (name, rig) in rigs() {
        let id = pid("resize", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let mut log = Log::new();
        log.append(&s, &id, 40); // 3 slots of 9: wrapped
        let before = log.check(&s, &id, name);
        assert!(before > 0, "{name}: the ring has wrapped");
        let grown = |s: &Storage, n: u32| {
            block_on(s.alter_partition(&id, cfg_of(s, &id, n, OverflowPolicy::Overwrite)))
        };
        grown(&s, 5).unwrap();
        assert_eq!(log.check(&s, &id, name), before, "{name}: grow keeps all");
        // Two more segments' worth fit before the ring overwrites again.
        log.append(&s, &id, 15);
        assert_eq!(
            log.check(&s, &id, name),
            before,
            "{name}: new slots used first"
        );
        s.shutdown().unwrap();
        drop(s);
        let s = rig.open();
        assert_eq!(s.partitions()[0].1.segments, 5, "{name}");
        assert!(!s.recovery_report()[0].quarantined, "{name}");
        assert_eq!(log.check(&s, &id, name), before, "{name}: after restart");
        log.append(&s, &id, 30);
        let wrapped_again = log.check(&s, &id, name);
        assert!(wrapped_again > before, "{name}");
        // Shrink a full ring: its oldest segments go.
        grown(&s, 2).unwrap();
        let after_shrink = log.check(&s, &id, name);
        assert!(after_shrink > wrapped_again, "{name}: the oldest dropped");
        log.append(&s, &id, 12);
        log.check(&s, &id, name);
        s.shutdown().unwrap();
        drop(s);
        let s = rig.open();
        assert_eq!(s.partitions()[0].1.segments, 2, "{name}");
        assert!(!s.recovery_report()[0].quarantined, "{name}");
        log.check(&s, &id, name);
        // And grows again, reusing the freed file numbers.
        grown(&s, 4).unwrap();
        log.append(&s, &id, 20);
        let e = log.check(&s, &id, name);
        s.shutdown().unwrap();
        drop(s);
        let s = rig.open();
        assert_eq!(log.check(&s, &id, name), e, "{name}");
        if rig.disk().is_none() {
            let mut files: Vec<String> = std::fs::read_dir(rig.dir.path().join("topics/resize/0"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("seg-"))
                .collect();
            files.sort();
            assert_eq!(files.len(), 4, "{name}: {files:?}");
        }
        s.shutdown().unwrap();
    }
}

/// A ring that never overwrites refuses to shrink below its data, and
/// changes nothing; to a size that holds it, it shrinks.
#[test]
fn a_rejecting_ring_shrinks_only_when_its_data_fits() {
    for (name, rig) in rigs() {
        let id = pid("keep", 0);
        let s = rig.open();
        let cfg = cfg_of(&s, &id, 5, OverflowPolicy::Reject);
        block_on(s.create_partition(id.clone(), cfg)).unwrap();
        let mut log = Log::new();
        log.append(&s, &id, 20); // 3 segments
        let e = log.check(&s, &id, name);
        match alter(&s, &id, 2) {
            Err(StorageError::RingTooSmall {
                live_segments: 3,
                asked: 2,
                ..
            }) => {}
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(log.check(&s, &id, name), e, "{name}: nothing dropped");
        alter(&s, &id, 3).unwrap();
        assert_eq!(log.check(&s, &id, name), e, "{name}");
        // Full now: the next segment is refused, not overwritten.
        let mut refused = false;
        for i in 0..20 {
            match block_on(s.append(&id, make_batch(2, 3500, 900 + i, 1_000))) {
                Ok(ack) => log.batches.push((
                    ack.base_offset,
                    stored(make_batch(2, 3500, 900 + i, 1_000), ack.base_offset),
                )),
                Err(StorageError::Full(_)) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
        assert!(refused, "{name}");
        assert_eq!(log.check(&s, &id, name), e, "{name}");
        s.shutdown().unwrap();
        drop(s);
        let s = rig.open();
        assert_eq!(log.check(&s, &id, name), e, "{name}");
        assert_eq!(s.partitions()[0].1.segments, 3, "{name}");
        s.shutdown().unwrap();
    }
}

/// Power lost right after a resize and more appends: recovery finds the
/// new ring and every acknowledged batch, on seeded crashes.
#[test]
fn crash_after_a_resize_keeps_every_acknowledged_batch() {
    for seed in 0..12u64 {
        let rig = Rig::fault(seed);
        let disk = rig.disk().unwrap().clone();
        let id = pid("crash", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let mut log = Log::new();
        log.append(&s, &id, 22 + seed as usize);
        let n = if seed % 2 == 0 { 6 } else { 2 };
        alter(&s, &id, n).unwrap();
        log.append(&s, &id, 5 + seed as usize);
        let e = log.check(&s, &id, "before the crash");
        disk.crash();
        let _ = s.shutdown();
        drop(s);
        disk.restart();
        let s = rig.open();
        let rep = &s.recovery_report()[0];
        assert!(!rep.quarantined, "seed {seed}: {rep:?}");
        assert_eq!(s.partitions()[0].1.segments, n, "seed {seed}");
        assert_eq!(log.check(&s, &id, "after the crash"), e, "seed {seed}");
        log.append(&s, &id, 30);
        log.check(&s, &id, "going on");
        s.shutdown().unwrap();
    }
}

/// An alter whose `partition.meta` cannot be written (a directory in the
/// way of its temp file) after the ring was resized used to leave the
/// ring at the new size, and the new overflow, running under the old
/// `partition.meta`. Now the ring is resized back: the partition runs
/// what its files say, and takes the alter once the file can be written.
#[test]
fn an_alter_that_cannot_write_partition_meta_resizes_the_ring_back() {
    for (name, rig) in rigs() {
        let id = pid("resize", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let mut log = Log::new();
        log.append(&s, &id, 5);
        let tmp = rig.dir.path().join("topics/resize/0/partition.meta.tmp");
        for (segments, overflow) in [(5, OverflowPolicy::Reject), (2, OverflowPolicy::Overwrite)] {
            let want = cfg_of(&s, &id, segments, overflow);
            std::fs::create_dir(&tmp).unwrap();
            let e = block_on(s.alter_partition(&id, want.clone())).expect_err(name);
            assert!(matches!(e, StorageError::Meta(_)), "{name}: {e:?}");
            assert_eq!(block_on(s.running_config(&id)), small_cfg(), "{name}");
            log.check(&s, &id, name);
            std::fs::remove_dir(&tmp).unwrap();
            block_on(s.alter_partition(&id, want.clone())).expect(name);
            assert_eq!(block_on(s.running_config(&id)), want, "{name}");
            block_on(s.alter_partition(&id, small_cfg())).expect(name);
        }
        s.shutdown().unwrap();
    }
}

/// A first grow (no `ring.meta` yet) cut short before its commit leaves
/// its new segment files past the ring's. They used to stay when the
/// next start kept the old size (as it does when the alter's table was
/// not written): files no ring names, in the way of nothing but counted
/// as the ring's. Now the start removes them.
#[test]
fn a_start_removes_the_files_of_a_first_grow_cut_short() {
    for (name, rig) in rigs() {
        if rig.disk().is_some() {
            continue; // its files are not in the directory
        }
        let id = pid("resize", 0);
        let s = rig.open();
        block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
        let mut log = Log::new();
        log.append(&s, &id, 5);
        s.shutdown().unwrap();
        drop(s);
        let dir = rig.dir.path().join("topics/resize/0");
        assert!(!dir.join(part::RING_META).exists(), "{name}: never resized");
        let stray = part::seg_path(&dir, small_cfg().segments as usize);
        std::fs::write(&stray, vec![0u8; 4096]).unwrap();
        let s = rig.open();
        assert!(!stray.exists(), "{name}: the grow's file stays");
        assert_eq!(block_on(s.running_config(&id)), small_cfg(), "{name}");
        log.check(&s, &id, name);
        s.shutdown().unwrap();
    }
}

/// Partition `resize/0` of the small config, made and given `batches`.
fn started(rig: &Rig, batches: usize) -> (Storage, PartitionId, Log) {
    let id = pid("resize", 0);
    let s = rig.open();
    block_on(s.create_partition(id.clone(), small_cfg())).unwrap();
    let mut log = Log::new();
    log.append(&s, &id, batches);
    (s, id, log)
}

/// Makes the next write of `file` in partition `resize/0` fail its
/// directory sync, after its rename (`meta::MetaError::Unsynced`).
fn unsynced(rig: &Rig, file: &str) {
    let path = rig.dir.path().join("topics/resize/0").join(file);
    meta::FAIL_DIR_SYNC.lock().unwrap().push(path);
}

/// A resize whose `ring.meta` is renamed in place but whose directory
/// sync fails is committed: the next start runs that layout. Taken as a
/// failure, a shrink kept running the slots the next start removes, and
/// lost what it had rolled into them; a grow removed the files the layout
/// names and ran the old size until a restart found the new. Now the ring
/// runs the size its file says, and a restart finds every batch.
#[test]
fn a_resize_whose_ring_meta_is_not_synced_is_committed() {
    for (name, rig) in rigs() {
        let (mut s, id, mut log) = started(&rig, 20);
        for n in [2, 5] {
            unsynced(&rig, part::RING_META);
            let altered = alter(&s, &id, n);
            let running = block_on(s.running_config(&id)).segments;
            // Round the whole ring, through every slot it runs.
            log.append(&s, &id, 9 * 6);
            let e = log.check(&s, &id, name);
            s.shutdown().unwrap();
            drop(s);
            s = rig.open();
            let what = format!("{name}: resized to {n}, restarted");
            assert!(!s.recovery_report()[0].quarantined, "{what}");
            assert_eq!(block_on(s.running_config(&id)).segments, running, "{what}");
            assert_eq!(log.check(&s, &id, &what), e, "{what}");
            altered.expect(&what);
            assert_eq!(running, n, "{what}");
        }
        s.shutdown().unwrap();
    }
}

/// An alter whose `partition.meta` is renamed in place but whose
/// directory sync fails is in effect. Taken as a failure, the partition
/// ran its old config (its ring resized back) while a restart loaded the
/// new overflow, with the old size from `ring.meta`.
#[test]
fn an_alter_whose_partition_meta_is_not_synced_is_in_effect() {
    for (name, rig) in rigs() {
        let (s, id, log) = started(&rig, 5);
        let want = cfg_of(&s, &id, 5, OverflowPolicy::Reject);
        unsynced(&rig, part::PARTITION_META);
        let altered = block_on(s.alter_partition(&id, want.clone()));
        let running = block_on(s.running_config(&id));
        log.check(&s, &id, name);
        s.shutdown().unwrap();
        drop(s);
        let s = rig.open();
        assert_eq!(
            block_on(s.running_config(&id)),
            running,
            "{name}: restarted"
        );
        altered.expect(name);
        assert_eq!(running, want, "{name}");
        log.check(&s, &id, name);
        s.shutdown().unwrap();
    }
}

/// A start that completes a resize (a crash came between `ring.meta`
/// and `partition.meta`) whose `partition.meta` is renamed in place but
/// not synced goes on: the file holds the size it runs, and were it lost,
/// the next start would complete the resize again. It used to fail the
/// whole start.
#[test]
fn a_start_completing_a_resize_goes_on_when_partition_meta_is_not_synced() {
    for (name, rig) in rigs() {
        let (s, id, log) = started(&rig, 5);
        alter(&s, &id, 5).unwrap();
        s.shutdown().unwrap();
        drop(s);
        let file = rig
            .dir
            .path()
            .join("topics/resize/0")
            .join(part::PARTITION_META);
        let before_resize = part::PartitionMeta {
            topic: "resize".into(),
            partition: 0,
            cfg: small_cfg(),
        };
        meta::write_atomic(&file, &before_resize).unwrap();
        unsynced(&rig, part::PARTITION_META);
        let s = rig.open_with(rig.cfg()).expect(name);
        assert_eq!(block_on(s.running_config(&id)).segments, 5, "{name}");
        let on_disk: part::PartitionMeta = meta::read(&file).unwrap().unwrap();
        assert_eq!(on_disk.cfg.segments, 5, "{name}");
        log.check(&s, &id, name);
        s.shutdown().unwrap();
    }
}
