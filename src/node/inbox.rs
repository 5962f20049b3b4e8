//! [`Inbox`]: the bounded queue of commands for one node, which its node thread (or, for a
//! node run as a task, its task) drains a whole batch at a time.
//!
//! One lock guards the queue and the one consumer's wake-up: a sender pushes and wakes the
//! consumer only if it is asleep, and the consumer takes everything queued in one swap. So a
//! burst of proposals costs one wake-up, not one per proposal, and the consumer never walks a
//! channel element by element.
//!
//! Invariants: `queue.len() <= capacity` for pushes through [`Inbox::try_push`] (the node's
//! own snapshot threads may exceed it by the chunks of one snapshot, see
//! [`Inbox::push_unbounded`]); at most one consumer; a consumer that found the queue empty
//! has registered itself before it sleeps, so no push is missed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Who waits for the next push.
enum Waiter {
    None,
    Thread(Thread),
    Task(Waker),
}

struct State<T> {
    queue: Vec<T>,
    waiter: Waiter,
    /// Set by [`Inbox::notify`]: the consumer should look at the clock even if nothing came.
    notified: bool,
}

/// A bounded multi-producer, single-consumer queue. See the [module docs](self).
pub(super) struct Inbox<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// The consumer is gone: pushes fail.
    closed: AtomicBool,
}

/// Why a push failed.
pub(super) enum PushError<T> {
    Full(T),
    Closed(T),
}

impl<T> Inbox<T> {
    pub(super) fn new(capacity: usize) -> Self {
        Inbox {
            state: Mutex::new(State {
                queue: Vec::new(),
                waiter: Waiter::None,
                notified: false,
            }),
            capacity,
            closed: AtomicBool::new(false),
        }
    }

    fn wake(waiter: Waiter) {
        match waiter {
            Waiter::None => {}
            Waiter::Thread(t) => t.unpark(),
            Waiter::Task(w) => w.wake(),
        }
    }

    /// Queues `item` unless the inbox is full or closed.
    pub(super) fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed(item));
        }
        let waiter = {
            let mut s = self.state.lock();
            if s.queue.len() >= self.capacity {
                return Err(PushError::Full(item));
            }
            s.queue.push(item);
            std::mem::replace(&mut s.waiter, Waiter::None)
        };
        Self::wake(waiter);
        Ok(())
    }

    /// Queues `item` whatever the bound (the node's own control commands and the chunks of
    /// its one local snapshot in progress, which the bound must not lose). Fails only when
    /// closed.
    pub(super) fn push_unbounded(&self, item: T) -> Result<(), T> {
        if self.closed.load(Ordering::Acquire) {
            return Err(item);
        }
        let waiter = {
            let mut s = self.state.lock();
            s.queue.push(item);
            std::mem::replace(&mut s.waiter, Waiter::None)
        };
        Self::wake(waiter);
        Ok(())
    }

    /// Queues `item`, waiting while the inbox is full (a snapshot thread's chunks: the node
    /// takes them at its pace, and they never pile up beyond the bound). Fails only when
    /// closed.
    pub(super) fn push_waiting(&self, item: T) -> Result<(), T> {
        let mut item = item;
        loop {
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(back)) => return Err(back),
                Err(PushError::Full(back)) => {
                    item = back;
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
    }

    /// Wakes the consumer without a command (a tick is due).
    pub(super) fn notify(&self) {
        let waiter = {
            let mut s = self.state.lock();
            s.notified = true;
            std::mem::replace(&mut s.waiter, Waiter::None)
        };
        Self::wake(waiter);
    }

    /// The consumer is gone: later pushes fail, and what is queued is dropped.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let queue = std::mem::take(&mut self.state.lock().queue);
        drop(queue);
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Moves everything queued into `into` (which the caller has emptied); true if anything
    /// came or a notification was pending.
    fn take(s: &mut State<T>, into: &mut Vec<T>) -> bool {
        let notified = std::mem::take(&mut s.notified);
        if s.queue.is_empty() {
            return notified;
        }
        std::mem::swap(&mut s.queue, into);
        true
    }

    /// Thread consumer: waits until something is queued, a notification comes, or `deadline`
    /// passes, spinning for up to `spin` first (a reply is often only microseconds away, and
    /// parking and being woken costs a cross-CPU wake-up each). Fills `into`.
    pub(super) fn wait_blocking(&self, into: &mut Vec<T>, deadline: Instant, spin: Duration) {
        if Self::take(&mut self.state.lock(), into) {
            return;
        }
        if !spin.is_zero() {
            let until = Instant::now() + spin;
            loop {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
                if let Some(mut s) = self.state.try_lock() {
                    if Self::take(&mut s, into) {
                        return;
                    }
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
        loop {
            {
                let mut s = self.state.lock();
                if Self::take(&mut s, into) {
                    return;
                }
                s.waiter = Waiter::Thread(std::thread::current());
            }
            let now = Instant::now();
            if now >= deadline {
                self.state.lock().waiter = Waiter::None;
                return;
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    /// Task consumer: fills `into` and is ready if anything was queued (or a notification
    /// came); otherwise registers the task's waker.
    pub(super) fn poll_take(&self, cx: &mut Context<'_>, into: &mut Vec<T>) -> Poll<()> {
        let mut s = self.state.lock();
        if Self::take(&mut s, into) {
            return Poll::Ready(());
        }
        match &s.waiter {
            Waiter::Task(w) if w.will_wake(cx.waker()) => {}
            _ => s.waiter = Waiter::Task(cx.waker().clone()),
        }
        Poll::Pending
    }
}
