//! A transactional producer: a [`Producer`] whose batches belong to the
//! open transaction of its transactional id. Records are sent as they
//! come (batched as usual); [`TxnProducer::commit`] waits for every one of
//! them to be acknowledged and then commits, so nothing of the
//! transaction is left in flight when the broker decides.

use std::time::{Duration, Instant};

use super::accumulator::backoff;

use super::{Client, ClientError, Delivery, Producer, ProducerConfig};
use crate::protocol::{AddTxnOffsetsRequest, ErrorCode, TxnOffset};

/// Kafka's default `transaction.timeout.ms`.
pub const TRANSACTION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

pub struct TxnProducer {
    producer: Producer,
    id: String,
    producer_id: (u64, u16),
    /// The open transaction's records not yet known to be acknowledged,
    /// each with its number (see [`TxnProducer::first_failure`]).
    pending: Vec<(u64, Delivery)>,
    /// Records sent so far.
    sent: u64,
    /// A record or offsets were sent since the last end: the broker may
    /// have begun a transaction. Without, no end is sent (nothing is open,
    /// and the broker refuses an end then), as Kafka's client sends no
    /// EndTxn for a transaction that added nothing.
    may_have_begun: bool,
    /// The broker began the transaction: a record of it was acknowledged,
    /// its offsets were added, or its commit was asked for.
    begun: bool,
}

impl TxnProducer {
    /// Registers `id` with the broker (fencing any older instance and
    /// aborting its open transaction) and makes the producer.
    pub async fn new(
        client: Client,
        id: &str,
        timeout: Duration,
        config: ProducerConfig,
    ) -> Result<Self, ClientError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let r = client.init_txn(id, timeout_ms).await?;
        let producer_id = (r.producer_id, r.producer_epoch);
        let producer = Producer::with_id(client, config, Some(producer_id)).await?;
        Ok(Self {
            producer,
            id: id.to_owned(),
            producer_id,
            pending: Vec::new(),
            sent: 0,
            may_have_begun: false,
            begun: false,
        })
    }

    pub fn producer_id(&self) -> (u64, u16) {
        self.producer_id
    }

    /// Sends a record in the open transaction (opening one).
    pub fn send(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) {
        let d = self.producer.send(topic, key, value, headers);
        self.may_have_begun = true;
        self.sent += 1;
        self.pending.push((self.sent, d));
    }

    /// As [`send`](Self::send), waiting for room in the producer's buffer.
    pub async fn send_wait(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(), ClientError> {
        let d = self.producer.send_wait(topic, key, value, headers).await?;
        self.may_have_begun = true;
        self.sent += 1;
        self.pending.push((self.sent, d));
        Ok(())
    }

    /// `topic`'s partition count (see [`Producer::partitions_for`]): an
    /// unknown topic fails here, before a record is sent to it.
    pub async fn partitions_for(&self, topic: &str) -> Result<u32, ClientError> {
        self.producer.partitions_for(topic).await
    }

    /// Adds a group's offsets (the next offsets to read) to the open
    /// transaction: committed only if it commits. A retriable refusal (a
    /// transaction cannot begin while `transactions.max_open` others are
    /// open) is tried again with the producer's backoff, for as long as
    /// its records would be.
    pub async fn send_offsets(
        &mut self,
        group: &str,
        offsets: &[(&str, u32, u64)],
    ) -> Result<(), ClientError> {
        self.may_have_begun = true;
        let config = self.producer.config();
        let (retry_backoff, retry_backoff_max) = (config.retry_backoff, config.retry_backoff_max);
        let deadline = Instant::now() + config.delivery_timeout;
        let mut attempts = 0;
        loop {
            match self.try_send_offsets(group, offsets).await {
                Ok(()) => {
                    self.begun = true;
                    return Ok(());
                }
                Err(e) if e.is_retriable() && Instant::now() < deadline => {
                    attempts += 1;
                    let pause = backoff(attempts, retry_backoff, retry_backoff_max);
                    smol::Timer::after(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                r => return r,
            }
        }
    }

    async fn try_send_offsets(
        &self,
        group: &str,
        offsets: &[(&str, u32, u64)],
    ) -> Result<(), ClientError> {
        self.producer
            .client()
            .add_txn_offsets(AddTxnOffsetsRequest {
                transactional_id: self.id.clone(),
                producer_id: self.producer_id.0,
                producer_epoch: self.producer_id.1,
                group: group.to_owned(),
                offsets: offsets
                    .iter()
                    .map(|(t, p, o)| TxnOffset {
                        topic: (*t).to_owned(),
                        partition: *p,
                        offset: *o,
                    })
                    .collect(),
            })
            .await
    }

    /// The first record of the open transaction, in the order sent, that
    /// has already failed, without waiting: its number (the first record
    /// this producer sent is 1; a send that returned an error is not counted)
    /// and error. Forgets the records already acknowledged.
    pub fn first_failure(&mut self) -> Option<(u64, ClientError)> {
        let mut failed = None;
        let mut acked = false;
        self.pending.retain(|(n, d)| match d.try_result() {
            None => true,
            Some(Ok(_)) => {
                acked = true;
                false
            }
            Some(Err(e)) => {
                failed.get_or_insert((*n, e));
                true
            }
        });
        self.begun |= acked;
        failed
    }

    /// Waits for every record of the transaction; the first failure.
    async fn settle(&mut self) -> Result<(), ClientError> {
        self.producer.flush().await;
        let mut first = None;
        for (_, d) in self.pending.drain(..) {
            match d.await {
                Ok(_) => self.begun = true,
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Commits the open transaction once all its records are acknowledged;
    /// returns when the commit is durable. If a record failed, the
    /// transaction is aborted instead and the record's error returned.
    ///
    /// `fenced_producer` means the transaction was aborted without this
    /// instance (a newer one, its timeout, or a broker restart while it
    /// was open): nothing of it commits and there is nothing to abort;
    /// make a new instance ([`TxnProducer::new`]) and process again from
    /// the group's committed offsets.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        if let Err(e) = self.settle().await {
            // Best effort: a fenced producer cannot abort, and the broker
            // aborts on the transaction's timeout anyway.
            let _ = self.end(false).await;
            return Err(e);
        }
        self.end(true).await
    }

    /// Aborts the open transaction; returns when the abort is durable.
    pub async fn abort(&mut self) -> Result<(), ClientError> {
        // Records still in flight are written before the markers only if
        // they are acknowledged first.
        let _ = self.settle().await;
        self.end(false).await
    }

    /// Ends the transaction, if one may have begun. An abort refused with
    /// `invalid_txn_state` when nothing of the transaction is known to
    /// have reached it (its records all failed) found none open: done.
    async fn end(&mut self, commit: bool) -> Result<(), ClientError> {
        if !self.may_have_begun {
            return Ok(());
        }
        // A commit refused or lost may have left the broker committing:
        // an abort then must not pass for done.
        self.begun |= commit;
        let r = self
            .producer
            .client()
            .end_txn(&self.id, self.producer_id, commit)
            .await;
        let r = match r {
            Err(e) if !self.begun && e.code() == Some(ErrorCode::InvalidTxnState) => Ok(()),
            r => r,
        };
        if r.is_ok() {
            self.may_have_begun = false;
            self.begun = false;
        }
        r
    }
}
