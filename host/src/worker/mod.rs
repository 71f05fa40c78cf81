//! A worker process: the master's own binary re-exec'd with `__worker`. It receives its
//! [`WorkerSpec`] over its channel, loads the generation's plugin snapshot in its on-start hook,
//! serves HTTP on the listening socket it inherited, and drains when told.
//!
//! This file is the process's sequence ([`run`]: start up, serve until drained or cut, stop)
//! and its event loop (orders from the master, signals, the heartbeat that tells the master its
//! I/O thread still runs, recycling asks, the drain and its deadline). Each concern below it
//! has a file of its own:
//!
//! - [`startup`]: the `Start` handshake and the plugin load, shared with `host check`'s
//!   [`trial`] worker; the start order (the worker table is mapped and its fd closed before the
//!   plugin is loaded; a canary whose plugin broke the listening socket is refused).
//! - [`accept`]: the accept loop (drops connections whose client is already gone, see
//!   [`backlog`]; stops accepting while the worker holds `max_connections`; checks that its
//!   listening socket is still there, see [`listener`]: a closed fd 3 makes the worker ask for
//!   its replacement, a shut-down socket is left out of the reactor until the master re-arms
//!   it), with [`balance`] deciding when to step aside for less loaded workers.
//! - [`connection`]: per-connection HTTP (hyper, HTTP/1.1 and HTTP/2, bounded; the slowloris
//!   guard and `keepalive_timeout` are [`head_timeout`]'s sweep, a write that makes no progress
//!   for `send_timeout` ends its connection in [`send_timeout`], small writes are joined by
//!   [`coalesce`]); [`conn_state`] is what its requests see of it.
//! - [`request`]: each request's path (the built-in `/_host/` routes of [`builtin`]; the
//!   plugin's handler on the I/O thread when the plugin declares it non-blocking, on the
//!   blocking [`pool`] otherwise; [`slow_paths`] remembers handlers that stalled the thread).
//! - [`shared`]: the state connections and requests share, one part per concern.
//!
//! It counts each request in its cell of the shared worker table for `/metrics` (see
//! `counters`), keeps its plugin's metrics there too ([`metrics_abi`]), and writes the access
//! log off the I/O thread ([`access_log`]). It never binds a socket, never spawns processes and
//! never decides when to reload: it obeys [`MasterToWorker`].
//!
//! Drain: stop accepting at once and tell the master; HTTP/1 responses from then on carry
//! `Connection: close`; HTTP/2 connections get GOAWAY; idle HTTP/1 keep-alive connections may
//! send one more request for `idle_grace`, then are closed. When the last connection is done,
//! the plugin's `on_worker_stop` runs and the worker exits. At `graceful_timeout` it exits anyway
//! and logs what it cut.
//!
//! Recycling ([`recycle`]): when its request count reaches the limit in its spec, or its plugin
//! calls `restart_worker()`, the worker sends [`WorkerToMaster::RecycleMe`] once and goes on
//! serving until the master drains it, meanwhile steering clients to the other workers
//! (keep-alive responses carry `Connection: close`, and it steps aside before accepting while
//! others can).

mod abi_io;
mod accept;
mod access_log;
mod backlog;
mod balance;
mod builtin;
mod callbacks;
mod calls;
mod clock;
mod coalesce;
mod conn_state;
mod connection;
mod drain_signal;
mod first_poll;
mod gateway_abi;
mod gateway_link;
mod h2_drain;
mod head_timeout;
mod listener;
pub mod loader;
mod metrics_abi;
mod pool;
mod recycle;
mod request;
mod same_port;
mod send_timeout;
mod shared;
mod slow_paths;
pub(crate) mod startup;
mod thread_clock;
pub mod trial;

use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::protocol::{MasterToWorker, StartupTimings, WorkerSpec, WorkerToMaster};
use accept::Acceptor;
use loader::LoadedPlugin;
use recycle::{Recycle, RecycleRequest};
use shared::Shared;
use startup::{ListenerBefore, Started, ToMaster};

