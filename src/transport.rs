//! The [`Transport`] trait (how a node's messages reach its peers) and [`LocalTransport`], an
//! in-process implementation for tests, benchmarks and demos.
//!
//! Inbound messages are not the transport's business: the host receives them however it
//! likes and hands each to [`Node::step`](crate::Node::step).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;

use crate::error::TransportError;
use crate::raft::{Message, NodeId};

/// Sends Raft messages to peers.
///
/// Contract: best effort. `send` may drop, delay or reorder messages (Raft tolerates all three),
/// but must not corrupt them or deliver them to another node. It is called from the node's
/// driver future (unless [`Transport::send_now`] takes the messages), one call at a time per peer (calls for different peers run concurrently),
/// so a slow peer does not hold up the others. An error is logged and the batch is dropped;
/// Raft retries on its own. `send` should not block the executor thread (do socket IO the
/// async way).
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `messages` (all addressed to `to`, in order).
    async fn send(&self, to: NodeId, messages: Vec<Message>) -> Result<(), TransportError>;

    /// Delivers `messages` (all addressed to `to`, in order) synchronously, called by the
    /// node thread (or the node's task) itself, which saves the hop through the driver future
    /// and its executor. Only for a transport whose delivery is a function call that queues
    /// and never blocks (an in-process network: [`LocalTransport`] does it). The same
    /// best-effort contract as [`Transport::send`].
    ///
    /// The default answers [`SendNow::Unsupported`] with the messages: the node then sends
    /// them, and everything after them, through the driver future and `send`.
    fn send_now(&self, to: NodeId, messages: Vec<Message>) -> SendNow {
        let _ = to;
        SendNow::Unsupported(messages)
    }
}

/// What [`Transport::send_now`] did.
#[derive(Debug)]
pub enum SendNow {
    /// Delivered (or dropped, as a lossy network may).
    Sent,
    /// Failed; the batch is dropped and Raft resends what matters.
    Failed(TransportError),
    /// This transport cannot send synchronously: here are the messages back.
    Unsupported(Vec<Message>),
}

type Inbox = Arc<dyn Fn(Message) + Send + Sync>;

/// An in-process network: each node registers an inbox (usually a closure calling
/// [`Node::step`](crate::Node::step)) and gets a [`LocalTransport`] that delivers to the
/// others' inboxes. Links can be cut to simulate partitions.
///
/// ```
/// use raftkv::transport::LocalNetwork;
///
/// let net = LocalNetwork::new();
/// net.register(1, |m| println!("node 1 got {m:?}"));
/// let _to_others = net.transport(2);
/// net.cut(2, 1); // messages from 2 to 1 are now dropped
/// ```
#[derive(Clone, Default)]
pub struct LocalNetwork {
    inboxes: Arc<RwLock<HashMap<NodeId, Inbox>>>,
    cut: Arc<RwLock<std::collections::HashSet<(NodeId, NodeId)>>>,
    /// True while any link is cut (so a healthy network takes no lock for it).
    has_cuts: Arc<AtomicBool>,
}

impl LocalNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) node `id`'s inbox.
    pub fn register(&self, id: NodeId, inbox: impl Fn(Message) + Send + Sync + 'static) {
        self.inboxes.write().insert(id, Arc::new(inbox));
    }

    /// Removes node `id`'s inbox (messages to it are dropped).
    pub fn unregister(&self, id: NodeId) {
        self.inboxes.write().remove(&id);
    }

    /// The transport node `id` sends with.
    pub fn transport(&self, id: NodeId) -> LocalTransport {
        LocalTransport {
            from: id,
            net: self.clone(),
        }
    }

    /// Drops messages from `from` to `to` until [`LocalNetwork::heal`].
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.cut.write().insert((from, to));
        self.has_cuts.store(true, Ordering::Relaxed);
    }

    /// Restores every link.
    pub fn heal(&self) {
        let mut cut = self.cut.write();
        cut.clear();
        self.has_cuts.store(false, Ordering::Relaxed);
    }
}

/// The sending half of a [`LocalNetwork`] for one node.
#[derive(Clone)]
pub struct LocalTransport {
    from: NodeId,
    net: LocalNetwork,
}

impl LocalTransport {
    fn deliver(&self, to: NodeId, messages: Vec<Message>) -> Result<(), TransportError> {
        if self.net.has_cuts.load(Ordering::Relaxed)
            && self.net.cut.read().contains(&(self.from, to))
        {
            return Ok(()); // a partition loses messages silently, as a real one does
        }
        let inbox = self.net.inboxes.read().get(&to).cloned();
        let inbox = inbox.ok_or(TransportError::UnknownPeer(to))?;
        for m in messages {
            inbox(m);
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for LocalTransport {
    async fn send(&self, to: NodeId, messages: Vec<Message>) -> Result<(), TransportError> {
        self.deliver(to, messages)
    }

    /// Calls the receiver's inbox at once (it queues: [`Node::step`](crate::Node::step)).
    fn send_now(&self, to: NodeId, messages: Vec<Message>) -> SendNow {
        match self.deliver(to, messages) {
            Ok(()) => SendNow::Sent,
            Err(e) => SendNow::Failed(e),
        }
    }
}

/// A transport filled in after the node started: for a host whose network needs the nodes
/// first (an in-process network of function calls into each [`Node`](crate::Node), say).
/// Start the node with a clone of the slot, build the network, then [`TransportSlot::set`]
/// it. Messages sent before that are dropped (Raft sends again what matters).
///
/// ```
/// use raftkv::transport::{LocalNetwork, TransportSlot};
///
/// let slot = TransportSlot::new();
/// let for_node = slot.clone(); // hand this to Node::start
/// let net = LocalNetwork::new(); // ... built once the nodes exist
/// assert!(slot.set(net.transport(1)));
/// assert!(!slot.set(net.transport(1))); // only once
/// # drop(for_node);
/// ```
#[derive(Clone, Default)]
pub struct TransportSlot {
    inner: Arc<std::sync::OnceLock<Box<dyn Transport>>>,
}

impl TransportSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills the slot; false (and `transport` dropped) if it was filled already.
    pub fn set(&self, transport: impl Transport) -> bool {
        self.inner.set(Box::new(transport)).is_ok()
    }
}

#[async_trait]
impl Transport for TransportSlot {
    async fn send(&self, to: NodeId, messages: Vec<Message>) -> Result<(), TransportError> {
        match self.inner.get() {
            Some(t) => t.send(to, messages).await,
            None => Ok(()), // not wired yet: as if lost
        }
    }

    fn send_now(&self, to: NodeId, messages: Vec<Message>) -> SendNow {
        match self.inner.get() {
            Some(t) => t.send_now(to, messages),
            None => SendNow::Sent, // not wired yet: as if lost
        }
    }
}
