//! Log segment files and record framing.
//!
//! # On-disk format (version 1)
//! A segment is named `seg-<seq, 20 digits>.log` and is preallocated (zero-filled) to its final
//! length when created, under the temporary name `seg-<seq>.tmp` which is fsynced and then
//! renamed into place (so a named segment always has a complete header). All integers are
//! little-endian.
//!
//! ```text
//! header, 64 bytes:
//!   0..8    magic  b"RKVLOG\0\x01"
//!   8..12   format version (u32) = 1
//!   12..16  zero
//!   16..24  cluster id (u64)
//!   24..32  node id (u64)
//!   32..40  sequence number of the segment (u64), equal to the one in the name
//!   40..48  allocated length of the file (u64); the file must be exactly that long
//!   48..60  zero
//!   60..64  crc32 of bytes 0..60
//! records, from offset 64, back to back:
//!   0..4    payload length n (u32, > 0)
//!   4..8    crc32 of bytes 0..4 followed by the payload
//!   8..8+n  payload: a postcard-encoded `Record` (HardState | Entry | Truncate { from })
//! then zeroes up to the allocated length: a length field of 0 ends the log.
//! ```
//!
//! # Invariants
//! - Records are only ever written after the current end, in one `write_at` per `sync`, and a
//!   segment is fdatasynced before the next one is created, so only the newest segment can end
//!   in a torn record, and a torn record is followed by zeroes only.
//! - Every segment that holds records starts with a `HardState` record (the hard state as of its
//!   creation), so deleting older segments never loses the hard state.
//! - Known limit: the torn-tail rule assumes a crash leaves a *prefix* of the last write (as the
//!   simulated disk does). A disk that persists the sectors of one write out of order can leave
//!   a damaged record followed by an intact one; recovery then refuses to open (`Corrupt`, with
//!   file and offset) rather than guess, and `examples/inspect.rs` shows where.
//! - Replaying the records of all segments in order rebuilds the log: an `Entry` at index `i`
//!   replaces the entries `i..` (overwrite semantics), `Truncate { from }` removes `from..`
//!   (`from` at or below the first index empties the log).

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::header;
use super::vfs::{io_error, Vfs, VfsFile};
use crate::error::StorageError;
use crate::raft::{Entry, HardState, Index};

/// Magic bytes at the start of every segment.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"RKVLOG\0\x01";
/// Current on-disk format version (segments and snapshots).
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Bytes of a segment header.
pub(crate) const HEADER_LEN: u64 = header::LEN as u64;
/// Bytes of a record's length + checksum prefix.
pub(crate) const RECORD_PREFIX: u64 = 8;
/// Chunk size used to zero-fill new segments.
const FILL_CHUNK: usize = 1 << 20;

/// A record as written (borrows the entry).
#[derive(Serialize)]
pub(crate) enum RecordRef<'a> {
    HardState(HardState),
    Entry(&'a Entry),
    Truncate { from: Index },
}

/// A record as read back. Same variant order as [`RecordRef`].
#[derive(Debug, Deserialize)]
pub(crate) enum Record {
    HardState(HardState),
    Entry(Entry),
    Truncate { from: Index },
}

