//! Protocol-aware recovery from a lost log tail (after Alagappan et al., "Protocol-Aware
//! Recovery for Consensus-Based Storage", FAST'18).
//!
//! A storage opened in recovery mode may cut a damaged tail off the log and report it as a
//! [`TailLoss`]. The node may have acknowledged entries it no longer holds, so leaders may
//! have counted it toward commits it can no longer vouch for; if its newest hard state was
//! lost too, it may also have voted, or acknowledged, in terms it no longer remembers. Taking
//! part as if nothing happened could elect a leader without a committed entry (its shorter
//! log passes the up-to-date check) or elect two leaders in one term. So:
//!
//! 1. **Terms first** (only when the hard state was lost): the node takes no part at all —
//!    no votes, no acknowledgements, no answers to leaders — and asks *every* other voter for
//!    its current term ([`MessageBody::TermQuery`]). Every term it could have promised
//!    anything in was held by some node, and a node's term never goes down, so the largest
//!    answer `U` bounds them all. It then adopts `U` with its vote set to itself (it will not
//!    vote again in `U`, where its lost vote might count) and goes on with step 2. It waits
//!    for all voters because a candidate it voted for may be the only other node that knew
//!    that term.
//! 2. **Caught up before voting**: the node follows leaders as usual (its acknowledgements
//!    are true, and in a term no lower than any it promised, so they may count), but it
//!    neither campaigns nor grants votes or pre-votes until an AppendEntries from the leader
//!    of its current term leaves it holding that leader's log through the leader's commit
//!    index, at an entry of the leader's term. (An idle leader sends no appends: the node
//!    then asks for the leader's commit index with a read of its own — ReadIndex answers the
//!    commit index of a leader a quorum confirmed, once it has committed an entry of its
//!    term.) Every entry committed with the node's lost acknowledgements was then in that
//!    leader's log before that point (leader completeness: the leader was elected without
//!    this node's vote, or is the very leader the node acknowledged), so the node's log again
//!    holds all it ever helped commit. Then recovery ends: [`Ready::tail_loss_repaired`](super::Ready::tail_loss_repaired) tells the host
//!    to clear the storage's record, written after the batch's entries, so it is durable only
//!    once they are.
//!
//! Step 2 is skipped when every other voter answered step 1 saying it holds no entry and
//! no snapshot and this node holds none either: committed entries are never dropped (only
//! compacted into a snapshot), and a commit needs a majority, so nothing was ever committed
//! that this node must get back. (The vote set to itself in step 1 still stands.)
//!
//! **An empty storage is a lost disk until shown otherwise.** A node that lost its disk and
//! restarts under its old id looks exactly like a member of a new cluster. If it took part at
//! once, it could vote a second time in a term it voted in before (two leaders in one term,
//! both with empty logs, write different entries at index 1) or help elect a leader without
//! the entries it had acknowledged. So a host starts every empty storage as a total tail
//! loss ([`TailLoss`] `{ intact_through: 0, hard_state_lost: true }`; the `Node` does unless
//! told its storage is new): in a new cluster every voter answers "term 0, nothing held" (or
//! the term of a first campaign, nothing held), and the node goes on at once, having cost
//! one round trip; a lost disk learns the cluster's term and is caught up before it votes.
//! The price: a member of a new cluster takes part only once every other bootstrap voter has
//! answered, so a new cluster elects its first leader once all its members have started.
//!
//! A crash before the record is cleared starts recovery again; that is always safe.

use super::core::{Dispatch, RaftCore};
use super::{MessageBody, NodeId, Term};
use crate::storage::TailLoss;
use std::collections::BTreeMap;

/// A recovery in progress. See the [module docs](self).
#[derive(Clone, Debug)]
pub(super) struct Recovery {
    loss: TailLoss,
    /// Step 1: answers to the term queries so far, each with whether the answerer held
    /// nothing (`None` once the terms are known).
    terms: Option<BTreeMap<NodeId, (Term, bool)>>,
    /// Step 2: ticks since the outstanding commit question was asked. The question or its
    /// answer may be lost; after an election timeout it is asked again.
    commit_asked_ticks: u32,
}

impl Recovery {
    pub(super) fn new(loss: TailLoss) -> Self {
        Recovery {
            loss,
            terms: loss.hard_state_lost.then(BTreeMap::new),
            commit_asked_ticks: 0,
        }
    }

    pub(super) fn loss(&self) -> TailLoss {
        self.loss
    }

    /// Step 1: the node does not yet know which terms it may have promised anything in.
    pub(super) fn term_unknown(&self) -> bool {
        self.terms.is_some()
    }
}

