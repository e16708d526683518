//! The TLS listener's configuration: `[server.tls]` read into a rustls
//! server config, and the identity of a verified client certificate.
//!
//! rustls with the ring provider (the same stack as the mirror's Kafka
//! client; docs/architecture.md says why ring), TLS 1.3 and 1.2 only. With
//! `client_ca` set, every client must present a certificate that chains to
//! it and, with `crl` set, is not revoked: there is no anonymous fallback.
//!
//! Everything that can be wrong with the files is found here, at start-up
//! (and on reload), and named by its key: an unreadable file, a key that
//! does not match the certificate, a server certificate that has expired
//! or is not valid yet.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use crate::config::{IdentityFrom, TlsSection};

/// Resumable sessions the server remembers (TLS 1.2 session ids and TLS
/// 1.3 stateful tickets), about 1 KiB each: resumption skips the
/// certificate exchange, which on a small board is most of a handshake.
pub const SESSION_CACHE_ENTRIES: usize = 256;

/// Why `[server.tls]` cannot be used, and the key at fault.
#[derive(Debug)]
pub struct TlsError {
    /// The dotted key, e.g. `server.tls.key`.
    pub key: &'static str,
    pub path: PathBuf,
    pub problem: TlsProblem,
}

#[derive(Debug)]
#[non_exhaustive]
pub enum TlsProblem {
    /// The file cannot be read (missing, or permissions).
    Unreadable(std::io::Error),
    /// The file holds no PEM item of the kind needed.
    Missing(&'static str),
    /// A PEM section that does not decode.
    Pem(rustls::pki_types::pem::Error),
    /// The server certificate's validity ended (`not_after`, UTC).
    Expired(String),
    /// The server certificate is not valid yet (`not_before`, UTC).
    NotYetValid(String),
    /// A certificate rustls or the X.509 parser refuses.
    BadCertificate(String),
    /// The private key is not the certificate's.
    KeyMismatch,
    /// rustls refused the key, the CA or the CRL.
    Rustls(rustls::Error),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        write!(f, "invalid '{}': ", self.key)?;
        match &self.problem {
            TlsProblem::Unreadable(e) => write!(f, "cannot read {path}: {e}"),
            TlsProblem::Missing(what) => write!(f, "{path} holds no PEM {what}"),
            TlsProblem::Pem(e) => write!(f, "{path}: bad PEM: {e:?}"),
            TlsProblem::Expired(at) => {
                write!(f, "the certificate in {path} expired on {at}")
            }
            TlsProblem::NotYetValid(at) => {
                write!(f, "the certificate in {path} is not valid before {at}")
            }
            TlsProblem::BadCertificate(why) => write!(f, "{path}: {why}"),
            TlsProblem::KeyMismatch => write!(
                f,
                "the key in {path} does not match the certificate in server.tls.cert"
            ),
            TlsProblem::Rustls(e) => write!(f, "{path}: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

fn err(key: &'static str, path: &Path, problem: TlsProblem) -> TlsError {
    TlsError {
        key,
        path: path.to_owned(),
        problem,
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| err(key, path, TlsProblem::Unreadable(e)))
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, path, TlsProblem::Pem(e)))?;
    if certs.is_empty() {
        return Err(err(key, path, TlsProblem::Missing("certificate")));
    }
    Ok(certs)
}

/// A CRL file, PEM (one or more) or DER (one).
fn read_crls(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    if !bytes.starts_with(b"-----") && bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, path, TlsProblem::Pem(e)))?;
    if crls.is_empty() {
        return Err(err(key, path, TlsProblem::Missing("X509 CRL")));
    }
    Ok(crls)
}

