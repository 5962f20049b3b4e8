//! Hostile clients and peers against real `examples/node.rs` processes on 127.0.0.1: each
//! outage found when the demo cluster was attacked (issue 14), reproduced as it was done.
//!
//! - an oversized put: refused at once with the limit, the cluster keeps committing, and a
//!   value just under the limit still replicates to every node;
//! - idle sockets kept topped up on every peer port across a full restart: a leader is still
//!   elected within seconds;
//! - idle sockets kept topped up on every client port: a client still gets through;
//! - most of a maximum-size frame sent on many client and peer connections, then silence:
//!   the node's RSS (read from /proc/<pid>/status) stays bounded and falls back after they
//!   disconnect;
//! - a flood of `Register` requests: an idle client's session survives it;
//! - a node of another cluster dialing in: refused, and the refusal logged.
//!
//! The tests share one machine with everything else: they run one at a time (a lock), each
//! bounded in time, and every process they start is killed when they end.

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "../examples/common/processes.rs"]
mod processes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use client_proto::{ClientRequest, ClientResponse};
use processes::{run_bounded as run, ProcessCluster};
use raftkv::error::ProposeError;
use raftkv::kv::{
    encode_command, request, ClientError, ClientOptions, KvClient, KvCommand, KvEndpoint, KvError,
    KvOp, KvResult,
};
use raftkv::NodeId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};

/// The attacker's side of each protocol, as an unfriendly program on the same host would
/// speak it: no secret, but everything a stranger can learn (the challenge names the cluster,
/// the node and its incarnation: an impostor of node 2 asks node 2's own listener for it).
mod attack {
    use std::io;
    use std::net::SocketAddr;

    use crate::client_proto::guard::{self, Port, Secret};
    use raftkv::wire::{self, Frame};
    use raftkv::NodeId;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    /// The incarnation the Raft listener at `addr` names in its challenge (anyone may ask).
    pub async fn incarnation_at(addr: SocketAddr) -> io::Result<u64> {
        let mut s = TcpStream::connect(addr).await?;
        let c = guard::read_challenge(&mut s, Port::Peer)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(c.incarnation)
    }

    /// A peer connection past the handshake and the hello, claiming to be node `from` of
    /// incarnation `incarnation` of the cluster the challenge names (refused if `from` is not
    /// a member, or if the listener saw a newer incarnation of it). An attacker who names a
    /// member's real incarnation (its own listener tells it) gets past the handshake.
    pub async fn peer_hello(
        addr: SocketAddr,
        from: NodeId,
        incarnation: u64,
    ) -> io::Result<TcpStream> {
        let mut s = TcpStream::connect(addr).await?;
        let none = Secret::none();
        let c = guard::read_challenge(&mut s, Port::Peer)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let hello = guard::make_hello(
            Port::Peer,
            &none,
            &c,
            guard::Hello::peer(c.cluster, from, c.node, incarnation, None),
        )?;
        s.write_all(&guard::hello_bytes(Port::Peer, &hello)).await?;
        guard::read_answer(&mut s, Port::Peer, &none, &c, &hello)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let frame = wire::encode(c.cluster, &Frame::Hello { from }).map_err(io::Error::other)?;
        s.write_all(&frame).await?;
        Ok(s)
    }

    /// A client connection past the handshake (no secret), ready for requests.
    pub async fn client(addr: SocketAddr) -> io::Result<TcpStream> {
        let mut s = TcpStream::connect(addr).await?;
        let none = Secret::none();
        let c = guard::read_challenge(&mut s, Port::Client)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let hello = guard::make_hello(Port::Client, &none, &c, guard::Hello::client(&c))?;
        s.write_all(&guard::hello_bytes(Port::Client, &hello))
            .await?;
        guard::read_answer(&mut s, Port::Client, &none, &c, &hello)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(s)
    }

    /// The largest frame a node's client port takes.
    pub const CLIENT_FRAME: usize = crate::client_proto::MAX_CLIENT_FRAME;

    /// The largest frame a node's peer port takes (its largest message plus the framing).
    pub fn peer_frame() -> usize {
        raftkv::raft::Config::new(1, vec![1, 2, 3]).max_message_bytes() as usize + 64
    }

    /// The ids the attacker claims on peer ports: members (accepted without a secret, each
    /// taking over that member's link) and strangers (refused).
    pub fn claimed_id(n: u64) -> NodeId {
        match n % 4 {
            0 => 2,
            1 => 3,
            _ => 100 + n % 1000,
        }
    }

