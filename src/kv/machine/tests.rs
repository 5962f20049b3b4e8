use super::*;
use crate::kv::command::{encode_command, encode_query, request};
use crate::kv::{Compare, Keys};

fn b(s: &str) -> Bytes {
    s.as_bytes().to_vec()
}
fn put(k: &str, v: &str) -> KvOp {
    KvOp::Put {
        key: b(k),
        value: b(v),
    }
}
fn append(k: &str, v: &str) -> KvOp {
    KvOp::Append {
        key: b(k),
        value: b(v),
    }
}
fn register(m: &mut KvStateMachine, index: Index, nonce: u128) -> u64 {
    match m.apply(index, &encode_command(&KvCommand::Register { nonce })) {
        KvResult::Registered(id) => id,
        other => panic!("{other:?}"),
    }
}
fn done(revision: Index) -> KvResult {
    KvResult::Ok {
        revision,
        answer: Answer::Done,
    }
}
fn flag(revision: Index, f: bool) -> KvResult {
    KvResult::Ok {
        revision,
        answer: Answer::Flag(f),
    }
}
fn limits_answer(revision: Index, l: KvLimits) -> KvResult {
    KvResult::Ok {
        revision,
        answer: Answer::Limits(l),
    }
}
fn set_limits(m: &mut KvStateMachine, index: Index, new: KvLimits) {
    let cmd = KvCommand::SetLimits {
        expected: m.limits(),
        new,
    };
    assert_eq!(
        m.apply(index, &encode_command(&cmd)),
        limits_answer(index, new)
    );
}
fn snapshot_bytes(m: &mut KvStateMachine) -> Vec<u8> {
    let mut bytes = Vec::new();
    m.snapshot().write_to(&mut bytes).unwrap();
    bytes
}
fn query(m: &KvStateMachine, op: KvOp) -> KvResult {
    m.query(&encode_query(&op)).expect("serves queries")
}

#[test]
fn a_retried_request_is_answered_from_the_session_with_its_original_revision() {
    let mut m = KvStateMachine::default();
    let c = register(&mut m, 1, 11);
    assert_eq!(m.apply(2, &request(c, 1, append("k", "x"))), done(2));
    assert_eq!(
        m.apply(3, &request(c, 1, append("k", "x"))),
        done(2),
        "the retry gets the original answer and revision"
    );
    assert_eq!(m.store().get(b"k"), Some(&b("x")), "applied twice");
    assert_eq!(m.apply(4, &request(c, 2, append("k", "x"))), done(4));
    assert_eq!(m.store().get(b"k"), Some(&b("xx")));
    let cas = KvOp::Cas {
        key: b("k"),
        expected: Some(b("xx")),
        new: None,
    };
    assert_eq!(m.apply(5, &request(c, 3, cas.clone())), flag(5, true));
    assert_eq!(m.apply(6, &request(c, 3, cas)), flag(5, true));
    assert_eq!(
        m.apply(7, &request(c, 1, put("k", "old"))),
        KvResult::Error(KvError::Stale { seq: 1, latest: 3 })
    );
    assert_eq!(
        m.apply(8, &request(c, 0, put("k", "zero"))),
        KvResult::Error(KvError::Malformed),
        "numbers start at 1"
    );
    assert_eq!(m.store().get(b"k"), None);
    assert_eq!(m.revision(), 8);
}

#[test]
fn reads_through_the_log_are_run_again_and_not_kept() {
    let mut m = KvStateMachine::default();
    let c = register(&mut m, 1, 1);
    assert_eq!(m.apply(2, &request(c, 1, put("k", "v"))), done(2));
    let scan = KvOp::Scan {
        start: vec![],
        end: None,
        limit: u32::MAX,
    };
    let entries = |revision| KvResult::Ok {
        revision,
        answer: Answer::Entries(vec![(b("k"), b("v"))]),
    };
    assert_eq!(m.apply(3, &request(c, 2, scan.clone())), entries(3));
    assert_eq!(m.apply(4, &request(c, 2, scan)), entries(4), "run again");
    // The write before it is still the session's latest: its retry is answered from the table.
    assert_eq!(m.apply(5, &request(c, 1, put("k", "v"))), done(2));
}

