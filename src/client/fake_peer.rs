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
