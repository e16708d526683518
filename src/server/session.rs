//! One client connection: a reader that frames and dispatches requests in
//! order, handler tasks that may finish out of order, and a writer that
//! sends responses as they complete. The reader and the writer each own a
//! half of the connection ([`Connection::split`]), so any stream serves:
//! TCP and Unix sockets split into two handles of the same socket, and a
//! stream that cannot be shared that way (TLS) into halves over a lock.
//!
//! Memory per connection is bounded: the read buffer never exceeds one
//! frame (`max_frame_bytes`), and requests are not read while the bytes of
//! requests being handled plus the room reserved for their responses
//! exceed `max_inflight_bytes` (a produce may go past it with room from a
//! pool all connections share, [`SharedInFlight`]). A fetch reserves the largest answer it can
//! get before it is read from storage, so a client that never reads its
//! socket holds at most that much: without the reservation, each of its
//! small fetch requests pinned a large answer in memory, without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use crate::protocol::{
    self, decode_request, encode_response, encode_response_spliced, error_response,
    frame_error_response, frame_len, ErrorCode, FrameError, HelloResponse, RequestBody, Response,
    ResponseBody, Splice, FRAME_HEADER_BYTES,
};

use super::groups;
use super::handler::{self, BatchIn};
use super::quota::{Direction, IdentityGuard};
use super::share;
use super::{Admitted, Ctx};

/// A new connection's read buffer: a client's hello fits, and a device's
/// produce of a reading. It grows to the largest frame seen (a frame's
/// header says how much it needs), at most `max_frame_bytes`. Small,
/// because an idle or unauthenticated connection should cost little: a
/// 64 KiB start made 10,000 idle connections cost 57 KiB each, and a
/// start of a whole hello frame's 4 KiB was 44% of a bare connection's
/// 9.3 KB (docs/performance.md, "what a connection costs").
const READ_BUFFER_BYTES_INITIAL: usize = 512;
const _: () = assert!(READ_BUFFER_BYTES_INITIAL > FRAME_HEADER_BYTES);
/// What a grown buffer shrinks back to (see [`ShrinkPolicy`]).
const READ_BUFFER_BYTES_MIN: usize = 64 * 1024;
/// A buffer grown up to this size is kept: a producer sending 100 KiB
/// requests would otherwise have it freed and regrown (and zeroed) for
/// every frame. A larger one is kept while large frames keep coming, and
/// given back after [`SMALL_FRAMES_BEFORE_SHRINK`] frames in a row that
/// fit this size.
const READ_BUFFER_BYTES_KEEP: usize = 256 * 1024 + FRAME_HEADER_BYTES;
/// Regrowing a 1 MiB buffer for every 1 MiB request (zeroed, page by page
/// faulted in) made 1 KiB records 1.6x slower; a connection that sent one
/// large frame still gets its memory back soon. (The memory budget counts
/// a whole frame per connection either way.)
const SMALL_FRAMES_BEFORE_SHRINK: u32 = 8;

/// Decides when a connection gives back a read buffer grown past
/// [`READ_BUFFER_BYTES_KEEP`].
#[derive(Default)]
struct ShrinkPolicy {
    small_in_a_row: u32,
}

impl ShrinkPolicy {
    /// After a frame of `frame_bytes` (prefix included) was taken from a
    /// buffer of `len` bytes that still holds `filled`: whether to give
    /// the buffer back.
    fn after_frame(&mut self, len: usize, frame_bytes: usize, filled: usize) -> bool {
        if frame_bytes > READ_BUFFER_BYTES_KEEP {
            self.small_in_a_row = 0;
            return false;
        }
        self.small_in_a_row = self.small_in_a_row.saturating_add(1);
        len > READ_BUFFER_BYTES_KEEP
            && filled <= READ_BUFFER_BYTES_MIN
            && self.small_in_a_row >= SMALL_FRAMES_BEFORE_SHRINK
    }
}
/// The least a request counts against `max_inflight_bytes`, whatever its
/// size: it bounds how many answers can wait for the writer (the queue
/// itself is unbounded, so an idle connection does not preallocate one).
const REQUEST_RESERVE_BYTES_MIN: usize = 256;
/// ... and each request counts at least this share of `max_inflight_bytes`,
/// so one connection has at most this many requests in the broker at once.
/// A connection that pipelined a thousand tiny produce requests filled the
/// storage thread's queue, and every other producer's request waited behind
/// all of them: a well-behaved producer kept 0.2% of its rate. Clients
/// pipeline 5 (Kafka's and skiff's producers); 16 leaves room.
const REQUESTS_IN_FLIGHT_MAX: usize = 16;
/// Room for a fetch answer's envelope beyond its records.
const FETCH_ENVELOPE_RESERVE_BYTES: usize = 4 * 1024;

/// Bytes a request holds against the connection's in-flight bound from the
/// moment it is read until its answer is written: its frame, and for a
/// fetch the largest answer it may get (whole batches up to its
/// partitions' `max_bytes`, plus one batch that may run over, within one
/// frame).
fn reserve_bytes(frame_bytes: usize, body: &RequestBody<'_>, settings: &super::Settings) -> usize {
    let answer = match body {
        RequestBody::Fetch(f) => f
            .partitions
            .iter()
            .map(|p| p.max_bytes as usize)
            .fold(0usize, usize::saturating_add)
            .saturating_add(settings.max_batch_bytes)
            .saturating_add(FETCH_ENVELOPE_RESERVE_BYTES)
            .min(settings.max_frame_bytes),
        _ => 0,
    };
    if answer > 0 {
        // A fetch's reserve is already a large share: pipelined fetches
        // keep the bound they had.
        return frame_bytes.max(REQUEST_RESERVE_BYTES_MIN) + answer;
    }
    frame_bytes
        .max((settings.max_inflight_bytes / REQUESTS_IN_FLIGHT_MAX).max(REQUEST_RESERVE_BYTES_MIN))
}

/// Bytes that produce requests hold beyond their own connections' share,
/// all connections together (`server.max_inflight_bytes_shared`): a bulk
/// producer's window is then covered by fewer flushes, and the memory
/// budget still holds.
pub(crate) struct SharedInFlight {
    /// The bytes held: the metric's own atomic is the count.
    used: Gauge,
    max: i64,
    admits: Counter,
}

impl SharedInFlight {
    pub(crate) fn new(max: usize, (used, admits): (Gauge, Counter)) -> SharedInFlight {
        SharedInFlight {
            used,
            max: i64::try_from(max).unwrap_or(i64::MAX),
            admits,
        }
    }

    fn try_take(&self, n: usize) -> bool {
        let n = n as i64;
        let taken = self
            .used
            .inner()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.max).then_some(used + n)
            })
            .is_ok();
        if taken {
            self.admits.inc();
        }
        taken
    }

    fn take(&self, n: usize) {
        self.used.inc_by(n as i64);
    }

    fn give(&self, n: usize) {
        self.used.dec_by(n as i64);
    }

    #[cfg(test)]
    fn used(&self) -> i64 {
        self.used.get()
    }
}

/// How far a request may take its connection's in-flight bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// Always admitted: an error answer on the way out.
    None,
    /// The connection's own share.
    Own,
    /// The own share, and past it what the shared pool has room for: a
    /// produce, whose bytes come back once stored and answered.
    OrShared,
}

