//! The typed messages the master, its workers and the `host` CLI exchange, and their framing.
//!
//! A frame is a little-endian `u32` length followed by that many bytes of JSON, at most
//! [`MAX_FRAME`]. Messages are typed by direction ([`MasterToWorker`], [`WorkerToMaster`],
//! [`ControlRequest`], [`ControlResponse`]), and [`Sender`] / [`Receiver`] carry one type each,
//! so the compiler knows who may send what. This module does no I/O of its own beyond a frame.
//!
//! The status report and the records in it ([`StatusReport`], [`ReloadReport`], ...) are defined
//! once, in the `host-status` crate, which the integration tests read `status --json` into; they
//! are re-exported here and travel in these messages like the rest.

use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use host_status::{
    BuildReport, CanaryFigures, CanaryStatus, CanaryVerdict, ClusterStatus, GatewayStatus,
    GenerationStatus, ListenerStatus, PluginInfo, ReloadReport, SlotStatus, StartupTimings,
    StatusReport, WorkerStateName, WorkerStatus,
};

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// master <-> worker

/// What a new worker needs to start: sent once, first, by the master.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub slot: u32,
    pub generation: u64,
    /// The generation's private, content-addressed copy of the plugin.
    pub plugin: PathBuf,
    pub plugin_sha256: String,
    pub graceful_timeout_ms: u64,
    pub idle_grace_ms: u64,
    pub max_body_bytes: usize,
    pub body_read_timeout_ms: u64,
    /// This worker's cell in the worker table (fd 5) and the table's size; `None`: no table.
    pub table_cell: Option<u32>,
    pub table_cells: u32,
    /// Whether to publish connection counts and step aside for less loaded workers.
    pub accept_balance: bool,
    pub header_read_timeout_ms: u64,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Recycling: after this many requests (`max_requests` plus this worker's jitter) the worker
    /// asks to be replaced with [`WorkerToMaster::RecycleMe`]; 0: never. `max_requests_jitter`
    /// is the part of it that is jitter (for the log line).
    #[serde(default)]
    pub max_requests: u64,
    #[serde(default)]
    pub max_requests_jitter: u64,
    /// How often to send [`WorkerToMaster::Heartbeat`] once ready; 0: never.
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// Connection bounds (see `config::Config`); `max_connections` 0: from the worker's
    /// open-files limit. A spec without them (from another build of the host) gets the
    /// configuration's defaults.
    #[serde(default = "default_keepalive_ms")]
    pub keepalive_timeout_ms: u64,
    #[serde(default = "default_send_timeout_ms")]
    pub send_timeout_ms: u64,
    #[serde(default)]
    pub max_connections: u64,
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: u32,
    #[serde(default = "default_http2_send_buffer")]
    pub http2_send_buffer: usize,
    /// The generation's `[plugin_config]` as JSON text, handed to the plugin's
    /// `on_worker_start` as it is (at most `config::MAX_PLUGIN_CONFIG_BYTES`).
    #[serde(default = "empty_object")]
    pub plugin_config: String,
    /// The config file's directory, for `HostContext::config_dir` (empty from an older master:
    /// the plugin then sees none).
    #[serde(default)]
    pub config_dir: String,
    /// The blocking pool's bounds.
    #[serde(default)]
    pub pool: PoolSpec,
    /// Where to append the access log (`access_log`); `None`: no access log.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
    /// A gateway process's bounds and link socket (`__gateway`); `None`: a plugin worker.
    #[serde(default)]
    pub gateway: Option<GatewaySpec>,
    /// A business worker's links: the link socket of every gateway process whose group names
    /// this worker's group as its `business`; it connects to each. Empty: no gateway.
    #[serde(default)]
    pub gateway_links: Vec<PathBuf>,
    /// Same port: the paths whose connections this worker passes to a gateway process
    /// (`upgrade_from` naming this worker's group). Empty: it serves every connection itself.
    #[serde(default)]
    pub gateway_handoffs: Vec<GatewayHandoff>,
    /// How long a gateway event's handler may run (`gateway_event_timeout`; 0: 30 s).
    #[serde(default)]
    pub gateway_event_timeout_ms: u64,
}

