//! The client protocol of the TCP demo node (`examples/node.rs`): how a client reaches one
//! node's KV service, and [`TcpKvEndpoint`], which lets [`raftkv::kv::KvClient`] use it.
//!
//! Shared by the examples and tests; include it with
//! `#[path = "common/client_proto.rs"] mod client_proto;`. Like `tcp.rs` it runs on tokio.
//!
//! # Format
//! A connection starts with the handshake of [`guard`] (the node's challenge, the client's
//! hello with an HMAC proof of the client secret if the node has one, the node's answer with
//! its own proof). Then it carries request/response pairs, one at a time, in order. Each
//! message is a frame: `u32 LE length | postcard body`, the body a [`ClientRequest`] (client
//! to node) or a [`ClientResponse`] (node to client). A frame longer than the limit
//! ([`MAX_CLIENT_FRAME`] by default) is refused with [`ProtoError::TooLarge`] before its body
//! is read; any decode error closes the connection (the node logs it), never the node.
//!
//! # Limits
//! - [`MAX_CLIENT_FRAME`] is the node's largest entry plus [`CLIENT_FRAME_OVERHEAD`]: every
//!   command that fits an entry fits a request, and a command that does not is answered with
//!   `TooLarge` by the node (or refused by the client before it is sent).
//! - A node keeps at most [`MAX_CLIENT_CONNECTIONS`]; when they are all taken, a newcomer
//!   evicts the connection that has waited longest without a request in progress (so idle
//!   sockets cannot lock clients out). The handshake must finish within
//!   [`CLIENT_HANDSHAKE_TIMEOUT`]; a connection idle for [`IDLE_TIMEOUT`] is closed.
//! - A frame's buffer grows only as its bytes arrive; a frame larger than [`SMALL_FRAME`]
//!   first reserves its length from one budget for the port ([`CLIENT_BUFFER_BUDGET`] by
//!   default). A frame must arrive within 5 s plus 1 s per MiB, or its connection is closed.
//! - `Register` (a new session) is taken at most once per connection and at most
//!   [`REGISTER_RATE`] per second on the port (burst [`REGISTER_BURST`]); beyond that it is
//!   answered `Busy`, so a flood cannot push idle sessions out of the bounded table quickly.
//! - [`TcpKvEndpoint`] connects within its `connect_timeout` and gives each request its
//!   `request_timeout` (longer than the node's own propose timeout, so the node's answer —
//!   including its own `Timeout` — normally arrives first).

// Its own copy in each of tcp.rs and client_proto.rs, so that a program includes only the
// file it needs; node.rs includes both, which clippy notices.
#[path = "endpoint.rs"]
mod endpoint;
#[allow(clippy::duplicate_mod)]
#[path = "guard.rs"]
pub mod guard;
#[path = "members.rs"]
pub mod members;

// Each program that includes this file uses a different part of it.
#[allow(unused_imports)]
pub use endpoint::{MemberCallError, Seen, TcpKvEndpoint, MEMBERS_REFRESH, MEMBERS_RETRY};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guard::{ByteBudget, HandshakeError, LogLimiter, Port, Secret, SlotState, Slots};
use parking_lot::Mutex;
use raftkv::error::ProposeError;
use raftkv::kv::{KvCommand, KvError, KvResult};
use raftkv::{Node, NodeId, NodeStatus};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::warn;

