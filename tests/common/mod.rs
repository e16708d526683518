//! Shared harness for the end-to-end tests: starts the real `skiff` binary
//! on a fresh data directory, on 127.0.0.1 and a Unix socket, and stops it
//! by PID when the test ends (also when the test panics).
#![allow(dead_code)]

pub mod abuse;
pub mod checker;
pub mod watchdog;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_skiff");

/// A command running the skiff binary; under scripts/cross-test it runs
/// through the emulator named in `SKIFF_TEST_RUNNER` (e.g.
/// `qemu-aarch64-static -L /usr/aarch64-linux-gnu`), since an ARM binary
/// cannot be executed directly without binfmt_misc.
pub fn skiff_command() -> Command {
    match std::env::var("SKIFF_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut parts = runner.split_whitespace();
            let mut cmd = Command::new(parts.next().expect("non-empty runner"));
            cmd.args(parts).arg(BIN);
            cmd
        }
        _ => Command::new(BIN),
    }
}

/// Whether the broker runs under an emulator (scripts/cross-test): it is
/// tens of times slower, and its RSS is qemu's, translation caches and all.
pub fn emulated() -> bool {
    std::env::var("SKIFF_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty())
}

/// A directory on the same filesystem as the build (ext4 here; /tmp may be
/// tmpfs, which has no O_DIRECT). Removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("creating CARGO_TARGET_TMPDIR");
    tempfile::Builder::new()
        .prefix("e2e-")
        .tempdir_in(base)
        .expect("creating a temp dir")
}

/// A port on 127.0.0.1 that nobody listens on, held for as long as the
/// guard lives: a socket bound to it but never listening, so a connect is
/// refused and no other test can take the port meanwhile.
pub struct ClosedPort {
    fd: i32,
    pub addr: String,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        // SAFETY: plain socket(2)/bind(2)/getsockname(2) on a descriptor
        // this guard owns; the sockaddr structs are initialised locally.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket(2)");
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let sp = &sa as *const libc::sockaddr_in as *const libc::sockaddr;
            assert_eq!(libc::bind(fd, sp, len), 0, "bind(2)");
            let mut got: libc::sockaddr_in = std::mem::zeroed();
            let mut got_len = len;
            let gp = &mut got as *mut libc::sockaddr_in as *mut libc::sockaddr;
            assert_eq!(libc::getsockname(fd, gp, &mut got_len), 0, "getsockname(2)");
            ClosedPort {
                fd,
                addr: format!("127.0.0.1:{}", u16::from_be(got.sin_port)),
            }
        }
    }
}

impl Drop for ClosedPort {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor this guard owns, once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// The names of the threads of `pid` (`/proc/PID/task/*/comm`).
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc") {
        // A thread may end between the listing and the read.
        if let Ok(n) = std::fs::read_to_string(task.expect("task").path().join("comm")) {
            names.push(n.trim_end().to_owned());
        }
    }
    names
}

/// The addresses `skiff serve --ready-file` reports once it serves.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    pub pid: u32,
    pub tcp: Option<String>,
    pub tls: Option<String>,
    pub unix: Option<String>,
    pub metrics: Option<String>,
}

impl Ready {
    /// Reads a ready file; `None` until the broker has written it.
    pub fn read(path: &Path) -> Option<Ready> {
        let text = std::fs::read_to_string(path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).expect("a ready file is JSON");
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        Some(Ready {
            pid: v["pid"].as_u64().expect("pid in the ready file") as u32,
            tcp: s("tcp"),
            tls: s("tls"),
            unix: s("unix"),
            metrics: s("metrics"),
        })
    }
}

/// A `skiff serve` of the real binary on a fresh data directory. It listens
/// on a TCP port of its own choosing (the config asks for port 0, and the
/// harness reads the port it bound from `--ready-file`, so no other test
/// can take it between a pick and the bind) and on a Unix socket in the
/// directory. A restart keeps both addresses.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// TCP address, `127.0.0.1:PORT`.
    pub tcp: String,
    pub unix: PathBuf,
    /// The metrics endpoint's address, when `extra` enables it (ask for
    /// `listen = "127.0.0.1:0"` under `[metrics]`); it may change with a
    /// restart.
    pub metrics: Option<String>,
    /// The TLS listener's address, when `extra` enables it (ask for
    /// `listen = "127.0.0.1:0"` under `[server.tls]`).
    pub tls: Option<String>,
    child: Option<Child>,
    pub log_path: PathBuf,
    ready_path: PathBuf,
    /// Extra environment for `skiff serve` (NOTIFY_SOCKET in the service test).
    env: Vec<(String, String)>,
    /// `extra`'s top-level keys and sections, for rewriting the config.
    extra: (String, String),
    /// The data directory, when not inside `dir`.
    data_dir_on: Option<PathBuf>,
    /// Set once a start succeeded: from then on the TCP port is kept.
    started_once: bool,
}

