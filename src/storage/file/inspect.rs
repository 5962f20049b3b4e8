//! Read-only inspection of a storage directory (used by `examples/inspect.rs`).
//!
//! Unlike `open`, [`inspect`] changes nothing, checks no identity, takes no lock, and does not
//! stop at the first damage: it describes every snapshot and segment file it finds, with what
//! `open` would make of it by the tear-or-damage rule (see `segment.rs`): *damage* (synced
//! bytes that no longer verify: `open` refuses them, recovery mode cuts the log there) or a
//! *torn tail* (never-synced bytes above the newest segment's watermark: `open` cuts them).
//! Snapshots are checksummed a chunk at a time, never read whole.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::segment::{parse_segment_name, scan_records, Record, SegmentHeader, RECORDS_START};
use super::snapshot::{parse_snapshot_name, SnapshotHeader, SNAPSHOT_HEADER_LEN};
use super::tail_loss::TAIL_LOSS_NAME;
use super::watermark::read_watermark;
use crate::error::StorageError;
use crate::raft::{HardState, Index, SnapshotMeta};

/// One snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The file.
    pub path: PathBuf,
    /// Its header's (index, term), when the header is readable.
    pub meta: Option<SnapshotMeta>,
    /// Cluster and node in the header.
    pub identity: Option<(u64, u64)>,
    /// File length.
    pub bytes: u64,
    /// What is wrong with it, if anything.
    pub damage: Option<String>,
}

/// One segment file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The file.
    pub path: PathBuf,
    /// Sequence number from the name.
    pub seq: u64,
    /// Cluster and node in the header.
    pub identity: Option<(u64, u64)>,
    /// File length.
    pub bytes: u64,
    /// Offset after the last valid record.
    pub used_bytes: u64,
    /// What the newest watermark slot says was synced (`None` when the slots are damaged).
    pub synced_through: Option<u64>,
    /// Entry records (including ones later overwritten or truncated).
    pub entries: u64,
    /// Hard state records.
    pub hard_states: u64,
    /// Truncation records.
    pub truncations: u64,
    /// Smallest and largest entry index recorded.
    pub index_range: Option<(Index, Index)>,
    /// The last hard state recorded.
    pub last_hard_state: Option<HardState>,
    /// Damage to synced bytes, if any: `open` refuses it (recovery mode cuts the log there).
    pub damage: Option<String>,
    /// A torn write above the newest segment's watermark `(offset, bytes)`: never synced,
    /// `open` cuts it. Not damage.
    pub torn_tail: Option<(u64, u64)>,
}

