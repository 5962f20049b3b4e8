//! Snapshots inside the core: compacting the log behind a stored snapshot, streaming the
//! snapshot to followers that need compacted entries, and installing one received from the
//! leader.
//!
//! The core never holds snapshot bytes. A leader asks its host for chunks
//! ([`Ready::snapshot_requests`](super::Ready::snapshot_requests)); a follower hands received
//! chunks to its host ([`Ready::snapshot_chunks`](super::Ready::snapshot_chunks)), which writes
//! them to storage as they come. Memory stays bounded by the chunk size times the window on
//! both sides.
//!
//! Invariants: a follower installs only a snapshot beyond its commit index (an old or
//! duplicate snapshot never moves it backwards); chunks are accepted strictly in order, and a
//! transfer restarts cleanly from offset 0 (a new snapshot, or a follower that lost its
//! partial copy) or resumes from the follower's `next_offset` after losses.

use super::core::{Dispatch, RaftCore};
use super::progress::ProgressState;
use super::ready::{SnapshotChunk, SnapshotChunkRequest};
use super::{AppendResponse, Index, MessageBody, NodeId, Payload, SnapshotMeta, SnapshotStatus};
use crate::error::InvalidSnapshot;

/// A transfer in progress on the receiving side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Incoming {
    pub(super) meta: SnapshotMeta,
    pub(super) size: u64,
    pub(super) next_offset: u64,
}

impl RaftCore {
    /// The host durably stored a snapshot of the applied state through `meta` (`size` bytes):
    /// the log entries it covers are discarded, and transfers to followers switch to it.
    ///
    /// Fails if `meta` is not an applied entry of the log (a snapshot must be taken right
    /// after applying the entry it names). Calling it again with the current snapshot only
    /// updates its size (used at start-up).
    pub fn snapshot_saved(&mut self, meta: SnapshotMeta, size: u64) -> Result<(), InvalidSnapshot> {
        if meta == self.log.snapshot() {
            self.snapshot_size = size;
            return Ok(());
        }
        if !self.log.compact(meta) {
            return Err(InvalidSnapshot(format!(
                "snapshot at ({}, term {}) is not an applied entry beyond the current snapshot {} (applied {})",
                meta.index,
                meta.term,
                self.log.snapshot().index,
                self.log.applied()
            )));
        }
        self.snapshot_size = size;
        for p in self.progress.values_mut() {
            if p.state == ProgressState::Snapshot {
                p.become_snapshot(meta, size);
            }
        }
        Ok(())
    }

    /// True while a snapshot from the leader is partly received.
    pub fn receiving_snapshot(&self) -> bool {
        self.incoming.is_some()
    }

    /// Declares entries through `index` applied by a state machine that keeps its own durable
    /// state (see [`StateMachine::durable_index`](crate::StateMachine::durable_index)); they are
    /// not handed out again. Call it at start-up, before the first [`RaftCore::ready`].
    pub fn set_applied(&mut self, index: Index) {
        self.log.set_applied(index);
    }

    /// Size of the stored snapshot, as the host reported it.
    pub fn snapshot_size(&self) -> u64 {
        self.snapshot_size
    }

    /// Leader: starts a snapshot transfer to `to` (its next entry is compacted away).
    pub(super) fn start_snapshot_transfer(&mut self, to: NodeId) {
        let (meta, size) = (self.log.snapshot(), self.snapshot_size);
        if let Some(p) = self.progress.get_mut(&to) {
            p.become_snapshot(meta, size);
        }
    }

    /// Leader: true if a chunk may go to a follower in snapshot mode.
    pub(super) fn wants_snapshot_chunk(&self, to: NodeId) -> bool {
        let Some(t) = self.progress.get(&to).and_then(|p| p.transfer) else {
            return false;
        };
        let chunk = self.cfg.snapshot_chunk_bytes;
        debug_assert!(
            t.acked <= t.sent,
            "snapshot transfer acknowledged past what was sent"
        );
        let in_flight = t.sent.saturating_sub(t.acked).div_ceil(chunk);
        (!t.started || t.sent < t.size) && in_flight < self.cfg.max_snapshot_chunks_inflight
    }

