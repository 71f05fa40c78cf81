//! The access log (`access_log`): one line per request, in `log_format` (text or JSON), with
//! its time, method, path, status, duration, bytes in and out, generation and worker.
//!
//! Owns the queue and the writer thread. A request's [`Line`] rides on its response body and is
//! queued when the body is done or dropped (so duration and bytes out cover the whole
//! response); the I/O thread only moves it into a bounded queue ([`QUEUE`] lines) and never
//! waits: a line that finds the queue full is dropped. The writer thread formats the lines and
//! appends them in batches of whole lines, one `write` each; a failed write (a full disk, a file
//! it cannot open) drops its lines. Dropped lines are counted (`Limit::AccessLogDropped`) and
//! logged at most once a second; the worker serves on either way. The file is opened with
//! `O_APPEND` by each worker (lines of several workers interleave whole), and again by the
//! next workers after a reload: `host reload` is how a rotated file is let go of. It never
//! touches the response.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use super::clock::Stamp;
use crate::counters::{Counters, Limit};
use crate::logging::LogFormat;
use crate::ratelimit::RateLimit;

/// Lines waiting for the writer at most; more are dropped.
pub const QUEUE: usize = 16 * 1024;
/// The writer's batch: whole lines up to about this many bytes per `write`.
const BATCH_BYTES: usize = 64 * 1024;
/// Paths longer than this are cut (the line stays bounded whatever the client sends).
const MAX_PATH: usize = 2048;

static LOG: OnceLock<AccessLog> = OnceLock::new();
static DROPPED_WARNING: RateLimit = RateLimit::per_second();

struct AccessLog {
    tx: SyncSender<Message>,
    counters: Option<&'static Counters>,
}

enum Message {
    Entry(Entry),
    /// Everything before it is written: answered on the channel.
    Flush(SyncSender<()>),
}

/// One request, as the writer formats it.
struct Entry {
    time: SystemTime,
    method: http::Method,
    path: String,
    status: u16,
    duration_us: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// Starts the writer, once, before the worker serves: appending to `path`.
pub(super) fn start(
    path: PathBuf,
    format: LogFormat,
    generation: u64,
    counters: Option<&'static Counters>,
) {
    let (tx, rx) = sync_channel(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_loop(rx, path, format, generation, counters));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the access log's thread; no access log");
        return;
    }
    let _ = LOG.set(AccessLog { tx, counters });
}

/// Waits (at most `timeout`) until the lines queued so far are written: before the worker
/// exits.
pub(super) fn flush(timeout: Duration) {
    let Some(log) = LOG.get() else {
        return;
    };
    let (done_tx, done_rx) = sync_channel(1);
    // Never blocks: a full queue at exit loses the flush, not the exit.
    if log.tx.try_send(Message::Flush(done_tx)).is_ok() {
        let _ = done_rx.recv_timeout(timeout);
    }
}

/// A request's access-log line in the making: queued when dropped (with its response body).
pub struct Line {
    entry: Option<Entry>,
    began: Stamp,
}

impl Line {
    /// A line for a request that began at `began` (read now if `None`), or `None` without an
    /// access log.
    pub(super) fn begin(
        req: &http::Request<hyper::body::Incoming>,
        began: Option<Stamp>,
    ) -> Option<Line> {
        LOG.get()?;
        let path = req.uri().path();
        let path = match path.char_indices().nth(MAX_PATH) {
            Some((cut, _)) => &path[..cut],
            None => path,
        };
        let bytes_in = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        Some(Line {
            entry: Some(Entry {
                time: SystemTime::now(),
                method: req.method().clone(),
                path: path.to_string(),
                status: 0,
                duration_us: 0,
                bytes_in,
                bytes_out: 0,
            }),
            began: began.unwrap_or_else(Stamp::now),
        })
    }

    pub(super) fn status(&mut self, status: u16) {
        if let Some(e) = &mut self.entry {
            e.status = status;
        }
    }

    /// The request body's length as read whole (for a synchronous handler).
    pub(super) fn received(&mut self, n: usize) {
        if let Some(e) = &mut self.entry {
            e.bytes_in = n as u64;
        }
    }

    /// Counts response body bytes as they are sent.
    pub fn sent(&mut self, n: usize) {
        if let Some(e) = &mut self.entry {
            e.bytes_out += n as u64;
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let (Some(log), Some(mut entry)) = (LOG.get(), self.entry.take()) else {
            return;
        };
        entry.duration_us = Stamp::now().micros_since(self.began);
        match log.tx.try_send(Message::Entry(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => dropped(log.counters, 1, "its queue is full"),
            Err(TrySendError::Disconnected(_)) => {
                dropped(log.counters, 1, "its writer thread is gone")
            }
        }
    }
}

fn dropped(counters: Option<&'static Counters>, n: usize, why: &str) {
    if let Some(c) = counters {
        for _ in 0..n {
            c.limit_hit(Limit::AccessLogDropped);
        }
    }
    if let Some(more) = DROPPED_WARNING.hit_named("access log dropped") {
        tracing::warn!(
            lines = n,
            more_not_logged = more,
            "access log lines dropped: {why}"
        );
    }
}

fn write_loop(
    rx: Receiver<Message>,
    path: PathBuf,
    format: LogFormat,
    generation: u64,
    counters: Option<&'static Counters>,
) {
    let worker = std::process::id();
    let mut file: Option<std::fs::File> = None;
    let mut last_open_try: Option<std::time::Instant> = None;
    let mut buf = Vec::with_capacity(BATCH_BYTES * 2);
    while let Ok(first) = rx.recv() {
        buf.clear();
        let mut lines = 0;
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Entry(e) => {
                    format_entry(&mut buf, &e, format, generation, worker);
                    lines += 1;
                }
                Message::Flush(done) => flushes.push(done),
            }
            if buf.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if lines > 0 {
            if file.is_none() && last_open_try.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                last_open_try = Some(std::time::Instant::now());
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                {
                    Ok(f) => file = Some(f),
                    Err(e) => dropped(counters, 0, &format!("cannot open {}: {e}", path.display())),
                }
            }
            match file.as_mut().map(|f| f.write_all(&buf)) {
                Some(Ok(())) => {}
                Some(Err(e)) => dropped(
                    counters,
                    lines,
                    &format!("cannot write {}: {e}", path.display()),
                ),
                None => dropped(counters, lines, &format!("{} is not open", path.display())),
            }
        }
        for done in flushes {
            let _ = done.try_send(());
        }
    }
}

fn format_entry(buf: &mut Vec<u8>, e: &Entry, format: LogFormat, generation: u64, worker: u32) {
    let time = humantime::format_rfc3339_micros(e.time);
    let ms = e.duration_us as f64 / 1000.0;
    let _ = match format {
        LogFormat::Json => {
            let line = serde_json::json!({
                "time": time.to_string(),
                "method": e.method.as_str(),
                "path": e.path,
                "status": e.status,
                "duration_ms": ms,
                "bytes_in": e.bytes_in,
                "bytes_out": e.bytes_out,
                "generation": generation,
                "worker": worker,
            });
            writeln!(buf, "{line}")
        }
        LogFormat::Text => writeln!(
            buf,
            "{time} {} {} {} {ms:.3}ms in={} out={} gen={generation} worker={worker}",
            e.method, e.path, e.status, e.bytes_in, e.bytes_out
        ),
    };
}
