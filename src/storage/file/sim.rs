//! A simulated disk for crash-consistency tests (feature `testing`).
//!
//! Model: every file is an inode with a *durable* image (what survives a power loss) and a
//! *current* image (what reads see), plus the list of writes and `set_len`s made since its last
//! `sync_data`. Names live in a current map and a durable map; creations, renames and removals
//! since the last `sync_dir` are kept in order in a journal.
//!
//! [`SimDisk::crash`] models a power loss. Each unsynced write is kept fully, kept as a prefix
//! of random length (a torn write; or, with [`SimDisk::set_tear_sectors`], a random subset of
//! its 512-byte sectors) or lost, independently of the others (so later writes may survive
//! earlier ones: they are reordered). A write that lies inside one aligned 512-byte sector is
//! never torn, only kept or lost (sector atomicity, which real disks give and the storage's
//! watermark slots rely on); a longer write may tear anywhere, even inside a sector (harsher
//! than a real disk). Each unsynced `set_len` is kept or lost. The
//! directory keeps a random prefix of its journal (metadata journals commit in order). Inodes
//! left without a name vanish. The randomness comes from a seeded [`SplitMix64`], so a failing
//! case is reproduced by its seed.
//!
//! Faults: [`SimDisk::crash_after`] makes the n-th next mutating operation and everything after
//! it fail (the process "dies" there); [`SimDisk::set_no_space`] makes writes and growing
//! `set_len`s fail with `ENOSPC` (a write first lands half of its bytes, unsynced, or none
//! if it lies within one 512-byte sector);
//! [`SimDisk::fail_next_sync`] makes the next fsync fail with `EIO`; [`SimDisk::set_capacity`]
//! makes the disk small: a write or `set_len` that would grow the files (those with a name)
//! beyond it fails with `ENOSPC` and changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use parking_lot::Mutex;

use super::vfs::{Vfs, VfsFile, EIO, ENOSPC};

/// The splitmix64 generator: tiny, seeded, good enough to pick fault outcomes.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

#[derive(Clone, Debug)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

impl FileOp {
    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            FileOp::Write { offset, data } => write_into(image, *offset, data),
            FileOp::SetLen(len) => image.resize(*len as usize, 0),
        }
    }
}

fn write_into(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(data);
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    unsynced: Vec<FileOp>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Create(PathBuf, u64),
    Rename(PathBuf, PathBuf),
    Remove(PathBuf),
}

impl DirOp {
    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            DirOp::Create(path, ino) => {
                names.insert(path.clone(), *ino);
            }
            DirOp::Rename(from, to) => {
                if let Some(ino) = names.remove(from) {
                    names.insert(to.clone(), ino);
                }
            }
            DirOp::Remove(path) => {
                names.remove(path);
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next_inode: u64,
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    journal: Vec<DirOp>,
    ops_until_crash: Option<u64>,
    dead: bool,
    no_space: bool,
    /// Writes starting below this offset fail as with `no_space`.
    no_space_below: Option<u64>,
    fail_next_sync: bool,
    tear_sectors: bool,
    capacity: Option<u64>,
    mutating_ops: u64,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl State {
    /// Counts a mutating operation and fails it if the process has "died".
    fn tick(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(power_lost());
        }
        if let Some(n) = self.ops_until_crash.as_mut() {
            if *n == 0 {
                self.dead = true;
                return Err(power_lost());
            }
            *n -= 1;
        }
        self.mutating_ops += 1;
        Ok(())
    }
    fn alive(&self) -> io::Result<()> {
        if self.dead {
            Err(power_lost())
        } else {
            Ok(())
        }
    }
    fn inode(&mut self, ino: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "stale simulated file"))
    }
    /// Fails with `ENOSPC` if growing inode `ino` to `new_len` bytes exceeds the capacity.
    fn check_capacity(&self, ino: u64, new_len: u64) -> io::Result<()> {
        let Some(capacity) = self.capacity else {
            return Ok(());
        };
        let current = self.inodes.get(&ino).map_or(0, |i| i.current.len() as u64);
        if new_len <= current {
            return Ok(());
        }
        let mut live: Vec<u64> = self.names.values().copied().collect();
        live.push(ino);
        live.sort_unstable();
        live.dedup();
        let used: u64 = live
            .iter()
            .filter_map(|i| self.inodes.get(i))
            .map(|i| i.current.len() as u64)
            .sum();
        if used - current + new_len > capacity {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        Ok(())
    }
    fn lookup(&self, path: &Path) -> io::Result<u64> {
        self.names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }
}

