//! Loads a plugin snapshot into this worker: `dlopen` with `RTLD_NOW`, the header checks, the
//! `on_worker_start` hook, and the per-request calls across the ABI, with the functions the
//! plugin calls back to read a blocking request's cancellation (a pool job's `Cancel`) and to
//! report a handler panic its shim caught (counted in this worker's cell, with those the host
//! catches around a plugin future, for the master's canary analysis).
//!
//! The only module in `host` that calls plugin code, and (with `fd.rs`) the only one with
//! `unsafe`. It checks the exported header field by field (magic first, then ABI major and minor,
//! struct sizes, `plugin-api` version) before it touches the vtable, and refuses a mismatch with
//! expected vs. found. A library is never `dlclose`d: the worker exits instead, so plugin statics,
//! thread-locals and response buffers the host still holds stay valid for the life of the process.
//! It does not decide *which* file to load (the master does) and does no networking.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use plugin_api::ffi::{
    self, CancelVTable, ErrorBuf, HostContext, PluginHeader, RawAsyncRequest, RawAsyncResponse,
    RawBody, RawHandleRequest, RawHeader, RawRequest, RawResponse, RawStr, RawUpgrade, VTable,
};
use std::sync::Arc;
use std::time::Duration;

use super::pool::Cancel;

use super::abi_io::{PluginStream, ResponseBody};

use crate::protocol::PluginInfo;

/// A plugin file that could not be loaded or started.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {kind}")]
pub struct LoadPluginError {
    pub path: PathBuf,
    #[source]
    pub kind: LoadError,
}

/// Why a plugin could not be loaded or started; messages say expected vs. found.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load shared library: {message}")]
    Open { message: String },
    #[error("not a plugin: no `host_plugin_entry_v1` symbol ({message})")]
    NoEntry { message: String },
    #[error("not a plugin: the entry point returned no header")]
    NullHeader,
    #[error("not a plugin: bad header magic {found:#018x} (expected {expected:#018x})")]
    Magic { expected: u64, found: u64 },
    #[error(
        "incompatible plugin ABI: expected major {expected}, found {found_major}.{found_minor}"
    )]
    AbiMajor {
        expected: u32,
        found_major: u32,
        found_minor: u32,
    },
    #[error(
        "plugin needs ABI {expected_major}.{found} but this host supports up to {expected_major}.{expected}"
    )]
    AbiMinor {
        expected_major: u32,
        expected: u32,
        found: u32,
    },
    #[error("plugin {what} is {found} bytes, expected at least {expected}")]
    Size {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("incompatible plugin-api version: expected {expected}, found {found}")]
    ApiVersion { expected: String, found: String },
    #[error("plugin header field `{field}` is not valid UTF-8")]
    Utf8 { field: &'static str },
    #[error("{name} {version}: on_worker_start failed: {reason}")]
    StartFailed {
        name: String,
        version: String,
        reason: String,
    },
}

/// The plugin's hooks, copied out of its vtable (whose size depends on its ABI minor).
struct Hooks {
    on_worker_start:
        unsafe extern "C" fn(*const HostContext, *mut *mut c_void, *mut ErrorBuf) -> bool,
    handle: unsafe extern "C" fn(*const c_void, *const RawRequest, *mut RawResponse),
    free_response: unsafe extern "C" fn(*mut c_void),
    on_worker_stop: unsafe extern "C" fn(*mut c_void),
    /// `None` for an ABI 1.0 plugin: every call may block.
    may_block: Option<unsafe extern "C" fn(*const c_void, RawStr, RawStr) -> bool>,
    /// ABI 1.3: `None` for older plugins (no async handlers, no drain signal).
    async_hooks: Option<AsyncHooks>,
}

struct AsyncHooks {
    dispatch: unsafe extern "C" fn(*const c_void, RawStr, RawStr) -> u8,
    serve: unsafe extern "C" fn(
        *const c_void,
        *const RawAsyncRequest,
    ) -> async_ffi::FfiFuture<RawAsyncResponse>,
    on_drain: unsafe extern "C" fn(*const c_void),
}

