//! Identity with real processes: three `examples/node.rs` processes on loopback.
//!
//! - A new cluster's id is random: the lowest id mints it, the others learn it, all store
//!   it. A cluster re-created with the same `--peers` gets another id, and a node whose
//!   directory survived from the first one is refused by the second.
//! - A member whose disk was lost cannot be started with `--new-cluster` (a peer knows its
//!   id under another incarnation); started without, it recovers and serves. Its old
//!   directory, brought back as a second process under the same id (a zombie), is refused
//!   by the members in both directions, and the cluster serves through it all, losing no
//!   acknowledged write.
//!
//! The test builds the example binaries itself; everything it starts is killed and its
//! directory removed when it ends (`ProcessCluster`'s drop).

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "../examples/common/processes.rs"]
mod processes;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client_proto::TcpKvEndpoint;
use processes::ProcessCluster;
use raftkv::kv::KvClient;
use raftkv::NodeId;
use tokio::time::sleep;

fn binary() -> PathBuf {
    processes::build_node_for_tests(true).expect("building the node example")
}

fn cluster_id_of(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("cluster-id")).expect("a stored cluster id");
    text.trim().parse().expect("a number")
}

/// An endpoint on the client ports of `ids` only.
fn endpoint_of(cluster: &ProcessCluster, ids: &[NodeId]) -> TcpKvEndpoint {
    TcpKvEndpoint::new(
        ids.iter()
            .map(|id| (*id, cluster.client_addr(*id).expect("a node"))),
    )
}

