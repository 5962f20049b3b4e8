//! [`Engine`]: the one implementation of what a host does with the core's output.
//!
//! The node driver, the simulated cluster and the scripted harness all run a [`RaftCore`]
//! through this engine, so the code path tested is the code path users run. What differs
//! between hosts — how messages travel, when an fsync completes, how a local snapshot is
//! serialized, what a caller waiting for a proposal is — reaches the engine through the
//! [`Host`] callbacks and through *when* the host calls [`Engine::sync`].
//!
//! # How a host drives it
//! Step any number of inputs ([`Engine::core_mut`] + `step`/`tick`, [`Engine::propose`],
//! [`Engine::read`]), then call [`Engine::advance`]: it hands out every pending
//! [`Ready`](crate::raft::Ready) and carries each out up to its writes (see
//! [`Engine::advance`] for the order). Call [`Engine::sync`] when the host wants its fsync —
//! right away (a blocking host), or later while it keeps stepping and advancing (a host with
//! an fsync in flight). Nothing a batch must not claim before it is durable leaves before
//! the sync that covers it.
//!
//! Invariants: batches complete (`on_persisted`, then their held-back messages) strictly in
//! the order they were handed out; an entry reaches the state machine only once committed and
//! durable here, after any snapshot installed before it; a proposal is answered exactly once.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::events::{self, EngineCounters, Watched};
use super::snapshot::{read_header, restore_machine, snapshot_messages, SnapshotPolicy};
use super::sync::{PendingSync, WaitedSync};
use super::write::{write_ready, WriteProgress};
use crate::error::{NodeError, ProposeError, StorageError};
use crate::raft::{
    Entry, EntryPayload, Index, Message, Payload, PersistAck, Proposed, RaftCore, ReadState, Ready,
    SnapshotHeader, SnapshotMeta, Term,
};
use crate::state_machine::{SnapshotSource, StateMachine};
use crate::storage::Storage;

/// What the engine tells a host, and asks of it. Only [`Host::send`] and the two answers are
/// required; the rest lets a host observe (a simulation checks invariants there).
pub trait Host<S, O> {
    /// What the host keeps for a proposal until it is answered (a reply channel, say).
    type Proposal;
    /// What the host keeps for a read until it is answered.
    type Read;

    /// Messages to hand to the transport now, in order. `core` and `storage` are as they are
    /// at this moment (a checker may look at what the storage has made durable).
    fn send(&mut self, core: &RaftCore, storage: &S, messages: Vec<Message>);

    /// A proposal is settled: applied with its output, or failed.
    fn proposal_done(
        &mut self,
        ticket: Self::Proposal,
        at: Proposed,
        result: Result<O, ProposeError>,
    );

    /// A read is settled.
    fn read_done(&mut self, ticket: Self::Read, result: Result<O, ProposeError>);

