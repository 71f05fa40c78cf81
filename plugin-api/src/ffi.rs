//! The C ABI between the host and a plugin: `#[repr(C)]` types, the ABI version and the
//! shape of the one exported symbol.
//!
//! This module owns the *layout*. It must never change layout within an ABI major version: new
//! fields go at the end (bumping [`ABI_MINOR`]) and the host reads `header_size` / `vtable_size`
//! before it touches anything past the fields it knows. Its submodules own the one safe Rust
//! handle of each object that crosses, which the host and the plugin's shims both use, so each
//! ownership rule below is written once: chunks ([`chunk`]), bodies ([`body`]), and a head's
//! header views and version code ([`head`]). The `unsafe` of the crossing lives in those handles
//! and in the shims (`export`, `serve`); the handles never call the other side except through an
//! object it made.
//!
//! Ownership rules, which both sides rely on:
//! - [`RawRequest`] and [`HostContext`] are borrowed from the host for the duration of one call.
//!   So is a [`RawHandleRequest`]; the cancellation token in it is the host's, kept alive past
//!   the call only by references the plugin takes with [`CancelVTable::clone`] (and gives back
//!   with [`CancelVTable::drop`]).
//! - A [`RawResponse`] is allocated by the plugin; everything it points to stays valid until the
//!   host passes its `owner` to [`VTable::free_response`]. Memory is freed on the side that
//!   allocated it.
//! - A [`RawChunk`] and a [`RawObject`] (a body, an upgrade, a connection) move: whoever holds
//!   one owns it, and frees it exactly once through the function it carries, which lives on the
//!   side that made it (so its own allocator frees it). [`chunk::lend`] and [`body::export`]
//!   make them; [`chunk::Chunk`] and [`body::ForeignBody`] own the other side's and free them
//!   when dropped.
//! - Every function in [`VTable`] catches panics: nothing unwinds across `extern "C"`.

use std::ffi::c_void;

pub mod body;
pub mod chunk;
pub mod head;

/// `b"HOSTPLUG"` as a little-endian `u64`: the first thing the host checks.
pub const MAGIC: u64 = u64::from_le_bytes(*b"HOSTPLUG");
/// Incompatible layout changes bump the major; the host refuses any other major.
pub const ABI_MAJOR: u32 = 1;
/// Compatible additions bump the minor; the host accepts plugins with a minor up to its own.
/// 1.1 added [`VTable::may_block`]; 1.2 added [`HostContext::restart_worker`]; 1.3 added
/// [`HostContext::config`], [`VTable::dispatch`], [`VTable::serve`] (async handlers, streaming
/// bodies, upgrades) and [`VTable::on_drain`]; 1.4 added [`HostContext::cancel`] and the
/// [`RawHandleRequest`] that `handle` receives from such a host (a request's cancellation); 1.5
/// added [`HostContext::panicked`], [`HostContext::config_dir`], [`HostContext::check`] and
/// [`HostContext::metrics`] (plugin metrics, served by the master's `/metrics`); 1.6 added
/// [`HostContext::header_names`] and the `name_codes` of [`RawHandleRequest`] and
/// [`RawAsyncRequest`] (a request's header names, known to the plugin without parsing); 1.7
/// added [`VTable::on_gateway_event`] and [`HostContext::gateway`] (the business side of a
/// gateway group: client events in, sends and presence out).
pub const ABI_MINOR: u32 = 7;
/// The `plugin-api` crate version both sides were built with.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Name of the one exported symbol, NUL-terminated for `dlsym`. The `v1` is [`ABI_MAJOR`].
pub const ENTRY_SYMBOL: &[u8] = b"host_plugin_entry_v1\0";

/// Signature of the exported entry point: returns a pointer to a `'static` [`PluginHeader`].
pub type EntryFn = unsafe extern "C" fn() -> *const PluginHeader;

