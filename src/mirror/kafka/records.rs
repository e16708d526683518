//! Kafka record batches (magic 2), encoded and decoded without I/O.
//!
//! ```text
//! offset  size  field (big-endian)
//!      0     8  base offset            (0 from a producer; the broker assigns)
//!      8     4  batch length           (bytes after this field)
//!     12     4  partition leader epoch (-1 from a producer)
//!     16     1  magic                  (2)
//!     17     4  CRC-32C                (over offset 21 to the end)
//!     21     2  attributes             (bits 0-2 compression, 3 log-append time,
//!                                       4 transactional, 5 control)
//!     23     4  last offset delta
//!     27     8  base timestamp         (the first record's)
//!     35     8  max timestamp
//!     43     8  producer id            (-1: none)
//!     51     2  producer epoch
//!     53     4  base sequence          (-1: none)
//!     57     4  record count
//!     61        records, compressed as a whole when the attributes say so
//! ```
//!
//! A record is `length: varint`, `attributes: i8` (0), `timestamp delta:
//! varlong`, `offset delta: varint`, key and value as `length: varint` (-1
//! for null) and bytes, then `header count: varint` and per header a key
//! (length and UTF-8 bytes) and a value like a record's value. Varints are
//! zigzag LEB128, as in protobuf.
//!
//! A control batch (attribute bit 5) holds one record whose key is
//! `version: i16, type: i16` (0 abort, 1 commit): the transaction markers.

use std::io::{Read, Write};

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before the first record.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes of the base offset and batch length fields, which the length
/// does not count.
const LOG_OVERHEAD_BYTES: usize = 12;
const MAGIC_OFFSET: usize = 16;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;
const _: () = assert!(ATTRIBUTES_OFFSET == CRC_OFFSET + 4);
const MAGIC_V2: i8 = 2;

const ATTR_COMPRESSION_MASK: i16 = 0x07;
const ATTR_LOG_APPEND_TIME: i16 = 1 << 3;
const ATTR_TRANSACTIONAL: i16 = 1 << 4;
const ATTR_CONTROL: i16 = 1 << 5;

/// A batch's compression codec. Gzip and snappy are decoded by no part of
/// skiff: a fetch that meets them reports [`RecordsError::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    fn attribute(self) -> i16 {
        match self {
            Self::None => 0,
            Self::Lz4 => 3,
            Self::Zstd => 4,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = RecordsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd),
            _ => Err(RecordsError::UnknownCodec),
        }
    }
}

/// Why record batch bytes could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordsError {
    /// The bytes end inside a field.
    Truncated,
    /// A magic byte other than 2 (message sets v0/v1 are not read).
    Magic(i8),
    /// The CRC in the batch does not match its bytes.
    Crc { stored: u32, computed: u32 },
    /// A length, count or varint out of its valid range.
    Malformed(&'static str),
    /// A codec this build does not decode (gzip = 1, snappy = 2, or unknown).
    Unsupported { codec: i16 },
    /// Compressed records that do not decompress.
    Decompress(&'static str),
    /// Records that decompress beyond the configured limit.
    TooLarge { max: usize },
    /// A header key that is not UTF-8.
    HeaderKey,
    /// A compression name other than none, lz4 or zstd.
    UnknownCodec,
}

impl std::fmt::Display for RecordsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("truncated"),
            Self::Magic(m) => write!(f, "magic {m} is not supported (only 2)"),
            Self::Crc { stored, computed } => {
                write!(
                    f,
                    "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            Self::Malformed(what) => write!(f, "malformed {what}"),
            Self::Unsupported { codec } => write!(f, "compression codec {codec} is not supported"),
            Self::Decompress(codec) => write!(f, "{codec} data does not decompress"),
            Self::TooLarge { max } => write!(f, "records decompress beyond {max} bytes"),
            Self::HeaderKey => f.write_str("header key is not UTF-8"),
            Self::UnknownCodec => f.write_str("compression is one of none, lz4, zstd"),
        }
    }
}

impl std::error::Error for RecordsError {}

/// A record header to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRef<'a> {
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

/// A record to encode, borrowing its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Milliseconds since the Unix epoch (CreateTime).
    pub timestamp_ms: i64,
    pub headers: &'a [HeaderRef<'a>],
}

