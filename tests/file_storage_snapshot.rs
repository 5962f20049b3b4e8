//! FileStorage's streamed snapshots beyond the conformance suite: what is on disk while a
//! snapshot is received, a restart in the middle of a transfer, a full disk and a failed
//! fsync during one, and a snapshot bigger than any buffer read back in pieces.

use std::path::Path;

use raftkv::error::StorageError;
use raftkv::raft::SnapshotMeta;
use raftkv::storage::file::conformance::{entries, snapshot_bytes};
use raftkv::storage::file::inspect::inspect;
use raftkv::storage::file::sim::SimDisk;
use raftkv::storage::{FileStorage, FileStorageOptions, Storage};

fn opts() -> FileStorageOptions {
    FileStorageOptions {
        cluster_id: 7,
        node_id: 3,
        segment_size: 4096,
        cache_bytes: 0,
        ..Default::default()
    }
}

fn names(disk: &SimDisk) -> Vec<String> {
    disk.files()
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
        .collect()
}

#[test]
fn a_partial_snapshot_is_a_temp_file_until_installed() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 5, 1)).unwrap();
    let meta = SnapshotMeta { index: 3, term: 1 };
    s.write_snapshot_chunk(meta, 0, b"partial").unwrap();
    let files = names(&disk);
    assert!(files.contains(&"snap.tmp".to_owned()), "{files:?}");
    assert!(!files.iter().any(|n| n.ends_with(".snap")), "{files:?}");
    assert_eq!(s.persisted_size().snapshot_bytes, 0);
    s.install_snapshot(meta).unwrap();
    let files = names(&disk);
    assert!(!files.contains(&"snap.tmp".to_owned()), "{files:?}");
    assert!(
        files.contains(&"snap-00000000000000000003.snap".to_owned()),
        "{files:?}"
    );
    assert_eq!(s.persisted_size().snapshot_bytes, 64 + 7);
}

#[test]
fn a_restart_in_the_middle_of_a_transfer_discards_the_partial_snapshot() {
    let disk = SimDisk::new();
    let first = SnapshotMeta { index: 2, term: 1 };
    let data = snapshot_bytes(5000, 1);
    {
        let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
        s.append(&entries(1, 4, 1)).unwrap();
        s.save_snapshot(first, &data).unwrap();
        let meta = SnapshotMeta { index: 9, term: 2 };
        s.write_snapshot_chunk(meta, 0, &[1u8; 3000]).unwrap();
        s.sync().unwrap();
        s.write_snapshot_chunk(meta, 3000, &[2u8; 3000]).unwrap();
    }
    for seed in 0..8 {
        disk.crash(seed);
        let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
        let removed = &s.recovery_report().removed_files;
        assert!(
            removed.iter().all(|p| p == Path::new("/n/snap.tmp")),
            "seed {seed}: {removed:?}"
        );
        let state = s.initial_state().unwrap();
        assert_eq!(
            (state.snapshot, state.snapshot_size),
            (first, 5000),
            "seed {seed}"
        );
        assert_eq!(s.snapshot().unwrap(), Some((first, data.clone())));
        assert!(
            matches!(
                s.write_snapshot_chunk(SnapshotMeta { index: 9, term: 2 }, 6000, b"x"),
                Err(StorageError::Invalid(_))
            ),
            "seed {seed}: the transfer restarts at offset 0"
        );
        assert!(!names(&disk).contains(&"snap.tmp".to_owned()));
    }
}

#[test]
fn a_full_disk_during_a_transfer_is_retried_at_the_same_offset() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 5, 1)).unwrap();
    let meta = SnapshotMeta { index: 4, term: 1 };
    let data = snapshot_bytes(3000, 2);
    s.write_snapshot_chunk(meta, 0, &data[..1000]).unwrap();
    disk.set_no_space(true);
    assert!(matches!(
        s.write_snapshot_chunk(meta, 1000, &data[1000..]),
        Err(StorageError::NoSpace { .. })
    ));
    disk.set_no_space(false);
    assert!(matches!(
        s.write_snapshot_chunk(meta, 3000, b""),
        Err(StorageError::Invalid(_))
    ));
    s.write_snapshot_chunk(meta, 1000, &data[1000..2000])
        .unwrap();
    s.write_snapshot_chunk(meta, 2000, &data[2000..]).unwrap();
    s.install_snapshot(meta).unwrap();
    assert_eq!(s.snapshot().unwrap(), Some((meta, data.clone())));
    drop(s);
    disk.crash(4);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert_eq!(s.snapshot().unwrap(), Some((meta, data)));
    assert_eq!(s.initial_state().unwrap().first_index, 5);
}

