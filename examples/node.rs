//! One node of a raftkv cluster as its own process: the replicated KV map on durable file
//! storage, Raft traffic over TCP with its peers, and a client port (see
//! `examples/common/client_proto.rs`) for `examples/kv.rs` and `examples/cluster.rs`.
//!
//! ```sh
//! cargo run --release --example node -- --id 1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \
//!     --client 127.0.0.1:8001 --data ./data/n1 \
//!     [--cluster-id N] [--peer-secret-file F] [--client-secret-file F]
//! ```
//!
//! To add a node to a running cluster, start it on an empty data directory with `--join`
//! (its `--peers` naming itself and the cluster's voters), then `kv add-learner` and
//! `kv promote` it. The address book follows membership changes: see
//! `examples/common/members.rs`.
//!
//! It runs until killed; everything it acknowledged is on disk (kill -9 is a fair test).
//! Events go to stderr through `tracing` (`RUST_LOG=debug`, `RUST_LOG=warn`, or per target:
//! `RUST_LOG=info,raftkv=debug`; default `info`).

#[allow(dead_code)]
#[path = "common/client_proto.rs"]
mod client_proto;
#[allow(dead_code)]
#[path = "common/tcp.rs"]
mod tcp;

#[path = "common/identity.rs"]
mod identity;

use client_proto::members;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use raftkv::kv::KvStateMachine;
use raftkv::storage::{FileStorage, FileStorageOptions};
use raftkv::{Node, NodeConfig, NodeId};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

const USAGE: &str =
    "usage: node --id ID --peers ID=HOST:PORT,... --client HOST:PORT --data DIR [options]

  --id ID                 this node's id (one of the ids in --peers)
  --peers LIST            every node of the cluster (this one included) and its Raft address;
                          members added later are learned from the replicated address book
  --client HOST:PORT      the address this node serves clients on (not a Raft address)
  --data DIR              the directory holding this node's log and snapshots (created if
                          missing)

options:
  --cluster-id N          the cluster's id, written into every file and checked in every
                          handshake and frame. Default: the id stored in DIR; for a new DIR,
                          the id a peer already has, or a random one minted by the lowest id
                          of --peers once every other peer has answered it has none (at once
                          with --new-cluster); then stored in DIR/cluster-id
  --peer-secret-file F    a shared secret (at least 16 bytes) every node of the cluster
                          proves on the Raft port; peers without it are refused
  --client-secret-file F  a secret clients must prove on the client port (kv --secret-file)
  --segment-size BYTES    bytes preallocated per log segment, with a K, M or G suffix for
                          KiB, MiB, GiB (default 64M; made smaller on a disk without room)
  --recover               recovery mode: if synced log records are damaged, cut the log at
                          the first damaged one (keeping the snapshot and the intact prefix),
                          record the loss, and let the cluster repair this node, instead of
                          refusing to start
  --new-cluster           DIR is new and so is the cluster: start an empty DIR as a member
                          at once. Without it an empty DIR may be a lost disk: the node asks
                          every peer first and takes part once all have answered (a new
                          cluster forms once every member has started). Never use it for a
                          node whose disk was lost: it could vote twice in a term
  --join                  join a running cluster: start an empty DIR as a member-to-be that
                          never forms a cluster of its own and waits to be added with
                          `kv add-learner ID RAFT CLIENT` (then `kv promote ID`). --peers
                          names this node and at least one member; the cluster id is
                          learned from them unless --cluster-id gives it. Until it is a
                          member it takes any authenticated peer and answers it at the
                          address its handshake names (the leader that adds it, say)
  --restore FILE          bootstrap this node, whose data directory must be empty, from a
                          backup taken with `kv backup FILE` (verified first); start every
                          node of the new cluster so
  -h, --help              this help

Logs go to stderr; RUST_LOG sets the level (error, warn, info, debug, trace; default info).";

