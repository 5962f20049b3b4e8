//! [`MemStorage`]: the storage in memory, with an explicit durability point.
//!
//! It keeps two copies of the state: `current` (every write) and `durable` (the writes up to
//! the last `sync`). Writes are recorded as operations and replayed onto `durable` at `sync`,
//! so a sync costs what was written since the last one, not the size of the log.
//! [`MemStorage::crash`] throws away what was not synced, which is what the simulation uses to
//! model a power loss; [`MemStorage::lose_tail`] models a disk that damaged the log's synced
//! tail and a recovery mode that cut it (a [`TailLoss`]). Clones share the same state (a
//! handle for tests to look inside).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{InitialState, PersistedSize, Storage, SyncWait, TailLoss};
use crate::error::StorageError;
use crate::raft::{Entry, HardState, Index, SnapshotMeta, Term};

/// Bytes a hard state accounts for in [`PersistedSize::log_bytes`].
const HARD_STATE_BYTES: u64 = 24;

#[derive(Clone, Debug, Default)]
struct State {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    snapshot_data: Arc<[u8]>,
    /// Entries `snapshot.index + 1 ..` (a deque: compaction drops a prefix in O(dropped)).
    entries: VecDeque<Entry>,
    /// Sum of `Entry::size` over `entries`.
    log_bytes: u64,
    /// A tail loss not yet cleared.
    tail_loss: Option<TailLoss>,
}

#[derive(Clone, Debug)]
enum Op {
    HardState(HardState),
    Append(Vec<Entry>),
    Truncate(Index),
    ClearTailLoss,
}

impl State {
    fn first_index(&self) -> Index {
        self.snapshot.index + 1
    }
    fn last_index(&self) -> Index {
        self.snapshot.index + self.entries.len() as u64
    }
    fn truncate(&mut self, from: Index) {
        let keep = from.saturating_sub(self.first_index()) as usize;
        if keep < self.entries.len() {
            let removed: u64 = self.entries.range(keep..).map(Entry::size).sum();
            self.log_bytes -= removed;
            self.entries.truncate(keep);
        }
    }
    fn apply(&mut self, op: &Op) {
        match op {
            Op::HardState(hs) => self.hard_state = *hs,
            Op::Truncate(from) => self.truncate(*from),
            Op::ClearTailLoss => self.tail_loss = None,
            Op::Append(entries) => {
                if let Some(first) = entries.first() {
                    self.truncate(first.index);
                    self.log_bytes += entries.iter().map(Entry::size).sum::<u64>();
                    self.entries.extend(entries.iter().cloned());
                }
            }
        }
    }
    /// [`State::apply`], moving the appended entries instead of copying them.
    fn apply_owned(&mut self, op: Op) {
        match op {
            Op::Append(entries) => {
                if let Some(first) = entries.first() {
                    self.truncate(first.index);
                    self.log_bytes += entries.iter().map(Entry::size).sum::<u64>();
                    self.entries.extend(entries);
                }
            }
            op => self.apply(&op),
        }
    }
    /// Drops the first `n` entries: O(n), and the byte count follows what is dropped.
    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.entries.len());
        let removed: u64 = self.entries.drain(..n).map(|e| e.size()).sum();
        self.log_bytes -= removed;
    }
    fn compact(&mut self, through: Index) {
        self.drop_front(through.saturating_sub(self.snapshot.index) as usize);
    }
    fn install_snapshot(&mut self, meta: SnapshotMeta, data: Arc<[u8]>) {
        let matches = meta.index >= self.first_index()
            && meta.index <= self.last_index()
            && self.entries[(meta.index - self.first_index()) as usize].term == meta.term;
        if matches {
            // Keep the entries after the snapshot, drop the covered ones.
            self.drop_front((meta.index + 1 - self.first_index()) as usize);
        } else {
            self.entries.clear();
            self.log_bytes = 0;
        }
        self.snapshot = meta;
        self.snapshot_data = data;
    }
}

impl Inner {
    /// Makes the first `ops` pending operations durable (what a crash keeps); a started sync
    /// covered no more than that.
    fn make_durable(&mut self, ops: usize) {
        let ops = ops.min(self.pending.len());
        for op in self.pending.drain(..ops) {
            self.durable.apply_owned(op);
        }
        self.started = 0;
        self.syncs += 1;
    }
}

