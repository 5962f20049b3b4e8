//! Recovery mode (protocol-aware recovery, storage side): damage to the synced tail of the log
//! is cut at the first damaged record instead of refused, the loss is recorded durably first
//! and reported as a `TailLoss` until it is cleared and synced, the snapshot and the intact
//! prefix are kept, and the newest hard state survives when the watermark still holds it. A
//! crash at any point of such a recovery is recovered too. `MemStorage::lose_tail` models the
//! same for the simulation.
//!
//! Real-file directories live in `/dev/shm` when there is one (see
//! `file_storage_corruption.rs`); crash points use the simulated disk.

use std::path::{Path, PathBuf};

use raftkv::error::StorageError;
use raftkv::raft::{Entry, EntryPayload, HardState, Index, SnapshotMeta};
use raftkv::storage::file::inspect::inspect;
use raftkv::storage::file::sim::{SimDisk, SplitMix64};
use raftkv::storage::{FileStorage, FileStorageOptions, MemStorage, Storage, TailLoss};

const RECORDS_START: usize = 1536;

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 3,
        node_id: 2,
        segment_size: 4 << 10,
        cache_bytes: 0,
        ..Default::default()
    }
}

fn recover() -> FileStorageOptions {
    FileStorageOptions {
        recover_damaged_tail: true,
        ..opts()
    }
}

fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("raftkv-recovery-")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

fn e(index: Index, term: u64) -> Entry {
    Entry {
        index,
        term,
        payload: EntryPayload::Command(vec![index as u8; 200].into()),
    }
}

const HS: HardState = HardState {
    term: 4,
    vote: Some(3),
};

#[derive(Clone, Debug, PartialEq)]
struct State {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    log: Vec<Entry>,
    tail_loss: Option<TailLoss>,
}

fn state(s: &FileStorage) -> State {
    let st = s.initial_state().unwrap();
    State {
        hard_state: st.hard_state,
        snapshot: st.snapshot,
        log: s
            .entries(st.first_index, st.last_index + 1, u64::MAX)
            .unwrap(),
        tail_loss: s.tail_loss(),
    }
}

