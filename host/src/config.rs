//! The config file: raw TOML in, a checked [`Config`] out.
//!
//! Each key is defined once in [`keys::KEYS`] (name, scope, kind and range, default, doc); the
//! typed value, the default, the range error and `docs/configuration.md` come from that
//! definition. This file combines keys (defaults that follow other keys, keys that need others)
//! and builds the [`WorkerSpec`](crate::protocol::WorkerSpec) a worker starts with
//! ([`Config::worker_spec`], the one place it is built).
//!
//! Worker groups: a file's `[[group]]` tables each become one [`Config`] ([`Config::parse_all`],
//! in the file's order), whose keys are the group's own, else the top of the file's, else the
//! defaults; master-wide keys (scope `master` in [`keys::KEYS`]) only at the top. A file without
//! groups is one group, [`DEFAULT_GROUP`], exactly as before groups.
//!
//! Owns parsing, defaults and validation, and the rule that relative paths are relative to the
//! config file's directory. Every error is one line naming the file, the line and the key. It
//! does not touch the filesystem beyond reading the file: whether the plugin exists is the
//! reload's business, not the config's.
//!
//! Every value is bounded here, so nothing downstream can overflow: a duration is at most
//! [`MAX_DRAIN`] (`graceful_timeout`) or [`MAX_WAIT`] (the others), which keeps `Instant + d * n`
//! and `d.as_millis() as u64` exact for any small `n`, and every size and count has a range. The
//! ranges are named in the error message.
//!
//! `[plugin_config]` is the one table: any TOML the plugin wants, turned here into the JSON
//! text the plugin's `on_worker_start` receives ([`PluginConfig`]), bounded by
//! [`MAX_PLUGIN_CONFIG_BYTES`]. The config does not decide when it is read again: the master
//! re-reads the file at each reload and applies only this table from it
//! ([`Config::reread_plugin_config`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::logging::LogFormat;

pub mod keys;

/// A checked configuration. All paths are absolute.
#[derive(Clone, Debug)]
pub struct Config {
    /// The config file this was read from (absolute).
    pub file: PathBuf,
    /// The worker group this is (`[[group]]`'s `name`; [`DEFAULT_GROUP`] for a file without
    /// groups). Every other field is this group's value, or the master-wide one.
    pub group: String,
    /// The file has `[[group]]` tables (else its one group is the whole file, as before groups).
    pub explicit_group: bool,
    /// `host reload`, `SIGHUP` and the watcher replace this group's workers.
    pub reloadable: bool,
    pub listen: SocketAddr,
    /// Where the master serves `/metrics` (Prometheus text); `None`: nowhere. Never `listen`.
    pub admin_listen: Option<SocketAddr>,
    pub workers: usize,
    pub plugin: PathBuf,
    pub state_dir: PathBuf,
    pub graceful_timeout: Duration,
    pub start_timeout: Duration,
    /// During a drain, how long an idle keep-alive HTTP/1 connection may still send one more
    /// request (answered with `Connection: close`) before it is closed.
    pub idle_grace: Duration,
    /// Largest request body a worker reads; larger ones get `413`.
    pub max_body_bytes: usize,
    /// A request body must arrive within this; else `408` and the connection is closed.
    pub body_read_timeout: Duration,
    /// Listen backlog of the one listening socket.
    pub backlog: i32,
    /// How many generations' snapshots to keep (for `host rollback`); at least 2.
    pub keep_snapshots: usize,
    /// Most old workers draining (or killed, not yet reaped) at once: a rollout waits for one
    /// to exit before it starts its next worker past this. Sizes the worker table.
    pub max_draining_workers: usize,
    /// Load a plugin file (or one in a directory) that other users can write. Off by default:
    /// whoever can write the file chooses the native code this host runs.
    pub allow_writable_plugin: bool,
    /// Workers publish their connection counts and one holding clearly more than another steps
    /// aside before accepting (see `worker_table`). Off: the kernel alone decides.
    pub accept_balance: bool,
    /// Largest plugin file a reload snapshots.
    pub max_plugin_bytes: u64,
    /// A client must send a request's headers within this time (slowloris guard).
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection with no stream open for this long gets GOAWAY (an idle HTTP/1
    /// keep-alive connection is closed at the shorter of this and `header_read_timeout`).
    pub keepalive_timeout: Duration,
    /// A connection whose writes make no progress for this long is closed.
    pub send_timeout: Duration,
    /// Most connections one worker holds open; at the limit it stops accepting. `None`: derived
    /// from the worker's open-files limit.
    pub max_connections: Option<u64>,
    /// Most concurrent streams a client may open on one HTTP/2 connection.
    pub http2_max_streams: u32,
    /// Most response bytes buffered per HTTP/2 stream ahead of the socket.
    pub http2_send_buffer: usize,
    /// Most header fields in one request; more get `431`.
    pub max_headers: usize,
    /// Most bytes of request line and headers; more get `431` (or `414` for a long URI).
    pub max_header_bytes: usize,
    /// Dev mode: reload by itself when the plugin file changes (or after `build` succeeds).
    pub watch: bool,
    /// Quiet time after the last change before reacting to a burst of them.
    pub watch_debounce: Duration,
    /// Build command (run with `sh -c` in `build_dir`) after a source change.
    pub build: Option<String>,
    /// Where `build` runs: the config file's directory (the current directory for a `--build`
    /// given on the command line).
    pub build_dir: PathBuf,
    /// What `build` watches (recursively); required with `build`.
    pub watch_paths: Vec<PathBuf>,
    /// Recycling: a worker that served this many requests (plus its jitter) is replaced, new
    /// before old. 0: never.
    pub max_requests: u64,
    /// Each worker's limit is `max_requests` plus a random `0..=max_requests_jitter`, so workers
    /// started together are not all replaced at once.
    pub max_requests_jitter: u64,
    /// Recycling: a ready worker whose resident set grows past this many bytes is replaced.
    pub max_worker_rss: Option<u64>,
    /// A ready worker that sends no heartbeat for this long is hung: killed and replaced.
    pub worker_timeout: Duration,
    /// The `[plugin_config]` table, as the plugin's `on_worker_start` receives it (`{}` when
    /// absent). The only key a reload re-reads.
    pub plugin_config: PluginConfig,
    /// How log lines are written, by the master and its workers.
    pub log_format: LogFormat,
    /// Where workers append one line per request (in `log_format`); `None`: no access log.
    pub access_log: Option<PathBuf>,
    /// The blocking pool: at most this many threads run live requests.
    pub blocking_threads: usize,
    /// At most this many requests wait for a pool thread beyond those free threads can take at
    /// once; more are answered `503` with `Retry-After`.
    pub blocking_queue: usize,
    /// At most this many more threads may still run handlers whose client is gone.
    pub blocking_abandoned_threads: usize,
    /// A worker remembers at most this many paths caught stalling its I/O thread (and as many
    /// whose async handler blocked in one poll).
    pub max_slow_paths: usize,
    /// Keys set on the command line (dev mode's flags), not in the file: a reload that re-reads
    /// the file does not count them as changed.
    pub overridden: Vec<&'static str>,
    /// How often the master checks that the shared listening socket still listens (a plugin
    /// can shut it down for every worker with one call); it re-arms it when it does not.
    pub listener_check_interval: Duration,
    /// Processes the workers left behind (the master is their subreaper) get SIGTERM, then
    /// SIGKILL this much later.
    pub orphan_grace: Duration,
    /// The canary: new workers a reload starts, then holds for `canary_analysis` while the
    /// master judges them against the old generation on live traffic. 0: no staged rollout.
    pub canary: CanaryConfig,
    /// `gateway = true`: this group's processes are WebSocket gateways (no plugin), with these
    /// bounds; `None`: an ordinary plugin group.
    pub gateway: Option<GatewayConfig>,
    /// A business group's links: the link socket of every process of every gateway group
    /// naming this group as its `business` (filled by [`Config::parse_all`]); empty otherwise.
    pub gateway_links: Vec<PathBuf>,
    /// A plugin group's same-port gateways: each path some gateway group takes from this
    /// group's listener (`upgrade_from`), with the hand-off socket of each of its processes
    /// (filled by [`Config::parse_all`]).
    pub gateway_handoffs: Vec<crate::protocol::GatewayHandoff>,
    /// How long a business worker's gateway event handler may run (`gateway_event_timeout`).
    pub gateway_event_timeout: Duration,
}

/// A gateway group's keys (`gateway = true`, `business`, `gateway_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The plugin group whose workers handle the clients' events.
    pub business: String,
    /// Most clients one gateway process holds; more are refused before the upgrade.
    pub max_clients: u64,
    /// Largest message (and frame) a client may send.
    pub max_message: u64,
    /// Most bytes queued for one client.
    pub send_queue: u64,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How long a client's events wait while no business worker is connected.
    pub hold: Duration,
    /// Same port: the plugin group whose workers pass this gateway the connections that ask
    /// for `path` (`upgrade_from`, `upgrade_path`).
    pub upgrade: Option<UpgradeFrom>,
    /// `cluster`: the Redis URL of the hosts' pub/sub (`None`: this host alone).
    pub cluster: Option<String>,
    /// Where this group's slot 0 is in its business group's `gateway_links` (filled by
    /// [`Config::parse_all`]): process `slot` is link `link_base + slot`, the top 16 bits of
    /// its clients' ids, so a business worker sends a command for one client on one link.
    pub link_base: u32,
}

/// `upgrade_from` and `upgrade_path`: a gateway's clients taken from a plugin group's listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeFrom {
    pub group: String,
    /// An exact path (`/chat`), no query.
    pub path: String,
}

/// Longest `upgrade_path`.
const MAX_UPGRADE_PATH: usize = 1024;

/// An `upgrade_path` is an absolute path of visible ASCII, with no query or fragment.
fn check_upgrade_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/')
        || path.len() > MAX_UPGRADE_PATH
        || path
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#')
    {
        return Err(format!(
            "{path:?} is not a path like \"/chat\": it starts with `/`, has no query, no spaces, at most {MAX_UPGRADE_PATH} characters"
        ));
    }
    Ok(())
}

/// What a worker's spec takes from the caller rather than the config (see
/// [`Config::worker_spec`]).
pub struct WorkerStart<'a> {
    pub slot: u32,
    pub generation: u64,
    /// The generation's private copy of the plugin, and its sha256.
    pub plugin: PathBuf,
    pub plugin_sha256: String,
    pub plugin_config: &'a PluginConfig,
    /// The worker's cell in the accept table and the table's size (`None`, 0: no table).
    pub table_cell: Option<u32>,
    pub table_cells: u32,
    /// This worker's request limit (`max_requests` plus its jitter) and that jitter; 0: never.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
}