pub use builtin::{HOST_BUILD, HOST_VERSION};
pub use clock::monotonic_ns;

/// The blocking pool's threads leave after this long without work (its bounds are in the spec).
const POOL_IDLE: Duration = Duration::from_secs(60);

/// At `graceful_timeout`, how long the `503` answers to requests still running may take to be
/// written before the worker exits anyway (the master kills it 2 s after the timeout).
const CUT_FLUSH: Duration = Duration::from_millis(1000);
/// Longest a new worker waits for every gateway to answer its link before it says `Ready`.
const LINKS_UP_WAIT: Duration = Duration::from_secs(2);

/// Entry point of the `__worker` role.
pub fn run(args: crate::SpawnArgs) -> ExitCode {
    let crate::SpawnArgs {
        slot,
        generation,
        spawned_at_ns,
        log_format,
        ..
    } = args;
    let since_spawn = move || monotonic_ns().saturating_sub(spawned_at_ns) / 1000;
    let mut startup = StartupTimings {
        exec_us: since_spawn(),
        ..Default::default()
    };
    let process = crate::logging::Process::Worker { slot, generation };
    let Some(inherited) = startup::inherit(process, log_format, args.master_pid) else {
        return ExitCode::FAILURE;
    };
    let (listener, channel, rt) = (inherited.listener, inherited.channel, inherited.runtime);
    startup.runtime_us = since_spawn();
    let at = Spawned {
        slot,
        generation,
        spawned_at_ns,
        log_format,
    };
    let code = rt.block_on(serve(listener, channel, at, startup));
    // Handlers still blocked at a graceful deadline must not hold the exit up (the blocking
    // pool's threads are never joined either: the process exits under them).
    rt.shutdown_background();
    code
}

/// Who this worker is, from its command line.
struct Spawned {
    slot: u32,
    generation: u64,
    /// When the master spawned it (`monotonic_ns`): start-up timings count from here.
    spawned_at_ns: u64,
    log_format: crate::logging::LogFormat,
}

impl Spawned {
    /// Microseconds since the spawn.
    fn since_spawn(&self) -> u64 {
        monotonic_ns().saturating_sub(self.spawned_at_ns) / 1000
    }
}

