//! Worker groups: two `[[group]]`s under one master, `api` (the example plugin, or the fixture)
//! and `gateway` (the axum example), each on its own port. A reload, a rollback or a refused
//! canary in one group never replaces a worker of the other nor fails one of its requests;
//! `reloadable = false` keeps a group out of `reload` and `SIGHUP` (not `restart`); `host
//! upgrade` hands both listeners over under load; systemd's named sockets map to their groups;
//! `/metrics` labels every series with its group. A file without groups is covered by every
//! other test file: it runs unchanged.

use std::os::fd::AsRawFd;

use host_status::StatusReport;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tests::groups::{
    activated, group, group_addr, group_generation, group_pids, two_groups, two_groups_with,
};
use tests::{
    HostOptions, Load, LoadReport, Mode, example_plugin, fixture_plugin, get, greeting_plugin,
    host_bin, pid_alive, prom,
};

/// Keep-alive and new-connection clients on each group's port.
fn loads(status: &StatusReport, path: &'static str) -> Vec<(&'static str, Load)> {
    let mut loads = Vec::new();
    for name in ["api", "gateway"] {
        let addr = group_addr(status, name);
        let path = if name == "api" { path } else { "/" };
        loads.push((name, Load::start(addr, 2, Mode::KeepAlive, path)));
        loads.push((name, Load::start(addr, 1, Mode::Close, path)));
    }
    loads
}

async fn advance(loads: &[(&str, Load)], n: u64) {
    for (_, l) in loads {
        l.advance(n).await;
    }
}

