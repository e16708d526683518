//! The floor under workload P at 100 B (issue 23, item 1): what one
//! group commit of a window costs the server's CPU when the server does
//! nothing but what durability needs: take the window off the socket,
//! write it with O_DIRECT into a pre-written file, fdatasync, answer.
//! No broker, no CBOR, no CRC, no index: the syscalls, copies and
//! wake-ups that any server built one way or another pays per window.
//! Item 1 asks for half of the broker's CPU per record; this says how
//! much of that half is left to the broker once the floor is paid
//! (docs/performance.md, "CPU per record").
//!
//! Three servers, each against the same blocking client on its own thread
//! (one window in flight, as P with 1,000 records in flight and windows of
//! 1,000 records):
//!
//! - `one`: one thread, blocking calls: `read`, copy into an aligned
//!   buffer, `pwrite`, `fdatasync`, `write` the answer;
//! - `two`: as skiff is built, a network thread that reads the window and
//!   hands it to a storage thread, which writes and flushes it and hands
//!   the ack back (two hand-offs, each a sleep and a wake-up);
//! - `ring`: one thread and one io_uring: the window's `recv`s, then its
//!   write, flush and answer linked in one submission and one wait;
//! - `ringd`: the same with the write made durable by `RWF_DSYNC` instead
//!   of a linked fdatasync (which io_uring runs on a worker thread).
//!
//! CPU is the whole process's less the client thread's, so that io_uring's
//! worker threads count.
//!
//! `cargo bench --bench p_floor`. `SKIFF_PFLOOR_DIR` (default /var/tmp:
//! a real disk, not tmpfs, which has no O_DIRECT), `SKIFF_PFLOOR_WINDOWS`
//! (default 3000), `SKIFF_PFLOOR_BYTES` (default 112000: 1,000 records of
//! 100 B with their framing), `SKIFF_PFLOOR_ROUNDS` (default 3).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{env, thread_cpu};

const FILE_BYTES: usize = 64 << 20;
const ALIGN: usize = 4096;

/// This thread's voluntary context switches so far (its sleeps).
fn thread_sleeps() -> u64 {
    let mut r: libc::rusage = zeroed_rusage();
    // SAFETY: `r` is a valid rusage for the call to fill.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut r) };
    r.ru_nvcsw as u64
}

fn zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers and timevals: all zeroes is valid.
    unsafe { std::mem::zeroed() }
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is owned memory, used by one thread at a time.
unsafe impl Send for Aligned {}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "alloc");
        Aligned { ptr, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN).expect("layout");
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// The segment stand-in: a file written in full first (skiff pre-writes
/// its segments, so its writes are overwrites), opened O_DIRECT.
fn segment(dir: &str) -> (std::fs::File, String) {
    let path = format!("{dir}/skiff-pfloor-{}", std::process::id());
    {
        let mut f = std::fs::File::create(&path).expect("create the file");
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..FILE_BYTES / chunk.len() {
            f.write_all(&chunk).expect("pre-write");
        }
        f.sync_all().expect("sync");
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open O_DIRECT");
    (f, path)
}

fn pwrite(f: &std::fs::File, buf: &[u8], at: usize) {
    // SAFETY: `buf` is valid for its length during the call.
    let n = unsafe {
        libc::pwrite(
            f.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            at as libc::off_t,
        )
    };
    assert_eq!(n as usize, buf.len(), "pwrite");
}

fn fdatasync(f: &std::fs::File) {
    // SAFETY: plain syscall on an open fd.
    assert_eq!(unsafe { libc::fdatasync(f.as_raw_fd()) }, 0, "fdatasync");
}

struct Shape {
    window: usize,
    windows: usize,
}

impl Shape {
    /// The window rounded up to whole blocks, as an O_DIRECT write is.
    fn written(&self) -> usize {
        self.window.div_ceil(ALIGN) * ALIGN
    }

    fn at(&self, i: usize) -> usize {
        (i * self.written()) % (FILE_BYTES - self.written())
    }
}

/// The process's CPU time and voluntary context switches so far: every
/// thread's, io_uring's workers included (they are the process's threads).
fn process_used() -> (Duration, u64) {
    let mut r = zeroed_rusage();
    // SAFETY: `r` is a valid rusage for the call to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(r.ru_utime) + tv(r.ru_stime), r.ru_nvcsw as u64)
}

/// The whole machine's busy CPU time so far (every process, kernel
/// workers and interrupts included), from /proc/stat: where a flush's
/// completion runs on a kernel worker, the process's own time misses it.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("a cpu line");
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy = f[0] + f[1] + f[2] + f[5] + f[6];
    // SAFETY: plain sysconf call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(busy * 1000 / hz)
}

