//! Raft traffic over TCP with tokio: [`TcpTransport`] sends a node's messages to its peers,
//! [`serve`] accepts its peers' connections and hands their messages to the node.
//!
//! Shared by the examples and tests; include it with
//! `#[path = "common/tcp.rs"] mod tcp;` (it is not part of the library, which stays
//! runtime-agnostic: it only provides the [`raftkv::wire`] codec used here).
//!
//! # Connections
//! Each node dials every peer once and only writes on that connection; it receives on the
//! connections its peers dialed to it. A connection starts with the handshake of
//! [`guard`] (the listener's challenge, the dialer's hello naming its cluster, itself and the
//! node it means, with an HMAC proof of the shared secret if there is one, and the listener's
//! answer), then carries [`raftkv::wire`] frames: a [`Frame::Hello`] naming the dialer, then
//! [`Frame::Messages`] batches; an empty batch every [`KEEPALIVE`] keeps an idle link open.
//!
//! # Incarnations
//! Both sides of a handshake name their incarnation (the id of their data directory), and
//! each node keeps the newest it has seen of every peer id ([`incarnations`]): a peer whose
//! incarnation is older than that record runs on a replaced directory and is refused, as a
//! dialer ([`Refusal::RetiredIncarnation`]) and as a listener ([`DialError::Retired`]); a
//! newer one is taken and logged as a replaced directory.
//!
//! # Members
//! The peers are not fixed: the host adds, moves and removes them while the node runs
//! ([`TcpTransport::book`] for the peers dialed, [`ServeOptions::members`] for the ids whose
//! connections are taken), as the cluster's membership changes. A peer removed from the
//! transport has its queue closed, which ends its connection task; an id removed from the
//! listener's set is refused from then on and its open connection is closed at its next
//! read.
//!
//! # Limits
//! - Per peer, at most [`QUEUE_BATCHES`] batches wait to be written; when the queue is full the
//!   newest batch is dropped and counted (Raft resends what matters).
//! - Reconnection backs off exponentially from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], starting
//!   over only after a connection that lasted [`HEALTHY_CONNECTION`]; connecting, the
//!   handshake and writing each have a timeout, after which the connection is dropped and
//!   redialed.
//! - A batch that does not fit a frame of `max_frame` bytes is split; a single message that
//!   does not fit is dropped and logged. Give both sides the same `max_frame`, at least
//!   [`frame_limit`] of the Raft configuration (so every message the core sends fits).
//! - [`serve`] keeps at most [`MAX_HANDSHAKING`] connections in the handshake (a newcomer
//!   evicts the oldest), which must finish within [`HANDSHAKE_TIMEOUT`], and one connection
//!   per member of the cluster: a peer that reconnects replaces its old connection; ids that
//!   are not members are refused. An authenticated connection silent for [`PEER_IDLE_TIMEOUT`],
//!   or whose frame takes longer than its deadline (5 s plus 1 s per MiB) to arrive, is closed.
//!   So the bytes it buffers are bounded by the number of members times the frame limit.
//! - Any handshake, decode or protocol error closes that connection only, logged (at most 10
//!   such lines per 10 s; the rest are counted) with the peer's address.

// Its own copy in each of tcp.rs and client_proto.rs, so that a program includes only the
// file it needs; node.rs includes both, which clippy notices.
#[allow(clippy::duplicate_mod)]
#[path = "guard.rs"]
pub mod guard;
#[path = "incarnations.rs"]
pub mod incarnations;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use guard::{HandshakeError, LogLimiter, Port, Refusal, Secret, SlotState, Slots};
use parking_lot::RwLock;
use raftkv::error::TransportError;
use raftkv::raft::{Message, NodeId};
use raftkv::transport::Transport;
use raftkv::wire::{self, Frame, FrameDecoder, WireError, LENGTH_PREFIX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};
use tracing::{info, warn};

/// Batches queued per peer at most.
pub const QUEUE_BATCHES: usize = 1024;
/// First reconnection delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Largest reconnection delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing one frame may take before the connection is considered dead.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that lived this long resets the reconnection backoff.
pub const HEALTHY_CONNECTION: Duration = Duration::from_secs(1);
/// How long an accepted connection has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections [`serve`] keeps in the handshake at most (a newcomer evicts the oldest).
pub const MAX_HANDSHAKING: usize = 32;
/// An idle link sends an empty batch this often.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// An authenticated connection that sends nothing for this long is closed.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The base of a frame's deadline (plus one second per MiB of it).
pub const FRAME_BASE_TIME: Duration = Duration::from_secs(5);
/// Bytes a frame needs around one message: length prefix, version, cluster id and checksum
/// (17), the frame's tag and the batch's length (at most 6), rounded up.
pub const RAFT_FRAME_OVERHEAD: usize = 64;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// The frame limit for a node with Raft configuration `config`: its largest message
/// ([`Config::max_message_bytes`](raftkv::raft::Config::max_message_bytes)) plus the framing.
pub fn frame_limit(config: &raftkv::raft::Config) -> usize {
    usize::try_from(config.max_message_bytes())
        .unwrap_or(usize::MAX)
        .saturating_add(RAFT_FRAME_OVERHEAD)
}

