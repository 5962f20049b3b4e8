//! A conformance suite for any [`Storage`] (feature `testing`).
//!
//! [`storage_conformance`] runs a sequence of small scenarios, each on a fresh storage from
//! `make`, and panics with a message naming the scenario at the first difference from the
//! trait's contract (the same behaviour as [`MemStorage`](crate::storage::MemStorage)).
//! Durability across crashes is not covered here: it needs a simulated disk (see the
//! crash tests of `FileStorage`).

use crate::error::StorageError;
use crate::raft::{Entry, EntryPayload, HardState, Index, SnapshotMeta, Term};
use crate::storage::{InitialState, Storage};

/// An entry `index` of `term` carrying a payload derived from both (so mix-ups are visible).
pub fn entry(index: Index, term: Term) -> Entry {
    Entry {
        index,
        term,
        payload: EntryPayload::Command(format!("cmd-{index}-{term}").into_bytes().into()),
    }
}

/// Entries `lo..=hi`, all of `term`.
pub fn entries(lo: Index, hi: Index, term: Term) -> Vec<Entry> {
    (lo..=hi).map(|i| entry(i, term)).collect()
}

fn all<S: Storage>(s: &S) -> Vec<Entry> {
    s.entries(s.first_index(), s.last_index() + 1, u64::MAX)
        .expect("reading the whole log")
}

/// Runs every scenario on fresh storages from `make`. Panics on the first violation.
pub fn storage_conformance<S: Storage>(mut make: impl FnMut() -> S) {
    empty_storage(&mut make());
    append_and_read(&mut make());
    append_rejects_gaps(&mut make());
    append_overwrites_conflicting_suffix(&mut make());
    truncate_suffix_removes_tail(&mut make());
    hard_state_round_trips(&mut make());
    snapshot_inside_log_keeps_the_rest(&mut make());
    snapshot_with_other_term_discards_log(&mut make());
    snapshot_beyond_log(&mut make());
    snapshot_never_moves_backwards(&mut make());
    compact_validates_and_keeps_live_entries(&mut make());
    many_entries_round_trip(&mut make());
}

fn empty_storage<S: Storage>(s: &mut S) {
    let state = s.initial_state().expect("initial_state");
    assert_eq!(
        state,
        InitialState {
            hard_state: HardState::default(),
            snapshot: SnapshotMeta::default(),
            first_index: 1,
            last_index: 0,
            snapshot_size: 0,
        },
        "empty storage: initial state"
    );
    assert_eq!(
        s.term(0).expect("term(0)"),
        0,
        "empty storage: sentinel term"
    );
    assert!(
        matches!(s.term(1), Err(StorageError::Unavailable(1))),
        "empty storage: term(1)"
    );
    assert!(s.entries(1, 1, u64::MAX).expect("empty range").is_empty());
    assert!(matches!(
        s.entries(1, 2, u64::MAX),
        Err(StorageError::Unavailable(1))
    ));
    assert!(
        s.snapshot().expect("snapshot").is_none(),
        "empty storage has no snapshot"
    );
    s.sync().expect("sync with nothing to do");
    s.sync().expect("second sync with nothing to do");
}

fn append_and_read<S: Storage>(s: &mut S) {
    let mut log = entries(1, 3, 1);
    log.extend(entries(4, 6, 2));
    s.append(&log).expect("append");
    assert_eq!((s.first_index(), s.last_index()), (1, 6), "append: bounds");
    assert_eq!(s.term(3).expect("term"), 1);
    assert_eq!(s.term(4).expect("term"), 2);
    assert!(matches!(s.term(7), Err(StorageError::Unavailable(7))));
    assert_eq!(all(s), log, "append: read back before sync");
    s.sync().expect("sync");
    assert_eq!(all(s), log, "append: read back after sync");
    assert_eq!(
        s.entries(2, 4, u64::MAX).expect("range"),
        log[1..3].to_vec()
    );
    let one = s.entries(1, 7, 0).expect("max_bytes 0");
    assert_eq!(
        one,
        log[..1].to_vec(),
        "at least one entry even beyond max_bytes"
    );
    let budget = log[0].size() + log[1].size();
    assert_eq!(
        s.entries(1, 7, budget).expect("budget"),
        log[..2].to_vec(),
        "byte budget"
    );
    assert!(matches!(
        s.entries(5, 8, u64::MAX),
        Err(StorageError::Unavailable(7))
    ));
    assert!(
        s.persisted_size().log_bytes > 0,
        "synced entries take space"
    );
}

