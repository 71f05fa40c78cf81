//! systemd: the `sd_notify` protocol and socket activation.
//!
//! [`Notifier`] turns the supervisor's [`Notice`]s into notifications on `NOTIFY_SOCKET`
//! (`READY=1` once the first generation serves; `RELOADING=1` with `MONOTONIC_USEC`, then
//! `READY=1`, around a reload, as `Type=notify-reload` expects; `STOPPING=1`; `MAINPID=` when an
//! upgrade hands over; a readable `STATUS=` with each) and pings `WATCHDOG=1` every half of
//! `WATCHDOG_USEC` while this master is the service's main process. Without `NOTIFY_SOCKET` it
//! does nothing. [`activated_listeners`] takes the listening sockets systemd passed
//! (`LISTEN_FDS`/`LISTEN_PID`, from fd 3; one per worker group, by `LISTEN_FDNAMES`) instead of
//! binding them.
//!
//! This module never decides anything: it reports what the supervisor did, and hands the master
//! a socket. It never sends a notification on another process's behalf except `MAINPID=` for the
//! master that took over.
//!
//! The wire protocol comes from the `sd-notify` crate rather than libsystemd (no C library to
//! link, nothing to install) or a hand-rolled datagram writer: it is small, pure Rust, handles
//! abstract socket addresses, `MONOTONIC_USEC` and the `LISTEN_PID`/`WATCHDOG_PID` checks, and
//! never touches the environment unless asked (unsetting variables is unsound once threads run).

use std::net::TcpListener;
use std::time::Duration;

use sd_notify::NotifyState;
use socket2::{Domain, Socket, Type};

use super::supervisor::Notice;
use crate::ratelimit::RateLimit;

/// Variables meant for the master alone: workers are spawned without them (a plugin that looked
/// at `NOTIFY_SOCKET` or `LISTEN_FDS` would be confused by them).
pub(crate) const MASTER_ONLY_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Sends the notifications; see the module doc.
pub(crate) struct Notifier {
    enabled: bool,
    /// Whether this master is the service's main process: the one that started (not one taking
    /// over from another, until it has), and not one that has handed over.
    main: bool,
    /// `RELOADING=1` was sent and `READY=1` is owed.
    reloading: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    pub(crate) fn from_env(main: bool) -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        Notifier {
            enabled,
            main,
            reloading: false,
            watchdog: sd_notify::watchdog_enabled().filter(|_| enabled),
        }
    }

    /// How often to ping the watchdog: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.
    pub(crate) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| (d / 2).max(Duration::from_millis(1)))
    }

    pub(crate) fn ping(&self) {
        if self.main {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// This master took over from an old one: it is the main process now, and serves.
    pub(crate) fn took_over(&mut self, status: &str) {
        self.main = true;
        self.send(&[
            NotifyState::MainPid(std::process::id()),
            NotifyState::Ready,
            NotifyState::Status(status),
        ]);
    }

    pub(crate) fn notice(&mut self, notice: &Notice) {
        match notice {
            Notice::Serving { status } => {
                self.send(&[NotifyState::Ready, NotifyState::Status(status)])
            }
            Notice::StartFailed { reason } => {
                self.send(&[NotifyState::Status(&format!("failed to start: {reason}"))])
            }
            Notice::Reloading { status } => {
                self.reloading = true;
                match NotifyState::monotonic_usec_now() {
                    Ok(now) => {
                        self.send(&[NotifyState::Reloading, now, NotifyState::Status(status)])
                    }
                    Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status(status)]),
                }
            }
            Notice::Reloaded { status } => {
                if std::mem::take(&mut self.reloading) {
                    self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
                } else {
                    self.send(&[NotifyState::Status(status)]);
                }
            }
            Notice::Stopping => self.send(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: draining every worker"),
            ]),
            Notice::Status(status) => self.send(&[NotifyState::Status(status)]),
            Notice::HandedOver { new_pid } => {
                let status = format!("handed over to master pid {new_pid}; draining");
                self.send(&[NotifyState::MainPid(*new_pid), NotifyState::Status(&status)]);
                self.main = false;
            }
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        static FAILED: RateLimit = RateLimit::per_second();
        if let Err(e) = sd_notify::notify(states)
            && let Some(suppressed) = FAILED.hit(&e)
        {
            tracing::warn!(error = %e, suppressed, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS is invalid")]
    Env(#[source] std::io::Error),
    #[error("LISTEN_FDS passes {0} sockets; host serves on exactly one")]
    Count(usize),
    #[error(transparent)]
    NotInherited(#[from] crate::fd::NotInherited),
    #[error("the socket passed on fd {fd} (LISTEN_FDS) is not a listening TCP socket: {what}")]
    NotListening { fd: i32, what: String },
    #[error(
        "no socket named {group:?} for group {group:?} (LISTEN_FDNAMES={names:?}): with several groups, each `.socket` unit sets FileDescriptorName= to its group's name"
    )]
    Unnamed { group: String, names: String },
}

/// The listening sockets systemd passed (`LISTEN_FDS`, `LISTEN_PID` = this process), one per
/// worker group in `groups`' order, each checked to be a listening TCP socket; `None` when
/// there are none for this process. One group takes the one socket whatever its name; several
/// take the sockets named after them (`LISTEN_FDNAMES`, from each `.socket` unit's
/// `FileDescriptorName=`), and a passed socket no group is named for is closed.
pub(crate) fn activated_listeners(
    groups: &[&str],
) -> Result<Option<Vec<TcpListener>>, ActivationError> {
    let fds = sd_notify::listen_fds().map_err(ActivationError::Env)?;
    let count = fds.len();
    if count == 0 {
        return Ok(None);
    }
    if groups.len() == 1 {
        if count != 1 {
            return Err(ActivationError::Count(count));
        }
        return Ok(Some(vec![checked(crate::fd::LISTENER_FD)?]));
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut listeners = Vec::new();
    for group in groups {
        let Some(i) = names.iter().position(|n| n == group) else {
            return Err(ActivationError::Unnamed {
                group: group.to_string(),
                names: names.join(":"),
            });
        };
        listeners.push(checked(crate::fd::LISTENER_FD + i as i32)?);
    }
    for (i, name) in names.iter().enumerate().take(count) {
        if !groups.contains(&name.as_str()) {
            tracing::warn!(name = %name, "socket activation: no group is named for this socket; closing it");
            drop(crate::fd::take_inherited(
                crate::fd::LISTENER_FD + i as i32,
                "socket from LISTEN_FDS",
            ));
        }
    }
    Ok(Some(listeners))
}

/// The passed socket on `fd`, checked to be a listening TCP socket.
fn checked(fd: i32) -> Result<TcpListener, ActivationError> {
    let owned = crate::fd::take_inherited(fd, "socket from LISTEN_FDS")?;
    let socket = Socket::from(owned);
    let bad = |what: String| ActivationError::NotListening { fd, what };
    match socket.domain() {
        Ok(d) if d == Domain::IPV4 || d == Domain::IPV6 => {}
        Ok(d) => return Err(bad(format!("domain {d:?}"))),
        Err(e) => return Err(bad(e.to_string())),
    }
    match socket.r#type() {
        Ok(t) if t == Type::STREAM => {}
        Ok(t) => return Err(bad(format!("type {t:?}"))),
        Err(e) => return Err(bad(e.to_string())),
    }
    match socket.is_listener() {
        Ok(true) => {}
        Ok(false) => return Err(bad("listen() was not called on it".into())),
        Err(e) => return Err(bad(e.to_string())),
    }
    Ok(socket.into())
}
