//! Snapshot files.
//!
//! # On-disk format (version 1)
//! The snapshot covering the log through index `i` is the file `snap-<i, 20 digits>.snap`:
//!
//! ```text
//! header, 64 bytes (integers little-endian):
//!   0..8    magic  b"RKVSNAP\x01"
//!   8..12   format version (u32) = 1
//!   12..16  zero
//!   16..24  cluster id (u64)
//!   24..32  node id (u64)
//!   32..40  index of the last entry covered (u64), equal to the one in the name
//!   40..48  term of that entry (u64)
//!   48..56  length n of the data (u64); the file is exactly 64 + n bytes
//!   56..60  crc32 of the data
//!   60..64  crc32 of bytes 0..60
//! data, n bytes
//! ```
//!
//! # Invariants
//! - A snapshot is received as `snap.tmp`: a placeholder header of zeroes (never a valid
//!   header), then the content, streamed in order with a running crc32 (memory does not grow
//!   with its size). To install it, the real header is written at offset 0, the file is
//!   fdatasynced, renamed to its final name, and the directory fsynced, before anything
//!   depends on it (the log below it is dropped only after).
//! - At most one named snapshot is current: the newest; older ones are deleted once a newer one
//!   is durable (recovery deletes leftovers of a crash in between). `snap.tmp` is debris.

use std::path::{Path, PathBuf};

use super::header;
use super::segment::{read_u32, read_u64};
use super::vfs::{io_error, Vfs, VfsFile};
use crate::error::StorageError;
use crate::raft::SnapshotMeta;

/// Magic bytes at the start of a snapshot file.
pub(crate) const SNAPSHOT_MAGIC: [u8; 8] = *b"RKVSNAP\x01";
/// Bytes of a snapshot header.
pub(crate) const SNAPSHOT_HEADER_LEN: u64 = header::LEN as u64;
/// Bytes read at a time when verifying a snapshot.
const READ_CHUNK: usize = 1 << 20;
/// Name of a snapshot being written.
pub(crate) const SNAPSHOT_TEMP_NAME: &str = "snap.tmp";

/// Name of the snapshot through `index`.
pub(crate) fn snapshot_name(index: u64) -> String {
    format!("snap-{index:020}.snap")
}

/// Parses `snap-<20 digits>.snap`.
pub(crate) fn parse_snapshot_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// A parsed snapshot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotHeader {
    pub cluster_id: u64,
    pub node_id: u64,
    pub meta: SnapshotMeta,
    pub data_len: u64,
    pub data_crc: u32,
}

impl SnapshotHeader {
    fn encode(&self) -> [u8; SNAPSHOT_HEADER_LEN as usize] {
        let mut h = header::begin(&SNAPSHOT_MAGIC, self.cluster_id, self.node_id);
        h[32..40].copy_from_slice(&self.meta.index.to_le_bytes());
        h[40..48].copy_from_slice(&self.meta.term.to_le_bytes());
        h[48..56].copy_from_slice(&self.data_len.to_le_bytes());
        h[56..60].copy_from_slice(&self.data_crc.to_le_bytes());
        header::seal(&mut h);
        h
    }

    /// Parses and checks magic, version and header checksum.
    pub(crate) fn decode(h: &[u8], path: &Path) -> Result<SnapshotHeader, StorageError> {
        let h = header::check(h, &SNAPSHOT_MAGIC, "snapshot", path)?;
        Ok(SnapshotHeader {
            cluster_id: read_u64(h, 16).unwrap_or(0),
            node_id: read_u64(h, 24).unwrap_or(0),
            meta: SnapshotMeta {
                index: read_u64(h, 32).unwrap_or(0),
                term: read_u64(h, 40).unwrap_or(0),
            },
            data_len: read_u64(h, 48).unwrap_or(0),
            data_crc: read_u32(h, 56).unwrap_or(0),
        })
    }
}

