//! Damaged files: FileStorage either opens with the right data or fails with a typed error
//! (`Corrupt` / `WrongIdentity`) naming the file; it never panics and never returns wrong data.
//!
//! A pristine directory (several segments, a snapshot, a compacted log, overwritten and
//! truncated entries, several hard states) is damaged on purpose: single bit flips at many
//! offsets of every file, truncations and extensions, missing segments, and random damage
//! (`RAFTKV_CORRUPTION_CASES` cases, 2000 by default). The only damage that may open without
//! error is damage that looks exactly like a crash during the last write: the last record of
//! the newest segment failing its checksum with only zeroes after it is cut as a torn tail.

use std::path::{Path, PathBuf};

use raftkv::error::StorageError;
use raftkv::raft::{Entry, EntryPayload, HardState, Index, SnapshotMeta};
use raftkv::storage::file::sim::SplitMix64;
use raftkv::storage::{FileStorage, FileStorageOptions, Storage};

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 11,
        node_id: 5,
        segment_size: 4096,
        cache_bytes: 0,
        ..Default::default()
    }
}

fn e(index: Index, term: u64) -> Entry {
    Entry {
        index,
        term,
        payload: EntryPayload::Command(vec![(index as u8).wrapping_mul(31); 300].into()),
    }
}

#[derive(Debug, PartialEq)]
struct State {
    hard_state: HardState,
    snapshot: (SnapshotMeta, Vec<u8>),
    log: Vec<Entry>,
}

fn read_state(s: &FileStorage) -> Result<State, StorageError> {
    let st = s.initial_state()?;
    Ok(State {
        hard_state: st.hard_state,
        snapshot: s.snapshot()?.unwrap_or_default(),
        log: s.entries(st.first_index, st.last_index + 1, u64::MAX)?,
    })
}

/// Builds the pristine directory; returns its files (name, bytes) and the expected state.
fn pristine() -> (Vec<(String, Vec<u8>)>, State) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = FileStorage::open(dir.path(), opts()).unwrap();
    s.set_hard_state(HardState {
        term: 1,
        vote: Some(1),
    })
    .unwrap();
    s.append(&(1..=30).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync().unwrap();
    s.save_snapshot(
        SnapshotMeta { index: 25, term: 1 },
        b"the state machine at 25",
    )
    .unwrap();
    s.compact(25).unwrap();
    s.truncate_suffix(28).unwrap();
    s.append(&(28..=40).map(|i| e(i, 2)).collect::<Vec<_>>())
        .unwrap();
    s.set_hard_state(HardState {
        term: 2,
        vote: Some(3),
    })
    .unwrap();
    s.sync().unwrap();
    s.set_hard_state(HardState {
        term: 3,
        vote: Some(2),
    })
    .unwrap();
    s.append(&(41..=60).map(|i| e(i, 3)).collect::<Vec<_>>())
        .unwrap();
    s.sync().unwrap();
    let expected = read_state(&s).unwrap();
    drop(s);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|d| {
            let d = d.unwrap();
            (
                d.file_name().into_string().unwrap(),
                std::fs::read(d.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    let names: Vec<&String> = files.iter().map(|f| &f.0).collect();
    assert!(
        files.iter().filter(|f| f.0.ends_with(".log")).count() >= 3,
        "several segments: {names:?}"
    );
    assert!(files.iter().any(|f| f.0.ends_with(".snap")), "a snapshot");
    assert!(
        !files.iter().any(|f| f.0 == "seg-00000000000000000001.log"),
        "a compacted log"
    );
    (files, expected)
}

fn write_all(dir: &Path, files: &[(String, Vec<u8>)]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// What an open of damaged files may give.
enum Outcome {
    Exact,
    TornLastEntry,
    Prefix,
    Refused,
}

fn judge(dir: &Path, expected: &State, what: &str) -> Outcome {
    let s = match FileStorage::open(dir, opts()) {
        Ok(s) => s,
        Err(StorageError::Corrupt { path, .. } | StorageError::WrongIdentity { path, .. }) => {
            assert!(
                path.starts_with(dir),
                "{what}: error names a file of the directory"
            );
            return Outcome::Refused;
        }
        Err(other) => panic!("{what}: untyped error {other}"),
    };
    let got = match read_state(&s) {
        Ok(got) => got,
        Err(StorageError::Corrupt { .. }) => return Outcome::Refused, // damage found on read
        Err(other) => panic!("{what}: read failed with {other}"),
    };
    if &got == expected {
        return Outcome::Exact;
    }
    let minus_last = &expected.log[..expected.log.len() - 1];
    if s.recovery_report().torn_tail.is_some()
        && got.log == minus_last
        && got.snapshot == expected.snapshot
    {
        return Outcome::TornLastEntry;
    }
    let hs_ok = got.hard_state == expected.hard_state
        || got.hard_state
            == HardState {
                term: 2,
                vote: Some(3),
            };
    if got.snapshot == expected.snapshot
        && expected.log.starts_with(&got.log)
        && got.log.len() >= 2
        && hs_ok
    {
        return Outcome::Prefix;
    }
    panic!(
        "{what}: opened with wrong data: hs {:?} snap {:?} log {:?}",
        got.hard_state,
        got.snapshot.0,
        got.log
            .iter()
            .map(|x| (x.index, x.term))
            .collect::<Vec<_>>()
    );
}

#[test]
fn pristine_directory_opens_exactly() {
    let (files, expected) = pristine();
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), &files);
    assert!(matches!(
        judge(dir.path(), &expected, "pristine"),
        Outcome::Exact
    ));
}

#[test]
fn single_bit_flips_in_every_file_are_detected_or_harmless() {
    let (files, expected) = pristine();
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), &files);
    let newest = files
        .iter()
        .filter(|f| f.0.ends_with(".log"))
        .map(|f| f.0.clone())
        .max()
        .unwrap();
    let (mut refused, mut torn) = (0, 0);
    for (name, bytes) in &files {
        let path: PathBuf = dir.path().join(name);
        let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let offsets =
            (0..bytes.len()).filter(|&o| o < 64 || (o < used + 16 && o % 3 == 0) || o % 97 == 0);
        for offset in offsets {
            let mut damaged = bytes.clone();
            damaged[offset] ^= 1 << (offset % 8);
            std::fs::write(&path, &damaged).unwrap();
            match judge(
                dir.path(),
                &expected,
                &format!("{name} bit flip at {offset}"),
            ) {
                Outcome::Exact => panic!("{name}: flip at {offset} went unnoticed"),
                Outcome::TornLastEntry => {
                    assert_eq!(
                        name, &newest,
                        "only the newest segment may have a torn tail"
                    );
                    torn += 1;
                }
                Outcome::Prefix => panic!("{name}: flip at {offset} lost entries silently"),
                Outcome::Refused => refused += 1,
            }
            std::fs::write(&path, bytes).unwrap();
        }
    }
    assert!(
        refused > 1000 && torn > 50,
        "refused {refused}, torn {torn}"
    );
}

