//! [`KvStateMachine`]: the replicated map with exactly-once client sessions.
//!
//! Exactly-once (Raft thesis §6.3): a client opens a session (a `Register` entry; the session
//! id is that entry's index) and numbers its requests. The state machine keeps, per session,
//! the number and result of the latest request: a retry of that request gets the recorded
//! result and is not applied again, across leader changes, crashes and snapshots (the table is
//! part of the snapshot). An older number gets [`KvError::Stale`].
//!
//! The table is bounded: past `max_sessions`, the session used least recently (by log index,
//! so every node evicts the same one) is dropped. A request on a dropped session gets
//! [`KvError::SessionExpired`] and is not applied — never applied a second time.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::command::{Bytes, KvCommand, KvError, KvOp, KvResult};
use super::store::Store;
use crate::raft::Index;
use crate::state_machine::{SnapshotSource, StateMachine};

/// Default bound on open sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    last_seq: u64,
    last_result: KvResult,
    last_used: Index,
}

/// The KV state machine. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct KvStateMachine {
    store: Store,
    sessions: BTreeMap<u64, Session>,
    /// `(last_used, client)` for every session, least recently used first.
    by_use: BTreeSet<(Index, u64)>,
    max_sessions: usize,
}

impl Default for KvStateMachine {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SESSIONS)
    }
}

impl KvStateMachine {
    /// An empty map keeping at most `max_sessions` sessions (at least 1).
    pub fn new(max_sessions: usize) -> Self {
        KvStateMachine {
            store: Store::default(),
            sessions: BTreeMap::new(),
            by_use: BTreeSet::new(),
            max_sessions: max_sessions.max(1),
        }
    }

    /// The map.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Number of open sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn touch(&mut self, client: u64, index: Index) {
        if let Some(s) = self.sessions.get_mut(&client) {
            self.by_use.remove(&(s.last_used, client));
            s.last_used = index;
            self.by_use.insert((index, client));
        }
    }

    fn execute(&mut self, op: KvOp) -> KvResult {
        match op {
            KvOp::Get { .. } | KvOp::Scan { .. } => self.read(&op),
            KvOp::Put { key, value } => {
                self.store.put(key, value);
                KvResult::Done
            }
            KvOp::Append { key, value } => {
                self.store.append(key, &value);
                KvResult::Done
            }
            KvOp::Delete { key } => KvResult::Flag(self.store.delete(&key)),
            KvOp::Cas { key, expected, new } => {
                if self.store.get(&key) != expected.as_ref() {
                    return KvResult::Flag(false);
                }
                match new {
                    Some(v) => {
                        self.store.put(key, v);
                    }
                    None => {
                        self.store.delete(&key);
                    }
                }
                KvResult::Flag(true)
            }
        }
    }

    fn read(&self, op: &KvOp) -> KvResult {
        match op {
            KvOp::Get { key } => KvResult::Value(self.store.get(key).cloned()),
            KvOp::Scan { start, end, limit } => {
                KvResult::Entries(self.store.scan(start, end.as_deref(), *limit as usize))
            }
            _ => KvResult::Error(KvError::Malformed),
        }
    }

    fn apply_command(&mut self, index: Index, command: KvCommand) -> KvResult {
        match command {
            KvCommand::Register => {
                let s = Session {
                    last_seq: 0,
                    last_result: KvResult::Done,
                    last_used: index,
                };
                self.sessions.insert(index, s);
                self.by_use.insert((index, index));
                while self.sessions.len() > self.max_sessions {
                    let Some(&(used, oldest)) = self.by_use.iter().next() else {
                        break;
                    };
                    self.by_use.remove(&(used, oldest));
                    self.sessions.remove(&oldest);
                }
                KvResult::Registered(index)
            }
            KvCommand::Unregister { client } => {
                if let Some(s) = self.sessions.remove(&client) {
                    self.by_use.remove(&(s.last_used, client));
                }
                KvResult::Done
            }
            KvCommand::Request { client, seq, op } => {
                let Some(session) = self.sessions.get(&client) else {
                    return KvResult::Error(KvError::SessionExpired { client });
                };
                if seq == session.last_seq && seq != 0 {
                    let cached = session.last_result.clone();
                    self.touch(client, index);
                    return cached; // a retry: same answer, not applied again
                }
                if seq < session.last_seq {
                    let latest = session.last_seq;
                    return KvResult::Error(KvError::Stale { seq, latest });
                }
                let result = self.execute(op);
                if let Some(s) = self.sessions.get_mut(&client) {
                    s.last_seq = seq;
                    s.last_result = result.clone();
                }
                self.touch(client, index);
                result
            }
        }
    }
}

