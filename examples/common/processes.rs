//! A cluster of `examples/node.rs` processes on loopback, for the `cluster` example and the
//! end-to-end test: free ports, one data directory and one log file per node under a
//! temporary directory, SIGKILL and restart. Each cluster gets its own random cluster id
//! (node 1 mints it, the others learn it).
//!
//! Include it with `#[path = "common/processes.rs"] mod processes;` next to
//! `client_proto.rs` (it uses `crate::client_proto`).
//!
//! Dropping a [`ProcessCluster`] kills every node it started and removes its directory, so a
//! failing test or an interrupted demo leaves nothing running behind.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raftkv::kv::ClientOptions;
use raftkv::NodeId;

use crate::client_proto::guard::Secret;
use crate::client_proto::{self, NodeStatusView, TcpKvEndpoint};

/// The `node` example binary built with the same profile as the running executable: looked
/// for next to it (`target/<profile>/examples/node`), or beside its parent directory for a
/// test binary (`target/<profile>/deps/...`).
pub fn node_binary_path() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or("this executable has no parent directory")?;
    let name = format!("node{}", std::env::consts::EXE_SUFFIX);
    let examples = if dir.file_name().is_some_and(|n| n == "examples") {
        dir.to_path_buf()
    } else {
        // target/<profile>/deps/<test binary>
        dir.parent()
            .ok_or("this executable's directory has no parent")?
            .join("examples")
    };
    Ok(examples.join(name))
}

/// The `kv` example binary beside the `node` binary at `node`.
pub fn kv_binary_beside(node: &Path) -> PathBuf {
    node.with_file_name(format!("kv{}", std::env::consts::EXE_SUFFIX))
}

/// What a run of a command-line program said: exit success, stdout, stderr, how long it took.
pub type CliRun = (bool, String, String, Duration);

/// Runs `program` with `args` to its end (the `kv` CLI, say).
pub fn run_cli<A: AsRef<std::ffi::OsStr>>(program: &Path, args: &[A]) -> CliRun {
    let started = Instant::now();
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Runs `cargo build --examples` (with `--release` if `release`) in this crate, with the
/// target directory that holds `examples_dir`, so the node binary lands where
/// [`node_binary_path`] looks. Uses `$CARGO` (set by cargo for the programs it runs).
pub fn build_examples(examples_dir: &Path, release: bool, only_node: bool) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = examples_dir
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot tell the target directory")?;
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("build")
        .arg("--target-dir")
        .arg(target_dir);
    if only_node {
        cmd.args(["--example", "node"]);
    } else {
        cmd.arg("--examples");
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(|e| {
        format!("cannot run cargo ({e}); build with `cargo build --release --examples`")
    })?;
    if !status.success() {
        return Err(format!("`cargo build` failed ({status})"));
    }
    Ok(())
}

/// What a client of a process cluster uses: a 20 s deadline per operation, since the
/// cluster is killed and restarted under it and an election takes real time.
pub fn client_options() -> ClientOptions {
    ClientOptions {
        deadline: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

/// Builds the examples (only `node` with `only_node`) in the profile of the running test and
/// returns the `node` binary's path: what an end-to-end test calls first.
pub fn build_node_for_tests(only_node: bool) -> Result<PathBuf, String> {
    let binary = node_binary_path()?;
    let examples = binary
        .parent()
        .ok_or("the node binary has no directory")?
        .to_path_buf();
    let release = examples
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "release");
    build_examples(&examples, release, only_node)?;
    Ok(binary)
}

/// Runs an end-to-end test on a 2-worker tokio runtime, failing it if it takes longer than
/// `budget` (so a hung cluster fails the test instead of the CI run).
pub fn run_bounded<F: std::future::Future<Output = ()>>(budget: Duration, test: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        tokio::time::timeout(budget, test)
            .await
            .expect("the test exceeded its time budget")
    });
}

/// Free loopback addresses: bound to port 0 and released (another process could take one
/// in between; on a quiet test machine they stay free).
pub fn free_addrs(n: usize) -> Result<Vec<SocketAddr>, String> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| e.to_string()))
        .collect()
}

/// One node: its addresses, data directory, log file and (while it runs) its process.
struct NodeProcess {
    raft: SocketAddr,
    client: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    /// Extra arguments given on every (re)start.
    extra_args: Vec<String>,
    /// Environment variables set on every (re)start.
    env: Vec<(String, String)>,
    /// The nodes its `--peers` names (itself included), when not every node.
    names: Option<Vec<NodeId>>,
    child: Option<Child>,
}

/// A cluster of node processes. See the [module docs](self).
pub struct ProcessCluster {
    binary: PathBuf,
    /// Replaces the `--peers` argument built from the nodes' addresses, when set.
    peers_override: Option<String>,
    /// The client secret the cluster's own requests (status, endpoints) prove.
    client_secret: Secret,
    nodes: BTreeMap<NodeId, NodeProcess>,
    /// Removed on drop, after the processes are killed.
    dir: tempfile::TempDir,
}

