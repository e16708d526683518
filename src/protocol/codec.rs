//! Framing: check that a whole frame is buffered, then decode it.
//!
//! # Frame layout
//!
//! | offset | size | field | notes                                          |
//! |-------:|-----:|-------|------------------------------------------------|
//! |      0 |    4 | len   | u32, big-endian: the body's size in bytes      |
//! |      4 |  len | body  | exactly one CBOR item: a [`Request`] or [`Response`] |
//!
//! The length is checked against the limit before anything is allocated or
//! awaited, so a bit-flipped or hostile prefix (up to 4 GiB) is an error at
//! once, never an allocation. A body with bytes after its CBOR item is an
//! error: such a peer's framing cannot be trusted.
//!
//! Use: buffer bytes from the socket; `frame_len(buf, max)` says whether a
//! whole frame is there and how long it is; decode `&buf[FRAME_HEADER_BYTES..n]`
//! and drop `n` bytes from the buffer.

use minicbor::Decoder;

use super::error::{ErrorCode, FrameError, MalformedKind};
use super::types::{ErrorResponse, Request, RequestBody, Response, ResponseBody, SharedFrame};

/// The size of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Returns the size of the first frame in `buf`, prefix included, once all
/// of it is buffered: `Ok(None)` means "read more". A length above
/// `max_frame_bytes` is an error as soon as the prefix is in.
pub fn frame_len(buf: &[u8], max_frame_bytes: u32) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: max_frame_bytes,
        });
    }
    let total = FRAME_HEADER_BYTES + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// The body's declared length, from a buffer holding at least the prefix.
/// For a reader that wants to size one read exactly.
pub fn body_len(prefix: [u8; FRAME_HEADER_BYTES]) -> u32 {
    u32::from_be_bytes(prefix)
}

fn decode_exact<'b, T: minicbor::Decode<'b, ()>>(body: &'b [u8]) -> Result<T, FrameError> {
    decode_exact_with(body, &mut ())
}

fn decode_exact_with<'b, C, T: minicbor::Decode<'b, C>>(
    body: &'b [u8],
    ctx: &mut C,
) -> Result<T, FrameError> {
    let mut d = Decoder::new(body);
    let item = d.decode_with(ctx).map_err(|e| FrameError::malformed(&e))?;
    if d.position() != body.len() {
        return Err(FrameError::TrailingBytes {
            item_end: d.position(),
            frame_len: body.len(),
        });
    }
    Ok(item)
}

/// Decodes one request from a frame body (without the length prefix).
pub fn decode_request(frame_body: &[u8]) -> Result<Request<'_>, FrameError> {
    if let Some(r) = produce::decode(frame_body) {
        return Ok(r);
    }
    decode_exact(frame_body).map_err(|e| request_error(frame_body, e))
}

/// Tells a request the server can refuse and read on after from a frame
/// it cannot trust. A body that is one whole CBOR item with an intact
/// envelope, `[correlation_id, [operation, ...]]`, ends where its length
/// prefix says, whatever its operation or fields: when only those are
/// wrong ([`FrameError::UnknownOperation`], [`FrameError::UnfitBody`]),
/// the next frame starts where it should.
#[cold]
fn request_error(body: &[u8], e: FrameError) -> FrameError {
    let FrameError::Malformed { offset, kind } = e else {
        return e;
    };
    let Some((operation, at)) = envelope(body) else {
        return e;
    };
    // The derived decoder reports an unknown variant where its number is.
    if kind == MalformedKind::UnknownVariant && offset == Some(at) {
        FrameError::UnknownOperation { operation }
    } else {
        FrameError::UnfitBody {
            operation,
            offset,
            kind,
        }
    }
}

/// The operation number of a body that is one whole, valid CBOR item
/// shaped as a request's envelope (as the derived decoder reads it: the
/// operation's array definite and not empty), and where that number
/// starts; `None` for anything else.
fn envelope(body: &[u8]) -> Option<(u32, usize)> {
    let mut d = Decoder::new(body);
    d.skip().ok()?;
    if d.position() != body.len() {
        return None;
    }
    let mut d = Decoder::new(body);
    d.array().ok()?;
    d.u32().ok()?;
    if d.array().ok()?? == 0 {
        return None;
    }
    let at = d.position();
    Some((d.u32().ok()?, at))
}

