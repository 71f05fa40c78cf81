//! The gateway's benchmark tools (`bench/run.sh gateway`), driving the chat example's text
//! protocol (`example-chat/`) over real WebSockets:
//!
//! - `reload-echo`: N clients each send a numbered `echo` every interval; after a steady
//!   period the tool runs a reload command itself, several times, so the reload windows are
//!   known exactly. Prints disconnects, lost and reordered answers, and echo latency (p50, p99)
//!   in steady state against inside the reload windows.
//! - `echo-load`: C clients keep W echoes in flight each for a while; prints the answers and
//!   the CPU the given processes (`--pids`, read from `/proc/PID/stat`) used per answer.
//! - `echo-server`: an in-process tokio-tungstenite echo server answering `echo T` with
//!   `gen=0 T`, to measure `echo-load` against side by side.
//! - `fanout`: N clients join one room; one more says something to it, several times; prints
//!   how long until the last member had each.
//! - `idle`: opens N WebSocket upgrades by hand from several loopback source addresses
//!   (127.0.0.x), keeps them open and silent, prints `held N`, and holds them until killed.
//!
//! Nothing here fails on a number: the figures are printed, `bench/run.sh` reports them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Ws = WebSocketStream<TcpStream>;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    ReloadEcho(ReloadEchoArgs),
    EchoLoad(EchoLoadArgs),
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    Fanout(FanoutArgs),
    Idle(IdleArgs),
}

/// Numbered echoes from many clients through several reloads.
#[derive(clap::Args)]
struct ReloadEchoArgs {
    /// The gateway's address (the chat's WebSocket path is `/chat`).
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    interval: Duration,
    /// Steady state measured before the first reload.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    steady: Duration,
    #[arg(long, default_value_t = 5)]
    reloads: usize,
    /// Time between the end of one reload and the start of the next.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "4s")]
    gap: Duration,
    /// Run with `sh -c` for each reload.
    #[arg(long)]
    reload_cmd: String,
    /// Source addresses for the clients, used in turn.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
}

/// Echoes as fast as answered, for CPU per message.
#[derive(clap::Args)]
struct EchoLoadArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Echoes in flight per client.
    #[arg(long, default_value_t = 8)]
    window: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// The server's processes whose CPU is counted.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
}

/// One `say` to a room of many clients.
#[derive(clap::Args)]
struct FanoutArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    #[arg(long, default_value_t = 5)]
    says: usize,
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
}

/// Many idle connections.
#[derive(clap::Args)]
struct IdleArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        match args.command {
            Command::ReloadEcho(a) => reload_echo(a).await,
            Command::EchoLoad(a) => echo_load(a).await,
            Command::EchoServer { listen } => echo_server(listen).await,
            Command::Fanout(a) => fanout(a).await,
            Command::Idle(a) => idle(a).await,
        }
    });
}

/// A TCP connection to `addr` from `source` (port chosen by the kernel).
async fn tcp_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A chat client of the gateway at `addr`, from `source`, with small buffers (many are open).
async fn chat_client(source: IpAddr, addr: SocketAddr) -> Result<Ws, String> {
    let stream = tcp_from(source, addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/chat"),
        stream,
        Some(config),
    )
    .await
    .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// Opens `n` chat clients, at most 256 handshakes at a time, round-robin over `sources`.
async fn open_clients(n: usize, addr: SocketAddr, sources: &[IpAddr]) -> Vec<Ws> {
    let gate = Arc::new(Semaphore::new(256));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (gate, source) = (gate.clone(), sources[i % sources.len()]);
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("never closed");
                for attempt in 0.. {
                    match chat_client(source, addr).await {
                        Ok(ws) => return ws,
                        Err(e) if attempt < 20 => {
                            eprintln!("client {i}: {e}; again");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("client {i}: {e}"),
                    }
                }
                unreachable!()
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(n);
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }
    clients
}

/// Sends `line` on `ws` and waits for the answer `expect`, 30 s at most.
async fn ask(ws: &mut Ws, line: &str, expect: &str) {
    ws.send(Message::Text(line.into())).await.expect("send");
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => panic!("no answer {expect:?} to {line:?}"),
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) if t.as_str() == expect => return,
                Some(Ok(Message::Text(t))) => panic!("to {line:?}: {t:?}, expected {expect:?}"),
                Some(Ok(_)) => {}
                other => panic!("to {line:?}: {other:?}"),
            }
        }
    }
}

/// The `q` quantile (0..=1) of `v`, sorted in place; 0 when empty.
fn quantile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// What one `reload-echo` client saw.
#[derive(Default)]
struct EchoLog {
    sent: u64,
    answered: u64,
    /// Answers that came before an earlier one (a gap).
    reordered: u64,
    /// Answers that came again (an earlier one repeated).
    repeated: u64,
    disconnected: bool,
    /// (when the echo was sent, since the start; its latency), in µs.
    samples: Vec<(u64, u64)>,
    gens: Vec<u64>,
}

