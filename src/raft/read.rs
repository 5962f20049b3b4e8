//! Linearizable reads without writing to the log (ReadIndex, Raft thesis §6.4).
//!
//! A read arriving at the leader records the commit index, then waits until a majority has
//! answered a heartbeat sent after the read arrived: at that moment no other leader can have
//! committed anything newer, so once the state machine has applied the recorded index the read
//! sees every write that completed before it started. A leader that has not yet committed an
//! entry of its own term does not know the latest commit index; reads wait for that first.
//! Reads arriving at a follower are forwarded to the leader, which answers with the index.
//!
//! Ids: the host names its reads (`ctx`); a forwarded read travels under a wire id the core
//! chooses, unique across restarts (each incarnation starts at a random point), and the
//! follower accepts an answer only for a wire id it has outstanding, from the leader it asked,
//! in the term it asked in. So an answer meant for another incarnation or another term never
//! confirms a read at a stale index.
//!
//! Invariants: pending reads are ordered by round; a read is confirmed only by answers to a
//! heartbeat of its round or later; a leader that steps down fails every read it holds, and a
//! follower whose leader or term changes fails every read it forwarded (see
//! [`RaftCore::set_role`]).

use super::core::{Dispatch, RaftCore, Role};
use super::ready::ReadState;
use super::role::RoleState;
use super::{Index, MessageBody, NodeId};
use crate::error::CoreProposeError;

/// A read waiting for its heartbeat round to be confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PendingRead {
    /// Who asked (this node for a local read).
    pub(super) from: NodeId,
    /// The asker's id of the read (the host's id, or a follower's wire id).
    pub(super) ctx: u64,
    pub(super) index: Index,
    /// 0 until the heartbeat round that confirms it is assigned (at the next `ready`).
    pub(super) round: u64,
}

impl RaftCore {
    /// Asks for a linearizable read identified by `ctx` (any number the host chooses, unique
    /// among its outstanding reads). When confirmed, a [`ReadState`] with `ctx` appears in a
    /// later [`Ready`](super::Ready): the read may be served once the state machine has
    /// applied its index. If leadership changes first, `ctx` appears in
    /// [`Ready::failed_reads`](super::Ready::failed_reads) instead (a read forwarded by a
    /// follower may also simply never be answered when messages are lost; hosts use a
    /// timeout).
    ///
    /// On a follower the request is forwarded to the leader; without a known leader it fails.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), CoreProposeError> {
        match (self.role(), self.leader) {
            (Role::Leader, _) => {
                self.handle_read_request(self.cfg.id, ctx);
                Ok(())
            }
            (Role::Follower, Some(leader)) => {
                let wire = self.next_read_id;
                self.next_read_id = self.next_read_id.wrapping_add(1);
                if let Some(f) = self.follower_mut() {
                    f.forwarded_reads.insert(wire, ctx);
                }
                self.send(
                    leader,
                    MessageBody::ReadIndex { ctx: wire },
                    Dispatch::AfterPersist,
                );
                Ok(())
            }
            (_, leader) => Err(CoreProposeError::NotLeader { leader }),
        }
    }

    /// Leader: a read from `from` (this node or a follower).
    pub(super) fn handle_read_request(&mut self, from: NodeId, ctx: u64) {
        let commit = self.log.commit();
        let own_term_committed = self.log.term(commit) == Some(self.term);
        let single = self.single_voter();
        let Some(l) = self.leader_mut() else { return };
        if !own_term_committed {
            l.reads_before_commit.push((from, ctx));
            return;
        }
        let read = PendingRead {
            from,
            ctx,
            index: commit,
            round: 0,
        };
        if single {
            self.confirm_read(read);
        } else {
            l.pending_reads.push_back(read);
        }
    }

    /// Leader, at `ready`: reads that arrived since the last round share one new heartbeat
    /// round, sent to every follower at once.
    pub(super) fn start_read_round(&mut self) {
        let Some(l) = self.leader_mut() else { return };
        if !l.pending_reads.iter().any(|r| r.round == 0) {
            return;
        }
        l.read_round += 1;
        let round = l.read_round;
        for r in l.pending_reads.iter_mut().filter(|r| r.round == 0) {
            r.round = round;
        }
        self.broadcast_heartbeat(false);
    }

    /// Leader: the commit index reached the current term; reads held until then can go.
    pub(super) fn release_reads_waiting_for_commit(&mut self) {
        if self.log.term(self.log.commit()) != Some(self.term) {
            return;
        }
        let Some(l) = self.leader_mut() else { return };
        for (from, ctx) in std::mem::take(&mut l.reads_before_commit) {
            self.handle_read_request(from, ctx);
        }
    }

    /// Leader: a follower answered a heartbeat of `round`; confirms every read whose round a
    /// majority (this node included) has now answered.
    pub(super) fn read_round_acknowledged(&mut self, from: NodeId, round: u64) {
        let membership = self.log.membership().clone();
        let me = self.cfg.id;
        let Some(l) = self.leader_mut() else { return };
        if let Some(p) = l.progress.get_mut(&from) {
            p.acked_read_round = p.acked_read_round.max(round);
        }
        let mut done = Vec::new();
        while let Some(r) = l.pending_reads.front().copied() {
            let confirmed = r.round != 0
                && membership.has_quorum(|id| {
                    id == me
                        || l.progress
                            .get(&id)
                            .is_some_and(|p| p.acked_read_round >= r.round)
                });
            if !confirmed {
                break;
            }
            done.extend(l.pending_reads.pop_front());
        }
        for read in done {
            self.confirm_read(read);
        }
    }

    fn confirm_read(&mut self, read: PendingRead) {
        if read.from == self.cfg.id {
            self.read_states.push(ReadState {
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

    /// Follower: `from` answered a forwarded read. Only an answer to a read outstanding here,
    /// from the leader it was sent to, counts.
    pub(super) fn handle_read_response(&mut self, from: NodeId, wire: u64, index: Option<Index>) {
        if self.leader != Some(from) {
            return;
        }
        let RoleState::Follower(f) = &mut self.state else {
            return;
        };
        if f.recovery_read == Some(wire) {
            f.recovery_read = None;
            if let Some(index) = index {
                self.leader_commit_learned(index);
            }
            return;
        }
        let Some(ctx) = f.forwarded_reads.remove(&wire) else {
            return; // not ours: another incarnation's, a duplicate, or a stale term's
        };
        match index {
            Some(index) => self.read_states.push(ReadState { ctx, index }),
            None => self.failed_reads.push(ctx),
        }
    }
}
