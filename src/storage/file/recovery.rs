//! Recovery: rebuilding the storage's state from its directory at `open`.
//!
//! Steps, all read-only until everything has been validated:
//! 1. Classify the directory: segments `seg-*.log`, snapshots `snap-*.snap`, the tail-loss
//!    file, and debris of an interrupted write (`seg-*.tmp`, `snap.tmp`, `tail-loss.tmp`).
//!    Unknown names (the `LOCK` file among them) are left alone.
//! 2. The newest snapshot must verify (identity, length, both checksums); older ones are stale.
//!    The tail-loss file, if any, must verify.
//! 3. Segment numbers must be contiguous; each header must verify and name this cluster and
//!    node, its sequence number and allocated length must match the file, and both watermark
//!    slots must verify (see `watermark.rs`).
//! 4. Replay every record in order by the tear-or-damage rule (see `segment.rs`): the last
//!    `HardState` wins (when no retained record holds one — the segments that did were
//!    compacted away — the newest watermark's, which recorded it); entries and truncations
//!    rebuild the [`LogIndex`]. An entry that leaves a gap after the log is damage. Records
//!    below a segment's synced watermark must be intact and, once a `HardState` has been
//!    replayed, agree with the watermark's hard state; only above the newest segment's
//!    watermark may a torn write be cut.
//! 5. Damage to synced records (or to a segment's header or watermark) is
//!    [`StorageError::Corrupt`] naming the file and offset — unless recovery mode is on
//!    ([`FileStorageOptions::recover_damaged_tail`]): then the log is cut at the first damaged
//!    record, keeping everything before it, and the loss is recorded (see below).
//! 6. Reconcile with the snapshot `(S, T)`: an empty log or one ending below `S` is replaced by
//!    the empty log after `S`; a log starting at `S + 1` continues it; a log holding `S` with
//!    term `T` is kept after `S`; one holding `S` with another term is discarded; a log
//!    starting after `S + 1` leaves a gap: corruption (reported against the snapshot file that
//!    should cover it when there is none). A discarded non-empty log must be followed by a
//!    `Truncate` marker before new entries (the caller writes it).
//! 7. Repair, each step listed in the [`RecoveryReport`]: remove debris and stale snapshots
//!    (and fsync the directory). For a cut in recovery mode, then, each step durable before
//!    the next: write the tail-loss file; remove the segments after the damaged one; end the
//!    log with the kept hard state — written as a record right after the intact records,
//!    then the damaged segment's watermark lowered to just after it (or, when it does not fit
//!    there or the damaged segment goes whole, in a fresh segment, before the damaged one's
//!    watermark is lowered); then, as for any torn tail, zero the bytes after the end. Until
//!    the new watermark is durable the old one still covers the damage, so a crash anywhere
//!    leaves either the damage, which the next open in recovery mode cuts again (a plain
//!    open refuses it), or the finished cut — never a cut log without its hard state, and the
//!    loss recorded in every case.
//!
//! The hard state kept by a cut is the newest segment's watermark's when both its slots read
//! (written after every sync, it holds the hard state as of the last sync even when the
//! records that carried it are damaged), else the last intact `HardState` record's, with
//! `hard_state_lost` set: the damage may have taken a newer term or vote with it.
//!
//! A directory without segments is new: the first segment is created and the parent directory
//! fsynced (it is an error if a snapshot exists, since the hard state would then be lost; in
//! recovery mode that is a loss of the whole log and the hard state instead).

use std::path::{Path, PathBuf};