    /// The real incarnations of the members [`claimed_id`] impersonates (2 and 3), learned
    /// from their own listeners at `addrs` (by id); any other id gets 1.
    pub async fn incarnations(
        addrs: &std::collections::BTreeMap<NodeId, SocketAddr>,
    ) -> std::collections::BTreeMap<NodeId, u64> {
        let mut out = std::collections::BTreeMap::new();
        for (id, addr) in addrs.iter().filter(|(id, _)| matches!(**id, 2 | 3)) {
            let inc = incarnation_at(*addr).await.expect("a member's challenge");
            out.insert(*id, inc);
        }
        out
    }
}

/// The Raft addresses of `cluster`'s nodes, by id.
fn raft_addrs(cluster: &ProcessCluster) -> BTreeMap<NodeId, std::net::SocketAddr> {
    cluster
        .ids()
        .into_iter()
        .filter_map(|id| Some((id, cluster.raft_addr(id)?)))
        .collect()
}

/// The `kv` example binary next to the node binary.
/// Runs `kv` with `args`: (exit success, stdout, stderr, how long it took).
fn run_kv(args: &[String]) -> processes::CliRun {
    processes::run_cli(&processes::kv_binary_beside(&binary()), args)
}

/// The `--nodes` argument for `cluster`'s client ports.
fn nodes_arg(cluster: &ProcessCluster) -> String {
    cluster
        .ids()
        .iter()
        .map(|&id| format!("{id}={}", cluster.client_addr(id).expect("addr")))
        .collect::<Vec<_>>()
        .join(",")
}

/// One test at a time: each starts three processes on a two-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node binary, built once per test run (same profile and target directory).
fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| processes::build_node_for_tests(false).expect("building the examples"))
        .clone()
}

async fn started(n: u64) -> ProcessCluster {
    let mut cluster = ProcessCluster::start(binary(), n).expect("starting the nodes");
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("first election");
    cluster
}

fn options(deadline: Duration) -> ClientOptions {
    ClientOptions {
        deadline,
        ..ClientOptions::default()
    }
}