#[test]
fn a_full_disk_during_install_abandons_the_snapshot_and_keeps_the_old_one() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 8, 1)).unwrap();
    let old = SnapshotMeta { index: 2, term: 1 };
    s.save_snapshot(old, b"two").unwrap();
    let meta = SnapshotMeta { index: 6, term: 1 };
    s.write_snapshot_chunk(meta, 0, b"six").unwrap();
    disk.set_no_space(true);
    assert!(matches!(
        s.install_snapshot(meta),
        Err(StorageError::NoSpace { .. })
    ));
    disk.set_no_space(false);
    assert!(
        matches!(s.install_snapshot(meta), Err(StorageError::Invalid(_))),
        "the abandoned snapshot must be sent again"
    );
    assert_eq!(s.snapshot().unwrap(), Some((old, b"two".to_vec())));
    assert!(!names(&disk).contains(&"snap.tmp".to_owned()));
    s.save_snapshot(meta, b"six").unwrap();
    assert_eq!(s.snapshot().unwrap(), Some((meta, b"six".to_vec())));
    assert_eq!((s.first_index(), s.last_index()), (7, 8));
}

#[test]
fn a_failed_fsync_while_installing_poisons_the_storage() {
    let disk = SimDisk::new();
    let mut s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    s.append(&entries(1, 8, 1)).unwrap();
    s.sync().unwrap();
    let meta = SnapshotMeta { index: 6, term: 1 };
    s.write_snapshot_chunk(meta, 0, b"six").unwrap();
    disk.fail_next_sync();
    assert!(matches!(
        s.install_snapshot(meta),
        Err(StorageError::Io { op: "fsync", .. })
    ));
    assert!(matches!(
        s.read_snapshot(0, 10),
        Err(StorageError::Poisoned)
    ));
    assert!(matches!(
        s.write_snapshot_chunk(meta, 0, b"six"),
        Err(StorageError::Poisoned)
    ));
    drop(s);
    disk.crash(9);
    let s = FileStorage::open_simulated(&disk, "/n", opts()).unwrap();
    assert_eq!(s.snapshot().unwrap(), None);
    assert_eq!((s.first_index(), s.last_index()), (1, 8));
}

#[test]
fn a_snapshot_of_many_mebibytes_streams_through_real_files() {
    let dir = tempfile::tempdir().unwrap();
    let meta = SnapshotMeta {
        index: 100,
        term: 3,
    };
    let chunk = snapshot_bytes(1 << 20, 7);
    let chunks = 24u64;
    let size = chunks * chunk.len() as u64;
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        for k in 0..chunks {
            s.write_snapshot_chunk(meta, k * chunk.len() as u64, &chunk)
                .unwrap();
        }
        s.install_snapshot(meta).unwrap();
    }
    let s = FileStorage::open(dir.path(), opts()).unwrap();
    let state = s.initial_state().unwrap();
    assert_eq!((state.snapshot, state.snapshot_size), (meta, size));
    assert_eq!((state.first_index, state.last_index), (101, 100));
    let mut offset = 0;
    while offset < size {
        let piece = s.read_snapshot(offset, 300_000).unwrap();
        assert!(!piece.is_empty() && piece.len() <= 300_000);
        let at = (offset % chunk.len() as u64) as usize;
        for (i, b) in piece.iter().enumerate() {
            let j = (at + i) % chunk.len();
            assert_eq!(*b, chunk[j], "byte {}", offset + i as u64);
        }
        offset += piece.len() as u64;
    }
    assert_eq!(offset, size);
    assert!(s.read_snapshot(size, 10).unwrap().is_empty());
}

#[test]
fn inspect_checksums_a_snapshot_larger_than_its_buffer_and_finds_damage() {
    let dir = tempfile::tempdir().unwrap();
    let meta = SnapshotMeta { index: 5, term: 2 };
    let data = snapshot_bytes(5 << 19, 3); // 2.5 MiB: three rounds of the 1 MiB buffer
    {
        let mut s = FileStorage::open(dir.path(), opts()).unwrap();
        s.append(&entries(1, 6, 2)).unwrap();
        for (k, piece) in data.chunks(1 << 20).enumerate() {
            s.write_snapshot_chunk(meta, (k << 20) as u64, piece)
                .unwrap();
        }
        s.install_snapshot(meta).unwrap();
    }
    let report = inspect(dir.path()).unwrap();
    assert_eq!(report.snapshots.len(), 1);
    assert_eq!(report.snapshots[0].meta, Some(meta));
    assert_eq!(report.snapshots[0].bytes, 64 + data.len() as u64);
    assert_eq!(report.snapshots[0].damage, None, "{report}");

    let path = report.snapshots[0].path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[64 + (2 << 20) + 5] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let damage = inspect(dir.path()).unwrap().snapshots[0].damage.clone();
    assert!(
        damage.as_deref().unwrap_or("").contains("checksum"),
        "{damage:?}"
    );
    bytes.push(0);
    std::fs::write(&path, &bytes).unwrap();
    let damage = inspect(dir.path()).unwrap().snapshots[0].damage.clone();
    assert!(
        damage.as_deref().unwrap_or("").contains("length"),
        "{damage:?}"
    );
}
