//! The KV client against in-process clusters (real threads): every operation with its
//! revision, transactions and watches across a leader change; exactly-once across lost
//! answers, timeouts, retries of the same request and session eviction; errors that say what
//! is true (unknown outcome, no leader, shut down, full disk); an endpoint that follows
//! restarts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use raftkv::error::ProposeError;
use raftkv::kv::{
    Answer, BlockingKvClient, Bytes, Cause, Change, ClientError, ClientOptions, Compare, Keys,
    KvClient, KvCommand, KvEndpoint, KvError, KvLimits, KvOp, KvResult, KvStateMachine,
    NodeRegistry, Response, Txn, TxnOp, WatchOptions,
};
use raftkv::raft::Role;
use raftkv::storage::MemStorage;
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig, NodeId};

type KvNode = Node<KvResult>;

fn start(net: &LocalNetwork, id: NodeId, storage: MemStorage) -> KvNode {
    let mut c = NodeConfig::new(id, vec![1, 2, 3]);
    c.tick_interval = Duration::from_millis(5);
    // These storages are never lost (a restart gets the same one back), and some tests start
    // a new cluster with a member missing: an empty storage here is really new.
    c.trust_empty_storage = true;
    let (node, driver) = Node::start(c, storage, KvStateMachine::new(), net.transport(id)).unwrap();
    std::thread::spawn(move || futures::executor::block_on(driver));
    let inbox = node.clone();
    net.register(id, move |m| inbox.step(m));
    node
}

fn cluster(net: &LocalNetwork) -> Vec<KvNode> {
    (1..=3)
        .map(|id| start(net, id, MemStorage::new()))
        .collect()
}

