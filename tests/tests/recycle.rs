//! Recycling under load: workers replaced new before old when they grow past `max_worker_rss`,
//! when they served `max_requests`, or when their plugin calls `restart_worker()` (a poisoned
//! `Mutex`), with every request of a concurrent keep-alive load answered `200`.

use std::time::Duration;

use host_status::{StatusReport, WorkerStateName};
use tests::{Host, HostOptions, Load, Mode, example_plugin, get, pid_alive, wait_until};

/// Recycles done so far, over every slot.
fn recycles(status: &StatusReport) -> u64 {
    status.slots.iter().map(|s| s.recycles).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_over_max_worker_rss_are_recycled_without_failing_a_request() {
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            extra: "max_worker_rss = \"64MiB\"\n".into(),
            ..HostOptions::default()
        },
    )
    .await;
    let load = Load::start(host.addr, 8, Mode::KeepAlive, "/");
    load.advance(200).await;

    let mut leaks_failed = Vec::new();
    for _ in 0..30 {
        match get(host.addr, "/leak?mb=10").await {
            Ok(reply) if reply.status == 200 => {}
            other => leaks_failed.push(format!("{other:?}")),
        }
    }
    let status = host
        .wait_status("every worker ready and below 80 MiB", |s| {
            s.workers.len() == 2
                && s.workers
                    .iter()
                    .all(|w| w.state == WorkerStateName::Ready && w.rss_bytes < 80 << 20)
        })
        .await;
    load.advance(200).await;
    let report = load.finish().await;
    let rss: Vec<u64> = status.workers.iter().map(|w| w.rss_bytes >> 20).collect();
    eprintln!(
        "max_worker_rss: {} recycles, worker RSS after: {rss:?} MiB; load: {}",
        recycles(&status),
        report.summary()
    );
    assert!(
        leaks_failed.is_empty(),
        "leak requests failed: {leaks_failed:?}"
    );
    report.assert_clean();
    // 300 MiB leaked, yet every worker ends below 80 MiB: only replacements can do that (how
    // many depends on how the leaks fell between the master's RSS checks).
    assert!(recycles(&status) >= 1, "no recycle: {status:?}");
    assert!(
        host.log().contains("over max_worker_rss 64 MiB"),
        "no recycle line with the reason in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_requests_recycles_workers_without_failing_a_request() {
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            extra: "max_requests = 500\nmax_requests_jitter = 20\n".into(),
            ..HostOptions::default()
        },
    )
    .await;
    let load = Load::start(host.addr, 8, Mode::KeepAlive, "/");
    load.advance(3000).await;
    let report = load.finish().await;
    // No request is sent from here on: every recycle still to finish was asked for by then.
    let status = host
        .wait_status("at least 4 recycles", |s| recycles(s) >= 4)
        .await;
    eprintln!(
        "max_requests: {} requests, {} recycles; {}",
        report.total(),
        recycles(&status),
        report.summary()
    );
    report.assert_clean();
    assert!(
        host.log().contains("(max_requests 500 + jitter "),
        "no recycle line with the reason in the log"
    );
    // Every recycle keeps the generation: recycling is not a reload.
    assert_eq!(status.generation, 1);
    assert!(status.last_reload.is_none(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoned_mutex_is_cured_by_restart_worker() {
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            workers: 1,
            ..HostOptions::default()
        },
    )
    .await;
    let load = Load::start(host.addr, 4, Mode::KeepAlive, "/");
    load.advance(100).await;
    let old = host.worker_pids(Some(WorkerStateName::Ready)).await[0];
    assert!(host.body("/locked").await.contains("counted 1 requests"));

    let poison = get(host.addr, "/poison").await.unwrap();
    assert_eq!(poison.status, 500, "{poison:?}");
    // Poisoned for every later request in this worker, until the plugin asks for a new one.
    let poisoned = get(host.addr, "/locked").await.unwrap();
    assert_eq!(poisoned.status, 500, "{poisoned:?}");
    assert!(
        poisoned
            .body
            .contains(&format!("worker {old} has a poisoned Mutex")),
        "{poisoned:?}"
    );

    let status = host
        .wait_status("a new worker serving slot 0", |s| {
            s.slots[0].pid.is_some_and(|p| p != old)
        })
        .await;
    let new = status.slots[0].pid.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the poisoned worker to drain and exit",
        || !pid_alive(old),
    )
    .await;
    let cured = get(host.addr, "/locked").await.unwrap();
    assert_eq!(cured.status, 200, "{cured:?}");
    assert!(
        cured
            .body
            .starts_with(&format!("worker {new} counted 1 requests")),
        "{cured:?}"
    );
    load.advance(100).await;
    let report = load.finish().await;
    eprintln!(
        "restart_worker: pid {old} -> {new}; load: {} ok, {} failed, {} non-200",
        report.ok,
        report.errors.len(),
        report.non_200.len()
    );
    report.assert_clean();
    let status = host.status().await;
    assert_eq!(status.slots[0].recycles, 1, "{status:?}");
    let text = host.cli(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("recycled: 1 workers (slot 0: 1)"),
        "{}",
        host.explain(&text)
    );
    assert!(
        host.log()
            .contains("the plugin asked for a restart: the shared Mutex is poisoned"),
        "no recycle line with the reason in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_built_for_abi_1_1_still_loads_and_is_recycled() {
    // Recycling is the host's business: it works for plugins that predate `restart_worker`.
    let host = Host::start(
        &tests::fixture_plugin("abi-1-1"),
        HostOptions {
            extra: "max_requests = 100\n".into(),
            ..HostOptions::default()
        },
    )
    .await;
    let load = Load::start(host.addr, 4, Mode::KeepAlive, "/");
    load.advance(500).await;
    let report = load.finish().await;
    report.assert_clean();
    let status = host
        .wait_status("at least 2 recycles", |s| recycles(s) >= 2)
        .await;
    eprintln!(
        "abi 1.1 plugin: {} requests, {} recycles",
        report.total(),
        recycles(&status)
    );
    assert_eq!(host.body("/").await, "fixture ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recycles_and_reloads_interleave_without_failing_a_request() {
    // Recycles asked for during a reload wait for it (or are made moot by it), and reloads asked
    // for during a recycle are queued behind it: every caller answered, no request failed.
    let (v1, v2) = (tests::greeting_plugin("v1"), tests::greeting_plugin("v2"));
    let host = Host::start(
        &v1,
        HostOptions {
            extra: "max_requests = 150\nmax_requests_jitter = 30\n".into(),
            ..HostOptions::default()
        },
    )
    .await;
    let load = Load::start(host.addr, 8, Mode::KeepAlive, "/");
    load.advance(300).await;
    for (build, greeting) in [(&v2, "v2"), (&v1, "v1"), (&v2, "v2")] {
        host.install_plugin(build);
        host.reload_ok().await;
        let reply = get(host.addr, "/").await.unwrap();
        assert!(
            reply.body.starts_with(&format!("{greeting} from")),
            "after reload to {greeting}: {reply:?}"
        );
        load.advance(300).await;
    }
    let report = load.finish().await;
    let status = host
        .wait_status("no recycle or drain under way", |s| {
            s.workers.len() == 2 && s.workers.iter().all(|w| w.state == WorkerStateName::Ready)
        })
        .await;
    eprintln!(
        "interleaved: {} requests, {} recycles, generation {}; {} failed, {} non-200",
        report.total(),
        recycles(&status),
        status.generation,
        report.errors.len(),
        report.non_200.len()
    );
    report.assert_clean();
    assert_eq!(status.generation, 4, "{status:?}");
    assert!(recycles(&status) >= 1, "{status:?}");
    // Every worker runs the last build: a recycle never brought an old generation back.
    for w in &status.workers {
        assert_eq!(w.generation, 4, "{status:?}");
    }
    assert!(host.body("/").await.starts_with("v2 from"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_that_asks_for_a_restart_at_once_cannot_make_its_slot_churn() {
    // Every new worker asks for its own replacement in `on_worker_start`: each is replaced, but
    // only once it has served for a second.
    let host = Host::start(
        &tests::fixture_plugin(""),
        HostOptions {
            workers: 1,
            env: vec![("FIXTURE_RESTART_AT_START".into(), "1".into())],
            ..HostOptions::default()
        },
    )
    .await;
    let began = std::time::Instant::now();
    let load = Load::start(host.addr, 4, Mode::KeepAlive, "/");
    host.wait_status("3 recycles", |s| recycles(s) >= 3).await;
    let took = began.elapsed();
    let report = load.finish().await;
    eprintln!(
        "restart at start: 3 recycles in {took:?}; load: {} ok, {} failed",
        report.ok,
        report.errors.len()
    );
    report.assert_clean();
    assert!(
        took >= Duration::from_secs(2),
        "3 recycles in {took:?}: workers were replaced before they were a second old"
    );
    assert!(
        host.log()
            .contains("the plugin asked for a restart: asked at start")
    );
}
