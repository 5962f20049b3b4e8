//! The driver future: moves outgoing batches from the node thread to one bounded lane per
//! peer, each feeding [`Transport::send`] one batch at a time, so a slow or dead peer costs
//! bounded memory and never delays the others.

use std::collections::HashMap;
use std::sync::Arc;

use futures::channel::mpsc as fmpsc;
use futures::StreamExt;

use crate::raft::{Message, NodeId};
use crate::transport::Transport;

/// Moves outgoing batches from the node thread to one bounded lane per peer.
pub(super) async fn drive_transport<T: Transport>(
    transport: T,
    peers: Vec<NodeId>,
    mut outgoing: fmpsc::Receiver<Vec<Message>>,
    lane_capacity: usize,
) {
    let transport = Arc::new(transport);
    let mut lanes = HashMap::new();
    let mut workers = Vec::new();
    for peer in peers {
        let (tx, mut rx) = fmpsc::channel::<Vec<Message>>(lane_capacity);
        lanes.insert(peer, tx);
        let transport = transport.clone();
        workers.push(async move {
            while let Some(batch) = rx.next().await {
                // Errors are not fatal: Raft resends what matters.
                let _ = transport.send(peer, batch).await;
            }
        });
    }
    let dispatch = async move {
        while let Some(batch) = outgoing.next().await {
            let mut by_peer: HashMap<NodeId, Vec<Message>> = HashMap::new();
            for m in batch {
                by_peer.entry(m.to).or_default().push(m);
            }
            for (peer, msgs) in by_peer {
                if let Some(lane) = lanes.get_mut(&peer) {
                    let _ = lane.try_send(msgs); // full lane: drop, the peer is slow or dead
                }
            }
        }
        // Dropping the lanes ends the workers.
    };
    futures::future::join(dispatch, futures::future::join_all(workers)).await;
}
