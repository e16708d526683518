//! `skiff serve` with no arguments runs on the embedded default config
//! (./skiff-data, 127.0.0.1:9471, ./skiff.sock), and the client commands
//! find it without --broker.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const DEFAULT_ADDR: &str = "127.0.0.1:9471";

/// Kills the broker when the test ends, also on a panic.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `skiff ARGS` in `cwd` exactly as given (no --broker).
fn skiff_in(cwd: &Path, args: &[&str]) -> Output {
    skiff_command()
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("running skiff")
}

#[test]
fn serve_without_arguments_uses_the_embedded_default() {
    // Skip only when something else holds the port before we start.
    match TcpListener::bind(DEFAULT_ADDR) {
        Ok(l) => drop(l),
        Err(e) => {
            eprintln!("SKIPPED: {DEFAULT_ADDR} is already in use on this machine ({e})");
            return;
        }
    }
    let dir = temp_dir();
    let cwd = dir.path();
    let log = std::fs::File::create(cwd.join("broker.log")).expect("log file");
    let child = skiff_command()
        .arg("serve")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("starting skiff serve");
    let mut guard = Guard(Some(child));
    let read_log = || std::fs::read_to_string(cwd.join("broker.log")).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let child = guard.0.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("skiff serve exited with {status}:\n{}", read_log());
        }
        if TcpStream::connect(DEFAULT_ADDR).is_ok()
            && std::os::unix::net::UnixStream::connect(cwd.join("skiff.sock")).is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "skiff serve did not come up:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cwd.join("skiff-data").is_dir(), "no ./skiff-data");

    // Default --broker: the TCP listener.
    assert_ok(&skiff_in(cwd, &["topics", "create", "defaults-e2e"]));
    assert_ok(&skiff_in(
        cwd,
        &["produce", "defaults-e2e", "hello", "world"],
    ));
    let o = skiff_in(cwd, &["consume", "defaults-e2e", "--count", "2"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "hello\nworld\n");
    let o = skiff_in(cwd, &["topics", "list"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "defaults-e2e\n");
    // The default Unix socket, relative to the broker's working directory.
    let o = skiff_in(
        cwd,
        &[
            "consume",
            "defaults-e2e",
            "--from",
            "1",
            "--count",
            "1",
            "--broker",
            "./skiff.sock",
        ],
    );
    assert_ok(&o);
    assert_eq!(stdout(&o), "world\n");

    // SIGTERM: exit 0, socket removed.
    let mut child = guard.0.take().expect("running");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            guard.0 = Some(child);
            panic!("skiff serve ignored SIGTERM:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{}", read_log());
    assert!(!cwd.join("skiff.sock").exists(), "socket left behind");
}