/// Sends the windows; returns the time taken and its own CPU time and
/// sleeps, to take off the process's.
fn client(mut s: TcpStream, shape: &Shape) -> (Duration, Duration, u64) {
    let window = vec![7u8; shape.window];
    let mut ack = [0u8; 8];
    let (cpu0, sl0) = (thread_cpu(), thread_sleeps());
    let start = Instant::now();
    for _ in 0..shape.windows {
        s.write_all(&window).expect("send a window");
        s.read_exact(&mut ack).expect("read its ack");
    }
    (start.elapsed(), thread_cpu() - cpu0, thread_sleeps() - sl0)
}

fn one(mut s: TcpStream, f: &std::fs::File, shape: &Shape) -> (Duration, u64) {
    let (cpu0, sl0) = (thread_cpu(), thread_sleeps());
    let mut rx = vec![0u8; shape.window];
    let mut out = Aligned::new(shape.written());
    for i in 0..shape.windows {
        s.read_exact(&mut rx).expect("window");
        out.as_mut()[..shape.window].copy_from_slice(&rx);
        pwrite(f, out.as_mut(), shape.at(i));
        fdatasync(f);
        s.write_all(&[1u8; 8]).expect("ack");
    }
    (thread_cpu() - cpu0, thread_sleeps() - sl0)
}

