//! `skiff txn`: stdin's TOPIC<TAB>VALUE lines in one transaction, and
//! `skiff txn list`.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::Duration;

use crate::client::{ClientError, ProducerConfig, TxnProducer};

use super::args::{OutputFormat, TxnArgs, TxnCommand};
use super::commands::{connect, exit_code_for};
use super::{fail, EXIT_USAGE};

pub fn txn(args: TxnArgs) -> ExitCode {
    if let Some(TxnCommand::List { format }) = args.command {
        return list(&args, format);
    }
    let Some(id) = args.id.clone() else {
        return fail(EXIT_USAGE, "txn: --id TXID is required");
    };
    let client = match connect(&args.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let timeout = Duration::from_millis(args.transaction_timeout_ms);
    let result = smol::block_on(async {
        let config = ProducerConfig {
            client: client.config().clone(),
            ..ProducerConfig::default()
        };
        let mut producer = TxnProducer::new(client, &id, timeout, config)
            .await
            .map_err(Fail::Client)?;
        let stdin = std::io::stdin();
        let mut lines = stdin.lock();
        let mut line = Vec::new();
        let mut n = 0u64;
        loop {
            line.clear();
            // Sent as read: a line is in flight before the next is read.
            match lines.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = producer.abort().await;
                    return Err(Fail::Stdin(e));
                }
            }
            n += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            let Some(tab) = line.iter().position(|&b| b == b'\t') else {
                let _ = producer.abort().await;
                return Err(Fail::NoTab(n));
            };
            let Ok(topic) = std::str::from_utf8(&line[..tab]) else {
                let _ = producer.abort().await;
                return Err(Fail::NoTab(n));
            };
            let topic = topic.to_owned();
            producer
                .send_wait(&topic, None, &line[tab + 1..], &[])
                .await
                .map_err(Fail::Client)?;
        }
        if args.abort {
            producer.abort().await.map_err(Fail::Client)?;
        } else {
            producer.commit().await.map_err(Fail::Client)?;
        }
        Ok(n)
    });
    let what = if args.abort { "abort" } else { "commit" };
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(Fail::Client(e)) => fail(
            exit_code_for(&e),
            format!("txn {id}: {e} (not committed: the transaction is aborted)"),
        ),
        Err(Fail::NoTab(n)) => fail(
            EXIT_USAGE,
            format!("txn {id}: line {n} is not TOPIC<TAB>VALUE; the transaction is aborted"),
        ),
        Err(Fail::Stdin(e)) => fail(
            super::EXIT_RUNTIME,
            format!("txn {id}: reading stdin: {e}; the transaction is aborted, no {what}"),
        ),
    }
}

enum Fail {
    Client(ClientError),
    /// Line n (1-based) has no TAB after its topic.
    NoTab(u64),
    Stdin(std::io::Error),
}

fn list(args: &TxnArgs, format: OutputFormat) -> ExitCode {
    let client = match connect(&args.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let txns = match smol::block_on(client.list_txns()) {
        Ok(t) => t,
        Err(e) => return fail(exit_code_for(&e), format!("txn list: {e}")),
    };
    match format {
        OutputFormat::Json => {
            let v: Vec<serde_json::Value> = txns
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "id": t.transactional_id,
                        "state": t.state,
                        "producer_id": t.producer_id,
                        "producer_epoch": t.producer_epoch,
                        "transaction_timeout_ms": t.transaction_timeout_ms,
                        "partitions": t.partitions.iter()
                            .map(|p| serde_json::json!({"topic": p.topic, "partition": p.partition}))
                            .collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(v));
        }
        OutputFormat::Text => {
            println!("ID\tSTATE\tPRODUCER\tPARTITIONS");
            for t in txns {
                let parts: Vec<String> = t
                    .partitions
                    .iter()
                    .map(|p| format!("{}/{}", p.topic, p.partition))
                    .collect();
                println!(
                    "{}\t{}\t{}.{}\t{}",
                    t.transactional_id,
                    t.state,
                    t.producer_id,
                    t.producer_epoch,
                    parts.join(",")
                );
            }
        }
    }
    ExitCode::SUCCESS
}

/// `skiff bench txn`: the same records written plainly (idempotent) and
/// in transactions of each `--per-txn` size, one after the other, on one
/// topic; prints one JSON object with records/s per mode and the ratio to
/// plain.
pub fn bench(a: super::args::BenchTxnArgs) -> ExitCode {
    match smol::block_on(bench_run(&a)) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit_code_for(&e), format!("bench txn: {e}")),
    }
}

async fn bench_run(a: &super::args::BenchTxnArgs) -> Result<serde_json::Value, ClientError> {
    use crate::client::{Client, Producer};
    use crate::protocol::{CreateTopicRequest, ErrorCode};
    let client = Client::connect_with(&a.broker.broker, a.broker.client_config()).await?;
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
    let value = vec![b'x'; a.size];
    let config = ProducerConfig {
        client: client.config().clone(),
        ..ProducerConfig::default()
    };
    let started = std::time::Instant::now();
    let plain = Producer::new(client.clone(), config.clone()).await?;
    let mut sent = Vec::with_capacity(a.records as usize);
    for _ in 0..a.records {
        sent.push(plain.send_wait(&a.topic, None, &value, &[]).await?);
    }
    plain.flush().await;
    for d in sent {
        d.await?;
    }
    let plain_rate = a.records as f64 / started.elapsed().as_secs_f64();
    let mut modes = vec![serde_json::json!({"mode": "plain", "records_per_s": plain_rate.round()})];
    for &n in &a.per_txn {
        let n = n.max(1);
        let id = format!("bench-txn-{}-{n}", std::process::id());
        let mut p =
            TxnProducer::new(client.clone(), &id, Duration::from_secs(60), config.clone()).await?;
        let started = std::time::Instant::now();
        let mut txns = 0u64;
        let mut left = a.records;
        while left > 0 {
            let k = left.min(n);
            for _ in 0..k {
                p.send_wait(&a.topic, None, &value, &[]).await?;
            }
            p.commit().await?;
            txns += 1;
            left -= k;
        }
        let secs = started.elapsed().as_secs_f64();
        let rate = a.records as f64 / secs;
        modes.push(serde_json::json!({
            "mode": format!("txn x{n}"),
            "records_per_s": rate.round(),
            "txns_per_s": (txns as f64 / secs).round(),
            "vs_plain": (rate / plain_rate * 1000.0).round() / 1000.0,
        }));
    }
    Ok(serde_json::json!({
        "records": a.records,
        "size": a.size,
        "fsync": a.fsync,
        "partitions": a.partitions,
        "modes": modes,
    }))
}
