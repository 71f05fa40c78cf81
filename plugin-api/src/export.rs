//! The `extern "C"` shims behind [`export_plugin!`](crate::export_plugin): the only place a
//! plugin's code meets `unsafe`.
//!
//! Each shim converts between the [`ffi`](crate::ffi) views and the `http` types, calls the
//! safe [`Plugin`] method inside `catch_unwind`, and never lets a panic cross the ABI: a panic in
//! `on_worker_start` becomes a load failure carrying the panic message, one in `handle` a `500`
//! (reported to a 1.5 host, which counts it).
//! Nothing here allocates memory the host frees, or frees memory the host allocated.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::ffi::head::{self, Values};
use crate::ffi::{
    self, ErrorBuf, HostContext, PluginHeader, RawHeader, RawRequest, RawResponse, RawStr, VTable,
};
use crate::{Plugin, Request, Response, WorkerContext};

/// The exported header as a `static`. Only [`export_plugin!`](crate::export_plugin) builds one.
#[repr(transparent)]
pub struct Exported(PluginHeader);

// SAFETY: the header is immutable after construction and every pointer in it targets `'static`
// read-only data (string literals and a `static` vtable), so sharing it between threads is sound.
unsafe impl Sync for Exported {}

impl Exported {
    pub const fn new(
        name: &'static str,
        version: &'static str,
        vtable: &'static VTable,
    ) -> Exported {
        Exported(PluginHeader {
            magic: ffi::MAGIC,
            abi_major: ffi::ABI_MAJOR,
            abi_minor: ffi::ABI_MINOR,
            header_size: size_of::<PluginHeader>() as u32,
            vtable_size: size_of::<VTable>() as u32,
            api_version: RawStr::new(ffi::API_VERSION.as_bytes()),
            name: RawStr::new(name.as_bytes()),
            version: RawStr::new(version.as_bytes()),
            vtable,
        })
    }

    pub const fn as_ptr(&'static self) -> *const PluginHeader {
        &self.0
    }
}

/// The vtable for `P`, built at compile time.
pub const fn vtable<P: Plugin>() -> VTable {
    VTable {
        on_worker_start: on_worker_start::<P>,
        handle: handle::<P>,
        free_response,
        on_worker_stop: on_worker_stop::<P>,
        may_block: may_block::<P>,
        dispatch: crate::serve::dispatch::<P>,
        serve: crate::serve::serve::<P>,
        on_drain: crate::serve::on_drain,
        on_gateway_event: crate::gateway::entry::<P>(),
    }
}

/// Exports `$ty` (a type implementing [`Plugin`]) as this library's plugin.
/// Call it exactly once, at the crate root of a `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        /// The plugin's one exported symbol; see `plugin_api::ffi`.
        #[unsafe(no_mangle)]
        pub extern "C" fn host_plugin_entry_v1() -> *const $crate::ffi::PluginHeader {
            static VTABLE: $crate::ffi::VTable = $crate::export::vtable::<$ty>();
            static HEADER: $crate::export::Exported = $crate::export::Exported::new(
                env!("CARGO_PKG_NAME"),
                env!("CARGO_PKG_VERSION"),
                &VTABLE,
            );
            HEADER.as_ptr()
        }
    };
}

thread_local! {
    /// Where the last panic on this thread happened, recorded by the hook below.
    static PANIC_LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Replaces the plugin's (its own `std`'s) panic hook with one that only records the location.
/// A panic in a handler is an expected, handled event here (a `500`), reported by the shim in one
/// log line; the default hook would print a multi-line report and, with `RUST_BACKTRACE` set,
/// capture and symbolize a backtrace, which maps the binaries' debug info and keeps tens of MiB
/// resident for the life of the worker.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        PANIC_LOCATION.with(|cell| *cell.borrow_mut() = location);
    }));
}

/// The host's [`HostContext::panicked`], when its context had it (ABI 1.5).
static HOST_PANICKED: std::sync::OnceLock<extern "C" fn()> = std::sync::OnceLock::new();

/// Tells the host that a handler panicked (it counts them); nothing with an older host.
pub(crate) fn report_panic() {
    if let Some(panicked) = HOST_PANICKED.get() {
        panicked();
    }
}

