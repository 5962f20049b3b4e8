//! The client protocol of the TCP demo node (`examples/node.rs`): how a client reaches one
//! node's KV service, and [`TcpKvEndpoint`], which lets [`raftkv::kv::KvClient`] use it.
//!
//! Shared by the examples and tests; include it with
//! `#[path = "common/client_proto.rs"] mod client_proto;`. Like `tcp.rs` it runs on tokio.
//!
//! # Format
//! A connection carries request/response pairs, one at a time, in order. Each message is a
//! frame: `u32 LE length | postcard body`, the body a [`ClientRequest`] (client to node) or a
//! [`ClientResponse`] (node to client). A frame longer than [`MAX_CLIENT_FRAME`] is refused
//! with [`ProtoError::TooLarge`] before its body is read; any decode error closes the
//! connection (the node logs it), never the node.
//!
//! # Limits
//! - [`serve_clients`] keeps at most [`MAX_CLIENT_CONNECTIONS`] connections and closes one that
//!   stays idle for [`IDLE_TIMEOUT`].
//! - [`TcpKvEndpoint`] connects within its `connect_timeout` and gives each request its
//!   `request_timeout` (longer than the node's own propose timeout, so the node's answer —
//!   including its own `Timeout` — normally arrives first).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use raftkv::error::ProposeError;
use raftkv::kv::{Bytes, KvEndpoint, KvResult};
use raftkv::{Node, NodeId, NodeStatus};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Largest frame body either side accepts (16 MiB).
pub const MAX_CLIENT_FRAME: usize = 16 << 20;
/// Client connections a node keeps open at most.
pub const MAX_CLIENT_CONNECTIONS: usize = 256;
/// A client connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
        }
    }
}

/// What a node answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// The answer to `Propose` or `Read`.
    Result(Result<KvResult, ClientFailure>),
    /// The answer to `Status`.
    Status(NodeStatusView),
    /// The next bytes of a backup (at most 1 MiB).
    BackupChunk(Vec<u8>),
    /// The end of a backup: its index and term, or why it failed (the chunks sent before
    /// a failure are not a backup).
    BackupDone(Result<(u64, u64), ClientFailure>),
}

/// Why a frame could not be read or written.
#[derive(Debug)]
pub enum ProtoError {
    /// The socket failed or closed.
    Io(std::io::Error),
    /// A frame announced more than [`MAX_CLIENT_FRAME`] bytes.
    TooLarge(usize),
    /// The body is not a message of this protocol.
    Decode(postcard::Error),
    /// No answer within the deadline.
    TimedOut,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "io: {e}"),
            ProtoError::TooLarge(n) => {
                write!(
                    f,
                    "frame of {n} bytes exceeds the {MAX_CLIENT_FRAME}-byte limit"
                )
            }
            ProtoError::Decode(e) => write!(f, "undecodable frame: {e}"),
            ProtoError::TimedOut => write!(f, "timed out"),
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
        return Err(ProtoError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame).await.map_err(ProtoError::Io)?;
    writer.flush().await.map_err(ProtoError::Io)
}

/// Reads one frame; `Ok(None)` on a clean end of stream before its first byte.
pub async fn read_message<R, T>(reader: &mut R) -> Result<Option<T>, ProtoError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        let n = reader.read(&mut len[got..]).await.map_err(ProtoError::Io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CLIENT_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(ProtoError::Io)?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(ProtoError::Decode)
}

