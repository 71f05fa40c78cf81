//! A worker process: the master's own binary re-exec'd with `__worker`. It receives its
//! [`WorkerSpec`] over its channel, loads the generation's plugin snapshot in its on-start hook,
//! serves HTTP on the listening socket it inherited, and drains when told.
//!
//! Owns: the accept loop (which drops connections whose client is already gone, see
//! [`backlog`], stops accepting while the worker holds `max_connections`, and checks that its
//! listening socket is still there, see [`listener`]: a canary whose plugin broke it is
//! refused, a closed fd 3 makes the worker ask for its replacement, a shut-down socket is left
//! out of the reactor until the master re-arms it), the start order (the worker table is mapped
//! and its fd closed before the plugin is loaded), per-connection HTTP (hyper, HTTP/1.1 and
//! HTTP/2, with HTTP/2's streams, per-stream send buffer and pings bounded; the slowloris guard
//! and `keepalive_timeout` are [`head_timeout`]'s sweep, a write that makes no progress for
//! `send_timeout` ends its connection in [`send_timeout`], small writes are joined by
//! [`coalesce`]), each request's path in
//! [`request`] (the built-in `/_host/` routes; the plugin's handler on the I/O thread when the
//! plugin declares it non-blocking, on the blocking [`pool`] otherwise), the heartbeat that tells the
//! master its I/O thread still runs, and the drain. It counts each request in its cell of the
//! shared worker table for `/metrics` (see `counters`), keeps its plugin's metrics there too
//! ([`metrics_abi`]), and writes the access log off the I/O thread ([`access_log`]). It never
//! binds a socket, never spawns
//! processes and never decides when to reload: it obeys [`MasterToWorker`].
//!
//! Drain: stop accepting at once and tell the master; HTTP/1 responses from then on carry
//! `Connection: close`; HTTP/2 connections get GOAWAY; idle HTTP/1 keep-alive connections may
//! send one more request for `idle_grace`, then are closed. When the last connection is done,
//! the plugin's `on_worker_stop` runs and the worker exits. At `graceful_timeout` it exits anyway
//! and logs what it cut.
//!
//! Recycling: when its request count reaches the limit in its spec, or its plugin calls
//! `restart_worker()`, the worker sends [`WorkerToMaster::RecycleMe`] once and goes on serving
//! until the master drains it, meanwhile steering clients to the other workers (keep-alive
//! responses carry `Connection: close`, and it steps aside before accepting while others can).

mod abi_io;
mod access_log;
mod backlog;
mod callbacks;
mod calls;
pub mod check;
mod coalesce;
mod drain_signal;
mod first_poll;
mod h2_drain;
mod head_timeout;
mod listener;
pub mod loader;
mod metrics_abi;
mod pool;
mod request;
mod send_timeout;
mod slow_paths;
mod thread_clock;

use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::fd;
use crate::protocol::{
    MasterToWorker, Receiver, Sender, StartupTimings, WorkerSpec, WorkerToMaster,
};
use loader::{LoadedPlugin, Placement};

/// The host's version, compiled into the binary: part of the frozen "start script".
pub const HOST_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Which build of `host` this is: `HOST_BUILD_ID` at compile time, `dev` when unset. `status`
/// and `/_host/health` report it, so an upgrade can be seen to have happened.
pub const HOST_BUILD: &str = match option_env!("HOST_BUILD_ID") {
    Some(id) => id,
    None => "dev",
};

/// The blocking pool's threads leave after this long without work (its bounds are in the spec).
const POOL_IDLE: Duration = Duration::from_secs(60);

/// An inline handler slower than this stalled the I/O thread: its path goes to the blocking pool
/// from then on.
const INLINE_LIMIT: Duration = Duration::from_millis(20);

/// How long a worker holding more than its share of connections waits before accepting, so
/// that a burst of reconnects (the keep-alive clients of a drained worker) spreads out instead
/// of landing on whichever worker is on a CPU. See `accept_table`.
const ACCEPT_STEP_ASIDE: Duration = Duration::from_millis(1);
/// At most this many steps aside in a row...
const ACCEPT_STEP_ASIDE_ROUNDS: u32 = 30;
/// ...and only while the others keep taking connections: after this many steps in which they
/// took none (busy, or hung), accept. 20, not 5: a worker waiting for a CPU on a busy machine
/// takes longer than 5 (or 10) ms to take its connection (WebSockets landed 7:3 on two workers).
const ACCEPT_STEP_ASIDE_IDLE_ROUNDS: u32 = 20;

/// While the shared listening socket does not listen, how often a worker looks again.
const LISTENER_RECHECK: Duration = Duration::from_millis(20);

/// At most one keep-alive connection handed off to a less loaded worker per this long.
const HAND_OFF_EVERY: Duration = Duration::from_millis(100);

