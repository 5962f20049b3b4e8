//! Log segment files and record framing.
//!
//! # On-disk format (version 2)
//! A segment is named `seg-<seq, 20 digits>.log` and is preallocated (zero-filled) to its final
//! length when created, under the temporary name `seg-<seq>.tmp` which is fsynced and then
//! renamed into place (so a named segment always has a complete header and watermark). All
//! integers are little-endian.
//!
//! ```text
//! header, 64 bytes at offset 0:
//!   0..8    magic  b"RKVLOG\0\x01"
//!   8..12   format version (u32) = 2
//!   12..16  zero
//!   16..24  cluster id (u64)
//!   24..32  node id (u64)
//!   32..40  sequence number of the segment (u64), equal to the one in the name
//!   40..48  allocated length of the file (u64); the file must be exactly that long
//!   48..60  zero
//!   60..64  crc32 of bytes 0..60
//!   64..512 zero (the rest of the header's sector)
//! synced watermark, two 64-byte slots at offsets 512 and 1024 (see `watermark.rs`)
//! records, from offset 1536 (RECORDS_START), back to back:
//!   0..4    payload length n (u32, > 0)
//!   4..8    crc32 of bytes 0..4 followed by the payload
//!   8..8+n  payload: a postcard-encoded `Record` (HardState | Entry | Truncate { from })
//! then zeroes up to the allocated length: a length field of 0 ends the log.
//! ```
//! Header, slots and records never share a 512-byte sector. Version 1 (no watermark, records
//! from offset 64) is refused with [`StorageError::UnsupportedFormat`]; there is no migration.
//!
//! # Tear or damage: the rule
//! A tear (a crash in the middle of a write) can only affect bytes written after the last
//! completed fdatasync. The newest watermark slot `W` of a segment says how far its records
//! were synced (it is written only after that fdatasync returned), so recovery decides by
//! position, not by what the bytes look like:
//! - **Below `W`** every byte was synced: records must be intact and end exactly at `W`. A
//!   checksum failure, a zeroed record, a record running past `W` — anything — is damage:
//!   [`StorageError::Corrupt`] naming the file and the record's offset. Never a cut.
//! - **From `W` on, in the newest segment only**, the bytes were never synced (or were synced
//!   by a fdatasync whose watermark write a power loss then lost; see below). Valid records
//!   there are a surviving prefix of unsynced writes and are kept; the first record that is
//!   not valid is a torn write: it and everything after it are cut (zeroed and synced at
//!   open), even if later sectors happen to be intact (a disk may persist the sectors of one
//!   write in any order).
//! - **Older segments** were fdatasynced, and their final watermark synced, before the next
//!   segment was created: their records must end exactly at `W`, with only zeroes after.
//!
//! Which fault does what: zeroing or flipping bits in the last ~200 bytes or the last ~9 KB of
//! the used region is below `W` (the slot is in the first page, away from the tail): refused
//! as damage. A torn write of the current batch is above `W`: cut. Damage of a watermark slot
//! itself is refused (a slot never tears: see `watermark.rs`). What the rule cannot see: a
//! power loss that also loses the newest slot write moves `W` back by one sync, and damage of
//! *that* last synced batch at the same time would then be taken for a tear. That needs two
//! faults at once (power loss and damage of exactly the newest bytes); closing it would cost a
//! second fdatasync per sync.
//!
//! # Invariants
//! - Records are only ever written after the current end, in one `write_at` per `sync`,
//!   followed by one fdatasync, and only then the next watermark generation.
//! - Every segment that holds records starts with a `HardState` record (the hard state as of its
//!   creation), so deleting older segments never loses the hard state; the watermark's hard
//!   state equals the one replayed through `W`.
//! - Replaying the records of all segments in order rebuilds the log: an `Entry` at index `i`
//!   replaces the entries `i..` (overwrite semantics), `Truncate { from }` removes `from..`
//!   (`from` at or below the first index empties the log).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::header;
use super::vfs::{io_error, Vfs, VfsFile};
use super::watermark::{Watermark, SLOT_LEN};
use crate::error::StorageError;
use crate::raft::{Entry, HardState, Index};

