//! Membership changes in the simulated cluster, with the batching host, crashes and
//! partitions at every step of a change: growing 3 → 5 and shrinking back under load,
//! replacing every member one by one, the leader crashing inside the joint configuration, a
//! removed node that keeps campaigning, a learner that never catches up, and wiped disks.
//! Checked after every step as everywhere (one leader per term under any configuration, log
//! matching, state machine safety, acknowledged ⇒ durable); at the end every acknowledged
//! command is committed and every member applied the same sequence.
//! `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays one.

use std::collections::BTreeSet;

use raftkv::error::MembershipError;
use raftkv::raft::{Membership, NodeId, Rng, Role};
use raftkv::storage::MemStorage;
use raftkv::testing::{for_each_seed, Cluster, NetworkConfig, RecordingMachine, SimConfig};

type Sim = Cluster<RecordingMachine>;

fn cluster(seed: u64, network: NetworkConfig) -> Sim {
    cluster_of(3, seed, network)
}

fn cluster_of(nodes: usize, seed: u64, network: NetworkConfig) -> Sim {
    let mut cfg = SimConfig::new(nodes, seed);
    // Half the seeds start as hosts do by default: every empty storage a lost disk.
    cfg.distrust_initial_storage = seed.is_multiple_of(2);
    cfg.network = network;
    if seed.is_multiple_of(2) {
        // Half the seeds snapshot, so learners catch up by snapshot too.
        cfg.max_log_bytes = Some(1_500);
        cfg.raft.snapshot_chunk_bytes = 256;
    }
    Cluster::new(cfg, |_| RecordingMachine::default())
}

fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

