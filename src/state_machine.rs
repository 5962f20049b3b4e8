//! The [`StateMachine`] trait: the application that committed commands are applied to, and
//! that snapshots capture so the log can be compacted.

use std::io::{self, Read, Write};

use crate::raft::Index;

/// The replicated application.
///
/// The node calls [`apply`](StateMachine::apply) once for every committed command, in log
/// order with no gaps, from the node's own thread (never from an async executor thread, so
/// blocking IO in `apply` is fine but delays the node). `apply` must be deterministic: the same
/// commands in the same order give the same state and outputs on every node.
///
/// # Snapshots
/// To keep the log bounded the node snapshots the state machine right after applying an
/// entry: [`snapshot`](StateMachine::snapshot) runs on the node thread and must be quick — it
/// returns a point-in-time image (a clone of an `Arc`, a persistent map, or simply the
/// serialized bytes for small state) whose [`SnapshotSource::write_to`] then serializes it on a
/// background thread while the node goes on applying. [`restore`](StateMachine::restore)
/// replaces the whole state with a snapshot's content, at start-up or when the leader sends
/// one. A state machine that keeps its own durable state reports the last index it has
/// durably applied with [`durable_index`](StateMachine::durable_index), and start-up then
/// replays only the entries after it.
///
/// ```
/// use std::io::{Read, Write};
/// use raftkv::{Index, SnapshotSource, StateMachine};
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
///     fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
///         Box::new(self.0.to_le_bytes().to_vec()) // tiny state: serialize right away
///     }
///     fn restore(&mut self, snapshot: &mut dyn Read) -> std::io::Result<()> {
///         let mut b = [0u8; 8];
///         snapshot.read_exact(&mut b)?;
///         self.0 = i64::from_le_bytes(b);
///         Ok(())
///     }
/// }
///
/// let mut c = Counter::default();
/// assert_eq!(c.apply(1, b"5"), 5);
/// let mut bytes = Vec::new();
/// c.snapshot().write_to(&mut bytes).unwrap();
/// let mut d = Counter::default();
/// d.restore(&mut bytes.as_slice()).unwrap();
/// assert_eq!(d.apply(2, b"-2"), 3);
/// ```
pub trait StateMachine: Send + 'static {
    /// What applying a command returns to the proposer.
    type Output: Send + 'static;

    /// Applies the committed command at `index`.
    fn apply(&mut self, index: Index, command: &[u8]) -> Self::Output;

    /// A point-in-time image of the state as of the last applied entry. Must be quick; the
    /// serialization happens in [`SnapshotSource::write_to`], off the node thread.
    fn snapshot(&mut self) -> Box<dyn SnapshotSource>;

    /// Replaces the whole state with a snapshot's content (read it to the end).
    fn restore(&mut self, snapshot: &mut dyn Read) -> io::Result<()>;

    /// Answers a read-only `query` against the current state (called on the node thread, for
    /// [`Node::read`](crate::Node::read), once the node has applied everything the read must
    /// see). `None` (the default) means the state machine does not serve reads this way.
    fn query(&self, query: &[u8]) -> Option<Self::Output> {
        let _ = query;
        None
    }

    /// For a state machine that keeps its own durable state: the last index whose effects
    /// are durable in it (entries up to it are never applied again). `None` (the default)
    /// means the state is rebuilt from the snapshot and the log at every start.
    fn durable_index(&self) -> Option<Index> {
        None
    }
}

/// A point-in-time image of a state machine, serialized off the node thread.
pub trait SnapshotSource: Send + 'static {
    /// Writes the snapshot's content.
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()>;
}

/// Already-serialized state.
impl SnapshotSource for Vec<u8> {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(&self)
    }
}
