//! Kafka request and response frames, without I/O.
//!
//! ```text
//! request:  length: i32 | header (api key, api version, correlation id,
//!           client id[, tagged fields]) | body
//! response: length: i32 | correlation id: i32[, tagged fields] | body
//! ```
//!
//! The header and body layouts per version come from the `kafka-protocol`
//! crate; this module adds the length prefix, the check that a length is
//! sane before anything is allocated, and the range of versions this client
//! implements for each API it uses.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::error::ProtocolError;

/// An API this client uses, with the versions it implements. (The crate's
/// own `Request` trait needs its broker side compiled in too.)
pub(crate) trait Api: Encodable + HeaderVersion {
    /// The API key.
    const KEY: i16;
    /// The answer's type.
    type Response: Decodable + HeaderVersion;
    /// The name in Kafka's protocol guide, for errors and logs.
    const NAME: &'static str;
    /// The lowest and highest version this client encodes and decodes.
    /// Negotiation picks the highest version both sides support.
    const OURS: (i16, i16);
}

macro_rules! apis {
    ($($ty:ty, $response:ty, $key:literal => $name:literal, $min:literal..=$max:literal, $why:literal;)*) => {
        $(
            #[doc = $why]
            impl Api for $ty {
                const KEY: i16 = $key;
                type Response = $response;
                const NAME: &'static str = $name;
                const OURS: (i16, i16) = ($min, $max);
            }
        )*
    };
}

apis! {
    ApiVersionsRequest, ApiVersionsResponse, 18 => "ApiVersions", 0..=3,
        "v3 (KIP-511) is the first flexible version; v4 adds nothing a client needs.";
    MetadataRequest, MetadataResponse, 3 => "Metadata", 1..=12,
        "v13 and later are the same for a client; v1 is the first with controller and rack.";
    ProduceRequest, ProduceResponse, 0 => "Produce", 3..=11,
        "v3 is the first with record batch v2. v12 tells the broker the client uses \
         transaction protocol 2 (KIP-890: partitions added implicitly), which this \
         client does not: it adds partitions with AddPartitionsToTxn.";
    FetchRequest, FetchResponse, 1 => "Fetch", 4..=12,
        "v4 is the first with an isolation level; v13 names topics by id only.";
    ListOffsetsRequest, ListOffsetsResponse, 2 => "ListOffsets", 2..=7,
        "v2 is the first with an isolation level.";
    FindCoordinatorRequest, FindCoordinatorResponse, 10 => "FindCoordinator", 1..=4,
        "v1 is the first with a key type (transaction coordinators); v4 batches keys.";
    InitProducerIdRequest, InitProducerIdResponse, 22 => "InitProducerId", 0..=4,
        "v5 and later belong to transaction protocol 2 and two-phase commit (KIP-890, KIP-939).";
    AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, 24 => "AddPartitionsToTxn", 0..=3,
        "v4 and later are the broker-to-broker batched form (KIP-890); clients use v3. \
         Tansu advertises v5 and crashes on v4.";
    EndTxnRequest, EndTxnResponse, 26 => "EndTxn", 0..=4,
        "v5 belongs to transaction protocol 2 (KIP-890).";
    CreateTopicsRequest, CreateTopicsResponse, 19 => "CreateTopics", 2..=7,
        "The whole range this crate implements.";
    SaslHandshakeRequest, SaslHandshakeResponse, 17 => "SaslHandshake", 1..=1,
        "v1 is followed by SaslAuthenticate requests (KIP-152); v0's raw tokens are not used.";
    SaslAuthenticateRequest, SaslAuthenticateResponse, 36 => "SaslAuthenticate", 0..=2,
        "The whole range.";
}

/// The four bytes of a frame's length prefix.
pub(crate) const LENGTH_BYTES: usize = 4;

/// A request's body at `version`: the generic half of a send, kept small
/// so that each API adds little code; the rest is [`Outgoing::header`].
pub(crate) fn encode_body<R: Api>(request: &R, version: i16) -> Result<Outgoing, ProtocolError> {
    let failed = || ProtocolError::Encode {
        api: R::NAME,
        version,
    };
    // Sized up front: a produce request's records would otherwise be
    // copied through every doubling of the buffer.
    let size = request.compute_size(version).map_err(|_| failed())?;
    let mut body = BytesMut::with_capacity(size);
    request.encode(&mut body, version).map_err(|_| failed())?;
    Ok(Outgoing {
        api: R::NAME,
        key: R::KEY,
        version,
        header_version: R::header_version(version),
        body: body.freeze(),
    })
}

/// An encoded request body, waiting for its header.
pub(crate) struct Outgoing {
    pub(crate) api: &'static str,
    pub(crate) key: i16,
    pub(crate) version: i16,
    pub(crate) header_version: i16,
    pub(crate) body: Bytes,
}

impl Outgoing {
    /// The length prefix and request header that go before the body.
    pub(crate) fn header(
        &self,
        correlation_id: i32,
        client_id: &str,
    ) -> Result<BytesMut, ProtocolError> {
        let failed = || ProtocolError::Encode {
            api: self.api,
            version: self.version,
        };
        let mut header = RequestHeader::default();
        header.request_api_key = self.key;
        header.request_api_version = self.version;
        header.correlation_id = correlation_id;
        header.client_id = Some(StrBytes::from_string(client_id.to_owned()));
        let mut buf = BytesMut::with_capacity(LENGTH_BYTES + 16 + client_id.len());
        buf.put_i32(0); // the length, below
        header
            .encode(&mut buf, self.header_version)
            .map_err(|_| failed())?;
        let length =
            i32::try_from(buf.len() - LENGTH_BYTES + self.body.len()).map_err(|_| failed())?;
        buf[..LENGTH_BYTES].copy_from_slice(&length.to_be_bytes());
        Ok(buf)
    }
}

