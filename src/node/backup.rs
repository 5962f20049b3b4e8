//! [`Node::backup`]: a consistent, checksummed backup of a running node, streamed without
//! stopping it (the format, [`verify`](crate::storage::backup::verify) and
//! [`restore`](crate::storage::backup::restore) are in [`crate::storage::backup`]).
//!
//! # How
//! 1. A linearizable read barrier ([`Node::read`]): afterwards this node has applied every
//!    entry committed before the call — every write acknowledged before it, on any node.
//! 2. The node's stored snapshot must cover at least that index: if it does not, the node
//!    thread takes one now (as [`Node::snapshot`] does, compacting the log behind it), or
//!    waits for the one in progress and is asked again.
//! 3. The snapshot's bytes are read twice, a bounded chunk at a time through the node's
//!    inbox (as a leader reads them to send a snapshot): once for its size and checksum, which
//!    go into the header, then for the stream itself, whose checksum is verified again at the
//!    end. Each read names the snapshot it wants; if the node has replaced it meanwhile (a
//!    newer local snapshot, or one from the leader), the backup fails with
//!    [`BackupError::Replaced`] rather than mix two states (step 3's first pass retries by
//!    itself).
//!
//! The node goes on serving throughout: the backup costs a snapshot (if none is recent
//! enough) and reads of it interleaved with the node's other work. Memory is one chunk.
//!
//! The node thread's part is one `Command` variant, `backup::Request`, handled in `worker.rs`.

use futures::channel::oneshot;

use super::{Command, Node};
use crate::error::ProposeError;
use crate::raft::{Index, Payload, SnapshotMeta};
use crate::storage::backup::{BackupError, BackupInfo, BACKUP_CHUNK};
use crate::storage::Storage;

/// Attempts at a backup whose snapshot keeps being replaced, or that waits for a snapshot.
const ATTEMPTS: u32 = 20;

/// What the node thread is asked for a backup.
pub(super) enum Request {
    /// Make sure the stored snapshot covers `at_least`: answered with the stored snapshot
    /// when it does, when the snapshot this started (or one already in progress) is
    /// installed (it may still fall short: ask again), or with `None` when none can be taken
    /// now (a leader's snapshot is being received).
    Snapshot {
        at_least: Index,
        reply: oneshot::Sender<Option<SnapshotMeta>>,
    },
    /// Bytes `offset..offset + len` of the stored snapshot if it is still `meta`, with its
    /// size.
    Read {
        meta: SnapshotMeta,
        offset: u64,
        len: usize,
        reply: oneshot::Sender<Result<(Vec<u8>, u64), BackupError>>,
    },
}

/// The node thread's answer to [`Request::Read`].
pub(super) fn serve_read<S: Storage>(
    storage: &S,
    meta: SnapshotMeta,
    offset: u64,
    len: usize,
    reply: oneshot::Sender<Result<(Vec<u8>, u64), BackupError>>,
) {
    let read = (|| {
        let init = storage.initial_state()?;
        if init.snapshot != meta {
            return Err(BackupError::Replaced);
        }
        Ok((storage.read_snapshot(offset, len)?, init.snapshot_size))
    })();
    let _ = reply.send(read);
}

/// A backup being streamed from a node: the header first, then the snapshot's content. Get
/// the bytes with [`Backup::next_chunk`] (or [`Backup::write_to`]) and store them anywhere;
/// [`restore`](crate::storage::backup::restore) bootstraps a node from them.
pub struct Backup<O> {
    node: Node<O>,
    info: BackupInfo,
    header_sent: bool,
    offset: u64,
    hasher: crc32fast::Hasher,
    finished: bool,
}

