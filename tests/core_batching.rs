//! Scripted stories of what a batching host makes happen: several messages stepped before one
//! `ready()`, batches written but not yet synced while the node goes on stepping, crashes in
//! that window. Each story is a defect that the one-message-per-Ready harness could not reach
//! (issue "One host engine"); each asserts what the node promised against what its storage
//! holds.

use raftkv::raft::{
    AppendResponse, Config, Entry, EntryPayload, Message, MessageBody, Payload, RaftCore, Role,
    SnapshotMeta, SnapshotStatus,
};
use raftkv::storage::{MemStorage, Storage};
use raftkv::testing::Lockstep;

fn plain(_: &mut Config) {}

fn entries(from: u64, terms: &[u64]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &term)| Entry {
            index: from + i as u64,
            term,
            payload: EntryPayload::Command(Payload::from(format!("e{}", from + i as u64))),
        })
        .collect()
}

fn append(from: u64, to: u64, term: u64, prev: (u64, u64), es: Vec<Entry>, commit: u64) -> Message {
    Message {
        from,
        to,
        term,
        body: MessageBody::Append {
            prev_index: prev.0,
            prev_term: prev.1,
            entries: es,
            commit,
        },
    }
}

fn chunk(
    from: u64,
    to: u64,
    term: u64,
    meta: SnapshotMeta,
    size: u64,
    offset: u64,
    data: &str,
) -> Message {
    Message {
        from,
        to,
        term,
        body: MessageBody::InstallSnapshot {
            meta,
            size,
            offset,
            data: Payload::from(data),
        },
    }
}

/// The highest match index `from` acknowledged in the queued messages.
fn acked_match(net: &Lockstep, from: u64) -> Option<u64> {
    net.pending()
        .iter()
        .filter(|m| m.from == from)
        .filter_map(|m| match m.body {
            MessageBody::AppendResponse(AppendResponse::Accepted { match_index }) => {
                Some(match_index)
            }
            _ => None,
        })
        .max()
}

/// Defect 1 (critical): the last chunk of an old leader's snapshot and the new leader's append
/// right after it, stepped before one `ready()`. The batch holds the install *and* the new
/// entries; writing the entries first and then installing threw the entries away while the
/// follower acknowledged them.
#[test]
fn a_snapshot_and_the_appends_after_it_in_one_batch_keep_what_is_acknowledged() {
    // Node 3 holds a divergent tail (term 2) through 8; the snapshot through 5 is of term 3.
    let mut net = Lockstep::with_logs(
        &[
            &[1, 1, 1, 3, 3],
            &[1, 1, 1, 3, 3, 4],
            &[1, 1, 1, 2, 2, 2, 2, 2],
        ],
        plain,
    );
    let meta = SnapshotMeta { index: 5, term: 3 };
    net.step_only(chunk(1, 3, 3, meta, 3, 0, "abc"));
    net.step_only(append(2, 3, 4, (5, 3), entries(6, &[4]), 5));
    net.flush(3);
    let matched = acked_match(&net, 3).expect("the append is acknowledged");
    assert_eq!(matched, 6);
    let storage = net.storage(3);
    assert_eq!(storage.durable_snapshot(), meta);
    assert_eq!(
        storage.durable_term(6),
        Some(4),
        "node 3 acknowledged entry 6 that its storage does not hold"
    );
    assert_eq!(net.core(3).log().last_index(), 6);
}

/// Defect 1, second face: an append of 5..=10 and then the last chunk of a snapshot at 7 into
/// a follower holding 1..=4. The log holds the snapshot's entry after the append, so only the
/// commit moves; nothing is installed and the appended entries are written whole.
#[test]
fn a_snapshot_the_log_already_reached_in_the_same_batch_only_moves_the_commit() {
    let mut net = Lockstep::with_logs(&[&[1, 1, 1, 1, 2, 2, 2, 2, 2, 2], &[1; 4], &[1; 4]], plain);
    let meta = SnapshotMeta { index: 7, term: 2 };
    net.step_only(append(1, 2, 2, (4, 1), entries(5, &[2; 6]), 4));
    net.step_only(chunk(1, 2, 2, meta, 2, 0, "xy"));
    net.flush(2);
    assert_eq!(net.storage(2).last_index(), 10);
    assert_eq!(net.storage(2).durable_term(10), Some(2));
    assert_eq!(net.core(2).commit_index(), 7);
    assert!(net.installed().is_empty());
    let installed = net.pending().iter().any(|m| {
        matches!(
            m.body,
            MessageBody::SnapshotResponse {
                status: SnapshotStatus::Installed,
                index: 7,
                ..
            }
        )
    });
    assert!(
        installed,
        "the leader learns the snapshot is no longer needed"
    );
}

