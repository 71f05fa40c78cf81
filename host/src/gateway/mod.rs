//! The `__gateway` role: a process of a gateway group (`gateway = true`), the frozen host binary
//! with no plugin, holding WebSocket clients so that a reload of the business group behind it
//! disconnects none of them (see `docs/design/gateway.md`).
//!
//! It owns the process's life: the `Start` handshake with the master (as a worker does), the
//! link socket its business workers connect to and one task per link (frames in [`link`]), the
//! accept loop with the client limit, the hand-off socket ([`handoff`]: same-port clients
//! from plugin workers, established clients from a predecessor), the [`router`]'s task, its
//! counters, heartbeats and `Stats` for the master (its figures for `status`) and its
//! `/metrics` series, and the drain (every client handed over to a successor, or closed with
//! `1012` when one serves and `1001` at a stop; then exit). One client's connection is
//! [`client`]'s; which worker gets which event is the router's; the other hosts are
//! [`cluster`]'s. It never
//! loads plugin code and never decides when it starts or leaves: the master's supervisor does,
//! as for any worker.

mod client;
mod cluster;
pub(crate) mod handoff;
pub(crate) mod link;
mod outbox;
mod router;

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::plugin_metrics;
use crate::protocol::{
    GatewaySpec, MasterToWorker, PluginInfo, StartupTimings, WorkerSpec, WorkerToMaster,
};
use crate::ratelimit::RateLimit;
use crate::worker::startup::{self, Started, ToMaster};

/// A link's read buffer: the frames a busy worker wrote at once are read in one call.
pub(crate) const LINK_READ_BUFFER: usize = 64 << 10;

