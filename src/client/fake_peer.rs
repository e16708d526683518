//! Pieces for test peers that speak the protocol by hand over one TCP
//! connection, to show what a client puts on the wire and when.

use std::io::Write;

use crate::protocol::{
    decode_request, encode_response, frame_len, HelloResponse, Request, Response, ResponseBody,
    PROTOCOL_VERSION_MAX,
};

/// Takes the first whole request frame off the front of `buf`.
pub(crate) fn take_request(buf: &mut Vec<u8>) -> Option<Request<'static>> {
    let n = frame_len(buf, u32::MAX).unwrap()?;
    let request = decode_request(&buf[4..n]).unwrap().into_owned();
    buf.drain(..n);
    Some(request)
}

/// The next whole request read from `s`, `buf` holding what was read
/// past it; `None` once the connection ends.
pub(crate) fn read_request(
    s: &mut impl std::io::Read,
    buf: &mut Vec<u8>,
) -> Option<Request<'static>> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(request) = take_request(buf) {
            return Some(request);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The hello answer of a peer named `name`.
pub(crate) fn hello(name: &str) -> ResponseBody {
    ResponseBody::Hello(HelloResponse {
        version: PROTOCOL_VERSION_MAX,
        server_version: name.into(),
        max_frame_bytes: 8 << 20,
        max_batch_bytes: 1 << 20,
    })
}

pub(crate) fn answer(s: &mut impl Write, correlation_id: u32, body: ResponseBody) {
    let mut out = Vec::new();
    encode_response(
        &Response {
            correlation_id,
            body,
        },
        &mut out,
    )
    .unwrap();
    s.write_all(&out).unwrap();
}
