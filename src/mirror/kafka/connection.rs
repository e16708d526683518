//! One connection to one broker: TCP or TLS, ApiVersions and SASL at the
//! start, then pipelined requests matched to answers by correlation id.
//!
//! Writers take turns on the socket under an async lock, so requests go
//! out in the order their senders got the lock; a reader task takes each
//! answer off the socket and hands it to the waiter registered under its
//! correlation id. Every request has a deadline. When one passes, or the
//! socket fails, the connection is closed and every request still waiting
//! gets [`KafkaError::OutcomeUnknown`]: an answer that comes late must not
//! be mistaken for another request's, and the broker may have acted on any
//! of them. A request that finds the connection closed before it is written
//! gets [`KafkaError::NotSent`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use kafka_protocol::messages::{
    ApiVersionsRequest, ApiVersionsResponse, SaslAuthenticateRequest, SaslHandshakeRequest,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use smol::net::TcpStream;

use super::error::{ConnectError, ErrorCode, KafkaError, LinkError};
use super::sasl::{SaslConfig, SaslSession};
use super::tls::Tls;
use super::wire::{self, Api};

/// Request bodies up to this size are copied behind their header and
/// written at once; larger ones are written after it, uncopied.
const COALESCE_BYTES_MAX: usize = 64 * 1024;

/// What a connection needs to know from the client's configuration.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionConfig {
    pub(crate) client_id: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_response_bytes: usize,
    pub(crate) tls: Option<Tls>,
    pub(crate) sasl: Option<SaslConfig>,
}

/// The socket: plain TCP or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_close(cx),
            Self::Tls(s) => Pin::new(s).poll_close(cx),
        }
    }
}

/// Waiters and the connection's fate, shared with the reader task.
struct Shared {
    state: Mutex<Waiters>,
}

struct Waiters {
    /// Correlation id → the channel its answer goes to.
    by_id: HashMap<i32, async_channel::Sender<Bytes>>,
    /// Set once, when the connection ends; later requests are not sent.
    closed: Option<LinkError>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // A panic while holding this lock leaves only plain data behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the connection for everyone: waiting requests see their
    /// channel close and report `cause`.
    fn fail(&self, cause: LinkError) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(cause);
        }
        state.by_id.clear();
    }

    fn closed(&self) -> Option<LinkError> {
        self.lock().closed.clone()
    }
}

struct Writer {
    half: Option<WriteHalf<Stream>>,
    next_correlation_id: i32,
}

