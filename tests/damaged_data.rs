//! Damaged data inside the durable log, through the real binary: recovery
//! skips the damaged batch and serves everything on both sides of it, the
//! partition keeps taking writes, `skiff topics describe` and the metrics
//! show the lost offsets, an idempotent producer whose batch was lost goes
//! on (and its retries are still duplicates), and a group whose committed
//! offset lies in the lost range moves on to the next record.

mod common;

use std::time::Duration;

use common::*;
use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::client::blocking;
use skiff::protocol::{CreateTopicRequest, ErrorCode, ProducePartition, ProducePartitionResult};

const TOPIC: &str = "dmg";

fn batch(value: &str, id: u64, seq: i32) -> ProducePartition<'static> {
    let mut b = BatchBuilder::new();
    b.push(1_700_000_000_000, None, value.as_bytes(), &[]);
    ProducePartition {
        topic: TOPIC.into(),
        partition: 0,
        batch: b
            .finish(ProducerStamp {
                producer_id: id,
                producer_epoch: 0,
                base_sequence: seq,
            })
            .into(),
    }
}

fn send(c: &blocking::Client, value: &str, id: u64, seq: i32) -> ProducePartitionResult {
    c.produce_raw(vec![batch(value, id, seq)])
        .expect("produce")
        .remove(0)
}

#[track_caller]
fn written(r: &ProducePartitionResult, offset: u64, duplicates: u32) {
    assert_eq!(r.error, ErrorCode::None, "{r:?}");
    assert_eq!(
        (r.base_offset, r.duplicate_records),
        (offset, duplicates),
        "{r:?}"
    );
}

/// The file positions where the segment's batches begin.
fn batch_starts(seg: &[u8]) -> Vec<usize> {
    let mut at = 4096;
    let mut out = Vec::new();
    while at + 64 <= seg.len() && &seg[at..at + 4] == b"SKB1" {
        out.push(at);
        let len = u32::from_le_bytes(seg[at + 8..at + 12].try_into().unwrap()) as usize;
        at += len;
    }
    out
}

/// A broker with `extra` config and the one-partition topic, and a client.
fn with_topic(extra: &str) -> (Broker, blocking::Client) {
    let b = Broker::start(extra);
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    c.create_topic(CreateTopicRequest {
        name: TOPIC.into(),
        partitions: Some(1),
        ..CreateTopicRequest::default()
    })
    .expect("create");
    (b, c)
}

