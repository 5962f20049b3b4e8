//! Scripted snapshot scenarios on the core: compaction boundaries, InstallSnapshot streaming,
//! keeping a matching log suffix, refusing stale snapshots.

use raftkv::raft::{
    AppendResponse, Config, Message, MessageBody, Payload, ProgressState, Role, SnapshotMeta,
    SnapshotStatus,
};
use raftkv::storage::Storage;
use raftkv::testing::Lockstep;

fn plain(_: &mut Config) {}

fn chunk(term: u64, meta: SnapshotMeta, size: u64, offset: u64, data: &str) -> Message {
    Message {
        from: 1,
        to: 2,
        term,
        body: MessageBody::InstallSnapshot {
            meta,
            size,
            offset,
            data: Payload::from(data),
        },
    }
}

#[test]
fn replication_and_term_lookups_work_across_the_compaction_boundary() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    for i in 0..5 {
        net.propose(1, format!("x{i}").as_str()).unwrap();
    }
    let meta = net.compact(1, b"state");
    assert_eq!(meta.index, 6);
    let log = net.core(1).log();
    assert_eq!(log.first_index(), 7);
    assert_eq!(
        log.term(6),
        Some(meta.term),
        "the snapshot boundary answers its term"
    );
    assert_eq!(log.term(5), None);
    // Followers that are in sync go on with plain appends (prev = the boundary).
    net.propose(1, "after").unwrap();
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(net.core(2).commit_index(), 7);
    assert!(net.installed().is_empty());
}

#[test]
fn a_lagging_follower_receives_the_snapshot_in_chunks_then_entries() {
    let mut net = Lockstep::new(3, |c| c.snapshot_chunk_bytes = 4);
    net.campaign(1);
    net.isolate(3);
    for i in 0..5 {
        net.propose(1, format!("x{i}").as_str()).unwrap();
    }
    let meta = net.compact(1, b"0123456789"); // 10 bytes: 3 chunks of 4
    net.propose(1, "tail").unwrap();
    net.heal();
    net.clear_delivered();
    // The appends node 3 missed are presumed lost after a whole heartbeat interval without
    // an acknowledgement: two heartbeat rounds.
    for _ in 0..2 {
        net.tick(1, 1);
        net.stabilize();
    }
    let chunks = net
        .delivered()
        .iter()
        .filter(|m| matches!(m.body, MessageBody::InstallSnapshot { .. }))
        .count();
    assert_eq!(chunks, 3);
    assert_eq!(net.installed(), &[(3, meta)]);
    assert_eq!(net.storage(3).snapshot().unwrap().unwrap().1, b"0123456789");
    assert_eq!(net.core(3).log().snapshot(), meta);
    assert_eq!(
        net.core(3).log().last_index(),
        net.core(1).log().last_index()
    );
    let p = net.core(1).progress(3).unwrap();
    assert_eq!(p.state, ProgressState::Replicate);
    assert_eq!(p.match_index, net.core(1).log().last_index());
}

#[test]
fn a_matching_snapshot_only_moves_the_commit_and_a_conflicting_one_replaces_the_log() {
    // Node 2 holds entries 1..=6 of term 1 but knows nothing is committed yet.
    let mut net = Lockstep::with_logs(&[&[1; 6], &[1; 6], &[1; 6]], plain);
    assert_eq!(net.core(2).commit_index(), 0);
    // A snapshot through 4 whose entry the log holds: the log matches the leader's through
    // there, so only the commit index moves; nothing is installed, nothing thrown away.
    let meta = SnapshotMeta { index: 4, term: 1 };
    net.send(chunk(1, meta, 3, 0, "abc"));
    assert_eq!(net.core(2).log().snapshot(), SnapshotMeta::default());
    assert_eq!(net.core(2).log().last_index(), 6);
    assert_eq!(net.core(2).log().entries().len(), 6);
    assert_eq!(net.core(2).commit_index(), 4);
    assert!(net.installed().is_empty());
    assert!(net.storage(2).snapshot().unwrap().is_none());
    // A snapshot through 8 (beyond its log): the log is replaced entirely.
    let meta = SnapshotMeta { index: 8, term: 1 };
    net.send(chunk(1, meta, 1, 0, "z"));
    assert_eq!(net.core(2).log().snapshot(), meta);
    assert_eq!(net.core(2).log().last_index(), 8);
    assert!(net.core(2).log().entries().is_empty());
    // A snapshot whose entry conflicts with the log (same index, other term) drops the log.
    let mut net = Lockstep::with_logs(&[&[1, 2, 2, 2], &[1, 1, 1, 1], &[1]], plain);
    let meta = SnapshotMeta { index: 3, term: 2 };
    net.send(chunk(2, meta, 1, 0, "q"));
    assert_eq!(net.core(2).log().snapshot(), meta);
    assert!(net.core(2).log().entries().is_empty());
}

