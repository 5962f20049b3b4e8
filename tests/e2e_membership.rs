//! Membership of the demo cluster, with real `examples/node.rs` processes and the
//! `examples/kv.rs` CLI on 127.0.0.1: three nodes take writes from a client that knows only
//! them; a fourth node starts with `node --join`, told of one follower only (not the leader),
//! and is added with `kv add-learner` and `kv promote`; leadership moves to it
//! (`kv transfer`) and the old leader is removed (`kv remove`) and stopped; the writes go on
//! throughout. At the end every acknowledged
//! write is readable, `kv members` (given only the original nodes) shows the new
//! configuration, and the client followed it (it learned node 4, dropped the removed one).
//! Then an original node restarts with its original `--peers` (which never named node 4)
//! and, with the third voter down, commits writes with node 4: its address book came back
//! from its stored state. Last, node 4 restarts (still with `--join` on its command line) and
//! commits with it again.
//!
//! Every process is killed when the test ends (the cluster's drop), pass or fail.

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
use raftkv::kv::{ClientError, ClientOptions, KvClient, KvError, Txn, TxnOp};
use raftkv::NodeId;
use tokio::time::sleep;

/// The whole test, building the examples included, finishes within this or fails.
const BUDGET: Duration = Duration::from_secs(120);

fn binaries() -> (PathBuf, PathBuf) {
    let node = processes::build_node_for_tests(false).expect("building the examples");
    let kv = processes::kv_binary_beside(&node);
    (node, kv)
}

