//! Outgoing messages: straight to [`Transport::send_now`] from the node itself when the
//! transport can deliver synchronously, otherwise through the driver future, which moves
//! batches from the node to one bounded lane per peer, each feeding [`Transport::send`] one
//! batch at a time, so a slow or dead peer costs bounded memory and never delays the others.

use std::sync::Arc;

use futures::channel::mpsc as fmpsc;
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

/// Moves outgoing batches from the node to one bounded lane per peer.
pub(super) async fn drive_transport(
    transport: Arc<dyn Transport>,
    peers: Vec<NodeId>,
    mut outgoing: fmpsc::Receiver<Vec<Message>>,
    lane_capacity: usize,
) {
    let mut lanes = Vec::new();
    let mut workers = Vec::new();
    for peer in peers {
        let (tx, mut rx) = fmpsc::channel::<Vec<Message>>(lane_capacity);
        lanes.push((peer, tx));
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
            by_peer(batch, |peer, msgs| {
                if let Some((_, lane)) = lanes.iter_mut().find(|(p, _)| *p == peer) {
                    let _ = lane.try_send(msgs); // full lane: drop, the peer is slow or dead
                }
            });
        }
        // Dropping the lanes ends the workers.
    };
    futures::future::join(dispatch, futures::future::join_all(workers)).await;
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
