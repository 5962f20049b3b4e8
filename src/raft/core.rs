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
use super::progress::{Progress, ProgressState};
use super::rng::Rng;
use super::{
    AppendResponse, Entry, EntryPayload, HardState, Index, Message, MessageBody, NodeId, Payload,
    SnapshotMeta, Term,
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

/// What the host must make durable through [`RaftCore::on_persisted`]: the hard state and the
/// log position a [`Ready`] covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistAck {
    /// Hard state as of this batch.
    pub hard_state: HardState,
    /// Last log index as of this batch.
    pub last_index: Index,
    /// Its term.
    pub last_term: Term,
}

/// One batch of work for the host. Handle it in this order:
///
/// 1. send [`Ready::messages`] (they do not depend on this batch being durable — this is what
///    lets a leader replicate in parallel with its own fsync);
/// 2. write [`Ready::hard_state`] and [`Ready::entries`] to storage and sync;
/// 3. call [`RaftCore::on_persisted`] with [`Ready::ack`];
/// 4. send [`Ready::persisted_messages`];
/// 5. apply [`Ready::committed_entries`] in order (they are already durable).
#[derive(Clone, Debug, Default)]
#[must_use = "a Ready carries work the host must do"]
pub struct Ready {
    /// New hard state to persist, if it changed.
    pub hard_state: Option<HardState>,
    /// Entries to persist. Storage must replace everything from `entries[0].index` on.
    pub entries: Vec<Entry>,
    /// Messages that may be sent at once.
    pub messages: Vec<Message>,
    /// Messages that may be sent only after `hard_state` and `entries` are durable.
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in index order.
    pub committed_entries: Vec<Entry>,
    /// What to report to [`RaftCore::on_persisted`] once this batch is durable.
    pub ack: PersistAck,
}

impl Ready {
    /// True when the batch asks the host to persist something.
    pub fn must_persist(&self) -> bool {
        self.hard_state.is_some() || !self.entries.is_empty()
    }
}

/// Where a proposal landed in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proposed {
    /// Index of the new entry.
    pub index: Index,
    /// Term of the new entry. If the entry applied at `index` has another term, the proposal
    /// was dropped by a leader change.
    pub term: Term,
}

/// A snapshot of the core's externally visible state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// Vote in the current term.
    pub vote: Option<NodeId>,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit_index: Index,
    /// Highest index handed out for applying.
    pub applied_index: Index,
    /// Highest index known durable.
    pub persisted_index: Index,
    /// Last log index.
    pub last_index: Index,
    /// Snapshot boundary.
    pub snapshot: SnapshotMeta,
}

