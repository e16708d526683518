//! Socket reads shared by the server's sessions and the client's
//! connections, and the connects the client, the mirror and the bench
//! share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::AsyncRead;

/// Connects to a Unix socket, waiting while its listener's accept queue
/// is full. A non-blocking connect then fails with EAGAIN and nothing has
/// started; async-io takes that for a connect in progress and hands back
/// a socket that is not connected, whose first use fails with ENOTCONN
/// ("Transport endpoint is not connected"). Devices reconnecting together
/// fill the queue: 10,000 connecting at once hit it in about one run in
/// six. A blocking connect would wait for room; this waits without
/// holding the thread. The caller bounds the wait (the client's connect
/// timeout).
pub async fn connect_unix(path: &Path) -> std::io::Result<smol::net::unix::UnixStream> {
    use rustix::io::Errno;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    let mut pause = Duration::from_micros(100);
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(Errno::AGAIN) => {
                smol::Timer::after(pause).await;
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    smol::net::unix::UnixStream::try_from(std::os::unix::net::UnixStream::from(fd))
}

/// Connects to `addr` (`host:port`) as `smol::net::TcpStream::connect`
/// does, trying each address in turn, but looks a host name up on a thread
/// of its own that ends with the lookup. smol's connect looks names up on
/// the `blocking` crate's pool, whose last thread never ends and wakes
/// every 500 ms: a mirror with a named upstream would keep one in the
/// broker for good (docs/performance.md, "An idle broker"). Not on the
/// [`crate::offload`] thread: with the uplink down a lookup can take the
/// resolver's whole timeout, and registry writes would wait behind it.
pub async fn connect_tcp(addr: &str) -> std::io::Result<smol::net::TcpStream> {
    let addrs = match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => resolve(addr).await?,
    };
    let mut last_err = None;
    for a in addrs {
        match smol::Async::<std::net::TcpStream>::connect(a).await {
            Ok(s) => return Ok(s.into()),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "could not connect to any of the addresses",
        )
    }))
}

/// The name of the thread that looks up one host name.
pub const RESOLVE_THREAD_NAME: &str = "skiff-resolve";

async fn resolve(addr: &str) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let (tx, rx) = async_channel::bounded(1);
    let name = addr.to_owned();
    std::thread::Builder::new()
        .name(RESOLVE_THREAD_NAME.to_owned())
        .spawn(move || {
            let found = std::net::ToSocketAddrs::to_socket_addrs(name.as_str());
            // Nobody left to tell if the connect was given up (a timeout).
            let _ = tx.try_send(found.map(Iterator::collect));
        })?;
    rx.recv()
        .await
        .map_err(|_| std::io::Error::other("the name lookup ended without an answer"))?
}

/// A socket's read half that learns whether asking again after a short
/// read pays. A device with one record in flight sends nothing until it
/// is answered, so the broker's second `recv` after each request finds
/// nothing, and the device's after each answer likewise:
/// once such reads keep coming back empty, a short read is taken to mean
/// the socket is drained, and the next read waits for the reactor to
/// report it readable (one `recv` per request instead of two). A
/// pipelining client's next frame is often there already, and waiting
/// for the reactor would cost it a round; every [`PROBE_EVERY`]th short
/// read still asks again, so a connection that starts pipelining is
/// noticed.
pub struct SocketReads<T> {
    io: Arc<smol::Async<T>>,
    /// The last read came back short: the next one is a retry.
    short: bool,
    /// Retries after a short read come back empty: wait for readiness.
    skip_retries: bool,
    /// Short reads since the last retry, while retries are skipped.
    skipped: u8,
    /// Waiting for readiness before the next read.
    drained: bool,
}

/// While retries after short reads are skipped, one in this many is made
/// anyway, to learn whether they would find data now.
const PROBE_EVERY: u8 = 16;

impl<T> SocketReads<T> {
    pub fn new(io: Arc<smol::Async<T>>) -> Self {
        SocketReads {
            io,
            short: false,
            skip_retries: false,
            skipped: 0,
            drained: false,
        }
    }
}

