//! Tests for the linearizability checker: hand-made stories first, then randomized histories
//! produced by a simulated sequential KV store.

use std::collections::BTreeMap;
use std::time::Instant;

use raftkv::testing::linearizability::{
    check, Counterexample, HistoryError, KvInput, KvOutput, Operation, Verdict,
};

const STEPS: u64 = 1_000_000;

// ----------------------------------------------------------------------------------------------
// Building histories.

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn get(k: &str) -> KvInput {
    KvInput::Get(b(k))
}
fn put(k: &str, v: &str) -> KvInput {
    KvInput::Put(b(k), b(v))
}
fn append(k: &str, v: &str) -> KvInput {
    KvInput::Append(b(k), b(v))
}
fn delete(k: &str) -> KvInput {
    KvInput::Delete(b(k))
}
fn cas(k: &str, expected: Option<&str>, new: Option<&str>) -> KvInput {
    KvInput::Cas {
        key: b(k),
        expected: expected.map(b),
        new: new.map(b),
    }
}
fn scan(prefix: &str) -> KvInput {
    KvInput::Scan(b(prefix))
}

fn value(v: Option<&str>) -> KvOutput {
    KvOutput::Value(v.map(b))
}
fn entries(pairs: &[(&str, &str)]) -> KvOutput {
    KvOutput::Entries(pairs.iter().map(|(k, v)| (b(k), b(v))).collect())
}
const DONE: KvOutput = KvOutput::Done;
const TRUE: KvOutput = KvOutput::Bool(true);
const FALSE: KvOutput = KvOutput::Bool(false);

/// A completed operation by `client` over `[invoke, complete]`.
fn op(client: u64, (invoke, complete): (u64, u64), input: KvInput, output: KvOutput) -> Operation {
    Operation {
        client,
        input,
        invoke,
        output: Some(output),
        complete: Some(complete),
    }
}

/// An operation whose outcome the client never learned.
fn timed_out(client: u64, invoke: u64, input: KvInput) -> Operation {
    Operation {
        client,
        input,
        invoke,
        output: None,
        complete: None,
    }
}

fn assert_linearizable(history: &[Operation]) {
    match check(history, STEPS) {
        Ok(Verdict::Linearizable) => {}
        other => panic!("expected Linearizable, got {other:?}"),
    }
}

/// Asserts the history is not linearizable and that the counterexample's text names `culprit`.
fn assert_violation(history: &[Operation], culprit: &str) -> Counterexample {
    match check(history, STEPS) {
        Ok(Verdict::NotLinearizable(counterexample)) => {
            let text = counterexample.to_string();
            assert!(
                text.contains(culprit),
                "counterexample should mention {culprit}:\n{text}"
            );
            *counterexample
        }
        other => panic!("expected NotLinearizable, got {other:?}"),
    }
}

// ----------------------------------------------------------------------------------------------
// Linearizable stories.

#[test]
fn empty_history_is_linearizable() {
    assert_linearizable(&[]);
}

#[test]
fn sequential_history_of_every_operation_kind_is_linearizable() {
    assert_linearizable(&[
        op(1, (0, 1), get("k"), value(None)),
        op(1, (2, 3), put("k", "a"), DONE),
        op(1, (4, 5), append("k", "b"), DONE),
        op(1, (6, 7), get("k"), value(Some("ab"))),
        op(1, (8, 9), cas("k", Some("ab"), Some("c")), TRUE),
        op(1, (10, 11), delete("k"), TRUE),
        op(1, (12, 13), delete("k"), FALSE),
        op(1, (14, 15), append("k", "x"), DONE),
        op(1, (16, 17), scan(""), entries(&[("k", "x")])),
    ]);
}

#[test]
fn overlapping_puts_may_take_effect_in_either_order() {
    // Both puts overlap; the later read decides which one was linearized last.
    for last in ["a", "b"] {
        assert_linearizable(&[
            op(1, (0, 10), put("k", "a"), DONE),
            op(2, (2, 8), put("k", "b"), DONE),
            op(3, (11, 12), get("k"), value(Some(last))),
            op(3, (13, 14), get("k"), value(Some(last))),
        ]);
    }
}

#[test]
fn read_overlapping_a_write_may_see_old_or_new_value() {
    for seen in [Some("old"), Some("new")] {
        assert_linearizable(&[
            op(1, (0, 1), put("k", "old"), DONE),
            op(1, (2, 10), put("k", "new"), DONE),
            op(2, (3, 5), get("k"), value(seen)),
            op(2, (11, 12), get("k"), value(Some("new"))),
        ]);
    }
}

