//! Snapshot costs with 1,000,000 keys on the file storage: creating a snapshot, installing it
//! on a follower that lags behind the compaction point, restoring a state machine from it,
//! restarting a node from a snapshot plus a 100,000-entry log tail, and the longest pause in
//! commits while a snapshot is taken (beside the longest pause without one, measured in the
//! same run), and membership on that state: the time to add a fourth node (as a learner, caught
//! up by the snapshot, then promoted) and the longest commit pause while that happens and while
//! leadership is handed over, all under 64 clients. Beside them it prints the machine's limits
//! measured in the same directory: sequential write + fdatasync bandwidth.
//!
//! Run with: `cargo bench --bench snapshot` (`RAFTKV_BENCH_KEYS` changes the key count,
//! `RAFTKV_BENCH_DIR` the directory; default the system temp directory). `RAFTKV_BENCH_PARTS`
//! runs only the named parts, comma-separated, of `create` (with the pause while a snapshot
//! is taken), `restart` (on the snapshot `create` leaves, so only with it), `install`,
//! `membership` (adding a node, then a leadership transfer) and `restore` (the criterion
//! measurement); default all. The figures of the membership part alone, without criterion:
//! `cargo bench --bench snapshot --no-run`, then
//! `RAFTKV_BENCH_PARTS=membership target/release/deps/snapshot-<hash> --bench nomatch`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use raftkv::error::{MembershipError, ProposeError};
use raftkv::raft::Role;
use raftkv::storage::{FileStorage, FileStorageOptions};
use raftkv::transport::LocalNetwork;
use raftkv::{Index, Node, NodeConfig, SnapshotSource, StateMachine};

const SHARDS: usize = 256;

/// A map of byte keys to byte values, sharded into copy-on-write pieces so that taking a
/// snapshot image costs 256 reference-count increments, and the first write to a shard after
/// an image copies only that shard.
#[derive(Clone)]
struct ShardedMap {
    shards: Vec<Arc<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl ShardedMap {
    fn new() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Arc::new(BTreeMap::new())).collect(),
        }
    }
    fn shard(key: &[u8]) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        (h % SHARDS as u64) as usize
    }
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let s = Self::shard(&key);
        Arc::make_mut(&mut self.shards[s]).insert(key, value);
    }
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }
    /// A copy that shares no shard with `self`. A clone shares them all, and the first write
    /// to each shared shard then copies it (3,900 keys) inside `apply`: 256 such copies per
    /// node stall its applies for hundreds of milliseconds after it starts.
    fn deep_copy(&self) -> Self {
        ShardedMap {
            shards: self
                .shards
                .iter()
                .map(|s| Arc::new((**s).clone()))
                .collect(),
        }
    }
}

struct Image(Vec<Arc<BTreeMap<Vec<u8>, Vec<u8>>>>);

impl SnapshotSource for Image {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1 << 16);
        for shard in &self.0 {
            for (k, v) in shard.iter() {
                buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
                buf.extend_from_slice(k);
                buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
                buf.extend_from_slice(v);
                if buf.len() >= 1 << 16 {
                    out.write_all(&buf)?;
                    buf.clear();
                }
            }
        }
        out.write_all(&buf)
    }
}

impl StateMachine for ShardedMap {
    type Output = ();
    fn apply(&mut self, _index: Index, cmd: &[u8]) {
        if let Some((k, v)) = cmd
            .split_first()
            .map(|(n, rest)| rest.split_at((*n as usize).min(rest.len())))
        {
            self.insert(k.to_vec(), v.to_vec());
        }
    }
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(Image(self.shards.clone()))
    }
    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut fresh = ShardedMap::new();
        let mut r = std::io::BufReader::with_capacity(1 << 16, r);
        let mut len = [0u8; 4];
        loop {
            match r.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let mut k = vec![0; u32::from_le_bytes(len) as usize];
            r.read_exact(&mut k)?;
            r.read_exact(&mut len)?;
            let mut v = vec![0; u32::from_le_bytes(len) as usize];
            r.read_exact(&mut v)?;
            fresh.insert(k, v);
        }
        *self = fresh;
        Ok(())
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:010}").into_bytes()
}

fn command(i: u64) -> Vec<u8> {
    let k = key(i);
    let mut c = vec![k.len() as u8];
    c.extend_from_slice(&k);
    c.extend_from_slice(&[7u8; 16]);
    c
}

fn filled(keys: u64) -> ShardedMap {
    let mut m = ShardedMap::new();
    for i in 0..keys {
        m.insert(key(i), vec![7u8; 16]);
    }
    m
}

fn options(node: u64) -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 7,
        node_id: node,
        ..Default::default()
    }
}

