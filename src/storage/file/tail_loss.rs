//! The tail-loss file: the durable record that recovery mode cut damaged records off the log
//! (see [`TailLoss`]).
//!
//! # On-disk format (version 2)
//! `<dir>/tail-loss`, exactly 64 bytes, the common header (see `header.rs`) with:
//! ```text
//!   0..8    magic  b"RKVLOSS\x01"
//!   32..40  intact_through (u64): the last index the cut log holds
//!   40..48  hard state term (u64): the newest hard state recovery knew of
//!   48..56  hard state vote (u64; 0 = none)
//!   56      hard_state_lost (0 or 1)
//!   57..60  zero
//! ```
//!
//! # Rules
//! - It is written as `tail-loss.tmp`, fdatasynced, renamed and the directory fsynced
//!   *before* recovery changes anything, so a crash in the middle of a recovery cannot hide
//!   the loss: the next open reads it back (and, if the damage is still there, merges the
//!   new loss into it: the smaller `intact_through`, either `hard_state_lost`, the hard state
//!   kept this time).
//! - While it exists the storage reports it ([`Storage::tail_loss`]). The hard state it
//!   records is what that recovery kept, for operators (`inspect`) and for a directory left
//!   with no segment at all; the log itself carries the kept hard state (the cut writes it
//!   as a record before the cut becomes visible).
//! - [`Storage::clear_tail_loss`] removes it at the next sync (remove, fsync the directory).
//! - A damaged tail-loss file is refused ([`StorageError::Corrupt`]); in recovery mode it is
//!   replaced by the most conservative loss (everything after the snapshot, and the hard
//!   state, lost).
//!
//! [`Storage::tail_loss`]: crate::storage::Storage::tail_loss
//! [`Storage::clear_tail_loss`]: crate::storage::Storage::clear_tail_loss

use std::path::Path;

use super::header;
use super::segment::read_u64;
use super::vfs::{io_error, Vfs};
use crate::error::StorageError;
use crate::raft::HardState;
use crate::storage::TailLoss;

/// Name of the tail-loss file.
pub(crate) const TAIL_LOSS_NAME: &str = "tail-loss";
/// Name it is written under before the rename.
pub(crate) const TAIL_LOSS_TEMP_NAME: &str = "tail-loss.tmp";
const MAGIC: [u8; 8] = *b"RKVLOSS\x01";

/// What the tail-loss file records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordedLoss {
    pub loss: TailLoss,
    /// The newest hard state recovery knew of when it cut the log.
    pub hard_state: HardState,
}

impl RecordedLoss {
    /// Both losses at once: the smaller intact prefix, either hard state loss, and `later`'s
    /// hard state (the one recovery kept this time; a storage's hard state is whatever was
    /// last written, so an older one never wins).
    pub(crate) fn merge_keeping(self, later: RecordedLoss) -> RecordedLoss {
        RecordedLoss {
            loss: TailLoss {
                intact_through: self.loss.intact_through.min(later.loss.intact_through),
                hard_state_lost: self.loss.hard_state_lost || later.loss.hard_state_lost,
            },
            hard_state: later.hard_state,
        }
    }

    fn encode(&self, cluster_id: u64, node_id: u64) -> [u8; header::LEN] {
        let mut h = header::begin(&MAGIC, cluster_id, node_id);
        h[32..40].copy_from_slice(&self.loss.intact_through.to_le_bytes());
        h[40..48].copy_from_slice(&self.hard_state.term.to_le_bytes());
        h[48..56].copy_from_slice(&self.hard_state.vote.unwrap_or(0).to_le_bytes());
        h[56] = u8::from(self.loss.hard_state_lost);
        header::seal(&mut h);
        h
    }
}

