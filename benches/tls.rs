//! The floor under TLS's cost: how fast this CPU seals and opens TLS
//! records, with no sockets, no executor and no broker. Two figures per
//! cipher suite, in the thread's CPU time (so a busy machine slows the
//! run but not the figures much):
//!
//! - `ring`: ring's AEAD sealing and opening 16 KiB in place (a full TLS
//!   record's payload), back to back;
//! - `rustls`: a rustls client sending application data to a rustls
//!   server in memory, 64 KiB writes as skiff's writers make them: the
//!   encryption and decryption plus rustls's framing and copies.
//!
//! Both as ms of CPU per MB (1e6 bytes) carried, encryption and decryption
//! together, to set against what a TLS produce costs the broker and the
//! client over plaintext (docs/performance.md, "TLS").
//!
//! Then the receiving side alone, as the broker's reader sees it: each
//! 64 KiB write's plaintext copied into a frame buffer through rustls's
//! buffered API (`read_tls`, `reader().read`), through its unbuffered API
//! (`UnbufferedServerConnection`, ciphertext in the caller's buffer), and
//! the floor: ring opening the records in place and one copy into the
//! frame. `cargo bench --bench tls`; `SKIFF_TLS_BENCH_MB` (default 256)
//! sets the data per figure.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use common::thread_cpu;

use ring::aead;
use rustls::crypto::ring::cipher_suite as cs;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::ConnectionState;
use rustls::{
    ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection,
    SupportedCipherSuite,
};

const RECORD: usize = 16 * 1024;
const WRITE: usize = 64 * 1024;

fn megabytes() -> usize {
    std::env::var("SKIFF_TLS_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// ms per MB to seal and then open `bytes` in records of [`RECORD`].
fn ring_ms_per_mb(alg: &'static aead::Algorithm, bytes: usize) -> f64 {
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &vec![7; alg.key_len()]).unwrap());
    let mut record = vec![0x5a; RECORD];
    let records = bytes / RECORD;
    let start = thread_cpu();
    for i in 0..records {
        let nonce = |i: usize| {
            let mut n = [0u8; aead::NONCE_LEN];
            n[4..].copy_from_slice(&(i as u64).to_be_bytes());
            aead::Nonce::assume_unique_for_key(n)
        };
        let tag = key
            .seal_in_place_separate_tag(nonce(i), aead::Aad::empty(), &mut record)
            .unwrap();
        record.extend_from_slice(tag.as_ref());
        let plain = key
            .open_in_place(nonce(i), aead::Aad::empty(), &mut record)
            .unwrap();
        let n = plain.len();
        record.truncate(n);
    }
    (thread_cpu() - start).as_secs_f64() * 1e3 / ((records * RECORD) as f64 / 1e6)
}

/// Replaces `wire`'s contents with everything `c` has to send.
fn take_tls(c: &mut Connection, wire: &mut Vec<u8>) {
    wire.clear();
    while c.wants_write() {
        c.write_tls(wire).unwrap();
    }
}

/// Moves what `from` has to send into `to`, and drains `to`'s plaintext.
fn pump(from: &mut Connection, to: &mut Connection, wire: &mut Vec<u8>) {
    take_tls(from, wire);
    let mut rd = &wire[..];
    let mut sink = [0u8; WRITE];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
        while let Ok(n) = to.reader().read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
}

/// A client and a server config offering only `suite`.
fn configs(suite: SupportedCipherSuite) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(client), Arc::new(server))
}

fn client(config: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap()
}

/// ms per MB of application data from a rustls client to a rustls server.
fn rustls_ms_per_mb(suite: SupportedCipherSuite, bytes: usize) -> f64 {
    let (cc, sc) = configs(suite);
    let mut c = Connection::from(client(&cc));
    let mut s = Connection::from(ServerConnection::new(sc).unwrap());
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        pump(&mut c, &mut s, &mut wire);
        pump(&mut s, &mut c, &mut wire);
    }
    assert_eq!(c.negotiated_cipher_suite(), Some(suite));
    let chunk = vec![0x5a; WRITE];
    let writes = bytes / WRITE;
    let start = thread_cpu();
    for _ in 0..writes {
        c.writer().write_all(&chunk).unwrap();
        pump(&mut c, &mut s, &mut wire);
    }
    (thread_cpu() - start).as_secs_f64() * 1e3 / ((writes * WRITE) as f64 / 1e6)
}

/// A server on rustls's unbuffered API, its ciphertext in its own buffer
/// (`inc[start..end]`), as a reader of the socket would hold it.
struct Unbuffered {
    conn: UnbufferedServerConnection,
    inc: Vec<u8>,
    start: usize,
    end: usize,
}

impl Unbuffered {
    /// Takes `wire` from the client, appends what the server sends back to
    /// `back`, and copies the plaintext into `frame` (from `at`, wrapping).
    fn receive(&mut self, wire: &[u8], back: &mut Vec<u8>, frame: &mut [u8], at: &mut usize) {
        if self.inc.len() - self.end < wire.len() {
            self.inc.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.inc.len() - self.end < wire.len() {
                self.inc.resize(self.end + wire.len(), 0);
            }
        }
        self.inc[self.end..self.end + wire.len()].copy_from_slice(wire);
        self.end += wire.len();
        loop {
            let status = self
                .conn
                .process_tls_records(&mut self.inc[self.start..self.end]);
            let mut discard = status.discard;
            let blocked = match status.state.unwrap() {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.unwrap();
                        discard += rec.discard;
                        copy_wrapping(rec.payload, frame, at);
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let len = back.len();
                    back.resize(len + 64 * 1024, 0);
                    let n = e.encode(&mut back[len..]).unwrap();
                    back.truncate(len + n);
                    false
                }
                // `back` is the client's to read.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                _ => true,
            };
            self.start += discard;
            if blocked {
                return;
            }
        }
    }
}