#[test]
fn a_damaged_batch_is_skipped_and_everything_else_served() {
    let (mut b, c) = with_topic("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let a = c.init_producer(None).expect("init").producer_id;
    let z = c.init_producer(None).expect("init").producer_id;
    // a: offsets 0..=5 (sequences 0..=5); z: offsets 6..=9.
    for seq in 0..6 {
        written(&send(&c, &format!("a{seq}"), a, seq), seq as u64, 0);
    }
    for seq in 0..4 {
        written(&send(&c, &format!("z{seq}"), z, seq), 6 + seq as u64, 0);
    }
    // The checkpoint (refreshed each second while data flows) comes to
    // cover them: damage before it is inside durable data.
    std::thread::sleep(Duration::from_millis(1200));
    written(&send(&c, "z4", z, 4), 10, 0);
    std::thread::sleep(Duration::from_millis(1200));
    written(&send(&c, "z5", z, 5), 11, 0);
    drop(c);
    // kill -9: no producer snapshot at the stop, so the producer table is
    // rebuilt from the log, where a's last batch is lost.
    b.kill9();
    let seg = b.data_dir().join(format!("{TOPIC}/0/seg-00000.log"));
    let seg = if seg.exists() {
        seg
    } else {
        b.data_dir().join(format!("topics/{TOPIC}/0/seg-00000.log"))
    };
    let mut bytes = std::fs::read(&seg).expect("segment");
    let starts = batch_starts(&bytes);
    assert_eq!(starts.len(), 12, "{starts:?}");
    // A bit in the body of offset 5 (a's sequence 5).
    bytes[starts[5] + 70] ^= 0x04;
    std::fs::write(&seg, &bytes).expect("segment");
    b.restart();

    let log = b.log();
    assert!(
        log.contains("damaged data at segment slot 0") && log.contains("offsets 5..6 lost"),
        "{log}"
    );
    assert!(!log.contains("QUARANTINED"), "{log}");
    // Everything intact on both sides of it is served.
    let values: Vec<String> = read_log(&b)
        .iter()
        .map(|r| format!("{}@{}", String::from_utf8_lossy(&r.value), r.offset))
        .collect();
    assert_eq!(
        values,
        [
            "a0@0", "a1@1", "a2@2", "a3@3", "a4@4", "z0@6", "z1@7", "z2@8", "z3@9", "z4@10",
            "z5@11"
        ]
    );

    // `topics describe` shows the gap, as text and as JSON.
    let o = b.cli(&["topics", "describe", TOPIC]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("damaged: offsets 5..6 lost"),
        "{}",
        stdout(&o)
    );
    let o = b.cli(&["topics", "describe", TOPIC, "--format", "json"]);
    assert_ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let d = &j["partitions"][0]["damaged"][0];
    assert_eq!(
        (d["from_offset"].as_u64(), d["to_offset"].as_u64()),
        (Some(5), Some(6))
    );
    assert_eq!(
        d["bytes"].as_u64(),
        Some((starts[6] - starts[5]) as u64),
        "{d}"
    );
    assert!(d["found_ms"].as_i64().unwrap() > 1_700_000_000_000, "{d}");
    let metrics = http_get(&b.metrics_addr(), "/metrics");
    assert!(
        metrics.contains("skiff_recovery_damaged_offsets_total 1"),
        "{metrics}"
    );

    // Idempotent producers: a lost its sequence 5 with the batch, and goes
    // on at 6; its retries of what survived are still duplicates. z, whose
    // last batch survived, is checked exactly as before.
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    written(&send(&c, "a4", a, 4), 4, 1);
    written(&send(&c, "a6", a, 6), 12, 0);
    written(&send(&c, "a6", a, 6), 12, 1);
    let r = send(&c, "a9", a, 9);
    assert_eq!(r.error, ErrorCode::OutOfOrderSequence, "{r:?}");
    written(&send(&c, "z5", z, 5), 11, 1);
    let r = send(&c, "z7", z, 7);
    assert_eq!(r.error, ErrorCode::OutOfOrderSequence, "{r:?}");
    written(&send(&c, "z6", z, 6), 13, 0);

    // A group committed inside the lost range moves on to the next record.
    let consume = || {
        let o = b.cli(&[
            "consume",
            TOPIC,
            "--group",
            "g",
            "--from",
            "earliest",
            "--format",
            "json",
            "--timeout-ms",
            "1000",
        ]);
        assert_ok(&o);
        o
    };
    consume();
    let o = b.cli(&[
        "groups",
        "reset-offsets",
        "g",
        "--topic",
        TOPIC,
        "--to",
        "5",
    ]);
    assert_ok(&o);
    let o = consume();
    let first = stdout(&o).lines().next().unwrap_or_default().to_owned();
    let first: serde_json::Value = serde_json::from_str(&first).expect("a json line");
    assert_eq!(first["offset"].as_u64(), Some(6), "{first}");

    // The next start finds the same damage, and the same answers.
    assert_eq!(b.stop(), Some(0));
    b.restart();
    let o = b.cli(&["topics", "describe", TOPIC]);
    assert!(
        stdout(&o).contains("damaged: offsets 5..6 lost"),
        "{}",
        stdout(&o)
    );
    assert_eq!(read_log(&b).len(), 13);
    assert_eq!(b.stop(), Some(0));
}

/// Damage at the very end of the log (the active segment cut short after
/// a clean stop): a fetch in the lost range finds no batch after it, and
/// used to answer nothing below the high watermark, so a consumer there
/// waited for new data forever. It now moves past the range: a pipe gets
/// the log to its end and exits, and a consumer reaches the high
/// watermark, then reads what comes after.
#[test]
fn a_consumer_behind_damage_at_the_log_end_reaches_the_end() {
    let (mut b, c) = with_topic("");
    for i in 0..8 {
        written(&send(&c, &format!("v{i}"), u64::MAX, -1), i, 0);
    }
    drop(c);
    // A clean stop: the checkpoint says all eight batches were durable.
    assert_eq!(b.stop(), Some(0));
    let seg = b.data_dir().join(format!("topics/{TOPIC}/0/seg-00000.log"));
    let starts = batch_starts(&std::fs::read(&seg).expect("segment"));
    assert_eq!(starts.len(), 8, "{starts:?}");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("segment");
    f.set_len(starts[5] as u64 + 10).expect("truncate");
    drop(f);
    b.restart();
    let log = b.log();
    assert!(log.contains("offsets 5..8 lost"), "{log}");

    // `skiff consume` into a pipe stops at the end of the log.
    let child = skiff_command()
        .args(["consume", TOPIC, "--partition", "0", "--broker", &b.tcp])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("skiff consume");
    let o = exited_within(child, Duration::from_secs(20)).unwrap_or_else(|o| {
        panic!(
            "skiff consume did not stop at the log's end; printed {:?}",
            stdout(&o)
        )
    });
    assert_ok(&o);
    assert_eq!(stdout(&o), "v0\nv1\nv2\nv3\nv4\n");

    // A consumer reaches the high watermark (read_log waits for that).
    let values = |log: Vec<skiff::client::ConsumerRecord>| -> Vec<String> {
        log.iter()
            .map(|r| format!("{}@{}", String::from_utf8_lossy(&r.value), r.offset))
            .collect()
    };
    assert_eq!(
        values(read_log(&b)),
        ["v0@0", "v1@1", "v2@2", "v3@3", "v4@4"]
    );
    // A share group moves past the gap as well.
    smol::block_on(async {
        let client = skiff::client::Client::connect(&b.tcp)
            .await
            .expect("connect");
        let config = skiff::client::ShareConfig {
            max_records: 100,
            max_wait: Duration::from_millis(200),
            from_earliest: true,
            ..Default::default()
        };
        let w = skiff::client::ShareConsumer::new(client, "g", TOPIC, config);
        let mut got = 0;
        while got < 5 {
            got += w.poll().await.expect("poll").len();
        }
        assert!(w.poll().await.expect("poll").is_empty());
    });
    let o = b.cli(&["share-groups", "describe", "g", "--format", "json"]);
    assert_ok(&o);
    let d: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(d["partitions"][0]["next"], 8, "{d}");
    // No offset is given twice: the next record goes on at 8.
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    written(&send(&c, "v8", u64::MAX, -1), 8, 0);
    assert_eq!(
        values(read_log(&b)),
        ["v0@0", "v1@1", "v2@2", "v3@3", "v4@4", "v8@8"]
    );
    assert_eq!(b.stop(), Some(0));
}

/// The child's output once it exits within `limit`; killed at `limit`,
/// its output so far as the error.
fn exited_within(
    mut child: std::process::Child,
    limit: Duration,
) -> Result<std::process::Output, std::process::Output> {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(child.wait_with_output().expect("output"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output().expect("output"))
}

/// Every record from the earliest offset to the high watermark (which
/// counts the lost offsets too: `common::consume_all` counts records).
fn read_log(b: &Broker) -> Vec<skiff::client::ConsumerRecord> {
    let client = blocking::Client::connect(&b.tcp).expect("connect");
    let hw = client.describe_topic(TOPIC).expect("describe").partitions[0].latest_offset;
    let mut consumer = blocking::Consumer::new(
        &client,
        skiff::client::ConsumerConfig {
            max_wait: Duration::from_millis(100),
            ..skiff::client::ConsumerConfig::default()
        },
    );
    consumer
        .assign(TOPIC, None, skiff::client::StartFrom::Earliest)
        .expect("assign");
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consumer.position(TOPIC, 0).unwrap_or(0) < hw {
        assert!(std::time::Instant::now() < deadline, "read {records:?}");
        records.extend(consumer.poll().expect("poll"));
    }
    records
}

/// Runs `skiff serve` on `b`'s config, its data directory without
/// `topics.meta`, and checks that it refuses to start, counting `held`
/// partitions on disk.
#[track_caller]
fn refused_without_topics_meta(b: &Broker, held: usize) {
    let serve = common::skiff_command()
        .args(["serve", "--config"])
        .arg(&b.config_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("skiff serve");
    let o = exited_within(serve, Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("skiff serve started without topics.meta"));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("topics.meta: ") && err.contains(&format!("holds {held} partition(s)")),
        "{err}"
    );
}

/// A lost `topics.meta`: read as an empty table, every partition on disk
/// looked like a deleted topic's leftover and was deleted. Now start-up
/// refuses, naming the file, and with it restored every record is there.
#[test]
fn a_lost_topics_meta_stops_start_up_and_deletes_nothing() {
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "2"]));
    assert_ok(&b.cli(&["produce", "t1", "--partition", "1", "kept"]));
    assert_eq!(b.stop(), Some(0));
    let table = b.data_dir().join("topics.meta");
    let saved = std::fs::read(&table).unwrap();
    std::fs::remove_file(&table).unwrap();
    refused_without_topics_meta(&b, 2);
    assert!(b.data_dir().join("topics/t1/1/partition.meta").exists());
    // With the table back, the data is all there.
    std::fs::write(&table, saved).unwrap();
    b.restart();
    let o = b.cli(&["consume", "t1", "--partition", "1"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "kept\n");
}

