//! Progressive delivery: a reload's canary judged on live traffic against the old generation.
//! Bad builds (500s, a panicking route, 10x slower, crashing under traffic) are rolled back by
//! themselves within the analysis period, every failed answer coming from the canary and none
//! after the rollback; a good build is promoted to every worker; `promote` and `abort` by
//! hand; a reload during the analysis is refused; a generation that starts failing in its
//! watch period is rolled back; the watcher does not retry a refused build.

use std::time::{Duration, Instant};

use host_status::{StatusReport, WorkerStateName};
use tests::{
    Host, HostOptions, Load, LoadReport, Mode, example_plugin, fixture_plugin, get,
    greeting_plugin, wait_until,
};

/// Load on `/work` (and `/work/b`) from several clients, a new connection per request so
/// that the canary gets its share of them.
fn load(host: &Host) -> Vec<Load> {
    vec![
        Load::start(host.addr, 3, Mode::Close, "/work"),
        Load::start(host.addr, 2, Mode::Close, "/work/b"),
    ]
}

async fn advance(loads: &[Load], n: u64) {
    for l in loads {
        l.advance(n).await;
    }
}

async fn finish(loads: Vec<Load>) -> Vec<LoadReport> {
    let mut reports = Vec::new();
    for l in loads {
        reports.push(l.finish().await);
    }
    reports
}

fn canary_host_options(analysis: &str, watch: &str) -> HostOptions {
    HostOptions {
        workers: 2,
        extra: format!(
            "canary_workers = 1\ncanary_analysis = \"{analysis}\"\ncanary_watch = \"{watch}\"\ncanary_min_requests = 50\nadmin_listen = \"127.0.0.1:0\"\n"
        ),
        ..HostOptions::default()
    }
}

fn generations(status: &StatusReport) -> Vec<u64> {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateName::Ready)
        .map(|w| w.generation)
        .collect()
}

/// How the last judged generation ended (`""`: none was judged yet).
fn outcome(status: &StatusReport) -> &str {
    status
        .last_verdict
        .as_ref()
        .map_or("", |v| v.outcome.as_str())
}

/// The phase of the canary under way (`""`: none).
fn phase(status: &StatusReport) -> &str {
    status.canary.as_ref().map_or("", |c| c.phase.as_str())
}

/// Waits until both slots serve `generation` and nothing else is ready.
async fn wait_all_on(host: &Host, generation: u64) -> StatusReport {
    host.wait_status(&format!("every worker on generation {generation}"), |s| {
        let g = generations(s);
        g.len() == 2 && g.iter().all(|n| *n == generation)
    })
    .await
}

/// A bad build under load is rolled back by itself within the analysis period; returns the
/// reload's stderr and the load seen up to the rollback.
async fn rolled_back(kind: &str) -> (String, Vec<LoadReport>) {
    rolled_back_with(kind, "").await
}

async fn rolled_back_with(kind: &str, extra: &str) -> (String, Vec<LoadReport>) {
    rolled_back_host(kind, extra).await.1
}

