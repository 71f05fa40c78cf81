//! A bad build or a crash never takes the service down: refused builds under load, rollback,
//! crash replacement with backoff, cut requests, coalesced reloads, stop during a reload.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use host_status::{StatusReport, WorkerStateName};
use tests::{
    Host, HostOptions, Load, Mode, example_plugin, fixture_plugin, get, greeting_plugin, pid_alive,
    wait_until,
};

/// A real shared library that is not a plugin.
fn system_library() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/aarch64-linux-gnu/libz.so.1",
        "/usr/lib/libz.so.1",
    ]
    .into_iter()
    .chain([
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ])
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libz or libm on this machine")
}

enum Bad {
    Remove,
    Bytes(Vec<u8>),
    Build(PathBuf),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_builds_are_refused_under_load_and_the_old_build_keeps_serving() {
    let v1 = greeting_plugin("v1");
    let truncated = {
        let bytes = std::fs::read(greeting_plugin("v2")).unwrap();
        // Cut inside the loadable segments (a debug build's tail is only debug info).
        bytes[..64 * 1024].to_vec()
    };
    let cases: Vec<(&str, Bad, &[&str])> = vec![
        ("missing file", Bad::Remove, &["does not exist"]),
        ("empty file", Bad::Bytes(Vec::new()), &["is empty"]),
        (
            "text file",
            Bad::Bytes(b"#!/bin/sh\necho not a plugin\n".to_vec()),
            &["not an ELF"],
        ),
        (
            "truncated .so",
            Bad::Bytes(truncated),
            &["not a loadable shared library"],
        ),
        (
            "system library",
            Bad::Build(system_library()),
            &["not a plugin", "host_plugin_entry_v1"],
        ),
        (
            "ABI major 2",
            Bad::Build(fixture_plugin("abi-major")),
            &["incompatible plugin ABI", "expected major 1, found 2"],
        ),
        (
            "plugin-api 9.9.9",
            Bad::Build(fixture_plugin("api-version")),
            &[
                "incompatible plugin-api version",
                "expected 0.1.x, found 9.9.9",
            ],
        ),
        (
            "start panics",
            Bad::Build(example_plugin(&[("EXAMPLE_FAIL_START", "panic")])),
            &["on_worker_start panicked", "EXAMPLE_FAIL_START=panic"],
        ),
        (
            "start errors",
            Bad::Build(example_plugin(&[("EXAMPLE_FAIL_START", "error")])),
            &["on_worker_start failed", "EXAMPLE_FAIL_START=error"],
        ),
        (
            "start hangs",
            Bad::Build(example_plugin(&[("EXAMPLE_FAIL_START", "hang")])),
            &["did not become ready within start_timeout (2s)"],
        ),
        (
            "start aborts",
            Bad::Build(fixture_plugin("start-abort")),
            &["killed by SIGABRT"],
        ),
        (
            "start segfaults",
            Bad::Build(fixture_plugin("start-segfault")),
            &["killed by SIGSEGV"],
        ),
    ];
    let good = greeting_plugin("v2");

    let host = Host::start(
        &v1,
        HostOptions {
            extra: "start_timeout = \"2s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let workers = host.worker_pids(None).await;
    let load = Load::start(host.addr, 8, Mode::Close, "/");
    load.advance(100).await;

    for (name, bad, causes) in cases {
        match bad {
            Bad::Remove => std::fs::remove_file(&host.plugin).unwrap(),
            Bad::Bytes(bytes) => {
                std::fs::write(&host.plugin, bytes).unwrap();
            }
            Bad::Build(path) => host.install_plugin(&path),
        }
        let began = Instant::now();
        let out = host.cli(&["reload"]).await;
        let took = began.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: reload must fail\n{}",
            host.explain(&out)
        );
        assert!(
            took < Duration::from_secs(2 + 3),
            "{name}: reload took {took:?}, past start_timeout + a little"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{name}: one line, got: {err}"
        );
        assert!(
            err.contains("plugin.so"),
            "{name}: the message names the file: {err}"
        );
        for cause in causes {
            assert!(
                err.contains(cause),
                "{name}: the message says {cause:?}: {err}"
            );
        }
        let status = host.status().await;
        let last = status.last_reload.as_ref().unwrap();
        assert!(!last.ok, "{name}");
        assert!(
            last.error.as_deref().unwrap().contains(causes[0]),
            "{name}: {status:?}"
        );
        assert_eq!(
            host.worker_pids(None).await,
            workers,
            "{name}: the canary failed, no old worker was touched"
        );
        load.advance(20).await;
    }

    host.install_plugin(&good);
    host.reload_ok().await;
    assert!(host.body("/").await.starts_with("v2 from"));
    load.advance(50).await;
    let report = load.finish().await;
    assert!(
        report.errors.is_empty(),
        "failed requests: {:?}",
        &report.errors[..report.errors.len().min(3)]
    );
    assert!(
        report.non_200.is_empty(),
        "non-200: {:?}",
        &report.non_200[..report.non_200.len().min(3)]
    );
    assert!(report.unprocessed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_returns_to_the_previous_generation_and_old_snapshots_are_pruned() {
    let (v1, v2, v3) = (
        greeting_plugin("v1"),
        greeting_plugin("v2"),
        greeting_plugin("v3"),
    );
    let host = Host::start(
        &v1,
        HostOptions {
            extra: "keep_snapshots = 2".into(),
            ..Default::default()
        },
    )
    .await;
    let out = host.cli(&["rollback"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no previous generation"),
        "{}",
        host.explain(&out)
    );

    let load = Load::start(host.addr, 8, Mode::KeepAlive, "/");
    host.install_plugin(&v2);
    host.reload_ok().await;
    load.advance(100).await;
    let out = host.cli(&["rollback"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rolled back"),
        "{}",
        host.explain(&out)
    );
    assert!(
        host.body("/").await.starts_with("v1 from"),
        "rollback serves v1 again"
    );
    let status = host.status().await;
    assert_eq!(status.last_reload.unwrap().kind, "rollback");
    // Rolling back again returns to v2 (like `cd -`), even though the file on disk says v2 too.
    host.cli(&["rollback"]).await;
    assert!(host.body("/").await.starts_with("v2 from"));
    load.advance(100).await;

    host.install_plugin(&v3);
    host.reload_ok().await;
    let report = load.finish().await;
    assert!(
        report.errors.is_empty() && report.non_200.is_empty(),
        "{report:?}"
    );

    // keep_snapshots = 2: the v2 and v3 snapshots stay, v1's is pruned once its workers are gone.
    let old = host.worker_pids(Some(WorkerStateName::Draining)).await;
    wait_until(Duration::from_secs(15), "drained workers to exit", || {
        old.iter().all(|&p| !pid_alive(p))
    })
    .await;
    host.install_plugin(&v3);
    host.reload_ok().await; // same bytes: a new generation, no new snapshot; prunes what the last one still held
    let snapshots: Vec<_> = std::fs::read_dir(host.dir.path().join("state/plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".so"))
        .collect();
    assert_eq!(
        snapshots.len(),
        1,
        "only v3's snapshot is still kept (the last two generations both ran v3): {snapshots:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_workers_are_replaced_their_exit_decoded_and_their_requests_named() {
    let host = Host::start(&fixture_plugin(""), HostOptions::default()).await;
    let load = Load::start(host.addr, 8, Mode::Close, "/");
    load.advance(50).await;
    for (how, expect) in [
        ("SIGKILL", "killed by SIGKILL"),
        ("/segfault", "killed by SIGSEGV"),
        ("/abort", "killed by SIGABRT"),
    ] {
        let before = host.worker_pids(Some(WorkerStateName::Ready)).await;
        if how == "SIGKILL" {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(before[0] as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        } else {
            // The request dies with its worker: that one is expected to fail.
            let _ = get(host.addr, how).await;
        }
        host.wait_for_replacement(&format!("{how}: a replacement worker"), &before)
            .await;
        let log = host.log();
        let line = log
            .lines()
            .find(|l| l.contains(expect))
            .unwrap_or_else(|| panic!("{how}: the exit is decoded as {expect:?}"));
        if how != "SIGKILL" {
            // The evidence survives the abrupt death: the request that did it is named.
            assert!(
                line.contains(&format!("in flight: GET {how} (")),
                "{how}: the log names the request in flight: {line}"
            );
        }
        assert_eq!(host.body("/").await, "fixture ok\n");
        load.advance(50).await;
    }
    let report = load.finish().await;
    // A worker that dies takes the requests it was serving with it (at most one per client),
    // and nothing else: the other worker and the replacement serve everything after.
    assert!(
        report.errors.len() <= 3 * 8,
        "{} failed for 3 deaths: {:?}",
        report.errors.len(),
        report.errors
    );
    assert!(report.non_200.is_empty(), "{:?}", report.non_200);
    eprintln!(
        "3 worker deaths under load: {} ok, {} failed with their worker",
        report.ok,
        report.errors.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loop_backs_off_and_a_reload_still_works() {
    let (host, marker) = tests::fixture_host_with_marker("FIXTURE_CRASH_MARKER").await;
    // From now on every new worker of this build aborts in on_worker_start.
    std::fs::write(&marker, b"crash").unwrap();
    let load = Load::start(host.addr, 8, Mode::Close, "/");
    load.advance(50).await;
    let victim = host.worker_pids(Some(WorkerStateName::Ready)).await[0];
    let began = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let failing = |s: &StatusReport| s.slots.iter().find(|s| s.state == "failing").cloned();
    let status = host
        .wait_status("the slot to show as failing", |s| {
            failing(s).is_some_and(|f| f.failures >= 4)
        })
        .await;
    let slot = failing(&status).unwrap();
    assert!(
        slot.last_error.as_deref().unwrap().contains("SIGABRT"),
        "{slot:?}"
    );
    // Backoff, not a spin: 100, 200, 400 ms... between attempts, so few attempts in this time.
    let elapsed = began.elapsed();
    let failures = u64::from(slot.failures);
    let max_expected = 2 + (elapsed.as_millis() as f64 / 100.0).log2().max(0.0).ceil() as u64 + 1;
    assert!(
        failures <= max_expected,
        "{failures} failures in {elapsed:?} is a spin, not a backoff (at most {max_expected})"
    );
    let text = String::from_utf8_lossy(&host.cli(&["status"]).await.stdout).into_owned();
    assert!(
        text.contains("FAILING") && text.contains("SIGABRT"),
        "{text}"
    );
    // The other slot keeps serving throughout.
    assert_eq!(host.body("/").await, "fixture ok\n");

    // A reload during the crash loop works and fills the slot with the new build.
    host.install_plugin(&greeting_plugin("v2"));
    host.reload_ok().await;
    let status = host.status().await;
    assert!(failing(&status).is_none(), "{status:?}");
    assert_eq!(
        host.worker_pids(Some(WorkerStateName::Ready)).await.len(),
        2
    );
    assert!(host.body("/").await.starts_with("v2 from"));
    load.advance(50).await;
    let report = load.finish().await;
    assert!(
        report.errors.len() <= 8,
        "only the killed worker's requests may fail: {:?}",
        report.errors
    );
    assert!(report.non_200.is_empty(), "{:?}", report.non_200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_past_graceful_timeout_get_503_and_are_logged() {
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            workers: 1,
            extra: "graceful_timeout = \"1s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let addr = host.addr;
    // One on the blocking pool, one an async handler still waiting on its timer.
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=20000").await });
    let slow_async = tokio::spawn(async move { get(addr, "/async/sleep?ms=20000").await });
    host.wait_status("the slow requests in flight", |s| {
        s.workers[0].in_flight == 2
    })
    .await;
    let old = host.worker_pids(None).await[0];
    let load = Load::start(host.addr, 8, Mode::KeepAlive, "/");
    load.advance(50).await;
    host.install_plugin(&greeting_plugin("v2"));
    let began = Instant::now();
    host.reload_ok().await;
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "reload does not wait for the drain"
    );
    wait_until(
        Duration::from_secs(10),
        "the old worker to be cut off at graceful_timeout",
        || !pid_alive(old),
    )
    .await;
    // Not a closed connection: an answer the client can act on.
    for slow in [slow, slow_async] {
        let cut = slow
            .await
            .unwrap()
            .expect("the cut request gets a response");
        assert_eq!(cut.status, 503, "{cut:?}");
        assert_eq!(cut.retry_after.as_deref(), Some("1"), "{cut:?}");
    }
    wait_until(Duration::from_secs(5), "the cuts to be logged", || {
        let log = host.log();
        log.contains("answered_503=2") && log.contains("cut_requests=2")
    })
    .await;
    let report = load.finish().await;
    assert!(
        report.errors.is_empty() && report.non_200.is_empty() && report.unprocessed.is_empty(),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_during_a_rollout_are_coalesced_and_each_answered() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    host.install_plugin(&example_plugin(&[
        ("EXAMPLE_GREETING", "slow"),
        ("EXAMPLE_START_DELAY_MS", "500"),
    ]));
    let load = Load::start(host.addr, 8, Mode::Close, "/");
    let first = host.spawn_cli(&["reload"]);
    host.wait_for_workers(WorkerStateName::Starting).await;
    let (a, b) = tokio::join!(host.cli(&["reload"]), host.cli(&["reload"]));
    let first = first.await.unwrap();
    for out in [&first, &a, &b] {
        assert!(out.status.success(), "{}", host.explain(out));
    }
    let gens: Vec<String> = [&first, &a, &b]
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    assert!(gens[0].contains("generation 2"), "{gens:?}");
    assert!(
        gens[1].contains("generation 3") && gens[2].contains("generation 3"),
        "the two queued reloads shared one rollout: {gens:?}"
    );
    assert_eq!(host.status().await.generation, 3);
    let report = load.finish().await;
    assert!(
        report.errors.is_empty() && report.non_200.is_empty(),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_during_a_reload_leaves_nothing_behind() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let mut pids = host.worker_pids(None).await;
    host.install_plugin(&example_plugin(&[
        ("EXAMPLE_GREETING", "slow"),
        ("EXAMPLE_START_DELAY_MS", "3000"),
    ]));
    let reload = host.spawn_cli(&["reload"]);
    let starting = host.wait_for_workers(WorkerStateName::Starting).await;
    pids.extend(starting);
    host.stop_during(reload, &pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_built_for_abi_1_0_still_loads_and_serves() {
    let host = Host::start(&fixture_plugin("abi-1-0"), HostOptions::default()).await;
    let load = Load::start(host.addr, 4, Mode::KeepAlive, "/");
    load.advance(100).await;
    let report = load.finish().await;
    assert!(
        report.errors.is_empty() && report.non_200.is_empty(),
        "{report:?}"
    );
    assert_eq!(host.body("/").await, "fixture ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_built_for_abi_1_1_and_1_2_still_load_and_serve() {
    for kind in ["abi-1-1", "abi-1-2"] {
        let host = Host::start(&fixture_plugin(kind), HostOptions::default()).await;
        assert_eq!(host.body("/").await, "fixture ok\n", "{kind}");
        // Their vtable has no async hooks: a path the plugin would send to `serve` gets
        // `handle` instead, as those hosts did.
        assert_eq!(host.body("/bad-upgrade").await, "fixture ok\n", "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_wrongly_declared_non_blocking_is_moved_off_the_io_thread() {
    let host = Host::start(
        &fixture_plugin(""),
        HostOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .await;
    // The first calls run inline (the plugin said it would not block): the first makes the path
    // a suspect, the second is judged by the thread's clock and caught.
    assert_eq!(host.body("/lying-sleep").await, "slept\n");
    assert_eq!(host.body("/lying-sleep").await, "slept\n");
    wait_until(Duration::from_secs(5), "the stall to be logged", || {
        host.log().contains("stalled the I/O thread")
    })
    .await;
    // From now on it runs on the blocking pool: fast requests are answered while it sleeps
    // (3 s: far longer than ten fast requests take, even on a loaded machine).
    let addr = host.addr;
    let slow: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { get(addr, "/lying-sleep?ms=3000").await }))
        .collect();
    for _ in 0..10 {
        assert_eq!(host.body("/").await, "fixture ok\n");
    }
    assert!(
        slow.iter().any(|t| !t.is_finished()),
        "fast requests were answered while the slow ones slept"
    );
    for t in slow {
        assert_eq!(t.await.unwrap().unwrap().body, "slept\n");
    }
}

/// Sends `GET path` with `headers` on a fresh connection; the response's body.
async fn body_with_headers(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or_else(|| panic!("no content-length in {head}"));
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return body[..len].to_string();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, conn.read(&mut buf))
            .await
            .expect("a whole response within 10 s")
            .expect("read");
        assert!(n > 0, "connection closed after {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_headers_reach_the_plugin_as_sent_with_their_names_coded_or_not() {
    // Names in the host's table (standard and not), names outside it, a name sent twice, mixed
    // case: what the plugin sees is what a client sent, whichever way each name crossed.
    let sent = [
        ("Host", "127.0.0.1"),
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0)"),
        ("Accept", "text/html,*/*;q=0.8"),
        ("sec-fetch-mode", "navigate"),
        ("X-Custom-Thing", "a b\tc"),
        ("Cookie", "a=1"),
        ("cookie", "b=2"),
        ("Upgrade-Insecure-Requests", "1"),
    ];
    let expected: String = sent
        .iter()
        .map(|(n, v)| format!("{}: {v}\n", n.to_ascii_lowercase()))
        .collect();
    // A 1.6 plugin gets codes; one built for ABI 1.2 gets none and parses every name.
    for (kind, paths) in [
        ("", &["/headers", "/async-headers"][..]),
        ("abi-1-2", &["/headers"][..]),
    ] {
        let host = Host::start(&fixture_plugin(kind), HostOptions::default()).await;
        for path in paths {
            let echoed = body_with_headers(host.addr, path, &sent).await;
            assert_eq!(echoed, expected, "{kind:?} {path}");
        }
    }
}
