//! Raft traffic over TCP with tokio: [`TcpTransport`] sends a node's messages to its peers,
//! [`serve`] accepts its peers' connections and hands their messages to the node.
//!
//! Shared by the examples and tests; include it with
//! `#[path = "common/tcp.rs"] mod tcp;` (it is not part of the library, which stays
//! runtime-agnostic: it only provides the [`raftkv::wire`] codec used here).
//!
//! # Connections
//! Each node dials every peer once and only writes on that connection; it receives on the
//! connections its peers dialed to it. A connection starts with a [`Frame::Hello`] naming the
//! dialer, then carries [`Frame::Messages`] batches.
//!
//! # Limits
//! - Per peer, at most [`QUEUE_BATCHES`] batches wait to be written; when the queue is full the
//!   newest batch is dropped and counted (Raft resends what matters).
//! - Reconnection backs off exponentially from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], starting
//!   over only after a connection that lasted [`HEALTHY_CONNECTION`]; connecting and writing
//!   each have a timeout, after which the connection is dropped and redialed.
//! - A batch that does not fit a frame of `max_frame` bytes is split; a single message that
//!   does not fit is dropped and logged.
//! - [`serve`] keeps at most [`MAX_CONNECTIONS`] connections; a connection must say hello within
//!   [`HELLO_TIMEOUT`]; any decode or protocol error closes that connection only, logged to
//!   stderr with the peer's address.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
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
/// How long an accepted connection has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections [`serve`] keeps open at most.
pub const MAX_CONNECTIONS: usize = 64;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// Counters of one peer's outgoing link.
#[derive(Debug, Default)]
struct PeerCounters {
    connected: AtomicBool,
    connects: AtomicU64,
    dropped: AtomicU64,
    batches_sent: AtomicU64,
}

/// A point-in-time copy of one peer link's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStats {
    /// A connection to the peer is up.
    pub connected: bool,
    /// Connections established so far (more than one means it reconnected).
    pub connects: u64,
    /// Batches dropped because the queue was full.
    pub dropped: u64,
    /// Batches written to a connection.
    pub batches_sent: u64,
}

/// The counters of every peer link of a [`TcpTransport`]; stays valid after the transport
/// moved into a node.
#[derive(Clone, Debug, Default)]
pub struct TransportStats(Arc<HashMap<NodeId, Arc<PeerCounters>>>);

impl TransportStats {
    /// The counters of the link to `peer`, if it is one of the transport's peers.
    pub fn peer(&self, peer: NodeId) -> Option<PeerStats> {
        let c = self.0.get(&peer)?;
        Some(PeerStats {
            connected: c.connected.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            batches_sent: c.batches_sent.load(Ordering::Relaxed),
        })
    }
}

struct PeerLink {
    queue: mpsc::Sender<Vec<Message>>,
    counters: Arc<PeerCounters>,
}

/// A [`Transport`] over TCP: one bounded queue and one connection task per peer.
///
/// Dropping the transport (which the node's driver does when the node shuts down) ends the
/// connection tasks.
pub struct TcpTransport {
    links: HashMap<NodeId, PeerLink>,
    stats: TransportStats,
}

impl TcpTransport {
    /// A transport for node `my_id` of cluster `cluster_id`, dialing `peers` (its own id, if
    /// present, is ignored). Frames are kept within [`wire::DEFAULT_MAX_FRAME`].
    ///
    /// Spawns one task per peer: call it from within a tokio runtime (like `tokio::spawn`, it
    /// panics otherwise).
    pub fn new(cluster_id: u64, my_id: NodeId, peers: HashMap<NodeId, SocketAddr>) -> Self {
        Self::with_max_frame(cluster_id, my_id, peers, wire::DEFAULT_MAX_FRAME)
    }

