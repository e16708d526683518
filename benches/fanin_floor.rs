//! The floor under workload F (fan-in): how many request/response round
//! trips this machine makes over many Unix socket connections, each with
//! one request in flight, when the server does nothing with a request
//! but answer it. No broker, no storage, no CBOR: what remains is the
//! syscalls and wake-ups of one round trip per record, which skiff's
//! fan-in can approach but never beat (docs/performance.md, "Fan-in").
//!
//! Two servers, each against a client of the same kind, each on its own
//! thread (as skiff's network thread and `skiff bench produce` are):
//!
//! - `epoll`: level-triggered epoll, a read and a write per request, the
//!   least a server can do;
//! - `smol`: a smol task per connection reading a frame and writing an
//!   answer, on async-io's reactor as skiff's sessions are: the executor's
//!   share beside the syscalls.
//!
//! Requests are 130 B (a 100 B record's produce frame) and answers 40 B.
//! `cargo bench --bench fanin_floor`; `SKIFF_FANIN_CONNECTIONS` (default
//! 1000) and `SKIFF_FANIN_REQUESTS` (default 300000) set the shape.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

const REQUEST: usize = 130;
const ANSWER: usize = 40;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

struct Epoll(i32);

impl Epoll {
    fn new(streams: &[UnixStream]) -> Epoll {
        // SAFETY: plain syscall; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0, "epoll_create1");
        for (i, s) in streams.iter().enumerate() {
            s.set_nonblocking(true).expect("nonblocking");
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: `ev` lives across the call; fds are open.
            let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
            assert_eq!(r, 0, "epoll_ctl");
        }
        Epoll(ep)
    }

    fn wait(&self, events: &mut [libc::epoll_event]) -> usize {
        // SAFETY: `events` is valid for its length.
        let n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, 1000) };
        n.max(0) as usize
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: the fd is ours.
        unsafe { libc::close(self.0) };
    }
}

/// Reads what is there from `streams[i]` into its partial frame and calls
/// `whole` for each complete frame of `size`.
fn drain(s: &mut UnixStream, partial: &mut usize, size: usize, mut whole: impl FnMut()) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                *partial += n;
                while *partial >= size {
                    *partial -= size;
                    whole();
                }
                if n < buf.len() {
                    return true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// One thread answering every request on `streams` until all close.
fn epoll_server(mut streams: Vec<UnixStream>) -> Duration {
    let ep = Epoll::new(&streams);
    let mut partial = vec![0usize; streams.len()];
    let mut open = streams.len();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let answer = [1u8; ANSWER];
    while open > 0 {
        let n = ep.wait(&mut events);
        for ev in &events[..n] {
            let i = ev.u64 as usize;
            let mut owed = 0;
            if !drain(&mut streams[i], &mut partial[i], REQUEST, || owed += 1) {
                open -= 1;
                // SAFETY: removing an fd we added; it is still open.
                unsafe {
                    libc::epoll_ctl(
                        ep.0,
                        libc::EPOLL_CTL_DEL,
                        streams[i].as_raw_fd(),
                        std::ptr::null_mut(),
                    )
                };
            }
            for _ in 0..owed {
                streams[i].write_all(&answer).expect("answer");
            }
        }
    }
    thread_cpu()
}

/// One thread keeping one request in flight on each of `streams` until
/// `requests` were answered.
fn epoll_client(mut streams: Vec<UnixStream>, requests: usize) -> Duration {
    let ep = Epoll::new(&streams);
    let request = [2u8; REQUEST];
    let mut partial = vec![0usize; streams.len()];
    let mut sent = 0;
    for s in &mut streams {
        if sent < requests {
            s.write_all(&request).expect("request");
            sent += 1;
        }
    }
    let mut answered = 0;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    while answered < requests {
        let n = ep.wait(&mut events);
        for ev in &events[..n] {
            let i = ev.u64 as usize;
            let mut got = 0;
            drain(&mut streams[i], &mut partial[i], ANSWER, || got += 1);
            answered += got;
            for _ in 0..got {
                if sent < requests {
                    streams[i].write_all(&request).expect("request");
                    sent += 1;
                }
            }
        }
    }
    thread_cpu()
}

fn smol_server(streams: Vec<UnixStream>) -> Duration {
    let ex = smol::LocalExecutor::new();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| {
            ex.spawn(async move {
                let mut s = smol::Async::new(s).expect("async");
                let mut req = [0u8; REQUEST];
                let answer = [1u8; ANSWER];
                while s.read_exact(&mut req).await.is_ok() {
                    s.write_all(&answer).await.expect("answer");
                }
            })
        })
        .collect();
    smol::block_on(ex.run(async {
        for t in tasks {
            t.await;
        }
    }));
    thread_cpu()
}

fn smol_client(streams: Vec<UnixStream>, requests: usize) -> Duration {
    let ex = smol::LocalExecutor::new();
    let per = requests / streams.len();
    let extra = requests % streams.len();
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let n = per + usize::from(i < extra);
            ex.spawn(async move {
                let mut s = smol::Async::new(s).expect("async");
                let request = [2u8; REQUEST];
                let mut answer = [0u8; ANSWER];
                for _ in 0..n {
                    s.write_all(&request).await.expect("request");
                    s.read_exact(&mut answer).await.expect("answer");
                }
            })
        })
        .collect();
    smol::block_on(ex.run(async {
        for t in tasks {
            t.await;
        }
    }));
    thread_cpu()
}

fn run(
    name: &str,
    connections: usize,
    requests: usize,
    server: fn(Vec<UnixStream>) -> Duration,
    client: fn(Vec<UnixStream>, usize) -> Duration,
) {
    let (ours, theirs): (Vec<_>, Vec<_>) = (0..connections)
        .map(|_| UnixStream::pair().expect("socketpair"))
        .unzip();
    let start = Instant::now();
    let s = std::thread::spawn(move || server(theirs));
    let c = std::thread::spawn(move || client(ours, requests));
    let client_cpu = c.join().expect("client");
    let elapsed = start.elapsed();
    let server_cpu = s.join().expect("server");
    let us = |d: Duration| d.as_secs_f64() * 1e6 / requests as f64;
    println!(
        "{name:5}  {connections:>6} connections  {:>9.0} round trips/s  server {:>5.2} us CPU each  client {:>5.2} us",
        requests as f64 / elapsed.as_secs_f64(),
        us(server_cpu),
        us(client_cpu),
    );
}

fn main() {
    let connections = env("SKIFF_FANIN_CONNECTIONS", 1000);
    let requests = env("SKIFF_FANIN_REQUESTS", 300_000);
    for _ in 0..2 {
        run("epoll", connections, requests, epoll_server, epoll_client);
        run("smol", connections, requests, smol_server, smol_client);
    }
}
