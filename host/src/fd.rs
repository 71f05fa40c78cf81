//! File descriptors a worker inherits from the master: the listening socket on fd 3 and its
//! channel to the master on fd 4. The master maps them there when it spawns the worker.
//!
//! This is one of the two places host code uses `unsafe` (the other is the plugin loader): it
//! turns a raw fd number into an `OwnedFd`, once, at worker start. It does nothing else.

#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::libc;

/// Where a worker finds the shared listening socket.
pub const LISTENER_FD: RawFd = 3;
/// Where a worker finds its channel to the master.
pub const CHANNEL_FD: RawFd = 4;

#[derive(Debug, thiserror::Error)]
#[error(
    "fd {fd} ({what}) was not inherited from the master; workers are started by `host start`, not by hand"
)]
pub struct NotInherited {
    pub fd: RawFd,
    pub what: &'static str,
}

/// Takes ownership of the inherited fd `fd` and marks it close-on-exec, so processes the plugin
/// starts do not inherit the listening socket.
pub fn take_inherited(fd: RawFd, what: &'static str) -> Result<OwnedFd, NotInherited> {
    // SAFETY: F_GETFD reads the fd flags and has no other effect; on a number that is not an
    // open fd it returns -1 with EBADF, which we check.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(NotInherited { fd, what });
    }
    // SAFETY: the fd is open (checked above), and by the spawn contract the master mapped it for
    // this process alone; nothing else in this process refers to it, and this function is
    // called once per fd, so the `OwnedFd` is its sole owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|_| NotInherited { fd, what })?;
    Ok(owned)
}
