//! [`TcpKvEndpoint`]: how [`raftkv::kv::KvClient`] reaches the nodes of the TCP demo over
//! the client protocol (one fresh connection per request), following membership changes.
//!
//! A submodule of `client_proto.rs`, which re-exports it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use raftkv::error::ProposeError;
use raftkv::kv::{Bytes, KvEndpoint, KvResult};
use raftkv::NodeId;

use super::guard::Secret;
use super::CLIENT_FRAME_OVERHEAD;
use super::{call, members, CallError, ClientFailure, ClientRequest, ClientResponse};

/// What a [`TcpKvEndpoint`] last saw of one node: enough for a client to say what is true
/// when a request fails (no quorum reachable, a refused secret, a full disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// No connection could be made (the reason).
    Unreachable(String),
    /// Connected, but the handshake failed (the reason): a wrong or missing secret, or not a
    /// node's client port.
    Refused(String),
    /// The node answered: done, or its refusal. (A request too large to send is recorded
    /// here as `TooLarge` too, though it never left.)
    Answered(Result<(), ClientFailure>),
    /// The request left and no answer came (the reason).
    NoAnswer(String),
}

/// A [`KvEndpoint`] over TCP: one fresh connection per request to the node's client address.
///
/// Failures map back to [`ProposeError`] so [`raftkv::kv::KvClient`] follows redirects and
/// retries: a node's own answer keeps its meaning; a connection that cannot be made or a
/// handshake that fails is `Shutdown` (nothing was sent); a request too large to send is
/// `TooLarge`; a connection lost after the request left, or a request that got no answer in
/// time, is `Timeout` (it may or may not have been applied, and the client retries it under
/// the same number). What it saw of each node is kept ([`TcpKvEndpoint::seen`]).
///
/// It follows membership changes: the leader's answer to a member request
/// ([`TcpKvEndpoint::member_request`]) replaces its nodes with the members, at the client
/// addresses the answer gives (and the ones it had for the others). It asks for the members
/// when a node cannot be reached, when a node names a leader it does not know, and at most
/// every [`MEMBERS_REFRESH`] otherwise (in the background). Clones share the nodes.
#[derive(Clone, Debug)]
pub struct TcpKvEndpoint {
    nodes: Arc<Mutex<BTreeMap<NodeId, SocketAddr>>>,
    /// How long connecting (and the handshake) may take.
    pub connect_timeout: Duration,
    /// How long a request may wait for its answer once sent.
    pub request_timeout: Duration,
    /// The client secret proven in the handshake.
    pub secret: Secret,
    seen: Arc<Mutex<BTreeMap<NodeId, (Instant, Seen)>>>,
    /// When the members were last asked for.
    refreshed: Arc<Mutex<Option<Instant>>>,
}

/// A [`TcpKvEndpoint`] asks for the members at most this often when nothing fails.
pub const MEMBERS_REFRESH: Duration = Duration::from_secs(5);
/// ... and at most this often when a node is unreachable or unknown.
pub const MEMBERS_RETRY: Duration = Duration::from_millis(500);

/// Why a member request got no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberCallError {
    /// The leader refused it.
    Refused(members::MemberFailure),
    /// No leader answered before the deadline (the last thing seen). For a change, it may
    /// have been made.
    Unanswered(String),
}

impl fmt::Display for MemberCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberCallError::Refused(why) => write!(f, "{why}"),
            MemberCallError::Unanswered(why) => write!(f, "no answer from a leader: {why}"),
        }
    }
}

impl TcpKvEndpoint {
    /// An endpoint for the nodes at `nodes` (node id to client address), with a 1 s connect
    /// and a 7 s request timeout, and no secret.
    pub fn new(nodes: impl IntoIterator<Item = (NodeId, SocketAddr)>) -> Self {
        TcpKvEndpoint {
            nodes: Arc::new(Mutex::new(nodes.into_iter().collect())),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(7),
            secret: Secret::none(),
            seen: Arc::default(),
            refreshed: Arc::default(),
        }
    }