/// Counters of one peer's outgoing link.
#[derive(Debug, Default)]
struct PeerCounters {
    connected: AtomicBool,
    dials: AtomicU64,
    connects: AtomicU64,
    dropped: AtomicU64,
    batches_sent: AtomicU64,
}

/// A point-in-time copy of one peer link's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStats {
    /// A connection to the peer is up.
    pub connected: bool,
    /// Connections established so far, handshake done (more than one means it reconnected).
    pub connects: u64,
    /// TCP connections opened so far, including those whose handshake failed.
    pub dials: u64,
    /// Batches dropped because the queue was full.
    pub dropped: u64,
    /// Batches written to a connection.
    pub batches_sent: u64,
}

/// The counters of every peer link of a [`TcpTransport`]; stays valid after the transport
/// moved into a node, and follows peers added and removed through its [`PeerBook`].
#[derive(Clone, Debug, Default)]
pub struct TransportStats(Arc<RwLock<HashMap<NodeId, Arc<PeerCounters>>>>);

impl TransportStats {
    /// The counters of the link to `peer`, if it is one of the transport's peers.
    pub fn peer(&self, peer: NodeId) -> Option<PeerStats> {
        let links = self.0.read();
        let c = links.get(&peer)?;
        Some(PeerStats {
            connected: c.connected.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            dials: c.dials.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            batches_sent: c.batches_sent.load(Ordering::Relaxed),
        })
    }
}

struct PeerLink {
    addr: SocketAddr,
    queue: mpsc::Sender<Vec<Message>>,
    counters: Arc<PeerCounters>,
}

/// The peers of one transport: each one's address and link. Invariant: the transport's own
/// id is never a peer; `stats` holds exactly the counters of `links`.
struct Links {
    options: Arc<PeerOptions>,
    links: RwLock<HashMap<NodeId, PeerLink>>,
    stats: TransportStats,
}

impl Links {
    /// Dials `peer` at `addr` from now on: a new link, or a replaced one if its address
    /// changed (the old link's task ends with its queue). Returns whether anything changed.
    fn set(&self, peer: NodeId, addr: SocketAddr) -> bool {
        if peer == self.options.my_id {
            return false;
        }
        let mut links = self.links.write();
        if links.get(&peer).is_some_and(|l| l.addr == addr) {
            return false;
        }
        let (queue, rx) = mpsc::channel(QUEUE_BATCHES);
        let counters = Arc::new(PeerCounters::default());
        let link = Link {
            options: self.options.clone(),
            peer,
            addr,
            counters: counters.clone(),
        };
        tokio::spawn(link.run(rx));
        self.stats.0.write().insert(peer, counters.clone());
        links.insert(
            peer,
            PeerLink {
                addr,
                queue,
                counters,
            },
        );
        true
    }

    /// Stops dialing `peer`: its queue closes, which ends its connection task. Returns
    /// whether it was a peer.
    fn remove(&self, peer: NodeId) -> bool {
        let removed = self.links.write().remove(&peer).is_some();
        self.stats.0.write().remove(&peer);
        removed
    }
}

/// A [`Transport`] over TCP: one bounded queue and one connection task per peer.
///
/// Peers can be added, moved and removed while it runs, through [`TcpTransport::book`].
/// Dropping the transport (which the node's driver does when the node shuts down) ends the
/// connection tasks.
pub struct TcpTransport {
    links: Arc<Links>,
}

/// A handle on a [`TcpTransport`]'s peers, for the host to change them at run time (a member
/// added or removed). It does not keep the transport alive: once the transport is dropped
/// its changes do nothing.
#[derive(Clone)]
pub struct PeerBook(Weak<Links>);

impl fmt::Debug for PeerBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PeerBook").field(&self.peers()).finish()
    }
}

impl PeerBook {
    /// Dials `peer` at `addr` from now on (replacing its old address, if it had one).
    /// Returns whether anything changed.
    pub fn set(&self, peer: NodeId, addr: SocketAddr) -> bool {
        self.0.upgrade().is_some_and(|l| l.set(peer, addr))
    }

    /// Stops sending to `peer` and closes its connection. Returns whether it was a peer.
    pub fn remove(&self, peer: NodeId) -> bool {
        self.0.upgrade().is_some_and(|l| l.remove(peer))
    }

