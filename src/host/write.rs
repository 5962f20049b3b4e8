//! Writing the durable part of a [`Ready`] to storage, in the one order that is right for
//! every combination of its parts.

use crate::error::StorageError;
use crate::raft::Ready;
use crate::storage::Storage;

/// How far [`write_ready`] got with one batch, so that a retry after a full disk resumes
/// where it stopped instead of rewriting snapshot chunks the storage already took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteProgress {
    hard_state: bool,
    chunks: usize,
    installed: bool,
    entries: bool,
    tail_loss_cleared: bool,
}

/// Writes the durable part of `ready` to storage (not synced, except that installing a
/// snapshot syncs), in this order:
///
/// 1. the hard state;
/// 2. received snapshot chunks, in order;
/// 3. the snapshot install — it replaces the stored log, so it must come before
/// 4. the entries, which all follow the installed snapshot when there is one;
/// 5. the end of a tail-loss recovery, after the entries it depends on (a storage keeps a
///    prefix of its writes in order, so the record is never durable without them).
///
/// On an error, `progress` records what was done; calling again with it resumes (the hard
/// state and the entries are simply written again if they had not completed: both overwrite
/// themselves).
pub fn write_ready<S: Storage>(
    storage: &mut S,
    ready: &Ready,
    progress: &mut WriteProgress,
) -> Result<(), StorageError> {
    if !progress.hard_state {
        if let Some(hs) = ready.hard_state {
            storage.set_hard_state(hs)?;
        }
        progress.hard_state = true;
    }
    for chunk in &ready.snapshot_chunks[progress.chunks..] {
        storage.write_snapshot_chunk(chunk.meta, chunk.offset, chunk.data.as_bytes())?;
        progress.chunks += 1;
    }
    if let (Some(meta), false) = (ready.install_snapshot, progress.installed) {
        storage.install_snapshot(meta)?;
        progress.installed = true;
    }
    if !progress.entries {
        storage.append(&ready.entries)?;
        progress.entries = true;
    }
    if ready.tail_loss_repaired && !progress.tail_loss_cleared {
        storage.clear_tail_loss()?;
        progress.tail_loss_cleared = true;
    }
    Ok(())
}
