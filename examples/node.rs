//! One node of a raftkv cluster as its own process: the replicated KV map on durable file
//! storage, Raft traffic over TCP with its peers, and a client port (see
//! `examples/common/client_proto.rs`) for `examples/kv.rs` and `examples/cluster.rs`.
//!
//! ```sh
//! cargo run --release --example node -- --id 1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \
//!     --client 127.0.0.1:8001 --data ./data/n1 [--cluster 7]
//! ```
//!
//! It runs until killed; everything it acknowledged is on disk (kill -9 is a fair test).

#[allow(dead_code)]
#[path = "common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "common/tcp.rs"]
mod tcp;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use raftkv::kv::KvStateMachine;
use raftkv::storage::{FileStorage, FileStorageOptions};
use raftkv::wire::DEFAULT_MAX_FRAME;
use raftkv::{Node, NodeConfig, NodeId};
use tokio::net::TcpListener;

const USAGE: &str =
    "usage: node --id ID --peers ID=HOST:PORT,... --client HOST:PORT --data DIR [--cluster N]

  --id       this node's id (one of the ids in --peers)
  --peers    every node of the cluster (this one included) and its Raft address
  --client   the address this node serves clients on
  --data     the directory holding this node's log and snapshots (created if missing)
  --cluster  the cluster id written into every file and frame (default 7)";

struct Args {
    id: NodeId,
    peers: BTreeMap<NodeId, SocketAddr>,
    client: SocketAddr,
    data: PathBuf,
    cluster: u64,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut id = None;
    let mut peers = None;
    let mut client = None;
    let mut data = None;
    let mut cluster = 7;
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--id" => {
                let v = value()?;
                id = Some(
                    v.parse()
                        .map_err(|_| format!("--id: `{v}` is not a number"))?,
                );
            }
            "--peers" => peers = Some(client_proto::parse_addrs(&value()?)?),
            "--client" => {
                let v = value()?;
                client = Some(
                    v.parse()
                        .map_err(|_| format!("--client: `{v}` is not IP:PORT"))?,
                );
            }
            "--data" => data = Some(PathBuf::from(value()?)),
            "--cluster" => {
                let v = value()?;
                cluster = v
                    .parse()
                    .map_err(|_| format!("--cluster: `{v}` is not a number"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let id: NodeId = id.ok_or("--id is required")?;
    let peers = peers.ok_or("--peers is required")?;
    if !peers.contains_key(&id) {
        return Err(format!("--peers does not list this node ({id})"));
    }
    Ok(Args {
        id,
        peers,
        client: client.ok_or("--client is required")?,
        data: data.ok_or("--data is required")?,
        cluster,
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("node: {why}\n");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node {}: cannot start the runtime: {e}", args.id);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("{why}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let id = args.id;
    let options = FileStorageOptions {
        cluster_id: args.cluster,
        node_id: id,
        ..FileStorageOptions::default()
    };
    let storage = FileStorage::open(&args.data, options)
        .map_err(|e| format!("node {id}: cannot open {}: {e}", args.data.display()))?;
    let raft_addr = args.peers[&id];
    // Bind both ports before starting, so a port in use fails fast and clearly.
    let raft_listener = TcpListener::bind(raft_addr)
        .await
        .map_err(|e| format!("node {id}: cannot listen on {raft_addr}: {e}"))?;
    let client_listener = TcpListener::bind(args.client)
        .await
        .map_err(|e| format!("node {id}: cannot listen on {}: {e}", args.client))?;

    let voters: Vec<NodeId> = args.peers.keys().copied().collect();
    let peers: HashMap<NodeId, SocketAddr> = args.peers.clone().into_iter().collect();
    let transport = tcp::TcpTransport::new(args.cluster, id, peers);
    let config = NodeConfig::new(id, voters);
    let (node, driver) = Node::start(config, storage, KvStateMachine::default(), transport)
        .map_err(|e| format!("node {id}: cannot start: {e}"))?;
    tokio::spawn(driver);

    let inbox = node.clone();
    tokio::spawn(tcp::serve(
        raft_listener,
        args.cluster,
        DEFAULT_MAX_FRAME,
        move |m| inbox.step(m),
    ));
    let status = node.status();
    eprintln!(
        "node {id}: raft on {raft_addr}, clients on {}, data in {} (term {}, commit {}, snapshot {})",
        args.client,
        args.data.display(),
        status.raft.term,
        status.raft.commit_index,
        status.raft.snapshot.index,
    );
    let clients = tokio::spawn(client_proto::serve_clients(client_listener, node.clone()));

    // Run until killed, or until the node stops on a fatal error (a failed fsync, say).
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let status = node.status();
        if !status.running {
            clients.abort();
            return Err(format!(
                "node {id}: stopped: {}",
                status.fatal_error.as_deref().unwrap_or("no reason given")
            ));
        }
    }
}