/// Copies directory `from` to `to` (files and subdirectories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Waits until node `id` exits by itself; returns its log.
async fn wait_exit(cluster: &mut ProcessCluster, id: NodeId, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if cluster.check_alive(id).is_err() {
            return cluster.log(id);
        }
        assert!(Instant::now() < deadline, "node {id} did not exit");
        sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `pattern` appears in node `id`'s log after byte `from`.
async fn wait_log(cluster: &ProcessCluster, id: NodeId, from: usize, pattern: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = cluster.log(id);
        if log.get(from..).is_some_and(|l| l.contains(pattern)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never logged `{pattern}`:\n{}",
            &log[from.min(log.len())..]
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `k<i>` = `v<i>` for each `i` of `range`, each acknowledged (recorded in `acked`).
async fn put_range(
    client: &mut KvClient<TcpKvEndpoint>,
    range: std::ops::Range<u64>,
    acked: &mut Vec<u64>,
) {
    for i in range {
        client
            .put(format!("k{i}"), format!("v{i}"))
            .await
            .expect("put");
        acked.push(i);
    }
}

async fn leader(cluster: &mut ProcessCluster) -> NodeId {
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("a leader")
}

#[test]
fn a_new_cluster_mints_a_random_id_and_a_recreated_one_refuses_the_old_nodes() {
    processes::run_bounded(Duration::from_secs(120), recreated());
}

async fn recreated() {
    let mut cluster = ProcessCluster::start(binary(), 3).expect("cluster");
    leader(&mut cluster).await;
    let mut client = KvClient::connect(cluster.endpoint(), processes::client_options())
        .await
        .expect("client");
    client.put("first", "cluster").await.expect("put");
    drop(client);
    let dirs: Vec<PathBuf> = cluster
        .ids()
        .iter()
        .map(|id| cluster.data_dir(*id).expect("dir"))
        .collect();
    let first = cluster_id_of(&dirs[0]);
    for d in &dirs {
        assert_eq!(cluster_id_of(d), first, "every node stores the same id");
    }
    assert!(cluster.log(1).contains("minted for a new cluster"));
    assert!(cluster.log(2).contains("learned from node(s)"));

    // The same --peers, new directories: a new cluster with a new id. Node 1's old directory
    // is kept aside.
    cluster.kill_all();
    let old1 = cluster.dir().join("n1-first");
    std::fs::rename(&dirs[0], &old1).expect("keep node 1's directory");
    for d in &dirs[1..] {
        std::fs::remove_dir_all(d).expect("wipe");
    }
    for id in cluster.ids() {
        cluster.restart(id).expect("start");
    }
    leader(&mut cluster).await;
    let second = cluster_id_of(&dirs[0]);
    assert_ne!(second, first, "a re-created cluster has a new id");
    for d in &dirs {
        assert_eq!(cluster_id_of(d), second);
    }

    // Node 1 comes back on its directory of the first cluster: refused by the second.
    cluster.kill(1);
    std::fs::rename(&dirs[0], cluster.dir().join("n1-second")).expect("move");
    std::fs::rename(&old1, &dirs[0]).expect("bring the old directory back");
    let (from2, from3) = (cluster.log(2).len(), cluster.log(3).len());
    cluster.restart(1).expect("start the old node 1");
    wait_log(&cluster, 2, from2, "the dialer belongs to another cluster").await;
    wait_log(&cluster, 3, from3, "the dialer belongs to another cluster").await;

    // Nodes 2 and 3 serve the second cluster meanwhile; it never held the first's key.
    let mut client = KvClient::connect(endpoint_of(&cluster, &[2, 3]), processes::client_options())
        .await
        .expect("client of the second cluster");
    client.put("second", "cluster").await.expect("put");
    assert_eq!(client.get("first").await.expect("get"), None);
    assert_eq!(
        client.get("second").await.expect("get").as_deref(),
        Some(&b"cluster"[..])
    );
    let old = cluster.status(1).await.expect("node 1 answers");
    assert_ne!(old.role, "Leader", "the old node is alone: {old:?}");
}

#[test]
fn a_lost_member_is_refused_new_cluster_and_its_old_directory_is_refused_as_a_zombie() {
    processes::run_bounded(Duration::from_secs(150), zombie());
}

async fn zombie() {
    let mut cluster = ProcessCluster::start(binary(), 3).expect("cluster");
    let lead = leader(&mut cluster).await;
    let mut client = KvClient::connect(cluster.endpoint(), processes::client_options())
        .await
        .expect("client");
    let mut acknowledged = Vec::new();
    put_range(&mut client, 0..50, &mut acknowledged).await;
    let victim = cluster
        .ids()
        .into_iter()
        .find(|&id| id != lead)
        .expect("a follower");
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|&i| i != victim).collect();
    let data = cluster.data_dir(victim).expect("dir");
    let kept = cluster.dir().join("zombie");

    // The disk is lost (a copy of it is kept, to come back as a zombie later).
    cluster.kill(victim);
    copy_dir(&data, &kept);
    std::fs::remove_dir_all(&data).expect("wipe");

    // --new-cluster would let it vote at once: refused, because a peer knows its id.
    cluster.set_extra_args(victim, ["--new-cluster"]);
    let before = cluster.log(victim).len();
    cluster.restart(victim).expect("start with --new-cluster");
    let log = wait_exit(&mut cluster, victim, Duration::from_secs(30)).await;
    assert!(
        log[before..].contains("--new-cluster refused"),
        "node {victim} started with --new-cluster:\n{}",
        &log[before..]
    );

    // Without it, it recovers as a lost disk and is caught up; the members saw a new
    // incarnation.
    cluster.set_extra_args(victim, Vec::<String>::new());
    cluster.restart(victim).expect("start");
    put_range(&mut client, 50..100, &mut acknowledged).await;
    let commit = cluster.status(lead).await.expect("leader").commit;
    cluster
        .wait_applied(victim, commit, Duration::from_secs(30))
        .await
        .expect("the wiped node catches up");
    assert!(cluster
        .log(lead)
        .contains(&format!("node {victim} is a new incarnation")));

    // Its old directory comes back as a second process under the same id: refused both
    // ways, while the cluster goes on.
    cluster.kill(victim);
    std::fs::rename(&data, cluster.dir().join("replacement")).expect("move");
    std::fs::rename(&kept, &data).expect("the old disk is back");
    let from: Vec<usize> = others.iter().map(|id| cluster.log(*id).len()).collect();
    let zombie_from = cluster.log(victim).len();
    cluster.restart(victim).expect("start the zombie");
    for (id, from) in others.iter().zip(&from) {
        // As listeners (the zombie's hello) and as dialers (its challenge).
        wait_log(
            &cluster,
            *id,
            *from,
            "a newer incarnation of its node id replaced",
        )
        .await;
        wait_log(&cluster, *id, *from, "its incarnation is older than").await;
    }
    wait_log(
        &cluster,
        victim,
        zombie_from,
        "a newer incarnation of its node id replaced",
    )
    .await;
    put_range(&mut client, 100..150, &mut acknowledged).await;
    let commit = cluster.status(lead).await.expect("leader").commit;
    let z = cluster.status(victim).await.expect("the zombie answers");
    assert!(
        z.applied < commit && z.role != "Leader",
        "the zombie took part: {z:?} (leader's commit {commit})"
    );

    // The replacement comes back; every acknowledged write is there.
    cluster.kill(victim);
    std::fs::remove_dir_all(&data).expect("drop the zombie's directory");
    std::fs::rename(cluster.dir().join("replacement"), &data).expect("restore");
    cluster.restart(victim).expect("start the replacement");
    cluster
        .wait_applied(victim, commit, Duration::from_secs(30))
        .await
        .expect("the replacement catches up");
    let mut reader = KvClient::connect(cluster.endpoint(), processes::client_options())
        .await
        .expect("reader");
    for i in &acknowledged {
        let got = reader.get(format!("k{i}")).await.expect("read");
        assert_eq!(
            got.as_deref(),
            Some(format!("v{i}").as_bytes()),
            "acknowledged write k{i} is gone"
        );
    }
}
