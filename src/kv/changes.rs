//! The change history watchers read: every change to a key, in log order, the most recent
//! ones kept in the replicated state (and its snapshots), so a watcher sees the same changes
//! in the same order whichever replica it asks, across leader changes, restarts and snapshot
//! installs.
//!
//! Invariants of [`History`]: changes are in non-decreasing revision order; every change with
//! a revision above `compacted_through` is kept (revisions are discarded whole, oldest first);
//! `bytes` is the sum of [`Change::cost`] over the kept changes, and after every trim
//! `changes.len() <= max_changes` and `bytes <= max_change_bytes`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::command::{Bytes, KvError, KvLimits};
use crate::raft::Index;

/// Bytes of bookkeeping each kept change counts for, beside its key and value.
pub const CHANGE_OVERHEAD: u64 = 32;

/// An answer to [`KvOp::Changes`](crate::kv::KvOp::Changes) stops once its changes cost this
/// many bytes ([`Change::cost`]; a revision is still never split), so that it fits a frame of
/// the usual transports.
pub const MAX_CHANGES_ANSWER_BYTES: u64 = 4 << 20;

/// Which keys a watcher follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Keys {
    /// One key.
    Key(Bytes),
    /// Every key that starts with these bytes (empty: every key).
    Prefix(Bytes),
}

impl Keys {
    /// Whether `key` is one of them.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            Keys::Key(k) => k.as_slice() == key,
            Keys::Prefix(p) => key.starts_with(p),
        }
    }
}

/// One change of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The index of the log entry that made it (a transaction's changes share one).
    pub revision: Index,
    /// The key.
    pub key: Bytes,
    /// Its new value; `None`: deleted.
    pub value: Option<Bytes>,
}

impl Change {
    /// What the change counts against [`KvLimits::max_change_bytes`].
    pub fn cost(&self) -> u64 {
        (self.key.len() + self.value.as_ref().map_or(0, Vec::len)) as u64 + CHANGE_OVERHEAD
    }
}

/// An answer to [`KvOp::Changes`](crate::kv::KvOp::Changes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeBatch {
    /// The matching changes, in order.
    pub changes: Vec<Change>,
    /// The answer is complete through this revision: every matching change up to it is in
    /// `changes` (or was before `from`). Ask again from `through + 1`.
    pub through: Index,
}

/// The bounded change history. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    changes: VecDeque<Change>,
    bytes: u64,
    compacted_through: Index,
}

/// What a snapshot keeps of a [`History`].
#[derive(Serialize, Deserialize)]
pub(crate) struct HistoryImage {
    compacted_through: Index,
    changes: Vec<Change>,
}

impl History {
    /// Records a change and trims to `limits`.
    pub(crate) fn record(&mut self, change: Change, limits: &KvLimits) {
        debug_assert!(self
            .changes
            .back()
            .is_none_or(|last| last.revision <= change.revision));
        self.bytes += change.cost();
        self.changes.push_back(change);
        self.trim(limits);
    }

    /// Discards the oldest revisions, whole, until the history fits `limits`.
    pub(crate) fn trim(&mut self, limits: &KvLimits) {
        while self.changes.len() as u64 > limits.max_changes || self.bytes > limits.max_change_bytes
        {
            let Some(oldest) = self.changes.front().map(|c| c.revision) else {
                break;
            };
            while self.changes.front().is_some_and(|c| c.revision == oldest) {
                if let Some(c) = self.changes.pop_front() {
                    self.bytes -= c.cost();
                }
            }
            self.compacted_through = oldest;
        }
    }

    /// The changes of `keys` from revision `from`, at most `limit` and about
    /// [`MAX_CHANGES_ANSWER_BYTES`] (a revision is never split), complete through the returned
    /// `through`; `revision` is the state's revision.
    pub(crate) fn read(
        &self,
        keys: &Keys,
        from: Index,
        limit: u32,
        revision: Index,
    ) -> Result<ChangeBatch, KvError> {
        let from = from.max(1);
        if from <= self.compacted_through {
            return Err(KvError::Compacted {
                from,
                available_from: self.compacted_through + 1,
            });
        }
        let limit = limit.max(1) as usize;
        let start = self.changes.partition_point(|c| c.revision < from);
        let mut found: Vec<Change> = Vec::new();
        let mut bytes = 0;
        for c in self.changes.range(start..) {
            let full = found.len() >= limit || bytes >= MAX_CHANGES_ANSWER_BYTES;
            if full && found.last().is_some_and(|l| l.revision != c.revision) {
                // Complete through the revision before this one.
                return Ok(ChangeBatch {
                    through: c.revision - 1,
                    changes: found,
                });
            }
            if keys.contains(&c.key) {
                bytes += c.cost();
                found.push(c.clone());
            }
        }
        Ok(ChangeBatch {
            changes: found,
            through: revision.max(from - 1),
        })
    }