async fn reload_echo(a: ReloadEchoArgs) {
    let clients = open_clients(a.clients, a.addr, &a.sources).await;
    eprintln!("reload-echo: {} clients connected", clients.len());
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(echo_client(i, ws, a.interval, start, stop.clone())))
        .collect();
    // Steady, then each reload (its window: from the command's start to 1 s after it ends).
    tokio::time::sleep(a.steady).await;
    let mut windows = Vec::new();
    for r in 0..a.reloads {
        let from = start.elapsed();
        let out = tokio::process::Command::new("sh")
            .args(["-c", &a.reload_cmd])
            .output()
            .await
            .expect("the reload command runs");
        let to = start.elapsed() + Duration::from_secs(1);
        eprintln!(
            "reload {r}: {:.1} s, {}",
            (to - from).as_secs_f64() - 1.0,
            if out.status.success() { "ok" } else { "FAILED" }
        );
        windows.push((from.as_micros() as u64, to.as_micros() as u64));
        tokio::time::sleep(a.gap).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut all = EchoLog::default();
    let mut disconnects = 0;
    let (mut steady, mut during) = (Vec::new(), Vec::new());
    let mut gens = std::collections::BTreeSet::new();
    for t in tasks {
        let log = t.await.expect("client task");
        all.sent += log.sent;
        all.answered += log.answered;
        all.reordered += log.reordered;
        all.repeated += log.repeated;
        disconnects += usize::from(log.disconnected);
        gens.extend(log.gens);
        for (at, lat) in log.samples {
            let in_reload = windows.iter().any(|(f, t)| (*f..*t).contains(&at));
            if in_reload {
                during.push(lat);
            } else if at < a.steady.as_micros() as u64 {
                steady.push(lat);
            }
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let (s99, d99) = (quantile(&mut steady, 0.99), quantile(&mut during, 0.99));
    println!(
        "clients={} reloads={} sent={} answered={} lost={} reordered={} repeated={} disconnects={} generations={:?}",
        a.clients,
        a.reloads,
        all.sent,
        all.answered,
        all.sent - all.answered,
        all.reordered,
        all.repeated,
        disconnects,
        gens
    );
    println!(
        "steady: n={} p50={:.2}ms p99={:.2}ms; reloads: n={} p50={:.2}ms p99={:.2}ms; p99 ratio {:.2}",
        steady.len(),
        ms(quantile(&mut steady, 0.5)),
        ms(s99),
        during.len(),
        ms(quantile(&mut during, 0.5)),
        ms(d99),
        d99 as f64 / s99.max(1) as f64
    );
}

/// One client of `reload-echo`: an `echo c{i}-{j}` every `interval` (first at a random phase)
/// until `stop`, then the last answers (10 s at most).
async fn echo_client(
    i: usize,
    ws: Ws,
    interval: Duration,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> EchoLog {
    let (mut tx, mut rx) = ws.split();
    let sent_at = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let sender = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let phase = interval.mul_f64((i as f64 * 0.618_034).fract());
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
            let mut j = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                sent_at.lock().unwrap().push(Instant::now());
                if tx
                    .send(Message::Text(format!("echo c{i}-{j}").into()))
                    .await
                    .is_err()
                {
                    break;
                }
                j += 1;
            }
            (j, tx)
        })
    };
    let mut log = EchoLog::default();
    let mut next = 0u64;
    let prefix = format!(" c{i}-");
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        if drain_deadline.is_none() && sender.is_finished() {
            drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(10));
        }
        let sent_so_far = sent_at.lock().unwrap().len() as u64;
        if drain_deadline.is_some() && next >= sent_so_far {
            break;
        }
        let wait = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + interval);
        let m = match tokio::time::timeout_at(wait, rx.next()).await {
            Err(_) if drain_deadline.is_some() => break,
            Err(_) => continue,
            Ok(m) => m,
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                log.disconnected = true;
                break;
            }
            Some(Ok(_)) => continue,
        };
        let Some((g, rest)) = text
            .strip_prefix("gen=")
            .and_then(|t| t.split_once(prefix.as_str()))
        else {
            continue;
        };
        let (Ok(g), Ok(k)) = (g.parse::<u64>(), rest.parse::<u64>()) else {
            continue;
        };
        // Out of order: a repeat of an answered one (k < next) or a gap (k > next).
        if k != next {
            if k < next {
                log.repeated += 1;
            } else {
                log.reordered += 1;
            }
            // The first few, to see what went wrong (a repeat, a gap).
            static SHOWN: AtomicU64 = AtomicU64::new(0);
            if SHOWN.fetch_add(1, Ordering::Relaxed) < 10 {
                eprintln!("client {i}: answer {k} (gen {g}) when {next} was next");
            }
        }
        if k >= next {
            next = k + 1;
            log.answered += 1;
        }
        if !log.gens.contains(&g) {
            log.gens.push(g);
        }
        let Some(sent) = sent_at.lock().unwrap().get(k as usize).copied() else {
            continue;
        };
        log.samples.push((
            sent.duration_since(start).as_micros() as u64,
            sent.elapsed().as_micros() as u64,
        ));
    }
    if let Ok((j, mut tx)) = sender.await {
        log.sent = j;
        let _ = tx.close().await;
    }
    log
}

/// CPU ticks (user + system) of `pids`, from `/proc/PID/stat`.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
            let after = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

