//! The master process: binds each worker group's listening socket once (or takes them from
//! systemd, or from the master it replaces at `host upgrade`; a group's supervisor re-arms that
//! same socket if a plugin shuts it down), raises the open-files limit the workers inherit
//! ([`limits`]), is the subreaper of everything the workers start ([`orphans`]: ended when their
//! worker is gone, and before `stop` reports stopped), owns the pidfile and the control socket
//! in a `state_dir` it checks, creates and keeps ([`state_dir`]: refused when others can write
//! it, recreated when deleted), turns signals and control requests into [`Event`]s, and runs one
//! [`Supervisor`] per group, which [`groups`] routes those events to. [`systemd`] reports the
//! groups' [`Notice`]s to the service manager; [`binary_upgrade`] starts a successor and hands
//! everything over (`host upgrade`). Each supervisor's decisions act on the world through its
//! [`system`] (its `Effects`: workers exec'd and signalled, snapshots, notices); the control
//! socket and the admin listener share one [`accept_loop`].
//!
//! This is the only part of the host that talks to the outside world besides the workers' HTTP.
//! It never loads plugin code and never serves HTTP itself. It runs on a single-threaded runtime
//! on the main thread, so every worker is spawned from a thread that lives as long as the master
//! (what `PR_SET_PDEATHSIG` in the workers relies on).

pub(crate) mod accept_loop;
pub mod admin;
pub(crate) mod binary_upgrade;
pub mod build;
pub mod control;
pub(crate) mod groups;
pub mod limits;
pub(crate) mod orphans;
pub mod pidfile;
pub mod snapshot;
pub mod state_dir;
pub(crate) mod supervisor;
pub(crate) mod system;
pub(crate) mod systemd;
pub mod watch;

