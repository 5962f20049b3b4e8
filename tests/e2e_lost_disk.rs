//! A lost disk, with real processes: three `examples/node.rs` processes on loopback serve a
//! writing client; one follower is SIGKILLed, its data directory deleted, and it is started
//! again with the same command while the writes go on. It must come back as a lost disk
//! (recovering, neither voting nor acknowledging) until the leader has caught it up; then the
//! old leader is SIGKILLed, so that the wiped node and the other follower must elect a leader
//! and serve between them. Every write acknowledged at any point must be readable at the end.
//!
//! The test builds the example binaries itself; everything it starts is killed and its
//! directory removed when it ends (`ProcessCluster`'s drop).

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "../examples/common/processes.rs"]
mod processes;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::TcpKvEndpoint;
use processes::ProcessCluster;
use raftkv::kv::KvClient;
use raftkv::NodeId;
use tokio::time::sleep;

fn binary() -> PathBuf {
    processes::build_node_for_tests(true).expect("building the node example")
}

/// Writes `w<i>` = `v<i>` one after another until `stop`; returns the acknowledged `i`s.
async fn writer(endpoint: TcpKvEndpoint, stop: Arc<AtomicBool>) -> Result<Vec<u64>, String> {
    let mut client = KvClient::connect(endpoint, processes::client_options())
        .await
        .map_err(|e| e.to_string())?;
    let mut acknowledged = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match client.put(format!("w{i}"), format!("v{i}")).await {
            Ok(_) => acknowledged.push(i),
            // A timeout's outcome is unknown: not counted as acknowledged, and the next write
            // uses a new key.
            Err(e) if e.may_be_applied() => {}
            Err(e) => return Err(format!("write {i}: {e}")),
        }
        i += 1;
        sleep(Duration::from_millis(2)).await;
    }
    Ok(acknowledged)
}

async fn leader(cluster: &mut ProcessCluster) -> NodeId {
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("a leader")
}

#[test]
fn a_node_whose_disk_was_wiped_comes_back_and_nothing_acknowledged_is_lost() {
    processes::run_bounded(Duration::from_secs(120), scenario());
}

async fn scenario() {
    let mut cluster = ProcessCluster::start(binary(), 3).expect("cluster");
    let first = leader(&mut cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = tokio::spawn(writer(cluster.endpoint(), stop.clone()));
    sleep(Duration::from_millis(1500)).await;

    // Wipe a follower's disk while the cluster serves; start it with the same command.
    let victim = cluster
        .ids()
        .into_iter()
        .find(|&id| id != first)
        .expect("a follower");
    cluster.kill(victim);
    let data = cluster.data_dir(victim).expect("data dir");
    std::fs::remove_dir_all(&data).expect("wiping the data directory");
    sleep(Duration::from_millis(500)).await;
    let before = cluster.log(victim).len();
    cluster
        .restart(victim)
        .expect("restart on an empty directory");

    // It recovers as a lost disk and is caught up while the writes go on.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lead = cluster.status(first).await.expect("leader status");
        if let Some(s) = cluster.status(victim).await {
            if s.recovering_after.is_none() && s.applied >= lead.commit && s.applied > 0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} was not brought back: {:?}",
            cluster.statuses().await
        );
        sleep(Duration::from_millis(50)).await;
    }
    // Its log says it started as a lost disk and when it was brought back.
    let log = cluster.log(victim)[before..].to_string();
    let lost = log.find("recovering from a lost log tail");
    let back = log.find("recovered from the lost log tail");
    assert!(
        matches!((lost, back), (Some(l), Some(b)) if l < b),
        "node {victim} did not start as a lost disk and come back:\n{log}"
    );
    sleep(Duration::from_millis(1000)).await;

    // Now the old leader dies: the wiped node and the other follower must elect between them
    // (so the wiped node votes and counts again), and keep every acknowledged write.
    cluster.kill(first);
    let second = leader(&mut cluster).await;
    assert_ne!(second, first);
    sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writes.await.expect("writer task").expect("writer");
    assert!(
        acknowledged.len() > 50,
        "only {} writes went through",
        acknowledged.len()
    );

    let mut reader = KvClient::connect(cluster.endpoint(), processes::client_options())
        .await
        .expect("reader");
    for i in &acknowledged {
        let got = reader.get(format!("w{i}")).await.expect("read");
        assert_eq!(
            got.as_deref(),
            Some(format!("v{i}").as_bytes()),
            "acknowledged write w{i} is gone"
        );
    }
}
