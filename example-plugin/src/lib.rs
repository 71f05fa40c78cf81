//! The example plugin: what a handler `.so` shipped to the host looks like.
//!
//! Routes:
//! - `GET /`: `200`, first line `<greeting> from example-plugin <version>`; the greeting is
//!   compiled in from `EXAMPLE_GREETING` (default `hello`), so
//!   `EXAMPLE_GREETING=v2 cargo build -p example-plugin` makes a visibly new build.
//! - `GET /sleep?ms=N`: blocks its thread for `N` ms (at most 60 s), then answers; it returns at
//!   once if the client leaves meanwhile (it waits on the request's `Cancellation`).
//! - `GET /panic`: panics; the host answers `500` and the worker keeps serving.
//! - `GET /state`: a per-worker counter created in `on_worker_start`.
//! - `GET /leak?mb=N`: leaks `N` MiB (at most 1024), writing every page so the worker's RSS
//!   grows: try `max_worker_rss`.
//! - `GET /poison`: panics while holding the worker's shared `Mutex`, which poisons it.
//! - `GET /locked`: counts its requests under that `Mutex`. Once it is poisoned, it answers
//!   `500` and calls `restart_worker()`: the host replaces this worker, new before old, and the
//!   route works again in the fresh one.
//! - `GET /spin?ms=N`: busy-loops `N` ms (at most an hour), yet is declared non-blocking, so it
//!   runs on the worker's I/O thread: a handler that wedges its worker, for trying the watchdog.
//! - `GET /spin/cpu[/ANY]?ms=N`: busy-loops until its thread has run `N` ms on a CPU (at most
//!   10 s), however long a busy machine stretches that; inline, like `/spin`.
//! - `GET /exit`: ends the worker process (`std::process::exit(3)`): a request-triggered crash.
//! - `GET /config`: the plugin's `[plugin_config]` as JSON. It accepts the keys `message`
//!   (a string) and `limit` (an integer); any other key makes `on_worker_start` refuse the
//!   configuration, so a reload with it is refused with that reason.
//!
//!
//! Async routes (run by `serve` in the plugin's own tokio runtime, see `dispatch`):
//! - `GET /async/hello`: answers at once.
//! - `GET /stream/hello`: the same answer as a streamed body of one chunk, ready at once (the
//!   host sends it with `Content-Length`, like a whole one).
//! - `GET /async/sleep?ms=N`: awaits a tokio timer (at most 60 s), answers `slept N`.
//! - `GET /async/panic`: panics after an await; the host answers `500`.
//! - `GET /async/block?ms=N`: blocks its thread `N` ms (at most 10 s) inside the future, which
//!   an async handler must never do: the host logs it, naming the path.
//! - `GET /async/spin[/ANY]?ms=N`: busy-loops inside the future until its thread has run `N` ms on a
//!   CPU (at most 10 s; the thread's CPU time, however long the machine keeps it waiting): above
//!   20 ms the host names the path in the log, below it not, however long the poll took.
//! - `GET /stream?chunks=N&every_ms=M[&size=S][&fail_at=F]`: `N` lines `chunk I`, `M` ms apart,
//!   each sent as it is produced (padded to `S` bytes when given; the stream panics instead of
//!   producing chunk `F` when given); `GET /stream/stats` says how many
//!   chunks this worker's streams produced, to watch a slow client slow the producer down.
//! - `GET /events`: server-sent events, one every 100 ms with an increasing `id:` and
//!   `data: gen=G pid=P`; the stream ends when the worker drains.
//! - `POST /upload`: reads the body as a stream (up to 8 GiB) and answers
//!   `bytes=N sha256=HEX` without holding it.
//! - `GET /ws`: WebSocket; echoes each text message as `gen=G MESSAGE`, and sends Close 1012
//!   (Service Restart) when its worker drains.
//!
//! - `GET /series?n=N`: registers `N` more series `example_series_total{n="I"}` (at most 1000),
//!   to watch the host's bound on a worker's series; answers how many the host kept.
//!
//! Metrics (served by the master's `/metrics`, summed over workers, by generation): every
//! request counted in `example_requests_total{route="..."}` (its path when it is one of the
//! routes above, else `other`: a label's values must stay few), open WebSockets in the gauge
//! `example_websockets_open`, and the time `/sleep` and `/async/sleep` slept in the histogram
//! `example_sleep_seconds`.
//!
//! `EXAMPLE_FAIL_START` = `panic` | `error` | `hang` at build time makes `on_worker_start` panic,
//! return an error, or never return: a deliberately bad build. `EXAMPLE_START_DELAY_MS=N` makes
//! it take `N` ms (a slow start, to watch a rollout happen). `EXAMPLE_ERROR_PERCENT=N` (0 to
//! 100) makes `GET /` answer `500` to `N`% of a worker's requests to it, spread evenly (the
//! `k`th fails when `k * N / 100` steps up), not in bursts: a build that starts fine and then
//! does worse, for trying the canary analysis.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plugin_api::http;

