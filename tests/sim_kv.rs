//! The KV service in the simulated cluster under faults, with every history checked for
//! linearizability. Clients number their requests and retry on other nodes after a timeout,
//! so leader changes, lost messages and crashes lead to retries that the sessions must apply
//! exactly once. Reads go through ReadIndex, on leaders and followers alike.
//! `RAFTKV_SEEDS=n` runs more seeds, `RAFTKV_SEED=s` replays one.
//!
//! # How we checked that these tests catch real bugs
//! With `RAFTKV_SEEDS=30 cargo test --release --all-features --test sim_kv`:
//! - *Sessions that do not de-duplicate* (a retried request applied again): both
//!   `repeated_whole_cluster_crashes_*` tests fail with a non-linearizable history (a retried
//!   append shows up twice), and `a_retried_request_across_a_leader_change_is_applied_once`
//!   fails on its first seed.
//! - *Followers acknowledging appends before they are durable*: both
//!   `repeated_whole_cluster_crashes_*` tests fail (seeds 18 and 21 of 50): acknowledged writes
//!   are lost, and the final reads of every key cannot be linearized.
//! - *ReadIndex without the heartbeat round* (a leader answers reads from its commit index
//!   at once): these tests did **not** catch it in 100 seeds, even without check-quorum — the
//!   window in which a cut-off leader still answers while the new one has completed a write
//!   is rarely hit by these clients. `core_read_index::a_cut_off_leader_cannot_confirm_...`
//!   catches it deterministically.

use std::collections::HashMap;

use raftkv::kv::{
    encode_command, encode_query, request, KvCommand, KvOp, KvResult, KvStateMachine,
};
use raftkv::raft::{Index, NodeId, Rng, Term};
use raftkv::testing::linearizability::{check, KvInput, KvOutput, Operation, Verdict};
use raftkv::testing::{for_each_seed, Cluster, NetworkConfig, SimConfig};

type Sim = Cluster<KvStateMachine>;

const KEYS: u64 = 4;
/// Virtual ms a client waits for an answer before retrying elsewhere.
const TIMEOUT_MS: u64 = 600;

enum Attempt {
    Write {
        node: NodeId,
        index: Index,
        term: Term,
        deadline: u64,
    },
    Read {
        ticket: u64,
        deadline: u64,
    },
    /// Waiting to (re)send at `at`.
    Backoff {
        at: u64,
    },
}

struct Pending {
    op: KvOp,
    seq: u64,
    attempt: Attempt,
    history: usize,
}

struct Client {
    id: u64,
    session: Option<u64>,
    seq: u64,
    target: NodeId,
    pending: Option<Pending>,
    registering: Option<(NodeId, Index, Term, u64)>,
    done_ops: usize,
}

struct Workload {
    clients: Vec<Client>,
    history: Vec<Operation>,
    acks: HashMap<(NodeId, Index, Term), KvResult>,
    seen: usize,
    rng: Rng,
    ops_per_client: usize,
    /// Clients with an id below this only read (they keep asking whichever node they know).
    readers: u64,
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i}").into_bytes()
}

fn to_input(op: &KvOp) -> KvInput {
    match op.clone() {
        KvOp::Get { key } => KvInput::Get(key),
        KvOp::Put { key, value } => KvInput::Put(key, value),
        KvOp::Append { key, value } => KvInput::Append(key, value),
        KvOp::Delete { key } => KvInput::Delete(key),
        KvOp::Cas { key, expected, new } => KvInput::Cas { key, expected, new },
        KvOp::Scan { start, .. } => KvInput::Scan(start),
    }
}

fn to_output(r: &KvResult) -> Option<KvOutput> {
    match r.clone() {
        KvResult::Value(v) => Some(KvOutput::Value(v)),
        KvResult::Done => Some(KvOutput::Done),
        KvResult::Flag(f) => Some(KvOutput::Bool(f)),
        KvResult::Entries(e) => Some(KvOutput::Entries(e)),
        other => panic!("unexpected result {other:?}"),
    }
}

impl Workload {
    fn new(clients: u64, nodes: u64, ops_per_client: usize, readers: u64, seed: u64) -> Self {
        let clients = (0..clients)
            .map(|id| Client {
                id,
                session: None,
                seq: 0,
                target: 1 + id % nodes,
                pending: None,
                registering: None,
                done_ops: 0,
            })
            .collect();
        Workload {
            clients,
            history: Vec::new(),
            acks: HashMap::new(),
            seen: 0,
            rng: Rng::new(seed ^ 0xC11E),
            ops_per_client,
            readers,
        }
    }

