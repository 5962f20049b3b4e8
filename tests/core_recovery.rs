//! Protocol-aware recovery from a lost log tail, scripted on the core: a node whose storage
//! cut a damaged tail neither votes nor campaigns until a leader has brought it back, and a
//! node that lost its hard state too first learns every voter's term, so that it never votes
//! twice in a term it may already have voted in.

use raftkv::raft::{Config, Message, MessageBody, Role};
use raftkv::storage::TailLoss;
use raftkv::testing::Lockstep;

fn plain(_: &mut Config) {}

fn granted_votes(delivered: &[Message], from: u64) -> Vec<u64> {
    delivered
        .iter()
        .filter(|m| m.from == from)
        .filter_map(|m| match m.body {
            MessageBody::VoteResponse {
                pre_vote: false,
                granted: true,
            } => Some(m.term),
            _ => None,
        })
        .collect()
}

#[test]
fn a_node_that_lost_its_tail_neither_votes_nor_campaigns_until_a_leader_brings_it_back() {
    // Nodes 1 and 2 hold four entries; node 3's storage cut its tail after entry 2.
    let mut net = Lockstep::with_logs(&[&[1; 4], &[1; 4], &[1, 1]], plain);
    let loss = TailLoss {
        intact_through: 2,
        hard_state_lost: false,
    };
    net.core_mut(3).recover_from(loss);
    assert_eq!(net.core(3).recovering(), Some(loss));
    // It does not campaign, however long it waits.
    net.tick(3, 100);
    assert_eq!(net.core(3).role(), Role::Follower);
    assert_eq!(net.core(3).term(), 1);
    // It does not vote: node 2, cut from node 1, cannot win with it.
    net.cut(1, 2);
    net.clear_delivered();
    net.campaign(2);
    assert_ne!(net.core(2).role(), Role::Leader);
    assert!(granted_votes(net.delivered(), 3).is_empty());
    // Node 1 leads (node 2 votes for it); it brings node 3 back, and recovery ends once
    // node 3 holds node 1's log through its commit index, at an entry of node 1's term.
    net.heal();
    net.campaign(1); // term 2: node 2 already voted for itself there
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    net.propose(1, "x").unwrap();
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(net.core(3).recovering(), None);
    assert_eq!(
        net.core(3).log().last_index(),
        net.core(1).log().last_index()
    );
    // Now it votes again.
    net.isolate(1);
    net.clear_delivered();
    net.campaign(2);
    assert_eq!(net.core(2).role(), Role::Leader);
    assert!(!granted_votes(net.delivered(), 3).is_empty());
}

/// The wiped-vote case: node 3 voted for node 1 in term 5 and lost that with its hard state;
/// node 2 then asks it for a vote in term 5. It must not give it (two leaders in term 5).
#[test]
fn a_node_that_lost_its_vote_never_votes_again_in_a_term_it_may_have_voted_in() {
    // Node 1 leads term 5 (with node 3's lost vote); node 2 is at term 4; node 3's storage
    // fell back to an old hard state of term 1.
    let mut net = Lockstep::with_logs(&[&[1, 5], &[1, 4], &[1]], plain);
    net.core_mut(3).recover_from(TailLoss {
        intact_through: 1,
        hard_state_lost: true,
    });
    net.isolate(1);
    net.clear_delivered();
    // Node 2 campaigns in term 5: node 3 does not even answer (it does not know its terms).
    net.campaign(2);
    assert_eq!(net.core(2).term(), 5);
    assert!(granted_votes(net.delivered(), 3).is_empty());
    assert_eq!(net.core(2).role(), Role::Candidate);
    // Node 3 asks every voter for its term; node 1 is cut off, so it keeps waiting.
    net.tick(3, 40);
    net.stabilize();
    assert_eq!(net.core(3).term(), 1);
    net.heal();
    net.tick(3, 40);
    net.stabilize();
    // All answered: it adopts the largest term, as already voted.
    assert_eq!(net.core(3).term(), 5);
    assert_eq!(net.core(3).vote(), Some(3));
    // Node 2 tries term 5 again (a retried request): refused.
    net.clear_delivered();
    let retry = Message {
        from: 2,
        to: 3,
        term: 5,
        body: MessageBody::Vote {
            pre_vote: false,
            last_index: 2,
            last_term: 4,
            transfer: false,
        },
    };
    net.send(retry);
    assert!(granted_votes(net.delivered(), 3).is_empty());
}

#[test]
fn a_single_node_has_no_one_to_wait_for() {
    let mut net = Lockstep::with_logs(&[&[1, 1]], plain);
    net.core_mut(1).recover_from(TailLoss {
        intact_through: 2,
        hard_state_lost: true,
    });
    assert_eq!(net.core(1).recovering(), None);
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
}