use super::log_index::{pack, unpack, LogIndex};
use super::segment::{
    create_segment_fitting, encode_record, garbage_after, parse_segment_name, scan_records,
    segment_name, Record, RecordRef, Segment, SegmentHeader, HEADER_LEN, RECORDS_START,
};
use super::snapshot::{parse_snapshot_name, snapshot_name, verify_snapshot, SNAPSHOT_TEMP_NAME};
use super::tail_loss::{
    read_tail_loss, write_tail_loss, RecordedLoss, TAIL_LOSS_NAME, TAIL_LOSS_TEMP_NAME,
};
use super::vfs::{io_error, Vfs};
use super::watermark::{read_watermark, Watermark, SLOT_OFFSETS};
use super::{DamagedTail, FileStorageOptions, RecoveryReport, TornTail};
use crate::error::StorageError;
use crate::raft::{HardState, Index, SnapshotMeta};
use crate::storage::TailLoss;

/// What recovery found.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// The hard state to resume from.
    pub hard_state: HardState,
    /// The hard state the log's records replay to (other than `hard_state` only when
    /// `needs_hard_state_record`: no retained record holds one, the watermark did).
    pub log_hard_state: HardState,
    pub snapshot: SnapshotMeta,
    pub snapshot_path: Option<PathBuf>,
    pub snapshot_file_len: u64,
    /// Non-empty, ascending and contiguous; the last is the active segment.
    pub segments: Vec<Segment>,
    pub index: LogIndex,
    /// The replayed log was discarded for the snapshot: a `Truncate` marker must be logged.
    pub needs_reset_marker: bool,
    /// `hard_state` is not what the log's records replay to (it came from the newest
    /// watermark): it must be logged and synced.
    pub needs_hard_state_record: bool,
    /// The recorded tail loss, if any (reported until cleared).
    pub tail_loss: Option<RecordedLoss>,
    pub report: RecoveryReport,
}

/// Replays records into the log index and hard state.
struct Replay {
    index: LogIndex,
    hard_state: HardState,
    /// A `HardState` record was replayed (`hard_state` is the log's, not the default).
    hard_state_seen: bool,
}

impl Replay {
    /// Applies the record at `offset` of segment `seq` (at `path`); `seen` tracks the segment's
    /// highest entry index and whether it holds a hard state.
    fn apply(
        &mut self,
        seq: u64,
        path: &Path,
        seen: &mut (Index, bool),
        offset: u64,
        record: Record,
    ) -> Result<(), StorageError> {
        match record {
            Record::HardState(hs) => {
                self.hard_state = hs;
                self.hard_state_seen = true;
                seen.1 = true;
            }
            Record::Truncate { from } => self.index.truncate_from(from),
            Record::Entry(e) => {
                if e.index == 0 {
                    return Err(corrupt(path, offset, "entry with index 0".into()));
                }
                if self.index.is_empty() || e.index < self.index.first() {
                    // The log starts here (its earlier part was in deleted segments, or it was
                    // truncated away).
                    self.index.reset(e.index);
                } else if e.index > self.index.last() + 1 {
                    return Err(corrupt(
                        path,
                        offset,
                        format!("gap: entry {} after entry {}", e.index, self.index.last()),
                    ));
                } else {
                    self.index.truncate_from(e.index);
                }
                self.index.push(e.index, e.term, pack(seq, offset));
                seen.0 = seen.0.max(e.index);
            }
        }
        Ok(())
    }
}

fn corrupt(path: &Path, offset: u64, reason: String) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    }
}

/// The first damage found in the log: where, and how much of that segment is kept by a cut.
#[derive(Debug)]
struct Damage {
    /// Position of the damaged segment in `seqs`.
    at: usize,
    path: PathBuf,
    offset: u64,
    reason: String,
    /// Bytes of the damaged segment whose records stay (`None`: the segment goes whole).
    keep_through: Option<u64>,
}

impl Damage {
    fn from_error(
        at: usize,
        e: StorageError,
        keep_through: Option<u64>,
    ) -> Result<Self, StorageError> {
        match e {
            StorageError::Corrupt {
                path,
                offset,
                reason,
            } => Ok(Damage {
                at,
                path,
                offset,
                reason,
                keep_through,
            }),
            other => Err(other),
        }
    }