/// Checks the leaf's validity period against the clock.
fn check_validity(path: &Path, leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
    let key = "server.tls.cert";
    let (not_before, not_after) = super::x509::parse(leaf)
        .and_then(|f| f.validity())
        .ok_or_else(|| {
            err(
                key,
                path,
                TlsProblem::BadCertificate("not an X.509 certificate skiff can read".into()),
            )
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if not_after < now {
        return Err(err(
            key,
            path,
            TlsProblem::Expired(super::x509::format_utc(not_after)),
        ));
    }
    if not_before > now {
        return Err(err(
            key,
            path,
            TlsProblem::NotYetValid(super::x509::format_utc(not_before)),
        ));
    }
    Ok(())
}

/// `[server.tls]` read and checked: what the listener hands each
/// handshake, and how it names the peer.
#[derive(Clone)]
pub struct TlsSetup {
    pub config: Arc<ServerConfig>,
    /// Whether clients must present a certificate (`client_ca` set).
    pub mutual: bool,
    pub identity_from: IdentityFrom,
    /// `handshake_timeout_ms`: a peer that connects and stalls holds its
    /// address's slot (`quotas.max_connections_per_ip`) no longer.
    pub handshake_timeout: std::time::Duration,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("mutual", &self.mutual)
            .field("identity_from", &self.identity_from)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// Reads the files `section` names. `None` when TLS is off.
    pub fn load(section: &TlsSection) -> Result<Option<TlsSetup>, TlsError> {
        if section.listen.is_empty() {
            return Ok(None);
        }
        let provider = crate::client::tls::provider();
        let cert_path = Path::new(&section.cert);
        let key_path = Path::new(&section.key);
        let chain = read_certs("server.tls.cert", cert_path)?;
        check_validity(cert_path, &chain[0])?;
        let key_bytes = read("server.tls.key", key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
            let problem = match e {
                rustls::pki_types::pem::Error::NoItemsFound => TlsProblem::Missing("private key"),
                e => TlsProblem::Pem(e),
            };
            err("server.tls.key", key_path, problem)
        })?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| err("server.tls.key", key_path, TlsProblem::Rustls(e)))?;
        let certified = rustls::sign::CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(err("server.tls.key", key_path, TlsProblem::KeyMismatch))
            }
            // The provider cannot tell for this key type: the handshake
            // will.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => {
                return Err(err(
                    "server.tls.cert",
                    cert_path,
                    TlsProblem::BadCertificate(e.to_string()),
                ))
            }
        }

        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| err("server.tls.cert", cert_path, TlsProblem::Rustls(e)))?;
        let mutual = !section.client_ca.is_empty();
        let builder = if mutual {
            let ca_path = Path::new(&section.client_ca);
            let mut roots = RootCertStore::empty();
            for c in read_certs("server.tls.client_ca", ca_path)? {
                roots
                    .add(c)
                    .map_err(|e| err("server.tls.client_ca", ca_path, TlsProblem::Rustls(e)))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if !section.crl.is_empty() {
                let crl_path = Path::new(&section.crl);
                // Only the device's own certificate is looked up: a CA
                // publishes one CRL for what it issued, and intermediates
                // are rotated by replacing client_ca.
                verifier = verifier
                    .with_crls(read_crls("server.tls.crl", crl_path)?)
                    .only_check_end_entity_revocation();
            }
            let verifier = verifier.build().map_err(|e| {
                let (key, path) = if section.crl.is_empty() {
                    ("server.tls.client_ca", ca_path)
                } else {
                    ("server.tls.crl", Path::new(&section.crl))
                };
                err(
                    key,
                    path,
                    TlsProblem::BadCertificate(format!("the verifier refused it: {e}")),
                )
            })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(Arc::new(SingleCert(Arc::new(certified))));
        // A fresh cache with each load: a session resumed across a reload
        // would skip the new CRL.
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
        // Without AES instructions the broker insists on ChaCha20, which
        // any client does fast; with them it takes the client's first
        // choice, as a client without them would ask for ChaCha20.
        config.ignore_client_order = !crate::client::tls::aes_in_hardware();
        Ok(Some(TlsSetup {
            config: Arc::new(config),
            mutual,
            identity_from: section.identity_from,
            handshake_timeout: std::time::Duration::from_millis(section.handshake_timeout_ms),
        }))
    }

    /// The identity a verified client certificate names, by
    /// `identity_from`; `None` when it names none that way.
    pub fn identity_of(&self, cert: &CertificateDer<'_>) -> Option<String> {
        identity_of(cert, self.identity_from)
    }
}

