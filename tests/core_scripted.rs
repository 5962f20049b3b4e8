//! Scripted scenarios on the IO-free core, in the style of etcd-io/raft's and raft-rs's unit
//! suites: set up logs, deliver messages one by one, look at the state. No time, no randomness.

use raftkv::error::CoreProposeError;
use raftkv::raft::{
    AppendResponse, Config, Entry, EntryPayload, Message, MessageBody, Payload, RaftCore, Role,
};
use raftkv::storage::{MemStorage, Storage};
use raftkv::testing::Lockstep;

fn plain(_: &mut Config) {}

fn is_append_response_rejected(m: &Message) -> bool {
    matches!(
        m.body,
        MessageBody::AppendResponse(AppendResponse::Rejected { .. })
    )
}

#[test]
fn a_candidate_with_a_majority_becomes_leader_and_others_follow() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    assert_eq!(net.core(1).term(), 1);
    for id in [2, 3] {
        assert_eq!(net.core(id).role(), Role::Follower);
        assert_eq!(net.core(id).leader(), Some(1));
        assert_eq!(net.core(id).vote(), Some(1));
    }
}

#[test]
fn a_candidate_without_a_majority_stays_candidate() {
    let mut net = Lockstep::new(5, plain);
    net.isolate(3);
    net.isolate(4);
    net.isolate(5);
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Candidate);
    net.heal();
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    assert_eq!(net.core(1).term(), 2);
}

#[test]
fn votes_go_only_to_candidates_with_up_to_date_logs() {
    // Node 2's last entry has a higher term than node 1's: it refuses. Node 3's log is
    // shorter: it grants. 2 of 3 is a majority.
    let mut net = Lockstep::with_logs(&[&[1, 1], &[1, 2], &[1]], plain);
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    assert_eq!(net.core(2).vote(), None);
    assert_eq!(net.core(3).vote(), Some(1));

    // Same term, longer log wins; a shorter log cannot win against two longer ones.
    let mut net = Lockstep::with_logs(&[&[1], &[1, 1], &[1, 1]], plain);
    net.campaign(1);
    assert_ne!(net.core(1).role(), Role::Leader);
}

#[test]
fn a_node_votes_at_most_once_per_term() {
    let mut net = Lockstep::new(3, plain);
    // Node 1's requests reach node 2 only; node 3's requests reach node 2 after that.
    net.cut(1, 3);
    net.core_mut(1).campaign();
    net.core_mut(3).campaign();
    net.stabilize();
    assert_eq!(net.core(2).vote(), Some(1));
    assert_eq!(net.core(1).role(), Role::Leader);
    assert_ne!(
        net.core(3).role(),
        Role::Leader,
        "node 2 voted twice in term 1"
    );
}

#[test]
fn any_node_steps_down_on_a_higher_term() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    let term = net.core(1).term();
    net.send(Message {
        from: 2,
        to: 1,
        term: term + 5,
        body: MessageBody::HeartbeatResponse { read_round: 0 },
    });
    assert_eq!(net.core(1).role(), Role::Follower);
    assert_eq!(net.core(1).term(), term + 5);
    assert_eq!(net.core(1).vote(), None);
}

