//! [`Caller`]: the part of a client that talks to the cluster — it finds the leader, follows
//! redirects (a bounded number of times per round) and retries with backoff until a deadline
//! that also bounds every attempt, and it tells which attempts may have been applied.

use std::time::{Duration, Instant};

use futures::future::{select, Either};
use serde::{Deserialize, Serialize};

use super::client::{ClientError, Response};
use super::command::{encode_query, KvOp, KvResult};
use super::endpoint::KvEndpoint;
use super::timer::sleep;
use crate::error::ProposeError;
use crate::raft::NodeId;

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

/// Why the cluster gave no definite answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Cause {
    /// No node knew of a leader: an election is under way, or no majority is reachable.
    #[error("no leader: an election is under way or no majority of the nodes is reachable")]
    NoLeader,
    /// A node took the request but gave no answer in time: its leader may have lost its
    /// majority, or the connection broke.
    #[error("a node took the request but gave no answer in time")]
    NoAnswer,
    /// Leadership changed before the request committed (that attempt was not applied).
    #[error("leadership changed before the request committed")]
    LeaderChanged,
    /// The leader had too many requests in flight.
    #[error("the leader is busy")]
    Busy,
    /// The nodes tried are shut down or unreachable.
    #[error("the nodes tried are shut down or unreachable")]
    Shutdown,
    /// The disk of `node` is full (of the leader, or of every node tried). Returned at once:
    /// it lasts until space is freed.
    #[error("the disk of node {node} is full")]
    NoSpace {
        /// The node.
        node: NodeId,
    },
    /// The last node tried refused the request as larger than its largest entry (after an
    /// earlier node took it: the nodes' `max_entry_bytes` differ).
    #[error("request of {size} bytes exceeds node's largest entry of {max} bytes")]
    TooLarge {
        /// Bytes the entry would take.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The nodes do not serve reads (their state machine is not the KV one).
    #[error("the nodes do not serve reads")]
    Unsupported,
    /// The session expired after an attempt whose outcome is unknown: the cluster no longer
    /// remembers whether it was applied. Final.
    #[error("session {session} expired after an attempt whose outcome is unknown")]
    SessionExpired {
        /// The session.
        session: u64,
    },
    /// A later request of the same session was applied, so this one was applied before it or
    /// never will be; its result is no longer kept. Final.
    #[error("request {seq} was superseded by request {latest} of its session")]
    Superseded {
        /// The request's number.
        seq: u64,
        /// The session's latest.
        latest: u64,
    },
}

impl Cause {
    /// False for the causes after which [`KvClient::retry`](crate::kv::KvClient::retry) can no longer learn the outcome
    /// ([`Cause::SessionExpired`], [`Cause::Superseded`]).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Cause::SessionExpired { .. } | Cause::Superseded { .. }
        )
    }
}

/// How a call to the cluster ended without an answer from the state machine.
pub(crate) enum CallError {
    Deadline { attempts: u32, cause: Cause },
    NoSpace { attempts: u32, node: NodeId },
    TooLarge { size: u64, max: u64 },
    Unsupported { attempts: u32 },
}

/// Finds the leader and retries under a deadline: the part of a client that talks.
pub(crate) struct Caller<E> {
    pub(crate) endpoint: E,
    pub(crate) options: ClientOptions,
    leader: Option<NodeId>,
    /// Rotates through the nodes when no leader is known.
    cursor: usize,
}

