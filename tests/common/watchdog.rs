//! Turns a hung end-to-end test into a failure that says where it hung.
//!
//! A loop test (tests/crash_loop.rs) has threads and child processes that
//! can each wait on the others: when one never returns, the test runner's
//! timeout ends it with nothing said but the seed. The watchdog prints the
//! test's last step, the kernel's view of every thread of the test and of
//! its child processes (state, wait channel, kernel stack), and the tail
//! of each child's log, then kills the children and aborts: a hung thread
//! cannot be unwound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Watches one test: [`Watchdog::step`] says what it does now, and a step
/// that lasts longer than the limit ends the test with a report.
pub struct Watchdog {
    step: Arc<Mutex<(String, Instant)>>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watches the steps of the test `name`, each allowed `limit`.
    pub fn start(name: &str, limit: Duration) -> Watchdog {
        let step = Arc::new(Mutex::new(("starting".to_owned(), Instant::now())));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (step, done, name) = (step.clone(), done.clone(), name.to_owned());
            std::thread::Builder::new()
                .name("watchdog".into())
                .spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                        let (what, since) = step.lock().unwrap().clone();
                        if since.elapsed() < limit {
                            continue;
                        }
                        eprintln!(
                            "watchdog: {name} has been at one step for over {limit:?}: {what}\n{}",
                            report(std::process::id())
                        );
                        kill_children(std::process::id());
                        std::process::abort();
                    }
                })
                .expect("a watchdog thread")
        };
        Watchdog {
            step,
            done,
            thread: Some(thread),
        }
    }

    /// The test moved on to `what`.
    pub fn step(&self, what: impl Into<String>) {
        *self.step.lock().unwrap() = (what.into(), Instant::now());
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The kernel's view of `pid` and its child processes: each thread's name,
/// state, wait channel and, when in I/O, kernel stack (root reads it), and the tail of
/// each child's stderr when that is a file (the harness's broker and
/// Tansu logs).
pub fn report(pid: u32) -> String {
    let mut out = format!("process {pid}:\n{}", threads(pid));
    for child in children(pid) {
        let cmd = read(&format!("/proc/{child}/cmdline")).replace('\0', " ");
        out += &format!("child {child}: {}\n{}", cmd.trim_end(), threads(child));
        if let Some(tail) = stderr_tail(child, 40) {
            out += &format!("  its log's last lines:\n{tail}");
        }
    }
    out
}

/// A thread a line: `TID name state wchan`, then its kernel stack when the
/// kernel holds it.
fn threads(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "  (gone)\n".into();
    };
    for task in tasks.flatten() {
        let p = task.path();
        let comm = read(&p.join("comm").to_string_lossy());
        let stat = read(&p.join("stat").to_string_lossy());
        // The state follows the name's closing parenthesis.
        let state = stat.rsplit_once(") ").map_or("?", |(_, r)| &r[..1]);
        let wchan = read(&p.join("wchan").to_string_lossy());
        out += &format!(
            "  {} {} {state} {wchan}\n",
            task.file_name().to_string_lossy(),
            comm.trim_end()
        );
        // Only a thread the kernel holds (uninterruptible, in I/O) has a
        // stack worth reading; the others wait where wchan says.
        if state == "D" {
            for frame in read(&p.join("stack").to_string_lossy()).lines().take(16) {
                out += &format!("      {frame}\n");
            }
        }
    }
    out
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            let stat = read(&format!("/proc/{p}/stat"));
            // Fields after the name: state, then the parent's PID.
            stat.rsplit_once(") ")
                .and_then(|(_, r)| r.split(' ').nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

fn stderr_tail(pid: u32, lines: usize) -> Option<String> {
    let path = std::fs::read_link(format!("/proc/{pid}/fd/2")).ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    Some(all[from..].iter().map(|l| format!("    {l}\n")).collect())
}

/// SIGKILL to each child: an aborted test leaves no broker or Tansu behind.
fn kill_children(pid: u32) {
    for child in children(pid) {
        // SAFETY: kill(2) takes any PID; a child that exited meanwhile
        // is a zombie of ours until reaped, so the PID is not reused.
        unsafe {
            libc::kill(child as i32, libc::SIGKILL);
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Reaps `child`, which was sent SIGKILL: a process stays until its I/O in
/// flight ends, and one that never does would hang the test unreported.
/// Says where its threads wait when it is still there after `limit`.
pub fn reap_killed(child: &mut std::process::Child, limit: Duration) -> Result<(), String> {
    let pid = child.id();
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return Ok(()),
            Ok(None) if Instant::now() >= deadline => {
                return Err(format!(
                    "process {pid} is still there {limit:?} after SIGKILL:\n{}",
                    threads(pid)
                ))
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}
