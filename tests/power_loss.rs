//! Simulated power loss: seeded runs of the broker core (the broker and
//! its storage engine, in process) on the fault-injecting disk, which
//! loses, keeps or tears every write not yet fdatasynced when its power is
//! cut. Idempotent producers append, retry what was not acknowledged
//! through every restart, and the checker (tests/common/checker.rs) reads
//! the log back at the end: every acknowledged record exactly once, at the
//! offset of its ack, in each producer's order, nothing unexpected, offsets
//! dense.
//!
//! Everything a run does (its steps, the batches, where the power is cut,
//! and what the disk keeps) follows from its seed, so a failing seed is
//! replayed with `SKIFF_POWER_LOSS_SEED=<n>`. The storage thread's group
//! commit is the one thing left to timing: a crash is set up by failing
//! every fdatasync and awaiting the appends' failures, so whatever the
//! thread grouped, what reached the disk unsynced is decided there.
//!
//! - CI: `SKIFF_POWER_LOSS_SEEDS` seeds (default 16).
//! - Long mode: `scripts/soak --power-loss --seeds 10000`, one summary line.
//!
//! Hooks: [`Step`] is where consumer-group commits, compaction and
//! transactions join the run as those features land, each with its own
//! check next to the checker's.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::checker::{self, History, Offsets as Gaps, Outcome, Seen, Served};
use skiff::batch::{BatchBuilder, BatchIter, BatchView, ProducerStamp};
use skiff::broker::{
    Broker, BrokerError, BrokerLimits, BrokerOptions, Durability, OverflowPolicy, PartitionConfig,
    SystemClock, TopicSpec,
};
use skiff::storage::io::fault::{FaultBackend, FaultDisk, FaultPlan};
use skiff::storage::{PartitionId, Storage, StorageConfig};
use smol::block_on;

const TOPIC: &str = "sim";
const PARTITIONS: u32 = 2;
const PRODUCERS: u32 = 3;

/// splitmix64: the run's choices, from its seed.
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
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// A producer's batch: where it goes and which of its records it holds.
#[derive(Clone, Debug)]
struct Sent {
    partition: u32,
    base_seq: i32,
    /// The checker's sequence numbers of its records: `first..first + n`.
    first: u64,
    records: u32,
    value_bytes: usize,
}

struct Producer {
    /// The checker's name for it.
    n: u32,
    id: u64,
    epoch: u16,
    next_seq: [i32; PARTITIONS as usize],
    next_record: u64,
    /// Sent and not acknowledged: retried, in order, before anything new.
    retry: VecDeque<Sent>,
}

impl Producer {
    /// The next batch to send, and whether it is new (not a retry).
    fn next_batch(&mut self, rng: &mut Rng, uniform: bool) -> (Sent, bool) {
        if let Some(s) = self.retry.pop_front() {
            return (s, false);
        }
        let partition = rng.below(u64::from(PARTITIONS)) as u32;
        let (records, value_bytes) = if uniform {
            (4, 100)
        } else {
            (rng.range(1, 6) as u32, rng.range(20, 300) as usize)
        };
        let s = Sent {
            partition,
            base_seq: self.next_seq[partition as usize],
            first: self.next_record,
            records,
            value_bytes,
        };
        self.next_seq[partition as usize] += records as i32;
        self.next_record += u64::from(records);
        (s, true)
    }

    /// `age_ms`: how old the records' timestamps are (a device sending
    /// what it buffered while the broker was away).
    fn encode(&self, s: &Sent, age_ms: i64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for i in 0..u64::from(s.records) {
            let v = checker::value(self.n, s.first + i, s.value_bytes);
            b.push(skiff::batch::now_ms() - age_ms, None, &v, &[]);
        }
        b.finish(ProducerStamp {
            producer_id: self.id,
            producer_epoch: self.epoch,
            base_sequence: s.base_seq,
        })
    }
}

/// One step of a run. New kinds (group commits, compaction passes,
/// transactions) go here, with what they check.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Producers send a group of batches and await their acks.
    Produce,
    /// Every fdatasync fails while a group is written; then the power is
    /// cut: the disk keeps, drops or tears each unsynced write.
    CrashInFlight,
    /// The power is cut with nothing in flight.
    CrashIdle,
    /// A clean stop and start.
    Restart,
    /// The producer table is snapshotted (as the server does periodically).
    Snapshot,
}

