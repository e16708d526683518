//! Which partition a record goes to.
//!
//! Keys hash with murmur2 exactly as Kafka's Java client does
//! (`Utils.murmur2`, `toPositive(hash) % partitions`), so a key lands in the
//! same partition number here and in the upstream Kafka topic it is mirrored
//! to (for equal partition counts). `docs/protocol.md` gives the reasons and
//! test vectors.

/// Kafka's murmur2 seed.
const MURMUR2_SEED: u32 = 0x9747_b28c;
const MURMUR2_M: u32 = 0x5bd1_e995;
const MURMUR2_R: u32 = 24;

/// 32-bit MurmurHash2 as in Kafka's `Utils.murmur2` (little-endian blocks,
/// seed `0x9747b28c`). Kafka prints the result as a signed `int`; cast with
/// `as i32` to compare.
pub fn murmur2(data: &[u8]) -> u32 {
    // Java's `seed ^ length` on ints: the length wraps like Java's int.
    let mut h = MURMUR2_SEED ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(MURMUR2_M);
        k ^= k >> MURMUR2_R;
        k = k.wrapping_mul(MURMUR2_M);
        h = h.wrapping_mul(MURMUR2_M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(MURMUR2_M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(MURMUR2_M);
    h ^= h >> 15;
    h
}

/// The partition for a key: `(murmur2(key) & 0x7fffffff) % partitions`.
///
/// # Panics
/// When `partitions` is 0; a topic has at least one.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// How a producer picks partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partitioner {
    /// Keyed records by [`partition_for_key`]; unkeyed ones stick to one
    /// partition until its batch is sent, then move to the next
    /// (round-robin), so batches fill up.
    #[default]
    Default,
    /// Every record to the next partition in turn, keys ignored.
    RoundRobin,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own results, as printed by its Java client (signed ints).
    const KAFKA_VECTORS: [(&str, i32); 5] = [
        ("1", -1993445489),
        ("12", 126087238),
        ("123", -267702483),
        ("1234", -1614185708),
        ("12345", -1188365604),
    ];

    #[test]
    fn murmur2_matches_kafka() {
        for (key, want) in KAFKA_VECTORS {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "key {key:?}");
        }
    }

    #[test]
    fn partitions_match_the_documented_table() {
        let table = [("1", 3), ("12", 2), ("123", 1), ("1234", 0), ("12345", 0)];
        for (key, want) in table {
            assert_eq!(partition_for_key(key.as_bytes(), 4), want, "key {key:?}");
        }
    }

    #[test]
    fn every_key_lands_in_range_and_spreads() {
        let mut seen = [0u32; 8];
        for i in 0..8000u32 {
            let p = partition_for_key(format!("dev-{i}").as_bytes(), 8);
            seen[p as usize] += 1;
        }
        // 1000 expected per partition; a broken hash piles them up.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        assert_eq!(partition_for_key(b"", 1), 0);
    }
}
