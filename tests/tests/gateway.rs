//! The gateway (issue 21, first phase): a `gateway = true` group runs `__gateway` processes of
//! the host binary that hold WebSocket clients; a reload of the business group behind it never
//! touches them; its bounds refuse or close a client with the right answer (`503` before the
//! upgrade, `1009`, `1007`, `1008` for a client that answers no ping), and a stop closes its
//! clients with `1001`. The events' path to the business workers is the next phase.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use tests::gateway::{gateway_host, raw_upgrade_when_room, read_to_end_within, ws_when_room};
use tests::groups::{group, group_addr, group_pids};
use tests::{Ws, pid_alive, ws_close_code};

async fn connect(addr: std::net::SocketAddr) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat?room=a"))
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Reads until a Ping from the gateway (answered by the client as it reads), 10 s at most.
async fn next_ping(ws: &mut Ws) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => return,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a ping from the gateway, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_clients_stay_connected_through_business_reloads_and_get_pinged() {
    let host =
        gateway_host("gateway_ping_interval = \"200ms\"\ngateway_ping_timeout = \"5s\"").await;
    let status = host.status().await;
    let gw = group(&status, "gw");
    assert!(
        !gw.reloadable,
        "a gateway group is never reloadable: {gw:?}"
    );
    let gw_pids = group_pids(&status, "gw");
    assert_eq!(gw_pids.len(), 1, "{status:?}");
    let mut app_before = group_pids(&status, "app");
    let addr = group_addr(&status, "gw");
    let link = host.dir.path().join("state/gateway/gw-0.sock");
    assert!(link.exists(), "no link socket at {}", link.display());

    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(connect(addr).await);
    }
    for round in 0..2 {
        let out = host.cli(&["reload"]).await;
        assert!(out.status.success(), "{}", host.explain(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("skipped group \"gw\""),
            "reload {round}: {said}"
        );
        let status = host.status().await;
        let app_now = group_pids(&status, "app");
        assert_ne!(
            app_now, app_before,
            "reload {round} replaced no business worker"
        );
        app_before = app_now;
        assert_eq!(
            group_pids(&status, "gw"),
            gw_pids,
            "the gateway was replaced"
        );
        // Every client is still there: the gateway pings it, it answers and sends.
        for ws in &mut clients {
            next_ping(ws).await;
            ws.send(Message::Text(format!("after reload {round}").into()))
                .await
                .expect("the client is still connected");
        }
    }
    assert!(gw_pids.iter().all(|p| pid_alive(*p)));

    // A stop closes every client with 1001 (Going Away).
    let stop = host.spawn_cli(&["stop"]);
    for ws in &mut clients {
        assert_eq!(ws_close_code(ws).await, Some(CloseCode::Away));
    }
    let out = stop.await.unwrap();
    assert!(out.status.success(), "{}", host.explain(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_bounds_refuse_before_the_upgrade_and_close_with_their_codes() {
    let host = gateway_host(
        "gateway_max_clients = 2\ngateway_max_message = \"1KiB\"\ngateway_ping_interval = \"500ms\"\ngateway_ping_timeout = \"500ms\"",
    )
    .await;
    let addr = group_addr(&host.status().await, "gw");

    // Two clients fill the gateway; a third is answered 503 instead of the upgrade.
    let mut a = connect(addr).await;
    let b = connect(addr).await;
    // b reads all along (so it answers every ping) and must never be closed.
    let (stop_b, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let b = tokio::spawn(async move {
        let mut b = b;
        loop {
            tokio::select! {
                _ = &mut stopped => return b,
                m = b.next() => match m {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("client b, which answers pings, got {other:?}"),
                },
            }
        }
    });
    match tokio_tungstenite::connect_async(format!("ws://{addr}/chat")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503 past gateway_max_clients, got {other:?}"),
    }

    // A message over gateway_max_message: 1009; the client's slot is given back.
    a.send(Message::Text("x".repeat(2048).into()))
        .await
        .unwrap();
    assert_eq!(ws_close_code(&mut a).await, Some(CloseCode::Size));
    drop(a);

    // Invalid UTF-8 in a text message: 1007.
    let mut c = ws_when_room(addr).await;
    let bad = Frame::message(vec![0xff, 0xfe, 0x41], OpCode::Data(Data::Text), true);
    c.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(ws_close_code(&mut c).await, Some(CloseCode::Invalid));
    drop(c);

    // A client that answers no ping is closed (1008) after interval + timeout; b, which reads
    // (and so answers), is not.
    let mut silent = raw_upgrade_when_room(addr).await;
    let bytes = read_to_end_within(&mut silent, Duration::from_secs(10)).await;
    // A Ping (0x89), then a Close (0x88) whose payload starts with 1008.
    assert_eq!(bytes.first(), Some(&0x89), "{bytes:x?}");
    assert!(
        bytes
            .windows(4)
            .any(|w| w[0] == 0x88 && w[2..4] == 1008u16.to_be_bytes()),
        "no Close 1008 in {bytes:x?}"
    );
    stop_b.send(()).unwrap();
    let mut b = b.await.unwrap();
    next_ping(&mut b).await;
    b.send(Message::Text("still here".into()))
        .await
        .expect("a client that answers pings stays");

    // Each bound hit is counted in /metrics.
    for limit in [
        "gateway_max_clients",
        "gateway_max_message",
        "gateway_ping_timeout",
    ] {
        assert!(host.limit_hits(limit).await >= 1, "no {limit} in /metrics");
    }
}
