//! `host upgrade` (or `SIGUSR2`): replacing the running master by the `host` binary now on disk,
//! without closing the listening socket.
//!
//! The old master starts the binary at the path it was itself started from ([`Launcher`],
//! captured at start, before anything could replace the file), with the same arguments, and
//! passes it by inheritance: the listening socket on fd 3, a channel to itself on fd 4, and a
//! duplicate of its pidfile descriptor on fd 5, which shares the pidfile's `flock` (see
//! [`pidfile`](super::pidfile)). `HOST_UPGRADE_FROM=<old pid>` tells the new process what they
//! are. The new master starts its own workers on that socket (the same first rollout as
//! `host start`, canary first), and then, over the channel ([`crate::protocol::NewToOldMaster`]):
//!
//! 1. new → old `Serving`: its first generation serves;
//! 2. old → new `TakeOver`;
//! 3. the new master adopts the pidfile lock and writes its pid, binds the control socket at a
//!    private path and renames it over the configured one (atomic: `status` always reaches a
//!    master), and answers `TookOver`;
//! 4. the old master answers `upgrade`, tells systemd the new `MAINPID`, drains its workers and
//!    exits without removing the pidfile or the socket, and without unlocking.
//!
//! If the new process cannot be started, exits, says `Failed`, or has not taken over within the
//! deadline, the old master kills it (its workers die with it) and serves on; nothing it owns was
//! touched. The old master never blocks on any of this: the child is spawned like a worker and
//! watched by a task of its own.
//!
//! This module owns the process and the hand-over protocol; it never decides when an upgrade may
//! start or what the old master does with its workers (that is the supervisor's `handover`).

use std::ffi::OsString;
use std::fs::File;
use std::net::TcpListener;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::pidfile::PidFile;
use super::supervisor::Event;
use crate::config::Config;
use crate::protocol::{NewToOldMaster, OldToNewMaster, Receiver, Sender, UpgradeReport};

/// Set in the new master's environment: the old master's pid.
pub(crate) const FROM_ENV: &str = "HOST_UPGRADE_FROM";
const LISTENER_FD: RawFd = 3;
const CHANNEL_FD: RawFd = 4;
const PIDFILE_FD: RawFd = 5;
/// The other worker groups' listeners follow the pidfile, in the order of [`GROUPS_ENV`].
const MORE_LISTENERS_FD: RawFd = 6;
/// Set in the new master's environment: the groups whose listeners it inherits, comma-separated
/// (the first one's on fd 3, the others' from fd 6 on). Absent (from a master of before
/// groups): fd 3 is the one group's.
pub(crate) const GROUPS_ENV: &str = "HOST_UPGRADE_GROUPS";

/// What a master needs to start its successor, captured when it starts.
pub(crate) struct Launcher {
    exe: PathBuf,
    argv0: OsString,
    args: Vec<OsString>,
    /// A duplicate of the pidfile descriptor (shares its lock).
    pidfile: OwnedFd,
    /// The worker groups, by name: the first is the one whose listener `launch` is given, the
    /// others come with theirs (see [`Launcher::with_groups`]).
    groups: Vec<(String, Option<TcpListener>)>,
}

