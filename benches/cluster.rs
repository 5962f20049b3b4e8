//! Committed proposals per second and latency percentiles of a 3-node cluster on the
//! in-process network, 100-byte commands, with 1 and 64 concurrent proposers: first on the
//! in-memory storage, then on the file storage (three data directories on one disk).
//! Beside them it prints the machine's own floors measured in the same run: a round trip
//! between two threads over a channel (a proposal crosses several), and one 100-byte
//! write + fdatasync in the same directory, and three of them issued at once on three files
//! until the second is done (every commit waits for one on the leader and one on a follower,
//! or for two followers', and here the three nodes share one disk). Last, the durable rows
//! again with a disk of its own per node (tmpfs, each sync taking that fdatasync's median;
//! see `common::OwnDisk`), beside what those syncs really took.
//!
//! Run with: `cargo bench --bench cluster` (`RAFTKV_BENCH_DIR` picks the directory; it must
//! be a real disk for the file figures to mean anything). On a machine with a disk per node,
//! `RAFTKV_BENCH_NODE_DIRS=/disk1/tmp:/disk2/tmp:/disk3/tmp` puts each node's data (and its
//! share of the floors) on its own disk, which is what the durable goals are stated for.

use std::time::{Duration, Instant};

mod common;

use common::{
    bench_dir, cluster, node_dir, percentile, print_floors, quorum_fdatasync, remove_bench_dirs,
    write_fdatasync, Backend, Cluster,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;
use raftkv::error::ProposeError;
use raftkv::testing::DigestMachine;

const COMMAND: [u8; 100] = [7u8; 100];

impl Cluster<u64> {
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
}

/// Runs `total` proposals with `concurrency` proposers in `turns` equal parts, calling
/// `between` before each; prints one row; returns the rate and the median latency.
fn report(
    name: &str,
    c: &Cluster<u64>,
    concurrency: usize,
    total: usize,
    turns: usize,
    mut between: impl FnMut(),
) -> (f64, Duration) {
    let before = c.leader.status().metrics.counters;
    let mut lat = Vec::with_capacity(total);
    let mut elapsed = Duration::ZERO;
    for _ in 0..turns {
        between();
        let start = Instant::now();
        lat.extend(c.run(total / turns, concurrency));
        elapsed += start.elapsed();
    }
    let after = c.leader.status().metrics.counters;
    lat.sort();
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    let syncs = after.syncs - before.syncs;
    println!(
        "{name}/3 nodes/{concurrency} proposers: {rate:.0} commits/s, latency p50 {:?} p99 {:?} p99.9 {:?} ({} proposals; leader: {:.1} entries per sync)",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.len(),
        (after.entries_written - before.entries_written) as f64 / syncs.max(1) as f64
    );
    (rate, percentile(&lat, 0.50))
}

/// The durable rows again with a disk of its own per node (`common::OwnDisk`: tmpfs, and
/// each sync with writes takes `flush`, the median fdatasync of this disk just measured), for
/// what the library costs above the flush where nodes do not share one disk.
fn own_disks(flush: Duration) {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        println!("own disks: skipped, no /dev/shm");
        return;
    }
    let dir = shm.join(format!("raftkv-bench-own-disks-{}", std::process::id()));
    let flushes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = Backend::OwnDisks {
        dir: dir.clone(),
        flush,
        flushes: flushes.clone(),
    };
    let c = cluster(&backend, DigestMachine::default);
    flushes.lock().expect("lock").clear();
    let (one, p50) = report("own disks", &c, 1, 5_000, 5, || {});
    let took = median(std::mem::take(&mut *flushes.lock().expect("lock")));
    let (many, _) = report("own disks", &c, 64, 100_000, 1, || {});
    println!(
        "own disks: 1 proposer p50 = {:.2}x one flush ({took:?}, the median of its syncs; asked {flush:?})",
        p50.as_secs_f64() / took.as_secs_f64()
    );
    println!(
        "own disks: 64 proposers commit {:.1}x the single proposer's rate (group commit)",
        many / one
    );
    c.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(crit: &mut Criterion) {
    let dir = bench_dir("cluster");
    print_floors(&dir);

    let mem = cluster(&Backend::Memory, DigestMachine::default);
    report("memory", &mem, 1, 20_000, 1, || {});
    report("memory", &mem, 64, 200_000, 1, || {});
    let files = cluster(&Backend::Files(dir.clone()), DigestMachine::default);
    // The shared disk's speed drifts within seconds: the single proposer runs in five turns,
    // each after the two disk floors are measured again, and its median latency is compared
    // with their medians.
    let (mut single, mut three) = (Vec::new(), Vec::new());
    let (one, p50) = report("files", &files, 1, 5_000, 5, || {
        single.push(write_fdatasync(&node_dir(&dir, 1)));
        three.push(quorum_fdatasync(&dir));
    });
    let (single, three) = (median(single), median(three));
    let (many, _) = report("files", &files, 64, 100_000, 1, || {});
    println!(
        "files: 1 proposer p50 = {:.2}x one fdatasync ({single:?}), {:.2}x three at once ({three:?}), medians of the turns",
        p50.as_secs_f64() / single.as_secs_f64(),
        p50.as_secs_f64() / three.as_secs_f64()
    );
    println!(
        "files: 64 proposers commit {:.1}x the single proposer's rate (group commit)",
        many / one
    );
    own_disks(single);

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
    remove_bench_dirs(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
