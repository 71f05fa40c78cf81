//! Progressive delivery: a new generation judged on live traffic. A reload with a canary stops
//! after its first `canary_workers` new workers; they serve beside the old generation for
//! `canary_analysis` while this module compares the two over the same window: share of `5xx`
//! answers (requests lost in a crash count as failed), p99 latency, handler panics caught at
//! the plugin boundary, and crashes or hangs. Worse past the thresholds: the rollout fails
//! with the figures, and the existing revert moves the canary's slots back, new before old.
//! Held to the end: promoted, the rollout goes on to every worker. After a full rollout the
//! new generation is judged for `canary_watch` more against the old generation's analysis
//! figures; failing then, it is rolled back (a `rollback` rollout) the same way.
//!
//! Owns the judging window (the counters at its start, the crashes seen in it), the verdict
//! rules ([`judge`], a pure function) and `promote`/`abort`. The figures come from the
//! generations' counters in the worker table (see `metrics`); it never reads a worker's
//! memory itself, never spawns or signals a process (a verdict calls the rollout's own
//! `fail_rollout`, `advance` or `request_rollout`), and never blocks: a check reads memory
//! only, every [`CHECK_EVERY`].

use std::time::Duration;

use tokio::time::Instant;

use super::{Reply, RolloutKind, Supervisor, short, unix_now};
use crate::config::CanaryConfig;
use crate::counters::{BUCKETS_US, Totals};
use crate::protocol::{CanaryFigures, CanaryStatus, CanaryVerdict, ControlResponse};

/// How often the figures are read during a window.
pub(super) const CHECK_EVERY: Duration = Duration::from_millis(200);

/// A rollout's canary: how many new workers wait for the verdict, and for how long.
#[derive(Clone, Copy, Debug)]
pub(super) struct CanaryPlan {
    pub workers: usize,
    pub analysis: Duration,
    /// The verdict was given (or the analysis skipped): the rollout goes on to every slot.
    pub promoted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// The canary serves beside the old generation; the rollout waits.
    Analysis,
    /// Every slot runs the new generation; it is still judged.
    Watch,
}

/// A judging window.
pub(super) struct Judging {
    pub phase: Phase,
    pub generation: u64,
    pub baseline: u64,
    started: Instant,
    until: Instant,
    next_check: Instant,
    /// The generations' counters when the window began.
    canary_at_start: Totals,
    baseline_at_start: Totals,
    canary_crashes: u64,
    baseline_crashes: u64,
    /// During the watch period: the old generation's figures over the analysis window.
    baseline_fixed: Option<CanaryFigures>,
}

/// The 99th percentile of a latency histogram (counts per bucket, not cumulative), as the
/// upper bound of its bucket in ms; the last bucket (`+Inf`) reads as its lower bound.
pub(super) fn p99_ms(latency: &[u64]) -> Option<f64> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket holding at least 99% of the answers.
    let rank = total - total / 100;
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let us = BUCKETS_US
                .get(i)
                .or(BUCKETS_US.last())
                .copied()
                .unwrap_or(0);
            return Some(us as f64 / 1000.0);
        }
    }
    None
}

/// A generation's figures: the counters now minus those at the window's start.
fn figures(
    generation: u64,
    workers: u32,
    now: &Totals,
    start: &Totals,
    crashes: u64,
) -> CanaryFigures {
    let d = |a: u64, b: u64| a.wrapping_sub(b);
    let latency: Vec<u64> = now
        .latency
        .iter()
        .zip(&start.latency)
        .map(|(a, b)| d(*a, *b))
        .collect();
    let answered: u64 = (0..now.by_class.len())
        .map(|i| d(now.by_class[i], start.by_class[i]))
        .sum();
    let lost = d(now.lost, start.lost);
    let requests = answered + lost;
    let errors = d(now.by_class[4], start.by_class[4]) + lost;
    CanaryFigures {
        generation,
        workers,
        requests,
        errors,
        error_share: if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        },
        p99_ms: p99_ms(&latency),
        panics: d(now.panics, start.panics),
        crashes,
    }
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// One line with both generations' figures, for the log, `reload` and `status`.
pub(super) fn describe(canary: &CanaryFigures, baseline: &CanaryFigures) -> String {
    let p99 = |f: &CanaryFigures| f.p99_ms.map_or("-".into(), |ms| format!("{ms} ms"));
    format!(
        "generation {}: {} requests, 5xx {} ({}), p99 {}, {} panics, {} crashes; generation {}: {} requests, 5xx {} ({}), p99 {}, {} panics, {} crashes",
        canary.generation,
        canary.requests,
        percent(canary.error_share),
        canary.errors,
        p99(canary),
        canary.panics,
        canary.crashes,
        baseline.generation,
        baseline.requests,
        percent(baseline.error_share),
        baseline.errors,
        p99(baseline),
        baseline.panics,
        baseline.crashes,
    )
}

