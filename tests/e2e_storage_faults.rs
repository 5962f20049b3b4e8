//! Storage faults on real `examples/node.rs` processes (issue 11):
//!
//! - **The tail-damage attack.** Three nodes; node 3 down; 200 puts acknowledged (by the
//!   leader and the one follower); nodes 1 and 2 SIGKILLed; the last ~9 KB of the used region
//!   of node 1's newest segment zeroed (a disk fault on fsynced, acknowledged records).
//!   Without `--recover`, node 1 refuses to start with an error naming the segment and the
//!   offset. With `--recover` it starts (cutting its log, recording the loss), is left alone
//!   with the stale node 3 for a while — the two of them must not elect a leader that lacks the
//!   acknowledged writes — then node 2 comes back, and every acknowledged write must be there
//!   (the core side of protocol-aware recovery: a node with a tail loss neither votes nor
//!   campaigns until a leader has brought it back).
//! - **Two processes on one data directory.** A second `node` on a directory in use exits at
//!   once, saying so and naming the process that holds it.
//!
//! The tests build the example binaries themselves and remove everything they start.

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "../examples/common/processes.rs"]
mod processes;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use processes::ProcessCluster;
use raftkv::kv::{ClientOptions, KvClient};
use raftkv::storage::file::inspect::inspect;
use tokio::time::sleep;

/// Offset of a segment's first record (format version 2).
const RECORDS_START: u64 = 1536;

fn build() -> PathBuf {
    processes::build_node_for_tests(true).expect("building the node example")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:03}").into_bytes()
}

/// About 100 bytes, so that 200 puts make a log of which the last 9 KB are about half.
fn value(i: u32) -> Vec<u8> {
    format!("value-{i:03}-{}", "v".repeat(90)).into_bytes()
}

