//! What an operator and a host can see of a running node: structured `tracing` events
//! (elections, snapshots) and the counters and gauges in `NodeStatus::metrics`.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::wait_until;
use raftkv::raft::Role;
use raftkv::storage::MemStorage;
use raftkv::testing::DigestMachine;
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig};

/// Collects everything the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn a_node_reports_its_events_and_counts_its_work() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();

    let net = LocalNetwork::new();
    let nodes: Vec<Node<u64>> = (1..=3)
        .map(|id| {
            let mut c = NodeConfig::new(id, vec![1, 2, 3]);
            c.tick_interval = Duration::from_millis(5);
            let (node, driver) = Node::start(
                c,
                MemStorage::new(),
                DigestMachine::default(),
                net.transport(id),
            )
            .unwrap();
            std::thread::spawn(move || futures::executor::block_on(driver));
            let inbox = node.clone();
            net.register(id, move |m| inbox.step(m));
            node
        })
        .collect();
    assert!(wait_until(|| nodes
        .iter()
        .any(|n| n.status().raft.role == Role::Leader)));
    let leader = nodes
        .iter()
        .find(|n| n.status().raft.role == Role::Leader)
        .unwrap()
        .clone();
    for i in 0..50 {
        futures::executor::block_on(leader.propose(format!("c{i}").as_str())).unwrap();
    }
    assert!(futures::executor::block_on(leader.snapshot()).is_some());
    // The status is published after each round of work: wait for the last round's.
    assert!(wait_until(|| nodes.iter().all(|n| n
        .status()
        .raft
        .applied_index
        >= 51)
        && leader.status().metrics.counters.snapshots_taken == 1));

    let m = leader.status().metrics;
    assert_eq!(m.counters.proposals, 50);
    assert!(m.counters.applied >= 51, "{m:?}");
    assert!(m.counters.committed >= 51, "{m:?}");
    assert!(m.counters.entries_written >= 51, "{m:?}");
    assert!(
        m.counters.syncs >= 1 && m.fsync.count == m.counters.syncs,
        "{m:?}"
    );
    assert!(m.counters.leader_changes >= 1, "{m:?}");
    assert_eq!(m.counters.snapshots_taken, 1);
    assert!(m.counters.messages_sent > 0);
    assert_eq!(
        m.inbox_depth, 0,
        "nothing is left queued once all is applied"
    );
    let follower = nodes.iter().find(|n| n.id() != leader.id()).unwrap();
    let f = follower.status().metrics;
    assert_eq!(f.counters.proposals, 0);
    assert!(f.counters.applied >= 51);

    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(out.contains("became leader"), "{out}");
    assert!(out.contains("following a new leader"), "{out}");
    assert!(out.contains("snapshot taken"), "{out}");
}