/// Appends the framed record to `out`.
pub(crate) fn encode_record(record: &RecordRef<'_>, out: &mut Vec<u8>) -> Result<(), StorageError> {
    let payload = postcard::to_stdvec(record)
        .map_err(|e| StorageError::Invalid(format!("cannot encode record: {e}")))?;
    let len = u32::try_from(payload.len())
        .map_err(|_| StorageError::Invalid(format!("record of {} bytes", payload.len())))?;
    let len_bytes = len.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(&payload);
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Decodes one framed record at the start of `bytes` (used for reads after recovery, where the
/// record is known to be complete). Returns the record and its framed length.
pub(crate) fn decode_record_at(
    bytes: &[u8],
    path: &Path,
    offset: u64,
) -> Result<Record, StorageError> {
    let corrupt = |reason: &str| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.to_owned(),
    };
    let len = read_u32(bytes, 0).ok_or_else(|| corrupt("record prefix past end of file"))?;
    let crc = read_u32(bytes, 4).ok_or_else(|| corrupt("record prefix past end of file"))?;
    let payload = bytes
        .get(RECORD_PREFIX as usize..RECORD_PREFIX as usize + len as usize)
        .ok_or_else(|| corrupt("record runs past end of file"))?;
    if record_crc(len, payload) != crc {
        return Err(corrupt("record checksum mismatch"));
    }
    postcard::from_bytes(payload).map_err(|_| corrupt("undecodable record"))
}

fn record_crc(len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

pub(crate) fn all_zero(bytes: &[u8]) -> bool {
    // Eight bytes at a time, then the remainder.
    let mut words = bytes.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// The identity fields of a segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub cluster_id: u64,
    pub node_id: u64,
    pub seq: u64,
    pub allocated_len: u64,
}

impl SegmentHeader {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = header::begin(&SEGMENT_MAGIC, self.cluster_id, self.node_id);
        h[32..40].copy_from_slice(&self.seq.to_le_bytes());
        h[40..48].copy_from_slice(&self.allocated_len.to_le_bytes());
        header::seal(&mut h);
        h
    }

    /// Parses and checks a header (magic, version, checksum); identity is checked by the caller.
    pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<SegmentHeader, StorageError> {
        let h = header::check(bytes, &SEGMENT_MAGIC, "segment", path)?;
        Ok(SegmentHeader {
            cluster_id: read_u64(h, 16).unwrap_or(0),
            node_id: read_u64(h, 24).unwrap_or(0),
            seq: read_u64(h, 32).unwrap_or(0),
            allocated_len: read_u64(h, 40).unwrap_or(0),
        })
    }

    /// Refuses a header of another cluster or node.
    pub(crate) fn check_identity(
        &self,
        cluster_id: u64,
        node_id: u64,
        path: &Path,
    ) -> Result<(), StorageError> {
        if self.cluster_id != cluster_id || self.node_id != node_id {
            return Err(StorageError::WrongIdentity {
                path: path.to_path_buf(),
                reason: format!(
                    "cluster {} node {}, expected cluster {cluster_id} node {node_id}",
                    self.cluster_id, self.node_id
                ),
            });
        }
        Ok(())
    }
}

/// How a scan of a segment's records ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanEnd {
    /// Offset just after the last valid record.
    pub end: u64,
    /// A torn record at the end (offset, bytes up to its claimed end), when allowed.
    pub torn: Option<(u64, u64)>,
}

/// Walks the records of a segment image (`data` is the whole file), calling `on_record` with
/// each record's offset. `torn_allowed` is true for the newest segment only: there, a record
/// failing its checksum and followed by nothing but zeroes ends the scan as a torn tail.
/// Anything else that is not a valid record or the zero tail is [`StorageError::Corrupt`].
pub(crate) fn scan_records(
    data: &[u8],
    path: &Path,
    torn_allowed: bool,
    mut on_record: impl FnMut(u64, Record) -> Result<(), StorageError>,
) -> Result<ScanEnd, StorageError> {
    let corrupt = |offset: u64, reason: &str| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.to_owned(),
    };
    let file_len = data.len() as u64;
    let mut off = HEADER_LEN;
    loop {
        let at = off as usize;
        let rest = data.get(at..).unwrap_or(&[]);
        if rest.len() < RECORD_PREFIX as usize {
            if all_zero(rest) {
                return Ok(ScanEnd {
                    end: off,
                    torn: None,
                });
            }
            return Err(corrupt(off, "stray bytes after the last record"));
        }
        let len = read_u32(rest, 0).unwrap_or(0);
        let crc = read_u32(rest, 4).unwrap_or(0);
        if len == 0 {
            if all_zero(rest) {
                return Ok(ScanEnd {
                    end: off,
                    torn: None,
                });
            }
            return Err(corrupt(off, "non-zero bytes after the end of the log"));
        }
        let end = off + RECORD_PREFIX + u64::from(len);
        if end > file_len {
            return Err(corrupt(
                off,
                "record length runs past the end of the segment",
            ));
        }
        let payload = &data[at + RECORD_PREFIX as usize..end as usize];
        if record_crc(len, payload) != crc {
            if torn_allowed && all_zero(&data[end as usize..]) {
                return Ok(ScanEnd {
                    end: off,
                    torn: Some((off, end - off)),
                });
            }
            return Err(corrupt(off, "record checksum mismatch"));
        }
        let record =
            postcard::from_bytes(payload).map_err(|_| corrupt(off, "undecodable record"))?;
        on_record(off, record)?;
        off = end;
    }
}

