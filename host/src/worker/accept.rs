//! The accept side of the event loop: takes connections from the listening socket the worker
//! inherited and hands each to its own task ([`connection::spawn`]).
//!
//! Owns the listener's state: accepting; parked (the shared socket was shut down, by a plugin
//! here or in another worker: out of the reactor, looked at every [`LISTENER_RECHECK`] until
//! the master re-armed it); or stopped (draining, or fd 3 is no longer this worker's). It drops
//! connections whose client is already gone ([`backlog`]), stops accepting
//! while the worker holds `max_connections`, steps aside for less loaded workers (the
//! [`balance`](super::balance) decides), and tells the master when the socket is lost
//! (`ListenerLost`). It never binds or re-arms a socket, and never serves a connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::shared::Shared;
use super::startup::ToMaster;
use super::{backlog, connection, listener};
use crate::protocol::WorkerToMaster;
use crate::ratelimit::RateLimit;

/// While the shared listening socket does not listen, how often a worker looks again.
const LISTENER_RECHECK: Duration = Duration::from_millis(20);

/// When `max_connections` is not set: this share of the worker's open-files limit (the rest
/// stays for the plugin's own files, sockets and pipes).
const CONNECTIONS_PER_FD: (u64, u64) = (9, 10);

/// What woke the accept side: handle it with [`Acceptor::handle`].
pub(super) enum Woke {
    /// A connection closed while the worker held `max_connections`.
    BelowLimit,
    Accepted(std::io::Result<listener::Accepted>),
    /// Time to look whether a parked listener listens again.
    Recheck,
}

/// The listener and the bound on connections.
pub(super) struct Acceptor {
    listener: Option<AsyncFd<std::net::TcpListener>>,
    /// The listener while the shared socket does not listen.
    parked: Option<std::net::TcpListener>,
    id: listener::Identity,
    max_connections: u64,
    /// Open connections; wakes the loop when one closes while at `max_connections`.
    connections: watch::Receiver<u64>,
    full: bool,
}

impl Acceptor {
    /// Accepts on `listener` (registered with the reactor) for the worker whose state is
    /// `shared`; `max_connections` 0 means a share of the open-files limit.
    pub(super) fn new(
        listener: AsyncFd<std::net::TcpListener>,
        id: listener::Identity,
        max_connections: u64,
        shared: &Shared,
    ) -> Acceptor {
        Acceptor {
            listener: Some(listener),
            parked: None,
            id,
            max_connections: match max_connections {
                0 => connections_from_fd_limit(),
                n => n,
            },
            connections: shared.tally.connections.subscribe(),
            full: false,
        }
    }

    /// Stops accepting for good (the drain): the listener is closed.
    pub(super) fn stop(&mut self) {
        self.listener = None;
        self.parked = None;
    }

    /// Before each wait: at `max_connections`, stop accepting (the other workers, or the
    /// backlog, take new connections) until one closes; counted and logged once each time.
    pub(super) fn check_limit(&mut self, shared: &Shared) {
        let full = *self.connections.borrow_and_update() >= self.max_connections;
        if full && !self.full && self.listener.is_some() {
            if let Some(counters) = shared.counters {
                counters.limit_hit(crate::counters::Limit::Connections);
            }
            static AT_LIMIT: RateLimit = RateLimit::per_second();
            if let Some(suppressed) = AT_LIMIT.hit(&std::io::ErrorKind::QuotaExceeded.into()) {
                tracing::warn!(
                    max_connections = self.max_connections,
                    suppressed,
                    "holding max_connections: not accepting until a connection closes"
                );
            }
        }
        self.full = full;
    }

    /// Waits for the accept side's next event (forever when there is nothing to wait for).
    /// Cancel-safe: another branch of the event loop may win.
    pub(super) async fn wait(&mut self, shared: &Shared) -> Woke {
        let Acceptor {
            listener,
            parked,
            connections,
            full,
            ..
        } = self;
        tokio::select! {
            _ = connections.changed(), if *full => Woke::BelowLimit,
            accepted = async {
                shared.balance.step_aside(|| shared.recycle.retiring()).await;
                listener::accept(listener.as_ref().expect("guarded")).await
            }, if listener.is_some() && !*full => Woke::Accepted(accepted),
            _ = tokio::time::sleep(LISTENER_RECHECK), if parked.is_some() => Woke::Recheck,
            else => std::future::pending().await,
        }
    }