/// The `canary_*` keys (and `watch_canary`): how a new generation is judged on live traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryConfig {
    /// New workers serving beside the old generation during the analysis; 0: off.
    pub workers: usize,
    /// How long the canary serves beside the old generation before it is promoted.
    pub analysis: Duration,
    /// After a full rollout, how long the new generation is still judged (and rolled back by
    /// itself if it fails).
    pub watch: Duration,
    /// Requests the canary must answer before its error share or latency can condemn it.
    pub min_requests: u64,
    /// The canary's 5xx share (failed answers and lost requests included) may exceed the old
    /// generation's by at most this fraction (0.02: two percentage points).
    pub max_error_increase: f64,
    /// The canary's p99 latency may be at most this many times the old generation's.
    pub max_latency_ratio: f64,
    /// Dev mode: judge the watcher's reloads too (off: they roll out at once).
    pub in_watch_mode: bool,
}

/// The `[plugin_config]` table as JSON text (what the plugin receives), and that text's sha256
/// (what `status` shows, so an operator sees which configuration each generation runs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginConfig {
    pub json: Arc<str>,
    /// Lowercase hex sha256 of `json`.
    pub sha256: String,
}

impl PluginConfig {
    fn from_json(json: String) -> PluginConfig {
        let sha256 = crate::master::snapshot::hex(&Sha256::digest(json.as_bytes()));
        PluginConfig {
            json: json.into(),
            sha256,
        }
    }
}

impl Default for PluginConfig {
    /// No `[plugin_config]`: an empty table.
    fn default() -> PluginConfig {
        PluginConfig::from_json("{}".into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
}

/// A size: a number of bytes, or a string like `"512MiB"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSize {
    Bytes(i64),
    Text(String),
}

impl ByteSize {
    fn bytes(&self) -> Result<u64, String> {
        let text = match self {
            ByteSize::Bytes(n) => {
                return u64::try_from(*n).map_err(|_| format!("{n} must not be negative"));
            }
            ByteSize::Text(t) => t.trim(),
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let unit_bytes: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => 0,
        };
        digits
            .parse::<u64>()
            .ok()
            .filter(|_| unit_bytes > 0)
            .and_then(|n| n.checked_mul(unit_bytes))
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a size like 536870912 or \"512MiB\" (units: B, KiB, MiB, GiB)"
                )
            })
    }
}

pub const DEFAULT_FILE: &str = "host.toml";

/// The name of the one group of a file without `[[group]]` tables.
pub const DEFAULT_GROUP: &str = "default";

/// The longest group name (it names a directory and a metrics label).
pub const MAX_GROUP_NAME: usize = 64;

/// The shortest configurable duration: workers get durations in whole milliseconds.
pub const MIN_DURATION: Duration = Duration::from_millis(1);
/// The longest `graceful_timeout`: a day of draining (long downloads), not more.
pub const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);
/// The longest of the other durations (`start_timeout`, `idle_grace`, `header_read_timeout`,
/// `watch_debounce`): an hour.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// The largest `max_body_bytes`: the whole body is held in memory.
pub const MAX_BODY_BYTES: i64 = 1 << 30;
/// The largest `max_connections` (per worker).
pub const MAX_CONNECTIONS: i64 = 1 << 24;
/// The largest `gateway_max_message` and `gateway_send_queue`: a gateway holds what a client
/// sends, and what is queued for it, in memory.
pub const MAX_GATEWAY_MESSAGE: u64 = 64 << 20;
/// The largest `max_requests` and `max_requests_jitter`: their sum can never overflow.
pub const MAX_REQUESTS: i64 = 1 << 40;
/// The shortest `worker_timeout`: workers beat four times per timeout, and a beat every 25 ms is
/// as often as is useful.
pub const MIN_WORKER_TIMEOUT: Duration = Duration::from_millis(100);
/// The largest `[plugin_config]`, as JSON text. It travels escaped inside the worker's start
/// message (at most twice as long then), whose frame is at most `protocol::MAX_FRAME` (1 MiB).
pub const MAX_PLUGIN_CONFIG_BYTES: usize = 256 << 10;
/// The largest `max_draining_workers`: each is a process, and a cell of the worker table.
pub const MAX_DRAINING_WORKERS: i64 = 4096;
/// The largest `blocking_threads` and `blocking_abandoned_threads`.
pub const MAX_POOL_THREADS: i64 = 32_768;
/// The largest `blocking_queue`.
pub const MAX_POOL_QUEUE: i64 = 1_000_000;
/// The largest `max_slow_paths` (8 bytes each).
pub const MAX_SLOW_PATHS: i64 = 1 << 20;
/// How deeply `[plugin_config]` may nest tables and arrays.
pub const MAX_PLUGIN_CONFIG_DEPTH: usize = 64;