/// A path a plugin group's workers pass to a same-port gateway group: a new connection whose
/// first request line is `GET <path>` goes, unread, to one of `sockets` (one per gateway
/// process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayHandoff {
    pub path: String,
    pub sockets: Vec<PathBuf>,
}

/// What a gateway process (`gateway = true`) needs beyond a worker's spec.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewaySpec {
    /// The Unix socket its business workers connect to.
    pub link_socket: PathBuf,
    /// The Unix datagram socket on which it takes connections passed to it: same-port
    /// clients (`upgrade_from`) from a plugin group's workers, unread, and established clients
    /// from the process it succeeds (`host upgrade`); `None`: its own listener only.
    #[serde(default)]
    pub handoff_socket: Option<PathBuf>,
    /// Its place in the business workers' `gateway_links`: the top 16 bits of its clients'
    /// ids (a spec without it: 0).
    #[serde(default)]
    pub link_index: u32,
    /// Most clients held; more get `503` before the upgrade.
    pub max_clients: u64,
    /// Largest message (and frame) a client may send.
    pub max_message: usize,
    /// Most bytes queued for one client.
    pub send_queue: usize,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// How long a client's events wait while no business worker is connected.
    pub hold_ms: u64,
    /// `cluster`: the Redis URL through which it reaches the other hosts' clients.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Its business group's name (the cluster's channel).
    #[serde(default)]
    pub business: String,
}

/// The blocking pool's bounds (`blocking_threads`, `blocking_queue`,
/// `blocking_abandoned_threads`), and how many slow paths, which it takes off the I/O thread, a
/// worker remembers (`max_slow_paths`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PoolSpec {
    pub max_threads: u32,
    pub max_queue: u32,
    pub max_abandoned: u32,
    pub max_slow_paths: u32,
}

impl Default for PoolSpec {
    fn default() -> PoolSpec {
        PoolSpec {
            max_threads: 1024,
            max_queue: 1024,
            max_abandoned: 1024,
            max_slow_paths: 1024,
        }
    }
}

fn empty_object() -> String {
    "{}".into()
}

fn default_keepalive_ms() -> u64 {
    75_000
}

fn default_send_timeout_ms() -> u64 {
    60_000
}

fn default_http2_max_streams() -> u32 {
    128
}

fn default_http2_send_buffer() -> usize {
    32 << 10
}

/// Orders from the master to one worker.
// `Start` is sent once per worker and never held in bulk: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MasterToWorker {
    Start(WorkerSpec),
    /// Stop accepting now, finish what is in flight, exit.
    Drain,
    /// Answer with [`WorkerToMaster::Stats`].
    QueryStats,
}

/// Events from one worker to the master.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WorkerToMaster {
    /// The plugin is loaded, `on_worker_start` returned, and the worker is accepting.
    Ready {
        plugin: PluginInfo,
        startup: StartupTimings,
    },
    /// The plugin could not be loaded or `on_worker_start` failed; the worker exits next.
    StartFailed { reason: String },
    /// The worker has stopped accepting connections.
    Draining,
    Stats {
        requests: u64,
        in_flight: u64,
        connections: u64,
        /// A gateway process's figures.
        #[serde(default)]
        gateway: Option<Box<host_status::GatewayStatus>>,
    },
    /// Recycling: the worker asks to be replaced, new before old (it reached its request limit,
    /// or its plugin called `restart_worker()`). Sent once; it keeps serving until drained.
    RecycleMe {
        reason: String,
        /// Asked by the plugin (`restart_worker()`), not by the request limit: the master
        /// replaces a worker that asked so at the earliest a moment after it became ready.
        #[serde(default)]
        by_plugin: bool,
    },
    /// The worker is exiting; `cut_*` count what it abandoned at its graceful deadline.
    Exiting {
        cut_requests: u64,
        cut_connections: u64,
    },
    /// Sent by the worker's I/O thread at a steady beat once ready: it is not wedged.
    Heartbeat,
    /// `accept` failed in a way that means the listener is gone (EBADF, ENOTSOCK, EINVAL):
    /// `own_fd` when this worker's fd 3 was closed or now names something else (the worker
    /// stopped accepting and wants a replacement); otherwise the shared socket no longer
    /// listens (the worker retries; the master re-arms it). At most once a second.
    ListenerLost { own_fd: bool, reason: String },
}

