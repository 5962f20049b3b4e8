//! The node thread: owns the [`Engine`] (core, storage, state machine) and feeds it the
//! commands that arrive, ticks, deadlines and the bytes of local snapshots serialized on
//! background threads. Everything the core's output asks for is carried out by the engine, in
//! the order its contract prescribes (see the [parent module](super)); what is the node's own
//! is here: channels, wall-clock time, status, replies.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use super::inbox::Inbox;
use super::metrics::{NodeMetrics, Timed};
use super::outbound::Outbound;
use super::reply::{ReplyTo, Waiting};
use super::syncer::Syncer;
use super::{Command, NodeConfig, Shared};
use crate::error::{NodeError, ProposeError};
use crate::host::{Engine, Host, PendingSync};
use crate::raft::{Message, Proposed, RaftCore, SnapshotMeta};
use crate::state_machine::{SnapshotSource, StateMachine};
use crate::storage::Storage;

/// An answer to deliver: where, and what.
type Answer<O> = (ReplyTo<O>, Result<O, ProposeError>);

/// The node's side of the engine's callbacks.
struct NodeHost<O> {
    outbound: Outbound,
    shared: Arc<Shared>,
    /// Answers to send once the status is published.
    answers: Vec<Answer<O>>,
    /// Read answers (they leave as soon as the engine returns: a read does not change the
    /// status).
    read_answers: Vec<Answer<O>>,
    /// Handed to snapshot threads so they can deliver their bytes.
    self_inbox: Arc<Inbox<Command<O>>>,
    chunk_bytes: usize,
}

impl<S, O: Send + 'static> Host<S, O> for NodeHost<O> {
    type Proposal = Waiting<O>;
    type Read = Waiting<O>;

    fn send(&mut self, _core: &RaftCore, _storage: &S, messages: Vec<Message>) {
        // A full outbox means the driver future is not keeping up: drop, Raft resends.
        if !self.outbound.send(messages) {
            self.shared
                .gauges
                .outbox_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn proposal_done(&mut self, w: Waiting<O>, _at: Proposed, result: Result<O, ProposeError>) {
        self.answers.push((w.to, result));
    }

    fn read_done(&mut self, w: Waiting<O>, result: Result<O, ProposeError>) {
        self.read_answers.push((w.to, result));
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
                let _ = inbox.push_unbounded(Command::LocalDone(meta, result));
            })
            .is_ok()
    }
}

/// The engine as the node runs it: storage with timed syncs, callers waiting.
type NodeEngine<S, M> =
    Engine<Timed<S>, M, Waiting<<M as StateMachine>::Output>, Waiting<<M as StateMachine>::Output>>;

/// Everything the node thread (or task) owns.
pub(super) struct Worker<S, M: StateMachine> {
    engine: NodeEngine<S, M>,
    host: NodeHost<M::Output>,
    inbox: Arc<Inbox<Command<M::Output>>>,
    /// Commands taken from the inbox; `commands[next..]` are still to handle.
    commands: Vec<Command<M::Output>>,
    next: usize,
    next_tick: Instant,
    /// The clock, read once per round (deadlines of the round's commands count from it).
    now: Instant,
    shared: Arc<Shared>,
    snapshot_waiters: Vec<oneshot::Sender<Option<SnapshotMeta>>>,
    /// Membership changes waiting to settle.
    changes: Vec<super::membership::Pending>,
    config: NodeConfig,
    /// A sync's wait is on the fsync thread; its result comes back as `Command::Synced`.
    sync_in_flight: bool,
    fsync_thread: FsyncThread,
}

/// The node's fsync thread, started with the first sync that blocks.
enum FsyncThread {
    NotStarted,
    Running(Syncer),
    /// It could not be started: the node thread waits for its syncs itself.
    Unavailable,
}

/// At most this many commands are handled per round (bounds the batch).
const MAX_COMMANDS_PER_ROUND: usize = 4096;

enum Flow {
    Continue,
    Stop,
}

impl<S: Storage, M: StateMachine> Worker<S, M> {
    /// Restores the engine (state machine from the stored snapshot, replay after what it
    /// holds) around `core`.
    pub(super) fn new(
        core: RaftCore,
        storage: S,
        machine: M,
        inbox: Arc<Inbox<Command<M::Output>>>,
        outbound: Outbound,
        shared: Arc<Shared>,
        config: NodeConfig,
    ) -> Result<Self, NodeError> {
        let storage = Timed::new(storage);
        let engine = Engine::new(core, storage, machine, config.max_log_bytes)?;
        let now = Instant::now();
        Ok(Worker {
            engine,
            host: NodeHost {
                outbound,
                shared: shared.clone(),
                answers: Vec::new(),
                read_answers: Vec::new(),
                self_inbox: inbox.clone(),
                chunk_bytes: config.raft.snapshot_chunk_bytes as usize,
            },
            inbox,
            commands: Vec::new(),
            next: 0,
            next_tick: now + config.tick_interval,
            now,
            shared,
            snapshot_waiters: Vec::new(),
            changes: Vec::new(),
            config,
            sync_in_flight: false,
            fsync_thread: FsyncThread::NotStarted,
        })
    }

