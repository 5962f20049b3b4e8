//! [`Config`]: the knobs of one Raft node, every one of them bounded.

use super::NodeId;

/// Configuration of a [`RaftCore`](super::RaftCore).
///
/// Time is counted in ticks: the host calls [`RaftCore::tick`](super::RaftCore::tick) at a fixed
/// interval (the [`Node`](crate::Node) driver uses [`NodeConfig::tick_interval`](crate::NodeConfig)).
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id (non-zero).
    pub id: NodeId,
    /// The voters of a new cluster, this node included: the bootstrap configuration, used
    /// only while the node's storage holds no configuration of its own (once it does, that
    /// one is in effect and this is ignored). Empty for a node that joins an existing
    /// cluster: it learns the configuration from the leader and votes only once a
    /// configuration names it as a voter.
    pub voters: Vec<NodeId>,
    /// Minimum election timeout in ticks; each timeout is drawn from
    /// `election_ticks..2*election_ticks`. Also the check-quorum period and the leader lease.
    pub election_ticks: u32,
    /// A leader sends heartbeats every `heartbeat_ticks` (must be below `election_ticks`).
    pub heartbeat_ticks: u32,
    /// Run a pre-vote round before a real election, so a node that was cut off cannot depose a
    /// healthy leader when it comes back (Raft thesis §9.6).
    pub pre_vote: bool,
    /// A leader that has not heard from a majority within an election timeout steps down, and
    /// followers that hear from a leader ignore vote requests for that long.
    pub check_quorum: bool,
    /// At most this many entries in one AppendEntries.
    pub max_append_entries: usize,
    /// At most this many bytes of entries ([`Entry::size`](super::Entry::size)) in one
    /// AppendEntries (at least one entry is always sent).
    pub max_append_bytes: u64,
    /// At most this many AppendEntries in flight (unacknowledged) per follower.
    pub max_inflight: usize,
    /// The largest entry ([`Entry::size`](super::Entry::size)) a leader takes: a bigger
    /// proposal is refused with [`CoreProposeError::TooLarge`](crate::error::CoreProposeError).
    /// An entry larger than `max_append_bytes` travels alone in its AppendEntries. A transport
    /// must carry messages of [`Config::max_message_bytes`] (default 8 MiB).
    pub max_entry_bytes: u64,
    /// A leader refuses proposals while its uncommitted tail holds this many bytes.
    pub max_uncommitted_bytes: u64,
    /// At most this many bytes of committed entries handed out in one [`Ready`](super::Ready).
    pub max_apply_bytes: u64,
    /// Bytes per snapshot chunk sent to a follower (default 1 MiB).
    pub snapshot_chunk_bytes: u64,
    /// Snapshot chunks in flight per follower at most (default 4).
    pub max_snapshot_chunks_inflight: u64,
    /// Seed of the generator that randomizes election timeouts. Give every node its own.
    pub seed: u64,
}

impl Config {
    /// A configuration with the defaults below for node `id` of a cluster of `voters`.
    ///
    /// Defaults: election 10 ticks, heartbeat 1 tick, pre-vote and check-quorum on, 256 entries
    /// or 1 MiB per append, 64 appends in flight, entries of at most 8 MiB, 64 MiB uncommitted, 16 MiB applied per ready,
    /// snapshot chunks of 1 MiB with 4 in flight, seed = id.
    pub fn new(id: NodeId, voters: impl Into<Vec<NodeId>>) -> Self {
        Config {
            id,
            voters: voters.into(),
            election_ticks: 10,
            heartbeat_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            max_append_entries: 256,
            max_append_bytes: 1 << 20,
            max_inflight: 64,
            max_entry_bytes: 8 << 20,
            max_uncommitted_bytes: 64 << 20,
            max_apply_bytes: 16 << 20,
            snapshot_chunk_bytes: 1 << 20,
            max_snapshot_chunks_inflight: 4,
            seed: id,
        }
    }

    /// An upper bound on the encoded size (postcard, as [`crate::wire`] frames it) of any
    /// message this node sends: one AppendEntries holds at most `max_append_bytes` of entries,
    /// or a single entry of up to `max_entry_bytes`; a snapshot chunk holds
    /// `snapshot_chunk_bytes`. Size a transport's frame limit from this, so that no message the
    /// core produces is ever too large to deliver (a dropped oversized append would stall
    /// replication for good).
    pub fn max_message_bytes(&self) -> u64 {
        let payload = self
            .max_append_bytes
            .max(self.max_entry_bytes)
            .max(self.snapshot_chunk_bytes);
        // Per entry, postcard spends at most 26 bytes on index, term, kind and length, which
        // `Entry::size` counts as 24; the message itself (ids, terms, indexes, lengths) takes
        // well under 128 bytes.
        payload + 2 * self.max_append_entries as u64 + 128
    }

    /// Checks the configuration; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("node id 0 is reserved".into());
        }
        // An empty list is a node joining an existing cluster: it learns the configuration
        // from the leader and votes only once a configuration names it.
        if !self.voters.is_empty() && !self.voters.contains(&self.id) {
            return Err(format!(
                "node {} is not among the voters {:?}",
                self.id, self.voters
            ));
        }
        let mut sorted = self.voters.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.voters.len() || sorted.first() == Some(&0) {
            return Err(format!("voters {:?} repeat an id or use 0", self.voters));
        }
        if self.heartbeat_ticks == 0 || self.heartbeat_ticks >= self.election_ticks {
            return Err("need 0 < heartbeat_ticks < election_ticks".into());
        }
        if self.max_append_entries == 0
            || self.max_inflight == 0
            || self.max_append_bytes == 0
            || self.max_entry_bytes < super::ENTRY_OVERHEAD
            || self.snapshot_chunk_bytes == 0
            || self.max_snapshot_chunks_inflight == 0
        {
            return Err("batch and in-flight limits must be positive".into());
        }
        Ok(())
    }
}
