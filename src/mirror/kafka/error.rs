//! The Kafka client's error model.
//!
//! Three questions decide what a caller (the mirror) does with a failure,
//! and each has a method:
//!
//! - [`KafkaError::is_outcome_unknown`]: a request went out and its answer
//!   never came (timeout, connection lost mid-request). The broker may or
//!   may not have acted on it. A transactional caller re-initialises the
//!   producer, which aborts the open transaction; it never resends.
//! - [`KafkaError::is_fenced`]: another producer with the same
//!   transactional id (a newer epoch) has taken over. Nothing this producer
//!   does can succeed any more.
//! - [`KafkaError::is_retriable`]: the same call may succeed later as it
//!   is (the broker said so, or nothing was sent at all).

use std::fmt;
use std::io;
use std::sync::Arc;

use kafka_protocol::error::ResponseError;

/// A Kafka error code as the broker sent it, with its classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub i16);

impl ErrorCode {
    pub const UNKNOWN_SERVER_ERROR: Self = Self(-1);
    pub const OFFSET_OUT_OF_RANGE: Self = Self(1);
    pub const UNKNOWN_TOPIC_OR_PARTITION: Self = Self(3);
    pub const LEADER_NOT_AVAILABLE: Self = Self(5);
    pub const NOT_LEADER_OR_FOLLOWER: Self = Self(6);
    pub const REQUEST_TIMED_OUT: Self = Self(7);
    pub const COORDINATOR_LOAD_IN_PROGRESS: Self = Self(14);
    pub const COORDINATOR_NOT_AVAILABLE: Self = Self(15);
    pub const NOT_COORDINATOR: Self = Self(16);
    pub const UNSUPPORTED_SASL_MECHANISM: Self = Self(33);
    pub const UNSUPPORTED_VERSION: Self = Self(35);
    pub const TOPIC_ALREADY_EXISTS: Self = Self(36);
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: Self = Self(45);
    pub const DUPLICATE_SEQUENCE_NUMBER: Self = Self(46);
    pub const INVALID_PRODUCER_EPOCH: Self = Self(47);
    pub const INVALID_TXN_STATE: Self = Self(48);
    pub const CONCURRENT_TRANSACTIONS: Self = Self(51);
    pub const SASL_AUTHENTICATION_FAILED: Self = Self(58);
    pub const UNKNOWN_PRODUCER_ID: Self = Self(59);
    pub const FENCED_LEADER_EPOCH: Self = Self(74);
    pub const UNKNOWN_LEADER_EPOCH: Self = Self(75);
    pub const PRODUCER_FENCED: Self = Self(90);
    pub const TRANSACTION_ABORTABLE: Self = Self(120);

    /// Whether Kafka documents the error as retriable: the same request may
    /// succeed later (a leader election, a coordinator loading, ...).
    pub fn is_retriable(self) -> bool {
        self.known().is_some_and(|e| e.is_retriable())
            // Not flagged retriable in Kafka's table, but every client
            // retries them: the coordinator is finishing the previous
            // transaction, and a moment later the same call goes through.
            || self == Self::CONCURRENT_TRANSACTIONS
    }

    /// Whether the code says this producer was fenced by a newer one with
    /// the same transactional id (KIP-98; PRODUCER_FENCED since KIP-588).
    pub fn is_fenced(self) -> bool {
        self == Self::PRODUCER_FENCED || self == Self::INVALID_PRODUCER_EPOCH
    }

    /// Whether the metadata behind the request is stale: the partition's
    /// leader moved or the topic is not (yet) known. Refresh and retry.
    pub fn is_stale_metadata(self) -> bool {
        matches!(
            self,
            Self::UNKNOWN_TOPIC_OR_PARTITION
                | Self::LEADER_NOT_AVAILABLE
                | Self::NOT_LEADER_OR_FOLLOWER
                | Self::FENCED_LEADER_EPOCH
                | Self::UNKNOWN_LEADER_EPOCH
        )
    }

    /// Whether the request went to a broker that is not (or no longer) the
    /// coordinator: find the coordinator again and retry.
    pub fn is_stale_coordinator(self) -> bool {
        matches!(
            self,
            Self::NOT_COORDINATOR | Self::COORDINATOR_NOT_AVAILABLE
        )
    }

