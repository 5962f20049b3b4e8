//! raftkv: an embeddable replicated, durable key/value map built on Raft.
pub mod error;
mod node;
pub mod raft;
mod state_machine;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;

pub use node::{Driver, Node, NodeConfig, NodeStatus};
pub use raft::{Index, NodeId, Term};
pub use state_machine::StateMachine;
