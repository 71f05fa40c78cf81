//! The commands a person runs (`start`, `reload`, `rollback`, `promote`, `abort`, `stop`,
//! `status`, `upgrade`): each
//! starts the master or talks to it over the control socket, and prints what happened.
//!
//! This module owns the client side of the control protocol and the wording of the CLI's
//! output. It never supervises workers and never serves HTTP; `main.rs` parses the command line
//! and dispatches here.

use std::io::Read as _;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use command_fds::{CommandFdExt, FdMapping};

use crate::config::Config;
use crate::master::control::{self, ControlError};
use crate::master::pidfile;
use crate::protocol::{
    CanaryFigures, CanaryVerdict, ControlRequest, ControlResponse, ReloadReport, StatusReport,
};
use crate::{DevFlags, START_NOTIFY_ENV, error_chain, fd, logging, master};

fn client<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    Ok(rt.block_on(f))
}

pub(crate) fn start_foreground(groups: Vec<Config>) -> anyhow::Result<ExitCode> {
    let cfg = groups.first().context("no worker group")?.clone();
    let notify = match std::env::var(START_NOTIFY_ENV) {
        Ok(v) if v == fd::LISTENER_FD.to_string() => {
            // Started by `start -d`: leave the terminal's session and report through fd 3.
            let _ = nix::unistd::setsid();
            Some(std::fs::File::from(fd::take_inherited(
                fd::LISTENER_FD,
                "start notification pipe",
            )?))
        }
        // Started by `host upgrade`: the pidfile is locked by design (the old master passed its
        // lock on), and the old master's build already ran.
        _ if std::env::var_os(master::binary_upgrade::FROM_ENV).is_some() => None,
        _ => {
            refuse_if_running(&cfg)?;
            build_at_start(&groups)?;
            None
        }
    };
    logging::init(logging::Process::Master, cfg.log_format);
    let _ = nix::sys::prctl::set_name(c"host-master");
    master::run(groups, notify)?;
    Ok(ExitCode::SUCCESS)
}

fn refuse_if_running(cfg: &Config) -> anyhow::Result<()> {
    if pidfile::is_locked(&cfg.pid_file()) {
        let pid = std::fs::read_to_string(cfg.pid_file()).unwrap_or_default();
        bail!(
            "host is already running with this config (master pid {}, pidfile {})",
            pid.trim(),
            cfg.pid_file().display()
        );
    }
    Ok(())
}

/// Dev mode: the build runs once before the master starts (each group's that has one), so the
/// first responses come from a fresh build; a failed one refuses the start.
fn build_at_start(groups: &[Config]) -> anyhow::Result<()> {
    for cfg in groups {
        if let Some(build) = &cfg.build {
            let took = master::build::at_start(build, &cfg.build_dir)?;
            eprintln!("build succeeded in {} ms", took.as_millis());
        }
    }
    Ok(())
}

pub(crate) fn start_daemon(
    groups: &[Config],
    dev: &DevFlags,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let cfg = groups.first().context("no worker group")?;
    refuse_if_running(cfg)?;
    build_at_start(groups)?;
    master::ensure_state_dir(cfg)?;
    let log_path = cfg.log_file();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log file {}", log_path.display()))?;
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create a pipe")?;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0(std::env::args_os().next().unwrap_or_else(|| "host".into()))
        .arg("--config")
        .arg(&cfg.file)
        .arg("start")
        .args(dev.args())
        .env(START_NOTIFY_ENV, fd::LISTENER_FD.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().context("cannot duplicate the log file")?)
        .stderr(log);
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: write_end,
        child_fd: fd::LISTENER_FD,
    }])?;
    let mut child = cmd.spawn().context("cannot start the master")?;
    drop(cmd); // closes our copy of the pipe's write end, so EOF means the master closed it
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::fs::File::from(read_end).read_to_string(&mut line);
        let _ = tx.send(line);
    });
    let Ok(line) = rx.recv_timeout(timeout) else {
        bail!(
            "timed out after {} waiting for the master (pid {}) to report that it serves; it goes on starting (log: {}; --timeout sets the limit)",
            humantime::format_duration(timeout),
            child.id(),
            log_path.display()
        );
    };
    let line = line.trim();
    if let Some(serving) = line.strip_prefix("serving ") {
        println!(
            "host started: serving {serving}; log: {}",
            log_path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let _ = child.wait();
    let reason = match line.strip_prefix("error: ") {
        Some(reason) => reason.to_string(),
        None => {
            last_error_line(&log_path).unwrap_or_else(|| "the master exited during start".into())
        }
    };
    bail!("host did not start: {reason} (log: {})", log_path.display())
}

fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find(|l| l.contains("error"))
        .map(|l| l.trim().to_string())
}

