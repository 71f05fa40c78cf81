//! WebSocket clients (tokio-tungstenite, a real client): open, echo, read the close code, and
//! the round trip across a reload that every WebSocket-serving plugin's test checks.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::host::Host;
use crate::process::pid_alive;
use crate::wait_until;

/// A client WebSocket.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens `ws://addr/ws` and checks the `101`.
pub async fn ws_connect(addr: SocketAddr) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `text` and returns the text message that answers it (10 s at most).
pub async fn ws_echo(ws: &mut Ws, text: &str) -> String {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(text.into())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(reply)))) => reply.to_string(),
        other => panic!("expected an echo, got {other:?}"),
    }
}

/// Reads until the server's Close frame (10 s at most per message) and returns its code.
pub async fn ws_close_code(
    ws: &mut Ws,
) -> Option<tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode> {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

/// The WebSocket reload round trip, for a one-worker host whose `/ws` echoes `gen=N text`:
/// echoes from generation 1; a reload closes the socket with 1012 (Service Restart); a new
/// socket reaches generation 2; and the old worker (`old_pid`), held by nothing else, exits well
/// before `graceful_timeout` (10 s).
pub async fn ws_across_reload(host: &Host, old_pid: u32) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let mut ws = ws_connect(host.addr).await;
    assert_eq!(ws_echo(&mut ws, "hi").await, "gen=1 hi");
    assert_eq!(ws_echo(&mut ws, "again").await, "gen=1 again");
    host.reload_ok().await;
    assert_eq!(ws_close_code(&mut ws).await, Some(CloseCode::Restart));
    drop(ws);
    let mut ws = ws_connect(host.addr).await;
    assert_eq!(ws_echo(&mut ws, "back").await, "gen=2 back");
    wait_until(Duration::from_secs(8), "the old worker to exit", || {
        !pid_alive(old_pid)
    })
    .await;
    ws.close(None).await.unwrap();
}
