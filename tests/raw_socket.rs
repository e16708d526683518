//! Hostile and broken peers on a raw TcpStream: the broker answers with the
//! documented error frame where there is one, closes the connection, and
//! keeps serving everyone else. And a peer that writes many requests at
//! once: each is read whole, from wherever the one before it ended.

mod common;

use std::io::Write;
use std::net::Shutdown;

use common::*;
use skiff::protocol::{
    ErrorCode, ListGroupsRequest, ListTopicsRequest, RequestBody, ResponseBody,
    HELLO_FRAME_BYTES_MAX,
};

/// The broker's RSS after a hostile prefix must stay below this: a broker
/// that allocated for the declared length would be far above it.
const RSS_KIB_MAX: u64 = 64 * 1024;

#[track_caller]
fn assert_rss_small(b: &Broker, what: &str) {
    // Under the emulator the RSS is qemu's, whose translation caches grow
    // with the code run; the native run of the suite checks the broker's.
    if emulated() {
        return;
    }
    let rss = b.rss_kib();
    assert!(rss < RSS_KIB_MAX, "broker RSS {rss} KiB {what}");
}

/// The connection still serves: a list_topics with `id` is answered.
#[track_caller]
fn assert_still_serves(c: &mut RawConn, id: u32) {
    c.send_request(id, RequestBody::ListTopics(ListTopicsRequest {}));
    let r = c.read_response().expect("an answer");
    assert_eq!(r.correlation_id, id);
    assert!(matches!(r.body, ResponseBody::ListTopics(_)), "{r:?}");
}

/// Sends `body` and reads its answer, which must fit `max_frame_bytes`.
#[track_caller]
fn answer_within(
    c: &mut RawConn,
    id: u32,
    body: RequestBody,
    max_frame_bytes: usize,
) -> ResponseBody {
    c.send_request(id, body);
    let frame = c.read_frame().expect("an answer");
    assert!(
        frame.len() <= max_frame_bytes,
        "answer of {} bytes",
        frame.len()
    );
    let r = skiff::protocol::decode_response(&frame).expect("a valid frame");
    assert_eq!(r.correlation_id, id);
    r.body
}

/// Produces a batch of 100 records of 1,000 bytes (about 100 KB) to
/// `topic`/`partition` and checks it is stored.
#[track_caller]
fn produce_100_kb(c: &mut RawConn, id: u32, topic: &str, partition: u32) {
    use skiff::protocol::{ProducePartition, ProduceRequest};
    let mut bb = skiff::batch::BatchBuilder::new();
    for r in 0..100 {
        bb.push(0, None, &[b'a' + (r % 26) as u8; 1000], &[]);
    }
    c.send_request(
        id,
        RequestBody::Produce(ProduceRequest {
            partitions: vec![ProducePartition {
                topic: topic.into(),
                partition,
                batch: bb.finish(skiff::batch::ProducerStamp::NONE).into(),
            }],
        }),
    );
    let r = c.read_response().expect("a produce answer");
    assert!(
        matches!(&r.body, ResponseBody::Produce(p) if p.partitions[0].error == ErrorCode::None),
        "{r:?}"
    );
}

#[test]
fn random_bytes_are_answered_or_dropped_and_the_broker_survives() {
    let mut b = Broker::start("");
    for (seed, size) in [
        (1u64, 1usize),
        (2, 3),
        (3, 4),
        (4, 7),
        (5, 64),
        (6, 1000),
        (7, 4096),
        (8, 65_536),
        (9, 300_000),
    ] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let bytes = rng.bytes(size);
        let mut c = RawConn::connect(&b.tcp);
        // The broker may close before reading everything: a failed write is
        // an answer too.
        let _ = c.stream.write_all(&bytes);
        let _ = c.stream.shutdown(Shutdown::Write);
        // Whatever it sent must be one valid error frame, then EOF.
        if let Some(body) = c.read_frame() {
            let r = skiff::protocol::decode_response(&body)
                .unwrap_or_else(|e| panic!("seed {seed}: undecodable answer: {e}"));
            match r.body {
                ResponseBody::Error(e) => assert!(
                    matches!(
                        e.code,
                        ErrorCode::FrameTooLarge
                            | ErrorCode::MalformedFrame
                            | ErrorCode::InvalidRequest
                    ),
                    "seed {seed} size {size}: unexpected code {e:?}"
                ),
                other => panic!("seed {seed}: expected an error, got {other:?}"),
            }
            c.expect_closed();
        }
        assert!(b.is_alive(), "seed {seed} size {size} killed the broker");
        b.assert_serves();
    }
}

