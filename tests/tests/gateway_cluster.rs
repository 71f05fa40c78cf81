//! The gateway across hosts (issue 21, items 5 and 6): three hosts on loopback, each with a
//! gateway group `gw` and the fixture plugin's business group `app`, share a real
//! `redis-server` (`cluster = "redis://..."`): a send to a group or a uid reaches the clients of
//! every host, presence counts are the cluster's; with Redis stopped, local delivery goes on and
//! what would cross hosts is a counted error; with Redis started again on its port, delivery
//! across hosts resumes; with Redis hung (`SIGSTOP`), every host finds its link down and links
//! again once it runs. And what `status` and `/metrics` show of a gateway: its clients, the
//! clients it closed by cause, its cluster link's state and errors (also with no Redis at all).

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use host_status::{GatewayStatus, StatusReport};
use tests::gateway::gateway_host_with;
use tests::groups::{group, group_addr};
use tests::{Host, RedisServer, Ws, fixture_plugin, get, metric, redis_installed};

const GW: [&str; 1] = ["group=\"gw\""];

async fn connect(host: &Host) -> Ws {
    let addr = group_addr(&host.status().await, "gw");
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// The next text message (pings skipped), 20 s at most.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn say(ws: &mut Ws, command: &str) {
    ws.send(Message::Text(command.into())).await.unwrap();
}

/// Sends `command` and expects `answer` back.
async fn asks(ws: &mut Ws, command: &str, answer: &str) {
    say(ws, command).await;
    assert_eq!(next_text(ws).await, answer, "answer to {command:?}");
}

fn gateway(s: &StatusReport) -> &GatewayStatus {
    group(s, "gw")
        .gateway
        .as_ref()
        .unwrap_or_else(|| panic!("no gateway figures in {s:?}"))
}

fn cluster_state(s: &StatusReport) -> String {
    gateway(s)
        .cluster
        .as_ref()
        .map_or("none".into(), |c| c.state.clone())
}

