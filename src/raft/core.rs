//! [`RaftCore`]: the Raft consensus rules as a deterministic, IO-free state machine.
//!
//! Inputs: [`RaftCore::step`] (a message from a peer), [`RaftCore::tick`] (time passes),
//! [`RaftCore::propose`] (a client command). Output: [`RaftCore::ready`] hands out a [`Ready`]
//! batch: state and entries to persist, messages to send (some at once, some only once the
//! batch is durable), and committed entries to apply. The host reports durability back with
//! [`RaftCore::on_persisted`].
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

use std::collections::BTreeMap;

use super::config::Config;
use super::log::RaftLog;
use super::progress::Progress;
use super::read::Reads;
use super::ready::{PersistAck, Proposed, Ready, SnapshotChunk, SnapshotChunkRequest, Status};
use super::rng::Rng;
use super::snapshot::Incoming;
use super::{
    Entry, EntryPayload, HardState, Index, Message, MessageBody, NodeId, Payload, SnapshotMeta,
    Term,
};
use crate::error::CoreProposeError;

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
    pub(super) role: Role,
    pub(super) leader: Option<NodeId>,
    pub(super) log: RaftLog,
    /// Followers' progress (leader only; never contains this node).
    pub(super) progress: BTreeMap<NodeId, Progress>,
    /// Votes received in the current (pre-)election.
    pub(super) votes: BTreeMap<NodeId, bool>,
    pub(super) election_elapsed: u32,
    pub(super) heartbeat_elapsed: u32,
    pub(super) randomized_election_timeout: u32,
    /// Bytes proposed in this term and not yet committed (leader only).
    pub(super) uncommitted_bytes: u64,
    pub(super) rng: Rng,
    pub(super) msgs: Vec<(Dispatch, Message)>,
    /// Hard state as last handed out in a `Ready`.
    pub(super) hard_state_handed: HardState,
    /// Size of the stored snapshot (as the host reports it).
    pub(super) snapshot_size: u64,
    /// A snapshot being received from the leader.
    pub(super) incoming: Option<Incoming>,
    /// Pending output: chunk requests (leader), received chunks and install (follower).
    pub(super) snapshot_requests: Vec<SnapshotChunkRequest>,
    pub(super) snapshot_chunks: Vec<SnapshotChunk>,
    pub(super) install_snapshot: Option<SnapshotMeta>,
    /// ReadIndex state (leader), and confirmed/failed reads to hand out.
    pub(super) reads: Reads,
    /// Leader: the follower leadership is being handed to, and ticks since it started.
    pub(super) transferee: Option<NodeId>,
    pub(super) transfer_elapsed: u32,
    /// The highest term known durable (reported through `on_persisted`).
    pub(super) durable_term: Term,
}

impl RaftCore {
    /// A core resuming from durable state: `hard_state`, the `snapshot` boundary and the log
    /// `entries` that follow it (all durable). A new node passes defaults and no entries.
    pub fn new(
        cfg: Config,
        hard_state: HardState,
        snapshot: SnapshotMeta,
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
        let mut core = RaftCore {
            rng: Rng::new(cfg.seed),
            cfg,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log: RaftLog::restore(snapshot, entries),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: 0,
            uncommitted_bytes: 0,
            msgs: Vec::new(),
            hard_state_handed: hard_state,
            snapshot_size: 0,
            incoming: None,
            snapshot_requests: Vec::new(),
            snapshot_chunks: Vec::new(),
            install_snapshot: None,
            reads: Reads::default(),
            transferee: None,
            transfer_elapsed: 0,
            durable_term: hard_state.term,
        };
        core.reset_election_timer();
        Ok(core)
    }

    /// Restores a core from what `storage` holds (reads the whole retained log once).
    pub fn from_storage<S: crate::storage::Storage>(
        cfg: Config,
        storage: &S,
    ) -> Result<Self, crate::error::StorageError> {
        let init = storage.initial_state()?;
        let entries = storage.entries(init.first_index, init.last_index + 1, u64::MAX)?;
        let mut core = RaftCore::new(cfg, init.hard_state, init.snapshot, entries)
            .map_err(crate::error::StorageError::Invalid)?;
        core.snapshot_size = init.snapshot_size;
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
        self.role
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
        self.progress.get(&peer)
    }
    /// The current randomized election timeout, in ticks.
    pub fn election_timeout(&self) -> u32 {
        self.randomized_election_timeout
    }
    /// Externally visible state.
    pub fn status(&self) -> Status {
        Status {
            id: self.cfg.id,
            role: self.role,
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

    pub(super) fn quorum(&self) -> usize {
        self.cfg.voters.len() / 2 + 1
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        let me = self.cfg.id;
        self.cfg.voters.iter().copied().filter(move |&v| v != me)
    }

    // ----- inputs ----------------------------------------------------------------------------

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        if self.role == Role::Leader {
            self.heartbeat_elapsed += 1;
            if self.transferee.is_some() {
                self.transfer_elapsed += 1;
                if self.transfer_elapsed >= self.cfg.election_ticks {
                    self.transferee = None; // the transfer failed: lead on
                }
            }
            if self.election_elapsed >= self.cfg.election_ticks {
                self.election_elapsed = 0;
                if self.cfg.check_quorum && !self.quorum_recently_active() {
                    self.become_follower(self.term, None);
                    return;
                }
                for p in self.progress.values_mut() {
                    p.recent_active = false;
                }
            }
            if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
                self.heartbeat_elapsed = 0;
                self.broadcast_heartbeat();
            }
        } else if self.election_elapsed >= self.randomized_election_timeout {
            self.campaign();
        }
    }

