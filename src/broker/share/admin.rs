//! Share groups seen from an operator: list, describe, delete, and the
//! state of a deleted topic dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{check_id, RecState, ShareCoordinator, ShareError, SharePartition, SpKey};

/// One share group in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareGroupListing {
    pub group: String,
    /// Topics it has share partitions of.
    pub topics: Vec<String>,
    pub partitions: u32,
    /// Records in its windows not yet done.
    pub in_flight: u64,
    /// Members active now.
    pub members: u32,
}

/// A share group's share partitions and members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareGroupDescription {
    pub group: String,
    pub partitions: Vec<SharePartitionDescription>,
    pub members: Vec<ShareMemberDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePartitionDescription {
    pub topic: String,
    pub partition: u32,
    /// Every offset below it is done.
    pub start: u64,
    /// The first offset never delivered.
    pub next: u64,
    /// Absent when the partition cannot be read.
    pub log_end: Option<u64>,
    /// Locked to a member.
    pub acquired: u64,
    /// Waiting to be delivered again (a release, a lock that expired).
    pub available: u64,
    /// Done, behind a record that is not.
    pub done: u64,
    /// Every record in the window not done, by offset.
    pub records: Vec<ShareRecordDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRecordDescription {
    pub offset: u64,
    /// `acquired`, `available` or `dead_lettering`.
    pub state: &'static str,
    pub delivery_count: u32,
    /// The member holding its lock.
    pub member: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareMemberDescription {
    pub member_id: String,
    /// Records locked to it.
    pub acquired: u64,
    /// How long it stays active without another fetch or acknowledgement.
    pub active_ms: u64,
}

impl ShareCoordinator {
    pub(super) fn members_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Instant>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `member` of `group` as active for `for_` from now; refuses
    /// a new member while `max_active_members` others are active.
    pub(super) fn seen(&self, group: &str, member: &str, for_: Duration) -> Result<(), ShareError> {
        let now = Instant::now();
        let until = now + for_;
        let mut members = self.members_lock();
        let key = (group.to_owned(), member.to_owned());
        if let Some(e) = members.get_mut(&key) {
            *e = (*e).max(until);
            return Ok(());
        }
        let max = self.config.max_active_members;
        if members.len() >= max {
            // The expiry pass prunes too, but not often enough to keep a
            // burst of new ids from filling the table with lapsed ones.
            members.retain(|_, t| *t > now);
            if members.len() >= max {
                return Err(ShareError::TooManyMembers { max });
            }
        }
        members.insert(key, until);
        Ok(())
    }

    /// Members of `group` active now, and for how much longer; a member
    /// holding a lock counts until the lock's deadline at least.
    fn active_members(&self, group: &str) -> BTreeMap<String, Instant> {
        self.active_in(&self.lock(), group)
    }

    fn active_in(
        &self,
        parts: &BTreeMap<SpKey, SharePartition>,
        group: &str,
    ) -> BTreeMap<String, Instant> {
        let now = Instant::now();
        let mut out: BTreeMap<String, Instant> = self
            .members_lock()
            .iter()
            .filter(|((g, _), until)| g == group && **until > now)
            .map(|((_, m), until)| (m.clone(), *until))
            .collect();
        for ((g, _, _), sp) in parts.iter() {
            if g != group {
                continue;
            }
            for r in sp.records.values() {
                if let RecState::Acquired { member, deadline } = &r.state {
                    if *deadline <= now {
                        // Expired: the next expiry pass frees it.
                        continue;
                    }
                    let e = out.entry(member.to_string()).or_insert(*deadline);
                    *e = (*e).max(*deadline);
                }
            }
        }
        out
    }

    /// Every share group, by name.
    pub fn list(&self) -> Vec<ShareGroupListing> {
        let mut out: BTreeMap<String, ShareGroupListing> = BTreeMap::new();
        let listing = |group: &str| ShareGroupListing {
            group: group.to_owned(),
            topics: Vec::new(),
            partitions: 0,
            in_flight: 0,
            members: 0,
        };
        {
            let parts = self.lock();
            for ((g, t, _), sp) in parts.iter() {
                let l = out.entry(g.clone()).or_insert_with(|| listing(g));
                if l.topics.last() != Some(t) {
                    l.topics.push(t.clone());
                }
                l.partitions += 1;
                l.in_flight += sp.in_flight() as u64;
            }
        }
        let now = Instant::now();
        let groups: BTreeSet<String> = self
            .members_lock()
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|((g, _), _)| g.clone())
            .collect();
        for g in groups {
            out.entry(g.clone()).or_insert_with(|| listing(&g));
        }
        for l in out.values_mut() {
            l.members = self.active_members(&l.group).len() as u32;
        }
        out.into_values().collect()
    }

    pub fn describe(&self, group: &str) -> Result<ShareGroupDescription, ShareError> {
        check_id("the share group id", group)?;
        let now = Instant::now();
        let active = self.active_members(group);
        let mut held: BTreeMap<String, u64> = BTreeMap::new();
        let mut partitions = Vec::new();
        {
            let parts = self.lock();
            for ((_, topic, partition), sp) in parts.iter().filter(|((g, _, _), _)| g == group) {
                let mut d = SharePartitionDescription {
                    topic: topic.clone(),
                    partition: *partition,
                    start: sp.start,
                    next: sp.next,
                    log_end: None,
                    acquired: 0,
                    available: 0,
                    done: 0,
                    records: Vec::new(),
                };
                for (&offset, r) in &sp.records {
                    let (state, member) = match &r.state {
                        RecState::Done => {
                            d.done += 1;
                            continue;
                        }
                        RecState::Acquired { member, .. } => {
                            d.acquired += 1;
                            *held.entry(member.to_string()).or_default() += 1;
                            ("acquired", Some(member.to_string()))
                        }
                        // Rejected before a restart: on its way to the
                        // dead-letter topic, not awaiting redelivery.
                        RecState::Available { .. } if r.dead => ("dead_lettering", None),
                        RecState::Available { .. } => {
                            d.available += 1;
                            ("available", None)
                        }
                        RecState::Dying => ("dead_lettering", None),
                    };
                    d.records.push(ShareRecordDescription {
                        offset,
                        state,
                        delivery_count: r.deliveries,
                        member,
                    });
                }
                partitions.push(d);
            }
        }
        if partitions.is_empty() && active.is_empty() {
            return Err(ShareError::UnknownGroup(group.to_owned()));
        }
        for d in &mut partitions {
            d.log_end = self
                .broker
                .offsets(&d.topic, d.partition)
                .ok()
                .map(|o| o.high_watermark);
        }
        let members = active
            .into_iter()
            .map(|(member_id, until)| ShareMemberDescription {
                acquired: held.get(&member_id).copied().unwrap_or(0),
                active_ms: until.saturating_duration_since(now).as_millis() as u64,
                member_id,
            })
            .collect();
        Ok(ShareGroupDescription {
            group: group.to_owned(),
            partitions,
            members,
        })
    }

    /// Deletes a share group with no active member: its state is dropped
    /// and a tombstone per share partition made durable before this
    /// returns.
    pub async fn delete(&self, group: &str) -> Result<(), ShareError> {
        check_id("the share group id", group)?;
        let keys: Vec<SpKey> = {
            // Checked and removed under one lock: a fetch that comes
            // after starts the group afresh.
            let mut parts = self.lock();
            let active = self.active_in(&parts, group).len();
            let keys: Vec<SpKey> = parts
                .keys()
                .filter(|(g, _, _)| g == group)
                .cloned()
                .collect();
            if active > 0 {
                return Err(ShareError::NotEmpty {
                    group: group.to_owned(),
                    members: active,
                });
            }
            if keys.is_empty() {
                return Err(ShareError::UnknownGroup(group.to_owned()));
            }
            for k in &keys {
                parts.remove(k);
            }
            keys
        };
        self.write(keys).await?;
        log::info!("share group {group} deleted");
        Ok(())
    }

    /// Drops every share partition of a deleted topic, durably, so a topic
    /// created again by that name starts with no share state.
    pub async fn forget_topic(&self, topic: &str) -> Result<(), ShareError> {
        let keys: Vec<SpKey> = {
            let mut parts = self.lock();
            let keys: Vec<SpKey> = parts
                .keys()
                .filter(|(_, t, _)| t == topic)
                .cloned()
                .collect();
            for k in &keys {
                parts.remove(k);
            }
            keys
        };
        if keys.is_empty() {
            return Ok(());
        }
        self.write(keys).await?;
        log::info!("share state of deleted topic {topic} dropped");
        Ok(())
    }
}