use std::net::TcpListener;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::Config;
use pidfile::PidFile;
use supervisor::{Event, Exit, Notice, SignalAction, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    StateDir(#[from] state_dir::StateDirError),
    #[error(transparent)]
    PidFile(#[from] pidfile::PidFileError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot listen on {addr} (key `listen`)")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (key `listen`): the address is in use by {holder}")]
    ListenInUse {
        addr: std::net::SocketAddr,
        holder: String,
    },
    #[error("cannot listen on {addr} (key `admin_listen`)")]
    AdminListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot handle signals")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Watch(#[from] watch::WatchError),
    #[error("socket activation")]
    Activation(#[from] systemd::ActivationError),
    #[error("cannot take over from the old master: {0}")]
    Handover(String),
    #[error("{0}")]
    Failed(String),
}

/// Checks the state directory and its parents, and creates it (mode 0700) if needed (see
/// [`state_dir`]).
pub fn ensure_state_dir(cfg: &Config) -> Result<(), MasterError> {
    Ok(state_dir::ensure(&cfg.state_dir)?)
}

fn bind_listener(cfg: &Config) -> Result<TcpListener, MasterError> {
    let err = |source| MasterError::Listen {
        addr: cfg.listen,
        source,
    };
    let socket = Socket::new(
        Domain::for_address(cfg.listen),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&cfg.listen.into()).map_err(|e| {
        let holder = (e.kind() == std::io::ErrorKind::AddrInUse)
            .then(|| state_dir::port_holder(cfg.listen))
            .flatten();
        match holder {
            Some(holder) => MasterError::ListenInUse {
                addr: cfg.listen,
                holder,
            },
            None => err(e),
        }
    })?;
    socket.listen(cfg.backlog).map_err(err)?;
    Ok(socket.into())
}

fn forward_signal(
    kind: SignalKind,
    action: SignalAction,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), MasterError> {
    let mut stream = signal(kind).map_err(MasterError::Signals)?;
    let events = events.clone();
    tokio::spawn(async move {
        while stream.recv().await.is_some() {
            if events.send(Event::Signal(action)).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Runs the master until it is stopped (or has handed over to a new master after `host
/// upgrade`). `groups` are the config file's worker groups (at least one; the first one's
/// master-wide keys are the master's). `start_notify`, when given, receives one line once
/// every group's first generation serves (or why one could not): `host start -d` waits on it.
pub fn run(groups: Vec<Config>, start_notify: Option<std::fs::File>) -> Result<(), MasterError> {
    let cfg = groups
        .first()
        .cloned()
        .ok_or_else(|| MasterError::Failed("no worker group".into()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MasterError::Runtime)?;
    let result = rt.block_on(async move {
        ensure_state_dir(&cfg)?;
        let handover = binary_upgrade::Handover::from_env().map_err(MasterError::Handover)?;
        // A master started by `host upgrade` owns neither until it takes over.
        let mut pidfile = match &handover {
            None => Some(PidFile::acquire(&cfg.pid_file())?),
            Some(_) => None,
        };
        let result = serve(groups, handover, pidfile.as_ref(), start_notify).await;
        let (result, adopted) = match result {
            Ok((exit, adopted)) => (Ok(exit), adopted),
            Err(e) => (Err(e), None),
        };
        pidfile = pidfile.or(adopted);
        match (&result, pidfile) {
            (Ok(Exit::HandedOver), Some(pidfile)) => {
                pidfile.hand_over();
                tracing::info!("master exited: a new master serves");
            }
            (_, Some(pidfile)) => {
                let _ = std::fs::remove_file(cfg.control_socket());
                pidfile.remove();
            }
            (_, None) => {}
        }
        match &result {
            Ok(Exit::Stopped) => tracing::info!("master stopped"),
            Ok(Exit::HandedOver) => {}
            Err(e) => tracing::error!("master failed: {}", crate::error_chain(e)),
        }
        result.map(|_| ())
    });
    // A snapshot abandoned at stop ends at its next chunk; do not wait long for it.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

/// Who owns the control socket: this master since it started, or (started by `host upgrade`)
/// the master that started it, until this one takes over.
enum ControlSocket {
    Bound(tokio::net::UnixListener),
    AfterTakeOver(binary_upgrade::Successor),
}

/// The listeners a master started by `host upgrade` inherited: the old master's first group's
/// (named, unless the old master had no groups) and the others', by group name.
struct Inherited {
    lead: TcpListener,
    lead_name: Option<String>,
    others: Vec<(String, TcpListener)>,
}

/// Each group's listening socket: inherited from the master `host upgrade` replaces (by group
/// name), passed by systemd (by `LISTEN_FDNAMES`), or bound here. Returns them in `groups`'
/// order, and whether they came from systemd.
fn listeners(
    groups: &[Config],
    handover: Option<Inherited>,
) -> Result<(Vec<TcpListener>, bool), MasterError> {
    if let Some(Inherited {
        lead,
        lead_name,
        mut others,
    }) = handover
    {
        // A master of before groups passes one listener, its one group's.
        let lead_name = lead_name.unwrap_or_else(|| groups[0].group.clone());
        let mut lead = Some(lead);
        let mut out = Vec::new();
        for g in groups {
            let inherited = match g.group == lead_name {
                true => lead.take(),
                false => others
                    .iter()
                    .position(|(name, _)| *name == g.group)
                    .map(|i| others.swap_remove(i).1),
            };
            out.push(match inherited {
                Some(l) => l,
                None => bind_listener(g)?,
            });
        }
        for (name, _) in &others {
            tracing::warn!(group = %name, "the old master's group is not in the config: its listener is closed");
        }
        return Ok((out, false));
    }
    let names: Vec<&str> = groups.iter().map(|g| g.group.as_str()).collect();
    if let Some(listeners) = systemd::activated_listeners(&names)? {
        tracing::info!("serving on the sockets systemd passed (LISTEN_FDS)");
        return Ok((listeners, true));
    }
    Ok((
        groups.iter().map(bind_listener).collect::<Result<_, _>>()?,
        false,
    ))
}

/// Everything between taking the pidfile and releasing it. Returns how the run ended and, for
/// a master started by `host upgrade`, the pidfile it adopted.
async fn serve(
    groups: Vec<Config>,
    handover: Option<binary_upgrade::Handover>,
    pidfile: Option<&PidFile>,
    start_notify: Option<std::fs::File>,
) -> Result<(Exit, Option<PidFile>), MasterError> {
    // The pidfile descriptor a successor inherits (it shares the lock).
    let pidfile_fd = match (&handover, pidfile) {
        (Some(h), _) => h.successor.pidfile_fd(),
        (None, Some(p)) => p.dup_fd(),
        (None, None) => Err(std::io::Error::other("no pidfile")),
    };
    let upgraded = handover.is_some();
    let (inherited, control) = match handover {
        Some(h) => (
            Some(Inherited {
                lead: h.listener,
                lead_name: h.lead,
                others: h.others,
            }),
            ControlSocket::AfterTakeOver(h.successor),
        ),
        None => (
            None,
            ControlSocket::Bound(control::bind(&groups[0].control_socket())?),
        ),
    };
    let (listeners, activated) = listeners(&groups, inherited)?;
    // With port 0 the kernel picks one: report the real address from here on.
    let mut groups = groups;
    for (cfg, listener) in groups.iter_mut().zip(&listeners) {
        let configured = cfg.listen;
        cfg.listen = listener
            .local_addr()
            .map_err(|source| MasterError::Listen {
                addr: cfg.listen,
                source,
            })?;
        if configured.port() != 0 && configured != cfg.listen {
            tracing::warn!(
                group = %cfg.group,
                configured = %configured,
                serving = %cfg.listen,
                "serving on an inherited socket, not on `listen`"
            );
        }
        tracing::info!(
            group = %cfg.group,
            listen = %cfg.listen,
            workers = cfg.workers,
            plugin = %cfg.plugin.display(),
            config = %cfg.file.display(),
            version = crate::worker::HOST_VERSION,
            build = crate::worker::HOST_BUILD,
            "master starting"
        );
    }
    let mut cfg = groups[0].clone();
    // Before any worker is spawned: workers inherit the raised limit, and whatever they start
    // is reparented to this process when they exit (see `orphans`).
    limits::raise_nofile().log();
    orphans::become_subreaper();
    let (events, rx) = mpsc::unbounded_channel();
    forward_signal(
        SignalKind::hangup(),
        SignalAction::Reload("SIGHUP"),
        &events,
    )?;
    forward_signal(
        SignalKind::user_defined1(),
        SignalAction::Reload("SIGUSR1"),
        &events,
    )?;
    forward_signal(
        SignalKind::user_defined2(),
        SignalAction::Upgrade("SIGUSR2"),
        &events,
    )?;
    forward_signal(
        SignalKind::terminate(),
        SignalAction::Stop("SIGTERM"),
        &events,
    )?;
    forward_signal(
        SignalKind::interrupt(),
        SignalAction::Stop("SIGINT"),
        &events,
    )?;
    forward_signal(SignalKind::quit(), SignalAction::Stop("SIGQUIT"), &events)?;
    {
        let mut children = signal(SignalKind::child()).map_err(MasterError::Signals)?;
        let events = events.clone();
        tokio::spawn(async move {
            while children.recv().await.is_some() {
                if events.send(Event::ChildSignal).is_err() {
                    break;
                }
            }
        });
    }
    // Each group's own channel: its workers, snapshots and watcher talk to its supervisor alone.
    let channels: Vec<_> = groups.iter().map(|_| mpsc::unbounded_channel()).collect();
    for (g, (tx, _)) in groups.iter().zip(&channels) {
        if g.watch && g.reloadable {
            watch::spawn(g, tx.clone())?;
        }
    }
    // The admin listener (before any worker is spawned; it is close-on-exec anyway). A master
    // started by `host upgrade` binds it once the old master let go of it, at the hand-over.
    let (admin_shutdown, admin_shutdown_rx) = tokio::sync::oneshot::channel();
    let admin_task = match cfg.admin_listen {
        Some(addr) if !upgraded => {
            let err = |source| MasterError::AdminListen { addr, source };
            let listener = admin::bind(addr).map_err(err)?;
            cfg.admin_listen = Some(listener.local_addr().map_err(err)?);
            Some(tokio::spawn(admin::serve(
                listener,
                events.clone(),
                admin_shutdown_rx,
            )))
        }
        Some(addr) => Some(tokio::spawn(admin::serve_after_hand_over(
            addr,
            events.clone(),
            admin_shutdown_rx,
        ))),
        None => None,
    };
    let cfg = Arc::new(cfg);
    let (control_shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
    let (notices, notices_rx) = mpsc::unbounded_channel();
    let side = tokio::spawn(control_plane(
        cfg.clone(),
        pidfile.and_then(PidFile::identity),
        notices_rx,
        control,
        events.clone(),
        shutdown_rx,
        admin_shutdown,
    ));
    let mut launcher = match pidfile_fd {
        Ok(fd) => {
            let others = groups
                .iter()
                .zip(&listeners)
                .skip(1)
                .map(|(g, l)| Ok((g.group.clone(), l.try_clone()?)))
                .collect::<std::io::Result<Vec<_>>>();
            match others {
                Ok(others) => Some(
                    binary_upgrade::Launcher::capture(fd).with_groups(&groups[0].group, others),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "`host upgrade` is unavailable: cannot duplicate a listener");
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "`host upgrade` is unavailable: cannot duplicate the pidfile");
            None
        }
    };
    let mut prepared = Vec::new();
    for ((mut g, listener), (tx, rx)) in groups.into_iter().zip(listeners).zip(channels) {
        g.admin_listen = cfg.admin_listen;
        let g = Arc::new(g);
        // Each group's notices reach the group layer, which folds them into the master's.
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        let mut system = system::System::new(g.clone(), tx.clone(), None).with_notices(notice_tx);
        // The first group is the lead: `host upgrade` is its, with every group's listener.
        if let Some(launcher) = launcher.take() {
            system = system.with_launcher(launcher);
        }
        let supervisor = Supervisor::new(g.clone(), listener, Box::new(system))
            .with_activated_listener(activated);
        prepared.push(groups::Prepared {
            cfg: g,
            supervisor,
            events: tx,
            rx,
            notices: notice_rx,
        });
    }
    let outcome = groups::run(prepared, rx, Some(notices), start_notify).await;
    let _ = control_shutdown.send(());
    let adopted = side.await.ok().flatten();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    match outcome {
        Ok(exit) => Ok((exit, adopted)),
        Err(reason) => {
            if let Some(pidfile) = adopted {
                let _ = std::fs::remove_file(cfg.control_socket());
                pidfile.remove();
            }
            Err(MasterError::Failed(reason))
        }
    }
}

/// The control socket's upkeep: `state_dir`'s watch, which recreates it when it was deleted.
fn upkeep(mut watch: state_dir::Watch) -> control::Upkeep {
    control::Upkeep {
        every: state_dir::WATCH_EVERY,
        run: Box::new(move |listener| watch.tick(listener)),
    }
}

/// The control plane, beside the supervisor: serves the control socket (from the start, or once
/// this master took over from the one that started it), tells systemd what the supervisor
/// reports, pings its watchdog, and lets go of the admin address at a hand-over. Ends when the
/// supervisor is done; returns the pidfile it adopted at a take-over.
async fn control_plane(
    cfg: Arc<Config>,
    pid_id: Option<(u64, u64)>,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    control: ControlSocket,
    events: mpsc::UnboundedSender<Event>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
    admin_shutdown: tokio::sync::oneshot::Sender<()>,
) -> Option<PidFile> {
    let mut shutdown = Some(shutdown);
    let mut admin_shutdown = Some(admin_shutdown);
    let mut server = None;
    let mut successor = None;
    let mut notifier = systemd::Notifier::from_env(matches!(control, ControlSocket::Bound(_)));
    match control {
        ControlSocket::Bound(listener) => {
            let watch = state_dir::Watch::new(&cfg, pid_id);
            server = shutdown.take().map(|s| {
                tokio::spawn(control::serve(
                    listener,
                    events.clone(),
                    s,
                    Some(upkeep(watch)),
                ))
            });
        }
        ControlSocket::AfterTakeOver(s) => successor = Some(s),
    }
    let mut adopted = None;
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    loop {
        let tick = accept_loop::tick_or_never(&mut watchdog);
        let notice = tokio::select! {
            notice = notices.recv() => match notice {
                Some(notice) => notice,
                None => break,
            },
            _ = tick => {
                notifier.ping();
                continue;
            }
        };
        match (notice, successor.take()) {
            (Notice::Serving { status }, Some(s)) => match s.take_over(&cfg).await {
                Ok((pidfile, listener)) => {
                    tracing::info!(
                        "took over: the pidfile and the control socket are this master's"
                    );
                    let watch = state_dir::Watch::new(&cfg, pidfile.identity());
                    adopted = Some(pidfile);
                    server = shutdown.take().map(|s| {
                        tokio::spawn(control::serve(
                            listener,
                            events.clone(),
                            s,
                            Some(upkeep(watch)),
                        ))
                    });
                    notifier.took_over(&status);
                }
                Err(reason) => {
                    tracing::error!("cannot take over from the old master: {reason}");
                    let _ = events.send(Event::Signal(SignalAction::Stop("failed take-over")));
                }
            },
            (Notice::StartFailed { reason }, Some(s)) => {
                s.failed(&reason).await;
                notifier.notice(&Notice::StartFailed { reason });
            }
            (notice, s) => {
                successor = s;
                if matches!(notice, Notice::HandedOver { .. }) {
                    // The new master binds the admin address next: let go of it now.
                    if let Some(admin) = admin_shutdown.take() {
                        let _ = admin.send(());
                    }
                }
                notifier.notice(&notice);
            }
        }
    }
    if let Some(admin) = admin_shutdown.take() {
        let _ = admin.send(());
    }
    if let Some(server) = server {
        let _ = server.await;
    }
    adopted
}
