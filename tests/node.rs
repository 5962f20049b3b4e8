//! The threaded driver: a 3-node cluster in one process over `LocalNetwork`, driven by tokio
//! and by `futures::executor`, plus its error paths (not leader, timeout, shutdown, fatal
//! storage error).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftkv::error::{ProposeError, StorageError};
use raftkv::raft::{Entry, HardState, Index, SnapshotMeta, Term};
use raftkv::storage::{InitialState, MemStorage, PersistedSize, Storage};
use raftkv::testing::RecordingMachine;
use raftkv::transport::LocalNetwork;
use raftkv::{Driver, Node, NodeConfig};

type TestNode = Node<Index>;

fn config(id: u64, n: u64) -> NodeConfig {
    let mut c = NodeConfig::new(id, (1..=n).collect::<Vec<_>>());
    c.tick_interval = Duration::from_millis(5);
    c.propose_timeout = Duration::from_secs(2);
    c
}

fn start_cluster<S: Storage + Clone>(
    net: &LocalNetwork,
    storages: &[S],
) -> (Vec<TestNode>, Vec<Driver>) {
    let n = storages.len() as u64;
    let mut nodes = Vec::new();
    let mut drivers = Vec::new();
    for (i, s) in storages.iter().enumerate() {
        let id = i as u64 + 1;
        let (node, driver) = Node::start(
            config(id, n),
            s.clone(),
            RecordingMachine::default(),
            net.transport(id),
        )
        .unwrap();
        let inbox = node.clone();
        net.register(id, move |m| inbox.step(m));
        nodes.push(node);
        drivers.push(driver);
    }
    (nodes, drivers)
}

/// Proposes on whichever node leads, following redirects, until it succeeds.
async fn propose(nodes: &[TestNode], cmd: &str) -> Index {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut target = 0;
    loop {
        assert!(Instant::now() < deadline, "no leader committed {cmd}");
        match nodes[target].propose(cmd).await {
            Ok(index) => return index,
            Err(ProposeError::NotLeader { leader: Some(l) }) => target = l as usize - 1,
            Err(_) => {
                target = (target + 1) % nodes.len();
                futures_timer_sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A runtime-agnostic sleep for tests (a thread that completes a oneshot).
async fn futures_timer_sleep(d: Duration) {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    let _ = rx.await;
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_commit_when_driven_by_tokio() {
    let net = LocalNetwork::new();
    let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    let (nodes, drivers) = start_cluster(&net, &storages);
    for d in drivers {
        tokio::spawn(d);
    }
    let mut last = 0;
    for i in 0..20 {
        let index = propose(&nodes, &format!("t{i}")).await;
        assert!(index > last);
        last = index;
    }
    assert!(wait_until(|| nodes.iter().all(|n| n
        .status()
        .raft
        .applied_index
        >= last)));
    for n in &nodes {
        n.shutdown().await;
        assert!(!n.status().running);
    }
}

#[test]
fn three_nodes_commit_when_driven_by_futures_executor() {
    let net = LocalNetwork::new();
    let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    let (nodes, drivers) = start_cluster(&net, &storages);
    for d in drivers {
        std::thread::spawn(move || futures::executor::block_on(d));
    }
    let last = futures::executor::block_on(async {
        let mut last = 0;
        for i in 0..20 {
            last = propose(&nodes, &format!("f{i}")).await;
        }
        last
    });
    assert!(wait_until(|| nodes.iter().all(|n| n
        .status()
        .raft
        .applied_index
        >= last)));
    // Restart every node from its storage: the log is replayed into fresh state machines.
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
    let (nodes, drivers) = start_cluster(&net, &storages);
    for d in drivers {
        std::thread::spawn(move || futures::executor::block_on(d));
    }
    let next = futures::executor::block_on(propose(&nodes, "after-restart"));
    assert!(next > last, "restarted cluster lost its log");
    assert!(wait_until(|| nodes.iter().all(|n| n
        .status()
        .raft
        .applied_index
        >= next)));
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}

#[test]
fn errors_name_the_leader_time_out_and_report_shutdown() {
    let net = LocalNetwork::new();
    let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    let (nodes, drivers) = start_cluster(&net, &storages);
    for d in drivers {
        std::thread::spawn(move || futures::executor::block_on(d));
    }
    futures::executor::block_on(propose(&nodes, "x"));
    let leader = nodes
        .iter()
        .find(|n| n.status().raft.role == raftkv::raft::Role::Leader)
        .unwrap()
        .clone();
    let follower = nodes
        .iter()
        .find(|n| n.id() != leader.id())
        .unwrap()
        .clone();
    // A follower names the leader.
    assert!(wait_until(
        || follower.status().raft.leader == Some(leader.id())
    ));
    let err = futures::executor::block_on(follower.propose("y")).unwrap_err();
    assert_eq!(
        err,
        ProposeError::NotLeader {
            leader: Some(leader.id())
        }
    );
    // Cut the leader off: its proposal cannot commit and times out (or is refused once it
    // steps down).
    for other in 1..=3 {
        if other != leader.id() {
            net.cut(leader.id(), other);
            net.cut(other, leader.id());
        }
    }
    let err = futures::executor::block_on(leader.propose("z")).unwrap_err();
    assert!(
        matches!(err, ProposeError::Timeout | ProposeError::NotLeader { .. }),
        "{err:?}"
    );
    net.heal();
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
    assert_eq!(
        futures::executor::block_on(leader.propose("late")),
        Err(ProposeError::Shutdown)
    );
}

/// A storage whose `sync` starts failing on demand.
#[derive(Clone)]
struct FailingSync {
    inner: MemStorage,
    fail: Arc<AtomicBool>,
}

impl Storage for FailingSync {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.inner.initial_state()
    }
    fn first_index(&self) -> Index {
        self.inner.first_index()
    }
    fn last_index(&self) -> Index {
        self.inner.last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.inner.term(index)
    }
    fn entries(&self, lo: Index, hi: Index, max: u64) -> Result<Vec<Entry>, StorageError> {
        self.inner.entries(lo, hi, max)
    }
    fn set_hard_state(&mut self, hs: HardState) -> Result<(), StorageError> {
        self.inner.set_hard_state(hs)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.inner.append(entries)
    }
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.inner.truncate_suffix(from)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Io {
                op: "fsync",
                path: "test".into(),
                source: std::io::Error::other("injected EIO"),
            });
        }
        self.inner.sync()
    }
    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.inner.write_snapshot_chunk(meta, offset, data)
    }
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.inner.install_snapshot(meta)
    }
    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.inner.read_snapshot(offset, len)
    }
    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.inner.compact(through)
    }
    fn persisted_size(&self) -> PersistedSize {
        self.inner.persisted_size()
    }
}

#[test]
fn a_failed_fsync_stops_the_node_with_the_error() {
    let net = LocalNetwork::new();
    let fail = Arc::new(AtomicBool::new(false));
    let storage = FailingSync {
        inner: MemStorage::new(),
        fail: fail.clone(),
    };
    let (nodes, drivers) = start_cluster(&net, &[storage]);
    for d in drivers {
        std::thread::spawn(move || futures::executor::block_on(d));
    }
    futures::executor::block_on(propose(&nodes, "ok"));
    fail.store(true, Ordering::SeqCst);
    let err = futures::executor::block_on(nodes[0].propose("doomed")).unwrap_err();
    assert_eq!(err, ProposeError::Shutdown);
    let status = nodes[0].status();
    assert!(!status.running);
    assert!(status.fatal_error.unwrap().contains("injected EIO"));
}
