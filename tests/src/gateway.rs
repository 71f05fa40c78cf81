//! Hosts with a gateway (`tests/tests/gateway.rs`): a plugin group `app` (the example plugin,
//! the host's `plugin.so`) and a gateway group `gw` in front of it; WebSocket clients of the
//! gateway, including a raw one that completes the upgrade and then neither reads nor answers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::{Host, HostOptions, Ws, example_plugin};

/// Starts a host with the groups `app` (one worker of the example plugin) and `gw` (one gateway
/// process, `business = "app"`), `gw` being written into the gateway's table; `/metrics` on
/// a port the kernel picks.
pub async fn gateway_host(gw: &str) -> Host {
    gateway_host_with(&example_plugin(&[]), 1, gw).await
}

/// As [`gateway_host`], with `plugin` in `app` (`workers` of them): a plugin that handles
/// gateway events links its workers to `gw`.
pub async fn gateway_host_with(plugin: &std::path::Path, workers: u32, gw: &str) -> Host {
    gateway_host_keys(plugin, workers, "", gw).await
}

/// As [`gateway_host_with`], with `app` written into the business group's table too.
pub async fn gateway_host_keys(
    plugin: &std::path::Path,
    workers: u32,
    app: &str,
    gw: &str,
) -> Host {
    gateway_host_of(plugin, (workers, 1), app, gw).await
}

/// As [`gateway_host_keys`], with `workers.0` business workers and `workers.1` gateway
/// processes.
pub async fn gateway_host_of(
    plugin: &std::path::Path,
    workers: (u32, u32),
    app: &str,
    gw: &str,
) -> Host {
    let (workers, gateways) = workers;
    let extra = format!(
        "admin_listen = \"127.0.0.1:0\"\n[[group]]\nname = \"app\"\nworkers = {workers}\n{app}\n\n[[group]]\nname = \"gw\"\ngateway = true\nbusiness = \"app\"\nworkers = {gateways}\n{gw}\n"
    );
    let opts = HostOptions {
        extra,
        ..HostOptions::default()
    };
    Host::start(plugin, opts).await
}

/// Opens a WebSocket client of the gateway at `addr`, trying again (10 s at most) while it
/// answers `503` (full: a client that just left may not have given its slot back yet).
pub async fn ws_when_room(addr: SocketAddr) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_tungstenite::connect_async(format!("ws://{addr}/chat")).await {
            Ok((ws, _)) => return ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                assert!(Instant::now() < deadline, "the gateway stayed full");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("WebSocket handshake: {e}"),
        }
    }
}

/// The next `k` text messages on `ws` (pings answered on the way), 20 s at most each; a Close
/// or an error fails the test (the client was disconnected).
pub async fn texts(ws: &mut Ws, k: usize) -> Vec<String> {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let mut out = Vec::new();
    while out.len() < k {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => out.push(t.to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("expected text {} of {k}, got {other:?}", out.len() + 1),
        }
    }
    out
}

/// Runs `burst(next..next + 5)`, then on the next 5, and so on while `reload` (a `host reload`
/// in progress) runs, and once more after it returned, so that bursts cover the whole reload;
/// checks it succeeded. Returns the first number no burst had.
pub async fn bursts_through_reload(
    host: &Host,
    reload: tokio::task::JoinHandle<std::process::Output>,
    mut next: usize,
    mut burst: impl AsyncFnMut(std::ops::Range<usize>),
) -> usize {
    loop {
        let finished = reload.is_finished();
        burst(next..next + 5).await;
        next += 5;
        assert!(next < 5000, "the reload never ended");
        if finished {
            break;
        }
    }
    let out = reload.await.unwrap();
    assert!(out.status.success(), "{}", host.explain(&out));
    next
}

