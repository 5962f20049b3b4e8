//! The deterministic simulation toolkit (cargo feature `testing`).
//!
//! Test your own [`StateMachine`](crate::StateMachine) — and this crate tests itself — on a
//! [`Cluster`] of nodes with virtual time, a seeded RNG, a network that drops, delays, reorders,
//! duplicates and partitions, and crashes that keep only durable state. Raft's safety
//! properties are checked after every step (see [`invariants`]); a failure names its seed, and
//! [`for_each_seed`] replays it.

mod file_disk;
pub mod invariants;
pub mod linearizability;
pub mod lockstep;
mod machine;
pub mod network;
mod seeds;
pub mod sim;

pub use file_disk::SimFileStorage;
pub use lockstep::Lockstep;
pub use machine::{DigestMachine, RecordingMachine};
pub use network::{Delay, NetworkConfig, Traffic};
pub use seeds::for_each_seed;
pub use sim::{Acknowledged, AppliedEntry, Cluster, SimConfig, SimStorage};