/// Stops the clients; panics unless every request of every group got its `200`.
async fn finish_clean(loads: Vec<(&'static str, Load)>) -> Vec<(&'static str, LoadReport)> {
    let mut reports = Vec::new();
    for (name, l) in loads {
        let r = l.finish().await;
        eprintln!("{name}: {}", r.summary());
        r.assert_clean();
        reports.push((name, r));
    }
    reports
}

/// The first body lines a group's clients saw (which build answered).
fn lines_seen(reports: &[(&str, LoadReport)], name: &str) -> Vec<String> {
    reports
        .iter()
        .filter(|(n, _)| *n == name)
        .flat_map(|(_, r)| r.first_lines.keys().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_one_group_under_load_fails_nothing_and_replaces_no_worker_of_the_other() {
    let host = two_groups(&example_plugin(&[]), "", "", "", None).await;
    let before = host.status().await;
    assert_eq!(before.groups.len(), 2, "{before:?}");
    let gateway_before = group_pids(&before, "gateway");
    let api_before = group_pids(&before, "api");
    assert_eq!(
        (gateway_before.len(), api_before.len()),
        (2, 2),
        "{before:?}"
    );

    let loads = loads(&before, "/");
    advance(&loads, 100).await;
    host.install_plugin(&greeting_plugin("groups-v2"));
    let out = host.cli(&["reload", "api"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    advance(&loads, 200).await;
    let reports = finish_clean(loads).await;

    let after = host.status().await;
    assert_eq!(group_generation(&after, "api"), 2, "{after:?}");
    assert_eq!(group_generation(&after, "gateway"), 1, "{after:?}");
    assert_eq!(
        group_pids(&after, "gateway"),
        gateway_before,
        "the gateway's workers were replaced"
    );
    let api_after = group_pids(&after, "api");
    assert!(
        api_after.iter().all(|p| !api_before.contains(p)),
        "api: {api_before:?} -> {api_after:?}"
    );
    assert!(
        lines_seen(&reports, "api")
            .iter()
            .any(|l| l.starts_with("groups-v2")),
        "{:?}",
        lines_seen(&reports, "api")
    );
    assert!(
        lines_seen(&reports, "gateway")
            .iter()
            .all(|l| l.contains("example-axum")),
        "{:?}",
        lines_seen(&reports, "gateway")
    );
    // The top-level fields are the first group's, as before groups.
    assert_eq!(after.listen, group(&after, "api").listen);
    assert_eq!(after.generation, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_is_not_reloadable_is_untouched_by_reload_and_sighup_and_replaced_by_restart()
{
    let mut host = two_groups(&example_plugin(&[]), "", "", "reloadable = false", None).await;
    let before = host.status().await;
    assert!(!group(&before, "gateway").reloadable, "{before:?}");
    let gateway_before = group_pids(&before, "gateway");

    // `reload` with no group: every reloadable one; the other is named as skipped.
    let out = host.cli(&["reload"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("skipped group \"gateway\": reloadable = false"),
        "{stdout}"
    );
    // Named, it is refused with the reason.
    let out = host.cli(&["reload", "gateway"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not reloadable"),
        "{}",
        host.explain(&out)
    );
    // SIGHUP reloads the reloadable groups only.
    kill(Pid::from_raw(host.master_pid as i32), Signal::SIGHUP).unwrap();
    let after = host
        .wait_status("api on generation 3 after SIGHUP", |s| {
            group_generation(s, "api") == 3 && group_pids(s, "api").len() == 2
        })
        .await;
    assert_eq!(group_generation(&after, "gateway"), 1, "{after:?}");
    assert_eq!(group_pids(&after, "gateway"), gateway_before);

    // `restart` replaces every group's workers.
    let out = host.cli(&["restart"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let restarted = host
        .wait_status("both groups serving after restart", |s| {
            group_pids(s, "api").len() == 2 && group_pids(s, "gateway").len() == 2
        })
        .await;
    host.master_pid = restarted.master_pid;
    let gateway_after = group_pids(&restarted, "gateway");
    assert!(
        gateway_after.iter().all(|p| !gateway_before.contains(p)),
        "gateway: {gateway_before:?} -> {gateway_after:?}"
    );
    let reply = get(group_addr(&restarted, "gateway"), "/").await.unwrap();
    assert!(reply.body.contains("example-axum"), "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_rolls_back_on_its_own() {
    let host = two_groups(&example_plugin(&[]), "", "", "", None).await;
    let api = host.addr;
    let status = host.status().await;
    let gateway_before = group_pids(&status, "gateway");
    host.install_plugin(&greeting_plugin("groups-rollback"));
    let out = host.cli(&["reload", "api", "gateway"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(host.body("/").await.starts_with("groups-rollback"));

    // Which group is needed when there are several.
    let out = host.cli(&["rollback"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host rollback GROUP"),
        "{}",
        host.explain(&out)
    );
    let out = host.cli(&["rollback", "nope"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no group named \"nope\""),
        "{}",
        host.explain(&out)
    );

    let status = host.status().await;
    let gateway_reloaded = group_pids(&status, "gateway");
    assert!(gateway_reloaded.iter().all(|p| !gateway_before.contains(p)));
    let out = host.cli(&["rollback", "api"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let reply = get(api, "/").await.unwrap();
    assert!(reply.body.starts_with("hello from"), "{}", reply.body);
    let after = host.status().await;
    assert_eq!(group_generation(&after, "api"), 3, "{after:?}");
    assert_eq!(group_generation(&after, "gateway"), 2, "{after:?}");
    assert_eq!(group_pids(&after, "gateway"), gateway_reloaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_canary_in_one_group_leaves_the_other_serving() {
    let api_canary = "canary_workers = 1\ncanary_analysis = \"40s\"\ncanary_min_requests = 50\n";
    let host = two_groups(&fixture_plugin(""), "", api_canary, "", None).await;
    let before = host.status().await;
    let gateway_before = group_pids(&before, "gateway");
    let loads = loads(&before, "/work");
    advance(&loads, 50).await;

    host.install_plugin(&fixture_plugin("canary-errors"));
    let out = host.cli(&["reload", "api"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        stderr.contains("judged worse than generation 1"),
        "{}",
        host.explain(&out)
    );
    advance(&loads, 100).await;
    let mut gateway_reports = Vec::new();
    for (name, l) in loads {
        let r = l.finish().await;
        eprintln!("{name}: {}", r.summary());
        if name == "gateway" {
            r.assert_clean();
            gateway_reports.push(r);
        }
    }
    assert!(gateway_reports.iter().all(|r| r.ok > 0));
    let after = host
        .wait_status("api back on generation 1", |s| {
            group_pids(s, "api").len() == 2
                && group(s, "api").workers.iter().all(|w| w.generation == 1)
        })
        .await;
    assert_eq!(
        group(&after, "api")
            .last_verdict
            .as_ref()
            .map(|v| v.outcome.as_str()),
        Some("rolled_back")
    );
    assert_eq!(group_pids(&after, "gateway"), gateway_before);
    assert!(group(&after, "gateway").last_verdict.is_none(), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_every_group_over_under_load() {
    let mut host = two_groups(&example_plugin(&[]), "", "", "", Some(host_bin())).await;
    let before = host.status().await;
    let old_master = host.master_pid;
    let old_workers: Vec<u32> = ["api", "gateway"]
        .iter()
        .flat_map(|g| group_pids(&before, g))
        .collect();
    let loads = loads(&before, "/");
    advance(&loads, 100).await;
    let out = host.cli(&["upgrade"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let after = host.status().await;
    host.master_pid = after.master_pid;
    assert_ne!(host.master_pid, old_master);
    advance(&loads, 200).await;
    finish_clean(loads).await;
    for name in ["api", "gateway"] {
        assert_eq!(group_addr(&after, name), group_addr(&before, name));
        assert_eq!(group_pids(&after, name).len(), 2, "{after:?}");
    }
    assert!(!pid_alive(old_master), "old master {old_master} still runs");
    for pid in old_workers {
        assert!(!pid_alive(pid), "old worker {pid} still runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_maps_named_sockets_to_their_groups() {
    let dir = tempfile::Builder::new()
        .prefix("host-it-")
        .tempdir()
        .unwrap();
    tests::install(&example_plugin(&[]), &dir.path().join("plugin.so"));
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gateway = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // `listen` names ports other sockets hold: binding them would fail, so serving proves the
    // host used the passed sockets.
    let (occupied_a, occupied_b) = (
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    std::fs::write(
        dir.path().join("host.toml"),
        format!(
            "workers = 1\nstate_dir = \"state\"\n[[group]]\nname = \"api\"\nlisten = \"{}\"\nplugin = \"plugin.so\"\n[[group]]\nname = \"gateway\"\nlisten = \"{}\"\nplugin = \"{}\"\n",
            occupied_a.local_addr().unwrap(),
            occupied_b.local_addr().unwrap(),
            tests::axum_plugin().display()
        ),
    )
    .unwrap();
    // The gateway's socket comes first: groups take theirs by name, not by position.
    let host = activated(
        dir.path(),
        &[("gateway", gateway.as_raw_fd()), ("api", api.as_raw_fd())],
    )
    .await;
    let (api_addr, gateway_addr) = (api.local_addr().unwrap(), gateway.local_addr().unwrap());
    drop((api, gateway));
    let reply = get(api_addr, "/").await.unwrap();
    assert!(
        reply.body.starts_with("hello from example-plugin"),
        "{}",
        reply.body
    );
    let reply = get(gateway_addr, "/").await.unwrap();
    assert!(reply.body.contains("example-axum"), "{}", reply.body);
    let status = host.status();
    assert_eq!(group_addr(&status, "api"), api_addr);
    assert!(group(&status, "api").listener.activated);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_each_group() {
    let host = two_groups(
        &example_plugin(&[]),
        "admin_listen = \"127.0.0.1:0\"",
        "",
        "",
        None,
    )
    .await;
    let status = host.status().await;
    for _ in 0..3 {
        assert_eq!(
            get(group_addr(&status, "api"), "/").await.unwrap().status,
            200
        );
    }
    assert_eq!(
        get(group_addr(&status, "gateway"), "/")
            .await
            .unwrap()
            .status,
        200
    );
    let admin = prom::admin_addr(&status);
    let text = get(admin, "/metrics").await.unwrap().body;
    let samples = prom::parse(&text);
    let requests = |group: &str| {
        prom::sum(
            &samples,
            "host_http_requests_total",
            &[("group", group), ("class", "2xx")],
        )
    };
    assert_eq!(requests("api"), 3.0, "{text}");
    assert_eq!(requests("gateway"), 1.0, "{text}");
    for group in ["api", "gateway"] {
        assert_eq!(
            prom::sum(&samples, "host_serving_generation", &[("group", group)]),
            1.0,
            "{text}"
        );
        assert_eq!(
            prom::sum(
                &samples,
                "host_workers",
                &[("group", group), ("state", "ready")]
            ),
            2.0,
            "{text}"
        );
    }
    // Each family once, with every group's series in it.
    let types = text
        .lines()
        .filter(|l| l.starts_with("# TYPE host_serving_generation "))
        .count();
    assert_eq!(types, 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_storm_and_a_hung_worker_in_one_group_leave_the_other_alone() {
    let marker = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&marker).unwrap();
    let host = two_groups_with(
        &fixture_plugin(""),
        "",
        "worker_timeout = \"1s\"",
        "",
        HostOptions {
            env: vec![("FIXTURE_CRASH_MARKER".into(), marker.display().to_string())],
            ..HostOptions::default()
        },
    )
    .await;
    let before = host.status().await;
    let gateway_before = group_pids(&before, "gateway");
    let api = group_addr(&before, "api");
    let gateway = vec![
        Load::start(group_addr(&before, "gateway"), 2, Mode::KeepAlive, "/"),
        Load::start(group_addr(&before, "gateway"), 1, Mode::Close, "/"),
    ];
    for l in &gateway {
        l.advance(50).await;
    }

    // A crash storm: every api worker dies, and its replacements die at start.
    std::fs::write(&marker, "").unwrap();
    for _ in 0..2 {
        let _ = get(api, "/abort").await;
    }
    host.wait_status("api slots failing", |s| {
        group(s, "api")
            .slots
            .iter()
            .any(|slot| slot.state == "failing")
    })
    .await;
    for l in &gateway {
        l.advance(100).await;
    }
    std::fs::remove_file(&marker).unwrap();
    let recovered = host
        .wait_status("api serving again", |s| group_pids(s, "api").len() == 2)
        .await;

    // A hung worker: its I/O thread sleeps past worker_timeout; it is killed and replaced.
    let hung = group_pids(&recovered, "api");
    let sleeper = tokio::spawn(async move { get(api, "/lying-sleep?ms=3000").await });
    host.wait_status("a hung api worker replaced", |s| {
        let now = group_pids(s, "api");
        now.len() == 2 && now.iter().any(|p| !hung.contains(p))
    })
    .await;
    let _ = sleeper.await;
    for l in &gateway {
        l.advance(100).await;
    }
    for l in gateway {
        let r = l.finish().await;
        eprintln!("gateway: {}", r.summary());
        r.assert_clean();
    }
    let after = host.status().await;
    assert_eq!(group_pids(&after, "gateway"), gateway_before, "{after:?}");
    assert!(
        group(&after, "gateway")
            .slots
            .iter()
            .all(|slot| slot.failures == 0),
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_waits_until_no_group_rolls_out() {
    let gateway_canary = "canary_workers = 1\ncanary_analysis = \"60s\"\n";
    let mut host = two_groups(
        &example_plugin(&[]),
        "",
        "",
        gateway_canary,
        Some(host_bin()),
    )
    .await;
    // The gateway's reload holds its canary for the analysis period.
    let reload = host.spawn_cli(&["reload", "gateway"]);
    // (Its canary under analysis: `abort` has something to end.)
    host.wait_status("the gateway's canary under analysis", |s| {
        group(s, "gateway").rolling_out && group(s, "gateway").canary.is_some()
    })
    .await;
    let out = host.cli(&["upgrade"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("group \"gateway\": a rollout is under way"),
        "{}",
        host.explain(&out)
    );
    // `abort GROUP` ends it; then the upgrade goes through.
    let out = host.cli(&["abort", "gateway"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let reload = reload.await.unwrap();
    assert!(!reload.status.success(), "{}", host.explain(&reload));
    let out = host.cli(&["upgrade"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let after = host.status().await;
    host.master_pid = after.master_pid;
    assert_eq!(group_pids(&after, "gateway").len(), 2, "{after:?}");
}
