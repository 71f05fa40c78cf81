//! The master process: binds the listening socket once, raises the open-files limit the workers
//! inherit ([`limits`]), owns the pidfile and the control socket, turns signals and control
//! requests into [`Event`]s, and runs the [`Supervisor`].
//!
//! This is the only part of the host that talks to the outside world besides the workers' HTTP.
//! It never loads plugin code and never serves the public listener; its only HTTP is `/metrics`
//! on the admin listener ([`admin`]), when `admin_listen` is set. It runs on a single-threaded runtime
//! on the main thread, so every worker is spawned from a thread that lives as long as the master
//! (what `PR_SET_PDEATHSIG` in the workers relies on).

pub mod admin;
pub mod build;
pub mod control;
pub mod limits;
pub mod pidfile;
pub mod snapshot;
pub(crate) mod supervisor;
pub mod watch;

use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::Config;
use pidfile::PidFile;
use supervisor::{Event, SignalAction, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot create state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    #[error("{0}")]
    Failed(String),
}

/// Creates the state directory (mode 0700) if needed.
pub fn ensure_state_dir(cfg: &Config) -> Result<(), MasterError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .map_err(|source| MasterError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })
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
    socket.bind(&cfg.listen.into()).map_err(err)?;
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

/// Runs the master until it is stopped. `start_notify`, when given, receives one line once the
/// first generation serves (or why it could not): `host start -d` waits on it.
pub fn run(cfg: Config, start_notify: Option<std::fs::File>) -> Result<(), MasterError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MasterError::Runtime)?;
    let result = rt.block_on(async move {
        ensure_state_dir(&cfg)?;
        let pidfile = PidFile::acquire(&cfg.pid_file())?;
        let result = async {
            let control = control::bind(&cfg.control_socket())?;
            let listener = bind_listener(&cfg)?;
            // With port 0 the kernel picks one: report the real address from here on.
            let mut cfg = cfg.clone();
            cfg.listen = listener
                .local_addr()
                .map_err(|source| MasterError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
            // Before any worker is spawned (it is close-on-exec anyway: no worker holds it).
            let admin = match cfg.admin_listen {
                Some(addr) => {
                    let err = |source| MasterError::AdminListen { addr, source };
                    let listener = admin::bind(addr).map_err(err)?;
                    cfg.admin_listen = Some(listener.local_addr().map_err(err)?);
                    Some(listener)
                }
                None => None,
            };
            tracing::info!(
                listen = %cfg.listen,
                admin_listen = cfg.admin_listen.map(|a| a.to_string()),
                workers = cfg.workers,
                plugin = %cfg.plugin.display(),
                config = %cfg.file.display(),
                "master starting"
            );
            // Before any worker is spawned: workers inherit the raised limit.
            limits::raise_nofile().log();
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
            if cfg.watch {
                watch::spawn(&cfg, events.clone())?;
            }
            let (control_shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
            let control_task = tokio::spawn(control::serve(control, events.clone(), shutdown_rx));
            let (admin_shutdown, admin_shutdown_rx) = tokio::sync::oneshot::channel();
            let admin_task = admin.map(|listener| {
                tokio::spawn(admin::serve(listener, events.clone(), admin_shutdown_rx))
            });
            let supervisor = Supervisor::new(Arc::new(cfg.clone()), listener, events, start_notify);
            let outcome = supervisor.run(rx).await;
            let _ = control_shutdown.send(());
            let _ = control_task.await;
            let _ = admin_shutdown.send(());
            if let Some(task) = admin_task {
                let _ = task.await;
            }
            let _ = std::fs::remove_file(cfg.control_socket());
            outcome.map_err(MasterError::Failed)
        }
        .await;
        pidfile.remove();
        match &result {
            Ok(()) => tracing::info!("master stopped"),
            Err(e) => tracing::error!("master failed: {}", crate::error_chain(e)),
        }
        result
    });
    // A snapshot abandoned at stop ends at its next chunk; do not wait long for it.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
