//! The control socket: `state_dir/host.sock`, mode 0600, one request and one answer per
//! connection, framed by [`protocol`](crate::protocol).
//!
//! The server half accepts connections, checks the peer's credentials (same uid or root), and
//! turns each request into an [`Event::Control`] for the supervisor, whose answer it writes back.
//! It decides nothing itself. The client half is what `host reload|stop|status` use.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::supervisor::Event;
use crate::protocol::{ControlRequest, ControlResponse, ProtocolError, Receiver, Sender};

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

/// How long, at shutdown, the server waits for answers still being written (a `stop`'s own).
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Accepts control connections until `shutdown` fires, then waits (bounded) for the answers
/// still in flight, so the caller of `stop` hears `Stopped` before the master exits.
pub async fn serve(
    listener: UnixListener,
    events: mpsc::UnboundedSender<Event>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let me = nix::unistd::getuid().as_raw();
    let mut clients = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused a control connection from another user");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read control peer credentials; refused");
                continue;
            }
        }
        clients.spawn(answer(stream, events.clone()));
    }
    drop(listener);
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
}

async fn answer(stream: UnixStream, events: mpsc::UnboundedSender<Event>) {
    let (rd, wr) = stream.into_split();
    let mut rx = Receiver::<_, ControlRequest>::new(rd);
    let mut tx = Sender::<_, ControlResponse>::new(wr);
    let request = match rx.recv().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let _ = tx
                .send(&ControlResponse::Refused {
                    reason: format!("bad request: {e}"),
                })
                .await;
            return;
        }
    };
    let (reply, answer) = oneshot::channel();
    if events.send(Event::Control { request, reply }).is_err() {
        return;
    }
    let response = answer.await.unwrap_or(ControlResponse::Refused {
        reason: "the master is shutting down".into(),
    });
    let _ = tx.send(&response).await;
}

/// Sends one request to the master behind `socket` and waits for its answer.
pub async fn request(
    socket: &Path,
    request: ControlRequest,
) -> Result<ControlResponse, ControlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning {
                    socket: socket.to_path_buf(),
                }
            }
            _ => ControlError::Connect {
                socket: socket.to_path_buf(),
                source,
            },
        })?;
    let (rd, wr) = stream.into_split();
    let mut tx = Sender::<_, ControlRequest>::new(wr);
    let mut rx = Receiver::<_, ControlResponse>::new(rd);
    let protocol = |source| ControlError::Protocol {
        socket: socket.to_path_buf(),
        source,
    };
    tx.send(&request).await.map_err(protocol)?;
    match rx.recv().await.map_err(protocol)? {
        Some(response) => Ok(response),
        None => Err(ControlError::NoAnswer {
            socket: socket.to_path_buf(),
        }),
    }
}
