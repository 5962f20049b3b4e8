//! Settings of a [`FileStorage`](super::FileStorage) and the report of its recovery.
//!
//! No on-disk format here: the options that matter on disk (`cluster_id`, `node_id`, and each
//! segment's actual length) are recorded in the file headers (see `segment.rs`);
//! `recover_damaged_tail` leaves its trace in the tail-loss file (see `tail_loss.rs`).

use std::path::PathBuf;

/// Smallest accepted [`FileStorageOptions::segment_size`].
pub const MIN_SEGMENT_SIZE: u64 = 4096;
/// Largest accepted [`FileStorageOptions::segment_size`] (offsets are kept in 32 bits).
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// Settings of a [`FileStorage`](super::FileStorage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStorageOptions {
    /// The cluster this node belongs to; written in every file header and checked at open.
    pub cluster_id: u64,
    /// This node's id (not 0); written in every file header and checked at open.
    pub node_id: u64,
    /// Bytes per log segment, preallocated at creation. Default 64 MiB; must lie within
    /// [`MIN_SEGMENT_SIZE`]`..=`[`MAX_SEGMENT_SIZE`].
    pub segment_size: u64,
    /// Budget, in [`Entry::size`](crate::raft::Entry::size) bytes, of the cache of the newest decoded entries.
    /// Default 4 MiB. 0 disables it.
    pub cache_bytes: u64,
    /// Unsynced bytes buffered before an early sync. Default 8 MiB.
    pub write_buffer_bytes: u64,
    /// Recovery mode (protocol-aware recovery). Off (the default): damage to synced log
    /// records is refused at open with [`StorageError::Corrupt`](crate::error::StorageError::Corrupt).
    /// On: the log is cut at the first damaged record instead (the snapshot and the intact
    /// prefix are kept, later segments removed), after the loss has been recorded durably;
    /// the storage then reports a [`TailLoss`](crate::storage::TailLoss) until
    /// [`clear_tail_loss`](crate::storage::Storage::clear_tail_loss) is synced, so that the
    /// node neither votes nor acknowledges beyond what it still holds until a leader has
    /// repaired it. Damage to a snapshot, a missing segment or a file of another node is
    /// refused either way.
    pub recover_damaged_tail: bool,
}

impl Default for FileStorageOptions {
    fn default() -> Self {
        FileStorageOptions {
            cluster_id: 0,
            node_id: 1,
            segment_size: 64 << 20,
            cache_bytes: 4 << 20,
            write_buffer_bytes: 8 << 20,
            recover_damaged_tail: false,
        }
    }
}

/// A torn write cut off the end of the newest segment at open: bytes above its synced
/// watermark (never synced) that do not form a valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub path: PathBuf,
    /// Offset of the first invalid record.
    pub offset: u64,
    /// Bytes zeroed (from `offset` to the last non-zero byte of the file).
    pub bytes: u64,
}

/// Damage to synced data that recovery mode cut off the log (see
/// [`FileStorageOptions::recover_damaged_tail`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedTail {
    /// The file holding the first damaged byte found.
    pub path: PathBuf,
    /// Its offset.
    pub offset: u64,
    /// What was wrong there.
    pub reason: String,
    /// Segments removed whole (the damaged one, if its header was damaged, and all later).
    pub removed_segments: Vec<PathBuf>,
}

/// What recovery did when the storage was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// A torn record at the tail of the newest segment (a crash during a write), now zeroed.
    pub torn_tail: Option<TornTail>,
    /// Files removed: temporaries of an interrupted write and superseded snapshots.
    pub removed_files: Vec<PathBuf>,
    /// The log did not continue the snapshot and was discarded (a crash inside
    /// `install_snapshot`, between the snapshot's rename and the log's reset marker).
    pub discarded_log: bool,
    /// Recovery mode cut damaged synced records off the log at this open.
    pub damaged_tail: Option<DamagedTail>,
}
