//! Crash consistency of FileStorage on the simulated disk.
//!
//! A scripted workload (appends, overwrites, truncations, hard states, snapshots that keep or
//! discard the log, one of them streamed in chunks with log writes in between, compactions) runs against a `FileStorage` on a `SimDisk` that "dies" at its
//! n-th mutating operation, for every n. The disk then loses power: each unsynced write is kept,
//! torn or lost at random (seeded). After reopening, the storage must equal the last synced
//! state followed by some prefix of the later operations: everything synced is there, nothing
//! appears that was not written, and nothing is out of order. It must then accept new writes.
//! Random valid workloads (`RAFTKV_CRASH_WORKLOADS`, 60 by default) are crashed the same way
//! at random points. Both kinds split some syncs in two (`start_sync`, the wait, `finish_sync`)
//! with other writes, blocking syncs, snapshots and segment rolls in between, as a node whose
//! fsync runs on another thread does: what a split sync covered is durable once it finished.
//!
//! Every tear is a tear: half of the reopens use recovery mode
//! (`FileStorageOptions::recover_damaged_tail`), and a crash must never look like damage to
//! synced data there (no tail loss, nothing cut but never-synced bytes) — nor be refused, even
//! on a disk that persists the sectors of a write in any order.

use raftkv::error::StorageError;
use raftkv::raft::{Entry, EntryPayload, HardState, Index, SnapshotMeta};
use raftkv::storage::file::conformance::snapshot_bytes;
use raftkv::storage::file::sim::{SimDisk, SplitMix64};
use raftkv::storage::{FileStorage, FileStorageOptions, Storage, SyncWait};

const SEEDS_PER_POINT: u64 = 8;

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 1,
        node_id: 2,
        segment_size: 4096,
        cache_bytes: 1024,
        ..Default::default()
    }
}

/// `opts()` with recovery mode on for odd `n`: reopening after a crash must give the same
/// result either way.
fn reopen_opts(n: u64) -> FileStorageOptions {
    FileStorageOptions {
        recover_damaged_tail: n % 2 == 1,
        ..opts()
    }
}

/// A crash is never damage: nothing was cut but a torn tail, and no tail loss is reported.
fn check_no_damage(s: &FileStorage, what: &str) {
    assert_eq!(
        s.recovery_report().damaged_tail,
        None,
        "{what}: a crash was taken for damage"
    );
    assert_eq!(s.tail_loss(), None, "{what}: a crash reported a tail loss");
}

fn e(index: Index, term: u64) -> Entry {
    Entry {
        index,
        term,
        payload: EntryPayload::Command(vec![(index * 7 + term) as u8; 300].into()),
    }
}

fn run(lo: Index, hi: Index, term: u64) -> Vec<Entry> {
    (lo..=hi).map(|i| e(i, term)).collect()
}

#[derive(Clone, Debug)]
enum Op {
    HardState(HardState),
    Append(Vec<Entry>),
    Truncate(Index),
    /// `save_snapshot` (one chunk, then install).
    Snapshot(SnapshotMeta, Vec<u8>),
    /// `write_snapshot_chunk(meta, offset, data)`: changes nothing visible.
    Chunk(SnapshotMeta, u64, Vec<u8>),
    /// `install_snapshot(meta)` of the chunks written; carries their concatenation for the model.
    Install(SnapshotMeta, Vec<u8>),
    Compact(Index),
    Sync,
    /// `start_sync`: what was written so far is covered by the sync it begins.
    StartSync,
    /// The started sync's wait (an fdatasync, on another thread in a node).
    Wait,
    /// `finish_sync` with the wait's result: what the sync covered is durable now.
    FinishSync,
    /// The operation while the disk refuses writes to the segments' first sectors (their
    /// watermark slots; a refused write may land in part), retried once they are accepted
    /// again if it failed for space, as a node retries a batch when space returns.
    SlotsFull(Box<Op>),
}