    /// Leader: asks the host to send the next chunk to `to`.
    pub(super) fn send_snapshot_chunk(&mut self, to: NodeId) {
        let term = self.term;
        let chunk = self.cfg.snapshot_chunk_bytes;
        let Some(t) = self.progress.get_mut(&to).and_then(|p| p.transfer.as_mut()) else {
            return;
        };
        let len = chunk.min(t.size - t.sent);
        self.snapshot_requests.push(SnapshotChunkRequest {
            to,
            term,
            meta: t.meta,
            size: t.size,
            offset: t.sent,
            len,
        });
        t.sent += len;
        t.started = true;
    }

    /// Leader: a follower answered a chunk.
    pub(super) fn handle_snapshot_response(
        &mut self,
        from: NodeId,
        index: Index,
        next_offset: u64,
        status: SnapshotStatus,
    ) {
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.recent_active = true;
        if status == SnapshotStatus::Installed {
            p.maybe_update(index);
            if p.state == ProgressState::Snapshot {
                p.become_probe();
            }
            self.maybe_commit();
            return;
        }
        let Some(t) = p.transfer.as_mut() else { return };
        if t.meta.index != index {
            return; // about a transfer we abandoned
        }
        match status {
            SnapshotStatus::Accepted => {
                t.acked = t.acked.max(next_offset.min(t.size));
                // A late answer to a chunk sent before a rewind can acknowledge more than we
                // now count as sent: the follower has those bytes, go on from there.
                t.sent = t.sent.max(t.acked);
            }
            _ => {
                // The follower expects another offset (it lost chunks or its partial copy).
                t.acked = next_offset.min(t.size);
                t.sent = t.acked;
                t.started = t.sent > 0;
            }
        }
    }

    /// Leader, on a heartbeat answer from a follower in snapshot mode: if nothing was
    /// acknowledged over the last heartbeat round trip, the chunks in flight are presumed lost
    /// and the transfer resumes from the last acknowledged byte.
    pub(super) fn check_snapshot_progress(&mut self, from: NodeId) {
        let Some(t) = self
            .progress
            .get_mut(&from)
            .and_then(|p| p.transfer.as_mut())
        else {
            return;
        };
        if t.acked == t.acked_at_heartbeat && (t.sent > t.acked || (t.started && t.size == 0)) {
            t.sent = t.acked;
            t.started = t.sent > 0;
        }
    }

    /// Follower: a chunk of the leader's snapshot.
    pub(super) fn handle_snapshot_chunk(
        &mut self,
        leader: NodeId,
        meta: SnapshotMeta,
        size: u64,
        offset: u64,
        data: Payload,
    ) {
        self.election_elapsed = 0;
        self.leader = Some(leader);
        if meta.index <= self.log.commit() {
            // Old or duplicate: we already have all of it; tell the leader where we are.
            self.incoming = None;
            let match_index = self.log.commit();
            let body = MessageBody::AppendResponse(AppendResponse::Accepted { match_index });
            self.send(leader, body, Dispatch::AfterPersist);
            return;
        }
        let expected = match self.incoming {
            Some(i) if i.meta == meta && i.size == size => i.next_offset,
            _ => 0,
        };
        if offset != expected {
            let body = MessageBody::SnapshotResponse {
                index: meta.index,
                next_offset: expected,
                status: SnapshotStatus::Rejected,
            };
            self.send(leader, body, Dispatch::AfterPersist);
            return;
        }
        let next_offset = offset + data.len() as u64;
        self.snapshot_chunks.push(SnapshotChunk {
            meta,
            size,
            offset,
            data,
        });
        let status = if next_offset >= size {
            self.incoming = None;
            self.log.restore_snapshot(meta);
            self.snapshot_size = size;
            self.install_snapshot = Some(meta);
            SnapshotStatus::Installed
        } else {
            self.incoming = Some(Incoming {
                meta,
                size,
                next_offset,
            });
            SnapshotStatus::Accepted
        };
        // Acknowledged only once the chunk (and, for the last, the installed snapshot) is
        // durable.
        let body = MessageBody::SnapshotResponse {
            index: meta.index,
            next_offset,
            status,
        };
        self.send(leader, body, Dispatch::AfterPersist);
    }
}