    /// The peers and their addresses (empty once the transport is dropped).
    pub fn peers(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.0.upgrade().map_or_else(BTreeMap::new, |l| {
            l.links.read().iter().map(|(id, l)| (*id, l.addr)).collect()
        })
    }
}

/// Who a node is on the peer port: its cluster, its id, the shared secret, and the frame
/// limit it keeps to (when sending) and enforces (when receiving).
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// The cluster.
    pub cluster_id: u64,
    /// This node.
    pub my_id: NodeId,
    /// The peers' shared secret ([`Secret::none`] for none).
    pub secret: Secret,
    /// The largest frame body, in bytes (see [`frame_limit`]).
    pub max_frame: usize,
    /// This node's incarnation: the id of its data directory ([`incarnations::mint`]).
    pub incarnation: u64,
    /// The newest incarnation seen of each peer (shared with the listener's options).
    pub incarnations: incarnations::Incarnations,
    /// This node's Raft address, named in its hellos (see [`ServeOptions::learn`]).
    pub listen: Option<SocketAddr>,
}

impl PeerOptions {
    /// Node `my_id` of cluster `cluster_id`, no secret, frames up to
    /// [`wire::DEFAULT_MAX_FRAME`], incarnation 1 and an empty table of peers' incarnations
    /// kept in memory. Incarnation 1 is the same for every process of `my_id`: a host with a
    /// data directory sets the directory's ([`incarnations::mint`]) to tell directories
    /// apart.
    pub fn new(cluster_id: u64, my_id: NodeId) -> Self {
        PeerOptions {
            cluster_id,
            my_id,
            secret: Secret::none(),
            max_frame: wire::DEFAULT_MAX_FRAME,
            incarnation: 1,
            incarnations: incarnations::Incarnations::in_memory(),
            listen: None,
        }
    }
}

/// Applies the incarnation rule to `peer` presenting `incarnation` (storing a changed record
/// off the async threads), logging a replaced directory.
async fn observe_incarnation(
    table: &incarnations::Incarnations,
    peer: NodeId,
    incarnation: u64,
) -> Result<(), incarnations::Observed> {
    let t = table.clone();
    let seen = tokio::task::spawn_blocking(move || t.observe(peer, incarnation))
        .await
        .unwrap_or_else(|e| Err(incarnations::Observed::NotStored(e.to_string())))?;
    if let incarnations::Seen::Replaced { was } = seen {
        warn!(
            "node {peer} is a new incarnation {incarnation:#x} (was {was:#x}): its data \
             directory was replaced; the older one is refused from now on"
        );
    }
    Ok(())
}

impl TcpTransport {
    /// A transport for node `my_id` of cluster `cluster_id`, dialing `peers` (its own id, if
    /// present, is ignored), with no secret and frames kept within [`wire::DEFAULT_MAX_FRAME`].
    ///
    /// Spawns one task per peer: call it from within a tokio runtime (like `tokio::spawn`, it
    /// panics otherwise).
    pub fn new(cluster_id: u64, my_id: NodeId, peers: HashMap<NodeId, SocketAddr>) -> Self {
        Self::with_options(PeerOptions::new(cluster_id, my_id), peers)
    }

    /// Like [`TcpTransport::new`], with `options`.
    pub fn with_options(options: PeerOptions, peers: HashMap<NodeId, SocketAddr>) -> Self {
        let links = Arc::new(Links {
            options: Arc::new(options),
            links: RwLock::default(),
            stats: TransportStats::default(),
        });
        for (peer, addr) in peers {
            links.set(peer, addr);
        }
        TcpTransport { links }
    }

    /// A handle on the per-peer counters.
    pub fn stats(&self) -> TransportStats {
        self.links.stats.clone()
    }

    /// A handle to add and remove peers while the transport runs.
    pub fn book(&self) -> PeerBook {
        PeerBook(Arc::downgrade(&self.links))
    }
}

#[async_trait]
impl Transport for TcpTransport {
    async fn send(&self, to: NodeId, messages: Vec<Message>) -> Result<(), TransportError> {
        let links = self.links.links.read();
        let link = links.get(&to).ok_or(TransportError::UnknownPeer(to))?;
        match link.queue.try_send(messages) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                link.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Err(TransportError::Unreachable {
                    peer: to,
                    reason: "send queue full".into(),
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TransportError::Unreachable {
                peer: to,
                reason: "connection task stopped".into(),
            }),
        }
    }
}

