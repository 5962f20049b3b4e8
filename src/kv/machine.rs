//! [`KvStateMachine`]: the replicated map with exactly-once client sessions, transactions,
//! revisions and a bounded change history for watchers.
//!
//! # Exactly once
//! Raft thesis §6.3: a client opens a session (a [`KvCommand::Register`] entry carrying the
//! client's random nonce; the session id is that entry's index; registering the same nonce
//! again while the session lives answers the same id) and numbers its requests. The state
//! machine keeps, per session, the number and result of the latest request: a retry of that
//! request gets the recorded result (with the original revision) and is not applied again,
//! across leader changes, crashes and snapshots (the table is part of the snapshot). An older
//! number gets [`KvError::Stale`]. A read-only operation sent as a request changes nothing, so
//! it is simply run (again, on a retry) and its answer is not kept: the table holds only the
//! answers of writes.
//!
//! Sessions end three ways, all decided by log indexes alone so every replica agrees: idle
//! for more than [`KvLimits::session_idle_entries`] entries; evicted when a registration
//! exceeds [`KvLimits::max_sessions`] (sessions that never had a request go first, oldest
//! first, then the least recently used — so a flood of registrations evicts its own sessions
//! before live clients'); or [`KvCommand::Unregister`]. A request on an ended session gets
//! [`KvError::SessionExpired`] and is not applied — but an *earlier attempt* of it may have
//! been, which only the client can know; [`KvClient`](crate::kv::KvClient) reports that case
//! as an unknown outcome.
//!
//! # Revisions and changes
//! The revision of the state is the index of the last entry applied. Every write answers the
//! index it was applied at; every read answers the revision of the state it read. Each key
//! change (put, append, delete, swap; a transaction's changes share its revision) is kept in
//! a change history, bounded by [`KvLimits::max_changes`] and [`KvLimits::max_change_bytes`],
//! which [`KvOp::Changes`] reads.
//!
//! # Limits
//! [`KvLimits`] are replicated state: they start at [`KvLimits::DEFAULT`] and change only by
//! [`KvCommand::SetLimits`] through the log, so replicas configured differently cannot
//! diverge.
//!
//! # Snapshot format
//! `b"RKVS" | u32 LE version (2) | u64 LE length | postcard(meta) | store stream`, where meta
//! holds the revision, the limits, the session table and the change history, and the store
//! stream is [`Store::write_to`]'s.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::changes::{Change, History, HistoryImage};
use super::command::{Answer, Bytes, KvCommand, KvError, KvLimits, KvOp, KvResult};
use super::sessions::{Lookup, Session, Sessions};
use super::store::Store;
use super::txn::{Txn, TxnOp, TxnResponse};
use crate::raft::Index;
use crate::state_machine::{SnapshotSource, StateMachine};

const SNAPSHOT_MAGIC: &[u8; 4] = b"RKVS";
const SNAPSHOT_VERSION: u32 = 2;

/// The KV state machine. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct KvStateMachine {
    store: Store,
    sessions: Sessions,
    history: History,
    limits: KvLimits,
    revision: Index,
}

impl KvStateMachine {
    /// An empty map with the [default limits](KvLimits::DEFAULT) (change them through the
    /// log: [`KvCommand::SetLimits`]).
    pub fn new() -> Self {
        KvStateMachine::default()
    }

    /// The map.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Number of open sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The ids of the open sessions, ascending.
    pub fn session_ids(&self) -> Vec<u64> {
        self.sessions.ids().collect()
    }

    /// The replicated limits in force.
    pub fn limits(&self) -> KvLimits {
        self.limits
    }

    /// The index of the last entry applied.
    pub fn revision(&self) -> Index {
        self.revision
    }

    /// Changes kept for watchers, and the newest revision already discarded (0: none).
    pub fn change_history(&self) -> (usize, Index) {
        (self.history.len(), self.history.compacted_through())
    }