/// The server's certificate for every client (no SNI-based choice).
#[derive(Debug)]
struct SingleCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The identity in `cert`: its subject CN, or its first SAN of the kind.
pub fn identity_of(cert: &CertificateDer<'_>, from: IdentityFrom) -> Option<String> {
    let fields = super::x509::parse(cert)?;
    let name = match from {
        IdentityFrom::Cn => fields.common_name(),
        IdentityFrom::SanDns => fields.san_dns(),
        IdentityFrom::SanUri => fields.san_uri(),
    };
    name.filter(|n| !n.is_empty()).map(str::to_owned)
}

/// The TLS setup in force: replaced whole on reload. A handshake takes the
/// setup current when it starts; connections already up keep theirs.
#[derive(Debug)]
pub struct TlsSlot(RwLock<TlsSetup>);

impl TlsSlot {
    pub fn new(setup: TlsSetup) -> TlsSlot {
        TlsSlot(RwLock::new(setup))
    }

    pub fn current(&self) -> TlsSetup {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, setup: TlsSetup) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = setup;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn identities_come_from_the_cn_or_the_first_san_of_the_kind() {
        let mut p = rcgen::CertificateParams::new(vec!["dev-17.plant.local".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "dev-17");
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://plant/dev-17".try_into().unwrap(),
        ));
        let c = p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        let der = c.der();
        assert_eq!(
            identity_of(der, IdentityFrom::Cn).as_deref(),
            Some("dev-17")
        );
        assert_eq!(
            identity_of(der, IdentityFrom::SanDns).as_deref(),
            Some("dev-17.plant.local")
        );
        assert_eq!(
            identity_of(der, IdentityFrom::SanUri).as_deref(),
            Some("spiffe://plant/dev-17")
        );
        let (bare, _) = cert("only-cn", &[]);
        assert_eq!(identity_of(bare.der(), IdentityFrom::SanDns), None);
        assert_eq!(
            identity_of(&CertificateDer::from(vec![0x30, 0]), IdentityFrom::Cn),
            None
        );
    }

    #[test]
    fn off_without_a_listen_address_and_each_file_named_when_wrong() {
        let off = TlsSection {
            listen: String::new(),
            cert: String::new(),
            key: String::new(),
            client_ca: String::new(),
            crl: String::new(),
            identity_from: IdentityFrom::Cn,
            handshake_timeout_ms: 10_000,
        };
        assert!(TlsSetup::load(&off).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = cert("server", &["localhost"]);
        let (_, other) = cert("other", &[]);
        let path = |n: &str| dir.path().join(n).display().to_string();
        std::fs::write(path("c.pem"), c.pem()).unwrap();
        std::fs::write(path("k.pem"), k.serialize_pem()).unwrap();
        std::fs::write(path("o.pem"), other.serialize_pem()).unwrap();
        let on = TlsSection {
            listen: "127.0.0.1:0".into(),
            cert: path("c.pem"),
            key: path("k.pem"),
            ..off
        };
        let setup = TlsSetup::load(&on).unwrap().unwrap();
        assert!(!setup.mutual);
        let mismatch = TlsSection {
            key: path("o.pem"),
            ..on.clone()
        };
        let e = TlsSetup::load(&mismatch).unwrap_err();
        assert_eq!(e.key, "server.tls.key");
        assert!(matches!(e.problem, TlsProblem::KeyMismatch), "{e}");
        let no_key = TlsSection {
            key: path("c.pem"),
            ..on.clone()
        };
        let e = TlsSetup::load(&no_key).unwrap_err();
        assert_eq!(e.key, "server.tls.key");
        assert!(e.to_string().contains("holds no PEM private key"), "{e}");
        let crl = TlsSection {
            client_ca: path("c.pem"),
            crl: path("missing.crl"),
            ..on
        };
        let e = TlsSetup::load(&crl).unwrap_err();
        assert_eq!(e.key, "server.tls.crl");
        assert!(matches!(e.problem, TlsProblem::Unreadable(_)), "{e}");
    }
}
