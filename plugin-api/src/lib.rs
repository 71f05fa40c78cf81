//! The contract between the `host` and the HTTP handler plugins it loads, and the guide to writing
//! one.
//!
//! # Writing a plugin
//!
//! A plugin is a `cdylib` depending on `plugin-api`; it implements one safe trait, [`Plugin`], and
//! calls one macro, [`export_plugin!`]. No `unsafe` in plugin code.
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! # A plugin outside the host's repository: the commit (or, once releases are tagged, the tag) of
//! # the host it runs on.
//! plugin-api = { git = "https://git.example.com/you/host.git", rev = "<commit>" }  # features: "websocket", "axum"
//! # Inside the host's workspace: plugin-api = { path = "../plugin-api" }
//! ```
//!
//! ```no_run
//! use plugin_api::{BoxError, Plugin, Request, Response, WorkerContext};
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
//! Build it (`cargo build --release`), point the host's `plugin` key at
//! `target/release/lib<name>.so`, and `host reload` after each build: every new worker loads the
//! new file in its on-start hook and calls [`Plugin::on_worker_start`]. What else reloads, and what
//! stays frozen, is the README's reload rule; the example plugins of the host's repository
//! (`example-plugin`, `example-axum`, `example-sqlx`) are described in its `docs/plugins.md`.
//!
//! **Which `plugin-api` to depend on.** Cargo finds `plugin-api` inside the host's repository by
//! its name, so a plugin needs no checkout of the host's source: a git dependency with a `rev` (or
//! a `tag`) is enough, and `Cargo.lock` pins the commit. No release is tagged yet; releases are to
//! be tagged `plugin-api-vX.Y.Z` with `plugin-api`'s version (`cargo package -p plugin-api` works,
//! so it can go to a registry as it is). A host loads plugins built with the same `plugin-api`
//! major (for `0.x`: the same minor, so a host built with 0.1.x loads plugins built with any 0.1.x,
//! not 0.2), and an ABI minor ([`ffi::ABI_MINOR`]) no newer than its own: an older plugin always
//! loads in a newer host (the host reads the plugin's sizes first), while a plugin built against a
//! newer `plugin-api` than the host is refused with one line (`plugin needs ABI 1.6 but this host
//! supports up to 1.5`). So upgrade the host first, then rebuild plugins at leisure. (Checked by
//! hand: a plugin crate outside the repository, with only `plugin-api = { git =
//! "file:///path/to/host", rev = "..." }`, built and passed `host check`; the host's CI does not
//! repeat it.)
//!
//! What the signatures use is re-exported: [`http`], [`Bytes`], [`Body`] (with [`BodyExt`],
//! [`http_body`], [`http_body_util`]) and [`tokio`]; [`Request`] and [`Response`] are
//! `http::Request<Bytes>` and `http::Response<Bytes>`, [`BoxError`] is `Box<dyn Error + Send +
//! Sync>`. Keep the [`WorkerContext`] (it is `Clone`) in your state to use it from handlers.
//!
//! ## One value per worker, many requests at once
//!
//! [`Plugin::on_worker_start`] runs once in each worker process; the value it returns is shared by
//! every request that worker serves, concurrently: [`Plugin::handle`] runs on many threads at once
//! ([`Dispatch::Blocking`]: the worker's blocking pool, up to the host's `blocking_threads`, 1,024
//! by default; [`Dispatch::Inline`]: the I/O thread), and [`Plugin::serve`] futures run
//! interleaved. So state behind `&self` is `Sync`: atomics, `Mutex`, `RwLock`, connection pools.
//! An error (or a panic) from `on_worker_start` refuses the build: the host keeps the previous one
//! serving, and `host reload` exits non-zero with the error.
//!
//! **Async set-up in `on_worker_start`.** The start hook is synchronous; to await in it (open a
//! `sqlx` pool, run migrations, connect a client), use [`WorkerContext::block_on`]: it runs the
//! future on the plugin's own tokio runtime (not `Handle::current()`, which is the host's business
//! and means nothing in a plugin), with timers, sockets and `tokio::spawn` working, and what the
//! future spawns (a pool's background tasks) keeps running after it returns. The host's
//! `start_timeout` bounds it like any start. Call it only there, never from a handler. The host's
//! `example-sqlx` opens a `sqlx` pool and runs its migrations this way.
//!
//! ```no_run
//! use std::sync::{Arc, RwLock};
//! use std::time::Duration;
//! use plugin_api::{BoxError, Plugin, Request, Response, WorkerContext, tokio};
//!
//! struct App {
//!     upstream: std::net::SocketAddr,
//!     motd: Arc<RwLock<String>>,
//! }
//!
//! impl Plugin for App {
//!     fn on_worker_start(ctx: &WorkerContext) -> Result<Self, BoxError> {
//!         let motd = Arc::new(RwLock::new(String::from("hello\n")));
//!         let refreshed = motd.clone();
//!         let upstream = ctx.block_on(async move {
//!             // Spawned here, this task keeps running on the plugin's runtime afterwards.
//!             tokio::spawn(async move {
//!                 loop {
//!                     tokio::time::sleep(Duration::from_secs(60)).await;
//!                     *refreshed.write().unwrap() = String::from("refreshed\n");
//!                 }
//!             });
//!             let mut addrs = tokio::net::lookup_host("localhost:5432").await?;
//!             addrs.next().ok_or_else(|| BoxError::from("localhost has no address"))
//!         })?;
//!         Ok(App { upstream, motd })
//!     }
//!
//!     fn handle(&self, _req: Request) -> Response {
//!         let _ = self.upstream;
//!         Response::new(self.motd.read().unwrap().clone().into())
//!     }
//! }
//! ```
//!
//! ## The three ways to run a request
//!
//! [`Plugin::dispatch`] is called for every request; keep it a `match` on the path.
//!
//! | [`Dispatch`] | calls | runs on | for |
//! |---|---|---|---|
//! | `Inline` | [`Plugin::handle`] | the worker's I/O thread, no hand-off | handlers that return in microseconds |
//! | `Blocking` (default) | [`Plugin::handle`] | a thread of the blocking pool | handlers that sleep, lock, do blocking I/O, compute |
//! | `Async` | [`Plugin::serve`] | polled on the I/O thread, inside the plugin's own tokio runtime | async clients (sqlx, reqwest, redis), timers, streaming bodies, WebSocket |
//!
//! ```no_run
//! use std::time::Duration;
//! use plugin_api::{Body, BoxError, Cancellation, Dispatch, Plugin, Request, Response, WorkerContext, http, tokio};
//!
//! struct App;
//!
//! impl Plugin for App {
//!     fn on_worker_start(_ctx: &WorkerContext) -> Result<Self, BoxError> {
//!         Ok(App)
//!     }
//!
//!     fn dispatch(&self, _method: &str, path: &str) -> Dispatch {
//!         match path {
//!             "/" => Dispatch::Inline,                        // returns in microseconds
//!             p if p.starts_with("/async/") => Dispatch::Async,
//!             _ => Dispatch::Blocking,                        // may sleep, lock, read files
//!         }
//!     }
//!
//!     fn handle(&self, req: Request) -> Response {
//!         if req.uri().path() == "/" {
//!             return Response::new("hello\n".into());
//!         }
//!         // A slow job in steps: stop as soon as the client is gone.
//!         let cancel = Cancellation::of(&req);
//!         for _step in 0..10 {
//!             if cancel.wait(Duration::from_millis(100)) {
//!                 return Response::new("cancelled\n".into()); // nobody reads it
//!             }
//!         }
//!         Response::new("done\n".into())
//!     }
//!
//!     async fn serve(&self, _req: http::Request<Body>) -> http::Response<Body> {
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!         http::Response::new(Body::from("hello, later\n"))
//!     }
//! }
//! ```
//!
//! - **Blocking.** The worker's own pool: threads start when work comes, up to `blocking_threads`
//!   (1,024), and leave after 60 s idle. Hand-offs are batched: the requests that arrive together
//!   are queued and one thread is woken for them once the I/O thread has read them all, a thread
//!   that takes a job while more wait wakes one more (so jobs that really block spread over
//!   threads), and the answers come back to the I/O thread with one wake for the batch. What the
//!   hand-off costs against the inline path is in the host's `bench/RESULTS.md` (section 8).
//! - **Cancellation.** A blocking handler's request is cancelled when its client leaves (the HTTP/1
//!   connection closed, the HTTP/2 stream reset) or the worker stops waiting for it
//!   (`graceful_timeout`): the answer would never be sent. A request still waiting for a pool
//!   thread is then never started. One already running learns it from [`Cancellation::of`]:
//!   `is_cancelled()` to poll, `wait(d)` to sleep at most `d` and wake at once when cancelled (as
//!   above). A handler that never looks runs on, but its thread stops counting against
//!   `blocking_threads`, so new requests get threads of their own, up to
//!   `blocking_abandoned_threads` more. `Async` handlers need nothing: their future is dropped when
//!   the client leaves, which stops them at their next `.await`.
//! - **Stalls.** An `Inline` handler that holds the I/O thread over 20 ms anyway (its CPU time
//!   or a blocking call; a wait for a CPU on a busy machine does not count, and the judging
//!   starts at the path's first slow call) is logged and its path runs on the blocking pool
//!   from then on. An `Async` handler must not block either: a poll that takes
//!   over 20 ms and blocked the thread or used its CPU is logged with its path, and a future that
//!   never yields wedges its worker, which the host's watchdog (`worker_timeout`) replaces.
//! - **Async.** The plugin links its own copy of tokio, so it gets its own runtime:
//!   `on_worker_start` and every poll of a `serve` future run inside it, so `tokio::time`,
//!   `tokio::net`, `tokio::spawn`, `spawn_blocking` and tokio-based clients work. Its driver runs on
//!   one thread of its own; the host polls the future on its I/O thread with its own waker, so a
//!   future that is ready at once costs no thread hand-off and one that waits parks no thread (the
//!   host's `bench/RESULTS.md` has 10,000 requests awaiting a timer on one worker, and the cost
//!   against the inline path).
//!
//! ## Bodies, streaming and upgrades
//!
//! [`Body::from_stream`] (or [`Body::new`] with any `http_body::Body`) sends each chunk as it
//! comes: chunked on HTTP/1.1, DATA frames on HTTP/2. A stream that has already ended when the
//! response is ready (no chunk, or one: `plugin-api` polls it up to twice, in the handler's task,
//! before handing the response to the host) goes out whole, with `Content-Length`, and costs no
//! call back into the plugin; one that fails in those polls is answered `500`, since nothing was
//! sent yet. After that the host polls the stream only when the connection can take more, so a
//! slow client slows the producer. The request body of an `Async` request streams in as the client
//! sends it: read it with `body.frame().await` (from [`BodyExt`]) or [`Body::to_bytes`]`(limit)`.
//! The host's `max_body_bytes` applies to `handle`'s whole bodies only; a streaming route sets its
//! own limit (`to_bytes(limit)`, or counting as it reads). Each chunk must arrive within the
//! host's `body_read_timeout`, or the body yields an error. Trailers are not passed on.
//!
//! ```no_run
//! use std::time::Duration;
//! use plugin_api::{Body, BodyExt, Bytes, http, tokio};
//!
//! async fn upload(req: http::Request<Body>) -> http::Response<Body> {
//!     let mut body = req.into_body();
//!     let mut bytes = 0usize;
//!     while let Some(frame) = body.frame().await {
//!         match frame {
//!             Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len()),
//!             Err(e) => return http::Response::new(Body::from(format!("read failed: {e}\n"))),
//!         }
//!     }
//!     http::Response::new(Body::from(format!("bytes={bytes}\n")))
//! }
//!
//! fn ticks() -> http::Response<Body> {
//!     let stream = futures_util::stream::unfold(0u32, |n| async move {
//!         tokio::time::sleep(Duration::from_millis(100)).await;
//!         (n < 10).then(|| (Ok::<_, std::io::Error>(Bytes::from(format!("tick {n}\n"))), n + 1))
//!     });
//!     http::Response::new(Body::from_stream(stream))
//! }
//! ```
//!
//! **Upgrades.** An HTTP/1.1 request with `Upgrade` carries an [`upgrade::OnUpgrade`] in its
//! extensions; take it ([`upgrade::on`]), answer `101`, then await it for the raw connection
//! (`tokio::io::AsyncRead + AsyncWrite`). A `101` the host cannot honour (from `handle`, on
//! HTTP/2, without an `Upgrade` request, or after dropping the `OnUpgrade`) is never sent: the
//! client gets `500` and the log says why.
//!
//! ```no_run
//! use plugin_api::{Body, http, tokio, upgrade};
//! use tokio::io::AsyncWriteExt;
//!
//! fn raw(mut req: http::Request<Body>) -> http::Response<Body> {
//!     let Some(on_upgrade) = upgrade::on(&mut req) else {
//!         return http::Response::builder().status(400).body(Body::from("no upgrade\n")).unwrap();
//!     };
//!     tokio::spawn(async move {
//!         if let Ok(mut io) = on_upgrade.await {
//!             let _ = io.write_all(b"hello over the raw connection\n").await;
//!         }
//!     });
//!     http::Response::builder()
//!         .status(http::StatusCode::SWITCHING_PROTOCOLS)
//!         .header(http::header::CONNECTION, "upgrade")
//!         .header(http::header::UPGRADE, "hello")
//!         .body(Body::empty())
//!         .unwrap()
//! }
//! ```
//!
//! **WebSocket.** With the `websocket` feature, `websocket::upgrade` does the handshake and hands
//! you a `tokio-tungstenite` socket (`websocket::WebSocket`: a `Stream` and `Sink` of messages that
//! derefs to tokio-tungstenite's `WebSocketStream`); the `websocket` module has the details and
//! the socket's limits (messages and frames up to 1 MiB, a 4 KiB read buffer, at most about 2 MiB
//! of outgoing frames buffered; a larger incoming message gets Close 1009, and the handler sees
//! `tungstenite::Error::Capacity` as the stream's last item; other limits with
//! `websocket::upgrade_with(&mut req, Limits::default().max_message(16 << 20), handler)`, or
//! `WebSocketUpgrade::max_message_size` under axum).
//! WebSocket over HTTP/2 (RFC 8441) is not supported.
//!
//! ```no_run
//! # #[cfg(feature = "websocket")]
//! # mod chat {
//! use futures_util::{SinkExt, StreamExt};
//! use plugin_api::websocket::{self, Message};
//! use plugin_api::{Body, WorkerContext, http, tokio};
//!
//! async fn echo(ctx: WorkerContext, mut req: http::Request<Body>) -> http::Response<Body> {
//!     websocket::upgrade(&mut req, move |mut socket| async move {
//!         loop {
//!             tokio::select! {
//!                 Some(Ok(Message::Text(t))) = socket.next() => { let _ = socket.send(Message::Text(t)).await; }
//!                 _ = ctx.draining() => { let _ = socket.send(websocket::close_for_restart()).await; return; }
//!                 else => return,
//!             }
//!         }
//!     })
//! }
//! # }
//! ```
//!
//! **Long-lived responses and reloads.** When a worker starts draining (reload, recycle, stop),
//! [`WorkerContext::draining`] resolves: a WebSocket handler sends Close 1012 (Service Restart) and
//! an event stream ends, and clients reconnect to the new generation (the example plugin's `/ws`
//! and `/events`). An upgraded connection counts as open until the plugin drops it, so the old
//! worker waits for it; whatever is still open at `graceful_timeout` is cut, and the host's log
//! line says how many connections (and how many of them upgraded) were cut.
//!
//! ## Configuration
//!
//! [`Plugin::on_worker_start`] gets the `[plugin_config]` table of `host.toml`, deserialized into
//! any `serde` type with [`WorkerContext::config`]:
//!
//! ```no_run
//! use plugin_api::{BoxError, Plugin, Request, Response, WorkerContext};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Settings {
//!     message: String,
//!     #[serde(default)]
//!     limit: u64,
//!     #[serde(default)]
//!     database: Option<std::path::PathBuf>, // database = "data/app.db"
//! }
//!
//! struct Hello {
//!     settings: Settings,
//! }
//!
//! impl Plugin for Hello {
//!     fn on_worker_start(ctx: &WorkerContext) -> Result<Self, BoxError> {
//!         let mut settings: Settings = ctx.config()?; // an error refuses the reload, with its reason
//!         // Relative to the config file, as the host's own paths are: /srv/svc/data/app.db
//!         settings.database = settings.database.map(|p| ctx.resolve_path(p));
//!         Ok(Hello { settings })
//!     }
//!     fn handle(&self, _req: Request) -> Response {
//!         Response::new(format!("{} (limit {})\n", self.settings.message, self.settings.limit).into())
//!     }
//! }
//! ```
//!
//! [`WorkerContext::config_json`] gives the JSON text itself. `host reload` re-reads the table, so
//! a new configuration rolls out like a new build: checked by the canary the same way (an error
//! from `on_worker_start` refuses the reload with its reason while the old generation keeps
//! serving), and taken back with `rollback`. With a host older than ABI 1.3 a plugin sees `{}`.
//! Paths in it are the plugin's to resolve: [`WorkerContext::config_dir`] is the config file's
//! directory and [`WorkerContext::resolve_path`] resolves a path as the host would, so `host -c
//! svc/host.toml start` (or `check`) from any directory opens the same files.
//!
//! **`host check` runs `on_worker_start`, whole.** A plugin whose start hook has side effects
//! (creates a database, runs migrations, registers itself with a service) has them under `check`
//! too, unless it asks: [`WorkerContext::is_check`] is `true` in `check`'s throwaway worker (and
//! `false` in every serving one), so such a hook should only validate there (open read-only,
//! parse, connect) and create nothing. The host's `example-sqlx` does so.
//!
//! ## State, panics and logs
//!
//! **State across reloads.** Nothing in memory survives a reload: each generation is new
//! processes that run `on_worker_start` again (plugin statics included). Keep what must outlive a
//! worker outside it (a database, a cache server, files). The old worker's
//! [`Plugin::on_worker_stop`] runs after its last request (not if it is cut at
//! `graceful_timeout`).
//!
//! **Panics.** A panic in `handle`, in `serve`'s future or in a streamed body becomes a `500` for
//! that request and is logged with its message and location and the request's path; the worker
//! keeps serving. The host counts it apart from other `500`s, for the canary's verdict (ABI 1.5).
//! A streamed body that fails (panics or yields an error) after its head was sent cannot become a
//! `500`: the response is cut instead (an incomplete chunked body on HTTP/1.1, a reset stream on
//! HTTP/2), and the client sees an error, never a body that looks complete.
//!
//! **Poisoned state lasts until the worker goes.** A handler that panics while holding a
//! `std::sync::Mutex` (or `RwLock`) poisons it: every later `lock()` in that worker returns `Err`,
//! for every request, until the process is replaced. Recovering in place (`into_inner` on the
//! `PoisonError`) is right only when the data cannot be half-updated. Otherwise ask for a fresh
//! worker with [`WorkerContext::restart_worker`]:
//!
//! ```no_run
//! use std::sync::Mutex;
//! use plugin_api::{BoxError, Plugin, Request, Response, WorkerContext, http};
//!
//! struct Counter {
//!     ctx: WorkerContext,
//!     state: Mutex<u64>,
//! }
//!
//! impl Plugin for Counter {
//!     fn on_worker_start(ctx: &WorkerContext) -> Result<Self, BoxError> {
//!         Ok(Counter { ctx: ctx.clone(), state: Mutex::new(0) })
//!     }
//!     fn handle(&self, _req: Request) -> Response {
//!         match self.state.lock() {
//!             Ok(mut n) => {
//!                 *n += 1;
//!                 Response::new(format!("{n}\n").into())
//!             }
//!             Err(_) => {
//!                 self.ctx.restart_worker("the shared Mutex is poisoned");
//!                 http::Response::builder().status(500).body("try again\n".into()).unwrap()
//!             }
//!         }
//!     }
//! }
//! ```
//!
//! The master starts a new worker in the slot (same build), waits until it is ready and drains
//! this one, so no request fails; this worker keeps serving meanwhile (at least 1 s after it became
//! ready) and asking again changes nothing. `restart_worker` may be called from any thread; it
//! never blocks. The same call helps with any state a worker cannot repair: a leak, a corrupted
//! cache, a wedged connection pool.
//!
//! **Logging.** Log with `tracing` (add it as a dependency): events from plugin code reach the
//! host's log, at the host's level, with the fields of their enclosing spans, outermost first, as
//! `tracing-subscriber`'s `fmt` writes them; spans entered across `.await` with
//! `tracing::Instrument` count too. An event written while the host runs plugin code for a request
//! (`handle`, a poll of `serve`'s future or of a streamed body) carries that request's `path`.
//!
//! ## Metrics
//!
//! A plugin's own counters, gauges and histograms ([`metrics`], ABI 1.5) are served on the host's
//! `/metrics` beside its own, summed over a generation's workers and labelled with the generation;
//! their values live in memory the master reads, so they never go backwards when a worker is
//! replaced. Register them once, in `on_worker_start` (registration takes a lock and scans the
//! worker's series), and keep the handles (they are `Copy`) in the plugin's state; an update is one
//! call across the ABI and one relaxed atomic add.
//!
//! ```no_run
//! use plugin_api::metrics::{Counter, Gauge, Histogram};
//!
//! let orders = Counter::new("shop_orders_total", "Orders placed", &[("kind", "web")]);
//! let queue = Gauge::new("shop_queue_depth", "Jobs waiting", &[]);
//! let took = Histogram::new("shop_checkout_seconds", "Checkout time", &[], &[0.01, 0.1, 1.0]);
//! orders.inc();
//! queue.set(12);
//! took.observe(0.042);
//! ```
//!
//! Counters only go up, gauges are `i64` set or moved and summed over the live workers (a dead
//! worker's gauge is gone with it), histograms take up to 10 bucket bounds. Names follow
//! Prometheus, at most 64 bytes, never `host_...`; a counter's `_total` is the exposition's own; up
//! to 8 labels (128 bytes together), never `generation`, `plugin`, `version` or `sha256`; keep a
//! label's values few. A bad name, label or bucket list is refused, and so is a series past the
//! worker's 256th: the handle is then inert (`is_live()` says so), and the worker logs why. A
//! plugin built against `plugin-api` before 1.5 loads as before, without metrics.
//!
//! ## axum
//!
//! With the `axum` feature, a plugin is an `axum::Router` built in each worker's
//! `on_worker_start` and exported with `export_axum!(build)`; the `axum` module has the example
//! (the host's `example-axum` is a full one):
//!
//! ```toml
//! plugin-api = { path = "../plugin-api", features = ["axum"] }
//! axum = { version = "0.8", default-features = false, features = ["json", "query"] }
//! ```
//!
//! Every request goes through the router, async, in the plugin's own tokio runtime; bodies stream
//! both ways (an `Sse` response streams, paced by the client). Extractors, `State`, `Json` and
//! `Sse` work as under `axum::serve`. For WebSocket use `plugin_api::axum::WebSocketUpgrade` (same
//! shape, a tokio-tungstenite socket): axum's own `WebSocketUpgrade` needs hyper's upgrade handle,
//! which cannot cross the plugin boundary, so it answers `426` here. `ConnectInfo` is not
//! available (the host passes no peer address). End long-lived responses on `ctx.draining()`
//! (Close 1012 for a WebSocket) so clients move to the new generation.
//!
//! ## Compatibility
//!
//! The host checks the plugin's exported header before calling anything: magic, ABI major (must
//! match) and minor (at most the host's), struct sizes, and the `plugin-api` version (same major,
//! or same minor for `0.x`). A mismatch is refused with expected vs. found. ABI 1.1 added
//! `may_block`, 1.2 `restart_worker`, 1.3 `dispatch`, `serve`, the drain signal and
//! `[plugin_config]`, 1.4 a blocking request's [`Cancellation`], 1.5 the report of a handler panic
//! the plugin's shim caught (counted for the canary analysis), metrics, `config_dir` and
//! `is_check`; plugins built for 1.0, 1.1 and 1.2 still load and serve (the host's
//! `tests/tests/safety.rs`), with what their version had (a plugin older than 1.4, or one run by
//! an older host, sees requests that are never cancelled; one older than 1.5 has its panics counted
//! as `500`s only).
//!
//! # How this crate is built
//!
//! Plugin authors write no `unsafe`: [`export_plugin!`] generates the one exported symbol and the
//! `extern "C"` shims (in [`export`]), which catch every panic. The `#[repr(C)]` layout both sides
//! agree on lives in [`ffi`]; the host checks its header (magic, ABI version, sizes, `plugin-api`
//! version) before it calls anything.
//!
//! The plugin is its own Rust world: it has its own copy of `std`, `tracing` and every other crate
//! it links. What it needs from the host (its slot, its generation, a way to log, a way to ask for
//! a fresh worker) is passed across the ABI in [`ffi::HostContext`]; `tracing` events the plugin
//! emits after `on_worker_start` begins are forwarded to the host's logger.

