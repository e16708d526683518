use super::*;
use crate::config::ShareOverride;

fn over(topic: Option<&str>, group: Option<&str>, max: u32) -> ShareOverride {
    ShareOverride {
        topic: topic.map(Into::into),
        group: group.map(Into::into),
        max_deliveries: Some(max),
        lock_ms: None,
        dead_letter_topic: None,
    }
}

#[test]
fn the_most_specific_override_wins_whatever_its_place() {
    let c = ShareConfig {
        overrides: vec![
            over(Some("t"), Some("g"), 9),
            over(None, Some("g"), 7),
            over(Some("t"), None, 3),
        ],
        ..ShareConfig::default()
    };
    assert_eq!(c.settings("g", "t").max_deliveries, 9);
    assert_eq!(c.settings("g", "u").max_deliveries, 7);
    assert_eq!(c.settings("h", "t").max_deliveries, 3);
    let d = c.settings("h", "u");
    assert_eq!((d.max_deliveries, d.lock_ms), (5, 30_000));
    assert_eq!(d.dead_letter_topic, "u.dlq");
}

/// The coordinator's default is what the broker runs without a config
/// file, read here from `default.toml` itself: unit tests that start from
/// it size windows and tables as a deployed broker does.
#[test]
fn the_default_share_config_is_the_embedded_default_configs() {
    let file: toml::Table = toml::from_str(crate::config::DEFAULT_TOML).expect("default.toml");
    let share = file["share"].as_table().expect("[share]");
    let int = |key: &str| {
        share[key]
            .as_integer()
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or_else(|| panic!("share.{key}"))
    };
    let d = ShareConfig::default();
    assert_eq!(u64::from(d.max_deliveries), int("max_deliveries"));
    assert_eq!(d.lock_ms, int("lock_ms"));
    assert_eq!(
        u64::from(d.max_in_flight_records),
        int("max_in_flight_records")
    );
    assert_eq!(
        Some(d.dead_letter_suffix.as_str()),
        share["dead_letter_suffix"].as_str()
    );
    assert_eq!(d.max_share_partitions as u64, int("max_share_partitions"));
    assert_eq!(d.max_active_members as u64, int("max_active_members"));
    assert_eq!(
        d.overrides.is_empty(),
        share["overrides"].as_array().is_some_and(Vec::is_empty)
    );
}

/// An empty window `[start, next)`.
fn window_of(start: u64, next: u64) -> SharePartition {
    SharePartition {
        start,
        next,
        ..SharePartition::default()
    }
}

#[test]
fn a_state_reads_back_with_locks_gone_and_counts_kept() {
    let member: Arc<str> = "m".into();
    let mut sp = window_of(100, 105);
    let states = [
        RecState::Done,
        RecState::Acquired {
            member,
            deadline: Instant::now(),
        },
        RecState::Dying,
        RecState::Available { not_before: None },
    ];
    for (i, state) in states.into_iter().enumerate() {
        sp.records.insert(
            100 + i as u64,
            InFlight {
                state,
                deliveries: i as u32 + 1,
                error: None,
                dead: false,
            },
        );
    }
    sp.settle();
    assert_eq!(sp.start, 101, "the done record at the front is forgotten");
    let key = ("g".to_owned(), "t".to_owned(), 3);
    let (k, back) = decode_record(&encode_key(&key), &encode_value(&sp)).expect("decodes");
    let back = back.expect("a state");
    assert_eq!(k, key);
    assert_eq!((back.start, back.next), (101, 105));
    let got: Vec<(u64, u32, bool)> = back
        .records
        .iter()
        .map(|(&o, r)| {
            (
                o,
                r.deliveries,
                r.state == (RecState::Available { not_before: None }),
            )
        })
        .collect();
    assert_eq!(got, [(101, 2, true), (102, 3, true), (103, 4, true)]);
}

/// A rejected record not yet done reads back rejected; a broker that
/// predates the mark reads the rest of the state as before.
#[test]
fn a_rejected_record_reads_back_rejected_and_an_older_broker_reads_the_rest() {
    let mut sp = window_of(10, 12);
    for (o, dead) in [(10, true), (11, false)] {
        let state = RecState::Available { not_before: None };
        let (deliveries, error) = (1, None);
        let r = InFlight {
            state,
            deliveries,
            error,
            dead,
        };
        sp.records.insert(o, r);
    }
    let value = encode_value(&sp);
    let key = ("g".to_owned(), "t".to_owned(), 0);
    let (_, back) = decode_record(&encode_key(&key), &value).expect("decodes");
    let dead: Vec<bool> = back
        .expect("a state")
        .records
        .values()
        .map(|r| r.dead)
        .collect();
    assert_eq!(dead, [true, false]);
    let old: StateValue = postcard::from_bytes(&value).expect("an older broker decodes");
    assert_eq!(old.records, [(0, 1, false), (1, 1, false)]);
}

#[test]
fn another_versions_record_is_skipped_and_an_empty_value_deletes() {
    let key = ("g".to_owned(), "t".to_owned(), 0);
    let mut k = encode_key(&key);
    assert!(matches!(decode_record(&k, &[]), Some((_, None))));
    k[0] = SHARE_RECORD_VERSION + 1;
    assert!(decode_record(&k, &[]).is_none());
}

#[test]
fn all_done_moves_start_to_next() {
    let mut sp = window_of(7, 10);
    for o in 7..10 {
        sp.records.insert(
            o,
            InFlight {
                state: RecState::Done,
                deliveries: 1,
                error: None,
                dead: false,
            },
        );
    }
    sp.settle();
    assert_eq!(sp.start, 10);
    assert!(sp.records.is_empty());
    assert_eq!(sp.in_flight(), 0);
}

