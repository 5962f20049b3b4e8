//! The TCP transport of the examples (`examples/common/tcp.rs`) under a real 3-node cluster
//! on 127.0.0.1: commands commit and apply everywhere; a node whose listener dies falls
//! behind while the others go on committing, and catches up once its listener is back and
//! its peers have redialed; garbage, an oversized frame and another cluster's frame each cost
//! the sender its connection and nothing else. The handshake: the right secret gets in, a
//! wrong or missing one is refused, a replayed hello fails; idle sockets cannot keep a peer
//! out, a reconnecting peer replaces its old link, and a silent link is closed. Incarnations:
//! an older one than the newest seen of an id is refused, as dialer and as listener.

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
use tcp::{dial, serve, PeerOptions, ServeOptions, TcpTransport, TransportStats, QUEUE_BATCHES};
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
        let options = ServeOptions::new(CLUSTER, id, [1, 2, 3]);
        let task = tokio::spawn(serve(socket, options, move |m| inbox.step(m)));
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

/// Waits for the server to close `stream` (whatever it sent before, such as its challenge).
async fn expect_close(mut stream: TcpStream, within: Duration) {
    let mut sink = Vec::new();
    let closed = timeout(within, stream.read_to_end(&mut sink)).await;
    // A clean EOF or a reset: either way the server hung up.
    assert!(closed.is_ok(), "the server kept a bad connection open");
}

/// Connects to `addr` without a handshake, writes `bytes`, and expects the server to close.
async fn raw_and_expect_close(addr: SocketAddr, bytes: &[u8], within: Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    expect_close(stream, within).await;
}

/// Shakes hands as node `from`, writes `bytes`, and expects the server to close.
async fn shaken_and_expect_close(addr: SocketAddr, from: u64, to: u64, bytes: &[u8]) {
    let mut stream = dial(addr, &PeerOptions::new(CLUSTER, from), to)
        .await
        .unwrap();
    stream.write_all(bytes).await.unwrap();
    expect_close(stream, Duration::from_secs(3)).await;
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
        let member = (1..=3).find(|&id| id != target).unwrap();
        let addr = cluster.addrs[target as usize - 1];

        // Before the handshake: text (refused as soon as a hello's worth arrived), and a few
        // bytes then silence (closed at the handshake timeout).
        let mut text = b"GET / HTTP/1.1\r\nHost: raftkv\r\n".to_vec();
        text.resize(128, b' ');
        raw_and_expect_close(addr, &text, Duration::from_secs(2)).await;
        raw_and_expect_close(addr, b"GET /", tcp::HANDSHAKE_TIMEOUT * 2).await;
        // Handshakes that are refused: another cluster, an id that is not a member, a hello
        // meant for another node.
        for (options, to) in [
            (PeerOptions::new(CLUSTER + 1, member), target),
            (PeerOptions::new(CLUSTER, 9), target),
            (PeerOptions::new(CLUSTER, member), member),
        ] {
            let refused = dial(addr, &options, to).await;
            assert!(
                matches!(refused, Err(tcp::DialError::Handshake(..))),
                "{refused:?}"
            );
        }

        // After a handshake (as a member): bytes that are not a frame (bad version), a frame
        // with one payload bit flipped (checksum), only the length of an oversized frame
        // (refused without waiting for its body), another cluster's frame, a second hello.
        let mut junk = 32u32.to_le_bytes().to_vec();
        junk.extend([0xAB; 32]);
        let mut flipped = wire::encode(CLUSTER, &Frame::Messages(Vec::new())).unwrap();
        flipped[14] ^= 0x10;
        let oversized = (DEFAULT_MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
        let other = wire::encode(CLUSTER + 1, &Frame::Messages(Vec::new())).unwrap();
        let second = wire::encode(CLUSTER, &Frame::Hello { from: member }).unwrap();
        for bytes in [junk, flipped, oversized, other, second] {
            shaken_and_expect_close(addr, member, target, &bytes).await;
        }

        // The node goes on; the member whose connection was taken over redials (a reconnecting
        // peer replaces its old connection, and so did the impostor) and everyone catches up.
        for i in 0..5 {
            sent.push(format!("after{i}"));
            cluster.propose(sent.last().unwrap()).await;
        }
        for id in 1..=3 {
            cluster.wait_applied(id, &sent).await;
        }
        let stats = cluster.stats.clone();
        assert!(
            wait_until(|| (1..=3u64)
                .filter(|&p| p != target)
                .all(|p| stats[p as usize - 1].peer(target).unwrap().connected))
            .await,
            "a peer did not reconnect"
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
        let server = tokio::spawn(serve(
            socket,
            ServeOptions::new(CLUSTER, 1, [1, 2, 3]),
            move |m| {
                let _ = tx.send(m);
            },
        ));
        let mut stream = dial(addr, &PeerOptions::new(CLUSTER, 2), 1).await.unwrap();
        let batch = vec![heartbeat(2, 1), heartbeat(3, 1), heartbeat(2, 1)];
        let bytes = wire::encode(CLUSTER, &Frame::Messages(batch)).unwrap();
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
            (link.dropped, link.connected, link.connects, link.dials),
            (100, false, 0, 0)
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
        // A listener of another cluster: it refuses each connection's handshake.
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let server = tokio::spawn(serve(
            socket,
            ServeOptions::new(CLUSTER + 1, 2, [1, 2]),
            |_| {},
        ));
        let transport = TcpTransport::new(CLUSTER, 1, HashMap::from([(2, addr)]));
        let stats = transport.stats();
        assert!(wait_until(|| stats.peer(2).unwrap().dials >= 1).await);
        // Backoff 50, 100, 200, 400, 800 ms...: a handful of dials in 1.2 s, not one per 50 ms.
        sleep(Duration::from_millis(1200)).await;
        let link = stats.peer(2).unwrap();
        assert!(
            (2..=6).contains(&link.dials),
            "{} connections in 1.2 s",
            link.dials
        );
        assert_eq!(
            link.connects, 0,
            "a refused handshake counted as a connection"
        );
        drop(transport);
        server.abort();
    })
    .await;
}