/// How a request runs (the plugin's `dispatch`, or `may_block` for plugins before ABI 1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    Inline,
    Blocking,
    Async,
}

/// A loaded, started plugin: its hooks and the per-worker state `on_worker_start` built.
pub struct LoadedPlugin {
    hooks: Hooks,
    state: *mut c_void,
    pub info: PluginInfo,
    /// CLOCK_MONOTONIC when `dlopen` and the header checks were done (before `on_worker_start`).
    pub loaded_at_ns: u64,
}

// SAFETY: `state` is a `Box<P>` where `P: Plugin: Send + Sync` (enforced by `export_plugin!`),
// and the vtable functions are documented as callable from any thread at once.
unsafe impl Send for LoadedPlugin {}
// SAFETY: as above; `handle` takes `&self` and the plugin's `handle` takes `&P`.
unsafe impl Sync for LoadedPlugin {}

/// Two `plugin-api` versions are compatible when they agree on the first non-zero component
/// (semver): 1.2.x works with 1.5.y, 0.1.x with 0.1.y, but not 0.1.x with 0.2.y.
fn api_compatible(host: &str, plugin: &str) -> bool {
    let parse = |s: &str| -> Option<(u64, u64)> {
        let mut it = s.split(['.', '-', '+']);
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parse(host), parse(plugin)) {
        (Some((hm, hn)), Some((pm, pn))) => hm == pm && (hm != 0 || hn == pn),
        _ => false,
    }
}

fn api_requirement(host: &str) -> String {
    let mut it = host.split('.');
    match (it.next(), it.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}.x"),
        (Some(major), _) => format!("{major}.x"),
        _ => host.to_string(),
    }
}