fn ask(
    cfg: &Config,
    request: ControlRequest,
    timeout: Duration,
) -> anyhow::Result<ControlResponse> {
    Ok(client(control::request(
        &cfg.control_socket(),
        request,
        timeout,
    ))??)
}

fn print_reload(report: &ReloadReport) {
    let sha = report
        .sha256
        .as_deref()
        .map_or("-", |s| &s[..s.len().min(12)]);
    let config_sha = report
        .config_sha256
        .as_deref()
        .map_or("-", |s| &s[..s.len().min(12)]);
    let what = if report.kind == "rollback" {
        "rolled back"
    } else {
        "reloaded"
    };
    match &report.error {
        None => println!(
            "{what}: generation {} serving (sha256 {sha}, config {config_sha}) in {} ms; started {:?}, draining {:?}",
            report.generation, report.duration_ms, report.started_pids, report.drained_pids
        ),
        Some(error) => eprintln!(
            "error: {} to generation {} failed: {error}; still serving generation {}",
            report.kind, report.generation, report.serving_generation
        ),
    }
    match &report.verdict {
        // The error said why; the figures, one generation a line.
        Some(v) if report.error.is_some() => {
            eprintln!("  new {}", figures(&v.canary));
            eprintln!("  old {}", figures(&v.baseline));
        }
        Some(v) => print_verdict(v),
        None => {}
    }
    if !report.ignored_keys.is_empty() {
        eprintln!(
            "note: {}",
            crate::config::Config::frozen_keys_note(&report.ignored_keys)
        );
    }
}

/// `request` for `group`, or as it is (a file without groups: the master's one group).
pub(crate) fn for_group(group: Option<&str>, request: ControlRequest) -> ControlRequest {
    match group {
        Some(group) => ControlRequest::Group {
            group: group.to_string(),
            request: Box::new(request),
        },
        None => request,
    }
}

/// The groups a command names, checked against the config file. `None` for a file without
/// groups.
pub(crate) fn groups_named<'a>(
    groups: &'a [Config],
    names: &[String],
) -> anyhow::Result<Option<Vec<&'a Config>>> {
    if !groups.iter().any(|g| g.explicit_group) {
        if let Some(name) = names.iter().find(|n| *n != &groups[0].group) {
            bail!(
                "no group named {name:?}: {} has no [[group]] tables (its one group is {:?})",
                groups[0].file.display(),
                groups[0].group
            );
        }
        return Ok(None);
    }
    let mut named = Vec::new();
    for name in names {
        match groups.iter().find(|g| &g.group == name) {
            Some(g) => named.push(g),
            None => {
                let all: Vec<&str> = groups.iter().map(|g| g.group.as_str()).collect();
                bail!(
                    "no group named {name:?} in {} (groups: {})",
                    groups[0].file.display(),
                    all.join(", ")
                );
            }
        }
    }
    Ok(Some(named))
}

