//! SASL PLAIN (RFC 4616) and SCRAM-SHA-256/512 (RFC 5802, RFC 7677), as
//! state machines without I/O. The connection carries their messages in
//! SaslAuthenticate requests after a SaslHandshake (KIP-152).
//!
//! SCRAM never sends the password: the client proves it knows the salted
//! password, and checks that the server knows it too (the server signature
//! in its final message), so a server that merely accepts anything is
//! caught.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

use super::error::{ErrorCode, KafkaError, ProtocolError};

/// Fewer iterations than this make the salted password cheap to brute
/// force; Kafka refuses to store fewer (and RFC 7677 uses 4096).
const SCRAM_ITERATIONS_MIN: u32 = 4096;
/// More than this would let a hostile server keep the client hashing for
/// minutes on a small board.
const SCRAM_ITERATIONS_MAX: u32 = 1 << 20;
/// Random bytes in the client nonce (base64 makes it 32 characters).
const NONCE_BYTES: usize = 24;

/// A SASL mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// The name the broker knows it by, as sent in SaslHandshake.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl std::str::FromStr for SaslMechanism {
    type Err = UnknownMechanism;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PLAIN" => Ok(Self::Plain),
            "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            "SCRAM-SHA-512" => Ok(Self::ScramSha512),
            _ => Err(UnknownMechanism),
        }
    }
}

/// A mechanism name other than PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownMechanism;

impl fmt::Display for UnknownMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SASL mechanism is one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512")
    }
}

impl std::error::Error for UnknownMechanism {}

/// Credentials and mechanism for SASL.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslConfig {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for SaslConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslConfig")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One authentication exchange, client side.
pub(crate) enum SaslSession {
    Plain { message: Option<Vec<u8>> },
    Scram(Box<Scram>),
}

impl SaslSession {
    /// A session for `config`, with a fresh random nonce for SCRAM.
    pub(crate) fn start(config: &SaslConfig) -> Result<Self, KafkaError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::getrandom(&mut nonce).map_err(|_| ProtocolError::Sasl("no random source"))?;
        Ok(Self::with_nonce(config, &B64.encode(nonce)))
    }

    fn with_nonce(config: &SaslConfig, nonce: &str) -> Self {
        let hash = match config.mechanism {
            SaslMechanism::Plain => {
                // authzid (empty), authcid, password, NUL separated.
                let mut message =
                    Vec::with_capacity(2 + config.username.len() + config.password.len());
                message.push(0);
                message.extend_from_slice(config.username.as_bytes());
                message.push(0);
                message.extend_from_slice(config.password.as_bytes());
                return Self::Plain {
                    message: Some(message),
                };
            }
            SaslMechanism::ScramSha256 => ScramHash::Sha256,
            SaslMechanism::ScramSha512 => ScramHash::Sha512,
        };
        Self::Scram(Box::new(Scram::new(
            hash,
            &config.username,
            &config.password,
            nonce,
        )))
    }

    /// The next message to send, given the server's last one (`None` at
    /// the start). `Ok(None)`: the exchange is complete.
    pub(crate) fn step(&mut self, server: Option<&[u8]>) -> Result<Option<Vec<u8>>, KafkaError> {
        match self {
            Self::Plain { message } => Ok(message.take()),
            Self::Scram(scram) => scram.step(server),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            Self::Sha512 => {
                let mut mac = <Hmac<Sha512> as Mac>::new_from_slice(key).expect("any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(data).to_vec(),
            Self::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// Hi() of RFC 5802: PBKDF2 with HMAC as the PRF, one block.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out.to_vec()
            }
            Self::Sha512 => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
                out.to_vec()
            }
        }
    }
}

enum ScramState {
    Initial,
    /// Sent client-first; `bare` is its part after the GS2 header.
    SentFirst {
        bare: String,
    },
    /// Sent client-final; the server must prove `server_signature`.
    SentFinal {
        server_signature: Vec<u8>,
    },
    Done,
}

/// The SCRAM client of RFC 5802, without channel binding (`n,,`).
pub(crate) struct Scram {
    hash: ScramHash,
    username: String,
    password: String,
    nonce: String,
    state: ScramState,
}

impl Scram {
    fn new(hash: ScramHash, username: &str, password: &str, nonce: &str) -> Self {
        Self {
            hash,
            username: username.to_owned(),
            password: password.to_owned(),
            nonce: nonce.to_owned(),
            state: ScramState::Initial,
        }
    }