/// Writes the story every test starts from into `s`: a snapshot at 20, entries 21..=60 over
/// several segments, the hard state `HS` last.
fn write_story<S: Storage>(s: &mut S) {
    s.set_hard_state(HardState {
        term: 1,
        vote: Some(1),
    })
    .unwrap();
    s.append(&(1..=40).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync().unwrap();
    s.save_snapshot(SnapshotMeta { index: 20, term: 1 }, b"state at 20")
        .unwrap();
    s.compact(20).unwrap();
    s.append(&(41..=60).map(|i| e(i, 4)).collect::<Vec<_>>())
        .unwrap();
    s.set_hard_state(HS).unwrap();
    s.sync().unwrap();
}

/// One record of a segment image: offset, end, and the entry index if it is an entry.
#[derive(Clone, Copy, Debug)]
struct RecordAt {
    offset: usize,
    end: usize,
    entry: Option<Index>,
}

/// Walks the records of a segment image (format 2: length, crc, postcard payload whose first
/// byte is the variant: 0 hard state, 1 entry, 2 truncate; an entry's index follows as a
/// varint).
fn records(image: &[u8]) -> Vec<RecordAt> {
    let mut out = Vec::new();
    let mut off = RECORDS_START;
    while off + 8 <= image.len() {
        let len = u32::from_le_bytes(image[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        let payload = &image[off + 8..off + 8 + len];
        let entry = (payload[0] == 1).then(|| {
            let (mut v, mut shift) = (0u64, 0);
            for &b in &payload[1..] {
                v |= u64::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            v
        });
        out.push(RecordAt {
            offset: off,
            end: off + 8 + len,
            entry,
        });
        off += 8 + len;
    }
    out
}

fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    inspect(dir)
        .unwrap()
        .segments
        .into_iter()
        .map(|s| s.path)
        .collect()
}

/// The pristine directory's files and state.
fn pristine(dir: &Path) -> State {
    let mut s = FileStorage::open(dir, opts()).unwrap();
    write_story(&mut s);
    let st = state(&s);
    assert!(segment_paths(dir).len() >= 3, "several segments");
    assert_eq!(st.log.first().map(|x| x.index), Some(21));
    st
}

/// The state recovery mode must give when the first damaged byte is at `offset` of the newest
/// segment (whose records are `recs`): every entry recorded wholly before the damaged record.
fn expected_after_cut(p: &State, recs: &[RecordAt], offset: usize) -> State {
    let cut = recs
        .iter()
        .find(|r| r.end > offset)
        .map_or(usize::MAX, |r| r.offset);
    let last_before = recs
        .iter()
        .filter(|r| r.end <= cut)
        .filter_map(|r| r.entry)
        .max();
    let older_last = p.log.first().map_or(0, |x| x.index) - 1;
    // Entries before this segment's first one are in older segments: kept.
    let first_here = recs.iter().find_map(|r| r.entry).unwrap();
    let through = last_before.unwrap_or(first_here - 1).max(older_last);
    State {
        log: p
            .log
            .iter()
            .filter(|x| x.index <= through)
            .cloned()
            .collect(),
        tail_loss: Some(TailLoss {
            intact_through: through,
            hard_state_lost: false,
        }),
        ..p.clone()
    }
}

#[test]
fn damage_in_the_synced_tail_is_cut_at_the_damaged_record_and_reported_until_cleared() {
    let dir = scratch();
    let p = pristine(dir.path());
    let newest = segment_paths(dir.path()).pop().unwrap();
    let image = std::fs::read(&newest).unwrap();
    let recs = records(&image);
    let used = recs.last().unwrap().end;
    let files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| !p.ends_with("LOCK"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let restore = || {
        for d in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::remove_file(d.unwrap().path()).unwrap();
        }
        for (path, bytes) in &files {
            std::fs::write(path, bytes).unwrap();
        }
    };
    let mut cases = 0;
    for offset in (RECORDS_START..used).step_by(37).chain(used - 3..used) {
        for zero in [false, true] {
            restore();
            let mut bytes = image.clone();
            if zero {
                bytes[offset..used].fill(0);
            } else {
                bytes[offset] ^= 0x10;
            }
            std::fs::write(&newest, &bytes).unwrap();
            let what = format!("{} at {offset}", if zero { "zeroed from" } else { "flip" });
            // Without recovery mode: refused, naming the file, an offset at the damage.
            match FileStorage::open(dir.path(), opts()) {
                Err(StorageError::Corrupt {
                    path, offset: o, ..
                }) => {
                    assert_eq!(path, newest, "{what}");
                    assert!(
                        o as usize <= offset && o as usize >= RECORDS_START,
                        "{what}: {o}"
                    );
                }
                other => panic!("{what}: {:?}", other.map(|s| s.last_index())),
            }
            let expected = expected_after_cut(&p, &recs, offset);
            let mut s = FileStorage::open(dir.path(), recover())
                .unwrap_or_else(|err| panic!("{what}: recovery mode: {err}"));
            assert_eq!(state(&s), expected, "{what}");
            let cut = s.recovery_report().damaged_tail.clone().expect("reported");
            assert_eq!(cut.path, newest, "{what}");
            assert!(
                dir.path().join("tail-loss").exists(),
                "{what}: recorded durably"
            );
            // The cut is done: a plain open (no recovery mode) now opens, still reporting it.
            drop(s);
            s = FileStorage::open(dir.path(), opts())
                .unwrap_or_else(|err| panic!("{what}: reopen after the cut: {err}"));
            assert_eq!(state(&s), expected, "{what}: after reopen");
            assert_eq!(s.recovery_report().damaged_tail, None);
            // New writes go on after the intact prefix, and the loss stays until cleared.
            let next = s.last_index() + 1;
            s.append(&[e(next, 5)]).unwrap();
            s.clear_tail_loss().unwrap();
            assert!(
                s.tail_loss().is_some(),
                "{what}: reported until the clear is synced"
            );
            drop(s);
            let mut s = FileStorage::open(dir.path(), opts()).unwrap();
            assert_eq!(
                s.tail_loss(),
                expected.tail_loss,
                "{what}: an unsynced clear is lost"
            );
            assert_eq!(s.last_index(), next - 1);
            s.clear_tail_loss().unwrap();
            s.sync().unwrap();
            assert_eq!(s.tail_loss(), None);
            // The repaired log takes new writes across segment rolls.
            let more: Vec<Entry> = (next..next + 40).map(|i| e(i, 5)).collect();
            s.append(&more).unwrap();
            s.sync().unwrap();
            let written = state(&s);
            drop(s);
            let s = FileStorage::open(dir.path(), opts()).unwrap();
            assert_eq!(s.tail_loss(), None, "{what}: the clear is durable");
            assert_eq!(s.initial_state().unwrap().hard_state, HS, "{what}");
            assert_eq!(state(&s), written, "{what}: writes after the repair");
            cases += 1;
        }
    }
    assert!(cases > 50);
}

/// The attack in recovery mode: the last ~9 KB of the used region zeroed, across the
/// newest segment into the one before it. The cut is in the older segment; the newer ones are
/// removed; the vote is kept (the newest watermark still has it).
#[test]
fn a_damaged_tail_spanning_segments_is_cut_in_the_oldest_damaged_one() {
    let dir = scratch();
    let p = pristine(dir.path());
    let segs = segment_paths(dir.path());
    let (older, newest) = (&segs[segs.len() - 2], &segs[segs.len() - 1]);
    let mut nb = std::fs::read(newest).unwrap();
    let n_used = records(&nb).last().unwrap().end;
    nb[RECORDS_START..n_used].fill(0);
    std::fs::write(newest, &nb).unwrap();
    let mut ob = std::fs::read(older).unwrap();
    let orecs = records(&ob);
    let o_used = orecs.last().unwrap().end;
    let from = o_used - 500;
    ob[from..o_used].fill(0);
    std::fs::write(older, &ob).unwrap();
    assert!(matches!(
        FileStorage::open(dir.path(), opts()),
        Err(StorageError::Corrupt { path, .. }) if &path == older
    ));
    let s = FileStorage::open(dir.path(), recover()).unwrap();
    let expected = expected_after_cut(&p, &orecs, from);
    assert_eq!(state(&s), expected);
    let cut = s.recovery_report().damaged_tail.clone().unwrap();
    assert_eq!(&cut.path, older);
    assert_eq!(cut.removed_segments, vec![newest.clone()]);
    assert!(!newest.exists());
    assert_eq!(
        s.initial_state().unwrap().hard_state,
        HS,
        "the vote is kept"
    );
}

/// A damaged watermark slot: recovery mode keeps every record that verifies but cannot know
/// how far the log was synced, nor the newest hard state: the loss says so.
#[test]
fn a_damaged_watermark_in_recovery_mode_reports_the_hard_state_as_possibly_lost() {
    let dir = scratch();
    let p = pristine(dir.path());
    let newest = segment_paths(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes[512 + 20] ^= 0x01;
    bytes[1024 + 20] ^= 0x01;
    std::fs::write(&newest, &bytes).unwrap();
    assert!(matches!(
        FileStorage::open(dir.path(), opts()),
        Err(StorageError::Corrupt { offset: 512, .. })
    ));
    let s = FileStorage::open(dir.path(), recover()).unwrap();
    let got = state(&s);
    assert_eq!(got.log, p.log, "every record still verifies");
    assert_eq!(
        got.tail_loss,
        Some(TailLoss {
            intact_through: 60,
            hard_state_lost: true
        })
    );
    assert_eq!(got.hard_state, HS, "the newest intact record holds it");
    drop(s);
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(state(&s), got, "the slots are rewritten");
}

/// Nothing of the log is left (every segment deleted): recovery mode starts from the
/// snapshot, with the whole log and the hard state reported lost.
#[test]
fn without_any_segment_recovery_mode_starts_from_the_snapshot() {
    let dir = scratch();
    pristine(dir.path());
    for seg in segment_paths(dir.path()) {
        std::fs::remove_file(seg).unwrap();
    }
    assert!(FileStorage::open(dir.path(), opts()).is_err());
    let s = FileStorage::open(dir.path(), recover()).unwrap();
    let st = state(&s);
    assert_eq!(st.snapshot, SnapshotMeta { index: 20, term: 1 });
    assert!(st.log.is_empty());
    assert_eq!(
        st.tail_loss,
        Some(TailLoss {
            intact_through: 20,
            hard_state_lost: true
        })
    );
    assert_eq!(s.snapshot().unwrap().unwrap().1, b"state at 20".to_vec());
}

/// A damaged tail-loss file is refused; recovery mode replaces it by the most conservative
/// loss (everything after the snapshot, and the hard state).
#[test]
fn a_damaged_tail_loss_record_is_refused_or_made_conservative() {
    let dir = scratch();
    pristine(dir.path());
    let newest = segment_paths(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    let used = records(&bytes).last().unwrap().end;
    bytes[used - 1] ^= 1;
    std::fs::write(&newest, &bytes).unwrap();
    drop(FileStorage::open(dir.path(), recover()).unwrap());
    let loss = dir.path().join("tail-loss");
    let mut lb = std::fs::read(&loss).unwrap();
    lb[33] ^= 0x40;
    std::fs::write(&loss, &lb).unwrap();
    assert!(matches!(
        FileStorage::open(dir.path(), opts()),
        Err(StorageError::Corrupt { path, .. }) if path == loss
    ));
    let s = FileStorage::open(dir.path(), recover()).unwrap();
    assert_eq!(
        s.tail_loss(),
        Some(TailLoss {
            intact_through: 20,
            hard_state_lost: true
        })
    );
    drop(s);
    assert!(FileStorage::open(dir.path(), opts()).is_ok(), "rewritten");
}

/// Builds the story on a simulated disk and damages the newest segment's synced tail from
/// `offset_from_end` bytes before its end on (zeroed), or, with `offset_from_end == 0`, its
/// header. Returns the disk and the state recovery mode must reach.
fn damaged_sim(offset_from_end: usize) -> (SimDisk, State) {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/d", opts()).unwrap();
    write_story(&mut s);
    let p = state(&s);
    drop(s);
    let newest = disk
        .files()
        .into_iter()
        .filter(|f| f.extension().is_some_and(|x| x == "log"))
        .max()
        .unwrap();
    let mut bytes = disk.read(&newest).unwrap();
    let recs = records(&bytes);
    if offset_from_end == 0 {
        bytes[20] ^= 1;
        disk.write_durable(&newest, &bytes);
        let first_here = recs.iter().find_map(|r| r.entry).unwrap();
        // The newest segment held the last hard state (`HS`): the older ones replay to the
        // story's first, and the loss says the hard state may be lost.
        let expected = State {
            hard_state: HardState {
                term: 1,
                vote: Some(1),
            },
            log: p
                .log
                .iter()
                .filter(|x| x.index < first_here)
                .cloned()
                .collect(),
            tail_loss: Some(TailLoss {
                intact_through: first_here - 1,
                hard_state_lost: true,
            }),
            ..p
        };
        return (disk, expected);
    }
    let used = recs.last().unwrap().end;
    let from = used - offset_from_end;
    bytes[from..used].fill(0);
    disk.write_durable(&newest, &bytes);
    (disk, expected_after_cut(&p, &recs, from))
}

/// A crash at every write and sync point of a recovery: reopening in recovery mode always
/// reaches the same state, and a plain open either refuses (the damage is still there) or
/// opens with the same cut log and the loss reported — never a shorter log without it.
#[test]
fn a_crash_anywhere_during_recovery_is_recovered_and_never_hides_the_loss() {
    // The tail zeroed (the cut stays in the damaged segment), or the newest header damaged
    // (the segment is replaced by a fresh one).
    for damage in [700, 0] {
        crash_anywhere_during_recovery(damage);
    }
}

fn crash_anywhere_during_recovery(damage: usize) {
    let total = {
        let (disk, _) = damaged_sim(damage);
        let before = disk.mutating_ops();
        drop(FileStorage::open_simulated(&disk, "/d", recover()).unwrap());
        disk.mutating_ops() - before
    };
    assert!(total >= 6, "a recovery takes several steps ({total})");
    let (mut refused, mut opened) = (0, 0);
    for point in 0..=total {
        for seed in 0..4 {
            let what = format!(
                "damage {damage}: crash after {point} of {total} recovery ops, seed {seed}"
            );
            let (disk, expected) = damaged_sim(damage);
            disk.crash_after(point);
            let _ = FileStorage::open_simulated(&disk, "/d", recover());
            disk.crash(seed * 31 + point);
            match FileStorage::open_simulated(&disk, "/d", opts()) {
                Err(StorageError::Corrupt { .. }) => refused += 1,
                Err(other) => panic!("{what}: plain open: {other}"),
                Ok(s) => {
                    assert_eq!(state(&s), expected, "{what}: plain open");
                    opened += 1;
                }
            }
            disk.crash(seed);
            let s = FileStorage::open_simulated(&disk, "/d", recover())
                .unwrap_or_else(|err| panic!("{what}: recovery open: {err}"));
            assert_eq!(state(&s), expected, "{what}");
        }
    }
    // Both happen: crashes before the cut is durable, and after.
    assert!(
        refused > 0 && opened > 0,
        "refused {refused}, opened {opened}"
    );
}

/// Random damage of the newest two segments, opened in recovery mode: a typed error, or a log
/// that is a prefix of the synced one, shorter only with the loss reported, and the hard
/// state kept unless reported lost.
#[test]
fn random_damage_in_recovery_mode_never_opens_short_without_reporting_it() {
    let cases: u64 = std::env::var("RAFTKV_CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
        .min(3000);
    let dir = scratch();
    let p = pristine(dir.path());
    let segs = segment_paths(dir.path());
    let victims = [&segs[segs.len() - 2], &segs[segs.len() - 1]];
    let originals: Vec<Vec<u8>> = segs.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let mut rng = SplitMix64::new(77);
    let (mut refused, mut exact, mut cut) = (0, 0, 0);
    for case in 0..cases {
        for (seg, bytes) in segs.iter().zip(&originals) {
            std::fs::write(seg, bytes).unwrap();
        }
        let _ = std::fs::remove_file(dir.path().join("tail-loss"));
        let v = rng.below(2) as usize;
        let victim = victims[v];
        let mut bytes = originals[segs.len() - 2 + v].clone();
        let len = bytes.len() as u64;
        match rng.below(3) {
            0 => {
                for _ in 0..=rng.below(6) {
                    let at = rng.below(len) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let at = rng.below(len) as usize;
                let n = rng.below(3000) as usize;
                bytes[at..(at + n).min(len as usize)].fill(0);
            }
            _ => {
                let at = RECORDS_START + rng.below(len - RECORDS_START as u64) as usize;
                bytes[at..].fill(0);
            }
        }
        std::fs::write(victim, &bytes).unwrap();
        let what = format!("case {case}: {}", victim.display());
        let s = match FileStorage::open(dir.path(), recover()) {
            Ok(s) => s,
            Err(StorageError::Corrupt { .. }) => {
                refused += 1;
                continue;
            }
            Err(other) => panic!("{what}: {other}"),
        };
        let got = state(&s);
        assert_eq!(got.snapshot, p.snapshot, "{what}");
        assert!(p.log.starts_with(&got.log), "{what}: not a prefix");
        match got.tail_loss {
            None => {
                assert_eq!(got.log, p.log, "{what}: shorter without a reported loss");
                assert_eq!(got.hard_state, p.hard_state, "{what}");
                exact += 1;
            }
            Some(loss) => {
                let last = got.log.last().map_or(p.snapshot.index, |x| x.index);
                assert_eq!(loss.intact_through, last, "{what}");
                assert!(
                    loss.hard_state_lost || got.hard_state == p.hard_state,
                    "{what}: hard state {:?} not reported lost",
                    got.hard_state
                );
                cut += 1;
            }
        }
    }
    eprintln!("recovery mode, {cases} random damages: {refused} refused, {exact} exact, {cut} cut");
    assert!(cut > cases / 3, "most damage is cut ({cut}/{cases})");
}

#[test]
fn mem_storage_lose_tail_cuts_forgets_and_reports_until_cleared() {
    let mut s = MemStorage::new();
    write_story(&mut s);
    s.append(&[e(61, 4)]).unwrap(); // unsynced: lost like in a crash
    s.lose_tail(50, false);
    assert_eq!(s.last_index(), 50);
    assert_eq!(s.durable_last_index(), 50);
    assert_eq!(s.initial_state().unwrap().hard_state, HS);
    assert_eq!(
        s.tail_loss(),
        Some(TailLoss {
            intact_through: 50,
            hard_state_lost: false
        })
    );
    // A second loss merges: the smaller prefix, the hard state now forgotten (adversarially:
    // the last intact entry's term, no vote).
    s.lose_tail(45, true);
    assert_eq!(
        s.tail_loss(),
        Some(TailLoss {
            intact_through: 45,
            hard_state_lost: true
        })
    );
    assert_eq!(
        s.durable_hard_state(),
        HardState {
            term: 4,
            vote: None
        }
    );
    // Never below the snapshot, which stays.
    s.lose_tail(3, true);
    assert_eq!((s.first_index(), s.last_index()), (21, 20));
    assert_eq!(s.tail_loss().unwrap().intact_through, 20);
    assert_eq!(s.durable_hard_state().term, 1, "the snapshot's term");
    assert_eq!(s.snapshot().unwrap().unwrap().1, b"state at 20".to_vec());
    // Reported until the clear is synced; a crash before that keeps it.
    s.clear_tail_loss().unwrap();
    assert!(s.tail_loss().is_some());
    s.crash();
    assert!(s.tail_loss().is_some());
    s.clear_tail_loss().unwrap();
    s.sync().unwrap();
    assert_eq!(s.tail_loss(), None);
    s.crash();
    assert_eq!(s.tail_loss(), None);
}

/// The newest segment is full to the last byte and its last record, a small `Truncate`, is
/// damaged: the kept hard state's record does not fit after the intact records, so the cut
/// ends in a fresh segment that holds it, and the damaged one is lowered to its intact
/// records. (The truncated entry is back: the log is what it held at the cut.)
#[test]
fn a_cut_whose_hard_state_record_does_not_fit_ends_in_a_fresh_segment() {
    let dir = scratch();
    let o = opts();
    let used = |dir: &Path| inspect(dir).unwrap().segments.last().unwrap().used_bytes;
    let tiny = |i, n| Entry {
        index: i,
        term: 4,
        payload: EntryPayload::Command(vec![7u8; n].into()),
    };
    let last = {
        let mut s = FileStorage::open(dir.path(), o).unwrap();
        s.set_hard_state(HS).unwrap();
        s.append(&[tiny(1, 10)]).unwrap();
        s.sync().unwrap();
        let before = used(dir.path());
        s.append(&[tiny(2, 10)]).unwrap();
        s.sync().unwrap();
        let overhead = used(dir.path()) - before - 10;
        let truncate_record = 10; // 8 bytes of framing, variant and a one-byte index
        let mut next = 3;
        loop {
            let left = o.segment_size - used(dir.path());
            if left < overhead + truncate_record + 128 {
                let n = (left - overhead - truncate_record) as usize;
                s.append(&[tiny(next, n)]).unwrap();
                s.sync().unwrap();
                s.truncate_suffix(next).unwrap();
                s.sync().unwrap();
                break;
            }
            s.append(&[tiny(next, 100)]).unwrap();
            s.sync().unwrap();
            next += 1;
        }
        assert_eq!(used(dir.path()), o.segment_size, "full to the last byte");
        assert_eq!(s.segment_count(), 1);
        assert_eq!(s.last_index(), next - 1);
        next
    };
    let seg = segment_paths(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = o.segment_size as usize - 2; // inside the Truncate record
    bytes[at] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let s = FileStorage::open(dir.path(), recover()).unwrap();
    assert_eq!(
        s.tail_loss(),
        Some(TailLoss {
            intact_through: last,
            hard_state_lost: false
        })
    );
    assert_eq!(
        s.segment_count(),
        2,
        "the hard state went into a fresh segment"
    );
    assert_eq!(s.initial_state().unwrap().hard_state, HS);
    drop(s);
    let s = FileStorage::open(dir.path(), opts()).expect("a clean log after the cut");
    assert_eq!(s.initial_state().unwrap().hard_state, HS);
    assert_eq!(s.last_index(), last);
}

/// The newest segment's header is damaged: the whole segment goes, replaced by a fresh one
/// with the same number; the hard state may have gone with its watermark.
#[test]
fn a_damaged_newest_header_drops_that_segment_in_recovery_mode() {
    let dir = scratch();
    let p = pristine(dir.path());
    let segs = segment_paths(dir.path());
    let newest = segs.last().unwrap().clone();
    let older_last = records(&std::fs::read(&segs[segs.len() - 2]).unwrap())
        .iter()
        .filter_map(|r| r.entry)
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes[20] ^= 0x01; // the cluster id field: fails the header checksum
    std::fs::write(&newest, &bytes).unwrap();
    assert!(matches!(
        FileStorage::open(dir.path(), opts()),
        Err(StorageError::Corrupt { offset: 60, .. })
    ));
    let s = FileStorage::open(dir.path(), recover()).unwrap();
    let got = state(&s);
    assert_eq!(
        got.tail_loss,
        Some(TailLoss {
            intact_through: older_last,
            hard_state_lost: true
        })
    );
    assert_eq!(got.log, p.log[..(older_last - 20) as usize].to_vec());
    assert_eq!(
        got.hard_state,
        HardState {
            term: 1,
            vote: Some(1)
        },
        "what the older segments hold"
    );
    assert_eq!(s.segment_count(), segs.len(), "replaced, same number");
    drop(s);
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(state(&s), got);
}
