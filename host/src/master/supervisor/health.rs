//! Slot health: what happens when a worker dies, hangs or fails to start outside a rollout.
//! Decodes nothing itself (see [`describe_exit`](super::spawn::describe_exit)), records the
//! failure, refills the slot or backs it off, and starts a replacement when it is due. It never
//! moves a slot to another generation: a replacement runs the generation the slot should run.
//!
//! Two kinds of failure, two policies:
//! - A **start failure** (the worker never became ready: the build cannot start) backs the slot
//!   off exponentially (100 ms, 200 ms, ... 30 s): retrying a build that cannot start any faster
//!   only burns CPU.
//! - A **run-time crash** (a worker that became ready died, or hung and was killed) refills the
//!   slot at once: the generation starts fine, and a request that ends its process (or wedges
//!   it) must cost that worker, not the slot's capacity for the next 30 s. Guard: a generation
//!   that dies right after every ready would otherwise respawn as fast as it starts, so at most
//!   [`REFILL_BURST`] refills at once and then one per [`REFILL_EVERY`] are immediate; past that
//!   the slot is in a crash loop and backs off like a start failure, until a worker of it stays
//!   up for [`CRASH_LOOP_OVER_AFTER`].

use std::process::ExitStatus;
use std::time::Duration;

use tokio::time::Instant;

use super::spawn::describe_exit;
use super::{Supervisor, Worker, WorkerId, WorkerState};

#[derive(Default)]
pub(super) struct SlotHealth {
    /// Consecutive start failures, or crashes in a crash loop: what the backoff grows with.
    pub(super) failures: u32,
    pub(super) respawn_at: Option<Instant>,
    pub(super) last_error: Option<String>,
    /// Run-time crashes (ready workers that died or hung) since the master started.
    pub(super) crashes: u64,
    /// Its worker was killed as hung and no replacement is ready yet.
    pub(super) hung: bool,
    /// The immediate-refill budget, kept as the time it is whole again ("theoretical arrival
    /// time" of the generic cell rate algorithm): see [`SlotHealth::take_immediate_refill`].
    refill_full_at: Option<Instant>,
}

impl SlotHealth {
    /// A new generation took the slot: its failures are forgotten, its crash count is not.
    pub(super) fn fresh_start(&mut self) {
        *self = SlotHealth {
            crashes: self.crashes,
            ..SlotHealth::default()
        };
    }

    /// Whether a run-time crash at `now` may be refilled at once: at most [`REFILL_BURST`] in a
    /// row, then one per [`REFILL_EVERY`].
    ///
    /// Why these numbers: crashes caused by requests reach a slot about as often as such
    /// requests reach its worker (40 over 10 s across 4 workers is one a second per slot), and
    /// a burst of a few is refilled without delay. A generation that dies right after every
    /// ready reaches it once per start (10 to 50 ms here); it gets three quick restarts, then
    /// at most ten a second per slot, and the crash-loop backoff takes it below that.
    fn take_immediate_refill(&mut self, now: Instant) -> bool {
        let full_at = self.refill_full_at.map_or(now, |t| t.max(now)) + REFILL_EVERY;
        if full_at <= now + REFILL_EVERY * REFILL_BURST {
            self.refill_full_at = Some(full_at);
            true
        } else {
            false
        }
    }
}