/// Reads a header string; the plugin guarantees header strings are `'static`.
fn header_str(raw: RawStr, field: &'static str) -> Result<String, LoadError> {
    // SAFETY: header strings point to the plugin's `'static` data, and the library is never unloaded.
    let bytes = unsafe { raw.as_bytes() };
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| LoadError::Utf8 { field })
}

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
extern "C" fn plugin_log(level: u8, target: RawStr, message: RawStr) {
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
extern "C" fn plugin_restart_worker(reason: RawStr) {
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
extern "C" fn plugin_panicked() {
    if let Some(c) = PANICS.get() {
        c.panicked();
    }
}

/// The functions behind a request's cancellation token (ABI 1.4): a token is a pool job's
/// [`Cancel`], as `Arc::as_ptr` gives it; the plugin holds references with `clone` and `drop`.
static CANCEL_VTABLE: CancelVTable = CancelVTable {
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

/// Where a worker is: passed to the plugin's `on_worker_start`.
pub struct Placement {
    pub slot: u32,
    pub generation: u64,
    pub sha256: String,
    /// The generation's `[plugin_config]` as JSON text, for `HostContext::config`.
    pub config: String,
    /// The config file's directory, for `HostContext::config_dir`.
    pub config_dir: String,
    /// Whether this is `host check`'s throwaway worker, for `HostContext::check`.
    pub check: bool,
}

/// Loads the plugin at `path`, checks it, and runs its `on_worker_start`.
pub fn load(path: &Path, at: &Placement) -> Result<LoadedPlugin, LoadPluginError> {
    load_checked(path, at).map_err(|kind| LoadPluginError {
        path: path.to_path_buf(),
        kind,
    })
}

fn load_checked(path: &Path, at: &Placement) -> Result<LoadedPlugin, LoadError> {
    // SAFETY: loading a library runs its initializers. The master hands us a private snapshot of
    // a file the operator configured as this host's plugin, and `RTLD_NOW` resolves every symbol
    // up front so a missing one fails here rather than mid-request. `RTLD_LOCAL` keeps its
    // symbols out of the global namespace.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
        LoadError::Open {
            message: e.to_string(),
        }
    })?;
    // SAFETY: the symbol, if present, is the `export_plugin!` entry point whose type is `EntryFn`;
    // a library that exports the name with another type is outside the contract we document.
    let entry: ffi::EntryFn = unsafe { lib.get::<ffi::EntryFn>(ffi::ENTRY_SYMBOL) }
        .map(|s| *s)
        .map_err(|e| LoadError::NoEntry {
            message: e.to_string(),
        })?;
    // Never dlclose: the worker exits instead (see the module doc).
    std::mem::forget(lib);

    // SAFETY: `entry` takes no arguments and returns a pointer to a `'static` header.
    let header_ptr = unsafe { entry() };
    if header_ptr.is_null() {
        return Err(LoadError::NullHeader);
    }
    // SAFETY: non-null and `'static`; the first three fields (magic, ABI major, minor) sit at the
    // same offsets in every ABI version, so reading them is valid before we know the version.
    let (magic, abi_major, abi_minor) = unsafe {
        let h = header_ptr;
        (
            std::ptr::addr_of!((*h).magic).read(),
            std::ptr::addr_of!((*h).abi_major).read(),
            std::ptr::addr_of!((*h).abi_minor).read(),
        )
    };
    if magic != ffi::MAGIC {
        return Err(LoadError::Magic {
            expected: ffi::MAGIC,
            found: magic,
        });
    }
    if abi_major != ffi::ABI_MAJOR {
        return Err(LoadError::AbiMajor {
            expected: ffi::ABI_MAJOR,
            found_major: abi_major,
            found_minor: abi_minor,
        });
    }
    if abi_minor > ffi::ABI_MINOR {
        return Err(LoadError::AbiMinor {
            expected_major: ffi::ABI_MAJOR,
            expected: ffi::ABI_MINOR,
            found: abi_minor,
        });
    }
    // SAFETY: same major, so `header_size` is at its documented offset.
    let header_size = unsafe { std::ptr::addr_of!((*header_ptr).header_size).read() } as usize;
    if header_size < size_of::<PluginHeader>() {
        return Err(LoadError::Size {
            what: "header",
            expected: size_of::<PluginHeader>(),
            found: header_size,
        });
    }
    // SAFETY: the header is at least as large as ours, so every field we read exists.
    let header: &'static PluginHeader = unsafe { &*header_ptr };
    let vtable_size = header.vtable_size as usize;
    if vtable_size < ffi::VTABLE_1_0_SIZE || header.vtable.is_null() {
        return Err(LoadError::Size {
            what: "vtable",
            expected: ffi::VTABLE_1_0_SIZE,
            found: vtable_size,
        });
    }
    let api_version = header_str(header.api_version, "api_version")?;
    if !api_compatible(ffi::API_VERSION, &api_version) {
        return Err(LoadError::ApiVersion {
            expected: api_requirement(ffi::API_VERSION),
            found: api_version,
        });
    }
    let name = header_str(header.name, "name")?;
    let version = header_str(header.version, "version")?;
    let vt = header.vtable;
    // SAFETY: `vt` is non-null, `'static`, and at least the ABI 1.0 vtable's size (checked), so
    // the four 1.0 fields exist; `may_block` (1.1) and the 1.3 hooks are read only when
    // `vtable_size` covers them.
    let hooks = unsafe {
        Hooks {
            on_worker_start: std::ptr::addr_of!((*vt).on_worker_start).read(),
            handle: std::ptr::addr_of!((*vt).handle).read(),
            free_response: std::ptr::addr_of!((*vt).free_response).read(),
            on_worker_stop: std::ptr::addr_of!((*vt).on_worker_stop).read(),
            may_block: (vtable_size >= ffi::VTABLE_1_1_SIZE)
                .then(|| std::ptr::addr_of!((*vt).may_block).read()),
            async_hooks: (abi_minor >= 3 && vtable_size >= size_of::<VTable>()).then(|| {
                AsyncHooks {
                    dispatch: std::ptr::addr_of!((*vt).dispatch).read(),
                    serve: std::ptr::addr_of!((*vt).serve).read(),
                    on_drain: std::ptr::addr_of!((*vt).on_drain).read(),
                }
            }),
        }
    };

    let loaded_at_ns = super::clock::monotonic_ns();
    let ctx = HostContext {
        size: size_of::<HostContext>() as u32,
        slot: at.slot,
        generation: at.generation,
        pid: std::process::id(),
        max_level: crate::logging::max_level_code(),
        log: plugin_log,
        restart_worker: plugin_restart_worker,
        // A view of `at.config`, which outlives the `on_worker_start` call (the plugin copies it).
        config: RawStr::new(at.config.as_bytes()),
        cancel: &CANCEL_VTABLE,
        panicked: plugin_panicked,
        // A view of `at.config_dir`, which outlives the call too.
        config_dir: RawStr::new(at.config_dir.as_bytes()),
        check: at.check,
        metrics: &super::metrics_abi::METRICS_VTABLE,
    };
    let mut err_storage = vec![0u8; 4096];
    let mut err = ErrorBuf {
        ptr: err_storage.as_mut_ptr(),
        cap: err_storage.len(),
        len: 0,
    };
    let mut state: *mut c_void = std::ptr::null_mut();
    // SAFETY: `ctx`, `state` and `err` are valid for the call; the shim catches panics.
    let ok = unsafe { (hooks.on_worker_start)(&ctx, &mut state, &mut err) };
    if !ok {
        let reason =
            String::from_utf8_lossy(&err_storage[..err.len.min(err_storage.len())]).into_owned();
        return Err(LoadError::StartFailed {
            name,
            version,
            reason,
        });
    }
    Ok(LoadedPlugin {
        hooks,
        state,
        info: PluginInfo {
            name,
            version,
            api_version,
            sha256: at.sha256.clone(),
        },
        loaded_at_ns,
    })
}

/// Calls `f` with a borrowed [`RawRequest`] view of `parts` and `body`.
fn with_raw_head<T>(
    parts: &http::request::Parts,
    body: &Bytes,
    f: impl FnOnce(&RawRequest) -> T,
) -> T {
    // Views into `parts`, on the stack for up to 16 headers.
    let headers: smallvec::SmallVec<[RawHeader; 16]> = parts
        .headers
        .iter()
        .map(|(n, v)| RawHeader {
            name: RawStr::new(n.as_str().as_bytes()),
            value: RawStr::new(v.as_bytes()),
        })
        .collect();
    let uri_owned;
    let uri: &str = match (parts.uri.scheme(), parts.uri.path_and_query()) {
        (None, Some(pq)) => pq.as_str(),
        _ => {
            uri_owned = parts.uri.to_string();
            &uri_owned
        }
    };
    let req = RawRequest {
        method: RawStr::new(parts.method.as_str().as_bytes()),
        uri: RawStr::new(uri.as_bytes()),
        version: version_code(parts.version),
        headers: headers.as_ptr(),
        headers_len: headers.len(),
        body: RawStr::new(body),
    };
    f(&req)
}

/// Polls a plugin future, turning a panic that escaped it (the plugin-side shim already catches
/// the handler's) into `None` instead of unwinding through the worker.
struct NoUnwind<F>(F);

impl<F: Future + Unpin> Future for NoUnwind<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(&mut self.0).poll(cx)
        })) {
            Ok(p) => p.map(Some),
            Err(_) => std::task::Poll::Ready(None),
        }
    }
}