impl ProcessCluster {
    /// Starts `n` nodes (ids `1..=n`) of `binary` on free loopback ports, each with its own
    /// data directory under a new temporary directory.
    pub fn start(binary: PathBuf, n: u64) -> Result<Self, String> {
        Self::start_with_args(binary, n, &[])
    }

    /// As [`ProcessCluster::start`], every node started with `args` too (see
    /// [`ProcessCluster::set_extra_args`]).
    pub fn start_with_args(binary: PathBuf, n: u64, args: &[&str]) -> Result<Self, String> {
        let mut cluster = Self::new(binary, n)?;
        for id in 1..=n {
            cluster.set_extra_args(id, args.iter().copied());
            cluster.restart(id)?;
        }
        Ok(cluster)
    }

    /// Like [`ProcessCluster::start`], but starts nothing yet (set arguments first, then
    /// [`restart`](Self::restart) each node).
    pub fn new(binary: PathBuf, n: u64) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("raftkv-cluster-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let addrs = free_addrs(2 * n as usize)?;
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let i = id as usize - 1;
            nodes.insert(
                id,
                NodeProcess {
                    raft: addrs[2 * i],
                    client: addrs[2 * i + 1],
                    data: dir.path().join(format!("n{id}")),
                    log: dir.path().join(format!("n{id}.log")),
                    extra_args: Vec::new(),
                    env: Vec::new(),
                    names: None,
                    child: None,
                },
            );
        }
        Ok(ProcessCluster {
            binary,
            peers_override: None,
            client_secret: Secret::none(),
            nodes,
            dir,
        })
    }

    /// The temporary directory holding the data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: NodeId) -> Option<PathBuf> {
        self.nodes.get(&id).map(|n| n.data.clone())
    }

    /// The node ids.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// A client endpoint for every node's client port (proving the client secret, if set).
    pub fn endpoint(&self) -> TcpKvEndpoint {
        TcpKvEndpoint::new(self.nodes.iter().map(|(id, n)| (*id, n.client)))
            .with_secret(self.client_secret.clone())
    }

    /// The secret this harness proves on the client ports (status polls, endpoints); start
    /// the nodes with the matching `--client-secret-file`.
    pub fn set_client_secret(&mut self, secret: Secret) {
        self.client_secret = secret;
    }

    /// Node `id`'s Raft (peer) address.
    pub fn raft_addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.nodes.get(&id).map(|n| n.raft)
    }

    /// Node `id`'s client address.
    pub fn client_addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.nodes.get(&id).map(|n| n.client)
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// Node `id`'s whole log (its stderr so far).
    pub fn log(&self, id: NodeId) -> String {
        self.log_tail(id, usize::MAX)
    }

    /// Arguments added to node `id`'s command line from its next (re)start on (`--recover`,
    /// say), replacing earlier ones.
    pub fn set_extra_args<A: Into<String>>(
        &mut self,
        id: NodeId,
        args: impl IntoIterator<Item = A>,
    ) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.extra_args = args.into_iter().map(Into::into).collect();
        }
    }

    /// Environment variables (`RUST_LOG`, say) for node `id` from its next (re)start on.
    pub fn set_env(&mut self, id: NodeId, env: Vec<(String, String)>) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.env = env;
        }
    }

    /// Starts nodes with `peers` as their `--peers` argument instead of the cluster's own
    /// addresses (a node pointed at another cluster's nodes, say).
    pub fn set_peers_arg(&mut self, peers: String) {
        self.peers_override = Some(peers);
    }

    /// The `--peers` argument.
    pub fn peers_arg(&self) -> String {
        if let Some(p) = &self.peers_override {
            return p.clone();
        }
        self.peers_of(None)
    }

    /// `--peers` naming `only` (every node if `None`).
    fn peers_of(&self, only: Option<&[NodeId]>) -> String {
        self.nodes
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o.contains(id)))
            .map(|(id, n)| format!("{id}={}", n.raft))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id` (again) on its addresses and data directory, its stderr appended to
    /// its log file. Does nothing if it is running.
    pub fn restart(&mut self, id: NodeId) -> Result<(), String> {
        let names = self.nodes.get(&id).and_then(|n| n.names.clone());
        let peers = match &names {
            Some(names) => self.peers_of(Some(names)),
            None => self.peers_arg(),
        };
        let binary = self.binary.clone();
        let node = self.nodes.get_mut(&id).ok_or(format!("no node {id}"))?;
        if node.child.is_some() {
            return Ok(());
        }
        let log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("cannot open {}: {e}", node.log.display()))?;
        let child = Command::new(&binary)
            .arg("--id")
            .arg(id.to_string())
            .arg("--peers")
            .arg(&peers)
            .arg("--client")
            .arg(node.client.to_string())
            .arg("--data")
            .arg(&node.data)
            .args(&node.extra_args)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Adds node `id` on new free ports and starts it with `--join` (its `--peers` naming
    /// every node of the cluster, itself included): a member-to-be, to be added with
    /// `kv add-learner` (see [`ProcessCluster::raft_addr`] and
    /// [`ProcessCluster::client_addr`]). Later restarts keep `--join` (a no-op on a
    /// non-empty data directory).
    pub fn join(&mut self, id: NodeId) -> Result<(), String> {
        self.join_naming(id, None)
    }

    /// As [`ProcessCluster::join`], with a `--peers` naming only `names` of the cluster's
    /// nodes (and itself) if given: a joiner told of one member, say.
    pub fn join_naming(&mut self, id: NodeId, names: Option<&[NodeId]>) -> Result<(), String> {
        if self.nodes.contains_key(&id) {
            return Err(format!("node {id} is already in the cluster"));
        }
        let addrs = free_addrs(2)?;
        self.nodes.insert(
            id,
            NodeProcess {
                raft: addrs[0],
                client: addrs[1],
                data: self.dir.path().join(format!("n{id}")),
                log: self.dir.path().join(format!("n{id}.log")),
                extra_args: vec!["--join".into()],
                env: Vec::new(),
                names: names.map(|n| n.iter().copied().chain([id]).collect()),
                child: None,
            },
        );
        self.restart(id)
    }

    /// Kills node `id` with SIGKILL (no chance to flush anything) and reaps it.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kills every node at once (all SIGKILLs are sent before any is reaped).
    pub fn kill_all(&mut self) {
        let mut children: Vec<Child> = self
            .nodes
            .values_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for c in &mut children {
            let _ = c.kill();
        }
        for c in &mut children {
            let _ = c.wait();
        }
    }

    /// Whether node `id`'s process is running; a node that exited on its own is reported
    /// with its log's tail.
    pub fn check_alive(&mut self, id: NodeId) -> Result<bool, String> {
        let Some(node) = self.nodes.get_mut(&id) else {
            return Err(format!("no node {id}"));
        };
        let Some(child) = node.child.as_mut() else {
            return Ok(false);
        };
        match child.try_wait() {
            Ok(None) => Ok(true),
            Ok(Some(status)) => {
                node.child = None;
                Err(format!(
                    "node {id} exited by itself ({status}); its log ends with:\n{}",
                    self.log_tail(id, 2000)
                ))
            }
            Err(e) => Err(format!("cannot check node {id}: {e}")),
        }
    }

    /// The last `max` bytes of node `id`'s log.
    pub fn log_tail(&self, id: NodeId, max: usize) -> String {
        let Some(node) = self.nodes.get(&id) else {
            return String::new();
        };
        let mut text = String::new();
        if let Ok(mut f) = File::open(&node.log) {
            let _ = f.read_to_string(&mut text);
        }
        let cut = text.len().saturating_sub(max);
        let cut = (cut..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[cut..].to_string()
    }

    /// Node `id`'s status, if it answers within a second.
    pub async fn status(&self, id: NodeId) -> Option<NodeStatusView> {
        let node = self.nodes.get(&id)?;
        client_proto::status_with(node.client, &self.client_secret, Duration::from_secs(1))
            .await
            .ok()
    }

    /// Every node's status (`None` for a node that does not answer).
    pub async fn statuses(&self) -> Vec<(NodeId, Option<NodeStatusView>)> {
        let mut out = Vec::new();
        for id in self.ids() {
            out.push((id, self.status(id).await));
        }
        out
    }

    /// Waits up to `within` for a leader that every answering node agrees on.
    pub async fn wait_for_leader(&mut self, within: Duration) -> Result<NodeId, String> {
        let deadline = Instant::now() + within;
        loop {
            for id in self.ids() {
                self.check_alive(id)?;
            }
            let statuses = self.statuses().await;
            let leaders: Vec<NodeId> = statuses
                .iter()
                .filter_map(|(id, s)| s.as_ref().filter(|s| s.role == "Leader").map(|_| *id))
                .collect();
            if let [leader] = leaders.as_slice() {
                return Ok(*leader);
            }
            if Instant::now() >= deadline {
                return Err(format!("no leader within {within:?}: {statuses:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `within` until node `id` has applied at least `index`.
    pub async fn wait_applied(
        &mut self,
        id: NodeId,
        index: u64,
        within: Duration,
    ) -> Result<NodeStatusView, String> {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive(id)?;
            let status = self.status(id).await;
            if let Some(s) = &status {
                if s.applied >= index {
                    return Ok(s.clone());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {id} did not apply index {index} within {within:?}: {status:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        self.kill_all();
        // The temporary directory is removed after this, by its own drop.
    }
}
