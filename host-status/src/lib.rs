//! The report `host status --json` prints, and the records it is made of (the plugin a worker
//! loaded, its start timings, the last reload, a canary's figures and verdict, the listener, the
//! last dev-mode build).
//!
//! One definition for both sides: the host builds these types and serializes them (the master
//! answers `ControlRequest::Status` with a [`StatusReport`]; `host status --json` prints it);
//! the integration tests, and any tool that reads the JSON, deserialize into the same types. It
//! is a crate of its own, with serde as its one dependency, so a reader does not build the host.
//!
//! This crate owns the JSON's field names and shape and nothing else: it does no I/O, and it
//! never decides what a field's value is (the master does). Fields added later carry
//! `#[serde(default)]`, so a report from an older host still reads.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The plugin a worker has loaded, as its header describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub api_version: String,
    pub sha256: String,
}

/// When a worker reached each point of its start, in microseconds since the master spawned it
/// (CLOCK_MONOTONIC, which both processes share). Cumulative: each includes the ones before.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StartupTimings {
    /// `main` entered: fork + exec + dynamic linking of `host`.
    pub exec_us: u64,
    /// Logging and the tokio runtime set up.
    pub runtime_us: u64,
    /// The Start order received from the master.
    pub spec_us: u64,
    /// The plugin `dlopen`ed and its header checked.
    pub dlopen_us: u64,
    /// The plugin's `on_worker_start` returned.
    pub on_worker_start_us: u64,
    /// Accepting, about to report ready.
    pub ready_us: u64,
}

/// One generation's figures over a judging window (deltas since the window began).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CanaryFigures {
    pub generation: u64,
    /// Its workers serving when the figures were read.
    pub workers: u32,
    /// Requests answered, plus those lost in a crash.
    pub requests: u64,
    /// `5xx` answers, plus requests lost in a crash.
    pub errors: u64,
    /// `errors / requests` (0 with no request).
    pub error_share: f64,
    /// The upper bound of the latency bucket holding the 99th percentile, in ms (`None`: no
    /// request answered).
    pub p99_ms: Option<f64>,
    /// Handler panics caught at the plugin boundary.
    pub panics: u64,
    /// Its workers that died while serving or were killed as hung.
    pub crashes: u64,
}

/// A canary under analysis, or a new generation in its watch period, as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CanaryStatus {
    /// `analysis` (canary workers beside the old generation) or `watch` (after a full rollout).
    pub phase: String,
    pub generation: u64,
    pub elapsed_ms: u64,
    pub period_ms: u64,
    pub canary: CanaryFigures,
    /// The old generation: over the same window during the analysis, over the analysis
    /// window during the watch period.
    pub baseline: CanaryFigures,
}

/// How a judged generation ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CanaryVerdict {
    pub generation: u64,
    /// `promoted`, `promoted_by_hand`, `rolled_back`, `aborted_by_hand` or `held` (its
    /// watch period passed).
    pub outcome: String,
    /// What decided, with the figures.
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub canary: CanaryFigures,
    pub baseline: CanaryFigures,
}

/// The outcome of one reload attempt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadReport {
    pub ok: bool,
    /// The generation this attempt created (whether or not it went live).
    pub generation: u64,
    /// The generation serving once the attempt was over.
    pub serving_generation: u64,
    pub plugin_path: PathBuf,
    pub sha256: Option<String>,
    /// sha256 of the generation's `[plugin_config]` JSON text, once it was read.
    #[serde(default)]
    pub config_sha256: Option<String>,
    /// Keys of the config file that changed since the master started but that a reload does
    /// not apply (only `plugin_config` reloads): they take effect at `host upgrade` (`listen` at
    /// `host restart`).
    #[serde(default)]
    pub ignored_keys: Vec<String>,
    /// Why it failed; `None` when `ok`.
    pub error: Option<String>,
    /// Seconds since the Unix epoch when the attempt began.
    pub started_at: u64,
    pub duration_ms: u64,
    /// Workers started and workers told to drain.
    pub started_pids: Vec<u32>,
    pub drained_pids: Vec<u32>,
    /// `reload` or `rollback`.
    pub kind: String,
    /// The canary's verdict, when this reload's new generation was judged on live traffic.
    #[serde(default)]
    pub verdict: Option<CanaryVerdict>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStateName {
    Starting,
    Ready,
    Draining,
    /// Sent no heartbeat for `worker_timeout`: killed, its slot being refilled.
    Hung,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub slot: u32,
    pub pid: u32,
    pub generation: u64,
    pub state: WorkerStateName,
    pub requests: u64,
    pub in_flight: u64,
    /// Open client connections.
    #[serde(default)]
    pub connections: u64,
    pub rss_bytes: u64,
    pub plugin: Option<PluginInfo>,
    /// sha256 of the `[plugin_config]` JSON text its generation runs.
    #[serde(default)]
    pub config_sha256: String,
    /// How its start went, once ready.
    pub startup_us: Option<StartupTimings>,
    /// A gateway process's figures (`None`: a plugin worker).
    #[serde(default)]
    pub gateway: Option<GatewayStatus>,
}