/// A borrowed byte string (UTF-8 where the field says so). Never owns memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl RawStr {
    pub const EMPTY: RawStr = RawStr {
        ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(),
        len: 0,
    };

    /// A view of `s`; valid as long as `s` is.
    pub const fn new(s: &[u8]) -> RawStr {
        RawStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// `ptr` must point to `len` readable bytes that outlive `'a` (the ownership rules above).
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable for `'a`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// One HTTP header field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawHeader {
    pub name: RawStr,
    pub value: RawStr,
}

/// What the exported symbol points to. Read field by field, magic first.
#[repr(C)]
pub struct PluginHeader {
    pub magic: u64,
    pub abi_major: u32,
    pub abi_minor: u32,
    /// `size_of::<PluginHeader>()` as the plugin was built.
    pub header_size: u32,
    /// `size_of::<VTable>()` as the plugin was built.
    pub vtable_size: u32,
    /// The `plugin-api` version the plugin was built against (UTF-8).
    pub api_version: RawStr,
    /// The plugin crate's name and version (UTF-8).
    pub name: RawStr,
    pub version: RawStr,
    pub vtable: *const VTable,
}

/// Log levels passed to [`HostContext::log`], matching `tracing::Level` order.
pub mod level {
    pub const ERROR: u8 = 1;
    pub const WARN: u8 = 2;
    pub const INFO: u8 = 3;
    pub const DEBUG: u8 = 4;
    pub const TRACE: u8 = 5;
}

/// What the host gives the plugin in `on_worker_start`. Borrowed for that call; the function
/// pointers in it stay valid for the life of the process. A plugin reads a field past `log` only
/// when `size` covers it (a host built for an older minor passes a shorter context).
#[repr(C)]
pub struct HostContext {
    /// `size_of::<HostContext>()` as the host was built.
    pub size: u32,
    /// The worker's slot (0-based) and the generation it belongs to.
    pub slot: u32,
    pub generation: u64,
    pub pid: u32,
    /// The most verbose level the host will print (see [`level`]); lower levels are not sent.
    pub max_level: u8,
    /// Forwards one log record to the host's logger: level, target, message (UTF-8).
    pub log: extern "C" fn(level: u8, target: RawStr, message: RawStr),
    /// ABI 1.2: asks the master to replace this worker, new before old (the reason is UTF-8, for
    /// the log). Callable from any thread, at any time after `on_worker_start` began; it never
    /// blocks, never unwinds, and asking again is harmless. The worker keeps serving until its
    /// replacement is ready.
    pub restart_worker: extern "C" fn(reason: RawStr),
    /// ABI 1.3: the `[plugin_config]` table of the host's configuration file, as JSON text
    /// (UTF-8); `{}` when the file has none. Borrowed for the `on_worker_start` call.
    pub config: RawStr,
    /// ABI 1.4: the functions behind a request's cancellation token
    /// ([`RawHandleRequest::cancel`]); `'static`. A host whose context covers this field passes
    /// `handle` a [`RawHandleRequest`].
    pub cancel: *const CancelVTable,
    /// ABI 1.5: tells the host that a handler panicked and the plugin's shim answered `500`
    /// (the host counts it for the canary analysis). Callable from any thread; never blocks,
    /// never unwinds.
    pub panicked: extern "C" fn(),
    /// ABI 1.5: the directory of the host's configuration file (absolute, UTF-8), against which
    /// the host resolves its own relative paths. Borrowed for the `on_worker_start` call.
    pub config_dir: RawStr,
    /// ABI 1.5: `true` when the plugin runs under `host check` (a throwaway worker that serves
    /// nothing), `false` in a serving worker.
    pub check: bool,
    /// ABI 1.5: the functions that register and update the plugin's metrics; `'static`.
    pub metrics: *const MetricsVTable,
    /// ABI 1.6: the header names the host codes, `header_names_len` views: a request's
    /// `name_codes[i]`, when not 0, says its header `i` is named `header_names[code - 1]` (see
    /// [`head`]). Borrowed for the `on_worker_start` call; the plugin copies what it keeps.
    pub header_names: *const RawStr,
    pub header_names_len: usize,
    /// ABI 1.7: the functions behind the plugin's `Gateway` handle; `'static`, callable from
    /// any thread. Null from a worker whose group has no gateway links.
    pub gateway: *const GatewayVTable,
}