impl Broker {
    /// Starts a broker; `extra` is TOML appended to the generated config
    /// (top-level keys first, then sections are fine).
    pub fn start(extra: &str) -> Broker {
        let dir = temp_dir();
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Broker {
        Self::start_with_env(dir, extra, &[])
    }

    pub fn start_with_env(dir: tempfile::TempDir, extra: &str, env: &[(&str, &str)]) -> Broker {
        let mut b = Self::new(dir, extra, env);
        b.spawn();
        b
    }

    /// A broker whose data directory is `data_dir` (another filesystem,
    /// such as tests/lazy_fs's); config, log and socket stay in a temp dir.
    pub fn start_on(data_dir: PathBuf, extra: &str) -> Broker {
        let mut b = Self::new(temp_dir(), extra, &[]);
        b.data_dir_on = Some(data_dir);
        b.spawn();
        b
    }

    fn new(dir: tempfile::TempDir, extra: &str, env: &[(&str, &str)]) -> Broker {
        Broker {
            config_path: dir.path().join("skiff.toml"),
            log_path: dir.path().join("broker.log"),
            ready_path: dir.path().join("ready.json"),
            unix: dir.path().join("skiff.sock"),
            dir,
            tcp: format!("127.0.0.1:{}", port_outside_ephemeral_range()),
            metrics: None,
            tls: None,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            extra: split_extra(extra),
            data_dir_on: None,
            started_once: false,
        }
    }

    /// The metrics endpoint's address (the config must enable it).
    #[track_caller]
    pub fn metrics_addr(&self) -> String {
        self.metrics
            .clone()
            .expect("the metrics endpoint is on in this broker's config")
    }

    /// The data directory inside [`Broker::dir`].
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir_on
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// The Unix socket's path as a `--broker` argument.
    pub fn unix_addr(&self) -> String {
        self.unix.to_str().expect("utf-8 path").to_owned()
    }

    fn write_config(&self) {
        let (top, sections) = &self.extra;
        let server_keys = format!("listen = {:?}\nunix_socket = {:?}\n", self.tcp, self.unix);
        // A [server] section in `extra` gets the listeners added to it (TOML
        // forbids a second [server] header).
        let sections = match sections.find("[server]\n") {
            Some(i) => {
                let at = i + "[server]\n".len();
                format!("{}{server_keys}{}", &sections[..at], &sections[at..])
            }
            None => format!("[server]\n{server_keys}{sections}"),
        };
        let text = format!("data_dir = {:?}\n{top}\n{sections}\n", self.data_dir());
        std::fs::write(&self.config_path, text).expect("writing the config");
    }

    /// One start; the exit status if the broker exited before ready.
    fn spawn_once(&mut self) -> Result<(), std::process::ExitStatus> {
        self.write_config();
        let _ = std::fs::remove_file(&self.ready_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the broker log");
        let child = skiff_command()
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .arg("--ready-file")
            .arg(&self.ready_path)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("starting skiff serve");
        self.child = Some(child);
        self.wait_ready()
    }

    /// Starts the broker, retrying on a port another process took. A
    /// first start picks a new port; a restart keeps its own (clients hold
    /// it), so it waits for the port to come free.
    fn spawn(&mut self) {
        let mut attempt = 0;
        while let Err(status) = self.spawn_once() {
            attempt += 1;
            if attempt > 5 || !self.log_tail_says_port_taken() {
                panic!("skiff serve exited early with {status}:\n{}", self.log());
            }
            if !self.started_once {
                self.tcp = format!("127.0.0.1:{}", port_outside_ephemeral_range());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Whether the broker's last start ended on a TCP port in use.
    fn log_tail_says_port_taken(&self) -> bool {
        self.log()
            .lines()
            .last()
            .is_some_and(|l| l.contains("Address already in use"))
    }

    /// Waits until the broker has written its ready file (recovery done,
    /// every listener bound), and takes the addresses from it.
    fn wait_ready(&mut self) -> Result<(), std::process::ExitStatus> {
        // Debug builds under qemu (scripts/cross-test) recover tens of
        // times slower than natively.
        let deadline = Instant::now() + Duration::from_secs(if emulated() { 240 } else { 60 });
        let ready = loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(status);
                }
            }
            if let Some(r) = Ready::read(&self.ready_path) {
                break r;
            }
            assert!(
                Instant::now() < deadline,
                "skiff serve did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(ready.pid, self.pid(), "a ready file from another broker");
        // Keep the port across restarts: the config asks for it from now on.
        self.tcp = ready.tcp.expect("the harness's broker listens on TCP");
        self.started_once = true;
        self.metrics = ready.metrics;
        self.tls = ready.tls;
        Ok(())
    }

    /// SIGHUP: the broker reloads its TLS files, [acl] and [quotas].
    pub fn sighup(&self) {
        unsafe_kill(self.pid(), libc::SIGHUP);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// SIGSTOP: the broker stalls with its sockets open, as under a stuck
    /// device. Undone by [`resume`](Self::resume) (or the kill at drop).
    /// SIGSTOP, and waits until every thread of the broker has stopped:
    /// the signal is only queued when kill(2) returns, and a thread busy
    /// on the other core could still answer a request sent right after.
    pub fn pause(&self) {
        let pid = self.pid();
        unsafe_kill(pid, libc::SIGSTOP);
        let stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        // The state follows the name's closing parenthesis.
                        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                            stat.rsplit_once(") ")
                                .is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
                        })
                    })
                })
                .unwrap_or(false)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stopped() {
            assert!(Instant::now() < deadline, "broker {pid} did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn resume(&self) {
        unsafe_kill(self.pid(), libc::SIGCONT);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe_kill(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let threads = watchdog::report(child.id());
                let _ = child.kill();
                let _ = watchdog::reap_killed(&mut child, reap_limit());
                panic!(
                    "skiff did not stop within 30 s of SIGTERM:\n{threads}\nits log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Err(e) = watchdog::reap_killed(&mut child, reap_limit()) {
                panic!("{e}\nthe broker's log:\n{}", self.log());
            }
        }
    }

    /// Replaces `extra` for the next start (a restart with another config).
    pub fn set_extra(&mut self, extra: &str) {
        self.extra = split_extra(extra);
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the broker first");
        self.spawn();
    }

    /// Runs a client command against this broker over TCP.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_cli(args, &self.tcp, stdin)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            // Often during a panic already: say it, never panic again.
            if let Err(e) = watchdog::reap_killed(&mut child, reap_limit()) {
                eprintln!("{e}");
            }
        }
    }
}

