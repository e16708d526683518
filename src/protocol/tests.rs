//! Codec and wire-format tests. `samples` holds one message of every kind;
//! the golden test pins their bytes and the docs test checks that
//! `docs/protocol.md` shows each of them.

use super::*;
use proptest::prelude::*;

fn partition_meta(partition: u32) -> PartitionMetadata {
    PartitionMetadata {
        partition,
        error: ErrorCode::None,
        earliest_offset: 0,
        latest_offset: 42,
        message: None,
    }
}

fn topic_config() -> TopicConfig {
    TopicConfig {
        name: "sensors.temp".into(),
        partitions: 4,
        segment_bytes: 64 * 1024 * 1024,
        segments: 8,
        retention_ms: None,
        fsync: "always".into(),
        overflow: "overwrite".into(),
        msg_id_window_ms: None,
        msg_id_window_records: None,
        cleanup: None,
        tombstone_retention_ms: None,
    }
}

/// One request of every operation, named for the docs.
pub(super) fn sample_requests() -> Vec<(&'static str, Request<'static>)> {
    let body = |b| Request {
        correlation_id: 1,
        body: b,
    };
    // The share groups' examples in docs/protocol.md number their frames.
    let numbered = |correlation_id, body| Request {
        correlation_id,
        body,
    };
    vec![
        (
            "hello",
            body(RequestBody::Hello(HelloRequest {
                version_min: 1,
                version_max: 1,
                client_name: Some("skiff-cli/0.1.0".into()),
            })),
        ),
        (
            "metadata",
            body(RequestBody::Metadata(MetadataRequest {
                topics: Some(vec!["sensors.temp".into()]),
            })),
        ),
        (
            "create_topic",
            body(RequestBody::CreateTopic(CreateTopicRequest {
                name: "sensors.temp".into(),
                partitions: Some(4),
                fsync: Some("interval:100".into()),
                ..Default::default()
            })),
        ),
        (
            "describe_topic",
            body(RequestBody::DescribeTopic(DescribeTopicRequest {
                name: "sensors.temp".into(),
            })),
        ),
        (
            "list_topics",
            body(RequestBody::ListTopics(ListTopicsRequest {})),
        ),
        (
            "delete_topic",
            body(RequestBody::DeleteTopic(DeleteTopicRequest {
                name: "sensors.temp".into(),
            })),
        ),
        (
            "produce",
            body(RequestBody::Produce(ProduceRequest {
                partitions: vec![ProducePartition {
                    topic: "sensors.temp".into(),
                    partition: 2,
                    batch: b"SKB1...".to_vec().into(),
                }],
            })),
        ),
        (
            "fetch",
            body(RequestBody::Fetch(FetchRequest {
                partitions: vec![FetchPartition {
                    topic: "sensors.temp".into(),
                    partition: 2,
                    offset: 40,
                    max_bytes: 1024 * 1024,
                }],
                max_wait_ms: 500,
                min_bytes: 1,
                isolation: None,
            })),
        ),
        (
            "list_offsets",
            body(RequestBody::ListOffsets(ListOffsetsRequest {
                partitions: vec![
                    ListOffsetsPartition {
                        topic: "sensors.temp".into(),
                        partition: 0,
                        spec: OffsetSpec::Earliest,
                    },
                    ListOffsetsPartition {
                        topic: "sensors.temp".into(),
                        partition: 1,
                        spec: OffsetSpec::Latest,
                    },
                    ListOffsetsPartition {
                        topic: "sensors.temp".into(),
                        partition: 2,
                        spec: OffsetSpec::Timestamp(1_700_000_000_000),
                    },
                ],
            })),
        ),
        (
            "init_producer",
            body(RequestBody::InitProducer(InitProducerRequest {
                producer_name: Some("gateway-7".into()),
                renew: None,
            })),
        ),
        (
            "join_group",
            body(RequestBody::JoinGroup(JoinGroupRequest {
                group: "dashboard".into(),
                member_id: None,
                instance_id: None,
                topics: vec!["sensors.temp".into()],
                assignor: "cooperative-sticky".into(),
                session_timeout_ms: 10_000,
                rebalance_timeout_ms: 30_000,
                owned: vec![],
                client: Some("skiff-cli/0.1.0 pid 4242".into()),
            })),
        ),
        (
            "sync_group",
            body(RequestBody::SyncGroup(SyncGroupRequest {
                group: "dashboard".into(),
                member_id: "skiff-cli-0a1b".into(),
                generation: 3,
            })),
        ),
        (
            "heartbeat",
            body(RequestBody::Heartbeat(HeartbeatRequest {
                group: "dashboard".into(),
                member_id: "skiff-cli-0a1b".into(),
                generation: 3,
            })),
        ),
        (
            "leave_group",
            body(RequestBody::LeaveGroup(LeaveGroupRequest {
                group: "dashboard".into(),
                member_id: "skiff-cli-0a1b".into(),
            })),
        ),
        (
            "offset_commit",
            body(RequestBody::OffsetCommit(OffsetCommitRequest {
                group: "dashboard".into(),
                member_id: Some("skiff-cli-0a1b".into()),
                generation: Some(3),
                offsets: vec![OffsetCommitPartition {
                    topic: "sensors.temp".into(),
                    partition: 0,
                    offset: 1042,
                    metadata: None,
                }],
            })),
        ),
        (
            "offset_fetch",
            body(RequestBody::OffsetFetch(OffsetFetchRequest {
                group: "dashboard".into(),
                partitions: Some(vec![GroupPartition {
                    topic: "sensors.temp".into(),
                    partition: 0,
                }]),
            })),
        ),
        (
            "list_groups",
            body(RequestBody::ListGroups(ListGroupsRequest {})),
        ),
        (
            "describe_group",
            body(RequestBody::DescribeGroup(DescribeGroupRequest {
                group: "dashboard".into(),
            })),
        ),
        (
            "delete_group",
            body(RequestBody::DeleteGroup(DeleteGroupRequest {
                group: "dashboard".into(),
            })),
        ),
        (
            "mirror_status",
            body(RequestBody::MirrorStatus(MirrorStatusRequest {})),
        ),
        (
            "mirror_pause",
            body(RequestBody::MirrorPause(MirrorRuleRequest {
                rule: "temps".into(),
                paused: true,
            })),
        ),
        (
            "share_fetch",
            numbered(
                3,
                RequestBody::ShareFetch(ShareFetchRequest {
                    group: "billing".into(),
                    topic: "orders".into(),
                    member_id: "worker-7f3a".into(),
                    max_records: 10,
                    max_wait_ms: 500,
                    from: Some("earliest".into()),
                }),
            ),
        ),
        (
            "share_ack",
            numbered(
                4,
                RequestBody::ShareAck(ShareAckRequest {
                    group: "billing".into(),
                    topic: "orders".into(),
                    member_id: "worker-7f3a".into(),
                    acks: vec![ShareAck {
                        partition: 0,
                        offset: 41,
                        kind: ShareAckKind::Accept,
                        delay_ms: None,
                        error: None,
                    }],
                }),
            ),
        ),
        (
            "list_share_groups",
            numbered(5, RequestBody::ListShareGroups(ListShareGroupsRequest {})),
        ),
        (
            "describe_share_group",
            numbered(
                6,
                RequestBody::DescribeShareGroup(DescribeShareGroupRequest {
                    group: "billing".into(),
                }),
            ),
        ),
        (
            "delete_share_group",
            numbered(
                7,
                RequestBody::DeleteShareGroup(DeleteShareGroupRequest {
                    group: "billing".into(),
                }),
            ),
        ),
        (
            "share_leave",
            numbered(
                8,
                RequestBody::ShareLeave(ShareLeaveRequest {
                    group: "billing".into(),
                    member_id: "worker-7f3a".into(),
                }),
            ),
        ),
        (
            "compact_topic",
            body(RequestBody::CompactTopic(CompactTopicRequest {
                name: "device-state".into(),
                wait: true,
            })),
        ),
        (
            "describe_partitions",
            body(RequestBody::DescribePartitions(DescribePartitionsRequest {
                name: "sensors.temp".into(),
            })),
        ),
        (
            "alter_topic",
            body(RequestBody::AlterTopic(AlterTopicRequest {
                name: "sensors.temp".into(),
                retention_ms: Some(86_400_000),
                segments: Some(16),
                ..Default::default()
            })),
        ),
        // The transactions' examples in docs/protocol.md number their
        // frames as a producer's connection would: init, produce, offsets,
        // end.
        (
            "init_txn",
            numbered(
                5,
                RequestBody::InitTxn(InitTxnRequest {
                    transactional_id: "orders-writer".into(),
                    transaction_timeout_ms: 60_000,
                }),
            ),
        ),
        (
            "add_txn_offsets",
            numbered(
                8,
                RequestBody::AddTxnOffsets(AddTxnOffsetsRequest {
                    transactional_id: "orders-writer".into(),
                    producer_id: 4001,
                    producer_epoch: 3,
                    group: "billing".into(),
                    offsets: vec![TxnOffset {
                        topic: "orders".into(),
                        partition: 0,
                        offset: 42,
                    }],
                }),
            ),
        ),
        (
            "end_txn",
            numbered(
                9,
                RequestBody::EndTxn(EndTxnRequest {
                    transactional_id: "orders-writer".into(),
                    producer_id: 4001,
                    producer_epoch: 3,
                    commit: true,
                }),
            ),
        ),
        (
            "list_txns",
            numbered(10, RequestBody::ListTxns(ListTxnsRequest {})),
        ),
    ]
}