/// A gateway's figures: one process's (in [`WorkerStatus`]) or its group's, added up (in
/// [`StatusReport`]). Counts are since each process started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// WebSocket clients held.
    pub clients: u64,
    /// Bytes queued to clients, not yet written.
    pub queued_bytes: u64,
    /// Client events waiting for, or at, a business worker.
    pub unhandled_events: u64,
    /// Events sent again after their business worker left.
    pub redelivered_events: u64,
    /// Clients the host closed, by cause (`ping_timeout`, `too_big`, `bad_input`,
    /// `send_queue`, `unhandled_queue`, `gateway_hold`); a process lists every cause.
    pub closed: std::collections::BTreeMap<String, u64>,
    /// Upgrades refused with `503` at `gateway_max_clients`.
    pub refused: u64,
    /// The link to the other hosts (`None`: no `cluster` key).
    pub cluster: Option<ClusterStatus>,
}

/// A gateway's link to the other hosts of its cluster (Redis pub/sub).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// `up` (every process linked), `down` (none) or `partial`.
    pub state: String,
    /// Processes linked, of `processes`.
    pub up: u32,
    pub processes: u32,
    /// Times a link came up (reconnections included).
    pub connects: u64,
    /// Messages published to, and applied from, the other hosts.
    pub published: u64,
    pub received: u64,
    /// What did not cross hosts, by cause (`down`, `queue_full`, `too_big`, `query_timeout`,
    /// `bad_message`); a process lists every cause.
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl GatewayStatus {
    /// Adds another process's figures (a group's sum).
    pub fn add(&mut self, other: &GatewayStatus) {
        fn by_cause(sum: &mut std::collections::BTreeMap<String, u64>, more: &Counts) {
            for (cause, n) in more {
                *sum.entry(cause.clone()).or_default() += n;
            }
        }
        type Counts = std::collections::BTreeMap<String, u64>;
        for (sum, n) in [
            (&mut self.clients, other.clients),
            (&mut self.queued_bytes, other.queued_bytes),
            (&mut self.unhandled_events, other.unhandled_events),
            (&mut self.redelivered_events, other.redelivered_events),
            (&mut self.refused, other.refused),
        ] {
            *sum += n;
        }
        by_cause(&mut self.closed, &other.closed);
        if let Some(theirs) = &other.cluster {
            let mine = self.cluster.get_or_insert_with(ClusterStatus::default);
            mine.up += theirs.up;
            mine.processes += theirs.processes;
            for (sum, n) in [
                (&mut mine.connects, theirs.connects),
                (&mut mine.published, theirs.published),
                (&mut mine.received, theirs.received),
            ] {
                *sum += n;
            }
            by_cause(&mut mine.errors, &theirs.errors);
            mine.state = ClusterStatus::state_of(mine.up, mine.processes).into();
        }
    }
}

