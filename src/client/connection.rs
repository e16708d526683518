//! One connection to a server: hello, then pipelined requests.
//!
//! A writer task drains a bounded queue of encoded frames and writes them,
//! coalescing whatever is queued into one write. A reader task reads frames
//! and hands each response to the request waiting for its correlation id.
//! When either side fails, every waiting request gets the error and the
//! connection is dead for good; [`super::Client`] opens a new one.

use std::collections::HashMap;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use smol::net::unix::UnixStream;
use smol::net::TcpStream;
use smol::{Task, Timer};

use super::error::{is_tls_refusal, ClientError};
use super::tls::{TlsClient, TlsConfigError};
use crate::bufpool::BatchPool;
use crate::protocol::{
    body_len, decode_response, decode_response_shared, encode_request, encode_request_body,
    frame_len, FrameError, HelloRequest, Request, RequestBody, ResponseBody, FRAME_HEADER_BYTES,
    HELLO_FRAME_BYTES_MAX, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use crate::sockets::SocketReads;

/// Frames waiting for the writer. Bounds the memory a burst of requests can
/// hold before the socket takes them; callers wait when it is full.
const OUTBOX_FRAMES_MAX: usize = 256;
/// Written frames kept for reuse: the requests one connection has in
/// flight at once, about.
const FRAMES_KEPT: usize = 4;
/// The writer stops coalescing queued frames past this size, so one write
/// does not grow without bound.
const WRITE_COALESCE_BYTES_MAX: usize = 1024 * 1024;
/// The reader's buffer: one syscall reads many small responses.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Room for a request's frame header, correlation id and CBOR framing
/// around its parts (an estimate: the frame still grows if it is short).
const FRAME_OVERHEAD_BYTES: usize = 64;
const FRAME_OVERHEAD_PER_PARTITION_BYTES: usize = 32;

/// What the server said in its hello answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: u16,
    pub server_version: String,
    pub max_frame_bytes: u32,
    pub max_batch_bytes: u32,
}

/// Where to connect: an address is a Unix socket path when it contains a
/// `/` or ends in `.sock`, else `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Address {
    pub fn parse(addr: &str) -> Result<Self, ClientError> {
        if addr.contains('/') || addr.ends_with(".sock") {
            return Ok(Self::Unix(addr.into()));
        }
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(addr.to_string()))
            }
            _ => Err(ClientError::InvalidAddress(addr.to_string())),
        }
    }
}

/// A TLS stream shared by the reader and writer tasks: each poll takes
/// the lock for as long as the poll, never across an await.
#[derive(Clone)]
struct SharedTls {
    io: Arc<Mutex<futures_rustls::client::TlsStream<TcpStream>>>,
    /// The socket underneath, to shut down without the lock.
    tcp: TcpStream,
}

#[derive(Clone)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(SharedTls),
}

impl Stream {
    async fn connect(addr: &Address, tls: Option<&TlsClient>) -> Result<Self, ClientError> {
        Ok(match (addr, tls) {
            (Address::Tcp(a), tls) => {
                let s = crate::sockets::connect_tcp(a).await?;
                // Requests are small and latency matters; the writer task
                // already coalesces frames, so Nagle only adds delay.
                s.set_nodelay(true)?;
                match tls {
                    None => Self::Tcp(s),
                    Some(tls) => {
                        let name = tls.server_name_for(a).map_err(ClientError::tls_config)?;
                        let connector = futures_rustls::TlsConnector::from(tls.config.clone());
                        let io = connector.connect(name, s.clone()).await?;
                        Self::Tls(SharedTls {
                            io: Arc::new(Mutex::new(io)),
                            tcp: s,
                        })
                    }
                }
            }
            (Address::Unix(p), None) => Self::Unix(crate::sockets::connect_unix(p.as_ref()).await?),
            (Address::Unix(_), Some(_)) => {
                return Err(ClientError::tls_config(TlsConfigError::NotTcp))
            }
        })
    }

