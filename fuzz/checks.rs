//! What each fuzz target checks, shared by the targets (fuzz/fuzz_targets)
//! and by the regression test that replays the seeds and every input a
//! fuzzer once crashed on (tests/fuzz_regressions.rs). A check panics only
//! on a real defect: a decoder may refuse any input, but never crash, and
//! what it accepts must survive a round trip.

#![allow(dead_code, reason = "each target uses one check")]

use skiff::protocol::{
    decode_request, decode_response, encode_request, encode_response, frame_error_response,
    frame_len, peek_correlation_id, FRAME_BYTES_MAX, FRAME_HEADER_BYTES,
};

/// The frame decoder, as the server and the client meet bytes: a length
/// prefix, then one CBOR item; and the bytes taken as a body as they are.
pub fn frame(data: &[u8]) {
    if let Ok(Some(n)) = frame_len(data, FRAME_BYTES_MAX) {
        body(&data[FRAME_HEADER_BYTES..n]);
    }
    body(data);
}

fn body(bytes: &[u8]) {
    let _ = peek_correlation_id(bytes);
    match decode_request(bytes) {
        Ok(request) => {
            let mut out = Vec::new();
            encode_request(&request, &mut out).expect("a decoded request encodes");
            let again =
                decode_request(&out[FRAME_HEADER_BYTES..]).expect("an encoded request decodes");
            assert_eq!(request, again, "a request survives a round trip");
        }
        Err(e) => {
            // What the server answers a malformed frame with must encode.
            let answer = frame_error_response(bytes, &e);
            encode_response(&answer, &mut Vec::new()).expect("an error answer encodes");
        }
    }
    if let Ok(response) = decode_response(bytes) {
        let mut out = Vec::new();
        encode_response(&response, &mut out).expect("a decoded response encodes");
        let again =
            decode_response(&out[FRAME_HEADER_BYTES..]).expect("an encoded response decodes");
        assert_eq!(response, again, "a response survives a round trip");
    }
}

/// The config parser and validation, on a file's text, and what
/// `skiff config check` prints for a config it accepts.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match skiff::config::Config::from_text("fuzz.toml", &text) {
        Ok(cfg) => {
            let report = skiff::config::check_report(&cfg);
            assert!(report.contains("total"), "the budget is printed");
        }
        Err(e) => {
            // The one-line error `serve` and `config check` print.
            assert!(!e.to_string().is_empty());
        }
    }
}

/// What one Kafka batch may decompress to, in the fuzz target: a bound the
/// decoder must hold whatever a compressed body claims.
const KAFKA_RECORD_BYTES_MAX: usize = 1024 * 1024;

/// The mirror's Kafka record-batch decoder, on bytes as a fetch answer's
/// records (from an upstream the gateway does not control).
pub fn kafka_records(data: &[u8]) {
    use skiff::mirror::kafka::records::decode_batches;
    let Ok(batches) = decode_batches(bytes::Bytes::copy_from_slice(data), KAFKA_RECORD_BYTES_MAX)
    else {
        return;
    };
    for b in &batches {
        let decoded: usize = b
            .records
            .iter()
            .map(|r| {
                r.key.as_ref().map_or(0, |k| k.len())
                    + r.value.as_ref().map_or(0, |v| v.len())
                    + r.headers.len()
            })
            .sum();
        assert!(
            decoded <= KAFKA_RECORD_BYTES_MAX + data.len(),
            "a batch decoded to {decoded} bytes, past the bound"
        );
    }
}

/// The batch parser, as storage meets a producer's batch and a consumer a
/// fetch answer: the header, the CRC, the records, a run of batches. What
/// verifies keeps verifying when the broker gives it another offset.
pub fn batch(data: &[u8]) {
    use skiff::batch::{
        count_records, end_offset, parse_header, verify, verify_and_assign_offset, BatchIter,
        BatchView,
    };
    let _ = parse_header(data);
    let _ = count_records(data);
    let _ = end_offset(data);
    for v in BatchIter::new(data) {
        match v {
            Ok(v) => {
                let _ = v.records();
            }
            Err(_) => break,
        }
    }
    let Ok(h) = verify(data) else { return };
    let one = &data[..h.total_len as usize];
    let view = BatchView::new(one).expect("a verified batch views");
    let _ = view.records();
    let mut moved = one.to_vec();
    if let Ok(m) = verify_and_assign_offset(&mut moved, 1_000) {
        assert_eq!(m.base_offset, 1_000);
        let again = verify(&moved).expect("a batch given an offset verifies");
        assert_eq!(again.record_count, h.record_count);
        assert_eq!(again.last_offset_delta, h.last_offset_delta);
    }
}

/// Segment size in the recovery target: the smallest the broker allows.
const RECOVERY_SEGMENT_BYTES: u64 = 64 * 1024;

