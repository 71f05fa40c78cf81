//! Worker processes: exec this binary as a worker with the listener and a fresh channel, wire
//! its messages and exit into [`Event`]s, tell it to drain, kill it. It never decides *when*
//! a worker starts or leaves (the rollout and health code do) and never waits on a process:
//! each child is owned and reaped by its own task.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Event, Generation, Supervisor, Worker, WorkerId, WorkerState};
use crate::fd;
use crate::protocol::{MasterToWorker, Sender, WorkerToMaster};

/// glibc malloc's tunables for workers, unless the master's environment has its own
/// `GLIBC_TUNABLES` (then the workers inherit that). By default each thread keeps 7 freed chunks
/// of each size; a request through the plugin frees more than that of a few sizes (its header
/// map, each header value, on both sides of the ABI, which share the one malloc), and the surplus
/// goes to lists that the next large allocation consolidates. Keeping 64 cut the CPU per request
/// by 5-7% for a browser's request (ten headers) and 1-2% for wrk's, and worker RSS after load
/// grew by about 0.1 MiB (measured in `bench`'s way, side by side). Other C libraries ignore it.
pub(crate) const WORKER_MALLOC_TUNABLES: &str = "glibc.malloc.tcache_count=64";

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
            let _ = w.kill.send(());
            w.state = WorkerState::Killed;
            w.killed_for = Some(cause);
            self.metrics.count_kill(cause);
        }
    }

    /// Starts a worker for `slot` running `generation`: exec this binary with the listener on
    /// fd 3 and a fresh channel on fd 4, then send it its spec.
    pub(super) fn spawn(
        &mut self,
        slot: u32,
        generation: Arc<Generation>,
    ) -> Result<WorkerId, SpawnWorkerError> {
        let err = |source| SpawnWorkerError { slot, source };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(err)?;
        let listener = self.listener.try_clone().map_err(err)?;
        let accept_cell = self.free_accept_cell();
        if accept_cell.is_none() && self.accept_table.is_some() {
            // Never a worker whose requests go uncounted: the callers wait for a cell first.
            return Err(err(std::io::Error::other(
                "no free cell in the worker table",
            )));
        }
        if let (Some(cell), Some((table, _))) = (accept_cell, &self.accept_table) {
            table.reset(cell as usize);
        }
        let table_fd = match (&self.accept_table, accept_cell) {
            (Some((_, fd)), Some(_)) => Some(fd.try_clone().map_err(err)?),
            _ => None,
        };
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg0(std::env::args_os().next().unwrap_or_else(|| "host".into()))
            .arg("__worker")
            .args(["--slot", &slot.to_string()])
            .args(["--generation", &generation.number.to_string()])
            .args(["--master-pid", &std::process::id().to_string()])
            // The worker logs before its spec arrives: its format comes on the command line.
            .args(["--log-format", self.cfg.log_format.name()])
            .args([
                "--spawned-at-ns",
                &crate::worker::monotonic_ns().to_string(),
            ])
            .stdin(std::process::Stdio::null());
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            cmd.env("GLIBC_TUNABLES", WORKER_MALLOC_TUNABLES);
        }
        if self.cfg.explicit_group {
            cmd.env(crate::logging::GROUP_ENV, &self.cfg.group);
        }
        for var in crate::master::systemd::MASTER_ONLY_ENV.iter().chain(&[
            crate::master::upgrade::FROM_ENV,
            crate::master::upgrade::GROUPS_ENV,
            crate::START_NOTIFY_ENV,
        ]) {
            cmd.env_remove(var);
        }
        cmd.fd_mappings(
            vec![
                FdMapping {
                    parent_fd: listener.into(),
                    child_fd: fd::LISTENER_FD,
                },
                FdMapping {
                    parent_fd: theirs.into(),
                    child_fd: fd::CHANNEL_FD,
                },
            ]
            .into_iter()
            .chain(table_fd.map(|fd| FdMapping {
                parent_fd: fd,
                child_fd: crate::accept_table::TABLE_FD,
            }))
            .collect(),
        )
        .map_err(|e| err(std::io::Error::other(e)))?;
        let mut child = tokio::process::Command::from(cmd).spawn().map_err(err)?;
        let pid = child.id().unwrap_or(0);
        crate::master::orphans::own(pid);

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
                    status = child.wait() => {
                        crate::master::orphans::disown(pid);
                        break status;
                    }
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
            accept_cell,
            accept_cells: self
                .accept_table
                .as_ref()
                .map_or(0, |(t, _)| t.len() as u32),
            max_requests,
            max_requests_jitter,
        });
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
                connections: 0,
                ready_at: None,
                start_error: None,
                startup: None,
                accept_cell,
                last_heard: Instant::now(),
                leaving: None,
                killed_for: None,
            },
        );
        Ok(id)
    }

    /// The lowest accept-table cell no live worker holds.
    pub(super) fn free_accept_cell(&self) -> Option<u32> {
        let (table, _) = self.accept_table.as_ref()?;
        let used: std::collections::HashSet<u32> = self
            .workers
            .values()
            .filter_map(|w| w.accept_cell)
            .collect();
        (0..table.len() as u32).find(|c| !used.contains(c))
    }

    /// A worker acknowledged a drain: it no longer accepts, so its count is out of the balance
    /// (it clears it itself; this covers a worker too wedged to). Its cell stays its own: its
    /// requests in flight are still recorded there.
    pub(super) fn stop_counting(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get(&id)
            && let Some(cell) = w.accept_cell
            && let Some((table, _)) = &self.accept_table
        {
            table.clear(cell as usize);
        }
    }

    /// A worker is gone: its cell is free for the next one.
    pub(super) fn release_accept_cell(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get_mut(&id)
            && let Some(cell) = w.accept_cell.take()
            && let Some((table, _)) = &self.accept_table
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
