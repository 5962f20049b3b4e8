//! The [`Storage`] trait: where a node keeps its hard state, log and snapshot.
//!
//! # Contract
//! A storage is used by one node at a time, from one thread (the node's driver). Writes
//! (`set_hard_state`, `append`, `truncate_suffix`) may be buffered; they become durable, all
//! of them and in order, when [`Storage::sync`] returns `Ok`. Reads always see every write made
//! so far, synced or not. After a crash, a storage reopened from the same place holds every
//! write made before the last successful `sync`, and of later writes at most a prefix in the
//! order they were made (so the log never has holes).
//!
//! The log is contiguous: it holds the entries `first_index()..=last_index()`, and the entry at
//! `first_index() - 1` is the snapshot's last entry (or the sentinel 0 when there is no
//! snapshot). `first_index() == last_index() + 1` means the log is empty.
//!
//! A sync may also be split in two ([`Storage::start_sync`], [`Storage::finish_sync`]) so
//! that the wait for the device runs on another thread while the node keeps working: the
//! writes made before `start_sync` are durable once `finish_sync` returns `Ok`. At most one
//! started sync is unfinished at a time; any other call (a `sync` too) may come in between.
//!
//! Errors: [`StorageError::NoSpace`] from a write, `sync` or snapshot call leaves what was
//! durable intact and the call may be repeated once space is free (the node pauses and
//! retries). Any other error is fatal for the node: the driver stops and reports it. An
//! implementation must not return `Ok` from `sync` after a failed fsync (it returns
//! [`StorageError::Poisoned`] from then on). Damage found by a read after opening
//! ([`StorageError::Corrupt`]) is fatal too.
//!
//! Memory: the streaming calls (`entries` in bounded ranges, `write_snapshot_chunk`,
//! `read_snapshot`) must not need memory proportional to the log or the snapshot; the
//! convenience calls `save_snapshot` and `snapshot` hold a whole snapshot by design.

pub mod backup;
pub mod file;
pub mod mem;

pub use file::{FileStorage, FileStorageOptions};
pub use mem::MemStorage;

use crate::error::StorageError;
use crate::raft::{Entry, HardState, Index, SnapshotMeta, Term};

/// What a storage holds when it is opened, for the node to resume from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitialState {
    /// Durable term and vote.
    pub hard_state: HardState,
    /// Last entry covered by the durable snapshot (`index == 0` when there is none).
    pub snapshot: SnapshotMeta,
    /// First retained log index (`snapshot.index + 1`).
    pub first_index: Index,
    /// Last log index (`first_index - 1` when the log is empty).
    pub last_index: Index,
    /// Size in bytes of the durable snapshot's content (0 when there is none).
    pub snapshot_size: u64,
}

/// Damage found in the tail of a log and cut off by a storage opened in recovery mode
/// (protocol-aware recovery): entries after `intact_through` were lost, and with them, if
/// `hard_state_lost`, the newest term and vote. The storage records this durably *before* it
/// cuts anything and keeps reporting it until [`Storage::clear_tail_loss`] is synced, so a
/// crash during recovery cannot hide it.
///
/// A node that lost its tail may have acknowledged entries it no longer holds (and may have
/// voted in a term it no longer remembers): the core keeps it from voting, and from counting
/// toward commits, until a leader has brought it back (see
/// [`RaftCore`](crate::raft::RaftCore)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TailLoss {
    /// The last log index known intact (entries after it were cut).
    pub intact_through: Index,
    /// The newest hard state was in the damaged region: the stored term and vote are older
    /// than what the node last promised.
    pub hard_state_lost: bool,
}

/// Bytes a storage keeps on its medium, as it reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistedSize {
    /// Hard state plus the retained log (framing included).
    pub log_bytes: u64,
    /// The current snapshot.
    pub snapshot_bytes: u64,
}

