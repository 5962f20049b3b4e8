//! Leader election in the simulated cluster: each test is a small story over many seeds.
//! `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays one.

use raftkv::raft::Role;
use raftkv::testing::{for_each_seed, Cluster, NetworkConfig, RecordingMachine, SimConfig};

fn cluster(nodes: usize, seed: u64) -> Cluster<RecordingMachine> {
    Cluster::new(SimConfig::new(nodes, seed), |_| RecordingMachine::default())
}

#[test]
fn initial_election_elects_one_leader_and_keeps_it() {
    for_each_seed("initial_election", 20, |seed| {
        let mut c = cluster(3, seed);
        let leader = c.run_until_leader(3_000).expect("a leader within 3 s");
        let term = c.core(leader).unwrap().term();
        // With no failures the leader and term stay put.
        c.run_for(5_000);
        assert_eq!(c.leader(), Some(leader), "leader changed without failures");
        assert_eq!(
            c.core(leader).unwrap().term(),
            term,
            "term changed without failures"
        );
        for id in c.node_ids() {
            assert_eq!(c.status(id).unwrap().leader, Some(leader));
        }
        assert!(c.checker().checks > 0);
    });
}

#[test]
fn reelection_after_leader_loss_and_old_leader_rejoins_as_follower() {
    for_each_seed("reelection", 20, |seed| {
        let mut c = cluster(3, seed);
        let first = c.run_until_leader(3_000).expect("first leader");
        c.isolate(first);
        let second = c
            .run_until(3_000, |c| {
                c.leader().is_some_and(|l| l != first) && c.stable_leader().is_some()
            })
            .then(|| c.stable_leader().unwrap())
            .expect("a new leader among the connected majority");
        assert_ne!(first, second);
        // The old leader, alone, must have stepped down (check-quorum).
        c.run_for(500);
        assert_ne!(
            c.status(first).unwrap().role,
            Role::Leader,
            "isolated leader kept leading"
        );
        c.reconnect(first);
        c.run_for(1_000);
        assert_eq!(
            c.stable_leader(),
            Some(second),
            "rejoining node deposed the healthy leader"
        );
        assert_eq!(c.status(first).unwrap().leader, Some(second));
    });
}

#[test]
fn no_leader_without_a_majority() {
    for_each_seed("no_leader_without_majority", 20, |seed| {
        let mut c = cluster(3, seed);
        let leader = c.run_until_leader(3_000).expect("leader");
        let followers: Vec<_> = c.node_ids().into_iter().filter(|&i| i != leader).collect();
        // Cut everyone from everyone: no group has a majority.
        c.partition(&[]);
        c.run_for(3_000);
        for id in c.node_ids() {
            assert_ne!(
                c.status(id).unwrap().role,
                Role::Leader,
                "node {id} leads without a majority"
            );
        }
        // Two nodes together are a majority again.
        c.partition(&[&followers]);
        let l = c
            .run_until_leader(3_000)
            .expect("leader once a majority connects");
        assert!(followers.contains(&l));
    });
}

#[test]
fn many_elections_under_partition_churn() {
    for_each_seed("partition_churn_elections", 10, |seed| {
        let mut c = cluster(7, seed);
        let mut rng = raftkv::raft::Rng::new(seed);
        c.run_until_leader(3_000).expect("leader");
        for _round in 0..10 {
            // Cut the leader and two random nodes away; the other four are a majority and must
            // elect a new leader among themselves.
            let leader = c
                .stable_leader()
                .or(c.leader())
                .expect("a leader each round");
            let mut ids: Vec<_> = c.node_ids().into_iter().filter(|&i| i != leader).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.range(0, i as u64 + 1) as usize);
            }
            ids.insert(0, leader);
            let (minority, majority) = ids.split_at(3);
            c.partition(&[majority, minority]);
            let ok = c.run_until(4_000, |c| {
                c.stable_leader().is_some_and(|l| majority.contains(&l))
            });
            assert!(ok, "majority {majority:?} elected no leader");
            c.run_for(rng.range(0, 500));
        }
        c.network.heal();
        assert!(c.run_until_leader(4_000).is_some());
        // Every round deposed the leader: at least 11 terms had a leader, never two leaders in
        // one term (checked continuously).
        assert!(
            c.checker().leaders().len() >= 11,
            "too few elections: {:?}",
            c.checker().leaders()
        );
    });
}

#[test]
fn elections_converge_on_an_unreliable_network() {
    for_each_seed("unreliable_elections", 10, |seed| {
        let mut cfg = SimConfig::new(5, seed);
        cfg.network = NetworkConfig::unreliable();
        let mut c = Cluster::new(cfg, |_| RecordingMachine::default());
        assert!(
            c.run_until_leader(10_000).is_some(),
            "no leader on a lossy network"
        );
    });
}

#[test]
fn one_way_link_cut_does_not_depose_a_healthy_leader() {
    for_each_seed("one_way_cut", 10, |seed| {
        let mut c = cluster(3, seed);
        let leader = c.run_until_leader(3_000).expect("leader");
        let f = c.node_ids().into_iter().find(|&i| i != leader).unwrap();
        // The follower no longer hears the leader (but the leader hears it). It will time out
        // and pre-vote; the third node still hears the leader and refuses, so nothing changes.
        c.network.cut(leader, f);
        c.run_for(3_000);
        assert_eq!(c.stable_leader(), Some(leader));
        let t = c.core(leader).unwrap().term();
        c.network.heal();
        c.run_for(1_000);
        assert_eq!(
            c.core(leader).unwrap().term(),
            t,
            "pre-vote should keep the term stable"
        );
    });
}

/// Transfers that are all abandoned: every TimeoutNow arrives long after its transfer timed
/// out (a stalled connection), while the cluster is otherwise healthy. A late TimeoutNow
/// must not start an election that bypasses the lease: the leader never changes.
#[test]
fn late_timeout_nows_of_abandoned_transfers_never_depose_a_healthy_leader() {
    use raftkv::raft::{MessageBody, Rng};
    for_each_seed("late_timeout_now", 20, |seed| {
        let mut c = cluster(5, seed);
        let leader = c.run_until_leader(3_000).expect("a leader");
        let term = c.core(leader).unwrap().term();
        c.network.delay_if(|m, rng| {
            matches!(
                m.body,
                MessageBody::TimeoutNow | MessageBody::TimeoutNowAt { .. }
            )
            .then(|| rng.range(400, 900))
        });
        let mut rng = Rng::new(seed ^ 0x7140);
        let mut requested = 0;
        for _ in 0..20 {
            let others: Vec<u64> = c.node_ids().into_iter().filter(|&i| i != leader).collect();
            let to = others[rng.range(0, others.len() as u64) as usize];
            if c.transfer_leadership(leader, to).is_ok() {
                requested += 1;
            }
            let _ = c.propose(leader, "x");
            c.run_for(rng.range(150, 400));
            assert_eq!(
                c.leader(),
                Some(leader),
                "a late TimeoutNow deposed the leader (seed {seed})"
            );
        }
        c.run_for(1_500);
        assert_eq!(
            c.leader(),
            Some(leader),
            "a late TimeoutNow deposed the leader"
        );
        assert_eq!(c.core(leader).unwrap().term(), term);
        // (A transfer is refused while another is under way.)
        assert!(requested >= 3, "only {requested} transfers were started");
    });
}
