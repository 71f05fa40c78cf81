//! Hosts with worker groups (`tests/tests/groups.rs`): two `[[group]]`s, `api` serving the
//! example plugin (the host's `plugin.so`, which tests replace) and `gateway` serving the axum
//! example, on two ports the kernel picks; reading one group out of `status`; and a host
//! started the way systemd starts one with several named sockets.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use host_status::{StatusReport, WorkerStateName};

use crate::{Activated, Host, HostOptions, axum_plugin, wait_until};

/// Starts a host with the groups `api` (the example plugin, or `plugin`) and `gateway` (the
/// axum example). `top` goes at the top of the file; `api` and `gateway` into each group's
/// table. Both inherit `listen = "127.0.0.1:0"` and the test defaults from the top.
pub async fn two_groups(
    plugin: &Path,
    top: &str,
    api: &str,
    gateway: &str,
    bin: Option<PathBuf>,
) -> Host {
    let opts = HostOptions {
        bin,
        ..HostOptions::default()
    };
    two_groups_with(plugin, top, api, gateway, opts).await
}

/// [`two_groups`] with more options (`extra` is replaced by the groups).
pub async fn two_groups_with(
    plugin: &Path,
    top: &str,
    api: &str,
    gateway: &str,
    opts: HostOptions,
) -> Host {
    let extra = format!(
        "{top}\n[[group]]\nname = \"api\"\nplugin = \"plugin.so\"\n{api}\n[[group]]\nname = \"gateway\"\nplugin = \"{}\"\n{gateway}\n",
        axum_plugin().display()
    );
    Host::start(plugin, HostOptions { extra, ..opts }).await
}

/// Group `name`'s part of a `status --json`.
pub fn group<'a>(status: &'a StatusReport, name: &str) -> &'a StatusReport {
    status
        .groups
        .iter()
        .find(|g| g.group == name)
        .unwrap_or_else(|| panic!("no group {name} in {status:?}"))
}

/// Where group `name` listens.
pub fn group_addr(status: &StatusReport, name: &str) -> SocketAddr {
    group(status, name).listen.parse().unwrap()
}

/// Pids of group `name`'s ready workers, sorted.
pub fn group_pids(status: &StatusReport, name: &str) -> Vec<u32> {
    let mut pids = crate::worker_pids_in(group(status, name), Some(WorkerStateName::Ready));
    pids.sort_unstable();
    pids
}

/// The serving generation of group `name`.
pub fn group_generation(status: &StatusReport, name: &str) -> u64 {
    group(status, name).generation
}

/// A host started in the foreground the way systemd's socket activation starts one with
/// several sockets: `sockets` (name, fd) on fds 3, 4, ... in that order, `LISTEN_FDS`,
/// `LISTEN_FDNAMES` with their names, and `LISTEN_PID` the host's own pid. Its config is
/// `dir/host.toml`, its output `dir/foreground.log`. Returns once every group has a ready
/// worker.
pub async fn activated(dir: &Path, sockets: &[(&str, RawFd)]) -> Activated {
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| *fd).collect();
    let env = format!(
        "LISTEN_FDS={} LISTEN_FDNAMES={}",
        fds.len(),
        names.join(":")
    );
    // SAFETY: the setup only calls fcntl, dup2 and close, which are async-signal-safe, and
    // reads `fds`, the child's own copy.
    let host = unsafe {
        crate::host::spawn_foreground(dir, &env, move || {
            // Out of the way first, so that moving one to 3 + i never closes another.
            let mut high = Vec::with_capacity(fds.len());
            for fd in &fds {
                let dup = nix::libc::fcntl(*fd, nix::libc::F_DUPFD, 100);
                if dup < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(dup);
            }
            for (i, fd) in high.iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the new descriptor.
                if nix::libc::dup2(*fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::libc::close(*fd);
            }
            Ok(())
        })
    };
    wait_until(Duration::from_secs(30), "every group to serve", || {
        let out = host.cli(&["status", "--json"]);
        out.status.success()
            && serde_json::from_slice::<StatusReport>(&out.stdout).is_ok_and(|s| {
                s.groups.len() == sockets.len()
                    && s.groups
                        .iter()
                        .all(|g| !crate::worker_pids_in(g, Some(WorkerStateName::Ready)).is_empty())
            })
    })
    .await;
    host
}