/// Reads one answer that must be `malformed_frame` (or, should random bytes
/// happen to decode as a request, `invalid_request`), then EOF.
#[track_caller]
fn expect_refused_body(c: &mut RawConn, what: &str) {
    let r = c
        .read_response()
        .unwrap_or_else(|| panic!("{what}: closed without an answer"));
    match r.body {
        ResponseBody::Error(e) => assert!(
            matches!(
                e.code,
                ErrorCode::MalformedFrame | ErrorCode::InvalidRequest
            ),
            "{what}: unexpected code {e:?}"
        ),
        other => panic!("{what}: expected an error, got {other:?}"),
    }
    c.expect_closed();
}

#[test]
fn random_bodies_in_valid_frames_are_malformed() {
    let mut b = Broker::start("profile = \"dev\"\n");
    let max_frame = 1_114_112usize; // the dev profile's max_frame_bytes
    let mut rng = Rng(0x5eed);
    // Before hello: bodies up to HELLO_FRAME_BYTES_MAX.
    for size in [1usize, 2, 17, 300, HELLO_FRAME_BYTES_MAX as usize] {
        let mut c = RawConn::connect(&b.tcp);
        let mut frame = (size as u32).to_be_bytes().to_vec();
        frame.extend(rng.bytes(size));
        c.send(&frame);
        expect_refused_body(&mut c, &format!("{size} random bytes before hello"));
    }
    // After hello: up to max_frame_bytes exactly.
    for size in [1usize, 5000, 100_000, max_frame] {
        let mut c = RawConn::connect(&b.tcp);
        c.hello();
        let mut frame = (size as u32).to_be_bytes().to_vec();
        frame.extend(rng.bytes(size));
        c.send(&frame);
        expect_refused_body(&mut c, &format!("{size} random bytes after hello"));
    }
    // One byte above the limit is refused from the prefix alone.
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    c.send(&(max_frame as u32 + 1).to_be_bytes());
    c.expect_error(ErrorCode::FrameTooLarge);
    c.expect_closed();
    assert_rss_small(&b, "after random bodies");
    b.assert_serves();
}

#[test]
fn truncated_hello_is_dropped() {
    let mut b = Broker::start("");
    let frame = request_frame(7, hello_body(1, 1));
    let body = &frame[4..];
    for cut in [1, body.len() / 2, body.len() - 1] {
        // The full length prefix, part of the body, then close: the broker
        // sees EOF inside a frame and drops the connection without an answer.
        let mut c = RawConn::connect(&b.tcp);
        c.send(&frame[..4 + cut]);
        c.stream.shutdown(Shutdown::Write).expect("shutdown");
        c.expect_closed();

        // A complete frame whose CBOR item is cut short: malformed_frame.
        let mut c = RawConn::connect(&b.tcp);
        let mut short = (cut as u32).to_be_bytes().to_vec();
        short.extend_from_slice(&body[..cut]);
        c.send(&short);
        c.expect_error(ErrorCode::MalformedFrame);
        c.expect_closed();
    }
    b.assert_serves();
}

#[test]
fn four_gib_length_prefix_is_refused_without_allocating() {
    let mut b = Broker::start("");
    let mut c = RawConn::connect(&b.tcp);
    c.send(&[0xff, 0xff, 0xff, 0xff]);
    let r = c.expect_error(ErrorCode::FrameTooLarge);
    assert_eq!(r.correlation_id, 0);
    c.expect_closed();
    assert_rss_small(&b, "after a 4 GiB prefix");

    // The same after hello, where max_frame_bytes is the limit.
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    c.send(&[0xff, 0xff, 0xff, 0xff]);
    c.expect_error(ErrorCode::FrameTooLarge);
    c.expect_closed();
    assert_rss_small(&b, "after a 4 GiB prefix");
    b.assert_serves();
}

