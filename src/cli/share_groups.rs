//! `skiff share-groups list | describe G | delete G`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::client::ClientError;
use crate::protocol::{DescribeShareGroupResponse, ShareGroupListing, SharePartitionState};

use super::args::{OutputFormat, ShareGroupsCommand};
use super::commands::{connect, exit_code_for};
use super::fail;

pub fn share_groups(command: ShareGroupsCommand) -> ExitCode {
    let broker = match &command {
        ShareGroupsCommand::List { broker, .. }
        | ShareGroupsCommand::Describe { broker, .. }
        | ShareGroupsCommand::Delete { broker, .. } => broker.clone(),
    };
    let client = match connect(&broker) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result: Result<(), ClientError> = smol::block_on(async {
        match command {
            ShareGroupsCommand::List { format, .. } => {
                print_list(&client.list_share_groups().await?, format);
            }
            ShareGroupsCommand::Describe { group, format, .. } => {
                let d = client.describe_share_group(&group).await?;
                match format {
                    OutputFormat::Json => outln!("{}", describe_json(&d)),
                    OutputFormat::Text => print_describe(&d),
                }
            }
            ShareGroupsCommand::Delete { group, .. } => {
                client.delete_share_group(&group).await?;
                eprintln!("skiff: share group {group} deleted");
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code_for(&e), e),
    }
}

fn print_list(groups: &[ShareGroupListing], format: OutputFormat) {
    if format == OutputFormat::Json {
        let v: Vec<serde_json::Value> = groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "group": g.group,
                    "topics": g.topics,
                    "partitions": g.partitions,
                    "in_flight": g.in_flight,
                    "members": g.members,
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(v));
        return;
    }
    for g in groups {
        outln!(
            "{}: topics {} partitions {} in_flight {} members {}",
            g.group,
            if g.topics.is_empty() {
                "-".to_owned()
            } else {
                g.topics.join(",")
            },
            g.partitions,
            g.in_flight,
            g.members
        );
    }
}

/// Records not done, by delivery count.
fn delivery_counts(p: &SharePartitionState) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    for r in &p.records {
        *counts.entry(r.delivery_count).or_default() += 1;
    }
    counts
}

/// The JSON of `share-groups describe --format json` (docs/queues.md).
fn describe_json(d: &DescribeShareGroupResponse) -> serde_json::Value {
    serde_json::json!({
        "group": d.group,
        "members": d.members.iter().map(|m| serde_json::json!({
            "member_id": m.member_id,
            "acquired": m.acquired,
            "active_ms": m.active_ms,
        })).collect::<Vec<_>>(),
        "partitions": d.partitions.iter().map(|p| serde_json::json!({
            "topic": p.topic,
            "partition": p.partition,
            "start": p.start,
            "next": p.next,
            "log_end": p.log_end,
            "acquired": p.acquired,
            "awaiting_redelivery": p.available,
            "done": p.done,
            "delivery_counts": delivery_counts(p)
                .into_iter()
                .map(|(n, c)| (n.to_string(), serde_json::json!(c)))
                .collect::<serde_json::Map<_, _>>(),
            "records": p.records.iter().map(|r| serde_json::json!({
                "offset": r.offset,
                "state": r.state,
                "delivery_count": r.delivery_count,
                "member_id": r.member_id,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_describe(d: &DescribeShareGroupResponse) {
    outln!("share group: {}", d.group);
    outln!("members: {}", d.members.len());
    for m in &d.members {
        outln!(
            "  {}: {} acquired, active for {} ms more",
            m.member_id,
            m.acquired,
            m.active_ms
        );
    }
    for p in &d.partitions {
        outln!(
            "{}/{}: start {} next {} log_end {} acquired {} awaiting_redelivery {} done {}",
            p.topic,
            p.partition,
            p.start,
            p.next,
            p.log_end.map_or("-".to_owned(), |e| e.to_string()),
            p.acquired,
            p.available,
            p.done
        );
        let counts = delivery_counts(p);
        if !counts.is_empty() {
            let counts: Vec<String> = counts
                .iter()
                .map(|(n, c)| format!("{n} ({c} record{})", if *c == 1 { "" } else { "s" }))
                .collect();
            outln!("  delivery counts: {}", counts.join(", "));
        }
    }
}
