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
//! Transactions: every operation a two-key transaction (two compares, two puts) through the
//! log, printed beside the puts of the same run (a transaction is one log entry, so it should
//! cost about one put).
//!
//! Watch fan-out: 1,000 `Watcher`s on one prefix, spread over the three nodes, while one
//! client writes to keys under it — paced at 500 writes/s (the lag figure: from a write's
//! acknowledgement to its arrival at each watcher), then as fast as it can (the events/s
//! ceiling). Every watcher must receive every write, in order; the bench checks it. The
//! change history is raised to 1,000,000 changes for this part (through the log) so that the
//! figure measures delivery, not compaction.
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
    encode_command, encode_query, request, Answer, ClientOptions, Compare, Keys, KvClient,
    KvCommand, KvLimits, KvOp, KvResult, KvStateMachine, Txn, TxnOp, WatchOptions,
};
use raftkv::raft::{Index, Rng};
use raftkv::Node;

const KEYS: u64 = 1_000;
const VALUE: [u8; 100] = [7u8; 100];
/// How long each printed configuration runs.
const RUN: Duration = Duration::from_secs(3);
/// The workloads: percent of gets in each mix (the rest puts), then transactions only.
const MIXES: [Mix; 3] = [Mix::Gets(95), Mix::Gets(50), Mix::Txns];
/// Watchers in the fan-out figure.
const WATCHERS: usize = 1_000;
/// The paced writer's rate in the fan-out figure.
const PACED_WRITES_PER_S: u64 = 500;
/// The fan-out writer's last key, after which the watchers stop.
const LAST_KEY: &[u8] = b"watch/end";

/// What each client does.
#[derive(Clone, Copy, Debug)]
enum Mix {
    /// This percentage of gets, the rest puts.
    Gets(u64),
    /// Two-key transactions: if both keys still hold the bench value, put both.
    Txns,
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mix::Gets(p) => write!(f, "{p}% gets"),
            Mix::Txns => write!(f, "txns"),
        }
    }
}
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

