//! Membership for the TCP demo cluster: the replicated address book, and the member requests
//! of the client protocol (`kv members`, `add-learner`, `promote`, `remove`, `transfer`).
//!
//! A submodule of `client_proto.rs` (it answers some of its requests).
//!
//! # The address book is replicated state
//! Every member's addresses are a record under the reserved key
//! `__raftkv/members/<id>` of the replicated KV map ([`MEMBER_PREFIX`]), written through the
//! log like any other write, so every node — learners included — and every client learns
//! them in log order, and a snapshot carries them. A record's value is text:
//! `raft=HOST:PORT client=HOST:PORT` (`client=-` when unknown), or `removed` for a member
//! that was removed (a tombstone: it also masks the node's entry in an old `--peers`).
//!
//! - Each node's state machine is a [`BookMachine`]: the KV machine, which after every
//!   apply (and restore) reads the records and publishes them when they change. The node
//!   applies them to its transport and its listener ([`MemberService::book`]): a new record
//!   is a peer to dial and an id to take connections from, a tombstone drops both.
//! - A node's book is its `--peers`, overlaid by the records it knows: the replicated ones,
//!   merged into a cache in the data directory ([`CACHE_FILE`]) so that a restarted node
//!   reaches the members it knew before it has replayed its log (a new leader it only
//!   learned of from the log, say). A replicated record replaces the cached one of its id.
//! - The leader writes the records: before adding a learner, the new node's, plus one for
//!   every current member without one (from its own book); after removing a member, its
//!   tombstone; and its own record, whenever it leads and the stored one differs.
//!
//! # Requests
//! Only the leader answers member requests; another node answers `NotLeader` with the leader
//! it knows, like a proposal, or `LeaderAt` with its client address too when its book has it
//! (so a client told only of the original nodes finds a leader added later). Changes through one node run one at a time. The answer is the
//! leader's view of the configuration ([`MembersView`]) or a [`MemberFailure`]: the library's
//! [`MembershipError`] in a stable, tagged form. The leader refuses to remove itself:
//! transfer leadership first.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use parking_lot::Mutex;
use raftkv::error::{MembershipError, ProposeError};
use raftkv::kv::{ClientOptions, KvClient, KvResult, KvStateMachine};
use raftkv::raft::Role;
use raftkv::{Index, Node, NodeId, SnapshotSource, StateMachine};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ClientFailure, ClientRequest};

/// The reserved key prefix of the address book's records.
pub const MEMBER_PREFIX: &str = "__raftkv/members/";
/// The first key after every record (`/` + 1 is `0`).
const MEMBER_PREFIX_END: &str = "__raftkv/members0";
/// The cache of known records, in the node's data directory.
pub const CACHE_FILE: &str = "members";
/// How long a transfer's answer waits for the leadership to move (the core abandons a
/// transfer after an election timeout, 0.5-1 s by default).
pub const TRANSFER_WAIT: Duration = Duration::from_secs(3);
/// Records a book holds at most (a limit on what a node reads and caches).
pub const MAX_RECORDS: usize = 1024;

/// A member's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addrs {
    /// Its Raft (peer) address.
    pub raft: SocketAddr,
    /// Its client address, if known.
    pub client: Option<SocketAddr>,
}

/// One record of the address book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// A member at these addresses.
    Member(Addrs),
    /// A removed member.
    Removed,
}

impl Record {
    /// The record's value text.
    pub fn encode(&self) -> String {
        match self {
            Record::Member(a) => format!(
                "raft={} client={}",
                a.raft,
                a.client.map_or("-".to_string(), |c| c.to_string())
            ),
            Record::Removed => "removed".into(),
        }
    }

    /// Parses a value written by [`Record::encode`].
    pub fn decode(text: &str) -> Option<Record> {
        if text.trim() == "removed" {
            return Some(Record::Removed);
        }
        let mut raft = None;
        let mut client = None;
        for word in text.split_whitespace() {
            match word.split_once('=')? {
                ("raft", a) => raft = Some(a.parse().ok()?),
                ("client", "-") => client = Some(None),
                ("client", a) => client = Some(Some(a.parse().ok()?)),
                _ => return None,
            }
        }
        Some(Record::Member(Addrs {
            raft: raft?,
            client: client?,
        }))
    }
}

