//! [`Cluster`]: N Raft nodes on virtual time, a faulty network, crashes that keep only what
//! storage made durable, and the safety checker run after every step.
//!
//! Each node is a [`RaftCore`] with a storage (a [`MemStorage`] by default, or any
//! [`SimStorage`], such as the file storage on a simulated disk) and a state machine built by
//! a factory.
//! The simulation plays the host exactly as the [`Ready`](crate::raft::Ready) contract says:
//! immediate messages go out at once, writes reach storage, and the fsync completes after a
//! random virtual latency; only then are the batch's acknowledgements sent. A crash between a
//! write and its fsync loses the write. Same seed, same run.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::invariants::{Checker, LogMirror};

mod observe;
use super::network::{Network, NetworkConfig};
use crate::error::CoreProposeError;
use crate::host::{self, SnapshotPolicy};
use crate::raft::{
    Config, Entry, EntryPayload, Index, Message, NodeId, Payload, PersistAck, Proposed, RaftCore,
    Rng, Role, SnapshotMeta, Term,
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
}

impl SimConfig {
    /// `nodes` nodes, a reliable network, 10 ms ticks, 0–2 ms fsyncs, default Raft settings.
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
        }
    }
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

enum EventKind {
    Tick(NodeId),
    /// Hand out the node's pending work (scheduled by proposals, so that proposals made
    /// together are batched as a real driver batches them).
    Process(NodeId),
    Deliver(Message),
    Persisted {
        node: NodeId,
        incarnation: u64,
        ack: PersistAck,
        messages: Vec<Message>,
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
pub trait SimStorage: Storage + Sized {
    /// A power loss: what was not synced may be lost (all of it, part of it, or none, as the
    /// storage's medium allows), and the storage is reopened from what survived. `rng` drives
    /// any random choice, so runs stay reproducible.
    fn power_loss(&mut self, rng: &mut Rng);
}

impl SimStorage for MemStorage {
    fn power_loss(&mut self, _rng: &mut Rng) {
        self.crash();
    }
}

struct SimNode<M, S> {
    core: Option<RaftCore>,
    storage: S,
    machine: M,
    incarnation: u64,
    mirror: LogMirror,
    last_applied: Index,
    applied: Vec<AppliedEntry>,
    last_sync_at: u64,
    /// Proposals made on this node and not yet applied: index -> (term, command).
    pending: BTreeMap<Index, (Term, Payload)>,
    policy: SnapshotPolicy,
    /// Snapshots taken and installed over the node's whole life (all incarnations).
    snapshots_taken: u64,
    snapshots_installed: u64,
    /// Largest persisted size seen, summed over log and snapshot.
    peak_persisted: u64,
    /// Reads asked of this node: ticket -> query.
    read_queries: BTreeMap<u64, Payload>,
    /// Reads confirmed, waiting for the apply index: (index, ticket).
    confirmed_reads: BTreeMap<(Index, u64), ()>,
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
            c.nodes.insert(
                id,
                SimNode {
                    core: None,
                    storage,
                    machine,
                    incarnation: 0,
                    mirror: LogMirror::default(),
                    last_applied: 0,
                    applied: Vec::new(),
                    last_sync_at: 0,
                    pending: BTreeMap::new(),
                    policy: SnapshotPolicy::new(c.config.max_log_bytes),
                    snapshots_taken: 0,
                    snapshots_installed: 0,
                    peak_persisted: 0,
                    read_queries: BTreeMap::new(),
                    confirmed_reads: BTreeMap::new(),
                },
            );
            c.boot(id);
            let phase = c.rng.range(0, c.config.tick_ms);
            c.schedule(phase, EventKind::Tick(id));
        }
        c
    }

    fn raft_config(&mut self, id: NodeId, incarnation: u64) -> Config {
        let mut cfg = self.config.raft.clone();
        cfg.id = id;
        cfg.voters = (1..=self.config.nodes as NodeId).collect();
        cfg.seed = self.config.seed ^ (id << 32) ^ incarnation.wrapping_mul(0x9E37_79B9);
        cfg
    }

