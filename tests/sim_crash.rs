//! Crashes and restarts in the simulated cluster: persistence, the Figure 8 scenario and churn.
//! A crash keeps only what each node's storage had synced. Safety is checked after every step;
//! at the end every acknowledged command must be committed.
//! `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays one.
//!
//! # How we checked that the suites catch real bugs
//! Each mutation below was applied to `src/raft/core.rs` by hand and the suites run with
//! `RAFTKV_SEEDS=300 cargo test --release --no-fail-fast --features testing --test core_scripted
//! --test sim_crash --test sim_replication --test sim_election`; then the mutation was reverted.
//! Results as of the first version of this suite:
//! - *Commit an earlier-term entry by counting replicas* (drop `term == self.term` in
//!   `maybe_commit`): caught by `core_scripted::a_leader_commits_earlier_term_entries_only_...`.
//!   The randomized `figure8_*` tests did **not** catch it in 300 seeds: a new leader's no-op
//!   usually travels with the older entries, so the dangerous window is tiny. That is why the
//!   scripted story exists. `figure8_adversarial` (which loses most appends carrying a
//!   current-term entry) did not catch it in 300 seeds either; the unsafe commit happens, but
//!   the later election of a node holding a conflicting entry of a term in between is rare.
//! - *Grant votes without the up-to-date check*: caught by `churn_*`, `figure8_*`,
//!   `many_elections_under_partition_churn`, `rejoin_old_leader` ("leader completeness: leader
//!   L of term T lacks committed entry I") and by `core_scripted::votes_go_only_to_...`.
//! - *Acknowledge appends before they are durable* (`Dispatch::Now` for AppendResponse):
//!   caught by `persistence_across_single_node_crashes`, `persistence_across_whole_cluster_crashes`,
//!   `churn_*` and `core_scripted::messages_that_depend_on_durable_state_wait_for_it`.
//! - *Forget the vote on restart*: caught by `churn_unreliable` (seed 23: "two leaders in
//!   term 9") and `core_scripted::a_restarted_node_keeps_its_term_vote_and_log`.

use std::io::Read;

use raftkv::raft::{Index, MessageBody, NodeId, Payload, Rng};
use raftkv::testing::{for_each_seed, Cluster, NetworkConfig, RecordingMachine, SimConfig};
use raftkv::{SnapshotSource, StateMachine};

type Sim = Cluster<Salted>;

/// A [`RecordingMachine`] whose snapshot bytes differ from replica to replica and from one
/// snapshot to the next for the same state (a salt, and the image masked with it), as a
/// state machine that serializes a hash map or compresses would. A snapshot spliced from two
/// images no longer decodes, so the simulation notices.
struct Salted {
    inner: RecordingMachine,
    salt: u64,
}