    fn changed(&mut self, revision: Index, key: Bytes, value: Option<Bytes>) {
        let change = Change {
            revision,
            key,
            value,
        };
        self.history.record(change, &self.limits);
    }

    fn put(&mut self, index: Index, key: Bytes, value: Bytes) {
        self.store.put(key.clone(), value.clone());
        self.changed(index, key, Some(value));
    }

    fn append(&mut self, index: Index, key: Bytes, suffix: &[u8]) {
        let value = self.store.append(key.clone(), suffix).clone();
        self.changed(index, key, Some(value));
    }

    fn delete(&mut self, index: Index, key: Bytes) -> bool {
        let existed = self.store.delete(&key);
        if existed {
            self.changed(index, key, None);
        }
        existed
    }

    /// Runs a write (or a read through the log) at `index`.
    fn execute(&mut self, index: Index, op: KvOp) -> KvResult {
        let answer = match op {
            KvOp::Put { key, value } => {
                self.put(index, key, value);
                Answer::Done
            }
            KvOp::Append { key, value } => {
                self.append(index, key, &value);
                Answer::Done
            }
            KvOp::Delete { key } => Answer::Flag(self.delete(index, key)),
            KvOp::Cas { key, expected, new } => {
                if self.store.get(&key) != expected.as_ref() {
                    return ok(index, Answer::Flag(false));
                }
                match new {
                    Some(v) => self.put(index, key, v),
                    None => {
                        self.delete(index, key);
                    }
                }
                Answer::Flag(true)
            }
            KvOp::Txn(txn) => Answer::Txn(self.transaction(index, txn)),
            read => return self.read(&read),
        };
        ok(index, answer)
    }

    fn compares_hold(&self, txn: &Txn) -> bool {
        txn.compares
            .iter()
            .all(|c| c.holds(self.store.get(c.key())))
    }

    fn transaction(&mut self, index: Index, txn: Txn) -> TxnResponse {
        let succeeded = self.compares_hold(&txn);
        let ops = if succeeded { txn.success } else { txn.failure };
        let results = ops
            .into_iter()
            .map(|op| match op {
                TxnOp::Get { key } => Answer::Value(self.store.get(&key).cloned()),
                TxnOp::Put { key, value } => {
                    self.put(index, key, value);
                    Answer::Done
                }
                TxnOp::Append { key, value } => {
                    self.append(index, key, &value);
                    Answer::Done
                }
                TxnOp::Delete { key } => Answer::Flag(self.delete(index, key)),
            })
            .collect();
        TxnResponse { succeeded, results }
    }

    /// Answers a read-only operation from the current state.
    fn read(&self, op: &KvOp) -> KvResult {
        let answer = match op {
            KvOp::Get { key } => Answer::Value(self.store.get(key).cloned()),
            KvOp::Scan { start, end, limit } => {
                Answer::Entries(self.store.scan(start, end.as_deref(), *limit as usize))
            }
            KvOp::Txn(txn) if txn.is_read_only() => {
                let succeeded = self.compares_hold(txn);
                let ops = if succeeded {
                    &txn.success
                } else {
                    &txn.failure
                };
                let results = ops
                    .iter()
                    .map(|op| Answer::Value(self.store.get(op.key()).cloned()))
                    .collect();
                Answer::Txn(TxnResponse { succeeded, results })
            }
            KvOp::Changes { keys, from, limit } => {
                match self.history.read(keys, *from, *limit, self.revision) {
                    Ok(batch) => Answer::Changes(batch),
                    Err(e) => return KvResult::Error(e),
                }
            }
            KvOp::Limits => Answer::Limits(self.limits),
            _ => return KvResult::Error(KvError::Malformed),
        };
        ok(self.revision, answer)
    }

