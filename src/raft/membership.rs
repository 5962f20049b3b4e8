//! Cluster membership: who votes, who only replicates, and how a change moves from one
//! configuration to the next without ever allowing two majorities that do not overlap
//! (joint consensus, Raft dissertation §4.3).
//!
//! A change of voters goes through a *joint* configuration `C_old,new`: elections and commits
//! need a majority of the old voters **and** a majority of the new ones. Once the joint
//! configuration is committed the leader appends `C_new`, which takes over once appended.
//! A change that adds or removes learners only (voters unchanged) is a single step.
//!
//! Membership is state, not a flag: a configuration takes effect on a node as soon as its
//! entry is in the node's log, committed or not (§4.1), and goes back if that entry is
//! replaced by a conflicting leader. The configuration in effect at a snapshot's index
//! travels with the snapshot, so a node restored from a snapshot plus its log tail knows its
//! membership without any flag.
//!
//! Invariants ([`Configs`]): the configuration entries kept are those of the retained log,
//! in index order; `base` is the configuration at the snapshot boundary.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Entry, EntryPayload, Index, NodeId};

/// A cluster configuration.
///
/// ```
/// use raftkv::raft::Membership;
///
/// let c = Membership::voters([1, 2, 3]);
/// assert!(c.is_voter(2) && !c.is_joint());
/// // Moving from {1, 2, 3} to {1, 2, 4} goes through the joint configuration.
/// let joint = c.joint_to([1, 2, 4].into(), Default::default());
/// assert!(joint.is_joint());
/// // A quorum of the joint configuration needs a majority of both sides.
/// assert!(!joint.has_quorum(|id| [1, 4].contains(&id))); // not a majority of {1, 2, 3}
/// assert!(joint.has_quorum(|id| [1, 2].contains(&id)));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Membership {
    /// The voters (of the configuration being entered, while joint).
    pub voters: BTreeSet<NodeId>,
    /// While joint: the voters of the configuration being left. Empty otherwise.
    pub outgoing: BTreeSet<NodeId>,
    /// Non-voting members: they receive the log (and snapshots) but never vote and never
    /// count toward a commit.
    pub learners: BTreeSet<NodeId>,
}

/// How an election stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// A quorum granted.
    Won,
    /// A quorum can no longer be reached.
    Lost,
    /// Neither yet.
    Pending,
}

impl Membership {
    /// A configuration of these voters and no learners.
    pub fn voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Membership {
            voters: voters.into_iter().collect(),
            ..Default::default()
        }
    }

    /// True while moving between two sets of voters.
    pub fn is_joint(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// True if `id` votes (in either side of a joint configuration).
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.outgoing.contains(&id)
    }

    /// True if `id` is a voter or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    /// Every member: voters of both sides and learners, in id order, each once.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.voters
            .iter()
            .chain(&self.outgoing)
            .chain(&self.learners)
            .copied()
            .collect()
    }

    /// The joint configuration that moves from this one's voters to `voters`, with
    /// `learners` (a voter may not also be a learner).
    pub fn joint_to(&self, voters: BTreeSet<NodeId>, learners: BTreeSet<NodeId>) -> Membership {
        Membership {
            outgoing: self.voters.clone(),
            learners: learners.difference(&voters).copied().collect(),
            voters,
        }
    }

    /// The configuration a joint one leads to.
    pub fn leave_joint(&self) -> Membership {
        Membership {
            voters: self.voters.clone(),
            outgoing: BTreeSet::new(),
            learners: self.learners.clone(),
        }
    }

    /// True if the nodes `yes` says yes for are a majority of the voters and, while joint,
    /// of the outgoing voters too.
    pub fn has_quorum(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        let majority = |set: &BTreeSet<NodeId>| {
            set.is_empty() || set.iter().filter(|&&id| yes(id)).count() > set.len() / 2
        };
        !self.voters.is_empty() && majority(&self.voters) && majority(&self.outgoing)
    }

    /// The highest index stored on a quorum, given each voter's stored index.
    pub fn committed_index(&self, matched: impl Fn(NodeId) -> Index) -> Index {
        let quorum_index = |set: &BTreeSet<NodeId>| {
            if set.is_empty() {
                return Index::MAX;
            }
            let mut m: Vec<Index> = set.iter().map(|&id| matched(id)).collect();
            m.sort_unstable_by(|a, b| b.cmp(a));
            m[set.len() / 2]
        };
        if self.voters.is_empty() {
            return 0;
        }
        quorum_index(&self.voters).min(quorum_index(&self.outgoing))
    }

    /// How an election stands with these answers (`true`: granted).
    pub fn vote_result(&self, votes: &BTreeMap<NodeId, bool>) -> VoteResult {
        if self.has_quorum(|id| votes.get(&id) == Some(&true)) {
            VoteResult::Won
        } else if !self.has_quorum(|id| votes.get(&id) != Some(&false)) {
            VoteResult::Lost
        } else {
            VoteResult::Pending
        }
    }
}

