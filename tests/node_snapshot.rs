//! Snapshots through the threaded driver: automatic compaction, forced snapshots, restart
//! from snapshot plus log tail, a lagging follower catching up by snapshot, and a state
//! machine with its own durable state skipping the replay.

mod common;

use common::wait_until;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftkv::error::ProposeError;
use raftkv::raft::Role;
use raftkv::storage::{MemStorage, Storage};
use raftkv::transport::LocalNetwork;
use raftkv::{Index, Node, NodeConfig, SnapshotSource, StateMachine};

/// Sums the numbers it is sent; counts restores and applies in shared counters.
#[derive(Clone, Default)]
struct Sum {
    total: i64,
    applied: u64,
    restores: Arc<AtomicU64>,
    applies: Arc<AtomicU64>,
    /// When set, claims its state is durable through this index (a state machine with its
    /// own storage).
    durable: Option<Index>,
}

impl StateMachine for Sum {
    type Output = i64;
    fn apply(&mut self, index: Index, cmd: &[u8]) -> i64 {
        self.applies.fetch_add(1, Ordering::SeqCst);
        self.applied = index;
        self.total += std::str::from_utf8(cmd).unwrap().parse::<i64>().unwrap();
        self.total
    }
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(self.total.to_le_bytes().to_vec())
    }
    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        self.restores.fetch_add(1, Ordering::SeqCst);
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        self.total = i64::from_le_bytes(b);
        Ok(())
    }
    fn durable_index(&self) -> Option<Index> {
        self.durable
    }
    fn query(&self, _query: &[u8]) -> Option<i64> {
        Some(self.total)
    }
}

fn config(id: u64, n: u64, max_log_bytes: Option<u64>) -> NodeConfig {
    let mut c = NodeConfig::new(id, (1..=n).collect::<Vec<_>>());
    c.tick_interval = Duration::from_millis(5);
    c.max_log_bytes = max_log_bytes;
    c
}

fn start(
    net: &LocalNetwork,
    id: u64,
    n: u64,
    storage: &MemStorage,
    sm: Sum,
    max: Option<u64>,
) -> Node<i64> {
    let (node, driver) =
        Node::start(config(id, n, max), storage.clone(), sm, net.transport(id)).unwrap();
    std::thread::spawn(move || futures::executor::block_on(driver));
    let inbox = node.clone();
    net.register(id, move |m| inbox.step(m));
    node
}

fn leader(nodes: &[Node<i64>]) -> Node<i64> {
    assert!(wait_until(|| nodes
        .iter()
        .any(|n| n.status().raft.role == Role::Leader)));
    nodes
        .iter()
        .find(|n| n.status().raft.role == Role::Leader)
        .unwrap()
        .clone()
}

