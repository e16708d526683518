//! `skiff bench produce --devices`: each producer a device speaking skiff's
//! protocol directly on a connection of its own, one record per produce
//! request, the next once the last is answered, as a sensor's small client
//! would. The client library's producer (batching, retries, a sender task,
//! a connection's reader, writer and watchdog tasks) cost the bench 16 to
//! 20 µs of CPU per record at a thousand producers, more than the broker,
//! on the same two cores: a fan-in measured with it measured the bench.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_lite::io::BufReader;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::batch::{BatchBuilder, ProducerStamp};
use crate::client::{unexpected, Address, ClientError};
use crate::protocol::{
    body_len, decode_response, encode_request_body, frame_len, HelloRequest, InitProducerRequest,
    ProducePartition, ProduceRequest, RequestBody, ResponseBody, FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use crate::sockets::SocketReads;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A device's socket: requests written straight to it, answers read
/// through a small buffer over [`SocketReads`]. An answer then costs one
/// `recv` once the reactor reports it (reading its header and its body
/// apart cost two, and a first read that found nothing a third), as a
/// sensor's client with a receive buffer would read it.
struct Answers<T, W> {
    reads: BufReader<SocketReads<T>>,
    writes: W,
}

/// An answer to one record is about 40 B: room for several.
const ANSWER_READ_BYTES: usize = 512;

impl<T, W> Answers<T, W>
where
    for<'a> &'a T: std::io::Read,
{
    fn new(io: Arc<smol::Async<T>>, writes: W) -> Self {
        Answers {
            reads: BufReader::with_capacity(ANSWER_READ_BYTES, SocketReads::new(io)),
            writes,
        }
    }
}

impl<T, W: Unpin> AsyncRead for Answers<T, W>
where
    for<'a> &'a T: std::io::Read,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().reads).poll_read(cx, buf)
    }
}

impl<T, W: AsyncWrite + Unpin> AsyncWrite for Answers<T, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().writes).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().writes).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().writes).poll_close(cx)
    }
}

/// One device's connection, said hello on, with its producer id when
/// idempotent.
pub(super) struct Device {
    stream: Box<dyn Io>,
    /// The socket's own descriptor, for [`drive`].
    fd: OwnedFd,
    stamp: ProducerStamp,
    idempotent: bool,
    correlation_id: u32,
    batch: BatchBuilder,
    frame: Vec<u8>,
    answer: Vec<u8>,
}

impl Device {
    /// Connects over plain TCP or the Unix socket, says hello, and takes a
    /// producer id when `idempotent`.
    pub(super) async fn connect(addr: &str, idempotent: bool) -> Result<Device, ClientError> {
        let (fd, stream): (OwnedFd, Box<dyn Io>) = match Address::parse(addr)? {
            Address::Tcp(a) => {
                let s = crate::sockets::connect_tcp(&a).await?;
                s.set_nodelay(true)?;
                (
                    s.as_fd().try_clone_to_owned()?,
                    Box::new(Answers::new(s.clone().into(), s)),
                )
            }
            Address::Unix(p) => {
                let s = crate::sockets::connect_unix(p.as_ref()).await?;
                (
                    s.as_fd().try_clone_to_owned()?,
                    Box::new(Answers::new(s.clone().into(), s)),
                )
            }
        };
        let mut d = Device {
            stream,
            fd,
            stamp: ProducerStamp::NONE,
            idempotent,
            correlation_id: 0,
            batch: BatchBuilder::new(),
            frame: Vec::new(),
            answer: Vec::new(),
        };
        let hello = RequestBody::Hello(HelloRequest {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            client_name: Some("skiff bench device".into()),
        });
        match d.call(hello).await? {
            ResponseBody::Hello(_) => {}
            other => return Err(unexpected("hello", &other)),
        }
        if idempotent {
            let init = RequestBody::InitProducer(InitProducerRequest::default());
            match d.call(init).await? {
                ResponseBody::InitProducer(r) => {
                    d.stamp = ProducerStamp {
                        producer_id: r.producer_id,
                        producer_epoch: r.producer_epoch,
                        base_sequence: 0,
                    }
                }
                other => return Err(unexpected("init_producer", &other)),
            }
        }
        Ok(d)
    }

    /// One request and its answer; a server error answer is an error.
    async fn call(&mut self, body: RequestBody<'_>) -> Result<ResponseBody, ClientError> {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let id = self.correlation_id;
        exchange(
            &mut self.stream,
            id,
            &body,
            &mut self.frame,
            &mut self.answer,
        )
        .await
    }
}

/// Sends one request on `stream` and reads its answer, into buffers kept
/// for the next; a server error answer is an error.
pub(super) async fn exchange<S>(
    stream: &mut S,
    correlation_id: u32,
    body: &RequestBody<'_>,
    frame: &mut Vec<u8>,
    answer: &mut Vec<u8>,
) -> Result<ResponseBody, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    frame.clear();
    encode_request_body(correlation_id, body, frame).map_err(ClientError::Protocol)?;
    stream.write_all(frame).await?;
    stream.flush().await?;
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream.read_exact(&mut header).await?;
    frame_len(&header, FRAME_BYTES_MAX).map_err(ClientError::Protocol)?;
    answer.resize(body_len(header) as usize, 0);
    stream.read_exact(answer).await?;
    answer_body(answer, correlation_id)
}