/// The header a snapshot's bytes begin with: the configuration in effect at the snapshot's
/// index. Written by the host when it takes a snapshot ([`host`](crate::host) does), read
/// when one is restored or installed; the state machine's image follows it.
///
/// Layout: `b"RKM1"`, the postcard length (u32, little-endian), postcard of [`Membership`].
/// A snapshot without it (stored by a host that does not write one) is taken as carrying no
/// configuration: the node keeps the one it had.
pub struct SnapshotHeader;

impl SnapshotHeader {
    const MAGIC: &'static [u8; 4] = b"RKM1";
    /// Bytes before the postcard payload.
    pub const PREFIX: usize = 8;
    /// The largest header accepted when decoding (a corrupt length cannot make a node read
    /// without bound).
    pub const MAX: usize = 1 << 20;

    /// The header for `membership`.
    pub fn encode(membership: &Membership) -> Vec<u8> {
        let body = postcard::to_allocvec(membership).unwrap_or_default();
        let mut out = Vec::with_capacity(Self::PREFIX + body.len());
        out.extend_from_slice(Self::MAGIC);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend(body);
        out
    }

    /// If `prefix` starts with a header: its payload length (the image starts at
    /// `PREFIX + len`). `None` for a snapshot without one.
    pub fn payload_len(prefix: &[u8]) -> Option<usize> {
        if prefix.len() < Self::PREFIX || &prefix[..4] != Self::MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(prefix[4..8].try_into().ok()?) as usize;
        (len <= Self::MAX).then_some(len)
    }

    /// Decodes the payload that followed the prefix.
    pub fn decode(payload: &[u8]) -> Option<Membership> {
        postcard::from_bytes(payload).ok()
    }
}

/// The configurations of the retained log: the one at the snapshot boundary and every
/// configuration entry after it.
#[derive(Clone, Debug, Default)]
pub struct Configs {
    base: Membership,
    entries: Vec<(Index, Membership)>,
}

impl Configs {
    /// The configuration `base` at the snapshot boundary, then those of `entries`.
    pub fn new(base: Membership, entries: &[Entry]) -> Self {
        let mut c = Configs {
            base,
            entries: Vec::new(),
        };
        for e in entries {
            c.appended(e);
        }
        c
    }

    /// The configuration in effect: the latest in the log.
    pub fn current(&self) -> &Membership {
        self.entries.last().map_or(&self.base, |(_, m)| m)
    }

    /// The index of the latest configuration entry (0 when it is the snapshot's).
    pub fn current_index(&self) -> Index {
        self.entries.last().map_or(0, |(i, _)| *i)
    }

    /// The configuration in effect at `index` (for a snapshot taken there).
    pub fn at(&self, index: Index) -> &Membership {
        self.entries
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or(&self.base, |(_, m)| m)
    }

    pub(super) fn appended(&mut self, e: &Entry) {
        if let EntryPayload::Membership(m) = &e.payload {
            debug_assert!(self.entries.last().is_none_or(|(i, _)| *i < e.index));
            self.entries.push((e.index, m.clone()));
        }
    }

    pub(super) fn truncated(&mut self, from: Index) {
        self.entries.retain(|(i, _)| *i < from);
    }

    pub(super) fn compacted(&mut self, through: Index) {
        let keep_from = self.entries.partition_point(|(i, _)| *i <= through);
        if keep_from > 0 {
            self.base = self.entries[keep_from - 1].1.clone();
            self.entries.drain(..keep_from);
        }
    }

    pub(super) fn replaced(&mut self, base: Membership) {
        self.base = base;
        self.entries.clear();
    }

    pub(super) fn set_base(&mut self, base: Membership) {
        self.base = base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joint_quorums_need_both_majorities() {
        let joint = Membership::voters([1, 2, 3]).joint_to([3, 4, 5].into(), BTreeSet::new());
        let matched = |id| [0, 9, 9, 5, 5, 1][id as usize];
        // Old {1,2,3}: 9, 9, 5 -> 9; new {3,4,5}: 5, 5, 1 -> 5.
        assert_eq!(joint.committed_index(matched), 5);
        let mut votes = BTreeMap::new();
        votes.insert(1, true);
        votes.insert(2, true);
        assert_eq!(joint.vote_result(&votes), VoteResult::Pending);
        votes.insert(4, false);
        votes.insert(5, false);
        assert_eq!(joint.vote_result(&votes), VoteResult::Lost);
    }

    #[test]
    fn configs_follow_the_log() {
        let e = |index, m: Membership| Entry {
            index,
            term: 1,
            payload: EntryPayload::Membership(m),
        };
        let a = Membership::voters([1, 2, 3]);
        let b = a.joint_to([1, 2, 3, 4].into(), BTreeSet::new());
        let c = b.leave_joint();
        let mut configs = Configs::new(a.clone(), &[e(5, b.clone()), e(7, c.clone())]);
        assert_eq!(configs.current(), &c);
        assert_eq!(configs.at(6), &b);
        configs.truncated(7);
        assert_eq!(configs.current(), &b);
        configs.compacted(6);
        assert_eq!(configs.current(), &b);
        assert_eq!(configs.at(1), &b);
    }
}
