//! The KV client against an in-process cluster: every operation, leader loss and redirects,
//! async under tokio and blocking from plain threads.

use std::time::Duration;

use raftkv::kv::{ClientError, ClientOptions, KvClient, KvError, KvResult, KvStateMachine};
use raftkv::storage::MemStorage;
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig};

fn cluster(net: &LocalNetwork, max_sessions: usize) -> Vec<Node<KvResult>> {
    (1..=3)
        .map(|id| {
            let mut c = NodeConfig::new(id, vec![1, 2, 3]);
            c.tick_interval = Duration::from_millis(5);
            let (node, driver) = Node::start(
                c,
                MemStorage::new(),
                KvStateMachine::new(max_sessions),
                net.transport(id),
            )
            .unwrap();
            std::thread::spawn(move || futures::executor::block_on(driver));
            let inbox = node.clone();
            net.register(id, move |m| inbox.step(m));
            node
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_a_leader_change() {
    let net = LocalNetwork::new();
    let nodes = cluster(&net, 100);
    let mut c = KvClient::connect(nodes.clone(), ClientOptions::default())
        .await
        .unwrap();
    c.put("a", "1").await.unwrap();
    c.append("a", "2").await.unwrap();
    assert_eq!(c.get("a").await.unwrap(), Some(b"12".to_vec()));
    assert!(c
        .cas("a", Some(b"12".to_vec()), Some(b"3".to_vec()))
        .await
        .unwrap());
    assert!(!c
        .cas("a", Some(b"12".to_vec()), Some(b"4".to_vec()))
        .await
        .unwrap());
    c.put("b", "x").await.unwrap();
    c.put("c", "y").await.unwrap();
    let scan = c.scan("a", Some(b"c".to_vec()), 10).await.unwrap();
    assert_eq!(
        scan,
        vec![
            (b"a".to_vec(), b"3".to_vec()),
            (b"b".to_vec(), b"x".to_vec())
        ]
    );
    assert!(c.delete("b").await.unwrap());
    assert!(!c.delete("b").await.unwrap());
    assert_eq!(c.get("b").await.unwrap(), None);

    // Stop the leader: the client finds the new one and carries on.
    let leader = nodes
        .iter()
        .find(|n| n.status().raft.role == raftkv::raft::Role::Leader)
        .unwrap();
    leader.shutdown().await;
    net.unregister(leader.id());
    c.put("after", "failover").await.unwrap();
    assert_eq!(c.get("after").await.unwrap(), Some(b"failover".to_vec()));
    assert_eq!(c.get("a").await.unwrap(), Some(b"3".to_vec()));
    for n in &nodes {
        n.shutdown().await;
    }
}

#[test]
fn blocking_clients_from_threads_and_expired_sessions() {
    let net = LocalNetwork::new();
    let nodes = cluster(&net, 4);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let nodes = nodes.clone();
            std::thread::spawn(move || {
                let mut c =
                    raftkv::kv::BlockingKvClient::connect(nodes, ClientOptions::default()).unwrap();
                for i in 0..20 {
                    c.append("log", format!("{t}.{i};")).unwrap();
                }
                c
            })
        })
        .collect();
    let clients: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut reader =
        raftkv::kv::BlockingKvClient::connect(nodes.clone(), ClientOptions::default()).unwrap();
    let log = reader.get("log").unwrap().unwrap();
    assert_eq!(
        log.iter().filter(|&&b| b == b';').count(),
        80,
        "an append was lost or applied twice"
    );
    // Room for 4 sessions: opening the reader's evicted the least recently used writer's.
    // That client gets a clear error and its request is not applied; the others go on.
    let mut expired = 0;
    for mut c in clients {
        match c.append("log", "late;") {
            Ok(()) => {}
            Err(ClientError::Refused(KvError::SessionExpired { .. })) => expired += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(expired, 1);
    let log = reader.get("log").unwrap().unwrap();
    assert_eq!(log.iter().filter(|&&b| b == b';').count(), 83);
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}