/// The node's largest entry ([`Config::max_entry_bytes`](raftkv::raft::Config::max_entry_bytes)
/// of the library's defaults, which `examples/node.rs` uses and checks at start).
pub const MAX_ENTRY_BYTES: usize = 8 << 20;
/// Bytes a request frame needs around its command: the request's tag and the command's
/// length (at most 6), rounded up.
pub const CLIENT_FRAME_OVERHEAD: usize = 64;
/// Largest frame body either side accepts by default: the largest entry plus the framing.
pub const MAX_CLIENT_FRAME: usize = MAX_ENTRY_BYTES + CLIENT_FRAME_OVERHEAD;
/// Client connections a node keeps open at most.
pub const MAX_CLIENT_CONNECTIONS: usize = 256;
/// How long a client has to complete the handshake.
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// A client connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a frame a connection may buffer without the port's budget.
pub const SMALL_FRAME: usize = 64 << 10;
/// Bytes of partly received frames a client port holds at most beyond [`SMALL_FRAME`] per
/// connection (eight frames of the largest size).
pub const CLIENT_BUFFER_BUDGET: usize = 8 * MAX_CLIENT_FRAME;
/// The base of a frame's deadline (plus one second per MiB of it).
pub const FRAME_BASE_TIME: Duration = Duration::from_secs(5);
/// New sessions per second a node's client port takes.
pub const REGISTER_RATE: f64 = 100.0;
/// New sessions a client port takes at once after a quiet spell.
pub const REGISTER_BURST: f64 = 100.0;

/// What a client asks a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Propose a KV command (bytes from [`raftkv::kv::request`] or
    /// [`raftkv::kv::encode_command`]); answered once applied.
    Propose(Vec<u8>),
    /// A linearizable read (bytes from [`raftkv::kv::encode_query`]).
    Read(Vec<u8>),
    /// The node's status.
    Status,
    /// A backup of the node's state (`Node::backup`): answered with `BackupChunk` frames
    /// (the 64-byte header first, then the content) and one `BackupDone`.
    Backup,
    /// The configuration and the members' addresses (answered by the leader, like the
    /// requests below, with `Members`; see [`members`]).
    Members,
    /// Add node `id` as a learner: its addresses are written to the replicated address
    /// book first, so every member learns them.
    AddLearner {
        /// The new node.
        id: NodeId,
        /// Its Raft address.
        raft: SocketAddr,
        /// Its client address.
        client: SocketAddr,
    },
    /// Make a caught-up learner a voter.
    Promote(NodeId),
    /// Remove a voter or a learner (not the leader itself: transfer leadership first).
    Remove(NodeId),
    /// Hand leadership to this voter.
    TransferLeadership(NodeId),
}

/// Why a node did not answer a request with a result: [`ProposeError`] in a stable, tagged
/// form (plus `Other` for anything that is not one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFailure {
    /// Not the leader; the leader it knows of, if any.
    NotLeader(Option<u64>),
    /// Not applied within the node's deadline; it may still be.
    Timeout,
    /// Lost its log slot to a leader change; never applied.
    Dropped,
    /// Too many proposals in flight.
    Busy,
    /// The node's disk is full.
    NoSpace,
    /// The state machine does not serve reads.
    Unsupported,
    /// The node is shutting down or stopped.
    Shutdown,
    /// The command is larger than the cluster's largest entry.
    TooLarge {
        /// Bytes it would take.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Anything else (a protocol error, say).
    Other(String),
}

impl fmt::Display for ClientFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientFailure::Other(why) => write!(f, "{why}"),
            known => write!(f, "{}", ProposeError::from(known.clone())),
        }
    }
}

impl From<ProposeError> for ClientFailure {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { leader } => ClientFailure::NotLeader(leader),
            ProposeError::Timeout => ClientFailure::Timeout,
            ProposeError::Dropped => ClientFailure::Dropped,
            ProposeError::Busy => ClientFailure::Busy,
            ProposeError::NoSpace => ClientFailure::NoSpace,
            ProposeError::Unsupported => ClientFailure::Unsupported,
            ProposeError::Shutdown => ClientFailure::Shutdown,
            ProposeError::TooLarge { size, max } => ClientFailure::TooLarge { size, max },
        }
    }
}