#[derive(Debug, Default)]
struct Inner {
    current: State,
    durable: State,
    pending: Vec<Op>,
    /// How many of the first `pending` operations the sync begun by `start_sync` covers.
    started: usize,
    syncs: u64,
    /// A snapshot being written: its meta and the bytes so far.
    incoming: Option<(SnapshotMeta, Vec<u8>)>,
}

/// In-memory [`Storage`]. Cheap to clone; clones share one state.
///
/// ```
/// use raftkv::storage::{MemStorage, Storage};
/// use raftkv::raft::{Entry, EntryPayload, HardState};
///
/// let mut s = MemStorage::new();
/// s.set_hard_state(HardState { term: 1, vote: Some(1) }).unwrap();
/// s.append(&[Entry { index: 1, term: 1, payload: EntryPayload::Noop }]).unwrap();
/// s.crash(); // nothing was synced
/// assert_eq!(s.last_index(), 0);
/// s.append(&[Entry { index: 1, term: 1, payload: EntryPayload::Noop }]).unwrap();
/// s.sync().unwrap();
/// s.crash();
/// assert_eq!(s.last_index(), 1);
/// // A split sync covers the writes made before it started:
/// s.append(&[Entry { index: 2, term: 1, payload: EntryPayload::Noop }]).unwrap();
/// let wait = s.start_sync().unwrap().expect("splits its syncs");
/// s.append(&[Entry { index: 3, term: 1, payload: EntryPayload::Noop }]).unwrap();
/// s.finish_sync(wait.run()).unwrap();
/// s.crash();
/// assert_eq!(s.last_index(), 2);
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<Inner>>,
}

impl MemStorage {
    /// An empty storage (term 0, no vote, empty log, no snapshot).
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a power loss: every write since the last successful `sync` is lost.
    pub fn crash(&self) {
        let mut inner = self.inner.lock();
        inner.pending.clear();
        inner.started = 0;
        inner.incoming = None;
        inner.current = inner.durable.clone();
    }

    /// The durable hard state (what a crash would keep).
    pub fn durable_hard_state(&self) -> HardState {
        self.inner.lock().durable.hard_state
    }

    /// The durable log's last index (what a crash would keep).
    pub fn durable_last_index(&self) -> Index {
        self.inner.lock().durable.last_index()
    }

    /// The durable entries (what a crash would keep).
    pub fn durable_entries(&self) -> Vec<Entry> {
        self.inner.lock().durable.entries.iter().cloned().collect()
    }

    /// The durable snapshot's last index (0 when there is none).
    pub fn durable_snapshot_index(&self) -> Index {
        self.inner.lock().durable.snapshot.index
    }

    /// The durable snapshot's position (what a crash would keep).
    pub fn durable_snapshot(&self) -> SnapshotMeta {
        self.inner.lock().durable.snapshot
    }

    /// Term of the durable entry at `index` (the snapshot's term at its index); `None` when
    /// a crash would not keep an entry there.
    pub fn durable_term(&self, index: Index) -> Option<Term> {
        let inner = self.inner.lock();
        let d = &inner.durable;
        if index == d.snapshot.index {
            return Some(d.snapshot.term);
        }
        if index < d.first_index() || index > d.last_index() {
            return None;
        }
        Some(d.entries[(index - d.first_index()) as usize].term)
    }

    /// The smallest index that writes made since the last `sync` replace or remove (`None`
    /// when none do): entries durable below it survive any crash unchanged.
    pub fn pending_rewrite_from(&self) -> Option<Index> {
        let inner = self.inner.lock();
        inner
            .pending
            .iter()
            .filter_map(|op| match op {
                Op::Append(entries) => entries.first().map(|e| e.index),
                Op::Truncate(from) => Some(*from),
                Op::HardState(_) | Op::ClearTailLoss => None,
            })
            .min()
    }

    /// How many times `sync` has been called.
    pub fn sync_count(&self) -> u64 {
        self.inner.lock().syncs
    }

