//! [`RaftCore`]: the Raft consensus rules as a deterministic, IO-free state machine.
//!
//! Inputs: [`RaftCore::step`] (a message from a peer), [`RaftCore::tick`] (time passes),
//! [`RaftCore::propose`] (a client command), [`RaftCore::read_index`] (a linearizable read).
//! Output: [`RaftCore::ready`] hands out a [`Ready`] batch: state and entries to persist,
//! messages to send (some at once, some only once the batch is durable), and committed entries
//! to apply. The host reports durability back with [`RaftCore::on_persisted`]. A host may step
//! any number of inputs before one `ready()`, and may hand out further batches before an
//! earlier one is durable; the core's output stays correct under every such interleaving.
//!
//! Rules kept here (Raft paper, Figure 2, plus §9.6 of the thesis):
//! - a node adopts any higher term it sees, and then forgets its vote;
//! - a vote is granted at most once per term, and only to a candidate whose log is at least as
//!   up to date;
//! - a leader never overwrites its log; followers replace a conflicting suffix;
//! - a leader commits only entries of its own term by counting replicas (Figure 8); earlier
//!   entries commit with them;
//! - pre-vote: a node campaigns in a new term only after a majority says it would vote for it;
//! - check-quorum: a leader steps down when it has not heard from a majority for an election
//!   timeout, and a node that heard from a leader within that time refuses vote requests.
//!
//! Durability ordering (see [`Ready`]): vote grants, append acknowledgements and anything of a
//! new term leave only after the state they depend on is durable; a leader's own entries count
//! toward commit only once the host reported them durable.
//!
//! State that belongs to one role lives inside that role (see `role.rs`): a role or term
//! change drops it by construction.

use super::config::Config;
use super::log::RaftLog;
use super::progress::Progress;
use super::ready::{
    PersistAck, Proposed, ReadState, Ready, SnapshotChunk, SnapshotChunkRequest, Status,
};
use super::recovery::Recovery;
use super::rng::Rng;
use super::role::{Election, Follower, Leader, RoleState};
use super::{
    Entry, EntryPayload, HardState, Index, Membership, Message, MessageBody, NodeId, Payload,
    SnapshotMeta, Term,
};
use crate::error::CoreProposeError;
use crate::storage::TailLoss;

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking peers whether they would vote, without changing term.
    PreCandidate,
    /// Campaigning in its own term.
    Candidate,
    /// Leads the current term.
    Leader,
}

/// Whether a queued message must wait for durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dispatch {
    Now,
    AfterPersist,
}

/// The Raft state machine of one node. See the [module docs](self).
///
/// ```
/// use raftkv::raft::{Config, RaftCore, Role, SnapshotMeta};
///
/// // A single-node cluster elects itself on its first election timeout.
/// let mut core = RaftCore::new(Config::new(1, vec![1]), Default::default(), SnapshotMeta::default(), vec![]).unwrap();
/// for _ in 0..20 { core.tick(); }
/// assert_eq!(core.role(), Role::Leader);
/// let ready = core.ready();
/// assert_eq!(ready.entries.len(), 1); // the leader's no-op, to be persisted
/// core.on_persisted(ready.ack);
/// assert_eq!(core.commit_index(), 1);
/// ```
#[derive(Debug)]
pub struct RaftCore {
    pub(super) cfg: Config,
    pub(super) term: Term,
    pub(super) vote: Option<NodeId>,
    /// The role, with the state only that role keeps.
    pub(super) state: RoleState,
    pub(super) leader: Option<NodeId>,
    pub(super) log: RaftLog,
    pub(super) election_elapsed: u32,
    pub(super) randomized_election_timeout: u32,
    pub(super) rng: Rng,
    pub(super) msgs: Vec<(Dispatch, Message)>,
    /// Hard state as last handed out in a `Ready`.
    pub(super) hard_state_handed: HardState,
    /// Size of the stored snapshot.
    pub(super) snapshot_size: u64,
    /// Pending output: chunk requests (leader), received chunks and install (follower).
    pub(super) snapshot_requests: Vec<SnapshotChunkRequest>,
    pub(super) snapshot_chunks: Vec<SnapshotChunk>,
    pub(super) install_snapshot: Option<SnapshotMeta>,
    /// Pending output: confirmed and failed reads of this node's host.
    pub(super) read_states: Vec<ReadState>,
    pub(super) failed_reads: Vec<u64>,
    /// Wire id of the next read forwarded to a leader. It starts at a random point drawn per
    /// incarnation, so an answer meant for an earlier incarnation never matches.
    pub(super) next_read_id: u64,
    /// The highest term known durable (reported through `on_persisted`).
    pub(super) durable_term: Term,
    /// Set while this node recovers from a lost log tail (see `recovery.rs`).
    pub(super) recovery: Option<Recovery>,
    /// Pending output: the recovery finished; the host clears the storage's record.
    pub(super) recovery_done: bool,
    /// Bound on the retained log's bytes (see [`RaftCore::set_log_limit`]).
    pub(super) log_limit: Option<u64>,
    /// The configuration in effect is the bootstrap one from `Config::voters`, not stored
    /// anywhere yet: the first leader writes it into the log (instead of its no-op), so that
    /// a restart with other voters cannot change it.
    pub(super) bootstrap_config: bool,
}