/// A decoded record header. Kafka allows a key more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Bytes>,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// A transaction marker's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    Abort,
    Commit,
}

/// A decoded record batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub base_offset: i64,
    pub last_offset_delta: i32,
    pub partition_leader_epoch: i32,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
    pub control: bool,
    /// The codec the batch was stored with; a gzip or snappy batch is
    /// decoded with no records only if it is a control batch (never).
    pub codec: i16,
    pub base_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    pub records: Vec<Record>,
}

impl Batch {
    /// The offset after this batch's last record.
    pub fn next_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta) + 1
    }

    /// The marker type, for a control batch that is a transaction marker.
    pub fn control_kind(&self) -> Option<ControlKind> {
        if !self.control {
            return None;
        }
        let key = self.records.first()?.key.as_ref()?;
        match key.get(..4)? {
            [_, _, 0, 0] => Some(ControlKind::Abort),
            [_, _, 0, 1] => Some(ControlKind::Commit),
            _ => None,
        }
    }
}

/// Who writes a batch: the idempotent producer's identity and the batch's
/// first sequence number. [`ProducerStamp::NONE`] for a plain producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerStamp {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
}

impl ProducerStamp {
    pub const NONE: Self = Self {
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
        transactional: false,
    };
}

/// Collects records for one batch. The producer's stamp (sequence numbers)
/// and the compression are applied by [`BatchBuilder::finish`], when the
/// batch is about to be sent.
#[derive(Debug, Clone, Default)]
pub struct BatchBuilder {
    /// The records, encoded and uncompressed.
    records: Vec<u8>,
    count: i32,
    base_timestamp_ms: i64,
    max_timestamp_ms: i64,
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size before compression, header included.
    pub fn encoded_bytes(&self) -> usize {
        BATCH_HEADER_BYTES + self.records.len()
    }

    /// Appends a record; its offset delta is its position in the batch.
    pub fn push(&mut self, record: &RecordRef<'_>) -> Result<(), RecordsError> {
        if self.count == i32::MAX {
            return Err(RecordsError::Malformed("record count"));
        }
        if self.count == 0 {
            self.base_timestamp_ms = record.timestamp_ms;
            self.max_timestamp_ms = record.timestamp_ms;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        let timestamp_delta = record.timestamp_ms.wrapping_sub(self.base_timestamp_ms);

        let mut body = Vec::with_capacity(
            16 + record.key.map_or(0, <[u8]>::len) + record.value.map_or(0, <[u8]>::len),
        );
        body.push(0); // record attributes: unused
        put_varlong(&mut body, timestamp_delta);
        put_varint(&mut body, self.count);
        put_bytes(&mut body, record.key)?;
        put_bytes(&mut body, record.value)?;
        put_varint(&mut body, length_i32(record.headers.len())?);
        for header in record.headers {
            put_bytes(&mut body, Some(header.key.as_bytes()))?;
            put_bytes(&mut body, header.value)?;
        }
        put_varint(&mut self.records, length_i32(body.len())?);
        self.records.extend_from_slice(&body);
        self.count += 1;
        Ok(())
    }

    /// The finished batch: header, CRC and the records, compressed.
    pub fn finish(
        &self,
        compression: Compression,
        stamp: ProducerStamp,
    ) -> Result<Bytes, RecordsError> {
        if self.count == 0 {
            return Err(RecordsError::Malformed("empty batch"));
        }
        let payload = match compression {
            Compression::None => None,
            Compression::Lz4 => Some(lz4_compress(&self.records)?),
            Compression::Zstd => Some(ruzstd::encoding::compress_to_vec(
                self.records.as_slice(),
                ruzstd::encoding::CompressionLevel::Fastest,
            )),
        };
        let payload = payload.as_deref().unwrap_or(&self.records);

        let mut attributes = compression.attribute();
        if stamp.transactional {
            attributes |= ATTR_TRANSACTIONAL;
        }
        let batch_length = length_i32(BATCH_HEADER_BYTES - LOG_OVERHEAD_BYTES + payload.len())?;
        let mut buf = BytesMut::with_capacity(BATCH_HEADER_BYTES + payload.len());
        buf.put_i64(0);
        buf.put_i32(batch_length);
        buf.put_i32(-1);
        buf.put_i8(MAGIC_V2);
        buf.put_u32(0); // the CRC, below
        buf.put_i16(attributes);
        buf.put_i32(self.count - 1);
        buf.put_i64(self.base_timestamp_ms);
        buf.put_i64(self.max_timestamp_ms);
        buf.put_i64(stamp.producer_id);
        buf.put_i16(stamp.producer_epoch);
        buf.put_i32(stamp.base_sequence);
        buf.put_i32(self.count);
        debug_assert_eq!(buf.len(), BATCH_HEADER_BYTES);
        buf.put_slice(payload);
        let crc = crc32c::crc32c(&buf[ATTRIBUTES_OFFSET..]);
        buf[CRC_OFFSET..ATTRIBUTES_OFFSET].copy_from_slice(&crc.to_be_bytes());
        Ok(buf.freeze())
    }
}

/// Kafka's LZ4: the standard LZ4 frame, independent 64 KiB blocks, no
/// checksums beyond the header's (what the Java client writes).
fn lz4_compress(data: &[u8]) -> Result<Vec<u8>, RecordsError> {
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    let info = FrameInfo::new()
        .block_size(BlockSize::Max64KB)
        .block_mode(BlockMode::Independent);
    let mut encoder = FrameEncoder::with_frame_info(info, Vec::with_capacity(data.len() / 2));
    encoder
        .write_all(data)
        .map_err(|_| RecordsError::Decompress("lz4"))?;
    encoder
        .finish()
        .map_err(|_| RecordsError::Decompress("lz4"))
}

fn decompress(codec: i16, data: &[u8], max_bytes: usize) -> Result<Vec<u8>, RecordsError> {
    let (reader, name): (Box<dyn Read + '_>, &'static str) = match codec {
        3 => (Box::new(lz4_flex::frame::FrameDecoder::new(data)), "lz4"),
        4 => (
            Box::new(
                ruzstd::decoding::StreamingDecoder::new(data)
                    .map_err(|_| RecordsError::Decompress("zstd"))?,
            ),
            "zstd",
        ),
        codec => return Err(RecordsError::Unsupported { codec }),
    };
    // Read one byte past the limit to tell "exactly max" from "more".
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(max_bytes));
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| RecordsError::Decompress(name))?;
    if out.len() > max_bytes {
        return Err(RecordsError::TooLarge { max: max_bytes });
    }
    Ok(out)
}

