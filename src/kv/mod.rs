//! The ready-made replicated key/value map: [`KvStateMachine`] (byte keys and values; get,
//! put, append, delete, compare-and-swap, ordered scans, [transactions](Txn); a revision for
//! every write and read; a bounded change history for [watchers](Watcher); exactly-once
//! client sessions, bounded and expiring by log time) and its client.
//!
//! Writes go through the log; reads are served by [`Node::read`](crate::Node::read)
//! (ReadIndex: linearizable, no log write, no session). [`KvClient`] talks to the cluster
//! through a [`KvEndpoint`]: a fixed `Vec<Node>`, a [`NodeRegistry`] that follows restarts,
//! or your own (the TCP demo's is in `examples/common/client_proto.rs`). [`TypedKv`] stores
//! serde types.
//!
//! # The exactly-once contract
//! - A write is applied at most once, however often it is retried, as long as retries carry
//!   its session and number: the client's own retries within the deadline do, and so does
//!   [`KvClient::retry`] with the [`PendingWrite`] of a [`ClientError::Timeout`].
//! - [`ClientError::Timeout`] is the only error after which a write may have been applied
//!   (its outcome is unknown); every other error means it was not. In particular a session
//!   that expired after an attempt with an unknown outcome is reported as `Timeout` (with
//!   [`Cause::SessionExpired`]), never as "not applied".
//! - Registration is idempotent (a random client nonce), lazy (at the first write), and
//!   sessions end by log time or by a bound, identically on every replica
//!   ([`KvLimits`] are replicated state).

mod blocking;
mod caller;
mod changes;
mod client;
mod command;
mod endpoint;
pub mod machine;
mod sessions;
mod store;
mod timer;
mod txn;
mod typed;
mod watch;

pub use blocking::BlockingKvClient;
pub use changes::{Change, ChangeBatch, Keys, CHANGE_OVERHEAD, MAX_CHANGES_ANSWER_BYTES};
pub use client::{Cause, ClientError, ClientOptions, KvClient, PendingWrite, Response};
pub use command::{
    encode_command, encode_query, request, Answer, Bytes, KvCommand, KvError, KvLimits, KvOp,
    KvResult,
};
pub use endpoint::{KvEndpoint, NodeRegistry};
pub use machine::KvStateMachine;
pub use store::{Store, SHARDS};
pub use txn::{Compare, Txn, TxnOp, TxnResponse};
pub use typed::{prefix_end, TypedError, TypedKv};
pub use watch::{WatchOptions, Watcher};
