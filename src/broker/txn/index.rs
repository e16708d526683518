//! Per partition, in memory: the open transactions (their first offsets
//! hold the last stable offset back) and the aborted ranges a
//! read_committed fetch leaves out. The transaction coordinator keeps it
//! in step with its log and rebuilds it from that log at start-up; the
//! fetch path only reads it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::batch::parse_header;

/// The batches of `producer_id` in `first..marker` belong to an aborted
/// transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted {
    pub producer_id: u64,
    pub first: u64,
    pub marker: u64,
}

/// Whether the batch belongs to one of the aborted transactions.
pub fn in_aborted_range(aborted: &[Aborted], h: &crate::batch::BatchHeader) -> bool {
    h.is_idempotent()
        && aborted
            .iter()
            .any(|a| a.producer_id == h.producer_id && (a.first..a.marker).contains(&h.base_offset))
}

#[derive(Debug, Default)]
struct Partition {
    /// Producer id → the first offset its open transaction may hold.
    open: BTreeMap<u64, u64>,
    /// In marker order.
    aborted: Vec<Aborted>,
}

/// What a read_committed fetch keeps of the batches it read.
pub struct Filtered {
    pub records: bytes::Bytes,
    /// Where the consumer continues: past every batch looked at, kept or
    /// left out.
    pub next_offset: Option<u64>,
}

/// Topic → partition → its state. Keyed by topic first so that a lookup
/// (each read_committed fetch makes one) borrows the name, not copies it.
type Parts = HashMap<String, HashMap<u32, Partition>>;

fn part<'a>(parts: &'a Parts, topic: &str, partition: u32) -> Option<&'a Partition> {
    parts.get(topic)?.get(&partition)
}

fn part_mut<'a>(parts: &'a mut Parts, topic: &str, partition: u32) -> Option<&'a mut Partition> {
    parts.get_mut(topic)?.get_mut(&partition)
}

fn part_entry<'a>(parts: &'a mut Parts, topic: &str, partition: u32) -> &'a mut Partition {
    if !parts.contains_key(topic) {
        parts.insert(topic.to_owned(), HashMap::new());
    }
    parts
        .get_mut(topic)
        .expect("inserted above")
        .entry(partition)
        .or_default()
}

/// Every partition's state, with its topic and number.
fn all(parts: &Parts) -> impl Iterator<Item = (&String, u32, &Partition)> {
    parts
        .iter()
        .flat_map(|(t, ps)| ps.iter().map(move |(p, part)| (t, *p, part)))
}

#[derive(Debug, Default)]
pub struct Index {
    parts: Mutex<Parts>,
    /// Aborted ranges over all partitions; changed under `parts`' lock.
    aborted_total: AtomicUsize,
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Parts> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `producer_id`'s transaction open on the partition from
    /// `first` (kept if already open: the first add's offset is lowest).
    pub fn open(&self, topic: &str, partition: u32, producer_id: u64, first: u64) {
        part_entry(&mut self.lock(), topic, partition)
            .open
            .entry(producer_id)
            .or_insert(first);
    }

    /// As [`Index::open`], unless the aborted ranges and the partitions of
    /// open transactions (each may become a range) already reach `max`:
    /// then false, and nothing changes. A partition already open takes no
    /// more room.
    pub fn open_within(
        &self,
        topic: &str,
        partition: u32,
        producer_id: u64,
        first: u64,
        max: usize,
    ) -> bool {
        let mut parts = self.lock();
        let known =
            part(&parts, topic, partition).is_some_and(|p| p.open.contains_key(&producer_id));
        if !known && self.ranges_locked(&parts) >= max {
            return false;
        }
        part_entry(&mut parts, topic, partition)
            .open
            .entry(producer_id)
            .or_insert(first);
        true
    }

    fn ranges_locked(&self, parts: &Parts) -> usize {
        let open: usize = all(parts).map(|(_, _, p)| p.open.len()).sum();
        self.aborted_total.load(Ordering::Relaxed) + open
    }

