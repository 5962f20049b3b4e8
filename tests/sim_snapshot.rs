//! Snapshots and log compaction in the simulated cluster: logs stay bounded, followers that
//! fall behind the compaction point get the snapshot, restarts rebuild from snapshot plus log
//! tail. Every test also checks that snapshots really happened (none of these may pass by
//! snapshotting never or always). `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays.

use std::cell::RefCell;
use std::rc::Rc;

use raftkv::raft::{Membership, MessageBody, NodeId, Rng, SnapshotHeader};
use raftkv::testing::{
    for_each_seed, Cluster, DigestMachine, NetworkConfig, RecordingMachine, SimConfig,
    SimFileStorage, SimStorage,
};
use raftkv::StateMachine;

fn config(nodes: usize, seed: u64, max_log_bytes: u64) -> SimConfig {
    let mut cfg = SimConfig::new(nodes, seed);
    // Half the seeds start as hosts do by default: every empty storage a lost disk.
    cfg.distrust_initial_storage = seed.is_multiple_of(2);
    cfg.max_log_bytes = Some(max_log_bytes);
    cfg
}

/// Proposes `n` commands through whoever leads, waiting for each.
fn write<M: StateMachine, S: SimStorage>(c: &mut Cluster<M, S>, tag: &str, n: usize)
where
    M::Output: Clone,
{
    for i in 0..n {
        let mut done = false;
        for _ in 0..20 {
            if let Some(l) = c.run_until_leader(5_000) {
                if c.propose_and_wait(l, format!("{tag}-{i}").as_str(), 2_000)
                    .is_some()
                {
                    done = true;
                    break;
                }
            }
        }
        assert!(done, "could not commit {tag}-{i} (seed {})", c.seed());
    }
}

/// Waits until every node applied the leader's commit index, then checks all digests agree.
fn converge(c: &mut Cluster<DigestMachine>) -> DigestMachine {
    c.network.heal();
    let l = c.run_until_leader(10_000).expect("leader");
    c.propose_and_wait(l, b"sync".as_slice(), 3_000)
        .expect("commit");
    let target = c.core(l).unwrap().commit_index();
    let ok = c.run_until(10_000, |c| {
        c.node_ids()
            .iter()
            .all(|&i| c.status(i).is_some_and(|s| s.applied_index >= target))
    });
    if !ok {
        for i in c.node_ids() {
            eprintln!(
                "DBG progress of {i} on {l}: {:?}",
                c.core(l).map(|r| r.progress(i))
            );
            eprintln!(
                "DBG core {i}: {:?}",
                c.core(i).map(|r| (r.receiving_snapshot(), r.leader()))
            );
        }
    }
    assert!(
        ok,
        "nodes did not catch up to {target} (seed {}): {:#?}",
        c.seed(),
        c.node_ids()
            .iter()
            .map(|&i| (c.status(i), c.core(i).and_then(|r| r.recovering())))
            .collect::<Vec<_>>()
    );
    let reference = *c.machine(l);
    for id in c.node_ids() {
        assert_eq!(
            *c.machine(id),
            reference,
            "node {id} diverged (seed {})",
            c.seed()
        );
    }
    reference
}

#[test]
fn snapshots_trim_the_log_and_keep_the_state() {
    for_each_seed("snapshot_basic", 10, |seed| {
        let mut c = Cluster::new(config(3, seed, 2_000), |_| DigestMachine::default());
        write(&mut c, "w", 300);
        let state = converge(&mut c);
        assert_eq!(state.count, 301);
        for id in c.node_ids() {
            // ~300 entries of ~35 bytes is ~10 KB of log: a handful of snapshots each.
            let taken = c.snapshots_taken(id);
            assert!(
                (2..=20).contains(&taken),
                "node {id} took {taken} snapshots"
            );
            let snap = c.core(id).unwrap().log().snapshot();
            assert!(snap.index > 100, "node {id} log not compacted: {snap:?}");
            let size = c.persisted_size(id);
            assert!(
                size.log_bytes <= 2 * 2_000,
                "node {id} log {} bytes",
                size.log_bytes
            );
            // The digest machine's state is 24 bytes, whatever the history, after the
            // configuration the snapshot carries.
            let header = SnapshotHeader::encode(&Membership::voters([1, 2, 3])).len() as u64;
            assert_eq!(size.snapshot_bytes, 24 + header);
        }
    });
}

