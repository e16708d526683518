//! End-to-end tests of the client library against the real `skiff serve`.
//!
//! Each test starts its own server with the shared harness
//! (`common::Broker`) and talks to it over its Unix socket unless it says
//! otherwise; the server is killed when the test ends.

mod common;

use common::Broker;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::client::{
    blocking, Client, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, StartFrom,
};
use skiff::protocol::{
    decode_response, encode_request, frame_len, CreateTopicRequest, ErrorCode, FetchPartition,
    FetchRequest, HelloRequest, OffsetSpec, ProducePartition, Request, RequestBody, ResponseBody,
    FRAME_BYTES_MAX, FRAME_HEADER_BYTES,
};

fn create(client: &blocking::Client, name: &str, partitions: u32) {
    client
        .create_topic(CreateTopicRequest {
            name: name.into(),
            partitions: Some(partitions),
            segment_bytes: Some(1024 * 1024),
            segments: Some(4),
            ..Default::default()
        })
        .unwrap();
}

#[test]
fn admin_calls_round_trip() {
    let server = Broker::start("");
    let c = blocking::Client::connect(&server.unix_addr()).unwrap();
    let info = c.server_info().unwrap();
    assert_eq!(info.version, skiff::protocol::PROTOCOL_VERSION_MAX);
    assert!(info.max_batch_bytes > 0 && info.max_frame_bytes > info.max_batch_bytes);

    let config = c
        .create_topic(CreateTopicRequest {
            name: "a".into(),
            partitions: Some(3),
            fsync: Some("interval:50".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(config.partitions, 3);
    assert_eq!(config.fsync, "interval:50");
    create(&c, "b", 1);
    assert_eq!(c.list_topics().unwrap(), vec!["a", "b"]);

    let d = c.describe_topic("a").unwrap();
    assert_eq!(d.partitions.len(), 3);
    assert!(d
        .partitions
        .iter()
        .all(|p| p.latest_offset == p.earliest_offset));

    let err = c
        .create_topic(CreateTopicRequest {
            name: "a".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TopicExists));

    let err = c
        .create_topic(CreateTopicRequest {
            name: "c".into(),
            fsync: Some("sometimes".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));

    let meta = c.metadata(Some(&["a", "missing"])).unwrap();
    assert_eq!(meta.len(), 2);
    assert_eq!(meta[0].partitions.len(), 3);
    assert_eq!(meta[1].error, ErrorCode::UnknownTopic);

    c.delete_topic("a").unwrap();
    assert_eq!(
        c.describe_topic("a").unwrap_err().code(),
        Some(ErrorCode::UnknownTopic)
    );
    assert_eq!(c.list_topics().unwrap(), vec!["b"]);
}

#[test]
fn raw_produce_fetch_and_offsets() {
    let server = Broker::start("");
    let c = blocking::Client::connect(&server.unix_addr()).unwrap();
    create(&c, "t", 2);
    let mut b = BatchBuilder::new();
    for i in 0..10 {
        b.push(1_000 + i, None, format!("v{i}").as_bytes(), &[]);
    }
    let results = c
        .produce_raw(vec![
            ProducePartition {
                topic: "t".into(),
                partition: 1,
                batch: b.finish(ProducerStamp::NONE).into(),
            },
            ProducePartition {
                topic: "t".into(),
                partition: 7,
                batch: vec![0; 80].into(),
            },
        ])
        .unwrap();
    assert_eq!(results[0].offsets(), Ok((0, 9)));
    assert_eq!(results[1].error, ErrorCode::UnknownPartition);

    assert_eq!(c.offset_for("t", 1, OffsetSpec::Earliest).unwrap(), Some(0));
    assert_eq!(c.offset_for("t", 1, OffsetSpec::Latest).unwrap(), Some(10));
    assert_eq!(
        c.offset_for("t", 1, OffsetSpec::Timestamp(1_005)).unwrap(),
        Some(5)
    );
    assert_eq!(
        c.offset_for("t", 1, OffsetSpec::Timestamp(2_000)).unwrap(),
        None
    );

    // A corrupt batch is refused, and nothing is written.
    let mut b2 = BatchBuilder::new();
    b2.push(1, None, b"x", &[]);
    let mut bytes = b2.finish(ProducerStamp::NONE);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let r = c
        .produce_raw(vec![ProducePartition {
            topic: "t".into(),
            partition: 1,
            batch: bytes.into(),
        }])
        .unwrap();
    assert_eq!(r[0].error, ErrorCode::InvalidBatch);
    assert_eq!(c.offset_for("t", 1, OffsetSpec::Latest).unwrap(), Some(10));

    // So is a producer's batch with a gap in its offsets: only the log's
    // own writers (compaction, transaction markers) leave gaps.
    let mut b3 = BatchBuilder::new();
    b3.push(1, None, b"x", &[]);
    b3.skip_offsets(2);
    b3.push(2, None, b"y", &[]);
    let r = c
        .produce_raw(vec![ProducePartition {
            topic: "t".into(),
            partition: 1,
            batch: b3.finish(ProducerStamp::NONE).into(),
        }])
        .unwrap();
    assert_eq!(r[0].error, ErrorCode::InvalidBatch);
    assert!(
        r[0].message.as_deref().is_some_and(|m| m.contains("dense")),
        "{:?}",
        r[0]
    );
    assert_eq!(c.offset_for("t", 1, OffsetSpec::Latest).unwrap(), Some(10));

    let mut consumer = blocking::Consumer::new(&c, ConsumerConfig::default());
    consumer
        .assign("t", Some(&[1]), StartFrom::Offset(3))
        .unwrap();
    let records = consumer.poll().unwrap();
    let values: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8(r.value.clone()).unwrap())
        .collect();
    assert_eq!(values, (3..10).map(|i| format!("v{i}")).collect::<Vec<_>>());
    assert_eq!(records[0].offset, 3);
    assert_eq!(records[0].timestamp_ms, 1_003);
    assert_eq!(consumer.position("t", 1), Some(10));
}

/// A batch around `body` (CBOR), claiming `count` dense records, its
/// header and CRC valid whatever the body holds.
fn batch_of_body(body: &[u8], count: u32) -> Vec<u8> {
    use skiff::batch::*;
    let mut out = vec![0u8; HEADER_BYTES];
    out.extend_from_slice(body);
    let total_len = out.len() as u32;
    let mut put = |at: usize, field: &[u8]| out[at..at + field.len()].copy_from_slice(field);
    put(OFFSET_MAGIC, &MAGIC);
    put(OFFSET_VERSION, &VERSION.to_le_bytes());
    put(OFFSET_TOTAL_LEN, &total_len.to_le_bytes());
    put(OFFSET_RECORD_COUNT, &count.to_le_bytes());
    put(OFFSET_LAST_OFFSET_DELTA, &(count - 1).to_le_bytes());
    put(OFFSET_FIRST_TIMESTAMP, &1_000i64.to_le_bytes());
    put(OFFSET_MAX_TIMESTAMP, &1_000i64.to_le_bytes());
    put(OFFSET_PRODUCER_ID, &NO_PRODUCER_ID.to_le_bytes());
    put(OFFSET_BASE_SEQUENCE, &NO_SEQUENCE.to_le_bytes());
    let crc = compute_crc(&out);
    out[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A batch whose header and CRC are valid but whose records a consumer
/// cannot read is refused at produce with `invalid_batch` saying why, on
/// a plain (`delete`) topic too: stored, it failed every fetch of the
/// partition, the records before it included. Good batches of the same
/// request are written, and the partition stays readable.
#[test]
fn a_batch_whose_records_a_consumer_cannot_read_is_refused() {
    let server = Broker::start("");
    let c = blocking::Client::connect(&server.unix_addr()).unwrap();
    create(&c, "victim", 1);
    let good = |value: &str| {
        let mut b = BatchBuilder::new();
        b.push(1_000, None, value.as_bytes(), &[]);
        ProducePartition {
            topic: "victim".into(),
            partition: 0,
            batch: b.finish(ProducerStamp::NONE).into(),
        }
    };
    let r = c.produce_raw(vec![good("before")]).unwrap();
    assert_eq!(r[0].offsets(), Ok((0, 0)));
    // [0, 0, null, h'76', []]: a record as skiff writes it.
    let record = |delta: u8| vec![0x85, delta, 0x00, 0xf6, 0x41, b'v', 0x80];
    let bad: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "trailing bytes after body",
            [&[0x81][..], &record(0), &[0x00, 0x00]].concat(),
            1,
        ),
        (
            "body is not a CBOR array of records",
            vec![0x81, 0x83, 0x00, 0x00, 0xf6],
            1,
        ),
        (
            "record offset deltas are not strictly increasing",
            [&[0x82][..], &record(0), &record(0)].concat(),
            2,
        ),
        (
            "record_count does not match body",
            [&[0x81][..], &record(0)].concat(),
            2,
        ),
        // The value, then a header's value, as text instead of bytes.
        (
            "body is not a CBOR array of records",
            vec![0x81, 0x85, 0x00, 0x00, 0xf6, 0x61, b'v', 0x80],
            1,
        ),
        (
            "body is not a CBOR array of records",
            [
                &[0x81, 0x85, 0x00, 0x00, 0xf6, 0x41, b'v', 0x81, 0x82][..],
                &[0x61, b'h', 0x61, b'x'],
            ]
            .concat(),
            1,
        ),
    ];
    let mut request: Vec<ProducePartition> = bad
        .iter()
        .map(|(_, body, count)| ProducePartition {
            topic: "victim".into(),
            partition: 0,
            batch: batch_of_body(body, *count).into(),
        })
        .collect();
    request.push(good("between"));
    let r = c.produce_raw(request).unwrap();
    for ((why, _, _), r) in bad.iter().zip(&r) {
        assert_eq!(r.error, ErrorCode::InvalidBatch, "{why}: {r:?}");
        assert!(
            r.message.as_deref().is_some_and(|m| m.contains(why)),
            "{why}: {r:?}"
        );
    }
    assert_eq!(r[bad.len()].offsets(), Ok((1, 1)), "{:?}", r[bad.len()]);
    // The same body well formed is taken.
    let fine = batch_of_body(&[&[0x81][..], &record(0)].concat(), 1);
    let r = c
        .produce_raw(vec![
            ProducePartition {
                topic: "victim".into(),
                partition: 0,
                batch: fine.into(),
            },
            good("after"),
        ])
        .unwrap();
    assert_eq!((r[0].offsets(), r[1].offsets()), (Ok((2, 2)), Ok((3, 3))));
    // Every record is readable, through the real command too.
    let o = server.cli(&["consume", "victim"]);
    common::assert_ok(&o);
    assert_eq!(common::stdout(&o), "before\nbetween\nv\nafter\n");
}

/// A consumer of two partitions, one with megabytes of backlog: the
/// broker fills a fetch's byte budget in request order, so the small
/// partition must lead a fetch soon, not wait until the large one is
/// drained.
#[test]
fn a_partition_with_a_backlog_does_not_starve_the_others() {
    // 256 KiB batches: the dev profile's 1 MiB batch limit.
    let server = Broker::start("profile = \"dev\"\n");
    let c = blocking::Client::connect(&server.unix_addr()).unwrap();
    create(&c, "fair", 2);
    let batch = |n: i64, size: usize| {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push(i, None, &vec![b'x'; size], &[]);
        }
        b.finish(ProducerStamp::NONE)
    };
    let produce = |partition: u32, batch: Vec<u8>| {
        let r = c
            .produce_raw(vec![ProducePartition {
                topic: "fair".into(),
                partition,
                batch: batch.into(),
            }])
            .unwrap();
        assert_eq!(r[0].error, ErrorCode::None);
    };
    for _ in 0..16 {
        produce(0, batch(256, 1000));
    }
    produce(1, batch(5, 10));

    let mut consumer = blocking::Consumer::new(&c, ConsumerConfig::default());
    consumer.assign("fair", None, StartFrom::Earliest).unwrap();
    let mut polls = 0;
    while consumer.position("fair", 1) != Some(5) {
        polls += 1;
        assert!(
            polls <= 2,
            "partition 1 still unread after {polls} polls; partition 0 at {:?} of 4096",
            consumer.position("fair", 0)
        );
        consumer.poll().unwrap();
    }
    assert!(
        consumer.position("fair", 0).unwrap() < 4096,
        "read before the backlog was drained"
    );
}

/// A fetch's answer holds an entry per partition besides its records, and
/// its first batch may be as large as a batch can be. Many partitions of
/// a long-named topic and one full batch take more than the embedded
/// default's frame in one answer: the consumer asks for as many
/// partitions as fit beside a full batch, in turns, and reads everything.
#[test]
fn a_consumer_of_more_partitions_than_one_answer_holds_reads_them_all_in_turns() {
    let server = Broker::start("");
    let c = blocking::Client::connect(&server.unix_addr()).unwrap();
    let topic = "t".repeat(200);
    create(&c, &topic, 60);
    // As large a batch as the broker takes, in the last partition, and a
    // record in each of the others.
    let n = produce_large_and_small(&c, &topic, 59);
    let got = common::consume_all(&server.unix_addr(), &topic);
    assert_eq!(got.len(), 59 + n as usize);
    assert_eq!(got.iter().filter(|r| r.partition == 59).count(), n as usize);
}

/// After an answer's first batch, the partitions that follow give the
/// batches that fit in the room left, so small batches of several
/// partitions come in one answer on the embedded default (whose frame
/// holds one largest batch and little more); a batch that does not fit
/// waits for the next fetch, which takes it first.
#[test]
fn one_fetch_answers_small_batches_of_several_partitions() {
    let server = Broker::start("");
    let c = blocking::Client::connect(&server.unix_addr()).unwrap();
    create(&c, "many", 4);
    let info = c.server_info().unwrap();
    produce_large_and_small(&c, "many", 3);
    let fetch = |partitions: &[u32]| {
        c.fetch(FetchRequest {
            partitions: partitions
                .iter()
                .map(|&partition| FetchPartition {
                    topic: "many".into(),
                    partition,
                    offset: 0,
                    max_bytes: info.max_batch_bytes,
                })
                .collect(),
            max_wait_ms: 0,
            min_bytes: 1,
            isolation: None,
        })
        .unwrap()
        .partitions
    };
    let got = fetch(&[0, 1, 2, 3]);
    for r in &got {
        assert_eq!(r.error, ErrorCode::None, "{r:?}");
    }
    let sizes: Vec<usize> = got.iter().map(|r| r.records.len()).collect();
    assert!(sizes[..3].iter().all(|&len| len > 0), "{sizes:?}");
    assert_eq!(sizes[3], 0, "the large batch does not fit after them");
    let got = fetch(&[3, 0]);
    assert!(got[0].records.len() > (info.max_batch_bytes / 2) as usize);
}

/// Into partition `last`, one batch of records of 1,000 B as large as the
/// broker takes; into each partition before it, a batch of one small
/// record. Returns the large batch's record count.
fn produce_large_and_small(c: &blocking::Client, topic: &str, last: u32) -> u32 {
    let max_batch_bytes = c.server_info().unwrap().max_batch_bytes as usize;
    let mut large = BatchBuilder::new();
    let mut n = 0;
    while large.estimated_bytes() + 1100 < max_batch_bytes {
        large.push(n, None, &[b'l'; 1000], &[]);
        n += 1;
    }
    let mut batches = vec![(last, large.finish(ProducerStamp::NONE))];
    for p in 0..last {
        let mut b = BatchBuilder::new();
        b.push(0, None, format!("p{p}").as_bytes(), &[]);
        batches.push((p, b.finish(ProducerStamp::NONE)));
    }
    for (partition, batch) in batches {
        let r = c
            .produce_raw(vec![ProducePartition {
                topic: topic.into(),
                partition,
                batch: batch.into(),
            }])
            .unwrap();
        assert_eq!(r[0].error, ErrorCode::None, "partition {partition}");
    }
    n as u32
}

async fn connect_and_create(server: &Broker, topic: &str, partitions: u32) -> Client {
    let client = Client::connect(&server.unix_addr()).await.unwrap();
    create_small(&client, topic, partitions).await;
    client
}

async fn create_small(client: &Client, topic: &str, partitions: u32) {
    client
        .create_topic(CreateTopicRequest {
            name: topic.into(),
            partitions: Some(partitions),
            segment_bytes: Some(4 * 1024 * 1024),
            segments: Some(4),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[test]
fn producer_batches_and_consumer_reads_everything_in_order() {
    let server = Broker::start("");
    smol::block_on(async {
        let client = connect_and_create(&server, "orders", 4).await;
        let producer = Producer::new(client.clone(), ProducerConfig::default())
            .await
            .unwrap();
        let n = 20_000u32;
        let mut deliveries = Vec::new();
        for i in 0..n {
            let key = format!("dev-{}", i % 17);
            let value = i.to_be_bytes();
            let d = producer
                .send_wait("orders", Some(key.as_bytes()), &value, &[("seq", &value)])
                .await
                .unwrap();
            deliveries.push((key, i, d));
        }
        producer.flush().await;
        let mut placed: HashMap<(u32, u64), u32> = HashMap::new();
        for (key, i, d) in deliveries {
            let m = d.await.unwrap();
            assert_eq!(
                m.partition,
                skiff::client::partitioner::partition_for_key(key.as_bytes(), 4)
            );
            assert!(placed.insert((m.partition, m.offset), i).is_none());
        }

        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer
            .assign("orders", None, StartFrom::Earliest)
            .await
            .unwrap();
        let mut seen = 0u32;
        let mut last_per_key: HashMap<Vec<u8>, u32> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen < n && Instant::now() < deadline {
            for r in consumer.poll().await.unwrap() {
                let i = u32::from_be_bytes(r.value[..4].try_into().unwrap());
                assert_eq!(placed[&(r.partition, r.offset)], i);
                assert_eq!(r.headers[0].1, r.value);
                // Per key (hence per partition), records come in send order.
                let prev = last_per_key.insert(r.key.clone().unwrap(), i);
                assert!(prev.is_none_or(|p| p < i));
                seen += 1;
            }
        }
        assert_eq!(seen, n);
    });
}

/// `partitions_for` asks the broker for a topic's partition count once and
/// keeps it; an unknown topic is a typed error; records sent afterwards go
/// where the count says.
#[test]
fn partitions_for_names_a_topics_count_and_refuses_an_unknown_one() {
    let server = Broker::start("");
    smol::block_on(async {
        let client = connect_and_create(&server, "meters", 3).await;
        let producer = Producer::new(client.clone(), ProducerConfig::default())
            .await
            .unwrap();
        assert_eq!(producer.partitions_for("meters").await.unwrap(), 3);
        assert_eq!(producer.partitions_for("meters").await.unwrap(), 3);
        let err = producer.partitions_for("no-such-topic").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UnknownTopic), "{err}");
        let m = producer
            .send_wait("meters", Some(b"dev-7"), b"21.5", &[])
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            m.partition,
            skiff::client::partitioner::partition_for_key(b"dev-7", 3)
        );
    });
}

/// flush() sends what was sent before it at once (no linger) and returns
/// when that is acknowledged, even while another task keeps sending.
#[test]
fn flush_waits_for_earlier_records_not_for_a_busy_sender() {
    let server = Broker::start("");
    smol::block_on(async {
        let client = connect_and_create(&server, "flushed", 2).await;
        let producer = std::sync::Arc::new(
            Producer::new(
                client.clone(),
                ProducerConfig {
                    linger: Duration::from_secs(1),
                    ..ProducerConfig::default()
                },
            )
            .await
            .unwrap(),
        );
        let mut before = Vec::new();
        for i in 0..100u32 {
            let d = producer
                .send_wait("flushed", None, &i.to_be_bytes(), &[])
                .await
                .unwrap();
            before.push(d);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let (producer, stop) = (producer.clone(), stop.clone());
            smol::spawn(async move {
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = producer.send_wait("flushed", None, b"later", &[]).await;
                    sent += 1;
                    futures_lite::future::yield_now().await;
                }
                sent
            })
        };
        let flushed = futures_lite::future::or(
            async {
                producer.flush().await;
                true
            },
            async {
                smol::Timer::after(Duration::from_secs(30)).await;
                false
            },
        )
        .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let later = busy.await;
        assert!(
            flushed,
            "flush never returned while another task was sending"
        );
        assert!(later > 0, "the other task was sending during the flush");
        for d in &before {
            let r = d.try_result().expect("acknowledged when flush returned");
            assert!(r.is_ok(), "{r:?}");
        }
        producer.flush().await;
    });
}

#[test]
fn long_poll_waits_then_returns_new_records() {
    let server = Broker::start("");
    smol::block_on(async {
        let client = Client::connect(&server.unix_addr()).await.unwrap();
        client
            .create_topic(CreateTopicRequest {
                name: "t".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                max_wait: Duration::from_millis(300),
                ..Default::default()
            },
        );
        consumer.assign("t", None, StartFrom::Latest).await.unwrap();
        let started = Instant::now();
        assert!(consumer.poll().await.unwrap().is_empty());
        assert!(started.elapsed() >= Duration::from_millis(250));

        let producer = Producer::new(client.clone(), ProducerConfig::default())
            .await
            .unwrap();
        let writer = smol::spawn(async move {
            smol::Timer::after(Duration::from_millis(100)).await;
            producer.send("t", None, b"late", &[]).await.unwrap()
        });
        let mut consumer = Consumer::new(
            client,
            ConsumerConfig {
                max_wait: Duration::from_secs(5),
                ..Default::default()
            },
        );
        consumer.assign("t", None, StartFrom::Latest).await.unwrap();
        let started = Instant::now();
        let records = consumer.poll().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(4), "answered early");
        assert_eq!(records[0].value, b"late");
        writer.await;
    });
}