    fn random_op(&mut self, client: u64, n: usize) -> KvOp {
        let k = key(self.rng.range(0, KEYS));
        let v = format!("c{client}-{n}").into_bytes();
        let pick = if client < self.readers {
            self.rng.range(0, 4)
        } else {
            self.rng.range(0, 10)
        };
        match pick {
            0..=2 => KvOp::Get { key: k },
            3 => KvOp::Scan {
                start: b"k".to_vec(),
                end: Some(b"l".to_vec()),
                limit: 100,
            },
            4 | 5 => KvOp::Put { key: k, value: v },
            6 | 7 => KvOp::Append { key: k, value: v },
            8 => KvOp::Delete { key: k },
            _ => {
                let expected = if self.rng.chance(0.5) {
                    None
                } else {
                    Some(format!("c{}-{}", self.rng.range(0, 4), self.rng.range(0, 5)).into_bytes())
                };
                KvOp::Cas {
                    key: k,
                    expected,
                    new: Some(v),
                }
            }
        }
    }

    fn next_node(c: &Sim, from: NodeId, hint: Option<NodeId>) -> NodeId {
        if let Some(h) = hint {
            return h;
        }
        let n = c.node_ids().len() as u64;
        from % n + 1
    }

    /// One round: every client checks its request and sends the next one.
    fn step(&mut self, c: &mut Sim) {
        let acked = c.acknowledged();
        for a in &acked[self.seen..] {
            self.acks
                .insert((a.node, a.index, a.term), a.output.clone());
        }
        self.seen = acked.len();
        let now = c.now();
        for i in 0..self.clients.len() {
            self.step_client(c, i, now);
        }
    }

    fn step_client(&mut self, c: &mut Sim, i: usize, now: u64) {
        // Open a session first.
        if self.clients[i].session.is_none() {
            let cl = &mut self.clients[i];
            if let Some((node, index, term, deadline)) = cl.registering {
                if let Some(KvResult::Registered(id)) = self.acks.get(&(node, index, term)) {
                    cl.session = Some(*id);
                    cl.registering = None;
                } else if now >= deadline {
                    cl.registering = None;
                    cl.target = Self::next_node(c, cl.target, None);
                }
                return;
            }
            match c.propose(cl.target, encode_command(&KvCommand::Register)) {
                Ok(p) => cl.registering = Some((cl.target, p.index, p.term, now + TIMEOUT_MS)),
                Err(raftkv::error::CoreProposeError::NotLeader { leader }) => {
                    cl.target = Self::next_node(c, cl.target, leader)
                }
                Err(_) => {}
            }
            return;
        }
        // Check the request in flight.
        if let Some(p) = &mut self.clients[i].pending {
            let finished = match p.attempt {
                Attempt::Write {
                    node,
                    index,
                    term,
                    deadline,
                } => match self.acks.get(&(node, index, term)) {
                    Some(r) => Some(Some(r.clone())),
                    None if now >= deadline => {
                        p.attempt = Attempt::Backoff { at: now };
                        let t = self.clients[i].target;
                        self.clients[i].target = Self::next_node(c, t, None);
                        None
                    }
                    None => None,
                },
                Attempt::Read { ticket, deadline } => match c.take_read_result(ticket) {
                    Some(Some(r)) => Some(Some(r)),
                    Some(None) => Some(None),
                    None if now >= deadline => Some(None),
                    None => None,
                },
                Attempt::Backoff { .. } => None,
            };
            if let Some(result) = finished {
                let p = self.clients[i].pending.take().expect("pending");
                // A read that failed stays with an unknown outcome (it had no effect).
                if let Some(r) = result {
                    let op = &mut self.history[p.history];
                    op.output = to_output(&r);
                    op.complete = Some(now);
                }
                self.clients[i].done_ops += 1;
            }
        }
        // Send (or resend) a request.
        let cl_id = self.clients[i].id;
        if self.clients[i].pending.is_none() {
            if self.clients[i].done_ops >= self.ops_per_client {
                return;
            }
            let n = self.clients[i].done_ops;
            let op = self.random_op(cl_id, n);
            let seq = if op.is_read() {
                0
            } else {
                self.clients[i].seq + 1
            };
            if !op.is_read() {
                self.clients[i].seq = seq;
            }
            self.history.push(Operation {
                client: cl_id,
                input: to_input(&op),
                invoke: now,
                output: None,
                complete: None,
            });
            let history = self.history.len() - 1;
            self.clients[i].pending = Some(Pending {
                op,
                seq,
                attempt: Attempt::Backoff { at: now },
                history,
            });
        }
        let cl = &mut self.clients[i];
        let Some(p) = &mut cl.pending else { return };
        let Attempt::Backoff { at } = p.attempt else {
            return;
        };
        if now < at {
            return;
        }
        let session = cl.session.expect("registered");
        if p.op.is_read() {
            // Reads go to any node: followers ask the leader for a read index.
            match c.read(cl.target, encode_query(&p.op)) {
                Ok(ticket) => {
                    p.attempt = Attempt::Read {
                        ticket,
                        deadline: now + TIMEOUT_MS,
                    }
                }
                Err(_) => {
                    cl.target = Self::next_node(c, cl.target, None);
                    p.attempt = Attempt::Backoff { at: now + 10 };
                }
            }
        } else {
            match c.propose(cl.target, request(session, p.seq, p.op.clone())) {
                Ok(pr) => {
                    p.attempt = Attempt::Write {
                        node: cl.target,
                        index: pr.index,
                        term: pr.term,
                        deadline: now + TIMEOUT_MS,
                    }
                }
                Err(raftkv::error::CoreProposeError::NotLeader { leader }) => {
                    cl.target = Self::next_node(c, cl.target, leader);
                    p.attempt = Attempt::Backoff {
                        at: now + if leader.is_some() { 0 } else { 10 },
                    };
                }
                Err(_) => p.attempt = Attempt::Backoff { at: now + 10 },
            }
        }
    }