/// Records by node id.
pub type Records = BTreeMap<NodeId, Record>;

/// The key of node `id`'s record.
pub fn record_key(id: NodeId) -> Vec<u8> {
    format!("{MEMBER_PREFIX}{id}").into_bytes()
}

/// The records in `machine`'s state (malformed ones are skipped).
fn read_records(machine: &KvStateMachine) -> Records {
    machine
        .store()
        .scan(
            MEMBER_PREFIX.as_bytes(),
            Some(MEMBER_PREFIX_END.as_bytes()),
            MAX_RECORDS,
        )
        .into_iter()
        .filter_map(|(k, v)| {
            let id = std::str::from_utf8(&k)
                .ok()?
                .strip_prefix(MEMBER_PREFIX)?
                .parse::<NodeId>()
                .ok()?;
            Some((id, Record::decode(std::str::from_utf8(&v).ok()?)?))
        })
        .collect()
}

/// The KV state machine, publishing the address book's records whenever an apply or a
/// restore changes them.
pub struct BookMachine {
    kv: KvStateMachine,
    records: watch::Sender<Records>,
}

impl BookMachine {
    /// `kv`, and the receiver of its records (the current ones first).
    pub fn new(kv: KvStateMachine) -> (Self, watch::Receiver<Records>) {
        let (records, rx) = watch::channel(read_records(&kv));
        (BookMachine { kv, records }, rx)
    }

    fn publish(&self) {
        let now = read_records(&self.kv);
        self.records.send_if_modified(|old| {
            let changed = *old != now;
            if changed {
                *old = now;
            }
            changed
        });
    }
}

impl StateMachine for BookMachine {
    type Output = KvResult;

    fn apply(&mut self, index: Index, command: &[u8]) -> KvResult {
        let result = self.kv.apply(index, command);
        self.publish();
        result
    }

    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        self.kv.snapshot()
    }

    fn restore(&mut self, snapshot: &mut dyn std::io::Read) -> std::io::Result<()> {
        self.kv.restore(snapshot)?;
        self.publish();
        Ok(())
    }

    fn query(&self, query: &[u8]) -> Option<KvResult> {
        self.kv.query(query)
    }

    fn durable_index(&self) -> Option<Index> {
        self.kv.durable_index()
    }
}

/// The leader's view of the configuration, and every member's addresses it knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersView {
    /// The node that answered (the leader; after a transfer, the node it went to).
    pub leader: NodeId,
    /// The voters (of the configuration being entered, while joint).
    pub voters: Vec<NodeId>,
    /// While joint: the voters of the configuration being left.
    pub outgoing: Vec<NodeId>,
    /// The learners.
    pub learners: Vec<NodeId>,
    /// The members' addresses (those the leader knows).
    pub addrs: BTreeMap<NodeId, Addrs>,
}