#[test]
fn a_large_first_frame_is_refused_before_hello() {
    // docs/protocol.md: before hello a frame body is at most
    // HELLO_FRAME_BYTES_MAX; a peer opening with more is not a skiff client.
    let mut b = Broker::start("");
    let mut c = RawConn::connect(&b.tcp);
    c.send(&(HELLO_FRAME_BYTES_MAX + 1).to_be_bytes());
    c.expect_error(ErrorCode::FrameTooLarge);
    c.expect_closed();
    b.assert_serves();
}

/// A connection starts with a small read buffer and grows it as a frame's
/// prefix asks: a hello of the largest size allowed before hello, sent in
/// pieces, is answered.
#[test]
fn the_largest_hello_allowed_is_answered_when_sent_in_pieces() {
    let mut b = Broker::start("");
    let hello = |name_len: usize| {
        request_frame(
            3,
            skiff::protocol::RequestBody::Hello(skiff::protocol::HelloRequest {
                version_min: 1,
                version_max: skiff::protocol::PROTOCOL_VERSION_MAX,
                client_name: Some("n".repeat(name_len)),
            }),
        )
    };
    let frame = (3000..HELLO_FRAME_BYTES_MAX as usize)
        .map(hello)
        .find(|f| f.len() - 4 == HELLO_FRAME_BYTES_MAX as usize)
        .expect("a name length that makes the body exactly the limit");
    let mut c = RawConn::connect(&b.tcp);
    for piece in [&frame[..3], &frame[3..700], &frame[700..]] {
        c.send(piece);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = c.read_response().expect("an answer to the hello");
    assert_eq!(r.correlation_id, 3);
    assert!(
        matches!(r.body, skiff::protocol::ResponseBody::Hello(_)),
        "{r:?}"
    );
    b.assert_serves();
}

#[test]
fn trailing_bytes_after_the_item_are_malformed() {
    let mut b = Broker::start("");
    let frame = request_frame(9, hello_body(1, 1));
    let mut body = frame[4..].to_vec();
    body.push(0x00);
    let mut bad = (body.len() as u32).to_be_bytes().to_vec();
    bad.extend_from_slice(&body);
    let mut c = RawConn::connect(&b.tcp);
    c.send(&bad);
    let r = c.expect_error(ErrorCode::MalformedFrame);
    // The correlation id was readable, so it is echoed.
    assert_eq!(r.correlation_id, 9);
    c.expect_closed();

    // After a good hello too.
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    let frame = request_frame(10, RequestBody::ListTopics(ListTopicsRequest {}));
    let mut body = frame[4..].to_vec();
    body.extend_from_slice(&[0x01, 0x02]);
    let mut bad = (body.len() as u32).to_be_bytes().to_vec();
    bad.extend_from_slice(&body);
    c.send(&bad);
    let r = c.expect_error(ErrorCode::MalformedFrame);
    assert_eq!(r.correlation_id, 10);
    c.expect_closed();
    b.assert_serves();
}

#[test]
fn unsupported_version_is_refused() {
    let mut b = Broker::start("");
    // Versions above the server's highest, below its lowest, far above.
    let above = skiff::protocol::PROTOCOL_VERSION_MAX + 1;
    for (lo, hi) in [(above, above + 7), (0, 0), (100, 200)] {
        let mut c = RawConn::connect(&b.tcp);
        c.send_request(5, hello_body(lo, hi));
        let r = c.expect_error(ErrorCode::UnsupportedVersion);
        assert_eq!(r.correlation_id, 5);
        c.expect_closed();
    }
    b.assert_serves();
}

#[test]
fn an_operation_newer_than_the_negotiated_version_is_refused() {
    // docs/protocol.md: "A server never sends an error code or an
    // operation the negotiated version does not define."
    let mut b = Broker::start("");
    let mut c = RawConn::connect(&b.tcp);
    c.hello(); // version 1
    let newer = [
        (2, RequestBody::ListGroups(ListGroupsRequest {})),
        (
            3,
            RequestBody::ListTxns(skiff::protocol::ListTxnsRequest {}),
        ),
        (
            3,
            RequestBody::ListShareGroups(skiff::protocol::ListShareGroupsRequest {}),
        ),
    ];
    for (i, (since, body)) in newer.into_iter().enumerate() {
        let cid = 10 + i as u32;
        let name = body.name();
        c.send_request(cid, body);
        let r = c.expect_error(ErrorCode::InvalidRequest);
        assert_eq!(r.correlation_id, cid);
        let ResponseBody::Error(e) = &r.body else {
            unreachable!()
        };
        assert!(
            e.message.contains(name) && e.message.contains(&format!("version {since}")),
            "{e:?}"
        );
    }
    // The connection still serves what version 1 defines.
    c.send_request(20, RequestBody::ListTopics(ListTopicsRequest {}));
    let r = c.read_response().expect("an answer");
    assert!(matches!(r.body, ResponseBody::ListTopics(_)), "{r:?}");
    // And a version 2 connection gets groups.
    let mut c2 = RawConn::connect(&b.tcp);
    c2.send_request(1, hello_body(1, 2));
    assert!(c2.read_response().is_some());
    c2.send_request(2, RequestBody::ListGroups(ListGroupsRequest {}));
    let r = c2.read_response().expect("an answer");
    assert!(matches!(r.body, ResponseBody::ListGroups(_)), "{r:?}");
    b.assert_serves();
}

/// A frame of the given CBOR body, written by hand.
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

/// docs/protocol.md, "Framing": a whole frame whose envelope,
/// `[correlation_id, [operation, ...]]`, is intact but whose operation or
/// body is wrong gets `invalid_request` naming what did not fit, and the
/// connection goes on, whether the operation is of the connection's
/// version, of a later one, or of none. Broken framing still closes it.
#[test]
fn a_request_that_does_not_fit_its_operation_is_refused_and_the_connection_goes_on() {
    let mut b = Broker::start("");
    let mut c = RawConn::connect(&b.tcp);
    c.hello(); // version 1
    let refused: [(&[u8], &[&str]); 5] = [
        // [11, [20, [5]]]: join_group (version 2), its body an integer.
        (
            &[0x82, 0x0b, 0x82, 0x14, 0x81, 0x05],
            &["operation 20", "wrong type"],
        ),
        // [12, [4, [7]]]: describe_topic (version 1), the name an integer.
        (
            &[0x82, 0x0c, 0x82, 0x04, 0x81, 0x07],
            &["operation 4", "wrong type"],
        ),
        // [13, [8, []]]: fetch without its fields.
        (&[0x82, 0x0d, 0x82, 0x08, 0x80], &["operation 8", "missing"]),
        // [14, [60, [1]]]: init_txn (version 3), a field missing.
        (
            &[0x82, 0x0e, 0x82, 0x18, 0x3c, 0x81, 0x01],
            &["operation 60"],
        ),
        // [15, [99, []]]: an operation no version defines.
        (
            &[0x82, 0x0f, 0x82, 0x18, 0x63, 0x80],
            &["operation 99 is not defined"],
        ),
    ];
    for (cid, (body, said)) in (11u32..).zip(refused) {
        c.send(&raw_frame(body));
        let r = c.expect_error(ErrorCode::InvalidRequest);
        assert_eq!(r.correlation_id, cid);
        let ResponseBody::Error(e) = &r.body else {
            unreachable!()
        };
        for s in said {
            assert!(e.message.contains(s), "{cid}: {e:?} should say {s:?}");
        }
        assert_still_serves(&mut c, 100 + cid);
    }
    // Broken framing on the same connection: cut CBOR, then an operation
    // array of indefinite length (not the envelope's shape).
    for body in [
        &[0x82, 0x10, 0x82, 0x08][..],
        &[0x82, 0x11, 0x9f, 0x05, 0xff],
    ] {
        let mut c = RawConn::connect(&b.tcp);
        c.hello();
        c.send(&raw_frame(body));
        c.expect_error(ErrorCode::MalformedFrame);
        c.expect_closed();
    }
    // Before hello, a hello that does not fit is refused, and the
    // connection closes as for any request but hello.
    let mut c = RawConn::connect(&b.tcp);
    // [3, [1, ["x"]]]
    c.send(&raw_frame(&[0x82, 0x03, 0x82, 0x01, 0x81, 0x61, b'x']));
    let r = c.expect_error(ErrorCode::InvalidRequest);
    assert_eq!(r.correlation_id, 3);
    c.expect_closed();
    b.assert_serves();
}

#[test]
fn request_before_hello_is_invalid() {
    let mut b = Broker::start("");
    let mut c = RawConn::connect(&b.tcp);
    c.send_request(3, RequestBody::ListTopics(ListTopicsRequest {}));
    let r = c.expect_error(ErrorCode::InvalidRequest);
    assert_eq!(r.correlation_id, 3);
    c.expect_closed();
    b.assert_serves();
}

#[test]
fn a_second_hello_is_invalid() {
    // docs/protocol.md: "A second hello is invalid_request."
    let mut b = Broker::start("");
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    c.send_request(2, hello_body(1, 1));
    let r = c.expect_error(ErrorCode::InvalidRequest);
    assert_eq!(r.correlation_id, 2);
    // The connection still works after a refused request.
    assert_still_serves(&mut c, 4);
    b.assert_serves();
}

/// Produce frames written back to back in one write: large batches (whose
/// frame's read buffer the broker lends to the batch rather than copy it
/// out) between small ones and a two-partition request (copied). Every
/// record is stored whole, once, in the order sent.
#[test]
fn pipelined_produces_large_and_small_are_stored_whole_and_in_order() {
    use skiff::protocol::{ProducePartition, ProduceRequest};
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "piped", "--partitions", "2"]));
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    // Records per batch, and the partitions a request carries a batch for.
    // The embedded default takes frames of up to 132 KiB. A frame smaller
    // than the one before it is read with the next ones' first bytes
    // behind it in the buffer, which move to the front of the next buffer
    // when the frame's is lent.
    let plan: [(usize, &[u32]); 8] = [
        (110, &[0]),
        (60, &[0]),
        (1, &[0]),
        (100, &[0]),
        (45, &[0, 1]),
        (2, &[1]),
        (70, &[1]),
        (120, &[1]),
    ];
    let mut wire = Vec::new();
    let mut sent: [Vec<Vec<u8>>; 2] = Default::default();
    for (i, (records, partitions)) in plan.iter().enumerate() {
        let mut parts = Vec::new();
        for &p in *partitions {
            let mut bb = skiff::batch::BatchBuilder::new();
            for r in 0..*records {
                let mut value = format!("request {i} partition {p} record {r} ").into_bytes();
                value.resize(1000, b'a' + (r % 26) as u8);
                bb.push(0, None, &value, &[]);
                sent[p as usize].push(value);
            }
            parts.push(ProducePartition {
                topic: "piped".into(),
                partition: p,
                batch: bb.finish(skiff::batch::ProducerStamp::NONE).into(),
            });
        }
        let body = RequestBody::Produce(ProduceRequest { partitions: parts });
        wire.extend(request_frame(10 + i as u32, body));
    }
    c.send(&wire);
    // Answers may come in any order (docs/protocol.md).
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..plan.len() {
        let r = c.read_response().expect("a produce answer");
        answers.insert(r.correlation_id, r.body);
    }
    for (i, (records, partitions)) in plan.iter().enumerate() {
        let body = answers.remove(&(10 + i as u32)).expect("an answer each");
        let ResponseBody::Produce(p) = body else {
            panic!("request {i}: {body:?}");
        };
        assert_eq!(p.partitions.len(), partitions.len());
        for part in &p.partitions {
            assert_eq!(part.error, ErrorCode::None, "request {i}: {part:?}");
            assert_eq!(part.last_offset + 1 - part.base_offset, *records as u64);
        }
    }
    let mut got: [Vec<Vec<u8>>; 2] = Default::default();
    for r in consume_all(&b.tcp, "piped") {
        got[r.partition as usize].push(r.value);
    }
    for p in 0..2 {
        assert_eq!(got[p].len(), sent[p].len(), "partition {p}'s records");
        for (n, (g, s)) in got[p].iter().zip(&sent[p]).enumerate() {
            assert!(g == s, "partition {p} record {n} differs");
        }
    }
    b.assert_serves();
}

