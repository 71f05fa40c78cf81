//! Every config key, defined once: its name, scope, kind (with its range), default and doc.
//!
//! [`KEYS`] is the table; [`Reader`] reads a parsed TOML table through it, so the typed value,
//! the default and the one-line range error of a key all come from its definition, and
//! [`markdown_table`] renders the same definitions as the table of `docs/configuration.md`
//! (kept true by the `config_docs` test). It owns no policy beyond one key at a time: how keys
//! combine (a default that follows another key, a key that needs another) is `Config::parse`'s.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{
    ByteSize, ConfigError, MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_DRAIN, MAX_DRAINING_WORKERS,
    MAX_GATEWAY_MESSAGE, MAX_POOL_QUEUE, MAX_POOL_THREADS, MAX_REQUESTS, MAX_SLOW_PATHS, MAX_WAIT,
    MIN_DURATION, MIN_WORKER_TIMEOUT,
};

/// Where a key may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value for the whole master (state directory, log format, the admin listener).
    Master,
    /// A value per worker group; at the top of the file it is every group's default.
    Group,
}

/// A key's type, with what bounds it.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `"host:port"`.
    Address,
    /// A whole number in `min..=max`; `note` follows the range in the error (`" (0: off)"`).
    Count {
        min: i64,
        max: i64,
        note: &'static str,
    },
    /// A number of bytes, or a string like `"512MiB"`, in `min..=max`.
    Size {
        min: u64,
        max: u64,
    },
    /// A humantime string like `"30s"`, in `min..=max`.
    Duration {
        min: Duration,
        max: Duration,
    },
    /// A number in `min..=max`.
    Fraction {
        min: f64,
        max: f64,
    },
    Bool,
    /// A path, relative to the config file.
    Path,
    /// A list of paths, relative to the config file.
    Paths,
    /// A string.
    Text,
    /// Any TOML table.
    Table,
}

