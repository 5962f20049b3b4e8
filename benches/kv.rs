//! The KV service under mixed get/put workloads: 3 nodes in one process over `LocalNetwork`,
//! `KvStateMachine`, 1,000 keys with 100-byte values. Gets are linearizable reads through
//! `Node::read` (ReadIndex: one heartbeat round, no log write); puts go through the log with
//! `Node::propose`, each client numbering its requests in its own session. Two mixes (95% and
//! 50% gets), 1 and 64 clients, on the in-memory storage and on the file storage (three data
//! directories on one disk). All clients talk to the leader.
//!
//! Beside the figures it prints the machine's own floors measured in the same run: a round
//! trip between two threads over a channel (a request crosses several), and one 100-byte
//! write + fdatasync in the bench directory (every put waits for one on the leader and one on
//! a follower; a get needs none, but it is answered by node threads that also do the puts'
//! fsyncs, so with many writers it waits behind them).
//!
//! Run with: `cargo bench --bench kv` (`RAFTKV_BENCH_DIR` picks the directory; it must be a
//! real disk for the file figures to mean anything).

use std::time::{Duration, Instant};

mod common;

use common::{bench_dir, cluster, percentile, print_floors, Backend, Cluster};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;
use raftkv::error::ProposeError;
use raftkv::kv::{
    encode_command, encode_query, request, Answer, KvCommand, KvOp, KvResult, KvStateMachine,
};
use raftkv::raft::Rng;
use raftkv::Node;

const KEYS: u64 = 1_000;
const VALUE: [u8; 100] = [7u8; 100];
/// How long each printed configuration runs.
const RUN: Duration = Duration::from_secs(3);
/// Percent of gets in each mix.
const MIXES: [u64; 2] = [95, 50];
const CLIENTS: [usize; 2] = [1, 64];

type KvNode = Node<KvResult>;

/// A client: its session and the number of its latest request.
struct Client {
    session: u64,
    seq: u64,
    rng: Rng,
}

/// One operation's latency, and whether it was a get.
struct Sample {
    latency: Duration,
    get: bool,
}

enum Stop {
    /// Each client does this many operations.
    After(usize),
    /// Each client stops at this instant.
    At(Instant),
}

fn key(i: u64) -> Vec<u8> {
    format!("key{i:04}").into_bytes()
}

/// Proposes `command` until it is taken (retrying only `Busy`, which queued nothing).
async fn propose(leader: &KvNode, command: &[u8]) -> KvResult {
    loop {
        match leader.propose(command).await {
            Ok(result) => return result,
            Err(ProposeError::Busy) => tokio::task::yield_now().await,
            Err(e) => panic!("proposal failed: {e}"),
        }
    }
}

async fn one_op(leader: &KvNode, client: &mut Client, gets_percent: u64) -> bool {
    let key = key(client.rng.range(0, KEYS));
    if client.rng.range(0, 100) < gets_percent {
        let query = encode_query(&KvOp::Get { key });
        loop {
            match leader.read(query.as_slice()).await {
                Ok(KvResult::Ok {
                    answer: Answer::Value(Some(_)),
                    ..
                }) => return true,
                Err(ProposeError::Busy) => tokio::task::yield_now().await,
                other => panic!("get answered {other:?}"),
            }
        }
    }
    client.seq += 1;
    let put = KvOp::Put {
        key,
        value: VALUE.to_vec(),
    };
    match propose(leader, &request(client.session, client.seq, put)).await {
        KvResult::Ok {
            answer: Answer::Done,
            ..
        } => false,
        other => panic!("put answered {other:?}"),
    }
}

