//! The producer on a multi-threaded executor, through the real binary: its
//! batches reach the broker in sequence order. On its own in this file so
//! that it runs in a process of its own, where `SMOL_THREADS` (read once,
//! when smol's global executor starts) is set before anything uses smol.

mod common;

use std::time::Duration;

use common::*;
use skiff::client::{blocking, Producer, ProducerConfig};
use skiff::protocol::CreateTopicRequest;

const RECORDS: usize = 50_000;

#[test]
fn a_producer_on_four_executor_threads_sends_its_batches_in_order() {
    // Nothing in this process has used smol yet.
    std::env::set_var("SMOL_THREADS", "4");
    let mut b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    blocking::Client::connect(&b.tcp)
        .expect("connect")
        .create_topic(CreateTopicRequest {
            name: "threads".to_owned(),
            partitions: Some(1),
            ..CreateTopicRequest::default()
        })
        .expect("create");
    let offsets = smol::block_on(async {
        let producer = Producer::connect(
            &b.tcp,
            ProducerConfig {
                // Batches of 64 records, five in flight: requests long
                // enough to encode that two threads draining at once
                // (after an answer each) race to queue theirs.
                batch_bytes: 64 * 1024,
                linger: Duration::ZERO,
                ..ProducerConfig::default()
            },
        )
        .await
        .expect("producer");
        let value = vec![b'x'; 1000];
        let mut deliveries = Vec::with_capacity(RECORDS);
        for _ in 0..RECORDS {
            let d = producer
                .send_wait("threads", None, &value, &[])
                .await
                .expect("send");
            deliveries.push(d);
        }
        producer.flush().await;
        let mut offsets = Vec::with_capacity(RECORDS);
        for d in deliveries {
            offsets.push(d.await.expect("acknowledged").offset);
        }
        offsets
    });
    // Written once each, in the order they were sent.
    let expected: Vec<u64> = (0..RECORDS as u64).collect();
    assert!(offsets == expected, "records written out of send order");
    let metrics = http_get(&b.metrics_addr(), "/metrics");
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("skiff_out_of_order_batches_total "))
        .expect("the out-of-order counter");
    assert_eq!(
        refused, "0",
        "batches overtook one another on the wire and were refused"
    );
    assert_eq!(b.stop(), Some(0), "clean stop:\n{}", b.log());
}
