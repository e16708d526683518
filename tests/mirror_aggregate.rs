//! Windowed aggregates in the mirror through the real binary, against a
//! real Kafka-protocol broker (Tansu), read back with read_committed (see
//! tests/mirror.rs). The expected windows are computed here from the
//! readings the test generates, by a model written apart from
//! src/mirror/aggregate.rs.
//!
//! SKIFF_MIRROR_KILLS sets the kill -9 count of the crash test (20 by
//! default, 5 under an emulator).

mod common;
mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{assert_ok, stdout, Broker, Rng};
use skiff::batch::{BatchBuilder, ProducerStamp};
use skiff::mirror::kafka::{KafkaClient, KafkaConfig};
use skiff::protocol::ProducePartition;
use upstream::Tansu;

const T0: i64 = 1_700_000_000_000;
const PARTITIONS: u32 = 2;

/// What a generated record holds.
#[derive(Debug, Clone)]
enum Reading {
    Json {
        c: f64,
        rh: Option<f64>,
    },
    Cbor {
        c: f64,
        rh: f64,
    },
    /// Neither JSON nor CBOR.
    Junk,
    /// `c` is a string.
    NotANumber,
}

impl Reading {
    fn encode(&self) -> Vec<u8> {
        match self {
            Self::Json { c, rh: Some(rh) } => format!("{{\"rh\":{rh},\"id\":\"x\",\"c\":{c}}}"),
            Self::Json { c, rh: None } => format!("{{\"c\":{c}}}"),
            Self::Cbor { c, rh } => {
                let mut buf = Vec::new();
                let mut e = minicbor::Encoder::new(&mut buf);
                e.map(3).unwrap();
                e.str("c").unwrap().f64(*c).unwrap();
                e.str("unit").unwrap().str("C").unwrap();
                e.str("rh").unwrap().f64(*rh).unwrap();
                return buf;
            }
            Self::Junk => "\u{1}not json".to_owned(),
            Self::NotANumber => "{\"c\":\"warm\",\"rh\":1}".to_owned(),
        }
        .into_bytes()
    }

