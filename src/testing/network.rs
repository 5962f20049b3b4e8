//! The simulated network: per-link cuts, random loss, duplication and delay (which reorders),
//! and per-kind traffic counters. All randomness comes from the cluster's seeded generator.

use std::collections::{BTreeMap, BTreeSet};

use crate::raft::{Message, MessageBody, NodeId, Rng};

/// Fault settings of the simulated network.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    /// Probability that a message is lost.
    pub drop_rate: f64,
    /// Probability that a message is delivered twice.
    pub duplicate_rate: f64,
    /// Smallest one-way delay, in virtual milliseconds.
    pub min_delay_ms: u64,
    /// Largest one-way delay; delays are drawn uniformly, so messages overtake each other.
    pub max_delay_ms: u64,
}

impl NetworkConfig {
    /// No loss, no duplication, 1–3 ms delays.
    pub fn reliable() -> Self {
        NetworkConfig {
            drop_rate: 0.0,
            duplicate_rate: 0.0,
            min_delay_ms: 1,
            max_delay_ms: 3,
        }
    }
    /// 10% loss, 5% duplication, 1–30 ms delays (heavy reordering).
    pub fn unreliable() -> Self {
        NetworkConfig {
            drop_rate: 0.1,
            duplicate_rate: 0.05,
            min_delay_ms: 1,
            max_delay_ms: 30,
        }
    }
}

/// Traffic counters for one message kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Messages handed to the network (before loss).
    pub count: u64,
    /// Approximate encoded bytes of those messages.
    pub bytes: u64,
    /// Log entries those messages carried.
    pub entries: u64,
}

/// Short name of a message's kind, the key of the traffic counters.
pub fn kind_of(m: &Message) -> &'static str {
    match &m.body {
        MessageBody::Vote { pre_vote: true, .. } => "PreVote",
        MessageBody::Vote { .. } => "Vote",
        MessageBody::VoteResponse { pre_vote: true, .. } => "PreVoteResponse",
        MessageBody::VoteResponse { .. } => "VoteResponse",
        MessageBody::Append { .. } => "Append",
        MessageBody::AppendResponse(_) => "AppendResponse",
        MessageBody::Heartbeat { .. } => "Heartbeat",
        MessageBody::HeartbeatResponse { .. } => "HeartbeatResponse",
        MessageBody::ReadIndex { .. } => "ReadIndex",
        MessageBody::TimeoutNow | MessageBody::TimeoutNowAt { .. } => "TimeoutNow",
        MessageBody::TermQuery => "TermQuery",
        MessageBody::TermAnswer { .. } => "TermAnswer",
        MessageBody::ReadIndexResponse { .. } => "ReadIndexResponse",
        MessageBody::InstallSnapshot { .. } => "InstallSnapshot",
        MessageBody::SnapshotResponse { .. } => "SnapshotResponse",
    }
}

/// Approximate encoded size: a fixed header plus the entries.
pub fn approx_size(m: &Message) -> u64 {
    32 + match &m.body {
        MessageBody::Append { entries, .. } => entries.iter().map(|e| e.size()).sum(),
        MessageBody::InstallSnapshot { data, .. } => data.len() as u64,
        _ => 0,
    }
}

/// Links, faults and counters.
pub struct Network {
    /// Current fault settings (may be changed between steps).
    pub config: NetworkConfig,
    cut: BTreeSet<(NodeId, NodeId)>,
    traffic: BTreeMap<&'static str, Traffic>,
    filter: Option<Filter>,
    /// `(rate, max_delay_ms)`: see [`Network::set_stragglers`].
    stragglers: Option<(f64, u64)>,
    delay: Option<Delay>,
}

/// A targeted delay: the delay in ms for a message it picks, `None` for the others. It gets
/// the cluster's generator, so its choices replay with the seed.
pub type Delay = Box<dyn FnMut(&Message, &mut Rng) -> Option<u64>>;