/// The workload: a story of a follower's log.
fn workload() -> Vec<Op> {
    use Op::*;
    let snap = |index, term| {
        Snapshot(
            SnapshotMeta { index, term },
            format!("state@{index}").into_bytes(),
        )
    };
    let streamed = SnapshotMeta { index: 20, term: 2 };
    let streamed_data = snapshot_bytes(3000, 9);
    vec![
        HardState(raftkv::raft::HardState {
            term: 1,
            vote: Some(1),
        }),
        Append(run(1, 5, 1)),
        Sync,
        Append(run(6, 12, 1)),
        HardState(raftkv::raft::HardState {
            term: 2,
            vote: Some(2),
        }),
        Sync,
        Append(run(10, 14, 2)), // a new leader overwrites 10..
        // A split sync with writes (and a blocking sync) while its wait is in flight.
        StartSync,
        Truncate(13),
        Wait,
        Append(run(13, 20, 2)),
        FinishSync,
        Sync,
        snap(8, 1), // keeps 9..
        Compact(8),
        Append(run(21, 30, 2)),
        HardState(raftkv::raft::HardState {
            term: 3,
            vote: None,
        }),
        Sync,
        // A snapshot streamed in chunks (restarted once), while the log keeps growing.
        Chunk(streamed, 0, b"an attempt that is restarted".to_vec()),
        Chunk(streamed, 0, streamed_data[..700].to_vec()),
        Append(run(31, 33, 2)),
        Sync,
        Chunk(streamed, 700, streamed_data[700..1500].to_vec()),
        Chunk(streamed, 1500, streamed_data[1500..].to_vec()),
        Append(run(34, 34, 2)),
        // Started before the install (which syncs on its own), finished after it.
        StartSync,
        Install(streamed, streamed_data.clone()), // keeps 21..
        Wait,
        FinishSync,
        Compact(20),
        Truncate(25),
        Sync,
        snap(40, 5), // beyond the log: discards it
        Append(run(41, 45, 5)),
        StartSync,
        Wait,
        FinishSync,
        Compact(40),
        Append(run(46, 50, 5)),
        HardState(raftkv::raft::HardState {
            term: 6,
            vote: Some(2),
        }),
        Sync,
        Append(run(51, 53, 6)), // never synced
    ]
}

/// What a storage should hold, with the semantics of `MemStorage`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    snapshot_data: Vec<u8>,
    /// Entries after the snapshot.
    log: Vec<Entry>,
}

impl Model {
    fn first(&self) -> Index {
        self.snapshot.index + 1
    }
    fn truncate(&mut self, from: Index) {
        self.log
            .truncate(from.saturating_sub(self.first()) as usize);
    }
    fn apply(&mut self, op: &Op) {
        match op {
            Op::SlotsFull(inner) => self.apply(inner),
            Op::HardState(hs) => self.hard_state = *hs,
            Op::Append(entries) => {
                if let Some(first) = entries.first() {
                    self.truncate(first.index);
                    self.log.extend_from_slice(entries);
                }
            }
            Op::Truncate(from) => self.truncate(*from),
            Op::Snapshot(meta, data) | Op::Install(meta, data) => {
                if meta.index <= self.snapshot.index {
                    return;
                }
                let keep = meta.index >= self.first()
                    && self
                        .log
                        .get((meta.index - self.first()) as usize)
                        .is_some_and(|x| x.term == meta.term);
                if keep {
                    self.log.drain(..(meta.index + 1 - self.first()) as usize);
                } else {
                    self.log.clear();
                }
                self.snapshot = *meta;
                self.snapshot_data = data.clone();
            }
            Op::Chunk(..)
            | Op::Compact(_)
            | Op::Sync
            | Op::StartSync
            | Op::Wait
            | Op::FinishSync => {}
        }
    }

    fn read(s: &FileStorage) -> Model {
        let state = s.initial_state().unwrap();
        assert_eq!(state.first_index, state.snapshot.index + 1);
        Model {
            hard_state: state.hard_state,
            snapshot: state.snapshot,
            snapshot_data: s.snapshot().unwrap().map(|x| x.1).unwrap_or_default(),
            log: s
                .entries(state.first_index, state.last_index + 1, u64::MAX)
                .unwrap(),
        }
    }
}

/// Runs the workload until the disk dies. Returns the last synced model and the operations
/// after it (appends split into single entries: a batch may survive in part).
fn run_until_crash(disk: &SimDisk) -> (Model, Vec<Op>) {
    run_workload_until_crash(disk, workload())
}

