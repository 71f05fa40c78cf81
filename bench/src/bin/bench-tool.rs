//! Load generator for the benchmark (`bench/run.sh`), for what `wrk` cannot show:
//!
//! - `latency`: keep-alive clients send back-to-back requests for a while; at a set time the tool
//!   runs a reload command itself, so the reload window is known exactly. It writes every request
//!   (time, latency, outcome) to a CSV, prints p50/p99/max in the window and in steady state, and
//!   draws latency over time as an SVG.
//! - `burst`: N requests at once, each on its own connection; prints when the last one finished.
//! - `sleepers`: opens N connections first, then sends one request on each at once; prints how
//!   long from the first request sent to the last answer, and the most threads the server
//!   process (`--pid`) ran meanwhile.
//! - `ws-idle`: opens N WebSockets (`GET /ws`, the example's echo), exchanges one message on
//!   each so every socket has read once, leaves them idle, and prints how much the worker's
//!   resident set (`--pid`, `VmRSS`) grew per socket, after a warm-up of 100 sockets.
//! - `hash`: what a reload of a changed plugin file costs at most, by parts: SHA-256 of the file
//!   in memory (the crate and version the host uses, with the CPU's SHA extensions if it has
//!   them), reading it, and copying it with `fsync` as the snapshot does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// Keep-alive load with a reload in the middle: latency over time, as CSV and SVG.
#[derive(clap::Args)]
struct LatencyArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "8s")]
    duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    reload_at: Duration,
    /// Run with `sh -c` at `reload_at`.
    #[arg(long)]
    reload_cmd: String,
    /// How long after the reload command returns still counts as the reload window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    settle: Duration,
    #[arg(long)]
    csv: PathBuf,
    #[arg(long)]
    svg: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    Latency(LatencyArgs),
    Burst {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 16)]
        count: usize,
    },
    Sleepers {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// The server process whose thread count is sampled.
        #[arg(long)]
        pid: u32,
    },
    WsIdle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 5_000)]
        count: usize,
        /// The worker whose resident set is sampled.
        #[arg(long)]
        pid: u32,
    },
    Hash {
        /// The file to hash and copy (the plugin).
        #[arg(long)]
        file: PathBuf,
        /// Where the copy goes (a directory on the same file system as the snapshots).
        #[arg(long)]
        dir: PathBuf,
    },
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One GET on `sender`; `Ok(close)` says whether the server asked to close the connection.
async fn get(sender: &mut Sender, addr: SocketAddr, path: &str) -> Result<bool, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let close = resp
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v == "close");
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(close)
}

#[derive(Clone, Copy)]
struct Sample {
    at_us: u64,
    latency_us: u64,
    ok: bool,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Stats {
    count: usize,
    errors: usize,
    p50: u64,
    p99: u64,
    max: u64,
}

fn stats(samples: impl Iterator<Item = Sample>) -> Stats {
    let (mut lat, mut errors) = (Vec::new(), 0);
    for s in samples {
        if s.ok {
            lat.push(s.latency_us);
        } else {
            errors += 1;
        }
    }
    lat.sort_unstable();
    Stats {
        count: lat.len() + errors,
        errors,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or(0),
    }
}

/// Latency over time: per 10 ms bucket, the median and the maximum, log scale; the reload window shaded.
fn svg(samples: &[Sample], window: (u64, u64), duration_us: u64) -> String {
    let (w, h, left, bottom) = (900.0, 320.0, 60.0, 30.0);
    let bucket = 10_000u64;
    let n = (duration_us / bucket + 1) as usize;
    let mut buckets: Vec<Vec<u64>> = vec![Vec::new(); n];
    for s in samples.iter().filter(|s| s.ok) {
        buckets[((s.at_us / bucket) as usize).min(n - 1)].push(s.latency_us);
    }
    let max_lat = samples
        .iter()
        .map(|s| s.latency_us)
        .max()
        .unwrap_or(1)
        .max(1000) as f64;
    let (lo, hi) = (10f64.ln(), (max_lat * 1.5).ln());
    let x = |us: u64| left + (us as f64 / duration_us as f64) * (w - left - 10.0);
    let y =
        |lat: u64| h - bottom - ((lat.max(10) as f64).ln() - lo) / (hi - lo) * (h - bottom - 10.0);
    let mut med = String::new();
    let mut top = String::new();
    for (i, b) in buckets.iter_mut().enumerate() {
        if b.is_empty() {
            continue;
        }
        b.sort_unstable();
        let t = i as u64 * bucket + bucket / 2;
        med.push_str(&format!("{:.1},{:.1} ", x(t), y(b[b.len() / 2])));
        top.push_str(&format!("{:.1},{:.1} ", x(t), y(*b.last().unwrap())));
    }
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <rect x=\"{:.1}\" y=\"10\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#fde2c4\"/>\n\
         <text x=\"{:.1}\" y=\"22\">reload window</text>\n",
        x(window.0),
        (x(window.1) - x(window.0)).max(1.0),
        h - bottom - 10.0,
        x(window.0) + 3.0
    );
    for tick in [10u64, 100, 1_000, 10_000, 100_000, 1_000_000] {
        if (tick as f64) < max_lat * 1.5 {
            let label = if tick >= 1000 {
                format!("{} ms", tick / 1000)
            } else {
                format!("{tick} µs")
            };
            let ty = y(tick);
            out.push_str(&format!(
                "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\" stroke=\"#ddd\"/><text x=\"4\" y=\"{:.1}\">{label}</text>\n",
                w - 10.0,
                ty + 4.0,
            ));
        }
    }
    for s in 0..=(duration_us / 1_000_000) {
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{s} s</text>\n",
            x(s * 1_000_000) - 6.0,
            h - 10.0
        ));
    }
    out.push_str(&format!(
        "<polyline points=\"{top}\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"1\"/>\n"
    ));
    out.push_str(&format!(
        "<polyline points=\"{med}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n"
    ));
    out.push_str(&format!(
        "<text x=\"{:.1}\" y=\"22\" fill=\"#1f77b4\">median per 10 ms</text><text x=\"{:.1}\" y=\"36\" fill=\"#d62728\">max per 10 ms</text>\n</svg>\n",
        w - 150.0,
        w - 150.0
    ));
    out
}

