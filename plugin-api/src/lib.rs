//! The contract between the `host` and the HTTP handler plugins it loads.
//!
//! A plugin is a `cdylib` that implements [`Plugin`] and calls [`export_plugin!`] once:
//!
//! ```no_run
//! use plugin_api::{Plugin, WorkerContext, Request, Response, BoxError};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn on_worker_start(_ctx: &WorkerContext) -> Result<Self, BoxError> {
//!         Ok(Hello)
//!     }
//!     fn handle(&self, _req: Request) -> Response {
//!         Response::new("hello\n".into())
//!     }
//! }
//!
//! plugin_api::export_plugin!(Hello);
//! ```
//!
//! Plugin authors write no `unsafe`: [`export_plugin!`] generates the one exported symbol and
//! the `extern "C"` shims (in [`export`]), which catch every panic. The `#[repr(C)]` layout both
//! sides agree on lives in [`ffi`]; the host checks its header (magic, ABI version, sizes,
//! `plugin-api` version) before it calls anything.
//!
//! The plugin is its own Rust world: it has its own copy of `std`, `tracing` and every other
//! crate it links. What it needs from the host (its slot, its generation, a way to log, a way
//! to ask for a fresh worker) is passed across the ABI in [`ffi::HostContext`]; `tracing` events the plugin emits after
//! `on_worker_start` begins are forwarded to the host's logger.

pub mod export;
pub mod ffi;
mod log;

pub use bytes::Bytes;
pub use http;

/// The request a handler receives: the whole body, already read by the host.
pub type Request = http::Request<Bytes>;
/// The response a handler returns.
pub type Response = http::Response<Bytes>;
/// The error `on_worker_start` may return; its `Display` becomes the load-failure reason.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An HTTP handler plugin. One value is built per worker process, in [`Plugin::on_worker_start`],
/// and shared by every request that worker serves.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Builds the per-worker state. Runs once in each new worker, after the plugin is loaded
    /// and before the worker accepts connections. An error (or a panic) refuses this build:
    /// the host keeps the previous one serving.
    fn on_worker_start(ctx: &WorkerContext) -> Result<Self, BoxError>;

    /// Serves one request. Called from many threads at once. It may block unless
    /// [`Plugin::may_block`] says otherwise for its path (blocking calls run on a thread of their
    /// own), and a panic here becomes a `500` for this request only.
    fn handle(&self, req: Request) -> Response;

    /// Whether `handle` may block (sleep, wait on I/O or a lock, compute for long) for requests
    /// with this method and path. Answer `false` only for handlers that return in microseconds:
    /// the host then runs them on its I/O thread, without a thread hand-off, which is several
    /// times faster for small handlers. The default, `true`, is always safe. (If a handler said
    /// to be non-blocking takes over 20 ms, the host logs it and stops trusting that path.)
    fn may_block(&self, method: &str, path: &str) -> bool {
        let _ = (method, path);
        true
    }

    /// Runs when the worker has finished its last request and is about to exit.
    fn on_worker_stop(self) {}
}

/// What a plugin knows about the worker it runs in.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerContext {
    /// The worker's slot, `0..workers`. A slot keeps its number across reloads.
    pub slot: u32,
    /// The generation this worker belongs to; each reload makes a new one.
    pub generation: u64,
    /// The worker's process id.
    pub pid: u32,
    /// The host's `restart_worker` callback, when the host has one (ABI 1.2 and later).
    pub(crate) restart: Option<extern "C" fn(ffi::RawStr)>,
}

impl WorkerContext {
    /// Asks the host to replace this worker process with a fresh one, new before old: the
    /// master starts a new worker in this slot (same build), waits until it is ready, then
    /// drains this one, so no request fails. This worker keeps serving meanwhile; asking again
    /// changes nothing. Use it when the worker's state cannot be trusted any more (a `Mutex`
    /// poisoned by a panic, a leak, a corrupted cache): since plugins are never unloaded, a new
    /// process is the only clean slate. `reason` appears in the host's log.
    ///
    /// Callable from any thread, including threads the plugin started. Returns `false` (and
    /// does nothing) when the host is too old to support it.
    pub fn restart_worker(&self, reason: &str) -> bool {
        match self.restart {
            Some(restart) => {
                restart(ffi::RawStr::new(reason.as_bytes()));
                true
            }
            None => false,
        }
    }
}
