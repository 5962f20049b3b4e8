//! Backups: a node's whole state at one committed index, as one checksummed stream that can
//! bootstrap a new node or cluster ([`restore`]).
//!
//! A backup is the content of a snapshot (what [`StateMachine::restore`] reads) behind a
//! header that says where in the log it stands. [`Node::backup`] takes one from a running
//! node; [`verify`] checks a backup without restoring it; [`restore`] writes one into an empty
//! [`Storage`], from which a node then starts as if it had installed that snapshot.
//!
//! # Format (version 1)
//! ```text
//! header, 64 bytes (integers little-endian):
//!   0..8    magic  b"RKVBKUP\x01"
//!   8..12   backup format version (u32) = 1
//!   12..24  zero
//!   24..32  id of the node it was taken from (informational)
//!   32..40  index of the last entry the state covers (u64, > 0)
//!   40..48  term of that entry (u64)
//!   48..56  size n of the content (u64)
//!   56..60  crc32 of the content
//!   60..64  crc32 of bytes 0..60
//! content, n bytes; nothing after it
//! ```
//!
//! # Rules
//! - Verification streams: the header is checked first (magic, version, checksum), then the
//!   content through its crc32 a bounded buffer at a time; a stream that ends early, goes on
//!   past `n`, or fails a checksum is [`BackupError::Corrupt`] naming the offset. Another
//!   version with an intact header is [`BackupError::UnsupportedFormat`].
//! - [`restore`] writes the content into the storage's incoming snapshot as it reads it and
//!   installs it only once the whole stream verified: a damaged backup leaves the storage as
//!   empty as it was.
//! - The restored storage holds the snapshot `(index, term)`, an empty log after it, and the
//!   hard state `{ term, vote: None }`. Every node of a new cluster restored from the same
//!   backup starts from the same state; the first leader they elect continues the log.
//!
//! [`StateMachine::restore`]: crate::StateMachine::restore
//! [`Node::backup`]: crate::Node::backup

use std::io::Read;

use super::{InitialState, Storage};
use crate::error::{ProposeError, StorageError};
use crate::raft::{HardState, SnapshotMeta};

/// Magic bytes of a backup.
pub const BACKUP_MAGIC: [u8; 8] = *b"RKVBKUP\x01";
/// The backup format version this build writes and reads.
pub const BACKUP_VERSION: u32 = 1;
/// Bytes of a backup's header.
pub const BACKUP_HEADER_LEN: usize = 64;
/// Bytes read or written at a time when streaming a backup.
pub const BACKUP_CHUNK: usize = 1 << 20;

/// What a backup holds, from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    /// The node it was taken from (informational: any node may restore it).
    pub node_id: u64,
    /// The last log entry its state covers.
    pub meta: SnapshotMeta,
    /// Bytes of content after the header.
    pub size: u64,
    /// crc32 of the content.
    pub checksum: u32,
}

