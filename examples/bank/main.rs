//! A bank on raftkv: the ledger of `ledger.rs` (a custom state machine — read it first)
//! replicated on an in-process 3-node cluster with file storage in a temporary directory.
//!
//! Tellers make random transfers concurrently while an auditor reads the total on every node;
//! midway the leader is stopped, and later restarted from its data directory. Transfers move
//! money but never create or destroy it, so every read of the total, on any node at any time,
//! must give the same number.
//!
//! Run with: `cargo run --example bank`

mod ledger;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger::{Command, Ledger, Outcome, Query};
use parking_lot::Mutex;
use raftkv::error::ProposeError;
use raftkv::raft::{Rng, Role};
use raftkv::storage::{FileStorage, FileStorageOptions};
use raftkv::transport::LocalNetwork;
use raftkv::{Node, NodeConfig, NodeId};

const ACCOUNTS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];
const INITIAL: i64 = 1_000;
const TELLERS: u64 = 4;
const TRANSFERS_PER_TELLER: u64 = 300;

type BankNode = Node<Outcome>;

/// Three nodes on one in-process network; any of them may be stopped and restarted.
struct Bank {
    net: LocalNetwork,
    dir: PathBuf,
    nodes: Mutex<[Option<BankNode>; 3]>,
    /// How the tellers' transfers went so far.
    tally: Mutex<Tally>,
}

/// Transfers applied, refused by the ledger, and of unknown outcome (timed out, node stopped).
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    applied: u64,
    refused: u64,
    unknown: u64,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.applied + self.refused + self.unknown
    }
}

impl Bank {
    /// Starts node `id` from its data directory (empty the first time).
    fn start(&self, id: NodeId) -> BankNode {
        let mut config = NodeConfig::new(id, vec![1, 2, 3]);
        config.tick_interval = Duration::from_millis(10);
        config.propose_timeout = Duration::from_secs(2);
        // Small limits, so that this short run takes snapshots and compacts the log (the log
        // shrinks by whole segments: keep `max_log_bytes` several segments long).
        config.max_log_bytes = Some(16 << 10);
        let options = FileStorageOptions {
            cluster_id: 7,
            node_id: id,
            segment_size: 4 << 10,
            ..Default::default()
        };
        let storage = FileStorage::open(self.dir.join(format!("node-{id}")), options)
            .expect("data directory opens");
        let (node, driver) =
            Node::start(config, storage, Ledger::default(), self.net.transport(id))
                .expect("node starts");
        tokio::spawn(driver);
        let inbox = node.clone();
        self.net.register(id, move |m| inbox.step(m));
        self.nodes.lock()[id as usize - 1] = Some(node.clone());
        node
    }

    async fn stop(&self, id: NodeId) {
        let node = self.nodes.lock()[id as usize - 1].take();
        self.net.unregister(id);
        if let Some(node) = node {
            node.shutdown().await;
        }
    }

    fn running(&self) -> Vec<BankNode> {
        self.nodes.lock().iter().flatten().cloned().collect()
    }

