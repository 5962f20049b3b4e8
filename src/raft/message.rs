//! Wire types of the Raft core: log entries, hard state and the messages peers exchange.
//!
//! Everything here is plain data with serde derives, so a host transport can encode it with any
//! serde format (the crate itself uses postcard). Payloads are reference-counted byte slices:
//! cloning an [`Entry`] to send it to several followers never copies the command bytes.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Identifies a node of the cluster. `0` is reserved and never a valid node id.
pub type NodeId = u64;
/// A Raft term. Terms start at 0 and only grow.
pub type Term = u64;
/// A log index. The first real entry has index 1; index 0 is the empty log's sentinel.
pub type Index = u64;

/// An immutable, cheaply clonable byte string (a command, or a chunk of a snapshot).
///
/// The empty payload holds no allocation at all ([`Payload::empty`], `Payload::default()`, or
/// any conversion from no bytes): creating, cloning and dropping it touches no shared
/// reference count, so an empty command costs nothing beyond its log slot.
#[derive(Clone, Default)]
pub struct Payload(Option<Arc<[u8]>>);

impl Payload {
    /// No bytes, without an allocation.
    pub const fn empty() -> Self {
        Payload(None)
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }
    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
    fn shared(bytes: Arc<[u8]>) -> Self {
        if bytes.is_empty() {
            Payload(None)
        } else {
            Payload(Some(bytes))
        }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for Payload {}
impl std::hash::Hash for Payload {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}
impl PartialOrd for Payload {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Payload {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        if v.is_empty() {
            return Payload(None);
        }
        Payload::shared(v.into())
    }
}
impl From<String> for Payload {
    fn from(v: String) -> Self {
        Payload::from(v.into_bytes())
    }
}
impl From<&[u8]> for Payload {
    fn from(v: &[u8]) -> Self {
        if v.is_empty() {
            return Payload(None);
        }
        Payload::shared(v.into())
    }
}
impl<const N: usize> From<&[u8; N]> for Payload {
    fn from(v: &[u8; N]) -> Self {
        Payload::from(v.as_slice())
    }
}
impl From<&str> for Payload {
    fn from(v: &str) -> Self {
        Payload::from(v.as_bytes())
    }
}
impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.as_bytes();
        match std::str::from_utf8(bytes) {
            Ok(s) if bytes.len() <= 64 => write!(f, "{s:?}"),
            _ => write!(f, "<{} bytes>", bytes.len()),
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl<'de> serde::de::Visitor<'de> for BytesVisitor {
            type Value = Payload;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Payload, E> {
                Ok(Payload::from(v))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Payload, E> {
                Ok(Payload::from(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Payload, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Payload::from(v))
            }
        }
        d.deserialize_bytes(BytesVisitor)
    }
}

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPayload {
    /// The empty entry a new leader appends to commit entries of earlier terms (Raft §5.4.2).
    /// It never reaches the state machine.
    Noop,
    /// A command proposed by a client, applied to the state machine once committed.
    Command(Payload),
    /// A new cluster configuration (see [`Membership`](super::Membership)). It takes effect
    /// as soon as it is in a node's log; it never reaches the state machine.
    Membership(super::Membership),
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log (1-based).
    pub index: Index,
    /// Term of the leader that created the entry.
    pub term: Term,
    /// What the entry carries.
    pub payload: EntryPayload,
}

/// Bytes an entry accounts for in batch and memory limits (payload plus a fixed header).
pub const ENTRY_OVERHEAD: u64 = 24;

impl Entry {
    /// Size used for batching limits: payload bytes plus [`ENTRY_OVERHEAD`].
    pub fn size(&self) -> u64 {
        ENTRY_OVERHEAD
            + match &self.payload {
                EntryPayload::Noop => 0,
                EntryPayload::Command(p) => p.len() as u64,
                EntryPayload::Membership(m) => {
                    8 * (m.voters.len() + m.outgoing.len() + m.learners.len()) as u64
                }
            }
    }
    /// The command bytes, if this is a user command.
    pub fn command(&self) -> Option<&Payload> {
        match &self.payload {
            EntryPayload::Command(p) => Some(p),
            EntryPayload::Noop | EntryPayload::Membership(_) => None,
        }
    }
}

/// The state that must be durable before the node relies on it: current term and vote.
///
/// The commit index is deliberately not part of it: it is re-learned from the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, if any.
    pub vote: Option<NodeId>,
}

/// Identifies the last log entry a snapshot covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Index of the last entry included in the snapshot (0 for "no snapshot").
    pub index: Index,
    /// Term of that entry.
    pub term: Term,
}

/// A message between two Raft nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Receiver.
    pub to: NodeId,
    /// Sender's term (for a pre-vote request: the term the sender would campaign in).
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// RequestVote (or PreVote when `pre_vote`), with the candidate's last log position.
    Vote {
        /// A pre-vote asks "would you vote for me" without anyone changing term.
        pre_vote: bool,
        /// Index of the candidate's last log entry.
        last_index: Index,
        /// Term of the candidate's last log entry.
        last_term: Term,
        /// The leader handed its leadership to the candidate ([`MessageBody::TimeoutNow`]):
        /// voters do not hold their leader lease against it.
        transfer: bool,
    },
    /// Answer to [`MessageBody::Vote`].
    VoteResponse {
        /// Answers a pre-vote.
        pre_vote: bool,
        /// Whether the vote was granted.
        granted: bool,
    },
    /// AppendEntries: entries following `(prev_index, prev_term)`, and the leader's commit index.
    Append {
        /// Index of the entry just before `entries`.
        prev_index: Index,
        /// Term of that entry.
        prev_term: Term,
        /// Entries to store (may be empty).
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: Index,
    },
    /// Answer to [`MessageBody::Append`].
    AppendResponse(AppendResponse),
    /// Leader heartbeat. `commit` is capped at what the follower is known to hold.
    Heartbeat {
        /// Commit index the follower may adopt.
        commit: Index,
        /// The leader's latest read round (ReadIndex): echoed back, it proves the leader still
        /// led when the round started.
        read_round: u64,
    },
    /// Answer to [`MessageBody::Heartbeat`].
    HeartbeatResponse {
        /// The heartbeat's read round.
        read_round: u64,
    },
    /// A leader handing over its leadership tells the chosen follower to start an election
    /// at once (Raft thesis §3.10). This crate sends [`MessageBody::TimeoutNowAt`], which a
    /// follower can tell stale; this form is accepted from hosts and peers that send it.
    TimeoutNow,
    /// A follower asks the leader for a read index on behalf of a local read `ctx`.
    ReadIndex {
        /// The follower's identifier of the read.
        ctx: u64,
    },
    /// The leader's answer: reads may be served once `index` is applied (`None`: the leader
    /// could not confirm its leadership; retry).
    ReadIndexResponse {
        /// The read it answers.
        ctx: u64,
        /// The read index.
        index: Option<Index>,
    },
    /// One chunk of the leader's snapshot, for a follower that needs entries the leader has
    /// compacted away. Chunks go in order; `offset == 0` starts a transfer over.
    InstallSnapshot {
        /// The snapshot's last included entry.
        meta: SnapshotMeta,
        /// Total size of the snapshot in bytes.
        size: u64,
        /// Where `data` starts in the snapshot.
        offset: u64,
        /// The bytes `offset..offset + data.len()`.
        data: Payload,
    },
    /// A leader handing over its leadership tells the chosen follower to start an election
    /// at once, naming its last log index when it sent this: the follower acts on it only
    /// while its own log still ends there, so a late or duplicated one from an abandoned
    /// transfer is ignored (see `transfer.rs`).
    TimeoutNowAt {
        /// The leader's last log index when it sent this.
        last_index: Index,
    },
    /// A node recovering from a lost log tail and hard state asks a voter for its current
    /// term (the answer's `term`). Answered whatever the terms, and never makes anyone adopt
    /// the asker's term.
    TermQuery,
    /// Answer to [`MessageBody::TermQuery`]: the message's `term` is the answerer's durable
    /// current term.
    TermAnswer {
        /// The answerer holds no entry and no snapshot (it never has: committed entries are
        /// never dropped, only compacted into a snapshot).
        empty: bool,
    },
    /// Answer to [`MessageBody::InstallSnapshot`].
    SnapshotResponse {
        /// The snapshot's last included index.
        index: Index,
        /// The follower holds every byte before this offset (for `Rejected`: send from here).
        next_offset: u64,
        /// What happened.
        status: SnapshotStatus,
    },
}

/// What a follower did with a snapshot chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotStatus {
    /// Stored (durably); send the next one.
    Accepted,
    /// Not the chunk expected; resume at `next_offset`.
    Rejected,
    /// The last chunk arrived and the snapshot is durably installed.
    Installed,
}

/// Outcome of an AppendEntries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendResponse {
    /// The follower's log now matches the leader's up to `match_index` (and it is durable).
    Accepted {
        /// Highest index known to match the leader's log.
        match_index: Index,
    },
    /// The consistency check failed at `rejected_index` (the request's `prev_index`).
    ///
    /// `hint_index`/`hint_term` let the leader skip a whole term of conflicting entries per
    /// round trip: the follower's entry at `hint_index` has term `hint_term`, the largest index
    /// not above `rejected_index` whose term is not above the request's `prev_term`.
    Rejected {
        /// The `prev_index` that failed the check.
        rejected_index: Index,
        /// Probe hint: an index of the follower's log...
        hint_index: Index,
        /// ...and the follower's term there.
        hint_term: Term,
    },
}