fn append_rejects_gaps<S: Storage>(s: &mut S) {
    s.append(&entries(1, 3, 1)).expect("append");
    s.append(&[]).expect("empty append is a no-op");
    assert!(
        matches!(s.append(&[entry(5, 1)]), Err(StorageError::Invalid(_))),
        "gap after log"
    );
    assert!(
        matches!(
            s.append(&[entry(4, 1), entry(6, 1)]),
            Err(StorageError::Invalid(_))
        ),
        "non-contiguous batch"
    );
    assert_eq!(s.last_index(), 3, "rejected appends change nothing");
    assert_eq!(all(s), entries(1, 3, 1));
}

fn append_overwrites_conflicting_suffix<S: Storage>(s: &mut S) {
    s.append(&entries(1, 5, 1)).expect("append");
    s.sync().expect("sync");
    s.append(&entries(3, 4, 3)).expect("overwrite");
    assert_eq!(s.last_index(), 4, "overwrite drops the old suffix");
    let mut expect = entries(1, 2, 1);
    expect.extend(entries(3, 4, 3));
    assert_eq!(all(s), expect, "overwrite: content");
    assert_eq!(s.term(3).expect("term"), 3);
    s.sync().expect("sync");
    s.append(&entries(5, 5, 3)).expect("append after overwrite");
    assert_eq!(s.last_index(), 5);
}

fn truncate_suffix_removes_tail<S: Storage>(s: &mut S) {
    s.append(&entries(1, 5, 1)).expect("append");
    s.truncate_suffix(9)
        .expect("truncate past the end is a no-op");
    assert_eq!(s.last_index(), 5);
    s.truncate_suffix(3).expect("truncate");
    assert_eq!(s.last_index(), 2, "truncate_suffix");
    assert!(matches!(s.term(3), Err(StorageError::Unavailable(3))));
    s.append(&entries(3, 4, 2)).expect("append after truncate");
    let mut expect = entries(1, 2, 1);
    expect.extend(entries(3, 4, 2));
    assert_eq!(all(s), expect);
    s.sync().expect("sync");
    assert!(matches!(
        s.truncate_suffix(0),
        Err(StorageError::Compacted(0))
    ));
}

fn hard_state_round_trips<S: Storage>(s: &mut S) {
    let hs = HardState {
        term: 4,
        vote: Some(2),
    };
    s.set_hard_state(hs).expect("set_hard_state");
    assert_eq!(s.initial_state().expect("state").hard_state, hs);
    s.sync().expect("sync");
    let hs2 = HardState {
        term: 5,
        vote: None,
    };
    s.set_hard_state(hs2).expect("set_hard_state");
    assert_eq!(s.initial_state().expect("state").hard_state, hs2);
}

fn snapshot_inside_log_keeps_the_rest<S: Storage>(s: &mut S) {
    s.append(&entries(1, 10, 1)).expect("append");
    let meta = SnapshotMeta { index: 5, term: 1 };
    s.save_snapshot(meta, b"state at 5").expect("save_snapshot");
    assert_eq!(
        (s.first_index(), s.last_index()),
        (6, 10),
        "snapshot keeps the later entries"
    );
    assert_eq!(s.term(5).expect("snapshot term"), 1);
    assert!(matches!(s.term(4), Err(StorageError::Compacted(4))));
    assert!(matches!(
        s.entries(5, 7, u64::MAX),
        Err(StorageError::Compacted(5))
    ));
    assert!(matches!(
        s.truncate_suffix(5),
        Err(StorageError::Compacted(5))
    ));
    assert!(matches!(
        s.append(&[entry(5, 1)]),
        Err(StorageError::Invalid(_))
    ));
    assert_eq!(all(s), entries(6, 10, 1));
    assert_eq!(
        s.snapshot().expect("snapshot"),
        Some((meta, b"state at 5".to_vec()))
    );
    let state = s.initial_state().expect("state");
    assert_eq!(
        (state.snapshot, state.first_index, state.last_index),
        (meta, 6, 10)
    );
    assert!(
        s.persisted_size().snapshot_bytes >= 10,
        "snapshot takes space"
    );
}