/// The command line, parsed.
struct Args {
    id: NodeId,
    peers: BTreeMap<NodeId, SocketAddr>,
    client: SocketAddr,
    data: PathBuf,
    cluster_id: Option<u64>,
    peer_secret: Option<PathBuf>,
    client_secret: Option<PathBuf>,
    segment_size: Option<u64>,
    recover: bool,
    new_cluster: bool,
    join: bool,
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

/// Why parsing stopped: a mistake, or a request for help.
enum ArgsError {
    Help,
    Bad(String),
}

impl From<String> for ArgsError {
    fn from(s: String) -> Self {
        ArgsError::Bad(s)
    }
}

impl From<&str> for ArgsError {
    fn from(s: &str) -> Self {
        ArgsError::Bad(s.to_string())
    }
}

fn parse_number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: `{v}` is not a number"))
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, ArgsError> {
    let mut id = None;
    let mut peers = None;
    let mut client = None;
    let mut data = None;
    let mut cluster_id = None;
    let mut peer_secret = None;
    let mut client_secret = None;
    let mut segment_size = None;
    let mut recover = false;
    let mut new_cluster = false;
    let mut join = false;
    let mut restore = None;
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(ArgsError::Help);
        }
        if flag == "--recover" {
            recover = true;
            continue;
        }
        if flag == "--new-cluster" {
            new_cluster = true;
            continue;
        }
        if flag == "--join" {
            join = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--id" => id = Some(parse_number::<NodeId>(&flag, &value)?),
            "--peers" => peers = Some(client_proto::parse_addrs(&value)?),
            "--client" => {
                client = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|_| format!("--client: `{value}` is not IP:PORT"))?,
                )
            }
            "--data" => data = Some(PathBuf::from(value)),
            // `--cluster` is the flag's old name.
            "--cluster-id" | "--cluster" => cluster_id = Some(parse_number(&flag, &value)?),
            "--peer-secret-file" => peer_secret = Some(PathBuf::from(value)),
            "--client-secret-file" => client_secret = Some(PathBuf::from(value)),
            "--segment-size" => {
                segment_size = Some(
                    parse_bytes(&value)
                        .ok_or_else(|| format!("--segment-size: `{value}` is not a byte count"))?,
                )
            }
            "--restore" => restore = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let id: NodeId = id.ok_or("--id is required")?;
    let peers = peers.ok_or("--peers is required")?;
    let Some(raft) = peers.get(&id).copied() else {
        return Err(format!("--peers does not list this node ({id})").into());
    };
    let client = client.ok_or("--client is required")?;
    if let Some((other, _)) = peers.iter().find(|(_, addr)| **addr == client) {
        return Err(if *other == id {
            format!(
                "--client {client} is this node's Raft address (in --peers); give the client \
                 port an address of its own (the Raft port is {raft})"
            )
        } else {
            format!("--client {client} is node {other}'s Raft address (in --peers)")
        }
        .into());
    }
    if cluster_id == Some(0) {
        return Err("--cluster-id 0 is reserved".into());
    }
    if join && (new_cluster || restore.is_some()) {
        return Err(
            "--join starts a member of a running cluster: not with --new-cluster or \
                    --restore"
                .into(),
        );
    }
    if join && peers.len() < 2 {
        return Err("--join needs --peers to name at least one member of the cluster".into());
    }
    Ok(Args {
        id,
        peers,
        client,
        data: data.ok_or("--data is required")?,
        cluster_id,
        peer_secret,
        client_secret,
        segment_size,
        recover,
        new_cluster,
        join,
        restore,
    })
}

fn load_secret<S>(
    path: Option<&PathBuf>,
    from_file: impl Fn(&Path) -> Result<(S, Option<String>), String>,
    none: S,
) -> Result<S, String> {
    let Some(path) = path else {
        return Ok(none);
    };
    let (secret, warning) = from_file(path)?;
    if let Some(w) = warning {
        warn!("{w}");
    }
    Ok(secret)
}

/// Prints `tracing` events to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match spec.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                Targets::new().with_default(LevelFilter::INFO),
                Some(format!(
                    "RUST_LOG=`{spec}` not understood ({e}); logging at info"
                )),
            ),
        },
        _ => (Targets::new().with_default(LevelFilter::INFO), None),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .init();
    if let Some(bad) = bad {
        warn!("{bad}");
    }
}

/// Makes every allocation of 128 KiB or more its own mapping, given back to the OS when
/// freed. glibc's default raises that threshold each time such a block is freed, after which
/// the large frame buffers of a burst of clients stay in the heap when they disconnect.
fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

