//! Operating the host: `host check` (the config, then the plugin in a throwaway worker, touching
//! nothing), `log_format = "json"`, and dev mode's build at start, `--build`/`--watch-path`
//! relative to the current directory, and a failed build shown in `status`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use host_status::StatusReport;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tests::{
    Host, HostOptions, example_plugin, fixture_plugin, greeting_plugin, host_bin, install,
    wait_until,
};

/// A directory with `host.toml` (`text`, plus `plugin = "plugin.so"` unless set) and, if
/// given, `plugin` installed as `plugin.so`.
fn deployment(plugin: Option<&Path>, text: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("host-check-it-")
        .tempdir()
        .unwrap();
    if let Some(plugin) = plugin {
        install(plugin, &dir.path().join("plugin.so"));
    }
    let mut config = String::from("listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n");
    if !text.contains("plugin =") {
        config.push_str("plugin = \"plugin.so\"\n");
    }
    config.push_str(text);
    std::fs::write(dir.path().join("host.toml"), config).unwrap();
    dir
}

/// `host -c <dir>/host.toml check` with `TMPDIR` set to `tmp`.
async fn check(dir: &Path, tmp: &Path) -> Output {
    tokio::process::Command::new(host_bin())
        .arg("-c")
        .arg(dir.join("host.toml"))
        .arg("check")
        .env("TMPDIR", tmp)
        .output()
        .await
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sha256_prefix(file: &Path) -> String {
    let hex: String = Sha256::digest(std::fs::read(file).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex[..12].to_string()
}

/// Asserts `out` failed with one line on stderr containing every one of `expected`.
fn assert_refused(what: &str, out: &Output, expected: &[&str]) {
    let (stdout, stderr) = text(out);
    assert!(!out.status.success(), "{what}: check passed: {stdout}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
    assert!(stdout.is_empty(), "{what}: {stdout}");
    for e in expected {
        assert!(stderr.contains(e), "{what}: {e:?} not in {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_loads_a_good_plugin_and_says_what_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = greeting_plugin("v1");
    let dir = deployment(
        Some(&plugin),
        "workers = 2\n[plugin_config]\nmessage = \"hi\"\n",
    );
    let out = check(dir.path(), tmp.path()).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let sha = sha256_prefix(&plugin);
    assert!(
        stdout.starts_with("ok: ")
            && stdout.contains("example-plugin 0.1.0")
            && stdout.contains(&sha),
        "{stdout}"
    );
    assert!(stderr.is_empty(), "{stderr}");
    // Before any start: nothing was created in the state dir, and the private copy is gone.
    assert!(!dir.path().join("state").exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_bad_plugins_and_configs_with_the_reason_a_reload_gives() {
    let tmp = tempfile::tempdir().unwrap();
    let good = greeting_plugin("v1");
    let cases: Vec<(&str, Option<PathBuf>, &str, Vec<&str>)> = vec![
        (
            "wrong ABI major",
            Some(fixture_plugin("abi-major")),
            "",
            vec![
                "plugin.so (sha256 ",
                "incompatible plugin ABI: expected major 1, found 2",
            ],
        ),
        (
            "on_worker_start fails",
            Some(example_plugin(&[("EXAMPLE_FAIL_START", "error")])),
            "",
            vec!["EXAMPLE_FAIL_START=error", "on_worker_start failed"],
        ),
        (
            "on_worker_start segfaults",
            Some(fixture_plugin("start-segfault")),
            "",
            vec!["worker killed by SIGSEGV during start"],
        ),
        (
            "a [plugin_config] the plugin refuses",
            Some(good.clone()),
            "[plugin_config]\nbogus = 1\n",
            vec![
                "example-plugin 0.1.0: on_worker_start failed",
                "unknown field `bogus`",
            ],
        ),
        (
            "not a shared library",
            None,
            "",
            vec!["plugin.so is not an ELF shared library"],
        ),
        (
            "missing plugin",
            None,
            "plugin = \"nope.so\"\n",
            vec!["nope.so does not exist"],
        ),
        (
            "bad config",
            Some(good.clone()),
            "workers = \"many\"\n",
            vec!["host.toml:", "workers"],
        ),
    ];
    for (what, plugin, config, expected) in cases {
        let dir = deployment(plugin.as_deref(), config);
        if what == "not a shared library" {
            let script = dir.path().join("plugin.so");
            std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let out = check(dir.path(), tmp.path()).await;
        assert_refused(what, &out, &expected);
        assert!(!dir.path().join("state").exists(), "{what}");
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "every private copy was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_bounds_a_start_that_hangs_by_start_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let hang = example_plugin(&[("EXAMPLE_FAIL_START", "hang")]);
    let dir = deployment(Some(&hang), "start_timeout = \"500ms\"\n");
    host_bin(); // built before the clock starts
    let began = std::time::Instant::now();
    let out = check(dir.path(), tmp.path()).await;
    assert_refused(
        "hang",
        &out,
        &["did not become ready within start_timeout (500ms)"],
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
}

fn snapshot_files(host: &Host) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(host.dir.path().join("state/plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_next_to_a_running_host_changes_nothing() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let before = host.status_json().await;
    let snapshots = snapshot_files(&host);
    let log_lines = host.log().lines().count();

    // The configured plugin is now a good new build: check says so, and nothing rolls out.
    let v2 = greeting_plugin("v2");
    host.install_plugin(&v2);
    let out = host.cli(&["check"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&sha256_prefix(&v2)),
        "{}",
        host.explain(&out)
    );
    // Now a bad one: refused, and still nothing changes.
    host.install_plugin(&fixture_plugin("abi-major"));
    let out = host.cli(&["check"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));

    let after = host.status_json().await;
    for key in [
        "master_pid",
        "generation",
        "workers",
        "generations",
        "last_reload",
    ] {
        let strip = |s: &Value| {
            let mut v = s[key].clone();
            if let Some(workers) = v.as_array_mut() {
                for w in workers {
                    for counter in ["requests", "rss_bytes", "connections", "in_flight"] {
                        w.as_object_mut().unwrap().remove(counter);
                    }
                }
            }
            v
        };
        assert_eq!(strip(&before), strip(&after), "{key} changed");
    }
    assert_eq!(snapshot_files(&host), snapshots, "no new snapshot");
    assert_eq!(
        host.log().lines().count(),
        log_lines,
        "the master heard nothing:\n{}",
        host.log()
    );
    assert!(host.body("/").await.starts_with("v1 from"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_from_master_and_workers() {
    let host = Host::start(
        &fixture_plugin(""),
        HostOptions {
            extra: "log_format = \"json\"".into(),
            env: vec![("RUST_LOG".into(), "info".into())],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(host.body("/traced").await, "traced\n");
    host.reload_ok().await;
    wait_until(
        Duration::from_secs(10),
        "the plugin's traced event in the log",
        || host.log().contains("traced event"),
    )
    .await;
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));

    let log = host.log();
    let mut roles = std::collections::BTreeSet::new();
    let mut traced = None;
    for line in log.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}\n{log}"));
        for key in ["timestamp", "level", "message", "target"] {
            assert!(v[key].is_string(), "no {key}: {line}");
        }
        let process = &v["process"];
        assert!(process["pid"].is_u64(), "{line}");
        let role = process["role"].as_str().unwrap().to_string();
        if role == "worker" {
            assert!(
                process["slot"].is_u64() && process["generation"].is_u64(),
                "{line}"
            );
        }
        roles.insert(role);
        if v["message"].as_str().unwrap().contains("traced event") {
            traced = Some(v);
        }
    }
    assert_eq!(
        roles.into_iter().collect::<Vec<_>>(),
        ["master", "worker"],
        "{log}"
    );
    let traced = traced.unwrap();
    assert_eq!(
        traced["message"],
        r#"req{id=7}:inner{x=1}: traced event k="v""#
    );
    assert_eq!(traced["level"], "INFO");
    assert_eq!(traced["target"], "plugin");
    assert_eq!(traced["module"], "fixture_plugin");
    assert_eq!(traced["path"], "/traced");
    // Master events keep their own fields, flattened.
    assert!(
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| v["message"] == "worker ready" && v["generation"] == 2),
        "{log}"
    );
}

/// A project whose "build" copies the plugin named in `src/which` to `out/plugin.so`, with
/// paths relative to the directory it runs in (a stand-in for `cargo build`, in milliseconds,
/// or after `src/delay` seconds).
struct Project {
    dir: tempfile::TempDir,
}

const FAKE_BUILD: &str = r#"sleep "$(cat src/delay 2>/dev/null || echo 0)"; f=$(cat src/which) && test -f "$f" || { echo "compiling..."; echo "error: no such build: $f" >&2; exit 1; }; cp "$f" out/plugin.so.tmp && chmod 644 out/plugin.so.tmp && mv out/plugin.so.tmp out/plugin.so"#;

impl Project {
    fn new() -> Project {
        let dir = tempfile::Builder::new()
            .prefix("host-dev-it-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        Project { dir }
    }

    fn edit(&self, which: &Path) {
        std::fs::write(
            self.dir.path().join("src/which"),
            which.display().to_string(),
        )
        .unwrap();
    }

    fn plugin(&self) -> PathBuf {
        self.dir.path().join("out/plugin.so")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_builds_at_start_in_the_current_directory_and_shows_a_failed_build() {
    let project = Project::new();
    // A stale build is in place; the sources say v2.
    install(&greeting_plugin("v1"), &project.plugin());
    project.edit(&greeting_plugin("v2"));
    let host = Host::start(
        &project.plugin(),
        HostOptions {
            // The config file lives elsewhere (the host's temp dir): `--build` and
            // `--watch-path` must not resolve against it.
            extra: format!("plugin = \"{}\"", project.plugin().display()),
            start_args: vec![
                "--build".into(),
                FAKE_BUILD.into(),
                "--watch-path".into(),
                "src".into(),
            ],
            cwd: Some(project.dir.path().to_path_buf()),
            ..Default::default()
        },
    )
    .await;
    assert!(
        host.body("/").await.starts_with("v2 from"),
        "the first responses come from the build at start"
    );
    // The keys set by flags are not "changed keys" for a reload.
    let out = host.reload_ok().await;
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("note:"),
        "{}",
        host.explain(&out)
    );

    // A slow build does not hold the master up: `status` answers at once meanwhile.
    let builds = || host.log().matches("INFO building").count();
    std::fs::write(project.dir.path().join("src/delay"), "2").unwrap();
    // A build that fails shows in status, text and JSON, and the old build keeps serving.
    project.edit(Path::new("/nonexistent/build.so"));
    wait_until(Duration::from_secs(10), "a build to begin", || builds() > 0).await;
    let (took, status) = host.raw_status().await;
    assert!(
        status.last_build.is_none(),
        "the build is still running: {status:?}"
    );
    assert!(
        took < Duration::from_millis(500),
        "status took {took:?} during a build"
    );
    let status = host
        .wait_status("the failed build in status", |s| {
            s.last_build.as_ref().is_some_and(|b| !b.ok)
        })
        .await;
    let build = status.last_build.unwrap();
    assert_eq!(
        build.error.as_deref(),
        Some("error: no such build: /nonexistent/build.so")
    );
    assert!(build.started_at > 0);
    let out = host.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("last build: FAILED at ")
            && text.contains("error: no such build: /nonexistent/build.so"),
        "{text}"
    );
    assert!(host.body("/").await.starts_with("v2 from"));
    // It stays until a build succeeds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!host.status().await.last_build.unwrap().ok);

    std::fs::write(project.dir.path().join("src/delay"), "0").unwrap();
    project.edit(&greeting_plugin("v3"));
    host.wait_status("the next build to succeed", |s| {
        s.last_build.as_ref().is_some_and(|b| b.ok)
    })
    .await;
    wait_until(Duration::from_secs(10), "v3 served", || {
        host.log().contains("auto-reload: generation 3 serving")
    })
    .await;
    assert!(host.body("/").await.starts_with("v3 from"));
    let out = host.cli(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("last build: ok at "),
        "{}",
        host.explain(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_at_start_refuses_to_start() {
    let project = Project::new();
    install(&greeting_plugin("v1"), &project.plugin());
    project.edit(Path::new("/nonexistent/build.so"));
    let dir = deployment(
        None,
        &format!("plugin = \"{}\"\n", project.plugin().display()),
    );
    let config = dir.path().join("host.toml");
    let out = tokio::process::Command::new(host_bin())
        .arg("-c")
        .arg(&config)
        .args(["start", "-d", "--build", FAKE_BUILD, "--watch-path", "src"])
        .current_dir(project.dir.path())
        .output()
        .await
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.trim().lines().last().unwrap();
    assert!(
        last.starts_with("error: the build at start failed")
            && last.contains("error: no such build: /nonexistent/build.so")
            && last.contains("not starting"),
        "{stderr}"
    );
    assert!(
        stderr.contains("compiling..."),
        "the build's output is shown: {stderr}"
    );
    let out = tokio::process::Command::new(host_bin())
        .arg("-c")
        .arg(&config)
        .arg("status")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "no master was started");
}

/// `GLIBC_TUNABLES` as `/proc` shows it in each worker's environment.
fn workers_tunables(status: &StatusReport) -> Vec<Option<String>> {
    tests::worker_pids_in(status, None)
        .into_iter()
        .map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            environ
                .split(|b| *b == 0)
                .filter_map(|var| var.strip_prefix(b"GLIBC_TUNABLES="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .next()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_get_the_hosts_malloc_tunables_unless_the_environment_sets_its_own() {
    // The test's own environment may set it: then that is what the workers must get.
    let inherited = std::env::var("GLIBC_TUNABLES").ok();
    let host = Host::start(&fixture_plugin(""), HostOptions::default()).await;
    let expected = inherited.unwrap_or_else(|| "glibc.malloc.tcache_count=64".into());
    let got = workers_tunables(&host.status().await);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter().all(|t| t.as_deref() == Some(&*expected)),
        "{got:?}"
    );
    // Replacement workers too.
    host.reload_ok().await;
    let got = workers_tunables(&host.status().await);
    assert!(
        got.iter().all(|t| t.as_deref() == Some(&*expected)),
        "{got:?}"
    );
    drop(host);

    let own = "glibc.malloc.mxfast=0";
    let host = Host::start(
        &fixture_plugin(""),
        HostOptions {
            env: vec![("GLIBC_TUNABLES".into(), own.into())],
            ..Default::default()
        },
    )
    .await;
    assert!(!host.body("/").await.is_empty());
    let got = workers_tunables(&host.status().await);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|t| t.as_deref() == Some(own)), "{got:?}");
}
