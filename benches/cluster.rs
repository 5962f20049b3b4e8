//! Committed proposals per second and latency percentiles of a 3-node cluster on the
//! in-process network, 100-byte commands, with 1 and 64 concurrent proposers: first on the
//! in-memory storage, then on the file storage (three data directories on one disk).
//! Beside them it prints the machine's own floors measured in the same run: a round trip
//! between two threads over a channel (a proposal crosses several), and one 100-byte
//! write + fdatasync in the same directory (every commit waits for at least one on the leader
//! and one on a follower).
//!
//! Run with: `cargo bench --bench cluster` (`RAFTKV_BENCH_DIR` picks the directory; it must
//! be a real disk for the file figures to mean anything).

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;
use raftkv::error::ProposeError;
use raftkv::raft::Role;
use raftkv::storage::{FileStorage, FileStorageOptions, MemStorage};
use raftkv::testing::DigestMachine;
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig};

const COMMAND: [u8; 100] = [7u8; 100];

enum Backend {
    Memory,
    Files(PathBuf),
}

struct Cluster {
    leader: Node<u64>,
    nodes: Vec<Node<u64>>,
    rt: tokio::runtime::Runtime,
}

fn cluster(backend: &Backend) -> Cluster {
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
        let machine = DigestMachine::default();
        let (node, driver) = match backend {
            Backend::Memory => Node::start(c, MemStorage::new(), machine, net.transport(id)),
            Backend::Files(dir) => {
                let opts = FileStorageOptions {
                    cluster_id: 1,
                    node_id: id,
                    ..Default::default()
                };
                let storage = FileStorage::open(dir.join(format!("n{id}")), opts).unwrap();
                Node::start(c, storage, machine, net.transport(id))
            }
        }
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
            let per = total.div_ceil(concurrency);
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

    fn shutdown(self) {
        for n in &self.nodes {
            self.rt.block_on(n.shutdown());
        }
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

fn write_fdatasync(dir: &std::path::Path) -> Duration {
    let path = dir.join("raw");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    let n = 500;
    let t = Instant::now();
    for _ in 0..n {
        f.write_all(&COMMAND).unwrap();
        f.sync_data().unwrap();
    }
    let per = t.elapsed() / n;
    let _ = std::fs::remove_file(&path);
    per
}

fn report(name: &str, c: &Cluster, concurrency: usize, total: usize) -> f64 {
    let start = Instant::now();
    let mut lat = c.run(total, concurrency);
    let elapsed = start.elapsed();
    lat.sort();
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{name}/3 nodes/{concurrency} proposers: {rate:.0} commits/s, latency p50 {:?} p99 {:?} p99.9 {:?} ({} proposals)",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.len()
    );
    rate
}

fn bench(crit: &mut Criterion) {
    let root = std::env::var_os("RAFTKV_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = root.join(format!("raftkv-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "machine floor: thread-to-thread channel round trip {:?}",
        channel_round_trip()
    );
    println!(
        "machine floor: 100 B write + fdatasync {:?} in {}",
        write_fdatasync(&dir),
        dir.display()
    );

    let mem = cluster(&Backend::Memory);
    report("memory", &mem, 1, 20_000);
    report("memory", &mem, 64, 200_000);
    let files = cluster(&Backend::Files(dir.clone()));
    let one = report("files", &files, 1, 5_000);
    let many = report("files", &files, 64, 100_000);
    println!(
        "files: 64 proposers commit {:.1}x the single proposer's rate (group commit)",
        many / one
    );

    let mut g = crit.benchmark_group("cluster_propose_100B");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (name, c) in [("memory", &mem), ("files", &files)] {
        g.bench_function(format!("{name}/1_proposer"), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                c.run(iters as usize, 1);
                t.elapsed()
            })
        });
        g.bench_function(format!("{name}/64_proposers"), |b| {
            b.iter_custom(|iters| {
                let n = (iters as usize).max(64);
                let t = Instant::now();
                c.run(n, 64);
                t.elapsed().mul_f64(iters as f64 / n as f64)
            })
        });
    }
    g.finish();
    mem.shutdown();
    files.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