async fn latency(args: LatencyArgs) {
    let LatencyArgs {
        addr,
        path,
        connections,
        duration,
        reload_at,
        reload_cmd,
        settle,
        csv,
        svg: svg_path,
    } = args;
    let start = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::with_capacity(1 << 20)));
    let clients: Vec<_> = (0..connections)
        .map(|_| {
            let (samples, path) = (samples.clone(), path.clone());
            tokio::spawn(async move {
                let mut conn: Option<Sender> = None;
                let mut local = Vec::with_capacity(1 << 16);
                while start.elapsed() < duration {
                    let t0 = Instant::now();
                    let sender = match conn.as_mut() {
                        Some(s) if !s.is_closed() => s,
                        _ => match connect(addr).await {
                            Ok(s) => conn.insert(s),
                            Err(_) => {
                                local.push(Sample {
                                    at_us: (t0 - start).as_micros() as u64,
                                    latency_us: t0.elapsed().as_micros() as u64,
                                    ok: false,
                                });
                                continue;
                            }
                        },
                    };
                    let result = get(sender, addr, &path).await;
                    let ok = result.is_ok();
                    if !matches!(result, Ok(false)) {
                        conn = None;
                    }
                    local.push(Sample {
                        at_us: (t0 - start).as_micros() as u64,
                        latency_us: t0.elapsed().as_micros() as u64,
                        ok,
                    });
                }
                samples.lock().unwrap().extend(local);
            })
        })
        .collect();
    tokio::time::sleep(reload_at).await;
    let reload_start = start.elapsed();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&reload_cmd)
        .output()
        .await
        .expect("reload command runs");
    let reload_end = start.elapsed();
    assert!(
        out.status.success(),
        "reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in clients {
        c.await.unwrap();
    }
    let samples = samples.lock().unwrap().clone();
    let window = (
        reload_start.as_micros() as u64,
        (reload_end + settle).as_micros() as u64,
    );
    let in_window = |s: &Sample| s.at_us >= window.0 && s.at_us < window.1;
    let steady = stats(samples.iter().copied().filter(|s| !in_window(s)));
    let during = stats(samples.iter().copied().filter(in_window));
    let mut text = String::from("t_us,latency_us,ok\n");
    for s in &samples {
        text.push_str(&format!("{},{},{}\n", s.at_us, s.latency_us, s.ok as u8));
    }
    std::fs::write(&csv, text).unwrap();
    std::fs::write(
        &svg_path,
        svg(&samples, window, duration.as_micros() as u64),
    )
    .unwrap();
    // One line per row, for the results table: what, requests, errors, p50, p99, max (µs).
    println!(
        "steady {} {} {} {} {}",
        steady.count, steady.errors, steady.p50, steady.p99, steady.max
    );
    println!(
        "reload {} {} {} {} {}",
        during.count, during.errors, during.p50, during.p99, during.max
    );
    println!(
        "reload_command_ms {}",
        (reload_end - reload_start).as_millis()
    );
}

async fn burst(addr: SocketAddr, path: String, count: usize) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                get(&mut sender, addr, &path).await?;
                Ok::<Duration, String>(start.elapsed())
            })
        })
        .collect();
    let mut last = Duration::ZERO;
    let mut errors = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(d) => last = last.max(d),
            Err(_) => errors += 1,
        }
    }
    println!("burst {count} {errors} {}", last.as_millis());
}

fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn sleepers(addr: SocketAddr, path: String, count: usize, pid: u32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Connect first (at most 256 handshakes at a time), so the measurement is the requests.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let connects: Vec<_> = (0..count)
        .map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                tokio::net::TcpStream::connect(addr).await
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(count);
    for c in connects {
        conns.push(c.await.unwrap().expect("connect"));
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let (request, mut go) = (request.clone(), go.clone());
            tokio::spawn(async move {
                let _ = go.wait_for(|g| *g).await;
                s.write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut reply = Vec::new();
                s.read_to_end(&mut reply).await.map_err(|e| e.to_string())?;
                if !reply.starts_with(b"HTTP/1.1 200") {
                    return Err("not 200".to_string());
                }
                Ok(Instant::now())
            })
        })
        .collect();
    let max_threads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let max_threads = max_threads.clone();
        tokio::spawn(async move {
            loop {
                max_threads.fetch_max(threads(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let start = Instant::now();
    go_tx.send(true).unwrap();
    let mut last = start;
    let mut errors = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(at) => last = last.max(at),
            Err(_) => errors += 1,
        }
    }
    sampler.abort();
    let sampled = max_threads
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(threads(pid));
    println!(
        "sleepers {count} {errors} {} {sampled}",
        (last - start).as_millis()
    );
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match args.command {
        Command::Latency(args) => rt.block_on(latency(args)),
        Command::Burst { addr, path, count } => rt.block_on(burst(addr, path, count)),
        Command::Sleepers {
            addr,
            path,
            count,
            pid,
        } => rt.block_on(sleepers(addr, path, count, pid)),
        Command::WsIdle { addr, count, pid } => rt.block_on(ws_idle(addr, count, pid)),
        Command::Hash { file, dir } => hash(&file, &dir),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One WebSocket on a raw connection: the handshake, then one masked text message `hi` and its
/// echo read back (the worker's socket has read once). The connection is returned open.
async fn ws_open(addr: SocketAddr) -> Result<tokio::net::TcpStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(handshake.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if s.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed during the handshake".into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(String::from_utf8_lossy(&head).into_owned());
    }
    // FIN + text, masked, 2 bytes: "hi" under the mask 1,2,3,4.
    let mask = [1u8, 2, 3, 4];
    let frame = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ mask[0], b'i' ^ mask[1]];
    s.write_all(&frame).await.map_err(|e| e.to_string())?;
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await.map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; usize::from(hdr[1] & 0x7f)];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| e.to_string())?;
    if !payload.ends_with(b"hi") {
        return Err("no echo".into());
    }
    Ok(s)
}

async fn ws_idle(addr: SocketAddr, count: usize, pid: u32) {
    let open = |n: usize| async move {
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _permit = gate.acquire().await;
                    ws_open(addr).await
                })
            })
            .collect();
        let (mut open, mut errors) = (Vec::with_capacity(n), 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(s) => open.push(s),
                Err(_) => errors += 1,
            }
        }
        (open, errors)
    };
    let (_warm, warm_errors) = open(100).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let (sockets, errors) = open(count).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    let per = after.saturating_sub(before) as f64 / sockets.len().max(1) as f64;
    println!(
        "ws-idle {} {} {before} {after} {per:.1}",
        sockets.len(),
        errors + warm_errors
    );
}

/// Prints one line of `key=value`s: the file's size, SHA-256 in memory (MB/s, median of 5), and
/// the time to read it and to copy it with `fsync` (median of 5 each, in ms).
fn hash(file: &std::path::Path, dir: &std::path::Path) {
    use sha2::Digest;
    use std::io::Write;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let bytes =
        std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let mb = bytes.len() as f64 / 1e6;
    let hash_s = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(sha2::Sha256::digest(&bytes));
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let read_ms = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(std::fs::read(file).expect("read"));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let copy = dir.join(".bench-hash-copy");
    let copy_ms = median(
        (0..5)
            .map(|_| {
                let _ = std::fs::remove_file(&copy);
                let t = Instant::now();
                let mut out = std::fs::File::create(&copy).expect("create the copy");
                out.write_all(&bytes).expect("write the copy");
                out.sync_all().expect("fsync the copy");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let _ = std::fs::remove_file(&copy);
    #[cfg(target_arch = "x86_64")]
    let sha_ni = std::arch::is_x86_feature_detected!("sha");
    #[cfg(not(target_arch = "x86_64"))]
    let sha_ni = false;
    println!(
        "bytes={} sha256_mb_s={:.0} sha256_ms={:.2} read_ms={:.2} copy_fsync_ms={:.2} sha_ni={}",
        bytes.len(),
        mb / hash_s,
        hash_s * 1e3,
        read_ms,
        copy_ms,
        sha_ni
    );
}
