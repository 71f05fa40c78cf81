//! Forwards the plugin's `tracing` events, with the fields of their spans, to the host's logger.
//!
//! The plugin links its own `tracing`, whose global dispatcher is not the host's. This module
//! installs, inside the plugin, a `tracing-subscriber` registry (which keeps the spans, per
//! thread and across `.await` points for futures under [`tracing::Instrument`]) with a `fmt`
//! layer that writes each event as one line, its enclosing spans first, outermost first, as
//! `fmt` does: `req{id=7}:db{table="users"}: query done rows=3`. The line goes to
//! [`HostContext::log`](crate::ffi::HostContext) with the event's level and target. Timestamp,
//! level, target and colours are left out: the host adds its own, and decides where records go.
//! Events and spans above the host's `max_level` are disabled at their callsite.
//!
//! It owns no other formatting policy, and no span storage of its own.

use std::io;

use smallvec::SmallVec;
use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

use crate::ffi::{RawStr, level};

type LogFn = extern "C" fn(u8, RawStr, RawStr);

fn level_code(level: &Level) -> u8 {
    match *level {
        Level::ERROR => level::ERROR,
        Level::WARN => level::WARN,
        Level::INFO => level::INFO,
        Level::DEBUG => level::DEBUG,
        Level::TRACE => level::TRACE,
    }
}

