//! `host status`: asks every live worker for its counters, waits for them (bounded by
//! `STATS_WAIT`) and answers with the master's view of workers, slots and the last reload. It
//! never changes a worker or a slot; a worker that does not answer in time is reported with the
//! counters it sent last. The report is built from the `host-status` crate's types (re-exported
//! by `protocol`), the one definition of what `status --json` prints.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Supervisor, WorkerId, WorkerState};
use crate::protocol::{
    ControlResponse, GenerationStatus, MasterToWorker, SlotStatus, StatusReport, WorkerStatus,
};

pub(super) struct StatusQuery {
    reply: oneshot::Sender<ControlResponse>,
    waiting: HashSet<WorkerId>,
    pub(super) deadline: Instant,
}

/// How long a status query waits for workers' counters.
const STATS_WAIT: Duration = Duration::from_millis(300);

impl Supervisor {
    pub(super) fn request_status(&mut self, reply: oneshot::Sender<ControlResponse>) {
        let mut waiting = HashSet::new();
        for (id, w) in &self.workers {
            if matches!(w.state, WorkerState::Ready | WorkerState::Draining { .. })
                && self.fx.send(*id, MasterToWorker::QueryStats)
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

    pub(super) fn answer_status(&self, reply: oneshot::Sender<ControlResponse>) {
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
                    connections: w.connections,
                    rss_bytes: self.fx.rss_bytes(w.pid),
                    plugin: w.plugin.clone(),
                    config_sha256: w.generation.config.sha256.clone(),
                    startup_us: w.startup.clone(),
                    gateway: w.gateway.clone(),
                })
            })
            .collect::<Vec<_>>();
        // A gateway group's figures: its live processes' added up.
        let gateway = self.cfg.gateway.as_ref().map(|_| {
            let mut sum = crate::protocol::GatewayStatus::default();
            for g in workers.iter().filter_map(|w| w.gateway.as_ref()) {
                sum.add(g);
            }
            sum
        });
        let report = StatusReport {
            master_pid: std::process::id(),
            master_rss_bytes: self.fx.rss_bytes(std::process::id()),
            listen: self.cfg.listen.to_string(),
            admin_listen: self.cfg.admin_listen.map(|a| a.to_string()),
            generation: self.current.as_ref().map_or(0, |g| g.number),
            workers,
            slots: self.slot_statuses(),
            last_reload: self.last_reload.clone(),
            last_build: self.last_build.clone(),
            generations: self
                .history
                .iter()
                .map(|g| GenerationStatus {
                    generation: g.number,
                    sha256: g.snapshot.sha256.clone(),
                    config_sha256: g.config.sha256.clone(),
                })
                .collect(),
            version: crate::worker::HOST_VERSION.to_string(),
            build: crate::worker::HOST_BUILD.to_string(),
            listener: self.listener_status(),
            canary: self.canary_status(),
            last_verdict: self.last_verdict.clone(),
            group: self.cfg.group.clone(),
            reloadable: self.cfg.reloadable,
            rolling_out: self.rollout.is_some() || self.snapshotting.is_some(),
            gateway,
            groups: Vec::new(),
        };
        let _ = reply.send(ControlResponse::Status(Box::new(report)));
    }

    pub(super) fn slot_statuses(&self) -> Vec<SlotStatus> {
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
                    (None, _) if h.hung => "hung",
                    (None, true) if h.failures == 0 => "starting",
                    _ => "failing",
                };
                SlotStatus {
                    slot: slot as u32,
                    pid,
                    state: state.to_string(),
                    failures: h.failures,
                    crashes: h.crashes,
                    last_error: h.last_error.clone(),
                    retry_in_ms: h
                        .respawn_at
                        .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                    recycles: self.recycling.done.get(slot).copied().unwrap_or(0),
                }
            })
            .collect()
    }

    pub(super) fn on_stats(
        &mut self,
        id: WorkerId,
        requests: u64,
        in_flight: u64,
        connections: u64,
    ) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.requests = requests;
            w.in_flight = in_flight;
            w.connections = connections;
        }
        self.forget_in_queries(id);
    }

    pub(super) fn forget_in_queries(&mut self, id: WorkerId) {
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

    /// Answers, with what they have, the status queries whose workers did not all report in time.
    pub(super) fn answer_overdue_queries(&mut self, now: Instant) {
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
}
