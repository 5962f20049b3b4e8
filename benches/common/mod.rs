//! What the cluster benchmarks share: a 3-node in-process cluster on either storage, and the
//! machine floors every figure is printed beside.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use raftkv::error::StorageError;
use raftkv::raft::Role;
use raftkv::raft::{Entry, HardState, Index, SnapshotMeta, Term};
use raftkv::storage::{
    FileStorage, FileStorageOptions, InitialState, MemStorage, PersistedSize, Storage, SyncWait,
    TailLoss,
};
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig, StateMachine};

/// Where the nodes keep their state.
pub enum Backend {
    /// `MemStorage`.
    Memory,
    /// `FileStorage`, one data directory per node under this one.
    Files(PathBuf),
    /// [`OwnDisk`]: one data directory per node under this one (on tmpfs), each sync with
    /// writes taking `flush`; every such sync's duration is pushed to `flushes`. (Only the
    /// cluster bench builds it; the other benches that share this module do not.)
    #[allow(dead_code)]
    OwnDisks {
        dir: PathBuf,
        flush: Duration,
        flushes: std::sync::Arc<std::sync::Mutex<Vec<Duration>>>,
    },
}

/// Three nodes over `LocalNetwork`, their drivers on a one-thread tokio runtime.
pub struct Cluster<O> {
    pub leader: Node<O>,
    pub nodes: Vec<Node<O>>,
    pub rt: tokio::runtime::Runtime,
}

/// Starts the cluster and waits for a leader.
pub fn cluster<M: StateMachine>(backend: &Backend, machine: impl Fn() -> M) -> Cluster<M::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let net = LocalNetwork::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut c = NodeConfig::new(id, vec![1, 2, 3]);
        c.tick_interval = Duration::from_millis(10);
        let (node, driver) = match backend {
            Backend::Memory => Node::start(c, MemStorage::new(), machine(), net.transport(id)),
            Backend::Files(dir) => {
                let storage = file_storage(&node_dir(dir, id), id);
                Node::start(c, storage, machine(), net.transport(id))
            }
            Backend::OwnDisks {
                dir,
                flush,
                flushes,
            } => {
                let storage = OwnDisk {
                    inner: file_storage(dir, id),
                    flush: *flush,
                    dirty: false,
                    flushes: flushes.clone(),
                };
                Node::start(c, storage, machine(), net.transport(id))
            }
        }
        .expect("node starts");
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

/// Node `id`'s storage in `dir/n<id>`.
fn file_storage(dir: &Path, id: u64) -> FileStorage {
    let opts = FileStorageOptions {
        cluster_id: 1,
        node_id: id,
        ..Default::default()
    };
    FileStorage::open(dir.join(format!("n{id}")), opts).expect("data directory")
}

impl<O: Send + 'static> Cluster<O> {
    /// Stops every node.
    pub fn shutdown(self) {
        for n in &self.nodes {
            self.rt.block_on(n.shutdown());
        }
    }
}

/// The directory benchmarks write in: `RAFTKV_BENCH_DIR`, else the system temp directory.
/// The directories named by `RAFTKV_BENCH_NODE_DIRS` (colon-separated, one per node, each on
/// a disk of its own), if set: then node `i`'s data and its floor file go under the `i`-th,
/// in a directory named like `dir`, instead of all three under `dir` on one disk.
fn node_roots() -> Option<Vec<PathBuf>> {
    let roots: Vec<PathBuf> = std::env::var_os("RAFTKV_BENCH_NODE_DIRS")?
        .to_str()
        .expect("RAFTKV_BENCH_NODE_DIRS is not UTF-8")
        .split(':')
        .map(PathBuf::from)
        .collect();
    assert!(
        roots.len() >= 3,
        "RAFTKV_BENCH_NODE_DIRS names {} directories, the cluster has 3 nodes",
        roots.len()
    );
    Some(roots)
}

/// Where node `id` (1-based) of a bench in `dir` keeps its files (see [`node_roots`]).
pub fn node_dir(dir: &Path, id: u64) -> PathBuf {
    match node_roots() {
        Some(roots) => {
            let name = dir.file_name().expect("bench directory has a name");
            let d = roots[(id - 1) as usize].join(name);
            std::fs::create_dir_all(&d).expect("node bench directory");
            d
        }
        None => dir.to_path_buf(),
    }
}