    fn apply_command(&mut self, index: Index, command: KvCommand) -> KvResult {
        match command {
            KvCommand::Register { nonce } => {
                KvResult::Registered(self.sessions.register(nonce, index, &self.limits))
            }
            KvCommand::Unregister { client } => {
                self.sessions.remove(client);
                ok(index, Answer::Done)
            }
            KvCommand::SetLimits { expected, new } => {
                if let Err(e) = new.validate() {
                    return KvResult::Error(e);
                }
                if self.limits == expected {
                    self.limits = new;
                    self.history.trim(&self.limits);
                    self.sessions.expire(index, &self.limits);
                    self.sessions.evict_to(&self.limits);
                }
                ok(index, Answer::Limits(self.limits))
            }
            KvCommand::Request { seq: 0, .. } => KvResult::Error(KvError::Malformed),
            KvCommand::Request { client, seq, op } => match self.sessions.lookup(client, seq) {
                Lookup::Unknown => KvResult::Error(KvError::SessionExpired { client }),
                Lookup::Stale { latest } => KvResult::Error(KvError::Stale { seq, latest }),
                Lookup::Retry(cached) => {
                    self.sessions.touch(client, index);
                    cached // a retry: same answer, not applied again
                }
                Lookup::New if op.is_read() => {
                    // A read through the log changes nothing: a retry may run it again, so
                    // its (possibly large) answer is not kept in the table.
                    self.sessions.touch(client, index);
                    self.execute(index, op)
                }
                Lookup::New => {
                    let result = self.execute(index, op);
                    self.sessions.record(client, seq, result.clone(), index);
                    result
                }
            },
        }
    }
}

fn ok(revision: Index, answer: Answer) -> KvResult {
    KvResult::Ok { revision, answer }
}

impl StateMachine for KvStateMachine {
    type Output = KvResult;

    fn apply(&mut self, index: Index, command: &[u8]) -> KvResult {
        self.revision = index;
        self.sessions.expire(index, &self.limits);
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
            meta: Meta {
                revision: self.revision,
                limits: self.limits,
                sessions: self.sessions.image(),
                history: self.history.image(),
            },
        })
    }

    fn restore(&mut self, input: &mut dyn Read) -> io::Result<()> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let mut header = [0u8; 16];
        input.read_exact(&mut header)?;
        let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if &header[..4] != SNAPSHOT_MAGIC || version != SNAPSHOT_VERSION {
            return Err(invalid(format!(
                "not a KV snapshot of version {SNAPSHOT_VERSION} (magic {:?}, version {version})",
                &header[..4]
            )));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&header[8..]);
        let len = u64::from_le_bytes(len);
        let mut meta = Vec::new();
        let got = input.take(len).read_to_end(&mut meta)?;
        if got as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "snapshot metadata cut short",
            ));
        }
        let meta: Meta = postcard::from_bytes(&meta).map_err(|e| invalid(e.to_string()))?;
        meta.limits.validate().map_err(|e| invalid(e.to_string()))?;
        let sessions = Sessions::from_image(meta.sessions).map_err(invalid)?;
        let history = History::from_image(meta.history).map_err(invalid)?;
        let store = Store::read_from(input)?;
        *self = KvStateMachine {
            store,
            sessions,
            history,
            limits: meta.limits,
            revision: meta.revision,
        };
        Ok(())
    }
}

/// Everything but the map, as a snapshot keeps it.
#[derive(Serialize, Deserialize)]
struct Meta {
    revision: Index,
    limits: KvLimits,
    sessions: Vec<(u64, Session)>,
    history: HistoryImage,
}

/// A point-in-time image of the whole state.
struct KvImage {
    store: Store,
    meta: Meta,
}

impl SnapshotSource for KvImage {
    /// See the [module docs](self) for the format.
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()> {
        let meta = postcard::to_allocvec(&self.meta)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        out.write_all(SNAPSHOT_MAGIC)?;
        out.write_all(&SNAPSHOT_VERSION.to_le_bytes())?;
        out.write_all(&(meta.len() as u64).to_le_bytes())?;
        out.write_all(&meta)?;
        self.store.write_to(out)
    }
}

#[cfg(test)]
mod tests;
