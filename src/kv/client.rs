//! [`KvClient`]: sessions, numbering and the exactly-once contract, over a [`Caller`].

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::caller::{not_applied, Caller};
use super::changes::Keys;
use super::command::{encode_command, Answer, Bytes, KvCommand, KvError, KvLimits};
use super::command::{request, KvOp, KvResult};
use super::endpoint::KvEndpoint;
use super::txn::{Txn, TxnResponse};
use super::watch::{WatchOptions, Watcher};
use crate::raft::Index;

pub use super::caller::{Cause, ClientOptions};

/// A write whose outcome is unknown: its session, its number and its exact bytes. Re-issue it
/// with [`KvClient::retry`] (any client of the same cluster can; it can be stored, it is
/// serde). Only the session's latest request can be resolved: once the client sends a later
/// write, this one is [`Cause::Superseded`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWrite {
    session: u64,
    seq: u64,
    command: Bytes,
}

impl PendingWrite {
    /// The session it was sent in.
    pub fn session(&self) -> u64 {
        self.session
    }
    /// Its number in the session.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Why a client request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The write's outcome is unknown: it may have been applied, and will never be applied
    /// twice. [`KvClient::retry`] with `request` learns the real result if `cause` is
    /// [retryable](Cause::is_retryable). (Reads never end this way.)
    #[error(
        "outcome unknown after {attempts} attempts ({cause}); the write may have been applied, \
         never twice"
    )]
    Timeout {
        /// Attempts made.
        attempts: u32,
        /// Why no definite answer came.
        cause: Cause,
        /// The request, to re-issue.
        request: PendingWrite,
    },
    /// Not applied: within the deadline no node took the request (or a full disk refused it).
    #[error("unavailable after {attempts} attempts ({cause}); nothing was applied")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// Why.
        cause: Cause,
    },
    /// Not applied: the request takes `size` bytes as a log entry, above the cluster's
    /// largest entry (`max`).
    #[error("request of {size} bytes exceeds the largest entry of {max} bytes; not applied")]
    TooLarge {
        /// Bytes the entry would take.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The service refused the request; not applied.
    #[error("refused: {0}")]
    Refused(KvError),
    /// The cluster gave an answer of the wrong kind for the request (a bug or a version mix).
    #[error("unexpected answer {0:?}")]
    Unexpected(KvResult),
}

impl ClientError {
    /// True when a write may have been applied ([`ClientError::Timeout`]).
    pub fn may_be_applied(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// A successful answer and the revision it belongs to: for a write, the index it was applied
/// at; for a read, the revision of the state it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// See above.
    pub revision: Index,
    /// The answer.
    pub answer: Answer,
}

/// A random nonce for registering a session (no dependency: the standard library's
/// randomly keyed hasher, fed with the time and a process-wide counter).
fn random_nonce() -> u128 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let half = |salt: u8| RandomState::new().hash_one((salt, n, now, std::process::id()));
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// Registrations per write at most: a session may expire between its registration and the
/// write (a flood of registrations evicts fresh sessions first).
const MAX_REGISTRATIONS_PER_WRITE: u32 = 3;

/// The host's handle on the replicated map. It finds the leader and follows
/// redirects, retries with backoff until a deadline, opens its session lazily (at the first
/// write; reads need none) and numbers its writes, so a write is applied at most once however
/// often it is retried — by the client within the deadline, or by the host afterwards with
/// [`KvClient::retry`].
///
/// # What an error means
/// Every [`ClientError`] says whether a write may have been applied:
/// - [`ClientError::Timeout`]: *outcome unknown*. Some attempt may have been applied (a node
///   took it and gave no answer in time, its connection was lost, it shut down with the
///   request pending, or the session expired after such an attempt). It is never applied
///   twice. The error carries the [`PendingWrite`]; [`KvClient::retry`] re-issues exactly that
///   request and answers its real result, unless the outcome can no longer be learned (the
///   [`Cause`] says so).
/// - Every other error: *not applied*. [`ClientError::Unavailable`] says why no attempt was
///   taken: no leader, the nodes are shut down, busy, or a full disk (not retried for the
///   whole deadline).
///
/// ```
/// use raftkv::kv::{ClientError, KvClient, KvEndpoint};
///
/// /// Appends `entry` exactly once, or says why the outcome is still unknown.
/// async fn append_once<E: KvEndpoint>(c: &mut KvClient<E>, entry: &str) -> Result<(), ClientError> {
///     let mut outcome = c.append("log", entry).await.map(|_| ());
///     for _ in 0..3 {
///         match outcome {
///             // Same session, same number: applied at most once, and now we learn the result.
///             Err(ClientError::Timeout { request, cause, .. }) if cause.is_retryable() => {
///                 outcome = c.retry(&request).await.map(|_| ());
///             }
///             _ => break,
///         }
///     }
///     outcome
/// }
/// ```
///
/// Requests are sequential per client (`&mut self`); use one client per concurrent caller.
pub struct KvClient<E> {
    caller: Caller<E>,
    /// The open session, once the first write opened it.
    session: Option<u64>,
    /// The nonce the session is (being) registered with.
    nonce: u128,
    /// The number of the latest write sent in the session.
    seq: u64,
}

impl<E: KvEndpoint> KvClient<E> {
    /// A client of the cluster reached through `endpoint`. It contacts no node (so it works
    /// while nodes are down, or in a minority): reads need no session, and the session opens
    /// at the first write. Never fails; the `Result` is kept for compatibility with code that
    /// awaited a registration here.
    pub async fn connect(endpoint: E, options: ClientOptions) -> Result<Self, ClientError> {
        Ok(KvClient {
            caller: Caller::new(endpoint, options),
            session: None,
            nonce: random_nonce(),
            seq: 0,
        })
    }