    fn fields(&self) -> Option<[Option<f64>; 2]> {
        match self {
            Self::Json { c, rh } => Some([Some(*c), *rh]),
            Self::Cbor { c, rh } => Some([Some(*c), Some(*rh)]),
            Self::Junk | Self::NotANumber => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Rec {
    partition: u32,
    key: String,
    ts: i64,
    reading: Reading,
}

struct Params {
    window_ms: i64,
    lateness_ms: i64,
    max_open_windows: usize,
}

/// `per_partition` readings per partition from `keys` keys (key i in
/// partition i % 2), about 2 ms of event time apart with jitter, some late,
/// some malformed; then one far-future record per partition, which closes
/// every window before it.
fn readings(seed: u64, keys: usize, per_partition: usize) -> Vec<Rec> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let keys: Vec<usize> = (0..keys).filter(|k| k % 2 == p as usize).collect();
        for i in 0..per_partition {
            let key = format!("sensor-{}", keys[rng.next() as usize % keys.len()]);
            let mut ts = T0 + i as i64 * 2 + (rng.next() % 60) as i64 - 30;
            if rng.next() % 50 == 0 {
                ts -= 400; // late for any lateness below ~370 ms
            }
            // Binary fractions: their decimal text reads back exactly.
            let c = (rng.next() % 400) as f64 / 4.0 - 10.0;
            let rh = (rng.next() % 800) as f64 / 8.0;
            let reading = match rng.next() % 40 {
                0 => Reading::Junk,
                1 => Reading::NotANumber,
                2..=5 => Reading::Json { c, rh: None },
                6..=15 => Reading::Cbor { c, rh },
                _ => Reading::Json { c, rh: Some(rh) },
            };
            out.push(Rec {
                partition: p,
                key,
                ts,
                reading,
            });
        }
        out.push(Rec {
            partition: p,
            key: "flush".into(),
            ts: T0 + 10_000_000,
            reading: Reading::Json { c: 0.0, rh: None },
        });
    }
    out
}

#[derive(Debug, Clone, Copy, Default)]
struct FieldAcc {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
}

#[derive(Debug, Clone)]
struct Acc {
    key: String,
    start: i64,
    count: u64,
    fields: [FieldAcc; 2],
}

/// Per source partition, (key, window_start) → the window's JSON; plus
/// (late, malformed, closed early, windows still open).
type Windows = BTreeMap<(u32, String, i64), serde_json::Value>;

/// The semantics docs/mirror.md states, computed plainly: per partition in
/// offset order, a watermark (largest timestamp so far) and a horizon
/// (watermark - lateness, or the oldest open window's end once more than
/// max_open_windows are open); windows ending at or below the horizon are
/// emitted (by end, then in the order they opened), records of such a
/// window are late and counted in their key's next emitted window.
fn model(records: &[Rec], p: &Params) -> (Windows, [u64; 4]) {
    let mut out = Windows::new();
    let mut totals = [0u64; 4];
    for partition in 0..PARTITIONS {
        let mut wm = i64::MIN;
        let mut horizon = i64::MIN;
        let mut open: Vec<Acc> = Vec::new();
        let mut late: HashMap<String, u64> = HashMap::new();
        let mut emit = |open: &mut Vec<Acc>,
                        late: &mut HashMap<String, u64>,
                        horizon: i64,
                        totals: &mut [u64; 4],
                        early: bool| {
            let mut closing: Vec<(usize, Acc)> = Vec::new();
            let mut i = 0;
            let mut n = 0;
            while i < open.len() {
                if open[i].start + p.window_ms <= horizon {
                    closing.push((n, open.remove(i)));
                } else {
                    i += 1;
                }
                n += 1;
            }
            closing.sort_by_key(|(n, a)| (a.start, *n));
            for (_, a) in closing {
                if early {
                    totals[2] += 1;
                }
                let fields: serde_json::Map<String, serde_json::Value> = ["c", "rh"]
                    .iter()
                    .zip(a.fields)
                    .map(|(name, f)| {
                        let v = |x: f64| {
                            if f.count == 0 {
                                serde_json::Value::Null
                            } else {
                                serde_json::json!(x)
                            }
                        };
                        (
                            name.to_string(),
                            serde_json::json!({"min": v(f.min), "max": v(f.max), "sum": v(f.sum),
                                "mean": v(f.sum / f.count.max(1) as f64), "last": v(f.last),
                                "count": f.count}),
                        )
                    })
                    .collect();
                let json = serde_json::json!({
                    "key": a.key, "window_start": a.start, "window_end": a.start + p.window_ms,
                    "count": a.count, "fields": fields,
                    "late_dropped": late.remove(&a.key).unwrap_or(0),
                });
                // As a reader of the JSON text sees it (means are not
                // binary fractions).
                let json = serde_json::from_str(&json.to_string()).expect("JSON");
                out.insert((partition, a.key.clone(), a.start), json);
            }
        };
        for r in records.iter().filter(|r| r.partition == partition) {
            if r.ts > wm {
                wm = r.ts;
                if wm - p.lateness_ms > horizon {
                    horizon = wm - p.lateness_ms;
                    emit(&mut open, &mut late, horizon, &mut totals, false);
                }
            }
            let start = r.ts.div_euclid(p.window_ms) * p.window_ms;
            if start + p.window_ms <= horizon {
                totals[0] += 1;
                *late.entry(r.key.clone()).or_default() += 1;
                continue;
            }
            let Some(values) = r.reading.fields() else {
                totals[1] += 1;
                continue;
            };
            let at = match open.iter().position(|a| a.key == r.key && a.start == start) {
                Some(i) => i,
                None => {
                    open.push(Acc {
                        key: r.key.clone(),
                        start,
                        count: 0,
                        fields: [FieldAcc {
                            min: f64::INFINITY,
                            max: f64::NEG_INFINITY,
                            ..FieldAcc::default()
                        }; 2],
                    });
                    open.len() - 1
                }
            };
            let a = &mut open[at];
            a.count += 1;
            for (f, v) in a.fields.iter_mut().zip(values) {
                if let Some(v) = v {
                    f.count += 1;
                    f.min = f.min.min(v);
                    f.max = f.max.max(v);
                    f.sum += v;
                    f.last = v;
                }
            }
            if open.len() > p.max_open_windows {
                horizon = open.iter().map(|a| a.start + p.window_ms).min().unwrap();
                emit(&mut open, &mut late, horizon, &mut totals, true);
            }
        }
        totals[3] += open.len() as u64;
    }
    (out, totals)
}

/// Writes `records` with their timestamps, `batch` records per request.
fn produce(addr: &str, topic: &str, records: &[Rec], batch: usize) {
    let c = skiff::client::blocking::Client::connect(addr).expect("connect");
    for p in 0..PARTITIONS {
        let mine: Vec<&Rec> = records.iter().filter(|r| r.partition == p).collect();
        for chunk in mine.chunks(batch) {
            let mut b = BatchBuilder::new();
            for r in chunk {
                b.push(r.ts, Some(r.key.as_bytes()), &r.reading.encode(), &[]);
            }
            let res = c
                .produce_raw(vec![ProducePartition {
                    topic: topic.into(),
                    partition: p,
                    batch: b.finish(ProducerStamp::NONE).into(),
                }])
                .expect("produce");
            assert_eq!(
                res[0].error,
                skiff::protocol::ErrorCode::None,
                "{:?}",
                res[0]
            );
        }
    }
}

fn config(bootstrap: &str, gateway: &str, p: &Params, extra: &str) -> String {
    format!(
        "[mirror]\nupstream = \"{bootstrap}\"\ntransactional_id = \"{gateway}\"\nlinger_ms = 5\n\
         backoff_min_ms = 50\nbackoff_max_ms = 500\nrequest_timeout_ms = 2000\n\
         connect_timeout_ms = 2000\ncreate_topics = true\n{extra}\n\
         [[mirror.rules]]\nname = \"temps\"\nsource = \"sensors.temp\"\ntarget = \"agg.temp\"\n\
         aggregate = {{ window_ms = {}, lateness_ms = {}, fields = [\"c\", \"rh\"], max_open_windows = {} }}\n",
        p.window_ms, p.lateness_ms, p.max_open_windows
    )
}

fn client(bootstrap: &str) -> KafkaClient {
    let mut config = KafkaConfig::new(bootstrap).expect("bootstrap");
    config.request_timeout = Duration::from_secs(10);
    KafkaClient::new(config).expect("client")
}

/// Waits for `count` windows upstream; each (source partition, key, start)
/// once.
fn wait_windows(client: &KafkaClient, count: usize, gateway: &str) -> Windows {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let records = upstream::read_committed(client, "agg.temp");
        if records.len() >= count {
            let mut out = Windows::new();
            for r in records {
                assert_eq!(r.headers["skiff.gateway"], gateway.as_bytes());
                assert_eq!(r.headers["skiff.topic"], b"sensors.temp");
                let partition: u32 = String::from_utf8(r.headers["skiff.partition"].clone())
                    .unwrap()
                    .parse()
                    .unwrap();
                let json: serde_json::Value = serde_json::from_slice(&r.value).expect("JSON");
                let key = json["key"].as_str().expect("key").to_owned();
                assert_eq!(r.key.as_deref(), Some(key.as_bytes()), "the source key");
                assert_eq!(Some(r.timestamp), json["window_end"].as_i64(), "window end");
                let start = json["window_start"].as_i64().expect("start");
                let id = (partition, key, start);
                assert!(
                    out.insert(id.clone(), json).is_none(),
                    "window {id:?} upstream twice"
                );
            }
            assert_eq!(out.len(), count, "windows upstream");
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} windows upstream after 120 s",
            records.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_same(got: &Windows, expected: &Windows) {
    for (id, want) in expected {
        assert_eq!(got.get(id), Some(want), "window {id:?}");
    }
    assert_eq!(got.len(), expected.len());
}

fn status(b: &Broker) -> serde_json::Value {
    let o = b.cli(&["mirror", "status", "--format", "json"]);
    assert_ok(&o);
    serde_json::from_str(&stdout(&o)).expect("status is JSON")
}

/// Waits until the first rule's status satisfies `pred`.
fn wait_status(b: &Broker, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(b);
        if pred(&s["rules"][0]) {
            return s;
        }
        assert!(Instant::now() < deadline, "status never caught up: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates the source topic, produces `records` and waits until upstream
/// holds the model's windows, byte for byte, and status has caught up
/// with the last transaction (its late, malformed and forwarded counts
/// checked); the status and the model's counts.
fn forward_and_match(
    b: &Broker,
    tansu: &Tansu,
    gateway: &str,
    records: &[Rec],
    p: &Params,
) -> (serde_json::Value, [u64; 4]) {
    assert_ok(&b.cli(&["topics", "create", "sensors.temp", "--partitions", "2"]));
    produce(&b.tcp, "sensors.temp", records, 50);
    let (expected, counts) = model(records, p);
    let got = wait_windows(&client(&tansu.addr()), expected.len(), gateway);
    assert_same(&got, &expected);
    let s = wait_status(b, |r| {
        r["windows_emitted"] == expected.len() as u64 && r["backlog_records"] == 0
    });
    let r = &s["rules"][0];
    let [late, malformed, _, _] = counts;
    assert_eq!(r["late_records"], late, "{s}");
    assert_eq!(r["malformed_records"], malformed, "{s}");
    assert_eq!(r["forwarded_records"], records.len() as u64, "{s}");
    (s, counts)
}

#[test]
fn windows_late_and_malformed_records_match_a_computed_model() {
    let tansu = Tansu::start();
    let p = Params {
        window_ms: 100,
        lateness_ms: 50,
        max_open_windows: 1000,
    };
    let started = Instant::now();
    let b = Broker::start(&config(&tansu.addr(), "gw-agg", &p, ""));
    let records = readings(0x0a66_0001, 12, 1500);
    let (s, [late, malformed, early, open]) = forward_and_match(&b, &tansu, "gw-agg", &records, &p);
    assert!(late > 20 && malformed > 20, "the readings have both");
    assert_eq!(early, 0);
    let r = &s["rules"][0];
    assert_eq!(r["windows_closed_early"], 0, "{s}");
    assert_eq!(r["open_windows"], open, "{s}");
    // At most one malformed line per rule per minute, never a crash.
    let lines = b.log().matches("skipped a malformed value").count() as u64;
    let minutes = started.elapsed().as_secs() / 60;
    assert!((1..=1 + minutes).contains(&lines), "{}", b.log());
}

/// Under a bandwidth cap a round the bucket cannot pay for is put back and
/// read again, except one aggregate rules folded into their windows: read
/// twice, its records would count twice.
#[test]
fn windows_under_a_bandwidth_cap_match_the_model() {
    let tansu = Tansu::start();
    // Many keys with windows open to the end: the last records close
    // hundreds of windows at once, a round far larger than the bucket.
    let p = Params {
        window_ms: 1000,
        lateness_ms: 2000,
        max_open_windows: 1000,
    };
    let b = Broker::start(&config(
        &tansu.addr(),
        "gw-cap",
        &p,
        "batch_bytes = 4096\nmax_bytes_per_s = 8192",
    ));
    let records = readings(0x0a66_0003, 400, 1500);
    forward_and_match(&b, &tansu, "gw-cap", &records, &p);
}

#[test]
fn kill_9_while_aggregating_keeps_every_window_once_and_as_a_clean_run_has_it() {
    let kills = upstream::kill_count();
    let tansu = Tansu::start();
    // Tight limits, so that windows also close early, and small
    // transactions, so that kills land inside them.
    let p = Params {
        window_ms: 50,
        lateness_ms: 100,
        max_open_windows: 12,
    };
    let records = readings(0x0a66_0002, 16, 3000);
    let (expected, [late, _, early, _]) = model(&records, &p);
    assert!(late > 0 && early > 0, "the readings exercise both");

    let mut b = Broker::start(&config(&tansu.addr(), "gw-kill", &p, "batch_bytes = 4096"));
    assert_ok(&b.cli(&["topics", "create", "sensors.temp", "--partitions", "2"]));
    let mut rng = Rng(0x05ee_da66);
    // Producing goes on between the kills: the readings in `kills` slices
    // per partition, in order.
    let per_kill = records.len() / PARTITIONS as usize / kills + 1;
    let by_partition: Vec<Vec<Rec>> = (0..PARTITIONS)
        .map(|p| {
            records
                .iter()
                .filter(|r| r.partition == p)
                .cloned()
                .collect()
        })
        .collect();
    for round in 0..kills {
        let slice: Vec<Rec> = by_partition
            .iter()
            .flat_map(|recs| recs.iter().skip(round * per_kill).take(per_kill).cloned())
            .collect();
        produce(&b.tcp, "sensors.temp", &slice, 20);
        std::thread::sleep(rng.between_ms(50, 400));
        b.kill9();
        b.restart();
    }
    let rest: Vec<Rec> = by_partition
        .iter()
        .flat_map(|recs| recs.iter().skip(kills * per_kill).cloned())
        .collect();
    produce(&b.tcp, "sensors.temp", &rest, 20);
    let client = client(&tansu.addr());
    let killed = wait_windows(&client, expected.len(), "gw-kill");
    assert_same(&killed, &expected);
    assert!(
        b.log().contains("open window(s) rebuilt from offsets"),
        "no restart replayed open windows:\n{}",
        b.log()
    );

    // A crash-free run of the same source records, to another target.
    let clean =
        Broker::start(&config(&tansu.addr(), "gw-clean", &p, "").replace("agg.temp", "agg.clean"));
    assert_ok(&clean.cli(&["topics", "create", "sensors.temp", "--partitions", "2"]));
    produce(&clean.tcp, "sensors.temp", &records, 20);
    let deadline = Instant::now() + Duration::from_secs(120);
    let clean_values = loop {
        let got = upstream::read_committed(&client, "agg.clean");
        if got.len() >= expected.len() {
            break got;
        }
        assert!(Instant::now() < deadline, "the clean run is short");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut killed_values: Vec<Vec<u8>> = upstream::read_committed(&client, "agg.temp")
        .into_iter()
        .map(|r| r.value)
        .collect();
    let mut clean_values: Vec<Vec<u8>> = clean_values.into_iter().map(|r| r.value).collect();
    killed_values.sort();
    clean_values.sort();
    assert!(
        killed_values == clean_values,
        "the killed run's windows differ from the clean run's, byte for byte"
    );
    // Only the two far-future windows are left open.
    wait_status(&b, |r| r["open_windows"] == 2 && r["backlog_records"] == 0);
}

/// The text status names an aggregate rule's counters as soon as any is
/// counted: a rule that has seen only malformed values has no window yet,
/// and the log's "skiff mirror status counts them all" must hold for it.
#[test]
fn the_text_status_counts_malformed_values_before_any_window() {
    let tansu = Tansu::start();
    let p = Params {
        window_ms: 1000,
        lateness_ms: 0,
        max_open_windows: 10,
    };
    let b = Broker::start(&config(&tansu.addr(), "gw-text", &p, ""));
    assert_ok(&b.cli(&["topics", "create", "sensors.temp", "--partitions", "1"]));
    assert_ok(&b.cli(&[
        "produce",
        "sensors.temp",
        "--key",
        "k",
        "not json",
        "{\"c\": \"warm\"}",
    ]));
    wait_status(&b, |r| r["malformed_records"] == 2);
    let o = b.cli(&["mirror", "status"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains(
            "windows: 0 open, 0 emitted (0 closed early), 0 late and 2 malformed record(s)"
        ),
        "{}",
        stdout(&o)
    );
}