/// A simulated disk shared by its clones. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// After `ops` more mutating operations (write, set_len, fsync, create, rename, remove)
    /// succeed, the next one and everything after it fail, as if the process died there.
    pub fn crash_after(&self, ops: u64) {
        self.state.lock().ops_until_crash = Some(ops);
    }

    /// Power loss: resolves unsynced writes and directory changes at random (seeded), then lets
    /// the disk be used again with no fault armed.
    pub fn crash(&self, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let mut s = self.state.lock();
        let tear_sectors = s.tear_sectors;
        let mut inos: Vec<u64> = s.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(inode) = s.inodes.get_mut(&ino) else {
                continue;
            };
            let mut image = inode.durable.clone();
            for op in inode.unsynced.drain(..) {
                match (rng.below(3), &op) {
                    (0, _) => {}
                    (2, FileOp::Write { offset, data }) if tear_sectors => {
                        // Any subset of the write's 512-byte sectors reaches the platter.
                        let mut at = 0usize;
                        while at < data.len() {
                            let end = (((*offset as usize + at) / 512 + 1) * 512
                                - *offset as usize)
                                .min(data.len());
                            if rng.below(2) == 0 {
                                write_into(&mut image, *offset + at as u64, &data[at..end]);
                            }
                            at = end;
                        }
                    }
                    (2, FileOp::Write { offset, data })
                        if data.is_empty()
                            || *offset / 512 == (*offset + data.len() as u64 - 1) / 512 =>
                    {
                        op.apply(&mut image); // inside one sector: atomic
                    }
                    (2, FileOp::Write { offset, data }) => {
                        let keep = rng.below(data.len() as u64 + 1) as usize;
                        write_into(&mut image, *offset, &data[..keep]);
                    }
                    _ => op.apply(&mut image),
                }
            }
            inode.durable = image.clone();
            inode.current = image;
        }
        let keep = rng.below(s.journal.len() as u64 + 1) as usize;
        let journal = std::mem::take(&mut s.journal);
        let mut names = s.durable_names.clone();
        for op in &journal[..keep] {
            op.apply(&mut names);
        }
        s.durable_names = names.clone();
        s.names = names;
        let live: std::collections::HashSet<u64> = s.names.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        s.ops_until_crash = None;
        s.dead = false;
        s.no_space = false;
        s.no_space_below = None;
        s.fail_next_sync = false;
    }

    /// Makes a torn write keep a random subset of its 512-byte sectors instead of a prefix
    /// (a harsher disk than the one recovery's torn-tail rule assumes; see `segment.rs`).
    pub fn set_tear_sectors(&self, on: bool) {
        self.state.lock().tear_sectors = on;
    }

    /// Limits the bytes of all named files (`None`: unlimited). Writes and `set_len`s that
    /// would grow them beyond it fail with `ENOSPC`, changing nothing.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().capacity = bytes;
    }

    /// Bytes of all named files now (what counts against the capacity).
    pub fn used_bytes(&self) -> u64 {
        let s = self.state.lock();
        s.names
            .values()
            .filter_map(|i| s.inodes.get(i))
            .map(|i| i.current.len() as u64)
            .sum()
    }

    /// While on, writes and growing `set_len`s fail with `ENOSPC`.
    pub fn set_no_space(&self, on: bool) {
        self.state.lock().no_space = on;
    }

    /// While `Some(offset)`, writes that start below `offset` fail as with
    /// [`SimDisk::set_no_space`] (a segment's watermark slots, say, which lie below its
    /// records).
    pub fn set_no_space_below(&self, offset: Option<u64>) {
        self.state.lock().no_space_below = offset;
    }

    /// The next `sync_data` or `sync_dir` fails with `EIO`.
    pub fn fail_next_sync(&self) {
        self.state.lock().fail_next_sync = true;
    }

    /// Mutating operations performed so far.
    pub fn mutating_ops(&self) -> u64 {
        self.state.lock().mutating_ops
    }

    /// Paths of all files (current view), sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        self.state.lock().names.keys().cloned().collect()
    }

    /// Current content of a file.
    pub fn read(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.state.lock();
        let ino = s.names.get(path)?;
        s.inodes.get(ino).map(|i| i.current.clone())
    }

    /// Replaces a file's content durably, creating it if needed (for damaging files on purpose
    /// or leaving crash debris in tests).
    pub fn write_durable(&self, path: &Path, data: &[u8]) {
        let mut s = self.state.lock();
        let ino = match s.names.get(path) {
            Some(ino) => *ino,
            None => {
                s.next_inode += 1;
                let ino = s.next_inode;
                s.names.insert(path.to_path_buf(), ino);
                s.durable_names.insert(path.to_path_buf(), ino);
                ino
            }
        };
        let inode = s.inodes.entry(ino).or_default();
        inode.durable = data.to_vec();
        inode.current = data.to_vec();
        inode.unsynced.clear();
    }
}

