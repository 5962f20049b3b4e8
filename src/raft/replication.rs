//! Log replication, the leader's and the follower's halves: AppendEntries and its answers,
//! heartbeats, the commit rule, and sending batches within each follower's window.
//!
//! Invariants: a leader only ever appends to its log; an append answered `Accepted` means the
//! follower's log matches the leader's through `match_index` and is durable there; the commit
//! index moves only to an index stored on a majority whose entry is of the current term, and
//! the leader counts itself only through what its storage reported durable. A follower found
//! holding less than the leader believed (its tail was lost) is noticed, its match lowered,
//! and it is probed again from where it really is.

use super::core::{Dispatch, RaftCore};
use super::progress::ProgressState;
use super::{AppendResponse, Entry, Index, Message, MessageBody, NodeId, Term};

impl RaftCore {
    pub(super) fn handle_append(
        &mut self,
        leader: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
    ) {
        let mut entries = entries;
        if !self.fit_to_log_limit(&mut entries) {
            return; // at the log limit: as if lost, until the due snapshot compacts the log
        }
        let response = if prev_index < self.log.commit() {
            // Everything up to our commit index matches any leader's log; take what follows.
            let skip = (self.log.commit() - prev_index) as usize;
            let commit_index = self.log.commit();
            let commit_term = self.log.term(commit_index).unwrap_or(0);
            let rest: Vec<Entry> = entries.into_iter().skip(skip).collect();
            let last_new = commit_index + rest.len() as u64;
            match self
                .log
                .maybe_append(commit_index, commit_term, commit, rest)
            {
                Some(_) => AppendResponse::Accepted {
                    match_index: last_new,
                },
                None => AppendResponse::Accepted {
                    match_index: commit_index,
                },
            }
        } else if let Some(last_new) = self
            .log
            .maybe_append(prev_index, prev_term, commit, entries)
        {
            AppendResponse::Accepted {
                match_index: last_new,
            }
        } else {
            let (hint_index, hint_term) = self
                .log
                .find_conflict_by_term(prev_index.min(self.log.last_index()), prev_term);
            AppendResponse::Rejected {
                rejected_index: prev_index,
                hint_index,
                hint_term,
            }
        };
        if let AppendResponse::Accepted { match_index } = response {
            self.snapshot_overtaken();
            self.maybe_recovered(commit, match_index);
        }
        // An acknowledgement claims durability: it leaves after this batch is persisted.
        self.send(
            leader,
            MessageBody::AppendResponse(response),
            Dispatch::AfterPersist,
        );
    }

    /// Keeps of an append's entries what the log limit lets in (a prefix; the leader sends
    /// the rest again). False if none of the new entries may be taken now.
    fn fit_to_log_limit(&self, entries: &mut Vec<Entry>) -> bool {
        let last = self.log.last_index();
        let mut grown = 0;
        let mut keep = 0;
        for e in entries.iter() {
            if e.index > last {
                // The first new entry goes in whenever growth is allowed at all (so the
                // leader is never refused for good); later ones only within the limit.
                let takes = if grown == 0 {
                    self.log_takes(e.size())
                } else {
                    self.log_within_limit(grown + e.size())
                };
                if !takes {
                    break;
                }
                grown += e.size();
            }
            keep += 1;
        }
        if keep == entries.len() {
            return true;
        }
        let new_at_all = entries.iter().any(|e| e.index > last);
        entries.truncate(keep);
        !(new_at_all && grown == 0)
    }

    pub(super) fn handle_heartbeat(&mut self, leader: NodeId, commit: Index, read_round: u64) {
        // The leader caps `commit` at what it believes we hold. If we hold less, our tail was
        // lost: say so, so that it probes us from where we really are.
        if commit > self.log.last_index() {
            let body = MessageBody::AppendResponse(AppendResponse::Rejected {
                rejected_index: commit,
                hint_index: self.log.last_index(),
                hint_term: self.log.last_term(),
            });
            self.send(leader, body, Dispatch::AfterPersist);
        }
        self.log.commit_to(commit.min(self.log.last_index()));
        self.snapshot_overtaken();
        // A heartbeat answer claims nothing about the log, only our term: once that term is
        // durable it may leave at once, so confirming a read (ReadIndex) does not wait for
        // this follower's fsync of unrelated appends.
        let body = MessageBody::HeartbeatResponse { read_round };
        let when = if self.durable_term == self.term {
            Dispatch::Now
        } else {
            Dispatch::AfterPersist
        };
        self.send(leader, body, when);
    }

