//! The master's state machine: slots, generations, workers and rollouts. Every transition is a
//! method called from the one `match` in [`Supervisor::handle`] or from [`Supervisor::on_timer`];
//! timeouts are deadlines the event loop sleeps until, not side threads.
//!
//! A worker is `Starting` (spawned, not yet ready, bounded by `start_timeout`), `Ready` (serving
//! its slot, and proving at a steady beat that its I/O thread runs), `Hung` (a ready worker
//! silent for `worker_timeout`: killed, its slot refilled at once, waiting to be reaped),
//! `Draining` (told to drain, SIGKILLed if still alive at `graceful_timeout`), or `Killed`
//! (waiting to be reaped). Each slot has at most one serving worker.
//!
//! A generation is a plugin snapshot and a `[plugin_config]`: a rollback brings back both, and a
//! crash replacement or a recycle starts its worker with both of its generation's.
//!
//! A rollout's first step is the snapshot of the plugin file its generation runs, after reading
//! the config file again for its `[plugin_config]` (a reload; the first start uses the one the
//! master was started with; a rollback reuses a kept generation's). That file I/O
//! runs on a thread of its own, never on this loop (a FIFO, a slow disk or a 200 MB file must
//! not stall `status`, signals or crash replacement); its result comes back as
//! [`Event::SnapshotTaken`]. Meanwhile the supervisor is busy exactly as during the rest of the
//! rollout, and the reported duration counts the snapshot.
//!
//! A rollout moves slots to a target generation one at a time, new before old: spawn a
//! candidate for the slot, wait for its `Ready`, then tell the slot's old worker to drain.
//! Before each candidate it waits (bounded) for room: fewer than `max_draining_workers` old
//! workers still leaving, and a free cell in the worker table, which is sized for that; no
//! worker is ever started without a cell, so `/metrics` misses none of its requests. The
//! first candidate is the canary: if it fails, nothing old was touched. If a later one fails, the
//! slots already moved are rolled back to the serving generation the same way. A reload with a
//! canary plan holds after its first `canary_workers` slots until [`analysis`] judges the new
//! generation on live traffic: promoted, the rollout goes on; condemned, it fails with the
//! figures and the moved slots are reverted the same way. A rollout is done
//! when every slot moved and every old worker acknowledged that it stopped accepting, so a
//! connection opened after `reload` returns reaches new code.
//!
//! This module decides and answers requests; what a decision does to the world (spawning and
//! signalling processes, snapshots, notices) goes through [`Effects`] (see [`effects`]), so the
//! decisions are unit-tested with a fake and a paused clock (`tests.rs`). It does not own sockets
//! other than the listener it hands to workers (which it checks and re-arms, see [`listener`]),
//! and it never loads plugin code. It is one self-contained value: events go in through
//! [`Supervisor::handle`] and the timers through [`Supervisor::on_timer`] at
//! [`Supervisor::next_deadline`]; [`Supervisor::run`] is that loop.
//!
//! The transitions live by concern, each an `impl Supervisor` block: [`rollout`] (reloads,
//! rollbacks, the queue), [`analysis`] (a canary judged on live traffic, the watch period after
//! a full rollout, `promote` and `abort`), [`health`] (crashes, hung workers, backoff,
//! replacements), [`recycle`] (one-slot rollouts that replace a worker over `max_requests` or
//! `max_worker_rss`, or whose plugin asked), [`spawn`] (starting and signalling workers,
//! through [`effects`]), [`handover`] (the old master's side of `host upgrade`), [`status`]
//! (answering `status`), [`listener`] (the shared listening socket's checks and re-arming),
//! [`evidence`] (what a hung or dead worker was doing, for the log) and [`metrics`] (what
//! `/metrics` reports: counters folded from exited workers, starts, exits, kills). This file
//! holds the state, the one match, the run loop and the timers (the watchdog's among them: a
//! ready worker's silence is a deadline like the others).

mod analysis;
mod effects;
mod evidence;
mod handover;
mod health;
mod listener;
mod metrics;
mod recycle;
mod rollout;
mod spawn;
mod status;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::snapshot::Snapshot;
use crate::config::{Config, PluginConfig};
use crate::protocol::{
    BuildReport, ControlRequest, ControlResponse, PluginInfo, ReloadReport, StartupTimings,
    WorkerStateName, WorkerToMaster,
};
use health::SlotHealth;
use rollout::PendingSnapshot;
use spawn::KILL_MARGIN;
pub(crate) use spawn::describe_exit;
use status::StatusQuery;

