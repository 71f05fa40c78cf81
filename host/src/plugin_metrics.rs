//! Plugin metrics in the worker table: each worker's cell holds [`SERIES`] slots, one per
//! series its plugin registered (kind, name, help, labels, histogram bounds, values). The
//! worker writes them through the functions it gives the plugin (`MetricsVTable`); the master
//! reads them for `/metrics` while the worker runs and folds the counters and histograms into
//! its generation's total when it is reaped, as it does the request counters (see
//! `worker_table`).
//!
//! Owns the slot layout, registration (validation, the bound) and the defensive read. A plugin
//! can write anything into its cell through the mapping, so [`read`] trusts nothing: lengths
//! are clamped, names and labels validated again (an invalid series is skipped), kinds checked,
//! bounds required finite and increasing; values are only numbers. It never formats metrics
//! (`master::admin` does) and never decides what is kept (`master::supervisor::metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Series a worker holds at most; more are refused (counted as `Limit::PluginSeries`).
pub const SERIES: usize = 256;
const NAME_WORDS: usize = 8;
const HELP_WORDS: usize = 12;
const LABEL_WORDS: usize = 16;
/// Histogram buckets at most, `+Inf` not included.
pub const BOUNDS: usize = 10;
/// Labels a series has at most.
pub const LABELS: usize = 8;
/// Names that are the host's own.
const RESERVED_PREFIX: &str = "host_";
/// Labels the master puts on every plugin series itself.
const RESERVED_LABELS: [&str; 4] = ["generation", "plugin", "version", "sha256"];
/// Between a label's name and value, and after each label, in the stored labels.
const KV: u8 = 0x1f;
const END: u8 = 0x1e;

pub const COUNTER: u8 = 1;
pub const GAUGE: u8 = 2;
pub const HISTOGRAM: u8 = 3;

/// One series: `head` is 0 while free, else `kind << 56 | bounds << 48 | help_len << 32 |
/// labels_len << 16 | name_len`, written last (Release) and read first.
#[repr(C)]
#[derive(Default)]
pub struct Series {
    head: AtomicU64,
    name: [AtomicU64; NAME_WORDS],
    help: [AtomicU64; HELP_WORDS],
    labels: [AtomicU64; LABEL_WORDS],
    /// A counter's count, a gauge's value (`i64` bits), a histogram's count.
    value: AtomicU64,
    /// A histogram's sum (`f64` bits).
    sum: AtomicU64,
    bounds: [AtomicU64; BOUNDS],
    buckets: [AtomicU64; BOUNDS + 1],
}

/// A series as read: validated, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub kind: u8,
    pub name: String,
    pub help: String,
    pub labels: Vec<(String, String)>,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(i64),
    Histogram {
        bounds: Vec<f64>,
        /// Per bucket (not cumulative), `+Inf` last.
        buckets: Vec<u64>,
        sum: f64,
    },
}

/// Why a series was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refused {
    #[error("the worker holds {SERIES} plugin series already")]
    Full,
    #[error("bad metric: {0}")]
    Bad(String),
}

fn valid_name(name: &str, label: bool) -> bool {
    let mut chars = name.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (!label && c == ':');
    matches!(chars.next(), Some(c) if first_ok(c))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (!label && c == ':'))
}

fn store_bytes(words: &[AtomicU64], bytes: &[u8]) {
    for (word, chunk) in words.iter().zip(bytes.chunks(8)) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        word.store(u64::from_le_bytes(w), Ordering::Relaxed);
    }
}

fn load_bytes(words: &[AtomicU64], len: usize) -> Vec<u8> {
    words
        .iter()
        .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
        .take(len.min(words.len() * 8))
        .collect()
}

fn encode_labels(labels: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in labels {
        out.extend_from_slice(k.as_bytes());
        out.push(KV);
        out.extend_from_slice(v.as_bytes());
        out.push(END);
    }
    out
}

fn decode_labels(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut out = Vec::new();
    for pair in text.split(END as char).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once(KV as char)?;
        if !valid_name(k, true) || RESERVED_LABELS.contains(&k) || v.contains(KV as char) {
            return None;
        }
        out.push((k.to_string(), v.to_string()));
    }
    (out.len() <= LABELS).then_some(out)
}

