//! Plugin metrics through the real host and the example plugin: `example_requests_total`,
//! registered by each worker, summed over two workers by the master, labelled with the
//! generation, never going backwards across a worker's crash and a reload; a gauge and a
//! histogram; the bound on a worker's series, counted and logged, with the worker serving on.

use std::net::SocketAddr;
use std::time::Duration;

use host_status::WorkerStateName;
use tests::{Host, HostOptions, example_plugin, get, wait_until};

use tests::prom::{Sample, admin_addr, scrape, sum};

const REQUESTS: &str = "example_requests_total";

/// The example's request count for `route` in `generation`.
fn route_count(samples: &[Sample], generation: &str, route: &str) -> f64 {
    sum(
        samples,
        REQUESTS,
        &[("generation", generation), ("route", route)],
    )
}

async fn two_workers() -> (Host, SocketAddr) {
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            workers: 2,
            extra: "admin_listen = \"127.0.0.1:0\"".into(),
            ..Default::default()
        },
    )
    .await;
    let admin = admin_addr(&host.status().await);
    (host, admin)
}

/// Sends `GET /` on new connections until both ready workers have served some; how many.
async fn until_both_served(host: &Host) -> u64 {
    let mut sent = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..10 {
            assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
            sent += 1;
        }
        let status = host.status().await;
        let served: Vec<u64> = status
            .workers
            .iter()
            .filter(|w| w.state == WorkerStateName::Ready)
            .map(|w| w.requests)
            .collect();
        if served.len() == 2 && served.iter().all(|&n| n > 0) {
            return sent;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "one worker served everything: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_counters_add_up_over_workers_and_never_go_back() {
    let (host, admin) = two_workers().await;
    let sent = until_both_served(&host).await as f64;
    let samples = scrape(&host, admin).await;
    assert_eq!(route_count(&samples, "1", "/"), sent, "{samples:?}");
    let mut seen = route_count(&samples, "1", "/");

    // A worker dies abruptly (`/exit`): what it counted stays, its replacement adds to it.
    let before = host.worker_pids(Some(WorkerStateName::Ready)).await;
    // The connection dies with the worker: no answer to check.
    let _ = get(host.addr, "/exit").await;
    host.wait_for_replacement("the exited worker", &before)
        .await;
    let samples = scrape(&host, admin).await;
    assert_eq!(route_count(&samples, "1", "/exit"), 1.0, "{samples:?}");
    let now = route_count(&samples, "1", "/");
    assert!(now >= seen, "went back from {seen} to {now}");
    seen = now;
    let more = until_both_served(&host).await as f64;
    let samples = scrape(&host, admin).await;
    assert_eq!(route_count(&samples, "1", "/"), seen + more);
    seen += more;

    // A reload: generation 1's count stays once its workers are gone; generation 2 counts apart.
    let old = host.worker_pids(None).await;
    host.install_plugin(&example_plugin(&[("EXAMPLE_GREETING", "v2")]));
    host.reload_ok().await;
    tests::wait_old_workers_gone(&old).await;
    for _ in 0..7 {
        assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
    }
    let samples = scrape(&host, admin).await;
    assert_eq!(route_count(&samples, "1", "/"), seen, "{samples:?}");
    assert_eq!(route_count(&samples, "2", "/"), 7.0, "{samples:?}");

    // A gauge (open WebSockets, over the live workers) and a histogram (time slept).
    let mut ws = tests::ws_connect(host.addr).await;
    assert_eq!(tests::ws_echo(&mut ws, "x").await, "gen=2 x");
    let samples = scrape(&host, admin).await;
    assert_eq!(
        sum(&samples, "example_websockets_open", &[("generation", "2")]),
        1.0
    );
    drop(ws);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sum(
        &scrape(&host, admin).await,
        "example_websockets_open",
        &[("generation", "2")],
    ) != 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the socket never counted closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for ms in [5, 50, 500] {
        let reply = get(host.addr, &format!("/async/sleep?ms={ms}"))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    let samples = scrape(&host, admin).await;
    let slept = |name: &str, with: &[(&str, &str)]| {
        let mut with = with.to_vec();
        with.push(("generation", "2"));
        sum(&samples, name, &with)
    };
    assert_eq!(
        slept("example_sleep_seconds_count", &[]),
        3.0,
        "{samples:?}"
    );
    assert!((slept("example_sleep_seconds_sum", &[]) - 0.555).abs() < 1e-9);
    assert_eq!(
        slept("example_sleep_seconds_bucket", &[("le", "0.01")]),
        1.0
    );
    assert_eq!(slept("example_sleep_seconds_bucket", &[("le", "0.1")]), 2.0);
    assert_eq!(slept("example_sleep_seconds_bucket", &[("le", "1.0")]), 3.0);
    assert_eq!(
        slept("example_sleep_seconds_bucket", &[("le", "+Inf")]),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_registering_too_many_series_is_bounded_counted_and_logged() {
    let (host, admin) = two_workers().await;
    let pids = host.worker_pids(Some(WorkerStateName::Ready)).await;
    // One connection, one worker: 300 series asked, 256 kept at most (some taken already).
    let reply = get(host.addr, "/series?n=300").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let kept: usize = reply
        .body
        .trim()
        .strip_prefix("kept ")
        .and_then(|n| n.parse().ok())
        .expect("kept N");
    assert!(kept < 256 && kept > 200, "kept {kept}");
    let refused = 300 - kept as u64;
    assert_eq!(host.limit_hits("plugin_series").await, refused);
    wait_until(Duration::from_secs(10), "the refusal in the log", || {
        host.log().contains("a plugin metric was refused")
    })
    .await;
    // The worker serves on, and the page is still well-formed with every kept series.
    assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
    assert_eq!(host.worker_pids(Some(WorkerStateName::Ready)).await, pids);
    let samples = scrape(&host, admin).await;
    let series = samples
        .iter()
        .filter(|s| s.name == "example_series_total")
        .count();
    assert_eq!(series, kept, "one series per kept counter");
}