/// A snapshot being received into the temp file `snap.tmp`: it starts with a placeholder
/// header (zeroes, so it can never be mistaken for a snapshot), then the content bytes
/// received so far, in order, with their running checksum. Memory use is constant: the bytes
/// go straight to the file.
#[derive(Debug)]
pub(crate) struct IncomingSnapshot {
    meta: SnapshotMeta,
    path: PathBuf,
    file: Box<dyn VfsFile>,
    /// Content bytes written so far (the file holds at least `SNAPSHOT_HEADER_LEN + len`).
    len: u64,
    hasher: crc32fast::Hasher,
}

/// The current snapshot file, open for reading.
#[derive(Debug)]
pub(crate) struct SnapshotFile {
    pub path: PathBuf,
    pub file: Box<dyn VfsFile>,
    /// Bytes of content (the file is `SNAPSHOT_HEADER_LEN + content_len` bytes).
    pub content_len: u64,
}

impl IncomingSnapshot {
    /// (Re)creates `snap.tmp` in `dir` for snapshot `meta`, with a placeholder header.
    pub(crate) fn create(
        vfs: &dyn Vfs,
        dir: &Path,
        meta: SnapshotMeta,
    ) -> Result<IncomingSnapshot, StorageError> {
        let path = dir.join(SNAPSHOT_TEMP_NAME);
        let file = vfs
            .create(&path)
            .map_err(|e| io_error("create", &path, e))?;
        file.write_at(&[0u8; SNAPSHOT_HEADER_LEN as usize], 0)
            .map_err(|e| io_error("write", &path, e))?;
        Ok(IncomingSnapshot {
            meta,
            path,
            file,
            len: 0,
            hasher: crc32fast::Hasher::new(),
        })
    }

    /// The snapshot being received.
    pub(crate) fn meta(&self) -> SnapshotMeta {
        self.meta
    }