    /// The reader task's side. A plain socket is read through
    /// [`SocketReads`]: a producer with one record in flight gets its
    /// answers one at a time, and asking the socket again after each found
    /// nothing (a `recv` per record, in vain).
    fn read_side(&self) -> futures_lite::io::BoxedReader {
        match self {
            Self::Tcp(s) => Box::pin(SocketReads::new(s.clone().into())),
            Self::Unix(s) => Box::pin(SocketReads::new(s.clone().into())),
            Self::Tls(_) => Box::pin(self.clone()),
        }
    }

    fn shutdown(&self) {
        // Errors mean the socket is already gone, which is the goal.
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tls(s) => s.tcp.shutdown(Shutdown::Both),
        };
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut *locked(&s.io)).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut *locked(&s.io)).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut *locked(&s.io)).poll_flush(cx),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_close(cx),
            Self::Unix(s) => Pin::new(s).poll_close(cx),
            Self::Tls(s) => Pin::new(&mut *locked(&s.io)).poll_close(cx),
        }
    }
}

type Waiter = oneshot::Sender<Result<ResponseBody, ClientError>>;

/// The answer to a queued request (see [`Connection::queue_frame`]).
pub(crate) struct Answer {
    rx: oneshot::Receiver<Result<ResponseBody, ClientError>>,
    correlation_id: u32,
    shared: Arc<Shared>,
}

impl Answer {
    /// Waits for the answer; the watchdog answers a request past its
    /// deadline with a timeout. An error answer becomes
    /// [`ClientError::Server`].
    pub(crate) async fn wait(self) -> Result<ResponseBody, ClientError> {
        let Answer {
            rx,
            correlation_id,
            shared,
        } = self;
        // A dropped sender means the connection went away without a word.
        let answer = rx.await.unwrap_or(Err(ClientError::Disconnected));
        if answer.is_err() {
            // A late answer then matches nothing and is dropped.
            shared.take_waiter(correlation_id);
        }
        match answer? {
            ResponseBody::Error(e) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }),
            body => Ok(body),
        }
    }

    /// Stops waiting: a late answer then matches nothing and is dropped.
    fn forget(self) {
        self.shared.take_waiter(self.correlation_id);
    }
}

/// Requests sent and not yet answered, by correlation id, each with the
/// time it gives up. One watchdog task per connection times them out, so
/// a request costs no timer of its own: a timer's insertion wakes the
/// reactor (a system call), and with one request in flight per device
/// that was a wake-up per record.
#[derive(Default)]
struct Waiting {
    /// `None`: never (a timeout past what `Instant` can hold).
    by_id: HashMap<u32, (Waiter, Option<Instant>)>,
    /// When the watchdog wakes next (`None`: it waits to be told). A
    /// request due sooner tells it.
    watchdog_at: Option<Instant>,
}

impl Waiting {
    /// Takes out the requests due by `now`, and returns them with the
    /// earliest deadline left.
    fn take_due(&mut self, now: Instant) -> (Vec<Waiter>, Option<Instant>) {
        let mut due = Vec::new();
        let mut earliest: Option<Instant> = None;
        for (id, (_, deadline)) in &self.by_id {
            match *deadline {
                Some(d) if d <= now => due.push(*id),
                Some(d) => earliest = Some(earliest.map_or(d, |e| e.min(d))),
                None => {}
            }
        }
        let due = due
            .into_iter()
            .filter_map(|id| self.by_id.remove(&id).map(|(w, _)| w))
            .collect();
        (due, earliest)
    }
}

/// What the request side and the three tasks share.
struct Shared {
    /// `Err` once the connection failed: the error every later request
    /// gets.
    pending: Mutex<Result<Waiting, ClientError>>,
    /// Tells the watchdog a request is due before it would wake.
    watchdog: event_listener::Event,
    stream: Stream,
    /// Frames the writer has written, for the next requests to be encoded
    /// into: a produce frame is a batch's size, where the allocator gives
    /// memory back to the kernel and faults it in again (glibc's heap trim;
    /// see crate::bufpool).
    frames: BatchPool,
}

