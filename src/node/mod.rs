//! [`Node`]: the driver that runs a [`RaftCore`] with a [`Storage`], a [`StateMachine`] and a
//! [`Transport`].
//!
//! # Threads and futures
//! The core, the storage and the state machine live on one dedicated OS thread (the *node
//! thread*), so blocking file IO and `apply` never run on an async executor thread. The node
//! thread loops: wait for a command or the next tick; take every queued command (this is
//! where proposals batch and fsyncs group-commit: everything that arrived while the previous
//! fsync ran goes into the next one); then work through the core's [`Ready`](crate::raft::Ready)
//! batches in the order their contract prescribes:
//!
//! 1. messages that do not depend on this batch leave at once (a leader replicates in
//!    parallel with its own fsync);
//! 2. hard state and entries are written and fsynced — an fsync error stops the node;
//! 3. the core is told, then acknowledgements and votes leave;
//! 4. committed entries are applied and the waiting proposals resolved.
//!
//! Outgoing messages go to the *driver future* returned by [`Node::start`], which the host
//! runs on any executor (tokio, async-std, `futures::executor`...); it feeds one bounded queue
//! per peer to [`Transport::send`], so a dead peer costs bounded memory and never delays the
//! others. [`Node`] itself is a cheap, clonable handle whose methods never block.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::{mpsc as fmpsc, oneshot};
use parking_lot::Mutex;

use crate::error::{MembershipError, NodeError, ProposeError};
use crate::raft::{Config, Membership, Message, NodeId, Payload, SnapshotMeta, Status};
use crate::state_machine::StateMachine;
use crate::storage::{NonBlockingStorage, PersistedSize, Storage};
use crate::transport::Transport;

pub mod backup;
mod inbox;
mod membership;
mod metrics;
mod outbound;
mod reply;
mod syncer;
mod worker;

pub use backup::Backup;
pub use membership::Change;
pub use metrics::{Histogram, NodeMetrics};

use inbox::{Inbox, PushError};
use outbound::{drive_transport, Outbound};
use reply::{BatchReply, Reply};
use worker::Worker;

/// How long a node thread spins on its empty inbox before it parks. Measured on the 2-core
/// development machine with the peer benchmark (node threads): 30 µs of spinning left one
/// client within noise (18-25k put/s without, 12-23k with) and halved 64 clients (690-740k
/// without, 300k with): it steals the CPU the reply must come from. So it is off.
const SPIN_BEFORE_PARK: Duration = Duration::ZERO;

/// Settings of a [`Node`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The Raft settings (ids, timeouts in ticks, batch limits).
    pub raft: Config,
    /// Wall-clock length of one tick (default 50 ms: heartbeats every 50 ms, elections after
    /// 0.5–1 s with the default 10 election ticks).
    pub tick_interval: Duration,
    /// How long [`Node::propose`] waits for its command to be applied (default 5 s).
    pub propose_timeout: Duration,
    /// Commands and inbound messages queued for the node thread at most (default 65536);
    /// beyond that proposals fail with [`ProposeError::Busy`] and messages are dropped.
    pub inbox_capacity: usize,
    /// Message batches queued per peer at most (default 256); beyond that they are dropped.
    pub peer_queue_capacity: usize,
    /// Take a snapshot and compact the log once the log retained beyond the snapshot holds
    /// more than this many bytes ([`Entry::size`](crate::raft::Entry::size); default 64 MiB;
    /// `None` disables automatic snapshots, [`Node::snapshot`] still works). The log never
    /// grows past twice this: there the node takes on no more log (proposals get
    /// [`ProposeError::Busy`]) until the snapshot compacts it. The file storage frees whole
    /// segments, so it may keep up to one segment more.
    pub max_log_bytes: Option<u64>,
    /// Take an empty storage for a member of a new cluster without asking (default false).
    ///
    /// By default an empty storage is treated as a lost disk
    /// ([`host::distrust_empty_storage`](crate::host::distrust_empty_storage)): the node asks
    /// every voter of `raft.voters` for its term before it takes part, goes on at once if
    /// none holds anything (a new cluster), and otherwise neither votes nor campaigns until
    /// a leader has caught it up. So a node restarted on a wiped disk under its old id can
    /// never vote twice in a term, and a new cluster elects its first leader once every
    /// bootstrap voter has started. To join an existing cluster, start with no voters
    /// (`raft.voters` empty: the node learns the configuration from the leader) and add the
    /// node with [`Node::add_learner`] on the leader.
    ///
    /// Set this only for a storage known never to have held state under this id, for a new
    /// cluster that must form while some bootstrap voter is not yet up.
    pub trust_empty_storage: bool,
}