    /// The error a storage without recovery mode returns.
    fn into_error(self) -> StorageError {
        StorageError::Corrupt {
            path: self.path,
            offset: self.offset,
            reason: format!(
                "{} (synced data is damaged: this is not a torn write; to cut the log here, \
                 keep the snapshot and the intact records, and let the cluster repair the \
                 rest, open with FileStorageOptions::recover_damaged_tail, `node --recover`)",
                self.reason
            ),
        }
    }
}

/// One segment as scanned: the open segment, how it ended, and the damage if any.
struct Scanned {
    segment: Segment,
    torn: Option<(u64, u64)>,
    damage: Option<Damage>,
}

/// Opens, checks and replays segment `seqs[at]` into `replay`. Damage that a cut could
/// repair is returned in [`Scanned::damage`] (the replay then holds the records before it);
/// other errors (IO, identity, format version) are returned as errors.
fn scan_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    opts: &FileStorageOptions,
    seqs: &[u64],
    at: usize,
    replay: &mut Replay,
) -> Result<Scanned, StorageError> {
    let seq = seqs[at];
    let newest = at + 1 == seqs.len();
    let path = dir.join(segment_name(seq));
    let file = vfs.open(&path).map_err(|e| io_error("open", &path, e))?;
    let len = file.len().map_err(|e| io_error("stat", &path, e))?;
    let map = file.map().map_err(|e| io_error("mmap", &path, e))?;
    let mut seg = Segment {
        seq,
        path: path.clone(),
        file: file.into(),
        map,
        len,
        end: RECORDS_START,
        max_index: 0,
        has_hard_state: false,
        watermark: Watermark {
            generation: 0,
            seq,
            synced_end: RECORDS_START,
            hard_state: HardState::default(),
        },
        watermark_unwritten: false,
    };
    let whole = |e: StorageError| Damage::from_error(at, e, None);
    if len < HEADER_LEN {
        let e = corrupt(&path, len, "file shorter than a segment header".into());
        return Ok(Scanned {
            segment: seg,
            torn: None,
            damage: Some(whole(e)?),
        });
    }
    let image = seg.image()?;
    let checked = (|| {
        let h = SegmentHeader::decode(&image, &path)?;
        h.check_identity(opts.cluster_id, opts.node_id, &path)?;
        if h.seq != seq {
            return Err(corrupt(&path, 32, format!("header says segment {}", h.seq)));
        }
        if h.allocated_len != len || len > u64::from(u32::MAX) || len < RECORDS_START {
            return Err(corrupt(
                &path,
                len.min(h.allocated_len),
                format!("file is {len} bytes, header says {}", h.allocated_len),
            ));
        }
        Ok(())
    })();
    if let Err(e) = checked {
        drop(image);
        return Ok(Scanned {
            segment: seg,
            torn: None,
            damage: Some(whole(e)?),
        });
    }
    let mut seen = (0, false);
    let watermark = read_watermark(&image, len, seq, RECORDS_START, &path);
    let (synced_end, mut damage, mark) = match watermark {
        Ok(w) => (w.synced_end, None, Some(w)),
        // Recovery mode keeps the records that still verify; nothing below is trusted as
        // synced, so the scan treats them all as the newest segment's unsynced tail.
        Err(e) => (RECORDS_START, Some(e), None),
    };
    let newest_rule = newest || damage.is_some();
    // The hard state the records below the watermark replay to, if they (or the retained
    // segments before) hold one: a watermark written after the segments before it were
    // compacted away may speak of hard states no retained record holds.
    let mut hs_at_watermark = replay.hard_state_seen.then_some(replay.hard_state);
    let scan = scan_records(&image, &path, synced_end, newest_rule, |offset, record| {
        replay.apply(seq, &path, &mut seen, offset, record)?;
        if offset < synced_end && replay.hard_state_seen {
            hs_at_watermark = Some(replay.hard_state);
        }
        Ok(())
    });
    drop(image);
    if let Some(w) = mark {
        seg.watermark = w;
    }
    // Unmap the pages the scan touched (they stay in the page cache, out of our resident set)
    // and map afresh for later reads, so recovery's peak is about one segment.
    if seg.map.take().is_some() {
        seg.map = seg.file.map().map_err(|e| io_error("mmap", &path, e))?;
    }
    (seg.max_index, seg.has_hard_state) = seen;
    let mut torn = None;
    match scan {
        Ok(end) => {
            seg.end = end.end;
            torn = end.torn;
            match hs_at_watermark {
                Some(hs) if damage.is_none() && hs != seg.watermark.hard_state => {
                    damage = Some(corrupt(
                        &path,
                        seg.watermark.offset(),
                        format!(
                            "the synced watermark records hard state {:?} but the records \
                             before it replay to {hs:?}",
                            seg.watermark.hard_state
                        ),
                    ));
                }
                _ => {}
            }
        }
        Err(e) => {
            let StorageError::Corrupt { offset, .. } = &e else {
                return Err(e);
            };
            seg.end = *offset;
            // A slot's damage is reported first: it is why the records were not trusted.
            damage = Some(damage.unwrap_or(e));
        }
    }
    let damage = match damage {
        Some(e) => {
            let end = seg.end;
            Some(Damage::from_error(at, e, Some(end))?)
        }
        None => None,
    };
    Ok(Scanned {
        segment: seg,
        torn,
        damage,
    })
}

