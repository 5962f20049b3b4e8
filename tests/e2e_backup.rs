//! Backup and restore with real processes (issue 11): a 3-node cluster of `examples/node.rs`
//! under write load; `examples/kv.rs backup FILE` takes a backup meanwhile; a fresh 3-node
//! cluster started with `node --restore FILE` holds every write acknowledged before the
//! backup was asked for, and takes new ones. A damaged backup file is refused at start-up.
//!
//! The test builds the example binaries itself and removes everything it starts.

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "../examples/common/processes.rs"]
mod processes;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use processes::ProcessCluster;
use raftkv::kv::{ClientOptions, KvClient};
use tokio::time::sleep;

fn client_options() -> ClientOptions {
    ClientOptions {
        deadline: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

fn nodes_arg(cluster: &ProcessCluster) -> String {
    use raftkv::kv::KvEndpoint;
    let endpoint = cluster.endpoint();
    endpoint
        .nodes()
        .into_iter()
        .map(|id| format!("{id}={}", endpoint.addr(id).unwrap()))
        .collect::<Vec<_>>()
        .join(",")
}

async fn scenario() {
    let binary = processes::build_node_for_tests(false).expect("building the examples");
    let kv = binary.with_file_name(format!("kv{}", std::env::consts::EXE_SUFFIX));

    let mut old = ProcessCluster::start(binary.clone(), 3).expect("starting the nodes");
    old.wait_for_leader(Duration::from_secs(30))
        .await
        .expect("first election");
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u32 {
        let (endpoint, acked, stop) = (old.endpoint(), acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut client = KvClient::connect(endpoint, client_options()).await.unwrap();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{i:05}");
                client
                    .put(
                        key.clone().into_bytes(),
                        format!("value of {key}").into_bytes(),
                    )
                    .await
                    .unwrap();
                acked.lock().insert(key);
                i += 1;
            }
        }));
    }
    while acknowledged.lock().len() < 300 {
        sleep(Duration::from_millis(20)).await;
    }

    // The backup, taken while the writers go on.
    let keep = tempfile::tempdir().unwrap(); // outlives the old cluster's directory
    let file = keep.path().join("cluster.backup");
    let before: BTreeSet<String> = acknowledged.lock().clone();
    let started = Instant::now();
    let mut backup_cmd = Command::new(&kv);
    backup_cmd
        .args(["--nodes", &nodes_arg(&old), "backup"])
        .arg(&file)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || backup_cmd.output())
        .await
        .unwrap()
        .expect("kv backup");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kv backup failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("verified"), "{said}");
    let took = started.elapsed();
    sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let after = acknowledged.lock().len();
    assert!(after > before.len(), "writes went on around the backup");
    let info = raftkv::storage::backup::verify(std::fs::File::open(&file).unwrap())
        .expect("the file verifies");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the backup is the whole state: owner only");
    }
    let backup = std::fs::read(&file).unwrap();
    drop(old);

    // A fresh cluster, every node restored from the file.
    let restore_arg = file.to_string_lossy().into_owned();
    let mut fresh =
        ProcessCluster::start_with_args(binary.clone(), 3, &["--restore", &restore_arg])
            .expect("starting the restored nodes");
    fresh
        .wait_for_leader(Duration::from_secs(30))
        .await
        .expect("an election in the restored cluster");
    for id in fresh.ids() {
        let log = fresh.log_tail(id, 2000);
        assert!(
            log.contains(&format!("at index {}", info.meta.index)),
            "{log}"
        );
    }
    let mut client = KvClient::connect(fresh.endpoint(), client_options())
        .await
        .expect("session");
    let mut missing = Vec::new();
    for key in &before {
        let want = format!("value of {key}").into_bytes();
        if client.get(key.clone().into_bytes()).await.expect("read") != Some(want) {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} writes acknowledged before the backup are missing after the restore: {:?}",
        missing.len(),
        before.len(),
        &missing[..missing.len().min(10)]
    );
    client.put("after", "restore").await.expect("a new write");
    assert_eq!(
        client.get("after").await.unwrap(),
        Some(b"restore".to_vec())
    );
    eprintln!(
        "e2e backup: {} writes acknowledged before, {} by the end; backup at index {} ({} \
         bytes) in {:.2} s; all {} read back from the restored cluster",
        before.len(),
        after,
        info.meta.index,
        backup.len(),
        took.as_secs_f64(),
        before.len()
    );
    drop(fresh);

    // A damaged backup is refused at start-up, naming the damage.
    let damaged = file.with_extension("damaged");
    let mut bytes = backup;
    let at = bytes.len() - 10;
    bytes[at] ^= 0x20;
    std::fs::write(&damaged, &bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addrs = processes::free_addrs(2).unwrap();
    let out = Command::new(&binary)
        .args(["--id", "1", "--peers"])
        .arg(format!("1={}", addrs[0]))
        .arg("--client")
        .arg(addrs[1].to_string())
        .arg("--data")
        .arg(dir.path().join("n1"))
        .arg("--restore")
        .arg(&damaged)
        .stdin(Stdio::null())
        .output()
        .expect("node with a damaged backup");
    assert!(
        !out.status.success(),
        "a damaged backup must not start a node"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backup damaged at offset"), "{err}");
}

#[test]
fn a_backup_under_load_restores_a_fresh_cluster_with_every_acknowledged_write() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(scenario());
}
