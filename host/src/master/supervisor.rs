//! The master's state machine: slots, generations, workers and rollouts. Every transition is a
//! method called from the one `match` in [`Supervisor::handle`] or from [`Supervisor::on_timer`];
//! timeouts are deadlines the event loop sleeps until, not side threads.
//!
//! A worker is `Starting` (spawned, not yet ready, bounded by `start_timeout`), `Ready` (serving
//! its slot), `Draining` (told to drain, SIGKILLed if still alive at `graceful_timeout`), or
//! `Killed` (waiting to be reaped). Each slot has at most one serving worker.
//!
//! A rollout moves slots to a target generation one at a time, new before old: spawn a
//! candidate for the slot, wait for its `Ready`, then tell the slot's old worker to drain. The
//! first candidate is the canary: if it fails, nothing old was touched. If a later one fails, the
//! slots already moved are rolled back to the serving generation the same way. A rollout is done
//! when every slot moved and every old worker acknowledged that it stopped accepting, so a
//! connection opened after `reload` returns reaches new code.
//!
//! This module spawns and signals processes and answers requests; it does not own sockets other
//! than the listener it hands to workers, and it never loads plugin code.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Write as _;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::snapshot::{self, Snapshot};
use crate::config::Config;
use crate::fd;
use crate::protocol::{
    ControlRequest, ControlResponse, MasterToWorker, PluginInfo, ReloadReport, Sender, SlotStatus,
    StartupTimings, StatusReport, WorkerSpec, WorkerStateName, WorkerStatus, WorkerToMaster,
};

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
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum SignalAction {
    Reload(&'static str),
    Stop(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WorkerId(u64);

/// One reload's worth of plugin: a number and the snapshot its workers load.
#[derive(Debug)]
pub(crate) struct Generation {
    pub number: u64,
    pub snapshot: Snapshot,
}

#[derive(Debug)]
enum WorkerState {
    Starting { deadline: Instant },
    Ready,
    Draining { kill_at: Instant },
    Killed,
}

impl WorkerState {
    const fn name(&self) -> Option<WorkerStateName> {
        match self {
            WorkerState::Starting { .. } => Some(WorkerStateName::Starting),
            WorkerState::Ready => Some(WorkerStateName::Ready),
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
    tx: mpsc::UnboundedSender<MasterToWorker>,
    /// Asks the task that owns the `Child` to SIGKILL it. That task also reaps it, so a kill can
    /// never reach a recycled pid.
    kill: mpsc::UnboundedSender<()>,
    plugin: Option<PluginInfo>,
    requests: u64,
    in_flight: u64,
    ready_at: Option<Instant>,
    start_error: Option<String>,
    startup: Option<StartupTimings>,
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
}

impl RolloutKind {
    const fn name(self) -> &'static str {
        match self {
            RolloutKind::Start => "start",
            RolloutKind::Reload => "reload",
            RolloutKind::Rollback => "rollback",
            RolloutKind::Revert => "revert",
            RolloutKind::Watch => "watch",
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
}

#[derive(Default)]
struct SlotHealth {
    failures: u32,
    respawn_at: Option<Instant>,
    last_error: Option<String>,
}

struct StatusQuery {
    reply: oneshot::Sender<ControlResponse>,
    waiting: HashSet<WorkerId>,
    deadline: Instant,
}

/// How long a status query waits for workers' counters.
const STATS_WAIT: Duration = Duration::from_millis(300);
/// How long past `graceful_timeout` a draining worker may take to exit on its own before SIGKILL.
const KILL_MARGIN: Duration = Duration::from_secs(2);
/// A worker that served this long before dying resets its slot's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The master's state. See the module doc.
pub(crate) struct Supervisor {
    cfg: Arc<Config>,
    listener: std::net::TcpListener,
    events: mpsc::UnboundedSender<Event>,
    workers: BTreeMap<WorkerId, Worker>,
    serving: Vec<Option<WorkerId>>,
    health: Vec<SlotHealth>,
    current: Option<Arc<Generation>>,
    /// Generations that went live, oldest first (the last is `current`); bounded by `keep_snapshots`.
    history: VecDeque<Arc<Generation>>,
    next_generation: u64,
    next_id: u64,
    rollout: Option<Rollout>,
    /// Reload and rollback requests that arrived during a rollout, in order.
    queued: VecDeque<(RolloutKind, Reply)>,
    stopping: Option<Vec<Reply>>,
    fatal: Option<String>,
    last_reload: Option<ReloadReport>,
    /// Content of the last build a reload refused: dev mode does not retry identical bytes.
    last_refused_sha: Option<String>,
    queries: Vec<StatusQuery>,
    start_notify: Option<std::fs::File>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// A wait status in words: "exited with status 1", "killed by SIGSEGV (core dumped)".
pub(crate) fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Err(e) => format!("could not be waited for: {e}"),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => {
                let name = Signal::try_from(sig)
                    .map(Signal::as_str)
                    .unwrap_or("unknown signal");
                let core = if s.core_dumped() {
                    " (core dumped)"
                } else {
                    ""
                };
                format!("killed by {name}{core}")
            }
            (None, None) => format!("ended with wait status {s:?}"),
        },
    }
}

/// Resident set size of `pid` in bytes, from `/proc/<pid>/statm`.
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(100) * 2u32.saturating_pow(n.min(20) - 2)).min(BACKOFF_MAX),
    }
}

impl Supervisor {
    pub(crate) fn new(
        cfg: Arc<Config>,
        listener: std::net::TcpListener,
        events: mpsc::UnboundedSender<Event>,
        start_notify: Option<std::fs::File>,
    ) -> Supervisor {
        let slots = cfg.workers;
        Supervisor {
            cfg,
            listener,
            events,
            workers: BTreeMap::new(),
            serving: vec![None; slots],
            health: (0..slots).map(|_| SlotHealth::default()).collect(),
            current: None,
            history: VecDeque::new(),
            next_generation: 1,
            next_id: 1,
            rollout: None,
            queued: VecDeque::new(),
            stopping: None,
            fatal: None,
            last_reload: None,
            last_refused_sha: None,
            queries: Vec::new(),
            start_notify,
        }
    }

    /// Runs until the master is stopped (`Ok`) or cannot start (`Err` with the reason).
    pub(crate) async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), String> {
        self.begin(RolloutKind::Start, Vec::new());
        loop {
            if let Some(outcome) = self.finished() {
                return outcome;
            }
            let next = self.next_deadline();
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => return Err("the event channel closed".into()),
                },
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    self.on_timer(Instant::now());
                }
            }
        }
    }

    /// Every event goes through this one match.
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Worker { id, msg } => match msg {
                WorkerToMaster::Ready { plugin, startup } => self.on_ready(id, plugin, startup),
                WorkerToMaster::StartFailed { reason } => self.on_start_failed(id, reason),
                WorkerToMaster::Draining => self.on_drain_ack(id),
                WorkerToMaster::Stats {
                    requests,
                    in_flight,
                    ..
                } => self.on_stats(id, requests, in_flight),
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
            },
            Event::Exited { id, status } => self.on_exit(id, status),
            Event::Control { request, reply } => match request {
                ControlRequest::Reload => self.request_rollout(RolloutKind::Reload, Some(reply)),
                ControlRequest::Rollback => {
                    self.request_rollout(RolloutKind::Rollback, Some(reply))
                }
                ControlRequest::Stop => self.request_stop(Some(reply)),
                ControlRequest::Status => self.request_status(reply),
            },
            Event::Signal(SignalAction::Reload(name)) => {
                tracing::info!(signal = name, "reload requested by signal");
                self.request_rollout(RolloutKind::Reload, None);
            }
            Event::PluginChanged => self.request_rollout(RolloutKind::Watch, None),
            Event::Signal(SignalAction::Stop(name)) => {
                tracing::info!(signal = name, "stop requested by signal");
                self.request_stop(None);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // requests

    fn request_rollout(&mut self, kind: RolloutKind, reply: Reply) {
        if self.stopping.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(ControlResponse::Refused {
                    reason: "host is stopping".into(),
                });
            }
            return;
        }
        if self.rollout.is_some() {
            tracing::info!(
                kind = kind.name(),
                "requested during a rollout; it will run when this one ends"
            );
            self.queued.push_back((kind, reply));
            return;
        }
        self.begin(kind, vec![reply]);
    }

    fn request_stop(&mut self, reply: Reply) {
        if let Some(replies) = &mut self.stopping {
            let by_signal = reply.is_none();
            replies.push(reply);
            if by_signal {
                tracing::warn!("second stop signal: killing every worker now");
                for w in self.workers.values_mut() {
                    if !matches!(w.state, WorkerState::Killed) {
                        let _ = w.kill.send(());
                        w.state = WorkerState::Killed;
                    }
                }
            }
            return;
        }
        tracing::info!(
            workers = self.workers.len(),
            "stopping: draining every worker"
        );
        self.stopping = Some(vec![reply]);
        self.abort_rollout("host is stopping");
        for h in &mut self.health {
            h.respawn_at = None;
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.retire(id);
        }
    }

    fn request_status(&mut self, reply: oneshot::Sender<ControlResponse>) {
        let mut waiting = HashSet::new();
        for (id, w) in &self.workers {
            if matches!(w.state, WorkerState::Ready | WorkerState::Draining { .. })
                && w.tx.send(MasterToWorker::QueryStats).is_ok()
            {
                waiting.insert(*id);
            }
        }
        let query = StatusQuery {
            reply,
            waiting,
            deadline: Instant::now() + STATS_WAIT,
        };
        if query.waiting.is_empty() {
            self.answer_status(query.reply);
        } else {
            self.queries.push(query);
        }
    }

    fn answer_status(&self, reply: oneshot::Sender<ControlResponse>) {
        let workers = self
            .workers
            .values()
            .filter_map(|w| {
                Some(WorkerStatus {
                    slot: w.slot,
                    pid: w.pid,
                    generation: w.generation.number,
                    state: w.state.name()?,
                    requests: w.requests,
                    in_flight: w.in_flight,
                    rss_bytes: rss_bytes(w.pid),
                    plugin: w.plugin.clone(),
                    startup_us: w.startup.clone(),
                })
            })
            .collect();
        let report = StatusReport {
            master_pid: std::process::id(),
            master_rss_bytes: rss_bytes(std::process::id()),
            listen: self.cfg.listen.to_string(),
            generation: self.current.as_ref().map_or(0, |g| g.number),
            workers,
            slots: self.slot_statuses(),
            last_reload: self.last_reload.clone(),
        };
        let _ = reply.send(ControlResponse::Status(Box::new(report)));
    }

    fn slot_statuses(&self) -> Vec<SlotStatus> {
        let now = Instant::now();
        (0..self.serving.len())
            .map(|slot| {
                let h = &self.health[slot];
                let pid = self.serving[slot]
                    .and_then(|id| self.workers.get(&id))
                    .map(|w| w.pid);
                let starting = self.workers.values().any(|w| {
                    w.slot == slot as u32 && matches!(w.state, WorkerState::Starting { .. })
                });
                let state = match (pid, starting) {
                    (Some(_), _) => "serving",
                    (None, true) if h.failures == 0 => "starting",
                    _ => "failing",
                };
                SlotStatus {
                    slot: slot as u32,
                    pid,
                    state: state.to_string(),
                    failures: h.failures,
                    last_error: h.last_error.clone(),
                    retry_in_ms: h
                        .respawn_at
                        .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                }
            })
            .collect()
    }

    /// Names a generation's plugin the way an operator knows it: the configured file, and which build.
    fn plugin_label(&self, generation: &Generation) -> String {
        format!(
            "{} (sha256 {})",
            self.cfg.plugin.display(),
            short(&generation.snapshot.sha256)
        )
    }

    // -----------------------------------------------------------------------------------------
    // rollouts

    /// Snapshots the plugin as a new generation and starts rolling every slot onto it.
    fn begin(&mut self, kind: RolloutKind, replies: Vec<Reply>) {
        let number = self.next_generation;
        let mut report = ReloadReport {
            ok: false,
            generation: number,
            serving_generation: self.current.as_ref().map_or(0, |g| g.number),
            plugin_path: self.cfg.plugin.clone(),
            sha256: None,
            error: None,
            started_at: unix_now(),
            duration_ms: 0,
            started_pids: Vec::new(),
            drained_pids: Vec::new(),
            kind: kind.name().to_string(),
        };
        let snapshot = match self.snapshot_for(kind) {
            Ok(s) => s,
            Err(reason) => {
                // Nothing was rolled out: the number stays free for the next attempt.
                report.error = Some(reason.clone());
                tracing::error!(generation = number, "reload refused: {reason}");
                self.conclude(kind, report, replies, Err(reason));
                return;
            }
        };
        if kind == RolloutKind::Watch {
            // A rewrite with the serving bytes, or with the bytes just refused, changes nothing.
            let serving = self
                .current
                .as_ref()
                .is_some_and(|g| g.snapshot.sha256 == snapshot.sha256);
            let refused = self.last_refused_sha.as_deref() == Some(snapshot.sha256.as_str());
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
            bytes = snapshot.size,
            kind = kind.name(),
            "rolling out a new generation"
        );
        report.sha256 = Some(snapshot.sha256.clone());
        self.rollout = Some(Rollout {
            kind,
            target: Arc::new(Generation { number, snapshot }),
            pending: (0..self.cfg.workers as u32).collect(),
            done: Vec::new(),
            candidate: None,
            awaiting_ack: HashSet::new(),
            replies,
            report,
            started: Instant::now(),
            failure: None,
        });
        self.advance();
    }

    /// The snapshot a new generation of `kind` runs: a fresh one of the plugin file, or for a
    /// rollback the one that served before the current generation.
    fn snapshot_for(&self, kind: RolloutKind) -> Result<Snapshot, String> {
        if kind != RolloutKind::Rollback {
            return snapshot::take(
                &self.cfg.plugin,
                &self.cfg.snapshot_dir(),
                self.cfg.allow_writable_plugin,
            )
            .map_err(|e| crate::error_chain(&e));
        }
        let previous = self.history.iter().rev().nth(1).ok_or_else(|| {
            "no previous generation to roll back to (only the current one was kept)".to_string()
        })?;
        if !previous.snapshot.path.exists() {
            return Err(format!(
                "the snapshot of generation {} is gone: {}",
                previous.number,
                previous.snapshot.path.display()
            ));
        }
        tracing::info!(to_generation = previous.number, "rolling back");
        Ok(previous.snapshot.clone())
    }

    /// Drops generations beyond `keep_snapshots` from the history and deletes snapshot files
    /// no kept generation and no live worker uses.
    fn prune_snapshots(&mut self) {
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
        let Ok(entries) = std::fs::read_dir(self.cfg.snapshot_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_snapshot = path.extension().is_some_and(|e| e == "so")
                && path.file_stem().is_some_and(|s| {
                    s.len() == 64 && s.to_string_lossy().bytes().all(|b| b.is_ascii_hexdigit())
                });
            if is_snapshot && !keep.contains(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::debug!(path = %path.display(), "pruned an old snapshot"),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot prune an old snapshot")
                    }
                }
            }
        }
    }

    /// Starts the next slot's candidate, or finishes the rollout when nothing is left.
    fn advance(&mut self) {
        let Some(r) = &mut self.rollout else { return };
        if r.candidate.is_some() {
            return;
        }
        let Some(slot) = r.pending.pop_front() else {
            if r.awaiting_ack.is_empty() {
                self.finish();
            }
            return;
        };
        let target = r.target.clone();
        match self.spawn(slot, target) {
            Ok(id) => {
                if let Some(r) = &mut self.rollout {
                    r.candidate = Some(id);
                }
            }
            Err(e) => self.fail_rollout(format!("cannot start a worker for slot {slot}: {e}")),
        }
    }

    fn finish(&mut self) {
        let Some(r) = self.rollout.take() else { return };
        let mut report = r.report;
        report.duration_ms = r.started.elapsed().as_millis() as u64;
        let outcome = match (r.kind, r.failure) {
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
                    ms = report.duration_ms,
                    "generation {} is serving",
                    r.target.number
                );
                self.history.push_back(r.target.clone());
                self.current = Some(r.target);
                self.prune_snapshots();
                Ok(())
            }
        };
        self.conclude(r.kind, report, r.replies, outcome);
    }

    /// Answers everyone waiting on a rollout, records it, and starts a queued reload.
    fn conclude(
        &mut self,
        kind: RolloutKind,
        report: ReloadReport,
        replies: Vec<Reply>,
        outcome: Result<(), String>,
    ) {
        if kind == RolloutKind::Start {
            match &outcome {
                Ok(()) => self.notify_started(&format!(
                    "serving http://{} with {} workers (generation {}, master pid {})",
                    self.cfg.listen,
                    self.cfg.workers,
                    report.generation,
                    std::process::id()
                )),
                Err(reason) => {
                    self.notify_started(&format!("error: {reason}"));
                    if self.fatal.is_none() {
                        self.fatal = Some(reason.clone());
                        self.request_stop(None);
                    }
                }
            }
        } else {
            self.last_reload = Some(report.clone());
        }
        if outcome.is_err() {
            self.last_refused_sha = report.sha256.clone();
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
        for reply in replies.into_iter().flatten() {
            let _ = reply.send(response.clone());
        }
        self.start_queued();
    }

    /// Requests queued during a rollout run next; consecutive ones of a kind share one rollout.
    fn start_queued(&mut self) {
        if self.stopping.is_none()
            && let Some(&(kind, _)) = self.queued.front()
        {
            let mut replies = Vec::new();
            while self.queued.front().is_some_and(|(k, _)| *k == kind) {
                replies.extend(self.queued.pop_front().map(|(_, r)| r));
            }
            self.begin(kind, replies);
        }
    }

    fn notify_started(&mut self, line: &str) {
        if let Some(mut f) = self.start_notify.take() {
            let _ = writeln!(f, "{line}");
        }
    }

    /// The candidate failed: kill it; revert the slots already moved, or give up.
    fn fail_rollout(&mut self, reason: String) {
        let Some(mut r) = self.rollout.take() else {
            return;
        };
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

    fn abort_rollout(&mut self, reason: &str) {
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
    fn generation_for_slot(&self, slot: u32) -> Option<Arc<Generation>> {
        match &self.rollout {
            Some(r) if r.done.contains(&slot) => Some(r.target.clone()),
            _ => self.current.clone(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // worker events

    fn on_ready(&mut self, id: WorkerId, plugin: PluginInfo, startup: StartupTimings) {
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
        if is_candidate {
            let old = self.serving[slot].replace(id);
            // A new generation in the slot is a fresh start: forget its crash history.
            self.health[slot] = SlotHealth::default();
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
                self.retire(old);
            }
            self.advance();
        } else if self.serving[slot].is_none() && self.stopping.is_none() {
            // A replacement after a crash.
            self.serving[slot] = Some(id);
            self.health[slot].respawn_at = None;
        } else {
            self.retire(id);
        }
    }

    fn on_start_failed(&mut self, id: WorkerId, reason: String) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.start_error = Some(reason.clone());
            if matches!(w.state, WorkerState::Starting { .. }) {
                self.start_failed(id, reason);
            }
        }
    }

    /// A starting worker will not become ready: kill it and fail whatever waited for it.
    fn start_failed(&mut self, id: WorkerId, reason: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let slot = w.slot;
        tracing::error!(
            pid = w.pid,
            slot,
            generation = w.generation.number,
            "worker failed to start: {reason}"
        );
        let reason = format!("{}: {reason}", self.plugin_label(&w.generation));
        self.kill_worker(id);
        if self
            .rollout
            .as_ref()
            .is_some_and(|r| r.candidate == Some(id))
        {
            self.fail_rollout(reason);
        } else if self.stopping.is_none() {
            self.slot_failed(slot, reason);
        }
    }

    fn on_drain_ack(&mut self, id: WorkerId) {
        if let Some(r) = &mut self.rollout
            && r.awaiting_ack.remove(&id)
        {
            self.advance();
        }
    }

    fn on_stats(&mut self, id: WorkerId, requests: u64, in_flight: u64) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.requests = requests;
            w.in_flight = in_flight;
        }
        self.forget_in_queries(id);
    }

    fn forget_in_queries(&mut self, id: WorkerId) {
        let mut i = 0;
        while i < self.queries.len() {
            self.queries[i].waiting.remove(&id);
            if self.queries[i].waiting.is_empty() {
                let q = self.queries.swap_remove(i);
                self.answer_status(q.reply);
            } else {
                i += 1;
            }
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: std::io::Result<ExitStatus>) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        let how = describe_exit(&status);
        let clean = status.as_ref().is_ok_and(|s| s.success());
        if let Some(r) = &mut self.rollout
            && r.awaiting_ack.remove(&id)
        {
            self.advance();
        }
        self.forget_in_queries(id);
        if self.serving[w.slot as usize] == Some(id) {
            self.serving[w.slot as usize] = None;
        }
        match w.state {
            WorkerState::Draining { .. } if clean => {
                tracing::info!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    "worker exited after draining"
                )
            }
            WorkerState::Draining { .. } | WorkerState::Killed => {
                tracing::info!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    "worker {how}"
                )
            }
            WorkerState::Starting { .. } => {
                let reason = w
                    .start_error
                    .clone()
                    .unwrap_or_else(|| format!("worker {how} during start"));
                // Put it back (already reaped: nothing to kill) so `start_failed` can find it.
                self.workers.insert(
                    id,
                    Worker {
                        state: WorkerState::Killed,
                        ..w
                    },
                );
                self.start_failed(id, reason);
                self.workers.remove(&id);
            }
            WorkerState::Ready => {
                tracing::error!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    "worker died: {how}"
                );
                if self.stopping.is_none() {
                    if w.ready_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
                        self.health[w.slot as usize].failures = 0;
                    }
                    let rollout_covers_slot = self.rollout.as_ref().is_some_and(|r| {
                        r.candidate
                            .and_then(|c| self.workers.get(&c))
                            .is_some_and(|c| c.slot == w.slot)
                    });
                    if !rollout_covers_slot {
                        self.slot_failed(w.slot, format!("worker {} {how}", w.pid));
                    }
                }
            }
        }
    }

    /// Schedules a replacement for `slot`, backing off exponentially on repeated failures.
    fn slot_failed(&mut self, slot: u32, reason: String) {
        let h = &mut self.health[slot as usize];
        h.failures += 1;
        h.last_error = Some(reason);
        let delay = backoff(h.failures);
        h.respawn_at = Some(Instant::now() + delay);
        if h.failures > 1 {
            tracing::warn!(slot, failures = h.failures, retry_in = %humantime::format_duration(delay), "slot is failing; backing off");
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let expired: Vec<(WorkerId, bool)> = self
            .workers
            .iter()
            .filter_map(|(id, w)| match w.state {
                WorkerState::Starting { deadline } if deadline <= now => Some((*id, true)),
                WorkerState::Draining { kill_at } if kill_at <= now => Some((*id, false)),
                _ => None,
            })
            .collect();
        for (id, starting) in expired {
            if starting {
                let t = humantime::format_duration(self.cfg.start_timeout);
                self.start_failed(
                    id,
                    format!("did not become ready within start_timeout ({t})"),
                );
            } else if let Some(w) = self.workers.get(&id) {
                tracing::warn!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    "worker still running {} after graceful_timeout; killing it",
                    humantime::format_duration(KILL_MARGIN)
                );
                self.kill_worker(id);
            }
        }
        for slot in 0..self.health.len() {
            let due = self.health[slot].respawn_at.is_some_and(|t| t <= now);
            if !due || self.stopping.is_some() {
                continue;
            }
            self.health[slot].respawn_at = None;
            let starting = self
                .workers
                .values()
                .any(|w| w.slot == slot as u32 && matches!(w.state, WorkerState::Starting { .. }));
            if self.serving[slot].is_some() || starting {
                continue;
            }
            if let Some(generation) = self.generation_for_slot(slot as u32) {
                tracing::info!(
                    slot,
                    generation = generation.number,
                    "starting a replacement worker"
                );
                if let Err(e) = self.spawn(slot as u32, generation) {
                    self.slot_failed(slot as u32, format!("cannot start a worker: {e}"));
                }
            }
        }
        let mut i = 0;
        while i < self.queries.len() {
            if self.queries[i].deadline <= now {
                let q = self.queries.swap_remove(i);
                self.answer_status(q.reply);
            } else {
                i += 1;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.state {
            WorkerState::Starting { deadline } => Some(deadline),
            WorkerState::Draining { kill_at } => Some(kill_at),
            _ => None,
        });
        let respawns = self.health.iter().filter_map(|h| h.respawn_at);
        let queries = self.queries.iter().map(|q| q.deadline);
        workers.chain(respawns).chain(queries).min()
    }

    fn finished(&mut self) -> Option<Result<(), String>> {
        if self.stopping.is_none() || !self.workers.is_empty() {
            return None;
        }
        for reply in self.stopping.take().into_iter().flatten().flatten() {
            let _ = reply.send(ControlResponse::Stopped {
                master_pid: std::process::id(),
            });
        }
        Some(match self.fatal.take() {
            Some(reason) => Err(reason),
            None => Ok(()),
        })
    }

    // -----------------------------------------------------------------------------------------
    // processes

    /// Tells a worker to leave: drain if it serves, kill if it never became ready.
    fn retire(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match w.state {
            WorkerState::Ready => {
                let _ = w.tx.send(MasterToWorker::Drain);
                w.state = WorkerState::Draining {
                    kill_at: Instant::now() + self.cfg.graceful_timeout + KILL_MARGIN,
                };
                tracing::debug!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    "told to drain"
                );
            }
            WorkerState::Starting { .. } => self.kill_worker(id),
            WorkerState::Draining { .. } | WorkerState::Killed => {}
        }
        if self.serving.get(self.workers[&id].slot as usize) == Some(&Some(id)) {
            let slot = self.workers[&id].slot as usize;
            self.serving[slot] = None;
        }
    }

    fn kill_worker(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get_mut(&id)
            && !matches!(w.state, WorkerState::Killed)
        {
            let _ = w.kill.send(());
            w.state = WorkerState::Killed;
        }
    }

    /// Starts a worker for `slot` running `generation`: exec this binary with the listener on
    /// fd 3 and a fresh channel on fd 4, then send it its spec.
    fn spawn(
        &mut self,
        slot: u32,
        generation: Arc<Generation>,
    ) -> Result<WorkerId, SpawnWorkerError> {
        let err = |source| SpawnWorkerError { slot, source };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(err)?;
        let listener = self.listener.try_clone().map_err(err)?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg0(std::env::args_os().next().unwrap_or_else(|| "host".into()))
            .arg("__worker")
            .args(["--slot", &slot.to_string()])
            .args(["--generation", &generation.number.to_string()])
            .args(["--master-pid", &std::process::id().to_string()])
            .args([
                "--spawned-at-ns",
                &crate::worker::monotonic_ns().to_string(),
            ])
            .stdin(std::process::Stdio::null());
        cmd.fd_mappings(vec![
            FdMapping {
                parent_fd: listener.into(),
                child_fd: fd::LISTENER_FD,
            },
            FdMapping {
                parent_fd: theirs.into(),
                child_fd: fd::CHANNEL_FD,
            },
        ])
        .map_err(|e| err(std::io::Error::other(e)))?;
        let mut child = tokio::process::Command::from(cmd).spawn().map_err(err)?;
        let pid = child.id().unwrap_or(0);

        let id = WorkerId(self.next_id);
        self.next_id += 1;

        ours.set_nonblocking(true).map_err(err)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(err)?;
        let (rd, wr) = stream.into_split();
        let (tx, mut orders) = mpsc::unbounded_channel::<MasterToWorker>();
        let events = self.events.clone();
        let (kill, mut kill_rx) = mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    Some(()) = kill_rx.recv() => {
                        let _ = child.start_kill();
                    }
                }
            };
            let _ = events.send(Event::Exited { id, status });
        });
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut rx = crate::protocol::Receiver::<_, WorkerToMaster>::new(rd);
            while let Ok(Some(msg)) = rx.recv().await {
                if events.send(Event::Worker { id, msg }).is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut sender = Sender::<_, MasterToWorker>::new(wr);
            while let Some(order) = orders.recv().await {
                if sender.send(&order).await.is_err() {
                    break;
                }
            }
        });

        let spec = WorkerSpec {
            slot,
            generation: generation.number,
            plugin: generation.snapshot.path.clone(),
            plugin_sha256: generation.snapshot.sha256.clone(),
            graceful_timeout_ms: self.cfg.graceful_timeout.as_millis() as u64,
            idle_grace_ms: self.cfg.idle_grace.as_millis() as u64,
            max_body_bytes: self.cfg.max_body_bytes,
            body_read_timeout_ms: self.cfg.body_read_timeout.as_millis() as u64,
            header_read_timeout_ms: self.cfg.header_read_timeout.as_millis() as u64,
            max_headers: self.cfg.max_headers,
            max_header_bytes: self.cfg.max_header_bytes,
        };
        let _ = tx.send(MasterToWorker::Start(spec));
        tracing::debug!(pid, slot, generation = generation.number, "worker spawned");
        self.workers.insert(
            id,
            Worker {
                slot,
                generation,
                pid,
                state: WorkerState::Starting {
                    deadline: Instant::now() + self.cfg.start_timeout,
                },
                tx,
                kill,
                plugin: None,
                requests: 0,
                in_flight: 0,
                ready_at: None,
                start_error: None,
                startup: None,
            },
        );
        Ok(id)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot spawn a worker for slot {slot}")]
pub(crate) struct SpawnWorkerError {
    slot: u32,
    #[source]
    source: std::io::Error,
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(6), Duration::from_millis(1600));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