#[test]
fn registering_again_with_the_same_nonce_finds_the_same_session() {
    let mut m = KvStateMachine::default();
    let a = register(&mut m, 1, 42);
    assert_eq!(
        register(&mut m, 2, 42),
        a,
        "a retried Register opened a second session"
    );
    let other = register(&mut m, 3, 43);
    assert_ne!(other, a);
    assert_eq!(m.sessions(), 2);
}

/// The reproduction, on the state machine: a put is applied, another client's
/// registration evicts the session, the retry answers SessionExpired — and the map holds the
/// put. So SessionExpired alone never means "not applied" (the client must know whether an
/// earlier attempt's outcome is unknown; see `tests/kv_client.rs`).
#[test]
fn session_expired_on_a_retry_does_not_mean_not_applied() {
    let mut m = KvStateMachine::default();
    set_limits(
        &mut m,
        1,
        KvLimits {
            max_sessions: 1,
            ..KvLimits::DEFAULT
        },
    );
    let c = register(&mut m, 2, 1);
    assert_eq!(m.apply(3, &request(c, 1, put("k", "v"))), done(3));
    register(&mut m, 4, 2); // evicts c
    assert_eq!(
        m.apply(5, &request(c, 1, put("k", "v"))),
        KvResult::Error(KvError::SessionExpired { client: c })
    );
    assert_eq!(m.store().get(b"k"), Some(&b("v")));
}

#[test]
fn eviction_spares_used_sessions_while_never_used_ones_remain() {
    let mut m = KvStateMachine::default();
    set_limits(
        &mut m,
        1,
        KvLimits {
            max_sessions: 2,
            ..KvLimits::DEFAULT
        },
    );
    let live = register(&mut m, 2, 1);
    assert_eq!(m.apply(3, &request(live, 1, put("a", "1"))), done(3));
    for i in 0..100u64 {
        register(&mut m, 10 + i, 1_000 + u128::from(i)); // a flood that never writes
    }
    assert_eq!(m.sessions(), 2);
    assert_eq!(m.apply(200, &request(live, 2, put("a", "2"))), done(200));
    // An evicted flooder's request is refused and not applied.
    assert_eq!(
        m.apply(201, &request(10, 1, put("f", "1"))),
        KvResult::Error(KvError::SessionExpired { client: 10 })
    );
    assert_eq!(m.store().get(b"f"), None);
}

#[test]
fn idle_sessions_expire_by_log_time() {
    let mut m = KvStateMachine::default();
    set_limits(
        &mut m,
        1,
        KvLimits {
            session_idle_entries: 5,
            ..KvLimits::DEFAULT
        },
    );
    let c = register(&mut m, 2, 1);
    assert_eq!(m.apply(7, &request(c, 1, put("a", "1"))), done(7));
    // Entry 13 is 6 entries after c's last use: c expired before it was applied.
    assert_eq!(
        m.apply(13, &request(c, 2, put("a", "2"))),
        KvResult::Error(KvError::SessionExpired { client: c })
    );
    assert_eq!(m.sessions(), 0);
}