/// Why dialing a peer failed.
#[derive(Debug)]
pub enum DialError {
    /// No TCP connection (refused, unreachable, timed out).
    Connect(String),
    /// Connected, but the handshake failed; the listener's challenge, if it sent one.
    Handshake(HandshakeError, Option<guard::Challenge>),
    /// The listener runs on a data directory older than one this node has seen of its id
    /// (or its newer incarnation could not be recorded).
    Retired(incarnations::Observed, guard::Challenge),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Connect(why) => write!(f, "{why}"),
            DialError::Handshake(e, Some(c)) => {
                write!(f, "{e} (it is node {} of cluster {:#x})", c.node, c.cluster)
            }
            DialError::Handshake(e, None) => write!(f, "{e}"),
            DialError::Retired(why, c) => write!(
                f,
                "node {} (incarnation {:#x}) refused: {why}",
                c.node, c.incarnation
            ),
        }
    }
}

/// Connects to node `to` at `addr`, completes the handshake as node `options.my_id` and
/// applies the incarnation rule to the listener, then writes the [`Frame::Hello`]: the
/// stream is ready for [`Frame::Messages`].
pub async fn dial(
    addr: SocketAddr,
    options: &PeerOptions,
    to: NodeId,
) -> Result<TcpStream, DialError> {
    let (mut stream, c, _known) = shake_hands(addr, options, to).await?;
    let frame = wire::encode(
        options.cluster_id,
        &Frame::Hello {
            from: options.my_id,
        },
    )
    .map_err(|e| DialError::Handshake(HandshakeError::Io(std::io::Error::other(e)), Some(c)))?;
    match timeout(WRITE_TIMEOUT, stream.write_all(&frame)).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(e)) => Err(DialError::Handshake(HandshakeError::Io(e), Some(c))),
        Err(_) => Err(DialError::Handshake(timed_out("the hello frame"), Some(c))),
    }
}

/// What a listener told a [`probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probed {
    /// The listener's cluster.
    pub cluster: u64,
    /// The listener's incarnation.
    pub incarnation: u64,
    /// The incarnation the listener last saw of our node id (0 if none).
    pub known: u64,
}

/// The handshake of [`dial`] alone, to learn what node `to` knows of us: a host about to
/// start on a new data directory asks so whether its id was a member under another one.
pub async fn probe(
    addr: SocketAddr,
    options: &PeerOptions,
    to: NodeId,
) -> Result<Probed, DialError> {
    let (_stream, c, known) = shake_hands(addr, options, to).await?;
    Ok(Probed {
        cluster: c.cluster,
        incarnation: c.incarnation,
        known,
    })
}

fn timed_out(what: &str) -> HandshakeError {
    HandshakeError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no progress within {HANDSHAKE_TIMEOUT:?}"),
    ))
}

/// Connects and shakes hands; returns the stream, the listener's challenge and the `known`
/// of its answer, once the listener's incarnation passed the rule.
async fn shake_hands(
    addr: SocketAddr,
    options: &PeerOptions,
    to: NodeId,
) -> Result<(TcpStream, guard::Challenge, u64), DialError> {
    let mut stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(DialError::Connect(e.to_string())),
        Err(_) => return Err(DialError::Connect("connect timed out".into())),
    };
    let _ = stream.set_nodelay(true);
    let mut challenge = None;
    let handshake = async {
        let c = guard::read_challenge(&mut stream, Port::Peer).await?;
        challenge = Some(c);
        let me = guard::Hello::peer(
            options.cluster_id,
            options.my_id,
            to,
            options.incarnation,
            options.listen,
        );
        let hello = guard::make_hello(Port::Peer, &options.secret, &c, me)?;
        stream
            .write_all(&guard::hello_bytes(Port::Peer, &hello))
            .await?;
        guard::read_answer(&mut stream, Port::Peer, &options.secret, &c, &hello).await
    };
    let (c, known) = match timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(known)) => (challenge.expect("read before the answer"), known),
        Ok(Err(e)) => return Err(DialError::Handshake(e, challenge)),
        Err(_) => return Err(DialError::Handshake(timed_out("the handshake"), challenge)),
    };
    // The answer's proof covers the challenge's incarnation: it is the listener's.
    observe_incarnation(&options.incarnations, to, c.incarnation)
        .await
        .map_err(|why| DialError::Retired(why, c))?;
    Ok((stream, c, known))
}

/// The cluster id and node id the Raft listener at `addr` names in its challenge (the
/// handshake's first bytes; nothing is proven, so trust it as far as the address). A new
/// node learns its cluster's id so; cluster 0 is a node that is itself waiting for one
/// ([`answer_waiting`]).
pub async fn cluster_of(addr: SocketAddr) -> Result<(u64, NodeId), String> {
    let ask = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let c = guard::read_challenge(&mut stream, Port::Peer)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok((c.cluster, c.node))
    };
    match timeout(HANDSHAKE_TIMEOUT, ask).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("{addr}: no challenge within {HANDSHAKE_TIMEOUT:?}")),
    }
}

