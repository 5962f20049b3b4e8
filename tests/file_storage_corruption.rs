//! Damaged files: FileStorage either opens with the right data or fails with a typed error
//! (`Corrupt` / `WrongIdentity` / `UnsupportedFormat`) naming the file; it never panics, never
//! returns wrong data, and never opens with a silently shorter synced log.
//!
//! A pristine directory (several segments, a snapshot, a compacted log, overwritten and
//! truncated entries, several hard states, a tail-loss record from an earlier recovery, and a
//! newest segment with more than 9 KB of records) is damaged on purpose, every byte of it
//! synced: single bit flips at many offsets of every file; **every offset of the newest
//! segment's synced tail** flipped, zeroed from there to the end, zeroed over a short range and
//! truncated there; the attack of issue 11 (the last ~200 bytes and the last ~9 KB of the used
//! region zeroed); truncations and extensions; missing files; and random damage of each file
//! kind (`RAFTKV_CORRUPTION_CASES` cases per kind, 400 by default; CI runs 10,000).
//!
//! The directories live in `/dev/shm` when there is one (RAM: these tests check what recovery
//! makes of damaged bytes, not what fsync does — the simulated disk tests that — and they
//! open directories tens of thousands of times), else in the system temp directory.
//!
//! The rule under test (see `src/storage/file/segment.rs`): only bytes that were never synced
//! — above the newest segment's synced watermark — may be cut as a torn write. In this
//! directory that is only the zero-filled space after the log: damage there may open with
//! the exact state and a reported torn tail. Everything else must be refused.

use std::path::{Path, PathBuf};

use raftkv::error::StorageError;
use raftkv::raft::{Entry, EntryPayload, HardState, Index, SnapshotMeta};
use raftkv::storage::file::inspect::inspect;
use raftkv::storage::file::sim::SplitMix64;
use raftkv::storage::{FileStorage, FileStorageOptions, Storage, TailLoss};

/// First record offset of a segment (format version 2).
const RECORDS_START: usize = 1536;

/// A scratch directory, in RAM when the machine has `/dev/shm`.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("raftkv-corruption-")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 11,
        node_id: 5,
        segment_size: 16 << 10,
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
    tail_loss: Option<TailLoss>,
}

fn read_state(s: &FileStorage) -> Result<State, StorageError> {
    let st = s.initial_state()?;
    Ok(State {
        hard_state: st.hard_state,
        snapshot: s.snapshot()?.unwrap_or_default(),
        log: s.entries(st.first_index, st.last_index + 1, u64::MAX)?,
        tail_loss: s.tail_loss(),
    })
}

/// The pristine directory: its files (name, bytes), the state it opens to, the newest
/// segment's name and its synced watermark.
struct Pristine {
    files: Vec<(String, Vec<u8>)>,
    expected: State,
    newest: String,
    synced_through: usize,
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|d| {
            let d = d.unwrap();
            (
                d.file_name().into_string().unwrap(),
                std::fs::read(d.path()).unwrap(),
            )
        })
        .filter(|f| f.0 != "LOCK") // the lock file holds no data
        .collect();
    files.sort();
    files
}

