//! The node thread: owns the [`Engine`] (core, storage, state machine) and feeds it the
//! commands that arrive, ticks, deadlines and the bytes of local snapshots serialized on
//! background threads. Everything the core's output asks for is carried out by the engine, in
//! the order its contract prescribes (see the [parent module](super)); what is the node's own
//! is here: channels, wall-clock time, status, replies.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use futures::channel::{mpsc as fmpsc, oneshot};

use super::metrics::{NodeMetrics, Timed};
use super::{Answer, Command, NodeConfig, Reply, Shared};
use crate::error::{NodeError, ProposeError};
use crate::host::{Engine, Host};
use crate::raft::{Message, Proposed, RaftCore, SnapshotMeta};
use crate::state_machine::{SnapshotSource, StateMachine};
use crate::storage::Storage;

/// A waiting caller: its reply and its deadline.
type Waiting<O> = (Reply<O>, Instant);

/// The node's side of the engine's callbacks.
struct NodeHost<O> {
    outbox: fmpsc::Sender<Vec<Message>>,
    shared: Arc<Shared>,
    /// Answers to send once the status is published.
    answers: Vec<Answer<O>>,
    /// Read answers (they leave as soon as the engine returns: a read does not change the
    /// status).
    read_answers: Vec<Answer<O>>,
    /// Handed to snapshot threads so they can deliver their bytes.
    self_inbox: SyncSender<Command<O>>,
    chunk_bytes: usize,
}

impl<S, O: Send + 'static> Host<S, O> for NodeHost<O> {
    type Proposal = Waiting<O>;
    type Read = Waiting<O>;

    fn send(&mut self, _core: &RaftCore, _storage: &S, messages: Vec<Message>) {
        // A full outbox means the driver future is not keeping up: drop, Raft resends.
        if self.outbox.try_send(messages).is_err() {
            self.shared
                .gauges
                .outbox_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn proposal_done(
        &mut self,
        (reply, _): Waiting<O>,
        _at: Proposed,
        result: Result<O, ProposeError>,
    ) {
        self.answers.push((reply, result));
    }

    fn read_done(&mut self, (reply, _): Waiting<O>, result: Result<O, ProposeError>) {
        self.read_answers.push((reply, result));
    }

    /// Serializes on a background thread that feeds the bytes back through the inbox.
    fn serialize_snapshot(&mut self, meta: SnapshotMeta, source: Box<dyn SnapshotSource>) -> bool {
        let inbox = self.self_inbox.clone();
        let chunk = self.chunk_bytes;
        std::thread::Builder::new()
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
            })
            .is_ok()
    }
}

/// The engine as the node thread runs it: storage with timed syncs, callers waiting.
type NodeEngine<S, M> =
    Engine<Timed<S>, M, Waiting<<M as StateMachine>::Output>, Waiting<<M as StateMachine>::Output>>;

/// Everything the node thread owns.
pub(super) struct Worker<S, M: StateMachine> {
    engine: NodeEngine<S, M>,
    host: NodeHost<M::Output>,
    commands: mpsc::Receiver<Command<M::Output>>,
    shared: Arc<Shared>,
    snapshot_waiters: Vec<oneshot::Sender<Option<SnapshotMeta>>>,
    /// Membership changes waiting to settle.
    changes: Vec<super::membership::Pending>,
    config: NodeConfig,
}

/// At most this many commands are taken from the inbox per loop iteration (bounds the batch).
const MAX_COMMANDS_PER_ROUND: usize = 4096;

enum Flow {
    Continue,
    Stop,
}

