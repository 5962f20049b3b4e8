//! The TCP transport of the examples (`examples/common/tcp.rs`) under a real 3-node cluster
//! on 127.0.0.1: commands commit and apply everywhere; a node whose listener dies falls
//! behind while the others go on committing, and catches up once its listener is back and
//! its peers have redialed; garbage, an oversized frame and another cluster's frame each cost
//! the sender its connection and nothing else.

#[allow(dead_code)]
#[path = "../examples/common/tcp.rs"]
mod tcp;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use raftkv::error::{ProposeError, TransportError};
use raftkv::raft::{Message, MessageBody, Role};
use raftkv::storage::MemStorage;
use raftkv::testing::RecordingMachine;
use raftkv::transport::Transport;
use raftkv::wire::{self, Frame, DEFAULT_MAX_FRAME};
use raftkv::{Index, Node, NodeConfig, SnapshotSource, StateMachine};
use tcp::{serve, TcpTransport, TransportStats, QUEUE_BATCHES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const CLUSTER: u64 = 0x7C9_0001;
/// Every test finishes well within this, or fails.
const TEST_BUDGET: Duration = Duration::from_secs(30);

/// A [`RecordingMachine`] the test can look into while the node owns it.
#[derive(Clone, Default)]
struct SharedMachine(Arc<Mutex<RecordingMachine>>);

impl SharedMachine {
    fn commands(&self) -> Vec<String> {
        self.0
            .lock()
            .commands()
            .iter()
            .map(|(_, c)| String::from_utf8_lossy(c.as_bytes()).into_owned())
            .collect()
    }
}

impl StateMachine for SharedMachine {
    type Output = Index;
    fn apply(&mut self, index: Index, command: &[u8]) -> Index {
        self.0.lock().apply(index, command)
    }
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        self.0.lock().snapshot()
    }
    fn restore(&mut self, snapshot: &mut dyn io::Read) -> io::Result<()> {
        self.0.lock().restore(snapshot)
    }
}

struct TcpCluster {
    nodes: Vec<Node<Index>>,
    machines: Vec<SharedMachine>,
    addrs: Vec<SocketAddr>,
    listeners: Vec<Option<JoinHandle<()>>>,
    stats: Vec<TransportStats>,
}

