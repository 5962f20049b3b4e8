//! Snapshots on the host's side: answering a leader's chunk requests from storage, restoring
//! a state machine from the stored snapshot, and taking local snapshots when the log grows
//! past a bound.

use std::io::{self, Read};

use crate::error::StorageError;
use crate::raft::{
    Membership, Message, NodeId, Payload, RaftCore, SnapshotChunkRequest, SnapshotHeader,
    SnapshotMeta,
};
use crate::state_machine::StateMachine;
use crate::storage::Storage;

/// Bytes per read when streaming a stored snapshot into a state machine.
const RESTORE_READ_BYTES: usize = 256 << 10;

/// Reads the requested snapshot chunks from storage and builds the messages carrying them.
/// Requests for a snapshot that is no longer the stored one are skipped (the core restarts
/// those transfers with the new snapshot).
pub fn snapshot_messages<S: Storage>(
    storage: &S,
    from: NodeId,
    requests: Vec<SnapshotChunkRequest>,
) -> Result<Vec<Message>, StorageError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let current = storage.initial_state()?.snapshot;
    let mut out = Vec::with_capacity(requests.len());
    for r in requests {
        if r.meta != current {
            continue;
        }
        let len =
            usize::try_from(r.len).map_err(|_| StorageError::Invalid("chunk too large".into()))?;
        let data = storage.read_snapshot(r.offset, len)?;
        out.push(r.into_message(from, Payload::from(data)));
    }
    Ok(out)
}

/// Streams the stored snapshot into `machine` (replacing its state), after the
/// configuration header it begins with, if any ([`SnapshotHeader`]).
pub fn restore_machine<S: Storage, M: StateMachine>(
    storage: &S,
    machine: &mut M,
    size: u64,
) -> io::Result<()> {
    let (_, image_at) = read_header(storage).map_err(io::Error::other)?;
    let mut reader = SnapshotReader {
        storage,
        offset: image_at,
        size,
        buf: Vec::new(),
        pos: 0,
    };
    machine.restore(&mut reader)
}

/// The configuration the stored snapshot carries (if it begins with a header), and where the
/// state machine's image starts in it.
pub fn read_header<S: Storage>(storage: &S) -> Result<(Option<Membership>, u64), StorageError> {
    if storage.initial_state()?.snapshot.index == 0 {
        return Ok((None, 0));
    }
    let prefix = storage.read_snapshot(0, SnapshotHeader::PREFIX)?;
    let Some(len) = SnapshotHeader::payload_len(&prefix) else {
        return Ok((None, 0));
    };
    let payload = storage.read_snapshot(SnapshotHeader::PREFIX as u64, len)?;
    match SnapshotHeader::decode(&payload) {
        Some(m) if payload.len() == len => Ok((Some(m), (SnapshotHeader::PREFIX + len) as u64)),
        _ => Err(StorageError::Invalid(
            "the stored snapshot's configuration header does not decode".into(),
        )),
    }
}

/// `Read` over the stored snapshot, a bounded buffer at a time.
struct SnapshotReader<'a, S> {
    storage: &'a S,
    offset: u64,
    size: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<S: Storage> Read for SnapshotReader<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.offset >= self.size {
                return Ok(0);
            }
            self.buf = self
                .storage
                .read_snapshot(self.offset, RESTORE_READ_BYTES)
                .map_err(io::Error::other)?;
            if self.buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "snapshot shorter than its size",
                ));
            }
            self.offset += self.buf.len() as u64;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// When to take a local snapshot, and the one being written.
///
/// A snapshot is due once the committed part of the log the core retains beyond its snapshot
/// holds more than `max_log_bytes` ([`Entry::size`](crate::raft::Entry::size)) — what a
/// snapshot can compact, so one is never due when it would free little — and something was
/// applied since the last. The core itself takes on no more log at twice the bound
/// ([`RaftCore::set_log_limit`]), which bounds what arrives while a snapshot is written.
#[derive(Clone, Debug)]
pub struct SnapshotPolicy {
    /// Take a snapshot once the committed retained log holds more than this many bytes
    /// (`None`: never automatically). A storage that frees whole segments may keep up to a segment beyond
    /// what the core retains.
    pub max_log_bytes: Option<u64>,
    /// A local snapshot being written: its meta and the bytes stored so far.
    in_progress: Option<(SnapshotMeta, u64)>,
    /// Local snapshots completed.
    pub taken: u64,
    /// Snapshots received from a leader and installed.
    pub installed: u64,
}

impl SnapshotPolicy {
    /// A policy with the given bound.
    pub fn new(max_log_bytes: Option<u64>) -> Self {
        SnapshotPolicy {
            max_log_bytes,
            in_progress: None,
            taken: 0,
            installed: 0,
        }
    }

    /// The snapshot to take now, if any: when forced or when the log is over its bound, no
    /// snapshot is being written or received, and something was applied since the last one.
    pub fn due(&self, core: &RaftCore, force: bool) -> Option<SnapshotMeta> {
        if self.in_progress.is_some() || core.receiving_snapshot() {
            return None;
        }
        let log = core.log();
        let applied = log.applied();
        let base = log.snapshot().index;
        if applied <= base {
            return None;
        }
        let over = self
            .max_log_bytes
            .is_some_and(|max| log.committed_bytes() > max);
        if !(force || over) {
            return None;
        }
        let term = core.log().term(applied)?;
        Some(SnapshotMeta {
            index: applied,
            term,
        })
    }

    /// Records that a local snapshot of `meta` starts being written.
    pub fn started(&mut self, meta: SnapshotMeta) {
        self.in_progress = Some((meta, 0));
    }

    /// A leader's snapshot is being received: the local one in progress is abandoned (both
    /// write through the storage's single incoming-snapshot slot).
    pub fn abandon(&mut self) {
        self.in_progress = None;
    }

    /// True while a local snapshot is being written.
    pub fn in_progress(&self) -> Option<SnapshotMeta> {
        self.in_progress.map(|(m, _)| m)
    }

    /// Writes the next serialized bytes of the local snapshot `meta` (ignored if abandoned).
    pub fn write<S: Storage>(
        &mut self,
        storage: &mut S,
        meta: SnapshotMeta,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let Some((m, written)) = self.in_progress.as_mut() else {
            return Ok(());
        };
        if *m != meta {
            return Ok(());
        }
        storage.write_snapshot_chunk(meta, *written, data)?;
        *written += data.len() as u64;
        Ok(())
    }

    /// The local snapshot `meta` is fully serialized: installs it, tells the core, compacts
    /// the storage's log. Returns false if it had been abandoned.
    pub fn finish<S: Storage>(
        &mut self,
        storage: &mut S,
        core: &mut RaftCore,
        meta: SnapshotMeta,
    ) -> Result<bool, StorageError> {
        let Some((m, written)) = self.in_progress else {
            return Ok(false);
        };
        if m != meta {
            return Ok(false);
        }
        self.in_progress = None;
        if core.receiving_snapshot() || meta.index <= core.log().snapshot().index {
            return Ok(false);
        }
        if written == 0 {
            storage.write_snapshot_chunk(meta, 0, &[])?;
        }
        storage.install_snapshot(meta)?;
        core.snapshot_saved(meta, written)
            .map_err(|e| StorageError::Invalid(e.to_string()))?;
        storage.compact(meta.index)?;
        self.taken += 1;
        Ok(true)
    }
}
