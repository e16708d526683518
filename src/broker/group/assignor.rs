//! Partition assignors: who in a group reads which partition.
//!
//! Pure functions of the members (their subscriptions and, for sticky,
//! what they hold now) and the topics' partition counts, so the
//! coordinator, the unit tests and the property tests run the same code.
//! Every assignor gives each partition of a subscribed topic to exactly
//! one member subscribed to it (complete and disjoint); members are taken
//! in id order, so the result is deterministic.
//!
//! The coordinator never hands a partition to a new owner before the old
//! one has given it up (see `group`), so what an assignor moves is what
//! is revoked: range and round-robin may move many partitions at a
//! membership change, cooperative sticky only those needed for balance.

use std::collections::{BTreeMap, BTreeSet};

/// A topic and a partition of it.
pub type Tp = (String, u32);

/// The assignment strategies a group may use; named as Kafka names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignor {
    /// Per topic, each member gets a contiguous range of partitions.
    Range,
    /// All partitions dealt in turn to the members subscribed to them.
    RoundRobin,
    /// Members keep what they hold where balance allows; only the
    /// partitions that must move for balance move.
    CooperativeSticky,
}

impl Assignor {
    pub const ALL: [Assignor; 3] = [Self::Range, Self::RoundRobin, Self::CooperativeSticky];

    pub fn name(self) -> &'static str {
        match self {
            Self::Range => "range",
            Self::RoundRobin => "roundrobin",
            Self::CooperativeSticky => "cooperative-sticky",
        }
    }

    pub fn parse(name: &str) -> Option<Assignor> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// One member as an assignor sees it.
#[derive(Debug, Clone)]
pub struct MemberSpec<'a> {
    pub id: &'a str,
    pub topics: &'a BTreeSet<String>,
    /// What the member holds now (used by sticky only).
    pub owned: &'a BTreeSet<Tp>,
}

/// The assignment of every member (members with nothing get an empty
/// set). `partitions` is the partition count of each topic that exists;
/// subscriptions to other topics are ignored.
pub fn assign(
    assignor: Assignor,
    members: &[MemberSpec<'_>],
    partitions: &BTreeMap<String, u32>,
) -> BTreeMap<String, BTreeSet<Tp>> {
    let mut sorted: Vec<&MemberSpec<'_>> = members.iter().collect();
    sorted.sort_by_key(|m| m.id);
    let mut out: BTreeMap<String, BTreeSet<Tp>> = sorted
        .iter()
        .map(|m| (m.id.to_owned(), BTreeSet::new()))
        .collect();
    match assignor {
        Assignor::Range => range(&sorted, partitions, &mut out),
        Assignor::RoundRobin => round_robin(&sorted, partitions, &mut out),
        Assignor::CooperativeSticky => sticky(&sorted, partitions, &mut out),
    }
    out
}

/// Every partition some member subscribes to, in (topic, partition) order.
fn wanted(members: &[&MemberSpec<'_>], partitions: &BTreeMap<String, u32>) -> Vec<Tp> {
    partitions
        .iter()
        .filter(|(t, _)| members.iter().any(|m| m.topics.contains(*t)))
        .flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p)))
        .collect()
}