    /// Simulates a disk that damaged the synced tail of the log and a recovery mode that cut
    /// it (see [`TailLoss`]): as after a crash, unsynced writes are gone; then the log keeps
    /// the entries through `intact_through` (never below the snapshot, which stays) and loses
    /// the rest. With `forget_hard_state`, the hard state reverts to the most adversarial one
    /// the remaining log allows — the term of the last intact entry (or of the snapshot) and
    /// no vote — as if the newest term and vote were in the damaged region. The loss is
    /// reported by [`Storage::tail_loss`] (merged with one not yet cleared: the smaller
    /// intact prefix, either hard state loss) until [`Storage::clear_tail_loss`] is synced.
    ///
    /// ```
    /// use raftkv::storage::{MemStorage, Storage, TailLoss};
    /// use raftkv::raft::{Entry, EntryPayload, HardState};
    ///
    /// let mut s = MemStorage::new();
    /// s.set_hard_state(HardState { term: 3, vote: Some(2) }).unwrap();
    /// let e = |index, term| Entry { index, term, payload: EntryPayload::Noop };
    /// s.append(&[e(1, 1), e(2, 2), e(3, 3)]).unwrap();
    /// s.sync().unwrap();
    /// s.lose_tail(2, true);
    /// assert_eq!(s.last_index(), 2);
    /// assert_eq!(s.initial_state().unwrap().hard_state, HardState { term: 2, vote: None });
    /// assert_eq!(s.tail_loss(), Some(TailLoss { intact_through: 2, hard_state_lost: true }));
    /// s.clear_tail_loss().unwrap();
    /// assert!(s.tail_loss().is_some(), "until the clear is synced");
    /// s.sync().unwrap();
    /// assert_eq!(s.tail_loss(), None);
    /// ```
    pub fn lose_tail(&self, intact_through: Index, forget_hard_state: bool) {
        let mut inner = self.inner.lock();
        inner.pending.clear();
        inner.started = 0;
        inner.incoming = None;
        let d = &mut inner.durable;
        let through = intact_through.max(d.snapshot.index).min(d.last_index());
        d.truncate(through + 1);
        if forget_hard_state {
            let term = if through > d.snapshot.index {
                d.entries[(through - d.first_index()) as usize].term
            } else {
                d.snapshot.term
            };
            d.hard_state = HardState { term, vote: None };
        }
        let loss = TailLoss {
            intact_through: through,
            hard_state_lost: forget_hard_state,
        };
        d.tail_loss = Some(match d.tail_loss {
            Some(old) => TailLoss {
                intact_through: old.intact_through.min(loss.intact_through),
                hard_state_lost: old.hard_state_lost || loss.hard_state_lost,
            },
            None => loss,
        });
        inner.current = inner.durable.clone();
    }

    fn check_range(state: &State, index: Index) -> Result<(), StorageError> {
        if index < state.first_index() {
            return Err(StorageError::Compacted(index));
        }
        if index > state.last_index() {
            return Err(StorageError::Unavailable(index));
        }
        Ok(())
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        let inner = self.inner.lock();
        let s = &inner.current;
        Ok(InitialState {
            hard_state: s.hard_state,
            snapshot: s.snapshot,
            first_index: s.first_index(),
            last_index: s.last_index(),
            snapshot_size: s.snapshot_data.len() as u64,
        })
    }

    fn first_index(&self) -> Index {
        self.inner.lock().current.first_index()
    }

    fn last_index(&self) -> Index {
        self.inner.lock().current.last_index()
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        let inner = self.inner.lock();
        let s = &inner.current;
        if index == s.snapshot.index {
            return Ok(s.snapshot.term);
        }
        Self::check_range(s, index)?;
        Ok(s.entries[(index - s.first_index()) as usize].term)
    }