/// One response of every operation and the error answer, named for the docs.
pub(super) fn sample_responses() -> Vec<(&'static str, Response)> {
    let body = |b| Response {
        correlation_id: 1,
        body: b,
    };
    let numbered = |correlation_id, body| Response {
        correlation_id,
        body,
    };
    vec![
        (
            "error",
            body(ResponseBody::Error(ErrorResponse {
                code: ErrorCode::UnknownTopic,
                message: "no topic named sensors.temp".into(),
            })),
        ),
        (
            "hello",
            body(ResponseBody::Hello(HelloResponse {
                version: 1,
                server_version: "0.1.0".into(),
                max_frame_bytes: 8 * 1024 * 1024,
                max_batch_bytes: 1024 * 1024,
            })),
        ),
        (
            "metadata",
            body(ResponseBody::Metadata(MetadataResponse {
                topics: vec![TopicMetadata {
                    name: "sensors.temp".into(),
                    error: ErrorCode::None,
                    partitions: vec![partition_meta(0)],
                    message: None,
                }],
            })),
        ),
        (
            "create_topic",
            body(ResponseBody::CreateTopic(Box::new(CreateTopicResponse {
                config: topic_config(),
            }))),
        ),
        (
            "describe_topic",
            body(ResponseBody::DescribeTopic(Box::new(
                DescribeTopicResponse {
                    config: TopicConfig {
                        retention_ms: Some(86_400_000),
                        ..topic_config()
                    },
                    partitions: vec![partition_meta(0)],
                },
            ))),
        ),
        (
            "list_topics",
            body(ResponseBody::ListTopics(ListTopicsResponse {
                topics: vec!["sensors.hum".into(), "sensors.temp".into()],
                disk_budget_bytes: None,
                disk_reserved_bytes: None,
            })),
        ),
        (
            "delete_topic",
            body(ResponseBody::DeleteTopic(DeleteTopicResponse {})),
        ),
        (
            "produce",
            body(ResponseBody::Produce(ProduceResponse {
                throttle_ms: None,
                partitions: vec![
                    ProducePartitionResult {
                        topic: "sensors.temp".into(),
                        partition: 2,
                        error: ErrorCode::None,
                        base_offset: 40,
                        last_offset: 49,
                        duplicate_records: 0,
                        message: None,
                    },
                    ProducePartitionResult {
                        topic: "sensors.temp".into(),
                        partition: 3,
                        error: ErrorCode::StorageFull,
                        base_offset: 0,
                        last_offset: 0,
                        duplicate_records: 0,
                        message: Some("ring full of unforwarded data".into()),
                    },
                ],
            })),
        ),
        (
            "fetch",
            body(ResponseBody::Fetch(FetchResponse {
                throttle_ms: None,
                partitions: vec![FetchPartitionResult {
                    topic: "sensors.temp".into(),
                    partition: 2,
                    error: ErrorCode::None,
                    high_watermark: 50,
                    earliest_offset: 0,
                    records: RecordBytes::from(b"SKB1...".to_vec()),
                    last_stable_offset: None,
                    next_offset: None,
                    message: None,
                }],
            })),
        ),
        (
            "list_offsets",
            body(ResponseBody::ListOffsets(ListOffsetsResponse {
                partitions: vec![
                    ListOffsetsPartitionResult {
                        topic: "sensors.temp".into(),
                        partition: 0,
                        error: ErrorCode::None,
                        offset: Some(0),
                        message: None,
                    },
                    ListOffsetsPartitionResult {
                        topic: "sensors.temp".into(),
                        partition: 2,
                        error: ErrorCode::None,
                        offset: None,
                        message: None,
                    },
                ],
            })),
        ),
        (
            "init_producer",
            body(ResponseBody::InitProducer(InitProducerResponse {
                producer_id: 17,
                producer_epoch: 3,
            })),
        ),
        (
            "join_group",
            body(ResponseBody::JoinGroup(JoinGroupResponse {
                member_id: "skiff-cli-0a1b".into(),
                generation: 3,
                assignor: "cooperative-sticky".into(),
                members: 2,
            })),
        ),
        (
            "sync_group",
            body(ResponseBody::SyncGroup(SyncGroupResponse {
                assignment: vec![GroupPartition {
                    topic: "sensors.temp".into(),
                    partition: 0,
                }],
                rejoin: false,
            })),
        ),
        (
            "heartbeat",
            body(ResponseBody::Heartbeat(HeartbeatResponse {})),
        ),
        (
            "leave_group",
            body(ResponseBody::LeaveGroup(LeaveGroupResponse {})),
        ),
        (
            "offset_commit",
            body(ResponseBody::OffsetCommit(OffsetCommitResponse {})),
        ),
        (
            "offset_fetch",
            body(ResponseBody::OffsetFetch(OffsetFetchResponse {
                offsets: vec![CommittedOffset {
                    topic: "sensors.temp".into(),
                    partition: 0,
                    offset: 1042,
                    metadata: None,
                }],
            })),
        ),
        (
            "list_groups",
            body(ResponseBody::ListGroups(ListGroupsResponse {
                groups: vec![GroupListing {
                    group: "dashboard".into(),
                    state: "Stable".into(),
                    members: 2,
                }],
            })),
        ),
        (
            "describe_group",
            body(ResponseBody::DescribeGroup(Box::new(
                DescribeGroupResponse {
                    group: "dashboard".into(),
                    state: "Stable".into(),
                    generation: 3,
                    assignor: Some("cooperative-sticky".into()),
                    members: vec![GroupMember {
                        member_id: "skiff-cli-0a1b".into(),
                        instance_id: None,
                        client: "skiff-cli/0.1.0 pid 4242 (anonymous)".into(),
                        assignment: vec![GroupPartition {
                            topic: "sensors.temp".into(),
                            partition: 0,
                        }],
                    }],
                    offsets: vec![GroupOffset {
                        topic: "sensors.temp".into(),
                        partition: 0,
                        committed: Some(1042),
                        log_end: Some(1100),
                        lag: Some(58),
                        metadata: None,
                    }],
                },
            ))),
        ),
        (
            "delete_group",
            body(ResponseBody::DeleteGroup(DeleteGroupResponse {})),
        ),
        (
            "mirror_status",
            body(ResponseBody::MirrorStatus(Box::new(MirrorStatusResponse {
                enabled: true,
                link_up: true,
                last_error: None,
                gateway: "gw-17".into(),
                upstream: "kafka:9092".into(),
                transactions_committed: 12,
                transactions_aborted: 0,
                rules: vec![MirrorRuleStatus {
                    name: "temps".into(),
                    paused: false,
                    partitions: 2,
                    backlog_records: 0,
                    bytes_at_risk: 0,
                    forwarded_records: 5000,
                    forwarded_bytes: 410000,
                    dropped_records: 0,
                    rate_bytes_per_s: Some(4096),
                    eta_s: None,
                    open_windows: 3,
                    windows_emitted: 40,
                    windows_closed_early: 1,
                    late_records: 2,
                    malformed_records: 5,
                }],
            }))),
        ),
        (
            "mirror_pause",
            body(ResponseBody::MirrorPause(MirrorRuleRequest {
                rule: "temps".into(),
                paused: true,
            })),
        ),
        (
            "share_fetch",
            numbered(
                3,
                ResponseBody::ShareFetch(ShareFetchResponse {
                    records: vec![ShareRecord {
                        partition: 0,
                        offset: 41,
                        timestamp_ms: 1_700_000_000_000,
                        key: None,
                        value: Some(b"ok".to_vec().into()),
                        headers: vec![],
                        delivery_count: 1,
                    }],
                    lock_ms: 30_000,
                }),
            ),
        ),
        (
            "share_ack",
            numbered(
                4,
                ResponseBody::ShareAck(ShareAckResponse {
                    results: vec![ErrorCode::None],
                }),
            ),
        ),
        (
            "list_share_groups",
            numbered(
                5,
                ResponseBody::ListShareGroups(ListShareGroupsResponse {
                    groups: vec![ShareGroupListing {
                        group: "billing".into(),
                        topics: vec!["orders".into()],
                        partitions: 2,
                        in_flight: 3,
                        members: 1,
                    }],
                }),
            ),
        ),
        (
            "describe_share_group",
            numbered(
                6,
                ResponseBody::DescribeShareGroup(DescribeShareGroupResponse {
                    group: "billing".into(),
                    partitions: vec![SharePartitionState {
                        topic: "orders".into(),
                        partition: 0,
                        start: 41,
                        next: 44,
                        log_end: Some(120),
                        acquired: 1,
                        available: 1,
                        done: 1,
                        records: vec![
                            ShareRecordState {
                                offset: 41,
                                state: "acquired".into(),
                                delivery_count: 1,
                                member_id: Some("worker-7f3a".into()),
                            },
                            ShareRecordState {
                                offset: 42,
                                state: "available".into(),
                                delivery_count: 2,
                                member_id: None,
                            },
                        ],
                    }],
                    members: vec![ShareMember {
                        member_id: "worker-7f3a".into(),
                        acquired: 1,
                        active_ms: 29_500,
                    }],
                }),
            ),
        ),
        (
            "delete_share_group",
            numbered(
                7,
                ResponseBody::DeleteShareGroup(DeleteShareGroupResponse {}),
            ),
        ),
        (
            "share_leave",
            numbered(
                8,
                ResponseBody::ShareLeave(ShareLeaveResponse { released: 1 }),
            ),
        ),
        (
            "compact_topic",
            body(ResponseBody::CompactTopic(CompactTopicResponse {
                partitions: vec![
                    CompactedPartition {
                        partition: 0,
                        error: ErrorCode::None,
                        segments_merged: 3,
                        segments_freed: 2,
                        bytes_before: 180_000,
                        bytes_after: 12_000,
                        records_removed: 540,
                        message: None,
                    },
                    CompactedPartition {
                        partition: 1,
                        error: ErrorCode::PartitionQuarantined,
                        segments_merged: 0,
                        segments_freed: 0,
                        bytes_before: 0,
                        bytes_after: 0,
                        records_removed: 0,
                        message: Some(COMPACT_QUARANTINED.into()),
                    },
                ],
            })),
        ),
        (
            "describe_partitions",
            body(ResponseBody::DescribePartitions(
                DescribePartitionsResponse {
                    partitions: vec![
                        PartitionDetail {
                            partition: 0,
                            error: ErrorCode::None,
                            log_start: 0,
                            log_end: 42,
                            bytes: 5120,
                            segments_used: 2,
                            segments: 8,
                            oldest_segment_max_timestamp: Some(1_700_000_060_000),
                            next_retention_at_ms: Some(1_700_086_460_000),
                            next_retention_offsets: Some(20),
                            next_retention_bytes: Some(2560),
                            oldest_timestamp: Some(1_700_000_000_000),
                            damaged: Some(vec![DamagedRange {
                                from_offset: 10,
                                to_offset: 12,
                                bytes: 300,
                                slot: 0,
                                position: 4096,
                                found_ms: 1_700_000_100_000,
                                found: "a batch whose CRC does not match".into(),
                            }]),
                            message: None,
                        },
                        PartitionDetail::failed(
                            1,
                            ErrorCode::PartitionQuarantined,
                            8,
                            QUARANTINED.into(),
                        ),
                    ],
                },
            )),
        ),
        (
            "alter_topic",
            body(ResponseBody::AlterTopic(Box::new(CreateTopicResponse {
                config: TopicConfig {
                    retention_ms: Some(86_400_000),
                    segments: 16,
                    ..topic_config()
                },
            }))),
        ),
        (
            "init_txn",
            numbered(
                5,
                ResponseBody::InitTxn(InitTxnResponse {
                    producer_id: 4001,
                    producer_epoch: 3,
                }),
            ),
        ),
        (
            "add_txn_offsets",
            numbered(8, ResponseBody::AddTxnOffsets(AddTxnOffsetsResponse {})),
        ),
        (
            "end_txn",
            numbered(9, ResponseBody::EndTxn(EndTxnResponse {})),
        ),
        (
            "list_txns",
            numbered(
                10,
                ResponseBody::ListTxns(ListTxnsResponse {
                    transactions: vec![TxnListing {
                        transactional_id: "orders-writer".into(),
                        producer_id: 4001,
                        producer_epoch: 3,
                        state: "ongoing".into(),
                        partitions: vec![GroupPartition {
                            topic: "orders".into(),
                            partition: 0,
                        }],
                        transaction_timeout_ms: 60_000,
                    }],
                }),
            ),
        ),
    ]
}