    /// The node thread: waits for commands (spinning for `spin` first) or the next tick.
    pub(super) fn run_blocking(mut self, spin: Duration) {
        let fatal = loop {
            if self.next >= self.commands.len() {
                self.commands.clear();
                self.next = 0;
                self.inbox
                    .wait_blocking(&mut self.commands, self.next_tick, spin);
            }
            match self.round() {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break None,
                Err(e) => break Some(e),
            }
        };
        self.finish(fatal);
    }

    /// The node as a task: the same rounds, each started by a push to the inbox or a tick
    /// (the ticker thread notifies the inbox every tick). After each round the task yields,
    /// so clients on the same executor run (and queue more for the next round).
    pub(super) fn run_task(self) -> impl Future<Output = ()> + Send
    where
        S: Send + 'static,
    {
        let mut this = Some(self);
        futures::future::poll_fn(move |cx| {
            let Some(w) = this.as_mut() else {
                return Poll::Ready(());
            };
            if w.next >= w.commands.len() {
                w.commands.clear();
                w.next = 0;
                let tick_due = Instant::now() >= w.next_tick;
                if w.inbox.poll_take(cx, &mut w.commands).is_pending() && !tick_due {
                    return Poll::Pending;
                }
            }
            let fatal = match w.round() {
                Ok(Flow::Continue) => {
                    // Yield: the clients on this executor run (and queue more for the next
                    // round) before we look again.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Ok(Flow::Stop) => None,
                Err(e) => Some(e),
            };
            if let Some(w) = this.take() {
                w.finish(fatal);
            }
            Poll::Ready(())
        })
    }

    /// One round: up to [`MAX_COMMANDS_PER_ROUND`] taken commands, a tick if due, the engine
    /// until quiet, the status, the answers.
    fn round(&mut self) -> Result<Flow, NodeError> {
        self.now = Instant::now();
        let end = self.commands.len().min(self.next + MAX_COMMANDS_PER_ROUND);
        let mut flow = Flow::Continue;
        while self.next < end {
            let cmd = std::mem::replace(&mut self.commands[self.next], Command::Nothing);
            self.next += 1;
            if let Flow::Stop = self.handle(cmd)? {
                flow = Flow::Stop;
                break;
            }
        }
        if self.next >= self.commands.len() {
            self.commands.clear();
            self.next = 0;
        }
        if let Flow::Stop = flow {
            return Ok(Flow::Stop);
        }
        let now = self.now;
        if now >= self.next_tick {
            self.engine.core_mut().tick();
            // Keep the phase (a task's ticks come from a timer thread that is not in step
            // with it: `now + interval` would let every other notification pass and double
            // the tick), but never run behind by more than one tick.
            self.next_tick += self.config.tick_interval;
            if self.next_tick <= now {
                self.next_tick = now + self.config.tick_interval;
            }
            self.expire(now);
        }
        // A batch that hit a full disk is retried here first, at every round (so at least
        // every tick), before anything newer.
        let processed = self.drive();
        self.send_read_answers();
        self.settle_changes(now);
        // The status is published before the answers leave, so that a caller who got an
        // answer sees a status at least as recent.
        self.publish_status(None, true);
        for (reply, answer) in self.host.answers.drain(..) {
            reply.send(answer);
        }
        processed.map(|()| Flow::Continue)
    }

    /// Advances the engine until it is quiet, with its syncs: a sync whose wait blocks goes to
    /// the fsync thread (the node keeps stepping; the batches it covers complete when
    /// `Command::Synced` comes back) when answers wait on other nodes meanwhile
    /// ([`Engine::awaits_peers`]); otherwise, and for a wait that does not block, the node
    /// thread waits and finishes it at once.
    fn drive(&mut self) -> Result<(), NodeError> {
        loop {
            self.engine.advance(&mut self.host)?;
            if self.sync_in_flight {
                return Ok(());
            }
            let Some(pending) = self.engine.start_sync(&mut self.host)? else {
                return Ok(()); // nothing to sync, or a full disk (retried next round)
            };
            // Handed off only when stepping during the fsync can answer someone sooner.
            let pending = if pending.blocks() && self.engine.awaits_peers() {
                match self.hand_off(pending) {
                    Ok(()) => return Ok(()),
                    Err(pending) => pending,
                }
            } else {
                pending
            };
            let waited = pending.wait();
            if !self.engine.finish_sync(&mut self.host, waited)? {
                return Ok(());
            }
        }
    }

    /// Gives a blocking sync to the fsync thread (started on first use). Gives it back when
    /// there is no thread: the node thread then waits itself.
    fn hand_off(&mut self, pending: PendingSync) -> Result<(), PendingSync> {
        if let FsyncThread::NotStarted = self.fsync_thread {
            self.fsync_thread = match Syncer::start(self.inbox.clone()) {
                Ok(syncer) => FsyncThread::Running(syncer),
                Err(e) => {
                    tracing::warn!(
                        target: "raftkv::node",
                        node = self.engine.core().id(),
                        error = %e,
                        "no fsync thread; the node thread waits for its syncs"
                    );
                    FsyncThread::Unavailable
                }
            };
        }
        let FsyncThread::Running(syncer) = &self.fsync_thread else {
            return Err(pending);
        };
        syncer.send(pending)?;
        self.sync_in_flight = true;
        Ok(())
    }

    fn finish(mut self, fatal: Option<NodeError>) {
        if let Some(e) = &fatal {
            tracing::error!(
                target: "raftkv::node",
                node = self.engine.core().id(),
                error = %e,
                "node stopped on a fatal error"
            );
        }
        self.inbox.close();
        // Commands taken but not handled: their callers learn the node stopped.
        for cmd in self.commands.drain(self.next..) {
            if !matches!(
                cmd,
                Command::LocalChunk(..)
                    | Command::LocalDone(..)
                    | Command::Synced(..)
                    | Command::Shutdown
            ) {
                self.shared.gauges.taken();
            }
        }
        self.publish_status(fatal.map(|e| e.to_string()), false);
        let (proposals, reads) = self.engine.take_all_waiting();
        for w in proposals.into_iter().chain(reads) {
            w.to.send(Err(ProposeError::Shutdown));
        }
        for w in self.snapshot_waiters.drain(..) {
            let _ = w.send(None);
        }
        for c in self.changes.drain(..) {
            let _ = c.reply.send(Err(crate::error::MembershipError::Timeout));
        }
        self.host.outbound.close();
        // The storage (with its directory lock) and the state machine go before anyone hears
        // of the stop: whoever awaits `shutdown` may open the same directory next.
        let shared = self.shared.clone();
        drop(self);
        for tx in shared.stopped.lock().drain(..) {
            let _ = tx.send(());
        }
    }

    fn send_read_answers(&mut self) {
        for (reply, answer) in self.host.read_answers.drain(..) {
            reply.send(answer);
        }
    }

    fn handle(&mut self, cmd: Command<M::Output>) -> Result<Flow, NodeError> {
        // Counted when the handle queued it (snapshot threads' and shutdown commands are not).
        if !matches!(
            cmd,
            Command::LocalChunk(..)
                | Command::LocalDone(..)
                | Command::Synced(..)
                | Command::Shutdown
                | Command::Nothing
        ) {
            self.shared.gauges.taken();
        }
        let deadline = || self.now + self.config.propose_timeout;
        match cmd {
            Command::Step(m) => self.engine.core_mut().step(m),
            Command::Propose(data, reply) => {
                let w = Waiting {
                    to: ReplyTo::One(reply),
                    deadline: deadline(),
                };
                if let Err((e, w)) = self.engine.propose(data, w) {
                    w.to.send(Err(e));
                }
            }
            Command::ProposeMany(commands, reply) => {
                let deadline = deadline();
                for (slot, data) in ReplyTo::batch(commands.len(), reply).zip(commands) {
                    let w = Waiting { to: slot, deadline };
                    if let Err((e, w)) = self.engine.propose(data, w) {
                        w.to.send(Err(e));
                    }
                }
            }
            Command::Read(query, reply) => {
                let w = Waiting {
                    to: ReplyTo::One(reply),
                    deadline: deadline(),
                };
                if let Err((e, w)) = self.engine.read(query, w) {
                    w.to.send(Err(e));
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
                        deadline: self.now + self.config.propose_timeout,
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
            Command::Synced(waited) => {
                self.sync_in_flight = false;
                self.engine.finish_sync(&mut self.host, waited)?;
            }
            Command::Shutdown => return Ok(Flow::Stop),
            Command::Nothing => {}
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
            .take_expired(|w| w.deadline <= now, |w| w.deadline <= now);
        for w in proposals.into_iter().chain(reads) {
            w.to.send(Err(ProposeError::Timeout));
        }
    }

    pub(super) fn publish_status(&self, fatal: Option<String>, running: bool) {
        let mut s = self.shared.status.lock();
        let raft = self.engine.core().status();
        let changed = raft.role != s.raft.role
            || raft.term != s.raft.term
            || raft.leader != s.raft.leader
            || running != s.running;
        s.raft = raft;
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
        if changed || s.fatal_error.is_some() {
            for w in self.shared.role_waiters.lock().drain(..) {
                let _ = w.send(());
            }
        }
    }
}

impl<S, M: StateMachine> Drop for Worker<S, M> {
    /// A node task whose driver future the host dropped unfinished still closes its inbox:
    /// the ticker thread stops, and later commands fail with [`ProposeError::Shutdown`].
    fn drop(&mut self) {
        self.inbox.close();
    }
}

/// Cuts a state machine's serialized snapshot into chunks for the node thread.
struct ChunkWriter<O> {
    inbox: Arc<Inbox<Command<O>>>,
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
            .push_waiting(Command::LocalChunk(self.meta, data))
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