/// Answers every connection on `listener` with a challenge naming cluster 0 (no cluster id
/// yet), node `my_id` and `incarnation`, then closes it: what a new node's Raft port says
/// while it waits to learn (or mint) its cluster's id. Runs until dropped.
pub async fn answer_waiting(listener: &TcpListener, my_id: NodeId, incarnation: u64) {
    let mut answering = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    answering.spawn(async move {
                        let say = guard::send_challenge(&mut stream, Port::Peer, 0, my_id, incarnation);
                        let _ = timeout(HANDSHAKE_TIMEOUT, say).await;
                    });
                }
                Err(_) => sleep(Duration::from_millis(100)).await,
            },
            Some(_) = answering.join_next(), if !answering.is_empty() => {}
        }
    }
}

/// Everything one peer's connection task needs.
struct Link {
    options: Arc<PeerOptions>,
    peer: NodeId,
    addr: SocketAddr,
    counters: Arc<PeerCounters>,
}

/// How a connection ended.
enum Ended {
    /// The transport was dropped: stop for good.
    TransportClosed,
    /// The connection failed; redial.
    Lost(String),
}

impl Link {
    /// Dials (with backoff), shakes hands, then writes queued batches until the connection
    /// fails (redial) or the queue closes (stop).
    async fn run(self, mut queue: mpsc::Receiver<Vec<Message>>) {
        let keepalive = match wire::encode(self.options.cluster_id, &Frame::Messages(Vec::new())) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(peer = self.peer, "cannot encode a keepalive: {e}");
                return;
            }
        };
        let mut backoff = BACKOFF_MIN;
        // Log the first failure of a series only, and again when its kind changes (an
        // unreachable peer that comes back refusing us, say).
        let mut quiet = false;
        let mut last_kind = None;
        loop {
            if queue.is_closed() {
                return;
            }
            let connected_at = Instant::now();
            let dialed = dial(self.addr, &self.options, self.peer).await;
            if !matches!(dialed, Err(DialError::Connect(_))) {
                self.counters.dials.fetch_add(1, Ordering::Relaxed);
            }
            let stream = match dialed {
                Ok(stream) => stream,
                Err(e) => {
                    let kind = std::mem::discriminant(&e);
                    if !quiet || last_kind != Some(kind) {
                        last_kind = Some(kind);
                        match &e {
                            DialError::Connect(_) => warn!(
                                "node {} at {} unreachable ({e}); retrying with backoff",
                                self.peer, self.addr
                            ),
                            DialError::Handshake(_, Some(c)) if c.cluster == 0 => info!(
                                "node {} at {} has no cluster id yet (it is starting); \
                                 retrying with backoff",
                                self.peer, self.addr
                            ),
                            DialError::Handshake(..) | DialError::Retired(..) => warn!(
                                "node {} at {} refused this node (of cluster {:#x}) or could \
                                 not be verified: {e}; retrying with backoff",
                                self.peer, self.addr, self.options.cluster_id
                            ),
                        }
                        quiet = true;
                    }
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            if quiet {
                // After a logged failure or loss (a loss always sets `quiet` again).
                info!("connected to node {} at {}", self.peer, self.addr);
            }
            last_kind = None;
            self.counters.connects.fetch_add(1, Ordering::Relaxed);
            self.counters.connected.store(true, Ordering::Relaxed);
            let ended = self.pump(stream, &keepalive, &mut queue).await;
            self.counters.connected.store(false, Ordering::Relaxed);
            match ended {
                Ended::TransportClosed => return,
                Ended::Lost(why) => {
                    warn!(
                        "connection to node {} at {} lost: {why}",
                        self.peer, self.addr
                    );
                    quiet = true;
                }
            }
            // A connection that lasted was healthy: start the backoff over. One the peer
            // closes at once (another cluster's listener, say) keeps backing off.
            if connected_at.elapsed() >= HEALTHY_CONNECTION {
                backoff = BACKOFF_MIN;
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs one connection: batches, and a keepalive when there were none for a while. Also
    /// watches the read side, so that a peer closing the connection is noticed at once rather
    /// than at the next failed write.
    async fn pump(
        &self,
        stream: TcpStream,
        keepalive: &[u8],
        queue: &mut mpsc::Receiver<Vec<Message>>,
    ) -> Ended {
        let (mut reader, mut writer) = stream.into_split();
        let mut probe = [0u8; 64];
        loop {
            tokio::select! {
                batch = timeout(KEEPALIVE, queue.recv()) => {
                    let batch = match batch {
                        Err(_) => {
                            if let Err(why) = write_with_timeout(&mut writer, keepalive).await {
                                return Ended::Lost(why);
                            }
                            continue;
                        }
                        Ok(None) => return Ended::TransportClosed,
                        Ok(Some(batch)) => batch,
                    };
                    let mut frames = Vec::new();
                    encode_batch(
                        self.options.cluster_id,
                        batch,
                        self.options.max_frame,
                        &mut frames,
                    );
                    for frame in frames {
                        if let Err(why) = write_with_timeout(&mut writer, &frame).await {
                            return Ended::Lost(why);
                        }
                    }
                    self.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
                }
                read = reader.read(&mut probe) => {
                    // The receiver never writes after the handshake: any outcome means the
                    // connection is over.
                    return Ended::Lost(match read {
                        Ok(0) => "closed by the peer".to_string(),
                        Ok(_) => "the peer sent unexpected bytes".to_string(),
                        Err(e) => e.to_string(),
                    });
                }
            }
        }
    }
}

async fn write_with_timeout(writer: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), String> {
    match timeout(WRITE_TIMEOUT, writer.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("write stalled for {WRITE_TIMEOUT:?}")),
    }
}

/// Encodes `batch` into one frame, or several if it does not fit `max_frame` (halving it until
/// it does); a single message too large for a frame is dropped and logged.
fn encode_batch(cluster_id: u64, batch: Vec<Message>, max_frame: usize, out: &mut Vec<Vec<u8>>) {
    let frame = Frame::Messages(batch);
    match wire::encode(cluster_id, &frame) {
        Ok(bytes) if bytes.len() - LENGTH_PREFIX <= max_frame => {
            out.push(bytes);
            return;
        }
        Ok(_) | Err(WireError::TooLarge { .. }) => {}
        Err(e) => {
            warn!("dropping a batch that cannot be encoded: {e}");
            return;
        }
    }
    let Frame::Messages(mut batch) = frame else {
        return;
    };
    if batch.len() <= 1 {
        warn!(
            "dropping a message larger than the {max_frame}-byte frame limit: {:?}",
            batch.first().map(|m| (m.from, m.to, m.term))
        );
        return;
    }
    let tail = batch.split_off(batch.len() / 2);
    encode_batch(cluster_id, batch, max_frame, out);
    encode_batch(cluster_id, tail, max_frame, out);
}

/// Why [`serve`] closed a connection.
#[derive(Debug)]
enum Refused {
    Wire(WireError),
    Io(std::io::Error),
    Protocol(&'static str),
    Handshake(HandshakeError),
    /// The dialer's hello was refused; what it claimed.
    Peer {
        why: Refusal,
        hello: guard::Hello,
        ours: u64,
    },
    Idle,
    TooSlow,
    /// This node failed (it could not store a peer's incarnation).
    Local(String),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Wire(e) => write!(f, "{e}"),
            Refused::Io(e) => write!(f, "io: {e}"),
            Refused::Protocol(what) => write!(f, "protocol: {what}"),
            Refused::Handshake(e) => write!(f, "{e}"),
            Refused::Peer { why, hello, ours } => write!(
                f,
                "refused peer: {why} (it says it is node {} incarnation {:#x} of cluster {:#x}, \
                 dialing node {}; this node is in cluster {ours:#x})",
                hello.from, hello.incarnation, hello.cluster, hello.to
            ),
            Refused::Idle => write!(f, "silent for {PEER_IDLE_TIMEOUT:?}"),
            Refused::TooSlow => write!(f, "a frame took longer than its deadline"),
            Refused::Local(why) => write!(f, "{why}"),
        }
    }
}

/// The ids [`serve`] takes connections from, shared with the host so that it can change
/// them while the listener runs (clones share one set). An *open* set takes any id (see
/// [`MemberSet::set_open`]).
#[derive(Clone, Debug, Default)]
pub struct MemberSet {
    ids: Arc<RwLock<BTreeSet<NodeId>>>,
    open: Arc<AtomicBool>,
}

impl MemberSet {
    /// A set of these ids.
    pub fn new(ids: impl IntoIterator<Item = NodeId>) -> Self {
        MemberSet {
            ids: Arc::new(RwLock::new(ids.into_iter().collect())),
            open: Arc::default(),
        }
    }

    /// Takes connections from `id` from now on. Returns whether it is new.
    pub fn insert(&self, id: NodeId) -> bool {
        self.ids.write().insert(id)
    }

    /// Refuses `id` from now on (unless the set is open), and closes its connection (at its
    /// next read, within [`KEEPALIVE`] of a live peer). Returns whether it was a member.
    pub fn remove(&self, id: NodeId) -> bool {
        self.ids.write().remove(&id)
    }

    /// Whether connections from `id` are taken: it is in the set, or the set is open.
    pub fn admits(&self, id: NodeId) -> bool {
        self.open.load(Ordering::Relaxed) || self.ids.read().contains(&id)
    }

    /// Opens the set (any id's connection is taken, and with [`ServeOptions::learn`] its
    /// address learned) or closes it again (connections of ids not in the set are closed at
    /// their next read). A node that joins a cluster is open until it is a member: the
    /// leader that adds it, and later ones, may be nodes it was never told of.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Relaxed);
    }

    /// The ids, in order.
    pub fn ids(&self) -> Vec<NodeId> {
        self.ids.read().iter().copied().collect()
    }
}

