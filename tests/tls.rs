//! TLS, mutual TLS, identities, ACLs and quotas, through the real binary.
//! Every certificate, CA and CRL is made here with rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertifiedIssuer, DnType, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};
use skiff::client::{blocking, ClientConfig, ClientError, TlsOptions};
use skiff::protocol::{ErrorCode, ProducePartition, ProduceRequest, RequestBody, ResponseBody};

/// A CA and the files of certificates it (or another CA) signed, in `dir`.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// Serial numbers to revoke in the CRL.
    revoked: Vec<u64>,
    next_serial: u64,
}

fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// Validity of a certificate made here.
#[derive(Clone, Copy)]
enum Valid {
    Now,
    Expired,
    NotYet,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.to_owned(),
            ca: ca("skiff test CA"),
            revoked: vec![],
            next_serial: 100,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes NAME.pem and NAME.key: a certificate with common name `cn`
    /// and DNS SANs `sans`, signed by `issuer` (this CA when None).
    /// Returns its serial number.
    fn issue(
        &mut self,
        name: &str,
        cn: &str,
        sans: &[&str],
        valid: Valid,
        issuer: Option<&CertifiedIssuer<'static, KeyPair>>,
    ) -> u64 {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        self.next_serial += 1;
        p.serial_number = Some(SerialNumber::from(self.next_serial));
        match valid {
            Valid::Now => {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2090, 1, 1);
            }
            Valid::Expired => {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2021, 1, 1);
            }
            Valid::NotYet => {
                p.not_before = date_time_ymd(2089, 1, 1);
                p.not_after = date_time_ymd(2090, 1, 1);
            }
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, issuer.unwrap_or(&self.ca)).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
        self.next_serial
    }

    /// Writes crl.pem revoking the serials in `revoked`.
    fn write_crl(&self) {
        let crl = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(2090, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: self
                .revoked
                .iter()
                .map(|&s| RevokedCertParams {
                    serial_number: SerialNumber::from(s),
                    revocation_time: date_time_ymd(2020, 6, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.ca)
        .unwrap();
        std::fs::write(self.path("crl.pem"), crl.pem().unwrap()).unwrap();
    }

    /// `[server.tls]` for the server certificate `server`.
    fn server_section(&self, mutual: bool, extra: &str) -> String {
        let mut s = format!(
            "[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
            self.path("server.pem"),
            self.path("server.key")
        );
        if mutual {
            s += &format!("client_ca = {:?}\n", self.path("ca.pem"));
        }
        s + extra
    }

    /// The CLI's TLS flags for the client certificate `name` (or none).
    fn flags(&self, name: Option<&str>) -> Vec<String> {
        let mut f = vec!["--tls-ca".to_owned(), s(&self.path("ca.pem"))];
        if let Some(n) = name {
            f.extend([
                "--tls-cert".to_owned(),
                s(&self.path(&format!("{n}.pem"))),
                "--tls-key".to_owned(),
                s(&self.path(&format!("{n}.key"))),
            ]);
        }
        f
    }

    fn options(&self, name: Option<&str>, server_name: Option<&str>) -> TlsOptions {
        TlsOptions {
            ca_file: Some(self.path("ca.pem")),
            cert_file: name.map(|n| self.path(&format!("{n}.pem"))),
            key_file: name.map(|n| self.path(&format!("{n}.key"))),
            server_name: server_name.map(str::to_owned),
        }
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// Runs a client command against `addr` with extra flags.
fn cli(addr: &str, flags: &[String], args: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(flags.iter().map(String::as_str));
    run_cli(&all, addr, None)
}

/// A PKI in a directory of its own (the broker's directory is made by
/// the harness).
fn pki_dir() -> (tempfile::TempDir, Pki) {
    let dir = temp_dir();
    let mut pki = Pki::new(dir.path());
    pki.issue(
        "server",
        "skiff-broker",
        &["localhost", "127.0.0.1"],
        Valid::Now,
        None,
    );
    (dir, pki)
}

fn tls_addr(b: &Broker) -> String {
    b.tls.clone().expect("the broker listens on TLS")
}

#[test]
fn mutual_tls_refuses_every_client_it_cannot_trust() {
    let (_keep, mut pki) = pki_dir();
    pki.issue("good", "dev-1", &[], Valid::Now, None);
    pki.issue("expired", "dev-2", &[], Valid::Expired, None);
    pki.issue("notyet", "dev-3", &[], Valid::NotYet, None);
    let revoked = pki.issue("revoked", "dev-4", &[], Valid::Now, None);
    pki.revoked.push(revoked);
    pki.write_crl();
    let other = ca("another CA");
    pki.issue("stranger", "dev-5", &[], Valid::Now, Some(&other));
    let section = pki.server_section(true, &format!("crl = {:?}\n", pki.path("crl.pem")));
    let b = Broker::start(&section);
    let addr = tls_addr(&b);

    // The good device gets in.
    let ok = cli(&addr, &pki.flags(Some("good")), &["topics", "list"]);
    assert_ok(&ok);

    let refused = |flags: Vec<String>, what: &str| {
        let o = cli(&addr, &flags, &["topics", "list"]);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
        assert!(err.contains("cannot connect"), "{what}: {err}");
    };
    refused(pki.flags(None), "no client certificate");
    refused(pki.flags(Some("stranger")), "another CA's certificate");
    refused(pki.flags(Some("expired")), "an expired certificate");
    refused(pki.flags(Some("notyet")), "a certificate not valid yet");
    refused(pki.flags(Some("revoked")), "a revoked certificate");
    // A plaintext client on the TLS port: its hello is not a TLS record.
    refused(vec![], "plaintext");
    let o = cli(&addr, &[], &["topics", "list"]);
    assert!(
        stderr(&o).contains("the server speaks TLS on this port"),
        "{}",
        stderr(&o)
    );
    // Raw: the broker answers a skiff hello with a TLS alert, then closes.
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    std::io::Write::write_all(&mut raw, &request_frame(1, hello_body(1, 1))).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut raw, &mut got).expect("closed, not timed out");
    assert!(
        got.is_empty() || got[0] == 0x15,
        "an alert record at most: {got:?}"
    );

    let log = b.log();
    for why in [
        "peer sent no certificates",
        "UnknownIssuer",
        "certificate expired",
        "certificate not valid yet",
        "Revoked",
        "InvalidContentType",
    ] {
        assert!(
            log.contains("TLS handshake failed") && log.contains(why),
            "the broker names why ({why}):\n{log}"
        );
    }
    // The broker serves on after all of that.
    assert_ok(&cli(&addr, &pki.flags(Some("good")), &["topics", "list"]));
}

/// A certificate refused by either side does not fix itself: `produce`
/// fails at once with the reason, as `topics list` does, instead of
/// retrying for --retry-timeout-ms and saying only "timed out".
#[test]
fn produce_fails_at_once_with_the_reason_when_tls_refuses_the_session() {
    let (_keep, mut pki) = pki_dir();
    pki.issue("good", "dev-1", &[], Valid::Now, None);
    let revoked = pki.issue("revoked", "dev-4", &[], Valid::Now, None);
    pki.revoked.push(revoked);
    pki.write_crl();
    let section = pki.server_section(true, &format!("crl = {:?}\n", pki.path("crl.pem")));
    let b = Broker::start(&section);
    let addr = tls_addr(&b);
    assert_ok(&cli(
        &addr,
        &pki.flags(Some("good")),
        &["topics", "create", "t"],
    ));
    let mut wrong_name = pki.flags(Some("good"));
    wrong_name.extend([
        "--tls-server-name".to_owned(),
        "elsewhere.example".to_owned(),
    ]);
    for (flags, why) in [
        (wrong_name, "certificate not valid for name"),
        (pki.flags(None), "CertificateRequired"),
        (pki.flags(Some("revoked")), "CertificateRevoked"),
    ] {
        let started = Instant::now();
        let o = cli(
            &addr,
            &flags,
            &["produce", "t", "x", "--retry-timeout-ms", "30000"],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{why}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{why}: not retried for the whole timeout: {err}"
        );
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains("cannot connect") && last.contains(why) && !last.contains("timed out"),
            "{why}: {err}"
        );
        // Refused on the first attempt: no "retrying" line before, also
        // when the broker's reset beat the client's hello (the alert is
        // read after it; forced in client::connection's tests).
        assert_eq!(err.lines().count(), 1, "{why}: {err}");
    }
    assert_ok(&cli(
        &addr,
        &pki.flags(Some("good")),
        &["produce", "t", "x"],
    ));
}

/// A raw TLS 1.3 client with the certificate NAME of `pki`.
fn raw_tls_client(pki: &Pki, name: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(pki.path(&format!("{name}.pem")))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key"))).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    std::sync::Arc::new(config)
}

/// Connects to `addr` with `config`, writes a request the moment the
/// client's side of the handshake is done, and reads the socket to its
/// end: how that ended (an error for a reset), and what the broker said
/// before, as rustls reads it (a refusal's alert is an error).
fn refused_after_request(
    addr: &str,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> (std::io::Result<usize>, Result<(), rustls::Error>, bool) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.writer().write_all(b"a request").unwrap();
    while conn.wants_write() {
        conn.write_tls(&mut tcp).unwrap();
    }
    let mut received = Vec::new();
    let end = tcp.read_to_end(&mut received);
    let mut rest = &received[..];
    let mut said = Ok(());
    while !rest.is_empty() && said.is_ok() {
        conn.read_tls(&mut rest).unwrap();
        said = conn.process_new_packets().map(drop);
    }
    let closed = said.is_ok() && conn.process_new_packets().unwrap().peer_has_closed();
    (end, said, closed)
}

/// The broker closes a refused TLS client's connection gracefully: what
/// it said (an alert, a close_notify), then a FIN, never a reset. With
/// TLS 1.3 a client has finished its side of the handshake before the
/// broker checks its certificate and writes its first request at once; a
/// broker that closed with those bytes unread made the kernel reset the
/// connection, which a client could see before the alert. A raw rustls
/// client here writes a request right after its handshake and reads the
/// socket to its end: not "connection reset". Repeated, as a reset's
/// timing varies.
#[test]
fn a_refused_tls_client_reads_the_refusal_and_an_orderly_close() {
    let (_keep, mut pki) = pki_dir();
    let revoked = pki.issue("revoked", "dev-4", &[], Valid::Now, None);
    pki.revoked.push(revoked);
    pki.write_crl();
    pki.issue("nodns", "dev-5", &[], Valid::Now, None);
    // The certificate refused in the handshake: the alert says why.
    let section = pki.server_section(true, &format!("crl = {:?}\n", pki.path("crl.pem")));
    let b = Broker::start(&section);
    let config = raw_tls_client(&pki, "revoked");
    for attempt in 0..10 {
        let (end, said, _) = refused_after_request(&tls_addr(&b), &config);
        assert!(end.is_ok(), "attempt {attempt}: {end:?}");
        let said = said.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            said.contains("CertificateRevoked"),
            "attempt {attempt}: {said:?}"
        );
    }
    // A certificate trusted but naming no identity, refused after the
    // handshake: a close_notify.
    let section = pki.server_section(true, "identity_from = \"san-dns\"\n");
    let b = Broker::start(&section);
    let config = raw_tls_client(&pki, "nodns");
    for attempt in 0..10 {
        let (end, said, closed) = refused_after_request(&tls_addr(&b), &config);
        assert!(end.is_ok(), "attempt {attempt}: {end:?}");
        assert!(said.is_ok() && closed, "attempt {attempt}: {said:?}");
    }
    assert!(b.log().contains("names no identity"), "{}", b.log());
}

/// A mutual-TLS session refused after its handshake by its identity's
/// limit (`quotas.max_connections_per_identity`) is closed in order: the
/// too_many_connections frame, a close_notify and a FIN, and what the
/// client writes meanwhile read and dropped, so its next write meets no
/// reset. (A hello that comes with the client's Finished is mostly read
/// by the handshake already, so this path was seldom reset before the
/// drain; the plain-TCP and Unix ones were: tests/config_errors.rs.)
#[test]
fn a_tls_session_over_its_identity_limit_is_refused_then_closed_in_order() {
    use std::io::{Read, Write};
    let (_keep, mut pki) = pki_dir();
    pki.issue("dev-1", "dev-1", &[], Valid::Now, None);
    let section = pki.server_section(true, "[quotas]\nmax_connections_per_identity = 1\n");
    let b = Broker::start(&section);
    let config = raw_tls_client(&pki, "dev-1");
    let connect = || {
        let tcp = std::net::TcpStream::connect(tls_addr(&b)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    };
    let hello = request_frame(1, hello_body(1, 1));
    let answer = |s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>| {
        let mut prefix = [0u8; 4];
        s.read_exact(&mut prefix).expect("a frame's prefix");
        let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
        s.read_exact(&mut body).expect("a frame's body");
        skiff::protocol::decode_response(&body)
            .expect("a response")
            .body
    };
    let mut held = connect();
    held.write_all(&hello).unwrap();
    assert!(matches!(answer(&mut held), ResponseBody::Hello(_)));

    let mut refused = connect();
    refused.write_all(&hello).unwrap();
    match answer(&mut refused) {
        ResponseBody::Error(e) => assert_eq!(e.code, ErrorCode::TooManyConnections, "{e:?}"),
        other => panic!("not a refusal: {other:?}"),
    }
    assert_eq!(refused.read(&mut [0u8; 64]).expect("a close_notify"), 0);
    // A reset, had one been sent, has arrived by now: the write would fail.
    std::thread::sleep(Duration::from_millis(200));
    refused
        .write_all(&hello)
        .expect("a write after the refusal");
    drop(held);
}

/// A client of a broker whose TLS takes clients without a certificate.
fn anonymous_tls_client(pki: &Pki, b: &Broker) -> blocking::Client {
    let config = ClientConfig {
        tls: Some(pki.options(None, None)),
        ..ClientConfig::default()
    };
    blocking::Client::connect_with(&tls_addr(b), config)
        .unwrap_or_else(|e| panic!("{e}; the broker's log:\n{}", b.log()))
}

/// Connects to `addr` and writes a handshake record's first bytes (a
/// record of 512 bytes, its first 2), as a client writing its ClientHello
/// does; then reads what the broker does, which must be an orderly end
/// with nothing said.
#[track_caller]
fn hello_prefix_closed_in_order(addr: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    let mut buf = [0u8; 64];
    let end = s.read(&mut buf).map_err(|e| e.kind());
    assert_eq!(end, Ok(0), "an orderly end, nothing said");
    s
}

/// Sends more on a connection the broker has closed its side of, then
/// closes ours: the broker must read and drop it, where a closed socket
/// answers with a reset (within a round trip).
#[track_caller]
fn more_bytes_are_not_reset(mut s: std::net::TcpStream) {
    use std::io::Write;
    let wrote = s.write_all(&[0; 100]).map_err(|e| e.kind());
    let shut = s.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut reset = None;
    while reset.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        reset = s.take_error().unwrap();
    }
    assert!(
        wrote.is_ok() && shut.is_ok() && reset.is_none(),
        "no reset: {wrote:?}, {shut:?}, {reset:?}"
    );
}

/// A TLS client that has not finished its handshake in
/// `server.tls.handshake_timeout_ms` is cut off in order, as a refused one
/// is: a FIN, then what it still sends is read and dropped, so it sees no
/// reset. A client sending its ClientHello slowly has its next bytes on
/// the way when the broker gives up; a broker that closed its socket
/// outright answered them with a reset. Counted as timed out; the
/// address's slot is another client's from the cut-off on.
#[test]
fn a_tls_handshake_that_times_out_closes_in_order() {
    let (_keep, pki) = pki_dir();
    // The last client's whole handshake must fit in the timeout too: on a
    // busy CI machine one did not fit in 300 ms.
    let b = Broker::start(&pki.server_section(
        false,
        "handshake_timeout_ms = 1000\n\
         [quotas]\nmax_connections_per_ip = 1\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    ));
    let addr = tls_addr(&b);
    // The rest of the hello is never sent: the handshake times out.
    more_bytes_are_not_reset(hello_prefix_closed_in_order(&addr));
    assert!(
        b.log().contains("TLS handshake not done in 1000 ms"),
        "{}",
        b.log()
    );
    let text = http_get(&b.metrics_addr(), "/metrics");
    assert_eq!(
        sample(&text, "skiff_connections_timed_out_total", ""),
        Some(1.0),
        "{text}"
    );
    // One that says nothing more and stays: while the broker still reads
    // it, a client from the same address gets in.
    let _silent = hello_prefix_closed_in_order(&addr);
    anonymous_tls_client(&pki, &b).list_topics().unwrap();
}

/// A client refused in its handshake is closed in order, which takes up
/// to a second while it keeps its socket open; its address's slot is
/// given back first, so another client from there gets in meanwhile. The
/// failure is counted in `tls_handshake_failures_total`.
#[test]
fn a_refused_tls_client_leaves_its_address_slot_while_it_is_closed() {
    use std::io::{Read, Write};
    let (_keep, pki) = pki_dir();
    let b = Broker::start(&pki.server_section(
        false,
        "[quotas]\nmax_connections_per_ip = 1\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    ));
    let addr = tls_addr(&b);
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // The alert, then the broker's FIN; this client stays.
    let mut said = Vec::new();
    plain.read_to_end(&mut said).unwrap();
    assert_eq!(said.first(), Some(&0x15), "an alert: {said:?}");
    anonymous_tls_client(&pki, &b).list_topics().unwrap();
    let text = http_get(&b.metrics_addr(), "/metrics");
    assert_eq!(
        sample(&text, "skiff_tls_handshake_failures_total", ""),
        Some(1.0),
        "{text}"
    );
}

/// A TLS client refused before its handshake, by its address's limit or
/// by `server.max_connections`, is closed in order as a refused handshake
/// is: its ClientHello may be in already, and a broker that dropped the
/// socket with it unread (or answered later bytes on a closed socket)
/// reset the connection. The client sees a FIN, and what it still sends is
/// read and dropped.
#[test]
fn a_tls_client_refused_by_a_connection_limit_is_closed_in_order() {
    let (_keep, pki) = pki_dir();
    for limit in [
        "[quotas]\nmax_connections_per_ip = 1\n",
        "[server]\nmax_connections = 1\n",
    ] {
        let b = Broker::start(&pki.server_section(false, limit));
        let held = anonymous_tls_client(&pki, &b);
        held.list_topics().unwrap();
        eprintln!("refused by {limit}");
        more_bytes_are_not_reset(hello_prefix_closed_in_order(&tls_addr(&b)));
        held.list_topics().unwrap();
    }
}

/// A connection in its TLS handshake holds a `server.max_connections`
/// slot from its accept on: rustls's state and buffers are memory the
/// budget counts per connection. Clients that send a ClientHello's first
/// bytes and nothing more hold every slot, so a further client is refused
/// (closed before its handshake); once theirs time out, the slots are
/// given back and a client gets in. Before, handshakes were not counted,
/// and any number of them could be in flight. `connections_handshaking`
/// shows them meanwhile: `connections` counts a TLS connection from the
/// end of its handshake only, and read 0 while these held every slot.
#[test]
fn tls_handshakes_in_flight_hold_max_connections_slots() {
    use std::io::{Read, Write};
    let (_keep, pki) = pki_dir();
    // Long enough that the refused client surely comes while the silent
    // ones are still in their handshakes, even on a busy machine.
    let b = Broker::start(&pki.server_section(
        false,
        "handshake_timeout_ms = 5000
[server]
max_connections = 2
[metrics]
listen = \"127.0.0.1:0\"
",
    ));
    let addr = tls_addr(&b);
    let silent: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                .unwrap();
            s
        })
        .collect();
    let config = ClientConfig {
        tls: Some(pki.options(None, None)),
        ..ClientConfig::default()
    };
    // Accepted after the silent ones (the accept queue is in order).
    let refused = blocking::Client::connect_with(&addr, config).map(|_| ());
    assert!(refused.is_err(), "refused: {refused:?}; {}", b.log());
    let handshaking = || {
        let text = http_get(&b.metrics_addr(), "/metrics");
        sample(&text, "skiff_connections_handshaking", "").unwrap_or_else(|| panic!("{text}"))
    };
    assert_eq!(handshaking(), 2.0);
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let end = s.read(&mut [0u8; 64]).map_err(|e| e.kind());
        assert_eq!(end, Ok(0), "timed out, closed in order");
    }
    assert_eq!(handshaking(), 0.0);
    // Their slots were given back before their closes began.
    anonymous_tls_client(&pki, &b).list_topics().unwrap();
}

/// A stop does not wait for TLS handshakes in flight, though they hold
/// `server.max_connections` slots: they are dropped, slots and all, so the
/// graceful stop's wait for connections ends at once rather than at its
/// bound with "still busy".
#[test]
fn a_stop_drops_tls_handshakes_in_flight() {
    use std::io::Write;
    let (_keep, pki) = pki_dir();
    let mut b = Broker::start(&pki.server_section(
        false,
        "handshake_timeout_ms = 600000
",
    ));
    let addr = tls_addr(&b);
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    // Accepted after the silent one: that one is in its handshake now.
    anonymous_tls_client(&pki, &b).list_topics().unwrap();
    assert_eq!(b.stop(), Some(0), "{}", b.log());
    assert!(!b.log().contains("still busy"), "{}", b.log());
}

/// `skiff bench handshake`: full and resumed TLS handshakes, each ending
/// with skiff's hello answered (whose answer brings the session tickets).
#[test]
fn bench_handshake_counts_full_and_resumed_handshakes() {
    let (_keep, pki) = pki_dir();
    let b = Broker::start(&pki.server_section(false, ""));
    let out = cli(
        &tls_addr(&b),
        &pki.flags(None),
        &["bench", "handshake", "--count", "5"],
    );
    assert_ok(&out);
    let line = &json_lines(&out)[0];
    assert_eq!(line["workload"], "tls_handshake", "{line}");
    assert_eq!(line["count"], 5, "{line}");
    assert_eq!(line["resumed"], 5, "every second handshake resumes: {line}");
}

/// OpenSSL offering TLS 1.1 only (its security level lowered so it will
/// send such a hello) is refused by the broker: rustls answers with a
/// handshake_failure alert (a TLS 1.1 hello lacks the signature_algorithms
/// extension every version rustls speaks requires) and no session is
/// made. Offering TLS 1.2, OpenSSL gets in.
#[test]
fn tls_1_1_is_refused_and_1_2_accepted() {
    let (_keep, mut pki) = pki_dir();
    pki.issue("good", "dev-1", &[], Valid::Now, None);
    let b = Broker::start(&pki.server_section(true, ""));
    let addr = tls_addr(&b);
    let s_client = |version: &str| {
        let out = std::process::Command::new("openssl")
            .args([
                "s_client",
                version,
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
                "-connect",
            ])
            .arg(&addr)
            .args(["-CAfile", &s(&pki.path("ca.pem"))])
            .args(["-cert", &s(&pki.path("good.pem"))])
            .args(["-key", &s(&pki.path("good.key"))])
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client (scripts/test installs openssl)");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let old = s_client("-tls1_1");
    assert!(
        old.contains("alert handshake failure") || old.contains("alert protocol version"),
        "the broker answers TLS 1.1 with an alert (OpenSSL did send its hello):\n{old}"
    );
    assert!(old.contains("Cipher is (NONE)"), "no session:\n{old}");
    wait_until(Duration::from_secs(10), "the broker's log line", || {
        b.log()
            .contains("TLS handshake failed: peer is incompatible")
    });
    let ok = s_client("-tls1_2");
    assert!(ok.contains("Protocol  : TLSv1.2"), "{ok}");
}

#[test]
fn acls_allow_devices_their_own_topics_only() {
    let (_keep, mut pki) = pki_dir();
    for cn in ["dev-1", "dashboard", "admin"] {
        pki.issue(cn, cn, &[], Valid::Now, None);
    }
    // SAFETY: getuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    let extra = format!(
        "{}
[[server.unix_identities]]
uid = {uid}
identity = \"local-ops\"

[acl]
enabled = true
[[acl.rules]]
identity = \"dev-*\"
topics = [\"sensors.*\"]
operations = [\"produce\"]
[[acl.rules]]
identity = \"dashboard\"
topics = [\"sensors.*\"]
operations = [\"consume\"]
[[acl.rules]]
identity = \"dashboard\"
topics = [\"dash-*\"]
operations = [\"group\"]
[[acl.rules]]
identity = \"admin\"
topics = [\"*\"]
operations = [\"create\", \"delete\", \"describe\"]
[[acl.rules]]
identity = \"local-ops\"
topics = [\"ops.*\"]
operations = [\"create\", \"produce\"]
",
        pki.server_section(true, "")
    );
    let b = Broker::start(&extra);
    let addr = tls_addr(&b);
    let admin = pki.flags(Some("admin"));
    let dev = pki.flags(Some("dev-1"));
    let dash = pki.flags(Some("dashboard"));
    for t in ["sensors.temp", "billing"] {
        assert_ok(&cli(&addr, &admin, &["topics", "create", t]));
    }
    assert_ok(&cli(&addr, &dev, &["produce", "sensors.temp", "21.5"]));

    let denied = |flags: &[String], args: &[&str], needle: &str| {
        let o = cli(&addr, flags, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("not_authorized") && err.contains(needle),
            "{err}"
        );
    };
    denied(
        &dev,
        &["produce", "billing", "x"],
        "not authorized for topic 'billing'",
    );
    denied(
        &dev,
        &["consume", "sensors.temp", "--count", "1"],
        "not authorized for topic 'sensors.temp'",
    );
    denied(&dev, &["topics", "create", "sensors.new"], "may not create");
    denied(&dash, &["topics", "delete", "billing"], "may not delete");

    let o = cli(
        &addr,
        &dash,
        &[
            "consume",
            "sensors.temp",
            "--count",
            "1",
            "--timeout-ms",
            "5000",
        ],
    );
    assert_ok(&o);
    assert_eq!(stdout(&o), "21.5\n");
    // A listing shows what the identity may see, nothing else.
    let o = cli(&addr, &dev, &["topics", "list"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "sensors.temp\n");

    // Plaintext TCP is anonymous, which no rule names.
    let o = b.cli(&["topics", "list"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "", "anonymous sees no topic");
    // Refused its producer id once connected: not a connection failure,
    // and worded as the broker logs it.
    let o = b.cli(&["produce", "sensors.temp", "x"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "skiff: produce to sensors.temp: server error not_authorized: identity 'anonymous' \
         may not produce '*': no [acl] rule lets it produce to any topic\n"
    );
    // The Unix socket names its peer by uid, here through unix_identities.
    let unix = b.unix_addr();
    assert_ok(&run_cli(&["topics", "create", "ops.audit"], &unix, None));
    assert_ok(&run_cli(&["produce", "ops.audit", "hello"], &unix, None));
    let o = run_cli(&["produce", "sensors.temp", "x"], &unix, None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not_authorized"), "{}", stderr(&o));

    let log = b.log();
    assert!(
        log.contains("not authorized: identity 'dev-1' may not describe 'billing'"),
        "{log}"
    );

    // `skiff acl check` decides as the broker does, from the same config.
    let check = |args: &[&str]| {
        let mut a = vec!["acl", "check"];
        a.extend_from_slice(args);
        a.extend(["--config", b.config_path.to_str().unwrap()]);
        run_bin(&a)
    };
    let o = check(&["dev-7", "produce", "sensors.humidity"]);
    assert_ok(&o);
    assert_eq!(
        stdout(&o),
        "allow: rule 1 (identity \"dev-*\", topics [\"sensors.*\"], operations [\"produce\"])\n"
    );
    let o = check(&["dashboard", "group", "dash-main"]);
    assert_ok(&o);
    assert!(stdout(&o).starts_with("allow: rule 3 "), "{}", stdout(&o));
    let o = check(&["dashboard", "group", "someone-elses"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "deny: no rule allows it (default deny)\n");
    let o = check(&["dev-7", "fly", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn a_sighup_swaps_the_certificate_while_clients_stay_connected() {
    let dir = temp_dir();
    let mut pki = Pki::new(dir.path());
    pki.issue("server", "skiff-broker", &["old.skiff"], Valid::Now, None);
    pki.issue("dev", "dev-1", &[], Valid::Now, None);
    let b = Broker::start(&pki.server_section(true, ""));
    let addr = tls_addr(&b);
    let options = |name: &str| pki.options(Some("dev"), Some(name));
    let (old_name, new_name) = (options("old.skiff"), options("new.skiff"));
    let connect = |name: &str| {
        let tls = if name == "old.skiff" {
            &old_name
        } else {
            &new_name
        };
        blocking::Client::connect_with(
            &addr,
            ClientConfig {
                tls: Some(tls.clone()),
                connect_timeout: Duration::from_secs(5),
                ..ClientConfig::default()
            },
        )
    };
    let before = connect("old.skiff").expect("the old certificate is served");
    before
        .create_topic(skiff::protocol::CreateTopicRequest {
            name: "t".into(),
            ..Default::default()
        })
        .expect("create");
    assert!(connect("new.skiff").is_err(), "not the new one yet");

    pki.issue("server", "skiff-broker", &["new.skiff"], Valid::Now, None);
    b.sighup();
    wait_until(Duration::from_secs(20), "the reload", || {
        b.log().contains("SIGHUP: reloaded")
    });
    // New handshakes get the new certificate.
    let after = connect("new.skiff").expect("the new certificate is served");
    assert_eq!(after.list_topics().unwrap(), vec!["t".to_owned()]);
    assert!(connect("old.skiff").is_err(), "the old one is gone");
    // The client connected before is served on: had it reconnected, its
    // handshake would have failed (it checks for old.skiff).
    for _ in 0..3 {
        assert_eq!(before.list_topics().unwrap(), vec!["t".to_owned()]);
    }

    // A reload that fails (a key that is not the certificate's) changes
    // nothing and says why.
    std::fs::copy(pki.path("dev.key"), pki.path("server.key")).unwrap();
    b.sighup();
    wait_until(Duration::from_secs(20), "the failed reload", || {
        b.log().contains("SIGHUP: reload failed")
    });
    assert!(b.log().contains("invalid 'server.tls.key'"), "{}", b.log());
    assert!(connect("new.skiff").is_ok(), "still the last good setup");
}

/// Records of many sizes, up to the largest batch the broker takes, cross
/// TLS both ways byte for byte: TLS records split and join frames at
/// every offset, and the broker fills a frame from many of them.
#[test]
fn records_of_every_size_cross_tls_byte_for_byte() {
    let (_keep, mut pki) = pki_dir();
    pki.issue("dev", "dev-1", &[], Valid::Now, None);
    let b = Broker::start(&pki.server_section(true, ""));
    let client = ClientConfig {
        tls: Some(pki.options(Some("dev"), None)),
        connect_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let c = blocking::Client::connect_with(&tls_addr(&b), client.clone()).unwrap();
    c.create_topic(skiff::protocol::CreateTopicRequest {
        name: "sizes".into(),
        ..Default::default()
    })
    .unwrap();
    let max = c.server_info().unwrap().max_batch_bytes as usize;
    // Around a TLS record's 16 KiB of payload, and up to a batch's limit
    // (less room for the batch's own header).
    let sizes = [
        0,
        1,
        1000,
        16_381,
        16_384,
        16_390,
        100_000,
        max / 2,
        max - 1024,
    ];
    let value = |i: usize, len: usize| (0..len).map(|j| (j * 31 + i * 7) as u8).collect::<Vec<_>>();
    for (i, &len) in sizes.iter().enumerate() {
        let mut bb = skiff::batch::BatchBuilder::new();
        bb.push(i as i64, None, &value(i, len), &[]);
        let r = c
            .produce_raw(vec![ProducePartition {
                topic: "sizes".into(),
                partition: 0,
                batch: bb.finish(skiff::batch::ProducerStamp::NONE).into(),
            }])
            .unwrap();
        assert_eq!(r[0].error, ErrorCode::None, "{len} bytes: {:?}", r[0]);
    }
    let mut consumer = blocking::Consumer::connect(
        &tls_addr(&b),
        skiff::client::ConsumerConfig {
            client,
            ..Default::default()
        },
    )
    .unwrap();
    consumer
        .assign("sizes", Some(&[0]), skiff::client::StartFrom::Offset(0))
        .unwrap();
    let mut got = Vec::new();
    wait_until(Duration::from_secs(30), "every record back", || {
        got.extend(consumer.poll().unwrap());
        got.len() >= sizes.len()
    });
    assert_eq!(got.len(), sizes.len());
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        assert!(
            r.value == value(i, sizes[i]),
            "record {i} of {} bytes",
            sizes[i]
        );
    }
}

/// Produces `total` bytes in batches of `batch` as fast as the broker
/// answers; returns (answers with a throttle, batches, elapsed).
fn produce_flat_out(
    c: &blocking::Client,
    topic: &str,
    total: usize,
    batch: usize,
) -> (u32, u64, Duration) {
    let value = vec![b'q'; 1000];
    let mut throttled = 0;
    let mut batches = 0;
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let mut bb = skiff::batch::BatchBuilder::new();
        for _ in 0..batch / 1000 {
            bb.push(0, None, &value, &[]);
        }
        let bytes = bb.finish(skiff::batch::ProducerStamp::NONE);
        sent += bytes.len();
        batches += 1;
        let body = RequestBody::Produce(ProduceRequest {
            partitions: vec![ProducePartition {
                topic: topic.into(),
                partition: 0,
                batch: bytes.into(),
            }],
        });
        match smol::block_on(c.0.call(&body)).expect("produce") {
            ResponseBody::Produce(r) => {
                assert_eq!(r.partitions[0].error, ErrorCode::None, "{r:?}");
                if r.throttle_ms.is_some_and(|t| t > 0) {
                    throttled += 1;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    (throttled, batches, started.elapsed())
}

#[test]
fn a_greedy_producer_is_throttled_while_another_keeps_its_rate() {
    // Plaintext TCP is 'anonymous', the Unix socket 'uid:N': two
    // identities, one of them held to 200 KB/s.
    const RATE: usize = 200_000;
    let b = Broker::start(
        "[quotas]
[[quotas.overrides]]
identity = \"anonymous\"
produce_bytes_per_s = 200000
consume_bytes_per_s = 0
",
    );
    let greedy = blocking::Client::connect(&b.tcp).unwrap();
    let other = blocking::Client::connect(&b.unix_addr()).unwrap();
    for t in ["greedy", "other"] {
        greedy
            .create_topic(skiff::protocol::CreateTopicRequest {
                name: t.into(),
                ..Default::default()
            })
            .unwrap();
    }
    const TOTAL: usize = 1_000_000;
    const BATCH: usize = 50_000;
    let g = std::thread::spawn(move || produce_flat_out(&greedy, "greedy", TOTAL, BATCH));
    let (other_throttled, other_batches, _) = produce_flat_out(&other, "other", TOTAL, BATCH);
    let (greedy_throttled, greedy_batches, greedy_took) = g.join().unwrap();
    assert_eq!(other_throttled, 0, "the other identity is never held back");
    assert!(greedy_throttled > 0, "the greedy one was throttled");
    // The quota's bound, whatever the machine's speed: one second's burst,
    // then RATE. (Slower is always allowed.)
    let most = RATE as f64 * (1.0 + greedy_took.as_secs_f64()) + BATCH as f64 * 1.1;
    assert!(
        (TOTAL as f64) <= most,
        "{TOTAL} bytes in {greedy_took:?} is above the quota's {most}"
    );
    // Nothing was dropped: every byte of both is in the log.
    for (t, batches) in [("greedy", greedy_batches), ("other", other_batches)] {
        let hw = other
            .offset_for(t, 0, skiff::protocol::OffsetSpec::Latest)
            .unwrap()
            .unwrap();
        assert_eq!(hw, batches * (BATCH as u64 / 1000), "{t}");
    }
}

#[test]
fn connections_from_one_address_are_limited() {
    let b = Broker::start("[quotas]\nmax_connections_per_ip = 2\n");
    let c1 = blocking::Client::connect(&b.tcp).unwrap();
    let c2 = blocking::Client::connect(&b.tcp).unwrap();
    match blocking::Client::connect(&b.tcp) {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::TooManyConnections);
            assert!(message.contains("max_connections_per_ip"), "{message}");
        }
        other => panic!("a third connection from 127.0.0.1: {other:?}"),
    }
    // The Unix socket is not an address: it is not counted.
    let _u = blocking::Client::connect(&b.unix_addr()).unwrap();
    drop(c1);
    wait_until(Duration::from_secs(10), "a slot given back", || {
        blocking::Client::connect(&b.tcp).is_ok()
    });
    drop(c2);
}

/// `serve` with `[server.tls]` that cannot be used: exit 2, the key named.
#[test]
fn a_broken_tls_config_stops_serve_with_the_key_named() {
    let dir = temp_dir();
    let mut pki = Pki::new(dir.path());
    pki.issue("server", "skiff-broker", &["localhost"], Valid::Now, None);
    pki.issue("other", "x", &[], Valid::Now, None);
    pki.issue("old", "skiff-broker", &["localhost"], Valid::Expired, None);
    let cases = [
        (
            format!(
                "cert = {:?}\nkey = {:?}\n",
                dir.path().join("missing.pem"),
                pki.path("server.key")
            ),
            "invalid 'server.tls.cert': cannot read",
        ),
        (
            format!(
                "cert = {:?}\nkey = {:?}\n",
                pki.path("server.pem"),
                pki.path("other.key")
            ),
            "invalid 'server.tls.key': the key in",
        ),
        (
            format!(
                "cert = {:?}\nkey = {:?}\n",
                pki.path("old.pem"),
                pki.path("old.key")
            ),
            "invalid 'server.tls.cert': the certificate in",
        ),
        (
            format!(
                "cert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
                pki.path("server.pem"),
                pki.path("server.key"),
                pki.path("server.key")
            ),
            "invalid 'server.tls.client_ca'",
        ),
    ];
    for (i, (keys, needle)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\nunix_socket = \"\"\n[server.tls]\nlisten = \"127.0.0.1:0\"\n{keys}",
                dir.path().join("data")
            ),
        )
        .unwrap();
        let mut child = skiff_command()
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("case {i}: serve started with a broken TLS config");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: {err}");
        assert!(
            !dir.path().join("data").exists(),
            "case {i}: storage was not opened"
        );
        // `config check` reads the files the same way.
        let o = run_bin(&["config", "check", config.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "case {i}");
        assert!(stderr(&o).contains(needle), "case {i}: {}", stderr(&o));
    }
}

/// Before its handshake is done a client can make the broker hold little:
/// a ClientHello that claims to be 16 MiB is refused at its first record
/// (rustls joins handshake messages up to 64 KiB), and the broker serves on.
#[test]
fn an_oversized_handshake_is_cut_off_at_its_first_record() {
    let (_keep, mut pki) = pki_dir();
    pki.issue("good", "dev-1", &[], Valid::Now, None);
    let b = Broker::start(&pki.server_section(true, ""));
    let addr = tls_addr(&b);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A handshake record of 16 KiB whose ClientHello claims 0xffffff bytes.
    let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
    record.resize(5 + 0x4000, 0);
    // The broker may close before it has read it all.
    let _ = std::io::Write::write_all(&mut s, &record);
    let mut got = Vec::new();
    match std::io::Read::read_to_end(&mut s, &mut got) {
        // Closed with unread bytes in its buffer, the kernel resets.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the broker kept the connection open: {e}"),
    }
    assert!(got.len() <= 7, "at most an alert: {got:?}");
    wait_until(Duration::from_secs(10), "the log line", || {
        b.log().contains("TLS handshake failed")
    });
    assert_ok(&cli(&addr, &pki.flags(Some("good")), &["topics", "list"]));
}

/// What TLS connections cost the broker stays within what the memory
/// budget counts for them: rustls's buffers (`TLS_CONNECTION_BYTES`) and
/// the session's own state and first read buffer.
#[test]
fn idle_tls_connections_cost_less_than_the_budget_counts() {
    let (_keep, mut pki) = pki_dir();
    pki.issue("good", "dev-1", &[], Valid::Now, None);
    let b = Broker::start(&pki.server_section(true, ""));
    let addr = tls_addr(&b);
    let config = ClientConfig {
        tls: Some(pki.options(Some("good"), None)),
        ..ClientConfig::default()
    };
    // One first, so the allocator's and the TLS stack's start-up costs are
    // in the baseline.
    let first = blocking::Client::connect_with(&addr, config.clone()).unwrap();
    let before = b.rss_kib();
    const N: u64 = 50;
    let held: Vec<_> = (0..N)
        .map(|_| blocking::Client::connect_with(&addr, config.clone()).unwrap())
        .collect();
    for c in &held {
        c.list_topics().unwrap();
    }
    let after = b.rss_kib();
    let per_connection = skiff::config::TLS_CONNECTION_BYTES / 1024
        + skiff::config::CONNECTION_STATE_BYTES / 1024
        + 8;
    assert!(
        after.saturating_sub(before) <= N * per_connection,
        "{N} TLS connections took {} KiB, more than {N} x {per_connection} KiB",
        after - before
    );
    drop((first, held));
}

#[test]
fn a_greedy_consumer_is_throttled_to_its_rate() {
    const RATE: f64 = 200_000.0;
    let b = Broker::start(
        "[quotas]
[[quotas.overrides]]
identity = \"anonymous\"
produce_bytes_per_s = 0
consume_bytes_per_s = 200000
",
    );
    // Written over the Unix socket, whose identity has no quota.
    let writer = blocking::Client::connect(&b.unix_addr()).unwrap();
    writer
        .create_topic(skiff::protocol::CreateTopicRequest {
            name: "data".into(),
            ..Default::default()
        })
        .unwrap();
    let (_, batches, _) = produce_flat_out(&writer, "data", 1_000_000, 50_000);
    let reader = blocking::Client::connect(&b.tcp).unwrap();
    let (mut offset, mut bytes, mut throttled) = (0u64, 0usize, 0u32);
    let started = Instant::now();
    while offset < batches * 50 {
        let r = reader
            .fetch(skiff::protocol::FetchRequest {
                partitions: vec![skiff::protocol::FetchPartition {
                    topic: "data".into(),
                    partition: 0,
                    offset,
                    max_bytes: 60_000,
                }],
                max_wait_ms: 0,
                min_bytes: 0,
                isolation: None,
            })
            .unwrap();
        if r.throttle_ms.is_some_and(|t| t > 0) {
            throttled += 1;
        }
        let p = &r.partitions[0];
        assert_eq!(p.error, ErrorCode::None, "{p:?}");
        bytes += p.records.len();
        let last = skiff::batch::BatchIter::new(&p.records)
            .map(|b| b.unwrap().header)
            .last()
            .expect("a batch");
        offset = last.base_offset + u64::from(last.record_count);
    }
    let took = started.elapsed().as_secs_f64();
    assert!(throttled > 0, "the reader was throttled");
    // One second's burst, then the rate; the last fetch is charged after
    // it is read. (Slower is always allowed.)
    let most = RATE * (1.0 + took) + 60_000.0 * 1.1;
    assert!(
        (bytes as f64) <= most,
        "{bytes} bytes in {took:.1} s is above the quota's {most}"
    );
}