/// Whether a queued message must wait for durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dispatch {
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
    cfg: Config,
    term: Term,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    /// Followers' progress (leader only; never contains this node).
    progress: BTreeMap<NodeId, Progress>,
    /// Votes received in the current (pre-)election.
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    /// Bytes proposed in this term and not yet committed (leader only).
    uncommitted_bytes: u64,
    rng: Rng,
    msgs: Vec<(Dispatch, Message)>,
    /// Hard state as last handed out in a `Ready`.
    hard_state_handed: HardState,
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
        RaftCore::new(cfg, init.hard_state, init.snapshot, entries)
            .map_err(crate::error::StorageError::Invalid)
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

    fn quorum(&self) -> usize {
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
        let entry = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            payload: EntryPayload::Command(command),
        };
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
                MessageBody::Vote { pre_vote, .. } => {
                    if self.in_lease(*pre_vote) {
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
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                    self.become_follower(m.term, Some(m.from))
                }
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.body {
                // A stale leader (for instance one that was cut off): tell it our term so it
                // steps down. Without this, with check-quorum it would never learn it.
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                    self.send(
                        m.from,
                        MessageBody::HeartbeatResponse,
                        Dispatch::AfterPersist,
                    );
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
            || (self.role == Role::Leader && self.progress.iter().any(|(_, p)| self.wants_send(p)))
    }

    /// Hands out the pending work. See [`Ready`] for the order the host must follow.
    pub fn ready(&mut self) -> Ready {
        if self.role == Role::Leader {
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
        self.request_votes(true);
    }

    fn become_candidate(&mut self) {
        self.term += 1;
        self.vote = Some(self.cfg.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer();
        self.request_votes(false);
    }

    fn request_votes(&mut self, pre_vote: bool) {
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
            MessageBody::Heartbeat { commit } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                // The leader caps `commit` at what it knows we hold, so it is safe to adopt.
                self.log.commit_to(commit.min(self.log.last_index()));
                self.send(
                    m.from,
                    MessageBody::HeartbeatResponse,
                    Dispatch::AfterPersist,
                );
            }
            _ => {}
        }
    }

    fn handle_append(
        &mut self,
        leader: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
    ) {
        let response = if prev_index < self.log.commit() {
            // Everything up to our commit index matches any leader's log.
            AppendResponse::Accepted {
                match_index: self.log.commit(),
            }
        } else if let Some(last_new) = self
            .log
            .maybe_append(prev_index, prev_term, commit, entries)
        {
            AppendResponse::Accepted {
                match_index: last_new,
            }
        } else {
            let (hint_index, hint_term) = self
                .log
                .find_conflict_by_term(prev_index.min(self.log.last_index()), prev_term);
            AppendResponse::Rejected {
                rejected_index: prev_index,
                hint_index,
                hint_term,
            }
        };
        // An acknowledgement claims durability: it leaves after this batch is persisted.
        self.send(
            leader,
            MessageBody::AppendResponse(response),
            Dispatch::AfterPersist,
        );
    }

    fn step_leader(&mut self, m: Message) {
        let from = m.from;
        match m.body {
            MessageBody::AppendResponse(AppendResponse::Accepted { match_index }) => {
                let Some(p) = self.progress.get_mut(&from) else {
                    return;
                };
                p.recent_active = true;
                if p.maybe_update(match_index) {
                    if p.state == ProgressState::Probe {
                        p.become_replicate();
                    }
                    self.maybe_commit();
                }
            }
            MessageBody::AppendResponse(AppendResponse::Rejected {
                rejected_index,
                hint_index,
                hint_term,
            }) => {
                // Skip every entry of ours whose term exceeds the follower's at the hint.
                let (probe, _) = self.log.find_conflict_by_term(hint_index, hint_term);
                let Some(p) = self.progress.get_mut(&from) else {
                    return;
                };
                p.recent_active = true;
                p.maybe_decrease_to(rejected_index, probe);
            }
            MessageBody::HeartbeatResponse => {
                let last = self.log.last_index();
                let Some(p) = self.progress.get_mut(&from) else {
                    return;
                };
                p.recent_active = true;
                p.resume();
                if p.state == ProgressState::Replicate
                    && p.match_index < p.sent_at_heartbeat.min(last)
                {
                    // Appends in flight may have been lost (the window may even be full of
                    // them). An empty append at `next_index` settles it: accepted, it frees
                    // the window; rejected, it sends the follower back to probing.
                    let prev_index = p.next_index - 1;
                    if let Some(prev_term) = self.log.term(prev_index) {
                        let commit = self.log.commit();
                        let body = MessageBody::Append {
                            prev_index,
                            prev_term,
                            entries: vec![],
                            commit,
                        };
                        self.send(from, body, Dispatch::Now);
                    }
                }
            }
            _ => {}
        }
    }

    // ----- replication -----------------------------------------------------------------------

    fn quorum_recently_active(&self) -> bool {
        1 + self.progress.values().filter(|p| p.recent_active).count() >= self.quorum()
    }

    /// Commits the highest index stored by a majority, if it is of the current term.
    fn maybe_commit(&mut self) {
        let mut matched: Vec<Index> = self.progress.values().map(|p| p.match_index).collect();
        matched.push(self.log.persisted());
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = matched[self.quorum() - 1];
        if candidate > self.log.commit() && self.log.term(candidate) == Some(self.term) {
            let released: u64 = self
                .log
                .slice(self.log.commit() + 1, candidate + 1, usize::MAX, u64::MAX)
                .iter()
                .map(Entry::size)
                .sum();
            self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(released);
            self.log.commit_to(candidate);
        }
    }

    fn wants_send(&self, p: &Progress) -> bool {
        !p.is_paused()
            && match p.state {
                ProgressState::Replicate => p.next_index <= self.log.last_index(),
                ProgressState::Probe => p.match_index < self.log.last_index(),
            }
    }

    /// Sends every follower what it may be sent now: batches bounded by count and bytes, as
    /// many as its in-flight window allows (one probe in probe mode).
    fn send_appends(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for to in peers {
            loop {
                let p = &self.progress[&to];
                if !self.wants_send(p) {
                    break;
                }
                let next = p.next_index;
                let prev_index = next - 1;
                let Some(prev_term) = self.log.term(prev_index) else {
                    // Needs entries we no longer hold: snapshot transfer (not yet supported).
                    break;
                };
                let entries = self.log.slice(
                    next,
                    self.log.last_index() + 1,
                    self.cfg.max_append_entries,
                    self.cfg.max_append_bytes,
                );
                let last = prev_index + entries.len() as u64;
                let had_entries = !entries.is_empty();
                let body = MessageBody::Append {
                    prev_index,
                    prev_term,
                    entries,
                    commit: self.log.commit(),
                };
                self.send(to, body, Dispatch::Now);
                let p = self.progress.get_mut(&to).expect("peer listed above");
                p.sent(last, had_entries);
                if p.state == ProgressState::Probe {
                    break;
                }
            }
        }
    }

    fn broadcast_heartbeat(&mut self) {
        let commit = self.log.commit();
        let beats: Vec<(NodeId, Index)> = self
            .progress
            .iter_mut()
            .map(|(&id, p)| {
                p.sent_at_heartbeat = p.next_index - 1;
                (id, p.match_index.min(commit))
            })
            .collect();
        for (to, commit) in beats {
            self.send(to, MessageBody::Heartbeat { commit }, Dispatch::Now);
        }
    }

    fn send(&mut self, to: NodeId, body: MessageBody, when: Dispatch) {
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
            let mut expect = prev_index.saturating_add(1);
            let mut last_term = *prev_term;
            for e in entries {
                if e.index != expect || e.term < last_term || e.term > m.term {
                    return false;
                }
                expect += 1;
                last_term = e.term;
            }
            *prev_term <= m.term
        }
        _ => true,
    }
}