    fn boot(&mut self, id: NodeId) {
        let incarnation = self.nodes[&id].incarnation;
        let cfg = self.raft_config(id, incarnation);
        let node = self.nodes.get_mut(&id).expect("known node");
        let core = RaftCore::from_storage(cfg, &node.storage)
            .unwrap_or_else(|e| panic!("node {id} cannot restart from its storage: {e}"));
        let init = node
            .storage
            .initial_state()
            .unwrap_or_else(|e| panic!("node storage failed: {e}"));
        if init.snapshot.index > 0 {
            host::restore_machine(&node.storage, &mut node.machine, init.snapshot_size)
                .unwrap_or_else(|e| panic!("node {id} cannot restore its snapshot: {e}"));
        }
        node.policy = SnapshotPolicy::new(self.config.max_log_bytes);
        node.mirror =
            self.checker
                .mirror_restored(id, core.log().snapshot().index, core.log().entries());
        node.last_applied = core.log().applied();
        node.applied.clear();
        node.core = Some(core);
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

    /// Runs `id`'s core until it has no more work, playing the host's part.
    fn process(&mut self, id: NodeId) {
        loop {
            let node = self.nodes.get_mut(&id).expect("known node");
            let Some(core) = node.core.as_mut() else {
                return;
            };
            if !core.has_ready() {
                break;
            }
            let mut ready = core.ready();
            let (role, term, commit) = (core.role(), core.term(), core.commit_index());
            let requests = std::mem::take(&mut ready.snapshot_requests);
            let chunks = host::snapshot_messages(&node.storage, id, requests)
                .unwrap_or_else(|e| panic!("node storage failed: {e}"));
            if !ready.snapshot_chunks.is_empty() {
                node.policy.abandon();
            }
            host::write_ready(&mut node.storage, &ready, &mut Default::default())
                .unwrap_or_else(|e| panic!("node storage failed: {e}"));
            if let Some(meta) = ready.install_snapshot {
                let size = node
                    .storage
                    .initial_state()
                    .unwrap_or_else(|e| panic!("node storage failed: {e}"))
                    .snapshot_size;
                host::restore_machine(&node.storage, &mut node.machine, size).unwrap_or_else(|e| {
                    panic!("node {id} cannot restore a received snapshot: {e}")
                });
                self.checker.rebase(id, &mut node.mirror, meta.index);
                node.last_applied = meta.index;
                node.snapshots_installed += 1;
                node.pending.retain(|&i, _| i > meta.index);
            }
            if !ready.entries.is_empty() {
                self.checker.log_write(id, &mut node.mirror, &ready.entries);
            }
            let fsync = self
                .rng
                .range(self.config.fsync_ms.0, self.config.fsync_ms.1 + 1);
            let node = self.nodes.get_mut(&id).expect("known node");
            let at = (self.now + fsync).max(node.last_sync_at);
            node.last_sync_at = at;
            let incarnation = node.incarnation;
            let delay = at - self.now;
            self.checker.commit(id, commit, &node.mirror);
            if role == Role::Leader {
                self.checker.leader(id, term, &node.mirror);
            }
            for m in ready.messages.into_iter().chain(chunks) {
                self.transmit(m);
            }
            self.schedule(
                delay,
                EventKind::Persisted {
                    node: id,
                    incarnation,
                    ack: ready.ack,
                    messages: ready.persisted_messages,
                },
            );
            for entry in ready.committed_entries {
                self.apply(id, entry);
            }
            let node = self.nodes.get_mut(&id).expect("known node");
            for ticket in ready.failed_reads {
                if node.read_queries.remove(&ticket).is_some() {
                    self.read_results.insert(ticket, None);
                }
            }
            for r in ready.read_states {
                node.confirmed_reads.insert((r.index, r.ctx), ());
            }
            self.serve_reads(id);
        }
        self.maybe_snapshot(id, false);
        let node = self.nodes.get_mut(&id).expect("known node");
        let size = node.storage.persisted_size();
        node.peak_persisted = node
            .peak_persisted
            .max(size.log_bytes + size.snapshot_bytes);
    }

    /// Answers the confirmed reads of `id` whose index it has applied.
    fn serve_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        while let Some(entry) = node.confirmed_reads.first_entry() {
            let (index, ticket) = *entry.key();
            if index > node.last_applied {
                break;
            }
            entry.remove();
            if let Some(query) = node.read_queries.remove(&ticket) {
                let answer = node.machine.query(query.as_bytes());
                self.read_results.insert(ticket, answer);
            }
        }
    }

