//! The `__check-plugin` role: `host check`'s trial worker. It does what a worker's on-start
//! hook does with a plugin, with the same start-up sequence ([`super::startup`]: the `Start`
//! handshake, `dlopen`, the ABI header checks, `on_worker_start` with the `[plugin_config]` it
//! is given), reports over its channel as a worker would (`Ready` or `StartFailed`), then runs
//! the plugin's drain signal and `on_worker_stop` and exits: 0 when all of it went well.
//!
//! It never inherits or binds a listening socket, never serves a request, and knows no master:
//! its parent is the `host check` process, which chose and copied the file it loads.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::ExitCode;

use nix::sys::signal::Signal;

use super::startup;
use crate::fd;
use crate::logging::{LogFormat, Process};
use crate::protocol::{StartupTimings, WorkerToMaster};

/// Entry point of the `__check-plugin` role.
pub fn run(log_format: LogFormat) -> ExitCode {
    crate::logging::init(Process::Check, log_format);
    // Die with `host check` (it kills this process when its timeout passes, too).
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        tracing::warn!(error = %e, "cannot set the parent-death signal");
    }
    let channel = match fd::take_inherited(fd::CHANNEL_FD, "channel") {
        Ok(c) => StdUnixStream::from(c),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(rt) = startup::io_runtime() else {
        return ExitCode::FAILURE;
    };
    let code = rt.block_on(trial(channel));
    rt.shutdown_background();
    code
}

async fn trial(channel: StdUnixStream) -> ExitCode {
    let Some(mut start) = startup::handshake(channel, None).await else {
        return ExitCode::FAILURE;
    };
    let Some(plugin) = startup::load_plugin(&mut start.tx, &start.spec, true).await else {
        return ExitCode::FAILURE;
    };
    tracing::info!(plugin = %plugin.info.name, version = %plugin.info.version, "plugin loaded and started");
    let ready = WorkerToMaster::Ready {
        plugin: plugin.info.clone(),
        startup: StartupTimings::default(),
    };
    if start.tx.send(&ready).await.is_err() {
        return ExitCode::FAILURE;
    }
    // The end of a worker's life, at once: the drain signal, then `on_worker_stop`.
    plugin.on_drain();
    plugin.stop();
    tracing::info!("on_worker_stop returned");
    ExitCode::SUCCESS
}
