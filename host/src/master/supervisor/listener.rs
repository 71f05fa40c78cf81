//! The health of the one listening socket. Every worker holds the same open file description,
//! so one `shutdown(fd, SHUT_RD)` in any plugin (a handler, an ELF constructor) stops it
//! listening for all of them; and a plugin that `close`s its worker's fd 3 stops that worker
//! accepting. Neither shows in a worker's state: this module notices and recovers.
//!
//! The master checks its own descriptor (`SO_ACCEPTCONN`) every `listener_check_interval`, at
//! once when a worker reports that `accept` failed in a way that means the socket is gone
//! ([`WorkerToMaster::ListenerLost`](crate::protocol::WorkerToMaster)), when a worker fails to
//! start, and before a reload or an upgrade reports success. A socket that no longer listens is
//! re-armed in place: bound again to its address if the shutdown released the port, and
//! `listen()`ed again; being the same file description, every worker (and a successor of `host
//! upgrade`, which inherits it) accepts on it again at once, without a restart. This works for
//! a socket systemd passed (`LISTEN_FDS`) as well. If re-arming fails (the port was taken
//! meanwhile), `status` says the listener is down and why, reloads and upgrades do not report
//! success, and the next check tries again. A worker whose own fd was closed is replaced, new
//! before old, through a recycle.
//!
//! It owns the checks, the re-arming and what `status` and `/metrics` say about the listener. It
//! never binds a different address and never spawns or kills a worker itself.

use std::time::Duration;

use socket2::SockRef;
use tokio::time::Instant;

use super::{Supervisor, WorkerId, WorkerState};
use crate::protocol::ListenerStatus;

/// What the supervisor knows about its listener.
pub(super) struct ListenerHealth {
    /// Why it does not listen, while it does not (and re-arming failed).
    pub(super) down: Option<String>,
    /// Times it was found not listening and re-armed.
    pub(super) recoveries: u64,
    /// The last recovery: when (Unix seconds) and what was found.
    pub(super) last_recovery: Option<(u64, String)>,
    /// Passed by systemd (`LISTEN_FDS`).
    pub(super) activated: bool,
    /// When the next periodic check is due.
    pub(super) next_check: Instant,
}

impl ListenerHealth {
    pub(super) fn new(every: Duration) -> ListenerHealth {
        ListenerHealth {
            down: None,
            recoveries: 0,
            last_recovery: None,
            activated: false,
            next_check: Instant::now() + every,
        }
    }
}

impl Supervisor {
    /// The listener was passed by systemd: `status` and the log say so when it fails.
    pub(crate) fn with_activated_listener(mut self, activated: bool) -> Self {
        self.listener_health.activated = activated;
        self
    }

    /// Whether the listener listens, re-arming it if it does not (`why`: what prompted the
    /// check, for the log). Cheap: one `getsockopt`.
    pub(super) fn check_listener(&mut self, why: &str) -> bool {
        let sock = SockRef::from(&self.listener);
        match sock.is_listener() {
            Ok(true) => {
                if self.listener_health.down.take().is_some() {
                    tracing::info!("the listening socket listens again");
                }
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                // Not a socket any more: nothing in this process closes it, so this is only
                // reported.
                return self.listener_failed(format!("cannot inspect the listening socket: {e}"));
            }
        }
        let found = format!("the listening socket no longer listens (seen {why})");
        if self
            .workers
            .values()
            .any(|w| matches!(w.state, WorkerState::Starting { .. }))
        {
            // A starting worker's plugin may be the culprit (an ELF constructor): it checks the
            // socket right after loading its plugin and is refused if it finds it down. Re-arm
            // once it has, or else the check could pass on a socket re-armed under it.
            return self.listener_failed(format!(
                "{found}; re-armed once the workers starting now have loaded their plugin"
            ));
        }
        // `shutdown` on a listening socket disconnects it; if the port was the kernel's choice
        // it is released too. Bind it again (EINVAL: still bound) and listen.
        let rearm = match sock.bind(&self.cfg.listen.into()) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(()),
            Err(e) => Err(format!("cannot bind {} again: {e}", self.cfg.listen)),
        }
        .and_then(|()| {
            sock.listen(self.cfg.backlog)
                .map_err(|e| format!("cannot listen again: {e}"))
        })
        .and_then(
            |()| match sock.local_addr().ok().and_then(|a| a.as_socket()) {
                Some(addr) if addr == self.cfg.listen => Ok(()),
                other => Err(format!(
                    "re-armed on {other:?}, not {}; restart the host",
                    self.cfg.listen
                )),
            },
        );
        match rearm {
            Ok(()) => {
                self.listener_health.recoveries += 1;
                self.listener_health.down = None;
                self.listener_health.last_recovery = Some((super::unix_now(), found.clone()));
                // A plugin that does it on every request must not flood the log.
                static REARMED: crate::ratelimit::RateLimit =
                    crate::ratelimit::RateLimit::per_second();
                if let Some(suppressed) = REARMED.hit(&std::io::ErrorKind::Other.into()) {
                    tracing::warn!(
                        listen = %self.cfg.listen,
                        recoveries = self.listener_health.recoveries,
                        suppressed,
                        "{found}: a plugin shut it down; re-armed it, every worker accepts again"
                    );
                }
                true
            }
            Err(e) => self.listener_failed(format!("{found}, and re-arming it failed: {e}")),
        }
    }

    fn listener_failed(&mut self, mut reason: String) -> bool {
        if self.listener_health.activated {
            reason.push_str(
                " (socket activation: the master cannot bind a socket of its own; restart the socket unit)",
            );
        }
        // One line when it goes down (and another when it is back up); `status` has the latest.
        if self.listener_health.down.is_none() {
            tracing::error!("{reason}; new connections are refused until it is recovered");
        }
        self.listener_health.down = Some(reason);
        false
    }

    /// A worker's `accept` failed in a way that means its listener is gone: its own fd was
    /// closed or replaced (`own_fd`: replace that worker), or the shared socket stopped
    /// listening (check, and re-arm, it now).
    pub(super) fn on_listener_lost(&mut self, id: WorkerId, own_fd: bool, reason: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let pid = w.pid;
        if own_fd {
            tracing::warn!(
                pid,
                slot = w.slot,
                "worker cannot accept: {reason}; replacing it"
            );
            self.request_recycle(id, format!("it cannot accept any more: {reason}"), false);
        } else {
            self.check_listener(&format!("by worker pid {pid}: {reason}"));
        }
    }

    /// After any event, while the listener is down: a worker that was starting may have
    /// checked it by now (see [`Supervisor::check_listener`]).
    pub(super) fn recheck_listener_if_down(&mut self) {
        if self.listener_health.down.is_some() && self.stopping.is_none() {
            self.check_listener("again");
        }
    }

    /// The periodic check, on the master's timer.
    pub(super) fn listener_timer(&mut self, now: Instant) {
        if self.listener_health.next_check <= now {
            self.listener_health.next_check = now + self.cfg.listener_check_interval;
            if self.stopping.is_none() {
                self.check_listener("by the periodic check");
            }
        }
    }

    /// The listener as `status` shows it.
    pub(super) fn listener_status(&self) -> ListenerStatus {
        let h = &self.listener_health;
        ListenerStatus {
            up: h.down.is_none(),
            error: h.down.clone(),
            recoveries: h.recoveries,
            last_recovery: h
                .last_recovery
                .as_ref()
                .map(|(at, what)| format!("{what} (at {at}, Unix time)")),
            activated: h.activated,
        }
    }
}