    fn step(&mut self, server: Option<&[u8]>) -> Result<Option<Vec<u8>>, KafkaError> {
        match std::mem::replace(&mut self.state, ScramState::Done) {
            ScramState::Initial => {
                let bare = format!("n={},r={}", escape_username(&self.username), self.nonce);
                let message = format!("n,,{bare}").into_bytes();
                self.state = ScramState::SentFirst { bare };
                Ok(Some(message))
            }
            ScramState::SentFirst { bare } => {
                let server_first = server
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .ok_or(ProtocolError::Sasl("server-first-message is not UTF-8"))?;
                let (final_message, server_signature) = self.client_final(&bare, server_first)?;
                self.state = ScramState::SentFinal { server_signature };
                Ok(Some(final_message.into_bytes()))
            }
            ScramState::SentFinal { server_signature } => {
                let server_final = server
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .ok_or(ProtocolError::Sasl("server-final-message is not UTF-8"))?;
                if let Some(error) = attribute(server_final, 'e') {
                    // RFC 5802's server-error-value, e.g. unknown-user.
                    return Err(KafkaError::Auth {
                        code: ErrorCode::SASL_AUTHENTICATION_FAILED,
                        message: Some(error.to_owned()),
                    });
                }
                let verifier = attribute(server_final, 'v')
                    .and_then(|v| B64.decode(v).ok())
                    .ok_or(ProtocolError::Sasl("server-final-message lacks v="))?;
                if verifier != server_signature {
                    return Err(ProtocolError::Sasl("the server's signature is wrong").into());
                }
                Ok(None)
            }
            ScramState::Done => Ok(None),
        }
    }

    /// The client-final-message and the server signature to expect.
    fn client_final(
        &self,
        bare: &str,
        server_first: &str,
    ) -> Result<(String, Vec<u8>), KafkaError> {
        if server_first.starts_with("m=") {
            return Err(ProtocolError::Sasl("mandatory SCRAM extension not supported").into());
        }
        let nonce = attribute(server_first, 'r')
            .ok_or(ProtocolError::Sasl("server-first-message lacks r="))?;
        // The server's nonce extends ours; anything else is a replay or a
        // man in the middle.
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ProtocolError::Sasl("the server's nonce does not extend ours").into());
        }
        let salt = attribute(server_first, 's')
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ProtocolError::Sasl("server-first-message lacks s="))?;
        let iterations: u32 = attribute(server_first, 'i')
            .and_then(|i| i.parse().ok())
            .ok_or(ProtocolError::Sasl("server-first-message lacks i="))?;
        if !(SCRAM_ITERATIONS_MIN..=SCRAM_ITERATIONS_MAX).contains(&iterations) {
            return Err(ProtocolError::Sasl("iteration count out of range").into());
        }

        let h = self.hash;
        let salted = h.salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = h.hmac(&salted, b"Client Key");
        let stored_key = h.hash(&client_key);
        // "biws" is base64("n,,"): the GS2 header, no channel binding.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let client_signature = h.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = h.hmac(&salted, b"Server Key");
        let server_signature = h.hmac(&server_key, auth_message.as_bytes());
        Ok((
            format!("{without_proof},p={}", B64.encode(proof)),
            server_signature,
        ))
    }
}