/// Results of [`GatewayVTable::command`] and the `status` of a [`RawGatewayAnswer`].
pub mod gateway_status {
    /// Accepted (a command is queued on its links; an answer carries its JSON).
    pub const OK: u8 = 0;
    /// The worker has no gateway link.
    pub const NO_GATEWAY: u8 = 1;
    /// Too many commands already wait on a link.
    pub const FULL: u8 = 2;
    /// The JSON was not a command or question the host knows.
    pub const BAD: u8 = 3;
    /// No gateway answered in time.
    pub const TIMEOUT: u8 = 4;
}

/// ABI 1.7: the host's side of the plugin's `Gateway` handle. Commands and questions are JSON
/// (the link's `BusinessToGateway` command and `Query` forms; see `plugin_api::gateway`).
/// Every function never blocks and never unwinds.
#[repr(C)]
pub struct GatewayVTable {
    /// Queues one command (a send, bind, unbind, join, leave or close) on the links that need
    /// it, in the order made; one of [`gateway_status`]. `json` is borrowed for the call.
    pub command: extern "C" fn(json: RawStr) -> u8,
    /// Asks every linked gateway one presence question and adds up the answers, waiting
    /// `timeout_ns` at most. `json` is borrowed for the call; the future (made by the host,
    /// pollable from any thread and any runtime) and its answer move to the plugin.
    pub query:
        extern "C" fn(json: RawStr, timeout_ns: u64) -> async_ffi::FfiFuture<RawGatewayAnswer>,
    /// As `command`, for a command made by the handler of the event whose
    /// [`RawGatewayEvent::token`] is `token`: the host holds it until that handler returns and
    /// sends it with the event's `Handled` (so the event's gateway applies it exactly once);
    /// once the handler returned, it leaves at once as `command`'s do.
    pub event_command: extern "C" fn(token: u64, json: RawStr) -> u8,
}

/// ABI 1.7: a presence answer, moved to the plugin: a [`gateway_status`] and, when `OK`, the
/// answer's JSON (`{"Count":n}` or `{"Members":[..]}`) in a chunk the plugin frees.
#[repr(C)]
pub struct RawGatewayAnswer {
    pub status: u8,
    pub json: RawChunk,
}

// SAFETY: the chunk is heap memory owned by the answer, freed through a function callable from
// any thread.
unsafe impl Send for RawGatewayAnswer {}

/// ABI 1.7: one client event for [`VTable::on_gateway_event`], borrowed for that call (the
/// plugin copies what it keeps).
#[repr(C)]
pub struct RawGatewayEvent {
    /// The client (its gateway's place in the worker's links in the top 16 bits).
    pub client: u64,
    /// The client's event number, from 1, in the order the client acted.
    pub seq: u64,
    /// The event was given before to a worker that left without answering: it may have run.
    pub redelivered: bool,
    /// The client's session as JSON (`null` until a handler sets one).
    pub session: RawStr,
    /// The event as JSON: `{"Connect":{"path":..,"query":..,"headers":[[name,value],..]}}`,
    /// `{"Text":".."}`, `{"Binary":".."}` (base64) or `{"Close":{"code":..,"reason":..}}`.
    pub event: RawStr,
    /// Names this event to [`GatewayVTable::event_command`] (never 0).
    pub token: u64,
}

/// ABI 1.7: what an event's handler returned, moved to the host.
#[repr(C)]
pub struct RawGatewayOutcome {
    /// Whether the handler set the session; its new JSON is then `session`.
    pub session_set: bool,
    pub session: RawChunk,
    /// For a `Connect`: the HTTP status (400 to 599) refusing it; 0: accepted.
    pub refuse: u16,
    /// The handler panicked (the shim caught it; a `Connect` is refused `500`).
    pub panicked: bool,
}

// SAFETY: as for [`RawGatewayAnswer`].
unsafe impl Send for RawGatewayOutcome {}