/// What a key is when it is not set.
#[derive(Clone, Copy, Debug)]
// The texts are the docs' (rendered by the `config_docs` test).
#[cfg_attr(not(test), allow(dead_code))]
pub enum Fallback {
    /// This TOML value, read like a written one.
    Toml(&'static str),
    /// Computed by `Config::parse` (from the machine or another key): the doc says how.
    Derived(&'static str),
    /// Off or absent; the doc says what that means.
    Unset(&'static str),
}

/// One config key.
#[derive(Clone, Copy, Debug)]
// `values` and `doc` are the docs' (rendered by the `config_docs` test).
#[cfg_attr(not(test), allow(dead_code))]
pub struct Key {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: Kind,
    pub default: Fallback,
    /// The docs' range column for kinds without a numeric range (empty: none shown).
    pub values: &'static str,
    /// What the key means, in Markdown, for `docs/configuration.md`.
    pub doc: &'static str,
}

const fn key(
    name: &'static str,
    scope: Scope,
    kind: Kind,
    default: Fallback,
    doc: &'static str,
) -> Key {
    Key {
        name,
        scope,
        kind,
        default,
        values: "",
        doc,
    }
}

const fn wait(max: Duration) -> Kind {
    Kind::Duration {
        min: MIN_DURATION,
        max,
    }
}

const fn count(min: i64, max: i64) -> Kind {
    Kind::Count { min, max, note: "" }
}

/// `max_requests` and its jitter.
const REQUESTS: Kind = Kind::Count {
    min: 0,
    max: MAX_REQUESTS,
    note: " (0: off)",
};

use Fallback::{Derived, Toml, Unset};
use Scope::{Group, Master};

/// Every key, in the order the docs list them.
pub const KEYS: &[Key] = &[
    key(
        "listen",
        Group,
        Kind::Address,
        Toml("\"127.0.0.1:8080\""),
        "address to bind (port `0`: the kernel picks; `status` shows it)",
    ),
    key(
        "admin_listen",
        Master,
        Kind::Address,
        Unset("none (off)"),
        "address where the master serves Prometheus metrics at `/metrics` (see [Metrics](operations.md#metrics)); never the `listen` address (port `0`: the kernel picks; `status` shows it)",
    ),
    key(
        "workers",
        Group,
        count(1, 1024),
        Derived("CPU count"),
        "number of worker processes (slots)",
    ),
    key(
        "plugin",
        Group,
        Kind::Path,
        Toml("\"target/release/libexample_plugin.so\""),
        "the plugin file a reload snapshots",
    ),
    key(
        "reloadable",
        Group,
        Kind::Bool,
        Toml("true"),
        "whether `host reload`, `SIGHUP` and the watcher replace this group's workers; `false`: only `host restart` and `host upgrade` do (see [Groups](groups.md))",
    ),
    key(
        "gateway",
        Group,
        Kind::Bool,
        Toml("false"),
        "this group's processes are WebSocket gateways (the frozen host binary, no plugin): they hold the clients and pass their events to the `business` group's workers; forces `reloadable = false` (see [the gateway design](design/gateway.md))",
    ),
    key(
        "business",
        Group,
        Kind::Text,
        Unset("none; required with `gateway = true`"),
        "with `gateway = true`: the name of the plugin group whose workers handle this gateway's client events",
    ),
    key(
        "upgrade_from",
        Group,
        Kind::Text,
        Unset("none: the gateway takes clients on its own `listen` only"),
        "with `gateway = true`: the plugin group whose listener also takes this gateway's WebSocket clients (same port as HTTP): its workers pass a new connection whose first request is `GET <upgrade_path>` to a gateway process, unread, over a Unix socket; the gateway's own `listen` is then `127.0.0.1:0` unless its table sets one (see [the gateway](gateway.md#same-port-as-http))",
    ),
    key(
        "upgrade_path",
        Group,
        Kind::Text,
        Unset("none; required with `upgrade_from`"),
        "with `upgrade_from`: the path (exact, query ignored) whose requests go to the gateway, e.g. `\"/chat\"`",
    ),
    key(
        "gateway_max_clients",
        Group,
        count(1, MAX_CONNECTIONS),
        Toml("10000"),
        "most WebSocket clients one gateway process holds; past it a client's upgrade is answered `503` before the handshake completes",
    ),
    key(
        "gateway_max_message",
        Group,
        Kind::Size {
            min: 125,
            max: MAX_GATEWAY_MESSAGE,
        },
        Toml("\"64KiB\""),
        "largest WebSocket message (and frame) a client may send; a larger one closes the client with `1009`",
    ),
    key(
        "gateway_send_queue",
        Group,
        Kind::Size {
            min: 1024,
            max: MAX_GATEWAY_MESSAGE,
        },
        Toml("\"1MiB\""),
        "most bytes queued for one client that reads too slowly; past it the client is closed with `1008`, and the others are not slowed",
    ),
    key(
        "gateway_ping_interval",
        Group,
        wait(MAX_WAIT),
        Toml("\"25s\""),
        "how often a gateway pings a client that sent nothing",
    ),
    key(
        "gateway_ping_timeout",
        Group,
        wait(MAX_WAIT),
        Toml("\"10s\""),
        "a client that answers no ping (and sends nothing) within this is disconnected",
    ),
    key(
        "gateway_hold",
        Group,
        wait(MAX_WAIT),
        Toml("\"10s\""),
        "how long a gateway holds a client's events while no business worker is connected (all of them crashed, say); past it the client is closed with `1011` and counted",
    ),
    key(
        "gateway_event_timeout",
        Group,
        wait(MAX_WAIT),
        Toml("\"30s\""),
        "in a business group: how long a gateway event's handler may run; past it the handler is dropped, the event counts as handled (a connect is refused `504`), logged and counted",
    ),
    key(
        "cluster",
        Group,
        Kind::Text,
        Unset("none: this host's clients only"),
        "with `gateway = true`: `\"redis://HOST:PORT\"`, the Redis whose pub/sub carries sends to a uid, a group or everyone, and presence counts, to the gateways of every host serving the same `business` group; while Redis is down local delivery goes on and cross-host sends are counted errors (see [the gateway design](design/gateway.md))",
    ),
    key(
        "state_dir",
        Master,
        Kind::Path,
        Toml("\".host\""),
        "control socket, pidfile, log (with `-d`), plugin snapshots; created 0700, and refused when it or a parent is another user's or writable by others (see [Limits](operations.md#limits))",
    ),
    key(
        "graceful_timeout",
        Group,
        wait(MAX_DRAIN),
        Toml("\"30s\""),
        "how long a draining worker may finish its requests",
    ),
    key(
        "start_timeout",
        Group,
        wait(MAX_WAIT),
        Toml("\"10s\""),
        "how long a new worker may take to become ready",
    ),
    key(
        "idle_grace",
        Group,
        wait(MAX_WAIT),
        Toml("\"1s\""),
        "during a drain, how long an idle keep-alive connection stays open",
    ),
    key(
        "max_body_bytes",
        Group,
        count(0, MAX_BODY_BYTES),
        Toml("1048576"),
        "larger request bodies get `413`",
    ),
    key(
        "body_read_timeout",
        Group,
        wait(MAX_WAIT),
        Toml("\"30s\""),
        "a request body must arrive within this, else `408` and the connection is closed",
    ),
    key(
        "backlog",
        Group,
        count(1, 65535),
        Toml("1024"),
        "listen backlog of the listening socket",
    ),
    key(
        "keep_snapshots",
        Group,
        count(2, 1000),
        Toml("3"),
        "generations whose snapshots are kept for `rollback`",
    ),
    key(
        "max_draining_workers",
        Group,
        count(1, MAX_DRAINING_WORKERS),
        Derived("4 × `workers`"),
        "old workers a rollout leaves draining at once; past it, the next new worker waits for one to exit (see [Limits](operations.md#limits))",
    ),
    key(
        "allow_writable_plugin",
        Group,
        Kind::Bool,
        Toml("false"),
        "load a plugin file, or one in a directory, that other users can write",
    ),
    key(
        "accept_balance",
        Group,
        Kind::Bool,
        Toml("true"),
        "workers share their connection counts so that bursts of new connections spread out (see Balance); `false`: the kernel alone decides",
    ),
    Key {
        values: "a number of bytes, or with `B`, `KiB`, `MiB`, `GiB`",
        ..key(
            "max_plugin_bytes",
            Group,
            Kind::Size {
                min: 1,
                max: u64::MAX,
            },
            Toml("\"512MiB\""),
            "largest plugin file a reload snapshots",
        )
    },
    key(
        "header_read_timeout",
        Group,
        wait(MAX_WAIT),
        Toml("\"10s\""),
        "a connection with nothing in progress (just accepted, or its last response sent) must send a complete request head within this, or is closed (slowloris guard; checked every quarter of it, so closed between 1x and 1.5x)",
    ),
    key(
        "max_headers",
        Group,
        count(1, 10_000),
        Toml("100"),
        "more header fields get `431`",
    ),
    key(
        "max_header_bytes",
        Group,
        count(8192, 16 << 20),
        Toml("65536"),
        "a longer request line + headers gets `431`",
    ),
    key(
        "keepalive_timeout",
        Group,
        wait(MAX_WAIT),
        Toml("\"75s\""),
        "an HTTP/2 connection with no stream open for this long gets GOAWAY and is closed; an idle HTTP/1 keep-alive connection is closed at the shorter of this and `header_read_timeout` (see [Limits](operations.md#limits))",
    ),
    key(
        "send_timeout",
        Group,
        wait(MAX_WAIT),
        Toml("\"60s\""),
        "a connection whose writes make no progress for this long (the client reads nothing) is closed (see [Limits](operations.md#limits))",
    ),
    key(
        "max_connections",
        Group,
        Kind::Count {
            min: 0,
            max: MAX_CONNECTIONS,
            note: " (0: from the open-files limit)",
        },
        Toml("0"),
        "connections one worker holds open; at the limit it stops accepting until one closes (`0`: 9/10 of the worker's open-files limit; see [Limits](operations.md#limits))",
    ),
    key(
        "http2_max_streams",
        Group,
        count(1, 10_000),
        Toml("128"),
        "streams a client may have open at once on one HTTP/2 connection",
    ),
    Key {
        values: "a number of bytes, or with `B`, `KiB`, `MiB`",
        ..key(
            "http2_send_buffer",
            Group,
            Kind::Size {
                min: 1 << 10,
                max: 16 << 20,
            },
            Toml("\"32KiB\""),
            "response bytes buffered per HTTP/2 stream ahead of the socket",
        )
    },
    key(
        "watch",
        Group,
        Kind::Bool,
        Toml("false"),
        "reload by itself when the plugin file changes",
    ),
    key(
        "watch_debounce",
        Group,
        wait(MAX_WAIT),
        Toml("\"300ms\""),
        "quiet time after the last change before reacting",
    ),
    key(
        "build",
        Group,
        Kind::Text,
        Unset("none"),
        "command run (`sh -c`, in the config file's directory; `--build`: in the current directory) once at start and after each source change; implies `watch` (see [Dev loop](dev-loop.md))",
    ),
    key(
        "watch_paths",
        Group,
        Kind::Paths,
        Toml("[]"),
        "directories `build` watches (recursively; `target/` and hidden files ignored)",
    ),
    key(
        "max_requests",
        Group,
        REQUESTS,
        Toml("0"),
        "recycle a worker after it served this many requests, plus its jitter (`0`: off; see Recycling)",
    ),
    key(
        "max_requests_jitter",
        Group,
        REQUESTS,
        Toml("0"),
        "each worker's limit is `max_requests` + a random `0..=max_requests_jitter`, so workers started together are not recycled together",
    ),
    Key {
        values: "a number of bytes, or with `B`, `KiB`, `MiB`, `GiB`; `0`: off",
        ..key(
            "max_worker_rss",
            Group,
            Kind::Size {
                min: 0,
                max: u64::MAX,
            },
            Unset("none (off)"),
            "recycle a ready worker whose resident set grows past this",
        )
    },
    key(
        "worker_timeout",
        Group,
        Kind::Duration {
            min: MIN_WORKER_TIMEOUT,
            max: MAX_WAIT,
        },
        Toml("\"30s\""),
        "a ready worker that sends no heartbeat for this long is hung: killed and replaced (see [Hung workers](operations.md#when-things-go-wrong))",
    ),
    key(
        "listener_check_interval",
        Master,
        wait(MAX_WAIT),
        Toml("\"1s\""),
        "how often the master checks that each listening socket still listens, and re-arms it if a plugin shut it down (see [Limits](operations.md#limits))",
    ),
    key(
        "orphan_grace",
        Master,
        wait(MAX_WAIT),
        Toml("\"2s\""),
        "a process a worker left behind (forked by its plugin) gets SIGTERM, then SIGKILL this much later (see [Limits](operations.md#limits))",
    ),
    key(
        "canary_workers",
        Group,
        count(0, 1024),
        Toml("1"),
        "new workers a `host reload` starts and then holds, serving beside the old generation, while they are judged on live traffic (see [Progressive delivery](reloads.md#progressive-delivery-the-canary-judged-on-live-traffic)); `0`, or not fewer than `workers`: the reload rolls out at once",
    ),
    key(
        "canary_analysis",
        Group,
        wait(MAX_WAIT),
        Toml("\"30s\""),
        "how long the canary is judged before it is promoted to every worker (a verdict against it comes as soon as the figures show it)",
    ),
    key(
        "canary_watch",
        Group,
        wait(MAX_WAIT),
        Toml("\"60s\""),
        "after a judged generation reached every worker, how long it is still judged; failing then, it is rolled back to the previous generation",
    ),
    key(
        "canary_min_requests",
        Group,
        count(1, MAX_REQUESTS),
        Toml("100"),
        "requests the canary must answer before its 5xx share or latency can condemn it (crashes and hangs condemn at once)",
    ),
    key(
        "canary_max_error_increase",
        Group,
        Kind::Fraction { min: 0.0, max: 1.0 },
        Toml("0.02"),
        "how much the canary's 5xx share (requests lost in a crash count as failed) may exceed the old generation's (`0.02`: two percentage points)",
    ),
    key(
        "canary_max_latency_ratio",
        Group,
        Kind::Fraction {
            min: 1.0,
            max: 1000.0,
        },
        Toml("3.0"),
        "how many times the old generation's p99 latency the canary's may be",
    ),
    key(
        "watch_canary",
        Group,
        Kind::Bool,
        Toml("false"),
        "dev mode: judge the watcher's reloads too (off: they roll out at once)",
    ),
    Key {
        values: "`\"text\"`, `\"json\"`",
        ..key(
            "log_format",
            Master,
            Kind::Text,
            Toml("\"text\""),
            "how the master and its workers write their log lines (see [Logs](operations.md#logs))",
        )
    },
    Key {
        values: "a path (relative to this file), `\"\"`: off",
        ..key(
            "access_log",
            Group,
            Kind::Path,
            Unset("none (off)"),
            "where workers append one line per request, in `log_format` (see [Access log](operations.md#access-log))",
        )
    },
    key(
        "blocking_threads",
        Group,
        count(1, MAX_POOL_THREADS),
        Toml("1024"),
        "most threads of a worker's blocking pool running live requests (see [Limits](operations.md#limits))",
    ),
    key(
        "blocking_queue",
        Group,
        count(0, MAX_POOL_QUEUE),
        Toml("1024"),
        "requests that may wait for a blocking-pool thread beyond those free threads take at once; more get `503` with `Retry-After: 1`",
    ),
    key(
        "blocking_abandoned_threads",
        Group,
        count(0, MAX_POOL_THREADS),
        Toml("1024"),
        "threads that may still run a blocking handler whose client is gone, beyond `blocking_threads` (`0`: such a handler keeps its thread until it returns)",
    ),
    key(
        "max_slow_paths",
        Group,
        count(1, MAX_SLOW_PATHS),
        Toml("1024"),
        "paths a worker remembers in each of three sets: `Inline` handlers that took over 20 ms of wall time once (suspects, whose later calls are judged by the thread's clock), those then caught holding the I/O thread over 20 ms by their own doing, CPU time or a blocking call (their path then runs on the blocking pool; a wait for a CPU is not counted), and, apart, an async handler caught blocking in one poll: a poll that took over 20 ms and either used over 20 ms of the I/O thread's CPU time or blocked the thread (a sleep, a lock, a blocking read: a voluntary context switch, read with `getrusage(RUSAGE_THREAD)`); a poll that only waited for a CPU on a busy machine is not accused (test: `async_plugin.rs`, a worker at nice 19 behind two busy loops on its CPU: 5 ms of CPU took 112 ms to 1.6 s, not accused; 60 ms of spinning is). A reading is a system call (1.5 µs on this VM): a busy I/O thread takes one at most once a millisecond, an idle one once after each wake-up, and a poll is read again only once it took over 20 ms (8 bytes each)",
    ),
    Key {
        values: "a table; at most 256 KiB as JSON, 64 levels deep",
        ..key(
            "plugin_config",
            Group,
            Kind::Table,
            Toml("{}"),
            "the plugin's own settings, any TOML, written as a `[plugin_config]` table (see [Plugin configuration](#plugin-configuration)); the one key a reload re-reads",
        )
    },
];

/// The definition of `name`. Panics for a name not in [`KEYS`]: a typo in this crate.
pub fn def(name: &str) -> &'static Key {
    KEYS.iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("config key {name} is not defined in config::keys::KEYS"))
}

/// Renders a duration as the range and the docs show it (`1ms`, `1h`, `1day`).
fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Renders a size as its range shows it: `1KiB`, `16MiB`, or bytes.
fn size_text(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => n.to_string(),
    }
}

