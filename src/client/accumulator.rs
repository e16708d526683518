//! The producer's batching, as plain data: which records form which batch,
//! when a batch is ready (full, lingered long enough, or flushed), how many
//! batches per partition are in flight, and where a retried batch goes.
//! No I/O and no clock of its own: every call takes `now`, so the tests
//! drive time by hand.
//!
//! Ordering: batches of a partition leave in the order they were closed,
//! and a retried batch goes back in front of every later batch of its
//! partition, which waits behind it. An idempotent producer stamps each
//! batch with its producer id, epoch and the partition's next sequence when
//! the batch closes; a retry resends the same bytes, so the broker writes it
//! once and keeps the batches in sequence order (a later batch that reaches
//! it first is refused with `out_of_order_sequence` and retried). Without
//! idempotence, more than one batch in flight lets a retry reorder against
//! a later batch that was already written; `max_in_flight = 1` avoids it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::ClientError;
use super::outcome::{Delivery, Outcome, Settler};
use super::partitioner::{partition_for_key, Partitioner};
use crate::batch::{BatchBuilder, FinishedBatch, ProducerStamp, HEADER_BYTES};
use crate::bufpool::BatchPool;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct AccumulatorConfig {
    /// A batch is closed once it reaches this size.
    pub batch_bytes_target: usize,
    /// No batch may exceed this (the server's `max_batch_bytes`).
    pub batch_bytes_max: usize,
    /// How long an open batch waits for more records.
    pub linger: Duration,
    /// Batches of one partition sent and not yet answered.
    pub max_in_flight: usize,
    /// Records sent and not yet answered, over all partitions; a batch
    /// closes at this many records.
    pub max_in_flight_records: usize,
    /// Bytes of records appended and not yet answered, over all partitions.
    pub buffer_bytes_max: usize,
    /// Producer id and epoch for idempotent batches; `None` sends plain
    /// batches.
    pub producer: Option<(u64, u16)>,
}

/// An upper bound on the encoded size of one record in a batch body:
/// CBOR heads are at most 9 bytes, each integer at most 9.
pub(crate) fn record_bytes_max(
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[(&str, &[u8])],
) -> usize {
    const HEAD: usize = 9;
    let fixed = 1 + HEAD + HEAD; // array head, offset delta, timestamp delta
    let key = HEAD + key.map_or(0, <[u8]>::len);
    let value = HEAD + value.len();
    let headers = HEAD
        + headers
            .iter()
            .map(|(n, v)| 1 + HEAD + n.len() + HEAD + v.len())
            .sum::<usize>();
    fixed + key + value + headers
}

/// A refused record: why, and the outcome it brought, to settle.
pub(crate) type AppendError = (ClientError, Option<Arc<Outcome>>);

/// The size of an empty batch around its records: the fixed header and the
/// body's array head.
const BATCH_OVERHEAD_BYTES: usize = HEADER_BYTES + 9;

struct OpenBatch {
    builder: BatchBuilder,
    /// Settles every record's delivery when the batch is answered.
    settler: Settler,
    created: Instant,
    /// The sum of the records' `record_bytes_max`, counted in the buffer.
    reserved: usize,
    /// It closes at this many records: where the records waiting to be
    /// sent make up a whole `max_in_flight_records`, so that they go out
    /// together once the records in flight are answered (batches closed
    /// by size alone left a remainder that waited for the next answer:
    /// 1,250 requests per million 1 KiB records instead of 1,000).
    records_max: usize,
}

/// A closed batch on its way to the server.
#[derive(Debug)]
pub(crate) struct ReadyBatch {
    pub tp: TopicPartition,
    /// Closing order within the partition; retries keep their place.
    pub seq: u64,
    pub bytes: FinishedBatch,
    pub records: u32,
    /// Settles every record's delivery; dropping it unsettled fails them
    /// with `Closed`.
    pub settler: Settler,
    /// When its first record was appended: the delivery timeout runs from
    /// here.
    pub created: Instant,
    pub attempts: u32,
    pub retry_at: Option<Instant>,
    pub reserved: usize,
    /// Set when it was last sent while a batch of the same partition closed
    /// before it was still unanswered: it may reach the broker first, so an
    /// `out_of_order_sequence` answer is worth a retry.
    pub sent_behind: bool,
    /// The retriable failure it waits to be sent again after: what its
    /// records fail with when their delivery timeout runs out first.
    pub last_error: Option<ClientError>,
}

#[derive(Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    /// The last closed batch's builder, emptied: the next batch reuses its
    /// buffer instead of growing a new one from nothing (reallocations were
    /// most of a producer's memory copying).
    spare: Option<BatchBuilder>,
    /// Sorted by `seq`.
    ready: VecDeque<ReadyBatch>,
    /// The `seq`s of the batches sent and not yet answered.
    in_flight: Vec<u64>,
}

struct Sticky {
    /// The partition unkeyed records go to until its batch closes.
    current: Option<u32>,
    /// The next partition in round-robin order (taken modulo the count).
    next: u32,
}

