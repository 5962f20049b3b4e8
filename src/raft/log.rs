//! [`RaftLog`]: the core's view of the log.
//!
//! Invariants (checked with `debug_assert!` where cheap):
//! - entries are contiguous: `entries[i].index == snapshot.index + 1 + i`, and their terms never
//!   decrease;
//! - `snapshot.index <= applied <= commit <= last_index()`, and `applied <= persisted` except
//!   right after a received snapshot replaced the log (then `applied` is the snapshot's index,
//!   and `persisted` catches up once the install is reported durable);
//! - the handed-out and durable positions keep the invariants of [`Unstable`]; in particular
//!   `persisted <= last_index()`.
//!
//! The whole log after the snapshot is held in memory (payloads are shared, never copied);
//! snapshots and compaction are what bound it. Compaction is amortized O(entries removed):
//! the dropped prefix is only cut out of the vector once it outweighs what is kept.

use super::membership::{Configs, Membership};
use super::unstable::Unstable;
use super::{Entry, Index, SnapshotMeta, Term};

/// The log as the core sees it: the snapshot boundary, the retained entries and the
/// commit/apply/persist positions.
#[derive(Clone, Debug, Default)]
pub struct RaftLog {
    snapshot: SnapshotMeta,
    /// `entries[start..]` are the retained entries; `entries[..start]` are compacted away
    /// and cut out lazily.
    entries: Vec<Entry>,
    start: usize,
    /// Sum of [`Entry::size`] over the retained entries, kept as they come and go.
    bytes: u64,
    /// The same over the retained entries at or below the commit index.
    committed_bytes: u64,
    commit: Index,
    applied: Index,
    unstable: Unstable,
    /// The configurations of the retained log.
    configs: Configs,
}