impl Config {
    /// The config file's directory, against which its relative paths resolve (and which the
    /// plugin reads as `WorkerContext::config_dir`).
    pub fn config_dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("/"))
    }

    /// Reads and checks the config file at `path`: every group, in the file's order (at least
    /// one).
    pub fn load_all(path: &Path) -> Result<Vec<Config>, ConfigError> {
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        Config::parse_all(&file, &text)
    }

    /// Reads this config's file again for a reload and returns its `[plugin_config]`, the only
    /// part a reload applies. The whole file is checked (a file `host check` refuses refuses the
    /// reload, with the same one line); other keys that changed are ignored and named, so the
    /// caller can say they wait for `host upgrade`. Blocks on file I/O (and on a resolver for a
    /// `listen` host name): not for the master's event loop.
    pub fn reread_plugin_config(&self) -> Result<(PluginConfig, Vec<&'static str>), ConfigError> {
        let all = Config::load_all(&self.file)?;
        let new = all
            .iter()
            .find(|g| g.group == self.group)
            .ok_or_else(|| ConfigError::Syntax {
                path: self.file.clone(),
                message: format!(
                    "group {:?} is no longer in the file (a group comes and goes with `host upgrade`)",
                    self.group
                ),
            })?;
        Ok((new.plugin_config.clone(), self.frozen_keys_changed(new)))
    }

    /// What a reload says about `keys`, changed keys it does not apply: they take effect at
    /// `host upgrade` (a new master, with no failed request), except `listen`, whose socket an
    /// upgrade inherits: that one waits for `host restart`.
    pub fn frozen_keys_note<S: AsRef<str>>(keys: &[S]) -> String {
        let (listen, upgrade): (Vec<&str>, Vec<&str>) =
            keys.iter().map(AsRef::as_ref).partition(|k| *k == "listen");
        let mut note = String::from("a reload applies only [plugin_config]; changed keys ");
        if !upgrade.is_empty() {
            note.push_str(&upgrade.join(", "));
            note.push_str(" take effect at `host upgrade`");
        }
        if !listen.is_empty() {
            if !upgrade.is_empty() {
                note.push_str(", and ");
            }
            note.push_str("listen takes effect at `host restart` (an upgrade keeps the socket)");
        }
        note
    }

    /// The keys other than `plugin_config` whose values differ in `new` (a `listen` with port
    /// 0 matches the port the kernel picked).
    fn frozen_keys_changed(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let same = |new: SocketAddr, running: SocketAddr| {
            new == running || (new.port() == 0 && new.ip() == running.ip())
        };
        if !same(new.listen, self.listen) {
            changed.push("listen");
        }
        let admin_same = match (new.admin_listen, self.admin_listen) {
            (Some(new), Some(running)) => same(new, running),
            (new, running) => new == running,
        };
        if !admin_same {
            changed.push("admin_listen");
        }
        macro_rules! compare {
            ($($key:ident),*) => {$(
                if new.$key != self.$key && !self.overridden.contains(&stringify!($key)) {
                    changed.push(stringify!($key));
                }
            )*};
        }
        compare!(
            reloadable,
            workers,
            plugin,
            state_dir,
            graceful_timeout,
            start_timeout,
            idle_grace,
            max_body_bytes,
            body_read_timeout,
            backlog,
            keep_snapshots,
            allow_writable_plugin,
            accept_balance,
            max_plugin_bytes,
            header_read_timeout,
            max_headers,
            max_header_bytes,
            keepalive_timeout,
            send_timeout,
            max_connections,
            http2_max_streams,
            http2_send_buffer,
            watch,
            watch_debounce,
            build,
            watch_paths,
            max_requests,
            max_requests_jitter,
            max_worker_rss,
            worker_timeout,
            log_format,
            access_log,
            blocking_threads,
            blocking_queue,
            blocking_abandoned_threads,
            max_slow_paths,
            listener_check_interval,
            orphan_grace,
            canary
        );
        // Its default follows `workers`: named only when it changed by itself.
        if new.max_draining_workers != self.max_draining_workers && new.workers == self.workers {
            changed.push("max_draining_workers");
        }
        changed
    }

    /// Checks `text` as if read from `file` (absolute). Each key is read through its
    /// definition in [`keys::KEYS`] (type, default, range, error); what is left here is how keys
    /// combine.
    #[cfg(test)]
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut all = Config::parse_all(file, text)?;
        Ok(all.swap_remove(0))
    }

    /// Every group of `text` (read as if from `file`), in the file's order; a file without
    /// `[[group]]` tables is one group, [`DEFAULT_GROUP`]. A group's key is its own, else the
    /// top of the file's, else the default.
    pub fn parse_all(file: &Path, text: &str) -> Result<Vec<Config>, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
        let groups = table.remove("group");
        let sections = group_sections(text);
        let top = keys::Reader::new(file, text, &table, &sections)?;
        let Some(groups) = groups else {
            let only = Config::parse_group(&top, DEFAULT_GROUP, false)?;
            if only.gateway.is_some() {
                return Err(top.invalid(
                    "gateway",
                    "a gateway is a [[group]] beside its `business` group: write both as [[group]] tables".into(),
                ));
            }
            return Ok(vec![only]);
        };
        let header = |i: usize| sections.get(i).map_or(0, |r| r.start + 1);
        let lines = |i: usize| sections.get(i).cloned().unwrap_or(0..0);
        let group_error = |line: usize, key: String, message: String| ConfigError::Invalid {
            path: file.to_path_buf(),
            line,
            key,
            message,
        };
        let items = match groups {
            toml::Value::Array(items) if !items.is_empty() => items,
            other => {
                return Err(group_error(
                    line_of_table(text, "group"),
                    "group".into(),
                    format!(
                        "must be one or more [[group]] tables (each with a `name`), not {}",
                        other.type_str()
                    ),
                ));
            }
        };
        let mut all: Vec<Config> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Some(group) = item.as_table() else {
                return Err(group_error(
                    header(i),
                    "group".into(),
                    format!("must be a [[group]] table, not {}", item.type_str()),
                ));
            };
            let name = match group.get("name") {
                Some(toml::Value::String(name)) if valid_group_name(name) => name.as_str(),
                Some(other) => {
                    return Err(group_error(
                        line_in(text, lines(i), "name"),
                        "name".into(),
                        format!(
                            "{other} is not a group name: 1 to {MAX_GROUP_NAME} letters, digits, `-` or `_`"
                        ),
                    ));
                }
                None => {
                    return Err(group_error(
                        header(i),
                        "group".into(),
                        "a [[group]] needs a `name`".into(),
                    ));
                }
            };
            let section = keys::Section {
                name,
                table: group,
                lines: lines(i),
            };
            let config = Config::parse_group(&top.for_group(section)?, name, true)?;
            let at = |key: &str| match line_in(text, lines(i), key) {
                0 => header(i),
                line => line,
            };
            if let Some(j) = all.iter().position(|g| g.group == name) {
                return Err(group_error(
                    at("name"),
                    format!("group {name:?}: name"),
                    format!(
                        "{name:?} is already the name of the group at line {}",
                        header(j)
                    ),
                ));
            }
            let clash = all.iter().position(|g| {
                let (a, b) = (g.listen, config.listen);
                a.port() != 0
                    && a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            });
            if let Some(j) = clash {
                return Err(group_error(
                    at("listen"),
                    format!("group {name:?}: listen"),
                    format!(
                        "{} is already the address of group {:?} (line {}): each group listens on its own",
                        config.listen,
                        all[j].group,
                        header(j)
                    ),
                ));
            }
            all.push(config);
        }
        for (i, g) in all.iter().enumerate() {
            let Some(gw) = &g.gateway else { continue };
            let business = all.iter().find(|b| b.group == gw.business);
            let problem = match business {
                None => Some(format!(
                    "{:?} is not the name of a group in this file",
                    gw.business
                )),
                Some(b) if b.gateway.is_some() => Some(format!(
                    "{:?} is a gateway group: `business` names a plugin group",
                    gw.business
                )),
                // A business worker publishes through any one of its gateways: they must all
                // reach the same cluster.
                Some(_) => all[..i]
                    .iter()
                    .filter_map(|o| o.gateway.as_ref())
                    .find(|o| o.business == gw.business && o.cluster != gw.cluster)
                    .map(|_| {
                        format!(
                            "the gateway groups of {:?} must have the same `cluster`",
                            gw.business
                        )
                    }),
            };
            if let Some(message) = problem {
                let line = match line_in(text, lines(i), "business") {
                    0 => header(i),
                    line => line,
                };
                return Err(group_error(
                    line,
                    format!("group {:?}: business", g.group),
                    message,
                ));
            }
        }
        for i in 0..all.len() {
            let Some(upgrade) = all[i].gateway.as_ref().and_then(|gw| gw.upgrade.clone()) else {
                continue;
            };
            let at = |key: &str| match line_in(text, lines(i), key) {
                0 => header(i),
                line => line,
            };
            let from = all.iter().position(|g| g.group == upgrade.group);
            let problem = match from.map(|f| &all[f]) {
                None => Some(format!(
                    "{:?} is not the name of a group in this file",
                    upgrade.group
                )),
                Some(g) if g.gateway.is_some() => Some(format!(
                    "{:?} is a gateway group: `upgrade_from` names a plugin group, whose listener serves HTTP",
                    upgrade.group
                )),
                Some(g) if g.gateway_handoffs.iter().any(|h| h.path == upgrade.path) => {
                    Some(format!(
                        "{:?} already passes {:?} to another gateway group",
                        upgrade.group, upgrade.path
                    ))
                }
                Some(_) => None,
            };
            if let Some(message) = problem {
                return Err(group_error(
                    at("upgrade_from"),
                    format!("group {:?}: upgrade_from", all[i].group),
                    message,
                ));
            }
            let sockets = (0..all[i].workers as u32)
                .map(|slot| all[i].gateway_handoff_socket(slot))
                .collect();
            if let Some(f) = from {
                all[f]
                    .gateway_handoffs
                    .push(crate::protocol::GatewayHandoff {
                        path: upgrade.path,
                        sockets,
                    });
            }
        }
        for i in 0..all.len() {
            let Some(business) = all[i].gateway.as_ref().map(|gw| gw.business.clone()) else {
                continue;
            };
            let links: Vec<PathBuf> = (0..all[i].workers as u32)
                .map(|slot| all[i].gateway_link_socket(slot))
                .collect();
            let Some(b) = all.iter().position(|b| b.group == business) else {
                continue;
            };
            let base = all[b].gateway_links.len() as u32;
            all[b].gateway_links.extend(links);
            if let Some(gw) = all[i].gateway.as_mut() {
                gw.link_base = base;
            }
        }
        Ok(all)
    }

    /// One group's config, read through `keys` (the top of the file, or one `[[group]]`).
    fn parse_group(
        keys: &keys::Reader,
        group: &str,
        explicit_group: bool,
    ) -> Result<Config, ConfigError> {
        let (file, text) = (keys.file, keys.text);
        let base = file.parent().unwrap_or(Path::new("/"));
        let resolve = |p: &str| -> PathBuf {
            if Path::new(p).is_absolute() {
                p.into()
            } else {
                base.join(p)
            }
        };
        // A path that must be set to something (`plugin`, `state_dir`).
        let required_path = |key: &str| -> Result<PathBuf, ConfigError> {
            match keys.typed::<String>(key)?.as_deref() {
                Some("") | None => Err(keys.invalid(key, "must not be empty".into())),
                Some(p) => Ok(resolve(p)),
            }
        };

        // A same-port gateway (`upgrade_from`) takes its clients from another group's listener:
        // its own is loopback on a port of the kernel's choosing unless its table sets one (the
        // top of the file's `listen` is the HTTP group's).
        let own_listen = keys
            .group
            .as_ref()
            .is_some_and(|g| g.table.contains_key("listen"));
        let listen_str = match keys.typed::<String>("upgrade_from")? {
            Some(_) if !own_listen => "127.0.0.1:0".to_string(),
            _ => keys.typed::<String>("listen")?.unwrap_or_default(),
        };
        let listen = listen_str
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                keys.invalid(
                    "listen",
                    format!("{listen_str:?} is not an address like \"127.0.0.1:8080\""),
                )
            })?;

        let admin_listen = match keys.typed::<String>("admin_listen")?.as_deref() {
            None => None,
            Some(text) => {
                let admin = text
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        keys.invalid(
                            "admin_listen",
                            format!("{text:?} is not an address like \"127.0.0.1:9100\""),
                        )
                    })?;
                // Port 0 twice is two ports the kernel picks; an unspecified address (0.0.0.0)
                // covers every address of its port.
                let clash = admin.port() != 0
                    && admin.port() == listen.port()
                    && (admin.ip() == listen.ip()
                        || admin.ip().is_unspecified()
                        || listen.ip().is_unspecified());
                if clash {
                    return Err(keys.invalid(
                        "admin_listen",
                        format!(
                            "{text:?} is the public `listen` address ({listen}): the admin listener is never the public one"
                        ),
                    ));
                }
                Some(admin)
            }
        };

        let workers = match keys.count("workers")? {
            None => std::thread::available_parallelism()
                .map(|n| n.get().min(1024))
                .unwrap_or(1),
            Some(n) => n as usize,
        };
        let plugin = required_path("plugin")?;
        let state_dir = required_path("state_dir")?;
        let max_draining_workers = match keys.count("max_draining_workers")? {
            None => 4 * workers,
            Some(n) => n as usize,
        };
        let build = match keys.typed::<String>("build")?.as_deref().map(str::trim) {
            Some("") => return Err(keys.invalid("build", "must not be empty".into())),
            b => b.map(str::to_string),
        };
        let watch_paths: Vec<PathBuf> = keys
            .typed::<Vec<String>>("watch_paths")?
            .unwrap_or_default()
            .iter()
            .map(|p| resolve(p))
            .collect();
        let plugin_config = match keys.table_value("plugin_config") {
            None => PluginConfig::default(),
            Some(value) => plugin_config(value.clone()).map_err(|(key, message)| {
                let lines = keys.group.as_ref().map(|g| g.lines.clone());
                match lines.filter(|_| {
                    keys.group
                        .as_ref()
                        .is_some_and(|g| g.table.contains_key("plugin_config"))
                }) {
                    Some(lines) => ConfigError::Invalid {
                        path: file.to_path_buf(),
                        line: line_in_table(text, lines, "group.plugin_config"),
                        key: format!("group {group:?}: {key}"),
                        message,
                    },
                    None => ConfigError::Invalid {
                        path: file.to_path_buf(),
                        line: line_of_table(text, "plugin_config"),
                        key,
                        message,
                    },
                }
            })?,
        };
        // Off by default; an empty string is off too (a way to turn it off in a file that set it).
        let access_log = match keys.typed::<String>("access_log")?.as_deref() {
            None | Some("") => None,
            Some(p) => Some(resolve(p)),
        };
        let log_format = match keys.typed::<String>("log_format")?.as_deref() {
            None => LogFormat::default(),
            Some(name) => LogFormat::from_name(name).ok_or_else(|| {
                keys.invalid(
                    "log_format",
                    format!("{name:?} is not a log format (\"text\" or \"json\")"),
                )
            })?,
        };
        let canary = CanaryConfig {
            workers: keys.usize("canary_workers")?,
            analysis: keys.duration("canary_analysis")?,
            watch: keys.duration("canary_watch")?,
            min_requests: keys.usize("canary_min_requests")? as u64,
            max_error_increase: keys.fraction("canary_max_error_increase")?,
            max_latency_ratio: keys.fraction("canary_max_latency_ratio")?,
            in_watch_mode: keys.boolean("watch_canary")?,
        };
        let gateway = match keys.boolean("gateway")? {
            false => {
                for key in ["upgrade_from", "upgrade_path"] {
                    if keys.typed::<String>(key)?.is_some() {
                        return Err(keys
                            .invalid(key, "is a gateway's key: it needs `gateway = true`".into()));
                    }
                }
                None
            }
            true => {
                let business = keys.typed::<String>("business")?.unwrap_or_default();
                if business.is_empty() {
                    return Err(keys.invalid(
                        "gateway",
                        "needs `business`: the name of the plugin group that handles its clients' events".into(),
                    ));
                }
                let upgrade = match keys.typed::<String>("upgrade_from")? {
                    None => None,
                    Some(group) => {
                        let Some(path) = keys.typed::<String>("upgrade_path")? else {
                            return Err(keys.invalid(
                                "upgrade_from",
                                "needs `upgrade_path`: the path whose requests go to the gateway, e.g. \"/chat\"".into(),
                            ));
                        };
                        if let Err(why) = check_upgrade_path(&path) {
                            return Err(keys.invalid("upgrade_path", why));
                        }
                        Some(UpgradeFrom { group, path })
                    }
                };
                Some(GatewayConfig {
                    business,
                    upgrade,
                    max_clients: keys.count("gateway_max_clients")?.unwrap_or(1) as u64,
                    max_message: keys.size("gateway_max_message")?.unwrap_or_default(),
                    send_queue: keys.size("gateway_send_queue")?.unwrap_or_default(),
                    ping_interval: keys.duration("gateway_ping_interval")?,
                    ping_timeout: keys.duration("gateway_ping_timeout")?,
                    hold: keys.duration("gateway_hold")?,
                    cluster: cluster_url(keys)?,
                    link_base: 0,
                })
            }
        };
        if build.is_some() && watch_paths.is_empty() {
            return Err(keys.invalid(
                "build",
                "needs `watch_paths`: the source directories whose changes run it".into(),
            ));
        }
        Ok(Config {
            file: file.to_path_buf(),
            group: group.to_string(),
            explicit_group,
            // A gateway holds the clients through every business reload: only `restart` and
            // `upgrade` replace it.
            reloadable: keys.boolean("reloadable")? && gateway.is_none(),
            listen,
            admin_listen,
            workers,
            plugin,
            state_dir,
            graceful_timeout: keys.duration("graceful_timeout")?,
            start_timeout: keys.duration("start_timeout")?,
            idle_grace: keys.duration("idle_grace")?,
            max_body_bytes: keys.usize("max_body_bytes")?,
            body_read_timeout: keys.duration("body_read_timeout")?,
            backlog: keys.usize("backlog")? as i32,
            keep_snapshots: keys.usize("keep_snapshots")?,
            max_draining_workers,
            allow_writable_plugin: keys.boolean("allow_writable_plugin")?,
            accept_balance: keys.boolean("accept_balance")?,
            max_plugin_bytes: keys.size("max_plugin_bytes")?.unwrap_or_default(),
            header_read_timeout: keys.duration("header_read_timeout")?,
            keepalive_timeout: keys.duration("keepalive_timeout")?,
            send_timeout: keys.duration("send_timeout")?,
            max_connections: keys
                .count("max_connections")?
                .filter(|n| *n > 0)
                .map(|n| n as u64),
            http2_max_streams: keys.usize("http2_max_streams")? as u32,
            http2_send_buffer: keys.size("http2_send_buffer")?.unwrap_or_default() as usize,
            max_headers: keys.usize("max_headers")?,
            max_header_bytes: keys.usize("max_header_bytes")?,
            watch: (keys.boolean("watch")? || build.is_some()) && gateway.is_none(),
            watch_debounce: keys.duration("watch_debounce")?,
            build,
            build_dir: base.to_path_buf(),
            watch_paths,
            max_requests: keys.usize("max_requests")? as u64,
            max_requests_jitter: keys.usize("max_requests_jitter")? as u64,
            max_worker_rss: keys.size("max_worker_rss")?.filter(|n| *n > 0),
            worker_timeout: keys.duration("worker_timeout")?,
            plugin_config,
            log_format,
            access_log,
            blocking_threads: keys.usize("blocking_threads")?,
            blocking_queue: keys.usize("blocking_queue")?,
            blocking_abandoned_threads: keys.usize("blocking_abandoned_threads")?,
            max_slow_paths: keys.usize("max_slow_paths")?,
            overridden: Vec::new(),
            listener_check_interval: keys.duration("listener_check_interval")?,
            orphan_grace: keys.duration("orphan_grace")?,
            canary,
            gateway,
            gateway_links: Vec::new(),
            gateway_handoffs: Vec::new(),
            gateway_event_timeout: keys.duration("gateway_event_timeout")?,
        })
    }

    /// How often a ready worker sends its heartbeat: four beats per `worker_timeout`, at
    /// least one a second.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.worker_timeout / 4).min(Duration::from_secs(1))
    }

    /// The blocking pool's bounds, as workers receive them.
    pub fn blocking_pool(&self) -> crate::protocol::PoolSpec {
        crate::protocol::PoolSpec {
            max_threads: self.blocking_threads as u32,
            max_queue: self.blocking_queue as u32,
            max_abandoned: self.blocking_abandoned_threads as u32,
            max_slow_paths: self.max_slow_paths as u32,
        }
    }

    /// The spec a worker of this config starts with: every bound from the config, the rest
    /// from `worker` (the one place a [`WorkerSpec`](crate::protocol::WorkerSpec) is built;
    /// `host check` then turns off what a check does not use).
    pub fn worker_spec(&self, worker: WorkerStart) -> crate::protocol::WorkerSpec {
        crate::protocol::WorkerSpec {
            slot: worker.slot,
            generation: worker.generation,
            plugin: worker.plugin,
            plugin_sha256: worker.plugin_sha256,
            graceful_timeout_ms: self.graceful_timeout.as_millis() as u64,
            idle_grace_ms: self.idle_grace.as_millis() as u64,
            max_body_bytes: self.max_body_bytes,
            body_read_timeout_ms: self.body_read_timeout.as_millis() as u64,
            table_cell: worker.table_cell,
            table_cells: worker.table_cells,
            accept_balance: self.accept_balance,
            header_read_timeout_ms: self.header_read_timeout.as_millis() as u64,
            max_headers: self.max_headers,
            max_header_bytes: self.max_header_bytes,
            max_requests: worker.max_requests,
            max_requests_jitter: worker.max_requests_jitter,
            heartbeat_ms: self.heartbeat_interval().as_millis() as u64,
            keepalive_timeout_ms: self.keepalive_timeout.as_millis() as u64,
            send_timeout_ms: self.send_timeout.as_millis() as u64,
            max_connections: self.max_connections.unwrap_or(0),
            http2_max_streams: self.http2_max_streams,
            http2_send_buffer: self.http2_send_buffer,
            plugin_config: worker.plugin_config.json.to_string(),
            config_dir: self.config_dir().to_string_lossy().into_owned(),
            pool: self.blocking_pool(),
            access_log: self.access_log.clone(),
            gateway_links: self.gateway_links.clone(),
            gateway_handoffs: self.gateway_handoffs.clone(),
            gateway_event_timeout_ms: self.gateway_event_timeout.as_millis() as u64,
            gateway: self.gateway.as_ref().map(|g| crate::protocol::GatewaySpec {
                link_socket: self.gateway_link_socket(worker.slot),
                handoff_socket: Some(self.gateway_handoff_socket(worker.slot)),
                link_index: g.link_base + worker.slot,
                max_clients: g.max_clients,
                max_message: g.max_message as usize,
                send_queue: g.send_queue as usize,
                ping_interval_ms: g.ping_interval.as_millis() as u64,
                ping_timeout_ms: g.ping_timeout.as_millis() as u64,
                hold_ms: g.hold.as_millis() as u64,
                cluster: g.cluster.clone(),
                business: g.business.clone(),
            }),
        }
    }

    /// Where gateway process `slot` of this group takes its business workers' links:
    /// `state_dir/gateway/<group>-<slot>.sock`.
    pub fn gateway_link_socket(&self, slot: u32) -> PathBuf {
        self.state_dir
            .join("gateway")
            .join(format!("{}-{slot}.sock", self.group))
    }

    /// Where gateway process `slot` of a gateway group takes the connections passed to it
    /// (a same-port group's from plugin workers, established clients from its predecessor at
    /// `host upgrade`): `state_dir/gateway/<group>-<slot>.handoff`.
    pub fn gateway_handoff_socket(&self, slot: u32) -> PathBuf {
        self.state_dir
            .join("gateway")
            .join(format!("{}-{slot}.handoff", self.group))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("host.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.state_dir.join("host.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("host.log")
    }

    /// Where this group's generations are snapshotted: `plugins/` in `state_dir` for a file
    /// without groups (as before groups), `groups/<name>/plugins/` for a `[[group]]`.
    pub fn snapshot_dir(&self) -> PathBuf {
        match self.explicit_group {
            false => self.state_dir.join("plugins"),
            true => self
                .state_dir
                .join("groups")
                .join(&self.group)
                .join("plugins"),
        }
    }
}

