//! The worker's drain, told to every connection task, and its cut at `graceful_timeout`
//! ([`Cut`]), told to every request still waiting for its handler.
//!
//! Each connection waits for the drain for as long as it lives, alongside serving its requests,
//! so the wait is polled on every wake-up of the connection (each read and each write). A
//! `watch` or `Notify` waiter takes a lock to re-register the task's waker on each such poll;
//! here a poll is one atomic load, and the waker is registered once per connection (again only
//! if the task's waker changes). This module owns both signals; it never decides when to drain
//! or cut (the event loop does).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

/// Fired once, when the worker starts draining; every [`Wait`] then completes.
pub struct DrainSignal {
    /// Also read by each connection's I/O wrapper (`h2_drain`).
    draining: Arc<AtomicBool>,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    next: u64,
    wakers: HashMap<u64, Waker>,
}

impl DrainSignal {
    pub fn new(draining: Arc<AtomicBool>) -> Self {
        DrainSignal {
            draining,
            waiters: Mutex::new(Waiters::default()),
        }
    }

    /// Starts the drain: sets the flag, then wakes every waiting connection.
    pub fn fire(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let wakers = match self.waiters.lock() {
            Ok(mut w) => std::mem::take(&mut w.wakers),
            Err(poisoned) => std::mem::take(&mut poisoned.into_inner().wakers),
        };
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    /// Completes once the drain has started.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            signal: self,
            registered: None,
        }
    }

    fn fired(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether the worker drains (a relaxed read, for the request path).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The flag itself, for a connection's I/O wrapper (`h2_drain`).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }
}

/// `graceful_timeout`'s cut: set once, then requests still waiting for their handler answer
/// `503` (counted here) instead of being cut with their connection.
pub struct Cut {
    rx: watch::Receiver<bool>,
    answered: AtomicU64,
}

impl Cut {
    /// The cut, and the sender that sets it.
    pub fn new() -> (watch::Sender<bool>, Cut) {
        let (tx, rx) = watch::channel(false);
        let cut = Cut {
            rx,
            answered: AtomicU64::new(0),
        };
        (tx, cut)
    }

    /// Completes once the cut is set (never if its sender is gone first).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// A request was answered `503` at the cut.
    pub fn note_answered(&self) {
        self.answered.fetch_add(1, Ordering::SeqCst);
    }

    /// How many requests were answered `503` at the cut.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

/// A connection's wait for the drain (see the module docs).
pub struct Wait<'a> {
    signal: &'a DrainSignal,
    /// This wait's key among the signal's waiters, and the waker registered under it.
    registered: Option<(u64, Waker)>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.signal.fired() {
            return Poll::Ready(());
        }
        if let Some((_, waker)) = &this.registered
            && waker.will_wake(cx.waker())
        {
            return Poll::Pending;
        }
        // First poll, or the task's waker changed: (re-)register under the lock, then look at
        // the flag again, so a drain fired in between is not missed (`fire` sets the flag
        // before it takes the waiters).
        {
            let mut waiters = match this.signal.waiters.lock() {
                Ok(w) => w,
                Err(poisoned) => poisoned.into_inner(),
            };
            let key = match &this.registered {
                Some((key, _)) => *key,
                None => {
                    waiters.next += 1;
                    waiters.next
                }
            };
            waiters.wakers.insert(key, cx.waker().clone());
            this.registered = Some((key, cx.waker().clone()));
        }
        if this.signal.fired() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some((key, _)) = self.registered.take() {
            let mut waiters = match self.signal.waiters.lock() {
                Ok(w) => w,
                Err(poisoned) => poisoned.into_inner(),
            };
            waiters.wakers.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn signal() -> Arc<DrainSignal> {
        Arc::new(DrainSignal::new(Arc::new(AtomicBool::new(false))))
    }

    #[tokio::test]
    async fn every_waiter_completes_when_fired_and_none_is_left_registered() {
        let s = signal();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move { s.wait().await }));
        }
        // Wait until all eight have registered: a condition, not a sleep.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while s.waiters.lock().unwrap().wakers.len() < 8 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "waiters never registered"
            );
            tokio::task::yield_now().await;
        }
        s.fire();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("a waiter was not woken")
                .unwrap();
        }
        assert!(s.waiters.lock().unwrap().wakers.is_empty());
    }

    #[tokio::test]
    async fn a_wait_after_the_drain_completes_at_once_and_a_dropped_one_unregisters() {
        let s = signal();
        {
            let wait = s.wait();
            tokio::pin!(wait);
            assert!(futures_poll_once(wait.as_mut()).await.is_pending());
            assert_eq!(s.waiters.lock().unwrap().wakers.len(), 1);
        }
        assert!(s.waiters.lock().unwrap().wakers.is_empty());
        s.fire();
        tokio::time::timeout(Duration::from_secs(10), s.wait())
            .await
            .expect("a wait after the drain did not complete");
    }

    async fn futures_poll_once(mut f: Pin<&mut Wait<'_>>) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
    }
}
