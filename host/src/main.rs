//! `host`: a hot-reloadable HTTP plugin host.
//!
//! # Theory of operation
//!
//! One **master** process and N **worker** processes. The master binds the listening socket once
//! and never re-binds it; every worker accepts on that one inherited socket, so connections
//! queued in the kernel are never dropped when a worker leaves. Workers are this same binary,
//! re-exec'd from `/proc/self/exe` with the hidden `__worker` role (never a bare `fork` of a
//! multi-threaded process).
//!
//! Each worker loads the business handler from a `cdylib` plugin **in its on-start hook**
//! ([`worker::loader`]): `dlopen` with `RTLD_NOW`, the ABI header checks, then the plugin's
//! `on_worker_start`. The master itself never loads plugin code.
//!
//! A reload makes a **generation**: the master snapshots the plugin file into
//! `state_dir/plugins/<sha256>.so`, re-reads `[plugin_config]` from the config file, and rolls
//! the slots onto that pair one at a time, new before old (start a new worker, wait until it is
//! ready, tell the old one to drain). The first new worker
//! is the canary: if it fails, nothing old was touched and the reload is refused with the reason.
//!
//! A **recycle** is the same procedure for one slot and the generation it already runs: plugins
//! are never unloaded, so a worker over `max_requests` or `max_worker_rss`, or whose plugin called
//! `restart_worker()`, is replaced by a fresh process, new before old.
//!
//! # What reloads and what stays frozen
//!
//! Like Workerman's `onWorkerStart` rule: only what a worker loads in its on-start hook (the
//! plugin `.so`) is refreshed by a reload. Everything linked into `host` (the HTTP stack, the
//! built-in `/_host/` routes, this CLI, the master) stays as it was until a full restart; a
//! rebuilt `host` file on disk changes nothing, because workers exec the master's running image.
//! The one part of `host.toml` a reload re-reads is `[plugin_config]`, the plugin's own settings:
//! a generation is a plugin snapshot *and* that table (as JSON, given to `on_worker_start`), so a
//! new configuration rolls out, is checked by the canary and rolls back like a new build. The
//! host's own keys are read at start; a reload that finds them changed names them and leaves them
//! for `host upgrade` (`listen` for `host restart`).
//!
//! # Upgrading `host` itself
//!
//! `host upgrade` (or `SIGUSR2`) is the one exception to "workers run the master's image": the
//! master starts the binary now at the path it was started from as a new master, hands it the
//! listening socket, the pidfile's lock and (once its own workers are ready) the control socket,
//! then drains its workers and exits ([`master::binary_upgrade`]). Under systemd the masters
//! report each step over `NOTIFY_SOCKET` and can serve on a socket systemd passed
//! ([`master::systemd`]).
//!
//! # Layout
//!
//! - [`config`]: `host.toml` -> checked `Config`.
//! - [`protocol`]: typed master/worker/CLI messages and their framing.
//! - [`master`]: the event loop, [`master::supervisor`] (the state machine, which decides and
//!   acts through its `Effects`; `master::system` is the real one), the control socket,
//!   the pidfile, `state_dir` (who may own it, and recreating it when deleted), plugin snapshots, the open-files limit the workers inherit, dev mode's watcher
//!   and build command ([`master::build`], which also runs once before the master starts).
//! - [`worker`]: HTTP serving and drain; [`worker::loader`] loads the plugin, and `worker::calls`
//!   and `worker::abi_io` are where each request calls plugin code;
//!   [`worker::trial`] is the throwaway worker `host check` starts ([`check`]) to try a plugin.
//! - [`logging`]: who wrote each line, as text or JSON (`log_format`).
//! - `ratelimit`: at most one log line per cause per second, with a count, for errors that
//!   repeat as fast as a loop spins (`accept` out of file descriptors).
//! - `counters`: the request counters each worker keeps in its cell of that page, which the
//!   master adds up per generation for `/metrics` (served by [`master::admin`]).
//! - `plugin_metrics`: the plugin's own metric series in each worker's cell of that page
//!   (layout, registration, the master's defensive read and sums).
//! - `fd`: inherited file descriptors; `worker_table`: the page the master shares with every
//!   worker, a cell each (connection counts for balance, requests in flight, counters).
//!
//! `unsafe` is denied here and allowed only in these files, each block with its `SAFETY`
//! comment: `fd`, `worker_table` (the mapping), the worker's plugin boundary
//! (`worker::loader`, `worker::calls`, `worker::callbacks`, `worker::abi_io`,
//! `worker::metrics_abi`, `worker::gateway_abi`), `worker::listener` (syscalls
//! on fd 3 by number), `gateway::handoff` (owning the descriptors a datagram brought), `worker::first_poll` (a waker's vtable), and one `setpriority` call for the
//! snapshot thread (`master::snapshot`). The master's supervisor has none: what it does to processes goes
//! through its `Effects` (`master::system`).
//!
//! This file is the binary's edge: the CLI, choosing the role, printing to the terminal, and the
//! only place `anyhow` is used.

