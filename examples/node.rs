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
            [--segment-size BYTES] [--recover] [--restore FILE]

  --id       this node's id (one of the ids in --peers)
  --peers    every node of the cluster (this one included) and its Raft address
  --client   the address this node serves clients on
  --data     the directory holding this node's log and snapshots (created if missing)
  --cluster  the cluster id written into every file and frame (default 7)
  --segment-size  bytes preallocated per log segment, with a K, M or G suffix for KiB, MiB,
             GiB (default 64M; made smaller on a disk without room for it)
  --recover  recovery mode: if synced log records are damaged, cut the log at the first
             damaged one (keeping the snapshot and the intact prefix), record the loss, and
             let the cluster repair this node, instead of refusing to start
  --restore  bootstrap this node, whose data directory must be empty, from a backup taken
             with `kv backup FILE` (verified first); start every node of the new cluster so";

struct Args {
    id: NodeId,
    peers: BTreeMap<NodeId, SocketAddr>,
    client: SocketAddr,
    data: PathBuf,
    cluster: u64,
    segment_size: Option<u64>,
    recover: bool,
    restore: Option<PathBuf>,
}

/// Parses a byte count with an optional K, M or G (binary) suffix.
fn parse_bytes(v: &str) -> Option<u64> {
    let (digits, shift) = match v.as_bytes().last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 10),
        b'M' | b'm' => (&v[..v.len() - 1], 20),
        b'G' | b'g' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut id = None;
    let mut peers = None;
    let mut client = None;
    let mut data = None;
    let mut cluster = 7;
    let mut segment_size = None;
    let mut recover = false;
    let mut restore = None;
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
            "--segment-size" => {
                let v = value()?;
                segment_size = Some(
                    parse_bytes(&v)
                        .ok_or_else(|| format!("--segment-size: `{v}` is not a byte count"))?,
                );
            }
            "--recover" => recover = true,
            "--restore" => restore = Some(PathBuf::from(value()?)),
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
        segment_size,
        recover,
        restore,
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
    let defaults = FileStorageOptions::default();
    let options = FileStorageOptions {
        cluster_id: args.cluster,
        node_id: id,
        segment_size: args.segment_size.unwrap_or(defaults.segment_size),
        recover_damaged_tail: args.recover,
        ..defaults
    };
    let mut storage = FileStorage::open(&args.data, options)
        .map_err(|e| format!("node {id}: cannot open {}: {e}", args.data.display()))?;
    if let Some(file) = &args.restore {
        let backup = std::fs::File::open(file)
            .map_err(|e| format!("node {id}: cannot open {}: {e}", file.display()))?;
        let info = raftkv::storage::backup::restore(std::io::BufReader::new(backup), &mut storage)
            .map_err(|e| format!("node {id}: cannot restore {}: {e}", file.display()))?;
        eprintln!(
            "node {id}: restored {} (taken from node {} at index {} term {}, {} bytes)",
            file.display(),
            info.node_id,
            info.meta.index,
            info.meta.term,
            info.size
        );
    }
    if let Some(cut) = &storage.recovery_report().damaged_tail {
        eprintln!(
            "node {id}: recovery mode cut the log at damaged synced data in {} at offset {}: \
             {}",
            cut.path.display(),
            cut.offset,
            cut.reason
        );
    }
    if let Some(loss) = raftkv::storage::Storage::tail_loss(&storage) {
        eprintln!(
            "node {id}: log entries after index {} were lost to damage{}; waiting for the \
             cluster to repair them",
            loss.intact_through,
            if loss.hard_state_lost {
                " (and possibly the newest term and vote)"
            } else {
                ""
            }
        );
    }
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
