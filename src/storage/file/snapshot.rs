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
//! - A snapshot is written as `snap.tmp`, fdatasynced, renamed to its final name, and the
//!   directory fsynced, before anything depends on it (the log below it is dropped only after).
//! - At most one named snapshot is current: the newest; older ones are deleted once a newer one
//!   is durable (recovery deletes leftovers of a crash in between). `snap.tmp` is debris.

use std::path::{Path, PathBuf};

use super::segment::{read_u32, read_u64, FORMAT_VERSION};
use super::vfs::{io_error, Vfs};
use crate::error::StorageError;
use crate::raft::SnapshotMeta;

/// Magic bytes at the start of a snapshot file.
pub(crate) const SNAPSHOT_MAGIC: [u8; 8] = *b"RKVSNAP\x01";
/// Bytes of a snapshot header.
pub(crate) const SNAPSHOT_HEADER_LEN: u64 = 64;
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
        let mut h = [0u8; SNAPSHOT_HEADER_LEN as usize];
        h[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.cluster_id.to_le_bytes());
        h[24..32].copy_from_slice(&self.node_id.to_le_bytes());
        h[32..40].copy_from_slice(&self.meta.index.to_le_bytes());
        h[40..48].copy_from_slice(&self.meta.term.to_le_bytes());
        h[48..56].copy_from_slice(&self.data_len.to_le_bytes());
        h[56..60].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[0..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks magic, version and header checksum.
    pub(crate) fn decode(h: &[u8], path: &Path) -> Result<SnapshotHeader, StorageError> {
        let corrupt = |offset: u64, reason: &str| StorageError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason: reason.to_owned(),
        };
        let h = h
            .get(..SNAPSHOT_HEADER_LEN as usize)
            .ok_or_else(|| corrupt(0, "file shorter than a snapshot header"))?;
        if h[0..8] != SNAPSHOT_MAGIC {
            return Err(corrupt(0, "bad snapshot magic"));
        }
        let version = read_u32(h, 8).unwrap_or(0);
        if version != FORMAT_VERSION {
            return Err(StorageError::WrongIdentity {
                path: path.to_path_buf(),
                reason: format!("format version {version}, expected {FORMAT_VERSION}"),
            });
        }
        if read_u32(h, 60) != Some(crc32fast::hash(&h[0..60])) {
            return Err(corrupt(60, "snapshot header checksum mismatch"));
        }
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

/// Writes the snapshot durably: temp file, fdatasync, rename, fsync of the directory.
/// Returns the final path and the file's length.
pub(crate) fn write_snapshot(
    vfs: &dyn Vfs,
    dir: &Path,
    cluster_id: u64,
    node_id: u64,
    meta: SnapshotMeta,
    data: &[u8],
) -> Result<(PathBuf, u64), StorageError> {
    let temp = dir.join(SNAPSHOT_TEMP_NAME);
    let path = dir.join(snapshot_name(meta.index));
    let header = SnapshotHeader {
        cluster_id,
        node_id,
        meta,
        data_len: data.len() as u64,
        data_crc: crc32fast::hash(data),
    };
    let result = (|| {
        let file = vfs
            .create(&temp)
            .map_err(|e| io_error("create", &temp, e))?;
        file.write_at(&header.encode(), 0)
            .map_err(|e| io_error("write", &temp, e))?;
        file.write_at(data, SNAPSHOT_HEADER_LEN)
            .map_err(|e| io_error("write", &temp, e))?;
        file.sync_data().map_err(|e| io_error("fsync", &temp, e))?;
        vfs.rename(&temp, &path)
            .map_err(|e| io_error("rename", &temp, e))?;
        vfs.sync_dir(dir)
            .map_err(|e| io_error("fsync dir", dir, e))?;
        Ok((path.clone(), SNAPSHOT_HEADER_LEN + data.len() as u64))
    })();
    if result.is_err() {
        let _ = vfs.remove(&temp); // best effort: recovery removes it too
    }
    result
}

/// Reads and fully verifies a snapshot file (identity, name, length, both checksums).
pub(crate) fn read_snapshot(
    vfs: &dyn Vfs,
    path: &Path,
    name_index: u64,
    cluster_id: u64,
    node_id: u64,
) -> Result<(SnapshotMeta, Vec<u8>), StorageError> {
    let mut data = Vec::new();
    let (meta, _) = scan_snapshot(vfs, path, name_index, cluster_id, node_id, |chunk| {
        data.extend_from_slice(chunk)
    })?;
    Ok((meta, data))
}

/// Verifies a snapshot file like [`read_snapshot`] without keeping its data (it is read in
/// chunks). Returns its metadata and the file's length.
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

    #[test]
    fn snapshot_round_trips_and_damage_is_typed() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        let meta = SnapshotMeta { index: 9, term: 2 };
        let (path, len) = write_snapshot(&disk, dir, 1, 2, meta, b"state").unwrap();
        assert_eq!(len, SNAPSHOT_HEADER_LEN + 5);
        assert_eq!(
            read_snapshot(&disk, &path, 9, 1, 2).unwrap(),
            (meta, b"state".to_vec())
        );
        assert!(matches!(
            read_snapshot(&disk, &path, 9, 1, 3),
            Err(StorageError::WrongIdentity { .. })
        ));
        let mut bytes = disk.read(&path).unwrap();
        bytes[66] ^= 4;
        disk.write_durable(&path, &bytes);
        assert!(matches!(
            read_snapshot(&disk, &path, 9, 1, 2),
            Err(StorageError::Corrupt { offset: 64, .. })
        ));
        assert_eq!(parse_snapshot_name(&snapshot_name(9)), Some(9));
    }
}
