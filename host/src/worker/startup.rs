//! Start-up, from exec to a loaded plugin: the I/O runtime, the channel, the `Start` handshake,
//! and the on-start hook that loads the generation's plugin, reporting `StartFailed` with the
//! cause when it cannot. One sequence for the two processes that load a plugin: a worker
//! ([`super::run`]) and `host check`'s trial worker ([`super::trial`]). The worker's own steps
//! around the load are here too: its worker table cell, mapped and its fd closed before any
//! plugin code runs, and its listening socket, identified before and checked after.
//!
//! It never serves a request and never decides whether a worker starts: the master (or `host
//! check`) reads the `Ready` or `StartFailed` it sends.

use std::os::unix::net::UnixStream as StdUnixStream;

use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use super::listener;
use super::loader::{self, LoadedPlugin, Placement};
use crate::fd;
use crate::protocol::{MasterToWorker, Receiver, Sender, WorkerSpec, WorkerToMaster};
use crate::worker_table::{TABLE_FD, WorkerTable};

/// The worker's end of its channel, towards the master (or `host check`).
pub(crate) type ToMaster = Sender<OwnedWriteHalf, WorkerToMaster>;

/// What a process the master spawned (a worker, a gateway) inherits, once it checked it may
/// run: its listening socket, its channel to the master, and its I/O runtime.
pub(crate) struct Inherited {
    pub(crate) listener: std::net::TcpListener,
    pub(crate) channel: StdUnixStream,
    pub(crate) runtime: tokio::runtime::Runtime,
}

/// A spawned process's first steps: its log lines as `process`'s, die with the master (the
/// signal fires when the *thread* that spawned it exits; the master spawns from its main
/// thread, which lives as long as it does), check the master is still there (it may have died
/// before the call), take the inherited fds and build the runtime. `None`, logged: exit.
pub(crate) fn inherit(
    process: crate::logging::Process,
    log_format: crate::logging::LogFormat,
    master_pid: u32,
) -> Option<Inherited> {
    use nix::sys::signal::Signal;
    crate::logging::init(process, log_format);
    use nix::unistd::{Pid, getppid};
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        tracing::warn!(error = %e, "cannot set the parent-death signal");
    }
    if getppid() != Pid::from_raw(master_pid as i32) {
        tracing::error!(master_pid, "the master is gone; exiting");
        return None;
    }
    let (listener, channel) = match (
        fd::take_inherited(fd::LISTENER_FD, "listener"),
        fd::take_inherited(fd::CHANNEL_FD, "channel"),
    ) {
        (Ok(l), Ok(c)) => (std::net::TcpListener::from(l), StdUnixStream::from(c)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("{e}");
            return None;
        }
    };
    Some(Inherited {
        listener,
        channel,
        runtime: io_runtime()?,
    })
}

/// The worker's I/O runtime: one thread (blocking handlers have their own pool). `None`,
/// logged, if it cannot be built.
pub(crate) fn io_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // A baseline for judging polls is taken afresh after the thread slept (`thread_clock`).
        .on_thread_park(super::thread_clock::note_parked)
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the runtime");
            None
        }
    }
}

/// A process past the handshake: its channel and the spec it was given.
pub(crate) struct Started {
    pub(crate) tx: ToMaster,
    /// Orders after `Start`, read in their own task.
    pub(crate) orders: mpsc::UnboundedReceiver<MasterToWorker>,
    pub(crate) spec: WorkerSpec,
}

/// Takes the channel (fd 4, as typed halves on this runtime) and waits for the `Start` order;
/// for a worker, one for its own `(slot, generation)`. `None`, logged, if none comes.
pub(crate) async fn handshake(
    channel: StdUnixStream,
    expect: Option<(u32, u64)>,
) -> Option<Started> {
    let (tx, rx) = match channel_halves(channel) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the channel");
            return None;
        }
    };
    let mut orders = spawn_reader(rx);
    match orders.recv().await {
        Some(MasterToWorker::Start(spec))
            if expect.is_none_or(|e| e == (spec.slot, spec.generation)) =>
        {
            Some(Started { tx, orders, spec })
        }
        other => {
            tracing::error!(
                ?other,
                "expected a Start order for this slot and generation"
            );
            None
        }
    }
}

fn channel_halves(
    channel: StdUnixStream,
) -> std::io::Result<(ToMaster, Receiver<OwnedReadHalf, MasterToWorker>)> {
    channel.set_nonblocking(true)?;
    let (rd, wr) = UnixStream::from_std(channel)?.into_split();
    Ok((Sender::new(wr), Receiver::new(rd)))
}