/// HTTP/2 connections are pinged after this long without a frame from the client (or after
/// `keepalive_timeout`, if shorter), and closed when the ping is not answered within
/// [`H2_PING_TIMEOUT`] (or `keepalive_timeout`, if shorter): a vanished peer is found even while
/// a stream stays open with nothing to send.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// When `max_connections` is not set: this share of the worker's open-files limit (the rest
/// stays for the plugin's own files, sockets and pipes).
const CONNECTIONS_PER_FD: (u64, u64) = (9, 10);

/// At `graceful_timeout`, how long the `503` answers to requests still running may take to be
/// written before the worker exits anyway (the master kills it 2 s after the timeout).
const CUT_FLUSH: Duration = Duration::from_millis(1000);

/// Where `restart_worker()` calls from the plugin (any thread) reach this worker's event loop.
static RECYCLE_REQUESTS: std::sync::OnceLock<mpsc::UnboundedSender<(String, bool)>> =
    std::sync::OnceLock::new();

/// The plugin called `restart_worker(reason)`: ask the master for a replacement (once). Never
/// blocks: called from the plugin's threads.
pub(crate) fn plugin_asked_restart(reason: &str) {
    if let Some(tx) = RECYCLE_REQUESTS.get() {
        let reason = match reason.trim() {
            "" => "the plugin asked for a restart".to_string(),
            r => format!("the plugin asked for a restart: {r}"),
        };
        let _ = tx.send((reason, true));
    }
}

/// What every connection and request of this worker shares.
struct Shared {
    /// Paths caught stalling the I/O thread (bounded, see [`slow_paths`]).
    slow_paths: slow_paths::SlowPaths,
    plugin: Arc<LoadedPlugin>,
    /// Where `Dispatch::Blocking` handlers run.
    pool: pool::Pool,
    http: auto::Builder<TokioExecutor>,
    draining: Arc<AtomicBool>,
    /// Fired when the worker starts draining: each connection task waits on it.
    drain: drain_signal::DrainSignal,
    /// The idle guard (`header_read_timeout`, `keepalive_timeout`).
    head_timeout: Arc<head_timeout::HeadTimeout>,
    /// A connection whose writes make no progress for this long is closed.
    send_timeout: Duration,
    /// At this many open connections the worker stops accepting until one closes.
    max_connections: u64,
    /// Set at `graceful_timeout`: requests still waiting for their handler answer `503`.
    cut_rx: watch::Receiver<bool>,
    /// Requests answered `503` because they were still running at `graceful_timeout`.
    cut_answered: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicU64,
    /// Open connections, upgraded ones (handed to the plugin after a `101`) included.
    connections: watch::Sender<u64>,
    /// Of those, upgraded connections the plugin still holds.
    upgraded: AtomicU64,
    /// The shared worker table and this worker's cell in it: requests in flight are recorded
    /// there, and, with `balance`, the count of connections that stay.
    accept_table: Option<(crate::accept_table::Table, usize)>,
    /// This worker's request counters in its cell (for the master's `/metrics`).
    counters: Option<&'static crate::counters::Counters>,
    balance: bool,
    /// Open connections that will stay: they carried a request that did not ask to close the
    /// connection after it (HTTP/2, or HTTP/1 keep-alive), or were upgraded ([`UpgradeGuard`]). What the accept table counts: a
    /// connection per request lives microseconds and says nothing about load to come.
    staying: AtomicU64,
    /// When this worker last closed a keep-alive connection to even out the load (monotonic ns).
    last_hand_off: AtomicU64,
    idle_grace: Duration,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    /// Recycling: ask for a replacement after this many requests (0: never), of which
    /// `recycle_jitter` is jitter; the ask goes to the event loop through `recycle_tx`.
    recycle_after: u64,
    recycle_jitter: u64,
    /// (reason, asked by the plugin)
    recycle_tx: mpsc::UnboundedSender<(String, bool)>,
    /// Asked the master for a replacement: steer clients to the other workers until drained.
    retiring: AtomicBool,
}

impl Shared {
    /// Publishes this worker's connection count, while it accepts.
    fn publish_connections(&self) {
        if let Some((table, cell)) = &self.accept_table
            && self.balance
            && !self.draining.load(Ordering::Relaxed)
        {
            table.publish(*cell, self.staying.load(Ordering::Relaxed));
        }
    }

    /// Whether this worker holds clearly more staying connections than the least loaded other
    /// accepting worker (see [`crate::accept_table::over_share`]); never without balancing.
    fn ahead_of_least(&self) -> bool {
        let Some((table, cell)) = self.accept_table.as_ref().filter(|_| self.balance) else {
            return false;
        };
        let staying = self.staying.load(Ordering::Relaxed);
        table
            .least_loaded_other(*cell)
            .is_some_and(|least| crate::accept_table::over_share(staying, least))
    }

