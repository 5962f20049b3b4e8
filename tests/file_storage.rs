//! FileStorage: conformance with the Storage contract, persistence across reopen, segments,
//! snapshots and compaction, identity checks, debris, fsync failure and a full disk.

use std::path::{Path, PathBuf};

use raftkv::error::StorageError;
use raftkv::raft::{Entry, EntryPayload, HardState, Index, SnapshotMeta};
use raftkv::storage::file::conformance::{entries, entry, storage_conformance};
use raftkv::storage::file::inspect::inspect;
use raftkv::storage::file::sim::SimDisk;
use raftkv::storage::{FileStorage, FileStorageOptions, MemStorage, Storage};

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 7,
        node_id: 3,
        segment_size: 4096,
        cache_bytes: 0,
        ..Default::default()
    }
}

fn kib_entry(index: Index, term: u64) -> Entry {
    Entry {
        index,
        term,
        payload: EntryPayload::Command(vec![(index % 251) as u8; 1024].into()),
    }
}

fn all(s: &FileStorage) -> Vec<Entry> {
    s.entries(s.first_index(), s.last_index() + 1, u64::MAX)
        .unwrap()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn mem_storage_passes_the_conformance_suite() {
    storage_conformance(MemStorage::new);
}

#[test]
fn file_storage_passes_the_conformance_suite_on_real_files() {
    let mut dirs = Vec::new();
    storage_conformance(|| {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::open(dir.path(), opts()).unwrap();
        dirs.push(dir);
        s
    });
}

#[test]
fn file_storage_passes_the_conformance_suite_with_a_cache_and_big_segments() {
    let mut dirs = Vec::new();
    storage_conformance(|| {
        let dir = tempfile::tempdir().unwrap();
        let o = FileStorageOptions {
            segment_size: 1 << 20,
            cache_bytes: 64 << 10,
            ..opts()
        };
        let s = FileStorage::open(dir.path(), o).unwrap();
        dirs.push(dir);
        s
    });
}

#[test]
fn file_storage_passes_the_conformance_suite_on_the_simulated_disk() {
    let disk = SimDisk::new();
    let mut n = 0;
    storage_conformance(|| {
        n += 1;
        FileStorage::open_simulated(&disk, format!("/node{n}"), opts()).unwrap()
    });
}

#[test]
fn synced_state_survives_reopen_across_many_segments() {
    let dir = tempfile::tempdir().unwrap();
    let hs = HardState {
        term: 3,
        vote: Some(2),
    };
    let expect: Vec<Entry> = (1..=40).map(|i| kib_entry(i, 1 + i / 10)).collect();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.set_hard_state(hs).unwrap();
        for chunk in expect.chunks(7) {
            s.append(chunk).unwrap();
            s.sync().unwrap();
        }
        assert!(
            s.segment_count() >= 10,
            "1 KiB entries in 4 KiB segments roll often"
        );
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(s.recovery_report().torn_tail, None);
    let state = s.initial_state().unwrap();
    assert_eq!(
        (state.hard_state, state.first_index, state.last_index),
        (hs, 1, 40)
    );
    assert_eq!(all(&s), expect);
    assert_eq!(s.term(35).unwrap(), 4);
}

#[test]
fn unsynced_writes_are_not_required_to_survive_but_synced_ones_are() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&entries(1, 3, 1)).unwrap();
        s.sync().unwrap();
        s.append(&entries(4, 6, 1)).unwrap(); // never synced: buffered in memory
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(s.last_index(), 3);
    assert_eq!(all(&s), entries(1, 3, 1));
}

#[test]
fn truncation_across_segments_is_durable_and_never_resurrected() {
    let dir = tempfile::tempdir().unwrap();
    let mut expect: Vec<Entry> = (1..=30).map(|i| kib_entry(i, 1)).collect();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&expect).unwrap();
        s.sync().unwrap();
        s.truncate_suffix(8).unwrap(); // in an early segment
        s.sync().unwrap();
    }
    expect.truncate(7);
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        assert_eq!(all(&s), expect, "truncated entries stay gone after reopen");
        // Overwrite semantics across segments: replace 5.. with a new term.
        let new: Vec<Entry> = (5..=12).map(|i| kib_entry(i, 2)).collect();
        s.append(&new).unwrap();
        s.sync().unwrap();
        expect.truncate(4);
        expect.extend(new);
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(all(&s), expect);
    assert_eq!(s.term(5).unwrap(), 2);
}