#[cfg(test)]
/// Renders a whole number for the docs: powers of two past 2^20 as `2^n`.
fn count_text(n: i64) -> String {
    if n > 1 << 24 && n.count_ones() == 1 {
        format!("2^{}", n.trailing_zeros())
    } else {
        n.to_string()
    }
}

impl Key {
    /// The range as the error message states it; `None` for kinds without one.
    fn range(&self) -> Option<String> {
        match self.kind {
            Kind::Count { min, max, .. } => Some(format!("{min}..={max}")),
            Kind::Size { min, max } if min > 1 && max < u64::MAX => {
                Some(format!("{}..={}", size_text(min), size_text(max)))
            }
            Kind::Duration { min, max } => {
                Some(format!("{}..={}", duration_text(min), duration_text(max)))
            }
            Kind::Fraction { min, max } => Some(format!("{min:?}..={max:?}")),
            _ => None,
        }
    }

    /// The docs' range column.
    #[cfg(test)]
    fn range_doc(&self) -> String {
        match self.kind {
            Kind::Count { min, max, .. } => format!("{}..={}", count_text(min), count_text(max)),
            _ if !self.values.is_empty() => self.values.to_string(),
            _ => self.range().unwrap_or_default(),
        }
    }

    #[cfg(test)]
    fn default_doc(&self) -> String {
        match self.default {
            Toml(v) => format!("`{v}`"),
            Derived(doc) | Unset(doc) => doc.to_string(),
        }
    }
}

