//! Worker processes as the supervisor keeps them: start one in a free cell of the worker table
//! with its spec, tell it to drain, kill it, and the cells' bookkeeping. The process itself
//! (exec, its channel, reaping) is [`Effects`](super::Effects)'; this never execs or waits on
//! a process, and never decides *when* a worker starts or leaves (the rollout and health code
//! do).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::{Generation, Supervisor, Worker, WorkerId, WorkerLaunch, WorkerState};
use crate::protocol::MasterToWorker;

/// How long past `graceful_timeout` a draining worker may take to exit on its own before SIGKILL.
pub(super) const KILL_MARGIN: Duration = Duration::from_secs(2);

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

impl Supervisor {
    /// Tells a worker to leave (`why`: a rollout's kind, `stop`, ...): drain if it serves, kill
    /// if it never became ready.
    pub(super) fn retire(&mut self, id: WorkerId, why: &'static str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.leaving = w.leaving.or(Some(why));
        match w.state {
            WorkerState::Ready => {
                self.fx.send(id, MasterToWorker::Drain);
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
            WorkerState::Draining { .. } | WorkerState::Hung | WorkerState::Killed => {}
        }
        if self.serving.get(self.workers[&id].slot as usize) == Some(&Some(id)) {
            let slot = self.workers[&id].slot as usize;
            self.serving[slot] = None;
        }
    }

    /// Kills a worker that is not wanted any more (a candidate whose rollout ended).
    pub(super) fn kill_worker(&mut self, id: WorkerId) {
        self.kill_worker_for(id, "aborted");
    }

    /// SIGKILLs a worker, once; `cause` is one of `metrics::KILL_CAUSES`.
    pub(super) fn kill_worker_for(&mut self, id: WorkerId, cause: &'static str) {
        if let Some(w) = self.workers.get_mut(&id)
            && !matches!(w.state, WorkerState::Killed | WorkerState::Hung)
        {
            self.fx.kill(id);
            w.state = WorkerState::Killed;
            w.killed_for = Some(cause);
            self.metrics.count_kill(cause);
        }
    }

    /// Starts a worker for `slot` running `generation` in a free cell of the worker table
    /// (through [`Effects::spawn_worker`](super::Effects::spawn_worker): this binary with the
    /// listener and a fresh channel), then sends it its spec.
    pub(super) fn spawn(
        &mut self,
        slot: u32,
        generation: Arc<Generation>,
    ) -> Result<WorkerId, SpawnWorkerError> {
        let err = |source| SpawnWorkerError { slot, source };
        let table_cell = self.free_table_cell();
        if table_cell.is_none() && self.worker_table.is_some() {
            // Never a worker whose requests go uncounted: the callers wait for a cell first.
            return Err(err(std::io::Error::other(
                "no free cell in the worker table",
            )));
        }
        if let (Some(cell), Some((table, _))) = (table_cell, &self.worker_table) {
            table.reset(cell as usize);
        }
        let table = match (&self.worker_table, table_cell) {
            (Some((_, fd)), Some(_)) => Some(fd),
            _ => None,
        };
        let id = WorkerId(self.next_id);
        let pid = self
            .fx
            .spawn_worker(WorkerLaunch {
                id,
                slot,
                generation: generation.number,
                listener: &self.listener,
                table,
            })
            .map_err(err)?;
        self.next_id += 1;

        // Recycling: this worker's request limit, `max_requests` plus its own jitter.
        let (max_requests, max_requests_jitter) = match self.cfg.max_requests {
            0 => (0, 0),
            n => {
                let j = super::recycle::jitter(self.cfg.max_requests_jitter, pid);
                (n + j, j)
            }
        };
        let spec = self.cfg.worker_spec(crate::config::WorkerStart {
            slot,
            generation: generation.number,
            plugin: generation.snapshot.path.clone(),
            plugin_sha256: generation.snapshot.sha256.clone(),
            plugin_config: &generation.config,
            table_cell,
            table_cells: self
                .worker_table
                .as_ref()
                .map_or(0, |(t, _)| t.len() as u32),
            max_requests,
            max_requests_jitter,
        });
        self.fx.send(id, MasterToWorker::Start(spec));
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
                plugin: None,
                requests: 0,
                in_flight: 0,
                connections: 0,
                gateway: None,
                ready_at: None,
                start_error: None,
                startup: None,
                table_cell,
                last_heard: Instant::now(),
                leaving: None,
                killed_for: None,
            },
        );
        Ok(id)
    }

    /// The lowest accept-table cell no live worker holds.
    pub(super) fn free_table_cell(&self) -> Option<u32> {
        let (table, _) = self.worker_table.as_ref()?;
        let used: std::collections::HashSet<u32> =
            self.workers.values().filter_map(|w| w.table_cell).collect();
        (0..table.len() as u32).find(|c| !used.contains(c))
    }

    /// A worker acknowledged a drain: it no longer accepts, so its count is out of the balance
    /// (it clears it itself; this covers a worker too wedged to). Its cell stays its own: its
    /// requests in flight are still recorded there.
    pub(super) fn stop_counting(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get(&id)
            && let Some(cell) = w.table_cell
            && let Some((table, _)) = &self.worker_table
        {
            table.clear(cell as usize);
        }
    }

    /// A worker is gone: its cell is free for the next one.
    pub(super) fn release_table_cell(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get_mut(&id)
            && let Some(cell) = w.table_cell.take()
            && let Some((table, _)) = &self.worker_table
        {
            table.reset(cell as usize);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot spawn a worker for slot {slot}")]
pub(crate) struct SpawnWorkerError {
    slot: u32,
    #[source]
    source: std::io::Error,
}