/// Bytes of requests being handled on one connection. Whatever passes its
/// own share (`max`) is counted in the shared pool too: each change adds
/// or gives back the change in `bytes - max`, so the pool holds the sum
/// of every connection's excess, however adds and releases interleave.
struct InFlight {
    bytes: AtomicUsize,
    changed: Event,
    max: usize,
    shared: Arc<SharedInFlight>,
}

impl InFlight {
    fn new(max: usize, shared: Arc<SharedInFlight>) -> InFlight {
        InFlight {
            bytes: AtomicUsize::new(0),
            changed: Event::new(),
            max,
            shared,
        }
    }

    fn over(&self, bytes: usize) -> usize {
        bytes.saturating_sub(self.max)
    }

    fn release(&self, n: usize) {
        let prev = self.bytes.fetch_sub(n, Ordering::AcqRel);
        let back = self.over(prev) - self.over(prev - n);
        if back > 0 {
            self.shared.give(back);
        }
        self.changed.notify(usize::MAX);
    }

    /// Waits until `n` more bytes fit under `limit`; one request alone is
    /// always admitted, so a frame of any allowed size makes progress.
    async fn acquire(&self, n: usize, limit: Limit) {
        // Most requests fit at once: no listener (an allocation and a
        // locked list insert and removal) for them.
        if self.try_acquire(n, limit) {
            return;
        }
        loop {
            let listener = self.changed.listen();
            if self.try_acquire(n, limit) {
                return;
            }
            // Its own releases wake it: a connection past its share has
            // requests in flight to give back.
            listener.await;
        }
    }

    fn try_acquire(&self, n: usize, limit: Limit) -> bool {
        let cur = self.bytes.load(Ordering::Acquire);
        if cur == 0 || limit == Limit::None || cur + n <= self.max {
            self.add(n, 0);
            return true;
        }
        if limit == Limit::Own {
            return false;
        }
        // Only the reader adds, and releases only shrink `cur`: the excess
        // this adds is at most `need` (the excess grows with the bytes).
        let need = self.over(cur + n) - self.over(cur);
        if !self.shared.try_take(need) {
            return false;
        }
        self.add(n, need);
        true
    }

    /// Adds `n` bytes, of whose excess `taken` is in the pool already.
    fn add(&self, n: usize, taken: usize) {
        let prev = self.bytes.fetch_add(n, Ordering::AcqRel);
        let over = self.over(prev + n) - self.over(prev);
        if over > taken {
            self.shared.take(over - taken);
        } else if taken > over {
            self.shared.give(taken - over);
        }
    }

    async fn drained(&self) {
        loop {
            let listener = self.changed.listen();
            if self.bytes.load(Ordering::Acquire) == 0 {
                return;
            }
            listener.await;
        }
    }
}

enum Next {
    Frame(usize),
    Eof,
    Shutdown,
}

/// A connection a session can serve, split into the halves its reader and
/// writer tasks own.
pub(crate) trait Connection: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn split(self) -> (Self::Read, Self::Write);
}

impl Connection for smol::net::TcpStream {
    type Read = crate::sockets::SocketReads<std::net::TcpStream>;
    type Write = Self;
    /// Two handles of the one socket: no lock between the halves.
    fn split(self) -> (Self::Read, Self) {
        (crate::sockets::SocketReads::new(self.clone().into()), self)
    }
}

impl Connection for smol::net::unix::UnixStream {
    type Read = crate::sockets::SocketReads<std::os::unix::net::UnixStream>;
    type Write = Self;
    fn split(self) -> (Self::Read, Self) {
        (crate::sockets::SocketReads::new(self.clone().into()), self)
    }
}

/// Any other stream (a TLS stream, say): its halves take turns through a
/// lock, held only while a read or a write is polled.
pub(crate) struct Locked<S>(pub S);

impl<S> Connection for Locked<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Read = FillingReads<futures_lite::io::ReadHalf<S>>;
    type Write = futures_lite::io::WriteHalf<S>;
    fn split(self) -> (Self::Read, Self::Write) {
        let (r, w) = futures_lite::io::split(self.0);
        (
            FillingReads {
                inner: r,
                error: None,
            },
            w,
        )
    }
}

/// A read half whose reads take all the stream has at hand, up to the
/// buffer's end. A TLS stream yields one record (at most 16 KiB) per read,
/// so a 1 MiB frame took 64 trips through the read loop (each with its
/// shutdown listener) where a TCP socket takes a few.
pub(crate) struct FillingReads<R> {
    inner: R,
    /// An error met after some bytes were read: returned by the next read.
    error: Option<std::io::Error>,
}

impl<R: AsyncRead + Unpin> AsyncRead for FillingReads<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        let mut n = 0;
        while n < buf.len() {
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut buf[n..]) {
                Poll::Ready(Ok(0)) => break,
                Poll::Ready(Ok(k)) => n += k,
                Poll::Ready(Err(e)) if n > 0 => {
                    this.error = Some(e);
                    break;
                }
                // A pending read after some bytes leaves its waker set;
                // the wake-up it may bring later is harmless.
                Poll::Pending if n > 0 => break,
                other => return other,
            }
        }
        Poll::Ready(Ok(n))
    }
}

pub(crate) async fn run<C: Connection>(conn: C, ctx: Arc<Ctx>, peer: String, admitted: Admitted) {
    let (reader, writer) = conn.split();
    let Admitted {
        _slot: slot,
        _addr: addr,
        identity,
    } = admitted;
    let who = Arc::new(identity);
    let answers = Arc::new(Answers::default());
    // Closed when the reader is done, or if this task is dropped first: the
    // writer then ends once it has written what was sent.
    let closing = ClosesAnswers(answers.clone());
    let inflight = Arc::new(InFlight::new(
        ctx.settings.max_inflight_bytes,
        ctx.inflight_shared.clone(),
    ));
    let writer = ctx.executor.spawn(write_loop(
        writer,
        answers.clone(),
        inflight.clone(),
        ctx.settings.max_frame_bytes,
    ));
    let reason = read_loop(reader, &ctx, &answers, &inflight, &who).await;
    let identity = who.identity();
    match &reason {
        Ok(()) => log::debug!("{peer} ({identity}): connection closed"),
        // A device that leaks sockets may cause many: counted, not logged
        // above debug.
        Err(e @ SessionEnd::TimedOut(_)) => {
            ctx.metrics.connection_timed_out();
            log::debug!("{peer} ({identity}): closing connection: {e}");
        }
        Err(e) => log::info!("{peer} ({identity}): closing connection: {e}"),
    }
    // Finish what was read before closing: every request gets its answer.
    inflight.drained().await;
    drop(closing);
    writer.await;
    // The slots (connection, address, identity) are given back only now,
    // once every answer is written.
    drop(who);
    drop((slot, addr));
}

/// A write coalesces ready answers up to this many bytes (or one frame,
/// if smaller): fewer syscalls for many small answers.
const COALESCE_BYTES_MAX: usize = 256 * 1024;

/// About what an answer takes encoded, from its records (a fetch's are
/// nearly all of it) and a margin for everything else: lets the writer
/// stop coalescing before an answer would take its buffer past a frame.
fn encoded_size_hint(r: &Response) -> usize {
    match &r.body {
        ResponseBody::Fetch(f) => {
            f.partitions
                .iter()
                .map(|p| p.records.len() + p.topic.len() + 64)
                .sum::<usize>()
                + 64
        }
        _ => 4 * 1024,
    }
}