/// The part of a sync that waits for the device, returned by [`Storage::start_sync`]: it may
/// run on any thread, while the storage goes on taking calls on its own; what it returns goes
/// to [`Storage::finish_sync`].
///
/// ```
/// use raftkv::storage::SyncWait;
///
/// let wait = SyncWait::blocking(|| Ok(())); // an fdatasync of a cloned handle, say
/// assert!(wait.blocks());
/// assert!(wait.run().is_ok());
/// assert!(!SyncWait::done().blocks());
/// ```
pub struct SyncWait {
    wait: Option<Box<dyn FnOnce() -> Result<(), StorageError> + Send>>,
}

impl SyncWait {
    /// A wait that blocks (on a device, say): a host runs it off its own thread.
    pub fn blocking(wait: impl FnOnce() -> Result<(), StorageError> + Send + 'static) -> Self {
        SyncWait {
            wait: Some(Box::new(wait)),
        }
    }

    /// Nothing to wait for on a device (an in-memory storage, or nothing new to sync): a host
    /// finishes such a sync at once, without a thread hand-off. The writes are durable once
    /// `finish_sync` returns, as for any split sync.
    pub fn done() -> Self {
        SyncWait { wait: None }
    }

    /// Whether running it blocks (see [`SyncWait::blocking`]).
    pub fn blocks(&self) -> bool {
        self.wait.is_some()
    }

    /// Waits for the device.
    pub fn run(self) -> Result<(), StorageError> {
        match self.wait {
            Some(wait) => wait(),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for SyncWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncWait")
            .field("blocks", &self.blocks())
            .finish()
    }
}

/// A [`Storage`] none of whose methods ever blocks on IO (it keeps everything in memory), so
/// a node may run it on an async executor's own thread
/// ([`Node::start_in_task`](crate::Node::start_in_task)). Implement it only for such a
/// storage: [`MemStorage`] does; [`FileStorage`], whose writes and fsyncs block, does not, so
/// a node on files always gets a thread of its own.
pub trait NonBlockingStorage: Storage {}

impl NonBlockingStorage for MemStorage {}

/// Durable home of a node's Raft state. See the [module docs](self) for the contract.
pub trait Storage: Send + 'static {
    /// What the storage holds now (after recovery, for a storage just opened).
    fn initial_state(&self) -> Result<InitialState, StorageError>;

    /// First retained log index. Entries below it are covered by the snapshot.
    fn first_index(&self) -> Index;

    /// Last log index, or `first_index() - 1` when the log is empty.
    fn last_index(&self) -> Index;

    /// Term of the entry at `index`. `index == first_index() - 1` answers the snapshot's term.
    /// Fails with [`StorageError::Compacted`] below that and [`StorageError::Unavailable`] above
    /// `last_index()`.
    fn term(&self, index: Index) -> Result<Term, StorageError>;

