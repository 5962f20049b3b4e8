//! The driver future: moves outgoing batches from the node thread to one bounded lane per
//! peer, each feeding [`Transport::send`] one batch at a time, so a slow or dead peer costs
//! bounded memory and never delays the others. A lane opens the first time a peer is
//! addressed (members join as the configuration changes).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures::channel::mpsc as fmpsc;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::raft::{Message, NodeId};
use crate::transport::Transport;

type Worker = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One lane: a bounded queue and the future that empties it into the transport.
fn lane<T: Transport>(
    transport: &Arc<T>,
    peer: NodeId,
    capacity: usize,
) -> (fmpsc::Sender<Vec<Message>>, Worker) {
    let (tx, mut rx) = fmpsc::channel::<Vec<Message>>(capacity);
    let transport = transport.clone();
    let worker = Box::pin(async move {
        while let Some(batch) = rx.next().await {
            // Errors are not fatal: Raft resends what matters.
            let _ = transport.send(peer, batch).await;
        }
    });
    (tx, worker)
}

/// Moves outgoing batches from the node thread to one bounded lane per peer.
pub(super) async fn drive_transport<T: Transport>(
    transport: T,
    peers: Vec<NodeId>,
    mut outgoing: fmpsc::Receiver<Vec<Message>>,
    lane_capacity: usize,
) {
    let transport = Arc::new(transport);
    let mut lanes = HashMap::new();
    let workers = FuturesUnordered::new();
    for peer in peers {
        let (tx, worker) = lane(&transport, peer, lane_capacity);
        lanes.insert(peer, tx);
        workers.push(worker);
    }
    let mut workers = workers;
    futures::future::poll_fn(|cx| {
        loop {
            match outgoing.poll_next_unpin(cx) {
                Poll::Ready(Some(batch)) => {
                    let mut by_peer: HashMap<NodeId, Vec<Message>> = HashMap::new();
                    for m in batch {
                        by_peer.entry(m.to).or_default().push(m);
                    }
                    for (peer, msgs) in by_peer {
                        let lane = lanes.entry(peer).or_insert_with(|| {
                            let (tx, worker) = lane(&transport, peer, lane_capacity);
                            workers.push(worker);
                            tx
                        });
                        let _ = lane.try_send(msgs); // full lane: drop, the peer is slow or dead
                    }
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => break,
            }
        }
        // Drive the lanes (they end only when their sender is dropped).
        while let Poll::Ready(Some(())) = workers.poll_next_unpin(cx) {}
        Poll::Pending
    })
    .await;
    // Dropping the lanes ends the workers once they sent what they hold.
    drop(lanes);
    while workers.next().await.is_some() {}
}