/// How long a SIGKILLed broker may take to go: its I/O in flight ends
/// first, which under qemu or on a slow disk takes a while.
fn reap_limit() -> Duration {
    Duration::from_secs(if emulated() { 240 } else { 60 })
}

/// A free TCP port below the kernel's ephemeral range, so that no
/// client connection's local port can take it while a test restarts its
/// broker on it (the restart keeps the port).
pub fn port_outside_ephemeral_range() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (low - 10_000, low)
    } else {
        (61_000, 65_000)
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ SEQ.fetch_add(1, Ordering::Relaxed);
    loop {
        // splitmix64: spreads nearby seeds apart.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let port = (from + (z % u64::from(to - from)) as u32) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a PID we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// `extra`'s top-level keys, and its sections from the first on. One that
/// starts with a section has no top-level keys (its first section went
/// there, and a `[server]` first then met the listeners' own).
fn split_extra(extra: &str) -> (String, String) {
    match extra
        .starts_with('[')
        .then_some(0)
        .or_else(|| extra.find("\n["))
    {
        Some(i) => (extra[..i].to_owned(), extra[i..].to_owned()),
        None => (extra.to_owned(), String::new()),
    }
}

pub fn run_cli(args: &[&str], broker: &str, stdin: Option<&[u8]>) -> Output {
    run_cli_within(args, broker, stdin, cli_limit())
}

/// How long a client command may run before [`run_cli`] ends it: far
/// above any test's command, below nextest's end of a hung test, so a
/// hang fails with the command's output instead of nothing said.
pub fn cli_limit() -> Duration {
    Duration::from_secs(if emulated() { 600 } else { 300 })
}

/// As [`run_cli`], but a command still running after `limit` is killed,
/// and the test panics with where its threads waited and its output.
pub fn run_cli_within(
    args: &[&str],
    broker: &str,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Output {
    let mut cmd = skiff_command();
    cmd.args(args).arg("--broker").arg(broker);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running skiff");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = s.write_all(&input);
        });
    }
    // Read as it comes, so a full pipe never stalls the command.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let mut nap = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for skiff") {
            break status;
        }
        if Instant::now() >= deadline {
            let threads = watchdog::report(child.id());
            let _ = child.kill();
            let reaped = watchdog::reap_killed(&mut child, reap_limit());
            let (out, err) = (out.join().unwrap(), err.join().unwrap());
            panic!(
                "skiff {} did not finish within {limit:?}; killed{}\n{threads}stdout:\n{}\nstderr:\n{}",
                args.join(" "),
                reaped.err().map_or(String::new(), |e| format!(" ({e})")),
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err),
            );
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs the binary with exactly these arguments (no --broker).
pub fn run_bin(args: &[&str]) -> Output {
    skiff_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running skiff")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's stdout as JSON, one value per line.
pub fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "command failed with {}:\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after
/// `timeout`. For waiting on a condition instead of sleeping.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGTERM to `pid` (a child of the test, not yet reaped) and waits
/// until its handler has run, which it says on stderr (`stderr`, a file):
/// a second signal is then a second to the process, neither merged with
/// the first while pending nor taken before it. The process's own word,
/// not /proc: under qemu-user the guest's handler runs after the host's,
/// and qemu's threads block signals of their own.
#[track_caller]
pub fn sigterm_taken(pid: i32, stderr: &Path, timeout: Duration) {
    unsafe_kill(pid as u32, libc::SIGTERM);
    let notice = skiff::cli::STOPPING.trim_end();
    wait_until(timeout, "the process to take the SIGTERM", || {
        std::fs::read_to_string(stderr).is_ok_and(|s| s.contains(notice))
    });
}

/// xorshift64*: a seeded generator, so a failure replays exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A duration in `lo..=hi` milliseconds.
    pub fn between_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

static NEXT_TOPIC: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A topic name not used before in this test process.
pub fn unique_topic(prefix: &str) -> String {
    let n = NEXT_TOPIC.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{n}")
}

impl Broker {
    /// Whether the broker process is still running (not exited).
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The broker's resident set size in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Minor page faults the broker has taken so far (/proc/PID/stat).
    pub fn minor_faults(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("reading /proc/PID/stat");
        // Fields after the command name, which is in parentheses and may
        // hold spaces: state is field 3, minflt field 10.
        let rest = &stat[stat.rfind(')').expect("comm in /proc/PID/stat") + 2..];
        rest.split(' ')
            .nth(7)
            .and_then(|v| v.parse().ok())
            .expect("minflt in /proc/PID/stat")
    }

    /// Checks that the broker still serves a client: creates a fresh topic,
    /// produces one record with the CLI and consumes it back.
    #[track_caller]
    pub fn assert_serves(&mut self) {
        assert!(self.is_alive(), "the broker died:\n{}", self.log());
        let topic = unique_topic("alive");
        // Small rings: these probes add up over a test's many checks.
        assert_ok(&self.cli(&[
            "topics",
            "create",
            &topic,
            "--segment-bytes",
            &PROBE_SEGMENT_BYTES.to_string(),
            "--segments",
            "2",
        ]));
        let value = format!("still-serving-{topic}");
        assert_ok(&self.cli(&["produce", &topic, &value]));
        let o = self.cli(&["consume", &topic, "--count", "1", "--timeout-ms", "10000"]);
        assert_ok(&o);
        assert_eq!(stdout(&o), format!("{value}\n"));
        assert!(self.is_alive(), "the broker died:\n{}", self.log());
    }
}

/// Segment size of the probe topics of [`Broker::assert_serves`]: the
/// smallest that holds a batch of the default `max_batch_bytes` (1 MiB) plus
/// 4 KiB, rounded to 4 KiB.
pub const PROBE_SEGMENT_BYTES: u64 = 1024 * 1024 + 8192;

/// What the disk budget keeps for the broker's own topics under the
/// embedded default's `storage.max_batch_bytes` (128 KiB) and `[share]`:
/// `__skiff_offsets` and `__skiff_share` 4 + 1 segments of 1 MiB each,
/// `__skiff_txn` 4 (docs/configuration.md, "The disk budget").
pub const INTERNAL_TOPICS_DISK_BYTES: u64 = 14 * 1024 * 1024;

/// The broker's own topics, one partition each: the topic slots and
/// partitions `server.max_topics`/`max_partitions` keep for them from the
/// first start.
pub const INTERNAL_TOPICS: u32 = 3;

/// A raw protocol connection for feeding the broker bytes by hand.
pub struct RawConn {
    pub stream: std::net::TcpStream,
}

/// How long a raw read waits for the broker before the test fails.
pub const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl RawConn {
    pub fn connect(addr: &str) -> RawConn {
        let stream = std::net::TcpStream::connect(addr).expect("connecting to the broker");
        stream
            .set_read_timeout(Some(RAW_READ_TIMEOUT))
            .expect("setting a read timeout");
        RawConn { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("writing to the broker");
    }

    pub fn send_request(&mut self, correlation_id: u32, body: skiff::protocol::RequestBody) {
        let mut buf = Vec::new();
        skiff::protocol::encode_request(
            &skiff::protocol::Request {
                correlation_id,
                body,
            },
            &mut buf,
        )
        .expect("encoding a request");
        self.send(&buf);
    }

    /// Connects as a client of protocol versions 1..=`version` (an older
    /// client than the broker) and checks the broker settled on `version`.
    pub fn connect_as_version(addr: &str, version: u16) -> RawConn {
        let mut c = RawConn::connect(addr);
        c.send_request(1, hello_body(1, version));
        let r = c.read_response().expect("a hello answer");
        assert!(
            matches!(&r.body, skiff::protocol::ResponseBody::Hello(h) if h.version == version),
            "expected a hello answer for version {version}, got {r:?}"
        );
        c
    }

    /// Sends `body`, whose answer must be an error with `code`; returns its
    /// message.
    #[track_caller]
    pub fn request_error(
        &mut self,
        correlation_id: u32,
        body: skiff::protocol::RequestBody,
        code: skiff::protocol::ErrorCode,
    ) -> String {
        self.send_request(correlation_id, body);
        match self.expect_error(code).body {
            skiff::protocol::ResponseBody::Error(e) => e.message,
            _ => unreachable!("expect_error checked it"),
        }
    }

    /// Sends a hello for version 1 and checks the answer.
    pub fn hello(&mut self) {
        self.send_request(1, hello_body(1, 1));
        let r = self.read_response().expect("a hello answer");
        assert!(
            matches!(r.body, skiff::protocol::ResponseBody::Hello(_)),
            "expected a hello answer, got {r:?}"
        );
    }

    /// Reads one whole frame body; `None` on a clean EOF before any byte.
    /// Panics on a timeout or EOF inside a frame.
    pub fn read_frame(&mut self) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.stream.read(&mut prefix[got..]) {
                Ok(0) if got == 0 => return None,
                Ok(0) => panic!("EOF inside a frame prefix"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading from the broker: {e}"),
            }
        }
        let len = u32::from_be_bytes(prefix) as usize;
        assert!(len <= 64 * 1024 * 1024, "absurd frame length {len}");
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .expect("reading a frame body");
        Some(body)
    }

    pub fn read_response(&mut self) -> Option<skiff::protocol::Response> {
        self.read_frame()
            .map(|b| skiff::protocol::decode_response(&b).expect("the broker sent a valid frame"))
    }

    /// Reads one response, which must be an error with `code`; returns it.
    #[track_caller]
    pub fn expect_error(&mut self, code: skiff::protocol::ErrorCode) -> skiff::protocol::Response {
        let r = self
            .read_response()
            .unwrap_or_else(|| panic!("connection closed; expected error {code:?}"));
        match &r.body {
            skiff::protocol::ResponseBody::Error(e) => {
                assert_eq!(e.code, code, "unexpected error: {r:?}")
            }
            other => panic!("expected error {code:?}, got {other:?}"),
        }
        r
    }

    /// The broker closes the connection: EOF (or reset) within the timeout,
    /// with no further frame.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        if let Some(b) = self.read_frame() {
            panic!(
                "expected the connection to close, got a frame: {:?}",
                skiff::protocol::decode_response(&b)
            );
        }
    }
}