/// A compaction's failure on a quarantined partition, as the broker words it.
const COMPACT_QUARANTINED: &str = "partition device-state/1 is quarantined (read-only): \
                                   partition.meta is missing, but the partition's segments \
                                   hold batches";

/// The sample request of operation `name`.
fn sample_request(name: &str) -> Request<'static> {
    sample_requests()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no sample request {name}"))
        .1
}

/// The sample response of operation `name`.
fn sample_response(name: &str) -> Response {
    sample_responses()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no sample response {name}"))
        .1
}

fn request_frame(r: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    let n = encode_request(r, &mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

fn response_frame(r: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    let n = encode_response(r, &mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

#[test]
fn every_request_round_trips_through_a_frame() {
    for (name, r) in sample_requests() {
        let f = request_frame(&r);
        let n = frame_len(&f, FRAME_BYTES_MAX).unwrap().unwrap();
        assert_eq!(n, f.len(), "{name}");
        assert_eq!(
            decode_request(&f[FRAME_HEADER_BYTES..n]).unwrap(),
            r,
            "{name}"
        );
        assert_eq!(r.body.name(), name);
    }
}

#[test]
fn every_response_round_trips_through_a_frame() {
    for (name, r) in sample_responses() {
        let f = response_frame(&r);
        let n = frame_len(&f, FRAME_BYTES_MAX).unwrap().unwrap();
        assert_eq!(n, f.len(), "{name}");
        assert_eq!(
            decode_response(&f[FRAME_HEADER_BYTES..n]).unwrap(),
            r,
            "{name}"
        );
        assert_eq!(r.body.name(), name);
    }
}

#[test]
fn every_error_code_round_trips_and_names_are_unique() {
    let mut names = std::collections::HashSet::new();
    for (i, code) in ErrorCode::ALL.iter().enumerate() {
        if i > 0 {
            assert!(
                ErrorCode::ALL[i - 1].as_u16() < code.as_u16(),
                "ALL is in wire order"
            );
        }
        assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(*code));
        assert!(names.insert(code.name()));
        let bytes = minicbor::to_vec(code).unwrap();
        assert_eq!(minicbor::decode::<ErrorCode>(&bytes).unwrap(), *code);
    }
    for unused in [26, 29, 38, 47, 1000] {
        assert_eq!(ErrorCode::from_u16(unused), None);
    }
}

#[test]
fn truncated_frames_say_read_more() {
    for (_, r) in sample_requests() {
        let f = request_frame(&r);
        for cut in 0..f.len() {
            assert_eq!(
                frame_len(&f[..cut], FRAME_BYTES_MAX),
                Ok(None),
                "cut at {cut}"
            );
        }
    }
}

#[test]
fn frame_len_sees_only_the_first_of_two_frames() {
    let reqs = sample_requests();
    let mut buf = request_frame(&reqs[0].1);
    let first = buf.len();
    buf.extend(request_frame(&reqs[1].1));
    assert_eq!(frame_len(&buf, FRAME_BYTES_MAX), Ok(Some(first)));
    let rest = &buf[first..];
    let n = frame_len(rest, FRAME_BYTES_MAX).unwrap().unwrap();
    assert_eq!(
        decode_request(&rest[FRAME_HEADER_BYTES..n]).unwrap(),
        reqs[1].1
    );
}

#[test]
fn oversized_length_is_rejected_from_the_prefix_alone() {
    // Only the prefix is buffered: the answer must not wait for (or
    // allocate) the 4 GiB the prefix announces.
    assert_eq!(
        frame_len(&[0xff; 4], FRAME_BYTES_MAX),
        Err(FrameError::TooLarge {
            len: u64::from(u32::MAX),
            max: FRAME_BYTES_MAX
        })
    );
    // The limit is inclusive.
    let max = 16;
    assert_eq!(frame_len(&[0, 0, 0, 16], max), Ok(None));
    assert!(matches!(
        frame_len(&[0, 0, 0, 17], max),
        Err(FrameError::TooLarge { len: 17, max: 16 })
    ));
    assert_eq!(
        FrameError::TooLarge { len: 17, max: 16 }.code(),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn trailing_bytes_after_the_item_are_rejected() {
    let f = request_frame(&sample_requests()[0].1);
    let mut body = f[FRAME_HEADER_BYTES..].to_vec();
    let item_end = body.len();
    body.push(0x00);
    assert_eq!(
        decode_request(&body),
        Err(FrameError::TrailingBytes {
            item_end,
            frame_len: item_end + 1
        })
    );
    assert_eq!(
        decode_request(&body).unwrap_err().code(),
        ErrorCode::MalformedFrame
    );
}

#[test]
fn unknown_operation_index_is_refused_and_keeps_the_correlation_id() {
    // [9, [99, []]]: correlation id 9, operation 99, a whole frame.
    let body = [0x82, 0x09, 0x82, 0x18, 0x63, 0x80];
    let err = decode_request(&body).unwrap_err();
    assert_eq!(err, FrameError::UnknownOperation { operation: 99 });
    assert!(!err.closes_connection());
    let answer = frame_error_response(&body, &err);
    assert_eq!(answer.correlation_id, 9);
    let ResponseBody::Error(e) = answer.body else {
        panic!("{answer:?}")
    };
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("operation 99"), "{e:?}");
}

#[test]
fn request_index_zero_is_reserved() {
    // [1, [0, []]]: operation 0 is the error answer, not a request.
    let body = [0x82, 0x01, 0x82, 0x00, 0x80];
    assert_eq!(
        decode_request(&body),
        Err(FrameError::UnknownOperation { operation: 0 })
    );
}

/// A whole frame whose envelope is intact but whose body does not fit
/// its operation is the request's fault, not the framing's: the error
/// names the operation and where, and the connection may go on. Bytes
/// that are not one whole item of the envelope's shape stay malformed.
#[test]
fn a_body_that_does_not_fit_is_told_from_broken_framing() {
    let unfit: [(&[u8], u32, MalformedKind); 4] = [
        // [5, [20, [5]]]: join_group, its group an integer.
        (
            &[0x82, 0x05, 0x82, 0x14, 0x81, 0x05],
            20,
            MalformedKind::TypeMismatch,
        ),
        // [5, [8, []]]: fetch without its fields.
        (
            &[0x82, 0x05, 0x82, 0x08, 0x80],
            8,
            MalformedKind::MissingField,
        ),
        // [5, [1, [1, 70000]]]: hello, version_max past a u16.
        (
            &[
                0x82, 0x05, 0x82, 0x01, 0x82, 0x01, 0x1a, 0x00, 0x01, 0x11, 0x70,
            ],
            1,
            MalformedKind::InvalidValue,
        ),
        // [5, [9, [[["t", 0, [7]]]]]]: list_offsets, an unknown spec.
        (
            &[
                0x82, 0x05, 0x82, 0x09, 0x81, 0x81, 0x83, 0x61, b't', 0x00, 0x81, 0x07,
            ],
            9,
            MalformedKind::UnknownVariant,
        ),
    ];
    for (body, operation, kind) in unfit {
        let err = decode_request(body).unwrap_err();
        assert!(
            matches!(err, FrameError::UnfitBody { operation: o, kind: k, offset: Some(_) } if o == operation && k == kind),
            "{body:02x?}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        assert!(!err.closes_connection());
        assert!(
            err.to_string().contains(&format!("operation {operation}")),
            "{err}"
        );
        assert_eq!(frame_error_response(body, &err).correlation_id, 5);
    }
    let broken: [&[u8]; 6] = [
        // Cut short inside the body.
        &[0x82, 0x05, 0x82, 0x08, 0x81],
        // Bad CBOR in the body (reserved additional information 28).
        &[0x82, 0x05, 0x82, 0x08, 0x81, 0x1c],
        // Invalid UTF-8 in a text string.
        &[0x82, 0x05, 0x82, 0x04, 0x81, 0x61, 0xff],
        // The operation's array of indefinite length.
        &[0x82, 0x05, 0x9f, 0x08, 0x80, 0xff],
        // A correlation id that is not one, an operation that is not one.
        &[0x82, 0x61, b'x', 0x82, 0x08, 0x80],
        &[0x82, 0x05, 0x82, 0x61, b'x', 0x80],
    ];
    for body in broken {
        let err = decode_request(body).unwrap_err();
        assert!(
            matches!(err, FrameError::Malformed { .. }),
            "{body:02x?}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
        assert!(err.closes_connection());
    }
    // Bytes after a body that does not fit: the framing is broken.
    let mut trailing = unfit[0].0.to_vec();
    trailing.push(0x00);
    assert!(decode_request(&trailing).unwrap_err().closes_connection());
}

#[test]
fn unreadable_correlation_id_answers_with_zero() {
    for body in [&[][..], &[0xff][..], &[0x82, 0x61, 0x41][..]] {
        let err = decode_request(body).unwrap_err();
        assert_eq!(frame_error_response(body, &err).correlation_id, 0);
    }
}

#[test]
fn unknown_error_code_is_malformed() {
    // A response whose error code is past the last one defined.
    let body = [0x82, 0x01, 0x82, 0x00, 0x82, 0x19, 0x03, 0xe8, 0x60];
    assert!(matches!(
        decode_response(&body),
        Err(FrameError::Malformed {
            kind: MalformedKind::InvalidValue,
            ..
        })
    ));
}

#[test]
fn deep_nesting_in_an_unknown_field_is_skipped_without_recursion() {
    // [1, [2, [null, <100k nested arrays>]]]: metadata with an unknown
    // field 1. Skipping it must not recurse (a stack overflow would take the
    // whole server down), for definite and indefinite arrays alike.
    for open in [0x81u8, 0x9f] {
        let depth = 100_000;
        let mut body = vec![0x82, 0x01, 0x82, 0x02, 0x82, 0xf6];
        body.extend(std::iter::repeat_n(open, depth));
        body.push(0x80);
        if open == 0x9f {
            body.extend(std::iter::repeat_n(0xff, depth));
        }
        let r = decode_request(&body).unwrap();
        assert_eq!(
            r.body,
            RequestBody::Metadata(MetadataRequest { topics: None })
        );
    }
}

#[test]
fn unknown_trailing_fields_are_ignored() {
    // A newer client's hello with a field 3 this version does not know.
    let body = [
        0x82, 0x01, 0x82, 0x01, 0x84, 0x01, 0x02, 0xf6, 0x63, b'n', b'e', b'w',
    ];
    let r = decode_request(&body).unwrap();
    assert_eq!(
        r.body,
        RequestBody::Hello(HelloRequest {
            version_min: 1,
            version_max: 2,
            client_name: None
        })
    );
}

/// A fetch result as decoders before its `message` (index 8) read it,
/// and as brokers before it wrote it.
#[derive(Debug, PartialEq, minicbor::Encode, minicbor::Decode)]
struct FetchResultBeforeMessage {
    #[n(0)]
    topic: String,
    #[n(1)]
    partition: u32,
    #[n(2)]
    error: ErrorCode,
    #[n(3)]
    high_watermark: u64,
    #[n(4)]
    earliest_offset: u64,
    #[n(5)]
    records: minicbor::bytes::ByteVec,
    #[n(6)]
    last_stable_offset: Option<u64>,
    #[n(7)]
    next_offset: Option<u64>,
}

/// A fetch answer for a quarantined partition, with its reason.
fn fetch_quarantined() -> Response {
    Response {
        correlation_id: 1,
        body: ResponseBody::Fetch(FetchResponse {
            throttle_ms: None,
            partitions: vec![FetchPartitionResult {
                topic: "sensors.temp".into(),
                partition: 1,
                error: ErrorCode::PartitionQuarantined,
                high_watermark: 0,
                earliest_offset: 0,
                records: RecordBytes::default(),
                last_stable_offset: None,
                next_offset: None,
                message: Some(QUARANTINED.into()),
            }],
        }),
    }
}

/// A quarantine's reason, as the samples with a message carry it.
const QUARANTINED: &str = "partition sensors.temp/1 is quarantined (read-only): partition.meta \
                           is missing, but the partition's segments hold batches";

/// `QUARANTINED` in CBOR: its head (text, 121 bytes) and its UTF-8.
const QUARANTINED_HEX: &str = concat!(
    "7879706172746974696f6e2073656e736f72732e74656d702f31206973207175",
    "6172616e74696e65642028726561642d6f6e6c79293a20706172746974696f6e",
    "2e6d657461206973206d697373696e672c206275742074686520706172746974",
    "696f6e2773207365676d656e747320686f6c642062617463686573",
);

/// Pins `r`'s body to `want` (hex) and checks docs/protocol.md shows it.
fn assert_pinned_and_documented(r: &Response, want: &str) {
    let f = response_frame(r);
    let body = &f[FRAME_HEADER_BYTES..];
    assert_eq!(hex(body), want);
    let diag = minicbor::display(body).to_string();
    assert!(
        PROTOCOL_MD.contains(&diag),
        "docs/protocol.md lacks\n{diag}"
    );
}

/// A decoder of `r`'s frame at its operation's body, as a peer's reads it.
fn at_response_body(frame: &[u8]) -> minicbor::Decoder<'_> {
    let mut d = minicbor::Decoder::new(&frame[FRAME_HEADER_BYTES..]);
    for _ in 0..2 {
        d.array().unwrap();
        d.u32().unwrap();
    }
    d
}

/// An answer to operation `op` whose body `encode` writes (as a broker
/// before some field wrote it), decoded as this build reads it.
fn decode_answer(op: u32, encode: impl FnOnce(&mut minicbor::Encoder<&mut Vec<u8>>)) -> Response {
    let mut body = Vec::new();
    let mut e = minicbor::Encoder::new(&mut body);
    e.array(2)
        .unwrap()
        .u32(1)
        .unwrap()
        .array(2)
        .unwrap()
        .u32(op)
        .unwrap();
    encode(&mut e);
    decode_response(&body).unwrap()
}

/// The sample of a fetch result with a message: its bytes pinned (the
/// message at index 8, `null` at 6 and 7) and shown in docs/protocol.md.
#[test]
fn a_fetch_results_message_takes_index_8() {
    // [1, [8, [[["sensors.temp", 1, 10, 0, 0, h'', null, null, "..."]]]]]
    assert_pinned_and_documented(
        &fetch_quarantined(),
        &format!("820182088181896c73656e736f72732e74656d70010a000040f6f6{QUARANTINED_HEX}"),
    );
}

#[test]
fn a_fetch_results_message_is_skipped_by_old_clients_and_absent_from_old_brokers() {
    let new = fetch_quarantined();
    let ResponseBody::Fetch(f) = &new.body else {
        unreachable!()
    };
    let result = &f.partitions[0];
    let old = FetchResultBeforeMessage {
        topic: result.topic.clone(),
        partition: result.partition,
        error: result.error,
        high_watermark: result.high_watermark,
        earliest_offset: result.earliest_offset,
        records: result.records.to_vec().into(),
        last_stable_offset: result.last_stable_offset,
        next_offset: result.next_offset,
    };
    // A new broker's answer, read by an old client: the message skipped,
    // the result read to its end and the frame after it.
    let frame = response_frame(&new);
    let mut d = at_response_body(&frame);
    d.array().unwrap(); // the fetch response
    d.array().unwrap(); // its partitions
    assert_eq!(d.decode::<FetchResultBeforeMessage>().unwrap(), old);
    assert_eq!(d.position(), frame.len() - FRAME_HEADER_BYTES);
    // An old broker's answer, read by a new client: no message.
    let got = decode_answer(8, |e| {
        e.array(1).unwrap().array(1).unwrap().encode(&old).unwrap();
    });
    let ResponseBody::Fetch(f) = got.body else {
        panic!("{got:?}")
    };
    assert_eq!(
        f.partitions[0],
        FetchPartitionResult {
            message: None,
            ..result.clone()
        }
    );
}

/// A list_offsets result's `message` takes index 4; an answer from a
/// broker before it has none. (Clients before it skip it as they skip a
/// fetch result's: the same derived decoding.)
/// `new` encodes to `new_hex` (its message last), and `old_hex`, the
/// result as a broker before the message wrote it, decodes to `without`.
fn assert_message_is_last_and_optional<T>(new: &T, new_hex: &str, old_hex: &str, without: &T)
where
    T: minicbor::Encode<()> + for<'b> minicbor::Decode<'b, ()> + PartialEq + std::fmt::Debug,
{
    assert_eq!(hex(&minicbor::to_vec(new).unwrap()), new_hex);
    assert_eq!(
        &minicbor::decode::<T>(&hex_bytes(old_hex)).unwrap(),
        without
    );
}

#[test]
fn a_list_offsets_results_message_takes_index_4_and_is_optional() {
    let new = ListOffsetsPartitionResult {
        topic: "t".into(),
        partition: 1,
        error: ErrorCode::PartitionQuarantined,
        offset: None,
        message: Some("why".into()),
    };
    assert_message_is_last_and_optional(
        &new,
        // ["t", 1, 10, null, "why"] and ["t", 1, 10]
        "856174010af663776879",
        "836174010a",
        &ListOffsetsPartitionResult {
            message: None,
            ..new.clone()
        },
    );
}

/// Metadata results as decoders before their `message` (a topic's 3, a
/// partition's 4) read them, and as brokers before it wrote them.
#[derive(Debug, PartialEq, minicbor::Encode, minicbor::Decode)]
struct PartitionMetadataBeforeMessage {
    #[n(0)]
    partition: u32,
    #[n(1)]
    error: ErrorCode,
    #[n(2)]
    earliest_offset: u64,
    #[n(3)]
    latest_offset: u64,
}

#[derive(Debug, PartialEq, minicbor::Encode, minicbor::Decode)]
struct TopicMetadataBeforeMessage {
    #[n(0)]
    name: String,
    #[n(1)]
    error: ErrorCode,
    #[n(2)]
    partitions: Vec<PartitionMetadataBeforeMessage>,
}

/// A metadata answer with a quarantined partition and an unknown topic,
/// each with its reason.
fn metadata_with_errors() -> Response {
    Response {
        correlation_id: 1,
        body: ResponseBody::Metadata(MetadataResponse {
            topics: vec![
                TopicMetadata {
                    name: "sensors.temp".into(),
                    error: ErrorCode::None,
                    partitions: vec![
                        partition_meta(0),
                        PartitionMetadata {
                            partition: 1,
                            error: ErrorCode::PartitionQuarantined,
                            earliest_offset: 0,
                            latest_offset: 0,
                            message: Some(QUARANTINED.into()),
                        },
                    ],
                    message: None,
                },
                TopicMetadata {
                    name: "nope".into(),
                    error: ErrorCode::UnknownTopic,
                    partitions: vec![],
                    message: Some("unknown topic 'nope'".into()),
                },
            ],
        }),
    }
}

/// The sample of metadata results with messages: the bytes pinned (a
/// partition's message at index 4, a topic's at 3) and shown in
/// docs/protocol.md.
#[test]
fn metadata_results_messages_take_indices_3_and_4() {
    // [1, [2, [[["sensors.temp", 0, [[0, 0, 0, 42], [1, 10, 0, 0, "..."]]],
    //   ["nope", 1, [], "unknown topic 'nope'"]]]]]
    assert_pinned_and_documented(
        &metadata_with_errors(),
        &format!(
            "820182028182836c73656e736f72732e74656d70008284000000182a85010a0000\
             {QUARANTINED_HEX}84646e6f7065018074756e6b6e6f776e20746f70696320276e6f706527"
        ),
    );
}

#[test]
fn metadata_results_messages_are_skipped_by_old_clients_and_absent_from_old_brokers() {
    let new = metadata_with_errors();
    let ResponseBody::Metadata(m) = &new.body else {
        unreachable!()
    };
    let old: Vec<TopicMetadataBeforeMessage> = m
        .topics
        .iter()
        .map(|t| TopicMetadataBeforeMessage {
            name: t.name.clone(),
            error: t.error,
            partitions: t
                .partitions
                .iter()
                .map(|p| PartitionMetadataBeforeMessage {
                    partition: p.partition,
                    error: p.error,
                    earliest_offset: p.earliest_offset,
                    latest_offset: p.latest_offset,
                })
                .collect(),
        })
        .collect();
    // A new broker's answer, read by an old client: the messages skipped,
    // every result read to its end and the frame after them.
    let frame = response_frame(&new);
    let mut d = at_response_body(&frame);
    d.array().unwrap(); // the metadata response
    assert_eq!(d.decode::<Vec<TopicMetadataBeforeMessage>>().unwrap(), old);
    assert_eq!(d.position(), frame.len() - FRAME_HEADER_BYTES);
    // An old broker's answer, read by a new client: no messages.
    let got = decode_answer(2, |e| {
        e.array(1).unwrap().encode(&old).unwrap();
    });
    let ResponseBody::Metadata(got) = got.body else {
        panic!("{got:?}")
    };
    let mut want = m.clone();
    for t in &mut want.topics {
        t.message = None;
        for p in &mut t.partitions {
            p.message = None;
        }
    }
    assert_eq!(got, want);
}

/// describe_topic's partitions are metadata's: a new broker's reason
/// reaches a new client through it, and an old broker's answer reads
/// without one.
#[test]
fn describe_topic_partitions_carry_the_message() {
    let ResponseBody::Metadata(m) = metadata_with_errors().body else {
        unreachable!()
    };
    let partitions = m.topics[0].partitions.clone();
    let new = Response {
        correlation_id: 1,
        body: ResponseBody::DescribeTopic(Box::new(DescribeTopicResponse {
            config: topic_config(),
            partitions: partitions.clone(),
        })),
    };
    let frame = response_frame(&new);
    assert_eq!(decode_response(&frame[FRAME_HEADER_BYTES..]).unwrap(), new);
    let old: Vec<PartitionMetadataBeforeMessage> = partitions
        .iter()
        .map(|p| PartitionMetadataBeforeMessage {
            partition: p.partition,
            error: p.error,
            earliest_offset: p.earliest_offset,
            latest_offset: p.latest_offset,
        })
        .collect();
    let got = decode_answer(4, |e| {
        e.array(2)
            .unwrap()
            .encode(topic_config())
            .unwrap()
            .encode(&old)
            .unwrap();
    });
    let ResponseBody::DescribeTopic(got) = got.body else {
        panic!("{got:?}")
    };
    assert_eq!(got.partitions[1].error, ErrorCode::PartitionQuarantined);
    assert!(got.partitions.iter().all(|p| p.message.is_none()));
}

/// A compact_topic result's `message` takes index 7, a describe_partitions
/// result's index 13; answers from brokers before them have none, and
/// old clients skip them (the derived decoding, as above).
#[test]
fn compact_and_describe_partitions_results_messages_are_optional() {
    let new = CompactedPartition {
        partition: 1,
        error: ErrorCode::PartitionQuarantined,
        segments_merged: 0,
        segments_freed: 0,
        bytes_before: 0,
        bytes_after: 0,
        records_removed: 0,
        message: Some("why".into()),
    };
    assert_message_is_last_and_optional(
        &new,
        // [1, 10, 0, 0, 0, 0, 0, "why"] and [1, 10, 0, 0, 0, 0, 0]
        "88010a000000000063776879",
        "87010a0000000000",
        &CompactedPartition {
            message: None,
            ..new.clone()
        },
    );
    let new = PartitionDetail::failed(1, ErrorCode::PartitionQuarantined, 8, "why".into());
    assert_message_is_last_and_optional(
        &new,
        // [1, 10, 0, 0, 0, 0, 8, null, null, null, null, null, null, "why"]
        // and [1, 10, 0, 0, 0, 0, 8]
        "8e010a0000000008f6f6f6f6f6f663776879",
        "87010a0000000008",
        &PartitionDetail {
            message: None,
            ..new.clone()
        },
    );
    // An old client's decoder (fields to 12) skips the message: a result
    // read to its end, and the next one after it.
    #[derive(Debug, PartialEq, minicbor::Decode)]
    struct PartitionDetailBeforeMessage {
        #[n(0)]
        partition: u32,
        #[n(1)]
        error: ErrorCode,
        #[n(6)]
        segments: u32,
        #[n(12)]
        damaged: Option<Vec<DamagedRange>>,
    }
    let two = minicbor::to_vec([&new, &new]).unwrap();
    let read: Vec<PartitionDetailBeforeMessage> = minicbor::decode(&two).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[1].segments, 8);
    assert_eq!(read[1].error, ErrorCode::PartitionQuarantined);
}

#[test]
fn fetch_size_bound_holds_for_extreme_values() {
    let topic = "t".repeat(300);
    let results: Vec<FetchPartitionResult> = (0..3)
        .map(|i| FetchPartitionResult {
            topic: topic.clone(),
            partition: u32::MAX - i,
            error: ErrorCode::Internal,
            high_watermark: u64::MAX,
            earliest_offset: u64::MAX,
            records: RecordBytes::from(vec![0; 70_000]),
            last_stable_offset: Some(u64::MAX),
            next_offset: Some(u64::MAX),
            message: (i > 0).then(|| "m".repeat(70_000)),
        })
        .collect();
    let bound = FETCH_RESPONSE_ENVELOPE_BYTES_MAX
        + results
            .iter()
            .map(|r| {
                FetchPartitionResult::envelope_bytes_max(&r.topic, r.message.as_deref())
                    + r.records.len()
            })
            .sum::<usize>();
    let frame = response_frame(&Response {
        correlation_id: u32::MAX,
        body: ResponseBody::Fetch(FetchResponse {
            throttle_ms: None,
            partitions: results,
        }),
    });
    assert!(frame.len() <= bound, "{} > {bound}", frame.len());
}

/// A share_fetch answer is within its bound, and one record of a batch,
/// with its key and headers, fits a frame beside the answer's envelope:
/// a frame holds the largest batch and 4096 bytes (`server.max_frame_bytes`
/// is checked so), so the server can always deliver one record.
#[test]
fn share_fetch_size_bound_holds_and_one_record_of_a_batch_fits_a_frame() {
    use crate::batch::{BatchBuilder, BatchView, ProducerStamp};
    type Shape = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);
    let shapes: Vec<Shape> = vec![
        // Empty headers: the most heads for the batch's bytes.
        (None, None, vec![(String::new(), Vec::new()); 40_000]),
        (
            Some(vec![1; 23]),
            Some(vec![2; 1000]),
            (0..40)
                .map(|i| ("h".repeat(i * 7), vec![3; i * 13]))
                .collect(),
        ),
        (
            Some(vec![1; 70_000]),
            None,
            vec![("n".repeat(300), vec![4; 256]); 3],
        ),
        (None, Some(vec![9; 131_000]), Vec::new()),
    ];
    for (key, value, headers) in shapes {
        let hs: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let mut b = BatchBuilder::new();
        b.push_record(0, key.as_deref(), value.as_deref(), &hs);
        let batch = b.finish(ProducerStamp::NONE);
        let view = BatchView::new(&batch).unwrap();
        let r = &view.records().unwrap()[0];
        let bound = ShareRecord::bytes_max(
            r.key.map(|k| &k[..]),
            r.value.map(|v| &v[..]),
            r.headers.iter().map(|h| (h.name, &h.value[..])),
        );
        let frame = response_frame(&Response {
            correlation_id: u32::MAX,
            body: ResponseBody::ShareFetch(ShareFetchResponse {
                records: vec![ShareRecord {
                    partition: u32::MAX,
                    offset: u64::MAX,
                    timestamp_ms: i64::MIN,
                    key: key.map(Into::into),
                    value: value.map(Into::into),
                    headers: headers
                        .into_iter()
                        .map(|(name, value)| ShareHeader {
                            name,
                            value: value.into(),
                        })
                        .collect(),
                    delivery_count: u32::MAX,
                }],
                lock_ms: u64::MAX,
            }),
        });
        let answer = SHARE_FETCH_RESPONSE_ENVELOPE_BYTES_MAX + bound;
        assert!(frame.len() <= answer, "{} > {answer}", frame.len());
        assert!(answer <= batch.len() + 4096, "{answer} {}", batch.len());
    }
}

/// A fetch response with records of the given sizes (`fill` varies bytes).
fn fetch_response(sizes: &[usize], fill: u8) -> Response {
    Response {
        correlation_id: 77,
        body: ResponseBody::Fetch(FetchResponse {
            throttle_ms: None,
            partitions: sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| FetchPartitionResult {
                    topic: format!("t{i}"),
                    partition: i as u32,
                    error: ErrorCode::None,
                    high_watermark: 1_000 + i as u64,
                    earliest_offset: i as u64,
                    records: RecordBytes::from(
                        (0..n)
                            .map(|j| (j as u8).wrapping_mul(31) ^ fill)
                            .collect::<Vec<u8>>(),
                    ),
                    last_stable_offset: None,
                    next_offset: None,
                    message: None,
                })
                .collect(),
        }),
    }
}

/// The frame with its spliced records put back in place.
fn unsplice(r: &Response, encoded: &[u8], splices: &[Splice]) -> Vec<u8> {
    let ResponseBody::Fetch(f) = &r.body else {
        panic!("not a fetch")
    };
    let mut whole = Vec::new();
    let mut from = 0;
    for s in splices {
        whole.extend_from_slice(&encoded[from..s.at]);
        whole.extend_from_slice(&f.partitions[s.partition].records);
        from = s.at;
    }
    whole.extend_from_slice(&encoded[from..]);
    whole
}

/// Leaving large records out and writing them in place gives the very
/// frame `encode_response` makes, length prefix included, after other
/// frames in the same buffer too; small records and other responses are
/// encoded whole.
#[test]
fn spliced_fetch_frames_equal_whole_ones() {
    let cases: [&[usize]; 5] = [
        &[SPLICE_MIN_BYTES],
        &[10, SPLICE_MIN_BYTES - 1, 1 << 20],
        &[1 << 20, 0, 300_000, 5],
        &[SPLICE_MIN_BYTES - 1],
        &[],
    ];
    for (k, sizes) in cases.iter().enumerate() {
        let r = fetch_response(sizes, k as u8);
        let whole = response_frame(&r);
        let mut out = b"earlier frames".to_vec();
        let mut splices = Vec::new();
        let n = encode_response_spliced(&r, &mut out, &mut splices).unwrap();
        assert_eq!(n, whole.len(), "{sizes:?}");
        let big = sizes.iter().filter(|&&s| s >= SPLICE_MIN_BYTES).count();
        assert_eq!(splices.len(), big, "{sizes:?}");
        assert!(splices.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(&out[..14], b"earlier frames");
        let at_zero: Vec<Splice> = splices
            .iter()
            .map(|s| Splice {
                at: s.at - 14,
                partition: s.partition,
            })
            .collect();
        assert_eq!(unsplice(&r, &out[14..], &at_zero), whole, "{sizes:?}");
    }
    // Not a fetch: nothing spliced.
    let r = error_response(3, ErrorCode::Internal, "x".repeat(100_000));
    let mut out = Vec::new();
    let mut splices = Vec::new();
    encode_response_spliced(&r, &mut out, &mut splices).unwrap();
    assert!(splices.is_empty());
    assert_eq!(out, response_frame(&r));
}

#[test]
fn version_negotiation_picks_the_highest_common() {
    assert_eq!(negotiate_version(1, 1), Some(1));
    assert_eq!(negotiate_version(0, 9), Some(PROTOCOL_VERSION_MAX));
    assert_eq!(negotiate_version(PROTOCOL_VERSION_MAX + 1, 99), None);
    assert_eq!(negotiate_version(0, 0), None);
    assert_eq!(
        negotiate_version(1, 0),
        None,
        "an empty range meets nothing"
    );
}

proptest! {
    #[test]
    fn arbitrary_values_round_trip(
        id in any::<u32>(),
        topic in ".{0,40}",
        partition in any::<u32>(),
        a in any::<u64>(),
        b in any::<u64>(),
        ts in any::<i64>(),
        code in 0u16..23,
        records in proptest::collection::vec(any::<u8>(), 0..300),
        message in proptest::option::of(".{0,20}"),
    ) {
        let error = ErrorCode::from_u16(code).unwrap();
        let requests = [
            RequestBody::Fetch(FetchRequest {
                partitions: vec![FetchPartition { topic: topic.clone(), partition, offset: a, max_bytes: partition }],
                max_wait_ms: id,
                min_bytes: partition,
                isolation: None,
            }),
            RequestBody::ListOffsets(ListOffsetsRequest {
                partitions: vec![ListOffsetsPartition { topic: topic.clone(), partition, spec: OffsetSpec::Timestamp(ts) }],
            }),
            RequestBody::Produce(ProduceRequest {
                partitions: vec![ProducePartition { topic: topic.clone(), partition, batch: records.clone().into() }],
            }),
        ];
        for body in requests {
            let r = Request { correlation_id: id, body };
            let f = request_frame(&r);
            prop_assert_eq!(decode_request(&f[FRAME_HEADER_BYTES..]).unwrap(), r);
        }
        let responses = [
            ResponseBody::Produce(ProduceResponse {
 throttle_ms: None,
                partitions: vec![ProducePartitionResult {
                    topic: topic.clone(), partition, error, base_offset: a, last_offset: b,
                    duplicate_records: id, message: message.clone(),
                }],
            }),
            ResponseBody::Fetch(FetchResponse {
 throttle_ms: None,
                partitions: vec![FetchPartitionResult {
                    topic: topic.clone(), partition, error, high_watermark: a, earliest_offset: b,
                    records: RecordBytes::from(records.clone()),
                    last_stable_offset: None,
                    next_offset: None,
                    message: message.clone(),
                }],
            }),
            ResponseBody::Error(ErrorResponse { code: error, message: message.unwrap_or_default() }),
        ];
        for body in responses {
            let r = Response { correlation_id: id, body };
            let f = response_frame(&r);
            prop_assert_eq!(decode_response(&f[FRAME_HEADER_BYTES..]).unwrap(), r.clone());
            let shared = bytes::Bytes::copy_from_slice(&f[FRAME_HEADER_BYTES..]);
            prop_assert_eq!(decode_response_shared(&shared).unwrap(), r);
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame_len(&bytes, FRAME_BYTES_MAX);
        let _ = decode_request(&bytes);
        let _ = decode_response(&bytes);
        let _ = decode_response_shared(&bytes::Bytes::from(bytes.clone()));
        let _ = peek_correlation_id(&bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        // Past the samples' count, so every one is met (`%` below).
        which in 0usize..64,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let reqs = sample_requests();
        let f = request_frame(&reqs[which % reqs.len()].1);
        let mut body = f[FRAME_HEADER_BYTES..].to_vec();
        for (at, x) in flips {
            let i = at % body.len();
            body[i] ^= x;
        }
        if let Err(e) = decode_request(&body) {
            let _ = frame_error_response(&body, &e);
        }
        let resps = sample_responses();
        let f = response_frame(&resps[which % resps.len()].1);
        let mut body = f[FRAME_HEADER_BYTES..].to_vec();
        let i = body.len() / 2;
        body[i] ^= 0x5a;
        let _ = decode_response(&body);
    }
}

/// The bytes of every sample message, pinned. A failure here means the
/// wire format changed: a renumbered field or variant breaks every deployed
/// peer. Only add entries; never edit one.
const GOLDEN_REQUESTS: [(&str, &str); 34] = [
    (
        "hello",
        "820182018301016f736b6966662d636c692f302e312e30",
    ),
    (
        "metadata",
        "8201820281816c73656e736f72732e74656d70",
    ),
    (
        "create_topic",
        "82018203a3006c73656e736f72732e74656d700104056c696e74657276616c3a313030",
    ),
    (
        "describe_topic",
        "82018204816c73656e736f72732e74656d70",
    ),
    (
        "list_topics",
        "8201820580",
    ),
    (
        "delete_topic",
        "82018206816c73656e736f72732e74656d70",
    ),
    (
        "produce",
        "820182078181836c73656e736f72732e74656d700247534b42312e2e2e",
    ),
    (
        "fetch",
        "820182088381846c73656e736f72732e74656d700218281a001000001901f401",
    ),
    (
        "list_offsets",
        "820182098183836c73656e736f72732e74656d70008100836c73656e736f72732e74656d70018101836c73656e736f72732e74656d700282021b0000018bcfe56800",
    ),
    (
        "init_producer",
        "8201820a8169676174657761792d37",
    ),
    (
        "join_group",
        "82018214896964617368626f617264f6f6816c73656e736f72732e74656d7072636f6f70657261746976652d737469636b79192710197530807818736b6966662d636c692f302e312e30207069642034323432",
    ),
    (
        "sync_group",
        "82018215836964617368626f6172646e736b6966662d636c692d3061316203",
    ),
    (
        "heartbeat",
        "82018216836964617368626f6172646e736b6966662d636c692d3061316203",
    ),
    (
        "leave_group",
        "82018217826964617368626f6172646e736b6966662d636c692d30613162",
    ),
    (
        "offset_commit",
        "8201821818846964617368626f6172646e736b6966662d636c692d306131620381836c73656e736f72732e74656d7000190412",
    ),
    (
        "offset_fetch",
        "8201821819826964617368626f61726481826c73656e736f72732e74656d7000",
    ),
    (
        "list_groups",
        "820182181a80",
    ),
    (
        "describe_group",
        "820182181b816964617368626f617264",
    ),
    (
        "delete_group",
        "820182181c816964617368626f617264",
    ),
    ("mirror_status", "820182182880"),
    ("mirror_pause", "8201821829826574656d7073f5"),
    (
        "share_fetch",
        "8203821846866762696c6c696e67666f72646572736b776f726b65722d376633610a1901f4686561726c69657374",
    ),
    (
        "share_ack",
        "8204821847846762696c6c696e67666f72646572736b776f726b65722d37663361818300182900",
    ),
    ("list_share_groups", "820582184880"),
    ("describe_share_group", "8206821849816762696c6c696e67"),
    ("delete_share_group", "820782184a816762696c6c696e67"),
    (
        "share_leave",
        "820882184b826762696c6c696e676b776f726b65722d37663361",
    ),
    ("compact_topic", "8201821832826c6465766963652d7374617465f5"),
    ("describe_partitions", "8201821833816c73656e736f72732e74656d70"),
    ("alter_topic", "8201821834a3006c73656e736f72732e74656d700310041a05265c00"),
    ("init_txn", "820582183c826d6f72646572732d77726974657219ea60"),
    (
        "add_txn_offsets",
        "820882183d856d6f72646572732d777269746572190fa1036762696c6c696e678183666f726465727300182a",
    ),
    ("end_txn", "820982183e846d6f72646572732d777269746572190fa103f5"),
    ("list_txns", "820a82183f80"),
];

const GOLDEN_RESPONSES: [(&str, &str); 35] = [
    (
        "error",
        "820182008201781b6e6f20746f706963206e616d65642073656e736f72732e74656d70",
    ),
    (
        "hello",
        "82018201840165302e312e301a008000001a00100000",
    ),
    (
        "metadata",
        "820182028181836c73656e736f72732e74656d70008184000000182a",
    ),
    (
        "create_topic",
        "8201820381a6006c73656e736f72732e74656d700104021a0400000003080566616c7761797306696f7665727772697465",
    ),
    (
        "describe_topic",
        "8201820482a7006c73656e736f72732e74656d700104021a040000000308041a05265c000566616c7761797306696f76657277726974658184000000182a",
    ),
    (
        "list_topics",
        "8201820581826b73656e736f72732e68756d6c73656e736f72732e74656d70",
    ),
    (
        "delete_topic",
        "8201820680",
    ),
    (
        "produce",
        "820182078182866c73656e736f72732e74656d7002001828183100876c73656e736f72732e74656d700308000000781d72696e672066756c6c206f6620756e666f727761726465642064617461",
    ),
    (
        "fetch",
        "820182088181866c73656e736f72732e74656d70020018320047534b42312e2e2e",
    ),
    (
        "list_offsets",
        "820182098182846c73656e736f72732e74656d70000000836c73656e736f72732e74656d700200",
    ),
    (
        "init_producer",
        "8201820a821103",
    ),
    (
        "join_group",
        "82018214846e736b6966662d636c692d306131620372636f6f70657261746976652d737469636b7902",
    ),
    (
        "sync_group",
        "820182158281826c73656e736f72732e74656d7000f4",
    ),
    (
        "heartbeat",
        "8201821680",
    ),
    (
        "leave_group",
        "8201821780",
    ),
    (
        "offset_commit",
        "820182181880",
    ),
    (
        "offset_fetch",
        "82018218198181836c73656e736f72732e74656d7000190412",
    ),
    (
        "list_groups",
        "820182181a8181836964617368626f61726466537461626c6502",
    ),
    (
        "describe_group",
        "820182181b866964617368626f61726466537461626c650372636f6f70657261746976652d737469636b7981846e736b6966662d636c692d30613162f67824736b6966662d636c692f302e312e302070696420343234322028616e6f6e796d6f75732981826c73656e736f72732e74656d700081856c73656e736f72732e74656d700019041219044c183a",
    ),
    (
        "delete_group",
        "820182181c80",
    ),
    ("mirror_status", "820182182888f5f5f66567772d31376a6b61666b613a393039320c0081956574656d7073f40200001913881a0006419000191000f6f6f6f6f6f6f6031828010205"),
    ("mirror_pause", "8201821829826574656d7073f5"),
    (
        "share_fetch",
        "82038218468281870018291b0000018bcfe56800f6426f6b8001197530",
    ),
    ("share_ack", "8204821847818100"),
    ("list_share_groups", "82058218488181856762696c6c696e6781666f7264657273020301"),
    ("describe_share_group", "8206821849836762696c6c696e678189666f7264657273001829182c187801010182841829686163717569726564016b776f726b65722d3766336183182a69617661696c61626c650281836b776f726b65722d376633610119733c"),
    ("delete_share_group", "820782184a80"),
    ("share_leave", "820882184b8101"),
    (
        "compact_topic",
        "8201821832818287000003021a0002bf20192ee019021c88010a00000000007879706172746974696f6e206465766963652d73746174652f312069732071756172616e74696e65642028726561642d6f6e6c79293a20706172746974696f6e2e6d657461206973206d697373696e672c206275742074686520706172746974696f6e2773207365676d656e747320686f6c642062617463686573",
    ),
    (
        "describe_partitions",
        "820182183381828d000000182a19140002081b0000018bcfe652601b0000018bd50cae6014190a001b0000018bcfe5680081870a0c19012c001910001b0000018bcfe6eea07820612062617463682077686f73652043524320646f6573206e6f74206d617463688e010a0000000008f6f6f6f6f6f67879706172746974696f6e2073656e736f72732e74656d702f312069732071756172616e74696e65642028726561642d6f6e6c79293a20706172746974696f6e2e6d657461206973206d697373696e672c206275742074686520706172746974696f6e2773207365676d656e747320686f6c642062617463686573",
    ),
    (
        "alter_topic",
        "820182183481a7006c73656e736f72732e74656d700104021a040000000310041a05265c000566616c7761797306696f7665727772697465",
    ),
    ("init_txn", "820582183c82190fa103"),
    ("add_txn_offsets", "820882183d80"),
    ("end_txn", "820982183e80"),
    (
        "list_txns",
        "820a82183f8181866d6f72646572732d777269746572190fa103676f6e676f696e678182666f72646572730019ea60",
    ),
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn golden_frames_pin_every_message_kind() {
    let reqs = sample_requests();
    assert_eq!(reqs.len(), GOLDEN_REQUESTS.len());
    for ((name, r), (golden_name, golden)) in reqs.iter().zip(GOLDEN_REQUESTS) {
        assert_eq!(*name, golden_name);
        let f = request_frame(r);
        assert_eq!(hex(&f[FRAME_HEADER_BYTES..]), golden, "request {name}");
        assert_eq!(
            body_len(f[..4].try_into().unwrap()) as usize,
            golden.len() / 2
        );
    }
    let resps = sample_responses();
    assert_eq!(resps.len(), GOLDEN_RESPONSES.len());
    for ((name, r), (golden_name, golden)) in resps.iter().zip(GOLDEN_RESPONSES) {
        assert_eq!(*name, golden_name);
        let f = response_frame(r);
        assert_eq!(hex(&f[FRAME_HEADER_BYTES..]), golden, "response {name}");
    }
}

const PROTOCOL_MD: &str = include_str!("../../docs/protocol.md");

#[test]
fn docs_show_every_sample() {
    let reqs = sample_requests();
    let resps = sample_responses();
    let diags = reqs
        .iter()
        .map(|(n, r)| (*n, request_frame(r)))
        .chain(resps.iter().map(|(n, r)| (*n, response_frame(r))));
    for (name, frame) in diags {
        let diag = minicbor::display(&frame[FRAME_HEADER_BYTES..]).to_string();
        assert!(
            PROTOCOL_MD.contains(&diag),
            "docs/protocol.md lacks the example for {name}:\n{diag}"
        );
    }
}

/// The operation number a frame's body carries: `[correlation_id, [op, ...]]`.
fn operation_of(frame: &[u8]) -> u32 {
    let mut d = minicbor::Decoder::new(&frame[FRAME_HEADER_BYTES..]);
    d.array().unwrap();
    d.u32().unwrap();
    d.array().unwrap();
    d.u32().unwrap()
}

/// docs/protocol.md's table of operations has a row for each sample, with
/// the number it is sent with, and no other.
#[test]
fn docs_operation_table_lists_every_operation() {
    let rows: Vec<(u32, String, String)> = PROTOCOL_MD
        .split("## Encoding rules")
        .nth(1)
        .and_then(|s| s.split("## Version negotiation").next())
        .expect("docs/protocol.md has its encoding rules")
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let op = cells.get(1)?.parse().ok()?;
            Some((op, cells.get(2)?.to_string(), cells.get(3)?.to_string()))
        })
        .filter(|(op, _, _)| *op != 0)
        .collect();
    let reqs = sample_requests();
    for (name, r) in &reqs {
        let op = operation_of(&request_frame(r));
        let response = sample_response(name);
        assert_eq!(operation_of(&response_frame(&response)), op, "{name}");
        assert!(
            rows.contains(&(op, name.to_string(), name.to_string())),
            "docs/protocol.md's operation table lacks | {op} | {name} | {name} |"
        );
    }
    assert_eq!(
        rows.len(),
        reqs.len(),
        "an operation without a sample: {rows:?}"
    );
}

#[test]
fn docs_error_table_matches_the_codes() {
    let rows: Vec<(u16, String, String)> = PROTOCOL_MD
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let code = cells.get(1)?.parse().ok()?;
            let name = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((code, name.to_string(), cells.get(3)?.to_string()))
        })
        .collect();
    assert_eq!(rows.len(), ErrorCode::ALL.len());
    for ((code, name, retriable), c) in rows.iter().zip(ErrorCode::ALL) {
        assert_eq!(*code, c.as_u16());
        assert_eq!(name, c.name());
        let want = match c {
            ErrorCode::None => "—",
            c if c.is_retriable() => "yes",
            _ => "no",
        };
        assert_eq!(retriable, want, "{name}");
    }
}

#[test]
fn msg_id_window_fields_take_indices_7_and_8_and_stay_optional() {
    let req = CreateTopicRequest {
        name: "t".into(),
        msg_id_window_ms: Some(60_000),
        msg_id_window_records: Some(100),
        ..Default::default()
    };
    let bytes = minicbor::to_vec(&req).expect("encode");
    // {0: "t", 7: 60000, 8: 100}
    assert_eq!(hex(&bytes), "a30061740719ea60081864");
    assert_eq!(
        minicbor::decode::<CreateTopicRequest>(&bytes).expect("decode"),
        req
    );
    // A peer that does not know the fields sends neither: both absent.
    let old = minicbor::decode::<CreateTopicRequest>(&hex_bytes("a1006174")).expect("decode");
    assert_eq!(old.msg_id_window_ms, None);
    assert_eq!(old.msg_id_window_records, None);
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn mirror_messages_round_trip_and_version_1_clients_get_storage_full() {
    let status = ResponseBody::MirrorStatus(Box::new(MirrorStatusResponse {
        enabled: true,
        link_up: false,
        last_error: Some("cannot reach upstream".into()),
        gateway: "gw-17".into(),
        upstream: "k:9092".into(),
        transactions_committed: 3,
        transactions_aborted: 1,
        rules: vec![MirrorRuleStatus {
            name: "temps".into(),
            paused: false,
            partitions: 2,
            backlog_records: 10,
            bytes_at_risk: 900,
            forwarded_records: 5,
            forwarded_bytes: 450,
            dropped_records: 0,
            rate_bytes_per_s: Some(90),
            eta_s: Some(2),
            open_windows: 0,
            windows_emitted: 0,
            windows_closed_early: 0,
            late_records: 0,
            malformed_records: 0,
        }],
    }));
    for body in [
        status,
        ResponseBody::MirrorPause(MirrorRuleRequest {
            rule: "temps".into(),
            paused: true,
        }),
    ] {
        let r = Response {
            correlation_id: 9,
            body,
        };
        let bytes = minicbor::to_vec(&r).unwrap();
        assert_eq!(minicbor::decode::<Response>(&bytes).unwrap(), r);
    }
    let req = Request {
        correlation_id: 2,
        body: RequestBody::MirrorStatus(MirrorStatusRequest {}),
    };
    let bytes = minicbor::to_vec(&req).unwrap();
    // [2, [40, []]]: the operation index is 40 on the wire.
    assert_eq!(bytes[..4], [0x82, 0x02, 0x82, 0x18]);
    assert_eq!(bytes[4], 40);

    let full = ResponseBody::Error(ErrorResponse {
        code: ErrorCode::UpstreamBacklogFull,
        message: "full".into(),
    });
    let ResponseBody::Error(e) = crate::protocol::for_version(full.clone(), 1) else {
        unreachable!()
    };
    assert_eq!(e.code, ErrorCode::StorageFull);
    assert_eq!(crate::protocol::for_version(full.clone(), 2), full);
}

/// The coordinators' refusals at their limits have their own codes from
/// version 4 (those a slot soon frees for retriable); a version 3 client
/// gets `invalid_request`, as before, in an error answer, a produce result
/// and a share ack alike.
#[test]
fn coordinator_refusals_are_invalid_request_before_version_4() {
    assert!(ErrorCode::ConcurrentTransactions.is_retriable());
    assert!(!ErrorCode::TooManyTransactionalIds.is_retriable());
    assert!(ErrorCode::TooManyMembers.is_retriable());
    assert!(!ErrorCode::TooManyGroups.is_retriable());
    assert!(!ErrorCode::TooManyAbortedTransactions.is_retriable());
    assert!(!ErrorCode::TooManySharePartitions.is_retriable());
    for code in [
        ErrorCode::ConcurrentTransactions,
        ErrorCode::TooManyTransactionalIds,
        ErrorCode::TooManyGroups,
        ErrorCode::TooManyMembers,
        ErrorCode::TooManyAbortedTransactions,
        ErrorCode::TooManySharePartitions,
    ] {
        for body in answers_carrying(code) {
            assert_eq!(crate::protocol::for_version(body.clone(), 4), body);
            let v3 = crate::protocol::for_version(body, 3);
            assert_eq!(codes_in(&v3), [ErrorCode::InvalidRequest], "{code}");
        }
    }
}

/// A share ack's result per ack is mapped for an older client as an error
/// answer's code is: a version 3 client (share groups came with it) gets
/// `invalid_request` for a code of version 4, and the rest unchanged.
#[test]
fn share_ack_results_are_mapped_for_older_versions() {
    let ack = ResponseBody::ShareAck(ShareAckResponse {
        results: vec![
            ErrorCode::None,
            ErrorCode::TooManySharePartitions,
            ErrorCode::ShareLockLost,
            ErrorCode::TooManyMembers,
        ],
    });
    assert_eq!(crate::protocol::for_version(ack.clone(), 4), ack);
    let ResponseBody::ShareAck(a) = crate::protocol::for_version(ack, 3) else {
        unreachable!()
    };
    assert_eq!(
        a.results,
        [
            ErrorCode::None,
            ErrorCode::InvalidRequest,
            ErrorCode::ShareLockLost,
            ErrorCode::InvalidRequest,
        ]
    );
}

/// An answer of each shape `for_version` maps: an error answer, a
/// produce result and a share ack, each carrying `code`.
fn answers_carrying(code: ErrorCode) -> [ResponseBody; 3] {
    [
        ResponseBody::Error(ErrorResponse {
            code,
            message: "refused".into(),
        }),
        ResponseBody::Produce(ProduceResponse {
            throttle_ms: None,
            partitions: vec![ProducePartitionResult {
                topic: "t".into(),
                partition: 0,
                error: code,
                base_offset: 0,
                last_offset: 0,
                duplicate_records: 0,
                message: Some("refused".into()),
            }],
        }),
        ResponseBody::ShareAck(ShareAckResponse {
            results: vec![code],
        }),
    ]
}

/// The codes an answer carries, whichever of the mapped shapes it is.
fn codes_in(body: &ResponseBody) -> Vec<ErrorCode> {
    match body {
        ResponseBody::Error(e) => vec![e.code],
        ResponseBody::Produce(p) => p.partitions.iter().map(|r| r.error).collect(),
        ResponseBody::ShareAck(a) => a.results.clone(),
        _ => unreachable!(),
    }
}

/// Compaction came with version 2, and its codes with it: a version 1
/// client producing to a compacted topic (another client made it) is
/// refused with codes it knows and does not retry: a keyless record is
/// `invalid_batch`, a ring full of live data `invalid_request`.
#[test]
fn compaction_codes_are_version_1_codes_for_a_version_1_client() {
    for (code, old) in [
        (ErrorCode::InvalidRecord, ErrorCode::InvalidBatch),
        (ErrorCode::RingFullOfLiveData, ErrorCode::InvalidRequest),
    ] {
        assert_eq!(code.since_version(), 2);
        assert!(!old.is_retriable());
        for body in answers_carrying(code) {
            assert_eq!(crate::protocol::for_version(body.clone(), 2), body);
            let v1 = crate::protocol::for_version(body, 1);
            assert_eq!(codes_in(&v1), [old], "{code} at version 1");
        }
    }
}

/// The promise of docs/protocol.md ("Version negotiation"): whatever code
/// an answer carries, a client is sent one its version defines, the same
/// code when it does, and never a retriable one in place of one it must
/// not retry.
#[test]
fn every_code_is_sent_as_one_the_version_defines() {
    for code in ErrorCode::ALL {
        for version in PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX {
            for body in answers_carrying(code) {
                let sent = codes_in(&crate::protocol::for_version(body, version))[0];
                assert!(
                    sent.since_version() <= version,
                    "{code} is sent as {sent} at version {version}"
                );
                if code.since_version() <= version {
                    assert_eq!(sent, code, "at version {version}");
                }
                assert!(
                    code.is_retriable() || !sent.is_retriable(),
                    "{code} is sent as retriable {sent} at version {version}"
                );
            }
        }
    }
}

/// Share groups' operations (70..=75) are in the samples, so their bytes
/// are pinned (the golden tables), they round-trip, docs/protocol.md shows
/// each and the fuzzers start from them; here only their versions:
/// share_leave came with version 4, the rest with 3.
#[test]
fn share_operations_are_version_3_but_share_leave_version_4() {
    let share = [
        "share_fetch",
        "share_ack",
        "list_share_groups",
        "describe_share_group",
        "delete_share_group",
        "share_leave",
    ];
    for name in share {
        let r = sample_request(name);
        let want = if name == "share_leave" { 4 } else { 3 };
        assert_eq!(r.body.since_version(), want, "{name}");
        assert_eq!(sample_response(name).body.name(), name);
    }
}

/// Compaction's and topic changes' operations (50..=52) came with version
/// 2, the transactions' (60..=63) with 3; like the share groups', their
/// bytes are pinned through the samples.
#[test]
fn topic_change_operations_are_version_2_and_transactions_version_3() {
    let ops = [
        ("compact_topic", 2),
        ("describe_partitions", 2),
        ("alter_topic", 2),
        ("init_txn", 3),
        ("add_txn_offsets", 3),
        ("end_txn", 3),
        ("list_txns", 3),
    ];
    for (name, want) in ops {
        assert_eq!(sample_request(name).body.since_version(), want, "{name}");
        assert_eq!(sample_response(name).body.name(), name);
    }
}

/// Frames the fuzzers start from besides the samples': a produce of a real
/// batch (the sample's bytes are not one), metadata of every topic, a
/// renewing init_producer, a few requests in other shapes and an answer
/// in an older broker's.
fn extra_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::batch::{BatchBuilder, ProducerStamp};
    let mut bb = BatchBuilder::new();
    bb.push(1_700_000_000_000, Some(b"k"), b"v", &[("msg-id", b"e1")]);
    bb.push(1_700_000_000_001, None, b"", &[]);
    let batch = bb.finish(ProducerStamp::NONE);
    let bodies: Vec<(&str, RequestBody)> = vec![
        (
            "hello",
            RequestBody::Hello(HelloRequest {
                version_min: 1,
                version_max: 1,
                client_name: Some("seed".into()),
            }),
        ),
        (
            "metadata",
            RequestBody::Metadata(MetadataRequest { topics: None }),
        ),
        (
            "create",
            RequestBody::CreateTopic(CreateTopicRequest {
                name: "t".into(),
                partitions: Some(2),
                fsync: Some("interval:5".into()),
                ..CreateTopicRequest::default()
            }),
        ),
        (
            "produce",
            RequestBody::Produce(ProduceRequest {
                partitions: vec![ProducePartition {
                    topic: "t".into(),
                    partition: 0,
                    batch: batch[..].into(),
                }],
            }),
        ),
        (
            "fetch",
            RequestBody::Fetch(FetchRequest {
                partitions: vec![FetchPartition {
                    topic: "t".into(),
                    partition: 1,
                    offset: 7,
                    max_bytes: 65536,
                }],
                max_wait_ms: 100,
                min_bytes: 1,
                isolation: None,
            }),
        ),
        (
            "list-offsets",
            RequestBody::ListOffsets(ListOffsetsRequest {
                partitions: vec![ListOffsetsPartition {
                    topic: "t".into(),
                    partition: 0,
                    spec: OffsetSpec::Timestamp(1_700_000_000_000),
                }],
            }),
        ),
        (
            "init-producer",
            RequestBody::InitProducer(InitProducerRequest {
                producer_name: Some("gw".into()),
                renew: None,
            }),
        ),
        (
            "init-producer-renew",
            RequestBody::InitProducer(InitProducerRequest {
                producer_name: None,
                renew: Some(ProducerIdEpoch {
                    producer_id: 17,
                    producer_epoch: 3,
                }),
            }),
        ),
    ];
    let mut seeds: Vec<(&str, Vec<u8>)> = bodies
        .into_iter()
        .zip(1..)
        .map(|((name, body), correlation_id)| {
            let r = Request {
                correlation_id,
                body,
            };
            (name, request_frame(&r))
        })
        .collect();
    seeds.push((
        "error-response",
        response_frame(&error_response(9, ErrorCode::UnknownTopic, "no")),
    ));
    // A mirror status as brokers before aggregates sent it: its rule without
    // fields 16..=20, which clients still read.
    seeds.push((
        "resp-mirror_status-before-aggregates",
        hex_bytes(concat!(
            "00000031820182182888f5f5f66567772d31376a6b61666b613a393039320c00",
            "81886574656d7073f40200001913881a0006419000",
        )),
    ));
    seeds
}

/// fuzz/seeds/frame holds exactly these frames, byte for byte: a frame of
/// every sample (so an operation added to them is fuzzed from the start)
/// and the extra seeds; nothing else writes that directory.
/// `SKIFF_WRITE_FUZZ_SEEDS=1 cargo test --lib every_operation_has_a_frame_seed`
/// writes them.
#[test]
fn every_operation_has_a_frame_seed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/frame");
    let write = std::env::var_os("SKIFF_WRITE_FUZZ_SEEDS").is_some();
    let frames: Vec<(String, Vec<u8>)> = sample_requests()
        .into_iter()
        .map(|(name, r)| (format!("req-{name}"), request_frame(&r)))
        .chain(
            sample_responses()
                .into_iter()
                .map(|(name, r)| (format!("resp-{name}"), response_frame(&r))),
        )
        .chain(
            extra_frame_seeds()
                .into_iter()
                .map(|(name, f)| (name.to_string(), f)),
        )
        .collect();
    let mut stale = Vec::new();
    for (file, frame) in &frames {
        let path = dir.join(file);
        if write {
            std::fs::write(&path, frame).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        } else if std::fs::read(&path).ok().as_ref() != Some(frame) {
            stale.push(file.clone());
        }
    }
    let mut unknown: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| !frames.iter().any(|(name, _)| name == f))
        .collect();
    unknown.sort();
    assert!(
        stale.is_empty() && unknown.is_empty(),
        "fuzz/seeds/frame lacks or holds other bytes for {stale:?}, and holds \
         {unknown:?} that no sample writes; write them with \
         SKIFF_WRITE_FUZZ_SEEDS=1 cargo test --lib every_operation_has_a_frame_seed \
         (and remove the others)"
    );
}