/// Metric kinds for [`MetricsVTable::register`].
pub mod metric_kind {
    pub const COUNTER: u8 = 1;
    pub const GAUGE: u8 = 2;
    pub const HISTOGRAM: u8 = 3;
}

/// ABI 1.5: the plugin's metrics, kept by the host in memory the master reads (so they survive
/// the worker). Every function is callable from any thread, never blocks and never unwinds; a
/// series id the host did not give is ignored.
#[repr(C)]
pub struct MetricsVTable {
    /// Registers a series (or finds the one already registered with the same kind, name and
    /// labels) and returns its id, or a negative number when refused: a bad name, label or
    /// bucket list (the host logs why), or the worker's series bound reached. `labels` are
    /// `labels_len` name/value pairs; `bounds` the `bounds_len` increasing upper bounds of a
    /// histogram's buckets (ignored for other kinds). Every view is borrowed for the call.
    pub register: extern "C" fn(
        kind: u8,
        name: RawStr,
        help: RawStr,
        labels: *const RawHeader,
        labels_len: usize,
        bounds: *const f64,
        bounds_len: usize,
    ) -> i64,
    /// Adds to a counter (or, as a signed number, to a gauge).
    pub add: extern "C" fn(id: i64, delta: i64),
    /// Sets a gauge.
    pub set: extern "C" fn(id: i64, value: i64),
    /// Records one observation in a histogram.
    pub observe: extern "C" fn(id: i64, value: f64),
}

/// The size of the ABI 1.1 context (before `restart_worker`): what an older host passes.
pub const HOST_CONTEXT_1_1_SIZE: usize = std::mem::offset_of!(HostContext, restart_worker);
/// The size of the ABI 1.2 context (before `config`).
pub const HOST_CONTEXT_1_2_SIZE: usize = std::mem::offset_of!(HostContext, config);
/// The size of the ABI 1.3 context (before `cancel`).
pub const HOST_CONTEXT_1_3_SIZE: usize = std::mem::offset_of!(HostContext, cancel);
/// The size of the ABI 1.4 context (before `panicked`).
pub const HOST_CONTEXT_1_4_SIZE: usize = std::mem::offset_of!(HostContext, panicked);
/// The size of the ABI 1.5 context (before `header_names`).
pub const HOST_CONTEXT_1_5_SIZE: usize = std::mem::offset_of!(HostContext, header_names);
/// The size of the ABI 1.6 context (before `gateway`): a plugin reads a 1.6 field only from a
/// host whose context is at least this long.
pub const HOST_CONTEXT_1_6_SIZE: usize = std::mem::offset_of!(HostContext, gateway);
/// The size of the ABI 1.7 context: the whole struct today. (A field appended later makes this
/// the `offset_of!` that field, as for the sizes above.)
pub const HOST_CONTEXT_1_7_SIZE: usize = size_of::<HostContext>();

/// ABI 1.4: what `handle` receives from a host whose [`HostContext`] covers `cancel` (the
/// pointer `handle` gets points at `head`, its first field, so older plugins read it as a plain
/// [`RawRequest`]). Borrowed for the call, like the request.
#[repr(C)]
pub struct RawHandleRequest {
    pub head: RawRequest,
    /// The request's cancellation token, for [`HostContext::cancel`]'s functions; null: the
    /// request is never cancelled (a call on the host's I/O thread). Valid for the call; a
    /// plugin that keeps it longer takes a reference with `clone` and gives it back with `drop`.
    pub cancel: *const c_void,
    /// ABI 1.6: one code per header of `head` (see [`HostContext::header_names`]), or null: no
    /// codes, every name is parsed. Sent to every plugin; read only by one whose host's context
    /// covers `header_names`.
    pub name_codes: *const u8,
}