// ---------------------------------------------------------------------------------------------
// CLI <-> master (the control socket)

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    Reload,
    Rollback,
    Stop,
    Status,
    /// Start the `host` binary now on disk as a new master, hand it the listener, and retire.
    Upgrade,
    /// `host reload` with flags: this reload's canary instead of the config's.
    ReloadWith(CanaryOverride),
    /// `host promote`: end the canary's analysis (or the watch period) now, keeping the new
    /// generation.
    Promote,
    /// `host abort`: roll the canary (or the generation in its watch period) back now.
    Abort,
    /// A request for one worker group (`host reload GROUP`, `rollback GROUP`, ...). A request
    /// without it goes to every group (`status`, `stop`, `upgrade`) or to the first one.
    Group {
        group: String,
        request: Box<ControlRequest>,
    },
}

/// `host reload --canary N --analysis D`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryOverride {
    /// New workers held for analysis (0: roll out at once).
    pub workers: Option<u32>,
    pub analysis_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlResponse {
    Reloaded(ReloadReport),
    ReloadFailed(ReloadReport),
    Stopped {
        master_pid: u32,
    },
    Status(Box<StatusReport>),
    Refused {
        reason: String,
    },
    /// `host promote` during a watch period: the generation is kept, its watch ended.
    Judged(CanaryVerdict),
    /// A new master serves and owns the pidfile and the control socket; this one drains.
    Upgraded(UpgradeReport),
    /// The new master did not take over; this one serves on.
    UpgradeFailed {
        reason: String,
    },
}

/// A finished `host upgrade`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The master that answers (it drains its workers and exits next).
    pub old_pid: u32,
    pub new_pid: u32,
    /// The binary the new master runs, and its version and build id.
    pub exe: PathBuf,
    pub version: String,
    pub build: String,
    pub duration_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// old master <-> new master during `host upgrade` (see `master::binary_upgrade`)

/// From the new master to the one that started it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NewToOldMaster {
    /// Its first generation serves on the inherited listener.
    Serving {
        pid: u32,
        version: String,
        build: String,
    },
    /// It cannot serve, and exits.
    Failed { reason: String },
    /// It owns the pidfile and the control socket now.
    TookOver,
}

/// From the old master to the new one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum OldToNewMaster {
    /// Take the pidfile and the control socket.
    TakeOver,
}

// ---------------------------------------------------------------------------------------------
// framing

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o error on the channel")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message")]
    Decode(#[from] serde_json::Error),
}

/// A sender keeps at most this much of its buffer between flushes (a large frame's is freed).
const BATCH_KEPT: usize = 64 << 10;

/// Most bytes a busy link feeds before it flushes ([`Sender::feed`]).
pub const MAX_BATCH: usize = 256 << 10;

/// The sending half of a channel that carries `T`.
pub struct Sender<W, T> {
    inner: W,
    /// Frames fed and not yet written ([`Sender::feed`], [`Sender::flush`]).
    pending: Vec<u8>,
    _t: PhantomData<fn(T)>,
}

/// The receiving half of a channel that carries `T`.
pub struct Receiver<R, T> {
    inner: R,
    buf: Vec<u8>,
    _t: PhantomData<fn() -> T>,
}

impl<W: AsyncWrite + Unpin, T: Serialize> Sender<W, T> {
    pub fn new(inner: W) -> Self {
        Sender {
            inner,
            pending: Vec::new(),
            _t: PhantomData,
        }
    }

    /// Writes `msg` (and whatever was fed before it).
    pub async fn send(&mut self, msg: &T) -> Result<(), ProtocolError> {
        self.feed(msg)?;
        self.flush().await
    }

