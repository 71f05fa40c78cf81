//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), each line saying
//! which process wrote it (`master[pid]`, `worker[pid slot gen]`, `gateway[pid group slot gen]`,
//! `check[pid]`), so the
//! interleaved output of a master and its workers stays readable.
//!
//! Two formats ([`LogFormat`], config `log_format`): `text`, tracing-subscriber's `fmt` line after
//! the process prefix; and `json`, one object per line (tracing-subscriber's JSON formatter, event
//! fields flattened next to `timestamp`, `level`, `message` and `target`) with the same prefix as a
//! `process` object. Workers are told the format on their command line by the master, since they
//! start logging before their spec arrives. This module only formats; it never decides where a
//! process's stderr goes.

use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{DefaultFields, Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written (config `log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `master[4690] 2026-11-22T05:19:34.980205Z  INFO message k=v`
    #[default]
    Text,
    /// `{"timestamp":"...","level":"INFO","message":"...","k":"v","target":"...","process":{...}}`
    Json,
}

impl LogFormat {
    /// The config value (and `--log-format` argument) that names it.
    pub const fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    pub fn from_name(name: &str) -> Option<LogFormat> {
        [LogFormat::Text, LogFormat::Json]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// Set by the master in a worker's environment when the config file has `[[group]]` tables:
/// the worker's group, which its log lines name.
pub const GROUP_ENV: &str = "HOST_GROUP";

/// This worker's group, from [`GROUP_ENV`] (`None`: a file without groups).
fn worker_group() -> Option<String> {
    std::env::var(GROUP_ENV).ok().filter(|g| !g.is_empty())
}

/// Which process writes the lines.
#[derive(Clone, Copy, Debug)]
pub enum Process {
    Master,
    Worker {
        slot: u32,
        generation: u64,
    },
    /// A gateway process (`__gateway`), named as a worker is.
    Gateway {
        slot: u32,
        generation: u64,
    },
    /// The throwaway worker of `host check`.
    Check,
}

impl Process {
    /// The text format's prefix: `master[4690]`, `worker[4704 slot=0 gen=1]`,
    /// `gateway[4705 group=gw slot=0 gen=1]`, `check[4801]`.
    fn prefix(self, pid: u32) -> String {
        match self {
            Process::Master => format!("master[{pid}]"),
            Process::Worker { slot, generation } | Process::Gateway { slot, generation } => {
                let role = self.role();
                match worker_group() {
                    Some(group) => {
                        format!("{role}[{pid} group={group} slot={slot} gen={generation}]")
                    }
                    None => format!("{role}[{pid} slot={slot} gen={generation}]"),
                }
            }
            Process::Check => format!("check[{pid}]"),
        }
    }

    fn role(self) -> &'static str {
        match self {
            Process::Master => "master",
            Process::Worker { .. } => "worker",
            Process::Gateway { .. } => "gateway",
            Process::Check => "check",
        }
    }

    /// The same, as the JSON format's `process` object.
    fn json(self, pid: u32) -> String {
        let value = match self {
            Process::Master => serde_json::json!({ "role": "master", "pid": pid }),
            Process::Worker { slot, generation } | Process::Gateway { slot, generation } => {
                let role = self.role();
                match worker_group() {
                    Some(group) => serde_json::json!({
                        "role": role, "pid": pid, "group": group, "slot": slot,
                        "generation": generation
                    }),
                    None => serde_json::json!({
                        "role": role, "pid": pid, "slot": slot, "generation": generation
                    }),
                }
            }
            Process::Check => serde_json::json!({ "role": "check", "pid": pid }),
        };
        value.to_string()
    }
}

/// The text format: the process prefix, then `fmt`'s line.
struct Prefixed {
    prefix: String,
    inner: Format,
}

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "{} ", self.prefix)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// The JSON format: tracing-subscriber's object, with the process added as its last member.
struct JsonLine {
    /// The `process` object, as JSON text.
    process: String,
    inner: Format<Json>,
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&with_member(&line, "process", &self.process))
    }
}

/// `object` (one JSON object, possibly followed by a newline) with `"key":value` added last,
/// newline-terminated. Anything that is not an object is passed through.
fn with_member(object: &str, key: &str, value: &str) -> String {
    let body = object.trim_end();
    match body.strip_suffix('}') {
        Some(open) => {
            let comma = if open.trim_end().ends_with('{') {
                ""
            } else {
                ","
            };
            format!("{open}{comma}\"{key}\":{value}}}\n")
        }
        None => format!("{body}\n"),
    }
}

/// Installs the global subscriber for `process` (this process), writing `format`.
pub fn init(process: Process, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pid = std::process::id();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(DefaultFields::new())
            .event_format(Prefixed {
                prefix: process.prefix(pid),
                inner: Format::default().with_target(false),
            })
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine {
                process: process.json(pid),
                inner: Format::default().json().flatten_event(true),
            })
            .try_init(),
    };
}

/// The most verbose level enabled anywhere, as a `plugin_api::ffi::level` code.
pub fn max_level_code() -> u8 {
    use plugin_api::ffi::level;
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => level::ERROR,
        LevelFilter::WARN => level::WARN,
        LevelFilter::INFO => level::INFO,
        LevelFilter::DEBUG => level::DEBUG,
        _ => level::TRACE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_is_added_as_the_last_member() {
        let line = with_member(
            "{\"level\":\"INFO\",\"message\":\"a}\"}\n",
            "process",
            &Process::Worker {
                slot: 1,
                generation: 2,
            }
            .json(7),
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["message"], "a}");
        assert_eq!(v["process"]["role"], "worker");
        assert_eq!(v["process"]["slot"], 1);
        assert_eq!(v["process"]["generation"], 2);
        assert!(line.ends_with("}\n") && line.lines().count() == 1);
        assert_eq!(with_member("{}", "k", "1"), "{\"k\":1}\n");
    }

    #[test]
    fn formats_round_trip_through_their_names() {
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(LogFormat::from_name(f.name()), Some(f));
        }
        assert_eq!(LogFormat::from_name("yaml"), None);
    }
}
