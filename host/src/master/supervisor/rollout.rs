//! Rollouts: reload, rollback, revert and the first start. Snapshots the plugin for a new
//! generation and re-reads the config file's `[plugin_config]` for it (a reload applies only
//! that key of the file; the others wait for a restart), moves slots onto it one at a time
//! (candidate ready, then the old worker drains; a reload's canary held for
//! [`analysis`](super::analysis)'s verdict), fails or reverts it, queues requests that
//! arrive meanwhile (a reload or rollback during a canary analysis is refused instead), answers every caller, and prunes snapshots no kept generation uses. Before
//! each new worker it makes sure there is room for it: fewer than `max_draining_workers` old
//! workers still leaving and a free cell in the worker table, or it waits (bounded) for an exit. It never
//! spawns or signals a process itself (that is [`spawn`](super::spawn)) and never decides on
//! crash backoff (that is [`health`](super::health)).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::time::Instant;

use super::{
    Generation, Reply, Rollout, RolloutKind, Supervisor, WorkerId, WorkerState, short, unix_now,
};
use crate::config::{Config, PluginConfig};
use crate::master::snapshot::{self, Snapshot};
use crate::protocol::{ControlResponse, PluginInfo, ReloadReport, StartupTimings};
use crate::ratelimit::RateLimit;

