//! Windowed aggregates (harness = false): source records per second folded
//! into tumbling windows (value parsing included) for 1,000 keys and 2
//! fields, JSON objects and CBOR maps, and the heap one open window costs.
//!
//! `cargo bench --bench aggregate` (SKIFF_BENCH_QUICK=1 for a short run).
//! Each rate is the median of five runs of the same records, JSON and CBOR
//! alternating; the target is at least 1 M records/s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use skiff::mirror::aggregate::{PartitionAgg, Spec};

/// Counts live heap bytes, for the memory per open window.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a counter
// is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KEYS: usize = 1000;
const TARGET: f64 = 1_000_000.0;

fn spec() -> Arc<Spec> {
    Arc::new(Spec {
        window_ms: 10_000,
        lateness_ms: 5_000,
        fields: vec!["c".into(), "rh".into()],
        max_open_windows: 10_000,
    })
}

/// Every key reports once a second (1,000 records per second of event
/// time), in the order a gateway would write them.
fn records(n: usize, cbor: bool) -> Vec<(i64, Vec<u8>, Vec<u8>)> {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|i| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let key = format!("plant1/line{}/sensor{:04}", i % KEYS % 7, i % KEYS).into_bytes();
            let c = (rng % 4000) as f64 / 100.0 - 10.0;
            let rh = ((rng >> 20) % 1000) as f64 / 10.0;
            let value = if cbor {
                let mut buf = Vec::new();
                let mut e = minicbor::Encoder::new(&mut buf);
                e.map(4).unwrap();
                e.str("id").unwrap().u32(i as u32).unwrap();
                e.str("c").unwrap().f64(c).unwrap();
                e.str("rh").unwrap().f64(rh).unwrap();
                e.str("unit").unwrap().str("C").unwrap();
                buf
            } else {
                format!("{{\"id\":{i},\"c\":{c},\"rh\":{rh},\"unit\":\"C\"}}").into_bytes()
            };
            (1_700_000_000_000 + i as i64, key, value)
        })
        .collect()
}

/// Records per second for one pass over `recs` with a fresh partition.
fn fold_rate(recs: &[(i64, Vec<u8>, Vec<u8>)]) -> (f64, u64) {
    let mut agg = PartitionAgg::new(spec());
    let started = Instant::now();
    let mut windows = 0u64;
    for (offset, (ts, key, value)) in recs.iter().enumerate() {
        agg.fold(offset as u64, *ts, Some(key), Some(value));
        if agg.closed.len() >= 1024 {
            windows += agg.closed.len() as u64;
            agg.closed.clear();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    windows += agg.closed.len() as u64;
    assert_eq!(agg.counts.malformed, 0);
    assert_eq!(
        agg.counts.closed_early, 0,
        "the limit holds every key's windows"
    );
    (recs.len() as f64 / secs, windows)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let quick = std::env::var_os("SKIFF_BENCH_QUICK").is_some();
    let n = if quick { 200_000 } else { 2_000_000 };
    let runs = if quick { 3 } else { 5 };
    let json = records(n, false);
    let cbor = records(n, true);
    let (mut rj, mut rc) = (Vec::new(), Vec::new());
    let mut windows = 0;
    for _ in 0..runs {
        let (r, w) = fold_rate(&json);
        rj.push(r);
        windows = w;
        rc.push(fold_rate(&cbor).0);
    }
    for (name, rates) in [("json", rj), ("cbor", rc)] {
        let (med, min, max) = median(rates);
        println!(
            "aggregate {name}: {:.2} M records/s (min {:.2}, max {:.2}; {n} records, {KEYS} keys, 2 fields, {windows} windows) {}",
            med / 1e6,
            min / 1e6,
            max / 1e6,
            if med >= TARGET { "ok" } else { "BELOW TARGET 1 M/s" }
        );
    }

    // Memory: every key's window open (one record each), against the
    // empty partition state.
    let recs = records(KEYS, false);
    let before = LIVE.load(Ordering::Relaxed);
    let mut agg = PartitionAgg::new(spec());
    for (offset, (ts, key, value)) in recs.iter().enumerate() {
        agg.fold(offset as u64, *ts, Some(key), Some(value));
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let open = agg.open_windows();
    assert_eq!(open, KEYS);
    let key_len = recs[0].1.len();
    println!(
        "aggregate memory: {} B per open window ({open} windows of 2 fields, {key_len}-byte keys, all on the heap: key, window, close order, maps; {} B of it the window itself)",
        bytes / open,
        skiff::mirror::aggregate::bytes_per_window(2)
    );
}
