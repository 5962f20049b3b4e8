//! The KV service's wire types: commands written to the log, read-only queries, and results.
//! All are postcard-encoded; decoding failures give [`KvError::Malformed`], never a panic.

use serde::{Deserialize, Serialize};

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
}

impl KvOp {
    /// True for operations that change nothing (served by linearizable reads, not the log).
    pub fn is_read(&self) -> bool {
        matches!(self, KvOp::Get { .. } | KvOp::Scan { .. })
    }
}

/// What goes into the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Opens a client session; the session's id is the index of this entry.
    Register,
    /// A client's numbered request: applied at most once per `(client, seq)`.
    Request {
        /// The session.
        client: u64,
        /// The client's sequence number, increasing by one per new request.
        seq: u64,
        /// The operation.
        op: KvOp,
    },
    /// Closes a session.
    Unregister {
        /// The session.
        client: u64,
    },
}

/// The result of a command or query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResult {
    /// `Get`: the value, if any.
    Value(Option<Bytes>),
    /// `Put`, `Append`, `Unregister`: done.
    Done,
    /// `Delete`: whether the key existed. `Cas`: whether it swapped.
    Flag(bool),
    /// `Scan`: the entries, in key order.
    Entries(Vec<(Bytes, Bytes)>),
    /// `Register`: the new session's id.
    Registered(u64),
    /// The request was refused.
    Error(KvError),
}

/// Why the KV service refused a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// The session is unknown: it expired (evicted to keep the table bounded) or was never
    /// opened. The request was not applied; open a new session.
    #[error("session {client} expired or unknown; the request was not applied")]
    SessionExpired {
        /// The session.
        client: u64,
    },
    /// A request older than the session's latest: its result is no longer kept.
    #[error("request {seq} is older than the session's latest ({latest})")]
    Stale {
        /// The request's number.
        seq: u64,
        /// The latest number seen.
        latest: u64,
    },
    /// The bytes are not a command of this service.
    #[error("malformed command")]
    Malformed,
}

/// Encodes a command for the log.
pub fn encode_command(c: &KvCommand) -> Bytes {
    postcard::to_allocvec(c).unwrap_or_default()
}

/// Encodes a read-only query.
pub fn encode_query(op: &KvOp) -> Bytes {
    postcard::to_allocvec(op).unwrap_or_default()
}