impl Shared {
    /// Marks the connection dead and fails every waiting request. The first
    /// error wins; later ones are consequences.
    fn fail(&self, error: ClientError) {
        let waiters = {
            let mut pending = self.pending.lock().expect("pending lock");
            match std::mem::replace(&mut *pending, Err(error.clone())) {
                Ok(w) => w.by_id,
                Err(first) => {
                    *pending = Err(first);
                    HashMap::new()
                }
            }
        };
        for (_, (w, _)) in waiters {
            let _ = w.send(Err(error.clone()));
        }
        self.stream.shutdown();
        self.watchdog.notify(usize::MAX);
    }

    fn take_waiter(&self, id: u32) -> Option<Waiter> {
        match &mut *self.pending.lock().expect("pending lock") {
            Ok(w) => w.by_id.remove(&id).map(|(w, _)| w),
            Err(_) => None,
        }
    }
}

/// Times out the requests left unanswered past their deadline. It sleeps
/// until the earliest deadline it knows of; answered requests are not
/// taken off its clock, so a busy connection wakes it about once per
/// request timeout rather than once per request.
async fn watchdog(shared: Arc<Shared>) {
    loop {
        let listener = shared.watchdog.listen();
        let (due, next) = {
            let mut pending = shared.pending.lock().expect("pending lock");
            let Ok(waiting) = &mut *pending else { return };
            let (due, next) = waiting.take_due(Instant::now());
            waiting.watchdog_at = next;
            (due, next)
        };
        for w in due {
            let _ = w.send(Err(ClientError::Timeout));
        }
        match next {
            Some(at) => {
                futures_lite::future::or(
                    async {
                        Timer::at(at).await;
                    },
                    listener,
                )
                .await
            }
            None => listener.await,
        }
    }
}

/// A live connection. Dropping it cancels its tasks and closes the socket.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    outbox: async_channel::Sender<Vec<u8>>,
    next_id: AtomicU32,
    pub(crate) info: ServerInfo,
    _reader: Task<()>,
    _writer: Task<()>,
    _watchdog: Task<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.stream.shutdown();
    }
}

