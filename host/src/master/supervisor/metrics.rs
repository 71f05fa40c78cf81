//! What the supervisor counts for `/metrics`, and the report it answers a scrape with.
//!
//! Requests are counted by the workers, in their cells of the shared worker table (see
//! `counters`). A scrape adds up, per generation, the live workers' cells and what this module
//! folded from exited workers: when a worker is reaped, its cell holds its final counts (nothing
//! writes it any more, and a crash loses nothing), and they are added to its generation's total
//! before the cell is freed. So a generation's counters never go backwards when its workers are
//! replaced, recycled or crash, and they stay after its last worker is gone. Generations beyond
//! the last [`KEEP_GENERATIONS`] are added up under `generation="older"`, so that a long dev
//! session of automatic reloads cannot grow the report without bound.
//!
//! It also counts the supervisor's own events: worker starts, exits and kills by cause,
//! reloads by outcome, and the master bounds a rollout waited at; and it reports how often
//! `state_dir`'s control socket and pidfile were recreated (counted by `state_dir::Watch`, and
//! added to the report by the admin listener). It defines the [`MetricsReport`] a scrape gets
//! (the admin listener formats it). It never changes a worker, a slot or a rollout; the
//! transitions call it.

use std::collections::BTreeMap;
use std::process::ExitStatus;

use super::{RolloutKind, Supervisor, Worker, WorkerId, WorkerState};
use crate::counters::Totals;
use crate::protocol::ReloadReport;

/// Generations whose counters are reported apart.
const KEEP_GENERATIONS: usize = 64;
/// Plugin series the master keeps per generation (and for `older`): a generation's workers may
/// each register different ones, so the master bounds what it folds; more are dropped and
/// counted (`plugin_series` in `host_master_limit_hits`).
const FOLDED_SERIES: usize = 4 * crate::plugin_metrics::SERIES;

/// Why a worker was started: a rollout's kind (`start`, `reload`, `rollback`, `watch`,
/// `revert`, `recycle`), or `replacement` after a crash, a hang or a failed start.
pub(super) const START_CAUSES: [&str; 7] = [
    "start",
    "reload",
    "rollback",
    "watch",
    "revert",
    "recycle",
    "replacement",
];
/// Why the master SIGKILLed a worker.
pub(super) const KILL_CAUSES: [&str; 5] =
    ["hung", "drain_timeout", "start_failed", "stop", "aborted"];
/// Master bounds a rollout can wait at: `max_draining_workers` (too many old workers still
/// draining) and `worker_table_full` (no free cell in the worker table).
/// `plugin_series`: plugin series not kept because a generation holds [`FOLDED_SERIES`].
pub(super) const MASTER_LIMITS: [&str; 3] =
    ["max_draining_workers", "worker_table_full", "plugin_series"];
const RELOAD_KINDS: [&str; 3] = ["reload", "rollback", "watch"];
const RELOAD_OUTCOMES: [&str; 5] = ["ok", "refused", "reverted", "revert_failed", "interrupted"];

