//! The pidfile: `state_dir/host.pid`, holding the master's pid under an exclusive `flock`.
//!
//! The lock, not the file's existence, says whether a master runs: the kernel drops it when the
//! master exits, however it exits, so a stale file left by a SIGKILLed master is simply reused.
//! Clients wait for the lock to be released to know the master is gone (a zombie still answers
//! `kill(pid, 0)`; a released lock does not lie).

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

/// Waits until no master holds the lock on `path`, polling until `timeout`. Returns whether it was released.
pub fn wait_released(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_locked(path) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
