//! Commit latency on a lossy in-process network: 3 nodes, `MemStorage`, 5 ms ticks with a
//! heartbeat every tick, each message dropped with probability 0%, 1% or 10%; 1 and 16
//! closed-loop proposers of 100-byte commands on the leader. A leader suspects a lost
//! append (or a lost acknowledgement) when a heartbeat answer finds the follower's match
//! below what had been sent when that heartbeat left, and settles it with an empty append: so
//! a commit that lost its messages waits at most one heartbeat plus a few round trips, unless
//! the messages that settle it are lost too (at 10% loss they often are).
//!
//! The last row isolates one loss: node 3 is down, so every commit needs node 2, and exactly
//! every 100th message between the two live nodes is dropped. It prints the commits that
//! waited on a lost message (slower than 1 ms) beside the heartbeat interval.
//!
//! Run with: `cargo bench --bench lossy` (`LOSSY_SECS=3` seconds per row).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use raftkv::error::{ProposeError, TransportError};
use raftkv::raft::Message;
use raftkv::storage::MemStorage;
use raftkv::transport::{LocalNetwork, LocalTransport, SendNow, Transport};
use raftkv::{Index, Node, NodeConfig, NodeId, SnapshotSource, StateMachine};

const TICK: Duration = Duration::from_millis(5);

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

/// Which messages a [`Lossy`] transport drops.
#[derive(Clone, Copy)]
enum Loss {
    /// Each with probability `n / 1e6` (a shared xorshift stream).
    PerMillion(u64),
    /// Exactly every `n`th message sent by any node.
    EveryNth(u64),
}

struct Lossy {
    inner: LocalTransport,
    loss: Loss,
    rng: Arc<AtomicU64>,
}

impl Lossy {
    fn keep(&self) -> bool {
        let loss_per_million = match self.loss {
            Loss::PerMillion(0) => return true,
            Loss::PerMillion(n) => n,
            Loss::EveryNth(n) => return self.rng.fetch_add(1, Ordering::Relaxed) % n != n - 1,
        };
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x % 1_000_000 >= loss_per_million
    }
    fn filter(&self, messages: Vec<Message>) -> Vec<Message> {
        messages.into_iter().filter(|_| self.keep()).collect()
    }
}

#[async_trait]
impl Transport for Lossy {
    async fn send(&self, to: NodeId, messages: Vec<Message>) -> Result<(), TransportError> {
        let kept = self.filter(messages);
        self.inner.send(to, kept).await
    }
    fn send_now(&self, to: NodeId, messages: Vec<Message>) -> SendNow {
        let kept = self.filter(messages);
        if kept.is_empty() {
            return SendNow::Sent;
        }
        self.inner.send_now(to, kept)
    }
}

/// Runs `proposers` closed-loop proposers for `secs` on a cluster of `live` of the 3 nodes;
/// returns the commit rate and the sorted latencies.
fn row(loss: Loss, live: u64, proposers: usize, secs: f64) -> (f64, Vec<Duration>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let net = LocalNetwork::new();
    let rng = Arc::new(AtomicU64::new(match loss {
        Loss::PerMillion(_) => 0x9E37_79B9_7F4A_7C15,
        Loss::EveryNth(_) => 0,
    }));
    let mut nodes = Vec::new();
    for id in 1..=live {
        let mut c = NodeConfig::new(id, vec![1, 2, 3]);
        c.tick_interval = TICK;
        c.raft.heartbeat_ticks = 1;
        // A new cluster waits for every bootstrap voter unless told its storages are new.
        c.trust_empty_storage = true;
        let transport = Lossy {
            inner: net.transport(id),
            loss,
            rng: rng.clone(),
        };
        let (node, driver) =
            Node::start(c, MemStorage::new(), Nothing, transport).expect("node starts");
        rt.spawn(driver);
        let inbox = node.clone();
        net.register(id, move |m| inbox.step(m));
        nodes.push(node);
    }
    let leader_id = rt.block_on(nodes[0].wait_for_leader()).expect("a leader");
    let leader = nodes[(leader_id - 1) as usize].clone();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut lat: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = (0..proposers)
            .map(|_| {
                let leader = leader.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match leader.propose([7u8; 100].as_slice()).await {
                            Ok(()) => lat.push(t.elapsed()),
                            Err(ProposeError::Busy) => tokio::task::yield_now().await,
                            Err(e) => panic!("proposal failed: {e}"),
                        }
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("proposer"));
        }
        all
    });
    let elapsed = start.elapsed();
    for n in &nodes {
        rt.block_on(n.shutdown());
    }
    lat.sort_unstable();
    (lat.len() as f64 / elapsed.as_secs_f64(), lat)
}

/// The `p`-quantile of sorted latencies.
fn pick(lat: &[Duration], p: f64) -> Duration {
    lat[((lat.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let secs: f64 = std::env::var("LOSSY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    println!("heartbeat every {TICK:?} (1 tick); 3 nodes, MemStorage, 100 B commands");
    for proposers in [1, 16] {
        for (name, ppm) in [("0%", 0), ("1%", 10_000), ("10%", 100_000)] {
            let (rate, lat) = row(Loss::PerMillion(ppm), 3, proposers, secs);
            println!(
                "loss {name:>3}, {proposers:>2} proposers: {rate:>8.0} commits/s, latency p50 {:?} p99 {:?} p99.9 {:?}",
                pick(&lat, 0.5),
                pick(&lat, 0.99),
                pick(&lat, 0.999),
            );
        }
    }
    let (rate, lat) = row(Loss::EveryNth(100), 2, 1, secs);
    let slow: Vec<Duration> = lat
        .iter()
        .copied()
        .filter(|d| *d > Duration::from_millis(1))
        .collect();
    print!(
        "every 100th message lost, node 3 down, 1 proposer: {rate:.0} commits/s, p50 {:?}; {} commits waited on a loss",
        pick(&lat, 0.5),
        slow.len()
    );
    if slow.is_empty() {
        println!();
    } else {
        println!(
            ": p50 {:?} p99 {:?} max {:?} (heartbeat {TICK:?})",
            pick(&slow, 0.5),
            pick(&slow, 0.99),
            slow[slow.len() - 1]
        );
    }
}