/// What one seed's run found and did.
#[derive(Default)]
struct RunStats {
    crashes: u64,
    acked_batches: u64,
    records_checked: u64,
    stale_erased: u64,
    bytes_truncated: u64,
}

struct Run {
    seed: u64,
    /// `SKIFF_POWER_LOSS_TRACE=1`: every step and outcome on stderr.
    trace: bool,
    /// Every batch the same size (as from a steady sensor), so a batch
    /// can end exactly where one of a crashed run starts.
    uniform: bool,
    /// Records stamped this long ago: older than the producer table's idle
    /// expiry in some seeds.
    age_ms: i64,
    rng: Rng,
    dir: tempfile::TempDir,
    disk: FaultDisk,
    storage: Storage,
    broker: Arc<Broker>,
    producers: Vec<Producer>,
    history: History,
    stats: RunStats,
}

fn storage_config(dir: &std::path::Path) -> StorageConfig {
    StorageConfig {
        data_dir: dir.to_path_buf(),
        append_queue_depth: 64,
        tail_buffer_bytes: 64 * 1024,
        max_partitions: 8,
        max_batch_bytes: 32 * 1024,
        prewrite_segments: false,
        observer: None,
        ..StorageConfig::default()
    }
}

fn options(dir: &std::path::Path) -> BrokerOptions {
    BrokerOptions {
        data_dir: dir.to_path_buf(),
        limits: BrokerLimits {
            max_topics: 4,
            max_partitions: 8,
            disk_budget_bytes: u64::MAX,
            max_producers: 64,
            producer_idle_expiry_ms: 3_600_000,
            producer_name_expiry_ms: 604_800_000,
        },
        defaults: PartitionConfig {
            segment_bytes: 64 * 1024,
            segments: 4,
            retention_ms: None,
            durability: Durability::Always,
            overflow: OverflowPolicy::Overwrite,
        },
        default_partitions: PARTITIONS,
        clock: Arc::new(SystemClock),
        cleaner: skiff::broker::cleaner::CleanerLimits::default(),
        internal_topics: Vec::new(),
    }
}

fn open(dir: &std::path::Path, disk: &FaultDisk) -> (Storage, Arc<Broker>) {
    let storage = Storage::open_with_backend(
        storage_config(dir),
        Box::new(FaultBackend::new(disk.clone())),
    )
    .expect("storage opens");
    let broker = Broker::open(storage.clone(), options(dir)).expect("broker opens");
    (storage, broker)
}

