//! `skiff bench share`: share-group throughput. Fills a topic, then N
//! workers (threads of this process, a connection each) take every record
//! through one share group with an in-process handler (accept at once),
//! each fetch's records acknowledged in one request. For comparison, the
//! same records read by one plain consumer in the same run. One JSON line
//! on stdout.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{
    Client, ClientError, Consumer, ConsumerConfig, Outcome, Producer, ProducerConfig, ShareConfig,
    ShareConsumer, StartFrom,
};
use crate::protocol::{CreateTopicRequest, ErrorCode};

use super::args::BenchShareArgs;
use super::{fail, EXIT_RUNTIME};

pub fn share(a: BenchShareArgs) -> ExitCode {
    if let Err(code) = super::commands::check_broker(&a.broker.broker) {
        return code;
    }
    match run(a) {
        Ok(line) => {
            outln!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_RUNTIME, format!("bench share: {e}")),
    }
}

fn run(a: BenchShareArgs) -> Result<serde_json::Value, ClientError> {
    let addr = a.broker.broker.clone();
    let client = smol::block_on(Client::connect_with(&addr, a.broker.client_config()))?;
    smol::block_on(async {
        match client.delete_topic(&a.topic).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {}
            Err(e) => return Err(e),
        }
        client
            .create_topic(CreateTopicRequest {
                name: a.topic.clone(),
                partitions: Some(a.partitions),
                fsync: Some(a.fsync.clone()),
                ..CreateTopicRequest::default()
            })
            .await?;
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                linger: Duration::from_millis(5),
                ..ProducerConfig::default()
            },
        )
        .await?;
        let value = vec![b'x'; a.size];
        let mut last = None;
        for i in 0..a.messages {
            let key = i.to_be_bytes();
            last = Some(
                producer
                    .send_wait(&a.topic, Some(&key), &value, &[])
                    .await?,
            );
        }
        producer.flush().await;
        if let Some(d) = last {
            d.await?;
        }
        Ok::<(), ClientError>(())
    })?;

    // The yardstick: one plain consumer reading the same records.
    let plain = smol::block_on(async {
        let mut c = Consumer::new(client.clone(), ConsumerConfig::default());
        c.assign(&a.topic, None, StartFrom::Earliest).await?;
        let started = Instant::now();
        let mut n = 0u64;
        while n < a.messages {
            n += c.poll().await?.len() as u64;
        }
        Ok::<Duration, ClientError>(started.elapsed())
    })?;

    let group = format!("bench-share-{}", std::process::id());
    let accepted = Arc::new(AtomicU64::new(0));
    let redelivered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..a.workers)
        .map(|_| {
            let (addr, a, group) = (addr.clone(), a.clone(), group.clone());
            let (accepted, redelivered) = (accepted.clone(), redelivered.clone());
            std::thread::spawn(move || {
                smol::block_on(async {
                    let client = Client::connect_with(&addr, a.broker.client_config()).await?;
                    let w = ShareConsumer::new(
                        client,
                        &group,
                        &a.topic,
                        ShareConfig {
                            max_records: a.batch,
                            max_wait: Duration::from_millis(100),
                            from_earliest: true,
                            ..ShareConfig::default()
                        },
                    );
                    while accepted.load(Ordering::Relaxed) < a.messages {
                        let records = w.poll().await?;
                        // The in-process handler: every record is fine.
                        let acks: Vec<_> = records
                            .iter()
                            .map(|r| (r.partition, r.offset, Outcome::Accept))
                            .collect();
                        let again = records.iter().filter(|r| r.delivery_count > 1).count();
                        redelivered.fetch_add(again as u64, Ordering::Relaxed);
                        let codes = w.ack(&acks).await?;
                        let ok = codes.iter().filter(|c| c.is_none()).count();
                        accepted.fetch_add(ok as u64, Ordering::Relaxed);
                    }
                    Ok::<(), ClientError>(())
                })
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker thread")?;
    }
    let elapsed = started.elapsed();
    smol::block_on(client.delete_topic(&a.topic))?;
    let rate = |d: Duration| (a.messages as f64 / d.as_secs_f64()).round();
    Ok(serde_json::json!({
        "bench": "share",
        "messages": a.messages,
        "size": a.size,
        "partitions": a.partitions,
        "workers": a.workers,
        "batch": a.batch,
        "fsync": a.fsync,
        "share_records_per_sec": rate(elapsed),
        "share_seconds": elapsed.as_secs_f64(),
        "plain_consume_records_per_sec": rate(plain),
        "redelivered": redelivered.load(Ordering::Relaxed),
    }))
}
