//! `state_dir`: the directory that holds the control socket, the pidfile, the log (`start -d`)
//! and the plugin snapshots the workers load. Whoever can write it chooses the code this host
//! runs and can stand in for its control socket, so this module owns the rule for trusting it,
//! its creation, and keeping the master reachable when it is deleted under a running master.
//!
//! # The rule (as sshd's `StrictModes` and PostgreSQL's data directory check)
//!
//! - `state_dir` itself, when it exists, is a directory owned by the effective user or root
//!   and writable by neither its group nor others. When missing, it is created with mode 0700
//!   (and so are missing parents).
//! - Every parent up to `/` is owned by the effective user or root and writable by neither
//!   its group nor others, except a directory owned by root with the sticky bit (`/tmp`,
//!   mode 1777): there others may create entries but not rename or remove this user's, so
//!   `state_dir` (which must be this user's) cannot be swapped.
//! - A symbolic link on the way is owned by the effective user or root, and the directories
//!   it leads to pass the same rule (the path is checked as written and as resolved).
//!
//! A refusal is one line naming `state_dir`, the path that failed and why. [`check`] only reads
//! metadata (`host check` uses it); [`ensure`] checks, creates what is missing, and checks again.
//!
//! # Kept reachable
//!
//! [`Watch`] runs on the control server's loop (a few `lstat`s a second, no blocking): when
//! the control socket or the pidfile is gone from its path (`rm -rf state_dir`), it recreates
//! `state_dir` under the same rule, binds the socket again and takes the pidfile's lock again,
//! logs it once, and counts it in `/metrics` (`host_state_dir_repairs_total`). Any socket at the
//! path is left alone (after `host upgrade` it is the successor's), and so is a pidfile another
//! process holds locked.
//! [`port_holder`] names the process that holds the `listen` port when a `start` cannot bind
//! it, so that a master whose `state_dir` was lost is not mistaken for a stranger.
//!
//! It writes nothing inside `state_dir` itself: [`pidfile`](super::pidfile),
//! [`control`](super::control) and [`snapshot`](super::snapshot) own the files.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::pidfile::PidFile;
use crate::ratelimit::RateLimit;

/// How often [`Watch`] looks at the control socket's and the pidfile's paths.
pub const WATCH_EVERY: Duration = Duration::from_millis(500);

/// What was recreated after it went missing: `/metrics`' `what` label, and the counts.
pub const REPAIRS: [&str; 2] = ["control_socket", "pidfile"];
static REPAIRED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// How often each of [`REPAIRS`] was recreated since the master started.
pub fn repairs() -> Vec<(&'static str, u64)> {
    REPAIRS
        .iter()
        .zip(&REPAIRED)
        .map(|(what, n)| (*what, n.load(Ordering::Relaxed)))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "refusing state_dir {path}: {checked} is {problem}; whoever can write there chooses the code this host runs (make it owned by this user or root and writable only by its owner)"
    )]
    Insecure {
        path: PathBuf,
        checked: PathBuf,
        problem: String,
    },
    #[error("cannot create state directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong with `meta` as `state_dir` itself (`parent`: false) or as one of its
/// parents, if anything.
fn problem(meta: &std::fs::Metadata, parent: bool) -> Option<String> {
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() {
        return Some("not a directory".into());
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Some(format!(
            "owned by uid {} (not by this user, uid {me}, nor root)",
            meta.uid()
        ));
    }
    let sticky_root = parent && meta.uid() == 0 && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky_root {
        let who = if mode & 0o002 != 0 {
            "everyone"
        } else {
            "its group"
        };
        let sticky = if parent {
            ", without the sticky bit of a root-owned /tmp"
        } else {
            ""
        };
        return Some(format!("writable by {who} (mode {mode:04o}{sticky})"));
    }
    None
}