impl Connection {
    /// Connects and says hello. The whole exchange is bounded by `timeout`.
    pub(crate) async fn open(
        addr: &Address,
        tls: Option<&TlsClient>,
        client_name: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let handshake = async {
            let mut stream = Stream::connect(addr, tls).await?;
            let info = hello_or_refusal(&mut stream, client_name).await?;
            Ok::<_, ClientError>((stream, info))
        };
        let (stream, info) = with_timeout(timeout, handshake).await?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Ok(Waiting::default())),
            frames: BatchPool::new(
                FRAMES_KEPT,
                info.max_frame_bytes as usize + FRAME_OVERHEAD_BYTES,
            ),
            watchdog: event_listener::Event::new(),
            stream: stream.clone(),
        });
        let (outbox, inbox) = async_channel::bounded(OUTBOX_FRAMES_MAX);
        let reader = smol::spawn(read_loop(shared.clone(), info.max_frame_bytes));
        let writer = smol::spawn(write_loop(shared.clone(), inbox));
        let watchdog = smol::spawn(watchdog(shared.clone()));
        Ok(Self {
            shared,
            outbox,
            next_id: AtomicU32::new(1),
            info,
            _reader: reader,
            _writer: writer,
            _watchdog: watchdog,
        })
    }

    /// Whether the connection has failed; a dead connection stays dead.
    pub(crate) fn is_dead(&self) -> bool {
        self.shared.pending.lock().expect("pending lock").is_err()
    }

    fn next_correlation_id(&self) -> u32 {
        loop {
            // 0 is what the server uses when it cannot read an id: never
            // hand it out, so such an answer matches no request.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// Sends one request and waits for its answer, at most `timeout`. An
    /// error answer becomes [`ClientError::Server`].
    pub(crate) async fn call(
        &self,
        body: &RequestBody<'_>,
        timeout: Duration,
    ) -> Result<ResponseBody, ClientError> {
        let (correlation_id, frame) = self.encode(body)?;
        self.send_frame(correlation_id, frame, timeout).await
    }

    /// As [`call`](Self::call) for a request the caller encoded.
    pub(crate) async fn send_frame(
        &self,
        correlation_id: u32,
        frame: Vec<u8>,
        timeout: Duration,
    ) -> Result<ResponseBody, ClientError> {
        self.queue_frame(correlation_id, frame, timeout)
            .await?
            .wait()
            .await
    }

    /// Queues a request's frame for the writer and returns its answer to
    /// wait for apart: frames go on the wire in the order they were
    /// queued, so a caller that must keep its requests in order (the
    /// producer's sequences) queues them one after another and waits for
    /// the answers elsewhere.
    pub(crate) async fn queue_frame(
        &self,
        correlation_id: u32,
        frame: Vec<u8>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let body_len = frame.len() - FRAME_HEADER_BYTES;
        if body_len > self.info.max_frame_bytes as usize {
            return Err(ClientError::RequestTooLarge {
                len: body_len,
                max: self.info.max_frame_bytes,
            });
        }
        let (tx, rx) = oneshot::channel();
        let deadline = Instant::now().checked_add(timeout);
        match &mut *self.shared.pending.lock().expect("pending lock") {
            Ok(waiting) => {
                waiting.by_id.insert(correlation_id, (tx, deadline));
                if let Some(d) = deadline {
                    if waiting.watchdog_at.is_none_or(|at| d < at) {
                        waiting.watchdog_at = Some(d);
                        self.shared.watchdog.notify(1);
                    }
                }
            }
            Err(e) => return Err(e.clone()),
        }
        // The outbox has room nearly always; when it has not, waiting for
        // room counts against the timeout too.
        let queued = match self.outbox.try_send(frame) {
            Ok(()) => Ok(()),
            Err(async_channel::TrySendError::Closed(_)) => Err(ClientError::Disconnected),
            Err(async_channel::TrySendError::Full(frame)) => {
                with_timeout(timeout, async {
                    self.outbox
                        .send(frame)
                        .await
                        .map_err(|_| ClientError::Disconnected)
                })
                .await
            }
        };
        let answer = Answer {
            rx,
            correlation_id,
            shared: self.shared.clone(),
        };
        match queued {
            Ok(()) => Ok(answer),
            Err(e) => {
                answer.forget();
                Err(e)
            }
        }
    }

    /// Encodes a request with a fresh correlation id, for callers that want
    /// to keep ownership of the body (the producer keeps its batches for a
    /// retry).
    pub(crate) fn encode(&self, body: &RequestBody<'_>) -> Result<(u32, Vec<u8>), ClientError> {
        let correlation_id = self.next_correlation_id();
        // Sized up front: a produce frame is mostly its batches, and growing
        // it by doubling copied them twice more.
        let hint = match body {
            RequestBody::Produce(p) => p
                .partitions
                .iter()
                .map(|x| x.batch.len() + x.topic.len() + FRAME_OVERHEAD_PER_PARTITION_BYTES)
                .sum::<usize>(),
            _ => 0,
        };
        let mut frame = self.shared.frames.take(FRAME_OVERHEAD_BYTES + hint);
        encode_request_body(correlation_id, body, &mut frame)?;
        Ok((correlation_id, frame))
    }
}

async fn with_timeout<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    futures_lite::future::or(f, async {
        Timer::after(timeout).await;
        Err(ClientError::Timeout)
    })
    .await
}

/// [`hello`], or the TLS refusal that the connection's failure hides. A
/// TLS 1.3 client has finished its handshake before the server has
/// checked its certificate, and sends its hello at once; a server that
/// refuses the certificate sends its alert and closes, and its close
/// resets the connection when the hello (or the rest of the handshake) is
/// still unread there. If the reset comes in before the hello is written,
/// the write fails with it, and the alert stays unread in the socket:
/// `produce` took the reset for a broker that went away and retried once.
/// A socket that was reset or reached its end reads at once (what is
/// left in it, then the end), so reading it here costs no wait.
async fn hello_or_refusal(
    stream: &mut Stream,
    client_name: Option<String>,
) -> Result<ServerInfo, ClientError> {
    let e = match hello(stream, client_name).await {
        Err(e @ (ClientError::Io(_) | ClientError::Disconnected))
            if matches!(stream, Stream::Tls(_)) =>
        {
            e
        }
        other => return other,
    };
    let mut rest = [0u8; 256];
    // Only what is there now: a connection that is not at its end has
    // nothing waiting to explain it.
    match futures_lite::future::poll_once(stream.read(&mut rest)).await {
        Some(Err(refusal)) if is_tls_refusal(&refusal) => Err(refusal.into()),
        _ => Err(e),
    }
}

