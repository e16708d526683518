//! Many producers at once into a 4-partition topic: every record is stored
//! exactly once and each key's records keep their send order.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use skiff::client::{blocking, ConsumerConfig, ProducerConfig, StartFrom};
use skiff::protocol::CreateTopicRequest;

const PRODUCERS: usize = 8;
const RECORDS_PER_PRODUCER: usize = 10_000;
const KEYS_PER_PRODUCER: usize = 16;
/// Records one `skiff produce` process sends from stdin alongside.
const CLI_RECORDS: usize = 2_000;
const PARTITIONS: u32 = 4;

/// "p{producer} k{key} s{seq}": who sent it, under which key, and its
/// position among that key's records.
fn parse(value: &[u8]) -> (String, u64) {
    let s = std::str::from_utf8(value).expect("utf-8 value");
    let (key, seq) = s
        .rsplit_once(" s")
        .unwrap_or_else(|| panic!("bad value {s}"));
    (key.to_owned(), seq.parse().expect("sequence number"))
}

#[test]
fn eight_producers_exactly_once_and_per_key_order() {
    let b = Broker::start("");
    let client = blocking::Client::connect(&b.tcp).expect("connect");
    client
        .create_topic(CreateTopicRequest {
            name: "load".to_owned(),
            partitions: Some(PARTITIONS),
            ..CreateTopicRequest::default()
        })
        .expect("create");

    let started = Instant::now();
    // One more producer through the CLI, reading stdin, at the same time.
    let cli_input: String = (0..CLI_RECORDS).map(|i| format!("cli s{i}\n")).collect();
    let tcp = b.tcp.clone();
    let cli = std::thread::spawn(move || {
        run_cli(
            &["produce", "load", "--key", "cli"],
            &tcp,
            Some(cli_input.as_bytes()),
        )
    });
    let threads: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let tcp = b.tcp.clone();
            std::thread::spawn(move || {
                let producer =
                    blocking::Producer::connect(&tcp, ProducerConfig::default()).expect("producer");
                let mut seq = [0u64; KEYS_PER_PRODUCER];
                let mut deliveries = Vec::with_capacity(RECORDS_PER_PRODUCER);
                for i in 0..RECORDS_PER_PRODUCER {
                    let k = i % KEYS_PER_PRODUCER;
                    let key = format!("p{p} k{k}");
                    let value = format!("{key} s{}", seq[k]);
                    seq[k] += 1;
                    let d = producer
                        .send_wait("load", Some(key.as_bytes()), value.as_bytes(), &[])
                        .expect("send");
                    deliveries.push((key, d));
                }
                producer.flush();
                // Offsets per key must rise in send order too.
                let mut last: HashMap<String, (u32, u64)> = HashMap::new();
                for (key, d) in deliveries {
                    let m = blocking::wait(d).expect("every record is acknowledged");
                    if let Some((part, off)) = last.insert(key.clone(), (m.partition, m.offset)) {
                        assert_eq!(part, m.partition, "{key} moved partition");
                        assert!(off < m.offset, "{key}: offset {} after {off}", m.offset);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("producer thread");
    }
    let o = cli.join().expect("cli thread");
    assert_ok(&o);
    eprintln!("produced in {:?}", started.elapsed());

    let total = PRODUCERS * RECORDS_PER_PRODUCER + CLI_RECORDS;
    let mut consumer = blocking::Consumer::connect(
        &b.tcp,
        ConsumerConfig {
            max_wait: Duration::from_millis(200),
            ..ConsumerConfig::default()
        },
    )
    .expect("consumer");
    consumer
        .assign("load", None, StartFrom::Earliest)
        .expect("assign");
    let mut records = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(60);
    while records.len() < total {
        assert!(
            Instant::now() < deadline,
            "consumed only {} of {total}",
            records.len()
        );
        records.extend(consumer.poll().expect("poll"));
    }
    // Nothing beyond: a further poll returns no more records.
    assert!(consumer.poll().expect("poll").is_empty());
    assert_eq!(records.len(), total);

    // Offsets per partition are dense from 0; each key in one partition with
    // its sequence numbers 0, 1, 2, ... in offset order.
    let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut next_seq: HashMap<String, (u32, u64)> = HashMap::new();
    for r in &records {
        by_partition.entry(r.partition).or_default().push(r.offset);
        let (key, seq) = parse(&r.value);
        assert_eq!(
            r.key.as_deref(),
            Some(key.as_bytes()),
            "the value names its key"
        );
        let e = next_seq.entry(key.clone()).or_insert((r.partition, 0));
        assert_eq!(e.0, r.partition, "{key} in two partitions");
        assert_eq!(
            e.1, seq,
            "{key}: got s{seq} at {}/{} where s{} was due (lost, duplicated or reordered)",
            r.partition, r.offset, e.1
        );
        e.1 += 1;
    }
    for (p, offsets) in &by_partition {
        let n = offsets.len() as u64;
        assert!(
            offsets.iter().copied().eq(0..n),
            "partition {p}: offsets not dense and in order"
        );
    }
    assert_eq!(next_seq.len(), PRODUCERS * KEYS_PER_PRODUCER + 1);
    for (key, (_, n)) in &next_seq {
        let want = if key == "cli" {
            CLI_RECORDS
        } else {
            RECORDS_PER_PRODUCER / KEYS_PER_PRODUCER
        };
        assert_eq!(*n as usize, want, "{key}");
    }
    assert!(
        by_partition.len() > 1,
        "keys should spread over partitions: {:?}",
        by_partition.keys()
    );
    eprintln!("total {:?}", started.elapsed());
}