    /// The partitions where `producer_id`'s transaction is open, with its
    /// first offset on each.
    pub fn open_partitions(&self, producer_id: u64) -> Vec<(String, u32, u64)> {
        all(&self.lock())
            .filter_map(|(t, p, part)| part.open.get(&producer_id).map(|f| (t.clone(), p, *f)))
            .collect()
    }

    /// The aborted ranges kept, plus one for each partition of an open
    /// transaction: the most ranges there are once those end.
    pub fn ranges_taken(&self) -> usize {
        self.ranges_locked(&self.lock())
    }

    /// The aborted ranges kept over all partitions.
    pub fn aborted_count(&self) -> usize {
        self.aborted_total.load(Ordering::Relaxed)
    }

    /// The transaction ended on the partition: the stable offset moves on.
    pub fn close(&self, topic: &str, partition: u32, producer_id: u64) {
        if let Some(p) = part_mut(&mut self.lock(), topic, partition) {
            p.open.remove(&producer_id);
        }
    }

    pub fn add_aborted(&self, topic: &str, partition: u32, a: Aborted) {
        let mut parts = self.lock();
        let p = part_entry(&mut parts, topic, partition);
        if !p.aborted.contains(&a) {
            // Grown exactly, as the memory budget counts it; aborts are
            // rare and the lists short (ABORTED_RANGES_MAX in all).
            p.aborted.reserve_exact(1);
            p.aborted.push(a);
            p.aborted.sort_by_key(|a| a.marker);
            self.aborted_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The partition's aborted ranges, in marker order.
    pub fn aborted(&self, topic: &str, partition: u32) -> Vec<Aborted> {
        part(&self.lock(), topic, partition)
            .map(|p| p.aborted.clone())
            .unwrap_or_default()
    }

    /// The partition's aborted ranges that hold an offset of `from..=to`,
    /// in marker order: those a batch based there may fall in. Most fetches
    /// touch none, and then nothing is allocated.
    pub fn aborted_within(&self, topic: &str, partition: u32, from: u64, to: u64) -> Vec<Aborted> {
        let parts = self.lock();
        let Some(p) = part(&parts, topic, partition) else {
            return Vec::new();
        };
        // In marker order: those ending at or before `from` are skipped
        // without a look.
        let after = p.aborted.partition_point(|a| a.marker <= from);
        p.aborted[after..]
            .iter()
            .filter(|a| a.first <= to)
            .copied()
            .collect()
    }

    /// Forgets the aborted ranges whose marker left the ring.
    pub fn forget_below(&self, topic: &str, partition: u32, earliest: u64) {
        if let Some(p) = part_mut(&mut self.lock(), topic, partition) {
            let before = p.aborted.len();
            p.aborted.retain(|a| a.marker >= earliest);
            if p.aborted.len() < before {
                // What is counted is what is held.
                p.aborted.shrink_to_fit();
                self.aborted_total
                    .fetch_sub(before - p.aborted.len(), Ordering::Relaxed);
            }
        }
    }

    /// Every aborted range still indexed, for the log's rewrite.
    pub fn all_aborted(&self) -> Vec<(String, u32, Aborted)> {
        let parts = self.lock();
        let mut out = Vec::new();
        for (t, p, part) in all(&parts) {
            out.extend(part.aborted.iter().map(|a| (t.clone(), p, *a)));
        }
        out
    }

    /// The partitions with aborted ranges indexed, once each: the pruning
    /// pass reads each one's earliest offset, not each range's.
    pub fn aborted_partitions(&self) -> Vec<(String, u32)> {
        all(&self.lock())
            .filter(|(_, _, part)| !part.aborted.is_empty())
            .map(|(t, p, _)| (t.clone(), p))
            .collect()
    }

    /// Forgets a deleted topic's partitions.
    pub fn forget_topic(&self, topic: &str) {
        if let Some(ps) = self.lock().remove(topic) {
            let aborted: usize = ps.values().map(|p| p.aborted.len()).sum();
            self.aborted_total.fetch_sub(aborted, Ordering::Relaxed);
        }
    }

    /// The partition's last stable offset: the lowest first offset of an
    /// open transaction, or `high_watermark` when none is open.
    pub fn last_stable_offset(&self, topic: &str, partition: u32, high_watermark: u64) -> u64 {
        part(&self.lock(), topic, partition)
            .and_then(|p| p.open.values().min().copied())
            .map_or(high_watermark, |first| first.min(high_watermark))
    }

    /// Open transactions, counted once per partition they touch.
    pub fn open_count(&self) -> usize {
        all(&self.lock()).map(|(_, _, p)| p.open.len()).sum()
    }

    /// Partitions with an open transaction and its first offset (lowest).
    pub fn held_back(&self) -> Vec<(String, u32, u64)> {
        all(&self.lock())
            .filter_map(|(t, p, part)| part.open.values().min().map(|f| (t.clone(), p, *f)))
            .collect()
    }

    /// Keeps the whole batches of `records` below `lso` that are neither
    /// control batches nor in an aborted range. The bytes kept are the
    /// stored ones: nothing is re-encoded.
    pub fn filter(&self, topic: &str, partition: u32, records: bytes::Bytes, lso: u64) -> Filtered {
        // The offsets the batches looked at start from: only the aborted
        // ranges holding one of them are taken.
        let mut bases = None;
        let mut end = 0;
        while let Ok(h) = parse_header(&records[end..]) {
            let len = h.total_len as usize;
            if end + len > records.len() || h.base_offset >= lso {
                break;
            }
            bases = Some((
                bases.map_or(h.base_offset, |(first, _)| first),
                h.base_offset,
            ));
            end += len;
        }
        let aborted = bases.map_or_else(Vec::new, |(first, last)| {
            self.aborted_within(topic, partition, first, last)
        });
        let mut keep: Vec<(usize, usize)> = Vec::new();
        let mut next_offset = None;
        let mut at = 0;
        let mut dropped = false;
        while let Ok(h) = parse_header(&records[at..]) {
            let len = h.total_len as usize;
            if at + len > records.len() || h.base_offset >= lso {
                break;
            }
            if h.is_control() || in_aborted_range(&aborted, &h) {
                dropped = true;
            } else {
                // A run of kept batches is one range: a list per run between
                // drops, not per batch.
                match keep.last_mut() {
                    Some((_, end)) if *end == at => *end = at + len,
                    _ => keep.push((at, at + len)),
                }
            }
            next_offset = Some(h.next_offset());
            at += len;
        }
        let records = if !dropped {
            records.slice(..at)
        } else {
            let mut out = Vec::with_capacity(keep.iter().map(|(a, b)| b - a).sum());
            for (a, b) in keep {
                out.extend_from_slice(&records[a..b]);
            }
            out.into()
        };
        Filtered {
            records,
            next_offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, ProducerStamp};

    fn batch(base: u64, producer_id: u64, control: bool) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        b.push(0, None, b"v", &[]);
        let mut out = if control {
            b.finish_control()
        } else {
            b.finish(ProducerStamp {
                producer_id,
                producer_epoch: 0,
                base_sequence: 0,
            })
        };
        out[16..24].copy_from_slice(&base.to_le_bytes());
        let crc = crate::batch::compute_crc(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn read_committed_keeps_committed_and_stops_at_the_stable_offset() {
        let ix = Index::default();
        // 0: pid 7 (aborted), 1: its abort marker, 2: pid 8, 3: pid 9 open.
        let mut log = batch(0, 7, false);
        log.extend(batch(1, NO, true));
        log.extend(batch(2, 8, false));
        log.extend(batch(3, 9, false));
        ix.add_aborted(
            "t",
            0,
            Aborted {
                producer_id: 7,
                first: 0,
                marker: 1,
            },
        );
        ix.open("t", 0, 9, 3);
        let lso = ix.last_stable_offset("t", 0, 4);
        assert_eq!(lso, 3);
        let f = ix.filter("t", 0, log.clone().into(), lso);
        assert_eq!(f.next_offset, Some(3));
        assert_eq!(f.records, batch(2, 8, false));
        ix.close("t", 0, 9);
        assert_eq!(ix.last_stable_offset("t", 0, 4), 4);
        let f = ix.filter("t", 0, log.into(), 4);
        assert_eq!(f.next_offset, Some(4));
        assert_eq!(crate::batch::count_records(&f.records), 2);
    }

    #[test]
    fn runs_of_kept_batches_around_a_dropped_one_are_kept_whole_and_in_order() {
        let ix = Index::default();
        // 0, 1: pid 8; 2: pid 7 (aborted); 3: its marker; 4, 5: pid 8.
        let kept = [0, 1, 4, 5].map(|base| batch(base, 8, false));
        let mut log = Vec::new();
        log.extend(&kept[0]);
        log.extend(&kept[1]);
        log.extend(batch(2, 7, false));
        log.extend(batch(3, NO, true));
        log.extend(&kept[2]);
        log.extend(&kept[3]);
        ix.add_aborted(
            "t",
            0,
            Aborted {
                producer_id: 7,
                first: 2,
                marker: 3,
            },
        );
        let f = ix.filter("t", 0, log.into(), 6);
        assert_eq!(f.next_offset, Some(6));
        assert_eq!(f.records, kept.concat());
    }

    #[test]
    fn each_partition_with_aborted_ranges_is_listed_once() {
        let ix = Index::default();
        for (p, marker) in [(0, 1), (0, 3), (0, 5), (1, 2)] {
            ix.add_aborted(
                "t",
                p,
                Aborted {
                    producer_id: 7,
                    first: 0,
                    marker,
                },
            );
        }
        ix.open("t", 2, 9, 0);
        let mut parts = ix.aborted_partitions();
        parts.sort();
        assert_eq!(parts, [("t".to_owned(), 0), ("t".to_owned(), 1)]);
        ix.forget_below("t", 1, 3);
        assert_eq!(ix.aborted_partitions(), [("t".to_owned(), 0)]);
    }

    #[test]
    fn a_fetch_takes_only_the_aborted_ranges_its_offsets_fall_in() {
        let ix = Index::default();
        let range = |producer_id, first, marker| Aborted {
            producer_id,
            first,
            marker,
        };
        // In marker order; the last starts before the others.
        let (a, b, c) = (range(7, 10, 15), range(8, 20, 30), range(9, 0, 40));
        for r in [a, b, c] {
            ix.add_aborted("t", 0, r);
        }
        let within = |from, to| ix.aborted_within("t", 0, from, to);
        assert_eq!(within(41, 50), [], "after all");
        assert_eq!(within(40, 40), [], "a marker is not in its range");
        assert_eq!(within(0, 9), [c], "before a and b");
        assert_eq!(within(0, 10), [a, c], "up to a's first");
        assert_eq!(within(11, 12), [a, c], "inside a");
        assert_eq!(within(15, 19), [c], "between a and b");
        assert_eq!(within(14, 20), [a, b, c], "spanning from a into b");
        assert_eq!(within(5, 45), [a, b, c], "spanning all");
        assert_eq!(within(30, 39), [c], "past b, inside c");
        assert_eq!(ix.aborted_within("t", 1, 0, 50), [], "another partition");
        assert_eq!(ix.aborted_within("u", 0, 0, 50), [], "another topic");
        // A batch based anywhere is judged as against every range.
        let all = ix.aborted("t", 0);
        for base in 0..50 {
            for pid in [7, 8, 9] {
                let h = crate::batch::parse_header(&batch(base, pid, false)).expect("header");
                assert_eq!(
                    in_aborted_range(&within(base, base), &h),
                    in_aborted_range(&all, &h),
                    "pid {pid} at {base}"
                );
            }
        }
    }

    const NO: u64 = crate::batch::NO_PRODUCER_ID;
}