/// A rule's status as servers before aggregates (fields 0..=9) send it.
#[derive(minicbor::Encode)]
struct RuleStatusBeforeAggregates {
    #[n(0)]
    name: String,
    #[n(1)]
    paused: bool,
    #[n(2)]
    partitions: u64,
    #[n(3)]
    backlog_records: u64,
    #[n(4)]
    bytes_at_risk: u64,
    #[n(5)]
    forwarded_records: u64,
    #[n(6)]
    forwarded_bytes: u64,
    #[n(7)]
    dropped_records: u64,
    #[n(8)]
    rate_bytes_per_s: Option<u64>,
    #[n(9)]
    eta_s: Option<u64>,
}

#[test]
fn a_mirror_rule_status_from_before_aggregates_decodes() {
    let old = RuleStatusBeforeAggregates {
        name: "temps".into(),
        paused: false,
        partitions: 2,
        backlog_records: 7,
        bytes_at_risk: 700,
        forwarded_records: 3,
        forwarded_bytes: 300,
        dropped_records: 0,
        rate_bytes_per_s: Some(10),
        eta_s: None,
    };
    let bytes = minicbor::to_vec(&old).expect("encode");
    let got: MirrorRuleStatus = minicbor::decode(&bytes).expect("an older server's status decodes");
    assert_eq!(got.name, "temps");
    assert_eq!(got.backlog_records, 7);
    assert_eq!(got.rate_bytes_per_s, Some(10));
    assert_eq!(
        (
            got.open_windows,
            got.windows_emitted,
            got.late_records,
            got.malformed_records
        ),
        (0, 0, 0, 0)
    );
}