/// "message at file:line:col" for a caught panic.
pub(crate) fn describe_panic(payload: &(dyn Any + Send)) -> String {
    let location = PANIC_LOCATION.with(|cell| cell.borrow_mut().take());
    match location {
        Some(at) => format!("{} at {at}", panic_message(payload)),
        None => panic_message(payload).to_string(),
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

fn write_error(err: *mut ErrorBuf, message: &str) {
    if err.is_null() {
        return;
    }
    // SAFETY: the host passes a valid, exclusive `ErrorBuf` whose `ptr` has `cap` writable bytes.
    let err = unsafe { &mut *err };
    let mut n = message.len().min(err.cap);
    while !message.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `n <= cap` and the source and destination do not overlap (host vs. plugin memory).
    unsafe { std::ptr::copy_nonoverlapping(message.as_ptr(), err.ptr, n) };
    err.len = n;
}

unsafe extern "C" fn on_worker_start<P: Plugin>(
    ctx: *const HostContext,
    state: *mut *mut c_void,
    err: *mut ErrorBuf,
) -> bool {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host passes a valid context that outlives this call. Only the fields of
        // the ABI 1.1 context are read through it here, which every 1.x host provides; a host
        // built for an older minor passes a shorter struct, hence raw reads, not a reference.
        let (size, slot, generation, pid, max_level, log) = unsafe {
            (
                std::ptr::addr_of!((*ctx).size).read(),
                std::ptr::addr_of!((*ctx).slot).read(),
                std::ptr::addr_of!((*ctx).generation).read(),
                std::ptr::addr_of!((*ctx).pid).read(),
                std::ptr::addr_of!((*ctx).max_level).read(),
                std::ptr::addr_of!((*ctx).log).read(),
            )
        };
        crate::log::install(log, max_level);
        install_panic_hook();
        // ABI 1.2: `restart_worker` only when the host's context is large enough to hold it.
        let restart = (size as usize > ffi::HOST_CONTEXT_1_1_SIZE)
            // SAFETY: the host's context covers the field (checked just above).
            .then(|| unsafe { std::ptr::addr_of!((*ctx).restart_worker).read() });
        // ABI 1.3: the plugin's configuration.
        let config: std::sync::Arc<str> = if size as usize >= ffi::HOST_CONTEXT_1_3_SIZE {
            // SAFETY: the host's context covers the field, a view valid for this call.
            let raw = unsafe { std::ptr::addr_of!((*ctx).config).read() };
            String::from_utf8_lossy(unsafe { raw.as_bytes() }).into()
        } else {
            "{}".into()
        };
        // ABI 1.4: the functions behind each request's cancellation.
        if size as usize >= ffi::HOST_CONTEXT_1_4_SIZE {
            // SAFETY: the host's context covers the field.
            crate::cancel::install(unsafe { std::ptr::addr_of!((*ctx).cancel).read() });
        }
        // ABI 1.5: where caught handler panics are reported.
        if size as usize >= crate::ffi::HOST_CONTEXT_1_5_SIZE {
            // SAFETY: the host's context covers the field.
            let _ = HOST_PANICKED.set(unsafe { std::ptr::addr_of!((*ctx).panicked).read() });
        }
        // ABI 1.5: the config file's directory, and whether this is `host check`.
        let (config_dir, check) = if size as usize >= crate::ffi::HOST_CONTEXT_1_5_SIZE {
            // SAFETY: the host's context covers both fields; the directory is a view valid for
            // this call, copied here. `check` is read as a byte: any non-zero value is `true`.
            let (raw, check) = unsafe {
                (
                    std::ptr::addr_of!((*ctx).config_dir).read(),
                    std::ptr::addr_of!((*ctx).check).cast::<u8>().read() != 0,
                )
            };
            let dir = String::from_utf8_lossy(unsafe { raw.as_bytes() }).into_owned();
            (
                (!dir.is_empty()).then(|| std::path::PathBuf::from(dir).into()),
                check,
            )
        } else {
            (None, false)
        };
        // ABI 1.5: the functions behind the plugin's metrics (without them, metrics count
        // nothing).
        if size as usize >= crate::ffi::HOST_CONTEXT_1_5_SIZE {
            // SAFETY: the host's context covers the field.
            crate::metrics::install(unsafe { std::ptr::addr_of!((*ctx).metrics).read() });
        }
        // ABI 1.6: the header names the host codes in each request.
        if size as usize >= ffi::HOST_CONTEXT_1_6_SIZE {
            // SAFETY: the host's context covers both fields; the table is valid for this call,
            // and copied here.
            unsafe {
                head::install_host_names(
                    std::ptr::addr_of!((*ctx).header_names).read(),
                    std::ptr::addr_of!((*ctx).header_names_len).read(),
                )
            };
        }
        // ABI 1.7: the gateway's functions (null: this worker has none).
        if size as usize >= ffi::HOST_CONTEXT_1_7_SIZE {
            // SAFETY: the host's context covers the field.
            crate::gateway::install(unsafe { std::ptr::addr_of!((*ctx).gateway).read() });
        }
        crate::runtime::start()
            .map_err(|e| format!("cannot start the plugin's tokio runtime: {e}"))?;
        // The host calls this on its I/O thread, where it later polls the plugin's futures.
        crate::runtime::enter_for_good();
        let wctx = WorkerContext {
            slot,
            generation,
            pid,
            restart,
            config,
            config_dir,
            check,
        };
        P::on_worker_start(&wctx).map(|p| Box::into_raw(Box::new(p)) as *mut c_void)
    }));
    match result {
        Ok(Ok(ptr)) => {
            // SAFETY: the host passes a valid out-pointer.
            unsafe { *state = ptr };
            true
        }
        Ok(Err(e)) => {
            let mut message = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            write_error(err, &message);
            false
        }
        Err(payload) => {
            write_error(
                err,
                &format!("on_worker_start panicked: {}", describe_panic(&*payload)),
            );
            false
        }
    }
}