impl RaftCore {
    /// A core resuming from durable state with no snapshot: `hard_state` and the log
    /// `entries` from index 1 (all durable). A new node passes defaults and no entries.
    ///
    /// A node whose storage holds a snapshot must be restored with [`RaftCore::restore`] (or
    /// [`RaftCore::from_storage`]), which takes the snapshot's size too: a core that knew a
    /// snapshot but not its size would stream an empty snapshot to followers. Passing a
    /// snapshot here is refused.
    pub fn new(
        cfg: Config,
        hard_state: HardState,
        snapshot: SnapshotMeta,
        entries: Vec<Entry>,
    ) -> Result<Self, String> {
        if snapshot.index > 0 {
            return Err(format!(
                "a core resuming from the snapshot at {} needs its size: use RaftCore::restore",
                snapshot.index
            ));
        }
        Self::restore(cfg, hard_state, snapshot, 0, entries)
    }

    /// A core resuming from durable state: `hard_state`, the stored `snapshot` of
    /// `snapshot_size` bytes (`SnapshotMeta::default()` and 0 when there is none) and the log
    /// `entries` that follow it (all durable).
    pub fn restore(
        cfg: Config,
        hard_state: HardState,
        snapshot: SnapshotMeta,
        snapshot_size: u64,
        entries: Vec<Entry>,
    ) -> Result<Self, String> {
        cfg.validate()?;
        if entries
            .iter()
            .enumerate()
            .any(|(i, e)| e.index != snapshot.index + 1 + i as u64)
        {
            return Err("restored entries do not follow the snapshot contiguously".into());
        }
        let mut last_term = snapshot.term;
        for e in &entries {
            if e.term < last_term {
                return Err(format!(
                    "restored log: the term goes down at index {}",
                    e.index
                ));
            }
            last_term = e.term;
        }
        if hard_state.term < last_term {
            return Err(format!(
                "restored state: current term {} is below the last entry's term {last_term}",
                hard_state.term
            ));
        }
        // Drawn from its own generator so that the election timeouts do not depend on it.
        let next_read_id = Rng::new(cfg.seed ^ 0x5EAD_1D5E_ED00_0000).next_u64();
        let mut log = RaftLog::restore(snapshot, entries);
        log.set_base_membership(Membership::voters(cfg.voters.iter().copied()));
        let mut core = RaftCore {
            rng: Rng::new(cfg.seed),
            cfg,
            term: hard_state.term,
            vote: hard_state.vote,
            state: RoleState::Follower(Follower::default()),
            leader: None,
            log,
            election_elapsed: 0,
            randomized_election_timeout: 0,
            msgs: Vec::new(),
            hard_state_handed: hard_state,
            snapshot_size,
            snapshot_requests: Vec::new(),
            snapshot_chunks: Vec::new(),
            install_snapshot: None,
            read_states: Vec::new(),
            failed_reads: Vec::new(),
            next_read_id,
            durable_term: hard_state.term,
            recovery: None,
            recovery_done: false,
            log_limit: None,
            bootstrap_config: false,
        };
        core.bootstrap_config = core.log.configs().current_index() == 0;
        core.reset_election_timer();
        Ok(core)
    }