    fn entries(&self, lo: Index, hi: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        let inner = self.inner.lock();
        let s = &inner.current;
        if lo >= hi {
            return Ok(Vec::new());
        }
        Self::check_range(s, lo)?;
        Self::check_range(s, hi - 1)?;
        let from = (lo - s.first_index()) as usize;
        let to = (hi - s.first_index()) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in s.entries.range(from..to) {
            bytes += e.size();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        let mut inner = self.inner.lock();
        let op = Op::HardState(hard_state);
        inner.current.apply(&op);
        inner.pending.push(op);
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut inner = self.inner.lock();
        let s = &inner.current;
        if first.index < s.first_index() || first.index > s.last_index() + 1 {
            return Err(StorageError::Invalid(format!(
                "append at {} outside {}..={}",
                first.index,
                s.first_index(),
                s.last_index() + 1
            )));
        }
        if entries.windows(2).any(|w| w[1].index != w[0].index + 1) {
            return Err(StorageError::Invalid(
                "appended entries are not contiguous".into(),
            ));
        }
        let op = Op::Append(entries.to_vec());
        inner.current.apply(&op);
        inner.pending.push(op);
        Ok(())
    }

    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        let mut inner = self.inner.lock();
        if from < inner.current.first_index() {
            return Err(StorageError::Compacted(from));
        }
        let op = Op::Truncate(from);
        inner.current.apply(&op);
        inner.pending.push(op);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        let mut inner = self.inner.lock();
        let all = inner.pending.len();
        inner.make_durable(all);
        Ok(())
    }

    /// Nothing to wait for; the writes made so far become durable (what a crash keeps) at
    /// `finish_sync`, so a simulated crash between the two loses them.
    fn start_sync(&mut self) -> Result<Option<SyncWait>, StorageError> {
        let mut inner = self.inner.lock();
        inner.started = inner.pending.len();
        Ok(Some(SyncWait::done()))
    }

    fn finish_sync(&mut self, waited: Result<(), StorageError>) -> Result<(), StorageError> {
        waited?;
        let mut inner = self.inner.lock();
        let covered = inner.started;
        inner.make_durable(covered);
        Ok(())
    }

    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let mut inner = self.inner.lock();
        if offset == 0 {
            inner.incoming = Some((meta, Vec::new()));
        }
        match &mut inner.incoming {
            Some((m, bytes)) if *m == meta && bytes.len() as u64 == offset => {
                bytes.extend_from_slice(data);
                Ok(())
            }
            _ => Err(StorageError::Invalid(format!(
                "snapshot chunk at offset {offset} for index {} does not continue the snapshot being written",
                meta.index
            ))),
        }
    }

    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.sync()?;
        let mut inner = self.inner.lock();
        let data = match inner.incoming.take() {
            Some((m, bytes)) if m == meta => bytes,
            _ => {
                return Err(StorageError::Invalid(format!(
                    "no snapshot for index {} was written",
                    meta.index
                )))
            }
        };
        if meta.index <= inner.current.snapshot.index {
            return Ok(()); // never move backwards
        }
        let data: Arc<[u8]> = data.into();
        inner.current.install_snapshot(meta, data.clone());
        inner.durable.install_snapshot(meta, data);
        Ok(())
    }

    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        let inner = self.inner.lock();
        let s = &inner.current;
        if s.snapshot.index == 0 {
            return Err(StorageError::Unavailable(0));
        }
        let start = (offset as usize).min(s.snapshot_data.len());
        let end = start.saturating_add(len).min(s.snapshot_data.len());
        Ok(s.snapshot_data[start..end].to_vec())
    }

    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.sync()?;
        let mut inner = self.inner.lock();
        if through > inner.current.snapshot.index {
            return Err(StorageError::Invalid(format!(
                "compact through {through} beyond snapshot {}",
                inner.current.snapshot.index
            )));
        }
        inner.current.compact(through);
        inner.durable.compact(through);
        Ok(())
    }

    fn tail_loss(&self) -> Option<TailLoss> {
        // Reported until the clear is durable.
        self.inner.lock().durable.tail_loss
    }

    fn record_tail_loss(&mut self, loss: TailLoss) -> Result<(), StorageError> {
        let mut inner = self.inner.lock();
        inner.durable.tail_loss = Some(loss);
        inner.current.tail_loss = Some(loss);
        Ok(())
    }

    fn clear_tail_loss(&mut self) -> Result<(), StorageError> {
        let mut inner = self.inner.lock();
        let op = Op::ClearTailLoss;
        inner.current.apply(&op);
        inner.pending.push(op);
        Ok(())
    }

    fn persisted_size(&self) -> PersistedSize {
        let inner = self.inner.lock();
        PersistedSize {
            log_bytes: HARD_STATE_BYTES + inner.durable.log_bytes,
            snapshot_bytes: inner.durable.snapshot_data.len() as u64,
        }
    }
}