#[test]
fn snapshot_and_compaction_delete_whole_segments_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log: Vec<Entry> = (1..=60).map(|i| kib_entry(i, 1)).collect();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.set_hard_state(HardState {
            term: 1,
            vote: Some(3),
        })
        .unwrap();
        s.append(&log).unwrap();
        s.sync().unwrap();
        let before = segment_files(dir.path()).len();
        s.save_snapshot(SnapshotMeta { index: 40, term: 1 }, b"state@40")
            .unwrap();
        assert_eq!(
            segment_files(dir.path()).len(),
            before,
            "save_snapshot alone keeps segments"
        );
        s.compact(40).unwrap();
        let after = segment_files(dir.path()).len();
        assert!(
            after < before / 2,
            "compaction removes segments ({before} -> {after})"
        );
        assert_eq!(all(&s), log[40..].to_vec());
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    let state = s.initial_state().unwrap();
    assert_eq!(state.snapshot, SnapshotMeta { index: 40, term: 1 });
    assert_eq!(
        state.hard_state,
        HardState {
            term: 1,
            vote: Some(3)
        },
        "hard state outlives compaction"
    );
    assert_eq!((state.first_index, state.last_index), (41, 60));
    assert_eq!(all(&s), log[40..].to_vec());
    assert_eq!(s.snapshot().unwrap().unwrap().1, b"state@40".to_vec());
}

#[test]
fn a_snapshot_that_discards_the_log_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&(1..=10).map(|i| kib_entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        s.sync().unwrap();
        s.save_snapshot(SnapshotMeta { index: 20, term: 4 }, b"leader's state")
            .unwrap();
        s.append(&entries(21, 23, 4)).unwrap();
        s.sync().unwrap();
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!((s.first_index(), s.last_index()), (21, 23));
    assert_eq!(all(&s), entries(21, 23, 4));
    assert!(!s.recovery_report().discarded_log);
}

#[test]
fn files_of_another_node_or_cluster_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&entries(1, 2, 1)).unwrap();
        s.sync().unwrap();
    }
    let other_node = FileStorageOptions {
        node_id: 4,
        ..opts()
    };
    assert!(matches!(
        FileStorage::open(dir.path(), other_node),
        Err(StorageError::WrongIdentity { .. })
    ));
    let other_cluster = FileStorageOptions {
        cluster_id: 8,
        ..opts()
    };
    assert!(matches!(
        FileStorage::open(dir.path(), other_cluster),
        Err(StorageError::WrongIdentity { .. })
    ));
    assert!(matches!(
        FileStorage::open(
            dir.path(),
            FileStorageOptions {
                node_id: 0,
                ..opts()
            }
        ),
        Err(StorageError::Invalid(_))
    ));
}

#[test]
fn leftover_temporary_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&entries(1, 2, 1)).unwrap();
        s.sync().unwrap();
    }
    let snap_tmp = dir.path().join("snap.tmp");
    let seg_tmp = dir.path().join("seg-00000000000000000002.tmp");
    std::fs::write(&snap_tmp, b"half a snapshot").unwrap();
    std::fs::write(&seg_tmp, [0u8; 100]).unwrap();
    std::fs::write(dir.path().join("NOTES"), b"an operator's file").unwrap();
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    let removed = &s.recovery_report().removed_files;
    assert!(
        removed.contains(&snap_tmp) && removed.contains(&seg_tmp),
        "{removed:?}"
    );
    assert!(!snap_tmp.exists() && !seg_tmp.exists());
    assert!(
        dir.path().join("NOTES").exists(),
        "unknown files are left alone"
    );
    assert_eq!(all(&s), entries(1, 2, 1));
}