impl Sticky {
    /// Starts at a random partition, as Kafka's sticky partitioner does:
    /// a fresh producer per command (`skiff produce` in a loop) would
    /// otherwise always begin, and with little data end, on partition 0.
    fn new() -> Sticky {
        Sticky {
            current: None,
            next: fastrand::u32(..),
        }
    }
}

pub(crate) struct Accumulator {
    config: AccumulatorConfig,
    queues: BTreeMap<TopicPartition, PartitionQueue>,
    sticky: HashMap<Arc<str>, Sticky>,
    buffered_bytes: usize,
    /// Records in the batches sent and not yet answered.
    in_flight_records: usize,
    /// Records in closed batches waiting to be sent (retries included).
    ready_records: usize,
    next_seq: u64,
    /// The next producer sequence per partition (idempotent producers).
    /// Kept when a partition's queue empties.
    sequences: HashMap<TopicPartition, i32>,
    /// Buffers of answered batches, to build the next ones in: a batch's
    /// size is where the allocator gives memory back to the kernel and
    /// faults it in again (glibc's heap trim; see crate::bufpool).
    bodies: BatchPool,
    /// Batches never sent stay unsent: the producer renews its id or
    /// epoch first (see [`Accumulator::renew`]).
    hold_fresh: bool,
    /// Topics that take smaller batches than `batch_bytes_max` (small
    /// segments), and their limit.
    topic_max: HashMap<Arc<str>, usize>,
}

impl Accumulator {
    pub fn new(config: AccumulatorConfig) -> Self {
        let bodies = BatchPool::new(
            crate::bufpool::BUFFERS_DEFAULT,
            2 * config.batch_bytes_max + BATCH_OVERHEAD_BYTES,
        );
        Self {
            config,
            queues: BTreeMap::new(),
            sticky: HashMap::new(),
            buffered_bytes: 0,
            in_flight_records: 0,
            ready_records: 0,
            next_seq: 0,
            sequences: HashMap::new(),
            bodies,
            hold_fresh: false,
            topic_max: HashMap::new(),
        }
    }

    /// Batches of `topic` are kept to `max` bytes from now on (what its
    /// segments hold), when that is below `batch_bytes_max`.
    pub fn limit_topic(&mut self, topic: &Arc<str>, max: usize) {
        if max < self.config.batch_bytes_max {
            self.topic_max.insert(topic.clone(), max);
        } else {
            self.topic_max.remove(topic);
        }
    }

    /// The largest batch `topic` takes.
    fn batch_max(&self, topic: &str) -> usize {
        // One test on the hot path while no topic has a limit of its own.
        if self.topic_max.is_empty() {
            return self.config.batch_bytes_max;
        }
        self.topic_max
            .get(topic)
            .copied()
            .unwrap_or(self.config.batch_bytes_max)
    }

    /// The largest batch the server takes.
    pub fn batch_bytes_max(&self) -> usize {
        self.config.batch_bytes_max
    }

    /// The producer id and epoch batches are stamped with.
    pub fn producer(&self) -> Option<(u64, u16)> {
        self.config.producer
    }

    /// From now on only batches sent before go out (their retries), until
    /// [`renew`](Self::renew).
    pub fn hold_fresh(&mut self) {
        self.hold_fresh = true;
    }

    /// Nothing is in flight and no batch sent before waits for a retry:
    /// every batch stamped so far has settled, but the ones never sent.
    pub fn sent_all_settled(&self) -> bool {
        self.in_flight_records == 0
            && self
                .queues
                .values()
                .all(|q| q.ready.iter().all(|b| b.attempts == 0))
    }

