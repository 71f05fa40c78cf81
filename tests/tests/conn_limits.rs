//! Connection bounds against the real host and the example plugin, each an attack from issue 18
//! scaled down: idle HTTP/2 connections closed at `keepalive_timeout`, `max_connections` per
//! worker, a client that never reads (HTTP/2 with a 2^31 window, and HTTP/1) held to its buffer
//! caps and closed at `send_timeout`, a WebSocket message never finished refused with 1009, and
//! the worker memory an idle WebSocket costs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use host_status::WorkerStateName;
use tests::{Host, HostOptions, example_plugin, get};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A host of the example plugin with `workers` workers, `/metrics` on an admin port, and
/// `extra` config lines.
async fn host(workers: usize, extra: &str) -> (Host, SocketAddr) {
    host_of(&example_plugin(&[]), workers, extra).await
}

async fn host_of(plugin: &std::path::Path, workers: usize, extra: &str) -> (Host, SocketAddr) {
    let host = Host::start(
        plugin,
        HostOptions {
            workers,
            extra: format!("admin_listen = \"127.0.0.1:0\"\n{extra}"),
            ..Default::default()
        },
    )
    .await;
    let status = host
        .wait_status("every worker ready", |s| {
            s.workers.len() == workers
                && s.workers.iter().all(|w| w.state == WorkerStateName::Ready)
        })
        .await;
    let admin = tests::prom::admin_addr(&status);
    (host, admin)
}

/// Open connections per worker, as `status` reports them.
async fn connections(host: &Host) -> Vec<u64> {
    host.status()
        .await
        .workers
        .iter()
        .map(|w| w.connections)
        .collect()
}

