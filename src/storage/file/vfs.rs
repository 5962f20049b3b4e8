//! File access behind a small trait, so that crash consistency can be tested on a simulated disk.
//!
//! [`Vfs`] names the directory operations FileStorage needs (create, open, rename, remove, list,
//! fsync of a directory) and [`VfsFile`] the per-file ones (positioned read and write, set_len,
//! fdatasync, and an optional read-only memory map). [`RealFs`] maps them onto `std::fs`; the
//! simulated disk lives in `sim.rs` (feature `testing`).
//!
//! Invariants the storage relies on:
//! - `write_at` either writes the whole buffer or fails; a failed write may have written a prefix.
//! - Nothing written is durable before `sync_data` on that file returns `Ok`, and no name created,
//!   renamed or removed is durable before `sync_dir` on its directory returns `Ok`.
//! - Only `RealFs` files can be memory mapped; the simulated disk is read with `read_at`.

use std::fmt::Debug;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;

use memmap2::Mmap;

use crate::error::StorageError;

/// `ENOSPC` on every unix this crate supports (Linux, the BSDs, macOS).
pub(crate) const ENOSPC: i32 = 28;
/// `EIO`, used by the simulated disk for failed fsyncs.
#[cfg(any(test, feature = "testing"))]
pub(crate) const EIO: i32 = 5;

/// Directory-level file operations.
pub(crate) trait Vfs: Send + Sync + Debug {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir` (files only matter; non UTF-8 names are skipped).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates `path` empty (replacing any file of that name), opened for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open file.
pub(crate) trait VfsFile: Send + Sync + Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length (zero-extending).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Fills `buf` from `offset`; fails if the file is shorter.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasync: makes the written data (and the length) durable.
    fn sync_data(&self) -> io::Result<()>;
    /// A read-only map of the whole file, when the implementation supports it.
    fn map(&self) -> io::Result<Option<Mmap>>;
}

/// Maps an `io::Error` of operation `op` on `path` to a [`StorageError`]. A full disk becomes
/// [`StorageError::NoSpace`], except for fsyncs: a failed fsync is always an IO error (fatal).
pub(crate) fn io_error(op: &'static str, path: &Path, source: io::Error) -> StorageError {
    if source.raw_os_error() == Some(ENOSPC) && op != "fsync" && op != "fsync dir" {
        StorageError::NoSpace {
            path: path.to_path_buf(),
        }
    } else {
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Mode of the files the storage creates (owner read and write only).
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of the directories the storage creates (owner only).
pub(crate) const DIR_MODE: u32 = 0o700;

/// The operating system's file system. Files are created `0600` and directories `0700`
/// (further restricted by the umask); existing directories keep their mode.
#[derive(Debug, Default)]
pub(crate) struct RealFs;

impl Vfs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(path)?;
        Ok(Box::new(RealFile { file }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(RealFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[derive(Debug)]
struct RealFile {
    file: File,
}

impl VfsFile for RealFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn map(&self) -> io::Result<Option<Mmap>> {
        if self.len()? == 0 {
            return Ok(None); // an empty file cannot be mapped; callers fall back to read_at
        }
        // SAFETY: the map is read-only and FileStorage owns its directory (one storage per
        // directory, enforced by the exclusive lock on `<dir>/LOCK` that `FileStorage::open`
        // holds for the storage's life; no other writer). FileStorage never shrinks a
        // file it has mapped: segments are preallocated to their final length before they are
        // mapped, and they are only ever deleted whole (unlinking keeps the pages of a live
        // mapping valid on unix). So no access through the map can hit a truncated page
        // (SIGBUS), and the bytes it reads are only changed by our own `write_at` calls, which
        // the reader treats as plain bytes to be checksummed.
        let map = unsafe { Mmap::map(&self.file)? };
        Ok(Some(map))
    }
}