    pub(super) fn step_leader(&mut self, m: Message) {
        let from = m.from;
        match m.body {
            MessageBody::AppendResponse(AppendResponse::Accepted { match_index }) => {
                let Some(p) = self.leader_mut().and_then(|l| l.progress.get_mut(&from)) else {
                    return;
                };
                p.recent_active = true;
                let updated = p.maybe_update(match_index);
                // A follower in snapshot mode that reports a match at or past the snapshot
                // already has it (its "installed" answer may have been lost).
                let snapshot_done = p.transfer.is_some_and(|t| p.match_index >= t.meta.index);
                if (updated && p.state == ProgressState::Probe) || snapshot_done {
                    p.become_replicate();
                }
                if updated {
                    self.maybe_commit();
                    self.maybe_send_timeout_now(from);
                }
            }
            MessageBody::AppendResponse(AppendResponse::Rejected {
                rejected_index,
                hint_index,
                hint_term,
            }) => {
                // Skip every entry of ours whose term exceeds the follower's at the hint.
                let (probe, _) = self.log.find_conflict_by_term(hint_index, hint_term);
                let hint_matches = self.log.matches(hint_index, hint_term);
                let Some(p) = self.leader_mut().and_then(|l| l.progress.get_mut(&from)) else {
                    return;
                };
                p.recent_active = true;
                if rejected_index <= p.match_index && hint_index < p.match_index {
                    // A correct follower holds everything through its match, so it rejects
                    // an index at or below it only in a late answer; one whose log ends
                    // below its match lost its tail. Either way the match is not to be
                    // trusted: lower it to what the hint proves and probe from there.
                    let proven = if hint_matches { hint_index } else { 0 };
                    p.lost_tail(proven, probe);
                } else {
                    p.maybe_decrease_to(rejected_index, probe);
                }
            }
            MessageBody::ReadIndex { ctx } => self.handle_read_request(from, ctx),
            MessageBody::HeartbeatResponse { read_round } => {
                self.read_round_acknowledged(from, read_round);
                let last = self.log.last_index();
                let commit = self.log.commit();
                let Some(p) = self.leader_mut().and_then(|l| l.progress.get_mut(&from)) else {
                    return;
                };
                p.recent_active = true;
                p.resume();
                if !p.take_loss_check() {
                    // A read round's answer, or a second answer to one heartbeat: the check
                    // ran already in this interval.
                } else if p.state == ProgressState::Snapshot {
                    self.check_snapshot_progress(from);
                } else if p.state == ProgressState::Replicate
                    && p.match_index < p.sent_at_heartbeat.min(last)
                {
                    // What was sent before this heartbeat is still unacknowledged: the append
                    // or its acknowledgement may be lost (the window may even be full of
                    // them), or the acknowledgement merely waits for the follower's fsync.
                    // An empty append at `next_index` settles it for the price of one small
                    // message: accepted, it frees the window; rejected, it sends the follower
                    // back to probing. So a lost message costs at most one heartbeat and a few
                    // round trips.
                    let prev_index = p.next_index - 1;
                    if let Some(prev_term) = self.log.term(prev_index) {
                        let body = MessageBody::Append {
                            prev_index,
                            prev_term,
                            entries: vec![],
                            commit,
                        };
                        self.send(from, body, Dispatch::Now);
                    } else if let Some(p) =
                        self.leader_mut().and_then(|l| l.progress.get_mut(&from))
                    {
                        // Compacted meanwhile: probe again, which leads to the snapshot.
                        p.become_probe();
                    }
                }
            }
            MessageBody::SnapshotResponse {
                index,
                next_offset,
                status,
            } => self.handle_snapshot_response(from, index, next_offset, status),
            _ => {}
        }
    }