/// A connection to one broker. Cheap to share (`Arc`); closed on drop.
pub(crate) struct Connection {
    addr: String,
    client_id: String,
    request_timeout: Duration,
    writer: smol::lock::Mutex<Writer>,
    shared: Arc<Shared>,
    reader: Mutex<Option<smol::Task<()>>>,
    /// API key → the broker's (min, max) versions, from ApiVersions.
    versions: OnceLock<HashMap<i16, (i16, i16)>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `addr` (`host:port`), runs the TLS handshake, ApiVersions
    /// and SASL if configured.
    pub(crate) async fn connect(
        addr: &str,
        config: &ConnectionConfig,
    ) -> Result<Arc<Self>, KafkaError> {
        let connect_error = |cause| KafkaError::Connect {
            addr: addr.to_owned(),
            cause,
        };
        let tcp = with_timeout(config.connect_timeout, crate::sockets::connect_tcp(addr))
            .await
            .ok_or_else(|| connect_error(ConnectError::Timeout))?
            .map_err(|e| connect_error(ConnectError::Io(Arc::new(e))))?;
        // Requests are written whole; Nagle would only delay them.
        tcp.set_nodelay(true)
            .map_err(|e| connect_error(ConnectError::Io(Arc::new(e))))?;
        let stream = match &config.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let host = host_of(addr);
                let name = tls.server_name_for(host)?;
                let connector = futures_rustls::TlsConnector::from(tls.config.clone());
                let handshake = with_timeout(config.connect_timeout, connector.connect(name, tcp))
                    .await
                    .ok_or_else(|| connect_error(ConnectError::Timeout))?
                    .map_err(|e| connect_error(ConnectError::Tls(Arc::new(e))))?;
                Stream::Tls(Box::new(handshake))
            }
        };
        let (read_half, write_half) = futures_lite::io::split(stream);
        let shared = Arc::new(Shared {
            state: Mutex::new(Waiters {
                by_id: HashMap::new(),
                closed: None,
            }),
        });
        let reader = smol::spawn(read_loop(
            read_half,
            shared.clone(),
            config.max_response_bytes,
        ));
        let conn = Arc::new(Self {
            addr: addr.to_owned(),
            client_id: config.client_id.clone(),
            request_timeout: config.request_timeout,
            writer: smol::lock::Mutex::new(Writer {
                half: Some(write_half),
                next_correlation_id: 0,
            }),
            shared,
            reader: Mutex::new(Some(reader)),
            versions: OnceLock::new(),
        });
        let handshake_error = |e: KafkaError| match e {
            KafkaError::OutcomeUnknown { cause, .. } | KafkaError::NotSent { cause, .. } => {
                connect_error(ConnectError::Handshake(cause))
            }
            other => other,
        };
        let versions = conn.api_versions().await.map_err(handshake_error)?;
        let _ = conn.versions.set(versions);
        if let Some(sasl) = &config.sasl {
            conn.authenticate(sasl).await.map_err(handshake_error)?;
        }
        Ok(conn)
    }

    /// Whether the connection has ended (requests on it fail at once).
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed().is_some()
    }

    /// The version to use for `R`: the highest both sides implement.
    pub(crate) fn version<R: Api>(&self) -> Result<i16, KafkaError> {
        let broker = self.versions.get().and_then(|v| v.get(&R::KEY)).copied();
        broker
            .and_then(|b| wire::negotiate(R::OURS, b))
            .ok_or(KafkaError::UnsupportedVersion {
                api: R::NAME,
                broker,
                ours: R::OURS,
            })
    }

    /// Sends `request` at the negotiated version and waits for its answer.
    pub(crate) async fn request<R: Api>(
        self: &Arc<Self>,
        request: &R,
    ) -> Result<R::Response, KafkaError> {
        self.send(request).await?.wait().await
    }

    /// Writes `request` and returns at once; the answer is awaited with
    /// [`InFlight::wait`]. Requests sent one after another on a connection
    /// are written in that order.
    pub(crate) async fn send<R: Api>(
        self: &Arc<Self>,
        request: &R,
    ) -> Result<InFlight<R>, KafkaError> {
        let version = self.version::<R>()?;
        self.send_at(request, version).await
    }

    async fn send_at<R: Api>(
        self: &Arc<Self>,
        request: &R,
        version: i16,
    ) -> Result<InFlight<R>, KafkaError> {
        let outgoing = wire::encode_body(request, version)?;
        Ok(InFlight {
            raw: self.send_raw(outgoing).await?,
            _request: PhantomData,
        })
    }

    /// The part of a send that does not depend on the request's type.
    async fn send_raw(
        self: &Arc<Self>,
        outgoing: wire::Outgoing,
    ) -> Result<RawInFlight, KafkaError> {
        let api = outgoing.api;
        let deadline = Instant::now() + self.request_timeout;
        let (tx, rx) = async_channel::bounded(1);
        let mut writer = self.writer.lock().await;
        let correlation_id = writer.next_correlation_id;
        // Negative ids are legal but confuse people reading a capture.
        writer.next_correlation_id = correlation_id.checked_add(1).unwrap_or(0);
        let mut header = outgoing.header(correlation_id, &self.client_id)?;
        {
            let mut state = self.shared.lock();
            if let Some(cause) = &state.closed {
                return Err(KafkaError::NotSent {
                    api,
                    cause: cause.clone(),
                });
            }
            state.by_id.insert(correlation_id, tx);
        }
        let Some(half) = writer.half.as_mut() else {
            return Err(KafkaError::NotSent {
                api,
                cause: LinkError::Closed,
            });
        };
        // Small requests go out in one write; a large body is not copied.
        let body = if outgoing.body.len() <= COALESCE_BYTES_MAX {
            header.extend_from_slice(&outgoing.body);
            None
        } else {
            Some(&outgoing.body)
        };
        let write = async {
            half.write_all(&header).await?;
            if let Some(body) = body {
                half.write_all(body).await?;
            }
            half.flush().await
        };
        let outcome = match with_timeout_until(deadline, write).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(LinkError::Io(Arc::new(e))),
            None => Err(LinkError::Timeout),
        };
        if let Err(cause) = outcome {
            // Some of the frame may be out: the broker may act on it.
            drop(writer);
            self.close(cause.clone());
            return Err(KafkaError::OutcomeUnknown { api, cause });
        }
        if self.shared.closed().is_some() {
            writer.half = None;
        }
        Ok(RawInFlight {
            rx,
            api,
            version: outgoing.version,
            deadline,
            conn: self.clone(),
        })
    }

    /// Closes the connection: stops the reader, drops the socket (unless a
    /// writer holds it; that writer drops it when done) and fails every
    /// waiting request with `cause`.
    pub(crate) fn close(&self, cause: LinkError) {
        self.shared.fail(cause);
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(reader); // cancels the task, dropping the read half
        if let Some(mut writer) = self.writer.try_lock() {
            writer.half = None;
        }
    }

    /// ApiVersions at v3 (KIP-511), or at v0 for a broker that answers v3
    /// with its v0 error form.
    async fn api_versions(self: &Arc<Self>) -> Result<HashMap<i16, (i16, i16)>, KafkaError> {
        let mut request = ApiVersionsRequest::default();
        request.client_software_name = StrBytes::from_static_str("skiff");
        request.client_software_version = StrBytes::from_static_str(env!("CARGO_PKG_VERSION"));
        let version = ApiVersionsRequest::OURS.1;
        let in_flight = self.send_at(&request, version).await?;
        let body = in_flight.raw.wait().await?;
        let response =
            wire::decode_response::<ApiVersionsRequest>(body.clone(), version).or_else(|e| {
                // A broker that lacks v3 answers in v0's layout (KIP-511).
                let mut rest = body.slice(4..);
                ApiVersionsResponse::decode(&mut rest, 0).map_err(|_| e)
            })?;
        if response.error_code == ErrorCode::UNSUPPORTED_VERSION.0 && !response.api_keys.is_empty()
        {
            let broker_max = response
                .api_keys
                .iter()
                .find(|k| k.api_key == <ApiVersionsRequest as Api>::KEY)
                .map(|k| k.max_version)
                .unwrap_or(0);
            let version = broker_max.min(version);
            let in_flight = self.send_at(&request, version).await?;
            let response = in_flight.wait().await?;
            KafkaError::check("ApiVersions", response.error_code, None)?;
            return Ok(version_table(&response));
        }
        KafkaError::check("ApiVersions", response.error_code, None)?;
        Ok(version_table(&response))
    }

    /// SaslHandshake, then SaslAuthenticate until the mechanism is done.
    async fn authenticate(self: &Arc<Self>, config: &SaslConfig) -> Result<(), KafkaError> {
        let mut handshake = SaslHandshakeRequest::default();
        handshake.mechanism = StrBytes::from_static_str(config.mechanism.name());
        // A broker without the mechanism should answer
        // UNSUPPORTED_SASL_MECHANISM; some (Tansu 0.6) close the connection
        // instead, which would otherwise read as a plain network failure.
        let response = self.request(&handshake).await.map_err(|e| match e {
            KafkaError::OutcomeUnknown { cause, .. } | KafkaError::NotSent { cause, .. } => {
                KafkaError::Connect {
                    addr: self.addr.clone(),
                    cause: ConnectError::SaslHandshake {
                        mechanism: config.mechanism.name(),
                        cause,
                    },
                }
            }
            other => other,
        })?;
        if response.error_code != 0 {
            let offered: Vec<&str> = response.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(KafkaError::Auth {
                code: ErrorCode(response.error_code),
                message: Some(format!(
                    "{} requested, the broker offers {}",
                    config.mechanism.name(),
                    offered.join(", ")
                )),
            });
        }
        let mut session = SaslSession::start(config)?;
        let mut server: Option<Bytes> = None;
        while let Some(message) = session.step(server.as_deref())? {
            let mut request = SaslAuthenticateRequest::default();
            request.auth_bytes = Bytes::from(message);
            let response = self.request(&request).await?;
            if response.error_code != 0 {
                return Err(KafkaError::Auth {
                    code: ErrorCode(response.error_code),
                    message: response.error_message.map(|m| m.to_string()),
                });
            }
            server = Some(response.auth_bytes);
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.fail(LinkError::Closed);
    }
}