/// Builds the `http` request from the host's borrowed view (and its header-name codes, if any).
/// Copies what `http` needs to own.
fn to_request(raw: &RawRequest, codes: *const u8) -> Result<Request, String> {
    let parts = to_parts(raw, codes)?;
    // SAFETY: borrowed for the duration of `handle` (see `to_parts`); copied here.
    let body = Bytes::copy_from_slice(unsafe { raw.body.as_bytes() });
    Ok(Request::from_parts(parts, body))
}

/// The method, URI, version and headers of the host's borrowed view, copied: the URI and every
/// header value into one buffer, each name taken from its code when `codes` is not null (ABI
/// 1.6; one per header) and the host sent its table, else parsed.
pub(crate) fn to_parts(raw: &RawRequest, codes: *const u8) -> Result<http::request::Parts, String> {
    // SAFETY (for every view below): the host guarantees the request and everything it points to
    // are valid for the duration of `handle` (or `serve`), and this function copies what it keeps.
    let method = Method::from_bytes(unsafe { raw.method.as_bytes() }).map_err(|e| e.to_string())?;
    // SAFETY: `headers` points to `headers_len` initialized views (ownership rules).
    let fields = unsafe { head::fields(raw.headers, raw.headers_len) };
    let coded = match head::host_names() {
        Some(names) if !codes.is_null() => Some(head::Coded {
            // SAFETY: a host that sent its table sends one code per header, valid for the call.
            codes: unsafe { std::slice::from_raw_parts(codes, fields.len()) },
            names,
        }),
        _ => None,
    };
    // SAFETY: as above; the host passes values its HTTP parser accepted (`RawRequest::headers`),
    // taken without checking them again.
    let (uri, headers) = unsafe {
        head::read_headers(fields, coded, raw.uri.as_bytes(), Values::Trusted, |name| {
            Err(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(name)
            ))
        })
    }?;
    let uri = http::Uri::from_maybe_shared(uri).map_err(|e| e.to_string())?;
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = head::version_of(raw.version);
    parts.headers = headers;
    Ok(parts)
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut resp = Response::new(Bytes::from_static(text.as_bytes()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp
}

/// Keeps a response's parts alive on the plugin side until the host frees it.
struct OwnedResponse {
    _headers: HeaderMap,
    /// Inline for up to 8 headers: the box holds everything, one allocation.
    raw_headers: smallvec::SmallVec<[RawHeader; 8]>,
    body: Bytes,
}

unsafe extern "C" fn handle<P: Plugin>(
    state: *const c_void,
    req: *const RawRequest,
    out: *mut RawResponse,
) {
    let _rt = crate::runtime::enter();
    let raw_req = req;
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `state` is the pointer `on_worker_start::<P>` returned, alive until `on_worker_stop`.
        let plugin = unsafe { &*(state as *const P) };
        // SAFETY: a host that sent its table of header names (1.6) passes a `RawHandleRequest`
        // with codes, whose first field `req` points at.
        let codes = match head::host_names().is_some() {
            true => unsafe { (*req_ext(raw_req)).name_codes },
            false => std::ptr::null(),
        };
        // SAFETY: the host passes a valid request for the duration of this call.
        match to_request(unsafe { &*req }, codes) {
            Ok(mut req) => {
                if crate::cancel::host_passes_tokens() {
                    // SAFETY: a host whose context had the cancellation functions passes a
                    // `RawHandleRequest`, whose first field `req` points at.
                    let token = unsafe { (*req_ext(raw_req)).cancel };
                    if let Some(c) = crate::Cancellation::from_raw(token) {
                        req.extensions_mut().insert(c);
                    }
                }
                plugin.handle(req)
            }
            Err(e) => {
                tracing::warn!(error = %e, "request could not be converted");
                plain(StatusCode::BAD_REQUEST, "bad request\n")
            }
        }
    }));
    let resp = result.unwrap_or_else(|payload| {
        report_panic();
        tracing::error!(
            panic = %describe_panic(&*payload),
            "handler panicked; answered 500"
        );
        plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
    });
    let (parts, body) = resp.into_parts();
    // SAFETY: the host passes a valid, exclusive out-pointer.
    unsafe { out.write(raw_response(parts, body)) };
}