/// Removes the bench's directory and the nodes' own ones (see [`node_roots`]).
pub fn remove_bench_dirs(dir: &Path) {
    if node_roots().is_some() {
        for id in 1..=3 {
            let _ = std::fs::remove_dir_all(node_dir(dir, id));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

pub fn bench_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("RAFTKV_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = root.join(format!("raftkv-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench directory");
    dir
}

/// The `p`-quantile of sorted latencies.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

/// Floor: one round trip between two threads over a channel.
pub fn channel_round_trip() -> Duration {
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
        to_tx.send(i).expect("echo thread");
        back_rx.recv().expect("echo thread");
    }
    let per = t.elapsed() / n as u32;
    drop(to_tx);
    let _ = echo.join();
    per
}

/// Floor: one 100-byte write + fdatasync in `dir`.
pub fn write_fdatasync(dir: &Path) -> Duration {
    let path = dir.join("raw");
    let mut f = std::fs::File::create(&path).expect("raw file");
    f.write_all(&vec![0u8; 1 << 20]).expect("write");
    f.sync_all().expect("fsync");
    let n = 500;
    let t = Instant::now();
    for _ in 0..n {
        f.write_all(&[7u8; 100]).expect("write");
        f.sync_data().expect("fdatasync");
    }
    let per = t.elapsed() / n;
    let _ = std::fs::remove_file(&path);
    per
}

/// Floor of a durable commit when three nodes share this disk: three threads each write 100
/// bytes into their own zero-filled file and fdatasync it, all released at once; returns the
/// median time until the second is done (a commit of three needs two). The disk serves
/// them in some order, so this is above one fdatasync alone.
pub fn quorum_fdatasync(dir: &Path) -> Duration {
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Barrier, Mutex};
    let rounds = 300;
    let start = Arc::new(Barrier::new(4));
    let done = Arc::new(Barrier::new(4));
    let finished: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let path = node_dir(dir, i + 1).join(format!("quorum-{i}"));
            let f = std::fs::File::create(&path).expect("raw file");
            f.write_all_at(&vec![0u8; 4 << 20], 0).expect("write");
            f.sync_all().expect("fsync");
            let (start, done, finished) = (start.clone(), done.clone(), finished.clone());
            std::thread::spawn(move || {
                for r in 0..rounds {
                    start.wait();
                    f.write_all_at(&[7u8; 100], 4096 + r * 100).expect("write");
                    f.sync_data().expect("fdatasync");
                    finished.lock().expect("lock").push(Instant::now());
                    done.wait();
                }
                let _ = std::fs::remove_file(&path);
            })
        })
        .collect();
    let mut second = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let t = Instant::now();
        start.wait();
        done.wait();
        let mut at = std::mem::take(&mut *finished.lock().expect("lock"));
        at.sort();
        second.push(at[1] - t);
    }
    for t in threads {
        t.join().expect("fdatasync thread");
    }
    second.sort();
    second[second.len() / 2]
}

/// Prints the machine floors (measured now, in `dir`).
pub fn print_floors(dir: &Path) {
    println!(
        "machine floor: thread-to-thread channel round trip {:?}",
        channel_round_trip()
    );
    let first = node_dir(dir, 1);
    println!(
        "machine floor: 100 B write + fdatasync {:?} in {}",
        write_fdatasync(&first),
        first.display()
    );
    let disks = if node_roots().is_some() {
        "three files, one in each node's directory (RAFTKV_BENCH_NODE_DIRS)"
    } else {
        "three files (a 3-node cluster on this disk)"
    };
    println!(
        "machine floor: three at once on {disks}, the second done after {:?}",
        quorum_fdatasync(dir)
    );
}

/// A disk of its own per node, for a machine that has only one: `FileStorage` in a tmpfs
/// directory, whose every `sync` with writes pending also takes `flush` in all (as a device
/// flush would, the thread sleeping until it completes). Each such sync's real duration is
/// recorded in `flushes`, so figures are printed beside what a flush actually cost.
pub struct OwnDisk {
    inner: FileStorage,
    flush: Duration,
    dirty: bool,
    flushes: std::sync::Arc<std::sync::Mutex<Vec<Duration>>>,
}

/// Sleeps until `flush` has passed since `started`, as the thread would while a device
/// flushes, and records how long it really took.
fn wait_flush(flush: Duration, started: Instant, flushes: &std::sync::Mutex<Vec<Duration>>) {
    // A sleep on Linux overshoots by the thread's timer slack (50 µs by default), a third of
    // the flush modelled: ask for the precise wake-up a device interrupt gives.
    thread_local!(static PRECISE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    PRECISE.with(|p| {
        if !p.replace(true) {
            // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only the
            // calling thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        }
    });
    if let Some(left) = flush.checked_sub(started.elapsed()) {
        std::thread::sleep(left);
    }
    flushes.lock().expect("lock").push(started.elapsed());
}

impl OwnDisk {
    fn wait_flush(&mut self, started: Instant) {
        wait_flush(self.flush, started, &self.flushes);
        self.dirty = false;
    }
}

impl Storage for OwnDisk {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.inner.initial_state()
    }
    fn first_index(&self) -> Index {
        self.inner.first_index()
    }
    fn last_index(&self) -> Index {
        self.inner.last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.inner.term(index)
    }
    fn entries(&self, lo: Index, hi: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.inner.entries(lo, hi, max_bytes)
    }
    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.dirty = true;
        self.inner.set_hard_state(hard_state)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.dirty |= !entries.is_empty();
        self.inner.append(entries)
    }
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.dirty = true;
        self.inner.truncate_suffix(from)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        let started = Instant::now();
        self.inner.sync()?;
        if self.dirty {
            self.wait_flush(started);
        }
        Ok(())
    }
    fn start_sync(&mut self) -> Result<Option<SyncWait>, StorageError> {
        let started = Instant::now();
        let Some(wait) = self.inner.start_sync()? else {
            return Ok(None);
        };
        if !std::mem::take(&mut self.dirty) {
            return Ok(Some(wait));
        }
        let (flush, flushes) = (self.flush, self.flushes.clone());
        Ok(Some(SyncWait::blocking(move || {
            wait.run()?;
            wait_flush(flush, started, &flushes);
            Ok(())
        })))
    }
    fn finish_sync(&mut self, waited: Result<(), StorageError>) -> Result<(), StorageError> {
        self.inner.finish_sync(waited)
    }
    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.inner.write_snapshot_chunk(meta, offset, data)
    }
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        let started = Instant::now();
        self.inner.install_snapshot(meta)?;
        self.wait_flush(started);
        Ok(())
    }
    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.inner.read_snapshot(offset, len)
    }
    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.inner.compact(through)
    }
    fn persisted_size(&self) -> PersistedSize {
        self.inner.persisted_size()
    }
    fn tail_loss(&self) -> Option<TailLoss> {
        self.inner.tail_loss()
    }
    fn clear_tail_loss(&mut self) -> Result<(), StorageError> {
        self.dirty = true;
        self.inner.clear_tail_loss()
    }
    fn record_tail_loss(&mut self, loss: TailLoss) -> Result<(), StorageError> {
        self.inner.record_tail_loss(loss)
    }
}
