//! [`Cluster`]: N Raft nodes on virtual time, a faulty network, crashes that keep only what
//! storage made durable, and the safety checker run after every step.
//!
//! Each node is a [`RaftCore`] with a storage (a [`MemStorage`] by default, or any
//! [`SimStorage`], such as the file storage on a simulated disk) and a state machine built by
//! a factory, run by the same [`Engine`] the [`Node`](crate::Node) driver runs. Around it the
//! simulation plays the node's host as [`HostModel`] says, so every interleaving a real host
//! produces can happen here:
//! - inputs (deliveries, ticks) queue in an inbox and a seeded number of them is stepped
//!   before one round of `ready()` — the `Node` takes everything queued, up to thousands;
//! - fsyncs complete after a random virtual latency; a *blocking* node steps nothing new
//!   meanwhile (inputs pile up, as in the `Node`), a *pipelined* one keeps stepping and
//!   handing out batches while the fsync is in flight;
//! - a crash at any moment — inside an fsync window too — keeps only what was synced.
//!
//! Checked after every step: the invariants of [`invariants`](super::invariants) (one leader
//! per term, log matching, state machine safety, leader completeness, apply order), the
//! core's own invariants, that every acknowledgement leaving a node (vote granted, append
//! accepted, snapshot installed) is covered by what its storage has made durable, and that a
//! node never believes its log durable beyond what its storage would keep. Same seed, same
//! run.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use std::collections::VecDeque;

use super::invariants::{Checker, LogMirror};

mod host;
mod observe;
use self::host::{check_persisted, SimHost};
use super::network::{Network, NetworkConfig};
use crate::error::{CoreProposeError, ProposeError};
use crate::host::{Engine, PendingSync};
use crate::raft::{
    Config, HardState, Index, Message, NodeId, Payload, Proposed, Rng, Role, SnapshotMeta, Term,
};
use crate::state_machine::StateMachine;
use crate::storage::{MemStorage, Storage};

/// Settings of a simulated cluster.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of nodes (ids `1..=nodes`).
    pub nodes: usize,
    /// Seed of every random choice in the run.
    pub seed: u64,
    /// Network faults.
    pub network: NetworkConfig,
    /// Virtual milliseconds between two ticks of a node.
    pub tick_ms: u64,
    /// Smallest and largest virtual fsync latency in milliseconds.
    pub fsync_ms: (u64, u64),
    /// Template of every node's Raft configuration (`id`, `voters` and `seed` are set per node).
    pub raft: Config,
    /// Snapshot and compact a node's log once its storage holds more than this many log
    /// bytes (`None`: never automatically; [`Cluster::snapshot`] still works).
    pub max_log_bytes: Option<u64>,
    /// Smallest and largest virtual time a local snapshot takes to serialize, in ms (the node
    /// keeps working meanwhile).
    pub snapshot_ms: (u64, u64),
    /// How each node's host batches inputs and waits for fsyncs.
    pub host: HostModel,
    /// Whether the first nodes treat their empty storages as lost disks
    /// ([`distrust_empty_storage`](crate::host::distrust_empty_storage)), as a `Node` does
    /// unless told its storage is new. Replaced storages and added nodes always do. Off by
    /// default: the cluster then elects without waiting for every member's answer.
    pub distrust_initial_storage: bool,
}

impl SimConfig {
    /// `nodes` nodes, a reliable network, 10 ms ticks, 0–2 ms fsyncs, default Raft settings,
    /// and hosts that batch like the `Node` driver ([`HostModel::default`]).
    pub fn new(nodes: usize, seed: u64) -> Self {
        SimConfig {
            nodes,
            seed,
            network: NetworkConfig::reliable(),
            tick_ms: 10,
            fsync_ms: (0, 2),
            raft: Config::new(1, vec![1]),
            max_log_bytes: None,
            snapshot_ms: (0, 20),
            host: HostModel::default(),
            distrust_initial_storage: false,
        }
    }
}

/// How a simulated node's host steps inputs and syncs (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostModel {
    /// At most this many queued inputs are stepped before one round of `ready()`; how many
    /// of those queued is drawn from the seed each time (often all of them, as the `Node`
    /// does). 1 steps and processes each input alone.
    pub max_inputs: usize,
    /// Whether a node steps new inputs while its fsync is in flight.
    pub sync: SyncMode,
}

impl Default for HostModel {
    /// Up to 64 inputs per round; each node blocking or pipelined at random, per fsync.
    fn default() -> Self {
        HostModel {
            max_inputs: 64,
            sync: SyncMode::Mixed,
        }
    }
}

impl HostModel {
    /// One input per round, blocking fsyncs: the simplest host.
    pub fn one_at_a_time() -> Self {
        HostModel {
            max_inputs: 1,
            sync: SyncMode::Blocking,
        }
    }
}