pub fn hello_body(version_min: u16, version_max: u16) -> skiff::protocol::RequestBody<'static> {
    skiff::protocol::RequestBody::Hello(skiff::protocol::HelloRequest {
        version_min,
        version_max,
        client_name: Some("skiff-e2e".to_owned()),
    })
}

/// The bytes of one request frame.
pub fn request_frame(correlation_id: u32, body: skiff::protocol::RequestBody) -> Vec<u8> {
    let mut buf = Vec::new();
    skiff::protocol::encode_request(
        &skiff::protocol::Request {
            correlation_id,
            body,
        },
        &mut buf,
    )
    .expect("encoding a request");
    buf
}

/// Every record of every partition, from the earliest offset to the high
/// watermark at the time of the call.
pub fn consume_all(addr: &str, topic: &str) -> Vec<skiff::client::ConsumerRecord> {
    let client = skiff::client::blocking::Client::connect(addr).expect("connect");
    let d = client
        .describe_topic(topic)
        .expect("describe after restart");
    let total: u64 = d
        .partitions
        .iter()
        .map(|p| p.latest_offset - p.earliest_offset)
        .sum();
    let mut consumer = skiff::client::blocking::Consumer::new(
        &client,
        skiff::client::ConsumerConfig {
            max_wait: Duration::from_millis(100),
            ..skiff::client::ConsumerConfig::default()
        },
    );
    consumer
        .assign(topic, None, skiff::client::StartFrom::Earliest)
        .expect("assign");
    let mut records = Vec::new();
    // A deadline on progress, not on the whole read: a long soak's log (4
    // million records through tests/lazy_fs, in a debug build) takes
    // minutes to read back.
    let mut deadline = Instant::now() + Duration::from_secs(30);
    while (records.len() as u64) < total {
        assert!(
            Instant::now() < deadline,
            "read {} of {total} records, none for 30 s",
            records.len()
        );
        let got = consumer.poll().expect("poll");
        if !got.is_empty() {
            deadline = Instant::now() + Duration::from_secs(30);
        }
        records.extend(got);
    }
    assert!(
        consumer.poll().expect("poll").is_empty(),
        "records beyond the high watermark"
    );
    records
}

