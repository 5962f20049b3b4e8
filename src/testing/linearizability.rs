//! Linearizability checker for key/value histories.
//!
//! A *history* is what clients observed while talking to a KV store: for every operation, the
//! client, what it asked for ([`KvInput`]), what it got back ([`KvOutput`]) and when it was
//! invoked and when it returned (logical timestamps). [`check`] decides whether some total order
//! of the operations (a *linearization*) exists that
//!
//! 1. respects real time: if `a` returned before `b` was invoked, `a` comes before `b`, and
//! 2. replayed one by one against a sequential in-memory map starting empty, produces exactly the
//!    outputs the clients saw.
//!
//! # Algorithm
//!
//! Wing & Gong's search with Lowe's memoisation ("Testing for linearizability", 2017), with the
//! history split into independent partitions first, as Porcupine does:
//!
//! * **Partitioning.** Operations on different keys commute, so the history is linearizable iff
//!   each per-key sub-history is. A `Scan(prefix)` touches every key of the history with that
//!   prefix (keys named by any operation, including keys inside scan results); keys touched by one
//!   operation are merged into one partition with union-find. Partitions are checked one by one.
//! * **Search.** Per partition, call and return events are sorted by time into a doubly-linked
//!   list. A depth-first search walks the list: at a call event it tries to linearize that
//!   operation next (apply it to the model, compare outputs) and, on success, *lifts* the call
//!   and its return out of the list and restarts from the head; at a return event, the operation
//!   it belongs to could not be placed, so the search pops the last linearized operation,
//!   *unlifts* it and tries the next candidate. A cache of (set of linearized operations, model
//!   state) pairs already explored prunes the search.
//!
//! # Conventions
//!
//! * **Equal timestamps.** When a return and an invoke carry the same timestamp, the invoke is
//!   ordered first, so the two operations count as concurrent. This is the conservative choice:
//!   it allows more orders, so the checker never reports a violation that hinges on how a clock
//!   broke a tie. The price is that a real violation between two operations whose intervals only
//!   touch is not reported; use strictly increasing timestamps to avoid that.
//! * **Unknown outcome.** An operation with `complete: None` (for example a request that timed
//!   out) may have taken effect at any time after its invoke, or never: its return event sits at
//!   the end of the history and it need not be linearized at all.
//! * **Unknown output.** `output: None` accepts any output. Read-only operations (`Get`, `Scan`)
//!   with unknown output constrain nothing and are dropped before the search.
//! * **Scan results** must list entries in ascending key order, as the model does.
//! * **Transactions** ([`KvInput::Txn`]) touch every key they compare or operate on, so those
//!   keys share a partition; their operations are point operations (no scan, no nested
//!   transaction), applied in order, atomically.
//!
//! # Limits
//!
//! The problem is NP-complete; a partition with many mutually concurrent writes can take
//! exponential time. Each partition gets `max_steps` search steps; when they run out, [`check`]
//! returns [`Verdict::Unknown`] (unless another partition is definitely not linearizable).
//! Scans merge the partitions of the keys they cover, so scan-heavy histories check slower.
//!
//! # Example
//!
//! ```
//! use raftkv::testing::linearizability::{check, KvInput, KvOutput, Operation, Verdict};
//!
//! let op = |client, input, invoke, output, complete| Operation {
//!     client, input, invoke, output: Some(output), complete: Some(complete),
//! };
//! let put = op(1, KvInput::Put(b"k".to_vec(), b"v1".to_vec()), 0, KvOutput::Done, 10);
//! // A read overlapping the put may see the old value (nothing) ...
//! let early_read = op(2, KvInput::Get(b"k".to_vec()), 5, KvOutput::Value(None), 6);
//! // ... but a read that starts after the put returned must see it.
//! let stale_read = Operation { invoke: 11, complete: Some(12), ..early_read.clone() };
//!
//! let ok = check(&[put.clone(), early_read], 100_000).expect("well-formed history");
//! assert_eq!(ok, Verdict::Linearizable);
//! let bad = check(&[put, stale_read], 100_000).expect("well-formed history");
//! assert!(matches!(bad, Verdict::NotLinearizable(_)));
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// A request a client sent to the KV store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvInput {
    /// Read a key. Output: [`KvOutput::Value`].
    Get(Vec<u8>),
    /// Set a key to a value. Output: [`KvOutput::Done`].
    Put(Vec<u8>, Vec<u8>),
    /// Append a suffix to a key's value, creating it if missing. Output: [`KvOutput::Done`].
    Append(Vec<u8>, Vec<u8>),
    /// Remove a key. Output: [`KvOutput::Bool`], whether the key existed.
    Delete(Vec<u8>),
    /// Compare-and-swap: if the key's current value equals `expected` (`None`: absent), set it to
    /// `new` (`None`: delete it). Output: [`KvOutput::Bool`], whether the swap happened.
    Cas {
        /// The key to swap.
        key: Vec<u8>,
        /// The value the key must hold for the swap to happen; `None` means absent.
        expected: Option<Vec<u8>>,
        /// The value to store; `None` deletes the key.
        new: Option<Vec<u8>>,
    },
    /// Read all keys starting with a prefix. Output: [`KvOutput::Entries`], ascending by key.
    Scan(Vec<u8>),
    /// An atomic transaction: if every compare holds, `success` runs, else `failure`.
    /// Output: [`KvOutput::Txn`].
    Txn(TxnInput),
}

