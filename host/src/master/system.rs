//! What the supervisor's decisions do to the real system: the master's [`Effects`]. It execs
//! workers (this binary as `__worker`, or `__gateway` in a gateway group, with the listener, a fresh channel and the worker table)
//! and wires their messages and exits into [`Event`]s, sends them orders, kills them, takes
//! snapshots on a thread of their own, prunes snapshot files, passes [`Notice`]s on, writes `host
//! start -d`'s line, starts and abandons the new master of `host upgrade`, ends what workers
//! leave behind ([`orphans`](super::orphans)) and reads `/proc` for RSS.
//!
//! It decides nothing (when a worker starts or leaves, what a rollout does: that is the
//! [`supervisor`](super::supervisor)'s) and never waits on a process on the master's loop: each
//! child is owned and reaped by a task of its own.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::binary_upgrade::Launcher;
use super::orphans::Orphans;
use super::supervisor::{Effects, Event, Notice, SnapshotSource, WorkerId, WorkerLaunch};
use crate::config::Config;
use crate::fd;
use crate::protocol::{MasterToWorker, Sender, WorkerToMaster};

/// glibc malloc's tunables for workers, unless the master's environment has its own
/// `GLIBC_TUNABLES` (then the workers inherit that). By default each thread keeps 7 freed chunks
/// of each size; a request through the plugin frees more than that of a few sizes (its header
/// map, each header value, on both sides of the ABI, which share the one malloc), and the surplus
/// goes to lists that the next large allocation consolidates. Keeping 64 cut the CPU per request
/// by 5-7% for a browser's request (ten headers) and 1-2% for wrk's, and worker RSS after load
/// grew by about 0.1 MiB (measured in `bench`'s way, side by side). Other C libraries ignore it.
pub(crate) const WORKER_MALLOC_TUNABLES: &str = "glibc.malloc.tcache_count=64";

/// The channels that reach a live worker.
struct Link {
    orders: mpsc::UnboundedSender<MasterToWorker>,
    /// Asks the task that owns the `Child` to SIGKILL it. That task also reaps it, so a kill can
    /// never reach a recycled pid.
    kill: mpsc::UnboundedSender<()>,
}

/// The master's [`Effects`]. See the module doc.
pub(crate) struct System {
    cfg: Arc<Config>,
    events: mpsc::UnboundedSender<Event>,
    links: HashMap<WorkerId, Link>,
    /// Where [`Notice`]s go (none: nobody listens).
    notices: Option<mpsc::UnboundedSender<Notice>>,
    /// `host start -d`'s pipe, written once.
    start_notify: Option<std::fs::File>,
    /// How to start a new master for `host upgrade` (none: upgrades are refused).
    launcher: Option<Launcher>,
    /// What kills the new master under way.
    successor: Option<oneshot::Sender<()>>,
    orphans: Orphans,
}

impl System {
    pub(crate) fn new(
        cfg: Arc<Config>,
        events: mpsc::UnboundedSender<Event>,
        start_notify: Option<std::fs::File>,
    ) -> System {
        System {
            cfg,
            events,
            links: HashMap::new(),
            notices: None,
            start_notify,
            launcher: None,
            successor: None,
            orphans: Orphans::default(),
        }
    }

    /// Sends [`Notice`]s to `notices` from now on.
    pub(crate) fn with_notices(mut self, notices: mpsc::UnboundedSender<Notice>) -> Self {
        self.notices = Some(notices);
        self
    }

    /// Lets `host upgrade` start a new master with `launcher`.
    pub(crate) fn with_launcher(mut self, launcher: Launcher) -> Self {
        self.launcher = Some(launcher);
        self
    }
}

/// Resident set size of `pid` in bytes, from `/proc/<pid>/statm` (0 when unknown).
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

impl Effects for System {
    /// Execs this binary as a worker with the listener on fd 3, a fresh channel on fd 4 and the
    /// worker table on fd 5 (when it has a cell), and starts the tasks that own it: one reaps it
    /// (and kills it when asked), one reads its messages, one writes its orders.
    fn spawn_worker(&mut self, w: WorkerLaunch<'_>) -> std::io::Result<u32> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let listener = w.listener.try_clone()?;
        let table_fd = w.table.map(|fd| fd.try_clone()).transpose()?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg0(std::env::args_os().next().unwrap_or_else(|| "host".into()))
            .arg(match self.cfg.gateway {
                Some(_) => "__gateway",
                None => "__worker",
            })
            .args(["--slot", &w.slot.to_string()])
            .args(["--generation", &w.generation.to_string()])
            .args(["--master-pid", &std::process::id().to_string()])
            // The worker logs before its spec arrives: its format comes on the command line.
            .args(["--log-format", self.cfg.log_format.name()])
            .args([
                "--spawned-at-ns",
                &crate::worker::monotonic_ns().to_string(),
            ])
            .stdin(std::process::Stdio::null());
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            cmd.env("GLIBC_TUNABLES", WORKER_MALLOC_TUNABLES);
        }
        if self.cfg.explicit_group {
            cmd.env(crate::logging::GROUP_ENV, &self.cfg.group);
        }
        for var in super::systemd::MASTER_ONLY_ENV.iter().chain(&[
            super::binary_upgrade::FROM_ENV,
            super::binary_upgrade::GROUPS_ENV,
            crate::START_NOTIFY_ENV,
        ]) {
            cmd.env_remove(var);
        }
        cmd.fd_mappings(
            vec![
                FdMapping {
                    parent_fd: listener.into(),
                    child_fd: fd::LISTENER_FD,
                },
                FdMapping {
                    parent_fd: theirs.into(),
                    child_fd: fd::CHANNEL_FD,
                },
            ]
            .into_iter()
            .chain(table_fd.map(|fd| FdMapping {
                parent_fd: fd,
                child_fd: crate::worker_table::TABLE_FD,
            }))
            .collect(),
        )
        .map_err(std::io::Error::other)?;
        ours.set_nonblocking(true)?;
        let mut child = tokio::process::Command::from(cmd).spawn()?;
        let pid = child.id().unwrap_or(0);
        super::orphans::own(pid);

