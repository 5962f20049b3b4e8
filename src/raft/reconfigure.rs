//! Changing the configuration on the leader: proposing a change (checked against the rules
//! below), keeping the per-follower progress in step with the members, leaving a joint
//! configuration once it is committed, and stepping down when the leader itself was removed.
//!
//! Rules of a change ([`RaftCore::change_membership`]):
//! - one at a time: refused while the configuration in effect is joint or not yet committed;
//! - voters are only ever promoted from learners that are caught up — their match index is
//!   at least the leader's commit index, and they answered within the last one to two
//!   election timeouts (a learner that never catches up is never promoted);
//! - the new voters must include a quorum of nodes the leader heard from that lately
//!   (itself included), or the change could never complete;
//! - a change of voters goes through the joint configuration and leaves it automatically
//!   once that is committed; a change of learners only is one step.

use std::collections::BTreeSet;

use super::core::RaftCore;
use super::progress::Progress;
use super::{EntryPayload, Membership, NodeId, Proposed, Role};
use crate::error::MembershipError;

impl RaftCore {
    /// Proposes moving to the configuration of `voters` and `learners` (leader only): through
    /// the joint configuration when the voters change (left automatically once committed),
    /// in one step when only learners change. Returns where the first entry landed. See the
    /// module docs for the rules; a node in both sets is a voter.
    pub fn change_membership(
        &mut self,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    ) -> Result<Proposed, MembershipError> {
        if self.role() != Role::Leader {
            return Err(MembershipError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transferee().is_some() {
            return Err(MembershipError::Busy);
        }
        let current = self.membership().clone();
        if current.is_joint() || self.log.configs().current_index() > self.log.commit() {
            return Err(MembershipError::InProgress);
        }
        if voters.is_empty() || voters.contains(&0) || learners.contains(&0) {
            return Err(MembershipError::Invalid(
                "a configuration needs at least one voter, and ids are non-zero".into(),
            ));
        }
        let commit = self.log.commit();
        let me = self.cfg.id;
        let l = self.leader_state().expect("checked leader");
        for &v in voters.difference(&current.voters) {
            if !current.learners.contains(&v) {
                return Err(MembershipError::NotALearner(v));
            }
            let caught_up = l
                .progress
                .get(&v)
                .is_some_and(|p| p.match_index >= commit && p.heard_lately());
            if !caught_up {
                return Err(MembershipError::NotCaughtUp(v));
            }
        }
        let next = Membership {
            voters: voters.clone(),
            outgoing: BTreeSet::new(),
            learners: learners.difference(&voters).copied().collect(),
        };
        let live =
            next.has_quorum(|id| id == me || l.progress.get(&id).is_some_and(|p| p.heard_lately()));
        if !live {
            return Err(MembershipError::NoQuorum);
        }
        if next == current {
            return Err(MembershipError::Invalid(
                "that is the current configuration".into(),
            ));
        }
        let entry = if next.voters == current.voters {
            next
        } else {
            current.joint_to(voters, learners)
        };
        Ok(self.append_own(EntryPayload::Membership(entry)))
    }

    /// Leader: the configuration in effect changed (an entry of its own was appended):
    /// progress follows the members.
    pub(super) fn membership_changed(&mut self) {
        let members = self.other_members();
        let next = self.log.last_index() + 1;
        let max_inflight = self.cfg.max_inflight;
        if let Some(l) = self.leader_mut() {
            l.progress.retain(|id, _| members.contains(id));
            for id in members {
                l.progress
                    .entry(id)
                    .or_insert_with(|| Progress::new(next, max_inflight));
            }
        }
    }

    /// Leader, after the commit index moved: a committed joint configuration is left; a
    /// committed configuration without this leader among its voters makes it step down.
    pub(super) fn membership_committed(&mut self) {
        if self.role() != Role::Leader {
            return;
        }
        let configs = self.log.configs();
        if configs.current_index() > self.log.commit() {
            return; // the latest configuration is not committed yet
        }
        let current = configs.current().clone();
        if current.is_joint() {
            self.append_own(EntryPayload::Membership(current.leave_joint()));
        } else if !current.is_voter(self.cfg.id) {
            // Removed: it led the change to its end; the remaining voters elect a leader.
            self.become_follower(self.term, None);
        }
    }

    /// The host reports the configuration a snapshot it restored (at start-up, or installed
    /// from a leader) was taken with. Ignored unless `meta` is the log's snapshot boundary.
    pub fn set_snapshot_membership(&mut self, meta: super::SnapshotMeta, membership: Membership) {
        if self.log.snapshot() == meta {
            self.log.set_base_membership(membership);
            self.bootstrap_config = false;
        }
    }
}