/// Decodes one response from a frame body (without the length prefix).
/// The records of a fetch are copied (with the whole frame).
pub fn decode_response(frame_body: &[u8]) -> Result<Response, FrameError> {
    if let Some(r) = produce::decode_response(frame_body) {
        return Ok(r);
    }
    // Through the one decoder the client uses: a second decoding context
    // would build every response type's decoder twice (93 KB of binary).
    decode_response_shared(&bytes::Bytes::copy_from_slice(frame_body))
}

/// As [`decode_response`], with fetched records left in the frame: they
/// are views of `frame_body`, which they keep alive, instead of copies.
pub fn decode_response_shared(frame_body: &bytes::Bytes) -> Result<Response, FrameError> {
    if let Some(r) = produce::decode_response(frame_body) {
        return Ok(r);
    }
    decode_exact_with(frame_body, &mut SharedFrame(frame_body))
}

/// Reads just the correlation id of a frame body that may be malformed
/// further on, so the error answer can carry it. `None` when even that is
/// unreadable; the server then answers with correlation id 0.
pub fn peek_correlation_id(frame_body: &[u8]) -> Option<u32> {
    let mut d = Decoder::new(frame_body);
    d.array().ok()?;
    d.u32().ok()
}

fn encode_frame<T: minicbor::Encode<()>>(item: &T, out: &mut Vec<u8>) -> Result<usize, FrameError> {
    frame(out, |out| {
        minicbor::encode(item, out).expect("Vec<u8> writes are infallible");
    })
}

/// Appends a frame whose body `body` writes.
fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) -> Result<usize, FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    body(out);
    let len = out.len() - start - FRAME_HEADER_BYTES;
    finish_frame(out, start, len)
}

/// Fills in the length prefix of the frame begun at `start` (its body
/// `body` bytes long), or removes the frame when that does not fit a u32.
fn finish_frame(out: &mut Vec<u8>, start: usize, body: usize) -> Result<usize, FrameError> {
    let Ok(len) = u32::try_from(body) else {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: body as u64,
            max: u32::MAX,
        });
    };
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(FRAME_HEADER_BYTES + body)
}

/// Appends one frame (length prefix and item) to `out` and returns its size,
/// prefix included. Fails only when the body does not fit a u32 length;
/// checking the peer's `max_frame_bytes` is the caller's job, since only it
/// knows the negotiated limit.
pub fn encode_request(request: &Request, out: &mut Vec<u8>) -> Result<usize, FrameError> {
    encode_request_body(request.correlation_id, &request.body, out)
}

/// As [`encode_request`], from the parts of a [`Request`]: the caller keeps
/// ownership of the body (the client keeps produced batches for a retry).
pub fn encode_request_body(
    correlation_id: u32,
    body: &RequestBody,
    out: &mut Vec<u8>,
) -> Result<usize, FrameError> {
    if let RequestBody::Produce(p) = body {
        return frame(out, |out| produce::encode_request(correlation_id, p, out));
    }
    encode_frame(
        &RequestRef {
            correlation_id,
            body,
        },
        out,
    )
}

/// Encodes exactly like [`Request`]'s derived `Encode`, over a borrowed
/// body. The golden tests go through this path.
struct RequestRef<'a> {
    correlation_id: u32,
    body: &'a RequestBody<'a>,
}

impl<C> minicbor::Encode<C> for RequestRef<'_> {
    fn encode<W: minicbor::encode::Write>(
        &self,
        e: &mut minicbor::Encoder<W>,
        ctx: &mut C,
    ) -> Result<(), minicbor::encode::Error<W::Error>> {
        e.array(2)?.u32(self.correlation_id)?;
        minicbor::Encode::encode(self.body, e, ctx)
    }
}

/// As [`encode_request`], for a response.
pub fn encode_response(response: &Response, out: &mut Vec<u8>) -> Result<usize, FrameError> {
    if let ResponseBody::Produce(p) = &response.body {
        let cid = response.correlation_id;
        return frame(out, |out| produce::encode_response(cid, p, out));
    }
    encode_frame(response, out)
}

