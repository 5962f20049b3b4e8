//! The threaded driver: a 3-node cluster in one process over `LocalNetwork`, driven by tokio
//! and by `futures::executor`, plus its error paths (not leader, timeout, shutdown, fatal
//! storage error).

mod common;

use common::wait_until;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftkv::error::{ProposeError, StorageError};
use raftkv::raft::{Entry, HardState, Index, SnapshotMeta, Term};
use raftkv::storage::{InitialState, MemStorage, PersistedSize, Storage, SyncWait};
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

/// A storage whose `sync` starts failing on demand, or whose disk fills up on demand, and
/// whose split syncs wait at a gate while it is closed (a device that takes its time).
#[derive(Clone)]
struct FailingSync {
    inner: MemStorage,
    fail: Arc<AtomicBool>,
    full: Arc<AtomicBool>,
    gate: Arc<Gate>,
}

/// Where a sync's wait blocks while the test holds it closed.
#[derive(Default)]
struct Gate {
    /// (closed, a wait is blocked here)
    state: std::sync::Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn set_closed(&self, closed: bool) {
        self.state.lock().unwrap().0 = closed;
        self.changed.notify_all();
    }
    fn closed(&self) -> bool {
        self.state.lock().unwrap().0
    }
    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        while state.0 {
            state.1 = true;
            state = self.changed.wait(state).unwrap();
        }
        state.1 = false;
    }
    fn has_waiter(&self) -> bool {
        self.state.lock().unwrap().1
    }
}

impl FailingSync {
    fn new() -> Self {
        FailingSync {
            inner: MemStorage::new(),
            fail: Arc::default(),
            full: Arc::default(),
            gate: Arc::default(),
        }
    }

    fn check_fail(&self) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Io {
                op: "fsync",
                path: "test".into(),
                source: std::io::Error::other("injected EIO"),
            });
        }
        Ok(())
    }

    fn check_space(&self) -> Result<(), StorageError> {
        if self.full.load(Ordering::SeqCst) {
            return Err(StorageError::NoSpace {
                path: "test".into(),
            });
        }
        Ok(())
    }
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
        self.check_space()?;
        self.inner.set_hard_state(hs)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.check_space()?;
        self.inner.append(entries)
    }
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.inner.truncate_suffix(from)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.check_fail()?;
        self.inner.sync()
    }
    fn start_sync(&mut self) -> Result<Option<SyncWait>, StorageError> {
        let wait = self.inner.start_sync()?;
        if !self.gate.closed() {
            return Ok(wait);
        }
        let gate = self.gate.clone();
        Ok(wait.map(|wait| {
            SyncWait::blocking(move || {
                gate.pass();
                wait.run()
            })
        }))
    }
    fn finish_sync(&mut self, waited: Result<(), StorageError>) -> Result<(), StorageError> {
        self.check_fail()?;
        self.inner.finish_sync(waited)
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
    let storage = FailingSync::new();
    let fail = storage.fail.clone();
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

/// While the leader's fsync of a later batch is in flight, acknowledgements of an earlier
/// batch (durable on the leader already) are counted and its proposal answered: the wait runs
/// on the node's fsync thread, not on the node thread.
#[test]
fn an_earlier_batch_is_answered_while_the_leaders_next_fsync_is_in_flight() {
    use raftkv::raft::{Message, Payload, Role};
    let net = LocalNetwork::new();
    let storages: Vec<FailingSync> = (0..3).map(|_| FailingSync::new()).collect();
    // Messages to `held_for` from the others wait in `held` until the test lets them go.
    let held_for = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let held: Arc<std::sync::Mutex<Vec<Message>>> = Arc::default();
    let mut nodes = Vec::new();
    for (i, s) in storages.iter().enumerate() {
        let id = i as u64 + 1;
        let mut c = config(id, 3);
        c.tick_interval = Duration::from_millis(20); // holding a few ms costs no election
        let (node, driver) =
            Node::start(c, s.clone(), RecordingMachine::default(), net.transport(id)).unwrap();
        std::thread::spawn(move || futures::executor::block_on(driver));
        let (inbox, held_for, held) = (node.clone(), held_for.clone(), held.clone());
        net.register(id, move |m: Message| {
            if held_for.load(Ordering::SeqCst) == m.to {
                held.lock().unwrap().push(m);
            } else {
                inbox.step(m);
            }
        });
        nodes.push(node);
    }
    let warm = futures::executor::block_on(propose(&nodes, "warm"));
    let leader = nodes
        .iter()
        .find(|n| n.status().raft.role == Role::Leader)
        .expect("a leader")
        .clone();
    let id = leader.status().raft.id;
    let storage = &storages[id as usize - 1];
    assert!(wait_until(|| nodes.iter().all(|n| n
        .status()
        .raft
        .applied_index
        >= warm)));
    // A: durable on the leader, its acknowledgements held back.
    held_for.store(id, Ordering::SeqCst);
    let (tx, answers) = std::sync::mpsc::channel();
    let propose_on = |cmd: &'static str| {
        let (leader, tx) = (leader.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = futures::executor::block_on(leader.propose(Payload::from(cmd.as_bytes())));
            tx.send((cmd, r)).unwrap();
        })
    };
    propose_on("A");
    assert!(
        wait_until(|| storage.inner.durable_last_index() > warm),
        "A is durable on the leader"
    );
    // B: the leader's fsync of it waits at the closed gate.
    storage.gate.set_closed(true);
    propose_on("B");
    assert!(
        wait_until(|| storage.gate.has_waiter()),
        "the fsync of B is in flight"
    );
    // A's acknowledgements arrive now, during that fsync.
    held_for.store(0, Ordering::SeqCst);
    for m in held.lock().unwrap().drain(..) {
        leader.step(m);
    }
    let first = answers.recv_timeout(Duration::from_secs(5));
    let b_still_waiting = storage.gate.has_waiter();
    storage.gate.set_closed(false);
    let first = first.expect("A was answered while B's fsync was in flight");
    assert_eq!(first.0, "A");
    assert_eq!(first.1, Ok(warm + 1));
    assert!(
        b_still_waiting,
        "B's fsync was still in flight when A was answered"
    );
    let second = answers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(second, ("B", Ok(warm + 2)));
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}