#[test]
fn a_new_directory_and_an_empty_segment_open_fine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b");
    drop(FileStorage::open(&path, opts()).unwrap());
    let s = FileStorage::open(&path, opts()).unwrap();
    assert_eq!(s.initial_state().unwrap().last_index, 0);
    assert_eq!(segment_files(&path).len(), 1);
}

#[test]
fn a_torn_tail_is_cut_reported_and_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&entries(1, 3, 1)).unwrap();
        s.sync().unwrap();
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let info = inspect(dir.path()).unwrap().segments[0].clone();
    let used = info.used_bytes as usize;
    assert_eq!(info.synced_through, Some(used as u64), "{info:?}");
    // A crash in the middle of the next batch's write: the first 20 bytes of a 108-byte
    // record after the synced end (length, checksum, part of the payload), the rest never
    // written.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[used..used + 4].copy_from_slice(&100u32.to_le_bytes());
    bytes[used + 4..used + 20].copy_from_slice(&[0x5a; 16]);
    std::fs::write(&seg, &bytes).unwrap();
    let report = inspect(dir.path()).unwrap();
    assert_eq!(report.segments[0].damage, None, "{report}");
    assert_eq!(report.segments[0].torn_tail, Some((used as u64, 20)));
    assert!(report.to_string().contains("torn tail"), "{report}");
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    let torn = s
        .recovery_report()
        .torn_tail
        .clone()
        .expect("torn tail reported");
    assert_eq!((torn.path, torn.offset, torn.bytes), (seg, used as u64, 20));
    assert_eq!(all(&s), entries(1, 3, 1), "everything synced is kept");
    drop(s);
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(
        s.recovery_report().torn_tail,
        None,
        "the torn bytes were zeroed"
    );
    assert_eq!(all(&s), entries(1, 3, 1));
}

/// The attack of issue 11, on one storage: the synced tail of the log damaged the way a disk
/// damages it. None of it may be taken for a torn write.
#[test]
fn damage_to_the_synced_tail_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&entries(1, 3, 1)).unwrap();
        s.sync().unwrap();
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let used = inspect(dir.path()).unwrap().segments[0].used_bytes as usize;
    let pristine = std::fs::read(&seg).unwrap();
    let flip_last_byte = |b: &mut Vec<u8>| b[used - 2] ^= 0x40;
    let zero_tail = |b: &mut Vec<u8>| b[used - 100..used].fill(0);
    let zero_record_start = |b: &mut Vec<u8>| b[1536..used].fill(0);
    for (what, damage) in [
        (
            "a bit flip in the last record",
            &flip_last_byte as &dyn Fn(&mut Vec<u8>),
        ),
        ("the last 100 bytes zeroed", &zero_tail),
        ("every record zeroed", &zero_record_start),
    ] {
        let mut bytes = pristine.clone();
        damage(&mut bytes);
        std::fs::write(&seg, &bytes).unwrap();
        match FileStorage::open(dir.path(), opts()) {
            Err(StorageError::Corrupt {
                path,
                offset,
                reason,
            }) => {
                assert_eq!(path, seg, "{what}");
                assert!(
                    (1536..used as u64).contains(&offset),
                    "{what}: offset {offset}"
                );
                assert!(reason.contains("recover_damaged_tail"), "{what}: {reason}");
            }
            Err(other) => panic!("{what}: {other}"),
            Ok(s) => panic!("{what}: opened with log ..={}", s.last_index()),
        }
        let report = inspect(dir.path()).unwrap();
        assert!(report.segments[0].damage.is_some(), "{what}: {report}");
        assert!(report.to_string().contains("DAMAGE"), "{what}: {report}");
    }
}

#[test]
fn a_record_larger_than_a_segment_gets_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let big = Entry {
        index: 2,
        term: 1,
        payload: EntryPayload::Command(vec![9u8; 10_000].into()),
    };
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&[entry(1, 1), big.clone(), entry(3, 1)]).unwrap();
        s.sync().unwrap();
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(all(&s), vec![entry(1, 1), big, entry(3, 1)]);
}

