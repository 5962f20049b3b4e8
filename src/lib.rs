//! raftkv: an embeddable replicated, durable key/value map built on Raft.
pub mod error;
pub mod raft;
pub mod storage;
