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
