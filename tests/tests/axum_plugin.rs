//! The axum example plugin (`example-axum`, an `axum::Router` exported with
//! `plugin_api::export_axum!`) in the real host: its extractors and state, reloads under load
//! with no failed request, and server-sent events and a WebSocket across a reload.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use host_status::WorkerStateName;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tests::{Host, HostOptions, Load, Mode, axum_plugin, get, pid_alive, wait_until};
use tokio::net::TcpStream;

async fn axum_host(workers: usize) -> Host {
    Host::start(
        &axum_plugin(),
        HostOptions {
            workers,
            ..Default::default()
        },
    )
    .await
}

/// One answer, with its headers.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// One request on a new HTTP/1.1 connection.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "t");
    if let Some(ct) = content_type {
        req = req.header(http::header::CONTENT_TYPE, ct);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let answer = request(addr, "GET", path, None, "").await;
    assert_eq!(answer.status, 200, "GET {path}: {answer:?}");
    assert_eq!(
        answer.headers[http::header::CONTENT_TYPE],
        "application/json"
    );
    answer.json()
}

#[tokio::test]
async fn every_route_answers_through_the_router_with_its_extractors() {
    let host = axum_host(1).await;
    let pid = host.wait_for_workers(WorkerStateName::Ready).await[0];

    // `/`: `State`, and a whole body sent with its length, not chunked.
    let hello = request(host.addr, "GET", "/", None, "").await;
    assert_eq!(hello.status, 200);
    assert_eq!(
        hello.body,
        format!("hello from example-axum 0.1.0\npid {pid} generation 1 slot 0\n")
    );
    assert_eq!(
        hello.headers[http::header::CONTENT_LENGTH],
        hello.body.len().to_string().as_str()
    );
    assert_eq!(
        hello.headers[http::header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );

    // `Path` and `Query`.
    assert_eq!(
        get_json(host.addr, "/users/42?verbose=true").await,
        json!({ "id": 42, "name": "user 42", "generation": 1, "pid": pid })
    );
    assert_eq!(
        get_json(host.addr, "/users/7").await,
        json!({ "id": 7, "name": "user 7" })
    );
    assert_eq!(
        request(host.addr, "GET", "/users/abc", None, "")
            .await
            .status,
        400
    );
    assert_eq!(
        request(host.addr, "GET", "/users/1?verbose=maybe", None, "")
            .await
            .status,
        400
    );

    // `Json` in and out, and axum's rejections of what is not the expected JSON.
    let echoed = request(
        host.addr,
        "POST",
        "/echo",
        Some("application/json"),
        r#"{"message":"héllo axum"}"#,
    )
    .await;
    assert_eq!(echoed.status, 200, "{echoed:?}");
    assert_eq!(
        echoed.json(),
        json!({ "message": "héllo axum", "length": 10, "generation": 1 })
    );
    let no_type = request(host.addr, "POST", "/echo", None, r#"{"message":"x"}"#).await;
    assert_eq!(no_type.status, 415, "{no_type:?}");
    let broken = request(host.addr, "POST", "/echo", Some("application/json"), "{").await;
    assert_eq!(broken.status, 400, "{broken:?}");
    let wrong = request(
        host.addr,
        "POST",
        "/echo",
        Some("application/json"),
        r#"{"msg":1}"#,
    )
    .await;
    assert_eq!(wrong.status, 422, "{wrong:?}");
    assert_eq!(
        request(host.addr, "GET", "/echo", None, "").await.status,
        405
    );

    // `State` shared by the worker's requests.
    let first = get_json(host.addr, "/state").await;
    let second = get_json(host.addr, "/state").await;
    assert_eq!(first, json!({ "hits": 1, "pid": pid, "generation": 1 }));
    assert_eq!(second["hits"], 2);

    // `[plugin_config]` (none in this host's file: `{}`).
    assert_eq!(get_json(host.addr, "/config").await, json!({}));

    assert_eq!(
        request(host.addr, "GET", "/nope", None, "").await.status,
        404
    );
    // Built-in routes stay the host's.
    assert_eq!(get(host.addr, "/_host/health").await.unwrap().status, 200);
    assert_eq!(
        host.wait_for_workers(WorkerStateName::Ready).await,
        vec![pid]
    );
}

/// 8 clients on `/` through three reloads; the new generation serves after each.
async fn reloads_under_load(mode: Mode) {
    let host = axum_host(2).await;
    let load = Load::start(host.addr, 8, mode, "/");
    load.advance(200).await;
    for generation in 2..=4 {
        let old = host.worker_pids(Some(WorkerStateName::Ready)).await;
        host.reload_ok().await;
        let reply = get(host.addr, "/").await.unwrap();
        assert!(
            reply.body.contains(&format!("generation {generation} ")),
            "after reload {generation}: {reply:?}"
        );
        load.advance(200).await;
        tests::wait_old_workers_gone(&old).await;
    }
    let report = load.finish().await;
    eprintln!("{mode:?}: {}", report.summary());
    report.assert_clean();
    assert!(
        report.ok >= 800,
        "too few requests to mean anything: {report:?}"
    );
    assert_eq!(
        report.first_lines.keys().collect::<Vec<_>>(),
        ["hello from example-axum 0.1.0"]
    );
    assert_eq!(host.status().await.generation, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_keep_alive_load_fail_nothing() {
    reloads_under_load(Mode::KeepAlive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_close_load_fail_nothing() {
    reloads_under_load(Mode::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_http2_load_fail_nothing() {
    reloads_under_load(Mode::H2).await;
}

fn has_line(event: &str, line: &str) -> bool {
    event.lines().any(|l| l == line)
}

#[tokio::test]
async fn sse_events_end_on_reload_and_resume_on_the_new_generation() {
    let host = axum_host(1).await;
    let old_pid = host.wait_for_workers(WorkerStateName::Ready).await[0];
    let mut events = tests::Events::open(host.addr).await;
    let first = events.next().await.unwrap();
    assert!(has_line(&first, "id: 0"), "{first:?}");
    assert!(
        has_line(&first, &format!("data: gen=1 pid={old_pid}")),
        "{first:?}"
    );
    let second = events.next().await.unwrap();
    assert!(has_line(&second, "id: 1"), "{second:?}");

    host.reload_ok().await;
    // The old worker drains: its stream ends cleanly (not an error), soon.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(event) = events.next().await {
        assert!(event.contains("data: gen=1 "), "{event:?}");
        assert!(Instant::now() < deadline, "the event stream did not end");
    }
    let mut events = tests::Events::open(host.addr).await;
    let resumed = events.next().await.unwrap();
    assert!(has_line(&resumed, "id: 0"), "{resumed:?}");
    assert!(resumed.contains("data: gen=2 pid="), "{resumed:?}");
    // Nothing else holds the old worker: it exits well before graceful_timeout (10 s).
    wait_until(Duration::from_secs(8), "the old worker to exit", || {
        !pid_alive(old_pid)
    })
    .await;
}

#[tokio::test]
async fn websocket_echoes_closes_with_1012_on_reload_and_reconnects_to_the_new_generation() {
    let host = axum_host(1).await;
    let old_pid = host.wait_for_workers(WorkerStateName::Ready).await[0];
    // Not a handshake: the extractor's 400.
    assert_eq!(request(host.addr, "GET", "/ws", None, "").await.status, 400);
    tests::ws_across_reload(&host, old_pid).await;
}