    /// Whether to close this HTTP/1 keep-alive connection after its response, so its client
    /// reconnects to a less loaded worker: this worker holds clearly more staying connections
    /// than the least loaded one, and has not handed one off in the last [`HAND_OFF_EVERY`].
    /// Bursts that landed unevenly (the accept step-aside is bounded) even out this way.
    fn hand_off_one(&self, conn: &Connection) -> bool {
        if !conn.staying.load(Ordering::Relaxed) || !self.ahead_of_least() {
            return false;
        }
        let now = monotonic_ns();
        let last = self.last_hand_off.load(Ordering::Relaxed);
        if now.saturating_sub(last) < HAND_OFF_EVERY.as_nanos() as u64 {
            return false;
        }
        self.last_hand_off.store(now, Ordering::Relaxed);
        true
    }

    /// Before an accept: while this worker holds clearly more connections than the least
    /// loaded other accepting worker (which the kernel woke for the same connection), wait so
    /// that worker takes it. Bounded, and only while the others are seen taking connections.
    async fn step_aside(&self) {
        let Some((table, cell)) = self.accept_table.as_ref().filter(|_| self.balance) else {
            return;
        };
        // A worker waiting for its replacement leaves new connections to any other.
        let over = || {
            (self.retiring.load(Ordering::Relaxed) && table.least_loaded_other(*cell).is_some())
                || self.ahead_of_least()
        };
        let (mut others, mut idle) = (table.others_total(*cell), 0);
        for _ in 0..ACCEPT_STEP_ASIDE_ROUNDS {
            if !over() || idle >= ACCEPT_STEP_ASIDE_IDLE_ROUNDS {
                return;
            }
            tokio::time::sleep(ACCEPT_STEP_ASIDE).await;
            let now = table.others_total(*cell);
            idle = if now > others { 0 } else { idle + 1 };
            others = now;
        }
    }
}

