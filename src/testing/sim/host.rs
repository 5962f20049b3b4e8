//! The simulation's side of the [`Engine`](crate::host::Engine) callbacks, and the checks
//! that every acknowledgement leaving a node is covered by what its storage has made durable.

use std::collections::BTreeMap;

use super::{Acknowledged, AppliedEntry, SimStorage};
use crate::error::ProposeError;
use crate::host::{Host, Observed};
use crate::raft::{
    AppendResponse, Index, Message, MessageBody, NodeId, Payload, Proposed, RaftCore, SnapshotMeta,
    SnapshotStatus,
};
use crate::state_machine::SnapshotSource;
use crate::testing::invariants::{Checker, LogMirror};

/// One node's host for the length of one engine call: it borrows what the cluster keeps.
pub(super) struct SimHost<'a, O> {
    pub(super) id: NodeId,
    pub(super) seed: u64,
    pub(super) checker: &'a mut Checker,
    pub(super) mirror: &'a mut LogMirror,
    pub(super) applied: &'a mut Vec<AppliedEntry>,
    /// Messages sent, each with what an acceptance claimed the sender's storage made durable
    /// at that moment (checked against the leader it goes to, see [`AckClaim`]).
    pub(super) outbox: &'a mut Vec<(Message, Option<AckClaim>)>,
    pub(super) acknowledged: &'a mut Vec<Acknowledged<O>>,
    pub(super) dropped: &'a mut u64,
    pub(super) read_results: &'a mut BTreeMap<u64, Option<O>>,
    /// Local snapshots to "serialize" (the cluster schedules their completion).
    pub(super) serialize: &'a mut Vec<(SnapshotMeta, Vec<u8>)>,
    pub(super) snapshots_installed: &'a mut u64,
    pub(super) snapshots_taken: &'a mut u64,
    /// Proposals taken and not answered yet (see `SimNode::tickets`).
    pub(super) tickets: &'a mut usize,
}

impl<O> SimHost<'_, O> {
    fn fail(&self, what: String) -> ! {
        panic!(
            "safety violation (replay with RAFTKV_SEED={}): node {}: {what}",
            self.seed, self.id
        )
    }
}

impl<S: SimStorage, O> Host<S, O> for SimHost<'_, O> {
    type Proposal = Payload;
    type Read = u64;

    fn send(&mut self, core: &RaftCore, storage: &S, messages: Vec<Message>) {
        for m in &messages {
            if let Err(what) = check_claims(core, storage, m) {
                self.fail(what);
            }
        }
        self.outbox.extend(messages.into_iter().map(|m| {
            let claim = ack_claim(storage, &m);
            (m, claim)
        }));
    }

    fn proposal_done(&mut self, command: Payload, at: Proposed, result: Result<O, ProposeError>) {
        match self.tickets.checked_sub(1) {
            Some(n) => *self.tickets = n,
            None => self.fail(format!("proposal at {at:?} answered, but none was waiting")),
        }
        match result {
            Ok(output) => self.acknowledged.push(Acknowledged {
                node: self.id,
                index: at.index,
                term: at.term,
                command,
                output,
            }),
            Err(ProposeError::Dropped) => *self.dropped += 1,
            Err(_) => {}
        }
    }

    fn read_done(&mut self, ticket: u64, result: Result<O, ProposeError>) {
        self.read_results.insert(ticket, result.ok());
    }

    fn observe(&mut self, event: Observed<'_>) {
        match event {
            Observed::LogWritten(entries) => self.checker.log_write(self.id, self.mirror, entries),
            Observed::SnapshotInstalled(meta) => {
                self.checker.rebase(self.id, self.mirror, meta.index);
                *self.snapshots_installed += 1;
            }
            Observed::SnapshotTaken(meta) => {
                self.checker.rebase(self.id, self.mirror, meta.index);
                *self.snapshots_taken += 1;
            }
            Observed::Applying { entry, after } => {
                // Applying an entry claims it committed: that claim is checked first.
                self.checker.commit(self.id, entry.index, self.mirror);
                self.checker.apply(self.id, after, entry, self.mirror);
                self.applied.push(AppliedEntry {
                    index: entry.index,
                    term: entry.term,
                    command: entry.command().cloned(),
                });
            }
            Observed::DiskFull(_) | Observed::ReadConfirmed(_) | Observed::ReadFailed(_) => {}
        }
    }

    fn serialize_snapshot(&mut self, meta: SnapshotMeta, source: Box<dyn SnapshotSource>) -> bool {
        let mut bytes = Vec::new();
        source
            .write_to(&mut bytes)
            .expect("test state machines serialize into memory");
        self.serialize.push((meta, bytes));
        true
    }
}

