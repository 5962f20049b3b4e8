//! The synced watermark of a segment: two checksummed slots, in their own sectors of the
//! segment's first page, that say how far the segment's records are known to be synced.
//!
//! # On-disk format (version 2)
//! ```text
//! slot 0 at offset 512, slot 1 at offset 1024, 64 bytes each (integers little-endian):
//!   0..8    magic  b"RKVMARK\x02"
//!   8..16   generation g (u64); the slot is written at offset 512 * (1 + g % 2)
//!   16..24  sequence number of the segment (u64)
//!   24..32  synced end (u64): every record in [RECORDS_START, synced end) was fdatasynced
//!   32..40  hard state term (u64) as of the synced end
//!   40..48  hard state vote (u64; 0 = none) as of the synced end
//!   48..60  zero
//!   60..64  crc32 of bytes 0..60
//!   64..512 zero (the rest of the slot's sector)
//! ```
//!
//! # Rules
//! - A segment is created (under its temporary name, synced before it is renamed) with slot 0
//!   at generation 0 and slot 1 at generation 1, both saying "synced through RECORDS_START".
//! - After every successful fdatasync of records, the storage writes the next generation into
//!   the other slot, with the new synced end and the hard state it synced. That write is not
//!   synced itself: it becomes durable with the next fdatasync of the segment, or when the
//!   kernel writes the page back. A process crash (SIGKILL) keeps it (the page cache survives);
//!   a power loss may lose it, and then the slot of the previous sync is the newest one.
//! - So the newest valid slot never claims more than was synced (it is written only after
//!   the fdatasync it reports), and it lives away from the log's tail: damage that zeroes or
//!   flips the last records of the log does not touch it.
//! - Both slots must be valid: each lies inside one 512-byte sector, and a write of one
//!   aligned sector is atomic on the disks this crate supports (the assumption PostgreSQL
//!   makes for `pg_control`; the simulated disk honours it), so a crash leaves each slot
//!   either old or new, never torn. A slot that fails its checksum is damage. Their
//!   generations differ by exactly one.

use std::path::Path;

use super::segment::{read_u64, FORMAT_VERSION, SECTOR};
use crate::error::StorageError;
use crate::raft::HardState;

/// Magic bytes of a watermark slot (the last byte is the format version).
pub(crate) const SLOT_MAGIC: [u8; 8] = *b"RKVMARK\x02";
/// Bytes of one slot.
pub(crate) const SLOT_LEN: usize = 64;
/// Offsets of the two slots in a segment file.
pub(crate) const SLOT_OFFSETS: [u64; 2] = [512, 1024];

const _: () = assert!(SLOT_MAGIC[7] as u32 == FORMAT_VERSION);

/// One slot's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Watermark {
    pub generation: u64,
    pub seq: u64,
    pub synced_end: u64,
    pub hard_state: HardState,
}

impl Watermark {
    /// Offset of the slot this watermark is written to.
    pub(crate) fn offset(&self) -> u64 {
        SLOT_OFFSETS[(self.generation % 2) as usize]
    }

    /// The next generation, in the other slot.
    pub(crate) fn next(&self, synced_end: u64, hard_state: HardState) -> Watermark {
        Watermark {
            generation: self.generation + 1,
            seq: self.seq,
            synced_end,
            hard_state,
        }
    }

    pub(crate) fn encode(&self) -> [u8; SLOT_LEN] {
        let mut s = [0u8; SLOT_LEN];
        s[0..8].copy_from_slice(&SLOT_MAGIC);
        s[8..16].copy_from_slice(&self.generation.to_le_bytes());
        s[16..24].copy_from_slice(&self.seq.to_le_bytes());
        s[24..32].copy_from_slice(&self.synced_end.to_le_bytes());
        s[32..40].copy_from_slice(&self.hard_state.term.to_le_bytes());
        s[40..48].copy_from_slice(&self.hard_state.vote.unwrap_or(0).to_le_bytes());
        let crc = crc32fast::hash(&s[0..60]);
        s[60..64].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// Decodes the slot at `SLOT_OFFSETS[slot]` of segment `seq`; `bytes` is the slot's 64
    /// bytes. Any inconsistency is damage, reported at the slot's offset.
    pub(crate) fn decode(
        bytes: &[u8],
        slot: usize,
        seq: u64,
        path: &Path,
    ) -> Result<Watermark, StorageError> {
        let offset = SLOT_OFFSETS[slot];
        let corrupt = |reason: &str| StorageError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason: format!("synced watermark slot {slot}: {reason}"),
        };
        let s = bytes
            .get(..SLOT_LEN)
            .ok_or_else(|| corrupt("past the end of the file"))?;
        let rest = bytes.get(SLOT_LEN..SECTOR).unwrap_or(&[]);
        if let Some(at) = rest.iter().position(|&b| b != 0) {
            return Err(StorageError::Corrupt {
                path: path.to_path_buf(),
                offset: offset + (SLOT_LEN + at) as u64,
                reason: format!(
                    "synced watermark slot {slot}: non-zero byte in the unused part of its sector"
                ),
            });
        }
        if s[0..8] != SLOT_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let crc = u32::from_le_bytes([s[60], s[61], s[62], s[63]]);
        if crc != crc32fast::hash(&s[0..60]) || s[48..60].iter().any(|&b| b != 0) {
            return Err(corrupt("checksum mismatch"));
        }
        let w = Watermark {
            generation: read_u64(s, 8).unwrap_or(0),
            seq: read_u64(s, 16).unwrap_or(0),
            synced_end: read_u64(s, 24).unwrap_or(0),
            hard_state: HardState {
                term: read_u64(s, 32).unwrap_or(0),
                vote: Some(read_u64(s, 40).unwrap_or(0)).filter(|&v| v != 0),
            },
        };
        if (w.generation % 2) as usize != slot {
            return Err(corrupt("generation does not belong in this slot"));
        }
        if w.seq != seq {
            return Err(corrupt(&format!("names segment {}", w.seq)));
        }
        Ok(w)
    }
}

