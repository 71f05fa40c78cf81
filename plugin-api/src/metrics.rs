//! The plugin's own metrics: counters, gauges and histograms with labels, which the master
//! serves on `/metrics` beside the host's, summed over the workers of a generation and labelled
//! with it. The values live in memory the master reads, not in the plugin: they never go
//! backwards when a worker is replaced, recycled or crashes.
//!
//! ```no_run
//! use plugin_api::metrics::{Counter, Histogram};
//!
//! // Once, e.g. in `on_worker_start`; handles are `Copy` and cheap to keep.
//! let orders = Counter::new("shop_orders_total", "Orders placed", &[("kind", "web")]);
//! let took = Histogram::new("shop_checkout_seconds", "Checkout time", &[], &[0.01, 0.1, 1.0]);
//! orders.inc();
//! took.observe(0.042);
//! ```
//!
//! Owns the handles and the host's functions behind them ([`MetricsVTable`]); it keeps no
//! value itself. Registering the same kind, name and labels again gives the same series. A
//! worker holds at most 256 series: past that, and for a bad name, label or bucket list, a
//! handle is inert (its updates count nothing) and the host logs why; [`Counter::is_live`]
//! says which. Names follow Prometheus (`[a-zA-Z_:][a-zA-Z0-9_:]*`, at most 64 bytes, not
//! starting with `host_`); a counter's `_total` suffix is the exposition's own. Up to 8
//! labels, 128 bytes of names and values together; up to 10 histogram buckets. Under a host
//! older than ABI 1.5 every handle is inert.

use std::sync::OnceLock;

use crate::ffi::{MetricsVTable, RawHeader, RawStr, metric_kind};

static HOST: OnceLock<&'static MetricsVTable> = OnceLock::new();

pub(crate) fn install(vtable: *const MetricsVTable) {
    // SAFETY: the host passes null or a pointer to a `'static` vtable (`HostContext::metrics`).
    if let Some(vt) = unsafe { vtable.as_ref() } {
        let _ = HOST.set(vt);
    }
}

fn register(kind: u8, name: &str, help: &str, labels: &[(&str, &str)], bounds: &[f64]) -> i64 {
    let Some(host) = HOST.get() else {
        return -1;
    };
    let raw: Vec<RawHeader> = labels
        .iter()
        .map(|(k, v)| RawHeader {
            name: RawStr::new(k.as_bytes()),
            value: RawStr::new(v.as_bytes()),
        })
        .collect();
    (host.register)(
        kind,
        RawStr::new(name.as_bytes()),
        RawStr::new(help.as_bytes()),
        raw.as_ptr(),
        raw.len(),
        bounds.as_ptr(),
        bounds.len(),
    )
}

/// A counter: only goes up.
#[derive(Clone, Copy, Debug)]
pub struct Counter(i64);

impl Counter {
    pub fn new(name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        Counter(register(metric_kind::COUNTER, name, help, labels, &[]))
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        if let (true, Some(host)) = (self.0 >= 0, HOST.get()) {
            (host.add)(self.0, n.min(i64::MAX as u64) as i64);
        }
    }

    /// Whether the host keeps this series (false: refused, or an old host).
    pub fn is_live(&self) -> bool {
        self.0 >= 0
    }
}

/// A gauge: a signed number set or moved; the master reports the sum over the live workers.
#[derive(Clone, Copy, Debug)]
pub struct Gauge(i64);

impl Gauge {
    pub fn new(name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        Gauge(register(metric_kind::GAUGE, name, help, labels, &[]))
    }

    pub fn set(&self, value: i64) {
        if let (true, Some(host)) = (self.0 >= 0, HOST.get()) {
            (host.set)(self.0, value);
        }
    }

    pub fn add(&self, delta: i64) {
        if let (true, Some(host)) = (self.0 >= 0, HOST.get()) {
            (host.add)(self.0, delta);
        }
    }

    pub fn is_live(&self) -> bool {
        self.0 >= 0
    }
}

/// A histogram over fixed buckets (their increasing upper bounds; `+Inf` is implied).
#[derive(Clone, Copy, Debug)]
pub struct Histogram(i64);

impl Histogram {
    pub fn new(name: &str, help: &str, labels: &[(&str, &str)], bounds: &[f64]) -> Histogram {
        Histogram(register(metric_kind::HISTOGRAM, name, help, labels, bounds))
    }

    pub fn observe(&self, value: f64) {
        if let (true, Some(host)) = (self.0 >= 0, HOST.get()) {
            (host.observe)(self.0, value);
        }
    }

    pub fn is_live(&self) -> bool {
        self.0 >= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_host_every_handle_is_inert() {
        let c = Counter::new("c_total", "", &[]);
        c.inc();
        assert!(!c.is_live());
        let g = Gauge::new("g", "", &[]);
        g.set(3);
        assert!(!g.is_live());
        let h = Histogram::new("h", "", &[], &[1.0]);
        h.observe(0.5);
        assert!(!h.is_live());
    }
}