/// A host whose canary build `kind` is rolled back under load: the host, what `reload` said on
/// stderr, and the clients' reports.
async fn rolled_back_host(kind: &str, extra: &str) -> (Host, (String, Vec<LoadReport>)) {
    let bad = fixture_plugin(kind);
    let analysis = Duration::from_secs(40);
    let mut opts = canary_host_options("40s", "10s");
    opts.extra.push_str(extra);
    let host = Host::start(&fixture_plugin(""), opts).await;
    let loads = load(&host);
    advance(&loads, 50).await;

    host.install_plugin(&bad);
    let began = Instant::now();
    let out = host.cli(&["reload"]).await;
    let took = began.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{kind}: reload succeeded: {}",
        host.explain(&out)
    );
    assert!(
        stderr.contains("judged worse than generation 1"),
        "{kind}: {}",
        host.explain(&out)
    );
    assert!(
        took < analysis,
        "{kind}: the verdict took {took:?}, not within the analysis period"
    );
    let reports = finish(loads).await;
    eprintln!("{kind}: reload exited non-zero after {took:?}:\n{stderr}");

    let status = wait_all_on(&host, 1).await;
    let verdict = status.last_verdict.as_ref().unwrap();
    assert_eq!(verdict.outcome, "rolled_back", "{status:?}");
    assert_eq!(verdict.generation, 2, "{status:?}");
    assert!(status.canary.is_none(), "{status:?}");
    let last = status.last_reload.as_ref().unwrap();
    assert_eq!(last.verdict.as_ref().unwrap().outcome, "rolled_back");
    let text = host.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("last canary: generation 2 rolled back"),
        "{text}"
    );
    assert!(
        host.log().contains("judged worse than generation 1"),
        "{}",
        host.log()
    );

    // None after the rollback: the old generation answers everything.
    let after = load(&host);
    advance(&after, 100).await;
    for r in finish(after).await {
        eprintln!("{kind} after the rollback: {}", r.summary());
        r.assert_clean();
    }
    (host, (stderr, reports))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_answering_500_is_rolled_back() {
    let (stderr, reports) = rolled_back("canary-errors").await;
    assert!(stderr.contains("5xx share"), "{stderr}");
    let failed: Vec<&(u16, String)> = reports.iter().flat_map(|r| &r.non_200).collect();
    assert!(!failed.is_empty(), "the canary answered no 500 at all");
    for (status, body) in &failed {
        assert_eq!(
            (*status, body.as_str()),
            (500, "canary-errors 500\n"),
            "a failure not from the canary"
        );
    }
    for r in &reports {
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_panicking_on_one_route_is_rolled_back() {
    let (host, (stderr, reports)) = rolled_back_host("canary-panic", "").await;
    // Counted apart from other 500s: the plugin's shim reports each panic it catches.
    assert!(stderr.contains("handler panics in"), "{stderr}");
    // And in `/metrics`, for the canary's generation only.
    let admin = host.admin_addr().await;
    let text = tests::get(admin, "/metrics").await.unwrap().body;
    let panics = |g: &str| {
        tests::metric(
            &text,
            "host_http_handler_panics_total",
            &[&format!("generation=\"{g}\"")],
        )
    };
    assert!(panics("2") >= 1.0, "{text}");
    assert_eq!(panics("1"), 0.0, "{text}");
    // The good build never answers 500: every one came from the canary, on its one route.
    assert!(reports[0].non_200.is_empty(), "{:?}", reports[0].non_200);
    assert!(!reports[1].non_200.is_empty());
    for r in &reports {
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_ten_times_slower_is_rolled_back() {
    let (stderr, reports) = rolled_back("canary-slow").await;
    assert!(stderr.contains("p99 latency"), "{stderr}");
    for r in &reports {
        r.assert_clean();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_crashing_under_traffic_is_rolled_back() {
    let (stderr, _reports) = rolled_back("canary-crash").await;
    // Requests lost in the crash may count in the 5xx share first; either way it says why.
    assert!(
        stderr.contains("crashed or hung") || stderr.contains("5xx share"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_hanging_under_traffic_is_rolled_back() {
    let (stderr, _reports) = rolled_back_with("canary-hang", "worker_timeout = \"1s\"\n").await;
    assert!(stderr.contains("crashed or hung"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_good_canary_is_promoted_to_every_worker_and_watched() {
    let host = Host::start(&fixture_plugin(""), canary_host_options("10s", "3s")).await;
    let loads = load(&host);
    advance(&loads, 50).await;
    host.install_plugin(&fixture_plugin("canary-late"));
    let began = Instant::now();
    let reload = host.spawn_cli(&["reload"]);

    // While it runs, status shows the canary's figures against the old generation's.
    let status = host
        .wait_status("the canary analysis", |s| {
            s.canary
                .as_ref()
                .is_some_and(|c| c.phase == "analysis" && c.canary.requests > 0)
        })
        .await;
    let c = status.canary.as_ref().unwrap();
    assert_eq!((c.generation, c.baseline.generation), (2, 1));
    assert_eq!(c.canary.workers, 1, "{status:?}");
    let mut gens = generations(&status);
    gens.sort();
    assert_eq!(gens, [1, 2], "one canary beside one old worker: {status:?}");
    let text = host.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("canary analysis: generation 2") && text.contains("new generation 2"),
        "{text}"
    );

    // A reload during the analysis is refused with a clear line.
    let second = host.cli(&["reload"]).await;
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr)
            .contains("generation 2 is under canary analysis; `host promote` or `host abort`"),
        "{}",
        host.explain(&second)
    );

    // So is one asked by signal, with a log line.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host.master_pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the signalled reload refused",
        || {
            host.log()
                .contains("reload refused: generation 2 is under canary analysis")
        },
    )
    .await;

    let out = reload.await.unwrap();
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(
        began.elapsed() >= Duration::from_secs(10),
        "promoted before its analysis ended"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("canary: generation 2 promoted"),
        "{}",
        host.explain(&out)
    );
    let status = wait_all_on(&host, 2).await;
    assert_eq!(outcome(&status), "promoted", "{status:?}");
    // Its watch period, then it is kept.
    let status = host
        .wait_status("the end of the watch period", |s| outcome(s) == "held")
        .await;
    assert!(status.canary.is_none());
    assert_eq!(generations(&status), [2, 2]);
    for r in finish(loads).await {
        eprintln!("promoted: {}", r.summary());
        r.assert_clean();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promote_and_abort_by_hand() {
    let host = Host::start(&fixture_plugin(""), canary_host_options("10m", "1s")).await;
    let loads = load(&host);
    host.install_plugin(&fixture_plugin("canary-late"));

    let refused = host.cli(&["promote"]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no canary is under analysis"),
        "{}",
        host.explain(&refused)
    );

    // Abort: the canary's slot goes back to generation 1; the reload fails, saying so.
    let reload = host.spawn_cli(&["reload"]);
    host.wait_status("the canary analysis", |s| phase(s) == "analysis")
        .await;
    let abort = host.cli(&["abort"]).await;
    assert!(abort.status.success(), "{}", host.explain(&abort));
    assert!(
        String::from_utf8_lossy(&abort.stdout).contains("aborted: generation 2 rolled back"),
        "{}",
        host.explain(&abort)
    );
    let out = reload.await.unwrap();
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("aborted by hand"),
        "{}",
        host.explain(&out)
    );
    let status = wait_all_on(&host, 1).await;
    assert_eq!(outcome(&status), "aborted_by_hand");

    // Promote: long before the 10 minutes, every worker runs the new build.
    let began = Instant::now();
    let reload = host.spawn_cli(&["reload"]);
    host.wait_status("the canary analysis", |s| phase(s) == "analysis")
        .await;
    let promote = host.cli(&["promote"]).await;
    assert!(promote.status.success(), "{}", host.explain(&promote));
    let out = reload.await.unwrap();
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(began.elapsed() < Duration::from_secs(60));
    let status = wait_all_on(&host, 3).await;
    assert_eq!(outcome(&status), "promoted_by_hand");
    for r in finish(loads).await {
        eprintln!("by hand: {}", r.summary());
        r.assert_clean();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generation_failing_in_its_watch_period_is_rolled_back() {
    let marker = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&marker).unwrap();
    let mut opts = canary_host_options("3s", "5m");
    opts.env = vec![(
        "FIXTURE_FAIL_MARKER".into(),
        marker.to_string_lossy().into_owned(),
    )];
    let host = Host::start(&fixture_plugin(""), opts).await;
    let loads = load(&host);
    advance(&loads, 50).await;
    host.install_plugin(&fixture_plugin("canary-late"));
    host.reload_ok().await;
    let status = host
        .wait_status("the watch period", |s| phase(s) == "watch")
        .await;
    assert_eq!(generations(&status), [2, 2]);
    let watch_began = Instant::now();
    std::fs::write(&marker, "").unwrap();
    let status = host
        .wait_status("the rollback after the watch's verdict", |s| {
            outcome(s) == "rolled_back"
                && s.last_reload
                    .as_ref()
                    .is_some_and(|r| r.kind == "rollback" && r.ok)
        })
        .await;
    assert!(watch_began.elapsed() < Duration::from_secs(60));
    let last = status.last_reload.as_ref().unwrap();
    assert_eq!(last.verdict.as_ref().unwrap().generation, 2, "{status:?}");
    // A rollback is a new generation (3) running generation 1's snapshot.
    let status = wait_all_on(&host, 3).await;
    let sha = |s: &StatusReport, n: u64| {
        s.generations
            .iter()
            .find(|g| g.generation == n)
            .map(|g| g.sha256.clone())
    };
    assert_eq!(sha(&status, 3), sha(&status, 1), "{status:?}");
    assert!(status.canary.is_none(), "{status:?}");
    // Generation 1 (the working build) never answers 500, marker or not.
    let after = load(&host);
    advance(&after, 100).await;
    for r in finish(after).await {
        r.assert_clean();
    }
    let failed: u64 = finish(loads)
        .await
        .iter()
        .map(|r| r.non_200.len() as u64)
        .sum();
    assert!(failed > 0, "the generation never failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watcher_does_not_retry_a_refused_build() {
    let mut opts = canary_host_options("30s", "10s");
    opts.extra
        .push_str("watch = true\nwatch_canary = true\nwatch_debounce = \"100ms\"\n");
    let host = Host::start(&fixture_plugin(""), opts).await;
    let loads = load(&host);
    advance(&loads, 50).await;
    host.install_plugin(&fixture_plugin("canary-errors"));
    wait_until(Duration::from_secs(60), "the canary's rollback", || {
        host.log().contains("auto-reload refused")
    })
    .await;
    let status = wait_all_on(&host, 1).await;
    assert_eq!(outcome(&status), "rolled_back", "{status:?}");
    // The same bytes again: not retried.
    host.install_plugin(&fixture_plugin("canary-errors"));
    wait_until(
        Duration::from_secs(30),
        "the refused build recognised",
        || host.log().contains("was refused last time: no reload"),
    )
    .await;
    let status = host.status().await;
    assert_eq!(
        status.last_verdict.as_ref().unwrap().generation,
        2,
        "{status:?}"
    );
    assert_eq!(generations(&status), [1, 1]);
    finish(loads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promote_and_abort_during_the_watch_period() {
    let host = Host::start(&fixture_plugin(""), canary_host_options("1s", "10m")).await;
    let loads = load(&host);
    host.install_plugin(&fixture_plugin("canary-late"));
    host.reload_ok().await;
    host.wait_status("the watch period", |s| phase(s) == "watch")
        .await;

    // Promote: the generation is kept and its watch ends.
    let promote = host.cli(&["promote"]).await;
    assert!(promote.status.success(), "{}", host.explain(&promote));
    assert!(
        String::from_utf8_lossy(&promote.stdout).contains("generation 2 kept"),
        "{}",
        host.explain(&promote)
    );
    let status = host.status().await;
    assert!(status.canary.is_none(), "{status:?}");
    assert_eq!(outcome(&status), "held", "{status:?}");

    // Abort, in generation 3's watch period: a rollback to generation 2's build (as
    // generation 4).
    host.install_plugin(&fixture_plugin(""));
    host.reload_ok().await;
    host.wait_status("the second watch period", |s| {
        phase(s) == "watch" && s.canary.as_ref().unwrap().generation == 3
    })
    .await;
    let abort = host.cli(&["abort"]).await;
    assert!(abort.status.success(), "{}", host.explain(&abort));
    assert!(
        String::from_utf8_lossy(&abort.stdout).contains("aborted: generation 3 rolled back"),
        "{}",
        host.explain(&abort)
    );
    let status = wait_all_on(&host, 4).await;
    assert_eq!(outcome(&status), "aborted_by_hand");
    assert_eq!(status.last_reload.unwrap().kind, "rollback");
    for r in finish(loads).await {
        r.assert_clean();
    }
}

/// The example plugin's `EXAMPLE_ERROR_PERCENT` knob: `500` to exactly that share of a
/// worker's `GET /`, never two in a row at 30%; such a build is rolled back by itself, and
/// `reload --canary 0` skips the analysis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn example_error_percent_makes_a_bad_build_the_canary_refuses() {
    let bad = example_plugin(&[("EXAMPLE_ERROR_PERCENT", "30")]);
    let one = Host::start(
        &bad,
        HostOptions {
            workers: 1,
            ..HostOptions::default()
        },
    )
    .await;
    let mut failed = Vec::new();
    for i in 1..=20 {
        let reply = get(one.addr, "/").await.unwrap();
        if reply.status == 500 {
            assert_eq!(reply.body, "EXAMPLE_ERROR_PERCENT=30: failing\n");
            failed.push(i);
        }
    }
    assert_eq!(failed, [4, 7, 10, 14, 17, 20], "spread evenly, 30%");
    drop(one);

    let host = Host::start(&greeting_plugin("v1"), canary_host_options("5m", "10s")).await;
    // `--canary 0`: at once, no verdict.
    host.install_plugin(&greeting_plugin("v2"));
    let began = Instant::now();
    let out = host.cli(&["reload", "--canary", "0"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(began.elapsed() < Duration::from_secs(30));
    assert!(host.status().await.last_verdict.is_none());

    let clients = Load::start(host.addr, 4, Mode::Close, "/");
    clients.advance(50).await;
    host.install_plugin(&bad);
    let out = host.cli(&["reload", "--analysis", "40s"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("5xx share"),
        "{}",
        host.explain(&out)
    );
    let report = clients.finish().await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for (status, body) in &report.non_200 {
        assert_eq!(
            (*status, body.as_str()),
            (500, "EXAMPLE_ERROR_PERCENT=30: failing\n")
        );
    }
    wait_all_on(&host, 2).await;
}