impl<E: KvEndpoint> Caller<E> {
    pub(crate) fn new(endpoint: E, options: ClientOptions) -> Self {
        Caller {
            endpoint,
            options,
            leader: None,
            cursor: 0,
        }
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

    /// Sends `bytes` (a proposal, or a read) until a node's state machine answers or
    /// `deadline` passes. Sets `taken` once an attempt may have been applied.
    pub(crate) async fn call(
        &mut self,
        propose: bool,
        bytes: &[u8],
        deadline: Instant,
        taken: &mut bool,
    ) -> Result<KvResult, CallError> {
        let mut backoff = self.options.backoff;
        let mut attempts = 0;
        let mut full: Vec<NodeId> = Vec::new();
        let mut redirects = 0;
        loop {
            attempts += 1;
            let node = self.target();
            let attempt = async {
                if propose {
                    self.endpoint.propose(node, bytes.to_vec()).await
                } else {
                    self.endpoint.read(node, bytes.to_vec()).await
                }
            };
            // The deadline bounds every attempt too: no answer by then is no answer.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let answer = match select(Box::pin(attempt), sleep(remaining)).await {
                Either::Left((answer, _)) => answer,
                Either::Right(_) => Err(ProposeError::Timeout),
            };
            let cause = match answer {
                Ok(result) => {
                    self.leader = Some(node);
                    return Ok(result);
                }
                Err(ProposeError::NotLeader { leader: Some(l) })
                    if l != node && redirects <= self.endpoint.nodes().len() =>
                {
                    if full.contains(&l) {
                        return Err(CallError::NoSpace { attempts, node: l });
                    }
                    self.leader = Some(l);
                    redirects += 1;
                    continue; // a redirect: retry at once (a bounded number of times)
                }
                Err(ProposeError::NotLeader { .. }) => Cause::NoLeader,
                Err(ProposeError::Timeout) => {
                    *taken |= propose;
                    Cause::NoAnswer
                }
                Err(ProposeError::Shutdown) => {
                    *taken |= propose;
                    Cause::Shutdown
                }
                Err(ProposeError::Dropped) => Cause::LeaderChanged,
                Err(ProposeError::Busy) => Cause::Busy,
                Err(ProposeError::NoSpace) => {
                    // The known leader's disk, or every node's: it will not pass by retrying.
                    full.push(node);
                    let all_full = self.endpoint.nodes().iter().all(|n| full.contains(n));
                    if self.leader == Some(node) || all_full {
                        return Err(CallError::NoSpace { attempts, node });
                    }
                    Cause::NoSpace { node }
                }
                Err(ProposeError::TooLarge { size, max }) => {
                    return Err(CallError::TooLarge { size, max })
                }
                Err(ProposeError::Unsupported) => return Err(CallError::Unsupported { attempts }),
            };
            // Busy: the leader is still the leader. Otherwise look for another.
            if cause != Cause::Busy {
                self.leader = None;
            }
            if Instant::now() + backoff > deadline {
                return Err(CallError::Deadline { attempts, cause });
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
            redirects = 0;
        }
    }

    /// A read: no session, nothing applied whatever happens.
    pub(crate) async fn read(&mut self, op: &KvOp) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.options.deadline;
        let mut taken = false;
        match self
            .call(false, &encode_query(op), deadline, &mut taken)
            .await
        {
            Ok(KvResult::Ok { revision, answer }) => Ok(Response { revision, answer }),
            Ok(KvResult::Error(e)) => Err(ClientError::Refused(e)),
            Ok(other) => Err(ClientError::Unexpected(other)),
            Err(e) => Err(not_applied(e)),
        }
    }
}

impl CallError {
    /// Attempts made, and the cause.
    pub(crate) fn parts(self) -> (u32, Cause) {
        match self {
            CallError::Deadline { attempts, cause } => (attempts, cause),
            CallError::NoSpace { attempts, node } => (attempts, Cause::NoSpace { node }),
            CallError::TooLarge { size, max } => (1, Cause::TooLarge { size, max }),
            CallError::Unsupported { attempts } => (attempts, Cause::Unsupported),
        }
    }
}

/// The error for a call none of whose attempts was taken.
pub(crate) fn not_applied(e: CallError) -> ClientError {
    match e {
        CallError::TooLarge { size, max } => ClientError::TooLarge { size, max },
        e => {
            let (attempts, cause) = e.parts();
            ClientError::Unavailable { attempts, cause }
        }
    }
}