/// A partition recovery quarantines (here: its one segment's header is
/// damaged) is one event in the log, one error line saying what was
/// recovered and why it is read-only; the partition's own line used to
/// say it again.
#[test]
fn a_partition_quarantined_at_start_up_is_logged_once() {
    let (mut b, c) = with_topic("");
    let id = c.init_producer(None).expect("init").producer_id;
    written(&send(&c, "v", id, 0), 0, 0);
    drop(c);
    assert_eq!(b.stop(), Some(0));
    let seg = b.data_dir().join(format!("topics/{TOPIC}/0/seg-00000.log"));
    let mut bytes = std::fs::read(&seg).expect("segment");
    // In the header's base offset.
    bytes[16] ^= 0x10;
    std::fs::write(&seg, bytes).expect("segment");
    b.restart();
    let log = b.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("quarantined"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("ERROR")
            && lines[0].contains(&format!("recovered partition {TOPIC}/0: offsets"))
            && lines[0].contains("QUARANTINED (read-only): "),
        "{log}"
    );
    assert_eq!(b.stop(), Some(0), "{}", b.log());
}

/// A lost `partition.meta` (QA report, finding 2): start-up used to take
/// the directory for a creation cut short and delete its acknowledged
/// records, then give their offsets again. Now the partition is
/// quarantined: its records are served, writes are refused with the
/// reason, the log names the directory, and nothing is deleted.
/// `skiff_storage_quarantined_partitions` counts them until their topic
/// is deleted (no metric did while serving).
#[test]
fn a_lost_partition_meta_quarantines_instead_of_deleting() {
    let mut b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "3"]));
    let lines: String = (0..27).map(|i| format!("r{i}\n")).collect();
    for p in ["1", "2"] {
        let args = ["produce", "t1", "--partition", p];
        assert_ok(&b.cli_stdin(&args, Some(lines.as_bytes())));
    }
    assert_eq!(b.stop(), Some(0));
    let dir = b.data_dir().join("topics/t1/1");
    std::fs::remove_file(dir.join("partition.meta")).unwrap();
    // A damaged one is quarantined likewise (it used to stop start-up
    // with "topic 't1' already exists").
    let damaged = b.data_dir().join("topics/t1/2/partition.meta");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&damaged, bytes).unwrap();
    b.restart();
    let log = b.log();
    let missing = format!(
        "partition directory {}: partition.meta is missing",
        dir.display()
    );
    assert!(log.contains(&missing), "{log}");
    assert!(!log.contains("removing incomplete"), "{log}");
    for p in ["1", "2"] {
        let args = [
            "produce",
            "t1",
            "--partition",
            p,
            "--retry-timeout-ms",
            "1000",
        ];
        let o = b.cli(&[&args[..], &["new"]].concat());
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains("partition_quarantined"), "{err}");
        let o = b.cli(&["consume", "t1", "--partition", p, "--format", "json"]);
        assert_ok(&o);
        let got = json_lines(&o);
        assert_eq!(got.len(), 27);
        assert_eq!(got[26]["offset"], 26);
        assert_eq!(got[26]["value"], "r26");
    }
    // The other partition of the topic is untouched.
    assert_ok(&b.cli(&["produce", "t1", "--partition", "0", "fine"]));
    assert!(dir.join("seg-00000.log").exists());
    let quarantined = |b: &Broker| {
        let metrics = http_get(&b.metrics_addr(), "/metrics");
        sample(&metrics, "skiff_storage_quarantined_partitions", "")
    };
    assert_eq!(quarantined(&b), Some(2.0));
    assert_ok(&b.cli(&["topics", "delete", "t1"]));
    assert_eq!(quarantined(&b), Some(0.0));
}