impl<S: Storage, M: StateMachine> Worker<S, M> {
    /// Restores the engine (state machine from the stored snapshot, replay after what it
    /// holds) around `core`.
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
    ) -> Result<Self, NodeError> {
        let storage = Timed {
            inner: storage,
            fsync: Default::default(),
        };
        let engine = Engine::new(core, storage, machine, config.max_log_bytes)?;
        Ok(Worker {
            engine,
            host: NodeHost {
                outbox,
                shared: shared.clone(),
                answers: Vec::new(),
                read_answers: Vec::new(),
                self_inbox,
                chunk_bytes: config.raft.snapshot_chunk_bytes as usize,
            },
            commands,
            shared,
            snapshot_waiters: Vec::new(),
            changes: Vec::new(),
            config,
        })
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
                self.engine.core_mut().tick();
                next_tick = now + self.config.tick_interval;
                self.expire(now);
            }
            // A batch that hit a full disk is retried here first, at every loop (so at least
            // every tick), before anything newer.
            let processed = self.engine.run(&mut self.host);
            self.send_read_answers();
            self.settle_changes(now);
            // The status is published before the answers leave, so that a caller who got an
            // answer sees a status at least as recent.
            self.publish_status(None, true);
            for (reply, answer) in self.host.answers.drain(..) {
                let _ = reply.send(answer);
            }
            if let Err(e) = processed {
                break Some(e);
            }
        };
        if let Some(e) = &fatal {
            tracing::error!(
                target: "raftkv::node",
                node = self.engine.core().id(),
                error = %e,
                "node stopped on a fatal error"
            );
        }
        self.publish_status(fatal.map(|e| e.to_string()), false);
        let (proposals, reads) = self.engine.take_all_waiting();
        for (reply, _) in proposals.into_iter().chain(reads) {
            let _ = reply.send(Err(ProposeError::Shutdown));
        }
        for w in self.snapshot_waiters.drain(..) {
            let _ = w.send(None);
        }
        for c in self.changes.drain(..) {
            let _ = c.reply.send(Err(crate::error::MembershipError::Timeout));
        }
        self.host.outbox.close_channel();
        for tx in self.shared.stopped.lock().drain(..) {
            let _ = tx.send(());
        }
    }

    fn send_read_answers(&mut self) {
        for (reply, answer) in self.host.read_answers.drain(..) {
            let _ = reply.send(answer);
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
        // Counted when the handle queued it (snapshot threads' and shutdown commands are not).
        if !matches!(
            cmd,
            Command::LocalChunk(..) | Command::LocalDone(..) | Command::Shutdown
        ) {
            self.shared.gauges.taken();
        }
        match cmd {
            Command::Step(m) => self.engine.core_mut().step(m),
            Command::Propose(data, reply) => {
                let deadline = Instant::now() + self.config.propose_timeout;
                if let Err((e, (reply, _))) = self.engine.propose(data, (reply, deadline)) {
                    let _ = reply.send(Err(e));
                }
            }
            Command::Read(query, reply) => {
                let deadline = Instant::now() + self.config.propose_timeout;
                if let Err((e, (reply, _))) = self.engine.read(query, (reply, deadline)) {
                    let _ = reply.send(Err(e));
                }
            }
            Command::ChangeMembership(change, reply) => {
                let core = self.engine.core_mut();
                let proposed = change
                    .target(core.membership())
                    .and_then(|(voters, learners)| core.change_membership(voters, learners));
                match proposed {
                    Ok(at) => self.changes.push(super::membership::Pending {
                        at,
                        reply,
                        deadline: Instant::now() + self.config.propose_timeout,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Transfer(to, reply) => {
                let result = self
                    .engine
                    .core_mut()
                    .transfer_leadership(to)
                    .map_err(ProposeError::from);
                let _ = reply.send(result);
            }
            Command::Snapshot(reply) => match self.engine.maybe_snapshot(&mut self.host, true) {
                Some(_) => self.snapshot_waiters.push(reply),
                None => {
                    let _ = reply.send(None);
                }
            },
            Command::LocalChunk(meta, data) => self.engine.local_snapshot_chunk(meta, &data)?,
            Command::LocalDone(meta, result) => {
                let installed = self
                    .engine
                    .local_snapshot_done(&mut self.host, meta, result)?;
                let answer = installed.then_some(meta);
                for w in self.snapshot_waiters.drain(..) {
                    let _ = w.send(answer);
                }
            }
            Command::Backup(super::backup::Request::Snapshot { at_least, reply }) => {
                let stored = self.engine.core().log().snapshot();
                if stored.index >= at_least {
                    let _ = reply.send(Some(stored));
                } else if self.engine.policy().in_progress().is_some()
                    || self.engine.maybe_snapshot(&mut self.host, true).is_some()
                {
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
            }) => super::backup::serve_read(self.engine.storage(), meta, offset, len, reply),
            Command::Shutdown => return Ok(Flow::Stop),
        }
        Ok(Flow::Continue)
    }

    /// Answers the membership changes that settled (or expired).
    fn settle_changes(&mut self, now: Instant) {
        let core = self.engine.core();
        let mut i = 0;
        while i < self.changes.len() {
            let outcome = self.changes[i].settled(core).or_else(|| {
                (self.changes[i].deadline <= now)
                    .then_some(Err(crate::error::MembershipError::Timeout))
            });
            match outcome {
                Some(result) => {
                    let pending = self.changes.swap_remove(i);
                    let _ = pending.reply.send(result);
                }
                None => i += 1,
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let (proposals, reads) = self
            .engine
            .take_expired(|(_, d)| *d <= now, |(_, d)| *d <= now);
        for (reply, _) in proposals.into_iter().chain(reads) {
            let _ = reply.send(Err(ProposeError::Timeout));
        }
    }

    pub(super) fn publish_status(&self, fatal: Option<String>, running: bool) {
        let mut s = self.shared.status.lock();
        s.raft = self.engine.core().status();
        s.persisted = self.engine.storage().persisted_size();
        if fatal.is_some() {
            s.fatal_error = fatal;
        }
        s.running = running;
        s.disk_full = self.engine.disk_full().map(str::to_owned);
        s.snapshots_taken = self.engine.policy().taken;
        s.snapshots_installed = self.engine.policy().installed;
        s.recovering = self.engine.core().recovering();
        s.membership = self.engine.core().membership().clone();
        let gauges = &self.shared.gauges;
        s.metrics = NodeMetrics {
            counters: *self.engine.counters(),
            fsync: self.engine.storage().fsync.clone(),
            inbox_depth: gauges.inbox.load(std::sync::atomic::Ordering::Relaxed),
            outbox_dropped: gauges
                .outbox_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        };
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
