//! Linearizable reads through the driver (`Node::read`): on the leader and on followers, they
//! see every write that completed before them, without writing to the log.

use std::time::{Duration, Instant};

use raftkv::error::ProposeError;
use raftkv::raft::Role;
use raftkv::storage::MemStorage;
use raftkv::testing::{DigestMachine, RecordingMachine};
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig};

fn start<M: raftkv::StateMachine>(
    net: &LocalNetwork,
    n: u64,
    machine: impl Fn() -> M,
) -> Vec<Node<M::Output>> {
    (1..=n)
        .map(|id| {
            let mut c = NodeConfig::new(id, (1..=n).collect::<Vec<_>>());
            c.tick_interval = Duration::from_millis(5);
            let (node, driver) =
                Node::start(c, MemStorage::new(), machine(), net.transport(id)).unwrap();
            std::thread::spawn(move || futures::executor::block_on(driver));
            let inbox = node.clone();
            net.register(id, move |m| inbox.step(m));
            node
        })
        .collect()
}

fn leader_of<O: Send + 'static>(nodes: &[Node<O>]) -> Node<O> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = nodes.iter().find(|n| n.status().raft.role == Role::Leader) {
            return l.clone();
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn reads_on_leader_and_followers_see_every_completed_write() {
    let net = LocalNetwork::new();
    let nodes = start(&net, 3, DigestMachine::default);
    let leader = leader_of(&nodes);
    for i in 1..=25u64 {
        assert_eq!(
            futures::executor::block_on(leader.propose(format!("w{i}").as_str())),
            Ok(i)
        );
        // Every node, asked right after the write completed, answers with it included.
        for n in &nodes {
            let seen = futures::executor::block_on(n.read(b"count".as_slice()));
            assert_eq!(seen, Ok(i), "node {} answered a stale read", n.id());
        }
    }
    let last = leader.status().raft.last_index;
    assert_eq!(
        last, 26,
        "reads must not write to the log (25 writes and the no-op)"
    );
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}

#[test]
fn a_cut_off_leader_does_not_answer_reads() {
    let net = LocalNetwork::new();
    let nodes = start(&net, 3, DigestMachine::default);
    let leader = leader_of(&nodes);
    futures::executor::block_on(leader.propose("x")).unwrap();
    for other in 1..=3 {
        if other != leader.id() {
            net.cut(leader.id(), other);
            net.cut(other, leader.id());
        }
    }
    let answer = futures::executor::block_on(leader.read(b"count".as_slice()));
    assert!(
        matches!(
            answer,
            Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Timeout)
        ),
        "{answer:?}"
    );
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}

#[test]
fn a_state_machine_without_queries_says_so() {
    let net = LocalNetwork::new();
    let nodes = start(&net, 1, RecordingMachine::default);
    let leader = leader_of(&nodes);
    futures::executor::block_on(leader.propose("x")).unwrap();
    assert_eq!(
        futures::executor::block_on(leader.read(b"q".as_slice())),
        Err(ProposeError::Unsupported)
    );
    futures::executor::block_on(leader.shutdown());
}
