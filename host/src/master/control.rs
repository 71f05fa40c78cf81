//! The control socket: `state_dir/host.sock`, mode 0600, one request and one answer per
//! connection, framed by [`protocol`](crate::protocol).
//!
//! The server half accepts connections, checks the peer's credentials (same uid or root), and
//! turns each request into an [`Event::Control`] for the supervisor, whose answer it writes back.
//! It decides nothing itself. The client half is what `host reload|stop|status` use; every wait
//! in it is bounded by the caller's timeout.
//!
//! # It cannot be starved
//!
//! - A client must send its whole request within [`READ_DEADLINE`] of being accepted, and an
//!   answer must be written within [`WRITE_DEADLINE`]; otherwise the connection is closed.
//! - At most [`connection_cap`] connections are open at once (64, or a quarter of the fd limit
//!   when that is lower). When one more arrives, the oldest connection that has not finished
//!   sending its request is closed to make room: silent connections cannot keep a real `status`
//!   out, and they are never a reason to refuse one. Only when every open connection is waiting
//!   for an answer (64 queued reloads) is the new one closed.
//! - The cap is the master's fd reserve: the control plane never holds more than a quarter of the
//!   fd limit, so the rest stays free for supervising (spawning a worker needs a socketpair, a
//!   dup of the listener and a pipe for `exec`).
//! - If `accept` fails anyway (`EMFILE` because something else used the fds), the error is
//!   logged at most once a second per cause with a count, and accepting is retried with backoff
//!   (10 ms doubling to 1 s). On `EMFILE`/`ENFILE` a spare fd, kept open for this, is closed so
//!   one queued connection can be accepted and closed at once: its client learns something
//!   instead of hanging, and the queue moves.
//!
//! # It cannot be lost
//!
//! The server loop also runs the [`Upkeep`] the master gives it, `state_dir::Watch` twice a
//! second: a socket (or pidfile) deleted from its path, say with `rm -rf state_dir`, is created
//! again and the new listener replaces the old one, so every CLI command reaches this master
//! again within a second.
//!
//! The accept loop itself (the cap, eviction, backoff, the spare fd) is
//! [`accept_loop`](super::accept_loop)'s, shared with the admin listener; this module says
//! who is admitted and what a connection does.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::accept_loop::Server;
use super::supervisor::Event;
use crate::protocol::{ControlRequest, ControlResponse, ProtocolError, Receiver, Sender};

/// A client must have sent its whole request this long after the master accepted it.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);
/// Writing an answer may take this long (a client that does not read cannot hold a connection).
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Most control connections open at once (fewer under a low fd limit: see [`connection_cap`]).
pub const MAX_CONNECTIONS: usize = 64;

/// How many control connections may be open: [`MAX_CONNECTIONS`], or a quarter of the soft fd
/// limit when that is lower (at least 2), so the control plane leaves most fds to supervision.
pub fn connection_cap() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft);
    usize::try_from(soft / 4)
        .unwrap_or(usize::MAX)
        .clamp(2, MAX_CONNECTIONS)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("host is not running (no master listening on {socket})")]
    NotRunning { socket: PathBuf },
    #[error("cannot connect to the master at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to the master at {socket} before it answered")]
    NoAnswer { socket: PathBuf },
    #[error("bad answer from the master at {socket}")]
    Protocol {
        socket: PathBuf,
        #[source]
        source: ProtocolError,
    },
    #[error(
        "timed out after {} waiting for {what} (master at {socket}; --timeout sets the limit)",
        humantime::format_duration(*after)
    )]
    TimedOut {
        socket: PathBuf,
        what: String,
        after: Duration,
    },
    #[error("cannot create the control socket {socket}")]
    Bind {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the control socket, replacing a stale one. The caller holds the pidfile lock, so no
/// live master owns the old socket.
pub fn bind(socket: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        socket: socket.to_path_buf(),
        source,
    };
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(socket).map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Binds the control socket for a master taking over from another (`host upgrade`): binds a
/// private path next to `socket`, then renames it over `socket`. The rename is atomic, so a
/// client always finds a master listening there: the old one until the rename, this one after.
pub fn bind_replacing(socket: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        socket: socket.to_path_buf(),
        source,
    };
    let mut tmp = socket.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, socket));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(listener)
}

