//! How a [`KvClient`](crate::kv::KvClient) reaches the nodes: the [`KvEndpoint`] trait, its
//! implementation for a fixed `Vec<Node>`, and [`NodeRegistry`], an in-process endpoint that
//! follows node restarts.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;

use super::command::{Bytes, KvResult};
use crate::error::ProposeError;
use crate::raft::NodeId;
use crate::Node;

/// How a client reaches the nodes of a cluster.
///
/// The client reads an answer's meaning from the [`ProposeError`] it gets: `NotLeader`,
/// `Dropped`, `Busy`, `NoSpace` and `TooLarge` mean the command was not taken; `Timeout` and
/// `Shutdown` mean it may have been (a node that shuts down fails its pending proposals with
/// `Shutdown`, and they may commit elsewhere). An endpoint that cannot reach a node at all
/// answers `Shutdown`; one that lost a connection after sending answers `Timeout`.
#[async_trait]
pub trait KvEndpoint: Send + Sync {
    /// The nodes it can talk to.
    fn nodes(&self) -> Vec<NodeId>;
    /// Proposes a command on `node` (see [`Node::propose`]).
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError>;
    /// Runs a linearizable read on `node` (see [`Node::read`]).
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError>;
}

/// A shared endpoint.
#[async_trait]
impl<E: KvEndpoint + ?Sized> KvEndpoint for Arc<E> {
    fn nodes(&self) -> Vec<NodeId> {
        (**self).nodes()
    }
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError> {
        (**self).propose(node, command).await
    }
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError> {
        (**self).read(node, query).await
    }
}

/// A fixed set of in-process nodes. The handles are fixed: a node restarted with a new
/// [`Node`] handle is not seen (its old handle answers `Shutdown`); use [`NodeRegistry`] when
/// nodes restart.
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

/// In-process nodes whose handles the host replaces as nodes restart: every request looks
/// the node up at the moment it is sent. Clones share one registry.
///
/// A node listed in [`NodeRegistry::new`] but with no handle (stopped, not yet restarted)
/// answers `Shutdown`, and the client tries the others.
///
/// ```
/// use std::time::Duration;
/// use raftkv::kv::{ClientOptions, KvClient, KvResult, KvStateMachine, NodeRegistry};
/// use raftkv::storage::MemStorage;
/// use raftkv::transport::LocalNetwork;
/// use raftkv::{Node, NodeConfig, NodeId};
///
/// let net = LocalNetwork::new();
/// let start = |id: NodeId, storage: MemStorage| -> Node<KvResult> {
///     let mut config = NodeConfig::new(id, vec![1, 2, 3]);
///     config.tick_interval = Duration::from_millis(5);
///     let (node, driver) =
///         Node::start(config, storage, KvStateMachine::new(), net.transport(id)).unwrap();
///     std::thread::spawn(move || futures::executor::block_on(driver));
///     let inbox = node.clone();
///     net.register(id, move |m| inbox.step(m));
///     node
/// };
/// // MemStorage clones share their state: keep one to restart a node from what it stored.
/// let disks: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
/// let registry = NodeRegistry::new([1, 2, 3]);
/// for id in 1..=3 {
///     registry.insert(start(id, disks[id as usize - 1].clone()));
/// }
/// futures::executor::block_on(async {
///     let mut client = KvClient::connect(registry.clone(), ClientOptions::default()).await.unwrap();
///     client.put("k", "before").await.unwrap();
///     // Restart every node, one after another: the client follows the new handles.
///     for id in 1..=3 {
///         if let Some(old) = registry.remove(id) {
///             old.shutdown().await;
///         }
///         registry.insert(start(id, disks[id as usize - 1].clone()));
///         client.append("k", format!(" {id}")).await.unwrap();
///     }
///     assert_eq!(client.get("k").await.unwrap(), Some(b"before 1 2 3".to_vec()));
///     for id in 1..=3 {
///         registry.get(id).unwrap().shutdown().await;
///     }
/// });
/// ```
#[derive(Clone, Default)]
pub struct NodeRegistry {
    members: Arc<RwLock<BTreeMap<NodeId, Option<Node<KvResult>>>>>,
}

impl NodeRegistry {
    /// A registry of the cluster's members, none running yet.
    pub fn new(members: impl IntoIterator<Item = NodeId>) -> Self {
        NodeRegistry {
            members: Arc::new(RwLock::new(
                members.into_iter().map(|id| (id, None)).collect(),
            )),
        }
    }

    /// Sets the handle of the node `node.id()` (adding it to the members if it is new);
    /// returns the handle it replaces.
    pub fn insert(&self, node: Node<KvResult>) -> Option<Node<KvResult>> {
        self.members.write().insert(node.id(), Some(node)).flatten()
    }

    /// Takes the handle of `id` out (it stays a member, answering `Shutdown` until a new
    /// handle is inserted).
    pub fn remove(&self, id: NodeId) -> Option<Node<KvResult>> {
        self.members.write().get_mut(&id).and_then(Option::take)
    }

    /// The current handle of `id`.
    pub fn get(&self, id: NodeId) -> Option<Node<KvResult>> {
        self.members.read().get(&id).cloned().flatten()
    }
}

#[async_trait]
impl KvEndpoint for NodeRegistry {
    fn nodes(&self) -> Vec<NodeId> {
        self.members.read().keys().copied().collect()
    }
    async fn propose(&self, node: NodeId, command: Bytes) -> Result<KvResult, ProposeError> {
        match self.get(node) {
            Some(n) => n.propose(command).await,
            None => Err(ProposeError::Shutdown),
        }
    }
    async fn read(&self, node: NodeId, query: Bytes) -> Result<KvResult, ProposeError> {
        match self.get(node) {
            Some(n) => n.read(query).await,
            None => Err(ProposeError::Shutdown),
        }
    }
}