#[test]
fn pipelined_calls_from_many_tasks_share_one_connection() {
    let server = Broker::start("");
    smol::block_on(async {
        let client = Client::connect(&server.unix_addr()).await.unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let c = client.clone();
                smol::spawn(async move {
                    let name = format!("t{i}");
                    let r = c
                        .create_topic(CreateTopicRequest {
                            name: name.clone(),
                            segment_bytes: Some(1024 * 1024),
                            segments: Some(2),
                            ..Default::default()
                        })
                        .await;
                    (name, r)
                })
            })
            .collect();
        for t in tasks {
            let (name, r) = t.await;
            // The server's topic limit may stop some; each answer must be
            // the one for its own request.
            match r {
                Ok(config) => assert_eq!(config.name, name),
                Err(e) => assert_eq!(e.code(), Some(ErrorCode::TooManyTopics), "{e}"),
            }
        }
    });
}

/// Sends raw bytes on a fresh connection and reads one answer frame.
fn raw_exchange(server: &Broker, bytes: &[u8]) -> (Option<skiff::protocol::Response>, bool) {
    let mut s = std::os::unix::net::UnixStream::connect(&server.unix).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut response = None;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (response, true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read: {e}"),
        }
        if response.is_none() {
            if let Some(n) = frame_len(&buf, FRAME_BYTES_MAX).unwrap() {
                response = Some(decode_response(&buf[FRAME_HEADER_BYTES..n]).unwrap());
            }
        }
    }
}