impl ClusterStatus {
    pub fn state_of(up: u32, processes: u32) -> &'static str {
        match up {
            0 => "down",
            n if n >= processes => "up",
            _ => "partial",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub master_pid: u32,
    pub master_rss_bytes: u64,
    pub listen: String,
    /// Where the master serves `/metrics`, when `admin_listen` is set (the bound address).
    #[serde(default)]
    pub admin_listen: Option<String>,
    pub generation: u64,
    pub workers: Vec<WorkerStatus>,
    /// One entry per slot: who serves it and, when it keeps failing, why.
    pub slots: Vec<SlotStatus>,
    pub last_reload: Option<ReloadReport>,
    /// The generations kept for `rollback`, oldest first; the last is the one serving.
    #[serde(default)]
    pub generations: Vec<GenerationStatus>,
    /// The running host's version and build id (`HOST_BUILD_ID` at compile time, or `dev`).
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub build: String,
    /// Dev mode: the last build the watcher ran (`null` without `build`, or before the first).
    #[serde(default)]
    pub last_build: Option<BuildReport>,
    /// Whether the shared listening socket listens, and its recoveries.
    #[serde(default)]
    pub listener: ListenerStatus,
    /// A canary under analysis or a generation in its watch period, with its figures.
    #[serde(default)]
    pub canary: Option<CanaryStatus>,
    /// How the last judged generation ended.
    #[serde(default)]
    pub last_verdict: Option<CanaryVerdict>,
    /// The worker group this is (`default` for a file without groups).
    #[serde(default)]
    pub group: String,
    /// Whether `host reload` and `SIGHUP` replace this group's workers.
    #[serde(default = "reloadable_default")]
    pub reloadable: bool,
    /// A reload, rollback or other rollout of this group is under way.
    #[serde(default)]
    pub rolling_out: bool,
    /// A gateway group's figures, its processes' added up (`None`: a plugin group).
    #[serde(default)]
    pub gateway: Option<GatewayStatus>,
    /// Every group's status, in the config file's order. The fields above are the first
    /// group's (as before groups).
    #[serde(default)]
    pub groups: Vec<StatusReport>,
}

fn reloadable_default() -> bool {
    true
}

/// The listening socket as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// It listens (or was re-armed at its last check).
    pub up: bool,
    /// Why it is down, while it is.
    pub error: Option<String>,
    /// Times it was found not listening (a plugin shut it down) and re-armed.
    pub recoveries: u64,
    /// What the last recovery found, and when.
    pub last_recovery: Option<String>,
    /// Passed by systemd (`LISTEN_FDS`): the master cannot bind a new one.
    pub activated: bool,
}

impl Default for ListenerStatus {
    fn default() -> Self {
        ListenerStatus {
            up: true,
            error: None,
            recoveries: 0,
            last_recovery: None,
            activated: false,
        }
    }
}

/// The outcome of one dev-mode build (`build`, `--build`), as `status` shows it: a failed one
/// stays there until a later build succeeds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildReport {
    pub ok: bool,
    pub command: String,
    /// Seconds since the Unix epoch when it began.
    pub started_at: u64,
    pub duration_ms: u64,
    /// Why it failed: the build's first error line (or how it exited); `None` when `ok`.
    pub error: Option<String>,
}

