//! A runtime-agnostic sleep for the client's retry backoff: one lazily started thread keeps
//! the deadlines and wakes the futures, so the client works on any executor (and under
//! `futures::executor::block_on`) without depending on one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

struct Timers {
    queue: Mutex<BinaryHeap<Reverse<(Instant, u64)>>>,
    wakers: Mutex<std::collections::HashMap<u64, Waker>>,
    next: Mutex<u64>,
    changed: Condvar,
}

fn timers() -> &'static Arc<Timers> {
    static TIMERS: OnceLock<Arc<Timers>> = OnceLock::new();
    TIMERS.get_or_init(|| {
        let t = Arc::new(Timers {
            queue: Mutex::new(BinaryHeap::new()),
            wakers: Mutex::new(Default::default()),
            next: Mutex::new(0),
            changed: Condvar::new(),
        });
        let worker = t.clone();
        // If the thread cannot start, sleeps complete at once (retries just come faster).
        let _ = std::thread::Builder::new()
            .name("raftkv-timer".into())
            .spawn(move || loop {
                let mut queue = worker.queue.lock();
                let now = Instant::now();
                while let Some(Reverse((at, id))) = queue.peek().copied() {
                    if at > now {
                        break;
                    }
                    queue.pop();
                    if let Some(w) = worker.wakers.lock().remove(&id) {
                        w.wake();
                    }
                }
                match queue.peek().copied() {
                    Some(Reverse((at, _))) => {
                        worker.changed.wait_until(&mut queue, at);
                    }
                    None => worker.changed.wait(&mut queue),
                }
            });
        t
    })
}

/// Completes after `d`.
pub(crate) fn sleep(d: Duration) -> Sleep {
    Sleep {
        at: Instant::now() + d,
        id: None,
    }
}

/// The future returned by [`sleep`].
pub(crate) struct Sleep {
    at: Instant,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        let t = timers();
        let id = match self.id {
            Some(id) => id,
            None => {
                let mut next = t.next.lock();
                *next += 1;
                let id = *next;
                self.id = Some(id);
                t.wakers.lock().insert(id, cx.waker().clone());
                t.queue.lock().push(Reverse((self.at, id)));
                t.changed.notify_one();
                return Poll::Pending;
            }
        };
        t.wakers.lock().insert(id, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            timers().wakers.lock().remove(&id);
        }
    }
}