/// How long the clients' hand-overs and Close handshakes may take at a drain before the
/// process exits anyway (a hand-over waits 1.5 s at most, then a Close handshake 1 s).
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Most connections sending their upgrade request at once (fewer with a lower
/// `gateway_max_clients`); more are answered `503` at once.
pub(crate) const MAX_UPGRADING: u64 = 1024;

/// The low 48 bits of a client id: its number in its gateway process.
const CLIENT_NUMBER: u64 = (1 << 48) - 1;

/// The first client number of a process: milliseconds since 2025 times 256. A process of the
/// same slot started later (after a crash, a restart) so never hands out an id its
/// predecessor gave, and a business worker's send to an old client's id reaches nobody,
/// unless that one took more than 256 clients a millisecond over its whole life (or the clock
/// went back). 48 bits hold it until 2059.
fn first_client_number(now: std::time::SystemTime) -> u64 {
    const MS_2025: u64 = 1_735_689_600_000;
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (ms.saturating_sub(MS_2025) << 8) & CLIENT_NUMBER
}

/// What one gateway process counts; read for `Stats` and, per client, by [`client`]. The bounds
/// hit are counted in the worker table too ([`Gateway::limit_hit`]), for `/metrics`.
#[derive(Default)]
pub(crate) struct Counters {
    /// Clients holding a slot: upgraded, or being upgraded.
    pub(crate) clients: AtomicU64,
    /// Connections still sending their upgrade request (at most [`Gateway::max_upgrading`]).
    pub(crate) upgrading: AtomicU64,
    /// Messages received from clients.
    pub(crate) messages: AtomicU64,
    /// Upgrades refused with `503` at `gateway_max_clients`, or at
    /// [`Gateway::max_upgrading`].
    pub(crate) refused: AtomicU64,
    /// Clients closed by the gateway: no pong in time, oversized message, invalid UTF-8,
    /// protocol error or a ping flood.
    pub(crate) ping_timeouts: AtomicU64,
    pub(crate) too_big: AtomicU64,
    pub(crate) bad_input: AtomicU64,
    /// The router's counts, mirrored after each of its steps.
    pub(crate) redelivered: AtomicU64,
    pub(crate) held_closed: AtomicU64,
    pub(crate) unhandled: AtomicU64,
    /// Connections plugin workers passed here (same port).
    pub(crate) handed_off: AtomicU64,
    /// Clients handed over to the successor process at a drain (`host upgrade`), and taken
    /// over from the predecessor.
    pub(crate) handed_over: AtomicU64,
    pub(crate) adopted: AtomicU64,
    /// Clients closed at `gateway_send_queue`: all, and those for unhandled events (1013).
    pub(crate) overflowed: AtomicU64,
    pub(crate) unhandled_overflowed: AtomicU64,
    /// Bytes queued to clients (read at the router's tick).
    pub(crate) queued_bytes: AtomicU64,
    /// The link to the other hosts (zeros without `cluster`).
    pub(crate) cluster: Arc<cluster::ClusterCounters>,
}

impl Counters {
    /// This process's figures for `status`.
    fn status(&self) -> crate::protocol::GatewayStatus {
        use crate::protocol::{ClusterStatus, GatewayStatus};
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (overflowed, unhandled_overflowed) =
            (get(&self.overflowed), get(&self.unhandled_overflowed));
        let closed = [
            ("ping_timeout", get(&self.ping_timeouts)),
            ("too_big", get(&self.too_big)),
            ("bad_input", get(&self.bad_input)),
            (
                "send_queue",
                overflowed.saturating_sub(unhandled_overflowed),
            ),
            ("unhandled_queue", unhandled_overflowed),
            ("gateway_hold", get(&self.held_closed)),
        ];
        let c = &self.cluster;
        let cluster = c.configured.load(Ordering::Relaxed).then(|| {
            let up = get(&c.up) as u32;
            ClusterStatus {
                state: ClusterStatus::state_of(up, 1).into(),
                up,
                processes: 1,
                connects: get(&c.connects),
                published: get(&c.published),
                received: get(&c.received),
                errors: cluster::Cause::ALL
                    .iter()
                    .map(|cause| (cause.name().to_string(), c.error(*cause)))
                    .collect(),
            }
        });
        GatewayStatus {
            clients: get(&self.clients),
            queued_bytes: get(&self.queued_bytes),
            unhandled_events: get(&self.unhandled),
            redelivered_events: get(&self.redelivered),
            closed: closed.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            refused: get(&self.refused),
            cluster,
        }
    }
}

/// What every client task shares: the bounds, the counters, the drain signal.
pub(crate) struct Gateway {
    pub(crate) spec: GatewaySpec,
    /// A client must finish its upgrade request within this (`header_read_timeout`).
    pub(crate) handshake_timeout: Duration,
    pub(crate) counters: Counters,
    /// Turns `true` at the drain: every client closes with `1001`.
    pub(crate) draining: watch::Receiver<bool>,
    /// This process's cell of the worker table (`host_limit_hits` in `/metrics`); `None`: no
    /// table.
    pub(crate) cell: Option<&'static crate::counters::Counters>,
    /// Where client events and link frames go.
    pub(crate) router: mpsc::UnboundedSender<router::ToRouter>,
    /// This process's place in its business workers' `gateway_links`, the top 16 bits of its
    /// clients' ids (one business worker may link to several gateway groups).
    pub(crate) link_index: u32,
    next_client: AtomicU64,
    /// Set at the drain when a successor bound this process's hand-off socket name (`host
    /// upgrade`): its clients are handed over, or closed with 1012.
    pub(crate) successor: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// Takes a client slot, or `false` at `gateway_max_clients`.
    pub(crate) fn reserve(&self) -> bool {
        take(&self.counters.clients, self.spec.max_clients)
    }

    pub(crate) fn release(&self) {
        self.counters.clients.fetch_sub(1, Ordering::AcqRel);
    }

    /// Most connections sending their upgrade request at once: `gateway_max_clients`, at most
    /// [`MAX_UPGRADING`] (each holds up to 16 KiB of request head).
    pub(crate) fn max_upgrading(&self) -> u64 {
        self.spec.max_clients.min(MAX_UPGRADING)
    }

    /// Counts a connection sending its upgrade request, or `false` at
    /// [`Gateway::max_upgrading`]; [`Gateway::upgraded`] gives it back.
    pub(crate) fn upgrading(&self) -> bool {
        take(&self.counters.upgrading, self.max_upgrading())
    }

    pub(crate) fn upgraded(&self) {
        self.counters.upgrading.fetch_sub(1, Ordering::AcqRel);
    }

    /// A new client id: this process's link index, then a number never used before by any
    /// process of its slot (see [`first_client_number`]).
    pub(crate) fn client_id(&self) -> link::ClientId {
        (u64::from(self.link_index & 0xffff) << 48)
            | (self.next_client.fetch_add(1, Ordering::Relaxed) & CLIENT_NUMBER)
    }

    /// Counts a bound hit for `/metrics` (`host_limit_hits{limit=...}`).
    pub(crate) fn limit_hit(&self, limit: crate::counters::Limit) {
        if let Some(cell) = self.cell {
            cell.limit_hit(limit);
        }
    }
}

/// Adds one to `count` unless it is at `max`; whether it did.
fn take(count: &AtomicU64, max: u64) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Entry point of the `__gateway` role.
pub fn run(args: crate::SpawnArgs) -> ExitCode {
    let (slot, generation) = (args.slot, args.generation);
    let process = crate::logging::Process::Gateway { slot, generation };
    let Some(inherited) = startup::inherit(process, args.log_format, args.master_pid) else {
        return ExitCode::FAILURE;
    };
    let (listener, channel, rt) = (inherited.listener, inherited.channel, inherited.runtime);
    let code = rt.block_on(serve(
        listener,
        channel,
        (slot, generation),
        args.spawned_at_ns,
        args.master_pid,
    ));
    rt.shutdown_background();
    code
}

/// The process's life: handshake, link socket, accept until drained, close every client, exit.
async fn serve(
    listener: std::net::TcpListener,
    channel: StdUnixStream,
    expect: (u32, u64),
    spawned_at_ns: u64,
    master_pid: u32,
) -> ExitCode {
    let since_spawn = || crate::worker::monotonic_ns().saturating_sub(spawned_at_ns) / 1000;
    let Some(Started {
        mut tx,
        mut orders,
        spec,
    }) = startup::handshake(channel, Some(expect)).await
    else {
        return ExitCode::FAILURE;
    };
    let Some(gw) = spec.gateway.clone() else {
        startup::refuse(&mut tx, "a gateway process needs a gateway spec".into()).await;
        return ExitCode::FAILURE;
    };
    let link = match bind_link(&gw.link_socket) {
        Ok(link) => link,
        Err(e) => {
            let reason = format!(
                "cannot listen on the link socket {}: {e}",
                gw.link_socket.display()
            );
            startup::refuse(&mut tx, reason).await;
            return ExitCode::FAILURE;
        }
    };
    let handoff = match gw.handoff_socket.as_deref().map(handoff::Receiver::bind) {
        None => None,
        Some(Ok(receiver)) => Some(receiver),
        Some(Err(e)) => {
            let path = gw.handoff_socket.as_deref().unwrap_or(Path::new(""));
            let reason = format!(
                "cannot listen on the hand-off socket {}: {e}",
                path.display()
            );
            startup::refuse(&mut tx, reason).await;
            return ExitCode::FAILURE;
        }
    };
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            startup::refuse(&mut tx, format!("cannot use the listener: {e}")).await;
            return ExitCode::FAILURE;
        }
    };
    let table = startup::map_worker_table(&spec);
    let cell = table.as_ref().and_then(|(t, cell)| t.counters(*cell));
    let (drain_tx, draining) = watch::channel(false);
    let (to_router, router_rx) = mpsc::unbounded_channel();
    let gateway = Arc::new(Gateway {
        spec: gw.clone(),
        handshake_timeout: Duration::from_millis(spec.header_read_timeout_ms),
        counters: Counters::default(),
        draining,
        cell,
        router: to_router,
        link_index: gw.link_index,
        next_client: AtomicU64::new(first_client_number(std::time::SystemTime::now())),
        successor: Default::default(),
    });
    let series = table.as_ref().and_then(|(t, cell)| t.plugin_series(*cell));
    let cluster = gw.cluster.as_deref().map(|url| {
        cluster::Cluster::start(
            url,
            &gw.business,
            gw.link_index,
            master_pid,
            gateway.counters.cluster.clone(),
            gateway.router.clone(),
        )
    });
    let routing = tokio::spawn(route(
        router_rx,
        gateway.clone(),
        series.map(|s| Series::register(s, cluster.is_some())),
        cluster,
    ));
    let ready = WorkerToMaster::Ready {
        plugin: gateway_info(),
        startup: StartupTimings {
            exec_us: since_spawn(),
            ready_us: since_spawn(),
            ..Default::default()
        },
    };
    if tx.send(&ready).await.is_err() {
        tracing::error!("the master channel closed before ready");
        return ExitCode::FAILURE;
    }
    tracing::info!(link = %gw.link_socket.display(), max_clients = gw.max_clients, "gateway ready");

    let accepting = tokio::spawn(accept_loop(listener, gateway.clone()));
    let linking = tokio::spawn(link_loop(link, gateway.clone()));
    let handoff_id = handoff.as_ref().map(handoff::Receiver::id);
    let handing = handoff.map(|h| tokio::spawn(handoff_loop(h, gateway.clone())));
    life(&mut tx, &mut orders, &spec, &gateway).await;

    // The drain: no new client; every client handed over to a successor (one bound the
    // hand-off socket's name: `host upgrade`), else told `1012` (a successor
    // serves) or `1001` (a stop); a bounded wait for their handshakes.
    accepting.abort();
    linking.abort();
    if let Some(handing) = handing {
        handing.abort();
    }
    let successor = match (&gw.handoff_socket, handoff_id) {
        (Some(path), Some(id)) => handoff::successor_at(path, id),
        _ => false,
    };
    gateway.successor.store(successor, Ordering::Release);
    let _ = tx.send(&WorkerToMaster::Draining).await;
    let _ = drain_tx.send(true);
    let deadline = Instant::now() + CLOSE_GRACE;
    while gateway.counters.clients.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    routing.abort();
    let left = gateway.counters.clients.load(Ordering::Acquire);
    let _ = std::fs::remove_file(&gw.link_socket);
    let _ = tx
        .send(&WorkerToMaster::Exiting {
            cut_requests: 0,
            cut_connections: left,
        })
        .await;
    let handed_over = gateway.counters.handed_over.load(Ordering::Relaxed);
    tracing::info!(
        clients_cut = left,
        handed_over,
        successor,
        "gateway stopped"
    );
    ExitCode::SUCCESS
}