/// The client's decode leaves fetched records in the frame: a view that
/// keeps the frame alive, equal to what the copying decode returns.
#[test]
fn shared_decode_leaves_fetched_records_in_the_frame() {
    let records: Vec<u8> = (0..5_000u32).map(|i| (i % 251) as u8).collect();
    let r = Response {
        correlation_id: 7,
        body: ResponseBody::Fetch(FetchResponse {
            throttle_ms: None,
            partitions: vec![FetchPartitionResult {
                topic: "t".into(),
                partition: 0,
                error: ErrorCode::None,
                high_watermark: 10,
                earliest_offset: 0,
                records: RecordBytes::from(records.clone()),
                last_stable_offset: None,
                next_offset: None,
                message: None,
            }],
        }),
    };
    let frame = bytes::Bytes::copy_from_slice(&response_frame(&r)[FRAME_HEADER_BYTES..]);
    let got = decode_response_shared(&frame).expect("decode");
    assert_eq!(got, r);
    let ResponseBody::Fetch(f) = got.body else {
        panic!("a fetch")
    };
    let view = f.partitions[0].records.clone().into_bytes();
    let (inside, part) = (frame.as_ptr_range(), view.as_ptr_range());
    assert!(
        inside.start <= part.start && part.end <= inside.end,
        "a view of the frame"
    );
    drop(f);
    // The view alone keeps the frame's bytes alive and unchanged.
    drop(frame);
    assert_eq!(&view[..], &records[..]);
    // The copying decode owns its bytes.
    let copied = decode_response(&response_frame(&r)[FRAME_HEADER_BYTES..]).expect("decode");
    assert_eq!(copied, r);
}

