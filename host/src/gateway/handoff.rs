//! Connections passed to a gateway process over its hand-off socket
//! (`state_dir/gateway/<group>-<slot>.handoff`, 0600 in a 0700 directory), both ends of it:
//!
//! - **Same port** (`upgrade_from`): a plugin group's worker ([`pass`]) sends a new
//!   connection's descriptor with `SCM_RIGHTS` in one datagram; the gateway ([`Receiver`])
//!   checks that it is a connected TCP socket and serves it as a client it accepted itself (the
//!   upgrade request is still in the socket: the worker only peeked).
//! - **Upgrade** (`host upgrade`: a process started while this one runs): a draining gateway process whose successor
//!   bound the same socket name passes it each established client ([`hand_over`]), with what
//!   the client is ([`HandedClient`]), at a moment when no byte of it is buffered anywhere.
//!
//! Why datagrams: each hand-off is one message with its descriptor, with no connection to keep
//! between a worker and every gateway process (a gateway restarting is just an address that
//! refuses for a while), and the kernel bounds each socket's queue (a full one refuses at once,
//! never blocks the worker). The worker opens a socket per hand-off rather than keeping one, so
//! a plugin that closes or replaces descriptors in its worker cannot misdirect a connection.
//!
//! It owns the wire format and the checks on what arrives. It never reads from the passed
//! connection, and never chooses the gateway (the worker's caller gives the order).

#![allow(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrLike,
    SockaddrStorage, UnixAddr, getsockname, getsockopt, recvmsg, sendmsg, socket, sockopt,
};
use tokio::io::Interest;

use super::router::HandedClient;

/// What each hand-off datagram says besides its descriptor: the format's name and version.
/// A new connection, unread.
const MAGIC: &[u8; 4] = b"GWH1";
/// An established WebSocket client, followed by its [`HandedClient`] as JSON.
const MAGIC_ESTABLISHED: &[u8; 4] = b"GWH2";

/// Largest hand-off datagram: a client's state (its session is at most 64 KiB of JSON, its
/// uid and groups bounded by the router) with room to spare, under the kernel's default
/// socket buffer.
pub(crate) const MAX_STATE: usize = 160 << 10;

/// What arrived on the hand-off socket.
pub(crate) enum Passed {
    /// A new connection (same port).
    New(std::net::TcpStream),
    /// An established client from the predecessor process.
    Established(std::net::TcpStream, HandedClient),
}

/// Passes an established client to the process now bound at `socket` (the successor).
pub(crate) fn hand_over(conn: RawFd, socket: &Path, state: &HandedClient) -> std::io::Result<()> {
    let mut data = MAGIC_ESTABLISHED.to_vec();
    serde_json::to_writer(&mut data, state)?;
    if data.len() > MAX_STATE {
        return Err(std::io::Error::other(
            "the client's state is too large to hand over",
        ));
    }
    send(conn, std::slice::from_ref(&socket.to_path_buf()), 0, &data).map(|_| ())
}

/// Passes `conn` to the first gateway process of `sockets`, tried from `start` on, whose
/// socket takes it; returns the index that took it. Every socket refusing (none bound: the
/// gateways restart; a full queue) is the last error. Never blocks.
pub(crate) fn pass(conn: RawFd, sockets: &[PathBuf], start: usize) -> std::io::Result<usize> {
    send(conn, sockets, start, MAGIC)
}

/// One datagram of `data` with `conn`, to the first of `sockets` from `start` that takes it.
fn send(conn: RawFd, sockets: &[PathBuf], start: usize, data: &[u8]) -> std::io::Result<usize> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let fds = [conn];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
    for k in 0..sockets.len() {
        let i = (start + k) % sockets.len();
        let addr = match UnixAddr::new(sockets[i].as_path()) {
            Ok(addr) => addr,
            Err(e) => {
                last = e.into();
                continue;
            }
        };
        let iov = [IoSlice::new(data)];
        match sendmsg(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&addr),
        ) {
            Ok(_) => return Ok(i),
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

/// A gateway process's hand-off socket.
pub(crate) struct Receiver {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    /// Its (device, inode): a draining process whose name now is another socket's has a
    /// successor.
    id: (u64, u64),
    buf: Vec<u8>,
}

/// Why a passed descriptor was not served.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Not a datagram of these formats (another program wrote to the socket).
    Format,
    /// A descriptor that is not a connected TCP socket.
    NotTcp,
}

impl Receiver {
    /// Binds `path` (0600, its directory 0700; a stale socket is replaced). Needs a runtime.
    pub(crate) fn bind(path: &Path) -> std::io::Result<Receiver> {
        use std::os::unix::fs::PermissionsExt;
        super::prepare_socket_path(path)?;
        let socket = std::os::unix::net::UnixDatagram::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket.set_nonblocking(true)?;
        Ok(Receiver {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            path: path.to_path_buf(),
            id: file_id(path)?,
            buf: Vec::new(),
        })
    }

