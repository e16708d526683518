//! Replays every fuzz target's seed corpus and every input a fuzzer once
//! found a crash with (fuzz/regressions/<target>/), through the same checks
//! the targets run (fuzz/checks.rs): a fixed crash stays fixed, and the
//! checks themselves are exercised by the ordinary test suite.
//!
//! `SKIFF_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_regressions write_seeds`
//! rewrites the generated seeds of `kafka_records`, `batch` and
//! `recovery`. The frame seeds are the protocol's samples and a few more,
//! kept in one place: `SKIFF_WRITE_FUZZ_SEEDS=1 cargo test --lib
//! every_operation_has_a_frame_seed` writes them, and checks them without
//! the variable. The config seeds (the embedded default and every
//! profile) likewise: `SKIFF_WRITE_FUZZ_SEEDS=1 cargo test --test
//! fuzz_regressions config_seeds_are_the_current_configs`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.expect("a directory entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "fuzz/seeds/{target} has seeds");
    for path in files {
        let data = std::fs::read(&path).expect("reading a fuzz input");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} fails its check",
            path.display()
        );
    }
}

#[test]
fn frame_inputs_pass() {
    replay("frame", checks::frame);
}

#[test]
fn config_inputs_pass() {
    replay("config", checks::config);
}

#[test]
fn kafka_records_inputs_pass() {
    replay("kafka_records", checks::kafka_records);
}

#[test]
fn batch_inputs_pass() {
    replay("batch", checks::batch);
}

#[test]
fn recovery_inputs_pass() {
    replay("recovery", checks::recovery);
}

#[test]
fn write_seeds() {
    if std::env::var_os("SKIFF_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    use skiff::batch::{BatchBuilder, ProducerStamp};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut bb = BatchBuilder::new();
    bb.push(1_700_000_000_000, Some(b"k"), b"v", &[("msg-id", b"e1")]);
    bb.push(1_700_000_000_001, None, b"", &[]);
    let batch = bb.finish(ProducerStamp::NONE);
    use skiff::mirror::kafka::records::ProducerStamp as KafkaStamp;
    use skiff::mirror::kafka::{BatchBuilder as KafkaBatch, Compression, HeaderRef, RecordRef};
    std::fs::create_dir_all(root.join("kafka_records")).expect("mkdir");
    for (name, compression) in [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        let mut b = KafkaBatch::new();
        let headers = [HeaderRef {
            key: "skiff.offset",
            value: Some(b"17"),
        }];
        for i in 0..3u8 {
            b.push(&RecordRef {
                key: Some(&[i]),
                value: Some(b"{\"c\": 21.5}"),
                timestamp_ms: 1_700_000_000_000 + i64::from(i),
                headers: &headers,
            })
            .expect("push");
        }
        let stamp = KafkaStamp {
            producer_id: 7,
            producer_epoch: 1,
            base_sequence: 0,
            transactional: true,
        };
        let mut two = b.finish(compression, stamp).expect("finish").to_vec();
        two.extend_from_slice(&b.finish(compression, KafkaStamp::NONE).expect("finish"));
        std::fs::write(root.join("kafka_records").join(name), two).expect("write");
    }
    // Batches: one plain, one idempotent with a gap inside, and a fetch
    // answer of both. Segments for recovery: the first byte is the mode
    // (checks::recovery), then the data after the segment header.
    std::fs::create_dir_all(root.join("batch")).expect("mkdir");
    std::fs::create_dir_all(root.join("recovery")).expect("mkdir");
    let mut gapped = BatchBuilder::new();
    gapped.push(1_700_000_000_000, Some(b"k"), b"first", &[]);
    gapped.skip_offsets(3);
    gapped.push(1_700_000_000_005, Some(b"k"), b"after a gap", &[]);
    let gapped = gapped.finish_with(
        ProducerStamp {
            producer_id: 3,
            producer_epoch: 1,
            base_sequence: 40,
        },
        7,
    );
    std::fs::write(root.join("batch/plain"), &batch).expect("write");
    std::fs::write(root.join("batch/gapped"), &gapped).expect("write");
    let mut run = batch.clone();
    skiff::batch::verify_and_assign_offset(&mut run, 2).expect("valid");
    let mut second = gapped.clone();
    skiff::batch::verify_and_assign_offset(&mut second, 4).expect("valid");
    run.extend_from_slice(&second);
    std::fs::write(root.join("batch/fetch-answer"), &run).expect("write");
    for (name, mode) in [("after-header", 0u8), ("sectors-512", 1), ("raw", 4)] {
        let mut seg = vec![mode];
        if mode & 4 != 0 {
            seg.extend_from_slice(b"SKSG");
        }
        let mut first = batch.clone();
        skiff::batch::verify_and_assign_offset(&mut first, 0).expect("valid");
        seg.extend_from_slice(&first);
        let mut next = gapped.clone();
        skiff::batch::verify_and_assign_offset(&mut next, 2).expect("valid");
        seg.extend_from_slice(&next);
        std::fs::write(root.join("recovery").join(name), seg).expect("write");
    }
}

/// A config seed kept by hand rather than generated: every optional
/// section in use.
const HAND_KEPT_CONFIG_SEEDS: &[&str] = &["features.toml"];

/// The config seeds copied from the configs themselves: the embedded
/// default, every profile, and a file that names a profile.
fn config_seeds() -> Vec<(String, Vec<u8>)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut seeds = vec![
        (
            "default.toml".to_owned(),
            read(&repo.join("src/config/default.toml")),
        ),
        (
            "with-profile.toml".to_owned(),
            b"profile = \"pi4-sd\"\n[server]\nmax_connections = 8\n".to_vec(),
        ),
    ];
    for e in std::fs::read_dir(repo.join("firmware-config")).expect("profiles") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "toml") {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            seeds.push((name, read(&p)));
        }
    }
    seeds
}

/// fuzz/seeds/config holds the default and the profiles as they are now,
/// byte for byte, and nothing else but the hand-kept seeds; every seed is
/// a config that loads, so the fuzzer starts from today's keys rather
/// than from errors. With `SKIFF_WRITE_FUZZ_SEEDS` it writes them.
#[test]
fn config_seeds_are_the_current_configs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/config");
    let write = std::env::var_os("SKIFF_WRITE_FUZZ_SEEDS").is_some();
    let seeds = config_seeds();
    let mut stale = Vec::new();
    for (file, bytes) in &seeds {
        let path = dir.join(file);
        if write {
            std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        } else if std::fs::read(&path).ok().as_ref() != Some(bytes) {
            stale.push(file.clone());
        }
    }
    let mut unknown: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| !seeds.iter().any(|(name, _)| name == f))
        .filter(|f| !HAND_KEPT_CONFIG_SEEDS.contains(&f.as_str()))
        .collect();
    unknown.sort();
    assert!(
        stale.is_empty() && unknown.is_empty(),
        "fuzz/seeds/config lacks or holds other bytes for {stale:?}, and holds {unknown:?} \
         that is neither a config nor hand-kept; write them with SKIFF_WRITE_FUZZ_SEEDS=1 \
         cargo test --test fuzz_regressions config_seeds_are_the_current_configs \
         (and remove the others)"
    );
    for path in inputs("config") {
        if path.parent().is_some_and(|p| p == dir) {
            let text = std::fs::read_to_string(&path).expect("a config seed");
            if let Err(e) = skiff::config::Config::from_text("seed.toml", &text) {
                panic!("{}: not a config today: {e}", path.display());
            }
        }
    }
}
