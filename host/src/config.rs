//! The config file: raw TOML in, a checked [`Config`] out.
//!
//! Owns parsing, defaults and validation, and the rule that relative paths are relative to the
//! config file's directory. Every error is one line naming the file, the line and the key. It
//! does not touch the filesystem beyond reading the file: whether the plugin exists is the
//! reload's business, not the config's.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A checked configuration. All paths are absolute.
#[derive(Clone, Debug)]
pub struct Config {
    /// The config file this was read from (absolute).
    pub file: PathBuf,
    pub listen: SocketAddr,
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
    /// Load a plugin file (or one in a directory) that other users can write. Off by default:
    /// whoever can write the file chooses the native code this host runs.
    pub allow_writable_plugin: bool,
    /// Largest plugin file a reload snapshots.
    pub max_plugin_bytes: u64,
    /// A client must send a request's headers within this time (slowloris guard).
    pub header_read_timeout: Duration,
    /// Most header fields in one request; more get `431`.
    pub max_headers: usize,
    /// Most bytes of request line and headers; more get `431` (or `414` for a long URI).
    pub max_header_bytes: usize,
    /// Dev mode: reload by itself when the plugin file changes (or after `build` succeeds).
    pub watch: bool,
    /// Quiet time after the last change before reacting to a burst of them.
    pub watch_debounce: Duration,
    /// Build command (run with `sh -c` in the config file's directory) after a source change.
    pub build: Option<String>,
    /// What `build` watches (recursively); required with `build`.
    pub watch_paths: Vec<PathBuf>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    workers: Option<i64>,
    plugin: Option<String>,
    state_dir: Option<String>,
    graceful_timeout: Option<String>,
    start_timeout: Option<String>,
    idle_grace: Option<String>,
    max_body_bytes: Option<i64>,
    body_read_timeout: Option<String>,
    backlog: Option<i64>,
    keep_snapshots: Option<i64>,
    allow_writable_plugin: Option<bool>,
    max_plugin_bytes: Option<ByteSize>,
    header_read_timeout: Option<String>,
    max_headers: Option<i64>,
    max_header_bytes: Option<i64>,
    watch: Option<bool>,
    watch_debounce: Option<String>,
    build: Option<String>,
    watch_paths: Option<Vec<String>>,
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

impl Config {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        Config::parse(&file, &text)
    }

    /// Checks `text` as if read from `file` (absolute).
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
        let base = file.parent().unwrap_or(Path::new("/"));
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: file.to_path_buf(),
            line: line_of_key(text, key),
            key: key.to_string(),
            message,
        };
        let resolve = |p: &str| -> PathBuf {
            if Path::new(p).is_absolute() {
                p.into()
            } else {
                base.join(p)
            }
        };
        let duration =
            |key: &str, value: &Option<String>, default: &str| -> Result<Duration, ConfigError> {
                let s = value.as_deref().unwrap_or(default);
                let d = humantime::parse_duration(s).map_err(|e| {
                    invalid(
                        key,
                        format!("{s:?} is not a duration like \"250ms\" or \"30s\" ({e})"),
                    )
                })?;
                if d.is_zero() {
                    return Err(invalid(key, "must be greater than zero".into()));
                }
                Ok(d)
            };

        let listen_str = raw.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen = listen_str
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                invalid(
                    "listen",
                    format!("{listen_str:?} is not an address like \"127.0.0.1:8080\""),
                )
            })?;

        let workers = match raw.workers {
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            Some(n) if (1..=1024).contains(&n) => n as usize,
            Some(n) => return Err(invalid("workers", format!("{n} is out of range 1..=1024"))),
        };
        let plugin = match raw.plugin.as_deref() {
            Some("") => return Err(invalid("plugin", "must not be empty".into())),
            Some(p) => resolve(p),
            None => resolve("target/release/libexample_plugin.so"),
        };
        let state_dir = match raw.state_dir.as_deref() {
            Some("") => return Err(invalid("state_dir", "must not be empty".into())),
            Some(p) => resolve(p),
            None => resolve(".host"),
        };
        let max_body_bytes = match raw.max_body_bytes {
            None => 1 << 20,
            Some(n) if n >= 0 => n as usize,
            Some(n) => {
                return Err(invalid(
                    "max_body_bytes",
                    format!("{n} must not be negative"),
                ));
            }
        };
        let backlog = match raw.backlog {
            None => 1024,
            Some(n) if (1..=65535).contains(&n) => n as i32,
            Some(n) => return Err(invalid("backlog", format!("{n} is out of range 1..=65535"))),
        };
        let keep_snapshots = match raw.keep_snapshots {
            None => 3,
            Some(n) if (2..=1000).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "keep_snapshots",
                    format!("{n} is out of range 2..=1000"),
                ));
            }
        };
        let max_plugin_bytes = match raw.max_plugin_bytes.as_ref().map(ByteSize::bytes) {
            None => 512 << 20,
            Some(Ok(0)) => {
                return Err(invalid(
                    "max_plugin_bytes",
                    "must be greater than zero".into(),
                ));
            }
            Some(Ok(n)) => n,
            Some(Err(message)) => return Err(invalid("max_plugin_bytes", message)),
        };
        let max_headers = match raw.max_headers {
            None => 100,
            Some(n) if (1..=10_000).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "max_headers",
                    format!("{n} is out of range 1..=10000"),
                ));
            }
        };
        let max_header_bytes = match raw.max_header_bytes {
            None => 64 * 1024,
            Some(n) if (8192..=16 << 20).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "max_header_bytes",
                    format!("{n} is out of range 8192..=16777216"),
                ));
            }
        };
        let build = match raw.build.as_deref().map(str::trim) {
            Some("") => return Err(invalid("build", "must not be empty".into())),
            b => b.map(str::to_string),
        };
        let watch_paths: Vec<PathBuf> = raw
            .watch_paths
            .unwrap_or_default()
            .iter()
            .map(|p| resolve(p))
            .collect();
        if build.is_some() && watch_paths.is_empty() {
            return Err(invalid(
                "build",
                "needs `watch_paths`: the source directories whose changes run it".into(),
            ));
        }
        Ok(Config {
            file: file.to_path_buf(),
            listen,
            workers,
            plugin,
            state_dir,
            graceful_timeout: duration("graceful_timeout", &raw.graceful_timeout, "30s")?,
            start_timeout: duration("start_timeout", &raw.start_timeout, "10s")?,
            idle_grace: duration("idle_grace", &raw.idle_grace, "1s")?,
            max_body_bytes,
            body_read_timeout: duration("body_read_timeout", &raw.body_read_timeout, "30s")?,
            backlog,
            keep_snapshots,
            allow_writable_plugin: raw.allow_writable_plugin.unwrap_or(false),
            max_plugin_bytes,
            header_read_timeout: duration("header_read_timeout", &raw.header_read_timeout, "10s")?,
            max_headers,
            max_header_bytes,
            watch: raw.watch.unwrap_or(false) || build.is_some(),
            watch_debounce: duration("watch_debounce", &raw.watch_debounce, "300ms")?,
            build,
            watch_paths,
        })
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

    pub fn snapshot_dir(&self) -> PathBuf {
        self.state_dir.join("plugins")
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
    fn unknown_keys_are_refused() {
        let err = parse("wrokers = 2\n").unwrap_err().to_string();
        assert!(err.contains("wrokers"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
