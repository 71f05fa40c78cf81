//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), each line
//! prefixed with who wrote it (`master[pid]` or `worker[pid slot gen]`), so the interleaved
//! output of a master and its workers stays readable.

use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{DefaultFields, Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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

/// Installs the global subscriber. `prefix` tags every line this process writes.
pub fn init(prefix: String) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .fmt_fields(DefaultFields::new())
        .event_format(Prefixed {
            prefix,
            inner: Format::default().with_target(false),
        })
        .try_init();
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
