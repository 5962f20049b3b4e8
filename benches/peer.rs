//! The peer's shape, through raftkv's public API: openraft's own in-process cluster benchmark
//! (`benchmarks/minimal`, see `../shared/bench/README.md`), reproduced so the two can run back
//! to back on one machine and be compared by ratio.
//!
//! - 3 voters in one process on [`LocalNetwork`] (no serialization, no sockets);
//! - [`MemStorage`] (no IO) and a state machine that does nothing, empty commands;
//! - C client tasks (default 1, 64, 256, 1024), each a closed loop of proposals on the leader,
//!   each awaited until committed and applied there;
//! - put/s = all writes / wall time from the start of the clients to the last answer.
//!
//! Beside the figures it prints the machine's floor measured in the same run (a thread round
//! trip over a channel).
//!
//! Run with: `cargo bench --bench peer` — environment:
//! - `PEER_CLIENTS="1 64 256 1024"` client counts;
//! - `PEER_OPS="150000 4000000 8000000 10000000"` writes per client count (openraft's);
//! - `PEER_REPS=1` runs per count (a fresh cluster each run);
//! - `PEER_MODE=task|thread`: the nodes as tasks on the benchmark's executor (the default;
//!   `MemStorage` never blocks) or each on its own node thread;
//! - `PEER_WORKERS=2` server runtime worker threads (the client tasks run on a separate
//!   one-worker runtime, as openraft's do).
//!
//! The last line reads `raftkv put/s median: c1 N c64 N ...`.

use std::time::{Duration, Instant};

use raftkv::error::ProposeError;
use raftkv::raft::Payload;
use raftkv::storage::MemStorage;
use raftkv::transport::LocalNetwork;
use raftkv::{Index, Node, NodeConfig, SnapshotSource, StateMachine};

/// Does nothing, as openraft's benchmark state machine.
struct Nothing;

impl StateMachine for Nothing {
    type Output = ();
    fn apply(&mut self, _: Index, _: &[u8]) {}
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(Vec::new())
    }
    fn restore(&mut self, _: &mut dyn std::io::Read) -> std::io::Result<()> {
        Ok(())
    }
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split_whitespace()
        .map(|s| s.parse().expect("a number"))
        .collect()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn start_cluster(server: &tokio::runtime::Runtime, in_task: bool) -> (Vec<Node<()>>, Node<()>) {
    let net = LocalNetwork::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut c = NodeConfig::new(id, vec![1, 2, 3]);
        c.tick_interval = Duration::from_millis(10);
        let (node, driver) = if in_task {
            Node::start_in_task(c, MemStorage::new(), Nothing, net.transport(id))
        } else {
            Node::start(c, MemStorage::new(), Nothing, net.transport(id))
        }
        .expect("node starts");
        server.spawn(driver);
        let inbox = node.clone();
        net.register(id, move |m| inbox.step(m));
        nodes.push(node);
    }
    let leader = loop {
        if let Some(n) = nodes
            .iter()
            .find(|n| n.status().raft.role == raftkv::raft::Role::Leader)
        {
            break n.clone();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    (nodes, leader)
}

fn run_once(clients: usize, ops: usize, workers: usize, in_task: bool) -> Run {
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");
    let (nodes, leader) = start_cluster(&server, in_task);
    let per = ops / clients;
    let empty = Payload::default();
    let start = Instant::now();
    let mut lat: Vec<Duration> = client_rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let leader = leader.clone();
                let empty = empty.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per);
                    for _ in 0..per {
                        let t = Instant::now();
                        loop {
                            match leader.propose(empty.clone()).await {
                                Ok(()) => break,
                                Err(ProposeError::Busy) => tokio::task::yield_now().await,
                                Err(e) => panic!("proposal failed: {e}"),
                            }
                        }
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::with_capacity(per * clients);
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    });
    let elapsed = start.elapsed();
    lat.sort_unstable();
    for n in &nodes {
        server.block_on(n.shutdown());
    }
    let pick = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
    Run {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

/// Floor: one round trip between two threads over a channel.
fn channel_round_trip() -> Duration {
    let (to_tx, to_rx) = std::sync::mpsc::channel::<u64>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<u64>();
    let echo = std::thread::spawn(move || {
        while let Ok(v) = to_rx.recv() {
            if back_tx.send(v).is_err() {
                break;
            }
        }
    });
    let n = 20_000;
    let t = Instant::now();
    for i in 0..n {
        to_tx.send(i).expect("echo thread");
        back_rx.recv().expect("echo thread");
    }
    let per = t.elapsed() / n as u32;
    drop(to_tx);
    let _ = echo.join();
    per
}

fn main() {
    // `cargo bench` passes `--bench`; a plain harness ignores its arguments.
    let clients = env_list("PEER_CLIENTS", "1 64 256 1024");
    let default_ops: Vec<usize> = clients
        .iter()
        .map(|c| match c {
            1 => 150_000,
            64 => 4_000_000,
            256 => 8_000_000,
            _ => 10_000_000,
        })
        .collect();
    let ops = std::env::var("PEER_OPS")
        .map(|_| env_list("PEER_OPS", ""))
        .unwrap_or(default_ops);
    let reps = env_usize("PEER_REPS", 1);
    let workers = env_usize("PEER_WORKERS", 2);
    let in_task = std::env::var("PEER_MODE").map_or(true, |m| m != "thread");
    println!(
        "raftkv peer shape: nodes {}, {workers} server workers, 1 client worker",
        if in_task {
            "as tasks"
        } else {
            "on node threads"
        }
    );
    println!(
        "machine floor: thread-to-thread channel round trip {:?}",
        channel_round_trip()
    );
    let mut summary = String::from("raftkv put/s median:");
    for (&c, &n) in clients.iter().zip(ops.iter().chain(std::iter::repeat(&0))) {
        let n = if n == 0 { 1_000_000 } else { n };
        let mut runs = Vec::new();
        for r in 1..=reps {
            let run = run_once(c, n, workers, in_task);
            println!(
                "clients {c} run {r}: {:.0} put/s, p50 {:?} p99 {:?} ({n} writes)",
                run.rate, run.p50, run.p99
            );
            runs.push(run);
        }
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let med = &runs[(runs.len() - 1) / 2];
        summary.push_str(&format!(" c{c} {:.0}", med.rate));
    }
    println!("{summary}");
}
