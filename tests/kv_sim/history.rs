//! Checking a KV history: the linearizability checker, and the watchers' streams against
//! the committed history (see `tests/sim_kv.rs` for what is required).

use std::collections::{BTreeMap, BTreeSet};

use raftkv::kv::{Answer, Change, Compare, KvOp, TxnOp, TxnResponse};
use raftkv::raft::Index;
use raftkv::testing::linearizability::{
    check, KvInput, KvOutput, Operation, TxnCompare, TxnInput, Verdict,
};

/// What a run recorded.
pub struct Record {
    /// Every operation as the clients saw it.
    pub history: Vec<Operation>,
    /// The operation behind each history entry.
    pub ops: Vec<KvOp>,
    /// The revision each completed operation answered.
    pub revisions: Vec<Option<Index>>,
    /// The stream of a watcher of every key the operations touch.
    pub prefix_stream: Vec<Change>,
    /// The stream of a watcher of `watched_key` alone.
    pub key_stream: Vec<Change>,
    /// See `key_stream`.
    pub watched_key: Vec<u8>,
}

// Conversions to the checker's vocabulary.

pub fn to_input(op: &KvOp) -> KvInput {
    match op.clone() {
        KvOp::Get { key } => KvInput::Get(key),
        KvOp::Put { key, value } => KvInput::Put(key, value),
        KvOp::Append { key, value } => KvInput::Append(key, value),
        KvOp::Delete { key } => KvInput::Delete(key),
        KvOp::Cas { key, expected, new } => KvInput::Cas { key, expected, new },
        KvOp::Scan { start, .. } => KvInput::Scan(start),
        KvOp::Txn(txn) => {
            let compares = txn
                .compares
                .iter()
                .map(|c| match c.clone() {
                    Compare::Equal { key, value } => TxnCompare {
                        key,
                        value,
                        equal: true,
                    },
                    Compare::NotEqual { key, value } => TxnCompare {
                        key,
                        value,
                        equal: false,
                    },
                })
                .collect();
            let ops = |ops: &[TxnOp]| -> Vec<KvInput> {
                ops.iter()
                    .map(|op| match op.clone() {
                        TxnOp::Get { key } => KvInput::Get(key),
                        TxnOp::Put { key, value } => KvInput::Put(key, value),
                        TxnOp::Append { key, value } => KvInput::Append(key, value),
                        TxnOp::Delete { key } => KvInput::Delete(key),
                    })
                    .collect()
            };
            KvInput::Txn(TxnInput {
                compares,
                success: ops(&txn.success),
                failure: ops(&txn.failure),
            })
        }
        other => panic!("not in the workload: {other:?}"),
    }
}

pub fn answer_output(a: &Answer) -> KvOutput {
    match a.clone() {
        Answer::Value(v) => KvOutput::Value(v),
        Answer::Done => KvOutput::Done,
        Answer::Flag(f) => KvOutput::Bool(f),
        Answer::Entries(e) => KvOutput::Entries(e),
        Answer::Txn(t) => KvOutput::Txn {
            succeeded: t.succeeded,
            results: t.results.iter().map(answer_output).collect(),
        },
        other => panic!("unexpected answer {other:?}"),
    }
}

pub fn assert_linearizable(seed: u64, history: &[Operation]) {
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
        // Only after `check_revisions` found the revisions to be a valid linearization (see
        // `assert_correct`): the checker's search ran out, the history is still proven.
        Verdict::Unknown { keys } => {
            eprintln!("seed {seed}: the checker gave up on {keys:?}; the revisions linearize it")
        }
    }
    let completed = history.iter().filter(|o| o.complete.is_some()).count();
    assert!(
        completed * 2 >= history.len(),
        "too few operations completed: {completed} of {}",
        history.len()
    );
}

/// The model's map.
pub type State = BTreeMap<Vec<u8>, Vec<u8>>;
/// Changes as `(key, new value or None for deleted)`, in order.
pub type Changes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Runs `op` on `state` as the service should; returns its answer and the changes it makes.
pub fn model(state: &mut State, op: &KvOp) -> (Answer, Changes) {
    let mut changes = Vec::new();
    let answer = model_op(state, op, &mut changes);
    (answer, changes)
}

