//! The functions the host gives a plugin to call back, in its [`HostContext`]: the log (with
//! the path of the request being served on the calling thread, see [`serving`]),
//! `restart_worker`, `panicked` (counted in this worker's cell, with the panics the host catches
//! around a plugin future, for the master's canary analysis) and a blocking request's
//! cancellation (a pool job's [`Cancel`]). The plugin's metrics are [`metrics_abi`]'s.
//!
//! Each is callable from any plugin thread, never blocks (but `cancel.wait`, whose purpose it
//! is) and never unwinds. Nothing here calls plugin code.
//!
//! [`HostContext`]: plugin_api::ffi::HostContext
//! [`metrics_abi`]: super::metrics_abi

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::catch_unwind;
use std::sync::Arc;
use std::time::Duration;

use plugin_api::ffi::{self, CancelVTable, RawStr};

use super::pool::Cancel;

thread_local! {
    /// The path of the request whose plugin code runs on this thread now (null: none), set by
    /// [`serving`] and read by [`plugin_log`].
    static SERVING: std::cell::Cell<(*const u8, usize)> =
        const { std::cell::Cell::new((std::ptr::null(), 0)) };
}

/// Names `path` in each log line the plugin writes on this thread until the guard drops, so a
/// panic's or an error's line points at its request. Guards nest.
pub fn serving(path: &str) -> Serving {
    Serving(SERVING.replace((path.as_ptr(), path.len())))
}

/// Restores the request named before [`serving`] when dropped.
pub struct Serving((*const u8, usize));

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.set(self.0);
    }
}

/// The path [`serving`] names on this thread, if any.
fn serving_path<'a>() -> Option<&'a str> {
    let (ptr, len) = SERVING.get();
    // SAFETY: set by `serving` from a `&str` that outlives its guard, which resets it on this
    // thread when dropped; the caller uses it only within the plugin call it was set for.
    (!ptr.is_null())
        .then(|| unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(ptr, len)) })
}

/// Forwards a plugin log record to this process's `tracing`, with the path of the request being
/// served on this thread when there is one.
pub(super) extern "C" fn plugin_log(level: u8, target: RawStr, message: RawStr) {
    let _ = catch_unwind(|| {
        // SAFETY: the plugin passes views valid for the duration of this call.
        let (target, message) = unsafe { (target.as_bytes(), message.as_bytes()) };
        let target = String::from_utf8_lossy(target);
        let message = String::from_utf8_lossy(message);
        let path = serving_path();
        match level {
            ffi::level::ERROR => {
                tracing::error!(target: "plugin", module = %target, path, "{message}")
            }
            ffi::level::WARN => {
                tracing::warn!(target: "plugin", module = %target, path, "{message}")
            }
            ffi::level::INFO => {
                tracing::info!(target: "plugin", module = %target, path, "{message}")
            }
            ffi::level::DEBUG => {
                tracing::debug!(target: "plugin", module = %target, path, "{message}")
            }
            _ => tracing::trace!(target: "plugin", module = %target, path, "{message}"),
        }
    });
}

/// The plugin's `restart_worker()`: hands the request to the worker's event loop, which asks the
/// master for a replacement. Called from any plugin thread; never blocks, never unwinds.
pub(super) extern "C" fn plugin_restart_worker(reason: RawStr) {
    let _ = catch_unwind(|| {
        // SAFETY: the plugin passes a view valid for the duration of this call.
        let reason = String::from_utf8_lossy(unsafe { reason.as_bytes() });
        super::recycle::plugin_asked_restart(&reason);
    });
}

/// Where this worker counts handler panics: its cell's counters, once the worker has one.
static PANICS: std::sync::OnceLock<&'static crate::counters::Counters> = std::sync::OnceLock::new();

/// Counts handler panics in `counters` from now on (this worker's cell).
pub fn count_panics_in(counters: &'static crate::counters::Counters) {
    let _ = PANICS.set(counters);
}

/// A handler panic caught at the plugin boundary: by the plugin's shim (ABI 1.5
/// `HostContext::panicked`), or by the host around a plugin future. Any thread; never unwinds.
pub(super) extern "C" fn plugin_panicked() {
    if let Some(c) = PANICS.get() {
        c.panicked();
    }
}

/// The functions behind a request's cancellation token (ABI 1.4): a token is a pool job's
/// [`Cancel`], as `Arc::as_ptr` gives it; the plugin holds references with `clone` and `drop`.
pub(super) static CANCEL_VTABLE: CancelVTable = CancelVTable {
    is_cancelled: cancel_is_cancelled,
    wait: cancel_wait,
    clone: cancel_clone,
    drop: cancel_drop,
};

/// The [`Cancel`] behind a token.
///
/// # Safety
/// `token` is what [`LoadedPlugin::handle`] passed: `Arc::as_ptr` of a [`Cancel`] that the call,
/// or a reference the plugin took with `clone`, keeps alive while `'a` lasts.
unsafe fn token<'a>(token: *const c_void) -> &'a Cancel {
    // SAFETY: see above.
    unsafe { &*token.cast::<Cancel>() }
}

extern "C" fn cancel_is_cancelled(t: *const c_void) -> bool {
    // SAFETY: the plugin passes only tokens it holds (the ABI contract of `CancelVTable`).
    unsafe { token(t) }.is_cancelled()
}

extern "C" fn cancel_wait(t: *const c_void, timeout_ns: u64) -> bool {
    // SAFETY: as in `cancel_is_cancelled`. `wait` cannot panic (a poisoned lock is taken over).
    unsafe { token(t) }.wait(Duration::from_nanos(timeout_ns))
}

extern "C" fn cancel_clone(t: *const c_void) {
    // SAFETY: `t` came from `Arc::as_ptr` and its Arc is alive (see `token`).
    unsafe { Arc::increment_strong_count(t.cast::<Cancel>()) }
}

extern "C" fn cancel_drop(t: *const c_void) {
    // SAFETY: gives back one reference taken with `cancel_clone`.
    unsafe { Arc::decrement_strong_count(t.cast::<Cancel>()) }
}
