//! What every connection task and request of a worker share, split by who touches what: one
//! part per concern, each owned by the module that names it. The request path reads the
//! plugin, its pool and slow paths, the body [`Limits`], the drain and the cut; the connection
//! task reads its [`ConnSettings`]; both count in the [`Tally`] and the balance; the event
//! loop reads the tally and fires the drain.
//!
//! Owns the composition and the two small parts no other module owns ([`Tally`], [`Limits`],
//! [`ConnSettings`]). It holds no logic: each part's module does.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use super::balance::Balance;
use super::drain_signal::{Cut, DrainSignal};
use super::head_timeout::HeadTimeout;
use super::loader::LoadedPlugin;
use super::pool::Pool;
use super::recycle::Recycle;
use super::same_port::SamePort;
use super::slow_paths::SlowPaths;
use crate::counters::Counters;
use crate::worker_table::WorkerTable;

/// The worker's state shared by its connections and requests (see the module docs).
pub(super) struct Shared {
    pub(super) plugin: Arc<LoadedPlugin>,
    /// Where `Dispatch::Blocking` handlers run.
    pub(super) pool: Pool,
    /// Paths caught stalling the I/O thread (bounded).
    pub(super) slow_paths: SlowPaths,
    pub(super) limits: Limits,
    pub(super) conn: ConnSettings,
    pub(super) tally: Tally,
    pub(super) balance: Balance,
    pub(super) recycle: Recycle,
    /// Fired when the worker starts draining: each connection task waits on it.
    pub(super) drain: DrainSignal,
    /// Set at `graceful_timeout`: requests still waiting for their handler answer `503`.
    pub(super) cut: Cut,
    /// The shared worker table and this worker's cell in it: requests in flight are recorded
    /// there.
    pub(super) table: Option<(WorkerTable, usize)>,
    /// This worker's request counters in its cell (for the master's `/metrics`).
    pub(super) counters: Option<&'static Counters>,
    /// The paths a same-port gateway takes from this worker's connections; `None`: none.
    pub(super) same_port: Option<SamePort>,
}

/// A request body's bounds.
pub(super) struct Limits {
    pub(super) max_body_bytes: usize,
    pub(super) body_read_timeout: Duration,
}

/// How each connection is served.
pub(super) struct ConnSettings {
    pub(super) http: auto::Builder<TokioExecutor>,
    /// The idle guard (`header_read_timeout`, `keepalive_timeout`).
    pub(super) head_timeout: Arc<HeadTimeout>,
    /// A connection whose writes make no progress for this long is closed.
    pub(super) send_timeout: Duration,
    /// How long an idle HTTP/1 keep-alive connection may still send a request once draining.
    pub(super) idle_grace: Duration,
}

/// What the worker counts for the master's `Stats` and its own drain.
pub(super) struct Tally {
    pub(super) requests: AtomicU64,
    pub(super) in_flight: AtomicU64,
    /// Open connections, upgraded ones (handed to the plugin after a `101`) included.
    pub(super) connections: watch::Sender<u64>,
    /// Of those, upgraded connections the plugin still holds.
    pub(super) upgraded: AtomicU64,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            connections: watch::Sender::new(0),
            upgraded: AtomicU64::new(0),
        }
    }
}