impl Run {
    fn new(seed: u64) -> Run {
        let mut rng = Rng(seed);
        // `SKIFF_POWER_LOSS_DIR`: where the runs' metadata files go (the
        // long mode puts them on a tmpfs: they are outside the simulated
        // crashes, and thousands of runs' fsyncs need not wear a disk).
        let base = std::env::var_os("SKIFF_POWER_LOSS_DIR").map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tmp"),
            std::path::PathBuf::from,
        );
        std::fs::create_dir_all(&base).expect("target/test-tmp");
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let mut disk = FaultDisk::new(rng.next(), FaultPlan::default());
        let uniform = rng.below(2) == 0;
        let age_ms = if rng.below(4) == 0 { 2 * 86_400_000 } else { 0 };
        if rng.below(2) == 0 {
            disk = disk.with_write_unit(512);
        }
        let (storage, broker) = open(dir.path(), &disk);
        block_on(broker.create_topic(TOPIC, &TopicSpec::default())).expect("create topic");
        let mut producers = Vec::new();
        for n in 0..PRODUCERS {
            let (id, epoch) = block_on(broker.init_producer(None)).expect("init producer");
            producers.push(Producer {
                n,
                id,
                epoch,
                next_seq: [0; PARTITIONS as usize],
                next_record: 0,
                retry: VecDeque::new(),
            });
        }
        Run {
            seed,
            trace: std::env::var_os("SKIFF_POWER_LOSS_TRACE").is_some(),
            uniform,
            age_ms,
            rng,
            dir,
            disk,
            storage,
            broker,
            producers,
            history: History::new(),
            stats: RunStats::default(),
        }
    }

    fn step(&mut self) -> Step {
        match self.rng.below(20) {
            0..=11 => Step::Produce,
            12..=15 => Step::CrashInFlight,
            16 => Step::CrashIdle,
            17 | 18 => Step::Restart,
            _ => Step::Snapshot,
        }
    }

    /// Sends one group of 1..=4 batches from random producers and awaits
    /// each: acked, answered as a retry of a written batch, or failed (then
    /// queued for retry).
    fn produce(&mut self) {
        let n = self.rng.range(1, 4);
        let mut sent = Vec::new();
        let mut group = self.broker.produce_group();
        for _ in 0..n {
            let p = self.rng.below(u64::from(PRODUCERS)) as usize;
            let (s, new) = self.producers[p].next_batch(&mut self.rng, self.uniform);
            if new {
                for i in 0..u64::from(s.records) {
                    self.history.sent(p as u32, s.first + i);
                }
            }
            let bytes = self.producers[p].encode(&s, self.age_ms);
            let r = block_on(group.produce(TOPIC, s.partition, bytes.into()));
            sent.push((p, s, r));
        }
        drop(group);
        let mut failed: Vec<(usize, Sent)> = Vec::new();
        for (p, s, r) in sent {
            let outcome = match r {
                Ok(f) => block_on(f),
                Err(e) => Err(e),
            };
            if self.trace {
                eprintln!("  p{p} {s:?}: {outcome:?}");
            }
            match outcome {
                Ok(a) => {
                    self.stats.acked_batches += 1;
                    let records = a.last_offset - a.base_offset + 1;
                    assert_eq!(
                        records,
                        u64::from(s.records),
                        "seed {}: an ack covers the batch's records",
                        self.seed
                    );
                    for i in 0..u64::from(s.records) {
                        self.history
                            .acked(p as u32, s.first + i, s.partition, a.base_offset + i);
                    }
                }
                // Written before the table's window: in the log, offsets
                // unknown.
                Err(BrokerError::Sequence(
                    skiff::broker::producers::SequenceError::Duplicate { .. },
                )) => {
                    for i in 0..u64::from(s.records) {
                        self.history.gave_up(p as u32, s.first + i);
                    }
                }
                Err(
                    BrokerError::PartitionFailed { .. }
                    | BrokerError::ShuttingDown
                    | BrokerError::Storage(_),
                ) => failed.push((p, s)),
                Err(e) => panic!(
                    "seed {}: producer {p}'s batch {s:?} refused: {e}",
                    self.seed
                ),
            }
        }
        // A failure fails the producer's later batches to that partition
        // too: retried in send order.
        for (p, s) in failed.into_iter().rev() {
            self.producers[p].retry.push_front(s);
        }
        for pr in &mut self.producers {
            let mut q: Vec<Sent> = pr.retry.drain(..).collect();
            q.sort_by_key(|s| (s.partition, s.base_seq));
            q.dedup_by_key(|s| (s.partition, s.base_seq));
            pr.retry = q.into();
        }
    }

    fn crash(&mut self) {
        self.stats.crashes += 1;
        self.disk.crash();
        // The process dies: nothing is closed or snapshotted.
        let _ = self.storage.shutdown();
        self.reopen();
    }

    fn reopen(&mut self) {
        self.disk.restart();
        self.disk.set_plan(FaultPlan::default());
        let (storage, broker) = open(self.dir.path(), &self.disk);
        for r in storage.recovery_report() {
            if self.trace {
                eprintln!("  recovered {r:?}");
            }
            assert!(
                !r.quarantined,
                "seed {}: a power cut quarantined {}: {:?}",
                self.seed, r.id, r.quarantine
            );
            self.stats.stale_erased += r.stale_erased;
            self.stats.bytes_truncated += r.bytes_truncated;
        }
        self.storage = storage;
        self.broker = broker;
    }

    fn run(mut self, steps: u64) -> RunStats {
        for _ in 0..steps {
            let step = self.step();
            if self.trace {
                eprintln!("{step:?}");
            }
            match step {
                Step::Produce => self.produce(),
                Step::CrashInFlight => {
                    self.disk.set_plan(FaultPlan {
                        sync_error_per_million: 1_000_000,
                        errno: libc::EIO,
                        ..FaultPlan::default()
                    });
                    self.produce();
                    self.crash();
                }
                Step::CrashIdle => self.crash(),
                Step::Restart => {
                    self.broker.close().expect("clean close");
                    self.reopen();
                }
                Step::Snapshot => self.broker.snapshot_producers(self.rng.below(2) == 0),
            }
        }
        // Everything still unacknowledged is retried on a healthy disk.
        for _ in 0..8 {
            if self.producers.iter().all(|p| p.retry.is_empty()) {
                break;
            }
            self.produce();
        }
        self.broker.close().expect("clean close");
        self.reopen();
        self.check();
        let _ = self.broker.close();
        self.stats
    }

    fn check(&mut self) {
        let mut read = Vec::new();
        let mut earliest = HashMap::new();
        for partition in 0..PARTITIONS {
            let id = PartitionId::new(TOPIC, partition);
            let o = self.storage.offsets(&id).expect("offsets");
            earliest.insert(partition, o.earliest);
            let mut at = o.earliest;
            while at < o.high_watermark {
                let bytes = block_on(self.storage.read(&id, at, 64 * 1024)).expect("read");
                assert!(!bytes.is_empty(), "seed {}: empty read at {at}", self.seed);
                for b in BatchIter::new(&bytes) {
                    let b = b.expect("a valid batch");
                    let v = BatchView::new(b.bytes).expect("verifies");
                    for r in v.records().expect("records") {
                        read.push(Seen {
                            partition,
                            offset: v.header.base_offset + u64::from(r.offset_delta),
                            value: r.value.expect("no tombstones here").to_vec(),
                        });
                    }
                    at = v.header.next_offset();
                }
            }
        }
        self.stats.records_checked += read.len() as u64;
        let history = self.history.snapshot();
        let report = checker::check(&history, &earliest, &read, &Served::default(), Gaps::Dense);
        assert!(
            report.is_ok(),
            "seed {} (replay: SKIFF_POWER_LOSS_SEED={}): {}\n{report:#?}",
            self.seed,
            self.seed,
            report.summary()
        );
        let unacked = history
            .values()
            .filter(|o| !matches!(o, Outcome::Acked { .. }))
            .count();
        assert!(report.unacked_present <= unacked);
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
    )
}

