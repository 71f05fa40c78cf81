//! `[plugin_config]`: the table reaches the plugin's `on_worker_start`, a reload re-reads it (a
//! new generation even when the plugin file is unchanged), `rollback` brings the previous one
//! back with its build, and a configuration the plugin or the parser refuses is a refused
//! reload while the old generation keeps serving.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use host_status::{StatusReport, WorkerStateName};
use serde_json::Value;
use tests::{Host, HostOptions, get_on_one_connection, greeting_plugin};

/// Replaces the `[plugin_config]` table (the end of the harness's config file) with `table`.
fn set_plugin_config(host: &Host, table: &str) {
    let text = std::fs::read_to_string(&host.config).unwrap();
    let keys = text.split("[plugin_config]").next().unwrap();
    std::fs::write(&host.config, format!("{keys}{table}")).unwrap();
}

async fn start(message: &str) -> Host {
    let opts = HostOptions {
        extra: format!("[plugin_config]\nmessage = \"{message}\"\n"),
        ..HostOptions::default()
    };
    Host::start(&greeting_plugin("v1"), opts).await
}

/// `GET /config` from every ready worker: pid -> body (each asked on a connection whose `GET /`
/// named the worker), within 10 s.
async fn config_of_every_worker(host: &Host) -> BTreeMap<u32, Value> {
    let pids = host.worker_pids(Some(WorkerStateName::Ready)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = BTreeMap::new();
    while seen.len() < pids.len() {
        assert!(
            Instant::now() < deadline,
            "no /config from every worker {pids:?} within 10 s: {seen:?}\n{}",
            host.log()
        );
        let Ok(replies) = get_on_one_connection(host.addr, &["/", "/config"]).await else {
            continue;
        };
        let pid: u32 = replies[0]
            .body
            .split_whitespace()
            .skip_while(|w| *w != "pid")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {:?}", replies[0].body));
        assert_eq!(replies[1].status, 200, "{:?}", replies[1]);
        let config = serde_json::from_str(&replies[1].body).expect("/config is JSON");
        seen.insert(pid, config);
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), pids);
    seen
}

async fn assert_every_worker_has(host: &Host, expected: Value) {
    for (pid, config) in config_of_every_worker(host).await {
        assert_eq!(config, expected, "worker {pid}");
    }
}

/// The config hash every worker in `status` runs (they must agree) and the serving generation.
fn config_sha(status: &StatusReport) -> (String, u64) {
    let shas: Vec<&str> = status
        .workers
        .iter()
        .map(|w| w.config_sha256.as_str())
        .collect();
    assert!(
        shas.windows(2).all(|w| w[0] == w[1]),
        "workers disagree: {status:?}"
    );
    assert_eq!(shas[0].len(), 64, "{status:?}");
    let generation = status.generation;
    let listed = status
        .generations
        .last()
        .expect("status lists the generations");
    assert_eq!(listed.generation, generation, "{status:?}");
    assert_eq!(listed.config_sha256, shas[0], "{status:?}");
    (shas[0].to_string(), generation)
}