/// Encodes one whole request frame, length prefix included.
#[cfg(test)]
pub(crate) fn encode_request<R: Api>(
    request: &R,
    version: i16,
    correlation_id: i32,
    client_id: &str,
) -> Result<Bytes, ProtocolError> {
    let outgoing = encode_body(request, version)?;
    let mut frame = outgoing.header(correlation_id, client_id)?;
    frame.extend_from_slice(&outgoing.body);
    Ok(frame.freeze())
}

/// The body length a frame's prefix announces, checked against `max`
/// before anything is allocated for it.
pub(crate) fn frame_length(prefix: [u8; LENGTH_BYTES], max: usize) -> Result<usize, ProtocolError> {
    let length = i32::from_be_bytes(prefix);
    let length = usize::try_from(length).map_err(|_| ProtocolError::NegativeLength(length))?;
    if length > max {
        return Err(ProtocolError::FrameTooLarge { len: length, max });
    }
    Ok(length)
}

/// The correlation id at the front of a response body (both header
/// versions start with it).
pub(crate) fn correlation_id(body: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(body.get(..4)?.try_into().ok()?))
}

/// Decodes a response body (the frame without its length prefix) for a
/// request of type `R` sent at `version`.
pub(crate) fn decode_response<R: Api>(
    mut body: Bytes,
    version: i16,
) -> Result<R::Response, ProtocolError> {
    let failed = ProtocolError::Decode {
        api: R::NAME,
        version,
    };
    let header_version = <R::Response as HeaderVersion>::header_version(version);
    ResponseHeader::decode(&mut body, header_version).map_err(|_| failed.clone())?;
    let response = R::Response::decode(&mut body, version).map_err(|_| failed.clone())?;
    Ok(response)
}

/// The highest version in both ranges, if they meet.
pub(crate) fn negotiate(ours: (i16, i16), broker: (i16, i16)) -> Option<i16> {
    let max = ours.1.min(broker.1);
    (max >= ours.0.max(broker.0)).then_some(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((0, 3), (0, 5)), Some(3));
        assert_eq!(negotiate((0, 3), (0, 2)), Some(2));
        assert_eq!(negotiate((4, 12), (0, 3)), None);
        assert_eq!(negotiate((3, 3), (3, 3)), Some(3));
    }

    #[test]
    fn a_request_frame_is_length_prefixed_and_decodes_back() {
        let mut req = MetadataRequest::default();
        req.allow_auto_topic_creation = false;
        let frame = encode_request(&req, 12, 77, "skiff").unwrap();
        let length = frame_length(frame[..4].try_into().unwrap(), 1 << 20).unwrap();
        assert_eq!(length, frame.len() - 4);
        let mut body = frame.slice(4..);
        let header = kafka_protocol::protocol::decode_request_header_from_buffer(&mut body)
            .expect("the crate reads its own header back");
        assert_eq!(header.request_api_key, <MetadataRequest as Api>::KEY);
        assert_eq!(header.request_api_version, 12);
        assert_eq!(header.correlation_id, 77);
        assert_eq!(header.client_id.as_deref(), Some("skiff"));
        let back = MetadataRequest::decode(&mut body, 12).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn lengths_are_checked_before_allocation() {
        assert_eq!(
            frame_length((-1i32).to_be_bytes(), 100),
            Err(ProtocolError::NegativeLength(-1))
        );
        assert_eq!(
            frame_length(101i32.to_be_bytes(), 100),
            Err(ProtocolError::FrameTooLarge { len: 101, max: 100 })
        );
        assert_eq!(frame_length(100i32.to_be_bytes(), 100), Ok(100));
    }

    #[test]
    fn responses_decode_with_either_header_version() {
        // ApiVersions answers with header v0 even at flexible v3.
        let mut response = ApiVersionsResponse::default();
        response.throttle_time_ms = 5;
        let mut body = BytesMut::new();
        body.put_i32(9);
        response.encode(&mut body, 3).unwrap();
        let body = body.freeze();
        assert_eq!(correlation_id(&body), Some(9));
        let back = decode_response::<ApiVersionsRequest>(body, 3).unwrap();
        assert_eq!(back.throttle_time_ms, 5);

        // Metadata v12 is flexible: header v1, with a tagged-field count.
        let response = MetadataResponse::default();
        let mut body = BytesMut::new();
        body.put_i32(10);
        body.put_u8(0); // no tagged fields
        response.encode(&mut body, 12).unwrap();
        let back = decode_response::<MetadataRequest>(body.freeze(), 12).unwrap();
        assert_eq!(back, response);

        let garbage = Bytes::from_static(&[0, 0, 0, 1, 0xff]);
        assert!(matches!(
            decode_response::<MetadataRequest>(garbage, 12),
            Err(ProtocolError::Decode {
                api: "Metadata",
                version: 12
            })
        ));
    }
}
