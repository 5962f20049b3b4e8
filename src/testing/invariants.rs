//! Raft's safety properties, checked incrementally after every simulation step.
//!
//! Each node's log is mirrored as a chain of hashes: the hash at index `i` covers the terms and
//! payloads of every entry up to `i`. Equal chain hashes at one index mean equal log prefixes,
//! so the properties reduce to cheap comparisons:
//! - **election safety**: at most one leader per term;
//! - **log matching**: two logs holding an entry with the same index and term hold the same
//!   prefix up to it (one registry of chain hashes per `(index, term)`);
//! - **state machine safety**: every node that learns an index is committed holds the same
//!   prefix there; no two nodes ever apply different entries at one index;
//! - **leader completeness**: a new leader of term `t` holds every entry committed in a term
//!   before `t`;
//! - **apply order**: within one incarnation of a node, applied indexes go up by exactly one.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use crate::raft::{Entry, EntryPayload, Index, NodeId, Term};

/// Chain hash of `entry` following a prefix whose chain hash is `prev`.
fn chain(prev: u64, entry: &Entry) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prev.hash(&mut h);
    entry.term.hash(&mut h);
    match &entry.payload {
        EntryPayload::Noop => 0u8.hash(&mut h),
        EntryPayload::Command(p) => {
            1u8.hash(&mut h);
            p.as_bytes().hash(&mut h);
        }
        EntryPayload::Membership(m) => {
            2u8.hash(&mut h);
            m.hash(&mut h);
        }
    }
    h.finish()
}

/// One node's log, as chain hashes.
#[derive(Clone, Debug, Default)]
pub struct LogMirror {
    /// Index of the entry before `hashes[0]`.
    base: Index,
    base_hash: u64,
    /// `(term, chain hash)` of entries `base+1 ..`.
    hashes: Vec<(Term, u64)>,
}

impl LogMirror {
    fn last_index(&self) -> Index {
        self.base + self.hashes.len() as u64
    }
    fn at(&self, index: Index) -> Option<(Term, u64)> {
        if index == self.base {
            return Some((0, self.base_hash));
        }
        index
            .checked_sub(self.base + 1)
            .and_then(|i| self.hashes.get(i as usize).copied())
    }
}

/// The safety checker. Panics, naming the seed, on the first violation.
#[derive(Debug, Default)]
pub struct Checker {
    seed: u64,
    leaders: BTreeMap<Term, NodeId>,
    by_position: HashMap<(Index, Term), u64>,
    /// `(term, chain hash)` of the committed prefix, index `i` at `committed[i - 1]`.
    committed: Vec<(Term, u64)>,
    /// Number of checks made (so a test can show the checker ran).
    pub checks: u64,
}

impl Checker {
    pub(crate) fn new(seed: u64) -> Self {
        Checker {
            seed,
            ..Default::default()
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "safety violation (replay with RAFTKV_SEED={}): {what}",
            self.seed
        )
    }

    /// A mirror for a log restored from storage with the given entries after `base`.
    pub(crate) fn mirror_restored(
        &mut self,
        node: NodeId,
        base: Index,
        entries: &[Entry],
    ) -> LogMirror {
        let base_hash = match base {
            0 => 0,
            b => self.committed.get(b as usize - 1).map_or(0, |c| c.1),
        };
        let mut m = LogMirror {
            base,
            base_hash,
            hashes: Vec::new(),
        };
        self.log_write(node, &mut m, entries);
        m
    }

    /// Entries were written to a node's log (replacing everything from the first one on).
    pub(crate) fn log_write(&mut self, node: NodeId, m: &mut LogMirror, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        if first.index <= m.base || first.index > m.last_index() + 1 {
            self.fail(format!(
                "node {node} wrote at {} outside its log ({}..={})",
                first.index,
                m.base + 1,
                m.last_index() + 1
            ));
        }
        m.hashes.truncate((first.index - m.base - 1) as usize);
        let mut prev = m.at(first.index - 1).map_or(0, |x| x.1);
        for e in entries {
            self.checks += 1;
            if let Some(&(last_term, _)) = m.hashes.last() {
                if e.term < last_term {
                    self.fail(format!("node {node}: term goes down at index {}", e.index));
                }
            }
            prev = chain(prev, e);
            m.hashes.push((e.term, prev));
            match self.by_position.get(&(e.index, e.term)) {
                Some(&h) if h != prev => self.fail(format!(
                    "log matching: node {node} holds ({}, term {}) with a different prefix than another node",
                    e.index, e.term
                )),
                Some(_) => {}
                None => {
                    self.by_position.insert((e.index, e.term), prev);
                }
            }
        }
    }

    /// A node's log now starts after a snapshot through `index` (it compacted, or installed
    /// a leader's snapshot): entries up to it leave the mirror. A kept suffix keeps its hashes
    /// if it extends the committed prefix; otherwise the log starts empty after the snapshot.
    pub(crate) fn rebase(&mut self, node: NodeId, m: &mut LogMirror, index: Index) {
        if index <= m.base {
            return;
        }
        let Some(&(_, committed)) = self.committed.get(index as usize - 1) else {
            self.fail(format!(
                "node {node} holds a snapshot through {index}, beyond anything committed"
            ))
        };
        match m.at(index) {
            Some((_, h)) if h == committed => {
                m.hashes.drain(..(index - m.base) as usize);
            }
            _ => m.hashes.clear(),
        }
        m.base = index;
        m.base_hash = committed;
    }