impl TcpCluster {
    /// Three nodes, each listening on an ephemeral port of 127.0.0.1.
    async fn start() -> TcpCluster {
        let mut sockets = Vec::new();
        for _ in 0..3 {
            sockets.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<SocketAddr> = sockets.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut cluster = TcpCluster {
            nodes: Vec::new(),
            machines: Vec::new(),
            addrs: addrs.clone(),
            listeners: Vec::new(),
            stats: Vec::new(),
        };
        for (i, socket) in sockets.into_iter().enumerate() {
            let id = i as u64 + 1;
            let peers: HashMap<u64, SocketAddr> = (1..=3u64)
                .filter(|&p| p != id)
                .map(|p| (p, addrs[p as usize - 1]))
                .collect();
            let transport = TcpTransport::new(CLUSTER, id, peers);
            cluster.stats.push(transport.stats());
            let mut config = NodeConfig::new(id, vec![1, 2, 3]);
            config.tick_interval = Duration::from_millis(10);
            config.propose_timeout = Duration::from_secs(2);
            let machine = SharedMachine::default();
            let (node, driver) =
                Node::start(config, MemStorage::new(), machine.clone(), transport).unwrap();
            tokio::spawn(driver);
            cluster.nodes.push(node);
            cluster.machines.push(machine);
            cluster.listeners.push(None);
            cluster.listen(id, socket);
        }
        cluster
    }

    /// Serves node `id`'s inbound connections on `socket`.
    fn listen(&mut self, id: u64, socket: TcpListener) {
        let inbox = self.nodes[id as usize - 1].clone();
        let task = tokio::spawn(serve(socket, CLUSTER, DEFAULT_MAX_FRAME, move |m| {
            inbox.step(m)
        }));
        self.listeners[id as usize - 1] = Some(task);
    }

    /// Stops node `id`'s listener and every connection it accepted.
    async fn kill_listener(&mut self, id: u64) {
        if let Some(task) = self.listeners[id as usize - 1].take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on node `id`'s old address.
    async fn restart_listener(&mut self, id: u64) {
        let socket = TcpListener::bind(self.addrs[id as usize - 1])
            .await
            .unwrap();
        self.listen(id, socket);
    }

    async fn leader(&self) -> u64 {
        let found = wait_until(|| {
            self.nodes
                .iter()
                .any(|n| n.status().raft.role == Role::Leader)
        })
        .await;
        assert!(found, "no leader elected");
        self.nodes
            .iter()
            .find(|n| n.status().raft.role == Role::Leader)
            .map(|n| n.id())
            .unwrap()
    }

    /// Proposes on whichever node leads, following redirects, until it commits.
    async fn propose(&self, cmd: &str) -> Index {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut target = 0;
        loop {
            assert!(Instant::now() < deadline, "no leader committed {cmd}");
            match self.nodes[target].propose(cmd).await {
                Ok(index) => return index,
                Err(ProposeError::NotLeader { leader: Some(l) }) => target = l as usize - 1,
                Err(_) => {
                    target = (target + 1) % self.nodes.len();
                    sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Waits until node `id` has applied exactly `expected`, in order.
    async fn wait_applied(&self, id: u64, expected: &[String]) {
        let machine = &self.machines[id as usize - 1];
        let ok = wait_until(|| machine.commands() == expected).await;
        assert!(
            ok,
            "node {id} applied {:?}, expected {expected:?}",
            machine.commands()
        );
    }

    /// Stops the nodes (which drops their transports and ends the dialing tasks), then the
    /// listeners.
    async fn shutdown(mut self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
        for id in 1..=3 {
            self.kill_listener(id).await;
        }
    }
}

/// Polls `cond` every 10 ms for up to 10 s.
async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        sleep(Duration::from_millis(10)).await;
    }
    cond()
}

async fn within_budget(test: impl Future<Output = ()>) {
    timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_tcp_commit_survive_a_dead_listener_and_reconnect() {
    within_budget(async {
        let mut cluster = TcpCluster::start().await;
        let mut sent = Vec::new();
        for i in 0..10 {
            sent.push(format!("a{i}"));
            cluster.propose(&sent[i]).await;
        }
        for id in 1..=3 {
            cluster.wait_applied(id, &sent).await;
        }

        // A follower stops listening: it hears nothing, the other two still make a majority.
        let leader = cluster.leader().await;
        let down = (1..=3).find(|&id| id != leader).unwrap();
        let up = (1..=3).find(|&id| id != leader && id != down).unwrap();
        cluster.kill_listener(down).await;
        let stats = cluster.stats.clone();
        let link = |from: u64| stats[from as usize - 1].peer(down).unwrap();
        assert!(
            wait_until(|| !link(leader).connected && !link(up).connected).await,
            "peers did not notice the dead listener"
        );
        for i in 0..10 {
            sent.push(format!("b{i}"));
            cluster.propose(sent.last().unwrap()).await;
        }
        cluster.wait_applied(leader, &sent).await;
        cluster.wait_applied(up, &sent).await;
        assert_eq!(
            cluster.machines[down as usize - 1].commands(),
            &sent[..10],
            "node {down} applied commands while it could not hear anyone"
        );

        // The listener comes back on the same address: the peers redial and it catches up.
        cluster.restart_listener(down).await;
        assert!(
            wait_until(|| link(leader).connected && link(up).connected).await,
            "peers did not reconnect"
        );
        assert!(link(leader).connects >= 2 && link(up).connects >= 2);
        cluster.wait_applied(down, &sent).await;
        sent.push("c".into());
        cluster.propose("c").await;
        for id in 1..=3 {
            cluster.wait_applied(id, &sent).await;
        }
        cluster.shutdown().await;
    })
    .await;
}

/// Connects to `addr`, writes `bytes`, and waits for the server to close the connection.
async fn send_and_expect_close(addr: SocketAddr, bytes: &[u8]) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut sink = Vec::new();
    let closed = timeout(Duration::from_secs(3), stream.read_to_end(&mut sink)).await;
    // A clean EOF or a reset: either way the server hung up, and sent nothing.
    match closed {
        Ok(Ok(_)) | Ok(Err(_)) => assert!(sink.is_empty()),
        Err(_) => panic!("the server kept a bad connection open"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_survives_garbage_oversized_and_wrong_cluster_frames() {
    within_budget(async {
        let cluster = TcpCluster::start().await;
        let mut sent = vec!["before".to_string()];
        cluster.propose("before").await;
        for id in 1..=3 {
            cluster.wait_applied(id, &sent).await;
        }
        let target = cluster.leader().await;
        let addr = cluster.addrs[target as usize - 1];
        let peer_connects: Vec<u64> = (1..=3u64)
            .filter(|&p| p != target)
            .map(|p| cluster.stats[p as usize - 1].peer(target).unwrap().connects)
            .collect();

        // Text instead of frames (its first four bytes read as a huge length).
        send_and_expect_close(addr, b"GET / HTTP/1.1\r\nHost: raftkv\r\n\r\n").await;
        // A plausible length, then bytes that are not a frame (bad version).
        let mut junk = 32u32.to_le_bytes().to_vec();
        junk.extend([0xAB; 32]);
        send_and_expect_close(addr, &junk).await;
        // A valid frame with one payload bit flipped (checksum).
        let mut flipped = wire::encode(CLUSTER, &Frame::Hello { from: 2 }).unwrap();
        flipped[14] ^= 0x10;
        send_and_expect_close(addr, &flipped).await;
        // Only the length of an oversized frame: refused without waiting for its body.
        send_and_expect_close(addr, &(DEFAULT_MAX_FRAME as u32 + 1).to_le_bytes()).await;
        // A well-formed hello of another cluster.
        let other = wire::encode(CLUSTER + 1, &Frame::Hello { from: 2 }).unwrap();
        send_and_expect_close(addr, &other).await;
        // Messages before any hello, and a hello from the reserved node 0.
        let early = wire::encode(CLUSTER, &Frame::Messages(Vec::new())).unwrap();
        send_and_expect_close(addr, &early).await;
        let zero = wire::encode(CLUSTER, &Frame::Hello { from: 0 }).unwrap();
        send_and_expect_close(addr, &zero).await;

        // The node, and its peers' connections to it, are untouched.
        for i in 0..5 {
            sent.push(format!("after{i}"));
            cluster.propose(sent.last().unwrap()).await;
        }
        for id in 1..=3 {
            cluster.wait_applied(id, &sent).await;
        }
        let after: Vec<u64> = (1..=3u64)
            .filter(|&p| p != target)
            .map(|p| cluster.stats[p as usize - 1].peer(target).unwrap().connects)
            .collect();
        assert_eq!(
            peer_connects, after,
            "a bad connection disturbed a good one"
        );
        cluster.shutdown().await;
    })
    .await;
}

fn heartbeat(from: u64, to: u64) -> Message {
    Message {
        from,
        to,
        term: 1,
        body: MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_not_from_the_hello_sender_are_dropped() {
    within_budget(async {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(serve(socket, CLUSTER, DEFAULT_MAX_FRAME, move |m| {
            let _ = tx.send(m);
        }));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut bytes = wire::encode(CLUSTER, &Frame::Hello { from: 2 }).unwrap();
        let batch = vec![heartbeat(2, 1), heartbeat(3, 1), heartbeat(2, 1)];
        bytes.extend(wire::encode(CLUSTER, &Frame::Messages(batch)).unwrap());
        stream.write_all(&bytes).await.unwrap();
        for _ in 0..2 {
            let m = timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
            assert_eq!(m, Some(heartbeat(2, 1)));
        }
        // Nothing else arrives: the forged message was dropped (and the connection is kept).
        let extra = timeout(Duration::from_millis(200), rx.recv()).await;
        assert!(extra.is_err(), "unexpected {extra:?}");
        stream
            .write_all(&wire::encode(CLUSTER, &Frame::Messages(vec![heartbeat(2, 1)])).unwrap())
            .await
            .unwrap();
        let m = timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(m, Some(heartbeat(2, 1)));
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_the_newest_batches_and_counts_them() {
    within_budget(async {
        // An address nothing listens on: the link keeps redialing, its queue fills.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let transport = TcpTransport::new(CLUSTER, 1, HashMap::from([(2, addr)]));
        let stats = transport.stats();
        let total = QUEUE_BATCHES + 100;
        let mut refused = 0;
        for _ in 0..total {
            match transport.send(2, vec![heartbeat(1, 2)]).await {
                Ok(()) => {}
                Err(TransportError::Unreachable { peer: 2, .. }) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(refused, 100);
        let link = stats.peer(2).unwrap();
        assert_eq!(
            (link.dropped, link.connected, link.connects),
            (100, false, 0)
        );
        assert!(matches!(
            transport.send(3, vec![heartbeat(1, 3)]).await,
            Err(TransportError::UnknownPeer(3))
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redialing_a_listener_that_hangs_up_backs_off() {
    within_budget(async {
        // A listener of another cluster: it closes each connection right after the hello.
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let server = tokio::spawn(serve(socket, CLUSTER + 1, DEFAULT_MAX_FRAME, |_| {}));
        let transport = TcpTransport::new(CLUSTER, 1, HashMap::from([(2, addr)]));
        let stats = transport.stats();
        assert!(wait_until(|| stats.peer(2).unwrap().connects >= 1).await);
        // Backoff 50, 100, 200, 400, 800 ms...: a handful of dials in 1.2 s, not one per 50 ms.
        sleep(Duration::from_millis(1200)).await;
        let connects = stats.peer(2).unwrap().connects;
        assert!(
            (2..=6).contains(&connects),
            "{connects} connections in 1.2 s"
        );
        drop(transport);
        server.abort();
    })
    .await;
}