/// Whether `canary` does worse than `baseline` past `cfg`'s thresholds: why, in words, or
/// `None`. Crashes and hangs condemn at once (more per worker than the old generation had);
/// error share, panics and latency only once the canary answered `min_requests`.
pub(super) fn judge(
    cfg: &CanaryConfig,
    canary: &CanaryFigures,
    baseline: &CanaryFigures,
) -> Option<String> {
    let per_worker = |f: &CanaryFigures| f.crashes as f64 / f64::from(f.workers.max(1));
    if canary.crashes > 0 && per_worker(canary) > per_worker(baseline) {
        return Some(format!(
            "{} of its workers crashed or hung (old generation: {})",
            canary.crashes, baseline.crashes
        ));
    }
    if canary.requests < cfg.min_requests {
        return None;
    }
    let share = |n: u64, f: &CanaryFigures| n as f64 / f.requests.max(1) as f64;
    if canary.panics > 0
        && share(canary.panics, canary) > share(baseline.panics, baseline) + cfg.max_error_increase
    {
        return Some(format!(
            "{} handler panics in {} requests (old generation: {} in {}), past canary_max_error_increase {}",
            canary.panics,
            canary.requests,
            baseline.panics,
            baseline.requests,
            percent(cfg.max_error_increase)
        ));
    }
    if canary.error_share > baseline.error_share + cfg.max_error_increase {
        return Some(format!(
            "5xx share {} ({} of {}) against {} for the old generation, past canary_max_error_increase {}",
            percent(canary.error_share),
            canary.errors,
            canary.requests,
            percent(baseline.error_share),
            percent(cfg.max_error_increase)
        ));
    }
    // Latency needs enough answers on both sides for a p99 to mean anything.
    if baseline.requests >= cfg.min_requests
        && let (Some(new), Some(old)) = (canary.p99_ms, baseline.p99_ms)
        && new > old * cfg.max_latency_ratio
    {
        return Some(format!(
            "p99 latency {new} ms against {old} ms for the old generation, past canary_max_latency_ratio {}",
            cfg.max_latency_ratio
        ));
    }
    None
}

impl Supervisor {
    /// The canary a rollout of `kind` gets: the config's (or `host reload`'s flags'), for
    /// reloads (and the watcher's with `watch_canary`); none when it would leave no old worker
    /// to compare with.
    pub(super) fn canary_plan(&mut self, kind: RolloutKind) -> Option<CanaryPlan> {
        let c = &self.cfg.canary;
        let judged = match kind {
            RolloutKind::Reload => true,
            RolloutKind::Watch => c.in_watch_mode,
            _ => false,
        };
        let over = if kind == RolloutKind::Reload {
            self.canary_override.take().unwrap_or_default()
        } else {
            Default::default()
        };
        let workers = over.workers.map_or(c.workers, |n| n as usize);
        let analysis = over
            .analysis_ms
            .map_or(c.analysis, Duration::from_millis)
            .clamp(CHECK_EVERY, crate::config::MAX_WAIT);
        if !judged || workers == 0 {
            return None;
        }
        if workers >= self.cfg.workers {
            tracing::warn!(
                canary_workers = workers,
                workers = self.cfg.workers,
                "no canary analysis: it needs at least one worker of the old generation to compare with"
            );
            return None;
        }
        Some(CanaryPlan {
            workers,
            analysis,
            promoted: false,
        })
    }

    /// A generation's counters now: its exited workers' and its live workers' cells.
    fn totals_of(&self, generation: u64) -> Totals {
        let mut totals = self.exited_totals(generation);
        for t in self.live_counters(generation) {
            totals.add(&t);
        }
        totals
    }

