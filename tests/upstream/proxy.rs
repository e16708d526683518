//! A TCP proxy between a client and the upstream broker that can cut,
//! stall and delay the link, and optionally terminate TLS.
//!
//! Tansu loses its data when it restarts, so a dead link is simulated
//! here: Tansu listens on one port and advertises the proxy's, and every
//! client connection (bootstrap and per-broker) goes through the proxy.
//!
//! It runs on smol, on a thread of its own, and stops when dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_listener::Event;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::net::{Shutdown, TcpListener, TcpStream};

#[derive(Default)]
struct State {
    /// Bumped by every cut: connections older than it end.
    generation: AtomicU64,
    /// Bytes are held, in both directions, until resumed.
    stalled: AtomicBool,
    /// Added before forwarding each chunk.
    delay_ms: AtomicU64,
    /// New connections are accepted and closed at once (link down).
    refusing: AtomicBool,
    /// The next chunk towards the broker is forwarded, then every
    /// connection is cut: the request arrives, its answer never does.
    cut_after_next_request: AtomicBool,
    /// Chunks forwarded towards the broker, for tests that wait for one.
    requests: AtomicU64,
    stopping: AtomicBool,
    /// Notified on every change above.
    changed: Event,
}

impl State {
    fn notify(&self) {
        self.changed.notify(usize::MAX);
    }
}

/// The proxy; `port` is where clients connect.
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` to `upstream` (`host:port`); port 0 takes
    /// a free one, which no other test can take before the proxy has it (a
    /// port picked, released and bound later can be).
    pub fn start(port: u16, upstream: &str) -> Self {
        Self::start_inner(port, upstream, None)
    }

    /// Like [`Proxy::start`], but clients speak TLS to the proxy, which
    /// forwards plaintext.
    pub fn start_tls(port: u16, upstream: &str, tls: Arc<rustls::ServerConfig>) -> Self {
        Self::start_inner(port, upstream, Some(futures_rustls::TlsAcceptor::from(tls)))
    }

    fn start_inner(port: u16, upstream: &str, tls: Option<futures_rustls::TlsAcceptor>) -> Self {
        let state = Arc::new(State::default());
        let listener =
            smol::block_on(TcpListener::bind(("127.0.0.1", port))).expect("binding the proxy port");
        let port = listener.local_addr().expect("the proxy's address").port();
        let upstream = upstream.to_owned();
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            smol::block_on(accept_loop(listener, upstream, tls, thread_state));
        });
        Self {
            port,
            state,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every open connection now.
    pub fn cut(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.notify();
    }

    /// Forwards the next request chunk to the broker, then cuts: a request
    /// that takes effect and whose answer is lost.
    pub fn cut_after_next_request(&self) {
        self.state
            .cut_after_next_request
            .store(true, Ordering::SeqCst);
    }

    /// Holds all bytes (both ways) until [`Proxy::resume`]; connections
    /// stay open.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
        self.state.notify();
    }

    pub fn resume(&self) {
        self.state.stalled.store(false, Ordering::SeqCst);
        self.state.notify();
    }

    /// Adds `delay` before each forwarded chunk.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Link down: cut what is open and close new connections at once.
    pub fn down(&self) {
        self.state.refusing.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Link up again.
    pub fn up(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }

    /// Chunks forwarded towards the broker so far.
    pub fn requests_forwarded(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so it sees `stopping`.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: String,
    tls: Option<futures_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    let executor = smol::Executor::new();
    executor
        .run(async {
            loop {
                let accepted = listener.accept().await;
                if state.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok((client, _)) = accepted else {
                    // Out of descriptors, say: spinning would starve the
                    // rest, and Drop's wake-up could never be accepted.
                    smol::Timer::after(Duration::from_millis(10)).await;
                    continue;
                };
                if state.refusing.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let generation = state.generation.load(Ordering::SeqCst);
                executor
                    .spawn(connection(
                        client,
                        upstream.clone(),
                        tls.clone(),
                        state.clone(),
                        generation,
                    ))
                    .detach();
            }
        })
        .await;
}

async fn connection(
    client: TcpStream,
    upstream: String,
    tls: Option<futures_rustls::TlsAcceptor>,
    state: Arc<State>,
    generation: u64,
) {
    let Ok(server) = TcpStream::connect(upstream.as_str()).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let raw_client = client.clone();
    let (client_read, client_write): (
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    ) = match tls {
        None => (Box::new(client.clone()), Box::new(client)),
        Some(acceptor) => match acceptor.accept(client).await {
            Ok(stream) => {
                let (r, w) = futures_lite::io::split(stream);
                (Box::new(r), Box::new(w))
            }
            Err(_) => return,
        },
    };
    let up = pump(
        client_read,
        Box::new(server.clone()),
        state.clone(),
        generation,
        true,
    );
    let down = pump(
        Box::new(server.clone()),
        client_write,
        state.clone(),
        generation,
        false,
    );
    futures_lite::future::zip(up, down).await;
    let _ = raw_client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Copies one direction until EOF, an error or a cut. Any end closes the
/// whole connection (the caller shuts both sockets).
async fn pump(
    mut from: Box<dyn AsyncRead + Unpin + Send>,
    mut to: Box<dyn AsyncWrite + Unpin + Send>,
    state: Arc<State>,
    generation: u64,
    towards_broker: bool,
) {
    let cut = || state.generation.load(Ordering::SeqCst) > generation;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = futures_lite::future::or(
            async { Some(from.read(&mut buf).await) },
            wait_until(&state, cut),
        )
        .await;
        let n = match read {
            Some(Ok(n)) if n > 0 => n,
            _ => break,
        };
        if state.stalled.load(Ordering::SeqCst) {
            wait_until::<()>(&state, || cut() || !state.stalled.load(Ordering::SeqCst)).await;
        }
        if cut() {
            break;
        }
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            smol::Timer::after(Duration::from_millis(delay)).await;
        }
        let cut_after =
            towards_broker && state.cut_after_next_request.swap(false, Ordering::SeqCst);
        if cut_after {
            // Hold the answer back from the start: it must never arrive.
            state.stalled.store(true, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
        if towards_broker {
            state.requests.fetch_add(1, Ordering::SeqCst);
        }
        if cut_after {
            // Let the broker act on the request before the link goes.
            smol::Timer::after(Duration::from_millis(300)).await;
            state.generation.fetch_add(1, Ordering::SeqCst);
            state.stalled.store(false, Ordering::SeqCst);
            state.notify();
            break;
        }
    }
    // The other direction sees EOF (or the caller's shutdown) and ends.
    let _ = to.close().await;
}

/// Resolves once `cond` holds (checked on every change); `None` for
/// `futures_lite::future::or` with a read.
async fn wait_until<T>(state: &State, cond: impl Fn() -> bool) -> Option<T> {
    loop {
        if cond() {
            return None;
        }
        let listener = state.changed.listen();
        if cond() {
            return None;
        }
        listener.await;
    }
}