    /// A node that says it leads (waiting out elections).
    async fn leader(&self) -> BankNode {
        loop {
            let mut nodes = self.running().into_iter();
            if let Some(leader) = nodes.find(|n| n.status().raft.role == Role::Leader) {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Proposes `command` to the leader, following leader changes. It retries only when the
    /// command was certainly not applied (`NotLeader`, `Dropped`, `Busy`): a transfer that
    /// timed out or whose node stopped may have been applied, and sending it again could apply
    /// it twice. (`raftkv::kv` solves that with client sessions; this ledger has none.)
    async fn propose(&self, command: &Command) -> Result<Outcome, ProposeError> {
        let bytes = command.encode();
        loop {
            match self.leader().await.propose(bytes.as_slice()).await {
                Err(
                    ProposeError::NotLeader { .. } | ProposeError::Dropped | ProposeError::Busy,
                ) => tokio::time::sleep(Duration::from_millis(10)).await,
                answer => return answer,
            }
        }
    }

    /// Waits until at least `n` transfers have been answered.
    async fn wait_for_answers(&self, n: u64) {
        while self.tally.lock().answered() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn transfer(from: &str, to: &str, amount: i64) -> Command {
    let (from, to) = (from.to_string(), to.to_string());
    Command::Transfer { from, to, amount }
}

async fn teller(bank: Arc<Bank>, seed: u64) {
    let mut rng = Rng::new(seed);
    let n = ACCOUNTS.len() as u64;
    for _ in 0..TRANSFERS_PER_TELLER {
        let from = rng.range(0, n);
        let to = (from + rng.range(1, n)) % n; // another account
        let (from, to) = (ACCOUNTS[from as usize], ACCOUNTS[to as usize]);
        let answer = bank
            .propose(&transfer(from, to, rng.range(1, 500) as i64))
            .await;
        let mut tally = bank.tally.lock();
        match answer {
            Ok(Outcome::Transferred) => tally.applied += 1,
            Ok(Outcome::Refused(_)) => tally.refused += 1,
            Ok(other) => panic!("a transfer answered {other:?}"),
            Err(_) => tally.unknown += 1,
        }
    }
}

/// Reads the total on every running node, over and over, until `done`. Returns the reads made.
async fn auditor(bank: Arc<Bank>, expected: i64, done: Arc<AtomicBool>) -> u64 {
    let mut reads = 0;
    while !done.load(Ordering::Relaxed) {
        for node in bank.running() {
            // A read fails or waits while there is no leader: skip it, ask again later.
            let read =
                tokio::time::timeout(Duration::from_millis(200), node.read(Query::Total.encode()));
            if let Ok(Ok(total)) = read.await {
                assert_eq!(
                    total,
                    Outcome::Total(expected),
                    "node {} broke the invariant",
                    node.id()
                );
                reads += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    reads
}

/// Reads a balance or the total on `node`, waiting out leader changes.
async fn read_amount(node: &BankNode, query: Query) -> i64 {
    loop {
        match node.read(query.encode()).await {
            Ok(Outcome::Balance(amount) | Outcome::Total(amount)) => return amount,
            Ok(other) => panic!("{query:?} answered {other:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::main]
async fn main() {
    let data = tempfile::tempdir().expect("a temporary directory");
    println!(
        "bank: 3 nodes in one process, data under {}\n",
        data.path().display()
    );
    let bank = Arc::new(Bank {
        net: LocalNetwork::new(),
        dir: data.path().to_path_buf(),
        nodes: Mutex::new([None, None, None]),
        tally: Mutex::new(Tally::default()),
    });
    for id in 1..=3 {
        bank.start(id);
    }

    println!("1. opening {ACCOUNTS:?} with {INITIAL} each");
    for name in ACCOUNTS {
        let open = Command::Open {
            account: name.into(),
            initial: INITIAL,
        };
        assert_eq!(bank.propose(&open).await, Ok(Outcome::Opened));
    }
    let expected = INITIAL * ACCOUNTS.len() as i64;
    let overdraft = bank.propose(&transfer("alice", "bob", 5_000)).await;
    println!("   alice sends bob 5000: {overdraft:?}");
    let unknown = bank.propose(&transfer("mallory", "bob", 1)).await;
    println!("   mallory sends bob 1: {unknown:?}");

    let total = TELLERS * TRANSFERS_PER_TELLER;
    println!("\n2. {TELLERS} tellers make {total} random transfers; an auditor reads the total meanwhile");
    let tellers: Vec<_> = (1..=TELLERS)
        .map(|seed| tokio::spawn(teller(bank.clone(), seed)))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let audit = tokio::spawn(auditor(bank.clone(), expected, done.clone()));

    bank.wait_for_answers(total / 3).await;
    let stopped = bank.leader().await.id();
    println!(
        "3. after {} transfers, stopping node {stopped} (the leader)",
        total / 3
    );
    bank.stop(stopped).await;
    bank.wait_for_answers(2 * total / 3).await;
    let restarted = bank.start(stopped).status().raft;
    println!(
        "   after {} transfers, restarted node {stopped} from its data directory: snapshot at {}, log to {}",
        2 * total / 3,
        restarted.snapshot.index,
        restarted.last_index
    );

    for teller in tellers {
        teller.await.expect("a teller finished");
    }
    done.store(true, Ordering::Relaxed);
    let audits = audit.await.expect("the auditor finished");
    println!("4. transfers: {:?}", *bank.tally.lock());
    println!(
        "   the auditor read the total {audits} times on the running nodes: {expected} every time"
    );

    println!("\n5. balances of {ACCOUNTS:?}, read on every node:");
    let mut ledgers = Vec::new();
    for node in bank.running() {
        let mut balances = Vec::new();
        for name in ACCOUNTS {
            let query = Query::Balance {
                account: name.into(),
            };
            balances.push(read_amount(&node, query).await);
        }
        let total = read_amount(&node, Query::Total).await;
        let s = node.status();
        println!(
            "   node {}: {balances:?}, total {total} (since start: {} snapshots taken, {} installed)",
            node.id(),
            s.snapshots_taken,
            s.snapshots_installed
        );
        assert_eq!(total, expected, "node {} lost or made money", node.id());
        ledgers.push(balances);
    }
    assert!(
        ledgers.windows(2).all(|w| w[0] == w[1]),
        "the nodes disagree"
    );
    println!("\nall nodes hold the same ledger, and the total is still {expected}");
    for node in bank.running() {
        node.shutdown().await;
    }
}