/// One call of the plugin's async `serve`: resolves to the host's response (a `500` if the
/// plugin's future panicked across the ABI). `Unpin`, so it can be polled where it was made and
/// moved afterwards; it owns everything it needs, and the plugin state stays alive until the
/// worker exits, after every request is done.
pub struct ServeCall {
    fut: NoUnwind<async_ffi::FfiFuture<RawAsyncResponse>>,
    free: unsafe extern "C" fn(*mut c_void),
}

impl Future for ServeCall {
    type Output = http::Response<ResponseBody>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let free = self.free;
        std::pin::Pin::new(&mut self.fut)
            .poll(cx)
            .map(|raw| match raw {
                // SAFETY: `raw` is what the plugin's `serve` future resolved to, now ours.
                Some(raw) => unsafe { response_from(raw.head, raw.stream, free) },
                None => {
                    plugin_panicked();
                    tracing::error!("the plugin's future panicked across the ABI; answered 500");
                    let mut resp = http::Response::new(ResponseBody::full(Bytes::from_static(
                        b"internal server error\n",
                    )));
                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    resp
                }
            })
    }
}

/// Builds the host's response from the plugin's: headers copied into host memory, the body
/// lent without a copy (whole) or streamed (`stream`), freed on the plugin's side when done.
///
/// # Safety
/// `raw` and `stream` must come from the plugin whose `free_response` is `free`, owned by the
/// caller.
unsafe fn response_from(
    raw: RawResponse,
    stream: RawBody,
    free: unsafe extern "C" fn(*mut c_void),
) -> http::Response<ResponseBody> {
    // From here on, the plugin's allocation is owned by `owned` and freed when it drops.
    let owned = PluginBody {
        body: raw.body,
        owner: raw.owner,
        free,
    };
    let status = StatusCode::from_u16(raw.status).unwrap_or_else(|_| {
        tracing::error!(
            status = raw.status,
            "plugin returned an invalid status code; answering 500"
        );
        StatusCode::INTERNAL_SERVER_ERROR
    });
    let raw_headers: &[RawHeader] = if raw.headers_len == 0 || raw.headers.is_null() {
        &[]
    } else {
        // SAFETY: `headers` points to `headers_len` entries, valid until `owned` drops.
        unsafe { std::slice::from_raw_parts(raw.headers, raw.headers_len) }
    };
    let mut map = HeaderMap::with_capacity(raw_headers.len());
    for h in raw_headers {
        // SAFETY: valid until `owned` drops; both are copied into host memory here.
        let (n, v) = unsafe { (h.name.as_bytes(), h.value.as_bytes()) };
        match (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
            (Ok(n), Ok(v)) => {
                map.append(n, v);
            }
            _ => {
                tracing::warn!(name = %String::from_utf8_lossy(n), "plugin returned an invalid header; dropped")
            }
        }
    }
    let body = if stream.is_none() {
        ResponseBody::full(Bytes::from_owner(owned))
    } else {
        drop(owned);
        // SAFETY: the plugin's body object, now ours (the caller's contract).
        ResponseBody::Stream(unsafe { PluginStream::new(stream) })
    };
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = map;
    resp
}