async fn one_op(leader: &KvNode, client: &mut Client, mix: Mix) -> bool {
    let key = key(client.rng.range(0, KEYS));
    let gets_percent = match mix {
        Mix::Gets(p) => p,
        Mix::Txns => return one_txn(leader, client, key).await,
    };
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

/// A transaction on `a` and another key: both must still hold the bench value; then both are
/// put again. Returns false (not a get).
async fn one_txn(leader: &KvNode, client: &mut Client, a: Vec<u8>) -> bool {
    let b = key(client.rng.range(0, KEYS));
    let txn = Txn::when([
        Compare::value(a.clone(), VALUE.to_vec()),
        Compare::value(b.clone(), VALUE.to_vec()),
    ])
    .then([TxnOp::put(a, VALUE.to_vec()), TxnOp::put(b, VALUE.to_vec())]);
    client.seq += 1;
    match propose(leader, &request(client.session, client.seq, KvOp::Txn(txn))).await {
        KvResult::Ok {
            answer: Answer::Txn(t),
            ..
        } if t.succeeded => false,
        other => panic!("txn answered {other:?}"),
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
    fn run(&self, clients: &mut [Client], mix: Mix, stop: &Stop) -> Vec<Sample> {
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
                        let get = one_op(&leader, client, mix).await;
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
    if lat.is_empty() {
        return "-".into();
    }
    lat.sort();
    format!(
        "p50 {:?} p99 {:?}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    )
}

/// Runs one configuration for [`RUN`] and prints its figures.
fn report(name: &str, c: &Cluster<KvResult>, clients: &mut [Client], mix: Mix) {
    let start = Instant::now();
    let samples = c.run(clients, mix, &Stop::At(start + RUN));
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
    let writes = if let Mix::Txns = mix { "txns" } else { "puts" };
    println!(
        "{name}/{mix}/{} clients: {rate:.0} ops/s, {} (gets {}, {writes} {}; {} ops)",
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
        for mix in MIXES {
            for n in CLIENTS {
                report(name, &c, &mut clients[..n], mix);
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
        for mix in MIXES {
            for n in CLIENTS {
                let what = match mix {
                    Mix::Gets(p) => format!("{p}pct_gets"),
                    Mix::Txns => "txns".to_string(),
                };
                let id = format!("{name}/{what}/{n}_clients");
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let per = (iters as usize).div_ceil(n);
                        let t = Instant::now();
                        c.run(&mut clients[..n], mix, &Stop::After(per));
                        t.elapsed().mul_f64(iters as f64 / (per * n) as f64)
                    })
                });
            }
        }
    }
    g.finish();
    // Last: a thousand watchers load the nodes more than anything above.
    for (name, c, _) in &setups {
        watch_fanout(name, c);
    }
    for (_, c, _) in setups {
        c.shutdown();
    }
    common::remove_bench_dirs(&dir);
}

/// The fan-out figures: [`WATCHERS`] watchers on one prefix, a paced then an unpaced writer.
/// The watchers run on a runtime of their own, so that they do not starve the nodes' drivers
/// (heartbeats) on the cluster's.
fn watch_fanout(name: &str, c: &Cluster<KvResult>) {
    let watch_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let leader = c.leader.clone();
    c.rt.block_on(async move {
        let mut admin = KvClient::connect(vec![leader], ClientOptions::default())
            .await
            .expect("client");
        let limits = admin.limits().await.expect("limits");
        let raised = KvLimits {
            max_changes: 1_000_000,
            max_change_bytes: 1 << 30,
            ..limits
        };
        assert!(admin.set_limits(limits, raised).await.expect("set limits"));
    });
    for rate in [Some(PACED_WRITES_PER_S), None] {
        fanout_run(name, c, &watch_rt, rate);
    }
}

fn fanout_run(
    name: &str,
    c: &Cluster<KvResult>,
    watch_rt: &tokio::runtime::Runtime,
    rate: Option<u64>,
) {
    let mut writer = c.rt.block_on(async {
        KvClient::connect(vec![c.leader.clone()], ClientOptions::default())
            .await
            .expect("client")
    });
    let from =
        c.rt.block_on(writer.query(KvOp::Limits))
            .expect("the state's revision")
            .revision
            + 1;
    // Each watcher talks to one node, round robin, until it sees the writer's last key.
    let watchers: Vec<_> = (0..WATCHERS)
        .map(|i| {
            let node = c.nodes[i % c.nodes.len()].clone();
            watch_rt.spawn(async move {
                let client = KvClient::connect(vec![node], ClientOptions::default())
                    .await
                    .expect("client");
                let keys = Keys::Prefix(b"watch/".to_vec());
                let mut w = client.watch(keys, from, WatchOptions::default());
                let mut arrivals: Vec<(Index, Instant)> = Vec::new();
                loop {
                    let changes = w.next().await.expect("watch");
                    let now = Instant::now();
                    arrivals.extend(changes.iter().map(|ch| (ch.revision, now)));
                    if changes.iter().any(|ch| ch.key == LAST_KEY) {
                        return arrivals;
                    }
                }
            })
        })
        .collect();
    // The writer: acknowledged revisions and when.
    let started = Instant::now();
    let acked: Vec<(Index, Instant)> = c.rt.block_on(async {
        let mut acked = Vec::new();
        let mut i = 0u64;
        while started.elapsed() < RUN {
            if let Some(r) = rate {
                let due = started + Duration::from_micros(i * 1_000_000 / r);
                tokio::time::sleep_until(due.into()).await;
            }
            let put = KvOp::Put {
                key: format!("watch/{}", i % 100).into_bytes(),
                value: VALUE.to_vec(),
            };
            let written = writer.write(put).await.expect("put");
            acked.push((written.revision, Instant::now()));
            i += 1;
        }
        writer.put(LAST_KEY, "end").await.expect("the last put");
        acked
    });
    let wrote_for = started.elapsed();
    let wanted: Vec<Index> = acked.iter().map(|(r, _)| *r).collect();
    let ack_at: std::collections::HashMap<Index, Instant> = acked.iter().copied().collect();
    let mut lags = Vec::new();
    let mut events = 0usize;
    for w in watchers {
        let arrivals = watch_rt.block_on(w).expect("watcher task");
        let revisions: Vec<Index> = arrivals.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            revisions[..revisions.len() - 1], // the last one is the last key's
            wanted[..],
            "a watcher missed, repeated or reordered a change"
        );
        events += wanted.len();
        for (r, at) in arrivals.iter().take(wanted.len()) {
            lags.push(at.saturating_duration_since(ack_at[r]));
        }
    }
    let all_delivered = started.elapsed();
    lags.sort();
    let paced = match rate {
        Some(r) => format!("writer paced at {r}/s"),
        None => "writer unpaced".to_string(),
    };
    println!(
        "{name}/watch fan-out/{WATCHERS} watchers, {paced}: {} writes in {:.1} s ({:.0}/s); \
         {events} events delivered in {:.1} s ({:.0} events/s); lag from the write's ack: \
         p50 {:?} p99 {:?} max {:?} (floors: poll wait {:?} + one read)",
        acked.len(),
        wrote_for.as_secs_f64(),
        acked.len() as f64 / wrote_for.as_secs_f64(),
        all_delivered.as_secs_f64(),
        events as f64 / all_delivered.as_secs_f64(),
        percentile(&lags, 0.50),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or_default(),
        WatchOptions::default().min_poll,
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