fn level_filter(max_level: u8) -> LevelFilter {
    match max_level {
        0 => LevelFilter::OFF,
        level::ERROR => LevelFilter::ERROR,
        level::WARN => LevelFilter::WARN,
        level::INFO => LevelFilter::INFO,
        level::DEBUG => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// Makes one [`HostLine`] per event (the `fmt` layer asks for a writer per event).
struct ToHost {
    log: LogFn,
}

impl<'a> MakeWriter<'a> for ToHost {
    type Writer = HostLine;

    fn make_writer(&'a self) -> HostLine {
        HostLine {
            log: self.log,
            level: level::INFO,
            target: SmallVec::new(),
            pending: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> HostLine {
        HostLine {
            log: self.log,
            level: level_code(meta.level()),
            // Copied: the writer cannot borrow `meta`. Module paths fit inline, no allocation.
            target: SmallVec::from_slice(meta.target().as_bytes()),
            pending: Vec::new(),
        }
    }
}

/// One formatted event on its way to the host. A write that ends with a newline completes the
/// record and sends it at once, without copying (the `fmt` layer writes each event so, from its
/// own reused buffer); anything else is buffered and sent when the writer is flushed or dropped.
struct HostLine {
    log: LogFn,
    level: u8,
    target: SmallVec<[u8; 64]>,
    pending: Vec<u8>,
}

impl HostLine {
    fn send(&self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        (self.log)(self.level, RawStr::new(&self.target), RawStr::new(line));
    }
}

impl io::Write for HostLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pending.is_empty() && buf.ends_with(b"\n") {
            self.send(buf);
        } else {
            self.pending.extend_from_slice(buf);
            if self.pending.ends_with(b"\n") {
                self.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.send(&pending);
        }
        Ok(())
    }
}

impl Drop for HostLine {
    fn drop(&mut self) {
        let _ = io::Write::flush(self);
    }
}

/// The subscriber [`install`] makes global: the registry, the `max_level` filter, and a `fmt`
/// layer that writes to the host.
fn subscriber(log: LogFn, max_level: u8) -> impl Subscriber + Send + Sync {
    let fmt = tracing_subscriber::fmt::layer()
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_ansi(false)
        // The host's logger escapes control characters in the whole forwarded line; doing it
        // here too cost about 50 ns an event, and 100 ns more per span with fields.
        .with_ansi_sanitization(false)
        .with_writer(ToHost { log });
    tracing_subscriber::registry()
        .with(level_filter(max_level))
        .with(fmt)
}

/// Installs the forwarding subscriber as the plugin's global default. Only the first call in a
/// process has an effect (a worker loads one plugin once).
pub(crate) fn install(log: LogFn, max_level: u8) {
    let _ = tracing::subscriber::set_global_default(subscriber(log, max_level));
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing::Instrument;
    use tracing::instrument::WithSubscriber;

    use super::*;

    /// What the fake host logger received, in order: (level, target, message).
    static RECEIVED: Mutex<Vec<(u8, String, String)>> = Mutex::new(Vec::new());
    /// Tests share `RECEIVED`; each holds this while it runs.
    static SERIAL: Mutex<()> = Mutex::new(());

    extern "C" fn fake_host_log(level: u8, target: RawStr, message: RawStr) {
        // SAFETY: the views are valid for the duration of this call (the ABI's rule).
        let (target, message) = unsafe { (target.as_bytes(), message.as_bytes()) };
        RECEIVED.lock().unwrap().push((
            level,
            String::from_utf8(target.to_vec()).unwrap(),
            String::from_utf8(message.to_vec()).unwrap(),
        ));
    }

    /// Runs `f` under the forwarding subscriber and returns what the host received.
    fn logged(max_level: u8, f: impl FnOnce()) -> Vec<(u8, String, String)> {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        RECEIVED.lock().unwrap().clear();
        tracing::subscriber::with_default(subscriber(fake_host_log, max_level), f);
        std::mem::take(&mut *RECEIVED.lock().unwrap())
    }

    #[test]
    fn an_event_carries_the_fields_of_every_enclosing_span_outermost_first() {
        let got = logged(level::INFO, || {
            let _req = tracing::info_span!("req", id = 7).entered();
            let _inner = tracing::info_span!("inner", x = 1, name = "a").entered();
            tracing::warn!(k = "v", n = 3, "handled");
        });
        assert_eq!(
            got,
            [(
                level::WARN,
                module_path!().to_string(),
                r#"req{id=7}:inner{x=1 name="a"}: handled k="v" n=3"#.to_string()
            )]
        );
    }

    #[test]
    fn an_event_outside_spans_is_its_message_and_fields() {
        let got = logged(level::INFO, || {
            tracing::info!(target: "my::module", n = 1, "plain");
        });
        assert_eq!(
            got,
            [(level::INFO, "my::module".into(), "plain n=1".into())]
        );
    }

    #[test]
    fn fields_recorded_later_appear_and_exited_spans_do_not() {
        let got = logged(level::INFO, || {
            let span = tracing::info_span!("req", id = 7, status = tracing::field::Empty);
            span.in_scope(|| tracing::info!("first"));
            span.record("status", 200);
            span.in_scope(|| tracing::info!("second"));
            tracing::info!("after");
        });
        let messages: Vec<&str> = got.iter().map(|(_, _, m)| m.as_str()).collect();
        assert_eq!(
            messages,
            ["req{id=7}: first", "req{id=7 status=200}: second", "after"]
        );
    }

    #[test]
    fn events_and_spans_above_max_level_are_dropped() {
        let got = logged(level::INFO, || {
            let _debug = tracing::debug_span!("verbose", secret = 1).entered();
            tracing::debug!("not sent");
            tracing::info!("sent");
        });
        let messages: Vec<&str> = got.iter().map(|(_, _, m)| m.as_str()).collect();
        assert_eq!(messages, ["sent"]);
        assert!(logged(0, || tracing::error!("off")).is_empty());
    }

    #[test]
    fn spans_follow_a_future_across_await_points_and_threads() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let got = logged(level::INFO, || {
            rt.block_on(async {
                let tasks: Vec<_> = (0..4)
                    .map(|id| {
                        tokio::spawn(
                            async move {
                                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                                tokio::task::yield_now().await;
                                tracing::info!("woke");
                            }
                            .instrument(tracing::info_span!("task", id))
                            // In a plugin the subscriber is global; here it is this
                            // thread's, so each task carries it to the runtime's threads.
                            .with_current_subscriber(),
                        )
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            });
        });
        let mut messages: Vec<&str> = got.iter().map(|(_, _, m)| m.as_str()).collect();
        messages.sort();
        assert_eq!(
            messages,
            [
                "task{id=0}: woke",
                "task{id=1}: woke",
                "task{id=2}: woke",
                "task{id=3}: woke"
            ]
        );
    }

    #[test]
    fn a_record_written_in_pieces_is_sent_once_whole() {
        let got = logged(level::INFO, || {
            use std::io::Write as _;
            let to_host = ToHost { log: fake_host_log };
            let mut w = to_host.make_writer();
            w.write_all(b"part one, ").unwrap();
            w.write_all(b"part two").unwrap();
            drop(w);
        });
        assert_eq!(
            got,
            [(level::INFO, String::new(), "part one, part two".into())]
        );
    }
}
