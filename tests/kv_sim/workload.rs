//! The simulated clients of `tests/sim_kv.rs`: writers with lazily opened, idempotently
//! registered sessions that retry the same request after a timeout, readers, and watchers.

use std::collections::HashMap;

use raftkv::kv::{
    encode_command, encode_query, request, Answer, Change, Compare, Keys, KvCommand, KvError, KvOp,
    KvResult, Txn, TxnOp,
};
use raftkv::raft::{Index, NodeId, Rng, Term};
use raftkv::testing::linearizability::Operation;

use super::history::{answer_output, to_input};
use super::{key, Sim, KEYS, TIMEOUT_MS};

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
    /// `(session, seq)` once the write is numbered.
    numbered: Option<(u64, u64)>,
    /// An attempt may have been applied.
    unknown: bool,
    attempt: Attempt,
    history: usize,
}

struct Client {
    id: u64,
    nonce: u128,
    session: Option<u64>,
    seq: u64,
    target: NodeId,
    pending: Option<Pending>,
    /// A registration in flight: node, index, term, deadline.
    registering: Option<(NodeId, Index, Term, u64)>,
    done_ops: usize,
}

/// Clients running random operations, recording what they see.
pub struct Workload {
    clients: Vec<Client>,
    /// Every operation as the clients saw it.
    pub history: Vec<Operation>,
    /// The operation behind each history entry.
    pub ops: Vec<KvOp>,
    /// The revision each completed operation answered.
    pub revisions: Vec<Option<Index>>,
    acks: HashMap<(NodeId, Index, Term), KvResult>,
    seen: usize,
    rng: Rng,
    ops_per_client: usize,
    /// Clients with an id below this only read (they keep asking whichever node they know).
    readers: u64,
    txns: bool,
    /// Registrations answered.
    pub registrations: u64,
    /// Definite SessionExpired answers (the session re-opened and the write re-sent).
    pub reopened: u64,
    /// Unknown outcomes caused by a session that expired after an unanswered attempt.
    pub expired_unknown: u64,
}

/// What the workload looks like.
pub struct Mix {
    /// Clients.
    pub clients: u64,
    /// Nodes (clients start on node `1 + id % nodes`).
    pub nodes: u64,
    /// Operations per client.
    pub ops: usize,
    /// Clients with an id below this only read.
    pub readers: u64,
    /// Transactions in the mix.
    pub txns: bool,
}