/// A partition whose `partition.meta` is damaged and whose segments hold
/// no valid header either: nothing to read its config from, so it is not
/// loaded. It used to answer `unknown_partition` to clients of a topic
/// that names it; now every request about it gets `partition_quarantined`
/// naming both faults, the log names the directory, and nothing in it is
/// changed (deleting the topic removes it).
#[test]
fn a_partition_without_meta_or_segment_header_is_quarantined_not_unknown() {
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "2"]));
    assert_ok(&b.cli(&["produce", "t1", "--partition", "1", "kept"]));
    assert_eq!(b.stop(), Some(0));
    let dir = b.data_dir().join("topics/t1/1");
    let damaged = make_unloadable(&dir);
    b.restart();
    let log = b.log();
    assert!(
        log.contains(&format!(
            "partition directory {}: no valid segment header",
            dir.display()
        )),
        "{log}"
    );
    let said = "partition.meta unreadable";
    let o = b.cli(&[
        "produce",
        "t1",
        "--partition",
        "1",
        "--retry-timeout-ms",
        "1000",
        "new",
    ]);
    assert_fails(&o, 1, &["partition_quarantined", said]);
    // The answers carry the reason too, and consume shows it: the fetch's
    // (from an offset) and the offset lookup's (from the earliest).
    for from in ["0", "earliest"] {
        let o = b.cli(&[
            "consume",
            "t1",
            "--partition",
            "1",
            "--from",
            from,
            "--timeout-ms",
            "500",
        ]);
        assert_fails(
            &o,
            1,
            &["partition_quarantined: partition t1/1 is quarantined", said],
        );
    }
    // So do describe's, and `topics describe` shows the reason, not a
    // pointer to the log.
    let o = b.cli(&["topics", "describe", "t1", "--format", "json"]);
    assert_ok(&o);
    let d: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(d["partitions"][1]["error"], "partition_quarantined", "{d}");
    let m = d["partitions"][1]["message"].as_str().unwrap_or_default();
    assert!(
        m.starts_with("partition t1/1 is quarantined") && m.contains(said),
        "{d}"
    );
    assert_eq!(
        d["partitions"][0]["message"],
        serde_json::Value::Null,
        "{d}"
    );
    let o = b.cli(&["topics", "describe", "t1"]);
    assert_ok(&o);
    let text = stdout(&o);
    assert!(
        text.contains(
            "partition 1: earliest 0 latest 0\n  error: partition_quarantined: partition t1/1 \
             is quarantined"
        ) && text.contains(said),
        "{text}"
    );
    assert!(!text.contains("log says why"), "{text}");
    assert!(
        !text.contains("partition 0: earliest 0 latest 0\n  error"),
        "{text}"
    );
    // The metadata and describe_topic answers' partition results carry it.
    let c = blocking::Client::connect(&b.tcp).expect("connect");
    let topics = c.metadata(Some(&["t1"])).expect("metadata");
    let described = c.describe_topic("t1").expect("describe_topic");
    for parts in [&topics[0].partitions, &described.partitions] {
        assert_eq!(parts[1].error, ErrorCode::PartitionQuarantined);
        let m = parts[1].message.as_deref().unwrap_or_default();
        assert!(
            m.starts_with("partition t1/1 is quarantined") && m.contains(said),
            "{parts:?}"
        );
        assert_eq!(parts[0].message, None, "{parts:?}");
    }
    assert_eq!(topics[0].message, None);
    // A topic-level error carries its reason too.
    let topics = c.metadata(Some(&["nope"])).expect("metadata");
    assert_eq!(topics[0].error, ErrorCode::UnknownTopic);
    assert!(
        topics[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("nope"),
        "{topics:?}"
    );
    drop(c);
    // The topic's other partition serves as ever.
    assert_ok(&b.cli(&["produce", "t1", "--partition", "0", "fine"]));
    for (path, seg) in &damaged {
        assert_eq!(&std::fs::read(path).unwrap(), seg, "{}", path.display());
    }
    assert_ok(&b.cli(&["topics", "delete", "t1"]));
    assert!(!dir.exists());
}

