//! One client connection: a reader that frames and dispatches requests in
//! order, handler tasks that may finish out of order, and a writer that
//! sends responses as they complete.
//!
//! Memory per connection is bounded: the read buffer never exceeds one
//! frame (`max_frame_bytes`), and requests are not read while the bytes of
//! requests being handled plus responses not yet written exceed
//! `max_inflight_bytes`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use event_listener::Event;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{
    self, decode_request, encode_response, encode_response_spliced, error_response,
    frame_error_response, frame_len, ErrorCode, FrameError, HelloResponse, RequestBody, Response,
    ResponseBody, Splice, FRAME_HEADER_BYTES,
};

use super::handler;
use super::Ctx;

/// First read buffer size; it grows to the largest frame seen, at most
/// `max_frame_bytes`.
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
/// Responses waiting for the writer. Bounded together with in-flight bytes.
const RESPONSE_QUEUE_DEPTH: usize = 256;

/// Bytes of requests being handled on one connection.
struct InFlight {
    bytes: AtomicUsize,
    changed: Event,
}

impl InFlight {
    fn release(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.changed.notify(usize::MAX);
    }

    /// Waits until `n` more bytes fit under `max`; one request alone is
    /// always admitted, so a frame of any allowed size makes progress.
    async fn acquire(&self, n: usize, max: usize) {
        loop {
            let listener = self.changed.listen();
            let cur = self.bytes.load(Ordering::Acquire);
            if cur == 0 || cur + n <= max {
                self.bytes.fetch_add(n, Ordering::AcqRel);
                return;
            }
            listener.await;
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

pub(crate) async fn run<S>(stream: S, ctx: Arc<Ctx>, peer: String)
where
    S: AsyncRead + AsyncWrite + Clone + Unpin + Send + 'static,
{
    let (tx, rx) = async_channel::bounded::<(Response, usize)>(RESPONSE_QUEUE_DEPTH);
    let inflight = Arc::new(InFlight {
        bytes: AtomicUsize::new(0),
        changed: Event::new(),
    });
    let writer = ctx
        .executor
        .spawn(write_loop(stream.clone(), rx, inflight.clone()));
    let reason = read_loop(stream, &ctx, &tx, &inflight).await;
    match &reason {
        Ok(()) => log::debug!("{peer}: connection closed"),
        Err(e) => log::info!("{peer}: closing connection: {e}"),
    }
    // Finish what was read before closing: every request gets its answer.
    inflight.drained().await;
    drop(tx);
    writer.await;
}

async fn write_loop<S>(
    mut stream: S,
    rx: async_channel::Receiver<(Response, usize)>,
    inflight: Arc<InFlight>,
) where
    S: AsyncWrite + Unpin,
{
    let mut out = Outgoing::default();
    let mut broken = false;
    while let Ok((first, n)) = rx.recv().await {
        out.clear();
        let mut release = n;
        out.add(first);
        // Coalesce whatever else is ready into one write.
        while out.bytes() < 256 * 1024 {
            match rx.try_recv() {
                Ok((r, n)) => {
                    out.add(r);
                    release += n;
                }
                Err(_) => break,
            }
        }
        if !broken && out.write_to(&mut stream).await.is_err() {
            // The peer is gone; keep draining so in-flight accounting ends.
            broken = true;
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
    buf: Vec<u8>,
    /// Responses with records spliced in, and the splices (in `buf`
    /// order) with the index of their response.
    held: Vec<Response>,
    splices: Vec<(usize, Splice)>,
    scratch: Vec<Splice>,
    spliced_bytes: usize,
}

impl Outgoing {
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
        if encode_response_spliced(&r, &mut self.buf, &mut self.scratch).is_err() {
            // Only a body above 4 GiB fails, which limits make impossible;
            // answer with an error rather than a truncated frame all the same.
            let e = error_response(r.correlation_id, ErrorCode::Internal, "response too large");
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
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Frame(e) => write!(f, "{e}"),
            Self::Protocol(e) => f.write_str(e),
        }
    }
}

/// Reads until the buffer holds one whole frame, EOF, or shutdown.
async fn next_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    filled: &mut usize,
    ctx: &Ctx,
    max_frame_bytes: usize,
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
                buf.resize(need, 0);
            }
        }
        if *filled == buf.len() {
            let grow = (buf.len() * 2).min(max_frame_bytes + FRAME_HEADER_BYTES);
            buf.resize(grow.max(buf.len() + 1), 0);
        }
        let read = futures_lite::future::or(
            async { Some(stream.read(&mut buf[*filled..]).await) },
            async {
                ctx.shutdown.wait().await;
                None
            },
        )
        .await;
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
            Some(Err(e)) => return Err(SessionEnd::Io(e)),
        }
    }
}