fn run_workload_until_crash(disk: &SimDisk, workload: Vec<Op>) -> (Model, Vec<Op>) {
    let mut durable = Model::default();
    let mut unsynced: Vec<Op> = Vec::new();
    let Ok(mut s) = FileStorage::open_simulated(disk, "/data", opts()) else {
        return (durable, unsynced);
    };
    // The started sync: how many of `unsynced` it covers, its wait, then the wait's result.
    let mut covered = 0;
    let mut wait: Option<SyncWait> = None;
    let mut waited: Option<Result<(), StorageError>> = None;
    for op in workload {
        let (op, slots_full) = match op {
            Op::SlotsFull(inner) => (*inner, true),
            op => (op, false),
        };
        match &op {
            Op::Append(entries) => {
                unsynced.extend(entries.iter().map(|x| Op::Append(vec![x.clone()])))
            }
            other => unsynced.push(other.clone()),
        }
        if slots_full {
            disk.set_no_space_below(Some(SLOTS_END));
        }
        let mut result = run_op(&mut s, &op, &mut wait, &mut waited, &mut covered, &unsynced);
        if slots_full {
            disk.set_no_space_below(None);
            if matches!(result, Err(StorageError::NoSpace { .. })) {
                result = run_op(&mut s, &op, &mut wait, &mut waited, &mut covered, &unsynced);
            }
        }
        if result.is_err() {
            break;
        }
        if matches!(
            op,
            Op::Sync | Op::Snapshot(..) | Op::Install(..) | Op::Compact(_)
        ) {
            for op in unsynced.drain(..) {
                durable.apply(&op);
            }
            covered = 0;
        }
        if matches!(op, Op::FinishSync) {
            for op in unsynced.drain(..covered) {
                durable.apply(&op);
            }
            covered = 0;
        }
    }
    (durable, unsynced)
}

/// Segments' watermark slots lie below this offset, their records above it.
const SLOTS_END: u64 = 1536;

/// Carries out one operation (`StartSync` records how many of `unsynced` its sync covers).
fn run_op(
    s: &mut FileStorage,
    op: &Op,
    wait: &mut Option<SyncWait>,
    waited: &mut Option<Result<(), StorageError>>,
    covered: &mut usize,
    unsynced: &[Op],
) -> Result<(), StorageError> {
    match op {
        Op::HardState(hs) => s.set_hard_state(*hs),
        Op::Append(entries) => s.append(entries),
        Op::Truncate(from) => s.truncate_suffix(*from),
        Op::Snapshot(meta, data) => s.save_snapshot(*meta, data),
        Op::Chunk(meta, offset, data) => s.write_snapshot_chunk(*meta, *offset, data),
        Op::Install(meta, _) => s.install_snapshot(*meta),
        Op::Compact(through) => s.compact(*through),
        Op::Sync => s.sync(),
        Op::StartSync => s.start_sync().map(|w| {
            *wait = Some(w.expect("the file storage splits its syncs"));
            *covered = unsynced.len() - 1;
        }),
        Op::Wait => {
            *waited = Some(wait.take().expect("a started sync").run());
            Ok(())
        }
        Op::FinishSync => s.finish_sync(waited.take().expect("a waited sync")),
        Op::SlotsFull(_) => unreachable!("unwrapped by the caller"),
    }
}

/// The recovered state must be the durable one followed by a prefix of the rest. Returns how
/// many later operations survived.
fn check_recovered(recovered: &Model, durable: &Model, unsynced: &[Op], what: &str) -> usize {
    let mut candidate = durable.clone();
    let mut matched = (&candidate == recovered).then_some(0);
    for (n, op) in unsynced.iter().enumerate() {
        candidate.apply(op);
        if &candidate == recovered {
            matched = Some(n + 1);
        }
    }
    if let Some(n) = matched {
        return n;
    }
    panic!(
        "{what}: recovered state is not the synced state plus a prefix of later writes\n\
         recovered: hs {:?} snap {:?} log {:?}\n durable: hs {:?} snap {:?} log {:?}\n unsynced: {}",
        recovered.hard_state,
        recovered.snapshot,
        recovered.log.iter().map(|x| (x.index, x.term)).collect::<Vec<_>>(),
        durable.hard_state,
        durable.snapshot,
        durable.log.iter().map(|x| (x.index, x.term)).collect::<Vec<_>>(),
        unsynced.len()
    );
}

/// After recovery the storage takes new writes, and they are durable at sync.
fn check_writable(disk: &SimDisk, mut s: FileStorage, what: &str) {
    let next = s.last_index() + 1;
    let term = s.initial_state().unwrap().hard_state.term.max(7);
    s.append(&[e(next, term)])
        .unwrap_or_else(|err| panic!("{what}: append after recovery: {err}"));
    s.sync()
        .unwrap_or_else(|err| panic!("{what}: sync after recovery: {err}"));
    let expect = Model::read(&s);
    drop(s);
    disk.crash(0);
    let s = FileStorage::open_simulated(disk, "/data", opts())
        .unwrap_or_else(|err| panic!("{what}: reopen after new writes: {err}"));
    assert_eq!(Model::read(&s), expect, "{what}: new writes durable");
}

fn total_ops() -> u64 {
    let disk = SimDisk::new();
    let (_, unsynced) = run_until_crash(&disk);
    assert!(
        !unsynced.is_empty(),
        "the workload ends with unsynced writes"
    );
    disk.mutating_ops()
}

