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
    let extra = format!(
        "admin_listen = \"127.0.0.1:0\"\n[[group]]\nname = \"app\"\nworkers = 1\n\n[[group]]\nname = \"gw\"\ngateway = true\nbusiness = \"app\"\nworkers = 1\n{gw}\n"
    );
    let opts = HostOptions {
        extra,
        ..HostOptions::default()
    };
    Host::start(&example_plugin(&[]), opts).await
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
