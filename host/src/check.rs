//! `host check`: is this deployment good to go? The config file is checked by [`Config::load_all`]
//! before this runs; here the configured plugin is tried in a throwaway worker, the way a reload's
//! canary would try it: the same file checks and snapshot (into a private temporary directory,
//! removed afterwards), then `/proc/self/exe __check-plugin` loads that copy with the ABI checks
//! and runs `on_worker_start` with `[plugin_config]`, then `on_worker_stop`, bounded by
//! `start_timeout` (or `--timeout`) each. A failure is the one-line reason a reload would give.
//!
//! It never loads plugin code in this process, never binds the listen address and never touches
//! `state_dir` (pidfile, control socket, snapshots): it only reads the metadata of `state_dir`
//! and its parents, to refuse one that `start` would refuse (see `master::state_dir`). It runs
//! as well before `host start` as next to a running host, which it neither asks nor disturbs.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

use crate::config::Config;
use crate::master::snapshot;
use crate::master::supervisor::describe_exit;
use crate::protocol::{MasterToWorker, PluginInfo, Receiver, Sender, WorkerSpec, WorkerToMaster};

/// Why the plugin would not serve: the reason a reload to it would be refused with.
#[derive(Debug, thiserror::Error)]
#[error("check failed: {reason}")]
pub struct CheckError {
    pub reason: String,
}

/// What a good plugin looks like, for the summary line.
pub struct Checked {
    pub plugin: PluginInfo,
    pub took: Duration,
}

/// How the check is run.
pub struct Options {
    /// How long the plugin may take to start, and then to stop (`--timeout`); `None`:
    /// `start_timeout`.
    pub timeout: Option<Duration>,
    /// Show the check worker's log (the plugin's own lines included) on stderr.
    pub verbose: bool,
}

/// A private temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("host-check-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Tries `cfg`'s plugin in a throwaway worker (see the module doc).
pub fn run(cfg: &Config, options: &Options) -> Result<Checked, CheckError> {
    let failed = |reason: String| CheckError { reason };
    let began = Instant::now();
    crate::master::state_dir::check(&cfg.state_dir).map_err(|e| failed(e.to_string()))?;
    let dir = TempDir::new().map_err(|e| {
        failed(format!(
            "cannot create a temporary directory in {}: {e}",
            std::env::temp_dir().display()
        ))
    })?;
    let limits = snapshot::Limits {
        allow_writable: cfg.allow_writable_plugin,
        max_bytes: cfg.max_plugin_bytes,
    };
    let copy = snapshot::take(&cfg.plugin, &dir.0, limits, &AtomicBool::new(false))
        .map_err(|e| failed(crate::error_chain(&e)))?;
    let label = format!(
        "{} (sha256 {})",
        cfg.plugin.display(),
        &copy.sha256[..copy.sha256.len().min(12)]
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("cannot start the runtime: {e}")))?;
    let spec = WorkerSpec {
        // A check balances nothing, beats no heart and serves no traffic worth a line.
        accept_balance: false,
        heartbeat_ms: 0,
        access_log: None,
        ..cfg.worker_spec(crate::config::WorkerStart {
            slot: 0,
            generation: 0,
            plugin: copy.path.clone(),
            plugin_sha256: copy.sha256.clone(),
            plugin_config: &cfg.plugin_config,
            table_cell: None,
            table_cells: 0,
            max_requests: 0,
            max_requests_jitter: 0,
        })
    };
    let plugin = rt
        .block_on(throwaway_worker(cfg, spec, options))
        .map_err(|reason| failed(format!("{label}: {reason}")))?;
    // The copy goes with `dir`, after the worker that mapped it has exited.
    drop(dir);
    Ok(Checked {
        plugin,
        took: began.elapsed(),
    })
}

/// Starts `__check-plugin` with `spec` and follows it to its exit; `Err` is the reason, as the
/// master words a failed start.
async fn throwaway_worker(
    cfg: &Config,
    spec: WorkerSpec,
    options: &Options,
) -> Result<PluginInfo, String> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("cannot create a channel: {e}"))?;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0(std::env::args_os().next().unwrap_or_else(|| "host".into()))
        .arg("__check-plugin")
        .args(["--log-format", cfg.log_format.name()])
        .stdin(Stdio::null());
    if options.verbose {
        // Plugin code may print to stdout: keep this command's stdout for its summary.
        let stderr = std::os::fd::AsFd::as_fd(&std::io::stderr())
            .try_clone_to_owned()
            .map_err(|e| format!("cannot duplicate stderr: {e}"))?;
        cmd.stdout(Stdio::from(stderr)).stderr(Stdio::inherit());
    } else {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: theirs.into(),
        child_fd: crate::fd::CHANNEL_FD,
    }])
    .map_err(|e| format!("cannot pass the channel: {e}"))?;
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the check worker: {e}"))?;
    ours.set_nonblocking(true)
        .map_err(|e| format!("cannot use the channel: {e}"))?;
    let stream = tokio::net::UnixStream::from_std(ours)
        .map_err(|e| format!("cannot use the channel: {e}"))?;
    let (rd, wr) = stream.into_split();
    let mut rx = Receiver::<_, WorkerToMaster>::new(rd);
    // A failed send shows as the worker's exit below.
    let _ = Sender::<_, MasterToWorker>::new(wr)
        .send(&MasterToWorker::Start(spec))
        .await;

    let limit = options.timeout.unwrap_or(cfg.start_timeout);
    let limit_name = match options.timeout {
        Some(_) => "--timeout",
        None => "start_timeout",
    };
    let limit_text = humantime::format_duration(limit);
    let deadline = tokio::time::Instant::now() + limit;
    // Until ready: the worker's report, its exit, or the deadline.
    let plugin = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(Some(WorkerToMaster::Ready { plugin, .. })) => break plugin,
                Ok(Some(WorkerToMaster::StartFailed { reason })) => return Err(reason),
                Ok(Some(_)) => {}
                // The channel closed: the worker is gone; its exit says how.
                _ => {
                    let status = tokio::time::timeout_at(deadline, child.wait()).await;
                    return Err(match status {
                        Ok(status) => format!("worker {} during start", describe_exit(&status)),
                        Err(_) => format!("did not become ready within {limit_name} ({limit_text})"),
                    });
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("did not become ready within {limit_name} ({limit_text})"));
            }
        }
    };
    // Then `on_worker_stop`, bounded the same way.
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(plugin),
        Ok(status) => Err(format!(
            "{} {}: on_worker_stop: worker {}",
            plugin.name,
            plugin.version,
            describe_exit(&status)
        )),
        Err(_) => Err(format!(
            "{} {}: on_worker_stop did not return within {limit_name} ({limit_text})",
            plugin.name, plugin.version
        )),
    }
}
