//! The axum example plugin: an `axum::Router` exported with `plugin_api::export_axum!`.
//!
//! `build` runs once in each new worker (its `on_worker_start`) and gives the router its
//! [`App`] state. Routes:
//! - `GET /`: `hello from example-axum <version>`, then `pid P generation G slot S`.
//! - `GET /users/{id}?verbose=true`: `Path` and `Query` extractors, a JSON answer (`Json`); a
//!   non-numeric id is axum's `400`.
//! - `POST /echo`: `{"message": "..."}` in (`Json`), `{"message", "length", "generation"}` out;
//!   a body that is not such JSON gets axum's rejection (`400`, `415` or `422`).
//! - `GET /state`: `State`: this worker's count of `/state` requests, as JSON.
//! - `GET /events`: server-sent events (axum's `Sse`), one every 100 ms with an increasing `id`
//!   and `data: gen=G pid=P`; the stream ends when the worker drains.
//! - `GET /ws`: WebSocket (`plugin_api::axum::WebSocketUpgrade`); echoes each text message as
//!   `gen=G MESSAGE`, and sends Close 1012 (Service Restart) when its worker drains.
//! - `GET /config`: the plugin's `[plugin_config]` as JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::response::sse::{Event, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt as _, Stream, StreamExt as _};
use plugin_api::axum::WebSocketUpgrade;
use plugin_api::tokio;
use plugin_api::websocket::{self, Message};
use plugin_api::{BoxError, WorkerContext};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The router's state, one per worker: cloned into every request, so the shared parts are
/// behind `Arc`s.
#[derive(Clone)]
pub struct App {
    ctx: WorkerContext,
    /// `/state` requests this worker served.
    hits: Arc<AtomicU64>,
    /// `[plugin_config]`, checked to be JSON in `build`.
    config: Arc<Value>,
}

/// Builds the router in each new worker; an error refuses the build.
pub fn build(ctx: &WorkerContext) -> Result<Router, BoxError> {
    let config: Value = ctx.config()?;
    tracing::info!(slot = ctx.slot, "example-axum started");
    let app = App {
        ctx: ctx.clone(),
        hits: Arc::new(AtomicU64::new(0)),
        config: Arc::new(config),
    };
    Ok(Router::new()
        .route("/", get(hello))
        .route("/users/{id}", get(user))
        .route("/echo", post(echo))
        .route("/state", get(state))
        .route("/events", get(events))
        .route("/ws", get(ws))
        .route("/config", get(config_json))
        .with_state(app))
}

plugin_api::export_axum!(build);

async fn hello(State(app): State<App>) -> String {
    let ctx = &app.ctx;
    format!(
        "hello from example-axum {VERSION}\npid {} generation {} slot {}\n",
        ctx.pid, ctx.generation, ctx.slot
    )
}

#[derive(Deserialize)]
struct UserQuery {
    #[serde(default)]
    verbose: bool,
}

async fn user(
    State(app): State<App>,
    Path(id): Path<u64>,
    Query(q): Query<UserQuery>,
) -> Json<Value> {
    let mut user = json!({ "id": id, "name": format!("user {id}") });
    if q.verbose {
        user["generation"] = app.ctx.generation.into();
        user["pid"] = app.ctx.pid.into();
    }
    Json(user)
}

#[derive(Deserialize)]
struct EchoIn {
    message: String,
}

#[derive(Serialize)]
struct EchoOut {
    message: String,
    length: usize,
    generation: u64,
}

async fn echo(State(app): State<App>, Json(input): Json<EchoIn>) -> Json<EchoOut> {
    Json(EchoOut {
        length: input.message.chars().count(),
        message: input.message,
        generation: app.ctx.generation,
    })
}

async fn state(State(app): State<App>) -> Json<Value> {
    let hits = app.hits.fetch_add(1, Ordering::Relaxed) + 1;
    Json(json!({ "hits": hits, "pid": app.ctx.pid, "generation": app.ctx.generation }))
}

async fn config_json(State(app): State<App>) -> Json<Value> {
    Json(Value::clone(&app.config))
}

/// `/events`: one event every 100 ms until the worker drains.
async fn events(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let label = format!("gen={} pid={}", app.ctx.generation, app.ctx.pid);
    let events = futures_util::stream::unfold(0u64, move |id| {
        let (ctx, label) = (app.ctx.clone(), label.clone());
        async move {
            if id > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = ctx.draining() => return None,
                }
            }
            if ctx.is_draining() {
                return None;
            }
            let event = Event::default().id(id.to_string()).data(label);
            Some((Ok(event), id + 1))
        }
    });
    Sse::new(events)
}

/// `/ws`: the handshake, then [`echo_socket`].
async fn ws(State(app): State<App>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| echo_socket(socket, app.ctx))
}

/// Echoes text messages as `gen=G MESSAGE`; closes with 1012 when the worker drains.
async fn echo_socket(mut socket: websocket::WebSocket, ctx: WorkerContext) {
    loop {
        tokio::select! {
            msg = socket.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let reply = format!("gen={} {text}", ctx.generation);
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
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
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
