//! The example plugin: what a handler `.so` shipped to the host looks like.
//!
//! Routes:
//! - `GET /`: `200`, first line `<greeting> from example-plugin <version>`; the greeting is
//!   compiled in from `EXAMPLE_GREETING` (default `hello`), so
//!   `EXAMPLE_GREETING=v2 cargo build -p example-plugin` makes a visibly new build.
//! - `GET /sleep?ms=N`: blocks its thread for `N` ms (at most 60 s), then answers.
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
//! - `GET /exit`: ends the worker process (`std::process::exit(3)`): a request-triggered crash.
//! - `GET /config`: the plugin's `[plugin_config]` as JSON. It accepts the keys `message`
//!   (a string) and `limit` (an integer); any other key makes `on_worker_start` refuse the
//!   configuration, so a reload with it is refused with that reason.
//!
//! `EXAMPLE_FAIL_START` = `panic` | `error` | `hang` at build time makes `on_worker_start` panic,
//! return an error, or never return: a deliberately bad build. `EXAMPLE_START_DELAY_MS=N` makes
//! it take `N` ms (a slow start, to watch a rollout happen).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plugin_api::http::{StatusCode, header};
use plugin_api::{BoxError, Bytes, Plugin, Request, Response, WorkerContext};

const GREETING: &str = match option_env!("EXAMPLE_GREETING") {
    Some(g) => g,
    None => "hello",
};
const FAIL_START: Option<&str> = option_env!("EXAMPLE_FAIL_START");
const START_DELAY_MS: Option<&str> = option_env!("EXAMPLE_START_DELAY_MS");
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

/// Per-worker state, built in `on_worker_start`.
pub struct Example {
    ctx: WorkerContext,
    served: AtomicU64,
    /// Shared by every request of this worker: `/locked` counts under it, `/poison` poisons it.
    locked: Mutex<u64>,
}

fn text(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Bytes::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn query_param<'a>(req: &'a Request, key: &str) -> Option<&'a str> {
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
        Ok(Example {
            ctx: ctx.clone(),
            served: AtomicU64::new(0),
            locked: Mutex::new(0),
        })
    }

    fn handle(&self, req: Request) -> Response {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        match req.uri().path() {
            "/" => text(
                StatusCode::OK,
                format!(
                    "{GREETING} from example-plugin {VERSION}\npid {} generation {} slot {}\n",
                    self.ctx.pid, self.ctx.generation, self.ctx.slot
                ),
            ),
            "/sleep" => match query_param(&req, "ms").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms <= 60_000 => {
                    std::thread::sleep(Duration::from_millis(ms));
                    text(StatusCode::OK, format!("slept {ms} ms\n"))
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "usage: /sleep?ms=N with N <= 60000\n".into(),
                ),
            },
            "/panic" => panic!("/panic was requested"),
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
                    "usage: /spin?ms=N with N <= 3600000\n".into(),
                ),
            },
            "/exit" => std::process::exit(3),
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
                    "usage: /leak?mb=N with N <= 1024\n".into(),
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

    fn may_block(&self, _method: &str, path: &str) -> bool {
        // Only /sleep and /leak (which writes N MiB) are declared blocking; / and /state answer
        // in microseconds, /panic and /exit at once. /spin is declared non-blocking on purpose
        // (it is the handler that lies).
        path == "/sleep" || path == "/leak"
    }

    fn on_worker_stop(self) {
        tracing::info!(
            served = self.served.load(Ordering::Relaxed),
            "example plugin stopping"
        );
    }
}

plugin_api::export_plugin!(Example);