impl From<ClientFailure> for ProposeError {
    /// `Other` becomes `Timeout`: the request's fate is unknown, and the client retries it
    /// under the same number.
    fn from(f: ClientFailure) -> Self {
        match f {
            ClientFailure::NotLeader(leader) => ProposeError::NotLeader { leader },
            ClientFailure::Timeout | ClientFailure::Other(_) => ProposeError::Timeout,
            ClientFailure::Dropped => ProposeError::Dropped,
            ClientFailure::Busy => ProposeError::Busy,
            ClientFailure::NoSpace => ProposeError::NoSpace,
            ClientFailure::Unsupported => ProposeError::Unsupported,
            ClientFailure::Shutdown => ProposeError::Shutdown,
            ClientFailure::TooLarge { size, max } => ProposeError::TooLarge { size, max },
        }
    }
}

/// A node's status, as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatusView {
    /// The node.
    pub id: u64,
    /// `Leader`, `Follower`, `Candidate`, `PreCandidate` (or `Stopped`).
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Index covered by the latest snapshot.
    pub snapshot_index: u64,
    /// Bytes of log (and hard state) stored.
    pub log_bytes: u64,
    /// Bytes of the stored snapshot.
    pub snapshot_bytes: u64,
    /// Set while the disk is full.
    pub disk_full: Option<String>,
    /// Set when the node stopped on a fatal error.
    pub fatal_error: Option<String>,
    /// Set while the node recovers from a lost log tail: the last intact index.
    pub recovering_after: Option<u64>,
    /// What the node counted since it started.
    pub metrics: MetricsView,
}

/// A node's metrics, as `kv status` shows them (a subset of `raftkv::node::NodeMetrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsView {
    /// Proposals taken, and refused at once.
    pub proposals: u64,
    /// Proposals refused at once.
    pub proposals_refused: u64,
    /// Entries learned committed.
    pub committed: u64,
    /// Entries applied.
    pub applied: u64,
    /// Reads served.
    pub reads_served: u64,
    /// Storage syncs, and their latency (upper bounds of p50/p99, and the maximum, in µs).
    pub fsyncs: u64,
    /// See `fsyncs`.
    pub fsync_p50_us: u64,
    /// See `fsyncs`.
    pub fsync_p99_us: u64,
    /// See `fsyncs`.
    pub fsync_max_us: u64,
    /// Entries written per batch: the largest.
    pub max_batch_entries: u64,
    /// Leader changes seen.
    pub leader_changes: u64,
    /// Snapshots taken and installed.
    pub snapshots_taken: u64,
    /// See `snapshots_taken`.
    pub snapshots_installed: u64,
    /// Commands waiting in the node's inbox.
    pub inbox_depth: u64,
}

impl From<&NodeStatus> for NodeStatusView {
    fn from(s: &NodeStatus) -> Self {
        NodeStatusView {
            id: s.raft.id,
            role: if s.running {
                format!("{:?}", s.raft.role)
            } else {
                "Stopped".into()
            },
            term: s.raft.term,
            leader: s.raft.leader,
            commit: s.raft.commit_index,
            applied: s.raft.applied_index,
            last_index: s.raft.last_index,
            snapshot_index: s.raft.snapshot.index,
            log_bytes: s.persisted.log_bytes,
            snapshot_bytes: s.persisted.snapshot_bytes,
            disk_full: s.disk_full.clone(),
            fatal_error: s.fatal_error.clone(),
            recovering_after: s.recovering.map(|l| l.intact_through),
            metrics: {
                let (m, c) = (&s.metrics, &s.metrics.counters);
                MetricsView {
                    proposals: c.proposals,
                    proposals_refused: c.proposals_refused,
                    committed: c.committed,
                    applied: c.applied,
                    reads_served: c.reads_served,
                    fsyncs: m.fsync.count,
                    fsync_p50_us: m.fsync.quantile_us(0.5),
                    fsync_p99_us: m.fsync.quantile_us(0.99),
                    fsync_max_us: m.fsync.max_us,
                    max_batch_entries: c.max_batch_entries,
                    leader_changes: c.leader_changes,
                    snapshots_taken: c.snapshots_taken,
                    snapshots_installed: c.snapshots_installed,
                    inbox_depth: m.inbox_depth,
                }
            },
        }
    }
}

