//! What a [`Node`](super::Node) measures about itself, for a host to scrape
//! ([`NodeStatus::metrics`](super::NodeStatus::metrics)): the engine's counters, fsync
//! latency, queue depths.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::StorageError;
use crate::host::EngineCounters;
use crate::raft::{Entry, HardState, Index, SnapshotMeta, Term};
use crate::storage::{InitialState, PersistedSize, Storage, SyncWait, TailLoss};

/// Counters and gauges of a running node. Counters count from the node's start.
///
/// ```
/// # use raftkv::node::NodeMetrics;
/// let m = NodeMetrics::default();
/// assert_eq!(m.counters.proposals, 0);
/// assert_eq!(m.fsync.count, 0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeMetrics {
    /// Proposals, commits, applies, reads, batches, syncs, snapshots, leader changes.
    pub counters: EngineCounters,
    /// Latency of the storage's syncs (`fsync`/`fdatasync` for the file storage): for a sync
    /// whose wait runs on the node's fsync thread, the wait plus its finishing step.
    pub fsync: Histogram,
    /// Commands waiting in the node's inbox (proposals, reads, inbound messages).
    pub inbox_depth: u64,
    /// Outgoing batches dropped because the driver future did not keep up.
    pub outbox_dropped: u64,
}

/// A latency histogram in power-of-two microsecond buckets: bucket `i` counts durations in
/// `[2^i, 2^(i+1))` µs (bucket 0 also takes anything under 1 µs; the last takes the rest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Durations recorded.
    pub count: u64,
    /// Their sum, in µs.
    pub total_us: u64,
    /// The longest, in µs.
    pub max_us: u64,
    /// Counts per bucket.
    pub buckets: [u64; 24],
}

impl Histogram {
    /// Records one duration.
    pub fn record(&mut self, us: u64) {
        self.count += 1;
        self.total_us += us;
        self.max_us = self.max_us.max(us);
        let bucket = (64 - us.leading_zeros()).saturating_sub(1) as usize;
        self.buckets[bucket.min(self.buckets.len() - 1)] += 1;
    }

    /// The mean, in µs (0 when empty).
    pub fn mean_us(&self) -> u64 {
        self.total_us.checked_div(self.count).unwrap_or(0)
    }

    /// An upper bound of the `q`-quantile (0.0 ..= 1.0), in µs: the top of the bucket it
    /// falls in (0 when empty).
    pub fn quantile_us(&self, q: f64) -> u64 {
        let want = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want.max(1) {
                return (2u64 << i).min(self.max_us.max(1));
            }
        }
        self.max_us
    }
}

/// Depth of the node's inbox, counted at both ends.
#[derive(Debug, Default)]
pub(super) struct Gauges {
    pub(super) inbox: AtomicU64,
    pub(super) outbox_dropped: AtomicU64,
}

impl Gauges {
    pub(super) fn queued(&self) {
        self.inbox.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn taken(&self) {
        self.inbox.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The node's storage, with its syncs timed. Everything else passes straight through.
pub(super) struct Timed<S> {
    pub(super) inner: S,
    pub(super) fsync: Histogram,
    /// How long the wait of the started sync took, in µs (set on the fsync thread).
    pub(super) waited_us: Arc<AtomicU64>,
}

impl<S> Timed<S> {
    pub(super) fn new(inner: S) -> Self {
        Timed {
            inner,
            fsync: Histogram::default(),
            waited_us: Arc::default(),
        }
    }
}

impl<S: Storage> Storage for Timed<S> {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.inner.initial_state()
    }
    fn first_index(&self) -> Index {
        self.inner.first_index()
    }
    fn last_index(&self) -> Index {
        self.inner.last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.inner.term(index)
    }
    fn entries(&self, lo: Index, hi: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.inner.entries(lo, hi, max_bytes)
    }
    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.inner.set_hard_state(hard_state)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.inner.append(entries)
    }
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.inner.truncate_suffix(from)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        let start = Instant::now();
        let r = self.inner.sync();
        self.fsync.record(start.elapsed().as_micros() as u64);
        r
    }
    fn start_sync(&mut self) -> Result<Option<SyncWait>, StorageError> {
        let Some(wait) = self.inner.start_sync()? else {
            return Ok(None);
        };
        if !wait.blocks() {
            return Ok(Some(wait));
        }
        let waited_us = self.waited_us.clone();
        Ok(Some(SyncWait::blocking(move || {
            let start = Instant::now();
            let r = wait.run();
            waited_us.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
            r
        })))
    }
    fn finish_sync(&mut self, waited: Result<(), StorageError>) -> Result<(), StorageError> {
        let start = Instant::now();
        let r = self.inner.finish_sync(waited);
        let waited_us = self.waited_us.swap(0, Ordering::Relaxed);
        self.fsync
            .record(waited_us + start.elapsed().as_micros() as u64);
        r
    }
    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.inner.write_snapshot_chunk(meta, offset, data)
    }
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.inner.install_snapshot(meta)
    }
    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.inner.read_snapshot(offset, len)
    }
    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.inner.compact(through)
    }
    fn persisted_size(&self) -> PersistedSize {
        self.inner.persisted_size()
    }
    fn tail_loss(&self) -> Option<TailLoss> {
        self.inner.tail_loss()
    }
    fn clear_tail_loss(&mut self) -> Result<(), StorageError> {
        self.inner.clear_tail_loss()
    }
    fn record_tail_loss(&mut self, loss: TailLoss) -> Result<(), StorageError> {
        self.inner.record_tail_loss(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let mut h = Histogram::default();
        for us in [0, 1, 3, 100, 100, 100, 5000] {
            h.record(us);
        }
        assert_eq!(h.count, 7);
        assert_eq!(h.max_us, 5000);
        assert_eq!(h.buckets[0], 2); // 0 and 1
        assert_eq!(h.buckets[1], 1); // 3
        assert_eq!(h.buckets[6], 3); // 100 in [64, 128)
        assert_eq!(h.quantile_us(0.5), 128);
        assert_eq!(h.quantile_us(1.0), 5000);
        assert_eq!(h.mean_us(), (1 + 3 + 300 + 5000) / 7);
    }
}