#![deny(unsafe_code)]

mod check;
mod cli;
mod config;
mod counters;
mod fd;
mod gateway;
mod logging;
mod master;
mod plugin_metrics;
mod protocol;
mod ratelimit;
mod worker;
mod worker_table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use config::Config;
use logging::LogFormat;
use master::control::ControlError;
use protocol::ControlRequest;

/// The environment variable through which `start -d` hands the master its readiness pipe.
pub(crate) const START_NOTIFY_ENV: &str = "HOST_START_NOTIFY_FD";

/// What the master tells a process it spawns (a worker, a gateway) on its command line.
#[derive(clap::Args)]
pub(crate) struct SpawnArgs {
    #[arg(long)]
    pub(crate) slot: u32,
    #[arg(long)]
    pub(crate) generation: u64,
    #[arg(long)]
    pub(crate) master_pid: u32,
    /// CLOCK_MONOTONIC (ns) when the master spawned it, for the startup timings.
    #[arg(long, default_value_t = 0)]
    pub(crate) spawned_at_ns: u64,
    #[arg(long, default_value = "text", value_parser = parse_log_format)]
    pub(crate) log_format: LogFormat,
}

#[derive(Parser)]
#[command(
    name = "host",
    version,
    about = "A hot-reloadable HTTP plugin host: a master, N workers, zero-error rolling reloads."
)]
struct Cli {
    /// Config file; every command finds the running master through it.
    #[arg(short, long, global = true, default_value = config::DEFAULT_FILE)]
    config: PathBuf,
    /// How long to wait for the master, e.g. "5s", "2m" [default: status 5s; reload and
    /// rollback 2 x workers x start_timeout + 30s; stop graceful_timeout + 15s; start -d
    /// workers x start_timeout + 30s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the master and its workers (in the foreground unless -d).
    Start {
        /// Run in the background; return once serving (or with the reason it could not start).
        #[arg(short, long)]
        daemon: bool,
        #[command(flatten)]
        dev: DevFlags,
    },
    /// Roll every worker onto a fresh snapshot of the plugin; waits for the outcome. With a
    /// canary (`canary_workers`), the first new workers are judged on live traffic for
    /// `canary_analysis` first: promoted, or rolled back by themselves (exit status 1). With
    /// worker groups: the named groups, one after another (none: every reloadable group).
    Reload {
        /// Worker groups to reload (`[[group]]` names); none: every group with `reloadable`.
        #[arg(value_name = "GROUP")]
        groups: Vec<String>,
        /// New workers to judge before the rest (config `canary_workers`; 0: no canary).
        #[arg(long, value_name = "N")]
        canary: Option<u32>,
        /// How long to judge them (config `canary_analysis`), e.g. "30s".
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        analysis: Option<Duration>,
    },
    /// End the canary's analysis now and roll its generation out to every worker (or end the
    /// watch period of a generation that already serves everywhere).
    Promote {
        /// The worker group (required when the config has several).
        group: Option<String>,
    },
    /// Roll the canary under analysis back now (or the generation in its watch period: back
    /// to the previous one); its build is refused like a failed one.
    Abort {
        /// The worker group (required when the config has several).
        group: Option<String>,
    },
    /// Roll every worker back onto the generation that served before the current one.
    Rollback {
        /// The worker group (required when the config has several).
        group: Option<String>,
    },
    /// Stop gracefully; returns when every process has exited.
    Stop,
    /// Stop (if running), then start in the background.
    Restart,
    /// Replace the running master by the `host` binary now on disk, without closing the
    /// listener; waits until the new master serves and the old one has exited.
    Upgrade,
    /// Check the config file, then load the plugin in a throwaway worker (ABI checks,
    /// on_worker_start with [plugin_config], on_worker_stop): 0 and a summary, or one line saying
    /// why. Touches no running host.
    Check {
        /// Also show the check worker's log (the plugin's own lines included) on stderr.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Show the master, its workers and the last reload.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    #[command(name = "__worker", hide = true)]
    Worker(SpawnArgs),
    /// A gateway group's process: holds WebSocket clients, loads no plugin.
    #[command(name = "__gateway", hide = true)]
    Gateway(SpawnArgs),
    /// `host check`'s throwaway worker: loads the plugin, starts and stops it, reports.
    #[command(name = "__check-plugin", hide = true)]
    CheckPlugin {
        #[arg(long, default_value = "text", value_parser = parse_log_format)]
        log_format: LogFormat,
    },
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    LogFormat::from_name(s).ok_or_else(|| format!("{s:?} is not a log format (text or json)"))
}

/// Dev mode, from the command line (each overrides its config key). Relative paths, and the
/// directory `--build` runs in, are the current directory's (config keys: the config file's).
#[derive(clap::Args, Clone, Default)]
struct DevFlags {
    /// Reload by itself when the plugin file changes (config `watch = true`).
    #[arg(long)]
    watch: bool,
    /// Run CMD when a watched source changes and reload when it succeeds (config `build`; implies --watch).
    #[arg(long, value_name = "CMD")]
    build: Option<String>,
    /// A source directory for --build to watch; repeatable (config `watch_paths`).
    #[arg(long = "watch-path", value_name = "DIR")]
    watch_paths: Vec<PathBuf>,
}

impl DevFlags {
    fn apply(&self, cfg: &mut Config) -> anyhow::Result<()> {
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        if !self.watch_paths.is_empty() {
            cfg.watch_paths = self.watch_paths.iter().map(|p| cwd.join(p)).collect();
            cfg.overridden.push("watch_paths");
        }
        if let Some(build) = &self.build {
            if cfg.watch_paths.is_empty() {
                bail!(
                    "--build needs --watch-path DIR (or `watch_paths` in {}): the sources whose changes run it",
                    cfg.file.display()
                );
            }
            cfg.build = Some(build.clone());
            cfg.build_dir = cwd;
            cfg.overridden.push("build");
        }
        if !cfg.watch && (self.watch || cfg.build.is_some()) {
            cfg.watch = true;
            cfg.overridden.push("watch");
        }
        Ok(())
    }