/// ABI 1.4: a request's cancellation, made by the host: set once the client is gone (its
/// HTTP/1 connection closed, its HTTP/2 stream reset) or the host stopped waiting for the answer
/// (`graceful_timeout`). A blocking handler polls it or waits on it, and stops early. Every
/// function is callable from any thread, never unwinds, and takes a non-null token.
#[repr(C)]
pub struct CancelVTable {
    /// Whether the request is cancelled. Never blocks.
    pub is_cancelled: extern "C" fn(token: *const c_void) -> bool,
    /// Blocks until the request is cancelled or `timeout_ns` passed; whether it is cancelled.
    pub wait: extern "C" fn(token: *const c_void, timeout_ns: u64) -> bool,
    /// Takes one more reference on the token (valid until the matching `drop`).
    pub clone: extern "C" fn(token: *const c_void),
    /// Gives back a reference taken with `clone`.
    pub drop: extern "C" fn(token: *const c_void),
}

/// An HTTP request, borrowed from the host for one `handle` call.
#[repr(C)]
pub struct RawRequest {
    pub method: RawStr,
    /// Path and query, or an absolute URI as received.
    pub uri: RawStr,
    /// 9 = HTTP/0.9, 10 = HTTP/1.0, 11 = HTTP/1.1, 20 = HTTP/2, 30 = HTTP/3.
    pub version: u32,
    /// The request's headers, as the host's HTTP parser accepted them: each name a valid
    /// lowercase header name, each value valid for `http::HeaderValue` (the plugin takes them
    /// without checking the values again).
    pub headers: *const RawHeader,
    pub headers_len: usize,
    pub body: RawStr,
}

/// An HTTP response, allocated by the plugin. Valid until `free_response(owner)`.
#[repr(C)]
pub struct RawResponse {
    pub status: u16,
    pub headers: *const RawHeader,
    pub headers_len: usize,
    pub body: RawStr,
    /// Opaque plugin allocation that keeps the fields above alive.
    pub owner: *mut c_void,
}

impl RawResponse {
    pub const EMPTY: RawResponse = RawResponse {
        status: 0,
        headers: std::ptr::null(),
        headers_len: 0,
        body: RawStr::EMPTY,
        owner: std::ptr::null_mut(),
    };
}

/// A host-allocated buffer the plugin writes an error message into (truncated to `cap`).
#[repr(C)]
pub struct ErrorBuf {
    pub ptr: *mut u8,
    pub cap: usize,
    pub len: usize,
}

/// The plugin's hooks. Every function catches panics.
#[repr(C)]
pub struct VTable {
    /// Builds the per-worker state. Returns `true` and writes `*state` on success; returns
    /// `false` and writes a message into `err` on failure (an error or a panic).
    pub on_worker_start: unsafe extern "C" fn(
        ctx: *const HostContext,
        state: *mut *mut c_void,
        err: *mut ErrorBuf,
    ) -> bool,
    /// Serves one request. Always writes a response: a panic becomes a 500. May be called from
    /// many threads at once with the same `state`.
    pub handle:
        unsafe extern "C" fn(state: *const c_void, req: *const RawRequest, resp: *mut RawResponse),
    /// Frees a response's `owner`.
    pub free_response: unsafe extern "C" fn(owner: *mut c_void),
    /// Runs the plugin's stop hook and frees the state. Called at most once, after the last `handle`.
    pub on_worker_stop: unsafe extern "C" fn(state: *mut c_void),
    /// ABI 1.1: whether `handle` may block for this method and path. `false` lets the host run it
    /// on its I/O thread (no thread hand-off); `true`, or a panic, keeps it on a thread of its own.
    /// A host reads this field only when `vtable_size` covers it.
    pub may_block: unsafe extern "C" fn(state: *const c_void, method: RawStr, path: RawStr) -> bool,
    /// ABI 1.3: how the host runs requests with this method and path: one of [`dispatch`]'s
    /// values. Supersedes `may_block` for hosts that know it. A panic answers `BLOCKING`.
    pub dispatch: unsafe extern "C" fn(state: *const c_void, method: RawStr, path: RawStr) -> u8,
    /// ABI 1.3: starts serving one request asynchronously. The request's header views are
    /// borrowed for this call only; its `body` and `upgrade` objects move to the plugin, which
    /// drops them through their vtables. The future is polled by the host (on its I/O thread,
    /// with the host's waker) and dropped by the host; it never panics across the ABI (a panic in
    /// the handler resolves to a `500`). The response it resolves to moves to the host.
    pub serve: unsafe extern "C" fn(
        state: *const c_void,
        req: *const RawAsyncRequest,
    ) -> async_ffi::FfiFuture<RawAsyncResponse>,
    /// ABI 1.3: the worker began draining (a reload, a stop, a recycle): long-lived handlers
    /// (WebSocket, SSE) should wind down. Called once, from the host's I/O thread.
    pub on_drain: unsafe extern "C" fn(state: *const c_void),
    /// ABI 1.7: handles one gateway client event, or `None`: the plugin handles none (the host
    /// then links to no gateway). The event is borrowed for this call; the future is polled
    /// and dropped by the host, never panics across the ABI (a panic resolves to an outcome
    /// with `panicked` set), and its outcome moves to the host. Events of different clients
    /// run at once; one client's one at a time, in order.
    pub on_gateway_event: Option<
        unsafe extern "C" fn(
            state: *const c_void,
            event: *const RawGatewayEvent,
        ) -> async_ffi::FfiFuture<RawGatewayOutcome>,
    >,
}