#[test]
fn a_leader_commits_earlier_term_entries_only_through_an_entry_of_its_own_term() {
    // Figure 8: node 1 holds an entry of term 2 that nodes 2 and 3 lack. As leader of term 3
    // it replicates that entry until it is on all nodes, but must not commit it by counting:
    // only once its own no-op (term 3) is on a majority do both commit.
    let one_at_a_time = |c: &mut Config| {
        c.max_append_entries = 1;
        c.max_inflight = 1;
    };
    let mut net = Lockstep::with_logs(&[&[1, 2], &[1], &[1]], one_at_a_time);
    // Each follower sees the leader's first probe (it carries the no-op and is rejected, as
    // the follower lacks index 2); every later append carrying the no-op is lost.
    let mut probes_seen = std::collections::BTreeSet::new();
    net.drop_if(move |m| {
        let carries_noop = matches!(&m.body, MessageBody::Append { entries, .. } if entries.iter().any(|e| e.term >= 3));
        carries_noop && !probes_seen.insert(m.to)
    });
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    assert_eq!(net.core(1).term(), 3);
    // Index 2 (term 2) is now stored on nodes 1, 2 and 3, the no-op on node 1 only.
    assert_eq!(net.core(2).log().term(2), Some(2));
    assert_eq!(net.core(3).log().term(2), Some(2));
    assert_eq!(net.core(2).log().last_index(), 2);
    assert_eq!(
        net.core(1).commit_index(),
        0,
        "committed an earlier-term entry by counting"
    );
    net.clear_filter();
    // Two heartbeat rounds: the leader suspects lost appends only when a follower is still
    // behind what was sent before the previous heartbeat; then it resends.
    net.tick(1, 1);
    net.stabilize();
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(net.core(1).commit_index(), 3);
    assert_eq!(net.core(1).log().term(3), Some(3));
}

#[test]
fn a_follower_replaces_only_a_conflicting_suffix() {
    let mut net = Lockstep::with_logs(&[&[1, 1, 1], &[1, 1, 1], &[1, 2, 2, 2]], plain);
    // Node 3's entries 2..4 (term 2) conflict with node 1's; node 1 wins with node 2's vote.
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    net.propose(1, "x").unwrap();
    let leader_log: Vec<(u64, u64)> = net
        .core(1)
        .log()
        .entries()
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    for id in [2, 3] {
        let log: Vec<(u64, u64)> = net
            .core(id)
            .log()
            .entries()
            .iter()
            .map(|e| (e.index, e.term))
            .collect();
        assert_eq!(log, leader_log, "node {id}");
    }
    // A duplicated, stale append (entries 1..=2 of the current log) truncates nothing.
    let before = net.core(2).log().last_index();
    let term = net.core(1).term();
    let entries = net.core(1).log().slice(1, 3, 10, u64::MAX);
    net.send(Message {
        from: 1,
        to: 2,
        term,
        body: MessageBody::Append {
            prev_index: 0,
            prev_term: 0,
            entries,
            commit: 0,
        },
    });
    assert_eq!(net.core(2).log().last_index(), before);
}

#[test]
fn messages_that_depend_on_durable_state_wait_for_it() {
    let mut core = RaftCore::new(
        Config::new(1, vec![1, 2, 3]),
        Default::default(),
        Default::default(),
        vec![],
    )
    .unwrap();
    core.campaign(); // pre-vote is on by default: pre-votes may leave at once
    let rd = core.ready();
    assert!(rd.hard_state.is_none());
    assert_eq!(rd.messages.len(), 2);
    for reply in [2, 3] {
        core.step(Message {
            from: reply,
            to: 1,
            term: 1,
            body: MessageBody::VoteResponse {
                pre_vote: true,
                granted: true,
            },
        });
    }
    // Now a real candidate of term 1: the vote requests must wait for term and vote to be durable.
    let rd = core.ready();
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((1, Some(1))));
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages.len(), 2);
    core.on_persisted(rd.ack);

    // A follower's acknowledgement of appended entries waits for them to be durable.
    let mut f = RaftCore::new(
        Config::new(2, vec![1, 2, 3]),
        Default::default(),
        Default::default(),
        vec![],
    )
    .unwrap();
    f.step(Message {
        from: 1,
        to: 2,
        term: 1,
        body: MessageBody::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![Entry {
                index: 1,
                term: 1,
                payload: EntryPayload::Noop,
            }],
            commit: 0,
        },
    });
    let rd = f.ready();
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.messages.is_empty());
    assert!(matches!(
        rd.persisted_messages[0].body,
        MessageBody::AppendResponse(AppendResponse::Accepted { match_index: 1 })
    ));
}