    /// Appends `data`, which must start at content offset `offset == self.len()`. A failed write
    /// leaves `len` unchanged (the bytes it may have left are overwritten by the retry, or cut
    /// off by [`IncomingSnapshot::finish`]).
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        if offset != self.len {
            return Err(StorageError::Invalid(format!(
                "snapshot chunk at offset {offset} for index {}: {} bytes were written so far",
                self.meta.index, self.len
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.file
            .write_at(data, SNAPSHOT_HEADER_LEN + self.len)
            .map_err(|e| io_error("write", &self.path, e))?;
        self.hasher.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Makes the snapshot durable under its final name: writes the real header, cuts any
    /// bytes of a failed write past the content, fdatasyncs, renames, fsyncs the directory.
    /// On failure the temp file is removed (best effort; recovery removes it too).
    pub(crate) fn finish(
        self,
        vfs: &dyn Vfs,
        dir: &Path,
        cluster_id: u64,
        node_id: u64,
    ) -> Result<SnapshotFile, StorageError> {
        let final_path = dir.join(snapshot_name(self.meta.index));
        let header = SnapshotHeader {
            cluster_id,
            node_id,
            meta: self.meta,
            data_len: self.len,
            data_crc: self.hasher.clone().finalize(),
        };
        let file_len = SNAPSHOT_HEADER_LEN + self.len;
        let (temp, file) = (&self.path, &self.file);
        let result = (|| {
            file.write_at(&header.encode(), 0)
                .map_err(|e| io_error("write", temp, e))?;
            if file.len().map_err(|e| io_error("stat", temp, e))? != file_len {
                file.set_len(file_len)
                    .map_err(|e| io_error("truncate", temp, e))?;
            }
            file.sync_data().map_err(|e| io_error("fsync", temp, e))?;
            vfs.rename(temp, &final_path)
                .map_err(|e| io_error("rename", temp, e))?;
            vfs.sync_dir(dir).map_err(|e| io_error("fsync dir", dir, e))
        })();
        if let Err(e) = result {
            let _ = vfs.remove(temp); // best effort: recovery removes it too
            return Err(e);
        }
        Ok(SnapshotFile {
            path: final_path,
            file: self.file,
            content_len: self.len,
        })
    }

    /// Abandons the snapshot and removes its temp file.
    pub(crate) fn discard(self, vfs: &dyn Vfs) -> Result<(), StorageError> {
        vfs.remove(&self.path)
            .map_err(|e| io_error("remove", &self.path, e))
    }
}

impl SnapshotFile {
    /// Opens the snapshot at `path`, already verified by recovery.
    pub(crate) fn open(
        vfs: &dyn Vfs,
        path: PathBuf,
        file_len: u64,
    ) -> Result<SnapshotFile, StorageError> {
        let file = vfs.open(&path).map_err(|e| io_error("open", &path, e))?;
        Ok(SnapshotFile {
            path,
            file,
            content_len: file_len.saturating_sub(SNAPSHOT_HEADER_LEN),
        })
    }

    /// Bytes of the whole file.
    pub(crate) fn file_len(&self) -> u64 {
        SNAPSHOT_HEADER_LEN + self.content_len
    }

    /// Up to `len` bytes of content from `offset` (fewer only at the end; none past it). The
    /// buffer is at most `len` bytes, whatever the snapshot's size. Not checksummed again:
    /// the whole content was verified when the storage was opened or the snapshot written.
    pub(crate) fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        let start = offset.min(self.content_len);
        let n = (self.content_len - start).min(len as u64) as usize;
        let mut buf = vec![0u8; n];
        if n > 0 {
            self.file
                .read_at(&mut buf, SNAPSHOT_HEADER_LEN + start)
                .map_err(|e| io_error("read", &self.path, e))?;
        }
        Ok(buf)
    }
}

/// Reads and fully verifies a snapshot file (identity, name, length, both checksums) without
/// keeping its data (it is read in chunks). Returns its metadata and the file's length.
pub(crate) fn verify_snapshot(
    vfs: &dyn Vfs,
    path: &Path,
    name_index: u64,
    cluster_id: u64,
    node_id: u64,
) -> Result<(SnapshotMeta, u64), StorageError> {
    scan_snapshot(vfs, path, name_index, cluster_id, node_id, |_| {})
}

/// Checks the header and streams the data, in chunks, through the checksum and `on_chunk`.
fn scan_snapshot(
    vfs: &dyn Vfs,
    path: &Path,
    name_index: u64,
    cluster_id: u64,
    node_id: u64,
    mut on_chunk: impl FnMut(&[u8]),
) -> Result<(SnapshotMeta, u64), StorageError> {
    let file = vfs.open(path).map_err(|e| io_error("open", path, e))?;
    let file_len = file.len().map_err(|e| io_error("stat", path, e))?;
    let mut h = [0u8; SNAPSHOT_HEADER_LEN as usize];
    if file_len < SNAPSHOT_HEADER_LEN {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: file_len,
            reason: "file shorter than a snapshot header".into(),
        });
    }
    file.read_at(&mut h, 0)
        .map_err(|e| io_error("read", path, e))?;
    let header = SnapshotHeader::decode(&h, path)?;
    if header.cluster_id != cluster_id || header.node_id != node_id {
        return Err(StorageError::WrongIdentity {
            path: path.to_path_buf(),
            reason: format!(
                "cluster {} node {}, expected cluster {cluster_id} node {node_id}",
                header.cluster_id, header.node_id
            ),
        });
    }
    if header.meta.index != name_index || header.meta.index == 0 {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: 32,
            reason: format!(
                "header index {} does not match the file name",
                header.meta.index
            ),
        });
    }
    if Some(file_len) != SNAPSHOT_HEADER_LEN.checked_add(header.data_len) {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: file_len.min(SNAPSHOT_HEADER_LEN.saturating_add(header.data_len)),
            reason: format!(
                "file is {file_len} bytes, header says {} bytes of data",
                header.data_len
            ),
        });
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut chunk = vec![0u8; (header.data_len as usize).min(READ_CHUNK)];
    let mut done = 0u64;
    while done < header.data_len {
        let n = (header.data_len - done).min(chunk.len() as u64) as usize;
        file.read_at(&mut chunk[..n], SNAPSHOT_HEADER_LEN + done)
            .map_err(|e| io_error("read", path, e))?;
        hasher.update(&chunk[..n]);
        on_chunk(&chunk[..n]);
        done += n as u64;
    }
    if hasher.finalize() != header.data_crc {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: SNAPSHOT_HEADER_LEN,
            reason: "snapshot data checksum mismatch".into(),
        });
    }
    Ok((header.meta, file_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::sim::SimDisk;

    fn receive(disk: &SimDisk, meta: SnapshotMeta, chunks: &[&[u8]]) -> SnapshotFile {
        let dir = Path::new("/d");
        let mut incoming = IncomingSnapshot::create(disk, dir, meta).unwrap();
        let mut offset = 0;
        for chunk in chunks {
            incoming.write(offset, chunk).unwrap();
            offset += chunk.len() as u64;
        }
        incoming.finish(disk, dir, 1, 2).unwrap()
    }

    #[test]
    fn snapshot_round_trips_and_damage_is_typed() {
        let disk = SimDisk::new();
        let meta = SnapshotMeta { index: 9, term: 2 };
        let snap = receive(&disk, meta, &[b"st", b"", b"ate"]);
        let path = snap.path.clone();
        assert_eq!(snap.file_len(), SNAPSHOT_HEADER_LEN + 5);
        assert_eq!(snap.read(0, 100).unwrap(), b"state".to_vec());
        assert_eq!(snap.read(1, 3).unwrap(), b"tat".to_vec());
        assert_eq!(snap.read(5, 3).unwrap(), Vec::<u8>::new());
        assert_eq!(snap.read(50, 3).unwrap(), Vec::<u8>::new());
        assert_eq!(
            verify_snapshot(&disk, &path, 9, 1, 2).unwrap(),
            (meta, SNAPSHOT_HEADER_LEN + 5)
        );
        assert!(matches!(
            verify_snapshot(&disk, &path, 9, 1, 3),
            Err(StorageError::WrongIdentity { .. })
        ));
        let mut bytes = disk.read(&path).unwrap();
        bytes[66] ^= 4;
        disk.write_durable(&path, &bytes);
        assert!(matches!(
            verify_snapshot(&disk, &path, 9, 1, 2),
            Err(StorageError::Corrupt { offset: 64, .. })
        ));
        assert_eq!(parse_snapshot_name(&snapshot_name(9)), Some(9));
    }

    #[test]
    fn chunks_must_continue_where_the_last_one_ended() {
        let disk = SimDisk::new();
        let meta = SnapshotMeta { index: 3, term: 1 };
        let mut incoming = IncomingSnapshot::create(&disk, Path::new("/d"), meta).unwrap();
        incoming.write(0, b"abc").unwrap();
        for offset in [0, 2, 4] {
            assert!(matches!(
                incoming.write(offset, b"x"),
                Err(StorageError::Invalid(_))
            ));
        }
        incoming.write(3, b"d").unwrap();
        let placeholder = disk.read(Path::new("/d/snap.tmp")).unwrap();
        assert!(SnapshotHeader::decode(&placeholder, Path::new("/d/snap.tmp")).is_err());
    }

    #[test]
    fn bytes_of_a_failed_write_are_cut_off_at_finish() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        let meta = SnapshotMeta { index: 4, term: 1 };
        let mut incoming = IncomingSnapshot::create(&disk, dir, meta).unwrap();
        incoming.write(0, b"good").unwrap();
        disk.set_no_space(true);
        assert!(matches!(
            incoming.write(4, &[7u8; 100]),
            Err(StorageError::NoSpace { .. })
        ));
        disk.set_no_space(false);
        let snap = incoming.finish(&disk, dir, 1, 2).unwrap();
        assert_eq!(
            verify_snapshot(&disk, &snap.path, 4, 1, 2).unwrap(),
            (meta, SNAPSHOT_HEADER_LEN + 4)
        );
        assert_eq!(snap.read(0, 10).unwrap(), b"good".to_vec());
    }
}