/// Waits (20 s at most: a reconnection backs off up to 5 s) until every host's cluster link
/// is in `state`.
async fn wait_cluster(hosts: &[Host], state: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for host in hosts {
        loop {
            let status = host.status().await;
            if cluster_state(&status) == state {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster link never became {state}: {:?}",
                gateway(&status)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `/metrics` of `host`, once `ready` holds for it (10 s at most).
async fn metrics_when(host: &Host, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let admin = host.admin_addr().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = get(admin, "/metrics").await.expect("GET /metrics").body;
        if ready(&body) {
            return body;
        }
        let lines: Vec<&str> = body.lines().filter(|l| l.contains("gateway_")).collect();
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} in /metrics: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_and_presence_reach_every_host_and_survive_redis_stopping() {
    if !redis_installed() {
        eprintln!(
            "SKIPPED: redis-server is not installed (apt-get install redis-server; .ci/run does)"
        );
        return;
    }
    let mut redis = RedisServer::start().await;
    let line = format!("cluster = \"{}\"", redis.url());
    let mut hosts = Vec::new();
    for _ in 0..3 {
        hosts.push(gateway_host_with(&fixture_plugin(""), 1, &line).await);
    }
    wait_cluster(&hosts, "up").await;

    // ann on host 0, bob on host 1, cid on host 2; all three in room r.
    let mut ann = connect(&hosts[0]).await;
    let mut bob = connect(&hosts[1]).await;
    let mut cid = connect(&hosts[2]).await;
    for (ws, name) in [(&mut ann, "ann"), (&mut bob, "bob"), (&mut cid, "cid")] {
        asks(ws, &format!("nick {name}"), &format!("nick {name}")).await;
        asks(ws, "join r", "joined r").await;
    }
    // A send to a group reaches its members on every host, once each.
    say(&mut ann, "say r hello").await;
    for ws in [&mut ann, &mut bob, &mut cid] {
        assert_eq!(next_text(ws).await, "hello");
    }
    // A send to a uid reaches it on another host (and no one else: the next message each of
    // the others gets is the one after).
    say(&mut ann, "to bob psst").await;
    assert_eq!(next_text(&mut bob).await, "psst");
    say(&mut cid, "say r two").await;
    for ws in [&mut ann, &mut bob, &mut cid] {
        assert_eq!(next_text(ws).await, "two");
    }
    // In order across hosts; how long a group send takes to reach another host's client.
    let mut took = Vec::new();
    for i in 0..20 {
        let sent = Instant::now();
        say(&mut ann, &format!("say r m{i}")).await;
        assert_eq!(next_text(&mut bob).await, format!("m{i}"));
        took.push(sent.elapsed());
    }
    for ws in [&mut ann, &mut cid] {
        for i in 0..20 {
            assert_eq!(next_text(ws).await, format!("m{i}"));
        }
    }
    took.sort_unstable();
    eprintln!(
        "a group send from host 0 to a client of host 1: median {:?}, worst {:?} (20 sends)",
        took[10], took[19]
    );
    // Presence is the cluster's: the group's size and a uid's connections, asked on any host.
    assert_eq!(hosts[2].body("/gateway/notify/r").await, "sent count=3\n");
    for ws in [&mut ann, &mut bob, &mut cid] {
        assert_eq!(next_text(ws).await, "notify r");
    }
    assert_eq!(hosts[0].body("/gateway/online/bob").await, "online 1\n");
    assert_eq!(hosts[1].body("/gateway/online/ann").await, "online 1\n");
    assert_eq!(hosts[1].body("/gateway/online/nobody").await, "online 0\n");
    let body = metrics_when(&hosts[1], "messages across hosts", |b| {
        metric(b, "gateway_cluster_received_total", &GW) >= 2.0
            && metric(b, "gateway_cluster_published_total", &GW) >= 1.0
    })
    .await;
    assert_eq!(metric(&body, "gateway_cluster_up", &GW), 1.0);

    // Redis stops: every host sees its link down; local delivery goes on.
    redis.stop();
    wait_cluster(&hosts, "down").await;
    let mut ann2 = connect(&hosts[0]).await;
    asks(&mut ann2, "join r", "joined r").await;
    say(&mut ann, "say r local").await;
    for ws in [&mut ann, &mut ann2] {
        assert_eq!(next_text(ws).await, "local");
    }
    // A send to a uid on another host fails, counted; a count is this host's alone.
    say(&mut ann, "to bob lost").await;
    assert_eq!(hosts[0].body("/gateway/notify/r").await, "sent count=2\n");
    for ws in [&mut ann, &mut ann2] {
        assert_eq!(next_text(ws).await, "notify r");
    }
    let body = metrics_when(&hosts[0], "the cross-host sends counted as errors", |b| {
        metric(
            b,
            "gateway_cluster_errors_total",
            &["group=\"gw\"", "cause=\"down\""],
        ) >= 3.0
    })
    .await;
    assert_eq!(metric(&body, "gateway_cluster_up", &GW), 0.0);
    let status = hosts[0].status().await;
    let figures = gateway(&status);
    assert_eq!(figures.clients, 2, "{figures:?}");
    let link = figures.cluster.as_ref().expect("a cluster link");
    assert!(link.errors["down"] >= 3, "{link:?}");
    assert_eq!((link.up, link.processes), (0, 1), "{link:?}");

    // Redis is back on its port: every host links again and sends cross hosts again. Nothing
    // sent during the outage arrives late: each client's next message is the new one.
    redis.restart().await;
    wait_cluster(&hosts, "up").await;
    say(&mut cid, "say r back").await;
    for ws in [&mut ann, &mut ann2, &mut bob, &mut cid] {
        assert_eq!(next_text(ws).await, "back");
    }
    // ann2 has no uid: only ann gets it (ann2's next message is the room's below).
    say(&mut bob, "to ann hi").await;
    assert_eq!(next_text(&mut ann).await, "hi");
    assert_eq!(hosts[1].body("/gateway/notify/r").await, "sent count=4\n");
    for ws in [&mut ann2, &mut ann, &mut bob, &mut cid] {
        assert_eq!(next_text(ws).await, "notify r");
    }
    let status = hosts[0].status().await;
    let link = gateway(&status).cluster.clone().expect("a cluster link");
    assert!(link.connects >= 2, "it linked again: {link:?}");

    // Redis hangs (SIGSTOP, its connections open): no Redis call waits past its deadline, so
    // every host finds its link down (a host that publishes nothing, by its PING), and local
    // delivery goes on meanwhile. Let go on, it is linked again and sends cross hosts again.
    redis.run(false);
    say(&mut ann, "say r frozen").await;
    for ws in [&mut ann, &mut ann2] {
        assert_eq!(next_text(ws).await, "frozen");
    }
    wait_cluster(&hosts, "down").await;
    redis.run(true);
    wait_cluster(&hosts, "up").await;
    say(&mut cid, "say r thawed").await;
    for ws in [&mut ann, &mut ann2] {
        assert_eq!(next_text(ws).await, "thawed");
    }
    // "frozen" was written to Redis before the deadline: Redis may still pass it on once it
    // runs again (a send that timed out is counted as failed, yet may arrive).
    for ws in [&mut bob, &mut cid] {
        let mut next = next_text(ws).await;
        if next == "frozen" {
            next = next_text(ws).await;
        }
        assert_eq!(next, "thawed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_the_gateways_figures_even_with_no_redis() {
    // A cluster whose Redis is not there (a port nothing listens on): the host starts and
    // serves its own clients; what would cross hosts is counted.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let host = gateway_host_with(
        &fixture_plugin(""),
        1,
        &format!("cluster = \"redis://127.0.0.1:{port}\"\ngateway_max_message = \"1KiB\""),
    )
    .await;
    let mut a = connect(&host).await;
    let mut b = connect(&host).await;
    for ws in [&mut a, &mut b] {
        asks(ws, "join r", "joined r").await;
    }
    say(&mut a, "say r here").await;
    for ws in [&mut a, &mut b] {
        assert_eq!(next_text(ws).await, "here");
    }
    // A client closed by the host: a message over gateway_max_message (1009).
    let mut big = connect(&host).await;
    big.send(Message::Text("x".repeat(4096).into()))
        .await
        .unwrap();
    let code = tests::ws_close_code(&mut big).await.map(u16::from);
    assert_eq!(code, Some(1009));

    // (Its `Close` event is handled, and the gauges read at the router's tick, soon after.)
    let status = host
        .wait_status("the closed client counted, its close handled", |s| {
            let g = gateway(s);
            g.closed.get("too_big") == Some(&1) && g.clients == 2 && g.unhandled_events == 0
        })
        .await;
    let figures = gateway(&status);
    let mut causes: Vec<&str> = figures.closed.keys().map(String::as_str).collect();
    causes.sort_unstable();
    assert_eq!(
        causes,
        [
            "bad_input",
            "gateway_hold",
            "ping_timeout",
            "send_queue",
            "too_big",
            "unhandled_queue"
        ]
    );
    let link = figures.cluster.as_ref().expect("a cluster link");
    assert_eq!(link.state, "down", "{link:?}");
    assert!(link.errors["down"] >= 1, "{link:?}");
    // The process's own figures are there too.
    let gw = group(&status, "gw");
    assert!(gw.workers.iter().all(|w| w.gateway.is_some()), "{gw:?}");
    assert!(
        group(&status, "app").gateway.is_none(),
        "a plugin group has no gateway figures"
    );

    let body = metrics_when(&host, "the gateway's families", |b| {
        metric(
            b,
            "gateway_closed_clients_total",
            &["group=\"gw\"", "cause=\"too_big\""],
        ) == 1.0
            && metric(b, "gateway_clients", &GW) == 2.0
    })
    .await;
    for family in [
        "gateway_queued_bytes",
        "gateway_unhandled_events",
        "gateway_redelivered_events_total",
        "gateway_refused_clients_total",
        "gateway_cluster_up",
        "gateway_cluster_errors_total",
    ] {
        assert!(
            body.lines()
                .any(|l| l.starts_with(family) && l.contains("group=\"gw\"")),
            "no {family} for group gw in /metrics"
        );
    }
    assert!(metric(&body, "gateway_cluster_errors_total", &["cause=\"down\""]) >= 1.0);
    // The text status shows them too.
    let out = host.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("gateway: 2 clients") && text.contains("cluster down"),
        "{text}"
    );
}