/// The [`RawHandleRequest`](ffi::RawHandleRequest) a 1.4 host's `handle` pointer points into.
fn req_ext(req: *const RawRequest) -> *const ffi::RawHandleRequest {
    req.cast()
}

/// Moves a response's head and whole body into one plugin allocation the host frees with
/// `free_response(owner)`.
pub(crate) fn raw_response(parts: http::response::Parts, body: Bytes) -> RawResponse {
    let raw_headers = head::views(&parts.headers);
    let owned = Box::new(OwnedResponse {
        _headers: parts.headers,
        raw_headers,
        body,
    });
    RawResponse {
        status: parts.status.as_u16(),
        headers: owned.raw_headers.as_ptr(),
        headers_len: owned.raw_headers.len(),
        body: RawStr::new(&owned.body),
        owner: Box::into_raw(owned) as *mut c_void,
    }
}

unsafe extern "C" fn may_block<P: Plugin>(
    state: *const c_void,
    method: RawStr,
    path: RawStr,
) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `state` is live (see `handle`); the strings are borrowed from the host for this call.
        let plugin = unsafe { &*(state as *const P) };
        let (method, path) = unsafe { (method.as_bytes(), path.as_bytes()) };
        match (std::str::from_utf8(method), std::str::from_utf8(path)) {
            (Ok(m), Ok(p)) => plugin.may_block(m, p),
            _ => true,
        }
    }))
    .unwrap_or(true)
}

unsafe extern "C" fn free_response(owner: *mut c_void) {
    if owner.is_null() {
        return;
    }
    // SAFETY: `owner` came from `Box::into_raw` in `handle` and the host frees it exactly once.
    // Dropping header maps and `Bytes` cannot panic, but stay safe if a future field could.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        drop(unsafe { Box::from_raw(owner as *mut OwnedResponse) })
    }));
}