/// Magic bytes at the start of every segment.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"RKVLOG\0\x01";
/// Current on-disk format version (segments and snapshots).
pub(crate) const FORMAT_VERSION: u32 = 2;
/// Bytes of a segment header.
pub(crate) const HEADER_LEN: u64 = header::LEN as u64;
/// Offset of a segment's first record (after the header's and the watermark slots' sectors).
pub(crate) const RECORDS_START: u64 = 1536;
/// The sector size the layout is aligned to.
pub(crate) const SECTOR: usize = 512;
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

    /// Parses and checks a header (magic, version, checksum, and the rest of its sector
    /// zero); identity is checked by the caller.
    pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<SegmentHeader, StorageError> {
        let h = header::check(bytes, &SEGMENT_MAGIC, "segment", path)?;
        let sector = bytes.get(HEADER_LEN as usize..SECTOR).unwrap_or(&[]);
        if let Some(at) = sector.iter().position(|&b| b != 0) {
            return Err(StorageError::Corrupt {
                path: path.to_path_buf(),
                offset: HEADER_LEN + at as u64,
                reason: "non-zero byte in the unused part of the header sector".into(),
            });
        }
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
    /// Bytes of a torn write found above the synced watermark of the newest segment: the
    /// range `offset..offset + bytes` (from the first invalid record to the last non-zero
    /// byte of the file), which open zeroes.
    pub torn: Option<(u64, u64)>,
}

/// One record parsed at an offset.
enum Parsed {
    Record(Record, u64),
    /// A length field of zero: the end of the log, if only zeroes follow.
    End,
    /// Not a valid record (why).
    Invalid(&'static str),
}

fn parse_at(data: &[u8], off: u64) -> Parsed {
    let rest = data.get(off as usize..).unwrap_or(&[]);
    if rest.len() < RECORDS_PREFIX_USIZE {
        return if all_zero(rest) {
            Parsed::End
        } else {
            Parsed::Invalid("stray bytes after the last record")
        };
    }
    let len = read_u32(rest, 0).unwrap_or(0);
    let crc = read_u32(rest, 4).unwrap_or(0);
    if len == 0 {
        return Parsed::End;
    }
    let end = off + RECORD_PREFIX + u64::from(len);
    if end > data.len() as u64 {
        return Parsed::Invalid("record length runs past the end of the segment");
    }
    let payload = &data[(off + RECORD_PREFIX) as usize..end as usize];
    if record_crc(len, payload) != crc {
        return Parsed::Invalid("record checksum mismatch");
    }
    match postcard::from_bytes(payload) {
        Ok(record) => Parsed::Record(record, end),
        // A checksum that matches is no tear: the record was written like this.
        Err(_) => Parsed::Invalid("undecodable record"),
    }
}

const RECORDS_PREFIX_USIZE: usize = RECORD_PREFIX as usize;

/// Offset just after the last non-zero byte of `data` at or after `from` (`from` if none).
fn last_non_zero(data: &[u8], from: u64) -> u64 {
    let tail = data.get(from as usize..).unwrap_or(&[]);
    from + tail
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |p| p as u64 + 1)
}

/// Bytes from `from` to the last non-zero byte of `data` (0 when only zeroes follow).
pub(crate) fn garbage_after(data: &[u8], from: u64) -> u64 {
    last_non_zero(data, from) - from
}