/// Serves clients of `node` on `listener` until the future is dropped. Each connection
/// answers its requests in order; a bad frame closes that connection only.
pub async fn serve_clients(listener: TcpListener, node: Node<KvResult>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    if connections.len() >= MAX_CLIENT_CONNECTIONS {
                        eprintln!("client port: refusing {addr}: {MAX_CLIENT_CONNECTIONS} connections open");
                        continue;
                    }
                    let node = node.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve_connection(stream, node).await {
                            eprintln!("client port: connection from {addr}: {e}; closing it");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("client port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(mut stream: TcpStream, node: Node<KvResult>) -> Result<(), ProtoError> {
    let _ = stream.set_nodelay(true);
    loop {
        let request = match timeout(IDLE_TIMEOUT, read_message(&mut stream)).await {
            Err(_) => return Ok(()), // idle: close quietly
            Ok(read) => match read? {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        let response = match request {
            ClientRequest::Propose(command) => {
                ClientResponse::Result(node.propose(command).await.map_err(ClientFailure::from))
            }
            ClientRequest::Read(query) => {
                ClientResponse::Result(node.read(query).await.map_err(ClientFailure::from))
            }
            ClientRequest::Status => ClientResponse::Status(NodeStatusView::from(&node.status())),
            ClientRequest::Backup => {
                let done = stream_backup(&mut stream, &node).await?;
                ClientResponse::BackupDone(done)
            }
        };
        write_message(&mut stream, &response).await?;
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
    out: &mut impl std::io::Write,
    within: Duration,
) -> Result<((u64, u64), u64), String> {
    let mut stream = match timeout(within, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("cannot connect to {addr}: {e}")),
        Err(_) => return Err(format!("cannot connect to {addr}: timed out")),
    };
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

/// Sends one request to `addr` on a fresh connection and waits for the answer.
pub async fn request(
    addr: SocketAddr,
    request: &ClientRequest,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<ClientResponse, ProtoError> {
    let mut stream = match timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(connected) => connected.map_err(ProtoError::Io)?,
        Err(_) => return Err(ProtoError::TimedOut),
    };
    let _ = stream.set_nodelay(true);
    let exchange = async {
        write_message(&mut stream, request).await?;
        match read_message(&mut stream).await? {
            Some(r) => Ok(r),
            None => Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    };
    match timeout(request_timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(ProtoError::TimedOut),
    }
}

/// Asks the node at `addr` for its status.
pub async fn status(addr: SocketAddr, deadline: Duration) -> Result<NodeStatusView, ProtoError> {
    match request(addr, &ClientRequest::Status, deadline, deadline).await? {
        ClientResponse::Status(s) => Ok(s),
        _ => Err(ProtoError::Io(std::io::Error::other(
            "another answer where a status was expected",
        ))),
    }
}

/// A [`KvEndpoint`] over TCP: one fresh connection per request to the node's client address.
///
/// Failures map back to [`ProposeError`] so [`raftkv::kv::KvClient`] follows redirects and
/// retries: a node's own answer keeps its meaning; a connection that cannot be made is
/// `Shutdown` (nothing was sent); a connection lost after the request left, or a request
/// that got no answer in time, is `Timeout` (it may or may not have been applied, and the
/// client retries it under the same number).
#[derive(Clone, Debug)]
pub struct TcpKvEndpoint {
    nodes: BTreeMap<NodeId, SocketAddr>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long a request may wait for its answer once sent.
    pub request_timeout: Duration,
}

impl TcpKvEndpoint {
    /// An endpoint for the nodes at `nodes` (node id to client address), with a 1 s connect
    /// and a 7 s request timeout.
    pub fn new(nodes: impl IntoIterator<Item = (NodeId, SocketAddr)>) -> Self {
        TcpKvEndpoint {
            nodes: nodes.into_iter().collect(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(7),
        }
    }

    /// The client address of `node`.
    pub fn addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.nodes.get(&node).copied()
    }

    async fn call(&self, node: NodeId, req: ClientRequest) -> Result<KvResult, ProposeError> {
        let addr = self.addr(node).ok_or(ProposeError::Shutdown)?;
        let connect = match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            _ => return Err(ProposeError::Shutdown),
        };
        let mut stream = connect;
        let _ = stream.set_nodelay(true);
        let exchange = async {
            write_message(&mut stream, &req).await?;
            read_message::<_, ClientResponse>(&mut stream).await
        };
        match timeout(self.request_timeout, exchange).await {
            Ok(Ok(Some(ClientResponse::Result(r)))) => r.map_err(ProposeError::from),
            // Another answer (a status, a backup's frames) for a KV request, a lost connection,
            // a bad frame, or no answer in time: the request's fate is unknown.
            Ok(Ok(Some(_))) | Ok(Ok(None)) | Ok(Err(_)) | Err(_) => Err(ProposeError::Timeout),
        }
    }
}

#[async_trait]
impl KvEndpoint for TcpKvEndpoint {
    fn nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError> {
        self.call(node, ClientRequest::Propose(command)).await
    }
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError> {
        self.call(node, ClientRequest::Read(query)).await
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
