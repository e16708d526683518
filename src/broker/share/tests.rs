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

#[test]
fn a_state_reads_back_with_locks_gone_and_counts_kept() {
    let member: Arc<str> = "m".into();
    let mut sp = SharePartition {
        start: 100,
        next: 105,
        ..SharePartition::default()
    };
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
    let mut sp = SharePartition {
        start: 7,
        next: 10,
        ..SharePartition::default()
    };
    for o in 7..10 {
        sp.records.insert(
            o,
            InFlight {
                state: RecState::Done,
                deliveries: 1,
                error: None,
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