/// A transaction of a history (see [`KvInput::Txn`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TxnInput {
    /// The conditions, all of which must hold for `success` to run.
    pub compares: Vec<TxnCompare>,
    /// Point operations (`Get`, `Put`, `Append`, `Delete`, `Cas`) run in order if every
    /// compare holds.
    pub success: Vec<KvInput>,
    /// Point operations run otherwise.
    pub failure: Vec<KvInput>,
}

/// A condition of a transaction: the key's value is (`equal`) or is not (`!equal`) `value`
/// (`None`: absent).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TxnCompare {
    /// The key.
    pub key: Vec<u8>,
    /// The value compared with; `None`: absent.
    pub value: Option<Vec<u8>>,
    /// Whether the value must equal `value` (or differ from it).
    pub equal: bool,
}

/// What the KV store answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvOutput {
    /// Answer to `Get`: the value, or `None` if the key is absent.
    Value(Option<Vec<u8>>),
    /// Answer to `Put` and `Append`.
    Done,
    /// Answer to `Delete` (key existed) and `Cas` (swap happened).
    Bool(bool),
    /// Answer to `Scan`: `(key, value)` pairs in ascending key order.
    Entries(Vec<(Vec<u8>, Vec<u8>)>),
    /// Answer to `Txn`: whether the compares held, and the answers of the branch that ran.
    Txn {
        /// True when `success` ran.
        succeeded: bool,
        /// One answer per operation of that branch.
        results: Vec<KvOutput>,
    },
}

/// One operation of a history, as one client observed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// The client that issued the operation (informational; clients need not be sequential).
    pub client: u64,
    /// The request.
    pub input: KvInput,
    /// Logical time at which the request was sent.
    pub invoke: u64,
    /// The answer; `None` accepts any answer. Use `None` when `complete` is `None` (an answer
    /// given here is still checked).
    pub output: Option<KvOutput>,
    /// Logical time at which the answer arrived, `>= invoke`; `None` if the outcome is unknown:
    /// the operation may then take effect at any time after `invoke`, or never.
    pub complete: Option<u64>,
}

/// The answer of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some real-time-respecting order of the operations explains every output.
    Linearizable,
    /// No such order exists; the counterexample shows the failing partition.
    NotLinearizable(Box<Counterexample>),
    /// The search ran out of steps on the partition over `keys`; no other partition failed.
    Unknown {
        /// The keys of the partition whose search was abandoned.
        keys: Vec<Vec<u8>>,
    },
}

/// A partition of the history that cannot be linearized, with the best attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counterexample {
    /// The keys of the failing partition, ascending.
    pub keys: Vec<Vec<u8>>,
    /// The partition's operations, in history order.
    pub operations: Vec<Operation>,
    /// For each entry of `operations`, its index in the history given to [`check`].
    pub history_indices: Vec<usize>,
    /// The longest linearization the search built, as indices into `operations`.
    pub longest_prefix: Vec<usize>,
    /// The model state (key, value) after replaying `longest_prefix`.
    pub state: Vec<(Vec<u8>, Vec<u8>)>,
    /// Index into `operations` of the first operation (by return time) not in the prefix: it
    /// must be linearized next or earlier, and no way to do that was found.
    pub stuck: usize,
    /// A one-line description of why `stuck` could not be placed.
    pub explanation: String,
}