#[cfg(test)]
/// The Markdown table of every key, as `docs/configuration.md` carries it between
/// `<!-- keys:begin -->` and `<!-- keys:end -->`.
pub fn markdown_table() -> String {
    let mut out =
        String::from("| key | scope | default | range | meaning |\n|---|---|---|---|---|\n");
    for k in KEYS {
        let scope = match k.scope {
            Master => "master",
            Group => "group",
        };
        out.push_str(&format!(
            "| `{}` | {scope} | {} | {} | {} |\n",
            k.name,
            k.default_doc(),
            k.range_doc(),
            k.doc
        ));
    }
    out
}

/// Where a group's keys are written: its `[[group]]` table and the lines it spans.
pub struct Section<'a> {
    pub name: &'a str,
    pub table: &'a toml::Table,
    /// 0-based line range of the group's table in the file.
    pub lines: std::ops::Range<usize>,
}

/// Reads keys out of a parsed config file through their definitions; every error is the
/// one line `Config::parse` returns. A group's key comes from its own table, else from the top
/// of the file (every group's default), else from its definition.
pub struct Reader<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    /// The top of the file (without its `[[group]]` tables).
    pub(super) table: &'a toml::Table,
    /// The group being read, when the file has `[[group]]` tables.
    pub(super) group: Option<Section<'a>>,
    /// The lines of every group's table: the top of the file's keys are elsewhere.
    pub(super) group_lines: &'a [std::ops::Range<usize>],
}