    /// Stamps with `producer` from now on, every partition's sequence
    /// starting again at 0, and restamps the batches closed but never sent
    /// so (call once [`sent_all_settled`](Self::sent_all_settled)); lifts
    /// [`hold_fresh`](Self::hold_fresh).
    pub fn renew(&mut self, producer: (u64, u16)) {
        debug_assert!(self.sent_all_settled());
        self.config.producer = Some(producer);
        self.sequences.clear();
        for (tp, q) in &mut self.queues {
            for b in &mut q.ready {
                let next = self.sequences.entry(tp.clone()).or_insert(0);
                b.bytes.restamp(ProducerStamp {
                    producer_id: producer.0,
                    producer_epoch: producer.1,
                    base_sequence: *next,
                });
                *next = next_sequence(*next, b.records);
            }
        }
        self.hold_fresh = false;
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// The partitions whose open batch `due` picks (collected first: the
    /// caller closes them after, which needs the map mutably).
    fn open_where(&self, due: impl Fn(&PartitionQueue, &OpenBatch) -> bool) -> Vec<TopicPartition> {
        self.queues
            .iter()
            .filter(|(_, q)| q.open.as_ref().is_some_and(|o| due(q, o)))
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// Records not yet sent: in an open batch or a ready one.
    pub fn holds_unsent(&self) -> bool {
        self.ready_records > 0 || self.queues.values().any(|q| q.open.is_some())
    }

    /// Nothing open, queued or in flight.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.buffered_bytes == 0
            && self
                .queues
                .values()
                .all(|q| q.open.is_none() && q.ready.is_empty() && q.in_flight.is_empty())
    }

    /// Closes every open batch and returns a mark: every record appended
    /// so far is in a batch below it, every later one in a batch at or
    /// above it (see [`Accumulator::unsettled_below`]).
    pub fn close_all(&mut self) -> u64 {
        for tp in &self.open_where(|_, _| true) {
            self.close_open(tp);
        }
        self.next_seq
    }

    /// Whether a batch below `mark` is still queued or in flight.
    pub fn unsettled_below(&self, mark: u64) -> bool {
        self.queues
            .values()
            .any(|q| q.ready.iter().any(|b| b.seq < mark) || q.in_flight.iter().any(|&s| s < mark))
    }

    /// Picks the partition for a record of `topic` with `partitions`
    /// partitions.
    pub fn choose_partition(
        &mut self,
        topic: &Arc<str>,
        key: Option<&[u8]>,
        partitions: u32,
        partitioner: Partitioner,
    ) -> u32 {
        assert!(partitions > 0, "a topic has at least one partition");
        if partitions == 1 {
            return 0;
        }
        let sticky = self.sticky.entry(topic.clone()).or_insert_with(Sticky::new);
        let mut next = || {
            let p = sticky.next % partitions;
            sticky.next = (p + 1) % partitions;
            p
        };
        match (partitioner, key) {
            (Partitioner::Default, Some(k)) => partition_for_key(k, partitions),
            (Partitioner::RoundRobin, _) => next(),
            (Partitioner::Default, None) => match sticky.current {
                Some(p) if p < partitions => p,
                _ => {
                    let p = next();
                    sticky.current = Some(p);
                    p
                }
            },
        }
    }

    /// Whether a record of this size may be appended now to a batch of at
    /// most `batch_max` bytes, else the error.
    pub fn check_room(&self, record_bytes: usize, batch_max: usize) -> Result<(), ClientError> {
        if BATCH_OVERHEAD_BYTES + record_bytes > batch_max {
            return Err(ClientError::RecordTooLarge {
                len: record_bytes,
                max: batch_max,
            });
        }
        // An empty buffer takes any record that fits a batch, so a record
        // larger than the buffer still goes out, alone.
        if self.buffered_bytes > 0
            && self.buffered_bytes + record_bytes > self.config.buffer_bytes_max
        {
            return Err(ClientError::BufferFull {
                buffered_bytes: self.buffered_bytes,
                max: self.config.buffer_bytes_max,
            });
        }
        Ok(())
    }

    /// Appends one record to its partition's open batch, closing the batch
    /// first when the record would push it past the target size, and after
    /// when it reached it. Returns the record's delivery (or, for a record
    /// that brings its own `linked` outcome, a delivery on the batch that
    /// the caller drops) and whether the sender needs a look: a batch was
    /// closed (ready to go) or opened (a linger timer to arm). On error
    /// `linked` is handed back.
    #[allow(
        clippy::too_many_arguments,
        reason = "one record's parts, passed through"
    )]
    pub fn append(
        &mut self,
        tp: TopicPartition,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        // None: a tombstone.
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        linked: Option<Arc<Outcome>>,
        // Read only when a batch opens: a clock read per record was a tenth
        // of a producer's CPU.
        now: impl FnOnce() -> Instant,
    ) -> Result<(Delivery, bool), AppendError> {
        let size = record_bytes_max(key, value.unwrap_or_default(), headers);
        let max = self.batch_max(&tp.topic);
        if let Err(e) = self.check_room(size, max) {
            return Err((e, linked));
        }
        let target = self.config.batch_bytes_target.min(max);
        let fits = |q: &PartitionQueue| {
            q.open.as_ref().is_none_or(|o| {
                let after = o.builder.estimated_bytes() + size;
                after <= target && after <= max
            })
        };
        // One map lookup on the common path (the batch is open and has
        // room); closing a batch and a new partition take the slow one.
        let mut full_before = false;
        let q = match self.queues.get_mut(&tp) {
            Some(q) if fits(q) => q,
            found => {
                if found.is_some() {
                    full_before = true;
                    self.close_open(&tp);
                }
                self.queues.entry(tp.clone()).or_default()
            }
        };
        let opened = q.open.is_none();
        let cap = self.config.max_in_flight_records;
        let ready_records = self.ready_records;
        let open = q.open.get_or_insert_with(|| OpenBatch {
            builder: q.spare.take().unwrap_or_default(),
            settler: Settler::new(),
            created: now(),
            reserved: 0,
            records_max: cap - ready_records % cap,
        });
        let index = open.builder.len();
        open.builder.push_record(timestamp_ms, key, value, headers);
        let delivery = open.settler.delivery(index);
        if let Some(o) = linked {
            open.settler.link(index, o);
        }
        open.reserved += size;
        self.buffered_bytes += size;
        let full = open.builder.estimated_bytes() >= target
            || open.builder.len() as usize >= open.records_max;
        if full {
            self.close_open(&tp);
        }
        Ok((delivery, full_before || opened || full))
    }

    fn close_open(&mut self, tp: &TopicPartition) {
        let Some(q) = self.queues.get_mut(tp) else {
            return;
        };
        let Some(mut open) = q.open.take() else {
            return;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let records = open.builder.len();
        let stamp = match self.config.producer {
            None => ProducerStamp::NONE,
            Some((producer_id, producer_epoch)) => {
                let next = self.sequences.entry(tp.clone()).or_insert(0);
                let base_sequence = *next;
                *next = next_sequence(base_sequence, records);
                ProducerStamp {
                    producer_id,
                    producer_epoch,
                    base_sequence,
                }
            }
        };
        self.ready_records += records as usize;
        q.ready.push_back(ReadyBatch {
            tp: tp.clone(),
            seq,
            records,
            bytes: {
                // The next batch in this partition will be about this size.
                let size = open.builder.estimated_bytes();
                let next = self.bodies.take(size + size / 16);
                open.builder.finish_in_place(stamp, next)
            },
            settler: open.settler,
            created: open.created,
            attempts: 0,
            retry_at: None,
            reserved: open.reserved,
            sent_behind: false,
            last_error: None,
        });
        q.spare = Some(open.builder);
        if let Some(s) = self.sticky.get_mut(&tp.topic) {
            if s.current == Some(tp.partition) {
                s.current = None;
            }
        }
    }

    /// Takes the batches that may be sent now: in order per partition, up
    /// to `max_in_flight`, stopping at one waiting out its retry backoff.
    /// An open batch that lingered long enough closes here only if it could
    /// go now; until then it keeps taking records. (Closing it anyway left a
    /// producer whose pipeline was full with a queue of tiny batches, each
    /// then costing a request: at 10,000 records/s and linger 0, two records
    /// a request and tens of milliseconds of queueing.)
    pub fn drain(&mut self, now: Instant) -> Vec<ReadyBatch> {
        let mut out = Vec::new();
        self.take_ready(now, &mut out);
        let linger = self.config.linger;
        let due = self.open_where(|q, o| {
            now.saturating_duration_since(o.created) >= linger && self.could_send(q, o)
        });
        if !due.is_empty() {
            for tp in &due {
                self.close_open(tp);
            }
            self.take_ready(now, &mut out);
        }
        out
    }

    /// Whether `open`, closed now, would be sent at once: nothing of its
    /// partition waits before it, and it has room in flight.
    fn could_send(&self, q: &PartitionQueue, open: &OpenBatch) -> bool {
        !self.hold_fresh
            && q.ready.is_empty()
            && q.in_flight.len() < self.config.max_in_flight
            && (self.in_flight_records == 0
                || self.in_flight_records + open.builder.len() as usize
                    <= self.config.max_in_flight_records)
    }

    fn take_ready(&mut self, now: Instant, out: &mut Vec<ReadyBatch>) {
        let records_max = self.config.max_in_flight_records;
        for q in self.queues.values_mut() {
            while q.in_flight.len() < self.config.max_in_flight {
                match q.ready.front() {
                    Some(b)
                        if b.retry_at.is_none_or(|t| t <= now)
                            && !(self.hold_fresh && b.attempts == 0)
                            && (self.in_flight_records == 0
                                || self.in_flight_records + b.records as usize <= records_max) =>
                    {
                        let mut b = q.ready.pop_front().expect("front exists");
                        b.sent_behind = q.in_flight.iter().any(|&s| s < b.seq);
                        q.in_flight.push(b.seq);
                        self.in_flight_records += b.records as usize;
                        self.ready_records -= b.records as usize;
                        out.push(b);
                    }
                    _ => break,
                }
            }
        }
    }

    /// The next instant something becomes due: a linger ends for a batch
    /// that could then be sent, or a retry backoff ends for a partition
    /// with room in flight. A batch held back by a full pipeline has no
    /// instant: the answer that makes room drains again.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.queues
            .values()
            .flat_map(|q| {
                let linger = q
                    .open
                    .as_ref()
                    .filter(|o| self.could_send(q, o))
                    .map(|o| o.created + self.config.linger);
                let retry = (q.in_flight.len() < self.config.max_in_flight)
                    .then(|| q.ready.front().and_then(|b| b.retry_at))
                    .flatten();
                linger.into_iter().chain(retry)
            })
            .min()
    }

    /// A sent batch is answered for good (written or failed): frees its
    /// in-flight slot and its buffer bytes.
    pub fn complete(&mut self, batch: &ReadyBatch) {
        self.buffered_bytes -= batch.reserved;
        self.in_flight_records -= batch.records as usize;
        if let Some(q) = self.queues.get_mut(&batch.tp) {
            q.in_flight.retain(|&s| s != batch.seq);
            if q.open.is_none() && q.ready.is_empty() && q.in_flight.is_empty() {
                self.queues.remove(&batch.tp);
            }
        }
    }

    /// Keeps an answered batch's buffer for a batch still to be built.
    pub fn recycle(&mut self, batch: &mut ReadyBatch) {
        self.bodies.give(batch.bytes.take_buffer());
    }

    /// Whether a batch of the same partition closed before this one is
    /// still unanswered (queued for a retry or in flight): then an
    /// `out_of_order_sequence` for this one only means it overtook it.
    pub fn has_earlier(&self, batch: &ReadyBatch) -> bool {
        self.queues.get(&batch.tp).is_some_and(|q| {
            q.in_flight.iter().any(|&s| s < batch.seq)
                || q.ready.front().is_some_and(|b| b.seq < batch.seq)
        })
    }

    /// A sent batch failed with a retriable error: it goes back in front of
    /// the later batches of its partition and waits until `retry_at`.
    pub fn retry(&mut self, mut batch: ReadyBatch, retry_at: Instant) {
        batch.attempts += 1;
        batch.retry_at = Some(retry_at);
        self.in_flight_records -= batch.records as usize;
        self.ready_records += batch.records as usize;
        let q = self.queues.entry(batch.tp.clone()).or_default();
        q.in_flight.retain(|&s| s != batch.seq);
        let at = q.ready.partition_point(|b| b.seq < batch.seq);
        q.ready.insert(at, batch);
    }

    /// Takes every batch not in flight whose delivery timeout ran out,
    /// open ones included; the caller fails their records. Their buffer
    /// bytes are freed.
    pub fn expire(&mut self, now: Instant, delivery_timeout: Duration) -> Vec<ReadyBatch> {
        let late = |created: Instant| now.saturating_duration_since(created) >= delivery_timeout;
        let stale: Vec<TopicPartition> = self
            .queues
            .iter()
            .filter(|(_, q)| q.open.as_ref().is_some_and(|o| late(o.created)))
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in &stale {
            self.close_open(tp);
        }
        let mut out = Vec::new();
        for q in self.queues.values_mut() {
            let (gone, kept): (Vec<_>, Vec<_>) = q.ready.drain(..).partition(|b| late(b.created));
            q.ready = kept.into();
            out.extend(gone);
        }
        for b in &out {
            self.buffered_bytes -= b.reserved;
            self.ready_records -= b.records as usize;
        }
        self.queues
            .retain(|_, q| q.open.is_some() || !q.ready.is_empty() || !q.in_flight.is_empty());
        out
    }
}

