//! `skiff consume --group` and `skiff groups ...`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::client::{Client, ClientError, GroupConfig, GroupConsumer, OffsetReset, StartFrom};
use crate::protocol::{DescribeGroupResponse, OffsetCommitPartition, OffsetSpec};

use super::args::*;
use super::commands::{
    check_broker, check_topic_name, connect, exit_code_for, parse_from, record_json,
};
use super::{fail, EXIT_USAGE};

/// How often `consume --group` commits what it printed (and always
/// before giving a partition up, and at exit).
const GROUP_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a rebalance waits for a `consume --group` member; it polls
/// every half second at most, so this is generous.
const GROUP_MAX_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// How often a stop signal is looked for while a poll is waiting.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

pub fn consume(args: ConsumeArgs) -> ExitCode {
    let group = args.group.clone().expect("called with --group");
    let start_from = match args.from.as_deref().unwrap_or("latest") {
        "earliest" => StartFrom::Earliest,
        "latest" => StartFrom::Latest,
        other => {
            return fail(
                EXIT_USAGE,
                format!(
                    "--from {other} with --group: use earliest or latest (where a partition without a committed offset starts); to move a group's offsets use skiff groups reset-offsets"
                ),
            )
        }
    };
    if args.partition.is_some() {
        return fail(
            EXIT_USAGE,
            "--partition and --group cannot be used together: the group assigns the partitions",
        );
    }
    if let Err(code) = check_broker(&args.broker.broker) {
        return code;
    }
    // A second signal ends it at once: a clean stop's commit and leave
    // wait for a broker that may not answer.
    let stop = match super::stop_flag_or_quit() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let client = match connect(&args.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let session_timeout = Duration::from_millis(args.session_timeout_ms);
    let mut cfg = GroupConfig::new(&group, &[&args.topic]);
    cfg.assignor = args.assignor.clone();
    cfg.session_timeout = session_timeout;
    // Five heartbeats per session: a lost one or two do not end it.
    cfg.heartbeat_interval = (session_timeout / 5).max(Duration::from_millis(50));
    cfg.max_poll_interval = GROUP_MAX_POLL_INTERVAL;
    cfg.auto_commit_interval = Some(GROUP_COMMIT_INTERVAL);
    // What is printed is what is committed, not what was fetched.
    cfg.mark_on_poll = false;
    cfg.start_from = start_from;
    cfg.client_name = Some(format!(
        "skiff-cli/{} pid {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    ));
    cfg.consumer.max_wait = Duration::from_millis(args.timeout_ms.unwrap_or(500).clamp(1, 500));
    cfg.consumer.offset_reset = OffsetReset::Earliest;
    cfg.consumer.isolation = args.isolation.wire();
    cfg.consumer.client = client.config().clone();
    let mut member = GroupConsumer::new(client, cfg);
    let stdout = std::io::stdout();
    let result = smol::block_on(async {
        let mut out = std::io::BufWriter::new(stdout.lock());
        let mut seen = 0u64;
        let mut last_record = Instant::now();
        let read: Result<(), ClientError> = async {
            loop {
                if stop.load(Ordering::Relaxed) || args.count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
                let polled = futures_lite::future::or(async { Some(member.poll().await) }, async {
                    while !stop.load(Ordering::Relaxed) {
                        smol::Timer::after(SIGNAL_CHECK).await;
                    }
                    None
                })
                .await;
                let Some(records) = polled else {
                    return Ok(());
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
                        return Ok(());
                    }
                    continue;
                }
                last_record = Instant::now();
                let mut printed = 0;
                for r in &records {
                    if args.count.is_some_and(|c| seen >= c) {
                        break;
                    }
                    let written = match args.format {
                        OutputFormat::Text => {
                            out.write_all(&r.value).and_then(|()| out.write_all(b"\n"))
                        }
                        OutputFormat::Json => writeln!(out, "{}", record_json(r)),
                    };
                    if written.is_err() {
                        // stdout closed (a pipe into `head`): stop quietly.
                        // Nothing of this poll is marked: which of its
                        // records got out before the error is not known.
                        return Ok(());
                    }
                    seen += 1;
                    printed += 1;
                }
                // Marked (so committed) only once flushed: a record still
                // in the buffer when stdout closes was never printed.
                if out.flush().is_err() {
                    return Ok(());
                }
                for r in &records[..printed] {
                    member.mark_consumed(&r.topic, r.partition, r.offset);
                }
            }
        }
        .await;
        let _ = out.flush();
        // Commit what was printed and leave, also after an error.
        let closed = member.close().await;
        (read, closed)
    });
    let what = format!("consume {} --group {group}", args.topic);
    match result {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        // A clean stop, but what was printed since the last commit will
        // be printed again: said so, with a status of its own.
        (Ok(()), Err(e)) => fail(
            super::EXIT_UNCOMMITTED,
            format!("{what}: stopped; {}", not_committed(&e)),
        ),
        (Err(e), Ok(())) => fail(exit_code_for(&e), format!("{what}: {e}")),
        (Err(e), Err(c)) => fail(
            exit_code_for(&e),
            format!("{what}: {e}; {}", not_committed(&c)),
        ),
    }
}

/// Why a member's last commit failed, and what that means for the records.
fn not_committed(e: &ClientError) -> String {
    match e {
        // Sent and not answered: a broker that was only slow (stopped,
        // swapping) may still take it when it goes on.
        ClientError::Timeout => "offsets maybe not committed: the broker did not answer the \
             commit in time; the next member re-reads from the last commit it took"
            .to_owned(),
        e => format!("offsets not committed: {e}; the next member re-reads from the last commit"),
    }
}

pub fn groups(command: GroupsCommand) -> ExitCode {
    let broker = match &command {
        GroupsCommand::List { broker }
        | GroupsCommand::Describe { broker, .. }
        | GroupsCommand::ResetOffsets { broker, .. }
        | GroupsCommand::Delete { broker, .. } => broker.clone(),
    };
    if let GroupsCommand::ResetOffsets { topic, .. } = &command {
        if let Err(code) = check_topic_name(topic) {
            return code;
        }
    }
    let client = match connect(&broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result: Result<(), ResetError> = smol::block_on(async {
        match command {
            GroupsCommand::List { .. } => {
                for g in client.list_groups().await? {
                    outln!("{}\t{}\t{} member(s)", g.group, g.state, g.members);
                }
            }
            GroupsCommand::Describe { group, format, .. } => {
                let d = client.describe_group(&group).await?;
                match format {
                    OutputFormat::Json => outln!("{}", describe_json(&d)),
                    OutputFormat::Text => print_describe(&d),
                }
            }
            GroupsCommand::ResetOffsets {
                group, topic, to, ..
            } => reset_offsets(&client, &group, &topic, &to).await?,
            GroupsCommand::Delete { group, .. } => client.delete_group(&group).await?,
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(ResetError::Usage(m)) => fail(EXIT_USAGE, m),
        Err(ResetError::Client(e)) => fail(exit_code_for(&e), e),
    }
}

/// A `groups` command's failure: bad arguments (2) or the broker's answer.
enum ResetError {
    Usage(String),
    Client(ClientError),
}

impl From<ClientError> for ResetError {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

async fn reset_offsets(
    client: &Client,
    group: &str,
    topic: &str,
    to: &str,
) -> Result<(), ResetError> {
    let Some(to) = parse_from(to) else {
        return Err(ResetError::Usage(format!(
            "--to {to}: expected earliest, latest, an offset or @UNIX_MS"
        )));
    };
    // An unknown group is an error, as for describe and delete; one with
    // members is refused by the broker too (group_not_empty).
    let d = client.describe_group(group).await?;
    if !d.members.is_empty() {
        return Err(ResetError::Client(ClientError::Server {
            code: crate::protocol::ErrorCode::GroupNotEmpty,
            message: format!(
                "group '{group}' has {} member(s): stop them before resetting its offsets",
                d.members.len()
            ),
        }));
    }
    let partitions = client.partition_count(topic).await?;
    let mut offsets = Vec::new();
    for p in 0..partitions {
        let offset = match to {
            // Kept inside the log, as Kafka's kafka-consumer-groups does:
            // an offset past the end would skip the records written up to
            // it, and one before the start means the earliest anyway.
            StartFrom::Offset(o) => {
                let earliest = latest_or(client, topic, p, OffsetSpec::Earliest).await?;
                let latest = latest_or(client, topic, p, OffsetSpec::Latest).await?;
                let clamped = o.clamp(earliest, latest.max(earliest));
                if clamped != o {
                    let (side, edge) = if o > latest {
                        ("past the log end", latest)
                    } else {
                        ("before the earliest offset", earliest)
                    };
                    eprintln!("skiff: {topic}/{p}: offset {o} is {side} {edge}: set to {clamped}");
                }
                clamped
            }
            StartFrom::Earliest => latest_or(client, topic, p, OffsetSpec::Earliest).await?,
            StartFrom::Latest => latest_or(client, topic, p, OffsetSpec::Latest).await?,
            StartFrom::Timestamp(ms) => {
                match client
                    .offset_for(topic, p, OffsetSpec::Timestamp(ms))
                    .await?
                {
                    Some(o) => o,
                    None => latest_or(client, topic, p, OffsetSpec::Latest).await?,
                }
            }
        };
        offsets.push(OffsetCommitPartition {
            topic: topic.to_owned(),
            partition: p,
            offset,
            metadata: None,
        });
    }
    client.commit_offsets(group, None, offsets.clone()).await?;
    for o in offsets {
        outln!("{group} {}/{}: {}", o.topic, o.partition, o.offset);
    }
    Ok(())
}

async fn latest_or(
    client: &Client,
    topic: &str,
    partition: u32,
    spec: OffsetSpec,
) -> Result<u64, ClientError> {
    Ok(client
        .offset_for(topic, partition, spec)
        .await?
        .unwrap_or(0))
}

/// The JSON of `groups describe --format json` (a contract: see the
/// issue's CLI section and docs/operations.md).
fn describe_json(d: &DescribeGroupResponse) -> serde_json::Value {
    serde_json::json!({
        "group": d.group,
        "state": d.state,
        "generation": d.generation,
        "protocol": d.assignor,
        "members": d.members.iter().map(|m| serde_json::json!({
            "member_id": m.member_id,
            "instance_id": m.instance_id,
            "client": m.client,
            "assignment": m.assignment.iter().map(|p| serde_json::json!({
                "topic": p.topic,
                "partition": p.partition,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "offsets": d.offsets.iter().map(|o| serde_json::json!({
            "topic": o.topic,
            "partition": o.partition,
            "committed": o.committed,
            "log_end": o.log_end,
            "lag": o.lag,
        })).collect::<Vec<_>>(),
    })
}

fn print_describe(d: &DescribeGroupResponse) {
    outln!("group: {}", d.group);
    outln!("state: {}", d.state);
    outln!("generation: {}", d.generation);
    outln!("protocol: {}", d.assignor.as_deref().unwrap_or("-"));
    outln!("members: {}", d.members.len());
    for m in &d.members {
        let parts: Vec<String> = m
            .assignment
            .iter()
            .map(|p| format!("{}/{}", p.topic, p.partition))
            .collect();
        outln!(
            "  {} ({}{}): {}",
            m.member_id,
            m.client,
            m.instance_id
                .as_deref()
                .map(|i| format!(", instance {i}"))
                .unwrap_or_default(),
            if parts.is_empty() {
                "-".into()
            } else {
                parts.join(" ")
            }
        );
    }
    let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for o in &d.offsets {
        outln!(
            "{}/{}: committed {} log_end {} lag {}",
            o.topic,
            o.partition,
            show(o.committed),
            show(o.log_end),
            show(o.lag)
        );
    }
}
