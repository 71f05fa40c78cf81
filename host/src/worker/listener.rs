//! Whether this worker's listening socket is still the one it inherited, and still listens.
//! Plugin code runs in the worker's process and can `close(3)` (the worker then accepts nothing,
//! or, once fd 3 is reused, accepts on something else) or `shutdown(3, SHUT_RD)` (the one
//! socket every worker shares stops listening). Checked once after the plugin is loaded (its
//! constructors and `on_worker_start` ran: a canary that did either is refused) and whenever
//! `accept` fails in a way that means the socket is gone.
//!
//! It owns the identity of the inherited socket (device and inode, read before any plugin code
//! runs), the two checks on fd 3 by number (`fstat`, `getsockopt(SO_ACCEPTCONN)`), and the
//! accept itself (see [`accept`]: tokio's would wedge the I/O thread once a shut-down socket is
//! re-armed). It never closes, binds or re-arms anything (the master re-arms the shared socket).
//!
//! This is one of the places host code uses `unsafe`: syscalls on a raw fd number that plugin
//! code may have closed, where no `BorrowedFd` may be made, `accept4`, and registering the
//! socket with the reactor.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, RawFd};

use nix::libc;

/// Device and inode of the inherited listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Identity {
    fd: RawFd,
    dev: u64,
    ino: u64,
}

/// How the listener was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Lost {
    /// This worker's fd was closed or now names another file: only this worker is affected.
    pub own_fd: bool,
    pub reason: String,
}

fn stat(fd: RawFd) -> std::io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `struct stat` to the pointer, which points to one; on a number that
    // is not an open fd it returns -1 (EBADF) and writes nothing, which is checked.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev, st.st_ino))
}

/// Reads the identity of the inherited listener; before any plugin code runs.
pub(super) fn identity(listener: &impl AsRawFd) -> std::io::Result<Identity> {
    let fd = listener.as_raw_fd();
    let (dev, ino) = stat(fd)?;
    Ok(Identity { fd, dev, ino })
}

/// Whether the listener is still the inherited socket and listens.
pub(super) fn check(id: Identity) -> Result<(), Lost> {
    let own = |reason: String| Lost {
        own_fd: true,
        reason,
    };
    match stat(id.fd) {
        Err(e) => {
            return Err(own(format!(
                "its listening socket fd {} was closed ({e})",
                id.fd
            )));
        }
        Ok((dev, ino)) if (dev, ino) != (id.dev, id.ino) => {
            return Err(own(format!(
                "its listening socket fd {} was closed and now names another file",
                id.fd
            )));
        }
        Ok(_) => {}
    }
    let mut listening: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to `listening`, an int of that size, and
    // updates `len`; the fd is the socket checked above (same inode).
    let rc = unsafe {
        libc::getsockopt(
            id.fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(own(format!("cannot inspect its listening socket: {e}")));
    }
    if listening == 0 {
        return Err(Lost {
            own_fd: false,
            reason: "the shared listening socket no longer listens (shut down)".into(),
        });
    }
    Ok(())
}

/// Whether an `accept` error may mean the listener is gone (rather than a resource limit or
/// an aborted connection).
pub(super) fn means_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

/// What an accept found.
pub(super) enum Accepted {
    /// A connection (non-blocking, close-on-exec).
    Connection(std::net::TcpStream),
    /// The reactor saw the socket hang up (it was shut down). That readiness never clears, so
    /// this registration would report the socket ready forever: the caller drops it, and
    /// registers the socket again once it listens.
    HungUp,
}

/// Accepts one connection on `listener`. Not tokio's `TcpListener::accept`: after a
/// `shutdown` its registration stays "read closed" for good, and once the master re-armed the
/// socket, accept's would-block retry loop would spin inside one poll, wedging the I/O thread.
pub(super) async fn accept(
    listener: &tokio::io::unix::AsyncFd<std::net::TcpListener>,
) -> std::io::Result<Accepted> {
    loop {
        let mut guard = listener.readable().await?;
        if guard.ready().is_read_closed() {
            return Ok(Accepted::HungUp);
        }
        match guard.try_io(|l| accept4(l.get_ref().as_raw_fd())) {
            Ok(result) => return result.map(Accepted::Connection),
            Err(_would_block) => continue,
        }
    }
}

/// `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC`, as mio does.
fn accept4(fd: RawFd) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 with null address pointers writes nothing to memory; it returns a new fd
    // or -1.
    let conn = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `conn` is a fresh fd that accept4 just returned; nothing else owns it.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(conn) })
}

/// Registers the listener with the I/O reactor, for read readiness.
pub(super) fn register(
    listener: std::net::TcpListener,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    // SAFETY: the `TcpListener` owns its fd and host code neither closes nor replaces it while
    // registered: it is deregistered by `into_inner` (or dropped) first. Plugin code may close
    // fd 3 under it; [`check`] finds that and the worker then leaks the registration
    // (`mem::forget`) instead of deregistering or closing a number that may name another file.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE)
    };
    registered.map_err(std::io::Error::from)
}