#[test]
fn truncate_keeps_char_boundaries() {
    assert_eq!(truncate("héllo", 2), "h");
    assert_eq!(truncate("abc", 10), "abc");
}

#[test]
fn a_window_record_fits_what_the_memory_budget_counts() {
    let entry = std::mem::size_of::<(u64, InFlight)>() as u64;
    // A tree leaf holds 11 entries and a header (parent, index, length);
    // at worst it holds 5, and the internal nodes above add 12 edge
    // pointers per 6 leaves or fewer.
    let per_entry_worst = (11 * entry + 16 + 96) / 5;
    // The kept reason, with the allocator's header and rounding.
    let reason = crate::config::SHARE_KEPT_REASON_BYTES as u64 + 16;
    assert!(
        per_entry_worst + reason <= crate::config::SHARE_WINDOW_RECORD_BYTES,
        "a window record takes up to {} B, the budget counts {}",
        per_entry_worst + reason,
        crate::config::SHARE_WINDOW_RECORD_BYTES
    );
}

#[test]
fn an_active_member_fits_what_the_memory_budget_counts() {
    let entry = std::mem::size_of::<((String, String), Instant)>() as u64;
    // Tree nodes as in the window's test above; both ids at their longest,
    // with the allocator's header and rounding.
    let per_entry_worst = (11 * entry + 16 + 96) / 5;
    let ids = 2 * (SHARE_ID_BYTES_MAX as u64 + 16);
    assert!(
        per_entry_worst + ids <= crate::config::SHARE_MEMBER_BYTES,
        "an active member takes up to {} B, the budget counts {}",
        per_entry_worst + ids,
        crate::config::SHARE_MEMBER_BYTES
    );
}

// ------------------------------------------------ over a real broker

use crate::broker::TopicSpec;
use crate::storage::tests::Rig;
use smol::block_on;

pub(super) fn open(rig: &Rig, config: ShareConfig) -> Arc<ShareCoordinator> {
    open_on(rig.open(), rig, config)
}

fn open_on(
    storage: crate::storage::Storage,
    rig: &Rig,
    config: ShareConfig,
) -> Arc<ShareCoordinator> {
    let broker = crate::broker::tests::open(storage, rig);
    if broker.topic("t").is_err() {
        create(&broker, "t");
    }
    let c = ShareCoordinator::open(broker, config).expect("coordinator opens");
    smol::spawn(c.clone().run_log()).detach();
    c
}

fn create(broker: &Broker, topic: &str) {
    let spec = TopicSpec {
        partitions: Some(1),
        ..TopicSpec::default()
    };
    block_on(broker.create_topic(topic, &spec)).expect("create");
}

pub(super) fn fill(broker: &Broker, topic: &str, n: usize) {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        b.push(0, None, format!("r{i}").as_bytes(), &[]);
    }
    let ack = block_on(broker.produce(topic, 0, BatchBuf::from(b.finish(ProducerStamp::NONE))))
        .expect("produce");
    block_on(ack).expect("durable");
}

pub(super) fn take(c: &ShareCoordinator, topic: &str, member: &str, max: u32) -> Vec<Delivered> {
    let spec = FetchSpec {
        group: "g".into(),
        topic: topic.into(),
        member: member.into(),
        max_records: max,
        max_wait: Duration::ZERO,
        from_earliest: true,
        max_bytes: usize::MAX,
        record_bytes: |_| 0,
    };
    block_on(c.fetch(spec)).expect("share fetch").0
}

fn ack(c: &ShareCoordinator, topic: &str, member: &str, offsets: &[u64], kind: AckKind) {
    let acks = offsets
        .iter()
        .map(|&offset| Ack {
            partition: 0,
            offset,
            kind,
            error: Some("x".repeat(4000)),
        })
        .collect();
    let results = block_on(c.acknowledge("g", topic, member, acks)).expect("acknowledge");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[test]
fn the_window_in_memory_never_holds_more_than_max_in_flight_records() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let bound = 8u32;
    let c = open(
        &rig,
        ShareConfig {
            max_in_flight_records: bound,
            ..ShareConfig::default()
        },
    );
    fill(c.broker(), "t", 100);
    let check = |c: &ShareCoordinator| {
        let parts = c.lock();
        let sp = parts.values().next().expect("a share partition");
        assert!(sp.next - sp.start <= u64::from(bound), "window {sp:?}");
        assert!(
            sp.records.len() <= bound as usize,
            "{} records",
            sp.records.len()
        );
        for r in sp.records.values() {
            assert!(r
                .error
                .as_ref()
                .is_none_or(|e| e.len() <= crate::config::SHARE_KEPT_REASON_BYTES));
        }
    };
    // One worker holds the first record; the rest are accepted as they
    // come, released with long reasons, taken again.
    let first = take(&c, "t", "stuck", 1);
    assert_eq!(first[0].offset, 0);
    let mut seen = 0;
    for round in 0..20 {
        let got = take(&c, "t", "w", 1000);
        check(&c);
        assert!(got.len() <= bound as usize);
        let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
        if round % 2 == 0 {
            ack(
                &c,
                "t",
                "w",
                &offsets,
                AckKind::Release {
                    delay: Duration::ZERO,
                },
            );
        } else {
            seen += offsets.len();
            ack(&c, "t", "w", &offsets, AckKind::Accept);
        }
        check(&c);
    }
    assert!(seen > 0);
    let parts = c.lock();
    let sp = parts.values().next().expect("a share partition");
    assert_eq!(sp.start, 0, "the stuck record holds the window");
    assert_eq!(
        sp.next,
        u64::from(bound),
        "and nothing past the bound was read"
    );
}