/// A targeted fault: returns true for a message that must be lost. It gets the cluster's
/// generator, so its choices replay with the seed.
pub type Filter = Box<dyn FnMut(&Message, &mut Rng) -> bool>;

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("config", &self.config)
            .field("cut", &self.cut)
            .field("traffic", &self.traffic)
            .field("filter", &self.filter.is_some())
            .field("delay", &self.delay.is_some())
            .finish()
    }
}

impl Network {
    pub(crate) fn new(config: NetworkConfig) -> Self {
        Network {
            config,
            cut: BTreeSet::new(),
            traffic: BTreeMap::new(),
            filter: None,
            stragglers: None,
            delay: None,
        }
    }

    /// Stops delivery from `from` to `to` (one direction only).
    pub fn cut(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
    }

    /// Restores delivery from `from` to `to`.
    pub fn restore(&mut self, from: NodeId, to: NodeId) {
        self.cut.remove(&(from, to));
    }

    /// Loses every message `filter` picks (a targeted fault), until cleared.
    pub fn set_filter(&mut self, filter: impl FnMut(&Message, &mut Rng) -> bool + 'static) {
        self.filter = Some(Box::new(filter));
    }

    /// Holds a fraction `rate` of the messages (each copy drawn alone) for up to
    /// `max_delay_ms` instead of the configured delay: a stalled connection or sender, so that
    /// a message arrives long after the state it speaks of has moved on (a TimeoutNow after its
    /// transfer was abandoned, a snapshot chunk after its leader was deposed). A rate of 0
    /// turns it off. Runs without stragglers draw exactly as before.
    pub fn set_stragglers(&mut self, rate: f64, max_delay_ms: u64) {
        self.stragglers = (rate > 0.0).then_some((rate, max_delay_ms));
    }

    /// Holds every message `delay` picks for the delay it returns (a targeted fault: one kind
    /// of message arriving late), until [`Network::clear_delay`].
    pub fn delay_if(&mut self, delay: impl FnMut(&Message, &mut Rng) -> Option<u64> + 'static) {
        self.delay = Some(Box::new(delay));
    }

    /// Removes the targeted delay.
    pub fn clear_delay(&mut self) {
        self.delay = None;
    }

    /// Removes the targeted fault.
    pub fn clear_filter(&mut self) {
        self.filter = None;
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// True if `from` can currently reach `to`.
    pub fn connected(&self, from: NodeId, to: NodeId) -> bool {
        !self.cut.contains(&(from, to))
    }

    /// Traffic counters by message kind.
    pub fn traffic(&self) -> &BTreeMap<&'static str, Traffic> {
        &self.traffic
    }

    /// Total messages handed to the network.
    pub fn total_messages(&self) -> u64 {
        self.traffic.values().map(|t| t.count).sum()
    }

    /// Clears the traffic counters.
    pub fn reset_traffic(&mut self) {
        self.traffic.clear();
    }

    /// Decides the fate of a message: the delays of each copy to deliver (none if lost).
    pub(crate) fn route(&mut self, m: &Message, rng: &mut Rng) -> Vec<u64> {
        let t = self.traffic.entry(kind_of(m)).or_default();
        t.count += 1;
        t.bytes += approx_size(m);
        if let MessageBody::Append { entries, .. } = &m.body {
            t.entries += entries.len() as u64;
        }
        if !self.connected(m.from, m.to) || rng.chance(self.config.drop_rate) {
            return Vec::new();
        }
        if let Some(filter) = self.filter.as_mut() {
            if filter(m, rng) {
                return Vec::new();
            }
        }
        let copies = if rng.chance(self.config.duplicate_rate) {
            2
        } else {
            1
        };
        let (min, max) = (self.config.min_delay_ms, self.config.max_delay_ms);
        let stragglers = self.stragglers;
        let delay = &mut self.delay;
        (0..copies)
            .map(|_| {
                if let Some(ms) = delay.as_mut().and_then(|d| d(m, rng)) {
                    return ms;
                }
                match stragglers {
                    Some((rate, long)) if rng.chance(rate) => rng.range(max, long.max(max) + 1),
                    _ => rng.range(min, max + 1),
                }
            })
            .collect()
    }
}