/// Exit code `code` and exactly one stderr line containing every `needles`.
#[track_caller]
pub fn assert_fails(o: &std::process::Output, code: i32, needles: &[&str]) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "one stderr line: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should name {n:?}: {err}");
    }
}

/// `skiff serve` with no arguments in `dir`, as the README runs it, except
/// that it listens where `SKIFF_LISTEN` says: a free port, so that a broker
/// already on 9471 does not matter. Killed on drop.
pub struct DefaultServe {
    child: Option<Child>,
    /// The TCP address from the start-up line.
    pub addr: String,
    pub log_path: PathBuf,
}

impl DefaultServe {
    pub fn start(dir: &Path) -> DefaultServe {
        let log_path = dir.join("broker.log");
        let log = std::fs::File::create(&log_path).expect("creating the broker log");
        let child = skiff_command()
            .arg("serve")
            .current_dir(dir)
            .env("SKIFF_LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("starting skiff serve");
        let mut serve = DefaultServe {
            child: Some(child),
            addr: String::new(),
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        serve.addr = loop {
            if let Some(status) = serve
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("skiff serve exited with {status}:\n{}", serve.log());
            }
            if let Some(addr) = serving_addr(&serve.log()) {
                break addr;
            }
            assert!(
                Instant::now() < deadline,
                "skiff serve did not come up:\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        serve
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Takes the process, to stop it by hand.
    pub fn take(&mut self) -> Child {
        self.child.take().expect("running")
    }
}

impl Drop for DefaultServe {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The TCP address on the start-up line: `..., tcp 127.0.0.1:PORT, ...`.
pub fn serving_addr(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(" serving: "))?;
    let rest = &line[line.find(", tcp ")? + ", tcp ".len()..];
    Some(rest[..rest.find(',')?].to_owned())
}

/// The value of the first sample of `name` whose labels contain `labels`.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The body and headers of a plain HTTP GET (the metrics endpoint).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Damages the partition directory `dir` past loading: its
/// `partition.meta` no longer decodes and no segment header reads.
/// Returns each segment file with the bytes it now holds.
pub fn make_unloadable(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let meta = dir.join("partition.meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&meta, bytes).unwrap();
    let mut damaged = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "log") {
            let mut seg = std::fs::read(&path).unwrap();
            seg[..4096].fill(0xa5);
            std::fs::write(&path, &seg).unwrap();
            damaged.push((path, seg));
        }
    }
    assert!(!damaged.is_empty());
    damaged
}