#[cfg(feature = "axum")]
pub mod axum;
mod body;
mod cancel;
pub mod export;
pub mod ffi;
pub mod gateway;
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

    /// Whether this plugin handles gateway events ([`Plugin::on_gateway_event`]). A worker
    /// links to its group's gateways only when it does; set it to `true` with the handler.
    const GATEWAY_EVENTS: bool = false;

    /// Handles one event of a gateway client (ABI 1.7; only when
    /// [`Plugin::GATEWAY_EVENTS`] is `true`): a connect (refuse it with
    /// [`EventContext::refuse`](gateway::EventContext::refuse)), a message, a close. A
    /// client's events come one at a time, in the order it acted; the event counts as handled
    /// when the future resolves, and one whose worker went away first is given again to
    /// another worker with
    /// [`EventContext::is_redelivered`](gateway::EventContext::is_redelivered) set. What it
    /// sends through `gw` leaves with its answer: the client's gateway applies it exactly
    /// once, even when the event runs twice (other gateways at least once). The client's
    /// session, read and set through `cx`, is kept by the gateway across reloads. Runs in the
    /// plugin's tokio runtime, like [`Plugin::serve`]; a panic answers the event (a connect is
    /// refused `500`) and is counted; one that runs past the host's `gateway_event_timeout`
    /// is dropped (a connect is refused `504`).
    fn on_gateway_event(
        &self,
        gw: gateway::Gateway,
        cx: gateway::EventContext,
        event: gateway::GatewayEvent,
    ) -> impl std::future::Future<Output = ()> + Send {
        let _ = (gw, cx, event);
        async {}
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
