//! Who a demo node is: its cluster's id and its own incarnation, both kept in its data
//! directory, and how a new directory gets them.
//!
//! Included by `node.rs` (`#[path = "common/identity.rs"] mod identity;`; it uses the
//! crate's `tcp` and `client_proto` modules).
//!
//! # Files in the data directory
//! - `cluster-id`: the cluster's id, decimal. Written once (atomically, synced), then only
//!   checked: a `--cluster-id` that differs from it is refused.
//! - `incarnation`: this directory's incarnation ([`tcp::incarnations::mint`]), minted with
//!   the directory. A directory written before incarnations existed gets one at its next
//!   start.
//! - `incarnations-seen`: the newest incarnation seen of every peer
//!   ([`tcp::incarnations`]), so a peer running on a replaced directory stays refused across
//!   this node's restarts.
//!
//! # A new cluster's id
//! Random, minted by exactly one node: the lowest id of `--peers`. A node whose directory has
//! no id (and no `--cluster-id`) answers challenges on its Raft port with cluster 0 ("none
//! yet") while it asks every other peer for theirs, every [`ASK_EVERY`]:
//! - if a peer names an id, that is the cluster's (a restart after a lost disk, a node
//!   started late, a joiner): it is taken (peers that disagree are an error);
//! - else the lowest id mints one once **every** other peer has answered "none yet" (so no
//!   peer can hold an id it missed), or at once with `--new-cluster` (the operator says the
//!   cluster is new); `--join` never mints;
//! - else it waits, and says for what.
//!
//! So a wiped lowest-id node never mints a second id while any member that has the first
//! answers, and a new cluster forms once its lowest-id member is up (or all are). A new
//! cluster that must form without its lowest-id member is given `--cluster-id` on every node.
//!
//! # A lost member
//! A node starting on an empty directory asks the peers that answered with its cluster
//! ([`lost_member`]) which incarnation of its id they know. One that knows another is proof
//! the id was a member under a lost directory: the node then must not trust its empty
//! storage (it recovers as a lost disk, see the library's `NodeConfig::trust_empty_storage`),
//! so `--new-cluster` is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use raftkv::raft::NodeId;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::client_proto::members::write_atomically;
use crate::tcp::{self, incarnations};

/// The cluster id file.
pub const CLUSTER_ID_FILE: &str = "cluster-id";
/// This directory's incarnation.
pub const INCARNATION_FILE: &str = "incarnation";
/// The newest incarnation seen of every peer.
pub const SEEN_FILE: &str = "incarnations-seen";
/// How often a node without a cluster id asks its peers.
pub const ASK_EVERY: Duration = Duration::from_millis(200);
/// How often it says what it waits for.
const SAY_EVERY: Duration = Duration::from_secs(5);

