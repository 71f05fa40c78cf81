//! The chat example (`example-chat/`, issue 21 item 7) on the real host: a business group `app`
//! of 2 workers running the chat plugin and a gateway group `gw` in front of it. Every command
//! of its text protocol and its one-line errors and bounds; `POST /rooms/R/notify` reaching the
//! room from HTTP; the page at `/`; chat clients sending numbered `echo`s through a `host
//! reload` of the business group (none disconnected, every message answered once and in order,
//! `gen=` moving from the old generation to the new, sessions and rooms intact); and the
//! example's own `host.toml` passing `host check` as it is written.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt as _;
use http_body_util::{BodyExt as _, Full};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use tests::build::chat_plugin;
use tests::gateway::{bursts_through_reload, texts, ws_when_room};
use tests::groups::{group_addr, group_generation, group_pids};
use tests::{Host, HostOptions, Ws, get, host_bin, metric, workspace};

/// A host whose group `app` (2 workers) runs the chat plugin, with `ws_url` in its
/// `[plugin_config]`, behind the gateway group `gw`.
async fn chat_host() -> Host {
    let extra = "admin_listen = \"127.0.0.1:0\"\n[[group]]\nname = \"app\"\nworkers = 2\n[group.plugin_config]\nws_url = \"ws://chat.test/chat\"\n\n[[group]]\nname = \"gw\"\ngateway = true\nbusiness = \"app\"\nworkers = 1\ngateway_hold = \"10s\"\n".to_string();
    let opts = HostOptions {
        extra,
        ..HostOptions::default()
    };
    Host::start(&chat_plugin(), opts).await
}

/// Sends `line` and returns the one answer.
async fn ask(ws: &mut Ws, line: &str) -> String {
    ws.send(Message::Text(line.into())).await.unwrap();
    texts(ws, 1).await.remove(0)
}