/// serde's words for a key that is not one of `expected`.
fn unknown_key(unknown: &str, expected: impl Iterator<Item = &'static str>) -> String {
    let expected: Vec<String> = expected.map(|k| format!("`{k}`")).collect();
    format!(
        "unknown field `{unknown}`, expected one of {}",
        expected.join(", ")
    )
}

impl<'a> Reader<'a> {
    /// A reader of the top of the file, once every key in it is known (else the one-line error
    /// naming the first unknown one, as serde words it). `groups`: the file has `[[group]]`s.
    pub fn new(
        file: &'a Path,
        text: &'a str,
        table: &'a toml::Table,
        group_lines: &'a [std::ops::Range<usize>],
    ) -> Result<Self, ConfigError> {
        let reader = Reader {
            file,
            text,
            table,
            group: None,
            group_lines,
        };
        let known = |k: &str| KEYS.iter().any(|d| d.name == k);
        if let Some(unknown) = table.keys().find(|k| !known(k)) {
            let names = KEYS.iter().map(|k| k.name);
            let message = if group_lines.is_empty() {
                unknown_key(unknown, names)
            } else {
                unknown_key(unknown, names.chain(["group"]))
            };
            return Err(reader.invalid(unknown, message));
        }
        Ok(reader)
    }

    /// A reader of one `[[group]]`: its own keys must be group keys (or `name`).
    pub fn for_group(&self, section: Section<'a>) -> Result<Reader<'a>, ConfigError> {
        let reader = Reader {
            group: Some(section),
            ..*self
        };
        let own = reader.group.as_ref().map_or(self.table, |g| g.table);
        for k in own.keys().filter(|k| *k != "name") {
            match KEYS.iter().find(|d| d.name == k) {
                Some(d) if d.scope == Group => {}
                Some(_) => {
                    return Err(reader.invalid(
                        k,
                        "is master-wide: set it at the top of the file, not in a [[group]]".into(),
                    ));
                }
                None => {
                    let names = KEYS.iter().filter(|d| d.scope == Group).map(|d| d.name);
                    let message = unknown_key(k, ["name"].into_iter().chain(names));
                    return Err(reader.invalid(k, message));
                }
            }
        }
        Ok(reader)
    }

    /// The one-line error about `key`, at the line that sets it (0: not set, a default). A
    /// key the group sets itself is named with its group.
    pub fn invalid(&self, key: &str, message: String) -> ConfigError {
        let (line, key) = match &self.group {
            Some(g) if g.table.contains_key(key.split('.').next().unwrap_or(key)) => (
                super::line_in(self.text, g.lines.clone(), key),
                format!("group {:?}: {key}", g.name),
            ),
            _ => (self.top_line(key), key.to_string()),
        };
        ConfigError::Invalid {
            path: self.file.to_path_buf(),
            line,
            key,
            message,
        }
    }

    /// The line of a key at the top of the file (outside every group's table).
    fn top_line(&self, key: &str) -> usize {
        if self.group_lines.is_empty() {
            return super::line_of_key(self.text, key);
        }
        let lines = self.text.lines().count();
        let mut from = 0;
        for range in self
            .group_lines
            .iter()
            .cloned()
            .chain(std::iter::once(lines..lines))
        {
            let line = super::line_in(self.text, from..range.start, key);
            if line > 0 {
                return line;
            }
            from = range.end;
        }
        0
    }

    /// The value of a table key (`plugin_config`): the group's own, else the top's.
    pub fn table_value(&self, name: &str) -> Option<&'a toml::Value> {
        self.group
            .as_ref()
            .and_then(|g| g.table.get(name))
            .or_else(|| self.table.get(name))
    }