/// The size of the ABI 1.0 vtable (before `may_block`): the smallest a host accepts.
pub const VTABLE_1_0_SIZE: usize = std::mem::offset_of!(VTable, may_block);
/// The size of the ABI 1.1 and 1.2 vtable (before `dispatch`).
pub const VTABLE_1_1_SIZE: usize = std::mem::offset_of!(VTable, dispatch);
/// The size of the ABI 1.3 to 1.6 vtable (before `on_gateway_event`).
pub const VTABLE_1_3_SIZE: usize = std::mem::offset_of!(VTable, on_gateway_event);
/// The size of the ABI 1.7 vtable: the whole struct today.
pub const VTABLE_1_7_SIZE: usize = size_of::<VTable>();

/// Values of [`VTable::dispatch`].
pub mod dispatch {
    /// Call `handle` on the host's I/O thread: it returns in microseconds.
    pub const INLINE: u8 = 0;
    /// Call `handle` on a thread of its own: it may block.
    pub const BLOCKING: u8 = 1;
    /// Call `serve` and poll its future on the I/O thread.
    pub const ASYNC: u8 = 2;
}

/// An owned, type-erased object: `state` is only ever passed back to its own `vtable`, whose
/// functions live on the side that made it. A null `vtable` means "none".
#[repr(C)]
pub struct RawObject<V: 'static> {
    pub state: *mut c_void,
    pub vtable: *const V,
}

impl<V> RawObject<V> {
    pub const NONE: RawObject<V> = RawObject {
        state: std::ptr::null_mut(),
        vtable: std::ptr::null(),
    };

    pub fn is_none(&self) -> bool {
        self.vtable.is_null()
    }
}

/// Results of the `poll_*` functions of [`BodyVTable`], [`UpgradeVTable`] and [`IoVTable`].
pub mod poll {
    /// Not ready: the waker in the context will be woken.
    pub const PENDING: u8 = 0;
    /// Ready: the out-parameter is written.
    pub const READY: u8 = 1;
    /// The body has no more frames (bodies only).
    pub const END: u8 = 2;
    /// Failed: the out-parameter carries a UTF-8 message (bodies) or nothing (I/O, upgrades).
    pub const ERROR: u8 = 3;
}

/// One chunk of body data, owned by the side that produced it until `free(owner)`.
#[repr(C)]
pub struct RawChunk {
    pub data: RawStr,
    pub owner: *mut c_void,
    pub free: Option<unsafe extern "C" fn(owner: *mut c_void)>,
}

impl RawChunk {
    pub const EMPTY: RawChunk = RawChunk {
        data: RawStr::EMPTY,
        owner: std::ptr::null_mut(),
        free: None,
    };
}

