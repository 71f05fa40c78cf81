//! The one accept loop of the master's own sockets: the control socket (`control.rs`) and the
//! admin listener (`admin.rs`). Each says what it serves through [`Server`]; this loop accepts,
//! keeps the open connections under the server's cap, and survives accept errors.
//!
//! - At most [`Server::cap`] connections are open at once. One more closes the oldest that has
//!   not sent its request yet (or, with [`Server::EVICT_ANY`], the oldest of all); when every
//!   open one is waiting for its answer, the new one is closed instead.
//! - A failed `accept` is logged at most once a second per cause with a count, and accepting
//!   pauses with backoff (10 ms doubling to 1 s), on a timer: the loop goes on reaping finished
//!   connections and hears its shutdown meanwhile. On `EMFILE`/`ENFILE` a spare fd, kept open
//!   for this, is closed so one queued connection can be accepted and closed at once: its
//!   client learns something instead of hanging, and the queue moves.
//! - [`Server::upkeep`] runs every [`Server::upkeep_every`] (the control socket's `state_dir`
//!   watch, which may put a new listener in place).
//!
//! It owns no socket and decides nothing about a request: it hands each admitted connection to
//! [`Server::serve`], as a task of its own, and returns those still open at shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio::time::Instant;

use crate::ratelimit::RateLimit;

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening socket the loop accepts on.
pub(crate) trait Listener {
    type Stream: Send + 'static;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Stream>>;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Stream>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Stream>> {
        tokio::net::TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// What one socket serves. See the module doc.
pub(crate) trait Server {
    type Listener: Listener;
    /// The socket, in log lines: "control socket".
    const WHAT: &'static str;
    /// One of its connections, in log lines: "control connection".
    const CONNECTION: &'static str;
    /// At the cap, close the oldest connection even if it sent its request.
    const EVICT_ANY: bool = false;
    /// Most connections open at once.
    fn cap(&self) -> usize;

    /// Whether to serve this connection at all (checked before it counts against the cap).
    fn admit(&self, _stream: &<Self::Listener as Listener>::Stream) -> bool {
        true
    }

    /// Serves one connection; it sets `requested` once its request is in.
    fn serve(
        &self,
        stream: <Self::Listener as Listener>::Stream,
        requested: Arc<AtomicBool>,
    ) -> impl Future<Output = ()> + Send + 'static;

    /// How often [`Server::upkeep`] runs (`None`: never).
    fn upkeep_every(&self) -> Option<Duration> {
        None
    }

    /// Periodic care of the listener (it may replace it).
    fn upkeep(&mut self, _listener: &mut Self::Listener) {}
}

/// A connection being served: when it was accepted (order) and whether its request is in.
struct Conn {
    seq: u64,
    requested: Arc<AtomicBool>,
    abort: AbortHandle,
}

/// Accepts on `listener` for `server` until `shutdown` fires; returns the connections still
/// being served (the caller lets them finish, bounded, or aborts them).
pub(crate) async fn run<S: Server>(
    server: &mut S,
    listener: &mut S::Listener,
    mut shutdown: oneshot::Receiver<()>,
) -> JoinSet<()> {
    let accept_errors = RateLimit::per_second();
    let shed = RateLimit::per_second();
    let full = RateLimit::per_second();
    let mut clients = JoinSet::new();
    let mut conns: HashMap<Id, Conn> = HashMap::new();
    let mut seq = 0u64;
    let mut spare = open_spare();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut paused_until: Option<Instant> = None;
    let mut upkeep = server.upkeep_every().map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick_or_never(&mut upkeep) => {
                server.upkeep(listener);
                continue;
            }
            Some(done) = clients.join_next_with_id(), if !clients.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                conns.remove(&id);
                continue;
            }
            _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                paused_until = None;
                continue;
            }
            accepted = std::future::poll_fn(|cx| listener.poll_accept(cx)), if paused_until.is_none() => match accepted {
                Ok(stream) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    stream
                }
                Err(e) => {
                    if let Some(suppressed) = accept_errors.hit(&e) {
                        tracing::warn!(error = %e, suppressed, retry_in = ?backoff, "{} accept failed", S::WHAT);
                    }
                    if matches!(e.raw_os_error(), Some(nix::libc::EMFILE | nix::libc::ENFILE))
                        && spare.take().is_some()
                    {
                        // The spare fd is closed: accept one queued connection and close it,
                        // so its client is told (EOF) instead of waiting in the backlog.
                        if let Some(Ok(_shed)) = try_accept(listener)
                            && let Some(suppressed) = shed.hit(&e)
                        {
                            tracing::warn!(suppressed, "out of file descriptors: closed a queued {}", S::CONNECTION);
                        }
                        spare = open_spare();
                    }
                    paused_until = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        if !server.admit(&stream) {
            continue;
        }
        let cap = server.cap();
        if conns.len() >= cap {
            let evictable = conns
                .iter()
                .filter(|(_, c)| S::EVICT_ANY || !c.requested.load(Ordering::Acquire))
                .min_by_key(|(_, c)| c.seq)
                .map(|(id, _)| *id);
            match evictable.and_then(|id| conns.remove(&id)) {
                Some(evicted) => {
                    evicted.abort.abort();
                    let which = if S::EVICT_ANY {
                        ""
                    } else {
                        " that sent no request yet,"
                    };
                    tracing::debug!(
                        cap,
                        "closed the oldest {}{which} to make room",
                        S::CONNECTION
                    );
                    // Let the aborted task run its drop (closing the fd) before accepting more.
                    tokio::task::yield_now().await;
                }
                None => {
                    if let Some(suppressed) = full.hit(&std::io::Error::other("full")) {
                        tracing::warn!(
                            cap,
                            suppressed,
                            "refused a {}: every open one is waiting for an answer",
                            S::CONNECTION
                        );
                    }
                    continue;
                }
            }
        }
        let requested = Arc::new(AtomicBool::new(false));
        let abort = clients.spawn(server.serve(stream, requested.clone()));
        seq += 1;
        conns.insert(
            abort.id(),
            Conn {
                seq,
                requested,
                abort,
            },
        );
    }
    clients
}

/// The next tick of `interval`, or never when there is none.
pub(crate) async fn tick_or_never(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One accept attempt, without waiting: `None` when nothing is queued.
fn try_accept<L: Listener>(listener: &L) -> Option<std::io::Result<L::Stream>> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    match listener.poll_accept(&mut cx) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// The fd kept in reserve for accepting (and closing) a connection when fds run out.
fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}
