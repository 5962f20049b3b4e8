//! The KV service's wire types: commands written to the log, read-only queries, and results.
//! All are postcard-encoded; decoding failures give [`KvError::Malformed`], never a panic.

use serde::{Deserialize, Serialize};

use super::changes::{ChangeBatch, Keys};
use super::txn::{Txn, TxnOp, TxnResponse};
use crate::raft::Index;

/// A key or a value.
pub type Bytes = Vec<u8>;

/// An operation on the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    /// The value of `key`.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// Appends `value` to `key`'s value (creating it).
    Append {
        /// The key.
        key: Bytes,
        /// What to append.
        value: Bytes,
    },
    /// Removes `key`; answers whether it existed.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// Sets `key` to `new` (`None` deletes) only if its value is `expected` (`None`: absent).
    Cas {
        /// The key.
        key: Bytes,
        /// The value it must have.
        expected: Option<Bytes>,
        /// The value to set.
        new: Option<Bytes>,
    },
    /// Keys in `start..end` (`end: None`: to the last key), in order, at most `limit`.
    Scan {
        /// First key (inclusive).
        start: Bytes,
        /// Last key (exclusive), if any.
        end: Option<Bytes>,
        /// Maximum number of entries.
        limit: u32,
    },
    /// Compares on several keys, then one of two lists of operations, atomically (see
    /// [`Txn`]). Read-only when both lists only read.
    Txn(Txn),
    /// Read-only: the changes of `keys` at revisions `from` and later, in order (what a
    /// [`Watcher`](crate::kv::Watcher) polls). At most `limit` changes and about
    /// [`MAX_CHANGES_ANSWER_BYTES`](crate::kv::MAX_CHANGES_ANSWER_BYTES), except that a
    /// revision's changes are never split. Answers [`Answer::Changes`], or
    /// [`KvError::Compacted`] when changes at `from` or later were already discarded.
    Changes {
        /// Which keys.
        keys: Keys,
        /// The first revision wanted.
        from: Index,
        /// Changes per answer at most (a transaction's revision is not cut short).
        limit: u32,
    },
    /// Read-only: the replicated [`KvLimits`].
    Limits,
}

impl KvOp {
    /// True for operations that change nothing (they can be served by linearizable reads,
    /// without a log entry or a session).
    pub fn is_read(&self) -> bool {
        match self {
            KvOp::Get { .. } | KvOp::Scan { .. } | KvOp::Changes { .. } | KvOp::Limits => true,
            KvOp::Txn(t) => t.is_read_only(),
            KvOp::Put { .. } | KvOp::Append { .. } | KvOp::Delete { .. } | KvOp::Cas { .. } => {
                false
            }
        }
    }

    /// Every key it may write (a transaction's keys of both branches), in order: what a host
    /// checks to keep clients off keys it reserves (see [`KvError::Reserved`]).
    ///
    /// ```
    /// use raftkv::kv::{KvOp, Txn, TxnOp};
    /// let op = KvOp::Txn(Txn::default().then([TxnOp::get("a"), TxnOp::put("b", "1")]));
    /// let keys: Vec<&[u8]> = op.written_keys().map(|k| &k[..]).collect();
    /// assert_eq!(keys, [&b"b"[..]]);
    /// ```
    pub fn written_keys(&self) -> impl Iterator<Item = &Bytes> {
        let (single, txn) = match self {
            KvOp::Put { key, .. }
            | KvOp::Append { key, .. }
            | KvOp::Delete { key }
            | KvOp::Cas { key, .. } => (Some(key), None),
            KvOp::Txn(t) => (None, Some(t)),
            KvOp::Get { .. } | KvOp::Scan { .. } | KvOp::Changes { .. } | KvOp::Limits => {
                (None, None)
            }
        };
        let branches = txn
            .into_iter()
            .flat_map(|t| t.success.iter().chain(&t.failure))
            .filter_map(TxnOp::written_key);
        single.into_iter().chain(branches)
    }
}

/// The replicated limits of the KV state machine. They are part of the replicated state (and
/// of its snapshots), so every replica evicts and compacts identically whatever its local
/// configuration; they change only through the log ([`KvCommand::SetLimits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLimits {
    /// Open sessions at most. Opening one more evicts first the sessions that never had a
    /// request applied (oldest first), then the least recently used.
    pub max_sessions: u64,
    /// A session with no request for this many log entries expires (log time: the same on
    /// every replica).
    pub session_idle_entries: u64,
    /// Changes kept for watchers at most (whole revisions are discarded, oldest first).
    pub max_changes: u64,
    /// Bytes of keys and values kept for watchers at most (each change also counts
    /// [`CHANGE_OVERHEAD`](crate::kv::CHANGE_OVERHEAD) bytes).
    pub max_change_bytes: u64,
}

impl KvLimits {
    /// 10,000 sessions idle for at most 1,000,000 entries; the last 10,000 changes, at most
    /// 16 MiB of them.
    pub const DEFAULT: KvLimits = KvLimits {
        max_sessions: 10_000,
        session_idle_entries: 1_000_000,
        max_changes: 10_000,
        max_change_bytes: 16 << 20,
    };

