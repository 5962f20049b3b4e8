//! Protocol-aware recovery in the simulated cluster: at any point, one node's log tail is
//! lost — and on some seeds its newest term and vote with it — as a storage opened in
//! recovery mode reports after cutting damaged synced records; the node restarts and the
//! cluster must bring it back. Checked after every step as everywhere (one leader per term,
//! log matching, state machine safety, acknowledged ⇒ durable); at the end every acknowledged
//! command is committed and every node applied the same sequence. Without recovery (a node
//! that simply goes on with a shorter log and a forgotten vote) these runs elect leaders
//! without acknowledged entries.
//! `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays one.

use raftkv::raft::{NodeId, Rng};
use raftkv::storage::Storage;
use raftkv::testing::{for_each_seed, Cluster, NetworkConfig, RecordingMachine, SimConfig};

type Sim = Cluster<RecordingMachine>;

fn commands(c: &Sim, id: NodeId) -> Vec<Vec<u8>> {
    c.machine(id)
        .commands()
        .iter()
        .map(|(_, p)| p.as_bytes().to_vec())
        .collect()
}

/// Proposes through whoever leads for a while, with crashes and restarts of other nodes,
/// and at random moments damages one node's tail.
fn run(seed: u64, nodes: usize, network: NetworkConfig, snapshots: bool) {
    let mut cfg = SimConfig::new(nodes, seed);
    // Half the seeds start as hosts do by default: every empty storage a lost disk.
    cfg.distrust_initial_storage = seed.is_multiple_of(2);
    cfg.network = network;
    if snapshots {
        cfg.max_log_bytes = Some(1_200);
        cfg.raft.snapshot_chunk_bytes = 128;
    }
    let mut c = Cluster::new(cfg, |_| RecordingMachine::default());
    let mut rng = Rng::new(seed ^ 0x7A11);
    let mut damaged = 0;
    for round in 0..60 {
        for k in 0..rng.range(1, 8) {
            if let Some(l) = c.leader() {
                let _ = c.propose(l, format!("t{round}-{k}").as_str());
            }
            c.run_for(rng.range(0, 15));
        }
        let victim = rng.range(1, nodes as u64 + 1);
        // One damaged node at a time: with several recovering at once the cluster may have
        // lost the only copies of committed entries, and a majority that may not vote stalls.
        let recovering = c
            .node_ids()
            .into_iter()
            .any(|i| c.storage(i).tail_loss().is_some());
        match rng.range(0, 10) {
            // Damage: the victim goes down, loses its tail (sometimes its vote), restarts.
            0..=2 if !recovering => {
                if c.is_up(victim) {
                    c.crash(victim);
                }
                let last = c.storage(victim).durable_last_index();
                let keep = rng.range(last.saturating_sub(40), last + 1);
                let forget = rng.chance(0.5);
                assert!(c.lose_tail(victim, keep, forget));
                damaged += 1;
                c.restart(victim);
            }
            3 | 4 if c.is_up(victim) => c.crash(victim),
            5 | 6 if !c.is_up(victim) => c.restart(victim),
            7 if c.leader().is_some() => {
                let l = c.leader().unwrap();
                c.crash(l);
            }
            _ => {}
        }
        // Keep a majority alive most of the time so that progress is made.
        let down: Vec<_> = c.node_ids().into_iter().filter(|&i| !c.is_up(i)).collect();
        if down.len() > nodes / 2 {
            c.restart(down[0]);
        }
        // A node that lost its term and vote (or starts empty, which may be a lost disk)
        // needs every voter's answer: bring the others back, or it stays out (and no other
        // node may be damaged) for good.
        let lost_term = c
            .node_ids()
            .into_iter()
            .any(|i| c.storage(i).tail_loss().is_some_and(|l| l.hard_state_lost));
        if lost_term {
            for id in c.node_ids() {
                if !c.is_up(id) {
                    c.restart(id);
                }
            }
        }
        c.run_for(rng.range(0, 300));
    }
    assert!(damaged > 0);
    // Settle: everyone up, reliable network, one more command.
    c.heal_everything();
    let done = c.commit_through_leader(b"final".as_slice(), 20);
    let (index, _) = done.unwrap_or_else(|| {
        panic!(
            "no final commit (seed {seed}): {:#?}",
            c.node_ids()
                .iter()
                .map(|&i| (c.status(i).unwrap(), c.core(i).unwrap().recovering()))
                .collect::<Vec<_>>()
        )
    });
    assert!(
        c.run_until(10_000, |c| c.node_ids().iter().all(|&i| c
            .status(i)
            .unwrap()
            .applied_index
            >= index)),
        "not every node applied the final command (seed {seed}): {:?}",
        c.node_ids()
            .iter()
            .map(|&i| (c.status(i).unwrap(), c.core(i).unwrap().recovering()))
            .collect::<Vec<_>>()
    );
    // A recovering node finishes on its leader's next append or heartbeat round.
    assert!(
        c.run_until(5_000, |c| c.node_ids().iter().all(|&i| c
            .core(i)
            .unwrap()
            .recovering()
            .is_none())),
        "a node is still recovering after the cluster settled (seed {seed}): {:?}",
        c.node_ids()
            .iter()
            .map(|&i| (c.status(i).unwrap(), c.core(i).unwrap().recovering()))
            .collect::<Vec<_>>()
    );
    let reference = commands(&c, c.node_ids()[0]);
    for id in c.node_ids() {
        assert_eq!(
            commands(&c, id),
            reference,
            "node {id} applied a different sequence (seed {seed})"
        );
    }
    c.assert_acknowledged_committed_or_compacted();
    assert!(!c.acknowledged().is_empty());
}

#[test]
fn a_damaged_tail_on_any_node_loses_no_acknowledged_write() {
    for_each_seed("tail_loss", 10, |seed| {
        run(seed, 3, NetworkConfig::reliable(), false)
    });
}

#[test]
fn a_damaged_tail_on_an_unreliable_network_with_snapshots() {
    for_each_seed("tail_loss_unreliable", 10, |seed| {
        run(seed, 5, NetworkConfig::unreliable(), true)
    });
}

/// Seed 269 of the scenario above, kept as a regression: a recovering node's question to an
/// idle leader (its commit index) was lost, it never asked again, and it stayed in recovery
/// after the cluster settled. (Pinned to this seed's run of today's code; the randomized
/// sweep keeps looking for the class.)
#[test]
fn a_lost_commit_question_is_asked_again() {
    run(269, 5, NetworkConfig::unreliable(), true);
}
