//! One connection's state as its requests see it: what was learned about the connection
//! (HTTP/2, whether its client keeps it), its place in the idle guard, and the counts it holds
//! while open ([`ConnectionGuard`], [`UpgradeGuard`]).
//!
//! Owns those counts' bookkeeping. It never reads or writes the socket and never serves a
//! request: the connection task (`connection`) and the request path (`request`) do, and both
//! use this.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Version, header};
use hyper::body::Incoming;

use super::head_timeout;
use super::shared::Shared;

/// One connection's view: the worker's shared state and what it learned about the connection.
pub(super) struct Connection {
    pub(super) shared: Arc<Shared>,
    /// Set on its first HTTP/2 request: a drain sends GOAWAY at once instead of waiting.
    pub(super) is_h2: AtomicBool,
    pub(super) first_h2_request: tokio::sync::Notify,
    /// Counted as staying in the balance.
    staying: AtomicBool,
    /// Its place in the slowloris guard.
    pub(super) watch: Arc<head_timeout::Watch>,
}

impl Connection {
    pub(super) fn new(shared: Arc<Shared>) -> Connection {
        let watch = shared.conn.head_timeout.watch();
        Connection {
            shared,
            is_h2: AtomicBool::new(false),
            first_h2_request: tokio::sync::Notify::new(),
            staying: AtomicBool::new(false),
            watch,
        }
    }

    /// A request arrived: notes HTTP/2 on the first one, and counts this connection for
    /// balance once a request shows the client will keep it.
    #[inline]
    pub(super) fn note_request(&self, req: &Request<Incoming>) {
        if req.version() == Version::HTTP_2 && !self.is_h2.swap(true, Ordering::Relaxed) {
            self.watch.exempt();
            self.first_h2_request.notify_one();
        }
        if self.staying.load(Ordering::Relaxed) {
            return;
        }
        let keep_alive = match req.version() {
            Version::HTTP_11 => !has_token(req, "close"),
            Version::HTTP_10 => has_token(req, "keep-alive"),
            _ => true,
        };
        if keep_alive {
            self.staying.store(true, Ordering::Relaxed);
            self.shared.balance.stays();
        }
    }

    /// Whether this connection counts as staying (its client keeps it).
    pub(super) fn staying(&self) -> bool {
        self.staying.load(Ordering::Relaxed)
    }
}

/// Whether the request's `Connection` header lists `token`.
fn has_token(req: &Request<Incoming>, token: &str) -> bool {
    req.headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.staying.load(Ordering::Relaxed) {
            self.shared.balance.leaves();
        }
    }
}

/// Counts a live connection for as long as it is held.
pub(super) struct ConnectionGuard(Arc<Shared>);

impl ConnectionGuard {
    pub(super) fn new(shared: Arc<Shared>) -> ConnectionGuard {
        shared.tally.connections.send_modify(|n| *n += 1);
        ConnectionGuard(shared)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.tally.connections.send_modify(|n| *n -= 1);
    }
}

/// Counts a connection the plugin may take over (after a `101`) as open and upgraded, from the
/// request that asked for it until the plugin drops it: a drain waits for it. It counts as
/// staying too, for balance: a WebSocket is the longest-lived connection there is, and hyper
/// has let go of the HTTP connection (and its [`Connection`] count) once it is handed over.
pub(super) struct UpgradeGuard(ConnectionGuard);

impl UpgradeGuard {
    pub(super) fn new(shared: &Arc<Shared>) -> UpgradeGuard {
        shared.tally.upgraded.fetch_add(1, Ordering::SeqCst);
        shared.balance.stays();
        UpgradeGuard(ConnectionGuard::new(shared.clone()))
    }
}

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        let shared = &self.0.0;
        shared.tally.upgraded.fetch_sub(1, Ordering::SeqCst);
        shared.balance.leaves();
    }
}
