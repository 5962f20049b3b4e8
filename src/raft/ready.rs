//! The batch of work the core hands to its host, and the small types around it.

use super::{
    Entry, HardState, Index, Message, MessageBody, NodeId, Payload, Role, SnapshotMeta, Term,
};

/// What the host must make durable through [`RaftCore::on_persisted`](super::RaftCore::on_persisted): the hard state and the
/// log position a [`Ready`] covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistAck {
    /// Hard state as of this batch.
    pub hard_state: HardState,
    /// Last log index as of this batch.
    pub last_index: Index,
    /// Its term.
    pub last_term: Term,
}

/// One batch of work for the host. [`host::Engine`](crate::host::Engine) does all of this for
/// you; a host of its own handles every part, in this order:
///
/// 1. send [`Ready::messages`] at once (they claim nothing about durability — this is what
///    lets a leader replicate in parallel with its own fsync), together with the snapshot
///    chunks of [`Ready::snapshot_requests`] read from storage (skip a request whose `meta`
///    is no longer the stored snapshot);
/// 2. fail the reads of [`Ready::failed_reads`]; keep the [`Ready::read_states`] until the
///    state machine has applied their index (step 7);
/// 3. write to storage, in this order (see [`host::write_ready`](crate::host::write_ready)):
///    [`Ready::hard_state`]; the [`Ready::snapshot_chunks`], in order; the
///    [`Ready::install_snapshot`] (it replaces the stored log and is durable when it
///    returns); [`Ready::entries`] (which follow any installed snapshot); and, if
///    [`Ready::tail_loss_repaired`], the end of the tail-loss recovery, last;
/// 4. if a snapshot was installed, restore the state machine from it before applying anything
///    after it;
/// 5. sync — now, or later while you go on stepping inputs and handing out further batches
///    (an fsync in flight); then call [`RaftCore::on_persisted`](super::RaftCore::on_persisted)
///    with the [`Ready::ack`] of every batch the sync covers, in the order they were handed
///    out, and only then send their [`Ready::persisted_messages`] (votes, acknowledgements,
///    anything of a new term: they claim what the sync made durable). A batch with nothing
///    to persist still completes in order, after the batches before it;
/// 6. apply [`Ready::committed_entries`] in order — they are already durable here, so this
///    need not wait for step 5;
/// 7. serve the confirmed reads whose index is now applied.
///
/// Any number of inputs may be stepped before one `ready()`, and between any two steps above.
#[derive(Clone, Debug, Default)]
#[must_use = "a Ready carries work the host must do"]
pub struct Ready {
    /// New hard state to persist, if it changed.
    pub hard_state: Option<HardState>,
    /// Entries to persist. Storage must replace everything from `entries[0].index` on.
    pub entries: Vec<Entry>,
    /// Messages that may be sent at once.
    pub messages: Vec<Message>,
    /// Messages that may be sent only after `hard_state` and `entries` are durable.
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in index order.
    pub committed_entries: Vec<Entry>,
    /// Leader: snapshot chunks to read from storage and send at once (see
    /// [`SnapshotChunkRequest::into_message`]). Skip a request whose `meta` is no longer the
    /// stored snapshot; the core restarts the transfer with the new one.
    pub snapshot_requests: Vec<SnapshotChunkRequest>,
    /// Follower: snapshot chunks received, to write to storage (in order) with the rest of
    /// the batch, before `persisted_messages` leave.
    pub snapshot_chunks: Vec<SnapshotChunk>,
    /// Follower: the last chunk arrived. After writing `snapshot_chunks`, install this
    /// snapshot in storage (durably), restore the state machine from it, and only then apply
    /// `committed_entries` (which all follow it).
    pub install_snapshot: Option<SnapshotMeta>,
    /// Linearizable reads confirmed by the leader: each may be served once the state machine
    /// has applied its `index` (see [`RaftCore::read_index`](super::RaftCore::read_index)).
    pub read_states: Vec<ReadState>,
    /// Reads that cannot be confirmed (leadership changed): fail them, the client retries.
    pub failed_reads: Vec<u64>,
    /// The node has recovered from a lost log tail ([`TailLoss`](crate::storage::TailLoss)):
    /// after writing `entries`, clear the storage's record
    /// ([`Storage::clear_tail_loss`](crate::storage::Storage::clear_tail_loss)), so that it is
    /// durable only together with them.
    pub tail_loss_repaired: bool,
    /// What to report to [`RaftCore::on_persisted`](super::RaftCore::on_persisted) once this batch is durable.
    pub ack: PersistAck,
}

impl Ready {
    /// True when the batch asks the host to persist something.
    pub fn must_persist(&self) -> bool {
        self.hard_state.is_some()
            || !self.entries.is_empty()
            || !self.snapshot_chunks.is_empty()
            || self.install_snapshot.is_some()
            || self.tail_loss_repaired
    }
}

/// Where a proposal landed in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proposed {
    /// Index of the new entry.
    pub index: Index,
    /// Term of the new entry. If the entry applied at `index` has another term, the proposal
    /// was dropped by a leader change.
    pub term: Term,
}

/// A snapshot of the core's externally visible state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// Vote in the current term.
    pub vote: Option<NodeId>,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit_index: Index,
    /// Highest index handed out for applying.
    pub applied_index: Index,
    /// Highest index known durable.
    pub persisted_index: Index,
    /// Last log index.
    pub last_index: Index,
    /// Snapshot boundary.
    pub snapshot: SnapshotMeta,
}

/// A leader's request to send bytes `offset..offset + len` of its snapshot `meta` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotChunkRequest {
    /// Receiver.
    pub to: NodeId,
    /// Leader's term.
    pub term: Term,
    /// Which snapshot.
    pub meta: SnapshotMeta,
    /// Its total size.
    pub size: u64,
    /// First byte to send.
    pub offset: u64,
    /// Number of bytes to send.
    pub len: u64,
}

impl SnapshotChunkRequest {
    /// The message carrying `data` (which must be the requested bytes), sent by `from`.
    pub fn into_message(self, from: NodeId, data: Payload) -> Message {
        Message {
            from,
            to: self.to,
            term: self.term,
            body: MessageBody::InstallSnapshot {
                meta: self.meta,
                size: self.size,
                offset: self.offset,
                data,
            },
        }
    }
}

/// A snapshot chunk a follower received, to be written to storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// Which snapshot.
    pub meta: SnapshotMeta,
    /// Its total size.
    pub size: u64,
    /// Where `data` starts; 0 starts the snapshot over.
    pub offset: u64,
    /// The bytes.
    pub data: Payload,
}

/// A confirmed linearizable read: serve read `ctx` once the state machine applied `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The host's identifier of the read.
    pub ctx: u64,
    /// The commit index when the read arrived at the leader.
    pub index: Index,
}