/// Checks a series the plugin asks for: `None` if it is fine.
fn check(
    kind: u8,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
    bounds: &[f64],
) -> Option<String> {
    if !matches!(kind, COUNTER | GAUGE | HISTOGRAM) {
        return Some(format!("unknown kind {kind}"));
    }
    if name.len() > NAME_WORDS * 8 || !valid_name(name, false) {
        return Some(format!(
            "{name:?} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most 64 bytes)"
        ));
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Some(format!(
            "{name:?}: names starting with host_ are the host's"
        ));
    }
    if help.len() > HELP_WORDS * 8 {
        return Some(format!(
            "{name}: the help text is over {} bytes",
            HELP_WORDS * 8
        ));
    }
    if labels.len() > LABELS {
        return Some(format!("{name}: more than {LABELS} labels"));
    }
    for (k, v) in labels {
        if !valid_name(k, true) || RESERVED_LABELS.contains(k) {
            return Some(format!("{name}: {k:?} is not a label name it may use"));
        }
        if v.bytes().any(|b| b == KV || b == END) {
            return Some(format!("{name}: label {k} has a control character"));
        }
    }
    let mut seen: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != labels.len() {
        return Some(format!("{name}: a label given twice"));
    }
    if encode_labels(labels).len() > LABEL_WORDS * 8 {
        return Some(format!("{name}: labels over {} bytes", LABEL_WORDS * 8));
    }
    if kind == HISTOGRAM
        && (bounds.is_empty()
            || bounds.len() > BOUNDS
            || bounds.iter().any(|b| !b.is_finite())
            || bounds.windows(2).any(|w| w[0] >= w[1]))
    {
        return Some(format!(
            "{name}: histogram bounds must be 1 to {BOUNDS} finite, increasing numbers"
        ));
    }
    None
}

/// Registers a series in `slots` (a worker's own, from one thread at a time), or finds the one
/// with the same kind, name and labels: its index.
pub fn register(
    slots: &[Series],
    kind: u8,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
    bounds: &[f64],
) -> Result<usize, Refused> {
    if let Some(why) = check(kind, name, help, labels, bounds) {
        return Err(Refused::Bad(why));
    }
    let encoded = encode_labels(labels);
    let mut free = None;
    for (i, s) in slots.iter().enumerate() {
        let head = s.head.load(Ordering::Acquire);
        if head == 0 {
            free.get_or_insert(i);
            continue;
        }
        let name_len = (head & 0xffff) as usize;
        let labels_len = ((head >> 16) & 0xffff) as usize;
        if (head >> 56) as u8 == kind
            && load_bytes(&s.name, name_len) == name.as_bytes()
            && load_bytes(&s.labels, labels_len) == encoded
        {
            return Ok(i);
        }
    }
    let i = free.ok_or(Refused::Full)?;
    let s = &slots[i];
    store_bytes(&s.name, name.as_bytes());
    store_bytes(&s.help, help.as_bytes());
    store_bytes(&s.labels, &encoded);
    let bounds = if kind == HISTOGRAM { bounds } else { &[] };
    for (slot, b) in s.bounds.iter().zip(bounds) {
        slot.store(b.to_bits(), Ordering::Relaxed);
    }
    let head = u64::from(kind) << 56
        | (bounds.len() as u64) << 48
        | (help.len() as u64) << 32
        | (encoded.len() as u64) << 16
        | name.len() as u64;
    s.head.store(head, Ordering::Release);
    Ok(i)
}

fn kind_of(s: &Series) -> u8 {
    (s.head.load(Ordering::Relaxed) >> 56) as u8
}