async fn read_loop<S>(
    mut stream: S,
    ctx: &Arc<Ctx>,
    tx: &async_channel::Sender<(Response, usize)>,
    inflight: &Arc<InFlight>,
) -> Result<(), SessionEnd>
where
    S: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; READ_BUFFER_BYTES_MIN];
    let mut filled = 0usize;
    let mut shrink = ShrinkPolicy::default();
    let mut hello_done = false;
    loop {
        // Before hello only a hello-sized frame is accepted: a peer that
        // opens with more is not a skiff client (docs/protocol.md).
        let max_frame_bytes = if hello_done {
            ctx.settings.max_frame_bytes
        } else {
            ctx.settings
                .max_frame_bytes
                .min(protocol::HELLO_FRAME_BYTES_MAX as usize)
        };
        let n = match next_frame(&mut stream, &mut buf, &mut filled, ctx, max_frame_bytes).await {
            Ok(Next::Frame(n)) => n,
            Ok(Next::Eof) | Ok(Next::Shutdown) => return Ok(()),
            Err(SessionEnd::Frame(e)) => {
                // The prefix alone was bad (too large): no body to peek into.
                ctx.metrics_frame_error();
                inflight.acquire(1, usize::MAX).await;
                let r = frame_error_response(&[], &e);
                let _ = tx.send((r, 1)).await;
                return Err(SessionEnd::Frame(e));
            }
            Err(e) => return Err(e),
        };
        let body = &buf[FRAME_HEADER_BYTES..n];
        inflight.acquire(n, ctx.settings.max_inflight_bytes).await;
        let request = match decode_request(body) {
            Ok(r) => r,
            Err(e) => {
                ctx.metrics_frame_error();
                let r = frame_error_response(body, &e);
                let _ = tx.send((r, n)).await;
                return Err(SessionEnd::Frame(e));
            }
        };
        let cid = request.correlation_id;
        let kind = request.body.name();
        let started = std::time::Instant::now();
        let metrics = ctx.metrics.clone();
        let answer = move |body: ResponseBody| {
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
                n,
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
                let _ = tx.send(answer(body)).await;
            }
            RequestBody::Hello(h) => {
                match protocol::negotiate_version(h.version_min, h.version_max) {
                    Some(version) => {
                        hello_done = true;
                        let body = ResponseBody::Hello(HelloResponse {
                            version,
                            server_version: env!("CARGO_PKG_VERSION").to_owned(),
                            max_frame_bytes: ctx.settings.max_frame_bytes as u32,
                            max_batch_bytes: ctx.settings.max_batch_bytes as u32,
                        });
                        let _ = tx.send(answer(body)).await;
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
                        let _ = tx.send(answer(body)).await;
                        return Err(SessionEnd::Protocol("no common protocol version"));
                    }
                }
            }
            _ if !hello_done => {
                let body = handler::error_body(
                    ErrorCode::InvalidRequest,
                    "the first request on a connection must be hello",
                );
                let _ = tx.send(answer(body)).await;
                return Err(SessionEnd::Protocol("request before hello"));
            }
            RequestBody::Produce(req) => {
                // Submitted here, in frame order; acked in a task.
                let sizes: Vec<u64> = req
                    .partitions
                    .iter()
                    .map(|p| p.batch.len() as u64)
                    .collect();
                let pending = handler::produce_submit(ctx, req).await;
                let tx = tx.clone();
                let ctx2 = ctx.clone();
                ctx.executor
                    .spawn(async move {
                        let body = handler::produce_complete(&ctx2, pending).await;
                        if let ResponseBody::Produce(r) = &body {
                            for (p, bytes) in r.partitions.iter().zip(sizes) {
                                if p.error.is_none() {
                                    // Records written, not duplicates answered
                                    // from the producer table.
                                    let records = (p.last_offset - p.base_offset + 1)
                                        .saturating_sub(u64::from(p.duplicate_records));
                                    if records > 0 {
                                        ctx2.metrics.record_produce(&p.topic, records, bytes);
                                    }
                                }
                            }
                        }
                        let _ = tx.send(answer(body)).await;
                    })
                    .detach();
            }
            body => {
                let ctx2 = ctx.clone();
                let tx = tx.clone();
                ctx.executor
                    .spawn(async move {
                        let ctx = ctx2;
                        let body = dispatch(&ctx, body).await;
                        let _ = tx.send(answer(body)).await;
                    })
                    .detach();
            }
        }
        buf.copy_within(n..filled, 0);
        filled -= n;
        if shrink.after_frame(buf.len(), n, filled) {
            buf.truncate(READ_BUFFER_BYTES_MIN);
            buf.shrink_to_fit();
        }
    }
}

async fn dispatch(ctx: &Ctx, body: RequestBody) -> ResponseBody {
    match body {
        RequestBody::Metadata(r) => handler::metadata(ctx, r),
        RequestBody::CreateTopic(r) => handler::create_topic(ctx, r).await,
        RequestBody::DescribeTopic(r) => handler::describe_topic(ctx, &r.name),
        RequestBody::ListTopics(_) => handler::list_topics(ctx),
        RequestBody::DeleteTopic(r) => handler::delete_topic(ctx, &r.name).await,
        RequestBody::Fetch(r) => handler::fetch(ctx, r).await,
        RequestBody::ListOffsets(r) => handler::list_offsets(ctx, r).await,
        RequestBody::InitProducer(r) => handler::init_producer(ctx, r).await,
        RequestBody::Hello(_) | RequestBody::Produce(_) => {
            unreachable!("handled by the reader")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FetchPartitionResult, FetchResponse, SPLICE_MIN_BYTES};

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

    fn fetch(id: u32, sizes: &[usize]) -> Response {
        Response {
            correlation_id: id,
            body: ResponseBody::Fetch(FetchResponse {
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
            let mut out = Outgoing::default();
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
}