#[test]
fn malformed_and_oversized_frames_get_an_answer_and_a_close() {
    let server = Broker::start("");
    let other = blocking::Client::connect(&server.unix_addr()).unwrap();

    // Garbage after a valid length: malformed, correlation id 0.
    let (answer, closed) = raw_exchange(&server, &[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let answer = answer.expect("an error answer");
    assert_eq!(answer.correlation_id, 0);
    assert!(matches!(
        answer.body,
        ResponseBody::Error(ref e) if e.code == ErrorCode::MalformedFrame
    ));
    assert!(closed);

    // A 4 GiB length prefix: refused at once.
    let (answer, closed) = raw_exchange(&server, &[0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        answer.unwrap().body,
        ResponseBody::Error(ref e) if e.code == ErrorCode::FrameTooLarge
    ));
    assert!(closed);

    // A request before hello: invalid_request, echoing the id.
    let mut frame = Vec::new();
    encode_request(
        &Request {
            correlation_id: 77,
            body: RequestBody::ListTopics(Default::default()),
        },
        &mut frame,
    )
    .unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(&server.unix).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame).unwrap();
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).unwrap();
    let mut body = vec![0; u32::from_be_bytes(prefix) as usize];
    s.read_exact(&mut body).unwrap();
    let answer = decode_response(&body).unwrap();
    assert_eq!(answer.correlation_id, 77);
    assert!(matches!(
        answer.body,
        ResponseBody::Error(ref e) if e.code == ErrorCode::InvalidRequest
    ));

    // Unsupported versions only.
    let mut frame = Vec::new();
    encode_request(
        &Request {
            correlation_id: 1,
            body: RequestBody::Hello(HelloRequest {
                version_min: 900,
                version_max: 901,
                client_name: None,
            }),
        },
        &mut frame,
    )
    .unwrap();
    let (answer, _) = raw_exchange(&server, &frame);
    assert!(matches!(
        answer.unwrap().body,
        ResponseBody::Error(ref e) if e.code == ErrorCode::UnsupportedVersion
    ));

    // The other client never noticed.
    assert!(other.list_topics().unwrap().is_empty());
}