/// docs/operations.md: `malformed_frames_total` counts the frames that
/// closed their connection for not being a request, and not a request
/// that only did not fit its operation (that connection goes on).
#[test]
fn frames_that_are_not_requests_are_counted_in_the_metrics() {
    let mut b = Broker::start("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let count = |b: &Broker| {
        let text = http_get(&b.metrics_addr(), "/metrics");
        sample(&text, "skiff_malformed_frames_total", "").expect("the counter is exported")
    };
    assert_eq!(count(&b), 0.0);

    // Too large, before hello.
    let mut c = RawConn::connect(&b.tcp);
    c.send(&[0xff, 0xff, 0xff, 0xff]);
    c.expect_error(ErrorCode::FrameTooLarge);
    c.expect_closed();
    // Not CBOR, after hello.
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    c.send(&raw_frame(&[0xff, 0xff, 0xff]));
    c.expect_error(ErrorCode::MalformedFrame);
    c.expect_closed();
    // [13, [8, []]]: a fetch without its fields is a request that does not
    // fit, answered invalid_request on a connection that goes on.
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    c.send(&raw_frame(&[0x82, 0x0d, 0x82, 0x08, 0x80]));
    c.expect_error(ErrorCode::InvalidRequest);

    assert_eq!(count(&b), 2.0);
    b.assert_serves();
}

