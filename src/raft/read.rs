//! Linearizable reads without writing to the log (ReadIndex, Raft thesis §6.4).
//!
//! A read arriving at the leader records the commit index, then waits until a majority has
//! answered a heartbeat sent after the read arrived: at that moment no other leader can have
//! committed anything newer, so once the state machine has applied the recorded index the read
//! sees every write that completed before it started. A leader that has not yet committed an
//! entry of its own term does not know the latest commit index; reads wait for that first.
//! Reads arriving at a follower are forwarded to the leader, which answers with the index.
//!
//! Invariants: pending reads are ordered by round; a read is confirmed only by answers to a
//! heartbeat of its round or later; a leader that steps down fails every read it holds.

use std::collections::VecDeque;

use super::core::{Dispatch, RaftCore, Role};
use super::ready::ReadState;
use super::{Index, MessageBody, NodeId};
use crate::error::CoreProposeError;

/// A read waiting for its heartbeat round to be confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PendingRead {
    /// Who asked (this node for a local read).
    pub(super) from: NodeId,
    pub(super) ctx: u64,
    pub(super) index: Index,
    /// 0 until the heartbeat round that confirms it is assigned (at the next `ready`).
    pub(super) round: u64,
}

/// The leader's ReadIndex state.
#[derive(Clone, Debug, Default)]
pub(super) struct Reads {
    /// Latest heartbeat round started for reads.
    pub(super) round: u64,
    /// Reads waiting for confirmation, oldest first (round 0 = not yet sent).
    pub(super) pending: VecDeque<PendingRead>,
    /// Reads that arrived before the leader committed an entry of its term.
    pub(super) before_commit: Vec<(NodeId, u64)>,
    /// Output: confirmed local reads and failed local reads.
    pub(super) states: Vec<ReadState>,
    pub(super) failed: Vec<u64>,
}

impl RaftCore {
    /// Asks for a linearizable read identified by `ctx` (any number the host chooses). When
    /// confirmed, a [`ReadState`] with `ctx` appears in a later [`Ready`](super::Ready): the read
    /// may be served once the state machine has applied its index. If leadership changes first,
    /// `ctx` appears in [`Ready::failed_reads`](super::Ready::failed_reads) instead (a read
    /// forwarded by a follower may also simply never be answered; hosts use a timeout).
    ///
    /// On a follower the request is forwarded to the leader; without a known leader it fails.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), CoreProposeError> {
        match (self.role, self.leader) {
            (Role::Leader, _) => {
                self.handle_read_request(self.cfg.id, ctx);
                Ok(())
            }
            (_, Some(leader)) => {
                self.send(
                    leader,
                    MessageBody::ReadIndex { ctx },
                    Dispatch::AfterPersist,
                );
                Ok(())
            }
            _ => Err(CoreProposeError::NotLeader { leader: None }),
        }
    }

    /// Leader: a read from `from` (this node or a follower).
    pub(super) fn handle_read_request(&mut self, from: NodeId, ctx: u64) {
        if self.log.term(self.log.commit()) != Some(self.term) {
            self.reads.before_commit.push((from, ctx));
            return;
        }
        let index = self.log.commit();
        if self.cfg.voters.len() == 1 {
            self.confirm_read(PendingRead {
                from,
                ctx,
                index,
                round: 0,
            });
            return;
        }
        self.reads.pending.push_back(PendingRead {
            from,
            ctx,
            index,
            round: 0,
        });
    }

    /// Leader, at `ready`: reads that arrived since the last round share one new heartbeat
    /// round, sent to every follower at once.
    pub(super) fn start_read_round(&mut self) {
        if !self.reads.pending.iter().any(|r| r.round == 0) {
            return;
        }
        self.reads.round += 1;
        let round = self.reads.round;
        for r in self.reads.pending.iter_mut().filter(|r| r.round == 0) {
            r.round = round;
        }
        self.broadcast_heartbeat();
    }

    /// Leader: the commit index reached the current term; reads held until then can go.
    pub(super) fn release_reads_waiting_for_commit(&mut self) {
        if self.reads.before_commit.is_empty()
            || self.log.term(self.log.commit()) != Some(self.term)
        {
            return;
        }
        for (from, ctx) in std::mem::take(&mut self.reads.before_commit) {
            self.handle_read_request(from, ctx);
        }
    }

    /// Leader: a follower answered a heartbeat of `round`; confirms every read whose round a
    /// majority (this node included) has now answered.
    pub(super) fn read_round_acknowledged(&mut self, from: NodeId, round: u64) {
        if let Some(p) = self.progress.get_mut(&from) {
            p.acked_read_round = p.acked_read_round.max(round);
        }
        let mut acked: Vec<u64> = self.progress.values().map(|p| p.acked_read_round).collect();
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let Some(&confirmed) = acked.get(self.quorum().saturating_sub(2)) else {
            return;
        };
        while self
            .reads
            .pending
            .front()
            .is_some_and(|r| r.round != 0 && r.round <= confirmed)
        {
            let read = self.reads.pending.pop_front().expect("checked non-empty");
            self.confirm_read(read);
        }
    }

    fn confirm_read(&mut self, read: PendingRead) {
        if read.from == self.cfg.id {
            self.reads.states.push(ReadState {
                ctx: read.ctx,
                index: read.index,
            });
        } else {
            let body = MessageBody::ReadIndexResponse {
                ctx: read.ctx,
                index: Some(read.index),
            };
            self.send(read.from, body, Dispatch::Now);
        }
    }

    /// Follower: the leader answered a forwarded read.
    pub(super) fn handle_read_response(&mut self, ctx: u64, index: Option<Index>) {
        match index {
            Some(index) => self.reads.states.push(ReadState { ctx, index }),
            None => self.reads.failed.push(ctx),
        }
    }

    /// Leadership is lost: every read held fails (local ones in the next `Ready`, forwarded
    /// ones by an answer without an index).
    pub(super) fn abort_reads(&mut self) {
        let held: Vec<(NodeId, u64)> = self
            .reads
            .pending
            .drain(..)
            .map(|r| (r.from, r.ctx))
            .chain(self.reads.before_commit.drain(..))
            .collect();
        for (from, ctx) in held {
            if from == self.cfg.id {
                self.reads.failed.push(ctx);
            } else {
                self.send(
                    from,
                    MessageBody::ReadIndexResponse { ctx, index: None },
                    Dispatch::Now,
                );
            }
        }
    }
}
