//! The linearizability checker on histories with transactions: a transaction is atomic over
//! every key it names (so it ties their partitions together), runs one branch, and its
//! operations see each other's writes in order.

use raftkv::testing::linearizability::{
    check, HistoryError, KvInput, KvOutput, Operation, TxnCompare, TxnInput, Verdict,
};

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn op(client: u64, (invoke, complete): (u64, u64), input: KvInput, output: KvOutput) -> Operation {
    Operation {
        client,
        input,
        invoke,
        output: Some(output),
        complete: Some(complete),
    }
}

/// If `a` is absent: put `a` and `b`; else read both.
fn put_both_if_absent(a: &str, b_value: &str) -> KvInput {
    KvInput::Txn(TxnInput {
        compares: vec![TxnCompare {
            key: b("a"),
            value: None,
            equal: true,
        }],
        success: vec![KvInput::Put(b("a"), b(a)), KvInput::Put(b("b"), b(b_value))],
        failure: vec![KvInput::Get(b("a")), KvInput::Get(b("b"))],
    })
}

fn did_put() -> KvOutput {
    KvOutput::Txn {
        succeeded: true,
        results: vec![KvOutput::Done, KvOutput::Done],
    }
}

fn assert_verdict(history: &[Operation], linearizable: bool) {
    match check(history, 100_000).expect("well-formed") {
        Verdict::Linearizable => assert!(linearizable, "accepted a bad history"),
        Verdict::NotLinearizable(ce) => assert!(!linearizable, "rejected a good history:\n{ce}"),
        Verdict::Unknown { keys } => panic!("gave up on {keys:?}"),
    }
}

#[test]
fn a_transaction_is_atomic_across_its_keys() {
    let txn = op(1, (0, 10), put_both_if_absent("1", "1"), did_put());
    // A read between the two puts cannot see one without the other.
    let sees_a = op(
        2,
        (11, 12),
        KvInput::Get(b("a")),
        KvOutput::Value(Some(b("1"))),
    );
    let sees_b = op(
        2,
        (13, 14),
        KvInput::Get(b("b")),
        KvOutput::Value(Some(b("1"))),
    );
    assert_verdict(&[txn.clone(), sees_a.clone(), sees_b], true);
    let misses_b = op(2, (13, 14), KvInput::Get(b("b")), KvOutput::Value(None));
    assert_verdict(&[txn, sees_a, misses_b], false);
}

#[test]
fn only_one_of_two_racing_transactions_can_win() {
    let first = op(1, (0, 10), put_both_if_absent("1", "1"), did_put());
    let second = op(2, (0, 10), put_both_if_absent("2", "2"), did_put());
    assert_verdict(&[first.clone(), second], false);
    let lost = op(
        2,
        (0, 10),
        put_both_if_absent("2", "2"),
        KvOutput::Txn {
            succeeded: false,
            results: vec![KvOutput::Value(Some(b("1"))), KvOutput::Value(Some(b("1")))],
        },
    );
    assert_verdict(&[first.clone(), lost], true);
    // The loser cannot have read a half-written state.
    let torn = op(
        2,
        (0, 10),
        put_both_if_absent("2", "2"),
        KvOutput::Txn {
            succeeded: false,
            results: vec![KvOutput::Value(Some(b("1"))), KvOutput::Value(None)],
        },
    );
    assert_verdict(&[first, torn], false);
}

#[test]
fn operations_inside_a_transaction_see_each_other_and_unknown_outcomes_may_apply() {
    let txn = KvInput::Txn(TxnInput {
        compares: vec![],
        success: vec![
            KvInput::Append(b("k"), b("x")),
            KvInput::Append(b("k"), b("y")),
            KvInput::Get(b("k")),
        ],
        failure: vec![],
    });
    let right = KvOutput::Txn {
        succeeded: true,
        results: vec![
            KvOutput::Done,
            KvOutput::Done,
            KvOutput::Value(Some(b("xy"))),
        ],
    };
    assert_verdict(&[op(1, (0, 1), txn.clone(), right)], true);
    let wrong = KvOutput::Txn {
        succeeded: true,
        results: vec![
            KvOutput::Done,
            KvOutput::Done,
            KvOutput::Value(Some(b("x"))),
        ],
    };
    assert_verdict(&[op(1, (0, 1), txn.clone(), wrong)], false);
    // An unknown-outcome transaction may explain a later read, or nothing.
    let unknown = Operation {
        client: 1,
        input: txn,
        invoke: 0,
        output: None,
        complete: None,
    };
    let read = |v: Option<&str>| op(2, (5, 6), KvInput::Get(b("k")), KvOutput::Value(v.map(b)));
    assert_verdict(&[unknown.clone(), read(Some("xy"))], true);
    assert_verdict(&[unknown.clone(), read(None)], true);
    assert_verdict(&[unknown, read(Some("x"))], false);
}

#[test]
fn malformed_transactions_are_refused() {
    let nested = KvInput::Txn(TxnInput {
        compares: vec![],
        success: vec![KvInput::Scan(b("k"))],
        failure: vec![],
    });
    let history = [op(
        1,
        (0, 1),
        nested,
        KvOutput::Txn {
            succeeded: true,
            results: vec![KvOutput::Entries(vec![])],
        },
    )];
    assert_eq!(check(&history, 100), Err(HistoryError::UnsupportedInTxn(0)));
    let short = [op(1, (0, 1), put_both_if_absent("1", "1"), KvOutput::Done)];
    assert_eq!(check(&short, 100), Err(HistoryError::OutputKindMismatch(0)));
}