    /// The same endpoint, proving `secret`.
    pub fn with_secret(mut self, secret: Secret) -> Self {
        self.secret = secret;
        self
    }

    /// The client address of `node`.
    pub fn addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.nodes.lock().get(&node).copied()
    }

    /// The nodes and their client addresses.
    pub fn addrs(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.nodes.lock().clone()
    }

    /// What this endpoint (and its clones) last saw of each node, and when.
    pub fn seen(&self) -> BTreeMap<NodeId, (Instant, Seen)> {
        self.seen.lock().clone()
    }

    fn saw(&self, node: NodeId, what: Seen) {
        self.seen.lock().insert(node, (Instant::now(), what));
    }

    /// Takes the members of `view` as its nodes: those with a client address are added (or
    /// moved), those that are not members are dropped (unless none would be left).
    pub fn learn(&self, view: &members::MembersView) {
        let members = view.members();
        let mut nodes = self.nodes.lock();
        for (id, addrs) in &view.addrs {
            if let Some(client) = addrs.client {
                nodes.insert(*id, client);
            }
        }
        if nodes.keys().any(|id| members.contains(id)) {
            nodes.retain(|id, _| members.contains(id));
        }
    }

    /// Sends a member request ([`ClientRequest::Members`], `AddLearner`, `Promote`,
    /// `Remove`, `TransferLeadership`) to the leader, following redirects and retrying
    /// transient refusals (a learner catching up, a change under way, no leader yet) until
    /// `deadline`, and learns the members from the answer. A change whose answer was lost is
    /// not sent again (it may have been made): that is `Unanswered`.
    pub async fn member_request(
        &self,
        request: &ClientRequest,
        deadline: Duration,
    ) -> Result<members::MembersView, MemberCallError> {
        let until = Instant::now() + deadline;
        let read_only = matches!(request, ClientRequest::Members);
        *self.refreshed.lock() = Some(Instant::now());
        let mut next: Option<NodeId> = None;
        let mut cursor = 0usize;
        let mut last = "no node tried".to_string();
        let mut backoff = Duration::from_millis(20);
        loop {
            let nodes: Vec<NodeId> = self.nodes.lock().keys().copied().collect();
            let node = next.take().unwrap_or_else(|| {
                cursor = (cursor + 1) % nodes.len().max(1);
                nodes.get(cursor).copied().unwrap_or(0)
            });
            let mut redirected = false;
            if let Some(addr) = self.addr(node) {
                let left = until.saturating_duration_since(Instant::now());
                let answer = call(
                    addr,
                    &self.secret,
                    request,
                    self.connect_timeout.min(left),
                    self.request_timeout.min(left.max(Duration::from_millis(1))),
                )
                .await;
                match answer {
                    Ok(ClientResponse::Members(Ok(view))) => {
                        self.learn(&view);
                        return Ok(view);
                    }
                    Ok(ClientResponse::Members(Err(members::MemberFailure::LeaderAt(
                        l,
                        client,
                    )))) if l != node => {
                        self.nodes.lock().insert(l, client);
                        last = format!("node {node} is not the leader (node {l} at {client} is)");
                        next = Some(l);
                        redirected = true;
                    }
                    Ok(ClientResponse::Members(Err(members::MemberFailure::NotLeader(Some(
                        l,
                    )))))
                        if l != node && self.addr(l).is_some() =>
                    {
                        last = format!("node {node} is not the leader (node {l} is)");
                        next = Some(l);
                        redirected = true;
                    }
                    Ok(ClientResponse::Members(Err(f))) if f.is_transient() => {
                        last = format!("node {node}: {f}");
                    }
                    Ok(ClientResponse::Members(Err(
                        f @ (members::MemberFailure::NotLeader(_)
                        | members::MemberFailure::LeaderAt(..)),
                    ))) => last = format!("node {node}: {f}"),
                    Ok(ClientResponse::Members(Err(f))) => return Err(MemberCallError::Refused(f)),
                    Ok(other) => last = format!("node {node}: unexpected answer {other:?}"),
                    Err(e @ (CallError::Connect(_) | CallError::Handshake(_))) => {
                        last = format!("node {node}: {e}");
                    }
                    Err(e) if read_only => last = format!("node {node}: {e}"),
                    Err(e) => {
                        return Err(MemberCallError::Unanswered(format!(
                            "node {node}: {e}; the change may have been made (see `kv members`)"
                        )))
                    }
                }
            }
            if Instant::now() >= until {
                return Err(MemberCallError::Unanswered(last));
            }
            if !redirected {
                tokio::time::sleep(backoff.min(until.saturating_duration_since(Instant::now())))
                    .await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }

    /// Asks for the members if it has not for `at_least`; `background` does it in a task.
    async fn refresh(&self, at_least: Duration, background: bool) {
        {
            let mut refreshed = self.refreshed.lock();
            if refreshed.is_some_and(|at| at.elapsed() < at_least) {
                return;
            }
            *refreshed = Some(Instant::now());
        }
        let me = self.clone();
        let ask = async move {
            let _ = me
                .member_request(&ClientRequest::Members, Duration::from_secs(2))
                .await;
        };
        if background {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(ask);
            }
        } else {
            ask.await;
        }
    }

    async fn call(&self, node: NodeId, req: ClientRequest) -> Result<KvResult, ProposeError> {
        let result = self.call_once(node, req).await;
        match &result {
            Err(ProposeError::Shutdown) => self.refresh(MEMBERS_RETRY, false).await,
            Err(ProposeError::NotLeader { leader: Some(l) }) if self.addr(*l).is_none() => {
                self.refresh(MEMBERS_RETRY, false).await
            }
            _ => self.refresh(MEMBERS_REFRESH, true).await,
        }
        result
    }

    async fn call_once(&self, node: NodeId, req: ClientRequest) -> Result<KvResult, ProposeError> {
        let Some(addr) = self.addr(node) else {
            self.saw(node, Seen::Unreachable("not a known node".into()));
            return Err(ProposeError::Shutdown);
        };
        let answer = call(
            addr,
            &self.secret,
            &req,
            self.connect_timeout,
            self.request_timeout,
        )
        .await;
        match answer {
            Ok(ClientResponse::Result(r)) => {
                self.saw(
                    node,
                    Seen::Answered(r.as_ref().map(|_| ()).map_err(Clone::clone)),
                );
                r.map_err(ProposeError::from)
            }
            Ok(ClientResponse::Status(_) | ClientResponse::BackupChunk(_))
            | Ok(ClientResponse::BackupDone(_) | ClientResponse::Members(_)) => {
                self.saw(
                    node,
                    Seen::NoAnswer("another answer for a KV request".into()),
                );
                Err(ProposeError::Timeout)
            }
            Err(CallError::Connect(e)) => {
                self.saw(node, Seen::Unreachable(e.to_string()));
                Err(ProposeError::Shutdown)
            }
            Err(CallError::Handshake(e)) => {
                self.saw(node, Seen::Refused(e.to_string()));
                Err(ProposeError::Shutdown)
            }
            Err(CallError::TooLarge(n, max)) => {
                // The entry limit is what the command's size is measured against; the frame
                // adds only its overhead.
                let (size, max) = (n as u64, (max - CLIENT_FRAME_OVERHEAD) as u64);
                self.saw(
                    node,
                    Seen::Answered(Err(ClientFailure::TooLarge { size, max })),
                );
                Err(ProposeError::TooLarge { size, max })
            }
            // A lost connection, a bad frame, or no answer in time: the request's fate is
            // unknown.
            Err(CallError::Lost(e)) => {
                self.saw(node, Seen::NoAnswer(e.to_string()));
                Err(ProposeError::Timeout)
            }
        }
    }
}

#[async_trait]
impl KvEndpoint for TcpKvEndpoint {
    fn nodes(&self) -> Vec<NodeId> {
        self.nodes.lock().keys().copied().collect()
    }
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError> {
        self.call(node, ClientRequest::Propose(command)).await
    }
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError> {
        self.call(node, ClientRequest::Read(query)).await
    }
}