async fn hello(
    stream: &mut Stream,
    client_name: Option<String>,
) -> Result<ServerInfo, ClientError> {
    let mut frame = Vec::new();
    encode_request(
        &Request {
            correlation_id: 1,
            body: RequestBody::Hello(HelloRequest {
                version_min: PROTOCOL_VERSION_MIN,
                version_max: PROTOCOL_VERSION_MAX,
                client_name,
            }),
        },
        &mut frame,
    )?;
    stream.write_all(&frame).await?;
    stream.flush().await?;
    let mut body = Vec::new();
    match read_frame(stream, HELLO_FRAME_BYTES_MAX, &mut body, |b, n| {
        b.resize(n, 0)
    })
    .await
    {
        // A TLS record (an alert, 0x15, or a handshake, 0x16, of version
        // 3.x) read as a frame length: a plaintext client on a TLS port.
        Err(ClientError::Protocol(FrameError::TooLarge { len, .. }))
            if matches!(len >> 24, 0x15 | 0x16) && (len >> 16) & 0xff == 0x03 =>
        {
            return Err(ClientError::ServerSpeaksTls)
        }
        other => other?,
    }
    let response = decode_response(&body)?;
    match response.body {
        ResponseBody::Hello(h) => Ok(ServerInfo {
            version: h.version,
            server_version: h.server_version,
            max_frame_bytes: h.max_frame_bytes,
            max_batch_bytes: h.max_batch_bytes,
        }),
        ResponseBody::Error(e) => Err(ClientError::Server {
            code: e.code,
            message: e.message,
        }),
        other => Err(ClientError::UnexpectedResponse {
            expected: "hello",
            got: other.name(),
        }),
    }
}

/// Reads one frame body into `body` (reused: it is zeroed only where it
/// grows). The length is checked before the body is allocated. A clean end
/// of stream before a frame starts is [`ClientError::Disconnected`].
async fn read_frame<B: std::ops::DerefMut<Target = [u8]>>(
    r: &mut (impl AsyncRead + Unpin),
    max_frame_bytes: u32,
    body: &mut B,
    resize: impl FnOnce(&mut B, usize),
) -> Result<(), ClientError> {
    let mut prefix = [0u8; FRAME_HEADER_BYTES];
    match r.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ClientError::Disconnected)
        }
        Err(e) => return Err(e.into()),
    }
    // Checks the length against the limit; the body is not buffered yet.
    frame_len(&prefix, max_frame_bytes)?;
    resize(body, body_len(prefix) as usize);
    r.read_exact(body).await?;
    Ok(())
}

/// Frame buffers for the reader. A response's fetched records stay in
/// the frame they came in (views, not copies), so a frame lives as long
/// as the records the caller holds; a buffer is reused once nothing points
/// into it any more, and the few recent frames are kept to find one.
#[derive(Default)]
struct FrameBufs {
    recent: std::collections::VecDeque<bytes::Bytes>,
}

/// How many frames the reader keeps to reuse: a consumer holds one poll's
/// records while the next (prefetched) answer comes in.
const FRAME_BUFS_KEPT: usize = 3;

impl FrameBufs {
    /// A buffer for the next frame: a recent one nothing points into, or a
    /// new one.
    fn take(&mut self) -> bytes::BytesMut {
        for _ in 0..self.recent.len() {
            let frame = self.recent.pop_front().expect("counted");
            match frame.try_into_mut() {
                // Its old length stays: resizing to the next frame zeroes
                // only what it grows by.
                Ok(buf) => return buf,
                Err(held) => self.recent.push_back(held),
            }
        }
        if self.recent.len() >= FRAME_BUFS_KEPT {
            // Let the caller's records keep it; it is freed with them.
            self.recent.pop_front();
        }
        bytes::BytesMut::new()
    }