#[test]
fn crash_at_every_write_and_sync_point_recovers_a_synced_prefix() {
    let total = total_ops();
    assert!(
        total > 40,
        "the workload exercises many write points ({total})"
    );
    let (mut survived_unsynced, mut torn_tails) = (0, 0);
    for point in 0..=total {
        for seed in 0..SEEDS_PER_POINT {
            let what = format!("crash after {point} ops, seed {seed}");
            let disk = SimDisk::new();
            disk.crash_after(point);
            let (durable, unsynced) = run_until_crash(&disk);
            disk.crash(seed * 1_000_003 + point);
            let s = FileStorage::open_simulated(&disk, "/data", reopen_opts(seed))
                .unwrap_or_else(|err| panic!("{what}: open failed: {err}"));
            check_no_damage(&s, &what);
            if check_recovered(&Model::read(&s), &durable, &unsynced, &what) > 0 {
                survived_unsynced += 1;
            }
            if s.recovery_report().torn_tail.is_some() {
                torn_tails += 1;
            }
            check_writable(&disk, s, &what);
        }
    }
    // The simulated crashes really produce the interesting cases.
    assert!(
        survived_unsynced > 10,
        "unsynced writes survived in {survived_unsynced} runs"
    );
    assert!(torn_tails > 10, "torn tails in {torn_tails} runs");
}

#[test]
fn crash_during_recovery_is_recovered_too() {
    let total = total_ops();
    for point in (0..=total).step_by(3) {
        for recovery_point in 0..4 {
            let what =
                format!("crash after {point} ops, then after {recovery_point} ops of recovery");
            let disk = SimDisk::new();
            disk.crash_after(point);
            let (durable, unsynced) = run_until_crash(&disk);
            disk.crash(point);
            disk.crash_after(recovery_point);
            let _ = FileStorage::open_simulated(&disk, "/data", opts());
            disk.crash(point + 17);
            let s = FileStorage::open_simulated(&disk, "/data", reopen_opts(point))
                .unwrap_or_else(|err| panic!("{what}: open failed: {err}"));
            check_no_damage(&s, &what);
            check_recovered(&Model::read(&s), &durable, &unsynced, &what);
        }
    }
}

#[test]
fn without_a_crash_everything_synced_is_kept_and_the_unsynced_tail_may_go() {
    let disk = SimDisk::new();
    let (durable, unsynced) = run_until_crash(&disk);
    for seed in 0..10 {
        disk.crash(seed);
        let s = FileStorage::open_simulated(&disk, "/data", opts()).unwrap();
        check_recovered(
            &Model::read(&s),
            &durable,
            &unsynced,
            &format!("seed {seed}"),
        );
    }
    assert_eq!(durable.snapshot.index, 40);
    assert_eq!(durable.log.last().map(|x| x.index), Some(50));
}

