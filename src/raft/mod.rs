//! The IO-free Raft core.
mod message;
pub use message::*;