/// What [`serve`] needs to know: who this node is, the members it takes connections from,
/// the secret and the frame limit.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// This node's identity, secret and frame limit.
    pub peer: PeerOptions,
    /// The cluster's members (this node's own id is ignored); the host may change them while
    /// [`serve`] runs.
    pub members: MemberSet,
    /// While `members` is open, a dialer this transport has no address for is dialed back at
    /// the Raft address its hello names (how a joining node answers a leader it was never
    /// told of, until the replicated address book has it). `None`: never.
    pub learn: Option<PeerBook>,
}

impl ServeOptions {
    /// Node `my_id` of cluster `cluster_id` with members `members`, no secret, frames up to
    /// [`wire::DEFAULT_MAX_FRAME`].
    pub fn new(cluster_id: u64, my_id: NodeId, members: impl IntoIterator<Item = NodeId>) -> Self {
        ServeOptions {
            peer: PeerOptions::new(cluster_id, my_id),
            members: MemberSet::new(members),
            learn: None,
        }
    }
}

struct ServeContext {
    options: ServeOptions,
    logs: LogLimiter,
}

/// Accepts peers' connections on `listener` and calls `on_message` (usually
/// [`Node::step`](raftkv::Node::step)) for every message they carry, in order.
///
/// A connection must complete the handshake (right cluster, right node, a member's id, the
/// secret) and then send frames of at most `max_frame` bytes carrying the cluster id. A
/// connection that sends anything wrong — a refused handshake, a decode error, another
/// cluster's frame, a second hello — is logged (with the peer's address) and closed; the
/// listener and the other connections go on. Messages whose `from` differs from the
/// connection's hello are dropped (logged once per connection). See the module docs for the
/// limits.
///
/// Runs until its future is dropped (abort its task to stop listening); every connection it
/// accepted is closed with it.
pub async fn serve<F>(listener: TcpListener, options: ServeOptions, on_message: F)
where
    F: Fn(Message) + Send + Sync + 'static,
{
    let on_message = Arc::new(on_message);
    let context = Arc::new(ServeContext {
        options,
        logs: LogLimiter::new(10, Duration::from_secs(10)),
    });
    let slots = Slots::default();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    // A newcomer evicts the connection that has been shaking hands longest:
                    // idle sockets cannot keep a real peer out.
                    if slots.count(|s| s == SlotState::Handshake) >= MAX_HANDSHAKING {
                        slots.evict_oldest(|s| s == SlotState::Handshake);
                    }
                    let slot = slots.open();
                    let id = slot.id();
                    let on_message = on_message.clone();
                    let context = context.clone();
                    let abort = connections.spawn(async move {
                        let result = read_connection(stream, &context, &slot, &*on_message).await;
                        if let Err(e) = result {
                            if let Some(suppressed) = context.logs.allow() {
                                let more = if suppressed > 0 {
                                    format!(" ({suppressed} similar lines suppressed)")
                                } else {
                                    String::new()
                                };
                                warn!("peer connection from {addr}: {e}; closed it{more}");
                            }
                        }
                        drop(slot);
                    });
                    slots.set_abort(id, abort);
                }
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    warn!("accept failed: {e}");
                    sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// The handshake of an accepted connection: the dialer's id, or why it was refused.