/// The 1-based line where `key = ...` is set, or 0 when the key is absent (a default was bad).
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

/// `find` (a 1-based line finder, 0: absent) run on `lines` (0-based) of `text`, its answer
/// as a line of `text`.
fn within(text: &str, lines: std::ops::Range<usize>, find: impl Fn(&str) -> usize) -> usize {
    let section: String = text
        .lines()
        .skip(lines.start)
        .take(lines.len())
        .collect::<Vec<_>>()
        .join("\n");
    match find(&section) {
        0 => 0,
        n => n + lines.start,
    }
}

/// The 1-based line in `lines` (0-based, of `text`) where `key = ...` is set; 0 when absent.
fn line_in(text: &str, lines: std::ops::Range<usize>, key: &str) -> usize {
    within(text, lines, |section| line_of_key(section, key))
}

/// The 1-based line in `lines` of the `[key]` header (`key` dotted, like `group.plugin_config`).
fn line_in_table(text: &str, lines: std::ops::Range<usize>, key: &str) -> usize {
    match within(text, lines.clone(), |section| line_of_table(section, key)) {
        0 => line_in(text, lines, key.rsplit('.').next().unwrap_or(key)),
        n => n,
    }
}

/// The 0-based line ranges of each `[[group]]` table: from its header to the next `[[group]]`,
/// or to the next table of the top of the file (a header not under `group.`).
fn group_sections(text: &str) -> Vec<std::ops::Range<usize>> {
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut sections = Vec::new();
    let mut open: Option<usize> = None;
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = header(l) else { continue };
        let new_group = l.trim().starts_with("[[") && name == "group";
        if new_group || !name.starts_with("group.") {
            if let Some(start) = open.take() {
                sections.push(start..i);
            }
        }
        if new_group {
            open = Some(i);
        }
    }
    if let Some(start) = open {
        sections.push(start..lines.len());
    }
    sections
}