/// A malformed history (a bug in the test harness rather than in the store). Each variant
/// holds the index of the offending operation in the history. (A plain enum rather than
/// `thiserror`, to keep this module free of dependencies.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryError {
    /// The operation returned before it was invoked.
    ReturnBeforeInvoke(usize),
    /// The operation's output has the wrong kind for its input (e.g. `Get` -> `Bool`).
    OutputKindMismatch(usize),
    /// A transaction holds a `Scan` or another transaction.
    UnsupportedInTxn(usize),
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::ReturnBeforeInvoke(i) => write!(f, "operation {i} returns too early"),
            HistoryError::OutputKindMismatch(i) => write!(f, "operation {i}: wrong output kind"),
            HistoryError::UnsupportedInTxn(i) => {
                write!(
                    f,
                    "operation {i}: a transaction may only hold point operations"
                )
            }
        }
    }
}

impl std::error::Error for HistoryError {}

/// Checks whether `history` is linearizable with respect to a sequential KV map that starts
/// empty.
///
/// `max_steps` bounds the search of each partition (one step visits one event); a partition
/// that needs more yields [`Verdict::Unknown`]. Random linearizable histories from our tests
/// needed 10 to 200 steps per operation; `1_000_000` is a reasonable default. Memory grows
/// with the steps taken (each successful step caches a copy of the model state).
///
/// Returns an error if the history is malformed (see [`HistoryError`]).
pub fn check(history: &[Operation], max_steps: u64) -> Result<Verdict, HistoryError> {
    validate(history)?;
    let mut unknown = None;
    for partition in partitions(history) {
        let ops: Vec<Operation> = partition.ops.iter().map(|&i| history[i].clone()).collect();
        match search(&ops, max_steps) {
            SearchResult::Linearizable => {}
            SearchResult::Exhausted => {
                if unknown.is_none() {
                    unknown = Some(partition.keys);
                }
            }
            SearchResult::Failed { longest_prefix } => {
                let counterexample = explain(partition.keys, ops, partition.ops, longest_prefix);
                return Ok(Verdict::NotLinearizable(Box::new(counterexample)));
            }
        }
    }
    Ok(match unknown {
        Some(keys) => Verdict::Unknown { keys },
        None => Verdict::Linearizable,
    })
}

fn validate(history: &[Operation]) -> Result<(), HistoryError> {
    for (index, op) in history.iter().enumerate() {
        if op.complete.is_some_and(|c| c < op.invoke) {
            return Err(HistoryError::ReturnBeforeInvoke(index));
        }
        if let KvInput::Txn(txn) = &op.input {
            let point = |i: &KvInput| !matches!(i, KvInput::Scan(_) | KvInput::Txn(_));
            if !txn.success.iter().chain(&txn.failure).all(point) {
                return Err(HistoryError::UnsupportedInTxn(index));
            }
        }
        if !output_kind_ok(&op.input, op.output.as_ref()) {
            return Err(HistoryError::OutputKindMismatch(index));
        }
    }
    Ok(())
}