/// Defect 2 (high): a follower whose longer, divergent log is replaced by a snapshot kept its
/// old, higher persisted index; elected later, it would count it as its own durable write.
#[test]
fn a_replacing_snapshot_lowers_what_the_node_believes_durable_until_the_install_is_synced() {
    let mut net = Lockstep::with_logs(
        &[
            &[1, 1, 1, 3, 3],
            &[1, 1, 1, 3, 3],
            &[1, 1, 1, 2, 2, 2, 2, 2],
        ],
        plain,
    );
    assert_eq!(net.core(3).log().persisted(), 8);
    net.hold(3);
    net.step_only(chunk(
        1,
        3,
        3,
        SnapshotMeta { index: 5, term: 3 },
        1,
        0,
        "s",
    ));
    net.flush(3);
    let core = net.core(3);
    core.check_invariants();
    assert!(
        core.log().persisted() <= core.log().commit().min(3),
        "persisted {} survives the replaced log",
        core.log().persisted()
    );
    net.release(3);
    assert_eq!(net.core(3).log().persisted(), 5);
    net.core(3).check_invariants();
}

/// Defect 3: a transfer abandoned half-way (the leader caught the follower up with appends
/// instead) left the follower "receiving a snapshot" for ever, which blocks local snapshots.
#[test]
fn an_abandoned_snapshot_transfer_does_not_block_the_follower_for_ever() {
    let meta = SnapshotMeta { index: 3, term: 1 };
    // Overtaken by appends of the same leader.
    let mut net = Lockstep::with_logs(&[&[1, 1, 1, 1], &[1], &[1]], plain);
    net.send(chunk(1, 2, 1, meta, 4, 0, "ab"));
    assert!(net.core(2).receiving_snapshot());
    net.send(append(1, 2, 1, (1, 1), entries(2, &[1, 1, 1]), 4));
    assert!(!net.core(2).receiving_snapshot());
    // Left behind by a new term.
    net.send(chunk(1, 3, 1, meta, 4, 0, "ab"));
    assert!(net.core(3).receiving_snapshot());
    net.send(Message {
        from: 2,
        to: 3,
        term: 2,
        body: MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        },
    });
    assert!(!net.core(3).receiving_snapshot());
    // Simply stopped: an election timeout without chunks.
    let mut net = Lockstep::with_logs(&[&[1, 1, 1, 1], &[1], &[1]], plain);
    net.send(chunk(1, 2, 1, meta, 4, 0, "ab"));
    let ticks = net.core(2).config().election_ticks as usize;
    for _ in 0..ticks {
        net.core_mut(2).tick();
    }
    assert!(!net.core(2).receiving_snapshot());
}