impl NodeConfig {
    /// Defaults for node `id` of a cluster of `voters`.
    pub fn new(id: NodeId, voters: impl Into<Vec<NodeId>>) -> Self {
        NodeConfig {
            raft: Config::new(id, voters),
            tick_interval: Duration::from_millis(50),
            propose_timeout: Duration::from_secs(5),
            inbox_capacity: 1 << 16,
            peer_queue_capacity: 256,
            max_log_bytes: Some(64 << 20),
            trust_empty_storage: false,
        }
    }

    /// Checks the configuration; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.raft.validate()?;
        if self.tick_interval.is_zero() || self.propose_timeout.is_zero() {
            return Err("tick_interval and propose_timeout must be positive".into());
        }
        if self.inbox_capacity == 0 || self.peer_queue_capacity == 0 {
            return Err("inbox_capacity and peer_queue_capacity must be positive".into());
        }
        if self.max_log_bytes == Some(0) {
            return Err(
                "max_log_bytes must be positive (None disables automatic snapshots)".into(),
            );
        }
        Ok(())
    }
}

/// What a node reports about itself.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    /// The core's state: role, term, leader, indexes.
    pub raft: Status,
    /// Bytes the storage keeps.
    pub persisted: PersistedSize,
    /// Set when the node stopped on a fatal error (an fsync failure, say).
    pub fatal_error: Option<String>,
    /// False once the node thread has exited.
    pub running: bool,
    /// Set while writes fail for lack of disk space (the node retries every tick; it
    /// refuses proposals with [`ProposeError::NoSpace`] and acknowledges nothing meanwhile).
    pub disk_full: Option<String>,
    /// Local snapshots taken (and the log compacted behind them) since start.
    pub snapshots_taken: u64,
    /// Snapshots received from a leader and installed since start.
    pub snapshots_installed: u64,
    /// Set while the node recovers from a log tail its storage lost (it neither votes nor
    /// campaigns until a leader has brought it back).
    pub recovering: Option<crate::storage::TailLoss>,
    /// Counters and gauges (see [`NodeMetrics`]).
    pub metrics: NodeMetrics,
    /// The configuration in effect (the latest in the log, committed or not).
    pub membership: Membership,
}

enum Command<O> {
    Propose(Payload, Reply<O>),
    /// Several commands, appended in order, answered together.
    ProposeMany(Vec<Payload>, BatchReply<O>),
    Step(Message),
    /// A linearizable read-only query.
    Read(Payload, Reply<O>),
    /// Hand leadership to a follower.
    Transfer(NodeId, oneshot::Sender<Result<(), ProposeError>>),
    /// Change the configuration.
    ChangeMembership(Change, membership::ChangeReply),
    /// Take a snapshot now; answered with its meta once installed (`None`: nothing new).
    Snapshot(oneshot::Sender<Option<SnapshotMeta>>),
    /// Serialized bytes of a local snapshot, from its background thread.
    LocalChunk(SnapshotMeta, Vec<u8>),
    /// The local snapshot is fully serialized (or failed to serialize).
    LocalDone(SnapshotMeta, Result<(), String>),
    /// A backup's request (see `backup.rs`).
    Backup(backup::Request),
    /// The fsync thread waited for a sync the engine started (see `syncer.rs`).
    Synced(crate::host::WaitedSync),
    Shutdown,
    /// A handled command's place in the node's batch.
    Nothing,
}

