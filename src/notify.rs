//! systemd service notifications (`sd_notify`) and a watchdog that only
//! pings while every registered loop is alive.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). It is small enough that a dependency would cost more than it
//! saves. Outside systemd (`$NOTIFY_SOCKET` unset) every call is a no-op
//! returning `Ok(false)`.
//!
//! With `Type=notify` skiff sends `READY=1` once storage, the producer table
//! and the coordinators' logs are recovered and the listeners are up (as
//! `/ready`), `STATUS=...` as it goes, `STOPPING=1` on shutdown, and
//! with `WatchdogSec=` it sends `WATCHDOG=1` from a [`Watchdog`] ticker at
//! half the interval, but only while every [`Heartbeat`] (the storage
//! thread, the accept loop) has beaten since the previous ping. A hung
//! storage thread therefore stops the pings and systemd restarts skiff,
//! instead of a healthy-looking ticker thread vouching for a dead broker.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Why a notification could not be sent.
#[derive(Debug)]
#[non_exhaustive]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor `@name`, or is too
    /// long for a socket address: a broken unit or environment.
    InvalidSocket(OsString),
    /// Creating the socket or sending failed: the manager went away, or a
    /// seccomp/AF_UNIX restriction forbids it (the unit must allow AF_UNIX).
    Io(io::Error),
}

impl fmt::Display for NotifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyError::InvalidSocket(s) => write!(f, "invalid NOTIFY_SOCKET {s:?}"),
            NotifyError::Io(e) => write!(f, "sd_notify failed: {e}"),
        }
    }
}

impl std::error::Error for NotifyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NotifyError::Io(e) => Some(e),
            NotifyError::InvalidSocket(_) => None,
        }
    }
}

impl From<io::Error> for NotifyError {
    fn from(e: io::Error) -> Self {
        NotifyError::Io(e)
    }
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `Ok(None)` when skiff is not run by systemd
    /// with `Type=notify`.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(s) if !s.is_empty() => Notifier::new(s).map(Some),
            _ => Ok(None),
        }
    }

    /// For a socket given as `/path` or `@abstract-name`.
    pub fn new(socket: impl Into<OsString>) -> Result<Notifier, NotifyError> {
        let socket = socket.into();
        let bytes = socket.clone().into_vec();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(&socket))
                .map_err(|_| NotifyError::InvalidSocket(socket.clone()))?,
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..])
                    .map_err(|_| NotifyError::InvalidSocket(socket.clone()))?
            }
            _ => return Err(NotifyError::InvalidSocket(socket)),
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Sends raw `KEY=VALUE` lines.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            // Datagrams are all-or-nothing; a short count means a kernel
            // surprise worth reporting rather than ignoring.
            return Err(NotifyError::Io(io::Error::new(
                io::ErrorKind::WriteZero,
                "short datagram to NOTIFY_SOCKET",
            )));
        }
        Ok(())
    }

    pub fn ready(&self) -> Result<(), NotifyError> {
        self.notify("READY=1")
    }

    /// A one-line status for `systemctl status`; newlines would start new
    /// variables, so they become spaces.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STATUS={}", text.replace('\n', " ")))
    }

    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.notify("STOPPING=1")
    }

    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.notify("WATCHDOG=1")
    }

    /// Asks for more start-up (or stop) time, e.g. during a long recovery,
    /// counted from now.
    pub fn extend_timeout(&self, extra: Duration) -> Result<(), NotifyError> {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", extra.as_micros()))
    }
}

/// Sends `state` to `$NOTIFY_SOCKET`; `Ok(false)` when there is none.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match Notifier::from_env()? {
        Some(n) => n.notify(state).map(|()| true),
        None => Ok(false),
    }
}

/// `READY=1`: storage, the producer table and the coordinators' logs are
/// recovered and the listeners are up (transactions the last run left open
/// may still be ending).
pub fn ready() -> Result<bool, NotifyError> {
    notify("READY=1")
}