impl Workload {
    /// The clients of `mix`, their choices drawn from `seed`.
    pub fn new(s: &Mix, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0xC11E);
        let clients = (0..s.clients)
            .map(|id| Client {
                id,
                nonce: u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
                session: None,
                seq: 0,
                target: 1 + id % s.nodes,
                pending: None,
                registering: None,
                done_ops: 0,
            })
            .collect();
        Workload {
            clients,
            history: Vec::new(),
            ops: Vec::new(),
            revisions: Vec::new(),
            acks: HashMap::new(),
            seen: 0,
            rng,
            ops_per_client: s.ops,
            readers: s.readers,
            txns: s.txns,
            registrations: 0,
            reopened: 0,
            expired_unknown: 0,
        }
    }

    fn value(client: u64, n: usize, part: &str) -> Vec<u8> {
        format!("c{client}-{n}{part}").into_bytes()
    }

    fn random_op(&mut self, client: u64, n: usize) -> KvOp {
        let k = key(self.rng.range(0, KEYS));
        let v = Self::value(client, n, "");
        let pick = if client < self.readers {
            self.rng.range(0, 4)
        } else {
            self.rng.range(0, if self.txns { 12 } else { 10 })
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
            9 => {
                let expected = if self.rng.chance(0.5) {
                    None
                } else {
                    Some(self.some_value())
                };
                KvOp::Cas {
                    key: k,
                    expected,
                    new: Some(v),
                }
            }
            _ => KvOp::Txn(self.random_txn(client, n)),
        }
    }

    fn some_value(&mut self) -> Vec<u8> {
        format!("c{}-{}", self.rng.range(0, 4), self.rng.range(0, 5)).into_bytes()
    }

    /// A transaction on two keys: a compare on the first, writes to both, reads otherwise.
    fn random_txn(&mut self, client: u64, n: usize) -> Txn {
        let a = self.rng.range(0, KEYS);
        let other = (a + 1 + self.rng.range(0, KEYS - 1)) % KEYS;
        let (ka, kb) = (key(a), key(other));
        let compare = match self.rng.range(0, 3) {
            0 => Compare::absent(ka.clone()),
            1 => Compare::present(ka.clone()),
            _ => Compare::value(ka.clone(), self.some_value()),
        };
        let write_b = if self.rng.chance(0.3) {
            TxnOp::delete(kb.clone())
        } else {
            TxnOp::append(kb.clone(), Self::value(client, n, "b"))
        };
        Txn::when([compare])
            .then([
                TxnOp::put(ka.clone(), Self::value(client, n, "a")),
                write_b,
                TxnOp::get(kb.clone()),
            ])
            .otherwise([TxnOp::get(ka), TxnOp::get(kb)])
    }

    fn next_node(c: &Sim, from: NodeId, hint: Option<NodeId>) -> NodeId {
        if let Some(h) = hint {
            return h;
        }
        let n = c.node_ids().len() as u64;
        from % n + 1
    }

    /// One round: every client checks its request and sends the next one.
    pub fn step(&mut self, c: &mut Sim) {
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

    fn complete(&mut self, history: usize, answer: &Answer, revision: Index, now: u64) {
        let op = &mut self.history[history];
        op.output = Some(answer_output(answer));
        op.complete = Some(now);
        self.revisions[history] = Some(revision);
    }

    /// Opens the client's session (idempotently: every attempt carries the same nonce).
    /// Returns true once it is open.
    fn open_session(&mut self, c: &mut Sim, i: usize, now: u64) -> bool {
        let cl = &mut self.clients[i];
        if cl.session.is_some() {
            return true;
        }
        if let Some((node, index, term, deadline)) = cl.registering {
            match self.acks.get(&(node, index, term)) {
                Some(KvResult::Registered(id)) => {
                    cl.session = Some(*id);
                    cl.seq = 0;
                    cl.registering = None;
                    self.registrations += 1;
                    return true;
                }
                Some(other) => panic!("register answered {other:?}"),
                None if now >= deadline => {
                    cl.registering = None;
                    cl.target = Self::next_node(c, cl.target, None);
                }
                None => {}
            }
            return false;
        }
        let register = encode_command(&KvCommand::Register { nonce: cl.nonce });
        match c.propose(cl.target, register) {
            Ok(p) => cl.registering = Some((cl.target, p.index, p.term, now + TIMEOUT_MS)),
            Err(raftkv::error::CoreProposeError::NotLeader { leader }) => {
                cl.target = Self::next_node(c, cl.target, leader)
            }
            Err(_) => {}
        }
        false
    }

    /// The session ended: forget it, and register the next one with a new nonce.
    fn session_lost(&mut self, i: usize) {
        let cl = &mut self.clients[i];
        cl.session = None;
        cl.registering = None;
        cl.nonce = u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64());
    }

    fn step_client(&mut self, c: &mut Sim, i: usize, now: u64) {
        self.check_in_flight(c, i, now);
        let cl_id = self.clients[i].id;
        if self.clients[i].pending.is_none() {
            if self.clients[i].done_ops >= self.ops_per_client {
                return;
            }
            let n = self.clients[i].done_ops;
            let op = self.random_op(cl_id, n);
            self.history.push(Operation {
                client: cl_id,
                input: to_input(&op),
                invoke: now,
                output: None,
                complete: None,
            });
            self.ops.push(op.clone());
            self.revisions.push(None);
            let history = self.history.len() - 1;
            self.clients[i].pending = Some(Pending {
                op,
                numbered: None,
                unknown: false,
                attempt: Attempt::Backoff { at: now },
                history,
            });
        }
        let is_write = self.clients[i]
            .pending
            .as_ref()
            .is_some_and(|p| !p.op.is_read() && p.numbered.is_none());
        if is_write {
            if !self.open_session(c, i, now) {
                return;
            }
            let cl = &mut self.clients[i];
            cl.seq += 1;
            let numbered = (cl.session.expect("open"), cl.seq);
            if let Some(p) = &mut cl.pending {
                p.numbered = Some(numbered);
            }
        }
        self.send(c, i, now);
    }

    /// Checks the request in flight; finishes it when it has an answer.
    fn check_in_flight(&mut self, c: &mut Sim, i: usize, now: u64) {
        let cl = &mut self.clients[i];
        let Some(p) = &mut cl.pending else {
            return;
        };
        let answer = match p.attempt {
            Attempt::Write {
                node,
                index,
                term,
                deadline,
            } => match self.acks.get(&(node, index, term)) {
                Some(r) => Some(Some(r.clone())),
                None if now >= deadline => {
                    // No answer: the attempt may have been applied. Retry the same request.
                    p.unknown = true;
                    p.attempt = Attempt::Backoff { at: now };
                    cl.target = Self::next_node(c, cl.target, None);
                    None
                }
                None => None,
            },
            Attempt::Read { ticket, deadline } => match c.take_read_result(ticket) {
                Some(answer) => Some(answer),
                None if now >= deadline => Some(None),
                None => None,
            },
            Attempt::Backoff { .. } => None,
        };
        let Some(answer) = answer else {
            return;
        };
        let history = p.history;
        let unknown = p.unknown;
        match answer {
            Some(KvResult::Ok { revision, answer }) => {
                self.complete(history, &answer, revision, now);
            }
            Some(KvResult::Error(KvError::SessionExpired { .. })) if !unknown => {
                // Definite: this attempt was not applied, and none before it. Re-open the
                // session and send the write there.
                self.session_lost(i);
                self.reopened += 1;
                if let Some(p) = &mut self.clients[i].pending {
                    p.numbered = None;
                    p.attempt = Attempt::Backoff { at: now };
                }
                return;
            }
            Some(KvResult::Error(KvError::SessionExpired { .. })) => {
                // An earlier attempt may have been applied: the outcome stays unknown.
                self.session_lost(i);
                self.expired_unknown += 1;
            }
            Some(other) => panic!("client {} got {other:?}", self.clients[i].id),
            // A read that failed stays with an unknown outcome (it had no effect).
            None => {}
        }
        self.clients[i].pending = None;
        self.clients[i].done_ops += 1;
    }

    fn send(&mut self, c: &mut Sim, i: usize, now: u64) {
        let cl = &mut self.clients[i];
        let Some(p) = &mut cl.pending else { return };
        let Attempt::Backoff { at } = p.attempt else {
            return;
        };
        if now < at {
            return;
        }
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
            return;
        }
        let (session, seq) = p.numbered.expect("numbered before it is sent");
        match c.propose(cl.target, request(session, seq, p.op.clone())) {
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

    /// Operations done, per client.
    pub fn progress(&self) -> Vec<usize> {
        self.clients.iter().map(|c| c.done_ops).collect()
    }

    /// Every client did all its operations.
    pub fn finished(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.done_ops >= self.ops_per_client && c.pending.is_none())
    }
}