    /// The value set for `name`, or its default (`None`: unset, or derived by the caller).
    fn value(&self, name: &str) -> Option<toml::Value> {
        if let Some(v) = self.group.as_ref().and_then(|g| g.table.get(name)) {
            return Some(v.clone());
        }
        if let Some(v) = self.table.get(name) {
            return Some(v.clone());
        }
        match def(name).default {
            Toml(literal) => Some(
                toml::from_str::<toml::Table>(&format!("v = {literal}"))
                    .ok()?
                    .remove("v")?,
            ),
            Derived(_) | Unset(_) => None,
        }
    }

    /// The value of `name` as `T` (wrong TOML type: serde's message).
    pub fn typed<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ConfigError> {
        self.value(name)
            .map(|v| T::deserialize(v).map_err(|e| self.invalid(name, e.message().to_string())))
            .transpose()
    }

    /// A whole number within its range.
    pub fn count(&self, name: &str) -> Result<Option<i64>, ConfigError> {
        let key = def(name);
        let Kind::Count { min, max, note } = key.kind else {
            panic!("config key {name} is not a count");
        };
        match self.typed::<i64>(name)? {
            Some(n) if !(min..=max).contains(&n) => {
                Err(self.invalid(name, format!("{n} is out of range {min}..={max}{note}")))
            }
            n => Ok(n),
        }
    }

