//! [`Unstable`]: which part of the core's log has been handed to storage, and which part is
//! known durable there.
//!
//! The core's log runs ahead of storage in two steps: entries are *handed out* in a
//! [`Ready`](super::Ready) (the host writes them, not yet synced), and later reported *durable*
//! through [`RaftCore::on_persisted`](super::RaftCore::on_persisted). A host may hand out
//! several batches before the first is durable (it keeps stepping while an fsync runs), so
//! both positions move independently.
//!
//! Invariants (asserted after every change):
//! - `persisted < handed_from`: nothing is known durable that was not handed out;
//! - `handed_from <= last_index + 1` of the log it describes;
//! - `persisted` only moves forward through [`Unstable::persisted_to`], which the host
//!   drives; every other change (a conflicting suffix replaced, the log replaced by a
//!   received snapshot) can only move it back. So a leader can never count itself toward a
//!   commit beyond what its storage really synced.

use super::Index;

/// The handed-out and durable positions of the core's log.
///
/// Entries are first *handed out* in a [`Ready`](super::Ready) (written, not yet synced),
/// later reported *durable* through [`RaftCore::on_persisted`](super::RaftCore::on_persisted);
/// several batches may be handed out before the first is durable. Invariants:
/// `persisted < handed_from <= last_index + 1`; `persisted` moves forward only when the host
/// reports durability, and every other change (a conflicting suffix, a replacing snapshot)
/// can only move it back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unstable {
    /// The prefix `..=persisted` of the log is known durable in storage.
    persisted: Index,
    /// Entries from here on have not been handed to storage yet.
    handed_from: Index,
}

impl Unstable {
    /// A log restored from storage: everything through `last` is durable and handed out.
    pub fn restored(last: Index) -> Self {
        Unstable {
            persisted: last,
            handed_from: last + 1,
        }
    }

    /// Highest index known durable.
    pub fn persisted(&self) -> Index {
        self.persisted
    }

    /// First index not yet handed to storage.
    pub fn handed_from(&self) -> Index {
        self.handed_from
    }

    fn check(&self, last_index: Index) {
        debug_assert!(
            self.persisted < self.handed_from,
            "persisted {} but only handed out below {}",
            self.persisted,
            self.handed_from
        );
        debug_assert!(
            self.handed_from <= last_index + 1,
            "handed out from {} beyond the log's end {last_index}",
            self.handed_from
        );
    }

    /// A new entry was appended at `index` (not yet handed out).
    pub fn appended(&mut self, index: Index, last_index: Index) {
        self.handed_from = self.handed_from.min(index);
        self.check(last_index);
    }

    /// Entries from `index` on were removed (a conflicting suffix): they are neither handed
    /// out nor durable any more.
    pub fn truncated(&mut self, index: Index, last_index: Index) {
        debug_assert!(index > 0);
        self.persisted = self.persisted.min(index - 1);
        self.handed_from = self.handed_from.min(index);
        self.check(last_index);
    }

    /// Everything through `last_index` is now handed to storage.
    pub fn handed_out(&mut self, last_index: Index) {
        self.handed_from = last_index + 1;
        self.check(last_index);
    }

    /// Storage reports the log durable through `index`, and the entry there is still the one
    /// that was written (`still_matches`). Returns true if that moved `persisted`.
    pub fn persisted_to(&mut self, index: Index, still_matches: bool, last_index: Index) -> bool {
        let moved = still_matches && index > self.persisted && index < self.handed_from;
        if moved {
            self.persisted = index;
        }
        self.check(last_index);
        moved
    }

    /// The whole log was replaced by a snapshot through `snapshot_index` (not yet durable):
    /// of the old log only the committed prefix `..=old_commit` is consistent with it, so at
    /// most that much stays known durable; the snapshot itself counts once its batch is
    /// reported durable.
    pub fn replaced_by_snapshot(&mut self, snapshot_index: Index, old_commit: Index) {
        self.persisted = self.persisted.min(old_commit);
        self.handed_from = snapshot_index + 1;
        self.check(snapshot_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_follows_the_host_and_truncation_only_lowers_it() {
        let mut u = Unstable::restored(3);
        u.appended(4, 4);
        u.appended(5, 5);
        assert_eq!(u.handed_from(), 4);
        u.handed_out(5);
        assert!(u.persisted_to(5, true, 5));
        assert_eq!(u.persisted(), 5);
        // A conflict replaces 4..: both positions move back.
        u.truncated(4, 3);
        assert_eq!((u.persisted(), u.handed_from()), (3, 4));
        // A stale report for the replaced entry is ignored.
        u.appended(4, 4);
        assert!(!u.persisted_to(5, false, 4));
        assert!(!u.persisted_to(4, true, 4)); // not handed out yet
        u.handed_out(4);
        assert!(u.persisted_to(4, true, 4));
    }

    #[test]
    fn a_replacing_snapshot_keeps_only_the_committed_prefix_durable() {
        let mut u = Unstable::restored(9);
        u.replaced_by_snapshot(20, 4);
        assert_eq!((u.persisted(), u.handed_from()), (4, 21));
        assert!(u.persisted_to(20, true, 20));
    }
}
