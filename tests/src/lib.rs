//! Helpers for the integration tests: build the real `host` binary and real plugin `.so` files
//! with a nested `cargo build` ([`build`]), start hosts in private temp dirs ([`host`]), drive
//! them with real HTTP and WebSocket clients ([`clients`], [`load`], [`websocket`]), read their
//! `/metrics` ([`prom`]) and their processes ([`process`]), run a real Redis ([`redis`]), and
//! explain failures (every host's log is printed when a test fails).
//!
//! Every helper is also reachable at the crate root (`tests::Host`, `tests::get`, ...), as the
//! tests name them.

pub mod build;
pub mod clients;
pub mod gateway;
pub mod groups;
pub mod host;
pub mod load;
pub mod process;
pub mod prom;
pub mod redis;
pub mod websocket;

use std::time::{Duration, Instant};

pub use build::{
    axum_plugin, cargo, example_plugin, fixture_plugin, greeting_plugin, host_bin, host_build,
    install, install_binary, nested_target, workspace,
};
pub use clients::{Events, Reply, get, get_on_one_connection};
pub use host::{
    Activated, Host, HostOptions, fixture_host_with_marker, wait_old_workers_gone, worker_pids_in,
};
pub use load::{Answer, Load, LoadError, LoadReport, Mode};
pub use process::{
    Hogs, first_allowed_cpu, open_fds, pid_alive, set_fd_limit, set_soft_fd_limit, starve,
};
pub use prom::metric;
pub use redis::{RedisServer, redis_installed};
pub use websocket::{Ws, ws_across_reload, ws_close_code, ws_connect, ws_echo};

/// Waits until `cond` holds, checking every 10 ms, or panics with `what` after `timeout`.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