#[test]
fn a_follower_behind_the_compaction_point_gets_the_snapshot() {
    for_each_seed("install_after_disconnect", 10, |seed| {
        let mut c = Cluster::new(config(3, seed, 1_000), |_| DigestMachine::default());
        let leader = c.run_until_leader(3_000).expect("leader");
        let f = c.node_ids().into_iter().find(|&i| i != leader).unwrap();
        c.isolate(f);
        write(&mut c, "w", 200);
        let l = c.leader().unwrap();
        assert!(
            c.core(l).unwrap().log().snapshot().index > c.core(f).unwrap().log().last_index(),
            "leader did not compact past the follower"
        );
        c.reconnect(f);
        converge(&mut c);
        assert!(
            c.snapshots_installed(f) >= 1,
            "follower caught up without a snapshot"
        );
        assert!(c
            .network
            .traffic()
            .get("InstallSnapshot")
            .is_some_and(|t| t.count >= 1));
    });
}

#[test]
fn snapshot_install_on_an_unreliable_network() {
    for_each_seed("install_unreliable", 10, |seed| {
        let mut cfg = config(5, seed, 1_000);
        cfg.network = NetworkConfig::unreliable();
        cfg.raft.snapshot_chunk_bytes = 8; // DigestMachine snapshots are 24 bytes: 3 chunks
        let mut c = Cluster::new(cfg, |_| DigestMachine::default());
        let leader = c.run_until_leader(10_000).expect("leader");
        // Members that treat their empty storages as lost disks take part only once every
        // voter has answered them; cut two off before that and three cannot commit.
        let started = c.run_until(10_000, |c| {
            c.node_ids()
                .iter()
                .all(|&i| c.core(i).is_some_and(|r| r.recovering().is_none()))
        });
        assert!(started, "members still recovering (seed {seed})");
        let lagging: Vec<NodeId> = c
            .node_ids()
            .into_iter()
            .filter(|&i| i != leader)
            .take(2)
            .collect();
        for &f in &lagging {
            c.isolate(f);
        }
        write(&mut c, "w", 150);
        for &f in &lagging {
            c.reconnect(f);
        }
        converge(&mut c);
        for &f in &lagging {
            assert!(
                c.snapshots_installed(f) >= 1,
                "node {f} never installed a snapshot"
            );
        }
    });
}

#[test]
fn a_follower_that_crashes_during_the_transfer_still_gets_it() {
    for_each_seed("install_crash_midway", 10, |seed| {
        // Big snapshots in small chunks: the RecordingMachine keeps every command.
        let mut cfg = config(3, seed, 4_000);
        cfg.raft.snapshot_chunk_bytes = 64;
        cfg.raft.max_snapshot_chunks_inflight = 2;
        let mut c = Cluster::new(cfg, |_| RecordingMachine::default());
        let leader = c.run_until_leader(3_000).expect("leader");
        let f = c.node_ids().into_iter().find(|&i| i != leader).unwrap();
        c.isolate(f);
        write(&mut c, "w", 200);
        c.reconnect(f);
        let mid = c.run_until(5_000, |c| {
            c.core(f).is_some_and(|core| core.receiving_snapshot())
        });
        assert!(mid, "transfer never started");
        c.crash(f);
        c.run_for(300);
        c.restart(f);
        let l = c.run_until_leader(5_000).unwrap();
        c.propose_and_wait(l, b"after".as_slice(), 3_000)
            .expect("commit");
        let target = c.core(l).unwrap().commit_index();
        assert!(c.run_until(10_000, |c| c.status(f).unwrap().applied_index >= target));
        assert!(c.snapshots_installed(f) >= 1);
        assert_eq!(c.machine(f).commands(), c.machine(l).commands());
    });
}

