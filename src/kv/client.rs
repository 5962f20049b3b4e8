//! [`KvClient`]: the host's handle on the replicated map. It opens a session, numbers its
//! requests, finds the leader and follows redirects, and retries with backoff until a
//! deadline. A retried write keeps its number, so the session applies it exactly once even
//! when an earlier attempt did commit (its answer was lost, or it timed out).
//!
//! It talks to the cluster through a [`KvEndpoint`] (in-process [`Node`]s, or anything that
//! can reach a node by id, such as a TCP client) and works on any executor;
//! [`KvClient::blocking`] wraps it for synchronous code.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::command::{encode_command, encode_query, Bytes, KvCommand, KvError, KvOp, KvResult};
use super::machine::request;
use super::timer::sleep;
use crate::error::ProposeError;
use crate::raft::NodeId;
use crate::Node;

/// How a client reaches the nodes of a cluster.
#[async_trait]
pub trait KvEndpoint: Send + Sync {
    /// The nodes it can talk to.
    fn nodes(&self) -> Vec<NodeId>;
    /// Proposes a command on `node` (see [`Node::propose`]).
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError>;
    /// Runs a linearizable read on `node` (see [`Node::read`]).
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError>;
}

/// In-process nodes as an endpoint.
#[async_trait]
impl KvEndpoint for Vec<Node<KvResult>> {
    fn nodes(&self) -> Vec<NodeId> {
        self.iter().map(Node::id).collect()
    }
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError> {
        match self.iter().find(|n| n.id() == node) {
            Some(n) => n.propose(command).await,
            None => Err(ProposeError::Shutdown),
        }
    }
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError> {
        match self.iter().find(|n| n.id() == node) {
            Some(n) => n.read(query).await,
            None => Err(ProposeError::Shutdown),
        }
    }
}

/// Retry settings.
#[derive(Clone, Copy, Debug)]
pub struct ClientOptions {
    /// Give up on a request after this long (default 10 s).
    pub deadline: Duration,
    /// First backoff after a failed attempt (default 10 ms), doubling up to `max_backoff`.
    pub backoff: Duration,
    /// Largest backoff (default 500 ms).
    pub max_backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: Duration::from_secs(10),
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// Why a client request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No node answered within the deadline. A write may or may not have been applied; it
    /// will not be applied twice (retry it with the same client to find out).
    #[error("no answer within the deadline after {attempts} attempts (last error: {last})")]
    Timeout {
        /// Attempts made.
        attempts: u32,
        /// The last error seen.
        last: String,
    },
    /// The service refused the request (for instance the session expired).
    #[error("refused: {0}")]
    Refused(KvError),
    /// The cluster gave an answer of the wrong kind for the request (a bug or a version mix).
    #[error("unexpected answer {0:?}")]
    Unexpected(KvResult),
}

/// A session with the replicated map. Requests are sequential per client (`&mut self`); use
/// one client per concurrent caller.
pub struct KvClient<E> {
    endpoint: E,
    options: ClientOptions,
    session: u64,
    seq: u64,
    leader: Option<NodeId>,
    /// Rotates through the nodes when no leader is known.
    cursor: usize,
}

impl<E: KvEndpoint> KvClient<E> {
    /// Opens a session on the cluster reached through `endpoint`.
    pub async fn connect(endpoint: E, options: ClientOptions) -> Result<Self, ClientError> {
        let mut c = KvClient {
            endpoint,
            options,
            session: 0,
            seq: 0,
            leader: None,
            cursor: 0,
        };
        match c
            .attempt(true, encode_command(&KvCommand::Register))
            .await?
        {
            KvResult::Registered(id) => c.session = id,
            other => return Err(ClientError::Unexpected(other)),
        }
        Ok(c)
    }