    /// The frame just decoded, to reuse once its records are dropped.
    fn keep(&mut self, frame: bytes::Bytes) {
        self.recent.push_back(frame);
    }
}

async fn read_loop(shared: Arc<Shared>, max_frame_bytes: u32) {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, shared.stream.read_side());
    let mut bufs = FrameBufs::default();
    let error = loop {
        let mut body = bufs.take();
        let read = read_frame(&mut reader, max_frame_bytes, &mut body, |b, n| {
            b.resize(n, 0)
        });
        if let Err(e) = read.await {
            break e;
        }
        let frame = body.freeze();
        let response = decode_response_shared(&frame);
        bufs.keep(frame);
        let response = match response {
            Ok(r) => r,
            Err(e) => break e.into(),
        };
        match (shared.take_waiter(response.correlation_id), response.body) {
            (Some(w), body) => {
                let _ = w.send(Ok(body));
            }
            // Correlation id 0 answers a frame the server could not read;
            // it closes the connection next, and this says why.
            (None, ResponseBody::Error(e)) if response.correlation_id == 0 => {
                break ClientError::Server {
                    code: e.code,
                    message: e.message,
                }
            }
            // The request timed out and gave up: drop the late answer.
            (None, _) => {}
        }
    };
    shared.fail(error);
}