impl Launcher {
    /// The binary this process was started from, and its arguments. Call it first thing: the
    /// path is the one the process was started by (`argv[0]`, resolved against the current
    /// directory or `PATH`, when it is this very file), so a symlink such as
    /// `/usr/bin/host -> /opt/host-1.2/host` is followed again at upgrade time; otherwise
    /// `/proc/self/exe`, which reads `<path> (deleted)` once the file was replaced (stripped:
    /// the upgrade wants whatever is at that path *now*).
    pub(crate) fn capture(pidfile: OwnedFd) -> Launcher {
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| "host".into());
        let exe = by_argv0(&argv0)
            .or_else(|| {
                let p = std::env::current_exe().ok()?;
                let s = p.as_os_str().to_string_lossy();
                Some(match s.strip_suffix(" (deleted)") {
                    Some(path) => PathBuf::from(path),
                    None => p,
                })
            })
            .unwrap_or_else(|| PathBuf::from(&argv0));
        Launcher {
            exe,
            argv0,
            args: args.collect(),
            pidfile,
            groups: Vec::new(),
        }
    }

    /// Hands every worker group's listener to the new master: `lead` is the group whose
    /// listener `launch` gets, `others` the rest, each with its name.
    pub(crate) fn with_groups(mut self, lead: &str, others: Vec<(String, TcpListener)>) -> Self {
        self.groups = std::iter::once((lead.to_string(), None))
            .chain(others.into_iter().map(|(name, l)| (name, Some(l))))
            .collect();
        self
    }

    pub(crate) fn exe(&self) -> &std::path::Path {
        &self.exe
    }

    /// Starts the new master with the listener, a channel and the pidfile, and a task that
    /// watches it until it took over or failed, then sends [`Event::Upgraded`]. Returns its pid
    /// and what cancels it (dropping or firing it kills the new master).
    pub(crate) fn launch(
        &self,
        listener: &TcpListener,
        deadline: Duration,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<(u32, oneshot::Sender<()>), String> {
        let exe = self.exe.display().to_string();
        let failed = |what: &str, e: std::io::Error| format!("cannot start {exe}: {what}: {e}");
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| failed("socketpair", e))?;
        let listener = listener.try_clone().map_err(|e| failed("dup", e))?;
        let pidfile = self.pidfile.try_clone().map_err(|e| failed("dup", e))?;
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg0(&self.argv0)
            .args(&self.args)
            .env(FROM_ENV, std::process::id().to_string())
            // Not the new master's: the old one's start pipe, systemd's sockets (it gets the
            // listener from us), and a watchdog pid that is not its own.
            .env_remove(crate::START_NOTIFY_ENV)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null());
        let mut more = Vec::new();
        for (i, l) in self
            .groups
            .iter()
            .filter_map(|(_, l)| l.as_ref())
            .enumerate()
        {
            more.push(FdMapping {
                parent_fd: l.try_clone().map_err(|e| failed("dup", e))?.into(),
                child_fd: MORE_LISTENERS_FD + i as RawFd,
            });
        }
        if !self.groups.is_empty() {
            let names: Vec<&str> = self.groups.iter().map(|(n, _)| n.as_str()).collect();
            cmd.env(GROUPS_ENV, names.join(","));
        }
        cmd.fd_mappings(
            [
                FdMapping {
                    parent_fd: listener.into(),
                    child_fd: LISTENER_FD,
                },
                FdMapping {
                    parent_fd: theirs.into(),
                    child_fd: CHANNEL_FD,
                },
                FdMapping {
                    parent_fd: pidfile,
                    child_fd: PIDFILE_FD,
                },
            ]
            .into_iter()
            .chain(more)
            .collect(),
        )
        .map_err(|e| failed("fd mapping", std::io::Error::other(e)))?;
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|e| failed("exec", e))?;
        let pid = child.id().unwrap_or(0);
        // The master's own child, not an orphan to end (it outlives this master).
        crate::master::orphans::own(pid);
        let (cancel, cancelled) = oneshot::channel();
        tokio::spawn(watch(child, ours, exe, deadline, cancelled, events));
        Ok((pid, cancel))
    }
}

/// `argv[0]` as a path to this process's own binary: with a `/`, against the current directory;
/// without, the first match in `PATH`. `None` unless that path is the running file (same device
/// and inode as `/proc/self/exe`).
fn by_argv0(argv0: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self/exe").ok()?;
    let same = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino())
    };
    let path = PathBuf::from(argv0);
    if argv0.as_encoded_bytes().contains(&b'/') {
        let path = std::path::absolute(&path).ok()?;
        return same(&path).then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(&path))
        .find(|p| p.is_absolute() && same(p))
}