#[test]
fn a_leader_counts_itself_only_once_its_entries_are_durable() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.stabilize();
    let commit = net.core(1).commit_index();
    // Propose, take the batch but do not report it persisted yet.
    net.core_mut(1).propose(Payload::from("x")).unwrap();
    let rd = net.core_mut(1).ready();
    assert_eq!(rd.entries.len(), 1);
    // One follower acknowledges: leader (not durable) + one follower is not a majority yet.
    let idx = rd.entries[0].index;
    let term = net.core(1).term();
    net.core_mut(1).step(Message {
        from: 2,
        to: 1,
        term,
        body: MessageBody::AppendResponse(AppendResponse::Accepted { match_index: idx }),
    });
    assert_eq!(net.core(1).commit_index(), commit);
    net.core_mut(1).on_persisted(rd.ack);
    assert_eq!(net.core(1).commit_index(), idx);
}

#[test]
fn pre_vote_keeps_an_isolated_node_from_inflating_its_term() {
    let mut net = Lockstep::new(3, |c| c.pre_vote = true);
    net.campaign(1);
    let term = net.core(1).term();
    net.isolate(3);
    for _ in 0..10 {
        net.campaign(3);
    }
    assert_eq!(
        net.core(3).term(),
        term,
        "pre-vote should not bump the term"
    );
    net.heal();
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(
        net.core(1).role(),
        Role::Leader,
        "rejoining node deposed the leader"
    );
    assert_eq!(net.core(3).leader(), Some(1));
}

#[test]
fn check_quorum_makes_a_cut_off_leader_step_down() {
    let mut net = Lockstep::new(3, |c| c.check_quorum = true);
    net.campaign(1);
    net.isolate(1);
    let ticks = 2 * net.core(1).config().election_ticks as usize + 1;
    net.tick(1, ticks);
    assert_eq!(net.core(1).role(), Role::Follower);
    // Followers within the lease ignore a disruptive vote request.
    let mut net = Lockstep::new(3, |c| c.check_quorum = true);
    net.campaign(1);
    net.tick(1, 1);
    net.stabilize();
    net.isolate(1);
    net.campaign(3);
    assert_ne!(net.core(3).role(), Role::Leader);
    assert_eq!(
        net.core(2).vote(),
        Some(1),
        "node 2 voted while in the leader's lease"
    );
}

#[test]
fn fast_backup_skips_whole_terms_per_round_trip() {
    // Node 1 (leader-to-be) has 50 entries of term 4; node 2 has 25 of term 2 and 25 of
    // term 3 after a common first entry. Plain back-up would need ~50 rejections.
    let mut leader_log = vec![1u64];
    leader_log.extend(std::iter::repeat_n(4, 50));
    let mut follower_log = vec![1u64];
    follower_log.extend(std::iter::repeat_n(2, 25));
    follower_log.extend(std::iter::repeat_n(3, 25));
    let mut net = Lockstep::with_logs(&[&leader_log, &follower_log, &leader_log], plain);
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    net.tick(1, 1);
    net.stabilize();
    let rejections = net
        .delivered()
        .iter()
        .filter(|m| m.from == 2 && is_append_response_rejected(m))
        .count();
    assert!(rejections <= 3, "{rejections} rejections");
    assert_eq!(net.core(2).log().entries(), net.core(1).log().entries());
}

#[test]
fn a_restarted_node_keeps_its_term_vote_and_log() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.propose(1, "x").unwrap();
    let (term, vote, last) = (
        net.core(2).term(),
        net.core(2).vote(),
        net.core(2).log().last_index(),
    );
    net.restart(2);
    assert_eq!(
        (
            net.core(2).term(),
            net.core(2).vote(),
            net.core(2).log().last_index()
        ),
        (term, vote, last)
    );
    // It re-learns the commit index and re-applies.
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(net.applied(2).len() as u64, last);
}

