//! What a test can observe of a simulated [`Cluster`], and the classic test helpers
//! (`commit_on`, `applied_count`, `terms_agree`) that ported test suites lean on.

use super::{Acknowledged, AppliedEntry, Cluster, Life, SimStorage};
use crate::raft::{Index, NodeId, Payload, RaftCore, Status};
use crate::state_machine::StateMachine;
use crate::storage::PersistedSize;
use crate::testing::invariants::Checker;

impl<M: StateMachine, S: SimStorage> Cluster<M, S> {
    /// How many live nodes applied index `index` (in their current incarnation, or through a
    /// snapshot that covers it), and the command there if a node applied it as a command.
    /// The safety checker guarantees they all applied the same entry.
    pub fn applied_count(&self, index: Index) -> (usize, Option<Payload>) {
        let mut count = 0;
        let mut command = None;
        for node in self.nodes.values() {
            let Some(engine) = node.engine() else {
                continue;
            };
            if engine.applied() < index {
                continue;
            }
            count += 1;
            if let Some(e) = node.applied.iter().rev().find(|e| e.index == index) {
                if command.is_none() {
                    command = e.command.clone();
                }
            }
        }
        (count, command)
    }

    /// Commits `command` through whoever leads and waits until at least `expected` live nodes
    /// applied it (retrying on new leaders, as the classic `one()` test helper does), within
    /// `max_ms`. Returns its index.
    pub fn commit_on(
        &mut self,
        command: impl Into<Payload>,
        expected: usize,
        max_ms: u64,
    ) -> Option<Index> {
        let command = command.into();
        let end = self.now + max_ms;
        while self.now < end {
            let Some(leader) = self.run_until_leader(end.saturating_sub(self.now).max(1)) else {
                break;
            };
            let Ok(p) = self.propose(leader, command.clone()) else {
                self.run_for(10);
                continue;
            };
            let target = command.clone();
            let ok = self.run_until(2_000.min(end.saturating_sub(self.now)).max(1), |c| {
                let (n, cmd) = c.applied_count(p.index);
                n >= expected && cmd.as_ref() == Some(&target)
            });
            if ok {
                return Some(p.index);
            }
        }
        None
    }

    /// True if every live node reports the same term (the classic `checkTerms`).
    pub fn terms_agree(&self) -> bool {
        let mut terms = self
            .nodes
            .values()
            .filter_map(|n| n.engine())
            .map(|e| e.core().term());
        let first = terms.next();
        terms.all(|t| Some(t) == first)
    }

    /// Current virtual time in milliseconds.
    pub fn now(&self) -> u64 {
        self.now
    }
    /// Events processed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.config.seed
    }
    /// Ids of all nodes.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }
    /// True if `id` is running.
    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes[&id].engine().is_some()
    }
    /// The core of a running node.
    pub fn core(&self, id: NodeId) -> Option<&RaftCore> {
        self.nodes[&id].engine().map(|e| e.core())
    }
    /// Role, term, leader and indexes of a running node.
    pub fn status(&self, id: NodeId) -> Option<Status> {
        self.core(id).map(RaftCore::status)
    }
    /// A node's state machine (rebuilt at each restart).
    pub fn machine(&self, id: NodeId) -> &M {
        match &self.nodes[&id].life {
            Life::Up(e) => e.machine(),
            Life::Down { machine, .. } => machine,
            Life::Moving => unreachable!("only inside a transition"),
        }
    }
    /// Entries applied by `id` since it last (re)started, with their kind.
    pub fn applied(&self, id: NodeId) -> &[AppliedEntry] {
        &self.nodes[&id].applied
    }
    /// Bytes `id`'s storage keeps durably, as it reports them.
    pub fn persisted_size(&self, id: NodeId) -> PersistedSize {
        self.storage(id).persisted_size()
    }
    /// A handle on `id`'s storage.
    pub fn storage(&self, id: NodeId) -> &S {
        match &self.nodes[&id].life {
            Life::Up(e) => e.storage(),
            Life::Down { storage, .. } => storage,
            Life::Moving => unreachable!("only inside a transition"),
        }
    }
    /// Proposals applied on the node they were proposed to, in the order they were applied.
    pub fn acknowledged(&self) -> &[Acknowledged<M::Output>] {
        &self.acknowledged
    }
    /// Proposals whose log slot was taken by another entry (never applied).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
    /// The safety checker (what it saw, how many checks it made).
    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// Like [`Cluster::assert_acknowledged_committed`], for runs with compaction: an
    /// acknowledged proposal whose entry was compacted away on every node must lie within the
    /// committed prefix and match the committed entry recorded when it was committed.
    pub fn assert_acknowledged_committed_or_compacted(&self) {
        for a in &self.acknowledged {
            assert!(
                self.checker.committed_term(a.index) == Some(a.term),
                "acknowledged command at index {} (term {}) is not the committed entry there (replay with RAFTKV_SEED={})",
                a.index,
                a.term,
                self.config.seed
            );
        }
    }

    /// Asserts that every acknowledged proposal is in the committed log at its index.
    /// Call it once the cluster has had time to commit (for instance after a final leader
    /// election and one proposal).
    pub fn assert_acknowledged_committed(&self) {
        let committed = self.checker.committed_index();
        for a in &self.acknowledged {
            let held = self
                .nodes
                .values()
                .filter_map(|n| n.engine().map(|e| e.core()))
                .filter(|c| c.commit_index() >= a.index)
                .any(|c| {
                    c.log()
                        .get(a.index)
                        .is_some_and(|e| e.term == a.term && e.command() == Some(&a.command))
                });
            assert!(
                held && a.index <= committed,
                "acknowledged command at index {} (term {}) is not committed (replay with RAFTKV_SEED={})",
                a.index,
                a.term,
                self.config.seed
            );
        }
    }
}
