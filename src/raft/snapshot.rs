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
//!
//! A transfer belongs to the leader of one term: the follower keeps it in its role state,
//! which a term change replaces, so chunks of two leaders are never spliced into one file. It
//! is dropped when it can no longer be useful — the log already reached the snapshot by
//! appends, or no chunk came for an election timeout — so an abandoned transfer never blocks
//! local snapshots.
//!
//! When the last chunk arrives there are two cases, and one rule:
//! - the log already holds the snapshot's last entry: it matches the leader's log through
//!   that point, so only the commit index moves (nothing is installed, nothing of the log is
//!   thrown away — entries stepped in the same batch stay);
//! - otherwise the snapshot replaces the whole log; every entry stepped after it follows it,
//!   and the host writes those only after the install (see [`Ready`](super::Ready)).

use super::core::{Dispatch, RaftCore};
use super::progress::ProgressState;
use super::ready::{SnapshotChunk, SnapshotChunkRequest};
use super::role::RoleState;
use super::{AppendResponse, Index, MessageBody, NodeId, Payload, SnapshotMeta, SnapshotStatus};
use crate::error::InvalidSnapshot;

/// A transfer in progress on the receiving side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Incoming {
    pub(super) meta: SnapshotMeta,
    pub(super) size: u64,
    pub(super) next_offset: u64,
    /// Ticks since the last chunk.
    pub(super) idle_ticks: u32,
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
        if let Some(l) = self.leader_mut() {
            for p in l.progress.values_mut() {
                if p.state == ProgressState::Snapshot {
                    p.become_snapshot(meta, size);
                }
            }
        }
        Ok(())
    }

    /// True while a snapshot from the leader is partly received.
    pub fn receiving_snapshot(&self) -> bool {
        matches!(&self.state, RoleState::Follower(f) if f.incoming.is_some())
    }

    /// Follower: drops a transfer the log has overtaken (the leader caught us up with
    /// appends past it).
    pub(super) fn snapshot_overtaken(&mut self) {
        let commit = self.log.commit();
        let held = |meta: SnapshotMeta, log: &super::RaftLog| {
            meta.index <= commit || log.matches(meta.index, meta.term)
        };
        let log = &self.log;
        if let RoleState::Follower(f) = &mut self.state {
            if f.incoming.is_some_and(|i| held(i.meta, log)) {
                f.incoming = None;
            }
        }
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
        if let Some(p) = self.leader_mut().and_then(|l| l.progress.get_mut(&to)) {
            p.become_snapshot(meta, size);
        }
    }

    /// Leader: true if a chunk may go to a follower in snapshot mode.
    pub(super) fn wants_snapshot_chunk(&self, to: NodeId) -> bool {
        let Some(t) = self.progress(to).and_then(|p| p.transfer) else {
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
        let Some(t) = self
            .leader_mut()
            .and_then(|l| l.progress.get_mut(&to))
            .and_then(|p| p.transfer.as_mut())
        else {
            return;
        };
        let len = chunk.min(t.size - t.sent);
        let request = SnapshotChunkRequest {
            to,
            term,
            meta: t.meta,
            size: t.size,
            offset: t.sent,
            len,
        };
        t.sent += len;
        t.started = true;
        self.snapshot_requests.push(request);
    }

    /// Leader: a follower answered a chunk.
    pub(super) fn handle_snapshot_response(
        &mut self,
        from: NodeId,
        index: Index,
        next_offset: u64,
        status: SnapshotStatus,
    ) {
        let chunk = self.cfg.snapshot_chunk_bytes;
        let Some(p) = self.leader_mut().and_then(|l| l.progress.get_mut(&from)) else {
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
                let at = next_offset.min(t.size);
                if at == t.resumed_at && t.stale_refusals > 0 {
                    // A chunk sent before the transfer resumed here, refused on arrival:
                    // resuming again would send the same chunks twice more.
                    t.stale_refusals -= 1;
                } else {
                    t.resume_at(at, chunk, true);
                }
            }
        }
    }

    /// Leader, on the first heartbeat answer after a periodic heartbeat from a follower in
    /// snapshot mode: if nothing was acknowledged over the whole interval before that
    /// heartbeat nor since, the chunks in flight are presumed lost and the transfer resumes
    /// from the last acknowledged byte.
    pub(super) fn check_snapshot_progress(&mut self, from: NodeId) {
        let chunk = self.cfg.snapshot_chunk_bytes;
        let Some(t) = self
            .leader_mut()
            .and_then(|l| l.progress.get_mut(&from))
            .and_then(|p| p.transfer.as_mut())
        else {
            return;
        };
        if t.stalled
            && t.acked == t.acked_at_heartbeat
            && (t.sent > t.acked || (t.started && t.size == 0))
        {
            let at = t.acked;
            t.resume_at(at, chunk, false);
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
        let commit = self.log.commit();
        let holds_last_entry = self.log.matches(meta.index, meta.term);
        let install_pending = self.install_snapshot.is_some();
        let Some(f) = self.follower_mut() else { return };
        if meta.index <= commit {
            // Old or duplicate: we already have all of it; tell the leader where we are.
            f.incoming = None;
            let body = MessageBody::AppendResponse(AppendResponse::Accepted {
                match_index: commit,
            });
            self.send(leader, body, Dispatch::AfterPersist);
            return;
        }
        if install_pending {
            // A snapshot completed in this batch and is not handed out yet: its install must
            // reach storage before another transfer's chunks do. Dropped, as if lost; the
            // leader sends it again.
            return;
        }
        if holds_last_entry {
            // The log already reached the snapshot (appends got there first): it matches the
            // leader's through there, so the rest of the transfer is moot. Only the commit
            // index moves, and the leader learns it can go on with appends. (Answering only
            // the last chunk so would loop: the partial copy is dropped once the log holds
            // its last entry, every later chunk is refused, and the leader starts over.)
            f.incoming = None;
            self.log.commit_to(meta.index);
            let body = MessageBody::SnapshotResponse {
                index: meta.index,
                next_offset: size,
                status: SnapshotStatus::Installed,
            };
            self.send(leader, body, Dispatch::AfterPersist);
            return;
        }
        let expected = match f.incoming {
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
        let status = if next_offset < size {
            f.incoming = Some(Incoming {
                meta,
                size,
                next_offset,
                idle_ticks: 0,
            });
            self.snapshot_chunks.push(SnapshotChunk {
                meta,
                size,
                offset,
                data,
            });
            SnapshotStatus::Accepted
        } else {
            f.incoming = None;
            self.snapshot_chunks.push(SnapshotChunk {
                meta,
                size,
                offset,
                data,
            });
            self.log.replace_with_snapshot(meta);
            self.snapshot_size = size;
            self.install_snapshot = Some(meta);
            SnapshotStatus::Installed
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