fn pristine() -> Pristine {
    let dir = scratch();
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.set_hard_state(HardState {
            term: 1,
            vote: Some(1),
        })
        .unwrap();
        s.append(&(1..=100).map(|i| e(i, 1)).collect::<Vec<_>>())
            .unwrap();
        s.sync().unwrap();
        s.save_snapshot(
            SnapshotMeta { index: 60, term: 1 },
            b"the state machine at 60",
        )
        .unwrap();
        s.compact(60).unwrap();
        s.truncate_suffix(90).unwrap();
        s.append(&(90..=110).map(|i| e(i, 2)).collect::<Vec<_>>())
            .unwrap();
        s.set_hard_state(HardState {
            term: 2,
            vote: Some(3),
        })
        .unwrap();
        s.sync().unwrap();
    }
    // An earlier disk fault, repaired by recovery mode: the last record (the hard state of
    // term 2) damaged. The watermark still knows that hard state.
    let newest = inspect(dir.path()).unwrap().segments.pop().unwrap();
    let mut bytes = std::fs::read(&newest.path).unwrap();
    bytes[newest.used_bytes as usize - 5] ^= 0x08;
    std::fs::write(&newest.path, &bytes).unwrap();
    let recover = FileStorageOptions {
        recover_damaged_tail: true,
        ..opts()
    };
    {
        let mut s = FileStorage::open(dir.path(), recover).unwrap();
        assert_eq!(
            s.tail_loss(),
            Some(TailLoss {
                intact_through: 110,
                hard_state_lost: false
            })
        );
        assert_eq!(
            s.initial_state().unwrap().hard_state,
            HardState {
                term: 2,
                vote: Some(3)
            }
        );
        s.set_hard_state(HardState {
            term: 3,
            vote: Some(2),
        })
        .unwrap();
        s.append(&(105..=120).map(|i| e(i, 3)).collect::<Vec<_>>())
            .unwrap();
        s.sync().unwrap();
        // Enough for a roll and more than 9 KB of records in the newest segment.
        let mut next = 121;
        loop {
            let info = inspect(dir.path()).unwrap();
            let newest = info.segments.last().unwrap();
            if info.segments.len() >= 3 && newest.used_bytes > RECORDS_START as u64 + (19 << 9) {
                break;
            }
            s.append(&(next..next + 3).map(|i| e(i, 3)).collect::<Vec<_>>())
                .unwrap();
            s.sync().unwrap();
            next += 3;
        }
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    let expected = read_state(&s).unwrap();
    drop(s);
    let files = files_of(dir.path());
    let names: Vec<&String> = files.iter().map(|f| &f.0).collect();
    assert!(
        files.iter().filter(|f| f.0.ends_with(".log")).count() >= 3,
        "several segments: {names:?}"
    );
    assert!(files.iter().any(|f| f.0.ends_with(".snap")), "a snapshot");
    assert!(files.iter().any(|f| f.0 == "tail-loss"), "a tail-loss file");
    assert!(
        !files.iter().any(|f| f.0 == "seg-00000000000000000001.log"),
        "a compacted log"
    );
    let info = inspect(dir.path()).unwrap();
    let newest = info.segments.last().unwrap();
    assert_eq!(newest.synced_through, Some(newest.used_bytes), "{info}");
    assert!(expected.tail_loss.is_some());
    Pristine {
        newest: newest
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        synced_through: newest.used_bytes as usize,
        files,
        expected,
    }
}

fn write_all(dir: &Path, files: &[(String, Vec<u8>)]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// What an open of damaged files gave.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A typed error naming a file of the directory.
    Refused,
    /// The exact state, with a torn tail (never-synced bytes) cut and reported.
    CutUnsynced,
}