    /// Entries `lo..hi` (half-open), which must lie within `first_index()..=last_index()+1`.
    /// Returns at least one entry when the range is not empty, even if it exceeds `max_bytes`;
    /// otherwise stops before the total [`Entry::size`] would exceed `max_bytes`.
    fn entries(&self, lo: Index, hi: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError>;

    /// Records the hard state (durable at the next `sync`).
    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError>;

    /// Appends contiguous entries. `entries[0].index` must lie in
    /// `first_index()..=last_index() + 1`; every existing entry at or after it is replaced
    /// (the conflicting-suffix truncation of AppendEntries). Durable at the next `sync`.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError>;

    /// Removes the entries at `from` and after (no-op when `from > last_index()`).
    /// `from` must be at least `first_index()`. Durable at the next `sync`.
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError>;

    /// Makes every earlier write durable. A failure is fatal: later calls may return
    /// [`StorageError::Poisoned`].
    fn sync(&mut self) -> Result<(), StorageError>;

    /// Starts making every earlier write durable without waiting for the device: does on
    /// this thread what must be done here (handing buffered bytes to the operating system)
    /// and returns the wait, which the caller runs on any thread and whose result it passes
    /// to [`Storage::finish_sync`]. Meanwhile the storage takes further calls as usual; they
    /// are not covered by this sync. `None` (the default): this storage cannot split its sync,
    /// so the caller uses [`Storage::sync`]. At most one started sync is unfinished at a time.
    fn start_sync(&mut self) -> Result<Option<SyncWait>, StorageError> {
        Ok(None)
    }

    /// Completes the sync last started with [`Storage::start_sync`], whose wait returned
    /// `waited`. After `Ok`, every write made before `start_sync` is durable, as after
    /// [`Storage::sync`]. An error (the wait's own included) is fatal, as from `sync`.
    fn finish_sync(&mut self, waited: Result<(), StorageError>) -> Result<(), StorageError> {
        waited
    }

    /// Writes bytes of a snapshot being received (from the leader, or from this node's own
    /// state machine), in order: `offset == 0` starts snapshot `meta` afresh (discarding any
    /// partial one); otherwise `offset` must equal the bytes written so far for `meta`, or the
    /// call fails with [`StorageError::Invalid`] (a caller bug: the node never skips or
    /// repeats a chunk). After `NoSpace` the same chunk may be written again at the same
    /// offset. The partial snapshot is not visible to readers and need not survive a crash
    /// (the transfer then restarts). Memory use must not grow with the snapshot's size.
    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError>;

    /// Makes the snapshot written with [`Storage::write_snapshot_chunk`] for `meta` the
    /// current one, durably and atomically, before it returns (earlier writes are synced
    /// first). Log entries after `meta.index` are kept if the log holds `(meta.index,
    /// meta.term)`; otherwise the whole log is discarded. Entries at or below `meta.index` are
    /// discarded (so that `first_index() == meta.index + 1` afterwards). A snapshot not newer
    /// than the current one is ignored (a node never moves backwards). If no snapshot was
    /// written for `meta`, the call fails with [`StorageError::Invalid`] and the next snapshot
    /// must start again at offset 0.
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError>;

    /// Reads up to `len` bytes of the current snapshot's content starting at `offset` (fewer
    /// only at the end; none at or past the end). Fails with [`StorageError::Unavailable`]
    /// when there is no snapshot.
    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError>;

    /// Stores a whole snapshot at once: [`Storage::write_snapshot_chunk`] then
    /// [`Storage::install_snapshot`].
    fn save_snapshot(&mut self, meta: SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        self.write_snapshot_chunk(meta, 0, data)?;
        self.install_snapshot(meta)
    }

    /// The durable snapshot, read whole (for tests and small state; nodes stream it with
    /// [`Storage::read_snapshot`]).
    fn snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let init = self.initial_state()?;
        if init.snapshot.index == 0 {
            return Ok(None);
        }
        let size = usize::try_from(init.snapshot_size)
            .map_err(|_| StorageError::Invalid("snapshot too large to read whole".into()))?;
        Ok(Some((init.snapshot, self.read_snapshot(0, size)?)))
    }

    /// Releases space held by log entries at or below `through`, which must not exceed the
    /// snapshot's index (whole segments, say; entries covered by the snapshot are already gone
    /// from the log's view).
    fn compact(&mut self, through: Index) -> Result<(), StorageError>;

    /// Bytes kept on the medium.
    fn persisted_size(&self) -> PersistedSize;

    /// Damage cut from the log's tail at open in recovery mode and not yet repaired (see
    /// [`TailLoss`]). Storages without a recovery mode report `None`.
    fn tail_loss(&self) -> Option<TailLoss> {
        None
    }

    /// The node was brought back after a [`TailLoss`]: forget it (durable at the next `sync`;
    /// until then a reopened storage still reports it).
    fn clear_tail_loss(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Records `loss` durably before returning (so [`Storage::tail_loss`] reports it, across
    /// restarts, until cleared). A node that joins a cluster — or rejoins it after losing its
    /// disk — on an empty storage records `TailLoss { intact_through: 0, hard_state_lost:
    /// true }`: it may be a member the cluster knows, whose votes and acknowledgements it no
    /// longer remembers. Storages that cannot record one refuse with
    /// [`StorageError::Invalid`].
    fn record_tail_loss(&mut self, loss: TailLoss) -> Result<(), StorageError> {
        let _ = loss;
        Err(StorageError::Invalid(
            "this storage cannot record a lost log tail".into(),
        ))
    }
}