/// Defect 4: read ids restarted at 1 on every start and a follower accepted any answer of its
/// term, so an answer meant for the previous incarnation confirmed a new read at a stale index.
#[test]
fn an_answer_meant_for_another_incarnation_never_confirms_a_read() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.propose(1, "a").unwrap();
    // Node 2 forwards a read; the leader's answer is held back.
    net.core_mut(2).read_index(1).unwrap();
    net.flush(2);
    let forwarded = net.take_pending();
    let wire = forwarded
        .iter()
        .find_map(|m| match m.body {
            MessageBody::ReadIndex { ctx } if m.from == 2 => Some(ctx),
            _ => None,
        })
        .expect("forwarded");
    let stale_index = net.core(1).commit_index();
    // Node 2 restarts; a write completes; node 2 asks again with the same host id.
    net.restart(2);
    net.propose(1, "b").unwrap();
    net.tick(1, 1);
    net.stabilize();
    net.core_mut(2).read_index(1).unwrap();
    net.flush(2);
    let renewed = net.take_pending();
    assert!(renewed
        .iter()
        .all(|m| !matches!(m.body, MessageBody::ReadIndex { ctx } if ctx == wire)));
    // The old incarnation's answer arrives now: it must not confirm the new read.
    net.send(Message {
        from: 1,
        to: 2,
        term: net.core(1).term(),
        body: MessageBody::ReadIndexResponse {
            ctx: wire,
            index: Some(stale_index),
        },
    });
    assert!(
        net.read_states().iter().all(|(node, _)| *node != 2),
        "a stale answer confirmed node 2's read: {:?}",
        net.read_states()
    );
    // The real answer to the new request does.
    for m in renewed {
        net.send(m);
    }
    let confirmed: Vec<_> = net.read_states().iter().filter(|(n, _)| *n == 2).collect();
    assert_eq!(confirmed.len(), 1);
    assert!(confirmed[0].1.index > stale_index);
}

/// Defect 4, the other half: a follower's forwarded reads fail when its leader changes.
#[test]
fn forwarded_reads_fail_when_the_leader_changes() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.core_mut(2).read_index(9).unwrap();
    net.flush(2);
    net.take_pending(); // the leader never answers
    net.campaign(3);
    assert!(net.failed_reads().contains(&(2, 9)));
}

/// Defect 5: a partial transfer resumed whenever (meta, size) matched, even from another
/// leader: two leaders' images of the same index and size would be spliced into one file.
#[test]
fn chunks_of_two_leaders_are_never_spliced() {
    let meta = SnapshotMeta { index: 3, term: 1 };
    let mut net = Lockstep::with_logs(&[&[1, 1, 1], &[1, 1, 1], &[1]], plain);
    net.send(chunk(1, 3, 1, meta, 4, 0, "ab"));
    // Leader 2 of term 2 resumes "its" transfer at offset 2.
    net.clear_delivered();
    net.send(chunk(2, 3, 2, meta, 4, 2, "YZ"));
    let answer = net
        .delivered()
        .iter()
        .find_map(|m| match m.body {
            MessageBody::SnapshotResponse {
                next_offset,
                status,
                ..
            } if m.from == 3 => Some((next_offset, status)),
            _ => None,
        })
        .expect("node 3 answers");
    assert_eq!(answer, (0, SnapshotStatus::Rejected), "must restart at 0");
    net.send(chunk(2, 3, 2, meta, 4, 0, "WX"));
    net.send(chunk(2, 3, 2, meta, 4, 2, "YZ"));
    assert_eq!(net.storage(3).snapshot().unwrap().unwrap().1, b"WXYZ");
}

/// Defect 6: a TimeoutNow from an abandoned transfer, delivered late, deposed a healthy
/// leader with a lease-bypassing election.
#[test]
fn a_late_timeout_now_from_an_abandoned_transfer_is_ignored() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.propose(1, "x").unwrap();
    net.drop_if(|m| matches!(m.body, MessageBody::TimeoutNowAt { .. }));
    let mut late = None;
    net.core_mut(1).transfer_leadership(2).unwrap();
    net.flush(1);
    for m in net.take_pending() {
        if matches!(m.body, MessageBody::TimeoutNowAt { .. }) {
            late = Some(m);
        }
    }
    let late = late.expect("the leader told node 2 to campaign");
    net.clear_filter();
    // The transfer is abandoned after an election timeout; the leader leads on.
    let ticks = net.core(1).config().election_ticks as usize;
    net.tick(1, ticks);
    net.stabilize();
    assert_eq!(net.core(1).transferee(), None);
    let term = net.core(1).term();
    net.send(late);
    assert_eq!(net.core(1).role(), Role::Leader);
    assert_eq!(
        net.core(2).term(),
        term,
        "node 2 campaigned on a stale TimeoutNow"
    );
}

