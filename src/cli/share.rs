//! `skiff consume --share-group G --exec CMD` (a queue worker) and
//! `skiff dlq list|replay` (docs/queues.md).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::share::{
    DLQ_DELIVERY_COUNT_HEADER, DLQ_ERROR_HEADER, DLQ_HEADER_PREFIX, DLQ_OFFSET_HEADER,
    DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};
use crate::client::{
    Client, ClientError, Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, Outcome, Producer,
    ProducerConfig, ShareConfig, ShareConsumer, SlotWaitHook, StartFrom,
};
use crate::protocol::{ErrorCode, OffsetSpec, ShareRecord};

use super::args::*;
use super::commands::{check_topic_name, connect, exit_code_for, record_json};
use super::{fail, EXIT_USAGE};

/// EX_TEMPFAIL (sysexits.h): the command asks for the record again later.
pub const EXIT_TEMPFAIL: i32 = 75;
/// The share group `dlq replay` keeps its place in the dead-letter topic
/// with.
pub const REPLAY_GROUP: &str = "skiff-dlq-replay";

/// `skiff consume T --share-group G --exec CMD`: runs CMD for each record
/// (the value on stdin, the rest in the environment); exit 0 accepts the
/// record, 75 releases it for redelivery, anything else rejects it.
pub fn consume(args: ConsumeArgs) -> ExitCode {
    let group = args.share_group.clone().expect("called with --share-group");
    let Some(cmd) = args.exec.clone() else {
        return fail(
            EXIT_USAGE,
            "--share-group needs --exec CMD: the command run for each record",
        );
    };
    let from_earliest = match args.from.as_deref() {
        None | Some("latest") => false,
        Some("earliest") => true,
        Some(other) => {
            return fail(
                EXIT_USAGE,
                format!("--from {other}: with --share-group, earliest or latest"),
            )
        }
    };
    if args.group.is_some() || args.partition.is_some() {
        return fail(
            EXIT_USAGE,
            "--share-group takes records from every partition: not with --group or --partition",
        );
    }
    // SIGTERM or SIGINT: the command in hand is stopped and its record
    // released for another worker at once, rather than left locked (and
    // the command left running) until lock_ms. A second signal ends the
    // worker at once: its release and leave wait for a broker that may
    // not answer.
    let stop = match super::stop_flag_or_quit() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let client = match connect(&args.broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (slot_wait, on_slot_wait) =
        slot_wait_flagged(format!("consume {} --share-group {group}", args.topic));
    let config = ShareConfig {
        max_records: 1,
        max_wait: Duration::from_millis(args.timeout_ms.unwrap_or(500).clamp(1, 500)),
        from_earliest,
        // A worker waits for a member slot as long as for a record.
        retry_timeout: args.timeout_ms.map_or(Duration::MAX, Duration::from_millis),
        on_slot_wait: Some(on_slot_wait),
        ..ShareConfig::default()
    };
    let worker = ShareConsumer::new(client, &group, &args.topic, config);
    let result = smol::block_on(async {
        let worked = work(&worker, &args, &cmd, &stop, &slot_wait).await;
        // Whatever ended the loop: records still locked to this worker go
        // to the others now, and the group may be deleted, rather than
        // both waiting out lock_ms. Nothing depends on it, so a failure
        // only warns.
        if let Err(e) = worker.leave().await {
            eprintln!("skiff: leaving share group {group}: {e}; its locks lapse after lock_ms");
        }
        worked
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(
            exit_code_for(&e),
            format!("consume {} --share-group {group}: {e}", args.topic),
        ),
    }
}

/// Says on stderr that `what` waits for a member slot.
fn slot_wait_notice(what: String) -> SlotWaitHook {
    SlotWaitHook(Arc::new(move |e| {
        eprintln!("skiff: {what}: waiting for a share-member slot ({e})");
    }))
}

/// [`slot_wait_notice`], which also sets the flag returned, for
/// [`unless_stopped_waiting`] to learn that the ask in hand waits for a
/// member slot.
fn slot_wait_flagged(what: String) -> (Arc<AtomicBool>, SlotWaitHook) {
    let flag = Arc::new(AtomicBool::new(false));
    let notice = slot_wait_notice(what);
    let set = flag.clone();
    let hook = SlotWaitHook(Arc::new(move |e| {
        set.store(true, Ordering::Relaxed);
        (notice.0)(e);
    }));
    (flag, hook)
}

/// How often a stop signal is looked for while a poll or an
/// acknowledgement waits for a member slot.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// `ask`'s result, or `None` once a stop signal came while it waits for a
/// member slot (`slot_wait`, which the slot-wait hook sets), which
/// without `--timeout-ms` has no end. A fetch or acknowledgement that is
/// not waiting for a slot is let finish (a fetch within `max_wait`), so
/// a stop drops only asks that were being refused, which lock nothing;
/// one that got a slot just then locks at most a record, until lock_ms.
async fn unless_stopped_waiting<T>(
    stop: &AtomicBool,
    slot_wait: &AtomicBool,
    ask: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Option<Result<T, ClientError>> {
    slot_wait.store(false, Ordering::Relaxed);
    futures_lite::future::or(async { Some(ask.await) }, async {
        while !(stop.load(Ordering::Relaxed) && slot_wait.load(Ordering::Relaxed)) {
            smol::Timer::after(SIGNAL_CHECK).await;
        }
        None
    })
    .await
}

/// The worker's loop: a record at a time, until `--count` records, a stop
/// signal, or `--timeout-ms` without one.
async fn work(
    worker: &ShareConsumer,
    args: &ConsumeArgs,
    cmd: &str,
    stop: &AtomicBool,
    slot_wait: &AtomicBool,
) -> Result<u64, ClientError> {
    let mut handled = 0u64;
    let mut last_record = Instant::now();
    loop {
        if args.count.is_some_and(|c| handled >= c) || stop.load(Ordering::Relaxed) {
            break;
        }
        let Some(records) = unless_stopped_waiting(stop, slot_wait, worker.poll()).await else {
            break;
        };
        let records = records?;
        if records.is_empty() {
            if args
                .timeout_ms
                .is_some_and(|t| last_record.elapsed() >= Duration::from_millis(t))
            {
                break;
            }
            continue;
        }
        last_record = Instant::now();
        for r in records {
            let outcome = run_exec(cmd, &args.topic, &r, stop);
            let ack = [(r.partition, r.offset, outcome)];
            let Some(results) = unless_stopped_waiting(stop, slot_wait, worker.ack(&ack)).await
            else {
                eprintln!(
                    "skiff: {}/{} offset {}: stopped while its acknowledgement waited for a share-member slot: it will be delivered again once its lock lapses (lock_ms)",
                    args.topic, r.partition, r.offset
                );
                return Ok(handled);
            };
            let results = results?;
            if let Some(code) = results.first().filter(|c| !c.is_none()) {
                eprintln!(
                    "skiff: {}/{} offset {}: the acknowledgement did not count ({code}): it will be delivered again",
                    args.topic, r.partition, r.offset
                );
            }
            handled += 1;
        }
    }
    Ok(handled)
}

/// How long a command stopped by SIGTERM gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs the command for one record; what its exit status says. Once
/// `stop` is set, the command (its whole process group) gets SIGTERM, then
/// SIGKILL after [`STOP_GRACE`], and the record is released.
fn run_exec(cmd: &str, topic: &str, r: &ShareRecord, stop: &AtomicBool) -> Outcome {
    let key = r
        .key
        .as_ref()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default();
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("SKIFF_TOPIC", topic)
        .env("SKIFF_PARTITION", r.partition.to_string())
        .env("SKIFF_OFFSET", r.offset.to_string())
        .env("SKIFF_KEY", key)
        .env("SKIFF_DELIVERY_COUNT", r.delivery_count.to_string())
        .stdin(Stdio::piped())
        // Its own group, so a stop reaches what the shell started too.
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            // Not the record's fault: try it again later.
            eprintln!("skiff: cannot run {cmd:?}: {e}");
            return Outcome::Release {
                delay: Duration::from_secs(1),
                reason: Some(format!("cannot run the command: {e}")),
            };
        }
    };
    let stdin = child.stdin.take();
    let pid = child.id();
    // Known from the start: a quit while its input is being written (a
    // command that does not read it) still takes it along.
    super::COMMAND_GROUP.store(pid as i32, Ordering::SeqCst);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Forgotten before it is reaped: until then its id, and so its
        // group's, cannot be reused for a process a quit would SIGKILL.
        wait_unreaped(pid);
        super::COMMAND_GROUP.store(0, Ordering::SeqCst);
        let _ = done_tx.send(child.wait());
    });
    if let Some(mut stdin) = stdin {
        // Written off this thread: a command that does not read a value
        // larger than the pipe would block it, and a stop with it. The
        // write ends once the command and all it started have exited.
        let value = r.value.clone();
        std::thread::spawn(move || {
            // A command that does not read its input closes the pipe: fine.
            let _ = stdin.write_all(value.as_deref().map_or(&[][..], |v| &v[..]));
        });
    }
    let status = loop {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(status) => break status,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(std::io::Error::other("the waiting thread ended"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if stop.load(Ordering::Relaxed) {
            return stop_command(pid, &done_rx);
        }
    };
    outcome_of(status)
}

/// Waits for the child `pid` to exit, leaving it to be reaped.
fn wait_unreaped(pid: u32) {
    loop {
        // SAFETY: siginfo_t is plain data, zeroes a valid value; waitid(2)
        // writes only into it, and WNOWAIT leaves the child unreaped.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// SIGTERM to the command's process group, SIGKILL if it is still there
/// after [`STOP_GRACE`]; the record goes back for another worker.
fn stop_command(
    pid: u32,
    done: &std::sync::mpsc::Receiver<std::io::Result<ExitStatus>>,
) -> Outcome {
    let group = -(pid as libc::pid_t);
    // SAFETY: kill(2) only sends a signal, touching no memory of ours. The
    // group is the command's own (process_group(0)); its id is free for
    // reuse only once every process in it is gone.
    unsafe { libc::kill(group, libc::SIGTERM) };
    if done.recv_timeout(STOP_GRACE).is_err() {
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = done.recv();
    }
    Outcome::Release {
        delay: Duration::ZERO,
        reason: Some("the worker was stopped".to_owned()),
    }
}

fn outcome_of(status: std::io::Result<ExitStatus>) -> Outcome {
    match status {
        Ok(s) if s.success() => Outcome::Accept,
        Ok(s) if s.code() == Some(EXIT_TEMPFAIL) => Outcome::Release {
            delay: Duration::ZERO,
            reason: Some(format!("the command exited with status {EXIT_TEMPFAIL}")),
        },
        Ok(s) => Outcome::Reject {
            reason: match s.code() {
                Some(c) => format!("the command exited with status {c}"),
                None => format!("the command was killed ({s})"),
            },
        },
        Err(e) => Outcome::Release {
            delay: Duration::from_secs(1),
            reason: Some(format!("waiting for the command: {e}")),
        },
    }
}

fn header<'a>(r: &'a ConsumerRecord, name: &str) -> Option<&'a [u8]> {
    r.headers
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

fn header_text(r: &ConsumerRecord, name: &str) -> String {
    header(r, name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

pub fn dlq(command: DlqCommand) -> ExitCode {
    let (verb, topic, dead_letter_topic, broker) = match &command {
        DlqCommand::List {
            topic,
            dead_letter_topic,
            broker,
            ..
        } => ("list", topic, dead_letter_topic, broker),
        DlqCommand::Replay {
            topic,
            dead_letter_topic,
            broker,
            ..
        } => ("replay", topic, dead_letter_topic, broker),
    };
    if let Err(code) = check_topic_name(topic).and_then(|()| {
        dead_letter_topic
            .as_deref()
            .map_or(Ok(()), check_topic_name)
    }) {
        return code;
    }
    let dlq = dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{topic}.dlq"));
    // A replay stops cleanly on SIGTERM or SIGINT (`replay_into`): the
    // batch in hand is finished, so a run stopped and run again repeats
    // none, and the group left. A second signal quits at once.
    let stop = match &command {
        DlqCommand::Replay { .. } => match super::stop_flag_or_quit() {
            Ok(s) => s,
            Err(code) => return code,
        },
        DlqCommand::List { .. } => Arc::new(AtomicBool::new(false)),
    };
    let client = match connect(broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = smol::block_on(async {
        let done = match command {
            DlqCommand::List { format, .. } => list(client.clone(), &dlq, format).await,
            DlqCommand::Replay { count, .. } => {
                let n = replay(client.clone(), &dlq, count, &stop).await;
                if let Ok(n) = n {
                    eprintln!("skiff: replayed {n} record(s) from {dlq}");
                }
                n
            }
        };
        match done {
            // The dead-letter topic is made with its first record: before
            // that, a known topic has none rather than an error.
            Err(e)
                if e.code() == Some(ErrorCode::UnknownTopic)
                    && client.partition_count(topic).await.is_ok_and(|n| n > 0) =>
            {
                eprintln!(
                    "skiff: no dead letters: {dlq} is made when the first record of {topic} is dead-lettered"
                );
                Ok(())
            }
            other => other.map(|_| ()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code_for(&e), format!("dlq {verb} {dlq}: {e}")),
    }
}

/// Every record in the dead-letter topic, from its start to its end now.
async fn list(client: Client, dlq: &str, format: OutputFormat) -> Result<u64, ClientError> {
    let mut consumer = Consumer::new(
        client,
        ConsumerConfig {
            max_wait: Duration::from_millis(100),
            offset_reset: OffsetReset::Earliest,
            ..ConsumerConfig::default()
        },
    );
    consumer.assign(dlq, None, StartFrom::Earliest).await?;
    let mut ends = Vec::new();
    for (_, p, _) in consumer.assignment() {
        let end = consumer
            .client()
            .offset_for(dlq, p, OffsetSpec::Latest)
            .await?
            .unwrap_or(0);
        ends.push((p, end));
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if format == OutputFormat::Text {
        let _ = writeln!(
            out,
            "{:<8} {:<32} {:>10} {:>10} {:>10}  ERROR",
            "OFFSET", "FROM", "PARTITION", "AT", "DELIVERIES"
        );
    }
    let mut seen = 0u64;
    while !ends
        .iter()
        .all(|&(p, end)| consumer.position(dlq, p).is_some_and(|o| o >= end))
    {
        for r in consumer.poll().await? {
            if ends
                .iter()
                .any(|&(p, end)| p == r.partition && r.offset >= end)
            {
                continue;
            }
            seen += 1;
            let written = match format {
                OutputFormat::Text => writeln!(
                    out,
                    "{:<8} {:<32} {:>10} {:>10} {:>10}  {}",
                    r.offset,
                    header_text(&r, DLQ_TOPIC_HEADER),
                    header_text(&r, DLQ_PARTITION_HEADER),
                    header_text(&r, DLQ_OFFSET_HEADER),
                    header_text(&r, DLQ_DELIVERY_COUNT_HEADER),
                    header_text(&r, DLQ_ERROR_HEADER),
                ),
                OutputFormat::Json => {
                    let mut j = record_json(&r);
                    j["dlq"] = serde_json::json!({
                        "topic": header_text(&r, DLQ_TOPIC_HEADER),
                        "partition": header_text(&r, DLQ_PARTITION_HEADER).parse::<u32>().ok(),
                        "offset": header_text(&r, DLQ_OFFSET_HEADER).parse::<u64>().ok(),
                        "delivery_count": header_text(&r, DLQ_DELIVERY_COUNT_HEADER).parse::<u32>().ok(),
                        "error": header_text(&r, DLQ_ERROR_HEADER),
                    });
                    writeln!(out, "{j}")
                }
            };
            if written.is_err() {
                return Ok(seen);
            }
        }
    }
    let _ = out.flush();
    Ok(seen)
}

/// Publishes dead-letter records back to their original topic, through the
/// share group [`REPLAY_GROUP`] on the dead-letter topic: a record is
/// accepted there only once its copy is written, so a replay stopped and
/// run again neither loses nor repeats one. A stop (`stop`) ends it
/// between batches, or at once while it waits for a member slot to poll.
async fn replay(
    client: Client,
    dlq: &str,
    count: Option<u64>,
    stop: &AtomicBool,
) -> Result<u64, ClientError> {
    let producer = Producer::new(client.clone(), ProducerConfig::default()).await?;
    let (slot_wait, on_slot_wait) = slot_wait_flagged(format!("dlq replay {dlq}"));
    let worker = ShareConsumer::new(
        client,
        REPLAY_GROUP,
        dlq,
        ShareConfig {
            max_records: 100,
            max_wait: Duration::from_millis(200),
            from_earliest: true,
            on_slot_wait: Some(on_slot_wait),
            ..ShareConfig::default()
        },
    );
    let mut replayed = 0u64;
    let worked = replay_into(
        &producer,
        &worker,
        dlq,
        count,
        (stop, &slot_wait),
        &mut replayed,
    )
    .await;
    // As `consume --share-group`: what this run still holds goes back now,
    // so a second replay need not wait out lock_ms for it.
    if let Err(e) = worker.leave().await {
        eprintln!("skiff: leaving share group {REPLAY_GROUP}: {e}; its locks lapse after lock_ms");
    }
    worked.map(|()| replayed)
}

/// `(stop, slot_wait)`: the stop flag, and whether the poll in hand waits
/// for a member slot. A stop then drops the poll, which locked nothing;
/// once records are in hand their batch is finished (copies written and
/// acknowledged, the acknowledgement's wait for a slot bounded as the
/// poll's), since copies written but not acknowledged would be replayed
/// again by the next run.
async fn replay_into(
    producer: &Producer,
    worker: &ShareConsumer,
    dlq: &str,
    count: Option<u64>,
    (stop, slot_wait): (&AtomicBool, &AtomicBool),
    replayed: &mut u64,
) -> Result<(), ClientError> {
    loop {
        let left = count.map(|c| c.saturating_sub(*replayed));
        if left == Some(0) || stop.load(Ordering::Relaxed) {
            break;
        }
        let n = left.map_or(100, |l| l.min(100) as u32);
        let Some(records) = unless_stopped_waiting(stop, slot_wait, worker.poll_max(n)).await
        else {
            break;
        };
        let records = records?;
        if records.is_empty() {
            break;
        }
        let mut acks = Vec::new();
        let mut sends = Vec::new();
        for r in records {
            let to = r
                .headers
                .iter()
                .rev()
                .find(|h| h.name == DLQ_TOPIC_HEADER)
                .map(|h| String::from_utf8_lossy(&h.value).into_owned());
            let Some(to) = to else {
                let reason = format!("no {DLQ_TOPIC_HEADER} header: not a dead-letter record");
                acks.push((r.partition, r.offset, Outcome::Reject { reason }));
                continue;
            };
            let headers: Vec<(&str, &[u8])> = r
                .headers
                .iter()
                .filter(|h| !h.name.starts_with(DLQ_HEADER_PREFIX))
                .map(|h| (h.name.as_str(), &h.value[..]))
                .collect();
            // A tombstone stays one: an empty value would keep its key.
            let value = r.value.as_deref().map(|v| &v[..]);
            let d = producer.send_copy(&to, r.key.as_deref().map(|k| &k[..]), value, &headers);
            sends.push((r.partition, r.offset, to, d));
        }
        producer.flush().await;
        for (p, o, to, d) in sends {
            match d.await {
                Ok(_) => {
                    acks.push((p, o, Outcome::Accept));
                    *replayed += 1;
                }
                Err(e) => {
                    eprintln!("skiff: {dlq} offset {o}: cannot publish to {to}: {e}");
                    acks.push((
                        p,
                        o,
                        Outcome::Release {
                            delay: Duration::ZERO,
                            reason: Some(e.to_string()),
                        },
                    ));
                }
            }
        }
        for (code, (p, o, _)) in worker.ack(&acks).await?.iter().zip(&acks) {
            if *code != ErrorCode::None {
                eprintln!("skiff: {dlq}/{p} offset {o}: acknowledgement refused ({code})");
            }
        }
        if acks.iter().any(|(_, _, o)| *o != Outcome::Accept) {
            // Something failed: stop rather than loop on it.
            break;
        }
    }
    Ok(())
}