/// Reads orders in their own task: a frame read is not cancel-safe, so it must not sit in a
/// `select!` branch that another branch can cancel halfway.
fn spawn_reader(
    mut rx: Receiver<OwnedReadHalf, MasterToWorker>,
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

/// The on-start hook: loads `spec`'s plugin (`dlopen`, the ABI checks, `on_worker_start`).
/// Everything linked into `host` is frozen; this is the code a reload refreshes. On failure the
/// cause alone goes to the master (or `host check`): it knows which configured file the
/// snapshot came from.
pub(super) async fn load_plugin(
    tx: &mut ToMaster,
    spec: &WorkerSpec,
    check: bool,
) -> Option<LoadedPlugin> {
    let at = Placement {
        slot: spec.slot,
        generation: spec.generation,
        sha256: spec.plugin_sha256.clone(),
        config: spec.plugin_config.clone(),
        config_dir: spec.config_dir.clone(),
        check,
        gateway: !check && !spec.gateway_links.is_empty(),
    };
    match loader::load(&spec.plugin, &at) {
        Ok(plugin) => Some(plugin),
        Err(e) => {
            tracing::error!("{e}");
            let reason = e.kind.to_string();
            let _ = tx.send(&WorkerToMaster::StartFailed { reason }).await;
            None
        }
    }
}

/// Refuses to start: logs `reason` and sends it as `StartFailed`.
pub(crate) async fn refuse(tx: &mut ToMaster, reason: String) {
    tracing::error!("{reason}");
    let _ = tx.send(&WorkerToMaster::StartFailed { reason }).await;
}

/// The worker table and this worker's cell, mapped and its fd closed before any plugin code
/// runs (loading runs the plugin's ELF constructors): plugin code never holds the memfd, so it
/// cannot truncate it under the master (it is sealed besides, see `worker_table`). `None`,
/// logged, without one: the worker then serves without balancing or in-flight records. The
/// plugin's metrics go to the cell too ([`super::metrics_abi`]).
pub(crate) fn map_worker_table(spec: &WorkerSpec) -> Option<(WorkerTable, usize)> {
    let cell = spec.table_cell? as usize;
    let table = fd::take_inherited(TABLE_FD, "worker table")
        .map_err(|e| e.to_string())
        .and_then(|fd| {
            WorkerTable::map(&fd, spec.table_cells as usize).map_err(|e| crate::error_chain(&e))
        });
    match table {
        Ok(table) => {
            if let Some(series) = table.plugin_series(cell) {
                super::metrics_abi::install(series, table.counters(cell));
            }
            Some((table, cell))
        }
        Err(e) => {
            tracing::warn!("{e}; accepting without balancing");
            None
        }
    }
}

/// The inherited listening socket, as seen before any plugin code runs: which socket fd 3 is,
/// and whether it listens (it may be down already, shut down by another worker's plugin: not
/// this plugin's doing).
pub(super) struct ListenerBefore {
    pub(super) id: listener::Identity,
    listening: bool,
}

impl ListenerBefore {
    pub(super) fn look(listener: &std::net::TcpListener) -> Result<ListenerBefore, String> {
        let id = listener::identity(listener)
            .map_err(|e| format!("cannot use the inherited listening socket: {e}"))?;
        Ok(ListenerBefore {
            id,
            listening: listener::check(id).is_ok(),
        })
    }

    /// After the plugin's constructors and `on_worker_start` ran: the listener, registered
    /// with the reactor for accepting. A plugin that closed fd 3 or shut the shared socket
    /// down is refused (the master re-arms the shared socket), with the reason. fd 3 is never
    /// closed when it is no longer this worker's.
    pub(super) fn adopt(
        &self,
        listener: std::net::TcpListener,
    ) -> Result<AsyncFd<std::net::TcpListener>, String> {
        if let Err(lost) = listener::check(self.id)
            && (lost.own_fd || self.listening)
        {
            if lost.own_fd {
                // fd 3 is not ours any more: never close it.
                std::mem::forget(listener);
            }
            return Err(format!(
                "loading the plugin (its constructors or on_worker_start) broke the listening socket: {}",
                lost.reason
            ));
        }
        listener
            .set_nonblocking(true)
            .and_then(|_| listener::register(listener))
            .map_err(|e| format!("cannot use the inherited listening socket: {e}"))
    }
}