/// A produce request and its answer, the one round trip a device makes per
/// record, coded by hand: the derived code spent about 250 ns decoding a
/// one-record request and 170 ns encoding its answer, several times what
/// the bytes need (docs/performance.md, "the produce round trip's codec").
/// Both write and read exactly what the derived code does; the decoder
/// takes only the shape every client sends (definite lengths, no fields
/// past the known ones) and leaves anything else to the derived decoder,
/// whose verdict stands. The tests hold both to the derived code.
mod produce {
    use minicbor::Decoder;

    use crate::protocol::error::ErrorCode;
    use crate::protocol::types::{
        BatchBytes, ProducePartition, ProducePartitionResult, ProduceRequest, ProduceResponse,
        Request, RequestBody, Response, ResponseBody,
    };

    /// The operation's index in [`RequestBody`] and `ResponseBody`.
    const PRODUCE: u32 = 7;

    /// `None` when the body is anything but a produce request in the
    /// usual shape (the derived decoder then decides).
    pub(super) fn decode(body: &[u8]) -> Option<Request<'_>> {
        let mut d = Decoder::new(body);
        let (correlation_id, fields) = read_start(&mut d)?;
        if fields != 1 {
            return None;
        }
        let n = array(&mut d)?;
        // Each entry takes at least 4 bytes: a hostile count allocates
        // no more than the frame could hold.
        if n > (body.len() - d.position()) as u64 / 4 {
            return None;
        }
        let mut partitions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            if array(&mut d)? != 3 {
                return None;
            }
            let topic = d.str().ok()?.to_owned();
            let partition = d.u32().ok()?;
            let batch = BatchBytes::from(d.bytes().ok()?);
            partitions.push(ProducePartition {
                topic,
                partition,
                batch,
            });
        }
        (d.position() == body.len()).then_some(Request {
            correlation_id,
            body: RequestBody::Produce(ProduceRequest { partitions }),
        })
    }

    /// Appends a produce answer's CBOR, as the derived `Encode` of
    /// `Response` writes it: trailing `None` fields left out. Written a
    /// head at a time: minicbor's encoder, built at opt-level "z" with the
    /// rest of skiff, took twice as long for the same bytes.
    pub(super) fn encode_response(correlation_id: u32, r: &ProduceResponse, out: &mut Vec<u8>) {
        write_start(
            out,
            correlation_id,
            if r.throttle_ms.is_some() { 2 } else { 1 },
        );
        head(out, ARRAY, r.partitions.len() as u64);
        for p in &r.partitions {
            head(out, ARRAY, if p.message.is_some() { 7 } else { 6 });
            text(out, &p.topic);
            head(out, UINT, p.partition.into());
            head(out, UINT, p.error.as_u16().into());
            head(out, UINT, p.base_offset);
            head(out, UINT, p.last_offset);
            head(out, UINT, p.duplicate_records.into());
            if let Some(m) = &p.message {
                text(out, m);
            }
        }
        if let Some(t) = r.throttle_ms {
            head(out, UINT, t.into());
        }
    }

    /// Appends a produce request's CBOR, as the derived `Encode` of
    /// `Request` writes it.
    pub(super) fn encode_request(correlation_id: u32, r: &ProduceRequest, out: &mut Vec<u8>) {
        write_start(out, correlation_id, 1);
        head(out, ARRAY, r.partitions.len() as u64);
        for p in &r.partitions {
            head(out, ARRAY, 3);
            text(out, &p.topic);
            head(out, UINT, p.partition.into());
            head(out, BYTES, p.batch.len() as u64);
            out.extend_from_slice(&p.batch);
        }
    }

    /// `None` when the body is anything but a produce answer in the shape
    /// [`encode_response`] writes (the derived decoder then decides).
    pub(super) fn decode_response(body: &[u8]) -> Option<Response> {
        let mut d = Decoder::new(body);
        let (correlation_id, fields) = read_start(&mut d)?;
        let n = array(&mut d)?;
        // Each entry takes at least 7 bytes.
        if !(1..=2).contains(&fields) || n > (body.len() - d.position()) as u64 / 7 {
            return None;
        }
        let mut partitions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let len = array(&mut d)?;
            if !(6..=7).contains(&len) {
                return None;
            }
            partitions.push(ProducePartitionResult {
                topic: d.str().ok()?.to_owned(),
                partition: d.u32().ok()?,
                error: ErrorCode::from_u16(d.u16().ok()?)?,
                base_offset: d.u64().ok()?,
                last_offset: d.u64().ok()?,
                duplicate_records: d.u32().ok()?,
                message: if len == 7 {
                    Some(d.str().ok()?.to_owned())
                } else {
                    None
                },
            });
        }
        let throttle_ms = if fields == 2 {
            Some(d.u32().ok()?)
        } else {
            None
        };
        (d.position() == body.len()).then_some(Response {
            correlation_id,
            body: ResponseBody::Produce(ProduceResponse {
                partitions,
                throttle_ms,
            }),
        })
    }

    /// What every produce frame starts with, `[correlation_id, [7,
    /// [...]]]`, up to the head of the body's own array of `fields`.
    fn write_start(out: &mut Vec<u8>, correlation_id: u32, fields: u64) {
        head(out, ARRAY, 2);
        head(out, UINT, correlation_id.into());
        head(out, ARRAY, 2);
        head(out, UINT, PRODUCE.into());
        head(out, ARRAY, fields);
    }

    /// Reads what [`write_start`] writes: the correlation id and the
    /// body's field count, or `None` for another frame.
    fn read_start(d: &mut Decoder<'_>) -> Option<(u32, u64)> {
        if array(d)? != 2 {
            return None;
        }
        let correlation_id = d.u32().ok()?;
        if array(d)? != 2 || d.u32().ok()? != PRODUCE {
            return None;
        }
        Some((correlation_id, array(d)?))
    }

    /// A definite-length array's length; `None` for anything else.
    fn array(d: &mut Decoder<'_>) -> Option<u64> {
        d.array().ok().flatten()
    }

    const UINT: u8 = 0;
    const BYTES: u8 = 2;
    const TEXT: u8 = 3;
    const ARRAY: u8 = 4;

    /// A CBOR item's head in its shortest form (RFC 8949, 3.1).
    fn head(out: &mut Vec<u8>, major: u8, v: u64) {
        let m = major << 5;
        match v {
            0..=23 => out.push(m | v as u8),
            24..=0xff => out.extend_from_slice(&[m | 24, v as u8]),
            0x100..=0xffff => {
                out.push(m | 25);
                out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(m | 26);
                out.extend_from_slice(&(v as u32).to_be_bytes());
            }
            _ => {
                out.push(m | 27);
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }

    fn text(out: &mut Vec<u8>, s: &str) {
        head(out, TEXT, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
}

/// Fetch records at least this long are sent in place, not copied into the
/// frame (see [`encode_response_spliced`]).
pub const SPLICE_MIN_BYTES: usize = 64 * 1024;

/// Where a response's fetch records go in a frame encoded without them:
/// before byte `at` of the encoded bytes, the records of partition result
/// `partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splice {
    pub at: usize,
    pub partition: usize,
}

/// As [`encode_response`], but the records of fetch results of at least
/// [`SPLICE_MIN_BYTES`] are left out of `out` and named in `splices`
/// (appended, in order): the frame is `out` with each result's records
/// inserted at its splice, and its length prefix counts them. A sender
/// writes the pieces in order (one vectored write) instead of copying a
/// megabyte per fetch into the frame. Returns the whole frame's size.
pub fn encode_response_spliced(
    response: &Response,
    out: &mut Vec<u8>,
    splices: &mut Vec<Splice>,
) -> Result<usize, FrameError> {
    let big: Vec<(usize, &[u8])> = match &response.body {
        ResponseBody::Fetch(f) => f
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.records.len() >= SPLICE_MIN_BYTES)
            .map(|(i, p)| (i, &p.records[..]))
            .collect(),
        _ => Vec::new(),
    };
    if big.is_empty() {
        return encode_response(response, out);
    }
    let start = out.len();
    let first_splice = splices.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let mut w = SplicingWriter {
        out: &mut *out,
        big: &big,
        next: 0,
        spliced_bytes: 0,
        splices: &mut *splices,
    };
    minicbor::encode(response, &mut w).expect("Vec<u8> writes are infallible");
    let spliced = w.spliced_bytes;
    let body = out.len() - start - FRAME_HEADER_BYTES + spliced;
    let res = finish_frame(out, start, body);
    if res.is_err() {
        splices.truncate(first_splice);
    }
    res
}

/// Copies what the encoder writes, except the (large) records slices it
/// was told of, which it recognises by address and length and only notes.
/// Anything else, however large, is copied: the frame stays exact.
struct SplicingWriter<'a, 'b> {
    out: &'a mut Vec<u8>,
    big: &'a [(usize, &'b [u8])],
    next: usize,
    spliced_bytes: usize,
    splices: &'a mut Vec<Splice>,
}