/// The newest hard state the newest segment's watermark slots hold, and whether both slots
/// were readable (if not, a newer hard state may have been lost with the damage).
fn newest_watermark_hard_state(
    vfs: &dyn Vfs,
    dir: &Path,
    opts: &FileStorageOptions,
    seq: u64,
) -> (Option<HardState>, bool) {
    let path = dir.join(segment_name(seq));
    let Ok(file) = vfs.open(&path) else {
        return (None, false);
    };
    let Ok(len) = file.len() else {
        return (None, false);
    };
    let mut page = vec![0u8; RECORDS_START as usize];
    if file.read_at(&mut page, 0).is_err() {
        return (None, false);
    }
    let header_ok = SegmentHeader::decode(&page, &path)
        .and_then(|h| h.check_identity(opts.cluster_id, opts.node_id, &path))
        .is_ok();
    if !header_ok {
        return (None, false);
    }
    if let Ok(w) = read_watermark(&page, len, seq, RECORDS_START, &path) {
        return (Some(w.hard_state), true);
    }
    let best = (0..2)
        .filter_map(|slot| {
            let at = SLOT_OFFSETS[slot] as usize;
            Watermark::decode(&page[at..], slot, seq, &path).ok()
        })
        .max_by_key(|w| w.generation)
        .map(|w| w.hard_state);
    (best, false)
}