#[test]
fn whole_cluster_crashes_with_snapshots_lose_nothing() {
    for_each_seed("snapshot_whole_cluster_crashes", 10, |seed| {
        let mut c = Cluster::new(config(3, seed, 1_500), |_| DigestMachine::default());
        let mut rng = Rng::new(seed);
        for round in 0..6 {
            write(&mut c, &format!("r{round}"), 40);
            // Crash everyone at a random moment, maybe mid-snapshot, then restart.
            c.run_for(rng.range(0, 30));
            for id in c.node_ids() {
                c.crash(id);
            }
            for id in c.node_ids() {
                c.restart(id);
            }
        }
        let state = converge(&mut c);
        assert_eq!(
            state.count,
            6 * 40 + 1,
            "acknowledged commands lost or applied twice"
        );
        c.assert_acknowledged_committed_or_compacted();
        let taken: u64 = c.node_ids().iter().map(|&i| c.snapshots_taken(i)).sum();
        assert!(taken >= 3, "only {taken} snapshots in 240 commands");
    });
}

#[test]
fn a_restarted_node_restores_its_snapshot_then_applies_only_later_entries() {
    for_each_seed("restart_from_snapshot", 10, |seed| {
        let mut c = Cluster::new(config(3, seed, 1_000), |_| DigestMachine::default());
        write(&mut c, "w", 100);
        let id = c.node_ids()[0];
        assert!(c.snapshots_taken(id) + c.snapshots_installed(id) >= 1);
        let snap = c.storage(id).durable_snapshot_index();
        assert!(snap > 0);
        c.crash(id);
        c.restart(id);
        // Right after restart the machine holds the snapshot's state...
        assert!(c.machine(id).last_index >= snap.min(c.machine(id).last_index));
        assert_eq!(c.status(id).unwrap().applied_index, snap);
        converge(&mut c);
        // ...and every entry it applied since lies after the snapshot.
        let applied = c.applied(id);
        assert!(
            applied.first().is_none_or(|e| e.index == snap + 1),
            "replayed from {:?}, snapshot {snap}",
            applied.first()
        );
    });
}

#[test]
fn the_persisted_raft_state_stays_bounded_under_steady_load() {
    for_each_seed("log_size_bound", 5, |seed| {
        let max = 3_000;
        let mut c = Cluster::new(config(3, seed, max), |_| DigestMachine::default());
        write(&mut c, "w", 800);
        converge(&mut c);
        for id in c.node_ids() {
            let peak = c.peak_persisted_bytes(id);
            assert!(
                peak < 8 * max,
                "node {id} peaked at {peak} bytes (bound {})",
                8 * max
            );
            assert!(
                c.snapshots_taken(id) >= 5,
                "node {id}: {} snapshots",
                c.snapshots_taken(id)
            );
        }
    });
}

#[test]
fn without_a_bound_no_snapshot_is_taken() {
    let mut c = Cluster::new(SimConfig::new(3, 7), |_| DigestMachine::default());
    write(&mut c, "w", 100);
    converge(&mut c);
    for id in c.node_ids() {
        assert_eq!(c.snapshots_taken(id), 0);
        assert_eq!(c.core(id).unwrap().log().snapshot().index, 0);
    }
    // A forced snapshot works and compacts.
    let id = c.node_ids()[0];
    assert!(c.snapshot(id));
    c.run_for(100);
    assert_eq!(c.snapshots_taken(id), 1);
    assert!(c.core(id).unwrap().log().snapshot().index >= 100);
}

/// A small bound holds too (it used to stall at many times the bound): the log a node keeps
/// stays under twice `max_log_bytes` (the threshold plus what may arrive while a snapshot is
/// written; then the node takes on no more log), on memory and on the file storage, which
/// may keep up to a segment it cannot free yet.
#[test]
fn a_small_log_bound_holds_on_memory_and_on_files() {
    for_each_seed("small_log_bound", 5, |seed| {
        let max = 1_000;
        let mut c = Cluster::new(config(3, seed, max), |_| DigestMachine::default());
        write(&mut c, "w", 300);
        converge(&mut c);
        let mut f = Cluster::with_storage(
            config(3, seed, max),
            |_| DigestMachine::default(),
            SimFileStorage::new,
        );
        write(&mut f, "w", 300);
        for id in c.node_ids() {
            // Memory: 24 bytes of hard state, the entries, a 24-byte snapshot.
            let peak = c.peak_persisted_bytes(id);
            assert!(
                peak <= 2 * max + 48,
                "memory: node {id} peaked at {peak} bytes"
            );
            assert!(
                c.snapshots_taken(id) >= 5,
                "memory: node {id} took few snapshots"
            );
            // Files: record framing on top of each entry, and one 4 KiB segment.
            let peak = f.peak_persisted_bytes(id);
            assert!(
                peak <= 3 * max + 4096 + 256,
                "files: node {id} peaked at {peak} bytes"
            );
            assert!(
                f.snapshots_taken(id) >= 5,
                "files: node {id} took few snapshots"
            );
        }
    });
}

