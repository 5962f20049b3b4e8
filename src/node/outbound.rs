//! Outgoing messages: straight to [`Transport::send_now`] from the node itself when the
//! transport can deliver synchronously, otherwise through the driver future, which moves
//! batches from the node to one bounded lane per peer, each feeding [`Transport::send`] one
//! batch at a time, so a slow or dead peer costs bounded memory and never delays the others.
//! A lane opens the first time a peer is addressed (members join as the configuration
//! changes).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures::channel::mpsc as fmpsc;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::raft::{Message, NodeId};
use crate::transport::{SendNow, Transport};

/// Splits `batch` into runs addressed to one peer each, in order per peer, and hands each run
/// to `each`. A batch for one peer (the usual case of a follower) is passed on whole.
pub(super) fn by_peer(mut batch: Vec<Message>, mut each: impl FnMut(NodeId, Vec<Message>)) {
    let Some(first) = batch.first().map(|m| m.to) else {
        return;
    };
    if batch.iter().all(|m| m.to == first) {
        each(first, batch);
        return;
    }
    batch.sort_by_key(|m| m.to); // stable: keeps each peer's order
    while let Some(last) = batch.last().map(|m| m.to) {
        let at = batch.partition_point(|m| m.to < last);
        let run = batch.split_off(at);
        each(last, run);
    }
}

/// The node's sending side: synchronous while the transport allows it, then the driver.
pub(super) struct Outbound {
    direct: Option<Arc<dyn Transport>>,
    outbox: fmpsc::Sender<Vec<Message>>,
}

impl Outbound {
    pub(super) fn new(transport: Arc<dyn Transport>, outbox: fmpsc::Sender<Vec<Message>>) -> Self {
        Outbound {
            direct: Some(transport),
            outbox,
        }
    }

    /// Sends `messages`; false if the driver's queue was full and the batch was dropped.
    pub(super) fn send(&mut self, messages: Vec<Message>) -> bool {
        if let Some(t) = &self.direct {
            let mut back: Vec<Message> = Vec::new();
            by_peer(messages, |to, run| {
                if !back.is_empty() {
                    back.extend(run);
                    return;
                }
                if let SendNow::Unsupported(run) = t.send_now(to, run) {
                    back = run;
                }
            });
            if back.is_empty() {
                return true;
            }
            // Not supported: from now on everything goes through the driver.
            self.direct = None;
            return self.outbox.try_send(back).is_ok();
        }
        self.outbox.try_send(messages).is_ok()
    }

    pub(super) fn close(&mut self) {
        self.outbox.close_channel();
    }
}

type Worker = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One lane: a bounded queue and the future that empties it into the transport.
fn lane(
    transport: &Arc<dyn Transport>,
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

/// Moves outgoing batches from the node to one bounded lane per peer.
pub(super) async fn drive_transport(
    transport: Arc<dyn Transport>,
    peers: Vec<NodeId>,
    mut outgoing: fmpsc::Receiver<Vec<Message>>,
    lane_capacity: usize,
) {
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
                    by_peer(batch, |peer, msgs| {
                        let lane = lanes.entry(peer).or_insert_with(|| {
                            let (tx, worker) = lane(&transport, peer, lane_capacity);
                            workers.push(worker);
                            tx
                        });
                        let _ = lane.try_send(msgs); // full lane: drop, the peer is slow or dead
                    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::MessageBody;

    fn m(to: NodeId, term: u64) -> Message {
        Message {
            from: 1,
            to,
            term,
            body: MessageBody::TermQuery,
        }
    }

    #[test]
    fn by_peer_keeps_each_peers_order() {
        let mut got = Vec::new();
        by_peer(vec![m(2, 1), m(3, 2), m(2, 3), m(3, 4)], |to, run| {
            got.push((to, run.iter().map(|m| m.term).collect::<Vec<_>>()))
        });
        got.sort();
        assert_eq!(got, vec![(2, vec![1, 3]), (3, vec![2, 4])]);
    }
}
