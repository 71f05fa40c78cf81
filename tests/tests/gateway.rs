//! The gateway (issue 21): a `gateway = true` group runs `__gateway` processes of the host
//! binary that hold WebSocket clients; a reload of the business group behind it never touches
//! them; its bounds refuse or close a client with the right answer (`503` before the upgrade,
//! also past the connections still sending one, `1009`, `1007`, `1008` for a client that
//! answers no ping or floods pings), and a stop closes its clients with `1001`. Business
//! workers (played by the test, then the fixture plugin) get every client event once, in
//! order, through reloads, a rollback, a recycle, a crash, a kill and a hang, and each event's
//! sends reach the clients exactly once.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use tests::gateway::{
    FakeWorker, bursts_through_reload, gateway_host, gateway_host_keys, gateway_host_of,
    gateway_host_with, raw_upgrade, raw_upgrade_when_room, read_to_end_within, texts, ws_when_room,
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

    // A ping flood (more than 20 a second): 1008.
    let mut c = ws_when_room(addr).await;
    for _ in 0..50 {
        if c.send(Message::Ping(Default::default())).await.is_err() {
            break;
        }
    }
    assert_eq!(ws_close_code(&mut c).await, Some(CloseCode::Policy));
    drop(c);

    // Connections still sending their upgrade request are bounded (here by
    // gateway_max_clients, 2): of three silent ones, one is answered 503 at once.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut answers = Vec::new();
    for s in silent {
        answers.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let (mut s, mut buf) = (s, [0u8; 64]);
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                // Refused: the 503, then the end.
                Ok(Ok(n)) => buf[..n].to_vec(),
                // Held: the gateway waits for its request.
                _ => Vec::new(),
            }
        }));
    }
    let mut refused = 0;
    for a in answers {
        let bytes = a.await.unwrap();
        if bytes.starts_with(b"HTTP/1.1 503") {
            refused += 1;
        } else {
            assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
        }
    }
    assert_eq!(refused, 1);

    // Each bound hit is counted in /metrics.
    for limit in [
        "gateway_max_clients",
        "gateway_max_message",
        "gateway_ping_timeout",
        "gateway_ping_flood",
        "gateway_upgrades",
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

/// Checks client `i`'s answers are `c{i}-{j} n={j+2+from} r=R` for `j` in `0..count`, in
/// order, each exactly once (an event redelivered after its worker died, even after its
/// handler sent, is answered once: the gateway applies an event's sends at its `Handled`).
fn check_answers(i: usize, got: &[String], count: usize, from: usize) {
    for (j, answer) in got.iter().enumerate() {
        let expected = format!("c{i}-{j} n={} r=", j + 2 + from);
        assert!(
            answer.starts_with(&expected),
            "client {i}, answer {j}: {answer:?}, expected {expected:?} (all: {got:?})"
        );
    }
    assert_eq!(got.len(), count, "client {i}: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_gateway_events_survive_a_reload_and_a_worker_killed_mid_burst() {
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
    // A worker that dies after its handler made its answer and before its `Handled`: the
    // answer leaves once, from the redelivery (before, it left twice).
    let crashed = group_pids(&host.status().await, "app");
    clients[0]
        .send(Message::Text(format!("c0-{next} crash-once").into()))
        .await
        .unwrap();
    for (i, ws) in clients.iter_mut().enumerate().skip(1) {
        ws.send(Message::Text(format!("c{i}-{next}").into()))
            .await
            .unwrap();
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(answers_until(ws, i, next).await);
    }
    assert!(
        answers[0].last().unwrap().ends_with("r=true"),
        "{:?}",
        answers[0].last()
    );
    next += 1;
    host.wait_status("the crashed business worker replaced", |s| {
        let app = group_pids(s, "app");
        app.len() == 2 && app != crashed
    })
    .await;
    send_range(&mut clients, next..next + 10).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(answers_until(ws, i, next + 9).await);
    }
    next += 10;

    for (i, got) in answers.iter().enumerate() {
        check_answers(i, got, next, 0);
    }
    let redelivered = answers
        .iter()
        .flatten()
        .filter(|a| a.ends_with("r=true"))
        .count();
    eprintln!("{next} messages a client, each answered once; redelivered {redelivered}");
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

/// Clients numbered answers, as [`check_answers`] reads them.
struct Numbered {
    clients: Vec<Ws>,
    answers: Vec<Vec<String>>,
    next: usize,
}

impl Numbered {
    async fn connect(addr: std::net::SocketAddr, k: usize) -> Numbered {
        let mut clients = Vec::new();
        for _ in 0..k {
            clients.push(connect(addr).await);
        }
        Numbered {
            answers: vec![Vec::new(); k],
            clients,
            next: 0,
        }
    }

    /// A burst of `k` messages a client, `fault` appended to client 0's first, read to its
    /// end.
    async fn burst(&mut self, k: usize, fault: &str) {
        let next = self.next;
        for (i, ws) in self.clients.iter_mut().enumerate() {
            for j in next..next + k {
                let extra = if i == 0 && j == next { fault } else { "" };
                ws.send(Message::Text(format!("c{i}-{j}{extra}").into()))
                    .await
                    .unwrap();
            }
        }
        for (i, ws) in self.clients.iter_mut().enumerate() {
            self.answers[i].extend(answers_until(ws, i, next + k - 1).await);
        }
        self.next += k;
    }

    /// Bursts of 5 until `done` (a `host` command) ends; its output must say success.
    async fn bursts_while(
        &mut self,
        host: &tests::Host,
        done: tokio::task::JoinHandle<std::process::Output>,
    ) {
        loop {
            let finished = done.is_finished();
            self.burst(5, "").await;
            assert!(self.next < 5000, "the command never ended");
            if finished {
                break;
            }
        }
        let out = done.await.unwrap();
        assert!(out.status.success(), "{}", host.explain(&out));
    }

    fn check(&self) -> usize {
        for (i, got) in self.answers.iter().enumerate() {
            check_answers(i, got, self.next, 0);
        }
        self.answers
            .iter()
            .flatten()
            .filter(|a| a.ends_with("r=true"))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_gateway_events_survive_a_rollback_a_recycle_and_a_hung_worker() {
    let app = "max_requests = 40\nmax_requests_jitter = 0\nworker_timeout = \"2s\"\ngateway_event_timeout = \"1s\"";
    let host = gateway_host_keys(&fixture_plugin(""), 2, app, "gateway_hold = \"10s\"").await;
    let addr = group_addr(&host.status().await, "gw");
    let mut c = Numbered::connect(addr, 4).await;

    // A reload, then a rollback to the generation before it.
    c.bursts_while(&host, host.spawn_cli(&["reload", "app"]))
        .await;
    let reloaded = group_pids(&host.status().await, "app");
    c.bursts_while(&host, host.spawn_cli(&["rollback", "app"]))
        .await;
    let status = host.status().await;
    assert_eq!(status.last_reload.as_ref().unwrap().kind, "rollback");
    assert!(
        group_pids(&status, "app")
            .iter()
            .all(|p| !reloaded.contains(p))
    );

    // A recycle: a worker past max_requests (HTTP requests) is replaced, new before old.
    let recycles = |s: &host_status::StatusReport| s.slots.iter().map(|s| s.recycles).sum::<u64>();
    let http = host.addr;
    let load = tokio::spawn(async move {
        for _ in 0..90 {
            assert_eq!(get(http, "/").await.expect("GET /").status, 200);
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !load.is_finished() || recycles(&host.status().await) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no worker recycled");
        c.burst(2, "").await;
    }
    load.await.unwrap();
    c.burst(5, "").await;

    // A hung business worker (its I/O thread blocked after its handler made its answer):
    // killed by the watchdog, its events redelivered and answered once.
    let before = group_pids(&host.status().await, "app");
    c.burst(5, " wedge-once").await;
    host.wait_status("the hung worker replaced", |s| {
        let app = group_pids(s, "app");
        app.len() == 2 && app.iter().filter(|p| before.contains(p)).count() == 1
    })
    .await;
    c.burst(5, "").await;
    let redelivered = c.check();
    assert!(
        c.answers[0]
            .iter()
            .any(|a| a.starts_with(&format!("c0-{} ", c.next - 10)) && a.ends_with("r=true")),
        "the hung worker's event came back redelivered: {:?}",
        c.answers[0]
    );
    eprintln!(
        "{} messages a client, each answered once; redelivered {redelivered}",
        c.next
    );
    assert!(host.log().contains("worker_timeout"), "{}", host.log());

    // A handler that never returns: dropped at gateway_event_timeout, what it made is sent,
    // the session it set is not kept; a connect whose handler never returns gets 504.
    let next = c.next;
    let ws = &mut c.clients[1];
    ws.send(Message::Text(format!("c1-{next} stall").into()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let n = next + 2;
    assert_eq!(texts(ws, 1).await, [format!("c1-{next} n={n} r=false")]);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    ws.send(Message::Text("after".into())).await.unwrap();
    assert_eq!(texts(ws, 1).await, [format!("after n={n} r=false")]);
    match tokio_tungstenite::connect_async(format!("ws://{addr}/stall")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 504),
        other => panic!("expected 504 from a connect whose handler never returns, got {other:?}"),
    }
    assert!(host.limit_hits("gateway_event_timeout").await >= 2);

    // The plugin's commands and sessions over the host's bounds: refused, counted; the old
    // session kept.
    let ws = &mut c.clients[3];
    ws.send(Message::Text("big send".into())).await.unwrap();
    assert_eq!(
        texts(ws, 1).await,
        ["big send: the host refused the gateway command"]
    );
    ws.send(Message::Text("big session".into())).await.unwrap();
    assert_eq!(texts(ws, 1).await, ["big session"]);
    ws.send(Message::Text("after".into())).await.unwrap();
    let n = next + 3;
    assert_eq!(texts(ws, 1).await, [format!("after n={n} r=false")]);
    assert!(host.limit_hits("gateway_command").await >= 1);
    assert!(host.limit_hits("gateway_session").await >= 1);

    // A binary message crosses the link (base64) and comes back as it went.
    let ws = &mut c.clients[2];
    let bytes: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    ws.send(Message::Binary(bytes.clone().into()))
        .await
        .unwrap();
    assert!(texts(ws, 1).await[0].starts_with("binary 60000 n="));
    match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert!(b[..] == bytes[..], "the echo differs"),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    assert_eq!(group_pids(&host.status().await, "gw").len(), 1);
}

/// The client id the fixture plugin tells `ws`.
async fn client_id(ws: &mut Ws) -> u64 {
    ws.send(Message::Text("id".into())).await.unwrap();
    let said = texts(ws, 1).await.remove(0);
    said.strip_prefix("id ")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("not an id: {said}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_process_never_reuses_a_client_id() {
    let host = gateway_host_with(&fixture_plugin(""), 1, "gateway_hold = \"10s\"").await;
    let addr = group_addr(&host.status().await, "gw");
    let mut before = Numbered::connect(addr, 3).await;
    let mut old = Vec::new();
    for ws in &mut before.clients {
        old.push(client_id(ws).await);
    }
    // SIGKILL: its clients are gone; the master starts another process in its slot.
    let gw = group_pids(&host.status().await, "gw");
    kill(Pid::from_raw(gw[0] as i32), Signal::SIGKILL).unwrap();
    host.wait_status("the killed gateway replaced", |s| {
        let now = group_pids(s, "gw");
        now.len() == 1 && now != gw
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut ws = loop {
        match tokio_tungstenite::connect_async(format!("ws://{addr}/chat")).await {
            Ok((ws, _)) => break ws,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no new gateway: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let new = client_id(&mut ws).await;
    assert!(
        old.iter().all(|id| new > *id),
        "a new process's client id {new} was given before: {old:?}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_port_clients_are_passed_to_the_gateway_and_outlive_the_workers_that_passed_them() {
    let host = gateway_host_with(
        &fixture_plugin(""),
        2,
        "upgrade_from = \"app\"\nupgrade_path = \"/chat\"\ngateway_hold = \"10s\"",
    )
    .await;
    let status = host.status().await;
    let http = group_addr(&status, "app");
    let own = group_addr(&status, "gw");
    assert!(
        own.ip().is_loopback() && own.port() != http.port(),
        "a same-port gateway's own listener is loopback: {own}"
    );

    // WebSocket clients on the HTTP port, the plugin's HTTP beside them on the same port.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(http).await);
    }
    assert!(host.body("/").await.contains("fixture ok"));
    let plain = get(http, "/chat").await.expect("GET /chat");
    assert_eq!(
        plain.status, 400,
        "a plain GET of the path is the gateway's to answer: {}",
        plain.body
    );

    // A reload replaces the workers that passed every client: none is disconnected, every
    // message is answered once, in order.
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    send_range(&mut clients, 0..5).await;
    let before = group_pids(&host.status().await, "app");
    host.reload_ok().await;
    let after = group_pids(&host.status().await, "app");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    send_range(&mut clients, 5..10).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(answers_until(ws, i, 9).await);
        check_answers(i, &answers[i], 10, 0);
    }
    // And new clients reach the gateway through the new workers.
    clients.push(connect(http).await);

    let admin = host.admin_addr().await;
    let body = get(admin, "/metrics").await.expect("GET /metrics").body;
    let passed = metric(&body, "gateway_handoffs_total", &["group=\"gw\""]);
    assert!(passed >= 5.0, "{passed}: {body}");

    // The gateway's hand-off socket gone: an upgrade is answered 503 by the worker, counted.
    std::fs::remove_file(host.dir.path().join("state/gateway/gw-0.handoff")).unwrap();
    let refused = raw_upgrade(http).await.expect_err("no gateway takes it");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(host.limit_hits("gateway_handoff").await >= 1);
    assert!(
        host.log()
            .contains("no gateway process took a WebSocket client")
    );
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_upgrade_hands_gateway_clients_to_the_new_master_with_their_sessions() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let mut host = gateway_host_with(&fixture_plugin(""), 1, "gateway_hold = \"10s\"").await;
    let before = host.status().await;
    let addr = group_addr(&before, "gw");
    let old_gateway = group_pids(&before, "gw");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(addr).await);
    }
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    send_range(&mut clients, 0..3).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(answers_until(ws, i, 2).await);
    }
    for ws in &mut clients[..2] {
        ws.send(Message::Text("join news".into())).await.unwrap();
        assert_eq!(texts(ws, 1).await, vec!["joined news".to_string()]);
    }
    // A client in the middle of a fragmented message cannot change hands: it is told 1012.
    let mut halfway = raw_upgrade(addr).await.expect("upgraded");
    halfway
        .write_all(&[0x01, 0x83, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3])
        .await
        .unwrap();

    let out = host.cli(&["upgrade"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let after = host.status().await;
    assert_ne!(after.master_pid, before.master_pid);
    host.master_pid = after.master_pid;
    let new_gateway = group_pids(&after, "gw");
    assert!(
        new_gateway.iter().all(|p| !old_gateway.contains(p)),
        "{old_gateway:?} {new_gateway:?}"
    );
    tests::wait_old_workers_gone(&old_gateway).await;

    // Every client is still connected, to the new gateway: its next messages are answered in
    // order, counted from its whole history (the session came along; the first two also
    // counted their `join`).
    send_range(&mut clients, 3..6).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        check_answers(i, &answers[i], 3, 0);
        let joined = usize::from(i < 2);
        let got = answers_until(ws, i, 5).await;
        let expected: Vec<String> = (3..6)
            .map(|j| format!("c{i}-{j} n={} r=false", j + 2 + joined))
            .collect();
        assert_eq!(got, expected, "client {i}");
    }
    // The groups came along: a send to one reaches its members.
    assert_eq!(host.body("/gateway/notify/news").await, "sent count=2\n");
    for ws in &mut clients[..2] {
        assert_eq!(texts(ws, 1).await, vec!["notify news".to_string()]);
    }
    // (The old gateway's count: `/metrics` is the new master's, on another port here.)
    assert!(
        host.log().contains("handed_over=4 successor=true"),
        "{}",
        host.log()
    );

    // The half-way client got a Close 1012 (Service Restart) frame.
    let mut close = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), halfway.read_exact(&mut close))
        .await
        .expect("a close frame in time")
        .unwrap();
    assert_eq!(close[0], 0x88, "{close:?}");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1012, "{close:?}");

    // A stop still closes them with 1001.
    let stop = host.spawn_cli(&["stop"]);
    for ws in &mut clients {
        assert_eq!(ws_close_code(ws).await, Some(CloseCode::Away));
    }
    assert!(stop.await.unwrap().status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_gateway_process_loses_only_its_own_clients_and_is_restarted() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let host = gateway_host_of(&fixture_plugin(""), (1, 2), "", "gateway_hold = \"10s\"").await;
    let addr = group_addr(&host.status().await, "gw");
    // Clients until both gateway processes hold some (the kernel picks which one accepts).
    let mut clients = Vec::new();
    let held = loop {
        clients.push(connect(addr).await);
        let n = clients.len() as u64;
        let status = host
            .wait_status("every client counted", |s| {
                group(s, "gw")
                    .workers
                    .iter()
                    .map(|w| w.connections)
                    .sum::<u64>()
                    == n
            })
            .await;
        let held: Vec<(u32, u64)> = group(&status, "gw")
            .workers
            .iter()
            .map(|w| (w.pid, w.connections))
            .collect();
        if held.iter().all(|(_, c)| *c > 0) {
            break held;
        }
        assert!(
            clients.len() < 64,
            "one gateway process took every client: {held:?}"
        );
    };
    let (victim, lost) = held[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();

    // Exactly the victim's clients are disconnected; the others are answered as before.
    let mut gone = 0;
    for (i, ws) in clients.iter_mut().enumerate() {
        let Ok(()) = ws.send(Message::Text(format!("c{i}-0").into())).await else {
            gone += 1;
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                assert!(t.starts_with(&format!("c{i}-0 n=2 ")), "{t}")
            }
            Ok(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => gone += 1,
            other => panic!("client {i}: {other:?}"),
        }
    }
    assert_eq!(gone, lost, "{held:?}");

    // The master restarts it and counts the crash; a client that left comes back.
    let status = host
        .wait_status("the crashed gateway process replaced", |s| {
            let gw = group(s, "gw");
            gw.workers.len() == 2 && gw.workers.iter().all(|w| w.pid != victim)
        })
        .await;
    let crashes: u64 = group(&status, "gw").slots.iter().map(|s| s.crashes).sum();
    assert_eq!(crashes, 1, "{status:?}");
    for _ in 0..lost {
        let mut ws = connect(addr).await;
        ws.send(Message::Text("c0-0".into())).await.unwrap();
        assert_eq!(
            texts(&mut ws, 1).await,
            vec!["c0-0 n=2 r=false".to_string()]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_closed_1008_and_the_others_get_every_message() {
    use tokio::io::AsyncWriteExt as _;

    let host = gateway_host_with(
        &fixture_plugin(""),
        1,
        "gateway_send_queue = \"64KiB\"\ngateway_ping_timeout = \"2s\"",
    )
    .await;
    let addr = group_addr(&host.status().await, "gw");
    let mut fast = vec![connect(addr).await, connect(addr).await];
    for ws in &mut fast {
        ws.send(Message::Text("join room".into())).await.unwrap();
        assert_eq!(texts(ws, 1).await, vec!["joined room".to_string()]);
    }
    // The slow client joins too (one masked text frame), then never reads again.
    let mut slow = raw_upgrade(addr).await.expect("upgraded");
    let join = b"join room";
    let mut frame = vec![0x81, 0x80 | join.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(join);
    slow.write_all(&frame).await.unwrap();
    host.wait_status("the slow client joined", |s| {
        group(s, "gw")
            .workers
            .iter()
            .map(|w| w.requests)
            .sum::<u64>()
            >= 3
    })
    .await;

    // 400 messages of 16 KiB to the room (6.4 MB: past what the kernel's socket buffers hold
    // for the slow client, then past its 64 KiB queue). The fast clients read each one.
    let text = "x".repeat(16 << 10);
    let count = 400;
    let (mut a, mut b) = (fast.remove(0), fast.remove(0));
    let reader = tokio::spawn(async move {
        let got = texts(&mut b, count).await;
        (b, got)
    });
    for i in 0..count {
        a.send(Message::Text(format!("say room {i:03}{text}").into()))
            .await
            .unwrap();
        let got = texts(&mut a, 1).await.remove(0);
        assert!(got.starts_with(&format!("{i:03}x")), "message {i}");
    }
    let (_b, got) = reader.await.unwrap();
    for (i, t) in got.iter().enumerate() {
        assert!(
            t.starts_with(&format!("{i:03}x")),
            "the other fast client, message {i}"
        );
    }
    // The slow one was closed (its queue passed its bound, or it took no write for the ping
    // timeout), counted and logged.
    host.wait_status("the slow client closed", |s| {
        group(s, "gw")
            .workers
            .iter()
            .map(|w| w.connections)
            .sum::<u64>()
            == 2
    })
    .await;
    let hits =
        host.limit_hits("gateway_send_queue").await + host.limit_hits("gateway_ping_timeout").await;
    assert!(hits >= 1);
    assert!(
        host.log().contains("gateway closed a client"),
        "{}",
        host.log()
    );
}