/// The bound under bursts: many proposals stepped per round while snapshots take long to
/// write, so the log would run far past the threshold before a snapshot lands; the node
/// refuses what would take its log past twice the bound instead.
#[test]
fn a_small_log_bound_holds_under_bursts_and_slow_snapshots() {
    for_each_seed("small_log_bound_bursts", 5, |seed| {
        let max = 1_000;
        let mut cfg = config(3, seed, max);
        cfg.snapshot_ms = (30, 120);
        let mut c = Cluster::new(cfg, |_| DigestMachine::default());
        let mut refused = 0;
        for round in 0..200 {
            let Some(l) = c.run_until_leader(5_000) else {
                continue;
            };
            for k in 0..30 {
                if c.propose(l, format!("b{round}-{k}").as_str()).is_err() {
                    refused += 1;
                }
            }
            c.run_for(5);
        }
        converge(&mut c);
        for id in c.node_ids() {
            let peak = c.peak_persisted_bytes(id);
            // Hard state and snapshot (up to 72 bytes), twice the bound, at most one entry
            // over.
            assert!(
                peak <= 2 * max + 72 + 40,
                "node {id} peaked at {peak} bytes (seed {seed})"
            );
            assert!(c.snapshots_taken(id) >= 5, "node {id} took few snapshots");
        }
        assert!(
            refused > 0,
            "the bursts never reached the bound (seed {seed})"
        );
    });
}

/// Snapshot transfers abandoned half-way, again and again: small chunks, leadership moving
/// every few tens of milliseconds, a follower cut off and back, some messages arriving long
/// after they were sent. A follower left "receiving" a transfer nobody finishes must not stop
/// taking snapshots: afterwards every node still snapshots, and no log outgrows the bound.
#[test]
fn abandoned_transfers_never_stop_snapshots() {
    for_each_seed("abandoned_transfers", 10, |seed| {
        let max = 1_000;
        let mut cfg = config(5, seed, max);
        cfg.network = NetworkConfig::unreliable();
        cfg.raft.snapshot_chunk_bytes = 8; // DigestMachine snapshots are 24 bytes: 3 chunks
        cfg.raft.max_snapshot_chunks_inflight = 1;
        let mut c = Cluster::new(cfg, |_| DigestMachine::default());
        c.network.set_stragglers(0.05, 300);
        let mut rng = Rng::new(seed ^ 0xAB4D);
        for round in 0..60 {
            if let Some(l) = c.leader() {
                for k in 0..rng.range(5, 20) {
                    let _ = c.propose(l, format!("a{round}-{k}").as_str());
                }
                match rng.range(0, 4) {
                    0 => {
                        let others: Vec<NodeId> =
                            c.node_ids().into_iter().filter(|&i| i != l).collect();
                        let to = others[rng.range(0, others.len() as u64) as usize];
                        let _ = c.transfer_leadership(l, to);
                    }
                    1 => {
                        let ids = c.node_ids();
                        let v = ids[rng.range(0, ids.len() as u64) as usize];
                        c.isolate(v);
                        c.run_for(rng.range(50, 300));
                        c.reconnect(v);
                    }
                    _ => {}
                }
            }
            c.run_for(rng.range(5, 60));
        }
        c.network.set_stragglers(0.0, 0);
        c.network.heal();
        // After a quiet while no node is left "receiving" a transfer that nobody finishes
        // (which would keep it from taking snapshots of its own).
        c.run_for(2_000);
        for id in c.node_ids() {
            assert!(
                !c.core(id).unwrap().receiving_snapshot(),
                "node {id} is still receiving an abandoned transfer (seed {seed})"
            );
        }
        let before: Vec<u64> = c.node_ids().iter().map(|&i| c.snapshots_taken(i)).collect();
        write(&mut c, "after", 200);
        converge(&mut c);
        for (k, id) in c.node_ids().into_iter().enumerate() {
            assert!(
                c.snapshots_taken(id) > before[k],
                "node {id} stopped taking snapshots (seed {seed})"
            );
            // Twice the bound plus one entry (of at most ~35 bytes here), 24 bytes of hard
            // state and the stored snapshot: 24 bytes of state behind its membership header
            // (16 bytes for five voters), 40 in all.
            let peak = c.peak_persisted_bytes(id);
            assert!(
                peak <= 2 * max + 40 + 24 + 40,
                "node {id} peaked at {peak} bytes (seed {seed})"
            );
        }
    });
}

