//! A member leaving its share group (a worker that stops): its locks are
//! given back at once rather than when they expire, and it stops counting
//! as active, so another worker takes its records and the group can be
//! deleted without waiting out `lock_ms`.

use super::{check_id, RecState, ShareCoordinator, ShareError};

impl ShareCoordinator {
    /// `member` leaves `group`: every record it holds is available again
    /// at once, its delivery count as it was (as a release: the next
    /// delivery counts one more), and the member is no longer active.
    /// Returns how many records it held; a member not in the group holds
    /// none.
    ///
    /// Nothing is written: the share log holds no locks, only delivery
    /// counts and done marks, which a leave does not change. A record
    /// already delivered `max_deliveries` times goes to the dead-letter
    /// topic, as a release's would: the expiry pass, woken here, sends it
    /// (a share fetch does not take it meanwhile).
    pub fn leave(&self, group: &str, member: &str) -> Result<u64, ShareError> {
        check_id("the share group id", group)?;
        check_id("the member id", member)?;
        let mut released = 0u64;
        {
            // The windows' lock before the members': the order `active_in`
            // takes them in. Both held, so no one sees the member active
            // without its locks, or holding locks while gone.
            let mut parts = self.lock();
            for ((g, _, _), sp) in parts.iter_mut() {
                if g != group {
                    continue;
                }
                for r in sp.records.values_mut() {
                    if matches!(&r.state, RecState::Acquired { member: m, .. } if &**m == member) {
                        r.state = RecState::Available { not_before: None };
                        r.error = Some("the worker left".into());
                        released += 1;
                    }
                }
            }
            self.members_lock()
                .remove(&(group.to_owned(), member.to_owned()));
        }
        if released > 0 {
            log::info!(
                "share group {group}: member {member} left, {released} record(s) available again"
            );
            self.changed.notify(usize::MAX);
            self.timers.notify(usize::MAX);
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use smol::block_on;

    use super::super::tests::{fill, open, take};
    use super::super::ShareConfig;
    use crate::storage::tests::Rig;

    /// A leave gives the member's records back at once, counts as kept,
    /// and repeats harmlessly; at `max_deliveries` they go to the
    /// dead-letter topic, as released ones would.
    #[test]
    fn a_leave_frees_the_members_records_as_a_release_does() {
        let rig = Rig::files(|| Box::new(crate::storage::io::pwrite::PwriteBackend::new()));
        let c = open(
            &rig,
            ShareConfig {
                max_deliveries: 2,
                // Far past the test: only the leave frees anything.
                lock_ms: 3_600_000,
                ..ShareConfig::default()
            },
        );
        fill(c.broker(), "t", 3);
        assert_eq!(take(&c, "t", "a", 3).len(), 3);
        assert!(take(&c, "t", "b", 3).is_empty(), "all locked to a");
        assert_eq!(c.leave("g", "a").expect("leave"), 3);
        let members = c.describe("g").expect("describe").members;
        assert!(members.iter().all(|m| m.member_id != "a"), "{members:?}");
        assert_eq!(c.leave("g", "a").expect("again"), 0, "idempotent");
        assert_eq!(c.leave("never", "a").expect("no such group"), 0);
        assert!(c.leave("g", "").is_err(), "ids checked");

        let again = take(&c, "t", "b", 3);
        let counts: Vec<u32> = again.iter().map(|d| d.delivery_count).collect();
        assert_eq!(
            counts,
            [2, 2, 2],
            "each leave-freed record counted once more"
        );
        assert_eq!(c.leave("g", "b").expect("leave"), 3);
        // Delivered max_deliveries times: not handed out again, but sent
        // to the dead-letter topic by the expiry pass.
        assert!(take(&c, "t", "c", 3).is_empty());
        block_on(c.expire());
        let dlq = c.broker().offsets("t.dlq", 0).expect("t.dlq made");
        assert_eq!(dlq.high_watermark, 3);
        let parts = c.lock();
        let sp = parts.values().next().expect("the share partition");
        assert_eq!((sp.start, sp.next), (3, 3), "all done");
    }
}