/// Everything found in a directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Snapshot files, by index.
    pub snapshots: Vec<SnapshotInfo>,
    /// Segment files, by sequence number.
    pub segments: Vec<SegmentInfo>,
    /// The tail-loss file (recovery mode cut damaged records and the cluster has not yet
    /// repaired the node), described.
    pub tail_loss: Option<String>,
    /// Other names (the lock, temporary files, foreign files).
    pub other_files: Vec<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, StorageError> {
    std::fs::read(path).map_err(|source| StorageError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Describes the storage directory `dir` without changing it.
pub fn inspect(dir: &Path) -> Result<Inspection, StorageError> {
    let mut out = Inspection::default();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| StorageError::Io {
            op: "list",
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let newest_seq = names.iter().filter_map(|n| parse_segment_name(n)).max();
    for name in names {
        let path = dir.join(&name);
        if parse_snapshot_name(&name).is_some() {
            out.snapshots.push(inspect_snapshot(&path)?);
        } else if name == TAIL_LOSS_NAME {
            let bytes = read(&path)?;
            out.tail_loss = Some(describe_tail_loss(&bytes, &path));
        } else if let Some(seq) = parse_segment_name(&name) {
            out.segments.push(inspect_segment(
                &path,
                seq,
                Some(seq) == newest_seq,
                &read(&path)?,
            ));
        } else {
            out.other_files.push(name);
        }
    }
    Ok(out)
}

/// Bytes read at a time when checksumming a snapshot's content.
const SNAPSHOT_READ_CHUNK: u64 = 1 << 20;

/// Describes a snapshot file, streaming its content through the checksum (a snapshot may be
/// larger than memory).
fn inspect_snapshot(path: &Path) -> Result<SnapshotInfo, StorageError> {
    let io = |op: &'static str| {
        move |source| StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = File::open(path).map_err(io("open"))?;
    let bytes = file.metadata().map_err(io("stat"))?.len();
    let mut info = SnapshotInfo {
        path: path.to_path_buf(),
        meta: None,
        identity: None,
        bytes,
        damage: None,
    };
    let mut header = Vec::new();
    (&mut file)
        .take(SNAPSHOT_HEADER_LEN)
        .read_to_end(&mut header)
        .map_err(io("read"))?;
    match SnapshotHeader::decode(&header, path) {
        Err(e) => info.damage = Some(e.to_string()),
        Ok(h) => {
            info.meta = Some(h.meta);
            info.identity = Some((h.cluster_id, h.node_id));
            info.damage = if SNAPSHOT_HEADER_LEN.checked_add(h.data_len) != Some(bytes) {
                Some(format!("length {bytes} does not match the header"))
            } else {
                let mut hasher = crc32fast::Hasher::new();
                let mut buf = vec![0u8; h.data_len.min(SNAPSHOT_READ_CHUNK) as usize];
                let mut done = 0;
                while done < h.data_len {
                    let n = (h.data_len - done).min(buf.len() as u64) as usize;
                    file.read_exact(&mut buf[..n]).map_err(io("read"))?;
                    hasher.update(&buf[..n]);
                    done += n as u64;
                }
                (hasher.finalize() != h.data_crc).then(|| "data checksum mismatch".into())
            };
        }
    }
    Ok(info)
}

fn describe_tail_loss(bytes: &[u8], path: &Path) -> String {
    let h = match super::header::check(bytes, b"RKVLOSS\x01", "tail-loss", path) {
        Ok(h) if bytes.len() == super::header::LEN => h,
        Ok(_) => return format!("damage: {} bytes, not 64", bytes.len()),
        Err(e) => return format!("damage: {e}"),
    };
    let u = |at| super::segment::read_u64(h, at).unwrap_or(0);
    format!(
        "entries after index {} lost{}, newest known hard state term {} vote {}; the node \
         neither votes nor counts toward commits until a leader has repaired it",
        u(32),
        if h[56] == 1 {
            ", hard state possibly lost"
        } else {
            ""
        },
        u(40),
        match u(48) {
            0 => "none".to_string(),
            v => v.to_string(),
        }
    )
}

fn inspect_segment(path: &Path, seq: u64, newest: bool, bytes: &[u8]) -> SegmentInfo {
    let mut info = SegmentInfo {
        path: path.to_path_buf(),
        seq,
        bytes: bytes.len() as u64,
        ..Default::default()
    };
    let header = match SegmentHeader::decode(bytes, path) {
        Ok(h) => h,
        Err(e) => {
            info.damage = Some(e.to_string());
            return info;
        }
    };
    info.identity = Some((header.cluster_id, header.node_id));
    if header.allocated_len != bytes.len() as u64 {
        info.damage = Some(format!(
            "length does not match the header's {}",
            header.allocated_len
        ));
        return info;
    }
    if bytes.len() < RECORDS_START as usize {
        info.damage = Some("file shorter than its header and watermark".into());
        return info;
    }
    let (synced_end, newest_rule) =
        match read_watermark(bytes, bytes.len() as u64, seq, RECORDS_START, path) {
            Ok(w) => {
                info.synced_through = Some(w.synced_end);
                (w.synced_end, newest)
            }
            Err(e) => {
                // Go on with the records anyway, trusting none of them as synced.
                info.damage = Some(e.to_string());
                (RECORDS_START, true)
            }
        };
    let scan = scan_records(bytes, path, synced_end, newest_rule, |_, record| {
        match record {
            Record::HardState(hs) => {
                info.hard_states += 1;
                info.last_hard_state = Some(hs);
            }
            Record::Truncate { .. } => info.truncations += 1,
            Record::Entry(e) => {
                info.entries += 1;
                info.index_range = Some(match info.index_range {
                    None => (e.index, e.index),
                    Some((lo, hi)) => (lo.min(e.index), hi.max(e.index)),
                });
            }
        }
        Ok(())
    });
    match scan {
        Ok(end) => {
            info.used_bytes = end.end;
            if info.damage.is_none() {
                info.torn_tail = end.torn;
            }
        }
        Err(e) => {
            if let StorageError::Corrupt { offset, .. } = &e {
                info.used_bytes = *offset; // valid records end where the damage starts
            }
            info.damage.get_or_insert(e.to_string());
        }
    }
    info
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.snapshots.is_empty() {
            writeln!(f, "snapshot: none")?;
        }
        for s in &self.snapshots {
            write!(f, "snapshot {}: {} bytes", s.path.display(), s.bytes)?;
            if let Some(m) = s.meta {
                write!(f, ", index {} term {}", m.index, m.term)?;
            }
            if let Some((c, n)) = s.identity {
                write!(f, ", cluster {c} node {n}")?;
            }
            writeln!(f, ", {}", s.damage.as_deref().unwrap_or("ok"))?;
        }
        for s in &self.segments {
            write!(
                f,
                "segment {} ({}): {}/{} bytes used",
                s.seq,
                s.path.display(),
                s.used_bytes,
                s.bytes
            )?;
            if let Some((c, n)) = s.identity {
                write!(f, ", cluster {c} node {n}")?;
            }
            write!(
                f,
                ", {} entries, {} hard states, {} truncations",
                s.entries, s.hard_states, s.truncations
            )?;
            if let Some((lo, hi)) = s.index_range {
                write!(f, ", indexes {lo}..={hi}")?;
            }
            if let Some(hs) = s.last_hard_state {
                write!(f, ", hard state term {} vote {:?}", hs.term, hs.vote)?;
            }
            if let Some(w) = s.synced_through {
                write!(f, ", synced through {w}")?;
            }
            match (&s.damage, s.torn_tail) {
                (Some(d), _) => writeln!(
                    f,
                    ", DAMAGE: {d} (synced data: open refuses it; recovery mode cuts the log \
                     there)"
                )?,
                (None, Some((offset, bytes))) => writeln!(
                    f,
                    ", torn tail: {bytes} bytes at offset {offset}, above the synced watermark \
                     (never synced: open cuts them)"
                )?,
                (None, None) => writeln!(f, ", ok")?,
            }
        }
        if let Some(t) = &self.tail_loss {
            writeln!(f, "tail loss: {t}")?;
        }
        for name in &self.other_files {
            writeln!(f, "other file: {name}")?;
        }
        Ok(())
    }
}