/// Defect 7: a follower whose log is shorter than what it once acknowledged (its disk was
/// wiped) was never probed again: the leader took every rejection below the old match as
/// stale.
#[test]
fn a_follower_that_lost_its_log_is_brought_back() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    for i in 0..5 {
        net.propose(1, format!("x{i}").as_str()).unwrap();
    }
    net.tick(1, 1);
    net.stabilize();
    let last = net.core(1).log().last_index();
    assert_eq!(net.core(3).log().last_index(), last);
    net.wipe(3);
    assert_eq!(net.core(3).log().last_index(), 0);
    for _ in 0..3 {
        net.tick(1, 1);
        net.stabilize();
    }
    assert_eq!(net.core(3).log().last_index(), last);
    assert_eq!(net.core(1).progress(3).unwrap().match_index, last);
}

/// Defect 9: a core restored with a snapshot but without its size would stream an empty
/// snapshot to followers.
#[test]
fn a_core_cannot_know_a_snapshot_without_its_size() {
    let meta = SnapshotMeta { index: 5, term: 1 };
    let hs = raftkv::raft::HardState {
        term: 1,
        vote: None,
    };
    let new = RaftCore::new(Config::new(1, vec![1, 2]), Default::default(), meta, vec![]);
    assert!(new.is_err());
    let restored = RaftCore::restore(Config::new(1, vec![1, 2]), hs, meta, 42, vec![]).unwrap();
    assert_eq!(restored.snapshot_size(), 42);
    let mut storage = MemStorage::new();
    storage.set_hard_state(hs).unwrap();
    storage.save_snapshot(meta, &[7; 42]).unwrap();
    let from_storage = RaftCore::from_storage(Config::new(1, vec![1, 2]), &storage).unwrap();
    assert_eq!(from_storage.snapshot_size(), 42);
}

/// A crash inside the fsync window: what was written but not synced is lost, and nothing the
/// node held back (its acknowledgement) ever left.
#[test]
fn a_crash_inside_the_fsync_window_loses_only_what_was_never_acknowledged() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.hold(2);
    net.propose(1, "x").unwrap();
    // Node 2 wrote entry 2 but holds its acknowledgement; node 3 acknowledged.
    assert_eq!(net.storage(2).last_index(), 2);
    assert_eq!(net.storage(2).durable_last_index(), 1);
    assert_eq!(net.core(1).commit_index(), 2);
    net.crash(2);
    assert_eq!(net.core(2).log().last_index(), 1);
    for _ in 0..3 {
        net.tick(1, 1);
        net.stabilize();
    }
    assert_eq!(net.core(2).log().last_index(), 2);
    assert_eq!(net.storage(2).durable_last_index(), 2);
}

/// Found by the batching simulation (sim_crash churn_unreliable, seed 55): the last chunk of
/// one snapshot and the first chunk of the next (the leader compacted meanwhile), stepped
/// before one `ready()`. The second transfer's chunk took the storage's incoming slot before
/// the first snapshot was installed, and the install failed. Now a chunk arriving while an
/// install waits to be handed out is dropped, as if lost.
#[test]
fn a_new_transfer_waits_for_the_pending_install() {
    let mut net = Lockstep::with_logs(&[&[1; 6], &[1], &[1]], plain);
    let first = SnapshotMeta { index: 3, term: 1 };
    let second = SnapshotMeta { index: 6, term: 1 };
    net.step_only(chunk(1, 2, 1, first, 2, 0, "ab"));
    net.step_only(chunk(1, 2, 1, second, 4, 0, "cd"));
    net.flush(2);
    assert_eq!(net.storage(2).durable_snapshot(), first);
    assert!(!net.core(2).receiving_snapshot());
    // The second transfer, sent again, goes through.
    net.send(chunk(1, 2, 1, second, 4, 0, "cd"));
    net.send(chunk(1, 2, 1, second, 4, 2, "ef"));
    assert_eq!(net.storage(2).durable_snapshot(), second);
    assert_eq!(net.storage(2).snapshot().unwrap().unwrap().1, b"cdef");
}
