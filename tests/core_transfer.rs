//! Leadership transfer, scripted on the core.

use raftkv::error::CoreProposeError;
use raftkv::raft::{Config, MessageBody, Payload, Role};
use raftkv::testing::Lockstep;

fn with_lease(c: &mut Config) {
    c.check_quorum = true;
    c.pre_vote = true;
}

#[test]
fn leadership_moves_to_an_up_to_date_follower_despite_the_lease() {
    let mut net = Lockstep::new(3, with_lease);
    net.campaign(1);
    net.propose(1, "x").unwrap();
    let term = net.core(1).term();
    net.core_mut(1).transfer_leadership(2).unwrap();
    net.stabilize();
    assert_eq!(net.core(2).role(), Role::Leader);
    assert_eq!(net.core(2).term(), term + 1);
    assert_eq!(net.core(1).role(), Role::Follower);
    assert_eq!(net.core(3).leader(), Some(2));
    // Nothing was lost on the way.
    net.propose(2, "y").unwrap();
    assert_eq!(net.core(2).commit_index(), net.core(2).log().last_index());
}

#[test]
fn a_lagging_transferee_is_caught_up_first_and_proposals_wait() {
    let mut net = Lockstep::new(3, with_lease);
    net.campaign(1);
    net.isolate(3);
    for i in 0..5 {
        net.propose(1, format!("x{i}").as_str()).unwrap();
    }
    let last = net.core(1).log().last_index();
    // Hold back the appends that would catch node 3 up, then start the transfer.
    net.drop_if(|m| m.to == 3 && matches!(m.body, MessageBody::Append { .. }));
    net.heal();
    net.drop_if(|m| m.to == 3 && matches!(m.body, MessageBody::Append { .. }));
    net.core_mut(1).transfer_leadership(3).unwrap();
    assert_eq!(
        net.core_mut(1).propose(Payload::from("during")),
        Err(CoreProposeError::Busy)
    );
    net.stabilize();
    assert_eq!(
        net.core(1).role(),
        Role::Leader,
        "handed over to a follower that lacks entries"
    );
    // Let the appends through: node 3 catches up, then gets TimeoutNow and wins.
    net.clear_filter();
    // The dropped appends are presumed lost after a whole heartbeat interval: two rounds.
    for _ in 0..2 {
        net.tick(1, 1);
        net.stabilize();
    }
    assert_eq!(net.core(3).role(), Role::Leader);
    assert!(net.core(3).log().last_index() > last);
}

#[test]
fn a_transfer_that_cannot_complete_is_abandoned() {
    let mut net = Lockstep::new(3, with_lease);
    net.campaign(1);
    net.isolate(3);
    net.core_mut(1).transfer_leadership(3).unwrap();
    assert_eq!(net.core(1).transferee(), Some(3));
    let ticks = net.core(1).config().election_ticks as usize;
    for _ in 0..ticks {
        net.tick(1, 1);
        net.stabilize();
    }
    assert_eq!(net.core(1).transferee(), None);
    assert_eq!(net.core(1).role(), Role::Leader);
    assert!(net
        .core_mut(1)
        .propose(Payload::from("back to work"))
        .is_ok());
}

#[test]
fn only_a_leader_transfers() {
    let mut net = Lockstep::new(3, with_lease);
    net.campaign(1);
    assert_eq!(
        net.core_mut(2).transfer_leadership(3),
        Err(CoreProposeError::NotLeader { leader: Some(1) })
    );
}