/// How long, at shutdown, the server waits for answers still being written (a `stop`'s own).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Periodic care of the control socket, given by the master: `state_dir`'s watch, which binds
/// the socket again (replacing the listener) when it was deleted.
pub struct Upkeep {
    pub every: Duration,
    pub run: Box<dyn FnMut(&mut UnixListener) + Send>,
}

/// The control socket, as the accept loop serves it.
struct ControlServer {
    events: mpsc::UnboundedSender<Event>,
    me: u32,
    upkeep: Option<Upkeep>,
}

impl Server for ControlServer {
    type Listener = UnixListener;
    const WHAT: &'static str = "control socket";
    const CONNECTION: &'static str = "control connection";

    fn cap(&self) -> usize {
        connection_cap()
    }

    fn admit(&self, stream: &UnixStream) -> bool {
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == self.me || cred.uid() == 0 => true,
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused a control connection from another user");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read control peer credentials; refused");
                false
            }
        }
    }

    fn serve(
        &self,
        stream: UnixStream,
        requested: Arc<AtomicBool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        answer(stream, self.events.clone(), requested)
    }

    fn upkeep_every(&self) -> Option<Duration> {
        self.upkeep.as_ref().map(|u| u.every)
    }

    fn upkeep(&mut self, listener: &mut UnixListener) {
        if let Some(u) = &mut self.upkeep {
            (u.run)(listener);
        }
    }
}

/// Accepts control connections until `shutdown` fires, then waits (bounded) for the answers
/// still in flight, so the caller of `stop` hears `Stopped` before the master exits. See the
/// module doc for the limits it enforces ([`accept_loop`](super::accept_loop) enforces them).
pub async fn serve(
    mut listener: UnixListener,
    events: mpsc::UnboundedSender<Event>,
    shutdown: oneshot::Receiver<()>,
    upkeep: Option<Upkeep>,
) {
    let mut server = ControlServer {
        events,
        me: nix::unistd::getuid().as_raw(),
        upkeep,
    };
    let mut clients = super::accept_loop::run(&mut server, &mut listener, shutdown).await;
    drop(listener);
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
}

async fn answer(
    stream: UnixStream,
    events: mpsc::UnboundedSender<Event>,
    requested: Arc<AtomicBool>,
) {
    let (rd, wr) = stream.into_split();
    let mut rx = Receiver::<_, ControlRequest>::new(rd);
    let mut tx = Sender::<_, ControlResponse>::new(wr);
    let request = match tokio::time::timeout(READ_DEADLINE, rx.recv()).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            let refusal = ControlResponse::Refused {
                reason: format!("bad request: {e}"),
            };
            let _ = tokio::time::timeout(WRITE_DEADLINE, tx.send(&refusal)).await;
            return;
        }
        Err(_) => {
            tracing::debug!(
                "closed a control connection that sent no request within {READ_DEADLINE:?}"
            );
            return;
        }
    };
    requested.store(true, Ordering::Release);
    let (reply, answer) = oneshot::channel();
    if events.send(Event::Control { request, reply }).is_err() {
        return;
    }
    let response = answer.await.unwrap_or(ControlResponse::Refused {
        reason: "the master is shutting down".into(),
    });
    let _ = tokio::time::timeout(WRITE_DEADLINE, tx.send(&response)).await;
}