    fn known(self) -> Option<ResponseError> {
        match ResponseError::try_from_code(self.0) {
            Some(ResponseError::Unknown(_)) | None => None,
            known => known,
        }
    }
}

impl fmt::Display for ErrorCode {
    /// Kafka's own spelling, as in its protocol guide and broker logs:
    /// `NOT_LEADER_OR_FOLLOWER (6)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(known) = self.known() else {
            return write!(f, "error code {}", self.0);
        };
        // The crate names the variants in CamelCase (`NotLeaderOrFollower`).
        let camel = format!("{known:?}");
        for (i, c) in camel.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                f.write_str("_")?;
            }
            write!(f, "{}", c.to_ascii_uppercase())?;
        }
        write!(f, " ({})", self.0)
    }
}

/// Why a connection failed or ended, without a Kafka answer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LinkError {
    /// No answer within the request timeout.
    Timeout,
    /// The peer closed the connection.
    Closed,
    /// Reading or writing the socket failed.
    Io(Arc<io::Error>),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("no answer in time"),
            Self::Closed => f.write_str("the broker closed the connection"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Why a connection to one broker could not be set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ConnectError {
    /// Resolving or connecting the address failed (unknown host, refused).
    Io(Arc<io::Error>),
    /// No TCP connection within the connect timeout.
    Timeout,
    /// The TLS handshake failed (certificate not trusted, name mismatch).
    Tls(Arc<io::Error>),
    /// The connection closed or failed during ApiVersions or SASL.
    Handshake(LinkError),
    /// The connection closed or failed at the SaslHandshake request: a
    /// broker may close it when it lacks the mechanism, instead of
    /// answering UNSUPPORTED_SASL_MECHANISM.
    SaslHandshake {
        mechanism: &'static str,
        cause: LinkError,
    },
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Timeout => f.write_str("connect timed out"),
            Self::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Self::Handshake(e) => write!(f, "during the handshake: {e}"),
            Self::SaslHandshake { mechanism, cause } => write!(
                f,
                "at the SASL handshake for {mechanism}: {cause} (a broker that does not \
                 offer {mechanism} may do that: check mirror.sasl.mechanism)"
            ),
        }
    }
}

/// A malformed or unexpected answer: the connection is not trusted after it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A response frame longer than `max_response_bytes`.
    FrameTooLarge { len: usize, max: usize },
    /// A negative frame length.
    NegativeLength(i32),
    /// The response body could not be decoded at the negotiated version.
    Decode { api: &'static str, version: i16 },
    /// A request that could not be encoded at the negotiated version.
    Encode { api: &'static str, version: i16 },
    /// The answer lacks the entry for a partition, topic or coordinator
    /// that the request asked about.
    MissingEntry { api: &'static str },
    /// A SASL exchange the broker did not follow (bad SCRAM message).
    Sasl(&'static str),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FrameTooLarge { len, max } => {
                write!(f, "response of {len} bytes exceeds the {max} byte limit")
            }
            Self::NegativeLength(n) => write!(f, "negative response length {n}"),
            Self::Decode { api, version } => write!(f, "undecodable {api} v{version} response"),
            Self::Encode { api, version } => write!(f, "cannot encode {api} v{version} request"),
            Self::MissingEntry { api } => write!(f, "{api} response lacks a requested entry"),
            Self::Sasl(what) => write!(f, "SASL exchange: {what}"),
        }
    }
}

/// A bad client configuration, found before anything is sent.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ConfigError {
    /// The bootstrap list is empty or an entry is not `host:port`.
    Bootstrap(String),
    /// A CA, certificate or key file could not be read or holds no usable
    /// PEM item.
    TlsFile {
        path: std::path::PathBuf,
        cause: Arc<io::Error>,
    },
    /// rustls refused the certificate or key.
    Tls(rustls::Error),
    /// No trusted roots: the CA file or the system store is empty.
    NoRoots,
    /// The server name for certificate checks is not a valid DNS name or IP.
    ServerName(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bootstrap(entry) => write!(f, "bad bootstrap server {entry:?} (want host:port)"),
            Self::TlsFile { path, cause } => write!(f, "{}: {cause}", path.display()),
            Self::Tls(e) => write!(f, "TLS configuration: {e}"),
            Self::NoRoots => f.write_str("no trusted CA certificates found"),
            Self::ServerName(name) => write!(f, "{name:?} is not a valid TLS server name"),
        }
    }
}

