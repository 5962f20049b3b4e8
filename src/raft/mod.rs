//! The IO-free Raft core: [`RaftCore`] and the types it speaks.
//!
//! Nothing in here touches clocks, threads, sockets, files or global randomness; the host
//! drives it (see [`Ready`] for the contract) — the crate's own driver is [`crate::Node`], and
//! the simulation in `testing` drives it with virtual time.

mod config;
pub mod core;
mod election;
mod log;
mod membership;
mod message;
mod progress;
mod read;
mod ready;
mod reconfigure;
mod recovery;
mod replication;
mod rng;
mod role;
mod snapshot;
mod transfer;
mod unstable;

pub use self::config::Config;
pub use self::core::{RaftCore, Role};
pub use self::log::RaftLog;
pub use self::membership::{Configs, Membership, SnapshotHeader, VoteResult};
pub use self::message::*;
pub use self::progress::{Progress, ProgressState, SnapshotTransfer};
pub use self::ready::{
    PersistAck, Proposed, ReadState, Ready, SnapshotChunk, SnapshotChunkRequest, Status,
};
pub use self::rng::Rng;
pub use self::unstable::Unstable;
