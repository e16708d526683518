//! The client-side commands: topics, produce, consume, bench.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::client::{
    Client, ClientError, Consumer, ConsumerConfig, ConsumerRecord, Delivery, OffsetReset, Producer,
    ProducerConfig, StartFrom,
};
use crate::protocol::{CreateTopicRequest, ErrorCode, TopicConfig};

use super::args::*;
use super::{fail, EXIT_RUNTIME, EXIT_USAGE};

/// Deliveries a `produce` keeps un-awaited before it waits for the oldest:
/// bounds memory for an endless stdin while keeping the pipe full.
const PRODUCE_PENDING_MAX: usize = 10_000;

fn connect(addr: &str) -> Result<Client, ExitCode> {
    smol::block_on(Client::connect(addr))
        .map_err(|e| fail(EXIT_RUNTIME, format!("cannot connect to {addr}: {e}")))
}

fn print_config(c: &TopicConfig) {
    println!("topic: {}", c.name);
    println!("partitions: {}", c.partitions);
    println!("segment_bytes: {}", c.segment_bytes);
    println!("segments: {}", c.segments);
    println!("retention_ms: {}", c.retention_ms.unwrap_or(0));
    println!("fsync: {}", c.fsync);
    println!("overflow: {}", c.overflow);
    if let Some(ms) = c.msg_id_window_ms {
        println!("msg_id_window_ms: {ms}");
    }
    if let Some(n) = c.msg_id_window_records {
        println!("msg_id_window_records: {n}");
    }
}