fn output_kind_ok(input: &KvInput, output: Option<&KvOutput>) -> bool {
    match (input, output) {
        (_, None)
        | (KvInput::Get(_), Some(KvOutput::Value(_)))
        | (KvInput::Put(..) | KvInput::Append(..), Some(KvOutput::Done))
        | (KvInput::Delete(_) | KvInput::Cas { .. }, Some(KvOutput::Bool(_)))
        | (KvInput::Scan(_), Some(KvOutput::Entries(_))) => true,
        (KvInput::Txn(txn), Some(KvOutput::Txn { succeeded, results })) => {
            let ops = if *succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            ops.len() == results.len()
                && ops
                    .iter()
                    .zip(results)
                    .all(|(i, o)| output_kind_ok(i, Some(o)))
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The sequential model.

/// The model: a map restricted to one partition's keys.
type State = BTreeMap<Vec<u8>, Vec<u8>>;

/// Applies `input` to `state` and returns the model's output. Reads leave `state` unchanged.
fn apply(state: &mut State, input: &KvInput) -> KvOutput {
    match input {
        KvInput::Get(key) => KvOutput::Value(state.get(key).cloned()),
        KvInput::Put(key, value) => {
            state.insert(key.clone(), value.clone());
            KvOutput::Done
        }
        KvInput::Append(key, suffix) => {
            state
                .entry(key.clone())
                .or_default()
                .extend_from_slice(suffix);
            KvOutput::Done
        }
        KvInput::Delete(key) => KvOutput::Bool(state.remove(key).is_some()),
        KvInput::Cas { key, expected, new } => {
            let swap = state.get(key) == expected.as_ref();
            if swap {
                match new {
                    Some(value) => state.insert(key.clone(), value.clone()),
                    None => state.remove(key),
                };
            }
            KvOutput::Bool(swap)
        }
        KvInput::Scan(prefix) => KvOutput::Entries(
            state
                .range(prefix.clone()..)
                .take_while(|(key, _)| key.starts_with(prefix))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        ),
        KvInput::Txn(txn) => {
            let succeeded = txn
                .compares
                .iter()
                .all(|c| (state.get(&c.key) == c.value.as_ref()) == c.equal);
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let results = ops.iter().map(|op| apply(state, op)).collect();
            KvOutput::Txn { succeeded, results }
        }
    }
}

fn read_only(input: &KvInput) -> bool {
    match input {
        KvInput::Get(_) | KvInput::Scan(_) => true,
        KvInput::Txn(txn) => txn.success.iter().chain(&txn.failure).all(read_only),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Partitioning.

/// A set of keys closed under "touched by the same operation", and the operations on them.
#[derive(Default)]
struct Partition {
    keys: Vec<Vec<u8>>,
    /// Indices into the history, ascending.
    ops: Vec<usize>,
}

/// Splits the history into independent partitions, in a deterministic order.
fn partitions(history: &[Operation]) -> Vec<Partition> {
    // Read-only operations with unknown output fit anywhere and change nothing: drop them.
    let relevant: Vec<usize> = (0..history.len())
        .filter(|&i| !(history[i].output.is_none() && read_only(&history[i].input)))
        .collect();

    // Every key the history names, ascending; a key's id is its position.
    let mut keys: Vec<&[u8]> = Vec::new();
    for &i in &relevant {
        match (&history[i].input, &history[i].output) {
            (KvInput::Scan(_), Some(KvOutput::Entries(entries))) => {
                keys.extend(entries.iter().map(|(key, _)| key.as_slice()));
            }
            (KvInput::Scan(_), _) => {}
            (input, _) => keys.extend(point_keys(input)),
        }
    }
    keys.sort_unstable();
    keys.dedup();

    let mut sets = UnionFind::new(keys.len());
    let mut touched_by_op: Vec<Vec<usize>> = Vec::with_capacity(relevant.len());
    for &i in &relevant {
        let touched: Vec<usize> = match &history[i].input {
            KvInput::Scan(prefix) => {
                let start = keys.partition_point(|key| *key < prefix.as_slice());
                (start..keys.len())
                    .take_while(|&id| keys[id].starts_with(prefix))
                    .collect()
            }
            input => point_keys(input)
                .into_iter()
                .filter_map(|k| keys.binary_search(&k).ok())
                .collect(),
        };
        for pair in touched.windows(2) {
            sets.union(pair[0], pair[1]);
        }
        touched_by_op.push(touched);
    }

    // Group by the root of the first touched key. Operations touching no key (scans over an
    // empty range) form partitions of their own.
    let mut by_root: BTreeMap<usize, Partition> = BTreeMap::new();
    for (id, key) in keys.iter().enumerate() {
        by_root
            .entry(sets.find(id))
            .or_default()
            .keys
            .push(key.to_vec());
    }
    let mut keyless = Vec::new();
    for (&i, touched) in relevant.iter().zip(&touched_by_op) {
        match touched.first() {
            Some(&id) => by_root.entry(sets.find(id)).or_default().ops.push(i),
            None => keyless.push(Partition {
                keys: Vec::new(),
                ops: vec![i],
            }),
        }
    }
    // A key only named in a malformed scan result (outside the scan's prefix) has no operation.
    let keyed = by_root.into_values().filter(|p| !p.ops.is_empty());
    keyed.chain(keyless).collect()
}

/// The keys of a non-scan input: its key, or every key a transaction names.
fn point_keys(input: &KvInput) -> Vec<&[u8]> {
    match input {
        KvInput::Get(key)
        | KvInput::Put(key, _)
        | KvInput::Append(key, _)
        | KvInput::Delete(key)
        | KvInput::Cas { key, .. }
        | KvInput::Scan(key) => vec![key],
        KvInput::Txn(txn) => txn
            .compares
            .iter()
            .map(|c| c.key.as_slice())
            .chain(txn.success.iter().chain(&txn.failure).flat_map(point_keys))
            .collect(),
    }
}

/// Disjoint sets over `0..n` with path halving.
struct UnionFind {
    parent: Vec<usize>,
}

impl UnionFind {
    fn new(n: usize) -> Self {
        UnionFind {
            parent: (0..n).collect(),
        }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        self.parent[b] = a;
    }
}

// ---------------------------------------------------------------------------------------------
// The search.

const NIL: usize = usize::MAX;

/// One call or return event in the doubly-linked event list.
struct Event {
    op: usize,
    is_call: bool,
    /// For a call: its return event, or `NIL` if the outcome is unknown.
    matching_return: usize,
    prev: usize,
    next: usize,
}

/// The event list: node 0 is a head sentinel, the last node a tail sentinel (neither is a
/// call), and the events in between are in time order.
struct EventList {
    nodes: Vec<Event>,
}

impl EventList {
    /// Builds the list. Events are ordered by time, then invokes before returns (see the module
    /// docs), then by operation index so the order is deterministic.
    fn new(ops: &[Operation]) -> Self {
        let mut events: Vec<(u64, bool, usize)> = vec![(0, true, NIL)];
        for (i, op) in ops.iter().enumerate() {
            events.push((op.invoke, false, i));
            if let Some(complete) = op.complete {
                events.push((complete, true, i));
            }
        }
        events[1..].sort_unstable();
        events.push((u64::MAX, true, NIL));
        let mut return_node = vec![NIL; ops.len()];
        let mut nodes = Vec::with_capacity(events.len());
        for (node, &(_, is_return, op)) in events.iter().enumerate() {
            if is_return && op != NIL {
                return_node[op] = node;
            }
            let (prev, next, is_call) = (node.wrapping_sub(1), node + 1, !is_return);
            nodes.push(Event {
                op,
                is_call,
                matching_return: NIL,
                prev,
                next,
            });
        }
        for node in nodes.iter_mut().filter(|n| n.is_call) {
            node.matching_return = return_node[node.op];
        }
        EventList { nodes }
    }

    fn first(&self) -> usize {
        self.nodes[0].next
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.nodes[node].prev, self.nodes[node].next);
        self.nodes[prev].next = next;
        self.nodes[next].prev = prev;
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.nodes[node].prev, self.nodes[node].next);
        self.nodes[prev].next = node;
        self.nodes[next].prev = node;
    }

    /// Removes a call event and its return event. Must be undone by `unlift` in LIFO order.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let ret = self.nodes[call].matching_return;
        if ret != NIL {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, call: usize) {
        let ret = self.nodes[call].matching_return;
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// A fixed-size set of operation indices.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(n: usize) -> Self {
        Bitset(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

enum SearchResult {
    Linearizable,
    Failed { longest_prefix: Vec<usize> },
    Exhausted,
}

/// Wing & Gong / Lowe depth-first search over one partition.
///
/// Invariants: `stack` holds the linearized operations in order, `linearized` is exactly the
/// set of them, and `state` is the model state after replaying them; an operation's call event
/// is in the list iff it is not linearized; every cached (set, state) pair has been reached,
/// and once popped is known to lead nowhere.
///
/// At each search node the candidates are the call events before the first return event,
/// tried in list order. (Trying unknown-outcome operations last instead was measured to be
/// much slower on random histories: the search then explores long wrong branches before
/// placing the write that a read needs.)
fn search(ops: &[Operation], max_steps: u64) -> SearchResult {
    let mut list = EventList::new(ops);
    let pending = |op: usize| ops[op].complete.is_none();
    let completed_total = ops.iter().filter(|op| op.complete.is_some()).count();
    let mut completed_linearized = 0;
    let mut linearized = Bitset::new(ops.len());
    let mut state = State::new();
    let mut cache: HashSet<(Bitset, State)> = HashSet::new();
    // (call event, state before the operation) for each linearized operation, in order.
    let mut stack: Vec<(usize, State)> = Vec::new();
    // The longest stack seen so far (as operation indices), recorded when it is popped.
    // `agree` is the length of the common prefix of `longest_prefix` and the current stack,
    // so recording copies only what changed: amortized O(1) per push.
    let mut longest_prefix: Vec<usize> = Vec::new();
    let mut agree = 0;
    let mut entry = list.first();
    let mut steps: u64 = 0;

    loop {
        // Operations with unknown outcome need not be linearized: once every completed one
        // is, the rest may be placed at the end (any output is accepted) or dropped.
        if completed_linearized == completed_total {
            return SearchResult::Linearizable;
        }
        steps += 1;
        if steps > max_steps {
            return SearchResult::Exhausted;
        }
        if list.nodes[entry].is_call {
            let op_index = list.nodes[entry].op;
            let op = &ops[op_index];
            // Reads are applied to the current state in place; writes to a copy.
            let (output, changed) = if read_only(&op.input) {
                (apply(&mut state, &op.input), None)
            } else {
                let mut next = state.clone();
                (apply(&mut next, &op.input), Some(next))
            };
            if op.output.as_ref().is_none_or(|seen| *seen == output) {
                linearized.set(op_index);
                let key = (linearized.clone(), changed.unwrap_or_else(|| state.clone()));
                if !cache.contains(&key) {
                    let next_state = key.1.clone();
                    cache.insert(key);
                    stack.push((entry, std::mem::replace(&mut state, next_state)));
                    completed_linearized += usize::from(!pending(op_index));
                    list.lift(entry);
                    if agree + 1 == stack.len() && longest_prefix.get(agree) == Some(&op_index) {
                        agree += 1;
                    }
                    entry = list.first();
                    continue;
                }
                linearized.clear(op_index);
            }
            entry = list.nodes[entry].next;
        } else {
            // A return event (or the tail): the operation it closes cannot be
            // linearized after the current prefix, so undo the last choice and try the
            // candidates after it.
            if stack.len() > longest_prefix.len() {
                longest_prefix.truncate(agree);
                longest_prefix.extend(stack[agree..].iter().map(|&(e, _)| list.nodes[e].op));
                agree = stack.len();
            }
            let Some((call, previous_state)) = stack.pop() else {
                return SearchResult::Failed { longest_prefix };
            };
            agree = agree.min(stack.len());
            let op_index = list.nodes[call].op;
            linearized.clear(op_index);
            completed_linearized -= usize::from(!pending(op_index));
            state = previous_state;
            list.unlift(call);
            entry = list.nodes[call].next;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Counterexamples.

fn explain(
    keys: Vec<Vec<u8>>,
    operations: Vec<Operation>,
    history_indices: Vec<usize>,
    longest_prefix: Vec<usize>,
) -> Counterexample {
    let mut state = State::new();
    let mut in_prefix = vec![false; operations.len()];
    for &i in &longest_prefix {
        apply(&mut state, &operations[i].input);
        in_prefix[i] = true;
    }
    // The first completed operation by return time (same tie-break as the event list) that
    // is not in the prefix. One exists, or the search would have succeeded.
    let stuck = (0..operations.len())
        .filter(|&i| !in_prefix[i])
        .filter_map(|i| operations[i].complete.map(|c| (c, i)))
        .min()
        .map_or(0, |(_, i)| i);
    let explanation = match operations.get(stuck) {
        Some(op) => {
            let would = apply(&mut state.clone(), &op.input);
            match &op.output {
                Some(seen) if *seen != would => {
                    format!("in that state it would return {would}, but the client saw {seen}")
                }
                _ => "its output fits that state, but no order of the operations concurrent \
                      with it can follow"
                    .to_string(),
            }
        }
        None => "empty partition".to_string(),
    };
    Counterexample {
        keys,
        operations,
        history_indices,
        longest_prefix,
        state: state.into_iter().collect(),
        stuck,
        explanation,
    }
}

/// At most this many candidate operations are listed by `Counterexample`'s `Display`.
const MAX_LISTED: usize = 40;

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let index = |i: usize| self.history_indices.get(i).copied().unwrap_or(i);
        let keys: Vec<String> = self.keys.iter().map(|k| bytes(k)).collect();
        let prefix: Vec<String> = self
            .longest_prefix
            .iter()
            .map(|&i| format!("#{}", index(i)))
            .collect();
        writeln!(
            f,
            "not linearizable: partition over keys [{}] ({} operations)",
            keys.join(", "),
            self.operations.len()
        )?;
        writeln!(
            f,
            "longest linearizable prefix ({} operations): {}",
            prefix.len(),
            prefix.join(" ")
        )?;
        writeln!(f, "model state after it: {{{}}}", pairs(&self.state))?;
        let Some(stuck) = self.operations.get(self.stuck) else {
            return Ok(());
        };
        writeln!(
            f,
            "cannot place #{} {stuck}\n  {}",
            index(self.stuck),
            self.explanation
        )?;
        // The other candidates: operations not in the prefix invoked before `stuck` returned.
        let deadline = stuck.complete.unwrap_or(u64::MAX);
        let mut placed = vec![false; self.operations.len()];
        for &i in self.longest_prefix.iter().chain([&self.stuck]) {
            placed[i] = true;
        }
        let candidates: Vec<usize> = (0..self.operations.len())
            .filter(|&i| !placed[i])
            .filter(|&i| self.operations[i].invoke <= deadline)
            .collect();
        if !candidates.is_empty() {
            writeln!(f, "other operations that could have come next:")?;
        }
        for &i in candidates.iter().take(MAX_LISTED) {
            writeln!(f, "  #{} {}", index(i), self.operations[i])?;
        }
        if candidates.len() > MAX_LISTED {
            writeln!(f, "  ... and {} more", candidates.len() - MAX_LISTED)?;
        }
        Ok(())
    }
}

/// Renders as `client 2 [3, 5] Get("k") -> Some("v")`; `?` marks an unknown return or output.
impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let complete = self.complete.map_or("?".to_string(), |c| c.to_string());
        write!(
            f,
            "client {} [{}, {complete}] {}",
            self.client, self.invoke, self.input
        )?;
        match &self.output {
            Some(output) => write!(f, " -> {output}"),
            None => write!(f, " -> ?"),
        }
    }
}

/// Renders as `Put("k", "v")`, byte strings escaped like `b"..."` literals.
impl fmt::Display for KvInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvInput::Get(k) => write!(f, "Get({})", bytes(k)),
            KvInput::Put(k, v) => write!(f, "Put({}, {})", bytes(k), bytes(v)),
            KvInput::Append(k, v) => write!(f, "Append({}, {})", bytes(k), bytes(v)),
            KvInput::Delete(k) => write!(f, "Delete({})", bytes(k)),
            KvInput::Cas { key, expected, new } => {
                let (expected, new) = (
                    optional_bytes(expected.as_deref()),
                    optional_bytes(new.as_deref()),
                );
                write!(f, "Cas({}, {expected}, {new})", bytes(key))
            }
            KvInput::Scan(p) => write!(f, "Scan({})", bytes(p)),
            KvInput::Txn(txn) => {
                let compares: Vec<String> = txn
                    .compares
                    .iter()
                    .map(|c| {
                        let op = if c.equal { "==" } else { "!=" };
                        format!(
                            "{} {op} {}",
                            bytes(&c.key),
                            optional_bytes(c.value.as_deref())
                        )
                    })
                    .collect();
                let list = |ops: &[KvInput]| {
                    ops.iter()
                        .map(|o| o.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                write!(
                    f,
                    "Txn(if {} then [{}] else [{}])",
                    compares.join(" && "),
                    list(&txn.success),
                    list(&txn.failure)
                )
            }
        }
    }
}

/// Renders as `Some("v")`, `None`, `Done`, `true` or `["k": "v", ...]`.
impl fmt::Display for KvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvOutput::Value(v) => write!(f, "{}", optional_bytes(v.as_deref())),
            KvOutput::Done => write!(f, "Done"),
            KvOutput::Bool(b) => write!(f, "{b}"),
            KvOutput::Entries(entries) => write!(f, "[{}]", pairs(entries)),
            KvOutput::Txn { succeeded, results } => {
                let shown: Vec<String> = results.iter().map(|r| r.to_string()).collect();
                let branch = if *succeeded { "then" } else { "else" };
                write!(f, "{branch} [{}]", shown.join(", "))
            }
        }
    }
}

/// A byte string as a quoted, escaped ASCII literal.
fn bytes(b: &[u8]) -> String {
    format!("\"{}\"", b.escape_ascii())
}

fn optional_bytes(b: Option<&[u8]>) -> String {
    b.map_or("None".to_string(), |b| format!("Some({})", bytes(b)))
}

/// Key/value pairs as `"k": "v", ...`.
fn pairs(entries: &[(Vec<u8>, Vec<u8>)]) -> String {
    let shown: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}: {}", bytes(k), bytes(v)))
        .collect();
    shown.join(", ")
}