impl Supervisor {
    pub(super) fn request_rollout(&mut self, kind: RolloutKind, reply: Reply) {
        if self.stopping.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(ControlResponse::Refused {
                    reason: "host is stopping".into(),
                });
            }
            return;
        }
        if self.upgrading.is_some() {
            let reason =
                "a host upgrade is under way: the new master runs the plugin file as it is now";
            tracing::info!(kind = kind.name(), "not rolling out: {reason}");
            if let Some(reply) = reply {
                let _ = reply.send(ControlResponse::Refused {
                    reason: reason.into(),
                });
            }
            return;
        }
        if let Some(j) = self
            .judging
            .as_ref()
            .filter(|j| j.phase == super::analysis::Phase::Analysis)
            && matches!(kind, RolloutKind::Reload | RolloutKind::Rollback)
        {
            let reason = format!(
                "generation {} is under canary analysis; `host promote` or `host abort` ends it first",
                j.generation
            );
            tracing::warn!(kind = kind.name(), "{} refused: {reason}", kind.name());
            if let Some(reply) = reply {
                let _ = reply.send(ControlResponse::Refused { reason });
            }
            return;
        }
        if self.rollout.is_some() || self.snapshotting.is_some() {
            tracing::info!(
                kind = kind.name(),
                "requested during a rollout; it will run when this one ends"
            );
            self.queued.push_back((kind, reply));
            return;
        }
        self.begin(kind, vec![reply]);
    }

    /// Names a generation's plugin the way an operator knows it: the configured file, and which build.
    pub(super) fn plugin_label(&self, generation: &Generation) -> String {
        format!(
            "{} (sha256 {})",
            self.cfg.plugin.display(),
            short(&generation.snapshot.sha256)
        )
    }

    /// Starts a rollout of `kind` with its first step, the snapshot its generation runs. The
    /// snapshot is taken off this loop (it reads, hashes and copies a file of up to
    /// `max_plugin_bytes`: [`Effects::take_snapshot`](super::Effects::take_snapshot)); [`Self::on_snapshot`] goes on when it arrives.
    /// Until then the supervisor is busy as during a rollout: requests queue, `stop` abandons it.
    pub(super) fn begin(&mut self, kind: RolloutKind, replies: Vec<Reply>) {
        if kind != RolloutKind::Recycle {
            self.close_watch(&format!("a {} began", kind.name()));
        }
        let mut report = ReloadReport {
            ok: false,
            generation: self.next_generation,
            serving_generation: self.current.as_ref().map_or(0, |g| g.number),
            plugin_path: self.cfg.plugin.clone(),
            sha256: None,
            config_sha256: None,
            ignored_keys: Vec::new(),
            error: None,
            started_at: unix_now(),
            duration_ms: 0,
            started_pids: Vec::new(),
            drained_pids: Vec::new(),
            kind: kind.name().to_string(),
            verdict: None,
        };
        if matches!(kind, RolloutKind::Reload | RolloutKind::Rollback) {
            self.notice(super::Notice::Reloading {
                status: format!(
                    "{}: rolling out generation {}",
                    if kind == RolloutKind::Reload {
                        "reloading"
                    } else {
                        "rolling back"
                    },
                    report.generation
                ),
            });
        }
        let source = if kind == RolloutKind::Rollback {
            let Some(previous) = self.history.iter().rev().nth(1) else {
                let reason =
                    "no previous generation to roll back to (only the current one was kept)";
                report.error = Some(reason.to_string());
                tracing::error!(generation = report.generation, "reload refused: {reason}");
                self.conclude(kind, report, replies, Err(reason.to_string()));
                return;
            };
            tracing::info!(to_generation = previous.number, "rolling back");
            SnapshotSource::Kept {
                generation: previous.number,
                snapshot: previous.snapshot.clone(),
                config: previous.config.clone(),
            }
        } else {
            tracing::info!(
                generation = report.generation,
                kind = kind.name(),
                plugin = %self.cfg.plugin.display(),
                "snapshotting the plugin file"
            );
            // The first generation runs the configuration the master was started with; every
            // later one reads `[plugin_config]` from the file again.
            SnapshotSource::PluginFile {
                reread_config: kind != RolloutKind::Start,
            }
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        self.fx.take_snapshot(ticket, source, cancel.clone());
        self.snapshotting = Some(PendingSnapshot {
            ticket,
            kind,
            replies,
            report,
            started: Instant::now(),
            cancel,
        });
    }

    /// The snapshot (and `[plugin_config]`) for the rollout [`Self::begin`] started arrived:
    /// roll every slot onto it as a new generation, or conclude the rollout as refused.
    pub(super) fn on_snapshot(&mut self, ticket: u64, result: Result<Taken, String>) {
        let Some(pending) = self.snapshotting.take_if(|p| p.ticket == ticket) else {
            // Abandoned (the host is stopping): its caller was answered then.
            return;
        };
        let PendingSnapshot {
            kind,
            replies,
            mut report,
            started,
            ..
        } = pending;
        let number = report.generation;
        let Taken {
            snapshot,
            config,
            ignored_keys,
        } = match result {
            Ok(taken) => taken,
            Err(reason) => {
                // Nothing was rolled out: the number stays free for the next attempt.
                report.error = Some(reason.clone());
                report.duration_ms = started.elapsed().as_millis() as u64;
                tracing::error!(generation = number, "reload refused: {reason}");
                self.conclude(kind, report, replies, Err(reason));
                return;
            }
        };
        if kind == RolloutKind::Watch {
            // A rewrite with the serving bytes, or with the bytes just refused, changes nothing
            // (unless `[plugin_config]` changed too).
            let serving = self.current.as_ref().is_some_and(|g| {
                g.snapshot.sha256 == snapshot.sha256 && g.config.sha256 == config.sha256
            });
            let refused = self.last_refused.as_ref().is_some_and(|(sha, config_sha)| {
                *sha == snapshot.sha256 && *config_sha == config.sha256
            });
            if serving || refused {
                let why = if serving {
                    "is the one serving"
                } else {
                    "was refused last time"
                };
                tracing::info!(
                    sha256 = short(&snapshot.sha256),
                    "plugin file changed, but its content {why}: no reload"
                );
                self.start_queued();
                return;
            }
        }
        self.next_generation += 1;
        tracing::info!(
            generation = number,
            sha256 = short(&snapshot.sha256),
            config_sha256 = short(&config.sha256),
            bytes = snapshot.size,
            kind = kind.name(),
            snapshot_ms = started.elapsed().as_millis() as u64,
            snapshot = snapshot.taken.as_str(),
            "rolling out a new generation"
        );
        report.sha256 = Some(snapshot.sha256.clone());
        report.config_sha256 = Some(config.sha256.clone());
        report.ignored_keys = ignored_keys.into_iter().map(str::to_string).collect();
        let canary = self.canary_plan(kind);
        self.rollout = Some(Rollout {
            kind,
            target: Arc::new(Generation {
                number,
                snapshot,
                config,
            }),
            pending: (0..self.cfg.workers as u32).collect(),
            done: Vec::new(),
            candidate: None,
            awaiting_ack: HashSet::new(),
            replies,
            report,
            // The reported duration covers the snapshot too.
            started,
            failure: None,
            canary,
        });
        self.advance();
    }

    /// Drops generations beyond `keep_snapshots` from the history and deletes snapshot files
    /// no kept generation and no live worker uses.
    pub(super) fn prune_snapshots(&mut self) {
        while self.history.len() > self.cfg.keep_snapshots {
            self.history.pop_front();
        }
        let mut keep: HashSet<PathBuf> = self
            .history
            .iter()
            .map(|g| g.snapshot.path.clone())
            .collect();
        keep.extend(
            self.workers
                .values()
                .map(|w| w.generation.snapshot.path.clone()),
        );
        if let Some(r) = &self.rollout {
            keep.insert(r.target.snapshot.path.clone());
        }
        self.fx.prune_snapshots(&keep);
    }

    /// Starts the next slot's candidate, or finishes the rollout when nothing is left.
    pub(super) fn advance(&mut self) {
        let Some(r) = &mut self.rollout else { return };
        if r.candidate.is_some() || self.held_for_analysis() {
            return;
        }
        let Some(r) = &mut self.rollout else { return };
        let Some(&slot) = r.pending.front() else {
            if r.awaiting_ack.is_empty() {
                self.finish();
            }
            return;
        };
        let (target, kind) = (r.target.clone(), r.kind);
        if !self.room_for_candidate(slot, target.number) {
            return;
        }
        if let Some(r) = &mut self.rollout {
            r.pending.pop_front();
        }
        match self.spawn(slot, target) {
            Ok(id) => {
                self.metrics.count_start(kind.name());
                if let Some(r) = &mut self.rollout {
                    r.candidate = Some(id);
                }
            }
            Err(e) => self.fail_rollout(format!("cannot start a worker for slot {slot}: {e}")),
        }
    }

    /// How long a rollout waits for room before it goes on regardless: old workers are
    /// SIGKILLed `KILL_MARGIN` past `graceful_timeout`, and reaped soon after.
    pub(super) fn room_wait_limit(&self) -> std::time::Duration {
        self.cfg.graceful_timeout + super::KILL_MARGIN + std::time::Duration::from_secs(3)
    }

    /// Whether the rollout may start its next worker (for `slot`, of `generation`) now: fewer
    /// than `max_draining_workers` old workers are still leaving (draining, or hung or killed
    /// and not yet reaped), and the worker table has a free cell. Otherwise the rollout waits,
    /// logged (at most once a second) and counted in `/metrics` once per wait; every exit looks
    /// again. The wait is bounded by [`Self::room_wait_limit`]: past it a free cell is enough
    /// (the draining workers are overdue), and without one the rollout fails.
    fn room_for_candidate(&mut self, slot: u32, generation: u64) -> bool {
        static WAITS: RateLimit = RateLimit::per_second();
        let now = Instant::now();
        let leaving = self
            .workers
            .values()
            .filter(|w| {
                matches!(
                    w.state,
                    WorkerState::Draining { .. } | WorkerState::Hung | WorkerState::Killed
                )
            })
            .count();
        let cell = self.worker_table.is_none() || self.free_table_cell().is_some();
        let overdue = self
            .room_wait
            .is_some_and(|since| now >= since + self.room_wait_limit());
        let drain_room = leaving < self.cfg.max_draining_workers || overdue;
        if cell && drain_room {
            self.room_wait = None;
            return true;
        }
        let cells = self.worker_table.as_ref().map_or(0, |(t, _)| t.len());
        if !cell && overdue {
            self.room_wait = None;
            self.fail_rollout(format!(
                "cannot start a worker for slot {slot}: no free cell in the worker table ({cells} cells, {} workers alive) after waiting {}",
                self.workers.len(),
                humantime::format_duration(self.room_wait_limit())
            ));
            return false;
        }
        if self.room_wait.is_none() {
            self.room_wait = Some(now);
            let limit = if drain_room {
                "worker_table_full"
            } else {
                "max_draining_workers"
            };
            self.metrics.count_limit(limit);
            if let Some(suppressed) = WAITS.hit(&std::io::Error::other(limit)) {
                let why = if drain_room {
                    format!("every cell of the worker table ({cells}) is held by a live worker")
                } else {
                    format!(
                        "{leaving} old workers are still draining (max_draining_workers {})",
                        self.cfg.max_draining_workers
                    )
                };
                tracing::warn!(
                    generation,
                    slot,
                    suppressed,
                    "rollout waits before starting its next worker: {why}; it goes on when one exits (at most {})",
                    humantime::format_duration(self.room_wait_limit())
                );
            }
        }
        false
    }

    pub(super) fn finish(&mut self) {
        let Some(r) = self.rollout.take() else { return };
        let mut report = r.report;
        report.duration_ms = r.started.elapsed().as_millis() as u64;
        let outcome = match (r.kind, r.failure) {
            (RolloutKind::Recycle, _) => {
                report.ok = true;
                Ok(())
            }
            (RolloutKind::Revert, Some(failure)) => {
                tracing::warn!(
                    generation = r.target.number,
                    "rolled back to generation {}",
                    r.target.number
                );
                report.serving_generation = r.target.number;
                report.error = Some(failure.clone());
                Err(failure)
            }
            _ => {
                report.ok = true;
                report.serving_generation = r.target.number;
                tracing::info!(
                    generation = r.target.number,
                    sha256 = short(&r.target.snapshot.sha256),
                    config_sha256 = short(&r.target.config.sha256),
                    ms = report.duration_ms,
                    "generation {} is serving",
                    r.target.number
                );
                let previous = self.current.as_ref().map_or(0, |g| g.number);
                self.history.push_back(r.target.clone());
                let judged = r.canary.is_some_and(|p| p.promoted);
                let number = r.target.number;
                self.current = Some(r.target);
                self.prune_snapshots();
                if judged {
                    self.open_watch(number, previous);
                }
                Ok(())
            }
        };
        self.conclude(r.kind, report, r.replies, outcome);
    }

    /// Answers everyone waiting on a rollout, records it, and starts a queued reload.
    pub(super) fn conclude(
        &mut self,
        kind: RolloutKind,
        report: ReloadReport,
        replies: Vec<Reply>,
        outcome: Result<(), String>,
    ) {
        self.room_wait = None;
        let (mut report, mut outcome) = (report, outcome);
        // Not a success while nobody can connect: a plugin may have shut the listener down.
        if report.ok
            && !matches!(kind, RolloutKind::Start | RolloutKind::Recycle)
            && !self.check_listener("at the end of a rollout")
        {
            let down = self.listener_health.down.clone().unwrap_or_default();
            let e = format!(
                "generation {} serves, but no connection reaches it: {down}",
                report.serving_generation
            );
            report.ok = false;
            report.error = Some(e.clone());
            outcome = Err(e);
        }
        self.count_reload(kind, &report, &outcome);
        let mut abort_reply = None;
        if kind == RolloutKind::Rollback
            && let Some(verdict) = self.watch_rollback.take()
        {
            report.verdict = Some(verdict);
            abort_reply = self.queued_abort_reply.take();
        }
        if kind == RolloutKind::Recycle {
            // Not a reload: `last_reload` and the refused build stay as they were.
            self.recycle_concluded(&report, outcome);
            self.start_queued();
            return;
        }
        if kind == RolloutKind::Start {
            match &outcome {
                Ok(()) => {
                    let line = format!(
                        "serving http://{} with {} workers (generation {}, master pid {})",
                        self.cfg.listen,
                        self.cfg.workers,
                        report.generation,
                        std::process::id()
                    );
                    self.notice(super::Notice::Serving {
                        status: line.clone(),
                    });
                    self.notify_started(&line);
                }
                Err(reason) => {
                    self.notice(super::Notice::StartFailed {
                        reason: reason.clone(),
                    });
                    self.notify_started(&format!("error: {reason}"));
                    if self.fatal.is_none() {
                        self.fatal = Some(reason.clone());
                        self.request_stop(None);
                    }
                }
            }
        } else {
            let status = match &report.error {
                None => format!(
                    "generation {} serving ({} workers, sha256 {})",
                    report.generation,
                    self.cfg.workers,
                    report.sha256.as_deref().map_or("-", short)
                ),
                Some(e) => format!(
                    "{} to generation {} failed: {e}; serving generation {}",
                    report.kind, report.generation, report.serving_generation
                ),
            };
            self.notice(super::Notice::Reloaded { status });
            self.last_reload = Some(report.clone());
        }
        if outcome.is_err() {
            self.last_refused = report.sha256.clone().zip(report.config_sha256.clone());
        }
        // One line per automatic reload (a reverted one is concluded under `Revert`).
        if report.kind == RolloutKind::Watch.name() {
            let sha = report.sha256.as_deref().map_or("-", short);
            match &report.error {
                None => tracing::info!(
                    "auto-reload: generation {} serving, sha256 {sha}, {} ms",
                    report.generation,
                    report.duration_ms
                ),
                Some(e) => tracing::warn!(
                    "auto-reload refused (generation {}, sha256 {sha}, {} ms): {e}",
                    report.generation,
                    report.duration_ms
                ),
            }
        }
        let response = if report.ok {
            ControlResponse::Reloaded(report)
        } else {
            ControlResponse::ReloadFailed(report)
        };
        for reply in replies.into_iter().flatten().chain(abort_reply) {
            let _ = reply.send(response.clone());
        }
        self.start_queued();
    }

    /// Requests queued during a rollout run next; consecutive ones of a kind share one rollout.
    /// Queued recycles run when no reload is waiting (a reload replaces the worker anyway).
    pub(super) fn start_queued(&mut self) {
        if self.stopping.is_none()
            && let Some(&(kind, _)) = self.queued.front()
        {
            let mut replies = Vec::new();
            while self.queued.front().is_some_and(|(k, _)| *k == kind) {
                replies.extend(self.queued.pop_front().map(|(_, r)| r));
            }
            self.begin(kind, replies);
        } else if self.stopping.is_none() {
            self.next_recycle();
        }
    }

    pub(super) fn notify_started(&mut self, line: &str) {
        self.fx.started(line);
    }

    /// The candidate failed: kill it; revert the slots already moved, or give up.
    pub(super) fn fail_rollout(&mut self, reason: String) {
        let Some(mut r) = self.rollout.take() else {
            return;
        };
        self.room_wait = None;
        self.judging
            .take_if(|j| j.phase == super::analysis::Phase::Analysis);
        if let Some(id) = r.candidate.take() {
            self.kill_worker(id);
        }
        tracing::error!(generation = r.target.number, kind = ?r.kind, "rollout failed: {reason}");
        match (r.kind, self.current.clone()) {
            (RolloutKind::Reload | RolloutKind::Rollback | RolloutKind::Watch, Some(current))
                if !r.done.is_empty() =>
            {
                tracing::warn!(slots = ?r.done, "rolling the moved slots back to generation {}", current.number);
                self.rollout = Some(Rollout {
                    kind: RolloutKind::Revert,
                    target: current,
                    pending: r.done.into_iter().collect(),
                    done: Vec::new(),
                    candidate: None,
                    awaiting_ack: r.awaiting_ack,
                    replies: r.replies,
                    report: r.report,
                    started: r.started,
                    failure: Some(reason),
                    canary: None,
                });
                self.advance();
            }
            (kind, _) => {
                let reason = match r.failure {
                    Some(original) => format!("{original}; rolling back also failed: {reason}"),
                    None => reason,
                };
                let mut report = r.report;
                report.duration_ms = r.started.elapsed().as_millis() as u64;
                report.error = Some(reason.clone());
                self.conclude(kind, report, r.replies, Err(reason));
            }
        }
    }

    pub(super) fn abort_rollout(&mut self, reason: &str) {
        if let Some(p) = self.snapshotting.take() {
            p.cancel.store(true, Ordering::Relaxed);
            let mut report = p.report;
            report.error = Some(format!("interrupted: {reason}"));
            report.duration_ms = p.started.elapsed().as_millis() as u64;
            self.conclude(
                p.kind,
                report,
                p.replies,
                Err(format!("interrupted: {reason}")),
            );
        }
        self.judging.take();
        if let Some(r) = self.rollout.take() {
            if let Some(id) = r.candidate {
                self.kill_worker(id);
            }
            let mut report = r.report;
            report.error = Some(format!("interrupted: {reason}"));
            report.duration_ms = r.started.elapsed().as_millis() as u64;
            self.conclude(
                r.kind,
                report,
                r.replies,
                Err(format!("interrupted: {reason}")),
            );
        }
        for (_, reply) in std::mem::take(&mut self.queued) {
            if let Some(reply) = reply {
                let _ = reply.send(ControlResponse::Refused {
                    reason: reason.to_string(),
                });
            }
        }
    }

    /// The generation a replacement for `slot` should run right now.
    pub(super) fn generation_for_slot(&self, slot: u32) -> Option<Arc<Generation>> {
        match &self.rollout {
            Some(r) if r.done.contains(&slot) => Some(r.target.clone()),
            _ => self.current.clone(),
        }
    }

    pub(super) fn on_ready(&mut self, id: WorkerId, plugin: PluginInfo, startup: StartupTimings) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if !matches!(w.state, WorkerState::Starting { .. }) {
            return;
        }
        w.state = WorkerState::Ready;
        w.ready_at = Some(Instant::now());
        tracing::info!(pid = w.pid, slot = w.slot, generation = w.generation.number, plugin = %plugin.name, version = %plugin.version, "worker ready");
        w.plugin = Some(plugin);
        w.startup = Some(startup);
        let (slot, pid) = (w.slot as usize, w.pid);

        let is_candidate = self
            .rollout
            .as_ref()
            .is_some_and(|r| r.candidate == Some(id));
        let kind = self.rollout.as_ref().map_or("reload", |r| r.kind.name());
        if is_candidate {
            let old = self.serving[slot].replace(id);
            // A new generation in the slot is a fresh start: forget its failures.
            self.health[slot].fresh_start();
            if let Some(r) = &mut self.rollout {
                r.candidate = None;
                r.done.push(slot as u32);
                r.report.started_pids.push(pid);
            }
            if let Some(old) = old {
                if let Some(r) = &mut self.rollout
                    && let Some(ow) = self.workers.get(&old)
                {
                    r.awaiting_ack.insert(old);
                    r.report.drained_pids.push(ow.pid);
                }
                self.retire(old, kind);
            }
            self.advance();
        } else if self.serving[slot].is_none() && self.stopping.is_none() {
            // A replacement after a crash.
            self.serving[slot] = Some(id);
            self.health[slot].respawn_at = None;
            self.health[slot].hung = false;
        } else {
            self.retire(id, "surplus");
        }
    }

    pub(super) fn on_drain_ack(&mut self, id: WorkerId) {
        self.stop_counting(id);
        if let Some(r) = &mut self.rollout
            && r.awaiting_ack.remove(&id)
        {
            self.advance();
        }
    }
}