/// [`raw_upgrade`], trying again (10 s at most) while the gateway answers `503`.
pub async fn raw_upgrade_when_room(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match raw_upgrade(addr).await {
            Ok(s) => return s,
            Err(head) => {
                assert!(head.starts_with("HTTP/1.1 503"), "{head}");
                assert!(Instant::now() < deadline, "the gateway stayed full");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Sends a WebSocket upgrade request by hand and returns the connection once the `101` is read
/// (any other answer: its head); the test then reads its raw bytes without answering pings.
pub async fn raw_upgrade(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("the upgrade's answer in time")
            .unwrap();
        assert_eq!(n, 1, "closed before the upgrade's answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    match head.starts_with("HTTP/1.1 101") {
        true => Ok(s),
        false => Err(head),
    }
}

/// Reads `s` to its end (at most `within`) and returns every byte the server sent.
pub async fn read_to_end_within(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut all))
        .await
        .expect("the gateway to close the connection in time")
        .unwrap();
    all
}

/// A business worker played by the test, speaking the gateway's link protocol (length-prefixed
/// JSON frames, `host/src/gateway/link.rs`) on the gateway's link socket. Each text message is
/// one of [`commands`], then acknowledged with the client's session (`n`: its events handled);
/// a connect to `/refuse` is refused with `403`.
pub struct FakeWorker {
    /// Sends `Draining` on the link when fired.
    drain: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<u64>,
}

impl FakeWorker {
    /// Connects to `link` (10 s at most, the gateway may be starting). With `die_after`, the
    /// worker drops its link, unanswered, on receiving its `die_after`-th event (a crash
    /// mid-burst).
    pub async fn start(link: &std::path::Path, die_after: Option<u64>) -> FakeWorker {
        use tokio::net::UnixStream;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(link).await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "link {}: {e}", link.display());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let (drain, mut drain_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            write_frame(
                &mut wr,
                &serde_json::json!({"Hello": {"pid": 1, "generation": 1}}),
            )
            .await;
            let mut seen = 0u64;
            let mut drain_sent = false;
            loop {
                let frame = tokio::select! {
                    f = read_frame(&mut rd) => f,
                    r = &mut drain_rx, if !drain_sent => {
                        drain_sent = true;
                        if r.is_ok() {
                            write_frame(&mut wr, &serde_json::json!("Draining")).await;
                        }
                        continue;
                    }
                };
                let Some(frame) = frame else { return seen };
                // A `Welcome` (the answer to the `Hello`) or a presence answer: not an event.
                let Some(e) = frame.get("Event") else {
                    continue;
                };
                seen += 1;
                if die_after == Some(seen) {
                    return seen;
                }
                let (client, seq) = (e["client"].clone(), e["seq"].clone());
                let n = e["session"]["n"].as_u64().unwrap_or(0) + 1;
                if let Some(t) = e["event"]["Text"].as_str() {
                    for command in commands(&client, t, e["redelivered"].as_bool(), n) {
                        write_frame(&mut wr, &command).await;
                    }
                }
                // A connect to `/refuse` is refused with 403.
                let refuse = (e["event"]["Connect"]["path"] == "/refuse").then_some(403);
                let done = serde_json::json!({"Handled": {"client": client, "seq": seq, "session": {"n": n}, "refuse": refuse}});
                write_frame(&mut wr, &done).await;
            }
        });
        FakeWorker {
            drain: Some(drain),
            task,
        }
    }

    /// Says `Draining` on the link (it goes on answering what it gets).
    pub fn drain(&mut self) {
        if let Some(d) = self.drain.take() {
            let _ = d.send(());
        }
    }

    /// Drops the link (a worker that exits) and returns how many events it received.
    pub async fn stop(self) -> u64 {
        self.task.abort();
        self.task.await.unwrap_or(0)
    }

    /// Whether it ended by itself (`die_after` reached).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The link commands for a client's text message `t` (its `n`-th event; `r`: redelivered):
/// `nick N` binds it to uid N (answer `nick N`), `join R` joins group R (answer `joined R`),
/// `say R T` sends T to group R, `to N T` sends T to uid N; anything else is answered to the
/// client alone as `t n=N r=R`.
fn commands(
    client: &serde_json::Value,
    t: &str,
    r: Option<bool>,
    n: u64,
) -> Vec<serde_json::Value> {
    use serde_json::json;
    let send = |to: serde_json::Value, text: String| json!({"Send": {"to": to, "message": {"Text": text}}});
    let mut words = t.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("nick"), Some(name), None) => vec![
            json!({"Bind": {"client": client, "uid": name}}),
            send(json!({"Client": client}), format!("nick {name}")),
        ],
        (Some("join"), Some(room), None) => vec![
            json!({"Join": {"client": client, "group": room}}),
            send(json!({"Client": client}), format!("joined {room}")),
        ],
        (Some("say"), Some(room), Some(text)) => {
            vec![send(json!({"Group": room}), text.to_string())]
        }
        (Some("to"), Some(name), Some(text)) => vec![send(json!({"Uid": name}), text.to_string())],
        _ => vec![send(
            json!({"Client": client}),
            format!("{t} n={n} r={}", r.unwrap_or(false)),
        )],
    }
}

async fn write_frame(wr: &mut (impl tokio::io::AsyncWrite + Unpin), v: &serde_json::Value) {
    let body = serde_json::to_vec(v).unwrap();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    // The gateway may be gone (a test that stops it): the worker's next read ends it.
    let _ = wr.write_all(&frame).await;
}

async fn read_frame(rd: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<serde_json::Value> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    rd.read_exact(&mut body).await.ok()?;
    serde_json::from_slice(&body).ok()
}
