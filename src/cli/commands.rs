//! The client-side commands: topics, produce, consume, bench.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::client::{
    Address, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, ConsumerRecord, Delivery,
    OffsetReset, Producer, ProducerConfig, RetryHook, StartFrom,
};
use crate::config::human;
use crate::protocol::{CreateTopicRequest, ErrorCode, OffsetSpec, TopicConfig};

use super::args::*;
use super::{fail, EXIT_RUNTIME, EXIT_USAGE};

/// Deliveries a `produce` keeps un-awaited before it waits for the oldest:
/// bounds memory for an endless stdin while keeping the pipe full.
const PRODUCE_PENDING_MAX: usize = 10_000;

/// Checks a `--broker` address before anything is sent: a malformed one is
/// a usage error, not a broker that cannot be reached.
pub(super) fn check_broker(addr: &str) -> Result<(), ExitCode> {
    Address::parse(addr).map(|_| ()).map_err(|_| {
        fail(
            EXIT_USAGE,
            format!(
                "--broker {addr:?} is not an address: use HOST:PORT, or the path of a Unix socket (with a '/' or ending in .sock)"
            ),
        )
    })
}

/// Checks a topic name before connecting, in the broker's words: a name
/// no topic can have is a bad command line, not an unknown topic.
pub(super) fn check_topic_name(name: &str) -> Result<(), ExitCode> {
    crate::broker::validate_topic_name(name).map_err(|e| fail(EXIT_USAGE, e))
}

pub(super) fn connect(broker: &BrokerArg) -> Result<Client, ExitCode> {
    connect_with(broker, broker.client_config())
}

fn connect_with(broker: &BrokerArg, config: ClientConfig) -> Result<Client, ExitCode> {
    let addr = &broker.broker;
    check_broker(addr)?;
    smol::block_on(Client::connect_with(addr, config))
        .map_err(|e| fail(exit_code_for(&e), connect_error(addr, &e)))
}

/// The message for a failure to get connected: "cannot connect" only
/// where the connection failed, not for TLS options that cannot be used
/// (nothing was tried) nor for a refusal the broker sent once connected.
pub(super) fn connect_error(addr: &str, e: &ClientError) -> String {
    if is_connect_failure(e) {
        format!("cannot connect to {addr}: {e}")
    } else {
        e.to_string()
    }
}

fn is_connect_failure(e: &ClientError) -> bool {
    match e {
        ClientError::TlsConfig(_) => false,
        // Refusals of the connection itself, answering hello.
        ClientError::Server { code, .. } => matches!(
            code,
            ErrorCode::TooManyConnections | ErrorCode::UnsupportedVersion
        ),
        _ => true,
    }
}

/// The disk a topic's rings reserve: allocated when it is created, never
/// more, given back when it is deleted.
fn disk_reserved(c: &TopicConfig) -> String {
    // A compacted partition also reserves the scratch segment a compaction
    // writes before its rename (the broker's disk budget counts it).
    let compacted = c.cleanup.as_deref().is_some_and(|p| p.contains("compact"));
    let per_partition = u64::from(c.segments) + u64::from(compacted);
    let total = c
        .segment_bytes
        .saturating_mul(per_partition)
        .saturating_mul(u64::from(c.partitions));
    format!(
        "{} ({} partition(s) x {} segments{} x {})",
        human(total),
        c.partitions,
        c.segments,
        if compacted { " + 1 for compaction" } else { "" },
        human(c.segment_bytes)
    )
}

fn print_config(c: &TopicConfig) {
    outln!("topic: {}", c.name);
    outln!("partitions: {}", c.partitions);
    outln!("segment_bytes: {}", c.segment_bytes);
    outln!("segments: {}", c.segments);
    outln!("retention_ms: {}", c.retention_ms.unwrap_or(0));
    outln!("fsync: {}", c.fsync);
    outln!("overflow: {}", c.overflow);
    if let Some(ms) = c.msg_id_window_ms {
        outln!("msg_id_window_ms: {ms}");
    }
    if let Some(n) = c.msg_id_window_records {
        outln!("msg_id_window_records: {n}");
    }
    if let Some(p) = c.cleanup.as_deref().filter(|&p| p != "delete") {
        outln!("cleanup: {p}");
    }
    if let Some(ms) = c.tombstone_retention_ms {
        outln!("tombstone_retention_ms: {ms}");
    }
    outln!("disk_reserved: {}", disk_reserved(c));
}