    /// A count that has a default (from its definition), as `usize`.
    pub fn usize(&self, name: &str) -> Result<usize, ConfigError> {
        Ok(self.count(name)?.unwrap_or(0) as usize)
    }

    /// A size in bytes within its range.
    pub fn size(&self, name: &str) -> Result<Option<u64>, ConfigError> {
        let key = def(name);
        let Kind::Size { min, max } = key.kind else {
            panic!("config key {name} is not a size");
        };
        let Some(size) = self.typed::<ByteSize>(name)? else {
            return Ok(None);
        };
        let n = size.bytes().map_err(|m| self.invalid(name, m))?;
        if n < min && min == 1 {
            return Err(self.invalid(name, "must be greater than zero".into()));
        }
        if !(min..=max).contains(&n) {
            let range = key.range().unwrap_or_default();
            return Err(self.invalid(name, format!("{n} is out of range {range}")));
        }
        Ok(Some(n))
    }

    /// A duration within its range.
    pub fn duration(&self, name: &str) -> Result<Duration, ConfigError> {
        let key = def(name);
        let Kind::Duration { min, max } = key.kind else {
            panic!("config key {name} is not a duration");
        };
        let s = self.typed::<String>(name)?.unwrap_or_default();
        // The usual range (1ms..): the format error states it; a longer minimum is stated
        // once the value parsed.
        let range = format!("{}..={}", duration_text(MIN_DURATION), duration_text(max));
        let d = humantime::parse_duration(&s).map_err(|e| {
            self.invalid(
                name,
                format!("{s:?} is not a duration like \"250ms\" or \"30s\" in {range} ({e})"),
            )
        })?;
        if d.is_zero() {
            return Err(self.invalid(name, format!("must be greater than zero ({range})")));
        }
        if !(MIN_DURATION..=max).contains(&d) {
            return Err(self.invalid(name, format!("{s:?} is out of range {range}")));
        }
        if d < min {
            return Err(self.invalid(
                name,
                format!(
                    "{} is out of range {}",
                    duration_text(d),
                    key.range().unwrap_or_default()
                ),
            ));
        }
        Ok(d)
    }