#[test]
fn truncated_or_extended_files_are_refused() {
    let (files, expected) = pristine();
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), &files);
    for (name, bytes) in &files {
        let path = dir.path().join(name);
        let lens = (0..bytes.len()).step_by(61).chain([
            bytes.len() - 1,
            bytes.len() + 1,
            bytes.len() + 4096,
        ]);
        for len in lens {
            let mut damaged = bytes.clone();
            damaged.resize(len, 0);
            std::fs::write(&path, &damaged).unwrap();
            let outcome = judge(dir.path(), &expected, &format!("{name} resized to {len}"));
            assert!(
                matches!(outcome, Outcome::Refused),
                "{name} resized to {len} was accepted"
            );
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

#[test]
fn a_missing_middle_segment_or_a_foreign_file_is_refused() {
    let (files, expected) = pristine();
    let dir = tempfile::tempdir().unwrap();
    let segments: Vec<usize> = (0..files.len())
        .filter(|&i| files[i].0.ends_with(".log"))
        .collect();
    let mut without = files.clone();
    without.remove(segments[1]);
    write_all(dir.path(), &without);
    assert!(matches!(
        judge(dir.path(), &expected, "missing segment"),
        Outcome::Refused
    ));
    // Without its first retained segment the log no longer reaches the snapshot.
    let mut without_first = files.clone();
    without_first.remove(segments[0]);
    write_all(dir.path(), &without_first);
    assert!(matches!(
        judge(dir.path(), &expected, "missing first segment"),
        Outcome::Refused
    ));
    // A snapshot without any segment: the hard state would be lost.
    let only_snapshot: Vec<(String, Vec<u8>)> = files
        .iter()
        .filter(|f| f.0.ends_with(".snap"))
        .cloned()
        .collect();
    write_all(dir.path(), &only_snapshot);
    assert!(matches!(
        judge(dir.path(), &expected, "no segments"),
        Outcome::Refused
    ));
    // A segment copied from another position has the wrong sequence number.
    let mut swapped = files.clone();
    swapped[segments[1]].1 = files[segments[0]].1.clone();
    write_all(dir.path(), &swapped);
    assert!(matches!(
        judge(dir.path(), &expected, "copied segment"),
        Outcome::Refused
    ));
}

#[test]
fn random_damage_never_panics_and_never_returns_wrong_data() {
    let cases: u64 = std::env::var("RAFTKV_CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let (files, expected) = pristine();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(0x5eed);
    let (mut refused, mut accepted) = (0u64, 0u64);
    for case in 0..cases {
        let seed = rng.next_u64();
        let mut r = SplitMix64::new(seed);
        let mut damaged = files.clone();
        let victim = r.below(damaged.len() as u64) as usize;
        let bytes = &mut damaged[victim].1;
        let len = bytes.len() as u64;
        let what = match r.below(5) {
            0 => {
                for _ in 0..=r.below(8) {
                    let at = r.below(len) as usize;
                    bytes[at] = r.next_u64() as u8;
                }
                "random bytes"
            }
            1 => {
                let at = r.below(len);
                let n = r.below(len - at + 1);
                bytes[at as usize..(at + n) as usize].fill(0);
                "zeroed range"
            }
            2 => {
                let at = r.below(len) as usize;
                bytes.truncate(at);
                "truncated"
            }
            3 => {
                let at = r.below(len.saturating_sub(8)) as usize;
                let v = r.next_u64().to_le_bytes();
                bytes[at..at + 8].copy_from_slice(&v);
                "random word"
            }
            _ => {
                let at = r.below(len) as usize;
                bytes[at] ^= 0xff;
                "inverted byte"
            }
        };
        write_all(dir.path(), &damaged);
        let label = format!(
            "case {case} (seed {seed:#x}): {what} in {}",
            damaged[victim].0
        );
        match judge(dir.path(), &expected, &label) {
            Outcome::Refused => refused += 1,
            _ => accepted += 1,
        }
    }
    assert_eq!(refused + accepted, cases);
    assert!(
        cases < 100 || refused > cases / 2,
        "most random damage is refused ({refused}/{cases})"
    );
}
