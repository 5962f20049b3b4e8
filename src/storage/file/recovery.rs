//! Recovery: rebuilding the storage's state from its directory at `open`.
//!
//! Steps, all read-only until everything has been validated:
//! 1. Classify the directory: segments `seg-*.log`, snapshots `snap-*.snap`, and debris of an
//!    interrupted write (`seg-*.tmp`, `snap.tmp`). Unknown names are left alone.
//! 2. The newest snapshot must verify (identity, length, both checksums); older ones are stale.
//! 3. Segment numbers must be contiguous; each header must verify and name this cluster and
//!    node, its sequence number and allocated length must match the file.
//! 4. Replay every record in order (see `segment.rs`): the last `HardState` wins; entries and
//!    truncations rebuild the [`LogIndex`]. An entry that leaves a gap after the log is damage.
//!    Only the newest segment may end in a torn record (a checksum failure followed by nothing
//!    but zeroes); anything else undecodable is [`StorageError::Corrupt`].
//! 5. Reconcile with the snapshot `(S, T)`: an empty log or one ending below `S` is replaced by
//!    the empty log after `S`; a log starting at `S + 1` continues it; a log holding `S` with
//!    term `T` is kept after `S`; one holding `S` with another term is discarded; a log
//!    starting after `S + 1` leaves a gap: corruption. A discarded non-empty log must be
//!    followed by a `Truncate` marker before new entries (the caller writes it).
//! 6. Repair: zero the torn tail and fdatasync it, remove debris and stale snapshots, fsync the
//!    directory. Each repair is listed in the [`RecoveryReport`].
//!
//! A directory without segments is new: the first segment is created and the parent directory
//! fsynced (it is an error if a snapshot exists, since the hard state would then be lost).

use std::path::{Path, PathBuf};

use super::log_index::{pack, unpack, LogIndex};
use super::segment::{
    create_segment, parse_segment_name, scan_records, segment_name, Record, Segment, SegmentHeader,
    HEADER_LEN,
};
use super::snapshot::{parse_snapshot_name, snapshot_name, verify_snapshot, SNAPSHOT_TEMP_NAME};
use super::vfs::{io_error, Vfs};
use super::{FileStorageOptions, RecoveryReport, TornTail};
use crate::error::StorageError;
use crate::raft::{HardState, Index, SnapshotMeta};

/// What recovery found.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub hard_state: HardState,
    pub snapshot: SnapshotMeta,
    pub snapshot_path: Option<PathBuf>,
    pub snapshot_file_len: u64,
    /// Non-empty, ascending and contiguous; the last is the active segment.
    pub segments: Vec<Segment>,
    pub index: LogIndex,
    /// The replayed log was discarded for the snapshot: a `Truncate` marker must be logged.
    pub needs_reset_marker: bool,
    pub report: RecoveryReport,
}

/// Replays records into the log index and hard state.
struct Replay {
    index: LogIndex,
    hard_state: HardState,
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
    for name in vfs.list(dir).map_err(|e| io_error("list", dir, e))? {
        if let Some(seq) = parse_segment_name(&name) {
            seqs.push(seq);
        } else if let Some(index) = parse_snapshot_name(&name) {
            snaps.push(index);
        } else if name == SNAPSHOT_TEMP_NAME || (name.starts_with("seg-") && name.ends_with(".tmp"))
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

    let mut report = RecoveryReport::default();
    if seqs.is_empty() {
        if let Some(path) = &snapshot_path {
            return Err(corrupt(
                path,
                0,
                "a snapshot exists but no log segment (the hard state is lost)".into(),
            ));
        }
        remove_all(vfs, dir, &debris, &mut report)?;
        let segment = create_segment(vfs, dir, header(opts, 1, opts.segment_size))?;
        // The directory itself may be new: make its name durable in its parent too.
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        vfs.sync_dir(parent)
            .map_err(|e| io_error("fsync dir", parent, e))?;
        return Ok(Recovered {
            hard_state: HardState::default(),
            snapshot,
            snapshot_path,
            snapshot_file_len,
            segments: vec![segment],
            index: LogIndex::new(1),
            needs_reset_marker: false,
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
    };
    let mut segments = Vec::with_capacity(seqs.len());
    let mut torn = None;
    for (k, &seq) in seqs.iter().enumerate() {
        let newest = k + 1 == seqs.len();
        let path = dir.join(segment_name(seq));
        let file = vfs.open(&path).map_err(|e| io_error("open", &path, e))?;
        let len = file.len().map_err(|e| io_error("stat", &path, e))?;
        let map = file.map().map_err(|e| io_error("mmap", &path, e))?;
        let mut seg = Segment {
            seq,
            path: path.clone(),
            file,
            map,
            len,
            end: HEADER_LEN,
            max_index: 0,
            has_hard_state: false,
        };
        if len < HEADER_LEN {
            return Err(corrupt(
                &path,
                len,
                "file shorter than a segment header".into(),
            ));
        }
        let image = seg.image()?;
        let h = SegmentHeader::decode(&image, &path)?;
        h.check_identity(opts.cluster_id, opts.node_id, &path)?;
        if h.seq != seq {
            return Err(corrupt(&path, 32, format!("header says segment {}", h.seq)));
        }
        if h.allocated_len != len || len > u64::from(u32::MAX) {
            return Err(corrupt(
                &path,
                len.min(h.allocated_len),
                format!("file is {len} bytes, header says {}", h.allocated_len),
            ));
        }
        let mut seen = (0, false);
        let end = scan_records(&image, &path, newest, |offset, record| {
            replay.apply(seq, &path, &mut seen, offset, record)
        })?;
        drop(image);
        // Unmap the pages the scan touched (they stay in the page cache, out of our resident
        // set) and map afresh for later reads, so recovery's peak is about one segment.
        if seg.map.take().is_some() {
            seg.map = seg.file.map().map_err(|e| io_error("mmap", &path, e))?;
        }
        (seg.max_index, seg.has_hard_state) = seen;
        seg.end = end.end;
        if let Some((offset, bytes)) = end.torn {
            torn = Some(TornTail {
                path: path.clone(),
                offset,
                bytes,
            });
        }
        segments.push(seg);
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
        let path = segments
            .iter()
            .find(|g| g.seq == seq)
            .map_or_else(|| dir.to_path_buf(), |g| g.path.clone());
        return Err(corrupt(
            &path,
            offset,
            format!(
                "log starts at {} but the snapshot ends at {s}",
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

    // Everything is validated: repair.
    if let Some(tail) = &torn {
        if let Some(seg) = segments.last() {
            let zeroes = vec![0u8; tail.bytes as usize];
            seg.file
                .write_at(&zeroes, tail.offset)
                .map_err(|e| io_error("write", &seg.path, e))?;
            seg.file
                .sync_data()
                .map_err(|e| io_error("fsync", &seg.path, e))?;
        }
    }
    report.torn_tail = torn;
    debris.extend(stale_snapshots);
    remove_all(vfs, dir, &debris, &mut report)?;
    Ok(Recovered {
        hard_state: replay.hard_state,
        snapshot,
        snapshot_path,
        snapshot_file_len,
        segments,
        index,
        needs_reset_marker,
        report,
    })
}

fn header(opts: &FileStorageOptions, seq: u64, allocated_len: u64) -> SegmentHeader {
    SegmentHeader {
        cluster_id: opts.cluster_id,
        node_id: opts.node_id,
        seq,
        allocated_len,
    }
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