/// A topic delete the stop cut short (topics.meta written without the
/// topic, its partition directories still there) where one partition
/// cannot be loaded. Start-up deleted only the loaded leftovers, so the
/// unloadable directory stayed and creating the name again was refused
/// (`topic_exists`, storage finding the directory). Now it goes too; the
/// other topic is untouched.
#[test]
fn an_interrupted_delete_removes_an_unloadable_partition_too() {
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "kept", "--partitions", "2"]));
    assert_ok(&b.cli(&["produce", "kept", "--partition", "1", "k1"]));
    assert_eq!(b.stop(), Some(0));
    // The table as the delete of t1 writes it: without t1.
    let table = b.data_dir().join("topics.meta");
    let without_t1 = std::fs::read(&table).unwrap();
    b.restart();
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "2"]));
    assert_ok(&b.cli(&["produce", "t1", "--partition", "0", "old0"]));
    assert_ok(&b.cli(&["produce", "t1", "--partition", "1", "old1"]));
    assert_eq!(b.stop(), Some(0));
    std::fs::write(&table, without_t1).unwrap();
    let t1 = b.data_dir().join("topics/t1");
    make_unloadable(&t1.join("1"));
    let kept = b.data_dir().join("topics/kept");
    let kept_files: Vec<(std::path::PathBuf, Vec<u8>)> = ["0", "1"]
        .iter()
        .flat_map(|p| std::fs::read_dir(kept.join(p)).unwrap())
        .map(|e| e.unwrap().path())
        // The checkpoint, recovery's hint, is the running broker's to
        // rewrite (about once a second); the data and its meta are not.
        .filter(|p| p.is_file() && !p.ends_with("checkpoint.meta"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    b.restart();
    let log = b.log();
    assert!(log.contains("deleting partition t1/1 (not loaded"), "{log}");
    assert!(!t1.exists(), "{}", t1.display());
    // The name is free again, and the new topic starts empty.
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "2"]));
    for p in ["0", "1"] {
        new_partition_starts_empty(&b, "t1", p);
    }
    // Nothing of the other topic was touched by the start-up.
    for (path, bytes) in &kept_files {
        let now = std::fs::read(path).unwrap();
        assert!(&now == bytes, "{} changed", path.display());
    }
    let o = b.cli(&["consume", "kept", "--partition", "1"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "k1\n");
}