/// Decodes the batches in `bytes` (a fetch answer's records). A partial
/// batch at the end, which a broker leaves when a fetch's byte limit cuts
/// it, is dropped; every whole batch must be valid. `max_record_bytes`
/// bounds what one batch may decompress to.
pub fn decode_batches(
    mut bytes: Bytes,
    max_record_bytes: usize,
) -> Result<Vec<Batch>, RecordsError> {
    let mut batches = Vec::new();
    while bytes.len() >= LOG_OVERHEAD_BYTES {
        let length = i32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let length =
            usize::try_from(length).map_err(|_| RecordsError::Malformed("batch length"))?;
        let total = LOG_OVERHEAD_BYTES + length;
        if bytes.len() < total {
            break;
        }
        let batch = bytes.split_to(total);
        batches.push(decode_batch(batch, max_record_bytes)?);
    }
    Ok(batches)
}

/// Decodes one whole batch.
pub fn decode_batch(batch: Bytes, max_record_bytes: usize) -> Result<Batch, RecordsError> {
    if batch.len() > MAGIC_OFFSET && batch[MAGIC_OFFSET] as i8 != MAGIC_V2 {
        return Err(RecordsError::Magic(batch[MAGIC_OFFSET] as i8));
    }
    if batch.len() < BATCH_HEADER_BYTES {
        return Err(RecordsError::Truncated);
    }
    let mut r = Reader::new(&batch, 0, BATCH_HEADER_BYTES);
    let base_offset = r.i64()?;
    let _length = r.i32()?;
    let partition_leader_epoch = r.i32()?;
    let _magic = r.i8()?;
    let stored = r.u32()?;
    let computed = crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]);
    if stored != computed {
        return Err(RecordsError::Crc { stored, computed });
    }
    let attributes = r.i16()?;
    let last_offset_delta = r.i32()?;
    // base_offset is outside the CRC, so any value can arrive; offsets
    // past i64 would overflow in next_offset and in each record's offset.
    if base_offset
        .checked_add(i64::from(last_offset_delta))
        .and_then(|last| last.checked_add(1))
        .is_none()
    {
        return Err(RecordsError::Malformed("offset beyond i64"));
    }
    let base_timestamp_ms = r.i64()?;
    let max_timestamp_ms = r.i64()?;
    let producer_id = r.i64()?;
    let producer_epoch = r.i16()?;
    let base_sequence = r.i32()?;
    let count = r.i32()?;
    let count = usize::try_from(count).map_err(|_| RecordsError::Malformed("record count"))?;
    let codec = attributes & ATTR_COMPRESSION_MASK;
    let log_append_time = attributes & ATTR_LOG_APPEND_TIME != 0;

    let body = batch.slice(BATCH_HEADER_BYTES..);
    let body = match codec {
        0 => body,
        codec => Bytes::from(decompress(codec, &body, max_record_bytes)?),
    };
    // A record takes at least 7 bytes: a count beyond that must not size
    // an allocation.
    if count > body.len() / 7 + 1 {
        return Err(RecordsError::Malformed("record count"));
    }
    let mut records = Vec::with_capacity(count);
    let mut r = Reader::new(&body, 0, body.len());
    for _ in 0..count {
        let mut record = decode_record(&mut r, base_offset, base_timestamp_ms)?;
        if log_append_time {
            record.timestamp_ms = max_timestamp_ms;
        }
        records.push(record);
    }
    if r.remaining() != 0 {
        return Err(RecordsError::Malformed("bytes after the last record"));
    }
    Ok(Batch {
        base_offset,
        last_offset_delta,
        partition_leader_epoch,
        producer_id,
        producer_epoch,
        base_sequence,
        transactional: attributes & ATTR_TRANSACTIONAL != 0,
        control: attributes & ATTR_CONTROL != 0,
        codec,
        base_timestamp_ms,
        max_timestamp_ms,
        records,
    })
}

