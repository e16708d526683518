//! `skiff txn`: stdin's TOPIC<TAB>VALUE lines in one transaction,
//! `skiff txn --consume` (consume-transform-produce), and `skiff txn list`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::client::{
    Client, ClientError, GroupConfig, GroupConsumer, OffsetReset, ProducerConfig, StartFrom,
    TxnProducer,
};

use super::args::{OutputFormat, TxnArgs, TxnCommand};
use super::commands::{check_topic_name, connect, exit_code_for};
use super::{fail, EXIT_USAGE};

pub fn txn(args: TxnArgs) -> ExitCode {
    if let Some(TxnCommand::List { format }) = args.command {
        return list(&args, format);
    }
    let Some(id) = args.id.clone() else {
        return fail(EXIT_USAGE, "txn: --id TXID is required");
    };
    if args.consume.is_some() {
        if args.abort {
            return fail(
                EXIT_USAGE,
                "txn: --abort and --consume cannot be used together",
            );
        }
        return pipe(&args, &id);
    }
    let mut producer = match connect(&args.broker).and_then(|c| begin(c, &args, &id)) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let result = smol::block_on(async {
        match feed(&mut producer).await {
            Ok(_) if args.abort => producer.abort().await.map_err(|e| (Fail::Client(e), None)),
            // A record that failed makes the commit abort instead.
            Ok(_) => producer.commit().await.map_err(|e| (Fail::Client(e), None)),
            // Abort now rather than leave the transaction to the broker's
            // timeout, holding read_committed readers back until then.
            Err(f) => Err((f, Some(producer.abort().await))),
        }
    });
    let what = if args.abort { "abort" } else { "commit" };
    let Err((failure, aborted)) = result else {
        return ExitCode::SUCCESS;
    };
    let ended = match aborted {
        None | Some(Ok(())) => "the transaction is aborted".to_owned(),
        Some(Err(e)) => format!(
            "aborting it failed too ({e}): the broker aborts it after --transaction-timeout-ms"
        ),
    };
    match failure {
        Fail::Client(e) => fail(
            exit_code_for(&e),
            format!("txn {id}: {e} (not committed: {ended})"),
        ),
        Fail::Record(n, e) => fail(
            exit_code_for(&e),
            format!("txn {id}: line {n}: {e}; {ended}, no {what}"),
        ),
        Fail::Failed { line, read, e } => fail(
            exit_code_for(&e),
            format!(
                "txn {id}: line {line}: {e} (found on reading line {read}); {ended}, no {what}"
            ),
        ),
        Fail::NoTab(n) => fail(
            EXIT_USAGE,
            format!("txn {id}: line {n} is not TOPIC<TAB>VALUE; {ended}"),
        ),
        Fail::BadTopic(n, e) => fail(
            EXIT_USAGE,
            format!("txn {id}: line {n}: {e}; {ended}, no {what}"),
        ),
        Fail::Stdin(e) => fail(
            super::EXIT_RUNTIME,
            format!("txn {id}: reading stdin: {e}; {ended}, no {what}"),
        ),
    }
}

/// Connects and initialises the transactional id. A refusal here (a
/// --transaction-timeout-ms past the broker's limit) comes before any
/// transaction began: there is nothing to abort, and the message says so.
fn begin(client: Client, args: &TxnArgs, id: &str) -> Result<TxnProducer, ExitCode> {
    let config = ProducerConfig {
        client: client.config().clone(),
        ..ProducerConfig::default()
    };
    let timeout = Duration::from_millis(args.transaction_timeout_ms);
    smol::block_on(TxnProducer::new(client, id, timeout, config)).map_err(|e| {
        fail(
            exit_code_for(&e),
            format!("txn {id}: {e} (refused before a transaction began: nothing was written)"),
        )
    })
}