/// A random but valid workload of `len` operations (seeded).
fn random_workload(seed: u64, len: usize) -> Vec<Op> {
    let mut r = SplitMix64::new(seed);
    let mut model = Model::default();
    let mut term = 1;
    let mut ops = Vec::new();
    // A started sync: operations until its wait (`None`: waited), then until its finish.
    let mut split: Option<(Option<u64>, u64)> = None;
    while ops.len() < len {
        let first = model.first();
        let last = model.snapshot.index + model.log.len() as u64;
        let op = match r.below(10) {
            0..=3 => {
                let at = last + 1 - r.below((last + 2 - first).min(4));
                let n = 1 + r.below(4);
                if r.below(4) == 0 {
                    term += 1;
                }
                Op::Append(
                    (at..at + n)
                        .map(|i| Entry {
                            index: i,
                            term,
                            payload: EntryPayload::Command(
                                vec![i as u8; 10 + r.below(700) as usize].into(),
                            ),
                        })
                        .collect(),
                )
            }
            4 => Op::Truncate(first + r.below(last + 2 - first)),
            5 => Op::HardState(HardState {
                term: term + r.below(2),
                vote: Some(1 + r.below(3)),
            }),
            6 => {
                let index = model.snapshot.index + 1 + r.below(last + 3 - model.snapshot.index);
                let in_log = model.log.get((index - first) as usize).map(|e| e.term);
                let snap_term = match (in_log, r.below(3)) {
                    (Some(t), 0 | 1) => t,
                    _ => term + 1,
                };
                let meta = SnapshotMeta {
                    index,
                    term: snap_term,
                };
                let data = snapshot_bytes(r.below(3000) as usize, index as u8);
                if r.below(2) == 0 {
                    Op::Snapshot(meta, data)
                } else {
                    // Streamed in up to three chunks, then installed.
                    let cut1 = r.below(data.len() as u64 + 1) as usize;
                    let cut2 = cut1 + r.below((data.len() - cut1) as u64 + 1) as usize;
                    for (from, to) in [(0, cut1), (cut1, cut2), (cut2, data.len())] {
                        ops.push(Op::Chunk(meta, from as u64, data[from..to].to_vec()));
                    }
                    Op::Install(meta, data)
                }
            }
            7 => Op::Compact(model.snapshot.index - r.below(model.snapshot.index / 2 + 1)),
            8 if split.is_none() => {
                // A split sync: its wait and its finish come a few operations later.
                split = Some((Some(r.below(4)), r.below(8)));
                Op::StartSync
            }
            _ => Op::Sync,
        };
        // Some appends (a segment roll seals its segment: a slot write) and syncs (their
        // watermark) meet a disk that refuses the slots' sectors.
        let op = if matches!(op, Op::Append(_) | Op::Sync) && r.below(4) == 0 {
            Op::SlotsFull(Box::new(op))
        } else {
            op
        };
        model.apply(&op);
        ops.push(op);
        if let Some((wait_in, finish_in)) = &mut split {
            match wait_in {
                Some(0) => {
                    ops.push(Op::Wait);
                    *wait_in = None;
                }
                Some(n) => *n -= 1,
                None => {}
            }
            if wait_in.is_none() {
                if *finish_in == 0 {
                    ops.push(Op::FinishSync);
                    split = None;
                } else {
                    *finish_in -= 1;
                }
            }
        }
    }
    if let Some((wait_in, _)) = split {
        if wait_in.is_some() {
            ops.push(Op::Wait);
        }
        ops.push(Op::FinishSync);
    }
    ops
}

#[test]
fn random_workloads_crashed_at_random_points_recover_a_synced_prefix() {
    let workloads: u64 = std::env::var("RAFTKV_CRASH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    for seed in 0..workloads {
        let ops = random_workload(seed, 60);
        let disk = SimDisk::new();
        run_workload_until_crash(&disk, ops.clone());
        let total = disk.mutating_ops();
        let mut r = SplitMix64::new(seed ^ 0xc0ffee);
        for _ in 0..12 {
            let point = r.below(total + 1);
            let what = format!("random workload {seed}, crash after {point} of {total} ops");
            let disk = SimDisk::new();
            disk.crash_after(point);
            let (durable, unsynced) = run_workload_until_crash(&disk, ops.clone());
            disk.crash(r.next_u64());
            let s = FileStorage::open_simulated(&disk, "/data", reopen_opts(point))
                .unwrap_or_else(|err| panic!("{what}: open failed: {err}"));
            check_no_damage(&s, &what);
            check_recovered(&Model::read(&s), &durable, &unsynced, &what);
            check_writable(&disk, s, &what);
        }
    }
}

/// On a disk that tears a write at sector granularity in any order (a later sector of a
/// write persisted, an earlier one lost), every crash still opens with the synced state plus
/// a prefix of later writes: everything above the synced watermark was never synced, so the
/// first invalid record there is a tear wherever valid bytes follow it.
#[test]
fn sector_torn_writes_always_recover_a_synced_prefix() {
    let workloads: u64 = std::env::var("RAFTKV_CRASH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut scrambled = 0;
    for seed in 0..workloads {
        let ops = random_workload(seed + 10_000, 60);
        let disk = SimDisk::new();
        run_workload_until_crash(&disk, ops.clone());
        let total = disk.mutating_ops();
        let mut r = SplitMix64::new(seed);
        for _ in 0..10 {
            let point = r.below(total + 1);
            let what = format!("sector tears, workload {seed}, crash after {point} ops");
            let disk = SimDisk::new();
            disk.set_tear_sectors(true);
            disk.crash_after(point);
            let (durable, unsynced) = run_workload_until_crash(&disk, ops.clone());
            disk.crash(r.next_u64());
            let s = FileStorage::open_simulated(&disk, "/data", reopen_opts(point))
                .unwrap_or_else(|err| panic!("{what}: open failed: {err}"));
            check_no_damage(&s, &what);
            check_recovered(&Model::read(&s), &durable, &unsynced, &what);
            if s.recovery_report()
                .torn_tail
                .as_ref()
                .is_some_and(|t| t.bytes > 512)
            {
                scrambled += 1;
            }
            check_writable(&disk, s, &what);
        }
    }
    assert!(
        workloads < 10 || scrambled > 0,
        "some tears left bytes beyond their first sector"
    );
}