/// The resident set of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Whether the server still holds `stream` open (bytes it sent are read and dropped).
fn alive(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn an_oversized_put_is_refused_at_once_and_never_wedges_the_cluster() {
    let _serial = serial();
    run(Duration::from_secs(90), async {
        let mut cluster = started(3).await;
        let endpoint = cluster.endpoint();
        let mut client = KvClient::connect(endpoint.clone(), options(Duration::from_secs(10)))
            .await
            .expect("session");

        // The value of the original outage (it fit the client frame, not the Raft frame), one
        // that fits the client frame but not an entry, one too large even for the frame.
        for size in [
            16_777_180usize,
            client_proto::MAX_ENTRY_BYTES,
            attack::CLIENT_FRAME + 1024,
        ] {
            let command = request(
                client.session(),
                1_000 + size as u64,
                KvOp::Put {
                    key: b"big".to_vec(),
                    value: vec![b'x'; size],
                },
            );
            let leader = cluster.wait_for_leader_quiet().await;
            let asked = Instant::now();
            let answer = endpoint.propose(leader, command).await;
            let took = asked.elapsed();
            eprintln!("oversized: a {size}-byte value: {answer:?} after {took:.2?}");
            assert!(
                matches!(answer, Err(ProposeError::TooLarge { .. })),
                "a {size}-byte value: {answer:?}"
            );
            assert!(took < Duration::from_secs(8), "refused only after {took:?}");
        }

        // What an operator sees from the CLI: the limit, at once, not a lost answer.
        let file = cluster.dir().join("big-value");
        std::fs::write(&file, vec![b'x'; 16_777_180]).expect("value file");
        let (ok, _, stderr, took) = run_kv(&[
            "--nodes".into(),
            nodes_arg(&cluster),
            "put".into(),
            "big".into(),
            "--file".into(),
            file.display().to_string(),
        ]);
        eprintln!(
            "oversized: kv put of 16777180 bytes took {took:.2?}: {}",
            stderr.trim()
        );
        assert!(!ok && stderr.contains("too large"), "{stderr}");
        assert!(took < Duration::from_secs(8), "the CLI took {took:?}");

        // Just under the entry limit: replicates to every node (the Raft frame holds it).
        let near = (8 << 20) - 4096;
        let asked = Instant::now();
        client
            .put("near", vec![b'y'; near])
            .await
            .expect("a value under the limit");
        let leader = cluster.wait_for_leader_quiet().await;
        let index = cluster.status(leader).await.expect("leader status").commit;
        for id in cluster.ids() {
            cluster
                .wait_applied(id, index, Duration::from_secs(20))
                .await
                .expect("every node applies the large entry");
        }
        eprintln!(
            "oversized: a {near}-byte value committed and applied on all 3 nodes in {:.2?}",
            asked.elapsed()
        );

        // And the cluster goes on committing small writes promptly.
        for i in 0..10 {
            let asked = Instant::now();
            client.put(format!("after{i}"), "v").await.expect("put");
            assert!(asked.elapsed() < Duration::from_secs(2));
        }
        assert_eq!(
            client.get("near").await.expect("get").map(|v| v.len()),
            Some(near)
        );
    });
}

/// Keeps `per_port` idle connections open to each address until `stop`: half stop after the
/// hello (claiming members' ids or ids no node has), half send nothing at all. Counts
/// connections opened.
fn flood_peer_ports(
    addrs: Vec<std::net::SocketAddr>,
    incarnations: BTreeMap<NodeId, u64>,
    per_port: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held: Vec<Vec<TcpStream>> = addrs.iter().map(|_| Vec::new()).collect();
        while !stop.load(Ordering::Relaxed) {
            for (port, addr) in addrs.iter().enumerate() {
                held[port].retain(alive);
                while held[port].len() < per_port && !stop.load(Ordering::Relaxed) {
                    let n = opened.fetch_add(1, Ordering::Relaxed);
                    let id = attack::claimed_id(n);
                    let attempt = if n.is_multiple_of(2) {
                        timeout(
                            Duration::from_millis(300),
                            attack::peer_hello(
                                *addr,
                                id,
                                incarnations.get(&id).copied().unwrap_or(1),
                            ),
                        )
                        .await
                    } else {
                        timeout(Duration::from_millis(300), TcpStream::connect(*addr)).await
                    };
                    match attempt {
                        Ok(Ok(s)) => held[port].push(s),
                        _ => break, // down (restarting): try again next round
                    }
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
    })
}

#[test]
fn idle_peer_sockets_do_not_keep_a_restarted_cluster_leaderless() {
    let _serial = serial();
    run(Duration::from_secs(90), async {
        let mut cluster = started(3).await;
        let addrs: Vec<_> = cluster
            .ids()
            .iter()
            .filter_map(|&id| cluster.raft_addr(id))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let incarnations = attack::incarnations(&raft_addrs(&cluster)).await;
        let attacker = flood_peer_ports(addrs, incarnations, 70, stop.clone(), opened.clone());
        sleep(Duration::from_secs(2)).await;
        let lines_before: Vec<usize> = cluster
            .ids()
            .iter()
            .map(|&id| cluster.log(id).lines().count())
            .collect();

        cluster.kill_all();
        sleep(Duration::from_millis(300)).await;
        for id in cluster.ids() {
            cluster.restart(id).expect("restart");
        }
        let restarted = Instant::now();
        let elected = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let took = restarted.elapsed();
        sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        let _ = attacker.await;
        let lines: Vec<usize> = cluster
            .ids()
            .iter()
            .zip(&lines_before)
            .map(|(&id, before)| cluster.log(id).lines().count().saturating_sub(*before))
            .collect();
        eprintln!(
            "idle peers: {} attacker connections opened; leader after the restart: {:?} after \
             {took:.1?}; log lines per node meanwhile: {lines:?}",
            opened.load(Ordering::Relaxed),
            elected.as_ref().map_err(|_| "none")
        );
        elected.expect("a leader despite the idle peer sockets");
        assert!(took < Duration::from_secs(8), "no leader for {took:?}");
        assert!(
            lines.iter().all(|&l| l < 400),
            "the attack flooded the logs: {lines:?} lines"
        );
    });
}

#[test]
fn idle_client_sockets_do_not_lock_out_clients() {
    let _serial = serial();
    run(Duration::from_secs(90), async {
        let cluster = started(3).await;
        let addrs: Vec<_> = cluster
            .ids()
            .iter()
            .filter_map(|&id| cluster.client_addr(id))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut held: Vec<Vec<TcpStream>> = addrs.iter().map(|_| Vec::new()).collect();
                while !stop.load(Ordering::Relaxed) {
                    for (port, addr) in addrs.iter().enumerate() {
                        held[port].retain(alive);
                        while held[port].len() < 300 {
                            match timeout(Duration::from_millis(300), attack::client(*addr)).await {
                                Ok(Ok(s)) => held[port].push(s),
                                _ => break,
                            }
                        }
                    }
                    sleep(Duration::from_millis(50)).await;
                }
            })
        };
        sleep(Duration::from_secs(2)).await;

        let asked = Instant::now();
        let outcome = async {
            let mut c =
                KvClient::connect(cluster.endpoint(), options(Duration::from_secs(15))).await?;
            c.put("through", "yes").await?;
            c.get("through").await
        }
        .await;
        let took = asked.elapsed();
        stop.store(true, Ordering::Relaxed);
        let _ = flood.await;
        eprintln!("idle clients: a client's connect+put+get with 3 x 300 idle sockets: {outcome:?} after {took:.1?}");
        assert_eq!(outcome, Ok(Some(b"yes".to_vec())));
        assert!(took < Duration::from_secs(3), "locked out for {took:?}");
    });
}

