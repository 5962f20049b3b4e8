//! [`PendingSync`] and [`WaitedSync`]: a sync the [`Engine`](super::Engine) started, on its
//! way through the host's fsync thread and back.
//!
//! The split lets a host keep stepping while the device flushes: [`Engine::start_sync`]
//! hands the storage's buffered writes to the operating system and returns the wait;
//! the host runs [`PendingSync::wait`] wherever blocking is allowed, and passes what it
//! returns to [`Engine::finish_sync`] on the engine's thread, which completes the batches
//! written before the start (their acknowledgements leave then, not earlier). Batches
//! handed out meanwhile wait for the next sync.
//!
//! [`Engine::start_sync`]: super::Engine::start_sync
//! [`Engine::finish_sync`]: super::Engine::finish_sync

use crate::error::StorageError;
use crate::storage::SyncWait;

/// A sync started by [`Engine::start_sync`](super::Engine::start_sync): run
/// [`PendingSync::wait`] (off the engine's thread when [`PendingSync::blocks`]), then give
/// the result to [`Engine::finish_sync`](super::Engine::finish_sync).
#[derive(Debug)]
#[must_use = "the batches it covers complete only once it is finished"]
pub struct PendingSync {
    /// Batches handed out when it started (the ones it completes).
    pub(super) batches: u64,
    /// `None`: the storage cannot split its sync; `finish_sync` syncs on the engine's thread.
    pub(super) wait: Option<SyncWait>,
}

impl PendingSync {
    /// Whether [`PendingSync::wait`] blocks on a device. A host runs a blocking wait on a
    /// thread of its own; one that does not (an in-memory storage, or a storage that cannot
    /// split its sync, whose whole sync then runs in `finish_sync`) it finishes at once.
    pub fn blocks(&self) -> bool {
        self.wait.as_ref().is_some_and(SyncWait::blocks)
    }

    /// Waits for the device (on any thread).
    pub fn wait(self) -> WaitedSync {
        WaitedSync {
            batches: self.batches,
            waited: self.wait.map(SyncWait::run),
        }
    }
}

/// What [`PendingSync::wait`] returned, for [`Engine::finish_sync`](super::Engine::finish_sync).
#[derive(Debug)]
#[must_use = "the batches it covers complete only once it is finished"]
pub struct WaitedSync {
    pub(super) batches: u64,
    pub(super) waited: Option<Result<(), StorageError>>,
}
