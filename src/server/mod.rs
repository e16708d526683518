//! Listeners and connections. [`serve`] is `skiff serve`: it opens storage
//! (recovering it), binds the listeners, runs until SIGTERM or SIGINT, then
//! stops accepting, answers what it has read, flushes and checkpoints.
//!
//! [`Server::start`] is the same without signals or process concerns, for
//! tests that want a broker on `127.0.0.1:0`.
//!
//! The server speaks to the broker only: it never names storage (a test
//! below holds it to that). Produce batches are copied out of their frames
//! into the server's own [`BatchPool`].

pub mod acl;
mod groups;
mod handler;
pub mod quota;
mod session;
mod share;
pub mod tls;
pub(crate) mod txn;
mod x509;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use event_listener::Event;

use crate::broker::group::{Coordinator, GroupsConfig};
use crate::broker::share::{ShareConfig, ShareCoordinator};
use crate::broker::{Broker, BrokerError};
use crate::bufpool::BatchPool;
use crate::config::Config;
use crate::metrics::{Listener, Metrics, RefusalReason};
use crate::protocol::{encode_response, error_response, ErrorCode};

pub use crate::broker::Shutdown;

use acl::{Acl, DenialLog, ANONYMOUS};
use quota::{AddrGuard, IdentityGuard, Quotas};
use tls::{TlsError, TlsSetup, TlsSlot};

/// How long, and how many bytes, the socket of a refused client is read
/// and dropped after the refusal (`refuse`, `close_refused`): enough for
/// the hello a client writes before it reads, or the first request a TLS
/// client writes after its side of the handshake; a peer that sends more,
/// or never closes, holds its socket no longer, and is reset if its bytes
/// are still unread then. The connection holds no slot meanwhile (its
/// server and address slots are given back first).
const REFUSED_DRAIN_MS_MAX: u64 = 1_000;
const REFUSED_DRAIN_BYTES_MAX: usize = 64 * 1024;
/// How many refused TLS clients (before their handshake, by their
/// address's limits or `server.max_connections`, or in or right after it)
/// are closed in order at a time (`start_closing`); the open-file limit is
/// raised for them.
const TLS_REFUSED_CLOSING_MAX: usize = 64;
/// How many refused clients are answered `too_many_connections` at a time
/// (`refuse_in_turn`), each on a task holding its socket; one past them is
/// closed at once, unanswered, so a flood past a limit costs bounded tasks
/// and descriptors. The open-file limit is raised for them.
const REFUSALS_ANSWERING_MAX: usize = 64;

/// How long a graceful stop waits for connections to finish their requests.
const SHUTDOWN_DRAIN_MS_MAX: u64 = 10_000;
/// How long a graceful stop waits for the mirror's open transaction.
const MIRROR_STOP_MS_MAX: u64 = 5_000;
/// Upper bound on a fetch's long-poll wait, whatever the client asks.
const FETCH_WAIT_MS_MAX: u64 = 30_000;

/// The limits a session enforces, from config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_connections: usize,
    pub max_frame_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_inflight_bytes: usize,
    pub max_inflight_bytes_shared: usize,
    pub max_wait_ms: u64,
    /// `server.frame_timeout_ms`: for a hello after connecting, and for
    /// the next byte of a frame begun.
    pub frame_timeout: Duration,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            max_connections: cfg.server.max_connections as usize,
            max_frame_bytes: cfg.server.max_frame_bytes as usize,
            max_batch_bytes: cfg.storage.max_batch_bytes as usize,
            max_inflight_bytes: cfg.server.max_inflight_bytes_per_connection as usize,
            max_inflight_bytes_shared: cfg.server.max_inflight_bytes_shared as usize,
            max_wait_ms: FETCH_WAIT_MS_MAX,
            frame_timeout: Duration::from_millis(cfg.server.frame_timeout_ms),
        }
    }
}

/// What every session shares.
pub(crate) struct Ctx {
    pub broker: Arc<Broker>,
    /// The consumer-group coordinator, a client of `broker`.
    pub groups: Arc<Coordinator>,
    /// The share-group coordinator (queues), a client of `broker`.
    pub share: Arc<ShareCoordinator>,
    /// The transaction coordinator, a client of `broker` and `groups`.
    pub txns: Arc<crate::broker::txn::Coordinator>,
    /// Where produce batches are copied out of their frames.
    pub pool: BatchPool,
    pub settings: Settings,
    /// Produce bytes held past their connections' own shares.
    pub inflight_shared: Arc<session::SharedInFlight>,
    pub shutdown: Arc<Shutdown>,
    pub connections: AtomicUsize,
    pub connections_changed: Event,
    /// Refusals being answered (`refuse_in_turn`).
    refusing: Arc<AtomicUsize>,
    pub executor: Arc<smol::Executor<'static>>,
    pub metrics: Arc<Metrics>,
    /// The `[acl]` in force; replaced on reload.
    acl: RwLock<Arc<Acl>>,
    pub denials: DenialLog,
    pub quotas: Arc<Quotas>,
    /// `server.unix_identities` by uid; replaced on reload.
    unix_names: RwLock<Arc<HashMap<u32, Arc<str>>>>,
    /// What `mirror status` reports and `mirror pause|resume` change.
    pub mirror: Arc<crate::mirror::MirrorStatus>,
}

impl Ctx {
    pub(crate) fn metrics_frame_error(&self) {
        self.metrics.malformed_frame();
    }

    pub(crate) fn acl(&self) -> Arc<Acl> {
        self.acl.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A Unix socket peer's identity: its configured name, else `uid:N`.
    fn unix_identity(&self, uid: u32) -> Arc<str> {
        let names = self
            .unix_names
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match names.get(&uid) {
            Some(name) => name.clone(),
            None => format!("uid:{uid}").into(),
        }
    }

    fn set_policy(&self, cfg: &Config) {
        *self.acl.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Acl::from_config(&cfg.acl));
        *self.unix_names.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(unix_names(cfg));
        self.quotas.set_limits(cfg.quotas.clone());
    }
}

fn unix_names(cfg: &Config) -> HashMap<u32, Arc<str>> {
    cfg.server
        .unix_identities
        .iter()
        .map(|u| (u.uid, Arc::from(u.identity.as_str())))
        .collect()
}