    /// The session id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The value of `key`.
    pub async fn get(&mut self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        match self.read(KvOp::Get { key: key.into() }).await? {
            KvResult::Value(v) => Ok(v),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Up to `limit` entries with keys in `start..end`, in order.
    pub async fn scan(
        &mut self,
        start: impl Into<Bytes>,
        end: Option<Bytes>,
        limit: u32,
    ) -> Result<Vec<(Bytes, Bytes)>, ClientError> {
        match self
            .read(KvOp::Scan {
                start: start.into(),
                end,
                limit,
            })
            .await?
        {
            KvResult::Entries(e) => Ok(e),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Sets `key` to `value`.
    pub async fn put(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        self.expect_done(KvOp::Put {
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// Appends `value` to `key`'s value.
    pub async fn append(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        self.expect_done(KvOp::Append {
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// Removes `key`; returns whether it existed.
    pub async fn delete(&mut self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        self.expect_flag(KvOp::Delete { key: key.into() }).await
    }

    /// Sets `key` to `new` if its value is `expected`; returns whether it did.
    pub async fn cas(
        &mut self,
        key: impl Into<Bytes>,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<bool, ClientError> {
        self.expect_flag(KvOp::Cas {
            key: key.into(),
            expected,
            new,
        })
        .await
    }

    async fn expect_done(&mut self, op: KvOp) -> Result<(), ClientError> {
        match self.write(op).await? {
            KvResult::Done => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    async fn expect_flag(&mut self, op: KvOp) -> Result<bool, ClientError> {
        match self.write(op).await? {
            KvResult::Flag(f) => Ok(f),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// A numbered write: every retry carries the same number.
    async fn write(&mut self, op: KvOp) -> Result<KvResult, ClientError> {
        self.seq += 1;
        let command = request(self.session, self.seq, op);
        self.attempt(true, command).await
    }

    async fn read(&mut self, op: KvOp) -> Result<KvResult, ClientError> {
        self.attempt(false, encode_query(&op)).await
    }

    fn target(&mut self) -> NodeId {
        if let Some(l) = self.leader {
            return l;
        }
        let nodes = self.endpoint.nodes();
        if nodes.is_empty() {
            return 0;
        }
        self.cursor = (self.cursor + 1) % nodes.len();
        nodes[self.cursor]
    }

    async fn attempt(&mut self, write: bool, bytes: Bytes) -> Result<KvResult, ClientError> {
        let deadline = Instant::now() + self.options.deadline;
        let mut backoff = self.options.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let node = self.target();
            let answer = if write {
                self.endpoint.propose(node, bytes.clone()).await
            } else {
                self.endpoint.read(node, bytes.clone()).await
            };
            let last = match answer {
                Ok(KvResult::Error(e)) => return Err(ClientError::Refused(e)),
                Ok(result) => {
                    self.leader = Some(node);
                    return Ok(result);
                }
                Err(ProposeError::NotLeader { leader: Some(l) }) if Some(l) != self.leader => {
                    self.leader = Some(l);
                    continue; // a redirect: retry at once
                }
                Err(e) => {
                    self.leader = None;
                    e.to_string()
                }
            };
            if Instant::now() + backoff > deadline {
                return Err(ClientError::Timeout { attempts, last });
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
        }
    }

    /// A synchronous wrapper (each call blocks the calling thread on the async one).
    pub fn blocking(self) -> BlockingKvClient<E> {
        BlockingKvClient { inner: self }
    }
}

/// [`KvClient`] for synchronous code.
pub struct BlockingKvClient<E> {
    inner: KvClient<E>,
}

impl<E: KvEndpoint> BlockingKvClient<E> {
    /// Opens a session, blocking.
    pub fn connect(endpoint: E, options: ClientOptions) -> Result<Self, ClientError> {
        futures::executor::block_on(KvClient::connect(endpoint, options)).map(KvClient::blocking)
    }
    /// See [`KvClient::get`].
    pub fn get(&mut self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        futures::executor::block_on(self.inner.get(key))
    }
    /// See [`KvClient::put`].
    pub fn put(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        futures::executor::block_on(self.inner.put(key, value))
    }
    /// See [`KvClient::append`].
    pub fn append(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        futures::executor::block_on(self.inner.append(key, value))
    }
    /// See [`KvClient::delete`].
    pub fn delete(&mut self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        futures::executor::block_on(self.inner.delete(key))
    }
    /// See [`KvClient::cas`].
    pub fn cas(
        &mut self,
        key: impl Into<Bytes>,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<bool, ClientError> {
        futures::executor::block_on(self.inner.cas(key, expected, new))
    }
    /// See [`KvClient::scan`].
    pub fn scan(
        &mut self,
        start: impl Into<Bytes>,
        end: Option<Bytes>,
        limit: u32,
    ) -> Result<Vec<(Bytes, Bytes)>, ClientError> {
        futures::executor::block_on(self.inner.scan(start, end, limit))
    }
}