    /// What names this socket: another process bound its name since if it changed.
    pub(crate) fn id(&self) -> (u64, u64) {
        self.id
    }

    fn replaced(&self) -> bool {
        successor_at(&self.path, self.id)
    }

    /// The next connection passed; `Err(Refused)` for a datagram that is not one (its
    /// descriptors closed). An error of the socket itself ends the hand-offs.
    pub(crate) async fn next(&mut self) -> std::io::Result<Result<Passed, Refused>> {
        let fd = self.socket.as_raw_fd();
        self.buf.resize(MAX_STATE, 0);
        loop {
            self.socket.readable().await?;
            let buf = &mut self.buf;
            match self.socket.try_io(Interest::READABLE, || receive(fd, buf)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                result => return result,
            }
        }
    }
}

impl Drop for Receiver {
    /// The socket's name goes with it (unless a successor's now): workers then try the
    /// group's other processes.
    fn drop(&mut self) {
        if !self.replaced() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether the socket named `path` is no longer the one whose [`Receiver::id`] is `id`: a
/// successor bound the name (`host upgrade`: a process started while this one runs).
pub(crate) fn successor_at(path: &Path, id: (u64, u64)) -> bool {
    file_id(path).is_ok_and(|now| now != id)
}

fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// One datagram: its descriptors owned at once (so every one is closed unless served), the
/// first checked and returned.
fn receive(sock: RawFd, data: &mut [u8]) -> std::io::Result<Result<Passed, Refused>> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [std::io::IoSliceMut::new(data)];
    let msg = recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let len = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let mut fds: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for this
            // message; nothing else knows their numbers, so each is owned here exactly once.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let state = match &data[..len] {
        _ if fds.len() != 1 || truncated => return Ok(Err(Refused::Format)),
        d if d == MAGIC => None,
        d if d.starts_with(MAGIC_ESTABLISHED) => {
            match serde_json::from_slice::<HandedClient>(&d[MAGIC_ESTABLISHED.len()..]) {
                Ok(state) => Some(state),
                Err(_) => return Ok(Err(Refused::Format)),
            }
        }
        _ => return Ok(Err(Refused::Format)),
    };
    let fd = fds.pop().expect("one descriptor");
    let Some(stream) = connected_tcp(fd) else {
        return Ok(Err(Refused::NotTcp));
    };
    Ok(Ok(match state {
        None => Passed::New(stream),
        Some(state) => Passed::Established(stream, state),
    }))
}

/// `fd` as a TCP stream if it is a connected (not listening) IPv4 or IPv6 stream socket.
fn connected_tcp(fd: OwnedFd) -> Option<std::net::TcpStream> {
    let stream = getsockopt(&fd, sockopt::SockType).ok()? == SockType::Stream;
    let listening = getsockopt(&fd, sockopt::AcceptConn).ok()?;
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()?
        .family();
    let inet = matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6));
    (stream && !listening && inet).then(|| std::net::TcpStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_passed_connection_arrives_unread_and_anything_else_is_refused() {
        let dir = std::env::temp_dir().join(format!("host-handoff-test-{}", std::process::id()));
        let path = dir.join("gw-0.handoff");
        let mut receiver = Receiver::bind(&path).unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut client, b"GET /chat HTTP/1.1\r\n").unwrap();
        let missing = dir.join("gone.handoff");
        let took = pass(server.as_raw_fd(), &[missing, path.clone()], 0).unwrap();
        assert_eq!(took, 1, "a missing socket is skipped");
        drop(server);
        let Passed::New(mut got) = receiver.next().await.unwrap().unwrap() else {
            panic!("a new connection")
        };
        let mut line = [0u8; 20];
        std::io::Read::read_exact(&mut got, &mut line).unwrap();
        assert_eq!(&line, b"GET /chat HTTP/1.1\r\n");

        // A listening socket is not a client; nor is a datagram without the format.
        pass(listener.as_raw_fd(), std::slice::from_ref(&path), 0).unwrap();
        assert!(matches!(
            receiver.next().await.unwrap(),
            Err(Refused::NotTcp)
        ));
        let other = std::os::unix::net::UnixDatagram::unbound().unwrap();
        other.send_to(b"hello", &path).unwrap();
        assert!(matches!(
            receiver.next().await.unwrap(),
            Err(Refused::Format)
        ));

        drop(receiver);
        assert!(!path.exists(), "the socket's name goes with it");
        let err = pass(client.as_raw_fd(), &[path], 0).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
