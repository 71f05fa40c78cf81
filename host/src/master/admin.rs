//! The admin listener: `GET /metrics` on `admin_listen`, in the Prometheus (OpenMetrics) text
//! format, served by the master itself.
//!
//! Owns the admin socket, its tiny HTTP handling (hyper's HTTP/1 server, one request per
//! connection), and the exposition: turning a [`MetricsReport`] into text. It decides nothing
//! and counts nothing: each scrape asks the supervisor for a report through an
//! [`Event::Metrics`] (the supervisor adds up its workers' shared counters and what it folded
//! from exited ones, see `supervisor::metrics`), then formats it. It never touches the public
//! listener: workers serve that one, and the admin socket is close-on-exec, so no worker holds it.
//!
//! The master's runtime is single-threaded, so nothing here may stall it or use up its fds:
//! a client must send its request head within [`READ_DEADLINE`], a connection lives at most
//! [`CONNECTION_DEADLINE`], at most [`MAX_CONNECTIONS`] are open (one more closes the oldest),
//! and accept errors are logged at most once a second and retried with backoff: the accept
//! loop is the control socket's ([`accept_loop`](super::accept_loop)).
//!
//! The format comes from `prometheus-client`, the Prometheus project's own Rust client: it
//! writes the OpenMetrics text that Prometheus negotiates by default (and that it parses
//! strictly), with names, `_total` suffixes, units, label escaping and `# EOF` right. Its custom
//! [`Collector`] lets the report be written as it is, histogram buckets included, without
//! copying it into live metric objects on every scrape.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::accept_loop::Server;
use super::supervisor::{Event, GenerationMetrics, MetricsReport};
use crate::counters::{BUCKETS_US, Limit, Totals};

/// A client must send its request head this long after the master accepted the connection.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);
/// A connection (request and answer) lasts at most this long.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Most admin connections open at once (Prometheus scrapes one at a time).
pub const MAX_CONNECTIONS: usize = 16;
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the admin listener (called before any worker is spawned; the socket is close-on-exec).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(64)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// For a master started by `host upgrade`: binds `addr` once the old master has let go of it
/// (it does at the hand-over), retrying for up to 30 s, then serves like [`serve`]. Never
/// blocks the master: the retries are timers.
pub async fn serve_after_hand_over(
    addr: SocketAddr,
    events: mpsc::UnboundedSender<Event>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let listener = loop {
        match bind(addr) {
            Ok(listener) => break listener,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                tracing::error!(%addr, error = %e, "cannot bind admin_listen after the upgrade; /metrics is not served");
                return;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    tracing::info!(%addr, "serving /metrics");
    serve(listener, events, shutdown).await
}

/// The admin listener, as the accept loop serves it.
struct AdminServer {
    events: mpsc::UnboundedSender<Event>,
}

impl Server for AdminServer {
    type Listener = TcpListener;
    const WHAT: &'static str = "admin listener";
    const CONNECTION: &'static str = "admin connection";
    // Prometheus scrapes one at a time: the oldest open connection is the stale one.
    const EVICT_ANY: bool = true;

    fn cap(&self) -> usize {
        MAX_CONNECTIONS
    }

    fn serve(
        &self,
        stream: tokio::net::TcpStream,
        _requested: Arc<AtomicBool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        connection(stream, self.events.clone())
    }
}

/// Serves `/metrics` until `shutdown` fires. See the module doc for the limits it enforces
/// ([`accept_loop`](super::accept_loop) enforces them).
pub async fn serve(
    mut listener: TcpListener,
    events: mpsc::UnboundedSender<Event>,
    shutdown: oneshot::Receiver<()>,
) {
    let mut server = AdminServer { events };
    let mut clients = super::accept_loop::run(&mut server, &mut listener, shutdown).await;
    clients.abort_all();
}

/// One connection: one request, bounded in time.
async fn connection(stream: tokio::net::TcpStream, events: mpsc::UnboundedSender<Event>) {
    let service = hyper::service::service_fn(move |req| answer(req, events.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_DEADLINE)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    if tokio::time::timeout(CONNECTION_DEADLINE, conn)
        .await
        .is_err()
    {
        tracing::debug!("closed an admin connection at its {CONNECTION_DEADLINE:?} deadline");
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn answer(
    req: Request<Incoming>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let (reply, report) = oneshot::channel();
    let report = match events.send(Event::Metrics { reply }) {
        Ok(()) => tokio::time::timeout(CONNECTION_DEADLINE, report).await,
        Err(_) => return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "stopping\n")),
    };
    let Ok(Ok(mut report)) = report else {
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"));
    };
    report.state_dir_repairs = super::state_dir::repairs();
    match encode(report) {
        Ok(text) => {
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            Ok(resp)
        }
        Err(_) => Ok(plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot format the metrics\n",
        )),
    }
}

/// The report as OpenMetrics text.
pub(crate) fn encode(report: MetricsReport) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(report));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl GenerationMetrics {
    fn labels(&self) -> Vec<(&'static str, String)> {
        let group = (!self.group.is_empty()).then(|| ("group", self.group.clone()));
        group
            .into_iter()
            .chain([
                ("generation", self.generation.clone()),
                ("plugin", self.plugin.clone()),
                ("version", self.version.clone()),
                ("sha256", self.sha256.clone()),
            ])
            .collect()
    }
}

impl MetricsReport {
    /// This report and the other groups'.
    fn all(&self) -> impl Iterator<Item = &MetricsReport> {
        std::iter::once(self).chain(&self.more)
    }

    /// Every group's generations.
    fn all_generations(&self) -> impl Iterator<Item = &GenerationMetrics> {
        self.all().flat_map(|r| &r.generations)
    }

    /// `labels` behind this report's `group` label (none without a group).
    fn with_group<'a>(&'a self, labels: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let group = (!self.group.is_empty()).then_some(("group", self.group.as_str()));
        group.into_iter().chain(labels.iter().copied()).collect()
    }

    /// A gauge or counter per group (one series, unlabelled, without groups).
    fn per_group(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        kind: MetricType,
        value: impl Fn(&MetricsReport) -> u64,
    ) -> std::fmt::Result {
        let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
        let encode = |m: &mut prometheus_client::encoding::MetricEncoder, v: u64| match kind {
            MetricType::Gauge => m.encode_gauge(&v),
            _ => m.encode_counter::<NoLabelSet, _, u64>(&v, None),
        };
        for r in self.all() {
            let labels = r.with_group(&[]);
            if r.group.is_empty() {
                encode(&mut metric, value(r))?;
            } else {
                encode(&mut metric.encode_family(&labels)?, value(r))?;
            }
        }
        Ok(())
    }

    /// A counter per generation.
    fn per_generation(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&Totals) -> u64,
    ) -> std::fmt::Result {
        let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for g in self.all_generations() {
            let labels = g.labels();
            metric
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&value(&g.totals), None)?;
        }
        Ok(())
    }
}