/// Checks `state_dir` (absolute) and its parents against the rule in the module doc, reading
/// metadata only. A missing `state_dir` (or missing parents) is fine: its existing ancestors
/// are checked.
pub fn check(state_dir: &Path) -> Result<(), StateDirError> {
    let insecure = |checked: &Path, problem: String| StateDirError::Insecure {
        path: state_dir.to_path_buf(),
        checked: checked.to_path_buf(),
        problem,
    };
    let me = nix::unistd::geteuid().as_raw();
    // As written: every prefix, without following links.
    let mut prefixes: Vec<PathBuf> = state_dir
        .ancestors()
        .map(Path::to_path_buf)
        .collect::<Vec<_>>();
    prefixes.reverse();
    let mut resolved_roots = Vec::new();
    for prefix in &prefixes {
        let Ok(meta) = std::fs::symlink_metadata(prefix) else {
            break; // missing from here on: created with 0700
        };
        let is_self = prefix == state_dir;
        if meta.file_type().is_symlink() {
            if meta.uid() != me && meta.uid() != 0 {
                return Err(insecure(
                    prefix,
                    format!("a symbolic link owned by uid {}", meta.uid()),
                ));
            }
            resolved_roots.push(prefix.clone());
            continue;
        }
        if let Some(p) = problem(&meta, !is_self) {
            return Err(insecure(prefix, p));
        }
    }
    // Where the links lead: every directory on the resolved path.
    for link in resolved_roots {
        let Ok(target) = std::fs::canonicalize(&link) else {
            continue; // dangling: creating state_dir through it fails with its own error
        };
        let is_self = link == state_dir;
        for (i, dir) in target.ancestors().enumerate() {
            let Ok(meta) = std::fs::metadata(dir) else {
                continue;
            };
            if let Some(p) = problem(&meta, !(is_self && i == 0)) {
                return Err(insecure(dir, p));
            }
        }
    }
    Ok(())
}

/// Checks `state_dir`, creates it (mode 0700, parents too) when missing, and checks it again.
pub fn ensure(state_dir: &Path) -> Result<(), StateDirError> {
    check(state_dir)?;
    if !state_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| StateDirError::Create {
                path: state_dir.to_path_buf(),
                source,
            })?;
    }
    check(state_dir)
}

/// A path's identity: device and inode.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Keeps the control socket and the pidfile at their paths while the master runs (see the
/// module doc). Lives in the control server's loop, which owns the listener it replaces.
pub struct Watch {
    state_dir: PathBuf,
    socket: PathBuf,
    pid_file: PathBuf,
    /// The pidfile this master locks (dev, inode): the original, or the one it recreated.
    pid_id: Option<(u64, u64)>,
    /// A pidfile recreated (and locked) by this watch; its lock is released when the watch is
    /// dropped, at shutdown.
    recreated: Option<PidFile>,
}

impl Watch {
    /// Watches `cfg`'s control socket and the pidfile this master locks
    /// (`pid_id`: its device and inode; `None`: the pidfile is not watched).
    pub fn new(cfg: &crate::config::Config, pid_id: Option<(u64, u64)>) -> Watch {
        let socket = cfg.control_socket();
        Watch {
            state_dir: cfg.state_dir.clone(),
            socket,
            pid_file: cfg.pid_file(),
            pid_id,
            recreated: None,
        }
    }