// The watchers.

/// A watcher polling the change history on rotating nodes.
pub struct Watcher {
    keys: Keys,
    /// The next revision wanted.
    pub from: Index,
    target: NodeId,
    in_flight: Option<(u64, u64)>,
    poll_at: u64,
    /// Every change received, in order.
    pub stream: Vec<Change>,
}

impl Watcher {
    /// A watcher of `keys` from revision 1, asking `target` first.
    pub fn new(keys: Keys, target: NodeId) -> Self {
        Watcher {
            keys,
            from: 1,
            target,
            in_flight: None,
            poll_at: 0,
            stream: Vec::new(),
        }
    }

    /// Polls the change history (a few changes at a time, so that answers are often cut at
    /// the limit); rotates through the nodes on failures and now and then anyway.
    pub fn step(&mut self, c: &mut Sim, rng: &mut Rng) {
        let now = c.now();
        if let Some((ticket, deadline)) = self.in_flight {
            match c.take_read_result(ticket) {
                Some(Some(KvResult::Ok {
                    answer: Answer::Changes(batch),
                    ..
                })) => {
                    self.in_flight = None;
                    assert!(
                        batch.changes.iter().all(|ch| ch.revision >= self.from),
                        "changes before the revision asked for"
                    );
                    assert!(batch.through + 1 >= self.from, "went backwards");
                    self.from = batch.through + 1;
                    let empty = batch.changes.is_empty();
                    self.stream.extend(batch.changes);
                    self.poll_at = now + if empty { 20 } else { 0 };
                    if rng.chance(0.2) {
                        self.target = self.target % c.node_ids().len() as u64 + 1;
                    }
                }
                Some(Some(other)) => panic!("watch poll answered {other:?}"),
                Some(None) => self.failed(c, now),
                None if now >= deadline => self.failed(c, now),
                None => {}
            }
            return;
        }
        if now < self.poll_at {
            return;
        }
        let query = encode_query(&KvOp::Changes {
            keys: self.keys.clone(),
            from: self.from,
            limit: 3,
        });
        match c.read(self.target, query) {
            Ok(ticket) => self.in_flight = Some((ticket, now + TIMEOUT_MS)),
            Err(_) => self.failed(c, now),
        }
    }

    fn failed(&mut self, c: &Sim, now: u64) {
        self.in_flight = None;
        self.target = self.target % c.node_ids().len() as u64 + 1;
        self.poll_at = now + 10;
    }
}
