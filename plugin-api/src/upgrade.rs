//! Taking over a connection after `101 Switching Protocols` (HTTP/1.1 `Upgrade`, as a WebSocket
//! handshake does).
//!
//! An async request that asked for an upgrade carries an [`OnUpgrade`] in its extensions. A
//! handler that wants the connection takes it ([`on`]), answers `101`, and awaits it (usually
//! in a task it spawns): it resolves to an [`Upgraded`] byte stream (tokio's `AsyncRead` and
//! `AsyncWrite`) once the host has sent the 101. The host counts an upgraded connection as open
//! until the plugin drops it, so a drain waits for it (up to `graceful_timeout`). A `101` whose
//! request carried no [`OnUpgrade`], or whose [`OnUpgrade`] was dropped, is never sent: the
//! host answers `500` and logs why. For WebSocket, [`crate::websocket`] does all of this.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_ffi::ContextExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::ffi::{RawIo, RawUpgrade, poll};

/// The promise of a request's connection, resolved once the `101` is sent. Cloning shares it;
/// the first to await it gets the connection.
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<HostUpgrade>>>);

struct HostUpgrade(RawUpgrade);

// SAFETY: the host's upgrade objects may be polled and dropped from any thread, one at a time
// (the `Mutex` above makes it so).
unsafe impl Send for HostUpgrade {}

impl Drop for HostUpgrade {
    fn drop(&mut self) {
        // SAFETY: the host's live upgrade object, dropped exactly once, here.
        unsafe { ((*self.0.vtable).drop)(self.0.state) }
    }
}

/// Why an upgrade did not happen.
#[derive(Debug)]
pub struct UpgradeError(&'static str);

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for UpgradeError {}

/// Takes the [`OnUpgrade`] out of a request, if the request can be upgraded (HTTP/1.1 with an
/// `Upgrade` header, served by a host of ABI 1.3 or later).
pub fn on<B>(req: &mut http::Request<B>) -> Option<OnUpgrade> {
    req.extensions_mut().remove::<OnUpgrade>()
}

impl OnUpgrade {
    /// # Safety
    /// `raw` must be an upgrade object made by the host (not `NONE`), owned by the caller.
    pub(crate) unsafe fn from_host(raw: RawUpgrade) -> OnUpgrade {
        OnUpgrade(Arc::new(Mutex::new(Some(HostUpgrade(raw)))))
    }
}

impl std::fmt::Debug for OnUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnUpgrade")
    }
}

impl Future for OnUpgrade {
    type Output = Result<Upgraded, UpgradeError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(up) = slot.as_mut() else {
            return Poll::Ready(Err(UpgradeError("the upgrade was already taken")));
        };
        let mut io = RawIo::NONE;
        let vt = up.0.vtable;
        // SAFETY: the host's live upgrade object; `io` is a valid out-pointer.
        let status =
            cx.with_ffi_context(|fcx| unsafe { ((*vt).poll_upgraded)(up.0.state, fcx, &mut io) });
        match status {
            poll::PENDING => Poll::Pending,
            poll::READY if !io.is_none() => {
                *slot = None;
                Poll::Ready(Ok(Upgraded(io)))
            }
            _ => {
                *slot = None;
                Poll::Ready(Err(UpgradeError(
                    "the connection was not upgraded (the response was not a 101, or the client left)",
                )))
            }
        }
    }
}

/// An upgraded connection: the raw bytes after the `101`, read and written through the host.
pub struct Upgraded(RawIo);

// SAFETY: the host's I/O objects may be used from any thread, one at a time (`&mut` access).
unsafe impl Send for Upgraded {}
// SAFETY: every method takes `&mut self` or `Pin<&mut Self>`; a shared reference allows nothing.
unsafe impl Sync for Upgraded {}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upgraded")
    }
}

fn io_error(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        format!("upgraded connection: {what} failed"),
    )
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        let mut done = 0usize;
        let (state, vt) = (self.0.state, self.0.vtable);
        // SAFETY: the host's live I/O object; `unfilled` is writable for its length; `done` is a
        // valid out-pointer.
        let status = cx.with_ffi_context(|fcx| unsafe {
            ((*vt).poll_read)(state, fcx, unfilled.as_mut_ptr(), unfilled.len(), &mut done)
        });
        match status {
            poll::PENDING => Poll::Pending,
            poll::READY => {
                buf.advance(done.min(unfilled_len(buf)));
                Poll::Ready(Ok(()))
            }
            _ => Poll::Ready(Err(io_error("read"))),
        }
    }
}

fn unfilled_len(buf: &ReadBuf<'_>) -> usize {
    buf.remaining()
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut done = 0usize;
        let (state, vt) = (self.0.state, self.0.vtable);
        // SAFETY: the host's live I/O object; `buf` is readable for its length.
        let status = cx.with_ffi_context(|fcx| unsafe {
            ((*vt).poll_write)(state, fcx, buf.as_ptr(), buf.len(), &mut done)
        });
        match status {
            poll::PENDING => Poll::Pending,
            poll::READY => Poll::Ready(Ok(done.min(buf.len()))),
            _ => Poll::Ready(Err(io_error("write"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let (state, vt) = (self.0.state, self.0.vtable);
        // SAFETY: the host's live I/O object.
        match cx.with_ffi_context(|fcx| unsafe { ((*vt).poll_flush)(state, fcx) }) {
            poll::PENDING => Poll::Pending,
            poll::READY => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(io_error("flush"))),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let (state, vt) = (self.0.state, self.0.vtable);
        // SAFETY: the host's live I/O object.
        match cx.with_ffi_context(|fcx| unsafe { ((*vt).poll_shutdown)(state, fcx) }) {
            poll::PENDING => Poll::Pending,
            poll::READY => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(io_error("shutdown"))),
        }
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        // SAFETY: the host's live I/O object, dropped exactly once, here.
        unsafe { ((*self.0.vtable).drop)(self.0.state) }
    }
}
