//! Rolling reload under load: zero failed requests, new code after `reload` returns, frozen
//! built-in routes, old workers gone after their drain, nothing left after `stop`.

use std::time::Duration;

use host_status::WorkerStateName;
use tests::{Host, HostOptions, Load, Mode, get, greeting_plugin, pid_alive, wait_until};

async fn reload_under_load(mode: Mode) {
    let (v1, v2) = (greeting_plugin("v1"), greeting_plugin("v2"));
    let host = Host::start(&v1, HostOptions::default()).await;
    let health_before = get(host.addr, "/_host/health").await.unwrap();
    assert_eq!(health_before.status, 200);
    assert!(host.body("/").await.starts_with("v1 from example-plugin"));

    let load = Load::start(host.addr, 8, mode, "/");
    load.advance(200).await;

    // Three rollouts back and forth while the clients keep going.
    for (build, greeting) in [(&v2, "v2"), (&v1, "v1"), (&v2, "v2")] {
        let old = host.worker_pids(Some(WorkerStateName::Ready)).await;
        host.install_plugin(build);
        host.reload_ok().await;
        // A connection opened after `reload` returned reaches the new build.
        for _ in 0..4 {
            let reply = get(host.addr, "/").await.unwrap();
            assert!(
                reply.body.starts_with(&format!("{greeting} from")),
                "after reload to {greeting}: {reply:?}"
            );
        }
        load.advance(200).await;
        tests::wait_old_workers_gone(&old).await;
    }
    let report = load.finish().await;
    eprintln!("{mode:?}: {}", report.summary());

    report.assert_clean();
    assert!(
        report.ok >= 800,
        "too few requests to mean anything: {report:?}"
    );
    assert!(
        report.first_lines.keys().any(|l| l.starts_with("v1"))
            && report.first_lines.keys().any(|l| l.starts_with("v2"))
    );
    if mode == Mode::KeepAlive {
        // Keep-alive clients were moved off old workers by `Connection: close`, not left on old code.
        assert!(
            report.closes > 0,
            "keep-alive clients were never asked to reconnect: {report:?}"
        );
    }
    if mode != Mode::Close {
        // Persistent connections did not stay pinned to old workers: each client reconnected.
        assert!(report.connects > 8, "clients never reconnected: {report:?}");
    }

    let health_after = get(host.addr, "/_host/health").await.unwrap();
    assert_eq!(
        health_after.body, health_before.body,
        "built-in routes are frozen across reloads"
    );

    let status = host.status().await;
    assert_eq!(status.generation, 4);
    assert_eq!(status.workers.len(), 2);
    assert!(status.last_reload.unwrap().ok);

    let workers = host.worker_pids(None).await;
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "stop: {}", host.explain(&out));
    for pid in workers.iter().chain([&host.master_pid]) {
        assert!(
            !pid_alive(*pid),
            "pid {pid} still alive after stop returned"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_with_close_clients_fails_nothing() {
    reload_under_load(Mode::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_with_keep_alive_clients_fails_nothing() {
    reload_under_load(Mode::KeepAlive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_with_http2_clients_fails_nothing() {
    reload_under_load(Mode::H2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_flight_request_finishes_on_the_old_worker() {
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .await;
    let addr = host.addr;
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=1500").await });
    // The old worker has the request before the reload starts.
    host.wait_status("the slow request in flight", |s| {
        s.workers[0].in_flight == 1
    })
    .await;
    let old = host.worker_pids(None).await;
    host.install_plugin(&greeting_plugin("v2"));
    host.reload_ok().await;
    assert!(get(addr, "/").await.unwrap().body.starts_with("v2 from"));
    let reply = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "slept 1500 ms\n");
    wait_until(Duration::from_secs(10), "the old worker to exit", || {
        !pid_alive(old[0])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocking_handler_does_not_stall_other_connections() {
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .await;
    let addr = host.addr;
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=3000").await });
    // While the slow handler blocks its thread, the same (only) worker answers others.
    for _ in 0..20 {
        let reply = get(addr, "/").await.unwrap();
        assert_eq!(reply.status, 200);
    }
    assert!(
        !slow.is_finished(),
        "the fast requests were served while the slow one was still running"
    );
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_routes_and_panics() {
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .await;
    let panic = get(host.addr, "/panic").await.unwrap();
    assert_eq!(panic.status, 500);
    // The worker survived its handler's panic and keeps its per-worker state.
    let pid = host.worker_pids(None).await;
    let a = get(host.addr, "/state").await.unwrap();
    let b = get(host.addr, "/state").await.unwrap();
    assert_eq!(a.status, 200);
    let count = |r: &tests::Reply| {
        r.body
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(count(&b), count(&a) + 1, "{a:?} then {b:?}");
    assert_eq!(host.worker_pids(None).await, pid);
    assert!(
        host.log()
            .lines()
            .any(|l| l.contains("/panic was requested") && l.contains("path=\"/panic\"")),
        "the panic message is logged with the request's path: {}",
        host.log()
    );
    assert_eq!(get(host.addr, "/nope").await.unwrap().status, 404);
    assert_eq!(get(host.addr, "/_host/nope").await.unwrap().status, 404);
}
