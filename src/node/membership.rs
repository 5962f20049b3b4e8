//! Membership changes through the [`Node`](super::Node): the requests, and the changes waiting
//! for their configuration to be in effect and committed.
//!
//! A change resolves once the configuration it leads to — the final one, past the joint
//! configuration — is committed; it fails with [`MembershipError::Dropped`] if its entry was
//! replaced by another leader's, and with [`MembershipError::Timeout`] past the node's
//! proposal timeout (it may still complete).

use std::collections::BTreeSet;
use std::time::Instant;

use futures::channel::oneshot;

use crate::error::MembershipError;
use crate::raft::{Membership, NodeId, Proposed, RaftCore};

/// A change a host asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Add a learner (it replicates, never votes).
    AddLearner(NodeId),
    /// Make a caught-up learner a voter.
    Promote(NodeId),
    /// Remove a voter or a learner.
    Remove(NodeId),
    /// Move to exactly these voters and learners.
    Set {
        /// The voters.
        voters: BTreeSet<NodeId>,
        /// The learners.
        learners: BTreeSet<NodeId>,
    },
}

pub(super) type ChangeReply = oneshot::Sender<Result<Membership, MembershipError>>;

impl Change {
    /// The voters and learners the change leads to from `current`.
    pub(super) fn target(
        &self,
        current: &Membership,
    ) -> Result<(BTreeSet<NodeId>, BTreeSet<NodeId>), MembershipError> {
        let (mut voters, mut learners) = (current.voters.clone(), current.learners.clone());
        match self {
            Change::AddLearner(id) => {
                if current.contains(*id) {
                    return Err(MembershipError::Invalid(format!(
                        "node {id} is already a member"
                    )));
                }
                learners.insert(*id);
            }
            Change::Promote(id) => {
                if !current.learners.contains(id) {
                    return Err(if current.is_voter(*id) {
                        MembershipError::Invalid(format!("node {id} is already a voter"))
                    } else {
                        MembershipError::NotALearner(*id)
                    });
                }
                learners.remove(id);
                voters.insert(*id);
            }
            Change::Remove(id) => {
                if !current.contains(*id) {
                    return Err(MembershipError::UnknownNode(*id));
                }
                voters.remove(id);
                learners.remove(id);
            }
            Change::Set {
                voters: v,
                learners: l,
            } => {
                voters = v.clone();
                learners = l.clone();
            }
        }
        Ok((voters, learners))
    }
}

/// A change proposed and not yet settled.
pub(super) struct Pending {
    pub(super) at: Proposed,
    pub(super) reply: ChangeReply,
    pub(super) deadline: Instant,
}

impl Pending {
    /// `Some(result)` once the change is settled: its entry replaced, or the configuration it
    /// led to (past any joint one) in effect and committed.
    pub(super) fn settled(&self, core: &RaftCore) -> Option<Result<Membership, MembershipError>> {
        let log = core.log();
        let configs = log.configs();
        match log.term(self.at.index) {
            Some(t) if t != self.at.term => return Some(Err(MembershipError::Dropped)),
            None if self.at.index > log.last_index() => return Some(Err(MembershipError::Dropped)),
            _ => {}
        }
        let current = configs.current();
        let done = log.commit() >= self.at.index
            && configs.current_index() <= log.commit()
            && !current.is_joint();
        done.then(|| Ok(current.clone()))
    }
}