fn snapshot_with_other_term_discards_log<S: Storage>(s: &mut S) {
    s.append(&entries(1, 10, 1)).expect("append");
    s.sync().expect("sync");
    let meta = SnapshotMeta { index: 7, term: 9 };
    s.save_snapshot(meta, b"other history")
        .expect("save_snapshot");
    assert_eq!(
        (s.first_index(), s.last_index()),
        (8, 7),
        "conflicting snapshot empties log"
    );
    assert_eq!(s.term(7).expect("snapshot term"), 9);
    assert!(matches!(
        s.append(&[entry(9, 9)]),
        Err(StorageError::Invalid(_))
    ));
    s.append(&entries(8, 9, 9)).expect("append after snapshot");
    s.sync().expect("sync");
    assert_eq!(all(s), entries(8, 9, 9));
}

fn snapshot_beyond_log<S: Storage>(s: &mut S) {
    s.append(&entries(1, 3, 1)).expect("append");
    let meta = SnapshotMeta { index: 20, term: 3 };
    s.save_snapshot(meta, b"").expect("save_snapshot");
    assert_eq!((s.first_index(), s.last_index()), (21, 20));
    assert_eq!(s.snapshot().expect("snapshot"), Some((meta, Vec::new())));
    s.append(&entries(21, 22, 3))
        .expect("append after snapshot");
    assert_eq!(all(s), entries(21, 22, 3));
}

fn snapshot_never_moves_backwards<S: Storage>(s: &mut S) {
    s.append(&entries(1, 10, 1)).expect("append");
    let meta = SnapshotMeta { index: 6, term: 1 };
    s.save_snapshot(meta, b"six").expect("save_snapshot");
    s.save_snapshot(SnapshotMeta { index: 4, term: 1 }, b"four")
        .expect("older snapshot");
    assert_eq!(
        s.snapshot().expect("snapshot"),
        Some((meta, b"six".to_vec()))
    );
    assert_eq!(s.first_index(), 7);
}

fn compact_validates_and_keeps_live_entries<S: Storage>(s: &mut S) {
    s.append(&entries(1, 10, 1)).expect("append");
    assert!(
        matches!(s.compact(1), Err(StorageError::Invalid(_))),
        "compact beyond snapshot"
    );
    s.save_snapshot(SnapshotMeta { index: 5, term: 1 }, b"five")
        .expect("save_snapshot");
    s.compact(5).expect("compact");
    assert_eq!((s.first_index(), s.last_index()), (6, 10));
    assert_eq!(
        all(s),
        entries(6, 10, 1),
        "compact keeps entries after the snapshot"
    );
    assert!(matches!(s.compact(6), Err(StorageError::Invalid(_))));
}

fn many_entries_round_trip<S: Storage>(s: &mut S) {
    let big = |i: Index| Entry {
        index: i,
        term: 1 + i / 100,
        payload: EntryPayload::Command(vec![(i % 251) as u8; 1000].into()),
    };
    for batch in 0..30 {
        let batch: Vec<Entry> = (batch * 10 + 1..=batch * 10 + 10).map(big).collect();
        s.append(&batch).expect("append");
        s.sync().expect("sync");
    }
    assert_eq!(s.last_index(), 300);
    let expect: Vec<Entry> = (1..=300).map(big).collect();
    assert_eq!(all(s), expect, "300 entries of 1 KB round trip");
    assert_eq!(s.term(250).expect("term"), 3);
    s.truncate_suffix(150).expect("truncate");
    s.append(&[entry(150, 7)]).expect("append");
    s.sync().expect("sync");
    assert_eq!(
        s.entries(148, 151, u64::MAX).expect("range"),
        vec![big(148), big(149), entry(150, 7)]
    );
    s.save_snapshot(
        SnapshotMeta {
            index: 120,
            term: 2,
        },
        b"x",
    )
    .expect("save_snapshot");
    s.compact(120).expect("compact");
    assert_eq!((s.first_index(), s.last_index()), (121, 150));
    assert_eq!(s.entries(121, 122, u64::MAX).expect("read"), vec![big(121)]);
}