    /// Adds `msg` to what the next [`Sender::flush`] writes: a busy link writes the frames it
    /// has at one wake-up in one write. Too large a frame is refused here, nothing fed.
    pub fn feed(&mut self, msg: &T) -> Result<(), ProtocolError> {
        let at = self.pending.len();
        self.pending.extend_from_slice(&[0; 4]);
        if let Err(e) = serde_json::to_writer(&mut self.pending, msg) {
            self.pending.truncate(at);
            return Err(e.into());
        }
        let len = self.pending.len() - at - 4;
        if len > MAX_FRAME {
            self.pending.truncate(at);
            return Err(ProtocolError::TooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        self.pending[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }

    /// Bytes fed and not yet written.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes every frame fed so far.
    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        let result = self.inner.write_all(&self.pending).await;
        self.pending.clear();
        if self.pending.capacity() > BATCH_KEPT {
            self.pending = Vec::new();
        }
        result?;
        self.inner.flush().await?;
        Ok(())
    }
}

impl<R: AsyncRead + Unpin, T: DeserializeOwned> Receiver<R, T> {
    pub fn new(inner: R) -> Self {
        Receiver {
            inner,
            buf: Vec::new(),
            _t: PhantomData,
        }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn recv(&mut self) -> Result<Option<T>, ProtocolError> {
        let mut len = [0u8; 4];
        match self.inner.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(ProtocolError::TooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf).await?;
        Ok(Some(serde_json::from_slice(&self.buf)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_fed_go_in_one_write_and_a_refused_one_leaves_nothing() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut tx = Sender::<_, String>::new(a);
        let mut rx = Receiver::<_, String>::new(b);
        tx.feed(&"one".to_string()).unwrap();
        let before = tx.pending();
        assert!(matches!(
            tx.feed(&"x".repeat(MAX_FRAME)),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert_eq!(tx.pending(), before, "a refused frame leaves nothing fed");
        tx.feed(&"two".to_string()).unwrap();
        tx.flush().await.unwrap();
        assert_eq!(tx.pending(), 0);
        assert_eq!(rx.recv().await.unwrap().as_deref(), Some("one"));
        assert_eq!(rx.recv().await.unwrap().as_deref(), Some("two"));
    }

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut tx = Sender::<_, MasterToWorker>::new(a);
        let mut rx = Receiver::<_, MasterToWorker>::new(b);
        tx.send(&MasterToWorker::Drain).await.unwrap();
        assert!(matches!(
            rx.recv().await.unwrap(),
            Some(MasterToWorker::Drain)
        ));
        drop(tx);
        assert!(rx.recv().await.unwrap().is_none());

        // The largest `[plugin_config]`, escaped as much as JSON text can be, fits in a frame.
        let (a, b) = tokio::io::duplex(4 << 20);
        let mut tx = Sender::<_, MasterToWorker>::new(a);
        let mut rx = Receiver::<_, MasterToWorker>::new(b);
        let worst =
            serde_json::to_string(&"\"".repeat(crate::config::MAX_PLUGIN_CONFIG_BYTES / 2 - 1))
                .unwrap();
        assert!(worst.len() <= crate::config::MAX_PLUGIN_CONFIG_BYTES);
        let spec = WorkerSpec {
            slot: 0,
            generation: 1,
            plugin: "/srv/app/.host/plugins/x.so".into(),
            plugin_sha256: "0".repeat(64),
            graceful_timeout_ms: 0,
            idle_grace_ms: 0,
            max_body_bytes: 0,
            body_read_timeout_ms: 0,
            table_cell: None,
            table_cells: 0,
            accept_balance: true,
            header_read_timeout_ms: 0,
            max_headers: 0,
            max_header_bytes: 0,
            max_requests: 0,
            max_requests_jitter: 0,
            heartbeat_ms: 0,
            keepalive_timeout_ms: 0,
            send_timeout_ms: 0,
            max_connections: 0,
            http2_max_streams: 0,
            http2_send_buffer: 0,
            plugin_config: worst.clone(),
            config_dir: "/srv/app".into(),
            pool: PoolSpec::default(),
            access_log: None,
            gateway: None,
            gateway_links: vec!["/srv/app/.host/gateway/gw-0.sock".into()],
            gateway_handoffs: Vec::new(),
            gateway_event_timeout_ms: 0,
        };
        tx.send(&MasterToWorker::Start(spec)).await.unwrap();
        match rx.recv().await.unwrap() {
            Some(MasterToWorker::Start(spec)) => assert_eq!(spec.plugin_config, worst),
            other => panic!("{other:?}"),
        }

        let (mut a, b) = tokio::io::duplex(64);
        let mut rx = Receiver::<_, MasterToWorker>::new(b);
        a.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
        assert!(matches!(
            rx.recv().await,
            Err(ProtocolError::TooLarge { .. })
        ));
    }
}