    pub(super) fn quorum_recently_active(&self) -> bool {
        let me = self.cfg.id;
        let Some(l) = self.leader_state() else {
            return false;
        };
        self.membership()
            .has_quorum(|id| id == me || l.progress.get(&id).is_some_and(|p| p.recent_active))
    }

    /// Commits the highest index stored by a quorum (of both sides of a joint
    /// configuration), if it is of the current term. This node counts only through what its
    /// storage reported durable; learners never count.
    pub(super) fn maybe_commit(&mut self) {
        let persisted = self.log.persisted();
        let me = self.cfg.id;
        let Some(l) = self.leader_state() else { return };
        let candidate = self.membership().committed_index(|id| {
            if id == me {
                persisted
            } else {
                l.progress.get(&id).map_or(0, |p| p.match_index)
            }
        });
        if candidate > self.log.commit() && self.log.term(candidate) == Some(self.term) {
            let released = self.log.bytes_between(self.log.commit() + 1, candidate + 1);
            if let Some(l) = self.leader_mut() {
                l.uncommitted_bytes = l.uncommitted_bytes.saturating_sub(released);
            }
            self.log.commit_to(candidate);
            self.release_reads_waiting_for_commit();
            self.membership_committed();
        }
    }

    /// True if something may be sent to `to` now.
    pub(super) fn wants_send(&self, to: NodeId) -> bool {
        let Some(p) = self.leader_state().and_then(|l| l.progress.get(&to)) else {
            return false;
        };
        !p.is_paused()
            && match p.state {
                ProgressState::Replicate => p.next_index <= self.log.last_index(),
                ProgressState::Probe => p.match_index < self.log.last_index(),
                ProgressState::Snapshot => self.wants_snapshot_chunk(to),
            }
    }

    /// Sends every follower what it may be sent now: batches bounded by count and bytes, as
    /// many as its in-flight window allows (one probe in probe mode).
    pub(super) fn send_appends(&mut self) {
        let peers: Vec<NodeId> = match self.leader_state() {
            Some(l) => l.progress.keys().copied().collect(),
            None => return,
        };
        for to in peers {
            while self.wants_send(to) {
                let Some(p) = self.progress(to) else { break };
                if p.state == ProgressState::Snapshot {
                    self.send_snapshot_chunk(to);
                    continue;
                }
                let next = p.next_index;
                let prev_index = next - 1;
                let Some(prev_term) = self.log.term(prev_index) else {
                    // It needs entries we compacted away: send the snapshot instead.
                    self.start_snapshot_transfer(to);
                    continue;
                };
                let entries = self.log.slice(
                    next,
                    self.log.last_index() + 1,
                    self.cfg.max_append_entries,
                    self.cfg.max_append_bytes,
                );
                let last = prev_index + entries.len() as u64;
                let had_entries = !entries.is_empty();
                let body = MessageBody::Append {
                    prev_index,
                    prev_term,
                    entries,
                    commit: self.log.commit(),
                };
                self.send(to, body, Dispatch::Now);
                let Some(p) = self.leader_mut().and_then(|l| l.progress.get_mut(&to)) else {
                    break;
                };
                p.sent(last, had_entries);
                if p.state == ProgressState::Probe {
                    break;
                }
            }
        }
    }

    /// Sends every follower a heartbeat carrying the current read round. A `periodic` one
    /// (the tick's, not a read round's) also marks what the loss checks of its answers
    /// compare with, so that they run once per heartbeat interval.
    pub(super) fn broadcast_heartbeat(&mut self, periodic: bool) {
        let commit = self.log.commit();
        let Some(l) = self.leader_mut() else { return };
        let read_round = l.read_round;
        let beats: Vec<(NodeId, Index)> = l
            .progress
            .iter_mut()
            .map(|(&id, p)| {
                if periodic {
                    p.heartbeat_sent();
                }
                (id, p.match_index.min(commit))
            })
            .collect();
        for (to, commit) in beats {
            self.send(
                to,
                MessageBody::Heartbeat { commit, read_round },
                Dispatch::Now,
            );
        }
    }
}