    /// The same flags, for the re-exec'd daemon.
    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        if self.watch {
            args.push("--watch".into());
        }
        if let Some(build) = &self.build {
            args.extend(["--build".into(), build.into()]);
        }
        for p in &self.watch_paths {
            args.push("--watch-path".into());
            args.push(
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.clone())
                    .into_os_string(),
            );
        }
        args
    }
}

/// The longest `--timeout`, and the cap on the defaults derived from the config.
const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(format!("{s:?} is out of range 1ns..=30days"));
    }
    Ok(d)
}

/// How long each command waits for the master when `--timeout` is not given. Bounded config
/// values keep these from overflowing; they are capped at [`MAX_TIMEOUT`] anyway.
fn default_timeout(cfg: &Config, command: &Command) -> Duration {
    let workers = u32::try_from(cfg.workers).unwrap_or(u32::MAX);
    let margin = Duration::from_secs(30);
    let d = match command {
        Command::Status { .. } => Some(Duration::from_secs(5)),
        // A queued reload waits for the running one; a failed one rolls slots back.
        Command::Reload { analysis, .. } => cfg
            .start_timeout
            .checked_mul(workers.saturating_mul(2))
            .and_then(|d| d.checked_add(margin))
            .and_then(|d| d.checked_add(analysis.unwrap_or(cfg.canary.analysis))),
        Command::Rollback { .. } => cfg
            .start_timeout
            .checked_mul(workers.saturating_mul(2))
            .and_then(|d| d.checked_add(margin)),
        // A promotion rolls out to every worker; an abort moves the canary's slots back.
        Command::Promote { .. } | Command::Abort { .. } => cfg
            .start_timeout
            .checked_mul(workers.saturating_mul(2))
            .and_then(|d| d.checked_add(margin)),
        // Draining workers are SIGKILLed 2 s past graceful_timeout; then the master exits.
        Command::Stop | Command::Restart => {
            cfg.graceful_timeout.checked_add(Duration::from_secs(15))
        }
        // The new master's deadline (start_timeout for itself and per worker, plus 5 s), then
        // the old master's drain.
        Command::Upgrade => cfg
            .start_timeout
            .checked_mul(workers.saturating_add(1))
            .and_then(|d| d.checked_add(cfg.graceful_timeout))
            .and_then(|d| d.checked_add(Duration::from_secs(20))),
        Command::Start { .. } => cfg
            .start_timeout
            .checked_mul(workers)
            .and_then(|d| d.checked_add(margin)),
        Command::Check { .. }
        | Command::Worker(_)
        | Command::Gateway(_)
        | Command::CheckPlugin { .. } => None,
    };
    d.unwrap_or(MAX_TIMEOUT).min(MAX_TIMEOUT)
}