/// What a scrape reports: everything the supervisor counted, as plain numbers.
#[derive(Debug, Default)]
pub(crate) struct MetricsReport {
    /// One entry per generation that served (or still serves) requests, oldest first.
    pub generations: Vec<GenerationMetrics>,
    /// The generation new connections reach (0 before the first one serves).
    pub serving_generation: u64,
    /// Reloads by (kind, outcome).
    pub reloads: Vec<(String, &'static str, u64)>,
    /// Worker processes started, by cause.
    pub worker_starts: Vec<(&'static str, u64)>,
    /// Worker processes reaped, by (cause, how they ended).
    pub worker_exits: Vec<(&'static str, &'static str, u64)>,
    /// Workers the master SIGKILLed, by cause.
    pub worker_kills: Vec<(&'static str, u64)>,
    /// Master bounds hit (a rollout that waited for room), by limit.
    pub master_limit_hits: Vec<(&'static str, u64)>,
    /// Files of `state_dir` recreated after they went missing, by what.
    pub state_dir_repairs: Vec<(&'static str, u64)>,
    /// The shared listening socket: whether it listens (1) or is down (0), and how often it
    /// was found shut down (by a plugin) and re-armed.
    pub listener_up: bool,
    pub listener_recoveries: u64,
    /// Processes the workers left behind that the master ended: all, and those that needed
    /// SIGKILL.
    pub orphans_ended: u64,
    pub orphans_killed: u64,
    /// The worker group this is (set by the master's group layer; empty: no `group` label).
    pub group: String,
    /// The other groups' reports: one exposition covers every group, each series labelled with
    /// its `group`.
    pub more: Vec<MetricsReport>,
}

/// One generation's requests, summed over its live workers and the ones that exited.
#[derive(Debug, Default)]
pub(crate) struct GenerationMetrics {
    /// Its worker group (empty: no `group` label).
    pub group: String,
    /// The generation number, or `older` for the sum of generations too old to keep apart.
    pub generation: String,
    pub plugin: String,
    pub version: String,
    pub sha256: String,
    pub totals: Totals,
    /// Its live workers by state.
    pub workers: Vec<(&'static str, u64)>,
    /// Its plugin's own metrics, summed over its live workers and the ones that exited.
    pub plugin_series: crate::plugin_metrics::Sums,
}

/// A generation's labels: which build it runs.
#[derive(Clone, Debug, Default)]
struct Labels {
    plugin: String,
    version: String,
    sha256: String,
}

#[derive(Default)]
pub(super) struct Metrics {
    /// Final counters of exited workers, per generation (the last [`KEEP_GENERATIONS`]).
    exited: BTreeMap<u64, (Labels, Totals)>,
    /// Everything folded from generations up to `merged_through`.
    older: Totals,
    merged_through: u64,
    /// The plugin's counters and histograms of exited workers, per generation (the last
    /// [`KEEP_GENERATIONS`]), and those of older generations together.
    plugin_exited: BTreeMap<u64, crate::plugin_metrics::Sums>,
    plugin_older: crate::plugin_metrics::Sums,
    reloads: BTreeMap<(String, &'static str), u64>,
    starts: BTreeMap<&'static str, u64>,
    exits: BTreeMap<(&'static str, &'static str), u64>,
    kills: BTreeMap<&'static str, u64>,
    limits: BTreeMap<&'static str, u64>,
}

impl Metrics {
    pub(super) fn count_start(&mut self, cause: &'static str) {
        *self.starts.entry(cause).or_default() += 1;
    }

    /// A master bound was hit (one of [`MASTER_LIMITS`]).
    pub(super) fn count_limit(&mut self, limit: &'static str) {
        *self.limits.entry(limit).or_default() += 1;
    }

    pub(super) fn count_kill(&mut self, cause: &'static str) {
        *self.kills.entry(cause).or_default() += 1;
    }

    /// Adds a dead worker's plugin counters and histograms to its generation's.
    fn fold_plugin(&mut self, generation: u64, samples: &[crate::plugin_metrics::Sample]) {
        if samples.is_empty() {
            return;
        }
        let sums = if generation <= self.merged_through {
            &mut self.plugin_older
        } else {
            self.plugin_exited.entry(generation).or_default()
        };
        if sums.add(samples, false, FOLDED_SERIES) > 0 {
            self.note_series_dropped();
        }
        self.merge_old_plugin_series();
    }

    /// Moves the plugin series of generations merged into `older` there.
    fn merge_old_plugin_series(&mut self) {
        while let Some(entry) = self.plugin_exited.first_entry() {
            if *entry.key() > self.merged_through {
                break;
            }
            let sums = entry.remove();
            let samples: Vec<_> = sums.samples().into_iter().cloned().collect();
            if self.plugin_older.add(&samples, false, FOLDED_SERIES) > 0 {
                self.note_series_dropped();
            }
        }
    }

    fn note_series_dropped(&mut self) {
        self.count_limit("plugin_series");
        static DROPPED: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();
        if let Some(more) = DROPPED.hit_named("plugin series dropped") {
            tracing::warn!(
                max = FOLDED_SERIES,
                more_not_logged = more,
                "plugin metric series not kept: the generation holds the most the master keeps"
            );
        }
    }

    /// Adds a dead worker's final counters to its generation.
    fn fold(&mut self, generation: u64, labels: Labels, totals: &Totals) {
        if generation <= self.merged_through {
            self.older.add(totals);
            return;
        }
        if *totals == Totals::default() && !self.exited.contains_key(&generation) {
            // A worker that never served (a refused canary): nothing to keep, and its
            // generation, if it never served at all, does not clutter the page.
            return;
        }
        let (kept, sum) = self.exited.entry(generation).or_default();
        if kept.plugin.is_empty() {
            *kept = labels;
        }
        sum.add(totals);
        while self.exited.len() > KEEP_GENERATIONS {
            let Some((oldest, (_, sum))) = self.exited.pop_first() else {
                break;
            };
            self.older.add(&sum);
            self.merged_through = oldest;
        }
    }
}

/// How a worker ended, from its wait status.
fn how(status: &std::io::Result<ExitStatus>) -> &'static str {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) if s.success() => "exit_0",
        Ok(s) if s.code().is_some() => "exit_nonzero",
        Ok(s) if s.signal().is_some() => "signal",
        _ => "unknown",
    }
}

/// Why a worker ended: what it was retired or killed for, or, when the master asked nothing,
/// what its state says (`crashed`: died while serving; `hung`; `start_failed`).
fn exit_cause(w: &Worker) -> &'static str {
    match w.state {
        WorkerState::Ready => "crashed",
        WorkerState::Hung => "hung",
        WorkerState::Starting { .. } => "start_failed",
        WorkerState::Killed if w.killed_for == Some("start_failed") => "start_failed",
        WorkerState::Killed => w.leaving.or(w.killed_for).unwrap_or("killed"),
        WorkerState::Draining { .. } => w.leaving.unwrap_or("drained"),
    }
}

/// A concluded rollout's outcome, as a label.
fn reload_outcome(
    kind: RolloutKind,
    report: &ReloadReport,
    outcome: &Result<(), String>,
) -> &'static str {
    let error = report.error.as_deref().unwrap_or("");
    match outcome {
        Ok(()) => "ok",
        // As `abort_rollout` words it.
        Err(_) if error.starts_with("interrupted: ") => "interrupted",
        // As `fail_rollout` words a revert that failed too.
        Err(_) if kind == RolloutKind::Revert && error.contains("rolling back also failed") => {
            "revert_failed"
        }
        Err(_) if kind == RolloutKind::Revert => "reverted",
        // The canary failed, or the snapshot or config could not be read: nothing changed.
        Err(_) => "refused",
    }
}

fn state_name(state: &WorkerState) -> &'static str {
    match state {
        WorkerState::Starting { .. } => "starting",
        WorkerState::Ready => "ready",
        WorkerState::Hung => "hung",
        WorkerState::Draining { .. } => "draining",
        WorkerState::Killed => "killed",
    }
}

impl Supervisor {
    /// Worker `id` was reaped: folds its final counters into its generation (before its cell is
    /// freed) and counts its exit.
    pub(super) fn fold_metrics(&mut self, id: WorkerId, status: &std::io::Result<ExitStatus>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let cause = exit_cause(w);
        *self.metrics.exits.entry((cause, how(status))).or_default() += 1;
        let counters = w
            .table_cell
            .zip(self.worker_table.as_ref())
            .and_then(|(cell, (table, _))| table.counters(cell as usize));
        if let Some(c) = counters {
            let totals = c.read().at_death();
            let labels = self.labels_of(w);
            self.metrics.fold(w.generation.number, labels, &totals);
        }
        let series = w
            .table_cell
            .zip(self.worker_table.as_ref())
            .and_then(|(cell, (table, _))| table.plugin_series(cell as usize));
        if let Some(series) = series {
            let generation = w.generation.number;
            self.metrics
                .fold_plugin(generation, &crate::plugin_metrics::read(series));
        }
        self.metrics.merge_old_plugin_series();
    }

    /// The folded counters of `generation`'s exited workers (zero once it is merged into
    /// `older`: the canary analysis reads recent generations only).
    pub(super) fn exited_totals(&self, generation: u64) -> Totals {
        self.metrics
            .exited
            .get(&generation)
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    }

    /// The counters in the cells of `generation`'s live workers, read now.
    pub(super) fn live_counters(&self, generation: u64) -> Vec<Totals> {
        let Some((table, _)) = self.worker_table.as_ref() else {
            return Vec::new();
        };
        self.workers
            .values()
            .filter(|w| w.generation.number == generation)
            .filter_map(|w| table.counters(w.table_cell? as usize))
            .map(|c| c.read())
            .collect()
    }

    fn labels_of(&self, w: &Worker) -> Labels {
        let (plugin, version) = w
            .plugin
            .as_ref()
            .map(|p| (p.name.clone(), p.version.clone()))
            .unwrap_or_default();
        Labels {
            plugin,
            version,
            sha256: w.generation.snapshot.sha256.clone(),
        }
    }

    /// A rollout was concluded: counts reloads, rollbacks and automatic reloads by outcome (not
    /// the first start, nor recycles, whose workers are counted as starts).
    pub(super) fn count_reload(
        &mut self,
        kind: RolloutKind,
        report: &ReloadReport,
        outcome: &Result<(), String>,
    ) {
        if matches!(kind, RolloutKind::Start | RolloutKind::Recycle) || report.kind == "start" {
            return;
        }
        let outcome = reload_outcome(kind, report, outcome);
        *self
            .metrics
            .reloads
            .entry((report.kind.clone(), outcome))
            .or_default() += 1;
    }

    /// The answer to a scrape: every generation's counters (exited workers' folded totals plus
    /// live workers' cells, read now) and the supervisor's own counts. Reads memory only.
    pub(super) fn metrics_report(&self) -> MetricsReport {
        let m = &self.metrics;
        let mut generations: BTreeMap<u64, GenerationMetrics> = BTreeMap::new();
        for (number, (labels, totals)) in &m.exited {
            generations.insert(
                *number,
                GenerationMetrics {
                    generation: number.to_string(),
                    plugin: labels.plugin.clone(),
                    version: labels.version.clone(),
                    sha256: labels.sha256.clone(),
                    totals: totals.clone(),
                    workers: Vec::new(),
                    plugin_series: m.plugin_exited.get(number).cloned().unwrap_or_default(),
                    ..GenerationMetrics::default()
                },
            );
        }
        // Plugin series of a generation none of whose workers served a request yet.
        for (number, sums) in &m.plugin_exited {
            generations
                .entry(*number)
                .or_insert_with(|| GenerationMetrics {
                    generation: number.to_string(),
                    plugin_series: sums.clone(),
                    ..GenerationMetrics::default()
                });
        }
        let mut older = (m.merged_through > 0).then(|| GenerationMetrics {
            generation: "older".into(),
            totals: m.older.clone(),
            plugin_series: m.plugin_older.clone(),
            ..GenerationMetrics::default()
        });
        let mut dropped = 0;
        let mut by_state: BTreeMap<(u64, &'static str), u64> = BTreeMap::new();
        for w in self.workers.values() {
            let number = w.generation.number;
            let g = if number <= m.merged_through {
                older.get_or_insert_with(|| GenerationMetrics {
                    generation: "older".into(),
                    ..GenerationMetrics::default()
                })
            } else {
                *by_state.entry((number, state_name(&w.state))).or_default() += 1;
                generations.entry(number).or_insert_with(|| {
                    let labels = self.labels_of(w);
                    GenerationMetrics {
                        generation: number.to_string(),
                        plugin: labels.plugin,
                        version: labels.version,
                        sha256: labels.sha256,
                        ..GenerationMetrics::default()
                    }
                })
            };
            if g.plugin.is_empty()
                && let Some(p) = &w.plugin
            {
                g.plugin = p.name.clone();
                g.version = p.version.clone();
            }
            let counters = w
                .table_cell
                .zip(self.worker_table.as_ref())
                .and_then(|(cell, (table, _))| table.counters(cell as usize));
            if let Some(c) = counters {
                g.totals.add(&c.read());
            }
            let series = w
                .table_cell
                .zip(self.worker_table.as_ref())
                .and_then(|(cell, (table, _))| table.plugin_series(cell as usize));
            if let Some(series) = series {
                dropped +=
                    g.plugin_series
                        .add(&crate::plugin_metrics::read(series), true, FOLDED_SERIES);
            }
        }
        if dropped > 0 {
            // Only what this scrape shows: counted when the master folds, not per scrape.
            tracing::debug!(dropped, "plugin series over the bound left out of a scrape");
        }
        for ((number, state), n) in by_state {
            if let Some(g) = generations.get_mut(&number) {
                g.workers.push((state, n));
            }
        }
        let counted = |causes: &[&'static str], seen: &BTreeMap<&'static str, u64>| {
            let mut all: BTreeMap<&'static str, u64> = causes.iter().map(|c| (*c, 0)).collect();
            all.extend(seen.iter().map(|(c, n)| (*c, *n)));
            all.into_iter().collect::<Vec<_>>()
        };
        let mut reloads: BTreeMap<(String, &'static str), u64> = RELOAD_KINDS
            .iter()
            .flat_map(|k| RELOAD_OUTCOMES.map(|o| ((k.to_string(), o), 0)))
            .collect();
        reloads.extend(m.reloads.iter().map(|(k, n)| (k.clone(), *n)));
        // A generation none of whose workers reported ready yet (a canary starting) has no
        // plugin labels and nothing counted: it shows once it serves, with its labels, rather
        // than as a series whose labels change.
        generations.retain(|_, g| !g.plugin.is_empty() || g.totals != Totals::default());
        MetricsReport {
            generations: older.into_iter().chain(generations.into_values()).collect(),
            serving_generation: self.current.as_ref().map_or(0, |g| g.number),
            reloads: reloads
                .into_iter()
                .map(|((kind, outcome), n)| (kind, outcome, n))
                .collect(),
            worker_starts: counted(&START_CAUSES, &m.starts),
            worker_exits: m.exits.iter().map(|((c, h), n)| (*c, *h, *n)).collect(),
            worker_kills: counted(&KILL_CAUSES, &m.kills),
            master_limit_hits: counted(&MASTER_LIMITS, &m.limits),
            // Counted by `state_dir::Watch`; the admin listener adds them.
            state_dir_repairs: Vec::new(),
            listener_up: self.listener_health.down.is_none(),
            listener_recoveries: self.listener_health.recoveries,
            orphans_ended: self.fx.orphans_ended().0,
            orphans_killed: self.fx.orphans_ended().1,
            ..MetricsReport::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(answered: u64) -> Totals {
        Totals {
            by_class: [0, answered, 0, 0, 0],
            ..Totals::default()
        }
    }

    fn report(error: Option<&str>) -> ReloadReport {
        ReloadReport {
            ok: error.is_none(),
            generation: 2,
            serving_generation: 1,
            plugin_path: "/p.so".into(),
            sha256: None,
            config_sha256: None,
            ignored_keys: Vec::new(),
            error: error.map(str::to_string),
            started_at: 0,
            duration_ms: 0,
            started_pids: Vec::new(),
            drained_pids: Vec::new(),
            kind: "reload".into(),
            verdict: None,
        }
    }

    #[test]
    fn reload_outcomes_are_told_apart() {
        let err = |e: &str| Err(e.to_string());
        for (kind, error, expected) in [
            (RolloutKind::Reload, None, "ok"),
            (
                RolloutKind::Reload,
                Some("canary: on_worker_start failed"),
                "refused",
            ),
            (
                RolloutKind::Rollback,
                Some("no previous generation"),
                "refused",
            ),
            (RolloutKind::Revert, Some("slot 1 failed"), "reverted"),
            (
                RolloutKind::Revert,
                Some("slot 1 failed; rolling back also failed: x"),
                "revert_failed",
            ),
            (
                RolloutKind::Reload,
                Some("interrupted: host is stopping"),
                "interrupted",
            ),
        ] {
            let outcome = error.map_or(Ok(()), err);
            assert_eq!(reload_outcome(kind, &report(error), &outcome), expected);
        }
    }

    #[test]
    fn folding_keeps_recent_generations_apart_and_adds_up_the_rest() {
        let mut m = Metrics::default();
        let labels = || Labels {
            plugin: "p".into(),
            ..Labels::default()
        };
        for generation in 1..=(KEEP_GENERATIONS as u64 + 2) {
            m.fold(generation, labels(), &totals(generation));
        }
        assert_eq!(m.exited.len(), KEEP_GENERATIONS);
        assert_eq!(m.merged_through, 2);
        assert_eq!(m.older.answered(), 1 + 2);
        // A late worker of a merged generation still counts, under `older`.
        m.fold(1, labels(), &totals(10));
        assert_eq!(m.older.answered(), 13);
        m.fold(70, labels(), &totals(5));
        m.fold(70, labels(), &totals(5));
        assert_eq!(m.exited[&70].1.answered(), 10);
        // A worker that served nothing does not make a generation appear.
        m.fold(71, labels(), &Totals::default());
        assert!(!m.exited.contains_key(&71));
    }
}
