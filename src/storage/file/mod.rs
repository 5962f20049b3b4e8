//! [`FileStorage`]: the durable, file-backed [`Storage`].
//!
//! # Directory layout (on-disk format version 2)
//! ```text
//! <dir>/LOCK                           the lock held by the open storage (see `lock.rs`)
//! <dir>/seg-00000000000000000001.log   log segments (see `segment.rs` for the byte layout)
//! <dir>/seg-00000000000000000002.log   ... contiguous sequence numbers, the last is active
//! <dir>/snap-<index>.snap              the current snapshot (see `snapshot.rs`)
//! <dir>/tail-loss                      a loss cut by recovery mode, until repaired
//!                                      (see `tail_loss.rs`)
//! <dir>/snap.tmp                       a snapshot being received (see `snapshot.rs`)
//! <dir>/seg-*.tmp, snap.tmp, tail-loss.tmp
//!                                      debris of an interrupted write, removed at open
//! ```
//! Files are created 0600, directories 0700. Version 1 directories are refused with
//! [`StorageError::UnsupportedFormat`]; there is no migration.
//!
//! # Tear or damage
//! The rule that decides, at open, whether a bad record is a torn write (cut) or damage to
//! synced data (refused) is in `segment.rs`: each segment's *synced watermark* (two
//! checksummed slots in its first page, see `watermark.rs`), written after every fdatasync,
//! says how far its records were synced. Bytes below it are never cut. With
//! [`FileStorageOptions::recover_damaged_tail`] damage is cut instead, after the loss is
//! recorded durably ([`Storage::tail_loss`]; see `recovery.rs`).
//!
//! # How the contract is kept
//! - Hard state, entries and truncations are all *records* of one log, in the order they were
//!   made. Writes are encoded into an in-memory buffer (`pending`) and written with a single
//!   `write_at` plus one fdatasync at [`Storage::sync`], then the next watermark slot is
//!   written (not synced: the next fdatasync carries it), so after a crash the log holds the
//!   synced records and at most a prefix of the later ones (a torn write above the watermark
//!   is cut at recovery). `sync` with nothing pending returns at once. When the buffer exceeds
//!   [`FileStorageOptions::write_buffer_bytes`] it is synced early (earlier durability is
//!   allowed by the contract).
//! - Overwrite: an `Entry` record at an index at or below the last one replaces the suffix
//!   from there; `truncate_suffix` writes a `Truncate { from }` record. Both take effect at
//!   replay, in log order, so a truncation is durable exactly when its record is, and
//!   recovery never resurrects a truncated entry once the truncation was synced.
//! - A segment is full when the next record does not fit: the active one is fdatasynced and
//!   *sealed* (its final watermark, equal to its end, fdatasynced), then the next is created
//!   (preallocated with its header and watermark, synced, renamed, directory synced) and
//!   starts with the current hard state. A record larger than `segment_size` gets a segment
//!   of its own size. On a full disk the new segment is tried at half the size, down to what
//!   the record needs; the next one is tried at twice the last size that fitted, up to
//!   `segment_size` (so a storage on a file system smaller than a segment still works).
//! - Snapshots are streamed: `write_snapshot_chunk` at offset 0 (re)creates `snap.tmp` with a
//!   placeholder header, later chunks must continue at its current length, and a running
//!   crc32 covers the content; nothing of it is held in memory, and it need not survive a
//!   crash (recovery removes it). `install_snapshot` syncs the log, writes the real header,
//!   fdatasyncs the file, renames it into place and fsyncs the directory; then it drops the
//!   covered entries from the index, or, if the log does not hold `(index, term)`, logs
//!   `Truncate { from: 0 }` and syncs it (if that fails the storage is poisoned: new entries
//!   must never follow the old ones without the marker); then it removes the older snapshot.
//!   `read_snapshot` reads the current snapshot's content with positioned reads of at most
//!   the requested length (the content was checksummed whole at open or when written).
//! - `compact(through)` removes whole segments, oldest first, that hold no live entry and
//!   nothing above `through`, then fsyncs the directory.
//! - Reads: the tail cache, else the pending buffer, else the segment through its memory map
//!   (real file system) or `read_at` (simulated disk); every record read is checksummed again.
//! - Errors: a failed fsync (or any IO error other than a full disk) poisons the storage: every
//!   later fallible call returns [`StorageError::Poisoned`]. A full disk returns
//!   [`StorageError::NoSpace`] and changes nothing durable; the call may be retried (a failed
//!   `sync` keeps its buffer; a failed segment creation leaves no segment behind; a failed
//!   snapshot chunk may be retried at the same offset). A full disk while `install_snapshot`
//!   writes the snapshot's header abandons that snapshot: its transfer restarts at offset 0.
//!
//! - Memory: 8 bytes of location per live entry plus one `(index, term)` pair per term change,
//!   the tail cache ([`FileStorageOptions::cache_bytes`]) and the unsynced buffer (at most
//!   [`FileStorageOptions::write_buffer_bytes`] plus one batch). Entries are not kept on the
//!   heap; segments are memory mapped and read on demand.
//!
//! Why the hard state is a record and not a file of its own: the contract promises that after
//! a crash the storage holds a *prefix* of the writes in the order they were made. With one
//! stream written by one `write_at` per sync, a vote can never survive while an earlier append
//! is lost, or the other way round; and a hard state costs no extra fsync.
//!
//! One `FileStorage` per directory: [`FileStorage::open`] takes an exclusive lock on
//! `<dir>/LOCK` for the life of the storage, and a second open (in any process) fails with
//! [`StorageError::InUse`]. (The simulated disk is not locked.)