/// `error: source: source...` on one line.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker(args) => return worker::run(args),
        Command::Gateway(args) => return gateway::run(args),
        Command::CheckPlugin { log_format } => return worker::trial::run(log_format),
        _ => {}
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The widest of the groups' values that a command's wait derives from, so a default
/// `--timeout` covers the largest group.
fn widest(groups: &[Config]) -> Config {
    let mut cfg = groups[0].clone();
    for g in &groups[1..] {
        cfg.workers = cfg.workers.max(g.workers);
        cfg.start_timeout = cfg.start_timeout.max(g.start_timeout);
        cfg.graceful_timeout = cfg.graceful_timeout.max(g.graceful_timeout);
        cfg.canary.analysis = cfg.canary.analysis.max(g.canary.analysis);
    }
    cfg
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut groups = Config::load_all(&cli.config)?;
    let cfg = groups[0].clone();
    let timeout = cli
        .timeout
        .unwrap_or_else(|| default_timeout(&widest(&groups), &cli.command));
    match cli.command {
        Command::Check { verbose } => {
            let options = check::Options {
                timeout: cli.timeout,
                verbose,
            };
            for cfg in &groups {
                if let Some(gw) = &cfg.gateway {
                    println!(
                        "ok: {}, group {}: a gateway (the host's own code) for group {}",
                        cfg.file.display(),
                        cfg.group,
                        gw.business
                    );
                    continue;
                }
                let ok = check::run(cfg, &options).map_err(|e| match cfg.explicit_group {
                    true => anyhow::anyhow!("group {:?}: {e}", cfg.group),
                    false => e.into(),
                })?;
                let group = match cfg.explicit_group {
                    true => format!(", group {}", cfg.group),
                    false => String::new(),
                };
                println!(
                    "ok: {}{group}; plugin {}: {} {} (sha256 {}, plugin-api {}) started and stopped in {} ms",
                    cfg.file.display(),
                    cfg.plugin.display(),
                    ok.plugin.name,
                    ok.plugin.version,
                    &ok.plugin.sha256[..ok.plugin.sha256.len().min(12)],
                    ok.plugin.api_version,
                    ok.took.as_millis()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Start { daemon: false, dev } => {
            for g in &mut groups {
                dev.apply(g)?;
            }
            cli::start_foreground(groups)
        }
        Command::Start { daemon: true, dev } => {
            for g in &mut groups {
                dev.apply(g)?;
            }
            cli::start_daemon(&groups, &dev, timeout)
        }
        Command::Reload {
            groups: names,
            canary: None,
            analysis: None,
        } => cli::reload(&groups, &names, ControlRequest::Reload, timeout),
        Command::Reload {
            groups: names,
            canary,
            analysis,
        } => {
            let flags = protocol::CanaryOverride {
                workers: canary,
                analysis_ms: analysis.map(|d| d.as_millis().max(1) as u64),
            };
            cli::reload(&groups, &names, ControlRequest::ReloadWith(flags), timeout)
        }
        Command::Promote { group } => {
            let request = cli::one_group(&groups, group, "promote", ControlRequest::Promote)?;
            cli::verdict(&cfg, request, timeout)
        }
        Command::Abort { group } => {
            let request = cli::one_group(&groups, group, "abort", ControlRequest::Abort)?;
            cli::verdict(&cfg, request, timeout)
        }
        Command::Rollback { group } => {
            let request = cli::one_group(&groups, group, "rollback", ControlRequest::Rollback)?;
            cli::rollout(&cfg, request, timeout)
        }
        Command::Stop => {
            cli::stop(&cfg, timeout)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart => {
            match cli::stop(&cfg, timeout) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.downcast_ref::<ControlError>(),
                        Some(ControlError::NotRunning { .. })
                    ) => {}
                Err(e) => return Err(e),
            }
            let start = Command::Start {
                daemon: true,
                dev: DevFlags::default(),
            };
            let timeout = cli
                .timeout
                .unwrap_or_else(|| default_timeout(&widest(&groups), &start));
            cli::start_daemon(&groups, &DevFlags::default(), timeout)
        }
        Command::Status { json } => cli::status(&cfg, json, timeout),
        Command::Upgrade => cli::upgrade(&cfg, timeout),
        Command::Worker(_) | Command::Gateway(_) | Command::CheckPlugin { .. } => {
            unreachable!("handled in main")
        }
    }
}