impl Cluster<KvResult> {
    /// Opens `n` client sessions and writes every key once.
    fn clients(&self, n: usize) -> Vec<Client> {
        let leader = self.leader.clone();
        self.rt.block_on(async move {
            let mut clients = Vec::new();
            for i in 0..n {
                let register = encode_command(&KvCommand::Register {
                    nonce: i as u128 + 1,
                });
                let session = match propose(&leader, &register).await {
                    KvResult::Registered(id) => id,
                    other => panic!("register answered {other:?}"),
                };
                let rng = Rng::new(i as u64 + 1);
                clients.push(Client {
                    session,
                    seq: 0,
                    rng,
                });
            }
            let count = clients.len() as u64;
            let loads = clients.iter_mut().enumerate().map(|(i, c)| {
                let leader = leader.clone();
                async move {
                    for k in (i as u64..KEYS).step_by(count as usize) {
                        c.seq += 1;
                        let put = KvOp::Put {
                            key: key(k),
                            value: VALUE.to_vec(),
                        };
                        propose(&leader, &request(c.session, c.seq, put)).await;
                    }
                }
            });
            join_all(loads).await;
            clients
        })
    }

    /// Runs the mix on every client until `stop`; returns every operation's latency.
    fn run(&self, clients: &mut [Client], gets_percent: u64, stop: &Stop) -> Vec<Sample> {
        let leader = self.leader.clone();
        self.rt.block_on(async move {
            let workers = clients.iter_mut().map(|client| {
                let leader = leader.clone();
                async move {
                    let mut samples = Vec::new();
                    loop {
                        match stop {
                            Stop::After(n) if samples.len() >= *n => break,
                            Stop::At(t) if Instant::now() >= *t => break,
                            _ => {}
                        }
                        let start = Instant::now();
                        let get = one_op(&leader, client, gets_percent).await;
                        samples.push(Sample {
                            latency: start.elapsed(),
                            get,
                        });
                    }
                    samples
                }
            });
            join_all(workers).await.into_iter().flatten().collect()
        })
    }
}

fn p50_p99(mut lat: Vec<Duration>) -> String {
    lat.sort();
    format!(
        "p50 {:?} p99 {:?}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    )
}

/// Runs one configuration for [`RUN`] and prints its figures.
fn report(name: &str, c: &Cluster<KvResult>, clients: &mut [Client], gets_percent: u64) {
    let start = Instant::now();
    let samples = c.run(clients, gets_percent, &Stop::At(start + RUN));
    let rate = samples.len() as f64 / start.elapsed().as_secs_f64();
    let all = samples.iter().map(|s| s.latency).collect();
    let gets = samples
        .iter()
        .filter(|s| s.get)
        .map(|s| s.latency)
        .collect();
    let puts = samples
        .iter()
        .filter(|s| !s.get)
        .map(|s| s.latency)
        .collect();
    println!(
        "{name}/{gets_percent}% gets/{} clients: {rate:.0} ops/s, {} (gets {}, puts {}; {} ops)",
        clients.len(),
        p50_p99(all),
        p50_p99(gets),
        p50_p99(puts),
        samples.len()
    );
}

fn bench(crit: &mut Criterion) {
    let dir = bench_dir("kv");
    print_floors(&dir);

    let mut setups = Vec::new();
    for (name, backend) in [
        ("memory", Backend::Memory),
        ("files", Backend::Files(dir.clone())),
    ] {
        let c = cluster(&backend, KvStateMachine::default);
        let mut clients = c.clients(*CLIENTS.iter().max().unwrap_or(&1));
        for gets in MIXES {
            for n in CLIENTS {
                report(name, &c, &mut clients[..n], gets);
            }
        }
        setups.push((name, c, clients));
    }

    let mut g = crit.benchmark_group("kv_mixed_100B");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, c, clients) in &mut setups {
        for gets in MIXES {
            for n in CLIENTS {
                let id = format!("{name}/{gets}pct_gets/{n}_clients");
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let per = (iters as usize).div_ceil(n);
                        let t = Instant::now();
                        c.run(&mut clients[..n], gets, &Stop::After(per));
                        t.elapsed().mul_f64(iters as f64 / (per * n) as f64)
                    })
                });
            }
        }
    }
    g.finish();
    for (_, c, _) in setups {
        c.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