#[test]
fn old_or_duplicate_snapshots_never_move_a_node_backwards() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    for i in 0..5 {
        net.propose(1, format!("x{i}").as_str()).unwrap();
    }
    net.tick(1, 1);
    net.stabilize();
    let term = net.core(1).term();
    let (commit, last) = (net.core(2).commit_index(), net.core(2).log().last_index());
    assert_eq!(commit, 6);
    net.clear_delivered();
    net.send(chunk(term, SnapshotMeta { index: 3, term }, 3, 0, "old"));
    assert_eq!(net.core(2).commit_index(), commit);
    assert_eq!(net.core(2).log().last_index(), last);
    assert_eq!(net.core(2).log().snapshot().index, 0);
    // It answers with what it has, so the leader moves on.
    let answer = net.delivered().iter().find(|m| m.from == 2).unwrap();
    assert_eq!(
        answer.body,
        MessageBody::AppendResponse(AppendResponse::Accepted {
            match_index: commit
        })
    );
}

#[test]
fn chunks_out_of_order_are_refused_with_the_offset_to_resume_from() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    let term = net.core(1).term();
    let meta = SnapshotMeta { index: 50, term };
    net.clear_delivered();
    net.send(chunk(term, meta, 9, 0, "abc"));
    net.send(chunk(term, meta, 9, 6, "ghi")); // skips 3..6
    let answers: Vec<_> = net
        .delivered()
        .iter()
        .filter(|m| m.from == 2)
        .map(|m| m.body.clone())
        .collect();
    assert_eq!(
        answers.last().unwrap(),
        &MessageBody::SnapshotResponse {
            index: 50,
            next_offset: 3,
            status: SnapshotStatus::Rejected
        }
    );
    assert!(net.core(2).receiving_snapshot());
    net.send(chunk(term, meta, 9, 3, "def"));
    net.send(chunk(term, meta, 9, 6, "ghi"));
    assert!(!net.core(2).receiving_snapshot());
    assert_eq!(net.core(2).log().snapshot(), meta);
    assert_eq!(net.storage(2).snapshot().unwrap().unwrap().1, b"abcdefghi");
    assert_eq!(net.core(2).role(), Role::Follower);
}

#[test]
fn a_snapshot_must_name_an_applied_entry() {
    let mut net = Lockstep::new(1, plain);
    net.campaign(1);
    net.propose(1, "x").unwrap();
    let core = net.core_mut(1);
    let term = core.term();
    assert!(
        core.snapshot_saved(SnapshotMeta { index: 9, term }, 1)
            .is_err(),
        "not applied"
    );
    assert!(
        core.snapshot_saved(
            SnapshotMeta {
                index: 2,
                term: term + 1
            },
            1
        )
        .is_err(),
        "wrong term"
    );
    assert!(core
        .snapshot_saved(SnapshotMeta { index: 2, term }, 1)
        .is_ok());
    assert_eq!(core.log().first_index(), 3);
}

/// A follower whose log already holds a snapshot's last entry (appends got there first) ends
/// the transfer at whatever chunk arrives, not only at the last: it had dropped its partial
/// copy once its log reached the snapshot, so it refused every later chunk and the leader
/// started over, for ever (found by `sim_snapshot`'s abandoned-transfers scenario).
#[test]
fn a_chunk_of_a_snapshot_the_log_already_reached_ends_the_transfer() {
    let mut net = Lockstep::with_logs(&[&[1, 1, 1], &[1, 1, 1]], plain);
    net.clear_delivered();
    net.send(Message {
        from: 1,
        to: 2,
        term: 1,
        body: MessageBody::InstallSnapshot {
            meta: SnapshotMeta { index: 3, term: 1 },
            size: 40,
            offset: 8,
            data: vec![0u8; 8].into(),
        },
    });
    let answer = net
        .delivered()
        .iter()
        .find(|m| m.from == 2)
        .map(|m| m.body.clone());
    assert!(
        matches!(
            answer,
            Some(MessageBody::SnapshotResponse {
                index: 3,
                status: SnapshotStatus::Installed,
                ..
            })
        ),
        "{answer:?}"
    );
}