/// The worker's life, step by step: start up, serve until drained (or cut), stop.
async fn serve(
    listener: std::net::TcpListener,
    channel: StdUnixStream,
    at: Spawned,
    mut timings: StartupTimings,
) -> ExitCode {
    let expect = Some((at.slot, at.generation));
    let Some(Started {
        mut tx,
        orders,
        spec,
    }) = startup::handshake(channel, expect).await
    else {
        return ExitCode::FAILURE;
    };
    timings.spec_us = at.since_spawn();
    // Before the plugin starts: `restart_worker()` may be called from `on_worker_start` on.
    let (recycle, recycle_rx) = Recycle::start(spec.max_requests, spec.max_requests_jitter);
    let table = startup::map_worker_table(&spec);
    let before = match ListenerBefore::look(&listener) {
        Ok(before) => before,
        Err(reason) => return refuse(&mut tx, reason).await,
    };
    let Some(plugin) = startup::load_plugin(&mut tx, &spec, false).await else {
        return ExitCode::FAILURE;
    };
    timings.dlopen_us = plugin.loaded_at_ns.saturating_sub(at.spawned_at_ns) / 1000;
    timings.on_worker_start_us = at.since_spawn();
    tracing::info!(plugin = %plugin.info.name, version = %plugin.info.version, sha256 = %&plugin.info.sha256[..12], "plugin loaded");
    let listener = match before.adopt(listener) {
        Ok(listener) => listener,
        Err(reason) => return refuse(&mut tx, reason).await,
    };

    let (cut_tx, cut) = drain_signal::Cut::new();
    let info = plugin.info.clone();
    let shared = Arc::new(shared_state(&spec, &at, plugin, table, recycle, cut));
    let (gateway_draining, links) = start_gateway_links(&spec, &at, &shared);
    let acceptor = Acceptor::new(listener, before.id, spec.max_connections, &shared);
    // Ready once every gateway took its link (a bounded wait): a rollout's new-before-old then
    // never leaves a gateway without a worker.
    if let Some(links) = &links
        && !links.welcomed(LINKS_UP_WAIT).await
    {
        tracing::warn!(
            wait_ms = LINKS_UP_WAIT.as_millis() as u64,
            "not every gateway answered this worker's link in time; ready all the same (the link keeps trying)"
        );
    }
    let ready = WorkerToMaster::Ready {
        plugin: info,
        startup: StartupTimings {
            ready_us: at.since_spawn(),
            ..timings
        },
    };
    if tx.send(&ready).await.is_err() {
        tracing::error!("the master channel closed before ready");
        return ExitCode::FAILURE;
    }
    tracing::info!("ready");
    shared.balance.publish();

    let graceful_timeout = Duration::from_millis(spec.graceful_timeout_ms);
    let events = EventLoop {
        shared: shared.clone(),
        tx,
        orders,
        recycle_rx,
        acceptor,
        graceful_timeout,
        deadline: None,
        gateway_draining,
        links,
    };
    let (cut_at, tx) = events.run(spec.heartbeat_ms).await;
    stop(shared, tx, cut_at, cut_tx, graceful_timeout).await
}

/// Links to the gateways of `spec.gateway_links` (ABI 1.7), once the plugin is loaded and if
/// it handles gateway events; the sender tells the links the worker drains.
fn start_gateway_links(
    spec: &WorkerSpec,
    at: &Spawned,
    shared: &Arc<Shared>,
) -> (watch::Sender<bool>, Option<Arc<gateway_link::Links>>) {
    let (tx, rx) = watch::channel(false);
    if spec.gateway_links.is_empty() {
        return (tx, None);
    }
    let Some(handler) = gateway_abi::PluginEvents::new(&shared.plugin) else {
        tracing::warn!(
            gateways = spec.gateway_links.len(),
            "gateway groups send this group client events, but its plugin handles none (built against a plugin-api older than ABI 1.7, or Plugin::GATEWAY_EVENTS is false): no gateway link, so the gateways hold their clients' events, then close them with 1011"
        );
        return (tx, None);
    };
    let settings = gateway_link::LinkSettings {
        pid: std::process::id(),
        generation: at.generation,
        event_timeout: match spec.gateway_event_timeout_ms {
            0 => Duration::from_secs(30),
            ms => Duration::from_millis(ms),
        },
        counters: shared.counters,
    };
    let links = Arc::new(gateway_link::Links::start(
        &spec.gateway_links,
        &settings,
        Arc::new(handler),
        rx,
    ));
    gateway_abi::serve_handle(links.clone());
    tracing::info!(
        gateways = spec.gateway_links.len(),
        "linking to the gateways"
    );
    (tx, Some(links))
}