use futures_util::{SinkExt as _, StreamExt as _};
use plugin_api::http::{StatusCode, header};
use plugin_api::metrics::{Counter, Gauge, Histogram};
use plugin_api::websocket::{self, Message};
use plugin_api::{
    Body, BodyExt as _, BoxError, Bytes, Cancellation, Dispatch, Plugin, Request, Response,
    WorkerContext,
};
use sha2::Digest as _;

/// Chunks produced by this worker's `/stream` responses.
static STREAM_PRODUCED: AtomicU64 = AtomicU64::new(0);
/// The most a `/upload` accepts: the limit a streaming route enforces for itself.
const UPLOAD_LIMIT: u64 = 8 << 30;

const GREETING: &str = match option_env!("EXAMPLE_GREETING") {
    Some(g) => g,
    None => "hello",
};
const FAIL_START: Option<&str> = option_env!("EXAMPLE_FAIL_START");
const START_DELAY_MS: Option<&str> = option_env!("EXAMPLE_START_DELAY_MS");
/// `EXAMPLE_ERROR_PERCENT`, clamped to 100; 0 when unset or not a number.
const ERROR_PERCENT: u64 = match option_env!("EXAMPLE_ERROR_PERCENT") {
    Some(p) => match u64::from_str_radix(p, 10) {
        Ok(p) if p <= 100 => p,
        Ok(_) => 100,
        Err(_) => 0,
    },
    None => 0,
};
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the example plugin accepts in `[plugin_config]`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed to validate it; `/config` shows the JSON as given
struct ExampleConfig {
    #[serde(default)]
    message: String,
    #[serde(default)]
    limit: u64,
}

/// The routes counted by name in `example_requests_total`; any other path counts as `other`.
const ROUTES: [&str; 21] = [
    "/",
    "/async/block",
    "/async/hello",
    "/async/panic",
    "/async/sleep",
    "/config",
    "/events",
    "/exit",
    "/leak",
    "/locked",
    "/panic",
    "/poison",
    "/series",
    "/sleep",
    "/spin",
    "/state",
    "/stream",
    "/stream/hello",
    "/stream/stats",
    "/upload",
    "/ws",
];

/// The plugin's metrics, registered once per worker.
struct Metrics {
    /// One counter per route in [`ROUTES`], then `other`.
    requests: Vec<Counter>,
    websockets: Gauge,
    slept: Histogram,
}

impl Metrics {
    fn register() -> Metrics {
        let help = "Requests the example plugin answered, by route";
        Metrics {
            requests: ROUTES
                .iter()
                .chain(&["other"])
                .map(|route| Counter::new("example_requests_total", help, &[("route", route)]))
                .collect(),
            websockets: Gauge::new("example_websockets_open", "Open WebSockets on /ws", &[]),
            slept: Histogram::new(
                "example_sleep_seconds",
                "Time /sleep and /async/sleep slept",
                &[],
                &[0.01, 0.1, 1.0, 10.0],
            ),
        }
    }

    fn count(&self, path: &str) {
        let i = ROUTES
            .iter()
            .position(|r| *r == path)
            .unwrap_or(ROUTES.len());
        self.requests[i].inc();
    }
}