/// What the reader hands the writer for each request: its answer, or a
/// produce's answer still to come (the writer polls it, so a produce
/// costs no task of its own: one fewer spawn, wake-up and channel send
/// per record when each device has one in flight). With the answer goes
/// the request's share of the in-flight bytes, given back once written.
enum Answer {
    Ready(Response, usize),
    Pending(PendingAnswer),
}

impl From<(Response, usize)> for Answer {
    fn from((r, n): (Response, usize)) -> Answer {
        Answer::Ready(r, n)
    }
}

type PendingAnswer = std::pin::Pin<Box<dyn std::future::Future<Output = (Response, usize)> + Send>>;

/// The reader's answers on their way to the writer: a queue, and the
/// writer's waker while it waits for one. (An `async_channel` did this
/// with its listener machinery and a block allocation per 31 answers:
/// about 6% of the broker's instructions per record when each device
/// has one record in flight.)
#[derive(Default)]
struct Answers {
    inner: std::sync::Mutex<AnswersInner>,
}

#[derive(Default)]
struct AnswersInner {
    queue: std::collections::VecDeque<Answer>,
    /// No more answers will come.
    closed: bool,
    waiting: Option<std::task::Waker>,
}

impl Answers {
    fn lock(&self) -> std::sync::MutexGuard<'_, AnswersInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, answer: Answer) {
        self.change(|inner| inner.queue.push_back(answer));
    }

    /// No more answers come: the writer ends once it has written the rest.
    fn close(&self) {
        self.change(|inner| inner.closed = true);
    }

    /// Applies `f` and wakes a waiting writer, after the lock is let go.
    fn change(&self, f: impl FnOnce(&mut AnswersInner)) {
        let waiting = {
            let mut inner = self.lock();
            f(&mut inner);
            inner.waiting.take()
        };
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

/// Closes the answers when dropped (see [`run`]).
struct ClosesAnswers(Arc<Answers>);

impl Drop for ClosesAnswers {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Takes every answer the reader has sent and every pending one that is
/// done into `ready`. Ready(true) once `ready` holds one, Ready(false)
/// when the reader is gone and nothing is left to answer.
fn collect(
    cx: &mut std::task::Context<'_>,
    answers: &Answers,
    pending: &mut Vec<PendingAnswer>,
    ready: &mut std::collections::VecDeque<(Response, usize)>,
    closed: &mut bool,
) -> std::task::Poll<bool> {
    use std::task::Poll;
    take_answers(cx, answers, pending, ready, closed);
    settle(cx, pending, ready);
    if !ready.is_empty() {
        Poll::Ready(true)
    } else if *closed && pending.is_empty() {
        Poll::Ready(false)
    } else {
        Poll::Pending
    }
}

/// Moves the answers sent so far into `ready` and `pending`, and leaves
/// the task's waker for the next.
fn take_answers(
    cx: &mut std::task::Context<'_>,
    answers: &Answers,
    pending: &mut Vec<PendingAnswer>,
    ready: &mut std::collections::VecDeque<(Response, usize)>,
    closed: &mut bool,
) {
    if *closed {
        return;
    }
    let mut inner = answers.lock();
    for a in inner.queue.drain(..) {
        match a {
            Answer::Ready(r, n) => ready.push_back((r, n)),
            Answer::Pending(f) => pending.push(f),
        }
    }
    *closed = inner.closed;
    // Under the lock that `send` takes: no answer comes in between.
    if !inner
        .waiting
        .as_ref()
        .is_some_and(|w| w.will_wake(cx.waker()))
    {
        inner.waiting = Some(cx.waker().clone());
    }
}

/// Polls the pending produce answers, in the order submitted (answers
/// for one partition come in order), and moves those done into `ready`.
/// Polling a produce settles the producer table, so it goes on while the
/// writer waits for the socket too.
fn settle(
    cx: &mut std::task::Context<'_>,
    pending: &mut Vec<PendingAnswer>,
    ready: &mut std::collections::VecDeque<(Response, usize)>,
) {
    let mut i = 0;
    while i < pending.len() {
        match pending[i].as_mut().poll(cx) {
            std::task::Poll::Ready(done) => {
                ready.push_back(done);
                drop(pending.remove(i));
            }
            std::task::Poll::Pending => i += 1,
        }
    }
}

async fn write_loop<S>(
    mut stream: S,
    answers: Arc<Answers>,
    inflight: Arc<InFlight>,
    max_frame_bytes: usize,
) where
    S: AsyncWrite + Unpin,
{
    // The encoding buffer stays within about one frame, as the memory
    // budget counts it: an answer that would take it further waits for
    // the next write.
    let limit = COALESCE_BYTES_MAX.min(max_frame_bytes);
    let mut out = Outgoing::new(max_frame_bytes);
    let mut broken = false;
    let mut pending = Vec::new();
    let mut ready = std::collections::VecDeque::new();
    let mut closed = false;
    loop {
        let more =
            std::future::poll_fn(|cx| collect(cx, &answers, &mut pending, &mut ready, &mut closed))
                .await;
        if !more {
            break;
        }
        out.clear();
        let mut release = 0;
        // Coalesce what is ready into one write.
        while let Some((r, n)) = ready.pop_front() {
            if release > 0 && out.bytes() + encoded_size_hint(&r) > limit {
                ready.push_front((r, n));
                break;
            }
            out.add(r);
            release += n;
            if out.bytes() >= limit {
                break;
            }
        }
        // The flush matters for TLS: a write the socket only partly took
        // leaves records in rustls's buffer, sent by the next write or a
        // flush, and there may be no next write. (For TCP it is a no-op.)
        if !broken {
            let write =
                async { out.write_to(&mut stream).await.is_err() || stream.flush().await.is_err() };
            // A peer that does not read must not hold up its produces'
            // settling: a retry of the same batch on another connection
            // waits for that, not for this socket.
            // Produces answered meanwhile are taken in too, to settle.
            let settling = std::future::poll_fn(|cx| {
                take_answers(cx, &answers, &mut pending, &mut ready, &mut closed);
                settle(cx, &mut pending, &mut ready);
                std::task::Poll::Pending
            });
            // The peer is gone: keep draining so in-flight accounting ends.
            broken = futures_lite::future::or(write, settling).await;
        }
        inflight.release(release);
    }
    if !broken {
        let _ = stream.flush().await;
        let _ = stream.close().await;
    }
}

/// Responses encoded for one write. A fetch's large records are not
/// copied into `buf`: they are written from the response itself, which is
/// held until then (one vectored write of the pieces, in order).
#[derive(Default)]
struct Outgoing {
    /// The largest frame the peer takes; an answer above it is replaced
    /// by an error saying so.
    max_frame_bytes: usize,
    buf: Vec<u8>,
    /// Responses with records spliced in, and the splices (in `buf`
    /// order) with the index of their response.
    held: Vec<Response>,
    splices: Vec<(usize, Splice)>,
    scratch: Vec<Splice>,
    spliced_bytes: usize,
}

impl Outgoing {
    fn new(max_frame_bytes: usize) -> Outgoing {
        Outgoing {
            max_frame_bytes,
            ..Outgoing::default()
        }
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.held.clear();
        self.splices.clear();
        self.spliced_bytes = 0;
    }

    /// Bytes of the write so far.
    fn bytes(&self) -> usize {
        self.buf.len() + self.spliced_bytes
    }

    fn add(&mut self, r: Response) {
        self.scratch.clear();
        let start = self.buf.len();
        let encoded = encode_response_spliced(&r, &mut self.buf, &mut self.scratch);
        let body = encoded.map(|n| n - FRAME_HEADER_BYTES);
        if body.as_ref().map_or(true, |&n| n > self.max_frame_bytes) {
            // A request for many partitions or topics can ask for more
            // than a frame holds; the peer would refuse the frame and lose
            // the connection, so it hears why instead.
            self.buf.truncate(start);
            self.scratch.clear();
            let why = match body {
                Ok(n) => too_large(&r.body, n, self.max_frame_bytes),
                Err(e) => format!("the answer cannot be framed: {e}"),
            };
            let e = error_response(r.correlation_id, ErrorCode::InvalidRequest, why);
            let _ = encode_response(&e, &mut self.buf);
            return;
        }
        if self.scratch.is_empty() {
            return;
        }
        let ResponseBody::Fetch(f) = &r.body else {
            unreachable!("only fetch records are spliced")
        };
        for sp in &self.scratch {
            self.spliced_bytes += f.partitions[sp.partition].records.len();
            self.splices.push((self.held.len(), *sp));
        }
        self.held.push(r);
    }

    async fn write_to<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> std::io::Result<()> {
        if self.splices.is_empty() {
            return stream.write_all(&self.buf).await;
        }
        let mut pieces = Vec::with_capacity(2 * self.splices.len() + 1);
        let mut from = 0;
        for &(h, sp) in &self.splices {
            let ResponseBody::Fetch(f) = &self.held[h].body else {
                unreachable!("only fetch records are spliced")
            };
            pieces.push(std::io::IoSlice::new(&self.buf[from..sp.at]));
            pieces.push(std::io::IoSlice::new(&f.partitions[sp.partition].records));
            from = sp.at;
        }
        pieces.push(std::io::IoSlice::new(&self.buf[from..]));
        write_all_vectored(stream, &mut pieces).await
    }
}

/// Why an answer of `bytes` does not fit `max_frame_bytes`: what it
/// answered and, at its entries' average size, how many would fit, so the
/// client knows how to split its request.
fn too_large(body: &ResponseBody, bytes: usize, max_frame_bytes: usize) -> String {
    let (count, what) = match body {
        ResponseBody::Metadata(m) => (m.topics.len(), "topics"),
        ResponseBody::ListTopics(l) => (l.topics.len(), "topics"),
        ResponseBody::Fetch(f) => (f.partitions.len(), "partitions"),
        ResponseBody::Produce(p) => (p.partitions.len(), "partitions"),
        ResponseBody::ListOffsets(l) => (l.partitions.len(), "partitions"),
        ResponseBody::OffsetFetch(o) => (o.offsets.len(), "partitions"),
        ResponseBody::DescribePartitions(d) => (d.partitions.len(), "partitions"),
        _ => (0, ""),
    };
    let size = format!("takes {bytes} bytes, above max_frame_bytes ({max_frame_bytes})");
    if count == 0 {
        return format!("the answer {size}: ask for fewer partitions or topics at once");
    }
    // Rounded down: an estimate that errs towards an answer that fits.
    let fit = (count as u128 * max_frame_bytes as u128 / bytes as u128) as usize;
    format!(
        "the answer for {count} {what} {size}: about {fit} {what} fit in one answer; \
         ask for fewer {what} at once"
    )
}

async fn write_all_vectored<S: AsyncWrite + Unpin>(
    stream: &mut S,
    mut pieces: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut pieces, 0);
    while !pieces.is_empty() {
        let n = stream.write_vectored(pieces).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut pieces, n);
    }
    Ok(())
}