fn range(
    members: &[&MemberSpec<'_>],
    partitions: &BTreeMap<String, u32>,
    out: &mut BTreeMap<String, BTreeSet<Tp>>,
) {
    for (topic, &n) in partitions {
        let subs: Vec<&str> = members
            .iter()
            .filter(|m| m.topics.contains(topic))
            .map(|m| m.id)
            .collect();
        if subs.is_empty() {
            continue;
        }
        let k = subs.len() as u32;
        let (per, extra) = (n / k, n % k);
        for (i, id) in subs.iter().enumerate() {
            let i = i as u32;
            let start = i * per + i.min(extra);
            let len = per + u32::from(i < extra);
            let set = out.get_mut(*id).expect("every member has an entry");
            set.extend((start..start + len).map(|p| (topic.clone(), p)));
        }
    }
}

fn round_robin(
    members: &[&MemberSpec<'_>],
    partitions: &BTreeMap<String, u32>,
    out: &mut BTreeMap<String, BTreeSet<Tp>>,
) {
    let mut next = 0usize;
    for tp in wanted(members, partitions) {
        // The next member in the circle subscribed to the topic.
        let Some(step) =
            (0..members.len()).find(|s| members[(next + s) % members.len()].topics.contains(&tp.0))
        else {
            continue;
        };
        let at = (next + step) % members.len();
        out.get_mut(members[at].id).expect("member").insert(tp);
        next = at + 1;
    }
}

/// Balanced with as few moves as balance allows. Each member may hold
/// `floor` or `floor + 1` partitions of the total; the `floor + 1` places
/// go to the members holding the most now, so the fewest partitions move.
/// A member keeps up to its cap of what it holds; the rest, and every
/// partition nobody holds, go to the subscribed member with the fewest.
/// (With members subscribed to different topics the caps are a guide:
/// every partition still goes to a subscriber.)
fn sticky(
    members: &[&MemberSpec<'_>],
    partitions: &BTreeMap<String, u32>,
    out: &mut BTreeMap<String, BTreeSet<Tp>>,
) {
    let all = wanted(members, partitions);
    if members.is_empty() {
        return;
    }
    let valid: BTreeSet<&Tp> = all.iter().collect();
    // What each member may keep: held, still existing, still subscribed,
    // and not claimed by a member before it (claims should be disjoint).
    let mut claimed: BTreeSet<Tp> = BTreeSet::new();
    let mut keep: Vec<Vec<Tp>> = members
        .iter()
        .map(|m| {
            m.owned
                .iter()
                .filter(|tp| valid.contains(tp) && m.topics.contains(&tp.0))
                .filter(|tp| claimed.insert((*tp).clone()))
                .cloned()
                .collect()
        })
        .collect();
    let k = members.len();
    let (floor, extra) = (all.len() / k, all.len() % k);
    let mut by_held: Vec<usize> = (0..k).collect();
    by_held.sort_by(|&a, &b| keep[b].len().cmp(&keep[a].len()).then(a.cmp(&b)));
    let mut cap = vec![floor; k];
    for &i in by_held.iter().take(extra) {
        cap[i] = floor + 1;
    }
    for (i, held) in keep.iter_mut().enumerate() {
        held.truncate(cap[i]);
    }
    let kept: BTreeSet<&Tp> = keep.iter().flatten().collect();
    let free: Vec<Tp> = all
        .iter()
        .filter(|tp| !kept.contains(tp))
        .cloned()
        .collect();
    let mut count: Vec<usize> = keep.iter().map(Vec::len).collect();
    for (i, held) in keep.into_iter().enumerate() {
        out.get_mut(members[i].id).expect("member").extend(held);
    }
    for tp in free {
        let eligible = || (0..k).filter(|&i| members[i].topics.contains(&tp.0));
        let to = eligible()
            .filter(|&i| count[i] < cap[i])
            .min_by_key(|&i| (count[i], i))
            .or_else(|| eligible().min_by_key(|&i| (count[i], i)));
        if let Some(i) = to {
            count[i] += 1;
            out.get_mut(members[i].id).expect("member").insert(tp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn topics(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn counts(a: &BTreeMap<String, BTreeSet<Tp>>) -> Vec<usize> {
        a.values().map(BTreeSet::len).collect()
    }

    #[test]
    fn range_gives_contiguous_ranges_per_topic_extra_to_the_first() {
        let t = topics(&["a"]);
        let none = BTreeSet::new();
        let members: Vec<MemberSpec<'_>> = ["m1", "m2", "m3"]
            .iter()
            .map(|id| MemberSpec {
                id,
                topics: &t,
                owned: &none,
            })
            .collect();
        let parts = BTreeMap::from([("a".to_string(), 7)]);
        let got = assign(Assignor::Range, &members, &parts);
        let ps = |id: &str| got[id].iter().map(|tp| tp.1).collect::<Vec<_>>();
        assert_eq!(ps("m1"), vec![0, 1, 2]);
        assert_eq!(ps("m2"), vec![3, 4]);
        assert_eq!(ps("m3"), vec![5, 6]);
    }

    #[test]
    fn round_robin_deals_in_turn_and_skips_members_not_subscribed() {
        let (ab, a) = (topics(&["a", "b"]), topics(&["a"]));
        let none = BTreeSet::new();
        let members = [
            MemberSpec {
                id: "m1",
                topics: &ab,
                owned: &none,
            },
            MemberSpec {
                id: "m2",
                topics: &a,
                owned: &none,
            },
        ];
        let parts = BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 2)]);
        let got = assign(Assignor::RoundRobin, &members, &parts);
        let want1: BTreeSet<Tp> = [
            ("a".into(), 0),
            ("a".into(), 2),
            ("b".into(), 0),
            ("b".into(), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(got["m1"], want1);
        assert_eq!(got["m2"], [("a".to_string(), 1)].into_iter().collect());
    }

    #[test]
    fn sticky_moves_only_what_a_new_member_takes() {
        let t = topics(&["a"]);
        let parts = BTreeMap::from([("a".to_string(), 6)]);
        let none = BTreeSet::new();
        let three: Vec<MemberSpec<'_>> = ["m1", "m2", "m3"]
            .iter()
            .map(|id| MemberSpec {
                id,
                topics: &t,
                owned: &none,
            })
            .collect();
        let before = assign(Assignor::CooperativeSticky, &three, &parts);
        assert_eq!(counts(&before), vec![2, 2, 2]);
        let mut four: Vec<MemberSpec<'_>> = ["m1", "m2", "m3"]
            .iter()
            .map(|id| MemberSpec {
                id,
                topics: &t,
                owned: &before[*id],
            })
            .collect();
        four.push(MemberSpec {
            id: "m0",
            topics: &t,
            owned: &none,
        });
        let after = assign(Assignor::CooperativeSticky, &four, &parts);
        assert_eq!(after["m0"].len(), 1);
        let kept: usize = ["m1", "m2", "m3"]
            .iter()
            .map(|id| after[*id].intersection(&before[*id]).count())
            .sum();
        assert_eq!(kept, 5, "only the partition m0 takes moved");
    }

    #[test]
    fn assignor_names_round_trip() {
        for a in Assignor::ALL {
            assert_eq!(Assignor::parse(a.name()), Some(a));
        }
        assert_eq!(Assignor::parse("sticky"), None);
    }

    /// Members (ids m0..), each subscribed to a subset of topics t0..t2,
    /// and the topics' partition counts.
    fn scenario() -> impl Strategy<Value = (Vec<BTreeSet<String>>, BTreeMap<String, u32>)> {
        let parts = proptest::collection::vec(0u32..9, 3).prop_map(|ns| {
            ns.into_iter()
                .enumerate()
                .map(|(i, n)| (format!("t{i}"), n))
                .collect::<BTreeMap<_, _>>()
        });
        let subs = proptest::collection::vec(
            proptest::collection::btree_set(0usize..3, 1..=3)
                .prop_map(|s| s.into_iter().map(|i| format!("t{i}")).collect()),
            1..7,
        );
        (subs, parts)
    }

    fn check_complete_and_disjoint(
        subs: &[BTreeSet<String>],
        parts: &BTreeMap<String, u32>,
        got: &BTreeMap<String, BTreeSet<Tp>>,
    ) -> Result<(), TestCaseError> {
        let mut seen = BTreeSet::new();
        for (i, t) in subs.iter().enumerate() {
            for tp in &got[&format!("m{i}")] {
                prop_assert!(t.contains(&tp.0), "only subscribed topics");
                prop_assert!(seen.insert(tp.clone()), "{tp:?} given twice");
            }
        }
        let want: BTreeSet<Tp> = parts
            .iter()
            .filter(|(t, _)| subs.iter().any(|s| s.contains(*t)))
            .flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p)))
            .collect();
        prop_assert_eq!(seen, want, "every subscribed partition, once");
        Ok(())
    }

    proptest! {
        #[test]
        fn every_assignor_is_complete_and_disjoint((subs, parts) in scenario()) {
            let ids: Vec<String> = (0..subs.len()).map(|i| format!("m{i}")).collect();
            let none = BTreeSet::new();
            let members: Vec<MemberSpec<'_>> = ids.iter().zip(&subs)
                .map(|(id, t)| MemberSpec { id, topics: t, owned: &none })
                .collect();
            for a in Assignor::ALL {
                let got = assign(a, &members, &parts);
                check_complete_and_disjoint(&subs, &parts, &got)?;
            }
        }

        /// Members all subscribed to the same topics, holding a random
        /// disjoint part of them (as after members came and went): sticky
        /// is complete, balanced, and moves exactly the least number of
        /// held partitions any balanced assignment must move.
        #[test]
        fn sticky_is_balanced_and_minimal_in_moves(
            members in 1usize..7,
            parts in proptest::collection::vec(0u32..9, 1..4),
            owners in proptest::collection::vec(0usize..10, 0..30),
        ) {
            let parts: BTreeMap<String, u32> =
                parts.iter().enumerate().map(|(i, &n)| (format!("t{i}"), n)).collect();
            let t: BTreeSet<String> = parts.keys().cloned().collect();
            let all: Vec<Tp> = parts.iter()
                .flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p)))
                .collect();
            // Owner index >= members: held by nobody (a member that left).
            let mut owned = vec![BTreeSet::new(); members];
            for (tp, &o) in all.iter().zip(owners.iter().cycle()) {
                if o < members {
                    owned[o].insert(tp.clone());
                }
            }
            let ids: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
            let specs: Vec<MemberSpec<'_>> = ids.iter().zip(&owned)
                .map(|(id, o)| MemberSpec { id, topics: &t, owned: o })
                .collect();
            let got = assign(Assignor::CooperativeSticky, &specs, &parts);
            check_complete_and_disjoint(&vec![t.clone(); members], &parts, &got)?;
            let c = counts(&got);
            prop_assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1, "balanced: {c:?}");
            let moved: usize = ids.iter().zip(&owned)
                .map(|(id, o)| o.difference(&got[id]).count())
                .sum();
            // The least any balanced assignment moves: the members holding
            // most get the floor + 1 places, and each gives up its excess.
            let (floor, extra) = (all.len() / members, all.len() % members);
            let mut held: Vec<usize> = owned.iter().map(BTreeSet::len).collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            let least: usize = held.iter().enumerate()
                .map(|(i, &h)| h.saturating_sub(floor + usize::from(i < extra)))
                .sum();
            prop_assert_eq!(moved, least);
        }
    }
}