/// Sends stdin's lines in the open transaction, as they are read; stops
/// at the first bad line, or record that failed. The number of lines.
async fn feed(producer: &mut TxnProducer) -> Result<u64, Fail> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        line.clear();
        // Sent as read: a line is in flight before the next is read.
        match lines.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(n),
            Ok(_) => {}
            Err(e) => return Err(Fail::Stdin(e)),
        }
        n += 1;
        // A record sent earlier that failed (an unknown topic, a refused
        // batch) fails the transaction now, not at end of input. Every
        // line before this one was sent, one record each, so the record's
        // number is its line's.
        if let Some((line, e)) = producer.first_failure() {
            return Err(Fail::Failed { line, read: n, e });
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        let Some(tab) = line.iter().position(|&b| b == b'\t') else {
            return Err(Fail::NoTab(n));
        };
        let Ok(topic) = std::str::from_utf8(&line[..tab]) else {
            return Err(Fail::NoTab(n));
        };
        // Not asked of the broker, which would answer unknown_topic.
        crate::broker::validate_topic_name(topic).map_err(|e| Fail::BadTopic(n, e))?;
        let topic = topic.to_owned();
        // Known topics are answered from the producer's cache; an unknown
        // one fails here, so the message names its line (a send would
        // fail only later, in the background).
        producer
            .partitions_for(&topic)
            .await
            .map_err(|e| Fail::Record(n, e))?;
        producer
            .send_wait(&topic, None, &line[tab + 1..], &[])
            .await
            .map_err(|e| Fail::Record(n, e))?;
    }
}

enum Fail {
    Client(ClientError),
    /// Line n (1-based) could not be sent (a record too large, an
    /// unknown topic).
    Record(u64, ClientError),
    /// The record of `line`, sent earlier, failed; found on reading line
    /// `read`.
    Failed {
        line: u64,
        read: u64,
        e: ClientError,
    },
    /// Line n has no TAB after its topic.
    NoTab(u64),
    /// Line n's topic is a name no topic can have.
    BadTopic(u64, crate::broker::BrokerError),
    Stdin(std::io::Error),
}