async fn write_loop(shared: Arc<Shared>, inbox: async_channel::Receiver<Vec<u8>>) {
    let mut stream = shared.stream.clone();
    let mut buf = Vec::new();
    while let Ok(frame) = inbox.recv().await {
        // A lone frame goes out as it is; queued ones are copied together
        // so many small requests cost one syscall.
        let bytes = if inbox.is_empty() {
            &frame
        } else {
            buf.clear();
            buf.extend_from_slice(&frame);
            while buf.len() < WRITE_COALESCE_BYTES_MAX {
                match inbox.try_recv() {
                    Ok(f) => {
                        buf.extend_from_slice(&f);
                        shared.frames.give(f);
                    }
                    Err(_) => break,
                }
            }
            &buf
        };
        // Flushed: over TLS, what the socket did not take yet waits in
        // rustls's buffer for the next write, and the next frame may only
        // come once this one is answered. (For TCP a flush is a no-op.)
        if let Err(e) = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        }
        .await
        {
            shared.fail(e.into());
            return;
        }
        shared.frames.give(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame whose records are still held is never written over; once
    /// they are dropped its buffer serves the next frame, and the reader
    /// keeps at most a few frames to find one.
    #[test]
    fn frame_buffers_are_reused_only_once_nothing_points_into_them() {
        let mut bufs = FrameBufs::default();
        let mut b = bufs.take();
        b.resize(1000, 7);
        let first = b.freeze();
        let first_at = first.as_ptr();
        let view = first.slice(10..20);
        bufs.keep(first);
        // Held by `view`: the next frame gets a buffer of its own.
        let mut b = bufs.take();
        assert_ne!(b.as_ptr(), first_at);
        b.resize(500, 1);
        bufs.keep(b.freeze());
        assert_eq!(&view[..], &[7; 10]);
        drop(view);
        // Nothing points into either now: the first kept is reused, with
        // its bytes (resizing zeroes only growth).
        let b = bufs.take();
        assert_eq!(b.as_ptr(), first_at);
        assert_eq!(b.len(), 1000);
        // Frames whose records are all held are let go after a few.
        let mut views = Vec::new();
        for _ in 0..FRAME_BUFS_KEPT + 3 {
            let mut b = bufs.take();
            b.resize(100, 0);
            b.fill(3);
            let f = b.freeze();
            views.push(f.slice(..1));
            bufs.keep(f);
        }
        assert!(bufs.recent.len() <= FRAME_BUFS_KEPT + 1);
        assert!(views.iter().all(|v| v[0] == 3));
    }

    #[test]
    fn addresses_pick_tcp_or_unix() {
        assert_eq!(
            Address::parse("127.0.0.1:9471").unwrap(),
            Address::Tcp("127.0.0.1:9471".into())
        );
        assert_eq!(
            Address::parse("[::1]:9471").unwrap(),
            Address::Tcp("[::1]:9471".into())
        );
        assert_eq!(
            Address::parse("./skiff.sock").unwrap(),
            Address::Unix("./skiff.sock".into())
        );
        assert_eq!(
            Address::parse("skiff.sock").unwrap(),
            Address::Unix("skiff.sock".into())
        );
        assert_eq!(
            Address::parse("/run/skiff/socket").unwrap(),
            Address::Unix("/run/skiff/socket".into())
        );
        for bad in ["", "localhost", ":9471", "host:", "host:99999"] {
            assert!(
                matches!(Address::parse(bad), Err(ClientError::InvalidAddress(_))),
                "{bad:?}"
            );
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn nothing_listening_is_an_io_error() {
        // Bind and drop to find a port that nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = Address::parse(&format!("127.0.0.1:{port}")).unwrap();
        let err = smol::block_on(Connection::open(&addr, None, None, SECOND))
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::Io(_)), "{err:?}");
        assert!(err.is_retriable());
    }

    #[test]
    fn a_peer_that_hangs_up_during_hello_is_disconnected() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 4];
            std::io::Read::read_exact(&mut s, &mut hello).unwrap();
        });
        let err = smol::block_on(Connection::open(&addr, None, None, 5 * SECOND))
            .err()
            .unwrap();
        peer.join().unwrap();
        assert!(
            matches!(err, ClientError::Disconnected | ClientError::Io(_)),
            "{err:?}"
        );
    }

    /// A server that refuses the client's certificate after the client
    /// finished its TLS 1.3 handshake, and resets the connection before
    /// the hello is written (the broker's close resets when the hello is
    /// unread there): the hello's write fails with the reset, and the
    /// refusal read after it is the error, not retried.
    #[test]
    fn a_refusal_whose_reset_fails_the_hello_write_is_reported_as_the_refusal() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let self_signed = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            // Names of their own: an issuer's name the server knows would
            // be checked against its key (BadSignature) instead.
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            (params.self_signed(&key).unwrap(), key)
        };
        let (server_cert, server_key) = self_signed("localhost");
        // Not from any CA the server trusts.
        let (client_cert, client_key) = self_signed("stranger");
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            Some(path)
        };
        let tls = TlsClient::new(&super::super::TlsOptions {
            ca_file: file("ca.pem", server_cert.pem()),
            cert_file: file("client.pem", client_cert.pem()),
            key_file: file("client.key", client_key.serialize_pem()),
            server_name: Some("localhost".to_owned()),
        })
        .unwrap();
        let server_der: CertificateDer<'static> = server_cert.der().clone();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_der.clone()).unwrap();
        let provider = super::super::tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_der],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let (go, client_done) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
            // The ClientHello, then the server's flight.
            while !conn.wants_write() {
                conn.read_tls(&mut sock).unwrap();
                conn.process_new_packets().unwrap();
            }
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            // The client's flight, read once the client is done with it.
            client_done.recv().unwrap();
            let refused = loop {
                conn.read_tls(&mut sock).unwrap();
                if let Err(e) = conn.process_new_packets() {
                    break e;
                }
            };
            // The alert, then a reset.
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            rustix::net::sockopt::set_socket_linger(&sock, Some(Duration::ZERO)).unwrap();
            refused
        });
        let err = smol::block_on(async {
            let mut stream = Stream::connect(&addr, Some(&tls)).await.unwrap();
            go.send(()).unwrap();
            let refused = server.join().unwrap();
            assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
            let Stream::Tls(t) = &stream else {
                unreachable!("a TLS stream")
            };
            // The reset is in before the hello is written.
            let mut fds = [rustix::event::PollFd::new(
                &t.tcp,
                rustix::event::PollFlags::empty(),
            )];
            let limit = rustix::event::Timespec {
                tv_sec: 10,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut fds, Some(&limit)).unwrap();
            assert!(
                fds[0].revents().contains(rustix::event::PollFlags::ERR),
                "{:?}",
                fds[0].revents()
            );
            hello_or_refusal(&mut stream, None).await.unwrap_err()
        });
        assert!(
            err.to_string().contains("received fatal alert: UnknownCA"),
            "{err}"
        );
        assert!(!err.is_retriable(), "{err:?}");
    }

    #[test]
    fn an_http_server_is_rejected_by_its_first_bytes() {
        // Pointing the client at an HTTP port: "HTTP" read as a length is
        // 1.2 GB, far above the hello limit, and must fail at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            std::io::Write::write_all(&mut s, b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
            // Hold the socket open: the client must not wait for more.
            std::thread::sleep(Duration::from_millis(500));
        });
        let started = std::time::Instant::now();
        let err = smol::block_on(Connection::open(&addr, None, None, 5 * SECOND))
            .err()
            .unwrap();
        assert!(started.elapsed() < Duration::from_millis(400));
        peer.join().unwrap();
        assert!(
            matches!(
                err,
                ClientError::Protocol(FrameError::TooLarge {
                    len: 0x4854_5450,
                    max: HELLO_FRAME_BYTES_MAX
                })
            ),
            "{err:?}"
        );
    }

    /// Requests time out on the connection's one watchdog: each at its
    /// own deadline, a short one while a long one waits, and none early
    /// because earlier requests were answered.
    #[test]
    fn unanswered_requests_time_out_at_their_own_deadlines() {
        use crate::protocol::{ListTopicsRequest, ListTopicsResponse};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        // Answers hello and every request but the 3rd and 4th after it.
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut seen = 0;
            loop {
                while let Some(r) = super::super::fake_peer::take_request(&mut buf) {
                    let body = if seen == 0 {
                        super::super::fake_peer::hello("fake")
                    } else if seen == 3 || seen == 4 {
                        seen += 1;
                        continue;
                    } else {
                        ResponseBody::ListTopics(ListTopicsResponse {
                            topics: Vec::new(),
                            disk_budget_bytes: None,
                            disk_reserved_bytes: None,
                        })
                    };
                    seen += 1;
                    super::super::fake_peer::answer(&mut s, r.correlation_id, body);
                }
                let mut chunk = [0u8; 4096];
                match std::io::Read::read(&mut s, &mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let list = RequestBody::ListTopics(ListTopicsRequest {});
        smol::block_on(async {
            let c = Connection::open(&addr, None, None, 5 * SECOND)
                .await
                .unwrap();
            // Answered requests leave their deadlines on the watchdog's
            // clock: a later request must not inherit one of them.
            for _ in 0..2 {
                c.call(&list, Duration::from_millis(300)).await.unwrap();
            }
            // Past their deadlines: the watchdog has woken, found nothing
            // due, and waits to be told of the next request.
            smol::Timer::after(Duration::from_millis(500)).await;
            let started = Instant::now();
            // A long request unanswered, then a short one: the short one
            // wakes the watchdog sooner than the long one had it sleep.
            let long = c.call(&list, 10 * SECOND);
            let short = async {
                smol::Timer::after(Duration::from_millis(50)).await;
                let r = c.call(&list, Duration::from_millis(200)).await;
                (r, started.elapsed())
            };
            let (short, long) = futures_lite::future::zip(
                short,
                futures_lite::future::or(async { Some(long.await) }, async {
                    smol::Timer::after(2 * SECOND).await;
                    None
                }),
            )
            .await;
            let (r, at) = short;
            assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
            assert!(at >= Duration::from_millis(250), "{at:?}");
            assert!(at < Duration::from_millis(1500), "{at:?}");
            assert!(long.is_none(), "the long request ended early: {long:?}");
            // Nothing is left waiting on a dead id, and the connection
            // still works, also for a request that never times out.
            c.call(&list, 5 * SECOND).await.unwrap();
            c.call(&list, Duration::MAX).await.unwrap();
            assert!(!c.is_dead());
        });
        drop(peer);
    }

    #[test]
    fn a_silent_peer_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let err = smol::block_on(Connection::open(
            &addr,
            None,
            None,
            Duration::from_millis(200),
        ))
        .err()
        .unwrap();
        drop(listener);
        assert!(matches!(err, ClientError::Timeout), "{err:?}");
    }
}