fn client_options() -> ClientOptions {
    ClientOptions {
        deadline: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

/// Waits until node `id` has exited by itself; returns its log.
async fn wait_exit(cluster: &mut ProcessCluster, id: u64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        match cluster.check_alive(id) {
            Err(why) => return why,
            Ok(false) => return cluster.log_tail(id, 4000),
            Ok(true) if Instant::now() >= deadline => {
                panic!("node {id} is still running after {within:?}")
            }
            Ok(true) => sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Steps 1 and 2 of the attack: 200 acknowledged puts with node 3 down, then nodes 1 and 2
/// SIGKILLed and the last ~9 KB of node 1's newest segment's used region zeroed. Returns the
/// cluster (all nodes down) and the damaged segment.
async fn acknowledged_writes_then_tail_damage() -> (ProcessCluster, PathBuf) {
    let mut cluster = ProcessCluster::start(build(), 3).expect("starting the nodes");
    cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .expect("first election");
    cluster.kill(3);
    let mut client = KvClient::connect(cluster.endpoint(), client_options())
        .await
        .expect("session");
    for i in 0..200 {
        client
            .put(key(i), value(i))
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
    }
    drop(client);
    cluster.kill_all();
    let data = cluster.data_dir(1).expect("node 1");
    let report = inspect(&data).expect("inspect node 1");
    let newest = report.segments.last().expect("a segment");
    let used = newest.used_bytes;
    assert_eq!(newest.synced_through, Some(used), "{report}");
    let from = used.saturating_sub(9 << 10);
    assert!(
        from > RECORDS_START + (4 << 10),
        "an intact prefix stays: {report}"
    );
    let mut bytes = std::fs::read(&newest.path).unwrap();
    bytes[from as usize..used as usize].fill(0);
    std::fs::write(&newest.path, &bytes).unwrap();
    let report = inspect(&data).unwrap();
    assert!(
        report.segments.last().unwrap().damage.is_some(),
        "inspect calls it damage: {report}"
    );
    (cluster, newest.path.clone())
}

#[test]
fn a_damaged_synced_tail_stops_the_node_naming_file_and_offset() {
    runtime().block_on(async {
        let (mut cluster, segment) = acknowledged_writes_then_tail_damage().await;
        cluster.restart(1).expect("restart node 1");
        let log = wait_exit(&mut cluster, 1, Duration::from_secs(30)).await;
        assert!(log.contains("corrupt"), "{log}");
        assert!(
            log.contains(&segment.display().to_string()),
            "names the file: {log}"
        );
        assert!(log.contains("at offset"), "names the offset: {log}");
        assert!(
            log.contains("--recover"),
            "says recovery mode exists: {log}"
        );
    });
}

#[test]
fn recovery_mode_brings_a_damaged_node_back_with_every_acknowledged_write() {
    runtime().block_on(async {
        let (mut cluster, _) = acknowledged_writes_then_tail_damage().await;
        // Node 1 in recovery mode and the stale node 3, alone: whatever they do, they must not
        // commit anything that overwrites the acknowledged writes.
        cluster.set_extra_args(1, ["--recover"]);
        cluster.restart(1).expect("restart node 1");
        cluster.restart(3).expect("restart node 3");
        sleep(Duration::from_secs(6)).await;
        assert_eq!(
            cluster.check_alive(1),
            Ok(true),
            "node 1 runs in recovery mode"
        );
        let log = cluster.log_tail(1, 4000);
        assert!(log.contains("recovery mode cut the log"), "{log}");
        assert!(log.contains("were lost to damage"), "{log}");
        // Node 2, which holds every acknowledged write, comes back.
        cluster.restart(2).expect("restart node 2");
        cluster
            .wait_for_leader(Duration::from_secs(30))
            .await
            .expect("a leader");
        let mut client = KvClient::connect(cluster.endpoint(), client_options())
            .await
            .expect("session");
        let mut missing = Vec::new();
        for i in 0..200 {
            let got = client.get(key(i)).await.expect("read");
            if got.as_deref() != Some(value(i).as_slice()) {
                missing.push(i);
            }
        }
        if !missing.is_empty() {
            for id in cluster.ids() {
                eprintln!("--- node {id} log:\n{}", cluster.log_tail(id, 3000));
                if let Some(d) = cluster.data_dir(id) {
                    eprintln!(
                        "--- node {id} inspect:\n{}",
                        inspect(&d).map(|r| r.to_string()).unwrap_or_default()
                    );
                }
            }
            eprintln!("statuses: {:?}", cluster.statuses().await);
            eprintln!("first get: {:?}", client.get(key(0)).await);
        }
        assert!(
            missing.is_empty(),
            "{} of 200 acknowledged keys lost: {missing:?}",
            missing.len()
        );
        // And node 1 was repaired: it applied everything.
        let leader_status = cluster.statuses().await;
        let commit = leader_status
            .iter()
            .filter_map(|(_, s)| s.as_ref().map(|s| s.commit))
            .max()
            .unwrap_or(0);
        cluster
            .wait_applied(1, commit, Duration::from_secs(30))
            .await
            .expect("node 1 caught up");
    });
}

#[test]
fn a_second_node_process_on_a_data_directory_in_use_exits_at_once() {
    runtime().block_on(async {
        let binary = build();
        let mut cluster = ProcessCluster::start(binary.clone(), 1).expect("one node");
        cluster
            .wait_for_leader(Duration::from_secs(30))
            .await
            .expect("a single-node leader");
        let data = cluster.data_dir(1).unwrap();
        let addrs = processes::free_addrs(2).unwrap();
        let started = Instant::now();
        let out = Command::new(&binary)
            .args(["--id", "1", "--peers"])
            .arg(format!("1={}", addrs[0]))
            .arg("--client")
            .arg(addrs[1].to_string())
            .arg("--data")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .expect("second node");
        assert!(!out.status.success(), "the second node must not run");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "it exits at once"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use by process"), "{err}");
        assert_eq!(
            cluster.check_alive(1),
            Ok(true),
            "the first node keeps running"
        );
    });
}
