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
//! Any error from a write or from `sync` is fatal for the node: the driver stops and reports it.
//! An implementation must not return `Ok` from `sync` after a failed fsync.

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
}

/// Bytes a storage keeps on its medium, as it reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistedSize {
    /// Hard state plus the retained log (framing included).
    pub log_bytes: u64,
    /// The current snapshot.
    pub snapshot_bytes: u64,
}

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

    /// Stores a snapshot covering the log through `meta.index`, durably and atomically, before
    /// it returns. Log entries after `meta.index` whose term matches are kept; if the log does
    /// not contain `(meta.index, meta.term)`, the whole log is discarded. Entries at or below
    /// `meta.index` may be discarded at once or later by [`Storage::compact`].
    fn save_snapshot(&mut self, meta: SnapshotMeta, data: &[u8]) -> Result<(), StorageError>;

    /// The durable snapshot, if any.
    fn snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError>;

    /// Discards log entries at or below `through`, which must not exceed the snapshot's index.
    fn compact(&mut self, through: Index) -> Result<(), StorageError>;

    /// Bytes kept on the medium.
    fn persisted_size(&self) -> PersistedSize;
}
