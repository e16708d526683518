//! TLS to the brokers: rustls with the ring crypto provider, set up by the
//! same code as skiff's own clients (`crate::client::tls::client_config`).
//!
//! ring rather than aws-lc-rs (rustls' default): aws-lc-rs builds a C
//! library with cmake for every target, ring needs only a C compiler for
//! the target, and it adds less to the binary. The provider is passed to
//! the config explicitly, never installed process-wide.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;

use crate::client::tls::ClientSetupError;

use super::error::ConfigError;

/// How to check the brokers and, optionally, prove who we are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the CA certificates to trust; `None`: the system's
    /// store (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for brokers that require mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// The name to verify the broker's certificate against, instead of the
    /// host in its address.
    pub server_name: Option<String>,
}

/// A ready rustls client configuration and the name override.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files and builds the configuration; every error names the
    /// file or the setting at fault.
    pub(crate) fn new(config: &TlsConfig) -> Result<Self, ConfigError> {
        if config.cert_file.is_some() != config.key_file.is_some() {
            return Err(ConfigError::Tls(rustls::Error::General(
                "a client certificate needs both cert_file and key_file".into(),
            )));
        }
        let ca = config.ca_file.as_deref().map(read_certs).transpose()?;
        let identity = match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
                Some((chain, key))
            }
            _ => None,
        };
        let client = crate::client::tls::client_config(ca, identity).map_err(|e| match e {
            ClientSetupError::NoRoots => ConfigError::NoRoots,
            ClientSetupError::Rustls(e) => ConfigError::Tls(e),
        })?;
        let server_name = config.server_name.as_deref().map(server_name).transpose()?;
        Ok(Self {
            config: Arc::new(client),
            server_name,
        })
    }

    /// The name to check the certificate of the broker at `host` against.
    pub(crate) fn server_name_for(&self, host: &str) -> Result<ServerName<'static>, ConfigError> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => server_name(host),
        }
    }
}

fn server_name(name: &str) -> Result<ServerName<'static>, ConfigError> {
    // An IPv6 literal comes bracketed from a host:port address.
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| ConfigError::ServerName(name.to_owned()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(ConfigError::TlsFile {
            path: path.to_owned(),
            cause: Arc::new(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no PEM certificate in the file",
            )),
        });
    }
    Ok(certs)
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> ConfigError {
    let cause = match e {
        rustls::pki_types::pem::Error::Io(io) => io,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    };
    ConfigError::TlsFile {
        path: path.to_owned(),
        cause: Arc::new(cause),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let missing = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        match Tls::new(&missing) {
            Err(ConfigError::TlsFile { path, .. }) => {
                assert_eq!(path, PathBuf::from("/nonexistent/ca.pem"))
            }
            other => panic!("{other:?}"),
        }
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let config = TlsConfig {
            ca_file: Some(empty.clone()),
            ..TlsConfig::default()
        };
        match Tls::new(&config) {
            Err(ConfigError::TlsFile { path, cause }) => {
                assert_eq!(path, empty);
                assert!(cause.to_string().contains("no PEM certificate"), "{cause}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Without a CA file the system store is used: Debian's bundle where
    /// it is installed, else a named error rather than an empty trust list.
    #[test]
    fn the_system_store_is_the_default() {
        let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
        let has_bundle = std::env::var_os("SSL_CERT_FILE").is_none()
            && std::env::var_os("SSL_CERT_DIR").is_none()
            && std::fs::metadata(bundle).is_ok_and(|m| m.len() > 0);
        match Tls::new(&TlsConfig::default()) {
            Ok(_) => {}
            Err(ConfigError::NoRoots) => assert!(!has_bundle, "{} was not read", bundle.display()),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let config = TlsConfig {
            ca_file: None,
            cert_file: Some("/nonexistent/client.pem".into()),
            key_file: None,
            server_name: None,
        };
        let e = Tls::new(&config);
        assert!(matches!(e, Err(ConfigError::Tls(_))), "{e:?}");
    }

    #[test]
    fn server_names_accept_hosts_and_ip_literals() {
        assert!(server_name("kafka.example.com").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(matches!(
            server_name("not a name"),
            Err(ConfigError::ServerName(_))
        ));
    }
}