/// The answer's entries for a request of many partitions can outgrow the
/// frame the request fitted in. A peer would refuse such a frame and lose
/// its connection, so the broker answers `invalid_request` saying why,
/// within `max_frame_bytes`, and the connection goes on.
#[test]
fn an_answer_that_would_outgrow_the_frame_is_refused_and_the_connection_goes_on() {
    use skiff::protocol::{
        FetchPartition, FetchRequest, ListOffsetsPartition, ListOffsetsRequest, OffsetSpec,
    };
    // The embedded default's server.max_frame_bytes.
    const MAX_FRAME_BYTES: usize = 135_168;
    let mut b = Broker::start("");
    assert_ok(&b.cli(&["topics", "create", "few"]));
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    // Partitions the topic does not have: each entry's answer carries an
    // error and its message, several times the entry's own size.
    let fetch = RequestBody::Fetch(FetchRequest {
        partitions: (0..6000)
            .map(|i| FetchPartition {
                topic: "few".into(),
                partition: 1000 + i,
                offset: 0,
                max_bytes: 1024,
            })
            .collect(),
        max_wait_ms: 0,
        min_bytes: 0,
        isolation: None,
    });
    let offsets = RequestBody::ListOffsets(ListOffsetsRequest {
        partitions: (0..6000)
            .map(|i| ListOffsetsPartition {
                topic: "few".into(),
                partition: 1000 + i,
                spec: OffsetSpec::Latest,
            })
            .collect(),
    });
    // A batch of about 100 KB, returned whole as a fetch's first: with the
    // messages of 800 failing entries beside it the answer cannot fit, and
    // leaving it out would answer the same fetch the same way for ever.
    produce_100_kb(&mut c, 2, "few", 0);
    let entry = |partition| FetchPartition {
        topic: "few".into(),
        partition,
        offset: 0,
        max_bytes: 1 << 20,
    };
    let front = RequestBody::Fetch(FetchRequest {
        partitions: (0..801)
            .map(|i| entry(if i == 0 { 0 } else { 1000 + i }))
            .collect(),
        max_wait_ms: 0,
        min_bytes: 0,
        isolation: None,
    });
    for (id, body) in [(5, fetch), (6, offsets), (7, front)] {
        let body = answer_within(&mut c, id, body, MAX_FRAME_BYTES);
        let ResponseBody::Error(e) = &body else {
            panic!("request {id}: expected an error, got {body:?}");
        };
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{e:?}");
        assert!(
            e.message.contains("max_frame_bytes (135168)")
                && e.message.contains("fewer partitions"),
            "{}",
            e.message
        );
    }
    assert_still_serves(&mut c, 8);
    // With 400 failing entries the batch and the entries fit, and their
    // messages do not: the last messages go (the codes stay), not the
    // records.
    let some = RequestBody::Fetch(FetchRequest {
        partitions: (0..401)
            .map(|i| entry(if i == 0 { 0 } else { 1000 + i }))
            .collect(),
        max_wait_ms: 0,
        min_bytes: 0,
        isolation: None,
    });
    let body = answer_within(&mut c, 9, some, MAX_FRAME_BYTES);
    let ResponseBody::Fetch(f) = &body else {
        panic!("expected a fetch answer, got {body:?}");
    };
    assert!(
        f.partitions[0].records.len() > 100_000,
        "{:?}",
        f.partitions[0].records.len()
    );
    let failed = &f.partitions[1..];
    assert!(failed
        .iter()
        .all(|p| p.error == ErrorCode::UnknownPartition));
    let kept = failed.iter().take_while(|p| p.message.is_some()).count();
    assert!(kept > 0 && kept < 400, "{kept} messages kept of 400");
    assert!(failed[kept..].iter().all(|p| p.message.is_none()));
    b.assert_serves();
}

