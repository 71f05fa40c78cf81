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
//! With the `axum` feature, `export_axum!(build)` exports an `axum::Router` built per worker
//! instead (module `axum`).
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

#[cfg(feature = "axum")]
pub mod axum;
mod body;
mod cancel;
pub mod export;
pub mod ffi;
mod log;
pub mod metrics;
mod runtime;
mod serve;
pub mod upgrade;
#[cfg(feature = "websocket")]
pub mod websocket;

pub use body::{Body, BodyError};
pub use bytes::Bytes;
pub use cancel::Cancellation;
pub use http;
pub use http_body;
pub use http_body_util::{self, BodyExt};
pub use tokio;

/// The request a handler receives: the whole body, already read by the host.
pub type Request = http::Request<Bytes>;
/// The response a handler returns.
pub type Response = http::Response<Bytes>;
/// The error `on_worker_start` may return; its `Display` becomes the load-failure reason.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How the host runs the requests a [`Plugin::dispatch`] call names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// [`Plugin::handle`] on the host's I/O thread: for handlers that return in microseconds.
    Inline,
    /// [`Plugin::handle`] on a thread of its own: for handlers that may block.
    Blocking,
    /// [`Plugin::serve`]: an async handler with a streamed body, polled on the host's I/O thread
    /// inside the plugin's own tokio runtime.
    Async,
}

/// An HTTP handler plugin. One value is built per worker process, in [`Plugin::on_worker_start`],
/// and shared by every request that worker serves.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Builds the per-worker state. Runs once in each new worker, after the plugin is loaded
    /// and before the worker accepts connections. An error (or a panic) refuses this build:
    /// the host keeps the previous one serving.
    fn on_worker_start(ctx: &WorkerContext) -> Result<Self, BoxError>;

    /// Serves one request synchronously, with the whole body. Called from many threads at once.
    /// It may block unless [`Plugin::dispatch`] says [`Dispatch::Inline`] for its path, and a
    /// panic here becomes a `500` for this request only. A handler that blocks for long should
    /// watch [`Cancellation::of`] its request and return early once the client is gone. The default answers `404`: a plugin
    /// whose every route is async implements [`Plugin::serve`] instead.
    fn handle(&self, req: Request) -> Response {
        let _ = req;
        let mut resp = Response::new(Bytes::from_static(b"not found\n"));
        *resp.status_mut() = http::StatusCode::NOT_FOUND;
        resp
    }

    /// Serves one request asynchronously, for the paths [`Plugin::dispatch`] sends here. The
    /// future runs inside the plugin's own tokio runtime (so `tokio::time`, `tokio::net`,
    /// `tokio::spawn` and tokio-based clients work), polled on the host's I/O thread: it must not
    /// block (use `tokio::task::spawn_blocking` for that). The request body streams in as the
    /// client sends it ([`Body`]); the response body may stream out ([`Body::from_stream`]),
    /// paced by the client. An `Upgrade` request (a WebSocket handshake) carries an
    /// [`upgrade::OnUpgrade`] in its extensions. A panic is a `500` for this request only.
    /// The default answers `404`.
    fn serve(
        &self,
        req: http::Request<Body>,
    ) -> impl std::future::Future<Output = http::Response<Body>> + Send {
        let _ = req;
        async {
            let mut resp = http::Response::new(Body::from("not found\n"));
            *resp.status_mut() = http::StatusCode::NOT_FOUND;
            resp
        }
    }

    /// How the host runs requests with this method and path: [`Dispatch::Async`] sends them to
    /// [`Plugin::serve`]; the others to [`Plugin::handle`], on the I/O thread
    /// ([`Dispatch::Inline`]) or on a thread of its own ([`Dispatch::Blocking`]). Called for
    /// every request, so keep it to a `match` on the path. The default follows
    /// [`Plugin::may_block`].
    fn dispatch(&self, method: &str, path: &str) -> Dispatch {
        if self.may_block(method, path) {
            Dispatch::Blocking
        } else {
            Dispatch::Inline
        }
    }

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
    /// The `[plugin_config]` table as JSON text (`{}` when absent or the host is older).
    pub(crate) config: std::sync::Arc<str>,
    /// The config file's directory (ABI 1.5; `None` from an older host).
    pub(crate) config_dir: Option<std::sync::Arc<std::path::Path>>,
    /// Running under `host check` (ABI 1.5; `false` from an older host).
    pub(crate) check: bool,
}

impl WorkerContext {
    /// The `[plugin_config]` table of the host's configuration file, deserialized into `T`.
    /// `host reload` re-reads it, so a new configuration rolls out like a new build: return the
    /// error from `on_worker_start` to refuse it. A file without the table gives `{}`.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T, BoxError> {
        serde_json::from_str(&self.config).map_err(|e| format!("[plugin_config]: {e}").into())
    }

    /// The `[plugin_config]` table as JSON text.
    pub fn config_json(&self) -> &str {
        &self.config
    }

    /// The directory of the host's configuration file (absolute): the host resolves its own
    /// relative paths (`plugin`, `state_dir`) against it, and a plugin should do the same with
    /// paths in `[plugin_config]`, so that `host -c svc/host.toml` means the same files from any
    /// current directory (see [`Self::resolve_path`]). `None` from a host older than ABI 1.5.
    pub fn config_dir(&self) -> Option<&std::path::Path> {
        self.config_dir.as_deref()
    }

    /// `path` as the host would read a path in its configuration file: an absolute path as it
    /// is, a relative one against [`Self::config_dir`] (against the current directory when the
    /// host is older than ABI 1.5).
    pub fn resolve_path(&self, path: impl AsRef<std::path::Path>) -> std::path::PathBuf {
        let path = path.as_ref();
        match self.config_dir() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// Whether this `on_worker_start` runs under `host check`: a throwaway worker that serves
    /// nothing and is stopped right after (`on_worker_stop` runs). `check` runs the whole start
    /// hook, so a plugin that creates a database, runs migrations or registers itself somewhere
    /// should skip such side effects here and only validate (open read-only, parse, connect).
    /// Always `false` from a host older than ABI 1.5.
    pub fn is_check(&self) -> bool {
        self.check
    }

    /// Runs `future` to completion on the plugin's tokio runtime and returns its output: the way
    /// to do async set-up in `on_worker_start` (open a `sqlx` pool, run migrations, connect a
    /// client). Timers, sockets and `tokio::spawn` work inside it, and what it spawns keeps
    /// running on the plugin's runtime after it returns (a pool's background tasks, say).
    ///
    /// It blocks the calling thread, which in `on_worker_start` is the worker's I/O thread
    /// before it serves anything: the host's `start_timeout` bounds it (a start that takes
    /// longer is refused, and the worker is killed). Never call it from a handler: on the I/O
    /// thread it would stall every connection of the worker, and in a task of the plugin's
    /// runtime tokio refuses it with a panic.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        runtime::block_on(future)
    }

    /// Whether this worker is draining (a reload, a recycle or a stop replaces it): long-lived
    /// responses should end soon. Hosts older than ABI 1.3 never say so.
    pub fn is_draining(&self) -> bool {
        runtime::is_draining()
    }

    /// Resolves once this worker begins draining: a WebSocket handler then sends Close with code
    /// 1012 (Service Restart), an event stream ends, and clients reconnect to the new
    /// generation. What is still open at the host's `graceful_timeout` is cut.
    pub fn draining(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        runtime::draining()
    }

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
