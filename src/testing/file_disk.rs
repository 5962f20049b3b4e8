//! [`SimFileStorage`]: the real [`FileStorage`] on a [`SimDisk`], as a [`SimStorage`], so the
//! cluster simulation can crash nodes whose unsynced file writes are then lost, kept, or torn.

use std::path::PathBuf;

use super::sim::SimStorage;
use crate::error::StorageError;
use crate::raft::{Entry, HardState, Index, Rng, SnapshotMeta, Term};
use crate::storage::file::sim::SimDisk;
use crate::storage::{
    FileStorage, FileStorageOptions, InitialState, PersistedSize, Storage, TailLoss,
};

/// A [`FileStorage`] over its own simulated disk. A power loss crashes the disk (unsynced
/// writes resolved at random from the simulation's seed) and reopens the storage, which must
/// recover: a node whose storage cannot reopen after a crash is a bug, and the simulation
/// panics naming it.
pub struct SimFileStorage {
    storage: FileStorage,
    disk: SimDisk,
    dir: PathBuf,
    options: FileStorageOptions,
}

impl SimFileStorage {
    /// A fresh disk with an empty data directory for node `node_id`. Small segments (4 KiB)
    /// keep the simulated disk small and exercise segment rollover and compaction.
    pub fn new(node_id: u64) -> Self {
        let disk = SimDisk::new();
        let dir = PathBuf::from(format!("/node-{node_id}"));
        let options = FileStorageOptions {
            cluster_id: 1,
            node_id,
            segment_size: 4096,
            ..Default::default()
        };
        let storage = FileStorage::open_simulated(&disk, &dir, options)
            .unwrap_or_else(|e| panic!("opening a new simulated storage: {e}"));
        SimFileStorage {
            storage,
            disk,
            dir,
            options,
        }
    }

    /// The simulated disk (to inject full-disk or fsync faults).
    pub fn disk(&self) -> &SimDisk {
        &self.disk
    }
}

impl SimStorage for SimFileStorage {
    fn power_loss(&mut self, rng: &mut Rng) {
        self.disk.crash(rng.next_u64());
        self.storage = FileStorage::open_simulated(&self.disk, &self.dir, self.options)
            .unwrap_or_else(|e| panic!("node storage cannot reopen after a crash: {e}"));
    }
}

impl Storage for SimFileStorage {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.storage.initial_state()
    }
    fn first_index(&self) -> Index {
        self.storage.first_index()
    }
    fn last_index(&self) -> Index {
        self.storage.last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.storage.term(index)
    }
    fn entries(&self, lo: Index, hi: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.storage.entries(lo, hi, max_bytes)
    }
    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.storage.set_hard_state(hard_state)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.storage.append(entries)
    }
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.storage.truncate_suffix(from)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.storage.sync()
    }
    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.storage.write_snapshot_chunk(meta, offset, data)
    }
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.storage.install_snapshot(meta)
    }
    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.storage.read_snapshot(offset, len)
    }
    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.storage.compact(through)
    }
    fn persisted_size(&self) -> PersistedSize {
        self.storage.persisted_size()
    }
    fn tail_loss(&self) -> Option<TailLoss> {
        self.storage.tail_loss()
    }
    fn clear_tail_loss(&mut self) -> Result<(), StorageError> {
        self.storage.clear_tail_loss()
    }
}