fn version_code(v: Version) -> u32 {
    match v {
        Version::HTTP_09 => 9,
        Version::HTTP_10 => 10,
        Version::HTTP_2 => 20,
        Version::HTTP_3 => 30,
        _ => 11,
    }
}

/// A response body owned by the plugin, handed to hyper without a copy and given back to the
/// plugin to free when hyper drops it.
struct PluginBody {
    body: RawStr,
    owner: *mut c_void,
    free: unsafe extern "C" fn(*mut c_void),
}

// SAFETY: the plugin's response memory is plain heap memory not tied to the thread that made it,
// and `free_response` may be called from any thread (the ABI's ownership rules).
unsafe impl Send for PluginBody {}

impl AsRef<[u8]> for PluginBody {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: valid until `free_response(owner)`, which only `drop` calls.
        unsafe { self.body.as_bytes() }
    }
}

impl Drop for PluginBody {
    fn drop(&mut self) {
        // SAFETY: `owner` came from this plugin's `handle` and is freed exactly once, here.
        unsafe { (self.free)(self.owner) }
    }
}

impl LoadedPlugin {
    /// How a request with this method and path runs.
    pub fn dispatch(&self, method: &http::Method, path: &str) -> Dispatch {
        let (m, p) = (
            RawStr::new(method.as_str().as_bytes()),
            RawStr::new(path.as_bytes()),
        );
        match (&self.hooks.async_hooks, self.hooks.may_block) {
            // SAFETY: `state` is live; the strings are borrowed for the call; the shim catches panics.
            (Some(h), _) => match unsafe { (h.dispatch)(self.state, m, p) } {
                ffi::dispatch::INLINE => Dispatch::Inline,
                ffi::dispatch::ASYNC => Dispatch::Async,
                _ => Dispatch::Blocking,
            },
            // SAFETY: as above.
            (None, Some(may_block)) => match unsafe { may_block(self.state, m, p) } {
                false => Dispatch::Inline,
                true => Dispatch::Blocking,
            },
            (None, None) => Dispatch::Blocking,
        }
    }