    /// Handles what woke the accept side; tells the master when the socket is lost.
    pub(super) async fn handle(&mut self, woke: Woke, shared: &Arc<Shared>, tx: &mut ToMaster) {
        match woke {
            Woke::BelowLimit => {}
            Woke::Recheck => {
                if listener::check(self.id).is_ok() {
                    tracing::debug!("the listening socket listens again; accepting");
                    self.unpark();
                }
            }
            // Its client gave up while it waited in the backlog: do not run its request.
            Woke::Accepted(Ok(listener::Accepted::Connection(stream)))
                if backlog::client_gone(&stream) =>
            {
                backlog::note_dropped()
            }
            Woke::Accepted(Ok(listener::Accepted::Connection(stream))) => {
                let Ok(stream) = TcpStream::from_std(stream) else {
                    return;
                };
                connection::spawn(shared.clone(), stream);
                // Let the new connection read its first request (and count itself for
                // balance, if it will stay) before the next accept looks at the counts.
                if shared.balance.enabled() {
                    tokio::task::yield_now().await;
                }
            }
            Woke::Accepted(Err(e)) => self.failed(e, tx).await,
            Woke::Accepted(Ok(listener::Accepted::HungUp)) => self.hung_up(tx).await,
        }
    }

    /// `accept` failed. EMFILE and friends: logged at most once a second per cause (with how
    /// many were not logged), with a brief back-off instead of spinning. The listener itself
    /// may be gone (closed, or shut down by a plugin): the master is told at once (then at most
    /// once a second).
    async fn failed(&mut self, e: std::io::Error, tx: &mut ToMaster) {
        static ACCEPT_ERRORS: RateLimit = RateLimit::per_second();
        let logged = ACCEPT_ERRORS.hit(&e);
        if let Some(suppressed) = logged {
            tracing::warn!(error = %e, suppressed, "accept failed");
        }
        let lost = if listener::means_gone(&e) {
            listener::check(self.id).err()
        } else {
            None
        };
        match lost {
            Some(lost) if lost.own_fd => {
                tracing::error!(
                    "{}: this worker stops accepting and asks for a replacement",
                    lost.reason
                );
                // fd 3 is not ours any more: never close it (or deregister it).
                if let Some(l) = self.listener.take() {
                    std::mem::forget(l);
                }
                let _ = tx
                    .send(&WorkerToMaster::ListenerLost {
                        own_fd: true,
                        reason: lost.reason,
                    })
                    .await;
            }
            Some(lost) => {
                if logged.is_some() {
                    let _ = tx
                        .send(&WorkerToMaster::ListenerLost {
                            own_fd: false,
                            reason: lost.reason,
                        })
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }

    /// The socket was shut down (by a plugin, here or in another worker): out of the reactor
    /// until it listens again; the master re-arms it.
    async fn hung_up(&mut self, tx: &mut ToMaster) {
        let lost = listener::check(self.id).err();
        if let Some(l) = self.listener.take() {
            match lost {
                Some(ref lost) if lost.own_fd => std::mem::forget(l),
                _ => self.parked = Some(l.into_inner()),
            }
        }
        let Some(lost) = lost else {
            // Re-armed already: register it again at once.
            self.unpark();
            return;
        };
        static HUNG_UP: RateLimit = RateLimit::per_second();
        if let Some(suppressed) = HUNG_UP.hit(&std::io::ErrorKind::Other.into()) {
            tracing::warn!(
                suppressed,
                "{}; waiting for the master to re-arm it",
                lost.reason
            );
        }
        if lost.own_fd {
            self.parked = None;
        }
        let _ = tx
            .send(&WorkerToMaster::ListenerLost {
                own_fd: lost.own_fd,
                reason: lost.reason,
            })
            .await;
    }

    fn unpark(&mut self) {
        self.listener = self.parked.take().and_then(|l| listener::register(l).ok());
    }
}

/// The default `max_connections`: [`CONNECTIONS_PER_FD`] of the open-files limit the worker
/// inherited (the master raised it to the hard limit), at least 1.
fn connections_from_fd_limit() -> u64 {
    let (num, den) = CONNECTIONS_PER_FD;
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
        .saturating_mul(num)
        .checked_div(den)
        .unwrap_or(1)
        .max(1)
}