    /// Starts a local snapshot of `id` if one is due (or forced): the state machine's image is
    /// taken now, right after the last apply; it is "serialized" over a random virtual delay
    /// while the node keeps working. Returns true if one started.
    fn maybe_snapshot(&mut self, id: NodeId, force: bool) -> bool {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(core) = node.core.as_ref() else {
            return false;
        };
        let Some(meta) = node.policy.due(core, &node.storage, force) else {
            return false;
        };
        let mut bytes = Vec::new();
        node.machine
            .snapshot()
            .write_to(&mut bytes)
            .expect("test state machines serialize into memory");
        node.policy.started(meta);
        let incarnation = node.incarnation;
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
        true
    }

    fn snapshot_serialized(&mut self, id: NodeId, meta: SnapshotMeta, bytes: Vec<u8>) {
        let chunk = self.config.raft.snapshot_chunk_bytes.max(1) as usize;
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(core) = node.core.as_mut() else {
            return;
        };
        for piece in bytes.chunks(chunk) {
            node.policy
                .write(&mut node.storage, meta, piece)
                .unwrap_or_else(|e| panic!("node storage failed: {e}"));
        }
        if node
            .policy
            .finish(&mut node.storage, core, meta)
            .unwrap_or_else(|e| panic!("node storage failed: {e}"))
        {
            node.snapshots_taken += 1;
            self.checker.rebase(id, &mut node.mirror, meta.index);
        }
        self.process(id);
    }

    fn apply(&mut self, id: NodeId, entry: Entry) {
        let node = self.nodes.get_mut(&id).expect("known node");
        self.checker
            .apply(id, node.last_applied, &entry, &node.mirror);
        node.last_applied = entry.index;
        let command = match &entry.payload {
            EntryPayload::Command(c) => Some(c.clone()),
            EntryPayload::Noop => None,
        };
        let output = command
            .as_ref()
            .map(|c| node.machine.apply(entry.index, c.as_bytes()));
        node.applied.push(AppliedEntry {
            index: entry.index,
            term: entry.term,
            command: command.clone(),
        });
        // Resolve the proposal that was waiting for this slot, if any.
        let waiting: Vec<Index> = node
            .pending
            .range(..=entry.index)
            .map(|(i, _)| *i)
            .collect();
        for i in waiting {
            let (term, cmd) = node.pending.remove(&i).expect("listed");
            match (&output, i == entry.index && term == entry.term) {
                (Some(_), true) => {}
                _ => {
                    self.dropped += 1;
                    continue;
                }
            }
            let output = output.expect("checked above");
            self.acknowledged.push(Acknowledged {
                node: id,
                index: i,
                term,
                command: cmd,
                output,
            });
            break;
        }
    }