/// A body streamed in chunks: the request body (made by the host, read by the plugin) or a
/// response body (made by the plugin, read by the host). Polled from one thread at a time.
#[repr(C)]
pub struct BodyVTable {
    /// Polls for the next chunk: `PENDING`, `READY` (writes `out`), `END`, or `ERROR` (writes
    /// a message into `out`). Never unwinds.
    pub poll_chunk: unsafe extern "C" fn(
        state: *mut c_void,
        cx: *mut async_ffi::FfiContext<'_>,
        out: *mut RawChunk,
    ) -> u8,
    /// The body's remaining length when known exactly, else `u64::MAX`.
    pub exact_len: unsafe extern "C" fn(state: *const c_void) -> u64,
    /// Frees the body; called once.
    pub drop: unsafe extern "C" fn(state: *mut c_void),
}

/// An owned body stream; `NONE` means no body.
pub type RawBody = RawObject<BodyVTable>;

/// The connection of an HTTP/1.1 request that asked for `Upgrade` (a WebSocket handshake), made
/// by the host. The plugin keeps it (does not drop it) to take the connection over once its
/// `101 Switching Protocols` response is sent; a 101 answered after dropping it is refused.
#[repr(C)]
pub struct UpgradeVTable {
    /// Resolves once the host sent the `101`: `READY` writes the connection into `out`;
    /// `ERROR` when the connection failed or the response was not a 101.
    pub poll_upgraded: unsafe extern "C" fn(
        state: *mut c_void,
        cx: *mut async_ffi::FfiContext<'_>,
        out: *mut RawIo,
    ) -> u8,
    pub drop: unsafe extern "C" fn(state: *mut c_void),
}

/// An owned upgrade handle; `NONE` when the request cannot be upgraded.
pub type RawUpgrade = RawObject<UpgradeVTable>;

/// A byte stream (an upgraded connection), made by the host. Each poll is `PENDING`, `READY`
/// (with `*done` bytes read or written; a read of 0 is end of stream) or `ERROR`.
#[repr(C)]
pub struct IoVTable {
    pub poll_read: unsafe extern "C" fn(
        state: *mut c_void,
        cx: *mut async_ffi::FfiContext<'_>,
        buf: *mut u8,
        cap: usize,
        done: *mut usize,
    ) -> u8,
    pub poll_write: unsafe extern "C" fn(
        state: *mut c_void,
        cx: *mut async_ffi::FfiContext<'_>,
        buf: *const u8,
        len: usize,
        done: *mut usize,
    ) -> u8,
    pub poll_flush:
        unsafe extern "C" fn(state: *mut c_void, cx: *mut async_ffi::FfiContext<'_>) -> u8,
    pub poll_shutdown:
        unsafe extern "C" fn(state: *mut c_void, cx: *mut async_ffi::FfiContext<'_>) -> u8,
    pub drop: unsafe extern "C" fn(state: *mut c_void),
}

/// An owned byte stream.
pub type RawIo = RawObject<IoVTable>;

/// A request for [`VTable::serve`].
#[repr(C)]
pub struct RawAsyncRequest {
    /// Method, URI, version and headers, borrowed for the `serve` call; `head.body` is empty.
    pub head: RawRequest,
    /// The request body, moved to the plugin (`NONE`: no body).
    pub body: RawBody,
    /// Moved to the plugin (`NONE`: not an upgrade request).
    pub upgrade: RawUpgrade,
    /// ABI 1.6: one code per header of `head`, or null (as in [`RawHandleRequest::name_codes`]).
    pub name_codes: *const u8,
}

/// What a [`VTable::serve`] future resolves to; moved to the host.
#[repr(C)]
pub struct RawAsyncResponse {
    /// Status and headers, valid until `free_response(head.owner)`; when `stream` is `NONE`,
    /// `head.body` is the whole body.
    pub head: RawResponse,
    /// A streamed body, moved to the host (`NONE`: the body is `head.body`).
    pub stream: RawBody,
}

// SAFETY: everything a response points to is plain heap memory owned by the response (see the
// ownership rules), freed through functions callable from any thread.
unsafe impl Send for RawAsyncResponse {}