/// What a client waits for after sending `request`, in words for a timeout message.
fn awaited(request: &ControlRequest) -> &'static str {
    match request {
        ControlRequest::Status => "the master's answer to `status`",
        ControlRequest::Reload | ControlRequest::ReloadWith(_) => {
            "the reload to finish (the master goes on with it; `host status` shows the outcome)"
        }
        ControlRequest::Rollback => {
            "the rollback to finish (the master goes on with it; `host status` shows the outcome)"
        }
        ControlRequest::Stop => "every worker to stop (the master goes on stopping)",
        ControlRequest::Promote => {
            "the promoted generation to reach every worker (the master goes on; `host status` shows it)"
        }
        ControlRequest::Abort => {
            "the rollback to finish (the master goes on with it; `host status` shows the outcome)"
        }
        ControlRequest::Upgrade => {
            "the new master to take over (the master goes on with it; `host status` shows who serves)"
        }
        ControlRequest::Group { request, .. } => awaited(request),
    }
}

/// Sends one request to the master behind `socket` and waits for its answer, `timeout` at
/// most for the whole exchange (connecting included).
///
/// A connection the master closed without reading the request (reset: shed while it was out of
/// fds, or closed at its read deadline) did nothing, so it is tried again until the deadline.
pub async fn request(
    socket: &Path,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    let deadline = Instant::now() + timeout;
    let timed_out = |what: &str| ControlError::TimedOut {
        socket: socket.to_path_buf(),
        what: what.to_string(),
        after: timeout,
    };
    let mut pause = Duration::from_millis(20);
    let mut resets = 0u32;
    loop {
        let stream = connect(socket, deadline, &timed_out).await?;
        match exchange(stream, &request, deadline).await {
            Ok(response) => return Ok(response),
            Err(Exchange::Reset) => resets += 1,
            Err(Exchange::TimedOut(what)) => return Err(timed_out(what)),
            Err(Exchange::Protocol(source)) => {
                return Err(ControlError::Protocol {
                    socket: socket.to_path_buf(),
                    source,
                });
            }
            Err(Exchange::Closed) => {
                return Err(ControlError::NoAnswer {
                    socket: socket.to_path_buf(),
                });
            }
        }
        if Instant::now() + pause >= deadline {
            return Err(timed_out(&format!(
                "{} (the master closed the connection unread {resets} times: out of file descriptors?)",
                awaited(&request)
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Connects before `deadline`, waiting out a full backlog.
async fn connect(
    socket: &Path,
    deadline: Instant,
    timed_out: &impl Fn(&str) -> ControlError,
) -> Result<UnixStream, ControlError> {
    loop {
        let attempt = tokio::time::timeout_at(deadline, UnixStream::connect(socket)).await;
        match attempt {
            Err(_) => return Err(timed_out("the master to accept the connection")),
            Ok(Ok(stream)) => return Ok(stream),
            // A full backlog: the master is not accepting right now. Try again until the deadline.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() + Duration::from_millis(20) >= deadline {
                    return Err(timed_out(
                        "the master to accept the connection (its control socket backlog is full)",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Err(source)) => {
                return Err(match source.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        ControlError::NotRunning {
                            socket: socket.to_path_buf(),
                        }
                    }
                    _ => ControlError::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    },
                });
            }
        }
    }
}

/// Why one request/answer exchange did not produce an answer.
enum Exchange {
    /// Closed with the request unread: nothing happened, safe to try again.
    Reset,
    /// Closed after reading the request, without an answer.
    Closed,
    TimedOut(&'static str),
    Protocol(ProtocolError),
}

fn was_reset(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    ))
}

async fn exchange(
    stream: UnixStream,
    request: &ControlRequest,
    deadline: Instant,
) -> Result<ControlResponse, Exchange> {
    let (rd, wr) = stream.into_split();
    let mut tx = Sender::<_, ControlRequest>::new(wr);
    let mut rx = Receiver::<_, ControlResponse>::new(rd);
    let failed = |e: ProtocolError| {
        if was_reset(&e) {
            Exchange::Reset
        } else {
            Exchange::Protocol(e)
        }
    };
    tokio::time::timeout_at(deadline, tx.send(request))
        .await
        .map_err(|_| Exchange::TimedOut("the master to read the request"))?
        .map_err(failed)?;
    tokio::time::timeout_at(deadline, rx.recv())
        .await
        .map_err(|_| Exchange::TimedOut(awaited(request)))?
        .map_err(failed)?
        .ok_or(Exchange::Closed)
}