/// What a node answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// The answer to `Propose` or `Read`.
    Result(Result<KvResult, ClientFailure>),
    /// The answer to `Status` (boxed: it is much larger than a result).
    Status(Box<NodeStatusView>),
    /// The next bytes of a backup (at most 1 MiB).
    BackupChunk(Vec<u8>),
    /// The end of a backup: its index and term, or why it failed (the chunks sent before
    /// a failure are not a backup).
    BackupDone(Result<(u64, u64), ClientFailure>),
    /// The answer to a member request: the configuration once the change is in effect and
    /// committed, or why not.
    Members(Result<members::MembersView, members::MemberFailure>),
}

/// Why a frame could not be read or written, or a connection not made.
#[derive(Debug)]
pub enum ProtoError {
    /// The socket failed or closed.
    Io(std::io::Error),
    /// A frame of this many bytes exceeds the limit of the second (nothing was sent or read
    /// of it).
    TooLarge(usize, usize),
    /// The body is not a message of this protocol.
    Decode(postcard::Error),
    /// No answer within the deadline.
    TimedOut,
    /// The handshake failed (a refused or missing secret, not a raftkv client port).
    Handshake(HandshakeError),
    /// A frame did not arrive by its deadline.
    TooSlow,
    /// Other connections held the port's whole buffer budget until the frame's deadline.
    NoBudget,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "io: {e}"),
            ProtoError::TooLarge(n, max) => {
                write!(f, "frame of {n} bytes exceeds the {max}-byte limit")
            }
            ProtoError::Decode(e) => write!(f, "undecodable frame: {e}"),
            ProtoError::TimedOut => write!(f, "timed out"),
            ProtoError::Handshake(e) => write!(f, "{e}"),
            ProtoError::TooSlow => write!(f, "a frame took longer than its deadline"),
            ProtoError::NoBudget => write!(f, "no buffer budget for a large frame in time"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// Writes `message` as one frame.
pub async fn write_message<W, T>(writer: &mut W, message: &T) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = postcard::to_allocvec(message).map_err(ProtoError::Decode)?;
    if body.len() > MAX_CLIENT_FRAME {
        return Err(ProtoError::TooLarge(body.len(), MAX_CLIENT_FRAME));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame).await.map_err(ProtoError::Io)?;
    writer.flush().await.map_err(ProtoError::Io)
}

/// Reads one frame of at most [`MAX_CLIENT_FRAME`] bytes; `Ok(None)` on a clean end of stream
/// before its first byte. The buffer grows only as bytes arrive.
pub async fn read_message<R, T>(reader: &mut R) -> Result<Option<T>, ProtoError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let far = Instant::now() + Duration::from_secs(24 * 3600);
    read_message_limited(reader, MAX_CLIENT_FRAME, None, far).await
}

/// Reads one frame of at most `max` bytes, its bytes beyond [`SMALL_FRAME`] reserved from
/// `budget` if given; once its first byte is in, the rest must arrive by the frame's deadline
/// (counted from then); `idle_until` bounds the wait for that first byte.
async fn read_message_limited<R, T>(
    reader: &mut R,
    max: usize,
    budget: Option<&ByteBudget>,
    idle_until: Instant,
) -> Result<Option<T>, ProtoError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    let mut deadline = idle_until;
    while got < len.len() {
        let read = tokio::time::timeout_at(deadline.into(), reader.read(&mut len[got..])).await;
        let n = match read {
            Err(_) if got == 0 => return Err(ProtoError::TimedOut),
            Err(_) => return Err(ProtoError::TooSlow),
            Ok(r) => r.map_err(ProtoError::Io)?,
        };
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        if got == 0 {
            deadline = Instant::now() + FRAME_BASE_TIME;
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(ProtoError::TooLarge(len, max));
    }
    let deadline = guard::frame_deadline(deadline - FRAME_BASE_TIME, FRAME_BASE_TIME, len);
    let (body, _held) = guard::read_budgeted(reader, len, SMALL_FRAME, budget, deadline)
        .await
        .map_err(|e| match e {
            guard::BudgetedReadError::Io(e) => ProtoError::Io(e),
            guard::BudgetedReadError::TooSlow => ProtoError::TooSlow,
            guard::BudgetedReadError::NoBudget => ProtoError::NoBudget,
        })?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(ProtoError::Decode)
}