/// Runs `kv --nodes NODES ARGS...`: (exit success, stdout, stderr).
fn kv(kv: &std::path::Path, nodes: &str, args: &[&str]) -> (bool, String, String) {
    let all: Vec<&str> = ["--nodes", nodes, "--timeout", "20"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let (ok, out, err, _) = processes::run_cli(kv, &all);
    (ok, out, err)
}

/// The `NAME: a b c` line of `kv members` output, as ids.
fn ids_of(members: &str, name: &str) -> Vec<NodeId> {
    members
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `key-N = N` for N = 0, 1, ... until `stop`; returns the acknowledged N and how
/// many writes failed (their outcome is unknown, so they are not checked).
async fn writer(endpoint: TcpKvEndpoint, stop: Arc<AtomicBool>) -> (Vec<u64>, u64) {
    let options = ClientOptions {
        deadline: Duration::from_secs(15),
        ..ClientOptions::default()
    };
    let mut client = KvClient::connect(endpoint, options)
        .await
        .expect("a session");
    let (mut acked, mut failed) = (Vec::new(), 0);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let put = client.put(format!("key-{n}").into_bytes(), n.to_string().into_bytes());
        match put.await {
            Ok(_) => acked.push(n),
            Err(e) => {
                eprintln!("write {n} failed: {e}");
                failed += 1;
            }
        }
        n += 1;
        sleep(Duration::from_millis(5)).await;
    }
    (acked, failed)
}

async fn scenario() {
    let (node_binary, kv_binary) = binaries();
    let mut cluster = ProcessCluster::start(node_binary, 3).expect("starting 3 nodes");
    let first_leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("a first leader");
    // Everything the client and the CLI are told: the original three nodes.
    let original = cluster.endpoint();
    let original_peers = cluster.peers_arg();
    let nodes_arg = original
        .addrs()
        .iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",");

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(writer(original.clone(), stop.clone()));
    sleep(Duration::from_millis(500)).await;

    // Node 4 joins, told of one follower only (not the leader that adds it, which it learns
    // from its handshake): it must not form a cluster of its own.
    let told = if first_leader == 1 { 2 } else { 1 };
    cluster
        .join_naming(4, Some(&[told]))
        .expect("starting node 4 with --join");
    sleep(Duration::from_millis(1500)).await;
    let alone = cluster.status(4).await.expect("node 4 answers");
    assert_ne!(alone.role, "Leader", "a joining node elected itself");
    assert_eq!(alone.commit, 0, "a joining node committed on its own");

    let raft4 = cluster.raft_addr(4).unwrap().to_string();
    let client4 = cluster.client_addr(4).unwrap().to_string();
    let (ok, out, err) = kv(
        &kv_binary,
        &nodes_arg,
        &["add-learner", "4", &raft4, &client4],
    );
    assert!(ok, "add-learner failed: {out}{err}");
    assert_eq!(ids_of(&out, "learners"), vec![4], "{out}");

    // Adding it twice is refused with the library's error text.
    let (ok, _, err) = kv(
        &kv_binary,
        &nodes_arg,
        &["add-learner", "4", &raft4, &client4],
    );
    assert!(!ok && err.contains("already a member"), "{err}");

    // Promoting or removing a node that is no member is refused, saying so.
    let (ok, _, err) = kv(&kv_binary, &nodes_arg, &["promote", "9"]);
    assert!(!ok && err.contains("node 9 is not a learner"), "{err}");
    let (ok, _, err) = kv(&kv_binary, &nodes_arg, &["remove", "9"]);
    assert!(!ok && err.contains("node 9 is not a member"), "{err}");

    // The address book is written by member requests only: a client's write to its keys,
    // alone or inside a transaction, is refused for good, and the book is unchanged.
    let (ok, _, err) = kv(
        &kv_binary,
        &nodes_arg,
        &["put", "__raftkv/members/9", "raft=127.0.0.1:1 client=-"],
    );
    assert!(!ok && err.contains("is reserved for the host"), "{err}");
    let mut forger = KvClient::connect(original.clone(), ClientOptions::default())
        .await
        .expect("a client");
    let book_write =
        Txn::default().then([TxnOp::put("x", "1"), TxnOp::delete("__raftkv/members/1")]);
    let refused = forger.txn(book_write).await;
    assert!(
        matches!(refused, Err(ClientError::Refused(KvError::Reserved { .. }))),
        "{refused:?}"
    );
    assert_eq!(
        forger.get("x").await.expect("get"),
        None,
        "the transaction ran"
    );
    assert_eq!(forger.get("__raftkv/members/9").await.expect("get"), None);
    assert!(
        forger
            .get("__raftkv/members/1")
            .await
            .expect("get")
            .is_some(),
        "node 1's record was deleted"
    );

    let (ok, out, err) = kv(&kv_binary, &nodes_arg, &["promote", "4"]);
    assert!(ok, "promote failed: {out}{err}");
    assert_eq!(ids_of(&out, "voters"), vec![1, 2, 3, 4], "{out}");

    // The leader cannot remove itself: hand leadership to node 4, then remove the old one.
    let old_leader = ids_of(&out, "leader")[0];
    let (ok, _, err) = kv(&kv_binary, &nodes_arg, &["remove", &old_leader.to_string()]);
    assert!(!ok && err.contains("transfer leadership first"), "{err}");
    let (ok, out, err) = kv(&kv_binary, &nodes_arg, &["transfer", "4"]);
    assert!(ok, "transfer failed: {out}{err}");
    assert_eq!(ids_of(&out, "leader"), vec![4], "{out}");
    let (ok, out, err) = kv(&kv_binary, &nodes_arg, &["remove", &old_leader.to_string()]);
    assert!(ok, "remove failed: {out}{err}");
    let mut expected: Vec<NodeId> = [1, 2, 3, 4]
        .into_iter()
        .filter(|&id| id != old_leader)
        .collect();
    expected.sort_unstable();
    assert_eq!(ids_of(&out, "voters"), expected, "{out}");
    cluster.kill(old_leader);

    // Writes go on with the new configuration (the client never heard of node 4 from us),
    // until the client has followed it: it knows node 4 and dropped the removed node (it
    // asks for the members at least every MEMBERS_REFRESH).
    let removed_at = Instant::now();
    let follow_within = client_proto::MEMBERS_REFRESH + Duration::from_secs(5);
    loop {
        let learned = original.addrs();
        if learned.get(&4) == cluster.client_addr(4).as_ref() && !learned.contains_key(&old_leader)
        {
            break;
        }
        assert!(
            removed_at.elapsed() < follow_within,
            "the client did not follow the membership change within {follow_within:?}: \
             {learned:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let followed = removed_at.elapsed();
    sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = load.await.expect("the writer");
    eprintln!(
        "{} writes acknowledged, {failed} failed; the client followed the removal within \
         {followed:?}",
        acked.len(),
    );
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    assert_eq!(failed, 0, "writes failed during the membership changes");

    // Every acknowledged write is readable, through the original --nodes.
    let mut reader = KvClient::connect(original.clone(), ClientOptions::default())
        .await
        .expect("a reader");
    for n in &acked {
        let value = reader.get(format!("key-{n}").into_bytes()).await;
        assert_eq!(
            value.expect("a read"),
            Some(n.to_string().into_bytes()),
            "key-{n}"
        );
    }

    // `kv members`, told only the original nodes, shows the new configuration and node 4's
    // addresses.
    let (ok, out, err) = kv(&kv_binary, &nodes_arg, &["members"]);
    assert!(ok, "members failed: {out}{err}");
    assert_eq!(ids_of(&out, "voters"), expected, "{out}");
    assert_eq!(ids_of(&out, "learners"), Vec::<NodeId>::new(), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(&raft4) && l.contains(&client4) && l.contains("voter")),
        "{out}"
    );

    // A restarted original node, whose --peers never named node 4, rebuilds its book from
    // what it stored: with the other original voter down, writes need it and node 4 (the
    // leader) to reach each other.
    let (restarted, other) = match expected.as_slice() {
        [a, b, 4] => (*a, *b),
        other => panic!("unexpected voters {other:?}"),
    };
    cluster.set_peers_arg(original_peers.clone());
    cluster.kill(restarted);
    cluster
        .restart(restarted)
        .expect("restarting an original node");
    let commit = cluster.status(4).await.expect("node 4 answers").commit;
    cluster
        .wait_applied(restarted, commit, Duration::from_secs(15))
        .await
        .expect("the restarted node catches up from node 4");
    cluster.kill(other);
    let mut client = KvClient::connect(original.clone(), ClientOptions::default())
        .await
        .unwrap_or_else(|e| panic!("a session with nodes {restarted} and 4: {e}"));
    client
        .put(b"after-restart".to_vec(), b"yes".to_vec())
        .await
        .expect("a write committed by the restarted node and node 4");
    assert_eq!(
        client.get(b"after-restart".to_vec()).await.expect("a read"),
        Some(b"yes".to_vec())
    );

    // Node 4 restarts too (its command line still says --join, which a non-empty data
    // directory ignores): it comes back as a voter with its stored configuration, and the
    // two of them elect a leader and commit again.
    cluster.kill(4);
    cluster.set_peers_arg(format!("{original_peers},4={raft4}"));
    cluster.restart(4).expect("restarting node 4");
    client
        .put(b"after-restart".to_vec(), b"again".to_vec())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a write after node 4 restarted: {e}\nnode 4:\n{}\nnode {restarted}:\n{}",
                cluster.log_tail(4, 3000),
                cluster.log_tail(restarted, 3000)
            )
        });
    assert_eq!(
        client.get(b"after-restart".to_vec()).await.expect("a read"),
        Some(b"again".to_vec())
    );
}

#[test]
fn a_node_joins_under_load_and_the_old_leader_leaves() {
    processes::run_bounded(BUDGET, scenario());
}