    /// Something happened that a host may want to see.
    fn observe(&mut self, _event: Observed<'_>) {}

    /// A local snapshot is due: serialize `source` (off the host's critical path if it can)
    /// and feed the bytes back with [`Engine::local_snapshot_chunk`] and
    /// [`Engine::local_snapshot_done`]. Return false to decline (then no snapshot is taken).
    fn serialize_snapshot(
        &mut self,
        _meta: SnapshotMeta,
        _source: Box<dyn SnapshotSource>,
    ) -> bool {
        false
    }
}

/// What a [`Host`] may observe.
#[derive(Debug)]
pub enum Observed<'a> {
    /// Entries were written to storage (replacing everything from the first one on).
    LogWritten(&'a [Entry]),
    /// A snapshot received from the leader was installed and the state machine restored.
    SnapshotInstalled(SnapshotMeta),
    /// A local snapshot was stored and the log compacted behind it.
    SnapshotTaken(SnapshotMeta),
    /// A committed entry is about to be applied (commands go to the state machine, no-ops
    /// do not); `after` is the index applied before it.
    Applying {
        /// The entry.
        entry: &'a Entry,
        /// The index applied before it.
        after: Index,
    },
    /// Writes failed for lack of space; the batch is kept and retried.
    DiskFull(&'a StorageError),
    /// The core confirmed a read (reads the host asked of the core directly, not through
    /// [`Engine::read`], are seen only here).
    ReadConfirmed(ReadState),
    /// The core failed a read.
    ReadFailed(u64),
}

/// A batch written (or with nothing to write) that waits for a sync.
struct Unsynced {
    ack: PersistAck,
    messages: Vec<Message>,
}

/// A Ready whose writes stopped on a full disk, with how far they got.
struct Stalled {
    ready: Ready,
    progress: WriteProgress,
}

/// A core with its storage and state machine, carrying out the core's output.
///
/// Step any number of inputs ([`Engine::core_mut`] + `step`/`tick`, [`Engine::propose`],
/// [`Engine::read`]), then call [`Engine::advance`]: it hands out every pending
/// [`Ready`](crate::raft::Ready) and carries each out up to its writes. Call
/// [`Engine::sync`] (or [`Engine::sync_through`]) when the host wants its fsync — right away
/// (a blocking host; [`Engine::run`] does both until quiet), or later while it keeps stepping
/// and advancing (an fsync in flight). Nothing a batch must not claim before it is durable
/// leaves before the sync that covers it; batches complete strictly in order.
///
/// ```
/// use raftkv::host::{Engine, Host};
/// use raftkv::raft::{Config, Message, Proposed, RaftCore, Role};
/// use raftkv::storage::MemStorage;
/// use raftkv::error::ProposeError;
/// use raftkv::testing::RecordingMachine;
///
/// struct Printer(Vec<u64>);
/// impl Host<MemStorage, u64> for Printer {
///     type Proposal = ();
///     type Read = ();
///     fn send(&mut self, _: &RaftCore, _: &MemStorage, _: Vec<Message>) {}
///     fn proposal_done(&mut self, _: (), at: Proposed, r: Result<u64, ProposeError>) {
///         assert_eq!(r, Ok(at.index));
///         self.0.push(at.index);
///     }
///     fn read_done(&mut self, _: (), _: Result<u64, ProposeError>) {}
/// }
///
/// let core = RaftCore::new(Config::new(1, vec![1]), Default::default(), Default::default(), vec![]).unwrap();
/// let mut engine = Engine::new(core, MemStorage::new(), RecordingMachine::default(), None).unwrap();
/// let mut host = Printer(Vec::new());
/// while engine.core().role() != Role::Leader {
///     engine.core_mut().tick();
/// }
/// engine.propose(b"x".as_slice().into(), ()).map_err(|(e, _)| e).unwrap();
/// engine.run(&mut host).unwrap(); // advance, sync, advance... until quiet
/// assert_eq!(host.0, vec![2]); // the leader's no-op is 1
/// ```
pub struct Engine<S, M: StateMachine, P = (), R = ()> {
    core: RaftCore,
    storage: S,
    machine: M,
    policy: SnapshotPolicy,
    /// Batches handed out and not yet completed, oldest first.
    unsynced: VecDeque<Unsynced>,
    /// Batches completed and handed out so far (a host remembers a count to complete only
    /// through it).
    written: u64,
    completed: u64,
    stalled: Option<Stalled>,
    disk_full: Option<String>,
    /// A sync from `start_sync` is not finished yet.
    sync_started: bool,
    /// The state machine holds everything through here (applied, restored, or durable in
    /// its own storage).
    applied: Index,
    /// Entries through here are already in the state machine's own durable state.
    skip_through: Index,
    /// Waiting proposals by index, ascending (appended at the back: a leader's indexes grow).
    proposals: VecDeque<(Index, Term, P)>,
    reads: HashMap<u64, (Payload, R)>,
    /// Confirmed reads waiting for the apply index: (index, ctx).
    confirmed_reads: BTreeMap<(Index, u64), ()>,
    next_read: u64,
    counters: EngineCounters,
    watched: Watched,
}

impl<S: Storage, M: StateMachine, P, R> Engine<S, M, P, R> {
    /// An engine for `core`, restored from `storage`: the state machine is rebuilt from the
    /// stored snapshot, unless it keeps its own durable state that is at least as recent
    /// (then replay starts after what it holds). `max_log_bytes` is the automatic snapshot
    /// threshold ([`SnapshotPolicy`]); the core's log is limited to twice that
    /// ([`RaftCore::set_log_limit`]), so the log a node keeps stays bounded whatever the
    /// load.
    pub fn new(
        mut core: RaftCore,
        storage: S,
        mut machine: M,
        max_log_bytes: Option<u64>,
    ) -> Result<Self, NodeError> {
        let init = storage.initial_state()?;
        let durable = machine.durable_index().unwrap_or(0);
        if init.snapshot.index > durable {
            restore_machine(&storage, &mut machine, init.snapshot_size)
                .map_err(NodeError::Restore)?;
        }
        let applied = durable.max(init.snapshot.index);
        core.set_applied(applied);
        // Room for the log to grow while a snapshot taken at the threshold is written.
        core.set_log_limit(max_log_bytes.map(|max| max.saturating_mul(2)));
        let watched = Watched::new(&core);
        Ok(Engine {
            core,
            storage,
            machine,
            policy: SnapshotPolicy::new(max_log_bytes),
            unsynced: VecDeque::new(),
            written: 0,
            completed: 0,
            stalled: None,
            disk_full: None,
            sync_started: false,
            applied,
            skip_through: durable,
            proposals: VecDeque::new(),
            reads: HashMap::new(),
            confirmed_reads: BTreeMap::new(),
            next_read: 0,
            counters: EngineCounters::default(),
            watched,
        })
    }

    /// What the engine counted since it started.
    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    /// Reports (as events and counters) what changed in the core's visible state.
    fn watch(&mut self) {
        let disk_full = self.disk_full.is_some();
        self.watched
            .update(&self.core, disk_full, &mut self.counters);
    }

    fn send<H>(&mut self, host: &mut H, messages: Vec<Message>)
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        if !messages.is_empty() {
            self.counters.messages_sent += messages.len() as u64;
            host.send(&self.core, &self.storage, messages);
        }
    }

    // ----- access ----------------------------------------------------------------------------

    /// The core.
    pub fn core(&self) -> &RaftCore {
        &self.core
    }
    /// The core, to step, tick or campaign it. Call [`Engine::advance`] afterwards.
    pub fn core_mut(&mut self) -> &mut RaftCore {
        &mut self.core
    }
    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }
    /// The storage, for host operations outside the Raft flow (a manual snapshot in a test).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }
    /// The core and the storage together.
    pub fn core_and_storage(&mut self) -> (&mut RaftCore, &mut S) {
        (&mut self.core, &mut self.storage)
    }
    /// The state machine.
    pub fn machine(&self) -> &M {
        &self.machine
    }
    /// The snapshot policy (bound, counters).
    pub fn policy(&self) -> &SnapshotPolicy {
        &self.policy
    }
    /// Highest index the state machine holds.
    pub fn applied(&self) -> Index {
        self.applied
    }
    /// The full-disk error, while writes fail for lack of space.
    pub fn disk_full(&self) -> Option<&str> {
        self.disk_full.as_deref()
    }
    /// Gives back the storage and the state machine (the node stopped).
    pub fn into_parts(self) -> (S, M) {
        (self.storage, self.machine)
    }