/// One GET `path` over HTTP/2 on a new connection; returns the connection task, still running
/// (it returns when the connection ends), and the client handle that keeps it open.
async fn h2_one_request(
    addr: SocketAddr,
    path: &str,
) -> (
    tokio::task::JoinHandle<Instant>,
    h2::client::SendRequest<Bytes>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    (task, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_get_goaway_at_keepalive_timeout() {
    // The attack: HTTP/2 connections that sent one request and then nothing, held for ever
    // (they were exempt from header_read_timeout). Scaled down: 20 of them, a 2 s timeout.
    let (host, _admin) = host(1, "keepalive_timeout = \"2s\"").await;
    let mut conns = Vec::new();
    for _ in 0..20 {
        let (conn, client) = h2_one_request(host.addr, "/").await;
        conns.push((conn, client, Instant::now()));
    }
    // All of them, with GOAWAY (the h2 client's connection ends cleanly), well before the old
    // "never", and none before the timeout.
    let (mut shortest, mut longest) = (Duration::MAX, Duration::ZERO);
    for (conn, _client, idle_from) in conns {
        let ended = tokio::time::timeout(Duration::from_secs(15), conn)
            .await
            .expect("an idle HTTP/2 connection still open 15 s after keepalive_timeout (2 s)")
            .unwrap();
        let idle = ended.duration_since(idle_from);
        (shortest, longest) = (shortest.min(idle), longest.max(idle));
    }
    eprintln!("20 idle HTTP/2 connections closed after {shortest:?} to {longest:?} idle");
    // (The response's last frame may reach the client a little after the server counted the
    // stream done: a margin for a loaded machine.)
    assert!(shortest >= Duration::from_millis(1500), "{shortest:?}");
    assert_eq!(connections(&host).await, [0]);
    assert!(host.limit_hits("idle_timeout").await >= 20);
    // A connection in use is not idle: a stream open for longer than the timeout is served.
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        h2_one_request(host.addr, "/async/sleep?ms=3000"),
    )
    .await
    .expect("a 3 s request over HTTP/2 answered");
    drop(reply);
}

/// A keep-alive HTTP/1 connection that has sent one request and read its answer.
async fn keep_alive(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_head(&mut s).await;
    s
}

/// Reads one small response (head and body) from `s`.
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = vec![0; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(n > 0, "connection closed");
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_stops_accepting_and_a_client_is_served_once_one_closes() {
    // The attack: connections piled up until the workers ran out of fds, and every client
    // failed. Scaled down: 2 workers of at most 10 connections, 30 clients.
    let (host, _admin) = host(
        2,
        "max_connections = 10\nheader_read_timeout = \"60s\"\naccept_balance = false",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(keep_alive(host.addr).await);
    }
    host.wait_status("both workers holding 10 connections", |s| {
        s.workers.iter().all(|w| w.connections == 10)
    })
    .await;
    // More clients: accepted by the kernel into the backlog, not by a worker.
    let mut waiting = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(host.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        waiting.push(s);
    }
    let mut buf = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(1500), waiting[0].peek(&mut buf)).await;
    assert!(early.is_err(), "a worker over max_connections answered");
    assert!(connections(&host).await.iter().all(|&n| n <= 10));
    assert!(host.limit_hits("max_connections").await >= 2);
    assert!(
        host.log().contains("holding max_connections"),
        "{}",
        host.log()
    );
    // Clients that leave make room: every waiting client is served, none over the limit.
    held.truncate(10);
    for s in &mut waiting {
        tokio::time::timeout(Duration::from_secs(15), read_head(s))
            .await
            .expect("a waiting client served once others closed");
    }
    assert!(connections(&host).await.iter().all(|&n| n <= 10));
}

/// Opens an HTTP/2 connection advertising a 2^31 window, opens up to `streams` streams on
/// `path`, reads a little while it opens them, and then never again: returns what must stay
/// alive (and unpolled) for the connection to stay unread.
async fn h2_never_reading(addr: SocketAddr, path: &str, streams: usize) -> impl Send {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let mut conn = Box::pin(conn);
    let mut responses = Vec::new();
    let open = async {
        let mut client = client;
        for _ in 0..streams {
            client = client.ready().await.unwrap();
            let req = http::Request::get(format!("http://{addr}{path}"))
                .body(())
                .unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            responses.push(resp);
        }
        client
    };
    // The server allows fewer streams than asked: opening stops at its limit.
    let client = tokio::select! {
        _ = conn.as_mut() => panic!("connection ended while opening streams"),
        opened = tokio::time::timeout(Duration::from_secs(1), open) => opened.ok(),
    };
    // Send them, and read for a moment, as the attack did: the responses are flowing.
    let read_a_little = tokio::time::timeout(Duration::from_millis(500), conn.as_mut()).await;
    assert!(read_a_little.is_err(), "connection ended while reading");
    (conn, client, responses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_never_reads_is_bounded_and_closed_at_send_timeout() {
    // The attack: a 2^31 window, 200 streams on a streaming route, nothing read: ~107 MB per
    // connection, for ever. Scaled down: 10 such connections, send_timeout 4 s.
    let (host, _admin) = host(1, "send_timeout = \"4s\"").await;
    let pid = host.wait_for_workers(WorkerStateName::Ready).await[0];
    let path = "/stream?chunks=1000000&every_ms=0&size=16384";
    // Warm the allocator and the plugin's runtime with one read stream.
    let reply = get(host.addr, "/stream?chunks=10&every_ms=0&size=16384")
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let before = rss_kib(pid);
    let mut attackers = Vec::new();
    for _ in 0..10 {
        attackers.push(h2_never_reading(host.addr, path, 200).await);
    }
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Every connection is closed by the server (its write stalled for send_timeout)...
    loop {
        peak = peak.max(rss_kib(pid));
        if connections(&host).await == [0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never-reading HTTP/2 connections still open 30 s in (send_timeout 4 s): {:?}",
            connections(&host).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grew_mib = peak.saturating_sub(before) / 1024;
    eprintln!("10 never-reading HTTP/2 connections: worker RSS {before} KiB, peak +{grew_mib} MiB");
    // ...and held far less than the 1.1 GB they held unbounded (128 streams x 32 KiB each, a
    // chunk each in flight, and h2's bookkeeping: ~6 MiB a connection).
    assert!(grew_mib < 200, "worker RSS grew by {grew_mib} MiB");
    assert!(host.limit_hits("send_timeout").await >= 10);
    drop(attackers);
    // The worker still serves.
    assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_grants_no_window_is_closed_at_send_timeout() {
    // The same attack with the socket read but no flow-control window granted (no
    // WINDOW_UPDATE): nothing waits to be written, so only the responses' lack of progress
    // shows it. The client answers pings, so only send_timeout can end it.
    let (host, _admin) = host(1, "send_timeout = \"3s\"").await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let tcp = TcpStream::connect(host.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
            Instant::now()
        });
        let mut client = client.ready().await.unwrap();
        let mut responses = Vec::new();
        for _ in 0..50 {
            client = client.ready().await.unwrap();
            let req = http::Request::get(format!(
                "http://{}/stream?chunks=1000000&every_ms=0&size=16384",
                host.addr
            ))
            .body(())
            .unwrap();
            // Kept, never read: its data is never released, so no WINDOW_UPDATE is sent.
            responses.push(client.send_request(req, true).unwrap().0);
        }
        clients.push((conn, client, responses));
    }
    host.wait_status("the worker to hold the 5 connections", |s| {
        s.workers[0].connections == 5
    })
    .await;
    let began = Instant::now();
    for (conn, _client, _responses) in clients {
        tokio::time::timeout(Duration::from_secs(30), conn)
            .await
            .expect("a connection granting no window still open 30 s in (send_timeout 3 s)")
            .unwrap();
    }
    eprintln!(
        "5 HTTP/2 connections granting no window closed within {:?}",
        began.elapsed()
    );
    assert!(host.limit_hits("send_timeout").await >= 5);
    assert_eq!(connections(&host).await, [0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_never_reads_a_stream_is_closed_at_send_timeout() {
    let (host, _admin) = host(1, "send_timeout = \"3s\"").await;
    let mut s = TcpStream::connect(host.addr).await.unwrap();
    s.write_all(b"GET /stream?chunks=1000000&every_ms=0&size=16384 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let began = Instant::now();
    host.wait_status("the worker to hold the connection", |s| {
        s.workers[0].connections == 1
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while connections(&host).await != [0] {
        assert!(
            Instant::now() < deadline,
            "a never-reading HTTP/1 client still connected 30 s in (send_timeout 3 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(began.elapsed() >= Duration::from_secs(3));
    assert_eq!(host.limit_hits("send_timeout").await, 1);
    drop(s);
}

/// Sends a binary message in `fragment`-byte frames, never the last one, up to `total` bytes,
/// until the server answers (its Close is read before more is sent, so the reset of a closed
/// connection cannot take it away) or stops taking them. Returns the server's message, if any.
async fn unfinished_message(
    ws: &mut tests::Ws,
    fragment: usize,
    total: usize,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    let mut sent = 0;
    while sent < total {
        if let Ok(answer) = tokio::time::timeout(Duration::from_millis(5), ws.next()).await {
            return answer;
        }
        let opcode = if sent == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::from_payload(
            FrameHeader {
                is_final: false,
                opcode,
                ..FrameHeader::default()
            },
            Bytes::from(vec![b'x'; fragment]),
        );
        if ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
        sent += fragment;
    }
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the server's answer within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_never_finished_gets_1009_and_memory_stays_bounded() {
    never_finished_message(&example_plugin(&[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_never_finished_through_axum_gets_1009() {
    never_finished_message(&tests::axum_plugin()).await;
}

/// `plugin` serves `/ws`, an echo answering `gen=1 TEXT`.
async fn never_finished_message(plugin: &std::path::Path) {
    // The attack: a fragmented 60 MiB message never finished held ~61 MiB per connection.
    // Scaled down: 10 connections sending 8 MiB each (the default message limit is 1 MiB).
    let (host, _admin) = host_of(plugin, 1, "").await;
    let pid = host.wait_for_workers(WorkerStateName::Ready).await[0];
    let mut warm = tests::ws_connect(host.addr).await;
    assert_eq!(tests::ws_echo(&mut warm, "hi").await, "gen=1 hi");
    let before = rss_kib(pid);
    let mut peak = 0;
    for _ in 0..10 {
        let mut ws = tests::ws_connect(host.addr).await;
        let answer = unfinished_message(&mut ws, 128 << 10, 8 << 20).await;
        peak = peak.max(rss_kib(pid));
        match answer {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
            other => panic!("expected Close 1009, got {other:?}"),
        }
    }
    peak = peak.max(rss_kib(pid));
    let grew_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "10 unfinished 8 MiB WebSocket messages ({}): worker RSS peak +{grew_mib} MiB",
        plugin.display()
    );
    assert!(grew_mib < 40, "worker RSS grew by {grew_mib} MiB");
    tests::wait_until(Duration::from_secs(10), "the refusal in the log", || {
        host.log()
            .contains("refused a WebSocket message over its limit with Close 1009")
    })
    .await;
    // Messages under the limit still pass.
    let big = "y".repeat(512 << 10);
    warm.send(Message::Text(big.clone().into())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), warm.next()).await {
        Ok(Some(Ok(Message::Text(reply)))) => assert_eq!(reply.len(), big.len() + 6),
        other => panic!("expected the echo of a 512 KiB message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_costs_little_worker_memory() {
    idle_websockets(&example_plugin(&[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_through_axum_costs_little_worker_memory() {
    idle_websockets(&tests::axum_plugin()).await;
}

/// `plugin` serves `/ws`, an echo answering `gen=1 TEXT`.
async fn idle_websockets(plugin: &std::path::Path) {
    // Measured: 138 KiB of worker RSS per idle WebSocket with tungstenite's 128 KiB read
    // buffer. Here: 500 idle sockets, each having exchanged one message.
    const N: usize = 500;
    let (host, _admin) = host_of(plugin, 1, "").await;
    let pid = host.wait_for_workers(WorkerStateName::Ready).await[0];
    let mut sockets = Vec::new();
    for i in 0..50 {
        let mut ws = tests::ws_connect(host.addr).await;
        assert_eq!(tests::ws_echo(&mut ws, "warm").await, "gen=1 warm", "{i}");
        sockets.push(ws);
    }
    let before = rss_kib(pid);
    for _ in 0..N {
        let mut ws = tests::ws_connect(host.addr).await;
        assert_eq!(tests::ws_echo(&mut ws, "hi").await, "gen=1 hi");
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let per_kib = rss_kib(pid).saturating_sub(before) as f64 / N as f64;
    eprintln!(
        "idle WebSocket ({}): {per_kib:.1} KiB of worker RSS each ({N} sockets, debug build)",
        plugin.display()
    );
    assert!(per_kib < 32.0, "{per_kib:.1} KiB per idle WebSocket");
    // They are all alive.
    let last = sockets.last_mut().unwrap();
    assert_eq!(tests::ws_echo(last, "still").await, "gen=1 still");
}
