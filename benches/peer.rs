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
//!   one-worker runtime, as openraft's do);
//! - `PEER_SHARED=1`: the client tasks on the server runtime instead (a host whose clients
//!   live on the same executor as its nodes: every hand-off is then a task wake-up there);
//! - `PEER_LOG_ENTRIES=5000`: a snapshot (and log compaction) every this many empty entries
//!   (`NodeConfig::max_log_bytes` of that many `ENTRY_OVERHEAD`s), as openraft's benchmark
//!   does with its default snapshot policy `LogsSinceLast(5000)`. Our default, 64 MiB of
//!   log, is 2.8 million empty entries: a run of a few million writes would spend a fifth of
//!   its time faulting in the memory of a log that in-memory peer never keeps.
//!
//! The last line reads `raftkv put/s median: c1 N c64 N ...`.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
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
    /// Proposals that failed (leadership moved) and were retried on the new leader.
    failed: u64,
    /// The highest term at the end (1 or 2: the first election; more: leadership moved).
    terms: u64,
    /// The leader's batches (`Ready`s) and the entries they wrote: how much each round
    /// carried.
    batches: u64,
    entries: u64,
}

fn start_cluster(
    server: &tokio::runtime::Runtime,
    in_task: bool,
    log_entries: usize,
) -> (Arc<Vec<Node<()>>>, Node<()>) {
    let net = LocalNetwork::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut c = NodeConfig::new(id, vec![1, 2, 3]);
        c.tick_interval = Duration::from_millis(10);
        // Compact as often as openraft does in its benchmark (its default snapshot policy,
        // `LogsSinceLast(5000)`): our default of 64 MiB of log holds 2.8 million empty
        // entries, which a run of a few million writes spends growing into.
        c.max_log_bytes = Some(log_entries as u64 * raftkv::raft::ENTRY_OVERHEAD);
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
    let nodes = Arc::new(nodes);
    let leader = server.block_on(current_leader(&nodes));
    (nodes, leader)
}

/// The leader once one is known (awaited, not polled).
async fn current_leader(nodes: &[Node<()>]) -> Node<()> {
    loop {
        let id = nodes[0].wait_for_leader().await.expect("node runs");
        let leader = &nodes[(id - 1) as usize];
        let s = leader
            .wait_for(|s| s.raft.role == raftkv::raft::Role::Leader || s.raft.leader != Some(id))
            .await;
        if s.raft.role == raftkv::raft::Role::Leader {
            return leader.clone();
        }
    }
}

/// Latencies: 1 µs buckets below 1 ms, 64 µs buckets up to 132 ms (beyond: the last
/// bucket); small (12 KiB), so a thousand clients' histograms stay in cache.
struct Histogram(Vec<u32>);

impl Histogram {
    const FINE: usize = 1024;
    const BUCKETS: usize = Self::FINE + 2048;
    fn new() -> Self {
        Histogram(vec![0; Self::BUCKETS])
    }
    fn bucket(us: usize) -> usize {
        if us < Self::FINE {
            us
        } else {
            (Self::FINE + ((us - Self::FINE) >> 6)).min(Self::BUCKETS - 1)
        }
    }
    fn top_us(bucket: usize) -> u64 {
        if bucket < Self::FINE {
            bucket as u64
        } else {
            (Self::FINE + ((bucket - Self::FINE) << 6)) as u64
        }
    }
    fn record(&mut self, d: Duration) {
        self.0[Self::bucket(d.as_micros() as usize)] += 1;
    }
    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }
    fn count(&self) -> u64 {
        self.0.iter().map(|&n| n as u64).sum()
    }
    fn quantile(&self, q: f64) -> Duration {
        let want = ((self.count() as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in self.0.iter().enumerate() {
            seen += n as u64;
            if seen >= want {
                return Duration::from_micros(Self::top_us(b));
            }
        }
        Duration::from_micros(Self::top_us(Self::BUCKETS - 1))
    }
}

/// How a run is set up (from the environment, see the module docs).
#[derive(Clone, Copy)]
struct Shape {
    workers: usize,
    in_task: bool,
    shared: bool,
    log_entries: usize,
}

fn run_once(clients: usize, ops: usize, shape: Shape) -> Run {
    let Shape {
        workers,
        in_task,
        shared,
        log_entries,
    } = shape;
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = (!shared).then(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("client runtime")
    });
    let (nodes, leader) = start_cluster(&server, in_task, log_entries);
    let per = ops / clients;
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let work = async {
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let mut leader = leader.clone();
                let nodes = nodes.clone();
                let failed = failed.clone();
                tokio::spawn(async move {
                    let mut lat = Histogram::new();
                    for _ in 0..per {
                        let t = Instant::now();
                        loop {
                            match leader.propose(Payload::empty()).await {
                                Ok(()) => break,
                                Err(ProposeError::Busy) => tokio::task::yield_now().await,
                                // Leadership moved (an overloaded machine can starve a
                                // leader past an election timeout): count it, follow it.
                                Err(_) => {
                                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    leader = current_leader(&nodes).await;
                                }
                            }
                        }
                        lat.record(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut all = Histogram::new();
        for t in tasks {
            all.merge(&t.await.expect("client task"));
        }
        all
    };
    let lat = match &client_rt {
        Some(rt) => rt.block_on(work),
        None => server.block_on(work),
    };
    let elapsed = start.elapsed();
    let terms = nodes
        .iter()
        .map(|n| n.status().raft.term)
        .max()
        .unwrap_or(0);
    let counters = leader.status().metrics.counters;
    for n in nodes.iter() {
        server.block_on(n.shutdown());
    }
    Run {
        rate: lat.count() as f64 / elapsed.as_secs_f64(),
        p50: lat.quantile(0.5),
        p99: lat.quantile(0.99),
        failed: failed.load(std::sync::atomic::Ordering::Relaxed),
        terms,
        batches: counters.batches,
        entries: counters.entries_written,
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
    let shared = std::env::var("PEER_SHARED").is_ok_and(|v| v == "1");
    let log_entries = env_usize("PEER_LOG_ENTRIES", 5000);
    let shape = Shape {
        workers,
        in_task,
        shared,
        log_entries,
    };
    println!(
        "raftkv peer shape: nodes {}, {workers} server workers, 1 client worker, a snapshot \
         every {log_entries} entries",
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
            let run = run_once(c, n, shape);
            println!(
                "clients {c} run {r}: {:.0} put/s, p50 {:?} p99 {:?} ({n} writes; term {}, {} retried; leader: {} batches, {:.1} entries each)",
                run.rate,
                run.p50,
                run.p99,
                run.terms,
                run.failed,
                run.batches,
                run.entries as f64 / run.batches.max(1) as f64
            );
            runs.push(run);
        }
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let med = &runs[(runs.len() - 1) / 2];
        summary.push_str(&format!(" c{c} {:.0}", med.rate));
    }
    println!("{summary}");
}
