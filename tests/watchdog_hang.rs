//! A hung device (an fdatasync that never returns) trips the systemd
//! watchdog instead of stalling acks forever: the broker and its storage
//! run in process on the fault-injecting disk, with the watchdog and the
//! storage heartbeat `skiff serve` runs (`server::storage_heartbeat`),
//! pinging a notify socket the test reads. While the disk's fdatasyncs
//! hang, the pings stop and the pending produce is not acknowledged; when
//! the device comes back, both resume.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::broker::{
    Broker, BrokerLimits, BrokerOptions, Durability, OverflowPolicy, PartitionConfig, SystemClock,
    TopicSpec,
};
use skiff::notify::{Notifier, Watchdog};
use skiff::storage::io::fault::{FaultBackend, FaultDisk, FaultPlan};
use skiff::storage::{Storage, StorageConfig};
use smol::block_on;

/// Watchdog pings received within `window`.
fn pings(sock: &UnixDatagram, window: Duration) -> usize {
    let until = Instant::now() + window;
    let mut n = 0;
    let mut buf = [0u8; 256];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match sock.recv(&mut buf) {
            Ok(len) if buf[..len].windows(10).any(|w| w == b"WATCHDOG=1") => n += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    n
}

fn batch() -> Vec<u8> {
    let mut b = BatchBuilder::new();
    b.push(1, None, b"v", &[]);
    b.finish(ProducerStamp::NONE)
}

#[test]
fn a_hung_fsync_stops_the_watchdog_pings_and_acks() {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tmp");
    std::fs::create_dir_all(&base).expect("test-tmp");
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let disk = FaultDisk::new(1, FaultPlan::default());
    let storage = Storage::open_with_backend(
        StorageConfig {
            data_dir: dir.path().to_path_buf(),
            max_partitions: 4,
            tail_buffer_bytes: 64 * 1024,
            max_batch_bytes: 32 * 1024,
            prewrite_segments: false,
            ..StorageConfig::default()
        },
        Box::new(FaultBackend::new(disk.clone())),
    )
    .expect("storage");
    let broker = Broker::open(
        storage,
        BrokerOptions {
            data_dir: dir.path().to_path_buf(),
            limits: BrokerLimits {
                max_topics: 4,
                max_partitions: 4,
                disk_budget_bytes: u64::MAX,
                max_producers: 16,
                producer_idle_expiry_ms: 60_000,
                producer_name_expiry_ms: 604_800_000,
            },
            defaults: PartitionConfig {
                segment_bytes: 64 * 1024,
                segments: 2,
                retention_ms: None,
                durability: Durability::Always,
                overflow: OverflowPolicy::Overwrite,
            },
            default_partitions: 1,
            clock: Arc::new(SystemClock),
            cleaner: skiff::broker::cleaner::CleanerLimits::default(),
            internal_topics: Vec::new(),
        },
    )
    .expect("broker");
    block_on(broker.create_topic("t", &TopicSpec::default())).expect("topic");

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    // Pings every 100 ms, beats every 50 ms.
    let watchdog = Watchdog::new(
        Notifier::new(sock_path.as_os_str()).expect("notifier"),
        Duration::from_millis(200),
    );
    let hb = watchdog.register("storage");
    let interval = watchdog.beat_interval();
    let b = broker.clone();
    std::thread::spawn(move || block_on(skiff::server::storage_heartbeat(b, hb, interval)));
    let _ticker = watchdog.start().expect("ticker");
    assert!(
        pings(&sock, Duration::from_millis(600)) >= 2,
        "pings while healthy"
    );
    block_on(async { broker.produce("t", 0, batch().into()).await?.await }).expect("healthy ack");

    // The device hangs; a produce waits on its fdatasync.
    disk.set_plan(FaultPlan {
        hang_syncs: true,
        ..FaultPlan::default()
    });
    let acked = Arc::new(AtomicBool::new(false));
    let (b, done) = (broker.clone(), acked.clone());
    let producer = std::thread::spawn(move || {
        let r = block_on(async { b.produce("t", 0, batch().into()).await?.await });
        done.store(true, Ordering::SeqCst);
        r
    });
    // A beat taken just before the hang may carry one more ping.
    pings(&sock, Duration::from_millis(300));
    assert_eq!(
        pings(&sock, Duration::from_millis(1000)),
        0,
        "the watchdog kept pinging while the storage thread hung"
    );
    assert!(
        !acked.load(Ordering::SeqCst),
        "acked during a hung fdatasync"
    );

    // The device comes back: the ack and the pings follow.
    disk.set_plan(FaultPlan::default());
    producer
        .join()
        .expect("producer thread")
        .expect("acked once the fdatasync returned");
    assert!(pings(&sock, Duration::from_millis(600)) >= 1, "pings again");
    broker.close().expect("close");
}