/// The request as brokers before anonymous renewal decode it.
#[derive(minicbor::Decode)]
struct InitProducerBeforeRenew {
    #[n(0)]
    producer_name: Option<String>,
}

/// An anonymous producer's renewal: the same id at the next epoch from
/// this build, and from an older broker (which ignores the field) a fresh
/// id, as before.
#[test]
fn an_init_producer_renewal_round_trips_and_older_brokers_ignore_it() {
    let r = InitProducerRequest {
        producer_name: None,
        renew: Some(ProducerIdEpoch {
            producer_id: 17,
            producer_epoch: 3,
        }),
    };
    let bytes = minicbor::to_vec(&r).expect("encode");
    assert_eq!(minicbor::display(&bytes).to_string(), "[null, [17, 3]]");
    let back: InitProducerRequest = minicbor::decode(&bytes).expect("decode");
    assert_eq!(back, r);
    let old: InitProducerBeforeRenew =
        minicbor::decode(&bytes).expect("an older broker decodes it");
    assert_eq!(old.producer_name, None);
    // And a request without it is what it always was.
    let plain = InitProducerRequest {
        producer_name: Some("gw".into()),
        renew: None,
    };
    let bytes = minicbor::to_vec(&plain).expect("encode");
    assert_eq!(minicbor::display(&bytes).to_string(), "[\"gw\"]");
}
