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

use tests::gateway::{
    FakeWorker, bursts_through_reload, gateway_host, gateway_host_with, raw_upgrade,
    raw_upgrade_when_room, read_to_end_within, texts, ws_when_room,
};
use tests::groups::{group, group_addr, group_pids};
use tests::{Ws, fixture_plugin, get, metric, pid_alive, ws_close_code};

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

    // A business worker (played by the test) answers the clients' connects.
    let worker = FakeWorker::start(&link, None).await;
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
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_bounds_refuse_before_the_upgrade_and_close_with_their_codes() {
    let host = gateway_host(
        "gateway_max_clients = 2\ngateway_max_message = \"1KiB\"\ngateway_ping_interval = \"500ms\"\ngateway_ping_timeout = \"500ms\"",
    )
    .await;
    let addr = group_addr(&host.status().await, "gw");
    let link = host.dir.path().join("state/gateway/gw-0.sock");
    let worker = FakeWorker::start(&link, None).await;

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
    worker.stop().await;
}

/// Sends `c{i}-{j}` for `j` in `range` on each client, then reads as many answers from each.
async fn burst(clients: &mut [Ws], range: std::ops::Range<usize>) -> Vec<Vec<String>> {
    for (i, ws) in clients.iter_mut().enumerate() {
        for j in range.clone() {
            ws.send(Message::Text(format!("c{i}-{j}").into()))
                .await
                .unwrap();
        }
    }
    let mut all = Vec::new();
    for ws in clients.iter_mut() {
        all.push(texts(ws, range.len()).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_worker_lost_mid_burst_and_a_drain_in_order_once_with_sessions() {
    let host = gateway_host("gateway_hold = \"3s\"").await;
    let addr = group_addr(&host.status().await, "gw");
    let link = host.dir.path().join("state/gateway/gw-0.sock");

    // A takes the first four clients and dies, unanswered, on its 30th event; B the other four.
    let a = FakeWorker::start(&link, Some(30)).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(addr).await);
    }
    let mut b = FakeWorker::start(&link, None).await;
    for _ in 0..4 {
        clients.push(connect(addr).await);
    }
    let mut answers = burst(&mut clients, 0..20).await;
    assert!(a.is_finished(), "worker A never reached its 30th event");

    // A reload's shape: C joins, B drains in the middle of the next burst, then leaves.
    let c = FakeWorker::start(&link, None).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        for j in 20..30 {
            ws.send(Message::Text(format!("c{i}-{j}").into()))
                .await
                .unwrap();
        }
    }
    b.drain();
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(texts(ws, 10).await);
    }
    b.stop().await;
    for (i, more) in burst(&mut clients, 30..40).await.into_iter().enumerate() {
        answers[i].extend(more);
    }

    // Every message answered once, in order, its session intact (n counts the connect and
    // every message before it); only an event A held can come redelivered.
    let mut redelivered = 0;
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got.len(), 40, "client {i}: {got:?}");
        for (j, answer) in got.iter().enumerate() {
            let expected = format!("c{i}-{j} n={} r=", j + 2);
            assert!(
                answer.starts_with(&expected),
                "client {i}, message {j}: {answer:?} (all: {got:?})"
            );
            if answer.ends_with("r=true") {
                assert!(i < 4, "client {i} was never on A: {answer}");
                redelivered += 1;
            }
        }
    }
    assert!(
        redelivered >= 1,
        "A died holding an event: it must come back redelivered"
    );
    eprintln!("redelivered: {redelivered}");

    // With no worker, events wait (gateway_hold): one that arrives in time is answered...
    c.stop().await;
    clients[0].send(Message::Text("held".into())).await.unwrap();
    let d = FakeWorker::start(&link, None).await;
    assert_eq!(
        texts(&mut clients[0], 1).await,
        vec!["held n=42 r=false".to_string()]
    );
    // ... and past it the client is closed with 1011; the others stay.
    d.stop().await;
    clients[1].send(Message::Text("lost".into())).await.unwrap();
    assert_eq!(ws_close_code(&mut clients[1]).await, Some(CloseCode::Error));
    let e = FakeWorker::start(&link, None).await;
    assert_eq!(texts(&mut clients[2], 0).await.len(), 0);
    clients[2]
        .send(Message::Text("still".into()))
        .await
        .unwrap();
    assert_eq!(
        texts(&mut clients[2], 1).await,
        vec!["still n=42 r=false".to_string()]
    );
    e.stop().await;

    // /metrics: the gateway's series, labelled with its group (the gauges are read at the
    // router's tick, every 250 ms at most).
    let admin = host.admin_addr().await;
    let gw = ["group=\"gw\""];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = get(admin, "/metrics").await.expect("GET /metrics").body;
        if (metric(&body, "gateway_clients", &gw) == 7.0
            && metric(&body, "gateway_unhandled_events", &gw) == 0.0)
            || tokio::time::Instant::now() > deadline
        {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines: Vec<&str> = body.lines().filter(|l| l.contains("gateway_")).collect();
    assert_eq!(metric(&body, "gateway_clients", &gw), 7.0, "{lines:#?}");
    assert_eq!(
        metric(&body, "gateway_redelivered_events_total", &gw),
        redelivered as f64,
        "{lines:#?}"
    );
    assert_eq!(
        metric(&body, "gateway_held_closed_clients_total", &gw),
        1.0,
        "{lines:#?}"
    );
    assert_eq!(
        metric(&body, "gateway_unhandled_events", &gw),
        0.0,
        "{lines:#?}"
    );
    assert!(
        metric(&body, "gateway_messages_total", &gw) >= 323.0,
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_a_uid_or_a_group_reach_clients_handled_by_other_workers() {
    let host = gateway_host("gateway_hold = \"1s\"").await;
    let addr = group_addr(&host.status().await, "gw");
    let link = host.dir.path().join("state/gateway/gw-0.sock");
    // Clients 0 and 1 on worker A, client 2 on worker B.
    let a = FakeWorker::start(&link, None).await;
    let mut c = vec![connect(addr).await, connect(addr).await];
    let b = FakeWorker::start(&link, None).await;
    c.push(connect(addr).await);
    for (i, command, answer) in [
        (0, "nick ann", "nick ann"),
        (1, "nick ann", "nick ann"),
        (2, "nick bob", "nick bob"),
        (0, "join room", "joined room"),
        (2, "join room", "joined room"),
    ] {
        c[i].send(Message::Text(command.into())).await.unwrap();
        assert_eq!(texts(&mut c[i], 1).await, [answer]);
    }
    // From A's client to the room (one of them B's), and from B's client to ann's two clients.
    c[1].send(Message::Text("say room hi".into()))
        .await
        .unwrap();
    assert_eq!(texts(&mut c[0], 1).await, ["hi"]);
    assert_eq!(texts(&mut c[2], 1).await, ["hi"]);
    c[2].send(Message::Text("to ann yo".into())).await.unwrap();
    assert_eq!(texts(&mut c[0], 1).await, ["yo"]);
    assert_eq!(texts(&mut c[1], 1).await, ["yo"]);
    // Nothing else arrived: the next answer each gets is its own echo.
    for (i, ws) in c.iter_mut().enumerate() {
        ws.send(Message::Text("echo".into())).await.unwrap();
        let got = texts(ws, 1).await;
        assert!(got[0].starts_with("echo n="), "client {i}: {got:?}");
    }
    // The business may refuse a connect with an HTTP status: no 101, no client.
    match tokio_tungstenite::connect_async(format!("ws://{addr}/refuse")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403 from the business, got {other:?}"),
    }
    a.stop().await;
    b.stop().await;
    // With no business worker, a connect waits gateway_hold (1s here), then gets 503.
    let started = std::time::Instant::now();
    match tokio_tungstenite::connect_async(format!("ws://{addr}/chat")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503 with no business worker, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

/// Sends `c{i}-{j}` for `j` in `range` on each client.
async fn send_range(clients: &mut [Ws], range: std::ops::Range<usize>) {
    for (i, ws) in clients.iter_mut().enumerate() {
        for j in range.clone() {
            ws.send(Message::Text(format!("c{i}-{j}").into()))
                .await
                .unwrap();
        }
    }
}

/// Reads client `i`'s answers until the one to `c{i}-{last}` (20 s at most each).
async fn answers_until(ws: &mut Ws, i: usize, last: usize) -> Vec<String> {
    let end = format!("c{i}-{last} ");
    let mut out = Vec::new();
    loop {
        let t = texts(ws, 1).await.remove(0);
        let done = t.starts_with(&end);
        out.push(t);
        if done {
            return out;
        }
    }
}

/// Checks client `i`'s answers are `c{i}-{j} n={j+2} r=R` for `j` in `0..count`, in order,
/// each once, except that an answer may come again, right after, flagged redelivered (a
/// worker killed after its handler sent but before it answered `Handled`); returns how many
/// came again.
fn check_answers(i: usize, got: &[String], count: usize) -> usize {
    let mut again = 0;
    let mut j = 0;
    for (k, answer) in got.iter().enumerate() {
        if j > 0 && answer.starts_with(&format!("c{i}-{} n={} r=true", j - 1, j + 1)) {
            again += 1;
            continue;
        }
        let expected = format!("c{i}-{j} n={} r=", j + 2);
        assert!(
            answer.starts_with(&expected),
            "client {i}, answer {k}: {answer:?}, expected {expected:?} (all: {got:?})"
        );
        j += 1;
    }
    assert_eq!(j, count, "client {i}: {got:?}");
    again
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_gateway_events_survive_a_reload_and_a_worker_killed_mid_burst() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let host = gateway_host_with(&fixture_plugin(""), 2, "gateway_hold = \"10s\"").await;
    let addr = group_addr(&host.status().await, "gw");
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect(addr).await);
    }
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    // Bursts of 5 a client while a reload replaces both business workers.
    let before = group_pids(&host.status().await, "app");
    let reload = host.spawn_cli(&["reload"]);
    let mut next = bursts_through_reload(&host, reload, 0, async |range| {
        send_range(&mut clients, range.clone()).await;
        for (i, ws) in clients.iter_mut().enumerate() {
            answers[i].extend(answers_until(ws, i, range.end - 1).await);
        }
    })
    .await;
    let after = group_pids(&host.status().await, "app");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "the reload replaced no worker: {before:?} {after:?}"
    );

    // A business worker killed with SIGKILL in the middle of a burst.
    send_range(&mut clients, next..next + 30).await;
    kill(Pid::from_raw(after[0] as i32), Signal::SIGKILL).unwrap();
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(answers_until(ws, i, next + 29).await);
    }
    next += 30;
    host.wait_status("the killed business worker replaced", |s| {
        let app = group_pids(s, "app");
        app.len() == 2 && !app.contains(&after[0])
    })
    .await;
    send_range(&mut clients, next..next + 10).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(answers_until(ws, i, next + 9).await);
    }
    next += 10;

    let again: usize = answers
        .iter()
        .enumerate()
        .map(|(i, got)| check_answers(i, got, next))
        .sum();
    let redelivered = answers
        .iter()
        .flatten()
        .filter(|a| a.ends_with("r=true"))
        .count();
    eprintln!(
        "{next} messages a client; redelivered {redelivered}, answered again after the kill: {again}"
    );
    // Sessions survived: a new event still counts from the client's whole history.
    clients[0].send(Message::Text("last".into())).await.unwrap();
    assert_eq!(
        texts(&mut clients[0], 1).await,
        vec![format!("last n={} r=false", next + 2)]
    );
    let status = host.status().await;
    assert_eq!(group_pids(&status, "gw").len(), 1);

    // An HTTP handler reaches the gateway too: a send to a group and its size.
    for ws in &mut clients[..2] {
        ws.send(Message::Text("join news".into())).await.unwrap();
        assert_eq!(texts(ws, 1).await, vec!["joined news".to_string()]);
    }
    assert_eq!(host.body("/gateway/notify/news").await, "sent count=2\n");
    for ws in &mut clients[..2] {
        assert_eq!(texts(ws, 1).await, vec!["notify news".to_string()]);
    }
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_older_than_gateway_events_is_linked_to_no_gateway_with_one_warning() {
    let host = gateway_host_with(&fixture_plugin("abi-1-6"), 1, "gateway_hold = \"300ms\"").await;
    let addr = group_addr(&host.status().await, "gw");
    // No worker links: the connect is held, then refused.
    let refused = raw_upgrade(addr)
        .await
        .expect_err("no worker answers the connect");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let warned = host.log().matches("its plugin handles none").count();
    assert_eq!(warned, 1, "{}", host.log());
    // It still serves HTTP; a send from it reaches no gateway (this build reads the 1.7
    // context, so it has a handle, which answers that the worker has no links).
    assert!(host.body("/").await.contains("fixture ok"));
    assert_eq!(
        host.body("/gateway/notify/x").await,
        "this worker has no gateway\n"
    );
}