/// Per-worker state, built in `on_worker_start`.
pub struct Example {
    metrics: Metrics,
    ctx: WorkerContext,
    served: AtomicU64,
    /// Requests to `/` this worker answered: which of them fail with `EXAMPLE_ERROR_PERCENT`.
    root_served: AtomicU64,
    /// Shared by every request of this worker: `/locked` counts under it, `/poison` poisons it.
    locked: Mutex<u64>,
    /// The bodies of `/` and `/async/hello`: fixed for the worker's life, so built once here
    /// and shared by every response (a `Bytes` clone) rather than formatted per request.
    hello: Bytes,
    hello_async: Bytes,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn query_param<'a, B>(req: &'a http::Request<B>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

impl Plugin for Example {
    fn on_worker_start(ctx: &WorkerContext) -> Result<Self, BoxError> {
        match FAIL_START {
            Some("panic") => panic!("EXAMPLE_FAIL_START=panic: refusing to start"),
            Some("error") => return Err("EXAMPLE_FAIL_START=error: refusing to start".into()),
            Some("hang") => loop {
                std::thread::park();
            },
            _ => {}
        }
        let _config: ExampleConfig = ctx.config()?;
        if let Some(ms) = START_DELAY_MS.and_then(|ms| ms.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        tracing::info!(
            greeting = GREETING,
            slot = ctx.slot,
            "example plugin started"
        );
        let who = format!(
            "pid {} generation {} slot {}\n",
            ctx.pid, ctx.generation, ctx.slot
        );
        Ok(Example {
            metrics: Metrics::register(),
            ctx: ctx.clone(),
            served: AtomicU64::new(0),
            root_served: AtomicU64::new(0),
            locked: Mutex::new(0),
            hello: Bytes::from(format!("{GREETING} from example-plugin {VERSION}\n{who}")),
            hello_async: Bytes::from(format!(
                "{GREETING} from example-plugin {VERSION} (async)\n{who}"
            )),
        })
    }

    fn handle(&self, req: Request) -> Response {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.count(req.uri().path());
        match req.uri().path() {
            "/" => {
                let k = self.root_served.fetch_add(1, Ordering::Relaxed) + 1;
                if k * ERROR_PERCENT / 100 > (k - 1) * ERROR_PERCENT / 100 {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("EXAMPLE_ERROR_PERCENT={ERROR_PERCENT}: failing\n"),
                    );
                }
                text(StatusCode::OK, self.hello.clone())
            }
            "/sleep" => match query_param(&req, "ms").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms <= 60_000 => {
                    // A sleep that ends when the client leaves: no one would read the answer.
                    if Cancellation::of(&req).wait(Duration::from_millis(ms)) {
                        return text(StatusCode::SERVICE_UNAVAILABLE, "cancelled\n");
                    }
                    self.metrics.slept.observe(ms as f64 / 1000.0);
                    text(StatusCode::OK, format!("slept {ms} ms\n"))
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "usage: /sleep?ms=N with N <= 60000\n",
                ),
            },
            "/panic" => panic!("/panic was requested"),
            "/series" => match query_param(&req, "n").map(str::parse::<u64>) {
                Some(Ok(n)) if n <= 1000 => {
                    let kept = (0..n)
                        .map(|i| Counter::new("example_series_total", "", &[("n", &i.to_string())]))
                        .filter(Counter::is_live)
                        .count();
                    text(StatusCode::OK, format!("kept {kept}\n"))
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "usage: /series?n=N with N <= 1000\n",
                ),
            },
            p if p.starts_with("/spin/cpu") => match query_param(&req, "ms").map(str::parse::<u64>)
            {
                Some(Ok(ms)) if ms <= 10_000 => {
                    spin_cpu(Duration::from_millis(ms));
                    text(StatusCode::OK, format!("spun {ms} ms of CPU\n"))
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "usage: /spin/cpu?ms=N with N <= 10000\n",
                ),
            },
            "/spin" => match query_param(&req, "ms").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms <= 3_600_000 => {
                    let until = Instant::now() + Duration::from_millis(ms);
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    text(StatusCode::OK, format!("spun {ms} ms\n"))
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "usage: /spin?ms=N with N <= 3600000\n",
                ),
            },
            "/exit" => std::process::exit(3),
            "/stream/stats" => text(
                StatusCode::OK,
                format!("produced {}\n", STREAM_PRODUCED.load(Ordering::Relaxed)),
            ),
            "/config" => {
                let mut resp = text(StatusCode::OK, format!("{}\n", self.ctx.config_json()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            "/state" => text(
                StatusCode::OK,
                format!(
                    "worker {} generation {} has served {n} requests\n",
                    self.ctx.pid, self.ctx.generation
                ),
            ),
            "/leak" => match query_param(&req, "mb").map(str::parse::<usize>) {
                Some(Ok(mb)) if mb <= 1024 => {
                    // Written (not just reserved), so every page is resident.
                    let leaked: &'static mut [u8] = vec![0xa5u8; mb << 20].leak();
                    text(
                        StatusCode::OK,
                        format!(
                            "leaked {mb} MiB at {:p} in worker {}\n",
                            leaked.as_ptr(),
                            self.ctx.pid
                        ),
                    )
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "usage: /leak?mb=N with N <= 1024\n",
                ),
            },
            "/poison" => {
                let _guard = self.locked.lock();
                panic!("/poison was requested: panicking while holding the shared Mutex");
            }
            "/locked" => match self.locked.lock() {
                Ok(mut count) => {
                    *count += 1;
                    text(
                        StatusCode::OK,
                        format!(
                            "worker {} counted {} requests under its Mutex\n",
                            self.ctx.pid, *count
                        ),
                    )
                }
                Err(_) => {
                    // Poisoned: the state behind it cannot be trusted, in this process, ever
                    // again. Ask for a fresh worker (the host keeps this one serving meanwhile).
                    let asked = self.ctx.restart_worker("the shared Mutex is poisoned");
                    tracing::error!(asked, "shared Mutex poisoned; asked for a new worker");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "worker {} has a poisoned Mutex; restart requested: {asked}\n",
                            self.ctx.pid
                        ),
                    )
                }
            },
            _ => text(
                StatusCode::NOT_FOUND,
                format!("no route for {}\n", req.uri().path()),
            ),
        }
    }