/// `STATUS=...`, shown by `systemctl status`.
pub fn status(text: &str) -> Result<bool, NotifyError> {
    notify(&format!("STATUS={}", text.replace('\n', " ")))
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() -> Result<bool, NotifyError> {
    notify("STOPPING=1")
}

/// `WATCHDOG=1`. Prefer [`Watchdog`], which only pings while every loop is
/// alive.
pub fn watchdog() -> Result<bool, NotifyError> {
    notify("WATCHDOG=1")
}

/// The watchdog interval systemd asks for (`WatchdogSec=`), from
/// `$WATCHDOG_USEC`, if `$WATCHDOG_PID` is unset or names this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on given values (testable without touching the
/// process environment).
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = pid {
        // The variables are inherited by children; only the main process
        // the manager meant may ping.
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    match usec?.trim().parse::<u64>().ok()? {
        0 => None,
        us => Some(Duration::from_micros(us)),
    }
}

/// A loop's proof of life. Call [`Heartbeat::beat`] at least every
/// [`Watchdog::beat_interval`]: a blocking loop needs a timeout on its wait
/// (e.g. `recv_timeout`) so that being idle is not mistaken for being hung.
#[derive(Debug)]
pub struct Heartbeat {
    /// Milliseconds since the watchdog's epoch at the last beat, plus one
    /// (0 = never beaten).
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
    registry: Arc<Registry>,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last_ms
            .store(ms_since(self.epoch) + 1, Ordering::Relaxed);
    }

    /// Orderly end of the loop (shutdown): stop watching it. A heartbeat
    /// dropped without `retire` stays registered and goes stale, so a loop
    /// that dies on an error stops the pings, which is the point.
    pub fn retire(self) {
        if let Ok(mut loops) = self.registry.loops.lock() {
            loops.retain(|l| !Arc::ptr_eq(&l.last_ms, &self.last_ms));
        }
    }
}

#[derive(Debug)]
struct Loop {
    name: &'static str,
    last_ms: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Registry {
    loops: Mutex<Vec<Loop>>,
}

/// Pings systemd's watchdog at half its interval while every registered
/// loop is alive.
#[derive(Debug, Clone)]
pub struct Watchdog {
    /// None when systemd asked for no watchdog: heartbeats still work (the
    /// loops need not care), nothing is sent.
    target: Option<Arc<(Notifier, Duration)>>,
    registry: Arc<Registry>,
    epoch: Instant,
}

impl Watchdog {
    /// From `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`: enabled only when both
    /// are set (and `$WATCHDOG_PID`, if set, is this process).
    pub fn from_env() -> Result<Watchdog, NotifyError> {
        let target = match (Notifier::from_env()?, watchdog_interval()) {
            (Some(n), Some(interval)) => Some(Arc::new((n, interval))),
            _ => None,
        };
        Ok(Watchdog {
            target,
            registry: Arc::default(),
            epoch: Instant::now(),
        })
    }

    pub fn new(notifier: Notifier, interval: Duration) -> Watchdog {
        Watchdog {
            target: Some(Arc::new((notifier, interval))),
            registry: Arc::default(),
            epoch: Instant::now(),
        }
    }

