//! Leadership transfer (Raft thesis §3.10): the leader stops taking proposals, brings the
//! chosen follower's log up to date, then tells it to campaign at once
//! ([`MessageBody::TimeoutNowAt`]); the follower's vote requests are marked so voters do not
//! hold their leader lease against them. A transfer that has not completed within an election
//! timeout is abandoned and the leader goes on leading.
//!
//! A TimeoutNow that arrives late (delayed or duplicated from an abandoned transfer) must not
//! depose a healthy leader: it names the leader's last index when it was sent, and the
//! follower acts on it only while its own log ends exactly there, with an entry of the
//! leader's term, and the sender is its leader of the current term. An abandoned transfer
//! appends a no-op, so its TimeoutNow is stale as soon as that entry arrives.

use super::core::{Dispatch, RaftCore, Role};
use super::role::Transfer;
use super::{Index, MessageBody, NodeId};
use crate::error::CoreProposeError;

impl RaftCore {
    /// Hands leadership to voter `to` (leader only). Until the transfer completes or is
    /// abandoned (after an election timeout) proposals are refused with
    /// [`CoreProposeError::Busy`]. Transferring to itself or to a non-voter does nothing.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), CoreProposeError> {
        let leader = self.leader;
        let me = self.cfg.id;
        let voter = self.membership().is_voter(to);
        let Some(l) = self.leader_mut() else {
            return Err(CoreProposeError::NotLeader { leader });
        };
        if to == me || !voter || !l.progress.contains_key(&to) {
            return Ok(());
        }
        l.transfer = Some(Transfer { to, elapsed: 0 });
        self.maybe_send_timeout_now(to);
        Ok(())
    }

    /// The follower leadership is being handed to, if any.
    pub fn transferee(&self) -> Option<NodeId> {
        self.leader_state()?.transfer.map(|t| t.to)
    }

    /// Leader: once the transferee holds the whole log, tell it to campaign.
    pub(super) fn maybe_send_timeout_now(&mut self, peer: NodeId) {
        if self.transferee() != Some(peer) {
            return;
        }
        let last_index = self.log.last_index();
        if self
            .progress(peer)
            .is_some_and(|p| p.match_index >= last_index)
        {
            self.send(
                peer,
                MessageBody::TimeoutNowAt { last_index },
                Dispatch::Now,
            );
        }
    }

    /// Follower: the leader hands over; campaign now, skipping pre-vote. With `last_index`
    /// (every TimeoutNow this crate sends) only if it is not stale; a bare
    /// [`MessageBody::TimeoutNow`] from another implementation is taken as it comes.
    pub(super) fn handle_timeout_now(&mut self, from: NodeId, last_index: Option<Index>) {
        if self.role() == Role::Leader || self.recovery.is_some() || !self.is_voter() {
            return;
        }
        if let Some(last_index) = last_index {
            let current = self.leader == Some(from)
                && self.log.last_index() == last_index
                && self.log.last_term() == self.term;
            if !current {
                return;
            }
        }
        self.become_candidate(true);
    }
}