fn base_dir() -> std::path::PathBuf {
    std::env::var_os("RAFTKV_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir)
}

struct Harness {
    dir: std::path::PathBuf,
    net: LocalNetwork,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn new(name: &str) -> Self {
        let dir = base_dir().join(format!("raftkv-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Harness {
            dir,
            net: LocalNetwork::new(),
            rt,
        }
    }
    fn start(&self, id: u64, voters: &[u64], sm: ShardedMap) -> Node<()> {
        let mut c = NodeConfig::new(id, voters.to_vec());
        c.tick_interval = Duration::from_millis(10);
        c.max_log_bytes = None;
        c.propose_timeout = Duration::from_secs(60);
        // Every directory here is new (the harness made it), and clusters form with members
        // started later: an empty storage is what it seems.
        c.trust_empty_storage = true;
        let storage = FileStorage::open(self.dir.join(format!("n{id}")), options(id)).unwrap();
        let (node, driver) = Node::start(c, storage, sm, self.net.transport(id)).unwrap();
        self.rt.spawn(driver);
        let inbox = node.clone();
        self.net.register(id, move |m| inbox.step(m));
        node
    }
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn wait_leader(nodes: &[&Node<()>]) -> Node<()> {
    assert!(wait_until(Duration::from_secs(20), || nodes
        .iter()
        .any(|n| n.status().raft.role == Role::Leader)));
    (*nodes
        .iter()
        .find(|n| n.status().raft.role == Role::Leader)
        .unwrap())
    .clone()
}

/// Proposes with 64 concurrent clients for `length`, overwriting keys below `keys` (the state
/// keeps its size); returns every completion instant.
fn load(h: &Harness, leader: &Node<()>, length: Duration, keys: u64) -> Vec<Instant> {
    let leader = leader.clone();
    h.block_on(async move {
        let end = Instant::now() + length;
        let workers = (0..64u64).map(|w| {
            let leader = leader.clone();
            async move {
                let mut done = Vec::new();
                let mut i = 0;
                while Instant::now() < end {
                    match leader.propose(command((w * 1_000_003 + i) % keys)).await {
                        Ok(()) => done.push(Instant::now()),
                        Err(ProposeError::Busy) => tokio::task::yield_now().await,
                        Err(e) => panic!("{e}"),
                    }
                    i += 1;
                }
                done
            }
        });
        let mut all: Vec<Instant> = futures::future::join_all(workers)
            .await
            .into_iter()
            .flatten()
            .collect();
        all.sort();
        all
    })
}

/// Like [`load`], but the clients follow the leader as it moves (a proposal refused by a
/// node that no longer leads goes to the one it names).
fn load_following(h: &Harness, nodes: &[Node<()>], length: Duration, keys: u64) -> Vec<Instant> {
    let nodes = nodes.to_vec();
    h.block_on(async move {
        let end = Instant::now() + length;
        let workers = (0..64u64).map(|w| {
            let nodes = nodes.clone();
            async move {
                let mut done = Vec::new();
                let mut at = 0usize;
                let mut i = 0;
                while Instant::now() < end {
                    match nodes[at].propose(command((w * 1_000_003 + i) % keys)).await {
                        Ok(()) => {
                            done.push(Instant::now());
                            i += 1;
                        }
                        Err(ProposeError::NotLeader { leader }) => {
                            at = leader
                                .and_then(|l| nodes.iter().position(|n| n.id() == l))
                                .unwrap_or((at + 1) % nodes.len());
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(ProposeError::Busy | ProposeError::Dropped) => {
                            tokio::task::yield_now().await
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                done
            }
        });
        let mut all: Vec<Instant> = futures::future::join_all(workers)
            .await
            .into_iter()
            .flatten()
            .collect();
        all.sort();
        all
    })
}

/// The longest gap between commits from `from` to `to` (the gap that spans `from` counts).
fn longest_gap_within(times: &[Instant], from: Instant, to: Instant) -> Duration {
    let first = times.partition_point(|&t| t < from).saturating_sub(1);
    let last = times
        .partition_point(|&t| t <= to)
        .min(times.len().saturating_sub(1));
    longest_gap(&times[first..=last.max(first)])
}

fn longest_gap(times: &[Instant]) -> Duration {
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

fn raw_bandwidth(dir: &std::path::Path) -> f64 {
    let path = dir.join("raw-bandwidth");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![1u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..64 {
        f.write_all(&block).unwrap();
    }
    f.sync_data().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    64.0 / secs
}

/// True if `RAFTKV_BENCH_PARTS` is unset or names `part`.
fn part(name: &str) -> bool {
    std::env::var("RAFTKV_BENCH_PARTS")
        .map(|parts| parts.split(',').any(|p| p.trim() == name))
        .unwrap_or(true)
}

fn bench(c: &mut Criterion) {
    let keys: u64 = std::env::var("RAFTKV_BENCH_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let h = Harness::new("snapshot");
    println!(
        "machine limit: sequential write + fdatasync {:.0} MiB/s in {}",
        raw_bandwidth(&h.dir),
        h.dir.display()
    );

    let t = Instant::now();
    let state = filled(keys);
    println!("built a {}-key state in {:?}", state.len(), t.elapsed());
    let voters = [1, 2, 3];

    // 1. Creation: a single node whose state holds `keys` keys.
    if part("create") {
        let node = h.start(1, &[1], state.deep_copy());
        let leader = wait_leader(&[&node]);
        h.block_on(leader.propose(command(u64::MAX))).unwrap();
        let t = Instant::now();
        let meta = h.block_on(node.snapshot()).expect("snapshot");
        let created = t.elapsed();
        assert!(wait_until(Duration::from_secs(5), || node
            .status()
            .snapshots_taken
            >= 1));
        let size = node.status().persisted.snapshot_bytes;
        println!(
            "snapshot create ({keys} keys, {:.1} MiB): {created:?} ({:.0} MiB/s) at index {}",
            size as f64 / (1 << 20) as f64,
            size as f64 / (1 << 20) as f64 / created.as_secs_f64(),
            meta.index
        );

        // 2. Pause: commits with 64 clients, without then with a snapshot being taken.
        let quiet = load(&h, &leader, Duration::from_secs(2), keys);
        let base_gap = longest_gap(&quiet);
        let snapper = node.clone();
        let trigger = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            let m = futures::executor::block_on(snapper.snapshot());
            (m, t.elapsed())
        });
        let busy = load(&h, &leader, Duration::from_secs(4), keys);
        let (m, took) = trigger.join().unwrap();
        assert!(m.is_some(), "no snapshot taken under load");
        println!(
        "longest pause between commits, 64 clients: {:?} with a {keys}-key snapshot being taken ({took:?} to take it), {base_gap:?} without ({} and {} commits)",
        longest_gap(&busy),
        busy.len(),
        quiet.len()
    );
        h.block_on(node.shutdown());
    }

    // 3. Restore and restart: a node with the snapshot plus a 100,000-entry tail (on the
    // directory of part 1, so only with it).
    if part("create") && part("restart") {
        let node = h.start(1, &[1], ShardedMap::new());
        let leader = wait_leader(&[&node]);
        h.block_on(leader.propose(command(0))).unwrap();
        let meta = h
            .block_on(node.snapshot())
            .expect("snapshot before the tail");
        let tail_start = meta.index;
        let t = Instant::now();
        let mut written = 0u64;
        h.block_on(async {
            let mut inflight = futures::stream::FuturesUnordered::new();
            use futures::StreamExt;
            for i in 0..100_000u64 {
                inflight.push(leader.propose(command(i % keys)));
                if inflight.len() >= 256 {
                    inflight.next().await.unwrap().unwrap();
                    written += 1;
                }
            }
            while let Some(r) = inflight.next().await {
                r.unwrap();
                written += 1;
            }
        });
        println!(
            "wrote a {written}-entry tail (from index {tail_start}) in {:?}",
            t.elapsed()
        );
        let last = node.status().raft.last_index;
        h.block_on(node.shutdown());
        let t = Instant::now();
        let node = h.start(1, &[1], ShardedMap::new());
        assert!(wait_until(Duration::from_secs(120), || node
            .status()
            .raft
            .applied_index
            >= last));
        let started = t.elapsed();
        println!(
        "restart with a {keys}-key snapshot and a {}-entry tail: {:?} until everything is applied (state restored: {} keys)",
        last - meta.index,
        started,
        keys
    );
        h.block_on(node.shutdown());
    }

    // 4. Install: a fresh, empty follower joins a leader that compacted its log.
    if part("install") {
        let h2 = Harness::new("install");
        let a = h2.start(1, &voters, state.deep_copy());
        let b = h2.start(2, &voters, state.deep_copy());
        let leader = wait_leader(&[&a, &b]);
        h2.block_on(leader.propose(command(u64::MAX - 1))).unwrap();
        h2.block_on(leader.snapshot()).expect("leader snapshot");
        let t = Instant::now();
        let joiner = h2.start(3, &voters, ShardedMap::new());
        let target = leader.status().raft.commit_index;
        assert!(wait_until(Duration::from_secs(300), || {
            let s = joiner.status();
            s.snapshots_installed >= 1 && s.raft.applied_index >= target
        }));
        println!("install of a {keys}-key snapshot on an empty follower (chunks over the in-process network): {:?}", t.elapsed());
        for n in [&a, &b, &joiner] {
            h2.block_on(n.shutdown());
        }
        drop(h2);
    }

    // 5. Membership: a fourth node joins a cluster holding `keys` keys while 64 clients
    // write (added as a learner, caught up by the leader's snapshot, promoted once caught up),
    // then leadership is handed over under the same load.
    if part("membership") {
        let h3 = Harness::new("membership");
        let nodes: Vec<Node<()>> = voters
            .iter()
            .map(|&i| h3.start(i, &voters, state.deep_copy()))
            .collect();
        let leader = wait_leader(&nodes.iter().collect::<Vec<_>>());
        h3.block_on(leader.propose(command(u64::MAX - 2))).unwrap();
        // Every node, so that whichever leads when the node is added sends a snapshot.
        for n in &nodes {
            h3.block_on(n.snapshot()).expect("snapshot");
        }
        let joiner = h3.start(4, &[], ShardedMap::new());
        let members = nodes.clone();
        let change = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let started = Instant::now();
            // Leadership can move before or during the change (a node thread that stalls past
            // an election timeout on a loaded machine): follow the leader.
            let leader_of = |leader: Option<u64>| {
                members
                    .iter()
                    .find(|n| Some(n.id()) == leader)
                    .cloned()
                    .unwrap_or_else(|| wait_leader(&members.iter().collect::<Vec<_>>()))
            };
            let mut l = leader_of(None);
            futures::executor::block_on(async {
                loop {
                    match l.add_learner(4).await {
                        Ok(_) => break,
                        // An attempt the leader change seemed to drop took effect after all.
                        Err(MembershipError::Invalid(_)) if l.status().membership.contains(4) => {
                            break
                        }
                        Err(MembershipError::NotLeader { leader }) => l = leader_of(leader),
                        Err(
                            MembershipError::Dropped
                            | MembershipError::Timeout
                            | MembershipError::InProgress,
                        ) => {
                            std::thread::sleep(Duration::from_millis(10));
                            l = leader_of(None);
                        }
                        Err(e) => panic!("add learner: {e}"),
                    }
                }
                loop {
                    match l.promote(4).await {
                        Ok(_) => break,
                        Err(MembershipError::Invalid(_)) if l.status().membership.is_voter(4) => {
                            break
                        }
                        Err(MembershipError::NotCaughtUp(_) | MembershipError::InProgress) => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        Err(MembershipError::NotLeader { leader }) => l = leader_of(leader),
                        Err(MembershipError::Dropped | MembershipError::Timeout) => {
                            std::thread::sleep(Duration::from_millis(10));
                            l = leader_of(None);
                        }
                        Err(e) => panic!("promote: {e}"),
                    }
                }
            });
            (started, Instant::now())
        });
        let mut all = nodes.clone();
        all.push(joiner.clone());
        let during = load_following(&h3, &all, Duration::from_secs(10), keys);
        let (from, to) = change.join().unwrap();
        assert!(joiner.status().raft.applied_index > 0);
        assert!(
            joiner.status().snapshots_installed >= 1,
            "the new node was caught up without a snapshot"
        );
        println!(
        "add a node to a {keys}-key cluster under 64 clients (learner, snapshot, catch-up, promotion): {:?}; longest pause between commits meanwhile {:?} ({} commits in the run)",
        to - from,
        longest_gap_within(&during, from, to),
        during.len()
    );
        let leader = wait_leader(&all.iter().collect::<Vec<_>>());
        let to_id = all
            .iter()
            .map(|n| n.id())
            .find(|&i| i != leader.id())
            .unwrap();
        let l = leader.clone();
        let handover = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let started = Instant::now();
            futures::executor::block_on(l.transfer_leadership(to_id)).expect("transfer");
            started
        });
        let during = load_following(&h3, &all, Duration::from_secs(3), keys);
        let from = handover.join().unwrap();
        println!(
        "longest pause between commits while leadership moves under 64 clients: {:?} ({:?} without a change in the same run)",
        longest_gap_within(&during, from, from + Duration::from_secs(1)),
        longest_gap_within(&during, from - Duration::from_millis(450), from)
    );
        for n in &all {
            h3.block_on(n.shutdown());
        }
        drop(h3);
    }

    if !part("restore") {
        return;
    }
    let mut g = c.benchmark_group("snapshot_restore");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let mut bytes = Vec::new();
    let mut image = state.clone();
    image.snapshot().write_to(&mut bytes).unwrap();
    println!(
        "serialized image: {:.1} MiB",
        bytes.len() as f64 / (1 << 20) as f64
    );
    g.bench_function(format!("restore_{keys}_keys_from_memory"), |b| {
        b.iter(|| {
            let mut m = ShardedMap::new();
            m.restore(&mut bytes.as_slice()).unwrap();
            assert_eq!(m.len() as u64, keys);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