    /// A watchdog that watches nothing (not under systemd).
    pub fn disabled() -> Watchdog {
        Watchdog {
            target: None,
            registry: Arc::default(),
            epoch: Instant::now(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often a registered loop should beat: a quarter of the interval,
    /// so every ping period (half the interval) holds at least one beat even
    /// with scheduling jitter. One second when disabled.
    pub fn beat_interval(&self) -> Duration {
        self.target
            .as_ref()
            .map_or(Duration::from_secs(1), |t| t.1 / 4)
    }

    /// Registers a loop. It must beat before the first ping is due.
    pub fn register(&self, name: &'static str) -> Heartbeat {
        let last_ms = Arc::new(AtomicU64::new(0));
        if let Ok(mut loops) = self.registry.loops.lock() {
            loops.push(Loop {
                name,
                last_ms: Arc::clone(&last_ms),
            });
        }
        Heartbeat {
            last_ms,
            epoch: self.epoch,
            registry: Arc::clone(&self.registry),
        }
    }

    /// Starts the ticker thread; `Ok(None)` when disabled. The ticker stops
    /// when the returned handle is dropped.
    pub fn start(&self) -> io::Result<Option<WatchdogTicker>> {
        let Some(target) = self.target.clone() else {
            return Ok(None);
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let registry = Arc::clone(&self.registry);
        let epoch = self.epoch;
        let thread = thread::Builder::new()
            .name("skiff-watchdog".into())
            .spawn(move || tick(&target.0, target.1 / 2, &registry, epoch, &stopped))?;
        Ok(Some(WatchdogTicker {
            stop: Some(stop),
            thread: Some(thread),
        }))
    }
}

/// The running ticker; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct WatchdogTicker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for WatchdogTicker {
    fn drop(&mut self) {
        // Dropping the sender disconnects the channel: the ticker's
        // recv_timeout returns at once and the thread ends.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
}

/// The ticker loop: every `period`, ping if every loop beat since the
/// previous tick; else name the stale loops (once per stall) and skip.
fn tick(
    notifier: &Notifier,
    period: Duration,
    registry: &Registry,
    epoch: Instant,
    stopped: &mpsc::Receiver<()>,
) {
    let mut previous_tick_ms = 0u64;
    let mut stalled = false;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
        let now_ms = ms_since(epoch) + 1;
        let stale: Vec<&'static str> = match registry.loops.lock() {
            Ok(loops) => loops
                .iter()
                .filter(|l| l.last_ms.load(Ordering::Relaxed) <= previous_tick_ms)
                .map(|l| l.name)
                .collect(),
            // A poisoned registry means a thread panicked while
            // registering: not alive by definition.
            Err(_) => vec!["registry"],
        };
        previous_tick_ms = now_ms;
        if stale.is_empty() {
            if let Err(e) = notifier.watchdog() {
                log::warn!("watchdog ping failed: {e}");
            }
            if stalled {
                log::info!("watchdog: every loop is beating again");
                let _ = notifier.status("running");
                stalled = false;
            }
        } else if !stalled {
            let names = stale.join(", ");
            log::error!(
                "watchdog: no heartbeat from {names}; withholding pings so systemd restarts skiff"
            );
            let _ = notifier.status(&format!("stalled: {names}"));
            stalled = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound_socket() -> (tempfile::TempDir, UnixDatagram, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        (dir, sock, path)
    }

    fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
        sock.set_read_timeout(Some(timeout)).expect("timeout");
        let mut buf = [0u8; 512];
        match sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    fn drain(sock: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(m) = recv(sock, Duration::from_millis(1)) {
            out.push(m);
        }
        out
    }

    #[test]
    fn sends_each_state_to_a_path_socket() {
        let (_dir, sock, path) = bound_socket();
        let n = Notifier::new(path.as_os_str()).expect("notifier");
        n.ready().expect("ready");
        n.status("recovering\n3 partitions").expect("status");
        n.stopping().expect("stopping");
        n.watchdog().expect("watchdog");
        n.extend_timeout(Duration::from_secs(2)).expect("extend");
        let got: Vec<String> = (0..5)
            .map(|_| recv(&sock, Duration::from_secs(1)).expect("datagram"))
            .collect();
        assert_eq!(
            got,
            [
                "READY=1",
                "STATUS=recovering 3 partitions",
                "STOPPING=1",
                "WATCHDOG=1",
                "EXTEND_TIMEOUT_USEC=2000000"
            ]
        );
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "skiff-notify-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        let n = Notifier::new(format!("@{name}")).expect("notifier");
        n.ready().expect("ready");
        assert_eq!(
            recv(&sock, Duration::from_secs(1)).as_deref(),
            Some("READY=1")
        );
    }

    #[test]
    fn rejects_relative_and_empty_socket_names() {
        assert!(matches!(
            Notifier::new("relative.sock"),
            Err(NotifyError::InvalidSocket(_))
        ));
        assert!(matches!(
            Notifier::new(""),
            Err(NotifyError::InvalidSocket(_))
        ));
    }

    #[test]
    fn sending_to_a_missing_socket_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = Notifier::new(dir.path().join("gone.sock").as_os_str()).expect("notifier");
        assert!(matches!(n.ready(), Err(NotifyError::Io(_))));
    }

    #[test]
    fn watchdog_interval_honours_pid_and_zero() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
    }

    #[test]
    fn watchdog_pings_only_while_every_loop_beats() {
        let (_dir, sock, path) = bound_socket();
        // 200 ms interval: a tick every 100 ms, loops beat every 50 ms.
        let wd = Watchdog::new(
            Notifier::new(path.as_os_str()).expect("n"),
            Duration::from_millis(200),
        );
        assert_eq!(wd.beat_interval(), Duration::from_millis(50));
        let storage = Arc::new(wd.register("storage"));
        let accept = wd.register("accept");
        let storage_alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let beater = {
            let storage = Arc::clone(&storage);
            let alive = Arc::clone(&storage_alive);
            let done = Arc::clone(&done);
            thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if alive.load(Ordering::Relaxed) {
                        storage.beat();
                    }
                    accept.beat();
                    thread::sleep(Duration::from_millis(20));
                }
                accept
            })
        };
        let ticker = wd.start().expect("start").expect("enabled");
        thread::sleep(Duration::from_millis(450));
        let healthy = drain(&sock);
        let pings = healthy.iter().filter(|m| *m == "WATCHDOG=1").count();
        // About 4 ticks; allow for a loaded test machine.
        assert!(pings >= 2, "expected pings while healthy, got {healthy:?}");

