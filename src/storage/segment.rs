//! The segment header: the first block of every segment file.
//!
//! # Layout (little-endian; the rest of the 4 KiB block is zero)
//!
//! | offset | size | field         | notes                                      |
//! |-------:|-----:|---------------|--------------------------------------------|
//! |      0 |    4 | magic         | `b"SKSG"`                                  |
//! |      4 |    2 | version       | [`SEGMENT_VERSION`]                        |
//! |      6 |    2 | reserved      | zero                                       |
//! |      8 |    8 | epoch         | ring sequence: +1 each time a segment of   |
//! |        |      |               | the partition is (re)started; 0 = unused   |
//! |     16 |    8 | base_offset   | offset of the first batch in the segment   |
//! |     24 |    8 | created_ms    | wall clock when the segment was started    |
//! |     32 |    4 | slot          | position of this file in the ring          |
//! |     36 |    4 | reserved      | zero                                       |
//! |     40 |    8 | segment_bytes | file size, header included                 |
//! |     48 |    4 | crc32c        | over bytes 0..48                           |
//!
//! Batches follow from byte [`BLOCK_BYTES`], back to back, each in the
//! format of `crate::batch`. A segment's data ends at the first position
//! that does not hold a valid batch at or above the next expected offset
//! (there may be a gap before it): zeros, a torn write, or stale bytes from
//! an earlier trip round the ring (those carry lower offsets, so they can
//! never be mistaken for new data). See docs/format.md, "Where a
//! segment's data ends".

use super::io::BLOCK_BYTES;
use crate::batch::CRC32C;

pub const SEGMENT_MAGIC: [u8; 4] = *b"SKSG";
/// 2: batches of version 2 (offsets may have gaps). A segment of another
/// version is refused at start-up, naming it
/// ([`StorageError::UnsupportedVersion`](super::StorageError::UnsupportedVersion)).
pub const SEGMENT_VERSION: u16 = 2;

pub const SEG_OFFSET_MAGIC: usize = 0;
pub const SEG_OFFSET_VERSION: usize = SEG_OFFSET_MAGIC + 4;
pub const SEG_OFFSET_RESERVED_1: usize = SEG_OFFSET_VERSION + 2;
pub const SEG_OFFSET_EPOCH: usize = SEG_OFFSET_RESERVED_1 + 2;
pub const SEG_OFFSET_BASE_OFFSET: usize = SEG_OFFSET_EPOCH + 8;
pub const SEG_OFFSET_CREATED_MS: usize = SEG_OFFSET_BASE_OFFSET + 8;
pub const SEG_OFFSET_SLOT: usize = SEG_OFFSET_CREATED_MS + 8;
pub const SEG_OFFSET_RESERVED_2: usize = SEG_OFFSET_SLOT + 4;
pub const SEG_OFFSET_SEGMENT_BYTES: usize = SEG_OFFSET_RESERVED_2 + 4;
pub const SEG_OFFSET_CRC: usize = SEG_OFFSET_SEGMENT_BYTES + 8;
pub const SEG_HEADER_USED_BYTES: usize = SEG_OFFSET_CRC + 4;
/// The header takes a whole block so data writes stay block-aligned.
pub const SEG_HEADER_BYTES: usize = BLOCK_BYTES;

const _: () = assert!(SEG_HEADER_USED_BYTES == 52);
const _: () = assert!(SEG_HEADER_USED_BYTES <= SEG_HEADER_BYTES);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub epoch: u64,
    pub base_offset: u64,
    pub created_ms: i64,
    pub slot: u32,
    pub segment_bytes: u64,
}

/// Why the first block of a segment file is not a usable header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// All zeros: the slot was never started (or its header write was lost).
    Unused,
    BadMagic,
    /// An intact header (its CRC holds) of another format version.
    UnsupportedVersion(u16),
    CrcMismatch,
    /// Valid CRC but fields that contradict the partition's config.
    Mismatch(&'static str),
}

