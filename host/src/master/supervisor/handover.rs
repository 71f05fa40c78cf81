//! The old master's side of `host upgrade`, as supervisor transitions: when an upgrade may start
//! (not while stopping or rolling out; a second request joins the running one), answering every
//! caller, and, once the new master took over, draining every worker and exiting without
//! touching the pidfile or the control socket. Starting and watching the new master is
//! `master/binary_upgrade.rs`'s, through the supervisor's [`Effects`](super::Effects); this
//! never spawns or waits on a process itself.

use std::time::Duration;

use tokio::time::Instant;

use super::{Notice, Reply, Supervisor};
use crate::protocol::{ControlResponse, UpgradeReport};

/// How a master's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    Stopped,
    /// A new master took over: the pidfile and the control socket are its.
    HandedOver,
}

/// An upgrade under way: its callers, and what kills the new master if it must be abandoned.
pub(crate) struct Upgrading {
    replies: Vec<Reply>,
    new_pid: u32,
    started: Instant,
}

impl Supervisor {
    /// How long the new master may take to serve and take over: `start_timeout` for itself and
    /// one per worker (its canary and the rest start one at a time), plus 5 s for its snapshot.
    pub(super) fn upgrade_deadline(&self) -> Duration {
        let steps = u32::try_from(self.cfg.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        self.cfg
            .start_timeout
            .checked_mul(steps)
            .and_then(|d| d.checked_add(Duration::from_secs(5)))
            .unwrap_or(Duration::from_secs(24 * 3600))
    }

    pub(super) fn request_upgrade(&mut self, reply: Reply) {
        let refuse = |reply: Reply, reason: &str| {
            tracing::warn!("upgrade refused: {reason}");
            if let Some(reply) = reply {
                let _ = reply.send(ControlResponse::Refused {
                    reason: reason.to_string(),
                });
            }
        };
        if self.stopping.is_some() {
            return refuse(reply, "host is stopping");
        }
        if let Some(u) = &mut self.upgrading {
            tracing::info!(
                new_pid = u.new_pid,
                "upgrade already under way; waiting for it"
            );
            u.replies.push(reply);
            return;
        }
        if self.current.is_none() {
            return refuse(reply, "this master's first generation does not serve yet");
        }
        if self.rollout.is_some() || self.snapshotting.is_some() {
            return refuse(
                reply,
                "a rollout is under way; upgrade once it is over (`host status`)",
            );
        }
        if !self.check_listener("before an upgrade") {
            let down = self.listener_health.down.clone().unwrap_or_default();
            return refuse(reply, &format!("the listening socket is down: {down}"));
        }
        let Some(exe) = self.fx.successor_exe() else {
            return refuse(reply, "this master cannot start a new one");
        };
        let deadline = self.upgrade_deadline();
        match self.fx.launch_successor(&self.listener, deadline) {
            Ok(new_pid) => {
                tracing::info!(new_pid, exe = %exe, deadline = %humantime::format_duration(deadline), "upgrade: started a new master");
                self.notice(Notice::Status(format!(
                    "upgrading: new master pid {new_pid} ({exe}) starting its workers"
                )));
                self.upgrading = Some(Upgrading {
                    replies: vec![reply],
                    new_pid,
                    started: Instant::now(),
                });
            }
            Err(reason) => {
                tracing::error!("upgrade failed: {reason}");
                self.notice(Notice::Status(format!("upgrade failed: {reason}")));
                if let Some(reply) = reply {
                    let _ = reply.send(ControlResponse::UpgradeFailed { reason });
                }
            }
        }
    }

    pub(super) fn on_upgraded(&mut self, outcome: Result<UpgradeReport, String>) {
        let Some(u) = self.upgrading.take() else {
            // Abandoned (stopping): its callers were answered then.
            return;
        };
        let response = match outcome {
            Ok(report) => {
                tracing::info!(
                    new_pid = report.new_pid,
                    version = %report.version,
                    build = %report.build,
                    ms = u.started.elapsed().as_millis() as u64,
                    "upgrade: the new master took over; draining this one's workers"
                );
                self.handed_over = true;
                self.notice(Notice::HandedOver {
                    new_pid: report.new_pid,
                });
                ControlResponse::Upgraded(report)
            }
            Err(reason) => {
                tracing::error!("upgrade failed, still serving: {reason}");
                let serving = self.current.as_ref().map_or(0, |g| g.number);
                self.notice(Notice::Status(format!(
                    "upgrade failed: {reason}; serving generation {serving}"
                )));
                ControlResponse::UpgradeFailed { reason }
            }
        };
        for reply in u.replies.into_iter().flatten() {
            let _ = reply.send(response.clone());
        }
        if self.handed_over {
            self.request_stop(None);
        }
    }

    /// Abandons an upgrade under way: the new master is killed, its callers told why.
    pub(super) fn cancel_upgrade(&mut self, reason: &str) {
        if let Some(u) = self.upgrading.take() {
            self.fx.cancel_successor();
            tracing::warn!(new_pid = u.new_pid, "upgrade abandoned: {reason}");
            for reply in u.replies.into_iter().flatten() {
                let _ = reply.send(ControlResponse::UpgradeFailed {
                    reason: format!("interrupted: {reason}"),
                });
            }
        }
    }
}