impl Vfs for SimDisk {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        self.state.lock().alive()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.state.lock();
        s.alive()?;
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let mut s = self.state.lock();
        s.tick()?;
        s.next_inode += 1;
        let ino = s.next_inode;
        s.inodes.insert(ino, Inode::default());
        let op = DirOp::Create(path.to_path_buf(), ino);
        op.apply(&mut s.names);
        s.journal.push(op);
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let s = self.state.lock();
        s.alive()?;
        let ino = s.lookup(path)?;
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        s.lookup(from)?;
        let op = DirOp::Rename(from.to_path_buf(), to.to_path_buf());
        op.apply(&mut s.names);
        s.journal.push(op);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        s.lookup(path)?;
        let op = DirOp::Remove(path.to_path_buf());
        op.apply(&mut s.names);
        s.journal.push(op);
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        if std::mem::take(&mut s.fail_next_sync) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        s.durable_names = s.names.clone();
        s.journal.clear();
        Ok(())
    }
}

/// A file of the simulated disk (it follows its inode across renames).
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    ino: u64,
}

impl VfsFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        let mut s = self.disk.state.lock();
        s.alive()?;
        Ok(s.inode(self.ino)?.current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.disk.state.lock();
        s.tick()?;
        let no_space = s.no_space;
        s.check_capacity(self.ino, len)?;
        let inode = s.inode(self.ino)?;
        if no_space && len > inode.current.len() as u64 {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        let op = FileOp::SetLen(len);
        op.apply(&mut inode.current);
        inode.unsynced.push(op);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.disk.state.lock();
        s.alive()?;
        let inode = s.inode(self.ino)?;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| inode.current.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.disk.state.lock();
        s.tick()?;
        let no_space = s.no_space || s.no_space_below.is_some_and(|below| offset < below);
        s.check_capacity(self.ino, offset + buf.len() as u64)?;
        let inode = s.inode(self.ino)?;
        // A refused write lands half its bytes, unless it lies within one sector: a sector is
        // written whole or not at all (the assumption the watermark slots rely on).
        let one_sector = offset / 512 == (offset + buf.len().max(1) as u64 - 1) / 512;
        let data = match (no_space, one_sector) {
            (false, _) => buf,
            (true, false) => &buf[..buf.len() / 2],
            (true, true) => &[],
        };
        let op = FileOp::Write {
            offset,
            data: data.to_vec(),
        };
        op.apply(&mut inode.current);
        inode.unsynced.push(op);
        if no_space {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.disk.state.lock();
        s.tick()?;
        if std::mem::take(&mut s.fail_next_sync) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        let inode = s.inode(self.ino)?;
        inode.durable = inode.current.clone();
        inode.unsynced.clear();
        Ok(())
    }

    fn map(&self) -> io::Result<Option<Mmap>> {
        Ok(None)
    }
}
