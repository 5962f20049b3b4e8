//! Where the answer to a proposal or a read goes: one caller's reply channel, or one slot of
//! a batch proposed together ([`Node::propose_many`](super::Node::propose_many)), whose
//! answers leave together once the last one is known.

use std::sync::Arc;
use std::time::Instant;

use futures::channel::oneshot;
use parking_lot::Mutex;

use crate::error::ProposeError;

/// One caller's reply channel.
pub(super) type Reply<O> = oneshot::Sender<Result<O, ProposeError>>;
/// A batch's reply channel.
pub(super) type BatchReply<O> = oneshot::Sender<Vec<Result<O, ProposeError>>>;

/// A waiting caller: where its answer goes, and its deadline.
pub(super) struct Waiting<O> {
    pub(super) to: ReplyTo<O>,
    pub(super) deadline: Instant,
}

/// Where an answer goes.
pub(super) enum ReplyTo<O> {
    One(Reply<O>),
    /// Slot `.1` of a batch.
    Batch(Arc<Mutex<Batch<O>>>, usize),
}

/// The answers of a batch collected so far. Invariant: `left` counts the `None`s of
/// `answers`; the reply leaves when it reaches 0.
pub(super) struct Batch<O> {
    answers: Vec<Option<Result<O, ProposeError>>>,
    left: usize,
    reply: Option<BatchReply<O>>,
}

impl<O> ReplyTo<O> {
    /// The slots of a batch of `n` answers that goes to `reply`.
    pub(super) fn batch(n: usize, reply: BatchReply<O>) -> impl Iterator<Item = ReplyTo<O>> {
        let batch = Arc::new(Mutex::new(Batch {
            answers: (0..n).map(|_| None).collect(),
            left: n,
            reply: Some(reply),
        }));
        if n == 0 {
            if let Some(r) = batch.lock().reply.take() {
                let _ = r.send(Vec::new());
            }
        }
        (0..n).map(move |i| ReplyTo::Batch(batch.clone(), i))
    }

    /// Delivers `answer` (a caller that gave up is not an error).
    pub(super) fn send(self, answer: Result<O, ProposeError>) {
        match self {
            ReplyTo::One(r) => {
                let _ = r.send(answer);
            }
            ReplyTo::Batch(batch, i) => {
                let mut b = batch.lock();
                if b.answers[i].is_none() {
                    b.left -= 1;
                }
                b.answers[i] = Some(answer);
                if b.left == 0 {
                    let answers = b
                        .answers
                        .drain(..)
                        .map(|a| a.unwrap_or(Err(ProposeError::Shutdown)))
                        .collect();
                    if let Some(r) = b.reply.take() {
                        let _ = r.send(answers);
                    }
                }
            }
        }
    }
}
