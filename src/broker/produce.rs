//! The produce path: a batch goes through the broker's checks (idempotent
//! sequence, message-id window) into storage's queue, and comes back as a
//! [`Produce`], a future of its acknowledgement.
//!
//! # Who settles what
//!
//! An accepted idempotent batch holds a slot in the producer table until
//! its outcome is known, and a windowed batch's message ids stay
//! remembered unless its write fails. Both are settled by the [`Produce`]
//! itself when the storage ack arrives, not by its caller: the server, the
//! mirror and the coordinator only await it. If a caller drops it first (a
//! timeout, a cancelled task), its `Drop` hands the wait to the
//! [`crate::offload`] thread, which awaits the ack and settles:
//! otherwise a retry of that batch would wait on its slot forever, and a
//! failed batch's ids would stay in the window. The wait is a task there,
//! not a blocking job, so the registry writes run on meanwhile however
//! long a stalled device holds the ack.
//!
//! # Order and grouping
//!
//! The call order of [`ProduceGroup::produce`] is the order in the log (an
//! idempotent producer's sequences are checked in that order), so the
//! server calls it from the connection's reader, in frame order, and
//! awaits the returned futures in a task. A group leaves the storage thread
//! asleep until it ends (is dropped), then wakes it once: the thread finds
//! the whole request queued and writes it as one group commit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::batch::{BatchError, BatchHeader};
use crate::bufpool::BatchBuf;
use crate::storage::{AppendAck, AppendTicket, CheckedBatch, StorageError, Wake};

use super::producers::{self, BatchOutcome, Producers};
use super::{msgid, Broker, BrokerError, Windows};

/// An acknowledged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// The offsets of the batch's first and last record. For a batch that
    /// was written before (a retry) these are the first write's; for one
    /// whose records were all dropped by the message-id window, the last
    /// offset written to the partition (0 when none) for both.
    pub base_offset: u64,
    pub last_offset: u64,
    /// Records recognised as written already and not written again: the
    /// whole batch for a retry, or those the message-id window dropped.
    pub duplicate_records: u32,
}

/// Batches handed to the broker together (a produce request's): submitted
/// in call order, and the storage thread is woken once, when the group is
/// dropped, so they are written in one group commit.
pub struct ProduceGroup<'a> {
    broker: &'a Broker,
    submitted: bool,
}

impl ProduceGroup<'_> {
    /// Submits a producer batch: an idempotent producer's sequence is
    /// checked first (see [`producers`]; a retry of a written batch is
    /// answered from the table and not written again), and on a topic
    /// with a message-id window the records whose id is in it are dropped
    /// (see [`msgid`]). Errors here are the batch's, found before it was
    /// queued; the [`Produce`] resolves when it is acknowledged.
    pub async fn produce(
        &mut self,
        topic: &str,
        partition: u32,
        batch: BatchBuf,
    ) -> Result<Produce, BrokerError> {
        self.submitted = true;
        self.broker.submit(topic, partition, batch, false).await
    }

    /// Submits a transaction marker (a control batch, which producers may
    /// not send): the transaction coordinator's.
    pub(crate) async fn produce_marker(
        &mut self,
        topic: &str,
        partition: u32,
        batch: BatchBuf,
    ) -> Result<Produce, BrokerError> {
        self.submitted = true;
        self.broker.submit(topic, partition, batch, true).await
    }
}

impl Drop for ProduceGroup<'_> {
    fn drop(&mut self) {
        if self.submitted {
            self.broker.storage.wake();
        }
    }
}

/// A submitted batch's acknowledgement: resolves once it is durable under
/// its topic's policy, or failed. Settles the producer table and the
/// message-id window itself, polled or not (see the module docs).
#[must_use = "a produce is acknowledged only when awaited"]
pub struct Produce {
    state: State,
    /// On a compacted topic a full ring waits for the cleaner, or is
    /// full of live data: which, the cleaner says.
    compacted: Option<Arc<super::cleaner::FullRings>>,
}

enum State {
    /// Answered without a write (a retry of a written batch, or every
    /// record a duplicate).
    Ready(Option<Result<Produced, BrokerError>>),
    Queued {
        ticket: AppendTicket,
        /// None when there is nothing to settle (a plain batch).
        settle: Option<Settle>,
        dropped: u32,
    },
    /// A retry of a batch still in flight: that batch's outcome answers it.
    SameAs {
        outcome: Pin<Box<dyn Future<Output = BatchOutcome> + Send>>,
        records: u32,
    },
    Done,
}

impl Produce {
    fn ready(r: Result<Produced, BrokerError>) -> Produce {
        Produce {
            state: State::Ready(Some(r)),
            compacted: None,
        }
    }
}

