//! The client protocol of the TCP demo (`examples/common/client_proto.rs`) in front of an
//! in-process 3-node cluster: `KvClient` over `TcpKvEndpoint` does every operation and follows
//! redirects; a follower's refusal keeps its meaning across the wire; an unreachable node
//! reads as `Shutdown`; status answers; an oversized length and an undecodable body each cost
//! the sender its connection and nothing else.

#[allow(dead_code)]
#[path = "../examples/common/client_proto.rs"]
mod client_proto;

use std::net::SocketAddr;
use std::time::Duration;

use client_proto::guard::{self, Port, Secret};
use client_proto::{
    read_message, serve_clients, ClientRequest, ClientResponse, ProtoError, TcpKvEndpoint,
    MAX_CLIENT_FRAME,
};
use raftkv::error::ProposeError;
use raftkv::kv::{
    encode_query, ClientOptions, KvClient, KvEndpoint, KvOp, KvResult, KvStateMachine,
};
use raftkv::storage::MemStorage;
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout};

/// Three in-process nodes, each serving clients on its own loopback port.
async fn cluster() -> (Vec<Node<KvResult>>, TcpKvEndpoint) {
    let net = LocalNetwork::new();
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for id in 1..=3 {
        let mut c = NodeConfig::new(id, vec![1, 2, 3]);
        c.tick_interval = Duration::from_millis(5);
        let (node, driver) = Node::start(
            c,
            MemStorage::new(),
            KvStateMachine::default(),
            net.transport(id),
        )
        .unwrap();
        tokio::spawn(driver);
        let inbox = node.clone();
        net.register(id, move |m| inbox.step(m));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push((id, listener.local_addr().unwrap()));
        tokio::spawn(serve_clients(listener, node.clone()));
        nodes.push(node);
    }
    (nodes, TcpKvEndpoint::new(addrs))
}

