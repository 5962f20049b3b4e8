//! raftkv: an embeddable replicated, durable key/value map built on Raft.
pub mod error;
pub mod raft;
mod state_machine;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;

pub use raft::{Index, NodeId, Term};
pub use state_machine::StateMachine;
