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
    chunked_snapshot_installs_whole(&mut make());
    chunked_snapshot_interleaved_with_log_writes(&mut make());
    chunked_snapshot_restarts_at_offset_zero(&mut make());
    chunked_snapshot_rejects_chunks_out_of_order(&mut make());
    read_snapshot_in_pieces(&mut make());
    chunked_snapshot_older_than_current_is_ignored(&mut make());
    split_sync_lets_writes_go_on(&mut make());
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
    assert!(
        matches!(s.read_snapshot(0, 10), Err(StorageError::Unavailable(_))),
        "empty storage: read_snapshot"
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
    assert_eq!(
        state.snapshot_size, 10,
        "snapshot_size is the content's length"
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
    assert_eq!(s.initial_state().expect("state").snapshot_size, 0);
    assert_eq!(
        s.read_snapshot(0, 10)
            .expect("an empty snapshot is still a snapshot"),
        Vec::<u8>::new()
    );
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

/// `len` bytes that differ from one offset to the next (so a shifted chunk is visible).
pub fn snapshot_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// Writes `data` as chunks of `chunk` bytes (the last may be shorter).
fn write_in_chunks<S: Storage>(s: &mut S, meta: SnapshotMeta, data: &[u8], chunk: usize) {
    let mut offset = 0;
    for piece in data.chunks(chunk) {
        s.write_snapshot_chunk(meta, offset, piece)
            .expect("write_snapshot_chunk");
        offset += piece.len() as u64;
    }
    if data.is_empty() {
        s.write_snapshot_chunk(meta, 0, &[])
            .expect("write_snapshot_chunk");
    }
}

fn chunked_snapshot_installs_whole<S: Storage>(s: &mut S) {
    s.append(&entries(1, 10, 1)).expect("append");
    let meta = SnapshotMeta { index: 6, term: 1 };
    let data = snapshot_bytes(10_000, 1);
    write_in_chunks(s, meta, &data[..3000], 1000);
    s.write_snapshot_chunk(meta, 3000, &[])
        .expect("an empty chunk");
    write_chunks_from(s, meta, &data, 3000, 4096);
    assert_eq!(
        s.initial_state().expect("state").snapshot,
        SnapshotMeta::default(),
        "chunked snapshot: not visible before install"
    );
    assert!(
        matches!(s.read_snapshot(0, 10), Err(StorageError::Unavailable(_))),
        "chunked snapshot: not readable before install"
    );
    s.install_snapshot(meta).expect("install_snapshot");
    let state = s.initial_state().expect("state");
    assert_eq!(
        (state.snapshot, state.snapshot_size),
        (meta, data.len() as u64),
        "chunked snapshot: initial state after install"
    );
    assert_eq!((s.first_index(), s.last_index()), (7, 10));
    assert_eq!(all(s), entries(7, 10, 1), "chunked snapshot keeps the rest");
    assert_eq!(
        s.read_snapshot(0, data.len()).expect("read_snapshot"),
        data,
        "chunked snapshot: content"
    );
    assert_eq!(s.snapshot().expect("snapshot"), Some((meta, data)));
    assert!(
        matches!(s.install_snapshot(meta), Err(StorageError::Invalid(_))),
        "an installed snapshot cannot be installed again without being written"
    );
}

fn write_chunks_from<S: Storage>(
    s: &mut S,
    meta: SnapshotMeta,
    data: &[u8],
    mut offset: usize,
    chunk: usize,
) {
    while offset < data.len() {
        let end = (offset + chunk).min(data.len());
        s.write_snapshot_chunk(meta, offset as u64, &data[offset..end])
            .expect("write_snapshot_chunk");
        offset = end;
    }
}

/// A local snapshot is written while the log keeps growing: syncs and appends between its
/// chunks neither disturb it nor are disturbed by it.
fn chunked_snapshot_interleaved_with_log_writes<S: Storage>(s: &mut S) {
    s.append(&entries(1, 5, 1)).expect("append");
    s.sync().expect("sync");
    let meta = SnapshotMeta { index: 4, term: 1 };
    let data = snapshot_bytes(3000, 2);
    s.write_snapshot_chunk(meta, 0, &data[..1000])
        .expect("first chunk");
    s.append(&entries(6, 8, 2)).expect("append between chunks");
    s.sync().expect("sync between chunks");
    s.write_snapshot_chunk(meta, 1000, &data[1000..])
        .expect("second chunk");
    s.set_hard_state(HardState {
        term: 2,
        vote: Some(1),
    })
    .expect("set_hard_state");
    s.append(&entries(9, 9, 2)).expect("append before install");
    s.install_snapshot(meta).expect("install_snapshot");
    assert_eq!((s.first_index(), s.last_index()), (5, 9));
    let mut expect = entries(5, 5, 1);
    expect.extend(entries(6, 9, 2));
    assert_eq!(all(s), expect, "interleaved: log after install");
    assert_eq!(s.initial_state().expect("state").hard_state.term, 2);
    assert_eq!(s.snapshot().expect("snapshot"), Some((meta, data)));
}

fn chunked_snapshot_restarts_at_offset_zero<S: Storage>(s: &mut S) {
    s.append(&entries(1, 10, 1)).expect("append");
    let meta = SnapshotMeta { index: 8, term: 1 };
    s.write_snapshot_chunk(meta, 0, b"a partial snapshot that is abandoned")
        .expect("first attempt");
    let data = snapshot_bytes(5000, 3);
    write_in_chunks(s, meta, &data, 700);
    s.install_snapshot(meta).expect("install_snapshot");
    assert_eq!(
        s.snapshot().expect("snapshot"),
        Some((meta, data.clone())),
        "restart at offset 0 discards the partial snapshot"
    );

    // Offset 0 for another snapshot replaces the one being written.
    let abandoned = SnapshotMeta { index: 9, term: 1 };
    let newer = SnapshotMeta { index: 10, term: 1 };
    s.write_snapshot_chunk(abandoned, 0, b"nine")
        .expect("chunk");
    s.write_snapshot_chunk(newer, 0, b"ten").expect("chunk");
    assert!(
        matches!(
            s.write_snapshot_chunk(abandoned, 4, b"more"),
            Err(StorageError::Invalid(_))
        ),
        "the replaced snapshot cannot be continued"
    );
    s.write_snapshot_chunk(newer, 3, b"!").expect("chunk");
    assert!(
        matches!(s.install_snapshot(abandoned), Err(StorageError::Invalid(_))),
        "the replaced snapshot cannot be installed"
    );
    // Whether a failed install keeps the partial snapshot is not specified: start over.
    s.write_snapshot_chunk(newer, 0, b"ten!").expect("chunk");
    s.install_snapshot(newer).expect("install_snapshot");
    assert_eq!(
        s.snapshot().expect("snapshot"),
        Some((newer, b"ten!".to_vec()))
    );
    assert_eq!((s.first_index(), s.last_index()), (11, 10));
}

fn chunked_snapshot_rejects_chunks_out_of_order<S: Storage>(s: &mut S) {
    s.append(&entries(1, 5, 1)).expect("append");
    let meta = SnapshotMeta { index: 3, term: 1 };
    assert!(
        matches!(
            s.write_snapshot_chunk(meta, 4, b"late"),
            Err(StorageError::Invalid(_))
        ),
        "a chunk past offset 0 with nothing written"
    );
    assert!(
        matches!(s.install_snapshot(meta), Err(StorageError::Invalid(_))),
        "install with nothing written"
    );
    s.write_snapshot_chunk(meta, 0, b"abc").expect("chunk");
    for offset in [5, 2, 4] {
        assert!(
            matches!(
                s.write_snapshot_chunk(meta, offset, b"x"),
                Err(StorageError::Invalid(_))
            ),
            "chunk at offset {offset} after 3 bytes"
        );
    }
    assert!(
        matches!(
            s.write_snapshot_chunk(SnapshotMeta { index: 3, term: 2 }, 3, b"x"),
            Err(StorageError::Invalid(_))
        ),
        "a chunk of another snapshot"
    );
    s.write_snapshot_chunk(meta, 3, b"def")
        .expect("the expected offset still works");
    assert!(
        matches!(
            s.install_snapshot(SnapshotMeta { index: 4, term: 1 }),
            Err(StorageError::Invalid(_))
        ),
        "install of another snapshot"
    );
    // Whether a failed install keeps the partial snapshot is not specified: start over.
    s.write_snapshot_chunk(meta, 0, b"abcdef").expect("chunk");
    s.install_snapshot(meta).expect("install_snapshot");
    assert_eq!(
        s.snapshot().expect("snapshot"),
        Some((meta, b"abcdef".to_vec()))
    );
    assert_eq!(all(s), entries(4, 5, 1));
}

fn read_snapshot_in_pieces<S: Storage>(s: &mut S) {
    let meta = SnapshotMeta { index: 2, term: 1 };
    let data = snapshot_bytes(20_000, 4);
    write_in_chunks(s, meta, &data, 6000);
    s.install_snapshot(meta).expect("install_snapshot");
    for piece in [1usize, 7, 4096, 19_999, 20_000, 1 << 20] {
        let mut got = Vec::new();
        loop {
            let bytes = s
                .read_snapshot(got.len() as u64, piece)
                .expect("read_snapshot");
            assert!(
                bytes.len() <= piece,
                "read_snapshot returns at most len bytes"
            );
            if bytes.is_empty() {
                break;
            }
            assert!(
                bytes.len() == piece || got.len() + bytes.len() == data.len(),
                "fewer bytes than asked only at the end"
            );
            got.extend_from_slice(&bytes);
        }
        assert!(got == data, "read_snapshot in pieces of {piece} bytes");
    }
    assert_eq!(
        s.read_snapshot(19_990, 100).expect("tail"),
        data[19_990..].to_vec()
    );
    assert!(s.read_snapshot(20_000, 10).expect("at the end").is_empty());
    assert!(s
        .read_snapshot(1 << 40, 10)
        .expect("past the end")
        .is_empty());
    assert!(s.read_snapshot(5, 0).expect("zero bytes").is_empty());
}

fn chunked_snapshot_older_than_current_is_ignored<S: Storage>(s: &mut S) {
    s.append(&entries(1, 10, 1)).expect("append");
    let meta = SnapshotMeta { index: 6, term: 1 };
    let data = snapshot_bytes(2000, 5);
    write_in_chunks(s, meta, &data, 512);
    s.install_snapshot(meta).expect("install_snapshot");
    for older in [
        SnapshotMeta { index: 4, term: 1 },
        SnapshotMeta { index: 6, term: 1 },
        SnapshotMeta { index: 6, term: 2 },
    ] {
        write_in_chunks(s, older, &snapshot_bytes(3000, 6), 1000);
        s.install_snapshot(older)
            .expect("an older snapshot is accepted and ignored");
        let state = s.initial_state().expect("state");
        assert_eq!(
            (state.snapshot, state.snapshot_size, state.first_index),
            (meta, 2000, 7),
            "an older snapshot ({older:?}) changes nothing"
        );
        assert_eq!(s.snapshot().expect("snapshot"), Some((meta, data.clone())));
        assert_eq!(all(s), entries(7, 10, 1));
    }
}

fn split_sync_lets_writes_go_on<S: Storage>(s: &mut S) {
    s.append(&entries(1, 3, 1)).expect("append");
    let Some(wait) = s.start_sync().expect("start_sync") else {
        return; // a storage that cannot split its syncs
    };
    s.append(&entries(4, 5, 1))
        .expect("split sync: append while the wait is in flight");
    assert_eq!(
        all(s),
        entries(1, 5, 1),
        "split sync: reads see the writes made while the wait is in flight"
    );
    let waited = wait.run();
    s.finish_sync(waited).expect("split sync: finish_sync");
    s.truncate_suffix(5)
        .expect("split sync: truncate afterwards");
    s.sync().expect("split sync: sync afterwards");
    assert_eq!(all(s), entries(1, 4, 1), "split sync: the log afterwards");
}