fn main() -> ExitCode {
    return_large_buffers_to_the_os();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Bad(why)) => {
            eprintln!("node: {why}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("node {}: cannot start the runtime: {e}", args.id);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            error!("{why}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let id = args.id;
    let raft_addr = args.peers[&id];
    // Bind both ports first, so a port in use fails fast and clearly (and so the Raft port
    // can answer peers while this node learns its cluster's id).
    let raft_listener = TcpListener::bind(raft_addr)
        .await
        .map_err(|e| format!("node {id}: cannot listen on {raft_addr}: {e}"))?;
    let client_listener = TcpListener::bind(args.client)
        .await
        .map_err(|e| format!("node {id}: cannot listen on {}: {e}", args.client))?;
    let (incarnation, minted) =
        identity::incarnation(&args.data).map_err(|e| format!("node {id}: {e}"))?;
    let boot = identity::Bootstrap {
        id,
        peers: &args.peers,
        given: args.cluster_id,
        join: args.join,
        new_cluster: args.new_cluster,
        incarnation,
    };
    let (cluster_id, cluster_how) = identity::cluster_id(&args.data, &boot, &raft_listener)
        .await
        .map_err(|e| format!("node {id}: {e}"))?;
    let incarnations = identity::seen_table(&args.data).map_err(|e| format!("node {id}: {e}"))?;
    let peer_secret = load_secret(
        args.peer_secret.as_ref(),
        tcp::guard::Secret::from_file,
        tcp::guard::Secret::none(),
    )
    .map_err(|e| format!("node {id}: --peer-secret-file: {e}"))?;
    let client_secret = load_secret(
        args.client_secret.as_ref(),
        client_proto::guard::Secret::from_file,
        client_proto::guard::Secret::none(),
    )
    .map_err(|e| format!("node {id}: --client-secret-file: {e}"))?;

    // The limits, consistent end to end: a client frame holds any command that fits an entry,
    // and a Raft frame holds any message the core sends (the largest entry alone in its
    // append, or a full batch, or a snapshot chunk).
    // A joining node starts with no voters: it never campaigns, and learns the configuration
    // from the leader once added.
    let voters: Vec<NodeId> = if args.join {
        Vec::new()
    } else {
        args.peers.keys().copied().collect()
    };
    let mut config = NodeConfig::new(id, voters);
    config.trust_empty_storage = args.new_cluster;
    let max_entry = config.raft.max_entry_bytes as usize;
    if max_entry + client_proto::CLIENT_FRAME_OVERHEAD > client_proto::MAX_CLIENT_FRAME {
        return Err(format!(
            "node {id}: entries of {max_entry} bytes do not fit the client frame limit of {}",
            client_proto::MAX_CLIENT_FRAME
        ));
    }
    let raft_frame = tcp::frame_limit(&config.raft);

    let defaults = FileStorageOptions::default();
    let options = FileStorageOptions {
        cluster_id,
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
        info!(
            "node {id}: restored {} (taken from node {} at index {} term {}, {} bytes)",
            file.display(),
            info.node_id,
            info.meta.index,
            info.meta.term,
            info.size
        );
    }
    if let Some(cut) = &storage.recovery_report().damaged_tail {
        warn!(
            "node {id}: recovery mode cut the log at damaged synced data in {} at offset {}: \
             {}",
            cut.path.display(),
            cut.offset,
            cut.reason
        );
    }
    if let Some(loss) = raftkv::storage::Storage::tail_loss(&storage) {
        warn!(
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
    let recovery = storage.recovery_report().clone();

    // The address book: --peers, the cached records, then the replicated ones as they apply.
    let (machine, records) = members::BookMachine::new(KvStateMachine::default());
    let service = Arc::new(
        members::MemberService::new(
            id,
            members::Addrs {
                raft: raft_addr,
                client: Some(args.client),
            },
            args.peers.clone(),
            records,
            Some(args.data.join(members::CACHE_FILE)),
        )
        .map_err(|e| format!("node {id}: {e}"))?,
    );
    let book = service.book();
    let peers: HashMap<NodeId, SocketAddr> = book.iter().map(|(p, a)| (*p, a.raft)).collect();
    let peer_options = tcp::PeerOptions {
        cluster_id,
        my_id: id,
        secret: peer_secret,
        max_frame: raft_frame,
        incarnation,
        incarnations,
        listen: Some(raft_addr),
    };
    // An empty directory whose id a peer knows under another incarnation is a lost member:
    // it must recover before it votes, which --new-cluster would skip.
    let init = raftkv::storage::Storage::initial_state(&storage)
        .map_err(|e| format!("node {id}: cannot read the storage's state: {e}"))?;
    if raftkv::host::holds_nothing(&init) {
        if let Some((peer, known)) = identity::lost_member(&peer_options, &args.peers).await {
            if args.new_cluster {
                return Err(format!(
                    "node {id}: --new-cluster refused: node {peer} knows node {id} as \
                     incarnation {known:#x}, so this id was a member whose data directory was \
                     lost; start it without --new-cluster (it then recovers before it votes)"
                ));
            }
            info!(
                "node {id}: node {peer} knows this id as incarnation {known:#x}: this new data \
                 directory (incarnation {incarnation:#x}) replaces a lost one"
            );
        }
    }
    let transport = tcp::TcpTransport::with_options(peer_options.clone(), peers);
    let peer_book = transport.book();
    let (node, driver) = Node::start(config, storage, machine, transport)
        .map_err(|e| format!("node {id}: cannot start: {e}"))?;
    tokio::spawn(driver);

    let inbox = node.clone();
    let serve_options = tcp::ServeOptions {
        peer: peer_options.clone(),
        members: tcp::MemberSet::new(book.keys().copied()),
        learn: Some(peer_book.clone()),
    };
    // A joiner takes (and answers) any authenticated peer until it is a member: the leader
    // that adds it need not be in its --peers.
    let mut joining = args.join && !node.status().membership.contains(id);
    serve_options.members.set_open(joining);
    let listener_members = serve_options.members.clone();
    tokio::spawn(follow_book(
        id,
        service.clone(),
        peer_book,
        serve_options.members.clone(),
    ));
    tokio::spawn(tcp::serve(raft_listener, serve_options, move |m| {
        inbox.step(m)
    }));

    let status = node.status();
    let recovered = if status.raft.last_index == 0 && status.raft.term == 0 {
        "a new data directory".to_string()
    } else {
        format!(
            "recovered term {}, snapshot index {}, last log index {}, commit {} ({})",
            status.raft.term,
            status.raft.snapshot.index,
            status.raft.last_index,
            status.raft.commit_index,
            status
                .raft
                .vote
                .map_or("no vote in this term".to_string(), |v| format!(
                    "voted for node {v} in this term"
                )),
        )
    };
    info!(
        "node {id} of cluster {cluster_id:#x} ({cluster_how}), incarnation {incarnation:#x}{}: \
         raft on {raft_addr}, clients on {}, data in {}: {recovered}",
        if minted { " (new)" } else { "" },
        args.client,
        args.data.display(),
    );
    if let Some(torn) = &recovery.torn_tail {
        warn!(
            "node {id}: repaired a torn tail at open: {} bytes at offset {} of {}",
            torn.bytes,
            torn.offset,
            torn.path.display()
        );
    }
    if recovery.discarded_log {
        warn!("node {id}: the log did not continue the snapshot and was discarded at open");
    }
    if !recovery.removed_files.is_empty() {
        info!(
            "node {id}: removed {} leftover file(s) at open",
            recovery.removed_files.len()
        );
    }
    info!(
        "node {id}: limits: entries up to {max_entry} bytes, client frames up to {}, raft \
         frames up to {raft_frame}; peer auth {}, client auth {}",
        client_proto::MAX_CLIENT_FRAME,
        if peer_options.secret.is_set() {
            "on"
        } else {
            "off"
        },
        if client_secret.is_set() { "on" } else { "off" },
    );
    let client_options = client_proto::ClientServeOptions {
        cluster_id,
        secret: client_secret,
        members: Some(service.clone()),
        ..client_proto::ClientServeOptions::default()
    };
    let clients = tokio::spawn(client_proto::serve_clients_with(
        client_listener,
        node.clone(),
        client_options,
    ));

    // Run until killed, or until the node stops on a fatal error (a failed fsync, say).
    let mut disk_full = None;
    let mut rounds = 0u64;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        rounds += 1;
        if rounds.is_multiple_of(5) {
            // A leader makes sure its own record (with its client address) is stored.
            if let Err(e) = service.register_self(&node).await {
                warn!("node {id}: cannot store its own address record: {e}");
            }
        }
        let status = node.status();
        // Closed once it is a member and its address book has every other member (the
        // records are applied after the configuration entry is appended).
        if joining && status.membership.contains(id) {
            let book = service.book();
            if status
                .membership
                .members()
                .iter()
                .all(|m| book.contains_key(m))
            {
                joining = false;
                listener_members.set_open(false);
                info!("node {id}: a member now; takes peer connections from members only");
            }
        }
        if status.disk_full != disk_full {
            match &status.disk_full {
                Some(why) => warn!("node {id}: disk full, writes refused: {why}"),
                None => info!("node {id}: disk space is back, writes resume"),
            }
            disk_full = status.disk_full.clone();
        }
        if !status.running {
            clients.abort();
            return Err(format!(
                "node {id}: stopped: {}",
                status.fatal_error.as_deref().unwrap_or("no reason given")
            ));
        }
    }
}

/// Keeps the transport's peers and the listener's members equal to the address book, as
/// replicated records arrive (and the cache with them).
async fn follow_book(
    id: NodeId,
    service: Arc<members::MemberService>,
    peers: tcp::PeerBook,
    listener: tcp::MemberSet,
) {
    let mut changes = service.subscribe();
    loop {
        if let Err(e) = service.sync() {
            warn!("node {id}: {e}");
        }
        let book = service.book();
        for (peer, addrs) in &book {
            if *peer != id && peers.set(*peer, addrs.raft) {
                info!("node {id}: member {peer} at {} (raft)", addrs.raft);
            }
            listener.insert(*peer);
        }
        for peer in peers.peers().keys().filter(|p| !book.contains_key(p)) {
            peers.remove(*peer);
            info!("node {id}: member {peer} removed from the address book");
        }
        for peer in listener.ids().into_iter().filter(|p| !book.contains_key(p)) {
            listener.remove(peer);
        }
        if changes.changed().await.is_err() {
            return; // the node stopped
        }
    }
}
