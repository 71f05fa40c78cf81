//! Slot health: what happens when a worker dies or fails to start outside a rollout. Decodes
//! nothing itself (see [`describe_exit`](super::spawn::describe_exit)), records the failure,
//! backs the slot off exponentially and starts a replacement when the backoff runs out. It never
//! moves a slot to another generation: a replacement runs the generation the slot should run.

use std::process::ExitStatus;
use std::time::Duration;

use tokio::time::Instant;

use super::spawn::describe_exit;
use super::{Supervisor, Worker, WorkerId, WorkerState};

#[derive(Default)]
pub(super) struct SlotHealth {
    pub(super) failures: u32,
    pub(super) respawn_at: Option<Instant>,
    pub(super) last_error: Option<String>,
}

/// A worker that served this long before dying resets its slot's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(100) * 2u32.saturating_pow(n.min(20) - 2)).min(BACKOFF_MAX),
    }
}

impl Supervisor {
    pub(super) fn on_start_failed(&mut self, id: WorkerId, reason: String) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.start_error = Some(reason.clone());
            if matches!(w.state, WorkerState::Starting { .. }) {
                self.start_failed(id, reason);
            }
        }
    }

    /// A starting worker will not become ready: kill it and fail whatever waited for it.
    pub(super) fn start_failed(&mut self, id: WorkerId, reason: String) {
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

    pub(super) fn on_exit(&mut self, id: WorkerId, status: std::io::Result<ExitStatus>) {
        // Read before the cell is freed: what it was serving when it died.
        let evidence = self.in_flight_evidence(id);
        self.release_accept_cell(id);
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
                    "worker {how}; {evidence}"
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
                    "worker died: {how}; {evidence}"
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

    /// Starts a replacement in every slot whose backoff ran out and that has no worker.
    pub(super) fn respawn_due(&mut self, now: Instant) {
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
    }

    /// Schedules a replacement for `slot`, backing off exponentially on repeated failures.
    pub(super) fn slot_failed(&mut self, slot: u32, reason: String) {
        let h = &mut self.health[slot as usize];
        h.failures += 1;
        h.last_error = Some(reason);
        let delay = backoff(h.failures);
        h.respawn_at = Some(Instant::now() + delay);
        if h.failures > 1 {
            tracing::warn!(slot, failures = h.failures, retry_in = %humantime::format_duration(delay), "slot is failing; backing off");
        }
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
