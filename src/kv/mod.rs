//! The ready-made replicated key/value map: [`KvStateMachine`] (byte keys and values; get,
//! put, append, delete, compare-and-swap, ordered scans; exactly-once client sessions, bounded)
//! and its wire types. Writes go through the log; reads are served by
//! [`Node::read`](crate::Node::read) (ReadIndex: linearizable, no log write).

mod client;
mod command;
pub mod machine;
mod store;
mod timer;

pub use client::{BlockingKvClient, ClientError, ClientOptions, KvClient, KvEndpoint};
pub use command::{encode_command, encode_query, Bytes, KvCommand, KvError, KvOp, KvResult};
pub use machine::{request, KvStateMachine, DEFAULT_MAX_SESSIONS};
pub use store::{Store, SHARDS};