/// A missing topics.meta beside only unloadable partitions: they are data
/// all the same, so start-up stops as it does beside loaded ones, instead
/// of reading an empty table and deleting them as leftovers.
#[test]
fn a_lost_topics_meta_beside_an_unloadable_partition_deletes_nothing() {
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "1"]));
    assert_ok(&b.cli(&["produce", "t1", "kept"]));
    assert_eq!(b.stop(), Some(0));
    let dir = b.data_dir().join("topics/t1/0");
    let damaged = make_unloadable(&dir);
    std::fs::remove_file(b.data_dir().join("topics.meta")).unwrap();
    refused_without_topics_meta(&b, 1);
    for (path, seg) in &damaged {
        assert_eq!(&std::fs::read(path).unwrap(), seg, "{}", path.display());
    }
    assert!(dir.join("partition.meta").exists());
}

/// A partition directory whose partition.meta names another partition (a
/// directory copied or renamed by hand, say a restored backup) is skipped
/// at start-up and never deleted: it may hold data. Creating the topic its
/// path names is refused, naming the directory and what to do, as
/// storage_failed; it used to be topic_exists, for a topic no listing
/// showed.
#[test]
fn a_leftover_directory_in_the_way_of_a_create_is_named() {
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "a"]));
    assert_ok(&b.cli(&["produce", "a", "--partition", "0", "x"]));
    assert_eq!(b.stop(), Some(0));
    let copied = b.data_dir().join("topics/b/0");
    std::fs::create_dir_all(&copied).unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(b.data_dir().join("topics/a/0")).unwrap() {
        let from = e.unwrap().path();
        let to = copied.join(from.file_name().unwrap());
        std::fs::copy(&from, &to).unwrap();
        files.push((to.clone(), std::fs::read(&to).unwrap()));
    }
    b.restart();
    let log = b.log();
    assert!(log.contains("holds metadata for a/0; skipped"), "{log}");
    assert_eq!(stdout(&b.cli(&["topics", "list"])), "a\n");
    let o = b.cli(&["topics", "create", "b"]);
    let dir = copied.to_str().unwrap();
    assert_fails(
        &o,
        1,
        &[
            "storage_failed",
            dir,
            "no topic 'b' is listed",
            "move it out of the data_dir",
        ],
    );
    assert!(!stderr(&o).contains("topic_exists"), "{}", stderr(&o));
    // Nothing was created over it, and nothing else changed.
    for (path, bytes) in &files {
        assert!(&std::fs::read(path).unwrap() == bytes, "{}", path.display());
    }
    assert_eq!(stdout(&b.cli(&["topics", "list"])), "a\n");
    assert_eq!(stdout(&b.cli(&["consume", "a", "--partition", "0"])), "x\n");
    // Moved away, the name is free.
    assert_eq!(b.stop(), Some(0));
    std::fs::remove_dir_all(b.data_dir().join("topics/b")).unwrap();
    b.restart();
    assert_ok(&b.cli(&["topics", "create", "b"]));
}

/// An empty partition directory (a creation cut short) that a create of
/// its topic cannot remove: the create used to go on into it and fail
/// with a bare I/O error. Now it is refused as storage_failed naming the
/// directory, leaving nothing behind, and once it can go the create
/// removes it and succeeds.
#[test]
fn an_empty_directory_a_create_cannot_remove_is_named() {
    let b = Broker::start("");
    let dir = b.data_dir().join("topics/b/1");
    std::fs::create_dir_all(&dir).unwrap();
    {
        let _held = Immutable::set(&dir);
        let o = b.cli(&["topics", "create", "b", "--partitions", "2"]);
        assert_fails(
            &o,
            1,
            &[
                "storage_failed",
                dir.to_str().unwrap(),
                "no topic 'b' is listed",
            ],
        );
        assert!(b
            .log()
            .contains("could not remove incomplete partition directory"));
        assert!(!b.data_dir().join("topics/b/0").exists());
        assert_eq!(stdout(&b.cli(&["topics", "list"])), "");
    }
    assert_ok(&b.cli(&["topics", "create", "b", "--partitions", "2"]));
    new_partition_starts_empty(&b, "b", "1");
}