impl Future for Produce {
    type Output = Result<Produced, BrokerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = match &mut self.state {
            State::Ready(r) => r.take().expect("a produce is polled after it completed"),
            State::Queued {
                ticket,
                settle,
                dropped,
            } => {
                let Poll::Ready(r) = Pin::new(ticket).poll(cx) else {
                    return Poll::Pending;
                };
                let r = r.map_err(Arc::new);
                if let Some(s) = settle.take() {
                    s.settle(&r);
                }
                let duplicate_records = *dropped;
                r.map(|a| Produced {
                    base_offset: a.base_offset,
                    last_offset: a.last_offset,
                    duplicate_records,
                })
                .map_err(BrokerError::from)
            }
            State::SameAs { outcome, records } => {
                let Poll::Ready(r) = outcome.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                let duplicate_records = *records;
                r.map(|(base_offset, last_offset)| Produced {
                    base_offset,
                    last_offset,
                    duplicate_records,
                })
                .map_err(BrokerError::from)
            }
            State::Done => panic!("a produce is polled after it completed"),
        };
        self.state = State::Done;
        let out = match out {
            Err(BrokerError::PartitionFull { topic, partition }) => match &self.compacted {
                Some(rings) => Err(rings.refused(topic, partition)),
                None => Err(BrokerError::PartitionFull { topic, partition }),
            },
            other => other,
        };
        Poll::Ready(out)
    }
}

impl Drop for Produce {
    fn drop(&mut self) {
        let State::Queued {
            mut ticket,
            settle: Some(settle),
            ..
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return;
        };
        // The ack may be in already: settle here.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(r) = Pin::new(&mut ticket).poll(&mut cx) {
            settle.settle(&r.map_err(Arc::new));
            return;
        }
        crate::offload::spawn(async move {
            let r = ticket.await;
            settle.settle(&r.map_err(Arc::new));
        });
    }
}

/// What a queued batch leaves to do once its outcome is known.
struct Settle {
    producers: Arc<Producers>,
    /// The producer table's slot, for an idempotent batch.
    tracked: Option<producers::Ticket>,
    windows: Arc<Windows>,
    /// Message ids remembered for this batch: forgotten if it fails.
    remembered: Option<(String, Vec<u64>)>,
}

impl Settle {
    fn settle(self, r: &Result<AppendAck, Arc<StorageError>>) {
        if let Some(t) = self.tracked {
            let outcome = match r {
                Ok(a) => Ok((a.base_offset, a.last_offset)),
                Err(e) => Err(e.clone()),
            };
            self.producers.complete(t, outcome);
        }
        if let (Err(_), Some((topic, ids))) = (r, self.remembered) {
            if let Some(w) = self.windows.lock().expect("windows lock").get_mut(&topic) {
                w.forget(&ids);
            }
        }
    }
}

enum Windowed {
    /// Write this batch; the ids remembered for it and the records dropped.
    Keep {
        batch: CheckedBatch,
        remembered: Vec<u64>,
        dropped: u32,
    },
    /// Every record was a duplicate: write nothing.
    AllDuplicates,
}