#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// The broker could not open or recover the data directory, or could
    /// not flush it at the end.
    Broker(BrokerError),
    /// A listener could not be bound: the address is in use, not local, or
    /// the socket path is not writable.
    Bind {
        addr: String,
        source: std::io::Error,
    },
    Signals(std::io::Error),
    /// `[server.tls]` names a file that cannot be used (see [`TlsError`]).
    Tls(TlsError),
    /// `[mirror]` names TLS files that cannot be used.
    Mirror(crate::mirror::kafka::KafkaError),
    /// `serve --ready-file` could not be written (its directory is missing
    /// or not writable).
    ReadyFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Broker(e) => write!(f, "{e}"),
            Self::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Self::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            Self::Tls(e) => write!(f, "{e}"),
            Self::Mirror(e) => write!(f, "invalid '[mirror]': {e}"),
            Self::ReadyFile { path, source } => {
                write!(
                    f,
                    "cannot write the ready file {}: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for ServeError {}

impl From<TlsError> for ServeError {
    fn from(e: TlsError) -> Self {
        Self::Tls(e)
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
    tls_addr: Option<SocketAddr>,
    /// The TLS setup in force, when TLS is on; replaced by [`Server::reload`].
    tls: Option<Arc<TlsSlot>>,
    unix_path: Option<PathBuf>,
    threads: Vec<std::thread::JoinHandle<()>>,
    accept_tasks: Vec<smol::Task<()>>,
    executor: Arc<smol::Executor<'static>>,
    /// Releases the network threads once sessions are drained.
    stopped: Arc<Shutdown>,
    /// The forwarder, when `[mirror]` is on: it ends its transaction and
    /// returns once the broker begins to stop.
    mirror_task: Option<smol::Task<()>>,
}

impl Server {
    /// Opens storage and the topic table from `cfg`, binds the listeners and
    /// starts serving on `threads` executor threads.
    pub fn start(cfg: &Config, threads: usize) -> Result<Server, ServeError> {
        // Before storage is opened: a broken TLS config stops start-up at
        // once, and skiff never serves without the TLS it was told to.
        let tls = TlsSetup::load(&cfg.server.tls)?;
        let metrics = Metrics::new();
        let broker = Broker::open_config(cfg, Some(metrics.clone()))?;
        metrics.record_recovery(&broker.recovery_summary());
        let groups = Coordinator::open(broker.clone(), GroupsConfig::from_config(cfg))?;
        let share = ShareCoordinator::open(broker.clone(), ShareConfig::from_config(cfg))?;
        let txns = crate::broker::txn::Coordinator::open(
            broker.clone(),
            groups.clone(),
            crate::broker::txn::TxnConfig::from_config(cfg),
        )?;
        metrics.record_recovery_erased(broker.recovery_stale_erased());
        metrics.record_recovery_damaged(
            broker
                .recovery_damage()
                .iter()
                .map(|(_, d)| d.to_offset - d.from_offset)
                .sum(),
        );
        metrics.set_health_notes(broker.storage_notes());
        let mut mirror =
            crate::mirror::Mirror::new(&cfg.mirror, broker.clone(), Some(metrics.clone()))
                .map_err(ServeError::Mirror)?;
        let bounds = cfg.batch_pool_bounds();
        let executor = Arc::new(smol::Executor::new());
        let ctx = Arc::new(Ctx {
            pool: BatchPool::bounded(bounds.buffers, bounds.buffer_bytes_max, bounds.bytes_max),
            shutdown: broker.stopping(),
            broker,
            groups: groups.clone(),
            share: share.clone(),
            txns: txns.clone(),
            settings: Settings::from_config(cfg),
            inflight_shared: Arc::new(session::SharedInFlight::new(
                cfg.server.max_inflight_bytes_shared as usize,
                metrics.inflight_shared(),
            )),
            connections: AtomicUsize::new(0),
            connections_changed: Event::new(),
            refusing: Arc::new(AtomicUsize::new(0)),
            executor: executor.clone(),
            metrics: metrics.clone(),
            acl: RwLock::new(Arc::new(Acl::from_config(&cfg.acl))),
            denials: DenialLog::default(),
            quotas: Quotas::new(cfg.quotas.clone()),
            unix_names: RwLock::new(Arc::new(unix_names(cfg))),
            mirror: mirror.status.clone(),
        });
        let stopped = Arc::new(Shutdown::default());
        let mut accept_tasks = Vec::new();
        // The metrics listener is bound before the data listeners so that a
        // broker accepting clients is also answering /health and /ready.
        let ready = Arc::new(AtomicBool::new(false));
        let mut metrics_addr = None;
        if let Some(addr) = cfg.metrics_listen() {
            let listener = bind_tcp(addr, METRICS_BACKLOG)?;
            metrics_addr = listener.local_addr().ok();
            accept_tasks.push(executor.spawn(crate::metrics::serve_http(
                listener,
                metrics.clone(),
                ready.clone(),
            )));
        }
        let mut tcp_addr = None;
        if let Some(addr) = cfg.tcp_listen() {
            let listener = bind_tcp(addr, cfg.server.max_connections)?;
            tcp_addr = Some(listener.local_addr().map_err(|source| ServeError::Bind {
                addr: addr.to_string(),
                source,
            })?);
            accept_tasks.push(executor.spawn(accept_tcp(listener, ctx.clone(), executor.clone())));
        }
        let mut tls_addr = None;
        let mut tls_slot = None;
        if let (Some(addr), Some(setup)) = (cfg.tls_listen(), tls) {
            let listener = bind_tcp(addr, cfg.server.max_connections)?;
            tls_addr = Some(listener.local_addr().map_err(|source| ServeError::Bind {
                addr: addr.to_string(),
                source,
            })?);
            let slot = Arc::new(TlsSlot::new(setup));
            tls_slot = Some(slot.clone());
            accept_tasks.push(executor.spawn(accept_tls(
                listener,
                ctx.clone(),
                executor.clone(),
                slot,
            )));
        }
        let mut unix_path = None;
        if let Some(path) = cfg.unix_socket() {
            let listener = bind_unix(&path)?;
            unix_path = Some(path);
            accept_tasks.push(executor.spawn(accept_unix(listener, ctx.clone(), executor.clone())));
        }
        accept_tasks.push(executor.spawn(snapshot_producers_loop(ctx.broker.clone())));
        // Not cancelled with the accept tasks: commits made while
        // sessions drain are written too.
        executor.spawn(groups.clone().run_log()).detach();
        accept_tasks.push(executor.spawn(groups.clone().run_timers()));
        // As the offsets log: acks made while sessions drain are written.
        executor.spawn(share.clone().run_log()).detach();
        accept_tasks.push(executor.spawn(share.clone().run_timers()));
        // Ends what the last run left open (read_committed readers of its
        // partitions wait for it); needs the offsets log's writer above.
        executor.spawn(txns.clone().recover()).detach();
        accept_tasks.push(executor.spawn(txns.clone().run_timers()));
        accept_tasks.push(
            executor.spawn(
                ctx.broker
                    .clone()
                    .run_cleaner(Duration::from_millis(CLEANER_INTERVAL_MS)),
            ),
        );
        let refresh = MetricsRefresh {
            groups,
            share,
            txns,
            broker: ctx.broker.clone(),
            shown: Default::default(),
        };
        metrics.set_refresh(refresh);
        let mirror_task = mirror.take_forwarder().map(|f| executor.spawn(f.run()));
        // Storage, the producer table and the coordinators' logs are
        // recovered and every listener is bound; transactions the last run
        // left open are still being ended (`txns.recover()` above runs on
        // the threads below, beside the first sessions; read_committed
        // readers of its partitions wait for it). Set before the threads that
        // poll the metrics task exist, so /ready never answers 503 to a
        // probe that arrived after the data port opened.
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
            tls_addr,
            tls: tls_slot,
            unix_path,
            threads,
            accept_tasks,
            executor,
            stopped,
            mirror_task,
        })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Applies what can change without a restart: the TLS certificate,
    /// key, CA and CRL files (read again; handshakes from now on use
    /// them, connections already up keep theirs), `[acl]`, `[quotas]` and
    /// `server.unix_identities`. On error nothing changes.
    pub fn reload(&self, cfg: &Config) -> Result<(), ServeError> {
        if let Some(slot) = &self.tls {
            match TlsSetup::load(&cfg.server.tls)? {
                Some(setup) => slot.replace(setup),
                None => log::warn!(
                    "reload: server.tls.listen is now empty; the TLS listener stays up until a restart"
                ),
            }
        } else if !cfg.server.tls.listen.is_empty() {
            log::warn!("reload: a TLS listener is only opened at start-up; restart to open one");
        }
        self.ctx.set_policy(cfg);
        Ok(())
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

    /// Serves a stream connected elsewhere as a session, as a listener
    /// would: counted against `max_connections` (refused with
    /// `too_many_connections` above it) and in the metrics under
    /// `listener`. Any stream will do, shared between its reader and
    /// writer through a lock: a TLS stream, or a test's.
    pub fn serve_stream<S>(&self, stream: S, peer: String, listener: Listener)
    where
        S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + Send + 'static,
    {
        let conn = session::Locked(stream);
        admit_and_spawn(
            conn,
            &self.ctx,
            &self.executor,
            peer,
            ANONYMOUS.into(),
            None,
            None,
            listener,
        );
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

    /// Stops accepting, ends long-polls, lets every connection answer what
    /// it has read (up to a bound), then closes the broker (which flushes
    /// and checkpoints storage).
    pub fn stop(self) -> Result<(), ServeError> {
        self.ready.store(false, Ordering::SeqCst);
        self.ctx.broker.begin_stop();
        let ctx = self.ctx.clone();
        let mirror_task = self.mirror_task;
        let drained = smol::block_on(self.executor.run(async {
            for t in self.accept_tasks {
                t.cancel().await;
            }
            if let Some(task) = mirror_task {
                // The forwarder sees the stop between transactions; one in
                // flight gets a moment to commit. Cut off, it is aborted by
                // the next start's InitProducerId.
                let finished = async {
                    task.await;
                    true
                };
                let timeout = async {
                    smol::Timer::after(Duration::from_millis(MIRROR_STOP_MS_MAX)).await;
                    false
                };
                if !futures_lite::future::or(finished, timeout).await {
                    log::warn!("mirror: a transaction was still open at the stop; the next start aborts it");
                }
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
        let result = ctx.broker.close();
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

/// Also sweeps unused producer names on the same wake-up (a comparison
/// unless one is due; see `Producers::expire_names`).
async fn snapshot_producers_loop(broker: Arc<Broker>) {
    loop {
        smol::Timer::after(Duration::from_millis(PRODUCER_SNAPSHOT_INTERVAL_MS)).await;
        let b = broker.clone();
        // Off the network threads: each snapshot is a write and fsyncs.
        crate::offload::run(move || b.snapshot_producers(false)).await;
        if let Err(e) = broker.expire_producer_names().await {
            log::warn!("cannot forget unused producer names: {e}");
        }
    }
}

/// Copies what the coordinators and the producer table count into the
/// metrics, when they are read (`Metrics::set_refresh`). Four loops did it
/// once a second before, and with the timers of the coordinators they were
/// nearly all of an idle broker's wake-ups (docs/performance.md, "An idle
/// broker"). `/health` copies only its notes: a probe polling it often
/// paid for every group's lag each time.
struct MetricsRefresh {
    groups: Arc<Coordinator>,
    share: Arc<ShareCoordinator>,
    txns: Arc<crate::broker::txn::Coordinator>,
    broker: Arc<Broker>,
    /// The group lag series shown last time: those gone since are removed.
    shown: std::sync::Mutex<std::collections::BTreeSet<(String, String, u32)>>,
}

impl crate::metrics::Refresh for MetricsRefresh {
    fn scrape(&self, metrics: &Metrics) {
        self.groups(metrics);
        self.share(metrics);
        self.txns(metrics);
        self.producers(metrics);
        metrics.observe_storage(self.broker.storage_stats().quarantined);
    }

    /// The storage fallbacks in use: a topic created since start-up may
    /// have met one.
    fn health(&self, metrics: &Metrics) {
        metrics.set_health_notes(self.broker.storage_notes());
    }
}

impl MetricsRefresh {
    /// `skiff_group_lag_records`: every committed offset's lag, and no
    /// series for offsets that are gone.
    fn groups(&self, metrics: &Metrics) {
        let mut now = std::collections::BTreeSet::new();
        for (g, t, p, lag) in self.groups.lag() {
            metrics.set_group_lag(&g, &t, p, i64::try_from(lag).unwrap_or(i64::MAX));
            now.insert((g, t, p));
        }
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        for (g, t, p) in shown.difference(&now) {
            metrics.remove_group_lag(g, t, *p);
        }
        *shown = now;
        let s = self.groups.stats();
        metrics.observe_groups(s.commits, s.log_writes);
    }

    /// Records in flight per share group and topic, dead-letter depth,
    /// counters.
    fn share(&self, metrics: &Metrics) {
        let share = &self.share;
        let load: Vec<_> = share
            .load_by_group()
            .into_iter()
            .map(|l| (l.group, l.topic, l.in_flight, l.acquired))
            .collect();
        let depth: Vec<_> = share
            .dead_letter_topics()
            .into_iter()
            .filter_map(|t| {
                let d: u64 = (0..share.broker().topic(&t).ok()?.partitions)
                    .filter_map(|p| share.broker().offsets(&t, p).ok())
                    .map(|o| o.high_watermark - o.earliest)
                    .sum();
                Some((t, d))
            })
            .collect();
        let s = share.stats();
        metrics.share.observe(
            &load,
            &depth,
            crate::metrics::ShareCounters {
                redeliveries: s.redeliveries,
                dead_lettered: s.dead_lettered,
                lost: s.lost,
                log_writes: s.log_writes,
                partitions_skipped: s.partitions_skipped,
            },
        );
    }

    fn txns(&self, metrics: &Metrics) {
        let txns = &self.txns;
        let broker = txns.broker();
        let lags: Vec<(String, u32, u64)> = broker
            .txn_index
            .held_back()
            .into_iter()
            .filter_map(|(t, p, first)| {
                let hw = broker.offsets(&t, p).ok()?.high_watermark;
                Some((t, p, hw.saturating_sub(first)))
            })
            .collect();
        let s = &txns.stats;
        metrics.observe_txns(
            crate::metrics::TxnCounters {
                open: txns.open_count() as u64,
                commits: s.commits.load(Ordering::Relaxed),
                aborts: s.aborts.load(Ordering::Relaxed),
                timeouts: s.timeouts.load(Ordering::Relaxed),
                id_expirations: s.expirations.load(Ordering::Relaxed),
                aborted_ranges: txns.aborted_ranges() as u64,
            },
            &lags,
        );
    }

    /// The producer table's and the cleaner's counters.
    fn producers(&self, metrics: &Metrics) {
        let broker = &self.broker;
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
        let c = broker.cleaner_stats();
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        metrics.observe_cleaner(crate::metrics::CleanerCounters {
            runs: g(&c.runs),
            passes: g(&c.passes),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
            records_removed: g(&c.records_removed),
            segments_freed: g(&c.segments_freed),
            lag_bytes: g(&c.lag_bytes),
            progress_bytes: g(&c.progress_bytes),
        });
    }
}

/// How often the cleaner looks again while it has work: its passes go
/// on one after another at this pace until every partition has room.
const CLEANER_INTERVAL_MS: u64 = 200;

/// `skiff serve`: runs until SIGTERM or SIGINT, then stops gracefully.
/// SIGHUP reloads: `reload` reads the config again and [`Server::reload`]
/// applies what may change while serving; a config that does not load
/// leaves everything as it was (and says why in the log).
/// Under systemd (`Type=notify`) it says READY once storage, the producer
/// table and the coordinators' logs are recovered and the listeners are
/// bound (transactions the last run left open may still be ending), keeps
/// STATUS current, feeds the watchdog only while both the network executor
/// and the storage thread answer, and says STOPPING when it begins to stop.
pub fn serve(
    cfg: &Config,
    ready_file: Option<&Path>,
    reload: &dyn Fn() -> Result<Config, crate::config::ConfigError>,
) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(ServeError::Signals)?;
    let watchdog = crate::notify::Watchdog::from_env().unwrap_or_else(|e| {
        log::warn!("systemd watchdog disabled: {e}");
        crate::notify::Watchdog::disabled()
    });
    raise_fd_limit(cfg);
    let server = Server::start(cfg, network_threads())?;
    let broker = server.broker().clone();
    let budget = cfg.memory_budget();
    log::info!(
        "skiff {} serving: backend {}, data {}, tcp {}, tls {}, unix {}, metrics {}, acl {}, {}",
        env!("CARGO_PKG_VERSION"),
        broker.backend_name(),
        cfg.data_dir.display(),
        server
            .tcp_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        server.tls_addr().map_or_else(
            || "off".to_owned(),
            |a| format!(
                "{a}{}",
                if cfg.server.tls.client_ca.is_empty() {
                    ""
                } else {
                    " (client certificates required)"
                }
            )
        ),
        server
            .unix_path()
            .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
        server
            .metrics_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        if cfg.acl.enabled {
            format!("on ({} rule(s))", cfg.acl.rules.len())
        } else {
            "off".to_owned()
        },
        budget.summary(),
    );
    if let Some(path) = ready_file {
        if let Err(source) = write_ready_file(path, &server) {
            // Whoever waits for the file would wait forever: stop cleanly
            // and say why.
            server.stop()?;
            return Err(ServeError::ReadyFile {
                path: path.to_owned(),
                source,
            });
        }
    }
    notify(&format!(
        "READY=1\nSTATUS=serving {} partition(s) on the {} backend",
        broker.partition_count(),
        broker.backend_name()
    ));
    // Beats only for a watchdog: without one they would wake an idle
    // broker, and ping the storage thread, every second for nobody.
    let beats = watchdog.is_enabled().then(|| {
        let interval = watchdog.beat_interval();
        let network = watchdog.register("network");
        let beat_network = server.spawn(async move {
            loop {
                network.beat();
                smol::Timer::after(interval).await;
            }
        });
        let storage_hb = watchdog.register("storage");
        let beat_storage = server.spawn(storage_heartbeat(broker, storage_hb, interval));
        (beat_network, beat_storage)
    });
    let ticker = watchdog.start().map_err(ServeError::Signals)?;
    for sig in signals.forever() {
        if sig == SIGHUP {
            let outcome = reload().map_err(|e| e.to_string()).and_then(|new| {
                server.reload(&new).map_err(|e| e.to_string())?;
                Ok(crate::config::restart_only_changes(cfg, &new))
            });
            match outcome {
                Ok(ignored) => {
                    log::info!(
                        "SIGHUP: reloaded TLS files, [acl], [quotas] and server.unix_identities"
                    );
                    if !ignored.is_empty() {
                        log::warn!(
                            "SIGHUP: changed since start-up, applied only by a restart: {}",
                            ignored.join(", ")
                        );
                    }
                }
                Err(e) => log::error!("SIGHUP: reload failed, nothing changed: {e}"),
            }
            continue;
        }
        log::info!("signal {sig}: stopping");
        break;
    }
    notify("STOPPING=1\nSTATUS=stopping: finishing requests, flushing");
    drop(ticker);
    drop(beats);
    server.stop()?;
    if let Some(path) = ready_file {
        let _ = std::fs::remove_file(path);
    }
    log::info!("stopped cleanly");
    Ok(())
}

/// Descriptors beyond the connections: listeners, the storage thread's
/// segment files (a few per partition), checkpoints, the metrics endpoint.
const FDS_BESIDE_CONNECTIONS: u64 = 256;

/// Raises the open-file limit so that `server.max_connections` can be
/// reached: the usual soft limit (1,024) is below a gateway's thousand
/// devices plus the data files. Short of it, skiff still serves, and says
/// how many connections it can take.
fn raise_fd_limit(cfg: &Config) {
    let files = u64::from(cfg.server.max_partitions)
        .saturating_mul(u64::from(cfg.topic_defaults.segments).max(1) + 1);
    let want = u64::from(cfg.server.max_connections)
        .saturating_add(files)
        .saturating_add(FDS_BESIDE_CONNECTIONS)
        .saturating_add(TLS_REFUSED_CLOSING_MAX as u64)
        .saturating_add(REFUSALS_ANSWERING_MAX as u64);
    match crate::fdlimit::raise(want) {
        Ok(l) if l.soft >= want => {}
        Ok(l) => log::warn!(
            "open-file limit {} (hard limit {}) is below the {want} descriptors server.max_connections = {} needs: \
             connections past about {} will fail to be accepted; raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn)",
            l.soft,
            l.hard,
            cfg.server.max_connections,
            l.soft.saturating_sub(want - u64::from(cfg.server.max_connections)),
        ),
        Err(e) => log::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// What `serve --ready-file` writes once storage, the producer table and
/// the coordinators' logs are recovered and every listener is bound (as
/// `/ready`; transactions the last run left open may still be ending): the addresses really bound, so a config may ask for
/// port 0 and a script or test learn the port without racing anyone for
/// it. JSON, written to a temporary name and renamed, so a reader that
/// sees the file sees all of it.
fn write_ready_file(path: &Path, server: &Server) -> std::io::Result<()> {
    let text = serde_json::json!({
        "pid": std::process::id(),
        "tcp": server.tcp_addr().map(|a| a.to_string()),
        "tls": server.tls_addr().map(|a| a.to_string()),
        "unix": server.unix_path().map(|p| p.display().to_string()),
        "metrics": server.metrics_addr().map(|a| a.to_string()),
    })
    .to_string();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, path)
}

/// Best effort: not running under systemd is normal, a failing socket is
/// logged once per message.
fn notify(state: &str) {
    if let Err(e) = crate::notify::notify(state) {
        log::warn!("sd_notify: {e}");
    }
}

/// The storage thread's proof of life for the systemd watchdog: beats
/// every `interval` while the thread answers a ping. A ping goes through
/// the storage thread's queue: a hung thread (an fdatasync on a stuck
/// device that never returns) never answers, the beats stop, and so do the
/// watchdog pings, so systemd restarts skiff instead of acks stalling
/// forever.
pub async fn storage_heartbeat(
    broker: Arc<Broker>,
    heartbeat: crate::notify::Heartbeat,
    interval: std::time::Duration,
) {
    while broker.ping_storage().await.is_ok() {
        heartbeat.beat();
        smol::Timer::after(interval).await;
    }
}

fn network_threads() -> usize {
    // The storage thread takes one core's worth of work at most; the
    // network side gets the rest, and at least one thread.
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .clamp(1, crate::config::NETWORK_THREADS_MAX)
}

/// std's listen backlog (128 on Linux): what the metrics listener keeps.
const METRICS_BACKLOG: u32 = 128;

/// Binds a TCP listener whose accept queue holds `backlog` connections
/// (the kernel caps it at `net.core.somaxconn`). Devices reconnect
/// together, after a broker restart or when a network comes back: with
/// std's 128, the rest of a burst of 5,000 had their handshakes dropped
/// and waited a second or more for their SYN to be sent again.
fn bind_tcp(addr: SocketAddr, backlog: u32) -> Result<smol::net::TcpListener, ServeError> {
    use std::os::fd::AsRawFd;
    let err = |source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    if backlog > METRICS_BACKLOG {
        let backlog = libc::c_int::try_from(backlog).unwrap_or(libc::c_int::MAX);
        // A second listen() on a listening socket only sets its backlog.
        // SAFETY: listen reads the descriptor, which `l` keeps open.
        if unsafe { libc::listen(l.as_raw_fd(), backlog) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    smol::net::TcpListener::try_from(l).map_err(err)
}

fn bind_unix(path: &Path) -> Result<smol::net::unix::UnixListener, ServeError> {
    let err = |source| ServeError::Bind {
        addr: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a socket is ours to replace: a path that names a config
        // file by mistake must not cost the file.
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it \
                 (check server.unix_socket)",
            )));
        }
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

/// Refuses a connection with `too_many_connections` on a task of its own,
/// at most `REFUSALS_ANSWERING_MAX` at a time; past them the connection is
/// closed at once, unanswered.
fn refuse_in_turn(
    ctx: &Ctx,
    ex: &smol::Executor<'static>,
    conn: impl session::Connection,
    why: impl std::fmt::Display,
) {
    let Some(turn) = start_closing(&ctx.refusing, REFUSALS_ANSWERING_MAX) else {
        return;
    };
    let why = why.to_string();
    ex.spawn(async move {
        let _turn = turn;
        refuse(conn, ErrorCode::TooManyConnections, why).await;
    })
    .detach();
}

/// Refuses a connection with a typed error frame, then closes it in order:
/// the write side is shut after the frame (FIN), then what the client sent
/// (its hello, unread) is read and dropped until it closes
/// (`drain_refused`). Closed with those bytes unread, the socket would be
/// reset, and the client's next write fail, or the frame be lost if not
/// yet acknowledged. All of it ends by `refused_deadline`, so a peer holds
/// its turn (`refuse_in_turn`) no longer.
async fn refuse(conn: impl session::Connection, code: ErrorCode, why: String) {
    use futures_lite::AsyncWriteExt;
    let mut buf = Vec::new();
    let r = error_response(0, code, why);
    if encode_response(&r, &mut buf).is_err() {
        return;
    }
    let (mut reads, mut writes) = conn.split();
    let answer = async {
        if writes.write_all(&buf).await.is_ok() && writes.close().await.is_ok() {
            drain_refused(&mut reads).await;
        }
    };
    let expired = async {
        smol::Timer::at(refused_deadline()).await;
    };
    futures_lite::future::or(answer, expired).await;
}

/// A slot under `server.max_connections`, given back on drop.
struct ConnSlot(Arc<Ctx>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
        self.0.connections_changed.notify(usize::MAX);
    }
}

fn admit(ctx: &Arc<Ctx>) -> Option<ConnSlot> {
    take_one_below(&ctx.connections, ctx.settings.max_connections).then(|| ConnSlot(ctx.clone()))
}

/// Adds one to `count` if it is below `max`: checked and added in one
/// step, so one refused is never counted, not even for a moment (where it
/// could refuse another racing it for a slot that is free).
fn take_one_below(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

fn connection_limit(ctx: &Ctx) -> String {
    format!(
        "connection limit reached ({})",
        ctx.settings.max_connections
    )
}

/// Everything a session holds its slots with: the server's, its source
/// address's and its identity's, given back when it ends.
pub(crate) struct Admitted {
    _slot: ConnSlot,
    _addr: Option<AddrGuard>,
    pub identity: IdentityGuard,
}

/// Admits a connection whose identity is known (under the server's and the
/// identity's limits) and serves it on a task of its own; refuses it with
/// a typed error frame otherwise. `slot` is the one a TLS connection held
/// through its handshake; without one, one is taken now.
#[allow(clippy::too_many_arguments)]
fn admit_and_spawn(
    conn: impl session::Connection,
    ctx: &Arc<Ctx>,
    ex: &smol::Executor<'static>,
    peer: String,
    identity: Arc<str>,
    addr: Option<AddrGuard>,
    slot: Option<ConnSlot>,
    listener: Listener,
) {
    let Some(slot) = slot.or_else(|| admit(ctx)) else {
        ctx.metrics
            .connection_refused(RefusalReason::MaxConnections);
        refuse_in_turn(ctx, ex, conn, connection_limit(ctx));
        return;
    };
    let identity = match ctx.quotas.admit_identity(identity) {
        Ok(g) => g,
        Err(why) => {
            ctx.metrics.connection_refused(why.reason());
            log::info!("{peer}: refused: {why}");
            refuse_in_turn(ctx, ex, conn, why);
            return;
        }
    };
    let admitted = Admitted {
        _slot: slot,
        _addr: addr,
        identity,
    };
    let ctx = ctx.clone();
    ex.spawn(async move {
        let _open = ctx.metrics.connection_opened(listener);
        session::run(conn, ctx.clone(), peer, admitted).await;
    })
    .detach();
}

/// The per-address limits, checked before anything is read from a TCP or
/// TLS connection.
fn admit_addr(ctx: &Ctx, peer: SocketAddr) -> Result<AddrGuard, quota::Refusal> {
    ctx.quotas.admit_addr(peer.ip()).inspect_err(|why| {
        ctx.metrics.connection_refused(why.reason());
        log::debug!("{peer}: refused: {why}");
    })
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
                match admit_addr(&ctx, peer) {
                    Ok(addr) => admit_and_spawn(
                        stream,
                        &ctx,
                        &ex,
                        peer.to_string(),
                        ANONYMOUS.into(),
                        Some(addr),
                        None,
                        Listener::Tcp,
                    ),
                    Err(why) => refuse_in_turn(&ctx, &ex, stream, why),
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
                // The kernel's word on who connected (SO_PEERCRED): the
                // uid the peer had when it called connect(2).
                let (peer, identity) = match rustix::net::sockopt::socket_peercred(&stream) {
                    Ok(cred) => {
                        let uid = cred.uid.as_raw();
                        (
                            format!("unix pid {}", cred.pid.as_raw_nonzero()),
                            ctx.unix_identity(uid),
                        )
                    }
                    Err(e) => {
                        ctx.metrics
                            .connection_refused(RefusalReason::NoPeerCredentials);
                        log::warn!("unix socket peer without credentials ({e}): refused");
                        continue;
                    }
                };
                admit_and_spawn(
                    stream,
                    &ctx,
                    &ex,
                    peer,
                    identity,
                    None,
                    None,
                    Listener::Unix,
                );
            }
            Err(e) => {
                log::warn!("accept on unix socket: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_tls(
    listener: smol::net::TcpListener,
    ctx: Arc<Ctx>,
    ex: Arc<smol::Executor<'static>>,
    slot: Arc<TlsSlot>,
) {
    let closing = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                // Before the handshake nothing can be said in skiff's
                // protocol: a refused client just sees the connection close.
                let Ok(addr) = admit_addr(&ctx, peer) else {
                    close_unadmitted(stream, &closing, &ex);
                    continue;
                };
                // A handshake holds rustls's state and buffers: it takes
                // its server slot now, so that `max_connections` (which
                // the memory budget counts on) bounds handshakes too.
                let Some(conn_slot) = admit(&ctx) else {
                    ctx.metrics
                        .connection_refused(RefusalReason::MaxConnections);
                    log::debug!("{peer}: refused: {}", connection_limit(&ctx));
                    drop(addr);
                    close_unadmitted(stream, &closing, &ex);
                    continue;
                };
                let handshaking = ctx.metrics.handshake_started();
                let setup = slot.current();
                let (ctx2, ex2, closing2) = (ctx.clone(), ex.clone(), closing.clone());
                ex.spawn(async move {
                    let done = async { Some(handshake(stream, &setup, peer, &ctx2.metrics).await) };
                    // A stop does not wait for handshakes: their slots
                    // are given back, and their sockets closed.
                    let stopped = async {
                        ctx2.shutdown.wait().await;
                        None
                    };
                    let outcome = futures_lite::future::or(done, stopped).await;
                    drop(handshaking);
                    match outcome {
                        Some(Ok((tls, identity))) => admit_and_spawn(
                            session::Locked(tls),
                            &ctx2,
                            &ex2,
                            peer.to_string(),
                            identity,
                            Some(addr),
                            Some(conn_slot),
                            Listener::Tls,
                        ),
                        Some(Err(refused)) => {
                            // The close may take a second: the slots are
                            // other clients' meanwhile.
                            drop((addr, conn_slot));
                            if let Some(_closing) =
                                start_closing(&closing2, TLS_REFUSED_CLOSING_MAX)
                            {
                                refused.close().await;
                            }
                        }
                        None => {}
                    }
                })
                .detach();
            }
            Err(e) => {
                log::warn!("accept on tls: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Closes in order (`close_refused`) a TLS client refused before its
/// handshake (its address's limits, or `server.max_connections`): its
/// ClientHello may be in already, and closing with it unread resets the
/// connection. It holds no slot meanwhile; past `TLS_REFUSED_CLOSING_MAX`
/// closes it is dropped at once (`start_closing`).
fn close_unadmitted(
    stream: smol::net::TcpStream,
    closing: &Arc<AtomicUsize>,
    ex: &smol::Executor<'static>,
) {
    let Some(closing) = start_closing(closing, TLS_REFUSED_CLOSING_MAX) else {
        return;
    };
    ex.spawn(async move {
        let _closing = closing;
        close_refused(stream, refused_deadline()).await;
    })
    .detach();
}

/// A turn to close a refused client in order (a TLS one before or after
/// its handshake, or one answered `too_many_connections`); none past `max`
/// such closes at a time, so a flood of refused clients holds few sockets
/// and tasks (the caller drops the connection at once then).
fn start_closing(closing: &Arc<AtomicUsize>, max: usize) -> Option<Closing> {
    take_one_below(closing, max).then(|| Closing(closing.clone()))
}

/// One of the refused clients' closes, counted until it ends.
struct Closing(Arc<AtomicUsize>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The server side of a TLS handshake, bounded in time, and the identity
/// the client proved. Failures are the client's: logged, and the
/// connection left to close (`Refused::close`).
async fn handshake(
    stream: smol::net::TcpStream,
    setup: &TlsSetup,
    peer: SocketAddr,
    metrics: &Metrics,
) -> Result<(TlsStream, Arc<str>), Refused> {
    let acceptor = futures_rustls::TlsAcceptor::from(setup.config.clone());
    // The handshake's future owns the socket and, dropped on a timeout,
    // would close it at once: a FIN, or a reset if the client's next bytes
    // are in by then. A second handle keeps it for an orderly close.
    let socket = stream.clone();
    let accept = acceptor.accept(stream).into_fallible();
    let timeout = setup.handshake_timeout;
    let done = futures_lite::future::or(async { Some(accept.await) }, async {
        smol::Timer::after(timeout).await;
        None
    })
    .await;
    let tls = match done {
        Some(Ok(tls)) => tls,
        Some(Err((e, stream))) => {
            log::info!("{peer}: TLS handshake failed: {e}");
            metrics.tls_failure();
            // rustls has written its alert, if the failure has one.
            return Err(Refused::Socket(stream));
        }
        None => {
            log::info!(
                "{peer}: TLS handshake not done in {} ms",
                timeout.as_millis()
            );
            metrics.connection_timed_out();
            // rustls has no alert for a slow peer: the FIN says it.
            return Err(Refused::Socket(socket));
        }
    };
    if !setup.mutual {
        return Ok((tls, ANONYMOUS.into()));
    }
    let (_, conn) = tls.get_ref();
    // The verifier required a certificate: rustls does not finish a
    // handshake without one.
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Err(Refused::Tls(Box::new(tls)));
    };
    match setup.identity_of(leaf) {
        Some(id) => Ok((tls, id.into())),
        None => {
            log::warn!(
                "{peer}: client certificate names no identity by server.tls.identity_from = \"{}\"; refused",
                setup.identity_from
            );
            Err(Refused::Tls(Box::new(tls)))
        }
    }
}

type TlsStream = futures_rustls::server::TlsStream<smol::net::TcpStream>;

/// A TLS client refused in its handshake (failed or timed out) or right
/// after it, left to close in order. It holds no slot: the caller gives
/// its server and address slots back first.
enum Refused {
    Socket(smol::net::TcpStream),
    /// Refused after a finished handshake, which rustls can only end with
    /// a close_notify. Boxed: a session's state is large.
    Tls(Box<TlsStream>),
}

impl Refused {
    async fn close(self) {
        let deadline = refused_deadline();
        let stream = match self {
            Refused::Socket(stream) => stream,
            Refused::Tls(mut tls) => {
                let close_notify = async {
                    let _ = futures_lite::AsyncWriteExt::close(&mut *tls).await;
                };
                let expired = async {
                    smol::Timer::at(deadline).await;
                };
                futures_lite::future::or(close_notify, expired).await;
                tls.into_inner().0
            }
        };
        close_refused(stream, deadline).await;
    }
}

/// Closes a refused TLS client's socket so that what was sent (the alert)
/// reaches it. With TLS 1.3 the client has finished its side of the
/// handshake before the broker checks its certificate, and writes its
/// first request at once; closing with those bytes unread makes the
/// kernel send a reset instead of a FIN, and a client could see the reset
/// before the alert. A client whose handshake timed out may be sending
/// still, and its next bytes would meet a closed socket, which resets.
/// So: the write side is shut (FIN after the alert), then what comes in
/// is read and dropped until the client closes, until `deadline`
/// (`refused_deadline`) and `REFUSED_DRAIN_BYTES_MAX`.
async fn close_refused(mut stream: smol::net::TcpStream, deadline: std::time::Instant) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let expired = async {
        smol::Timer::at(deadline).await;
    };
    futures_lite::future::or(drain_refused(&mut stream), expired).await;
}

/// Reads and drops what a refused client sends, until it closes or
/// `REFUSED_DRAIN_BYTES_MAX`; the caller bounds it in time.
async fn drain_refused(reads: &mut (impl futures_lite::AsyncRead + Unpin)) {
    use futures_lite::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let mut left = REFUSED_DRAIN_BYTES_MAX;
    while left > 0 {
        match reads.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// When a refused client's socket is closed at the latest.
fn refused_deadline() -> std::time::Instant {
    std::time::Instant::now() + Duration::from_millis(REFUSED_DRAIN_MS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, BatchIter, ProducerStamp};

    use crate::protocol::{
        decode_response, encode_request, frame_len, CreateTopicRequest, FetchPartition,
        FetchRequest, HelloRequest, ProducePartition, ProduceRequest, Request, RequestBody,
        Response, ResponseBody,
    };
    use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// How many connections complete their handshake with a listener that
    /// accepts none, of `tries` (stopping at the first that does not).
    fn handshakes_queued(l: &smol::net::TcpListener, tries: usize) -> usize {
        let addr = l.local_addr().expect("addr");
        let mut held = Vec::new();
        for _ in 0..tries {
            // A handshake the full queue drops is retried after a second.
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
        held.len()
    }

    /// A burst of reconnecting devices waits in the accept queue: the data
    /// listeners' backlog follows max_connections, where std's 128 dropped
    /// the handshakes past it.
    #[test]
    fn the_accept_queue_holds_a_burst_of_connections() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let roomy = bind_tcp(any, 1024).expect("bind");
        assert_eq!(handshakes_queued(&roomy, 300), 300);
        let small = bind_tcp(any, METRICS_BACKLOG).expect("bind");
        let n = handshakes_queued(&small, 300);
        assert!(n < 300, "std's backlog took {n}");
    }

    /// The server reaches storage only through the broker: no file of it
    /// names the storage module (re-exports through `broker` are the way).
    #[test]
    fn the_server_names_nothing_from_storage() {
        let forbidden = [concat!("crate::", "storage"), concat!("storage", "::")];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server");
        let mut files = vec![dir];
        let mut checked = 0;
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("read src/server") {
                    files.push(entry.expect("dir entry").path());
                }
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read a source file");
            for (n, line) in text.lines().enumerate() {
                for f in forbidden {
                    assert!(
                        !line.contains(f),
                        "{}:{}: the server names storage ({f}); go through the broker",
                        path.display(),
                        n + 1
                    );
                }
            }
            checked += 1;
        }
        assert!(checked >= 3, "found the server's files");
    }

    /// A stream that cannot be cloned, as a TLS stream cannot.
    struct NotClone(smol::net::unix::UnixStream);

    impl AsyncRead for NotClone {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for NotClone {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_close(cx)
        }
    }

    async fn call(
        s: &mut smol::net::unix::UnixStream,
        correlation_id: u32,
        body: RequestBody<'_>,
    ) -> Response {
        let mut out = Vec::new();
        encode_request(
            &Request {
                correlation_id,
                body,
            },
            &mut out,
        )
        .expect("encode");
        s.write_all(&out).await.expect("send");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Some(n) = frame_len(&buf, u32::MAX).expect("a frame") {
                let r = decode_response(&buf[4..n]).expect("a response");
                assert_eq!(n, buf.len(), "one answer");
                assert_eq!(r.correlation_id, correlation_id);
                return r;
            }
            let n = s.read(&mut chunk).await.expect("receive");
            assert!(n > 0, "the session closed early");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A server with no listeners, its data in a fresh directory (kept
    /// alive by the `TempDir`).
    fn start_quiet() -> (Server, tempfile::TempDir) {
        start_quiet_with(|_| {})
    }

    /// `start_quiet`, its config changed by `change` first.
    fn start_quiet_with(change: impl FnOnce(&mut Config)) -> (Server, tempfile::TempDir) {
        // Under target/: /tmp may be tmpfs, which has no O_DIRECT.
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tmp");
        std::fs::create_dir_all(&base).expect("create target/test-tmp");
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let mut cfg = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        cfg.server.listen = String::new();
        cfg.server.unix_socket = String::new();
        cfg.metrics.listen = String::new();
        change(&mut cfg);
        (Server::start(&cfg, 1).expect("start"), dir)
    }

    /// A session served over a socket pair, its hello answered, so that it
    /// holds its `max_connections` slot however long the test takes.
    fn hold_a_session(server: &Server) -> smol::net::unix::UnixStream {
        let (mut ours, theirs) = smol::net::unix::UnixStream::pair().expect("socket pair");
        server.serve_stream(theirs, "held".into(), Listener::Unix);
        let hello = RequestBody::Hello(HelloRequest {
            version_min: 1,
            version_max: 1,
            client_name: None,
        });
        let r = smol::block_on(call(&mut ours, 1, hello));
        assert!(matches!(r.body, ResponseBody::Hello(_)), "{r:?}");
        ours
    }

    /// A socket pair whose server side cannot take another byte, as for a
    /// peer that never reads: what was written to it (the count returned)
    /// fills the buffer. Ours blocks on reads, for 20 s at most.
    fn stalled_pair() -> (
        std::os::unix::net::UnixStream,
        smol::net::unix::UnixStream,
        usize,
    ) {
        use std::io::Write;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        rustix::net::sockopt::set_socket_send_buffer_size(&theirs, 4096).expect("SO_SNDBUF");
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        theirs.set_nonblocking(true).expect("nonblocking");
        let mut filled = 0;
        loop {
            match (&theirs).write(&[0u8; 4096]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("fill: {e}"),
            }
        }
        let theirs = smol::net::unix::UnixStream::try_from(theirs).expect("async socket");
        (ours, theirs, filled)
    }

    /// What the server said on `ours` after the first `skip` bytes, to its
    /// end: `None` for nothing, else its one frame's error code.
    fn refusal_read(mut ours: impl std::io::Read, skip: usize) -> Option<ErrorCode> {
        let mut all = Vec::new();
        ours.read_to_end(&mut all).expect("read to the end");
        let said = &all[skip..];
        if said.is_empty() {
            return None;
        }
        let n = frame_len(said, u32::MAX).expect("a frame").expect("whole");
        assert_eq!(n, said.len(), "one frame, then the end");
        match decode_response(&said[4..n]).expect("a response").body {
            ResponseBody::Error(e) => Some(e.code),
            other => panic!("not a refusal: {other:?}"),
        }
    }

    /// A connection refused at `server.max_connections` is never counted,
    /// not even for a moment: the count is checked, then raised, in one
    /// step. Before, each refusal raised it and took it back: the count
    /// read above the limit meanwhile (and woke whoever waited for it to
    /// change), and a client racing the refused one could be refused for a
    /// slot that was free.
    #[test]
    fn a_refused_connection_is_never_counted() {
        const MAX: usize = 2;
        let (server, _dir) = start_quiet_with(|cfg| cfg.server.max_connections = MAX as u32);
        let ctx = server.ctx.clone();
        let held: Vec<ConnSlot> = (0..MAX).map(|_| admit(&ctx).expect("a slot")).collect();
        let listener = ctx.connections_changed.listen();
        assert!(admit(&ctx).is_none(), "refused");
        assert!(
            !ctx.connections_changed.is_notified(),
            "a refusal changed the count"
        );
        drop(listener);
        // Watched while refusals run flat out, the count stays at the limit.
        let done = AtomicBool::new(false);
        let highest = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut highest = 0;
                while !done.load(Ordering::SeqCst) {
                    highest = highest.max(ctx.connections.load(Ordering::SeqCst));
                }
                highest
            });
            for _ in 0..1_000_000 {
                assert!(admit(&ctx).is_none(), "refused");
            }
            done.store(true, Ordering::SeqCst);
            watcher.join().expect("the watcher")
        });
        assert_eq!(highest, MAX);
        drop(held);
        server.stop().expect("stop");
    }

    /// A flood of clients past `server.max_connections` is answered
    /// `too_many_connections` on at most `REFUSALS_ANSWERING_MAX` tasks at a
    /// time; one past them is closed at once, unanswered. These clients
    /// never read, so no answer can be written and every turn stays taken:
    /// before, each refusal had a task (and its socket) of its own, without
    /// bound. Each client still sees the answer or the close, and once the
    /// flood is gone, a refused client is answered again.
    #[test]
    fn a_flood_of_refused_clients_is_answered_on_bounded_tasks() {
        let (server, _dir) = start_quiet_with(|cfg| cfg.server.max_connections = 1);
        let held = hold_a_session(&server);
        let flood: Vec<_> = (0..3 * REFUSALS_ANSWERING_MAX)
            .map(|_| {
                let (ours, theirs, filled) = stalled_pair();
                server.serve_stream(theirs, "flood".into(), Listener::Unix);
                (ours, filled)
            })
            .collect();
        let refusing = server.ctx.refusing.load(Ordering::SeqCst);
        assert!(
            refusing <= REFUSALS_ANSWERING_MAX,
            "{refusing} refusals answering at once"
        );
        let mut answered = 0;
        for (ours, filled) in flood {
            if let Some(code) = refusal_read(ours, filled) {
                assert_eq!(code, ErrorCode::TooManyConnections);
                answered += 1;
            }
        }
        assert!(answered <= REFUSALS_ANSWERING_MAX, "{answered} answered");
        // Their turns end with their tasks, just after their sockets.
        let given_up = std::time::Instant::now() + Duration::from_secs(30);
        while server.ctx.refusing.load(Ordering::SeqCst) > 0 {
            assert!(std::time::Instant::now() < given_up, "turns never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        let theirs = smol::net::unix::UnixStream::try_from(theirs).expect("async socket");
        server.serve_stream(theirs, "late".into(), Listener::Unix);
        assert_eq!(
            refusal_read(ours, 0),
            Some(ErrorCode::TooManyConnections),
            "answered again"
        );
        drop(held);
        server.stop().expect("stop");
    }

    /// Hello at `version` (correlation id 1), then topic "t" of one
    /// partition created (2).
    async fn hello_and_create_t(s: &mut smol::net::unix::UnixStream, version: u16) {
        let hello = RequestBody::Hello(HelloRequest {
            version_min: version,
            version_max: version,
            client_name: None,
        });
        let r = call(s, 1, hello).await;
        assert!(matches!(r.body, ResponseBody::Hello(_)), "{r:?}");
        let create = RequestBody::CreateTopic(CreateTopicRequest {
            name: "t".into(),
            partitions: Some(1),
            ..CreateTopicRequest::default()
        });
        let r = call(s, 2, create).await;
        assert!(matches!(r.body, ResponseBody::CreateTopic(_)), "{r:?}");
    }

    /// One record's batch, as a produce request for partition 0 of `topic`.
    fn produce_one(topic: &str) -> RequestBody<'static> {
        let mut bb = BatchBuilder::new();
        bb.push(1, None, b"v", &[]);
        RequestBody::Produce(ProduceRequest {
            partitions: vec![ProducePartition {
                topic: topic.into(),
                partition: 0,
                batch: bb.finish(ProducerStamp::NONE).into(),
            }],
        })
    }

    /// `/health` copies only its notes; a group's lag is worked out for a
    /// scrape alone, so it stays as the last scrape left it however often
    /// `/health` is read.
    #[test]
    fn health_leaves_the_group_lag_to_the_scrape() {
        use crate::protocol::{OffsetCommitPartition, OffsetCommitRequest};
        let (server, _dir) = start_quiet();
        let (ours, theirs) = smol::net::unix::UnixStream::pair().expect("socket pair");
        server.serve_stream(theirs, "test".into(), Listener::Unix);
        let mut s = ours;
        let metrics = server.ctx.metrics.clone();
        smol::block_on(async {
            hello_and_create_t(&mut s, 2).await;
            let r = call(&mut s, 3, produce_one("t")).await;
            assert!(matches!(r.body, ResponseBody::Produce(_)), "{r:?}");
            let commit = RequestBody::OffsetCommit(OffsetCommitRequest {
                group: "g".into(),
                member_id: None,
                generation: None,
                offsets: vec![OffsetCommitPartition {
                    topic: "t".into(),
                    partition: 0,
                    offset: 1,
                    metadata: None,
                }],
            });
            let r = call(&mut s, 4, commit).await;
            assert!(matches!(r.body, ResponseBody::OffsetCommit(_)), "{r:?}");
            metrics.encode();
            assert_eq!(metrics.group_lag("g", "t", 0), Some(0));
            for cid in 5..8 {
                let r = call(&mut s, cid, produce_one("t")).await;
                assert!(matches!(r.body, ResponseBody::Produce(_)), "{r:?}");
            }
        });
        for _ in 0..3 {
            assert_eq!(metrics.health_text(), "ok\n");
        }
        assert_eq!(metrics.group_lag("g", "t", 0), Some(0), "as of the scrape");
        metrics.encode();
        assert_eq!(metrics.group_lag("g", "t", 0), Some(3));
        drop(s);
        server.stop().expect("stop");
    }

    /// A session runs over a stream that is not `Clone` (split into halves
    /// over a lock): hello, create, a produce whose large batch is written
    /// while the reader waits, and a fetch that reads it back.
    #[test]
    fn a_session_runs_over_a_stream_that_cannot_be_cloned() {
        let (server, _dir) = start_quiet();
        let (ours, theirs) = smol::net::unix::UnixStream::pair().expect("socket pair");
        server.serve_stream(NotClone(theirs), "test".into(), Listener::Unix);
        let mut s = ours;
        let value = vec![b'v'; 1000];
        let mut bb = BatchBuilder::new();
        // Near the embedded default's 128 KiB batch limit.
        for _ in 0..120 {
            bb.push(1, None, &value, &[]);
        }
        let batch = bb.finish(ProducerStamp::NONE);
        smol::block_on(async {
            hello_and_create_t(&mut s, 1).await;
            let produce = RequestBody::Produce(ProduceRequest {
                partitions: vec![ProducePartition {
                    topic: "t".into(),
                    partition: 0,
                    batch: batch[..].into(),
                }],
            });
            let r = call(&mut s, 3, produce).await;
            let ResponseBody::Produce(p) = r.body else {
                panic!("{r:?}")
            };
            assert_eq!(p.partitions[0].offsets(), Ok((0, 119)));
            let fetch = RequestBody::Fetch(FetchRequest {
                partitions: vec![FetchPartition {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                    max_bytes: 1 << 20,
                }],
                max_wait_ms: 0,
                min_bytes: 0,
                isolation: None,
            });
            let r = call(&mut s, 4, fetch).await;
            let ResponseBody::Fetch(f) = r.body else {
                panic!("{r:?}")
            };
            let got: Vec<u32> = BatchIter::new(&f.partitions[0].records)
                .map(|b| b.expect("a batch").header.record_count)
                .collect();
            assert_eq!(got, vec![120]);
        });
        drop(s);
        server.stop().expect("stop");
    }
}
