//! The KV simulation's clients and checks, shared by the `sim_kv` tests.

pub mod history;
pub mod workload;

use raftkv::kv::KvStateMachine;
use raftkv::testing::Cluster;

/// The simulated cluster.
pub type Sim = Cluster<KvStateMachine>;

/// Keys `k0 .. k{KEYS-1}`.
pub const KEYS: u64 = 4;
/// Virtual ms a client waits for an answer before retrying elsewhere.
pub const TIMEOUT_MS: u64 = 600;

/// Key `i`.
pub fn key(i: u64) -> Vec<u8> {
    format!("k{i}").into_bytes()
}