/// `topics describe --format json`: the config and each partition's ring.
fn describe_json(c: &TopicConfig, parts: &[crate::protocol::PartitionDetail]) -> serde_json::Value {
    let partitions: Vec<serde_json::Value> = parts
        .iter()
        .map(|p| {
            let error = (!p.error.is_none()).then(|| p.error.name());
            let next = p.next_retention_at_ms.map(|at| {
                serde_json::json!({
                    "at_ms": at,
                    "offsets": p.next_retention_offsets,
                    "bytes": p.next_retention_bytes,
                })
            });
            serde_json::json!({
                "partition": p.partition,
                "error": error,
                // The broker's reason with an error; null without one, or
                // from a broker before the field.
                "message": p.message,
                "log_start": p.log_start,
                "log_end": p.log_end,
                "bytes": p.bytes,
                "segments_used": p.segments_used,
                "segments": p.segments,
                "oldest_offset": (p.log_start < p.log_end).then_some(p.log_start),
                "oldest_timestamp": p.oldest_timestamp,
                "oldest_segment_max_timestamp": p.oldest_segment_max_timestamp,
                "next_retention": next,
                "damaged": p.damaged.iter().flatten().map(|d| serde_json::json!({
                    "from_offset": d.from_offset,
                    "to_offset": d.to_offset,
                    "bytes": d.bytes,
                    "slot": d.slot,
                    "position": d.position,
                    "found_ms": d.found_ms,
                    "found": d.found,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "topic": c.name,
        "partitions_count": c.partitions,
        "segment_bytes": c.segment_bytes,
        "segments": c.segments,
        "retention_ms": c.retention_ms,
        "fsync": c.fsync,
        "overflow": c.overflow,
        "cleanup": c.cleanup.as_deref().unwrap_or("delete"),
        "tombstone_retention_ms": c.tombstone_retention_ms,
        "msg_id_window_ms": c.msg_id_window_ms,
        "msg_id_window_records": c.msg_id_window_records,
        "partitions": partitions,
    })
}

pub fn topics(command: TopicsCommand) -> ExitCode {
    let broker = match &command {
        TopicsCommand::Create { broker, .. }
        | TopicsCommand::List { broker, .. }
        | TopicsCommand::Describe { broker, .. }
        | TopicsCommand::Compact { broker, .. }
        | TopicsCommand::Alter { broker, .. }
        | TopicsCommand::Delete { broker, .. } => broker.clone(),
    };
    let name = match &command {
        TopicsCommand::Create { name, .. }
        | TopicsCommand::Describe { name, .. }
        | TopicsCommand::Compact { name, .. }
        | TopicsCommand::Alter { name, .. }
        | TopicsCommand::Delete { name, .. } => Some(name),
        TopicsCommand::List { .. } => None,
    };
    if let Err(code) = name.map_or(Ok(()), |n| check_topic_name(n)) {
        return code;
    }
    let mut config = broker.client_config();
    let mut waits_for_create = None;
    if let TopicsCommand::Create {
        name, timeout_ms, ..
    } = &command
    {
        config.request_timeout = Duration::from_millis((*timeout_ms).max(1));
        waits_for_create = Some((name.clone(), config.request_timeout));
    }
    let client = match connect_with(&broker, config) {
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
                cleanup,
                tombstone_retention_ms,
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
                        cleanup,
                        tombstone_retention_ms,
                    })
                    .await?;
                print_config(&config);
            }
            TopicsCommand::List {
                format: OutputFormat::Json,
                ..
            } => {
                let r = client.list_topics_full().await?;
                let free = r
                    .disk_budget_bytes
                    .zip(r.disk_reserved_bytes)
                    .map(|(b, u)| b.saturating_sub(u));
                let json = serde_json::json!({
                    "topics": r.topics,
                    "disk_budget_bytes": r.disk_budget_bytes,
                    "disk_reserved_bytes": r.disk_reserved_bytes,
                    "disk_free_bytes": free,
                });
                outln!("{json}");
            }
            TopicsCommand::List { .. } => {
                for t in client.list_topics().await? {
                    outln!("{t}");
                }
            }
            TopicsCommand::Describe {
                name,
                format: OutputFormat::Json,
                ..
            } => {
                let d = client.describe_topic(&name).await?;
                let parts = client.describe_partitions(&name).await?;
                outln!("{}", describe_json(&d.config, &parts));
            }
            TopicsCommand::Describe { name, .. } => {
                let d = client.describe_topic(&name).await?;
                let details = client.describe_partitions(&name).await?;
                print_config(&d.config);
                for p in d.partitions {
                    outln!(
                        "partition {}: earliest {} latest {}",
                        p.partition,
                        p.earliest_offset,
                        p.latest_offset
                    );
                    let detail = details.iter().find(|x| x.partition == p.partition);
                    if let Some(x) = detail.filter(|x| !x.error.is_none()) {
                        // A broker before the reason field sends the code
                        // alone; its log has the reason then.
                        let reason = x.message.as_deref().or(p.message.as_deref());
                        match reason {
                            Some(m) => outln!("  error: {}: {m}", x.error.name()),
                            None => {
                                outln!("  error: {} (the broker's log says why)", x.error.name())
                            }
                        }
                    }
                    let damaged = detail.into_iter().flat_map(|x| x.damaged.iter().flatten());
                    for g in damaged {
                        outln!(
                            "  damaged: offsets {}..{} lost ({} bytes at segment slot {} \
                             position {}: {}), found at {} ms",
                            g.from_offset,
                            g.to_offset,
                            g.bytes,
                            g.slot,
                            g.position,
                            g.found,
                            g.found_ms
                        );
                    }
                }
            }
            TopicsCommand::Alter {
                name,
                retention_ms,
                fsync,
                cleanup,
                tombstone_retention_ms,
                segments,
                ..
            } => {
                let config = client
                    .alter_topic(crate::protocol::AlterTopicRequest {
                        name,
                        retention_ms,
                        fsync,
                        cleanup,
                        tombstone_retention_ms,
                        segments,
                    })
                    .await?;
                print_config(&config);
            }
            TopicsCommand::Compact { name, wait, .. } => {
                let parts = client.compact_topic(&name, wait).await?;
                if !wait {
                    outln!("compaction of {name} started");
                }
                // A partition that failed fails the command (after every
                // partition's line): a script must not take it for done.
                let mut failed: Vec<(u32, ErrorCode)> = Vec::new();
                for p in parts {
                    if !p.error.is_none() {
                        match &p.message {
                            Some(m) => outln!("partition {}: {}: {m}", p.partition, p.error),
                            None => outln!("partition {}: {}", p.partition, p.error),
                        }
                        failed.push((p.partition, p.error));
                        continue;
                    }
                    outln!(
                        "partition {}: {} segment(s) merged, {} freed, {} -> {} bytes, {} record(s) removed",
                        p.partition,
                        p.segments_merged,
                        p.segments_freed,
                        p.bytes_before,
                        p.bytes_after,
                        p.records_removed
                    );
                }
                if let Some(&(_, code)) = failed.first() {
                    let list: Vec<String> = failed
                        .iter()
                        .map(|(p, e)| format!("partition {p}: {e}"))
                        .collect();
                    return Err(ClientError::server(
                        code,
                        format!("compaction of {name} failed ({})", list.join(", ")),
                    ));
                }
            }
            TopicsCommand::Delete { name, .. } => client.delete_topic(&name).await?,
        }
        Ok(())
    });
    match (result, waits_for_create) {
        (Ok(()), _) => ExitCode::SUCCESS,
        // The broker goes on with a create the client stopped waiting for:
        // a retry would be refused as a topic that exists.
        (Err(ClientError::Timeout), Some((name, waited))) => fail(
            EXIT_RUNTIME,
            format!(
                "no answer to the create of {name} within {} s (--timeout-ms); the broker \
                 may still be creating it: `skiff topics describe {name}` shows it once made",
                waited.as_secs_f64()
            ),
        ),
        (Err(e), _) => fail(exit_code_for(&e), e),
    }
}