/// A metadata request for thousands of topics, or an offset fetch of a
/// group's every partition with long metadata, is answered
/// `invalid_request` saying how many it asked for and about how many fit
/// the frame; asking for that many is then answered.
#[test]
fn an_answer_too_large_for_the_frame_says_how_many_were_asked_and_how_many_fit() {
    use skiff::protocol::{
        GroupPartition, MetadataRequest, OffsetCommitPartition, OffsetCommitRequest,
        OffsetFetchRequest,
    };
    const MAX_FRAME_BYTES: usize = 135_168;
    let mut b = Broker::start(
        "[topic_defaults]\nsegment_bytes = 1048576\nsegments = 2\n\
         [groups]\nmax_offset_metadata_bytes = 4096\n",
    );
    assert_ok(&b.cli(&["topics", "create", "wide", "--partitions", "40"]));
    let mut c = RawConn::connect(&b.tcp);
    // Version 2: offset_commit and offset_fetch.
    c.send_request(1, hello_body(1, 2));
    let r = c.read_response().expect("a hello answer");
    assert!(matches!(r.body, ResponseBody::Hello(_)), "{r:?}");
    /// The counts an `invalid_request` for an answer past the frame gives.
    #[track_caller]
    fn counts(body: &ResponseBody, what: &str) -> (usize, usize) {
        let ResponseBody::Error(e) = body else {
            panic!("expected an error, got {body:?}");
        };
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{e:?}");
        let m = &e.message;
        assert!(m.contains("above max_frame_bytes (135168)"), "{m}");
        let number_before = |tail: &str| -> usize {
            let head = &m[..m
                .find(tail)
                .unwrap_or_else(|| panic!("no '{tail}' in: {m}"))];
            head.rsplit(' ').next().unwrap().parse().expect("a count")
        };
        (
            number_before(&format!(" {what} takes")),
            number_before(&format!(" {what} fit in one answer")),
        )
    }
    // Unknown topics come back each with its error and message.
    let names: Vec<String> = (0..6000).map(|i| format!("no-such-topic-{i}")).collect();
    let metadata = |n: usize| {
        RequestBody::Metadata(MetadataRequest {
            topics: Some(names[..n].to_vec()),
        })
    };
    let body = answer_within(&mut c, 2, metadata(6000), MAX_FRAME_BYTES);
    let (asked, fit) = counts(&body, "topics");
    assert_eq!(asked, 6000);
    assert!(fit > 0 && fit < 6000, "{fit}");
    let body = answer_within(&mut c, 3, metadata(fit), MAX_FRAME_BYTES);
    let ResponseBody::Metadata(m) = &body else {
        panic!("expected metadata for {fit} topics, got {body:?}");
    };
    assert_eq!(m.topics.len(), fit);

    // 40 offsets with 4,000 bytes of metadata each: 160 KB, committed in
    // two requests that each fit.
    for (id, half) in [(4, 0..20), (5, 20..40)] {
        c.send_request(
            id,
            RequestBody::OffsetCommit(OffsetCommitRequest {
                group: "g".into(),
                member_id: None,
                generation: None,
                offsets: half
                    .map(|p| OffsetCommitPartition {
                        topic: "wide".into(),
                        partition: p,
                        offset: 1,
                        metadata: Some("m".repeat(4000)),
                    })
                    .collect(),
            }),
        );
        let r = c.read_response().expect("a commit answer");
        assert!(matches!(r.body, ResponseBody::OffsetCommit(_)), "{r:?}");
    }
    let fetch = |partitions: Option<u32>| {
        RequestBody::OffsetFetch(OffsetFetchRequest {
            group: "g".into(),
            partitions: partitions.map(|n| {
                (0..n)
                    .map(|p| GroupPartition {
                        topic: "wide".into(),
                        partition: p,
                    })
                    .collect()
            }),
        })
    };
    let body = answer_within(&mut c, 6, fetch(None), MAX_FRAME_BYTES);
    let (asked, fit) = counts(&body, "partitions");
    assert_eq!(asked, 40);
    assert!(fit > 0 && fit < 40, "{fit}");
    let body = answer_within(&mut c, 7, fetch(Some(fit as u32)), MAX_FRAME_BYTES);
    let ResponseBody::OffsetFetch(o) = &body else {
        panic!("expected {fit} offsets, got {body:?}");
    };
    assert_eq!(o.offsets.len(), fit);
    b.assert_serves();
}