    /// Looks at both paths; recreates what is missing. `listener` is replaced when the socket
    /// is bound again.
    pub fn tick(&mut self, listener: &mut tokio::net::UnixListener) {
        static FAILED: RateLimit = RateLimit::per_second();
        let socket_lost = match std::fs::symlink_metadata(&self.socket) {
            // Ours, or another master's socket (a successor after `host upgrade`).
            Ok(m) => !m.file_type().is_socket(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        let pid_lost = self
            .pid_id
            .is_some_and(|id| identity(&self.pid_file) != Some(id));
        if !socket_lost && !pid_lost {
            return;
        }
        if let Err(e) = ensure(&self.state_dir) {
            if let Some(suppressed) = FAILED.hit(&std::io::Error::other("state_dir")) {
                tracing::error!(
                    suppressed,
                    "the control socket or pidfile is gone, and state_dir cannot be recreated: {}",
                    crate::error_chain(&e)
                );
            }
            return;
        }
        if socket_lost {
            match super::control::bind(&self.socket) {
                Ok(bound) => {
                    *listener = bound;
                    REPAIRED[0].fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        socket = %self.socket.display(),
                        "the control socket was gone (state_dir deleted?); recreated it: `host status`, `reload` and `stop` reach this master again"
                    );
                }
                Err(e) => {
                    if let Some(suppressed) = FAILED.hit(&std::io::Error::other("socket")) {
                        tracing::error!(suppressed, "{}", crate::error_chain(&e));
                    }
                }
            }
        }
        if pid_lost {
            match PidFile::acquire(&self.pid_file) {
                Ok(pidfile) => {
                    self.pid_id = pidfile.identity();
                    self.recreated = Some(pidfile);
                    REPAIRED[1].fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        pidfile = %self.pid_file.display(),
                        "the pidfile was gone or replaced (state_dir deleted?); recreated and locked it"
                    );
                }
                Err(e) => {
                    // Another process holds a new pidfile there: leave it (and stop looking
                    // until it is gone again).
                    self.pid_id = identity(&self.pid_file);
                    tracing::warn!("cannot recreate the pidfile: {}", crate::error_chain(&e));
                }
            }
        }
    }
}

/// Who holds a listening TCP socket on `addr`'s port, in words, when it can be found in
/// `/proc`: a host master (maybe one whose `state_dir` was deleted), or another process.
pub fn port_holder(addr: std::net::SocketAddr) -> Option<String> {
    let inodes = listening_inodes(addr.port());
    if inodes.is_empty() {
        return None;
    }
    let mut holders = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                let t = target.to_string_lossy();
                t.strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| inodes.contains(&n))
            })
        });
        if holds {
            holders.push(pid);
        }
    }
    let comm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default()
    };
    let parent = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse().ok())
    };
    // The master, or the master of a worker that holds it.
    let master = holders.iter().find_map(|&pid| {
        [Some(pid), parent(pid)]
            .into_iter()
            .flatten()
            .find(|&p| comm(p) == "host-master")
    });
    if let Some(master) = master {
        let cmdline = std::fs::read(format!("/proc/{master}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        return Some(format!(
            "a running host master (pid {master}, `{cmdline}`); if its state_dir was deleted, it recreates its control socket within a second: `host status` and `host stop` reach it again"
        ));
    }
    holders
        .first()
        .map(|&pid| format!("process {pid} ({})", comm(pid)))
}

/// Inodes of the listening TCP sockets (IPv4 and IPv6) on `port`, from `/proc/net/tcp*`.
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A"
                && local_port == Some(port)
                && let Ok(inode) = inode.parse::<u64>()
                && inode != 0
            {
                found.push(inode);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("host-state-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        dir
    }

    #[test]
    fn a_writable_state_dir_or_parent_is_refused_and_a_missing_one_created_0700() {
        let dir = tempdir("rule");
        let state = dir.join("a/b/state");
        ensure(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);

        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure(&state).unwrap_err().to_string();
        assert!(
            err.contains("refusing state_dir") && err.contains("writable by everyone (mode 0777)"),
            "{err}"
        );
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A group-writable parent, even a sticky one not owned by root (when not root).
        let parent = dir.join("a");
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o770)).unwrap();
        let err = check(&state).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "{}: {} is writable by its group",
                state.display(),
                parent.display()
            )),
            "{err}"
        );
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        check(&state).unwrap();
        // /tmp (root, 1777) is a fine parent; a link owned by this user to a good dir is fine.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        check(&link).unwrap();
        // A file is not a directory.
        let file = dir.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(
            check(&file)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