#[test]
fn a_failed_fsync_poisons_the_storage() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 2, 1)).unwrap();
    s.sync().unwrap();
    s.append(&entries(3, 4, 1)).unwrap();
    disk.fail_next_sync();
    assert!(matches!(
        s.sync(),
        Err(StorageError::Io { op: "fsync", .. })
    ));
    assert!(
        matches!(s.sync(), Err(StorageError::Poisoned)),
        "no retry after a failed fsync"
    );
    assert!(matches!(
        s.append(&entries(5, 5, 1)),
        Err(StorageError::Poisoned)
    ));
    assert!(matches!(
        s.set_hard_state(HardState {
            term: 9,
            vote: None
        }),
        Err(StorageError::Poisoned)
    ));
    assert!(matches!(s.entries(1, 2, 100), Err(StorageError::Poisoned)));
    assert!(matches!(
        s.save_snapshot(SnapshotMeta { index: 1, term: 1 }, b""),
        Err(StorageError::Poisoned)
    ));
    drop(s);
    disk.crash(1);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert!(s.last_index() >= 2, "what was synced before stays");
}

#[test]
fn a_failed_wait_of_a_split_sync_poisons_the_storage() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 2, 1)).unwrap();
    s.sync().unwrap();
    s.append(&entries(3, 4, 1)).unwrap();
    let wait = s
        .start_sync()
        .unwrap()
        .expect("the file storage splits its syncs");
    assert!(wait.blocks(), "there are writes to flush");
    disk.fail_next_sync();
    let waited = wait.run();
    assert!(matches!(waited, Err(StorageError::Io { op: "fsync", .. })));
    assert!(matches!(
        s.finish_sync(waited),
        Err(StorageError::Io { op: "fsync", .. })
    ));
    assert!(
        matches!(s.sync(), Err(StorageError::Poisoned)),
        "no retry after a failed fsync"
    );
    assert!(matches!(s.start_sync(), Err(StorageError::Poisoned)));
    drop(s);
    disk.crash(1);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert!(s.last_index() >= 2, "what was synced before stays");
}

/// A segment sealed while a split sync's wait is in flight, its final watermark refused by a
/// full disk: the retry writes that generation before anything else, so the two slots stay
/// consecutive generations.
#[test]
fn a_refused_seal_during_a_split_sync_is_written_whole_on_retry() {
    let disk = SimDisk::new();
    let small = FileStorageOptions {
        segment_size: 4096,
        ..opts()
    };
    let mut s = FileStorage::open_simulated(&disk, "/n", small).unwrap();
    s.append(&entries(1, 2, 1)).unwrap();
    s.sync().unwrap();
    s.append(&[kib_entry(3, 1)]).unwrap();
    let wait = s
        .start_sync()
        .unwrap()
        .expect("the file storage splits its syncs");
    // Synced while the wait is in flight: the watermark is left to the finish, so the
    // segment's records now lie above it and the seal below must write its slot.
    s.append(&[kib_entry(4, 1)]).unwrap();
    s.sync().unwrap();
    disk.set_no_space_below(Some(1536));
    let big: Vec<Entry> = (5..=6).map(|i| kib_entry(i, 1)).collect();
    assert!(
        matches!(s.append(&big), Err(StorageError::NoSpace { .. })),
        "the roll's seal is refused"
    );
    disk.set_no_space_below(None);
    s.append(&big).unwrap();
    s.sync().unwrap();
    s.finish_sync(wait.run()).unwrap();
    drop(s);
    disk.crash(11);
    let s = FileStorage::open_simulated(&disk, "/n", small)
        .unwrap_or_else(|e| panic!("reopens without damage: {e}"));
    assert_eq!(s.last_index(), 6);
}

