//! The fetch path: whole batches from several partitions at once, with
//! the long-poll. A consumer's fetch, and in-process readers (the mirror
//! reads partitions as a consumer does), all come through
//! [`Broker::fetch`].

use std::future::Future;
use std::time::{Duration, Instant};

use event_listener::EventListener;

use super::{Broker, BrokerError, Offsets, Shutdown};

/// One partition of a fetch.
#[derive(Debug, Clone, Copy)]
pub struct FetchPartition<'a> {
    pub topic: &'a str,
    pub partition: u32,
    /// The first offset wanted.
    pub offset: u64,
    /// A soft cap on this partition's bytes: whole batches are returned,
    /// the first one even when it is larger.
    pub max_bytes: usize,
}

/// How long a fetch may wait, and for how much.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    /// Answer once the partitions hold this many bytes together (at least
    /// one byte: 0 is taken as 1)...
    pub min_bytes: usize,
    /// ...or once this long has passed, or the broker begins to stop.
    pub max_wait: Duration,
    /// The bytes of every partition's batches together, never passed but
    /// by the answer's first batch, which is taken whatever its size (as
    /// a partition's first batch may be larger than its `max_bytes`):
    /// later partitions give the batches that fit in what is left.
    pub max_bytes: usize,
}

/// One partition's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Zero or more whole batches as stored, the first one holding the
    /// offset asked for (so it may start below it). Often a view of the
    /// storage thread's read buffer, which it keeps from reuse until dropped.
    pub records: bytes::Bytes,
    /// The partition's offsets after the read.
    pub offsets: Offsets,
    /// The partition's last stable offset: below it no transaction is
    /// open (the high watermark when none is).
    pub last_stable_offset: u64,
    /// Where the consumer continues, past what the answer left out: for a
    /// read_committed fetch the batches left out (control batches, aborted
    /// transactions' batches); for any fetch that found no batch at or
    /// after its offset below the high watermark, that gap (see `read`).
    pub next_offset: Option<u64>,
}

impl Broker {
    /// Reads every partition asked for, in order; if together they hold
    /// fewer than `min_bytes` and none failed, waits for new data (any of
    /// them), `max_wait`, or the broker's stop, and reads again. One
    /// result per partition, in the same order.
    pub async fn fetch(
        &self,
        partitions: &[FetchPartition<'_>],
        limits: FetchLimits,
    ) -> Vec<Result<Fetched, BrokerError>> {
        self.fetch_isolated(partitions, limits, false).await
    }

    /// As [`Broker::fetch`]; `read_committed` reads only below each
    /// partition's last stable offset and leaves out control batches and
    /// aborted transactions' batches (see `txn::Index::filter`).
    pub async fn fetch_isolated(
        &self,
        partitions: &[FetchPartition<'_>],
        limits: FetchLimits,
        read_committed: bool,
    ) -> Vec<Result<Fetched, BrokerError>> {
        let deadline = Instant::now() + limits.max_wait;
        let min_bytes = limits.min_bytes.max(1);
        let budget_bytes = limits.max_bytes.max(1);
        loop {
            // Listen before reading, so an append in between still wakes us.
            let listeners: Vec<EventListener> = partitions
                .iter()
                .filter_map(|p| self.partition_id(p.topic, p.partition).ok())
                .filter_map(|id| self.storage.data_event(&id).ok())
                .map(|event| event.listen())
                .collect();
            let mut results = Vec::with_capacity(partitions.len());
            let mut total = 0usize;
            let mut any_error = false;
            // A read_committed answer that left every batch out still
            // moves the consumer on: answer it now.
            let mut skipped = false;
            for p in partitions {
                let remaining = budget_bytes.saturating_sub(total);
                let max_bytes = p.max_bytes.min(remaining);
                // The first batch of the answer is taken whatever its size;
                // after it, a partition's batches only when they fit in
                // what is left, which may hold several small ones.
                let first_max = if total > 0 { remaining } else { usize::MAX };
                let r = if max_bytes == 0 || first_max < crate::batch::HEADER_BYTES {
                    // No room for another whole batch: the caller asks again.
                    self.offsets(p.topic, p.partition).map(|offsets| Fetched {
                        records: bytes::Bytes::new(),
                        last_stable_offset: self.txn_index.last_stable_offset(
                            p.topic,
                            p.partition,
                            offsets.high_watermark,
                        ),
                        offsets,
                        next_offset: None,
                    })
                } else {
                    self.read(p, max_bytes, first_max, read_committed).await
                };
                match &r {
                    Ok(f) => {
                        total += f.records.len();
                        skipped |=
                            f.records.is_empty() && f.next_offset.is_some_and(|n| n > p.offset);
                    }
                    Err(_) => any_error = true,
                }
                results.push(r);
            }
            if total >= min_bytes
                || any_error
                || skipped
                || Instant::now() >= deadline
                || self.stopping.is_triggered()
            {
                return results;
            }
            wait_any(listeners, deadline, &self.stopping).await;
        }
    }

    async fn read(
        &self,
        p: &FetchPartition<'_>,
        max_bytes: usize,
        first_max: usize,
        read_committed: bool,
    ) -> Result<Fetched, BrokerError> {
        let id = self.partition_id(p.topic, p.partition)?;
        // The stable offset before the read: a transaction that ends
        // meanwhile shows at the next fetch, never half of it now.
        let before = self.storage.offsets(&id)?;
        let lso = self
            .txn_index
            .last_stable_offset(p.topic, p.partition, before.high_watermark);
        // (An offset outside the log reads on, for read_uncommitted's error.)
        if read_committed && (lso..=before.high_watermark).contains(&p.offset) {
            let offsets = before;
            return Ok(Fetched {
                records: bytes::Bytes::new(),
                offsets,
                last_stable_offset: lso,
                next_offset: None,
            });
        }
        let records = self
            .storage
            .read_within(&id, p.offset, max_bytes, first_max)
            .await?;
        let offsets = self.storage.offsets(&id)?;
        // No batch at or after the offset, below a high watermark the read
        // saw (it saw `before`'s or a later one): the offsets up to it are
        // a gap with nothing after it yet (damage lost at the log's end,
        // compaction). The reader moves past it rather than wait below the
        // high watermark for a batch that may never come. (Under a
        // `first_max` an empty read may be a batch too large for the room
        // left: the gap shows when the partition is read first.)
        let past_gap =
            (records.is_empty() && first_max == usize::MAX && p.offset < before.high_watermark)
                .then_some(before.high_watermark);
        if !read_committed {
            return Ok(Fetched {
                records,
                offsets,
                last_stable_offset: lso,
                next_offset: past_gap,
            });
        }
        let f = self.txn_index.filter(p.topic, p.partition, records, lso);
        Ok(Fetched {
            records: f.records,
            offsets,
            last_stable_offset: lso,
            // (Here the offset is below `lso`, which is at most `before`'s
            // high watermark.)
            next_offset: f.next_offset.or(past_gap.map(|hw| hw.min(lso))),
        })
    }
}

/// Until the first listener fires, the deadline, or the stop.
async fn wait_any(listeners: Vec<EventListener>, deadline: Instant, stopping: &Shutdown) {
    let any_data = async {
        if listeners.is_empty() {
            futures_lite::future::pending::<()>().await;
        }
        let mut listeners: Vec<_> = listeners.into_iter().map(Box::pin).collect();
        futures_lite::future::poll_fn(|cx| {
            for l in listeners.iter_mut() {
                if l.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        })
        .await
    };
    let timer = async {
        smol::Timer::at(deadline).await;
    };
    futures_lite::future::or(any_data, futures_lite::future::or(timer, stopping.wait())).await;
}
