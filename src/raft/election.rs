//! Elections: campaigning (with a pre-vote round first when pre-vote is on), granting votes,
//! counting answers, and the leader lease that protects a live leader.
//!
//! Invariants: a node votes at most once per term, and only for a candidate whose log is at
//! least as up to date as its own (§5.4.1); the vote is durable before the answer leaves
//! (`Dispatch::AfterPersist`); a node recovering from a lost log tail neither campaigns nor
//! votes (see `recovery.rs`); inside the leader lease a node refuses to take part in
//! elections (§9.6, unless the leader itself handed over with TimeoutNow).

use super::core::{Dispatch, RaftCore};
use super::role::RoleState;
use super::{Index, Message, MessageBody, NodeId, Term, VoteResult};

impl RaftCore {
    /// Starts an election now (a pre-vote round first when pre-vote is on). Does nothing on a
    /// leader, or on a node recovering from a lost log tail.
    pub fn campaign(&mut self) {
        if matches!(self.state, RoleState::Leader(_)) || self.recovery.is_some() || !self.is_voter()
        {
            return;
        }
        if self.cfg.pre_vote {
            self.become_pre_candidate();
        } else {
            self.become_candidate(false);
        }
    }

    pub(super) fn request_votes(&mut self, pre_vote: bool, transfer: bool) {
        // Our own vote first: a one-node cluster wins at once.
        self.vote_answered(self.cfg.id, pre_vote, true);
        if !matches!(
            self.state,
            RoleState::PreCandidate(_) | RoleState::Candidate(_)
        ) || (pre_vote != matches!(self.state, RoleState::PreCandidate(_)))
        {
            return; // already won this round
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let term = self.term + u64::from(pre_vote);
        // A pre-vote changes nothing durable, so it may leave at once; a real vote request
        // carries a new term and vote that must be durable first.
        let when = if pre_vote {
            Dispatch::Now
        } else {
            Dispatch::AfterPersist
        };
        for to in self.peers() {
            let body = MessageBody::Vote {
                pre_vote,
                last_index,
                last_term,
                transfer,
            };
            self.msgs.push((
                when,
                Message {
                    from: self.cfg.id,
                    to,
                    term,
                    body,
                },
            ));
        }
    }

    /// Records an answer to this round's vote requests and acts on a decided round.
    pub(super) fn vote_answered(&mut self, from: NodeId, pre_vote: bool, granted: bool) {
        let membership = self.log.membership().clone();
        let (is_pre, votes) = match &mut self.state {
            RoleState::PreCandidate(e) => (true, &mut e.votes),
            RoleState::Candidate(e) => (false, &mut e.votes),
            _ => return,
        };
        if pre_vote != is_pre {
            return; // an answer from an earlier phase
        }
        votes.entry(from).or_insert(granted);
        match membership.vote_result(votes) {
            VoteResult::Won if is_pre => self.become_candidate(false),
            VoteResult::Won => self.become_leader(),
            VoteResult::Lost => self.become_follower(self.term, None),
            VoteResult::Pending => {}
        }
    }

    /// Inside the leader lease a node refuses to take part in elections. Pre-votes are always
    /// checked against it (that is what makes pre-vote protect a live leader); real votes when
    /// check-quorum is on.
    pub(super) fn in_lease(&self, pre_vote: bool) -> bool {
        (self.cfg.check_quorum || (pre_vote && self.cfg.pre_vote))
            && self.leader.is_some()
            && self.election_elapsed < self.cfg.election_ticks
    }

    pub(super) fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: Term,
        pre_vote: bool,
        last_index: Index,
        last_term: Term,
    ) {
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && term > self.term);
        let granted = can_vote
            && self.recovery.is_none()
            && self.is_voter()
            && self.log.is_up_to_date(last_index, last_term);
        if granted && !pre_vote {
            self.vote = Some(from);
            self.election_elapsed = 0;
        }
        // A granted pre-vote answers in the term it was asked about.
        let reply_term = if granted && pre_vote { term } else { self.term };
        let body = MessageBody::VoteResponse { pre_vote, granted };
        self.msgs.push((
            Dispatch::AfterPersist,
            Message {
                from: self.cfg.id,
                to: from,
                term: reply_term,
                body,
            },
        ));
    }
}