/// The node's way: the wait runs on another thread while the storage takes more writes, a
/// blocking sync and a segment roll; each finish leaves a watermark the files reopen with.
#[test]
fn a_split_sync_waits_on_another_thread_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let small = FileStorageOptions {
        segment_size: 64 * 1024,
        ..opts()
    };
    let mut s = FileStorage::open(dir.path(), small).unwrap();
    let log: Vec<Entry> = (1..=200).map(|i| kib_entry(i, 1)).collect();
    for (round, batch) in log.chunks(10).enumerate() {
        s.append(batch).unwrap();
        let wait = s
            .start_sync()
            .unwrap()
            .expect("the file storage splits its syncs");
        let waiter = std::thread::spawn(move || wait.run());
        // Writes while the wait is in flight; every third round a blocking sync too, which
        // gets the watermark further than the finish below would.
        s.set_hard_state(HardState {
            term: 1 + round as u64,
            vote: Some(1),
        })
        .unwrap();
        if round % 3 == 0 {
            s.sync().unwrap();
        }
        s.finish_sync(waiter.join().unwrap()).unwrap();
    }
    assert!(
        s.persisted_size().log_bytes > 3 * 64 * 1024,
        "segments rolled while syncs were in flight"
    );
    drop(s);
    let s = FileStorage::open(dir.path(), small).unwrap();
    assert!(
        s.recovery_report().torn_tail.is_none(),
        "nothing above a watermark: {:?}",
        s.recovery_report()
    );
    assert_eq!(all(&s), log, "every entry a finished sync covered is there");
}

#[test]
fn a_full_disk_fails_cleanly_and_writing_resumes_when_space_returns() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    let log: Vec<Entry> = (1..=12).map(|i| kib_entry(i, 1)).collect();
    s.append(&log[..1]).unwrap();
    s.sync().unwrap();
    disk.set_no_space(true);
    s.append(&log[1..2]).unwrap();
    assert!(matches!(s.sync(), Err(StorageError::NoSpace { .. })));
    // Rolling to a new segment needs space too.
    assert!(matches!(
        s.append(&log[2..8]),
        Err(StorageError::NoSpace { .. })
    ));
    let names = disk.files();
    assert!(
        names.iter().all(|p| !p.to_string_lossy().ends_with(".tmp")),
        "{names:?}"
    );
    disk.set_no_space(false);
    let last = s.last_index();
    s.append(&log[last as usize..]).unwrap();
    s.sync().unwrap();
    assert_eq!(all(&s), log);
    drop(s);
    disk.crash(7);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert_eq!(
        all(&s),
        log,
        "everything synced after the disk was full is durable"
    );
}

#[test]
fn a_crash_while_the_disk_is_full_keeps_what_was_durable() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    s.sync().unwrap();
    disk.set_no_space(true);
    s.append(&entries(4, 6, 1)).unwrap();
    assert!(matches!(s.sync(), Err(StorageError::NoSpace { .. })));
    drop(s);
    for seed in 0..20 {
        disk.crash(seed);
        let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
        assert_eq!(
            s.entries(1, 4, u64::MAX).unwrap(),
            entries(1, 3, 1),
            "seed {seed}"
        );
        let last = s.last_index();
        assert!((3..=6).contains(&last), "seed {seed}: last index {last}");
        assert_eq!(
            all(&s),
            entries(1, last, 1),
            "seed {seed}: a prefix survives"
        );
    }
}

#[test]
fn inspect_describes_every_file_and_its_damage() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.set_hard_state(HardState {
            term: 2,
            vote: Some(1),
        })
        .unwrap();
        s.append(&(1..=10).map(|i| kib_entry(i, 2)).collect::<Vec<_>>())
            .unwrap();
        s.save_snapshot(SnapshotMeta { index: 4, term: 2 }, b"four")
            .unwrap();
    }
    let report = inspect(dir.path()).unwrap();
    assert_eq!(report.snapshots.len(), 1);
    assert_eq!(
        report.snapshots[0].meta,
        Some(SnapshotMeta { index: 4, term: 2 })
    );
    assert!(
        report.segments.iter().all(|s| s.damage.is_none()),
        "{report}"
    );
    assert_eq!(report.segments.iter().map(|s| s.entries).sum::<u64>(), 10);
    assert_eq!(report.segments.first().unwrap().index_range.unwrap().0, 1);
    assert_eq!(report.segments.last().unwrap().index_range.unwrap().1, 10);
    let text = report.to_string();
    assert!(text.contains("index 4 term 2"), "{text}");

    let seg = segment_files(dir.path())[0].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[1536 + 200] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let report = inspect(dir.path()).unwrap();
    let damage = report.segments[0].damage.as_deref().unwrap_or("");
    assert!(damage.contains("checksum"), "{report}");
}