    /// A node is leader of `term`.
    pub(crate) fn leader(&mut self, node: NodeId, term: Term, m: &LogMirror) {
        self.checks += 1;
        match self.leaders.get(&term) {
            Some(&other) if other != node => {
                self.fail(format!("two leaders in term {term}: {other} and {node}"))
            }
            Some(_) => return,
            None => {
                self.leaders.insert(term, node);
            }
        }
        // Leader completeness: every entry committed in an earlier term is in its log.
        let upto = self.committed.partition_point(|(t, _)| *t < term) as u64;
        if upto > m.base {
            let want = self.committed[upto as usize - 1].1;
            if m.at(upto).map(|x| x.1) != Some(want) {
                self.fail(format!("leader completeness: leader {node} of term {term} lacks committed entry {upto}"));
            }
        }
    }

    /// A node knows its log is committed through `commit`.
    pub(crate) fn commit(&mut self, node: NodeId, commit: Index, m: &LogMirror) {
        if commit <= m.base {
            return;
        }
        self.checks += 1;
        let Some((term, hash)) = m.at(commit) else {
            self.fail(format!("node {node} commits {commit} beyond its log"))
        };
        let known = self.committed.len() as u64;
        if commit <= known {
            if self.committed[commit as usize - 1].1 != hash {
                self.fail(format!(
                    "node {node} committed a different entry at {commit} than another node"
                ));
            }
        } else {
            if known > m.base
                && m.at(known).map(|x| x.1) != Some(self.committed[known as usize - 1].1)
            {
                self.fail(format!(
                    "node {node} committed through {commit} over a different committed prefix"
                ));
            }
            for i in (known + 1).max(m.base + 1)..=commit {
                let at = m.at(i).expect("within the mirror");
                self.committed.push(at);
            }
            let _ = term;
        }
    }

    /// A node applied `entry`, right after `last_applied` in this incarnation.
    pub(crate) fn apply(
        &mut self,
        node: NodeId,
        last_applied: Index,
        entry: &Entry,
        m: &LogMirror,
    ) {
        self.checks += 1;
        if entry.index != last_applied + 1 {
            self.fail(format!(
                "node {node} applied {} right after {last_applied}",
                entry.index
            ));
        }
        let committed = self.committed.get(entry.index as usize - 1).map(|c| c.1);
        let applied = m.at(entry.index - 1).map(|(_, prev)| chain(prev, entry));
        if committed.is_none() || applied != committed {
            self.fail(format!(
                "node {node} applied entry {} that differs from the committed one",
                entry.index
            ));
        }
    }

    /// Term of the committed entry at `index`, if known.
    pub fn committed_term(&self, index: Index) -> Option<Term> {
        let i = usize::try_from(index.checked_sub(1)?).ok()?;
        self.committed.get(i).map(|c| c.0)
    }

    /// Highest index known committed anywhere.
    pub fn committed_index(&self) -> Index {
        self.committed.len() as u64
    }

    /// Leaders seen, by term.
    pub fn leaders(&self) -> &BTreeMap<Term, NodeId> {
        &self.leaders
    }
}

#[cfg(test)]
mod tests {
    //! The checker must fail on each violation it claims to detect.
    use super::*;
    use crate::raft::Payload;

    fn e(index: Index, term: Term, cmd: &str) -> Entry {
        Entry {
            index,
            term,
            payload: EntryPayload::Command(Payload::from(cmd)),
        }
    }

    fn panics(f: impl FnOnce()) -> bool {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err()
    }

    #[test]
    fn two_leaders_in_one_term_fail() {
        let mut c = Checker::new(1);
        let m = LogMirror::default();
        c.leader(1, 3, &m);
        c.leader(1, 3, &m); // the same leader again is fine
        assert!(panics(|| c.leader(2, 3, &m)));
    }

    #[test]
    fn same_index_and_term_with_different_prefixes_fail() {
        let mut c = Checker::new(1);
        let (mut a, mut b) = (LogMirror::default(), LogMirror::default());
        c.log_write(1, &mut a, &[e(1, 1, "x"), e(2, 1, "y")]);
        c.log_write(2, &mut b, &[e(1, 1, "x")]);
        assert!(panics(|| c.log_write(2, &mut b, &[e(2, 1, "z")])));
    }

    #[test]
    fn committing_or_applying_a_different_entry_fails() {
        let mut c = Checker::new(1);
        let (mut a, mut b) = (LogMirror::default(), LogMirror::default());
        c.log_write(1, &mut a, &[e(1, 1, "x")]);
        c.log_write(2, &mut b, &[e(1, 2, "y")]);
        c.commit(1, 1, &a);
        c.apply(1, 0, &e(1, 1, "x"), &a);
        assert!(panics(|| c.commit(2, 1, &b)));
        let mut c2 = Checker::new(1);
        c2.log_write(1, &mut LogMirror::default(), &[]);
        let mut m = LogMirror::default();
        c2.log_write(1, &mut m, &[e(1, 1, "x")]);
        c2.commit(1, 1, &m);
        assert!(panics(|| c2.apply(1, 0, &e(1, 1, "not x"), &m)));
    }

    #[test]
    fn applying_out_of_order_fails() {
        let mut c = Checker::new(1);
        let mut m = LogMirror::default();
        c.log_write(1, &mut m, &[e(1, 1, "x"), e(2, 1, "y")]);
        c.commit(1, 2, &m);
        assert!(panics(|| c.apply(1, 0, &e(2, 1, "y"), &m)));
    }

    #[test]
    fn a_leader_missing_a_committed_entry_fails() {
        let mut c = Checker::new(1);
        let (mut a, mut b) = (LogMirror::default(), LogMirror::default());
        c.log_write(1, &mut a, &[e(1, 1, "x")]);
        c.commit(1, 1, &a);
        c.log_write(2, &mut b, &[]);
        assert!(panics(|| c.leader(2, 2, &b)));
        // A leader that holds it is fine.
        c.leader(1, 3, &a);
    }
}
