//! The CLI contract: status output, config errors, refusing a second start, bad reloads.

use std::time::Duration;

use tests::{Host, HostOptions, get, greeting_plugin, host_bin, pid_alive, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_the_documented_shape() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let s = host.status_json().await;
    assert_eq!(s["master_pid"].as_u64(), Some(host.master_pid as u64));
    assert_eq!(s["generation"], 1);
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert!(w["pid"].as_u64().unwrap() > 0);
        assert_eq!(w["generation"], 1);
        assert_eq!(w["state"], "ready");
        assert!(w["requests"].is_u64());
        assert!(w["rss_bytes"].as_u64().unwrap() > 0);
        assert_eq!(w["plugin"]["name"], "example-plugin");
        assert_eq!(w["plugin"]["version"], "0.1.0");
        assert_eq!(w["plugin"]["sha256"].as_str().unwrap().len(), 64);
    }
    assert!(s["last_reload"].is_null());

    // Requests are counted per worker.
    for _ in 0..5 {
        get(host.addr, "/").await.unwrap();
    }
    let s = host.status().await;
    let total: u64 = s.workers.iter().map(|w| w.requests).sum();
    assert_eq!(total, 5);

    let out = host.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("generation 1") && text.contains("ready") && text.contains("example-plugin"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_is_refused_and_the_first_keeps_serving() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let out = host.cli(&["start", "-d"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running") && err.contains(&host.master_pid.to_string()),
        "{err}"
    );
    assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_broken_file_is_refused_and_the_old_build_serves() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let before = host.worker_pids(None).await;
    std::fs::write(&host.plugin, b"this is not a shared library\n").unwrap();
    let out = host.cli(&["reload"]).await;
    assert!(
        !out.status.success(),
        "reload of a text file must fail: {}",
        host.explain(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plugin.so") && err.contains("not an ELF"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert_eq!(
        host.worker_pids(None).await,
        before,
        "no worker was touched"
    );
    assert!(host.body("/").await.starts_with("v1 from"));
    let s = host.status().await;
    let last = s.last_reload.expect("a last reload");
    assert!(!last.ok);
    assert!(last.error.unwrap().contains("not an ELF"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_fails_to_start_leaves_the_old_workers_alone() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let before = host.worker_pids(None).await;
    host.install_plugin(&tests::example_plugin(&[("EXAMPLE_FAIL_START", "error")]));
    let out = host.cli(&["reload"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("EXAMPLE_FAIL_START=error") && err.contains("on_worker_start failed"),
        "{err}"
    );
    assert_eq!(host.worker_pids(None).await, before);
    assert!(host.body("/").await.starts_with("v1 from"));
    // A good build afterwards reloads normally.
    host.install_plugin(&greeting_plugin("v2"));
    host.reload_ok().await;
    assert!(host.body("/").await.starts_with("v2 from"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_without_a_master_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nworkers = 1\n").unwrap();
    for args in [&["status"][..], &["reload"], &["stop"]] {
        let out = tokio::process::Command::new(host_bin())
            .arg("-c")
            .arg(&config)
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not running"), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    for (text, key) in [
        ("workers = \"many\"\n", "workers"),
        ("graceful_timeout = \"forever\"\n", "graceful_timeout"),
        ("listen = \"not an address\"\n", "listen"),
        ("lsiten = \"127.0.0.1:1\"\n", "lsiten"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = tokio::process::Command::new(host_bin())
            .arg("-c")
            .arg(&config)
            .arg("start")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{text:?}: {err}");
        assert!(
            err.contains(key) && err.contains("host.toml"),
            "{text:?}: {err}"
        );
    }
    let missing = dir.path().join("nope.toml");
    let out = tokio::process::Command::new(host_bin())
        .arg("-c")
        .arg(&missing)
        .arg("status")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nope.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_die_with_a_killed_master() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let workers = host.worker_pids(None).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host.master_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        Duration::from_secs(5),
        "workers to die with their master",
        || workers.iter().all(|&p| !pid_alive(p)),
    )
    .await;
    // A new start recovers the stale pidfile and socket by itself.
    let out = host.cli(&["start", "-d"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
}