impl SegmentHeader {
    pub fn encode(&self, block: &mut [u8]) {
        assert!(block.len() >= SEG_HEADER_BYTES);
        block[..SEG_HEADER_BYTES].fill(0);
        block[SEG_OFFSET_MAGIC..SEG_OFFSET_MAGIC + 4].copy_from_slice(&SEGMENT_MAGIC);
        block[SEG_OFFSET_VERSION..SEG_OFFSET_VERSION + 2]
            .copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        block[SEG_OFFSET_EPOCH..SEG_OFFSET_EPOCH + 8].copy_from_slice(&self.epoch.to_le_bytes());
        block[SEG_OFFSET_BASE_OFFSET..SEG_OFFSET_BASE_OFFSET + 8]
            .copy_from_slice(&self.base_offset.to_le_bytes());
        block[SEG_OFFSET_CREATED_MS..SEG_OFFSET_CREATED_MS + 8]
            .copy_from_slice(&self.created_ms.to_le_bytes());
        block[SEG_OFFSET_SLOT..SEG_OFFSET_SLOT + 4].copy_from_slice(&self.slot.to_le_bytes());
        block[SEG_OFFSET_SEGMENT_BYTES..SEG_OFFSET_SEGMENT_BYTES + 8]
            .copy_from_slice(&self.segment_bytes.to_le_bytes());
        let crc = CRC32C.checksum(&block[..SEG_OFFSET_CRC]);
        block[SEG_OFFSET_CRC..SEG_OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// The segment size an intact header (magic, CRC, this version)
    /// records, whatever the config says: for a partition whose
    /// `partition.meta` is lost.
    pub fn peek_segment_bytes(block: &[u8]) -> Option<u64> {
        let h = block.get(..SEG_HEADER_USED_BYTES)?;
        let crc = u32::from_le_bytes(h[SEG_OFFSET_CRC..].try_into().ok()?);
        let intact = h[..4] == SEGMENT_MAGIC
            && h[4..6] == SEGMENT_VERSION.to_le_bytes()
            && CRC32C.checksum(&h[..SEG_OFFSET_CRC]) == crc;
        let at = SEG_OFFSET_SEGMENT_BYTES;
        intact.then(|| u64::from_le_bytes(h[at..at + 8].try_into().expect("8")))
    }

    /// Decodes and checks a header block against the slot it was read from
    /// and the partition's segment size.
    pub fn decode(block: &[u8], slot: u32, segment_bytes: u64) -> Result<Self, HeaderError> {
        if block.len() < SEG_HEADER_USED_BYTES {
            return Err(HeaderError::Unused);
        }
        let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8"));
        let u32_at = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().expect("4"));
        if block[..SEG_HEADER_USED_BYTES].iter().all(|&b| b == 0) {
            return Err(HeaderError::Unused);
        }
        if block[..4] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        // The CRC before the version: only an intact header may say it is
        // of another version (which refuses the whole partition), a
        // flipped bit only that it is corrupt.
        if CRC32C.checksum(&block[..SEG_OFFSET_CRC]) != u32_at(SEG_OFFSET_CRC) {
            return Err(HeaderError::CrcMismatch);
        }
        let version = u16::from_le_bytes([block[4], block[5]]);
        if version != SEGMENT_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let h = SegmentHeader {
            epoch: u64_at(SEG_OFFSET_EPOCH),
            base_offset: u64_at(SEG_OFFSET_BASE_OFFSET),
            created_ms: u64_at(SEG_OFFSET_CREATED_MS) as i64,
            slot: u32_at(SEG_OFFSET_SLOT),
            segment_bytes: u64_at(SEG_OFFSET_SEGMENT_BYTES),
        };
        if h.epoch == 0 {
            return Err(HeaderError::Mismatch(
                "epoch 0 is reserved for unused slots",
            ));
        }
        if h.slot != slot {
            return Err(HeaderError::Mismatch("slot differs from the file's place"));
        }
        if h.segment_bytes != segment_bytes {
            return Err(HeaderError::Mismatch("segment size differs from config"));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_flips() {
        let h = SegmentHeader {
            epoch: 9,
            base_offset: 1234,
            created_ms: 1_700_000_000_000,
            slot: 2,
            segment_bytes: 1 << 20,
        };
        let mut block = vec![0u8; SEG_HEADER_BYTES];
        h.encode(&mut block);
        assert_eq!(SegmentHeader::decode(&block, 2, 1 << 20), Ok(h));
        assert!(SegmentHeader::decode(&block, 3, 1 << 20).is_err());
        for i in 0..SEG_HEADER_USED_BYTES {
            let mut b = block.clone();
            b[i] ^= 1;
            assert!(SegmentHeader::decode(&b, 2, 1 << 20).is_err(), "byte {i}");
        }
        assert_eq!(
            SegmentHeader::decode(&[0u8; SEG_HEADER_BYTES], 0, 1 << 20),
            Err(HeaderError::Unused)
        );
    }

    /// A header of another version, intact, says so; the same bytes with
    /// a bit flipped say only that they are corrupt.
    #[test]
    fn another_version_is_told_apart_from_corruption() {
        let h = SegmentHeader {
            epoch: 3,
            base_offset: 0,
            created_ms: 1,
            slot: 0,
            segment_bytes: 1 << 20,
        };
        let mut block = vec![0u8; SEG_HEADER_BYTES];
        h.encode(&mut block);
        block[SEG_OFFSET_VERSION..SEG_OFFSET_VERSION + 2].copy_from_slice(&1u16.to_le_bytes());
        let crc = CRC32C.checksum(&block[..SEG_OFFSET_CRC]);
        block[SEG_OFFSET_CRC..SEG_OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&block, 0, 1 << 20),
            Err(HeaderError::UnsupportedVersion(1))
        );
        block[SEG_OFFSET_EPOCH] ^= 1;
        assert_eq!(
            SegmentHeader::decode(&block, 0, 1 << 20),
            Err(HeaderError::CrcMismatch)
        );
    }
}
