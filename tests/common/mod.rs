//! Shared harness for the end-to-end tests: starts the real `skiff` binary
//! on a fresh data directory, on 127.0.0.1 and a Unix socket, and stops it
//! by PID when the test ends (also when the test panics).
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_skiff");

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

/// A free port on 127.0.0.1 (bound, then released for the broker to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

pub struct Broker {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub tcp: String,
    pub unix: PathBuf,
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl Broker {
    /// Starts a broker; `extra` is TOML appended to the generated config
    /// (top-level keys first, then sections are fine).
    pub fn start(extra: &str) -> Broker {
        let dir = temp_dir();
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Broker {
        let port = free_port();
        let tcp = format!("127.0.0.1:{port}");
        let unix = dir.path().join("skiff.sock");
        let data = dir.path().join("data");
        let config_path = dir.path().join("skiff.toml");
        let (top, sections) = split_extra(extra);
        let text = format!(
            "data_dir = {data:?}\n{top}\n[server]\nlisten = {tcp:?}\nunix_socket = {unix:?}\n{sections}\n"
        );
        std::fs::write(&config_path, text).expect("writing the config");
        let mut b = Broker {
            log_path: dir.path().join("broker.log"),
            dir,
            config_path,
            tcp,
            unix,
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the broker log");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("starting skiff serve");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the broker accepts connections on both listeners.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("skiff serve exited early with {status}:\n{}", self.log());
                }
            }
            let tcp_ok = std::net::TcpStream::connect(&self.tcp).is_ok();
            let unix_ok = std::os::unix::net::UnixStream::connect(&self.unix).is_ok();
            if tcp_ok && unix_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "skiff serve did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
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
                let _ = child.kill();
                let _ = child.wait();
                panic!("skiff did not stop within 30 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
            let _ = child.wait();
        }
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a PID we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn split_extra(extra: &str) -> (String, String) {
    match extra.find("\n[").or_else(|| extra.starts_with('[').then_some(0)) {
        Some(i) => (extra[..i].to_owned(), extra[i..].to_owned()),
        None => (extra.to_owned(), String::new()),
    }
}

pub fn run_cli(args: &[&str], broker: &str, stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(BIN);
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
    child.wait_with_output().expect("waiting for skiff")
}

/// Runs the binary with exactly these arguments (no --broker).
pub fn run_bin(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running skiff")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
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
