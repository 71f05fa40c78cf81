//! A client's outbox: what the router tells one client's task ([`Outgoing`]), in order, with
//! one sender (the router's entry for the client) and one receiver (the client's task).
//!
//! Why not a tokio channel: a gateway holds one per client, and tokio's unbounded channel
//! allocates its first block of 32 slots when it is made (about 2 KiB here), most of an idle
//! client's memory once its read buffer is small. This one holds an empty `VecDeque` (nothing
//! allocated) until something is queued. Its bound is the router's (`gateway_send_queue`
//! bytes, counted in the client's `queued`); it never decides anything itself.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::router::Outgoing;

struct Shared {
    state: Mutex<State>,
    /// One waiter at most (the receiver); a notification with no waiter is kept for it.
    ready: Notify,
}

struct State {
    items: VecDeque<Outgoing>,
    /// The sender is gone: once the items are taken, the receiver gets `None`.
    closed: bool,
}

/// The router's end.
pub(crate) struct Sender(Arc<Shared>);

/// The client task's end.
pub(crate) struct Receiver(Arc<Shared>);

/// Why [`Receiver::try_recv`] has nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TryRecvError {
    Empty,
    Disconnected,
}

/// A new outbox.
pub(crate) fn channel() -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            closed: false,
        }),
        ready: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding it (none can: only pushes and pops) leaves the queue whole.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sender {
    /// Queues `item`; `Err(item)` when the receiver is gone.
    pub(crate) fn send(&self, item: Outgoing) -> Result<(), Outgoing> {
        if Arc::strong_count(&self.0) < 2 {
            return Err(item);
        }
        lock(&self.0).items.push_back(item);
        self.0.ready.notify_one();
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        lock(&self.0).closed = true;
        self.0.ready.notify_one();
    }
}

impl Receiver {
    /// The next item, waiting for one; `None` once the sender is gone and all were taken.
    /// Cancel-safe: an item is taken only when it is returned.
    pub(crate) async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.0.ready.notified().await,
            }
        }
    }

    /// The next item if one is queued.
    pub(crate) fn try_recv(&mut self) -> Result<Outgoing, TryRecvError> {
        let mut state = lock(&self.0);
        match state.items.pop_front() {
            Some(item) => Ok(item),
            None if state.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_order_then_none_once_the_sender_is_gone() {
        let (tx, mut rx) = channel();
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item);
            }
            got
        });
        tokio::task::yield_now().await;
        tx.send(Outgoing::Accept).unwrap();
        tx.send(Outgoing::Refuse(403)).unwrap();
        drop(tx);
        assert_eq!(
            waiting.await.unwrap(),
            vec![Outgoing::Accept, Outgoing::Refuse(403)]
        );

        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(tx.send(Outgoing::Accept), Err(Outgoing::Accept));
    }
}