fn plugin_sha(status: &StatusReport) -> String {
    status.workers[0].plugin.as_ref().unwrap().sha256.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_config_reloads_with_the_same_build_and_rolls_back_with_it() {
    let host = start("one").await;
    assert_every_worker_has(&host, serde_json::json!({"message": "one"})).await;
    let status = host.status().await;
    let (one, first) = config_sha(&status);
    let build = plugin_sha(&status);

    // Same plugin file, new configuration: a new generation. Another key changed too: the
    // reload says it does not apply it.
    let text = std::fs::read_to_string(&host.config).unwrap();
    let text = text.replace("graceful_timeout = \"10s\"", "graceful_timeout = \"11s\"");
    std::fs::write(&host.config, text).unwrap();
    set_plugin_config(&host, "[plugin_config]\nmessage = \"two\"\nlimit = 5\n");
    let out = host.reload_ok().await;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let noted = String::from_utf8_lossy(&out.stderr);
    assert!(
        noted.contains("changed keys graceful_timeout take effect at `host upgrade`"),
        "{}",
        host.explain(&out)
    );
    let status = host.status().await;
    let (two, second) = config_sha(&status);
    assert_ne!(two, one, "{status:?}");
    assert_eq!(second, first + 1, "{status:?}");
    assert_eq!(plugin_sha(&status), build, "the build did not change");
    assert!(said.contains(&format!("config {}", &two[..12])), "{said}");
    assert_eq!(
        status.last_reload.unwrap().config_sha256.as_deref(),
        Some(two.as_str())
    );
    assert_every_worker_has(&host, serde_json::json!({"message": "two", "limit": 5})).await;
    let text = String::from_utf8_lossy(&host.cli(&["status"]).await.stdout).into_owned();
    assert!(
        text.contains("CONFIG") && text.contains(&two[..12]),
        "{text}"
    );

    // A crashed worker's replacement runs its generation's configuration too.
    let before = host.worker_pids(Some(WorkerStateName::Ready)).await;
    let _ = tests::get(host.addr, "/exit").await;
    host.wait_for_replacement("a replacement for the crashed worker", &before)
        .await;
    assert_eq!(config_sha(&host.status().await), (two.clone(), second));
    assert_every_worker_has(&host, serde_json::json!({"message": "two", "limit": 5})).await;

    // Rollback: the previous generation's configuration with its build, whatever the file says.
    let out = host.cli(&["rollback"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let status = host.status().await;
    let (back, third) = config_sha(&status);
    assert_eq!(back, one, "{status:?}");
    assert_eq!(third, second + 1, "{status:?}");
    assert_every_worker_has(&host, serde_json::json!({"message": "one"})).await;

    // A reload reads the file again.
    host.reload_ok().await;
    assert_eq!(config_sha(&host.status().await).0, two);
    assert_every_worker_has(&host, serde_json::json!({"message": "two", "limit": 5})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_plugin_refuses_is_a_refused_reload() {
    let host = start("one").await;
    let before = host.worker_pids(None).await;
    set_plugin_config(&host, "[plugin_config]\nmessage = \"two\"\nbogus = 1\n");
    let out = host.cli(&["reload"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field `bogus`") && err.contains("still serving generation 1"),
        "{}",
        host.explain(&out)
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    let status = host.status().await;
    assert_eq!(status.generation, 1, "{status:?}");
    assert_eq!(host.worker_pids(None).await, before);
    assert_every_worker_has(&host, serde_json::json!({"message": "one"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_config_that_does_not_parse_is_refused_in_one_line() {
    let host = start("one").await;
    let before = host.worker_pids(None).await;
    let file = host.config.display().to_string();

    // Not TOML: the CLI refuses the file before it asks the master, as `check` does.
    set_plugin_config(&host, "[plugin_config]\nmessage = \"two\n");
    let out = host.cli(&["reload"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&file), "{}", host.explain(&out));
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");

    // Not JSON-able: the master re-reads the file on SIGHUP, which has no CLI in front.
    set_plugin_config(&host, "[plugin_config]\nmessage = \"two\"\nratio = nan\n");
    let out = host.cli(&["check"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host.master_pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    tests::wait_until(Duration::from_secs(10), "the SIGHUP reload refused", || {
        host.log().contains("reload refused")
    })
    .await;
    // Every command, `status` too, refuses an invalid file: make it valid again to ask.
    set_plugin_config(&host, "[plugin_config]\nmessage = \"one\"\n");
    let status = host.status().await;
    let last = status.last_reload.as_ref().unwrap();
    let error = last.error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with(&file) && error.contains("plugin_config.ratio") && !error.contains('\n'),
        "{status:?}"
    );
    assert!(!last.ok);
    assert_eq!(status.generation, 1, "{status:?}");
    assert_eq!(host.worker_pids(None).await, before);
    assert_every_worker_has(&host, serde_json::json!({"message": "one"})).await;
}