/// The record at the reader's position; leaves the reader after it.
fn decode_record(
    outer: &mut Reader<'_>,
    base_offset: i64,
    base_timestamp_ms: i64,
) -> Result<Record, RecordsError> {
    let length = outer.varint()?;
    let length = usize::try_from(length).map_err(|_| RecordsError::Malformed("record length"))?;
    if outer.remaining() < length {
        return Err(RecordsError::Truncated);
    }
    let mut r = Reader::new(outer.buf, outer.pos, outer.pos + length);
    outer.pos += length;
    let _attributes = r.i8()?;
    let timestamp_delta = r.varlong()?;
    let offset_delta = r.varint()?;
    let key = r.nullable_bytes()?;
    let value = r.nullable_bytes()?;
    let header_count = r.varint()?;
    let header_count =
        usize::try_from(header_count).map_err(|_| RecordsError::Malformed("header count"))?;
    // A header takes at least 2 bytes.
    if header_count > r.remaining() / 2 {
        return Err(RecordsError::Malformed("header count"));
    }
    let mut headers = Vec::with_capacity(header_count);
    for _ in 0..header_count {
        let key = r
            .nullable_bytes()?
            .ok_or(RecordsError::Malformed("null header key"))?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| RecordsError::HeaderKey)?;
        let value = r.nullable_bytes()?;
        headers.push(Header { key, value });
    }
    if r.remaining() != 0 {
        return Err(RecordsError::Malformed("record length"));
    }
    let offset = base_offset
        .checked_add(i64::from(offset_delta))
        .ok_or(RecordsError::Malformed("offset beyond i64"))?;
    Ok(Record {
        offset,
        timestamp_ms: base_timestamp_ms.wrapping_add(timestamp_delta),
        key,
        value,
        headers,
    })
}

fn length_i32(len: usize) -> Result<i32, RecordsError> {
    i32::try_from(len).map_err(|_| RecordsError::Malformed("length beyond i32"))
}

fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) -> Result<(), RecordsError> {
    match bytes {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, length_i32(b.len())?);
            out.extend_from_slice(b);
        }
    }
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, v: i32) {
    put_uvarint(out, ((v << 1) ^ (v >> 31)) as u32 as u64);
}