/// Makes `path` immutable (`chattr +i`): not even root may then remove
/// anything in it, as a read-only or failing file system would refuse.
/// Undone on drop, so the test's directory can go.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Immutable {
        let o = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .output()
            .expect("chattr (e2fsprogs)");
        assert!(o.status.success(), "chattr +i {}: {o:?}", path.display());
        Immutable(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// Produces one record to `topic`/`partition` and reads it back at
/// offset 0: nothing of an earlier topic of the name is there.
#[track_caller]
fn new_partition_starts_empty(b: &Broker, topic: &str, partition: &str) {
    let at = ["--partition", partition];
    assert_ok(&b.cli(&[&["produce", topic][..], &at, &["--key", "k", "new"]].concat()));
    let o = b.cli(&[&["consume", topic][..], &at, &["--format", "json"]].concat());
    assert_ok(&o);
    let got = json_lines(&o);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (&got[0]["offset"], &got[0]["value"]),
        (&0.into(), &"new".into())
    );
}

fn holds(file: &std::path::Path, name: &str) -> bool {
    let bytes = std::fs::read(file).unwrap_or_default();
    bytes.windows(name.len()).any(|w| w == name.as_bytes())
}

/// A topic delete whose storage cannot remove one partition directory:
/// it used to stop there, leaving the later partitions loaded with no
/// topic listed and the topic's dedup window and cleanup settings behind,
/// answering a bare I/O error. Now the other partitions and settings go,
/// the error names the directory left, a create of the name is refused
/// naming it while it stays, and once it can go a create removes it.
#[test]
fn a_delete_that_cannot_remove_a_partition_finishes_the_rest_and_names_it() {
    let mut b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    assert_ok(&b.cli(&[
        "topics",
        "create",
        "doomed",
        "--partitions",
        "3",
        "--msg-id-window-records",
        "10",
        "--cleanup",
        "compact",
    ]));
    for p in ["0", "1", "2"] {
        let args = ["produce", "doomed", "--partition", p, "--key", "k", "old"];
        assert_ok(&b.cli(&args));
    }
    let series = "topic=\"doomed\"";
    assert!(http_get(&b.metrics_addr(), "/metrics").contains(series));
    let topic = b.data_dir().join("topics/doomed");
    let stuck = topic.join("1");
    let stuck_name = stuck.to_str().unwrap();
    {
        let _held = Immutable::set(&stuck);
        let o = b.cli(&["topics", "delete", "doomed"]);
        assert_fails(
            &o,
            1,
            &[
                "storage_failed",
                "topic 'doomed' is deleted",
                "partition 1: ",
                stuck_name,
                "refuses to create 'doomed' while they stay",
            ],
        );
        assert!(!topic.join("0").exists());
        assert!(!topic.join("2").exists());
        assert!(stuck.join("partition.meta").exists());
        assert!(!stdout(&b.cli(&["topics", "list"])).contains("doomed"));
        for file in ["msgid.meta", "cleanup.meta"] {
            assert!(!holds(&b.data_dir().join(file), "doomed"), "{file}");
        }
        assert!(!http_get(&b.metrics_addr(), "/metrics").contains(series));
        // While it stays, a create is refused, naming it, and leaves
        // nothing behind.
        let o = b.cli(&["topics", "create", "doomed", "--partitions", "3"]);
        assert_fails(
            &o,
            1,
            &["storage_failed", stuck_name, "no topic 'doomed' is listed"],
        );
        assert!(!topic.join("0").exists());
        assert!(!stdout(&b.cli(&["topics", "list"])).contains("doomed"));
    }
    // Once it can go, a create deletes it first and starts afresh.
    assert_ok(&b.cli(&["topics", "create", "doomed", "--partitions", "3"]));
    new_partition_starts_empty(&b, "doomed", "1");
    assert!(b
        .log()
        .contains("deleted partition doomed/1, left by an earlier delete"));
    assert_eq!(b.stop(), Some(0));
}