    /// True while batches wait for a [`Engine::sync`].
    pub fn needs_sync(&self) -> bool {
        !self.unsynced.is_empty()
    }
    /// Whether an answer here waits only on other nodes: a proposal whose entry is durable
    /// here already (it waits for acknowledgements), or a read (it waits for a heartbeat
    /// round). Only then does a host gain from stepping while its fsync runs; otherwise it
    /// may as well wait for the fsync itself (the `Node` then saves two thread hand-offs).
    pub fn awaits_peers(&self) -> bool {
        !self.reads.is_empty()
            || self
                .proposals
                .front()
                .is_some_and(|(index, _, _)| *index <= self.core.log().persisted())
    }

    /// How many batches have been handed out so far (pass it to [`Engine::sync_through`]).
    pub fn batches_written(&self) -> u64 {
        self.written
    }

    // ----- inputs ----------------------------------------------------------------------------

    /// Proposals taken and not answered yet (each is answered exactly once, through
    /// [`Host::proposal_done`], or handed back by [`Engine::take_expired`] or
    /// [`Engine::take_all_waiting`]).
    pub fn waiting_proposals(&self) -> usize {
        self.proposals.len()
    }

    /// Proposes `command`; `ticket` comes back through [`Host::proposal_done`]. Refused at
    /// once, with the ticket handed back, when this node does not lead, is busy, the command
    /// is too large, or the disk is full.
    pub fn propose(&mut self, command: Payload, ticket: P) -> Result<Proposed, (ProposeError, P)> {
        if self.disk_full.is_some() {
            self.counters.proposals_refused += 1;
            return Err((ProposeError::NoSpace, ticket));
        }
        match self.core.propose(command) {
            Ok(p) => {
                self.counters.proposals += 1;
                self.insert_proposal(p, ticket);
                Ok(p)
            }
            Err(e) => {
                self.counters.proposals_refused += 1;
                Err((e.into(), ticket))
            }
        }
    }

