//! Typed errors, one enum per layer.

use std::path::PathBuf;

use crate::raft::{Index, NodeId};

/// Errors of a [`Storage`](crate::storage::Storage) implementation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system IO error on a file. `op` names the operation ("write", "fsync", ...).
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The file or directory it failed on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The disk is full. What was durable before stays durable; retry once space is free.
    #[error("no space left on device writing {path}")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// A file's content is damaged in a way that is not a torn tail write.
    #[error("corrupt {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the damage.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A file belongs to another cluster or node, or has an unknown format version.
    #[error("{path} belongs elsewhere: {reason}")]
    WrongIdentity {
        /// The refused file.
        path: PathBuf,
        /// Expected versus found.
        reason: String,
    },
    /// The requested index is below the first retained index (covered by the snapshot).
    #[error("index {0} is compacted away")]
    Compacted(Index),
    /// The requested index is above the last index.
    #[error("index {0} is not in the log")]
    Unavailable(Index),
    /// The caller broke the trait's contract (for example a gap between appended entries).
    #[error("invalid storage call: {0}")]
    Invalid(String),
    /// A previous fsync failed; the storage refuses all further work (the page cache may have
    /// dropped the dirty pages, so a retry that "succeeds" would prove nothing).
    #[error("storage is poisoned by an earlier fsync failure")]
    Poisoned,
    /// Another storage (in this or another process) holds the data directory's lock.
    #[error("{path} is in use by {}", match .pid { Some(pid) => format!("process {pid}"), None => "another process".to_string() })]
    InUse {
        /// The lock file.
        path: PathBuf,
        /// The process that holds it, as it recorded itself in the lock file.
        pid: Option<u32>,
    },
    /// A file of an on-disk format this version does not read (its header is intact). There
    /// is no migration: restore the node from a backup or from the cluster.
    #[error("{path} has on-disk format version {version}; this raftkv reads only version {supported} (no migration: restore from a backup or from the cluster)")]
    UnsupportedFormat {
        /// The refused file.
        path: PathBuf,
        /// The version in its header.
        version: u32,
        /// The version this build reads.
        supported: u32,
    },
}

/// Why [`Node::propose`](crate::Node::propose) or [`Node::read`](crate::Node::read) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader. Retry on `leader` if it is known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// The command did not commit here within the deadline. It may still commit later.
    #[error("timed out; the command may or may not be applied")]
    Timeout,
    /// Leadership changed and the command's log slot was taken by another entry: it was not
    /// applied and never will be.
    #[error("dropped by a leader change; not applied")]
    Dropped,
    /// Too many uncommitted commands are in flight; retry later.
    #[error("too many proposals in flight")]
    Busy,
    /// This node's disk is full; it takes no proposals until space is freed.
    #[error("no space left on this node's disk")]
    NoSpace,
    /// The command can never be replicated: as a log entry it would take `size` bytes
    /// ([`Entry::size`](crate::raft::Entry::size)), above the cluster's
    /// [`Config::max_entry_bytes`](crate::raft::Config::max_entry_bytes). Not applied; do not
    /// retry it as it is.
    #[error("command of {size} bytes exceeds the largest entry of {max} bytes")]
    TooLarge {
        /// Bytes the entry would take.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The state machine does not answer queries ([`StateMachine::query`](crate::StateMachine::query)).
    #[error("the state machine does not serve queries")]
    Unsupported,
    /// The node is shut down (or stopped after a fatal storage error).
    #[error("node is shut down")]
    Shutdown,
}

/// Why the core refused a proposal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreProposeError {
    /// Only a leader takes proposals.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// The uncommitted tail already holds `max_uncommitted_bytes`.
    #[error("too many uncommitted bytes")]
    Busy,
    /// The entry would exceed [`Config::max_entry_bytes`](crate::raft::Config::max_entry_bytes).
    #[error("entry of {size} bytes exceeds the largest entry of {max} bytes")]
    TooLarge {
        /// Bytes the entry would take.
        size: u64,
        /// The limit.
        max: u64,
    },
}

impl From<CoreProposeError> for ProposeError {
    fn from(e: CoreProposeError) -> Self {
        match e {
            CoreProposeError::NotLeader { leader } => ProposeError::NotLeader { leader },
            CoreProposeError::Busy => ProposeError::Busy,
            CoreProposeError::TooLarge { size, max } => ProposeError::TooLarge { size, max },
        }
    }
}

/// Why a configuration change was refused (see
/// [`RaftCore::change_membership`](crate::raft::RaftCore::change_membership)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// Only the leader changes the configuration.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// A change is already under way (joint, or not yet committed).
    #[error("a configuration change is in progress")]
    InProgress,
    /// A leadership transfer is under way.
    #[error("a leadership transfer is in progress")]
    Busy,
    /// Only a learner can become a voter (add it as a learner first).
    #[error("node {0} is not a learner of the cluster")]
    NotALearner(NodeId),
    /// The node is not a member at all.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    /// The learner has not caught up with the leader (its match index is below the commit
    /// index, or it has not answered within an election timeout).
    #[error("learner {0} has not caught up yet")]
    NotCaughtUp(NodeId),
    /// The new voters do not include a quorum of nodes the leader hears from: the change
    /// could never complete.
    #[error("the new voters have no reachable quorum")]
    NoQuorum,
    /// The change was taken but its log slot was taken by another leader's entry: not in
    /// effect.
    #[error("dropped by a leader change; not in effect")]
    Dropped,
    /// The node stopped or the change did not complete in time (it may still complete).
    #[error("timed out; the change may still complete")]
    Timeout,
    /// The change makes no sense (no voters, id 0, the current configuration).
    #[error("invalid change: {0}")]
    Invalid(String),
}

/// Errors of a [`Transport`](crate::transport::Transport).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer is unknown to the transport.
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    /// The message could not be delivered (the transport may retry or drop; Raft tolerates loss).
    #[error("send to {peer} failed: {reason}")]
    Unreachable {
        /// Receiver.
        peer: NodeId,
        /// Why.
        reason: String,
    },
}

/// Errors starting or running a [`Node`](crate::Node).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Storage failed (fatal: the node stopped).
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The state machine could not be restored from the stored snapshot.
    #[error("restoring the state machine from the snapshot: {0}")]
    Restore(#[source] std::io::Error),
    /// The node thread could not be started.
    #[error("could not start the node thread: {0}")]
    Spawn(std::io::Error),
}

/// A snapshot the host reported does not fit the log (see
/// [`RaftCore::snapshot_saved`](crate::raft::RaftCore::snapshot_saved)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid snapshot: {0}")]
pub struct InvalidSnapshot(pub String);
