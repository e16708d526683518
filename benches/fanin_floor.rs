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
//!   share beside the syscalls;
//! - `uring`: one io_uring on one thread, a recv always queued on every
//!   connection and a send per answer, submitted and reaped in batches (one
//!   `io_uring_enter` for many of them), against the `epoll` client: what a
//!   server built around one ring (the open question in
//!   docs/performance.md, "Fan-in") would start from;
//! - `multi`: the same with one multishot recv per connection, armed once,
//!   into buffers the server provides to the kernel (and gives back after
//!   each request), so that a quiet connection costs no re-arming.
//!
//! Requests are 130 B (a 100 B record's produce frame) and answers 40 B.
//! `cargo bench --bench fanin_floor`; `SKIFF_FANIN_CONNECTIONS` (default
//! 1000) and `SKIFF_FANIN_REQUESTS` (default 300000) set the shape.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{env, thread_cpu};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

const REQUEST: usize = 130;
const ANSWER: usize = 40;

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

/// An io_uring and how many of its requests have not completed. Each
/// server declares it after the buffers its requests name and waits for
/// `inflight` to reach zero before returning, so that nothing the kernel
/// still writes or reads is freed under it.
struct Ring {
    ring: io_uring::IoUring,
    inflight: usize,
}

impl Ring {
    fn new(entries: u32) -> Ring {
        Ring {
            ring: io_uring::IoUring::new(entries).expect("io_uring"),
            inflight: 0,
        }
    }

    /// Queues `e`, submitting what is queued when the ring is full.
    ///
    /// # Safety
    /// Every buffer `e` names must live until its completion is reaped.
    unsafe fn push(&mut self, e: &io_uring::squeue::Entry) {
        // SAFETY: the caller's promise.
        while unsafe { self.ring.submission().push(e) }.is_err() {
            self.ring.submit().expect("io_uring submit");
        }
        self.inflight += 1;
    }

    /// Submits what is queued, waits for a completion and takes them all:
    /// (user data, result, flags).
    fn reap(&mut self, done: &mut Vec<(u64, i32, u32)>) {
        self.ring.submit_and_wait(1).expect("io_uring wait");
        done.clear();
        done.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }
}

/// Adds `got` bytes read from connection `i` to its partial request and
/// queues a send of `answer` for each request now whole.
///
/// # Safety
/// `answer` must outlive the ring's requests.
unsafe fn answer_whole(
    ring: &mut Ring,
    s: &UnixStream,
    i: usize,
    partial: &mut usize,
    got: usize,
    answer: &[u8; ANSWER],
) {
    *partial += got;
    while *partial >= REQUEST {
        *partial -= REQUEST;
        let fd = io_uring::types::Fd(s.as_raw_fd());
        let e = io_uring::opcode::Send::new(fd, answer.as_ptr(), ANSWER as u32)
            .build()
            .user_data((i as u64) << 2 | URING_SEND);
        // SAFETY: the caller's promise.
        unsafe { ring.push(&e) };
    }
}

/// `user_data` of the uring servers: connection `i` in the high bits, the
/// kind of request in the low two.
const URING_RECV: u64 = 0;
const URING_SEND: u64 = 1;
const URING_PROVIDE: u64 = 2;

/// One thread, one io_uring: a recv queued on every connection, a send for
/// each whole request, until all close.
fn uring_server(streams: Vec<UnixStream>) -> Duration {
    const READ: usize = 4096;
    let n = streams.len();
    let mut bufs = vec![0u8; n * READ];
    let answer = [1u8; ANSWER];
    let mut partial = vec![0usize; n];
    let mut ring = Ring::new(4096);
    let recv = |bufs: &mut [u8], i: usize| {
        let fd = io_uring::types::Fd(streams[i].as_raw_fd());
        io_uring::opcode::Recv::new(fd, bufs[i * READ..].as_mut_ptr(), READ as u32)
            .build()
            .user_data((i as u64) << 2 | URING_RECV)
    };
    for i in 0..n {
        // SAFETY: `bufs` outlives the ring's requests (`Ring`).
        unsafe { ring.push(&recv(&mut bufs, i)) };
    }
    let mut done = Vec::with_capacity(4096);
    while ring.inflight > 0 {
        ring.reap(&mut done);
        for &(data, result, _) in &done {
            ring.inflight -= 1;
            let i = (data >> 2) as usize;
            if data & 3 == URING_SEND {
                assert_eq!(result, ANSWER as i32, "send");
                continue;
            }
            if result <= 0 {
                // The client closed (0), or the connection failed.
                continue;
            }
            let (s, got) = (&streams[i], result as usize);
            // SAFETY: `answer` and `bufs` outlive the ring's requests.
            unsafe {
                answer_whole(&mut ring, s, i, &mut partial[i], got, &answer);
                ring.push(&recv(&mut bufs, i));
            }
        }
    }
    thread_cpu()
}

/// One thread, one io_uring, a multishot recv on every connection into
/// provided buffers, a send for each whole request, until all close.
fn uring_multishot_server(streams: Vec<UnixStream>) -> Duration {
    use io_uring::{cqueue, opcode, types};
    const BUF: usize = 512;
    const BUFS: usize = 4096;
    const GROUP: u16 = 1;
    let n = streams.len();
    assert!(n * 2 <= BUFS, "a buffer or two per connection");
    let mut pool = vec![0u8; BUF * BUFS];
    let answer = [1u8; ANSWER];
    let mut partial = vec![0usize; n];
    let mut ring = Ring::new(8192);
    let provide = |pool: &mut [u8], first: usize, count: usize| {
        let at = pool[first * BUF..].as_mut_ptr();
        opcode::ProvideBuffers::new(at, BUF as i32, count as u16, GROUP, first as u16)
            .build()
            .user_data(URING_PROVIDE)
    };
    let recv = |i: usize| {
        opcode::RecvMulti::new(types::Fd(streams[i].as_raw_fd()), GROUP)
            .build()
            .user_data((i as u64) << 2 | URING_RECV)
    };
    // SAFETY: `pool` outlives the ring's requests (`Ring`).
    unsafe {
        ring.push(&provide(&mut pool, 0, BUFS));
        for i in 0..n {
            ring.push(&recv(i));
        }
    }
    let mut done = Vec::with_capacity(8192);
    while ring.inflight > 0 {
        ring.reap(&mut done);
        for &(data, result, flags) in &done {
            let i = (data >> 2) as usize;
            match data & 3 {
                URING_PROVIDE => {
                    ring.inflight -= 1;
                    assert!(result >= 0, "provide buffers: {result}");
                }
                URING_SEND => {
                    ring.inflight -= 1;
                    assert_eq!(result, ANSWER as i32, "send");
                }
                _ => {
                    // A multishot recv goes on until a completion without
                    // `more`: the client closed (0), or it must be re-armed.
                    let more = cqueue::more(flags);
                    if !more {
                        ring.inflight -= 1;
                    }
                    if result <= 0 {
                        continue;
                    }
                    let (s, got) = (&streams[i], result as usize);
                    let id = cqueue::buffer_select(flags).expect("a provided buffer");
                    // SAFETY: `answer` and `pool` outlive the ring's
                    // requests.
                    unsafe {
                        answer_whole(&mut ring, s, i, &mut partial[i], got, &answer);
                        ring.push(&provide(&mut pool, id as usize, 1));
                        if !more {
                            ring.push(&recv(i));
                        }
                    }
                }
            }
        }
    }
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
        run("uring", connections, requests, uring_server, epoll_client);
        run(
            "multi",
            connections,
            requests,
            uring_multishot_server,
            epoll_client,
        );
    }
}