fn propose(node: &Node<i64>, n: i64) -> i64 {
    loop {
        match futures::executor::block_on(node.propose(n.to_string().as_str())) {
            Ok(v) => return v,
            Err(ProposeError::Busy) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_node_compacts_its_log_and_restarts_from_snapshot_plus_tail() {
    let net = LocalNetwork::new();
    let storage = MemStorage::new();
    let sm = Sum::default();
    let (restores, applies) = (sm.restores.clone(), sm.applies.clone());
    let node = start(&net, 1, 1, &storage, sm, Some(2_000));
    let node_ = [node.clone()];
    let l = leader(&node_);
    let mut expected = 0;
    for i in 1..=200 {
        expected += i;
        assert_eq!(propose(&l, i), expected);
    }
    assert!(wait_until(|| node.status().snapshots_taken >= 1));
    let status = node.status();
    assert!(status.raft.snapshot.index > 0, "log not compacted");
    assert!(
        status.persisted.log_bytes < 4_000,
        "log {} bytes",
        status.persisted.log_bytes
    );
    futures::executor::block_on(node.shutdown());

    // Restart: the state comes back from the snapshot, only the tail is replayed.
    let snap = storage.initial_state().unwrap().snapshot.index;
    applies.store(0, Ordering::SeqCst);
    let sm = Sum {
        restores: restores.clone(),
        applies: applies.clone(),
        ..Sum::default()
    };
    let node = start(&net, 1, 1, &storage, sm, Some(2_000));
    let l = leader(std::slice::from_ref(&node));
    assert_eq!(propose(&l, 1), expected + 1, "state lost across restart");
    assert_eq!(restores.load(Ordering::SeqCst), 1);
    let last = node.status().raft.last_index;
    let replayed = applies.load(Ordering::SeqCst);
    assert!(
        replayed < last - snap + 2,
        "replayed {replayed} entries, snapshot at {snap} of {last}"
    );
    futures::executor::block_on(node.shutdown());
}

#[test]
fn a_forced_snapshot_reports_its_position() {
    let net = LocalNetwork::new();
    let storage = MemStorage::new();
    let node = start(&net, 1, 1, &storage, Sum::default(), None);
    let l = leader(std::slice::from_ref(&node));
    for i in 0..10 {
        propose(&l, i);
    }
    let meta = futures::executor::block_on(node.snapshot()).expect("a snapshot");
    assert_eq!(meta.index, node.status().raft.applied_index);
    assert_eq!(storage.initial_state().unwrap().snapshot, meta);
    // Nothing new applied: nothing to do.
    assert_eq!(futures::executor::block_on(node.snapshot()), None);
    futures::executor::block_on(node.shutdown());
}

#[test]
fn a_lagging_follower_catches_up_by_snapshot() {
    let net = LocalNetwork::new();
    let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    let nodes: Vec<Node<i64>> = (1..=3)
        .map(|id| {
            start(
                &net,
                id,
                3,
                &storages[id as usize - 1],
                Sum::default(),
                Some(1_000),
            )
        })
        .collect();
    let l = leader(&nodes);
    let f = nodes.iter().find(|n| n.id() != l.id()).unwrap().clone();
    for other in 1..=3 {
        net.cut(other, f.id());
        net.cut(f.id(), other);
    }
    let mut total = 0;
    for i in 1..=150 {
        total += i;
        assert_eq!(propose(&l, i), total);
    }
    assert!(wait_until(
        || l.status().raft.snapshot.index > f.status().raft.last_index
    ));
    net.heal();
    assert!(wait_until(
        || f.status().raft.applied_index >= l.status().raft.commit_index
    ));
    assert!(
        f.status().snapshots_installed >= 1,
        "caught up without a snapshot"
    );
    // The follower's state machine holds the leader's state: a linearizable read on it (served
    // from its own state machine) answers the full sum.
    assert_eq!(
        futures::executor::block_on(f.read(b"total".as_slice())),
        Ok(total)
    );
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}

#[test]
fn a_state_machine_with_its_own_durable_state_is_not_replayed() {
    let net = LocalNetwork::new();
    let storage = MemStorage::new();
    let node = start(&net, 1, 1, &storage, Sum::default(), None);
    let l = leader(std::slice::from_ref(&node));
    for i in 1..=20 {
        propose(&l, i);
    }
    // The status is published after each round of work: wait for it to show the last apply.
    assert!(wait_until(|| node.status().raft.applied_index == 21));
    let applied = node.status().raft.applied_index;
    futures::executor::block_on(node.shutdown());
    // The state machine says everything through `applied` is in its own files.
    let sm = Sum {
        total: 210,
        durable: Some(applied),
        ..Sum::default()
    };
    let (restores, applies) = (sm.restores.clone(), sm.applies.clone());
    let node = start(&net, 1, 1, &storage, sm, None);
    let l = leader(std::slice::from_ref(&node));
    assert_eq!(propose(&l, 1), 211);
    assert_eq!(restores.load(Ordering::SeqCst), 0);
    assert_eq!(
        applies.load(Ordering::SeqCst),
        1,
        "replayed entries it already had"
    );
    futures::executor::block_on(node.shutdown());
}

/// The log bound holds through the threaded driver under concurrent load, even for a bound
/// far below what one batch of proposals brings: at twice the bound the leader refuses
/// proposals (`Busy`) and followers defer appends until a snapshot compacts the log.
#[test]
fn a_small_log_bound_holds_under_concurrent_proposals() {
    let net = LocalNetwork::new();
    let max = 1_000;
    let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    let nodes: Vec<Node<i64>> = (1..=3)
        .map(|id| {
            start(
                &net,
                id,
                3,
                &storages[id as usize - 1],
                Sum::default(),
                Some(max),
            )
        })
        .collect();
    let l = leader(&nodes);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (nodes, done) = (nodes.clone(), done.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::SeqCst) {
                for n in &nodes {
                    peak = peak.max(n.status().persisted.log_bytes);
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            peak
        })
    };
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let l = l.clone();
            std::thread::spawn(move || {
                for _ in 0..150 {
                    propose(&l, 1);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    assert!(wait_until(|| nodes.iter().all(|n| n
        .status()
        .raft
        .applied_index
        == l.status().raft.commit_index)));
    done.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    // 24 bytes of hard state, then entries of 24 + 1 bytes: at most one past the limit.
    assert!(peak <= 2 * max + 24 + 25, "log peaked at {peak} bytes");
    assert!(nodes.iter().all(|n| n.status().snapshots_taken >= 5));
    assert_eq!(propose(&l, 0), 8 * 150, "every proposal applied once");
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}
