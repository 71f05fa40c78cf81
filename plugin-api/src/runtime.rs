//! The plugin's own tokio runtime, and the worker's drain signal as the plugin sees it.
//!
//! The plugin links its own copy of tokio, whose thread-locals and statics are not the host's:
//! a host runtime handle means nothing here ("no reactor running"). So every plugin builds one
//! runtime of its own in `on_worker_start`, whose driver (timers, sockets) runs on a thread of
//! its own, and the shims enter its context around every call into plugin code. The host polls
//! the plugin's futures on its I/O thread with its own waker: a future that is ready at once
//! costs no thread hand-off, one that waits parks no thread. This module owns that runtime and
//! the drain flag; it never runs plugin code itself, except the future a plugin hands to
//! `WorkerContext::block_on` in its start hook.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::runtime::{EnterGuard, Handle, Runtime};
use tokio::sync::Notify;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static HANDLE: OnceLock<Handle> = OnceLock::new();
static DRAINING: AtomicBool = AtomicBool::new(false);
static DRAIN: Notify = Notify::const_new();

/// Builds the runtime (once per process): one worker thread that drives timers and sockets and
/// runs tasks the plugin spawns, and tokio's blocking pool on demand.
pub(crate) fn start() -> std::io::Result<()> {
    if RUNTIME.get().is_some() {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("plugin-rt")
        .enable_all()
        .build()?;
    let _ = HANDLE.set(rt.handle().clone());
    let _ = RUNTIME.set(rt);
    Ok(())
}

thread_local! {
    /// This thread stays inside the plugin runtime's context for good (see [`enter_for_good`]).
    static ENTERED_FOR_GOOD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Enters the plugin runtime's context for as long as the guard lives (nothing before `start`,
/// and nothing on a thread that is inside it for good).
#[inline]
pub(crate) fn enter() -> Option<EnterGuard<'static>> {
    if ENTERED_FOR_GOOD.with(std::cell::Cell::get) {
        return None;
    }
    HANDLE.get().map(Handle::enter)
}

/// Puts the calling thread inside the plugin runtime's context until it exits. Called in
/// `on_worker_start`, which the host runs on its I/O thread: every later call from that thread
/// (the inline handlers, and every poll of an async handler's future) is then in context without
/// entering and leaving each time. Guards entered later on this thread nest inside this one,
/// so tokio's drop-order check holds.
pub(crate) fn enter_for_good() {
    if ENTERED_FOR_GOOD.with(std::cell::Cell::get) {
        return;
    }
    if let Some(handle) = HANDLE.get() {
        std::mem::forget(handle.enter());
        ENTERED_FOR_GOOD.with(|e| e.set(true));
    }
}

/// Runs `future` to completion on this thread, in the plugin runtime's context, while the
/// runtime's own thread drives its timers and sockets (see `WorkerContext::block_on`).
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match HANDLE.get() {
        Some(handle) => handle.block_on(future),
        // Only before `on_worker_start` (which starts the runtime) could there be none.
        None => panic!("WorkerContext::block_on called before the plugin's runtime started"),
    }
}

/// The host said the worker drains: wake everyone waiting in [`draining`].
pub(crate) fn begin_drain() {
    DRAINING.store(true, Ordering::SeqCst);
    DRAIN.notify_waiters();
}

pub(crate) fn is_draining() -> bool {
    DRAINING.load(Ordering::SeqCst)
}

pub(crate) async fn draining() {
    loop {
        let notified = DRAIN.notified();
        tokio::pin!(notified);
        // Registered before the check, so a drain between the two is not missed.
        notified.as_mut().enable();
        if is_draining() {
            return;
        }
        notified.await;
    }
}
