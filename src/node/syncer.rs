//! The node's fsync thread: it runs the waits of the syncs the engine starts
//! ([`PendingSync::wait`]), so the node thread keeps stepping (acknowledgements counted,
//! entries committed and applied, new proposals written and sent) while the device flushes.
//! Each result goes back through the node's inbox as [`Command::Synced`], where the node
//! thread finishes the sync.
//!
//! Invariants: at most one sync is in flight (the engine starts the next only after the
//! previous one is finished); dropping the syncer waits for the one in flight, so no fsync
//! of a node's files is still running once the node has reported that it stopped.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::inbox::Inbox;
use super::Command;
use crate::host::PendingSync;

/// The fsync thread, and the channel that feeds it.
pub(super) struct Syncer {
    tx: Option<mpsc::Sender<PendingSync>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread; its results go to `inbox`.
    pub(super) fn start<O: Send + 'static>(inbox: Arc<Inbox<Command<O>>>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<PendingSync>();
        let thread = std::thread::Builder::new()
            .name("raftkv-fsync".into())
            .spawn(move || {
                for pending in rx {
                    let waited = pending.wait();
                    if inbox.push_unbounded(Command::Synced(waited)).is_err() {
                        return; // the node stopped
                    }
                }
            })?;
        Ok(Syncer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands a sync to the thread. Gives it back if the thread is gone (it never exits while
    /// the node runs, unless its inbox closed).
    pub(super) fn send(&self, pending: PendingSync) -> Result<(), PendingSync> {
        match &self.tx {
            Some(tx) => tx.send(pending).map_err(|e| e.0),
            None => Err(pending),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