/// The body of the answer `frame_body` to request `correlation_id`; a
/// server error answer is an error.
fn answer_body(frame_body: &[u8], correlation_id: u32) -> Result<ResponseBody, ClientError> {
    let response = decode_response(frame_body).map_err(ClientError::Protocol)?;
    if response.correlation_id != correlation_id {
        return Err(ClientError::UnexpectedResponse {
            expected: "the answer to the request sent",
            got: "another correlation id",
        });
    }
    match response.body {
        ResponseBody::Error(e) => Err(ClientError::Server {
            code: e.code,
            message: e.message,
        }),
        body => Ok(body),
    }
}

/// One device in [`drive`]'s loop: its socket (a duplicate of the one it
/// said hello on), and the record it has on the wire.
struct Polled {
    fd: OwnedFd,
    /// Every record's value.
    value: Vec<u8>,
    stamp: ProducerStamp,
    idempotent: bool,
    correlation_id: u32,
    batch: BatchBuilder,
    /// The request being sent, and how much of it is written.
    frame: Vec<u8>,
    written: usize,
    /// The answer read so far.
    answer: Vec<u8>,
    filled: usize,
    /// When the record on the wire was sent (or was due, in an open loop).
    sent: Instant,
    /// Records sent so far, and in all.
    sent_count: u64,
    load: super::bench::Load,
    /// See [`DeviceLoad::due`].
    due: Option<Box<dyn Fn(u64) -> Instant + Send>>,
}

/// What one device of [`drive`] sends.
pub(super) struct DeviceLoad {
    pub load: super::bench::Load,
    /// When its records are due (an open loop); none: each as soon as the
    /// last is answered.
    pub due: Option<Box<dyn Fn(u64) -> Instant + Send>>,
}

/// Runs every device's records on this thread: one level-triggered poll
/// over all their sockets, a `write` per request and a `read` per answer.
/// A task per device on smol's executor cost the bench 5.4 to 9.3 µs of
/// CPU per record at 1,000 devices (its reactor and executor threads
/// handing each wake-up over), on the two cores the broker runs on too:
/// a fan-in measured with it measured the bench (docs/performance.md,
/// "Fan-in"). Latencies go into `hist`, and each answered record counts in
/// `done`.
pub(super) fn drive(
    devices: Vec<(Device, DeviceLoad)>,
    topic: &str,
    done: &std::sync::atomic::AtomicU64,
    hist: &std::sync::Mutex<hdrhistogram::Histogram<u64>>,
) -> Result<(), ClientError> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    let poller = polling::Poller::new()?;
    let mut ds = Vec::with_capacity(devices.len());
    for (d, load) in devices {
        // The async stream goes (and leaves smol's reactor); the socket
        // stays open through `fd`, non-blocking as smol left it.
        drop(d.stream);
        ds.push(Polled {
            fd: d.fd,
            value: vec![b'x'; load.load.size],
            due: load.due,
            stamp: d.stamp,
            idempotent: d.idempotent,
            correlation_id: d.correlation_id,
            batch: d.batch,
            frame: d.frame,
            written: 0,
            answer: vec![0; ANSWER_READ_BYTES],
            filled: 0,
            sent: Instant::now(),
            sent_count: 0,
            load: load.load,
        });
    }
    for (key, d) in ds.iter().enumerate() {
        // SAFETY: every fd is deleted from the poller below before `ds`,
        // which owns them, is dropped.
        unsafe {
            poller.add_with_mode(
                d.fd.as_raw_fd(),
                polling::Event::readable(key),
                polling::PollMode::Level,
            )?
        };
    }
    let result = (|| {
        let mut local = super::bench::histogram();
        let mut due = BinaryHeap::new();
        let mut active = 0usize;
        let now = Instant::now();
        for (i, d) in ds.iter_mut().enumerate() {
            if d.load.messages == 0 {
                continue;
            }
            active += 1;
            match &d.due {
                Some(at) => due.push(Reverse((at(0), i))),
                None => d.send(&poller, i, topic, now)?,
            }
        }
        let mut events = polling::Events::with_capacity(EVENTS);
        while active > 0 {
            let now = Instant::now();
            while let Some(&Reverse((at, i))) = due.peek() {
                if at > now {
                    break;
                }
                due.pop();
                // Its latency counts from when it was due.
                ds[i].send(&poller, i, topic, at)?;
            }
            let timeout = due
                .peek()
                .map(|&Reverse((at, _))| at.saturating_duration_since(now).max(OPEN_LOOP_TICK));
            events.clear();
            poller.wait(&mut events, timeout)?;
            for ev in events.iter() {
                let i = ev.key;
                let d = &mut ds[i];
                if ev.writable {
                    d.write_on(&poller, i)?;
                }
                if !ev.readable {
                    continue;
                }
                let Some(end) = d.read_answer()? else {
                    continue;
                };
                let acked = Instant::now();
                d.take_answer(end)?;
                let us = acked.duration_since(d.sent).as_micros() as u64;
                let _ = local.record(us.min(super::bench::LATENCY_US_MAX));
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if d.sent_count == d.load.messages {
                    active -= 1;
                    continue;
                }
                match &d.due {
                    // Counted from when it is due, however late it goes.
                    Some(at) => due.push(Reverse((at(d.sent_count), i))),
                    None => d.send(&poller, i, topic, acked)?,
                }
            }
        }
        hist.lock()
            .expect("latency histogram")
            .add(&local)
            .expect("same histogram bounds");
        Ok(())
    })();
    for d in &ds {
        let _ = poller.delete(d.fd.as_fd());
    }
    result
}