    /// Number of changes kept.
    pub(crate) fn len(&self) -> usize {
        self.changes.len()
    }

    /// The newest revision discarded (0: none yet).
    pub(crate) fn compacted_through(&self) -> Index {
        self.compacted_through
    }

    pub(crate) fn image(&self) -> HistoryImage {
        HistoryImage {
            compacted_through: self.compacted_through,
            changes: self.changes.iter().cloned().collect(),
        }
    }

    pub(crate) fn from_image(image: HistoryImage) -> Result<History, String> {
        let sorted = image
            .changes
            .windows(2)
            .all(|w| w[0].revision <= w[1].revision);
        let above = image
            .changes
            .first()
            .is_none_or(|c| c.revision > image.compacted_through);
        if !sorted || !above {
            return Err("change history out of order".into());
        }
        let bytes = image.changes.iter().map(Change::cost).sum();
        Ok(History {
            changes: image.changes.into(),
            bytes,
            compacted_through: image.compacted_through,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: Index, key: &str, value: Option<&str>) -> Change {
        Change {
            revision,
            key: key.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
        }
    }

    fn limits(max_changes: u64, max_change_bytes: u64) -> KvLimits {
        KvLimits {
            max_changes,
            max_change_bytes,
            ..KvLimits::DEFAULT
        }
    }

    #[test]
    fn reads_filter_by_keys_and_never_split_a_revision() {
        let mut h = History::default();
        let l = KvLimits::DEFAULT;
        h.record(change(2, "a/1", Some("x")), &l);
        h.record(change(3, "b", Some("y")), &l);
        h.record(change(5, "a/2", Some("z")), &l);
        h.record(change(5, "a/3", None), &l);
        h.record(change(6, "a/1", None), &l);
        let prefix = Keys::Prefix(b"a/".to_vec());
        let all = h.read(&prefix, 1, 100, 7).unwrap();
        assert_eq!(all.through, 7);
        let revs: Vec<Index> = all.changes.iter().map(|c| c.revision).collect();
        assert_eq!(revs, vec![2, 5, 5, 6]);
        // A limit of 2 after one change of revision 5: the rest of revision 5 comes too.
        let first = h.read(&prefix, 1, 2, 7).unwrap();
        assert_eq!(first.changes.len(), 3);
        assert_eq!(first.through, 5);
        let rest = h.read(&prefix, first.through + 1, 2, 7).unwrap();
        assert_eq!(rest.changes, vec![change(6, "a/1", None)]);
        assert_eq!(rest.through, 7);
        let one = h.read(&Keys::Key(b"b".to_vec()), 3, 10, 7).unwrap();
        assert_eq!(one.changes, vec![change(3, "b", Some("y"))]);
        // Asking beyond the state: empty, complete through what was asked before.
        assert_eq!(h.read(&prefix, 20, 10, 7).unwrap().through, 19);
        // Big values: an answer stops at about MAX_CHANGES_ANSWER_BYTES.
        let mut big = History::default();
        let value = "x".repeat(1 << 20);
        for r in 1..=10 {
            big.record(change(r, "k", Some(&value)), &l);
        }
        let first = big.read(&prefix_all(), 1, 100, 10).unwrap();
        assert_eq!(first.changes.len(), 4);
        assert_eq!(first.through, 4);
    }

    fn prefix_all() -> Keys {
        Keys::Prefix(Vec::new())
    }

    #[test]
    fn trimming_discards_whole_revisions_and_reports_compaction() {
        let mut h = History::default();
        let l = limits(3, u64::MAX);
        h.record(change(1, "k", Some("1")), &l);
        h.record(change(2, "k", Some("2")), &l);
        h.record(change(2, "j", Some("2")), &l);
        h.record(change(3, "k", Some("3")), &l);
        // Four changes, bound three: revision 1 goes.
        assert_eq!(h.len(), 3);
        assert_eq!(h.compacted_through(), 1);
        assert_eq!(
            h.read(&Keys::Prefix(vec![]), 1, 10, 3),
            Err(KvError::Compacted {
                from: 1,
                available_from: 2
            })
        );
        assert_eq!(
            h.read(&Keys::Prefix(vec![]), 2, 10, 3)
                .unwrap()
                .changes
                .len(),
            3
        );
        h.record(change(4, "k", Some("4")), &l);
        // Revision 2's two changes go together.
        assert_eq!(h.len(), 2);
        assert_eq!(h.compacted_through(), 2);
        // The byte bound too.
        let mut b = History::default();
        let small = limits(100, 2 * (CHANGE_OVERHEAD + 2));
        for r in 1..=5 {
            b.record(change(r, "k", Some("v")), &small);
        }
        assert_eq!(b.len(), 2);
        assert_eq!(b.compacted_through(), 3);
        let image = b.image();
        let back = History::from_image(image).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.bytes, b.bytes);
        assert_eq!(back.compacted_through(), 3);
    }
}
