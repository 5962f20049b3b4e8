//! The state that belongs to one role, kept inside the role.
//!
//! A leader's per-follower progress, its pending reads, a leadership transfer and its count of
//! uncommitted bytes; a candidate's votes; a follower's incoming snapshot transfer and the
//! reads it forwarded to its leader: each lives in the variant of [`RoleState`] for the role
//! that owns it. A role or term change replaces the variant, so none of it can outlive its
//! role by accident — and what must be answered when it goes (reads held by a leader, reads a
//! follower forwarded) is answered in one place, [`RaftCore::set_role`](super::RaftCore).

use std::collections::{BTreeMap, VecDeque};

use super::progress::Progress;
use super::read::PendingRead;
use super::snapshot::Incoming;
use super::{NodeId, Role};

/// What a leader keeps.
#[derive(Debug)]
pub(super) struct Leader {
    /// Followers' progress (never contains this node).
    pub(super) progress: BTreeMap<NodeId, Progress>,
    /// Ticks since the last heartbeat.
    pub(super) heartbeat_elapsed: u32,
    /// Bytes proposed in this term and not yet committed.
    pub(super) uncommitted_bytes: u64,
    /// Latest heartbeat round started for reads (ReadIndex).
    pub(super) read_round: u64,
    /// Reads waiting for their heartbeat round to be confirmed, oldest first (round 0 = not
    /// yet sent).
    pub(super) pending_reads: VecDeque<PendingRead>,
    /// Reads that arrived before the leader committed an entry of its term.
    pub(super) reads_before_commit: Vec<(NodeId, u64)>,
    /// A leadership transfer in progress.
    pub(super) transfer: Option<Transfer>,
}

/// A leadership transfer in progress.
#[derive(Clone, Copy, Debug)]
pub(super) struct Transfer {
    /// The follower leadership is being handed to.
    pub(super) to: NodeId,
    /// Ticks since it started; abandoned after an election timeout.
    pub(super) elapsed: u32,
}

/// What a (pre-)candidate keeps: the answers to its vote requests.
#[derive(Debug, Default)]
pub(super) struct Election {
    pub(super) votes: BTreeMap<NodeId, bool>,
}

/// What a follower keeps.
#[derive(Debug, Default)]
pub(super) struct Follower {
    /// A snapshot being received from this term's leader.
    pub(super) incoming: Option<Incoming>,
    /// Reads forwarded to the leader and not answered yet: wire id -> the host's id.
    pub(super) forwarded_reads: BTreeMap<u64, u64>,
    /// A recovering node's own read, asking the leader for its commit index (see
    /// `recovery.rs`).
    pub(super) recovery_read: Option<u64>,
}

/// A node's role with the state only that role has.
#[derive(Debug)]
pub(super) enum RoleState {
    Follower(Follower),
    PreCandidate(Election),
    Candidate(Election),
    Leader(Box<Leader>),
}

impl RoleState {
    pub(super) fn role(&self) -> Role {
        match self {
            RoleState::Follower(_) => Role::Follower,
            RoleState::PreCandidate(_) => Role::PreCandidate,
            RoleState::Candidate(_) => Role::Candidate,
            RoleState::Leader(_) => Role::Leader,
        }
    }
}