/// Name of segment `seq`.
pub(crate) fn segment_name(seq: u64) -> String {
    format!("seg-{seq:020}.log")
}

/// Temporary name of segment `seq` while it is being created.
pub(crate) fn segment_temp_name(seq: u64) -> String {
    format!("seg-{seq:020}.tmp")
}

/// Parses `seg-<20 digits>.log`.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// An open segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    pub file: Box<dyn VfsFile>,
    /// Read-only map of the whole file (real file system only).
    pub map: Option<Mmap>,
    /// Allocated length of the file.
    pub len: u64,
    /// Offset after the last record written to the file (excluding the storage's pending bytes).
    pub end: u64,
    /// Highest entry index recorded in this segment (0 if none).
    pub max_index: Index,
    /// Whether the segment holds a `HardState` record (written or pending).
    pub has_hard_state: bool,
}

impl Segment {
    /// Reads `len` bytes at `offset` of the written part of the file.
    pub(crate) fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        let corrupt = || StorageError::Corrupt {
            path: self.path.clone(),
            offset,
            reason: "read past the end of the segment".into(),
        };
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(corrupt)?;
        if let Some(map) = &self.map {
            return Ok(map
                .get(offset as usize..end as usize)
                .ok_or_else(corrupt)?
                .to_vec());
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_at(&mut buf, offset)
            .map_err(|e| io_error("read", &self.path, e))?;
        Ok(buf)
    }

    /// Reads and decodes the record at `offset`.
    pub(crate) fn read_record(&self, offset: u64) -> Result<Record, StorageError> {
        if let Some(map) = &self.map {
            let bytes = map.get(offset as usize..).unwrap_or(&[]);
            return decode_record_at(bytes, &self.path, offset);
        }
        let prefix = self.read(offset, RECORD_PREFIX)?;
        let len = u64::from(read_u32(&prefix, 0).unwrap_or(0));
        let bytes = self.read(offset, RECORD_PREFIX + len)?;
        decode_record_at(&bytes, &self.path, offset)
    }

    /// The whole file, mapped or read.
    pub(crate) fn image(&self) -> Result<ImageRef<'_>, StorageError> {
        match &self.map {
            Some(map) => Ok(ImageRef::Mapped(map)),
            None => Ok(ImageRef::Owned(self.read(0, self.len)?)),
        }
    }
}

/// A whole segment image, borrowed from the map or read into memory.
pub(crate) enum ImageRef<'a> {
    Mapped(&'a Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for ImageRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ImageRef::Mapped(m) => m,
            ImageRef::Owned(v) => v,
        }
    }
}