impl RaftLog {
    /// A log restored from storage: `entries` follow `snapshot` and are all durable.
    pub fn restore(snapshot: SnapshotMeta, entries: Vec<Entry>) -> Self {
        debug_assert!(entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.index == snapshot.index + 1 + i as u64));
        let last = snapshot.index + entries.len() as u64;
        let bytes = entries.iter().map(Entry::size).sum();
        let configs = Configs::new(Membership::default(), &entries);
        RaftLog {
            snapshot,
            entries,
            start: 0,
            bytes,
            committed_bytes: 0,
            commit: snapshot.index,
            applied: snapshot.index,
            unstable: Unstable::restored(last),
            configs,
        }
    }

    /// The configuration in effect: the latest in the log (committed or not), else the one
    /// at the snapshot boundary.
    pub fn membership(&self) -> &Membership {
        self.configs.current()
    }

    /// The configurations of the retained log.
    pub fn configs(&self) -> &Configs {
        &self.configs
    }

    /// Sets the configuration at the snapshot boundary (from the snapshot, or the bootstrap
    /// configuration of a new node).
    pub fn set_base_membership(&mut self, m: Membership) {
        self.configs.set_base(m);
    }

    fn live(&self) -> &[Entry] {
        &self.entries[self.start..]
    }

    /// Drops the first `n` retained entries, cutting the vector only when the dropped part
    /// outweighs the kept one (amortized O(n)).
    fn drop_front(&mut self, n: usize) {
        let dropped: u64 = self.entries[self.start..self.start + n]
            .iter()
            .map(Entry::size)
            .sum();
        self.bytes -= dropped;
        // Only applied, hence committed, entries are ever dropped from the front.
        self.committed_bytes -= dropped;
        self.start += n;
        if self.start >= 1024 && self.start * 2 >= self.entries.len() {
            self.entries.drain(..self.start);
            self.start = 0;
        }
    }

    /// The snapshot boundary: the entry just before the first retained one.
    pub fn snapshot(&self) -> SnapshotMeta {
        self.snapshot
    }
    /// First retained index.
    pub fn first_index(&self) -> Index {
        self.snapshot.index + 1
    }
    /// Last index (the snapshot's index when no entries are retained).
    pub fn last_index(&self) -> Index {
        self.snapshot.index + self.live().len() as u64
    }
    /// Sum of [`Entry::size`] over the retained entries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// Sum of [`Entry::size`] over the retained entries at or below the commit index (what a
    /// snapshot will be able to compact).
    pub fn committed_bytes(&self) -> u64 {
        self.committed_bytes
    }
    /// Term of the last entry.
    pub fn last_term(&self) -> Term {
        self.live().last().map_or(self.snapshot.term, |e| e.term)
    }
    /// Highest index known committed.
    pub fn commit(&self) -> Index {
        self.commit
    }
    /// Highest index handed out for applying.
    pub fn applied(&self) -> Index {
        self.applied
    }
    /// Highest index known durable.
    pub fn persisted(&self) -> Index {
        self.unstable.persisted()
    }
    /// The handed-out and durable positions.
    pub fn unstable(&self) -> Unstable {
        self.unstable
    }

    /// Term at `index`, or `None` if it is compacted away or beyond the end.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.get(index).map(|e| e.term)
    }

    /// The entry at `index`, if retained.
    pub fn get(&self, index: Index) -> Option<&Entry> {
        if index <= self.snapshot.index {
            return None;
        }
        self.live().get((index - self.snapshot.index - 1) as usize)
    }

    /// True if the log has an entry `(index, term)` (or it is the snapshot boundary).
    pub fn matches(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// Raft §5.4.1: is a log ending at `(last_index, last_term)` at least as up to date as ours?
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The largest index `i <= index` whose term is `<= term`, with that term. Stops at the
    /// snapshot boundary. Used by both sides of the fast conflict back-up.
    pub fn find_conflict_by_term(&self, index: Index, term: Term) -> (Index, Term) {
        let mut i = index.min(self.last_index());
        while i > self.snapshot.index {
            let t = self.term(i).unwrap_or(0);
            if t <= term {
                return (i, t);
            }
            i -= 1;
        }
        (self.snapshot.index, self.snapshot.term)
    }

    /// Entries `lo..hi` (clamped to the log), at most `max_count` of them and at most
    /// `max_bytes` (but at least one when the range is not empty).
    pub fn slice(&self, lo: Index, hi: Index, max_count: usize, max_bytes: u64) -> Vec<Entry> {
        let first = self.first_index();
        let lo = lo.max(first);
        let hi = hi.min(self.last_index() + 1);
        if lo >= hi {
            return Vec::new();
        }
        let range = &self.live()[(lo - first) as usize..(hi - first) as usize];
        // Count first, then copy once into an exact allocation.
        let mut n = 0;
        let mut bytes = 0;
        for e in range.iter().take(max_count) {
            bytes += e.size();
            if n > 0 && bytes > max_bytes {
                break;
            }
            n += 1;
        }
        range[..n].to_vec()
    }

    /// Sum of [`Entry::size`] over the retained entries `lo..hi`, without copying them.
    pub fn bytes_between(&self, lo: Index, hi: Index) -> u64 {
        let first = self.first_index();
        let lo = lo.max(first);
        let hi = hi.min(self.last_index() + 1);
        if lo >= hi {
            return 0;
        }
        self.live()[(lo - first) as usize..(hi - first) as usize]
            .iter()
            .map(Entry::size)
            .sum()
    }

    /// Leader path: appends entries of the current term right after the last one.
    pub fn append(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        debug_assert!(entry.term >= self.last_term());
        let index = entry.index;
        self.bytes += entry.size();
        self.configs.appended(&entry);
        self.entries.push(entry);
        self.unstable.appended(index, index);
    }

    /// Follower path (AppendEntries): if the log matches `(prev_index, prev_term)`, stores
    /// `entries` (replacing a conflicting suffix), advances the commit to
    /// `min(leader_commit, last new index)` and returns the last new index.
    ///
    /// # Panics
    /// If a committed entry would be replaced: that breaks Raft's safety and means the leader
    /// (or storage) is broken.
    pub fn maybe_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        leader_commit: Index,
        entries: Vec<Entry>,
    ) -> Option<Index> {
        if !self.matches(prev_index, prev_term) {
            return None;
        }
        let last_new = prev_index + entries.len() as u64;
        // Skip the entries we already hold; the first mismatch (if any) is the conflict.
        let conflict = entries
            .iter()
            .position(|e| !self.matches(e.index, e.term) && e.index > self.snapshot.index);
        if let Some(pos) = conflict {
            let at = entries[pos].index;
            assert!(
                at > self.commit,
                "conflicting entry at {at} would replace committed entries (commit {})",
                self.commit
            );
            self.truncate_from(at);
            for e in entries.into_iter().skip(pos) {
                self.append(e);
            }
        }
        self.commit_to(leader_commit.min(last_new));
        Some(last_new)
    }

    fn truncate_from(&mut self, index: Index) {
        debug_assert!(index > self.snapshot.index);
        let keep = self.start + (index - self.first_index()) as usize;
        let removed: u64 = self.entries[keep..].iter().map(Entry::size).sum();
        self.bytes -= removed;
        self.entries.truncate(keep);
        self.configs.truncated(index);
        self.unstable.truncated(index, self.last_index());
    }

    /// Advances the commit index (never backwards).
    pub fn commit_to(&mut self, index: Index) {
        if index > self.commit {
            debug_assert!(
                index <= self.last_index(),
                "commit {index} beyond last index"
            );
            self.raise_commit(index.min(self.last_index()));
        }
    }

    fn raise_commit(&mut self, index: Index) {
        self.committed_bytes += self.bytes_between(self.commit + 1, index + 1);
        self.commit = index;
    }

    /// Hands out the entries not yet handed to storage and marks them handed.
    pub fn take_unstable(&mut self) -> Vec<Entry> {
        let last = self.last_index();
        let from = self.unstable.handed_from();
        if from > last {
            return Vec::new();
        }
        let offset = (from - self.first_index()) as usize;
        self.unstable.handed_out(last);
        self.live()[offset..].to_vec()
    }

    /// Number of entries not yet handed to storage.
    pub fn take_unstable_len(&self) -> u64 {
        (self.last_index() + 1).saturating_sub(self.unstable.handed_from())
    }

    /// Records that storage made the log durable through `(index, term)`. Ignored when that
    /// entry has since been replaced.
    pub fn persisted_to(&mut self, index: Index, term: Term) {
        let matches = self.matches(index, term);
        let last = self.last_index();
        self.unstable.persisted_to(index, matches, last);
    }

    /// Committed, durable entries not yet handed out for applying (at most `max_bytes`, at
    /// least one), marking them handed out.
    pub fn take_committed(&mut self, max_bytes: u64) -> Vec<Entry> {
        let hi = self.commit.min(self.persisted());
        if hi <= self.applied {
            return Vec::new();
        }
        let out = self.slice(self.applied + 1, hi + 1, usize::MAX, max_bytes);
        self.applied += out.len() as u64;
        out
    }

    /// A snapshot of the applied state through `meta` is stored: discards the entries it
    /// covers. Returns false (and changes nothing) unless `meta` names an applied entry of this
    /// log beyond the current snapshot.
    pub fn compact(&mut self, meta: SnapshotMeta) -> bool {
        if meta.index <= self.snapshot.index
            || meta.index > self.applied
            || !self.matches(meta.index, meta.term)
        {
            return false;
        }
        let drop = (meta.index - self.snapshot.index) as usize;
        self.drop_front(drop);
        self.configs.compacted(meta.index);
        self.snapshot = meta;
        true
    }

    /// A snapshot received from the leader, for a log that does not hold `meta`'s entry,
    /// replaces the whole log: the snapshot is committed and (once the host restored it)
    /// applied. Of the old log only the committed prefix stays known durable (see
    /// [`Unstable::replaced_by_snapshot`]); the snapshot's own durability is reported with
    /// the batch that installs it.
    ///
    /// The configuration at the boundary stays what was in effect until the host reports the
    /// snapshot's own ([`RaftLog::set_base_membership`]).
    pub fn replace_with_snapshot(&mut self, meta: SnapshotMeta) {
        debug_assert!(
            meta.index > self.commit,
            "restoring a snapshot behind the commit index"
        );
        debug_assert!(
            !self.matches(meta.index, meta.term),
            "a log holding the snapshot's entry keeps its entries"
        );
        let old_commit = self.commit;
        let current = self.configs.current().clone();
        self.configs.replaced(current);
        self.entries.clear();
        self.start = 0;
        self.bytes = 0;
        self.committed_bytes = 0;
        self.snapshot = meta;
        self.commit = meta.index;
        self.applied = meta.index;
        self.unstable.replaced_by_snapshot(meta.index, old_commit);
    }

    /// Declares entries through `index` applied by a state machine that keeps its own durable
    /// state (they will not be handed out again). `index` must be committed; a node learns
    /// that from its state machine at start-up, so the commit index moves up with it.
    pub fn set_applied(&mut self, index: Index) {
        let index = index.min(self.persisted());
        if index > self.applied {
            self.applied = index;
            if index > self.commit {
                self.raise_commit(index);
            }
        }
    }

    /// All retained entries (for inspection by hosts and tests).
    pub fn entries(&self) -> &[Entry] {
        self.live()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{EntryPayload, ENTRY_OVERHEAD};
    use super::*;

    fn e(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            payload: EntryPayload::Noop,
        }
    }

    fn log_of(terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, t)| e(i as u64 + 1, *t))
            .collect();
        RaftLog::restore(SnapshotMeta::default(), entries)
    }

    #[test]
    fn maybe_append_truncates_conflicts_and_keeps_matching_entries() {
        let mut log = log_of(&[1, 1, 2, 2]);
        // Matching prefix, nothing new: no truncation.
        assert_eq!(log.maybe_append(1, 1, 0, vec![e(2, 1)]), Some(2));
        assert_eq!(log.last_index(), 4);
        // Conflict at 3: replaced by term 3.
        assert_eq!(log.maybe_append(2, 1, 3, vec![e(3, 3)]), Some(3));
        assert_eq!(log.last_index(), 3);
        assert_eq!(log.term(3), Some(3));
        assert_eq!(log.commit(), 3);
        assert_eq!(log.persisted(), 2);
        // Mismatch.
        assert_eq!(log.maybe_append(3, 2, 3, vec![]), None);
    }

    #[test]
    fn bytes_between_sums_sizes_and_clamps_to_the_log() {
        let log = log_of(&[1, 1, 1]);
        assert_eq!(log.bytes_between(1, 4), 3 * ENTRY_OVERHEAD);
        assert_eq!(log.bytes_between(2, 3), ENTRY_OVERHEAD);
        assert_eq!(log.bytes_between(0, 100), 3 * ENTRY_OVERHEAD);
        assert_eq!(log.bytes_between(3, 2), 0);
    }

    #[test]
    fn byte_counts_follow_appends_commits_truncations_and_compaction() {
        let mut log = log_of(&[1, 1, 1]);
        assert_eq!(
            (log.bytes(), log.committed_bytes()),
            (3 * ENTRY_OVERHEAD, 0)
        );
        log.commit_to(2);
        assert_eq!(log.committed_bytes(), 2 * ENTRY_OVERHEAD);
        assert_eq!(log.maybe_append(2, 1, 2, vec![e(3, 2), e(4, 2)]), Some(4));
        assert_eq!(log.bytes(), 4 * ENTRY_OVERHEAD);
        log.set_applied(2);
        assert!(log.compact(SnapshotMeta { index: 2, term: 1 }));
        assert_eq!(
            (log.bytes(), log.committed_bytes()),
            (2 * ENTRY_OVERHEAD, 0)
        );
        log.commit_to(4);
        assert_eq!(log.committed_bytes(), 2 * ENTRY_OVERHEAD);
    }

    #[test]
    fn find_conflict_by_term_skips_whole_terms() {
        let log = log_of(&[1, 1, 2, 2, 5, 5]);
        assert_eq!(log.find_conflict_by_term(6, 4), (4, 2));
        assert_eq!(log.find_conflict_by_term(6, 5), (6, 5));
        assert_eq!(log.find_conflict_by_term(10, 1), (2, 1));
        assert_eq!(log.find_conflict_by_term(3, 0), (0, 0));
    }

    #[test]
    fn up_to_date_compares_term_then_index() {
        let log = log_of(&[1, 2]);
        assert!(log.is_up_to_date(1, 3));
        assert!(log.is_up_to_date(2, 2));
        assert!(!log.is_up_to_date(5, 1));
        assert!(!log.is_up_to_date(1, 2));
    }

    #[test]
    fn committed_entries_wait_for_durability() {
        let mut log = log_of(&[]);
        log.append(e(1, 1));
        log.append(e(2, 1));
        log.commit_to(2);
        assert!(log.take_committed(u64::MAX).is_empty());
        assert_eq!(log.take_unstable().len(), 2);
        log.persisted_to(1, 1);
        assert_eq!(log.take_committed(u64::MAX).len(), 1);
        log.persisted_to(2, 7); // wrong term: ignored
        assert!(log.take_committed(u64::MAX).is_empty());
    }
}