/// `POST body` to `path` with hyper-util's client: the status and the body.
async fn post(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> (u16, String) {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("http://{addr}{path}"))
        .body(Full::new(body.into()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("an answer within 10 s")
        .expect("POST");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chat_command_its_errors_the_notify_and_the_page() {
    let host = chat_host().await;
    let status = host.status().await;
    let (http, gw) = (group_addr(&status, "app"), group_addr(&status, "gw"));
    let generation = group_generation(&status, "app");

    // The page: self-contained, connecting where [plugin_config] says.
    let page = get(http, "/").await.expect("GET /");
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("<html") && page.body.contains("new WebSocket("));
    assert!(
        page.body.contains("\"ws://chat.test/chat\""),
        "{}",
        page.body
    );
    assert!(!page.body.contains("src=\"http") && !page.body.contains("href=\"http"));

    let (mut ann, mut bob, mut bob2, mut eve) = (
        ws_when_room(gw).await,
        ws_when_room(gw).await,
        ws_when_room(gw).await,
        ws_when_room(gw).await,
    );
    assert_eq!(
        ask(&mut ann, "echo hi there").await,
        format!("gen={generation} hi there")
    );
    assert_eq!(
        ask(&mut ann, "say lobby x").await,
        "error: set a nick first: nick NAME"
    );
    assert_eq!(ask(&mut ann, "nick ann").await, "nick ann");
    for ws in [&mut bob, &mut bob2] {
        assert_eq!(ask(ws, "nick bob").await, "nick bob");
    }
    assert_eq!(ask(&mut eve, "nick eve").await, "nick eve");
    assert_eq!(
        ask(&mut ann, "say lobby x").await,
        "error: join lobby first"
    );
    for ws in [&mut ann, &mut bob] {
        assert_eq!(ask(ws, "join lobby").await, "joined lobby");
    }
    // say: every member, the sender included; eve (not a member) and bob2 (bob's other
    // connection, not in the room) get nothing.
    ann.send(Message::Text("say lobby hello all".into()))
        .await
        .unwrap();
    for ws in [&mut ann, &mut bob] {
        assert_eq!(texts(ws, 1).await, ["lobby ann: hello all"]);
    }
    // to: every connection of the uid.
    eve.send(Message::Text("to bob psst".into())).await.unwrap();
    for ws in [&mut bob, &mut bob2] {
        assert_eq!(texts(ws, 1).await, ["from eve: psst"]);
    }
    assert_eq!(
        ask(&mut eve, "to nobody x").await,
        "error: no one is called nobody"
    );
    // session: the nick and rooms, as JSON.
    let session: serde_json::Value = serde_json::from_str(&ask(&mut ann, "session").await).unwrap();
    assert_eq!(
        session,
        serde_json::json!({"nick": "ann", "rooms": ["lobby"]})
    );

    // POST /rooms/lobby/notify reaches the room's members from HTTP.
    let (code, said) = post(http, "/rooms/lobby/notify", "deploy at 5").await;
    assert_eq!((code, said.as_str()), (200, "sent to 2 clients\n"));
    for ws in [&mut ann, &mut bob] {
        assert_eq!(texts(ws, 1).await, ["lobby: deploy at 5"]);
    }
    let (code, _) = post(http, "/rooms/lobby/notify", vec![b'x'; 17 * 1024]).await;
    assert_eq!(code, 413);
    let (code, _) = post(http, "/rooms/no%20room/notify", "x").await;
    assert_eq!(code, 400);
    let (code, _) = post(http, "/rooms/lobby/notify", vec![0xff, 0xfe]).await;
    assert_eq!(code, 400);
    assert_eq!(get(http, "/rooms/lobby/notify").await.unwrap().status, 405);

    // Bad input: one line each, and the client stays.
    let long = "n".repeat(33);
    for (line, answer) in [
        (
            "dance",
            "error: unknown command \"dance\"; commands: echo TEXT, nick NAME, join ROOM, leave ROOM, say ROOM TEXT, to NAME TEXT, session",
        ),
        ("nick", "error: usage: nick NAME"),
        (
            &format!("nick {long}"),
            "error: a name is 1 to 32 letters, digits, '_', '-' or '.'",
        ),
        (
            "join a/b",
            "error: a room is 1 to 32 letters, digits, '_', '-' or '.'",
        ),
        ("say lobby", "error: usage: say ROOM TEXT"),
        ("to bob", "error: usage: to NAME TEXT"),
    ] {
        assert_eq!(ask(&mut eve, line).await, answer, "{line}");
    }
    eve.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(texts(&mut eve, 1).await, ["error: text commands only"]);
    // At most 16 rooms a client; leave makes room.
    for r in 0..16 {
        assert_eq!(
            ask(&mut eve, &format!("join r{r}")).await,
            format!("joined r{r}")
        );
    }
    assert_eq!(
        ask(&mut eve, "join r16").await,
        "error: at most 16 rooms; leave one first"
    );
    assert_eq!(
        ask(&mut eve, "join r3").await,
        "joined r3",
        "a room joined again"
    );
    assert_eq!(ask(&mut eve, "leave r0").await, "left r0");
    assert_eq!(ask(&mut eve, "join r16").await, "joined r16");
    let session: serde_json::Value = serde_json::from_str(&ask(&mut eve, "session").await).unwrap();
    assert_eq!(session["rooms"].as_array().unwrap().len(), 16, "{session}");
    assert_eq!(ask(&mut ann, "leave lobby").await, "left lobby");
    let (_, said) = post(http, "/rooms/lobby/notify", "bye").await;
    assert_eq!(said, "sent to 1 clients\n");
    assert_eq!(texts(&mut bob, 1).await, ["lobby: bye"]);

    // Nothing else arrived anywhere: each client's next message is its own echo.
    for ws in [&mut ann, &mut bob, &mut bob2, &mut eve] {
        assert_eq!(ask(ws, "echo end").await, format!("gen={generation} end"));
    }
    // Each refusal counted by reason in /metrics (the plugin's series, summed over workers).
    let expected = [
        ("command", 4.0),
        ("name", 2.0),
        ("rooms", 1.0),
        ("nick_first", 1.0),
        ("not_member", 1.0),
        ("offline", 1.0),
        ("binary", 1.0),
        ("notify", 4.0),
    ];
    let admin = host.admin_addr().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = get(admin, "/metrics").await.expect("GET /metrics").body;
        let counts: Vec<(&str, f64)> = expected
            .iter()
            .map(|(reason, _)| {
                let label = format!("reason=\"{reason}\"");
                (*reason, metric(&body, "chat_refused_total", &[&label]))
            })
            .collect();
        if counts == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chat_refused_total: {counts:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A connect to another path is refused by the plugin.
    match tokio_tungstenite::connect_async(format!("ws://{gw}/other")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected 404 for /other, got {other:?}"),
    }
}

/// Sends `echo c{i}-{j}` for `j` in `range` on each client, then reads as many answers.
async fn echo_burst(
    clients: &mut [Ws],
    answers: &mut [Vec<String>],
    range: std::ops::Range<usize>,
) {
    for (i, ws) in clients.iter_mut().enumerate() {
        for j in range.clone() {
            ws.send(Message::Text(format!("echo c{i}-{j}").into()))
                .await
                .unwrap();
        }
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        answers[i].extend(texts(ws, range.len()).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_clients_keep_order_and_sessions_through_a_business_reload() {
    let host = chat_host().await;
    let status = host.status().await;
    let gw = group_addr(&status, "gw");
    let old = group_generation(&status, "app");
    let old_pids = group_pids(&status, "app");
    let gw_pids = group_pids(&status, "gw");
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut ws = ws_when_room(gw).await;
        assert_eq!(
            ask(&mut ws, &format!("nick c{i}")).await,
            format!("nick c{i}")
        );
        assert_eq!(ask(&mut ws, "join r").await, "joined r");
        clients.push(ws);
    }
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    echo_burst(&mut clients, &mut answers, 0..5).await;
    // Bursts of 5 a client while the reload replaces both workers, then one more.
    let reload = host.spawn_cli(&["reload", "app"]);
    let mut next = bursts_through_reload(&host, reload, 5, async |range| {
        echo_burst(&mut clients, &mut answers, range).await
    })
    .await;
    let status = host.status().await;
    let new = group_generation(&status, "app");
    assert!(new > old, "no new generation: {status:?}");
    assert!(
        group_pids(&status, "app")
            .iter()
            .all(|p| !old_pids.contains(p))
    );
    assert_eq!(
        group_pids(&status, "gw"),
        gw_pids,
        "the gateway was replaced"
    );
    echo_burst(&mut clients, &mut answers, next..next + 5).await;
    next += 5;

    // Each message answered once, in order; gen= never goes back, from old to new.
    let mut during = 0;
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got.len(), next, "client {i}: {got:?}");
        let mut last = old;
        for (j, answer) in got.iter().enumerate() {
            let (g, text) = answer
                .strip_prefix("gen=")
                .and_then(|a| a.split_once(' '))
                .unwrap_or_else(|| panic!("client {i}: {answer:?}"));
            let g: u64 = g.parse().unwrap();
            assert_eq!(text, format!("c{i}-{j}"), "client {i}: {got:?}");
            assert!(g == old || g == new, "client {i}: {answer}");
            assert!(g >= last, "client {i}: gen went back at {j}: {got:?}");
            last = g;
            during += usize::from(j >= 5 && g == old);
        }
        assert!(got[0].starts_with(&format!("gen={old} ")), "{got:?}");
        assert!(got[next - 1].starts_with(&format!("gen={new} ")), "{got:?}");
    }
    eprintln!(
        "{next} echoes a client; {during} answered by the old generation after the reload began"
    );

    // Sessions and rooms intact: the new workers read them, and the gateway kept the room.
    for (i, ws) in clients.iter_mut().enumerate() {
        let session: serde_json::Value = serde_json::from_str(&ask(ws, "session").await).unwrap();
        assert_eq!(
            session,
            serde_json::json!({"nick": format!("c{i}"), "rooms": ["r"]})
        );
    }
    clients[0]
        .send(Message::Text("say r still here".into()))
        .await
        .unwrap();
    for ws in clients.iter_mut() {
        assert_eq!(texts(ws, 1).await, ["r c0: still here"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_host_toml_passes_check_as_written() {
    // The file as shipped, beside a tree shaped like the repository's (its paths are relative
    // to its own directory: ../target/release/libexample_chat.so, ../.host-chat).
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("example-chat")).unwrap();
    std::fs::create_dir_all(root.path().join("target/release")).unwrap();
    let config = root.path().join("example-chat/host.toml");
    std::fs::copy(workspace().join("example-chat/host.toml"), &config).unwrap();
    tests::install(
        &chat_plugin(),
        &root.path().join("target/release/libexample_chat.so"),
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(host_bin())
            .arg("-c")
            .arg(&config)
            .arg("check")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("check within 30 s")
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    for name in ["chat", "gateway"] {
        assert!(said.contains(name), "check names no group {name}: {said}");
    }
}