/// How often a stop signal is looked for while a poll is waiting.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// `skiff txn --consume IN --group G --to OUT`: each poll's records are
/// copied to OUT in one transaction that also commits G's offsets past
/// them, so after any crash every record of IN is in OUT exactly once for
/// read_committed readers. Any error ends the run (the open transaction
/// is aborted, by this process or by the next one with the same id) and a
/// new run starts again at the group's committed offsets. SIGINT or
/// SIGTERM stops it between transactions: a poll copied in full is
/// committed first, one copied in part is aborted; then it exits 0.
fn pipe(args: &TxnArgs, id: &str) -> ExitCode {
    let (Some(input), Some(group), Some(output)) = (&args.consume, &args.group, &args.to) else {
        return fail(EXIT_USAGE, "txn: --consume needs --group and --to");
    };
    if let Err(code) = check_topic_name(input).and_then(|()| check_topic_name(output)) {
        return code;
    }
    let start_from = match args.from.as_str() {
        "earliest" => StartFrom::Earliest,
        "latest" => StartFrom::Latest,
        other => {
            return fail(
                EXIT_USAGE,
                format!("txn: --from {other}: use earliest or latest"),
            )
        }
    };
    // As `consume --group`: the first signal stops at a clean point, a
    // second ends it at once (a broker that does not answer).
    let stop = match super::stop_flag_or_quit() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let client = match connect(&args.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let session_timeout = Duration::from_millis(args.session_timeout_ms);
    let mut cfg = GroupConfig::new(group, &[input]);
    // The transactional id is the member's static identity too: a restart
    // gets its partitions back at once instead of after the session
    // timeout of the member that died.
    cfg.instance_id = Some(id.to_owned());
    cfg.session_timeout = session_timeout;
    cfg.heartbeat_interval = (session_timeout / 5).max(Duration::from_millis(50));
    // Offsets are committed only inside transactions: not even a revoke
    // commits, which for a partition the group had no offset for would
    // rewind it to where this member started.
    cfg.auto_commit_interval = None;
    cfg.mark_on_poll = false;
    cfg.commits_offsets = false;
    cfg.start_from = start_from;
    cfg.client_name = Some(format!(
        "skiff-cli/{} txn pid {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    ));
    cfg.consumer.max_wait = Duration::from_millis(args.timeout_ms.unwrap_or(500).clamp(1, 500));
    cfg.consumer.offset_reset = OffsetReset::Earliest;
    // Only committed input: an aborted upstream transaction is not copied.
    cfg.consumer.isolation = crate::protocol::Isolation::ReadCommitted;
    cfg.consumer.client = client.config().clone();
    let mut producer = match begin(client.clone(), args, id) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
    let result: Result<u64, ClientError> = smol::block_on(async {
        let mut member = GroupConsumer::new(client, cfg);
        let mut copied = 0u64;
        let mut last_record = Instant::now();
        loop {
            if stopped() || args.count.is_some_and(|c| copied >= c) {
                return Ok(copied);
            }
            let polled = futures_lite::future::or(async { Some(member.poll().await) }, async {
                while !stopped() {
                    smol::Timer::after(SIGNAL_CHECK).await;
                }
                None
            })
            .await;
            // Stopped while polling: no transaction is open.
            let Some(records) = polled else {
                return Ok(copied);
            };
            let records = records?;
            if records.is_empty() {
                // Idle time counts once the member is in the group: a join
                // that takes long (a rebalance, a loaded machine) is not idle.
                if member.membership().is_none() {
                    last_record = Instant::now();
                }
                if args
                    .timeout_ms
                    .is_some_and(|t| last_record.elapsed() >= Duration::from_millis(t))
                {
                    return Ok(copied);
                }
                continue;
            }
            last_record = Instant::now();
            let mut next: BTreeMap<(&str, u32), u64> = BTreeMap::new();
            for r in &records {
                if stopped() {
                    // Part of the poll is in the transaction: committing
                    // it with offsets past the whole poll would lose the
                    // rest. Aborted, the next run copies the poll again.
                    producer.abort().await?;
                    return Ok(copied);
                }
                let headers: Vec<(&str, &[u8])> = r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_slice()))
                    .collect();
                producer
                    .send_wait(output, r.key.as_deref(), &r.value, &headers)
                    .await?;
                let at = next.entry((&r.topic, r.partition)).or_insert(0);
                *at = (*at).max(r.offset + 1);
            }
            let offsets: Vec<(&str, u32, u64)> =
                next.iter().map(|(&(t, p), &o)| (t, p, o)).collect();
            let done = async {
                producer.send_offsets(group, &offsets).await?;
                producer.commit().await
            };
            if let Err(e) = done.await {
                let _ = producer.abort().await;
                return Err(e);
            }
            copied += records.len() as u64;
        }
    });
    match result {
        Ok(n) => {
            // A fully copied poll was committed before the stop; no
            // transaction is left open.
            let how = if stopped() { " (stopped)" } else { "" };
            eprintln!("txn {id}: {n} record(s) copied from {input} to {output}{how}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(
            exit_code_for(&e),
            format!(
                "txn {id}: {e}; the open transaction is aborted, and a new run continues from group {group}'s committed offsets"
            ),
        ),
    }
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
            outln!("{}", serde_json::Value::Array(v));
        }
        OutputFormat::Text => {
            outln!("ID\tSTATE\tPRODUCER\tPARTITIONS");
            for t in txns {
                let parts: Vec<String> = t
                    .partitions
                    .iter()
                    .map(|p| format!("{}/{}", p.topic, p.partition))
                    .collect();
                outln!(
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
            outln!("{v}");
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
    let producers = u64::from(a.producers.max(1));
    for &n in &a.per_txn {
        let n = n.max(1);
        let mut runs = Vec::new();
        for i in 0..producers {
            let id = format!("bench-txn-{}-{n}-{i}", std::process::id());
            // A connection each, as separate applications would have.
            let client = Client::connect_with(&a.broker.broker, a.broker.client_config()).await?;
            let p = TxnProducer::new(client, &id, Duration::from_secs(60), config.clone()).await?;
            let share = a.records / producers + u64::from(i < a.records % producers);
            runs.push((p, share));
        }
        let started = std::time::Instant::now();
        let tasks: Vec<_> = runs
            .into_iter()
            .map(|(mut p, mut left)| {
                let (topic, value) = (a.topic.clone(), value.clone());
                smol::spawn(async move {
                    let mut txns = 0u64;
                    while left > 0 {
                        let k = left.min(n);
                        for _ in 0..k {
                            p.send_wait(&topic, None, &value, &[]).await?;
                        }
                        p.commit().await?;
                        txns += 1;
                        left -= k;
                    }
                    Ok::<u64, ClientError>(txns)
                })
            })
            .collect();
        let mut txns = 0u64;
        for t in tasks {
            txns += t.await?;
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
        "producers": producers,
        "modes": modes,
    }))
}
