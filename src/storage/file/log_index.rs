//! In-memory index of the log: where each live entry is, and the terms.
//!
//! The storage never holds all entries on the heap. It keeps:
//! - [`LogIndex`]: one packed `u64` location per live entry (segment sequence number in the high
//!   32 bits, byte offset in the low 32 bits), plus the log's terms as runs `(first index, term)`
//!   (terms change rarely, so `term()` needs no disk read);
//! - [`TailCache`]: the newest entries, decoded, up to a byte budget (the entries a leader is
//!   most likely to send again).
//!
//! # Invariants
//! - `LogIndex` holds the entries `first..=last()` with `last() == first + len - 1`; the log is
//!   empty when `len == 0`.
//! - Term runs are sorted by first index, cover `first..=last()` and are empty when the log is.
//! - The segment numbers of the locations never decrease with the index (an append always goes
//!   to the newest segment, after truncating everything at or after its index).
//! - `TailCache` holds a suffix of the live log (`entries.back()` is the entry at `last()`),
//!   at most `limit` bytes of [`Entry::size`] (at least one entry when non-empty).

use std::collections::VecDeque;

use crate::raft::{Entry, Index, Term};

/// Packs a segment number and an offset into one location.
pub(crate) fn pack(seq: u64, offset: u64) -> u64 {
    debug_assert!(seq < (1 << 32) && offset < (1 << 32));
    (seq << 32) | offset
}

/// Splits a location into (segment number, offset).
pub(crate) fn unpack(location: u64) -> (u64, u64) {
    (location >> 32, location & 0xFFFF_FFFF)
}

/// Locations and terms of the live entries.
#[derive(Debug, Default)]
pub(crate) struct LogIndex {
    first: Index,
    locations: VecDeque<u64>,
    term_runs: VecDeque<(Index, Term)>,
}

impl LogIndex {
    /// An empty log whose next entry is `first`.
    pub(crate) fn new(first: Index) -> Self {
        LogIndex {
            first,
            ..Default::default()
        }
    }
    pub(crate) fn first(&self) -> Index {
        self.first
    }
    /// Last index (`first - 1` when empty).
    pub(crate) fn last(&self) -> Index {
        (self.first + self.locations.len() as u64).saturating_sub(1)
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.locations.is_empty()
    }
    pub(crate) fn contains(&self, index: Index) -> bool {
        index >= self.first && index - self.first < self.locations.len() as u64
    }
    /// Empties the log; the next entry will be `first`.
    pub(crate) fn reset(&mut self, first: Index) {
        self.first = first;
        self.locations.clear();
        self.term_runs.clear();
    }
    /// Appends the entry after `last()`.
    pub(crate) fn push(&mut self, index: Index, term: Term, location: u64) {
        debug_assert_eq!(index, self.last() + 1, "log index must stay contiguous");
        if self.term_runs.back().map(|r| r.1) != Some(term) {
            self.term_runs.push_back((index, term));
        }
        self.locations.push_back(location);
    }
    /// Removes the entries `from..`.
    pub(crate) fn truncate_from(&mut self, from: Index) {
        let keep = from.saturating_sub(self.first) as usize;
        if keep < self.locations.len() {
            self.locations.truncate(keep);
            while self.term_runs.back().is_some_and(|r| r.0 >= from) {
                self.term_runs.pop_back();
            }
        }
    }
    /// Removes the entries `..=through`; the log then starts at `through + 1`.
    pub(crate) fn drop_through(&mut self, through: Index) {
        if through < self.first {
            return;
        }
        let drop = (through + 1 - self.first).min(self.locations.len() as u64) as usize;
        self.locations.drain(..drop);
        self.first = through + 1;
        while self.term_runs.len() >= 2 && self.term_runs[1].0 <= self.first {
            self.term_runs.pop_front();
        }
        if self.locations.is_empty() {
            self.term_runs.clear();
        }
    }
    pub(crate) fn location(&self, index: Index) -> Option<u64> {
        if !self.contains(index) {
            return None;
        }
        self.locations.get((index - self.first) as usize).copied()
    }
    pub(crate) fn term(&self, index: Index) -> Option<Term> {
        if !self.contains(index) {
            return None;
        }
        let run = self.term_runs.partition_point(|r| r.0 <= index);
        self.term_runs.get(run.checked_sub(1)?).map(|r| r.1)
    }
    /// Heap bytes used (for reports).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.locations.capacity() * 8 + self.term_runs.capacity() * 16
    }
}

/// The newest entries, decoded, within a byte budget.
#[derive(Debug)]
pub(crate) struct TailCache {
    entries: VecDeque<Entry>,
    bytes: u64,
    limit: u64,
}

impl TailCache {
    pub(crate) fn new(limit: u64) -> Self {
        TailCache {
            entries: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }
    /// Adds the entry that just became `last()`.
    pub(crate) fn push(&mut self, entry: &Entry) {
        if self.limit == 0 {
            return;
        }
        if self
            .entries
            .back()
            .is_some_and(|e| e.index + 1 != entry.index)
        {
            self.clear(); // not contiguous: start over
        }
        self.bytes += entry.size();
        self.entries.push_back(entry.clone());
        while self.bytes > self.limit && self.entries.len() > 1 {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.size();
            }
        }
    }
    pub(crate) fn truncate_from(&mut self, from: Index) {
        while self.entries.back().is_some_and(|e| e.index >= from) {
            if let Some(e) = self.entries.pop_back() {
                self.bytes -= e.size();
            }
        }
    }
    pub(crate) fn drop_through(&mut self, through: Index) {
        while self.entries.front().is_some_and(|e| e.index <= through) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.size();
            }
        }
    }
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
    pub(crate) fn get(&self, index: Index) -> Option<&Entry> {
        let first = self.entries.front()?.index;
        let e = self.entries.get(index.checked_sub(first)? as usize)?;
        debug_assert_eq!(e.index, index);
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryPayload;

    #[test]
    fn terms_and_locations_follow_truncation_and_compaction() {
        let mut ix = LogIndex::new(1);
        for (i, t) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)] {
            ix.push(i, t, pack(1, 100 + i));
        }
        assert_eq!(ix.term(3), Some(2));
        assert_eq!(ix.term(5), Some(3));
        assert_eq!(ix.term(6), None);
        ix.truncate_from(4);
        assert_eq!(ix.last(), 3);
        ix.push(4, 5, pack(2, 64));
        assert_eq!(ix.term(4), Some(5));
        assert_eq!(unpack(ix.location(4).unwrap()), (2, 64));
        ix.drop_through(3);
        assert_eq!((ix.first(), ix.last()), (4, 4));
        assert_eq!(ix.term(3), None);
        assert_eq!(ix.term(4), Some(5));
        ix.drop_through(9);
        assert!(ix.is_empty());
        assert_eq!((ix.first(), ix.last()), (10, 9));
    }

    #[test]
    fn tail_cache_respects_its_budget() {
        let mut c = TailCache::new(100);
        for i in 1..=10 {
            c.push(&Entry {
                index: i,
                term: 1,
                payload: EntryPayload::Command(vec![0; 16].into()),
            });
        }
        // Each entry accounts for 40 bytes: two fit.
        assert!(c.get(8).is_none());
        assert_eq!(c.get(10).unwrap().index, 10);
        assert_eq!(c.get(9).unwrap().index, 9);
        c.truncate_from(10);
        assert!(c.get(10).is_none());
    }
}