fn model_op(state: &mut State, op: &KvOp, changes: &mut Changes) -> Answer {
    let mut set = |state: &mut State, k: &Vec<u8>, v: Option<Vec<u8>>| {
        match &v {
            Some(v) => state.insert(k.clone(), v.clone()),
            None => state.remove(k),
        };
        changes.push((k.clone(), v));
    };
    match op {
        KvOp::Get { key } => Answer::Value(state.get(key).cloned()),
        KvOp::Scan { start, end, limit } => Answer::Entries(
            state
                .iter()
                .filter(|(k, _)| k.as_slice() >= start.as_slice())
                .filter(|(k, _)| end.as_ref().is_none_or(|e| k.as_slice() < e.as_slice()))
                .take(*limit as usize)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        KvOp::Put { key, value } => {
            set(state, key, Some(value.clone()));
            Answer::Done
        }
        KvOp::Append { key, value } => {
            let mut v = state.get(key).cloned().unwrap_or_default();
            v.extend_from_slice(value);
            set(state, key, Some(v));
            Answer::Done
        }
        KvOp::Delete { key } => {
            let existed = state.contains_key(key);
            if existed {
                set(state, key, None);
            }
            Answer::Flag(existed)
        }
        KvOp::Cas { key, expected, new } => {
            let swap = state.get(key) == expected.as_ref();
            // Deleting an absent key changes nothing.
            if swap && (new.is_some() || state.contains_key(key)) {
                set(state, key, new.clone());
            }
            Answer::Flag(swap)
        }
        KvOp::Txn(txn) => {
            let succeeded = txn.compares.iter().all(|c| c.holds(state.get(c.key())));
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let results = ops
                .iter()
                .map(|op| {
                    let single = match op.clone() {
                        TxnOp::Get { key } => KvOp::Get { key },
                        TxnOp::Put { key, value } => KvOp::Put { key, value },
                        TxnOp::Append { key, value } => KvOp::Append { key, value },
                        TxnOp::Delete { key } => KvOp::Delete { key },
                    };
                    model_op(state, &single, changes)
                })
                .collect();
            Answer::Txn(TxnResponse { succeeded, results })
        }
        other => panic!("not in the workload: {other:?}"),
    }
}

/// The prefix watcher's stream is exactly the committed history (see the module docs).
pub fn check_revisions(seed: u64, r: &Record) {
    let fail = |why: String| -> ! { panic!("{why} (seed {seed})") };
    // The stream, by revision.
    let mut stream: BTreeMap<Index, Changes> = BTreeMap::new();
    for w in r.prefix_stream.windows(2) {
        if w[0].revision > w[1].revision {
            fail(format!("stream out of order at revision {}", w[1].revision));
        }
    }
    for ch in &r.prefix_stream {
        stream
            .entry(ch.revision)
            .or_default()
            .push((ch.key.clone(), ch.value.clone()));
    }
    // The key watcher saw exactly the prefix stream's changes of its key.
    let of_key: Vec<&Change> = r
        .prefix_stream
        .iter()
        .filter(|c| c.key == r.watched_key)
        .collect();
    let key_stream: Vec<&Change> = r.key_stream.iter().collect();
    if of_key != key_stream {
        fail(format!(
            "the key watcher saw {} changes, the prefix watcher {} of that key",
            key_stream.len(),
            of_key.len()
        ));
    }
    // Completed operations by revision; writes with unknown outcome.
    let mut writes_at: BTreeMap<Index, usize> = BTreeMap::new();
    let mut reads_at: BTreeMap<Index, Vec<usize>> = BTreeMap::new();
    let mut unknown: Vec<usize> = Vec::new();
    for (i, (op, revision)) in r.ops.iter().zip(&r.revisions).enumerate() {
        match (op.is_read(), *revision) {
            (true, Some(rev)) => reads_at.entry(rev).or_default().push(i),
            (true, None) => {}
            (false, Some(rev)) => {
                if let Some(other) = writes_at.insert(rev, i) {
                    fail(format!(
                        "operations {other} and {i} both answered revision {rev}"
                    ));
                }
            }
            (false, None) => unknown.push(i),
        }
    }
    // Revisions respect real time: what completed before an operation was invoked has a
    // revision no higher (a write's strictly lower) than the operation's. `floor(t)`: the
    // highest revision of the operations completed before `t`.
    let mut by_complete: Vec<(u64, Index)> = Vec::new();
    for (i, revision) in r.revisions.iter().enumerate() {
        if let (Some(rev), Some(done)) = (*revision, r.history[i].complete) {
            by_complete.push((done, rev));
        }
    }
    by_complete.sort_unstable();
    let mut max_before = vec![0; by_complete.len() + 1];
    for (j, &(_, rev)) in by_complete.iter().enumerate() {
        max_before[j + 1] = max_before[j].max(rev);
    }
    let floor = |t: u64| max_before[by_complete.partition_point(|&(done, _)| done < t)];
    for (i, revision) in r.revisions.iter().enumerate() {
        let Some(rev) = *revision else { continue };
        let floor = floor(r.history[i].invoke);
        let ok = if r.ops[i].is_read() {
            rev >= floor
        } else {
            rev > floor
        };
        if !ok {
            fail(format!(
                "operation {i} ({}) has revision {rev} but something completed before it has \
                 revision {floor}",
                r.history[i].input
            ));
        }
    }
    // Replay in revision order.
    let revisions: BTreeSet<Index> = stream
        .keys()
        .chain(writes_at.keys())
        .chain(reads_at.keys())
        .copied()
        .collect();
    let mut state = State::new();
    let mut used = vec![false; r.ops.len()];
    for rev in revisions {
        let changes = stream.get(&rev).cloned().unwrap_or_default();
        if let Some(&i) = writes_at.get(&rev) {
            let (answer, made) = model(&mut state, &r.ops[i]);
            if made != changes {
                fail(format!(
                    "revision {rev}: operation {i} ({}) should change {made:?}, the stream has \
                     {changes:?}",
                    r.history[i].input
                ));
            }
            if r.history[i].output.as_ref() != Some(&answer_output(&answer)) {
                fail(format!(
                    "revision {rev}: operation {i} ({}) answered {:?}, in stream order it \
                     answers {answer:?}",
                    r.history[i].input, r.history[i].output
                ));
            }
            used[i] = true;
        } else if !changes.is_empty() {
            // Some write whose outcome is unknown must have made exactly these changes.
            // (Invoked before everything already at a higher revision had completed.)
            let found = unknown.iter().copied().find(|&u| {
                !used[u] && rev > floor(r.history[u].invoke) && {
                    let mut trial = state.clone();
                    model(&mut trial, &r.ops[u]).1 == changes
                }
            });
            let Some(u) = found else {
                fail(format!(
                    "revision {rev}: changes {changes:?} that no write explains"
                ));
            };
            model(&mut state, &r.ops[u]);
            used[u] = true;
        }
        for &i in reads_at.get(&rev).into_iter().flatten() {
            let (answer, _) = model(&mut state.clone(), &r.ops[i]);
            if r.history[i].output.as_ref() != Some(&answer_output(&answer)) {
                fail(format!(
                    "operation {i} ({}) read {:?} at revision {rev}, the stream says {answer:?}",
                    r.history[i].input, r.history[i].output
                ));
            }
        }
    }
}

/// Both checks. `check_revisions` goes first: it is decisive (it either finds the revisions
/// to be a valid linearization — sorted by revision, writes before the reads of their
/// revision, reads by invocation — or fails), while the checker's search may run out of steps
/// on histories with many unknown outcomes; a `Verdict::Unknown` then stands proven by the
/// first check.
pub fn assert_correct(seed: u64, r: &Record) {
    check_revisions(seed, r);
    assert_linearizable(seed, &r.history);
}