    /// The session id, or 0 while no write has opened one.
    pub fn session(&self) -> u64 {
        self.session.unwrap_or(0)
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &E {
        &self.caller.endpoint
    }

    /// The value of `key`.
    pub async fn get(&mut self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        match self.query(KvOp::Get { key: key.into() }).await? {
            Response {
                answer: Answer::Value(v),
                ..
            } => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `limit` entries with keys in `start..end`, in order.
    pub async fn scan(
        &mut self,
        start: impl Into<Bytes>,
        end: Option<Bytes>,
        limit: u32,
    ) -> Result<Vec<(Bytes, Bytes)>, ClientError> {
        let op = KvOp::Scan {
            start: start.into(),
            end,
            limit,
        };
        match self.query(op).await? {
            Response {
                answer: Answer::Entries(e),
                ..
            } => Ok(e),
            other => Err(unexpected(other)),
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

    /// Runs a transaction; answers its revision and response. A read-only one is served as a
    /// linearizable read (no log entry, no session).
    pub async fn txn(&mut self, txn: Txn) -> Result<(Index, TxnResponse), ClientError> {
        let op = KvOp::Txn(txn);
        let response = if op.is_read() {
            self.query(op).await?
        } else {
            self.write(op).await?
        };
        match response {
            Response {
                revision,
                answer: Answer::Txn(t),
            } => Ok((revision, t)),
            other => Err(unexpected(other)),
        }
    }

    /// The replicated limits.
    pub async fn limits(&mut self) -> Result<KvLimits, ClientError> {
        match self.query(KvOp::Limits).await? {
            Response {
                answer: Answer::Limits(l),
                ..
            } => Ok(l),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the replicated limits with `new` if they are still `expected` (read them with
    /// [`KvClient::limits`]); returns whether `new` is in force afterwards. Not sessioned:
    /// the compare makes a repeated or delayed change harmless, and a
    /// [`retry`](KvClient::retry) after an unknown outcome answers the limits in force.
    pub async fn set_limits(
        &mut self,
        expected: KvLimits,
        new: KvLimits,
    ) -> Result<bool, ClientError> {
        let pending = PendingWrite {
            session: 0,
            seq: 0,
            command: encode_command(&KvCommand::SetLimits { expected, new }),
        };
        let deadline = Instant::now() + self.caller.options.deadline;
        match self.send(&pending, deadline, false).await? {
            Response {
                answer: Answer::Limits(now),
                ..
            } => Ok(now == new),
            other => Err(unexpected(other)),
        }
    }

    /// A read-only operation ([`KvOp::is_read`]) as a linearizable read, with the revision of
    /// the state it read. No session, no log entry.
    pub async fn query(&mut self, op: KvOp) -> Result<Response, ClientError> {
        if !op.is_read() {
            return Err(ClientError::Refused(KvError::Malformed));
        }
        self.caller.read(&op).await
    }

    /// Any operation as a numbered write through the log (opening the session first if
    /// needed); answers the revision it was applied at. Every attempt within the deadline
    /// carries the same number.
    pub async fn write(&mut self, op: KvOp) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.caller.options.deadline;
        for _ in 0..MAX_REGISTRATIONS_PER_WRITE {
            let session = self.open_session(deadline).await?;
            self.seq += 1;
            let pending = PendingWrite {
                session,
                seq: self.seq,
                command: request(session, self.seq, op.clone()),
            };
            match self.send(&pending, deadline, false).await {
                // No attempt was applied (each got a definite answer), and the session is
                // gone: open a new one and send the write there.
                Err(ClientError::Refused(KvError::SessionExpired { .. })) => {}
                other => return other,
            }
        }
        Err(ClientError::Refused(KvError::SessionExpired {
            client: self.session(),
        }))
    }

    /// Re-issues a write whose outcome was unknown ([`ClientError::Timeout`]): the same
    /// session, number and bytes, so it is applied at most once; answers its real result (its
    /// original revision if it had been applied). If the outcome can no longer be learned the
    /// error is again a `Timeout`, with a final [`Cause`].
    pub async fn retry(&mut self, request: &PendingWrite) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.caller.options.deadline;
        self.send(request, deadline, true).await
    }

    /// Watches `keys` from revision `from` (every change at `from` or later, in order; to
    /// follow a state read at revision `r`, watch from `r + 1`). The watcher has its own
    /// copy of the endpoint and needs no session.
    pub fn watch(&self, keys: Keys, from: Index, options: WatchOptions) -> Watcher<E>
    where
        E: Clone,
    {
        Watcher::new(
            Caller::new(self.caller.endpoint.clone(), self.caller.options),
            keys,
            from,
            options,
        )
    }

    /// Closes the session (if one is open), so it does not wait in the table to expire.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let Some(client) = self.session.take() else {
            return Ok(());
        };
        let command = encode_command(&KvCommand::Unregister { client });
        let deadline = Instant::now() + self.caller.options.deadline;
        let mut taken = false;
        match self.caller.call(true, &command, deadline, &mut taken).await {
            Ok(_) => Ok(()),
            Err(e) => Err(not_applied(e)),
        }
    }

    /// Registers the session if none is open (idempotent: every attempt carries the same
    /// nonce, so lost answers open no second session). A failure here applied nothing of the
    /// write.
    async fn open_session(&mut self, deadline: Instant) -> Result<u64, ClientError> {
        if let Some(s) = self.session {
            return Ok(s);
        }
        let register = encode_command(&KvCommand::Register { nonce: self.nonce });
        let mut taken = false;
        match self
            .caller
            .call(true, &register, deadline, &mut taken)
            .await
        {
            Ok(KvResult::Registered(id)) => {
                self.session = Some(id);
                self.seq = 0;
                Ok(id)
            }
            Ok(KvResult::Error(e)) => Err(ClientError::Refused(e)),
            Ok(other) => Err(ClientError::Unexpected(other)),
            Err(e) => Err(not_applied(e)),
        }
    }

    /// Sends a numbered write until it is answered or `deadline` passes. `unknown`: an
    /// earlier attempt's outcome is already unknown.
    async fn send(
        &mut self,
        pending: &PendingWrite,
        deadline: Instant,
        mut unknown: bool,
    ) -> Result<Response, ClientError> {
        let result = self
            .caller
            .call(true, &pending.command, deadline, &mut unknown)
            .await;
        let timeout = |attempts, cause| ClientError::Timeout {
            attempts,
            cause,
            request: pending.clone(),
        };
        match result {
            Ok(KvResult::Ok { revision, answer }) => Ok(Response { revision, answer }),
            Ok(KvResult::Error(KvError::SessionExpired { client })) => {
                if Some(client) == self.session {
                    self.session = None;
                    self.nonce = random_nonce();
                }
                if unknown {
                    Err(timeout(1, Cause::SessionExpired { session: client }))
                } else {
                    Err(ClientError::Refused(KvError::SessionExpired { client }))
                }
            }
            Ok(KvResult::Error(KvError::Stale { seq, latest })) => {
                Err(timeout(1, Cause::Superseded { seq, latest }))
            }
            Ok(KvResult::Error(e)) => Err(ClientError::Refused(e)),
            Ok(other) => Err(ClientError::Unexpected(other)),
            Err(e) if unknown => {
                let (attempts, cause) = e.parts();
                Err(timeout(attempts, cause))
            }
            Err(e) => Err(not_applied(e)),
        }
    }

    async fn expect_done(&mut self, op: KvOp) -> Result<(), ClientError> {
        match self.write(op).await? {
            Response {
                answer: Answer::Done,
                ..
            } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn expect_flag(&mut self, op: KvOp) -> Result<bool, ClientError> {
        match self.write(op).await? {
            Response {
                answer: Answer::Flag(f),
                ..
            } => Ok(f),
            other => Err(unexpected(other)),
        }
    }

    /// A synchronous wrapper (each call blocks the calling thread on the async one).
    pub fn blocking(self) -> super::blocking::BlockingKvClient<E> {
        super::blocking::BlockingKvClient::new(self)
    }
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Unexpected(KvResult::Ok {
        revision: r.revision,
        answer: r.answer,
    })
}