    /// Restores a core from what `storage` holds (reads the whole retained log once),
    /// including a [`TailLoss`] the storage reports.
    pub fn from_storage<S: crate::storage::Storage>(
        cfg: Config,
        storage: &S,
    ) -> Result<Self, crate::error::StorageError> {
        let init = storage.initial_state()?;
        let entries = storage.entries(init.first_index, init.last_index + 1, u64::MAX)?;
        let mut core = RaftCore::restore(
            cfg,
            init.hard_state,
            init.snapshot,
            init.snapshot_size,
            entries,
        )
        .map_err(crate::error::StorageError::Invalid)?;
        if let (Some(m), _) = crate::host::read_header(storage)? {
            core.set_snapshot_membership(init.snapshot, m);
        }
        if let Some(loss) = storage.tail_loss() {
            core.recover_from(loss);
        }
        Ok(core)
    }

    // ----- accessors -------------------------------------------------------------------------

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.state.role()
    }
    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }
    /// Vote in the current term.
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }
    /// The leader this node knows of in the current term.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// Current hard state.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
        }
    }
    /// Commit index.
    pub fn commit_index(&self) -> Index {
        self.log.commit()
    }
    /// The log.
    pub fn log(&self) -> &RaftLog {
        &self.log
    }
    /// A follower's progress (leader only).
    pub fn progress(&self, peer: NodeId) -> Option<&Progress> {
        self.leader_state()?.progress.get(&peer)
    }
    /// The current randomized election timeout, in ticks.
    pub fn election_timeout(&self) -> u32 {
        self.randomized_election_timeout
    }
    /// Externally visible state.
    pub fn status(&self) -> Status {
        Status {
            id: self.cfg.id,
            role: self.role(),
            term: self.term,
            vote: self.vote,
            leader: self.leader,
            commit_index: self.log.commit(),
            applied_index: self.log.applied(),
            persisted_index: self.log.persisted(),
            last_index: self.log.last_index(),
            snapshot: self.log.snapshot(),
        }
    }

    /// The configuration in effect (the latest in the log).
    pub fn membership(&self) -> &Membership {
        self.log.membership()
    }

    /// True if the configuration in effect is stored (in the log or the snapshot), false while
    /// it is still the bootstrap one from [`Config::voters`].
    pub fn membership_is_stored(&self) -> bool {
        !self.bootstrap_config
    }

    /// True if this node votes in the configuration in effect.
    pub fn is_voter(&self) -> bool {
        self.membership().is_voter(self.cfg.id)
    }

    /// True if this node is the only voter (it commits and confirms reads alone).
    pub(super) fn single_voter(&self) -> bool {
        let m = self.membership();
        m.has_quorum(|id| id == self.cfg.id)
    }

    /// The other voters (of both sides of a joint configuration).
    pub(super) fn peers(&self) -> Vec<NodeId> {
        let me = self.cfg.id;
        let m = self.membership();
        m.voters
            .iter()
            .chain(&m.outgoing)
            .copied()
            .filter(|&v| v != me)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Every other member, learners included (a leader replicates to all of them).
    pub(super) fn other_members(&self) -> Vec<NodeId> {
        let me = self.cfg.id;
        self.membership()
            .members()
            .into_iter()
            .filter(|&v| v != me)
            .collect()
    }

    pub(super) fn leader_state(&self) -> Option<&Leader> {
        match &self.state {
            RoleState::Leader(l) => Some(l),
            _ => None,
        }
    }

    pub(super) fn leader_mut(&mut self) -> Option<&mut Leader> {
        match &mut self.state {
            RoleState::Leader(l) => Some(l),
            _ => None,
        }
    }

    pub(super) fn follower_mut(&mut self) -> Option<&mut Follower> {
        match &mut self.state {
            RoleState::Follower(f) => Some(f),
            _ => None,
        }
    }

    // ----- inputs ----------------------------------------------------------------------------

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        let election_ticks = self.cfg.election_ticks;
        match &mut self.state {
            RoleState::Leader(_) => self.tick_leader(),
            RoleState::Follower(f) => {
                // A transfer that stopped (its leader moved on, or caught us up with appends
                // instead) must not keep the incoming-snapshot slot, nor block local
                // snapshots, for ever.
                if let Some(incoming) = f.incoming.as_mut() {
                    incoming.idle_ticks += 1;
                    if incoming.idle_ticks >= election_ticks {
                        f.incoming = None;
                    }
                }
                self.tick_election();
            }
            _ => self.tick_election(),
        }
    }

    fn tick_election(&mut self) {
        if self.recovery.is_some() {
            self.tick_recovery();
            return;
        }
        if self.election_elapsed >= self.randomized_election_timeout {
            self.campaign();
        }
    }

    fn tick_leader(&mut self) {
        let election_ticks = self.cfg.election_ticks;
        let heartbeat_ticks = self.cfg.heartbeat_ticks;
        let elapsed = self.election_elapsed;
        let Some(l) = self.leader_mut() else { return };
        l.heartbeat_elapsed += 1;
        let mut abandoned = false;
        if let Some(t) = l.transfer.as_mut() {
            t.elapsed += 1;
            if t.elapsed >= election_ticks {
                l.transfer = None; // the transfer failed: lead on
                abandoned = true;
            }
        }
        let heartbeat_due = l.heartbeat_elapsed >= heartbeat_ticks;
        if abandoned {
            // A no-op moves the log past the index a delayed TimeoutNow names, so that the
            // transferee ignores it once it has this entry.
            self.append_own(EntryPayload::Noop);
        }
        if elapsed >= election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_recently_active() {
                self.become_follower(self.term, None);
                return;
            }
            if let Some(l) = self.leader_mut() {
                for p in l.progress.values_mut() {
                    p.new_round();
                }
            }
        }
        if heartbeat_due {
            if let Some(l) = self.leader_mut() {
                l.heartbeat_elapsed = 0;
            }
            self.broadcast_heartbeat(true);
        }
    }

    /// Appends an entry of the current term to a leader's log.
    pub(super) fn append_own(&mut self, payload: EntryPayload) -> Proposed {
        let entry = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            payload,
        };
        let proposed = Proposed {
            index: entry.index,
            term: entry.term,
        };
        let changes_membership = matches!(entry.payload, EntryPayload::Membership(_));
        self.log.append(entry);
        if changes_membership {
            self.membership_changed();
        }
        if self.single_voter() {
            self.maybe_commit();
        }
        proposed
    }

    /// Appends a client command (leader only). It is replicated at the next [`ready`](Self::ready).
    pub fn propose(&mut self, command: Payload) -> Result<Proposed, CoreProposeError> {
        let leader = self.leader;
        let max_entry = self.cfg.max_entry_bytes;
        let max_uncommitted = self.cfg.max_uncommitted_bytes;
        let size = super::ENTRY_OVERHEAD + command.len() as u64;
        let room = self.log_has_room(size);
        let Some(l) = self.leader_mut() else {
            return Err(CoreProposeError::NotLeader { leader });
        };
        if l.transfer.is_some() {
            return Err(CoreProposeError::Busy); // leadership is being handed over
        }
        if size > max_entry {
            return Err(CoreProposeError::TooLarge {
                size,
                max: max_entry,
            });
        }
        if l.uncommitted_bytes > 0 && l.uncommitted_bytes + size > max_uncommitted {
            return Err(CoreProposeError::Busy);
        }
        if !room {
            return Err(CoreProposeError::Busy); // wait for the next snapshot to compact
        }
        l.uncommitted_bytes += size;
        Ok(self.append_own(EntryPayload::Command(command)))
    }

    /// Handles a message from a peer. Messages from unknown nodes or for another node are
    /// ignored (the network may misdeliver; that must not break anything).
    pub fn step(&mut self, m: Message) {
        if m.to != self.cfg.id || m.from == self.cfg.id || !well_formed(&m) {
            return;
        }
        // Only members are heard, and in elections only voters: a removed node, or one never
        // admitted, cannot disrupt the cluster. A leader's own messages are the exception
        // (terms decide about them): a node that has not learned a new configuration yet
        // must still follow the leader that configuration elected.
        let from_a_leader = matches!(
            m.body,
            MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. }
        );
        let membership = self.membership();
        let heard = match m.body {
            MessageBody::Vote { .. } | MessageBody::VoteResponse { .. } => {
                membership.is_voter(m.from)
            }
            MessageBody::TermQuery | MessageBody::TermAnswer { .. } => true,
            _ => from_a_leader || membership.contains(m.from),
        };
        if !heard {
            return;
        }
        // Questions about terms are answered whatever the terms (see `recovery.rs`).
        match m.body {
            MessageBody::TermQuery => {
                let body = MessageBody::TermAnswer {
                    empty: self.holds_nothing(),
                };
                self.send(m.from, body, Dispatch::AfterPersist);
                return;
            }
            MessageBody::TermAnswer { empty } => {
                self.term_answered(m.from, m.term, empty);
                return;
            }
            _ => {}
        }
        if self.recovery.as_ref().is_some_and(Recovery::term_unknown) {
            return; // until it knows which terms it may have promised, it takes no part
        }
        if m.term > self.term {
            match &m.body {
                MessageBody::Vote {
                    pre_vote, transfer, ..
                } => {
                    if !transfer && self.in_lease(*pre_vote) {
                        return; // we hear from a live leader: do not let anyone depose it
                    }
                    if !pre_vote {
                        self.become_follower(m.term, None);
                    }
                }
                // A granted pre-vote carries the future term we asked about: not a real term.
                MessageBody::VoteResponse {
                    pre_vote: true,
                    granted: true,
                } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => self.become_follower(m.term, Some(m.from)),
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.body {
                // A stale leader (for instance one that was cut off): tell it our term so it
                // steps down. Without this, with check-quorum it would never learn it.
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => {
                    let body = MessageBody::HeartbeatResponse { read_round: 0 };
                    self.send(m.from, body, Dispatch::AfterPersist);
                }
                MessageBody::Vote { pre_vote: true, .. } => {
                    self.send(
                        m.from,
                        MessageBody::VoteResponse {
                            pre_vote: true,
                            granted: false,
                        },
                        Dispatch::AfterPersist,
                    );
                }
                _ => {}
            }
            return;
        }

        if let MessageBody::Vote {
            pre_vote,
            last_index,
            last_term,
            ..
        } = m.body
        {
            self.handle_vote_request(m.from, m.term, pre_vote, last_index, last_term);
            return;
        }
        match self.state {
            RoleState::Leader(_) => self.step_leader(m),
            RoleState::Candidate(_) | RoleState::PreCandidate(_) => self.step_candidate(m),
            RoleState::Follower(_) => self.step_follower(m),
        }
    }

    /// Reports that the batch whose [`Ready::ack`] this is is durable. Acks must be reported
    /// in the order the batches were handed out; one report may stand for several batches
    /// only if they are reported each, in order.
    pub fn on_persisted(&mut self, ack: PersistAck) {
        self.durable_term = self.durable_term.max(ack.hard_state.term);
        self.log.persisted_to(ack.last_index, ack.last_term);
        if self.role() == Role::Leader {
            self.maybe_commit();
        }
    }

    /// True when [`ready`](Self::ready) would hand out work.
    pub fn has_ready(&self) -> bool {
        let leader_work = self.leader_state().is_some_and(|l| {
            l.pending_reads.iter().any(|r| r.round == 0)
                || l.progress.keys().any(|&p| self.wants_send(p))
        });
        self.hard_state() != self.hard_state_handed
            || !self.msgs.is_empty()
            || self.log.take_unstable_len() > 0
            || self.log.commit().min(self.log.persisted()) > self.log.applied()
            || !self.snapshot_chunks.is_empty()
            || !self.snapshot_requests.is_empty()
            || self.install_snapshot.is_some()
            || !self.read_states.is_empty()
            || !self.failed_reads.is_empty()
            || self.recovery_done
            || leader_work
    }

    /// Hands out the pending work. See [`Ready`] for the order the host must follow.
    pub fn ready(&mut self) -> Ready {
        if self.role() == Role::Leader {
            self.start_read_round();
            self.send_appends();
        }
        let hs = self.hard_state();
        let hard_state = (hs != self.hard_state_handed).then_some(hs);
        self.hard_state_handed = hs;
        let entries = self.log.take_unstable();
        if self.bootstrap_config && self.log.configs().current_index() > 0 {
            self.bootstrap_config = false; // the configuration is in the log now
        }
        let mut messages = Vec::new();
        let mut persisted_messages = Vec::new();
        for (when, m) in self.msgs.drain(..) {
            match when {
                Dispatch::Now => messages.push(m),
                Dispatch::AfterPersist => persisted_messages.push(m),
            }
        }
        Ready {
            hard_state,
            entries,
            messages,
            persisted_messages,
            committed_entries: self.log.take_committed(self.cfg.max_apply_bytes),
            snapshot_requests: std::mem::take(&mut self.snapshot_requests),
            snapshot_chunks: std::mem::take(&mut self.snapshot_chunks),
            install_snapshot: self.install_snapshot.take(),
            read_states: std::mem::take(&mut self.read_states),
            failed_reads: std::mem::take(&mut self.failed_reads),
            tail_loss_repaired: std::mem::take(&mut self.recovery_done),
            ack: PersistAck {
                hard_state: hs,
                last_index: self.log.last_index(),
                last_term: self.log.last_term(),
            },
        }
    }

    /// Checks the invariants the core keeps between inputs; panics naming the first one
    /// broken. Cheap enough to call after every step of a simulation.
    pub fn check_invariants(&self) {
        let log = &self.log;
        let u = log.unstable();
        assert!(
            u.persisted() <= log.last_index() && u.persisted() < u.handed_from(),
            "node {}: persisted {} beyond the log (last {}, handed out below {})",
            self.cfg.id,
            u.persisted(),
            log.last_index(),
            u.handed_from()
        );
        assert!(
            u.handed_from() <= log.last_index() + 1,
            "node {}: handed out through {} beyond the last index {}",
            self.cfg.id,
            u.handed_from() - 1,
            log.last_index()
        );
        assert!(
            log.snapshot().index <= log.applied()
                && log.applied() <= log.commit()
                && log.commit() <= log.last_index(),
            "node {}: need snapshot {} <= applied {} <= commit {} <= last {}",
            self.cfg.id,
            log.snapshot().index,
            log.applied(),
            log.commit(),
            log.last_index()
        );
        assert!(
            log.committed_bytes() <= log.bytes(),
            "node {}: committed bytes {} above the retained {}",
            self.cfg.id,
            log.committed_bytes(),
            log.bytes()
        );
        assert!(
            self.durable_term <= self.term,
            "node {}: durable term {} above the current term {}",
            self.cfg.id,
            self.durable_term,
            self.term
        );
        if let Some(l) = self.leader_state() {
            assert_eq!(self.leader, Some(self.cfg.id), "a leader knows itself");
            for (id, p) in &l.progress {
                assert!(
                    p.match_index < p.next_index,
                    "node {}: follower {id} has match {} >= next {}",
                    self.cfg.id,
                    p.match_index,
                    p.next_index
                );
            }
        }
    }

    // ----- role transitions ------------------------------------------------------------------

    pub(super) fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let min = self.cfg.election_ticks as u64;
        self.randomized_election_timeout = self.rng.range(min, 2 * min) as u32;
    }

    /// Replaces the role. What the old role held that someone waits for is answered here:
    /// a leader's reads fail (its own host's in the next `Ready`, forwarded ones with an
    /// answer without an index), and so do the reads a follower forwarded.
    pub(super) fn set_role(&mut self, new: RoleState) {
        match std::mem::replace(&mut self.state, new) {
            RoleState::Leader(l) => {
                let held = l
                    .pending_reads
                    .into_iter()
                    .map(|r| (r.from, r.ctx))
                    .chain(l.reads_before_commit);
                for (from, ctx) in held {
                    if from == self.cfg.id {
                        self.failed_reads.push(ctx);
                    } else {
                        // In the new term, which may not be durable yet.
                        let body = MessageBody::ReadIndexResponse { ctx, index: None };
                        self.send(from, body, Dispatch::AfterPersist);
                    }
                }
            }
            RoleState::Follower(f) => self.failed_reads.extend(f.forwarded_reads.into_values()),
            RoleState::PreCandidate(_) | RoleState::Candidate(_) => {}
        }
    }

    pub(super) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.set_role(RoleState::Follower(Follower::default()));
        self.leader = leader;
        self.reset_election_timer();
    }

    pub(super) fn become_pre_candidate(&mut self) {
        self.set_role(RoleState::PreCandidate(Election::default()));
        self.leader = None;
        self.reset_election_timer();
        self.request_votes(true, false);
    }

    /// A real election; `transfer` marks one the leader asked for.
    pub(super) fn become_candidate(&mut self, transfer: bool) {
        self.term += 1;
        self.vote = Some(self.cfg.id);
        self.set_role(RoleState::Candidate(Election::default()));
        self.leader = None;
        self.reset_election_timer();
        self.request_votes(false, transfer);
    }

    pub(super) fn become_leader(&mut self) {
        let next = self.log.last_index() + 1;
        let max_inflight = self.cfg.max_inflight;
        let progress = self
            .other_members()
            .into_iter()
            .map(|p| (p, Progress::new(next, max_inflight)))
            .collect();
        self.set_role(RoleState::Leader(Box::new(Leader {
            progress,
            heartbeat_elapsed: 0,
            uncommitted_bytes: 0,
            read_round: 0,
            pending_reads: Default::default(),
            reads_before_commit: Vec::new(),
            transfer: None,
        })));
        self.leader = Some(self.cfg.id);
        self.reset_election_timer();
        // The no-op lets entries of earlier terms commit (Figure 8 / §5.4.2). The first leader
        // of a new cluster makes it the bootstrap configuration instead, so that the
        // configuration is stored in the log from then on.
        if self.bootstrap_config && self.log.configs().current_index() == 0 {
            let current = self.membership().clone();
            self.append_own(EntryPayload::Membership(current));
        } else {
            self.append_own(EntryPayload::Noop);
        }
    }

    // ----- per-role handling -----------------------------------------------------------------

    fn step_candidate(&mut self, m: Message) {
        match m.body {
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => {
                self.become_follower(m.term, Some(m.from));
                self.step_follower(m);
            }
            MessageBody::VoteResponse { pre_vote, granted } => {
                self.vote_answered(m.from, pre_vote, granted)
            }
            _ => {}
        }
    }

    fn step_follower(&mut self, m: Message) {
        match m.body {
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_append(m.from, prev_index, prev_term, entries, commit);
            }
            MessageBody::InstallSnapshot {
                meta,
                size,
                offset,
                data,
            } => self.handle_snapshot_chunk(m.from, meta, size, offset, data),
            MessageBody::Heartbeat { commit, read_round } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_heartbeat(m.from, commit, read_round);
                self.ask_commit_for_recovery(m.from);
            }
            MessageBody::ReadIndexResponse { ctx, index } => {
                self.handle_read_response(m.from, ctx, index)
            }
            MessageBody::TimeoutNow => self.handle_timeout_now(m.from, None),
            MessageBody::TimeoutNowAt { last_index } => {
                self.handle_timeout_now(m.from, Some(last_index))
            }
            _ => {}
        }
    }

    pub(super) fn send(&mut self, to: NodeId, body: MessageBody, when: Dispatch) {
        self.msgs.push((
            when,
            Message {
                from: self.cfg.id,
                to,
                term: self.term,
                body,
            },
        ));
    }

    /// Starts recovering from a lost log tail. Call it at start-up, before the first input,
    /// when the storage reports a [`TailLoss`] ([`RaftCore::from_storage`] does).
    ///
    /// If the hard state was lost, the node first asks every other voter for its term
    /// ([`MessageBody::TermQuery`]), taking no part until all have answered; then it adopts
    /// the largest term with its vote spent (it never votes again in a term its lost vote
    /// may count in). Then, unless no voter holds any entry (a new cluster: nothing was ever
    /// committed), it follows leaders but neither votes nor campaigns until the leader of
    /// its term has brought it up to that leader's commit index
    /// ([`Ready::tail_loss_repaired`] marks the end). A single voter has no one to ask and
    /// ends recovery at once.
    pub fn recover_from(&mut self, loss: TailLoss) {
        if self.single_voter() {
            // No other copy to learn from: there is nothing to wait for.
            self.recovery_done = true;
            return;
        }
        self.recovery = Some(Recovery::new(loss));
        // Ask at once rather than an election timeout later: a new cluster, whose nodes all
        // start this way, then elects its first leader as soon as it otherwise would.
        self.ask_terms();
    }

    /// Bounds the bytes ([`Entry::size`]) of the log this node retains beyond its snapshot
    /// (`None`: unbounded, the default). A leader keeps its uncommitted tail within half the
    /// bound, refusing proposals with [`CoreProposeError::Busy`] beyond. At the bound the log
    /// takes on nothing new — proposals are refused, appends that would grow it are taken
    /// only in part or left unanswered (the leader sends them again) — until the snapshot
    /// that is then due compacts it or a heartbeat brings the commit index; uncommitted
    /// entries the leader needs are never refused for good. So no log exceeds the bound by
    /// more than one entry (plus what a deposed leader left that a new one has not yet
    /// overwritten). The [`Node`](crate::Node) sets it to twice its snapshot threshold.
    pub fn set_log_limit(&mut self, limit: Option<u64>) {
        self.log_limit = limit;
    }

    /// Leader: true if a new proposal of `more` bytes fits: its uncommitted tail stays within
    /// half the limit (an empty tail always takes one entry, whatever its size), and the log
    /// may grow (see [`RaftCore::log_takes`]).
    pub(super) fn log_has_room(&self, more: u64) -> bool {
        let Some(limit) = self.log_limit else {
            return true;
        };
        let uncommitted = self.log.bytes() - self.log.committed_bytes();
        (uncommitted == 0 || uncommitted + more <= limit / 2) && self.log_takes(more)
    }

    /// True if the log may grow by `more` bytes: it stays within the limit; or it is not over
    /// the limit yet and at most half the limit is committed (one entry may then cross it, so
    /// uncommitted entries the leader needs are never refused for good). Otherwise growth
    /// waits: for the snapshot that is due once more than half the limit is committed, or for
    /// the commit index a heartbeat brings. So no log exceeds the limit by more than one entry.
    pub(super) fn log_takes(&self, more: u64) -> bool {
        match self.log_limit {
            Some(limit) => {
                let held = self.log.bytes();
                held + more <= limit || (held <= limit && self.log.committed_bytes() <= limit / 2)
            }
            None => true,
        }
    }

    /// True if `more` bytes keep the log within the limit.
    pub(super) fn log_within_limit(&self, more: u64) -> bool {
        self.log_limit
            .is_none_or(|limit| self.log.bytes() + more <= limit)
    }

    /// The lost log tail this node is recovering from, if any.
    pub fn recovering(&self) -> Option<TailLoss> {
        self.recovery.as_ref().map(Recovery::loss)
    }
}

/// Rejects messages no correct peer sends (a buggy or hostile peer must not be able to break
/// the log's invariants): appended entries must follow `prev_index` contiguously, with terms
/// that never decrease, start at `prev_term` or later, and do not exceed the sender's term.
fn well_formed(m: &Message) -> bool {
    match &m.body {
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            ..
        } => {
            let mut last_term = *prev_term;
            for (expect, e) in (prev_index.saturating_add(1)..).zip(entries) {
                if e.index != expect || e.term < last_term || e.term > m.term {
                    return false;
                }
                last_term = e.term;
            }
            *prev_term <= m.term
        }
        MessageBody::InstallSnapshot {
            meta,
            size,
            offset,
            data,
        } => {
            meta.index > 0
                && meta.term <= m.term
                && offset
                    .checked_add(data.len() as u64)
                    .is_some_and(|end| end <= *size)
        }
        _ => true,
    }
}