/// A fetch's records are read up to a budget that leaves room for its
/// entries, but not for the messages of the entries that fail: when those
/// take the answer past the frame, the records of the last entries are
/// left out (fetched again from the same offset) rather than the frame
/// outgrown. The first entry with records keeps them, so a fetch always
/// moves on.
#[test]
fn a_fetch_whose_error_messages_would_outgrow_the_frame_leaves_records_out() {
    use skiff::protocol::{FetchPartition, FetchRequest};
    const MAX_FRAME_BYTES: usize = 1 << 20;
    let mut b = Broker::start(&format!(
        "[server]\nmax_frame_bytes = {MAX_FRAME_BYTES}\nmax_inflight_bytes_per_connection = {}\n",
        2 * MAX_FRAME_BYTES
    ));
    assert_ok(&b.cli(&["topics", "create", "full", "--partitions", "2"]));
    let mut c = RawConn::connect(&b.tcp);
    c.hello();
    // Five batches of about 100 KB in each partition.
    for n in 0..10u32 {
        produce_100_kb(&mut c, 10 + n, "full", n % 2);
    }
    let fetch = |partitions: Vec<FetchPartition>| {
        RequestBody::Fetch(FetchRequest {
            partitions,
            max_wait_ms: 0,
            min_bytes: 0,
            isolation: None,
        })
    };
    let entry = |partition| FetchPartition {
        topic: "full".into(),
        partition,
        offset: 0,
        max_bytes: MAX_FRAME_BYTES as u32,
    };
    // The entries for 1,500 partitions the topic lacks take about 100 KB
    // before their messages and 170 KB with them: both partitions' records
    // were read into the rest, and the second's no longer fit.
    let mut entries = vec![entry(0), entry(1)];
    entries.extend((0..1500).map(|i| entry(1000 + i)));
    let body = answer_within(&mut c, 3, fetch(entries), MAX_FRAME_BYTES);
    let ResponseBody::Fetch(f) = &body else {
        panic!("expected a fetch answer, got {body:?}");
    };
    assert_eq!(f.partitions.len(), 1502);
    let [first, second] = [&f.partitions[0], &f.partitions[1]];
    assert_eq!(first.error, ErrorCode::None);
    assert!(
        first.records.len() > 400_000,
        "{} record bytes",
        first.records.len()
    );
    assert_eq!(second.error, ErrorCode::None);
    assert_eq!(second.high_watermark, 500);
    assert!(
        second.records.is_empty(),
        "{} record bytes",
        second.records.len()
    );
    assert_eq!(second.next_offset, None);
    for p in &f.partitions[2..] {
        assert_eq!(p.error, ErrorCode::UnknownPartition);
        assert!(p.message.is_some());
    }
    // In front, the second partition's records come back.
    c.send_request(4, fetch(vec![entry(1), entry(0)]));
    let r = c.read_response().expect("an answer");
    let ResponseBody::Fetch(f) = &r.body else {
        panic!("expected a fetch answer, got {:?}", r.body);
    };
    assert!(
        f.partitions[0].records.len() > 400_000,
        "{:?}",
        f.partitions[0].records.len()
    );
    b.assert_serves();
}