/// Creates segment `seq` of `len` bytes: writes header and zeroes under the temporary name,
/// fdatasyncs it, renames it into place and fsyncs the directory. On failure the temporary
/// file is removed (best effort) and nothing named `seg-<seq>.log` exists.
pub(crate) fn create_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    header: SegmentHeader,
) -> Result<Segment, StorageError> {
    let temp = dir.join(segment_temp_name(header.seq));
    let path = dir.join(segment_name(header.seq));
    let result = (|| {
        let file = vfs
            .create(&temp)
            .map_err(|e| io_error("create", &temp, e))?;
        file.set_len(header.allocated_len)
            .map_err(|e| io_error("set_len", &temp, e))?;
        // Zero-fill so the blocks are really allocated: later appends then never hit ENOSPC
        // and fdatasync need not update allocation metadata.
        let mut chunk = vec![0u8; FILL_CHUNK.min(header.allocated_len as usize)];
        chunk[..HEADER_LEN as usize].copy_from_slice(&header.encode());
        let mut off = 0u64;
        while off < header.allocated_len {
            let n = (header.allocated_len - off).min(chunk.len() as u64) as usize;
            file.write_at(&chunk[..n], off)
                .map_err(|e| io_error("write", &temp, e))?;
            if off == 0 {
                chunk[..HEADER_LEN as usize].fill(0);
            }
            off += n as u64;
        }
        file.sync_data().map_err(|e| io_error("fsync", &temp, e))?;
        vfs.rename(&temp, &path)
            .map_err(|e| io_error("rename", &temp, e))?;
        vfs.sync_dir(dir)
            .map_err(|e| io_error("fsync dir", dir, e))?;
        let map = file.map().map_err(|e| io_error("mmap", &path, e))?;
        Ok(Segment {
            seq: header.seq,
            path: path.clone(),
            file,
            map,
            len: header.allocated_len,
            end: HEADER_LEN,
            max_index: 0,
            has_hard_state: false,
        })
    })();
    if result.is_err() {
        let _ = vfs.remove(&temp); // best effort: recovery removes leftovers too
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryPayload;

    fn image_with(records: &[RecordRef<'_>]) -> Vec<u8> {
        let header = SegmentHeader {
            cluster_id: 1,
            node_id: 2,
            seq: 1,
            allocated_len: 4096,
        };
        let mut img = header.encode().to_vec();
        for r in records {
            encode_record(r, &mut img).unwrap();
        }
        img.resize(4096, 0);
        img
    }

    fn scan(img: &[u8], torn_allowed: bool) -> Result<(ScanEnd, usize), StorageError> {
        let mut n = 0;
        let end = scan_records(img, Path::new("s"), torn_allowed, |_, _| {
            n += 1;
            Ok(())
        })?;
        Ok((end, n))
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = SegmentHeader {
            cluster_id: 7,
            node_id: 3,
            seq: 42,
            allocated_len: 1 << 20,
        };
        let bytes = h.encode();
        assert_eq!(SegmentHeader::decode(&bytes, Path::new("x")).unwrap(), h);
        let mut bad = bytes;
        bad[35] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad, Path::new("x")),
            Err(StorageError::Corrupt { offset: 60, .. })
        ));
        assert!(matches!(
            h.check_identity(7, 4, Path::new("x")),
            Err(StorageError::WrongIdentity { .. })
        ));
    }

    #[test]
    fn torn_tail_only_in_newest_segment_and_only_before_zeroes() {
        let e = Entry {
            index: 1,
            term: 1,
            payload: EntryPayload::Command(b"hello".into()),
        };
        let img = image_with(&[
            RecordRef::HardState(HardState::default()),
            RecordRef::Entry(&e),
        ]);
        let (end, n) = scan(&img, false).unwrap();
        assert_eq!(n, 2);
        assert!(end.torn.is_none());
        // Damage the last record's payload: torn in the newest segment, corrupt elsewhere.
        let mut torn = img.clone();
        torn[end.end as usize - 1] ^= 0xff;
        let (t, n) = scan(&torn, true).unwrap();
        assert_eq!(n, 1);
        assert!(t.torn.is_some());
        assert!(matches!(
            scan(&torn, false),
            Err(StorageError::Corrupt { .. })
        ));
        // Garbage after the end of the log is corruption.
        let mut stray = img;
        stray[3000] = 1;
        assert!(
            matches!(scan(&stray, true), Err(StorageError::Corrupt { offset, .. }) if offset == end.end)
        );
    }

    #[test]
    fn segment_names_parse() {
        assert_eq!(parse_segment_name(&segment_name(17)), Some(17));
        assert_eq!(parse_segment_name("seg-1.log"), None);
        assert_eq!(parse_segment_name(&segment_temp_name(17)), None);
    }
}