    fn finished(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.done_ops >= self.ops_per_client && c.pending.is_none())
    }
}

struct Scenario {
    nodes: usize,
    clients: u64,
    ops: usize,
    network: NetworkConfig,
    max_log_bytes: Option<u64>,
    /// Called every `every_ms` of virtual time with the cluster and an RNG: the faults.
    faults: fn(&mut Sim, &mut Rng),
    every_ms: u64,
    /// Check-quorum (and with it the leader lease) on.
    check_quorum: bool,
    /// How many of the clients only read.
    readers: u64,
}

fn no_faults(_: &mut Sim, _: &mut Rng) {}

impl Default for Scenario {
    /// 3 nodes, 4 writing clients, 100 operations each, reliable network, no faults, no
    /// snapshots, check-quorum on.
    fn default() -> Self {
        Scenario {
            nodes: 3,
            clients: 4,
            ops: 100,
            network: NetworkConfig::reliable(),
            max_log_bytes: None,
            faults: no_faults,
            every_ms: 1000,
            check_quorum: true,
            readers: 0,
        }
    }
}

fn run(seed: u64, s: &Scenario) -> (Sim, Vec<Operation>) {
    let mut cfg = SimConfig::new(s.nodes, seed);
    cfg.network = s.network.clone();
    cfg.max_log_bytes = s.max_log_bytes;
    cfg.raft.check_quorum = s.check_quorum;
    cfg.raft.pre_vote = s.check_quorum;
    let mut c: Sim = Cluster::new(cfg, |_| KvStateMachine::default());
    let mut w = Workload::new(s.clients, s.nodes as u64, s.ops, s.readers, seed);
    let mut rng = Rng::new(seed ^ 0xFA17);
    let mut next_fault = s.every_ms;
    let limit = 600_000; // virtual ms
    while !w.finished() {
        assert!(
            c.now() < limit,
            "workload did not finish (seed {seed}); done {:?}",
            w.clients.iter().map(|c| c.done_ops).collect::<Vec<_>>()
        );
        c.run_for(2);
        w.step(&mut c);
        if c.now() >= next_fault {
            (s.faults)(&mut c, &mut rng);
            next_fault = c.now() + s.every_ms;
        }
        // Faults stop halfway through the time budget so the workload can finish.
        if c.now() > limit / 2 {
            c.network.heal();
            for id in c.node_ids() {
                if !c.is_up(id) {
                    c.restart(id);
                }
            }
        }
    }
    // Finally heal everything and read every key: a completed write that was lost would make
    // these reads (which follow it in real time) impossible to linearize.
    c.network.heal();
    for id in c.node_ids() {
        if !c.is_up(id) {
            c.restart(id);
        }
    }
    let mut history = w.history;
    for k in 0..KEYS {
        let op = KvOp::Get { key: key(k) };
        let invoke = c.now();
        let mut answer = None;
        for _ in 0..20 {
            let Some(l) = c.run_until_leader(5_000) else {
                continue;
            };
            let Ok(ticket) = c.read(l, encode_query(&op)) else {
                continue;
            };
            if c.run_until(2_000, |c| c.read_done(ticket)) {
                if let Some(Some(r)) = c.take_read_result(ticket) {
                    answer = Some(r);
                    break;
                }
            }
        }
        let answer =
            answer.unwrap_or_else(|| panic!("final read of key {k} never answered (seed {seed})"));
        history.push(Operation {
            client: u64::MAX,
            input: to_input(&op),
            invoke,
            output: to_output(&answer),
            complete: Some(c.now()),
        });
    }
    (c, history)
}