/// TLS options that cannot be used are usage errors, found before anything
/// is sent. Whatever the broker refused is a runtime error, its
/// `invalid_request` included: the command line was well formed, and status
/// 2 means it was not (README.md).
pub(super) fn exit_code_for(e: &ClientError) -> u8 {
    match e {
        ClientError::TlsConfig(_) => EXIT_USAGE,
        _ => EXIT_RUNTIME,
    }
}

/// Reports connection retries on stderr, at most one line a second.
struct RetryNotice<'a> {
    addr: &'a str,
    quiet: bool,
    last: Option<Instant>,
    retried: bool,
}

impl RetryNotice<'_> {
    fn retry(&mut self, e: &ClientError, left: Duration) {
        self.retried = true;
        if self.quiet
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(Instant::now());
        eprintln!(
            "skiff: cannot connect to {} ({e}); retrying for {} s more",
            self.addr,
            left.as_secs_f64().ceil()
        );
    }
}

/// Reports produce retries (a full ring, a full mirror backlog) on
/// stderr, at most one line a second, as connection retries are.
fn produce_retry_notice() -> RetryHook {
    let last = std::sync::Mutex::new(None::<Instant>);
    RetryHook(std::sync::Arc::new(move |topic, partition, e, left| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        eprintln!(
            "skiff: produce to {topic}/{partition} failed ({e}); retrying for {} s more",
            left.as_secs_f64().ceil()
        );
    }))
}