fn leader_of(nodes: &[KvNode]) -> KvNode {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Some(l) = nodes.iter().find(|n| n.status().raft.role == Role::Leader) {
            return l.clone();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no leader within 10 s");
}

fn b(s: &str) -> Bytes {
    s.as_bytes().to_vec()
}

async fn set_max_sessions<E: KvEndpoint>(c: &mut KvClient<E>, max_sessions: u64) {
    let current = c.limits().await.unwrap();
    let new = KvLimits {
        max_sessions,
        ..current
    };
    assert!(c.set_limits(current, new).await.unwrap());
}

/// Collects at least `n` changes from `w`.
async fn collect<E: KvEndpoint>(w: &mut raftkv::kv::Watcher<E>, n: usize) -> Vec<Change> {
    let mut seen = Vec::new();
    while seen.len() < n {
        seen.extend(w.next().await.unwrap());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_with_revisions_transactions_and_watches_across_a_leader_change() {
    let net = LocalNetwork::new();
    let nodes = cluster(&net);
    let mut c = KvClient::connect(nodes.clone(), ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(c.session(), 0, "connecting opened a session");
    let mut watcher = c.watch(Keys::Prefix(b("a")), 1, WatchOptions::default());
    let mut one_key = c.watch(Keys::Key(b("b")), 1, WatchOptions::default());

    let first = c
        .write(KvOp::Put {
            key: b("a"),
            value: b("1"),
        })
        .await
        .unwrap();
    assert_ne!(c.session(), 0, "the first write opens the session");
    c.append("a", "2").await.unwrap();
    let read = c.query(KvOp::Get { key: b("a") }).await.unwrap();
    assert_eq!(read.answer, Answer::Value(Some(b("12"))));
    assert!(
        read.revision > first.revision,
        "a read reports the state's revision"
    );
    assert!(c.cas("a", Some(b("12")), Some(b("3"))).await.unwrap());
    assert!(!c.cas("a", Some(b("12")), Some(b("4"))).await.unwrap());
    c.put("b", "x").await.unwrap();
    c.put("c", "y").await.unwrap();
    let scan = c.scan("a", Some(b("c")), 10).await.unwrap();
    assert_eq!(scan, vec![(b("a"), b("3")), (b("b"), b("x"))]);
    assert!(c.delete("b").await.unwrap());
    assert!(!c.delete("b").await.unwrap());
    assert_eq!(c.get("b").await.unwrap(), None);

    // A transaction over two keys; then the same one again, whose compares now fail.
    let txn = Txn::when([Compare::value("a", "3"), Compare::absent("b")])
        .then([
            TxnOp::put("a2", "moved"),
            TxnOp::delete("a"),
            TxnOp::get("a"),
        ])
        .otherwise([TxnOp::get("a2")]);
    let (at, done) = c.txn(txn.clone()).await.unwrap();
    assert!(done.succeeded);
    assert_eq!(
        done.results,
        vec![Answer::Done, Answer::Flag(true), Answer::Value(None)]
    );
    let (later, again) = c.txn(txn).await.unwrap();
    assert!(later > at);
    assert!(!again.succeeded);
    assert_eq!(again.results, vec![Answer::Value(Some(b("moved")))]);

    // Stop the leader: the client and the watchers find the new one and carry on.
    let leader = leader_of(&nodes);
    leader.shutdown().await;
    net.unregister(leader.id());
    c.put("after", "failover").await.unwrap();
    c.put("a", "back").await.unwrap();
    assert_eq!(c.get("after").await.unwrap(), Some(b("failover")));

    let values = |changes: &[Change]| -> Vec<(String, Option<String>)> {
        changes
            .iter()
            .map(|ch| {
                let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
                (text(&ch.key), ch.value.as_deref().map(text))
            })
            .collect()
    };
    let seen = collect(&mut watcher, 7).await;
    let pair = |k: &str, v: Option<&str>| (k.to_string(), v.map(str::to_string));
    assert_eq!(
        values(&seen),
        vec![
            pair("a", Some("1")),
            pair("a", Some("12")),
            pair("a", Some("3")),
            pair("a2", Some("moved")),
            pair("a", None),
            pair("after", Some("failover")),
            pair("a", Some("back")),
        ],
        "the watcher missed, repeated or reordered a change"
    );
    assert_eq!(
        seen[3].revision, at,
        "a transaction's changes share its revision"
    );
    assert_eq!(seen[4].revision, at);
    assert!(seen.windows(2).all(|w| w[0].revision <= w[1].revision));
    let b_changes = collect(&mut one_key, 2).await;
    assert_eq!(
        values(&b_changes),
        vec![pair("b", Some("x")), pair("b", None)]
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Wraps an endpoint, loses the answers to some proposals (after the nodes applied them), and
/// runs `between` before handing back a lost answer.
struct Lossy<E> {
    inner: E,
    /// Answers to lose: those of the next `to_lose` applied proposals that satisfy `lose_if`.
    to_lose: AtomicUsize,
    lose_if: fn(&KvCommand) -> bool,
    /// Proposals whose answer was lost, and the answers.
    lost: parking_lot::Mutex<Vec<KvResult>>,
    between: Option<Box<dyn Fn() + Send + Sync>>,
}

impl<E> Lossy<E> {
    fn new(inner: E, to_lose: usize, lose_if: fn(&KvCommand) -> bool) -> Self {
        Lossy {
            inner,
            to_lose: AtomicUsize::new(to_lose),
            lose_if,
            lost: parking_lot::Mutex::new(Vec::new()),
            between: None,
        }
    }
}

#[async_trait]
impl<E: KvEndpoint> KvEndpoint for Lossy<E> {
    fn nodes(&self) -> Vec<NodeId> {
        self.inner.nodes()
    }
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError> {
        let matches = postcard::from_bytes::<KvCommand>(&command)
            .map(|c| (self.lose_if)(&c))
            .unwrap_or(false);
        let answer = self.inner.propose(node, command).await;
        let Ok(applied) = &answer else {
            return answer;
        };
        let lose = matches
            && self
                .to_lose
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if lose {
            self.lost.lock().push(applied.clone());
            if let Some(f) = &self.between {
                f();
            }
            return Err(ProposeError::Timeout);
        }
        answer
    }
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError> {
        self.inner.read(node, query).await
    }
}

fn is_request(c: &KvCommand) -> bool {
    matches!(c, KvCommand::Request { .. })
}

/// The reproduction through the client: a put is applied but its answer is lost;
/// before the retry, other clients' registrations evict its session; the retry answers
/// SessionExpired. The client must report an unknown outcome (the map holds the put), never
/// "not applied".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_applied_before_its_session_expired_is_reported_as_unknown() {
    let net = LocalNetwork::new();
    let nodes = cluster(&net);
    let mut admin = KvClient::connect(nodes.clone(), ClientOptions::default())
        .await
        .unwrap();
    set_max_sessions(&mut admin, 1).await;
    let evictor = nodes.clone();
    let mut endpoint = Lossy::new(nodes.clone(), 1, is_request);
    endpoint.between = Some(Box::new(move || {
        // Another client opens its session (and writes): the table holds one, ours goes.
        let mut other =
            BlockingKvClient::connect(evictor.clone(), ClientOptions::default()).expect("client");
        other.put("other", "1").expect("the other client writes");
    }));
    let mut c = KvClient::connect(endpoint, ClientOptions::default())
        .await
        .unwrap();
    let err = c.put("k", "v").await.unwrap_err();
    match &err {
        ClientError::Timeout { cause, .. } => {
            assert!(matches!(cause, Cause::SessionExpired { .. }), "{cause:?}");
            assert!(!cause.is_retryable());
        }
        other => panic!("an applied write was reported as {other:?}"),
    }
    assert!(err.may_be_applied());
    assert_eq!(
        c.endpoint().lost.lock().len(),
        1,
        "the first attempt was applied"
    );
    assert_eq!(admin.get("k").await.unwrap(), Some(b("v")));
    // The next write opens a new session and goes through.
    c.put("k2", "v2").await.unwrap();
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Every answer is lost until the deadline: the client reports an unknown outcome with the
/// request; re-issuing that very request later learns its real result (the original
/// revision), applied once. Once a later write is sent, the old request is superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_is_reissued_after_a_timeout_and_learns_its_result() {
    let net = LocalNetwork::new();
    let nodes = cluster(&net);
    // The first election must not eat the short deadline below: this is about lost answers.
    leader_of(&nodes);
    let options = ClientOptions {
        deadline: Duration::from_millis(400),
        ..ClientOptions::default()
    };
    let endpoint = Arc::new(Lossy::new(nodes.clone(), usize::MAX, is_request));
    let mut c = KvClient::connect(endpoint.clone(), options).await.unwrap();
    let err = c.append("log", "x;").await.unwrap_err();
    let ClientError::Timeout {
        request, attempts, ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert!(attempts >= 2, "the client retried within its deadline");
    let lost = endpoint.lost.lock().clone();
    assert!(lost.len() >= 2);
    // Every attempt got the same answer: applied once, at the first attempt's index.
    assert!(lost.windows(2).all(|w| w[0] == w[1]), "{lost:?}");
    let KvResult::Ok { revision, .. } = lost[0] else {
        panic!("{lost:?}");
    };
    endpoint.to_lose.store(0, Ordering::SeqCst);
    let learned = c.retry(&request).await.unwrap();
    assert_eq!(
        learned,
        Response {
            revision,
            answer: Answer::Done
        }
    );
    assert_eq!(c.get("log").await.unwrap(), Some(b("x;")), "applied twice");
    c.append("log", "y;").await.unwrap();
    match c.retry(&request).await {
        Err(ClientError::Timeout {
            cause: Cause::Superseded { .. },
            ..
        }) => {}
        other => panic!("a superseded request answered {other:?}"),
    }
    assert_eq!(c.get("log").await.unwrap(), Some(b("x;y;")));
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Lost answers to Register: every retry carries the same nonce and finds the same session —
/// within one write's deadline, and in the next write after a write that gave up (the write
/// itself was never sent, so it is reported as not applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_register_answers_open_no_second_session() {
    let net = LocalNetwork::new();
    let nodes = cluster(&net);
    // The first election must not eat the short deadline below: this is about lost answers.
    leader_of(&nodes);
    let is_register = |c: &KvCommand| matches!(c, KvCommand::Register { .. });
    let endpoint = Arc::new(Lossy::new(nodes.clone(), usize::MAX, is_register));
    let options = ClientOptions {
        deadline: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let mut c = KvClient::connect(endpoint.clone(), options).await.unwrap();
    match c.put("k", "v").await {
        Err(ClientError::Unavailable {
            cause: Cause::NoAnswer,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let lost = endpoint.lost.lock().clone();
    assert!(lost.len() >= 2, "{lost:?}");
    assert!(
        lost.windows(2).all(|w| w[0] == w[1]),
        "a retried Register opened another session: {lost:?}"
    );
    endpoint.to_lose.store(0, Ordering::SeqCst);
    c.put("k", "v").await.unwrap();
    assert_eq!(lost[0], KvResult::Registered(c.session()));
    assert_eq!(c.get("k").await.unwrap(), Some(b("v")));
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A client is created with no node running; reads and writes then fail saying that the
/// nodes are down and that nothing was applied. With one node of three, they say there is no
/// leader. The client works as soon as a majority is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_whether_nodes_are_down_or_leaderless_and_nothing_was_applied() {
    let options = ClientOptions {
        deadline: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let registry = NodeRegistry::new([1, 2, 3]);
    let mut c = KvClient::connect(registry.clone(), options).await.unwrap();
    match c.get("k").await {
        Err(ClientError::Unavailable {
            cause: Cause::Shutdown,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let err = c.put("k", "v").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Unavailable {
                cause: Cause::Shutdown,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.may_be_applied());

    // One node of three: a minority, no leader.
    let net = LocalNetwork::new();
    let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    registry.insert(start(&net, 1, storages[0].clone()));
    let alone = NodeRegistry::new([1]);
    alone.insert(registry.get(1).unwrap());
    let mut minority = KvClient::connect(alone, options).await.unwrap();
    assert!(matches!(
        minority.get("k").await,
        Err(ClientError::Unavailable {
            cause: Cause::NoLeader,
            ..
        })
    ));
    assert!(matches!(
        minority.put("k", "v").await,
        Err(ClientError::Unavailable {
            cause: Cause::NoLeader,
            ..
        })
    ));

    // A majority: the same client goes on.
    registry.insert(start(&net, 2, storages[1].clone()));
    let mut c = KvClient::connect(
        registry.clone(),
        ClientOptions {
            deadline: Duration::from_secs(10),
            ..options
        },
    )
    .await
    .unwrap();
    c.put("k", "v").await.unwrap();
    assert_eq!(c.get("k").await.unwrap(), Some(b("v")));
    for id in 1..=2 {
        registry.get(id).unwrap().shutdown().await;
    }
}

/// Answers scripted per node, for the client's error handling alone.
struct Scripted {
    answers: BTreeMap<NodeId, Result<KvResult, ProposeError>>,
    /// The first proposal times out (its outcome is then unknown).
    first_times_out: AtomicBool,
    calls: AtomicUsize,
}

#[async_trait]
impl KvEndpoint for Scripted {
    fn nodes(&self) -> Vec<NodeId> {
        self.answers.keys().copied().collect()
    }
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(KvCommand::Register { .. }) = postcard::from_bytes(&command) {
            return Ok(KvResult::Registered(1));
        }
        if self.first_times_out.swap(false, Ordering::SeqCst) {
            return Err(ProposeError::Timeout);
        }
        self.answers[&node].clone()
    }
    async fn read(&self, node: NodeId, _: Bytes) -> Result<KvResult, ProposeError> {
        self.answers[&node].clone()
    }
}

/// The leader's disk is full (the followers redirect to it): the client says so at once
/// instead of retrying for its whole deadline — "not applied", or "unknown" after an attempt
/// whose outcome is unknown.
#[test]
fn a_full_disk_is_reported_at_once() {
    let answers: BTreeMap<NodeId, Result<KvResult, ProposeError>> = [
        (1, Err(ProposeError::NoSpace)),
        (2, Err(ProposeError::NotLeader { leader: Some(1) })),
        (3, Err(ProposeError::NotLeader { leader: Some(1) })),
    ]
    .into_iter()
    .collect();
    for first_times_out in [false, true] {
        let endpoint = Scripted {
            answers: answers.clone(),
            first_times_out: AtomicBool::new(first_times_out),
            calls: AtomicUsize::new(0),
        };
        let mut c = BlockingKvClient::connect(endpoint, ClientOptions::default()).unwrap();
        let started = Instant::now();
        let err = c.put("k", "v").unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "retried a full disk for {:?}",
            started.elapsed()
        );
        match (first_times_out, &err) {
            (
                false,
                ClientError::Unavailable {
                    cause: Cause::NoSpace { node: 1 },
                    ..
                },
            )
            | (
                true,
                ClientError::Timeout {
                    cause: Cause::NoSpace { node: 1 },
                    ..
                },
            ) => {}
            _ => panic!("first attempt timed out: {first_times_out}; got {err:?}"),
        }
        assert!(c.into_inner().endpoint().calls.load(Ordering::SeqCst) < 10);
    }
}

/// Two nodes that name each other as leader (stale hints): the client redirects a bounded
/// number of times per round, backs off, and gives up at its deadline saying there is no
/// leader — instead of bouncing between them forever.
#[test]
fn stale_leader_hints_that_point_at_each_other_do_not_loop_forever() {
    let answers: BTreeMap<NodeId, Result<KvResult, ProposeError>> = [
        (1, Err(ProposeError::NotLeader { leader: Some(2) })),
        (2, Err(ProposeError::NotLeader { leader: Some(1) })),
    ]
    .into_iter()
    .collect();
    let endpoint = Scripted {
        answers,
        first_times_out: AtomicBool::new(false),
        calls: AtomicUsize::new(0),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let options = ClientOptions {
            deadline: Duration::from_millis(200),
            ..ClientOptions::default()
        };
        let mut c = BlockingKvClient::connect(endpoint, options).unwrap();
        let _ = tx.send(c.get("k"));
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Err(ClientError::Unavailable {
            cause: Cause::NoLeader,
            ..
        })) => {}
        Ok(other) => panic!("{other:?}"),
        Err(_) => panic!("the client is still bouncing between the two nodes after 10 s"),
    }
}

/// Four writers from plain threads share a session table of two: sessions are evicted all
/// the time. Every append the client acknowledged is in the log exactly once, and every one
/// it reported as not applied is absent.
#[test]
fn blocking_writers_with_a_tiny_session_table_apply_exactly_once() {
    let net = LocalNetwork::new();
    let nodes = cluster(&net);
    let mut admin = BlockingKvClient::connect(nodes.clone(), ClientOptions::default()).unwrap();
    futures::executor::block_on(async {
        let mut inner = KvClient::connect(nodes.clone(), ClientOptions::default())
            .await
            .unwrap();
        set_max_sessions(&mut inner, 2).await;
    });
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let nodes = nodes.clone();
            std::thread::spawn(move || {
                let mut c = BlockingKvClient::connect(nodes, ClientOptions::default()).unwrap();
                let mut outcomes = Vec::new();
                for i in 0..20 {
                    let token = format!("{t}.{i};");
                    let r = c.append("log", token.clone());
                    outcomes.push((token, r));
                }
                outcomes
            })
        })
        .collect();
    let outcomes: Vec<(String, Result<(), ClientError>)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let log = String::from_utf8(admin.get("log").unwrap().unwrap_or_default()).unwrap();
    let count = |token: &str| log.split_inclusive(';').filter(|t| *t == token).count();
    let mut applied = 0;
    for (token, outcome) in &outcomes {
        match outcome {
            Ok(()) => {
                assert_eq!(
                    count(token),
                    1,
                    "{token} acknowledged but found {}",
                    count(token)
                );
                applied += 1;
            }
            Err(ClientError::Refused(KvError::SessionExpired { .. })) => {
                assert_eq!(count(token), 0, "{token} reported not applied but is there")
            }
            Err(e) if e.may_be_applied() => assert!(count(token) <= 1, "{token} applied twice"),
            Err(e) => panic!("{token}: {e}"),
        }
    }
    assert!(applied >= 40, "only {applied} of 80 appends went through");
    assert_eq!(
        log.matches(';').count(),
        outcomes.iter().map(|(t, _)| count(t)).sum::<usize>(),
        "the log holds an append nobody made"
    );
    for n in &nodes {
        futures::executor::block_on(n.shutdown());
    }
}

/// A registry endpoint follows restarts: every node is restarted in turn from its storage,
/// with a new handle; the client and a watcher follow, and the watcher's stream is exactly
/// the writes, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_follows_restarts_and_watchers_see_every_change() {
    let net = LocalNetwork::new();
    let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    let registry = NodeRegistry::new([1, 2, 3]);
    for id in 1..=3 {
        registry.insert(start(&net, id, storages[id as usize - 1].clone()));
    }
    let mut c = KvClient::connect(registry.clone(), ClientOptions::default())
        .await
        .unwrap();
    let mut w = c.watch(Keys::Prefix(b("n/")), 1, WatchOptions::default());
    let mut expected = Vec::new();
    for round in 0..3u64 {
        for id in [1, 2, 3] {
            let old = registry.remove(id).unwrap();
            old.shutdown().await;
            net.unregister(id);
            let value = format!("{round}.{id}");
            // While node `id` is down, write; then restart it from its storage.
            c.put(format!("n/{id}"), value.clone()).await.unwrap();
            expected.push((format!("n/{id}"), value));
            registry.insert(start(&net, id, storages[id as usize - 1].clone()));
        }
    }
    let seen = collect(&mut w, expected.len()).await;
    let got: Vec<(String, String)> = seen
        .iter()
        .map(|ch| {
            (
                String::from_utf8(ch.key.clone()).unwrap(),
                String::from_utf8(ch.value.clone().unwrap()).unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    // Resume a new watcher from the middle: exactly the rest.
    let mut resumed = c.watch(
        Keys::Prefix(b("n/")),
        seen[4].revision + 1,
        WatchOptions::default(),
    );
    let rest = collect(&mut resumed, expected.len() - 5).await;
    assert_eq!(rest, seen[5..].to_vec());
    for id in 1..=3 {
        registry.get(id).unwrap().shutdown().await;
    }
}
