//! Churn: reloads in quick succession while old workers are held draining by slow requests.
//! Every worker counts its requests in its own cell of the shared worker table; when the cells
//! ran out, a new worker started without one, and its requests never reached `/metrics` (issue
//! 18: 2,000 requests served, 30 counted). Now a rollout waits for room (at most
//! `max_draining_workers` old workers draining, and a free cell) before it starts a worker,
//! so no worker runs uncounted and `/metrics` counts exactly the requests sent.

use std::time::{Duration, Instant};

use tests::{Host, HostOptions, example_plugin, get, wait_until};

async fn scrape(host: &Host, admin: std::net::SocketAddr) -> String {
    let reply = get(admin, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", host.log()));
    assert_eq!(reply.status, 200);
    reply.body
}

/// Reloads: one more than the old worker table held (`3 x workers + 4` cells: 7 with one
/// worker, so the 7th reload's new worker found none while 6 old ones drained).
const RELOADS: usize = 8;
/// How long each slow request holds the worker it runs on.
const SLOW_MS: u64 = 5000;
/// Requests sent once the churn is over.
const REQUESTS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_reloads_with_draining_workers_leave_metrics_exact() {
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            // One worker: each reload drains exactly the worker the slow requests are on.
            workers: 1,
            extra: "admin_listen = \"127.0.0.1:0\"\ngraceful_timeout = \"30s\"".into(),
            ..HostOptions::default()
        },
    )
    .await;
    let admin = host.admin_addr().await;

    // Each round: two slow requests on the serving worker (seen in flight in /metrics), then a
    // reload, which drains that worker while they run.
    let began = Instant::now();
    let mut slow = Vec::new();
    for round in 0..RELOADS {
        let text = scrape(&host, admin).await;
        let serving = tests::metric(&text, "host_serving_generation", &[]) as u64;
        for _ in 0..2 {
            let addr = host.addr;
            slow.push(tokio::spawn(async move {
                get(addr, &format!("/sleep?ms={SLOW_MS}")).await
            }));
        }
        let generation = format!("generation=\"{serving}\"");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = scrape(&host, admin).await;
            if tests::metric(&text, "host_http_requests_in_flight", &[&generation]) >= 2.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the slow requests never ran on generation {serving}\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let out = host.cli(&["reload"]).await;
        assert!(
            out.status.success(),
            "reload {round}: {}",
            host.explain(&out)
        );
    }
    eprintln!("{RELOADS} reloads in {} ms", began.elapsed().as_millis());
    for s in slow {
        let reply = s.await.unwrap().expect("a slow request was answered");
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    // Every old worker has exited: one worker left, serving the last generation.
    wait_until(Duration::from_secs(40), "the old workers to exit", || {
        std::fs::read_to_string(host.dir.path().join("state/host.log"))
            .is_ok_and(|l| l.matches("worker exited after draining").count() >= RELOADS)
    })
    .await;
    let status = host
        .wait_status("one worker left", |s| s.workers.len() == 1)
        .await;
    assert_eq!(status.workers[0].generation, RELOADS as u64 + 1);

    // The attack's second half: requests to the newest workers, every one counted.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = host.addr;
            tokio::spawn(async move {
                for _ in 0..REQUESTS / 4 {
                    let reply = get(addr, "/").await.expect("GET /");
                    assert_eq!(reply.status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }

    let text = scrape(&host, admin).await;
    let log = host.log();
    let sent = (REQUESTS + 2 * RELOADS) as f64;
    let counted = tests::metric(&text, "host_http_requests_total", &[]);
    assert_eq!(
        counted, sent,
        "/metrics counted {counted} of {sent}\n{text}"
    );
    let newest = format!("generation=\"{}\"", RELOADS + 1);
    assert_eq!(
        tests::metric(&text, "host_http_requests_total", &[&newest]),
        REQUESTS as f64,
        "{text}"
    );
    assert!(!log.contains("no free cell"), "{log}");
    // The bound was hit (and said so), not avoided: rollouts waited for old workers to exit.
    let waits = tests::metric(
        &text,
        "host_master_limit_hits_total",
        &["limit=\"max_draining_workers\""],
    );
    assert!(waits >= 1.0, "no rollout waited\n{text}");
    assert!(
        log.contains("rollout waits before starting its next worker"),
        "{log}"
    );
    eprintln!("{counted} requests counted of {sent} sent; rollouts waited {waits} times");
}