async fn leader(nodes: &[Node<KvResult>]) -> u64 {
    for _ in 0..1000 {
        if let Some(n) = nodes
            .iter()
            .find(|n| n.status().raft.role == raftkv::raft::Role::Leader)
        {
            return n.id();
        }
        sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader elected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_client_over_tcp_does_everything_and_follows_redirects() {
    let (nodes, endpoint) = cluster().await;
    let leader = leader(&nodes).await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();

    // A follower's refusal crosses the wire intact, with the leader's id.
    let query = encode_query(&KvOp::Get { key: b"a".to_vec() });
    let mut refused = endpoint.propose(follower, query.clone()).await;
    for _ in 0..100 {
        if refused
            == Err(ProposeError::NotLeader {
                leader: Some(leader),
            })
        {
            break;
        }
        sleep(Duration::from_millis(10)).await;
        refused = endpoint.propose(follower, query.clone()).await;
    }
    assert_eq!(
        refused,
        Err(ProposeError::NotLeader {
            leader: Some(leader)
        })
    );

    let mut c = KvClient::connect(endpoint.clone(), ClientOptions::default())
        .await
        .unwrap();
    c.put("a", "1").await.unwrap();
    c.append("a", "2").await.unwrap();
    assert_eq!(c.get("a").await.unwrap(), Some(b"12".to_vec()));
    assert!(c
        .cas("a", Some(b"12".to_vec()), Some(b"3".to_vec()))
        .await
        .unwrap());
    assert!(!c.cas("a", None, Some(b"4".to_vec())).await.unwrap());
    c.put("b", "x").await.unwrap();
    assert_eq!(
        c.scan("a", None, 10).await.unwrap(),
        vec![
            (b"a".to_vec(), b"3".to_vec()),
            (b"b".to_vec(), b"x".to_vec())
        ]
    );
    assert!(c.delete("b").await.unwrap());

    let status = client_proto::status(endpoint.addr(leader).unwrap(), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!((status.id, status.role.as_str()), (leader, "Leader"));
    assert_eq!(status.leader, Some(leader));
    assert!(status.commit >= 7 && status.applied <= status.commit);

    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_reads_as_shutdown() {
    let nothing: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = TcpKvEndpoint::new([(1, nothing)]);
    let got = endpoint
        .read(1, encode_query(&KvOp::Get { key: vec![] }))
        .await;
    assert_eq!(got, Err(ProposeError::Shutdown));
    assert_eq!(
        endpoint.read(9, vec![]).await,
        Err(ProposeError::Shutdown),
        "an unknown node"
    );
}

/// Connects to `addr`, shakes hands (no secret), writes `bytes`, and expects the server to
/// close without answering.
async fn send_and_expect_close(addr: SocketAddr, bytes: &[u8]) {
    let mut stream = shaken(addr, &Secret::none()).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut sink = Vec::new();
    match timeout(Duration::from_secs(3), stream.read_to_end(&mut sink)).await {
        Ok(_) => assert!(sink.is_empty(), "the server answered garbage: {sink:?}"),
        Err(_) => panic!("the server kept a bad connection open"),
    }
}

/// A client connection to `addr` after the handshake with `secret`.
async fn shaken(addr: SocketAddr, secret: &Secret) -> Result<TcpStream, guard::HandshakeError> {
    let mut stream = TcpStream::connect(addr).await?;
    let c = guard::read_challenge(&mut stream, Port::Client).await?;
    let hello = guard::make_hello(Port::Client, secret, &c, guard::Hello::client(&c))?;
    stream
        .write_all(&guard::hello_bytes(Port::Client, &hello))
        .await?;
    guard::read_answer(&mut stream, Port::Client, secret, &c, &hello).await?;
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_cost_only_their_connection() {
    let (nodes, endpoint) = cluster().await;
    let leader = leader(&nodes).await;
    let addr = endpoint.addr(leader).unwrap();

    // A length beyond the limit: refused before any body is read.
    send_and_expect_close(addr, &(MAX_CLIENT_FRAME as u32 + 1).to_le_bytes()).await;
    // A body that is not a request.
    let mut junk = 3u32.to_le_bytes().to_vec();
    junk.extend([0xFF; 3]);
    send_and_expect_close(addr, &junk).await;
    // Text.
    send_and_expect_close(addr, b"GET / HTTP/1.1\r\n\r\n").await;

    // The reader side refuses an oversized length too, without reading on.
    let (mut a, mut b) = tokio::io::duplex(64);
    a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let got = read_message::<_, ClientResponse>(&mut b).await;
    assert!(matches!(got, Err(ProtoError::TooLarge(n, _)) if n == u32::MAX as usize));

    // The node still serves, on a fresh connection.
    let mut stream = shaken(addr, &Secret::none()).await.unwrap();
    client_proto::write_message(&mut stream, &ClientRequest::Status)
        .await
        .unwrap();
    let answer = read_message::<_, ClientResponse>(&mut stream)
        .await
        .unwrap();
    assert!(matches!(answer, Some(ClientResponse::Status(s)) if s.id == leader));
    let mut c = KvClient::connect(endpoint, ClientOptions::default())
        .await
        .unwrap();
    c.put("still", "here").await.unwrap();

    for n in &nodes {
        n.shutdown().await;
    }
}

#[test]
fn address_records_round_trip_and_reject_what_they_did_not_write() {
    use client_proto::members::{Addrs, Record};
    let raft: SocketAddr = "127.0.0.1:7004".parse().unwrap();
    let client: SocketAddr = "127.0.0.1:8004".parse().unwrap();
    for record in [
        Record::Member(Addrs {
            raft,
            client: Some(client),
        }),
        Record::Member(Addrs { raft, client: None }),
        Record::Removed,
    ] {
        assert_eq!(Record::decode(&record.encode()), Some(record), "{record:?}");
    }
    assert_eq!(
        Record::Member(Addrs {
            raft,
            client: Some(client)
        })
        .encode(),
        "raft=127.0.0.1:7004 client=127.0.0.1:8004"
    );
    for bad in [
        "",
        "raft=127.0.0.1:7004",
        "raft=nowhere client=-",
        "port=1 client=-",
    ] {
        assert_eq!(Record::decode(bad), None, "`{bad}`");
    }
}

#[test]
fn member_failures_read_as_the_library_s_membership_errors() {
    use client_proto::members::MemberFailure;
    use raftkv::error::MembershipError;
    for e in [
        MembershipError::NotCaughtUp(4),
        MembershipError::NotALearner(4),
        MembershipError::InProgress,
        MembershipError::Invalid("node 4 is already a member".into()),
    ] {
        let f = MemberFailure::from(e.clone());
        assert_eq!(f.as_membership_error(), Some(e.clone()));
        assert_eq!(f.to_string(), e.to_string());
    }
    let redirect = MemberFailure::LeaderAt(4, "127.0.0.1:8004".parse().unwrap());
    assert_eq!(
        redirect.as_membership_error(),
        Some(MembershipError::NotLeader { leader: Some(4) })
    );
    assert!(MemberFailure::NotCaughtUp(4).is_transient());
    assert!(!MemberFailure::UnknownNode(4).is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_without_the_member_service_refuses_member_requests_and_kv_goes_on() {
    let (nodes, endpoint) = cluster().await;
    leader(&nodes).await;
    let answer = endpoint
        .member_request(&ClientRequest::Members, Duration::from_secs(2))
        .await;
    assert!(
        matches!(
            answer,
            Err(client_proto::MemberCallError::Refused(
                client_proto::members::MemberFailure::Other(_)
            ))
        ),
        "{answer:?}"
    );
    // The endpoint keeps its nodes, and KV requests still work.
    assert_eq!(endpoint.nodes(), vec![1, 2, 3]);
    let mut client = KvClient::connect(endpoint, ClientOptions::default())
        .await
        .unwrap();
    client.put(b"k".to_vec(), b"v".to_vec()).await.unwrap();
}
