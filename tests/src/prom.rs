//! The master's `/metrics` text, parsed: samples with their labels, sums over label subsets, a
//! scrape of a host's admin listener, and requests sent to move the counters; and [`metric`], a
//! sum read straight off the text without the parser's checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::{Host, get};

/// One sample of the exposition: `name{labels} value`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus / OpenMetrics text (samples only; `#` lines are checked for shape).
pub fn parse(text: &str) -> Vec<Sample> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF:\n{text}"
    );
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap();
            assert!(
                ["HELP", "TYPE", "UNIT", "EOF"].contains(&kind),
                "bad line {line:?}"
            );
            continue;
        }
        let (name, rest) = match line.find('{') {
            Some(brace) => (&line[..brace], &line[brace + 1..]),
            None => {
                let (name, value) = line.split_once(' ').expect("name value");
                samples.push(Sample {
                    name: name.into(),
                    labels: BTreeMap::new(),
                    value: value.parse().expect("a number"),
                });
                continue;
            }
        };
        // Labels: key="value" pairs, values with \" \\ \n escapes, then `} value`.
        let mut labels = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "quoted label value in {line:?}");
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => panic!("dangling escape in {line:?}"),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key.trim_start_matches(',').to_string(), value);
            match chars.next() {
                Some(',') => continue,
                Some('}') => break,
                other => panic!("unexpected {other:?} in {line:?}"),
            }
        }
        let value: String = chars.collect();
        samples.push(Sample {
            name: name.into(),
            labels,
            value: value.trim().parse().unwrap_or_else(|_| panic!("{line:?}")),
        });
    }
    samples
}

/// The sum of the samples named `name` whose labels include every `(key, value)` of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Where `status --json` says the admin listener (`/metrics`) is.
pub fn admin_addr(status: &host_status::StatusReport) -> SocketAddr {
    status
        .admin_listen
        .as_deref()
        .expect("status --json reports admin_listen")
        .parse()
        .unwrap()
}

/// `GET /metrics` on `admin`, parsed (the host's log in the panic if it fails).
pub async fn scrape(host: &Host, admin: SocketAddr) -> Vec<Sample> {
    let reply = get(admin, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", host.log()));
    assert_eq!(reply.status, 200, "{}", reply.body);
    parse(&reply.body)
}

/// Sends `n` GETs of `path`, each on a new connection, and checks their status.
pub async fn send(host: &Host, path: &str, n: usize, status: u16) {
    for _ in 0..n {
        let reply = get(host.addr, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", host.log()));
        assert_eq!(reply.status, status, "GET {path}: {}", reply.body);
    }
}

/// The sum of the samples of `name` (a counter's `_total` included) whose labels contain every
/// `key="value"` of `with`, in a `/metrics` text.
pub fn metric(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
