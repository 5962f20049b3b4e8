//! [`Watcher`]: a stream of the changes of some keys, by polling the change history.

use std::time::Duration;

use super::caller::Caller;
use super::changes::{Change, Keys};
use super::client::{ClientError, Response};
use super::command::{Answer, KvOp};
use super::endpoint::KvEndpoint;
use super::timer::sleep;
use crate::raft::Index;

/// How a [`Watcher`] polls.
#[derive(Clone, Copy, Debug)]
pub struct WatchOptions {
    /// Wait before polling again once caught up (default 5 ms); doubles while nothing
    /// changes.
    pub min_poll: Duration,
    /// The longest wait between polls (default 100 ms).
    pub max_poll: Duration,
    /// Changes per poll at most (default 1,000; a transaction's changes are never split).
    pub batch: u32,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            min_poll: Duration::from_millis(5),
            max_poll: Duration::from_millis(100),
            batch: 1_000,
        }
    }
}

/// Every change of a key or a prefix, in order, from a given revision.
///
/// A watcher polls the change history of the replicated state machine with linearizable
/// reads ([`KvOp::Changes`]), on whichever node answers. Each answer is complete through a
/// revision, and the next poll starts right after it, so the stream has no gap and no
/// duplicate across leader changes, node restarts and snapshot installs (the history is part
/// of the replicated state and of its snapshots). To resume later, watch again from
/// [`Watcher::next_revision`]. The history is bounded ([`KvLimits`](crate::kv::KvLimits));
/// a watcher that falls behind it gets [`KvError::Compacted`](crate::kv::KvError::Compacted)
/// (as [`ClientError::Refused`]) and should re-read the state and watch from its revision.
///
/// Lag and load: a watcher that is behind polls again at once (a full batch); one that is
/// caught up waits [`WatchOptions::min_poll`] before its next poll, so that changes gather
/// into one answer, and doubles the wait while nothing changes, up to
/// [`WatchOptions::max_poll`]. A change thus reaches a caught-up watcher within one wait plus
/// one linearizable read (a heartbeat round), and an idle watcher costs at most one read per
/// `max_poll`.
///
/// ```
/// use std::time::Duration;
/// use raftkv::kv::{ClientOptions, Keys, KvClient, KvResult, KvStateMachine, WatchOptions};
/// use raftkv::storage::MemStorage;
/// use raftkv::transport::LocalNetwork;
/// use raftkv::{Node, NodeConfig};
///
/// let net = LocalNetwork::new();
/// let mut config = NodeConfig::new(1, vec![1]);
/// config.tick_interval = Duration::from_millis(5);
/// let (node, driver) =
///     Node::start(config, MemStorage::new(), KvStateMachine::new(), net.transport(1)).unwrap();
/// std::thread::spawn(move || futures::executor::block_on(driver));
/// futures::executor::block_on(async {
///     let mut client = KvClient::connect(vec![node.clone()], ClientOptions::default()).await.unwrap();
///     let mut watcher = client.watch(Keys::Prefix(b"user/".to_vec()), 1, WatchOptions::default());
///     client.put("user/ada", "1815").await.unwrap();
///     client.put("other", "not watched").await.unwrap();
///     client.delete("user/ada").await.unwrap();
///     let mut seen = Vec::new();
///     while seen.len() < 2 {
///         seen.extend(watcher.next().await.unwrap());
///     }
///     assert_eq!(seen[0].value.as_deref(), Some(b"1815".as_slice()));
///     assert_eq!(seen[1].value, None, "deleted");
///     assert!(seen[0].revision < seen[1].revision);
///     node.shutdown().await;
/// });
/// ```
pub struct Watcher<E> {
    caller: Caller<E>,
    keys: Keys,
    next: Index,
    options: WatchOptions,
    /// How long to wait before the next poll.
    wait: Duration,
}

impl<E: KvEndpoint> Watcher<E> {
    pub(crate) fn new(caller: Caller<E>, keys: Keys, from: Index, options: WatchOptions) -> Self {
        Watcher {
            caller,
            keys,
            next: from.max(1),
            wait: Duration::ZERO,
            options,
        }
    }

    /// The revision the next change will have at least: where to resume.
    pub fn next_revision(&self) -> Index {
        self.next
    }

    /// One poll: the changes found (maybe none). Cancel-safe: nothing is lost if the future
    /// is dropped.
    pub async fn poll(&mut self) -> Result<Vec<Change>, ClientError> {
        let op = KvOp::Changes {
            keys: self.keys.clone(),
            from: self.next,
            limit: self.options.batch,
        };
        match self.caller.read(&op).await? {
            Response {
                answer: Answer::Changes(batch),
                ..
            } => {
                debug_assert!(batch.changes.iter().all(|c| c.revision >= self.next));
                self.next = self.next.max(batch.through + 1);
                Ok(batch.changes)
            }
            other => Err(ClientError::Unexpected(crate::kv::KvResult::Ok {
                revision: other.revision,
                answer: other.answer,
            })),
        }
    }

    /// Waits for the next changes (at least one), in revision order. Fails when the cluster
    /// cannot be read within the client's deadline, or when the changes wanted are compacted
    /// away. Cancel-safe.
    pub async fn next(&mut self) -> Result<Vec<Change>, ClientError> {
        loop {
            if !self.wait.is_zero() {
                sleep(self.wait).await;
            }
            let changes = self.poll().await?;
            self.wait = if changes.len() >= self.options.batch.max(1) as usize {
                Duration::ZERO // behind: at once
            } else if changes.is_empty() {
                (self.wait * 2).clamp(self.options.min_poll, self.options.max_poll)
            } else {
                self.options.min_poll
            };
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }
}