/// Why a Kafka call failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum KafkaError {
    /// The broker answered with an error code (other than fencing).
    Broker {
        api: &'static str,
        code: ErrorCode,
        message: Option<String>,
    },
    /// The producer was fenced: another producer initialised the same
    /// transactional id with a newer epoch. Final for this producer.
    Fenced { api: &'static str, code: ErrorCode },
    /// The request was sent and its answer never came; whether the broker
    /// acted on it is unknown. Re-initialise, never resend.
    OutcomeUnknown { api: &'static str, cause: LinkError },
    /// The connection was already gone when the request was to be written:
    /// nothing was sent, retrying is safe.
    NotSent { api: &'static str, cause: LinkError },
    /// No broker could be reached: the last address tried and why.
    Connect { addr: String, cause: ConnectError },
    /// SASL authentication was refused, or no mechanism in common.
    Auth {
        code: ErrorCode,
        message: Option<String>,
    },
    /// The broker supports no version of an API in the range this client
    /// implements.
    UnsupportedVersion {
        api: &'static str,
        broker: Option<(i16, i16)>,
        ours: (i16, i16),
    },
    /// A malformed answer.
    Protocol(ProtocolError),
    /// Record batch bytes that cannot be encoded or decoded.
    Records(super::records::RecordsError),
    /// A bad configuration.
    Config(ConfigError),
    /// A producer call in the wrong state (see the variant's text).
    State(StateError),
}

/// Producer calls made in the wrong order or after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateError {
    /// `init` has not succeeded yet, or a fencing, an unknown outcome or a
    /// fatal sequence error requires it again.
    NeedsInit,
    /// A transactional call on an idempotent-only producer.
    NotTransactional,
    /// `begin` while a transaction is open.
    TransactionOpen,
    /// A send, commit or abort with no transaction open.
    NoTransaction,
    /// A produce in the transaction failed: only `abort` (or `init`) is
    /// allowed now.
    AbortRequired,
    /// `commit` while sends of the transaction are still unanswered.
    SendsInFlight,
    /// An empty batch.
    EmptyBatch,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NeedsInit => "the producer must be (re-)initialised",
            Self::NotTransactional => "the producer has no transactional id",
            Self::TransactionOpen => "a transaction is already open",
            Self::NoTransaction => "no transaction is open",
            Self::AbortRequired => "a send in this transaction failed: abort it",
            Self::SendsInFlight => "sends of this transaction are still in flight",
            Self::EmptyBatch => "a batch needs at least one record",
        })
    }
}

impl KafkaError {
    /// The request may or may not have taken effect (see the module doc).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown { .. })
    }

    /// This producer has been fenced by a newer one.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::Fenced { .. })
    }

    /// The same call may succeed later as it is.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Broker { code, .. } => code.is_retriable(),
            Self::NotSent { .. } | Self::Connect { .. } => true,
            _ => false,
        }
    }

    /// The broker's error code, when it sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Broker { code, .. } | Self::Fenced { code, .. } | Self::Auth { code, .. } => {
                Some(*code)
            }
            _ => None,
        }
    }

    /// Classifies a broker's error code for `api`: fencing codes become
    /// [`Self::Fenced`], the rest [`Self::Broker`].
    pub(crate) fn from_code(api: &'static str, code: i16, message: Option<&str>) -> Self {
        let code = ErrorCode(code);
        if code.is_fenced() {
            Self::Fenced { api, code }
        } else {
            Self::Broker {
                api,
                code,
                message: message.filter(|m| !m.is_empty()).map(str::to_owned),
            }
        }
    }

    /// `Ok` for error code 0, else [`Self::from_code`].
    pub(crate) fn check(api: &'static str, code: i16, message: Option<&str>) -> Result<(), Self> {
        if code == 0 {
            Ok(())
        } else {
            Err(Self::from_code(api, code, message))
        }
    }
}