struct Shared {
    status: Mutex<NodeStatus>,
    stopped: Mutex<Vec<oneshot::Sender<()>>>,
    /// Woken when the role, term or leader changes, or the node stops (see
    /// [`Node::wait_for`]); taken under the status lock, fired with it held.
    role_waiters: Mutex<Vec<oneshot::Sender<()>>>,
    gauges: metrics::Gauges,
}

/// A running Raft node. See the [module docs](self).
///
/// ```
/// use raftkv::{Node, NodeConfig, StateMachine, Index};
/// use raftkv::storage::MemStorage;
/// use raftkv::transport::LocalNetwork;
///
/// struct Echo;
/// impl StateMachine for Echo {
///     type Output = Vec<u8>;
///     fn apply(&mut self, _: Index, cmd: &[u8]) -> Vec<u8> { cmd.to_vec() }
///     fn snapshot(&mut self) -> Box<dyn raftkv::SnapshotSource> { Box::new(Vec::new()) }
///     fn restore(&mut self, _: &mut dyn std::io::Read) -> std::io::Result<()> { Ok(()) }
/// }
///
/// let net = LocalNetwork::new();
/// let mut config = NodeConfig::new(1, vec![1]);
/// config.tick_interval = std::time::Duration::from_millis(5);
/// let (node, driver) = Node::start(config, MemStorage::new(), Echo, net.transport(1)).unwrap();
/// std::thread::spawn(move || futures::executor::block_on(driver));
/// let out = futures::executor::block_on(async {
///     loop {
///         match node.propose(b"hi".as_slice()).await {
///             Err(raftkv::error::ProposeError::NotLeader { .. }) => std::thread::sleep(std::time::Duration::from_millis(5)),
///             other => break other,
///         }
///     }
/// });
/// assert_eq!(out.unwrap(), b"hi");
/// futures::executor::block_on(node.shutdown());
/// ```
pub struct Node<O> {
    handle: Arc<Handle<O>>,
}

/// The shared part of every [`Node`] clone; dropping the last clone stops the node.
struct Handle<O> {
    inbox: Arc<Inbox<Command<O>>>,
    shared: Arc<Shared>,
    id: NodeId,
}

impl<O> Handle<O> {
    /// Queues a command for the node thread, counted in the inbox depth (counted first, so
    /// the node thread never takes one it was not counted for).
    fn send(&self, cmd: Command<O>) -> Result<(), ProposeError> {
        self.shared.gauges.queued();
        let sent = self.inbox.try_push(cmd);
        if sent.is_err() {
            self.shared.gauges.taken();
        }
        sent.map_err(|e| match e {
            PushError::Full(_) => ProposeError::Busy,
            PushError::Closed(_) => ProposeError::Shutdown,
        })
    }
}

impl<O> Drop for Handle<O> {
    fn drop(&mut self) {
        // The node thread also holds the inbox (for its snapshot threads), so it would not
        // notice the handles are gone: tell it.
        let _ = self.inbox.push_unbounded(Command::Shutdown);
    }
}

impl<O> Clone for Node<O> {
    fn clone(&self) -> Self {
        Node {
            handle: self.handle.clone(),
        }
    }
}

/// 64 bits that differ between starts of a process and between processes.
fn start_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The future that carries a node's outgoing messages to its [`Transport`]. Run it on any
/// executor; it finishes when the node shuts down.
pub type Driver = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

