//! Dev mode: the host reloads by itself when the plugin file changes, or after a build step.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_status::WorkerStateName;
use tests::{
    Host, HostOptions, Load, Mode, cargo, fixture_plugin, get, greeting_plugin, wait_until,
    workspace,
};

/// A target dir of its own: the file-watch test watches its `debug/` directory, which no other
/// test writes into.
fn watch_target() -> PathBuf {
    workspace().join("target").join("it-watch")
}

/// Waits until `GET /`'s first line starts with `prefix`, and returns how long that took.
async fn served_within(host: &Host, prefix: &str, timeout: Duration) -> Duration {
    let began = Instant::now();
    loop {
        if let Ok(reply) = get(host.addr, "/").await
            && reply.body.starts_with(prefix)
        {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < timeout,
            "{prefix:?} not served within {timeout:?}\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cargo_build_is_served_within_seconds_with_no_failed_requests() {
    let target = watch_target();
    let build = |greeting: &str| {
        cargo(
            &target,
            &workspace(),
            &["build", "--quiet", "-p", "example-plugin"],
            &[("EXAMPLE_GREETING", greeting)],
        )
    };
    build("w1");
    let plugin = target.join("debug/libexample_plugin.so");
    let extra = format!("plugin = \"{}\"\nwatch = true", plugin.display());
    let host = Host::start(
        &plugin,
        HostOptions {
            extra,
            ..Default::default()
        },
    )
    .await;
    assert!(host.body("/").await.starts_with("w1 from"));
    let load = Load::start(host.addr, 8, Mode::KeepAlive, "/");
    load.advance(100).await;

    build("w2");
    let took = served_within(&host, "w2 from", Duration::from_secs(15)).await;
    eprintln!("cargo build -> served in {took:?}");
    load.advance(100).await;
    load.finish().await.assert_clean();
    // The line is written when the rollout ends, after the first new worker already served w2.
    wait_until(
        Duration::from_secs(15),
        "one line per automatic reload",
        || host.log().contains("auto-reload: generation 2 serving"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_write_is_refused_and_the_next_good_build_is_picked_up() {
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            extra: "watch = true".into(),
            ..Default::default()
        },
    )
    .await;
    let load = Load::start(host.addr, 8, Mode::Close, "/");
    load.advance(50).await;

    // Truncate in place, then garbage: what a crashed `cp` or a half-finished link leaves.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&host.plugin)
            .unwrap();
        f.write_all(b"\x7fELF\x02\x01\x01 definitely not a whole shared object")
            .unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "the broken write to be refused",
        || host.log().contains("auto-reload refused"),
    )
    .await;
    assert!(
        host.body("/").await.starts_with("v1 from"),
        "the old build keeps answering"
    );
    load.advance(50).await;

    host.install_plugin(&greeting_plugin("v2"));
    served_within(&host, "v2 from", Duration::from_secs(10)).await;
    load.advance(50).await;
    load.finish().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rapid_identical_rewrites_cause_at_most_one_reload() {
    let (v1, v2, v3) = (
        greeting_plugin("v1"),
        greeting_plugin("v2"),
        greeting_plugin("v3"),
    );
    let host = Host::start(
        &v1,
        HostOptions {
            extra: "watch = true".into(),
            ..Default::default()
        },
    )
    .await;

    // Six rewrites with the serving bytes: no reload at all.
    for _ in 0..6 {
        host.install_plugin(&v1);
    }
    wait_until(
        Duration::from_secs(10),
        "the rewrites to be noticed",
        || host.log().contains("is the one serving: no reload"),
    )
    .await;
    host.install_plugin(&v2);
    served_within(&host, "v2 from", Duration::from_secs(10)).await;
    // The generation counts as serving once its rollout ends, a little after its first answer.
    let status = host
        .wait_status("v2's rollout to end", |s| s.generation != 1)
        .await;
    assert_eq!(
        status.generation, 2,
        "the identical rewrites made no generation"
    );

    // Six rapid rewrites of a new build: one reload. A distinct build after them lands as the
    // very next generation, so nothing else was rolled out in between.
    for _ in 0..6 {
        host.install_plugin(&v3);
    }
    served_within(&host, "v3 from", Duration::from_secs(10)).await;
    host.install_plugin(&fixture_plugin(""));
    served_within(&host, "fixture ok", Duration::from_secs(10)).await;
    let status = host
        .wait_status("the fixture's rollout to end", |s| {
            s.workers.iter().all(|w| {
                w.state != WorkerStateName::Ready
                    || (w
                        .plugin
                        .as_ref()
                        .is_some_and(|p| p.name == "fixture-plugin")
                        && w.generation == s.generation)
            })
        })
        .await;
    assert_eq!(
        status.generation, 4,
        "v2, then one generation for six writes of v3, then the fixture"
    );
}

fn write_plugin_source(dir: &Path, greeting: &str) {
    std::fs::write(
        dir.join("src/lib.rs"),
        format!(
            r#"use plugin_api::{{BoxError, Plugin, Request, Response, WorkerContext}};
pub struct P;
impl Plugin for P {{
    fn on_worker_start(_: &WorkerContext) -> Result<Self, BoxError> {{ Ok(P) }}
    fn handle(&self, _: Request) -> Response {{ Response::new("{greeting}\n".into()) }}
}}
plugin_api::export_plugin!(P);
"#
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_build_step_reloads_on_a_source_edit_and_refuses_a_build_error() {
    // A plugin crate of the test's own, built into the shared watch target dir.
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"watch-plugin\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nplugin-api = {{ path = \"{}\" }}\n\n[workspace]\n",
            workspace().join("plugin-api").display()
        ),
    )
    .unwrap();
    std::fs::copy(workspace().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    write_plugin_source(dir, "build one");
    let target = watch_target();
    let manifest = dir.join("Cargo.toml");
    cargo(
        &target,
        dir,
        &[
            "build",
            "--quiet",
            "--offline",
            "--manifest-path",
            manifest.to_str().unwrap(),
        ],
        &[],
    );

    let plugin = target.join("debug/libwatch_plugin.so");
    let extra = format!(
        "plugin = \"{}\"\nbuild = \"cargo build --quiet --offline --manifest-path {}\"\nwatch_paths = [\"{}\"]",
        plugin.display(),
        manifest.display(),
        dir.join("src").display()
    );
    let env = vec![("CARGO_TARGET_DIR".to_string(), target.display().to_string())];
    let host = Host::start(
        &plugin,
        HostOptions {
            extra,
            env,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(host.body("/").await, "build one\n");
    let load = Load::start(host.addr, 8, Mode::KeepAlive, "/");

    write_plugin_source(dir, "build two");
    let took = served_within(&host, "build two", Duration::from_secs(60)).await;
    eprintln!("source edit -> built and served in {took:?}");

    std::fs::write(dir.join("src/lib.rs"), "this does not compile\n").unwrap();
    wait_until(
        Duration::from_secs(60),
        "the build error to be shown",
        || host.log().contains("build failed"),
    )
    .await;
    assert!(
        host.log().contains("expected one of"),
        "the compiler's own message is shown:\n{}",
        host.log()
    );
    assert_eq!(
        host.body("/").await,
        "build two\n",
        "the last good build keeps serving"
    );

    write_plugin_source(dir, "build three");
    served_within(&host, "build three", Duration::from_secs(60)).await;
    load.advance(50).await;
    load.finish().await.assert_clean();
}