impl MembersView {
    /// Every member, voters of both sides and learners, in id order.
    pub fn members(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .voters
            .iter()
            .chain(&self.outgoing)
            .chain(&self.learners)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Why a member request failed: [`MembershipError`] in a stable, tagged form, a failed
/// leadership transfer, or anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberFailure {
    /// Not the leader; the leader it knows of, if any.
    NotLeader(Option<NodeId>),
    /// Not the leader; the leader it knows of, and that leader's client address (so that a
    /// client that never heard of it can follow the redirect).
    LeaderAt(NodeId, SocketAddr),
    /// A change is already under way.
    InProgress,
    /// A leadership transfer is under way.
    Busy,
    /// Not a learner (add it as a learner first).
    NotALearner(NodeId),
    /// Not a member.
    UnknownNode(NodeId),
    /// The learner has not caught up yet.
    NotCaughtUp(NodeId),
    /// The new voters have no reachable quorum.
    NoQuorum,
    /// Dropped by a leader change; not in effect.
    Dropped,
    /// Timed out; the change may still complete.
    Timeout,
    /// The change makes no sense.
    Invalid(String),
    /// The leadership transfer failed.
    Transfer(ClientFailure),
    /// Anything else (the address book could not be written, say).
    Other(String),
}

impl From<MembershipError> for MemberFailure {
    fn from(e: MembershipError) -> Self {
        match e {
            MembershipError::NotLeader { leader } => MemberFailure::NotLeader(leader),
            MembershipError::InProgress => MemberFailure::InProgress,
            MembershipError::Busy => MemberFailure::Busy,
            MembershipError::NotALearner(id) => MemberFailure::NotALearner(id),
            MembershipError::UnknownNode(id) => MemberFailure::UnknownNode(id),
            MembershipError::NotCaughtUp(id) => MemberFailure::NotCaughtUp(id),
            MembershipError::NoQuorum => MemberFailure::NoQuorum,
            MembershipError::Dropped => MemberFailure::Dropped,
            MembershipError::Timeout => MemberFailure::Timeout,
            MembershipError::Invalid(why) => MemberFailure::Invalid(why),
        }
    }
}

impl MemberFailure {
    /// The library's error, when it is one.
    pub fn as_membership_error(&self) -> Option<MembershipError> {
        Some(match self.clone() {
            MemberFailure::NotLeader(leader) => MembershipError::NotLeader { leader },
            MemberFailure::LeaderAt(leader, _) => MembershipError::NotLeader {
                leader: Some(leader),
            },
            MemberFailure::InProgress => MembershipError::InProgress,
            MemberFailure::Busy => MembershipError::Busy,
            MemberFailure::NotALearner(id) => MembershipError::NotALearner(id),
            MemberFailure::UnknownNode(id) => MembershipError::UnknownNode(id),
            MemberFailure::NotCaughtUp(id) => MembershipError::NotCaughtUp(id),
            MemberFailure::NoQuorum => MembershipError::NoQuorum,
            MemberFailure::Dropped => MembershipError::Dropped,
            MemberFailure::Timeout => MembershipError::Timeout,
            MemberFailure::Invalid(why) => MembershipError::Invalid(why),
            MemberFailure::Transfer(_) | MemberFailure::Other(_) => return None,
        })
    }

    /// Whether asking again later may succeed (a learner catching up, a change or transfer
    /// under way, no leader yet).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            MemberFailure::NotLeader(None)
                | MemberFailure::InProgress
                | MemberFailure::Busy
                | MemberFailure::NotCaughtUp(_)
                | MemberFailure::Dropped
        )
    }
}

impl fmt::Display for MemberFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.as_membership_error()) {
            (_, Some(e)) => write!(f, "{e}"),
            (MemberFailure::Transfer(why), None) => write!(f, "leadership transfer: {why}"),
            (MemberFailure::Other(why), None) => write!(f, "{why}"),
            (other, None) => write!(f, "{other:?}"),
        }
    }
}

/// A node's side of membership: its book, and the answers to member requests.
pub struct MemberService {
    me: NodeId,
    mine: Addrs,
    /// `--peers`.
    static_peers: BTreeMap<NodeId, SocketAddr>,
    replicated: watch::Receiver<Records>,
    /// The cache merged with the replicated records (a replicated record wins).
    known: Mutex<Records>,
    cache_file: Option<PathBuf>,
    /// Changes through this node run one at a time.
    changing: tokio::sync::Mutex<()>,
}

impl fmt::Debug for MemberService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberService")
            .field("me", &self.me)
            .field("book", &self.book())
            .finish()
    }
}