impl fmt::Display for KafkaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Broker { api, code, message } => {
                write!(f, "{api}: {code}")?;
                match message {
                    Some(m) => write!(f, ": {m}"),
                    None => Ok(()),
                }
            }
            Self::Fenced { api, code } => write!(
                f,
                "{api}: {code}: fenced by another producer with the same transactional id"
            ),
            Self::OutcomeUnknown { api, cause } => {
                write!(f, "{api}: outcome unknown: {cause}")
            }
            Self::NotSent { api, cause } => write!(f, "{api}: not sent: {cause}"),
            Self::Connect { addr, cause } => write!(f, "cannot connect to {addr}: {cause}"),
            Self::Auth { code, message } => {
                write!(f, "SASL authentication failed: {code}")?;
                match message {
                    Some(m) => write!(f, ": {m}"),
                    None => Ok(()),
                }
            }
            Self::UnsupportedVersion { api, broker, ours } => match broker {
                Some((min, max)) => write!(
                    f,
                    "{api}: the broker supports v{min}..v{max}, this client v{}..v{}",
                    ours.0, ours.1
                ),
                None => write!(f, "{api}: not supported by the broker"),
            },
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
            Self::Records(e) => write!(f, "record batch: {e}"),
            Self::Config(e) => write!(f, "configuration: {e}"),
            Self::State(e) => write!(f, "producer state: {e}"),
        }
    }
}

impl std::error::Error for KafkaError {}

impl From<ProtocolError> for KafkaError {
    fn from(e: ProtocolError) -> Self {
        Self::Protocol(e)
    }
}

impl From<ConfigError> for KafkaError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<StateError> for KafkaError {
    fn from(e: StateError) -> Self {
        Self::State(e)
    }
}

impl From<super::records::RecordsError> for KafkaError {
    fn from(e: super::records::RecordsError) -> Self {
        Self::Records(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified_like_kafka_does() {
        assert!(ErrorCode::NOT_LEADER_OR_FOLLOWER.is_retriable());
        assert!(ErrorCode::NOT_LEADER_OR_FOLLOWER.is_stale_metadata());
        assert!(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS.is_retriable());
        assert!(ErrorCode::NOT_COORDINATOR.is_stale_coordinator());
        assert!(ErrorCode::CONCURRENT_TRANSACTIONS.is_retriable());
        assert!(!ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER.is_retriable());
        assert!(!ErrorCode::TOPIC_ALREADY_EXISTS.is_retriable());
        assert!(!ErrorCode(9999).is_retriable(), "unknown codes are final");
        assert!(ErrorCode::PRODUCER_FENCED.is_fenced());
        assert!(ErrorCode::INVALID_PRODUCER_EPOCH.is_fenced());
        assert!(!ErrorCode::UNKNOWN_PRODUCER_ID.is_fenced());
    }

    #[test]
    fn fencing_codes_become_the_fenced_error() {
        let e = KafkaError::from_code("EndTxn", 90, None);
        assert!(e.is_fenced() && !e.is_retriable() && !e.is_outcome_unknown());
        assert_eq!(e.code(), Some(ErrorCode::PRODUCER_FENCED));
        let e = KafkaError::from_code("Produce", 47, Some(""));
        assert!(e.is_fenced());
        let e = KafkaError::from_code("Produce", 6, Some("moved"));
        assert!(e.is_retriable() && !e.is_fenced());
        assert_eq!(e.to_string(), "Produce: NOT_LEADER_OR_FOLLOWER (6): moved");
        assert!(KafkaError::check("Metadata", 0, None).is_ok());
    }

    #[test]
    fn lost_answers_are_unknown_and_never_retriable() {
        let e = KafkaError::OutcomeUnknown {
            api: "EndTxn",
            cause: LinkError::Closed,
        };
        assert!(e.is_outcome_unknown() && !e.is_retriable() && !e.is_fenced());
        assert_eq!(
            e.to_string(),
            "EndTxn: outcome unknown: the broker closed the connection"
        );
        let e = KafkaError::NotSent {
            api: "Produce",
            cause: LinkError::Timeout,
        };
        assert!(e.is_retriable() && !e.is_outcome_unknown());
    }

    #[test]
    fn codes_display_in_kafka_spelling() {
        assert_eq!(ErrorCode(90).to_string(), "PRODUCER_FENCED (90)");
        assert_eq!(ErrorCode(-1).to_string(), "UNKNOWN_SERVER_ERROR (-1)");
        assert_eq!(ErrorCode(31000).to_string(), "error code 31000");
    }
}
