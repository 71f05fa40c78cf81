//! The pidfile: `state_dir/host.pid`, holding the master's pid under an exclusive `flock`.
//!
//! The lock, not the file's existence, says whether a master runs: the kernel drops it when the
//! master exits, however it exits, so a stale file left by a SIGKILLed master is simply reused.
//! `stop` then waits for the master's process itself to exit.
//!
//! `host upgrade` passes the lock on instead of releasing it: a `flock` belongs to the open file
//! description, so the new master inherits a duplicate of the old master's descriptor and holds
//! the same lock, with no moment when nobody does. The old master then exits without unlocking
//! ([`PidFile::hand_over`]), and the new one [adopts](PidFile::adopt) it and writes its pid.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("host is already running with this config (master pid {pid}, pidfile {path})")]
    AlreadyRunning { path: PathBuf, pid: String },
    #[error("cannot open pidfile {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock pidfile {path}: {errno}")]
    Lock { path: PathBuf, errno: Errno },
}

/// Held by the master for its whole life.
pub struct PidFile {
    lock: Flock<File>,
    path: PathBuf,
}

impl PidFile {
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        let open_err = |source| PidFileError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0).map_err(open_err)?;
                lock.rewind().map_err(open_err)?;
                writeln!(lock, "{}", std::process::id()).map_err(open_err)?;
                Ok(PidFile {
                    lock,
                    path: path.to_path_buf(),
                })
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(PidFileError::AlreadyRunning {
                    path: path.to_path_buf(),
                    pid: pid.trim().to_string(),
                })
            }
            Err((_, errno)) => Err(PidFileError::Lock {
                path: path.to_path_buf(),
                errno,
            }),
        }
    }

    /// Takes over the lock held through `file`, a duplicate of the old master's descriptor
    /// inherited at `host upgrade` (so locking it again converts a lock this description already
    /// holds), and writes this process's pid.
    pub fn adopt(file: File, path: &Path) -> Result<PidFile, PidFileError> {
        let open_err = |source| PidFileError::Open {
            path: path.to_path_buf(),
            source,
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0).map_err(open_err)?;
                lock.rewind().map_err(open_err)?;
                writeln!(lock, "{}", std::process::id()).map_err(open_err)?;
                Ok(PidFile {
                    lock,
                    path: path.to_path_buf(),
                })
            }
            Err((_, errno)) => Err(PidFileError::Lock {
                path: path.to_path_buf(),
                errno,
            }),
        }
    }

    /// Leaves the file and the lock to the new master that shares this lock: the descriptor
    /// is closed at exit without `LOCK_UN`, which would release the new master's lock too.
    pub fn hand_over(self) {
        std::mem::forget(self.lock);
    }

    /// A duplicate of the locked descriptor (it shares the lock), for `host upgrade`.
    pub fn dup_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(self.lock.try_clone()?.into())
    }

    /// The locked file's device and inode, to tell whether the path still names it.
    pub fn identity(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.lock.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// Removes the file, then releases the lock (by dropping it).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock);
    }
}

/// Whether a master holds the lock on `path` right now.
pub fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, errno)) => errno == Errno::EWOULDBLOCK,
    }
}

/// Whether `pid` has exited: gone, or a zombie nobody has reaped yet (a daemonized master's
/// parent is PID 1, which is not always prompt about it).
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesized command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

/// Waits until process `pid` has exited, polling until `timeout`. Returns whether it did.
pub fn wait_exited(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if has_exited(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