/// Entry point of the `__worker` role.
pub fn run(
    slot: u32,
    generation: u64,
    master_pid: u32,
    spawned_at_ns: u64,
    log_format: crate::logging::LogFormat,
) -> ExitCode {
    let since_spawn = move || monotonic_ns().saturating_sub(spawned_at_ns) / 1000;
    let mut startup = StartupTimings {
        exec_us: since_spawn(),
        ..Default::default()
    };
    crate::logging::init(
        crate::logging::Process::Worker { slot, generation },
        log_format,
    );
    // Die with the master. The signal fires when the *thread* that spawned us exits; the master
    // spawns from its main thread, which lives as long as it does. Check the parent right after,
    // in case it died before the call.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        tracing::warn!(error = %e, "cannot set the parent-death signal");
    }
    if getppid() != Pid::from_raw(master_pid as i32) {
        tracing::error!(master_pid, "the master is gone; exiting");
        return ExitCode::FAILURE;
    }
    let (listener, channel) = match (
        fd::take_inherited(fd::LISTENER_FD, "listener"),
        fd::take_inherited(fd::CHANNEL_FD, "channel"),
    ) {
        (Ok(l), Ok(c)) => (std::net::TcpListener::from(l), StdUnixStream::from(c)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(rt) = io_runtime() else {
        return ExitCode::FAILURE;
    };
    startup.runtime_us = since_spawn();
    let code = rt.block_on(serve(
        listener,
        channel,
        slot,
        generation,
        startup,
        spawned_at_ns,
        log_format,
    ));
    // Handlers still blocked at a graceful deadline must not hold the exit up (the blocking
    // pool's threads are never joined either: the process exits under them).
    rt.shutdown_background();
    code
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the master stamps `--spawned-at-ns` with.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

async fn serve(
    listener: std::net::TcpListener,
    channel: StdUnixStream,
    slot: u32,
    generation: u64,
    mut startup: StartupTimings,
    spawned_at_ns: u64,
    log_format: crate::logging::LogFormat,
) -> ExitCode {
    let since_spawn = || monotonic_ns().saturating_sub(spawned_at_ns) / 1000;
    let (mut tx, rx) = match channel_halves(channel) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the master channel");
            return ExitCode::FAILURE;
        }
    };
    let mut orders = spawn_reader(rx);

    let spec: WorkerSpec = match orders.recv().await {
        Some(MasterToWorker::Start(spec)) if spec.slot == slot && spec.generation == generation => {
            spec
        }
        other => {
            tracing::error!(
                ?other,
                "expected a Start order for this slot and generation"
            );
            return ExitCode::FAILURE;
        }
    };

    startup.spec_us = since_spawn();
    // Before the plugin starts: `restart_worker()` may be called from `on_worker_start` on.
    let (recycle_tx, mut recycle_rx) = mpsc::unbounded_channel::<(String, bool)>();
    let _ = RECYCLE_REQUESTS.set(recycle_tx.clone());
    // The worker table, mapped and its fd closed before any plugin code runs (loading runs the
    // plugin's ELF constructors): plugin code never holds the memfd, so it cannot truncate it
    // under the master (it is sealed besides, see `accept_table`).
    let accept_table = spec.accept_cell.and_then(|cell| {
        let table = fd::take_inherited(crate::accept_table::TABLE_FD, "accept table")
            .map_err(|e| e.to_string())
            .and_then(|fd| {
                crate::accept_table::Table::map(&fd, spec.accept_cells as usize)
                    .map_err(|e| crate::error_chain(&e))
            });
        match table {
            Ok(table) => {
                if let Some(series) = table.plugin_series(cell as usize) {
                    metrics_abi::install(series, table.counters(cell as usize));
                }
                Some((table, cell as usize))
            }
            Err(e) => {
                tracing::warn!("{e}; accepting without balancing");
                None
            }
        }
    });
    // Which socket fd 3 is, before plugin code can close or replace it, and whether it listens
    // (it may be down already, shut down by another worker's plugin: not this plugin's doing).
    let listener_id = match listener::identity(&listener) {
        Ok(id) => id,
        Err(e) => {
            let reason = format!("cannot use the inherited listening socket: {e}");
            tracing::error!("{reason}");
            let _ = tx.send(&WorkerToMaster::StartFailed { reason }).await;
            return ExitCode::FAILURE;
        }
    };
    let listening_before = listener::check(listener_id).is_ok();
    // The on-start hook: load this generation's plugin. Everything linked into `host` is frozen;
    // this is the code a reload refreshes.
    let at = Placement {
        slot,
        generation,
        sha256: spec.plugin_sha256.clone(),
        config: spec.plugin_config.clone(),
        config_dir: spec.config_dir.clone(),
        check: false,
    };
    let plugin = match loader::load(&spec.plugin, &at) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            // The master knows which configured file this snapshot came from: send the cause.
            let _ = tx
                .send(&WorkerToMaster::StartFailed {
                    reason: e.kind.to_string(),
                })
                .await;
            return ExitCode::FAILURE;
        }
    };
    startup.dlopen_us = plugin.loaded_at_ns.saturating_sub(spawned_at_ns) / 1000;
    startup.on_worker_start_us = since_spawn();
    tracing::info!(plugin = %plugin.info.name, version = %plugin.info.version, sha256 = %&plugin.info.sha256[..12], "plugin loaded");
    // Its constructors and `on_worker_start` ran: a plugin that closed fd 3 or shut the shared
    // socket down is refused (the master re-arms the shared socket).
    if let Err(lost) = listener::check(listener_id)
        && (lost.own_fd || listening_before)
    {
        let reason = format!(
            "loading the plugin (its constructors or on_worker_start) broke the listening socket: {}",
            lost.reason
        );
        tracing::error!("{reason}");
        if lost.own_fd {
            // fd 3 is not ours any more: never close it.
            std::mem::forget(listener);
        }
        let _ = tx.send(&WorkerToMaster::StartFailed { reason }).await;
        return ExitCode::FAILURE;
    }

    let listener = match listener
        .set_nonblocking(true)
        .and_then(|_| listener::register(listener))
    {
        Ok(l) => l,
        Err(e) => {
            let reason = format!("cannot use the inherited listening socket: {e}");
            tracing::error!("{reason}");
            let _ = tx.send(&WorkerToMaster::StartFailed { reason }).await;
            return ExitCode::FAILURE;
        }
    };

    let (cut_tx, cut_rx) = watch::channel(false);
    let mut http = auto::Builder::new(TokioExecutor::new());
    // The slowloris guard is `head_timeout`'s sweep, not hyper's timer per request.
    http.http1()
        .keep_alive(true)
        .header_read_timeout(None)
        .max_buf_size(spec.max_header_bytes);
    if spec.max_headers != 100 {
        // hyper's default; any other value moves header parsing to the heap, so only when asked.
        http.http1().max_headers(spec.max_headers);
    }
    // What one HTTP/2 connection can make the worker hold for a client that does not read:
    // at most `http2_max_streams` streams, each buffering at most `http2_send_buffer` of its
    // response (hyper's defaults, 200 x 400 KiB, came to ~107 MB with h2's overhead).
    let keepalive = Duration::from_millis(spec.keepalive_timeout_ms.max(1));
    http.http2()
        .max_header_list_size(spec.max_header_bytes as u32)
        .max_concurrent_streams(spec.http2_max_streams.max(1))
        .max_send_buf_size(spec.http2_send_buffer.max(1024))
        .keep_alive_interval(Some(H2_PING_INTERVAL.min(keepalive)))
        .keep_alive_timeout(H2_PING_TIMEOUT.min(keepalive));
    http.http2().timer(TokioTimer::new());
    let info = plugin.info.clone();
    let draining = Arc::new(AtomicBool::new(false));
    let send_timeout = Duration::from_millis(spec.send_timeout_ms.max(1));
    let head_timeout = head_timeout::HeadTimeout::start(
        Duration::from_millis(spec.header_read_timeout_ms),
        keepalive,
        send_timeout,
    );
    let max_connections = match spec.max_connections {
        0 => connections_from_fd_limit(),
        n => n,
    };
    let counters = accept_table.and_then(|(table, cell)| table.counters(cell));
    if let Some(c) = counters {
        callbacks::count_panics_in(c);
    }
    if let Some(path) = &spec.access_log {
        access_log::start(path.clone(), log_format, generation, counters);
    }
    let pool_limits = pool::Limits {
        max_threads: spec.pool.max_threads as usize,
        max_queue: spec.pool.max_queue as usize,
        max_abandoned: spec.pool.max_abandoned as usize,
    };
    let shared = Arc::new(Shared {
        slow_paths: slow_paths::SlowPaths::new(spec.pool.max_slow_paths as usize, counters),
        plugin: Arc::new(plugin),
        pool: pool::Pool::new(pool_limits, POOL_IDLE, counters),
        http,
        draining: draining.clone(),
        drain: drain_signal::DrainSignal::new(draining),
        head_timeout,
        send_timeout,
        max_connections,
        cut_rx,
        cut_answered: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        connections: watch::Sender::new(0),
        upgraded: AtomicU64::new(0),
        counters,
        accept_table,
        balance: spec.accept_balance,
        staying: AtomicU64::new(0),
        last_hand_off: AtomicU64::new(0),
        idle_grace: Duration::from_millis(spec.idle_grace_ms),
        max_body_bytes: spec.max_body_bytes,
        body_read_timeout: Duration::from_millis(spec.body_read_timeout_ms),
        recycle_after: spec.max_requests,
        recycle_jitter: spec.max_requests_jitter,
        recycle_tx,
        retiring: AtomicBool::new(false),
    });
    let graceful_timeout = Duration::from_millis(spec.graceful_timeout_ms);

    if tx
        .send(&WorkerToMaster::Ready {
            plugin: info,
            startup: StartupTimings {
                ready_us: since_spawn(),
                ..startup
            },
        })
        .await
        .is_err()
    {
        tracing::error!("the master channel closed before ready");
        return ExitCode::FAILURE;
    }
    tracing::info!("ready");
    shared.publish_connections();
    // Proof for the master's watchdog that this thread still runs: sent from the loop below, on
    // the I/O thread, so a handler that never gives the thread back (or SIGSTOP) stops it.
    let mut heartbeat = (spec.heartbeat_ms > 0).then(|| {
        let every = Duration::from_millis(spec.heartbeat_ms);
        let mut beat = tokio::time::interval_at(Instant::now() + every, every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat
    });

    let mut listener = Some(listener);
    // The listener while the shared socket does not listen (shut down by a plugin): out of the
    // reactor, checked every `LISTENER_RECHECK` until the master re-armed it.
    let mut parked: Option<std::net::TcpListener> = None;
    let mut deadline: Option<Instant> = None;
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    // Signals aimed at the whole process group (Ctrl-C in a terminal) are the master's business:
    // keep these registered so they neither kill nor disturb the worker.
    let _ignored: Vec<_> = [
        tokio::signal::unix::SignalKind::interrupt(),
        tokio::signal::unix::SignalKind::quit(),
        tokio::signal::unix::SignalKind::hangup(),
        tokio::signal::unix::SignalKind::user_defined1(),
        tokio::signal::unix::SignalKind::user_defined2(),
    ]
    .into_iter()
    .filter_map(|k| tokio::signal::unix::signal(k).ok())
    .collect();
    let mut conns = shared.connections.subscribe();
    // Wakes the accept loop when a connection closes while it holds `max_connections`.
    let mut below_limit = shared.connections.subscribe();
    let mut at_limit = false;

    let start_drain = |listener: &mut Option<AsyncFd<std::net::TcpListener>>,
                       deadline: &mut Option<Instant>,
                       why: &str| {
        if deadline.is_none() {
            tracing::info!(reason = why, "draining");
            *listener = None;
            shared.draining.store(true, Ordering::SeqCst);
            if let Some((table, cell)) = &shared.accept_table {
                table.clear(*cell);
            }
            shared.drain.fire();
            // Long-lived handlers (WebSocket, event streams) learn it and wind down.
            shared.plugin.on_drain();
            *deadline = Some(Instant::now() + graceful_timeout);
        }
    };

    let cut = loop {
        // At `max_connections`: stop accepting (the other workers, or the backlog, take new
        // connections) until one closes.
        let full = *below_limit.borrow_and_update() >= shared.max_connections;
        if full && !at_limit && listener.is_some() {
            if let Some(counters) = shared.counters {
                counters.limit_hit(crate::counters::Limit::Connections);
            }
            static AT_LIMIT: crate::ratelimit::RateLimit =
                crate::ratelimit::RateLimit::per_second();
            if let Some(suppressed) = AT_LIMIT.hit(&std::io::ErrorKind::QuotaExceeded.into()) {
                tracing::warn!(
                    max_connections = shared.max_connections,
                    suppressed,
                    "holding max_connections: not accepting until a connection closes"
                );
            }
        }
        at_limit = full;
        tokio::select! {
            _ = below_limit.changed(), if full => {}
            accepted = async {
                shared.step_aside().await;
                listener::accept(listener.as_ref().expect("guarded")).await
            }, if listener.is_some() && !full => {
                match accepted {
                    // Its client gave up while it waited in the backlog: do not run its request.
                    Ok(listener::Accepted::Connection(stream)) if backlog::client_gone(&stream) => {
                        backlog::note_dropped()
                    }
                    Ok(listener::Accepted::Connection(stream)) => {
                        let Ok(stream) = TcpStream::from_std(stream) else {
                            continue;
                        };
                        spawn_connection(shared.clone(), stream);
                        // Let the new connection read its first request (and count itself for
                        // balance, if it will stay) before the next accept looks at the counts.
                        if shared.balance {
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: log at most once a second per cause (with how many
                        // were not logged) and back off briefly instead of spinning.
                        static ACCEPT_ERRORS: crate::ratelimit::RateLimit =
                            crate::ratelimit::RateLimit::per_second();
                        let logged = ACCEPT_ERRORS.hit(&e);
                        if let Some(suppressed) = logged {
                            tracing::warn!(error = %e, suppressed, "accept failed");
                        }
                        // The listener itself may be gone (closed, or shut down by a plugin):
                        // tell the master at once (then at most once a second).
                        let lost = if listener::means_gone(&e) {
                            listener::check(listener_id).err()
                        } else {
                            None
                        };
                        match lost {
                            Some(lost) if lost.own_fd => {
                                tracing::error!(
                                    "{}: this worker stops accepting and asks for a replacement",
                                    lost.reason
                                );
                                // fd 3 is not ours any more: never close it (or deregister it).
                                if let Some(l) = listener.take() {
                                    std::mem::forget(l);
                                }
                                let _ = tx
                                    .send(&WorkerToMaster::ListenerLost {
                                        own_fd: true,
                                        reason: lost.reason,
                                    })
                                    .await;
                            }
                            Some(lost) => {
                                if logged.is_some() {
                                    let _ = tx
                                        .send(&WorkerToMaster::ListenerLost {
                                            own_fd: false,
                                            reason: lost.reason,
                                        })
                                        .await;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Ok(listener::Accepted::HungUp) => {
                        // Shut down (by a plugin, here or in another worker). Out of the reactor
                        // until it listens again; the master re-arms it.
                        let lost = listener::check(listener_id).err();
                        if let Some(l) = listener.take() {
                            match lost {
                                Some(ref lost) if lost.own_fd => std::mem::forget(l),
                                _ => parked = Some(l.into_inner()),
                            }
                        }
                        match lost {
                            Some(lost) => {
                                static HUNG_UP: crate::ratelimit::RateLimit =
                                    crate::ratelimit::RateLimit::per_second();
                                if let Some(suppressed) =
                                    HUNG_UP.hit(&std::io::ErrorKind::Other.into())
                                {
                                    tracing::warn!(
                                        suppressed,
                                        "{}; waiting for the master to re-arm it",
                                        lost.reason
                                    );
                                }
                                if lost.own_fd {
                                    parked = None;
                                }
                                let _ = tx
                                    .send(&WorkerToMaster::ListenerLost {
                                        own_fd: lost.own_fd,
                                        reason: lost.reason,
                                    })
                                    .await;
                            }
                            // Re-armed already: register it again at once.
                            None => {
                                listener = parked.take().and_then(|l| {
                                    listener::register(l).ok()
                                });
                            }
                        }
                    }
                }
            }
            _ = tokio::time::sleep(LISTENER_RECHECK), if parked.is_some() && deadline.is_none() => {
                if listener::check(listener_id).is_ok() {
                    tracing::debug!("the listening socket listens again; accepting");
                    listener = parked
                        .take()
                        .and_then(|l| listener::register(l).ok());
                }
            }
            order = orders.recv() => match order {
                Some(MasterToWorker::Drain) => {
                    start_drain(&mut listener, &mut deadline, "ordered by the master");
                    let _ = tx.send(&WorkerToMaster::Draining).await;
                }
                Some(MasterToWorker::QueryStats) => {
                    let stats = WorkerToMaster::Stats {
                        requests: shared.requests.load(Ordering::Relaxed),
                        in_flight: shared.in_flight.load(Ordering::Relaxed),
                        connections: *shared.connections.borrow(),
                    };
                    let _ = tx.send(&stats).await;
                }
                Some(MasterToWorker::Start(_)) => tracing::warn!("ignoring a second Start order"),
                None => {
                    start_drain(&mut listener, &mut deadline, "the master channel closed");
                }
            },
            Some((reason, by_plugin)) = recycle_rx.recv() => {
                // Once: the master coalesces anyway, and a draining worker is being replaced.
                if deadline.is_none() && !shared.retiring.swap(true, Ordering::SeqCst) {
                    tracing::info!(reason = %reason, "asking the master for a replacement");
                    let _ = tx.send(&WorkerToMaster::RecycleMe { reason, by_plugin }).await;
                }
            }
            _ = async { sigterm.as_mut().expect("guarded").recv().await }, if sigterm.is_some() => {
                start_drain(&mut listener, &mut deadline, "SIGTERM");
                let _ = tx.send(&WorkerToMaster::Draining).await;
            }
            _ = async { heartbeat.as_mut().expect("guarded").tick().await }, if heartbeat.is_some() => {
                let _ = tx.send(&WorkerToMaster::Heartbeat).await;
            }
            _ = conns.wait_for(|n| *n == 0), if deadline.is_some() => break None,
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                break Some(shared.in_flight.load(Ordering::SeqCst));
            }
        }
    };

    let (mut cut_requests, mut cut_connections) = (0, 0);
    if let Some(running) = cut {
        // Requests whose handler is still running get `503` with `Retry-After` instead of a
        // closed connection; give hyper a moment to write those answers, then cut the rest.
        let _ = cut_tx.send(true);
        let _ = tokio::time::timeout(CUT_FLUSH, conns.wait_for(|n| *n == 0)).await;
        let answered = shared.cut_answered.load(Ordering::SeqCst);
        cut_connections = *shared.connections.borrow();
        cut_requests = running;
        tracing::warn!(
            running,
            answered_503 = answered,
            cut_connections,
            of_which_upgraded = shared.upgraded.load(Ordering::SeqCst),
            timeout = %humantime::format_duration(graceful_timeout),
            "graceful_timeout reached: answered {answered} running requests with 503, cutting {cut_connections} connections"
        );
    } else {
        // Every connection is closed and no handler runs: the state can be dropped.
        drop(conns);
        match Arc::try_unwrap(shared)
            .ok()
            .and_then(|s| Arc::try_unwrap(s.plugin).ok())
        {
            Some(plugin) => plugin.stop(),
            None => {
                tracing::warn!("plugin state still referenced at exit; skipping on_worker_stop")
            }
        }
        tracing::info!("drained; exiting");
    }
    // The last requests' lines, before the process ends under the writer.
    access_log::flush(Duration::from_secs(2));
    let _ = tx
        .send(&WorkerToMaster::Exiting {
            cut_requests,
            cut_connections,
        })
        .await;
    ExitCode::SUCCESS
}

/// The default `max_connections`: [`CONNECTIONS_PER_FD`] of the open-files limit the worker
/// inherited (the master raised it to the hard limit), at least 1.
fn connections_from_fd_limit() -> u64 {
    let (num, den) = CONNECTIONS_PER_FD;
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
        .saturating_mul(num)
        .checked_div(den)
        .unwrap_or(1)
        .max(1)
}

/// The worker's I/O runtime: one thread (blocking handlers have their own [`pool`]). `None`,
/// logged, if it cannot be built.
pub(crate) fn io_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // A baseline for judging polls is taken afresh after the thread slept (`thread_clock`).
        .on_thread_park(thread_clock::note_parked)
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the runtime");
            None
        }
    }
}

/// The worker's end of its channel to the master (fd 4), as typed halves on this runtime.
pub(crate) fn channel_halves(
    channel: StdUnixStream,
) -> std::io::Result<(
    Sender<tokio::net::unix::OwnedWriteHalf, WorkerToMaster>,
    Receiver<tokio::net::unix::OwnedReadHalf, MasterToWorker>,
)> {
    channel.set_nonblocking(true)?;
    let (rd, wr) = UnixStream::from_std(channel)?.into_split();
    Ok((Sender::new(wr), Receiver::new(rd)))
}

/// Reads orders in their own task: a frame read is not cancel-safe, so it must not sit in a
/// `select!` branch that another branch can cancel halfway.
fn spawn_reader(
    mut rx: Receiver<tokio::net::unix::OwnedReadHalf, MasterToWorker>,
) -> mpsc::UnboundedReceiver<MasterToWorker> {
    let (tx, out) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(Some(msg)) => {
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "bad message from the master");
                    break;
                }
            }
        }
    });
    out
}