impl minicbor::encode::Write for SplicingWriter<'_, '_> {
    type Error = std::convert::Infallible;

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        match self.big.get(self.next) {
            Some(&(partition, records))
                if buf.as_ptr() == records.as_ptr() && buf.len() == records.len() =>
            {
                self.splices.push(Splice {
                    at: self.out.len(),
                    partition,
                });
                self.next += 1;
                self.spliced_bytes += records.len();
            }
            _ => self.out.extend_from_slice(buf),
        }
        Ok(())
    }
}

/// The answer to a frame that could not be decoded: the correlation id if it
/// was readable (else 0) and the error's code. The server sends it and then
/// closes the connection.
pub fn frame_error_response(frame_body: &[u8], error: &FrameError) -> Response {
    Response {
        correlation_id: peek_correlation_id(frame_body).unwrap_or(0),
        body: ResponseBody::Error(ErrorResponse {
            code: error.code(),
            message: error.to_string(),
        }),
    }
}

/// An error answer for a request as a whole.
pub fn error_response(
    correlation_id: u32,
    code: ErrorCode,
    message: impl Into<String>,
) -> Response {
    Response {
        correlation_id,
        body: ResponseBody::Error(ErrorResponse {
            code,
            message: message.into(),
        }),
    }
}

#[cfg(test)]
mod produce_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::types::*;

    fn request(cid: u32, partitions: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
        let r = Request {
            correlation_id: cid,
            body: RequestBody::Produce(ProduceRequest {
                partitions: partitions
                    .iter()
                    .map(|(topic, partition, batch)| ProducePartition {
                        topic: topic.clone(),
                        partition: *partition,
                        batch: batch.clone().into(),
                    })
                    .collect(),
            }),
        };
        let mut out = Vec::new();
        encode_frame(&r, &mut out).unwrap();
        out.split_off(FRAME_HEADER_BYTES)
    }

    fn answer(
        cid: u32,
        partitions: Vec<ProducePartitionResult>,
        throttle_ms: Option<u32>,
    ) -> Response {
        Response {
            correlation_id: cid,
            body: ResponseBody::Produce(ProduceResponse {
                partitions,
                throttle_ms,
            }),
        }
    }

    fn results() -> impl Strategy<Value = Vec<ProducePartitionResult>> {
        let result = (
            ".{0,12}",
            any::<u32>(),
            0..ErrorCode::ALL.len(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            proptest::option::of(".{0,12}"),
        )
            .prop_map(
                |(topic, partition, code, base, last, duplicates, message)| {
                    ProducePartitionResult {
                        topic,
                        partition,
                        error: ErrorCode::ALL[code],
                        base_offset: base,
                        last_offset: last,
                        duplicate_records: duplicates,
                        message,
                    }
                },
            );
        proptest::collection::vec(result, 0..4)
    }

    proptest! {
        #[test]
        fn a_produce_request_is_written_as_the_derived_code_writes_it(
            cid in any::<u32>(),
            partitions in proptest::collection::vec(
                (".{0,12}", any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..4),
        ) {
            let derived = request(cid, &partitions);
            let Ok(Request { body, .. }) = decode_exact::<Request>(&derived) else { unreachable!() };
            let mut fast = vec![9];
            let n = encode_request_body(cid, &body, &mut fast).unwrap();
            prop_assert_eq!(n, derived.len() + FRAME_HEADER_BYTES);
            prop_assert_eq!(&fast[1 + FRAME_HEADER_BYTES..], &derived[..]);
        }

        #[test]
        fn a_produce_answer_reads_as_the_derived_code_reads_it(
            cid in any::<u32>(),
            results in results(),
            throttle_ms in proptest::option::of(any::<u32>()),
        ) {
            let r = answer(cid, results, throttle_ms);
            let mut f = Vec::new();
            encode_frame(&r, &mut f).unwrap();
            let body = &f[FRAME_HEADER_BYTES..];
            prop_assert_eq!(produce::decode_response(body), Some(r.clone()));
            let shared = bytes::Bytes::copy_from_slice(body);
            prop_assert_eq!(decode_response_shared(&shared), Ok(r));
        }

        #[test]
        fn a_damaged_produce_answer_gets_the_derived_decoders_verdict(
            cid in any::<u32>(),
            results in results(),
            throttle_ms in proptest::option::of(any::<u32>()),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            how in 0..3u8,
        ) {
            let mut f = Vec::new();
            encode_frame(&answer(cid, results, throttle_ms), &mut f).unwrap();
            let mut body = f.split_off(FRAME_HEADER_BYTES);
            let i = at.index(body.len());
            match how {
                0 => body[i] = byte,
                1 => body.truncate(i),
                _ => body.insert(i, byte),
            }
            let derived = decode_exact_with::<_, Response>(&body, &mut SharedFrame(&body.clone().into()));
            prop_assert_eq!(decode_response(&body), derived);
        }

        #[test]
        fn a_produce_answer_is_written_as_the_derived_code_writes_it(
            cid in any::<u32>(),
            results in results(),
            throttle_ms in proptest::option::of(any::<u32>()),
        ) {
            let r = answer(cid, results, throttle_ms);
            let (mut fast, mut derived) = (vec![9], vec![9]);
            let n = encode_response(&r, &mut fast).unwrap();
            prop_assert_eq!(n, encode_frame(&r, &mut derived).unwrap());
            prop_assert_eq!(fast, derived);
        }

        #[test]
        fn a_produce_request_reads_as_the_derived_code_reads_it(
            cid in any::<u32>(),
            partitions in proptest::collection::vec(
                (".{0,12}", any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..4),
        ) {
            let body = request(cid, &partitions);
            let fast = produce::decode(&body);
            prop_assert!(fast.is_some(), "the usual shape takes the fast path");
            prop_assert_eq!(fast.map(Ok), Some(decode_exact::<Request>(&body)));
        }

        /// Damaged, cut or lengthened, a request gets the derived decoder's
        /// verdict, error or value.
        #[test]
        fn a_damaged_produce_request_gets_the_derived_decoders_verdict(
            cid in any::<u32>(),
            partitions in proptest::collection::vec(
                (".{0,6}", any::<u32>(), proptest::collection::vec(any::<u8>(), 0..12)), 0..3),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            how in 0..3u8,
        ) {
            let mut body = request(cid, &partitions);
            let i = at.index(body.len());
            match how {
                0 => body[i] = byte,
                1 => body.truncate(i),
                _ => body.insert(i, byte),
            }
            let derived = decode_exact::<Request>(&body).map_err(|e| request_error(&body, e));
            prop_assert_eq!(decode_request(&body), derived);
        }
    }

    #[test]
    fn other_shapes_are_left_to_the_derived_decoder() {
        let usual = request(5, &[("t".into(), 1, vec![1, 2])]);
        assert!(produce::decode(&usual).is_some());
        // An indefinite-length array of partitions, and a field past the
        // known three: both valid CBOR the derived decoder reads.
        let mut indefinite = usual.clone();
        let at = indefinite.iter().position(|&b| b == 0x81).unwrap() + 1;
        assert_eq!(indefinite[at], 0x81, "[partitions] then [entry]");
        indefinite[at] = 0x9f;
        indefinite.push(0xff);
        let mut extra = usual.clone();
        extra[at + 1] = 0x84;
        extra.push(0x00);
        for body in [indefinite, extra] {
            assert_eq!(produce::decode(&body), None);
            let derived = decode_request(&body).expect("the derived decoder reads it");
            assert_eq!(derived, decode_exact::<Request>(&usual).unwrap());
        }
        // Not a produce request at all.
        let hello = Request {
            correlation_id: 1,
            body: RequestBody::Hello(HelloRequest {
                version_min: 1,
                version_max: 2,
                client_name: Some("c".into()),
            }),
        };
        let mut out = Vec::new();
        encode_frame(&hello, &mut out).unwrap();
        assert_eq!(produce::decode(&out[FRAME_HEADER_BYTES..]), None);
    }
}