#[test]
fn unknown_outcome_put_seen_by_a_later_read() {
    // The put timed out, but took effect long after its client gave up on it.
    assert_linearizable(&[
        op(1, (0, 1), put("k", "a"), DONE),
        timed_out(1, 2, put("k", "b")),
        op(1, (20, 21), get("k"), value(Some("a"))),
        op(2, (30, 31), get("k"), value(Some("b"))),
    ]);
}

#[test]
fn unknown_outcome_put_that_never_takes_effect() {
    assert_linearizable(&[
        op(1, (0, 1), put("k", "a"), DONE),
        timed_out(1, 2, put("k", "b")),
        timed_out(1, 3, delete("k")),
        op(2, (30, 31), get("k"), value(Some("a"))),
        op(2, (32, 33), append("k", "c"), DONE),
        op(2, (34, 35), get("k"), value(Some("ac"))),
    ]);
}

#[test]
fn cas_successes_and_failures() {
    assert_linearizable(&[
        op(1, (0, 1), cas("k", None, Some("1")), TRUE),
        // Two concurrent CAS on the same expected value: exactly one wins.
        op(1, (2, 6), cas("k", Some("1"), Some("2")), FALSE),
        op(2, (3, 5), cas("k", Some("1"), Some("3")), TRUE),
        op(3, (7, 8), get("k"), value(Some("3"))),
        op(3, (9, 10), cas("k", Some("3"), None), TRUE),
        op(3, (11, 12), cas("k", Some("3"), Some("4")), FALSE),
        op(3, (13, 14), get("k"), value(None)),
    ]);
}

#[test]
fn concurrent_appends_in_either_order() {
    for seen in ["xab", "xba"] {
        assert_linearizable(&[
            op(1, (0, 1), put("k", "x"), DONE),
            op(1, (2, 6), append("k", "a"), DONE),
            op(2, (3, 7), append("k", "b"), DONE),
            op(3, (4, 5), get("k"), value(Some("x"))),
            op(3, (8, 9), get("k"), value(Some(seen))),
        ]);
    }
}

#[test]
fn scans_consistent_with_puts() {
    assert_linearizable(&[
        op(1, (0, 1), put("user/1", "ann"), DONE),
        op(2, (0, 1), put("other", "x"), DONE),
        op(1, (2, 10), put("user/2", "bob"), DONE),
        // Concurrent with the second put: may or may not include it.
        op(3, (3, 4), scan("user/"), entries(&[("user/1", "ann")])),
        op(
            3,
            (5, 6),
            scan("user/"),
            entries(&[("user/1", "ann"), ("user/2", "bob")]),
        ),
        op(2, (11, 12), delete("user/1"), TRUE),
        op(3, (13, 14), scan("user/"), entries(&[("user/2", "bob")])),
        op(3, (15, 16), scan("nobody/"), entries(&[])),
    ]);
}

#[test]
fn operations_whose_intervals_touch_count_as_concurrent() {
    // The put returns at 5 and the get is invoked at 5: the checker cannot tell which came
    // first, so it lets the get be linearized before the put.
    assert_linearizable(&[
        op(1, (0, 5), put("k", "a"), DONE),
        op(2, (5, 6), get("k"), value(None)),
    ]);
}

#[test]
fn reads_of_other_keys_do_not_interfere() {
    assert_linearizable(&[
        op(1, (0, 1), put("a", "1"), DONE),
        op(2, (0, 1), put("b", "2"), DONE),
        op(1, (2, 3), get("b"), value(Some("2"))),
        op(2, (2, 3), get("a"), value(Some("1"))),
        op(3, (4, 5), get("c"), value(None)),
    ]);
}

// ----------------------------------------------------------------------------------------------
// Violations.

#[test]
fn stale_read_after_a_completed_write() {
    let counterexample = assert_violation(
        &[
            op(1, (0, 1), put("k", "a"), DONE),
            op(2, (2, 3), get("k"), value(None)),
        ],
        "#1 client 2 [2, 3] Get(\"k\") -> None",
    );
    assert_eq!(counterexample.longest_prefix, vec![0]);
    assert_eq!(counterexample.state, vec![(b("k"), b("a"))]);
    assert!(counterexample
        .explanation
        .contains("would return Some(\"a\")"));
}

