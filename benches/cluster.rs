//! Committed proposals per second and latency percentiles of a 3-node cluster on the
//! in-memory storage and in-process network, 100-byte commands, with 1 and 64 concurrent
//! proposers. Beside them it prints the machine's own floor for one proposal: a round trip
//! between two threads over a channel (a proposal needs at least two of those: client to
//! node thread and back, plus the replication round trip).
//!
//! Run with: `cargo bench --bench cluster`

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;
use raftkv::error::ProposeError;
use raftkv::raft::Role;
use raftkv::storage::MemStorage;
use raftkv::testing::RecordingMachine;
use raftkv::transport::LocalNetwork;
use raftkv::{Index, Node, NodeConfig};

const COMMAND: [u8; 100] = [7u8; 100];

struct Cluster {
    leader: Node<Index>,
    nodes: Vec<Node<Index>>,
    rt: tokio::runtime::Runtime,
}

fn cluster() -> Cluster {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let net = LocalNetwork::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut c = NodeConfig::new(id, vec![1, 2, 3]);
        c.tick_interval = Duration::from_millis(10);
        let (node, driver) = Node::start(
            c,
            MemStorage::new(),
            RecordingMachine::default(),
            net.transport(id),
        )
        .unwrap();
        rt.spawn(driver);
        let inbox = node.clone();
        net.register(id, move |m| inbox.step(m));
        nodes.push(node);
    }
    let leader = loop {
        if let Some(n) = nodes.iter().find(|n| n.status().raft.role == Role::Leader) {
            break n.clone();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Cluster { leader, nodes, rt }
}

impl Cluster {
    /// Runs `total` proposals with `concurrency` proposers; returns each one's latency.
    fn run(&self, total: usize, concurrency: usize) -> Vec<Duration> {
        let leader = self.leader.clone();
        self.rt.block_on(async move {
            let per = total / concurrency;
            let workers = (0..concurrency).map(|_| {
                let leader = leader.clone();
                async move {
                    let mut lat = Vec::with_capacity(per);
                    for _ in 0..per {
                        let t = Instant::now();
                        loop {
                            match leader.propose(COMMAND.as_slice()).await {
                                Ok(_) => break,
                                Err(ProposeError::Busy) => tokio::task::yield_now().await,
                                Err(e) => panic!("proposal failed: {e}"),
                            }
                        }
                        lat.push(t.elapsed());
                    }
                    lat
                }
            });
            join_all(workers).await.into_iter().flatten().collect()
        })
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn channel_round_trip() -> Duration {
    let (to_tx, to_rx) = mpsc::channel::<u64>();
    let (back_tx, back_rx) = mpsc::channel::<u64>();
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
        to_tx.send(i).unwrap();
        back_rx.recv().unwrap();
    }
    let per = t.elapsed() / n as u32;
    drop(to_tx);
    echo.join().unwrap();
    per
}

fn report(c: &Cluster, concurrency: usize, total: usize) {
    let start = Instant::now();
    let mut lat = c.run(total, concurrency);
    let elapsed = start.elapsed();
    lat.sort();
    println!(
        "cluster/3 nodes/{concurrency} proposers: {:.0} commits/s, latency p50 {:?} p99 {:?} p99.9 {:?} ({} proposals)",
        lat.len() as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.len()
    );
}

fn bench(crit: &mut Criterion) {
    let c = cluster();
    println!(
        "machine floor: thread-to-thread channel round trip {:?}",
        channel_round_trip()
    );
    report(&c, 1, 20_000);
    report(&c, 64, 200_000);

    let mut g = crit.benchmark_group("cluster_propose_100B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_proposer", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            c.run(iters as usize, 1);
            t.elapsed()
        })
    });
    g.bench_function("64_proposers", |b| {
        b.iter_custom(|iters| {
            let iters = (iters as usize).max(64);
            let t = Instant::now();
            c.run(iters, 64);
            t.elapsed()
        })
    });
    g.finish();
    for n in &c.nodes {
        c.rt.block_on(n.shutdown());
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