impl StateMachine for KvStateMachine {
    type Output = KvResult;

    fn apply(&mut self, index: Index, command: &[u8]) -> KvResult {
        match postcard::from_bytes::<KvCommand>(command) {
            Ok(c) => self.apply_command(index, c),
            Err(_) => KvResult::Error(KvError::Malformed),
        }
    }

    fn query(&self, query: &[u8]) -> Option<KvResult> {
        Some(match postcard::from_bytes::<KvOp>(query) {
            Ok(op) if op.is_read() => self.read(&op),
            _ => KvResult::Error(KvError::Malformed),
        })
    }

    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(KvImage {
            store: self.store.image(),
            sessions: self.sessions.clone(),
        })
    }

    fn restore(&mut self, input: &mut dyn Read) -> io::Result<()> {
        let mut len = [0u8; 8];
        input.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        let mut table = Vec::new();
        let got = input.take(len).read_to_end(&mut table)?;
        if got as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "session table cut short",
            ));
        }
        let sessions: BTreeMap<u64, Session> = postcard::from_bytes(&table)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let store = Store::read_from(input)?;
        self.by_use = sessions.iter().map(|(c, s)| (s.last_used, *c)).collect();
        self.sessions = sessions;
        self.store = store;
        Ok(())
    }
}

/// A point-in-time image of the map and the session table.
struct KvImage {
    store: Store,
    sessions: BTreeMap<u64, Session>,
}

impl SnapshotSource for KvImage {
    /// `u64 LE length | postcard(session table) | store stream` (see [`Store::write_to`]).
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()> {
        let table = postcard::to_allocvec(&self.sessions)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        out.write_all(&(table.len() as u64).to_le_bytes())?;
        out.write_all(&table)?;
        self.store.write_to(out)
    }
}