/// Counts a live connection for as long as it is held.
struct ConnectionGuard(Arc<Shared>);

impl ConnectionGuard {
    fn new(shared: Arc<Shared>) -> ConnectionGuard {
        shared.connections.send_modify(|n| *n += 1);
        ConnectionGuard(shared)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.send_modify(|n| *n -= 1);
    }
}

/// Counts a connection the plugin may take over (after a `101`) as open and upgraded, from the
/// request that asked for it until the plugin drops it: a drain waits for it. It counts as
/// staying too, for balance: a WebSocket is the longest-lived connection there is, and hyper
/// has let go of the HTTP connection (and its [`Connection`] count) once it is handed over.
struct UpgradeGuard(ConnectionGuard);

impl UpgradeGuard {
    fn new(shared: &Arc<Shared>) -> UpgradeGuard {
        shared.upgraded.fetch_add(1, Ordering::SeqCst);
        shared.staying.fetch_add(1, Ordering::Relaxed);
        shared.publish_connections();
        UpgradeGuard(ConnectionGuard::new(shared.clone()))
    }
}

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        let shared = &self.0.0;
        shared.upgraded.fetch_sub(1, Ordering::SeqCst);
        shared.staying.fetch_sub(1, Ordering::Relaxed);
        shared.publish_connections();
    }
}

