//! Hosting a [`RaftCore`](crate::raft::RaftCore): everything between the core's output and
//! the outside world — storage writes and syncs, the state machine, snapshots, proposals and
//! reads waiting for their answers.
//!
//! [`Engine`] is the one implementation of it. The [`Node`](crate::Node) driver, the
//! simulated [`Cluster`](crate::testing::Cluster) and the scripted
//! [`Lockstep`](crate::testing::Lockstep) harness all drive their cores through it; they differ
//! only in how messages travel, when fsyncs complete and how time passes. A host of your own
//! (your own threads and IO around the public core, as with raft-rs's `RawNode`) can use it
//! too, or the pieces below.
//!
//! - [`write_ready`]: the durable part of a [`Ready`](crate::raft::Ready), in the right order;
//! - [`snapshot_messages`], [`restore_machine`]: a stored snapshot sent in chunks, or
//!   restored into a state machine;
//! - [`SnapshotPolicy`]: when to take a local snapshot, and the one being written.

mod engine;
mod events;
mod snapshot;
mod write;

pub use engine::{Engine, Host, Observed};
pub use events::EngineCounters;
pub use snapshot::{read_header, restore_machine, snapshot_messages, SnapshotPolicy};
pub use write::{write_ready, WriteProgress};
