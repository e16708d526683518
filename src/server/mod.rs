//! Listeners and connections. [`serve`] is `skiff serve`: it opens storage
//! (recovering it), binds the listeners, runs until SIGTERM or SIGINT, then
//! stops accepting, answers what it has read, flushes and checkpoints.
//!
//! [`Server::start`] is the same without signals or process concerns, for
//! tests that want a broker on `127.0.0.1:0`.

mod handler;
mod session;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_listener::Event;

use crate::broker::{Broker, BrokerError, BrokerLimits};
use crate::config::Config;
use crate::metrics::{Listener, Metrics};
use crate::protocol::{encode_response, error_response, ErrorCode};
use crate::storage::{Storage, StorageError};

/// How long a graceful stop waits for connections to finish their requests.
const SHUTDOWN_DRAIN_MS_MAX: u64 = 10_000;
/// Upper bound on a fetch's long-poll wait, whatever the client asks.
const FETCH_WAIT_MS_MAX: u64 = 30_000;

/// The limits a session enforces, from config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_connections: usize,
    pub max_frame_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_inflight_bytes: usize,
    pub max_wait_ms: u64,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            max_connections: cfg.server.max_connections as usize,
            max_frame_bytes: cfg.server.max_frame_bytes as usize,
            max_batch_bytes: cfg.storage.max_batch_bytes as usize,
            max_inflight_bytes: cfg.server.max_inflight_bytes_per_connection as usize,
            max_wait_ms: FETCH_WAIT_MS_MAX,
        }
    }
}

/// A one-way latch that wakes everyone waiting on it.
#[derive(Default)]
pub struct Shutdown {
    triggered: AtomicBool,
    event: Event,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::SeqCst)
    }

    pub async fn wait(&self) {
        loop {
            let listener = self.event.listen();
            if self.is_triggered() {
                return;
            }
            listener.await;
        }
    }
}

/// What every session shares.
pub(crate) struct Ctx {
    pub broker: Arc<Broker>,
    pub settings: Settings,
    pub shutdown: Arc<Shutdown>,
    pub connections: AtomicUsize,
    pub connections_changed: Event,
    pub frame_errors: AtomicUsize,
    pub executor: Arc<smol::Executor<'static>>,
    pub metrics: Arc<Metrics>,
}