/// Adds `delta` to a counter (negative deltas ignored) or a gauge.
pub fn add(slots: &[Series], id: i64, delta: i64) {
    let Some(s) = usize::try_from(id).ok().and_then(|i| slots.get(i)) else {
        return;
    };
    match kind_of(s) {
        COUNTER if delta > 0 => {
            s.value.fetch_add(delta as u64, Ordering::Relaxed);
        }
        GAUGE => {
            s.value.fetch_add(delta as u64, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Sets a gauge.
pub fn set(slots: &[Series], id: i64, value: i64) {
    if let Some(s) = usize::try_from(id).ok().and_then(|i| slots.get(i))
        && kind_of(s) == GAUGE
    {
        s.value.store(value as u64, Ordering::Relaxed);
    }
}

/// Records one observation in a histogram (NaN ignored).
pub fn observe(slots: &[Series], id: i64, value: f64) {
    let Some(s) = usize::try_from(id).ok().and_then(|i| slots.get(i)) else {
        return;
    };
    let head = s.head.load(Ordering::Relaxed);
    if (head >> 56) as u8 != HISTOGRAM || value.is_nan() {
        return;
    }
    let n = (((head >> 48) & 0xff) as usize).min(BOUNDS);
    let bucket = s.bounds[..n]
        .iter()
        .position(|b| value <= f64::from_bits(b.load(Ordering::Relaxed)))
        .unwrap_or(n);
    s.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    let _ = s
        .sum
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    s.value.fetch_add(1, Ordering::Relaxed);
}

/// Every valid series in `slots`; exact for a worker that is dead, a snapshot for a live one.
pub fn read(slots: &[Series]) -> Vec<Sample> {
    slots.iter().filter_map(read_one).collect()
}

fn read_one(s: &Series) -> Option<Sample> {
    let head = s.head.load(Ordering::Acquire);
    if head == 0 {
        return None;
    }
    let kind = (head >> 56) as u8;
    let name = String::from_utf8(load_bytes(&s.name, (head & 0xffff) as usize)).ok()?;
    let help = String::from_utf8_lossy(&load_bytes(&s.help, ((head >> 32) & 0xffff) as usize))
        .into_owned();
    let labels = decode_labels(&load_bytes(&s.labels, ((head >> 16) & 0xffff) as usize))?;
    if !valid_name(&name, false) || name.starts_with(RESERVED_PREFIX) {
        return None;
    }
    let value = match kind {
        COUNTER => Value::Counter(s.value.load(Ordering::Relaxed)),
        GAUGE => Value::Gauge(s.value.load(Ordering::Relaxed) as i64),
        HISTOGRAM => {
            let n = ((head >> 48) & 0xff) as usize;
            if n == 0 || n > BOUNDS {
                return None;
            }
            let bounds: Vec<f64> = s.bounds[..n]
                .iter()
                .map(|b| f64::from_bits(b.load(Ordering::Relaxed)))
                .collect();
            if bounds.iter().any(|b| !b.is_finite()) || bounds.windows(2).any(|w| w[0] >= w[1]) {
                return None;
            }
            let buckets = s.buckets[..=n]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            let sum = f64::from_bits(s.sum.load(Ordering::Relaxed));
            Value::Histogram {
                bounds,
                buckets,
                sum: if sum.is_finite() { sum } else { 0.0 },
            }
        }
        _ => return None,
    };
    Some(Sample {
        kind,
        name,
        help,
        labels,
        value,
    })
}

/// A bucket's count as reported: small enough that a sum over every bucket of every worker
/// cannot overflow, whatever a plugin wrote into its cell.
fn clamp_count(n: u64) -> u64 {
    n.min(u64::MAX >> 16)
}

/// Series added up by kind, name and labels: the master's sums over workers.
#[derive(Clone, Debug, Default)]
pub struct Sums(std::collections::BTreeMap<SeriesKey, Sample>);

/// A series' identity: name, kind, labels.
type SeriesKey = (String, u8, Vec<(String, String)>);

impl Sums {
    /// Adds `samples` (gauges only with `gauges`: a dead worker's gauge is gone); keeps at
    /// most `max` series. Returns how many new series did not fit.
    pub fn add(&mut self, samples: &[Sample], gauges: bool, max: usize) -> u64 {
        let mut dropped = 0;
        for sample in samples {
            if sample.kind == GAUGE && !gauges {
                continue;
            }
            let key = (sample.name.clone(), sample.kind, sample.labels.clone());
            let full = self.0.len() >= max;
            match self.0.get_mut(&key) {
                Some(sum) => merge(&mut sum.value, &sample.value),
                None if !full => {
                    let mut fresh = sample.clone();
                    merge(&mut fresh.value, &Value::Counter(0));
                    self.0.insert(key, fresh);
                }
                None => dropped += 1,
            }
        }
        dropped
    }

    /// Every series, by name (a name's first kind wins: a series of another kind under the
    /// same name is left out, as the exposition format requires).
    pub fn samples(&self) -> Vec<&Sample> {
        let mut kinds: std::collections::BTreeMap<&str, u8> = std::collections::BTreeMap::new();
        self.0
            .values()
            .filter(|s| *kinds.entry(&s.name).or_insert(s.kind) == s.kind)
            .collect()
    }
}

/// Adds `b` into `a` when they are alike (same kind, same buckets); counts wrap, as the
/// host's do, and bucket counts are clamped (see [`clamp_count`]).
fn merge(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Counter(x), Value::Counter(y)) => *x = x.wrapping_add(*y),
        (Value::Gauge(x), Value::Gauge(y)) => *x = x.wrapping_add(*y),
        (
            Value::Histogram {
                bounds,
                buckets,
                sum,
            },
            Value::Histogram {
                bounds: b2,
                buckets: k2,
                sum: s2,
            },
        ) if bounds == b2 => {
            for (x, y) in buckets.iter_mut().zip(k2) {
                *x = clamp_count(clamp_count(*x).saturating_add(clamp_count(*y)));
            }
            *sum += s2;
        }
        (Value::Histogram { buckets, .. }, _) => {
            for x in buckets.iter_mut() {
                *x = clamp_count(*x);
            }
        }
        _ => {}
    }
}

/// Frees every slot, for the cell's next worker.
pub fn reset(slots: &[Series]) {
    for s in slots {
        s.head.store(0, Ordering::Release);
        s.value.store(0, Ordering::Relaxed);
        s.sum.store(0, Ordering::Relaxed);
        for b in &s.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<Series> {
        (0..n).map(|_| Series::default()).collect()
    }

    #[test]
    fn a_series_registers_once_counts_and_reads_back() {
        let s = slots(4);
        let a = register(&s, COUNTER, "req_total", "Requests", &[("route", "/")], &[]).unwrap();
        let b = register(&s, COUNTER, "req_total", "Requests", &[("route", "/")], &[]).unwrap();
        assert_eq!(a, b);
        let c = register(
            &s,
            COUNTER,
            "req_total",
            "Requests",
            &[("route", "/x")],
            &[],
        )
        .unwrap();
        assert_ne!(a, c);
        add(&s, a as i64, 2);
        add(&s, a as i64, -5);
        let h = register(&s, HISTOGRAM, "took", "", &[], &[0.1, 1.0]).unwrap();
        observe(&s, h as i64, 0.5);
        observe(&s, h as i64, 5.0);
        let read = read(&s);
        assert_eq!(read[0].value, Value::Counter(2));
        assert_eq!(read[0].labels, vec![("route".into(), "/".into())]);
        assert_eq!(
            read[2].value,
            Value::Histogram {
                bounds: vec![0.1, 1.0],
                buckets: vec![0, 1, 1],
                sum: 5.5
            }
        );
        let g = register(&s, GAUGE, "depth", "", &[], &[]).unwrap();
        assert_eq!(g, 3);
        assert_eq!(
            register(&s, GAUGE, "depth2", "", &[], &[]),
            Err(Refused::Full)
        );
    }

    #[test]
    fn bad_series_are_refused_and_garbage_is_skipped() {
        let s = slots(2);
        for (name, labels, bounds) in [
            ("9x", vec![], vec![]),
            ("host_x", vec![], vec![]),
            ("x", vec![("generation", "1")], vec![]),
            ("x", vec![("a-b", "1")], vec![]),
            ("x", vec![("a", "1"), ("a", "2")], vec![]),
        ] {
            assert!(register(&s, COUNTER, name, "", &labels, &bounds).is_err());
        }
        assert!(register(&s, HISTOGRAM, "h", "", &[], &[1.0, 0.5]).is_err());
        assert!(register(&s, HISTOGRAM, "h", "", &[], &[f64::NAN]).is_err());
        // Whatever a plugin writes into its cell, reading it is only numbers or nothing.
        for word in [u64::MAX, 0x0300_ffff_ffff_ffff, 0x01ff_0000_0000_0040] {
            s[0].head.store(word, Ordering::Relaxed);
            s[0].name[0].store(u64::MAX, Ordering::Relaxed);
            let _ = read(&s);
        }
        add(&s, -1, 1);
        add(&s, 1 << 40, 1);
        observe(&s, 7, 1.0);
    }
}
