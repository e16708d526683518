//! TLS for clients: `--tls-ca`, `--tls-cert`, `--tls-key` and
//! `--tls-server-name` made into a rustls client config (ring provider,
//! TLS 1.3 and 1.2), built once per [`super::Client`] so reconnects resume
//! their session instead of redoing the whole handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{RootCertStore, SupportedCipherSuite};

/// How a client connects over TLS. Any field set means TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM CA certificates to trust; `None`: the system's store.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain to present (mutual TLS); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, instead of the host
    /// in the address.
    pub server_name: Option<String>,
}

/// Why the TLS options cannot be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A file cannot be read (missing, or permissions).
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file holds no PEM item of the kind needed, or a bad one.
    Pem { path: PathBuf, what: &'static str },
    /// `--tls-cert` without `--tls-key`, or the other way round.
    HalfIdentity,
    /// Not a DNS name or IP address.
    ServerName(String),
    /// TLS runs over TCP only; the address is a Unix socket.
    NotTcp,
    /// No CA given and the system store has none.
    NoRoots,
    /// rustls refused a certificate or the key.
    Rustls(rustls::Error),
}

impl std::fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Self::Pem { path, what } => write!(f, "{} holds no valid PEM {what}", path.display()),
            Self::HalfIdentity => f.write_str("--tls-cert and --tls-key go together"),
            Self::ServerName(n) => write!(f, "{n:?} is not a server name (DNS name or IP)"),
            Self::NotTcp => f.write_str("TLS needs a HOST:PORT address, not a Unix socket"),
            Self::NoRoots => f.write_str("no CA certificates: give --tls-ca"),
            Self::Rustls(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TlsConfigError {}

/// A ready client config and the name override.
#[derive(Clone)]
pub(crate) struct TlsClient {
    pub(crate) config: Arc<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let bad = || TlsConfigError::Pem {
        path: path.to_owned(),
        what: "certificate",
    };
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad())?;
    if certs.is_empty() {
        return Err(bad());
    }
    Ok(certs)
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsConfigError> {
    // An IPv6 literal comes bracketed from a host:port address.
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsConfigError::ServerName(name.to_owned()))
}

/// rustls's ring provider with its cipher suites in the order fastest on
/// this CPU ([`suites_for`]). The broker and every client use it.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = suites_for(aes_in_hardware());
    Arc::new(p)
}

/// Whether the CPU has AES and carry-less multiply instructions, which
/// ring's AES-GCM uses (x86_64 AES-NI and PCLMULQDQ, the ARMv8 crypto
/// extensions). A Raspberry Pi 4's Cortex-A72 has neither.
pub(crate) fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The suites in order of preference. With AES in hardware, AES-128-GCM
/// (10 rounds against AES-256's 14, and strong enough for a 128-bit
/// ECDHE P-256 exchange anyway); without, ChaCha20-Poly1305, several
/// times faster there than ring's constant-time software AES. Each TLS
/// version's suites keep together, TLS 1.3's first.
pub(crate) fn suites_for(aes_in_hardware: bool) -> Vec<SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    if !aes_in_hardware {
        // Rotate each group of three: ChaCha20 first, the AES ones after.
        for group in suites.chunks_mut(3) {
            group.rotate_right(1);
        }
    }
    suites
}

/// Why [`client_config`] could not build a config.
pub(crate) enum ClientSetupError {
    /// No CA given and the system store has none.
    NoRoots,
    Rustls(rustls::Error),
}

/// The one rustls client setup, for skiff's own clients and the mirror's
/// Kafka client alike: the ring provider, TLS 1.3 and 1.2, `ca` as the
/// roots (`None`: the system's store; unreadable entries in it are
/// skipped, as every TLS client does), and a client identity for mutual
/// TLS if given.
pub(crate) fn client_config(
    ca: Option<Vec<CertificateDer<'static>>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, ClientSetupError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(certs) => {
            for c in certs {
                roots.add(c).map_err(ClientSetupError::Rustls)?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err(ClientSetupError::NoRoots);
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(ClientSetupError::Rustls)?
        .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(ClientSetupError::Rustls),
        None => Ok(builder.with_no_client_auth()),
    }
}

impl TlsClient {
    pub(crate) fn new(o: &TlsOptions) -> Result<TlsClient, TlsConfigError> {
        let ca = o.ca_file.as_deref().map(certs).transpose()?;
        let identity = match (&o.cert_file, &o.key_file) {
            (Some(cert), Some(key)) => {
                let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| {
                    TlsConfigError::Pem {
                        path: key.clone(),
                        what: "private key",
                    }
                })?;
                Some((certs(cert)?, key_der))
            }
            (None, None) => None,
            _ => return Err(TlsConfigError::HalfIdentity),
        };
        let config = client_config(ca, identity).map_err(|e| match e {
            ClientSetupError::NoRoots => TlsConfigError::NoRoots,
            ClientSetupError::Rustls(e) => TlsConfigError::Rustls(e),
        })?;
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: o.server_name.as_deref().map(server_name).transpose()?,
        })
    }

    /// The name to check the certificate of the server at `host:port` against.
    pub(crate) fn server_name_for(
        &self,
        addr: &str,
    ) -> Result<ServerName<'static>, TlsConfigError> {
        match &self.server_name {
            Some(n) => Ok(n.clone()),
            None => server_name(addr.rsplit_once(':').map_or(addr, |(h, _)| h)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_put_aes_128_first_with_aes_in_hardware_and_chacha20_without() {
        use rustls::CipherSuite as S;
        let names = |hw| suites_for(hw).iter().map(|s| s.suite()).collect::<Vec<_>>();
        let (with, without) = (names(true), names(false));
        assert_eq!(with[0], S::TLS13_AES_128_GCM_SHA256);
        assert_eq!(without[0], S::TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(without[3], S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256);
        // Only the order changes: the same suites as ring's defaults.
        let mut defaults = rustls::crypto::ring::DEFAULT_CIPHER_SUITES
            .iter()
            .map(|s| s.suite())
            .collect::<Vec<_>>();
        for mut v in [with, without] {
            v.sort_by_key(|s| u16::from(*s));
            defaults.sort_by_key(|s| u16::from(*s));
            assert_eq!(v, defaults);
        }
    }

    #[test]
    fn server_names_come_from_the_address_or_the_override() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let mut o = TlsOptions {
            ca_file: Some(ca),
            ..TlsOptions::default()
        };
        let c = TlsClient::new(&o).unwrap();
        assert_eq!(
            c.server_name_for("127.0.0.1:9473").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            c.server_name_for("[::1]:9473").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        o.server_name = Some("broker.plant".into());
        let c = TlsClient::new(&o).unwrap();
        assert_eq!(
            c.server_name_for("127.0.0.1:9473").unwrap(),
            ServerName::try_from("broker.plant").unwrap()
        );
        o.cert_file = Some("x.pem".into());
        assert!(matches!(
            TlsClient::new(&o),
            Err(TlsConfigError::HalfIdentity)
        ));
        o.cert_file = None;
        o.ca_file = Some(dir.path().join("missing.pem"));
        assert!(matches!(
            TlsClient::new(&o),
            Err(TlsConfigError::Read { .. })
        ));
    }
}