fn read_number(path: &Path) -> Result<Option<u64>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse::<u64>().map(Some).map_err(|_| {
            format!(
                "{} does not hold a number (`{}`)",
                path.display(),
                text.trim()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn write_number(path: &Path, n: u64) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    write_atomically(path, format!("{n}\n").as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// This directory's incarnation, minted (and stored) if it has none; with whether it was
/// minted now.
pub fn incarnation(data: &Path) -> Result<(u64, bool), String> {
    let path = data.join(INCARNATION_FILE);
    if let Some(n) = read_number(&path)? {
        if n == 0 {
            return Err(format!("{}: incarnation 0 is reserved", path.display()));
        }
        return Ok((n, false));
    }
    let n = incarnations::mint().map_err(|e| format!("cannot mint an incarnation: {e}"))?;
    write_number(&path, n)?;
    Ok((n, true))
}

/// The table of peers' incarnations, loaded from the directory and stored there on change.
pub fn seen_table(data: &Path) -> Result<incarnations::Incarnations, String> {
    let path = data.join(SEEN_FILE);
    let seen = match std::fs::read_to_string(&path) {
        Ok(text) => incarnations::decode(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(incarnations::Incarnations::with_store(
        seen,
        Some(Box::new(move |seen| {
            write_atomically(&path, incarnations::encode(seen).as_bytes())
        })),
    ))
}

/// The cluster id in the headers of the log's files in `dir`, if there are any.
pub fn existing_files_cluster(dir: &Path) -> Option<u64> {
    let found = raftkv::storage::file::inspect::inspect(dir).ok()?;
    found
        .segments
        .iter()
        .filter_map(|s| s.identity)
        .chain(found.snapshots.iter().filter_map(|s| s.identity))
        .map(|(cluster, _node)| cluster)
        .next()
}

/// What a node brings to finding its cluster's id.
pub struct Bootstrap<'a> {
    /// This node.
    pub id: NodeId,
    /// `--peers` (this node included).
    pub peers: &'a BTreeMap<NodeId, SocketAddr>,
    /// `--cluster-id`.
    pub given: Option<u64>,
    /// `--join`: never mint.
    pub join: bool,
    /// `--new-cluster`: the lowest id mints without waiting for every peer.
    pub new_cluster: bool,
    /// This node's incarnation.
    pub incarnation: u64,
}

/// The cluster id of the node with data directory `data`, with how it was found: the one
/// stored there (which `--cluster-id` must match), else the one its log's files carry, else
/// `--cluster-id`, else learned from the peers or minted (module docs), answering on
/// `listener` meanwhile. Stored in the directory for the next start.
pub async fn cluster_id(
    data: &Path,
    boot: &Bootstrap<'_>,
    listener: &TcpListener,
) -> Result<(u64, String), String> {
    let path = data.join(CLUSTER_ID_FILE);
    let stored = read_number(&path)?;
    let found = match stored {
        Some(id) => Some((id, "stored in the data directory".to_string())),
        None => existing_files_cluster(data).map(|id| (id, "read from the log's files".into())),
    };
    let (id, how) = match (found, boot.given) {
        (Some((id, _)), Some(given)) if given != id => {
            return Err(format!(
                "--cluster-id {given} does not match the data directory {}, which belongs to \
                 cluster {id}",
                data.display()
            ))
        }
        (Some(found), _) => found,
        (None, Some(given)) => (given, "given by --cluster-id".into()),
        (None, None) => {
            tokio::select! {
                found = negotiate(boot) => found?,
                () = tcp::answer_waiting(listener, boot.id, boot.incarnation) => {
                    unreachable!("answer_waiting runs until dropped")
                }
            }
        }
    };
    if stored.is_none() {
        write_number(&path, id)?;
    }
    Ok((id, how))
}

/// What one round of asking found.
#[derive(Default)]
struct Round {
    /// Peers that named an id, by id.
    ids: BTreeMap<u64, Vec<NodeId>>,
    /// Peers that answered "none yet".
    waiting: BTreeSet<NodeId>,
    /// Peers that did not answer as themselves, and why.
    silent: BTreeMap<NodeId, String>,
}

async fn ask(boot: &Bootstrap<'_>) -> Round {
    let mut round = Round::default();
    for (&peer, &addr) in boot.peers.iter().filter(|(p, _)| **p != boot.id) {
        match tcp::cluster_of(addr).await {
            Ok((0, node)) if node == peer => {
                round.waiting.insert(peer);
            }
            Ok((cluster, node)) if node == peer => round.ids.entry(cluster).or_default().push(peer),
            Ok((_, node)) => {
                round
                    .silent
                    .insert(peer, format!("{addr} is node {node}, not node {peer}"));
            }
            Err(e) => {
                round.silent.insert(peer, e);
            }
        }
    }
    round
}

/// Learns the cluster's id from the peers, or mints it (module docs).
async fn negotiate(boot: &Bootstrap<'_>) -> Result<(u64, String), String> {
    let lowest = boot.peers.keys().next().copied() == Some(boot.id);
    let others = boot.peers.len() - 1;
    let mut said: Option<Instant> = None;
    loop {
        let round = ask(boot).await;
        match round.ids.len() {
            0 => {}
            1 => {
                let (id, from) = round.ids.iter().next().expect("one");
                return Ok((*id, format!("learned from node(s) {from:?}")));
            }
            _ => {
                return Err(format!(
                    "the peers name different cluster ids ({:?}): --peers mixes clusters",
                    round.ids
                ))
            }
        }
        if lowest && !boot.join && (boot.new_cluster || round.waiting.len() == others) {
            let id = mint_cluster_id()?;
            return Ok((id, "minted for a new cluster".into()));
        }
        if said.is_none_or(|t| t.elapsed() >= SAY_EVERY) {
            let first = boot.peers.keys().next().copied().unwrap_or(boot.id);
            let what = if lowest && !boot.join {
                format!(
                    "every peer's answer before minting a new cluster id (no answer from {:?}; \
                     --new-cluster mints at once, --cluster-id gives one)",
                    round.silent
                )
            } else {
                format!(
                    "a cluster id from a peer (node {first} mints a new cluster's); no answer \
                     from {:?}, none yet from {:?}",
                    round.silent, round.waiting
                )
            };
            info!("node {}: waiting for {what}", boot.id);
            said = Some(Instant::now());
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}

/// A random cluster id (never 0).
fn mint_cluster_id() -> Result<u64, String> {
    let n = tcp::guard::random_u64().map_err(|e| format!("cannot mint a cluster id: {e}"))?;
    Ok(n.max(1))
}

/// For a node starting on an empty directory: the first peer of `options`' cluster that knows
/// another incarnation of this node's id, with that incarnation (module docs). Peers that do
/// not answer, or refuse, are skipped: this finds a lost member when it can, and proves
/// nothing when it finds none.
pub async fn lost_member(
    options: &tcp::PeerOptions,
    peers: &BTreeMap<NodeId, SocketAddr>,
) -> Option<(NodeId, u64)> {
    for (&peer, &addr) in peers.iter().filter(|(p, _)| **p != options.my_id) {
        match tcp::probe(addr, options, peer).await {
            Ok(p) if p.known != 0 && p.known != options.incarnation => {
                return Some((peer, p.known))
            }
            Ok(_) => {}
            // A peer still waiting for its cluster id is new itself: it knows no one.
            Err(tcp::DialError::Handshake(_, Some(c))) if c.cluster == 0 => {}
            Err(e) => warn!(
                "node {}: could not ask node {peer} whether it knew this id: {e}",
                options.my_id
            ),
        }
    }
    None
}