#[test]
fn partial_frames_do_not_exhaust_memory() {
    let _serial = serial();
    run(Duration::from_secs(120), async {
        let cluster = started(3).await;
        let target = 1;
        let pid = cluster.pid(target).expect("pid");
        let baseline = rss_mib(pid);
        let client_addr = cluster.client_addr(target).expect("client addr");
        let raft_addr = cluster.raft_addr(target).expect("raft addr");
        let peer_frame = attack::peer_frame();
        let incarnations = Arc::new(attack::incarnations(&raft_addrs(&cluster)).await);

        // Each connection announces a maximum-size frame and sends all of it but 64 KiB.
        const CLIENTS: usize = 120;
        const PEERS: usize = 60;
        let client_body = Arc::new(vec![0x5Au8; attack::CLIENT_FRAME - (64 << 10)]);
        let peer_body = Arc::new(vec![0x5Au8; peer_frame - (64 << 10)]);
        let mut tasks = Vec::new();
        for i in 0..CLIENTS + PEERS {
            let (body, max) = if i < CLIENTS {
                (client_body.clone(), attack::CLIENT_FRAME)
            } else {
                (peer_body.clone(), peer_frame)
            };
            let incarnations = incarnations.clone();
            tasks.push(tokio::spawn(async move {
                let connected = if i < CLIENTS {
                    attack::client(client_addr).await
                } else {
                    let id = attack::claimed_id(i as u64);
                    let inc = incarnations.get(&id).copied().unwrap_or(1);
                    attack::peer_hello(raft_addr, id, inc).await
                };
                let Ok(mut s) = connected else {
                    return None;
                };
                let _ = s.write_all(&(max as u32).to_le_bytes()).await;
                // The server may stop reading: give up writing after a while, keep the socket.
                let _ = timeout(Duration::from_secs(6), s.write_all(&body)).await;
                Some(s)
            }));
        }
        let mut peak = baseline;
        let sampling = Instant::now();
        while sampling.elapsed() < Duration::from_secs(8) {
            peak = peak.max(rss_mib(pid));
            sleep(Duration::from_millis(100)).await;
        }
        let mut held = Vec::new();
        for t in tasks {
            if let Ok(Some(s)) = t.await {
                held.push(s);
            }
        }
        let open = held.iter().filter(|s| alive(s)).count();
        drop(held);
        sleep(Duration::from_secs(3)).await;
        let after = rss_mib(pid);
        eprintln!(
            "memory: RSS {baseline:.0} MiB before, peak {peak:.0} MiB under {CLIENTS} client + \
             {PEERS} peer partial frames ({open} still open after 8 s), {after:.0} MiB 3 s after \
             they disconnected"
        );
        assert!(
            cluster.clone_status_ok(target).await,
            "node {target} stopped answering"
        );
        // The client port's budget (64 MiB), its connections' small buffers, two peers' frames.
        assert!(
            peak < baseline + 160.0,
            "peak RSS {peak:.0} MiB (baseline {baseline:.0})"
        );
        assert!(
            after < baseline + 32.0,
            "RSS {after:.0} MiB after disconnect (baseline {baseline:.0})"
        );
    });
}