/// A state machine whose snapshots of one state differ in their bytes from node to node (as a
/// `HashMap` with per-process hashing serializes): the set of applied `(index, command)`
/// hashes, written in an order only this node uses, with a checksum over the set. A snapshot
/// spliced from two nodes' images restores a different set, or fails its checksum.
#[derive(Clone, Debug, Default)]
struct ShuffledMachine {
    order: u64,
    items: Vec<u64>,
}

impl ShuffledMachine {
    fn new(order: u64) -> Self {
        ShuffledMachine {
            order,
            items: Vec::new(),
        }
    }
    fn set(&self) -> Vec<u64> {
        let mut s = self.items.clone();
        s.sort_unstable();
        s
    }
}

fn hash_of(v: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl StateMachine for ShuffledMachine {
    type Output = u64;
    fn apply(&mut self, index: u64, command: &[u8]) -> u64 {
        self.items.push(hash_of((index, command)));
        self.items.len() as u64
    }
    fn snapshot(&mut self) -> Box<dyn raftkv::SnapshotSource> {
        let mut items = self.set();
        // This node's order: sorted by a keyed hash.
        items.sort_by_key(|&v| hash_of((self.order, v)));
        let mut b = Vec::with_capacity(16 + 8 * items.len());
        b.extend_from_slice(&(items.len() as u64).to_le_bytes());
        b.extend_from_slice(&hash_of(self.set()).to_le_bytes());
        for v in items {
            b.extend_from_slice(&v.to_le_bytes());
        }
        Box::new(b)
    }
    fn restore(&mut self, snapshot: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut b = Vec::new();
        snapshot.read_to_end(&mut b)?;
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
        let n = word(0) as usize;
        let items: Vec<u64> = (0..n).map(|i| word(2 + i)).collect();
        let restored = ShuffledMachine {
            order: self.order,
            items,
        };
        if hash_of(restored.set()) != word(1) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "spliced snapshot: the set does not match its checksum",
            ));
        }
        *self = restored;
        Ok(())
    }
}

