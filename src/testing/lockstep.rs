//! [`Lockstep`]: cores wired together by hand, for scripted, step-by-step scenarios.
//!
//! Unlike the [`Cluster`](super::Cluster) there is no time and no randomness: messages wait
//! in one FIFO queue until the test delivers them, every [`Ready`](crate::raft::Ready) is
//! persisted at once (so acknowledgements leave immediately) unless the test holds a node's
//! syncs, and a test can cut links or drop messages matching a predicate. This is the harness
//! for the scenario tests ported from etcd-io/raft and raft-rs style suites: elect, propose,
//! deliver, look at the state.
//!
//! Each node runs on the same [`Engine`] as the [`Node`](crate::Node) driver, and a script can
//! make the interleavings a batching host makes: [`Lockstep::step_only`] and
//! [`Lockstep::deliver_to`] step several messages before one round of `ready()`;
//! [`Lockstep::hold`] keeps a node's writes unsynced (its acknowledgements wait) while it goes
//! on stepping and writing, until [`Lockstep::release`] — or [`Lockstep::crash`] loses them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::error::ProposeError;
use crate::host::{Engine, Host, Observed};
use crate::raft::{
    Config, Entry, EntryPayload, HardState, Message, NodeId, Proposed, RaftCore, ReadState,
    SnapshotMeta, Term,
};
use crate::state_machine::{SnapshotSource, StateMachine};
use crate::storage::{MemStorage, Storage};

fn engine_config(configs: &BTreeMap<NodeId, Config>, id: NodeId) -> Config {
    configs.get(&id).expect("known node").clone()
}

/// The state machine of a scripted node: it applies nothing (the harness records the applied
/// entries themselves).
#[derive(Debug, Default)]
struct NullMachine;

impl StateMachine for NullMachine {
    type Output = ();
    fn apply(&mut self, _: crate::raft::Index, _: &[u8]) {}
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(Vec::new())
    }
    fn restore(&mut self, _: &mut dyn std::io::Read) -> std::io::Result<()> {
        Ok(())
    }
}

type ScriptEngine = Engine<MemStorage, NullMachine>;

/// What the harness records of one node's engine calls.
struct Recorder<'a> {
    id: NodeId,
    queue: &'a mut VecDeque<Message>,
    applied: &'a mut Vec<Entry>,
    installed: &'a mut Vec<(NodeId, SnapshotMeta)>,
    reads: &'a mut Vec<(NodeId, ReadState)>,
    failed_reads: &'a mut Vec<(NodeId, u64)>,
}

impl Host<MemStorage, ()> for Recorder<'_> {
    type Proposal = ();
    type Read = ();
    fn send(&mut self, _: &RaftCore, _: &MemStorage, messages: Vec<Message>) {
        self.queue.extend(messages);
    }
    fn proposal_done(&mut self, _: (), _: Proposed, _: Result<(), ProposeError>) {}
    fn read_done(&mut self, _: (), _: Result<(), ProposeError>) {}
    fn observe(&mut self, event: Observed<'_>) {
        match event {
            Observed::Applying { entry, .. } => self.applied.push(entry.clone()),
            Observed::SnapshotInstalled(meta) => {
                self.installed.push((self.id, meta));
                self.applied.clear(); // the state is now the snapshot's
            }
            Observed::ReadConfirmed(r) => self.reads.push((self.id, r)),
            Observed::ReadFailed(ctx) => self.failed_reads.push((self.id, ctx)),
            _ => {}
        }
    }
}

type Filter = Box<dyn FnMut(&Message) -> bool>;

/// Cores connected by a hand-driven network. See the [module docs](self).
///
/// ```
/// use raftkv::testing::Lockstep;
/// use raftkv::raft::Role;
///
/// let mut net = Lockstep::new(3, |_| {});
/// net.campaign(1);
/// assert_eq!(net.core(1).role(), Role::Leader);
/// net.propose(1, b"x").unwrap();
/// assert_eq!(net.core(1).commit_index(), 2); // the leader's no-op, then "x"
/// // Followers learn the commit index with the next append or heartbeat.
/// net.tick(1, 1);
/// net.stabilize();
/// assert_eq!(net.core(2).commit_index(), 2);
/// ```
pub struct Lockstep {
    engines: BTreeMap<NodeId, ScriptEngine>,
    /// Each node's configuration as built (restarts start from it).
    configs: BTreeMap<NodeId, Config>,
    /// Restarts so far, per node.
    starts: BTreeMap<NodeId, u64>,
    held: BTreeSet<NodeId>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    queue: VecDeque<Message>,
    cut: BTreeSet<(NodeId, NodeId)>,
    filter: Option<Filter>,
    delivered: Vec<Message>,
    installed: Vec<(NodeId, SnapshotMeta)>,
    reads: Vec<(NodeId, ReadState)>,
    failed_reads: Vec<(NodeId, u64)>,
}