#[derive(Debug)]
enum SessionEnd {
    Io(std::io::Error),
    Frame(FrameError),
    Protocol(&'static str),
    /// A peer silent where it must speak (see `ReadDeadline`).
    TimedOut(&'static str),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Frame(e) => write!(f, "{e}"),
            Self::Protocol(e) | Self::TimedOut(e) => f.write_str(e),
        }
    }
}

/// A produce batch is lent its frame's whole buffer rather than copied
/// out of it when it is at least this large, alone in its request.
const LEND_BYTES_MIN: usize = crate::bufpool::BUFFER_BYTES_MIN;

/// Where in `buf` the batch of a produce request to lend its frame's
/// buffer to lies (see [`crate::bufpool`]): a large batch alone in a frame
/// (of `frame_bytes`) that fills at least half of the buffer, so a small
/// frame never holds a large buffer while its batch waits for storage.
/// (The request is charged the whole buffer against the connection's
/// in-flight bound.)
fn lend_range(
    req: &protocol::ProduceRequest<'_>,
    buf: &[u8],
    frame_bytes: usize,
) -> Option<std::ops::Range<usize>> {
    let [p] = req.partitions.as_slice() else {
        return None;
    };
    if p.batch.len() < LEND_BYTES_MIN || frame_bytes * 2 < buf.len() {
        return None;
    }
    let start = (p.batch.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
    let end = start + p.batch.len();
    (end <= frame_bytes).then_some(start..end)
}

/// When a read for the next frame gives up on a silent peer.
#[derive(Clone, Copy)]
struct ReadDeadline {
    /// Before hello: the whole hello must have come by then.
    hello_by: Option<Instant>,
    /// After hello: how long a frame once begun may go without a byte.
    /// Between frames there is no limit (an idle client is a client).
    stall: Duration,
}

/// Reads until the buffer holds one whole frame, EOF, shutdown (`stop`:
/// the connection's one wait for it, polled across frames, since a
/// listener made for every read cost an allocation and a locked list
/// insert and removal per request), or `deadline` passes
/// (`SessionEnd::TimedOut`). Between frames after hello no timer is made.
async fn next_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    filled: &mut usize,
    mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    max_frame_bytes: usize,
    deadline: ReadDeadline,
) -> Result<Next, SessionEnd> {
    loop {
        match frame_len(&buf[..*filled], max_frame_bytes as u32) {
            Ok(Some(n)) => return Ok(Next::Frame(n)),
            Ok(None) => {}
            Err(e) => return Err(SessionEnd::Frame(e)),
        }
        if *filled >= FRAME_HEADER_BYTES {
            let need = FRAME_HEADER_BYTES
                + protocol::body_len(buf[..4].try_into().expect("4 bytes")) as usize;
            if buf.len() < need {
                // Exact, so a buffer lent to a batch fits the pool's bound
                // on its way back.
                buf.reserve_exact(need - buf.len());
                buf.resize(need, 0);
            }
        }
        if *filled == buf.len() {
            let grow = (buf.len() * 2)
                .min(max_frame_bytes + FRAME_HEADER_BYTES)
                .max(buf.len() + 1);
            buf.reserve_exact(grow - buf.len());
            buf.resize(grow, 0);
        }
        let (until, why) = match deadline.hello_by {
            Some(at) => (Some(at), "no hello in time"),
            None => (
                (*filled > 0).then(|| Instant::now() + deadline.stall),
                "a frame stalled half-sent",
            ),
        };
        let timer = async {
            match until {
                Some(at) => smol::Timer::at(at).await,
                None => std::future::pending().await,
            };
        };
        enum Woke {
            Read(std::io::Result<usize>),
            Stop,
            Late,
        }
        let woke = futures_lite::future::or(
            async { Woke::Read(stream.read(&mut buf[*filled..]).await) },
            futures_lite::future::or(
                async {
                    stop.as_mut().await;
                    Woke::Stop
                },
                async {
                    timer.await;
                    Woke::Late
                },
            ),
        )
        .await;
        let read = match woke {
            Woke::Read(r) => Some(r),
            Woke::Stop => None,
            Woke::Late => return Err(SessionEnd::TimedOut(why)),
        };
        match read {
            None => return Ok(Next::Shutdown),
            Some(Ok(0)) => {
                return if *filled == 0 {
                    Ok(Next::Eof)
                } else {
                    Err(SessionEnd::Protocol("connection closed inside a frame"))
                }
            }
            Some(Ok(n)) => *filled += n,
            // A TLS peer that hangs up between frames without close_notify
            // (most clients do) has simply gone, like a TCP peer at EOF.
            Some(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof && *filled == 0 => {
                return Ok(Next::Eof)
            }
            Some(Err(e)) => return Err(SessionEnd::Io(e)),
        }
    }
}

async fn read_loop<S>(
    mut stream: S,
    ctx: &Arc<Ctx>,
    tx: &Arc<Answers>,
    inflight: &Arc<InFlight>,
    who: &Arc<IdentityGuard>,
) -> Result<(), SessionEnd>
where
    S: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; READ_BUFFER_BYTES_INITIAL];
    let mut filled = 0usize;
    let stop = ctx.shutdown.wait();
    futures_lite::pin!(stop);
    let mut shrink = ShrinkPolicy::default();
    let mut hello_done = false;
    // The negotiated protocol version; answers are shaped for it.
    let mut version = protocol::PROTOCOL_VERSION_MIN;
    // Until then the connection reads nothing: its identity is over its
    // produce quota (see `quota`).
    let mut muted_until: Option<std::time::Instant> = None;
    let hello_by = Instant::now() + ctx.settings.frame_timeout;
    loop {
        if let Some(until) = muted_until.take() {
            let stopping = futures_lite::future::or(
                async {
                    smol::Timer::at(until).await;
                    false
                },
                async {
                    ctx.shutdown.wait().await;
                    true
                },
            )
            .await;
            if stopping {
                return Ok(());
            }
        }
        // Before hello only a hello-sized frame is accepted: a peer that
        // opens with more is not a skiff client (docs/protocol.md).
        let max_frame_bytes = if hello_done {
            ctx.settings.max_frame_bytes
        } else {
            ctx.settings
                .max_frame_bytes
                .min(protocol::HELLO_FRAME_BYTES_MAX as usize)
        };
        let n = match next_frame(
            &mut stream,
            &mut buf,
            &mut filled,
            stop.as_mut(),
            max_frame_bytes,
            ReadDeadline {
                hello_by: (!hello_done).then_some(hello_by),
                stall: ctx.settings.frame_timeout,
            },
        )
        .await
        {
            Ok(Next::Frame(n)) => n,
            Ok(Next::Eof) | Ok(Next::Shutdown) => return Ok(()),
            Err(SessionEnd::Frame(e)) => {
                // The prefix alone was bad (too large): no body to peek into.
                ctx.metrics_frame_error();
                inflight.acquire(1, Limit::None).await;
                let r = frame_error_response(&[], &e);
                tx.send(Answer::Ready(r, 1));
                return Err(SessionEnd::Frame(e));
            }
            Err(e) => return Err(e),
        };
        let body = &buf[FRAME_HEADER_BYTES..n];
        let request = match decode_request(body) {
            Ok(r) => r,
            Err(e) if hello_done && !e.closes_connection() => {
                // Only the request is wrong: refused, and the next frame is
                // read from where this one ends (docs/protocol.md, "Framing").
                inflight.acquire(n, Limit::None).await;
                tx.send(Answer::Ready(frame_error_response(body, &e), n));
                drop_frame(&mut buf, &mut filled, n, false, &mut shrink);
                continue;
            }
            Err(e) => {
                ctx.metrics_frame_error();
                inflight.acquire(n, Limit::None).await;
                let r = frame_error_response(body, &e);
                tx.send(Answer::Ready(r, n));
                return Err(SessionEnd::Frame(e));
            }
        };
        // A produce lent its frame's buffer holds all of it until stored.
        let lend = match &request.body {
            RequestBody::Produce(req) => lend_range(req, &buf, n),
            _ => None,
        };
        let held = if lend.is_some() { buf.len() } else { n };
        let reserved = reserve_bytes(held, &request.body, &ctx.settings);
        let limit = match &request.body {
            RequestBody::Produce(_) => Limit::OrShared,
            _ => Limit::Own,
        };
        inflight.acquire(reserved, limit).await;
        let cid = request.correlation_id;
        let kind = request.body.name();
        // Whether the bytes after this frame are at the buffer's front
        // already (its buffer was lent to a produce batch).
        let mut moved = false;
        let started = std::time::Instant::now();
        let metrics = ctx.metrics.clone();
        let answer = move |body: ResponseBody| {
            let body = protocol::for_version(body, version);
            metrics.observe_request(kind, started.elapsed());
            if let ResponseBody::Fetch(f) = &body {
                for p in &f.partitions {
                    if !p.records.is_empty() {
                        let records = crate::batch::count_records(&p.records);
                        metrics.record_fetch(&p.topic, records, p.records.len() as u64);
                    }
                }
            }
            (
                Response {
                    correlation_id: cid,
                    body,
                },
                reserved,
            )
        };
        match request.body {
            RequestBody::Hello(_) if hello_done => {
                // The version is fixed for the connection; the request is
                // refused, the connection stays usable.
                let body = handler::error_body(
                    ErrorCode::InvalidRequest,
                    "hello was already done on this connection",
                );
                tx.send(answer(body).into());
            }
            RequestBody::Hello(h) => {
                match protocol::negotiate_version(h.version_min, h.version_max) {
                    Some(v) => {
                        hello_done = true;
                        version = v;
                        let body = ResponseBody::Hello(HelloResponse {
                            version: v,
                            server_version: env!("CARGO_PKG_VERSION").to_owned(),
                            max_frame_bytes: ctx.settings.max_frame_bytes as u32,
                            max_batch_bytes: ctx.settings.max_batch_bytes as u32,
                        });
                        tx.send(answer(body).into());
                    }
                    None => {
                        let msg = format!(
                            "client speaks versions {}..={}, server {}..={}",
                            h.version_min,
                            h.version_max,
                            protocol::PROTOCOL_VERSION_MIN,
                            protocol::PROTOCOL_VERSION_MAX
                        );
                        let body = handler::error_body(ErrorCode::UnsupportedVersion, msg);
                        tx.send(answer(body).into());
                        return Err(SessionEnd::Protocol("no common protocol version"));
                    }
                }
            }
            _ if !hello_done => {
                let body = handler::error_body(
                    ErrorCode::InvalidRequest,
                    "the first request on a connection must be hello",
                );
                tx.send(answer(body).into());
                return Err(SessionEnd::Protocol("request before hello"));
            }
            body if body.since_version() > version => {
                // Its answer could carry what this client cannot decode.
                let msg = format!(
                    "{} needs protocol version {}; this connection speaks version {version}",
                    body.name(),
                    body.since_version()
                );
                tx.send(answer(handler::error_body(ErrorCode::InvalidRequest, msg)).into());
            }
            RequestBody::Produce(req) => {
                // Submitted here, in frame order; acked in a task.
                let bytes = req.partitions.iter().map(|p| p.batch.len() as u64).sum();
                // Two calls rather than a Vec of either: no allocation per
                // request (a fan-in's devices send one record per request).
                let pending = match lend {
                    Some(batch) => {
                        let p = req.partitions.into_iter().next().expect("one partition");
                        let (topic, partition) = (p.topic, p.partition);
                        drop(p.batch);
                        // The frame's buffer goes with its batch; the
                        // reader goes on in one from the pool, the next
                        // frames' bytes read so far moved to its front.
                        let next = ctx.pool.take_filled(buf.len());
                        let frame = std::mem::replace(&mut buf, next);
                        buf[..filled - n].copy_from_slice(&frame[n..filled]);
                        moved = true;
                        let lent = handler::ProduceIn {
                            topic,
                            partition,
                            batch: BatchIn::Own(ctx.pool.lend(frame, batch)),
                        };
                        handler::produce_submit(ctx, who.identity(), std::iter::once(lent)).await
                    }
                    None => {
                        let partitions = req.partitions.into_iter().map(|p| handler::ProduceIn {
                            topic: p.topic,
                            partition: p.partition,
                            batch: BatchIn::Frame(p.batch),
                        });
                        handler::produce_submit(ctx, who.identity(), partitions).await
                    }
                };
                let throttle = who.charge(Direction::Produce, bytes);
                let until = std::time::Instant::now() + throttle;
                if !throttle.is_zero() {
                    muted_until = Some(until);
                }
                let ctx2 = ctx.clone();
                let done = async move {
                    let mut body = handler::produce_complete(pending, &ctx2.metrics).await;
                    if !throttle.is_zero() {
                        smol::Timer::at(until).await;
                        if let ResponseBody::Produce(r) = &mut body {
                            r.throttle_ms = Some(throttle_ms(throttle));
                        }
                    }
                    answer(body)
                };
                tx.send(Answer::Pending(Box::pin(done)));
            }
            body => {
                // Owned (nothing but a produce borrows from the frame), so
                // the frame buffer takes the next request meanwhile.
                let body = body.into_owned();
                let ctx2 = ctx.clone();
                let tx = tx.clone();
                let who = who.clone();
                ctx.executor
                    .spawn(async move {
                        let ctx = ctx2;
                        let mut body = dispatch(&ctx, who.identity(), body).await;
                        if let ResponseBody::Fetch(f) = &mut body {
                            let bytes = f.partitions.iter().map(|p| p.records.len() as u64).sum();
                            let throttle = who.charge(Direction::Consume, bytes);
                            if !throttle.is_zero() {
                                smol::Timer::after(throttle).await;
                                f.throttle_ms = Some(throttle_ms(throttle));
                            }
                        }
                        tx.send(answer(body).into());
                    })
                    .detach();
            }
        }
        drop_frame(&mut buf, &mut filled, n, moved, &mut shrink);
    }
}