/// The `cluster` key: a `redis://` URL (at most 1024 bytes), or none.
fn cluster_url(keys: &keys::Reader) -> Result<Option<String>, ConfigError> {
    let Some(url) = keys.typed::<String>("cluster")? else {
        return Ok(None);
    };
    let ok = url.len() <= 1024
        && url
            .strip_prefix("redis://")
            .is_some_and(|rest| !rest.is_empty())
        && !url.chars().any(char::is_whitespace);
    if !ok {
        return Err(keys.invalid(
            "cluster",
            format!("{url:?} is not a Redis URL (\"redis://HOST:PORT\")"),
        ));
    }
    Ok(Some(url))
}

/// A group name names a directory and a metrics label: short, plain characters.
fn valid_group_name(name: &str) -> bool {
    (1..=MAX_GROUP_NAME).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The 1-based line of the `[key]` header (or of `[key.sub]`, or `key = ...`); 0 when absent.
fn line_of_table(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix('[')
                .map(str::trim_start)
                .and_then(|rest| rest.strip_prefix(key))
                .is_some_and(|rest| {
                    let rest = rest.trim_start();
                    rest.starts_with(']') || rest.starts_with('.')
                })
        })
        .map_or_else(|| line_of_key(text, key), |i| i + 1)
}

/// Checks a `[plugin_config]` value and turns it into JSON text; on error, the key (a dotted
/// path into the table) and what is wrong.
fn plugin_config(value: toml::Value) -> Result<PluginConfig, (String, String)> {
    let key = "plugin_config".to_string();
    if !value.is_table() {
        let message = format!(
            "must be a table (`[plugin_config]` or `plugin_config = {{ ... }}`), not {}",
            value.type_str()
        );
        return Err((key, message));
    }
    let json = toml_to_json(value, &key, 0)?;
    let text = serde_json::to_string(&json).map_err(|e| (key.clone(), e.to_string()))?;
    if text.len() > MAX_PLUGIN_CONFIG_BYTES {
        return Err((
            key,
            format!(
                "is {} bytes as JSON, over the limit of {MAX_PLUGIN_CONFIG_BYTES} bytes",
                text.len()
            ),
        ));
    }
    Ok(PluginConfig::from_json(text))
}