#[test]
fn reads_in_real_time_order_see_new_then_old() {
    // The write is slow, but once one read saw "new" a later read may not see "old".
    assert_violation(
        &[
            op(1, (0, 1), put("k", "old"), DONE),
            op(1, (2, 20), put("k", "new"), DONE),
            op(2, (3, 4), get("k"), value(Some("new"))),
            op(3, (5, 6), get("k"), value(Some("old"))),
        ],
        "Get(\"k\") -> Some(\"old\")",
    );
}

#[test]
fn lost_update_via_append() {
    // Both appends were acknowledged, but the final value contains only one of them.
    assert_violation(
        &[
            op(1, (0, 1), put("k", "x"), DONE),
            op(1, (2, 5), append("k", "a"), DONE),
            op(2, (2, 5), append("k", "b"), DONE),
            op(3, (6, 7), get("k"), value(Some("xb"))),
        ],
        "Get(\"k\") -> Some(\"xb\")",
    );
}

#[test]
fn cas_that_succeeded_twice_for_the_same_expected_value() {
    assert_violation(
        &[
            op(1, (0, 1), put("k", "0"), DONE),
            op(1, (2, 6), cas("k", Some("0"), Some("1")), TRUE),
            op(2, (3, 7), cas("k", Some("0"), Some("2")), TRUE),
        ],
        "Cas(\"k\", Some(\"0\"), Some(\"",
    );
}

#[test]
fn scan_missing_a_completed_put() {
    assert_violation(
        &[
            op(1, (0, 1), put("p/a", "1"), DONE),
            op(2, (0, 1), put("p/b", "2"), DONE),
            op(3, (2, 3), scan("p/"), entries(&[("p/a", "1")])),
        ],
        "Scan(\"p/\") -> [\"p/a\": \"1\"]",
    );
}

#[test]
fn acknowledged_put_lost_and_a_later_read_returns_the_older_value() {
    assert_violation(
        &[
            op(1, (0, 1), put("k", "v1"), DONE),
            op(2, (2, 4), put("k", "v2"), DONE),
            op(1, (3, 5), get("k"), value(Some("v1"))),
            op(3, (6, 7), get("k"), value(Some("v1"))),
            op(1, (8, 9), get("k"), value(Some("v1"))),
        ],
        "#3 client 3 [6, 7] Get(\"k\") -> Some(\"v1\")",
    );
}

#[test]
fn scan_seeing_a_later_write_but_not_an_earlier_one() {
    // Each key on its own is fine (the scan overlaps both puts), but "b" was written after "a"
    // returned, so a scan that sees "b" must see "a": only a checker that keeps the keys of a
    // scan in one partition catches this.
    assert_violation(
        &[
            op(1, (1, 2), put("p/a", "1"), DONE),
            op(2, (3, 4), put("p/b", "2"), DONE),
            op(3, (0, 10), scan("p/"), entries(&[("p/b", "2")])),
        ],
        "Scan(\"p/\") -> [\"p/b\": \"2\"]",
    );
}

#[test]
fn read_of_a_value_nobody_wrote() {
    assert_violation(
        &[
            op(1, (0, 1), put("k", "a"), DONE),
            op(2, (0, 1), get("k"), value(Some("zzz"))),
        ],
        "Some(\"zzz\")",
    );
}

#[test]
fn violation_on_one_key_is_found_among_many_healthy_keys() {
    let mut history = Vec::new();
    for i in 0..50u64 {
        let key = format!("k{}", i % 10);
        history.push(op(
            i % 4,
            (2 * i, 2 * i + 1),
            put(&key, &i.to_string()),
            DONE,
        ));
    }
    history.push(op(9, (200, 201), get("k3"), value(Some("3"))));
    let counterexample = assert_violation(&history, "#50 client 9");
    assert_eq!(counterexample.keys, vec![b("k3")]);
    assert_eq!(counterexample.operations.len(), 6);
    assert_eq!(counterexample.history_indices.last(), Some(&50));
}

#[test]
fn malformed_histories_are_rejected() {
    let backwards = op(1, (5, 4), get("k"), value(None));
    assert_eq!(
        check(&[backwards], STEPS),
        Err(HistoryError::ReturnBeforeInvoke(0))
    );
    let wrong_kind = op(1, (0, 1), get("k"), TRUE);
    let history = [op(1, (0, 1), put("k", "a"), DONE), wrong_kind];
    assert_eq!(
        check(&history, STEPS),
        Err(HistoryError::OutputKindMismatch(1))
    );
}

// ----------------------------------------------------------------------------------------------
// The step limit.