/// Follows the new master until it took over (or did not), and reports to the supervisor.
async fn watch(
    mut child: tokio::process::Child,
    ours: std::os::unix::net::UnixStream,
    exe: String,
    deadline: Duration,
    mut cancelled: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<Event>,
) {
    let started = Instant::now();
    let pid = child.id().unwrap_or(0);
    let outcome = async {
        let stream = ours
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(ours))
            .map_err(|e| format!("cannot watch the new master: {e}"))?;
        let (rd, wr) = stream.into_split();
        let mut rx = Receiver::<_, NewToOldMaster>::new(rd);
        let mut tx = Sender::<_, OldToNewMaster>::new(wr);
        let timer = tokio::time::sleep(deadline);
        tokio::pin!(timer);
        let mut serving: Option<(String, String)> = None;
        let mut said: Option<String> = None;
        let mut channel_open = true;
        loop {
            tokio::select! {
                // What it says first: a `Failed` is read before the exit it precedes.
                biased;
                msg = rx.recv(), if channel_open => match msg {
                    Ok(Some(NewToOldMaster::Serving { version, build, .. })) => {
                        tracing::info!(new_pid = pid, %version, %build, "the new master serves; handing over");
                        serving = Some((version, build));
                        if tx.send(&OldToNewMaster::TakeOver).await.is_err() {
                            channel_open = false;
                        }
                    }
                    Ok(Some(NewToOldMaster::Failed { reason })) => said = Some(reason),
                    Ok(Some(NewToOldMaster::TookOver)) => {
                        let (version, build) = serving.take().unwrap_or_default();
                        return Ok(UpgradeReport {
                            old_pid: std::process::id(),
                            new_pid: pid,
                            exe: PathBuf::from(&exe),
                            version,
                            build,
                            duration_ms: started.elapsed().as_millis() as u64,
                        });
                    }
                    Ok(None) | Err(_) => channel_open = false,
                },
                status = child.wait() => {
                    // What it said before exiting may still be unread: its end is closed now,
                    // so this ends at once.
                    while channel_open && said.is_none() {
                        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                            Ok(Ok(Some(NewToOldMaster::Failed { reason }))) => said = Some(reason),
                            Ok(Ok(Some(_))) => {}
                            _ => channel_open = false,
                        }
                    }
                    let why = said.take().unwrap_or_else(|| {
                        super::supervisor::describe_exit(&status)
                    });
                    return Err(format!(
                        "the new master (pid {pid}, {exe}) exited before it took over: {why}"
                    ));
                }
                _ = &mut timer => {
                    let why = said.take().map_or(String::new(), |s| format!(" ({s})"));
                    return Err(format!(
                        "the new master (pid {pid}, {exe}) did not take over within {}{why}; killed it",
                        humantime::format_duration(deadline)
                    ));
                }
                _ = &mut cancelled => return Err("interrupted: host is stopping".to_string()),
            }
        }
    }
    .await;
    if outcome.is_err() {
        // Its workers die with it (PR_SET_PDEATHSIG); wait briefly so it is gone when we answer.
        let _ = child.start_kill();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
            crate::master::orphans::disown(pid);
        }
    }
    let _ = events.send(Event::Upgraded(outcome));
}

/// What a master started by `host upgrade` inherited.
pub(crate) struct Handover {
    pub(crate) listener: TcpListener,
    /// Whose `listener` is: the old master's first group (`None`: a master of before groups).
    pub(crate) lead: Option<String>,
    /// The old master's other groups' listeners, by name.
    pub(crate) others: Vec<(String, TcpListener)>,
    pub(crate) successor: Successor,
}

/// The new master's side of the hand-over protocol.
pub(crate) struct Successor {
    rx: Receiver<OwnedReadHalf, OldToNewMaster>,
    tx: Sender<OwnedWriteHalf, NewToOldMaster>,
    pidfile: File,
    from: u32,
}