/// A generation: which plugin build and which `[plugin_config]` it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub generation: u64,
    /// sha256 of the plugin snapshot.
    pub sha256: String,
    /// sha256 of the `[plugin_config]` JSON text.
    pub config_sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: u32,
    /// The ready worker serving this slot, if any.
    pub pid: Option<u32>,
    /// `serving`, `starting`, `hung` (its worker was killed as hung, the replacement is not
    /// ready yet) or `failing`.
    pub state: String,
    /// Consecutive failed starts (or crash loops) the slot is backing off for.
    pub failures: u32,
    /// Run-time crashes (deaths and hangs of ready workers) in this slot since the master
    /// started.
    #[serde(default)]
    pub crashes: u64,
    pub last_error: Option<String>,
    /// When a failing slot is tried again.
    pub retry_in_ms: Option<u64>,
    /// Workers of this slot replaced by recycling (`max_requests`, `max_worker_rss`,
    /// `restart_worker()`).
    #[serde(default)]
    pub recycles: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> CanaryFigures {
        CanaryFigures {
            p99_ms: Some(1.0),
            ..Default::default()
        }
    }

    fn verdict() -> CanaryVerdict {
        CanaryVerdict {
            generation: 2,
            outcome: "promoted".into(),
            reason: "r".into(),
            at: 1,
            canary: figures(),
            baseline: figures(),
        }
    }

    fn gateway() -> GatewayStatus {
        GatewayStatus {
            cluster: Some(ClusterStatus::default()),
            ..Default::default()
        }
    }

    /// Every field filled in, so every key is printed.
    fn full() -> StatusReport {
        StatusReport {
            master_pid: 1,
            master_rss_bytes: 1,
            listen: "127.0.0.1:1".into(),
            admin_listen: Some("127.0.0.1:2".into()),
            generation: 1,
            workers: vec![WorkerStatus {
                slot: 0,
                pid: 2,
                generation: 1,
                state: WorkerStateName::Ready,
                requests: 0,
                in_flight: 0,
                connections: 0,
                rss_bytes: 0,
                plugin: Some(PluginInfo {
                    name: "p".into(),
                    version: "1".into(),
                    api_version: "1.5".into(),
                    sha256: "s".into(),
                }),
                config_sha256: "c".into(),
                startup_us: Some(StartupTimings::default()),
                gateway: Some(gateway()),
            }],
            slots: vec![SlotStatus {
                slot: 0,
                pid: Some(2),
                state: "serving".into(),
                failures: 0,
                crashes: 0,
                last_error: Some("e".into()),
                retry_in_ms: Some(1),
                recycles: 0,
            }],
            last_reload: Some(ReloadReport {
                ok: true,
                generation: 2,
                serving_generation: 2,
                plugin_path: "/p.so".into(),
                sha256: Some("s".into()),
                config_sha256: Some("c".into()),
                ignored_keys: vec!["workers".into()],
                error: Some("e".into()),
                started_at: 1,
                duration_ms: 1,
                started_pids: vec![3],
                drained_pids: vec![2],
                kind: "reload".into(),
                verdict: Some(verdict()),
            }),
            generations: vec![GenerationStatus {
                generation: 1,
                sha256: "s".into(),
                config_sha256: "c".into(),
            }],
            version: "0.1.0".into(),
            build: "dev".into(),
            last_build: Some(BuildReport {
                ok: false,
                command: "cargo build".into(),
                started_at: 1,
                duration_ms: 1,
                error: Some("e".into()),
            }),
            listener: ListenerStatus {
                last_recovery: Some("r".into()),
                error: Some("e".into()),
                ..Default::default()
            },
            canary: Some(CanaryStatus {
                phase: "analysis".into(),
                generation: 2,
                elapsed_ms: 1,
                period_ms: 2,
                canary: figures(),
                baseline: figures(),
            }),
            last_verdict: Some(verdict()),
            group: "default".into(),
            reloadable: true,
            rolling_out: false,
            gateway: Some(gateway()),
            // One level is enough to print every key: a group's own report has the same shape.
            groups: Vec::new(),
        }
    }

    /// Every key of `v`, as `a.b[].c`.
    fn keys(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    out.push(path.clone());
                    keys(v, &path, out);
                }
            }
            serde_json::Value::Array(items) => {
                if let Some(first) = items.first() {
                    keys(first, &format!("{at}[]"), out);
                }
            }
            _ => {}
        }
    }

    /// The field names and nesting `status --json` has printed since before this crate: a
    /// rename or a move here breaks every script that reads it.
    #[test]
    fn the_json_keeps_its_field_names_and_shape() {
        let value = serde_json::to_value(full()).unwrap();
        let mut got = Vec::new();
        keys(&value, "", &mut got);
        let figures = [
            "generation",
            "workers",
            "requests",
            "errors",
            "error_share",
            "p99_ms",
            "panics",
            "crashes",
        ];
        let mut want: Vec<String> = [
            "master_pid",
            "master_rss_bytes",
            "listen",
            "admin_listen",
            "generation",
            "workers",
            "workers[].slot",
            "workers[].pid",
            "workers[].generation",
            "workers[].state",
            "workers[].requests",
            "workers[].in_flight",
            "workers[].connections",
            "workers[].rss_bytes",
            "workers[].plugin",
            "workers[].plugin.name",
            "workers[].plugin.version",
            "workers[].plugin.api_version",
            "workers[].plugin.sha256",
            "workers[].config_sha256",
            "workers[].startup_us",
            "workers[].startup_us.exec_us",
            "workers[].startup_us.runtime_us",
            "workers[].startup_us.spec_us",
            "workers[].startup_us.dlopen_us",
            "workers[].startup_us.on_worker_start_us",
            "workers[].startup_us.ready_us",
            "slots",
            "slots[].slot",
            "slots[].pid",
            "slots[].state",
            "slots[].failures",
            "slots[].crashes",
            "slots[].last_error",
            "slots[].retry_in_ms",
            "slots[].recycles",
            "last_reload",
            "last_reload.ok",
            "last_reload.generation",
            "last_reload.serving_generation",
            "last_reload.plugin_path",
            "last_reload.sha256",
            "last_reload.config_sha256",
            "last_reload.ignored_keys",
            "last_reload.error",
            "last_reload.started_at",
            "last_reload.duration_ms",
            "last_reload.started_pids",
            "last_reload.drained_pids",
            "last_reload.kind",
            "last_reload.verdict",
        ]
        .map(String::from)
        .to_vec();
        let verdict = |at: &str, want: &mut Vec<String>| {
            for k in ["generation", "outcome", "reason", "at", "canary"] {
                want.push(format!("{at}.{k}"));
            }
            want.extend(figures.map(|f| format!("{at}.canary.{f}")));
            want.push(format!("{at}.baseline"));
            want.extend(figures.map(|f| format!("{at}.baseline.{f}")));
        };
        verdict("last_reload.verdict", &mut want);
        want.extend(
            [
                "generations",
                "generations[].generation",
                "generations[].sha256",
                "generations[].config_sha256",
                "version",
                "build",
                "last_build",
                "last_build.ok",
                "last_build.command",
                "last_build.started_at",
                "last_build.duration_ms",
                "last_build.error",
                "listener",
                "listener.up",
                "listener.error",
                "listener.recoveries",
                "listener.last_recovery",
                "listener.activated",
                "canary",
                "canary.phase",
                "canary.generation",
                "canary.elapsed_ms",
                "canary.period_ms",
                "canary.canary",
            ]
            .map(String::from),
        );
        want.extend(figures.map(|f| format!("canary.canary.{f}")));
        want.push("canary.baseline".into());
        want.extend(figures.map(|f| format!("canary.baseline.{f}")));
        want.push("last_verdict".into());
        verdict("last_verdict", &mut want);
        want.extend(["group", "reloadable", "rolling_out", "groups"].map(String::from));
        for at in ["workers[].gateway", "gateway"] {
            want.push(at.into());
            for f in [
                "clients",
                "queued_bytes",
                "unhandled_events",
                "redelivered_events",
                "closed",
                "refused",
                "cluster",
            ] {
                want.push(format!("{at}.{f}"));
            }
            for f in [
                "state",
                "up",
                "processes",
                "connects",
                "published",
                "received",
                "errors",
            ] {
                want.push(format!("{at}.cluster.{f}"));
            }
        }
        // (`Value` sorts an object's keys; the printed order is the fields' order above.)
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(value["workers"][0]["state"], "ready");
        // And it reads back as it was written.
        let back: StatusReport = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(serde_json::to_value(back).unwrap(), value);
    }

    #[test]
    fn a_gateway_groups_figures_add_up_its_processes() {
        let process = |clients, up, down_errors| GatewayStatus {
            clients,
            closed: [("too_big".to_string(), 1)].into(),
            cluster: Some(ClusterStatus {
                state: ClusterStatus::state_of(up, 1).into(),
                up,
                processes: 1,
                errors: [("down".to_string(), down_errors)].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut sum = GatewayStatus::default();
        sum.add(&process(2, 1, 0));
        assert_eq!(sum.cluster.as_ref().unwrap().state, "up");
        sum.add(&process(3, 0, 4));
        assert_eq!((sum.clients, sum.closed["too_big"]), (5, 2));
        let c = sum.cluster.unwrap();
        assert_eq!((c.state.as_str(), c.up, c.processes), ("partial", 1, 2));
        assert_eq!(c.errors["down"], 4);
        assert_eq!(ClusterStatus::state_of(0, 2), "down");
    }

    /// A report from a host older than a field still reads: the field takes its default.
    #[test]
    fn a_report_without_the_later_fields_reads() {
        let mut value = serde_json::to_value(full()).unwrap();
        let map = value.as_object_mut().unwrap();
        for later in [
            "admin_listen",
            "generations",
            "version",
            "build",
            "last_build",
            "listener",
            "canary",
            "last_verdict",
            "group",
            "reloadable",
            "rolling_out",
            "groups",
            "gateway",
        ] {
            map.remove(later);
        }
        map["workers"][0].as_object_mut().unwrap().remove("gateway");
        let report: StatusReport = serde_json::from_value(value).unwrap();
        assert!(report.listener.up);
        assert!(report.reloadable && report.groups.is_empty());
        assert!(report.generations.is_empty() && report.canary.is_none());
    }
}
