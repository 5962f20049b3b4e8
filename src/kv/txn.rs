//! [`Txn`] and its parts: compares, operations, the response.

use serde::{Deserialize, Serialize};

use super::command::{Answer, Bytes};

/// One condition of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key's value is `value` (`None`: the key is absent).
    Equal {
        /// The key.
        key: Bytes,
        /// The value it must have.
        value: Option<Bytes>,
    },
    /// The key's value is not `value` (`None`: the key exists, with any value).
    NotEqual {
        /// The key.
        key: Bytes,
        /// The value it must not have.
        value: Option<Bytes>,
    },
}

impl Compare {
    /// The key holds `value`.
    pub fn value(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Compare::Equal {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// The key does not hold `value` (it holds another value, or is absent).
    pub fn not_value(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Compare::NotEqual {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// The key is absent.
    pub fn absent(key: impl Into<Bytes>) -> Self {
        Compare::Equal {
            key: key.into(),
            value: None,
        }
    }

    /// The key exists (with any value).
    pub fn present(key: impl Into<Bytes>) -> Self {
        Compare::NotEqual {
            key: key.into(),
            value: None,
        }
    }

    /// The key compared.
    pub fn key(&self) -> &[u8] {
        match self {
            Compare::Equal { key, .. } | Compare::NotEqual { key, .. } => key,
        }
    }

    /// Whether the condition holds for a key whose value is `current`.
    pub fn holds(&self, current: Option<&Bytes>) -> bool {
        match self {
            Compare::Equal { value, .. } => current == value.as_ref(),
            Compare::NotEqual { value, .. } => current != value.as_ref(),
        }
    }
}

/// One operation of a [`Txn`]. Each answers as the same operation of
/// [`KvOp`](crate::kv::KvOp) does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// The value of `key` ([`Answer::Value`]).
    Get {
        /// The key.
        key: Bytes,
    },
    /// Sets `key` to `value` ([`Answer::Done`]).
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// Appends `value` to `key`'s value, creating it ([`Answer::Done`]).
    Append {
        /// The key.
        key: Bytes,
        /// What to append.
        value: Bytes,
    },
    /// Removes `key` ([`Answer::Flag`]: whether it existed).
    Delete {
        /// The key.
        key: Bytes,
    },
}

impl TxnOp {
    /// [`TxnOp::Get`].
    pub fn get(key: impl Into<Bytes>) -> Self {
        TxnOp::Get { key: key.into() }
    }
    /// [`TxnOp::Put`].
    pub fn put(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    /// [`TxnOp::Append`].
    pub fn append(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        TxnOp::Append {
            key: key.into(),
            value: value.into(),
        }
    }
    /// [`TxnOp::Delete`].
    pub fn delete(key: impl Into<Bytes>) -> Self {
        TxnOp::Delete { key: key.into() }
    }
    /// The key it works on.
    pub fn key(&self) -> &[u8] {
        match self {
            TxnOp::Get { key }
            | TxnOp::Put { key, .. }
            | TxnOp::Append { key, .. }
            | TxnOp::Delete { key } => key,
        }
    }
    /// True for [`TxnOp::Get`].
    pub fn is_read(&self) -> bool {
        matches!(self, TxnOp::Get { .. })
    }
    /// The key it writes, if it writes.
    pub fn written_key(&self) -> Option<&Bytes> {
        match self {
            TxnOp::Get { .. } => None,
            TxnOp::Put { key, .. } | TxnOp::Append { key, .. } | TxnOp::Delete { key } => Some(key),
        }
    }
}

/// An etcd-style transaction — compares on several keys; if all hold, one list of
/// operations, else the other — applied atomically as one log entry (and, like every
/// request, at most once per session and number).
///
/// ```
/// use raftkv::kv::{Compare, Txn, TxnOp};
///
/// // Move 10 from a to b, if a still holds 30 and b does not exist yet.
/// let txn = Txn::when([Compare::value("a", "30"), Compare::absent("b")])
///     .then([TxnOp::put("a", "20"), TxnOp::put("b", "10")])
///     .otherwise([TxnOp::get("a"), TxnOp::get("b")]);
/// assert!(!txn.is_read_only());
/// ```
///
/// If every compare holds, `success` runs, else `failure`; the operations run in order (a
/// `Get` sees the writes before it), all at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// The conditions (none: always `success`).
    pub compares: Vec<Compare>,
    /// What runs when every compare holds.
    pub success: Vec<TxnOp>,
    /// What runs otherwise.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// A transaction on `compares`, with no operations yet.
    pub fn when(compares: impl IntoIterator<Item = Compare>) -> Self {
        Txn {
            compares: compares.into_iter().collect(),
            ..Txn::default()
        }
    }
    /// Sets the operations that run when every compare holds.
    pub fn then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success = ops.into_iter().collect();
        self
    }
    /// Sets the operations that run otherwise.
    pub fn otherwise(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure = ops.into_iter().collect();
        self
    }
    /// True when neither branch writes (the transaction can then be served as a read).
    pub fn is_read_only(&self) -> bool {
        self.success.iter().chain(&self.failure).all(TxnOp::is_read)
    }
}

/// What a [`Txn`] answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// True when every compare held (`success` ran).
    pub succeeded: bool,
    /// The answer of each operation of the branch that ran, in order.
    pub results: Vec<Answer>,
}
