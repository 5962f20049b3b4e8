//! The node thread: owns the core, the storage and the state machine, and works through the
//! core's output in the order the [`Ready`] contract prescribes (see the [parent module](super)).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use futures::channel::{mpsc as fmpsc, oneshot};

use super::{Answer, Command, NodeConfig, Reply, Shared};
use crate::error::{NodeError, ProposeError, StorageError};
use crate::host::{self, SnapshotPolicy, WriteProgress};
use crate::raft::{EntryPayload, Index, Message, Payload, RaftCore, Ready, SnapshotMeta, Term};
use crate::state_machine::StateMachine;
use crate::storage::Storage;

/// Everything the node thread owns.
pub(super) struct Worker<S, M: StateMachine> {
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
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        core: RaftCore,
        storage: S,
        machine: M,
        commands: mpsc::Receiver<Command<M::Output>>,
        self_inbox: SyncSender<Command<M::Output>>,
        outbox: fmpsc::Sender<Vec<Message>>,
        shared: Arc<Shared>,
        config: NodeConfig,
    ) -> Self {
        Worker {
            core,
            storage,
            machine,
            commands,
            self_inbox,
            outbox,
            pending: BTreeMap::new(),
            shared,
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
        }
    }

    /// Start-up: rebuilds the state machine from the stored snapshot, unless it keeps its own
    /// durable state that is at least as recent; then replay starts after what it holds.
    pub(super) fn restore(&mut self) -> Result<(), NodeError> {
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

    pub(super) fn run(mut self) {
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
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
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
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Transfer(to, reply) => {
                let result = self
                    .core
                    .transfer_leadership(to)
                    .map_err(ProposeError::from);
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
            Command::Backup(super::backup::Request::Snapshot { at_least, reply }) => {
                let stored = self.core.log().snapshot();
                if stored.index >= at_least {
                    let _ = reply.send(Some(stored));
                } else if self.policy.in_progress().is_some() || self.maybe_snapshot(true) {
                    self.snapshot_waiters.push(reply); // answered when it is installed
                } else {
                    let _ = reply.send(None);
                }
            }
            Command::Backup(super::backup::Request::Read {
                meta,
                offset,
                len,
                reply,
            }) => super::backup::serve_read(&self.storage, meta, offset, len, reply),
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
        let timed_out = |deadline: &Instant| *deadline <= now;
        let proposals: Vec<Index> = self
            .pending
            .iter()
            .filter(|(_, p)| timed_out(&p.2))
            .map(|(i, _)| *i)
            .collect();
        let reads: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| timed_out(&r.2))
            .map(|(c, _)| *c)
            .collect();
        let replies = proposals
            .iter()
            .filter_map(|i| self.pending.remove(i).map(|p| p.1))
            .chain(
                reads
                    .iter()
                    .filter_map(|c| self.reads.remove(c).map(|r| r.1)),
            )
            .collect::<Vec<_>>();
        for reply in replies {
            let _ = reply.send(Err(ProposeError::Timeout));
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

    pub(super) fn publish_status(&self, fatal: Option<String>, running: bool) {
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