fn spawn_connection(shared: Arc<Shared>, stream: TcpStream) {
    let guard = ConnectionGuard::new(shared.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let _ = stream.set_nodelay(true);
        let conn_state = Arc::new(Connection {
            shared: shared.clone(),
            is_h2: AtomicBool::new(false),
            first_h2_request: tokio::sync::Notify::new(),
            staying: AtomicBool::new(false),
            watch: shared.head_timeout.watch(),
        });
        let service = {
            let conn_state = conn_state.clone();
            hyper::service::service_fn(move |req| request::call(conn_state.clone(), req))
        };
        let stream = send_timeout::SendTimeout::new(stream, shared.send_timeout, shared.counters);
        let io =
            coalesce::Coalesce::new(h2_drain::DrainAwareIo::new(stream, shared.draining.clone()));
        let conn = shared
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shared.drain.wait() => {}
            _ = conn_state.watch.expired() => {
                let watch = &conn_state.watch;
                if watch.stalled() {
                    // A response not asked for more for `send_timeout`: the client grants no
                    // flow-control window. Closed, as a write that waits that long is.
                    send_timeout::note_hit(shared.counters, shared.send_timeout);
                    return;
                }
                if watch.served() {
                    note_idle_close(&shared);
                } else {
                    note_head_timeout(&shared);
                }
                if !watch.is_h2() {
                    // No request head within `header_read_timeout` (or `keepalive_timeout`
                    // after a request) of going idle: closed without a response, as hyper's
                    // own header timeout does.
                    return;
                }
                // HTTP/2 with no stream open for `keepalive_timeout`: GOAWAY, then close once
                // h2 is done (a stream the client opened meanwhile is served; writes are held
                // to `send_timeout`, so this ends).
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
        }
        // Draining. An HTTP/1 keep-alive client may be about to send its next request on this
        // connection: give it `idle_grace` to do so (its response carries `Connection: close`)
        // before closing an idle connection under it. A new HTTP/2 connection gets its first
        // request served before its GOAWAY (a client does not retry a request refused on a
        // fresh connection); one that served requests gets GOAWAY at once, and `h2_drain`
        // makes sure the final GOAWAY covers every stream the client sent before it saw it.
        if !conn_state.is_h2.load(Ordering::Relaxed) {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(shared.idle_grace) => {}
                _ = conn_state.first_h2_request.notified() => {}
            }
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    });
}

