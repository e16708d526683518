//! The storage API as the broker and server see it: only public items,
//! from outside the crate, on real files.

use skiff::batch::{BatchBuilder, BatchIter, ProducerStamp};
use skiff::storage::{
    meta, BackendChoice, CheckedBatch, Durability, OverflowPolicy, PartitionConfig, PartitionId,
    Storage, StorageConfig, StorageError, Wake,
};

fn assert_send_sync<T: Send + Sync>() {}
fn assert_send<T: Send>() {}

#[test]
fn handle_and_ticket_are_thread_safe() {
    assert_send_sync::<Storage>();
    assert_send::<skiff::storage::AppendTicket>();
    assert_send_sync::<StorageError>();
}

fn batch(n: u32) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        b.push(1_700_000_000_000 + i64::from(i), None, b"hello", &[]);
    }
    b.finish(ProducerStamp::NONE)
}

#[test]
fn produce_fetch_restart_from_outside() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = StorageConfig {
        data_dir: dir.path().to_path_buf(),
        backend: "pwrite".parse::<BackendChoice>().unwrap(),
        ..StorageConfig::default()
    };
    let id = PartitionId::new("sensors.temp", 3);
    let pcfg = PartitionConfig {
        segment_bytes: 256 * 1024,
        segments: 2,
        retention_ms: None,
        durability: "always".parse::<Durability>().unwrap(),
        overflow: "reject".parse::<OverflowPolicy>().unwrap(),
    };
    {
        let s = Storage::open(cfg.clone()).unwrap();
        assert_eq!(s.backend_name(), "pwrite");
        smol::block_on(async {
            s.create_partition(id.clone(), pcfg.clone()).await.unwrap();
            let ev = s.data_event(&id).unwrap();
            let listener = ev.listen();
            let checked = CheckedBatch::check(batch(3)).unwrap();
            let ack = s.submit(&id, checked, Wake::Now).await.unwrap();
            let ack = ack.await.unwrap();
            assert_eq!((ack.base_offset, ack.last_offset), (0, 2));
            listener.await;
            // Left queued until a wake-up, which a caller handing over
            // several batches gives after the last.
            let checked = CheckedBatch::check(batch(2)).unwrap();
            let t = s.submit(&id, checked, Wake::Later).await.unwrap();
            s.wake();
            assert_eq!(t.await.unwrap().base_offset, 3);
            let bytes = s.read(&id, 0, 1 << 20).await.unwrap();
            let offsets: Vec<u64> = BatchIter::new(&bytes)
                .map(|b| b.unwrap().header.base_offset)
                .collect();
            assert_eq!(offsets, vec![0, 3]);
            assert_eq!(
                s.offset_for_timestamp(&id, 1_700_000_000_001)
                    .await
                    .unwrap(),
                Some(0)
            );
        });
        let o = s.offsets(&id).unwrap();
        assert_eq!((o.earliest, o.high_watermark), (0, 5));
        assert!(s.stats().fsyncs > 0);
        s.shutdown().unwrap();
    }
    let s = Storage::open(cfg).unwrap();
    assert_eq!(s.partitions(), vec![(id.clone(), pcfg)]);
    assert_eq!(s.offsets(&id).unwrap().high_watermark, 5);
    assert_eq!(s.recovery_report()[0].bytes_truncated, 0);
    s.shutdown().unwrap();
    // The metadata helpers are public for other rooms too.
    let p = dir.path().join("x.meta");
    meta::write_atomic(&p, &(1u32, "x".to_string())).unwrap();
    assert_eq!(
        meta::read::<(u32, String)>(&p).unwrap(),
        Some((1, "x".to_string()))
    );
}