    fn dispatch(&self, _method: &str, path: &str) -> Dispatch {
        match path {
            // Only /sleep and /leak (which writes N MiB) are declared blocking; / and /state
            // answer in microseconds, /panic and /exit at once. /spin is declared non-blocking
            // on purpose (it is the handler that lies).
            "/sleep" | "/leak" => Dispatch::Blocking,
            "/async/hello" | "/async/sleep" | "/async/panic" | "/async/block" | "/stream"
            | "/stream/hello" | "/events" | "/upload" | "/ws" => Dispatch::Async,
            p if p.starts_with("/async/spin") => Dispatch::Async,
            _ => Dispatch::Inline,
        }
    }

    async fn serve(&self, mut req: http::Request<Body>) -> http::Response<Body> {
        self.metrics.count(req.uri().path());
        match req.uri().path() {
            "/async/hello" => async_text(StatusCode::OK, self.hello_async.clone()),
            "/async/sleep" => match query_param(&req, "ms").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms <= 60_000 => {
                    plugin_api::tokio::time::sleep(Duration::from_millis(ms)).await;
                    self.metrics.slept.observe(ms as f64 / 1000.0);
                    async_text(StatusCode::OK, format!("slept {ms}\n"))
                }
                _ => async_text(
                    StatusCode::BAD_REQUEST,
                    "usage: /async/sleep?ms=N with N <= 60000\n",
                ),
            },
            "/async/block" => match query_param(&req, "ms").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms <= 10_000 => {
                    std::thread::sleep(Duration::from_millis(ms));
                    async_text(StatusCode::OK, format!("blocked {ms}\n"))
                }
                _ => async_text(
                    StatusCode::BAD_REQUEST,
                    "usage: /async/block?ms=N with N <= 10000\n",
                ),
            },
            p if p.starts_with("/async/spin") => {
                match query_param(&req, "ms").map(str::parse::<u64>) {
                    Some(Ok(ms)) if ms <= 10_000 => {
                        spin_cpu(Duration::from_millis(ms));
                        async_text(StatusCode::OK, format!("spun {ms}\n"))
                    }
                    _ => async_text(
                        StatusCode::BAD_REQUEST,
                        "usage: /async/spin?ms=N with N <= 10000\n",
                    ),
                }
            }
            "/async/panic" => {
                plugin_api::tokio::task::yield_now().await;
                panic!("/async/panic was requested")
            }
            "/stream" => self.stream(&req),
            "/stream/hello" => {
                let chunk = Ok::<_, std::convert::Infallible>(self.hello_async.clone());
                async_text(
                    StatusCode::OK,
                    Body::from_stream(futures_util::stream::iter([chunk])),
                )
            }
            "/events" => self.events(),
            "/upload" => upload(req.into_body()).await,
            "/ws" => {
                let (ctx, generation) = (self.ctx.clone(), self.ctx.generation);
                let open = self.metrics.websockets;
                websocket::upgrade(&mut req, move |socket| async move {
                    open.add(1);
                    echo(socket, ctx, generation).await;
                    open.add(-1);
                })
            }
            other => async_text(StatusCode::NOT_FOUND, format!("no route for {other}\n")),
        }
    }

    fn on_worker_stop(self) {
        tracing::info!(
            served = self.served.load(Ordering::Relaxed),
            "example plugin stopping"
        );
    }
}