    /// A number within its range.
    pub fn fraction(&self, name: &str) -> Result<f64, ConfigError> {
        let Kind::Fraction { min, max } = def(name).kind else {
            panic!("config key {name} is not a fraction");
        };
        match self.typed::<f64>(name)?.unwrap_or_default() {
            x if (min..=max).contains(&x) => Ok(x),
            x => Err(self.invalid(name, format!("{x} is out of range {min}..={max}"))),
        }
    }

    pub fn boolean(&self, name: &str) -> Result<bool, ConfigError> {
        Ok(self.typed::<bool>(name)?.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/configuration.md` carries the table these definitions render. Regenerate it
    /// with `UPDATE_DOCS=1 cargo test -p host config_docs`.
    #[test]
    fn config_docs_match_the_definitions() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let (begin, end) = ("<!-- keys:begin -->\n", "<!-- keys:end -->");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let block = format!("{begin}{}{end}", markdown_table());
        let expected = match (text.find(begin), text.find(end)) {
            (Some(b), Some(e)) if b < e => {
                format!("{}{block}{}", &text[..b], &text[e + end.len()..])
            }
            _ => format!("# Configuration\n\n{block}\n"),
        };
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, &expected).expect("write docs/configuration.md");
            return;
        }
        assert!(
            text == expected,
            "{} differs from the key definitions in host/src/config/keys.rs; regenerate it with \
             `UPDATE_DOCS=1 cargo test -p host config_docs`",
            path.display()
        );
    }

    #[test]
    fn every_default_reads_as_its_own_kind() {
        let empty = toml::Table::new();
        let reader = Reader::new(Path::new("/srv/app/host.toml"), "", &empty, &[]).unwrap();
        for k in KEYS {
            let ok = match k.kind {
                Kind::Count { .. } => reader.count(k.name).is_ok(),
                Kind::Size { .. } => reader.size(k.name).is_ok(),
                Kind::Duration { .. } => reader.duration(k.name).is_ok(),
                Kind::Fraction { .. } => reader.fraction(k.name).is_ok(),
                Kind::Bool => reader.boolean(k.name).is_ok(),
                Kind::Address | Kind::Path | Kind::Text => reader.typed::<String>(k.name).is_ok(),
                Kind::Paths => reader.typed::<Vec<String>>(k.name).is_ok(),
                Kind::Table => reader.typed::<toml::Table>(k.name).is_ok(),
            };
            assert!(ok, "{}: default {:?}", k.name, k.default);
        }
    }
}