        let id = w.id;
        let stream = tokio::net::UnixStream::from_std(ours)?;
        let (rd, wr) = stream.into_split();
        let (orders, mut orders_rx) = mpsc::unbounded_channel::<MasterToWorker>();
        let events = self.events.clone();
        let (kill, mut kill_rx) = mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => {
                        super::orphans::disown(pid);
                        break status;
                    }
                    Some(()) = kill_rx.recv() => {
                        let _ = child.start_kill();
                    }
                }
            };
            let _ = events.send(Event::Exited { id, status });
        });
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut rx = crate::protocol::Receiver::<_, WorkerToMaster>::new(rd);
            while let Ok(Some(msg)) = rx.recv().await {
                if events.send(Event::Worker { id, msg }).is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut sender = Sender::<_, MasterToWorker>::new(wr);
            while let Some(order) = orders_rx.recv().await {
                if sender.send(&order).await.is_err() {
                    break;
                }
            }
        });
        self.links.insert(id, Link { orders, kill });
        Ok(pid)
    }

    fn send(&mut self, id: WorkerId, order: MasterToWorker) -> bool {
        self.links
            .get(&id)
            .is_some_and(|l| l.orders.send(order).is_ok())
    }

    fn kill(&mut self, id: WorkerId) {
        if let Some(l) = self.links.get(&id) {
            let _ = l.kill.send(());
        }
    }

    fn reaped(&mut self, id: WorkerId) {
        self.links.remove(&id);
    }

    /// A thread of its own at a lower priority: reading, hashing and copying a big plugin is
    /// background work that must not take the CPU from the event loop or the workers.
    fn take_snapshot(&mut self, ticket: u64, source: SnapshotSource, cancel: Arc<AtomicBool>) {
        let (cfg, events) = (self.cfg.clone(), self.events.clone());
        let spawned = std::thread::Builder::new().name("snapshot".into()).spawn({
            let events = events.clone();
            move || {
                super::snapshot::lower_thread_priority();
                let result = source.take(&cfg, &cancel);
                let _ = events.send(Event::SnapshotTaken { ticket, result });
            }
        });
        if let Err(e) = spawned {
            let result = Err(format!("cannot start the snapshot thread: {e}"));
            let _ = events.send(Event::SnapshotTaken { ticket, result });
        }
    }

    fn prune_snapshots(&mut self, keep: &HashSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(self.cfg.snapshot_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_snapshot = path.extension().is_some_and(|e| e == "so")
                && path.file_stem().is_some_and(|s| {
                    s.len() == 64 && s.to_string_lossy().bytes().all(|b| b.is_ascii_hexdigit())
                });
            if is_snapshot && !keep.contains(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::debug!(path = %path.display(), "pruned an old snapshot"),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot prune an old snapshot")
                    }
                }
            }
        }
    }

    fn notice(&mut self, notice: Notice) {
        if let Some(tx) = &self.notices {
            let _ = tx.send(notice);
        }
    }

    fn started(&mut self, line: &str) {
        if let Some(mut f) = self.start_notify.take() {
            let _ = writeln!(f, "{line}");
        }
    }

    fn successor_exe(&self) -> Option<String> {
        self.launcher
            .as_ref()
            .map(|l| l.exe().display().to_string())
    }

    fn launch_successor(
        &mut self,
        listener: &TcpListener,
        deadline: Duration,
    ) -> Result<u32, String> {
        let Some(launcher) = &self.launcher else {
            return Err("this master cannot start a new one".into());
        };
        let (pid, cancel) = launcher.launch(listener, deadline, self.events.clone())?;
        self.successor = Some(cancel);
        Ok(pid)
    }

    fn cancel_successor(&mut self) {
        if let Some(cancel) = self.successor.take() {
            let _ = cancel.send(());
        }
    }

    fn sweep_orphans(&mut self, now: Instant, grace: Duration) {
        self.orphans.sweep(now, grace);
    }

    fn orphans_pending(&self) -> (bool, Option<Instant>) {
        (self.orphans.any(), self.orphans.deadline())
    }

    fn orphans_ended(&self) -> (u64, u64) {
        (self.orphans.found, self.orphans.killed)
    }

    fn rss_bytes(&self, pid: u32) -> u64 {
        rss_bytes(pid)
    }
}