/// Whether a simulated node steps new inputs while its fsync is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Nothing new is stepped until the fsync completes (the `Node` driver): inputs queue.
    Blocking,
    /// Inputs are stepped and further batches handed out and written while the fsync runs.
    Pipelined,
    /// Each node picks one of the two, from the seed, for every fsync (the `Node` waits for
    /// an fsync itself, or steps on while its fsync thread waits, as the answers it holds
    /// require; see [`Engine::awaits_peers`]).
    Mixed,
}

/// An entry as a node applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedEntry {
    /// Log index.
    pub index: Index,
    /// Term of the entry.
    pub term: Term,
    /// The command, or `None` for an internal entry (a new leader's no-op).
    pub command: Option<Payload>,
}

/// A proposal that was applied on the node it was proposed to (what a client sees as success).
#[derive(Clone, Debug)]
pub struct Acknowledged<O> {
    /// Node the client talked to.
    pub node: NodeId,
    /// Where the command landed.
    pub index: Index,
    /// Term of the entry.
    pub term: Term,
    /// The command.
    pub command: Payload,
    /// The state machine's output.
    pub output: O,
}

/// An input waiting in a node's inbox.
enum Input {
    Tick,
    Message(Message),
}

enum EventKind {
    Tick(NodeId),
    Deliver(Message),
    /// The node's host takes inputs from its inbox and processes the core's output.
    Wake {
        node: NodeId,
        incarnation: u64,
    },
    /// The node's started fsync (its `SimNode::sync`) completes.
    SyncDone {
        node: NodeId,
        incarnation: u64,
    },
    /// A local snapshot finished serializing.
    SnapshotSerialized {
        node: NodeId,
        incarnation: u64,
        meta: SnapshotMeta,
        bytes: Vec<u8>,
    },
}

struct Event {
    at: u64,
    seq: u64,
    kind: EventKind,
}
impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A storage the simulation can crash.
///
/// The `durable_*` methods let the simulation check, after every step, that whatever a node
/// acknowledged is in what its storage would keep across a crash. A storage that cannot tell
/// answers `None` (the default), and those checks are skipped for it.
pub trait SimStorage: Storage + Sized {
    /// A power loss: what was not synced may be lost (all of it, part of it, or none, as the
    /// storage's medium allows), and the storage is reopened from what survived. `rng` drives
    /// any random choice, so runs stay reproducible.
    fn power_loss(&mut self, rng: &mut Rng);

    /// The hard state a crash now would keep.
    fn durable_hard_state(&self) -> Option<HardState> {
        None
    }
    /// The snapshot a crash now would keep.
    fn durable_snapshot(&self) -> Option<SnapshotMeta> {
        None
    }
    /// Term of the entry at `index` a crash now would keep (`None`: none kept there).
    fn durable_term(&self, _index: Index) -> Option<Term> {
        None
    }

    /// Damage that recovery mode cuts (the storage is down): the log after `intact_through`
    /// is lost, and with `forget_hard_state` the newest term and vote too; the storage then
    /// reports the [`TailLoss`](crate::storage::TailLoss). False if this storage cannot be
    /// damaged so.
    fn lose_tail(&mut self, _intact_through: Index, _forget_hard_state: bool) -> bool {
        false
    }
}

impl SimStorage for MemStorage {
    fn power_loss(&mut self, _rng: &mut Rng) {
        self.crash();
    }
    fn durable_hard_state(&self) -> Option<HardState> {
        Some(MemStorage::durable_hard_state(self))
    }
    fn durable_snapshot(&self) -> Option<SnapshotMeta> {
        Some(MemStorage::durable_snapshot(self))
    }
    fn durable_term(&self, index: Index) -> Option<Term> {
        MemStorage::durable_term(self, index)
    }
    fn lose_tail(&mut self, intact_through: Index, forget_hard_state: bool) -> bool {
        MemStorage::lose_tail(self, intact_through, forget_hard_state);
        true
    }
}

type SimEngine<M, S> = Engine<S, M, Payload, u64>;

/// A node's storage and state machine, running or not.
enum Life<M: StateMachine, S> {
    Up(Box<SimEngine<M, S>>),
    /// Crashed: the storage keeps what survived; the last state machine stays inspectable.
    Down {
        storage: S,
        machine: M,
    },
    /// Only while a transition moves the parts.
    Moving,
}

