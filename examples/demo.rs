//! An in-process 3-node raftkv cluster that narrates what it does: election, replication,
//! losing the leader, re-election, and a stopped node restarting from its data directory
//! (file storage in a temporary directory) and catching up.
//!
//! Run with: `cargo run --release --example demo`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use raftkv::error::ProposeError;
use raftkv::raft::Role;
use raftkv::storage::{FileStorage, FileStorageOptions};
use raftkv::transport::LocalNetwork;
use raftkv::{Index, Node, NodeConfig, StateMachine};

/// A tiny replicated map: commands are `key=value`; the output is the previous value.
#[derive(Default)]
struct Map(BTreeMap<String, String>);

impl StateMachine for Map {
    type Output = Option<String>;
    fn apply(&mut self, _index: Index, command: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(command);
        let (k, v) = text.split_once('=')?;
        self.0.insert(k.to_string(), v.to_string())
    }
    fn snapshot(&mut self) -> Box<dyn raftkv::SnapshotSource> {
        // Small state: serialize it right here (a large one would hand out a cheap image).
        Box::new(postcard::to_allocvec(&self.0).unwrap_or_default())
    }
    fn restore(&mut self, snapshot: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        snapshot.read_to_end(&mut bytes)?;
        self.0 = postcard::from_bytes(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(())
    }
}

type MapNode = Node<Option<String>>;

fn start(id: u64, net: &LocalNetwork, dir: &std::path::Path) -> MapNode {
    let mut config = NodeConfig::new(id, vec![1, 2, 3]);
    config.tick_interval = Duration::from_millis(20);
    let options = FileStorageOptions {
        cluster_id: 42,
        node_id: id,
        segment_size: 1 << 20,
        ..Default::default()
    };
    let storage =
        FileStorage::open(dir.join(format!("node-{id}")), options).expect("data directory opens");
    let (node, driver) =
        Node::start(config, storage, Map::default(), net.transport(id)).expect("node starts");
    tokio::spawn(driver);
    let inbox = node.clone();
    net.register(id, move |m| inbox.step(m));
    node
}

async fn wait_for_leader(nodes: &[Option<MapNode>]) -> u64 {
    let start = Instant::now();
    loop {
        for n in nodes.iter().flatten() {
            let s = n.status().raft;
            if s.role == Role::Leader {
                println!(
                    "  node {} is leader of term {} (after {:?})",
                    n.id(),
                    s.term,
                    start.elapsed()
                );
                return n.id();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn put(nodes: &[Option<MapNode>], leader: u64, key: &str, value: &str) {
    let node = nodes[leader as usize - 1]
        .as_ref()
        .expect("leader is running");
    let started = Instant::now();
    match node.propose(format!("{key}={value}").as_str()).await {
        Ok(previous) => println!(
            "  put {key}={value} committed in {:?} (previous value: {previous:?})",
            started.elapsed()
        ),
        Err(ProposeError::NotLeader { leader }) => {
            println!("  put {key}: not leader (leader: {leader:?})")
        }
        Err(e) => println!("  put {key} failed: {e}"),
    }
}

fn show(nodes: &[Option<MapNode>]) {
    for (i, n) in nodes.iter().enumerate() {
        match n {
            Some(n) => {
                let s = n.status().raft;
                println!(
                    "  node {}: {:?}, term {}, commit {}, applied {}, log {}",
                    i + 1,
                    s.role,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    s.last_index
                );
            }
            None => println!("  node {}: down", i + 1),
        }
    }
}

#[tokio::main]
async fn main() {
    let data = tempfile::tempdir().expect("a temporary directory");
    println!(
        "raftkv demo: 3 nodes in one process, file storage under {}, in-process network\n",
        data.path().display()
    );
    let net = LocalNetwork::new();
    let mut nodes: Vec<Option<MapNode>> = (1..=3)
        .map(|id| Some(start(id, &net, data.path())))
        .collect();

    println!("1. electing a leader");
    let leader = wait_for_leader(&nodes).await;

    println!("\n2. writing through the leader");
    for (k, v) in [
        ("apple", "red"),
        ("banana", "yellow"),
        ("cherry", "dark red"),
    ] {
        put(&nodes, leader, k, v).await;
    }
    put(&nodes, leader, "apple", "green").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    show(&nodes);

    println!("\n3. stopping the leader (node {leader})");
    let old = nodes[leader as usize - 1].take().expect("running");
    old.shutdown().await;
    net.unregister(leader);
    let leader = wait_for_leader(&nodes).await;
    put(&nodes, leader, "date", "brown").await;
    put(&nodes, leader, "banana", "ripe").await;
    show(&nodes);

    let restarted = old.id();
    println!("\n4. restarting node {restarted} from its data directory");
    nodes[restarted as usize - 1] = Some(start(restarted, &net, data.path()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    show(&nodes);
    let applied: Vec<u64> = nodes
        .iter()
        .flatten()
        .map(|n| n.status().raft.applied_index)
        .collect();
    if applied.iter().all(|&a| a == applied[0]) {
        println!(
            "\nall nodes applied the same {} log entries — done",
            applied[0]
        );
    } else {
        println!("\nnodes still catching up: applied {applied:?}");
    }
    for n in nodes.iter().flatten() {
        n.shutdown().await;
    }
}
