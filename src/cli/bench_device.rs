//! `skiff bench produce --devices`: each producer a device speaking skiff's
//! protocol directly on a connection of its own, one record per produce
//! request, the next once the last is answered, as a sensor's small client
//! would. The client library's producer (batching, retries, a sender task,
//! a connection's reader, writer and watchdog tasks) cost the bench 16 to
//! 20 µs of CPU per record at a thousand producers, more than the broker,
//! on the same two cores: a fan-in measured with it measured the bench.

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
        let stream: Box<dyn Io> = match Address::parse(addr)? {
            Address::Tcp(a) => {
                let s = crate::sockets::connect_tcp(&a).await?;
                s.set_nodelay(true)?;
                Box::new(Answers::new(s.clone().into(), s))
            }
            Address::Unix(p) => {
                let s = crate::sockets::connect_unix(p.as_ref()).await?;
                Box::new(Answers::new(s.clone().into(), s))
            }
        };
        let mut d = Device {
            stream,
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

    /// Sends one record in a batch of its own and waits for its answer;
    /// returns when it was answered.
    pub(super) async fn send(
        &mut self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Instant, ClientError> {
        self.batch.push(crate::batch::now_ms(), key, value, &[]);
        let batch = self.batch.finish(self.stamp);
        let produce = RequestBody::Produce(ProduceRequest {
            partitions: vec![ProducePartition {
                topic: topic.to_owned(),
                partition,
                batch: batch[..].into(),
            }],
        });
        let answer = self.call(produce).await?;
        let acked = Instant::now();
        let result = match answer {
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
        Ok(acked)
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
    let response = decode_response(answer).map_err(ClientError::Protocol)?;
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