struct SimNode<M: StateMachine, S> {
    life: Life<M, S>,
    incarnation: u64,
    mirror: LogMirror,
    applied: Vec<AppliedEntry>,
    inbox: VecDeque<Input>,
    /// This incarnation steps nothing while an fsync is in flight.
    blocking: bool,
    /// The fsync in flight, started by the engine; its wait runs when it completes.
    sync: Option<PendingSync>,
    wake_scheduled: bool,
    /// Virtual time the latest fsync completes (fsyncs complete in order).
    last_sync_at: u64,
    /// Snapshots taken and installed over the node's whole life (all incarnations).
    snapshots_taken: u64,
    snapshots_installed: u64,
    /// Largest persisted size seen, summed over log and snapshot.
    peak_persisted: u64,
    /// The storage is known never to have held another node's state (a first node's own,
    /// with [`SimConfig::distrust_initial_storage`] off): its host trusts it even empty.
    trusted: bool,
    /// Proposals the running engine took and has not answered yet: after every engine call
    /// it must hold exactly this many (a proposal is answered once, never lost).
    tickets: usize,
}

impl<M: StateMachine, S> SimNode<M, S> {
    /// A node that has not started yet, on `storage`, at virtual time `now`.
    fn new(storage: S, machine: M, trusted: bool, now: u64) -> Self {
        SimNode {
            life: Life::Down { storage, machine },
            incarnation: 0,
            mirror: LogMirror::default(),
            applied: Vec::new(),
            inbox: VecDeque::new(),
            blocking: true,
            sync: None,
            wake_scheduled: false,
            last_sync_at: now,
            snapshots_taken: 0,
            snapshots_installed: 0,
            peak_persisted: 0,
            trusted,
            tickets: 0,
        }
    }

    fn engine(&self) -> Option<&SimEngine<M, S>> {
        match &self.life {
            Life::Up(e) => Some(e),
            _ => None,
        }
    }
    fn engine_mut(&mut self) -> Option<&mut SimEngine<M, S>> {
        match &mut self.life {
            Life::Up(e) => Some(e),
            _ => None,
        }
    }
}

/// A simulated cluster. See the [module docs](self).
///
/// ```
/// use raftkv::testing::{Cluster, RecordingMachine, SimConfig};
///
/// let mut c = Cluster::new(SimConfig::new(3, 42), |_| RecordingMachine::default());
/// let leader = c.run_until_leader(5_000).expect("a leader within 5 s");
/// let (index, _) = c.propose_and_wait(leader, b"hello".as_slice(), 2_000).expect("committed");
/// c.run_for(500);
/// for id in c.node_ids() {
///     assert_eq!(c.machine(id).commands().last().unwrap().0, index);
/// }
/// ```
pub struct Cluster<M: StateMachine, S: SimStorage = MemStorage> {
    config: SimConfig,
    now: u64,
    seq: u64,
    rng: Rng,
    queue: BinaryHeap<Reverse<Event>>,
    nodes: BTreeMap<NodeId, SimNode<M, S>>,
    factory: Box<dyn FnMut(NodeId) -> M>,
    /// The simulated network: cut links, change fault rates, read traffic counters.
    pub network: Network,
    checker: Checker,
    acknowledged: Vec<Acknowledged<M::Output>>,
    read_results: BTreeMap<u64, Option<M::Output>>,
    next_read: u64,
    dropped: u64,
    steps: u64,
}

impl<M: StateMachine> Cluster<M, MemStorage> {
    /// Builds the cluster on in-memory storage; every node starts empty and as a follower.
    pub fn new(config: SimConfig, factory: impl FnMut(NodeId) -> M + 'static) -> Self {
        Self::with_storage(config, factory, |_| MemStorage::new())
    }
}

impl<M: StateMachine, S: SimStorage> Cluster<M, S> {
    /// Builds the cluster with a storage per node from `storage`; every node starts as a
    /// follower from whatever its storage holds.
    pub fn with_storage(
        config: SimConfig,
        factory: impl FnMut(NodeId) -> M + 'static,
        mut storage: impl FnMut(NodeId) -> S,
    ) -> Self {
        let mut c = Cluster {
            rng: Rng::new(config.seed),
            network: Network::new(config.network.clone()),
            checker: Checker::new(config.seed),
            config,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: BTreeMap::new(),
            factory: Box::new(factory),
            acknowledged: Vec::new(),
            read_results: BTreeMap::new(),
            next_read: 0,
            dropped: 0,
            steps: 0,
        };
        for id in 1..=c.config.nodes as NodeId {
            let storage = storage(id);
            let machine = (c.factory)(id);
            let trusted = !c.config.distrust_initial_storage;
            c.nodes
                .insert(id, SimNode::new(storage, machine, trusted, c.now));
            c.boot(id, None);
            let phase = c.rng.range(0, c.config.tick_ms);
            c.schedule(phase, EventKind::Tick(id));
        }
        c
    }

