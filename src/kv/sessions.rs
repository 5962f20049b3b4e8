//! The session table: per client session, the number and result of its latest request, so a
//! retry is answered from the table instead of being applied again.
//!
//! Everything here is driven by log indexes only (no clocks, no local configuration), so every
//! replica keeps the same table. Invariants: `by_nonce`, `by_use` and `unused` index exactly
//! the sessions of `table` (`unused` those with no request applied yet, `last_seq == 0`);
//! ids are the indexes of the entries that opened them and are never reused.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{KvLimits, KvResult};
use crate::raft::Index;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    nonce: u128,
    pub(crate) last_seq: u64,
    pub(crate) last_result: KvResult,
    last_used: Index,
}

/// What a retry or new request finds in the table.
pub(crate) enum Lookup {
    /// No such session.
    Unknown,
    /// The session's latest request: its recorded result.
    Retry(KvResult),
    /// Older than the latest.
    Stale { latest: u64 },
    /// A new request.
    New,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Sessions {
    table: BTreeMap<u64, Session>,
    by_nonce: BTreeMap<u128, u64>,
    /// `(last_used, id)` of every session, least recently used first.
    by_use: BTreeSet<(Index, u64)>,
    /// `(last_used, id)` of the sessions with no request yet, oldest first.
    unused: BTreeSet<(Index, u64)>,
}

impl Sessions {
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// The session ids, ascending.
    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.keys().copied()
    }

    /// Opens the session of `nonce` at `index`, or finds the one it already has; evicts to
    /// stay within `limits.max_sessions`.
    pub(crate) fn register(&mut self, nonce: u128, index: Index, limits: &KvLimits) -> u64 {
        if let Some(&id) = self.by_nonce.get(&nonce) {
            self.touch(id, index);
            return id;
        }
        let session = Session {
            nonce,
            last_seq: 0,
            last_result: KvResult::Registered(index),
            last_used: index,
        };
        self.insert(index, session);
        self.evict(limits, Some(index));
        index
    }

    /// Evicts until at most `limits.max_sessions` sessions remain.
    pub(crate) fn evict_to(&mut self, limits: &KvLimits) {
        self.evict(limits, None);
    }

    /// Evicts never-used sessions first (oldest first), then the least recently used; never
    /// `keep`.
    fn evict(&mut self, limits: &KvLimits, keep: Option<u64>) {
        while self.table.len() as u64 > limits.max_sessions {
            let other = |&&(_, id): &&(Index, u64)| Some(id) != keep;
            let victim = self
                .unused
                .iter()
                .find(other)
                .or_else(|| self.by_use.iter().find(other))
                .map(|&(_, id)| id);
            match victim {
                Some(id) => self.remove(id),
                None => break,
            }
        }
    }

    /// Expires every session with no request for more than `limits.session_idle_entries`
    /// entries before `index`.
    pub(crate) fn expire(&mut self, index: Index, limits: &KvLimits) {
        while let Some(&(used, id)) = self.by_use.first() {
            if index.saturating_sub(used) <= limits.session_idle_entries {
                break;
            }
            self.remove(id);
        }
    }

    pub(crate) fn lookup(&self, id: u64, seq: u64) -> Lookup {
        match self.table.get(&id) {
            None => Lookup::Unknown,
            Some(s) if seq == s.last_seq && seq != 0 => Lookup::Retry(s.last_result.clone()),
            Some(s) if seq <= s.last_seq => Lookup::Stale { latest: s.last_seq },
            Some(_) => Lookup::New,
        }
    }

    /// Marks `id` used at `index` (a retry answered from the table counts as use).
    pub(crate) fn touch(&mut self, id: u64, index: Index) {
        let Some(s) = self.table.get_mut(&id) else {
            return;
        };
        self.by_use.remove(&(s.last_used, id));
        let was_unused = self.unused.remove(&(s.last_used, id));
        s.last_used = index;
        self.by_use.insert((index, id));
        if was_unused {
            self.unused.insert((index, id));
        }
    }