        // The storage loop hangs: after at most one more tick, pings stop.
        storage_alive.store(false, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(250));
        let _ = drain(&sock);
        thread::sleep(Duration::from_millis(350));
        let hung = drain(&sock);
        assert!(
            !hung.iter().any(|m| m == "WATCHDOG=1"),
            "pinged while storage was hung: {hung:?}"
        );

        // It recovers: pings resume and the status says so.
        storage_alive.store(true, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(350));
        let resumed = drain(&sock);
        assert!(resumed.iter().any(|m| m == "WATCHDOG=1"), "{resumed:?}");
        assert!(resumed.iter().any(|m| m == "STATUS=running"), "{resumed:?}");

        drop(ticker);
        done.store(true, Ordering::Relaxed);
        let accept = beater.join().expect("beater");
        accept.retire();
    }

    #[test]
    fn a_stall_is_reported_in_the_status_and_retired_loops_are_ignored() {
        let (_dir, sock, path) = bound_socket();
        let wd = Watchdog::new(
            Notifier::new(path.as_os_str()).expect("n"),
            Duration::from_millis(100),
        );
        let never = wd.register("storage");
        let ticker = wd.start().expect("start").expect("enabled");
        thread::sleep(Duration::from_millis(180));
        let msgs = drain(&sock);
        assert!(
            msgs.iter().any(|m| m == "STATUS=stalled: storage"),
            "{msgs:?}"
        );
        assert!(!msgs.iter().any(|m| m == "WATCHDOG=1"), "{msgs:?}");
        // An orderly shutdown retires the loop: nothing left to wait for.
        never.retire();
        thread::sleep(Duration::from_millis(180));
        let msgs = drain(&sock);
        assert!(msgs.iter().any(|m| m == "WATCHDOG=1"), "{msgs:?}");
        drop(ticker);
    }

    #[test]
    fn disabled_watchdog_starts_nothing() {
        let wd = Watchdog::disabled();
        let hb = wd.register("storage");
        hb.beat();
        assert!(!wd.is_enabled());
        assert!(wd.start().expect("start").is_none());
    }
}