/// The share partitions the coordinator holds.
fn keys(c: &ShareCoordinator) -> Vec<SpKey> {
    c.lock().keys().cloned().collect()
}

/// The expiry pass says whether a lock is left to expire: with none, the
/// timers sleep until a fetch takes one (`run_timers`).
#[test]
fn the_expiry_pass_says_whether_records_are_still_locked() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig, ShareConfig::default());
    fill(c.broker(), "t", 3);
    assert!(!block_on(c.expire()), "nothing taken yet");
    assert_eq!(take(&c, "t", "w", 3).len(), 3);
    assert!(block_on(c.expire()), "three locked");
    ack(&c, "t", "w", &[0, 1], AckKind::Accept);
    assert!(block_on(c.expire()), "one still locked");
    ack(&c, "t", "w", &[2], AckKind::Accept);
    assert!(!block_on(c.expire()), "all accepted");
}

#[test]
fn a_deleted_group_and_a_deleted_topic_leave_no_state_across_a_restart() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    {
        let c = open(&rig, ShareConfig::default());
        create(c.broker(), "u");
        fill(c.broker(), "t", 5);
        fill(c.broker(), "u", 5);
        let got = take(&c, "t", "w", 5);
        assert_eq!(got.len(), 5);
        let err = block_on(c.delete("g")).expect_err("a member holds records");
        assert!(matches!(err, ShareError::NotEmpty { .. }), "{err}");
        ack(&c, "t", "w", &[0, 1], AckKind::Accept);
        take(&c, "u", "w", 5);
        // The member stays active for lock_ms: forget it as the expiry
        // pass would once that passed, and let its locks lapse (not yet
        // freed by an expiry pass: a lapsed lock keeps no one active).
        c.members_lock().clear();
        let lapsed = Instant::now();
        for sp in c.lock().values_mut() {
            for r in sp.records.values_mut() {
                if let RecState::Acquired { deadline, .. } = &mut r.state {
                    *deadline = lapsed;
                }
            }
        }
        let d = c.describe("g").expect("described");
        assert!(d.members.is_empty(), "{:?}", d.members);
        assert_eq!(d.partitions.len(), 2);
        let p = &d.partitions[0];
        assert_eq!((p.start, p.next, p.acquired, p.done), (2, 5, 3, 0));
        assert_eq!(
            p.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        block_on(c.broker().delete_topic("u")).expect("topic deleted");
        block_on(c.forget_topic("u")).expect("share state dropped");
        assert_eq!(keys(&c), [("g".to_owned(), "t".to_owned(), 0)]);
        // Made again by the same name before the restart: only the
        // tombstone keeps the old state from coming back.
        create(c.broker(), "u");
        block_on(c.delete("g")).expect("deleted");
        assert!(keys(&c).is_empty());
        assert!(matches!(
            block_on(c.delete("g")),
            Err(ShareError::UnknownGroup(_))
        ));
        assert!(matches!(c.describe("g"), Err(ShareError::UnknownGroup(_))));
        // Another group's state stays.
        let spec = FetchSpec {
            group: "h".into(),
            topic: "t".into(),
            member: "w".into(),
            max_records: 1,
            max_wait: Duration::ZERO,
            from_earliest: true,
            max_bytes: usize::MAX,
            record_bytes: |_| 0,
        };
        block_on(c.fetch(spec)).expect("share fetch");
        c.broker().close().expect("closed");
    }
    let c = open(&rig, ShareConfig::default());
    assert_eq!(keys(&c), [("h".to_owned(), "t".to_owned(), 0)]);
    fill(c.broker(), "u", 2);
    let got = take(&c, "u", "w", 10);
    assert_eq!(
        got.iter()
            .map(|d| (d.offset, d.delivery_count))
            .collect::<Vec<_>>(),
        [(0, 1), (1, 1)],
        "a topic made again starts afresh"
    );
}

/// A share fetch that meets a topic as it is deleted and made again by
/// the same name: the share partition it starts must not start at the old
/// topic's offsets, or the new topic's first records never reach the
/// group. The fetch is held at the coordinator's lock while the topic goes
/// and comes back (`forget_topic` had nothing to drop yet).
#[test]
fn a_share_fetch_racing_a_topic_delete_starts_nothing_at_the_old_offsets() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig, ShareConfig::default());
    create(c.broker(), "u");
    fill(c.broker(), "u", 5);
    let guard = c.lock();
    let fetching = {
        let c = c.clone();
        std::thread::spawn(move || {
            let spec = FetchSpec {
                group: "g".into(),
                topic: "u".into(),
                member: "w".into(),
                max_records: 10,
                max_wait: Duration::ZERO,
                from_earliest: false,
                max_bytes: usize::MAX,
                record_bytes: |_| 0,
            };
            block_on(c.fetch(spec)).map(|(got, _)| got.len())
        })
    };
    // Long enough for the fetch to reach the lock; were it slower, it
    // would only see the new topic, and the test pass without testing.
    std::thread::sleep(Duration::from_millis(300));
    block_on(c.broker().delete_topic("u")).expect("topic deleted");
    create(c.broker(), "u");
    drop(guard);
    // Started at the new topic's end (0), or refused: nothing delivered.
    let fetched = fetching.join().unwrap();
    assert!(matches!(fetched, Ok(0) | Err(_)), "{fetched:?}");
    fill(c.broker(), "u", 3);
    let got: Vec<u64> = take(&c, "u", "w", 10).iter().map(|d| d.offset).collect();
    assert_eq!(got, [0, 1, 2], "the new topic's records reach the group");
    c.broker().close().expect("closed");
}