async fn echo_load(a: EchoLoadArgs) {
    let clients = open_clients(a.clients, a.addr, &["127.0.0.1".parse().unwrap()]).await;
    let answered = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let (answered, counting, stop, window) =
                (answered.clone(), counting.clone(), stop.clone(), a.window);
            tokio::spawn(async move {
                for _ in 0..window {
                    ws.send(Message::Text("echo x".into())).await.expect("send");
                }
                while !stop.load(Ordering::Relaxed) {
                    match ws.next().await {
                        Some(Ok(Message::Text(_))) => {
                            if counting.load(Ordering::Relaxed) {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            ws.send(Message::Text("echo x".into())).await.expect("send");
                        }
                        Some(Ok(_)) => {}
                        other => panic!("echo-load: {other:?}"),
                    }
                }
            })
        })
        .collect();
    // A second of warm-up, then the measured time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, c0) = (Instant::now(), cpu_ticks(&a.pids));
    counting.store(true, Ordering::SeqCst);
    tokio::time::sleep(a.duration).await;
    counting.store(false, Ordering::SeqCst);
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), cpu_ticks(&a.pids) - c0);
    stop.store(true, Ordering::SeqCst);
    let n = answered.load(Ordering::SeqCst);
    // /proc counts in USER_HZ, 100 on Linux.
    let cpu_us = ticks as f64 * 10_000.0;
    println!(
        "answers={n} rate={:.0}/s cpu={:.2}s cpu_per_answer_us={:.2}",
        n as f64 / secs,
        cpu_us / 1e6,
        cpu_us / n.max(1) as f64
    );
    for t in tasks {
        t.abort();
    }
}

async fn echo_server(listen: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    println!("listening {}", listener.local_addr().expect("an address"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    let answer = match t.strip_prefix("echo ") {
                        Some(rest) => format!("gen=0 {rest}"),
                        None => t.to_string(),
                    };
                    if ws.send(Message::Text(answer.into())).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

async fn fanout(a: FanoutArgs) {
    let mut members = open_clients(a.clients, a.addr, &a.sources).await;
    let joins: Vec<_> = members
        .drain(..)
        .map(|mut ws| {
            tokio::spawn(async move {
                ask(&mut ws, "join all", "joined all").await;
                ws
            })
        })
        .collect();
    let mut joined = Vec::with_capacity(a.clients);
    for j in joins {
        joined.push(j.await.expect("join"));
    }
    let mut speaker = chat_client(a.sources[0], a.addr)
        .await
        .expect("the speaker");
    ask(&mut speaker, "nick speaker", "nick speaker").await;
    ask(&mut speaker, "join all", "joined all").await;
    eprintln!("fanout: {} members joined", joined.len());
    // Each member reports when it has each round's line.
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    for ws in joined {
        let got_tx = got_tx.clone();
        tokio::spawn(async move {
            let mut ws = ws;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m
                    && let Some(r) = t.strip_prefix("all speaker: round ")
                    && let Ok(r) = r.parse::<usize>()
                {
                    let _ = got_tx.send((r, Instant::now()));
                }
            }
        });
    }
    for r in 0..a.says {
        let t0 = Instant::now();
        speaker
            .send(Message::Text(format!("say all round {r}").into()))
            .await
            .expect("say");
        let mut times = Vec::with_capacity(a.clients);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while times.len() < a.clients {
            match tokio::time::timeout_at(deadline, got_rx.recv()).await {
                Ok(Some((round, at))) if round == r => {
                    times.push(at.duration_since(t0).as_micros() as u64)
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        let n = times.len();
        println!(
            "say {r}: {n} of {} members had it; first {:.1}ms, median {:.1}ms, last {:.1}ms",
            a.clients,
            quantile(&mut times, 0.0) as f64 / 1000.0,
            quantile(&mut times, 0.5) as f64 / 1000.0,
            quantile(&mut times, 1.0) as f64 / 1000.0
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Upgrades a connection from `source` by hand; the stream once the `101` is read.
async fn raw_upgrade(source: IpAddr, addr: SocketAddr) -> Result<TcpStream, String> {
    let mut s = tcp_from(source, addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .map_err(|_| "no answer in 30 s".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before the answer".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    match head.starts_with(b"HTTP/1.1 101") {
        true => Ok(s),
        false => Err(String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
    }
}

async fn idle(a: IdleArgs) {
    let gate = Arc::new(Semaphore::new(256));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..a.clients)
        .map(|i| {
            let (gate, failed) = (gate.clone(), failed.clone());
            let source = a.sources[i % a.sources.len()];
            let addr = a.addr;
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("never closed");
                match raw_upgrade(source, addr).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("idle client {i} from {source}: {e}");
                        }
                        None
                    }
                }
            })
        })
        .collect();
    let mut held = Vec::with_capacity(a.clients);
    for t in tasks {
        if let Some(s) = t.await.expect("idle task") {
            held.push(s);
        }
    }
    println!(
        "held {} failed {}",
        held.len(),
        failed.load(Ordering::SeqCst)
    );
    // Held until killed.
    std::future::pending::<()>().await;
}