/// The newest of a segment's two slots, after checking that both are valid, consecutive and
/// within the file. `image` holds at least the segment's first [`RECORDS_START`] bytes; the
/// file is `file_len` bytes long.
///
/// [`RECORDS_START`]: super::segment::RECORDS_START
pub(crate) fn read_watermark(
    image: &[u8],
    file_len: u64,
    seq: u64,
    records_start: u64,
    path: &Path,
) -> Result<Watermark, StorageError> {
    let slot = |i: usize| {
        let at = SLOT_OFFSETS[i] as usize;
        Watermark::decode(image.get(at..).unwrap_or(&[]), i, seq, path)
    };
    let (a, b) = (slot(0)?, slot(1)?);
    let (older, newer) = if a.generation > b.generation {
        (b, a)
    } else {
        (a, b)
    };
    if newer.generation != older.generation + 1 {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: older.offset(),
            reason: format!(
                "synced watermark slots hold generations {} and {} (not consecutive)",
                older.generation, newer.generation
            ),
        });
    }
    if newer.synced_end < records_start || newer.synced_end > file_len {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: newer.offset(),
            reason: format!(
                "synced watermark {} outside the segment's records",
                newer.synced_end
            ),
        });
    }
    Ok(newer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(generation: u64) -> Watermark {
        Watermark {
            generation,
            seq: 9,
            synced_end: 2000 + generation,
            hard_state: HardState {
                term: 3,
                vote: Some(2),
            },
        }
    }

    fn image(a: Watermark, b: Watermark) -> Vec<u8> {
        let mut img = vec![0u8; 4096];
        for w in [a, b] {
            let at = w.offset() as usize;
            img[at..at + SLOT_LEN].copy_from_slice(&w.encode());
        }
        img
    }

    #[test]
    fn the_newest_of_two_consecutive_slots_wins() {
        let p = Path::new("s");
        assert_eq!(
            read_watermark(&image(mark(4), mark(5)), 4096, 9, 1536, p).unwrap(),
            mark(5)
        );
        assert_eq!(
            read_watermark(&image(mark(7), mark(6)), 4096, 9, 1536, p).unwrap(),
            mark(7)
        );
        let none = Watermark {
            hard_state: HardState::default(),
            ..mark(2)
        };
        let img = image(none, mark(3));
        assert_eq!(
            Watermark::decode(&img[512..], 0, 9, p).unwrap().hard_state,
            HardState::default()
        );
    }

    #[test]
    fn damaged_foreign_or_stale_slots_are_refused_at_their_offset() {
        let p = Path::new("s");
        let good = image(mark(4), mark(5));
        for at in [512usize, 530, 575, 1024, 1087] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let offset = if at < 1024 { 512 } else { 1024 };
            assert!(
                matches!(read_watermark(&bad, 4096, 9, 1536, p), Err(StorageError::Corrupt { offset: o, .. }) if o == offset),
                "flip at {at}"
            );
        }
        let mut zeroed = good.clone();
        zeroed[1024..1088].fill(0);
        assert!(read_watermark(&zeroed, 4096, 9, 1536, p).is_err());
        assert!(
            read_watermark(&good, 4096, 8, 1536, p).is_err(),
            "another segment's slots"
        );
        assert!(
            read_watermark(&image(mark(2), mark(5)), 4096, 9, 1536, p).is_err(),
            "a stale slot"
        );
        let beyond = Watermark {
            synced_end: 5000,
            ..mark(5)
        };
        assert!(read_watermark(&image(mark(4), beyond), 4096, 9, 1536, p).is_err());
    }
}