fn assert_linearizable(seed: u64, history: &[Operation]) {
    if std::env::var_os("RAFTKV_KV_STATS").is_some() {
        let done = history.iter().filter(|o| o.complete.is_some()).count();
        eprintln!(
            "seed {seed}: {} operations, {done} completed",
            history.len()
        );
    }
    match check(history, 2_000_000).expect("well-formed history") {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable(ce) => panic!("not linearizable (seed {seed}):\n{ce}"),
        Verdict::Unknown { keys } => panic!("checker gave up on {keys:?} (seed {seed})"),
    }
    let completed = history.iter().filter(|o| o.complete.is_some()).count();
    assert!(
        completed * 2 >= history.len(),
        "too few operations completed: {completed} of {}",
        history.len()
    );
}

#[test]
fn one_client_reliable_network() {
    for_each_seed("kv_one_client", 10, |seed| {
        let s = Scenario {
            clients: 1,
            ops: 60,
            ..Scenario::default()
        };
        let (_, h) = run(seed, &s);
        assert!(
            h.iter().all(|o| o.complete.is_some()),
            "a fault-free run left operations unanswered"
        );
        assert_linearizable(seed, &h);
    });
}

#[test]
fn many_clients_unreliable_network() {
    for_each_seed("kv_many_clients_unreliable", 10, |seed| {
        let s = Scenario {
            nodes: 5,
            clients: 6,
            ops: 80,
            network: NetworkConfig::unreliable(),
            ..Scenario::default()
        };
        let (_, h) = run(seed, &s);
        assert_linearizable(seed, &h);
    });
}

fn move_the_leader(c: &mut Sim, rng: &mut Rng) {
    if let Some(l) = c.leader() {
        let others: Vec<NodeId> = c.node_ids().into_iter().filter(|&i| i != l).collect();
        let partner = others[rng.range(0, others.len() as u64) as usize];
        let rest: Vec<NodeId> = others.into_iter().filter(|&i| i != partner).collect();
        // The old leader keeps one node: a minority. The rest elect a new leader.
        c.partition(&[&[l, partner], &rest]);
    } else {
        c.network.heal();
    }
}

/// Without check-quorum a cut-off leader believes it leads until it hears a higher term, so
/// it keeps receiving reads while another leader commits writes: only ReadIndex's heartbeat
/// round keeps those reads from returning stale values.
#[test]
fn partitions_that_move_the_leader_without_check_quorum() {
    for_each_seed("kv_moving_leader_no_lease", 10, |seed| {
        let s = Scenario {
            nodes: 5,
            ops: 400,
            faults: move_the_leader,
            every_ms: 800,
            check_quorum: false,
            readers: 1,
            ..Scenario::default()
        };
        let (c, h) = run(seed, &s);
        assert!(c.checker().leaders().len() >= 3, "the leader did not move");
        assert_linearizable(seed, &h);
    });
}

#[test]
fn partitions_that_move_the_leader() {
    for_each_seed("kv_moving_leader", 10, |seed| {
        let s = Scenario {
            nodes: 5,
            ops: 150,
            faults: move_the_leader,
            every_ms: 250,
            ..Scenario::default()
        };
        let (c, h) = run(seed, &s);
        assert!(c.checker().leaders().len() >= 3, "the leader did not move");
        assert_linearizable(seed, &h);
    });
}

fn crash_everyone(c: &mut Sim, _: &mut Rng) {
    for id in c.node_ids() {
        c.crash(id);
    }
    for id in c.node_ids() {
        c.restart(id);
    }
}

#[test]
fn repeated_whole_cluster_crashes_without_snapshots() {
    for_each_seed("kv_total_failure", 8, |seed| {
        let s = Scenario {
            faults: crash_everyone,
            every_ms: 300,
            ..Scenario::default()
        };
        let (_, h) = run(seed, &s);
        assert_linearizable(seed, &h);
    });
}