/// A transfer interrupted by a leader change. When the new leader holds a snapshot of the
/// same index and size whose bytes differ, the follower must start over from offset 0, never
/// splice the two images; when it holds none, it catches the follower up with appends, and
/// the abandoned transfer must not stay open in the follower.
#[test]
fn a_transfer_resumed_by_another_leader_never_splices_two_images() {
    for_each_seed("snapshot_no_splice", 10, |seed| {
        let mut cfg = SimConfig::new(3, seed);
        cfg.raft.snapshot_chunk_bytes = 16;
        cfg.raft.max_snapshot_chunks_inflight = 1;
        let mut c: Cluster<ShuffledMachine> = Cluster::new(cfg, ShuffledMachine::new);
        let mut rng = Rng::new(seed ^ 0x5B1C);
        let l1 = c.run_until_leader(5_000).expect("leader");
        let f = c.node_ids().into_iter().find(|&i| i != l1).unwrap();
        let l2 = c
            .node_ids()
            .into_iter()
            .find(|&i| i != l1 && i != f)
            .unwrap();
        c.isolate(f);
        for i in 0..40 {
            c.propose_and_wait(l1, format!("x{i}").as_str(), 2_000)
                .expect("commit");
        }
        let target = c.core(l1).unwrap().commit_index();
        assert!(c.run_until(5_000, |c| [l1, l2]
            .iter()
            .all(|&i| c.status(i).is_some_and(|s| s.applied_index >= target))));
        // On even seeds both hold an image of the same index, in their own byte orders; on
        // odd ones only l1 does, and l2 catches the follower up with appends instead, leaving
        // l1's transfer abandoned half-way.
        let both = seed % 2 == 0;
        assert!(c.snapshot(l1) && (!both || c.snapshot(l2)));
        c.run_for(200);
        let meta = |c: &Cluster<ShuffledMachine>, i| c.core(i).unwrap().log().snapshot();
        if both {
            assert_eq!(meta(&c, l1), meta(&c, l2));
        }
        // The follower gets part of node l1's image, then l1 hands over to l2 (at once, so
        // that the follower's partial copy is still fresh), and l2 takes over the transfer.
        c.reconnect(f);
        c.run_for(rng.range(3, 40));
        c.transfer_leadership(l1, l2).expect("transfer");
        c.run_until(2_000, |c| c.leader() == Some(l2));
        if rng.chance(0.5) {
            c.crash(l1);
        }
        let leader = c.run_until_leader(10_000).expect("a new leader");
        assert_eq!(leader, l2);
        c.propose_and_wait(leader, b"after".as_slice(), 5_000)
            .expect("commit");
        let target = c.core(leader).unwrap().commit_index();
        let caught_up = c.run_until(10_000, |c| {
            c.status(f).is_some_and(|s| s.applied_index >= target)
        });
        assert!(caught_up, "node {f} did not catch up (seed {seed})");
        if both {
            assert!(c.snapshots_installed(f) >= 1, "no snapshot was sent");
        }
        // An abandoned transfer does not leave the follower "receiving" for good (it could
        // never take a snapshot of its own).
        c.run_for(1_000);
        assert!(
            !c.core(f).unwrap().receiving_snapshot(),
            "node {f} is still receiving an abandoned transfer (seed {seed})"
        );
        assert_eq!(
            c.machine(f).set(),
            c.machine(leader).set(),
            "node {f} restored another state (seed {seed})"
        );
    });
}

const WINDOW: u64 = 4;

/// Three nodes on an ordered network (every message takes 2 ms; a chunk overtaken by a later
/// one would be refused, and the refusal would say where the follower stands), 64-byte
/// snapshot chunks, [`WINDOW`] of them in flight, and a follower kept apart while the leader
/// compacts past it. Returns the cluster (the follower still cut off), the leader and the
/// follower.
fn follower_behind_a_snapshot(seed: u64) -> (Cluster<RecordingMachine>, NodeId, NodeId) {
    let mut cfg = config(3, seed, 1_000);
    cfg.distrust_initial_storage = false;
    cfg.network.min_delay_ms = 2;
    cfg.network.max_delay_ms = 2;
    cfg.raft.snapshot_chunk_bytes = 64;
    cfg.raft.max_snapshot_chunks_inflight = WINDOW;
    let mut c = Cluster::new(cfg, |_| RecordingMachine::default());
    let leader = c.run_until_leader(3_000).expect("leader");
    let f = c.node_ids().into_iter().find(|&i| i != leader).unwrap();
    c.isolate(f);
    write(&mut c, "w", 200);
    assert_eq!(
        c.leader(),
        Some(leader),
        "leadership moved on a reliable network"
    );
    assert!(
        c.core(leader).unwrap().log().snapshot().index > c.core(f).unwrap().log().last_index(),
        "leader did not compact past the follower"
    );
    (c, leader, f)
}

/// Reconnects `f` and has `leader` serve a read every millisecond (each read round travels
/// as a heartbeat the follower answers) until `f` installed a snapshot or 10 s passed.
fn reconnect_under_reads(c: &mut Cluster<RecordingMachine>, leader: NodeId, f: NodeId) {
    c.reconnect(f);
    let mut ms = 0;
    while c.snapshots_installed(f) == 0 && ms < 10_000 {
        let _ = c.read(leader, "r");
        c.run_for(1);
        ms += 1;
    }
    assert_eq!(
        c.snapshots_installed(f),
        1,
        "no snapshot installed on {f} after {ms} ms"
    );
}