fn two(mut s: TcpStream, f: &std::fs::File, shape: &Shape) -> (Duration, u64) {
    let (to_storage, storage_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(1);
    let (to_net, acks) = mpsc::sync_channel::<Vec<u8>>(1);
    let written = shape.written();
    let f = f.try_clone().expect("clone the fd");
    let at = |i: usize| shape.at(i);
    std::thread::scope(|scope| {
        let storage = scope.spawn(move || {
            let (cpu0, sl0) = (thread_cpu(), thread_sleeps());
            let mut out = Aligned::new(written);
            for (i, rx) in storage_rx {
                out.as_mut()[..rx.len()].copy_from_slice(&rx);
                pwrite(&f, out.as_mut(), at(i));
                fdatasync(&f);
                // The buffer goes back with the ack, as skiff recycles its own.
                if to_net.send(rx).is_err() {
                    break;
                }
            }
            (thread_cpu() - cpu0, thread_sleeps() - sl0)
        });
        let (cpu0, sl0) = (thread_cpu(), thread_sleeps());
        let mut rx = vec![0u8; shape.window];
        for i in 0..shape.windows {
            s.read_exact(&mut rx).expect("window");
            to_storage.send((i, rx)).expect("storage thread");
            rx = acks.recv().expect("ack");
            s.write_all(&[1u8; 8]).expect("ack");
        }
        drop(to_storage);
        let net = (thread_cpu() - cpu0, thread_sleeps() - sl0);
        let st = storage.join().expect("storage thread");
        (net.0 + st.0, net.1 + st.1)
    })
}

fn ring(s: TcpStream, f: &std::fs::File, shape: &Shape) -> (Duration, u64) {
    ring_with(s, f, shape, false)
}

fn ring_dsync(s: TcpStream, f: &std::fs::File, shape: &Shape) -> (Duration, u64) {
    ring_with(s, f, shape, true)
}

/// `dsync`: the write carries `RWF_DSYNC` in place of a linked fdatasync,
/// which io_uring cannot run inline and hands to a worker thread.
fn ring_with(s: TcpStream, f: &std::fs::File, shape: &Shape, dsync: bool) -> (Duration, u64) {
    use io_uring::{opcode, squeue, types, IoUring};
    let (cpu0, sl0) = (thread_cpu(), thread_sleeps());
    let mut ring = IoUring::new(8).expect("io_uring");
    let sock = types::Fd(s.as_raw_fd());
    let file = types::Fd(f.as_raw_fd());
    // The window is received straight into the aligned buffer: the copy
    // skiff makes into its segment tail is the one a ring server saves.
    let mut out = Aligned::new(shape.written());
    let ack = [1u8; 8];
    for i in 0..shape.windows {
        let mut got = 0;
        while got < shape.window {
            let buf = &mut out.as_mut()[got..shape.window];
            let recv = opcode::Recv::new(sock, buf.as_mut_ptr(), buf.len() as u32)
                .build()
                .user_data(0);
            // SAFETY: `buf` outlives the request: we wait for it below.
            unsafe { ring.submission().push(&recv).expect("sq") };
            ring.submit_and_wait(1).expect("enter");
            let cqe = ring.completion().next().expect("cqe");
            assert!(cqe.result() > 0, "recv: {}", cqe.result());
            got += cqe.result() as usize;
        }
        let data = out.as_mut();
        let write = opcode::Write::new(file, data.as_ptr(), data.len() as u32)
            .offset(shape.at(i) as u64)
            .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(1);
        let sync = opcode::Fsync::new(file)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(2);
        let send = opcode::Send::new(sock, ack.as_ptr(), ack.len() as u32)
            .build()
            .user_data(3);
        let ops = if dsync { 2 } else { 3 };
        // SAFETY: `data` and `ack` outlive the requests: all of them are
        // reaped before the loop goes on.
        unsafe {
            let mut sq = ring.submission();
            sq.push(&write).expect("sq");
            if !dsync {
                sq.push(&sync).expect("sq");
            }
            sq.push(&send).expect("sq");
        }
        let mut done = 0;
        while done < ops {
            ring.submit_and_wait(ops - done).expect("enter");
            for cqe in ring.completion() {
                assert!(
                    cqe.result() >= 0,
                    "op {}: {}",
                    cqe.user_data(),
                    cqe.result()
                );
                done += 1;
            }
        }
    }
    (thread_cpu() - cpu0, thread_sleeps() - sl0)
}

type Server = fn(TcpStream, &std::fs::File, &Shape) -> (Duration, u64);

fn main() {
    let dir = std::env::var("SKIFF_PFLOOR_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let shape = Shape {
        window: env("SKIFF_PFLOOR_BYTES", 112_000),
        windows: env("SKIFF_PFLOOR_WINDOWS", 3000),
    };
    let rounds = env("SKIFF_PFLOOR_ROUNDS", 3);
    let (file, path) = segment(&dir);
    let servers: [(&str, Server); 4] = [
        ("one", one),
        ("two", two),
        ("ring", ring),
        ("ringd", ring_dsync),
    ];
    println!(
        "p_floor: windows of {} B ({} B written), {} per run, O_DIRECT overwrites in {dir}, TCP loopback",
        shape.window,
        shape.written(),
        shape.windows
    );
    println!(
        "{:<6} {:>5} {:>12} {:>28} {:>18} {:>14}",
        "server",
        "round",
        "windows/s",
        "CPU per window (threads)",
        "sleeps (threads)",
        "machine CPU"
    );
    for round in 1..=rounds {
        for (name, server) in &servers {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (before, busy0) = (process_used(), machine_busy());
            let (elapsed, client_cpu, client_sleeps, (own_cpu, own_sleeps)) =
                std::thread::scope(|scope| {
                    let c = scope.spawn(|| {
                        let s = TcpStream::connect(addr).expect("connect");
                        s.set_nodelay(true).expect("nodelay");
                        client(s, &shape)
                    });
                    let (s, _) = listener.accept().expect("accept");
                    s.set_nodelay(true).expect("nodelay");
                    let used = server(s, &file, &shape);
                    let (elapsed, cpu, sleeps) = c.join().expect("client");
                    (elapsed, cpu, sleeps, used)
                });
            let (after, busy1) = (process_used(), machine_busy());
            let machine = (busy1 - busy0).saturating_sub(client_cpu);
            // Everything but the client: the server's threads and any
            // kernel worker the process has (io_uring punts fsyncs to one).
            let cpu = (after.0 - before.0).saturating_sub(client_cpu);
            let sleeps = (after.1 - before.1).saturating_sub(client_sleeps);
            let n = shape.windows as f64;
            println!(
                "{name:<6} {round:>5} {:>12.0} {:>15.1} µs ({:>5.1}) {:>10.2} ({:.2}) {:>11.1} µs",
                n / elapsed.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / n,
                own_cpu.as_secs_f64() * 1e6 / n,
                sleeps as f64 / n,
                own_sleeps as f64 / n,
                machine.as_secs_f64() * 1e6 / n,
            );
        }
    }
    drop(file);
    let _ = std::fs::remove_file(path);
}