    /// Keeps `ticket` for the proposal at `p`, in `(index, term)` order. A leader's indexes
    /// only grow, so this appends; only a node that lost and regained leadership (its log cut
    /// back) can propose at or below a proposal still waiting from an older term. Both wait
    /// then: the older one's slot was taken, and it is answered `Dropped` when the entry that
    /// took it is applied (see `apply`). Never replaced: every ticket is answered once.
    fn insert_proposal(&mut self, p: Proposed, ticket: P) {
        let key = (p.index, p.term);
        match self.proposals.back() {
            Some((i, t, _)) if (*i, *t) >= key => {
                let at = self.proposals.partition_point(|(i, t, _)| (*i, *t) <= key);
                self.proposals.insert(at, (p.index, p.term, ticket));
            }
            _ => self.proposals.push_back((p.index, p.term, ticket)),
        }
    }

    /// Asks for a linearizable read of `query` ([`StateMachine::query`]); `ticket` comes back
    /// through [`Host::read_done`]. Refused at once, with the ticket handed back, when no
    /// leader is known.
    pub fn read(&mut self, query: Payload, ticket: R) -> Result<(), (ProposeError, R)> {
        self.next_read += 1;
        let ctx = self.next_read;
        match self.core.read_index(ctx) {
            Ok(()) => {
                self.reads.insert(ctx, (query, ticket));
                Ok(())
            }
            Err(e) => {
                self.counters.reads_failed += 1;
                Err((e.into(), ticket))
            }
        }
    }