impl MemberService {
    /// Node `me` at `mine`, started with `static_peers`, following `replicated` (from its
    /// [`BookMachine`]); the cache in `cache_file` (if any) is read now and kept up to date.
    pub fn new(
        me: NodeId,
        mine: Addrs,
        static_peers: BTreeMap<NodeId, SocketAddr>,
        replicated: watch::Receiver<Records>,
        cache_file: Option<PathBuf>,
    ) -> Result<Self, String> {
        let mut known = Records::new();
        if let Some(path) = &cache_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for line in text.lines().filter(|l| !l.trim().is_empty()) {
                        let parsed = line.split_once(' ').and_then(|(id, rest)| {
                            Some((id.parse::<NodeId>().ok()?, Record::decode(rest)?))
                        });
                        let (id, record) = parsed.ok_or_else(|| {
                            format!("{}: cannot parse the line `{line}`", path.display())
                        })?;
                        known.insert(id, record);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        let service = MemberService {
            me,
            mine,
            static_peers,
            replicated,
            known: Mutex::new(known),
            cache_file,
            changing: tokio::sync::Mutex::new(()),
        };
        service.sync()?;
        Ok(service)
    }

    /// A receiver of the replicated records, to wait for changes (then call
    /// [`MemberService::sync`]).
    pub fn subscribe(&self) -> watch::Receiver<Records> {
        self.replicated.clone()
    }

    /// Merges the replicated records into the known ones, and writes the cache if they
    /// changed. Returns whether they did.
    pub fn sync(&self) -> Result<bool, String> {
        let replicated = self.replicated.borrow().clone();
        let mut known = self.known.lock();
        let before = known.clone();
        known.extend(replicated);
        while known.len() > MAX_RECORDS {
            known.pop_last();
        }
        if *known == before {
            return Ok(false);
        }
        if let Some(path) = &self.cache_file {
            let text: String = known
                .iter()
                .map(|(id, r)| format!("{id} {}\n", r.encode()))
                .collect();
            write_atomically(path, text.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(true)
    }

    /// Every member this node knows of and its addresses: `--peers` (this node with its
    /// client address), overlaid by the known records; removed members left out.
    pub fn book(&self) -> BTreeMap<NodeId, Addrs> {
        let mut book: BTreeMap<NodeId, Addrs> = self
            .static_peers
            .iter()
            .map(|(id, raft)| {
                let client = (*id == self.me).then_some(self.mine.client).flatten();
                (
                    *id,
                    Addrs {
                        raft: *raft,
                        client,
                    },
                )
            })
            .collect();
        book.insert(self.me, self.mine);
        for (id, record) in self.known.lock().iter() {
            match record {
                Record::Member(a) => {
                    book.insert(*id, *a);
                }
                Record::Removed => {
                    book.remove(id);
                }
            }
        }
        book
    }

    fn view(&self, node: &Node<KvResult>) -> MembersView {
        let m = node.membership();
        let book = self.book();
        MembersView {
            leader: self.me,
            voters: m.voters.iter().copied().collect(),
            outgoing: m.outgoing.iter().copied().collect(),
            learners: m.learners.iter().copied().collect(),
            addrs: m
                .members()
                .into_iter()
                .filter_map(|id| Some((id, *book.get(&id)?)))
                .collect(),
        }
    }

    /// Writes `records` through the log (a session of this node's own, on this node, which
    /// must lead).
    async fn write(
        &self,
        node: &Node<KvResult>,
        records: Vec<(NodeId, Record)>,
    ) -> Result<(), MemberFailure> {
        if records.is_empty() {
            return Ok(());
        }
        let options = ClientOptions {
            deadline: Duration::from_secs(5),
            ..ClientOptions::default()
        };
        let failed = |e: raftkv::kv::ClientError| {
            MemberFailure::Other(format!("cannot write the address book: {e}"))
        };
        let mut client = KvClient::connect(vec![node.clone()], options)
            .await
            .map_err(failed)?;
        for (id, record) in records {
            client
                .put(record_key(id), record.encode().into_bytes())
                .await
                .map_err(failed)?;
        }
        let _ = client.close().await;
        Ok(())
    }

    /// Writes this node's own record if it leads and the stored one differs (so that the
    /// others learn its client address).
    pub async fn register_self(&self, node: &Node<KvResult>) -> Result<(), MemberFailure> {
        if node.status().raft.role != Role::Leader {
            return Ok(());
        }
        let stored = self.replicated.borrow().get(&self.me).copied();
        if stored == Some(Record::Member(self.mine)) || stored == Some(Record::Removed) {
            return Ok(());
        }
        if !node.membership().contains(self.me) {
            return Ok(());
        }
        let _change = self.changing.lock().await;
        self.write(node, vec![(self.me, Record::Member(self.mine))])
            .await
    }

    /// Answers a member request, or `None` if `request` is not one.
    pub async fn answer(
        &self,
        node: &Node<KvResult>,
        request: &ClientRequest,
    ) -> Option<Result<MembersView, MemberFailure>> {
        let is_member_request = matches!(
            request,
            ClientRequest::Members
                | ClientRequest::AddLearner { .. }
                | ClientRequest::Promote(_)
                | ClientRequest::Remove(_)
                | ClientRequest::TransferLeadership(_)
        );
        if !is_member_request {
            return None;
        }
        let status = node.status();
        if status.raft.role != Role::Leader {
            let at = status.raft.leader.and_then(|l| {
                let client = self.book().get(&l)?.client?;
                Some(MemberFailure::LeaderAt(l, client))
            });
            return Some(Err(
                at.unwrap_or(MemberFailure::NotLeader(status.raft.leader))
            ));
        }
        if matches!(request, ClientRequest::Members) {
            return Some(Ok(self.view(node)));
        }
        let _change = self.changing.lock().await;
        Some(self.change(node, request).await)
    }

    async fn change(
        &self,
        node: &Node<KvResult>,
        request: &ClientRequest,
    ) -> Result<MembersView, MemberFailure> {
        match *request {
            ClientRequest::AddLearner { id, raft, client } => {
                let current = node.membership();
                if id == 0 || current.contains(id) {
                    return Err(
                        MembershipError::Invalid(format!("node {id} is already a member")).into(),
                    );
                }
                // The new node's record, and one for each member without one, so that the
                // book every node (the new one included) replays is complete.
                let stored = self.replicated.borrow().clone();
                let book = self.book();
                let mut records: Vec<(NodeId, Record)> = current
                    .members()
                    .into_iter()
                    .filter(|m| !matches!(stored.get(m), Some(Record::Member(_))))
                    .filter_map(|m| Some((m, Record::Member(*book.get(&m)?))))
                    .collect();
                records.push((
                    id,
                    Record::Member(Addrs {
                        raft,
                        client: Some(client),
                    }),
                ));
                self.write(node, records).await?;
                node.add_learner(id).await?;
            }
            ClientRequest::Promote(id) => {
                node.promote(id).await?;
            }
            ClientRequest::Remove(id) => {
                if id == self.me {
                    return Err(MembershipError::Invalid(format!(
                        "node {id} is the leader: transfer leadership first (kv transfer ID)"
                    ))
                    .into());
                }
                node.remove(id).await?;
                self.write(node, vec![(id, Record::Removed)]).await?;
            }
            ClientRequest::TransferLeadership(to) => {
                if to == self.me {
                    return Ok(self.view(node));
                }
                node.transfer_leadership(to)
                    .await
                    .map_err(|e: ProposeError| MemberFailure::Transfer(e.into()))?;
                // The node takes the request at once; the answer waits for the outcome.
                let moved =
                    node.wait_for(|s| s.raft.leader == Some(to) && s.raft.role != Role::Leader);
                if tokio::time::timeout(TRANSFER_WAIT, moved).await.is_err() {
                    let leader = node.status().raft.leader;
                    return Err(MemberFailure::Other(format!(
                        "leadership did not move to node {to} within {TRANSFER_WAIT:?} (the \
                         leader is {}); is it a caught-up voter?",
                        leader.map_or("unknown".to_string(), |l| format!("node {l}"))
                    )));
                }
                let mut view = self.view(node);
                view.leader = to;
                return Ok(view);
            }
            _ => unreachable!("change() is only called with a change request"),
        }
        Ok(self.view(node))
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, never a part:
/// a temporary file, synced, renamed over `path`, then the directory synced.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
