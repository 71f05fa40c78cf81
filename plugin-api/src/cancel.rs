//! A request's cancellation as a blocking handler sees it: [`Cancellation`].
//!
//! Owns the plugin side of the ABI 1.4 token (`ffi::RawHandleRequest::cancel`, served by the
//! host's `ffi::CancelVTable`): a reference taken on the token for as long as a [`Cancellation`]
//! lives, given back when the last clone drops. It never decides when a request is cancelled
//! (the host does: the client left, or the host stopped waiting) and never stops a handler by
//! itself: the handler looks, and returns early.

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::ffi::CancelVTable;

/// The host's functions, when the host has them (ABI 1.4 and later).
static HOST: OnceLock<&'static CancelVTable> = OnceLock::new();

/// Records the host's functions (from `on_worker_start`). A null pointer: none.
pub(crate) fn install(vtable: *const CancelVTable) {
    // SAFETY: the host passes null or a pointer to a `'static` vtable (`HostContext::cancel`).
    if let Some(vt) = unsafe { vtable.as_ref() } {
        let _ = HOST.set(vt);
    }
}

/// Whether `handle` receives a `RawHandleRequest` (the host's context had the functions).
pub(crate) fn host_passes_tokens() -> bool {
    HOST.get().is_some()
}

/// A reference on the host's token.
struct Token {
    ptr: *const c_void,
    vt: &'static CancelVTable,
}

// SAFETY: the host's token functions are callable from any thread (`ffi::CancelVTable`), and
// the reference this holds keeps the token alive wherever it goes.
unsafe impl Send for Token {}
// SAFETY: as above; every function takes the token by shared pointer.
unsafe impl Sync for Token {}

impl Drop for Token {
    fn drop(&mut self) {
        (self.vt.drop)(self.ptr);
    }
}

/// Whether the request a blocking handler serves is still wanted. The host cancels it when the
/// client is gone (its HTTP/1 connection closed, its HTTP/2 stream reset) or when the host stops
/// waiting for the answer (`graceful_timeout`): the answer will never be sent, so a handler that
/// sleeps, waits or loops should look and return early. Get it with [`Cancellation::of`].
///
/// Requests served on the host's I/O thread ([`Dispatch::Inline`](crate::Dispatch)) and hosts
/// older than ABI 1.4 never cancel. Async handlers ([`Plugin::serve`](crate::Plugin::serve))
/// need none of this: their future is dropped when the client leaves.
#[derive(Clone, Default)]
pub struct Cancellation {
    token: Option<Arc<Token>>,
}

impl std::fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancellation")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Cancellation {
    /// The cancellation of `req` (the request `handle` received; it travels in its
    /// extensions). One that never fires when the request has none.
    pub fn of<B>(req: &http::Request<B>) -> Cancellation {
        req.extensions()
            .get::<Cancellation>()
            .cloned()
            .unwrap_or_default()
    }

    /// Takes a reference on the host's `token` (null: none).
    pub(crate) fn from_raw(token: *const c_void) -> Option<Cancellation> {
        let vt = *HOST.get()?;
        if token.is_null() {
            return None;
        }
        (vt.clone)(token);
        Some(Cancellation {
            token: Some(Arc::new(Token { ptr: token, vt })),
        })
    }

    /// Whether the request is cancelled. Cheap: an atomic load in the host.
    pub fn is_cancelled(&self) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| (t.vt.is_cancelled)(t.ptr))
    }

    /// Blocks until the request is cancelled or `timeout` passed (a sleep that ends early);
    /// whether it is cancelled.
    pub fn wait(&self, timeout: Duration) -> bool {
        match &self.token {
            Some(t) => {
                let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
                (t.vt.wait)(t.ptr, ns)
            }
            None => {
                std::thread::sleep(timeout);
                false
            }
        }
    }
}
