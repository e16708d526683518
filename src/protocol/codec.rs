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

use super::error::{ErrorCode, FrameError};
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
    decode_exact(frame_body)
}

/// Decodes one response from a frame body (without the length prefix).
/// The records of a fetch are copied (with the whole frame).
pub fn decode_response(frame_body: &[u8]) -> Result<Response, FrameError> {
    // Through the one decoder the client uses: a second decoding context
    // would build every response type's decoder twice (93 KB of binary).
    decode_response_shared(&bytes::Bytes::copy_from_slice(frame_body))
}

/// As [`decode_response`], with fetched records left in the frame: they
/// are views of `frame_body`, which they keep alive, instead of copies.
pub fn decode_response_shared(frame_body: &bytes::Bytes) -> Result<Response, FrameError> {
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
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    minicbor::encode(item, &mut *out).expect("Vec<u8> writes are infallible");
    let body = out.len() - start - FRAME_HEADER_BYTES;
    finish_frame(out, start, body)
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
    encode_frame(response, out)
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