    /// Removes the proposals and reads whose tickets `expired` says are expired, and
    /// returns them (the host answers them, with a timeout say). They are never answered
    /// through the [`Host`] afterwards.
    pub fn take_expired(
        &mut self,
        mut proposal_expired: impl FnMut(&P) -> bool,
        mut read_expired: impl FnMut(&R) -> bool,
    ) -> (Vec<P>, Vec<R>) {
        let mut proposals = Vec::new();
        let mut kept = VecDeque::with_capacity(self.proposals.len());
        for (index, term, p) in self.proposals.drain(..) {
            if proposal_expired(&p) {
                proposals.push(p);
            } else {
                kept.push_back((index, term, p));
            }
        }
        self.proposals = kept;
        let gone: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, (_, r))| read_expired(r))
            .map(|(c, _)| *c)
            .collect();
        let reads = gone
            .iter()
            .filter_map(|c| self.reads.remove(c).map(|(_, r)| r))
            .collect();
        let reads_left = &self.reads;
        self.confirmed_reads
            .retain(|(_, ctx), _| reads_left.contains_key(ctx));
        (proposals, reads)
    }

    /// Takes every proposal and read still waiting (the node stops).
    pub fn take_all_waiting(&mut self) -> (Vec<P>, Vec<R>) {
        self.confirmed_reads.clear();
        (
            std::mem::take(&mut self.proposals)
                .into_iter()
                .map(|(_, _, p)| p)
                .collect(),
            self.reads.drain().map(|(_, (_, r))| r).collect(),
        )
    }

    // ----- processing ------------------------------------------------------------------------

    /// Hands out and carries out every pending batch of the core, up to its writes. For each
    /// [`Ready`], in this order:
    ///
    /// 1. messages that may leave at once are sent, with the snapshot chunks a leader
    ///    streams (read from storage);
    /// 2. failed reads are answered; confirmed reads wait for their index to be applied;
    /// 3. the durable part is written ([`write_ready`]'s order: hard state, snapshot chunks,
    ///    install, entries, end of a tail-loss recovery) — not synced, except that an install
    ///    syncs itself;
    /// 4. an installed snapshot is restored into the state machine (before any entry after
    ///    it is applied); proposals it covers get [`ProposeError::Timeout`] (their outcome
    ///    is unknown here);
    /// 5. the batch's acknowledgement and held-back messages wait for the sync that covers
    ///    it (or complete at once when nothing is unsynced before them);
    /// 6. committed entries (already durable here) are applied and proposals answered;
    /// 7. reads whose index is now applied are served.
    ///
    /// A batch whose writes hit a full disk is kept and retried first at the next call;
    /// nothing newer is handed out meanwhile (so nothing is acknowledged), and proposals are
    /// refused with [`ProposeError::NoSpace`]. Any other storage error is fatal.
    pub fn advance<H>(&mut self, host: &mut H) -> Result<(), NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        let result = self.advance_inner(host);
        self.watch();
        result
    }

    fn advance_inner<H>(&mut self, host: &mut H) -> Result<(), NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        if let Some(stalled) = self.stalled.take() {
            self.finish(host, stalled.ready, stalled.progress)?;
            if self.stalled.is_some() {
                return Ok(());
            }
        }
        while self.core.has_ready() {
            let mut ready = self.core.ready();
            self.counters.batches += 1;
            let mut now = std::mem::take(&mut ready.messages);
            let requests = std::mem::take(&mut ready.snapshot_requests);
            for r in requests.iter().filter(|r| r.offset == 0) {
                events::snapshot_sending(self.core.id(), r.to, r.meta, r.size);
            }
            now.extend(snapshot_messages(&self.storage, self.core.id(), requests)?);
            self.send(host, now);
            for ctx in std::mem::take(&mut ready.failed_reads) {
                host.observe(Observed::ReadFailed(ctx));
                if let Some((_, ticket)) = self.reads.remove(&ctx) {
                    self.counters.reads_failed += 1;
                    let leader = self.core.leader();
                    host.read_done(ticket, Err(ProposeError::NotLeader { leader }));
                }
            }
            for r in std::mem::take(&mut ready.read_states) {
                host.observe(Observed::ReadConfirmed(r));
                if self.reads.contains_key(&r.ctx) {
                    self.confirmed_reads.insert((r.index, r.ctx), ());
                }
            }
            if !ready.snapshot_chunks.is_empty() {
                self.policy.abandon(); // the leader's snapshot takes the incoming slot
            }
            self.finish(host, ready, WriteProgress::default())?;
            if self.stalled.is_some() {
                return Ok(());
            }
        }
        self.maybe_snapshot(host, false);
        Ok(())
    }

    /// Steps 3 to 7 of [`Engine::advance`] for one batch.
    fn finish<H>(
        &mut self,
        host: &mut H,
        mut ready: Ready,
        mut progress: WriteProgress,
    ) -> Result<(), NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        // A batch that rewrites the stored log (a conflicting suffix replaced, a snapshot
        // installed over it) must not become durable before the batches still waiting for a
        // sync have sent what they hold back: their acknowledgements speak of the log as it
        // was, and the sync that covers them would cover the rewrite too.
        if !self.unsynced.is_empty() && self.rewrites_log(&ready) && !self.sync(host)? {
            self.stalled = Some(Stalled { ready, progress });
            return Ok(());
        }
        if ready.must_persist() {
            match write_ready(&mut self.storage, &ready, &mut progress) {
                Ok(()) => {}
                Err(e @ StorageError::NoSpace { .. }) => {
                    host.observe(Observed::DiskFull(&e));
                    self.full_disk(&e);
                    self.stalled = Some(Stalled { ready, progress });
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(meta) = ready.install_snapshot {
                host.observe(Observed::SnapshotInstalled(meta));
            }
            if !ready.entries.is_empty() {
                let n = ready.entries.len() as u64;
                self.counters.entries_written += n;
                self.counters.max_batch_entries = self.counters.max_batch_entries.max(n);
                host.observe(Observed::LogWritten(&ready.entries));
            }
        }
        if let Some(meta) = ready.install_snapshot {
            let size = self.storage.initial_state()?.snapshot_size;
            restore_machine(&self.storage, &mut self.machine, size).map_err(NodeError::Restore)?;
            if let (Some(m), _) = read_header(&self.storage)? {
                self.core.set_snapshot_membership(meta, m);
            }
            self.counters.snapshots_installed += 1;
            self.counters.snapshot_bytes_installed += size;
            events::snapshot_installed(self.core.id(), meta, size);
            self.skip_through = 0;
            self.applied = meta.index;
            self.policy.installed += 1;
            // Proposals below the snapshot will never be applied here.
            while self
                .proposals
                .front()
                .is_some_and(|(i, _, _)| *i <= meta.index)
            {
                let Some((index, term, ticket)) = self.proposals.pop_front() else {
                    break;
                };
                host.proposal_done(ticket, Proposed { index, term }, Err(ProposeError::Timeout));
            }
        }
        self.written += 1;
        self.unsynced.push_back(Unsynced {
            ack: ready.ack,
            messages: std::mem::take(&mut ready.persisted_messages),
        });
        if !ready.must_persist() && self.unsynced.len() == 1 {
            // Nothing to make durable, and nothing unsynced before it: complete at once.
            self.complete(host, self.written);
        }
        for entry in std::mem::take(&mut ready.committed_entries) {
            self.apply(host, entry);
        }
        self.serve_reads(host);
        Ok(())
    }

    /// True if writing `ready` replaces part of the stored log.
    fn rewrites_log(&self, ready: &Ready) -> bool {
        ready.install_snapshot.is_some()
            || ready
                .entries
                .first()
                .is_some_and(|e| e.index <= self.storage.last_index())
    }

    /// Syncs the storage and completes every batch written so far. Returns false if the
    /// sync failed for lack of space (the batches stay waiting; try again later).
    pub fn sync<H>(&mut self, host: &mut H) -> Result<bool, NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        let written = self.written;
        self.sync_through(host, written)
    }

    /// Syncs the storage and completes the first `batches` batches (a count from
    /// [`Engine::batches_written`] taken when the host's fsync started; batches handed out
    /// since wait for a later sync even though this one may have covered them). Returns false
    /// if the sync failed for lack of space.
    pub fn sync_through<H>(&mut self, host: &mut H, batches: u64) -> Result<bool, NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        if self.unsynced.is_empty() {
            return Ok(true);
        }
        match self.storage.sync() {
            Ok(()) => {
                self.synced(host, batches);
                Ok(true)
            }
            Err(e @ StorageError::NoSpace { .. }) => {
                self.out_of_space(host, &e);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A sync covering the first `batches` batches succeeded: they complete.
    fn synced<H>(&mut self, host: &mut H, batches: u64)
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        self.counters.syncs += 1;
        if self.stalled.is_none() {
            self.disk_full = None;
        }
        self.complete(host, batches);
        self.watch();
    }

    /// A sync (or its start) failed for lack of space: the batches stay waiting.
    fn out_of_space<H>(&mut self, host: &mut H, e: &StorageError)
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        host.observe(Observed::DiskFull(e));
        self.full_disk(e);
        self.watch();
    }

    /// Starts the sync of every batch written so far without waiting for the device: the
    /// storage's buffered writes go to the operating system now ([`Storage::start_sync`]),
    /// and the wait comes back for the host to run where blocking is allowed (see
    /// [`PendingSync`]). Meanwhile the host keeps stepping and advancing; batches handed out
    /// after this wait for the next sync. `None`: nothing waits for a sync, a started one is
    /// not finished yet, or the disk is full (see [`Engine::disk_full`]; try again later).
    ///
    /// ```
    /// use raftkv::host::{Engine, Host};
    /// use raftkv::raft::{Config, Message, Proposed, RaftCore, Role};
    /// use raftkv::storage::MemStorage;
    /// use raftkv::error::ProposeError;
    /// use raftkv::testing::RecordingMachine;
    ///
    /// struct Answers(Vec<u64>);
    /// impl Host<MemStorage, u64> for Answers {
    ///     type Proposal = ();
    ///     type Read = ();
    ///     fn send(&mut self, _: &RaftCore, _: &MemStorage, _: Vec<Message>) {}
    ///     fn proposal_done(&mut self, _: (), at: Proposed, _: Result<u64, ProposeError>) {
    ///         self.0.push(at.index);
    ///     }
    ///     fn read_done(&mut self, _: (), _: Result<u64, ProposeError>) {}
    /// }
    ///
    /// let core = RaftCore::new(Config::new(1, vec![1]), Default::default(), Default::default(), vec![]).unwrap();
    /// let mut engine = Engine::new(core, MemStorage::new(), RecordingMachine::default(), None).unwrap();
    /// let mut host = Answers(Vec::new());
    /// while engine.core().role() != Role::Leader {
    ///     engine.core_mut().tick();
    /// }
    /// engine.run(&mut host).unwrap();
    /// engine.propose(b"x".as_slice().into(), ()).map_err(|(e, _)| e).unwrap();
    /// engine.advance(&mut host).unwrap(); // entry 2 written, not yet durable
    /// let pending = engine.start_sync(&mut host).unwrap().expect("a batch waits");
    /// let waited = std::thread::spawn(move || pending.wait()).join().unwrap();
    /// assert!(host.0.is_empty(), "nothing is answered before its sync finishes");
    /// assert!(engine.finish_sync(&mut host, waited).unwrap());
    /// engine.advance(&mut host).unwrap(); // applies what is now durable and committed
    /// assert_eq!(host.0, vec![2]);
    /// ```
    pub fn start_sync<H>(&mut self, host: &mut H) -> Result<Option<PendingSync>, NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        if self.sync_started || self.unsynced.is_empty() {
            return Ok(None);
        }
        let wait = match self.storage.start_sync() {
            Ok(wait) => wait,
            Err(e @ StorageError::NoSpace { .. }) => {
                self.out_of_space(host, &e);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        self.sync_started = true;
        Ok(Some(PendingSync {
            batches: self.written,
            wait,
        }))
    }

    /// Finishes a sync from [`Engine::start_sync`] after its wait: the batches written
    /// before it started complete (their held-back messages go to [`Host::send`]). Returns
    /// false if the sync failed for lack of space (possible only for a storage that cannot
    /// split its sync: it syncs here instead); the batches then stay waiting. Any other
    /// failure, the wait's own included, is fatal.
    pub fn finish_sync<H>(&mut self, host: &mut H, waited: WaitedSync) -> Result<bool, NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        self.sync_started = false;
        let Some(result) = waited.waited else {
            return self.sync_through(host, waited.batches);
        };
        self.storage.finish_sync(result)?;
        self.synced(host, waited.batches);
        Ok(true)
    }

    fn full_disk(&mut self, e: &StorageError) {
        if self.disk_full.is_none() {
            events::disk_full(self.core.id(), e);
        }
        self.disk_full = Some(e.to_string());
    }

    fn complete<H>(&mut self, host: &mut H, through: u64)
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        while self.completed < through {
            let Some(batch) = self.unsynced.pop_front() else {
                break;
            };
            self.completed += 1;
            self.core.on_persisted(batch.ack);
            self.send(host, batch.messages);
        }
    }

    /// Advances, syncs and advances again until the core has nothing more to do (a host
    /// whose fsync blocks). Stops early when the disk is full.
    pub fn run<H>(&mut self, host: &mut H) -> Result<(), NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        loop {
            self.advance(host)?;
            if self.stalled.is_some() || !self.needs_sync() {
                return Ok(());
            }
            if !self.sync(host)? {
                return Ok(());
            }
        }
    }

    fn apply<H>(&mut self, host: &mut H, entry: Entry)
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        host.observe(Observed::Applying {
            entry: &entry,
            after: self.applied,
        });
        let output = match &entry.payload {
            EntryPayload::Command(c) if entry.index > self.skip_through => {
                Some(self.machine.apply(entry.index, c.as_bytes()))
            }
            _ => None,
        };
        self.applied = entry.index;
        self.counters.applied += 1;
        // Answer the proposal that waited for this slot; fail those whose slots were taken
        // by other entries.
        let mut output = output;
        while self
            .proposals
            .front()
            .is_some_and(|(i, _, _)| *i <= entry.index)
        {
            let Some((index, term, ticket)) = self.proposals.pop_front() else {
                break;
            };
            let at = Proposed { index, term };
            if index == entry.index && term == entry.term {
                match output.take() {
                    Some(out) => host.proposal_done(ticket, at, Ok(out)),
                    // Already in the state machine's own durable state: its output is gone.
                    None => host.proposal_done(ticket, at, Err(ProposeError::Timeout)),
                }
                break;
            }
            host.proposal_done(ticket, at, Err(ProposeError::Dropped));
        }
    }

    /// Answers the confirmed reads whose index the state machine has applied.
    fn serve_reads<H>(&mut self, host: &mut H)
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        while let Some(entry) = self.confirmed_reads.first_entry() {
            let (index, ctx) = *entry.key();
            if index > self.applied {
                break;
            }
            entry.remove();
            if let Some((query, ticket)) = self.reads.remove(&ctx) {
                let answer = self
                    .machine
                    .query(query.as_bytes())
                    .ok_or(ProposeError::Unsupported);
                self.counters.reads_served += 1;
                host.read_done(ticket, answer);
            }
        }
    }

    // ----- local snapshots -------------------------------------------------------------------

    /// Starts a local snapshot now if one is due (or `force`d): the state machine's image is
    /// taken right after the last apply and handed to [`Host::serialize_snapshot`]. Returns
    /// the snapshot's position if one started.
    pub fn maybe_snapshot<H>(&mut self, host: &mut H, force: bool) -> Option<SnapshotMeta>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        if self.policy.in_progress().is_some() {
            return None;
        }
        let meta = self.policy.due(&self.core, force)?;
        let source = self.machine.snapshot();
        self.policy.started(meta);
        // The configuration in effect at the snapshot's index leads its bytes.
        let header = SnapshotHeader::encode(self.core.log().configs().at(meta.index));
        if let Err(e) = self.policy.write(&mut self.storage, meta, &header) {
            self.policy.abandon();
            if let StorageError::NoSpace { .. } = e {
                self.full_disk(&e);
            }
            return None;
        }
        if host.serialize_snapshot(meta, source) {
            Some(meta)
        } else {
            self.policy.abandon();
            None
        }
    }

    /// Serialized bytes of the local snapshot `meta`, in order (ignored if it was abandoned).
    pub fn local_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        data: &[u8],
    ) -> Result<(), NodeError> {
        Ok(self.policy.write(&mut self.storage, meta, data)?)
    }

    /// The local snapshot `meta` is fully serialized (`Ok`) or failed to serialize: installs
    /// it and compacts the log behind it. Returns true if it was installed.
    pub fn local_snapshot_done<H>(
        &mut self,
        host: &mut H,
        meta: SnapshotMeta,
        result: Result<(), String>,
    ) -> Result<bool, NodeError>
    where
        H: Host<S, M::Output, Proposal = P, Read = R>,
    {
        if result.is_err() {
            // The state machine's own error: no snapshot this time; the log stays longer.
            if self.policy.in_progress() == Some(meta) {
                self.policy.abandon();
            }
            return Ok(false);
        }
        let installed = self
            .policy
            .finish(&mut self.storage, &mut self.core, meta)?;
        if installed {
            let bytes = self.core.snapshot_size();
            self.counters.snapshots_taken += 1;
            self.counters.snapshot_bytes_taken += bytes;
            events::snapshot_taken(self.core.id(), meta, bytes);
            host.observe(Observed::SnapshotTaken(meta));
        }
        self.watch();
        Ok(installed)
    }
}