/// Walks the records of a segment image (`data` is the whole file) whose newest watermark
/// says `synced_end`, calling `on_record` with each record's offset, by the rule in the
/// [module docs](self): below `synced_end` anything but an intact record ending at or before
/// it is [`StorageError::Corrupt`]; after it, an older segment (`newest == false`) must hold
/// only zeroes, and the newest one ends at its first invalid record (a torn write, reported
/// in [`ScanEnd::torn`]).
pub(crate) fn scan_records(
    data: &[u8],
    path: &Path,
    synced_end: u64,
    newest: bool,
    mut on_record: impl FnMut(u64, Record) -> Result<(), StorageError>,
) -> Result<ScanEnd, StorageError> {
    let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let mut off = RECORDS_START;
    loop {
        let parsed = parse_at(data, off);
        if off < synced_end {
            // Synced bytes: strict.
            match parsed {
                Parsed::Record(record, end) if end <= synced_end => {
                    on_record(off, record)?;
                    off = end;
                }
                Parsed::Record(..) => {
                    return Err(corrupt(
                        off,
                        format!("record runs past the synced watermark {synced_end}"),
                    ))
                }
                Parsed::End => {
                    return Err(corrupt(
                        off,
                        format!("zeroed records below the synced watermark {synced_end}"),
                    ))
                }
                Parsed::Invalid(why) => {
                    return Err(corrupt(
                        off,
                        format!("{why} in synced records (synced through {synced_end})"),
                    ))
                }
            }
            continue;
        }
        if !newest {
            // A full segment: nothing was ever written after its final watermark.
            let rest = data.get(off as usize..).unwrap_or(&[]);
            if all_zero(rest) {
                return Ok(ScanEnd {
                    end: off,
                    torn: None,
                });
            }
            return Err(corrupt(
                off,
                format!("bytes after the final synced watermark {synced_end} of a full segment"),
            ));
        }
        // The newest segment, above its watermark: never synced.
        match parsed {
            Parsed::Record(record, end) => {
                on_record(off, record)?;
                off = end;
            }
            Parsed::Invalid("undecodable record") => {
                return Err(corrupt(
                    off,
                    "undecodable record with a valid checksum".into(),
                ))
            }
            Parsed::End if all_zero(data.get(off as usize..).unwrap_or(&[])) => {
                return Ok(ScanEnd {
                    end: off,
                    torn: None,
                })
            }
            Parsed::End | Parsed::Invalid(_) => {
                let garbage_end = last_non_zero(data, off);
                return Ok(ScanEnd {
                    end: off,
                    torn: Some((off, garbage_end - off)),
                });
            }
        }
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
    /// Shared with a sync's wait while it runs on another thread (see `FileStorage::start_sync`).
    pub file: Arc<dyn VfsFile>,
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
    /// The newest watermark generation written to the file (or to be written, while
    /// `watermark_unwritten`).
    pub watermark: Watermark,
    /// `watermark` could not be written yet (a full disk after the fdatasync it reports); it
    /// is written before the next batch.
    pub watermark_unwritten: bool,
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

/// Creates segment `header.seq` of `header.allocated_len` bytes: writes the header, the
/// framed records `initial` (usually none), the two watermark slots ("synced through" the
/// end of `initial`, with `hard_state`, the hard state the log replays to there) and zeroes
/// under the temporary name, fdatasyncs it, renames it into place and fsyncs the directory.
/// On failure (a full disk, say) the temporary file is closed and removed at once, so a
/// half-preallocated segment never keeps the space it took, and nothing named
/// `seg-<seq>.log` exists.
pub(crate) fn create_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    header: SegmentHeader,
    hard_state: HardState,
    initial: &[u8],
) -> Result<Segment, StorageError> {
    let temp = dir.join(segment_temp_name(header.seq));
    let path = dir.join(segment_name(header.seq));
    let end = RECORDS_START + initial.len() as u64;
    if end > header.allocated_len {
        return Err(StorageError::Invalid(format!(
            "{} bytes of records do not fit a segment of {}",
            initial.len(),
            header.allocated_len
        )));
    }
    let first = Watermark {
        generation: 0,
        seq: header.seq,
        synced_end: end,
        hard_state,
    };
    let second = first.next(end, hard_state);
    let result = (|| {
        let file = vfs
            .create(&temp)
            .map_err(|e| io_error("create", &temp, e))?;
        let written = (|| {
            file.set_len(header.allocated_len)
                .map_err(|e| io_error("set_len", &temp, e))?;
            // Zero-fill so the blocks are really allocated: later appends then never hit
            // ENOSPC and fdatasync need not update allocation metadata.
            let mut chunk = vec![0u8; FILL_CHUNK.min(header.allocated_len as usize)];
            chunk[..HEADER_LEN as usize].copy_from_slice(&header.encode());
            for w in [first, second] {
                let at = w.offset() as usize;
                chunk[at..at + SLOT_LEN].copy_from_slice(&w.encode());
            }
            let mut off = 0u64;
            while off < header.allocated_len {
                let n = (header.allocated_len - off).min(chunk.len() as u64) as usize;
                file.write_at(&chunk[..n], off)
                    .map_err(|e| io_error("write", &temp, e))?;
                if off == 0 {
                    chunk[..RECORDS_START as usize].fill(0);
                }
                off += n as u64;
            }
            if !initial.is_empty() {
                file.write_at(initial, RECORDS_START)
                    .map_err(|e| io_error("write", &temp, e))?;
            }
            file.sync_data().map_err(|e| io_error("fsync", &temp, e))
        })();
        if let Err(e) = written {
            drop(file); // close before removing, so the blocks are freed at once
            return Err(e);
        }
        vfs.rename(&temp, &path)
            .map_err(|e| io_error("rename", &temp, e))?;
        vfs.sync_dir(dir)
            .map_err(|e| io_error("fsync dir", dir, e))?;
        let map = file.map().map_err(|e| io_error("mmap", &path, e))?;
        Ok(Segment {
            seq: header.seq,
            path: path.clone(),
            file: file.into(),
            map,
            len: header.allocated_len,
            end,
            max_index: 0,
            has_hard_state: false,
            watermark: second,
            watermark_unwritten: false,
        })
    })();
    if result.is_err() {
        let _ = vfs.remove(&temp); // best effort: recovery removes leftovers too
    }
    result
}

/// Creates segment `header.seq` (its `allocated_len` is chosen here) of `preferred` bytes,
/// or, while the disk is full, of half that, and so on down to `needed` bytes (at least
/// [`MIN_SEGMENT_SIZE`](super::MIN_SEGMENT_SIZE)): a node on a file system smaller than a
/// segment still starts, and a node on a full disk tries only small segments. Each failed
/// attempt removes its file before the next. On failure returns the error and the last size
/// tried.
pub(crate) fn create_segment_fitting(
    vfs: &dyn Vfs,
    dir: &Path,
    header: SegmentHeader,
    hard_state: HardState,
    initial: &[u8],
    preferred: u64,
    needed: u64,
) -> Result<Segment, (StorageError, u64)> {
    let floor = needed.max(super::MIN_SEGMENT_SIZE);
    let mut len = preferred.max(floor);
    loop {
        let h = SegmentHeader {
            allocated_len: len,
            ..header
        };
        match create_segment(vfs, dir, h, hard_state, initial) {
            Ok(segment) => return Ok(segment),
            Err(StorageError::NoSpace { .. }) if len > floor => len = (len / 2).max(floor),
            Err(e) => return Err((e, len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryPayload;

    /// A segment image with `records` after RECORDS_START (slots are not filled in: the scan
    /// takes the watermark as an argument).
    fn image_with(records: &[RecordRef<'_>]) -> (Vec<u8>, u64) {
        let header = SegmentHeader {
            cluster_id: 1,
            node_id: 2,
            seq: 1,
            allocated_len: 4096,
        };
        let mut img = header.encode().to_vec();
        img.resize(RECORDS_START as usize, 0);
        for r in records {
            encode_record(r, &mut img).unwrap();
        }
        let end = img.len() as u64;
        img.resize(4096, 0);
        (img, end)
    }

    fn scan(img: &[u8], synced: u64, newest: bool) -> Result<(ScanEnd, usize), StorageError> {
        let mut n = 0;
        let end = scan_records(img, Path::new("s"), synced, newest, |_, _| {
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
    fn damage_below_the_watermark_is_refused_and_a_tear_above_it_is_cut() {
        let e = |index| Entry {
            index,
            term: 1,
            payload: EntryPayload::Command(b"hello".into()),
        };
        let (e1, e2) = (e(1), e(2));
        let (img, end) = image_with(&[
            RecordRef::HardState(HardState::default()),
            RecordRef::Entry(&e1),
            RecordRef::Entry(&e2),
        ]);
        let last = {
            let (img1, _) = image_with(&[
                RecordRef::HardState(HardState::default()),
                RecordRef::Entry(&e1),
            ]);
            let mut at = RECORDS_START as usize;
            while img1[at..at + 8] != [0; 8] {
                at += 8 + read_u32(&img1, at).unwrap() as usize;
            }
            at as u64
        };
        for (synced, newest) in [(end, true), (end, false), (RECORDS_START, true)] {
            let (got, n) = scan(&img, synced, newest).unwrap();
            assert_eq!((got.end, got.torn, n), (end, None, 3));
        }
        // The last record damaged: below the watermark it is damage, in any segment; above
        // it, in the newest segment, a torn write.
        let mut flipped = img.clone();
        flipped[end as usize - 1] ^= 0xff;
        let mut zeroed = img.clone();
        zeroed[last as usize + 3..end as usize].fill(0);
        for damaged in [&flipped, &zeroed] {
            for newest in [true, false] {
                assert!(
                    matches!(scan(damaged, end, newest), Err(StorageError::Corrupt { offset, .. }) if offset == last)
                );
            }
            let (t, n) = scan(damaged, last, true).unwrap();
            assert_eq!((t.end, n), (last, 2));
            assert_eq!(t.torn.map(|t| t.0), Some(last));
            assert!(scan(damaged, last, false).is_err());
        }
        // A record ending beyond the watermark, or zeroes before it.
        assert!(scan(&img, last + 1, true).is_err());
        assert!(scan(&img, end + 8, true).is_err());
        // Garbage after the end of the log: a torn write in the newest segment (its earlier
        // sectors lost), never in an older one; the torn range reaches the last non-zero byte.
        let mut stray = img;
        stray[3000] = 1;
        assert_eq!(
            scan(&stray, end, true).unwrap().0.torn,
            Some((end, 3001 - end))
        );
        assert!(
            matches!(scan(&stray, end, false), Err(StorageError::Corrupt { offset, .. }) if offset == end)
        );
    }

    #[test]
    fn segment_names_parse() {
        assert_eq!(parse_segment_name(&segment_name(17)), Some(17));
        assert_eq!(parse_segment_name("seg-1.log"), None);
        assert_eq!(parse_segment_name(&segment_temp_name(17)), None);
    }
}
