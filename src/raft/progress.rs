//! [`Progress`]: what a leader knows about one follower's log, and how it replicates to it.
//!
//! Modes (as in etcd-io/raft):
//! - **Probe**: the leader does not know where the follower's log matches. It sends one
//!   AppendEntries at a time and waits for the answer (or the next heartbeat response) before
//!   sending another, backing `next_index` up on each rejection.
//! - **Replicate**: the follower matches; the leader streams entries optimistically, advancing
//!   `next_index` as it sends, with at most `max_inflight` unacknowledged messages.
//! - **Snapshot**: the follower needs entries the leader compacted away; the leader streams its
//!   snapshot in chunks (a bounded number in flight) and goes back to probing once the
//!   follower reports it installed.
//!
//! Invariants: `match_index < next_index`; in Replicate mode the in-flight window holds the last
//! index of each unacknowledged message, increasing and all above `match_index`; in Snapshot
//! mode `acked <= sent <= size`.

use std::collections::VecDeque;

use super::{Index, SnapshotMeta};

/// Replication mode of a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// One probe at a time until the match point is found.
    Probe,
    /// Streaming, pipelined.
    Replicate,
    /// Sending a snapshot.
    Snapshot,
}

/// A snapshot transfer to one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotTransfer {
    /// The snapshot being sent.
    pub meta: SnapshotMeta,
    /// Its size in bytes.
    pub size: u64,
    /// The follower holds every byte before this offset.
    pub acked: u64,
    /// Bytes before this offset have been sent.
    pub sent: u64,
    /// True once the first chunk left (a zero-byte snapshot still takes one message).
    pub started: bool,
    /// `acked` when the latest periodic heartbeat left (`u64::MAX` before the first).
    pub acked_at_heartbeat: u64,
    /// Whether `acked` had not moved over the whole heartbeat interval that ended when the
    /// latest periodic heartbeat left. If it still has not moved when that heartbeat is
    /// answered, chunks were lost and the transfer resumes from `acked`. A follower
    /// acknowledges a chunk only once it is durable, so one heartbeat round trip without
    /// progress proves nothing: the chunks in flight may simply be waiting for its fsync.
    pub stalled: bool,
    /// Where the transfer last resumed (after a refusal or a stall).
    pub resumed_at: u64,
    /// How many more refusals naming `resumed_at` to ignore: the chunks that were in flight
    /// when it resumed there are refused one by one as they arrive, and each is an answer to
    /// a chunk already sent again, not news. Once they are counted, a refusal naming
    /// `resumed_at` means a resent chunk was lost too, and the transfer resumes again.
    pub stale_refusals: u64,
}

impl SnapshotTransfer {
    /// Resumes from `at`, the offset the follower holds everything before; refusals of the
    /// chunks in flight now (all but one, for the one being answered when a refusal is the
    /// reason) are expected and will be ignored.
    pub fn resume_at(&mut self, at: u64, chunk: u64, answering: bool) {
        let in_flight = self.sent.saturating_sub(self.acked).div_ceil(chunk.max(1));
        self.stale_refusals = in_flight.saturating_sub(u64::from(answering));
        self.resumed_at = at;
        self.acked = at;
        self.sent = at;
        self.started = at > 0;
        // The chunks sent from here get a whole heartbeat interval before a check may call
        // them lost, as a new transfer's do.
        self.acked_at_heartbeat = u64::MAX;
        self.stalled = false;
    }
}

/// A leader's view of one follower.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to be stored (durably) on the follower.
    pub match_index: Index,
    /// Next index to send.
    pub next_index: Index,
    /// Replication mode.
    pub state: ProgressState,
    /// Probe mode: a probe is outstanding, so do not send another.
    probe_sent: bool,
    /// Replicate mode: last index of each unacknowledged AppendEntries, oldest first.
    inflight: VecDeque<Index>,
    max_inflight: usize,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// Heard from in the check-quorum round before (with `recent_active`: heard from within
    /// the last one to two election timeouts, whenever asked).
    pub active_last_round: bool,
    /// Last index sent when the latest periodic heartbeat left. A heartbeat's answer that
    /// finds `match_index` still below it suggests lost appends (or acknowledgements), or
    /// merely ones still in flight or waiting for the follower's fsync; an empty append
    /// settles which, for the price of one small message.
    pub sent_at_heartbeat: Index,
    /// Set when a periodic heartbeat leaves, taken by the first heartbeat answer after it:
    /// the loss checks run once per heartbeat interval, however many read rounds (which
    /// also travel as heartbeats) are answered meanwhile.
    loss_check_due: bool,
    /// The snapshot transfer, in Snapshot mode.
    pub transfer: Option<SnapshotTransfer>,
    /// Latest read round (ReadIndex) the follower answered.
    pub acked_read_round: u64,
}

