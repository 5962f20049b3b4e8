//! [`SimFileStorage`]: the real [`FileStorage`] on a [`SimDisk`], as a [`SimStorage`], so the
//! cluster simulation can crash nodes whose unsynced file writes are then lost, kept, or torn.
//!
//! Every write is also made to a shadow [`MemStorage`] that models the storage contract
//! (synced writes survive, of later ones at most a prefix): the simulation checks
//! acknowledgements against the shadow's durable state, and after each power loss the
//! reopened file storage is checked against the shadow — everything synced must still be
//! there — and the shadow is rebuilt from what the files kept.

use std::path::PathBuf;

use super::sim::SimStorage;
use crate::error::StorageError;
use crate::raft::{Entry, HardState, Index, Rng, SnapshotMeta, Term};
use crate::storage::file::sim::SimDisk;
use crate::storage::{
    FileStorage, FileStorageOptions, InitialState, MemStorage, PersistedSize, Storage, SyncWait,
    TailLoss,
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
    /// The contract's model of this storage (see the module docs).
    shadow: MemStorage,
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
            shadow: MemStorage::new(),
        }
    }

    /// Checks that the reopened files keep everything the shadow says was synced, then makes
    /// the shadow a synced copy of what they hold.
    fn verify_and_rebuild_shadow(&mut self) {
        let fail =
            |what: String| -> ! { panic!("file storage lost synced data in a power loss: {what}") };
        let init = self
            .storage
            .initial_state()
            .unwrap_or_else(|e| panic!("reopened storage: {e}"));
        let durable_hs = self.shadow.durable_hard_state();
        if init.hard_state.term < durable_hs.term
            || (init.hard_state.term == durable_hs.term
                && durable_hs.vote.is_some()
                && init.hard_state.vote != durable_hs.vote)
        {
            fail(format!(
                "hard state {:?}, synced {durable_hs:?}",
                init.hard_state
            ));
        }
        let durable_snapshot = self.shadow.durable_snapshot();
        if init.snapshot.index < durable_snapshot.index {
            fail(format!(
                "snapshot at {}, synced at {}",
                init.snapshot.index, durable_snapshot.index
            ));
        }
        // Durable entries below what unsynced writes rewrote survive unchanged.
        let kept_below = self.shadow.pending_rewrite_from().unwrap_or(Index::MAX);
        let last = self.shadow.durable_last_index().min(kept_below - 1);
        for index in (init.snapshot.index + 1)..=last {
            let want = self.shadow.durable_term(index);
            let got = self.storage.term(index).ok();
            if want.is_some() && got != want {
                fail(format!("entry {index} has term {got:?}, synced {want:?}"));
            }
        }
        let shadow = MemStorage::new();
        let mut s = shadow.clone();
        let rebuilt = s
            .set_hard_state(init.hard_state)
            .and_then(|_| match self.storage.snapshot()? {
                Some((meta, data)) => s.save_snapshot(meta, &data),
                None => Ok(()),
            })
            .and_then(|_| {
                self.storage
                    .entries(init.first_index, init.last_index + 1, u64::MAX)
            })
            .and_then(|entries| s.append(&entries))
            .and_then(|_| s.sync());
        rebuilt.unwrap_or_else(|e| panic!("rebuilding the shadow storage: {e}"));
        self.shadow = shadow;
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
        self.verify_and_rebuild_shadow();
    }
    fn durable_hard_state(&self) -> Option<HardState> {
        Some(self.shadow.durable_hard_state())
    }
    fn durable_snapshot(&self) -> Option<SnapshotMeta> {
        Some(self.shadow.durable_snapshot())
    }
    fn durable_term(&self, index: Index) -> Option<Term> {
        self.shadow.durable_term(index)
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
        self.storage.set_hard_state(hard_state)?;
        self.shadow.set_hard_state(hard_state)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.storage.append(entries)?;
        self.shadow.append(entries)
    }
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.storage.truncate_suffix(from)?;
        self.shadow.truncate_suffix(from)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.storage.sync()?;
        self.shadow.sync()
    }
    fn start_sync(&mut self) -> Result<Option<SyncWait>, StorageError> {
        let wait = self.storage.start_sync()?;
        if wait.is_some() {
            // The shadow covers the same writes; its own wait is nothing.
            self.shadow.start_sync()?;
        }
        Ok(wait)
    }
    fn finish_sync(&mut self, waited: Result<(), StorageError>) -> Result<(), StorageError> {
        self.storage.finish_sync(waited)?;
        self.shadow.finish_sync(Ok(()))
    }
    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.storage.write_snapshot_chunk(meta, offset, data)?;
        self.shadow.write_snapshot_chunk(meta, offset, data)
    }
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.storage.install_snapshot(meta)?;
        self.shadow.install_snapshot(meta)
    }
    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.storage.read_snapshot(offset, len)
    }
    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.storage.compact(through)?;
        self.shadow.compact(through)
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
    fn record_tail_loss(&mut self, loss: TailLoss) -> Result<(), StorageError> {
        self.storage.record_tail_loss(loss)
    }
}
