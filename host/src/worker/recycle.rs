//! Recycling, the worker's side: when its request count reaches `max_requests` (with its
//! jitter), or its plugin calls `restart_worker()`, the worker asks the master once for a
//! replacement ([`RecycleRequest`], sent by the event loop as `WorkerToMaster::RecycleMe`) and
//! goes on serving, steering clients to the other workers ([`Recycle::retiring`]), until the
//! master drains it.
//!
//! Owns the request count's trigger, the channel from any thread (the plugin's included) to the
//! event loop, and the "retiring" flag. It never talks to the master itself and never decides
//! when a replacement starts: the master does, and merges asks.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

/// One ask for a replacement, on its way to the event loop.
#[derive(Debug)]
pub(super) struct RecycleRequest {
    /// For the master's log and `status`.
    pub(super) reason: String,
    /// The plugin asked (`restart_worker()`), rather than `max_requests`.
    pub(super) by_plugin: bool,
}

/// Where `restart_worker()` calls from the plugin (any thread) reach this worker's event loop.
static PLUGIN_ASKS: OnceLock<mpsc::UnboundedSender<RecycleRequest>> = OnceLock::new();

/// The plugin called `restart_worker(reason)`: ask the master for a replacement (once). Never
/// blocks: called from the plugin's threads.
pub(crate) fn plugin_asked_restart(reason: &str) {
    if let Some(tx) = PLUGIN_ASKS.get() {
        let reason = match reason.trim() {
            "" => "the plugin asked for a restart".to_string(),
            r => format!("the plugin asked for a restart: {r}"),
        };
        let _ = tx.send(RecycleRequest {
            reason,
            by_plugin: true,
        });
    }
}

/// The request path's and the accept loop's view of recycling.
pub(super) struct Recycle {
    /// Ask for a replacement after this many requests (0: never), of which `jitter` is jitter.
    after: u64,
    jitter: u64,
    tx: mpsc::UnboundedSender<RecycleRequest>,
    /// Asked the master for a replacement: steer clients to the other workers until drained.
    retiring: AtomicBool,
}

impl Recycle {
    /// Opens the way to the event loop (the receiver), for the plugin too: before the plugin
    /// starts, since `restart_worker()` may be called from `on_worker_start` on.
    pub(super) fn start(
        after: u64,
        jitter: u64,
    ) -> (Recycle, mpsc::UnboundedReceiver<RecycleRequest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = PLUGIN_ASKS.set(tx.clone());
        let recycle = Recycle {
            after,
            jitter,
            tx,
            retiring: AtomicBool::new(false),
        };
        (recycle, rx)
    }

    /// The worker has served `served` requests, this one included: at the limit, ask.
    #[inline]
    pub(super) fn served(&self, served: u64) {
        if served == self.after {
            self.ask_at_limit(served);
        }
    }

    #[cold]
    fn ask_at_limit(&self, served: u64) {
        let base = self.after.saturating_sub(self.jitter);
        let reason = format!(
            "served {served} requests (max_requests {base} + jitter {})",
            self.jitter
        );
        let _ = self.tx.send(RecycleRequest {
            reason,
            by_plugin: false,
        });
    }

    /// Whether this worker asked for its replacement.
    pub(super) fn retiring(&self) -> bool {
        self.retiring.load(Ordering::Relaxed)
    }

    /// Marks the worker retiring; `true` the first time only (the ask goes out once).
    pub(super) fn retire(&self) -> bool {
        !self.retiring.swap(true, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_limit_asks_once_and_retiring_is_set_once() {
        let (recycle, mut rx) = Recycle::start(5, 2);
        for served in 1..=4 {
            recycle.served(served);
        }
        assert!(rx.try_recv().is_err(), "no ask below the limit");
        recycle.served(5);
        let ask = rx.try_recv().expect("an ask at the limit");
        assert!(!ask.by_plugin);
        assert_eq!(ask.reason, "served 5 requests (max_requests 3 + jitter 2)");
        recycle.served(6);
        assert!(rx.try_recv().is_err(), "one ask only");
        assert!(!recycle.retiring());
        assert!(recycle.retire() && recycle.retiring());
        assert!(!recycle.retire(), "the second retire is not the first");
    }

    #[test]
    fn without_a_limit_nothing_is_asked() {
        let (recycle, mut rx) = Recycle::start(0, 0);
        for served in 1..1000 {
            recycle.served(served);
        }
        assert!(rx.try_recv().is_err());
    }
}