    fn serving_workers_of(&self, generation: u64) -> u32 {
        self.serving
            .iter()
            .flatten()
            .filter_map(|id| self.workers.get(id))
            .filter(|w| w.generation.number == generation)
            .count() as u32
    }

    /// Opens a window judging `generation` against `baseline`.
    fn open_window(
        &mut self,
        phase: Phase,
        generation: u64,
        baseline: u64,
        period: Duration,
        baseline_fixed: Option<CanaryFigures>,
    ) {
        let now = Instant::now();
        let canary_at_start = self.totals_of(generation);
        let baseline_at_start = self.totals_of(baseline);
        tracing::info!(
            generation,
            baseline,
            "{}: judging generation {generation} against generation {baseline} on live traffic for {}",
            match phase {
                Phase::Analysis => "canary analysis",
                Phase::Watch => "watch period",
            },
            humantime::format_duration(period)
        );
        self.judging = Some(Judging {
            phase,
            generation,
            baseline,
            started: now,
            until: now + period,
            next_check: now + CHECK_EVERY,
            canary_at_start,
            baseline_at_start,
            canary_crashes: 0,
            baseline_crashes: 0,
            baseline_fixed,
        });
    }

    /// Called by `advance`: whether the rollout must wait for the canary's verdict (it starts
    /// the analysis when its canary workers are all serving).
    pub(super) fn held_for_analysis(&mut self) -> bool {
        let Some(r) = &self.rollout else { return false };
        let Some(plan) = r.canary.filter(|p| !p.promoted) else {
            return false;
        };
        if r.done.len() < plan.workers || r.candidate.is_some() {
            return false;
        }
        if self
            .judging
            .as_ref()
            .is_some_and(|j| j.phase == Phase::Analysis)
        {
            return true;
        }
        let (generation, baseline) = (
            r.target.number,
            self.current.as_ref().map_or(0, |g| g.number),
        );
        self.notice(super::Notice::Status(format!(
            "canary: generation {generation} on {} workers, judged for {}",
            plan.workers,
            humantime::format_duration(plan.analysis)
        )));
        self.open_window(Phase::Analysis, generation, baseline, plan.analysis, None);
        true
    }

    /// The figures of the window now: (canary, baseline).
    fn window_figures(&self, j: &Judging) -> (CanaryFigures, CanaryFigures) {
        let now = self.totals_of(j.generation);
        let canary = figures(
            j.generation,
            self.serving_workers_of(j.generation),
            &now,
            &j.canary_at_start,
            j.canary_crashes,
        );
        let baseline = match &j.baseline_fixed {
            Some(f) => f.clone(),
            None => {
                let now = self.totals_of(j.baseline);
                figures(
                    j.baseline,
                    self.serving_workers_of(j.baseline),
                    &now,
                    &j.baseline_at_start,
                    j.baseline_crashes,
                )
            }
        };
        (canary, baseline)
    }

    /// A worker of `generation` crashed or hung.
    pub(super) fn note_crash(&mut self, generation: u64) {
        if let Some(j) = &mut self.judging {
            if j.generation == generation {
                j.canary_crashes += 1;
                // Judged at the next check, once its slot's refill has started.
                j.next_check = j.next_check.min(Instant::now());
            } else if j.baseline == generation && j.baseline_fixed.is_none() {
                j.baseline_crashes += 1;
            }
        }
    }

    pub(super) fn judging_deadline(&self) -> Option<Instant> {
        self.judging.as_ref().map(|j| j.next_check.min(j.until))
    }

    /// Reads the figures when due and acts on the verdict.
    pub(super) fn judging_timer(&mut self, now: Instant) {
        let Some(j) = &self.judging else { return };
        if j.next_check > now && j.until > now {
            return;
        }
        let (canary, baseline) = self.window_figures(j);
        let (phase, ended) = (j.phase, j.until <= now);
        if let Some(j) = &mut self.judging {
            j.next_check = now + CHECK_EVERY;
        }
        if let Some(why) = judge(&self.cfg.canary, &canary, &baseline) {
            self.condemn(phase, "rolled_back", why, canary, baseline, Vec::new());
        } else if ended {
            let reason = if canary.requests < self.cfg.canary.min_requests {
                tracing::warn!(
                    generation = canary.generation,
                    "canary answered only {} requests (canary_min_requests {}): judged on its crashes alone",
                    canary.requests,
                    self.cfg.canary.min_requests
                );
                format!(
                    "held without enough traffic to judge its answers ({} requests, canary_min_requests {})",
                    canary.requests, self.cfg.canary.min_requests
                )
            } else {
                "held within every threshold".to_string()
            };
            let outcome = if phase == Phase::Analysis {
                "promoted"
            } else {
                "held"
            };
            self.acquit(outcome, reason, canary, baseline, Vec::new());
        }
    }