/// A rollout's first step, under way off the loop.
pub(super) struct PendingSnapshot {
    /// Matches the [`Event::SnapshotTaken`](super::Event::SnapshotTaken) that ends it.
    ticket: u64,
    kind: RolloutKind,
    replies: Vec<Reply>,
    report: ReloadReport,
    started: Instant,
    /// Set when the rollout is abandoned: the copy stops at its next chunk.
    cancel: Arc<AtomicBool>,
}

/// What a rollout's first step brings back from the snapshot thread.
pub(crate) struct Taken {
    pub(super) snapshot: Snapshot,
    pub(super) config: PluginConfig,
    /// Keys of the re-read config file that changed but that a reload does not apply.
    pub(super) ignored_keys: Vec<&'static str>,
}

/// Where a new generation's snapshot and `[plugin_config]` come from.
pub(crate) enum SnapshotSource {
    /// A fresh snapshot of the configured plugin file, with the `[plugin_config]` the master
    /// started with, or (`reread_config`) the one in the config file now.
    PluginFile { reread_config: bool },
    /// A rollback: the snapshot and configuration an earlier generation ran, if the snapshot is
    /// still there.
    Kept {
        generation: u64,
        snapshot: Snapshot,
        config: PluginConfig,
    },
}

impl SnapshotSource {
    /// Blocks (file I/O): runs on a thread of its own. A config file that does not pass
    /// `host check` refuses the rollout with the same one line, before the plugin is read.
    pub(crate) fn take(self, cfg: &Config, cancel: &AtomicBool) -> Result<Taken, String> {
        if cfg.gateway.is_some() {
            // A gateway runs the host's own code: there is no plugin file to read.
            return Ok(Taken {
                snapshot: Snapshot::gateway(),
                config: cfg.plugin_config.clone(),
                ignored_keys: Vec::new(),
            });
        }
        match self {
            SnapshotSource::PluginFile { reread_config } => {
                let (config, ignored_keys) = if reread_config {
                    let (config, ignored) = cfg
                        .reread_plugin_config()
                        .map_err(|e| crate::error_chain(&e))?;
                    if !ignored.is_empty() {
                        tracing::warn!(
                            config = %cfg.file.display(),
                            "{}",
                            Config::frozen_keys_note(&ignored)
                        );
                    }
                    (config, ignored)
                } else {
                    (cfg.plugin_config.clone(), Vec::new())
                };
                let limits = snapshot::Limits {
                    allow_writable: cfg.allow_writable_plugin,
                    max_bytes: cfg.max_plugin_bytes,
                };
                let snapshot = snapshot::take(&cfg.plugin, &cfg.snapshot_dir(), limits, cancel)
                    .map_err(|e| crate::error_chain(&e))?;
                Ok(Taken {
                    snapshot,
                    config,
                    ignored_keys,
                })
            }
            SnapshotSource::Kept {
                generation,
                snapshot,
                config,
            } => {
                if std::fs::symlink_metadata(&snapshot.path).is_err() {
                    return Err(format!(
                        "the snapshot of generation {generation} is gone: {}",
                        snapshot.path.display()
                    ));
                }
                // Never trusted by name: its bytes are hashed again.
                snapshot::verify(&snapshot, cancel).map_err(|e| {
                    format!(
                        "the snapshot of generation {generation} cannot be trusted: {}",
                        crate::error_chain(&e)
                    )
                })?;
                Ok(Taken {
                    snapshot,
                    config,
                    ignored_keys: Vec::new(),
                })
            }
        }
    }
}