fn put_varlong(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over `buf[pos..end]` with Kafka's big-endian and varint
/// reads; byte fields come out as slices of `buf`, without a copy.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes, pos: usize, end: usize) -> Self {
        debug_assert!(pos <= end && end <= buf.len());
        Self { buf, pos, end }
    }

    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordsError> {
        if self.remaining() < n {
            return Err(RecordsError::Truncated);
        }
        let bytes: &'a [u8] = self.buf;
        let head = &bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordsError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn i8(&mut self) -> Result<i8, RecordsError> {
        Ok(i8::from_be_bytes(self.array()?))
    }
    fn i16(&mut self) -> Result<i16, RecordsError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, RecordsError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, RecordsError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, RecordsError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn uvarint(&mut self, max_bytes: usize) -> Result<u64, RecordsError> {
        let mut v = 0u64;
        for i in 0..max_bytes {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(RecordsError::Malformed("varint"))
    }

    fn varint(&mut self) -> Result<i32, RecordsError> {
        let v = self.uvarint(5)?;
        let v = u32::try_from(v).map_err(|_| RecordsError::Malformed("varint"))?;
        Ok(((v >> 1) as i32) ^ -((v & 1) as i32))
    }

    fn varlong(&mut self) -> Result<i64, RecordsError> {
        let v = self.uvarint(10)?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// A varint length (-1: null) and that many bytes.
    fn nullable_bytes(&mut self) -> Result<Option<Bytes>, RecordsError> {
        let len = self.varint()?;
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        if self.remaining() < len {
            return Err(RecordsError::Truncated);
        }
        let slice = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(Some(slice))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::{
        Compression as CrateCompression, Record as CrateRecord, RecordBatchDecoder,
        RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    const MAX: usize = 1 << 20;

    fn sample_builder() -> BatchBuilder {
        let mut b = BatchBuilder::new();
        let headers = [
            HeaderRef {
                key: "skiff.topic",
                value: Some(b"sensors.temp"),
            },
            HeaderRef {
                key: "dup",
                value: Some(b"1"),
            },
            HeaderRef {
                key: "dup",
                value: None,
            },
        ];
        b.push(&RecordRef {
            key: Some(b"dev-17"),
            value: Some(b"{\"c\": 21.5}"),
            timestamp_ms: 1_700_000_000_500,
            headers: &headers,
        })
        .unwrap();
        // Earlier than the first: a negative delta, as Kafka allows.
        b.push(&RecordRef {
            key: None,
            value: None,
            timestamp_ms: 1_700_000_000_000,
            headers: &[],
        })
        .unwrap();
        let big = vec![b'x'; 200_000];
        b.push(&RecordRef {
            key: Some(b""),
            value: Some(&big),
            timestamp_ms: 1_700_000_001_000,
            headers: &[],
        })
        .unwrap();
        b
    }

    const STAMP: ProducerStamp = ProducerStamp {
        producer_id: 4242,
        producer_epoch: 3,
        base_sequence: 17,
        transactional: true,
    };

    fn crate_decompress(buf: &mut Bytes, c: CrateCompression) -> anyhow::Result<Bytes> {
        let codec = match c {
            CrateCompression::None => return Ok(buf.clone()),
            CrateCompression::Lz4 => 3,
            CrateCompression::Zstd => 4,
            other => anyhow::bail!("{other:?}"),
        };
        Ok(Bytes::from(decompress(codec, buf, MAX)?))
    }

    /// Our batches, read by the kafka-protocol crate's decoder (its own
    /// header parsing and CRC check).
    #[test]
    fn the_crate_decodes_our_batches_in_every_codec() {
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let bytes = sample_builder().finish(compression, STAMP).unwrap();
            let mut buf = bytes.clone();
            let set = RecordBatchDecoder::decode_with_custom_compression(
                &mut buf,
                Some(crate_decompress),
            )
            .unwrap_or_else(|e| panic!("{compression:?}: {e}"));
            assert_eq!(set.records.len(), 3);
            let r = &set.records[0];
            assert_eq!(r.producer_id, 4242);
            assert_eq!(r.producer_epoch, 3);
            assert_eq!(r.sequence, 17);
            assert!(r.transactional && !r.control);
            assert_eq!(r.key.as_deref(), Some(&b"dev-17"[..]));
            assert_eq!(r.value.as_deref(), Some(&b"{\"c\": 21.5}"[..]));
            assert_eq!(r.timestamp, 1_700_000_000_500);
            let topic = r.headers.iter().find(|(k, _)| k.as_str() == "skiff.topic");
            assert_eq!(
                topic.and_then(|(_, v)| v.as_deref()),
                Some(&b"sensors.temp"[..])
            );
            let r = &set.records[1];
            assert_eq!((r.key.clone(), r.value.clone()), (None, None));
            assert_eq!(r.timestamp, 1_700_000_000_000);
            assert_eq!(r.offset, 1);
            assert_eq!(r.sequence, 18);
            assert_eq!(set.records[2].value.as_ref().map(Bytes::len), Some(200_000));
            if compression != Compression::None {
                assert!(
                    bytes.len() < 100_000,
                    "{compression:?} did not compress: {}",
                    bytes.len()
                );
            }
        }
    }

    /// The crate's batches, read by ours.
    #[test]
    fn we_decode_the_crates_batches() {
        let mut headers = indexmap::IndexMap::new();
        headers.insert(
            kafka_protocol::protocol::StrBytes::from_static_str("h"),
            Some(Bytes::from_static(b"v")),
        );
        let records: Vec<CrateRecord> = (0..3)
            .map(|i| CrateRecord {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id: 9,
                producer_epoch: 1,
                timestamp_type: TimestampType::Creation,
                offset: 100 + i,
                sequence: 5 + i as i32,
                timestamp: 1_000 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(format!("v{i}"))),
                headers: headers.clone(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: CrateCompression::None,
            },
        )
        .unwrap();
        let batches = decode_batches(buf.freeze(), MAX).unwrap();
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!((b.base_offset, b.next_offset()), (100, 103));
        assert_eq!(
            (b.producer_id, b.producer_epoch, b.base_sequence),
            (9, 1, 5)
        );
        assert!(!b.transactional && !b.control);
        for (i, r) in b.records.iter().enumerate() {
            assert_eq!(r.offset, 100 + i as i64);
            assert_eq!(r.timestamp_ms, 1_000 + i as i64);
            assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
            assert_eq!(r.value.as_deref(), Some(format!("v{i}").as_bytes()));
            assert_eq!(
                r.headers,
                vec![Header {
                    key: "h".into(),
                    value: Some(Bytes::from_static(b"v"))
                }]
            );
        }
    }

    #[test]
    fn our_batches_round_trip_with_duplicate_headers_and_nulls() {
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let bytes = sample_builder().finish(compression, STAMP).unwrap();
            let b = decode_batch(bytes, MAX).unwrap();
            assert_eq!(b.records.len(), 3);
            assert_eq!(b.base_timestamp_ms, 1_700_000_000_500);
            assert_eq!(b.max_timestamp_ms, 1_700_000_001_000);
            assert_eq!(b.last_offset_delta, 2);
            assert_eq!(b.records[0].headers.len(), 3);
            assert_eq!(
                b.records[0].headers[2],
                Header {
                    key: "dup".into(),
                    value: None
                }
            );
            assert_eq!(b.records[1].timestamp_ms, 1_700_000_000_000);
            assert_eq!(b.records[2].key.as_deref(), Some(&b""[..]));
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_crc() {
        let bytes = sample_builder().finish(Compression::None, STAMP).unwrap();
        for at in [ATTRIBUTES_OFFSET, 50, bytes.len() - 1] {
            let mut bad = bytes.to_vec();
            bad[at] ^= 0x10;
            assert!(
                matches!(
                    decode_batch(Bytes::from(bad), MAX),
                    Err(RecordsError::Crc { .. })
                ),
                "flip at {at}"
            );
        }
    }

    /// Found by the kafka_records fuzz target: the base offset is not
    /// covered by the CRC, so a fetch answer can carry any value there.
    #[test]
    fn offsets_past_i64_are_refused_not_overflowed() {
        let bytes = sample_builder()
            .finish(Compression::None, ProducerStamp::NONE)
            .unwrap();
        for base in [i64::MAX, i64::MAX - 1, i64::MAX - 2] {
            let mut bad = bytes.to_vec();
            bad[..8].copy_from_slice(&base.to_be_bytes());
            assert_eq!(
                decode_batch(Bytes::from(bad), MAX),
                Err(RecordsError::Malformed("offset beyond i64")),
                "base {base}"
            );
        }
        // The last offset that fits still decodes.
        let mut edge = bytes.to_vec();
        edge[..8].copy_from_slice(&(i64::MAX - 3).to_be_bytes());
        let b = decode_batch(Bytes::from(edge), MAX).unwrap();
        assert_eq!(b.next_offset(), i64::MAX);
        assert_eq!(b.records[2].offset, i64::MAX - 1);
    }

    #[test]
    fn a_partial_batch_at_the_end_of_a_fetch_is_dropped() {
        let one = sample_builder()
            .finish(Compression::None, ProducerStamp::NONE)
            .unwrap();
        let mut two = one.to_vec();
        two.extend_from_slice(&one[..one.len() / 2]);
        let batches = decode_batches(Bytes::from(two), MAX).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(decode_batches(one.slice(..5), MAX).unwrap(), vec![]);
    }

    #[test]
    fn old_magic_and_lying_counts_are_refused() {
        let bytes = sample_builder()
            .finish(Compression::None, ProducerStamp::NONE)
            .unwrap();
        let mut v1 = bytes.to_vec();
        v1[MAGIC_OFFSET] = 1;
        assert_eq!(
            decode_batch(Bytes::from(v1), MAX),
            Err(RecordsError::Magic(1))
        );

        let mut lie = bytes.to_vec();
        lie[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let crc = crc32c::crc32c(&lie[ATTRIBUTES_OFFSET..]);
        lie[CRC_OFFSET..ATTRIBUTES_OFFSET].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode_batch(Bytes::from(lie), MAX),
            Err(RecordsError::Malformed("record count"))
        );
    }

    #[test]
    fn decompression_is_bounded() {
        let bytes = sample_builder().finish(Compression::Zstd, STAMP).unwrap();
        assert_eq!(
            decode_batch(bytes.clone(), 100_000),
            Err(RecordsError::TooLarge { max: 100_000 })
        );
        let lz4 = sample_builder().finish(Compression::Lz4, STAMP).unwrap();
        assert_eq!(
            decode_batch(lz4, 1000),
            Err(RecordsError::TooLarge { max: 1000 })
        );
    }

    #[test]
    fn gzip_and_snappy_are_reported_not_misread() {
        let bytes = sample_builder().finish(Compression::None, STAMP).unwrap();
        let mut gzip = bytes.to_vec();
        gzip[ATTRIBUTES_OFFSET + 1] |= 1;
        let crc = crc32c::crc32c(&gzip[ATTRIBUTES_OFFSET..]);
        gzip[CRC_OFFSET..ATTRIBUTES_OFFSET].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode_batch(Bytes::from(gzip), MAX),
            Err(RecordsError::Unsupported { codec: 1 })
        );
    }

    #[test]
    fn varints_round_trip_at_their_edges() {
        for v in [0, 1, -1, 63, -64, 64, i32::MAX, i32::MIN] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let bytes = Bytes::from(out);
            let mut r = Reader::new(&bytes, 0, bytes.len());
            assert_eq!(r.varint().unwrap(), v);
            assert_eq!(r.remaining(), 0);
        }
        for v in [0i64, -1, i64::MAX, i64::MIN, 1 << 40] {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            let bytes = Bytes::from(out);
            let mut r = Reader::new(&bytes, 0, bytes.len());
            assert_eq!(r.varlong().unwrap(), v);
        }
        let overlong = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        let mut r = Reader::new(&overlong, 0, overlong.len());
        assert_eq!(r.varint(), Err(RecordsError::Malformed("varint")));
    }

    #[test]
    fn control_markers_are_recognised() {
        let mut b = BatchBuilder::new();
        b.push(&RecordRef {
            key: Some(&[0, 0, 0, 1]),
            value: Some(&[0, 0, 0, 0, 0, 0]),
            timestamp_ms: 0,
            headers: &[],
        })
        .unwrap();
        let mut bytes = b.finish(Compression::None, STAMP).unwrap().to_vec();
        bytes[ATTRIBUTES_OFFSET + 1] |= ATTR_CONTROL as u8;
        let crc = crc32c::crc32c(&bytes[ATTRIBUTES_OFFSET..]);
        bytes[CRC_OFFSET..ATTRIBUTES_OFFSET].copy_from_slice(&crc.to_be_bytes());
        let batch = decode_batch(Bytes::from(bytes), MAX).unwrap();
        assert_eq!(batch.control_kind(), Some(ControlKind::Commit));
    }
}