#[test]
fn a_register_flood_does_not_evict_an_idle_session() {
    let _serial = serial();
    run(Duration::from_secs(90), async {
        let cluster = started(3).await;
        let endpoint = cluster.endpoint();
        let mut idle = KvClient::connect(endpoint.clone(), options(Duration::from_secs(10)))
            .await
            .expect("session");
        idle.put("mine", "1").await.expect("put");

        const FLOOD: u64 = 10_080;
        let sent = Arc::new(AtomicU64::new(0));
        let registered = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let leader = cluster.wait_for_leader_quiet().await;
        let addr = cluster.client_addr(leader).expect("addr");
        let started = Instant::now();
        let mut flooders = Vec::new();
        for _ in 0..32 {
            let (sent, registered, refused) = (sent.clone(), registered.clone(), refused.clone());
            flooders.push(tokio::spawn(async move {
                loop {
                    // A fresh nonce each time: an attacker's registrations are all new.
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    if n >= FLOOD || started.elapsed() >= Duration::from_secs(25) {
                        break;
                    }
                    let register = ClientRequest::Propose(encode_command(&KvCommand::Register {
                        nonce: u128::from(n) + 1,
                    }));
                    let Ok(mut s) = attack::client(addr).await else {
                        continue;
                    };
                    if client_proto::write_message(&mut s, &register)
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    match client_proto::read_message::<_, ClientResponse>(&mut s).await {
                        Ok(Some(ClientResponse::Result(Ok(KvResult::Registered(_))))) => {
                            registered.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for f in flooders {
            let _ = f.await;
        }
        let flood_took = started.elapsed();
        let answer = idle.put("mine", "2").await;
        eprintln!(
            "register flood: {FLOOD} Register requests in {flood_took:.1?}: {} sessions opened, \
             {} refused; then the idle client's put: {answer:?}",
            registered.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed)
        );
        assert!(
            !matches!(
                answer,
                Err(ClientError::Refused(KvError::SessionExpired { .. }))
            ),
            "the flood evicted the idle session"
        );
        answer.expect("the idle client's put");
    });
}

#[test]
fn a_node_of_another_cluster_is_refused_and_logged() {
    let _serial = serial();
    run(Duration::from_secs(60), async {
        let cluster = started(3).await;
        // A node of another cluster (its own data directory, started the same way) whose
        // --peers names this cluster's nodes 2 and 3.
        let mut other = ProcessCluster::new(binary(), 3).expect("other cluster");
        let peers = format!(
            "1={},2={},3={}",
            other.raft_addr(1).expect("addr"),
            cluster.raft_addr(2).expect("addr"),
            cluster.raft_addr(3).expect("addr"),
        );
        other.set_peers_arg(peers);
        other.restart(1).expect("start the foreign node");
        let deadline = Instant::now() + Duration::from_secs(6);
        let refused = |c: &ProcessCluster| {
            [2, 3].iter().all(|&id| {
                let log = c.log(id);
                log.lines()
                    .any(|l| l.contains("refused") && l.contains("cluster"))
            })
        };
        while Instant::now() < deadline && !refused(&cluster) {
            sleep(Duration::from_millis(200)).await;
        }
        let found = refused(&cluster);
        eprintln!(
            "cluster id: foreign node refused and logged by nodes 2 and 3: {found}; node 2's \
             log ends with:\n{}\nthe foreign node's log ends with:\n{}",
            cluster.log_tail(2, 600),
            other.log_tail(1, 600)
        );
        assert!(
            found,
            "a node of another cluster was not refused (or not logged)"
        );
    });
}

/// Helpers the tests above use on a shared `ProcessCluster`.
trait ClusterExt {
    async fn wait_for_leader_quiet(&self) -> u64;
    async fn clone_status_ok(&self, id: u64) -> bool;
}

impl ClusterExt for ProcessCluster {
    /// The node every answering node agrees leads (polls for up to 20 s).
    async fn wait_for_leader_quiet(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let statuses = self.statuses().await;
            let leaders: Vec<u64> = statuses
                .iter()
                .filter_map(|(id, s)| s.as_ref().filter(|s| s.role == "Leader").map(|_| *id))
                .collect();
            if let [leader] = leaders.as_slice() {
                return *leader;
            }
            assert!(Instant::now() < deadline, "no leader: {statuses:?}");
            sleep(Duration::from_millis(100)).await;
        }
    }

    async fn clone_status_ok(&self, id: u64) -> bool {
        self.status(id).await.is_some()
    }
}