pub fn produce(args: ProduceArgs) -> ExitCode {
    if let Err(code) =
        check_broker(&args.broker.broker).and_then(|()| check_topic_name(&args.topic))
    {
        return code;
    }
    let addr = args.broker.broker.as_str();
    let retry_timeout = Duration::from_millis(args.retry_timeout_ms);
    let started = std::time::Instant::now();
    let result = smol::block_on(async {
        // Idempotent (the default), so retries through a cut connection or
        // a broker restart write every record exactly once. The same
        // deadline bounds connecting (the broker may still be starting)
        // and each record's delivery.
        let mut notice = RetryNotice {
            addr,
            quiet: args.quiet,
            last: None,
            retried: false,
        };
        let producer = Producer::connect_retrying(
            addr,
            ProducerConfig {
                producer_name: args.idempotent_name.clone(),
                delivery_timeout: retry_timeout,
                client: args.broker.client_config(),
                on_retry: (!args.quiet).then(produce_retry_notice),
                ..ProducerConfig::default()
            },
            |e, left| notice.retry(e, left),
        )
        .await
        .map_err(|e| ProduceFail::Connect {
            error: e,
            // A first attempt that hung until the deadline gave up too.
            retried: notice.retried || started.elapsed() >= retry_timeout,
        })?;
        if notice.retried && !args.quiet {
            eprintln!("skiff: connected to {addr}");
        }
        let key = args.key.as_deref().map(str::as_bytes);
        // Each delivery with its record's number, for an error about the
        // record alone to name it.
        let mut pending: VecDeque<(u64, Delivery)> = VecDeque::new();
        let mut sent = 0u64;
        let header = args.msg_id_header.as_deref();
        let mut send = |input: &[u8]| -> Result<(u64, Delivery), ProduceFail> {
            sent += 1;
            let (value, id): (&[u8], Option<&[u8]>) = match header {
                None => (input, None),
                Some(_) => match input.iter().position(|&b| b == b'\t') {
                    Some(i) => (&input[i + 1..], Some(&input[..i])),
                    None => return Err(ProduceFail::NoMsgId(sent)),
                },
            };
            let headers: Vec<(&str, &[u8])> = header.zip(id).into_iter().collect();
            let delivery = match args.partition {
                Some(p) => producer.send_to(&args.topic, p, key, value, &headers),
                None => producer.send(&args.topic, key, value, &headers),
            };
            Ok((sent, delivery))
        };
        async fn settle(
            pending: &mut VecDeque<(u64, Delivery)>,
            keep: usize,
        ) -> Result<(), ProduceFail> {
            while pending.len() > keep {
                let (n, delivery) = pending.pop_front().expect("non-empty");
                delivery.await.map_err(|e| match e {
                    ClientError::RecordTooLarge { .. } => ProduceFail::Record(n, e),
                    e => ProduceFail::Client(e),
                })?;
            }
            Ok(())
        }
        if args.tombstone {
            let key = key.expect("clap requires --key with --tombstone");
            let delivery = producer.send_tombstone(&args.topic, args.partition, key);
            pending.push_back((1, delivery));
        } else if args.values.is_empty() {
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
        Ok::<u64, ProduceFail>(producer.duplicates_dropped())
    });
    match result {
        Ok(duplicates) => {
            if duplicates > 0 && !args.quiet {
                eprintln!(
                    "skiff: {duplicates} record{} dropped as duplicate{} (a message id the topic had seen)",
                    if duplicates == 1 { "" } else { "s" },
                    if duplicates == 1 { "" } else { "s" }
                );
            }
            ExitCode::SUCCESS
        }
        Err(ProduceFail::Connect { error, .. }) if !is_connect_failure(&error) => match error {
            // Refused once connected (no producer id for this identity).
            ClientError::Server { .. } => fail(
                exit_code_for(&error),
                format!("produce to {}: {error}", args.topic),
            ),
            _ => fail(exit_code_for(&error), error),
        },
        Err(ProduceFail::Connect { error, retried }) => {
            let waited = if retried {
                format!(
                    " (gave up after --retry-timeout-ms {})",
                    args.retry_timeout_ms
                )
            } else {
                String::new()
            };
            fail(
                exit_code_for(&error),
                format!("cannot connect to {addr}: {error}{waited}"),
            )
        }
        Err(ProduceFail::Client(e)) => {
            fail(exit_code_for(&e), format!("produce to {}: {e}", args.topic))
        }
        Err(ProduceFail::Record(n, e)) => fail(
            exit_code_for(&e),
            format!("produce to {}: {}: {e}", args.topic, record_name(&args, n)),
        ),
        Err(ProduceFail::NoMsgId(n)) => fail(
            EXIT_USAGE,
            format!(
                "{} has no TAB between its message id and value (--msg-id-header)",
                record_name(&args, n)
            ),
        ),
    }
}

/// Record n (1-based) as its input names it: a line of stdin, or a VALUE
/// argument.
fn record_name(args: &ProduceArgs, n: u64) -> String {
    if args.tombstone {
        "the tombstone".to_owned()
    } else if args.values.is_empty() {
        format!("line {n}")
    } else {
        format!("value {n}")
    }
}

/// Why `skiff produce` stopped.
enum ProduceFail {
    /// No producer: the broker could not be reached (in time).
    Connect {
        error: ClientError,
        retried: bool,
    },
    Client(ClientError),
    /// Record number n (1-based) failed on its own (too large for a batch).
    Record(u64, ClientError),
    /// Record number n (1-based) has no `ID<TAB>` prefix.
    NoMsgId(u64),
}

impl From<ClientError> for ProduceFail {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

/// A partition's last stable offset (`fallback` from a server without
/// transactions): a fetch that reads nothing.
pub(super) async fn last_stable_offset(
    client: &Client,
    topic: &str,
    partition: u32,
    fallback: u64,
) -> Result<u64, ClientError> {
    let r = client
        .fetch(crate::protocol::FetchRequest {
            partitions: vec![crate::protocol::FetchPartition {
                topic: topic.to_owned(),
                partition,
                offset: fallback,
                max_bytes: 0,
            }],
            max_wait_ms: 0,
            min_bytes: 0,
            isolation: Some(crate::protocol::Isolation::ReadCommitted),
        })
        .await?;
    Ok(r.partitions
        .first()
        .and_then(|p| p.last_stable_offset)
        .unwrap_or(fallback))
}

pub(super) fn parse_from(from: &str) -> Option<StartFrom> {
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

pub(super) fn record_json(r: &ConsumerRecord) -> serde_json::Value {
    let (key, key_encoding) = match &r.key {
        Some(k) => {
            let (v, e) = json_bytes(k);
            (v, serde_json::Value::from(e))
        }
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    let (value, value_encoding) = if r.tombstone {
        (serde_json::Value::Null, serde_json::Value::Null)
    } else {
        let (v, e) = json_bytes(&r.value);
        (v, serde_json::Value::from(e))
    };
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
    if let Err(code) = check_topic_name(&args.topic) {
        return code;
    }
    if args.share_group.is_some() {
        return super::share::consume(args);
    }
    if args.exec.is_some() {
        return fail(EXIT_USAGE, "--exec needs --share-group G");
    }
    if args.group.is_some() {
        return super::groups::consume(args);
    }
    let from_arg = args.from.as_deref().unwrap_or("earliest");
    let Some(from) = parse_from(from_arg) else {
        return fail(
            EXIT_USAGE,
            format!("--from {from_arg}: expected earliest, latest, an offset or @UNIX_MS"),
        );
    };
    let client = match connect(&args.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    use std::io::IsTerminal as _;
    let result = smol::block_on(async {
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(args.timeout_ms.unwrap_or(500).clamp(1, 500)),
            offset_reset: OffsetReset::Earliest,
            isolation: args.isolation.wire(),
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::new(client, config);
        let partitions = args.partition.map(|p| vec![p]);
        consumer
            .assign(&args.topic, partitions.as_deref(), from)
            .await?;
        // Without a count or a timeout, a pipe or a file gets the log as it
        // is now, and the command ends (kcat's -e); a terminal follows it.
        let to_end = args.count.is_none()
            && args.timeout_ms.is_none()
            && !args.follow
            && !stdout.is_terminal();
        let mut ends = Vec::new();
        if to_end {
            for (_, p, _) in consumer.assignment() {
                let mut end = consumer
                    .client()
                    .offset_for(&args.topic, p, OffsetSpec::Latest)
                    .await?
                    .unwrap_or(0);
                if args.isolation == IsolationArg::ReadCommitted {
                    // Records past an open transaction are not readable yet:
                    // the end is the last stable offset.
                    end =
                        end.min(last_stable_offset(consumer.client(), &args.topic, p, end).await?);
                }
                ends.push((p, end));
            }
        }
        let at_end = |c: &Consumer| {
            to_end
                && ends
                    .iter()
                    .all(|&(p, end)| c.position(&args.topic, p).is_some_and(|o| o >= end))
        };
        let mut seen = 0u64;
        let mut last_record = Instant::now();
        let mut out = std::io::BufWriter::new(stdout.lock());
        loop {
            if args.count.is_some_and(|c| seen >= c) || at_end(&consumer) {
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

/// `skiff acl check IDENTITY OPERATION TOPIC`: the decision and the rule
/// behind it, from the config's `[acl]`, as the broker would decide.
pub fn acl(command: AclCommand) -> ExitCode {
    let AclCommand::Check {
        identity,
        operation,
        topic,
        config,
    } = command;
    let cfg = match crate::config::Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let Some(op) = crate::server::acl::Operation::parse(&operation) else {
        return fail(
            EXIT_USAGE,
            format!(
                "{operation:?} is not an operation: {}",
                crate::config::ACL_OPERATIONS.join(", ")
            ),
        );
    };
    let decision = crate::server::acl::Acl::from_config(&cfg.acl).decide(&identity, op, &topic);
    outln!("{decision}");
    if decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_RUNTIME)
    }
}

pub fn groups(command: GroupsCommand) -> ExitCode {
    super::groups::groups(command)
}

pub fn mirror(command: MirrorCommand) -> ExitCode {
    let broker = match &command {
        MirrorCommand::Status { broker, .. }
        | MirrorCommand::Pause { broker, .. }
        | MirrorCommand::Resume { broker, .. } => broker.clone(),
    };
    let client = match connect(&broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result: Result<(), ClientError> = smol::block_on(async {
        match command {
            MirrorCommand::Status { format, .. } => {
                let s = client.mirror_status().await?;
                print_mirror_status(&s, format);
            }
            MirrorCommand::Pause { rule, .. } => client.mirror_pause(&rule, true).await?,
            MirrorCommand::Resume { rule, .. } => client.mirror_pause(&rule, false).await?,
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code_for(&e), e),
    }
}

fn print_mirror_status(s: &crate::protocol::MirrorStatusResponse, format: OutputFormat) {
    let link = if s.link_up { "up" } else { "down" };
    if format == OutputFormat::Json {
        let rules: Vec<serde_json::Value> = s
            .rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "paused": r.paused,
                    "partitions": r.partitions,
                    "backlog_records": r.backlog_records,
                    "bytes_at_risk": r.bytes_at_risk,
                    "forwarded_records": r.forwarded_records,
                    "forwarded_bytes": r.forwarded_bytes,
                    "dropped_records": r.dropped_records,
                    "rate_bytes_per_s": r.rate_bytes_per_s,
                    "eta_s": r.eta_s,
                    "open_windows": r.open_windows,
                    "windows_emitted": r.windows_emitted,
                    "windows_closed_early": r.windows_closed_early,
                    "late_records": r.late_records,
                    "malformed_records": r.malformed_records,
                })
            })
            .collect();
        let v = serde_json::json!({
            "enabled": s.enabled,
            "link": link,
            "last_error": s.last_error,
            "gateway": s.gateway,
            "upstream": s.upstream,
            "transactions_committed": s.transactions_committed,
            "transactions_aborted": s.transactions_aborted,
            "rules": rules,
        });
        outln!("{v}");
        return;
    }
    if !s.enabled {
        outln!("mirror: off (no [mirror] upstream configured)");
        return;
    }
    outln!("link: {link} ({} as '{}')", s.upstream, s.gateway);
    if let Some(e) = &s.last_error {
        outln!("last error: {e}");
    }
    outln!(
        "transactions: {} committed, {} aborted",
        s.transactions_committed,
        s.transactions_aborted
    );
    for r in &s.rules {
        outln!(
            "rule {}{}: {} partition(s), backlog {} record(s) ({} at risk), rate {}/s, eta {}, forwarded {} ({}), dropped {}",
            r.name,
            if r.paused { " (paused)" } else { "" },
            r.partitions,
            r.backlog_records,
            human(r.bytes_at_risk),
            human(r.rate_bytes_per_s.unwrap_or(0)),
            r.eta_s.map_or_else(|| "-".to_owned(), eta),
            r.forwarded_records,
            human(r.forwarded_bytes),
            r.dropped_records
        );
        let counted = [
            r.open_windows,
            r.windows_emitted,
            r.windows_closed_early,
            r.late_records,
            r.malformed_records,
        ];
        if counted.iter().any(|&n| n > 0) {
            outln!(
                "  windows: {} open, {} emitted ({} closed early), {} late and {} malformed record(s)",
                r.open_windows,
                r.windows_emitted,
                r.windows_closed_early,
                r.late_records,
                r.malformed_records
            );
        }
    }
}

/// `1h02m`, `3m05s`, `42s`.
fn eta(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

pub fn bench(command: BenchCommand) -> ExitCode {
    match command {
        BenchCommand::Produce(a) => super::bench::produce(a),
        BenchCommand::Consume(a) => super::bench::consume(a),
        BenchCommand::Disk(a) => super::bench::disk(a),
        BenchCommand::Sync(a) => super::bench::sync(a),
        BenchCommand::Loopback(a) => super::bench::loopback(a),
        BenchCommand::Handshake(a) => super::bench::handshake(a),
        BenchCommand::Group(a) => super::bench_group::group(a),
        BenchCommand::Share(a) => super::bench_share::share(a),
        BenchCommand::Txn(a) => super::txn::bench(a),
    }
}