/// Resolves once no gateway event's handler runs (at once without links).
async fn gateway_events_done(links: Option<&gateway_link::Links>) {
    let Some(links) = links else { return };
    // The count has no waker; a drain's last events are checked every few milliseconds.
    while links.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Refuses to start with `reason` (see [`startup::refuse`]).
async fn refuse(tx: &mut ToMaster, reason: String) -> ExitCode {
    startup::refuse(tx, reason).await;
    ExitCode::FAILURE
}

/// The state every connection and request shares, from the spec and what start-up made.
fn shared_state(
    spec: &WorkerSpec,
    at: &Spawned,
    plugin: LoadedPlugin,
    table: Option<(crate::worker_table::WorkerTable, usize)>,
    recycle: Recycle,
    cut: drain_signal::Cut,
) -> Shared {
    let counters = table.and_then(|(table, cell)| table.counters(cell));
    if let Some(c) = counters {
        callbacks::count_panics_in(c);
    }
    if let Some(path) = &spec.access_log {
        access_log::start(path.clone(), at.log_format, at.generation, counters);
    }
    let pool_limits = pool::Limits {
        max_threads: spec.pool.max_threads as usize,
        max_queue: spec.pool.max_queue as usize,
        max_abandoned: spec.pool.max_abandoned as usize,
    };
    Shared {
        plugin: Arc::new(plugin),
        pool: pool::Pool::new(pool_limits, POOL_IDLE, counters),
        slow_paths: slow_paths::SlowPaths::new(spec.pool.max_slow_paths as usize, counters),
        limits: shared::Limits {
            max_body_bytes: spec.max_body_bytes,
            body_read_timeout: Duration::from_millis(spec.body_read_timeout_ms),
        },
        conn: connection::settings(spec),
        tally: shared::Tally::default(),
        balance: balance::Balance::new(table, spec.accept_balance),
        recycle,
        drain: drain_signal::DrainSignal::new(Default::default()),
        cut,
        table,
        counters,
        same_port: same_port::SamePort::new(
            &spec.gateway_handoffs,
            Duration::from_millis(spec.header_read_timeout_ms.max(1)),
        ),
    }
}

/// The worker's event loop, from `Ready` until it is drained or cut.
struct EventLoop {
    shared: Arc<Shared>,
    tx: ToMaster,
    orders: mpsc::UnboundedReceiver<MasterToWorker>,
    recycle_rx: mpsc::UnboundedReceiver<RecycleRequest>,
    acceptor: Acceptor,
    graceful_timeout: Duration,
    /// Set when the drain starts: `graceful_timeout` from then.
    deadline: Option<Instant>,
    /// Tells the gateway links the worker drains (they say `Draining`, take no new events).
    gateway_draining: watch::Sender<bool>,
    /// The gateway links, when the worker has some: a drain ends once their events are
    /// answered too.
    links: Option<Arc<gateway_link::Links>>,
}

impl EventLoop {
    /// Runs until every connection is closed after a drain (`None`), or until the drain's
    /// deadline with requests still running (`Some` of how many); gives the channel back.
    async fn run(mut self, heartbeat_ms: u64) -> (Option<u64>, ToMaster) {
        // Proof for the master's watchdog that this thread still runs: sent from this loop, on
        // the I/O thread, so a handler that never gives the thread back (or SIGSTOP) stops it.
        let mut heartbeat = (heartbeat_ms > 0).then(|| {
            let every = Duration::from_millis(heartbeat_ms);
            let mut beat = tokio::time::interval_at(Instant::now() + every, every);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            beat
        });
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        // Signals aimed at the whole process group (Ctrl-C in a terminal) are the master's
        // business: keep these registered so they neither kill nor disturb the worker.
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
        let mut conns = self.shared.tally.connections.subscribe();
        let links = self.links.clone();

        let cut = loop {
            self.acceptor.check_limit(&self.shared);
            tokio::select! {
                woke = self.acceptor.wait(&self.shared) => {
                    self.acceptor.handle(woke, &self.shared, &mut self.tx).await;
                }
                order = self.orders.recv() => self.obey(order).await,
                Some(ask) = self.recycle_rx.recv() => self.ask_replacement(ask).await,
                _ = async { sigterm.as_mut().expect("guarded").recv().await }, if sigterm.is_some() => {
                    self.start_drain("SIGTERM");
                    let _ = self.tx.send(&WorkerToMaster::Draining).await;
                }
                _ = async { heartbeat.as_mut().expect("guarded").tick().await }, if heartbeat.is_some() => {
                    let _ = self.tx.send(&WorkerToMaster::Heartbeat).await;
                }
                _ = async {
                    let _ = conns.wait_for(|n| *n == 0).await;
                    gateway_events_done(links.as_deref()).await;
                }, if self.deadline.is_some() => break None,
                _ = tokio::time::sleep_until(self.deadline.unwrap_or_else(Instant::now)), if self.deadline.is_some() => {
                    break Some(self.shared.tally.in_flight.load(Ordering::SeqCst));
                }
            }
        };
        (cut, self.tx)
    }

    /// One order from the master (`None`: its channel closed).
    async fn obey(&mut self, order: Option<MasterToWorker>) {
        match order {
            Some(MasterToWorker::Drain) => {
                self.start_drain("ordered by the master");
                let _ = self.tx.send(&WorkerToMaster::Draining).await;
            }
            Some(MasterToWorker::QueryStats) => {
                let tally = &self.shared.tally;
                let stats = WorkerToMaster::Stats {
                    requests: tally.requests.load(Ordering::Relaxed),
                    in_flight: tally.in_flight.load(Ordering::Relaxed),
                    connections: *tally.connections.borrow(),
                    gateway: None,
                };
                let _ = self.tx.send(&stats).await;
            }
            Some(MasterToWorker::Start(_)) => tracing::warn!("ignoring a second Start order"),
            None => self.start_drain("the master channel closed"),
        }
    }

    /// Asks the master for a replacement, once: the master merges asks anyway, and a draining
    /// worker is being replaced.
    async fn ask_replacement(&mut self, ask: RecycleRequest) {
        if self.deadline.is_none() && self.shared.recycle.retire() {
            tracing::info!(reason = %ask.reason, "asking the master for a replacement");
            let msg = WorkerToMaster::RecycleMe {
                reason: ask.reason,
                by_plugin: ask.by_plugin,
            };
            let _ = self.tx.send(&msg).await;
        }
    }

    /// Starts the drain (once): stop accepting, tell every connection, the plugin's long-lived
    /// handlers (WebSocket, event streams) learn it and wind down; `graceful_timeout` from now.
    fn start_drain(&mut self, why: &str) {
        if self.deadline.is_some() {
            return;
        }
        tracing::info!(reason = why, "draining");
        self.acceptor.stop();
        self.shared.balance.stop_accepting();
        self.shared.drain.fire();
        self.shared.plugin.on_drain();
        let _ = self.gateway_draining.send(true);
        self.deadline = Some(Instant::now() + self.graceful_timeout);
    }
}

/// The end: after a clean drain, the plugin's `on_worker_stop`; at the deadline (`cut_at`:
/// requests still running), `503` for those requests (`cut`), then what is left is cut. Either
/// way the access log is flushed and the master told.
async fn stop(
    shared: Arc<Shared>,
    mut tx: ToMaster,
    cut_at: Option<u64>,
    cut: watch::Sender<bool>,
    graceful_timeout: Duration,
) -> ExitCode {
    let (mut cut_requests, mut cut_connections) = (0, 0);
    if let Some(running) = cut_at {
        // Requests whose handler is still running get `503` with `Retry-After` instead of a
        // closed connection; give hyper a moment to write those answers, then cut the rest.
        let _ = cut.send(true);
        let mut conns = shared.tally.connections.subscribe();
        let _ = tokio::time::timeout(CUT_FLUSH, conns.wait_for(|n| *n == 0)).await;
        let answered = shared.cut.answered();
        cut_connections = *shared.tally.connections.borrow();
        cut_requests = running;
        tracing::warn!(
            running,
            answered_503 = answered,
            cut_connections,
            of_which_upgraded = shared.tally.upgraded.load(Ordering::SeqCst),
            timeout = %humantime::format_duration(graceful_timeout),
            "graceful_timeout reached: answered {answered} running requests with 503, cutting {cut_connections} connections"
        );
    } else {
        // Every connection is closed and no handler runs: the state can be dropped.
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
