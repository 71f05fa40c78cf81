//! `/metrics` on `admin_listen`: the master's Prometheus text, parsed here and checked against
//! the requests the test sent across a reload and a crash. Counters of a generation whose
//! workers all exited are still there (they never go backwards), the reload and the worker
//! exits and starts are counted by cause, and the admin listener is never the public one.

use std::net::SocketAddr;
use std::time::Duration;

use host_status::WorkerStateName;
use tests::{Host, HostOptions, example_plugin, get, host_bin, open_fds, wait_until};

use tests::prom::{Sample, admin_addr, scrape, send, sum};

const REQUESTS: &str = "host_http_requests_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_every_request_across_a_reload_and_a_crash() {
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
    assert_ne!(admin, host.addr);

    // Generation 1: 30 OK, 5 not found, 3 handler panics.
    send(&host, "/", 30, 200).await;
    send(&host, "/no-such-route", 5, 404).await;
    send(&host, "/panic", 3, 500).await;
    let m = scrape(&host, admin).await;
    let gen1 = [("generation", "1")];
    assert_eq!(
        sum(&m, REQUESTS, &[("generation", "1"), ("class", "2xx")]),
        30.0
    );
    let sha256 = m
        .iter()
        .find(|s| s.name == REQUESTS)
        .map(|s| s.labels["sha256"].clone())
        .unwrap();
    assert_eq!(sha256.len(), 64, "full sha256 label");

    host.reload_ok().await;
    // Every generation-1 worker has exited.
    host.wait_status("only generation 2 workers", |s| {
        s.workers
            .iter()
            .all(|w| w.generation == 2 && w.state == WorkerStateName::Ready)
    })
    .await;
    let after_reload = scrape(&host, admin).await;
    for (class, n) in [("2xx", 30.0), ("4xx", 5.0), ("5xx", 3.0), ("1xx", 0.0)] {
        assert_eq!(
            sum(
                &after_reload,
                REQUESTS,
                &[("generation", "1"), ("class", class)]
            ),
            n,
            "generation 1 {class} after its workers exited"
        );
    }
    let labels = &after_reload
        .iter()
        .find(|s| s.name == REQUESTS && s.labels["generation"] == "1")
        .unwrap()
        .labels;
    assert_eq!(labels["plugin"], "example-plugin");
    assert_eq!(labels["version"], "0.1.0");
    assert_eq!(labels["sha256"], sha256);

    // Generation 2: 20 OK, then a handler that ends its worker's process.
    send(&host, "/", 20, 200).await;
    let before_crash = host.worker_pids(Some(WorkerStateName::Ready)).await;
    assert!(
        get(host.addr, "/exit").await.is_err(),
        "/exit has no answer"
    );
    host.wait_for_replacement("the crashed worker replaced", &before_crash)
        .await;

    let m = scrape(&host, admin).await;
    for (class, n) in [("2xx", 50.0), ("4xx", 5.0), ("5xx", 3.0)] {
        assert_eq!(
            sum(&m, REQUESTS, &[("class", class)]),
            n,
            "{class} over both generations\n{m:#?}"
        );
    }
    // Never backwards: generation 1 is unchanged.
    for s in after_reload
        .iter()
        .filter(|s| s.labels.get("generation") == Some(&"1".into()))
    {
        if s.name.ends_with("_total") || s.name.contains("_bucket") {
            assert_eq!(sum(&m, &s.name, &labels_of(s)), s.value, "{s:?}");
        }
    }
    // The histogram counts every answered request, per generation.
    for g in ["1", "2"] {
        let answered = sum(&m, REQUESTS, &[("generation", g)]);
        let count = sum(
            &m,
            "host_http_request_duration_seconds_count",
            &[("generation", g)],
        );
        let inf = sum(
            &m,
            "host_http_request_duration_seconds_bucket",
            &[("generation", g), ("le", "+Inf")],
        );
        assert_eq!((count, inf), (answered, answered), "generation {g}");
        assert!(
            sum(
                &m,
                "host_http_request_duration_seconds_sum",
                &[("generation", g)]
            ) > 0.0
        );
    }
    assert_eq!(sum(&m, "host_http_requests_in_flight", &[]), 0.0);
    // The `/exit` request died with its worker.
    assert_eq!(
        sum(&m, "host_http_requests_lost_total", &[("generation", "2")]),
        1.0
    );
    assert!(sum(&m, "host_http_response_body_bytes_total", &gen1) > 0.0);

    // Reloads by outcome; worker lifecycle by cause.
    assert_eq!(
        sum(
            &m,
            "host_reloads_total",
            &[("kind", "reload"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(sum(&m, "host_reloads_total", &[]), 1.0);
    assert_eq!(
        sum(&m, "host_worker_starts_total", &[("cause", "start")]),
        2.0
    );
    assert_eq!(
        sum(&m, "host_worker_starts_total", &[("cause", "reload")]),
        2.0
    );
    assert_eq!(
        sum(&m, "host_worker_starts_total", &[("cause", "replacement")]),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "host_worker_exits_total",
            &[("cause", "reload"), ("how", "exit_0")]
        ),
        2.0,
        "the drained generation-1 workers"
    );
    assert_eq!(
        sum(
            &m,
            "host_worker_exits_total",
            &[("cause", "crashed"), ("how", "exit_nonzero")]
        ),
        1.0,
        "the worker that ran /exit"
    );
    assert_eq!(sum(&m, "host_worker_kills_total", &[]), 0.0);
    assert_eq!(sum(&m, "host_serving_generation", &[]), 2.0);
    assert_eq!(
        sum(
            &m,
            "host_workers",
            &[("generation", "2"), ("state", "ready")]
        ),
        2.0
    );

    // Silent connections cannot keep a scrape out, nor pile up fds in the master: the oldest
    // are closed to make room (16 at most).
    let fds_before = open_fds(host.master_pid);
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let began = std::time::Instant::now();
    let again = tokio::time::timeout(Duration::from_secs(5), scrape(&host, admin))
        .await
        .expect("a scrape past 40 silent connections");
    assert!(
        began.elapsed() < Duration::from_millis(1500),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(sum(&again, REQUESTS, &[]), sum(&m, REQUESTS, &[]));
    wait_until(
        Duration::from_secs(2),
        "at most 16 admin connections",
        || open_fds(host.master_pid) <= fds_before + 16,
    )
    .await;
    drop(silent);

    // The public port does not serve the metrics: that path is the plugin's (a 404 here).
    let public = get(host.addr, "/metrics").await.unwrap();
    assert_eq!(public.status, 404);
    assert!(
        !public.body.contains("host_http_requests"),
        "{}",
        public.body
    );
    // And the admin port serves nothing else.
    let other = get(admin, "/").await.unwrap();
    assert_eq!(other.status, 404);

    // Body bytes: a streamed response as sent; request bodies read whole (`/`) or streamed to
    // an async handler (`/upload`).
    let gen2 = [("generation", "2")];
    let before = scrape(&host, admin).await;
    let streamed = get(host.addr, "/stream?chunks=5&every_ms=0&size=1000")
        .await
        .unwrap();
    assert_eq!((streamed.status, streamed.body.len()), (200, 5000));
    post(host.addr, "/", 100).await;
    post(host.addr, "/upload", 3000).await;
    let after = scrape(&host, admin).await;
    let delta = |name: &str| sum(&after, name, &gen2) - sum(&before, name, &gen2);
    assert!(delta("host_http_response_body_bytes_total") >= 5000.0);
    assert_eq!(delta("host_http_request_body_bytes_total"), 3100.0);
    assert_eq!(delta(REQUESTS), 3.0);

    // A reload the host refuses (not a plugin file), then a rollback: counted by outcome, and
    // generation 2's counters stay once its workers are gone.
    std::fs::write(&host.plugin, "not a plugin\n").unwrap();
    let refused = host.cli(&["reload"]).await;
    assert!(!refused.status.success(), "{}", host.explain(&refused));
    let out = host.cli(&["rollback"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    host.wait_status("only generation 3 workers", |s| {
        s.workers
            .iter()
            .all(|w| w.generation == 3 && w.state == WorkerStateName::Ready)
    })
    .await;
    let last = scrape(&host, admin).await;
    let reloads = |kind, outcome| {
        sum(
            &last,
            "host_reloads_total",
            &[("kind", kind), ("outcome", outcome)],
        )
    };
    assert_eq!(reloads("reload", "ok"), 1.0);
    assert_eq!(reloads("reload", "refused"), 1.0);
    assert_eq!(reloads("rollback", "ok"), 1.0);
    assert_eq!(sum(&last, "host_reloads_total", &[]), 3.0);
    assert_eq!(
        sum(&last, REQUESTS, &gen2),
        sum(&after, REQUESTS, &gen2),
        "generation 2 after its workers exited"
    );
    // The rollback's generation runs generation 1's build.
    let gen3 = last
        .iter()
        .find(|s| s.name == REQUESTS && s.labels["generation"] == "3");
    assert_eq!(
        gen3.map(|s| s.labels["sha256"].as_str()),
        Some(sha256.as_str())
    );
    assert_eq!(
        sum(&last, "host_worker_starts_total", &[("cause", "rollback")]),
        2.0
    );
}

/// A POST of `len` bytes on a new connection, read to the end; panics unless it is a `200`.
async fn post(addr: SocketAddr, path: &str, len: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'x'; len]).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "POST {path}: {answer}");
}

fn labels_of(s: &Sample) -> Vec<(&str, &str)> {
    s.labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_equal_to_listen_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:18089\"\nadmin_listen = \"127.0.0.1:18089\"\nstate_dir = \"state\"\n",
    )
    .unwrap();
    for args in [&["check"][..], &["start", "-d"]] {
        let out = tokio::process::Command::new(host_bin())
            .arg("-c")
            .arg(&config)
            .args(args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("host.toml:2: admin_listen: ")
                && stderr.contains("the admin listener is never the public one"),
            "{args:?}: {stderr}"
        );
    }
    // Nothing started.
    wait_until(Duration::from_millis(100), "no pidfile", || {
        !dir.path().join("state/host.pid").exists()
    })
    .await;
}