/// A listener for node 1 of members 1..=3 with `secret`, handing messages to a channel.
async fn listener_with(
    secret: tcp::guard::Secret,
) -> (
    SocketAddr,
    JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Message>,
) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut options = ServeOptions::new(CLUSTER, 1, [1, 2, 3]);
    options.peer.secret = secret;
    let server = tokio::spawn(serve(socket, options, move |m| {
        let _ = tx.send(m);
    }));
    (addr, server, rx)
}

fn with_secret(from: u64, secret: &tcp::guard::Secret) -> PeerOptions {
    let mut o = PeerOptions::new(CLUSTER, from);
    o.secret = secret.clone();
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_secret_gets_in_and_one_without_is_refused() {
    use tcp::guard::{HandshakeError, Refusal, Secret};
    within_budget(async {
        let secret = Secret::new(b"a shared secret of the cluster".to_vec());
        let (addr, server, mut rx) = listener_with(secret.clone()).await;

        // The right secret: in, and its messages arrive.
        let mut stream = dial(addr, &with_secret(2, &secret), 1).await.unwrap();
        let frame = wire::encode(CLUSTER, &Frame::Messages(vec![heartbeat(2, 1)])).unwrap();
        stream.write_all(&frame).await.unwrap();
        let m = timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(m, Some(heartbeat(2, 1)));

        // A wrong secret, and none: refused in the handshake, nothing stepped.
        for wrong in [
            Secret::new(b"not the secret of this cluster".to_vec()),
            Secret::none(),
        ] {
            let refused = dial(addr, &with_secret(3, &wrong), 1).await;
            assert!(
                matches!(
                    refused,
                    Err(tcp::DialError::Handshake(
                        HandshakeError::Refused(Refusal::BadProof),
                        _
                    ))
                ),
                "{refused:?}"
            );
        }
        // A listener without the secret cannot pass for one with it: the dialer refuses it.
        let (open_addr, open_server, _open_rx) = listener_with(Secret::none()).await;
        let fooled = dial(open_addr, &with_secret(2, &secret), 1).await;
        assert!(
            matches!(fooled, Err(tcp::DialError::Handshake(..))),
            "{fooled:?}"
        );
        assert!(
            timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_err(),
            "a refused peer's message was stepped"
        );
        server.abort();
        open_server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_hello_is_refused() {
    use tcp::guard::{self, Port, Secret};
    within_budget(async {
        let secret = Secret::new(b"a shared secret of the cluster".to_vec());
        let (addr, server, _rx) = listener_with(secret.clone()).await;

        // A genuine handshake, recorded by someone on the path.
        let mut first = TcpStream::connect(addr).await.unwrap();
        let c1 = guard::read_challenge(&mut first, Port::Peer).await.unwrap();
        let hello = guard::make_hello(
            Port::Peer,
            &secret,
            &c1,
            guard::Hello::peer(CLUSTER, 2, 1, 1, None),
        )
        .unwrap();
        let recorded = guard::hello_bytes(Port::Peer, &hello);
        first.write_all(&recorded).await.unwrap();
        guard::read_answer(&mut first, Port::Peer, &secret, &c1, &hello)
            .await
            .expect("the genuine hello is accepted");

        // The same bytes on a new connection answer a challenge they were not made for.
        let mut replay = TcpStream::connect(addr).await.unwrap();
        let c2 = guard::read_challenge(&mut replay, Port::Peer)
            .await
            .unwrap();
        assert_ne!(c1.nonce, c2.nonce, "challenges must be fresh");
        replay.write_all(&recorded).await.unwrap();
        let answer = guard::read_answer(&mut replay, Port::Peer, &secret, &c2, &hello).await;
        assert!(
            matches!(
                answer,
                Err(guard::HandshakeError::Refused(guard::Refusal::BadProof))
            ),
            "{answer:?}"
        );
        expect_close(replay, Duration::from_secs(2)).await;
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_keep_a_peer_out_and_a_reconnecting_peer_replaces_its_link() {
    within_budget(async {
        let (addr, server, mut rx) = listener_with(tcp::guard::Secret::none()).await;

        // More idle, never-handshaking sockets than the listener keeps: the oldest go.
        let mut idle = Vec::new();
        for _ in 0..tcp::MAX_HANDSHAKING + 8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        sleep(Duration::from_millis(200)).await;
        let mut closed = 0;
        for s in &idle {
            let mut b = [0u8; 128];
            // Each got its challenge; the evicted ones are closed after it.
            while let Ok(Ok(())) = timeout(Duration::from_millis(20), s.readable()).await {
                match s.try_read(&mut b) {
                    Ok(0) => {
                        closed += 1;
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed += 1;
                        break;
                    }
                }
            }
        }
        assert!(closed >= 8, "only {closed} idle sockets evicted");

        // A real peer still gets in at once, among them.
        let mut first = dial(addr, &PeerOptions::new(CLUSTER, 2), 1).await.unwrap();
        let hb = wire::encode(CLUSTER, &Frame::Messages(vec![heartbeat(2, 1)])).unwrap();
        first.write_all(&hb).await.unwrap();
        assert!(timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .is_some());

        // It reconnects: the new connection replaces the old one, which is closed.
        let mut second = dial(addr, &PeerOptions::new(CLUSTER, 2), 1).await.unwrap();
        expect_close(first, Duration::from_secs(2)).await;
        second.write_all(&hb).await.unwrap();
        assert!(timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .is_some());

        // A shaken connection that then goes silent is closed after the idle timeout.
        let started = Instant::now();
        expect_close(second, tcp::PEER_IDLE_TIMEOUT * 2).await;
        assert!(started.elapsed() >= tcp::PEER_IDLE_TIMEOUT - Duration::from_millis(100));
        drop(idle);
        server.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_added_at_run_time_are_dialed_and_removed_ones_are_dropped() {
    within_budget(async {
        // Node 2's listener knows only node 3 at first; node 1's transport knows nobody.
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let options = ServeOptions::new(CLUSTER, 2, [2, 3]);
        let members = options.members.clone();
        let server = tokio::spawn(serve(socket, options, move |m| {
            let _ = tx.send(m);
        }));
        let transport = TcpTransport::new(CLUSTER, 1, HashMap::new());
        let (book, stats) = (transport.book(), transport.stats());
        assert!(matches!(
            transport.send(2, vec![heartbeat(1, 2)]).await,
            Err(TransportError::UnknownPeer(2))
        ));

        // Node 2 is added to node 1's book, but node 2 does not take node 1 yet: refused.
        assert!(book.set(2, addr));
        assert!(!book.set(2, addr), "the same address twice is no change");
        assert_eq!(book.peers(), [(2, addr)].into());
        assert!(wait_until(|| stats.peer(2).unwrap().dials >= 1).await);
        assert_eq!(stats.peer(2).unwrap().connects, 0);

        // Node 2 learns of node 1: the link comes up and carries messages.
        assert!(members.insert(1));
        assert!(wait_until(|| stats.peer(2).unwrap().connected).await);
        transport.send(2, vec![heartbeat(1, 2)]).await.unwrap();
        let got = timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(got.map(|m| (m.from, m.to)), Some((1, 2)));

        // Node 2 removes node 1: its connection is closed and redials are refused.
        assert!(members.remove(1));
        assert!(wait_until(|| !stats.peer(2).unwrap().connected).await);
        sleep(Duration::from_millis(300)).await;
        assert!(
            !stats.peer(2).unwrap().connected,
            "a removed id got back in"
        );

        // Node 1 removes node 2: no more link, no more counters, sends refused.
        assert!(book.remove(2));
        assert!(!book.remove(2));
        assert_eq!(stats.peer(2), None);
        assert!(book.peers().is_empty());
        assert!(matches!(
            transport.send(2, vec![heartbeat(1, 2)]).await,
            Err(TransportError::UnknownPeer(2))
        ));
        // The book does not keep the transport alive.
        drop(transport);
        assert!(!book.set(2, addr));
        server.abort();
    })
    .await;
}

fn as_incarnation(from: u64, incarnation: u64) -> PeerOptions {
    let mut o = PeerOptions::new(CLUSTER, from);
    o.incarnation = incarnation;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_incarnation_is_refused_and_the_newest_is_known() {
    use tcp::guard::{HandshakeError, Refusal};
    use tcp::DialError;
    within_budget(async {
        let (addr, server, _rx) = listener_with(tcp::guard::Secret::none()).await;
        let refused = |r: &Result<TcpStream, DialError>| {
            matches!(
                r,
                Err(DialError::Handshake(
                    HandshakeError::Refused(Refusal::RetiredIncarnation),
                    _
                ))
            )
        };

        // Node 2's first directory, then a newer one: both taken; then the first is a
        // zombie, refused, while the newest still gets in.
        dial(addr, &as_incarnation(2, 200), 1).await.expect("first");
        dial(addr, &as_incarnation(2, 300), 1).await.expect("newer");
        let zombie = dial(addr, &as_incarnation(2, 200), 1).await;
        assert!(refused(&zombie), "{zombie:?}");
        dial(addr, &as_incarnation(2, 300), 1)
            .await
            .expect("newest");

        // What the listener knows of node 2 is what a new directory asks about.
        let asked = tcp::probe(addr, &as_incarnation(2, 400), 1).await.unwrap();
        assert_eq!((asked.cluster, asked.known), (CLUSTER, 300));
        let again = tcp::probe(addr, &as_incarnation(2, 400), 1).await.unwrap();
        assert_eq!(
            again.known, 400,
            "the probe's newer incarnation was recorded"
        );
        // Node 3 was never seen.
        assert_eq!(
            tcp::probe(addr, &as_incarnation(3, 5), 1)
                .await
                .unwrap()
                .known,
            0
        );
        server.abort();

        // The other direction: a dialer that saw a newer incarnation of node 1 refuses to
        // talk to a listener still on an older one.
        let (addr, server, _rx) = listener_with(tcp::guard::Secret::none()).await;
        let dialer = PeerOptions::new(CLUSTER, 2);
        dialer.incarnations.observe(1, 2).expect("recorded");
        let stale = dial(addr, &dialer, 1).await;
        assert!(
            matches!(stale, Err(DialError::Retired(_, ref c)) if c.incarnation == 1),
            "{stale:?}"
        );
        server.abort();
    })
    .await;
}