/// A request on the wire, waiting for its answer.
pub(crate) struct InFlight<R: Api> {
    raw: RawInFlight,
    _request: PhantomData<fn() -> R>,
}

impl<R: Api> InFlight<R> {
    /// The decoded answer.
    pub(crate) async fn wait(self) -> Result<R::Response, KafkaError> {
        let version = self.raw.version;
        let body = self.raw.wait().await?;
        Ok(wire::decode_response::<R>(body, version)?)
    }
}

/// [`InFlight`] without the answer's type: one copy of the waiting code
/// for every API.
struct RawInFlight {
    rx: async_channel::Receiver<Bytes>,
    api: &'static str,
    version: i16,
    deadline: Instant,
    conn: Arc<Connection>,
}

impl RawInFlight {
    async fn wait(self) -> Result<Bytes, KafkaError> {
        match with_timeout_until(self.deadline, self.rx.recv()).await {
            Some(Ok(body)) => Ok(body),
            Some(Err(_)) => Err(KafkaError::OutcomeUnknown {
                api: self.api,
                cause: self.conn.shared.closed().unwrap_or(LinkError::Closed),
            }),
            None => {
                // A late answer must not be read as another's: close.
                self.conn.close(LinkError::Timeout);
                Err(KafkaError::OutcomeUnknown {
                    api: self.api,
                    cause: LinkError::Timeout,
                })
            }
        }
    }
}