/// Busy-loops until the calling thread has run `cpu` on a CPU.
fn spin_cpu(cpu: Duration) {
    use nix::time::{ClockId, clock_gettime};
    let now = || {
        clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map(Duration::from)
            .unwrap_or_default()
    };
    let end = now() + cpu;
    while now() < end {
        std::hint::spin_loop();
    }
}

fn async_text(status: StatusCode, body: impl Into<Body>) -> http::Response<Body> {
    let body: Body = body.into();
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Example {
    /// `/stream`: lines produced one by one, each sent as it comes.
    fn stream(&self, req: &http::Request<Body>) -> http::Response<Body> {
        let num = |key, default| {
            query_param(req, key)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(default)
        };
        let (chunks, every, size) = (num("chunks", 10), num("every_ms", 100), num("size", 0));
        let fail_at = num("fail_at", u64::MAX);
        if every > 60_000 || size > (1 << 20) {
            return async_text(
                StatusCode::BAD_REQUEST,
                "usage: /stream?chunks=N&every_ms=M&size=S with M <= 60000, S <= 1048576\n",
            );
        }
        let lines = futures_util::stream::unfold(0u64, move |i| async move {
            if i >= chunks {
                return None;
            }
            if i > 0 && every > 0 {
                plugin_api::tokio::time::sleep(Duration::from_millis(every)).await;
            }
            if i == fail_at {
                panic!("/stream was asked to fail at chunk {i}");
            }
            STREAM_PRODUCED.fetch_add(1, Ordering::Relaxed);
            let mut line = format!("chunk {i}\n").into_bytes();
            if line.len() < size as usize {
                line.resize(size as usize - 1, b'.');
                line.push(b'\n');
            }
            Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), i + 1))
        });
        let mut resp = http::Response::new(Body::from_stream(lines));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }

    /// `/events`: server-sent events until the worker drains.
    fn events(&self) -> http::Response<Body> {
        let (ctx, label) = (
            self.ctx.clone(),
            format!("gen={} pid={}", self.ctx.generation, self.ctx.pid),
        );
        let events = futures_util::stream::unfold(0u64, move |id| {
            let (ctx, label) = (ctx.clone(), label.clone());
            async move {
                if id > 0 {
                    plugin_api::tokio::select! {
                        _ = plugin_api::tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = ctx.draining() => return None,
                    }
                }
                if ctx.is_draining() {
                    return None;
                }
                let event = format!("id: {id}\ndata: {label}\n\n");
                Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(event)),
                    id + 1,
                ))
            }
        });
        let mut resp = http::Response::new(Body::from_stream(events));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        resp
    }
}

/// `/upload`: hashes the body as it streams in, never holding more than one chunk.
async fn upload(mut body: Body) -> http::Response<Body> {
    let (mut hasher, mut bytes) = (sha2::Sha256::new(), 0u64);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    bytes += data.len() as u64;
                    if bytes > UPLOAD_LIMIT {
                        return async_text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("upload exceeds {UPLOAD_LIMIT} bytes\n"),
                        );
                    }
                    hasher.update(data);
                }
            }
            Err(e) => {
                return async_text(StatusCode::BAD_REQUEST, format!("upload failed: {e}\n"));
            }
        }
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    async_text(StatusCode::OK, format!("bytes={bytes} sha256={hex}\n"))
}

/// `/ws`: echoes text messages as `gen=G MESSAGE`; closes with 1012 when the worker drains.
async fn echo(mut socket: websocket::WebSocket, ctx: WorkerContext, generation: u64) {
    loop {
        plugin_api::tokio::select! {
            msg = socket.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let reply = format!("gen={generation} {text}");
                    if socket.send(Message::Text(reply.into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            _ = ctx.draining() => {
                let _ = socket.send(websocket::close_for_restart()).await;
                // Wait (briefly) for the client's Close, as the protocol asks.
                let _ = plugin_api::tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(m)) = socket.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                })
                .await;
                return;
            }
        }
    }
}

plugin_api::export_plugin!(Example);
