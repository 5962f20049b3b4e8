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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::{mpsc as fmpsc, oneshot};
use futures::StreamExt;
use parking_lot::Mutex;

use crate::error::{CoreProposeError, NodeError, ProposeError, StorageError};
use crate::host::{self, SnapshotPolicy, WriteProgress};
use crate::raft::{
    Config, EntryPayload, Index, Message, NodeId, Payload, RaftCore, Ready, SnapshotMeta, Status,
    Term,
};
use crate::state_machine::StateMachine;
use crate::storage::{PersistedSize, Storage};
use crate::transport::Transport;

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
    /// Take a snapshot and compact the log once the stored log has grown by this many bytes
    /// since the last compaction (default 64 MiB; `None` disables automatic snapshots,
    /// [`Node::snapshot`] still works). The file storage frees whole segments, so it may keep
    /// up to one segment more than this.
    pub max_log_bytes: Option<u64>,
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
        }
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
}

type Reply<O> = oneshot::Sender<Result<O, ProposeError>>;
/// A reply and what it will carry.
type Answer<O> = (Reply<O>, Result<O, ProposeError>);

enum Command<O> {
    Propose(Payload, Reply<O>),
    Step(Message),
    /// A linearizable read-only query.
    Read(Payload, Reply<O>),
    /// Hand leadership to a follower.
    Transfer(NodeId, oneshot::Sender<Result<(), ProposeError>>),
    /// Take a snapshot now; answered with its meta once installed (`None`: nothing new).
    Snapshot(oneshot::Sender<Option<SnapshotMeta>>),
    /// Serialized bytes of a local snapshot, from its background thread.
    LocalChunk(SnapshotMeta, Vec<u8>),
    /// The local snapshot is fully serialized (or failed to serialize).
    LocalDone(SnapshotMeta, Result<(), String>),
    Shutdown,
}

struct Shared {
    status: Mutex<NodeStatus>,
    stopped: Mutex<Vec<oneshot::Sender<()>>>,
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
    inbox: SyncSender<Command<O>>,
    shared: Arc<Shared>,
    id: NodeId,
}

impl<O> Drop for Handle<O> {
    fn drop(&mut self) {
        // The node thread also holds a sender (for its snapshot threads), so it would not
        // notice the handles are gone: tell it. Only a full inbox makes this wait, briefly.
        while let Err(TrySendError::Full(_)) = self.inbox.try_send(Command::Shutdown) {
            std::thread::yield_now();
        }
    }
}

impl<O> Clone for Node<O> {
    fn clone(&self) -> Self {
        Node {
            handle: self.handle.clone(),
        }
    }
}

/// The future that carries a node's outgoing messages to its [`Transport`]. Run it on any
/// executor; it finishes when the node shuts down.
pub type Driver = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