/// Opens the damaged directory: a typed refusal, or the exact state with only never-synced
/// bytes cut. Anything else — a panic, an untyped error, other data, a shorter log — fails.
fn judge(dir: &Path, p: &Pristine, what: &str) -> Outcome {
    let s = match FileStorage::open(dir, opts()) {
        Ok(s) => s,
        Err(
            StorageError::Corrupt { path, .. }
            | StorageError::WrongIdentity { path, .. }
            | StorageError::UnsupportedFormat { path, .. },
        ) => {
            assert!(
                path.starts_with(dir),
                "{what}: error names a file of the directory ({})",
                path.display()
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
    if got != p.expected {
        panic!(
            "{what}: opened with other data (a silently shorter synced log?): hs {:?} snap {:?} \
             tail loss {:?} log {:?}",
            got.hard_state,
            got.snapshot.0,
            got.tail_loss,
            got.log
                .iter()
                .map(|x| (x.index, x.term))
                .collect::<Vec<_>>()
        );
    }
    match &s.recovery_report().torn_tail {
        Some(torn) => {
            assert!(
                torn.path.ends_with(&p.newest) && torn.offset as usize >= p.synced_through,
                "{what}: cut {torn:?}, which is not above the newest synced watermark {}",
                p.synced_through
            );
            Outcome::CutUnsynced
        }
        None => panic!("{what}: the damage went unnoticed"),
    }
}

/// Judges `damaged` (a changed copy of the pristine files, which `dir` holds): writes the
/// files that differ, opens, then puts the pristine files back. `None` if the change left
/// every byte as it was.
fn damage_and_judge(
    dir: &Path,
    p: &Pristine,
    damaged: &[(String, Vec<u8>)],
    what: &str,
) -> Option<Outcome> {
    if damaged == p.files.as_slice() {
        return None;
    }
    let changed: Vec<usize> = (0..p.files.len())
        .filter(|&i| damaged[i] != p.files[i])
        .collect();
    for &i in &changed {
        std::fs::write(dir.join(&damaged[i].0), &damaged[i].1).unwrap();
    }
    let outcome = judge(dir, p, what);
    for (name, bytes) in &p.files {
        if changed.iter().any(|&i| &p.files[i].0 == name) || name == &p.newest {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    Some(outcome)
}

fn with_file(
    p: &Pristine,
    name: &str,
    change: impl FnOnce(&mut Vec<u8>),
) -> Vec<(String, Vec<u8>)> {
    let mut files = p.files.clone();
    let f = files.iter_mut().find(|f| f.0 == name).unwrap();
    change(&mut f.1);
    files
}

fn env_cases(default: u64) -> u64 {
    std::env::var("RAFTKV_CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn pristine_directory_opens_exactly() {
    let p = pristine();
    let dir = scratch();
    write_all(dir.path(), &p.files);
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(read_state(&s).unwrap(), p.expected);
    assert_eq!(s.recovery_report().torn_tail, None);
}

#[test]
fn single_bit_flips_in_every_file_are_detected() {
    let p = pristine();
    let dir = scratch();
    write_all(dir.path(), &p.files);
    let (mut refused, mut cut) = (0, 0);
    for (name, bytes) in &p.files {
        let offsets = (0..bytes.len()).filter(|&o| o < 1600 || o % 7 == 0);
        for offset in offsets {
            let damaged = with_file(&p, name, |b| b[offset] ^= 1 << (offset % 8));
            let what = format!("{name} bit flip at {offset}");
            match damage_and_judge(dir.path(), &p, &damaged, &what) {
                Some(Outcome::Refused) => refused += 1,
                Some(Outcome::CutUnsynced) => {
                    assert_eq!(name, &p.newest, "{what}: only the newest segment is cut");
                    cut += 1;
                }
                None => unreachable!("a flip changes a byte"),
            }
        }
    }
    assert!(refused > 3000 && cut > 100, "refused {refused}, cut {cut}");
}

/// A way to damage a file's bytes.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// Every offset of the newest segment's synced records: a flipped bit there, the log zeroed
/// from there to its end, a short range zeroed, the file truncated there. All of it was
/// synced: every case is refused, none is cut.
#[test]
fn every_offset_of_the_synced_tail_is_damage_never_a_tear() {
    let p = pristine();
    let dir = scratch();
    write_all(dir.path(), &p.files);
    let w = p.synced_through;
    // Every offset in CI; a stride below that (but always the last 200 bytes whole).
    let stride = if env_cases(400) >= 10_000 { 1 } else { 11 };
    let offsets: Vec<usize> = (RECORDS_START..w)
        .filter(|&o| o % stride == 0 || o + 200 >= w)
        .collect();
    let mut cases = 0;
    for &o in &offsets {
        let len = 1 + o % 23;
        let damages: [(&str, Damage); 4] = [
            ("bit flip", Box::new(move |b| b[o] ^= 1 << (o % 8))),
            (
                "zeroed to the end of the log",
                Box::new(move |b| b[o..w].fill(0)),
            ),
            (
                "zeroed range",
                Box::new(move |b| b[o..(o + len).min(w)].fill(0)),
            ),
            ("truncated", Box::new(move |b| b.truncate(o))),
        ];
        for (kind, damage) in damages {
            let damaged = with_file(&p, &p.newest, |b| damage(b));
            let what = format!("{} {kind} at {o} (synced through {w})", p.newest);
            match damage_and_judge(dir.path(), &p, &damaged, &what) {
                Some(Outcome::Refused) | None => {}
                Some(Outcome::CutUnsynced) => panic!("{what}: synced bytes cut as a tear"),
            }
            cases += 1;
        }
    }
    eprintln!(
        "synced tail: {cases} damages over {} offsets, all refused",
        offsets.len()
    );
}

/// Issue 11's attack on one node's disk: the last ~200 bytes, or the last ~9 KB, of the used
/// region of the newest segment zeroed or bit-flipped. Refused, naming the segment and an
/// offset inside the damage.
#[test]
fn the_attack_of_issue_11_is_refused_naming_file_and_offset() {
    let p = pristine();
    let dir = scratch();
    let w = p.synced_through;
    assert!(w - RECORDS_START > 9 << 10, "more than 9 KB of records");
    for (what, from) in [("last 200 bytes", w - 200), ("last 9 KB", w - (9 << 10))] {
        for zero in [true, false] {
            let damaged = with_file(&p, &p.newest, |b| {
                for x in &mut b[from..w] {
                    *x = if zero { 0 } else { *x ^ 0x01 };
                }
            });
            write_all(dir.path(), &damaged);
            match FileStorage::open(dir.path(), opts()) {
                Err(StorageError::Corrupt {
                    path,
                    offset,
                    reason,
                }) => {
                    assert!(path.ends_with(&p.newest), "{what}: {}", path.display());
                    assert!(
                        offset as usize >= from.saturating_sub(400) && (offset as usize) < w,
                        "{what}: offset {offset} not at the damage ({from}..{w})"
                    );
                    assert!(reason.contains("recover_damaged_tail"), "{reason}");
                }
                Err(other) => panic!("{what}: {other}"),
                Ok(s) => panic!("{what}: opened with log ..={}", s.last_index()),
            }
        }
    }
}

#[test]
fn truncated_or_extended_files_are_refused() {
    let p = pristine();
    let dir = scratch();
    write_all(dir.path(), &p.files);
    for (name, bytes) in &p.files {
        let lens = (0..bytes.len()).step_by(61).chain([
            bytes.len() - 1,
            bytes.len() + 1,
            bytes.len() + 4096,
        ]);
        for len in lens {
            let damaged = with_file(&p, name, |b| b.resize(len, 0));
            let what = format!("{name} resized to {len}");
            assert_eq!(
                damage_and_judge(dir.path(), &p, &damaged, &what),
                Some(Outcome::Refused),
                "{what}"
            );
        }
    }
}

#[test]
fn missing_files_and_foreign_or_old_format_files_are_refused() {
    let p = pristine();
    let dir = scratch();
    let segments: Vec<usize> = (0..p.files.len())
        .filter(|&i| p.files[i].0.ends_with(".log"))
        .collect();
    let expect_refused = |files: &[(String, Vec<u8>)], what: &str| {
        write_all(dir.path(), files);
        assert_eq!(judge(dir.path(), &p, what), Outcome::Refused, "{what}");
    };
    let mut without = p.files.clone();
    without.remove(segments[1]);
    expect_refused(&without, "missing segment");
    // Without its first retained segment the log no longer reaches the snapshot.
    let mut without_first = p.files.clone();
    without_first.remove(segments[0]);
    expect_refused(&without_first, "missing first segment");
    // A snapshot without any segment: the hard state would be lost.
    let only_snapshot: Vec<(String, Vec<u8>)> = p
        .files
        .iter()
        .filter(|f| f.0.ends_with(".snap"))
        .cloned()
        .collect();
    expect_refused(&only_snapshot, "no segments");
    // A segment copied from another position has the wrong sequence number.
    let mut swapped = p.files.clone();
    swapped[segments[1]].1 = p.files[segments[0]].1.clone();
    expect_refused(&swapped, "copied segment");
    // The snapshot deleted: reported against the snapshot, not a segment.
    let without_snapshot: Vec<(String, Vec<u8>)> = p
        .files
        .iter()
        .filter(|f| !f.0.ends_with(".snap"))
        .cloned()
        .collect();
    write_all(dir.path(), &without_snapshot);
    match FileStorage::open(dir.path(), opts()) {
        Err(StorageError::Corrupt { path, reason, .. }) => {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(path.starts_with(dir.path()), "{}", path.display());
            assert!(
                name.starts_with("snap-") && name.ends_with(".snap"),
                "reported against a snapshot file: {name}: {reason}"
            );
            assert!(reason.contains("snapshot"), "{reason}");
        }
        other => panic!("deleted snapshot: {other:?}"),
    }
    // The format version of every file kind: an intact header of another version is another
    // format; a flipped version byte is damage at offset 8.
    for (name, _) in &p.files {
        let old = with_file(&p, name, |b| {
            b[8..12].copy_from_slice(&1u32.to_le_bytes());
            let crc = crc32fast::hash(&b[0..60]);
            b[60..64].copy_from_slice(&crc.to_le_bytes());
        });
        write_all(dir.path(), &old);
        match FileStorage::open(dir.path(), opts()) {
            Err(StorageError::UnsupportedFormat {
                path,
                version: 1,
                supported: 2,
            }) => assert!(path.ends_with(name)),
            other => panic!("{name} of format version 1: {other:?}"),
        }
        let flipped = with_file(&p, name, |b| b[8] ^= 0x04);
        write_all(dir.path(), &flipped);
        match FileStorage::open(dir.path(), opts()) {
            Err(StorageError::Corrupt { path, offset, .. }) => {
                assert!(path.ends_with(name));
                assert_eq!(offset, 8, "{name}: a flipped version byte names its offset");
            }
            other => panic!("{name} with a flipped version byte: {other:?}"),
        }
    }
}

/// Random damage of each file kind (older segment, newest segment, snapshot, tail-loss file):
/// random bytes, a zeroed range, a truncation, a random word, an inverted byte.
#[test]
fn random_damage_of_each_file_kind_never_panics_and_never_returns_wrong_data() {
    let cases = env_cases(400);
    let p = pristine();
    let dir = scratch();
    write_all(dir.path(), &p.files);
    let kinds: Vec<(&str, String)> = vec![
        (
            "older segment",
            p.files
                .iter()
                .find(|f| f.0.ends_with(".log"))
                .unwrap()
                .0
                .clone(),
        ),
        ("newest segment", p.newest.clone()),
        (
            "snapshot",
            p.files
                .iter()
                .find(|f| f.0.ends_with(".snap"))
                .unwrap()
                .0
                .clone(),
        ),
        ("tail-loss file", "tail-loss".to_string()),
    ];
    let mut rng = SplitMix64::new(0x5eed);
    for (kind, name) in &kinds {
        let (mut refused, mut cut, mut unchanged) = (0u64, 0u64, 0u64);
        for case in 0..cases {
            let seed = rng.next_u64();
            let mut r = SplitMix64::new(seed);
            let mut how = "";
            let damaged = with_file(&p, name, |bytes| {
                let len = bytes.len() as u64;
                how = match r.below(5) {
                    0 => {
                        for _ in 0..=r.below(8) {
                            let at = r.below(len) as usize;
                            bytes[at] = r.next_u64() as u8;
                        }
                        "random bytes"
                    }
                    1 => {
                        let at = r.below(len);
                        let n = r.below(len - at + 1).min(1 + r.below(16 << 10));
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
            });
            let what = format!("{kind} case {case} (seed {seed:#x}): {how} in {name}");
            match damage_and_judge(dir.path(), &p, &damaged, &what) {
                Some(Outcome::Refused) => refused += 1,
                Some(Outcome::CutUnsynced) => {
                    assert_eq!(name, &p.newest, "{what}");
                    cut += 1;
                }
                None => unchanged += 1,
            }
        }
        eprintln!("{kind}: {cases} cases, {refused} refused, {cut} never-synced bytes cut, {unchanged} left the bytes as they were");
        assert_eq!(refused + cut + unchanged, cases);
        assert!(
            cases < 100 || refused > cases / 2,
            "{kind}: most random damage is refused ({refused}/{cases})"
        );
    }
}

#[test]
fn inspect_says_damage_or_torn_tail_by_the_synced_watermark() {
    let p = pristine();
    let dir = scratch();
    let w = p.synced_through;
    // Below the watermark: damage.
    write_all(
        dir.path(),
        &with_file(&p, &p.newest, |b| b[w - 200..w].fill(0)),
    );
    let report = inspect(dir.path()).unwrap();
    let newest = report.segments.last().unwrap();
    assert!(
        newest.damage.is_some() && newest.torn_tail.is_none(),
        "{report}"
    );
    assert!(report.to_string().contains("DAMAGE"), "{report}");
    assert!(report.tail_loss.is_some(), "{report}");
    // Above it: a torn tail.
    write_all(
        dir.path(),
        &with_file(&p, &p.newest, |b| b[w + 10..w + 30].fill(0x77)),
    );
    let report = inspect(dir.path()).unwrap();
    let newest = report.segments.last().unwrap();
    assert_eq!(newest.damage, None, "{report}");
    assert_eq!(newest.torn_tail, Some((w as u64, 30)), "{report}");
    assert!(report.to_string().contains("torn tail"), "{report}");
    let _: PathBuf = newest.path.clone();
}
