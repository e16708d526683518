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
//! client over plaintext (docs/performance.md, "TLS"). `cargo bench
//! --bench tls`; `SKIFF_TLS_BENCH_MB` (default 256) sets the data per figure.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use ring::aead;
use rustls::crypto::ring::cipher_suite as cs;
use rustls::{ClientConnection, Connection, ServerConnection, SupportedCipherSuite};

const RECORD: usize = 16 * 1024;
const WRITE: usize = 64 * 1024;

/// This thread's CPU time so far.
fn cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

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
    let start = cpu();
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
    (cpu() - start).as_secs_f64() * 1e3 / ((records * RECORD) as f64 / 1e6)
}

/// Moves what `from` has to send into `to`, and drains `to`'s plaintext.
fn pump(from: &mut Connection, to: &mut Connection, wire: &mut Vec<u8>) {
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).unwrap();
    }
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

/// ms per MB of application data from a rustls client to a rustls server.
fn rustls_ms_per_mb(suite: SupportedCipherSuite, bytes: usize) -> f64 {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
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
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = Connection::from(
        ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap(),
    );
    let mut s = Connection::from(ServerConnection::new(Arc::new(server)).unwrap());
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        pump(&mut c, &mut s, &mut wire);
        pump(&mut s, &mut c, &mut wire);
    }
    assert_eq!(c.negotiated_cipher_suite(), Some(suite));
    let chunk = vec![0x5a; WRITE];
    let writes = bytes / WRITE;
    let start = cpu();
    for _ in 0..writes {
        c.writer().write_all(&chunk).unwrap();
        pump(&mut c, &mut s, &mut wire);
    }
    (cpu() - start).as_secs_f64() * 1e3 / ((writes * WRITE) as f64 / 1e6)
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
    }
}