/// Shorthand used by tests and clients: a request command's bytes.
pub fn request(client: u64, seq: u64, op: KvOp) -> Bytes {
    super::command::encode_command(&KvCommand::Request { client, seq, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::command::encode_command;

    fn b(s: &str) -> Bytes {
        s.as_bytes().to_vec()
    }
    fn put(k: &str, v: &str) -> KvOp {
        KvOp::Put {
            key: b(k),
            value: b(v),
        }
    }
    fn register(m: &mut KvStateMachine, index: Index) -> u64 {
        match m.apply(index, &encode_command(&KvCommand::Register)) {
            KvResult::Registered(id) => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retried_request_is_answered_from_the_session_and_not_applied_again() {
        let mut m = KvStateMachine::default();
        let c = register(&mut m, 1);
        let append = KvOp::Append {
            key: b("k"),
            value: b("x"),
        };
        assert_eq!(m.apply(2, &request(c, 1, append.clone())), KvResult::Done);
        assert_eq!(m.apply(3, &request(c, 1, append.clone())), KvResult::Done);
        assert_eq!(m.store().get(b"k"), Some(&b("x")), "applied twice");
        assert_eq!(m.apply(4, &request(c, 2, append)), KvResult::Done);
        assert_eq!(m.store().get(b"k"), Some(&b("xx")));
        let cas = KvOp::Cas {
            key: b("k"),
            expected: Some(b("xx")),
            new: None,
        };
        assert_eq!(
            m.apply(5, &request(c, 3, cas.clone())),
            KvResult::Flag(true)
        );
        assert_eq!(
            m.apply(6, &request(c, 3, cas)),
            KvResult::Flag(true),
            "the retry gets the original answer"
        );
        assert_eq!(
            m.apply(7, &request(c, 1, put("k", "old"))),
            KvResult::Error(KvError::Stale { seq: 1, latest: 3 })
        );
        assert_eq!(m.store().get(b"k"), None);
    }

    #[test]
    fn expired_sessions_get_a_clear_error_and_nothing_is_applied() {
        let mut m = KvStateMachine::new(2);
        let a = register(&mut m, 1);
        let c2 = register(&mut m, 2);
        assert_eq!(m.apply(3, &request(a, 1, put("a", "1"))), KvResult::Done); // a is now fresher
        let c3 = register(&mut m, 4); // evicts c2, the least recently used
        assert_eq!(m.sessions(), 2);
        assert_eq!(
            m.apply(5, &request(c2, 1, put("c2", "1"))),
            KvResult::Error(KvError::SessionExpired { client: c2 })
        );
        assert_eq!(m.store().get(b"c2"), None);
        assert_eq!(m.apply(6, &request(c3, 1, put("c3", "1"))), KvResult::Done);
        assert_eq!(
            m.apply(7, &request(a, 1, put("a", "1"))),
            KvResult::Done,
            "a kept its session"
        );
    }

    #[test]
    fn snapshots_carry_the_map_and_the_sessions_and_stay_small() {
        let mut m = KvStateMachine::default();
        let c = register(&mut m, 1);
        for (i, k) in ["x", "y", "z", "w", "v"].iter().enumerate() {
            m.apply(2 + i as u64, &request(c, 1 + i as u64, put(k, "value")));
        }
        for i in 0..1000u64 {
            // A long history of overwrites of one key: the snapshot does not grow with it.
            m.apply(10 + i, &request(c, 6 + i, put("x", "v2")));
        }
        let mut bytes = Vec::new();
        m.snapshot().write_to(&mut bytes).unwrap();
        assert!(
            bytes.len() < 300,
            "snapshot of 5 keys is {} bytes",
            bytes.len()
        );
        let mut n = KvStateMachine::default();
        n.restore(&mut bytes.as_slice()).unwrap();
        assert_eq!(n.store().scan(b"", None, 10), m.store().scan(b"", None, 10));
        // The restored session still de-duplicates the last request.
        let last = request(c, 1005, put("x", "v2"));
        assert_eq!(n.apply(2000, &last), KvResult::Done);
        assert_eq!(
            n.apply(2001, &request(c, 3, put("x", "old"))),
            KvResult::Error(KvError::Stale {
                seq: 3,
                latest: 1005
            })
        );
        // A cut snapshot is an error, not a half-restored state.
        assert!(KvStateMachine::default()
            .restore(&mut &bytes[..bytes.len() - 3])
            .is_err());
    }

    #[test]
    fn queries_and_malformed_input() {
        let mut m = KvStateMachine::default();
        let c = register(&mut m, 1);
        m.apply(2, &request(c, 1, put("k", "v")));
        let get = crate::kv::encode_query(&KvOp::Get { key: b("k") });
        assert_eq!(m.query(&get), Some(KvResult::Value(Some(b("v")))));
        let write = crate::kv::encode_query(&put("k", "w"));
        assert_eq!(
            m.query(&write),
            Some(KvResult::Error(KvError::Malformed)),
            "queries cannot write"
        );
        let mut rng = crate::raft::Rng::new(9);
        for _ in 0..5_000 {
            let len = rng.range(0, 40) as usize;
            let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let _ = m.apply(3, &junk); // must not panic
            let _ = m.query(&junk);
        }
        assert_eq!(m.store().get(b"k"), Some(&b("v")));
    }
}