    /// Like [`TcpTransport::new`], keeping frames within `max_frame` bytes (the receivers'
    /// limit).
    pub fn with_max_frame(
        cluster_id: u64,
        my_id: NodeId,
        peers: HashMap<NodeId, SocketAddr>,
        max_frame: usize,
    ) -> Self {
        let mut links = HashMap::new();
        for (peer, addr) in peers {
            if peer == my_id {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE_BATCHES);
            let counters = Arc::new(PeerCounters::default());
            let link = Link {
                cluster_id,
                my_id,
                peer,
                addr,
                max_frame,
                counters: counters.clone(),
            };
            tokio::spawn(link.run(rx));
            links.insert(peer, PeerLink { queue, counters });
        }
        let stats = TransportStats(Arc::new(
            links
                .iter()
                .map(|(id, l)| (*id, l.counters.clone()))
                .collect(),
        ));
        TcpTransport { links, stats }
    }

    /// A handle on the per-peer counters.
    pub fn stats(&self) -> TransportStats {
        self.stats.clone()
    }
}

#[async_trait]
impl Transport for TcpTransport {
    async fn send(&self, to: NodeId, messages: Vec<Message>) -> Result<(), TransportError> {
        let link = self.links.get(&to).ok_or(TransportError::UnknownPeer(to))?;
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

/// Everything one peer's connection task needs.
struct Link {
    cluster_id: u64,
    my_id: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    max_frame: usize,
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
    /// Dials (with backoff), writes the hello, then writes queued batches until the
    /// connection fails (redial) or the queue closes (stop).
    async fn run(self, mut queue: mpsc::Receiver<Vec<Message>>) {
        let hello = match wire::encode(self.cluster_id, &Frame::Hello { from: self.my_id }) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!(
                    "raftkv tcp: cannot encode hello for node {}: {e}",
                    self.peer
                );
                return;
            }
        };
        let mut backoff = BACKOFF_MIN;
        let mut quiet = false; // log the first failure of a series only
        loop {
            if queue.is_closed() {
                return;
            }
            let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr)).await {
                Ok(Ok(stream)) => stream,
                failed => {
                    if !quiet {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_string(),
                        };
                        eprintln!(
                            "raftkv tcp: node {} at {} unreachable ({why}); retrying with backoff",
                            self.peer, self.addr
                        );
                        quiet = true;
                    }
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if quiet {
                // After a logged failure or loss (a loss always sets `quiet` again).
                eprintln!(
                    "raftkv tcp: connected to node {} at {}",
                    self.peer, self.addr
                );
            }
            self.counters.connects.fetch_add(1, Ordering::Relaxed);
            self.counters.connected.store(true, Ordering::Relaxed);
            let connected_at = Instant::now();
            let ended = self.pump(stream, &hello, &mut queue).await;
            self.counters.connected.store(false, Ordering::Relaxed);
            match ended {
                Ended::TransportClosed => return,
                Ended::Lost(why) => {
                    eprintln!(
                        "raftkv tcp: connection to node {} at {} lost: {why}",
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

    /// Runs one connection: hello, then batches. Also watches the read side, so that a peer
    /// closing the connection is noticed at once rather than at the next failed write.
    async fn pump(
        &self,
        stream: TcpStream,
        hello: &[u8],
        queue: &mut mpsc::Receiver<Vec<Message>>,
    ) -> Ended {
        let (mut reader, mut writer) = stream.into_split();
        if let Err(why) = write_with_timeout(&mut writer, hello).await {
            return Ended::Lost(why);
        }
        let mut probe = [0u8; 64];
        loop {
            tokio::select! {
                batch = queue.recv() => {
                    let Some(batch) = batch else {
                        return Ended::TransportClosed;
                    };
                    let mut frames = Vec::new();
                    encode_batch(self.cluster_id, batch, self.max_frame, &mut frames);
                    for frame in frames {
                        if let Err(why) = write_with_timeout(&mut writer, &frame).await {
                            return Ended::Lost(why);
                        }
                    }
                    self.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
                }
                read = reader.read(&mut probe) => {
                    // The receiver never writes: any outcome means the connection is over.
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
            eprintln!("raftkv tcp: dropping a batch that cannot be encoded: {e}");
            return;
        }
    }
    let Frame::Messages(mut batch) = frame else {
        return;
    };
    if batch.len() <= 1 {
        eprintln!(
            "raftkv tcp: dropping a message larger than the {max_frame}-byte frame limit: {:?}",
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
    HelloTimeout,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Wire(e) => write!(f, "{e}"),
            Refused::Io(e) => write!(f, "io: {e}"),
            Refused::Protocol(what) => write!(f, "protocol: {what}"),
            Refused::HelloTimeout => write!(f, "no hello within {HELLO_TIMEOUT:?}"),
        }
    }
}

/// Accepts peers' connections on `listener` and calls `on_message` (usually
/// [`Node::step`](raftkv::Node::step)) for every message they carry, in order.
///
/// Frames are decoded with a limit of `max_frame` bytes and must carry `cluster_id`. A
/// connection that sends anything wrong — a decode error, another cluster's frame, no hello,
/// a second hello — is logged (with the peer's address) and closed; the listener and the other
/// connections go on. Messages whose `from` differs from the connection's hello are dropped
/// (logged once per connection).
///
/// Runs until its future is dropped (abort its task to stop listening); every connection it
/// accepted is closed with it.
pub async fn serve<F>(listener: TcpListener, cluster_id: u64, max_frame: usize, on_message: F)
where
    F: Fn(Message) + Send + Sync + 'static,
{
    let on_message = Arc::new(on_message);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    if connections.len() >= MAX_CONNECTIONS {
                        eprintln!("raftkv tcp: refusing {addr}: {MAX_CONNECTIONS} connections open");
                        continue;
                    }
                    let on_message = on_message.clone();
                    connections.spawn(async move {
                        if let Err(e) =
                            read_connection(stream, cluster_id, max_frame, &*on_message).await
                        {
                            eprintln!("raftkv tcp: connection from {addr}: {e}; closing it");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    eprintln!("raftkv tcp: accept failed: {e}");
                    sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Reads one accepted connection until it ends (`Ok`) or misbehaves.
async fn read_connection(
    mut stream: TcpStream,
    cluster_id: u64,
    max_frame: usize,
    on_message: &(dyn Fn(Message) + Send + Sync),
) -> Result<(), Refused> {
    let mut decoder = FrameDecoder::new(cluster_id).with_max_frame(max_frame);
    let mut buf = vec![0u8; READ_CHUNK];
    let hello_deadline = Instant::now() + HELLO_TIMEOUT;
    let mut from: Option<NodeId> = None;
    let mut forged = 0u64;
    loop {
        let read = if from.is_none() {
            tokio::time::timeout_at(hello_deadline, stream.read(&mut buf))
                .await
                .map_err(|_| Refused::HelloTimeout)?
        } else {
            stream.read(&mut buf).await
        };
        let n = read.map_err(Refused::Io)?;
        if n == 0 {
            if decoder.buffered() > 0 {
                return Err(Refused::Protocol("connection closed mid-frame"));
            }
            return Ok(());
        }
        decoder.feed(&buf[..n]);
        while let Some(frame) = decoder.next_frame().map_err(Refused::Wire)? {
            match (frame, from) {
                (Frame::Hello { from: 0 }, _) => {
                    return Err(Refused::Protocol("hello from node 0"))
                }
                (Frame::Hello { from: id }, None) => from = Some(id),
                (Frame::Hello { .. }, Some(_)) => return Err(Refused::Protocol("a second hello")),
                (Frame::Messages(_), None) => {
                    return Err(Refused::Protocol("messages before the hello"))
                }
                (Frame::Messages(messages), Some(id)) => {
                    for m in messages {
                        if m.from == id {
                            on_message(m);
                        } else {
                            if forged == 0 {
                                eprintln!(
                                    "raftkv tcp: node {id} sent a message from node {}; dropped",
                                    m.from
                                );
                            }
                            forged += 1;
                        }
                    }
                }
            }
        }
    }
}