/// The open loop waits at least this long (see `bench::OPEN_LOOP_TICK`).
const OPEN_LOOP_TICK: std::time::Duration = std::time::Duration::from_micros(100);
/// Readiness events taken per wait.
const EVENTS: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(1024) {
    Some(n) => n,
    None => unreachable!(),
};

impl Polled {
    /// Builds the next record's request and writes it; what the socket
    /// does not take now is written when it can take more.
    fn send(
        &mut self,
        poller: &polling::Poller,
        key: usize,
        topic: &str,
        sent: Instant,
    ) -> Result<(), ClientError> {
        let i = self.sent_count;
        let mut k = Vec::new();
        let key_bytes = self.load.keys.map(|n| {
            use std::io::Write;
            let _ = write!(k, "k{}", i % n);
            &k[..]
        });
        self.batch
            .push(crate::batch::now_ms(), key_bytes, &self.value, &[]);
        let batch = self.batch.finish(self.stamp);
        let produce = RequestBody::Produce(ProduceRequest {
            partitions: vec![ProducePartition {
                topic: topic.to_owned(),
                partition: self.load.partition.unwrap_or(0),
                batch: batch[..].into(),
            }],
        });
        self.correlation_id = self.correlation_id.wrapping_add(1);
        self.frame.clear();
        encode_request_body(self.correlation_id, &produce, &mut self.frame)
            .map_err(ClientError::Protocol)?;
        self.written = 0;
        self.sent = sent;
        self.sent_count += 1;
        self.write_on(poller, key)
    }

    /// Writes what is left of the request; asks the poller for room when
    /// the socket is full, and stops asking once it is all written.
    fn write_on(&mut self, poller: &polling::Poller, key: usize) -> Result<(), ClientError> {
        let was_waiting = self.written > 0;
        while self.written < self.frame.len() {
            match rustix::io::write(&self.fd, &self.frame[self.written..]) {
                Ok(n) => self.written += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    poller.modify_with_mode(
                        &self.fd,
                        polling::Event::all(key),
                        polling::PollMode::Level,
                    )?;
                    return Ok(());
                }
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
        if was_waiting {
            poller.modify_with_mode(
                &self.fd,
                polling::Event::readable(key),
                polling::PollMode::Level,
            )?;
        }
        Ok(())
    }

    /// Reads what the socket has; where the answer ends once it is whole.
    fn read_answer(&mut self) -> Result<Option<usize>, ClientError> {
        if self.filled == self.answer.len() {
            let grown = self.answer.len() * 2;
            self.answer.resize(grown, 0);
        }
        match rustix::io::read(&self.fd, &mut self.answer[self.filled..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the broker closed a device's connection",
                )
                .into())
            }
            Ok(n) => self.filled += n,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        if self.filled < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let header: [u8; FRAME_HEADER_BYTES] = self.answer[..FRAME_HEADER_BYTES]
            .try_into()
            .expect("a header's bytes");
        frame_len(&header, FRAME_BYTES_MAX).map_err(ClientError::Protocol)?;
        let end = FRAME_HEADER_BYTES + body_len(header) as usize;
        if self.answer.len() < end {
            self.answer.resize(end, 0);
        }
        if self.filled < end {
            return Ok(None);
        }
        if self.filled > end {
            return Err(ClientError::UnexpectedResponse {
                expected: "one answer to the one request in flight",
                got: "more bytes after it",
            });
        }
        self.filled = 0;
        Ok(Some(end))
    }

    /// Checks the whole answer read (its body ends at `end`) as
    /// [`Device::send`] does, and moves the sequence on.
    fn take_answer(&mut self, end: usize) -> Result<(), ClientError> {
        let body = answer_body(&self.answer[FRAME_HEADER_BYTES..end], self.correlation_id)?;
        let result = match body {
            ResponseBody::Produce(mut p) if p.partitions.len() == 1 => p.partitions.remove(0),
            other => return Err(unexpected("produce", &other)),
        };
        if let Err(code) = result.offsets() {
            let message = result.message.unwrap_or_default();
            return Err(ClientError::Server { code, message });
        }
        if self.idempotent {
            self.stamp.base_sequence = self.stamp.base_sequence.checked_add(1).unwrap_or(0);
        }
        Ok(())
    }
}