impl Broker {
    /// A group of produces; see [`ProduceGroup`].
    pub fn produce_group(&self) -> ProduceGroup<'_> {
        ProduceGroup {
            broker: self,
            submitted: false,
        }
    }

    /// Submits one batch and wakes the storage thread for it: a group of
    /// one (see [`ProduceGroup::produce`]).
    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        batch: BatchBuf,
    ) -> Result<Produce, BrokerError> {
        self.produce_group().produce(topic, partition, batch).await
    }

    async fn submit(
        &self,
        topic: &str,
        partition: u32,
        batch: BatchBuf,
        marker: bool,
    ) -> Result<Produce, BrokerError> {
        let id = self.partition_id(topic, partition)?;
        // A whole check (CRC included) before the batch takes a sequence:
        // storage can then fail it only for reasons that are sticky or
        // shared by the batches after it (see producers' module docs). The
        // check is handed to storage, which does not repeat it.
        let checked = CheckedBatch::check(batch)?;
        if checked.header().is_control() != marker {
            return Err(BrokerError::InvalidBatch(BatchError::Malformed(
                "control batches (attribute bit 0) are written by the broker only",
            )));
        }
        let cleanup = self.cleanup_config(topic).policy;
        super::cleaner::check_records(topic, cleanup, checked.header(), checked.bytes())?;
        let compacted = cleanup.compacts().then(|| self.full_rings.clone());
        let header = *checked.header();
        let windowed = self
            .windows
            .lock()
            .expect("windows lock")
            .contains_key(topic);
        if !header.is_idempotent() && !windowed {
            let ticket = self.storage.submit(&id, checked, Wake::Later).await?;
            return Ok(Produce {
                state: State::Queued {
                    ticket,
                    settle: None,
                    dropped: 0,
                },
                compacted,
            });
        }
        let _order = self.submit_order.lock().await;
        let hw = self.storage.offsets(&id)?.high_watermark;
        let tracked = match self
            .producers
            .check(id.topic.clone(), partition, &header, hw)
        {
            producers::Check::Untracked => None,
            producers::Check::Accept(tracked) => Some(tracked),
            producers::Check::Duplicate {
                base_offset,
                last_offset,
                records,
            } => {
                return Ok(Produce::ready(Ok(Produced {
                    base_offset,
                    last_offset,
                    duplicate_records: records,
                })))
            }
            producers::Check::InFlight { slot, records } => {
                return Ok(Produce {
                    state: State::SameAs {
                        outcome: Box::pin(async move { slot.wait().await }),
                        records,
                    },
                    compacted,
                })
            }
            producers::Check::Reject(e) => return Err(BrokerError::Sequence(e)),
        };
        let mut settle = Settle {
            producers: self.producers.clone(),
            tracked,
            windows: self.windows.clone(),
            remembered: None,
        };
        let (checked, dropped) = if windowed {
            match self.apply_window(topic, &header, checked) {
                Ok(Windowed::Keep {
                    batch,
                    remembered,
                    dropped,
                }) => {
                    settle.remembered = Some((topic.to_owned(), remembered));
                    (batch, dropped)
                }
                Ok(Windowed::AllDuplicates) => {
                    // Nothing to write. The answer names the last offset
                    // written (none: 0); see docs/semantics.md.
                    let at = hw.saturating_sub(1);
                    settle.settle(&Ok(AppendAck {
                        base_offset: at,
                        last_offset: at,
                    }));
                    return Ok(Produce::ready(Ok(Produced {
                        base_offset: at,
                        last_offset: at,
                        duplicate_records: header.record_count,
                    })));
                }
                Err(e) => {
                    // Its records do not decode: it never reaches the log.
                    settle.settle(&Err(Arc::new(StorageError::InvalidBatch(e.clone()))));
                    return Err(BrokerError::InvalidBatch(e));
                }
            }
        } else {
            (checked, 0)
        };
        match self.storage.submit(&id, checked, Wake::Later).await {
            Ok(ticket) => Ok(Produce {
                state: State::Queued {
                    ticket,
                    settle: Some(settle),
                    dropped,
                },
                compacted,
            }),
            Err(e) => {
                // Nobody waits on this slot yet (the order lock is held).
                let e = Arc::new(e);
                settle.settle(&Err(e.clone()));
                Err(e.into())
            }
        }
    }

    /// Drops the records whose message id is in the topic's window and
    /// remembers the others' ids. A batch that loses records is re-encoded
    /// (the one place the broker re-encodes a batch): for an idempotent
    /// producer its base sequence is moved up so that its last sequence,
    /// which the next batch follows, is unchanged.
    fn apply_window(
        &self,
        topic: &str,
        header: &BatchHeader,
        checked: CheckedBatch,
    ) -> Result<Windowed, BatchError> {
        let view = crate::batch::BatchView::new(checked.bytes())?;
        let now = self.clock.now_ms();
        let mut remembered = Vec::new();
        // The records whose id the window held: empty, so never allocated,
        // unless the batch repeats an id.
        let mut dropped_at = Vec::new();
        {
            let mut windows = self.windows.lock().expect("windows lock");
            let Some(w) = windows.get_mut(topic) else {
                drop(windows);
                return Ok(Windowed::Keep {
                    batch: checked,
                    remembered,
                    dropped: 0,
                });
            };
            // Borrowed, not decoded into a list: this runs on every batch
            // of a windowed topic. `submit` checked the records as this
            // walk reads them, so it cannot fail part way; were it to, the
            // window gives back the ids it took.
            for (i, r) in view.record_refs().enumerate() {
                let r = r.inspect_err(|_| w.forget(&remembered))?;
                let id = r
                    .headers
                    .iter()
                    .find(|&(name, _)| name == msgid::MSG_ID_HEADER)
                    .map(|(_, value)| msgid::id_hash(value));
                match id {
                    Some(h) if w.check_and_insert(h, now) => dropped_at.push(i),
                    Some(h) => remembered.push(h),
                    None => {}
                }
            }
        }
        let dropped = dropped_at.len() as u32;
        let kept = header.record_count - dropped;
        self.msg_id_duplicates
            .fetch_add(u64::from(dropped), std::sync::atomic::Ordering::Relaxed);
        if dropped == 0 {
            return Ok(Windowed::Keep {
                batch: checked,
                remembered,
                dropped,
            });
        }
        if kept == 0 {
            return Ok(Windowed::AllDuplicates);
        }
        let mut b = crate::batch::BatchBuilder::new();
        let mut dropped_at = dropped_at.into_iter().peekable();
        for (i, r) in view.record_refs().enumerate() {
            if dropped_at.next_if_eq(&i).is_some() {
                continue;
            }
            let r = r?;
            let headers: Vec<(&str, &[u8])> = r.headers.iter().collect();
            b.push_record(
                header.first_timestamp + r.timestamp_delta,
                r.key,
                r.value,
                &headers,
            );
        }
        let stamp = if header.is_idempotent() {
            let last = i64::from(header.last_sequence());
            crate::batch::ProducerStamp {
                producer_id: header.producer_id,
                producer_epoch: header.producer_epoch,
                base_sequence: (last - i64::from(kept) + 1).rem_euclid(i64::from(i32::MAX) + 1)
                    as i32,
            }
        } else {
            crate::batch::ProducerStamp::NONE
        };
        Ok(Windowed::Keep {
            batch: CheckedBatch::check(b.finish(stamp))?,
            remembered,
            dropped,
        })
    }
}
