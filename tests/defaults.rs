//! `skiff serve` with no arguments runs on the embedded default config
//! (./skiff-data, 127.0.0.1:9471, ./skiff.sock), and the client commands
//! find it without --broker.
//!
//! Port 9471 may be taken on a machine where a broker already runs (the
//! README's flow: a broker in one terminal, the tests in another), so the
//! broker here listens where `SKIFF_LISTEN` says (port 0: a free one, named
//! on its start-up line) and the clients find it through `SKIFF_BROKER`.
//! That 9471 is the default on both sides is checked where no port is
//! bound: in `config check` and in the clients' help.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `skiff ARGS` in `cwd` with `SKIFF_BROKER` set to `broker` (no
/// --broker).
fn skiff_in(cwd: &Path, broker: &str, args: &[&str]) -> Output {
    skiff_command()
        .args(args)
        .current_dir(cwd)
        .env("SKIFF_BROKER", broker)
        .stdin(Stdio::null())
        .output()
        .expect("running skiff")
}

#[test]
fn serve_without_arguments_uses_the_embedded_default() {
    let dir = temp_dir();
    let cwd = dir.path();
    let mut serve = DefaultServe::start(cwd);
    let addr = serve.addr.clone();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    assert!(cwd.join("skiff-data").is_dir(), "no ./skiff-data");
    assert!(cwd.join("skiff.sock").exists(), "no ./skiff.sock");
    // The start-up line says what the embedded default's budget is.
    let budget = skiff::config::Config::embedded_default()
        .memory_budget()
        .summary();
    assert!(serve.log().contains(&budget), "{}", serve.log());

    // The clients' broker from the environment: the TCP listener.
    assert_ok(&skiff_in(cwd, &addr, &["topics", "create", "defaults-e2e"]));
    assert_ok(&skiff_in(
        cwd,
        &addr,
        &["produce", "defaults-e2e", "hello", "world"],
    ));
    let o = skiff_in(cwd, &addr, &["consume", "defaults-e2e", "--count", "2"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "hello\nworld\n");
    let o = skiff_in(cwd, &addr, &["topics", "list"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "defaults-e2e\n");
    // The default Unix socket, relative to the broker's working directory
    // (--broker wins over the environment).
    let o = skiff_in(
        cwd,
        &addr,
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
    let mut child = serve.take();
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
            let _ = child.kill();
            let _ = child.wait();
            panic!("skiff serve ignored SIGTERM:\n{}", serve.log());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{}", serve.log());
    assert!(!cwd.join("skiff.sock").exists(), "socket left behind");
}

/// Where no port is bound: the embedded default listens on 127.0.0.1:9471
/// and ./skiff.sock, and every client command's --broker defaults to it.
#[test]
fn the_default_address_is_9471_on_both_sides() {
    let o = skiff_command()
        .args(["config", "check"])
        .env_remove("SKIFF_LISTEN")
        .output()
        .expect("running skiff");
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("listen = \"127.0.0.1:9471\""), "{out}");
    assert!(out.contains("unix_socket = \"./skiff.sock\""), "{out}");
    assert!(out.contains("data_dir = \"./skiff-data\""), "{out}");
    for args in [
        &["topics", "list", "--help"][..],
        &["produce", "--help"],
        &["consume", "--help"],
        &["bench", "produce", "--help"],
    ] {
        let o = skiff_command()
            .args(args)
            .env_remove("SKIFF_BROKER")
            .output()
            .expect("running skiff");
        assert_ok(&o);
        let help = stdout(&o);
        assert!(
            help.contains("[env: SKIFF_BROKER=]") && help.contains("[default: 127.0.0.1:9471]"),
            "{args:?}: {help}"
        );
        assert!(help.contains("Unix socket"), "{args:?}: {help}");
    }
}
