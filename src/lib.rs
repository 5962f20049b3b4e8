//! raftkv: an embeddable replicated, durable key/value map (or any state machine of yours) built on
//! Raft.
//!
//! - [`raft::RaftCore`] is the protocol as a deterministic, IO-free state machine that any host
//!   can drive (see [`raft::Ready`] for the contract);
//! - [`Node`] drives it for you: a dedicated thread for the core, the [`storage::Storage`] and
//!   your [`StateMachine`]; a [`Driver`] future for the [`transport::Transport`], on any
//!   executor;
//! - [`kv`] is the ready-made replicated map (exactly-once sessions, linearizable reads) and
//!   its client;
//! - [`storage::FileStorage`] is the durable storage: checksummed segments, crash recovery,
//!   streamed snapshots;
//! - the `testing` feature simulates whole clusters under faults, with Raft's safety
//!   properties checked after every step, and checks KV histories for linearizability.
//!
//! A one-node cluster, driven by `futures::executor`:
//!
//! ```
//! use raftkv::{Index, Node, NodeConfig, StateMachine};
//! use raftkv::error::ProposeError;
//! use raftkv::storage::MemStorage;
//! use raftkv::transport::LocalNetwork;
//!
//! #[derive(Default)]
//! struct Sum(i64);
//! impl StateMachine for Sum {
//!     type Output = i64;
//!     fn apply(&mut self, _index: Index, cmd: &[u8]) -> i64 {
//!         self.0 += std::str::from_utf8(cmd).unwrap().parse::<i64>().unwrap();
//!         self.0
//!     }
//!     fn snapshot(&mut self) -> Box<dyn raftkv::SnapshotSource> {
//!         Box::new(self.0.to_le_bytes().to_vec())
//!     }
//!     fn restore(&mut self, r: &mut dyn std::io::Read) -> std::io::Result<()> {
//!         let mut b = [0u8; 8];
//!         r.read_exact(&mut b)?;
//!         self.0 = i64::from_le_bytes(b);
//!         Ok(())
//!     }
//! }
//!
//! let mut config = NodeConfig::new(1, vec![1]);
//! config.tick_interval = std::time::Duration::from_millis(2);
//! let net = LocalNetwork::new();
//! let (node, driver) = Node::start(config, MemStorage::new(), Sum::default(), net.transport(1)).unwrap();
//! std::thread::spawn(move || futures::executor::block_on(driver));
//! futures::executor::block_on(async {
//!     // Wait for the node to elect itself.
//!     while node.status().raft.leader != Some(1) {
//!         std::thread::sleep(std::time::Duration::from_millis(2));
//!     }
//!     assert_eq!(node.propose(b"40".as_slice()).await, Ok(40));
//!     assert_eq!(node.propose(b"2".as_slice()).await, Ok(42));
//!     node.shutdown().await;
//!     assert_eq!(node.propose(b"1".as_slice()).await, Err(ProposeError::Shutdown));
//! });
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod host;
pub mod kv;
pub mod node;
pub mod raft;
mod state_machine;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
pub mod wire;

pub use node::{Driver, Node, NodeConfig, NodeStatus};
pub use raft::{Index, NodeId, Term};
pub use state_machine::{SnapshotSource, StateMachine};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