    /// Starts an election now (a pre-vote round first when pre-vote is on).
    pub fn campaign(&mut self) {
        if self.role == Role::Leader {
            return;
        }
        if self.cfg.pre_vote {
            self.become_pre_candidate();
        } else {
            self.become_candidate();
        }
    }

    /// Appends a client command (leader only). It is replicated at the next [`ready`](Self::ready).
    pub fn propose(&mut self, command: Payload) -> Result<Proposed, CoreProposeError> {
        if self.role != Role::Leader {
            return Err(CoreProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transferee.is_some() {
            return Err(CoreProposeError::Busy); // leadership is being handed over
        }
        let entry = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            payload: EntryPayload::Command(command),
        };
        if entry.size() > self.cfg.max_entry_bytes {
            return Err(CoreProposeError::TooLarge {
                size: entry.size(),
                max: self.cfg.max_entry_bytes,
            });
        }
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes + entry.size() > self.cfg.max_uncommitted_bytes
        {
            return Err(CoreProposeError::Busy);
        }
        self.uncommitted_bytes += entry.size();
        let proposed = Proposed {
            index: entry.index,
            term: entry.term,
        };
        self.log.append(entry);
        if self.cfg.voters.len() == 1 {
            self.maybe_commit();
        }
        Ok(proposed)
    }

    /// Handles a message from a peer. Messages from unknown nodes or for another node are
    /// ignored (the network may misdeliver; that must not break anything).
    pub fn step(&mut self, m: Message) {
        if m.to != self.cfg.id
            || m.from == self.cfg.id
            || !self.cfg.voters.contains(&m.from)
            || !well_formed(&m)
        {
            return;
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
        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
    }

    /// Reports that the batch whose [`Ready::ack`] this is is durable. Acks must be reported
    /// in the order the batches were handed out.
    pub fn on_persisted(&mut self, ack: PersistAck) {
        self.durable_term = self.durable_term.max(ack.hard_state.term);
        self.log.persisted_to(ack.last_index, ack.last_term);
        if self.role == Role::Leader {
            self.maybe_commit();
        }
    }

    /// True when [`ready`](Self::ready) would hand out work.
    pub fn has_ready(&self) -> bool {
        self.hard_state() != self.hard_state_handed
            || !self.msgs.is_empty()
            || self.log.take_unstable_len() > 0
            || self.log.commit().min(self.log.persisted()) > self.log.applied()
            || !self.snapshot_chunks.is_empty()
            || !self.reads.states.is_empty()
            || !self.reads.failed.is_empty()
            || (self.role == Role::Leader && self.reads.pending.iter().any(|r| r.round == 0))
            || (self.role == Role::Leader && self.progress.keys().any(|&p| self.wants_send(p)))
    }

    /// Hands out the pending work. See [`Ready`] for the order the host must follow.
    pub fn ready(&mut self) -> Ready {
        if self.role == Role::Leader {
            self.start_read_round();
            self.send_appends();
        }
        let hs = self.hard_state();
        let hard_state = (hs != self.hard_state_handed).then_some(hs);
        self.hard_state_handed = hs;
        let entries = self.log.take_unstable();
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
            read_states: std::mem::take(&mut self.reads.states),
            failed_reads: std::mem::take(&mut self.reads.failed),
            ack: PersistAck {
                hard_state: hs,
                last_index: self.log.last_index(),
                last_term: self.log.last_term(),
            },
        }
    }

    // ----- role transitions ------------------------------------------------------------------

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let min = self.cfg.election_ticks as u64;
        self.randomized_election_timeout = self.rng.range(min, 2 * min) as u32;
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.abort_reads();
        self.transferee = None;
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.progress.clear();
        self.votes.clear();
        self.reset_election_timer();
    }