#[test]
fn client_reconnects_and_producer_retries_across_a_restart() {
    let server = Broker::start("");
    let addr = server.unix_addr();
    let c = blocking::Client::connect(&addr).unwrap();
    create(&c, "t", 1);
    let producer = blocking::Producer::new(&c, ProducerConfig::default()).unwrap();
    let first = blocking::wait(producer.send("t", None, b"before", &[])).unwrap();
    assert_eq!(first.offset, 0);

    let mut server = server;
    server.kill9();
    server.restart();
    // The old connection is dead: the first call may fail retriably, and a
    // later one reconnects.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.list_topics() {
            Ok(t) => {
                assert_eq!(t, vec!["t"]);
                break;
            }
            Err(e) if e.is_retriable() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let second = blocking::wait(producer.send("t", None, b"after", &[])).unwrap();
    assert_eq!(second.offset, 1);
    drop(server);
}

#[test]
fn unknown_topic_fails_the_delivery_without_retrying() {
    let server = Broker::start("");
    let producer =
        blocking::Producer::connect(&server.unix_addr(), ProducerConfig::default()).unwrap();
    let started = Instant::now();
    let err = blocking::wait(producer.send("missing", None, b"x", &[])).unwrap_err();
    assert!(matches!(
        err,
        ClientError::Server {
            code: ErrorCode::UnknownTopic,
            ..
        }
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn tcp_and_unix_socket_reach_the_same_broker() {
    let server = Broker::start("");
    let tcp = server.tcp.clone();
    let over_unix = blocking::Client::connect(&server.unix_addr()).unwrap();
    create(&over_unix, "shared", 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let over_tcp = loop {
        match blocking::Client::connect(&tcp) {
            Ok(c) => break c,
            Err(e) if e.is_retriable() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(over_tcp.list_topics().unwrap(), vec!["shared"]);
}

/// Polled records are views of the frames they came in, and the client's
/// reader reuses a frame's buffer once nothing points into it: results
/// held across many polls (more frames than the reader keeps) still read
/// their own records.
#[test]
fn polled_records_held_across_many_polls_keep_their_bytes() {
    let server = Broker::start("");
    smol::block_on(async {
        let client = connect_and_create(&server, "held", 1).await;
        let batches = 40u8;
        let per_batch = 50u64;
        for b in 0..batches {
            let mut builder = BatchBuilder::new();
            for i in 0..per_batch {
                let mut value = vec![b; 200];
                value[..8].copy_from_slice(&(u64::from(b) * per_batch + i).to_be_bytes());
                builder.push(i as i64, None, &value, &[]);
            }
            let r = client
                .produce_raw(vec![ProducePartition {
                    topic: "held".into(),
                    partition: 0,
                    batch: builder.finish(ProducerStamp::NONE).into(),
                }])
                .await
                .unwrap();
            assert_eq!(r[0].error, ErrorCode::None);
        }
        // One batch per fetch: a frame per poll.
        let config = ConsumerConfig {
            partition_max_bytes: 1,
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::new(client.clone(), config);
        consumer
            .assign("held", None, StartFrom::Earliest)
            .await
            .unwrap();
        let check = |polled: &skiff::client::Polled| {
            for r in polled.iter() {
                let b = (r.offset / per_batch) as u8;
                assert_eq!(r.value[..8], r.offset.to_be_bytes(), "offset {}", r.offset);
                assert!(r.value[8..].iter().all(|&x| x == b), "offset {}", r.offset);
            }
            polled.len() as u64
        };
        let total = u64::from(batches) * per_batch;
        let mut held = Vec::new();
        let (mut got, mut polls) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < total && Instant::now() < deadline {
            let polled = consumer.poll_batch().await.unwrap();
            got += polled.len() as u64;
            polls += 1;
            // Every other result is read and dropped at once, so its frame
            // is reused while the ones held still point into theirs.
            if polls % 2 == 0 {
                held.push(polled);
            } else {
                check(&polled);
            }
        }
        assert_eq!(got, total);
        assert!(polls > 20, "{polls} polls for {batches} batches");
        let seen: u64 = held.iter().map(check).sum();
        assert!(seen > total / 3, "{seen} records held");
    });
}

/// `request_timeout: Duration::MAX` means requests never time out, for
/// the fetches that add their wait to it too: no overflow, no panic.
#[test]
fn a_client_whose_requests_never_time_out_still_produces_and_fetches() {
    let server = Broker::start("");
    smol::block_on(async {
        let config = skiff::client::ClientConfig {
            request_timeout: Duration::MAX,
            ..Default::default()
        };
        let client = Client::connect_with(&server.unix_addr(), config)
            .await
            .unwrap();
        create_small(&client, "t", 1).await;
        let producer = Producer::new(client.clone(), ProducerConfig::default())
            .await
            .unwrap();
        producer.send("t", None, b"kept", &[]).await.unwrap();
        let mut consumer = Consumer::new(
            client,
            ConsumerConfig {
                max_wait: Duration::from_millis(100),
                ..Default::default()
            },
        );
        consumer
            .assign("t", None, StartFrom::Earliest)
            .await
            .unwrap();
        let records = consumer.poll().await.unwrap();
        assert_eq!(records[0].value, b"kept");
    });
}