impl Salted {
    fn new(id: NodeId) -> Self {
        Salted {
            inner: RecordingMachine::default(),
            salt: id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }
    fn commands(&self) -> &[(Index, Payload)] {
        self.inner.commands()
    }
    fn mask(salt: u64, bytes: &mut [u8]) {
        let mut rng = Rng::new(salt);
        for b in bytes {
            *b ^= rng.next_u64() as u8;
        }
    }
}

impl StateMachine for Salted {
    type Output = Index;
    fn apply(&mut self, index: Index, command: &[u8]) -> Index {
        self.inner.apply(index, command)
    }
    fn snapshot(&mut self) -> Box<dyn SnapshotSource> {
        self.salt = Rng::new(self.salt).next_u64();
        let mut image = Vec::new();
        self.inner
            .snapshot()
            .write_to(&mut image)
            .expect("in memory");
        Self::mask(self.salt, &mut image);
        let mut out = self.salt.to_le_bytes().to_vec();
        out.extend(image);
        Box::new(out)
    }
    fn restore(&mut self, snapshot: &mut dyn Read) -> std::io::Result<()> {
        let mut salt = [0u8; 8];
        snapshot.read_exact(&mut salt)?;
        let mut image = Vec::new();
        snapshot.read_to_end(&mut image)?;
        Self::mask(u64::from_le_bytes(salt), &mut image);
        self.inner.restore(&mut image.as_slice())
    }
}

/// The snapshot bound a seed's cluster runs with, if any.
fn snapshot_bound(seed: u64) -> Option<u64> {
    let mut rng = Rng::new(seed ^ 0xBA7C);
    rng.range(0, 4);
    rng.range(0, 4);
    rng.chance(0.5).then_some(1_500)
}

fn cluster(nodes: usize, seed: u64, network: NetworkConfig) -> Sim {
    let mut cfg = SimConfig::new(nodes, seed);
    // Half the seeds start as hosts do by default: every empty storage a lost disk.
    cfg.distrust_initial_storage = seed.is_multiple_of(2);
    cfg.network = network;
    // Small batches and windows (on some seeds one entry per message, as in the paper) so
    // that a new leader's no-op does not always travel with the older entries before it:
    // that is what makes the Figure 8 situation reachable.
    let mut rng = Rng::new(seed ^ 0xBA7C);
    cfg.raft.max_append_entries = [1, 2, 4, 256][rng.range(0, 4) as usize];
    cfg.raft.max_inflight = [1, 2, 8, 64][rng.range(0, 4) as usize];
    // Half of the seeds also snapshot and compact (small bound, small chunks), so crashes
    // land around snapshots and followers catch up by snapshot too.
    if rng.chance(0.5) {
        cfg.max_log_bytes = Some(1_500);
        cfg.raft.snapshot_chunk_bytes = 256;
    }
    debug_assert_eq!(cfg.max_log_bytes, snapshot_bound(seed));
    Cluster::new(cfg, Salted::new)
}

fn commands(c: &Sim, id: NodeId) -> Vec<Vec<u8>> {
    c.machine(id)
        .commands()
        .iter()
        .map(|(_, p)| p.as_bytes().to_vec())
        .collect()
}

/// Heals everything, restarts crashed nodes, commits one more command and checks that all
/// nodes applied the same sequence and that every acknowledged command is in it. With
/// snapshots on, also checks that snapshots still work on every node (none was left stuck,
/// say, "receiving" a transfer that was abandoned): enough more commands to pass the bound
/// twice, and every node must have compacted.
fn settle_and_check(c: &mut Sim, snapshots: Option<u64>) {
    c.heal_everything();
    let done = c.commit_through_leader(b"final".as_slice(), 10);
    let (index, _) = done.expect("the healed cluster commits a final command");
    let ok = c.run_until(5_000, |c| {
        c.node_ids()
            .iter()
            .all(|&i| c.status(i).unwrap().applied_index >= index)
    });
    assert!(ok, "not every node applied the final command");
    let reference = commands(c, c.node_ids()[0]);
    for id in c.node_ids() {
        assert_eq!(
            commands(c, id),
            reference,
            "node {id} applied a different sequence"
        );
    }
    c.assert_acknowledged_committed_or_compacted();
    if c.node_ids()
        .iter()
        .all(|&i| c.core(i).unwrap().log().snapshot().index == 0)
    {
        c.assert_acknowledged_committed();
    }
    if let Some(max) = snapshots {
        let before: Vec<u64> = c
            .node_ids()
            .iter()
            .map(|&i| c.core(i).unwrap().log().snapshot().index)
            .collect();
        let mut last = index;
        for i in 0..(4 * max / 30) {
            for _ in 0..10 {
                let Some(l) = c.run_until_leader(10_000) else {
                    continue;
                };
                if let Some((at, _)) = c.propose_and_wait(l, format!("s{i}").as_str(), 3_000) {
                    last = at;
                    break;
                }
            }
        }
        assert!(
            c.run_until(5_000, |c| c.node_ids().iter().all(|&i| c
                .status(i)
                .unwrap()
                .applied_index
                >= last)),
            "not every node applied the last command"
        );
        for (id, before) in c.node_ids().into_iter().zip(before) {
            let core = c.core(id).unwrap();
            assert!(
                core.log().snapshot().index > before && core.log().bytes() <= 2 * max + 64,
                "node {id} stopped compacting: snapshot {} (was {before}), {} log bytes \
                 (replay with RAFTKV_SEED={})",
                core.log().snapshot().index,
                core.log().bytes(),
                c.seed()
            );
        }
    }
}

#[test]
fn persistence_across_single_node_crashes() {
    for_each_seed("single_node_crashes", 20, |seed| {
        let mut c = cluster(3, seed, NetworkConfig::reliable());
        let mut rng = Rng::new(seed);
        for round in 0..6 {
            let l = c.run_until_leader(5_000).expect("leader");
            c.propose_and_wait(l, format!("r{round}").as_str(), 2_000)
                .expect("commit");
            // Crash the leader or a follower, then bring it back.
            let victim = if rng.chance(0.5) {
                l
            } else {
                c.node_ids()[rng.range(0, 3) as usize]
            };
            c.crash(victim);
            c.run_for(rng.range(0, 800));
            c.restart(victim);
        }
        settle_and_check(&mut c, None);
        assert_eq!(c.acknowledged().len(), 7);
    });
}

#[test]
fn persistence_across_whole_cluster_crashes() {
    for_each_seed("whole_cluster_crashes", 20, |seed| {
        let mut c = cluster(3, seed, NetworkConfig::reliable());
        let mut rng = Rng::new(seed);
        for round in 0..5 {
            let l = c.run_until_leader(5_000).expect("leader");
            // Some commands are acknowledged, some are still in flight when the power goes.
            for i in 0..5 {
                c.propose_and_wait(l, format!("r{round}-{i}").as_str(), 2_000)
                    .expect("commit");
            }
            for i in 0..5 {
                let _ = c.propose(l, format!("r{round}-inflight{i}").as_str());
            }
            c.run_for(rng.range(0, 5));
            for id in c.node_ids() {
                c.crash(id);
            }
            for id in c.node_ids() {
                c.restart(id);
            }
        }
        settle_and_check(&mut c, None);
        assert!(c.acknowledged().len() >= 26);
    });
}

/// The Figure 8 scenario of the Raft paper, as a randomized test: leaders crash at random
/// moments, often right after proposing, so entries of old terms sit on some but not a
/// majority of nodes when new leaders take over.
fn figure8(seed: u64, network: NetworkConfig, iterations: usize) {
    let nodes = 5;
    let mut c = cluster(nodes, seed, network.clone());
    let mut rng = Rng::new(seed ^ 0xF18);
    let mut up = nodes;
    for i in 0..iterations {
        if let Some(l) = c.leader() {
            let _ = c.propose(l, format!("f{i}").as_str());
        }
        let pause = if rng.chance(0.1) {
            rng.range(0, 500)
        } else {
            rng.range(0, 13)
        };
        c.run_for(pause);
        if let Some(l) = c.leader() {
            c.crash(l);
            up -= 1;
        }
        if up < 3 {
            let down: Vec<_> = c.node_ids().into_iter().filter(|&i| !c.is_up(i)).collect();
            let s = down[rng.range(0, down.len() as u64) as usize];
            c.restart(s);
            up += 1;
        }
        if network.drop_rate > 0.0 && rng.chance(0.2) {
            // Unreliable variant: links also come and go.
            let a = rng.range(1, nodes as u64 + 1);
            let b = rng.range(1, nodes as u64 + 1);
            if a != b {
                c.network.cut(a, b);
            }
            if rng.chance(0.3) {
                c.network.heal();
            }
        }
    }
    settle_and_check(&mut c, snapshot_bound(seed));
}

/// Figure 8 with a targeted fault: appends that carry an entry of the sender's own term (a new
/// leader's no-op, say) are lost 70% of the time, so older entries often reach a majority
/// without any entry of the current term — exactly the situation where counting replicas of
/// an earlier-term entry would commit it unsafely.
#[test]
fn figure8_adversarial() {
    for_each_seed("figure8_adversarial", 10, |seed| {
        let nodes = 5;
        let mut cfg = SimConfig::new(nodes, seed);
        // Half the seeds start as hosts do by default: every empty storage a lost disk.
        cfg.distrust_initial_storage = seed.is_multiple_of(2);
        cfg.raft.max_append_entries = 1;
        cfg.raft.max_inflight = 1;
        let mut c = Cluster::new(cfg, Salted::new);
        c.network.set_filter(|m, rng| match &m.body {
            MessageBody::Append { entries, .. } => {
                entries.iter().any(|e| e.term == m.term) && rng.chance(0.7)
            }
            _ => false,
        });
        let mut rng = Rng::new(seed ^ 0xF18);
        let mut up = nodes;
        for i in 0..300 {
            if let Some(l) = c.leader() {
                let _ = c.propose(l, format!("f{i}").as_str());
            }
            c.run_for(if rng.chance(0.1) {
                rng.range(0, 500)
            } else {
                rng.range(0, 13)
            });
            if let Some(l) = c.leader() {
                c.crash(l);
                up -= 1;
            }
            if up < 3 {
                let down: Vec<_> = c.node_ids().into_iter().filter(|&i| !c.is_up(i)).collect();
                c.restart(down[rng.range(0, down.len() as u64) as usize]);
                up += 1;
            }
        }
        settle_and_check(&mut c, None);
    });
}

#[test]
fn figure8_reliable() {
    for_each_seed("figure8_reliable", 10, |seed| {
        figure8(seed, NetworkConfig::reliable(), 300)
    });
}

#[test]
fn figure8_unreliable() {
    for_each_seed("figure8_unreliable", 10, |seed| {
        figure8(seed, NetworkConfig::unreliable(), 300)
    });
}

/// Random crashes, restarts and partitions while clients keep proposing.
fn churn(seed: u64, network: NetworkConfig, rounds: usize) {
    let nodes = 5;
    let mut c = cluster(nodes, seed, network);
    let mut rng = Rng::new(seed ^ 0xC4);
    for round in 0..rounds {
        for k in 0..rng.range(0, 10) {
            if let Some(l) = c.leader() {
                let _ = c.propose(l, format!("c{round}-{k}").as_str());
            }
            c.run_for(rng.range(0, 20));
        }
        let victim = rng.range(1, nodes as u64 + 1);
        match rng.range(0, 10) {
            0..=2 if c.is_up(victim) => c.crash(victim),
            3..=5 if !c.is_up(victim) => c.restart(victim),
            6 => {
                let split = rng.range(1, nodes as u64);
                let ids = c.node_ids();
                let (a, b) = ids.split_at(split as usize);
                c.partition(&[a, b]);
            }
            7 => c.network.heal(),
            _ => {}
        }
        // Keep a majority alive most of the time so that progress is made.
        let down: Vec<_> = c.node_ids().into_iter().filter(|&i| !c.is_up(i)).collect();
        if down.len() > nodes / 2 {
            c.restart(down[0]);
        }
        c.run_for(rng.range(0, 200));
    }
    settle_and_check(&mut c, snapshot_bound(seed));
    assert!(
        !c.acknowledged().is_empty(),
        "churn made no progress at all"
    );
}

#[test]
fn churn_reliable() {
    for_each_seed("churn_reliable", 10, |seed| {
        churn(seed, NetworkConfig::reliable(), 100)
    });
}

#[test]
fn churn_unreliable() {
    for_each_seed("churn_unreliable", 10, |seed| {
        churn(seed, NetworkConfig::unreliable(), 100)
    });
}

/// Seed 21 of `churn_unreliable`, kept as a regression: a node that lost and regained
/// leadership proposed at an index where a proposal of its older term still waited, and the
/// engine replaced the older ticket instead of answering it (its caller saw the node as shut
/// down). The simulation now checks after every engine call that every proposal taken is
/// answered once; this seed broke that check before the fix.
#[test]
fn a_proposal_whose_slot_a_new_leader_reuses_is_answered() {
    churn(21, NetworkConfig::unreliable(), 100);
}

/// Scripted: a leader cut off with proposals it cannot commit is deposed, catches up with the
/// newer leader's log (its uncommitted tail replaced), and is handed the leadership back. Its
/// first proposals then land at indexes where proposals of its old term still wait. Every one
/// of them must be answered once: the old ones `Dropped`, the new ones applied. (The engine
/// used to replace the old ticket, unanswered: the simulation's check after every engine call
/// fails on that.)
#[test]
fn a_re_elected_leader_answers_the_proposals_its_old_term_left_waiting() {
    let mut c = cluster(3, 3, NetworkConfig::reliable());
    let first = c.run_until_leader(5_000).expect("a first leader");
    c.propose_and_wait(first, "before", 2_000)
        .expect("a first commit");
    c.isolate(first);
    for i in 0..6 {
        c.propose(first, format!("lost{i}").as_str())
            .expect("it still believes it leads");
    }
    c.run_for(50);
    let second = c
        .run_until(5_000, |c| c.leader().is_some_and(|l| l != first))
        .then(|| c.leader())
        .flatten()
        .expect("the others elect a leader");
    c.propose_and_wait(second, "second", 2_000)
        .expect("the new leader commits");
    let dropped_before = c.dropped();
    c.reconnect(first);
    let target = c.core(second).expect("up").log().last_index();
    assert!(
        c.run_until(2_000, |c| c.core(first).is_some_and(|f| f
            .log()
            .last_index()
            >= target
            && f.log().term(target)
                == c.core(second).and_then(|s| s.log().term(target)))),
        "the old leader took the newer log"
    );
    c.transfer_leadership(second, first).expect("a transfer");
    assert!(
        c.run_until(2_000, |c| c.leader() == Some(first)),
        "the old leader leads again"
    );
    let reused: Vec<Index> = (0..6)
        .map(|i| {
            c.propose(first, format!("new{i}").as_str())
                .expect("it leads")
                .index
        })
        .collect();
    for i in 0..6 {
        c.propose_and_wait(first, format!("after{i}").as_str(), 2_000)
            .expect("commits go on");
    }
    c.run_for(200);
    let applied: Vec<&Payload> = c.machine(first).commands().iter().map(|(_, p)| p).collect();
    for i in 0..6 {
        let new = Payload::from(format!("new{i}").as_str());
        assert!(
            applied.contains(&&new),
            "new{i} (at {:?}) was not applied",
            reused
        );
        let lost = Payload::from(format!("lost{i}").as_str());
        assert!(!applied.contains(&&lost), "lost{i} was applied");
    }
    assert!(
        c.dropped() >= dropped_before + 6,
        "the old term's 6 proposals were not all answered Dropped ({} then {})",
        dropped_before,
        c.dropped()
    );
}