/// Recovers the storage in `dir` (see the module docs).
pub(crate) fn recover(
    vfs: &dyn Vfs,
    dir: &Path,
    opts: &FileStorageOptions,
) -> Result<Recovered, StorageError> {
    vfs.create_dir_all(dir)
        .map_err(|e| io_error("create dir", dir, e))?;
    let mut seqs = Vec::new();
    let mut snaps = Vec::new();
    let mut debris = Vec::new();
    let mut has_tail_loss = false;
    for name in vfs.list(dir).map_err(|e| io_error("list", dir, e))? {
        if let Some(seq) = parse_segment_name(&name) {
            seqs.push(seq);
        } else if let Some(index) = parse_snapshot_name(&name) {
            snaps.push(index);
        } else if name == TAIL_LOSS_NAME {
            has_tail_loss = true;
        } else if name == SNAPSHOT_TEMP_NAME
            || name == TAIL_LOSS_TEMP_NAME
            || (name.starts_with("seg-") && name.ends_with(".tmp"))
        {
            debris.push(dir.join(name));
        }
    }
    seqs.sort_unstable();
    snaps.sort_unstable();

    // The newest snapshot must verify.
    let (snapshot, snapshot_path, snapshot_file_len) = match snaps.last() {
        Some(&index) => {
            let path = dir.join(snapshot_name(index));
            let (meta, file_len) =
                verify_snapshot(vfs, &path, index, opts.cluster_id, opts.node_id)?;
            (meta, Some(path), file_len)
        }
        None => (SnapshotMeta::default(), None, 0),
    };
    let stale_snapshots: Vec<PathBuf> = snaps
        .iter()
        .take(snaps.len().saturating_sub(1))
        .map(|&i| dir.join(snapshot_name(i)))
        .collect();

    // A recorded tail loss must verify too; recovery mode replaces a damaged one by the most
    // conservative loss.
    let mut rewrite_loss = false;
    let mut recorded = if has_tail_loss {
        let path = dir.join(TAIL_LOSS_NAME);
        match read_tail_loss(vfs, &path, opts.cluster_id, opts.node_id) {
            Ok(loss) => Some(loss),
            Err(StorageError::Corrupt { .. }) if opts.recover_damaged_tail => {
                rewrite_loss = true;
                Some(RecordedLoss {
                    loss: TailLoss {
                        intact_through: snapshot.index,
                        hard_state_lost: true,
                    },
                    hard_state: HardState::default(),
                })
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };

    let mut report = RecoveryReport::default();
    if seqs.is_empty() {
        let mut hard_state = HardState::default();
        let mut initial = Vec::new();
        if let Some(path) = &snapshot_path {
            if !opts.recover_damaged_tail {
                return Err(corrupt(
                    path,
                    0,
                    "a snapshot exists but no log segment (the hard state is lost; recovery \
                     mode, FileStorageOptions::recover_damaged_tail, can start from the \
                     snapshot alone)"
                        .into(),
                ));
            }
            let loss = RecordedLoss {
                loss: TailLoss {
                    intact_through: snapshot.index,
                    hard_state_lost: true,
                },
                hard_state: HardState::default(),
            };
            // The only hard state left is the one an earlier recovery recorded, if any.
            let merged = recorded.map_or(loss, |r| {
                r.merge_keeping(RecordedLoss {
                    hard_state: r.hard_state,
                    ..loss
                })
            });
            write_tail_loss(vfs, dir, &merged, opts.cluster_id, opts.node_id)?;
            hard_state = merged.hard_state;
            encode_record(&RecordRef::HardState(hard_state), &mut initial)?;
            recorded = Some(merged);
            report.damaged_tail = Some(DamagedTail {
                path: dir.to_path_buf(),
                offset: 0,
                reason: "no log segment".into(),
                removed_segments: Vec::new(),
            });
        }
        remove_all(vfs, dir, &debris, &mut report)?;
        let segment = new_segment(vfs, dir, opts, 1, hard_state, &initial)?;
        // The directory itself may be new: make its name durable in its parent too.
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        vfs.sync_dir(parent)
            .map_err(|e| io_error("fsync dir", parent, e))?;
        return Ok(Recovered {
            hard_state,
            log_hard_state: hard_state,
            snapshot,
            snapshot_path,
            snapshot_file_len,
            segments: vec![segment],
            index: LogIndex::new(snapshot.index + 1),
            needs_reset_marker: false,
            needs_hard_state_record: false,
            tail_loss: recorded,
            report,
        });
    }
    for pair in seqs.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(corrupt(
                &dir.join(segment_name(pair[1])),
                0,
                format!("segment {} is missing before it", pair[0] + 1),
            ));
        }
    }

    let mut replay = Replay {
        index: LogIndex::new(0),
        hard_state: HardState::default(),
        hard_state_seen: false,
    };
    let mut segments = Vec::with_capacity(seqs.len());
    let mut torn = None;
    let mut damage = None;
    for at in 0..seqs.len() {
        let scanned = scan_segment(vfs, dir, opts, &seqs, at, &mut replay)?;
        if let Some((offset, bytes)) = scanned.torn {
            torn = Some(TornTail {
                path: scanned.segment.path.clone(),
                offset,
                bytes,
            });
        }
        damage = scanned.damage;
        if damage.as_ref().is_some_and(|d| d.keep_through.is_none()) {
            break; // the damaged segment goes whole
        }
        segments.push(scanned.segment);
        if damage.is_some() {
            break;
        }
    }

    // Damage to synced data: an error, or in recovery mode a cut. The hard state is the last
    // one the records replay to; when no retained record holds one (the segments that did
    // were compacted away), the newest watermark's, which recorded it.
    let replayed_hard_state = replay.hard_state;
    let mut hard_state = match (replay.hard_state_seen, segments.last()) {
        (false, Some(seg)) if damage.is_none() => seg.watermark.hard_state,
        _ => replay.hard_state,
    };
    let mut cut: Option<(Damage, bool)> = None;
    // Bytes after the end of the log to zero: a torn write, or what a cut leaves.
    let mut zero: Option<(u64, u64)> = None;
    if let Some(d) = damage {
        if !opts.recover_damaged_tail {
            return Err(d.into_error());
        }
        torn = None; // the cut below zeroes everything after the intact records
                     // The newest watermark holds the hard state as of the last sync it records; without
                     // it, the newest intact record's (the damage may have taken a newer one).
        let newest = seqs[seqs.len() - 1];
        let (newest_hs, readable) = newest_watermark_hard_state(vfs, dir, opts, newest);
        hard_state = match (readable, newest_hs) {
            (true, Some(hs)) => hs,
            (_, best) if !replay.hard_state_seen => best.unwrap_or_default(),
            _ => replay.hard_state,
        };
        cut = Some((d, !readable));
    }

    // Reconcile the log with the snapshot.
    let (s, t) = (snapshot.index, snapshot.term);
    let mut index = replay.index;
    let mut needs_reset_marker = false;
    if index.is_empty() {
        index.reset(s + 1);
    } else if index.last() < s {
        index.reset(s + 1);
        needs_reset_marker = true;
    } else if index.first() > s + 1 {
        let (seq, offset) = index.location(index.first()).map(unpack).unwrap_or((0, 0));
        if snapshot_path.is_none() {
            // The log was compacted behind a snapshot that is gone.
            return Err(corrupt(
                &dir.join(snapshot_name(index.first() - 1)),
                0,
                format!(
                    "no snapshot file: the log starts at index {}, so the entries before it \
                     were compacted into a snapshot through index {} or later, and that \
                     snap-*.snap file is missing",
                    index.first(),
                    index.first() - 1
                ),
            ));
        }
        let path = segments
            .iter()
            .find(|g| g.seq == seq)
            .map_or_else(|| dir.to_path_buf(), |g| g.path.clone());
        return Err(corrupt(
            &path,
            offset,
            format!(
                "log starts at {} but the snapshot ends at {s} (a segment before this one is \
                 missing)",
                index.first()
            ),
        ));
    } else if index.first() <= s {
        if index.term(s) == Some(t) {
            index.drop_through(s);
        } else {
            index.reset(s + 1);
            needs_reset_marker = true;
        }
    }
    report.discarded_log = needs_reset_marker;

    // Everything is validated: repair. Debris first (a cut below writes a tail-loss.tmp of
    // its own), then a cut records the loss, durably, before it changes anything.
    debris.extend(stale_snapshots);
    remove_all(vfs, dir, &debris, &mut report)?;
    let was_cut = cut.is_some();
    if let Some((d, hard_state_lost)) = cut {
        let loss = RecordedLoss {
            loss: TailLoss {
                intact_through: index.last().max(s),
                hard_state_lost,
            },
            hard_state,
        };
        let merged = recorded.map_or(loss, |r| r.merge_keeping(loss));
        write_tail_loss(vfs, dir, &merged, opts.cluster_id, opts.node_id)?;
        recorded = Some(merged);
        rewrite_loss = false;
        // Later segments go first, so that a crash leaves the damaged segment the newest.
        let keep = if d.keep_through.is_some() {
            d.at + 1
        } else {
            d.at
        };
        let mut removed = Vec::new();
        for &seq in seqs[keep..].iter().rev() {
            let path = dir.join(segment_name(seq));
            vfs.remove(&path)
                .map_err(|e| io_error("remove", &path, e))?;
            removed.push(path);
        }
        removed.reverse();
        if !removed.is_empty() {
            vfs.sync_dir(dir)
                .map_err(|e| io_error("fsync dir", dir, e))?;
        }
        // The kept hard state is logged as part of the cut: no crash can leave a cut log
        // without it.
        let mut hs_record = Vec::new();
        encode_record(&RecordRef::HardState(hard_state), &mut hs_record)?;
        let fits = segments
            .last()
            .is_some_and(|g| g.end + hs_record.len() as u64 <= g.len);
        match segments.last_mut() {
            Some(seg) if d.keep_through.is_some() && fits => {
                cut_at_end(seg, &hs_record, replayed_hard_state, hard_state)?;
                let garbage = garbage_after(&seg.image()?, seg.end);
                zero = Some((seg.end, garbage));
            }
            last => {
                // The damaged segment goes whole, or the record does not fit after its intact
                // records: the cut ends in a fresh segment holding the hard state. (Anything
                // the damaged segment keeps becomes an older segment: its watermark is lowered
                // to its intact records after the fresh one is durable.)
                let seq = match last {
                    Some(seg) if d.keep_through.is_some() => seg.seq + 1,
                    _ => seqs[d.at],
                };
                let fresh = new_segment(vfs, dir, opts, seq, hard_state, &hs_record)?;
                if let Some(seg) = segments.last_mut().filter(|_| d.keep_through.is_some()) {
                    // Zeroed first (still below the old watermark: still damage if a crash
                    // comes now), then the watermark lowered to the intact records.
                    let garbage = garbage_after(&seg.image()?, seg.end);
                    if garbage > 0 {
                        zero_durably(seg, seg.end, garbage)?;
                    }
                    cut_at_end(seg, &[], replayed_hard_state, replayed_hard_state)?;
                }
                segments.push(fresh);
            }
        }
        if let Some(seg) = segments.last_mut() {
            seg.has_hard_state = true;
        }
        report.damaged_tail = Some(DamagedTail {
            path: d.path,
            offset: d.offset,
            reason: d.reason,
            removed_segments: removed,
        });
    }
    if rewrite_loss {
        if let Some(r) = &recorded {
            write_tail_loss(vfs, dir, r, opts.cluster_id, opts.node_id)?;
        }
    }
    if let Some(tail) = &torn {
        zero = Some((tail.offset, tail.bytes));
    }
    if let (Some((offset, bytes)), Some(seg)) = (zero.filter(|z| z.1 > 0), segments.last()) {
        zero_durably(seg, offset, bytes)?;
    }
    report.torn_tail = torn;
    // After a cut the log's records end with the kept hard state.
    let log_hard_state = if was_cut {
        hard_state
    } else {
        replayed_hard_state
    };
    Ok(Recovered {
        hard_state,
        log_hard_state,
        snapshot,
        snapshot_path,
        snapshot_file_len,
        segments,
        index,
        needs_reset_marker,
        needs_hard_state_record: hard_state != log_hard_state,
        tail_loss: recorded,
        report,
    })
}

