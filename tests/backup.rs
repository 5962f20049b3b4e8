//! Backup and restore (issue 11), in one process: `Node::backup` of a 3-node KV cluster on
//! file storage while clients keep writing, streamed to a buffer; `storage::backup::restore`
//! of that backup into three empty data directories; a fresh cluster started from them holds
//! every write acknowledged before the backup was asked for, and goes on taking writes.
//! Damaged backups are refused, leaving the storage empty.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use raftkv::kv::{ClientOptions, KvClient, KvResult, KvStateMachine};
use raftkv::storage::backup::{restore, verify, BackupError};
use raftkv::storage::{FileStorage, FileStorageOptions, Storage};
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig};

fn opts(cluster_id: u64, node_id: u64) -> FileStorageOptions {
    FileStorageOptions {
        cluster_id,
        node_id,
        segment_size: 1 << 20,
        ..Default::default()
    }
}

/// Three KV nodes on file storage in `dir/n1..n3` (which may hold restored state).
fn cluster(dir: &Path, cluster_id: u64) -> Vec<Node<KvResult>> {
    let net = LocalNetwork::new();
    (1..=3)
        .map(|id| {
            let mut c = NodeConfig::new(id, vec![1, 2, 3]);
            c.tick_interval = Duration::from_millis(10);
            let storage = FileStorage::open(dir.join(format!("n{id}")), opts(cluster_id, id))
                .expect("data directory");
            let (node, driver) = Node::start(c, storage, KvStateMachine::new(), net.transport(id))
                .expect("node starts");
            std::thread::spawn(move || futures::executor::block_on(driver));
            let inbox = node.clone();
            net.register(id, move |m| inbox.step(m));
            node
        })
        .collect()
}

fn client_options() -> ClientOptions {
    ClientOptions {
        deadline: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_restores_into_a_fresh_cluster_with_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(&dir.path().join("old"), 7);
    // Writers: each put acknowledged is recorded.
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let (nodes, acked, stop) = (nodes.clone(), acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut client = KvClient::connect(nodes, client_options()).await.unwrap();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{i:05}");
                client
                    .put(key.clone().into_bytes(), vec![b'x'; 200])
                    .await
                    .unwrap();
                acked.lock().insert(key);
                i += 1;
            }
        }));
    }
    while acknowledged.lock().len() < 400 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The backup, from a follower, while the writers go on.
    let leader = loop {
        if let Some(l) = nodes
            .iter()
            .find(|n| n.status().raft.leader == Some(n.id()))
        {
            break l.id();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let follower = nodes.iter().find(|n| n.id() != leader).unwrap();
    let before: BTreeSet<String> = acknowledged.lock().clone();
    let commit_before = nodes[(leader - 1) as usize].status().raft.commit_index;
    let backup = follower.backup().await.expect("backup");
    let info = backup.info();
    assert!(
        info.meta.index >= commit_before,
        "the backup covers what was committed before it was asked for ({} < {commit_before})",
        info.meta.index
    );
    let mut bytes = Vec::new();
    let written = backup.write_to(&mut bytes).await.expect("streamed");
    assert_eq!(written, info);
    let during = acknowledged.lock().len() - before.len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        during > 0 || acknowledged.lock().len() > before.len(),
        "writes went on during the backup"
    );
    assert_eq!(verify(bytes.as_slice()).expect("verifies"), info);
    assert_eq!(bytes.len() as u64, 64 + info.size);
    for n in &nodes {
        n.shutdown().await;
    }

    // A fresh cluster (another cluster id) from the backup.
    let fresh = dir.path().join("new");
    for id in 1..=3 {
        let mut s = FileStorage::open(fresh.join(format!("n{id}")), opts(8, id)).unwrap();
        let restored = restore(bytes.as_slice(), &mut s).expect("restore");
        assert_eq!(restored, info);
        assert_eq!(s.initial_state().unwrap().snapshot, info.meta);
    }
    let nodes = cluster(&fresh, 8);
    let mut client = KvClient::connect(nodes.clone(), client_options())
        .await
        .unwrap();
    let mut missing = Vec::new();
    for key in &before {
        if client.get(key.clone().into_bytes()).await.unwrap() != Some(vec![b'x'; 200]) {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} writes acknowledged before the backup are missing: {:?}",
        missing.len(),
        before.len(),
        &missing[..missing.len().min(10)]
    );
    client.put("after-restore", "yes").await.unwrap();
    assert_eq!(
        client.get("after-restore").await.unwrap(),
        Some(b"yes".to_vec())
    );
    for n in &nodes {
        assert!(n.status().raft.applied_index > info.meta.index);
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_backup_is_refused_and_restores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(&dir.path().join("old"), 7);
    let mut client = KvClient::connect(nodes.clone(), client_options())
        .await
        .unwrap();
    for i in 0..50 {
        client.put(format!("k{i}"), "v").await.unwrap();
    }
    let mut bytes = Vec::new();
    nodes[0]
        .backup()
        .await
        .unwrap()
        .write_to(&mut bytes)
        .await
        .unwrap();
    for n in &nodes {
        n.shutdown().await;
    }
    for (at, what) in [(3, "magic"), (9, "version"), (40, "term"), (70, "content")] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        let target = dir.path().join(format!("bad-{at}"));
        let mut s = FileStorage::open(&target, opts(8, 1)).unwrap();
        match restore(bad.as_slice(), &mut s) {
            Err(BackupError::Corrupt { offset, .. }) => {
                // Header damage is reported in the header, content damage at the content.
                let expect = if at < 64 { 0..64 } else { 64..65 };
                assert!(expect.contains(&offset), "{what}: offset {offset}")
            }
            other => panic!("{what}: {other:?}"),
        }
        drop(s);
        let s = FileStorage::open(&target, opts(8, 1)).unwrap();
        assert_eq!(s.snapshot().unwrap(), None, "{what}: nothing restored");
        assert_eq!(s.last_index(), 0);
    }
    let truncated = &bytes[..bytes.len() - 1];
    let mut s = FileStorage::open(dir.path().join("short"), opts(8, 1)).unwrap();
    assert!(matches!(
        restore(truncated, &mut s),
        Err(BackupError::Corrupt { .. })
    ));
    // A storage that already holds state is not overwritten.
    let mut used = FileStorage::open(dir.path().join("old/n1"), opts(7, 1)).unwrap();
    assert!(matches!(
        restore(bytes.as_slice(), &mut used),
        Err(BackupError::NotEmpty(_))
    ));
}