pub fn topics(command: TopicsCommand) -> ExitCode {
    let broker = match &command {
        TopicsCommand::Create { broker, .. }
        | TopicsCommand::List { broker }
        | TopicsCommand::Describe { broker, .. }
        | TopicsCommand::Delete { broker, .. } => broker.broker.clone(),
    };
    let client = match connect(&broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result: Result<(), ClientError> = smol::block_on(async {
        match command {
            TopicsCommand::Create {
                name,
                partitions,
                segment_bytes,
                segments,
                retention_ms,
                fsync,
                overflow,
                msg_id_window_ms,
                msg_id_window_records,
                ..
            } => {
                let config = client
                    .create_topic(CreateTopicRequest {
                        name,
                        partitions,
                        segment_bytes,
                        segments,
                        retention_ms,
                        fsync,
                        overflow,
                        msg_id_window_ms,
                        msg_id_window_records,
                    })
                    .await?;
                print_config(&config);
            }
            TopicsCommand::List { .. } => {
                for t in client.list_topics().await? {
                    println!("{t}");
                }
            }
            TopicsCommand::Describe { name, .. } => {
                let d = client.describe_topic(&name).await?;
                print_config(&d.config);
                for p in d.partitions {
                    println!(
                        "partition {}: earliest {} latest {}",
                        p.partition, p.earliest_offset, p.latest_offset
                    );
                }
            }
            TopicsCommand::Delete { name, .. } => client.delete_topic(&name).await?,
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code_for(&e), e),
    }
}

/// Requests the server refused as malformed are usage errors; the rest are
/// runtime errors.
fn exit_code_for(e: &ClientError) -> u8 {
    match e.code() {
        Some(ErrorCode::InvalidRequest) => EXIT_USAGE,
        _ => EXIT_RUNTIME,
    }
}

pub fn produce(args: ProduceArgs) -> ExitCode {
    // Connect first so that a broker that is not there is reported with its
    // address, as for the other commands.
    let client = match connect(&args.broker.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = smol::block_on(async {
        // Idempotent (the default), so retries through a cut connection or
        // a broker restart write every record exactly once; the delivery
        // timeout (2 minutes) bounds how long it keeps trying.
        let producer = Producer::new(
            client,
            ProducerConfig {
                producer_name: args.idempotent_name.clone(),
                ..ProducerConfig::default()
            },
        )
        .await?;
        let key = args.key.as_deref().map(str::as_bytes);
        let mut pending: VecDeque<Delivery> = VecDeque::new();
        let mut sent = 0u64;
        let header = args.msg_id_header.as_deref();
        let mut send = |input: &[u8]| -> Result<Delivery, ProduceFail> {
            sent += 1;
            let (value, id): (&[u8], Option<&[u8]>) = match header {
                None => (input, None),
                Some(_) => match input.iter().position(|&b| b == b'\t') {
                    Some(i) => (&input[i + 1..], Some(&input[..i])),
                    None => return Err(ProduceFail::NoMsgId(sent)),
                },
            };
            let headers: Vec<(&str, &[u8])> = header.zip(id).into_iter().collect();
            Ok(match args.partition {
                Some(p) => producer.send_to(&args.topic, p, key, value, &headers),
                None => producer.send(&args.topic, key, value, &headers),
            })
        };
        async fn settle(pending: &mut VecDeque<Delivery>, keep: usize) -> Result<(), ClientError> {
            while pending.len() > keep {
                pending.pop_front().expect("non-empty").await?;
            }
            Ok(())
        }
        if args.values.is_empty() {
            let stdin = std::io::stdin();
            let mut line = Vec::new();
            let mut lock = stdin.lock();
            loop {
                line.clear();
                let n = lock
                    .read_until(b'\n', &mut line)
                    .map_err(|e| ClientError::Io(std::sync::Arc::new(e)))?;
                if n == 0 {
                    break;
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                pending.push_back(send(&line)?);
                settle(&mut pending, PRODUCE_PENDING_MAX).await?;
            }
        } else {
            for v in &args.values {
                pending.push_back(send(v.as_bytes())?);
                settle(&mut pending, PRODUCE_PENDING_MAX).await?;
            }
        }
        producer.flush().await;
        settle(&mut pending, 0).await?;
        Ok::<u64, ProduceFail>(sent)
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(ProduceFail::Client(e)) => {
            fail(exit_code_for(&e), format!("produce to {}: {e}", args.topic))
        }
        Err(ProduceFail::NoMsgId(n)) => fail(
            EXIT_USAGE,
            format!("record {n} has no TAB between its message id and value (--msg-id-header)"),
        ),
    }
}

/// Why `skiff produce` stopped.
enum ProduceFail {
    Client(ClientError),
    /// Record number n (1-based) has no `ID<TAB>` prefix.
    NoMsgId(u64),
}

impl From<ClientError> for ProduceFail {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

fn parse_from(from: &str) -> Option<StartFrom> {
    match from {
        "earliest" => Some(StartFrom::Earliest),
        "latest" => Some(StartFrom::Latest),
        _ => match from.strip_prefix('@') {
            Some(ms) => ms.parse().ok().map(StartFrom::Timestamp),
            None => from.parse().ok().map(StartFrom::Offset),
        },
    }
}

/// A byte string for JSON: the text when it is UTF-8, else base64; the
/// second value names which.
fn json_bytes(b: &[u8]) -> (serde_json::Value, &'static str) {
    match std::str::from_utf8(b) {
        Ok(s) => (serde_json::Value::String(s.to_owned()), "utf8"),
        Err(_) => (
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
            "base64",
        ),
    }
}

fn record_json(r: &ConsumerRecord) -> serde_json::Value {
    let (key, key_encoding) = match &r.key {
        Some(k) => {
            let (v, e) = json_bytes(k);
            (v, serde_json::Value::from(e))
        }
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    let (value, value_encoding) = json_bytes(&r.value);
    let headers: Vec<serde_json::Value> = r
        .headers
        .iter()
        .map(|(name, v)| {
            let (value, encoding) = json_bytes(v);
            serde_json::json!({"name": name, "value": value, "value_encoding": encoding})
        })
        .collect();
    serde_json::json!({
        "topic": &*r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": value_encoding,
        "headers": headers,
    })
}

pub fn consume(args: ConsumeArgs) -> ExitCode {
    let Some(from) = parse_from(&args.from) else {
        return fail(
            EXIT_USAGE,
            format!(
                "--from {}: expected earliest, latest, an offset or @UNIX_MS",
                args.from
            ),
        );
    };
    let client = match connect(&args.broker.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    let result = smol::block_on(async {
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(args.timeout_ms.unwrap_or(500).clamp(1, 500)),
            offset_reset: OffsetReset::Earliest,
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::new(client, config);
        let partitions = args.partition.map(|p| vec![p]);
        consumer
            .assign(&args.topic, partitions.as_deref(), from)
            .await?;
        let mut seen = 0u64;
        let mut last_record = Instant::now();
        let mut out = std::io::BufWriter::new(stdout.lock());
        loop {
            if args.count.is_some_and(|c| seen >= c) {
                break;
            }
            let records = consumer.poll().await?;
            if records.is_empty() {
                if let Some(t) = args.timeout_ms {
                    if last_record.elapsed() >= Duration::from_millis(t) {
                        break;
                    }
                }
                continue;
            }
            last_record = Instant::now();
            for r in records {
                if args.count.is_some_and(|c| seen >= c) {
                    break;
                }
                seen += 1;
                let written = match args.format {
                    OutputFormat::Text => {
                        out.write_all(&r.value).and_then(|()| out.write_all(b"\n"))
                    }
                    OutputFormat::Json => {
                        writeln!(out, "{}", record_json(&r))
                    }
                };
                if written.is_err() {
                    // stdout closed (a pipe into `head`): stop quietly.
                    return Ok(seen);
                }
            }
            let _ = out.flush();
        }
        let _ = out.flush();
        Ok::<u64, ClientError>(seen)
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code_for(&e), format!("consume {}: {e}", args.topic)),
    }
}

pub fn bench(command: BenchCommand) -> ExitCode {
    match command {
        BenchCommand::Produce(a) => super::bench::produce(a),
        BenchCommand::Consume(a) => super::bench::consume(a),
        BenchCommand::Disk(a) => super::bench::disk(a),
        BenchCommand::Loopback(a) => super::bench::loopback(a),
    }
}