/// One node on `FileStorage` over a simulated disk, its driver on a thread of its own.
fn single_node_on_a_simulated_disk() -> (Vec<TestNode>, raftkv::storage::file::sim::SimDisk) {
    let net = LocalNetwork::new();
    let storage = raftkv::testing::SimFileStorage::new(1);
    let disk = storage.disk().clone();
    let (node, driver) = Node::start(
        config(1, 1),
        storage,
        RecordingMachine::default(),
        net.transport(1),
    )
    .unwrap();
    std::thread::spawn(move || futures::executor::block_on(driver));
    (vec![node], disk)
}

/// The same on files, where the fdatasync runs on the node's fsync thread: its failure comes
/// back to the node thread, which stops without acknowledging what it did not make durable.
#[test]
fn a_failed_fsync_on_the_fsync_thread_stops_the_node_with_the_error() {
    let (nodes, disk) = single_node_on_a_simulated_disk();
    futures::executor::block_on(propose(&nodes, "ok"));
    disk.fail_next_sync();
    let err = futures::executor::block_on(nodes[0].propose("doomed")).unwrap_err();
    assert_eq!(err, ProposeError::Shutdown);
    let status = nodes[0].status();
    assert!(!status.running);
    let fatal = status.fatal_error.expect("the error is reported");
    assert!(fatal.contains("fsync"), "{fatal}");
}

#[test]
fn a_full_disk_pauses_the_node_which_resumes_once_space_returns() {
    let net = LocalNetwork::new();
    let storage = FailingSync::new();
    let full = storage.full.clone();
    let (nodes, drivers) = start_cluster(&net, std::slice::from_ref(&storage));
    for d in drivers {
        std::thread::spawn(move || futures::executor::block_on(d));
    }
    let before = futures::executor::block_on(propose(&nodes, "before"));
    full.store(true, Ordering::SeqCst);
    // The proposal that hits the full disk waits (nothing durable, nothing acknowledged);
    // the node says why, refuses new proposals, and does not stop.
    let waiting = nodes[0].clone();
    let pending =
        std::thread::spawn(move || futures::executor::block_on(waiting.propose("during")));
    assert!(wait_until(|| nodes[0].status().disk_full.is_some()));
    assert_eq!(
        futures::executor::block_on(nodes[0].propose("refused")),
        Err(ProposeError::NoSpace)
    );
    assert!(nodes[0].status().running);
    assert_eq!(storage.inner.durable_last_index(), before);
    // Space returns: the parked batch is written and the waiting proposal completes.
    full.store(false, Ordering::SeqCst);
    let during = pending
        .join()
        .unwrap()
        .expect("applied once space returned");
    assert!(during > before);
    assert!(wait_until(|| nodes[0].status().disk_full.is_none()));
    let after = futures::executor::block_on(propose(&nodes, "after"));
    assert!(after > during);
    futures::executor::block_on(nodes[0].shutdown());
}

#[test]
fn a_full_simulated_disk_under_file_storage_pauses_then_resumes_and_restarts_cleanly() {
    use raftkv::storage::FileStorage;
    let (nodes, disk) = single_node_on_a_simulated_disk();
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(futures::executor::block_on(propose(
            &nodes,
            &format!("a{i}"),
        )));
    }
    disk.set_no_space(true);
    let waiting = nodes[0].clone();
    let pending =
        std::thread::spawn(move || futures::executor::block_on(waiting.propose("during")));
    assert!(
        wait_until(|| nodes[0].status().disk_full.is_some()),
        "the node did not report the full disk"
    );
    assert!(
        nodes[0].status().running,
        "a full disk must not stop the node"
    );
    disk.set_no_space(false);
    acked.push(
        pending
            .join()
            .unwrap()
            .expect("applied once space returned"),
    );
    for i in 0..5 {
        acked.push(futures::executor::block_on(propose(
            &nodes,
            &format!("b{i}"),
        )));
    }
    futures::executor::block_on(nodes[0].shutdown());
    // Power loss after a clean stop, then a restart from the disk: everything acknowledged is
    // there.
    disk.crash(7);
    let options = raftkv::storage::FileStorageOptions {
        cluster_id: 1,
        node_id: 1,
        segment_size: 4096,
        ..Default::default()
    };
    let reopened = FileStorage::open_simulated(&disk, "/node-1", options).expect("starts cleanly");
    let last = reopened.last_index();
    assert!(
        acked.iter().all(|&i| i <= last),
        "acknowledged entries lost: last {last}, acked {acked:?}"
    );
}