#[test]
fn reads_during_a_transfer_do_not_resend_its_chunks() {
    for_each_seed("reads_during_transfer", 10, |seed| {
        let (mut c, leader, f) = follower_behind_a_snapshot(seed);
        // Watch (never drop) the chunks: their offsets, and the snapshot's size.
        let sent = Rc::new(RefCell::new((Vec::new(), 0u64)));
        let seen = sent.clone();
        c.network.set_filter(move |m, _| {
            if let MessageBody::InstallSnapshot { size, offset, .. } = m.body {
                let mut s = seen.borrow_mut();
                s.0.push(offset);
                s.1 = size;
            }
            false
        });
        reconnect_under_reads(&mut c, leader, f);
        // Nothing was lost, so every chunk left once: neither read rounds nor a follower
        // whose acknowledgements wait for its fsync may look like lost chunks.
        let (offsets, size) = sent.borrow().clone();
        assert_eq!(
            offsets.len() as u64,
            size.div_ceil(64),
            "{} chunks sent for {size} bytes in 64-byte chunks: {offsets:?}",
            offsets.len()
        );
    });
}

#[test]
fn a_transfer_whose_last_chunk_is_lost_completes_under_reads() {
    for_each_seed("last_chunk_lost", 10, |seed| {
        let (mut c, leader, f) = follower_behind_a_snapshot(seed);
        // The first copy of the last chunk is lost: no later chunk makes the follower say
        // where it stands, so only the leader's check at a heartbeat can resume the
        // transfer, while read rounds' answers take some of the checks.
        let mut lost = false;
        c.network.set_filter(move |m, _| match &m.body {
            MessageBody::InstallSnapshot {
                size, offset, data, ..
            } if !lost && offset + data.len() as u64 == *size => {
                lost = true;
                true
            }
            _ => false,
        });
        reconnect_under_reads(&mut c, leader, f);
    });
}

#[test]
fn a_transfer_under_random_loss_and_reads_resends_only_what_was_lost() {
    for_each_seed("transfer_random_loss", 20, |seed| {
        let (mut c, leader, f) = follower_behind_a_snapshot(seed);
        // One in twenty chunks and one in twenty of their answers are lost, drawn from the
        // seeded generator, while read rounds' answers take some of the leader's checks.
        // Counted: chunks sent, and messages of the transfer lost.
        let seen = Rc::new(RefCell::new(Counts::default()));
        let count = seen.clone();
        c.network.set_filter(move |m, rng| {
            let mut n = count.borrow_mut();
            let lose = match &m.body {
                MessageBody::InstallSnapshot { size, .. } => {
                    n.chunks += 1;
                    n.size = *size;
                    rng.chance(0.05)
                }
                MessageBody::SnapshotResponse { .. } => rng.chance(0.05),
                _ => false,
            };
            n.lost += u64::from(lose);
            lose
        });
        let started = c.now();
        reconnect_under_reads(&mut c, leader, f);
        let took = c.now() - started;
        let n = *seen.borrow();
        let needed = n.size.div_ceil(64);
        // A lost chunk makes the follower refuse the ones after it in flight, and a lost
        // answer (or refusal) at most stalls the window until a heartbeat check: either way
        // one loss costs at most one window again. Anything above is a resend of chunks that
        // were not lost (the followers' acknowledgements wait for their fsyncs, and read
        // rounds answer in between).
        assert!(
            n.chunks <= needed + WINDOW * n.lost,
            "{} chunks sent for {needed} with {} messages lost (window {WINDOW}) in {took} ms",
            n.chunks,
            n.lost
        );
        // Without loss the 19 chunks take under 40 ms (2 ms each way, a window at a time,
        // each acknowledged after an fsync); each loss costs at most a refusal's round trip
        // or two heartbeat intervals (10 ms ticks, a heartbeat every tick).
        assert!(
            took <= 40 + 20 * n.lost,
            "transfer took {took} ms with {} messages lost",
            n.lost
        );
    });
}

#[derive(Clone, Copy, Default)]
struct Counts {
    chunks: u64,
    size: u64,
    lost: u64,
}