#[test]
fn limits_change_only_by_compare_and_set_through_the_log() {
    let mut m = KvStateMachine::default();
    let small = KvLimits {
        max_sessions: 3,
        ..KvLimits::DEFAULT
    };
    let stale = KvCommand::SetLimits {
        expected: small,
        new: KvLimits::DEFAULT,
    };
    assert_eq!(
        m.apply(1, &encode_command(&stale)),
        limits_answer(1, KvLimits::DEFAULT),
        "a change from limits no longer in force changes nothing"
    );
    set_limits(&mut m, 2, small);
    assert_eq!(m.limits(), small);
    let zero = KvCommand::SetLimits {
        expected: small,
        new: KvLimits {
            max_changes: 0,
            ..small
        },
    };
    assert!(matches!(
        m.apply(3, &encode_command(&zero)),
        KvResult::Error(KvError::InvalidLimits(_))
    ));
    assert_eq!(query(&m, KvOp::Limits), limits_answer(3, small));
    // Lowering max_sessions evicts at once, never-used sessions first.
    let used = register(&mut m, 4, 1);
    m.apply(5, &request(used, 1, put("u", "1")));
    register(&mut m, 6, 2);
    register(&mut m, 7, 3);
    set_limits(
        &mut m,
        8,
        KvLimits {
            max_sessions: 1,
            ..small
        },
    );
    assert_eq!(m.session_ids(), vec![used]);
}

#[test]
fn transactions_apply_one_branch_atomically_once() {
    let mut m = KvStateMachine::default();
    let c = register(&mut m, 1, 1);
    m.apply(2, &request(c, 1, put("a", "30")));
    let txn = Txn::when([Compare::value("a", "30"), Compare::absent("b")])
        .then([
            TxnOp::put("a", "20"),
            TxnOp::append("b", "10"),
            TxnOp::get("b"),
        ])
        .otherwise([TxnOp::get("a"), TxnOp::delete("b")]);
    let first = m.apply(3, &request(c, 2, KvOp::Txn(txn.clone())));
    let expected = KvResult::Ok {
        revision: 3,
        answer: Answer::Txn(TxnResponse {
            succeeded: true,
            results: vec![Answer::Done, Answer::Done, Answer::Value(Some(b("10")))],
        }),
    };
    assert_eq!(first, expected);
    assert_eq!(m.apply(4, &request(c, 2, KvOp::Txn(txn.clone()))), expected);
    assert_eq!(m.store().get(b"b"), Some(&b("10")), "applied twice");
    // Now the compares fail: the other branch runs.
    let again = m.apply(5, &request(c, 3, KvOp::Txn(txn)));
    assert_eq!(
        again,
        KvResult::Ok {
            revision: 5,
            answer: Answer::Txn(TxnResponse {
                succeeded: false,
                results: vec![Answer::Value(Some(b("20"))), Answer::Flag(true)],
            }),
        }
    );
    // A read-only transaction is served as a query.
    let read = Txn::when([Compare::present("a")]).then([TxnOp::get("a"), TxnOp::get("b")]);
    assert_eq!(
        query(&m, KvOp::Txn(read)),
        KvResult::Ok {
            revision: 5,
            answer: Answer::Txn(TxnResponse {
                succeeded: true,
                results: vec![Answer::Value(Some(b("20"))), Answer::Value(None)],
            }),
        }
    );
    // Changes: revision 3 holds both of the transaction's writes.
    let all = match query(
        &m,
        KvOp::Changes {
            keys: Keys::Prefix(vec![]),
            from: 1,
            limit: 100,
        },
    ) {
        KvResult::Ok {
            answer: Answer::Changes(batch),
            ..
        } => batch,
        other => panic!("{other:?}"),
    };
    let change = |revision, key: &str, value: Option<&str>| crate::kv::Change {
        revision,
        key: b(key),
        value: value.map(b),
    };
    assert_eq!(
        all.changes,
        vec![
            change(2, "a", Some("30")),
            change(3, "a", Some("20")),
            change(3, "b", Some("10")),
            change(5, "b", None),
        ]
    );
    assert_eq!(all.through, 5);
}