/// The recovery scanner, on a segment file's bytes: a partition is created
/// on the fault-injecting disk, one of its two segment files replaced with
/// the input (after a valid segment header, or raw, by the first byte), and
/// the storage reopened. Recovery may refuse the directory or quarantine
/// the partition, but never crash; whatever it serves verifies; and a
/// partition it leaves writable takes an append and serves it back.
pub fn recovery(data: &[u8]) {
    use skiff::batch::{BatchBuilder, BatchIter, ProducerStamp};
    use skiff::storage::io::fault::{FaultBackend, FaultDisk, FaultPlan};
    use skiff::storage::{
        Durability, OverflowPolicy, PartitionConfig, PartitionId, Storage, StorageConfig,
        StorageError,
    };
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUN: AtomicU64 = AtomicU64::new(0);

    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!(
        "skiff-fuzz-recovery-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let unit = if mode & 1 == 0 { 4096 } else { 512 };
    let disk = FaultDisk::new(u64::from(mode), FaultPlan::default()).with_write_unit(unit);
    let cfg = StorageConfig {
        data_dir: dir.clone(),
        append_queue_depth: 8,
        tail_buffer_bytes: 64 * 1024,
        max_partitions: 2,
        max_batch_bytes: 32 * 1024,
        prewrite_segments: false,
        observer: None,
        ..StorageConfig::default()
    };
    let open =
        || Storage::open_with_backend(cfg.clone(), Box::new(FaultBackend::new(disk.clone())));
    let id = PartitionId::new("f", 0);
    let pcfg = PartitionConfig {
        segment_bytes: RECOVERY_SEGMENT_BYTES,
        segments: 2,
        retention_ms: None,
        durability: Durability::Always,
        overflow: OverflowPolicy::Overwrite,
    };
    let s = open().expect("a fresh data directory opens");
    futures_lite_block_on(s.create_partition(id.clone(), pcfg)).expect("create");
    s.shutdown().expect("shutdown");
    drop(s);

    let slot = usize::from(mode >> 1 & 1);
    let path = dir.join(format!("topics/f/0/seg-{slot:05}.log"));
    let mut file = if mode & 4 == 0 {
        // After slot 0's own header, which creation wrote.
        let mut f = disk
            .contents(&dir.join("topics/f/0/seg-00000.log"))
            .expect("slot 0");
        f.truncate(4096);
        f
    } else {
        Vec::new()
    };
    file.extend_from_slice(body);
    file.resize(RECOVERY_SEGMENT_BYTES as usize, 0);
    assert!(disk.put_file(&path, &file), "segment file exists");

    let s = match open() {
        Ok(s) => s,
        // A header of another version is refused by name, the directory
        // left as it is.
        Err(StorageError::UnsupportedVersion { .. }) => {
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        Err(e) => panic!("recovery failed instead of reporting: {e}"),
    };
    let report = s.recovery_report();
    let o = s.offsets(&id).expect("the partition is there");
    let mut at = o.earliest;
    while at < o.high_watermark {
        match futures_lite_block_on(s.read(&id, at, 64 * 1024)) {
            Ok(bytes) => {
                // A damaged range skipped at the log's end holds no batch:
                // a read there waits for the next, as one at the end does.
                let trailing_gap = report
                    .iter()
                    .flat_map(|r| &r.damaged)
                    .any(|d| d.from_offset <= at && d.to_offset == o.high_watermark);
                if bytes.is_empty() && trailing_gap {
                    break;
                }
                assert!(!bytes.is_empty(), "an empty read below the high watermark");
                let before = at;
                for v in BatchIter::new(&bytes) {
                    let v = v.expect("recovery serves only whole, verified batches");
                    at = v.header.next_offset();
                }
                assert!(at > before, "reads make progress");
            }
            Err(StorageError::Quarantined(_)) => break,
            Err(e) => panic!("a read after recovery failed: {e}"),
        }
    }
    let quarantined = report.iter().any(|r| r.quarantined);
    let mut b = BatchBuilder::new();
    b.push(1_700_000_000_000, None, b"after", &[]);
    let batch = b.finish(ProducerStamp::NONE);
    let checked = skiff::storage::CheckedBatch::check(batch).expect("a valid batch");
    let appended = futures_lite_block_on(async {
        s.submit(&id, checked, skiff::storage::Wake::Now)
            .await?
            .await
    });
    match appended {
        Ok(a) => {
            assert!(!quarantined, "a quarantined partition took a write");
            assert_eq!(a.base_offset, o.high_watermark, "appends go on at the end");
            let got = futures_lite_block_on(s.read(&id, a.base_offset, 64 * 1024))
                .expect("the append reads back");
            let first = BatchIter::new(&got)
                .next()
                .expect("a batch")
                .expect("valid");
            assert_eq!(first.header.base_offset, a.base_offset);
        }
        Err(StorageError::Quarantined(_)) => assert!(quarantined, "refused as quarantined"),
        Err(e) => panic!("an append after recovery failed: {e}"),
    }
    let _ = s.shutdown();
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a future to completion on this thread (the storage API is async;
/// its futures complete from the storage thread).
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}