impl<O: Send + 'static> Node<O> {
    /// Restores the core from `storage`, starts the node thread and returns the handle and
    /// the [`Driver`] future the host must run (it carries outgoing messages to the
    /// transport; with a transport that sends synchronously, [`Transport::send_now`], the
    /// node thread sends itself and the driver has little to do).
    pub fn start<S, M, T>(
        config: NodeConfig,
        storage: S,
        machine: M,
        transport: T,
    ) -> Result<(Node<O>, Driver), NodeError>
    where
        S: Storage,
        M: StateMachine<Output = O>,
        T: Transport,
    {
        let (node, worker, driver) = Self::prepare(config, storage, machine, transport)?;
        std::thread::Builder::new()
            .name(format!("raftkv-node-{}", node.id()))
            .spawn(move || worker.run_blocking(SPIN_BEFORE_PARK))
            .map_err(NodeError::Spawn)?;
        Ok((node, driver))
    }

    /// Like [`Node::start`], but without a node thread: the returned [`Driver`] future runs
    /// the node itself (core, storage, state machine) on whatever executor the host polls it
    /// on, next to the transport. Hand-offs between the node, its clients and (with an
    /// in-process transport) its peers are then task wake-ups on that executor instead of
    /// OS-thread wake-ups across CPUs.
    ///
    /// Only for storages that never block, which the type enforces: `S` must implement
    /// [`NonBlockingStorage`] ([`MemStorage`](crate::storage::MemStorage) does; the file
    /// storage, whose writes and fsyncs block, does not, so it always gets its own thread).
    /// The state machine's `apply` runs in the task too: use this only with one that does
    /// not block either. Local snapshots are still serialized on a background thread. Ticks
    /// come from a small timer thread that wakes the task every tick, so any executor works.
    pub fn start_in_task<S, M, T>(
        config: NodeConfig,
        storage: S,
        machine: M,
        transport: T,
    ) -> Result<(Node<O>, Driver), NodeError>
    where
        S: NonBlockingStorage,
        M: StateMachine<Output = O>,
        T: Transport,
    {
        let tick = config.tick_interval;
        let (node, worker, driver) = Self::prepare(config, storage, machine, transport)?;
        let inbox = node.handle.inbox.clone();
        std::thread::Builder::new()
            .name(format!("raftkv-ticker-{}", node.id()))
            .spawn(move || {
                while !inbox.is_closed() {
                    std::thread::sleep(tick);
                    inbox.notify();
                }
            })
            .map_err(NodeError::Spawn)?;
        let both = futures::future::join(worker.run_task(), driver);
        Ok((
            node,
            Box::pin(async move {
                both.await;
            }),
        ))
    }

    /// The handle, the worker (not yet running) and the transport's driver.
    #[allow(clippy::type_complexity)]
    fn prepare<S, M, T>(
        config: NodeConfig,
        storage: S,
        machine: M,
        transport: T,
    ) -> Result<(Node<O>, Worker<S, M>, Driver), NodeError>
    where
        S: Storage,
        M: StateMachine<Output = O>,
        T: Transport,
    {
        config.validate().map_err(NodeError::Config)?;
        let mut config = config;
        // Each start draws fresh randomness: election timeouts differ between restarts, and
        // the ids of forwarded reads never repeat an earlier incarnation's.
        config.raft.seed ^= start_nonce();
        let mut storage = storage;
        let core = crate::host::start_core(
            config.raft.clone(),
            &mut storage,
            config.trust_empty_storage,
        )?;
        let bootstrap = Membership::voters(config.raft.voters.iter().copied());
        if core.membership_is_stored()
            && !config.raft.voters.is_empty()
            && *core.membership() != bootstrap
        {
            // The stored configuration is the replicated truth: a restart with other voters
            // must not change it (that is how one node became a cluster of its own).
            // Refusing would stop every node restarted after a membership change until its
            // flags were updated; so the stored one wins, and the operator is told.
            tracing::warn!(
                target: "raftkv::node",
                node = config.raft.id,
                stored = ?core.membership(),
                given = ?config.raft.voters,
                "the stored configuration is in effect; the bootstrap voters given are ignored"
            );
        }
        let id = config.raft.id;
        let shared = Arc::new(Shared {
            status: Mutex::new(NodeStatus {
                raft: core.status(),
                persisted: storage.persisted_size(),
                fatal_error: None,
                running: true,
                disk_full: None,
                snapshots_taken: 0,
                snapshots_installed: 0,
                recovering: core.recovering(),
                metrics: NodeMetrics::default(),
                membership: core.membership().clone(),
            }),
            stopped: Mutex::new(Vec::new()),
            role_waiters: Mutex::new(Vec::new()),
            gauges: metrics::Gauges::default(),
        });
        let inbox = Arc::new(Inbox::new(config.inbox_capacity));
        let (outbox, outgoing) = fmpsc::channel::<Vec<Message>>(config.peer_queue_capacity);
        let peers: Vec<NodeId> = config
            .raft
            .voters
            .iter()
            .copied()
            .filter(|&p| p != id)
            .collect();
        let transport: Arc<dyn Transport> = Arc::new(transport);
        let driver = Box::pin(drive_transport(
            transport.clone(),
            peers,
            outgoing,
            config.peer_queue_capacity,
        ));
        let worker = Worker::new(
            core,
            storage,
            machine,
            inbox.clone(),
            Outbound::new(transport, outbox),
            shared.clone(),
            config,
        )?;
        worker.publish_status(None, true);
        let handle = Arc::new(Handle { inbox, shared, id });
        Ok((Node { handle }, worker, driver))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.handle.id
    }

    /// Proposes `command`. Resolves with the state machine's output once the command is
    /// committed and applied on this node, or with a [`ProposeError`]. Never blocks.
    pub async fn propose(&self, command: impl Into<Payload>) -> Result<O, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.handle.send(Command::Propose(command.into(), tx))?;
        rx.await.unwrap_or(Err(ProposeError::Shutdown))
    }

    /// Proposes several commands in one call: they are appended in order, one after the
    /// other, and each answered as [`Node::propose`] would answer it (`Ok` with its output
    /// once applied, or its error); the answers come back together, in the same order. The
    /// whole batch takes one place in the node's inbox (when that is full, every answer is
    /// [`ProposeError::Busy`]).
    pub async fn propose_many<I>(&self, commands: I) -> Vec<Result<O, ProposeError>>
    where
        I: IntoIterator,
        I::Item: Into<Payload>,
    {
        let commands: Vec<Payload> = commands.into_iter().map(Into::into).collect();
        let n = commands.len();
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.handle.send(Command::ProposeMany(commands, tx)) {
            return (0..n).map(|_| Err(e.clone())).collect();
        }
        rx.await
            .unwrap_or_else(|_| (0..n).map(|_| Err(ProposeError::Shutdown)).collect())
    }

    /// Resolves with the status once `ready` holds for it. `ready` is checked now and again
    /// each time the node's role, term or known leader changes, and when the node stops (so a
    /// condition on those, or on `running`, is never missed; others are only seen at those
    /// moments). No polling: the node wakes the waiter.
    pub async fn wait_for(&self, mut ready: impl FnMut(&NodeStatus) -> bool) -> NodeStatus {
        loop {
            let rx = {
                let status = self.handle.shared.status.lock();
                if ready(&status) || !status.running {
                    return status.clone();
                }
                let (tx, rx) = oneshot::channel();
                self.handle.shared.role_waiters.lock().push(tx);
                rx
            };
            let _ = rx.await;
        }
    }

    /// Resolves with the leader's id once this node knows one (itself, if it leads), or
    /// [`ProposeError::Shutdown`] if the node stops first.
    pub async fn wait_for_leader(&self) -> Result<NodeId, ProposeError> {
        let status = self.wait_for(|s| s.raft.leader.is_some()).await;
        status.raft.leader.ok_or(ProposeError::Shutdown)
    }

    /// Hands the node a message received from a peer. Never blocks; drops the message when
    /// the node's inbox is full or the node is shut down (Raft recovers from lost messages).
    pub fn step(&self, message: Message) {
        let _ = self.handle.send(Command::Step(message));
    }

    /// Answers `query` with [`StateMachine::query`] once it is linearizable: the leader
    /// confirms it still leads (ReadIndex, one heartbeat round, no log write), and the query
    /// runs after this node applied everything committed when the read arrived. Works on
    /// followers too (the leader is asked for the read index). Never blocks.
    pub async fn read(&self, query: impl Into<Payload>) -> Result<O, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.handle.send(Command::Read(query.into(), tx))?;
        rx.await.unwrap_or(Err(ProposeError::Shutdown))
    }

    /// Hands leadership to voter `to` (this node must lead): it is brought up to date, then
    /// told to campaign at once. Resolves when the request is taken; watch
    /// [`Node::status`] for the outcome (a transfer that cannot complete within an election
    /// timeout is abandoned). Proposals are refused with [`ProposeError::Busy`] meanwhile.
    pub async fn transfer_leadership(&self, to: NodeId) -> Result<(), ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.handle.send(Command::Transfer(to, tx))?;
        rx.await.unwrap_or(Err(ProposeError::Shutdown))
    }

    /// Adds `id` as a learner: it receives the log (a snapshot first when it is far behind)
    /// but never votes and never counts toward a commit. Resolves with the configuration once
    /// the change is committed. This node must lead.
    pub async fn add_learner(&self, id: NodeId) -> Result<Membership, MembershipError> {
        self.change_membership(Change::AddLearner(id)).await
    }

    /// Makes learner `id` a voter, through the joint configuration. Refused unless the
    /// learner is caught up: its match index at least the leader's commit index and heard
    /// from within an election timeout. Resolves once the final configuration is committed.
    pub async fn promote(&self, id: NodeId) -> Result<Membership, MembershipError> {
        self.change_membership(Change::Promote(id)).await
    }

    /// Removes voter or learner `id` (a voter through the joint configuration). Removing
    /// the leader itself works — it leads the change to its end and then steps down — but
    /// hand leadership over first ([`Node::transfer_leadership`]) to avoid an election.
    pub async fn remove(&self, id: NodeId) -> Result<Membership, MembershipError> {
        self.change_membership(Change::Remove(id)).await
    }

    /// Applies `change` (one at a time; see [`MembershipError`] for what is refused).
    /// Resolves with the configuration in effect once the change is committed.
    pub async fn change_membership(&self, change: Change) -> Result<Membership, MembershipError> {
        let (tx, rx) = oneshot::channel();
        match self.handle.send(Command::ChangeMembership(change, tx)) {
            Ok(()) => {}
            Err(ProposeError::Busy) => return Err(MembershipError::Busy),
            Err(_) => return Err(MembershipError::Timeout),
        }
        rx.await.unwrap_or(Err(MembershipError::Timeout))
    }

    /// The configuration in effect on this node (the latest in its log).
    pub fn membership(&self) -> Membership {
        self.status().membership
    }

    /// Takes a snapshot of the state machine now and compacts the log behind it. Resolves
    /// with the snapshot's position once it is durably stored, or `None` if there was nothing
    /// new to snapshot (or one was already being taken, or the node stopped).
    pub async fn snapshot(&self) -> Option<SnapshotMeta> {
        let (tx, rx) = oneshot::channel();
        self.handle.send(Command::Snapshot(tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// The node's current state.
    pub fn status(&self) -> NodeStatus {
        self.handle.shared.status.lock().clone()
    }

    /// Stops the node: pending proposals fail with [`ProposeError::Shutdown`], the driver
    /// future finishes. Resolves once the node thread has exited.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        {
            let status = self.handle.shared.status.lock();
            if !status.running {
                return;
            }
            self.handle.shared.stopped.lock().push(tx);
        }
        // A full inbox still gets the shutdown through.
        let _ = self.handle.inbox.push_unbounded(Command::Shutdown);
        let _ = rx.await;
    }
}