    fn raft_config(&mut self, id: NodeId, incarnation: u64) -> Config {
        let mut cfg = self.config.raft.clone();
        cfg.id = id;
        // The first nodes bootstrap the cluster; nodes added later join it (they learn the
        // configuration from the leader).
        cfg.voters = if id <= self.config.nodes as NodeId {
            (1..=self.config.nodes as NodeId).collect()
        } else {
            Vec::new()
        };
        cfg.seed = self.config.seed ^ (id << 32) ^ incarnation.wrapping_mul(0x9E37_79B9);
        cfg
    }

    /// Starts node `id` from its storage, with `machine` (or the one it kept) as its state
    /// machine. Unless the storage is trusted, an empty one starts as a lost disk.
    fn boot(&mut self, id: NodeId, machine: Option<M>) {
        let incarnation = self.nodes[&id].incarnation;
        let cfg = self.raft_config(id, incarnation);
        let blocking = match self.config.host.sync {
            SyncMode::Blocking => true,
            SyncMode::Pipelined => false,
            SyncMode::Mixed => self.rng.chance(0.5),
        };
        let max_log_bytes = self.config.max_log_bytes;
        let node = self.nodes.get_mut(&id).expect("known node");
        let Life::Down {
            storage,
            machine: old,
        } = std::mem::replace(&mut node.life, Life::Moving)
        else {
            panic!("node {id} is running");
        };
        let machine = machine.unwrap_or(old);
        let mut storage = storage;
        let core = crate::host::start_core(cfg, &mut storage, node.trusted)
            .unwrap_or_else(|e| panic!("node {id} cannot restart from its storage: {e}"));
        node.mirror =
            self.checker
                .mirror_restored(id, core.log().snapshot().index, core.log().entries());
        let engine = Engine::new(core, storage, machine, max_log_bytes)
            .unwrap_or_else(|e| panic!("node {id} cannot restore its state machine: {e}"));
        node.life = Life::Up(Box::new(engine));
        node.tickets = 0;
        node.applied.clear();
        node.inbox.clear();
        node.blocking = blocking;
        node.sync = None;
        node.wake_scheduled = false;
    }

    fn schedule(&mut self, delay: u64, kind: EventKind) {
        self.seq += 1;
        self.queue.push(Reverse(Event {
            at: self.now + delay,
            seq: self.seq,
            kind,
        }));
    }

    fn transmit(&mut self, m: Message) {
        for delay in self.network.route(&m, &mut self.rng) {
            self.schedule(delay, EventKind::Deliver(m.clone()));
        }
    }