/// Reads and checks the tail-loss file at `path`.
pub(crate) fn read_tail_loss(
    vfs: &dyn Vfs,
    path: &Path,
    cluster_id: u64,
    node_id: u64,
) -> Result<RecordedLoss, StorageError> {
    let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let file = vfs.open(path).map_err(|e| io_error("open", path, e))?;
    let len = file.len().map_err(|e| io_error("stat", path, e))?;
    if len != header::LEN as u64 {
        return Err(corrupt(
            len.min(header::LEN as u64),
            format!("tail-loss file is {len} bytes, not {}", header::LEN),
        ));
    }
    let mut h = [0u8; header::LEN];
    file.read_at(&mut h, 0)
        .map_err(|e| io_error("read", path, e))?;
    let h = header::check(&h, &MAGIC, "tail-loss", path)?;
    let identity = (read_u64(h, 16).unwrap_or(0), read_u64(h, 24).unwrap_or(0));
    if identity != (cluster_id, node_id) {
        return Err(StorageError::WrongIdentity {
            path: path.to_path_buf(),
            reason: format!(
                "cluster {} node {}, expected cluster {cluster_id} node {node_id}",
                identity.0, identity.1
            ),
        });
    }
    if h[56] > 1 || h[57..60].iter().any(|&b| b != 0) {
        return Err(corrupt(56, "tail-loss flags out of range".into()));
    }
    Ok(RecordedLoss {
        loss: TailLoss {
            intact_through: read_u64(h, 32).unwrap_or(0),
            hard_state_lost: h[56] == 1,
        },
        hard_state: HardState {
            term: read_u64(h, 40).unwrap_or(0),
            vote: Some(read_u64(h, 48).unwrap_or(0)).filter(|&v| v != 0),
        },
    })
}

/// Makes `loss` the durable content of `<dir>/tail-loss` (temp file, fdatasync, rename,
/// directory fsync).
pub(crate) fn write_tail_loss(
    vfs: &dyn Vfs,
    dir: &Path,
    loss: &RecordedLoss,
    cluster_id: u64,
    node_id: u64,
) -> Result<(), StorageError> {
    let temp = dir.join(TAIL_LOSS_TEMP_NAME);
    let path = dir.join(TAIL_LOSS_NAME);
    let file = vfs
        .create(&temp)
        .map_err(|e| io_error("create", &temp, e))?;
    file.write_at(&loss.encode(cluster_id, node_id), 0)
        .map_err(|e| io_error("write", &temp, e))?;
    file.sync_data().map_err(|e| io_error("fsync", &temp, e))?;
    drop(file);
    vfs.rename(&temp, &path)
        .map_err(|e| io_error("rename", &temp, e))?;
    vfs.sync_dir(dir).map_err(|e| io_error("fsync dir", dir, e))
}

/// Removes `<dir>/tail-loss` durably.
pub(crate) fn remove_tail_loss(vfs: &dyn Vfs, dir: &Path) -> Result<(), StorageError> {
    let path = dir.join(TAIL_LOSS_NAME);
    vfs.remove(&path)
        .map_err(|e| io_error("remove", &path, e))?;
    vfs.sync_dir(dir).map_err(|e| io_error("fsync dir", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::sim::SimDisk;

    #[test]
    fn a_loss_round_trips_merges_and_refuses_damage() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        let loss = RecordedLoss {
            loss: TailLoss {
                intact_through: 17,
                hard_state_lost: false,
            },
            hard_state: HardState {
                term: 4,
                vote: Some(2),
            },
        };
        write_tail_loss(&disk, dir, &loss, 1, 2).unwrap();
        let path = dir.join(TAIL_LOSS_NAME);
        assert_eq!(read_tail_loss(&disk, &path, 1, 2).unwrap(), loss);
        assert!(matches!(
            read_tail_loss(&disk, &path, 1, 3),
            Err(StorageError::WrongIdentity { .. })
        ));
        let bytes = disk.read(&path).unwrap();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            disk.write_durable(&path, &bad);
            assert!(read_tail_loss(&disk, &path, 1, 2).is_err(), "flip at {at}");
        }
        let other = RecordedLoss {
            loss: TailLoss {
                intact_through: 9,
                hard_state_lost: true,
            },
            hard_state: HardState {
                term: 4,
                vote: None,
            },
        };
        let merged = loss.merge_keeping(other);
        assert_eq!(merged.loss.intact_through, 9);
        assert!(merged.loss.hard_state_lost);
        assert_eq!(merged.hard_state, other.hard_state, "the later recovery's");
    }
}