/// `n` concurrent appends followed by a read no order can explain: the search must try all n!
/// orders to prove that.
fn ambiguous_history(n: u64) -> Vec<Operation> {
    let mut history: Vec<Operation> = (0..n)
        .map(|i| op(i, (0, 100), append("k", &format!("{i},")), DONE))
        .collect();
    history.push(op(n, (101, 102), get("k"), value(Some("impossible"))));
    history
}

#[test]
fn huge_ambiguous_history_hits_the_step_limit() {
    let started = Instant::now();
    let verdict = check(&ambiguous_history(14), 200_000);
    assert_eq!(verdict, Ok(Verdict::Unknown { keys: vec![b("k")] }));
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn small_ambiguous_history_is_decided_within_the_limit() {
    assert_violation(&ambiguous_history(5), "impossible");
}

#[test]
fn step_limit_on_one_key_does_not_hide_a_violation_on_another() {
    let mut history = ambiguous_history(14);
    history.push(op(1, (200, 201), put("other", "a"), DONE));
    history.push(op(2, (202, 203), get("other"), value(None)));
    assert_violation(&history, "Get(\"other\") -> None");
}

// ----------------------------------------------------------------------------------------------
// Randomized histories from a simulated sequential store.

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

struct Workload {
    clients: u64,
    ops: usize,
    keys: u64,
    /// Percentage of operations that are scans (these merge partitions).
    scan_percent: u64,
    /// Percentage of operations whose outcome is unknown (half of them take effect).
    unknown_percent: u64,
}

/// The reference sequential store, written independently of the checker's model.
fn run(store: &mut BTreeMap<Vec<u8>, Vec<u8>>, input: &KvInput) -> KvOutput {
    match input {
        KvInput::Get(k) => KvOutput::Value(store.get(k).cloned()),
        KvInput::Put(k, v) => {
            store.insert(k.clone(), v.clone());
            KvOutput::Done
        }
        KvInput::Append(k, v) => {
            let mut current = store.remove(k).unwrap_or_default();
            current.extend_from_slice(v);
            store.insert(k.clone(), current);
            KvOutput::Done
        }
        KvInput::Delete(k) => KvOutput::Bool(store.remove(k).is_some()),
        KvInput::Cas { key, expected, new } => {
            if store.get(key) != expected.as_ref() {
                return KvOutput::Bool(false);
            }
            match new {
                Some(v) => store.insert(key.clone(), v.clone()),
                None => store.remove(key),
            };
            KvOutput::Bool(true)
        }
        KvInput::Scan(p) => KvOutput::Entries(
            store
                .iter()
                .filter(|(k, _)| k.starts_with(p))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        // Transactions are tested in tests/linearizability_txn.rs.
        KvInput::Txn(_) => unreachable!("the generated histories hold no transactions"),
    }
}

fn random_input(rng: &mut Rng, w: &Workload, fresh: &mut u64, written: &[String]) -> KvInput {
    let key = format!("k{}", rng.below(w.keys));
    *fresh += 1;
    let new_value = format!("v{fresh}.");
    let roll = rng.below(100);
    if roll < w.scan_percent {
        let prefixes = ["k", "k1", "k2", "x"];
        return scan(prefixes[rng.below(prefixes.len() as u64) as usize]);
    }
    match roll % 10 {
        0..=2 => get(&key),
        3 | 4 => put(&key, &new_value),
        5 => append(&key, &new_value),
        6 => delete(&key),
        _ => {
            let expected = match written.len() as u64 {
                0 => None,
                n => Some(written[rng.below(n) as usize].as_str()),
            };
            let expected = if rng.percent(20) { None } else { expected };
            let new = if rng.percent(10) {
                None
            } else {
                Some(new_value.as_str())
            };
            cas(&key, expected, new)
        }
    }
}

/// Simulates clients against a sequential store: each operation takes effect at one instant
/// inside its interval, and outputs are computed in that order. The result is linearizable by
/// construction.
fn generate(seed: u64, w: &Workload) -> Vec<Operation> {
    let mut rng = Rng(seed);
    let mut free_at = vec![0u64; w.clients as usize];
    let mut history = Vec::with_capacity(w.ops);
    let mut effects: Vec<(u64, usize)> = Vec::new();
    let (mut fresh, mut written) = (0u64, Vec::new());
    for index in 0..w.ops {
        // The client that is free earliest goes next, so clients overlap.
        let client = (0..w.clients)
            .min_by_key(|&c| (free_at[c as usize], c))
            .unwrap_or(0);
        let invoke = free_at[client as usize] + rng.below(3);
        let input = random_input(&mut rng, w, &mut fresh, &written);
        if let KvInput::Put(_, v) = &input {
            written.push(String::from_utf8_lossy(v).into_owned());
        }
        if rng.percent(w.unknown_percent) {
            if rng.percent(50) {
                effects.push((invoke + rng.below(40), index));
            }
            free_at[client as usize] = invoke + 1 + rng.below(5);
            history.push(timed_out(client, invoke, input));
        } else {
            let effect = invoke + rng.below(5);
            let complete = effect + rng.below(5);
            effects.push((effect, index));
            free_at[client as usize] = complete + 1;
            history.push(Operation {
                client,
                input,
                invoke,
                output: None,
                complete: Some(complete),
            });
        }
    }
    effects.sort_unstable();
    let mut store = BTreeMap::new();
    for (_, index) in effects {
        let output = run(&mut store, &history[index].input);
        if history[index].complete.is_some() {
            history[index].output = Some(output);
        }
    }
    history
}

const SMALL: Workload = Workload {
    clients: 5,
    ops: 150,
    keys: 4,
    scan_percent: 0,
    unknown_percent: 5,
};
const WITH_SCANS: Workload = Workload {
    clients: 4,
    ops: 80,
    keys: 12,
    scan_percent: 10,
    unknown_percent: 5,
};

#[test]
fn random_histories_are_linearizable() {
    for seed in 0..200 {
        for workload in [&SMALL, &WITH_SCANS] {
            let history = generate(seed, workload);
            let verdict = check(&history, STEPS);
            assert_eq!(verdict, Ok(Verdict::Linearizable), "seed {seed}");
        }
    }
}

#[test]
fn random_history_with_a_read_of_an_unwritten_value_is_rejected() {
    for seed in 0..200 {
        let mut history = generate(seed, &SMALL);
        let mut rng = Rng(seed ^ 0xdead_beef);
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| matches!(history[i].input, KvInput::Get(_)) && history[i].output.is_some())
            .collect();
        let Some(&victim) = reads.get(rng.below(reads.len().max(1) as u64) as usize) else {
            continue;
        };
        history[victim].output = Some(value(Some("never-written")));
        let verdict = check(&history, STEPS);
        let Ok(Verdict::NotLinearizable(counterexample)) = &verdict else {
            panic!("seed {seed}: expected NotLinearizable, got {verdict:?}");
        };
        let text = counterexample.to_string();
        assert!(
            text.contains("-> Some(\"never-written\")"),
            "seed {seed}:\n{text}"
        );
    }
}

/// Changes one completed operation's output to another plausible one. Not every such change
/// is detectable (a read may have been allowed to see the other value too).
fn corrupt(history: &mut [Operation], rng: &mut Rng) -> bool {
    let victim = rng.below(history.len() as u64) as usize;
    let corrupted = match &history[victim].output {
        Some(KvOutput::Bool(b)) => KvOutput::Bool(!b),
        Some(KvOutput::Value(Some(_))) => value(None),
        Some(KvOutput::Value(None)) => value(Some(&format!("v{}.", rng.below(50)))),
        Some(KvOutput::Entries(e)) if !e.is_empty() => KvOutput::Entries(e[1..].to_vec()),
        _ => return false,
    };
    history[victim].output = Some(corrupted);
    true
}

#[test]
fn random_corruptions_are_mostly_detected() {
    let (mut corrupted, mut detected) = (0, 0);
    for seed in 0..300 {
        let mut history = generate(seed, &SMALL);
        let mut rng = Rng(seed.wrapping_mul(31) + 7);
        if !corrupt(&mut history, &mut rng) {
            continue;
        }
        corrupted += 1;
        match check(&history, STEPS) {
            Ok(Verdict::NotLinearizable(_)) => detected += 1,
            Ok(Verdict::Linearizable) => {}
            other => panic!("seed {seed}: unexpected {other:?}"),
        }
    }
    println!("detected {detected} of {corrupted} random corruptions");
    assert!(corrupted >= 100, "only {corrupted} histories corrupted");
    assert!(
        detected * 10 >= corrupted * 6,
        "detected only {detected} of {corrupted}"
    );
}

#[test]
fn five_thousand_ops_over_twenty_keys_with_eight_clients() {
    let workload = Workload {
        clients: 8,
        ops: 5_000,
        keys: 20,
        scan_percent: 0,
        unknown_percent: 1,
    };
    let history = generate(42, &workload);
    let started = Instant::now();
    let verdict = check(&history, STEPS);
    println!("checked {} ops in {:?}", history.len(), started.elapsed());
    assert_eq!(verdict, Ok(Verdict::Linearizable));
}