impl Lockstep {
    /// `n` empty nodes (ids `1..=n`). `tune` adjusts each node's [`Config`] (it starts from
    /// [`Config::new`] with pre-vote and check-quorum off, as in the classic test suites).
    pub fn new(n: usize, tune: impl Fn(&mut Config)) -> Self {
        Self::with_logs(&vec![&[][..]; n], tune)
    }

    /// Nodes whose logs hold entries with the given terms (`logs[i]` for node `i + 1`); each
    /// node's current term is its last entry's term.
    pub fn with_logs(logs: &[&[Term]], tune: impl Fn(&mut Config)) -> Self {
        let voters: Vec<NodeId> = (1..=logs.len() as NodeId).collect();
        let mut net = Lockstep {
            engines: BTreeMap::new(),
            configs: BTreeMap::new(),
            starts: BTreeMap::new(),
            held: BTreeSet::new(),
            applied: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            filter: None,
            delivered: Vec::new(),
            installed: Vec::new(),
            reads: Vec::new(),
            failed_reads: Vec::new(),
        };
        for (i, terms) in logs.iter().enumerate() {
            let id = i as NodeId + 1;
            let mut storage = MemStorage::new();
            let entries: Vec<Entry> = terms
                .iter()
                .enumerate()
                .map(|(j, &term)| Entry {
                    index: j as u64 + 1,
                    term,
                    payload: EntryPayload::Noop,
                })
                .collect();
            let term = terms.last().copied().unwrap_or(0);
            storage
                .set_hard_state(HardState { term, vote: None })
                .and_then(|_| storage.append(&entries))
                .and_then(|_| storage.sync())
                .expect("memory storage");
            let mut cfg = Config::new(id, voters.clone());
            cfg.pre_vote = false;
            cfg.check_quorum = false;
            tune(&mut cfg);
            net.configs.insert(id, cfg.clone());
            let core = RaftCore::from_storage(cfg, &storage).expect("valid test setup");
            let engine = Engine::new(core, storage, NullMachine, None).expect("memory storage");
            net.engines.insert(id, engine);
            net.applied.insert(id, Vec::new());
        }
        net
    }

    /// Replaces node `id` with a core restored from its storage: a crash and restart. The
    /// storage keeps everything synced — everything, unless the node's syncs are
    /// [held](Lockstep::hold), whose unsynced writes are lost.
    pub fn restart(&mut self, id: NodeId) {
        let engine = self.engines.remove(&id).expect("known node");
        let (storage, _) = engine.into_parts();
        storage.crash();
        self.boot(id, engine_config(&self.configs, id), storage);
    }

    /// Node `id` lost its disk: it restarts from an empty storage (same id, same
    /// configuration), remembering nothing — term, vote and log are gone.
    pub fn wipe(&mut self, id: NodeId) {
        self.engines.remove(&id).expect("known node");
        self.boot(id, engine_config(&self.configs, id), MemStorage::new());
    }

    /// Node `id` lost its disk and restarts as a `Node` would: from an empty storage that its
    /// host treats as a lost disk ([`distrust_empty_storage`]), so it first asks every voter
    /// for its term and takes no part until all have answered. Collect the questions with
    /// [`Lockstep::stabilize`].
    ///
    /// [`distrust_empty_storage`]: crate::host::distrust_empty_storage
    pub fn lose_disk(&mut self, id: NodeId) {
        self.engines.remove(&id).expect("known node");
        self.start(
            id,
            engine_config(&self.configs, id),
            MemStorage::new(),
            false,
        );
    }

    fn boot(&mut self, id: NodeId, cfg: Config, storage: MemStorage) {
        self.start(id, cfg, storage, true);
    }