impl<O: Send + 'static> Node<O> {
    /// Takes a backup of this node's state at a committed index that includes every write
    /// acknowledged (by any node of the cluster) before the call, without stopping the node.
    /// Works on followers too. See [`Backup`] for the stream and the
    /// [module docs](crate::node::backup) for how it stays consistent.
    ///
    /// Fails with [`BackupError::Node`] when the node cannot confirm what is committed (no
    /// leader, a timeout, shut down), and with [`BackupError::Replaced`] when its snapshot
    /// keeps being replaced faster than it can be read.
    pub async fn backup(&self) -> Result<Backup<O>, BackupError> {
        for _ in 0..ATTEMPTS {
            // The barrier (also the pause between attempts: one heartbeat round).
            match self.read(Payload::from(Vec::new())).await {
                Ok(_) | Err(ProposeError::Unsupported) => {}
                Err(e) => return Err(BackupError::Node(e)),
            }
            let target = self.status().raft.applied_index;
            let stored = self
                .ask(|reply| Request::Snapshot {
                    at_least: target,
                    reply,
                })
                .await?;
            let Some(meta) = stored.filter(|m| m.index >= target && m.index > 0) else {
                continue;
            };
            match self.checksum(meta).await {
                Ok((size, checksum)) => {
                    return Ok(Backup {
                        node: self.clone(),
                        info: BackupInfo {
                            node_id: self.id(),
                            meta,
                            size,
                            checksum,
                        },
                        header_sent: false,
                        offset: 0,
                        hasher: crc32fast::Hasher::new(),
                        finished: false,
                    })
                }
                Err(BackupError::Replaced) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(BackupError::Replaced)
    }

    /// Sends `request` to the node thread and waits for its answer.
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, BackupError> {
        let (tx, rx) = oneshot::channel();
        self.handle
            .send(Command::Backup(request(tx)))
            .map_err(BackupError::Node)?;
        rx.await
            .map_err(|_| BackupError::Node(ProposeError::Shutdown))
    }

    /// Bytes `offset..` (at most one chunk) of the stored snapshot `meta`, and its size.
    async fn read_chunk(
        &self,
        meta: SnapshotMeta,
        offset: u64,
    ) -> Result<(Vec<u8>, u64), BackupError> {
        self.ask(|reply| Request::Read {
            meta,
            offset,
            len: BACKUP_CHUNK,
            reply,
        })
        .await?
    }

    /// Size and crc32 of the stored snapshot `meta`, read a chunk at a time.
    async fn checksum(&self, meta: SnapshotMeta) -> Result<(u64, u32), BackupError> {
        let mut hasher = crc32fast::Hasher::new();
        let mut offset = 0;
        loop {
            let (data, size) = self.read_chunk(meta, offset).await?;
            hasher.update(&data);
            offset += data.len() as u64;
            if offset >= size || data.is_empty() {
                if offset != size {
                    return Err(BackupError::Replaced);
                }
                return Ok((size, hasher.finalize()));
            }
        }
    }
}

impl<O: Send + 'static> Backup<O> {
    /// What the backup holds (its header).
    pub fn info(&self) -> BackupInfo {
        self.info
    }

    /// The next bytes of the backup — its 64-byte header first, then the content a chunk at
    /// a time — or `None` once all were returned (the content's checksum verified again).
    /// Fails with [`BackupError::Replaced`] if the node replaced the snapshot meanwhile
    /// (take the backup again).
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, BackupError> {
        if !self.header_sent {
            self.header_sent = true;
            return Ok(Some(self.info.encode_header().to_vec()));
        }
        if self.finished {
            return Ok(None);
        }
        if self.offset >= self.info.size {
            if self.hasher.clone().finalize() != self.info.checksum {
                return Err(BackupError::Replaced);
            }
            self.finished = true;
            return Ok(None);
        }
        let (data, size) = self.node.read_chunk(self.info.meta, self.offset).await?;
        if size != self.info.size || data.is_empty() {
            return Err(BackupError::Replaced);
        }
        self.hasher.update(&data);
        self.offset += data.len() as u64;
        Ok(Some(data))
    }

    /// Writes the whole backup to `out` and flushes it. `out` is written from the calling
    /// task: give it a file or buffer whose writes do not block for long.
    pub async fn write_to(
        mut self,
        out: &mut impl std::io::Write,
    ) -> Result<BackupInfo, BackupError> {
        while let Some(chunk) = self.next_chunk().await? {
            out.write_all(&chunk)?;
        }
        out.flush()?;
        Ok(self.info)
    }
}