/// `=` and `,` are escaped in a SCRAM user name (RFC 5802, 5.1).
fn escape_username(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// The value of attribute `name` in a SCRAM message (`a=v,b=w`).
fn attribute(message: &str, name: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn assert_sasl_error(result: Result<Option<Vec<u8>>, KafkaError>, what: &str) {
        match result {
            Err(KafkaError::Protocol(ProtocolError::Sasl(got))) => assert_eq!(got, what),
            other => panic!("{other:?}"),
        }
    }

    fn config(mechanism: SaslMechanism, user: &str, password: &str) -> SaslConfig {
        SaslConfig {
            mechanism,
            username: user.into(),
            password: password.into(),
        }
    }

    /// RFC 7677's exchange (user, password, nonces and salt) under
    /// `mechanism`: the client's final message must be `client_final`, and
    /// the server's `server_final` must verify.
    fn rfc_7677_exchange(mechanism: SaslMechanism, client_final: &str, server_final: &[u8]) {
        let mut session =
            SaslSession::with_nonce(&config(mechanism, "user", "pencil"), "rOprNGfwEbeRWgbNEkqO");
        let first = session.step(None).unwrap().unwrap();
        assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                             s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let last = session.step(Some(server_first)).unwrap().unwrap();
        assert_eq!(std::str::from_utf8(&last).unwrap(), client_final);
        assert_eq!(session.step(Some(server_final)).unwrap(), None);
    }

    /// RFC 7677, section 3: the SCRAM-SHA-256 exchange, byte for byte.
    #[test]
    fn scram_sha_256_matches_rfc_7677() {
        rfc_7677_exchange(
            SaslMechanism::ScramSha256,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        );
    }

    /// RFC 7677's exchange with SHA-512 in place of SHA-256, byte for byte
    /// against an independent computation of RFC 5802's definitions
    /// (Python's hashlib: pbkdf2_hmac, hmac and sha512).
    #[test]
    fn scram_sha_512_matches_an_independent_computation() {
        rfc_7677_exchange(
            SaslMechanism::ScramSha512,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=gMGXRcevScNtxZ6/8lQYpGtnsNAc3mGcmNomv+xnoOMw+3R2xNJdMNnzMlTN8PPC6wdp6dybEmDYXYTxwnYPJQ==",
            b"v=ZQnYEgWQMFmmsM8aQMF0nDDCy/AgCzkwk8CmMZYcMg0vSVlKDanekLtifDSeVGT4+\
              5ZxXnJq199RVG2rR7N7Zw==",
        );
    }

    /// The same exchange with the server's signature altered: a server
    /// that does not know the password is caught.
    #[test]
    fn scram_rejects_a_wrong_server_signature() {
        let mut session = SaslSession::with_nonce(
            &config(SaslMechanism::ScramSha256, "user", "pencil"),
            "rOprNGfwEbeRWgbNEkqO",
        );
        session.step(None).unwrap();
        session
            .step(Some(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            ))
            .unwrap();
        let forged = b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
        assert_sasl_error(
            session.step(Some(forged)),
            "the server's signature is wrong",
        );
    }

    #[test]
    fn scram_refuses_a_foreign_nonce_and_weak_iterations() {
        let cfg = config(SaslMechanism::ScramSha512, "user", "pencil");
        let mut session = SaslSession::with_nonce(&cfg, "abc");
        session.step(None).unwrap();
        assert_sasl_error(
            session.step(Some(b"r=xyz123,s=c2FsdA==,i=4096")),
            "the server's nonce does not extend ours",
        );
        let mut session = SaslSession::with_nonce(&cfg, "abc");
        session.step(None).unwrap();
        assert_sasl_error(
            session.step(Some(b"r=abc123,s=c2FsdA==,i=1")),
            "iteration count out of range",
        );
        let mut session = SaslSession::with_nonce(&cfg, "abc");
        session.step(None).unwrap();
        session.step(Some(b"r=abc123,s=c2FsdA==,i=4096")).unwrap();
        match session.step(Some(b"e=invalid-proof")) {
            Err(KafkaError::Auth { code, message }) => {
                assert_eq!(code, ErrorCode::SASL_AUTHENTICATION_FAILED);
                assert_eq!(message.as_deref(), Some("invalid-proof"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// SCRAM-SHA-512 has no RFC vector: check it against a server side
    /// computed from RFC 5802's definitions (what Kafka stores as the
    /// credential: salt, iterations, StoredKey, ServerKey).
    #[test]
    fn scram_sha_512_proof_verifies_against_the_stored_key() {
        let h = ScramHash::Sha512;
        let salt = b"0123456789abcdef";
        let salted = h.salted_password(b"s3cret", salt, 4096);
        let stored_key = h.hash(&h.hmac(&salted, b"Client Key"));
        let server_key = h.hmac(&salted, b"Server Key");

        let mut session = SaslSession::with_nonce(
            &config(SaslMechanism::ScramSha512, "a=b,c", "s3cret"),
            "cnonce",
        );
        let first = String::from_utf8(session.step(None).unwrap().unwrap()).unwrap();
        assert_eq!(first, "n,,n=a=3Db=2Cc,r=cnonce");
        let server_first = format!("r=cnonceSNONCE,s={},i=4096", B64.encode(salt));
        let last = session
            .step(Some(server_first.as_bytes()))
            .unwrap()
            .unwrap();
        let last = String::from_utf8(last).unwrap();

        // The server's check: ClientKey = proof XOR HMAC(StoredKey, auth).
        let without_proof = "c=biws,r=cnonceSNONCE";
        let auth = format!("{},{server_first},{without_proof}", &first[3..]);
        let proof = B64.decode(attribute(&last, 'p').unwrap()).unwrap();
        let signature = h.hmac(&stored_key, auth.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        assert_eq!(h.hash(&client_key), stored_key);

        let server_final = format!("v={}", B64.encode(h.hmac(&server_key, auth.as_bytes())));
        assert_eq!(session.step(Some(server_final.as_bytes())).unwrap(), None);
    }

    #[test]
    fn plain_sends_one_message() {
        let mut session = SaslSession::start(&config(SaslMechanism::Plain, "u", "p")).unwrap();
        assert_eq!(session.step(None).unwrap().unwrap(), b"\0u\0p");
        assert_eq!(session.step(Some(b"")).unwrap(), None);
    }

    #[test]
    fn mechanisms_parse_and_passwords_stay_out_of_debug() {
        assert_eq!("SCRAM-SHA-512".parse(), Ok(SaslMechanism::ScramSha512));
        assert_eq!("scram".parse::<SaslMechanism>(), Err(UnknownMechanism));
        let debug = format!("{:?}", config(SaslMechanism::Plain, "u", "hunter2"));
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