impl Progress {
    /// A follower in probe mode, about to be sent `next_index`.
    pub fn new(next_index: Index, max_inflight: usize) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::with_capacity(max_inflight.min(1024)),
            max_inflight,
            recent_active: true,
            active_last_round: true,
            sent_at_heartbeat: 0,
            loss_check_due: false,
            transfer: None,
            acked_read_round: 0,
        }
    }

    /// Number of unacknowledged AppendEntries (Replicate mode).
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// True if nothing may be sent now.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflight.len() >= self.max_inflight,
            ProgressState::Snapshot => false, // the chunk window is checked by the sender
        }
    }

    /// Switches to probing from just after the match point.
    pub fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.inflight.clear();
        self.transfer = None;
    }

    /// Starts (or restarts) sending snapshot `meta` of `size` bytes.
    pub fn become_snapshot(&mut self, meta: SnapshotMeta, size: u64) {
        self.state = ProgressState::Snapshot;
        self.inflight.clear();
        self.probe_sent = false;
        self.transfer = Some(SnapshotTransfer {
            meta,
            size,
            acked: 0,
            sent: 0,
            started: false,
            acked_at_heartbeat: u64::MAX,
            stalled: false,
            resumed_at: 0,
            stale_refusals: 0,
        });
    }

    /// Switches to streaming from just after the match point.
    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.inflight.clear();
        self.transfer = None;
    }

    /// Records that an AppendEntries ending at `last_index` was sent.
    pub fn sent(&mut self, last_index: Index, had_entries: bool) {
        match self.state {
            ProgressState::Probe | ProgressState::Snapshot => self.probe_sent = true,
            ProgressState::Replicate => {
                if had_entries {
                    self.next_index = last_index + 1;
                    self.inflight.push_back(last_index);
                }
            }
        }
    }

    /// The follower holds less than `match_index` (its tail was lost, or a late answer made
    /// it look so): only `proven` is known to match. Probes again from after `probe_hint`.
    pub fn lost_tail(&mut self, proven: Index, probe_hint: Index) {
        self.match_index = self.match_index.min(proven);
        self.become_probe();
        self.next_index = (probe_hint + 1).max(self.match_index + 1);
    }

    /// Heard from within the last one to two election timeouts.
    pub fn heard_lately(&self) -> bool {
        self.recent_active || self.active_last_round
    }

    /// A check-quorum round ends: what was recent becomes last round's.
    pub fn new_round(&mut self) {
        self.active_last_round = self.recent_active;
        self.recent_active = false;
    }

    /// A periodic heartbeat leaves: marks what its answer will check.
    pub fn heartbeat_sent(&mut self) {
        self.sent_at_heartbeat = self.next_index - 1;
        if let Some(t) = self.transfer.as_mut() {
            t.stalled = t.acked == t.acked_at_heartbeat;
            t.acked_at_heartbeat = t.acked;
        }
        self.loss_check_due = true;
    }

    /// True once per periodic heartbeat, at the first heartbeat answer after it: whether to
    /// look for lost messages now.
    pub fn take_loss_check(&mut self) -> bool {
        std::mem::take(&mut self.loss_check_due)
    }

    /// Lets a new probe go out (a heartbeat response arrived).
    pub fn resume(&mut self) {
        self.probe_sent = false;
    }

    /// The follower stores everything through `index`. Returns true if that is news.
    pub fn maybe_update(&mut self, index: Index) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index + 1);
        while self.inflight.front().is_some_and(|&i| i <= index) {
            self.inflight.pop_front();
        }
        updated
    }

    /// The follower rejected an AppendEntries whose `prev_index` was `rejected`; `probe_hint`
    /// is where the leader should look next. Returns false if the rejection is stale.
    pub fn maybe_decrease_to(&mut self, rejected: Index, probe_hint: Index) -> bool {
        match self.state {
            ProgressState::Replicate => {
                if rejected <= self.match_index {
                    return false;
                }
                self.become_probe();
                true
            }
            ProgressState::Snapshot => false,
            ProgressState::Probe => {
                if self.next_index == 0 || self.next_index - 1 != rejected {
                    return false;
                }
                self.next_index = rejected.min(probe_hint + 1).max(self.match_index + 1);
                self.probe_sent = false;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicate_window_pauses_and_frees() {
        let mut p = Progress::new(1, 2);
        p.maybe_update(0);
        p.become_replicate();
        p.sent(5, true);
        p.sent(9, true);
        assert!(p.is_paused());
        assert_eq!(p.next_index, 10);
        assert!(p.maybe_update(5));
        assert!(!p.is_paused());
        assert!(!p.maybe_update(3));
    }

    #[test]
    fn a_lost_tail_lowers_the_match_and_probes_from_the_hint() {
        let mut p = Progress::new(1, 4);
        p.maybe_update(20);
        p.become_replicate();
        p.lost_tail(5, 5);
        assert_eq!(
            (p.match_index, p.next_index, p.state),
            (5, 6, ProgressState::Probe)
        );
        p.maybe_update(20);
        assert_eq!(p.match_index, 20);
    }

    #[test]
    fn probe_backs_up_only_on_fresh_rejections() {
        let mut p = Progress::new(11, 4);
        p.sent(10, true);
        assert!(p.is_paused());
        assert!(!p.maybe_decrease_to(7, 3)); // stale
        assert!(p.maybe_decrease_to(10, 3));
        assert_eq!(p.next_index, 4);
        assert!(!p.is_paused());
    }
}