    /// The window ends in the new generation's favour: promoted (the rollout goes on), or its
    /// watch period is over.
    fn acquit(
        &mut self,
        outcome: &str,
        reason: String,
        canary: CanaryFigures,
        baseline: CanaryFigures,
        replies: Vec<Reply>,
    ) {
        let Some(j) = self.judging.take() else { return };
        let figures = describe(&canary, &baseline);
        tracing::info!(
            generation = j.generation,
            "canary {outcome}: {reason}; {figures}"
        );
        let verdict = CanaryVerdict {
            generation: j.generation,
            outcome: outcome.to_string(),
            reason,
            at: unix_now(),
            canary,
            baseline,
        };
        self.last_verdict = Some(verdict.clone());
        match j.phase {
            Phase::Analysis => {
                self.watch_baseline = Some(verdict.baseline.clone());
                if let Some(r) = &mut self.rollout {
                    if let Some(plan) = &mut r.canary {
                        plan.promoted = true;
                    }
                    r.report.verdict = Some(verdict);
                    r.replies.extend(replies);
                }
                self.advance();
            }
            Phase::Watch => {
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(ControlResponse::Judged(verdict.clone()));
                }
            }
        }
    }

    /// The window ends against the new generation: the canary's slots are reverted (during the
    /// analysis) or the previous generation rolled back (during the watch period), and its
    /// build is remembered as refused.
    fn condemn(
        &mut self,
        phase: Phase,
        outcome: &str,
        why: String,
        canary: CanaryFigures,
        baseline: CanaryFigures,
        replies: Vec<Reply>,
    ) {
        let Some(j) = self.judging.take() else { return };
        let figures = describe(&canary, &baseline);
        let reason = format!(
            "canary generation {} judged worse than generation {}: {why} ({figures})",
            j.generation, j.baseline
        );
        tracing::error!(generation = j.generation, "{reason}; rolling it back");
        self.notice(super::Notice::Status(format!(
            "canary generation {} rolled back: {why}",
            j.generation
        )));
        let verdict = CanaryVerdict {
            generation: j.generation,
            outcome: outcome.to_string(),
            reason: reason.clone(),
            at: unix_now(),
            canary,
            baseline,
        };
        self.last_verdict = Some(verdict.clone());
        match phase {
            Phase::Analysis => {
                if let Some(r) = &mut self.rollout {
                    r.report.verdict = Some(verdict);
                    r.replies.extend(replies);
                }
                self.fail_rollout(reason);
            }
            Phase::Watch => {
                if let Some(g) = self.current.as_ref().filter(|g| g.number == j.generation) {
                    self.last_refused = Some((g.snapshot.sha256.clone(), g.config.sha256.clone()));
                    tracing::warn!(
                        sha256 = short(&g.snapshot.sha256),
                        "generation {} refused: rolling back to generation {}",
                        j.generation,
                        j.baseline
                    );
                }
                self.watch_rollback = Some(verdict);
                self.request_rollout(RolloutKind::Rollback, None);
                // Whoever asked is answered when the rollback ends.
                if let Some(reply) = replies.into_iter().flatten().next() {
                    if self.rollout.is_some() || self.snapshotting.is_some() {
                        self.queued_abort_reply = Some(reply);
                    } else {
                        let _ = reply.send(ControlResponse::Refused {
                            reason: "the rollback could not start (see the log)".into(),
                        });
                    }
                }
            }
        }
    }

    /// After a judged rollout reached every slot: the watch period.
    pub(super) fn open_watch(&mut self, generation: u64, previous: u64) {
        let Some(baseline) = self.watch_baseline.take() else {
            return;
        };
        let period = self.cfg.canary.watch;
        self.open_window(Phase::Watch, generation, previous, period, Some(baseline));
    }

    /// A rollout of another generation began: a window judging the one it replaces ends.
    pub(super) fn close_watch(&mut self, why: &str) {
        if let Some(j) = self.judging.take_if(|j| j.phase == Phase::Watch) {
            tracing::info!(
                generation = j.generation,
                "watch period of generation {} ended: {why}",
                j.generation
            );
        }
    }

    /// `host promote` / `host abort`.
    pub(super) fn request_verdict(&mut self, promote: bool, reply: Reply) {
        let Some(j) = &self.judging else {
            if let Some(reply) = reply {
                let _ = reply.send(ControlResponse::Refused {
                    reason: "no canary is under analysis and no generation is in its watch period"
                        .into(),
                });
            }
            return;
        };
        let (canary, baseline) = self.window_figures(j);
        let phase = j.phase;
        let replies = vec![reply];
        if promote {
            let outcome = if phase == Phase::Analysis {
                "promoted_by_hand"
            } else {
                "held"
            };
            self.acquit(
                outcome,
                "promoted by hand (host promote)".into(),
                canary,
                baseline,
                replies,
            );
        } else {
            self.condemn(
                phase,
                "aborted_by_hand",
                "aborted by hand (host abort)".into(),
                canary,
                baseline,
                replies,
            );
        }
    }

    /// `status`: the window's figures now.
    pub(super) fn canary_status(&self) -> Option<CanaryStatus> {
        let j = self.judging.as_ref()?;
        let (canary, baseline) = self.window_figures(j);
        Some(CanaryStatus {
            phase: match j.phase {
                Phase::Analysis => "analysis",
                Phase::Watch => "watch",
            }
            .into(),
            generation: j.generation,
            elapsed_ms: j.started.elapsed().as_millis() as u64,
            period_ms: j.until.saturating_duration_since(j.started).as_millis() as u64,
            canary,
            baseline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CanaryConfig {
        CanaryConfig {
            workers: 1,
            analysis: Duration::from_secs(30),
            watch: Duration::from_secs(60),
            min_requests: 100,
            max_error_increase: 0.02,
            max_latency_ratio: 3.0,
            in_watch_mode: false,
        }
    }

    fn fig(requests: u64, errors: u64, p99: f64) -> CanaryFigures {
        CanaryFigures {
            generation: 1,
            workers: 1,
            requests,
            errors,
            error_share: errors as f64 / requests.max(1) as f64,
            p99_ms: Some(p99),
            panics: 0,
            crashes: 0,
        }
    }

    #[test]
    fn p99_is_the_bucket_holding_it() {
        let mut h = [0u64; crate::counters::BUCKETS];
        assert_eq!(p99_ms(&h), None);
        h[0] = 99;
        h[4] = 1;
        assert_eq!(p99_ms(&h), Some(0.5), "99 of 100 in the first bucket");
        h[4] = 2;
        assert_eq!(p99_ms(&h), Some(10.0));
        h[crate::counters::BUCKETS - 1] = 1000;
        assert_eq!(p99_ms(&h), Some(10_000.0), "+Inf reads as the last bound");
    }

    #[test]
    fn verdicts() {
        let c = cfg();
        let old = fig(1000, 1, 1.0);
        assert_eq!(
            judge(&c, &fig(1000, 20, 1.0), &old),
            None,
            "within 2 points"
        );
        assert!(
            judge(&c, &fig(1000, 300, 1.0), &old)
                .unwrap()
                .contains("5xx share 30.0%")
        );
        assert_eq!(judge(&c, &fig(99, 99, 1.0), &old), None, "too few requests");
        assert_eq!(
            judge(&c, &fig(1000, 0, 2.5), &old),
            None,
            "one bucket slower"
        );
        assert!(
            judge(&c, &fig(1000, 0, 10.0), &old)
                .unwrap()
                .contains("p99")
        );
        let crashed = CanaryFigures {
            crashes: 1,
            ..fig(3, 0, 1.0)
        };
        assert!(judge(&c, &crashed, &old).unwrap().contains("crashed"));
        let both = CanaryFigures {
            crashes: 1,
            ..old.clone()
        };
        assert_eq!(
            judge(&c, &crashed, &both),
            None,
            "no worse than the old one"
        );
        let panicky = CanaryFigures {
            panics: 50,
            ..fig(1000, 50, 1.0)
        };
        assert!(judge(&c, &panicky, &old).unwrap().contains("panics"));
    }
}
