//! The functions behind `HostContext::metrics` (ABI 1.5): the plugin registers and updates its
//! metrics through them, and they write this worker's plugin series in its cell of the worker
//! table ([`crate::plugin_metrics`]), where the master reads them.
//!
//! Owns the worker's view of its series and the registration lock (registration finds or claims
//! a slot, so two threads must not claim the same one). A refused series is logged (at most one
//! line a second) and, when the bound was the reason, counted as `Limit::PluginSeries`. Every
//! function catches panics and never blocks beyond that lock; without a worker table every
//! series is refused. It never reads another worker's cell.

#![allow(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, OnceLock};

use plugin_api::ffi::{MetricsVTable, RawHeader, RawStr};

use crate::counters::{Counters, Limit};
use crate::plugin_metrics::{self, Refused};
use crate::ratelimit::RateLimit;
use crate::worker_table::PluginSeries;

static SERIES: OnceLock<(&'static PluginSeries, Option<&'static Counters>)> = OnceLock::new();
static REGISTER: Mutex<()> = Mutex::new(());
static REFUSED_WARNING: RateLimit = RateLimit::per_second();

/// This worker's series, before the plugin loads.
pub(super) fn install(series: &'static PluginSeries, counters: Option<&'static Counters>) {
    let _ = SERIES.set((series, counters));
}

pub(super) static METRICS_VTABLE: MetricsVTable = MetricsVTable {
    register,
    add,
    set,
    observe,
};

/// A view the plugin lends for the call, as text.
///
/// # Safety
/// `raw` must point to `len` readable bytes for the call (the ABI's rule for borrowed views).
unsafe fn text<'a>(raw: RawStr) -> Option<&'a str> {
    // SAFETY: the caller's contract.
    std::str::from_utf8(unsafe { raw.as_bytes() }).ok()
}

extern "C" fn register(
    kind: u8,
    name: RawStr,
    help: RawStr,
    labels: *const RawHeader,
    labels_len: usize,
    bounds: *const f64,
    bounds_len: usize,
) -> i64 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let (series, counters) = SERIES.get().copied()?;
        // SAFETY: the plugin lends every view for this call (`MetricsVTable::register`); the
        // lengths are bounded before anything is copied.
        let (name, help) = unsafe { (text(name), text(help)) };
        let Some((name, help)) = name.zip(help) else {
            refused(
                None,
                "?",
                &Refused::Bad("a name or help that is not UTF-8".into()),
            );
            return None;
        };
        if labels_len > plugin_metrics::LABELS || bounds_len > plugin_metrics::BOUNDS {
            refused(
                None,
                name,
                &Refused::Bad("too many labels or buckets".into()),
            );
            return None;
        }
        let labels: &[RawHeader] = if labels_len == 0 || labels.is_null() {
            &[]
        } else {
            // SAFETY: `labels_len` (at most 8) pairs lent for the call.
            unsafe { std::slice::from_raw_parts(labels, labels_len) }
        };
        let bounds: &[f64] = if bounds_len == 0 || bounds.is_null() {
            &[]
        } else {
            // SAFETY: `bounds_len` (at most 10) numbers lent for the call.
            unsafe { std::slice::from_raw_parts(bounds, bounds_len) }
        };
        let mut pairs = Vec::with_capacity(labels.len());
        for l in labels {
            // SAFETY: each pair's views are lent for the call.
            match unsafe { (text(l.name), text(l.value)) } {
                (Some(k), Some(v)) => pairs.push((k, v)),
                _ => {
                    refused(
                        None,
                        name,
                        &Refused::Bad("a label that is not UTF-8".into()),
                    );
                    return None;
                }
            }
        }
        let _one_at_a_time = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        match plugin_metrics::register(series, kind, name, help, &pairs, bounds) {
            Ok(i) => Some(i as i64),
            Err(e) => {
                refused(counters, name, &e);
                None
            }
        }
    }));
    result.ok().flatten().unwrap_or(-1)
}

fn refused(counters: Option<&'static Counters>, name: &str, why: &Refused) {
    if matches!(why, Refused::Full)
        && let Some(c) = counters
    {
        c.limit_hit(Limit::PluginSeries);
    }
    if let Some(more) = REFUSED_WARNING.hit_named("plugin metric refused") {
        tracing::warn!(
            metric = super::slow_paths::shorten(name),
            more_not_logged = more,
            "a plugin metric was refused, its updates count nothing: {why}"
        );
    }
}

extern "C" fn add(id: i64, delta: i64) {
    if let Some((series, _)) = SERIES.get() {
        let _ = catch_unwind(|| plugin_metrics::add(*series, id, delta));
    }
}

extern "C" fn set(id: i64, value: i64) {
    if let Some((series, _)) = SERIES.get() {
        let _ = catch_unwind(|| plugin_metrics::set(*series, id, value));
    }
}

extern "C" fn observe(id: i64, value: f64) {
    if let Some((series, _)) = SERIES.get() {
        let _ = catch_unwind(|| plugin_metrics::observe(*series, id, value));
    }
}
