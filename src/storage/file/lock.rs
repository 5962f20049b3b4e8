//! One process per data directory: an exclusive advisory lock on `<dir>/LOCK`, held for the
//! life of the [`FileStorage`](super::FileStorage).
//!
//! The lock is `flock(LOCK_EX | LOCK_NB)` through [`File::try_lock`] (Rust 1.89). It belongs
//! to the open file, so it is released when the storage is dropped or its process dies
//! (SIGKILL included): there is never a stale lock to clean up. A second open — in another
//! process or in the same one — fails at once with [`StorageError::InUse`], naming the
//! process that holds it: the holder writes its pid into the file (informational only; the
//! lock, not the content, is what excludes). The file is never removed (removing a lock
//! file races with a process that has it open).
//!
//! Advisory: it keeps out every raftkv storage, not a process that writes the files without
//! asking. Network file systems may not support it; `open` then fails with the OS error
//! rather than run unprotected.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::StorageError;

/// Name of the lock file.
pub(crate) const LOCK_NAME: &str = "LOCK";

/// The held lock; dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

/// Takes the exclusive lock of `dir` (which must exist), or fails at once.
pub(crate) fn lock_dir(dir: &Path) -> Result<DirLock, StorageError> {
    let path = dir.join(LOCK_NAME);
    let io = |op: &'static str| {
        let path = path.clone();
        move |source| StorageError::Io { op, path, source }
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io("open"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StorageError::InUse {
                path,
                pid: text.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io("lock")(e)),
    }
    file.set_len(0).map_err(io("truncate"))?;
    writeln!(file, "{}", std::process::id()).map_err(io("write"))?;
    Ok(DirLock { _file: file })
}