fn copy_wrapping(payload: &[u8], frame: &mut [u8], at: &mut usize) {
    for piece in payload.chunks(frame.len()) {
        if *at + piece.len() > frame.len() {
            *at = 0;
        }
        frame[*at..*at + piece.len()].copy_from_slice(piece);
        *at += piece.len();
    }
}

/// ms of the receiver's CPU per MB, each 64 KiB write's plaintext copied
/// into a frame buffer: rustls buffered, rustls unbuffered, and ring alone
/// opening records in place.
fn receive_ms_per_mb(
    suite: SupportedCipherSuite,
    alg: &'static aead::Algorithm,
    bytes: usize,
) -> (f64, f64, f64) {
    let (cc, sc) = configs(suite);
    let chunk = vec![0x5a; WRITE];
    let writes = bytes / WRITE;
    let mb = (writes * WRITE) as f64 / 1e6;
    let mut frame = vec![0u8; 4 * WRITE];
    let mut at = 0;
    let mut wire = Vec::new();

    // Both receivers and the floor take turns with each write, so all
    // three see the same machine.
    let mut c = Connection::from(client(&cc));
    let mut s = Connection::from(ServerConnection::new(sc.clone()).unwrap());
    while c.is_handshaking() || s.is_handshaking() {
        pump(&mut c, &mut s, &mut wire);
        pump(&mut s, &mut c, &mut wire);
    }
    let mut cu = Connection::from(client(&cc));
    let mut u = Unbuffered {
        conn: UnbufferedServerConnection::new(sc).unwrap(),
        inc: vec![0; 4 * WRITE],
        start: 0,
        end: 0,
    };
    let mut back = Vec::new();
    // Until the client's last flight is in too.
    while cu.is_handshaking() || cu.wants_write() {
        take_tls(&mut cu, &mut wire);
        back.clear();
        u.receive(&wire, &mut back, &mut frame, &mut at);
        let mut rd = &back[..];
        while !rd.is_empty() {
            cu.read_tls(&mut rd).unwrap();
            cu.process_new_packets().unwrap();
        }
    }
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &vec![7; alg.key_len()]).unwrap());
    let mut record = Vec::with_capacity(RECORD + aead::MAX_TAG_LEN);
    let [mut buffered, mut unbuffered, mut floor] = [Duration::ZERO; 3];
    for w in 0..writes {
        c.writer().write_all(&chunk).unwrap();
        take_tls(&mut c, &mut wire);
        let start = thread_cpu();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
            loop {
                if at + WRITE > frame.len() {
                    at = 0;
                }
                match s.reader().read(&mut frame[at..at + WRITE]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => at += n,
                }
            }
        }
        buffered += thread_cpu() - start;

        cu.writer().write_all(&chunk).unwrap();
        take_tls(&mut cu, &mut wire);
        back.clear();
        let start = thread_cpu();
        u.receive(&wire, &mut back, &mut frame, &mut at);
        unbuffered += thread_cpu() - start;

        for r in 0..WRITE / RECORD {
            let nonce = || {
                let mut n = [0u8; aead::NONCE_LEN];
                n[4..].copy_from_slice(&((w * WRITE / RECORD + r) as u64).to_be_bytes());
                aead::Nonce::assume_unique_for_key(n)
            };
            record.clear();
            record.extend_from_slice(&chunk[..RECORD]);
            key.seal_in_place_append_tag(nonce(), aead::Aad::empty(), &mut record)
                .unwrap();
            let start = thread_cpu();
            let plain = key
                .open_in_place(nonce(), aead::Aad::empty(), &mut record)
                .unwrap();
            copy_wrapping(plain, &mut frame, &mut at);
            floor += thread_cpu() - start;
        }
    }
    let per_mb = |d: Duration| d.as_secs_f64() * 1e3 / mb;
    (per_mb(buffered), per_mb(unbuffered), per_mb(floor))
}

fn main() {
    let bytes = megabytes() << 20;
    let suites: [(&str, &'static aead::Algorithm, SupportedCipherSuite); 3] = [
        (
            "AES-128-GCM",
            &aead::AES_128_GCM,
            cs::TLS13_AES_128_GCM_SHA256,
        ),
        (
            "AES-256-GCM",
            &aead::AES_256_GCM,
            cs::TLS13_AES_256_GCM_SHA384,
        ),
        (
            "CHACHA20-POLY1305",
            &aead::CHACHA20_POLY1305,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (name, alg, suite) in suites {
        // Warm up, then measure, alternating so both see the same machine.
        ring_ms_per_mb(alg, bytes / 16);
        let ring = ring_ms_per_mb(alg, bytes);
        let rustls = rustls_ms_per_mb(suite, bytes);
        let line = serde_json::json!({
            "workload": "tls_records",
            "suite": name,
            "megabytes": bytes >> 20,
            "ring_seal_open_ms_per_mb": ring,
            "rustls_send_receive_ms_per_mb": rustls,
        });
        println!("{line}");
        receive_ms_per_mb(suite, alg, bytes / 16);
        let (buffered, unbuffered, floor) = receive_ms_per_mb(suite, alg, bytes);
        let line = serde_json::json!({
            "workload": "tls_receive",
            "suite": name,
            "megabytes": bytes >> 20,
            "rustls_buffered_ms_per_mb": buffered,
            "rustls_unbuffered_ms_per_mb": unbuffered,
            "ring_open_in_place_and_copy_ms_per_mb": floor,
        });
        println!("{line}");
    }
}