/// Immediate refills of a slot's run-time crashes allowed in a row...
const REFILL_BURST: u32 = 3;
/// ...and how often one more is allowed after them.
const REFILL_EVERY: Duration = Duration::from_millis(100);
/// A worker that was ready this long when it crashed ends its slot's crash loop (and any
/// start-failure backoff count): the crash is treated as a run-time one again.
const CRASH_LOOP_OVER_AFTER: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How soon a replacement that found no free cell in the worker table looks again (a cell is
/// freed when a worker is reaped, normally within milliseconds of its kill).
const CELL_RETRY: Duration = Duration::from_millis(100);

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
        self.kill_worker_for(id, "start_failed");
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
        // Read before the cell is freed: what it was serving when it died, and its counters.
        let evidence = self.evidence_suffix(id);
        self.fold_metrics(id, &status);
        self.release_table_cell(id);
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.fx.reaped(id);
        let how = describe_exit(&status);
        let clean = status.as_ref().is_ok_and(|s| s.success());
        if let Some(r) = &mut self.rollout
            && r.awaiting_ack.remove(&id)
        {
            self.advance();
        }
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
            WorkerState::Hung => {
                // Its slot was refilled when it was found hung.
                tracing::info!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    "hung worker {how}"
                )
            }
            WorkerState::Draining { .. } | WorkerState::Killed => {
                tracing::info!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    "worker {how}{evidence}"
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
                self.note_crash(w.generation.number);
                let h = &mut self.health[w.slot as usize];
                h.crashes += 1;
                tracing::error!(
                    pid = w.pid,
                    slot = w.slot,
                    generation = w.generation.number,
                    slot_crashes = h.crashes,
                    "worker died: {how}{evidence}"
                );
                self.runtime_failure(&w, format!("worker {} {how}", w.pid));
            }
        }
        // Its cell (and its place among the leaving workers) is free: a rollout waiting for
        // room looks again.
        if self.room_wait.is_some() {
            self.advance();
        }
        // Last: a status query waiting for this worker may be answered now, and must see its
        // slot refilled, not half-way.
        self.forget_in_queries(id);
    }

    /// A ready worker sent nothing for `worker_timeout`: its I/O thread is stuck (a handler
    /// that never returns, a SIGSTOP, ...). Logs it with what it was doing, kills it, and
    /// refills its slot at once; `status` shows it (and its slot) as `hung` until the
    /// replacement is ready.
    pub(super) fn on_hung(&mut self, id: WorkerId, silent: Duration) {
        let evidence = self.evidence_suffix(id);
        // It accepts nothing any more: the others must not step aside for it. (The cell itself,
        // with its requests in flight, is freed when the worker is reaped.)
        self.stop_counting(id);
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        self.fx.kill(id);
        w.state = WorkerState::Hung;
        w.killed_for = Some("hung");
        self.metrics.count_kill("hung");
        let (slot, pid, generation, ready_at) = (w.slot, w.pid, w.generation.number, w.ready_at);
        self.note_crash(generation);
        let h = &mut self.health[slot as usize];
        h.crashes += 1;
        h.hung = true;
        let timeout = humantime::format_duration(self.cfg.worker_timeout);
        let silent_ms = silent.as_millis() as u64;
        tracing::error!(
            pid,
            slot,
            generation,
            slot_crashes = h.crashes,
            silent_ms,
            "worker hung: no heartbeat for {silent_ms} ms (worker_timeout {timeout}); killing it and starting a replacement{evidence}"
        );
        if self.serving[slot as usize] == Some(id) {
            self.serving[slot as usize] = None;
        }
        self.refill(
            slot,
            ready_at,
            format!("worker {pid} hung (no heartbeat for {timeout})"),
        );
    }

    /// A ready worker `w` is gone (died, or killed as hung): refill its slot.
    fn runtime_failure(&mut self, w: &Worker, reason: String) {
        self.refill(w.slot, w.ready_at, reason);
    }

    /// Refills `slot` after a run-time crash of a worker ready since `ready_at`: at once, unless
    /// the slot is in a crash loop (see the module doc); not while stopping, and not when a
    /// rollout is already starting a worker for the slot.
    fn refill(&mut self, slot: u32, ready_at: Option<Instant>, reason: String) {
        let rollout_covers_slot = self.rollout.as_ref().is_some_and(|r| {
            r.candidate
                .and_then(|c| self.workers.get(&c))
                .is_some_and(|c| c.slot == slot)
        });
        if self.stopping.is_some() || rollout_covers_slot {
            return;
        }
        let now = Instant::now();
        let h = &mut self.health[slot as usize];
        if ready_at.is_some_and(|t| now.saturating_duration_since(t) >= CRASH_LOOP_OVER_AFTER) {
            h.failures = 0;
        }
        if h.failures == 0 && h.take_immediate_refill(now) {
            h.last_error = Some(reason);
            h.respawn_at = Some(now);
            self.respawn_due(now);
            return;
        }
        self.slot_failed(
            slot,
            format!(
                "{reason} (crash loop: ready workers keep dying within {CRASH_LOOP_OVER_AFTER:?})"
            ),
        );
        let h = &mut self.health[slot as usize];
        h.respawn_at = h.respawn_at.map(|t| t.max(now + REFILL_EVERY));
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
            if self.worker_table.is_some() && self.free_table_cell().is_none() {
                // Every cell is held (by workers not reaped yet): look again shortly.
                static NO_CELL: crate::ratelimit::RateLimit =
                    crate::ratelimit::RateLimit::per_second();
                if let Some(suppressed) = NO_CELL.hit(&std::io::Error::other("no cell")) {
                    tracing::warn!(
                        slot,
                        suppressed,
                        "replacement waits: every cell of the worker table is held by a live worker"
                    );
                }
                self.metrics.count_limit("worker_table_full");
                self.health[slot].respawn_at = Some(now + CELL_RETRY);
                continue;
            }
            if let Some(generation) = self.generation_for_slot(slot as u32) {
                tracing::info!(
                    slot,
                    generation = generation.number,
                    "starting a replacement worker"
                );
                match self.spawn(slot as u32, generation) {
                    Ok(_) => self.metrics.count_start("replacement"),
                    Err(e) => self.slot_failed(slot as u32, format!("cannot start a worker: {e}")),
                }
            }
        }
    }

    /// Schedules a replacement for `slot`, backing off exponentially on repeated failures.
    pub(super) fn slot_failed(&mut self, slot: u32, reason: String) {
        let h = &mut self.health[slot as usize];
        h.failures += 1;
        h.hung = false;
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
    fn immediate_refills_come_in_a_burst_of_three_then_one_per_100ms() {
        let mut h = SlotHealth::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(h.take_immediate_refill(t0));
        assert!(h.take_immediate_refill(ms(1)));
        assert!(h.take_immediate_refill(ms(2)));
        assert!(
            !h.take_immediate_refill(ms(3)),
            "a fourth at once is a crash loop"
        );
        assert!(!h.take_immediate_refill(ms(50)));
        assert!(h.take_immediate_refill(ms(100)), "one more per 100 ms");
        assert!(!h.take_immediate_refill(ms(150)));
        assert!(h.take_immediate_refill(ms(200)));
        // Crashes a second apart (a request storm spread over the slots) never run out.
        let mut h = SlotHealth::default();
        for s in 0..100 {
            assert!(h.take_immediate_refill(ms(s * 1000)));
        }
        // Nor do two crashes 10 ms apart every 250 ms.
        let mut h = SlotHealth::default();
        for s in 0..100 {
            assert!(h.take_immediate_refill(ms(s * 250)));
            assert!(h.take_immediate_refill(ms(s * 250 + 10)));
        }
    }

    #[test]
    fn a_fresh_start_keeps_the_crash_count() {
        let mut h = SlotHealth {
            failures: 4,
            crashes: 7,
            hung: true,
            ..SlotHealth::default()
        };
        h.fresh_start();
        assert_eq!((h.failures, h.crashes, h.hung), (0, 7, false));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(6), Duration::from_millis(1600));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