#[test]
fn sync_with_nothing_written_touches_no_file() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    s.sync().unwrap();
    let ops = disk.mutating_ops();
    for _ in 0..100 {
        s.sync().unwrap();
    }
    s.set_hard_state(HardState::default()).unwrap(); // unchanged: nothing to record
    s.sync().unwrap();
    assert_eq!(disk.mutating_ops(), ops, "idle syncs are free");
    s.append(&entries(4, 40, 1)).unwrap();
    s.sync().unwrap();
    assert_eq!(
        disk.mutating_ops(),
        ops + 3,
        "one write and one fdatasync per sync, then the watermark's write"
    );
}

#[test]
fn crash_debris_opens_fine_snapshot_without_compaction() {
    let disk = SimDisk::new();
    let log: Vec<Entry> = (1..=12).map(|i| kib_entry(i, 1)).collect();
    let segments = {
        let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
        s.append(&log).unwrap();
        s.sync().unwrap();
        s.save_snapshot(SnapshotMeta { index: 9, term: 1 }, b"nine")
            .unwrap();
        s.segment_count() // the process dies before compact()
    };
    disk.crash(3);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert_eq!(s.segment_count(), segments, "old segments still there");
    assert_eq!((s.first_index(), s.last_index()), (10, 12));
    assert_eq!(all(&s), log[9..].to_vec());
    assert_eq!(s.snapshot().unwrap().unwrap().1, b"nine".to_vec());
}

#[test]
fn crash_debris_opens_fine_empty_new_segment() {
    let disk = SimDisk::new();
    {
        let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
        s.set_hard_state(HardState {
            term: 4,
            vote: Some(1),
        })
        .unwrap();
        let mut i = 1;
        while s.segment_count() == 1 {
            s.append(&[kib_entry(i, 4)]).unwrap(); // the roll syncs the full segment
            i += 1;
        }
        // The new segment exists (created, synced, named) but its first records never were.
    }
    disk.crash(5);
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert_eq!(s.segment_count(), 2);
    let state = s.initial_state().unwrap();
    assert_eq!(
        state.hard_state,
        HardState {
            term: 4,
            vote: Some(1)
        }
    );
    let last = state.last_index;
    assert!(last >= 2, "entries of the full segment are durable");
    assert_eq!(
        all(&s),
        (1..=last).map(|i| kib_entry(i, 4)).collect::<Vec<_>>()
    );
    s.append(&[kib_entry(last + 1, 4)]).unwrap();
    s.sync().unwrap();
    // The hard state also lives in the new segment now, so the old one can go.
    s.save_snapshot(
        SnapshotMeta {
            index: last + 1,
            term: 4,
        },
        b"",
    )
    .unwrap();
    s.compact(last + 1).unwrap();
    assert_eq!(s.segment_count(), 1);
    drop(s);
    disk.crash(6);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert_eq!(
        s.initial_state().unwrap().hard_state,
        HardState {
            term: 4,
            vote: Some(1)
        }
    );
}