    /// Tells the plugin its worker drains (ABI 1.3; older plugins are not told).
    pub fn on_drain(&self) {
        if let Some(h) = &self.hooks.async_hooks {
            // SAFETY: `state` is live; the shim catches panics.
            unsafe { (h.on_drain)(self.state) }
        }
    }

    /// Calls the plugin's `handle`, with the request's cancellation when it has one (a pool
    /// job's). Blocks for as long as the handler does.
    pub fn handle(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        cancel: Option<&Arc<Cancel>>,
    ) -> http::Response<ResponseBody> {
        let _serving = serving(parts.uri.path());
        with_raw_head(parts, body, |head| {
            let ext = RawHandleRequest {
                // SAFETY: a bitwise copy of views that outlive the call.
                head: unsafe { std::ptr::read(head) },
                cancel: cancel.map_or(std::ptr::null(), |c| Arc::as_ptr(c).cast()),
            };
            let mut raw = RawResponse::EMPTY;
            let req = (&raw const ext).cast::<RawRequest>();
            // SAFETY: `state` is live (only `stop` frees it, taking `self` by value), `req` and
            // everything it points to outlive the call (the token's `Arc` too: `cancel` is
            // borrowed for it), and `raw` is a valid out-pointer. A plugin older than 1.4 reads
            // the pointer as its `RawRequest`, the first field.
            unsafe { (self.hooks.handle)(self.state, req, &mut raw) };
            // SAFETY: `raw` was just written by the plugin's `handle`.
            unsafe { self.response(raw, RawBody::NONE) }
        })
    }

    /// Starts the plugin's async `serve` (ABI 1.3 plugins; [`Dispatch::Async`] is never returned
    /// for others). `body` and `upgrade` move to the plugin. The future owns everything it needs:
    /// the plugin state stays alive until the worker exits, after every request is done.
    pub fn serve(
        &self,
        parts: &http::request::Parts,
        body: RawBody,
        upgrade: RawUpgrade,
    ) -> ServeCall {
        let hooks = self
            .hooks
            .async_hooks
            .as_ref()
            .expect("dispatch said async");
        let serve = hooks.serve;
        let state = self.state;
        let _serving = serving(parts.uri.path());
        let fut = with_raw_head(parts, &Bytes::new(), move |head| {
            let req = RawAsyncRequest {
                // SAFETY: a bitwise copy of views that outlive the call.
                head: unsafe { std::ptr::read(head) },
                body,
                upgrade,
            };
            // SAFETY: `state` is live; `req`'s views outlive the call, and its objects move to
            // the plugin; the shim catches panics.
            unsafe { serve(state, &req) }
        });
        ServeCall {
            fut: NoUnwind(fut),
            free: self.hooks.free_response,
        }
    }

    /// # Safety
    /// `raw` and `stream` must come from this plugin and be owned by the caller.
    unsafe fn response(&self, raw: RawResponse, stream: RawBody) -> http::Response<ResponseBody> {
        // SAFETY: forwarded.
        unsafe { response_from(raw, stream, self.hooks.free_response) }
    }

    /// Runs the plugin's `on_worker_stop` and frees its state. Call only once no `handle` runs.
    pub fn stop(self) {
        // SAFETY: `state` came from `on_worker_start` and, as `self` is consumed, no other call
        // can use it afterwards; the shim catches panics.
        unsafe { (self.hooks.on_worker_stop)(self.state) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_api_compatibility_follows_semver() {
        assert!(api_compatible("0.1.0", "0.1.7"));
        assert!(!api_compatible("0.1.0", "0.2.0"));
        assert!(api_compatible("1.2.0", "1.9.1"));
        assert!(!api_compatible("1.2.0", "2.0.0"));
        assert!(!api_compatible("1.2.0", "garbage"));
        assert_eq!(api_requirement("0.1.3"), "0.1.x");
        assert_eq!(api_requirement("2.4.0"), "2.x");
    }
}