/// The wiped-voter case end to end, as a host starts a node: node 3 voted for node 1 in
/// term 2, lost its disk, and restarts empty under its old id; node 2, which never heard of
/// term 2, asks it for a vote in term 2. Trusting its empty storage, node 3 would grant it
/// and node 2 would lead term 2 beside node 1. Treating it as a lost disk, node 3 first
/// learns term 2 from node 1 and refuses.
#[test]
fn a_voter_that_lost_its_disk_never_elects_a_second_leader_in_a_term() {
    let mut net = Lockstep::with_logs(&[&[1], &[1], &[1]], plain);
    net.cut(1, 2);
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    assert_eq!(net.core(1).term(), 2);
    assert_eq!(net.core(3).vote(), Some(1));
    net.lose_disk(3);
    assert_eq!(net.core(3).term(), 0);
    net.stabilize();
    // Node 1 answered term 2 and holds entries: node 3 spent its vote there and waits to
    // be caught up.
    assert_eq!(net.core(3).term(), 2);
    assert_eq!(net.core(3).vote(), Some(3));
    assert!(net.core(3).recovering().is_some());
    net.clear_delivered();
    let ask = Message {
        from: 2,
        to: 3,
        term: 2,
        body: MessageBody::Vote {
            pre_vote: false,
            last_index: 1,
            last_term: 1,
            transfer: false,
        },
    };
    net.send(ask);
    assert!(granted_votes(net.delivered(), 3).is_empty());
    assert_ne!(net.core(2).role(), Role::Leader);
    // The leader of term 2 brings node 3 back.
    net.propose(1, "x").unwrap();
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(net.core(3).recovering(), None);
    assert_eq!(
        net.core(3).log().last_index(),
        net.core(1).log().last_index()
    );
}

/// A new cluster whose hosts treat every empty storage as a lost disk still starts: every
/// voter answers "nothing held", so each goes on after one round of questions.
#[test]
fn a_new_cluster_of_distrusted_empty_storages_elects_a_leader() {
    let mut net = Lockstep::new(3, plain);
    for id in 1..=3 {
        net.lose_disk(id);
        assert!(net.core(id).recovering().is_some());
    }
    net.stabilize();
    for id in 1..=3 {
        assert_eq!(
            net.core(id).recovering(),
            None,
            "node {id} still recovering"
        );
    }
    // Having passed the check, a member that crashes while still empty is not a lost disk
    // at its next start (the finished check left a vote at term 0).
    let mut again = net.storage(2).clone();
    assert!(!raftkv::host::distrust_empty_storage(&mut again).unwrap());
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    net.propose(1, "x").unwrap();
    net.stabilize();
    assert_eq!(
        net.core(3).log().last_index(),
        net.core(1).log().last_index()
    );
}

/// If one member of a new cluster has already campaigned (its term is 1, still nothing
/// held), the others learn that term and still go on: nothing was committed anywhere.
#[test]
fn a_first_campaign_does_not_leave_distrusted_members_waiting_for_each_other() {
    let mut net = Lockstep::new(3, plain);
    net.isolate(1);
    net.campaign(1);
    assert_eq!(net.core(1).term(), 1);
    net.heal();
    for id in 2..=3 {
        net.lose_disk(id);
    }
    net.stabilize();
    for id in 2..=3 {
        assert_eq!(
            net.core(id).recovering(),
            None,
            "node {id} still recovering"
        );
        assert_eq!(net.core(id).term(), 1);
    }
    net.campaign(2);
    assert_eq!(net.core(2).role(), Role::Leader);
}

/// A lost question is asked again within a heartbeat interval, not an election timeout:
/// the node takes no part meanwhile (the membership simulation found nodes that spent most
/// of a run in step 1 on a lossy network).
#[test]
fn a_lost_term_question_is_asked_again_within_a_heartbeat_interval() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.propose(1, "x").unwrap();
    net.stabilize();
    net.drop_if(|m| matches!(m.body, MessageBody::TermQuery));
    net.lose_disk(3);
    net.stabilize();
    assert!(net.core(3).recovering().is_some());
    net.clear_filter();
    let heartbeat = net.core(3).config().heartbeat_ticks as usize;
    assert!(heartbeat + 1 < net.core(3).config().election_ticks as usize);
    for _ in 0..=heartbeat {
        net.tick(3, 1);
        net.stabilize();
    }
    // It knows its term now; the leader's next append catches it up.
    assert_eq!(net.core(3).term(), net.core(1).term());
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(net.core(3).recovering(), None, "node 3 was not caught up");
    assert_eq!(
        net.core(3).log().last_index(),
        net.core(1).log().last_index()
    );
}
