//! Builds of what the tests run: the `host` binary and real plugin `.so` files, each built by a
//! nested `cargo build`, cached per test process, and put in place the way a deployment does.
//!
//! Nested builds use their own target dir (`target/it`): the outer `cargo test` holds the lock on
//! `target/`. Builds are serialized across test binaries with a file lock, so two tests never
//! race on one artifact. This module never starts a host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use nix::fcntl::{Flock, FlockArg};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The nested builds' own target dir.
pub fn nested_target() -> PathBuf {
    workspace().join("target").join("it")
}

/// Runs `cargo <args>` from `cwd` with `CARGO_TARGET_DIR=target` and `env`, under a lock shared
/// by every test process (nested builds never race), and panics with cargo's output if it fails.
pub fn cargo(target: &Path, cwd: &Path, args: &[&str], env: &[(&str, &str)]) {
    std::fs::create_dir_all(nested_target()).unwrap();
    let lock_file = std::fs::File::create(nested_target().join(".build-lock")).unwrap();
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("build lock");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(cwd)
        .args(args)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("EXAMPLE_GREETING")
        .env_remove("EXAMPLE_FAIL_START")
        .env_remove("EXAMPLE_START_DELAY_MS")
        .env_remove("FIXTURE")
        .env_remove("HOST_BUILD_ID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} {env:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `package` in the nested target dir and copies `artifact` to `dest` (via a rename, so
/// `dest` is never seen half-written).
fn cargo_build(package: &str, env: &[(&str, &str)], artifact: &str, dest: &Path) {
    let target = nested_target();
    cargo(
        &target,
        &workspace(),
        &["build", "--quiet", "-p", package],
        env,
    );
    let tmp = dest.with_extension("tmp");
    std::fs::copy(target.join("debug").join(artifact), &tmp).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

/// One builder's builds made so far in this process, by artifact name.
type Built = OnceLock<Mutex<BTreeMap<String, PathBuf>>>;

/// The build at `nested_target()/name`, made by `build(dest)` the first time this process asks
/// `built` for `name`. Each builder has its own `built`, so a build in progress holds up only
/// callers of that builder.
fn built_once(built: &'static Built, name: String, build: impl FnOnce(&Path)) -> PathBuf {
    let mut built = built
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&name) {
        return p.clone();
    }
    let dest = nested_target().join(&name);
    build(&dest);
    built.insert(name, dest.clone());
    dest
}

/// The `host` binary, built once per test process.
pub fn host_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dest = nested_target().join("host-under-test");
        cargo_build("host", &[], "host", &dest);
        dest
    })
    .clone()
}

/// The `host` binary built with `HOST_BUILD_ID=id` (what `status` and `/_host/health` report as
/// `build`), built once per test process. It shares the nested target dir with [`host_bin`], so
/// cargo rebuilds the `host` crate (only) when the id changes between the two.
pub fn host_build(id: &str) -> PathBuf {
    static BUILT: Built = OnceLock::new();
    built_once(&BUILT, format!("host-build-{id}"), |dest| {
        cargo_build("host", &[("HOST_BUILD_ID", id)], "host", dest)
    })
}

/// Puts a copy of `src` at `dest` the way a package manager does: written beside it, then
/// renamed over it (a new inode; a master running the old file keeps it, and its
/// `/proc/<pid>/exe` reads "(deleted)").
pub fn install_binary(src: &Path, dest: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dest.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

/// A build of the example plugin with the given build-time environment, cached per process.
pub fn example_plugin(env: &[(&str, &str)]) -> PathBuf {
    static BUILT: Built = OnceLock::new();
    let key: String = env.iter().map(|(k, v)| format!("{k}={v};")).collect();
    let name: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    built_once(&BUILT, format!("example-plugin-{name}.so"), |dest| {
        cargo_build("example-plugin", env, "libexample_plugin.so", dest)
    })
}

/// The fixture plugin (`tests/fixtures/fixture-plugin`) built with `FIXTURE=kind` (`""` for
/// the working one).
pub fn fixture_plugin(kind: &str) -> PathBuf {
    static BUILT: Built = OnceLock::new();
    let env: &[(&str, &str)] = if kind.is_empty() {
        &[]
    } else {
        &[("FIXTURE", kind)]
    };
    built_once(&BUILT, format!("fixture-plugin-{kind}.so"), |dest| {
        cargo_build("fixture-plugin", env, "libfixture_plugin.so", dest)
    })
}

/// The axum example plugin (`example-axum`: an `axum::Router` exported with
/// `plugin_api::export_axum!`), built once per process.
pub fn axum_plugin() -> PathBuf {
    static BUILD: OnceLock<PathBuf> = OnceLock::new();
    BUILD
        .get_or_init(|| {
            let dest = nested_target().join("example-axum.so");
            cargo_build("example-axum", &[], "libexample_axum.so", &dest);
            dest
        })
        .clone()
}

/// The chat example plugin (`example-chat`: gateway events, rooms, nicks), built once per
/// process.
pub fn chat_plugin() -> PathBuf {
    static BUILT: Built = OnceLock::new();
    built_once(&BUILT, "example-chat.so".into(), |dest| {
        cargo_build("example-chat", &[], "libexample_chat.so", dest)
    })
}

/// The example plugin built with `EXAMPLE_GREETING=greeting`.
pub fn greeting_plugin(greeting: &str) -> PathBuf {
    example_plugin(&[("EXAMPLE_GREETING", greeting)])
}

/// Writes `src`'s bytes over `dest` in place, as `cp` does (same inode when it exists), mode
/// 0644 whatever the umask (the host refuses plugin files others can write).
pub fn install(src: &Path, dest: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dest, std::fs::read(src).unwrap()).unwrap();
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o644)).unwrap();
}