#[test]
fn a_topic_deleted_before_its_tombstone_was_written_is_dropped_at_start_for_good() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    {
        let c = open(&rig, ShareConfig::default());
        create(c.broker(), "v");
        fill(c.broker(), "v", 3);
        take(&c, "v", "w", 3);
        // The broker stops between the topic's delete and the share
        // coordinator's tombstone.
        block_on(c.broker().delete_topic("v")).expect("topic deleted");
        c.broker().close().expect("closed");
    }
    {
        // The state of a topic that is gone is dropped, and its
        // tombstone queued; then the topic is made again.
        let c = open(&rig, ShareConfig::default());
        assert!(keys(&c).is_empty());
        create(c.broker(), "v");
        while c.stats().log_writes == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        c.broker().close().expect("closed");
    }
    let c = open(&rig, ShareConfig::default());
    assert!(keys(&c).is_empty(), "the tombstone keeps it gone");
}

#[test]
fn active_members_are_bounded_and_lapsed_ones_make_room() {
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(
        &rig,
        ShareConfig {
            max_active_members: 3,
            ..ShareConfig::default()
        },
    );
    fill(c.broker(), "t", 10);
    let hour = Duration::from_secs(3600);
    c.seen("g", "a", hour).expect("room");
    c.seen("g", "b", hour).expect("room");
    // Active until now: lapsed already.
    c.seen("g", "c", Duration::ZERO).expect("room");
    // The table is full, but c has lapsed: d takes its place.
    take(&c, "t", "d", 1);
    assert_eq!(c.members_lock().len(), 3);
    let spec = |member: &str| FetchSpec {
        group: "g".into(),
        topic: "t".into(),
        member: member.into(),
        max_records: 1,
        max_wait: Duration::ZERO,
        from_earliest: true,
        max_bytes: usize::MAX,
        record_bytes: |_| 0,
    };
    match block_on(c.fetch(spec("e"))) {
        Err(e @ ShareError::TooManyMembers { max: 3 }) => assert!(
            e.to_string().contains("share.max_active_members is 3"),
            "{e}"
        ),
        other => panic!("a fourth member was let in: {:?}", other.map(|r| r.1)),
    }
    assert!(
        matches!(
            block_on(c.acknowledge("g", "t", "f", Vec::new())),
            Err(ShareError::TooManyMembers { max: 3 })
        ),
        "an ack makes a member active too"
    );
    // In another group too: the bound is the broker's.
    assert!(
        matches!(
            c.seen("other", "a", hour),
            Err(ShareError::TooManyMembers { max: 3 })
        ),
        "a member of another group counts against the same bound"
    );
    // The members already in are still served.
    take(&c, "t", "a", 1);
    c.seen("g", "b", hour).expect("known");
    assert_eq!(c.members_lock().len(), 3);
}

