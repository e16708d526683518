//! The client's error type.

use std::sync::Arc;

use crate::batch::BatchError;
use crate::protocol::{ErrorCode, FrameError};

use super::tls::TlsConfigError;

/// Why a client call failed. Cloneable, because one failure (a lost
/// connection, a failed batch) is delivered to every waiter it affects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting, reading or writing failed. The request's outcome is
    /// unknown: a produce may have been written.
    Io(Arc<std::io::Error>),
    /// The server sent bytes that are not a valid frame; the connection is
    /// closed.
    Protocol(FrameError),
    /// The server answered with an error code.
    Server { code: ErrorCode, message: String },
    /// The server answered with another operation than the one asked, or a
    /// result list that does not match the request's entries.
    UnexpectedResponse {
        expected: &'static str,
        got: &'static str,
    },
    /// Fetched bytes are not valid record batches.
    Batch(BatchError),
    /// No answer in time. The outcome is unknown, as with [`Self::Io`].
    Timeout,
    /// A record's delivery timeout (`after`) ran out while its batch
    /// waited to be retried after `last`, a retriable failure: the record
    /// was not written.
    GaveUp {
        after: std::time::Duration,
        last: Arc<ClientError>,
    },
    /// A group member's join did not settle into a generation within
    /// `after` (its retry timeout plus its rebalance timeout): the broker
    /// kept answering with retriable errors (`last`), kept fencing it, or
    /// kept starting new rebalances (`last` is None). Polling again tries
    /// anew.
    GroupUnsettled {
        group: String,
        after: std::time::Duration,
        last: Option<Arc<ClientError>>,
    },
    /// The connection closed while the request was in flight or queued.
    Disconnected,
    /// The address is neither `host:port` nor a Unix socket path.
    InvalidAddress(String),
    /// A request frame above the server's `max_frame_bytes`.
    RequestTooLarge { len: usize, max: u32 },
    /// A single record that cannot fit a batch of the server's
    /// `max_batch_bytes`.
    RecordTooLarge { len: usize, max: usize },
    /// The producer's buffer is full; retry after deliveries complete, or
    /// use `send_wait`.
    BufferFull { buffered_bytes: usize, max: usize },
    /// The producer or consumer was closed.
    Closed,
    /// The TLS options cannot be used: a file, the key, the server name.
    TlsConfig(Arc<TlsConfigError>),
    /// The server answered hello with TLS: this is a TLS port, and the
    /// client connected without TLS options.
    ServerSpeaksTls,
}

impl ClientError {
    /// Whether retrying the same request later may succeed: connection
    /// loss, timeouts, and server codes that say so. A TLS refusal (a
    /// certificate either side will not accept, a fatal alert) is not: it
    /// stays until the configuration changes.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Io(e) => !is_tls_refusal(e),
            Self::Timeout | Self::Disconnected | Self::GaveUp { .. } => true,
            Self::Server { code, .. } => code.is_retriable(),
            _ => false,
        }
    }

    /// The server's error code, when the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn tls_config(e: TlsConfigError) -> Self {
        Self::TlsConfig(Arc::new(e))
    }

    pub(crate) fn server(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Server {
            code,
            message: message.into(),
        }
    }
}

/// Whether an I/O error is rustls refusing the session (which
/// futures-rustls hands over as an `InvalidData` error wrapping it),
/// rather than the connection failing.
pub(crate) fn is_tls_refusal(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

/// The message for a topic's or partition's error code when the answer
/// carries none, worded as the broker words its own, so an unknown topic
/// reads the same whichever request found it.
pub(crate) fn about(code: ErrorCode, topic: &str, partition: Option<u32>) -> String {
    match (code, partition) {
        (ErrorCode::UnknownTopic, _) => format!("unknown topic '{topic}'"),
        (ErrorCode::NotAuthorized, _) => {
            format!("this connection's identity is not authorized for topic '{topic}'")
        }
        (ErrorCode::UnknownPartition, Some(p)) => format!("topic '{topic}' has no partition {p}"),
        (_, Some(p)) => format!("topic '{topic}' partition {p}"),
        (_, None) => format!("topic '{topic}'"),
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
            Self::Server { code, message } if message.is_empty() => {
                write!(f, "server error {code}")
            }
            Self::Server { code, message } => write!(f, "server error {code}: {message}"),
            Self::UnexpectedResponse { expected, got } => {
                write!(f, "unexpected response: expected {expected}, got {got}")
            }
            Self::Batch(e) => write!(f, "bad fetched data: {e}"),
            Self::Timeout => f.write_str("timed out"),
            Self::GaveUp { after, last } => write!(
                f,
                "timed out after {} s; last error: {last}",
                after.as_secs_f64()
            ),
            Self::GroupUnsettled { group, after, last } => {
                write!(
                    f,
                    "group '{group}' did not settle within {} s; ",
                    after.as_secs_f64()
                )?;
                match last {
                    Some(last) => write!(f, "last error: {last}"),
                    None => f.write_str("the broker kept starting new rebalances"),
                }
            }
            Self::Disconnected => f.write_str("connection lost"),
            Self::InvalidAddress(a) => write!(
                f,
                "invalid address {a:?}: use host:port or a Unix socket path"
            ),
            Self::RequestTooLarge { len, max } => {
                write!(
                    f,
                    "request of {len} bytes is above the server's limit of {max}"
                )
            }
            Self::RecordTooLarge { len, max } => write!(
                f,
                "record of about {len} bytes does not fit a batch of {max} bytes"
            ),
            Self::BufferFull {
                buffered_bytes,
                max,
            } => write!(f, "producer buffer full ({buffered_bytes} of {max} bytes)"),
            Self::Closed => f.write_str("closed"),
            Self::TlsConfig(e) => write!(f, "TLS: {e}"),
            Self::ServerSpeaksTls => f.write_str(
                "the server speaks TLS on this port: connect with --tls-ca (and --tls-cert, --tls-key if it wants a client certificate)",
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(&**e),
            Self::Protocol(e) => Some(e),
            Self::Batch(e) => Some(e),
            Self::TlsConfig(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        Self::Protocol(e)
    }
}

impl From<BatchError> for ClientError {
    fn from(e: BatchError) -> Self {
        Self::Batch(e)
    }
}