    /// Processes the next event. Returns false when nothing is scheduled.
    pub fn step(&mut self) -> bool {
        let Some(Reverse(ev)) = self.queue.pop() else {
            return false;
        };
        self.now = ev.at;
        self.steps += 1;
        match ev.kind {
            EventKind::Tick(id) => {
                if let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) {
                    core.tick();
                    self.process(id);
                }
                let every = self.config.tick_ms;
                self.schedule(every, EventKind::Tick(id));
            }
            EventKind::Process(id) => self.process(id),
            EventKind::SnapshotSerialized {
                node: id,
                incarnation,
                meta,
                bytes,
            } => {
                if self.nodes[&id].incarnation == incarnation {
                    self.snapshot_serialized(id, meta, bytes);
                }
            }
            EventKind::Deliver(m) => {
                let to = m.to;
                if let Some(core) = self.nodes.get_mut(&to).and_then(|n| n.core.as_mut()) {
                    core.step(m);
                    self.process(to);
                }
            }
            EventKind::Persisted {
                node: id,
                incarnation,
                ack,
                messages,
            } => {
                let node = self.nodes.get_mut(&id).expect("known node");
                if node.incarnation != incarnation || node.core.is_none() {
                    return true; // the node crashed before this fsync completed
                }
                node.storage
                    .sync()
                    .unwrap_or_else(|e| panic!("node storage failed: {e}"));
                node.core.as_mut().expect("checked").on_persisted(ack);
                for m in messages {
                    self.transmit(m);
                }
                self.process(id);
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
            if !self.queue.peek().is_some_and(|Reverse(e)| e.at <= end) {
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
        let term = self.core(leader)?.term();
        let agree = self
            .nodes
            .values()
            .filter_map(|n| n.core.as_ref())
            .filter(|c| c.term() == term && c.leader() == Some(leader))
            .count();
        (agree > self.config.nodes / 2).then_some(leader)
    }

    /// The live node in the leader role with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.core.as_ref().map(|c| (*id, c)))
            .filter(|(_, c)| c.role() == Role::Leader)
            .max_by_key(|(_, c)| c.term())
            .map(|(id, _)| id)
    }

    /// Proposes `command` on node `id` (which must think it is leader). The node hands out
    /// its work at the next step, so proposals made back to back go out in one batch.
    pub fn propose(
        &mut self,
        id: NodeId,
        command: impl Into<Payload>,
    ) -> Result<Proposed, CoreProposeError> {
        let command = command.into();
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(core) = node.core.as_mut() else {
            return Err(CoreProposeError::NotLeader { leader: None });
        };
        let proposed = core.propose(command.clone())?;
        node.pending
            .insert(proposed.index, (proposed.term, command));
        self.schedule(0, EventKind::Process(id));
        Ok(proposed)
    }

    /// Asks `id` for a linearizable read of `query` (ReadIndex). Returns a ticket; the answer
    /// shows up in [`Cluster::take_read_result`] once the read is confirmed and `id` applied
    /// far enough. A read on a node that crashes is never answered.
    pub fn read(&mut self, id: NodeId, query: impl Into<Payload>) -> Result<u64, CoreProposeError> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(core) = node.core.as_mut() else {
            return Err(CoreProposeError::NotLeader { leader: None });
        };
        self.next_read += 1;
        let ticket = self.next_read;
        core.read_index(ticket)?;
        node.read_queries.insert(ticket, query.into());
        self.schedule(0, EventKind::Process(id));
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

    /// Proposes on `id` and runs until the command is applied there (within `max_ms`).
    /// Returns its index and output, or `None` if it was refused, dropped or timed out.
    pub fn propose_and_wait(
        &mut self,
        id: NodeId,
        command: impl Into<Payload>,
        max_ms: u64,
    ) -> Option<(Index, M::Output)>
    where
        M::Output: Clone,
    {
        let p = self.propose(id, command).ok()?;
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
        let Some(core) = node.core.as_mut() else {
            return Err(CoreProposeError::NotLeader { leader: None });
        };
        core.transfer_leadership(to)?;
        self.schedule(0, EventKind::Process(id));
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

    /// Crashes node `id`: its volatile state is gone, its storage keeps only what was synced.
    pub fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        node.core = None;
        node.storage.power_loss(&mut self.rng);
        node.incarnation += 1;
        node.pending.clear();
        node.read_queries.clear();
        node.confirmed_reads.clear();
        node.last_sync_at = self.now;
    }

    /// Restarts a crashed node from its storage, with a fresh state machine from the factory.
    pub fn restart(&mut self, id: NodeId) {
        assert!(self.nodes[&id].core.is_none(), "node {id} is running");
        let machine = (self.factory)(id);
        self.nodes.get_mut(&id).expect("known node").machine = machine;
        self.boot(id);
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
