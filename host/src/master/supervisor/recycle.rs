//! Recycling: replacing one worker by a fresh process of the same build, new before old, when it
//! served `max_requests` (plus its jitter), when its resident set grew past `max_worker_rss`, or
//! when its plugin called `restart_worker()`. Plugins are never unloaded, so a new process is the
//! only way leaked memory or poisoned state goes away.
//!
//! A recycle is a one-slot rollout ([`RolloutKind::Recycle`]) onto the generation the worker
//! runs: no snapshot, no new generation number, and the same advance/finish path as a reload
//! (spawn a candidate, wait for its `Ready`, drain the old worker), so no request fails. Requests
//! that arrive during another rollout are remembered per slot and run after it (queued reloads
//! first); a worker asks at most once; a slot whose worker a reload replaced meanwhile is skipped.
//! If the replacement fails to start, the old worker keeps serving and is tried again later. A
//! worker over `max_worker_rss`, or whose plugin asked, is replaced no sooner than
//! [`MIN_LIFETIME`] after it became ready.
//!
//! It reads workers' RSS on a timer of the master's loop (a deadline, not a thread). It never
//! takes snapshots, never changes generations and never decides on crash backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::{Rollout, RolloutKind, Supervisor, WorkerId, WorkerState, unix_now};
use crate::protocol::ReloadReport;

/// How often the master reads ready workers' RSS when `max_worker_rss` is set.
const RSS_CHECK_EVERY: Duration = Duration::from_millis(500);
/// After a replacement failed to start, the worker's recycle is tried again this much later.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A worker found over `max_worker_rss`, or whose plugin asked, is replaced at the earliest this
/// long after it became ready: a build over the limit from the start, or a plugin that asks at
/// once, cannot make its slot churn. (`max_requests` is not delayed: it counts requests.)
const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// The recycling state of the supervisor.
pub(super) struct Recycling {
    /// Workers to be recycled, with why; at most one entry per worker (duplicates coalesce).
    requested: HashMap<WorkerId, Requested>,
    /// Slots waiting for their recycle, in order, each at most once.
    queue: VecDeque<u32>,
    /// The recycle under way: which worker (pid, slot) and why.
    current: Option<(WorkerId, u32, u32, String)>,
    /// Recycles done, per slot (shown by `status`).
    pub(super) done: Vec<u64>,
    /// When the RSS of ready workers is read next (`None`: `max_worker_rss` is off).
    next_check: Option<Instant>,
}

struct Requested {
    reason: String,
    /// When to queue it (`None`: queued, or under way): after a failed attempt, or while the
    /// worker is younger than [`MIN_LIFETIME`].
    retry_at: Option<Instant>,
}

impl Recycling {
    pub(super) fn new(slots: usize, check_rss: bool) -> Recycling {
        Recycling {
            requested: HashMap::new(),
            queue: VecDeque::new(),
            current: None,
            done: vec![0; slots],
            next_check: check_rss.then(|| Instant::now() + RSS_CHECK_EVERY),
        }
    }

    /// The next RSS check or retry.
    pub(super) fn deadline(&self) -> Option<Instant> {
        let retries = self.requested.values().filter_map(|r| r.retry_at);
        retries.chain(self.next_check).min()
    }
}

/// This worker's share of `max_requests_jitter`: a number in `0..=jitter`, from its pid and the
/// clock (workers started together get different limits; no need for a random number crate).
pub(super) fn jitter(jitter: u64, pid: u32) -> u64 {
    if jitter == 0 {
        return 0;
    }
    // splitmix64
    let mut z = ((u64::from(pid) << 32) ^ crate::worker::monotonic_ns())
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z % (jitter + 1)
}

/// "81 MiB", or bytes below a MiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

impl Supervisor {
    /// A worker asked to be replaced (`RecycleMe`), or the RSS check found it over the limit
    /// (`throttle`: those wait until the worker is [`MIN_LIFETIME`] old).
    pub(super) fn request_recycle(&mut self, id: WorkerId, reason: String, throttle: bool) {
        if self.stopping.is_some() || self.recycling.requested.contains_key(&id) {
            return;
        }
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let slot = w.slot;
        let serves = self.serving.get(slot as usize) == Some(&Some(id));
        if !matches!(w.state, WorkerState::Ready) || !serves {
            // Already on its way out: draining, or replaced by a reload.
            return;
        }
        tracing::debug!(pid = w.pid, slot, "recycle requested: {reason}");
        let not_before = w
            .ready_at
            .map(|t| t + MIN_LIFETIME)
            .filter(|t| throttle && *t > Instant::now());
        self.recycling.requested.insert(
            id,
            Requested {
                reason,
                retry_at: not_before,
            },
        );
        if not_before.is_some() {
            // Queued by the timer once it is old enough.
            return;
        }
        if !self.recycling.queue.contains(&slot) {
            self.recycling.queue.push_back(slot);
        }
        if self.rollout.is_none() && self.snapshotting.is_none() {
            self.start_queued();
        }
    }

