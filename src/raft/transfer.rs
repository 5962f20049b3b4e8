//! Leadership transfer (Raft thesis §3.10): the leader stops taking proposals, brings the
//! chosen follower's log up to date, then tells it to campaign at once ([`TimeoutNow`]); the
//! follower's vote requests are marked so voters do not hold their leader lease against them.
//! A transfer that has not completed within an election timeout is abandoned and the leader
//! goes on leading.
//!
//! [`TimeoutNow`]: super::MessageBody::TimeoutNow

use super::core::{Dispatch, RaftCore, Role};
use super::{MessageBody, NodeId};
use crate::error::CoreProposeError;

impl RaftCore {
    /// Hands leadership to voter `to` (leader only). Until the transfer completes or is
    /// abandoned (after an election timeout) proposals are refused with
    /// [`CoreProposeError::Busy`]. Transferring to itself or to a non-voter does nothing.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), CoreProposeError> {
        if self.role != Role::Leader {
            return Err(CoreProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if to == self.cfg.id || !self.progress.contains_key(&to) {
            return Ok(());
        }
        self.transferee = Some(to);
        self.transfer_elapsed = 0;
        self.maybe_send_timeout_now(to);
        Ok(())
    }

    /// The follower leadership is being handed to, if any.
    pub fn transferee(&self) -> Option<NodeId> {
        self.transferee
    }

    /// Leader: once the transferee holds the whole log, tell it to campaign.
    pub(super) fn maybe_send_timeout_now(&mut self, peer: NodeId) {
        if self.transferee != Some(peer) {
            return;
        }
        let caught_up = self
            .progress
            .get(&peer)
            .is_some_and(|p| p.match_index >= self.log.last_index());
        if caught_up {
            self.send(peer, MessageBody::TimeoutNow, Dispatch::Now);
        }
    }

    /// Follower: the leader hands over; campaign now, skipping pre-vote.
    pub(super) fn handle_timeout_now(&mut self) {
        if self.role != Role::Leader {
            self.become_candidate_for(true);
        }
    }
}
