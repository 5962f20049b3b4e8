//! End to end, with real processes: three `examples/node.rs` processes on loopback (file
//! storage, TCP between them), four concurrent `KvClient`s over TCP recording everything they
//! see, and meanwhile one node after another SIGKILLed and restarted, then every node
//! SIGKILLed at once and restarted. At the end every acknowledged write must be in the final
//! reads, and the whole history must be linearizable.
//!
//! The test builds the example binaries itself (`cargo build --examples`, same profile and
//! target directory as this test). Everything it starts is killed and its directory removed
//! when it ends, passing or failing (`ProcessCluster`'s drop).

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "../examples/common/processes.rs"]
mod processes;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::TcpKvEndpoint;
use processes::ProcessCluster;
use raftkv::kv::{ClientError, KvClient};
use raftkv::testing::linearizability::{check, KvInput, KvOutput, Operation, Verdict};
use tokio::time::sleep;

/// Concurrent clients.
const CLIENTS: u64 = 4;
/// Keys the clients share (many, so each key's appended value stays short for the checker).
const KEYS: u64 = 12;
/// Pause between one client's operations (bounds the history the checker has to search).
const THINK: Duration = Duration::from_millis(20);

fn key(k: u64) -> Vec<u8> {
    format!("k{k:02}").into_bytes()
}

/// Milliseconds since the test started: the history's clock.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// What one client did: its history, and the tokens of its acknowledged writes.
#[derive(Default)]
struct ClientLog {
    history: Vec<Operation>,
    /// `(key number, token)` of every acknowledged write.
    acknowledged: Vec<(u64, Vec<u8>)>,
}

/// A client (it writes nothing until its first write, which registers its session).
async fn connect(endpoint: TcpKvEndpoint) -> Result<KvClient<TcpKvEndpoint>, String> {
    KvClient::connect(endpoint, processes::client_options())
        .await
        .map_err(|e| e.to_string())
}

