//! What a host reports about a node as it runs: counters ([`EngineCounters`]) and structured
//! [`tracing`] events for operators — elections and leader changes, step-downs and why,
//! snapshots taken and installed, compaction, a full disk and its end, recovery from a lost
//! log tail.
//!
//! Events are derived by comparing the core's visible state before and after each engine
//! call, so the core itself stays free of any output but its `Ready`. Targets are
//! `raftkv::raft` (roles and terms), `raftkv::snapshot` and `raftkv::storage`.

use crate::raft::{NodeId, RaftCore, Role, SnapshotMeta, Term};

/// Counters an [`Engine`](super::Engine) keeps, from its start. All only ever grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Proposals the core took.
    pub proposals: u64,
    /// Proposals refused at once (not leader, busy, too large, full disk).
    pub proposals_refused: u64,
    /// Log entries this node learned committed.
    pub committed: u64,
    /// Committed entries applied (no-ops included).
    pub applied: u64,
    /// Reads answered from the state machine.
    pub reads_served: u64,
    /// Reads failed (leadership changed) or refused at once.
    pub reads_failed: u64,
    /// Batches handed out by the core.
    pub batches: u64,
    /// Log entries written to storage.
    pub entries_written: u64,
    /// The most entries written in one batch.
    pub max_batch_entries: u64,
    /// Storage syncs.
    pub syncs: u64,
    /// Messages handed to the transport.
    pub messages_sent: u64,
    /// Local snapshots stored, and their bytes.
    pub snapshots_taken: u64,
    /// Bytes of local snapshots stored.
    pub snapshot_bytes_taken: u64,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: u64,
    /// Bytes of snapshots installed.
    pub snapshot_bytes_installed: u64,
    /// Times this node saw a new leader (itself included).
    pub leader_changes: u64,
    /// Elections this node started (real ones; pre-votes not counted).
    pub elections: u64,
    /// Times writes stopped for lack of space.
    pub disk_full_events: u64,
}

/// The last state events were reported for.
#[derive(Clone, Copy, Debug)]
pub(super) struct Watched {
    role: Role,
    term: Term,
    leader: Option<NodeId>,
    commit: u64,
    disk_full: bool,
    recovering: bool,
}

impl Watched {
    pub(super) fn new(core: &RaftCore) -> Self {
        if let Some(loss) = core.recovering() {
            tracing::warn!(
                target: "raftkv::raft",
                node = core.id(),
                intact_through = loss.intact_through,
                hard_state_lost = loss.hard_state_lost,
                "recovering from a lost log tail: no votes or campaigns until a leader has \
                 brought this node back"
            );
        }
        Watched {
            role: core.role(),
            term: core.term(),
            leader: core.leader(),
            commit: core.commit_index(),
            disk_full: false,
            recovering: core.recovering().is_some(),
        }
    }

    /// Compares with the core now: reports what changed, counts it, remembers the new state.
    pub(super) fn update(&mut self, core: &RaftCore, disk_full: bool, c: &mut EngineCounters) {
        let id = core.id();
        let (role, term, leader) = (core.role(), core.term(), core.leader());
        if role != self.role {
            match (self.role, role) {
                (Role::Leader, _) if !core.is_voter() => tracing::info!(
                    target: "raftkv::raft", node = id, term,
                    "stepped down: removed from the voters"
                ),
                (Role::Leader, _) if term == self.term => tracing::warn!(
                    target: "raftkv::raft", node = id, term,
                    "stepped down: not heard from a quorum within an election timeout"
                ),
                (Role::Leader, _) => tracing::info!(
                    target: "raftkv::raft", node = id, term, old_term = self.term,
                    "stepped down: saw a higher term"
                ),
                (_, Role::Leader) => tracing::info!(
                    target: "raftkv::raft", node = id, term,
                    last_index = core.log().last_index(),
                    "became leader"
                ),
                (_, Role::Candidate) => {
                    c.elections += 1;
                    tracing::debug!(target: "raftkv::raft", node = id, term, "campaigning");
                }
                _ => {}
            }
        }
        if leader != self.leader && leader.is_some() {
            c.leader_changes += 1;
            if role != Role::Leader {
                tracing::info!(target: "raftkv::raft", node = id, term, leader, "following a new leader");
            }
        }
        let commit = core.commit_index();
        c.committed += commit.saturating_sub(self.commit);
        if disk_full != self.disk_full {
            if disk_full {
                c.disk_full_events += 1;
            } else {
                tracing::info!(target: "raftkv::storage", node = id, "disk space is back: writing again");
            }
        }
        let recovering = core.recovering().is_some();
        if self.recovering && !recovering {
            tracing::info!(
                target: "raftkv::raft", node = id, term,
                "recovered from the lost log tail: voting again"
            );
        }
        *self = Watched {
            role,
            term,
            leader,
            commit,
            disk_full,
            recovering,
        };
    }
}

pub(super) fn snapshot_taken(id: NodeId, meta: SnapshotMeta, bytes: u64) {
    tracing::info!(
        target: "raftkv::snapshot", node = id, index = meta.index, term = meta.term, bytes,
        "snapshot taken; log compacted through its index"
    );
}

pub(super) fn snapshot_installed(id: NodeId, meta: SnapshotMeta, bytes: u64) {
    tracing::info!(
        target: "raftkv::snapshot", node = id, index = meta.index, term = meta.term, bytes,
        "snapshot received from the leader installed"
    );
}

pub(super) fn snapshot_sending(id: NodeId, to: NodeId, meta: SnapshotMeta, bytes: u64) {
    tracing::info!(
        target: "raftkv::snapshot", node = id, to, index = meta.index, bytes,
        "sending a snapshot to a follower behind the compaction point"
    );
}

pub(super) fn disk_full(id: NodeId, error: &dyn std::fmt::Display) {
    tracing::warn!(
        target: "raftkv::storage", node = id, %error,
        "disk full: nothing is acknowledged until writes succeed again"
    );
}
