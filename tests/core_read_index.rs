//! ReadIndex (linearizable reads without log writes), scripted on the core.

use raftkv::raft::{Config, MessageBody, ReadState, Role};
use raftkv::testing::Lockstep;

fn plain(_: &mut Config) {}

#[test]
fn a_leader_confirms_a_read_with_one_heartbeat_round_and_writes_nothing() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.propose(1, "x").unwrap();
    let (last, commit) = (net.core(1).log().last_index(), net.core(1).commit_index());
    net.clear_delivered();
    net.core_mut(1).read_index(7).unwrap();
    net.stabilize();
    assert_eq!(
        net.read_states(),
        &[(
            1,
            ReadState {
                ctx: 7,
                index: commit
            }
        )]
    );
    assert_eq!(
        net.core(1).log().last_index(),
        last,
        "a read must not write to the log"
    );
    let beats = net
        .delivered()
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .count();
    assert_eq!(beats, 2, "one heartbeat per follower");
}

#[test]
fn reads_arriving_together_share_one_round() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.clear_delivered();
    for ctx in 0..10 {
        net.core_mut(1).read_index(ctx).unwrap();
    }
    net.stabilize();
    assert_eq!(net.read_states().len(), 10);
    let beats = net
        .delivered()
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .count();
    assert_eq!(beats, 2);
}

#[test]
fn a_new_leader_serves_reads_only_after_committing_in_its_term() {
    let mut net = Lockstep::new(3, plain);
    // Node 1 wins but its no-op is held back: it does not know the latest commit yet.
    net.drop_if(|m| matches!(m.body, MessageBody::Append { .. }));
    net.campaign(1);
    assert_eq!(net.core(1).role(), Role::Leader);
    net.core_mut(1).read_index(1).unwrap();
    net.stabilize();
    assert!(
        net.read_states().is_empty(),
        "served a read before committing in its term"
    );
    net.clear_filter();
    net.tick(1, 1);
    net.stabilize();
    assert_eq!(net.read_states(), &[(1, ReadState { ctx: 1, index: 1 })]);
}

#[test]
fn a_follower_read_is_confirmed_by_the_leader() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.propose(1, "x").unwrap();
    let commit = net.core(1).commit_index();
    net.core_mut(3).read_index(42).unwrap();
    net.stabilize();
    assert_eq!(
        net.read_states(),
        &[(
            3,
            ReadState {
                ctx: 42,
                index: commit
            }
        )]
    );
    // Without a known leader, a read fails at once.
    let mut lonely = Lockstep::new(3, plain);
    assert!(lonely.core_mut(2).read_index(1).is_err());
}

#[test]
fn a_cut_off_leader_cannot_confirm_reads_and_fails_them_when_deposed() {
    let mut net = Lockstep::new(3, plain);
    net.campaign(1);
    net.isolate(1);
    net.core_mut(1).read_index(5).unwrap();
    net.stabilize();
    assert!(
        net.read_states().is_empty(),
        "a leader without a majority confirmed a read"
    );
    // Meanwhile the others elect a new leader and commit a write.
    net.campaign(2);
    net.propose(2, "y").unwrap();
    net.heal();
    net.tick(2, 1);
    net.stabilize();
    assert_eq!(net.core(1).role(), Role::Follower);
    assert_eq!(net.failed_reads(), &[(1, 5)]);
    assert!(net.read_states().is_empty());
}

#[test]
fn a_single_node_confirms_reads_at_once() {
    let mut net = Lockstep::new(1, plain);
    net.campaign(1);
    net.core_mut(1).read_index(3).unwrap();
    net.flush(1);
    assert_eq!(net.read_states(), &[(1, ReadState { ctx: 3, index: 1 })]);
}