impl Ctx {
    pub(crate) fn metrics_frame_error(&self) {
        self.frame_errors.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// The storage engine could not open or recover the data directory.
    Storage(StorageError),
    Broker(BrokerError),
    /// A listener could not be bound: the address is in use, not local, or
    /// the socket path is not writable.
    Bind {
        addr: String,
        source: std::io::Error,
    },
    Signals(std::io::Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Storage(e) => write!(f, "storage: {e}"),
            Self::Broker(e) => write!(f, "{e}"),
            Self::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Self::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl From<StorageError> for ServeError {
    fn from(e: StorageError) -> Self {
        Self::Storage(e)
    }
}

impl From<BrokerError> for ServeError {
    fn from(e: BrokerError) -> Self {
        Self::Broker(e)
    }
}

/// A running broker: listeners bound, sessions served on an executor.
pub struct Server {
    ctx: Arc<Ctx>,
    metrics_addr: Option<SocketAddr>,
    /// What `/ready` answers: true from start-up's end to stop's start.
    ready: Arc<AtomicBool>,
    tcp_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    threads: Vec<std::thread::JoinHandle<()>>,
    accept_tasks: Vec<smol::Task<()>>,
    executor: Arc<smol::Executor<'static>>,
    /// Releases the network threads once sessions are drained.
    stopped: Arc<Shutdown>,
}

impl Server {
    /// Opens storage and the topic table from `cfg`, binds the listeners and
    /// starts serving on `threads` executor threads.
    pub fn start(cfg: &Config, threads: usize) -> Result<Server, ServeError> {
        let metrics = Metrics::new();
        let mut storage_cfg = storage_config(cfg);
        storage_cfg.observer = Some(crate::storage::Observer(metrics.clone()));
        let storage = Storage::open(storage_cfg)?;
        let (buffers, largest) = cfg.batch_pool_bounds();
        crate::bufpool::configure(buffers, largest);
        let reports = storage.recovery_report();
        metrics.record_recovery(
            reports.iter().map(|r| r.bytes_truncated).sum(),
            reports.iter().filter(|r| r.quarantined).count() as i64,
        );
        let broker = Broker::open(
            storage,
            cfg.data_dir.clone(),
            BrokerLimits {
                max_topics: cfg.server.max_topics as usize,
                max_partitions: cfg.server.max_partitions as usize,
                max_producers: cfg.producers.max_producers as usize,
                producer_idle_expiry_ms: cfg.producers.idle_expiry_ms,
            },
            partition_defaults(cfg),
            cfg.topic_defaults.partitions,
        )?;
        let executor = Arc::new(smol::Executor::new());
        let ctx = Arc::new(Ctx {
            broker,
            settings: Settings::from_config(cfg),
            shutdown: Arc::new(Shutdown::default()),
            connections: AtomicUsize::new(0),
            connections_changed: Event::new(),
            frame_errors: AtomicUsize::new(0),
            executor: executor.clone(),
            metrics: metrics.clone(),
        });
        let stopped = Arc::new(Shutdown::default());
        let mut accept_tasks = Vec::new();
        // The metrics listener is bound before the data listeners so that a
        // broker accepting clients is also answering /health and /ready.
        let ready = Arc::new(AtomicBool::new(false));
        let mut metrics_addr = None;
        if let Some(addr) = cfg.metrics_listen() {
            let listener = smol::net::TcpListener::try_from(bind_tcp(addr)?).map_err(|source| {
                ServeError::Bind {
                    addr: addr.to_string(),
                    source,
                }
            })?;
            metrics_addr = listener.local_addr().ok();
            accept_tasks.push(executor.spawn(crate::metrics::serve_http(
                listener,
                metrics.clone(),
                ready.clone(),
            )));
        }
        let mut tcp_addr = None;
        if let Some(addr) = cfg.tcp_listen() {
            let listener = smol::net::TcpListener::try_from(bind_tcp(addr)?).map_err(|source| {
                ServeError::Bind {
                    addr: addr.to_string(),
                    source,
                }
            })?;
            tcp_addr = Some(listener.local_addr().map_err(|source| ServeError::Bind {
                addr: addr.to_string(),
                source,
            })?);
            accept_tasks.push(executor.spawn(accept_tcp(listener, ctx.clone(), executor.clone())));
        }
        let mut unix_path = None;
        if let Some(path) = cfg.unix_socket() {
            let listener = bind_unix(&path)?;
            unix_path = Some(path);
            accept_tasks.push(executor.spawn(accept_unix(listener, ctx.clone(), executor.clone())));
        }
        accept_tasks.push(executor.spawn(snapshot_producers_loop(ctx.broker.clone())));
        accept_tasks
            .push(executor.spawn(producer_metrics_loop(ctx.broker.clone(), metrics.clone())));
        // Recovery is done and every listener is bound. Set before the
        // threads that poll the metrics task exist, so /ready never answers
        // 503 to a probe that arrived after the data port opened.
        ready.store(true, Ordering::SeqCst);
        let threads = (0..threads.max(1))
            .map(|i| {
                let ex = executor.clone();
                let stopped = stopped.clone();
                std::thread::Builder::new()
                    .name(format!("skiff-net-{i}"))
                    // Runs until stop() has drained the sessions.
                    .spawn(move || smol::block_on(ex.run(stopped.wait())))
                    .expect("spawning a network thread")
            })
            .collect();
        Ok(Server {
            ctx,
            metrics_addr,
            ready,
            tcp_addr,
            unix_path,
            threads,
            accept_tasks,
            executor,
            stopped,
        })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    /// Runs `fut` on the server's executor.
    pub fn spawn<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> smol::Task<T> {
        self.executor.spawn(fut)
    }

    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.ctx.broker
    }

    pub fn shutdown_handle(&self) -> Arc<Shutdown> {
        self.ctx.shutdown.clone()
    }

    /// Stops accepting, lets every connection answer what it has read (up
    /// to a bound), then flushes and checkpoints storage.
    pub fn stop(self) -> Result<(), ServeError> {
        self.ready.store(false, Ordering::SeqCst);
        self.ctx.shutdown.trigger();
        let ctx = self.ctx.clone();
        let drained = smol::block_on(self.executor.run(async {
            for t in self.accept_tasks {
                t.cancel().await;
            }
            let drain = async {
                loop {
                    let l = ctx.connections_changed.listen();
                    if ctx.connections.load(Ordering::SeqCst) == 0 {
                        return true;
                    }
                    l.await;
                }
            };
            let timeout = async {
                smol::Timer::after(Duration::from_millis(SHUTDOWN_DRAIN_MS_MAX)).await;
                false
            };
            futures_lite::future::or(drain, timeout).await
        }));
        if !drained {
            log::warn!(
                "{} connection(s) still busy after {SHUTDOWN_DRAIN_MS_MAX} ms; closing them",
                ctx.connections.load(Ordering::SeqCst)
            );
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        // Every session is done: the producer table is exact up to each
        // high watermark, so the next start scans nothing.
        ctx.broker.snapshot_producers(true);
        let result = ctx.broker.storage().shutdown();
        self.stopped.trigger();
        for t in self.threads {
            let _ = t.join();
        }
        result.map_err(ServeError::from)
    }
}

/// How often producer state is snapshotted while serving: bounds the log
/// scanned at the next start after a crash.
const PRODUCER_SNAPSHOT_INTERVAL_MS: u64 = 30_000;

async fn snapshot_producers_loop(broker: Arc<Broker>) {
    loop {
        smol::Timer::after(Duration::from_millis(PRODUCER_SNAPSHOT_INTERVAL_MS)).await;
        let b = broker.clone();
        // Off the network threads: each snapshot is a write and fsyncs.
        smol::unblock(move || b.snapshot_producers(false)).await;
    }
}

/// How often the producer table's counters are copied into the metrics.
const PRODUCER_METRICS_INTERVAL_MS: u64 = 1_000;

async fn producer_metrics_loop(broker: Arc<Broker>, metrics: Arc<Metrics>) {
    loop {
        let s = broker.producer_stats();
        metrics.observe_producers(crate::metrics::ProducerCounters {
            entries: s.entries,
            evictions: s.evictions,
            expirations: s.expirations,
            duplicate_batches: s.duplicate_batches,
            msg_id_duplicates: s.msg_id_duplicates,
            fenced: s.fenced,
            out_of_order: s.out_of_order,
        });
        smol::Timer::after(Duration::from_millis(PRODUCER_METRICS_INTERVAL_MS)).await;
    }
}

/// `skiff serve`: runs until SIGTERM or SIGINT, then stops gracefully.
/// Under systemd (`Type=notify`) it says READY once recovery is done and
/// the listeners are bound, keeps STATUS current, feeds the watchdog only
/// while both the network executor and the storage thread answer, and says
/// STOPPING when it begins to stop.
pub fn serve(cfg: &Config) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    let watchdog = crate::notify::Watchdog::from_env().unwrap_or_else(|e| {
        log::warn!("systemd watchdog disabled: {e}");
        crate::notify::Watchdog::disabled()
    });
    let server = Server::start(cfg, network_threads())?;
    let storage = server.broker().storage().clone();
    let budget = cfg.memory_budget();
    log::info!(
        "skiff {} serving: backend {}, data {}, tcp {}, unix {}, metrics {}, memory budget {}",
        env!("CARGO_PKG_VERSION"),
        storage.backend_name(),
        cfg.data_dir.display(),
        server
            .tcp_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        server
            .unix_path()
            .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
        server
            .metrics_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        crate::config::human(budget.total_bytes()),
    );
    let partitions = storage.partitions().len();
    notify(&format!(
        "READY=1\nSTATUS=serving {} partition(s) on the {} backend",
        partitions,
        storage.backend_name()
    ));
    let interval = watchdog.beat_interval();
    let network = watchdog.register("network");
    let beat_network = server.spawn(async move {
        loop {
            network.beat();
            smol::Timer::after(interval).await;
        }
    });
    let storage_hb = watchdog.register("storage");
    let beat_storage = server.spawn(async move {
        // A ping goes through the storage thread's queue: a hung thread
        // (a stuck device) never answers, the beats stop, and so do the
        // watchdog pings.
        while storage.ping().await.is_ok() {
            storage_hb.beat();
            smol::Timer::after(interval).await;
        }
    });
    let ticker = watchdog.start().map_err(ServeError::Signals)?;
    if let Some(sig) = signals.forever().next() {
        log::info!("signal {sig}: stopping");
    }
    notify("STOPPING=1\nSTATUS=stopping: finishing requests, flushing");
    drop(ticker);
    drop(beat_network);
    drop(beat_storage);
    server.stop()?;
    log::info!("stopped cleanly");
    Ok(())
}

/// Best effort: not running under systemd is normal, a failing socket is
/// logged once per message.
fn notify(state: &str) {
    if let Err(e) = crate::notify::notify(state) {
        log::warn!("sd_notify: {e}");
    }
}

fn network_threads() -> usize {
    // The storage thread takes one core's worth of work at most; the
    // network side gets the rest, and at least one thread.
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .clamp(1, 4)
}

pub fn storage_config(cfg: &Config) -> crate::storage::StorageConfig {
    crate::storage::StorageConfig {
        data_dir: cfg.data_dir.clone(),
        backend: cfg.storage.backend,
        append_queue_depth: cfg.storage.append_queue_depth as usize,
        tail_buffer_bytes: cfg.storage.tail_buffer_bytes as usize,
        max_partitions: cfg.server.max_partitions as usize,
        max_batch_bytes: cfg.storage.max_batch_bytes as usize,
        prewrite_segments: cfg.storage.prewrite_segments,
        pipelined_fsync: cfg.storage.pipelined_fsync,
        ..crate::storage::StorageConfig::default()
    }
}

pub fn partition_defaults(cfg: &Config) -> crate::storage::PartitionConfig {
    let d = &cfg.topic_defaults;
    crate::storage::PartitionConfig {
        segment_bytes: d.segment_bytes,
        segments: d.segments,
        retention_ms: (d.retention_ms > 0).then_some(d.retention_ms),
        durability: d.fsync,
        overflow: d.overflow,
    }
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    Ok(l)
}

fn bind_unix(path: &Path) -> Result<smol::net::unix::UnixListener, ServeError> {
    let err = |source| ServeError::Bind {
        addr: path.display().to_string(),
        source,
    };
    if path.exists() {
        // A socket file left by a killed broker: remove it, unless a live
        // broker still answers on it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    smol::net::unix::UnixListener::bind(path).map_err(err)
}

/// Refuses a connection above `max_connections` with a typed error frame.
async fn refuse<S: futures_lite::AsyncWrite + Unpin>(mut stream: S, max: usize) {
    let mut buf = Vec::new();
    let r = error_response(
        0,
        ErrorCode::TooManyConnections,
        format!("connection limit reached ({max})"),
    );
    if encode_response(&r, &mut buf).is_ok() {
        use futures_lite::AsyncWriteExt;
        let _ = stream.write_all(&buf).await;
        let _ = stream.close().await;
    }
}

fn admit(ctx: &Ctx) -> bool {
    let prev = ctx.connections.fetch_add(1, Ordering::SeqCst);
    if prev >= ctx.settings.max_connections {
        ctx.connections.fetch_sub(1, Ordering::SeqCst);
        false
    } else {
        true
    }
}

fn spawn_session<S>(
    stream: S,
    ctx: Arc<Ctx>,
    ex: &smol::Executor<'static>,
    peer: String,
    listener: Listener,
) where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Clone + Unpin + Send + 'static,
{
    ex.spawn(async move {
        let _open = ctx.metrics.connection_opened(listener);
        session::run(stream, ctx.clone(), peer).await;
        ctx.connections.fetch_sub(1, Ordering::SeqCst);
        ctx.connections_changed.notify(usize::MAX);
    })
    .detach();
}

async fn accept_tcp(
    listener: smol::net::TcpListener,
    ctx: Arc<Ctx>,
    ex: Arc<smol::Executor<'static>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                if admit(&ctx) {
                    spawn_session(stream, ctx.clone(), &ex, peer.to_string(), Listener::Tcp);
                } else {
                    ex.spawn(refuse(stream, ctx.settings.max_connections))
                        .detach();
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accept on tcp: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_unix(
    listener: smol::net::unix::UnixListener,
    ctx: Arc<Ctx>,
    ex: Arc<smol::Executor<'static>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if admit(&ctx) {
                    spawn_session(stream, ctx.clone(), &ex, "unix".to_owned(), Listener::Unix);
                } else {
                    ex.spawn(refuse(stream, ctx.settings.max_connections))
                        .detach();
                }
            }
            Err(e) => {
                log::warn!("accept on unix socket: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}
