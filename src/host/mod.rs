//! Hosting a [`RaftCore`](crate::raft::RaftCore): everything between the core's output and
//! the outside world — storage writes and syncs, the state machine, snapshots, proposals and
//! reads waiting for their answers.
//!
//! [`Engine`] is the one implementation of it. The [`Node`](crate::Node) driver, the
//! simulated [`Cluster`](crate::testing::Cluster) and the scripted
//! [`Lockstep`](crate::testing::Lockstep) harness all drive their cores through it; they differ
//! only in how messages travel, when fsyncs complete and how time passes. A host of your own
//! (your own threads and IO around the public core, as with raft-rs's `RawNode`) can use it
//! too, or the pieces below.
//!
//! - [`write_ready`]: the durable part of a [`Ready`](crate::raft::Ready), in the right order;
//! - [`snapshot_messages`], [`restore_machine`]: a stored snapshot sent in chunks, or
//!   restored into a state machine;
//! - [`SnapshotPolicy`]: when to take a local snapshot, and the one being written;
//! - [`start_core`], [`distrust_empty_storage`], [`holds_nothing`]: a core restored from its
//!   storage, where an empty storage starts as a lost disk would.

mod engine;
mod events;
mod snapshot;
mod sync;
mod write;

pub use engine::{Engine, Host, Observed};
pub use events::EngineCounters;
pub use snapshot::{read_header, restore_machine, snapshot_messages, SnapshotPolicy};
pub use sync::{PendingSync, WaitedSync};
pub use write::{write_ready, WriteProgress};

use crate::error::StorageError;
use crate::raft::{Config, RaftCore};
use crate::storage::{InitialState, Storage, TailLoss};

/// The loss an empty storage starts with: everything, term and vote included.
const EVERYTHING: TailLoss = TailLoss {
    intact_through: 0,
    hard_state_lost: true,
};

/// Restores a core from `storage` as a host starts a node: with
/// [`distrust_empty_storage`] first, unless `trust_empty` says the storage is known to be
/// new, then [`RaftCore::from_storage`]. A storage that cannot record a loss
/// ([`Storage::record_tail_loss`] refuses) still starts in recovery; only its record does
/// not outlive the process, so such a storage is checked again at its next start while it
/// is still empty.
pub fn start_core<S: Storage>(
    cfg: Config,
    storage: &mut S,
    trust_empty: bool,
) -> Result<RaftCore, StorageError> {
    let distrusted = !trust_empty && distrust_empty_storage(storage)?;
    let mut core = RaftCore::from_storage(cfg, storage)?;
    if distrusted && core.recovering().is_none() && storage.tail_loss().is_none() {
        core.recover_from(EVERYTHING);
    }
    Ok(core)
}

/// Whether a storage in state `init` holds nothing at all: no term, no vote, no entry, no
/// snapshot. A vote at term 0 is the mark a finished empty-storage check leaves (see
/// [`distrust_empty_storage`]), so a storage that passed the check is not "nothing" again.
///
/// ```
/// use raftkv::storage::{MemStorage, Storage};
/// let storage = MemStorage::new();
/// assert!(raftkv::host::holds_nothing(&storage.initial_state().unwrap()));
/// ```
pub fn holds_nothing(init: &InitialState) -> bool {
    init.last_index == 0
        && init.snapshot.index == 0
        && init.hard_state.term == 0
        && init.hard_state.vote.is_none()
}

/// Marks an empty `storage` (no term, no vote, no entry, no snapshot, no loss recorded) as
/// having lost everything — [`TailLoss`] `{ intact_through: 0, hard_state_lost: true }`,
/// recorded durably where the storage can ([`Storage::record_tail_loss`]) — and returns
/// true; leaves any other storage alone and returns false. [`start_core`] calls it.
///
/// A node that lost its disk and restarts under its old id cannot tell itself from a member
/// of a new cluster; taking part at once could make it vote twice in a term. Marked, it asks
/// every voter for its term first: in a new cluster all say "nothing held" and it goes on
/// after that one round trip; a lost disk learns the cluster's term and is caught up before
/// it votes (see [`RaftCore::recover_from`]). Skip it only for a storage known never to
/// have held state under this node id.
pub fn distrust_empty_storage<S: Storage + ?Sized>(storage: &mut S) -> Result<bool, StorageError> {
    if !holds_nothing(&storage.initial_state()?) || storage.tail_loss().is_some() {
        return Ok(false);
    }
    match storage.record_tail_loss(EVERYTHING) {
        // A storage without a recovery mode: the loss is known to this start only.
        Ok(()) | Err(StorageError::Invalid(_)) => Ok(true),
        Err(e) => Err(e),
    }
}
