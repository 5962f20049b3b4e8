//! The [`StateMachine`] trait: the application that committed commands are applied to.

use crate::raft::Index;

/// The replicated application.
///
/// The node calls [`apply`](StateMachine::apply) once for every committed command, in log
/// order, from the node's own thread (never from an async executor thread, so blocking IO in
/// `apply` is fine but delays the node). Commands are applied exactly in the order of their
/// indexes, with no gaps. After a restart the state machine is rebuilt from scratch by
/// re-applying the log (snapshot support comes with snapshots and log compaction), so `apply`
/// must be deterministic: the same commands in the same order must give the same state and the
/// same outputs on every node.
///
/// ```
/// use raftkv::{Index, StateMachine};
///
/// /// Sums the numbers it is sent.
/// #[derive(Default)]
/// struct Counter(i64);
///
/// impl StateMachine for Counter {
///     type Output = i64;
///     fn apply(&mut self, _index: Index, command: &[u8]) -> i64 {
///         let delta = std::str::from_utf8(command).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
///         self.0 += delta;
///         self.0
///     }
/// }
///
/// let mut c = Counter::default();
/// assert_eq!(c.apply(1, b"5"), 5);
/// assert_eq!(c.apply(2, b"-2"), 3);
/// ```
pub trait StateMachine: Send + 'static {
    /// What applying a command returns to the proposer.
    type Output: Send + 'static;

    /// Applies the committed command at `index`.
    fn apply(&mut self, index: Index, command: &[u8]) -> Self::Output;
}