    /// Queues an input for a running node and makes sure its host wakes up for it.
    fn enqueue(&mut self, id: NodeId, input: Input) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.engine().is_none() {
            return;
        }
        node.inbox.push_back(input);
        self.wake(id);
    }

    /// Schedules the node's host to run, unless it will anyway (a wake is pending, or it
    /// waits for an fsync).
    fn wake(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.wake_scheduled || (node.blocking && node.sync.is_some()) {
            return;
        }
        node.wake_scheduled = true;
        let incarnation = node.incarnation;
        // Usually at once (inputs already queued for this instant still batch with it),
        // sometimes a little later, so that more inputs pile up.
        let delay = u64::from(self.rng.chance(0.2));
        self.schedule(
            delay,
            EventKind::Wake {
                node: id,
                incarnation,
            },
        );
    }

    /// The host runs: steps a seeded number of queued inputs, then carries out the output.
    fn on_wake(&mut self, id: NodeId) {
        let take = {
            let node = self.nodes.get_mut(&id).expect("known node");
            node.wake_scheduled = false;
            if node.engine().is_none() || (node.blocking && node.sync.is_some()) {
                return;
            }
            let queued = node.inbox.len().min(self.config.host.max_inputs.max(1));
            if queued == 0 || self.rng.chance(0.5) {
                queued
            } else {
                self.rng.range(1, queued as u64 + 1) as usize
            }
        };
        let node = self.nodes.get_mut(&id).expect("known node");
        let inputs: Vec<Input> = node.inbox.drain(..take).collect();
        if let Some(engine) = node.engine_mut() {
            for input in inputs {
                match input {
                    Input::Tick => engine.core_mut().tick(),
                    Input::Message(m) => engine.core_mut().step(m),
                }
            }
        }
        self.advance(id);
        if !self.nodes[&id].inbox.is_empty() {
            self.wake(id);
        }
    }

    /// Runs one engine call on node `id` with the simulation as its host, then transmits what
    /// it sent, schedules what it started (fsyncs, snapshot serializations) and checks the
    /// invariants.
    fn with_engine(
        &mut self,
        id: NodeId,
        call: impl FnOnce(&mut SimEngine<M, S>, &mut SimHost<'_, M::Output>),
    ) {
        let mut outbox = Vec::new();
        let mut serialize = Vec::new();
        let seed = self.config.seed;
        let Cluster {
            nodes,
            checker,
            acknowledged,
            dropped,
            read_results,
            ..
        } = self;
        let node = nodes.get_mut(&id).expect("known node");
        let SimNode {
            life,
            mirror,
            applied,
            snapshots_installed,
            snapshots_taken,
            tickets,
            ..
        } = node;
        let Life::Up(engine) = life else { return };
        let mut host = SimHost {
            id,
            seed,
            checker,
            mirror,
            applied,
            outbox: &mut outbox,
            acknowledged,
            dropped,
            read_results,
            serialize: &mut serialize,
            snapshots_installed,
            snapshots_taken,
            tickets,
        };
        call(engine, &mut host);
        check_tickets(seed, id, engine.waiting_proposals(), *tickets);
        let core = engine.core();
        core.check_invariants();
        if let Err(what) = check_persisted(core, engine.storage()) {
            panic!("safety violation (replay with RAFTKV_SEED={seed}): node {id}: {what}");
        }
        checker.commit(id, core.commit_index(), mirror);
        if core.role() == Role::Leader {
            checker.leader(id, core.term(), mirror);
        }
        let size = engine.storage().persisted_size();
        node.peak_persisted = node
            .peak_persisted
            .max(size.log_bytes + size.snapshot_bytes);
        let incarnation = node.incarnation;
        for (m, claim) in outbox {
            if let Some(claim) = claim {
                let leader = self.nodes.get(&m.to).and_then(|n| n.engine());
                if let Some(leader) = leader {
                    if let Err(what) = host::check_ack(&claim, &m, leader.core()) {
                        panic!("safety violation (replay with RAFTKV_SEED={seed}): {what}");
                    }
                }
            }
            self.transmit(m);
        }
        for (meta, bytes) in serialize {
            let delay = self
                .rng
                .range(self.config.snapshot_ms.0, self.config.snapshot_ms.1 + 1);
            self.schedule(
                delay,
                EventKind::SnapshotSerialized {
                    node: id,
                    incarnation,
                    meta,
                    bytes,
                },
            );
        }
    }

    /// Hands out and writes the node's pending output; starts an fsync if batches wait for
    /// one and none is in flight.
    fn advance(&mut self, id: NodeId) {
        self.with_engine(id, |engine, host| {
            engine
                .advance(host)
                .unwrap_or_else(|e| panic!("node storage failed: {e}"));
        });
        self.maybe_start_sync(id);
    }

    fn maybe_start_sync(&mut self, id: NodeId) {
        let fsync = self
            .rng
            .range(self.config.fsync_ms.0, self.config.fsync_ms.1 + 1);
        let node = &self.nodes[&id];
        if node.sync.is_some() || !node.engine().is_some_and(|e| e.needs_sync()) {
            return;
        }
        // The engine hands the writes to the storage now; the wait runs at completion, so a
        // crash meanwhile keeps only what earlier syncs made durable.
        let mut started = None;
        self.with_engine(id, |engine, host| {
            started = engine
                .start_sync(host)
                .unwrap_or_else(|e| panic!("node storage failed: {e}"));
        });
        let Some(started) = started else {
            return; // a full disk: retried at the node's next round
        };
        let now = self.now;
        let node = self.nodes.get_mut(&id).expect("known node");
        if self.config.host.sync == SyncMode::Mixed {
            node.blocking = self.rng.chance(0.5);
        }
        let at = (now + fsync).max(node.last_sync_at);
        node.last_sync_at = at;
        node.sync = Some(started);
        let incarnation = node.incarnation;
        self.schedule(
            at - now,
            EventKind::SyncDone {
                node: id,
                incarnation,
            },
        );
    }

    fn on_sync_done(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        let waited = node.sync.take().expect("a sync in flight").wait();
        self.with_engine(id, |engine, host| {
            engine
                .finish_sync(host, waited)
                .unwrap_or_else(|e| panic!("node storage failed: {e}"));
        });
        self.advance(id);
        if !self.nodes[&id].inbox.is_empty() {
            self.wake(id);
        }
    }

    /// Starts a local snapshot of `id` if one is due (or forced). Returns true if one started.
    fn maybe_snapshot(&mut self, id: NodeId, force: bool) -> bool {
        let mut started = false;
        self.with_engine(id, |engine, host| {
            started = engine.maybe_snapshot(host, force).is_some();
        });
        started
    }

    fn snapshot_serialized(&mut self, id: NodeId, meta: SnapshotMeta, bytes: Vec<u8>) {
        let chunk = self.config.raft.snapshot_chunk_bytes.max(1) as usize;
        self.with_engine(id, |engine, host| {
            for piece in bytes.chunks(chunk) {
                engine
                    .local_snapshot_chunk(meta, piece)
                    .unwrap_or_else(|e| panic!("node storage failed: {e}"));
            }
            engine
                .local_snapshot_done(host, meta, Ok(()))
                .unwrap_or_else(|e| panic!("node storage failed: {e}"));
        });
        self.advance(id);
    }

    /// Processes the next event. Returns false when nothing is scheduled.
    pub fn step(&mut self) -> bool {
        let Some(Reverse(ev)) = self.queue.pop() else {
            return false;
        };
        self.now = ev.at;
        self.steps += 1;
        let current = |c: &Self, id: NodeId, incarnation: u64| {
            let n = &c.nodes[&id];
            n.incarnation == incarnation && n.engine().is_some()
        };
        match ev.kind {
            EventKind::Tick(id) => {
                self.enqueue(id, Input::Tick);
                let every = self.config.tick_ms;
                self.schedule(every, EventKind::Tick(id));
            }
            EventKind::Deliver(m) => {
                let to = m.to;
                if self.nodes.contains_key(&to) {
                    self.enqueue(to, Input::Message(m));
                }
            }
            EventKind::Wake {
                node: id,
                incarnation,
            } => {
                if current(self, id, incarnation) {
                    self.on_wake(id);
                }
            }
            EventKind::SyncDone {
                node: id,
                incarnation,
            } => {
                // A crash before the fsync completed lost what it would have made durable.
                if current(self, id, incarnation) {
                    self.on_sync_done(id);
                }
            }
            EventKind::SnapshotSerialized {
                node: id,
                incarnation,
                meta,
                bytes,
            } => {
                if current(self, id, incarnation) {
                    self.snapshot_serialized(id, meta, bytes);
                }
            }
        }
        true
    }

    /// Runs for `ms` virtual milliseconds.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.queue.peek().is_some_and(|Reverse(e)| e.at <= end) {
            self.step();
        }
        self.now = end;
    }

    /// Runs until `done` holds (checked after every step) or `max_ms` pass. Returns `done`'s
    /// final answer.
    pub fn run_until(&mut self, max_ms: u64, mut done: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + max_ms;
        while !done(self) {
            if self.queue.peek().is_none_or(|Reverse(e)| e.at > end) {
                self.now = end;
                return done(self);
            }
            self.step();
        }
        true
    }

    /// Runs until some live node is leader and a majority of live nodes agree it is, for at
    /// most `max_ms`. Returns that leader.
    pub fn run_until_leader(&mut self, max_ms: u64) -> Option<NodeId> {
        let mut found = None;
        self.run_until(max_ms, |c| {
            found = c.stable_leader();
            found.is_some()
        });
        found
    }

    /// A live leader whose term and leadership a majority of the cluster's nodes acknowledge.
    pub fn stable_leader(&self) -> Option<NodeId> {
        let leader = self.leader()?;
        let core = self.core(leader)?;
        let term = core.term();
        let agrees = |id: NodeId| {
            self.nodes
                .get(&id)
                .and_then(|n| n.engine())
                .is_some_and(|e| e.core().term() == term && e.core().leader() == Some(leader))
        };
        core.membership().has_quorum(agrees).then_some(leader)
    }

    /// The live node in the leader role with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.engine().map(|e| (*id, e.core())))
            .filter(|(_, c)| c.role() == Role::Leader)
            .max_by_key(|(_, c)| c.term())
            .map(|(id, _)| id)
    }

    /// Proposes `command` on node `id` (which must think it is leader). The node hands out
    /// its work when its host next runs, so proposals made back to back go out in one batch.
    pub fn propose(
        &mut self,
        id: NodeId,
        command: impl Into<Payload>,
    ) -> Result<Proposed, CoreProposeError> {
        let command = command.into();
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(engine) = node.engine_mut() else {
            return Err(CoreProposeError::NotLeader { leader: None });
        };
        let proposed = engine
            .propose(command.clone(), command)
            .map_err(|(e, _)| match e {
                ProposeError::NotLeader { leader } => CoreProposeError::NotLeader { leader },
                ProposeError::TooLarge { size, max } => CoreProposeError::TooLarge { size, max },
                _ => CoreProposeError::Busy,
            })?;
        let waiting = engine.waiting_proposals();
        node.tickets += 1;
        check_tickets(self.config.seed, id, waiting, node.tickets);
        self.wake(id);
        Ok(proposed)
    }

    /// Asks `id` for a linearizable read of `query` (ReadIndex). Returns a ticket; the answer
    /// shows up in [`Cluster::take_read_result`] once the read is confirmed and `id` applied
    /// far enough. A read on a node that crashes is never answered.
    pub fn read(&mut self, id: NodeId, query: impl Into<Payload>) -> Result<u64, CoreProposeError> {
        let ticket = self.next_read + 1;
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(engine) = node.engine_mut() else {
            return Err(CoreProposeError::NotLeader { leader: None });
        };
        engine
            .read(query.into(), ticket)
            .map_err(|(e, _)| match e {
                ProposeError::NotLeader { leader } => CoreProposeError::NotLeader { leader },
                _ => CoreProposeError::Busy,
            })?;
        self.next_read = ticket;
        self.wake(id);
        Ok(ticket)
    }

    /// True once read `ticket` has an answer (see [`Cluster::take_read_result`]).
    pub fn read_done(&self, ticket: u64) -> bool {
        self.read_results.contains_key(&ticket)
    }

    /// The answer to read `ticket`, once there is one: `Some(Some(output))` when served,
    /// `Some(None)` when it failed (leadership changed, or the machine serves no queries).
    pub fn take_read_result(&mut self, ticket: u64) -> Option<Option<M::Output>> {
        self.read_results.remove(&ticket)
    }

    /// The end of a fault scenario: heals every link, drops the targeted faults and delays,
    /// makes the network reliable, and restarts every node that is down.
    pub fn heal_everything(&mut self) {
        self.network.heal();
        self.network.clear_filter();
        self.network.clear_delay();
        self.network.set_stragglers(0.0, 0);
        self.network.config = NetworkConfig::reliable();
        for id in self.node_ids() {
            if !self.is_up(id) {
                self.restart(id);
            }
        }
    }

    /// Commits `command` through whoever leads: up to `attempts` times, waits up to 10 s for
    /// a leader and 3 s for the commit. `None` if no attempt committed.
    pub fn commit_through_leader(
        &mut self,
        command: impl Into<Payload>,
        attempts: usize,
    ) -> Option<(Index, M::Output)>
    where
        M::Output: Clone,
    {
        let command = command.into();
        for _ in 0..attempts {
            if let Some(l) = self.run_until_leader(10_000) {
                if let Some(r) = self.propose_and_wait(l, command.clone(), 3_000) {
                    return Some(r);
                }
            }
        }
        None
    }

    /// Proposes on `id` and runs until the command is applied there (within `max_ms`).
    /// Returns its index and output, or `None` if it was refused, dropped or timed out. A
    /// proposal refused because the leader is busy (its uncommitted tail or its log is at its
    /// bound) is retried every 10 ms within `max_ms`, as a client would.
    pub fn propose_and_wait(
        &mut self,
        id: NodeId,
        command: impl Into<Payload>,
        max_ms: u64,
    ) -> Option<(Index, M::Output)>
    where
        M::Output: Clone,
    {
        let command = command.into();
        let end = self.now + max_ms;
        let p = loop {
            match self.propose(id, command.clone()) {
                Ok(p) => break p,
                Err(CoreProposeError::Busy) if self.now + 10 < end => self.run_for(10),
                Err(_) => return None,
            }
        };
        let max_ms = end.saturating_sub(self.now).max(1);
        let found = |c: &Self| {
            c.acknowledged
                .iter()
                .rev()
                .take(64)
                .any(|a| a.node == id && a.index == p.index && a.term == p.term)
        };
        if !self.run_until(max_ms, found) {
            return None;
        }
        let a = self
            .acknowledged
            .iter()
            .rev()
            .find(|a| a.node == id && a.index == p.index)?;
        Some((a.index, a.output.clone()))
    }

    /// Asks leader `id` to hand its leadership to `to` (see
    /// [`RaftCore::transfer_leadership`]).
    pub fn transfer_leadership(&mut self, id: NodeId, to: NodeId) -> Result<(), CoreProposeError> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(engine) = node.engine_mut() else {
            return Err(CoreProposeError::NotLeader { leader: None });
        };
        engine.core_mut().transfer_leadership(to)?;
        self.wake(id);
        Ok(())
    }

    /// Takes a snapshot of `id` now (it completes after the configured serialization delay).
    /// Returns false if there is nothing new to snapshot or one is in progress.
    pub fn snapshot(&mut self, id: NodeId) -> bool {
        self.maybe_snapshot(id, true)
    }

    /// Local snapshots `id` completed over its whole life.
    pub fn snapshots_taken(&self, id: NodeId) -> u64 {
        self.nodes[&id].snapshots_taken
    }

    /// Snapshots `id` received from leaders and installed over its whole life.
    pub fn snapshots_installed(&self, id: NodeId) -> u64 {
        self.nodes[&id].snapshots_installed
    }

    /// The largest `log_bytes + snapshot_bytes` `id`'s storage reported after any step.
    pub fn peak_persisted_bytes(&self, id: NodeId) -> u64 {
        self.nodes[&id].peak_persisted
    }

    /// Crashes node `id`: its volatile state is gone, its storage keeps only what was synced
    /// (an fsync in flight is lost with it).
    pub fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.engine().is_none() {
            return; // already down
        }
        let Life::Up(engine) = std::mem::replace(&mut node.life, Life::Moving) else {
            unreachable!("checked running");
        };
        let (mut storage, machine) = engine.into_parts();
        storage.power_loss(&mut self.rng);
        node.life = Life::Down { storage, machine };
        node.incarnation += 1;
        node.inbox.clear();
        node.sync = None;
        node.wake_scheduled = false;
        node.last_sync_at = self.now;
    }

    /// Replaces crashed node `id`'s storage (a new disk, say). Restart it afterwards.
    pub fn replace_storage(&mut self, id: NodeId, storage: S) {
        let node = self.nodes.get_mut(&id).expect("known node");
        node.trusted = false;
        match &mut node.life {
            Life::Down { storage: old, .. } => *old = storage,
            _ => panic!("node {id} must be down to get a new storage"),
        }
    }

    /// Adds a node that is not a member yet (it joins: empty storage, no configuration of its
    /// own), with the storage `storage` gives. Make it a member with
    /// [`Cluster::change_membership`]. Panics if `id` exists.
    pub fn add_node(&mut self, id: NodeId, storage: S) {
        assert!(!self.nodes.contains_key(&id), "node {id} exists");
        let machine = (self.factory)(id);
        self.nodes
            .insert(id, SimNode::new(storage, machine, false, self.now));
        self.boot(id, None);
        let phase = self.rng.range(0, self.config.tick_ms);
        self.schedule(phase, EventKind::Tick(id));
    }

    /// Asks leader `id` to move to `voters` and `learners` (see
    /// [`RaftCore::change_membership`]).
    pub fn change_membership(
        &mut self,
        id: NodeId,
        voters: impl IntoIterator<Item = NodeId>,
        learners: impl IntoIterator<Item = NodeId>,
    ) -> Result<Proposed, crate::error::MembershipError> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(engine) = node.engine_mut() else {
            return Err(crate::error::MembershipError::NotLeader { leader: None });
        };
        let p = engine
            .core_mut()
            .change_membership(voters.into_iter().collect(), learners.into_iter().collect())?;
        self.wake(id);
        Ok(p)
    }

    /// Damages crashed node `id`'s storage as a disk can: its log after `intact_through` (and,
    /// with `forget_hard_state`, its newest term and vote) is lost, and the storage reports
    /// the loss, as a storage opened in recovery mode does ([`SimStorage::lose_tail`]).
    /// Returns false if the node's storage cannot be damaged so. Restart it afterwards.
    pub fn lose_tail(
        &mut self,
        id: NodeId,
        intact_through: Index,
        forget_hard_state: bool,
    ) -> bool {
        match &mut self.nodes.get_mut(&id).expect("known node").life {
            Life::Down { storage, .. } => storage.lose_tail(intact_through, forget_hard_state),
            _ => panic!("node {id} must be down to be damaged"),
        }
    }

    /// Restarts a crashed node from its storage, with a fresh state machine from the factory.
    pub fn restart(&mut self, id: NodeId) {
        assert!(self.nodes[&id].engine().is_none(), "node {id} is running");
        let machine = (self.factory)(id);
        self.boot(id, Some(machine));
    }

    /// Cuts every link between the groups (links inside a group stay); nodes in no group are
    /// cut from everyone.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        self.network.heal();
        let group_of = |id: NodeId| groups.iter().position(|g| g.contains(&id));
        let ids = self.node_ids();
        for &a in &ids {
            for &b in &ids {
                if a != b && (group_of(a).is_none() || group_of(a) != group_of(b)) {
                    self.network.cut(a, b);
                }
            }
        }
    }

    /// Cuts `id` from everyone, both directions.
    pub fn isolate(&mut self, id: NodeId) {
        for other in self.node_ids() {
            if other != id {
                self.network.cut(id, other);
                self.network.cut(other, id);
            }
        }
    }

    /// Reconnects `id` with everyone.
    pub fn reconnect(&mut self, id: NodeId) {
        for other in self.node_ids() {
            self.network.restore(id, other);
            self.network.restore(other, id);
        }
    }
}

/// Every proposal an engine took is still held or was answered once: the engine of node `id`
/// holds `waiting` proposals, and `tickets` were taken and not answered.
fn check_tickets(seed: u64, id: NodeId, waiting: usize, tickets: usize) {
    if waiting != tickets {
        panic!(
            "safety violation (replay with RAFTKV_SEED={seed}): node {id}: the engine holds \
             {waiting} proposals but {tickets} were taken and not answered (one was lost \
             unanswered)"
        );
    }
}