    /// Checks that every limit is at least 1.
    pub fn validate(&self) -> Result<(), KvError> {
        let fields = [
            ("max_sessions", self.max_sessions),
            ("session_idle_entries", self.session_idle_entries),
            ("max_changes", self.max_changes),
            ("max_change_bytes", self.max_change_bytes),
        ];
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(KvError::InvalidLimits(format!("{name} must be at least 1"))),
            None => Ok(()),
        }
    }
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits::DEFAULT
    }
}

/// What goes into the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Opens a session for the client that picked `nonce` (at random). Idempotent: while that
    /// session lives, registering the same nonce again answers the same id, so a retry after a
    /// lost answer opens no second session. A new session's id is the index of the entry that
    /// opened it; ids are never reused.
    Register {
        /// The client's random nonce.
        nonce: u128,
    },
    /// A client's numbered request: applied at most once per `(client, seq)`.
    Request {
        /// The session.
        client: u64,
        /// The client's sequence number (from 1), larger for every new request; a retry
        /// carries the number of the request it retries.
        seq: u64,
        /// The operation.
        op: KvOp,
    },
    /// Closes a session.
    Unregister {
        /// The session.
        client: u64,
    },
    /// Replaces the replicated limits with `new` if they are `expected` (so a delayed
    /// duplicate of an old change cannot undo a newer one). Answers [`Answer::Limits`]: the
    /// limits in force afterwards (a lowered `max_sessions` evicts at once, as registering
    /// does).
    SetLimits {
        /// The limits this change replaces.
        expected: KvLimits,
        /// The new limits.
        new: KvLimits,
    },
}

/// A successful operation's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// `Get`: the value, if any.
    Value(Option<Bytes>),
    /// `Put`, `Append`, `Unregister`: done.
    Done,
    /// `Delete`: whether the key existed. `Cas`: whether it swapped.
    Flag(bool),
    /// `Scan`: the entries, in key order.
    Entries(Vec<(Bytes, Bytes)>),
    /// `Txn`: which branch ran and what its operations answered.
    Txn(TxnResponse),
    /// `Changes`: the changes found.
    Changes(ChangeBatch),
    /// `Limits`, `SetLimits`: the replicated limits (in force afterwards).
    Limits(KvLimits),
}

/// The result of a command or query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResult {
    /// The operation succeeded. `revision` is, for a write, the log index at which it was
    /// applied (a retry of an applied request gets the original's index); for a read, the
    /// index of the last entry applied to the state it read.
    Ok {
        /// See above.
        revision: Index,
        /// The answer.
        answer: Answer,
    },
    /// `Register`: the session's id.
    Registered(u64),
    /// The request was refused.
    Error(KvError),
}

/// Why the KV service refused a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// The session is unknown: it expired (evicted to keep the table bounded, or idle for
    /// too long) or was never opened. *This attempt* was not applied; an earlier attempt of
    /// the same request may have been, before the session expired (the client reports that
    /// case as an unknown outcome, never as "not applied").
    #[error("session {client} expired or unknown; this attempt was not applied")]
    SessionExpired {
        /// The session.
        client: u64,
    },
    /// A request older than the session's latest: a later request of the session was
    /// applied, so this one was applied before it or never will be, and its result is no
    /// longer kept.
    #[error("request {seq} is older than the session's latest ({latest})")]
    Stale {
        /// The request's number.
        seq: u64,
        /// The latest number seen.
        latest: u64,
    },
    /// The changes wanted (from revision `from`) were discarded to keep the change history
    /// bounded ([`KvLimits::max_changes`], [`KvLimits::max_change_bytes`]); the oldest
    /// revision still complete is `available_from`. Read the current state and watch from
    /// after its revision.
    #[error("changes from revision {from} are compacted away; available from {available_from}")]
    Compacted {
        /// The revision asked for.
        from: Index,
        /// The first revision whose changes are all kept.
        available_from: Index,
    },
    /// `SetLimits` with a limit out of range; nothing changed.
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    /// The bytes are not a command of this service.
    #[error("malformed command")]
    Malformed,
    /// A write to a key the host reserves for itself (the example's replicated address book
    /// under `__raftkv/members/`, say); not applied, and final: retrying cannot help. The
    /// state machine never answers it; a host's client port does, before proposing
    /// (see [`KvOp::written_keys`]).
    #[error(
        "key {} is reserved for the host; not applied",
        String::from_utf8_lossy(key)
    )]
    Reserved {
        /// The first reserved key the request writes.
        key: Bytes,
    },
}

/// Encodes a command for the log.
pub fn encode_command(c: &KvCommand) -> Bytes {
    postcard::to_allocvec(c).unwrap_or_default()
}

/// Encodes a read-only query.
pub fn encode_query(op: &KvOp) -> Bytes {
    postcard::to_allocvec(op).unwrap_or_default()
}

/// A request command's bytes: `op` as request `seq` of session `client`.
pub fn request(client: u64, seq: u64, op: KvOp) -> Bytes {
    encode_command(&KvCommand::Request { client, seq, op })
}