    /// Starts node `id` as a host does ([`start_core`](crate::host::start_core)); with
    /// `trust_empty`, an empty storage is taken as new.
    fn start(&mut self, id: NodeId, mut cfg: Config, mut storage: MemStorage, trust_empty: bool) {
        // Every start draws new randomness, as a real host does.
        let starts = self.starts.entry(id).or_insert(0);
        *starts += 1;
        cfg.seed = cfg
            .seed
            .wrapping_add(starts.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let core = crate::host::start_core(cfg, &mut storage, trust_empty).expect("restartable");
        let engine = Engine::new(core, storage, NullMachine, None).expect("memory storage");
        self.engines.insert(id, engine);
        self.held.remove(&id);
        self.applied.insert(id, Vec::new());
    }

    /// A crash of node `id` (an alias of [`Lockstep::restart`], to read well in scripts that
    /// [hold](Lockstep::hold) syncs): what it had not synced is lost, and it restarts.
    pub fn crash(&mut self, id: NodeId) {
        self.restart(id);
    }

    /// Holds node `id`'s syncs: from now on its output is written to storage but not synced,
    /// so what must wait for durability (votes, acknowledgements) stays queued inside it,
    /// while it goes on stepping and writing. Until [`Lockstep::release`].
    pub fn hold(&mut self, id: NodeId) {
        self.held.insert(id);
    }

    /// Syncs node `id`'s storage: the batches it wrote meanwhile complete, in order, and
    /// their held-back messages are queued. Its syncs are no longer held.
    pub fn release(&mut self, id: NodeId) {
        self.held.remove(&id);
        self.flush(id);
    }

    /// The core of node `id`.
    pub fn core(&self, id: NodeId) -> &RaftCore {
        self.engines[&id].core()
    }

    /// Mutable access to node `id`'s core (to tick it, step it or propose directly).
    /// Call [`Lockstep::flush`] or [`Lockstep::stabilize`] afterwards to collect its output.
    pub fn core_mut(&mut self, id: NodeId) -> &mut RaftCore {
        self.engines.get_mut(&id).expect("known node").core_mut()
    }

    /// Node `id`'s storage.
    pub fn storage(&self, id: NodeId) -> &MemStorage {
        self.engines[&id].storage()
    }

    /// Entries node `id` applied since it (re)started.
    pub fn applied(&self, id: NodeId) -> &[Entry] {
        &self.applied[&id]
    }

    /// Messages waiting for delivery.
    pub fn pending(&self) -> &VecDeque<Message> {
        &self.queue
    }

    /// Takes the messages waiting for delivery out of the network.
    pub fn take_pending(&mut self) -> Vec<Message> {
        self.queue.drain(..).collect()
    }

    /// Every message delivered so far, in order (tests count them).
    pub fn delivered(&self) -> &[Message] {
        &self.delivered
    }

    /// Forgets the record of delivered messages.
    pub fn clear_delivered(&mut self) {
        self.delivered.clear();
    }

    /// Drops every message for which `drop` returns true (replacing an earlier filter).
    pub fn drop_if(&mut self, drop: impl FnMut(&Message) -> bool + 'static) {
        self.filter = Some(Box::new(drop));
    }

    /// Removes the drop filter.
    pub fn clear_filter(&mut self) {
        self.filter = None;
    }

    /// Cuts the link in both directions.
    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    /// Cuts `id` from every other node.
    pub fn isolate(&mut self, id: NodeId) {
        let ids: Vec<NodeId> = self.engines.keys().copied().collect();
        for other in ids {
            if other != id {
                self.cut(id, other);
            }
        }
    }

    /// Restores every link and removes the filter.
    pub fn heal(&mut self) {
        self.cut.clear();
        self.filter = None;
    }

    /// Collects node `id`'s output: writes and (unless its syncs are held) syncs it,
    /// applies committed entries and queues its messages (in the order they may leave).
    pub fn flush(&mut self, id: NodeId) {
        let held = self.held.contains(&id);
        let engine = self.engines.get_mut(&id).expect("known node");
        let mut rec = Recorder {
            id,
            queue: &mut self.queue,
            applied: self.applied.get_mut(&id).expect("known node"),
            installed: &mut self.installed,
            reads: &mut self.reads,
            failed_reads: &mut self.failed_reads,
        };
        let done = if held {
            engine.advance(&mut rec)
        } else {
            engine.run(&mut rec)
        };
        done.expect("memory storage");
    }

    /// Node `id` snapshots its applied state (`data` stands for the state machine's bytes),
    /// stores it and compacts its log. Returns the snapshot's position.
    pub fn compact(&mut self, id: NodeId, data: &[u8]) -> SnapshotMeta {
        let engine = self.engines.get_mut(&id).expect("known node");
        let (core, storage) = engine.core_and_storage();
        let index = core.log().applied();
        let meta = SnapshotMeta {
            index,
            term: core.log().term(index).expect("applied entry is retained"),
        };
        storage.save_snapshot(meta, data).expect("memory storage");
        core.snapshot_saved(meta, data.len() as u64)
            .expect("snapshot of an applied entry");
        storage.compact(meta.index).expect("memory storage");
        meta
    }

    /// Confirmed linearizable reads so far, as `(node, read)`.
    pub fn read_states(&self) -> &[(NodeId, ReadState)] {
        &self.reads
    }

    /// Reads that failed so far, as `(node, ctx)`.
    pub fn failed_reads(&self) -> &[(NodeId, u64)] {
        &self.failed_reads
    }

    /// Snapshots installed from a leader so far, as `(node, meta)`.
    pub fn installed(&self) -> &[(NodeId, SnapshotMeta)] {
        &self.installed
    }

    /// Delivers one queued message (subject to cuts and the filter) and collects the
    /// receiver's output. Returns false when the queue is empty.
    pub fn deliver_one(&mut self) -> bool {
        let Some(m) = self.queue.pop_front() else {
            return false;
        };
        if self.cut.contains(&(m.from, m.to)) || self.filter.as_mut().is_some_and(|f| f(&m)) {
            return true;
        }
        let to = m.to;
        self.delivered.push(m.clone());
        if let Some(engine) = self.engines.get_mut(&to) {
            engine.core_mut().step(m);
            self.flush(to);
        }
        true
    }

    /// Steps `m` into its receiver without collecting the receiver's output: several messages
    /// stepped this way go out in one `ready()` at the next [`Lockstep::flush`] (as a host
    /// that batches its inbox does). Cuts and the filter apply.
    pub fn step_only(&mut self, m: Message) {
        if self.cut.contains(&(m.from, m.to)) || self.filter.as_mut().is_some_and(|f| f(&m)) {
            return;
        }
        self.delivered.push(m.clone());
        if let Some(engine) = self.engines.get_mut(&m.to) {
            engine.core_mut().step(m);
        }
    }

    /// Takes every queued message addressed to `id`, steps them all, then collects its
    /// output once (one batch, as a host that batches its inbox). Returns how many were
    /// taken from the queue.
    pub fn deliver_to(&mut self, id: NodeId) -> usize {
        let (mine, rest): (VecDeque<Message>, VecDeque<Message>) =
            self.queue.drain(..).partition(|m| m.to == id);
        self.queue = rest;
        let n = mine.len();
        for m in mine {
            self.step_only(m);
        }
        self.flush(id);
        n
    }

    /// Injects a message as if the network delivered it, then runs to quiescence.
    pub fn send(&mut self, m: Message) {
        self.queue.push_back(m);
        self.stabilize();
    }

    /// Collects every node's output and delivers messages until none are left.
    pub fn stabilize(&mut self) {
        let ids: Vec<NodeId> = self.engines.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
        let mut budget = 1_000_000;
        while self.deliver_one() {
            budget -= 1;
            assert!(budget > 0, "messages never stop flowing");
        }
    }

    /// Makes `id` campaign (as on an election timeout) and runs to quiescence.
    pub fn campaign(&mut self, id: NodeId) {
        self.core_mut(id).campaign();
        self.stabilize();
    }

    /// Ticks node `id` `n` times, collecting output after each tick (messages stay queued).
    pub fn tick(&mut self, id: NodeId, n: usize) {
        for _ in 0..n {
            self.core_mut(id).tick();
            self.flush(id);
        }
    }

    /// Proposes on node `id` and runs to quiescence.
    pub fn propose(
        &mut self,
        id: NodeId,
        command: impl Into<crate::raft::Payload>,
    ) -> Result<crate::raft::Proposed, crate::error::CoreProposeError> {
        let p = self.core_mut(id).propose(command.into())?;
        self.stabilize();
        Ok(p)
    }

    /// The snapshot boundary of node `id` (for tests of compaction).
    pub fn snapshot(&self, id: NodeId) -> SnapshotMeta {
        self.core(id).log().snapshot()
    }
}