    /// Records request `seq` of `id`, applied at `index` with `result`.
    pub(crate) fn record(&mut self, id: u64, seq: u64, result: KvResult, index: Index) {
        self.touch(id, index);
        if let Some(s) = self.table.get_mut(&id) {
            if s.last_seq == 0 {
                self.unused.remove(&(s.last_used, id));
            }
            s.last_seq = seq;
            s.last_result = result;
        }
    }

    pub(crate) fn remove(&mut self, id: u64) {
        if let Some(s) = self.table.remove(&id) {
            self.by_nonce.remove(&s.nonce);
            self.by_use.remove(&(s.last_used, id));
            self.unused.remove(&(s.last_used, id));
        }
    }

    fn insert(&mut self, id: u64, s: Session) {
        self.by_nonce.insert(s.nonce, id);
        self.by_use.insert((s.last_used, id));
        if s.last_seq == 0 {
            self.unused.insert((s.last_used, id));
        }
        self.table.insert(id, s);
    }

    /// The table as a snapshot keeps it.
    pub(crate) fn image(&self) -> Vec<(u64, Session)> {
        self.table.iter().map(|(id, s)| (*id, s.clone())).collect()
    }

    pub(crate) fn from_image(image: Vec<(u64, Session)>) -> Result<Sessions, String> {
        let mut sessions = Sessions::default();
        for (id, s) in image {
            if sessions.table.contains_key(&id) || sessions.by_nonce.contains_key(&s.nonce) {
                return Err(format!("session {id} or its nonce is listed twice"));
            }
            sessions.insert(id, s);
        }
        Ok(sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_sessions: u64, session_idle_entries: u64) -> KvLimits {
        KvLimits {
            max_sessions,
            session_idle_entries,
            ..KvLimits::DEFAULT
        }
    }

    #[test]
    fn registering_is_idempotent_per_nonce() {
        let mut s = Sessions::default();
        let l = KvLimits::DEFAULT;
        assert_eq!(s.register(7, 1, &l), 1);
        assert_eq!(s.register(7, 5, &l), 1, "the same nonce finds its session");
        assert_eq!(s.register(8, 6, &l), 6);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn eviction_takes_never_used_sessions_first_then_the_least_recently_used() {
        let mut s = Sessions::default();
        let l = limits(3, u64::MAX);
        let a = s.register(1, 1, &l);
        let b = s.register(2, 2, &l);
        s.record(a, 1, KvResult::Registered(0), 3);
        s.record(b, 1, KvResult::Registered(0), 4);
        // A flood of registrations that never send a request evict one another, not a or b.
        for i in 0..50u64 {
            s.register(100 + u128::from(i), 10 + i, &l);
        }
        let ids: Vec<u64> = s.ids().collect();
        assert_eq!(ids, vec![a, b, 59]);
        // With no unused session left to evict, the least recently used goes: a.
        s.record(59, 1, KvResult::Registered(0), 70);
        s.register(999, 71, &l);
        let ids: Vec<u64> = s.ids().collect();
        assert_eq!(ids, vec![b, 59, 71]);
    }

    #[test]
    fn idle_sessions_expire_by_log_index() {
        let mut s = Sessions::default();
        let l = limits(100, 10);
        let a = s.register(1, 1, &l);
        let b = s.register(2, 5, &l);
        s.expire(11, &l);
        assert_eq!(s.len(), 2, "a was used 10 entries ago: still alive");
        s.expire(12, &l);
        assert!(matches!(s.lookup(a, 1), Lookup::Unknown));
        assert!(matches!(s.lookup(b, 1), Lookup::New));
        s.touch(b, 14);
        s.expire(24, &l);
        assert_eq!(s.len(), 1);
        s.expire(25, &l);
        assert_eq!(s.len(), 0);
    }
}