/// An idle connection that had served requests was closed at its timeout: counted, and logged
/// at most once a second.
fn note_idle_close(shared: &Shared) {
    if let Some(counters) = shared.counters {
        counters.limit_hit(crate::counters::Limit::IdleTimeout);
    }
    static IDLE: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();
    if let Some(suppressed) = IDLE.hit(&std::io::ErrorKind::TimedOut.into()) {
        tracing::info!(
            suppressed,
            "closed an idle keep-alive connection (keepalive_timeout or header_read_timeout)"
        );
    }
}

/// A connection that sent no complete request head within `header_read_timeout` of its
/// accept was closed (the slowloris guard): counted, and logged at most once a second.
fn note_head_timeout(shared: &Shared) {
    if let Some(counters) = shared.counters {
        counters.limit_hit(crate::counters::Limit::HeaderReadTimeout);
    }
    static SLOW: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();
    if let Some(suppressed) = SLOW.hit(&std::io::ErrorKind::TimedOut.into()) {
        tracing::info!(
            suppressed,
            "closed a connection that sent no complete request head within header_read_timeout"
        );
    }
}

/// One connection's view: the worker's shared state and what it learned about the connection.
struct Connection {
    shared: Arc<Shared>,
    /// Set on its first HTTP/2 request: a drain sends GOAWAY at once instead of waiting.
    is_h2: AtomicBool,
    first_h2_request: tokio::sync::Notify,
    /// Counted in [`Shared::staying`].
    staying: AtomicBool,
    /// Its place in the slowloris guard.
    watch: Arc<head_timeout::Watch>,
}

impl Connection {
    /// Counts this connection for balance once a request shows the client will keep it.
    fn note_request(&self, req: &Request<Incoming>) {
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
            self.shared.staying.fetch_add(1, Ordering::Relaxed);
            self.shared.publish_connections();
        }
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
            self.shared.staying.fetch_sub(1, Ordering::Relaxed);
            self.shared.publish_connections();
        }
    }
}