/// Takes answers off the socket until it fails, handing each to its waiter.
async fn read_loop(mut half: ReadHalf<Stream>, shared: Arc<Shared>, max_response_bytes: usize) {
    let cause = loop {
        let mut prefix = [0u8; wire::LENGTH_BYTES];
        if let Err(e) = half.read_exact(&mut prefix).await {
            break link_error(e);
        }
        let length = match wire::frame_length(prefix, max_response_bytes) {
            Ok(length) => length,
            Err(e) => {
                break LinkError::Io(Arc::new(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e.to_string(),
                )))
            }
        };
        let mut body = vec![0u8; length];
        if let Err(e) = half.read_exact(&mut body).await {
            break link_error(e);
        }
        let Some(id) = wire::correlation_id(&body) else {
            break LinkError::Io(Arc::new(io::Error::new(
                io::ErrorKind::InvalidData,
                "response shorter than its correlation id",
            )));
        };
        let waiter = shared.lock().by_id.remove(&id);
        match waiter {
            // The waiter may have given up (its future dropped): fine.
            Some(tx) => {
                let _ = tx.try_send(Bytes::from(body));
            }
            None => {
                break LinkError::Io(Arc::new(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("answer with unknown correlation id {id}"),
                )))
            }
        }
    };
    shared.fail(cause);
}

fn link_error(e: io::Error) -> LinkError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        LinkError::Closed
    } else {
        LinkError::Io(Arc::new(e))
    }
}

fn version_table(response: &ApiVersionsResponse) -> HashMap<i16, (i16, i16)> {
    response
        .api_keys
        .iter()
        .map(|k| (k.api_key, (k.min_version, k.max_version)))
        .collect()
}

/// The host part of `host:port` (IPv6 literals keep their brackets).
pub(crate) fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

async fn with_timeout<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    with_timeout_until(Instant::now() + limit, fut).await
}

async fn with_timeout_until<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        smol::Timer::at(deadline).await;
        None
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_out_of_addresses() {
        assert_eq!(host_of("kafka-1.local:9093"), "kafka-1.local");
        assert_eq!(host_of("127.0.0.1:9092"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9092"), "[::1]");
    }
}