/// Each record of the share partition: (offset, deliveries, locked).
fn window(c: &ShareCoordinator, topic: &str, partition: u32) -> Vec<(u64, u32, bool)> {
    let key = ("g".to_owned(), topic.to_owned(), partition);
    c.lock()
        .get(&key)
        .map(|sp| {
            sp.records
                .iter()
                .map(|(&o, r)| {
                    let locked = matches!(r.state, RecState::Acquired { .. });
                    (o, r.deliveries, locked)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A partition the fetch cannot take from (here: its share state would
/// pass share.max_share_partitions) neither hides the records taken from
/// the others in the same fetch (they stayed locked, counted, never
/// delivered) nor stalls the group: every fetch delivers the healthy
/// partition's records, and only a fetch with nothing else to give
/// answers the error.
#[test]
fn a_share_fetch_delivers_the_healthy_partitions_past_one_that_fails() {
    let rig = Rig::fault(11);
    let config = ShareConfig {
        max_share_partitions: 2,
        ..ShareConfig::default()
    };
    let c = open(&rig, config);
    take(&c, "t", "w", 1);
    let spec = TopicSpec {
        partitions: Some(2),
        ..TopicSpec::default()
    };
    block_on(c.broker().create_topic("q", &spec)).expect("create");
    let fill_both = || {
        for p in 0..2 {
            let mut b = BatchBuilder::new();
            b.push(0, None, b"r", &[]);
            b.push(0, None, b"s", &[]);
            let batch = BatchBuf::from(b.finish(ProducerStamp::NONE));
            block_on(block_on(c.broker().produce("q", p, batch)).expect("produce"))
                .expect("durable");
        }
    };
    // Each fetch starts at a partition picked at random: several, so the
    // failing one is met both before and after the healthy one.
    let mut healthy = None;
    for round in 0..8u64 {
        fill_both();
        let got = take(&c, "q", "w", 10);
        let p = *healthy.get_or_insert(got[0].partition);
        let first = round * 2;
        let counts: Vec<_> = got
            .iter()
            .map(|d| (d.partition, d.offset, d.delivery_count))
            .collect();
        assert_eq!(counts, [(p, first, 1), (p, first + 1, 1)]);
        let acks = [first, first + 1].map(|offset| Ack {
            partition: p,
            offset,
            kind: AckKind::Accept,
            error: None,
        });
        let results = block_on(c.acknowledge("g", "q", "w", acks.to_vec())).expect("ack");
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert!(window(&c, "q", p).iter().all(|&(_, _, locked)| !locked));
    }
    match block_on(c.fetch(fetch_spec("q", 10))) {
        Err(e @ ShareError::TooManySharePartitions { max: 2 }) => assert_eq!(
            e.to_string(),
            "too many share partitions: share.max_share_partitions is 2"
        ),
        other => panic!("nothing but the failing partition: {other:?}"),
    }
    c.broker().close().expect("closed");
}

/// A share coordinator whose storage does not skip damage: a batch
/// damaged on disk quarantines its partition, and every read of it fails.
fn open_unskipping(rig: &Rig) -> Arc<ShareCoordinator> {
    let storage = rig.open_with(unskipping(rig)).expect("storage opens");
    open_on(storage, rig, ShareConfig::default())
}

fn unskipping(rig: &Rig) -> crate::storage::StorageConfig {
    crate::storage::StorageConfig {
        recovery_policy: crate::storage::RecoveryPolicy::TolerateTornTail,
        ..rig.cfg()
    }
}

/// Appends to `topic`/`partition` a record at offset 0 then records
/// enough to leave it well before the tail (read back from the disk).
fn fill_far(c: &ShareCoordinator, topic: &str, partition: u32) {
    let mut values = vec![vec![1u8; 1]];
    values.extend((0..16).map(|i| vec![i; 8 * 1024]));
    for value in values {
        let mut b = BatchBuilder::new();
        b.push(0, None, &value, &[]);
        let batch = BatchBuf::from(b.finish(ProducerStamp::NONE));
        let ack = block_on(c.broker().produce(topic, partition, batch)).expect("produce");
        block_on(ack).expect("durable");
    }
}

/// Flips a bit of the batch at offset 0 of `topic`/`partition`.
fn damage_offset_0(rig: &Rig, topic: &str, partition: u32) {
    let seg = rig
        .dir
        .path()
        .join(format!("topics/{topic}/{partition}/seg-00000.log"));
    assert!(rig
        .disk()
        .expect("fault rig")
        .flip_stored_bit(&seg, 4096 + 66, 3));
}

fn fetch_spec(topic: &str, max_records: u32) -> FetchSpec {
    FetchSpec {
        group: "g".into(),
        topic: topic.into(),
        member: "w".into(),
        max_records,
        max_wait: Duration::ZERO,
        from_earliest: true,
        max_bytes: usize::MAX,
        record_bytes: |_| 0,
    }
}

/// The same over a partition whose log cannot be read (a batch damaged
/// on disk): the others' records are delivered, each counted once.
#[test]
fn a_share_fetch_delivers_the_healthy_partitions_past_one_that_cannot_be_read() {
    let rig = Rig::fault(13);
    let c = open_unskipping(&rig);
    let spec = TopicSpec {
        partitions: Some(2),
        ..TopicSpec::default()
    };
    block_on(c.broker().create_topic("q", &spec)).expect("create");
    fill_far(&c, "q", 1);
    damage_offset_0(&rig, "q", 1);
    for round in 0..8u64 {
        fill(c.broker(), "q", 2);
        let got = take(&c, "q", "w", 10);
        let counts: Vec<_> = got
            .iter()
            .map(|d| (d.partition, d.offset, d.delivery_count))
            .collect();
        let first = round * 2;
        assert_eq!(counts, [(0, first, 1), (0, first + 1, 1)]);
        ack(&c, "q", "w", &[first, first + 1], AckKind::Accept);
    }
    match block_on(c.fetch(fetch_spec("q", 10))) {
        Err(ShareError::Broker(e))
            if matches!(*e, BrokerError::Quarantined { partition: 1, .. }) => {}
        other => panic!("nothing but the damaged partition: {other:?}"),
    }
    assert!(window(&c, "q", 0).iter().all(|&(_, _, locked)| !locked));
    c.broker().close().expect("closed");
}

/// Redeliveries that cannot be read (here: a batch damaged on disk, the
/// partition quarantined) were never delivered: they stay available with
/// the count they had, not one more per failed fetch (which would send
/// them to the dead-letter topic undelivered).
#[test]
fn redeliveries_that_cannot_be_read_keep_their_delivery_count() {
    let rig = Rig::fault(12);
    let c = open_unskipping(&rig);
    fill_far(&c, "t", 0);
    assert_eq!(take(&c, "t", "w", 1).len(), 1);
    ack(
        &c,
        "t",
        "w",
        &[0],
        AckKind::Release {
            delay: Duration::ZERO,
        },
    );
    assert_eq!(window(&c, "t", 0), [(0, 1, false)]);
    // A read far on: what the last reads kept in memory is not offset 0.
    block_on(c.read("t", 0, 16, 4096)).expect("read");
    damage_offset_0(&rig, "t", 0);
    for _ in 0..3 {
        let failed = block_on(c.fetch(fetch_spec("t", 1)));
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(window(&c, "t", 0), [(0, 1, false)]);
    }
    c.broker().close().expect("closed");
}

/// A fetch whose acquisition cannot be made durable delivers nothing, so
/// it leaves nothing locked or counted: its records are available again
/// at once with their counts as before (describe shows them; those new
/// from the log are past `next` again), and it answers storage's error.
/// Here the share log cannot be made (the disk is full), then, once it
/// has room and is made, cannot be written (a failed write).
#[test]
fn a_share_fetch_whose_state_is_not_written_leaves_its_records_as_they_were() {
    use crate::storage::io::fault::FaultPlan;
    let rig = Rig::fault(14);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig, ShareConfig::default());
    fill(c.broker(), "t", 3);
    disk.set_plan(FaultPlan {
        capacity_bytes: Some(0),
        ..FaultPlan::default()
    });
    match block_on(c.fetch(fetch_spec("t", 10))) {
        Err(ShareError::Broker(e)) if e.is_disk_full() => {}
        other => panic!("no room for the share log: {other:?}"),
    }
    // Never delivered, so not in the window: describe says so, as the
    // share log would after a restart.
    assert_eq!(window(&c, "t", 0), []);
    let d = c.describe("g").expect("described");
    let p = &d.partitions[0];
    assert_eq!((p.start, p.next, p.available), (0, 0, 0), "{p:?}");
    assert_eq!(c.stats().redeliveries, 0);
    // Room again: the same records, each on its first delivery.
    disk.set_plan(FaultPlan::default());
    let got = take(&c, "t", "w", 1);
    assert_eq!((got[0].offset, got[0].delivery_count), (0, 1));
    let release = AckKind::Release {
        delay: Duration::ZERO,
    };
    ack(&c, "t", "w", &[0], release);
    let got: Vec<_> = take(&c, "t", "w", 10)
        .iter()
        .map(|d| (d.offset, d.delivery_count))
        .collect();
    assert_eq!(got, [(0, 2), (1, 1), (2, 1)]);
    assert_eq!(c.stats().redeliveries, 1);
    ack(&c, "t", "w", &[0, 1, 2], release);
    disk.set_plan(FaultPlan {
        write_error_per_million: 1_000_000,
        errno: libc::EIO,
        ..FaultPlan::default()
    });
    match block_on(c.fetch(fetch_spec("t", 10))) {
        Err(ShareError::Broker(e)) if matches!(*e, BrokerError::PartitionFailed { .. }) => {}
        other => panic!("the share log's write fails: {other:?}"),
    }
    assert_eq!(
        window(&c, "t", 0),
        [(0, 2, false), (1, 1, false), (2, 1, false)]
    );
    let counts: Vec<(u64, u32)> = c.describe("g").expect("described").partitions[0]
        .records
        .iter()
        .map(|r| (r.offset, r.delivery_count))
        .collect();
    assert_eq!(counts, [(0, 2), (1, 1), (2, 1)]);
    assert_eq!(c.stats().redeliveries, 1);
    disk.set_plan(FaultPlan::default());
    c.broker().close().expect("closed");
}

/// Takes records 0..3 of "t" (a first delivery each), stops, damages the
/// batch at offset 0 and starts again: the partition is quarantined at
/// offset 0, its log ending before the window's records.
fn quarantined_at_start(rig: &Rig, config: ShareConfig) -> Arc<ShareCoordinator> {
    {
        let c = open_unskipping(rig);
        fill_far(&c, "t", 0);
        assert_eq!(take(&c, "t", "w", 3).len(), 3);
        c.broker().close().expect("closed");
    }
    damage_offset_0(rig, "t", 0);
    let c = open_on(rig.open_with(unskipping(rig)).expect("opens"), rig, config);
    assert_eq!(c.broker().recovery_summary().quarantined_partitions, 1);
    c
}

/// Records of a partition quarantined at start-up are not lost: a fetch
/// answers the quarantine and leaves them as they were, and once an
/// operator repairs the partition they are delivered.
#[test]
fn records_of_a_partition_quarantined_at_start_are_delivered_after_its_repair() {
    let rig = Rig::fault(15);
    let c = quarantined_at_start(&rig, ShareConfig::default());
    let before = [(0, 1, false), (1, 1, false), (2, 1, false)];
    assert_eq!(window(&c, "t", 0), before);
    for _ in 0..2 {
        match block_on(c.fetch(fetch_spec("t", 10))) {
            Err(ShareError::Broker(e))
                if matches!(*e, BrokerError::Quarantined { partition: 0, .. }) => {}
            other => panic!("the partition is quarantined: {other:?}"),
        }
        assert_eq!(window(&c, "t", 0), before);
    }
    assert_eq!(c.stats().lost, 0);
    c.broker().close().expect("closed");
    drop(c);
    // The repair: the damaged bit is as it was.
    damage_offset_0(&rig, "t", 0);
    let c = open_unskipping(&rig);
    let got: Vec<_> = take(&c, "t", "w", 3)
        .iter()
        .map(|d| (d.offset, d.delivery_count))
        .collect();
    assert_eq!(got, [(0, 2), (1, 2), (2, 2)]);
    assert_eq!(c.stats().lost, 0);
    c.broker().close().expect("closed");
}

/// The same for records on their way to the dead-letter topic: they
/// stay in the window, available, rather than be counted lost.
#[test]
fn dead_records_of_a_partition_quarantined_at_start_are_not_lost() {
    let rig = Rig::fault(16);
    let config = ShareConfig {
        max_deliveries: 1,
        ..ShareConfig::default()
    };
    let c = quarantined_at_start(&rig, config);
    block_on(c.expire());
    assert_eq!(
        window(&c, "t", 0),
        [(0, 1, false), (1, 1, false), (2, 1, false)]
    );
    assert_eq!(c.stats().lost, 0);
    assert_eq!(c.stats().dead_lettered, 0);
    c.broker().close().expect("closed");
}

/// An acknowledgement whose state cannot be written (no room) leaves its
/// records locked to the worker, so its retry, once there is room,
/// succeeds rather than answer share_lock_lost.
#[test]
fn an_acknowledgement_whose_state_is_not_written_can_be_retried() {
    use crate::storage::io::fault::FaultPlan;
    let rig = Rig::fault(17);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig, ShareConfig::default());
    fill(c.broker(), "t", 2);
    assert_eq!(take(&c, "t", "w", 10).len(), 2);
    let release = AckKind::Release {
        delay: Duration::ZERO,
    };
    let acks = [(0, AckKind::Accept), (1, release)].map(|(offset, kind)| Ack {
        partition: 0,
        offset,
        kind,
        error: None,
    });
    // A failed write fails the share log's partition until a restart,
    // which drops every lock: a share log to create again, on a full disk,
    // is a failure the storage recovers from.
    block_on(c.broker().delete_topic(SHARE_TOPIC)).expect("share log deleted");
    disk.set_plan(FaultPlan {
        capacity_bytes: Some(0),
        ..FaultPlan::default()
    });
    match block_on(c.acknowledge("g", "t", "w", acks.to_vec())) {
        Err(ShareError::Broker(e)) if e.is_disk_full() => {}
        other => panic!("no room for the share log: {other:?}"),
    }
    assert_eq!(window(&c, "t", 0), [(0, 1, true), (1, 1, true)]);
    disk.set_plan(FaultPlan::default());
    ack(&c, "t", "w", &[0], AckKind::Accept);
    ack(&c, "t", "w", &[1], release);
    assert_eq!(window(&c, "t", 0), [(1, 1, false)]);
    c.broker().close().expect("closed");
}

/// Warnings logged in this process: nextest runs each test in its own,
/// and each test below counts lines naming what is its own.
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let mut w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
            w.push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

pub(crate) fn capture_warnings() {
    // Another test of this process may have set it already.
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Warn);
}

/// The warnings logged so far that contain each of `words`.
pub(crate) fn warnings(words: &[&str]) -> Vec<String> {
    let w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
    w.iter()
        .filter(|l| words.iter().all(|s| l.contains(s)))
        .cloned()
        .collect()
}

/// Rejections whose dead-letter topic cannot be made (the broker has
/// `max_topics`) fail, each, and the failure is logged once a minute for
/// the partition, not once for each (nor again by the topic's creation).
#[test]
fn a_dead_letter_topic_that_cannot_be_made_is_logged_once_a_minute() {
    capture_warnings();
    let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
    let c = open(&rig, ShareConfig::default());
    create(c.broker(), "poison");
    fill(c.broker(), "poison", 3);
    assert_eq!(take(&c, "poison", "w", 3).len(), 3, "the share log is made");
    // The fourth topic of the rig's four.
    create(c.broker(), "full");
    for offset in 0..3 {
        let reject = Ack {
            partition: 0,
            offset,
            kind: AckKind::Reject,
            error: None,
        };
        let results = block_on(c.acknowledge("g", "poison", "w", vec![reject])).expect("acked");
        assert!(
            matches!(&results[0], Err(ShareError::Broker(e)) if matches!(**e, BrokerError::TooManyTopics { .. })),
            "{results:?}"
        );
    }
    let lines = warnings(&["poison.dlq"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("poison/0"), "{lines:#?}");
    c.broker().close().expect("closed");
}

/// Records dead as soon as their first lock lapses, a millisecond on.
fn dying_at_once() -> ShareConfig {
    ShareConfig {
        max_deliveries: 1,
        lock_ms: 1,
        ..ShareConfig::default()
    }
}

/// A share log that keeps failing is logged once a minute, not once for
/// each write (every fetch and acknowledgement writes), and the expiry
/// pass's failed write is logged once, by the writer.
#[test]
fn a_share_log_that_keeps_failing_is_logged_once_a_minute() {
    use crate::storage::io::fault::FaultPlan;
    capture_warnings();
    let rig = Rig::fault(19);
    let disk = rig.disk().expect("fault rig").clone();
    let c = open(&rig, dying_at_once());
    fill(c.broker(), "t", 2);
    assert_eq!(take(&c, "t", "w", 1).len(), 1, "the share log is made");
    std::thread::sleep(Duration::from_millis(10));
    disk.set_plan(FaultPlan {
        fail_writes_to: Some(SHARE_TOPIC),
        errno: libc::EROFS,
        ..FaultPlan::default()
    });
    // The lapsed record goes to the (healthy) dead-letter topic; its
    // window's move is not written.
    block_on(c.expire());
    assert_eq!(c.stats().dead_lettered, 1);
    let failing = ["share log", "write failed"];
    let lines = warnings(&failing);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    for _ in 0..3 {
        assert!(block_on(c.fetch(fetch_spec("t", 10))).is_err());
    }
    let lines = warnings(&failing);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    disk.set_plan(FaultPlan::default());
    c.broker().close().expect("closed");
}

/// A share log whose ring is full and whose compaction cannot be done
/// (every write of its scratch segment fails) fails at every write, each
/// asking for a compaction: the failed compaction is logged once a
/// minute, not once for each.
#[test]
fn a_share_log_compaction_that_keeps_failing_is_logged_once_a_minute() {
    use crate::storage::io::fault::FaultPlan;
    capture_warnings();
    let rig = Rig::fault(21);
    let disk = rig.disk().expect("fault rig").clone();
    // One share partition: the smallest share log, a 4 x 1 MiB ring. The
    // records are released and taken again until it is full, never dead.
    let records = 100;
    let c = open(
        &rig,
        ShareConfig {
            max_in_flight_records: records,
            max_share_partitions: 1,
            max_deliveries: 1_000_000,
            ..ShareConfig::default()
        },
    );
    fill(c.broker(), "t", records as usize);
    assert_eq!(take(&c, "t", "w", records).len(), records as usize);
    // Not a full disk: a compaction's room is reserved with the ring.
    disk.set_plan(FaultPlan {
        fail_writes_to: Some("compact.tmp"),
        errno: libc::EIO,
        ..FaultPlan::default()
    });
    let failed = ["share log", "compaction failed"];
    let offsets: Vec<u64> = (0..u64::from(records)).collect();
    let release = AckKind::Release {
        delay: Duration::ZERO,
    };
    let acks = || {
        offsets
            .iter()
            .map(|&offset| Ack {
                partition: 0,
                offset,
                kind: release,
                error: Some("x".repeat(4000)),
            })
            .collect()
    };
    // Each round writes the partition's state, its kept reasons and all,
    // until the ring is full: well within this many (4 MiB of states of
    // about 8 KiB).
    // A failed release leaves the records locked, a failed fetch leaves
    // them released: one of the two writes again each round.
    let round = || {
        let _ = block_on(c.acknowledge("g", "t", "w", acks()));
        let _ = block_on(c.fetch(fetch_spec("t", records)));
    };
    let mut rounds = 0;
    while warnings(&failed).is_empty() {
        rounds += 1;
        assert!(rounds < 5_000, "the share log's ring never filled");
        round();
    }
    let compactions = || c.broker().cleaner_stats().runs.load(Ordering::Relaxed);
    let before = compactions();
    for _ in 0..3 {
        round();
    }
    assert!(compactions() >= before + 3, "each round asks for one");
    let lines = warnings(&failed);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    disk.set_plan(FaultPlan::default());
    c.broker().close().expect("closed");
}

/// A partition whose dead records cannot be read (quarantined) fails
/// alone: in the same expiry pass another partition's dead record goes
/// to its dead-letter topic, and only the failing one waits to be tried
/// again.
#[test]
fn an_unreadable_partition_does_not_hold_back_another_s_dead_letters() {
    let rig = Rig::fault(20);
    let c = quarantined_at_start(&rig, dying_at_once());
    create(c.broker(), "u");
    fill(c.broker(), "u", 1);
    assert_eq!(take(&c, "u", "w", 1).len(), 1);
    std::thread::sleep(Duration::from_millis(10));
    block_on(c.expire());
    assert_eq!(c.stats().dead_lettered, 1, "u/0's record");
    assert_eq!(window(&c, "u", 0), []);
    assert_eq!(
        window(&c, "t", 0),
        [(0, 1, false), (1, 1, false), (2, 1, false)]
    );
    let dead_letter_after = |topic: &str| {
        let key = ("g".to_owned(), topic.to_owned(), 0);
        c.lock().get(&key).map(|sp| sp.dead_letter_after.is_some())
    };
    assert_eq!(
        dead_letter_after("t"),
        Some(true),
        "t/0 is tried again later"
    );
    assert_eq!(dead_letter_after("u"), Some(false));
    // Nothing is locked, yet the timers wake for t/0's retry, not after
    // the idle timers' 10 s.
    let now = Instant::now();
    assert!(
        c.idle_wait(now) <= DEAD_LETTER_RETRY,
        "{:?}",
        c.idle_wait(now)
    );
    assert_eq!(
        c.idle_wait(now + DEAD_LETTER_RETRY),
        crate::broker::IDLE_TIMERS,
        "once due, the pass tries it and sets the next retry"
    );
    assert_eq!(c.stats().lost, 0);
    c.broker().close().expect("closed");
}

/// A reject whose dead-letter record is written but whose done mark is
/// not (power is lost in between: here the acknowledgement's last write,
/// the share log's, fails, then the power): after the restart the record
/// goes to the dead-letter topic again (docs/queues.md, "Write, then
/// acknowledge"), not back to a worker, which would process a record its
/// worker rejected and the dead-letter topic holds.
#[test]
fn a_reject_cut_short_by_a_restart_goes_to_the_dead_letter_topic_again() {
    use crate::storage::io::fault::FaultPlan;
    let rig = Rig::fault(22);
    let disk = rig.disk().expect("fault rig").clone();
    let reject = |offset| Ack {
        partition: 0,
        offset,
        kind: AckKind::Reject,
        error: Some("bad record".into()),
    };
    {
        let c = open(&rig, ShareConfig::default());
        create(c.broker(), "t.dlq");
        fill(c.broker(), "t", 3);
        assert_eq!(take(&c, "t", "w", 3).len(), 3);
        // The disk writes a reject takes, the last being the share log's.
        let before = disk.writes();
        let results = block_on(c.acknowledge("g", "t", "w", vec![reject(2)])).expect("ack");
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let last = disk.writes() - before;
        disk.set_plan(FaultPlan {
            fail_write_nth: Some(disk.writes() + last),
            errno: libc::EIO,
            ..FaultPlan::default()
        });
        assert!(block_on(c.acknowledge("g", "t", "w", vec![reject(0)])).is_err());
        let dlq = c.broker().offsets("t.dlq", 0).expect("t.dlq");
        assert_eq!(dlq.high_watermark, 2, "offset 0's dead letter is written");
        // Power lost: the failed write's bytes (some may have reached the
        // media) are not durable.
        disk.crash_dropping_unsynced();
        // Fails on the crashed disk, but lets the data directory go.
        let _ = c.broker().close();
    }
    disk.set_plan(FaultPlan::default());
    disk.restart();
    let c = open(&rig, ShareConfig::default());
    let got: Vec<_> = take(&c, "t", "w", 10)
        .iter()
        .map(|d| (d.offset, d.delivery_count))
        .collect();
    assert_eq!(got, [(1, 2)], "the rejected record is not delivered again");
    block_on(c.expire());
    let dlq = c.broker().offsets("t.dlq", 0).expect("t.dlq");
    assert_eq!(dlq.high_watermark, 3, "written again, at least once");
    assert_eq!(
        window(&c, "t", 0),
        [(1, 2, true), (2, 1, false)],
        "offset 0 is done"
    );
    c.broker().close().expect("closed");
}