#[test]
fn crash_debris_opens_fine_snapshot_renamed_but_log_not_reset() {
    let disk = SimDisk::new();
    {
        let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
        s.append(&entries(1, 10, 1)).unwrap();
        s.sync().unwrap();
        // save_snapshot: create, placeholder header, data, header, fdatasync, rename, fsync
        // dir: then the marker.
        disk.crash_after(7);
        assert!(s
            .save_snapshot(SnapshotMeta { index: 20, term: 5 }, b"twenty")
            .is_err());
    }
    disk.crash(0);
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert!(
        s.recovery_report().discarded_log,
        "the log behind the snapshot is discarded"
    );
    assert_eq!((s.first_index(), s.last_index()), (21, 20));
    s.append(&entries(21, 22, 5)).unwrap();
    s.sync().unwrap();
    drop(s);
    disk.crash(1);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert!(!s.recovery_report().discarded_log);
    assert_eq!(
        all(&s),
        entries(21, 22, 5),
        "new entries after the reset survive"
    );
}

#[test]
fn a_full_disk_during_an_overwrite_leaves_memory_and_disk_agreeing() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    let log: Vec<Entry> = (1..=10).map(|i| kib_entry(i, 1)).collect();
    s.append(&log).unwrap();
    s.sync().unwrap();
    disk.set_no_space(true);
    let huge = Entry {
        index: 5,
        term: 2,
        payload: EntryPayload::Command(vec![2u8; 6000].into()), // needs a segment of its own
    };
    assert!(matches!(
        s.append(std::slice::from_ref(&huge)),
        Err(StorageError::NoSpace { .. })
    ));
    assert_eq!(all(&s), log, "the failed overwrite changed nothing");
    disk.set_no_space(false);
    s.sync().unwrap();
    drop(s);
    disk.crash(2);
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert_eq!(all(&s), log);
    s.append(std::slice::from_ref(&huge)).unwrap();
    s.sync().unwrap();
    let mut expect = log[..4].to_vec();
    expect.push(huge);
    assert_eq!(all(&s), expect);
}

/// A FileStorage that is closed and reopened from disk after every call that makes writes
/// durable, so the conformance suite also checks that everything it synced reads back the
/// same after a restart. While a snapshot is being written it does not restart at `sync`
/// (a restart would legitimately discard the partial snapshot).
struct Reopening {
    disk: SimDisk,
    dir: PathBuf,
    inner: Option<FileStorage>,
    receiving_snapshot: bool,
}

impl Reopening {
    fn new(disk: SimDisk, dir: PathBuf) -> Self {
        let inner = FileStorage::open_simulated(&disk, &dir, opts()).unwrap();
        Reopening {
            disk,
            dir,
            inner: Some(inner),
            receiving_snapshot: false,
        }
    }
    fn s(&self) -> &FileStorage {
        self.inner.as_ref().unwrap()
    }
    fn s_mut(&mut self) -> &mut FileStorage {
        self.inner.as_mut().unwrap()
    }
    /// Restart: drop, lose power (nothing is unsynced here), reopen, compare.
    fn reopen(&mut self) {
        let before = self.s().initial_state().unwrap();
        let log = all(self.s());
        let snapshot = self.s().snapshot().unwrap();
        self.inner = None;
        self.disk.crash(before.last_index);
        let s = FileStorage::open_simulated(&self.disk, &self.dir, opts()).unwrap();
        assert_eq!(s.initial_state().unwrap(), before, "state after restart");
        assert_eq!(all(&s), log, "log after restart");
        assert_eq!(s.snapshot().unwrap(), snapshot, "snapshot after restart");
        self.inner = Some(s);
    }
}

impl Storage for Reopening {
    fn initial_state(&self) -> Result<raftkv::storage::InitialState, StorageError> {
        self.s().initial_state()
    }
    fn first_index(&self) -> Index {
        self.s().first_index()
    }
    fn last_index(&self) -> Index {
        self.s().last_index()
    }
    fn term(&self, index: Index) -> Result<u64, StorageError> {
        self.s().term(index)
    }
    fn entries(&self, lo: Index, hi: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.s().entries(lo, hi, max_bytes)
    }
    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.s_mut().set_hard_state(hard_state)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.s_mut().append(entries)
    }
    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.s_mut().truncate_suffix(from)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.s_mut().sync()?;
        if !self.receiving_snapshot {
            self.reopen();
        }
        Ok(())
    }
    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.receiving_snapshot = true;
        self.s_mut().write_snapshot_chunk(meta, offset, data)
    }
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.s_mut().install_snapshot(meta)?;
        self.receiving_snapshot = false;
        self.reopen();
        Ok(())
    }
    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.s().read_snapshot(offset, len)
    }
    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.s_mut().compact(through)?;
        if !self.receiving_snapshot {
            self.reopen();
        }
        Ok(())
    }
    fn persisted_size(&self) -> raftkv::storage::PersistedSize {
        self.s().persisted_size()
    }
}