/// Serves the master's orders and sends heartbeats until a `Drain` (or the master is gone).
async fn life(
    tx: &mut ToMaster,
    orders: &mut tokio::sync::mpsc::UnboundedReceiver<MasterToWorker>,
    spec: &WorkerSpec,
    gateway: &Gateway,
) {
    let beat = Duration::from_millis(spec.heartbeat_ms.max(1));
    let mut heartbeat = tokio::time::interval(beat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            order = orders.recv() => match order {
                Some(MasterToWorker::Drain) | None => return,
                Some(MasterToWorker::QueryStats) => {
                    let c = &gateway.counters;
                    let stats = WorkerToMaster::Stats {
                        requests: c.messages.load(Ordering::Relaxed),
                        in_flight: 0,
                        connections: c.clients.load(Ordering::Relaxed),
                        gateway: Some(Box::new(c.status())),
                    };
                    if tx.send(&stats).await.is_err() {
                        return;
                    }
                }
                Some(MasterToWorker::Start(_)) => {}
            },
            _ = heartbeat.tick(), if spec.heartbeat_ms > 0 => {
                if tx.send(&WorkerToMaster::Heartbeat).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Accepts clients, each in its own task, until aborted. An accept error (out of file
/// descriptors) is logged at most once a second and waited out briefly.
async fn accept_loop(listener: TcpListener, gateway: Arc<Gateway>) {
    static ACCEPT_ERROR: RateLimit = RateLimit::per_second();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(client::serve(stream, gateway.clone()));
            }
            Err(e) => {
                if let Some(suppressed) = ACCEPT_ERROR.hit(&e) {
                    tracing::warn!(error = %e, suppressed, "gateway accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The link socket, 0600 in a 0700 directory; a stale one (a crashed process's) is replaced.
fn bind_link(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    prepare_socket_path(path)?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Makes `path`'s directory (0700) and removes a stale socket there (a crashed process's).
fn prepare_socket_path(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Serves the connections plugin workers pass (same port), as the accept loop serves its
/// own, until aborted. What is not a connection is logged at most once a second.
async fn handoff_loop(mut receiver: handoff::Receiver, gateway: Arc<Gateway>) {
    static REFUSED: RateLimit = RateLimit::per_second();
    let tokio_stream = |stream: std::net::TcpStream| {
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(stream))
            .ok()?;
        let _ = stream.set_nodelay(true);
        Some(stream)
    };
    loop {
        match receiver.next().await {
            Ok(Ok(handoff::Passed::New(stream))) => {
                gateway.counters.handed_off.fetch_add(1, Ordering::Relaxed);
                if let Some(stream) = tokio_stream(stream) {
                    tokio::spawn(client::serve(stream, gateway.clone()));
                }
            }
            Ok(Ok(handoff::Passed::Established(stream, state))) => {
                if let Some(stream) = tokio_stream(stream) {
                    tokio::spawn(client::adopt(stream, state, gateway.clone()));
                }
            }
            Ok(Err(why)) => {
                if let Some(suppressed) = REFUSED.hit_named("gateway hand-off") {
                    tracing::warn!(
                        ?why,
                        suppressed,
                        "gateway ignored a hand-off that is not a client connection"
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the gateway's hand-off socket failed: same-port clients go to the group's other processes");
                return;
            }
        }
    }
}

/// Accepts business workers' links, each served by a task of its own, at most `MAX_LINKS` at
/// once (far more than business workers; a bound all the same).
async fn link_loop(link: UnixListener, gateway: Arc<Gateway>) {
    const MAX_LINKS: usize = 1024;
    static FULL: RateLimit = RateLimit::per_second();
    let live = Arc::new(AtomicU64::new(0));
    let mut next: router::LinkId = 0;
    while let Ok((stream, _)) = link.accept().await {
        if live.load(Ordering::Acquire) as usize >= MAX_LINKS {
            if let Some(suppressed) = FULL.hit_named("gateway links") {
                tracing::warn!(
                    suppressed,
                    "gateway refused a link: {MAX_LINKS} links already"
                );
            }
            continue;
        }
        next += 1;
        live.fetch_add(1, Ordering::AcqRel);
        let (gateway, live) = (gateway.clone(), live.clone());
        let id = next;
        tokio::spawn(async move {
            serve_link(id, stream, &gateway).await;
            let _ = gateway.router.send(router::ToRouter::LinkDown { link: id });
            live.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// One business worker's link: its frames to the router, the router's events to it, until the
/// worker's side ends (every frame it sent read first) or a frame is malformed.
async fn serve_link(id: router::LinkId, stream: tokio::net::UnixStream, gateway: &Gateway) {
    use crate::protocol::{Receiver, Sender};
    let (rd, wr) = stream.into_split();
    let rd = tokio::io::BufReader::with_capacity(LINK_READ_BUFFER, rd);
    let mut rx = Receiver::<_, link::BusinessToGateway>::new(rd);
    let (tx, mut events) = mpsc::unbounded_channel::<link::GatewayToBusiness>();
    if gateway
        .router
        .send(router::ToRouter::LinkUp { link: id, tx })
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(async move {
        let mut out = Sender::<_, link::GatewayToBusiness>::new(wr);
        // What is waiting at a wake-up goes in one write.
        while let Some(mut event) = events.recv().await {
            loop {
                if out.feed(&event).is_err() {
                    return;
                }
                match events.try_recv() {
                    Ok(next) if out.pending() < crate::protocol::MAX_BATCH => event = next,
                    Ok(next) => {
                        if out.flush().await.is_err() {
                            return;
                        }
                        event = next;
                    }
                    Err(_) => break,
                }
            }
            if out.flush().await.is_err() {
                return;
            }
        }
    });
    loop {
        match rx.recv().await {
            Ok(Some(msg)) => {
                if let link::BusinessToGateway::Hello { pid, generation } = &msg {
                    tracing::info!(link = id, pid, generation, "business worker linked");
                }
                let msg = router::ToRouter::Link { link: id, msg };
                if gateway.router.send(msg).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(link = id, error = %e, "a business link failed");
                break;
            }
        }
        // A writer that failed (the worker exited) does not end the reading: what the worker
        // wrote before it left (its last answers) is read to the end first.
    }
    writer.abort();
}

/// The router's task: its steps, a tick for the holds, its counts mirrored into the process's
/// counters and its `/metrics` series.
async fn route(
    mut rx: mpsc::UnboundedReceiver<router::ToRouter>,
    gateway: Arc<Gateway>,
    mut series: Option<Series>,
    cluster: Option<cluster::Cluster>,
) {
    let hold = Duration::from_millis(gateway.spec.hold_ms);
    let mut router = router::Router::new(hold, gateway.spec.send_queue, gateway.cell);
    if let Some(cluster) = cluster {
        router.set_cluster(cluster);
    }
    let mut tick = tokio::time::interval(
        (hold / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
    );
    // The series are written at most this often (a step is one client message).
    const SERIES_EVERY: Duration = Duration::from_millis(50);
    let mut written = Instant::now();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => router.handle(msg, Instant::now()),
                None => return,
            },
            _ = tick.tick() => router.tick(Instant::now()),
        }
        let (c, s) = (&gateway.counters, router.stats);
        c.redelivered.store(s.redelivered, Ordering::Relaxed);
        c.held_closed.store(s.held_closed, Ordering::Relaxed);
        c.unhandled.store(s.unhandled, Ordering::Relaxed);
        c.overflowed.store(s.overflowed, Ordering::Relaxed);
        c.unhandled_overflowed
            .store(s.unhandled_overflowed, Ordering::Relaxed);
        c.queued_bytes.store(s.queued_bytes, Ordering::Relaxed);
        if let Some(series) = &mut series
            && written.elapsed() >= SERIES_EVERY
        {
            series.update(c);
            written = Instant::now();
        }
    }
}

/// The gateway's own series in `/metrics`, in its cell's plugin-series slots (labelled with the
/// group as a plugin's are): clients held, bytes queued to them, events unhandled, events
/// redelivered, clients closed by the host by cause, upgrades refused, messages received,
/// connections passed by plugin workers (same port), clients taken over from the predecessor;
/// with a cluster, the link's state, its messages each way and its errors by cause.
struct Series {
    slots: &'static crate::worker_table::PluginSeries,
    /// (slot index, last value written) of each, in [`Series::of`] order.
    ids: Vec<Option<(usize, i64)>>,
    cluster: bool,
}

/// One series: name, kind, help, its one label (name and value), if any.
type SeriesDef = (
    &'static str,
    u8,
    &'static str,
    Option<(&'static str, &'static str)>,
);

impl Series {
    /// The series with their values now, in one fixed order (the cluster's last).
    fn of(c: &Counters, cluster: bool) -> Vec<(SeriesDef, u64)> {
        use plugin_metrics::{COUNTER, GAUGE};
        let s = c.status();
        let closed = |cause: &'static str| -> (SeriesDef, u64) {
            (
                (
                    "gateway_closed_clients",
                    COUNTER,
                    "clients the gateway closed, by cause",
                    Some(("cause", cause)),
                ),
                s.closed.get(cause).copied().unwrap_or(0),
            )
        };
        let mut all = vec![
            (
                (
                    "gateway_clients",
                    GAUGE,
                    "WebSocket clients this gateway process holds",
                    None,
                ),
                s.clients,
            ),
            (
                (
                    "gateway_queued_bytes",
                    GAUGE,
                    "bytes queued to clients, not yet written",
                    None,
                ),
                s.queued_bytes,
            ),
            (
                (
                    "gateway_unhandled_events",
                    GAUGE,
                    "client events not yet handled by a business worker",
                    None,
                ),
                s.unhandled_events,
            ),
            (
                (
                    "gateway_redelivered_events",
                    COUNTER,
                    "client events sent again after their business worker left",
                    None,
                ),
                s.redelivered_events,
            ),
            (
                (
                    "gateway_held_closed_clients",
                    COUNTER,
                    "clients closed with 1011 after gateway_hold without a business worker",
                    None,
                ),
                c.held_closed.load(Ordering::Relaxed),
            ),
            closed("ping_timeout"),
            closed("too_big"),
            closed("bad_input"),
            closed("send_queue"),
            closed("unhandled_queue"),
            closed("gateway_hold"),
            (
                (
                    "gateway_refused_clients",
                    COUNTER,
                    "upgrades refused with 503 at gateway_max_clients",
                    None,
                ),
                s.refused,
            ),
            (
                (
                    "gateway_messages",
                    COUNTER,
                    "messages received from clients",
                    None,
                ),
                c.messages.load(Ordering::Relaxed),
            ),
            (
                (
                    "gateway_handoffs",
                    COUNTER,
                    "connections plugin workers passed to this gateway process (same port)",
                    None,
                ),
                c.handed_off.load(Ordering::Relaxed),
            ),
            (
                (
                    "gateway_adopted_clients",
                    COUNTER,
                    "established clients taken over from the previous gateway process (host upgrade)",
                    None,
                ),
                c.adopted.load(Ordering::Relaxed),
            ),
        ];
        if cluster {
            let k = &c.cluster;
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            all.push((
                (
                    "gateway_cluster_up",
                    GAUGE,
                    "1 while this gateway process is linked to the cluster's Redis",
                    None,
                ),
                get(&k.up),
            ));
            for (name, help, value) in [
                (
                    "gateway_cluster_published",
                    "messages published to the other hosts",
                    get(&k.published),
                ),
                (
                    "gateway_cluster_received",
                    "messages from the other hosts applied here",
                    get(&k.received),
                ),
                (
                    "gateway_cluster_connects",
                    "times the link to Redis came up",
                    get(&k.connects),
                ),
            ] {
                all.push(((name, COUNTER, help, None), value));
            }
            for cause in cluster::Cause::ALL {
                all.push((
                    (
                        "gateway_cluster_errors",
                        COUNTER,
                        "what did not cross hosts, by cause",
                        Some(("cause", cause.name())),
                    ),
                    c.cluster.error(cause),
                ));
            }
        }
        all
    }

    fn register(slots: &'static crate::worker_table::PluginSeries, cluster: bool) -> Series {
        let ids = Self::of(&Counters::default(), cluster)
            .iter()
            .map(|((name, kind, help, label), _)| {
                let labels: Vec<(&str, &str)> = label.iter().copied().collect();
                plugin_metrics::register(slots, *kind, name, help, &labels, &[])
                    .ok()
                    .map(|i| (i, 0))
            })
            .collect();
        Series {
            slots,
            ids,
            cluster,
        }
    }

    fn update(&mut self, c: &Counters) {
        for (id, ((_, kind, _, _), value)) in self.ids.iter_mut().zip(Self::of(c, self.cluster)) {
            let Some((i, last)) = id else { continue };
            let value = value.min(i64::MAX as u64) as i64;
            if kind == plugin_metrics::GAUGE {
                plugin_metrics::set(self.slots, *i as i64, value);
            } else if value > *last {
                plugin_metrics::add(self.slots, *i as i64, value - *last);
            }
            *last = value;
        }
    }
}

/// What a gateway reports where a worker reports its plugin.
fn gateway_info() -> PluginInfo {
    PluginInfo {
        name: "gateway".into(),
        version: crate::worker::HOST_VERSION.into(),
        api_version: String::new(),
        sha256: "0".repeat(64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_process_never_hands_out_its_predecessors_client_ids() {
        let start = std::time::UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
        let first = first_client_number(start);
        // A process that took 200 clients a millisecond for an hour, then its successor.
        let given = first + 200 * 3_600_000;
        let next = first_client_number(start + Duration::from_secs(3600));
        assert!(next > given, "{next} <= {given}");
        // Still within 48 bits in 2059.
        let late = std::time::UNIX_EPOCH + Duration::from_secs(89 * 365 * 86_400);
        assert!(first_client_number(late) > first);
        assert_eq!(first_client_number(late) & !CLIENT_NUMBER, 0);
    }
}