    /// Starts the next queued recycle whose worker still serves its slot and still needs it.
    /// Called when no rollout runs and no reload is queued.
    pub(super) fn next_recycle(&mut self) {
        while let Some(slot) = self.recycling.queue.pop_front() {
            let Some(id) = self.serving.get(slot as usize).copied().flatten() else {
                continue;
            };
            let Some(req) = self.recycling.requested.get(&id) else {
                continue;
            };
            if req.retry_at.is_some() {
                continue;
            }
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            let target = w.generation.clone();
            tracing::debug!(pid = w.pid, slot, "recycling: starting a replacement");
            self.recycling.current = Some((id, w.pid, slot, req.reason.clone()));
            let report = ReloadReport {
                ok: false,
                generation: target.number,
                serving_generation: target.number,
                plugin_path: self.cfg.plugin.clone(),
                sha256: Some(target.snapshot.sha256.clone()),
                config_sha256: Some(target.config.sha256.clone()),
                ignored_keys: Vec::new(),
                error: None,
                started_at: unix_now(),
                duration_ms: 0,
                started_pids: Vec::new(),
                drained_pids: Vec::new(),
                kind: RolloutKind::Recycle.name().to_string(),
                verdict: None,
            };
            self.rollout = Some(Rollout {
                kind: RolloutKind::Recycle,
                target,
                pending: VecDeque::from([slot]),
                done: Vec::new(),
                candidate: None,
                awaiting_ack: HashSet::new(),
                replies: Vec::new(),
                report,
                started: Instant::now(),
                failure: None,
                canary: None,
            });
            self.advance();
            return;
        }
    }

    /// A recycle rollout ended (done, failed or interrupted): one log line, and a later retry
    /// if the replacement could not start.
    pub(super) fn recycle_concluded(&mut self, report: &ReloadReport, outcome: Result<(), String>) {
        let Some((id, pid, slot, reason)) = self.recycling.current.take() else {
            return;
        };
        match outcome {
            Ok(()) => {
                self.recycling.requested.remove(&id);
                if let Some(n) = self.recycling.done.get_mut(slot as usize) {
                    *n += 1;
                }
                let new_pid = report.started_pids.first().copied().unwrap_or(0);
                tracing::info!(
                    slot,
                    pid,
                    new_pid,
                    ms = report.duration_ms,
                    "recycled worker {pid} of slot {slot}: {reason}"
                );
            }
            Err(e) if self.stopping.is_some() => {
                tracing::info!(
                    slot,
                    pid,
                    "recycling worker {pid} of slot {slot} stopped: {e}"
                );
            }
            Err(e) => {
                if let Some(r) = self.recycling.requested.get_mut(&id) {
                    r.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
                tracing::warn!(
                    slot,
                    pid,
                    "recycling worker {pid} of slot {slot} ({reason}) failed: {e}; it keeps serving, next try in {}",
                    humantime::format_duration(RETRY_AFTER)
                );
                // The old worker died meanwhile (its slot was left to the replacement): the
                // slot's crash handling takes over.
                let empty = self.serving.get(slot as usize) == Some(&None);
                if empty && self.stopping.is_none() && !self.workers.contains_key(&id) {
                    self.slot_failed(slot, e);
                }
            }
        }
    }

    /// Timer: retries that are due, and the RSS check.
    pub(super) fn recycle_timer(&mut self, now: Instant) {
        let workers = &self.workers;
        self.recycling
            .requested
            .retain(|id, _| workers.contains_key(id));
        if self.stopping.is_some() {
            self.recycling.next_check = None;
            return;
        }
        let mut due = Vec::new();
        for (id, r) in &mut self.recycling.requested {
            if r.retry_at.is_some_and(|t| t <= now) {
                r.retry_at = None;
                due.push(self.workers[id].slot);
            }
        }
        for slot in due {
            if !self.recycling.queue.contains(&slot) {
                self.recycling.queue.push_back(slot);
            }
        }
        if let Some(limit) = self.cfg.max_worker_rss
            && self.recycling.next_check.is_some_and(|t| t <= now)
        {
            self.recycling.next_check = Some(now + RSS_CHECK_EVERY);
            let over: Vec<(WorkerId, u64)> = self
                .serving
                .iter()
                .flatten()
                .filter(|id| !self.recycling.requested.contains_key(*id))
                .filter_map(|id| {
                    let w = self.workers.get(id)?;
                    let rss = self.fx.rss_bytes(w.pid);
                    (matches!(w.state, WorkerState::Ready) && rss > limit).then_some((*id, rss))
                })
                .collect();
            for (id, rss) in over {
                let reason = format!("RSS {} over max_worker_rss {}", size(rss), size(limit));
                self.request_recycle(id, reason, true);
            }
        }
        if !self.recycling.queue.is_empty() && self.rollout.is_none() && self.snapshotting.is_none()
        {
            self.start_queued();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range() {
        assert_eq!(jitter(0, 42), 0);
        for pid in 0..2000 {
            assert!(jitter(12, pid) <= 12);
        }
        let seen: HashSet<u64> = (0..2000).map(|pid| jitter(3, pid)).collect();
        assert_eq!(seen.len(), 4, "every value of 0..=3 turns up: {seen:?}");
    }

    #[test]
    fn sizes_read_in_mib() {
        assert_eq!(size(81 << 20), "81 MiB");
        assert_eq!(size(1000), "1000 bytes");
    }
}
