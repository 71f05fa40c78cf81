//! Forwards the plugin's `tracing` events to the host's logger.
//!
//! The plugin links its own `tracing`, whose global dispatcher is not the host's. This module
//! installs, inside the plugin, a small subscriber that turns each event into one line and hands
//! it to [`HostContext::log`](crate::ffi::HostContext). It owns no formatting policy beyond that:
//! the host decides how records look and where they go. Spans are accepted and ignored.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::ffi::{RawStr, level};

struct HostLogger {
    log: extern "C" fn(u8, RawStr, RawStr),
    max_level: u8,
    next_span: AtomicU64,
}

fn level_code(level: &Level) -> u8 {
    match *level {
        Level::ERROR => level::ERROR,
        Level::WARN => level::WARN,
        Level::INFO => level::INFO,
        Level::DEBUG => level::DEBUG,
        Level::TRACE => level::TRACE,
    }
}

struct Line(String);

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }
}

impl Subscriber for HostLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        level_code(metadata.level()) <= self.max_level
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        use tracing::level_filters::LevelFilter;
        Some(match self.max_level {
            0 => LevelFilter::OFF,
            level::ERROR => LevelFilter::ERROR,
            level::WARN => LevelFilter::WARN,
            level::INFO => LevelFilter::INFO,
            level::DEBUG => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        let meta = event.metadata();
        (self.log)(
            level_code(meta.level()),
            RawStr::new(meta.target().as_bytes()),
            RawStr::new(line.0.as_bytes()),
        );
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Installs the forwarding subscriber as the plugin's global default. Only the first call in a
/// process has an effect (a worker loads one plugin once).
pub(crate) fn install(log: extern "C" fn(u8, RawStr, RawStr), max_level: u8) {
    let logger = HostLogger {
        log,
        max_level,
        next_span: AtomicU64::new(1),
    };
    let _ = tracing::subscriber::set_global_default(logger);
}