/// TOML to JSON: a datetime becomes its TOML text (a string); a float JSON cannot hold (`nan`,
/// `inf`) is refused, naming its `key`.
fn toml_to_json(
    value: toml::Value,
    key: &str,
    depth: usize,
) -> Result<serde_json::Value, (String, String)> {
    use serde_json::Value as Json;
    if depth > MAX_PLUGIN_CONFIG_DEPTH {
        let message = format!("nested deeper than {MAX_PLUGIN_CONFIG_DEPTH} levels");
        return Err((key.to_string(), message));
    }
    Ok(match value {
        toml::Value::String(s) => Json::String(s),
        toml::Value::Integer(n) => Json::from(n),
        toml::Value::Float(f) => match serde_json::Number::from_f64(f) {
            Some(n) => Json::Number(n),
            None => {
                let message = format!("{f} cannot be passed to the plugin (JSON has no {f})");
                return Err((key.to_string(), message));
            }
        },
        toml::Value::Boolean(b) => Json::Bool(b),
        toml::Value::Datetime(d) => Json::String(d.to_string()),
        toml::Value::Array(items) => Json::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| toml_to_json(v, &format!("{key}[{i}]"), depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Json::Object(
            table
                .into_iter()
                .map(|(k, v)| {
                    let json = toml_to_json(v, &format!("{key}.{k}"), depth + 1)?;
                    Ok::<_, (String, String)>((k, json))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Turns toml's multi-line report into one line that names the key where it can.
fn syntax_error(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let src = text.lines().nth(line - 1).unwrap_or("");
            match src.split_once('=') {
                Some((key, _)) if !key.trim().is_empty() && !key.trim().starts_with('[') => {
                    ConfigError::Invalid {
                        path: file.to_path_buf(),
                        line,
                        key: key.trim().to_string(),
                        message,
                    }
                }
                _ => ConfigError::Syntax {
                    path: file.to_path_buf(),
                    message: format!("line {line}: {message}"),
                },
            }
        }
        None => ConfigError::Syntax {
            path: file.to_path_buf(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_note_points_to_upgrade_and_listen_to_restart() {
        assert_eq!(
            Config::frozen_keys_note(&["workers", "graceful_timeout"]),
            "a reload applies only [plugin_config]; changed keys workers, graceful_timeout take effect at `host upgrade`"
        );
        let both = Config::frozen_keys_note(&["listen", "workers"]);
        assert!(
            both.contains("workers take effect at `host upgrade`")
                && both.ends_with(
                    "listen takes effect at `host restart` (an upgrade keeps the socket)"
                ),
            "{both}"
        );
        assert!(!Config::frozen_keys_note(&["listen"]).contains("upgrade`"));
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/srv/app/host.toml"), text)
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse("workers = 3\nplugin = \"lib/p.so\"\n").unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.plugin, Path::new("/srv/app/lib/p.so"));
        assert_eq!(c.state_dir, Path::new("/srv/app/.host"));
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.graceful_timeout, Duration::from_secs(30));
        assert_eq!(c.start_timeout, Duration::from_secs(10));
    }

    #[test]
    fn durations_parse() {
        let c = parse("graceful_timeout = \"250ms\"\nstart_timeout = \"2s\"\n").unwrap();
        assert_eq!(c.graceful_timeout, Duration::from_millis(250));
        assert_eq!(c.start_timeout, Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_key_and_line_in_one_line() {
        for (text, key, line) in [
            ("workers = 0\n", "workers", 1),
            ("\nworkers = \"two\"\n", "workers", 2),
            ("start_timeout = \"soon\"\n", "start_timeout", 1),
            ("listen = \"nowhere\"\n", "listen", 1),
            ("plugin = \"\"\n", "plugin", 1),
            ("graceful_timeout = \"0s\"\n", "graceful_timeout", 1),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(&format!(":{line}: {key}:")),
                "{text:?} gave {err}"
            );
            assert!(!err.contains('\n'), "multi-line error: {err}");
        }
    }

    #[test]
    fn recycling_is_off_by_default_and_takes_counts_and_sizes() {
        let c = parse("").unwrap();
        assert_eq!((c.max_requests, c.max_requests_jitter), (0, 0));
        assert_eq!(c.max_worker_rss, None);
        let c = parse("max_requests = 500\nmax_requests_jitter = 50\nmax_worker_rss = \"64MiB\"\n")
            .unwrap();
        assert_eq!((c.max_requests, c.max_requests_jitter), (500, 50));
        assert_eq!(c.max_worker_rss, Some(64 << 20));
        assert_eq!(
            parse("max_worker_rss = 1000\n").unwrap().max_worker_rss,
            Some(1000)
        );
        assert_eq!(parse("max_worker_rss = 0\n").unwrap().max_worker_rss, None);
        for (text, key) in [
            ("max_requests = -1\n", "max_requests"),
            (
                "max_requests_jitter = 9999999999999999\n",
                "max_requests_jitter",
            ),
            ("max_worker_rss = \"64MB\"\n", "max_worker_rss"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(&format!(":1: {key}:")), "{text:?} gave {err}");
        }
    }

    #[test]
    fn max_plugin_bytes_takes_a_number_or_a_size_with_a_unit() {
        assert_eq!(parse("").unwrap().max_plugin_bytes, 512 << 20);
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("\"1MiB\"", 1 << 20),
            ("\"512 MiB\"", 512 << 20),
            ("\"2GiB\"", 2 << 30),
            ("\"64KiB\"", 64 << 10),
            ("\"100B\"", 100),
        ] {
            let c = parse(&format!("max_plugin_bytes = {text}\n")).unwrap();
            assert_eq!(c.max_plugin_bytes, bytes, "{text}");
        }
        for text in ["0", "-1", "\"lots\"", "\"5MB\"", "\"MiB\""] {
            let err = parse(&format!("max_plugin_bytes = {text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(":1: max_plugin_bytes:"), "{text}: {err}");
        }
    }

    #[test]
    fn worker_timeout_defaults_to_30s_and_is_bounded() {
        let c = parse("").unwrap();
        assert_eq!(c.worker_timeout, Duration::from_secs(30));
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(1));
        let c = parse("worker_timeout = \"2s\"\n").unwrap();
        assert_eq!(c.heartbeat_interval(), Duration::from_millis(500));
        for value in ["99ms", "1ms", "2h", "0s", "soon"] {
            let err = parse(&format!("worker_timeout = \"{value}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(":1: worker_timeout: "), "{value}: {err}");
        }
        let err = parse("worker_timeout = \"99ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range 100ms..=1h"), "{err}");
    }

    #[test]
    fn plugin_config_is_any_table_passed_as_json() {
        let empty = parse("").unwrap().plugin_config;
        assert_eq!(&*empty.json, "{}");
        assert_eq!(empty, PluginConfig::default());
        assert_eq!(empty.sha256.len(), 64);
        let c = parse(concat!(
            "workers = 2\n",
            "[plugin_config]\n",
            "message = \"one\"\n",
            "limit = 3\n",
            "ratio = 0.5\n",
            "when = 1979-05-27T07:32:00Z\n",
            "list = [1, \"two\", true]\n",
            "[plugin_config.db]\n",
            "url = \"postgres://x\"\n",
        ))
        .unwrap();
        assert_eq!(c.workers, 2);
        let json: serde_json::Value = serde_json::from_str(&c.plugin_config.json).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "message": "one", "limit": 3, "ratio": 0.5, "when": "1979-05-27T07:32:00Z",
                "list": [1, "two", true], "db": { "url": "postgres://x" }
            })
        );
        let inline = parse("plugin_config = { message = \"one\" }\n").unwrap();
        assert_eq!(&*inline.plugin_config.json, r#"{"message":"one"}"#);
        assert_ne!(inline.plugin_config.sha256, empty.sha256);
        // The same table written another way is the same configuration.
        let table = parse("[plugin_config]\nmessage = \"one\"\n").unwrap();
        assert_eq!(table.plugin_config, inline.plugin_config);
    }

    #[test]
    fn a_bad_plugin_config_is_one_line_naming_the_line_and_key() {
        let big = format!(
            "\n[plugin_config]\nblob = \"{}\"\n",
            "x".repeat(MAX_PLUGIN_CONFIG_BYTES)
        );
        let deep = format!(
            "[plugin_config]\ndeep = {}{}\n",
            "[".repeat(MAX_PLUGIN_CONFIG_DEPTH + 1),
            "]".repeat(MAX_PLUGIN_CONFIG_DEPTH + 1)
        );
        for (text, expected) in [
            ("plugin_config = 5\n", ":1: plugin_config: must be a table"),
            (
                "workers = 2\n[plugin_config]\nx = nan\n",
                ":2: plugin_config.x: NaN cannot be passed",
            ),
            (
                "[plugin_config.a]\nb = [1.0, inf]\n",
                ":1: plugin_config.a.b[1]: inf cannot",
            ),
            (
                big.as_str(),
                ":2: plugin_config: is 262155 bytes as JSON, over",
            ),
            (deep.as_str(), ":1: plugin_config.deep"),
            // Not TOML at all: toml's own message, on one line.
            ("[plugin_config]\nmessage = \"two\n", ":2: message: "),
            ("[plugin_config\nmessage = 1\n", "line 1: "),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.starts_with("/srv/app/host.toml") && err.contains(expected),
                "{:?} gave {err}, expected {expected}",
                &text[..text.len().min(80)]
            );
            assert!(!err.contains('\n'), "multi-line error: {err}");
        }
    }

    #[test]
    fn a_reread_names_the_other_keys_that_changed() {
        let old = parse("listen = \"127.0.0.1:0\"\nworkers = 2\n").unwrap();
        let mut running = old.clone();
        running.listen = "127.0.0.1:41000".parse().unwrap();
        let same =
            parse("listen = \"127.0.0.1:0\"\nworkers = 2\n[plugin_config]\na = 1\n").unwrap();
        assert!(running.frozen_keys_changed(&same).is_empty());
        let other = parse("listen = \"127.0.0.2:0\"\nworkers = 3\nidle_grace = \"2s\"\n").unwrap();
        assert_eq!(
            running.frozen_keys_changed(&other),
            ["listen", "workers", "idle_grace"]
        );
    }

    #[test]
    fn keys_set_on_the_command_line_are_not_changed_keys() {
        let file = parse("workers = 2\n").unwrap();
        let mut running = file.clone();
        running.build = Some("make".into());
        running.watch = true;
        assert_eq!(running.frozen_keys_changed(&file), ["watch", "build"]);
        running.overridden = vec!["build", "watch"];
        assert!(running.frozen_keys_changed(&file).is_empty());
    }

    #[test]
    fn connection_bounds_have_defaults_and_one_line_errors() {
        let c = parse("").unwrap();
        assert_eq!(c.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(c.send_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, None);
        assert_eq!(c.http2_max_streams, 128);
        assert_eq!(c.http2_send_buffer, 32 << 10);
        let c = parse(
            "keepalive_timeout = \"5s\"\nsend_timeout = \"2s\"\nmax_connections = 100\nhttp2_max_streams = 10\nhttp2_send_buffer = \"64KiB\"\n",
        )
        .unwrap();
        assert_eq!(c.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(c.send_timeout, Duration::from_secs(2));
        assert_eq!(c.max_connections, Some(100));
        assert_eq!(c.http2_max_streams, 10);
        assert_eq!(c.http2_send_buffer, 64 << 10);
        assert_eq!(
            parse("max_connections = 0\n").unwrap().max_connections,
            None
        );
        for (text, key) in [
            ("\nkeepalive_timeout = \"0s\"\n", "keepalive_timeout"),
            ("\nsend_timeout = \"forever\"\n", "send_timeout"),
            ("\nmax_connections = -1\n", "max_connections"),
            ("\nhttp2_max_streams = 0\n", "http2_max_streams"),
            ("\nhttp2_send_buffer = 100\n", "http2_send_buffer"),
            ("\nhttp2_send_buffer = \"1TiB\"\n", "http2_send_buffer"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("/srv/app/host.toml:2: {key}: ")) && !err.contains('\n'),
                "{text:?} gave {err}"
            );
        }
    }

    #[test]
    fn log_format_is_text_or_json() {
        assert_eq!(parse("").unwrap().log_format, LogFormat::Text);
        assert_eq!(
            parse("log_format = \"json\"\n").unwrap().log_format,
            LogFormat::Json
        );
        let err = parse("\nlog_format = \"yaml\"\n").unwrap_err().to_string();
        assert!(
            err.starts_with("/srv/app/host.toml:2: log_format: ") && err.contains("\"json\""),
            "{err}"
        );
    }

    #[test]
    fn access_log_is_off_by_default_and_resolves_against_the_config_file() {
        assert_eq!(parse("").unwrap().access_log, None);
        assert_eq!(parse("access_log = \"\"\n").unwrap().access_log, None);
        assert_eq!(
            parse("access_log = \"logs/access.log\"\n")
                .unwrap()
                .access_log,
            Some(PathBuf::from("/srv/app/logs/access.log"))
        );
        assert_eq!(
            parse("access_log = \"/var/log/a.log\"\n")
                .unwrap()
                .access_log,
            Some(PathBuf::from("/var/log/a.log"))
        );
        let err = parse("\naccess_log = 3\n").unwrap_err().to_string();
        assert!(err.starts_with("/srv/app/host.toml:2"), "{err}");
    }

    #[test]
    fn admin_listen_is_off_by_default_and_never_the_public_listener() {
        assert_eq!(parse("").unwrap().admin_listen, None);
        let c = parse("admin_listen = \"127.0.0.1:9100\"\n").unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9100".parse().unwrap()));
        // Both on port 0: two ports the kernel picks.
        let c = parse("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(c.admin_listen.map(|a| a.port()), Some(0));
        for text in [
            "admin_listen = \"127.0.0.1:8080\"\n",
            "listen = \"0.0.0.0:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:9000\"\nadmin_listen = \"0.0.0.0:9000\"\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(": admin_listen: ")
                    && err.contains("the admin listener is never the public one"),
                "{text:?} gave {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
        let err = parse("\nadmin_listen = \"metrics\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2: admin_listen: "), "{err}");
        // A reload compares it like `listen`: port 0 matches the port the kernel picked.
        let mut running = parse("admin_listen = \"127.0.0.1:0\"\n").unwrap();
        running.admin_listen = Some("127.0.0.1:41001".parse().unwrap());
        let same = parse("admin_listen = \"127.0.0.1:0\"\n").unwrap();
        assert!(running.frozen_keys_changed(&same).is_empty());
        assert_eq!(
            running.frozen_keys_changed(&parse("").unwrap()),
            ["admin_listen"]
        );
    }

    fn groups(text: &str) -> Result<Vec<Config>, ConfigError> {
        Config::parse_all(Path::new("/srv/app/host.toml"), text)
    }

    #[test]
    fn a_file_without_groups_is_one_group_named_default() {
        let all = groups("workers = 3\n").unwrap();
        assert_eq!(all.len(), 1);
        let c = &all[0];
        assert_eq!(
            (c.group.as_str(), c.explicit_group, c.reloadable),
            ("default", false, true)
        );
        assert_eq!(c.snapshot_dir(), Path::new("/srv/app/.host/plugins"));
    }

    #[test]
    fn groups_inherit_the_top_of_the_file_and_set_their_own() {
        let all = groups(concat!(
            "workers = 3\n",
            "graceful_timeout = \"5s\"\n",
            "state_dir = \"run\"\n",
            "[plugin_config]\n",
            "message = \"shared\"\n",
            "[[group]]\n",
            "name = \"api\"\n",
            "listen = \"127.0.0.1:8080\"\n",
            "[[group]]\n",
            "name = \"gateway\"\n",
            "listen = \"127.0.0.1:8081\"\n",
            "workers = 1\n",
            "reloadable = false\n",
            "plugin = \"gw.so\"\n",
            "[group.plugin_config]\n",
            "message = \"own\"\n",
        ))
        .unwrap();
        let (api, gw) = (&all[0], &all[1]);
        assert_eq!((api.group.as_str(), gw.group.as_str()), ("api", "gateway"));
        assert_eq!((api.workers, gw.workers), (3, 1));
        assert_eq!((api.reloadable, gw.reloadable), (true, false));
        assert_eq!(gw.graceful_timeout, Duration::from_secs(5));
        assert_eq!(gw.plugin, Path::new("/srv/app/gw.so"));
        assert_eq!(&*api.plugin_config.json, r#"{"message":"shared"}"#);
        assert_eq!(&*gw.plugin_config.json, r#"{"message":"own"}"#);
        assert_eq!(
            gw.snapshot_dir(),
            Path::new("/srv/app/run/groups/gateway/plugins")
        );
    }

    #[test]
    fn two_gateway_groups_of_one_business_group_number_their_links_one_after_the_other() {
        let all = groups(concat!(
            "[[group]]\n",
            "name = \"app\"\n",
            "listen = \"127.0.0.1:8080\"\n",
            "[[group]]\n",
            "name = \"a\"\n",
            "listen = \"127.0.0.1:8081\"\n",
            "gateway = true\n",
            "business = \"app\"\n",
            "workers = 2\n",
            "[[group]]\n",
            "name = \"b\"\n",
            "listen = \"127.0.0.1:8082\"\n",
            "gateway = true\n",
            "business = \"app\"\n",
            "workers = 3\n",
        ))
        .unwrap();
        let (app, a, b) = (&all[0], &all[1], &all[2]);
        assert_eq!(app.gateway_links.len(), 5);
        assert_eq!(app.gateway_links[2], b.gateway_link_socket(0));
        assert_eq!(a.gateway.as_ref().unwrap().link_base, 0);
        assert_eq!(b.gateway.as_ref().unwrap().link_base, 2);
    }

    #[test]
    fn a_same_port_gateway_takes_a_path_from_a_plugin_groups_listener() {
        let all = groups(concat!(
            "listen = \"0.0.0.0:8080\"\n",
            "[[group]]\n",
            "name = \"app\"\n",
            "[[group]]\n",
            "name = \"gw\"\n",
            "gateway = true\n",
            "business = \"app\"\n",
            "upgrade_from = \"app\"\n",
            "upgrade_path = \"/chat\"\n",
            "workers = 2\n",
        ))
        .unwrap();
        let (app, gw) = (&all[0], &all[1]);
        assert_eq!(
            gw.listen,
            "127.0.0.1:0".parse().unwrap(),
            "the top's listen is the HTTP group's: the gateway's own is loopback"
        );
        assert_eq!(
            app.gateway_handoffs,
            vec![crate::protocol::GatewayHandoff {
                path: "/chat".into(),
                sockets: vec![
                    "/srv/app/.host/gateway/gw-0.handoff".into(),
                    "/srv/app/.host/gateway/gw-1.handoff".into()
                ],
            }]
        );
        let start = |c: &Config| {
            c.worker_spec(WorkerStart {
                slot: 1,
                generation: 1,
                plugin: "x.so".into(),
                plugin_sha256: String::new(),
                plugin_config: &c.plugin_config,
                table_cell: None,
                table_cells: 0,
                max_requests: 0,
                max_requests_jitter: 0,
            })
        };
        assert_eq!(start(app).gateway_handoffs, app.gateway_handoffs);
        assert_eq!(
            start(gw).gateway.unwrap().handoff_socket,
            Some("/srv/app/.host/gateway/gw-1.handoff".into())
        );

        let gateway = |extra: &str| {
            format!(
                "[[group]]\nname = \"app\"\nlisten = \"127.0.0.1:8080\"\n[[group]]\nname = \"gw\"\ngateway = true\nbusiness = \"app\"\n{extra}"
            )
        };
        for (extra, expect) in [
            (
                "upgrade_from = \"app\"\n",
                "host.toml:8: group \"gw\": upgrade_from: needs `upgrade_path`",
            ),
            (
                "upgrade_from = \"app\"\nupgrade_path = \"chat\"\n",
                "\"chat\" is not a path like \"/chat\"",
            ),
            (
                "upgrade_from = \"app\"\nupgrade_path = \"/chat?x=1\"\n",
                "is not a path like",
            ),
            (
                "upgrade_from = \"nope\"\nupgrade_path = \"/chat\"\n",
                "host.toml:8: group \"gw\": upgrade_from: \"nope\" is not the name of a group",
            ),
            (
                "upgrade_from = \"gw\"\nupgrade_path = \"/chat\"\n",
                "\"gw\" is a gateway group",
            ),
            (
                "upgrade_from = \"app\"\nupgrade_path = \"/chat\"\n[[group]]\nname = \"gw2\"\ngateway = true\nbusiness = \"app\"\nupgrade_from = \"app\"\nupgrade_path = \"/chat\"\n",
                "\"app\" already passes \"/chat\" to another gateway group",
            ),
        ] {
            let err = groups(&gateway(extra)).unwrap_err().to_string();
            assert!(err.contains(expect), "{extra:?}: {err}");
        }
        let err = groups("upgrade_from = \"app\"\n").unwrap_err().to_string();
        assert!(err.contains("is a gateway's key"), "{err}");
    }

    #[test]
    fn a_gateway_group_names_its_business_group_and_is_never_reloadable() {
        let all = groups(concat!(
            "[[group]]\n",
            "name = \"app\"\n",
            "listen = \"127.0.0.1:8080\"\n",
            "[[group]]\n",
            "name = \"gw\"\n",
            "listen = \"127.0.0.1:8081\"\n",
            "gateway = true\n",
            "business = \"app\"\n",
            "reloadable = true\n",
            "watch = true\n",
            "gateway_max_clients = 5\n",
            "workers = 2\n",
            "gateway_max_message = \"4KiB\"\n",
            "cluster = \"redis://10.0.0.1:6379\"\n",
        ))
        .unwrap();
        let (app, gw) = (&all[0], &all[1]);
        assert_eq!(app.gateway, None);
        assert!(app.reloadable);
        assert!(
            !gw.reloadable && !gw.watch,
            "a gateway is replaced by restart and upgrade only"
        );
        let g = gw.gateway.as_ref().unwrap();
        assert_eq!(
            (g.business.as_str(), g.max_clients, g.max_message),
            ("app", 5, 4096)
        );
        assert_eq!(
            (g.ping_interval, g.ping_timeout),
            (Duration::from_secs(25), Duration::from_secs(10))
        );
        assert_eq!(
            gw.gateway_link_socket(1),
            Path::new("/srv/app/.host/gateway/gw-1.sock")
        );
        assert_eq!(
            app.gateway_links,
            (0..2)
                .map(|slot| gw.gateway_link_socket(slot))
                .collect::<Vec<_>>(),
            "the business group lists every gateway process's link"
        );
        assert!(gw.gateway_links.is_empty());
        assert_eq!(g.link_base, 0);
        assert_eq!(g.cluster.as_deref(), Some("redis://10.0.0.1:6379"));
        assert_eq!(
            app.worker_spec(WorkerStart {
                slot: 0,
                generation: 1,
                plugin: "x.so".into(),
                plugin_sha256: String::new(),
                plugin_config: &app.plugin_config,
                table_cell: None,
                table_cells: 0,
                max_requests: 0,
                max_requests_jitter: 0,
            })
            .gateway_links,
            app.gateway_links
        );

        let two = |gw: &str| {
            format!(
                "[[group]]\nname = \"app\"\nlisten = \"127.0.0.1:9000\"\n[[group]]\nname = \"gw\"\ngateway = true\n{gw}"
            )
        };
        for (text, expected) in [
            (two(""), ":6: group \"gw\": gateway: needs `business`"),
            (
                two("business = \"nope\"\n"),
                ":7: group \"gw\": business: \"nope\" is not the name of a group",
            ),
            (
                two("business = \"gw\"\n"),
                ":7: group \"gw\": business: \"gw\" is a gateway group",
            ),
            (
                "gateway = true\nbusiness = \"x\"\n".to_string(),
                ":1: gateway: a gateway is a [[group]] beside its `business` group",
            ),
            (
                two("business = \"app\"\ncluster = \"http://127.0.0.1:6379\"\n"),
                ":8: group \"gw\": cluster: \"http://127.0.0.1:6379\" is not a Redis URL",
            ),
            (
                two(
                    "business = \"app\"\ncluster = \"redis://a:1\"\n[[group]]\nname = \"gw2\"\ngateway = true\nbusiness = \"app\"\nlisten = \"127.0.0.1:9001\"\n",
                ),
                "group \"gw2\": business: the gateway groups of \"app\" must have the same `cluster`",
            ),
        ] {
            let e = groups(&text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}\n{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn bad_groups_are_one_line_naming_the_line_group_and_key() {
        let two = |second: &str| {
            format!(
                "listen = \"127.0.0.1:0\"\n[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:9000\"\n[[group]]\n{second}"
            )
        };
        for (text, expected) in [
            (
                two("name = \"a\"\n"),
                ":6: group \"a\": name: \"a\" is already the name of the group at line 2",
            ),
            (
                two("name = \"b\"\nlisten = \"127.0.0.1:9000\"\n"),
                ":7: group \"b\": listen: 127.0.0.1:9000 is already the address of group \"a\" (line 2)",
            ),
            (
                two("name = \"b\"\nwrokers = 2\n"),
                ":7: group \"b\": wrokers: unknown field `wrokers`",
            ),
            (
                two("name = \"b\"\nworkers = 0\n"),
                ":7: group \"b\": workers: 0 is out of range 1..=1024",
            ),
            (
                two("name = \"b\"\nstate_dir = \"x\"\n"),
                ":7: group \"b\": state_dir: is master-wide",
            ),
            (
                two("workers = 2\n"),
                ":5: group: a [[group]] needs a `name`",
            ),
            (
                two("name = \"a b\"\n"),
                ":6: name: \"a b\" is not a group name",
            ),
            (
                two("name = \"b\"\n[group.plugin_config]\nx = nan\n"),
                ":7: group \"b\": plugin_config.x: NaN cannot be passed",
            ),
            (
                "group = 3\n".to_string(),
                ":1: group: must be one or more [[group]] tables",
            ),
            // A key at the top is every group's: its error is the top's.
            (
                format!("workers = 0\n{}", two("name = \"b\"\n")),
                ":1: workers: 0 is out of range",
            ),
        ] {
            let err = groups(&text).unwrap_err().to_string();
            assert!(
                err.starts_with("/srv/app/host.toml")
                    && err.contains(expected)
                    && !err.contains('\n'),
                "{text:?} gave {err}, expected {expected}"
            );
        }
        // Port 0 twice: two ports the kernel picks.
        assert_eq!(
            groups(&two("name = \"b\"\nlisten = \"127.0.0.1:0\"\n"))
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("wrokers = 2\n").unwrap_err().to_string();
        assert!(err.contains("wrokers"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn durations_that_would_overflow_are_refused_with_the_range() {
        for (key, max) in [
            ("graceful_timeout", "1day"),
            ("start_timeout", "1h"),
            ("idle_grace", "1h"),
            ("header_read_timeout", "1h"),
            ("watch_debounce", "1h"),
        ] {
            for value in [
                "18446744073709551615s",
                "999999999999h",
                "25h",
                "1ns",
                "999us",
            ] {
                let err = parse(&format!("\n{key} = \"{value}\"\n"))
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.starts_with(&format!("/srv/app/host.toml:2: {key}: "))
                        && err.contains(&format!("1ms..={max}")),
                    "{key} = {value}: {err}"
                );
                assert!(!err.contains('\n'), "{err}");
            }
        }
        let c = parse("graceful_timeout = \"24h\"\nstart_timeout = \"1ms\"\n").unwrap();
        assert_eq!(c.graceful_timeout, MAX_DRAIN);
        assert_eq!(c.start_timeout, MIN_DURATION);
    }

    #[test]
    fn sizes_have_ranges() {
        for (text, key) in [
            ("max_body_bytes = -1\n", "max_body_bytes"),
            ("max_body_bytes = 9223372036854775807\n", "max_body_bytes"),
            ("backlog = 0\n", "backlog"),
            ("workers = 1025\n", "workers"),
            ("keep_snapshots = 1\n", "keep_snapshots"),
            ("max_draining_workers = 0\n", "max_draining_workers"),
            ("max_draining_workers = 4097\n", "max_draining_workers"),
            ("max_headers = 100000\n", "max_headers"),
            ("max_header_bytes = 100\n", "max_header_bytes"),
            ("blocking_threads = 0\n", "blocking_threads"),
            ("blocking_threads = 40000\n", "blocking_threads"),
            ("blocking_queue = -1\n", "blocking_queue"),
            ("blocking_queue = 1000001\n", "blocking_queue"),
            (
                "blocking_abandoned_threads = -1\n",
                "blocking_abandoned_threads",
            ),
            ("max_slow_paths = 0\n", "max_slow_paths"),
            ("canary_workers = -1\n", "canary_workers"),
            ("canary_min_requests = 0\n", "canary_min_requests"),
            (
                "canary_max_error_increase = 1.5\n",
                "canary_max_error_increase",
            ),
            (
                "canary_max_error_increase = nan\n",
                "canary_max_error_increase",
            ),
            (
                "canary_max_latency_ratio = 0.5\n",
                "canary_max_latency_ratio",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(&format!(":1: {key}: ")) && err.contains("out of range"),
                "{text:?} gave {err}"
            );
        }
    }

    mod random_values {
        use super::*;
        use proptest::prelude::*;
        use proptest::prop_oneof;

        /// A TOML value of any type, weighted towards what breaks parsers: huge and negative
        /// numbers, odd durations, strings of anything.
        fn value() -> impl Strategy<Value = String> {
            let quoted = |s: String| toml::Value::String(s).to_string();
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                prop_oneof![
                    Just(i64::MAX),
                    Just(i64::MIN),
                    Just(0i64),
                    Just(-1),
                    Just(1)
                ]
                .prop_map(|n| n.to_string()),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(|f| format!("{f:?}")),
                any::<bool>().prop_map(|b| b.to_string()),
                (
                    any::<u64>(),
                    prop::sample::select(vec!["ns", "us", "ms", "s", "m", "h", "d", "w", "y", ""]),
                )
                    .prop_map(move |(n, unit)| quoted(format!("{n}{unit}"))),
                (
                    0u64..100_000,
                    prop::sample::select(vec!["ns", "us", "ms", "s", "m", "h", "d"]),
                )
                    .prop_map(move |(n, unit)| quoted(format!("{n}{unit}"))),
                prop::sample::select(vec![
                    "18446744073709551615s",
                    "1ns",
                    "999999999999h",
                    "24h",
                    "24h 1ns",
                    "1h",
                    "1ms",
                    "-1s",
                    "1.5s",
                    "",
                    "0",
                ])
                .prop_map(move |s| quoted(s.to_string())),
                // Strings without ':' so `listen` never asks a resolver.
                "[^:]{0,12}".prop_map(quoted),
                prop::collection::vec("[a-z/.]{0,6}".prop_map(quoted), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
            ]
        }

        /// Every defined key: each gets random values of its kind, and of any kind.
        fn keys() -> Vec<&'static str> {
            keys::KEYS.iter().map(|k| k.name).collect()
        }

        /// A `[plugin_config]` table: nested tables and arrays of any TOML value, including ones
        /// JSON cannot hold (`nan`, `inf`).
        fn plugin_table() -> impl Strategy<Value = toml::Table> {
            let leaf = prop_oneof![
                any::<i64>().prop_map(toml::Value::Integer),
                any::<f64>().prop_map(toml::Value::Float),
                any::<bool>().prop_map(toml::Value::Boolean),
                ".{0,12}".prop_map(toml::Value::String),
                Just(toml::Value::Datetime(
                    "1979-05-27T07:32:00Z".parse().unwrap()
                )),
            ];
            let value = leaf.prop_recursive(4, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
                    prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                        .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
                ]
            });
            prop::collection::btree_map("[a-z_]{1,6}", value, 0..5)
                .prop_map(|m| m.into_iter().collect())
        }

        /// A value of the type `key` takes, of any size; or any value at all.
        fn value_for(key: &'static str) -> BoxedStrategy<String> {
            use keys::Kind;
            let quoted = |s: String| toml::Value::String(s).to_string();
            let typed = match (key, keys::def(key).kind) {
                (_, Kind::Duration { .. }) => (
                    prop_oneof![3 => 0u64..100, 1 => 0u64..100_000_000, 1 => any::<u64>()],
                    prop::sample::select(vec!["ns", "us", "ms", "s", "m", "h", "d"]),
                )
                    .prop_map(move |(n, unit)| quoted(format!("{n}{unit}")))
                    .boxed()
                    .prop_union(
                        prop::sample::select(vec![
                            "24h", "86400s", "86400001ms", "1h", "3600s", "3600001ms", "1ms",
                            "999us", "1000us", "1day 1ns", "59m 60s",
                        ])
                        .prop_map(move |s| quoted(s.to_string()))
                        .boxed(),
                    )
                    .boxed(),
                (_, Kind::Count { .. }) => {
                    prop_oneof![3 => -2i64..2000, 1 => -2i64..70_000, 1 => any::<i64>(), 1 => 0i64..(1 << 31)]
                        .prop_map(|n| n.to_string())
                        .boxed()
                }
                (_, Kind::Fraction { .. }) => prop_oneof![
                    any::<f64>().prop_map(|f| format!("{f:?}")),
                    (-1.0f64..1100.0).prop_map(|f| format!("{f:?}")),
                ]
                .boxed(),
                (_, Kind::Bool) => any::<bool>().prop_map(|b| b.to_string()).boxed(),
                (_, Kind::Size { .. }) => prop_oneof![
                    any::<i64>().prop_map(|n| n.to_string()),
                    (
                        any::<u64>(),
                        prop::sample::select(vec!["", "B", "KiB", "MiB", "GiB", "TiB", " MiB"])
                    )
                        .prop_map(move |(n, unit)| quoted(format!("{n}{unit}"))),
                ]
                .boxed(),
                ("access_log", _) => prop::sample::select(vec!["", "access.log", "/dev/full", "a/b.log"])
                    .prop_map(move |s| quoted(s.to_string()))
                    .boxed(),
                ("log_format", _) => prop::sample::select(vec!["text", "json", "JSON", "", "yaml"])
                    .prop_map(move |s| quoted(s.to_string()))
                    .boxed(),
                ("plugin_config", _) => plugin_table()
                    .prop_map(|t| toml::Value::Table(t).to_string())
                    .boxed(),
                ("listen", _) => prop_oneof![
                    Just("\"127.0.0.1:0\"".to_string()),
                    any::<u16>().prop_map(|p| format!("\"[::1]:{p}\"")),
                ]
                .boxed(),
                // The default `listen` among them, to hit the clash.
                ("admin_listen", _) => prop_oneof![
                    Just("\"127.0.0.1:8080\"".to_string()),
                    Just("\"0.0.0.0:8080\"".to_string()),
                    Just("\"127.0.0.1:0\"".to_string()),
                    any::<u16>().prop_map(|p| format!("\"127.0.0.1:{p}\"")),
                    any::<u16>().prop_map(|p| format!("\"[::1]:{p}\"")),
                ]
                .boxed(),
                _ => "[^:]{0,12}".prop_map(quoted).boxed(),
            };
            prop_oneof![2 => typed, 1 => value()].boxed()
        }

        /// A few keys set (so that some texts are accepted), or any of them.
        fn config_text() -> impl Strategy<Value = String> {
            let line = |(k, v): (&str, String)| format!("{k} = {v}\n");
            let few = prop::collection::vec(
                prop::sample::select(keys()).prop_flat_map(|k| (Just(k), value_for(k))),
                1..=2,
            )
            .prop_map(move |kvs| kvs.into_iter().map(line).collect::<String>())
            .boxed();
            let many = prop::collection::vec(prop::option::weighted(0.5, value()), keys().len())
                .prop_map(|values| {
                    keys()
                        .into_iter()
                        .zip(values)
                        .filter_map(|(k, v)| Some(format!("{k} = {}\n", v?)))
                        .collect::<String>()
                })
                .boxed();
            // `[plugin_config]` as a table after the keys, as people write it.
            let with_table = (prop_oneof![few.clone(), many.clone()], plugin_table()).prop_map(
                |(keys, table)| {
                    let mut doc = toml::Table::new();
                    doc.insert("plugin_config".into(), toml::Value::Table(table));
                    format!("{keys}{}", toml::to_string(&doc).unwrap())
                },
            );
            // The same keys in one or two `[[group]]` tables (any key, master-wide ones too).
            let grouped = (
                few.clone(),
                prop_oneof![few.clone(), many.clone()],
                any::<bool>(),
            )
                .prop_map(|(top, first, second)| {
                    let mut text = format!("{top}[[group]]\nname = \"a\"\n{first}");
                    if second {
                        text.push_str("[[group]]\nname = \"b\"\n");
                    }
                    text
                });
            prop_oneof![3 => few, 1 => many, 1 => with_table, 1 => grouped]
        }

        fn bounded(key: &str, d: Duration) {
            let now = std::time::Instant::now();
            let four = d.checked_mul(4).expect("d * 4");
            assert!(
                now.checked_add(four).is_some(),
                "{key}: Instant + {d:?} * 4"
            );
            assert!(u64::try_from(d.as_millis()).is_ok(), "{key}: {d:?} in ms");
            assert!(d >= MIN_DURATION, "{key}: {d:?} rounds to 0 ms");
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

            #[test]
            fn no_value_makes_parse_panic_and_accepted_ones_are_bounded(text in config_text()) {
                match Config::parse(Path::new("/srv/app/host.toml"), &text) {
                    Ok(c) => {
                        for (key, d) in [
                            ("graceful_timeout", c.graceful_timeout),
                            ("start_timeout", c.start_timeout),
                            ("idle_grace", c.idle_grace),
                            ("header_read_timeout", c.header_read_timeout),
                            ("watch_debounce", c.watch_debounce),
                            ("body_read_timeout", c.body_read_timeout),
                            ("worker_timeout", c.worker_timeout),
                            ("keepalive_timeout", c.keepalive_timeout),
                            ("send_timeout", c.send_timeout),
                            ("listener_check_interval", c.listener_check_interval),
                            ("orphan_grace", c.orphan_grace),
                            ("canary_analysis", c.canary.analysis),
                            ("canary_watch", c.canary.watch),
                        ] {
                            bounded(key, d);
                        }
                        // What the master and CLI derive from them.
                        bounded("kill deadline", c.graceful_timeout + Duration::from_secs(2));
                        let rollout = c.start_timeout.checked_mul(2 * c.workers as u32);
                        prop_assert!(rollout.is_some_and(|r| std::time::Instant::now().checked_add(r).is_some()));
                        prop_assert!((1..=1024).contains(&c.workers));
                        prop_assert!(c.max_body_bytes as i64 <= MAX_BODY_BYTES);
                        prop_assert!((1..=65535).contains(&c.backlog));
                        prop_assert!(c.max_requests.checked_add(c.max_requests_jitter).is_some());
                        prop_assert!(c.worker_timeout >= MIN_WORKER_TIMEOUT);
                        prop_assert!(c.canary.max_error_increase.is_finite() && c.canary.max_latency_ratio >= 1.0);
                        prop_assert!(!c.heartbeat_interval().is_zero());
                        prop_assert!(c.plugin_config.json.len() <= MAX_PLUGIN_CONFIG_BYTES);
                        let json: serde_json::Value = serde_json::from_str(&c.plugin_config.json).unwrap();
                        prop_assert!(json.is_object());
                        if let Some(admin) = c.admin_listen {
                            prop_assert!(admin.port() == 0 || admin != c.listen);
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        prop_assert!(!msg.contains('\n'), "multi-line error: {}", msg);
                        prop_assert!(msg.starts_with("/srv/app/host.toml"), "{}", msg);
                    }
                }
            }
        }
    }
}