async fn accept_handshake(
    stream: &mut TcpStream,
    options: &ServeOptions,
) -> Result<NodeId, Refused> {
    let me = &options.peer;
    let challenge =
        guard::send_challenge(stream, Port::Peer, me.cluster_id, me.my_id, me.incarnation)
            .await
            .map_err(Refused::Handshake)?;
    let hello = guard::read_hello(stream, Port::Peer)
        .await
        .map_err(Refused::Handshake)?;
    let mut verdict =
        guard::check_hello(Port::Peer, &me.secret, &challenge, &hello).and_then(|()| {
            if hello.from == me.my_id || !options.members.admits(hello.from) {
                Err(Refusal::UnknownPeer)
            } else {
                Ok(())
            }
        });
    // Only a proven hello's incarnation is recorded (a stranger cannot retire a member).
    let mut known = 0;
    if verdict.is_ok() {
        known = me.incarnations.known(hello.from).unwrap_or(0);
        match observe_incarnation(&me.incarnations, hello.from, hello.incarnation).await {
            Ok(()) => {}
            Err(incarnations::Observed::Retired(_)) => verdict = Err(Refusal::RetiredIncarnation),
            Err(e @ incarnations::Observed::NotStored(_)) => {
                return Err(Refused::Local(e.to_string()))
            }
        }
    }
    guard::send_answer(
        stream,
        Port::Peer,
        &me.secret,
        &challenge,
        &hello,
        verdict.map(|()| known),
    )
    .await
    .map_err(Refused::Io)?;
    match verdict {
        Ok(()) => {
            learn_address(options, hello.from, hello.listen);
            Ok(hello.from)
        }
        Err(why) => Err(Refused::Peer {
            why,
            hello,
            ours: me.cluster_id,
        }),
    }
}

