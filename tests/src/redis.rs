//! A real `redis-server` for the gateway's cluster tests (`tests/tests/gateway_cluster.rs`),
//! started on a free loopback port in a private directory, persisting nothing (`--save ''`,
//! `--appendonly no`); it can be frozen and let go on, stopped and started again on the same
//! port, and is killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Whether `redis-server` is on `PATH` (`.ci/run` installs it).
pub fn redis_installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a port the kernel had free, and waits (10 s at most) until it answers.
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::Builder::new()
            .prefix("redis-")
            .tempdir()
            .expect("a temp dir");
        let mut redis = RedisServer {
            port,
            dir,
            child: None,
        };
        redis.restart().await;
        redis
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes it (`SIGSTOP`, `false`) or lets it go on (`SIGCONT`, `true`): a Redis that
    /// hangs, its connections open.
    pub fn run(&self, go: bool) {
        use nix::sys::signal::{Signal, kill};
        let child = self.child.as_ref().expect("redis-server runs");
        let signal = if go { Signal::SIGCONT } else { Signal::SIGSTOP };
        kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).expect("signal redis-server");
    }

    /// Kills it (as a crash would) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port, and waits until it answers `PING`.
    pub async fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::from(log.try_clone().expect("redis.log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pong().await {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn pong(&self) -> bool {
        let ask = async {
            let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut got = [0u8; 7];
            s.read_exact(&mut got).await.ok()?;
            Some(&got == b"+PONG\r\n")
        };
        tokio::time::timeout(Duration::from_secs(1), ask)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