/// The sequence after a batch of `records` at `base`: wraps to 0 after
/// i32::MAX, as the broker expects.
fn next_sequence(base: i32, records: u32) -> i32 {
    ((i64::from(base) + i64::from(records)) % (i64::from(i32::MAX) + 1)) as i32
}

/// The backoff before retry number `attempts` (1-based): doubling from
/// `base`, capped at `max`.
pub(crate) fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(max)
}

/// [`backoff`] times a random factor in [0.5, 1): clients that failed
/// together (a broker's restart) do not all come back together.
pub(crate) fn backoff_jittered(attempts: u32, base: Duration, max: Duration) -> Duration {
    backoff(attempts, base, max).mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchView;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> AccumulatorConfig {
        AccumulatorConfig {
            batch_bytes_target: 1024,
            batch_bytes_max: 4096,
            linger: 5 * MS,
            max_in_flight: 2,
            max_in_flight_records: usize::MAX,
            buffer_bytes_max: 64 * 1024,
            producer: None,
        }
    }

    fn tp(p: u32) -> TopicPartition {
        TopicPartition {
            topic: "t".into(),
            partition: p,
        }
    }

    fn push(acc: &mut Accumulator, p: u32, value: &[u8], now: Instant) {
        acc.append(tp(p), 1, None, Some(value), &[], None, || now)
            .map_err(|(e, _)| e)
            .unwrap();
    }

    fn records_in(b: &ReadyBatch) -> usize {
        BatchView::new(&b.bytes).unwrap().records().unwrap().len()
    }

    #[test]
    fn an_answered_batchs_buffer_builds_a_later_batch() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(AccumulatorConfig {
            // Large enough for the pool (crate::bufpool::BUFFER_BYTES_MIN).
            batch_bytes_target: 64 * 1024,
            batch_bytes_max: 128 * 1024,
            max_in_flight: 5,
            buffer_bytes_max: 1 << 20,
            ..config()
        });
        let fill = |acc: &mut Accumulator| {
            for _ in 0..64 {
                push(acc, 0, &[7; 1000], t0);
            }
        };
        fill(&mut acc);
        let mut first = acc.drain(t0 + 5 * MS).pop().unwrap();
        let first_at = first.bytes.as_ptr();
        acc.complete(&first);
        acc.recycle(&mut first);
        assert!(first.bytes.is_empty(), "its buffer went back");
        // The second batch was built in a fresh buffer (taken when the
        // first closed); the third in the first's.
        fill(&mut acc);
        fill(&mut acc);
        let later = acc.drain(t0 + 5 * MS);
        assert_eq!(later.len(), 2);
        assert_ne!(later[0].bytes.as_ptr(), first_at);
        assert_eq!(later[1].bytes.as_ptr(), first_at);
        assert_eq!(records_in(&later[1]), 64);
    }

    #[test]
    fn a_batch_waits_for_linger_then_leaves() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(config());
        push(&mut acc, 0, b"a", t0);
        push(&mut acc, 0, b"b", t0 + MS);
        assert!(acc.drain(t0 + 4 * MS).is_empty(), "still lingering");
        assert_eq!(
            acc.next_wakeup(),
            Some(t0 + 5 * MS),
            "linger runs from the first record"
        );
        let out = acc.drain(t0 + 5 * MS);
        assert_eq!(out.len(), 1);
        assert_eq!(records_in(&out[0]), 2);
        assert_eq!(out[0].records, 2);
    }

    #[test]
    fn a_full_batch_leaves_without_waiting() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(config());
        // Three 400-byte records: the third would pass the 1024 target, so
        // the first two close and the third opens a new batch.
        for _ in 0..3 {
            push(&mut acc, 0, &[7; 400], t0);
        }
        let out = acc.drain(t0);
        assert_eq!(out.len(), 1, "only the full batch, at once");
        assert_eq!(records_in(&out[0]), 2);
        assert!(out[0].bytes.len() <= 1024);
        let rest = acc.drain(t0 + 5 * MS);
        assert_eq!(records_in(&rest[0]), 1);
    }

    #[test]
    fn append_says_when_the_sender_must_look() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(config());
        let mut add = |v: &[u8]| {
            acc.append(tp(0), 1, None, Some(v), &[], None, || t0)
                .map_err(|(e, _)| e)
                .unwrap()
                .1
        };
        assert!(add(b"a"), "a new batch: arm its linger");
        assert!(!add(b"b"), "joined the open batch");
        assert!(add(&[0; 2000]), "closed the open batch");
    }

    #[test]
    fn a_flush_mark_covers_what_came_before_and_nothing_after() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(config());
        push(&mut acc, 0, b"a", t0);
        push(&mut acc, 1, b"b", t0);
        let mark = acc.close_all();
        // Records after the mark: a batch of their own, not waited for.
        push(&mut acc, 0, b"c", t0);
        let sent = acc.drain(t0);
        assert_eq!(sent.len(), 2, "the closed batches go without lingering");
        assert!(acc.unsettled_below(mark));
        for b in &sent {
            acc.complete(b);
        }
        assert!(
            !acc.unsettled_below(mark),
            "the later open batch is above it"
        );
        assert!(acc.buffered_bytes() > 0, "and still buffered");
    }

    #[test]
    fn in_flight_is_capped_per_partition_and_order_kept() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(config());
        for _ in 0..4 {
            push(&mut acc, 0, &[1; 600], t0); // each closes the one before
        }
        push(&mut acc, 1, b"x", t0);
        let out = acc.drain(t0 + 5 * MS);
        let p0: Vec<u64> = out
            .iter()
            .filter(|b| b.tp.partition == 0)
            .map(|b| b.seq)
            .collect();
        assert_eq!(p0.len(), 2, "max_in_flight = 2");
        assert!(p0[0] < p0[1]);
        assert_eq!(out.iter().filter(|b| b.tp.partition == 1).count(), 1);
        // Nothing more for partition 0 until one completes.
        assert!(acc.drain(t0 + 6 * MS).is_empty());
        let first = out.into_iter().find(|b| b.tp.partition == 0).unwrap();
        acc.complete(&first);
        let next = acc.drain(t0 + 6 * MS);
        assert_eq!(next.len(), 1);
        assert!(next[0].seq > p0[1]);
    }

    /// (partition, records) of each batch.
    fn counts(batches: &[ReadyBatch]) -> Vec<(u32, u32)> {
        batches
            .iter()
            .map(|b| (b.tp.partition, b.records))
            .collect()
    }

    /// Up to 5 batches per partition, `records` records in flight.
    fn capped(records: usize) -> AccumulatorConfig {
        AccumulatorConfig {
            max_in_flight: 5,
            max_in_flight_records: records,
            ..config()
        }
    }

    #[test]
    fn records_in_flight_are_capped_over_all_partitions() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(capped(3));
        for i in 0..4 {
            push(&mut acc, 0, &[i], t0);
        }
        push(&mut acc, 1, b"x", t0);
        push(&mut acc, 1, b"y", t0);
        let out = acc.drain(t0 + 5 * MS);
        assert_eq!(
            counts(&out),
            vec![(0, 3)],
            "a batch closes at the cap; nothing more fits beside it"
        );
        assert!(acc.drain(t0 + 6 * MS).is_empty(), "3 records in flight");
        acc.complete(&out[0]);
        let next = acc.drain(t0 + 6 * MS);
        assert_eq!(counts(&next), vec![(0, 1), (1, 2)], "room for 3 again");
        // A retry gives its room back until it is sent again.
        let mut next = next.into_iter();
        let (a, b) = (next.next().unwrap(), next.next().unwrap());
        acc.retry(b, t0 + 10 * MS);
        push(&mut acc, 0, b"z", t0 + 6 * MS);
        acc.close_all();
        let out = acc.drain(t0 + 10 * MS);
        assert_eq!(
            counts(&out),
            vec![(0, 1)],
            "1 + 1 in flight; the retry's 2 would pass 3"
        );
        acc.complete(&a);
        let out2 = acc.drain(t0 + 10 * MS);
        assert_eq!(out2.len(), 1, "the retried batch, now it fits");
        assert_eq!(out2[0].tp.partition, 1);
    }

    #[test]
    fn batches_close_where_the_waiting_records_fill_the_cap() {
        let t0 = Instant::now();
        // About 4 records of 200 B per batch by size; a cap of 10.
        let mut acc = Accumulator::new(AccumulatorConfig {
            batch_bytes_target: 1000,
            ..capped(10)
        });
        // Two windows' worth before the sender looks, as a producer that
        // builds the next window while one is in flight.
        for _ in 0..20 {
            push(&mut acc, 0, &[7; 200], t0);
        }
        let records = |bs: &[ReadyBatch]| bs.iter().map(|b| b.records).sum::<u32>();
        let first = acc.drain(t0 + 5 * MS);
        assert_eq!(
            records(&first),
            10,
            "a whole window, not what whole batches of 4 make"
        );
        assert!(acc.drain(t0 + 6 * MS).is_empty());
        for b in &first {
            acc.complete(b);
        }
        assert_eq!(records(&acc.drain(t0 + 6 * MS)), 10, "and the next");
    }

    #[test]
    fn a_renewal_holds_batches_never_sent_and_restamps_them_from_sequence_0() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(AccumulatorConfig {
            linger: Duration::ZERO,
            max_in_flight: 1,
            producer: Some((7, 0)),
            ..config()
        });
        let stamp = |b: &ReadyBatch| {
            let h = crate::batch::verify(&b.bytes).unwrap();
            (h.producer_id, h.producer_epoch, h.base_sequence)
        };
        push(&mut acc, 0, b"a", t0);
        let a = acc.drain(t0);
        assert_eq!(stamp(&a[0]), (7, 0, 0));
        // "b" waits behind "a", stamped at sequence 1.
        push(&mut acc, 0, b"b", t0);
        acc.close_all();
        assert!(acc.drain(t0).is_empty());
        // "a" fails for good (never written, say): hold.
        let mut a = a.into_iter().next().unwrap();
        acc.hold_fresh();
        acc.retry(a, t0);
        assert!(!acc.sent_all_settled(), "a sent batch still to settle");
        // Its retry may go; "b" may not.
        a = acc.drain(t0).into_iter().next().expect("the retry");
        assert!(acc.drain(t0).is_empty());
        acc.complete(&a);
        push(&mut acc, 1, b"c", t0);
        assert!(acc.drain(t0).is_empty(), "nor a new batch");
        assert!(acc.sent_all_settled());
        acc.renew((7, 1));
        assert_eq!(acc.producer(), Some((7, 1)));
        let out = acc.drain(t0);
        let stamps: Vec<_> = out.iter().map(|b| (b.tp.partition, stamp(b))).collect();
        assert_eq!(stamps, [(0, (7, 1, 0)), (1, (7, 1, 0))]);
    }

    #[test]
    fn a_batch_held_back_by_a_full_pipeline_keeps_growing() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(AccumulatorConfig {
            linger: Duration::ZERO,
            max_in_flight: 1,
            ..config()
        });
        push(&mut acc, 0, b"a", t0);
        let first = acc.drain(t0);
        assert_eq!(counts(&first), vec![(0, 1)]);
        for (i, v) in [b"b", b"c", b"d"].iter().enumerate() {
            push(&mut acc, 0, *v, t0 + (i as u32 + 1) * MS);
            assert!(acc.drain(t0 + 5 * MS).is_empty(), "the pipeline is full");
        }
        assert_eq!(
            acc.next_wakeup(),
            None,
            "the answer drains again, no timer (which would spin)"
        );
        acc.complete(&first[0]);
        assert_eq!(
            counts(&acc.drain(t0 + 5 * MS)),
            vec![(0, 3)],
            "one batch, not a request per record"
        );
    }

    #[test]
    fn an_empty_pipeline_takes_any_batch() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(capped(1));
        push(&mut acc, 0, b"a", t0);
        assert_eq!(acc.drain(t0).len(), 1, "closed at one record, sent at once");
        push(&mut acc, 0, b"b", t0);
        assert!(acc.drain(t0).is_empty());
    }

    #[test]
    fn a_retried_batch_goes_first_after_its_backoff() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(AccumulatorConfig {
            max_in_flight: 1,
            ..config()
        });
        push(&mut acc, 0, &[1; 600], t0);
        push(&mut acc, 0, &[2; 600], t0); // closes the first
        let first = acc.drain(t0).pop().unwrap();
        let first_seq = first.seq;
        acc.drain(t0 + 5 * MS); // the second stays open: no room in flight
        acc.retry(first, t0 + 100 * MS);
        assert!(
            acc.drain(t0 + 50 * MS).is_empty(),
            "the later batch waits behind"
        );
        assert_eq!(acc.next_wakeup(), Some(t0 + 100 * MS));
        let again = acc.drain(t0 + 100 * MS);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].seq, first_seq);
        assert_eq!(again[0].attempts, 1);
    }

    #[test]
    fn buffer_and_batch_limits_are_enforced() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(AccumulatorConfig {
            buffer_bytes_max: 1000,
            ..config()
        });
        let big = vec![0; 4096];
        let err = acc
            .append(tp(0), 1, None, Some(&big), &[], None, || t0)
            .unwrap_err()
            .0;
        assert!(matches!(err, ClientError::RecordTooLarge { .. }), "{err:?}");
        push(&mut acc, 0, &[0; 600], t0);
        let err = acc
            .append(tp(1), 1, None, Some(&[0; 600]), &[], None, || t0)
            .unwrap_err()
            .0;
        assert!(matches!(err, ClientError::BufferFull { .. }), "{err:?}");
        acc.close_all();
        let b = acc.drain(t0).pop().unwrap();
        acc.complete(&b);
        assert_eq!(acc.buffered_bytes(), 0);
        assert!(acc.is_idle());
        push(&mut acc, 1, &[0; 600], t0);
    }

    #[test]
    fn record_size_bound_holds() {
        let mut b = BatchBuilder::new();
        let headers: [(&str, &[u8]); 2] = [("a", b"xyz"), ("long-header", &[9; 300])];
        let before = b.estimated_bytes();
        b.push(i64::MAX, Some(&[1; 70000]), &[2; 30], &headers);
        let grown = b.estimated_bytes() - before;
        assert!(grown <= record_bytes_max(Some(&[1; 70000]), &[2; 30], &headers));
        let whole = b.finish(ProducerStamp::NONE).len();
        assert!(
            whole <= BATCH_OVERHEAD_BYTES + record_bytes_max(Some(&[1; 70000]), &[2; 30], &headers)
        );
    }

    #[test]
    fn expired_batches_are_taken_with_their_bytes() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(config());
        push(&mut acc, 0, b"a", t0);
        assert!(acc.expire(t0 + 99 * MS, 100 * MS).is_empty());
        let gone = acc.expire(t0 + 100 * MS, 100 * MS);
        assert_eq!(gone.len(), 1);
        assert!(acc.is_idle());
    }

    #[test]
    fn unkeyed_records_stick_until_the_batch_closes() {
        let t0 = Instant::now();
        let mut acc = Accumulator::new(config());
        let topic: Arc<str> = "t".into();
        let p = acc.choose_partition(&topic, None, 3, Partitioner::Default);
        assert_eq!(
            acc.choose_partition(&topic, None, 3, Partitioner::Default),
            p
        );
        push(&mut acc, p, b"a", t0);
        acc.drain(t0 + 5 * MS);
        let q = acc.choose_partition(&topic, None, 3, Partitioner::Default);
        assert_eq!(q, (p + 1) % 3, "moves on once the batch left");
        // Keys ignore stickiness; round-robin moves every record.
        assert_eq!(
            acc.choose_partition(&topic, Some(b"1"), 4, Partitioner::Default),
            3
        );
        let rr: Vec<u32> = (0..4)
            .map(|_| acc.choose_partition(&"u".into(), Some(b"k"), 2, Partitioner::RoundRobin))
            .collect();
        assert_eq!(rr, vec![rr[0], 1 - rr[0], rr[0], 1 - rr[0]]);
    }

    #[test]
    fn each_producer_starts_its_unkeyed_records_at_a_random_partition() {
        let topic: Arc<str> = "t".into();
        let mut first = [0u32; 4];
        for _ in 0..400 {
            let mut acc = Accumulator::new(config());
            first[acc.choose_partition(&topic, None, 4, Partitioner::Default) as usize] += 1;
        }
        // 100 expected each; a fixed start puts all 400 on one.
        assert!(first.iter().all(|&n| n >= 50), "{first:?}");
    }

    #[test]
    fn a_jittered_backoff_is_between_half_and_all_of_the_backoff() {
        for n in 1..8 {
            let full = backoff(n, 100 * MS, 1000 * MS);
            for _ in 0..100 {
                let b = backoff_jittered(n, 100 * MS, 1000 * MS);
                assert!(b >= full / 2 && b < full, "{n}: {b:?} of {full:?}");
            }
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = |n| backoff(n, 100 * MS, 1000 * MS);
        assert_eq!(b(1), 100 * MS);
        assert_eq!(b(2), 200 * MS);
        assert_eq!(b(4), 800 * MS);
        assert_eq!(b(5), 1000 * MS);
        assert_eq!(b(60), 1000 * MS);
    }
}