/// Ends the damaged segment's log at `seg.end` (its intact records) followed by `record`
/// (the kept hard state's, or nothing), durably: writes the record there, fdatasyncs, then
/// the watermark "synced through" its end with `hard_state` (what the records then replay
/// to; `before` is what they replay to without `record`), and fdatasyncs again. Until that
/// watermark is durable the old one still covers the damage, so a crash in between leaves
/// the damage for the next recovery, never a cut log without the record. A damaged
/// watermark slot is rewritten too (the newest slot last).
fn cut_at_end(
    seg: &mut Segment,
    record: &[u8],
    before: HardState,
    hard_state: HardState,
) -> Result<(), StorageError> {
    if !record.is_empty() {
        seg.file
            .write_at(record, seg.end)
            .map_err(|e| io_error("write", &seg.path, e))?;
        seg.file
            .sync_data()
            .map_err(|e| io_error("fsync", &seg.path, e))?;
        seg.end += record.len() as u64;
    }
    let hard_state = if record.is_empty() {
        before
    } else {
        hard_state
    };
    let valid = {
        let image = seg.image()?;
        (0..2)
            .filter_map(|slot| {
                let at = SLOT_OFFSETS[slot] as usize;
                Watermark::decode(image.get(at..).unwrap_or(&[]), slot, seg.seq, &seg.path).ok()
            })
            .map(|w| w.generation)
            .collect::<Vec<_>>()
    };
    let newest = valid.iter().copied().max().unwrap_or(0);
    let fresh = Watermark {
        generation: newest + 1,
        seq: seg.seq,
        synced_end: seg.end,
        hard_state,
    };
    // Both slots must be valid and consecutive afterwards. The new generation goes into the
    // slot of the older (or damaged) one; if both were damaged, the other is rewritten
    // first, as the generation before it.
    let mut writes = Vec::new();
    if valid.is_empty() {
        writes.push(Watermark {
            generation: newest,
            ..fresh
        });
    }
    writes.push(fresh);
    for w in writes {
        seg.file
            .write_at(&w.encode(), w.offset())
            .map_err(|e| io_error("write", &seg.path, e))?;
        seg.file
            .sync_data()
            .map_err(|e| io_error("fsync", &seg.path, e))?;
    }
    seg.watermark = fresh;
    Ok(())
}