#[test]
fn repeated_whole_cluster_crashes_with_snapshots() {
    for_each_seed("kv_total_failure_snapshots", 8, |seed| {
        let s = Scenario {
            max_log_bytes: Some(2_000),
            faults: crash_everyone,
            every_ms: 300,
            ..Scenario::default()
        };
        let (c, h) = run(seed, &s);
        let taken: u64 = c.node_ids().iter().map(|&i| c.snapshots_taken(i)).sum();
        assert!(taken >= 1, "snapshots enabled but none taken");
        assert_linearizable(seed, &h);
    });
}

fn isolate_a_follower_for_a_while(c: &mut Sim, rng: &mut Rng) {
    // Every other call heals; the others cut a random follower off, long enough for the
    // leader to compact past it.
    let cut = (1..=3).any(|a| (1..=3).any(|b| a != b && !c.network.connected(a, b)));
    c.network.heal();
    if cut {
        return;
    }
    if let Some(l) = c.leader() {
        let others: Vec<NodeId> = c.node_ids().into_iter().filter(|&i| i != l).collect();
        c.isolate(others[rng.range(0, others.len() as u64) as usize]);
    }
}

#[test]
fn lagging_followers_catch_up_by_snapshot() {
    for_each_seed("kv_lagging_snapshot", 8, |seed| {
        let s = Scenario {
            ops: 150,
            max_log_bytes: Some(1_500),
            faults: isolate_a_follower_for_a_while,
            every_ms: 300,
            ..Scenario::default()
        };
        let (c, h) = run(seed, &s);
        let installed: u64 = c.node_ids().iter().map(|&i| c.snapshots_installed(i)).sum();
        assert!(installed >= 1, "no follower caught up by snapshot");
        assert_linearizable(seed, &h);
    });
}

/// A client sends a numbered append to a leader, loses touch with it (the entry may or may
/// not have committed), and retries the very same request on the next leader: the append is
/// applied exactly once either way.
#[test]
fn a_retried_request_across_a_leader_change_is_applied_once() {
    for_each_seed("kv_retry_across_leaders", 30, |seed| {
        let mut c: Sim = Cluster::new(SimConfig::new(5, seed), |_| KvStateMachine::default());
        let mut rng = Rng::new(seed);
        let l1 = c.run_until_leader(5_000).expect("leader");
        let session = match c.propose_and_wait(l1, encode_command(&KvCommand::Register), 2_000) {
            Some((_, KvResult::Registered(id))) => id,
            other => panic!("{other:?}"),
        };
        let append = request(
            session,
            1,
            KvOp::Append {
                key: b"k".to_vec(),
                value: b"x".to_vec(),
            },
        );
        c.propose(l1, append.clone()).expect("leader takes it");
        // Cut the leader off after a random short while: sometimes the entry committed first.
        c.run_for(rng.range(0, 6));
        c.isolate(l1);
        let l2 = c
            .run_until(5_000, |c| c.stable_leader().is_some_and(|l| l != l1))
            .then(|| c.stable_leader().unwrap())
            .expect("a new leader");
        let (_, answer) = c
            .propose_and_wait(l2, append, 3_000)
            .expect("the retry commits");
        assert_eq!(answer, KvResult::Done);
        c.reconnect(l1);
        c.run_for(500);
        let ticket = c
            .read(l2, encode_query(&KvOp::Get { key: b"k".to_vec() }))
            .unwrap();
        assert!(
            c.run_until(2_000, |c| c.read_done(ticket)),
            "the read was not answered"
        );
        assert_eq!(
            c.take_read_result(ticket),
            Some(Some(KvResult::Value(Some(b"x".to_vec())))),
            "applied twice or lost"
        );
    });
}

fn hand_over_leadership(c: &mut Sim, rng: &mut Rng) {
    if let Some(l) = c.stable_leader() {
        let others: Vec<NodeId> = c.node_ids().into_iter().filter(|&i| i != l).collect();
        let to = others[rng.range(0, others.len() as u64) as usize];
        let _ = c.transfer_leadership(l, to);
    }
}

#[test]
fn leadership_handed_over_while_clients_run() {
    for_each_seed("kv_leader_transfer", 10, |seed| {
        let s = Scenario {
            nodes: 3,
            ops: 150,
            faults: hand_over_leadership,
            every_ms: 100,
            ..Scenario::default()
        };
        let (c, h) = run(seed, &s);
        assert!(c.checker().leaders().len() >= 3, "leadership did not move");
        assert_linearizable(seed, &h);
    });
}