/// One client: appends unique tokens, reads, and extends values by compare-and-swap, until
/// `stop`. A request that times out is recorded with an unknown outcome.
async fn run_client(
    id: u64,
    endpoint: TcpKvEndpoint,
    clock: Clock,
    stop: Arc<AtomicBool>,
) -> Result<ClientLog, String> {
    let mut client = connect(endpoint).await?;
    let mut log = ClientLog::default();
    let mut rng = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut last_seen: Vec<Option<Vec<u8>>> = vec![None; KEYS as usize];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        n += 1;
        let k = (rng >> 8) % KEYS;
        let token = format!("{id}.{n};").into_bytes();
        let invoke = clock.now();
        let (input, result) = match (rng >> 32) % 10 {
            0..=4 => {
                let r = client.append(key(k), token.clone()).await;
                (
                    KvInput::Append(key(k), token.clone()),
                    r.map(|()| KvOutput::Done),
                )
            }
            5..=7 => {
                let r = client.get(key(k)).await;
                if let Ok(v) = &r {
                    last_seen[k as usize] = v.clone();
                }
                (KvInput::Get(key(k)), r.map(KvOutput::Value))
            }
            _ => {
                // Extends the value this client last saw, if it is still the value.
                let expected = last_seen[k as usize].clone();
                let mut new = expected.clone().unwrap_or_default();
                new.extend_from_slice(&token);
                let r = client
                    .cas(key(k), expected.clone(), Some(new.clone()))
                    .await;
                if let Ok(true) = r {
                    last_seen[k as usize] = Some(new.clone());
                }
                let input = KvInput::Cas {
                    key: key(k),
                    expected,
                    new: Some(new),
                };
                (input, r.map(KvOutput::Bool))
            }
        };
        let (output, complete) = match result {
            Ok(out) => {
                let wrote = matches!(out, KvOutput::Done | KvOutput::Bool(true));
                if wrote {
                    log.acknowledged.push((k, token));
                }
                (Some(out), Some(clock.now()))
            }
            Err(ClientError::Timeout { .. }) => (None, None),
            Err(e) => return Err(format!("client {id}: {e}")),
        };
        log.history.push(Operation {
            client: id,
            input,
            invoke,
            output,
            complete,
        });
        sleep(THINK).await;
    }
    Ok(log)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn scenario() {
    let started = Instant::now();
    let binary = processes::build_node_for_tests(false).expect("building the examples");
    let built = started.elapsed();

    let mut cluster = ProcessCluster::start(binary, 3).expect("starting the nodes");
    cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .expect("first election");
    let elected = started.elapsed();

    let clock = Clock(Instant::now());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|id| tokio::spawn(run_client(id, cluster.endpoint(), clock, stop.clone())))
        .collect();

    // Faults: each node in turn is SIGKILLed and restarted (the leader first), then all at once.
    sleep(Duration::from_secs(2)).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .expect("leader");
    let mut victims = vec![leader];
    victims.extend(cluster.ids().into_iter().filter(|&id| id != leader));
    for victim in victims {
        eprintln!("[{:>6} ms] SIGKILL node {victim}", clock.now());
        cluster.kill(victim);
        sleep(Duration::from_secs(3)).await;
        eprintln!("[{:>6} ms] restart node {victim}", clock.now());
        cluster.restart(victim).expect("restart");
        sleep(Duration::from_secs(3)).await;
        for id in cluster.ids() {
            assert_eq!(
                cluster.check_alive(id),
                Ok(true),
                "node {id} is not running"
            );
        }
    }
    eprintln!("[{:>6} ms] SIGKILL every node", clock.now());
    cluster.kill_all();
    sleep(Duration::from_millis(500)).await;
    eprintln!("[{:>6} ms] restart every node", clock.now());
    for id in cluster.ids() {
        cluster.restart(id).expect("restart");
    }
    cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .expect("election after the full restart");
    sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);

    let mut history = Vec::new();
    let mut acknowledged = Vec::new();
    for c in clients {
        let log = c.await.expect("client task").expect("client");
        history.extend(log.history);
        acknowledged.extend(log.acknowledged);
    }
    let workload_done = clock.now();

    // Final reads: every acknowledged write is there.
    let mut reader = connect(cluster.endpoint()).await.expect("final session");
    let mut finals = Vec::new();
    for k in 0..KEYS {
        let invoke = clock.now();
        let value = reader.get(key(k)).await.expect("final read");
        history.push(Operation {
            client: CLIENTS + 1,
            input: KvInput::Get(key(k)),
            invoke,
            output: Some(KvOutput::Value(value.clone())),
            complete: Some(clock.now()),
        });
        finals.push(value.unwrap_or_default());
    }
    let mut missing = Vec::new();
    for (k, token) in &acknowledged {
        if !contains(&finals[*k as usize], token) {
            missing.push((*k, String::from_utf8_lossy(token).into_owned()));
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged writes missing from the final reads: {missing:?}"
    );
    let distinct: HashSet<_> = acknowledged.iter().collect();
    assert_eq!(
        distinct.len(),
        acknowledged.len(),
        "a token was acknowledged twice"
    );
    for id in cluster.ids() {
        assert_eq!(
            cluster.check_alive(id),
            Ok(true),
            "node {id} is not running"
        );
    }
    drop(cluster);

    let completed = history.iter().filter(|o| o.complete.is_some()).count();
    let unknown = history.len() - completed;
    let checking = Instant::now();
    match check(&history, 2_000_000).expect("well-formed history") {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable(ce) => panic!("not linearizable:\n{ce}"),
        Verdict::Unknown { keys } => panic!("the checker gave up on {keys:?}"),
    }
    eprintln!(
        "e2e: {} operations ({completed} completed, {unknown} unknown outcome), {} acknowledged \
         writes all present; build {:.1} s, first election {:.1} s, workload {:.1} s, \
         check {:.2} s, total {:.1} s",
        history.len(),
        acknowledged.len(),
        built.as_secs_f64(),
        (elected - built).as_secs_f64(),
        workload_done as f64 / 1000.0,
        checking.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        acknowledged.len() >= 100,
        "too few acknowledged writes ({}) for the test to mean much",
        acknowledged.len()
    );
}

#[test]
fn three_node_processes_survive_sigkills_and_stay_linearizable() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(scenario());
}