    fn become_pre_candidate(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer();
        self.request_votes(true, false);
    }

    fn become_candidate(&mut self) {
        self.become_candidate_for(false);
    }

    /// A real election; `transfer` marks one the leader asked for.
    pub(super) fn become_candidate_for(&mut self, transfer: bool) {
        self.term += 1;
        self.vote = Some(self.cfg.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer();
        self.request_votes(false, transfer);
    }

    fn request_votes(&mut self, pre_vote: bool, transfer: bool) {
        self.votes.insert(self.cfg.id, true);
        if self.votes.len() >= self.quorum() {
            self.won_election();
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let term = self.term + u64::from(pre_vote);
        let peers: Vec<NodeId> = self.peers().collect();
        for to in peers {
            // A pre-vote changes nothing durable, so it may leave at once; a real vote request
            // carries a new term and vote that must be durable first.
            let when = if pre_vote {
                Dispatch::Now
            } else {
                Dispatch::AfterPersist
            };
            let body = MessageBody::Vote {
                pre_vote,
                last_index,
                last_term,
                transfer,
            };
            self.msgs.push((
                when,
                Message {
                    from: self.cfg.id,
                    to,
                    term,
                    body,
                },
            ));
        }
    }

    fn won_election(&mut self) {
        match self.role {
            Role::PreCandidate => self.become_candidate(),
            Role::Candidate => self.become_leader(),
            _ => {}
        }
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.leader = Some(self.cfg.id);
        self.votes.clear();
        self.reset_election_timer();
        let next = self.log.last_index() + 1;
        let peers: Vec<NodeId> = self.peers().collect();
        self.progress = peers
            .into_iter()
            .map(|p| (p, Progress::new(next, self.cfg.max_inflight)))
            .collect();
        self.uncommitted_bytes = 0;
        // The no-op lets entries of earlier terms commit (Figure 8 / §5.4.2).
        self.log.append(Entry {
            index: next,
            term: self.term,
            payload: EntryPayload::Noop,
        });
        if self.cfg.voters.len() == 1 {
            self.maybe_commit();
        }
    }

    /// Inside the leader lease a node refuses to take part in elections. Pre-votes are always
    /// checked against it (that is what makes pre-vote protect a live leader); real votes when
    /// check-quorum is on.
    fn in_lease(&self, pre_vote: bool) -> bool {
        (self.cfg.check_quorum || (pre_vote && self.cfg.pre_vote))
            && self.leader.is_some()
            && self.election_elapsed < self.cfg.election_ticks
    }

    // ----- per-role handling -----------------------------------------------------------------

    fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: Term,
        pre_vote: bool,
        last_index: Index,
        last_term: Term,
    ) {
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && term > self.term);
        let granted = can_vote && self.log.is_up_to_date(last_index, last_term);
        if granted && !pre_vote {
            self.vote = Some(from);
            self.election_elapsed = 0;
        }
        // A granted pre-vote answers in the term it was asked about.
        let reply_term = if granted && pre_vote { term } else { self.term };
        let body = MessageBody::VoteResponse { pre_vote, granted };
        self.msgs.push((
            Dispatch::AfterPersist,
            Message {
                from: self.cfg.id,
                to: from,
                term: reply_term,
                body,
            },
        ));
    }

    fn step_candidate(&mut self, m: Message) {
        match m.body {
            MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                self.become_follower(m.term, Some(m.from));
                self.step_follower(m);
            }
            MessageBody::VoteResponse { pre_vote, granted } => {
                if pre_vote != (self.role == Role::PreCandidate) {
                    return; // an answer from an earlier phase
                }
                self.votes.entry(m.from).or_insert(granted);
                let yes = self.votes.values().filter(|g| **g).count();
                let no = self.votes.len() - yes;
                if yes >= self.quorum() {
                    self.won_election();
                } else if no >= self.quorum() {
                    self.become_follower(self.term, None);
                }
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
                // The leader caps `commit` at what it knows we hold, so it is safe to adopt.
                self.log.commit_to(commit.min(self.log.last_index()));
                // A heartbeat answer claims nothing about the log, only our term: once that
                // term is durable it may leave at once, so confirming a read (ReadIndex) does
                // not wait for this follower's fsync of unrelated appends.
                let body = MessageBody::HeartbeatResponse { read_round };
                let when = if self.durable_term == self.term {
                    Dispatch::Now
                } else {
                    Dispatch::AfterPersist
                };
                self.send(m.from, body, when);
            }
            MessageBody::ReadIndexResponse { ctx, index } => self.handle_read_response(ctx, index),
            MessageBody::TimeoutNow => self.handle_timeout_now(),
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