impl<O: Send + 'static> Node<O> {
    /// Restores the core from `storage`, starts the node thread and returns the handle and
    /// the [`Driver`] future the host must run.
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
        config.raft.validate().map_err(NodeError::Config)?;
        let core = RaftCore::from_storage(config.raft.clone(), &storage)?;
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
            }),
            stopped: Mutex::new(Vec::new()),
        });
        let (inbox, commands) = mpsc::sync_channel(config.inbox_capacity);
        let (outbox, outgoing) = fmpsc::channel::<Vec<Message>>(config.peer_queue_capacity);
        let peers: Vec<NodeId> = config
            .raft
            .voters
            .iter()
            .copied()
            .filter(|&p| p != id)
            .collect();
        let driver = Box::pin(drive_transport(
            transport,
            peers,
            outgoing,
            config.peer_queue_capacity,
        ));
        let mut worker = Worker {
            core,
            storage,
            machine,
            commands,
            self_inbox: inbox.clone(),
            outbox,
            pending: BTreeMap::new(),
            shared: shared.clone(),
            policy: SnapshotPolicy::new(config.max_log_bytes),
            snapshot_waiters: Vec::new(),
            skip_through: 0,
            reads: HashMap::new(),
            ready_reads: BTreeMap::new(),
            next_read: 0,
            answers: Vec::new(),
            read_answers: Vec::new(),
            applied: 0,
            stalled: None,
            disk_full: None,
            config,
        };
        worker.restore()?;
        worker.publish_status(None, true);
        std::thread::Builder::new()
            .name(format!("raftkv-node-{id}"))
            .spawn(move || worker.run())
            .map_err(NodeError::Spawn)?;
        let handle = Arc::new(Handle { inbox, shared, id });
        Ok((Node { handle }, driver))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.handle.id
    }

    /// Proposes `command`. Resolves with the state machine's output once the command is
    /// committed and applied on this node, or with a [`ProposeError`]. Never blocks.
    pub async fn propose(&self, command: impl Into<Payload>) -> Result<O, ProposeError> {
        let (tx, rx) = oneshot::channel();
        match self
            .handle
            .inbox
            .try_send(Command::Propose(command.into(), tx))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ProposeError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(ProposeError::Shutdown),
        }
        rx.await.unwrap_or(Err(ProposeError::Shutdown))
    }

    /// Hands the node a message received from a peer. Never blocks; drops the message when
    /// the node's inbox is full or the node is shut down (Raft recovers from lost messages).
    pub fn step(&self, message: Message) {
        let _ = self.handle.inbox.try_send(Command::Step(message));
    }

    /// Answers `query` with [`StateMachine::query`] once it is linearizable: the leader
    /// confirms it still leads (ReadIndex, one heartbeat round, no log write), and the query
    /// runs after this node applied everything committed when the read arrived. Works on
    /// followers too (the leader is asked for the read index). Never blocks.
    pub async fn read(&self, query: impl Into<Payload>) -> Result<O, ProposeError> {
        let (tx, rx) = oneshot::channel();
        match self.handle.inbox.try_send(Command::Read(query.into(), tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ProposeError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(ProposeError::Shutdown),
        }
        rx.await.unwrap_or(Err(ProposeError::Shutdown))
    }

    /// Hands leadership to voter `to` (this node must lead): it is brought up to date, then
    /// told to campaign at once. Resolves when the request is taken; watch
    /// [`Node::status`] for the outcome (a transfer that cannot complete within an election
    /// timeout is abandoned). Proposals are refused with [`ProposeError::Busy`] meanwhile.
    pub async fn transfer_leadership(&self, to: NodeId) -> Result<(), ProposeError> {
        let (tx, rx) = oneshot::channel();
        match self.handle.inbox.try_send(Command::Transfer(to, tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ProposeError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(ProposeError::Shutdown),
        }
        rx.await.unwrap_or(Err(ProposeError::Shutdown))
    }

    /// Takes a snapshot of the state machine now and compacts the log behind it. Resolves
    /// with the snapshot's position once it is durably stored, or `None` if there was nothing
    /// new to snapshot (or one was already being taken, or the node stopped).
    pub async fn snapshot(&self) -> Option<SnapshotMeta> {
        let (tx, rx) = oneshot::channel();
        self.handle.inbox.try_send(Command::Snapshot(tx)).ok()?;
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
        // A full inbox still gets the shutdown through: retry until it is taken.
        while let Err(TrySendError::Full(_)) = self.handle.inbox.try_send(Command::Shutdown) {
            std::thread::yield_now();
        }
        let _ = rx.await;
    }
}

/// Moves outgoing batches from the node thread to one bounded lane per peer.
async fn drive_transport<T: Transport>(
    transport: T,
    peers: Vec<NodeId>,
    mut outgoing: fmpsc::Receiver<Vec<Message>>,
    lane_capacity: usize,
) {
    let transport = Arc::new(transport);
    let mut lanes = HashMap::new();
    let mut workers = Vec::new();
    for peer in peers {
        let (tx, mut rx) = fmpsc::channel::<Vec<Message>>(lane_capacity);
        lanes.insert(peer, tx);
        let transport = transport.clone();
        workers.push(async move {
            while let Some(batch) = rx.next().await {
                // Errors are not fatal: Raft resends what matters.
                let _ = transport.send(peer, batch).await;
            }
        });
    }
    let dispatch = async move {
        while let Some(batch) = outgoing.next().await {
            let mut by_peer: HashMap<NodeId, Vec<Message>> = HashMap::new();
            for m in batch {
                by_peer.entry(m.to).or_default().push(m);
            }
            for (peer, msgs) in by_peer {
                if let Some(lane) = lanes.get_mut(&peer) {
                    let _ = lane.try_send(msgs); // full lane: drop, the peer is slow or dead
                }
            }
        }
        // Dropping the lanes ends the workers.
    };
    futures::future::join(dispatch, futures::future::join_all(workers)).await;
}

/// Everything the node thread owns.
struct Worker<S, M: StateMachine> {
    core: RaftCore,
    storage: S,
    machine: M,
    commands: mpsc::Receiver<Command<M::Output>>,
    /// Handed to snapshot threads so they can deliver their bytes.
    self_inbox: SyncSender<Command<M::Output>>,
    outbox: fmpsc::Sender<Vec<Message>>,
    /// Proposals waiting to be applied: index -> (term, reply, deadline).
    pending: BTreeMap<Index, (Term, Reply<M::Output>, Instant)>,
    shared: Arc<Shared>,
    policy: SnapshotPolicy,
    snapshot_waiters: Vec<oneshot::Sender<Option<SnapshotMeta>>>,
    /// Entries up to here are already in the state machine's own durable state.
    skip_through: Index,
    /// Reads waiting for confirmation: ctx -> (query, reply, deadline).
    reads: HashMap<u64, (Payload, Reply<M::Output>, Instant)>,
    /// Confirmed reads waiting for the apply index: (index, ctx).
    ready_reads: BTreeMap<(Index, u64), ()>,
    next_read: u64,
    /// Answers to send once the status is published.
    answers: Vec<Answer<M::Output>>,
    /// Read answers (they leave at once: a read does not change the status).
    read_answers: Vec<Answer<M::Output>>,
    /// Highest index the state machine holds (applied, restored or durable in it).
    applied: Index,
    /// A batch that could not be written for lack of space, retried before anything else.
    stalled: Option<(Ready, WriteProgress)>,
    /// The full-disk error, while it lasts.
    disk_full: Option<String>,
    config: NodeConfig,
}

/// At most this many commands are taken from the inbox per loop iteration (bounds the batch).
const MAX_COMMANDS_PER_ROUND: usize = 4096;

enum Flow {
    Continue,
    Stop,
}

impl<S: Storage, M: StateMachine> Worker<S, M> {
    /// Start-up: rebuilds the state machine from the stored snapshot, unless it keeps its own
    /// durable state that is at least as recent; then replay starts after what it holds.
    fn restore(&mut self) -> Result<(), NodeError> {
        let init = self.storage.initial_state()?;
        let durable = self.machine.durable_index().unwrap_or(0);
        if init.snapshot.index > durable {
            host::restore_machine(&self.storage, &mut self.machine, init.snapshot_size)
                .map_err(NodeError::Restore)?;
        }
        self.skip_through = durable;
        self.applied = durable.max(init.snapshot.index);
        self.core.set_applied(self.applied);
        Ok(())
    }

    fn run(mut self) {
        let mut next_tick = Instant::now() + self.config.tick_interval;
        let fatal = loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let flow = match self.commands.recv_timeout(wait) {
                Ok(cmd) => self.handle_batch(cmd),
                Err(RecvTimeoutError::Timeout) => Ok(Flow::Continue),
                Err(RecvTimeoutError::Disconnected) => Ok(Flow::Stop),
            };
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break None,
                Err(e) => break Some(e),
            }
            let now = Instant::now();
            if now >= next_tick {
                self.core.tick();
                next_tick = now + self.config.tick_interval;
                self.expire(now);
            }
            let processed = self.process();
            // The status is published before the answers leave, so that a caller who got an
            // answer sees a status at least as recent.
            self.publish_status(None, true);
            for (reply, answer) in self.answers.drain(..) {
                let _ = reply.send(answer);
            }
            if let Err(e) = processed {
                break Some(e);
            }
        };
        self.publish_status(fatal.map(|e| e.to_string()), false);
        for (_, (_, reply, _)) in std::mem::take(&mut self.pending) {
            let _ = reply.send(Err(ProposeError::Shutdown));
        }
        for (_, (_, reply, _)) in std::mem::take(&mut self.reads) {
            let _ = reply.send(Err(ProposeError::Shutdown));
        }
        for w in self.snapshot_waiters.drain(..) {
            let _ = w.send(None);
        }
        self.outbox.close_channel();
        for tx in self.shared.stopped.lock().drain(..) {
            let _ = tx.send(());
        }
    }

    /// Handles `first` and every command already queued behind it (bounded).
    fn handle_batch(&mut self, first: Command<M::Output>) -> Result<Flow, NodeError> {
        if let Flow::Stop = self.handle(first)? {
            return Ok(Flow::Stop);
        }
        for _ in 0..MAX_COMMANDS_PER_ROUND {
            match self.commands.try_recv() {
                Ok(cmd) => {
                    if let Flow::Stop = self.handle(cmd)? {
                        return Ok(Flow::Stop);
                    }
                }
                Err(_) => break,
            }
        }
        Ok(Flow::Continue)
    }

    fn handle(&mut self, cmd: Command<M::Output>) -> Result<Flow, NodeError> {
        match cmd {
            Command::Step(m) => self.core.step(m),
            Command::Propose(_, reply) if self.disk_full.is_some() => {
                let _ = reply.send(Err(ProposeError::NoSpace));
            }
            Command::Propose(data, reply) => match self.core.propose(data) {
                Ok(p) => {
                    let deadline = Instant::now() + self.config.propose_timeout;
                    self.pending.insert(p.index, (p.term, reply, deadline));
                }
                Err(CoreProposeError::NotLeader { leader }) => {
                    let _ = reply.send(Err(ProposeError::NotLeader { leader }));
                }
                Err(CoreProposeError::Busy) => {
                    let _ = reply.send(Err(ProposeError::Busy));
                }
            },
            Command::Read(query, reply) => {
                self.next_read += 1;
                let ctx = self.next_read;
                match self.core.read_index(ctx) {
                    Ok(()) => {
                        let deadline = Instant::now() + self.config.propose_timeout;
                        self.reads.insert(ctx, (query, reply, deadline));
                    }
                    Err(CoreProposeError::NotLeader { leader }) => {
                        let _ = reply.send(Err(ProposeError::NotLeader { leader }));
                    }
                    Err(CoreProposeError::Busy) => {
                        let _ = reply.send(Err(ProposeError::Busy));
                    }
                }
            }
            Command::Transfer(to, reply) => {
                let result = self.core.transfer_leadership(to).map_err(|e| match e {
                    CoreProposeError::NotLeader { leader } => ProposeError::NotLeader { leader },
                    CoreProposeError::Busy => ProposeError::Busy,
                });
                let _ = reply.send(result);
            }
            Command::Snapshot(reply) => {
                if self.policy.in_progress().is_some() || !self.maybe_snapshot(true) {
                    let _ = reply.send(None);
                } else {
                    self.snapshot_waiters.push(reply);
                }
            }
            Command::LocalChunk(meta, data) => self.policy.write(&mut self.storage, meta, &data)?,
            Command::LocalDone(meta, result) => {
                let installed = match result {
                    Ok(()) => self
                        .policy
                        .finish(&mut self.storage, &mut self.core, meta)?,
                    Err(_) => {
                        // Serializing failed (the state machine's own error): no snapshot
                        // this time; the log simply stays longer.
                        self.policy.abandon();
                        false
                    }
                };
                let answer = installed.then_some(meta);
                for w in self.snapshot_waiters.drain(..) {
                    let _ = w.send(answer);
                }
            }
            Command::Shutdown => return Ok(Flow::Stop),
        }
        Ok(Flow::Continue)
    }

    /// Starts a local snapshot if one is due (or `force`d): takes the state machine's image
    /// here, right after the last apply, and serializes it on a background thread that feeds
    /// the bytes back through the inbox.
    fn maybe_snapshot(&mut self, force: bool) -> bool {
        let Some(meta) = self.policy.due(&self.core, &self.storage, force) else {
            return false;
        };
        let source = self.machine.snapshot();
        self.policy.started(meta);
        let inbox = self.self_inbox.clone();
        let chunk = self.config.raft.snapshot_chunk_bytes as usize;
        let spawned = std::thread::Builder::new()
            .name("raftkv-snapshot".into())
            .spawn(move || {
                let mut out = ChunkWriter {
                    inbox: inbox.clone(),
                    meta,
                    chunk,
                    buf: Vec::new(),
                };
                let result = source
                    .write_to(&mut out)
                    .and_then(|_| out.flush_chunk())
                    .map_err(|e| e.to_string());
                let _ = inbox.send(Command::LocalDone(meta, result));
            });
        if spawned.is_err() {
            self.policy.abandon();
            return false;
        }
        true
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<Index> = self
            .pending
            .iter()
            .filter(|(_, p)| p.2 <= now)
            .map(|(i, _)| *i)
            .collect();
        for i in expired {
            if let Some((_, reply, _)) = self.pending.remove(&i) {
                let _ = reply.send(Err(ProposeError::Timeout));
            }
        }
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.2 <= now)
            .map(|(c, _)| *c)
            .collect();
        for ctx in expired {
            if let Some((_, reply, _)) = self.reads.remove(&ctx) {
                let _ = reply.send(Err(ProposeError::Timeout));
            }
        }
        self.ready_reads
            .retain(|(_, ctx), _| self.reads.contains_key(ctx));
    }

    fn send(&mut self, messages: Vec<Message>) {
        if !messages.is_empty() {
            // A full outbox means the driver future is not keeping up: drop, Raft resends.
            let _ = self.outbox.try_send(messages);
        }
    }

    /// Works through the core's output. A batch that hit a full disk is kept and retried
    /// first (at every loop, so at least every tick) before anything newer: the node neither
    /// acknowledges nor applies anything meanwhile, and leadership moves elsewhere.
    fn process(&mut self) -> Result<(), NodeError> {
        if let Some((ready, progress)) = self.stalled.take() {
            self.persist_and_finish(ready, progress)?;
            if self.stalled.is_some() {
                return Ok(());
            }
        }
        while self.core.has_ready() {
            let mut ready = self.core.ready();
            let mut now = std::mem::take(&mut ready.messages);
            let requests = std::mem::take(&mut ready.snapshot_requests);
            now.extend(host::snapshot_messages(
                &self.storage,
                self.core.id(),
                requests,
            )?);
            self.send(now);
            if !ready.snapshot_chunks.is_empty() {
                self.policy.abandon(); // the leader's snapshot takes the incoming slot
            }
            self.take_reads(&mut ready);
            self.persist_and_finish(ready, WriteProgress::default())?;
            if self.stalled.is_some() {
                return Ok(());
            }
        }
        self.maybe_snapshot(false);
        Ok(())
    }

    /// Makes `ready` durable, then acknowledges and applies it. On a full disk the batch is
    /// parked in `stalled` with how far its writes got, and the error is reported in the
    /// status.
    fn persist_and_finish(
        &mut self,
        mut ready: Ready,
        mut progress: WriteProgress,
    ) -> Result<(), NodeError> {
        if ready.must_persist() {
            let written = host::write_ready(&mut self.storage, &ready, &mut progress)
                .and_then(|_| self.storage.sync());
            match written {
                Ok(()) => self.disk_full = None,
                Err(e @ StorageError::NoSpace { .. }) => {
                    self.disk_full = Some(e.to_string());
                    self.stalled = Some((ready, progress));
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.core.on_persisted(ready.ack);
        self.send(std::mem::take(&mut ready.persisted_messages));
        if ready.install_snapshot.is_some() {
            let size = self.storage.initial_state()?.snapshot_size;
            host::restore_machine(&self.storage, &mut self.machine, size)
                .map_err(NodeError::Restore)?;
            self.skip_through = 0;
            self.applied = self.core.log().snapshot().index;
            self.policy.installed += 1;
            // Proposals below the snapshot will never be applied here.
            let through = self.core.log().snapshot().index;
            while let Some(e) = self.pending.first_entry() {
                if *e.key() > through {
                    break;
                }
                let _ = e.remove().1.send(Err(ProposeError::Timeout));
            }
        }
        for entry in ready.committed_entries {
            let output = match &entry.payload {
                EntryPayload::Command(c) if entry.index > self.skip_through => {
                    Some(self.machine.apply(entry.index, c.as_bytes()))
                }
                _ => None,
            };
            self.applied = entry.index;
            self.resolve(entry.index, entry.term, output);
        }
        self.serve_reads();
        for (reply, answer) in self.read_answers.drain(..) {
            let _ = reply.send(answer);
        }
        Ok(())
    }

    /// Takes the batch's confirmed and failed reads, and answers at once those the state
    /// machine can already serve: a read need not wait for this batch's fsync.
    fn take_reads(&mut self, ready: &mut Ready) {
        for ctx in std::mem::take(&mut ready.failed_reads) {
            if let Some((_, reply, _)) = self.reads.remove(&ctx) {
                let leader = self.core.leader();
                let _ = reply.send(Err(ProposeError::NotLeader { leader }));
            }
        }
        for r in std::mem::take(&mut ready.read_states) {
            self.ready_reads.insert((r.index, r.ctx), ());
        }
        self.serve_reads();
        for (reply, answer) in self.read_answers.drain(..) {
            let _ = reply.send(answer);
        }
    }

    /// Answers the confirmed reads whose index the state machine has applied.
    fn serve_reads(&mut self) {
        let applied = self.applied;
        while let Some(entry) = self.ready_reads.first_entry() {
            let (index, ctx) = *entry.key();
            if index > applied {
                break;
            }
            entry.remove();
            if let Some((query, reply, _)) = self.reads.remove(&ctx) {
                let answer = self
                    .machine
                    .query(query.as_bytes())
                    .ok_or(ProposeError::Unsupported);
                self.read_answers.push((reply, answer));
            }
        }
    }

    /// The entry at `index` was applied: answer the proposal that waited for it, and fail
    /// those whose slots were taken by other entries.
    fn resolve(&mut self, index: Index, term: Term, output: Option<M::Output>) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > index {
                break;
            }
            let at = *entry.key();
            let (want_term, reply, _) = entry.remove();
            if at == index && want_term == term {
                if let Some(out) = output {
                    self.answers.push((reply, Ok(out)));
                }
                break;
            }
            self.answers.push((reply, Err(ProposeError::Dropped)));
        }
    }

    fn publish_status(&self, fatal: Option<String>, running: bool) {
        let mut s = self.shared.status.lock();
        s.raft = self.core.status();
        s.persisted = self.storage.persisted_size();
        if fatal.is_some() {
            s.fatal_error = fatal;
        }
        s.running = running;
        s.disk_full = self.disk_full.clone();
        s.snapshots_taken = self.policy.taken;
        s.snapshots_installed = self.policy.installed;
    }
}

/// Cuts a state machine's serialized snapshot into chunks for the node thread.
struct ChunkWriter<O> {
    inbox: SyncSender<Command<O>>,
    meta: SnapshotMeta,
    chunk: usize,
    buf: Vec<u8>,
}

impl<O> ChunkWriter<O> {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.inbox
            .send(Command::LocalChunk(self.meta, data))
            .map_err(|_| std::io::Error::other("node stopped"))
    }
}

impl<O> std::io::Write for ChunkWriter<O> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = self.chunk - self.buf.len();
        let n = room.min(bytes.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() >= self.chunk {
            self.flush_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