pub(crate) use effects::{Effects, WorkerLaunch};
pub(crate) use handover::Exit;
pub(crate) use metrics::{GenerationMetrics, MetricsReport};
pub(crate) use rollout::SnapshotSource;

/// Everything the master reacts to.
pub(crate) enum Event {
    /// A message from a worker.
    Worker { id: WorkerId, msg: WorkerToMaster },
    /// A worker process was reaped.
    Exited {
        id: WorkerId,
        status: std::io::Result<ExitStatus>,
    },
    /// A request on the control socket, with where to send the answer.
    Control {
        request: ControlRequest,
        reply: oneshot::Sender<ControlResponse>,
    },
    /// A signal the master handles.
    Signal(SignalAction),
    /// Dev mode: the plugin file changed (or a build succeeded) and things have settled.
    PluginChanged,
    /// Dev mode: a build the watcher ran ended (before its `PluginChanged`, if it succeeded).
    Built(BuildReport),
    /// The snapshot a rollout's first step took off the loop, with the
    /// `[plugin_config]` it read (or why it could not).
    SnapshotTaken {
        ticket: u64,
        result: Result<rollout::Taken, String>,
    },
    /// A scrape of the admin listener's `/metrics`, with where to send the report.
    Metrics {
        reply: oneshot::Sender<metrics::MetricsReport>,
    },
    /// `host upgrade`: the new master took over, or why it did not.
    Upgraded(Result<crate::protocol::UpgradeReport, String>),
    /// SIGCHLD: a child exited, perhaps an orphan a worker left behind (see `orphans`).
    ChildSignal,
}