/// Takes a frame of `n` bytes off the front of `buf` (unless the bytes
/// after it were `moved` there already) and shrinks the buffer when the
/// policy says so.
fn drop_frame(
    buf: &mut Vec<u8>,
    filled: &mut usize,
    n: usize,
    moved: bool,
    shrink: &mut ShrinkPolicy,
) {
    if !moved {
        buf.copy_within(n..*filled, 0);
    }
    *filled -= n;
    if shrink.after_frame(buf.len(), n, *filled) {
        buf.truncate(READ_BUFFER_BYTES_MIN);
        buf.shrink_to_fit();
    }
}

fn throttle_ms(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

/// Every request but hello and produce. Each handler authorizes what it
/// touches (`handler::authorize`) with `identity`.
async fn dispatch(ctx: &Ctx, identity: &str, body: RequestBody<'static>) -> ResponseBody {
    match body {
        RequestBody::Metadata(r) => handler::metadata(ctx, identity, r),
        RequestBody::CreateTopic(r) => handler::create_topic(ctx, identity, r).await,
        RequestBody::DescribeTopic(r) => handler::describe_topic(ctx, identity, &r.name),
        RequestBody::ListTopics(_) => handler::list_topics(ctx, identity),
        RequestBody::DeleteTopic(r) => handler::delete_topic(ctx, identity, &r.name).await,
        RequestBody::Fetch(r) => handler::fetch(ctx, identity, r).await,
        RequestBody::ListOffsets(r) => handler::list_offsets(ctx, identity, r).await,
        RequestBody::InitProducer(r) => handler::init_producer(ctx, identity, r).await,
        RequestBody::JoinGroup(r) => groups::join(ctx, identity, r).await,
        RequestBody::SyncGroup(r) => {
            groups::sync(ctx, identity, &r.group, &r.member_id, r.generation)
        }
        RequestBody::Heartbeat(r) => {
            groups::heartbeat(ctx, identity, &r.group, &r.member_id, r.generation)
        }
        RequestBody::LeaveGroup(r) => groups::leave(ctx, identity, &r.group, &r.member_id),
        RequestBody::OffsetCommit(r) => groups::commit(ctx, identity, r).await,
        RequestBody::OffsetFetch(r) => groups::fetch_offsets(ctx, identity, r),
        RequestBody::ListGroups(_) => groups::list(ctx, identity),
        RequestBody::DescribeGroup(r) => groups::describe(ctx, identity, &r.group),
        RequestBody::DeleteGroup(r) => groups::delete(ctx, identity, &r.group).await,
        RequestBody::CompactTopic(r) => handler::compact_topic(ctx, identity, r).await,
        RequestBody::AlterTopic(r) => handler::alter_topic(ctx, identity, r).await,
        RequestBody::DescribePartitions(r) => {
            handler::describe_partitions(ctx, identity, &r.name).await
        }
        RequestBody::MirrorStatus(_) => handler::mirror_status(ctx, identity),
        RequestBody::MirrorPause(r) => handler::mirror_pause(ctx, identity, r),
        RequestBody::ShareFetch(r) => share::fetch(ctx, identity, r).await,
        RequestBody::ShareAck(r) => share::ack(ctx, identity, r).await,
        RequestBody::ListShareGroups(_) => share::list(ctx, identity),
        RequestBody::DescribeShareGroup(r) => share::describe(ctx, identity, &r.group),
        RequestBody::DeleteShareGroup(r) => share::delete(ctx, identity, &r.group).await,
        RequestBody::ShareLeave(r) => share::leave(ctx, identity, &r.group, &r.member_id),
        RequestBody::InitTxn(r) => super::txn::init(ctx, identity, r).await,
        RequestBody::AddTxnOffsets(r) => super::txn::add_offsets(ctx, identity, r).await,
        RequestBody::EndTxn(r) => super::txn::end(ctx, identity, r).await,
        RequestBody::ListTxns(_) => super::txn::list(ctx, identity).await,
        RequestBody::Hello(_) | RequestBody::Produce(_) => {
            unreachable!("handled by the reader")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FetchPartitionResult, FetchResponse, SPLICE_MIN_BYTES};

    /// The writer writes what was sent and ends once the answers close,
    /// also when the task that would have closed them is dropped.
    #[test]
    fn the_writer_ends_when_its_reader_goes_away() {
        let answer = |cid| crate::protocol::error_response(cid, ErrorCode::Internal, "x");
        smol::block_on(async {
            let answers = Arc::new(Answers::default());
            let inflight = Arc::new(InFlight::new(
                1 << 20,
                Arc::new(SharedInFlight::new(0, Default::default())),
            ));
            let (mut ours, theirs) = smol::net::unix::UnixStream::pair().expect("pair");
            let writer = smol::spawn(write_loop(theirs, answers.clone(), inflight, 1 << 20));
            let (sent_tx, sent_rx) = async_channel::bounded::<()>(1);
            let reader = {
                let closing = ClosesAnswers(answers.clone());
                let answers = answers.clone();
                smol::spawn(async move {
                    let _closing = closing;
                    answers.send(Answer::Ready(answer(1), 0));
                    sent_tx.send(()).await.expect("test waiting");
                    futures_lite::future::pending::<()>().await;
                })
            };
            // Not a timer: under an emulator the task may not have run by
            // then, and a cancel before its send leaves nothing to write.
            sent_rx.recv().await.expect("the reader sent its answer");
            // Cancelled before it closed the answers itself.
            let _ = reader.cancel().await;
            let ended = futures_lite::future::or(
                async {
                    writer.await;
                    true
                },
                async {
                    smol::Timer::after(std::time::Duration::from_secs(5)).await;
                    false
                },
            );
            assert!(ended.await, "the writer still waits for answers");
            let mut got = Vec::new();
            ours.read_to_end(&mut got).await.expect("read");
            let n = frame_len(&got, 1 << 20).expect("frame").expect("whole");
            let r = crate::protocol::decode_response(&got[FRAME_HEADER_BYTES..n]).expect("decode");
            assert_eq!(r.correlation_id, 1);
        });
    }

    /// A peer that stops reading stalls its writer on the socket, but not
    /// its produces: each is still polled to its end (which settles the
    /// producer table a retry on another connection waits for).
    #[test]
    fn pending_produces_settle_while_the_socket_is_full() {
        use std::sync::atomic::AtomicBool;
        use std::time::{Duration, Instant};
        struct Full;
        impl AsyncWrite for Full {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::task::Poll::Pending
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_close(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        let answer = |cid| crate::protocol::error_response(cid, ErrorCode::Internal, "x");
        smol::block_on(async {
            let tx = Arc::new(Answers::default());
            let inflight = Arc::new(InFlight::new(
                1 << 20,
                Arc::new(SharedInFlight::new(0, Default::default())),
            ));
            let writer = smol::spawn(write_loop(Full, tx.clone(), inflight, 1 << 20));
            // The first answer never leaves: the writer waits on the socket.
            tx.send(Answer::Ready(answer(1), 0));
            let (ack_tx, ack_rx) = async_channel::bounded::<()>(1);
            let settled = Arc::new(AtomicBool::new(false));
            let s = settled.clone();
            let produce = async move {
                let _ = ack_rx.recv().await;
                s.store(true, Ordering::SeqCst);
                (answer(2), 0)
            };
            tx.send(Answer::Pending(Box::pin(produce)));
            smol::Timer::after(Duration::from_millis(20)).await;
            assert!(!settled.load(Ordering::SeqCst), "settled before its ack");
            ack_tx.send(()).await.expect("ack");
            let deadline = Instant::now() + Duration::from_secs(5);
            while !settled.load(Ordering::SeqCst) && Instant::now() < deadline {
                smol::Timer::after(Duration::from_millis(5)).await;
            }
            assert!(
                settled.load(Ordering::SeqCst),
                "not settled while the socket was full"
            );
            drop(writer);
        });
    }

    /// Past its connection's own share only a produce is admitted, with
    /// bytes from the shared pool while it has room; releases give back
    /// what passes the share, whichever request they belong to.
    #[test]
    fn produces_past_their_share_borrow_from_the_shared_pool() {
        let shared = Arc::new(SharedInFlight::new(100, Default::default()));
        let a = InFlight::new(100, shared.clone());
        let b = InFlight::new(100, shared.clone());
        assert!(a.try_acquire(80, Limit::Own));
        assert!(!a.try_acquire(40, Limit::Own), "a fetch keeps to its share");
        assert!(a.try_acquire(40, Limit::OrShared));
        assert_eq!(shared.used(), 20);
        assert!(a.try_acquire(70, Limit::OrShared));
        assert_eq!(shared.used(), 90);
        assert!(b.try_acquire(90, Limit::Own), "b's own share is b's");
        assert!(
            !b.try_acquire(30, Limit::OrShared),
            "20 past b's share do not fit"
        );
        assert!(b.try_acquire(20, Limit::OrShared), "10 do");
        assert_eq!(shared.used(), 100);
        // a's first request leaves: 110 held, 10 past its share.
        a.release(80);
        assert_eq!(shared.used(), 20);
        assert!(b.try_acquire(30, Limit::OrShared));
        assert_eq!(shared.used(), 50);
        a.release(110);
        assert_eq!(shared.used(), 40);
        b.release(140);
        assert_eq!(shared.used(), 0);
        // With no pool a produce waits for its own share, as before.
        let none = Arc::new(SharedInFlight::new(0, Default::default()));
        let c = InFlight::new(100, none.clone());
        assert!(c.try_acquire(100, Limit::OrShared));
        assert!(!c.try_acquire(1, Limit::OrShared));
        // One request alone is always admitted, and an error answer too:
        // the pool counts their excess, and gets it back.
        let d = InFlight::new(100, none.clone());
        assert!(d.try_acquire(150, Limit::Own));
        assert!(d.try_acquire(1, Limit::None));
        assert_eq!(none.used(), 51);
        d.release(151);
        c.release(100);
        assert_eq!(none.used(), 0);
    }

    /// The reader adds while the writer releases on another thread: the
    /// pool always ends holding exactly what passes the shares, and empty
    /// once everything is released.
    #[test]
    fn the_shared_pool_stays_exact_under_concurrent_adds_and_releases() {
        let shared = Arc::new(SharedInFlight::new(usize::MAX, Default::default()));
        let conns: Vec<Arc<InFlight>> = (0..2)
            .map(|_| Arc::new(InFlight::new(1000, shared.clone())))
            .collect();
        let threads: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let (tx, rx) = std::sync::mpsc::channel::<usize>();
                    let writer = {
                        let c = c.clone();
                        std::thread::spawn(move || {
                            for n in rx {
                                c.release(n);
                            }
                        })
                    };
                    let mut x = 0x9e37_79b9_u64 + k as u64;
                    for _ in 0..100_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let n = 1 + (x % 700) as usize;
                        let limit = if x % 3 == 0 {
                            Limit::Own
                        } else {
                            Limit::OrShared
                        };
                        while !c.try_acquire(n, limit) {
                            std::hint::spin_loop();
                        }
                        tx.send(n).expect("writer");
                    }
                    drop(tx);
                    writer.join().expect("writer thread");
                })
            })
            .collect();
        for t in threads {
            t.join().expect("connection thread");
        }
        for c in &conns {
            assert_eq!(c.bytes.load(Ordering::Acquire), 0);
        }
        assert_eq!(shared.used(), 0);
    }

    /// A connection pipelining tiny produce requests holds at most
    /// `REQUESTS_IN_FLIGHT_MAX` of them, whatever `max_inflight_bytes` is;
    /// a fetch still reserves its answer, no more.
    #[test]
    fn tiny_requests_are_admitted_a_few_at_a_time() {
        let mut frame = Vec::new();
        let body = RequestBody::Produce(protocol::ProduceRequest { partitions: vec![] });
        protocol::encode_request_body(1, &body, &mut frame).expect("encode");
        let request = decode_request(&frame[FRAME_HEADER_BYTES..]).expect("decode");
        for max in [1 << 16, 278_528, 64 << 20] {
            let mut settings =
                crate::server::Settings::from_config(&crate::config::Config::embedded_default());
            settings.max_inflight_bytes = max;
            let each = reserve_bytes(frame.len(), &request.body, &settings);
            let fit = max / each;
            assert!(
                (REQUESTS_IN_FLIGHT_MAX - 1..=REQUESTS_IN_FLIGHT_MAX).contains(&fit),
                "{fit} tiny requests fit under {max} bytes"
            );
        }
    }

    /// Takes at most `step` bytes per (vectored) write, so every piece
    /// boundary and partial write is exercised.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Hands out its pieces one per read, then fails.
    struct Pieces(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(match self.0.pop_front() {
                Some(mut p) => {
                    let n = p.len().min(buf.len());
                    buf[..n].copy_from_slice(&p[..n]);
                    if n < p.len() {
                        self.0.push_front(p.split_off(n));
                    }
                    Ok(n)
                }
                None => Err(std::io::ErrorKind::ConnectionReset.into()),
            })
        }
    }

    #[test]
    fn filling_reads_join_pieces_and_keep_an_error_for_the_next_read() {
        let pieces = [vec![1u8; 3], vec![2; 4], vec![3; 5]];
        let mut r = FillingReads {
            inner: Pieces(pieces.into_iter().collect()),
            error: None,
        };
        let mut buf = [0u8; 9];
        let n = smol::block_on(r.read(&mut buf)).unwrap();
        assert_eq!(&buf[..n], &[1, 1, 1, 2, 2, 2, 2, 3, 3]);
        // Bytes came before the error: they are returned, and the error
        // is the next read's.
        let mut rest = [0u8; 16];
        let n = smol::block_on(r.read(&mut rest)).unwrap();
        assert_eq!(&rest[..n], &[3; 3]);
        let e = smol::block_on(r.read(&mut rest)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    }

    fn fetch(id: u32, sizes: &[usize]) -> Response {
        Response {
            correlation_id: id,
            body: ResponseBody::Fetch(FetchResponse {
                throttle_ms: None,
                partitions: sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| FetchPartitionResult {
                        topic: "t".into(),
                        partition: i as u32,
                        error: ErrorCode::None,
                        high_watermark: 9,
                        earliest_offset: 0,
                        records: (0..n)
                            .map(|j| (j * 7 + i) as u8)
                            .collect::<Vec<u8>>()
                            .into(),
                        last_stable_offset: None,
                        next_offset: None,
                        message: None,
                    })
                    .collect(),
            }),
        }
    }

    /// Several responses, some with records sent in place, coalesced into
    /// one write that the socket takes a few bytes at a time: the bytes
    /// are exactly the frames encoded whole, in order.
    #[test]
    fn a_write_with_records_sent_in_place_is_the_frames_in_order() {
        let responses = [
            fetch(1, &[SPLICE_MIN_BYTES, 10]),
            error_response(2, ErrorCode::Internal, "small"),
            fetch(3, &[5, 200_000, SPLICE_MIN_BYTES + 1]),
            fetch(4, &[100]),
        ];
        let mut want = Vec::new();
        for r in &responses {
            encode_response(r, &mut want).unwrap();
        }
        for step in [7, 4096, usize::MAX] {
            let mut out = Outgoing::new(usize::MAX);
            for r in responses.iter().cloned() {
                out.add(r);
            }
            assert_eq!(out.held.len(), 2, "the two fetches with large records");
            assert_eq!(out.bytes(), want.len());
            let mut sink = Trickle {
                got: Vec::new(),
                step,
            };
            smol::block_on(out.write_to(&mut sink)).unwrap();
            assert!(sink.got == want, "step {step}");
            out.clear();
            assert_eq!(out.bytes(), 0);
        }
    }

    #[test]
    fn a_large_read_buffer_is_kept_for_large_frames_and_given_back_after_small_ones() {
        const BIG: usize = 1024 * 1024;
        let mut p = ShrinkPolicy::default();
        for _ in 0..100 {
            assert!(!p.after_frame(BIG, BIG, 0), "large frames keep coming");
        }
        for i in 1..SMALL_FRAMES_BEFORE_SHRINK {
            assert!(!p.after_frame(BIG, 100, 0), "small frame {i}");
        }
        assert!(
            !p.after_frame(BIG, 100, READ_BUFFER_BYTES_MIN + 1),
            "not while more than the small size is still buffered"
        );
        assert!(p.after_frame(BIG, 100, 0));
        // A large frame starts the count again.
        assert!(!p.after_frame(BIG, BIG, 0));
        assert!(!p.after_frame(BIG, 100, 0));
        // A buffer of the kept size is never given back.
        let mut p = ShrinkPolicy::default();
        for _ in 0..100 {
            assert!(!p.after_frame(READ_BUFFER_BYTES_KEEP, 100, 0));
        }
    }

    #[test]
    fn only_a_large_batch_alone_in_a_frame_filling_half_its_buffer_is_lent_it() {
        let frame = |batches: &[usize], buffer: usize| {
            let body = RequestBody::Produce(protocol::ProduceRequest {
                partitions: batches
                    .iter()
                    .map(|&len| protocol::ProducePartition {
                        topic: "t".into(),
                        partition: 0,
                        batch: vec![7u8; len].into(),
                    })
                    .collect(),
            });
            let mut buf = Vec::new();
            protocol::encode_request_body(1, &body, &mut buf).expect("encode");
            let n = buf.len();
            buf.resize(buffer.max(n), 0);
            (buf, n)
        };
        let lent = |batches: &[usize], buffer: usize| {
            let (buf, n) = frame(batches, buffer);
            let request = decode_request(&buf[FRAME_HEADER_BYTES..n]).expect("decode");
            let RequestBody::Produce(req) = request.body else {
                unreachable!()
            };
            lend_range(&req, &buf, n).map(|r| {
                assert!(buf[r.clone()].iter().all(|&b| b == 7) && r.end <= n);
                r.len()
            })
        };
        assert_eq!(lent(&[LEND_BYTES_MIN], 0), Some(LEND_BYTES_MIN));
        assert_eq!(lent(&[100_000], 190_000), Some(100_000));
        assert_eq!(lent(&[LEND_BYTES_MIN - 1], 0), None, "small");
        assert_eq!(lent(&[100_000, 100_000], 0), None, "two batches");
        assert_eq!(lent(&[100_000], 210_000), None, "under half the buffer");
    }
}