/// Why a backup could not be taken, verified or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup is damaged (or is not a backup).
    #[error("backup damaged at offset {offset}: {reason}")]
    Corrupt {
        /// Byte offset in the backup stream.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A backup of another format version (its header is intact).
    #[error("backup format version {version}; this raftkv reads version {supported}")]
    UnsupportedFormat {
        /// The version in its header.
        version: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Reading or writing the stream failed.
    #[error("backup stream: {0}")]
    Io(#[from] std::io::Error),
    /// The storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// [`restore`] needs a storage that holds nothing yet.
    #[error("restore needs an empty storage; this one holds {0}")]
    NotEmpty(String),
    /// The node could not take a backup now (it lost its leader, timed out, stopped...).
    #[error("the node cannot take a backup now: {0}")]
    Node(ProposeError),
    /// The node's snapshot was replaced while the backup was being read (a newer snapshot
    /// was taken or received); take the backup again.
    #[error("the snapshot being backed up was replaced by a newer one; take the backup again")]
    Replaced,
}

impl BackupInfo {
    /// The header that starts a backup of this content.
    pub fn encode_header(&self) -> [u8; BACKUP_HEADER_LEN] {
        let mut h = [0u8; BACKUP_HEADER_LEN];
        h[0..8].copy_from_slice(&BACKUP_MAGIC);
        h[8..12].copy_from_slice(&BACKUP_VERSION.to_le_bytes());
        h[24..32].copy_from_slice(&self.node_id.to_le_bytes());
        h[32..40].copy_from_slice(&self.meta.index.to_le_bytes());
        h[40..48].copy_from_slice(&self.meta.term.to_le_bytes());
        h[48..56].copy_from_slice(&self.size.to_le_bytes());
        h[56..60].copy_from_slice(&self.checksum.to_le_bytes());
        let crc = crc32fast::hash(&h[0..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header.
    pub fn decode_header(h: &[u8]) -> Result<BackupInfo, BackupError> {
        let corrupt = |offset: u64, reason: &str| BackupError::Corrupt {
            offset,
            reason: reason.to_owned(),
        };
        if h.len() < BACKUP_HEADER_LEN {
            return Err(corrupt(h.len() as u64, "shorter than a backup header"));
        }
        if h[0..8] != BACKUP_MAGIC {
            return Err(corrupt(0, "not a raftkv backup (bad magic)"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let version = u32_at(8);
        let sealed = u32_at(60) == crc32fast::hash(&h[0..60]);
        if version != BACKUP_VERSION {
            if !sealed {
                return Err(corrupt(
                    8,
                    "format version field damaged (the header fails its checksum)",
                ));
            }
            return Err(BackupError::UnsupportedFormat {
                version,
                supported: BACKUP_VERSION,
            });
        }
        if !sealed || h[12..24] != [0; 12] {
            return Err(corrupt(60, "header checksum mismatch"));
        }
        let info = BackupInfo {
            node_id: u64_at(24),
            meta: SnapshotMeta {
                index: u64_at(32),
                term: u64_at(40),
            },
            size: u64_at(48),
            checksum: u32_at(56),
        };
        if info.meta.index == 0 {
            return Err(corrupt(32, "a backup at index 0"));
        }
        Ok(info)
    }
}

/// Streams a backup's content from `reader` (after its header) through the checksum,
/// handing each chunk to `on_chunk` with its content offset; checks size, checksum and the
/// end of the stream.
fn stream_content(
    reader: &mut dyn Read,
    info: &BackupInfo,
    mut on_chunk: impl FnMut(u64, &[u8]) -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    let header = BACKUP_HEADER_LEN as u64;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; BACKUP_CHUNK.min(info.size as usize).max(1)];
    let mut done = 0u64;
    while done < info.size {
        let want = (info.size - done).min(buf.len() as u64) as usize;
        let n = read_full(reader, &mut buf[..want])?;
        if n == 0 {
            return Err(BackupError::Corrupt {
                offset: header + done,
                reason: format!(
                    "the backup ends after {done} bytes of content; its header says {}",
                    info.size
                ),
            });
        }
        hasher.update(&buf[..n]);
        on_chunk(done, &buf[..n])?;
        done += n as u64;
    }
    if read_full(reader, &mut [0u8; 1])? != 0 {
        return Err(BackupError::Corrupt {
            offset: header + info.size,
            reason: "bytes after the end of the content".into(),
        });
    }
    if hasher.finalize() != info.checksum {
        return Err(BackupError::Corrupt {
            offset: header,
            reason: "content checksum mismatch".into(),
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> Result<usize, BackupError> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

fn read_header(reader: &mut dyn Read) -> Result<BackupInfo, BackupError> {
    let mut h = [0u8; BACKUP_HEADER_LEN];
    let n = read_full(reader, &mut h)?;
    BackupInfo::decode_header(&h[..n])
}

/// Reads a whole backup from `reader` and checks it (header, size, checksum, end of stream)
/// without keeping it: memory does not grow with its size.
pub fn verify(mut reader: impl Read) -> Result<BackupInfo, BackupError> {
    let info = read_header(&mut reader)?;
    stream_content(&mut reader, &info, |_, _| Ok(()))?;
    Ok(info)
}

/// Restores the backup read from `reader` into `storage`, which must be empty (a storage
/// just created in an empty directory): the content is written as the storage's incoming
/// snapshot while it is verified, and installed, with the hard state `{ term, vote: None }`
/// synced, only if the whole backup verified. Returns what was restored. On any error the
/// storage holds no more than before.
pub fn restore<S: Storage>(
    mut reader: impl Read,
    storage: &mut S,
) -> Result<BackupInfo, BackupError> {
    let init = storage.initial_state()?;
    let empty = InitialState {
        first_index: 1,
        last_index: 0,
        ..InitialState::default()
    };
    if init != empty {
        return Err(BackupError::NotEmpty(format!(
            "term {}, snapshot through {}, log {}..={}",
            init.hard_state.term, init.snapshot.index, init.first_index, init.last_index
        )));
    }
    let info = read_header(&mut reader)?;
    storage.write_snapshot_chunk(info.meta, 0, &[])?;
    stream_content(&mut reader, &info, |offset, chunk| {
        Ok(storage.write_snapshot_chunk(info.meta, offset, chunk)?)
    })?;
    storage.install_snapshot(info.meta)?;
    storage.set_hard_state(HardState {
        term: info.meta.term,
        vote: None,
    })?;
    storage.sync()?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn backup_of(content: &[u8], meta: SnapshotMeta) -> Vec<u8> {
        let info = BackupInfo {
            node_id: 2,
            meta,
            size: content.len() as u64,
            checksum: crc32fast::hash(content),
        };
        let mut b = info.encode_header().to_vec();
        b.extend_from_slice(content);
        b
    }

    #[test]
    fn a_backup_verifies_restores_and_refuses_damage() {
        let meta = SnapshotMeta { index: 12, term: 3 };
        let content: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let b = backup_of(&content, meta);
        assert_eq!(verify(b.as_slice()).unwrap().meta, meta);
        let mut s = MemStorage::new();
        restore(b.as_slice(), &mut s).unwrap();
        assert_eq!(s.snapshot().unwrap(), Some((meta, content.clone())));
        assert_eq!(
            s.initial_state().unwrap().hard_state,
            HardState {
                term: 3,
                vote: None
            }
        );
        assert!(matches!(
            restore(b.as_slice(), &mut s),
            Err(BackupError::NotEmpty(_))
        ));
        for at in (0..b.len()).step_by(13).chain([8, 9, 60, b.len() - 1]) {
            let mut bad = b.clone();
            bad[at] ^= 0x04;
            let err = verify(bad.as_slice()).unwrap_err();
            assert!(
                matches!(err, BackupError::Corrupt { .. }),
                "flip at {at}: {err}"
            );
            let mut fresh = MemStorage::new();
            assert!(restore(bad.as_slice(), &mut fresh).is_err());
            assert_eq!(
                fresh.snapshot().unwrap(),
                None,
                "nothing restored from damage"
            );
        }
        for len in [0, 10, 64, 100, b.len() - 1] {
            assert!(matches!(
                verify(&b[..len]),
                Err(BackupError::Corrupt { .. })
            ));
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            verify(longer.as_slice()),
            Err(BackupError::Corrupt { offset, .. }) if offset == b.len() as u64
        ));
        let mut other = b;
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&other[0..60]);
        other[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            verify(other.as_slice()),
            Err(BackupError::UnsupportedFormat { version: 2, .. })
        ));
    }
}