/// True if `storage` would keep, across a crash, the entry the core holds at `index` (or a
/// snapshot covering it). `None` when the storage cannot tell.
fn durably_holds<S: SimStorage>(core: &RaftCore, storage: &S, index: Index) -> Option<bool> {
    if index == 0 {
        return Some(true);
    }
    let snapshot = storage.durable_snapshot()?;
    if index <= snapshot.index {
        return Some(true);
    }
    if index <= core.log().snapshot().index {
        // Covered by the core's snapshot, so committed: whatever entry the storage keeps
        // there is the committed one.
        return Some(storage.durable_term(index).is_some());
    }
    let want = core.log().term(index);
    Some(want.is_some() && storage.durable_term(index) == want)
}

/// An acceptance of an append: the match index, and the term of the entry the sender's
/// storage would keep there across a crash when the acceptance left (`None`: none kept).
/// Checked against the log of the leader it goes to: they must be the same entry.
#[derive(Clone, Copy, Debug)]
pub(super) struct AckClaim {
    pub(super) match_index: Index,
    pub(super) durable_term: Option<crate::raft::Term>,
}

fn ack_claim<S: SimStorage>(storage: &S, m: &Message) -> Option<AckClaim> {
    let MessageBody::AppendResponse(AppendResponse::Accepted { match_index }) = m.body else {
        return None;
    };
    let snapshot = storage.durable_snapshot()?;
    if match_index <= snapshot.index {
        return None; // inside the durable snapshot: committed, held
    }
    Some(AckClaim {
        match_index,
        durable_term: storage.durable_term(match_index),
    })
}

/// An acceptance reaches the leader of its term: the sender held that leader's entry at the
/// match index durably when it sent it.
pub(super) fn check_ack(claim: &AckClaim, m: &Message, leader: &RaftCore) -> Result<(), String> {
    if leader.term() != m.term || leader.role() != crate::raft::Role::Leader {
        return Ok(()); // no longer that term's leader: its log may have moved on
    }
    let Some(want) = leader.log().term(claim.match_index) else {
        return Ok(()); // compacted (committed) or beyond it
    };
    if claim.durable_term != Some(want) {
        return Err(format!(
            "node {} acknowledged a match at {} to leader {} but durably held {:?} there, \
             not the leader's entry of term {want}",
            m.from, claim.match_index, m.to, claim.durable_term
        ));
    }
    Ok(())
}

/// What a message claims about its sender's durable state, checked against the storage:
/// - every message but a pre-vote request and a granted pre-vote (which speak of a future
///   term) carries a term the sender has made durable;
/// - a granted vote is durable with its term;
/// - an accepted append is durable through its match index (checked when it reaches the
///   leader: [`check_ack`]);
/// - an installed snapshot is durable (as a snapshot, or as the log entry it ends at).
pub(super) fn check_claims<S: SimStorage>(
    core: &RaftCore,
    storage: &S,
    m: &Message,
) -> Result<(), String> {
    let Some(hs) = storage.durable_hard_state() else {
        return Ok(()); // this storage cannot say what is durable
    };
    let speaks_of_future = matches!(
        m.body,
        MessageBody::Vote { pre_vote: true, .. }
            | MessageBody::VoteResponse {
                pre_vote: true,
                granted: true
            }
    );
    if !speaks_of_future && hs.term < m.term {
        return Err(format!(
            "sent {:?} in term {} with only term {} durable",
            m.body, m.term, hs.term
        ));
    }
    match &m.body {
        MessageBody::VoteResponse {
            pre_vote: false,
            granted: true,
        } if !(hs.term > m.term || (hs.term == m.term && hs.vote == Some(m.to))) => Err(format!(
            "granted its vote to {} in term {} but durably holds {hs:?}",
            m.to, m.term
        )),
        MessageBody::SnapshotResponse {
            index,
            status: SnapshotStatus::Installed,
            ..
        } if durably_holds(core, storage, *index) == Some(false) => Err(format!(
            "acknowledged the snapshot at {index} as installed before it was durable"
        )),
        _ => Ok(()),
    }
}

/// The core counts itself toward commits through its persisted index: that must be durable.
pub(super) fn check_persisted<S: SimStorage>(core: &RaftCore, storage: &S) -> Result<(), String> {
    let persisted = core.log().persisted();
    if durably_holds(core, storage, persisted) == Some(false) {
        return Err(format!(
            "believes its log durable through {persisted}, but its storage would not keep it \
             (durable term there {:?}, log term {:?})",
            storage.durable_term(persisted),
            core.log().term(persisted)
        ));
    }
    Ok(())
}