mod header;
mod lock;
mod log_index;
mod recovery;
mod segment;
mod snapshot;
mod tail_loss;
mod vfs;
mod watermark;

#[cfg(any(test, feature = "testing"))]
pub mod sim;

#[cfg(feature = "testing")]
pub mod conformance;

pub mod inspect;
mod options;

pub use options::{
    DamagedTail, FileStorageOptions, RecoveryReport, TornTail, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lock::DirLock;
use log_index::{unpack, LogIndex, TailCache};
use segment::{
    create_segment_fitting, decode_record_at, encode_record, Record, RecordRef, Segment,
    SegmentHeader, HEADER_LEN, RECORDS_START,
};
use snapshot::{IncomingSnapshot, SnapshotFile};
use tail_loss::{remove_tail_loss, RecordedLoss};
use vfs::{io_error, RealFs, Vfs};

use super::{InitialState, PersistedSize, Storage, SyncWait, TailLoss};
use crate::error::StorageError;
use crate::raft::{Entry, HardState, Index, SnapshotMeta, Term};

/// A [`Storage`] in a directory of files. See the [module docs](self) for the format and the
/// guarantees.
///
/// ```
/// use raftkv::raft::{Entry, EntryPayload, HardState};
/// use raftkv::storage::{FileStorage, FileStorageOptions, Storage};
///
/// let dir = std::env::temp_dir().join(format!("raftkv-doc-{}", std::process::id()));
/// let opts = FileStorageOptions { cluster_id: 7, node_id: 1, segment_size: 1 << 20, ..Default::default() };
/// let mut s = FileStorage::open(&dir, opts).unwrap();
/// s.set_hard_state(HardState { term: 1, vote: Some(1) }).unwrap();
/// s.append(&[Entry { index: 1, term: 1, payload: EntryPayload::Noop }]).unwrap();
/// s.sync().unwrap();
/// drop(s);
/// let s = FileStorage::open(&dir, opts).unwrap();
/// assert_eq!(s.last_index(), 1);
/// assert_eq!(s.initial_state().unwrap().hard_state.term, 1);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Debug)]
pub struct FileStorage {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    opts: FileStorageOptions,
    hard_state: HardState,
    /// The hard state the log's records replay to (those written and those pending): what a
    /// watermark records. Equal to `hard_state` except at open, between recovery taking it
    /// from a watermark (no retained record held one) and its record being logged.
    logged_hard_state: HardState,
    /// The current snapshot's meta (`index == 0` when there is none).
    snapshot: SnapshotMeta,
    /// The current snapshot's file; `Some` exactly when `snapshot.index > 0`.
    snapshot_file: Option<SnapshotFile>,
    /// A snapshot being received with `write_snapshot_chunk`, not yet installed.
    incoming: Option<IncomingSnapshot>,
    /// Non-empty, ascending, contiguous sequence numbers; the last is the active segment.
    segments: Vec<Segment>,
    index: LogIndex,
    cache: TailCache,
    /// Framed records not yet written; they belong at `active().end`.
    pending: Vec<u8>,
    scratch: Vec<u8>,
    poisoned: bool,
    report: RecoveryReport,
    /// The directory's lock (real file system only), held for the life of the storage.
    _lock: Option<DirLock>,
    /// A watermark was written since the active segment's last fdatasync.
    watermark_unsynced: bool,
    /// Length to preallocate for the next segment: the configured size, halved after a
    /// full disk refused it, doubled back after each success.
    next_segment_len: u64,
    /// The recorded tail loss (see `tail_loss.rs`), until its removal is synced.
    tail_loss: Option<RecordedLoss>,
    /// `clear_tail_loss` was called: remove the record at the next sync.
    clear_tail_loss: bool,
    /// What the sync begun by `start_sync` covers, until `finish_sync`.
    started: Option<Covered>,
}

/// How far an fdatasync of a segment makes its records durable.
#[derive(Clone, Copy, Debug)]
struct Covered {
    seq: u64,
    end: u64,
    /// The hard state the records up to `end` replay to.
    hard_state: HardState,
}

impl FileStorage {
    /// Opens (creating if needed, mode 0700) the storage in `dir`, takes its lock and
    /// recovers it (see `recovery.rs`). Fails with [`StorageError::InUse`] at once when another
    /// storage holds the directory, with [`StorageError::Corrupt`],
    /// [`StorageError::WrongIdentity`] or [`StorageError::UnsupportedFormat`] naming the file
    /// (and offset) when the directory holds damage other than a torn write of never-synced
    /// bytes (see [`FileStorageOptions::recover_damaged_tail`] for the alternative).
    pub fn open(dir: impl AsRef<Path>, opts: FileStorageOptions) -> Result<Self, StorageError> {
        let dir = dir.as_ref();
        let fs = RealFs;
        fs.create_dir_all(dir)
            .map_err(|e| io_error("create dir", dir, e))?;
        let lock = lock::lock_dir(dir)?;
        let mut storage = Self::open_with(Arc::new(fs), dir, opts)?;
        storage._lock = Some(lock);
        Ok(storage)
    }

    /// Opens the storage on a simulated disk (feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub fn open_simulated(
        disk: &sim::SimDisk,
        dir: impl AsRef<Path>,
        opts: FileStorageOptions,
    ) -> Result<Self, StorageError> {
        Self::open_with(Arc::new(disk.clone()), dir.as_ref(), opts)
    }

    fn open_with(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        opts: FileStorageOptions,
    ) -> Result<Self, StorageError> {
        if opts.node_id == 0 {
            return Err(StorageError::Invalid("node id 0 is reserved".into()));
        }
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&opts.segment_size) {
            return Err(StorageError::Invalid(format!(
                "segment size {} outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}",
                opts.segment_size
            )));
        }
        let r = recovery::recover(vfs.as_ref(), dir, &opts)?;
        let snapshot_file = match r.snapshot_path {
            Some(path) => Some(SnapshotFile::open(vfs.as_ref(), path, r.snapshot_file_len)?),
            None => None,
        };
        let mut storage = FileStorage {
            vfs,
            dir: dir.to_path_buf(),
            opts,
            hard_state: r.hard_state,
            logged_hard_state: r.log_hard_state,
            snapshot: r.snapshot,
            snapshot_file,
            incoming: None,
            segments: r.segments,
            index: r.index,
            cache: TailCache::new(opts.cache_bytes),
            pending: Vec::new(),
            scratch: Vec::new(),
            poisoned: false,
            report: r.report,
            _lock: None,
            watermark_unsynced: false,
            next_segment_len: opts.segment_size,
            tail_loss: r.tail_loss,
            clear_tail_loss: false,
            started: None,
        };
        if !storage.active().has_hard_state || r.needs_hard_state_record {
            // Every segment with records starts with the hard state (see `segment.rs`); a
            // hard state newer than the log's (kept across a recovery cut) is logged too.
            let hs = storage.hard_state;
            storage.push_record(&RecordRef::HardState(hs))?;
            storage.active_mut().has_hard_state = true;
        }
        if r.needs_reset_marker {
            storage.push_record(&RecordRef::Truncate { from: 0 })?;
        }
        if r.needs_reset_marker || r.needs_hard_state_record {
            storage.sync_inner()?;
        }
        Ok(storage)
    }

    /// What recovery did at open.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of segment files currently retained.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Approximate heap bytes of the in-memory log index (excluding the tail cache).
    pub fn index_heap_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    fn active(&self) -> &Segment {
        // Invariant: `segments` is never empty (recovery creates the first one).
        &self.segments[self.segments.len() - 1]
    }

    fn active_mut(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    fn check_poison(&self) -> Result<(), StorageError> {
        if self.poisoned {
            Err(StorageError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the storage on any error that may have lost or half-written data.
    fn guard<T>(&mut self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(e) = &result {
            let harmless = matches!(
                e,
                StorageError::NoSpace { .. }
                    | StorageError::Invalid(_)
                    | StorageError::Compacted(_)
                    | StorageError::Unavailable(_)
            );
            if !harmless {
                self.poisoned = true;
            }
        }
        result
    }

    /// Frames `record` into the pending buffer (rolling to a new segment if it does not fit)
    /// and returns its location.
    fn push_record(&mut self, record: &RecordRef<'_>) -> Result<u64, StorageError> {
        self.scratch.clear();
        encode_record(record, &mut self.scratch)?;
        let size = self.scratch.len() as u64;
        let active = self.active();
        if active.end + self.pending.len() as u64 + size > active.len {
            self.roll(size)?;
        }
        let active = self.active();
        let location = log_index::pack(active.seq, active.end + self.pending.len() as u64);
        self.pending.extend_from_slice(&self.scratch);
        if let RecordRef::HardState(hs) = record {
            self.logged_hard_state = *hs;
        }
        Ok(location)
    }

    /// Syncs the active segment (and its final watermark) and starts the next one with room
    /// for a record of `record_size` bytes. On a full disk the new segment is tried smaller
    /// (down to what the record needs) before failing with [`StorageError::NoSpace`]; a
    /// failed attempt leaves no file behind.
    fn roll(&mut self, record_size: u64) -> Result<(), StorageError> {
        self.flush_pending()?;
        self.seal_active()?;
        let seq = self.active().seq + 1;
        if seq >= 1 << 32 {
            return Err(StorageError::Invalid("segment numbers exhausted".into()));
        }
        let mut hs_record = Vec::new();
        encode_record(&RecordRef::HardState(self.hard_state), &mut hs_record)?;
        let needed = RECORDS_START + hs_record.len() as u64 + record_size;
        if needed > u64::from(u32::MAX) {
            return Err(StorageError::Invalid(format!(
                "record of {record_size} bytes is too large"
            )));
        }
        let header = SegmentHeader {
            cluster_id: self.opts.cluster_id,
            node_id: self.opts.node_id,
            seq,
            allocated_len: 0,
        };
        let preferred = self.next_segment_len.max(needed);
        // The new segment's watermark: nothing synced in it yet, the log's hard state so far.
        let created = create_segment_fitting(
            self.vfs.as_ref(),
            &self.dir,
            header,
            self.logged_hard_state,
            &[],
            preferred,
            needed,
        );
        let mut segment = match created {
            Ok(segment) => segment,
            Err((e, tried)) => {
                if matches!(e, StorageError::NoSpace { .. }) {
                    self.next_segment_len = tried.max(MIN_SEGMENT_SIZE);
                }
                return Err(e);
            }
        };
        self.next_segment_len = (segment.len.saturating_mul(2))
            .min(self.opts.segment_size)
            .max(MIN_SEGMENT_SIZE);
        segment.has_hard_state = true;
        self.segments.push(segment);
        self.watermark_unsynced = false;
        self.pending.extend_from_slice(&hs_record);
        self.logged_hard_state = self.hard_state;
        Ok(())
    }

    /// Writes the active segment's watermark if a full disk kept it from being written.
    fn write_unwritten_watermark(&mut self) -> Result<(), StorageError> {
        let active = self.active_mut();
        if active.watermark_unwritten {
            let w = active.watermark;
            active
                .file
                .write_at(&w.encode(), w.offset())
                .map_err(|e| io_error("write", &active.path, e))?;
            active.watermark_unwritten = false;
            self.watermark_unsynced = true;
        }
        Ok(())
    }

    /// Makes the active segment's watermark say, durably, that all its records are synced
    /// (before the segment is left for a new one: recovery then requires its records to end
    /// exactly there). Records above the watermark can exist only when recovery kept
    /// surviving unsynced records; they are synced first.
    fn seal_active(&mut self) -> Result<(), StorageError> {
        self.write_unwritten_watermark()?;
        let hard_state = self.logged_hard_state;
        let active = self.active_mut();
        if active.watermark.synced_end < active.end {
            active
                .file
                .sync_data()
                .map_err(|e| io_error("fsync", &active.path, e))?;
            active.watermark = active.watermark.next(active.end, hard_state);
            let w = active.watermark;
            if let Err(e) = active.file.write_at(&w.encode(), w.offset()) {
                // The slot keeps the generation before: the retry writes this one first
                // (`write_unwritten_watermark`), so the two slots stay consecutive.
                let e = io_error("write", &active.path, e);
                if matches!(e, StorageError::NoSpace { .. }) {
                    active.watermark_unwritten = true;
                }
                return Err(e);
            }
            self.watermark_unsynced = true;
        }
        if self.watermark_unsynced {
            let active = self.active();
            active
                .file
                .sync_data()
                .map_err(|e| io_error("fsync", &active.path, e))?;
            self.watermark_unsynced = false;
        }
        Ok(())
    }

    /// Writes the pending buffer in one `write_at` (after a watermark a full disk kept back,
    /// which the next fdatasync then makes durable before a later one claims more). Returns
    /// what an fdatasync of the active segment from now on covers.
    fn write_pending(&mut self) -> Result<Covered, StorageError> {
        self.write_unwritten_watermark()?;
        // Everything logged is written after this: the watermark records what it replays to.
        let hard_state = self.logged_hard_state;
        let active = &self.segments[self.segments.len() - 1];
        if !self.pending.is_empty() {
            active
                .file
                .write_at(&self.pending, active.end)
                .map_err(|e| io_error("write", &active.path, e))?;
            let written = self.pending.len() as u64;
            self.pending.clear();
            self.active_mut().end += written;
        }
        let active = self.active();
        Ok(Covered {
            seq: active.seq,
            end: active.end,
            hard_state,
        })
    }

    /// After an fdatasync that covered `covered`, writes the next watermark generation saying
    /// so (durable at the next fdatasync; see `watermark.rs`). Nothing when the watermark
    /// already says as much (a later sync got there first) or `covered` was in a segment that
    /// is no longer the active one (sealed since, with its final watermark, or gone).
    fn mark_synced(&mut self, covered: Covered) -> Result<(), StorageError> {
        let active = self.active();
        if active.seq != covered.seq || active.watermark.synced_end >= covered.end {
            return Ok(());
        }
        // A generation a full disk kept back goes first (the two slots' generations differ
        // by one). If the disk is still full, this claim waits too: the records it covers
        // are synced and valid, and a later sync claims them with its own.
        match self.write_unwritten_watermark() {
            Ok(()) => {}
            Err(StorageError::NoSpace { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        let active = self.active_mut();
        active.watermark = active.watermark.next(covered.end, covered.hard_state);
        let w = active.watermark;
        match active.file.write_at(&w.encode(), w.offset()) {
            Ok(()) => self.watermark_unsynced = true,
            Err(e) => match io_error("write", &active.path, e) {
                // The records are durable; the watermark is written before the next batch.
                StorageError::NoSpace { .. } => active.watermark_unwritten = true,
                other => return Err(other),
            },
        }
        Ok(())
    }

    /// Writes the pending buffer, fdatasyncs what the active segment holds above its
    /// watermark (that buffer, and what a split sync wrote and may not have synced yet), then
    /// writes the next watermark generation.
    fn flush_pending(&mut self) -> Result<(), StorageError> {
        let covered = self.write_pending()?;
        let active = self.active();
        if active.watermark.synced_end >= covered.end {
            return Ok(());
        }
        active
            .file
            .sync_data()
            .map_err(|e| io_error("fsync", &active.path, e))?;
        self.mark_synced(covered)
    }

    fn sync_inner(&mut self) -> Result<(), StorageError> {
        self.flush_pending()?;
        if self.clear_tail_loss && self.tail_loss.is_some() {
            remove_tail_loss(self.vfs.as_ref(), &self.dir)?;
            self.tail_loss = None;
        }
        self.clear_tail_loss = false;
        Ok(())
    }

    fn segment(&self, seq: u64) -> Option<&Segment> {
        let first = self.segments.first()?.seq;
        self.segments
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)
    }

    fn read_entry(&self, index: Index) -> Result<Entry, StorageError> {
        let location = self
            .index
            .location(index)
            .ok_or(StorageError::Unavailable(index))?;
        let (seq, offset) = unpack(location);
        let seg = self.segment(seq).ok_or_else(|| StorageError::Corrupt {
            path: self.dir.clone(),
            offset,
            reason: format!("entry {index} is in segment {seq}, which is not retained"),
        })?;
        let record = if seg.seq == self.active().seq && offset >= seg.end {
            let at = (offset - seg.end) as usize;
            decode_record_at(self.pending.get(at..).unwrap_or(&[]), &seg.path, offset)?
        } else {
            seg.read_record(offset)?
        };
        match record {
            Record::Entry(e) if e.index == index => Ok(e),
            _ => Err(StorageError::Corrupt {
                path: seg.path.clone(),
                offset,
                reason: format!("expected entry {index}"),
            }),
        }
    }

    fn append_inner(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        for entry in entries {
            // Record first: if that fails (a full disk), memory still matches the log.
            let location = self.push_record(&RecordRef::Entry(entry))?;
            if entry.index <= self.index.last() {
                self.index.truncate_from(entry.index);
                self.cache.truncate_from(entry.index);
            }
            self.index.push(entry.index, entry.term, location);
            self.cache.push(entry);
            let active = self.active_mut();
            active.max_index = active.max_index.max(entry.index);
        }
        if self.pending.len() as u64 > self.opts.write_buffer_bytes {
            self.sync_inner()?;
        }
        Ok(())
    }

    fn write_snapshot_chunk_inner(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        if offset == 0 {
            // Start afresh: `create` replaces any partial snapshot's file.
            self.incoming = None;
            self.incoming = Some(IncomingSnapshot::create(
                self.vfs.as_ref(),
                &self.dir,
                meta,
            )?);
        }
        match &mut self.incoming {
            Some(incoming) if incoming.meta() == meta => incoming.write(offset, data),
            _ => Err(StorageError::Invalid(format!(
                "snapshot chunk at offset {offset} for index {} does not continue the snapshot \
                 being written",
                meta.index
            ))),
        }
    }

    fn install_snapshot_inner(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        let not_written = || {
            StorageError::Invalid(format!(
                "no snapshot for index {} term {} was written",
                meta.index, meta.term
            ))
        };
        if self.incoming.as_ref().map(IncomingSnapshot::meta) != Some(meta) {
            return Err(not_written());
        }
        // Earlier writes first; if that fails for lack of space, the install may be retried.
        self.sync_inner()?;
        let incoming = self.incoming.take().ok_or_else(not_written)?;
        if meta.index <= self.snapshot.index {
            // Never move backwards.
            return incoming.discard(self.vfs.as_ref());
        }
        let installed = incoming.finish(
            self.vfs.as_ref(),
            &self.dir,
            self.opts.cluster_id,
            self.opts.node_id,
        )?;
        let old = self.snapshot_file.replace(installed);
        self.snapshot = meta;
        if self.index.term(meta.index) == Some(meta.term) {
            self.index.drop_through(meta.index);
            self.cache.drop_through(meta.index);
        } else {
            self.index.reset(meta.index + 1);
            self.cache.clear();
            // The snapshot is durable; the log must now record that the old entries are gone
            // before any new entry follows them. If that fails (even for lack of space) the
            // storage cannot go on safely: poison it.
            let marker = self
                .push_record(&RecordRef::Truncate { from: 0 })
                .and_then(|_| self.sync_inner());
            if marker.is_err() {
                self.poisoned = true;
            }
            marker?;
        }
        if let Some(old) = old {
            // Not synced: if the removal is lost, recovery removes the stale file again.
            drop(old.file);
            self.vfs
                .remove(&old.path)
                .map_err(|e| io_error("remove", &old.path, e))?;
        }
        Ok(())
    }

    fn compact_inner(&mut self, through: Index) -> Result<(), StorageError> {
        self.sync_inner()?;
        if through > self.snapshot.index {
            return Err(StorageError::Invalid(format!(
                "compact through {through} beyond snapshot {}",
                self.snapshot.index
            )));
        }
        let first_live_seq = match self.index.location(self.index.first()) {
            Some(location) => unpack(location).0,
            None => self.active().seq,
        };
        let mut removed = 0;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            if oldest.seq >= first_live_seq || oldest.max_index > through {
                break;
            }
            self.vfs
                .remove(&oldest.path)
                .map_err(|e| io_error("remove", &oldest.path, e))?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            self.vfs
                .sync_dir(&self.dir)
                .map_err(|e| io_error("fsync dir", &self.dir, e))?;
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.check_poison()?;
        Ok(InitialState {
            hard_state: self.hard_state,
            snapshot: self.snapshot,
            first_index: self.index.first(),
            last_index: self.index.last(),
            snapshot_size: self.snapshot_file.as_ref().map_or(0, |f| f.content_len),
        })
    }

    fn first_index(&self) -> Index {
        self.index.first()
    }

    fn last_index(&self) -> Index {
        self.index.last()
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.check_poison()?;
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.index.first() {
            return Err(StorageError::Compacted(index));
        }
        self.index
            .term(index)
            .ok_or(StorageError::Unavailable(index))
    }

    fn entries(&self, lo: Index, hi: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.check_poison()?;
        if lo >= hi {
            return Ok(Vec::new());
        }
        for index in [lo, hi - 1] {
            if index < self.index.first() {
                return Err(StorageError::Compacted(index));
            }
            if index > self.index.last() {
                return Err(StorageError::Unavailable(index));
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for index in lo..hi {
            let entry = match self.cache.get(index) {
                Some(e) => e.clone(),
                None => self.read_entry(index)?,
            };
            bytes += entry.size();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.check_poison()?;
        if hard_state == self.hard_state {
            return Ok(());
        }
        let r = self.push_record(&RecordRef::HardState(hard_state));
        self.guard(r)?;
        self.hard_state = hard_state;
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.check_poison()?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let (lo, hi) = (self.index.first(), self.index.last() + 1);
        if first.index < lo || first.index > hi {
            return Err(StorageError::Invalid(format!(
                "append at {} outside {lo}..={hi}",
                first.index
            )));
        }
        if entries.windows(2).any(|w| w[1].index != w[0].index + 1) {
            return Err(StorageError::Invalid(
                "appended entries are not contiguous".into(),
            ));
        }
        let r = self.append_inner(entries);
        self.guard(r)
    }

    fn truncate_suffix(&mut self, from: Index) -> Result<(), StorageError> {
        self.check_poison()?;
        if from < self.index.first() {
            return Err(StorageError::Compacted(from));
        }
        if from > self.index.last() {
            return Ok(());
        }
        let r = self.push_record(&RecordRef::Truncate { from });
        self.guard(r)?;
        self.index.truncate_from(from);
        self.cache.truncate_from(from);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.check_poison()?;
        let r = self.sync_inner();
        self.guard(r)
    }

    /// Writes what is pending and returns the fdatasync of the active segment, on a handle
    /// of its own. Appends, reads and even a blocking `sync` may run meanwhile: the
    /// watermark is written by `finish_sync` only if no later sync (or a seal) already
    /// claims as much. A pending removal of a tail-loss record is left to `sync`.
    fn start_sync(&mut self) -> Result<Option<SyncWait>, StorageError> {
        self.check_poison()?;
        if self.clear_tail_loss {
            return Ok(None);
        }
        let r = self.write_pending();
        let covered = self.guard(r)?;
        let active = self.active();
        if active.watermark.synced_end >= covered.end {
            self.started = None;
            return Ok(Some(SyncWait::done()));
        }
        let file = active.file.clone();
        let path = active.path.clone();
        self.started = Some(covered);
        Ok(Some(SyncWait::blocking(move || {
            file.sync_data().map_err(|e| io_error("fsync", &path, e))
        })))
    }

    fn finish_sync(&mut self, waited: Result<(), StorageError>) -> Result<(), StorageError> {
        let started = self.started.take();
        let r = waited.and_then(|()| {
            self.check_poison()?;
            match started {
                Some(covered) => self.mark_synced(covered),
                None => Ok(()),
            }
        });
        self.guard(r)
    }

    fn write_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.check_poison()?;
        let r = self.write_snapshot_chunk_inner(meta, offset, data);
        self.guard(r)
    }

    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.check_poison()?;
        let r = self.install_snapshot_inner(meta);
        self.guard(r)
    }

    fn read_snapshot(&self, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.check_poison()?;
        match &self.snapshot_file {
            None => Err(StorageError::Unavailable(0)),
            Some(file) => file.read(offset, len),
        }
    }

    fn compact(&mut self, through: Index) -> Result<(), StorageError> {
        self.check_poison()?;
        let r = self.compact_inner(through);
        self.guard(r)
    }

    fn tail_loss(&self) -> Option<TailLoss> {
        self.tail_loss.map(|r| r.loss)
    }

    fn record_tail_loss(&mut self, loss: TailLoss) -> Result<(), StorageError> {
        self.check_poison()?;
        let recorded = RecordedLoss {
            loss,
            hard_state: self.hard_state,
        };
        let recorded = match self.tail_loss {
            Some(old) => old.merge_keeping(recorded),
            None => recorded,
        };
        let r = tail_loss::write_tail_loss(
            self.vfs.as_ref(),
            &self.dir,
            &recorded,
            self.opts.cluster_id,
            self.opts.node_id,
        );
        self.guard(r)?;
        self.tail_loss = Some(recorded);
        self.clear_tail_loss = false;
        Ok(())
    }

    fn clear_tail_loss(&mut self) -> Result<(), StorageError> {
        self.check_poison()?;
        self.clear_tail_loss = self.tail_loss.is_some();
        Ok(())
    }

    fn persisted_size(&self) -> PersistedSize {
        PersistedSize {
            // Each segment's records and its 64-byte header; not the rest of the first page
            // (the watermark's fixed sectors), which a log bound should not count.
            log_bytes: self
                .segments
                .iter()
                .map(|s| s.end - RECORDS_START + HEADER_LEN)
                .sum(),
            snapshot_bytes: self
                .snapshot_file
                .as_ref()
                .map_or(0, SnapshotFile::file_len),
        }
    }
}