/// Zeroes `bytes` bytes at `offset` of the segment and fdatasyncs them.
fn zero_durably(seg: &Segment, offset: u64, bytes: u64) -> Result<(), StorageError> {
    let zeroes = vec![0u8; bytes as usize];
    seg.file
        .write_at(&zeroes, offset)
        .map_err(|e| io_error("write", &seg.path, e))?;
    seg.file
        .sync_data()
        .map_err(|e| io_error("fsync", &seg.path, e))
}

/// A fresh segment `seq` (of the configured size, or smaller on a small disk) holding the
/// framed records `initial`, its watermark "synced through" them with `hard_state` (what the
/// log replays to there).
fn new_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    opts: &FileStorageOptions,
    seq: u64,
    hard_state: HardState,
    initial: &[u8],
) -> Result<Segment, StorageError> {
    let header = SegmentHeader {
        cluster_id: opts.cluster_id,
        node_id: opts.node_id,
        seq,
        allocated_len: 0,
    };
    let needed = RECORDS_START + initial.len() as u64 + 64;
    let mut seg = create_segment_fitting(
        vfs,
        dir,
        header,
        hard_state,
        initial,
        opts.segment_size,
        needed,
    )
    .map_err(|(e, _)| e)?;
    seg.has_hard_state = !initial.is_empty();
    Ok(seg)
}

fn remove_all(
    vfs: &dyn Vfs,
    dir: &Path,
    paths: &[PathBuf],
    report: &mut RecoveryReport,
) -> Result<(), StorageError> {
    for path in paths {
        vfs.remove(path).map_err(|e| io_error("remove", path, e))?;
        report.removed_files.push(path.clone());
    }
    if !paths.is_empty() {
        vfs.sync_dir(dir)
            .map_err(|e| io_error("fsync dir", dir, e))?;
    }
    Ok(())
}