impl<T> AsyncRead for SocketReads<T>
where
    for<'a> &'a T: std::io::Read,
{
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Read;
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.drained {
                futures_lite::ready!(this.io.poll_readable(cx))?;
                this.drained = false;
                // What follows a readiness report is not a retry.
                this.short = false;
            }
            match (&mut this.io.get_ref()).read(buf) {
                Ok(n) => {
                    if this.short {
                        // A retry found data: the peer pipelines.
                        this.skip_retries = false;
                    }
                    this.short = n < buf.len();
                    // Decided once per read: wait for readiness next, or
                    // (every PROBE_EVERY-th time) retry to learn anew.
                    if this.short && this.skip_retries {
                        this.skipped += 1;
                        if this.skipped < PROBE_EVERY {
                            this.drained = true;
                        } else {
                            this.skipped = 0;
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if this.short {
                        this.skip_retries = true;
                        this.short = false;
                    }
                    this.drained = true;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects made while the listener's accept queue is full wait for
    /// room instead of coming back unconnected.
    #[test]
    fn unix_connects_wait_for_room_in_a_full_accept_queue() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // A queue of one: the second connect finds it full.
        // SAFETY: listen reads the descriptor, which `listener` keeps open.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        const CLIENTS: usize = 8;
        let accepter = std::thread::spawn(move || {
            // Nobody accepts until every client has tried at least once.
            std::thread::sleep(Duration::from_millis(200));
            let mut got = Vec::new();
            for _ in 0..CLIENTS {
                let (mut s, _) = listener.accept().expect("accept");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).expect("read");
                got.push(b[0]);
            }
            got.sort_unstable();
            got
        });
        let sent = smol::block_on(async {
            let connects = (0..CLIENTS as u8).map(|i| {
                let path = path.clone();
                smol::spawn(async move {
                    let mut s = connect_unix(&path).await?;
                    // Usable: a stream async-io handed back unconnected
                    // fails here with ENOTCONN.
                    futures_lite::io::AsyncWriteExt::write_all(&mut s, &[i]).await?;
                    std::io::Result::Ok(())
                })
            });
            let tasks: Vec<_> = connects.collect();
            let mut errors = Vec::new();
            for t in tasks {
                if let Err(e) = t.await {
                    errors.push(e.to_string());
                }
            }
            errors
        });
        assert!(sent.is_empty(), "connects failed: {sent:?}");
        let got = accepter.join().expect("accepter");
        assert_eq!(got, (0..CLIENTS as u8).collect::<Vec<_>>());
    }

    /// A device's connection (one request, then nothing until answered)
    /// stops retrying after short reads; a pipelining one is noticed by a
    /// probe and retried again; no byte is lost or late either way.
    #[test]
    fn socket_reads_skip_retries_that_find_nothing_and_notice_pipelining() {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        use std::time::Duration;
        smol::block_on(async {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let mut peer = smol::Async::new(a).expect("async");
            let mut r = SocketReads::new(Arc::new(smol::Async::new(b).expect("async")));
            let mut buf = [0u8; 64];
            // Nothing comes within a while: the read stays pending.
            async fn nothing_within(r: &mut SocketReads<std::os::unix::net::UnixStream>) {
                let mut buf = [0u8; 64];
                let got = futures_lite::future::or(async { Some(r.read(&mut buf).await) }, async {
                    smol::Timer::after(Duration::from_millis(20)).await;
                    None
                })
                .await;
                assert!(got.is_none(), "{got:?}");
            }
            for i in 0..3u8 {
                peer.write_all(&[i; 10]).await.expect("write");
                assert_eq!(r.read(&mut buf).await.expect("read"), 10);
                assert_eq!(buf[..10], [i; 10]);
                nothing_within(&mut r).await;
            }
            assert!(r.skip_retries, "retries that found nothing are skipped");
            // Now the next request is always there before the retry: within
            // one probe period a retry finds it, and retries resume.
            peer.write_all(&[7; 10]).await.expect("write");
            for _ in 0..=PROBE_EVERY {
                assert_eq!(r.read(&mut buf).await.expect("read"), 10);
                assert_eq!(buf[..10], [7; 10]);
                peer.write_all(&[7; 10]).await.expect("write");
                // The peer's write is in the socket before the next read.
                smol::Timer::after(Duration::from_millis(1)).await;
            }
            assert!(!r.skip_retries, "a retry that found data resumes retries");
            assert_eq!(r.read(&mut buf).await.expect("read"), 10);
            // End of stream still reads as 0.
            drop(peer);
            assert_eq!(r.read(&mut buf).await.expect("eof"), 0);
        });
    }
}
