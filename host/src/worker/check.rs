//! The `__check-plugin` role: `host check`'s throwaway worker. It does what a worker's on-start
//! hook does with a plugin (`dlopen`, the ABI header checks, `on_worker_start` with the
//! `[plugin_config]` it is given), reports over its channel as a worker would (`Ready` or
//! `StartFailed`), then runs the plugin's drain signal and `on_worker_stop` and exits: 0 when
//! all of it went well.
//!
//! It never inherits or binds a listening socket, never serves a request, and knows no master:
//! its parent is the `host check` process, which chose and copied the file it loads.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::ExitCode;

use nix::sys::signal::Signal;

use super::loader::{self, Placement};
use crate::fd;
use crate::logging::{LogFormat, Process};
use crate::protocol::{MasterToWorker, StartupTimings, WorkerToMaster};

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
    let Some(rt) = super::io_runtime() else {
        return ExitCode::FAILURE;
    };
    let code = rt.block_on(check(channel));
    rt.shutdown_background();
    code
}

async fn check(channel: StdUnixStream) -> ExitCode {
    let (mut tx, mut rx) = match super::channel_halves(channel) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the channel");
            return ExitCode::FAILURE;
        }
    };
    let spec = match rx.recv().await {
        Ok(Some(MasterToWorker::Start(spec))) => spec,
        other => {
            tracing::error!(?other, "expected a Start order");
            return ExitCode::FAILURE;
        }
    };
    let at = Placement {
        slot: spec.slot,
        generation: spec.generation,
        sha256: spec.plugin_sha256.clone(),
        config: spec.plugin_config.clone(),
        config_dir: spec.config_dir.clone(),
        check: true,
    };
    let plugin = match loader::load(&spec.plugin, &at) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            // `host check` names the configured file: send the cause only, as a worker does.
            let reason = e.kind.to_string();
            let _ = tx.send(&WorkerToMaster::StartFailed { reason }).await;
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(plugin = %plugin.info.name, version = %plugin.info.version, "plugin loaded and started");
    let ready = WorkerToMaster::Ready {
        plugin: plugin.info.clone(),
        startup: StartupTimings::default(),
    };
    if tx.send(&ready).await.is_err() {
        return ExitCode::FAILURE;
    }
    // The end of a worker's life, at once: the drain signal, then `on_worker_stop`.
    plugin.on_drain();
    plugin.stop();
    tracing::info!("on_worker_stop returned");
    ExitCode::SUCCESS
}