#[test]
fn proposals_are_refused_by_followers_and_bounded_on_the_leader() {
    let mut net = Lockstep::new(3, |c| c.max_uncommitted_bytes = 1_000);
    net.campaign(1);
    assert_eq!(
        net.propose(2, "x"),
        Err(CoreProposeError::NotLeader { leader: Some(1) })
    );
    net.isolate(1);
    let mut accepted = 0;
    while net
        .core_mut(1)
        .propose(Payload::from(vec![0u8; 100]))
        .is_ok()
    {
        accepted += 1;
        assert!(accepted < 100, "uncommitted tail is not bounded");
    }
    assert_eq!(
        net.core_mut(1).propose(Payload::from("y")),
        Err(CoreProposeError::Busy)
    );
    net.heal();
    net.tick(1, 1);
    net.stabilize();
    assert!(
        net.core_mut(1).propose(Payload::from("y")).is_ok(),
        "room again once committed"
    );
}

#[test]
fn a_heartbeat_never_commits_beyond_what_the_follower_is_known_to_hold() {
    let mut net = Lockstep::with_logs(&[&[1, 1], &[1, 1], &[1, 2]], plain);
    net.campaign(1);
    net.stabilize();
    // Node 3's conflicting entry 2 must have been replaced before it commits index 2.
    assert_eq!(net.core(3).log().term(2), Some(1));
    assert_eq!(net.core(3).commit_index(), net.core(1).commit_index());
}

#[test]
fn restore_rejects_a_log_with_gaps() {
    let mut s = MemStorage::new();
    s.append(&[Entry {
        index: 1,
        term: 1,
        payload: EntryPayload::Noop,
    }])
    .unwrap();
    assert!(s
        .append(&[Entry {
            index: 3,
            term: 1,
            payload: EntryPayload::Noop
        }])
        .is_err());
    let bad = vec![Entry {
        index: 2,
        term: 1,
        payload: EntryPayload::Noop,
    }];
    assert!(RaftCore::new(
        Config::new(1, vec![1]),
        Default::default(),
        Default::default(),
        bad
    )
    .is_err());
}

#[test]
fn malformed_appends_are_ignored() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    let term = net.core(1).term();
    let before = net.core(2).log().entries().to_vec();
    let bad = |entries: Vec<Entry>| Message {
        from: 1,
        to: 2,
        term,
        body: MessageBody::Append {
            prev_index: 1,
            prev_term: term,
            entries,
            commit: 99,
        },
    };
    let e = |index, term| Entry {
        index,
        term,
        payload: EntryPayload::Noop,
    };
    for entries in [
        vec![e(3, term)],                 // gap after prev_index
        vec![e(2, term), e(2, term)],     // repeated index
        vec![e(2, term + 1)],             // term above the sender's
        vec![e(2, term), e(3, term - 1)], // decreasing terms
    ] {
        net.send(bad(entries));
        assert_eq!(net.core(2).log().entries(), &before[..]);
        assert!(net.core(2).commit_index() <= net.core(2).log().last_index());
    }
    // Messages from strangers or to someone else change nothing either.
    let stranger = Message {
        from: 9,
        to: 2,
        term: term + 1,
        body: MessageBody::HeartbeatResponse { read_round: 0 },
    };
    net.send(stranger);
    assert_eq!(net.core(2).term(), term);
}

#[test]
fn restore_rejects_inconsistent_durable_state() {
    let e = |index, term| Entry {
        index,
        term,
        payload: EntryPayload::Noop,
    };
    let cfg = || Config::new(1, vec![1, 2, 3]);
    let hs = |term| raftkv::raft::HardState { term, vote: None };
    // Terms going down in the log.
    assert!(RaftCore::new(cfg(), hs(3), Default::default(), vec![e(1, 2), e(2, 1)]).is_err());
    // A current term older than the log's last entry.
    assert!(RaftCore::new(cfg(), hs(1), Default::default(), vec![e(1, 2)]).is_err());
    // Consistent state restores.
    assert!(RaftCore::new(cfg(), hs(2), Default::default(), vec![e(1, 1), e(2, 2)]).is_ok());
    // And a node refuses a configuration that cannot work.
    let mut bad = raftkv::NodeConfig::new(1, vec![1]);
    bad.inbox_capacity = 0;
    assert!(bad.validate().is_err());
    assert!(raftkv::NodeConfig::new(1, vec![1]).validate().is_ok());
}