impl RaftCore {
    /// A recovering node's tick: it never campaigns. In step 1 it asks again, every
    /// heartbeat interval, every voter that has not answered: it takes no part meanwhile,
    /// so a lost question or answer should cost about a round trip, not an election
    /// timeout.
    pub(super) fn tick_recovery(&mut self) {
        if self
            .election_elapsed
            .is_multiple_of(self.cfg.heartbeat_ticks.max(1))
        {
            self.ask_terms();
        }
        if self.election_elapsed >= self.randomized_election_timeout {
            self.reset_election_timer();
        }
        // Step 2: a commit question unanswered for an election timeout was lost (or its
        // answer was): forget it, so the next heartbeat asks again.
        let timeout = self.cfg.election_ticks;
        let Some(r) = self.recovery.as_mut() else {
            return;
        };
        r.commit_asked_ticks = r.commit_asked_ticks.saturating_add(1);
        if r.commit_asked_ticks >= timeout {
            r.commit_asked_ticks = 0;
            if let Some(f) = self.follower_mut() {
                f.recovery_read = None;
            }
        }
    }

    /// Step 1: asks every voter that has not answered yet for its term.
    pub(super) fn ask_terms(&mut self) {
        let Some(answered) = self.recovery.as_ref().and_then(|r| r.terms.as_ref()) else {
            return;
        };
        let ask: Vec<NodeId> = self
            .peers()
            .into_iter()
            .filter(|p| !answered.contains_key(p))
            .collect();
        for to in ask {
            self.send(to, MessageBody::TermQuery, Dispatch::Now);
        }
        self.maybe_terms_known();
    }

    /// A voter told us its current term.
    pub(super) fn term_answered(&mut self, from: NodeId, term: Term, empty: bool) {
        let Some(answers) = self.recovery.as_mut().and_then(|r| r.terms.as_mut()) else {
            return;
        };
        let slot = answers.entry(from).or_insert((term, empty));
        // Answers may arrive out of order: the larger term, and "empty" only if every
        // answer said so.
        *slot = (slot.0.max(term), slot.1 && empty);
        self.maybe_terms_known();
    }

    /// Step 1 ends once every other voter answered: adopt the largest term, voted.
    fn maybe_terms_known(&mut self) {
        let voters = self.peers();
        let Some(answers) = self.recovery.as_ref().and_then(|r| r.terms.as_ref()) else {
            return;
        };
        if !voters.iter().all(|v| answers.contains_key(v)) {
            return;
        }
        let top = answers.values().map(|a| a.0).fold(self.term, Term::max);
        // (With no other voter to ask, nothing is known: a node joining with no voters
        // given waits for a leader.)
        let nothing_committed = !answers.is_empty() && answers.values().all(|a| a.1);
        if top > self.term {
            self.become_follower(top, None);
        }
        // Our lost vote may count in this term: never vote in it again.
        self.vote = Some(self.cfg.id);
        if nothing_committed && self.holds_nothing() {
            // No other voter holds an entry, and committed entries are never dropped: none
            // was ever committed (a commit needs a majority, and this node is one at most),
            // so there is nothing this node may have helped commit and must get back before
            // it votes. This is how the members of a new cluster start: each is an empty
            // storage that might be a lost disk, until every other voter says it holds
            // nothing either. (Without this, members that learned of a first campaign's
            // term would all wait for a leader that none of them would vote for.)
            self.recovery = None;
            self.recovery_done = true;
        } else if let Some(r) = self.recovery.as_mut() {
            r.terms = None;
        }
    }

    /// True for a node that holds no entry and no snapshot: a member of a cluster being
    /// bootstrapped, or one that lost its disk.
    pub(super) fn holds_nothing(&self) -> bool {
        self.log.last_index() == 0 && self.log.snapshot().index == 0
    }

    /// Step 2, on a heartbeat from the current leader: ask it for its commit index (one read
    /// at a time), in case no append comes to end the recovery.
    pub(super) fn ask_commit_for_recovery(&mut self, leader: NodeId) {
        if self.recovery.as_ref().is_none_or(Recovery::term_unknown) {
            return;
        }
        let wire = self.next_read_id;
        let Some(f) = self.follower_mut() else { return };
        if f.recovery_read.is_some() {
            return;
        }
        f.recovery_read = Some(wire);
        self.next_read_id = self.next_read_id.wrapping_add(1);
        if let Some(r) = self.recovery.as_mut() {
            r.commit_asked_ticks = 0;
        }
        self.send(
            leader,
            MessageBody::ReadIndex { ctx: wire },
            Dispatch::AfterPersist,
        );
    }

    /// Step 2: the leader answered the recovery read with its commit index.
    pub(super) fn leader_commit_learned(&mut self, commit: u64) {
        let last = self.log.last_index();
        if commit <= last {
            self.maybe_recovered(commit, last);
        }
    }

    /// Step 2, after an AppendEntries of `leader_commit` from the current leader: recovery
    /// ends once the log holds the leader's log through its commit index, at an entry of
    /// the leader's term.
    pub(super) fn maybe_recovered(&mut self, leader_commit: u64, last_new: u64) {
        let Some(r) = self.recovery.as_ref() else {
            return;
        };
        if r.term_unknown() {
            return;
        }
        if leader_commit <= last_new && self.log.term(leader_commit) == Some(self.term) {
            self.recovery = None;
            self.recovery_done = true;
        }
    }
}