/// How a node serves its client port.
#[derive(Clone, Debug)]
pub struct ClientServeOptions {
    /// The cluster (named in the handshake's challenge and bound into its proofs).
    pub cluster_id: u64,
    /// The client secret ([`Secret::none`] for none).
    pub secret: Secret,
    /// The largest request frame.
    pub max_frame: usize,
    /// Bytes of partly received frames held at most beyond [`SMALL_FRAME`] per connection.
    pub buffer_budget: usize,
    /// Answers member requests; without it they get `Other`.
    pub members: Option<Arc<members::MemberService>>,
}

impl Default for ClientServeOptions {
    fn default() -> Self {
        ClientServeOptions {
            cluster_id: 0,
            secret: Secret::none(),
            max_frame: MAX_CLIENT_FRAME,
            buffer_budget: CLIENT_BUFFER_BUDGET,
            members: None,
        }
    }
}

/// Takes `Register` requests at [`REGISTER_RATE`] per second at most (a token bucket).
struct RegisterLimiter(Mutex<(f64, Instant)>);

impl RegisterLimiter {
    fn new() -> Self {
        RegisterLimiter(Mutex::new((REGISTER_BURST, Instant::now())))
    }
    fn take(&self) -> bool {
        let mut s = self.0.lock();
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * REGISTER_RATE).min(REGISTER_BURST);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What every connection of one client port shares.
struct ClientPort {
    options: ClientServeOptions,
    budget: ByteBudget,
    registers: RegisterLimiter,
    logs: LogLimiter,
}

impl ClientPort {
    fn log(&self, line: impl FnOnce() -> String) {
        if let Some(suppressed) = self.logs.allow() {
            if suppressed > 0 {
                warn!("{} ({suppressed} similar lines suppressed)", line());
            } else {
                warn!("{}", line());
            }
        }
    }
}

/// Serves clients of `node` on `listener` with the default options (no secret) until the
/// future is dropped. See [`serve_clients_with`].
pub async fn serve_clients(listener: TcpListener, node: Node<KvResult>) {
    serve_clients_with(listener, node, ClientServeOptions::default()).await
}

/// Serves clients of `node` on `listener` until the future is dropped. Each connection
/// answers its requests in order; a bad frame closes that connection only. See the module
/// docs for the limits.
pub async fn serve_clients_with(
    listener: TcpListener,
    node: Node<KvResult>,
    options: ClientServeOptions,
) {
    let port = Arc::new(ClientPort {
        budget: ByteBudget::new(options.buffer_budget),
        options,
        registers: RegisterLimiter::new(),
        logs: LogLimiter::new(10, Duration::from_secs(10)),
    });
    let slots = Slots::default();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    // All taken: the connection that has waited longest without a request in
                    // progress makes room; if every one is busy, the newcomer is refused.
                    if slots.count(|_| true) >= MAX_CLIENT_CONNECTIONS
                        && !slots.evict_oldest(|s| s != SlotState::Busy)
                    {
                        port.log(|| format!(
                            "client port: refusing {addr}: {MAX_CLIENT_CONNECTIONS} connections \
                             busy"
                        ));
                        continue;
                    }
                    let slot = slots.open();
                    let id = slot.id();
                    let node = node.clone();
                    let port = port.clone();
                    let abort = connections.spawn(async move {
                        if let Err(e) = serve_connection(stream, node, &port, &slot).await {
                            port.log(|| format!(
                                "client port: connection from {addr}: {e}; closed it"
                            ));
                        }
                        drop(slot);
                    });
                    slots.set_abort(id, abort);
                }
                Err(e) => {
                    warn!("client port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// The node's side of the handshake.
async fn accept_client(
    stream: &mut TcpStream,
    options: &ClientServeOptions,
    node_id: NodeId,
) -> Result<(), ProtoError> {
    let secret = &options.secret;
    let challenge = guard::send_challenge(stream, Port::Client, options.cluster_id, node_id, 0)
        .await
        .map_err(ProtoError::Handshake)?;
    let hello = guard::read_hello(stream, Port::Client)
        .await
        .map_err(ProtoError::Handshake)?;
    let verdict = guard::check_hello(Port::Client, secret, &challenge, &hello);
    guard::send_answer(
        stream,
        Port::Client,
        secret,
        &challenge,
        &hello,
        verdict.map(|()| 0),
    )
    .await
    .map_err(ProtoError::Io)?;
    verdict.map_err(|r| ProtoError::Handshake(HandshakeError::Refused(r)))
}

/// The client's side of the handshake, on a fresh connection to node `to` (any id: the node
/// tells its own in the challenge, and the proof covers it).
async fn client_handshake(stream: &mut TcpStream, secret: &Secret) -> Result<(), ProtoError> {
    let shake = async {
        let c = guard::read_challenge(stream, Port::Client).await?;
        let hello = guard::make_hello(Port::Client, secret, &c, guard::Hello::client(&c))?;
        stream
            .write_all(&guard::hello_bytes(Port::Client, &hello))
            .await?;
        guard::read_answer(stream, Port::Client, secret, &c, &hello)
            .await
            .map(drop)
    };
    shake.await.map_err(ProtoError::Handshake)
}

/// Whether `request` may go on to the node: `Some(answer)` instead for a `Register` beyond
/// this connection's one or the port's rate (`Busy`), and for a write to the address book's
/// reserved keys when this port serves member requests (a final [`KvError::Reserved`]: only
/// the member requests change the book).
fn admit(
    request: &ClientRequest,
    port: &ClientPort,
    registered: &mut bool,
) -> Option<Result<KvResult, ClientFailure>> {
    let ClientRequest::Propose(command) = request else {
        return None;
    };
    match postcard::from_bytes::<KvCommand>(command) {
        Ok(KvCommand::Register { .. }) => {
            if *registered || !port.registers.take() {
                return Some(Err(ClientFailure::Busy));
            }
            *registered = true;
            None
        }
        Ok(KvCommand::Request { op, .. }) if port.options.members.is_some() => op
            .written_keys()
            .find(|k| k.starts_with(members::MEMBER_PREFIX.as_bytes()))
            .map(|key| Ok(KvResult::Error(KvError::Reserved { key: key.clone() }))),
        _ => None,
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    node: Node<KvResult>,
    port: &ClientPort,
    slot: &guard::SlotGuard,
) -> Result<(), ProtoError> {
    let _ = stream.set_nodelay(true);
    match timeout(
        CLIENT_HANDSHAKE_TIMEOUT,
        accept_client(&mut stream, &port.options, node.id()),
    )
    .await
    {
        Ok(shaken) => shaken?,
        Err(_) => return Err(ProtoError::TimedOut),
    }
    let mut registered = false;
    loop {
        slot.set(SlotState::Idle);
        let idle_until = Instant::now() + IDLE_TIMEOUT;
        let read = read_message_limited(
            &mut stream,
            port.options.max_frame,
            Some(&port.budget),
            idle_until,
        )
        .await;
        let request = match read {
            Err(ProtoError::TimedOut) => return Ok(()), // idle: close quietly
            Err(e) => return Err(e),
            Ok(None) => return Ok(()),
            Ok(Some(r)) => r,
        };
        slot.set(SlotState::Busy);
        if let Some(answer) = admit(&request, port, &mut registered) {
            write_message(&mut stream, &ClientResponse::Result(answer)).await?;
            continue;
        }
        let response = match request {
            ClientRequest::Propose(command) => {
                ClientResponse::Result(node.propose(command).await.map_err(ClientFailure::from))
            }
            ClientRequest::Read(query) => {
                ClientResponse::Result(node.read(query).await.map_err(ClientFailure::from))
            }
            ClientRequest::Status => {
                ClientResponse::Status(Box::new(NodeStatusView::from(&node.status())))
            }
            ClientRequest::Backup => {
                let done = stream_backup(&mut stream, &node).await?;
                ClientResponse::BackupDone(done)
            }
            member_request => ClientResponse::Members(match &port.options.members {
                Some(service) => match service.answer(&node, &member_request).await {
                    Some(answer) => answer,
                    None => Err(members::MemberFailure::Other("not a member request".into())),
                },
                None => Err(members::MemberFailure::Other(
                    "this node does not serve member requests".into(),
                )),
            }),
        };
        match write_message(&mut stream, &response).await {
            Err(ProtoError::TooLarge(n, max)) => {
                let refusal = ClientFailure::Other(format!(
                    "the answer of {n} bytes exceeds the {max}-byte frame limit"
                ));
                write_message(&mut stream, &ClientResponse::Result(Err(refusal))).await?;
            }
            written => written?,
        }
    }
}

/// Why one request on a fresh connection did not get an answer.
#[derive(Debug)]
pub enum CallError {
    /// No connection could be made: nothing was sent.
    Connect(ProtoError),
    /// The handshake failed (wrong or missing secret, say): the request was not sent.
    Handshake(ProtoError),
    /// The request is too large to send (nothing was sent).
    TooLarge(usize, usize),
    /// The request was sent (or may have been), and no answer came.
    Lost(ProtoError),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Connect(e) => write!(f, "cannot connect: {e}"),
            CallError::Handshake(e) => write!(f, "{e}"),
            CallError::TooLarge(n, max) => {
                write!(
                    f,
                    "a request of {n} bytes exceeds the {max}-byte frame limit"
                )
            }
            CallError::Lost(e) => write!(f, "no answer: {e}"),
        }
    }
}

/// Streams a backup of `node` to the client as `BackupChunk` frames; returns what the final
/// `BackupDone` says.
async fn stream_backup(
    stream: &mut TcpStream,
    node: &Node<KvResult>,
) -> Result<Result<(u64, u64), ClientFailure>, ProtoError> {
    let fail =
        |e: raftkv::storage::backup::BackupError| Ok(Err(ClientFailure::Other(e.to_string())));
    let mut backup = match node.backup().await {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    loop {
        match backup.next_chunk().await {
            Ok(Some(chunk)) => write_message(stream, &ClientResponse::BackupChunk(chunk)).await?,
            Ok(None) => {
                let meta = backup.info().meta;
                return Ok(Ok((meta.index, meta.term)));
            }
            Err(e) => return fail(e),
        }
    }
}

/// Asks the node at `addr` for a backup and writes its bytes to `out`; returns the backup's
/// `(index, term)` and its length. `within` bounds each frame's wait.
pub async fn backup(
    addr: SocketAddr,
    secret: &Secret,
    out: &mut impl std::io::Write,
    within: Duration,
) -> Result<((u64, u64), u64), String> {
    let mut stream = match timeout(within, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("cannot connect to {addr}: {e}")),
        Err(_) => return Err(format!("cannot connect to {addr}: timed out")),
    };
    match timeout(within, client_handshake(&mut stream, secret)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("{addr}: {e}")),
        Err(_) => return Err(format!("{addr}: the handshake timed out")),
    }
    write_message(&mut stream, &ClientRequest::Backup)
        .await
        .map_err(|e| e.to_string())?;
    let mut bytes = 0u64;
    loop {
        let frame = timeout(within, read_message::<_, ClientResponse>(&mut stream))
            .await
            .map_err(|_| format!("no answer from {addr} within {within:?}"))?
            .map_err(|e| e.to_string())?;
        match frame {
            Some(ClientResponse::BackupChunk(chunk)) => {
                out.write_all(&chunk).map_err(|e| e.to_string())?;
                bytes += chunk.len() as u64;
            }
            Some(ClientResponse::BackupDone(Ok(at))) => return Ok((at, bytes)),
            Some(ClientResponse::BackupDone(Err(why))) => return Err(why.to_string()),
            Some(other) => return Err(format!("unexpected answer {other:?}")),
            None => return Err(format!("{addr} closed the connection mid-backup")),
        }
    }
}

/// Sends `request` to `addr` on a fresh connection (handshake first, with `secret`) and
/// waits for the answer: connecting and the handshake within `connect_timeout`, the answer
/// within `request_timeout`.
pub async fn call(
    addr: SocketAddr,
    secret: &Secret,
    request: &ClientRequest,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<ClientResponse, CallError> {
    // Refuse what cannot be sent before connecting at all.
    let body =
        postcard::to_allocvec(request).map_err(|e| CallError::Lost(ProtoError::Decode(e)))?;
    if body.len() > MAX_CLIENT_FRAME {
        return Err(CallError::TooLarge(body.len(), MAX_CLIENT_FRAME));
    }
    let mut stream = match timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(CallError::Connect(ProtoError::Io(e))),
        Err(_) => return Err(CallError::Connect(ProtoError::TimedOut)),
    };
    let _ = stream.set_nodelay(true);
    match timeout(connect_timeout, client_handshake(&mut stream, secret)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(CallError::Handshake(e)),
        Err(_) => return Err(CallError::Handshake(ProtoError::TimedOut)),
    }
    let exchange = async {
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        stream.write_all(&frame).await.map_err(ProtoError::Io)?;
        match read_message(&mut stream).await? {
            Some(r) => Ok(r),
            None => Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    };
    match timeout(request_timeout, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(CallError::Lost(e)),
        Err(_) => Err(CallError::Lost(ProtoError::TimedOut)),
    }
}

/// Sends one request to `addr` on a fresh connection, without a secret, and waits for the
/// answer.
pub async fn request(
    addr: SocketAddr,
    request: &ClientRequest,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<ClientResponse, CallError> {
    call(
        addr,
        &Secret::none(),
        request,
        connect_timeout,
        request_timeout,
    )
    .await
}

/// Asks the node at `addr` for its status (no secret).
pub async fn status(addr: SocketAddr, deadline: Duration) -> Result<NodeStatusView, CallError> {
    status_with(addr, &Secret::none(), deadline).await
}

/// Asks the node at `addr` for its status, proving `secret`.
pub async fn status_with(
    addr: SocketAddr,
    secret: &Secret,
    deadline: Duration,
) -> Result<NodeStatusView, CallError> {
    match call(addr, secret, &ClientRequest::Status, deadline, deadline).await? {
        ClientResponse::Status(s) => Ok(*s),
        ClientResponse::Result(_) => Err(CallError::Lost(ProtoError::Io(std::io::Error::other(
            "a result where a status was expected",
        )))),
        _ => Err(CallError::Lost(ProtoError::Io(std::io::Error::other(
            "another answer where a status was expected",
        )))),
    }
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002` into node ids and addresses.
pub fn parse_addrs(list: &str) -> Result<BTreeMap<NodeId, SocketAddr>, String> {
    let mut out = BTreeMap::new();
    for item in list.split(',').filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not ID=HOST:PORT"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("`{id}` is not a node id"))?;
        if id == 0 {
            return Err("node ids start at 1".into());
        }
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP:PORT address"))?;
        if out.insert(id, addr).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("no nodes listed".into());
    }
    Ok(out)
}
