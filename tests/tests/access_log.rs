//! The access log through the real host and the example plugin: one line per request with
//! time, method, path, status, duration, bytes in and out, generation and worker, in text and
//! in JSON (`log_format`); off by default; and a full disk (`/dev/full`) drops lines, counts
//! them and logs it, while the worker keeps serving.

use std::path::Path;
use std::time::Duration;

use host_status::WorkerStateName;
use tests::{Host, HostOptions, example_plugin, get, wait_until};

async fn host_with(extra: &str) -> Host {
    Host::start(
        &example_plugin(&[]),
        HostOptions {
            workers: 2,
            extra: format!("admin_listen = \"127.0.0.1:0\"\n{extra}"),
            ..Default::default()
        },
    )
    .await
}

/// A POST with a body of `len` bytes, on its own connection: its status.
async fn post(addr: std::net::SocketAddr, path: &str, len: usize) -> u16 {
    use http_body_util::Full;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", "test")
        .body(Full::new(bytes::Bytes::from(vec![b'x'; len])))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    status
}

/// A chunked POST (no `Content-Length`) of `hello` to `/`, on a raw socket: its status line.
async fn post_chunked(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    out.lines().next().unwrap_or("").to_string()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn three_requests(host: &Host) -> (String, u16) {
    let hello = get(host.addr, "/").await.unwrap();
    assert_eq!(hello.status, 200);
    assert_eq!(get(host.addr, "/no-such-route").await.unwrap().status, 404);
    assert_eq!(post(host.addr, "/upload", 1000).await, 200);
    (hello.body, 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_carry_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let host = host_with(&format!("access_log = {:?}", log.to_str().unwrap())).await;
    let pids = host.worker_pids(Some(WorkerStateName::Ready)).await;
    let (hello, _) = three_requests(&host).await;
    assert_eq!(post_chunked(host.addr).await, "HTTP/1.1 200 OK");
    wait_until(Duration::from_secs(10), "four lines", || {
        lines(&log).len() == 4
    })
    .await;
    let lines = lines(&log);
    // `TIME METHOD PATH STATUS DURATIONms in=N out=N gen=G worker=PID`
    let fields: Vec<Vec<&str>> = lines.iter().map(|l| l.split(' ').collect()).collect();
    for (f, line) in fields.iter().zip(&lines) {
        assert_eq!(f.len(), 9, "{line}");
        assert!(f[0].ends_with('Z') && f[0].contains('T'), "{line}");
        assert!(f[4].ends_with("ms") && f[4].trim_end_matches("ms").parse::<f64>().is_ok());
        assert_eq!(f[7], "gen=1", "{line}");
        let pid: u32 = f[8].strip_prefix("worker=").unwrap().parse().unwrap();
        assert!(pids.contains(&pid), "{line} not from {pids:?}");
    }
    let find = |path: &str| {
        fields
            .iter()
            .find(|f| f[2] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
    };
    let root = fields
        .iter()
        .find(|f| f[1] == "GET" && f[2] == "/")
        .expect("GET /");
    assert_eq!(&root[1..4], ["GET", "/", "200"]);
    let chunked = fields
        .iter()
        .find(|f| f[1] == "POST" && f[2] == "/")
        .expect("POST /");
    assert_eq!(chunked[5], "in=5", "a chunked body counted as read");
    assert_eq!(root[5], "in=0");
    assert_eq!(root[6], format!("out={}", hello.len()));
    assert_eq!(find("/no-such-route")[3], "404");
    let upload = find("/upload");
    assert_eq!(&upload[1..4], ["POST", "/upload", "200"]);
    assert_eq!(upload[5], "in=1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_follow_log_format() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.json");
    let host = host_with(&format!(
        "log_format = \"json\"\naccess_log = {:?}",
        log.to_str().unwrap()
    ))
    .await;
    let (hello, _) = three_requests(&host).await;
    wait_until(Duration::from_secs(10), "three lines", || {
        lines(&log).len() == 3
    })
    .await;
    let parsed: Vec<serde_json::Value> = lines(&log)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    for p in &parsed {
        for key in [
            "time",
            "method",
            "path",
            "status",
            "duration_ms",
            "bytes_in",
            "bytes_out",
            "generation",
            "worker",
        ] {
            assert!(p.get(key).is_some(), "{key} missing in {p}");
        }
        assert_eq!(p["generation"], 1);
    }
    let root = parsed.iter().find(|p| p["path"] == "/").expect("GET /");
    assert_eq!(root["method"], "GET");
    assert_eq!(root["status"], 200);
    assert_eq!(root["bytes_out"], hello.len() as u64);
    let upload = parsed.iter().find(|p| p["path"] == "/upload").unwrap();
    assert_eq!(upload["bytes_in"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_lines_counts_them_and_the_workers_serve_on() {
    let host = host_with("access_log = \"/dev/full\"").await;
    let pids = host.worker_pids(Some(WorkerStateName::Ready)).await;
    for _ in 0..50 {
        assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while host.limit_hits("access_log_dropped").await < 50 {
        assert!(std::time::Instant::now() < deadline, "{}", host.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(host.limit_hits("access_log_dropped").await, 50);
    wait_until(Duration::from_secs(10), "the drop in the log", || {
        host.log()
            .contains("access log lines dropped: cannot write /dev/full")
    })
    .await;
    assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
    assert_eq!(host.worker_pids(Some(WorkerStateName::Ready)).await, pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default() {
    let host = host_with("").await;
    assert_eq!(get(host.addr, "/").await.unwrap().status, 200);
    assert!(!host.log().contains("access log"));
    assert_eq!(host.limit_hits("access_log_dropped").await, 0);
}