impl Handover {
    /// The inherited listener, channel and pidfile when this process was started by `host
    /// upgrade` (`HOST_UPGRADE_FROM` set); `None` otherwise. Runs inside the runtime.
    pub(crate) fn from_env() -> Result<Option<Handover>, String> {
        let Ok(from) = std::env::var(FROM_ENV) else {
            return Ok(None);
        };
        let from: u32 = from
            .parse()
            .map_err(|_| format!("{FROM_ENV}={from:?} is not a pid"))?;
        let take = |fd, what| crate::fd::take_inherited(fd, what).map_err(|e| e.to_string());
        let listener = TcpListener::from(take(LISTENER_FD, "listener from the old master")?);
        let channel =
            std::os::unix::net::UnixStream::from(take(CHANNEL_FD, "channel to the old master")?);
        let pidfile = File::from(take(PIDFILE_FD, "pidfile from the old master")?);
        let names: Vec<String> = std::env::var(GROUPS_ENV)
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let mut others = Vec::new();
        for (i, name) in names.iter().skip(1).enumerate() {
            let fd = take(
                MORE_LISTENERS_FD + i as RawFd,
                "group listener from the old master",
            )?;
            others.push((name.clone(), TcpListener::from(fd)));
        }
        let stream = channel
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(channel))
            .map_err(|e| format!("channel to the old master: {e}"))?;
        let (rd, wr) = stream.into_split();
        tracing::info!(
            old_pid = from,
            "started by `host upgrade`: serving on the old master's listener"
        );
        Ok(Some(Handover {
            listener,
            lead: names.first().cloned(),
            others,
            successor: Successor {
                rx: Receiver::new(rd),
                tx: Sender::new(wr),
                pidfile,
                from,
            },
        }))
    }
}

impl Successor {
    /// A duplicate of the inherited pidfile descriptor, for this master's own [`Launcher`].
    pub(crate) fn pidfile_fd(&self) -> std::io::Result<OwnedFd> {
        Ok(self.pidfile.try_clone()?.into())
    }

    /// The first generation could not start: tell the old master why (it serves on).
    pub(crate) async fn failed(mut self, reason: &str) {
        let _ = self
            .tx
            .send(&NewToOldMaster::Failed {
                reason: reason.to_string(),
            })
            .await;
    }

    /// The first generation serves: ask the old master, then take the pidfile and the control
    /// socket. If the old master is gone meanwhile, take them anyway (its lock is ours already).
    pub(crate) async fn take_over(
        mut self,
        cfg: &Config,
    ) -> Result<(PidFile, tokio::net::UnixListener), String> {
        let serving = NewToOldMaster::Serving {
            pid: std::process::id(),
            version: crate::worker::HOST_VERSION.to_string(),
            build: crate::worker::HOST_BUILD.to_string(),
        };
        let asked = self.tx.send(&serving).await.is_ok();
        match asked.then_some(self.rx.recv().await) {
            Some(Ok(Some(OldToNewMaster::TakeOver))) => {}
            _ => tracing::warn!(
                old_pid = self.from,
                "the old master did not answer; taking over anyway"
            ),
        }
        let pidfile =
            PidFile::adopt(self.pidfile, &cfg.pid_file()).map_err(|e| crate::error_chain(&e))?;
        let control = match super::control::bind_replacing(&cfg.control_socket()) {
            Ok(control) => control,
            Err(e) => {
                // Not ours after all: leave the lock to the old master.
                pidfile.hand_over();
                let reason = crate::error_chain(&e);
                let _ = self
                    .tx
                    .send(&NewToOldMaster::Failed {
                        reason: reason.clone(),
                    })
                    .await;
                return Err(reason);
            }
        };
        let _ = self.tx.send(&NewToOldMaster::TookOver).await;
        Ok((pidfile, control))
    }
}

#[cfg(test)]
mod tests {
    use super::by_argv0;

    #[test]
    fn argv0_names_the_running_binary_or_nothing() {
        let me = std::env::current_exe().unwrap();
        assert_eq!(by_argv0(me.as_os_str()), Some(me.clone()));
        // Another file, or a name on PATH that is not this binary, is not taken for it.
        assert_eq!(by_argv0("/bin/sh".as_ref()), None);
        assert_eq!(by_argv0("sh".as_ref()), None);
        assert_eq!(by_argv0("no-such-host-binary".as_ref()), None);
        // A symlink to the running binary is kept as the symlink (followed again at upgrade).
        let dir = std::env::temp_dir().join(format!("host-argv0-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("host");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&me, &link).unwrap();
        assert_eq!(by_argv0(link.as_os_str()), Some(link.clone()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
