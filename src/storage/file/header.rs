//! The 64-byte header every file of the storage starts with.
//!
//! ```text
//! 0..8    magic (names the file kind)
//! 8..12   format version, u32 LE
//! 12..16  zero
//! 16..24  cluster id, u64 LE
//! 24..32  node id, u64 LE
//! 32..60  fields of the file kind (see segment.rs, snapshot.rs)
//! 60..64  crc32 of bytes 0..60, u32 LE
//! ```
//!
//! Invariant: a header that passes [`check`] has the expected magic, this format version and
//! an intact checksum; identity (cluster and node) is compared by the caller, which knows what
//! to expect. Another version with an intact checksum is a file of another format
//! ([`StorageError::UnsupportedFormat`]); another version with a failing checksum is a damaged
//! version field ([`StorageError::Corrupt`] at offset 8).

use std::path::Path;

use super::segment::{read_u32, FORMAT_VERSION};
use crate::error::StorageError;

/// Header length in bytes.
pub(crate) const LEN: usize = 64;

/// A header with `magic`, the format version and the identity filled in; the caller writes
/// its fields into bytes 32..60 and then calls [`seal`].
pub(crate) fn begin(magic: &[u8; 8], cluster_id: u64, node_id: u64) -> [u8; LEN] {
    let mut h = [0u8; LEN];
    h[0..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&cluster_id.to_le_bytes());
    h[24..32].copy_from_slice(&node_id.to_le_bytes());
    h
}

/// Writes the checksum of bytes 0..60 into 60..64.
pub(crate) fn seal(h: &mut [u8; LEN]) {
    let crc = crc32fast::hash(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
}

/// Checks length, magic, version and checksum of the header at the start of `bytes` (the
/// file `path`, a `kind` file); returns its 64 bytes.
pub(crate) fn check<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    kind: &str,
    path: &Path,
) -> Result<&'a [u8], StorageError> {
    let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let h = bytes
        .get(..LEN)
        .ok_or_else(|| corrupt(0, format!("file shorter than a {kind} header")))?;
    if h[0..8] != *magic {
        return Err(corrupt(0, format!("bad {kind} magic")));
    }
    let version = read_u32(h, 8).unwrap_or(0);
    let sealed = read_u32(h, 60) == Some(crc32fast::hash(&h[0..60]));
    if version != FORMAT_VERSION {
        if !sealed {
            return Err(corrupt(
                8,
                format!(
                    "{kind} header reads format version {version} (expected {FORMAT_VERSION}) \
                     and fails its checksum: the version field is damaged"
                ),
            ));
        }
        return Err(StorageError::UnsupportedFormat {
            path: path.to_path_buf(),
            version,
            supported: FORMAT_VERSION,
        });
    }
    if !sealed {
        return Err(corrupt(60, format!("{kind} header checksum mismatch")));
    }
    Ok(h)
}
