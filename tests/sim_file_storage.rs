//! The cluster simulation on the real file storage over simulated disks: crashes resolve each
//! node's unsynced file writes at random (lost, kept or torn), whole-cluster power losses
//! included, with and without snapshots. Safety is checked after every step; at the end no
//! acknowledged command is lost and every node applied the same commands exactly once.
//! `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays one.

use raftkv::raft::Rng;
use raftkv::testing::{
    for_each_seed, Cluster, DigestMachine, NetworkConfig, SimConfig, SimFileStorage,
};

type Sim = Cluster<DigestMachine, SimFileStorage>;

fn cluster(seed: u64, network: NetworkConfig, snapshots: bool) -> Sim {
    let mut cfg = SimConfig::new(3, seed);
    // Half the seeds start as hosts do by default: every empty storage a lost disk.
    cfg.distrust_initial_storage = seed.is_multiple_of(2);
    cfg.network = network;
    if snapshots {
        cfg.max_log_bytes = Some(600);
        cfg.raft.snapshot_chunk_bytes = 16;
    }
    Cluster::with_storage(cfg, |_| DigestMachine::default(), SimFileStorage::new)
}

/// Commits `n` commands through whoever leads (retrying across leader changes); returns how
/// many were acknowledged.
fn write(c: &mut Sim, tag: &str, n: usize) -> u64 {
    let mut acked = 0;
    for i in 0..n {
        for _ in 0..20 {
            if let Some(l) = c.run_until_leader(5_000) {
                if c.propose_and_wait(l, format!("{tag}-{i}").as_str(), 2_000)
                    .is_some()
                {
                    acked += 1;
                    break;
                }
            }
        }
    }
    acked
}

/// Heals, restarts everyone, commits one more command and checks that all nodes applied the
/// same commands, and that every acknowledged command is committed.
fn settle(c: &mut Sim) -> DigestMachine {
    c.network.heal();
    c.network.config = NetworkConfig::reliable();
    for id in c.node_ids() {
        if !c.is_up(id) {
            c.restart(id);
        }
    }
    assert_eq!(
        write(c, "final", 1),
        1,
        "the healed cluster commits (seed {})",
        c.seed()
    );
    let l = c.run_until_leader(5_000).expect("leader");
    let target = c.core(l).unwrap().commit_index();
    let ok = c.run_until(10_000, |c| {
        c.node_ids()
            .iter()
            .all(|&i| c.status(i).unwrap().applied_index >= target)
    });
    assert!(ok, "nodes did not catch up (seed {})", c.seed());
    for id in c.node_ids() {
        assert_eq!(
            c.machine(id),
            c.machine(l),
            "node {id} diverged (seed {})",
            c.seed()
        );
    }
    c.assert_acknowledged_committed_or_compacted();
    *c.machine(l)
}

fn whole_cluster_crashes(seed: u64, snapshots: bool) {
    let mut c = cluster(seed, NetworkConfig::reliable(), snapshots);
    let mut rng = Rng::new(seed ^ 0xD15C);
    let mut acked = 0;
    for round in 0..5 {
        acked += write(&mut c, &format!("r{round}"), 15);
        // Some proposals are in flight when the power goes.
        if let Some(l) = c.leader() {
            for i in 0..3 {
                let _ = c.propose(l, format!("r{round}-inflight{i}").as_str());
            }
        }
        c.run_for(rng.range(0, 8));
        for id in c.node_ids() {
            c.crash(id);
        }
        for id in c.node_ids() {
            c.restart(id);
        }
    }
    let state = settle(&mut c);
    // Every acknowledged command applied once; in-flight ones at most once.
    assert!(
        state.count > acked,
        "acknowledged commands lost: {} applied, {acked} acknowledged",
        state.count
    );
    assert!(state.count <= acked + 5 * 3 + 1, "commands applied twice");
    if snapshots {
        let taken: u64 = c.node_ids().iter().map(|&i| c.snapshots_taken(i)).sum();
        assert!(taken >= 1, "snapshots enabled but none taken (seed {seed})");
    }
}

#[test]
fn whole_cluster_crashes_on_file_storage() {
    for_each_seed("file_whole_cluster", 8, |seed| {
        whole_cluster_crashes(seed, false)
    });
}

#[test]
fn whole_cluster_crashes_on_file_storage_with_snapshots() {
    for_each_seed("file_whole_cluster_snapshots", 8, |seed| {
        whole_cluster_crashes(seed, true)
    });
}

#[test]
fn churn_on_file_storage_over_an_unreliable_network() {
    for_each_seed("file_churn", 6, |seed| {
        let mut c = cluster(seed, NetworkConfig::unreliable(), seed % 2 == 0);
        let mut rng = Rng::new(seed ^ 0xC4);
        for round in 0..40 {
            if let Some(l) = c.leader() {
                for k in 0..rng.range(0, 5) {
                    let _ = c.propose(l, format!("c{round}-{k}").as_str());
                }
            }
            let victim = rng.range(1, 4);
            match rng.range(0, 6) {
                0 if c.is_up(victim) => c.crash(victim),
                1 | 2 if !c.is_up(victim) => c.restart(victim),
                3 => c.isolate(victim),
                4 => c.network.heal(),
                _ => {}
            }
            let down: Vec<_> = c.node_ids().into_iter().filter(|&i| !c.is_up(i)).collect();
            if down.len() > 1 {
                c.restart(down[0]);
            }
            c.run_for(rng.range(0, 300));
        }
        settle(&mut c);
    });
}

/// The file storage frees whole segments (4 KiB here), so right after a compaction it still
/// reports up to a segment of log. A bound smaller than that must not make a node snapshot
/// after every apply: growth is measured from what compaction left.
#[test]
fn a_bound_below_the_segment_size_does_not_snapshot_every_apply() {
    for_each_seed("file_small_bound", 5, |seed| {
        let mut c = cluster(seed, NetworkConfig::reliable(), true);
        let acked = write(&mut c, "w", 100);
        assert_eq!(acked, 100);
        settle(&mut c);
        for id in c.node_ids() {
            let taken = c.snapshots_taken(id);
            assert!(
                (1..=25).contains(&taken),
                "node {id} took {taken} snapshots for 101 commands"
            );
        }
    });
}