/// What the supervisor tells the rest of the master about its life (systemd's notifications,
/// and the hand-over of a master started by `host upgrade`). Things that happened, not orders.
#[derive(Debug)]
pub(crate) enum Notice {
    /// The first generation serves.
    Serving { status: String },
    /// The first generation could not start; the master exits.
    StartFailed { reason: String },
    /// A reload or rollback began.
    Reloading { status: String },
    /// A reload, rollback or watch reload ended, either way.
    Reloaded { status: String },
    /// Stopping (not after handing over to a new master).
    Stopping,
    /// Anything else worth a line in `systemctl status`.
    Status(String),
    /// A new master took over; this one drains and exits.
    HandedOver { new_pid: u32 },
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum SignalAction {
    Reload(&'static str),
    Stop(&'static str),
    Upgrade(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WorkerId(u64);

/// One reload's worth of plugin: a number, the snapshot its workers load, and the
/// `[plugin_config]` they are given. A rollback brings back both; a recycle or a crash
/// replacement starts a worker with both of its generation's.
#[derive(Debug)]
pub(crate) struct Generation {
    pub number: u64,
    pub snapshot: Snapshot,
    pub config: PluginConfig,
}

#[derive(Debug)]
enum WorkerState {
    Starting {
        deadline: Instant,
    },
    Ready,
    /// Was ready, sent nothing for `worker_timeout`: killed, its slot already being refilled.
    Hung,
    Draining {
        kill_at: Instant,
    },
    Killed,
}

impl WorkerState {
    const fn name(&self) -> Option<WorkerStateName> {
        match self {
            WorkerState::Starting { .. } => Some(WorkerStateName::Starting),
            WorkerState::Ready => Some(WorkerStateName::Ready),
            WorkerState::Hung => Some(WorkerStateName::Hung),
            WorkerState::Draining { .. } => Some(WorkerStateName::Draining),
            WorkerState::Killed => None,
        }
    }
}

struct Worker {
    slot: u32,
    generation: Arc<Generation>,
    pid: u32,
    state: WorkerState,
    plugin: Option<PluginInfo>,
    requests: u64,
    in_flight: u64,
    connections: u64,
    /// A gateway process's figures, as it last reported them.
    gateway: Option<crate::protocol::GatewayStatus>,
    ready_at: Option<Instant>,
    start_error: Option<String>,
    startup: Option<StartupTimings>,
    /// Its cell in the accept table, until it stops accepting or is reaped.
    table_cell: Option<u32>,
    /// When it last sent anything (a heartbeat, or any other message): a ready worker silent
    /// for `worker_timeout` is hung.
    last_heard: Instant,
    /// Why it was told to leave (a rollout's kind, `stop`, `surplus`), for `/metrics`.
    leaving: Option<&'static str>,
    /// Why the master killed it (see `metrics::KILL_CAUSES`), for `/metrics`.
    killed_for: Option<&'static str>,
}

type Reply = Option<oneshot::Sender<ControlResponse>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RolloutKind {
    /// The first generation, at `host start`.
    Start,
    Reload,
    /// `host rollback`: the generation that served before the current one, again.
    Rollback,
    /// Moving slots back after a reload failed past its canary.
    Revert,
    /// Dev mode: the watched plugin file changed.
    Watch,
    /// One slot's worker replaced by a fresh one of the same generation (see [`recycle`]).
    Recycle,
}

impl RolloutKind {
    const fn name(self) -> &'static str {
        match self {
            RolloutKind::Start => "start",
            RolloutKind::Reload => "reload",
            RolloutKind::Rollback => "rollback",
            RolloutKind::Revert => "revert",
            RolloutKind::Watch => "watch",
            RolloutKind::Recycle => "recycle",
        }
    }
}

struct Rollout {
    kind: RolloutKind,
    target: Arc<Generation>,
    pending: VecDeque<u32>,
    done: Vec<u32>,
    candidate: Option<WorkerId>,
    awaiting_ack: HashSet<WorkerId>,
    replies: Vec<Reply>,
    report: ReloadReport,
    started: Instant,
    /// For a revert: why the reload failed.
    failure: Option<String>,
    /// A reload's canary: the rollout waits after its first workers for the verdict.
    canary: Option<analysis::CanaryPlan>,
}

/// The master's state. See the module doc.
pub(crate) struct Supervisor {
    cfg: Arc<Config>,
    listener: std::net::TcpListener,
    /// Where accepting workers publish their connection counts (`None` if it could not be
    /// created: workers then accept without looking at each other).
    worker_table: Option<(crate::worker_table::WorkerTable, std::os::fd::OwnedFd)>,
    /// What the transitions do to the world (see [`effects`]).
    fx: Box<dyn Effects>,
    workers: BTreeMap<WorkerId, Worker>,
    serving: Vec<Option<WorkerId>>,
    health: Vec<SlotHealth>,
    current: Option<Arc<Generation>>,
    /// Generations that went live, oldest first (the last is `current`); bounded by `keep_snapshots`.
    history: VecDeque<Arc<Generation>>,
    next_generation: u64,
    next_id: u64,
    /// A rollout's first step, while its snapshot is taken off the event loop.
    snapshotting: Option<PendingSnapshot>,
    next_ticket: u64,
    rollout: Option<Rollout>,
    /// Reload and rollback requests that arrived during a rollout, in order.
    queued: VecDeque<(RolloutKind, Reply)>,
    stopping: Option<Vec<Reply>>,
    fatal: Option<String>,
    last_reload: Option<ReloadReport>,
    /// Dev mode: the last build's outcome, for `status`.
    last_build: Option<BuildReport>,
    /// Plugin and `[plugin_config]` sha256 of the last generation a reload refused: dev mode
    /// does not retry identical bytes with an identical configuration.
    last_refused: Option<(String, String)>,
    queries: Vec<StatusQuery>,
    recycling: recycle::Recycling,
    metrics: metrics::Metrics,
    upgrading: Option<handover::Upgrading>,
    /// A new master took over: stopping leaves the pidfile and the control socket to it.
    handed_over: bool,
    /// Whether the listener listens, and its recoveries (see `listener`).
    listener_health: listener::ListenerHealth,
    /// Since when the rollout has been waiting for room to start its next worker (see
    /// `rollout::room_for_candidate`).
    room_wait: Option<Instant>,
    /// A canary under analysis, or a new generation in its watch period (see `analysis`).
    judging: Option<analysis::Judging>,
    /// How the last judged generation ended, for `status`.
    last_verdict: Option<crate::protocol::CanaryVerdict>,
    /// The old generation's analysis figures, kept from a promotion to the watch period.
    watch_baseline: Option<crate::protocol::CanaryFigures>,
    /// The verdict that started the rollback under way (a watch period's).
    watch_rollback: Option<crate::protocol::CanaryVerdict>,
    /// `host abort` during a watch period, answered when its rollback ends.
    queued_abort_reply: Reply,
    /// `host reload`'s flags, for the next reload's canary.
    canary_override: Option<crate::protocol::CanaryOverride>,
}

/// Cells of the worker table: a cell for every worker that can be alive at once. Each slot's
/// serving worker and one starting beside it (a rollout's candidate or a crash replacement),
/// the old workers still draining (at most `max_draining_workers`: a rollout waits for one to
/// exit before it starts a worker past that), and 4 for hung or killed ones not yet reaped.
/// A worker is never started without a cell (its requests would go uncounted): when none is
/// free, its start waits for one (see `rollout::room_for_candidate`).
fn table_cells(cfg: &Config) -> usize {
    2 * cfg.workers + cfg.max_draining_workers + 4
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

impl Supervisor {
    /// A supervisor for `cfg`'s slots on `listener`, whose transitions act through `fx`.
    pub(crate) fn new(
        cfg: Arc<Config>,
        listener: std::net::TcpListener,
        fx: Box<dyn Effects>,
    ) -> Supervisor {
        let slots = cfg.workers;
        let worker_table = crate::worker_table::WorkerTable::create(table_cells(&cfg))
            .inspect_err(|e| {
                tracing::warn!(
                    "{}; workers will accept without balancing, and a dead worker's requests in flight will not be known",
                    crate::error_chain(e)
                )
            })
            .ok();
        let recycling = recycle::Recycling::new(slots, cfg.max_worker_rss.is_some());
        let every = cfg.listener_check_interval;
        Supervisor {
            cfg,
            listener,
            worker_table,
            fx,
            workers: BTreeMap::new(),
            serving: vec![None; slots],
            health: (0..slots).map(|_| SlotHealth::default()).collect(),
            current: None,
            history: VecDeque::new(),
            next_generation: 1,
            next_id: 1,
            snapshotting: None,
            next_ticket: 1,
            rollout: None,
            queued: VecDeque::new(),
            stopping: None,
            fatal: None,
            last_reload: None,
            last_build: None,
            last_refused: None,
            queries: Vec::new(),
            recycling,
            metrics: metrics::Metrics::default(),
            upgrading: None,
            handed_over: false,
            room_wait: None,
            judging: None,
            last_verdict: None,
            watch_baseline: None,
            watch_rollback: None,
            queued_abort_reply: None,
            canary_override: None,
            listener_health: listener::ListenerHealth::new(every),
        }
    }

    pub(super) fn notice(&mut self, notice: Notice) {
        self.fx.notice(notice);
    }

    /// Runs until the master is stopped (`Ok`) or cannot start (`Err` with the reason).
    pub(crate) async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<Exit, String> {
        self.begin(RolloutKind::Start, Vec::new());
        loop {
            if let Some(outcome) = self.finished() {
                return outcome;
            }
            let next = self.next_deadline();
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => {
                        self.handle(ev);
                        self.recheck_listener_if_down();
                    }
                    None => return Err("the event channel closed".into()),
                },
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    // Deadlines are judged on everything that has arrived: if this loop was held
                    // up, the workers' heartbeats may be waiting in their channels' readers or
                    // in this queue. Let the readers run, handle what is queued, then look.
                    tokio::task::yield_now().await;
                    while let Ok(ev) = events.try_recv() {
                        self.handle(ev);
                    }
                    self.on_timer(Instant::now());
                    self.recheck_listener_if_down();
                }
            }
        }
    }

    /// Every event goes through this one match.
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Worker { id, msg } => match self.heard_from(id, msg) {
                WorkerToMaster::Ready { plugin, startup } => self.on_ready(id, plugin, startup),
                WorkerToMaster::StartFailed { reason } => {
                    self.on_start_failed(id, reason);
                    // Its plugin's constructors may have shut the shared listener down.
                    self.check_listener("after a worker failed to start");
                }
                WorkerToMaster::ListenerLost { own_fd, reason } => {
                    self.on_listener_lost(id, own_fd, reason)
                }
                WorkerToMaster::Draining => self.on_drain_ack(id),
                WorkerToMaster::Stats {
                    requests,
                    in_flight,
                    connections,
                    gateway,
                } => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.gateway = gateway.map(|g| *g);
                    }
                    self.on_stats(id, requests, in_flight, connections)
                }
                WorkerToMaster::RecycleMe { reason, by_plugin } => {
                    self.request_recycle(id, reason, by_plugin)
                }
                WorkerToMaster::Exiting {
                    cut_requests,
                    cut_connections,
                } => {
                    if let Some(w) = self.workers.get(&id)
                        && (cut_requests > 0 || cut_connections > 0)
                    {
                        tracing::warn!(
                            pid = w.pid,
                            slot = w.slot,
                            generation = w.generation.number,
                            cut_requests,
                            cut_connections,
                            "worker cut work at graceful_timeout"
                        );
                    }
                }
                // Noted by `heard_from`, like every message.
                WorkerToMaster::Heartbeat => {}
            },
            Event::Exited { id, status } => {
                self.on_exit(id, status);
                // Its children, if it left any, are the master's now.
                self.sweep_orphans();
            }
            Event::ChildSignal => self.sweep_orphans(),
            Event::Control { request, reply } => match request {
                // A group that is not reloadable keeps its workers until `restart` or `upgrade`.
                ControlRequest::Reload | ControlRequest::ReloadWith(_) if !self.cfg.reloadable => {
                    let _ = reply.send(ControlResponse::Refused {
                        reason: format!(
                            "group {:?} is not reloadable (reloadable = false): `host restart` or `host upgrade` replaces its workers",
                            self.cfg.group
                        ),
                    });
                }
                ControlRequest::Group { request, .. } => self.handle(Event::Control {
                    request: *request,
                    reply,
                }),
                ControlRequest::Reload => self.request_rollout(RolloutKind::Reload, Some(reply)),
                ControlRequest::ReloadWith(flags) => {
                    // The flags of the latest request apply to the next reload; a refused
                    // request leaves none behind.
                    self.canary_override = Some(flags);
                    self.request_rollout(RolloutKind::Reload, Some(reply));
                    let pending = self.snapshotting.is_some()
                        || self.queued.iter().any(|(k, _)| *k == RolloutKind::Reload);
                    if !pending {
                        self.canary_override = None;
                    }
                }
                ControlRequest::Promote => self.request_verdict(true, Some(reply)),
                ControlRequest::Abort => self.request_verdict(false, Some(reply)),
                ControlRequest::Rollback => {
                    self.request_rollout(RolloutKind::Rollback, Some(reply))
                }
                ControlRequest::Stop => self.request_stop(Some(reply)),
                ControlRequest::Status => self.request_status(reply),
                ControlRequest::Upgrade => self.request_upgrade(Some(reply)),
            },
            Event::Signal(SignalAction::Upgrade(name)) => {
                tracing::info!(signal = name, "upgrade requested by signal");
                self.request_upgrade(None);
            }
            Event::Upgraded(outcome) => self.on_upgraded(outcome),
            Event::Signal(SignalAction::Reload(name)) if !self.cfg.reloadable => {
                tracing::info!(
                    signal = name,
                    "reload by signal skips this group (reloadable = false)"
                );
            }
            Event::Signal(SignalAction::Reload(name)) => {
                tracing::info!(signal = name, "reload requested by signal");
                self.request_rollout(RolloutKind::Reload, None);
            }
            Event::PluginChanged if !self.cfg.reloadable => {}
            Event::PluginChanged => self.request_rollout(RolloutKind::Watch, None),
            Event::Built(report) => self.last_build = Some(report),
            Event::SnapshotTaken { ticket, result } => self.on_snapshot(ticket, result),
            Event::Metrics { reply } => {
                let _ = reply.send(self.metrics_report());
            }
            Event::Signal(SignalAction::Stop(name)) => {
                tracing::info!(signal = name, "stop requested by signal");
                self.request_stop(None);
            }
        }
    }

    fn request_stop(&mut self, reply: Reply) {
        if let Some(replies) = &mut self.stopping {
            let by_signal = reply.is_none();
            replies.push(reply);
            if by_signal {
                tracing::warn!("second stop signal: killing every worker now");
                for (id, w) in &mut self.workers {
                    if !matches!(w.state, WorkerState::Killed) {
                        self.fx.kill(*id);
                        w.state = WorkerState::Killed;
                        w.killed_for = Some("stop");
                        self.metrics.count_kill("stop");
                    }
                }
            }
            return;
        }
        tracing::info!(
            workers = self.workers.len(),
            "stopping: draining every worker"
        );
        if !self.handed_over {
            self.notice(Notice::Stopping);
        }
        self.cancel_upgrade("host is stopping");
        self.stopping = Some(vec![reply]);
        self.abort_rollout("host is stopping");
        for h in &mut self.health {
            h.respawn_at = None;
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.retire(id, "stop");
        }
    }

    /// Ends the processes the workers left behind and reaps those that exited.
    fn sweep_orphans(&mut self) {
        self.fx.sweep_orphans(Instant::now(), self.cfg.orphan_grace);
    }

    /// A message from worker `id` proves it alive; returns the message for the match.
    fn heard_from(&mut self, id: WorkerId, msg: WorkerToMaster) -> WorkerToMaster {
        if let Some(w) = self.workers.get_mut(&id) {
            w.last_heard = Instant::now();
        }
        msg
    }

    /// When a ready worker that stays silent counts as hung (never while stopping: every
    /// worker is draining then, bounded by its own deadline).
    fn silent_deadline(&self, w: &Worker) -> Option<Instant> {
        (matches!(w.state, WorkerState::Ready) && self.stopping.is_none())
            .then(|| w.last_heard + self.cfg.worker_timeout)
    }

    fn on_timer(&mut self, now: Instant) {
        enum Expired {
            Start,
            Drain,
            Silent(Duration),
        }
        let expired: Vec<(WorkerId, Expired)> = self
            .workers
            .iter()
            .filter_map(|(id, w)| match w.state {
                WorkerState::Starting { deadline } if deadline <= now => {
                    Some((*id, Expired::Start))
                }
                WorkerState::Draining { kill_at } if kill_at <= now => Some((*id, Expired::Drain)),
                WorkerState::Ready if self.silent_deadline(w).is_some_and(|d| d <= now) => {
                    Some((*id, Expired::Silent(now - w.last_heard)))
                }
                _ => None,
            })
            .collect();
        for (id, expired) in expired {
            match expired {
                Expired::Start => {
                    let t = humantime::format_duration(self.cfg.start_timeout);
                    self.start_failed(
                        id,
                        format!("did not become ready within start_timeout ({t})"),
                    );
                }
                Expired::Drain => {
                    if let Some(w) = self.workers.get(&id) {
                        tracing::warn!(
                            pid = w.pid,
                            slot = w.slot,
                            generation = w.generation.number,
                            "worker still running {} after graceful_timeout; killing it",
                            humantime::format_duration(KILL_MARGIN)
                        );
                        self.kill_worker_for(id, "drain_timeout");
                    }
                }
                Expired::Silent(silent) => self.on_hung(id, silent),
            }
        }
        if self.fx.orphans_pending().1.is_some_and(|d| d <= now) {
            self.sweep_orphans();
        }
        self.listener_timer(now);
        self.respawn_due(now);
        if self
            .room_wait
            .is_some_and(|since| since + self.room_wait_limit() <= now)
        {
            self.advance();
        }
        self.answer_overdue_queries(now);
        self.recycle_timer(now);
        self.judging_timer(now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.state {
            WorkerState::Starting { deadline } => Some(deadline),
            WorkerState::Draining { kill_at } => Some(kill_at),
            WorkerState::Ready => self.silent_deadline(w),
            _ => None,
        });
        let respawns = self.health.iter().filter_map(|h| h.respawn_at);
        let queries = self.queries.iter().map(|q| q.deadline);
        let recycling = self.recycling.deadline();
        let room = self.room_wait.map(|since| since + self.room_wait_limit());
        workers
            .chain(room)
            .chain(respawns)
            .chain(queries)
            .chain(recycling)
            .chain(self.judging_deadline())
            .chain(self.fx.orphans_pending().1)
            .chain(Some(self.listener_health.next_check))
            .min()
    }

    fn finished(&mut self) -> Option<Result<Exit, String>> {
        if self.stopping.is_none() || !self.workers.is_empty() {
            return None;
        }
        // Every worker is gone, so everything they started is the master's child now: stopped
        // (and the port free) once those are gone too.
        self.sweep_orphans();
        if self.fx.orphans_pending().0 {
            return None;
        }
        for reply in self.stopping.take().into_iter().flatten().flatten() {
            let _ = reply.send(ControlResponse::Stopped {
                master_pid: std::process::id(),
            });
        }
        Some(match self.fatal.take() {
            Some(reason) => Err(reason),
            None if self.handed_over => Ok(Exit::HandedOver),
            None => Ok(Exit::Stopped),
        })
    }
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}