#[test]
fn file_storage_passes_the_conformance_suite_restarting_after_every_sync() {
    let disk = SimDisk::new();
    let mut n = 0;
    storage_conformance(|| {
        n += 1;
        Reopening::new(disk.clone(), PathBuf::from(format!("/restart{n}")))
    });
}

/// A file system smaller than one segment: the default 64 MiB segment does not fit, so the
/// first one is made smaller and the storage opens; it fills the disk, fails cleanly with
/// `NoSpace`, and while it stays full no retry leaves a half-preallocated segment taking the
/// last free space. Once space returns, writing resumes and everything synced is durable.
#[test]
fn a_disk_smaller_than_a_segment_starts_fills_and_resumes() {
    let disk = SimDisk::new();
    let capacity = 256u64 << 10;
    disk.set_capacity(Some(capacity));
    let o = FileStorageOptions {
        cluster_id: 7,
        node_id: 3,
        ..Default::default()
    };
    assert_eq!(o.segment_size, 64 << 20, "the default does not fit");
    let mut s = FileStorage::open_simulated(&disk, "/n", o).expect("starts on a small disk");
    assert!(disk.used_bytes() <= capacity);
    let no_tmp = |disk: &SimDisk| {
        let names = disk.files();
        assert!(
            names.iter().all(|p| !p.to_string_lossy().ends_with(".tmp")),
            "{names:?}"
        );
    };
    let mut synced = Vec::new();
    let mut next = 1;
    let full = loop {
        let entry = kib_entry(next, 1);
        let r = s
            .append(std::slice::from_ref(&entry))
            .and_then(|_| s.sync());
        match r {
            Ok(()) => {
                synced.push(entry);
                next += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(full, StorageError::NoSpace { .. }), "{full}");
    assert!(
        synced.len() > 100,
        "the disk was used ({} entries)",
        synced.len()
    );
    no_tmp(&disk);
    let used = disk.used_bytes();
    // Paused on a full disk: every retry fails the same way and takes nothing.
    for _ in 0..20 {
        let r = s.append(&[kib_entry(next, 1)]).and_then(|_| s.sync());
        assert!(matches!(r, Err(StorageError::NoSpace { .. })));
        no_tmp(&disk);
        assert_eq!(disk.used_bytes(), used, "a failed retry holds no space");
    }
    // Space returns.
    disk.set_capacity(Some(4 * capacity));
    let last = s.last_index();
    let more: Vec<Entry> = (last + 1..last + 40).map(|i| kib_entry(i, 1)).collect();
    s.append(&more).unwrap();
    s.sync().unwrap();
    let expect: Vec<Entry> = synced.iter().cloned().chain(more).collect();
    assert_eq!(
        all(&s),
        expect,
        "nothing of the failed retries, everything else"
    );
    drop(s);
    disk.crash(11);
    let s = FileStorage::open_simulated(&disk, "/n", o).unwrap();
    assert_eq!(all(&s), expect, "everything synced is durable");
}

/// Opening on a disk with no room even for the smallest segment fails with `NoSpace` and
/// leaves nothing behind.
#[test]
fn no_room_for_any_segment_is_no_space() {
    let disk = SimDisk::new();
    disk.set_capacity(Some(2048));
    assert!(matches!(
        FileStorage::open_simulated(&disk, "/n", opts()),
        Err(StorageError::NoSpace { .. })
    ));
    assert!(disk.files().is_empty(), "{:?}", disk.files());
    disk.set_capacity(None);
    FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
}