/// Dials `peer` back at `listen` if the listener learns addresses now and the transport has
/// none for it (see [`ServeOptions::learn`]).
fn learn_address(options: &ServeOptions, peer: NodeId, listen: Option<SocketAddr>) {
    let (Some(book), Some(addr)) = (&options.learn, listen) else {
        return;
    };
    if options.members.open.load(Ordering::Relaxed)
        && !book.peers().contains_key(&peer)
        && book.set(peer, addr)
    {
        info!("node {peer} dialed in; it is answered at {addr}, the address its hello names");
    }
}

/// Reads one accepted connection until it ends (`Ok`) or misbehaves.
async fn read_connection(
    mut stream: TcpStream,
    context: &ServeContext,
    slot: &guard::SlotGuard,
    on_message: &(dyn Fn(Message) + Send + Sync),
) -> Result<(), Refused> {
    let options = &context.options;
    let _ = stream.set_nodelay(true);
    let id = match timeout(HANDSHAKE_TIMEOUT, accept_handshake(&mut stream, options)).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(Refused::Handshake(HandshakeError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            ))))
        }
    };
    if slot.claim_peer(id) > 0 {
        info!("node {id} reconnected; closed its previous connection");
    }
    let (cluster_id, max_frame) = (options.peer.cluster_id, options.peer.max_frame);
    let new_decoder = || FrameDecoder::new(cluster_id).with_max_frame(max_frame);
    let mut decoder = new_decoder();
    let mut fed_since_reset = 0usize;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut said_hello = false;
    let mut partial_since: Option<Instant> = None;
    let mut forged = 0u64;
    loop {
        let idle = Instant::now() + PEER_IDLE_TIMEOUT;
        let deadline = match partial_since {
            Some(since) => guard::frame_deadline(since.into(), FRAME_BASE_TIME, max_frame)
                .min(idle.into())
                .into(),
            None => idle,
        };
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(read) => read.map_err(Refused::Io)?,
            Err(_) if partial_since.is_some() => return Err(Refused::TooSlow),
            Err(_) => return Err(Refused::Idle),
        };
        if !options.members.admits(id) {
            return Err(Refused::Protocol("no longer a member"));
        }
        if n == 0 {
            if decoder.buffered() > 0 {
                return Err(Refused::Protocol("connection closed mid-frame"));
            }
            return Ok(());
        }
        decoder.feed(&buf[..n]);
        fed_since_reset += n;
        while let Some(frame) = decoder.next_frame().map_err(Refused::Wire)? {
            match frame {
                Frame::Hello { from } if !said_hello && from == id => said_hello = true,
                Frame::Hello { .. } if !said_hello => {
                    return Err(Refused::Protocol(
                        "a hello from another node than the handshake's",
                    ))
                }
                Frame::Hello { .. } => return Err(Refused::Protocol("a second hello")),
                Frame::Messages(_) if !said_hello => {
                    return Err(Refused::Protocol("messages before the hello"))
                }
                Frame::Messages(messages) => {
                    for m in messages {
                        if m.from == id {
                            on_message(m);
                        } else {
                            if forged == 0 {
                                warn!("node {id} sent a message from node {}; dropped", m.from);
                            }
                            forged += 1;
                        }
                    }
                }
            }
        }
        if decoder.buffered() == 0 {
            partial_since = None;
            // Give back the memory a large frame took, rather than keep it for the
            // connection's life.
            if fed_since_reset > (1 << 20) {
                decoder = new_decoder();
                fed_since_reset = 0;
            }
        } else if partial_since.is_none() {
            partial_since = Some(Instant::now());
        }
    }
}