unsafe extern "C" fn on_worker_stop<P: Plugin>(state: *mut c_void) {
    if state.is_null() {
        return;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `state` came from `Box::into_raw` in `on_worker_start::<P>`; the host calls this once,
        // after the last `handle` returned.
        let plugin = unsafe { Box::from_raw(state as *mut P) };
        plugin.on_worker_stop();
    }));
    if let Err(payload) = result {
        tracing::error!(panic = %describe_panic(&*payload), "on_worker_stop panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn log_nothing(_: u8, _: RawStr, _: RawStr) {}

    static RESTARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    extern "C" fn count_restart(_: RawStr) {
        RESTARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    struct AskRestart;
    impl Plugin for AskRestart {
        fn on_worker_start(ctx: &WorkerContext) -> Result<Self, crate::BoxError> {
            if ctx.restart_worker("test") {
                Ok(AskRestart)
            } else {
                Err("restart_worker not available".into())
            }
        }
        fn handle(&self, _req: Request) -> Response {
            Response::new(Bytes::new())
        }
    }

    extern "C" fn panicked_nowhere() {}

    /// Starts `AskRestart` with a context of `size` bytes; whether it started (it does only when
    /// `restart_worker` reached the host).
    fn start_with_context_size(size: usize) -> bool {
        start_with::<AskRestart>(size)
    }

    fn start_with<P: Plugin>(size: usize) -> bool {
        let ctx = HostContext {
            size: size as u32,
            slot: 0,
            generation: 1,
            pid: 1,
            max_level: 0,
            log: log_nothing,
            restart_worker: count_restart,
            config: RawStr::new(b"{}"),
            cancel: std::ptr::null(),
            panicked: panicked_nowhere,
            config_dir: RawStr::new(b"/etc/myservice"),
            check: true,
            metrics: std::ptr::null(),
            header_names: std::ptr::null(),
            header_names_len: 0,
            gateway: std::ptr::null(),
        };
        let mut state = std::ptr::null_mut();
        let mut storage = [0u8; 256];
        let mut err = ErrorBuf {
            ptr: storage.as_mut_ptr(),
            cap: storage.len(),
            len: 0,
        };
        // SAFETY: every pointer is valid for the call.
        let ok = unsafe { on_worker_start::<P>(&ctx, &mut state, &mut err) };
        if ok {
            // SAFETY: `state` came from the successful start above.
            unsafe { on_worker_stop::<P>(state) };
        }
        ok
    }

    /// What `SeesContext` saw: the config dir, `is_check`, and what its async set-up returned.
    static SEEN: std::sync::Mutex<Vec<(Option<std::path::PathBuf>, bool, u32)>> =
        std::sync::Mutex::new(Vec::new());

    struct SeesContext;
    impl Plugin for SeesContext {
        fn on_worker_start(ctx: &WorkerContext) -> Result<Self, crate::BoxError> {
            let awaited = ctx.block_on(async {
                let task = tokio::spawn(async {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    7
                });
                task.await.unwrap_or(0)
            });
            SEEN.lock().unwrap().push((
                ctx.config_dir().map(|d| d.to_path_buf()),
                ctx.is_check(),
                awaited,
            ));
            assert_eq!(
                ctx.resolve_path("data/app.db"),
                ctx.config_dir()
                    .unwrap_or(std::path::Path::new(""))
                    .join("data/app.db")
            );
            assert_eq!(ctx.resolve_path("/abs"), std::path::Path::new("/abs"));
            Ok(SeesContext)
        }
        fn handle(&self, _req: Request) -> Response {
            Response::new(Bytes::new())
        }
    }

    #[test]
    fn config_dir_and_check_reach_a_new_plugin_and_default_with_an_old_host() {
        assert!(start_with::<SeesContext>(size_of::<HostContext>()));
        assert!(start_with::<SeesContext>(ffi::HOST_CONTEXT_1_4_SIZE));
        let seen = SEEN.lock().unwrap();
        assert_eq!(
            seen[0],
            (Some(std::path::PathBuf::from("/etc/myservice")), true, 7)
        );
        assert_eq!(seen[1], (None, false, 7));
    }

    #[test]
    fn restart_worker_reaches_a_new_host_and_is_absent_with_an_old_one() {
        let before = RESTARTS.load(std::sync::atomic::Ordering::SeqCst);
        assert!(start_with_context_size(size_of::<HostContext>()));
        assert_eq!(
            RESTARTS.load(std::sync::atomic::Ordering::SeqCst),
            before + 1
        );
        assert!(!start_with_context_size(ffi::HOST_CONTEXT_1_1_SIZE));
        assert_eq!(
            RESTARTS.load(std::sync::atomic::Ordering::SeqCst),
            before + 1
        );
    }

    /// A host's token for the test below: a flag and a reference count.
    struct FakeToken {
        cancelled: std::sync::atomic::AtomicBool,
        refs: std::sync::atomic::AtomicI32,
    }

    fn fake(t: *const c_void) -> &'static FakeToken {
        // SAFETY: the test passes a pointer to a `'static` `FakeToken`.
        unsafe { &*t.cast::<FakeToken>() }
    }
    extern "C" fn fake_is_cancelled(t: *const c_void) -> bool {
        fake(t).cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }
    extern "C" fn fake_wait(t: *const c_void, _timeout_ns: u64) -> bool {
        fake_is_cancelled(t)
    }
    extern "C" fn fake_clone(t: *const c_void) {
        fake(t)
            .refs
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    extern "C" fn fake_drop(t: *const c_void) {
        fake(t)
            .refs
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    static FAKE_VTABLE: ffi::CancelVTable = ffi::CancelVTable {
        is_cancelled: fake_is_cancelled,
        wait: fake_wait,
        clone: fake_clone,
        drop: fake_drop,
    };

    /// Answers whether its request is cancelled.
    struct SaysCancelled;
    impl Plugin for SaysCancelled {
        fn on_worker_start(_ctx: &WorkerContext) -> Result<Self, crate::BoxError> {
            Ok(SaysCancelled)
        }
        fn handle(&self, req: Request) -> Response {
            let c = crate::Cancellation::of(&req);
            Response::new(Bytes::from(format!(
                "{} {}",
                c.is_cancelled(),
                c.wait(std::time::Duration::ZERO)
            )))
        }
    }

    /// Calls `handle::<SaysCancelled>` with a 1.4 request carrying `token`; its answer.
    fn handle_with_token(token: *const c_void) -> String {
        let head = RawRequest {
            method: RawStr::new(b"GET"),
            uri: RawStr::new(b"/"),
            version: 11,
            headers: std::ptr::null(),
            headers_len: 0,
            body: RawStr::EMPTY,
        };
        let req = ffi::RawHandleRequest {
            head,
            cancel: token,
            name_codes: std::ptr::null(),
        };
        let mut out = RawResponse::EMPTY;
        let state = std::ptr::NonNull::<SaysCancelled>::dangling().as_ptr() as *const c_void;
        // SAFETY: a valid request and out-pointer; `SaysCancelled` is a ZST, so the dangling
        // state pointer is a valid reference to it.
        unsafe {
            handle::<SaysCancelled>(state, (&raw const req).cast(), &mut out);
        }
        // SAFETY: written by `handle`, freed once below.
        let text = String::from_utf8(unsafe { out.body.as_bytes() }.to_vec()).unwrap();
        // SAFETY: `out.owner` came from this `handle`.
        unsafe { free_response(out.owner) };
        text
    }

    #[test]
    fn handle_sees_the_hosts_cancellation_and_gives_its_reference_back() {
        static TOKEN: FakeToken = FakeToken {
            cancelled: std::sync::atomic::AtomicBool::new(false),
            refs: std::sync::atomic::AtomicI32::new(0),
        };
        let token = (&raw const TOKEN).cast::<c_void>();
        crate::cancel::install(&FAKE_VTABLE);
        assert_eq!(handle_with_token(token), "false false");
        TOKEN
            .cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(handle_with_token(token), "true true");
        // Every reference taken was given back.
        assert_eq!(TOKEN.refs.load(std::sync::atomic::Ordering::SeqCst), 0);
        // No token (a call on the host's I/O thread): never cancelled.
        assert_eq!(handle_with_token(std::ptr::null()), "false false");
    }

    #[test]
    fn entry_symbol_matches_the_macro() {
        assert_eq!(ffi::ENTRY_SYMBOL, b"host_plugin_entry_v1\0");
    }

    #[test]
    fn error_buffer_truncates_on_a_char_boundary() {
        let mut storage = [0u8; 4];
        let mut buf = ErrorBuf {
            ptr: storage.as_mut_ptr(),
            cap: storage.len(),
            len: 0,
        };
        write_error(&mut buf, "ab\u{e9}\u{e9}");
        assert_eq!(buf.len, 4);
        assert_eq!(&storage[..buf.len], "ab\u{e9}".as_bytes());
    }
}