/// Proposes a few commands through whoever leads, with a fault now and then (never taking
/// down more than one member at a time).
fn load(c: &mut Sim, rng: &mut Rng, tag: &str, rounds: usize) {
    for r in 0..rounds {
        if let Some(l) = c.leader() {
            for k in 0..rng.range(1, 4) {
                let _ = c.propose(l, format!("{tag}-{r}-{k}").as_str());
            }
        }
        c.run_for(rng.range(1, 30));
        match rng.range(0, 20) {
            0 => {
                // Crash a member, run a bit, bring it back.
                let members: Vec<NodeId> = c
                    .leader()
                    .map(|l| {
                        c.core(l)
                            .unwrap()
                            .membership()
                            .members()
                            .into_iter()
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(&v) = members.get(rng.range(0, members.len().max(1) as u64) as usize) {
                    if c.is_up(v) {
                        c.crash(v);
                        c.run_for(rng.range(0, 200));
                        c.restart(v);
                    }
                }
            }
            1 => {
                // A short partition of one node.
                let ids = c.node_ids();
                let v = ids[rng.range(0, ids.len() as u64) as usize];
                c.isolate(v);
                c.run_for(rng.range(0, 300));
                c.reconnect(v);
            }
            _ => {}
        }
    }
}

/// Runs until `leader` is a stable leader whose configuration `pred` accepts, committed
/// and not joint; retries on leader changes.
fn until_config(c: &mut Sim, max_ms: u64, pred: impl Fn(&Membership) -> bool) -> bool {
    c.run_until(max_ms, |c| {
        c.stable_leader().is_some_and(|l| {
            let core = c.core(l).unwrap();
            let configs = core.log().configs();
            let m = configs.current();
            !m.is_joint() && configs.current_index() <= core.commit_index() && pred(m)
        })
    })
}

/// Asks whoever leads for a change until it is taken (a change may be refused while another
/// is in progress or a learner catches up).
fn change(c: &mut Sim, voters: &[NodeId], learners: &[NodeId], max_ms: u64) {
    let end = c.now() + max_ms;
    let (v, l) = (set(voters), set(learners));
    loop {
        if let Some(leader) = c.run_until_leader(2_000) {
            match c.change_membership(leader, v.clone(), l.clone()) {
                Ok(_) => {}
                Err(MembershipError::Invalid(_)) => {} // already there
                Err(_) => {} // in progress, or a learner still catching up: retry
            }
        }
        let target = |m: &Membership| m.voters == v && m.learners == l;
        if until_config(c, 1_000, target) {
            return;
        }
        assert!(
            c.now() < end,
            "the change to voters {v:?}, learners {l:?} did not complete (seed {}): {:?}",
            c.seed(),
            c.leader().map(|l| c.core(l).unwrap().membership().clone())
        );
    }
}

fn settle(c: &mut Sim) {
    c.network.heal();
    c.network.config = NetworkConfig::reliable();
    let members: Vec<NodeId> = {
        let l = c.run_until_leader(10_000).unwrap_or_else(|| {
            let nodes: Vec<String> = c
                .node_ids()
                .into_iter()
                .map(|i| match c.core(i) {
                    Some(r) => format!(
                        "{i}: {:?} term {} vote {:?} last {} commit {} recovering {:?}",
                        r.role(),
                        r.term(),
                        r.vote(),
                        r.log().last_index(),
                        r.commit_index(),
                        r.recovering()
                    ),
                    None => format!("{i}: down"),
                })
                .collect();
            panic!("no leader (seed {}): {nodes:#?}", c.seed())
        });
        c.core(l)
            .unwrap()
            .membership()
            .members()
            .into_iter()
            .collect()
    };
    for &id in &members {
        if !c.is_up(id) {
            c.restart(id);
        }
    }
    let done = c.commit_through_leader(b"final".as_slice(), 20);
    let (index, _) = done.unwrap_or_else(|| panic!("no final commit (seed {})", c.seed()));
    assert!(
        c.run_until(10_000, |c| members
            .iter()
            .all(|&i| c.status(i).is_some_and(|s| s.applied_index >= index))),
        "a member did not apply the final command (seed {})",
        c.seed()
    );
    let commands = |c: &Sim, id| {
        c.machine(id)
            .commands()
            .iter()
            .map(|(_, p)| p.as_bytes().to_vec())
            .collect::<Vec<_>>()
    };
    // Members that started with the cluster hold the whole history; later ones from their
    // snapshot on: all agree on what they share.
    let reference = commands(c, members[0]);
    for &id in &members {
        let mine = commands(c, id);
        let tail = &reference[reference.len() - mine.len().min(reference.len())..];
        assert!(
            mine.ends_with(tail) || reference.ends_with(&mine),
            "member {id} applied another sequence (seed {})",
            c.seed()
        );
    }
    c.assert_acknowledged_committed_or_compacted();
}

#[test]
fn grow_from_three_to_five_and_back_under_load() {
    for_each_seed("membership_grow_shrink", 6, |seed| {
        let mut c = cluster(seed, NetworkConfig::reliable());
        let mut rng = Rng::new(seed ^ 0x6E0);
        c.run_until_leader(5_000).expect("leader");
        load(&mut c, &mut rng, "a", 20);
        c.add_node(4, MemStorage::new());
        c.add_node(5, MemStorage::new());
        change(&mut c, &[1, 2, 3], &[4, 5], 30_000);
        load(&mut c, &mut rng, "b", 20);
        change(&mut c, &[1, 2, 3, 4], &[5], 30_000);
        load(&mut c, &mut rng, "c", 20);
        change(&mut c, &[1, 2, 3, 4, 5], &[], 30_000);
        load(&mut c, &mut rng, "d", 20);
        change(&mut c, &[1, 2, 3], &[], 30_000);
        load(&mut c, &mut rng, "e", 20);
        settle(&mut c);
        let l = c.leader().unwrap();
        assert_eq!(c.core(l).unwrap().membership().voters, set(&[1, 2, 3]));
    });
}

#[test]
fn replace_every_member_one_by_one() {
    for_each_seed("membership_replace_all", 6, |seed| {
        let mut c = cluster(seed, NetworkConfig::unreliable());
        let mut rng = Rng::new(seed ^ 0xE1A);
        c.run_until_leader(5_000).expect("leader");
        let mut voters = vec![1, 2, 3];
        for old in 1..=3u64 {
            let new = old + 10;
            load(&mut c, &mut rng, &format!("r{old}"), 10);
            c.add_node(new, MemStorage::new());
            change(&mut c, &voters, &[new], 40_000);
            voters.push(new);
            change(&mut c, &voters, &[], 40_000);
            voters.retain(|&v| v != old);
            change(&mut c, &voters, &[], 40_000);
            // The old machine is switched off for good.
            if c.is_up(old) {
                c.crash(old);
            }
        }
        load(&mut c, &mut rng, "end", 10);
        settle(&mut c);
        let l = c.leader().unwrap();
        assert_eq!(
            c.core(l).unwrap().membership().voters,
            set(&[11, 12, 13]),
            "seed {seed}"
        );
    });
}

#[test]
fn the_leader_crashes_inside_the_joint_configuration() {
    for_each_seed("membership_joint_crash", 10, |seed| {
        let mut c = cluster(seed, NetworkConfig::reliable());
        let mut rng = Rng::new(seed ^ 0x701);
        c.run_until_leader(5_000).expect("leader");
        c.add_node(4, MemStorage::new());
        change(&mut c, &[1, 2, 3], &[4], 30_000);
        load(&mut c, &mut rng, "a", 10);
        // Promote 4, then crash the leader at a random point of the joint phase.
        let deadline = c.now() + 20_000;
        loop {
            let l = c.run_until_leader(5_000).expect("leader");
            if c.change_membership(l, set(&[1, 2, 3, 4]), BTreeSet::new())
                .is_ok()
            {
                c.run_for(rng.range(0, 10));
                c.crash(l);
                c.run_for(rng.range(0, 500));
                c.restart(l);
                break;
            }
            c.run_for(100);
            assert!(c.now() < deadline, "promotion never taken (seed {seed})");
        }
        // Whatever happened to that entry, the cluster ends in a non-joint configuration,
        // and a new try completes.
        change(&mut c, &[1, 2, 3, 4], &[], 30_000);
        settle(&mut c);
    });
}

#[test]
fn a_removed_node_that_keeps_campaigning_does_not_disrupt_the_cluster() {
    for_each_seed("membership_removed_campaigns", 10, |seed| {
        let mut c = cluster(seed, NetworkConfig::reliable());
        let l = c.run_until_leader(5_000).expect("leader");
        let gone = c.node_ids().into_iter().find(|&i| i != l).unwrap();
        c.isolate(gone);
        let keep: Vec<NodeId> = c.node_ids().into_iter().filter(|&i| i != gone).collect();
        change(&mut c, &keep, &[], 30_000);
        // It never learned it was removed, times out over and over, and is heard again.
        c.run_for(3_000);
        let l = c.stable_leader().expect("leader");
        let term = c.core(l).unwrap().term();
        c.reconnect(gone);
        c.run_for(10_000);
        let now = c.stable_leader().expect("still a leader");
        assert_eq!(now, l, "the removed node deposed the leader (seed {seed})");
        assert_eq!(c.core(l).unwrap().term(), term, "terms moved (seed {seed})");
        assert_ne!(c.core(gone).unwrap().role(), Role::Leader);
        // With pre-vote it campaigns without raising its term.
        assert!(c.core(gone).unwrap().term() <= term);
    });
}

#[test]
fn a_learner_that_never_catches_up_is_never_promoted() {
    let mut c = cluster(7, NetworkConfig::reliable());
    let l = c.run_until_leader(5_000).expect("leader");
    c.add_node(4, MemStorage::new());
    c.isolate(4);
    change(&mut c, &[1, 2, 3], &[4], 30_000);
    for i in 0..20 {
        c.propose_and_wait(l, format!("x{i}").as_str(), 2_000);
    }
    let l = c.run_until_leader(5_000).unwrap();
    assert_eq!(
        c.change_membership(l, set(&[1, 2, 3, 4]), BTreeSet::new()),
        Err(MembershipError::NotCaughtUp(4))
    );
    c.reconnect(4);
    change(&mut c, &[1, 2, 3, 4], &[], 30_000);
}

/// A voter's disk is wiped; it restarts empty under its old id, as a `Node` would, and
/// treats its empty storage as a lost disk: it must not vote or count until it has learned
/// every voter's term and caught up. One node of three, then two of five at once
/// (two of three would leave one copy: the cluster would rightly stall rather than guess).
#[test]
fn wiped_disks_are_brought_back_without_losing_acknowledged_writes() {
    for_each_seed("membership_wiped_disks", 10, |seed| {
        for (nodes, wiped) in [(3usize, 1usize), (5, 2)] {
            let mut c = cluster_of(nodes, seed, NetworkConfig::unreliable());
            let mut rng = Rng::new(seed ^ 0x3D1);
            c.run_until_leader(5_000).expect("leader");
            load(&mut c, &mut rng, "a", 30);
            // One loss at a time: a member that crashed before it held anything also starts
            // as a lost disk, and must be back before the wipe (else two of three are
            // lost, and the cluster rightly stalls).
            let back = c.run_until(20_000, |c| {
                c.node_ids()
                    .iter()
                    .all(|&i| c.core(i).is_some_and(|r| r.recovering().is_none()))
            });
            assert!(back, "a member stayed in recovery (seed {seed})");
            let victims: Vec<NodeId> = c.node_ids().into_iter().take(wiped).collect();
            for &v in &victims {
                if c.is_up(v) {
                    c.crash(v);
                }
                // Nothing marks the new disk: the host's rule (an empty storage is a lost
                // disk until every voter says otherwise) must be enough.
                c.replace_storage(v, MemStorage::new());
                c.restart(v);
            }
            load(&mut c, &mut rng, "b", 30);
            settle(&mut c);
        }
    });
}