/// `host reload [GROUP...]`: each named group (none: every reloadable one, the others skipped
/// and named) reloads in turn, one after another in the order given; a failed one does not stop
/// the next, and the exit status is 1 if any failed.
pub(crate) fn reload(
    groups: &[Config],
    names: &[String],
    request: ControlRequest,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let Some(named) = groups_named(groups, names)? else {
        return rollout(&groups[0], request, timeout);
    };
    let targets: Vec<&Config> = match names.is_empty() {
        false => named,
        true => {
            for g in groups.iter().filter(|g| !g.reloadable) {
                println!(
                    "skipped group {:?}: reloadable = false (`host restart` or `host upgrade` replaces its workers)",
                    g.group
                );
            }
            groups.iter().filter(|g| g.reloadable).collect()
        }
    };
    let mut code = ExitCode::SUCCESS;
    for g in targets {
        println!("group {:?}:", g.group);
        match rollout(g, for_group(Some(&g.group), request.clone()), timeout) {
            Ok(c) if c == ExitCode::SUCCESS => {}
            Ok(c) => code = c,
            Err(e) => {
                eprintln!("error: group {:?}: {}", g.group, error_chain(e.as_ref()));
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

/// `request` for the one group a command names (`rollback GROUP`, `promote GROUP`, `abort
/// GROUP`): required when the file has more than one.
pub(crate) fn one_group(
    groups: &[Config],
    name: Option<String>,
    command: &str,
    request: ControlRequest,
) -> anyhow::Result<ControlRequest> {
    let names: Vec<String> = name.into_iter().collect();
    let group = match groups_named(groups, &names)? {
        None => None,
        Some(named) if named.len() == 1 => Some(named[0].group.as_str()),
        Some(_) if groups.len() == 1 => Some(groups[0].group.as_str()),
        Some(_) => {
            let all: Vec<&str> = groups.iter().map(|g| g.group.as_str()).collect();
            bail!(
                "`host {command}` needs the group to act on: host {command} GROUP (groups: {})",
                all.join(", ")
            )
        }
    };
    Ok(for_group(group, request))
}

pub(crate) fn rollout(
    cfg: &Config,
    request: ControlRequest,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    match ask(cfg, request, timeout)? {
        ControlResponse::Reloaded(report) => {
            print_reload(&report);
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::ReloadFailed(report) => {
            print_reload(&report);
            Ok(ExitCode::FAILURE)
        }
        ControlResponse::Refused { reason } => bail!("refused: {reason}"),
        other => bail!("unexpected answer from the master: {other:?}"),
    }
}

/// One generation's judged figures, for a line.
fn figures(f: &CanaryFigures) -> String {
    let p99 = f.p99_ms.map_or("-".to_string(), |ms| format!("{ms} ms"));
    format!(
        "generation {} ({} workers): {} requests, 5xx {:.1}% ({}), p99 {p99}, {} panics, {} crashes",
        f.generation,
        f.workers,
        f.requests,
        f.error_share * 100.0,
        f.errors,
        f.panics,
        f.crashes
    )
}

/// A canary's verdict: its outcome and the figures that decided, on stderr.
fn print_verdict(v: &CanaryVerdict) {
    eprintln!(
        "canary: generation {} {}: {}",
        v.generation,
        v.outcome.replace('_', " "),
        v.reason
    );
    eprintln!("  new {}", figures(&v.canary));
    eprintln!("  old {}", figures(&v.baseline));
}

/// `host promote` and `host abort`: waits until the rollout they end is over.
pub(crate) fn verdict(
    cfg: &Config,
    request: ControlRequest,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let abort = match &request {
        ControlRequest::Group { request, .. } => matches!(**request, ControlRequest::Abort),
        request => matches!(request, ControlRequest::Abort),
    };
    match ask(cfg, request, timeout)? {
        ControlResponse::Judged(v) => {
            println!(
                "generation {} kept: its watch period ended by hand",
                v.generation
            );
            print_verdict(&v);
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::Reloaded(report) if !abort => {
            print_reload(&report);
            Ok(ExitCode::SUCCESS)
        }
        // An abort succeeds when the judged generation no longer serves.
        ControlResponse::Reloaded(report) | ControlResponse::ReloadFailed(report)
            if abort
                && report
                    .verdict
                    .as_ref()
                    .is_some_and(|v| v.generation != report.serving_generation) =>
        {
            let judged = report.verdict.as_ref().map_or(0, |v| v.generation);
            println!(
                "aborted: generation {judged} rolled back; serving generation {}",
                report.serving_generation
            );
            if let Some(v) = &report.verdict {
                print_verdict(v);
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::Reloaded(report) | ControlResponse::ReloadFailed(report) => {
            print_reload(&report);
            Ok(ExitCode::FAILURE)
        }
        ControlResponse::Refused { reason } => bail!("refused: {reason}"),
        other => bail!("unexpected answer from the master: {other:?}"),
    }
}

pub(crate) fn stop(cfg: &Config, timeout: Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    match ask(cfg, ControlRequest::Stop, timeout)? {
        ControlResponse::Stopped { master_pid } => {
            // The master answers once every worker has exited; now wait for the master itself
            // (it only has to flush the answer and remove its files: a few seconds at least).
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(3));
            if !pidfile::wait_exited(master_pid, left) {
                bail!(
                    "timed out after {} waiting for master pid {master_pid} to exit after it answered `stopped`",
                    humantime::format_duration(left)
                );
            }
            println!("host stopped (master pid {master_pid})");
            Ok(())
        }
        ControlResponse::Refused { reason } => bail!("stop refused: {reason}"),
        other => bail!("unexpected answer from the master: {other:?}"),
    }
}

pub(crate) fn upgrade(cfg: &Config, timeout: Duration) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    match ask(cfg, ControlRequest::Upgrade, timeout)? {
        ControlResponse::Upgraded(r) => {
            println!(
                "upgraded: master pid {} serving (host {}, build {}, {}) in {} ms; old master pid {} draining",
                r.new_pid,
                r.version,
                r.build,
                r.exe.display(),
                r.duration_ms,
                r.old_pid
            );
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(3));
            if !pidfile::wait_exited(r.old_pid, left) {
                bail!(
                    "timed out after {} waiting for the old master pid {} to drain and exit (master pid {} serves)",
                    humantime::format_duration(left),
                    r.old_pid,
                    r.new_pid
                );
            }
            println!("old master pid {} exited", r.old_pid);
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::UpgradeFailed { reason } => {
            eprintln!("error: upgrade failed: {reason}; the old master serves on");
            Ok(ExitCode::FAILURE)
        }
        ControlResponse::Refused { reason } => bail!("upgrade refused: {reason}"),
        other => bail!("unexpected answer from the master: {other:?}"),
    }
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", n >> 10)
    }
}

pub(crate) fn status(cfg: &Config, json: bool, timeout: Duration) -> anyhow::Result<ExitCode> {
    let report: StatusReport = match ask(cfg, ControlRequest::Status, timeout) {
        Ok(ControlResponse::Status(report)) => *report,
        Ok(other) => bail!("unexpected answer from the master: {other:?}"),
        Err(e)
            if matches!(
                e.downcast_ref::<ControlError>(),
                Some(ControlError::NotRunning { .. })
            ) =>
        {
            eprintln!("{}", error_chain(e.as_ref()));
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    if report.groups.len() <= 1 {
        println!(
            "master pid {}  listen {}  generation {}  rss {}  host {} (build {})",
            report.master_pid,
            report.listen,
            report.generation,
            human_bytes(report.master_rss_bytes),
            report.version,
            report.build
        );
    } else {
        println!(
            "master pid {}  groups {}  rss {}  host {} (build {})",
            report.master_pid,
            report.groups.len(),
            human_bytes(report.master_rss_bytes),
            report.version,
            report.build
        );
    }
    if let Some(admin) = &report.admin_listen {
        println!("metrics http://{admin}/metrics");
    }
    if report.groups.len() <= 1 {
        print_group_status(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    for g in &report.groups {
        let reloadable = if g.reloadable {
            ""
        } else {
            "  reloadable = false"
        };
        println!(
            "\ngroup {}  listen {}  generation {}{reloadable}",
            g.group, g.listen, g.generation
        );
        print_group_status(g)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A gateway group's figures: clients, queues, the clients it closed, its cluster link.
fn print_gateway_status(g: &crate::protocol::GatewayStatus) {
    println!(
        "gateway: {} clients, {} queued, {} events unhandled, {} redelivered, {} refused",
        g.clients,
        human_bytes(g.queued_bytes),
        g.unhandled_events,
        g.redelivered_events,
        g.refused
    );
    // "cause N, ..." of the causes counted at least once.
    let nonzero = |by: &std::collections::BTreeMap<String, u64>| -> Vec<String> {
        by.iter()
            .filter(|(_, n)| **n > 0)
            .map(|(cause, n)| format!("{cause} {n}"))
            .collect()
    };
    let closed = nonzero(&g.closed);
    if !closed.is_empty() {
        println!("  closed by the host: {}", closed.join(", "));
    }
    if let Some(c) = &g.cluster {
        let errors = nonzero(&c.errors);
        let errors = match errors.is_empty() {
            true => "no errors".to_string(),
            false => format!("errors: {}", errors.join(", ")),
        };
        println!(
            "  cluster {} ({} of {} processes linked, {} connects), {} published, {} received, {errors}",
            c.state, c.up, c.processes, c.connects, c.published, c.received
        );
    }
}

/// One group's part of `status`: its listener, workers, slots, canary, build and last reload.
fn print_group_status(report: &StatusReport) -> anyhow::Result<()> {
    let l = &report.listener;
    if let Some(error) = &l.error {
        println!("listener DOWN: {error}");
    }
    if let Some(last) = &l.last_recovery {
        println!("listener re-armed {} times; last: {last}", l.recoveries);
    }
    println!(
        "{:<5} {:<8} {:<4} {:<9} {:>9} {:>9}  {:<12}  PLUGIN",
        "SLOT", "PID", "GEN", "STATE", "REQUESTS", "RSS", "CONFIG"
    );
    for w in &report.workers {
        let plugin = w.plugin.as_ref().map_or("-".to_string(), |p| {
            format!(
                "{} {} ({})",
                p.name,
                p.version,
                &p.sha256[..12.min(p.sha256.len())]
            )
        });
        let state = serde_json::to_value(w.state)?
            .as_str()
            .unwrap_or("?")
            .to_string();
        println!(
            "{:<5} {:<8} {:<4} {:<9} {:>9} {:>9}  {:<12}  {plugin}",
            w.slot,
            w.pid,
            w.generation,
            state,
            w.requests,
            human_bytes(w.rss_bytes),
            &w.config_sha256[..12.min(w.config_sha256.len())]
        );
    }
    for slot in report.slots.iter().filter(|s| s.state == "hung") {
        println!(
            "slot {} HUNG, replacement starting: {}",
            slot.slot,
            slot.last_error.as_deref().unwrap_or("unknown")
        );
    }
    for slot in report.slots.iter().filter(|s| s.state == "failing") {
        let retry = slot
            .retry_in_ms
            .map_or(String::new(), |ms| format!(", retrying in {ms} ms"));
        println!(
            "slot {} FAILING ({} failures{retry}): {}",
            slot.slot,
            slot.failures,
            slot.last_error.as_deref().unwrap_or("unknown")
        );
    }
    let recycled: u64 = report.slots.iter().map(|s| s.recycles).sum();
    if recycled > 0 {
        let per_slot: Vec<String> = report
            .slots
            .iter()
            .filter(|s| s.recycles > 0)
            .map(|s| format!("slot {}: {}", s.slot, s.recycles))
            .collect();
        println!("recycled: {recycled} workers ({})", per_slot.join(", "));
    }
    if let Some(g) = &report.gateway {
        print_gateway_status(g);
    }
    if let Some(c) = &report.canary {
        println!(
            "canary {}: generation {}, {} of {} s",
            c.phase,
            c.generation,
            c.elapsed_ms / 1000,
            c.period_ms / 1000
        );
        println!("  new {}", figures(&c.canary));
        println!("  old {}", figures(&c.baseline));
    }
    if let Some(v) = &report.last_verdict {
        let when =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(v.at));
        println!(
            "last canary: generation {} {} at {when}: {}",
            v.generation,
            v.outcome.replace('_', " "),
            v.reason
        );
    }
    if let Some(b) = &report.last_build {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(b.started_at),
        );
        match &b.error {
            None => println!("last build: ok at {when} in {} ms", b.duration_ms),
            Some(e) => println!("last build: FAILED at {when}: {e}"),
        }
    }
    match &report.last_reload {
        None => println!("last reload: none"),
        Some(r) => {
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(r.started_at),
            );
            match &r.error {
                None => println!(
                    "last reload: ok, generation {} at {when} in {} ms",
                    r.generation, r.duration_ms
                ),
                Some(e) => println!(
                    "last reload: FAILED, generation {} at {when}: {e}",
                    r.generation
                ),
            }
        }
    }
    Ok(())
}