/// A topic delete that cannot rewrite `msgid.meta` or `cleanup.meta`
/// without the topic: the topic is gone from the listing all the same, so
/// its metrics go too (a delete that answered a bare error left them),
/// and the answer is `storage_failed` saying the topic is deleted and
/// naming the file.
#[test]
fn a_delete_that_cannot_rewrite_a_settings_file_still_drops_the_topic() {
    let mut b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    for (topic, file, flags) in [
        ("windowed", "msgid.meta", ["--msg-id-window-records", "10"]),
        ("compacted", "cleanup.meta", ["--cleanup", "compact"]),
    ] {
        assert_ok(&b.cli(&[&["topics", "create", topic][..], &flags].concat()));
        assert_ok(&b.cli(&["produce", topic, "--key", "k", "v"]));
        let series = format!("topic=\"{topic}\"");
        assert!(http_get(&b.metrics_addr(), "/metrics").contains(&series));
        let path = b.data_dir().join(file);
        {
            let _held = Immutable::set(&path);
            let o = b.cli(&["topics", "delete", topic]);
            assert_fails(
                &o,
                1,
                &[
                    "storage_failed",
                    &format!("topic '{topic}' is deleted"),
                    file,
                ],
            );
        }
        assert!(holds(&path, topic), "{file} was not rewritten");
        assert!(!stdout(&b.cli(&["topics", "list"])).contains(topic));
        let metrics = http_get(&b.metrics_addr(), "/metrics");
        assert!(!metrics.contains(&series), "{metrics}");
        // The entry left is replaced by a new topic of the name.
        assert_ok(&b.cli(&["topics", "create", topic]));
        assert!(!holds(&path, topic), "{file}");
    }
    assert_eq!(b.stop(), Some(0));
}

/// Start-up finishing deletes: one leftover partition it cannot delete
/// used to stop the broker, though its data is no one's. Now it starts,
/// logs the directory, counts it, and refuses a create of the name over
/// it. A leftover it deleted counts as deleted, not quarantined (an
/// unloadable one counted as quarantined); a directory skipped for naming
/// another partition in its metadata is counted too.
#[test]
fn start_up_goes_past_a_leftover_it_cannot_delete_and_counts_each() {
    let mut b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    assert_ok(&b.cli(&["topics", "create", "kept"]));
    assert_ok(&b.cli(&["produce", "kept", "k0"]));
    assert_eq!(b.stop(), Some(0));
    let table = b.data_dir().join("topics.meta");
    let without_t1 = std::fs::read(&table).unwrap();
    b.restart();
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "3"]));
    for p in ["0", "1", "2"] {
        assert_ok(&b.cli(&["produce", "t1", "--partition", p, "old"]));
    }
    assert_eq!(b.stop(), Some(0));
    // A delete of t1 cut short: the table without it, its directories on.
    std::fs::write(&table, without_t1).unwrap();
    let t1 = b.data_dir().join("topics/t1");
    make_unloadable(&t1.join("0"));
    let stuck = t1.join("1");
    let copied = b.data_dir().join("topics/b/0");
    std::fs::create_dir_all(&copied).unwrap();
    for e in std::fs::read_dir(b.data_dir().join("topics/kept/0")).unwrap() {
        let from = e.unwrap().path();
        std::fs::copy(&from, copied.join(from.file_name().unwrap())).unwrap();
    }
    {
        let _held = Immutable::set(&stuck);
        b.restart();
        let log = b.log();
        assert!(
            log.contains("could not delete partition t1/1 of a deleted topic")
                && log.contains(stuck.to_str().unwrap()),
            "{log}"
        );
        assert!(!t1.join("0").exists());
        assert!(!t1.join("2").exists());
        let metrics = http_get(&b.metrics_addr(), "/metrics");
        for (series, value) in [
            ("skiff_recovery_deleted_leftovers", 2.0),
            ("skiff_recovery_undeletable_leftovers", 1.0),
            ("skiff_recovery_skipped_dirs", 1.0),
            ("skiff_recovery_quarantined_partitions", 0.0),
        ] {
            assert_eq!(
                sample(&metrics, series, ""),
                Some(value),
                "{series}: {metrics}"
            );
        }
        let o = b.cli(&["topics", "create", "t1", "--partitions", "3"]);
        assert_fails(
            &o,
            1,
            &[
                "storage_failed",
                stuck.to_str().unwrap(),
                "no topic 't1' is listed",
            ],
        );
        assert_eq!(stdout(&b.cli(&["consume", "kept"])), "k0\n");
    }
    // Once it can go, a create deletes it first: the new t1 starts empty.
    assert_ok(&b.cli(&["topics", "create", "t1", "--partitions", "3"]));
    new_partition_starts_empty(&b, "t1", "1");
    assert_eq!(b.stop(), Some(0));
}