#[test]
fn changes_before_the_history_bound_are_a_typed_error() {
    let mut m = KvStateMachine::default();
    set_limits(
        &mut m,
        1,
        KvLimits {
            max_changes: 3,
            ..KvLimits::DEFAULT
        },
    );
    let c = register(&mut m, 2, 1);
    for i in 0..5u64 {
        m.apply(3 + i, &request(c, 1 + i, put("k", &i.to_string())));
    }
    let changes = |from| KvOp::Changes {
        keys: Keys::Key(b("k")),
        from,
        limit: 10,
    };
    assert_eq!(
        query(&m, changes(3)),
        KvResult::Error(KvError::Compacted {
            from: 3,
            available_from: 5
        })
    );
    match query(&m, changes(5)) {
        KvResult::Ok {
            revision: 7,
            answer: Answer::Changes(batch),
        } => {
            assert_eq!(batch.changes.len(), 3);
            assert_eq!(batch.through, 7);
        }
        other => panic!("{other:?}"),
    }
}

/// Everything replicated is in the snapshot: restoring it and snapshotting again gives the
/// same bytes, and the restored machine answers as the original does.
#[test]
fn snapshots_carry_the_whole_replicated_state() {
    let mut m = KvStateMachine::default();
    set_limits(
        &mut m,
        1,
        KvLimits {
            max_sessions: 3,
            session_idle_entries: 500,
            max_changes: 50,
            max_change_bytes: 1 << 20,
        },
    );
    let c = register(&mut m, 2, 1);
    for (i, k) in ["x", "y", "z", "w", "v"].iter().enumerate() {
        m.apply(3 + i as u64, &request(c, 1 + i as u64, put(k, "value")));
    }
    for i in 0..1000u64 {
        // A long history of overwrites of one key: the snapshot grows only to the bound.
        m.apply(10 + i, &request(c, 6 + i, put("x", "v2")));
    }
    let bytes = snapshot_bytes(&mut m);
    assert!(
        bytes.len() < 50 * 50 + 500,
        "snapshot of 5 keys and 50 changes is {} bytes",
        bytes.len()
    );
    let mut n = KvStateMachine::default();
    n.restore(&mut bytes.as_slice()).unwrap();
    assert_eq!(snapshot_bytes(&mut n), bytes);
    assert_eq!(n.limits(), m.limits());
    assert_eq!(n.revision(), 1009);
    assert_eq!(n.change_history(), m.change_history());
    // The restored session still de-duplicates the last request.
    let last = request(c, 1005, put("x", "v2"));
    assert_eq!(n.apply(1010, &last), done(1009));
    assert_eq!(
        n.apply(1011, &request(c, 3, put("x", "old"))),
        KvResult::Error(KvError::Stale {
            seq: 3,
            latest: 1005
        })
    );
    // A cut snapshot is an error, not a half-restored state; so is another format.
    assert!(KvStateMachine::default()
        .restore(&mut &bytes[..bytes.len() - 3])
        .is_err());
    let mut old_format = bytes.clone();
    old_format[4] = 1;
    let err = KvStateMachine::default()
        .restore(&mut old_format.as_slice())
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn queries_and_malformed_input() {
    let mut m = KvStateMachine::default();
    let c = register(&mut m, 1, 1);
    m.apply(2, &request(c, 1, put("k", "v")));
    assert_eq!(
        query(&m, KvOp::Get { key: b("k") }),
        KvResult::Ok {
            revision: 2,
            answer: Answer::Value(Some(b("v")))
        }
    );
    assert_eq!(
        query(&m, put("k", "w")),
        KvResult::Error(KvError::Malformed),
        "queries cannot write"
    );
    let write_txn = Txn::when([]).then([TxnOp::put("k", "w")]);
    assert_eq!(
        query(&m, KvOp::Txn(write_txn)),
        KvResult::Error(KvError::Malformed)
    );
    let mut rng = crate::raft::Rng::new(9);
    for i in 0..5_000 {
        let len = rng.range(0, 40) as usize;
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let _ = m.apply(3 + i, &junk); // must not panic
        let _ = m.query(&junk);
    }
    assert_eq!(m.store().get(b"k"), Some(&b("v")));
}