impl MetricsReport {
    /// The plugins' own metrics: one family per name, a series per generation and label set.
    fn encode_plugin_series(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        use crate::plugin_metrics::{COUNTER, GAUGE, Sample, Value};
        let mut families: std::collections::BTreeMap<&str, Vec<(&GenerationMetrics, &Sample)>> =
            std::collections::BTreeMap::new();
        for g in self.all_generations() {
            for sample in g.plugin_series.samples() {
                families.entry(&sample.name).or_default().push((g, sample));
            }
        }
        // A counter `x_total` and a gauge `x` would make two families named `x`: the first wins.
        let mut exposed = std::collections::BTreeSet::new();
        for (name, series) in families {
            let first = series[0].1;
            let (kind, name) = match first.kind {
                // The exposition adds `_total` to a counter's name.
                COUNTER => (
                    MetricType::Counter,
                    name.strip_suffix("_total").unwrap_or(name),
                ),
                GAUGE => (MetricType::Gauge, name),
                _ => (MetricType::Histogram, name),
            };
            if !exposed.insert(name) {
                continue;
            }
            let mut metric = encoder.encode_descriptor(name, &first.help, None, kind)?;
            for (g, sample) in series.iter().filter(|(_, s)| s.kind == first.kind) {
                let labels: Vec<(String, String)> = g
                    .labels()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .chain(sample.labels.iter().cloned())
                    .collect();
                let mut family = metric.encode_family(&labels)?;
                match &sample.value {
                    Value::Counter(n) => family.encode_counter::<NoLabelSet, _, u64>(n, None)?,
                    Value::Gauge(n) => family.encode_gauge(n)?,
                    Value::Histogram {
                        bounds,
                        buckets,
                        sum,
                    } => {
                        let pairs: Vec<(f64, u64)> = bounds
                            .iter()
                            .copied()
                            .chain([f64::INFINITY])
                            .zip(buckets.iter().copied())
                            .collect();
                        let count = buckets.iter().fold(0u64, |a, &b| a.wrapping_add(b));
                        family.encode_histogram::<NoLabelSet>(*sum, count, &pairs, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

impl Collector for MetricsReport {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.encode_plugin_series(&mut encoder)?;
        {
            let mut metric = encoder.encode_descriptor(
                "host_http_requests",
                "HTTP requests answered by workers, by generation and status class",
                None,
                MetricType::Counter,
            )?;
            for g in self.all_generations() {
                for (class, n) in CLASSES.iter().zip(g.totals.by_class) {
                    let mut labels = g.labels();
                    labels.push(("class", class.to_string()));
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "host_http_request_duration",
                "Time from a request's head to its response's head, in the worker",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for g in self.all_generations() {
                let t = &g.totals;
                let buckets: Vec<(f64, u64)> = BUCKETS_US
                    .iter()
                    .map(|&us| us as f64 / 1e6)
                    .chain([f64::INFINITY])
                    .zip(t.latency)
                    .collect();
                let labels = g.labels();
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        t.latency_sum_us as f64 / 1e6,
                        // Wrapping: the buckets come from a table plugins can write to.
                        t.latency.iter().fold(0u64, |a, &b| a.wrapping_add(b)),
                        &buckets,
                        None,
                    )?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "host_http_requests_in_flight",
                "HTTP requests being handled now",
                None,
                MetricType::Gauge,
            )?;
            for g in self.all_generations() {
                let labels = g.labels();
                metric
                    .encode_family(&labels)?
                    .encode_gauge(&g.totals.in_flight)?;
            }
        }
        self.per_generation(
            &mut encoder,
            "host_http_requests_cancelled",
            "HTTP requests abandoned before their answer (the client went away)",
            None,
            |t| t.cancelled,
        )?;
        self.per_generation(
            &mut encoder,
            "host_http_requests_lost",
            "HTTP requests in flight on a worker when it died (crashed, hung or killed)",
            None,
            |t| t.lost,
        )?;
        self.per_generation(
            &mut encoder,
            "host_http_handler_panics",
            "Handler panics caught at the plugin boundary, each answered 500 (plugins built against plugin-api ABI 1.5 or later)",
            None,
            |t| t.panics,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "host_limit_hits",
                "Times a worker bound was hit (a request refused, a connection closed, an entry not kept), by limit",
                None,
                MetricType::Counter,
            )?;
            for g in self.all_generations() {
                for limit in Limit::ALL {
                    let mut labels = g.labels();
                    labels.push(("limit", limit.name().to_string()));
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(
                            &g.totals.limit_hits[limit as usize],
                            None,
                        )?;
                }
            }
        }
        self.per_generation(
            &mut encoder,
            "host_http_request_body",
            "Request body bytes read for handlers",
            Some(&Unit::Bytes),
            |t| t.request_bytes,
        )?;
        self.per_generation(
            &mut encoder,
            "host_http_response_body",
            "Response body bytes produced by handlers",
            Some(&Unit::Bytes),
            |t| t.response_bytes,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "host_workers",
                "Live worker processes, by generation and state",
                None,
                MetricType::Gauge,
            )?;
            for g in self.all_generations() {
                for (state, n) in &g.workers {
                    let mut labels = g.labels();
                    labels.push(("state", state.to_string()));
                    metric.encode_family(&labels)?.encode_gauge(n)?;
                }
            }
        }
        self.per_group(
            &mut encoder,
            "host_serving_generation",
            "The generation new connections reach",
            MetricType::Gauge,
            |r| r.serving_generation,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "host_reloads",
                "Reloads, rollbacks and automatic (watch) reloads, by outcome",
                None,
                MetricType::Counter,
            )?;
            for (r, (kind, outcome, n)) in self
                .all()
                .flat_map(|r| r.reloads.iter().map(move |x| (r, x)))
            {
                let labels = r.with_group(&[("kind", kind.as_str()), ("outcome", outcome)]);
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "host_worker_starts",
                "Worker processes started, by cause",
                None,
                MetricType::Counter,
            )?;
            for (r, (cause, n)) in self
                .all()
                .flat_map(|r| r.worker_starts.iter().map(move |x| (r, x)))
            {
                metric
                    .encode_family(&r.with_group(&[("cause", *cause)]))?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "host_worker_exits",
                "Worker processes that ended, by cause and how they ended",
                None,
                MetricType::Counter,
            )?;
            for (r, (cause, how, n)) in self
                .all()
                .flat_map(|r| r.worker_exits.iter().map(move |x| (r, x)))
            {
                metric
                    .encode_family(&r.with_group(&[("cause", *cause), ("how", *how)]))?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        self.per_group(
            &mut encoder,
            "host_listener_up",
            "Whether the shared listening socket listens (0: down, connections refused)",
            MetricType::Gauge,
            |r| u64::from(r.listener_up),
        )?;
        self.per_group(
            &mut encoder,
            "host_listener_recoveries",
            "Times the listening socket was found not listening (a plugin shut it down) and re-armed",
            MetricType::Counter,
            |r| r.listener_recoveries,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "host_orphans_ended",
                "Processes the workers left behind (forked by a plugin) that the master ended, by the signal that ended them",
                None,
                MetricType::Counter,
            )?;
            // The master's: every group's loop sees every orphan (each is the master's child),
            // so each group counts them all; the largest count is the master's.
            let ended = self.all().map(|r| r.orphans_ended).max().unwrap_or(0);
            let killed = self.all().map(|r| r.orphans_killed).max().unwrap_or(0);
            for (signal, n) in [
                ("SIGTERM", ended.saturating_sub(killed)),
                ("SIGKILL", killed),
            ] {
                metric
                    .encode_family(&[("signal", signal)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "host_worker_kills",
                "Worker processes the master SIGKILLed, by cause",
                None,
                MetricType::Counter,
            )?;
            for (r, (cause, n)) in self
                .all()
                .flat_map(|r| r.worker_kills.iter().map(move |x| (r, x)))
            {
                metric
                    .encode_family(&r.with_group(&[("cause", *cause)]))?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "host_master_limit_hits",
                "Times the master waited at a bound (a rollout waiting for room for its next worker), by limit",
                None,
                MetricType::Counter,
            )?;
            for (r, (limit, n)) in self
                .all()
                .flat_map(|r| r.master_limit_hits.iter().map(move |x| (r, x)))
            {
                metric
                    .encode_family(&r.with_group(&[("limit", *limit)]))?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "host_state_dir_repairs",
                "Files of state_dir the master recreated after they went missing, by what",
                None,
                MetricType::Counter,
            )?;
            for (what, n) in &self.state_dir_repairs {
                metric
                    .encode_family(&[("what", *what)])?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_encodes_as_openmetrics_text() {
        let mut totals = Totals {
            by_class: [0, 3, 0, 1, 1],
            latency_sum_us: 12_500_000,
            response_bytes: 42,
            ..Totals::default()
        };
        totals.latency[0] = 4;
        totals.latency[crate::counters::BUCKETS - 1] = 1;
        let report = MetricsReport {
            generations: vec![GenerationMetrics {
                generation: "2".into(),
                plugin: "ex\"ample".into(),
                version: "0.1.0".into(),
                sha256: "ab".into(),
                totals,
                workers: vec![("ready", 2)],
                ..GenerationMetrics::default()
            }],
            serving_generation: 2,
            reloads: vec![("reload".into(), "ok", 1)],
            worker_starts: vec![("reload", 2)],
            worker_exits: vec![("reload", "exit_0", 2)],
            worker_kills: vec![("hung", 0)],
            master_limit_hits: vec![("max_draining_workers", 1)],
            state_dir_repairs: vec![("control_socket", 2)],
            ..MetricsReport::default()
        };
        let text = encode(report).unwrap();
        // prometheus-client writes `le` first; label order does not matter to Prometheus.
        let labels = r#"generation="2",plugin="ex\"ample",version="0.1.0",sha256="ab""#;
        for line in [
            "# TYPE host_http_requests counter".to_string(),
            format!("host_http_requests_total{{{labels},class=\"2xx\"}} 3"),
            format!("host_http_request_duration_seconds_count{{{labels}}} 5"),
            format!("host_http_request_duration_seconds_sum{{{labels}}} 12.5"),
            format!("host_http_request_duration_seconds_bucket{{le=\"0.0005\",{labels}}} 4"),
            format!("host_http_request_duration_seconds_bucket{{le=\"10.0\",{labels}}} 4"),
            format!("host_http_request_duration_seconds_bucket{{le=\"+Inf\",{labels}}} 5"),
            format!("host_http_response_body_bytes_total{{{labels}}} 42"),
            format!("host_workers{{{labels},state=\"ready\"}} 2"),
            "host_serving_generation 2".to_string(),
            "host_reloads_total{kind=\"reload\",outcome=\"ok\"} 1".to_string(),
            "host_worker_exits_total{cause=\"reload\",how=\"exit_0\"} 2".to_string(),
            "host_master_limit_hits_total{limit=\"max_draining_workers\"} 1".to_string(),
            "host_state_dir_repairs_total{what=\"control_socket\"} 2".to_string(),
            "# EOF".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