#[test]
fn power_loss_seeds_lose_and_duplicate_nothing() {
    let (from, seeds) = match env_u64("SKIFF_POWER_LOSS_SEED") {
        Some(s) => (s, 1),
        None => (
            env_u64("SKIFF_POWER_LOSS_FROM").unwrap_or(0),
            env_u64("SKIFF_POWER_LOSS_SEEDS").unwrap_or(16),
        ),
    };
    let steps = env_u64("SKIFF_POWER_LOSS_STEPS").unwrap_or(40);
    let next = AtomicU64::new(from);
    let totals = Mutex::new(RunStats::default());
    let failed = Mutex::new(Vec::new());
    let done = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= from + seeds {
                    return;
                }
                let r = std::panic::catch_unwind(|| Run::new(seed).run(steps));
                match r {
                    Ok(s) => {
                        let mut t = totals.lock().unwrap();
                        t.crashes += s.crashes;
                        t.acked_batches += s.acked_batches;
                        t.records_checked += s.records_checked;
                        t.stale_erased += s.stale_erased;
                        t.bytes_truncated += s.bytes_truncated;
                    }
                    Err(_) => failed.lock().unwrap().push(seed),
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 1000 == 0 {
                    eprintln!("power-loss: {n} of {seeds} seeds done");
                }
            });
        }
    });
    let t = totals.into_inner().unwrap();
    let mut failed = failed.into_inner().unwrap();
    failed.sort_unstable();
    println!(
        "power-loss: seeds {seeds} (from {from}), {steps} steps each, crashes {}, batches acked {}, \
         records checked {}, crashed-run batches erased {}, torn bytes truncated {}, \
         failing seeds {} {:?}",
        t.crashes,
        t.acked_batches,
        t.records_checked,
        t.stale_erased,
        t.bytes_truncated,
        failed.len(),
        &failed[..failed.len().min(20)],
    );
    assert!(
        failed.is_empty(),
        "failing seeds (replay one with SKIFF_POWER_LOSS_SEED=<n>): {failed:?}"
    );
}
